"""What a training run optimises: full precision, fixed-precision QAT, or RefQSR QAT.

The loop (training/loop.py) owns resuming, checkpoints, logging and validation; a task owns the
model, its optimiser parameter groups, the batch stream (a pure function of the step, so resumed
runs see the batches an uninterrupted run would) and the loss.

* ``fp``      -- the SR network (--arch), L1 (the teacher of the others).
* ``qat``     -- PAMS/DDTB SR network at fixed bits, from the FP weights, L1 + KD from the FP teacher
                 (paper eq. (8)).
* ``refqsr``  -- the RefQSR wrapper on Algorithm-1 (query, reference) pairs, from the FP (or a
                 fixed-precision) model, loss (9): L1 and KD for the query and the reference outputs.
                 ``--train refer`` trains the RefER blocks only, on the backbone of ``--init-from``
                 (its query terms; the reference path is then a constant).

Mixed precision (``--scheme cadyq|cabm``, bits "delta" for qat, "delta-3"/"delta-4" for refqsr):

* ``cadyq`` -- per patch and layer bit selectors (models/quant_cadyq.py); the objective adds
  ``--bit-weight`` x CADyQ's bit loss (both RefQSR paths' choices for refqsr). Starts from
  ``--init-from`` (CADyQ starts from the 8-bit PAMS model) or the teacher; a δ-RefQSR may also start
  from a δ-RefQSR model file.
* ``cabm``  -- CABM fine-tuning: ``--init-from`` a trained CADyQ model (CADyQ-RefQSR for refqsr);
  its selectors are calibrated into an edge-score lookup table on ``--cabm-calib`` training
  patches in ``--cabm-bins`` bins (models/cabm.py), or its table is kept if it already has one,
  and training runs with the table's fixed bits (no bit loss).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from refqsr_engine.errors import RefQSRError
from refqsr_engine.models.backbone import SRBackbone
from refqsr_engine.models.bitops import Precision
from refqsr_engine.models.cabm import attach_cabm, build_cabm_table
from refqsr_engine.models.checkpoint import load_model, read_config
from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.models.patchwise import upscale_patchwise
from refqsr_engine.models.qconv import FP, BitSpec
from refqsr_engine.models.quant_cadyq import SCHEME as CADYQ
from refqsr_engine.models.quant_cadyq import Delta, Selection, dynamic_convs
from refqsr_engine.models.refqsr import RefQSR
from refqsr_engine.models.registry import build_refqsr, build_sr
from refqsr_engine.training.card_paths import card_path
from refqsr_engine.training.datasets import HRFolderDataset, StepBatchSampler, collate
from refqsr_engine.training.pairs import ImagePairs, sample_pairs
from torch import nn
from torch.utils.data import DataLoader

QUANT_PARAM_SUFFIXES = (".alpha", ".lower", ".upper")  # learnable quantizer bounds (own learning rate)
VAL_PATCH = 48  # RefQSR validation runs patch-wise, as the engine does
DYNAMIC_SCHEMES = (CADYQ, "cabm")  # δ bits: CADyQ's selectors, or CABM's table built from them
CALIB_EPOCH = 1_000_000  # CABM calibration crops: an epoch number no training run reaches


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of an N x C x H x W batch (k in 0..7)."""
    if k & 4:
        x = x.flip(-1)
    return torch.rot90(x, k & 3, dims=(-2, -1))


def _load_sr(path: str, what: str) -> SRBackbone:
    model, _ = load_model(path)
    if not isinstance(model, SRBackbone):
        raise RefQSRError(f"{what} {path} is not an SR network")
    return model


