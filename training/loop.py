"""The resumable training loop shared by every SR training command (tasks: training/tasks.py).

Recipe (the paper's / EDSR code): Adam (0.9, 0.999, 1e-8), lr 1e-4 (quantizer bounds 1e-2) halved
every ``--halve-every`` steps, batches of 16 random 48x48 LR crops (192x192 HR) with flips/rotations.

``RUN_DIR`` holds

* ``last.pt``   -- model, optimizer, step, RNG states, best score, run config; written atomically
  (temp file + ``os.replace``) every ``--ckpt-every`` steps, at the end and on SIGINT/SIGTERM.
  When it exists, training continues from it; the batch stream is a pure function of the step,
  so a resumed run sees the batches an uninterrupted one would.
* ``log.csv``   -- ``step,loss,val_psnr,bicubic_psnr,seconds,lr``: one row every ``--log-every``
  steps (loss = mean over those steps; val columns filled on validation steps; seconds =
  cumulative wall time over every resumed run). Rows past the checkpoint are dropped on resume.
* ``best.pt`` + ``best.json`` -- the best validation PSNR-Y model (``models.checkpoint`` format, fp16)
  and its model card (task, steps, wall time, val PSNR, bicubic PSNR, data used).

Validation: whole val images (centre crops of at most ``--val-crop`` HR px), LR by MATLAB-style
bicubic, SR rounded to 8 bit, PSNR on Y with a ``scale`` px border shave (as the paper); RefQSR
models are validated patch-wise with their ClustBlock, as they run.

Commands: ``python -m refqsr_engine.training.train_fp`` (or ``refqsr-engine train fp``) and
``python -m refqsr_engine.training.train_qat qat|refqsr`` (``refqsr-engine train qat|refqsr``).
``--data`` is a folder with ``train/`` (and ``val/``) as written by
:mod:`refqsr_engine.training.prepare`, a DIV2K-style root (``DIV2K_train_HR``
[+ ``DIV2K_train_LR_bicubic/X4``], ``DIV2K_valid_HR``), or a plain folder of HR images (then pass ``--val``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from refqsr_engine.errors import RefQSRError
from refqsr_engine.metrics import imresize, psnr_y
from refqsr_engine.models.checkpoint import atomic_torch_save, save_model
from refqsr_engine.models.registry import arch_config, arch_names
from refqsr_engine.training.card_paths import card_path
from refqsr_engine.training.datasets import (
    HRFolderDataset,
    PairedFolder,
    div2k_layout,
    to_tensor,
)
from refqsr_engine.training.runlog import append_log, atomic_write_text, read_log, rewrite_log
from refqsr_engine.training.tasks import make_task
from tqdm import tqdm

LOG_FIELDS = ("step", "loss", "val_psnr", "bicubic_psnr", "seconds", "lr")
CKPT_VERSION = 1
# Settings that change the data stream or the model: a resume with other values warns / fails.
_STREAM_KEYS = ("batch", "lr_patch", "seed", "repeat", "train_hr", "train_lr", "tau", "clustblock")


@dataclass
class TrainConfig:
    data: str
    out: str
    steps: int
    arch: str = "srresnet"
    batch: int = 16
    lr_patch: int = 48
    lr: float = 1e-4
    halve_every: int = 200_000
    warmup: int = 0  # steps of linear learning-rate ramp (runs that start from trained weights)
    init: str = "interp"  # fp: "interp" starts as a bilinear upscaler (models.srresnet.interpolation_init); "random"
    task: str = "fp"  # fp | qat | refqsr (training/tasks.py)
    scheme: str = "ddtb"  # qat/refqsr: quantizer
    bits: str = "8"  # qat: "8", "4"; refqsr: "8-4"
    teacher: str | None = None  # qat/refqsr: the full-precision model file (KD target)
    init_from: str | None = None  # starting weights (fp: instead of --init; qat/refqsr: default the teacher's)
    kd_weight: float = 1.0
    lr_quant: float = 1e-2  # learning rate of the quantizer bounds
    clustblock: str | None = None  # refqsr: the trained ClustBlock file
    tau: float = 0.5
    tail: str = "refer"  # refqsr: "highbit" trains Table V's w/o-RefER ablation
    matching: str = "paper"  # refqsr: RefER's flow, "paper" (per RefER) or "shared" (see models/refqsr.py)
    train_part: str = "all"  # refqsr: "refer" trains the RefER blocks only (the backbone as --init-from gives it)
    fresh_refer: bool = False  # refqsr: start the RefER blocks afresh even --init-from a RefQSR model
    refer_kd: float = 0.0  # refqsr: weight of the RefER feature target (training/tasks.py RefQSRTask.loss)
    # cadyq: weight of CADyQ's bit loss (batch mean, summed over layers). CADyQ's own 1e-5 is for a
    # sum over a batch of 16 with pixels in 0..255: 1e-5 * 16 / 255 ~ 6.3e-7 here.
    bit_weight: float = 6.3e-7
    cabm_bins: int = 8  # cabm: edge-score bins of the lookup table
    cabm_calib: int = 256  # cabm: training crops the table is calibrated on
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    val: str | None = None  # HR folder; default: <data>/val or DIV2K_valid_HR
    val_lr: str | None = None
    val_crop: int | None = 256
    val_max_images: int | None = None
    val_every: int = 500
    ckpt_every: int = 100
    log_every: int = 1
    seed: int = 0
    repeat: int = 1
    workers: int = 0
    threads: int | None = None
    device: str = "cpu"  # "cuda" runs the same recipe on a GPU
    # "bf16": autocast the forward pass to bfloat16 (weights, optimizer and loss stay fp32). ~3x faster
    # steps on CPUs with AMX/AVX512-BF16 and on GPUs; "none" is plain fp32.
    amp: str = "none"
    quiet: bool = False
    # Stop (checkpointed, resumable) once this process has trained this many seconds: for machines
    # held for a fixed time (a CI slot, a GPU job with a wall-clock limit). None: no limit.
    time_limit: float | None = None
    # filled in by resolve_data
    train_hr: str = ""
    train_lr: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- data


def resolve_data(cfg: TrainConfig) -> None:
    """Fill ``train_hr`` / ``train_lr`` / ``val`` / ``val_lr`` from ``cfg.data``."""
    root = Path(cfg.data)
    if not root.is_dir():
        raise RefQSRError(f"data folder not found: {root}")
    scale = arch_config(cfg.arch)["scale"]
    val_hr: Path | None = None
    val_lr: Path | None = None
    if (root / "train").is_dir():
        cfg.train_hr, cfg.train_lr = str(root / "train"), None
        if (root / "val").is_dir():
            val_hr = root / "val"
    elif (root / "DIV2K_train_HR").is_dir():
        hr, lr = div2k_layout(root, scale, "train")
        cfg.train_hr, cfg.train_lr = str(hr), (str(lr) if lr else None)
        if (root / "DIV2K_valid_HR").is_dir():
            val_hr, val_lr = div2k_layout(root, scale, "valid")
    else:
        cfg.train_hr, cfg.train_lr = str(root), None
    if cfg.val is None and val_hr is not None:
        cfg.val, cfg.val_lr = str(val_hr), (str(val_lr) if val_lr else None)


def _data_card(cfg: TrainConfig, n_train: int) -> dict[str, Any]:
    """The data facts of the model card; paths as :func:`card_path` writes them (no machine paths)."""
    card: dict[str, Any] = {
        "train_hr": card_path(cfg.train_hr, cfg.data),
        "train_lr": card_path(cfg.train_lr, cfg.data) or "bicubic_degrade",
        "n_train_images": n_train,
        "val": card_path(cfg.val, cfg.data),
        "val_crop": cfg.val_crop,
    }
    manifest = Path(cfg.data) / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            origins = sorted({r["origin"].split(":")[0].split(".data.")[0] for r in m.get("images", [])})
            card["sources"] = origins
            card["manifest"] = card_path(manifest, cfg.data)
        except (ValueError, KeyError, TypeError):
            pass
    return card


def _device_card(device: torch.device) -> str:
    """What the model card says trained it: ``cuda (GPU name)`` or ``cpu (N threads)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- validation