class Task:
    """Base: subclasses set ``self.model`` and implement ``loss`` and ``batches``."""

    name = "base"
    model: nn.Module

    def __init__(self, cfg: Any, dataset: HRFolderDataset) -> None:
        self.cfg = cfg
        self.dataset = dataset

    def param_groups(self) -> list[dict[str, Any]]:
        """Network weights at the base learning rate; quantizer bounds at ``lr_quant`` (DDTB/PAMS
        train their bounds with a larger step)."""
        quant = [p for n, p in self.model.named_parameters() if n.endswith(QUANT_PARAM_SUFFIXES)]
        ids = {id(p) for p in quant}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        groups = [{"params": rest, "base_lr": self.cfg.lr}]
        if quant:
            groups.append({"params": quant, "base_lr": self.cfg.lr_quant})
        return groups

    def batches(self, start_step: int, steps: int) -> Iterator[dict[str, torch.Tensor]]:
        sampler = StepBatchSampler(len(self.dataset), self.cfg.batch, self.cfg.seed, start_step=start_step, steps=steps)
        return iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.cfg.workers, collate_fn=collate))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise RefQSRError(f"task {self.name} has no loss")  # every concrete task overrides this

    def sr(self, lr: torch.Tensor) -> torch.Tensor:
        """Validation forward of one LR image (1 x 3 x h x w)."""
        return self.model(lr)

    def card(self) -> dict[str, Any]:
        return {"task": self.name}

    def to(self, device: torch.device) -> Task:
        for module in self.__dict__.values():
            if isinstance(module, nn.Module):
                module.to(device)
        return self


class FPTask(Task):
    name = "fp"

    def __init__(self, cfg: Any, dataset: HRFolderDataset) -> None:
        super().__init__(cfg, dataset)
        if cfg.init not in ("interp", "random"):
            raise RefQSRError(f"unknown --init {cfg.init!r}: use interp or random")
        source = _load_sr(cfg.init_from, "--init-from") if cfg.init_from else None  # continue a trained network
        if source is not None and (source.arch != cfg.arch or source.scheme is not None):
            raise RefQSRError(f"--init-from {cfg.init_from} is not a full-precision {cfg.arch}")
        self.model = build_sr(cfg.arch, **(source.sizes() if source is not None else {}))
        if source is not None:
            self.model.load_state_dict(source.float().state_dict())
        elif cfg.init == "interp":
            self.model.interpolation_init()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.l1_loss(self.model(batch["lr"]), batch["hr"])

    def card(self) -> dict[str, Any]:
        return {"task": self.name, "loss": "L1", "init": card_path(self.cfg.init_from) or self.cfg.init}


class _Distilled(Task):
    """Shared by the quantized tasks: a frozen full-precision teacher for the KD term."""

    def __init__(self, cfg: Any, dataset: HRFolderDataset) -> None:
        super().__init__(cfg, dataset)
        if not cfg.teacher:
            raise RefQSRError("quantization-aware training needs --teacher (the full-precision model file)")
        self.teacher = _load_sr(cfg.teacher, "teacher").eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if self.teacher.arch != cfg.arch:
            raise RefQSRError(f"the teacher {cfg.teacher} is a {self.teacher.arch}, not a {cfg.arch}")
        # the student has the teacher's sizes (the preset's, unless a smaller network is trained)
        self.sizes = self.teacher.sizes()

    def distill(self, student: torch.Tensor, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """lambda_1 L1(student, HR) + lambda_kd L1(student, teacher)  (paper eq. (8))."""
        # the KD target in fp32 even under bf16 autocast: a bf16 forward of the bundled FP
        # SRResNet scores 0.6 dB below its fp32 self (33.40 vs 33.98 dB on the held-out crops),
        # which would pull the student towards a worse network than its teacher
        with torch.no_grad(), torch.autocast(lr.device.type, enabled=False):
            target = self.teacher(lr.float())
        l1 = torch.nn.functional.l1_loss
        return l1(student, hr) + self.cfg.kd_weight * l1(student, target)

    def _init_backbone(self, net: SRBackbone) -> SRBackbone:
        """Start from the weights of ``--init-from`` (default: the teacher); quantizer ranges are
        then set from the first batch (PAMS/DDTB initialisation); CADyQ's bit selectors start
        fresh unless the source has them. Returns the source network."""
        source = _load_sr(self.cfg.init_from, "--init-from") if self.cfg.init_from else self.teacher
        missing, unexpected = net.load_state_dict(source.state_dict(), strict=False)
        if unexpected or any(
            k.split(".")[-1] not in ("alpha", "lower", "upper", "initialized")
            and ".gate." not in k
            and ".selector." not in k
            for k in missing
        ):
            raise RefQSRError(f"weights do not fit the network (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return source

    # -- δ bits (CADyQ / CABM)

    @property
    def dynamic(self) -> bool:
        return self.cfg.scheme in DYNAMIC_SCHEMES

    def _precision(self) -> Precision:
        """--bits, checked against the scheme: δ settings for cadyq/cabm, numbers for the others."""
        p = Precision.parse(self.cfg.bits)
        if self.dynamic and not p.dynamic:
            example = "delta" if self.name == "qat" else "delta-3"
            raise RefQSRError(f"--scheme {self.cfg.scheme} chooses bits per patch and layer: use --bits {example}")
        if p.dynamic and not self.dynamic:
            raise RefQSRError(f"--bits {self.cfg.bits} (δ) needs --scheme cadyq or cabm")
        return p

    def _setup_cabm(self, model: nn.Module, source: nn.Module) -> None:
        """CABM: keep ``source``'s table, or calibrate one from its (loaded) selectors."""
        if not dynamic_convs(source):
            raise RefQSRError("--scheme cabm starts from a trained CADyQ model: pass it as --init-from")
        table = getattr(source, "cabm", None)
        if table is None:
            table = build_cabm_table(model, self._calibration_patches(self.cfg.cabm_calib), self.cfg.cabm_bins)
        attach_cabm(model, table)

    def _calibration_patches(self, n: int) -> torch.Tensor:
        """``n`` LR training crops, a fixed set (seeded like training crops, in an epoch of their own)."""
        size = len(self.dataset)
        return collate([self.dataset[(CALIB_EPOCH + i // size, i % size)] for i in range(n)])["lr"]

    def add_bit_loss(self, loss: torch.Tensor, *selections: Selection) -> torch.Tensor:
        """CADyQ's objective: + --bit-weight x bit loss (nothing for CABM's fixed table)."""
        if self.cfg.scheme != CADYQ or not self.cfg.bit_weight:
            return loss
        return loss + self.cfg.bit_weight * sum(s.bit_loss() for s in selections)

    def bits_card(self) -> dict[str, Any]:
        if not self.dynamic:
            return {}
        card: dict[str, Any] = {"bit_weight": self.cfg.bit_weight if self.cfg.scheme == CADYQ else None}
        if self.cfg.scheme == "cabm":
            card.update(cabm_bins=self.cfg.cabm_bins, cabm_calib=self.cfg.cabm_calib)
        return card


class QATTask(_Distilled):
    name = "qat"

    def __init__(self, cfg: Any, dataset: HRFolderDataset) -> None:
        super().__init__(cfg, dataset)
        p = self._precision()
        if p.is_refqsr or p.b_high == 32:
            raise RefQSRError("task qat takes one bit width, e.g. --bits 8 (use --task refqsr for 8-4)")
        self.bits: BitSpec | Delta
        if self.dynamic:
            self.bits = Delta(p.b_high)
            self.model = build_sr(cfg.arch, CADYQ, **self.sizes)
        else:
            self.bits = BitSpec.uniform(p.b_high)
            self.model = build_sr(cfg.arch, cfg.scheme, (p.b_high,), **self.sizes)
        source = self._init_backbone(self.model)
        if cfg.scheme == "cabm":
            self._setup_cabm(self.model, source)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.dynamic:
            sel = Selection(self.bits.weight)
            sr = self.model(batch["lr"], sel)
            return self.add_bit_loss(self.distill(sr, batch["lr"], batch["hr"]), sel)
        return self.distill(self.model(batch["lr"], self.bits), batch["lr"], batch["hr"])

    def sr(self, lr: torch.Tensor) -> torch.Tensor:
        return self.model(lr, self.bits)

    def card(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "scheme": self.cfg.scheme,
            "bits": self.cfg.bits,
            "loss": "L1 + KD (eq. 8)",
            "kd_weight": self.cfg.kd_weight,
            "teacher": card_path(self.cfg.teacher),
            "init_from": card_path(self.cfg.init_from or self.cfg.teacher),
            **self.bits_card(),
        }


# RefER's refinement starts at this fraction of its default initialisation: with a full-size random
# refinement the query path begins far from the teacher (ELAN-light's first RefQSR loss was 3.6x
# DDTB-8's); near zero, each RefER starts as "skip the replaced block" and learns the correction.
REFER_INIT_SCALE = 0.01


def _start_refers_small(model: RefQSR) -> None:
    with torch.no_grad():
        for refer in model.refers:
            last = refer.conv2.conv
            last.weight.mul_(REFER_INIT_SCALE)
            if last.bias is not None:
                last.bias.zero_()


class RefQSRTask(_Distilled):
    name = "refqsr"

    def __init__(self, cfg: Any, dataset: HRFolderDataset) -> None:
        super().__init__(cfg, dataset)
        p = self._precision()
        if not p.is_refqsr:
            raise RefQSRError("task refqsr takes b_high-b_low bits, e.g. --bits 8-4")
        if not cfg.clustblock:
            raise RefQSRError("task refqsr needs --clustblock (a trained ClustBlock file)")
        self.refer_only = cfg.train_part == "refer"
        if self.refer_only and cfg.tail != "refer":
            raise RefQSRError("--train refer needs RefER blocks: the --tail highbit ablation has none")
        if self.refer_only and not cfg.init_from:
            raise RefQSRError("--train refer keeps the backbone as it is: give a trained one with --init-from")
        if cfg.refer_kd and (cfg.tail != "refer" or self.dynamic):
            raise RefQSRError("--refer-kd needs RefER blocks and fixed bits (not --tail highbit, not delta)")
        clust, _ = load_model(cfg.clustblock)
        if not isinstance(clust, ClustBlock):
            raise RefQSRError(f"{cfg.clustblock} is not a ClustBlock")
        scheme = CADYQ if self.dynamic else cfg.scheme
        self.model: RefQSR = build_refqsr(
            cfg.arch,
            scheme,
            p.b_high,
            p.b_low,
            clust.eval(),
            cfg.tau,
            tail=cfg.tail,
            matching=cfg.matching,
            **self.sizes,
        )
        source = (
            load_model(cfg.init_from)[0] if cfg.init_from and read_config(cfg.init_from)["kind"] == "refqsr" else None
        )
        if isinstance(source, RefQSR):
            self._init_refqsr(self.model, source)
        else:
            source = self._init_backbone(self.model.backbone)
        if cfg.fresh_refer or not isinstance(source, RefQSR):
            _start_refers_small(self.model)
        if cfg.scheme == "cabm":
            self._setup_cabm(self.model, source)
        for q in self.model.clustblock.parameters():  # ClustBlock is pre-trained and frozen
            q.requires_grad_(False)
        if self.refer_only:
            self._freeze_all_but_refers()
        self.images = ImagePairs(dataset, dataset.scale)

    def _freeze_all_but_refers(self) -> None:
        """--train refer: only the RefER blocks (convs, PReLUs, their quantizer bounds) learn. With
        the backbone frozen, autograd records the query path from the first RefER on and nothing of
        the reference path, and loss (9)'s reference terms are constants (not computed)."""
        for name, p in self.model.named_parameters():
            if not name.startswith("refers."):
                p.requires_grad_(False)

    def _init_refqsr(self, model: RefQSR, source: RefQSR) -> None:
        """RefQSR from a RefQSR model of the same kind (fixed or δ; CABM-RefQSR from CADyQ-RefQSR,
        shared matching from paper matching): backbone and RefERs, not the ClustBlock (that one
        comes from --clustblock) nor, for shared matching, the source's per-RefER match quantizers;
        ``--fresh-refer``: the backbone only (the RefERs keep their fresh initialisation)."""
        if source.dynamic != model.dynamic:
            kind = "a δ-RefQSR" if model.dynamic else "a fixed-precision RefQSR"
            raise RefQSRError(f"--init-from {self.cfg.init_from} is not {kind} model")
        fresh = ("clustblock.", "refers.") if self.cfg.fresh_refer else ("clustblock.",)
        state = {
            k: v
            for k, v in source.state_dict().items()
            if not k.startswith(fresh) and not (model.shared and ".match_quant." in k)
        }
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith(fresh) for k in missing):
            raise RefQSRError(f"weights do not fit the network (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
        return groups

    def batches(self, start_step: int, steps: int) -> Iterator[dict[str, torch.Tensor]]:
        for step in range(start_step, start_step + steps):
            rng = np.random.default_rng((self.cfg.seed, 0xA1, step))  # Algorithm 1, a pure function of the step
            pairs = sample_pairs(
                self.images,
                self.model.clustblock,
                batch=self.cfg.batch,
                lr_patch=self.cfg.lr_patch,
                scale=self.dataset.scale,
                tau=self.cfg.tau,
                rng=rng,
            )
            kq, kr = (int(k) for k in rng.integers(0, 8, size=2))
            yield {
                "query_lr": _dihedral(pairs.query_lr, kq),
                "query_hr": _dihedral(pairs.query_hr, kq),
                "ref_lr": _dihedral(pairs.ref_lr, kr),
                "ref_hr": _dihedral(pairs.ref_hr, kr),
            }

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Paper eq. (9): L1 and KD on both the query and the reference outputs (δ: plus the
        bit loss of both paths' choices, CADyQ). ``--train refer``: the query terms only.
        ``--refer-kd W`` adds W * mean over RefERs of L1(RefER output, the replaced block's output
        with the query patch wholly at b_high): the feature a perfect repair would give, a direct
        signal where the image loss sees the RefERs' small share through the rest of the network."""
        # the two paths of RefQSR.forward; δ: each records its choices
        sel_r, sel_q = (Selection(self.model.b_high), Selection(self.model.b_high)) if self.dynamic else (None, None)
        if self.refer_only and not self.dynamic:  # the reference's SR output would go unused
            with torch.no_grad():
                features = self.model.reference_features(batch["ref_lr"])
        else:
            with torch.no_grad() if self.refer_only else contextlib.nullcontext():
                sr_r, features = self.model.reference_forward(batch["ref_lr"], sel_r)
        refer_out: list[torch.Tensor] | None = [] if self.cfg.refer_kd else None
        sr_q = self.model.query_forward(batch["query_lr"], features, selection=sel_q, refer_outputs=refer_out)
        loss = self.distill(sr_q, batch["query_lr"], batch["query_hr"])
        if refer_out:
            with torch.no_grad():  # a target, as the KD teacher's output is
                targets = self.model.high_block_outputs(batch["query_lr"])
            feature_l1 = sum(nn.functional.l1_loss(o, t) for o, t in zip(refer_out, targets)) / len(targets)
            loss = loss + self.cfg.refer_kd * feature_l1
        if not self.refer_only:
            loss = loss + self.distill(sr_r, batch["ref_lr"], batch["ref_hr"])
        return self.add_bit_loss(loss, sel_r, sel_q) if self.dynamic else loss

    def sr(self, lr: torch.Tensor) -> torch.Tensor:
        out = upscale_patchwise(self.model, lr[0].cpu().numpy(), patch=VAL_PATCH, overlap=6, batch=16)
        return torch.from_numpy(out.image).unsqueeze(0)

    def card(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "scheme": self.cfg.scheme,
            "bits": self.cfg.bits,
            "tau": self.cfg.tau,
            "tail": self.cfg.tail,
            "matching": self.cfg.matching,
            "trained": "RefER blocks only" if self.refer_only else "all",
            "fresh_refer": self.cfg.fresh_refer,
            "refer_kd": self.cfg.refer_kd,
            "loss": "L1 + KD on the query outputs (eq. 9's query terms)"
            if self.refer_only
            else "L1 + KD on query and reference outputs (eq. 9)",
            "kd_weight": self.cfg.kd_weight,
            "teacher": card_path(self.cfg.teacher),
            "init_from": card_path(self.cfg.init_from or self.cfg.teacher),
            "clustblock": card_path(self.cfg.clustblock),
            "pairs": "Algorithm 1 (ClustBlock cosine > tau)",
            **self.bits_card(),
        }


TASKS: dict[str, Callable[[Any, HRFolderDataset], Task]] = {"fp": FPTask, "qat": QATTask, "refqsr": RefQSRTask}


def make_task(cfg: Any, dataset: HRFolderDataset) -> Task:
    try:
        return TASKS[cfg.task](cfg, dataset)
    except KeyError:
        raise RefQSRError(f"unknown task {cfg.task!r}; choose from {', '.join(TASKS)}") from None


__all__ = ["FP", "Task", "TASKS", "make_task"]