class Validator:
    """Mean PSNR-Y (shave = scale) of the model and of bicubic upscaling over a val folder."""

    def __init__(self, folder: PairedFolder, scale: int, max_images: int | None = None) -> None:
        self.scale = scale
        n = len(folder) if max_images is None else min(len(folder), max_images)
        self.pairs = [folder[i] for i in range(n)]
        for p in self.pairs:
            if min(p.hr.shape[:2]) <= 2 * scale:
                raise RefQSRError(f"validation image {p.name} is too small ({p.hr.shape[1]}x{p.hr.shape[0]})")
        self.bicubic_psnr = float(np.mean([psnr_y(self._bicubic(p.lr), p.hr, shave=scale) for p in self.pairs]))

    def _bicubic(self, lr: np.ndarray) -> np.ndarray:
        up = imresize(lr, scale=float(self.scale))
        return np.floor(np.clip(up, 0, 255) + 0.5).astype(np.uint8)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, sr: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
        """Mean PSNR-Y of ``sr(lr)`` (default ``model(lr)``), run with ``model`` in eval mode."""
        forward = sr or model
        was_training = model.training
        model.eval()
        scores = []
        for p in self.pairs:
            out = forward(to_tensor(p.lr).unsqueeze(0))[0]
            sr8 = out.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
            scores.append(psnr_y(sr8, p.hr, shave=self.scale))
        model.train(was_training)
        return float(np.mean(scores))

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.pairs]


# --------------------------------------------------------------------------- files


def _fmt(x: float | None, digits: int) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def lr_at(cfg: TrainConfig, step: int, base: float | None = None) -> float:
    """Step decay: ``base * 0.5 ** (step // halve_every)`` (learning rate of the step after ``step``),
    ramped up linearly over the first ``warmup`` steps. The ramp is for runs that start from trained
    weights: Adam's first updates move every weight by about the learning rate whatever its
    gradient, and at 1e-4 that took the bundled FP SRResNet from 33.70 to 32.62 dB in two steps."""
    lr = (cfg.lr if base is None else base) * 0.5 ** (step // cfg.halve_every)
    return lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else lr


# --------------------------------------------------------------------------- training


class _StopFlag:
    """SIGINT/SIGTERM -> finish the current step, checkpoint, return."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) to ``cfg.steps`` steps; returns a summary dict."""
    if cfg.steps < 0 or cfg.batch < 1 or cfg.lr_patch < 1 or cfg.halve_every < 1:
        raise RefQSRError("steps must be >= 0 and batch, lr_patch, halve_every >= 1")
    if cfg.val_every < 1 or cfg.ckpt_every < 1 or cfg.log_every < 1:
        raise RefQSRError("val_every, ckpt_every and log_every must be >= 1")
    if cfg.arch not in arch_names():
        raise RefQSRError(f"unknown architecture {cfg.arch!r}; choose from {', '.join(arch_names())}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    resolve_data(cfg)
    scale = arch_config(cfg.arch)["scale"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path, log_path = out / "last.pt", out / "best.pt", out / "log.csv"

    dataset = HRFolderDataset(cfg.train_hr, scale, cfg.lr_patch, cfg.train_lr, cfg.repeat, cfg.seed)
    validator = None
    if cfg.val is not None:
        validator = Validator(PairedFolder(cfg.val, scale, cfg.val_lr, cfg.val_crop), scale, cfg.val_max_images)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RefQSRError("--device cuda: no CUDA device is available here")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop shapes: let cuDNN pick its fastest kernels
    task = make_task(cfg, dataset).to(device)
    model = task.model
    model.train()
    opt = torch.optim.Adam(task.param_groups(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)

    step, elapsed_before, best_psnr, best_step = 0, 0.0, -math.inf, -1
    if last_path.is_file():
        try:
            ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise RefQSRError(f"cannot read checkpoint {last_path}: {exc}") from exc
        old = ckpt.get("config", {})
        for key in ("arch", "task", "scheme", "bits", "tail", "matching", "train_part", "cabm_bins", "cabm_calib"):
            if old.get(key, getattr(cfg, key)) != getattr(cfg, key) and (key in ("arch", "task") or cfg.task != "fp"):
                raise RefQSRError(
                    f"{last_path} is a {key}={old.get(key)} run; use another --out for {key}={getattr(cfg, key)}"
                )
        changed = [k for k in _STREAM_KEYS if k in old and old[k] != getattr(cfg, k)]
        if changed:
            log(f"warning: resuming with changed {', '.join(changed)}: the data stream differs from the original run")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        elapsed_before = float(ckpt.get("seconds", 0.0))
        best_psnr = float(ckpt.get("best_psnr", -math.inf))
        best_step = int(ckpt.get("best_step", -1))
        _set_rng_state(ckpt["rng"])
        rewrite_log(log_path, LOG_FIELDS, read_log(log_path, step))
        log(f"resuming {out} from step {step} (best val PSNR-Y {_fmt(best_psnr, 3) or '-'} dB)")
    else:
        rewrite_log(log_path, LOG_FIELDS, [])
        log(
            f"starting {out}: {cfg.arch} x{scale}, {dataset.n_images} train images, "
            f"{len(validator.pairs) if validator else 0} val images"
        )
    if validator is not None:
        log(f"bicubic val PSNR-Y: {validator.bicubic_psnr:.3f} dB")

    def save_last() -> None:
        atomic_torch_save(
            {
                "version": CKPT_VERSION,
                "step": step,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": _rng_state(),
                "seconds": elapsed_before + (time.time() - t0),
                "best_psnr": best_psnr,
                "best_step": best_step,
                "config": asdict(cfg),
            },
            last_path,
        )

    def save_best(val_psnr: float | None) -> None:
        card = {
            **task.card(),
            "arch": cfg.arch,
            "scale": scale,
            "precision": "fp32 trained, stored fp16",
            "steps": step,
            "val_psnr_y": val_psnr,
            "bicubic_psnr_y": validator.bicubic_psnr if validator else None,
            "val_images": validator.names if validator else [],
            "metric": f"PSNR on Y, shave {scale}, SR rounded to 8 bit",
            "optimizer": {
                "name": "Adam",
                "lr": cfg.lr,
                "lr_quant": cfg.lr_quant,
                "betas": list(cfg.betas),
                "eps": cfg.eps,
                "halve_every": cfg.halve_every,
                "warmup": cfg.warmup,
            },
            "batch": cfg.batch,
            "lr_patch": cfg.lr_patch,
            "seed": cfg.seed,
            "amp": cfg.amp,
            "device": _device_card(device),
            "wall_seconds": round(elapsed_before + time.time() - t0, 1),
            "data": _data_card(cfg, dataset.n_images),
            "torch": torch.__version__,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        save_model(best_path, model, card)  # the project's one model format (fp16 weights + config + card)
        atomic_write_text(json.dumps(card, indent=2) + "\n", out / "best.json")

    t0 = time.time()
    if step >= cfg.steps:
        log(f"already at step {step} >= --steps {cfg.steps}; nothing to do")
        return {"step": step, "best_psnr": best_psnr, "stopped": False}

    loader = task.batches(step, cfg.steps - step)
    loss_sum, loss_n, last_val = 0.0, 0, None
    bar = tqdm(total=cfg.steps, initial=step, disable=cfg.quiet, unit="step", dynamic_ncols=True)
    stopped = False
    with _StopFlag() as stop:
        for batch in loader:
            lr_now = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step, g.get("base_lr"))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                loss = task.loss({k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_v = float(loss.detach())
            if not math.isfinite(loss_v):
                raise RefQSRError(f"loss is {loss_v} at step {step}; last good checkpoint: {last_path}")
            loss_sum, loss_n = loss_sum + loss_v, loss_n + 1
            bar.update(1)

            val_psnr = None
            if validator is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                val_psnr = validator(model, lambda lr: task.sr(lr.to(device)).cpu())
                last_val = val_psnr
                if val_psnr > best_psnr:
                    best_psnr, best_step = val_psnr, step
                    save_best(val_psnr)
                if not cfg.quiet:
                    bar.write(
                        f"step {step}: val PSNR-Y {val_psnr:.3f} dB (bicubic {validator.bicubic_psnr:.3f}, "
                        f"best {best_psnr:.3f} @ {best_step})"
                    )
            if step % cfg.log_every == 0 or val_psnr is not None or step == cfg.steps or stop.signum:
                append_log(
                    log_path,
                    LOG_FIELDS,
                    {
                        "step": step,
                        "loss": _fmt(loss_sum / loss_n, 6),
                        "val_psnr": _fmt(val_psnr, 4),
                        "bicubic_psnr": _fmt(validator.bicubic_psnr, 4) if val_psnr is not None else "",
                        "seconds": _fmt(elapsed_before + time.time() - t0, 1),
                        "lr": f"{lr_now:.3g}",
                    },
                )
                loss_sum, loss_n = 0.0, 0
            bar.set_postfix(loss=f"{loss_v:.4f}", psnr=_fmt(last_val, 2) or "-")
            out_of_time = cfg.time_limit is not None and time.time() - t0 >= cfg.time_limit
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop.signum or out_of_time:
                save_last()
            if stop.signum or out_of_time:
                stopped = True
                why = f"signal {stop.signum}" if stop.signum else f"time limit ({cfg.time_limit:g} s)"
                log(f"{why}: stopped at step {step}; checkpoint {last_path}")
                break
    bar.close()
    if validator is None and not stopped:
        save_best(None)
    if not stopped:
        log(f"done: step {step}, best val PSNR-Y {_fmt(best_psnr, 3) or '-'} dB at step {best_step}")
    return {"step": step, "best_psnr": best_psnr, "best_step": best_step, "stopped": stopped}


# --------------------------------------------------------------------------- CLI

TASK_HELP = {
    "fp": "Train a full-precision x4 SR network with L1 loss (resumable).",
    "qat": "Quantization-aware training at fixed bits (PAMS/DDTB) or per-patch bits (CADyQ/CABM) from the FP model, "
    "L1 + KD (resumable).",
    "refqsr": "RefQSR quantization-aware training on Algorithm-1 pairs, loss (9) (resumable); "
    "b_high may be δ (CADyQ/CABM).",
}


def _options(task: str) -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    common = [
        click.option(
            "--data",
            required=True,
            type=click.Path(exists=True, file_okay=False),
            help="prepare.py output (train/, val/), a DIV2K-style root, or a folder of HR images.",
        ),
        click.option(
            "--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumed if last.pt exists)."
        ),
        click.option("--steps", required=True, type=click.IntRange(min=0), help="Total optimizer steps."),
        click.option("--arch", type=click.Choice(arch_names()), default="srresnet", show_default=True),
        click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True),
        click.option("--lr-patch", type=click.IntRange(min=4), default=48, show_default=True, help="LR crop size."),
        click.option("--lr", "lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True),
        click.option(
            "--warmup",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Ramp the learning rate up linearly over this many steps (for runs starting from trained weights).",
        ),
        click.option(
            "--halve-every",
            type=click.IntRange(min=1),
            default=200_000,
            show_default=True,
            help="Halve the learning rate every N steps.",
        ),
        click.option(
            "--val",
            type=click.Path(exists=True, file_okay=False),
            default=None,
            help="Validation HR folder (default: DATA/val or DATA/DIV2K_valid_HR).",
        ),
        click.option(
            "--val-crop",
            type=click.IntRange(min=0),
            default=256,
            show_default=True,
            help="Centre-crop val images to at most this many HR px (0: whole images).",
        ),
        click.option(
            "--val-max-images", type=click.IntRange(min=1), default=None, help="Use only the first N val images."
        ),
        click.option("--val-every", type=click.IntRange(min=1), default=500, show_default=True),
        click.option("--ckpt-every", type=click.IntRange(min=1), default=100, show_default=True),
        click.option("--log-every", type=click.IntRange(min=1), default=1, show_default=True),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True),
        click.option(
            "--repeat", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per image per epoch."
        ),
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader workers."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's)."),
        click.option("--device", default="cpu", show_default=True, help="cpu, or cuda / cuda:N for a GPU."),
        click.option(
            "--amp",
            type=click.Choice(["none", "bf16"]),
            default="none",
            show_default=True,
            help="Mixed precision: bf16 forward (fp32 weights/optimizer); fast with AMX or a GPU.",
        ),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option(
            "--time-limit",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Stop (checkpointed; run again to resume) after this many seconds of training.",
        ),
    ]
    if task == "fp":
        return common + [
            click.option(
                "--init",
                type=click.Choice(["interp", "random"]),
                default="interp",
                show_default=True,
                help="Start from a bilinear-upscaling network (interp) or plain random weights.",
            ),
            click.option(
                "--init-from",
                type=click.Path(exists=True, dir_okay=False),
                default=None,
                help="Start from this full-precision model file instead (fine-tune or continue).",
            ),
        ]
    quant = [
        click.option(
            "--scheme",
            type=click.Choice(["pams", "ddtb", "cadyq", "cabm"]),
            default="ddtb",
            show_default=True,
            help="cadyq: bits chosen per patch and layer (CADyQ); cabm: CADyQ's choices as an edge-score "
            "lookup table (CABM), from --init-from a CADyQ model.",
        ),
        click.option(
            "--bits",
            default=None,
            help="qat: one width (8, 4, ...; default 8) or delta (cadyq/cabm, the default there); refqsr: "
            "b_high-b_low (8-4, 4-3, ...; default 8-4) or delta-b_low (delta-3, delta-4; default delta-3).",
        ),
        click.option(
            "--teacher",
            required=True,
            type=click.Path(exists=True, dir_okay=False),
            help="Full-precision model file (KD target; also the starting weights).",
        ),
        click.option(
            "--init-from",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="Start from these weights instead of the teacher's.",
        ),
        click.option("--kd-weight", type=click.FloatRange(min=0), default=1.0, show_default=True),
        click.option(
            "--lr-quant",
            type=click.FloatRange(min=0, min_open=True),
            default=1e-2,
            show_default=True,
            help="Learning rate of the quantizer bounds.",
        ),
        click.option(
            "--bit-weight",
            type=click.FloatRange(min=0),
            default=6.3e-7,
            show_default=True,
            help="cadyq: weight of CADyQ's bit loss (its 1e-5 rescaled to mean-over-batch L1 on [0, 1] pixels).",
        ),
        click.option(
            "--cabm-bins",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="cabm: edge-score bins of the lookup table.",
        ),
        click.option(
            "--cabm-calib",
            type=click.IntRange(min=1),
            default=256,
            show_default=True,
            help="cabm: training crops the lookup table is calibrated on.",
        ),
    ]
    if task == "refqsr":
        quant += [
            click.option(
                "--clustblock",
                required=True,
                type=click.Path(exists=True, dir_okay=False),
                help="Trained ClustBlock file (train clust).",
            ),
            click.option("--tau", type=click.FloatRange(-1, 1), default=0.5, show_default=True),
            click.option(
                "--tail",
                type=click.Choice(["refer", "highbit"]),
                default="refer",
                show_default=True,
                help="highbit: Table V's 'w/o RefER' ablation (query path's last blocks at b_high, no RefER).",
            ),
            click.option(
                "--matching",
                type=click.Choice(["paper", "shared"]),
                default="paper",
                show_default=True,
                help="RefER's flow: each RefER's own matching (paper eqs. 4-6) or one 8-bit cosine flow per "
                "query from the first block's output, shared by the RefERs (see models/refqsr.py).",
            ),
            click.option(
                "--train",
                "train_part",
                type=click.Choice(["all", "refer"]),
                default="all",
                show_default=True,
                help="refer: train only the RefER blocks; the backbone (weights and quantizer bounds of both "
                "paths) stays as --init-from gives it, and loss (9) keeps its query terms. About 2x "
                "faster steps: what a CPU can afford on a trained model.",
            ),
            click.option(
                "--fresh-refer",
                is_flag=True,
                help="Start the RefER blocks afresh (each as 'skip the replaced block', refinement near "
                "zero) also when --init-from is a RefQSR model, whose backbone is kept.",
            ),
            click.option(
                "--refer-kd",
                type=click.FloatRange(min=0),
                default=0.0,
                show_default=True,
                help="Weight of a feature target added to loss (9): L1 between each RefER's output and the "
                "output of the block it replaces with the query patch wholly at b_high (fixed bits).",
            ),
        ]
    return common + quant


def make_command(task: str) -> click.Command:
    """The click command that trains ``task`` (fp, qat, refqsr)."""

    def run(**kw: Any) -> None:
        kw["val_crop"] = kw["val_crop"] or None
        if task != "fp" and kw["bits"] is None:  # the default depends on the scheme
            dynamic = kw["scheme"] in ("cadyq", "cabm")
            kw["bits"] = ("delta" if dynamic else "8") if task == "qat" else ("delta-3" if dynamic else "8-4")
        try:
            train(TrainConfig(task=task, **kw), log=lambda s: print(s, flush=True))
        except RefQSRError as exc:
            raise click.ClickException(str(exc)) from exc

    run.__doc__ = TASK_HELP[task]
    for option in reversed(_options(task)):
        run = option(run)
    return click.command(name=task, help=TASK_HELP[task], context_settings={"help_option_names": ["-h", "--help"]})(run)


def run_command(command: click.Command, argv: list[str] | None, prog: str) -> None:
    """Run a click command with one-line errors and proper exit codes."""
    try:
        command.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help
        if exc.exit_code:
            sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
