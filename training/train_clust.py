"""Pre-train ClustBlock's feature extractor as a texture classifier, then calibrate it to 8 bits.

Paper Sec. III-C-2 / IV-A-2: the feature extractor (Table I) is pre-trained on DTD (47 classes)
and quantized to 8 bits with min/max ranges. Here it trains in full precision with cross-entropy on
procedural textures (:mod:`refqsr_engine.training.textures`, DTD's offline stand-in) or on DTD itself
(``--dtd DIR``), on LR-scale crops whose size cycles through ``--sizes`` (48/72/96: the SR patch
sizes, so the pooled features do not depend on the crop size).

    python -m refqsr_engine.training.train_clust --out runs/clust --classes 47 --steps 3000

Training uses a twin of the Table-I extractor with a BatchNorm after every conv (``BNClustNet``):
the plain network on raw [0, 1] inputs sits at chance for thousands of steps, the BN twin learns.
At the end the BatchNorms (eval mode: a per-channel affine map) are folded exactly into the conv
weights and biases, so the saved model is the paper's ClustBlock, unchanged (``--no-bn`` trains the
ClustBlock directly instead).

Run folder:
  last.pt          resumable checkpoint (model, Adam state, step, RNG states, config), written atomically
  log.csv          step, lr, loss, train_acc, val_acc (+ per-size val accuracy), elapsed_s
  clustblock.pt    final 8-bit-calibrated model (``models.checkpoint.save_model``) with a model card
  report.json      the card, also printed with ``--json``

Running the command again on the same folder resumes from ``last.pt`` (``--steps`` is the total);
the batches are a pure function of ``(seed, step)``, so a resumed run trains on exactly what an
uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click
import numpy as np
import torch
import torch.nn.functional as F
from refqsr_engine.errors import RefQSRError
from refqsr_engine.models.checkpoint import atomic_torch_save, save_model
from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.training.card_paths import card_path
from refqsr_engine.training.dtd import DTDDataset
from refqsr_engine.training.runlog import append_log, atomic_write_text, read_log, rewrite_log
from refqsr_engine.training.textures import TextureDataset
from torch import nn

CKPT_FORMAT = "refqsr-engine/train-clust-1"
LOG_FIELDS = ("step", "lr", "loss", "train_acc", "val_acc", "val_acc_by_size", "elapsed_s")
# what must not change between a run and its resumption
RESUME_KEYS = ("classes", "dtd", "sizes", "batch", "seed", "bn")


@dataclass
class ClustTrainConfig:
    out: str
    classes: int | None = None  # None: 47 for textures, the class count for DTD
    steps: int = 3000
    batch: int = 32
    lr: float = 3e-3
    bn: bool = True  # train the BatchNorm twin and fold it (see module docstring)
    min_lr_ratio: float = 0.05  # cosine decay to lr * this
    warmup: int = 100
    weight_decay: float = 0.0
    sizes: tuple[int, ...] = (48, 72, 96)
    dtd: str | None = None
    dtd_scale_range: tuple[float, float] = (0.3, 1.0)
    device: str = "cpu"
    threads: int | None = 1
    seed: int = 0
    val_per_class: int = 8  # textures, per class and per size (DTD: one crop per validation image)
    val_every: int = 250
    log_every: int = 25
    ckpt_every: int = 100
    calib_samples: int = 256
    quiet: bool = False
    restart: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    num_classes: int
    classes: list[str]

    def batch(self, indices, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


# --------------------------------------------------------------------------- pieces (tested one by one)


class BNClustNet(nn.Module):
    """Training twin of :class:`ClustBlock`: the same convs (geometry read from ClustBlock itself),
    each followed by BatchNorm, ReLU, global average pooling, the FC as a 1x1 conv.
    :meth:`fold_into` writes the eval-mode network into a ClustBlock exactly."""

    def __init__(self, num_classes: int = 47) -> None:
        super().__init__()
        ref = ClustBlock(num_classes)
        self.num_classes = num_classes
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        for qc in ref.convs:
            c = qc.conv
            self.convs.append(nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False))
            self.bns.append(nn.BatchNorm2d(c.out_channels))
        f = ref.fc.conv
        self.fc = nn.Conv2d(f.in_channels, f.out_channels, f.kernel_size, bias=True)

    def forward(self, x: torch.Tensor, quantized: bool | None = None) -> torch.Tensor:
        if quantized:
            raise ValueError("BNClustNet is full precision; fold it into a ClustBlock to quantize")
        if x.shape[-1] < 15 or x.shape[-2] < 15:
            raise ValueError("ClustBlock needs patches of at least 15x15 pixels")
        h = x
        for conv, bn in zip(self.convs, self.bns):
            h = F.relu(bn(conv(h)))
        return self.fc(h.mean(dim=(2, 3), keepdim=True)).flatten(1)

    @torch.no_grad()
    def fold_into(self, cb: ClustBlock | None = None) -> ClustBlock:
        """A ClustBlock computing exactly this network in eval mode (conv * s, bias = beta - mean * s)."""
        cb = ClustBlock(self.num_classes) if cb is None else cb
        for conv, bn, qc in zip(self.convs, self.bns, cb.convs):
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            qc.conv.weight.copy_(conv.weight * s[:, None, None, None])
            qc.conv.bias.copy_(bn.bias - bn.running_mean * s)
        cb.fc.conv.weight.copy_(self.fc.weight)
        cb.fc.conv.bias.copy_(self.fc.bias)
        return cb


def make_net(num_classes: int, bn: bool = True) -> nn.Module:
    """The network trained: :class:`BNClustNet` (``bn``) or the :class:`ClustBlock` itself."""
    return BNClustNet(num_classes) if bn else ClustBlock(num_classes)


def to_clustblock(net: nn.Module) -> ClustBlock:
    """The ClustBlock the trained network stands for (a copy; BN folded when there is BN)."""
    if isinstance(net, BNClustNet):
        return net.eval().fold_into(ClustBlock(net.num_classes).to(next(net.parameters()).device))
    cb = ClustBlock(net.num_classes).to(next(net.parameters()).device)
    cb.load_state_dict(net.state_dict())
    return cb


def make_optimizer(model: nn.Module, lr: float = 3e-3, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with the paper's betas/eps (Sec. IV-A-2)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def lr_at(step: int, cfg: ClustTrainConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """One full-precision cross-entropy step on ``(x, y)``; returns (loss, accuracy) before the update."""
    model.train()
    logits = model(x, quantized=False)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    acc = (logits.detach().argmax(1) == y).float().mean()
    return float(loss.detach()), float(acc)


def step_batch_spec(step: int, cfg: ClustTrainConfig) -> tuple[list[int], int]:
    """Sample indices and crop size of training step ``step``: a pure function of (seed, step)."""
    rng = np.random.default_rng((cfg.seed, 0xC1A55, step))
    idx = rng.integers(0, 2**40, size=cfg.batch).tolist()
    size = cfg.sizes[step % len(cfg.sizes)]
    return idx, size


@torch.no_grad()
def accuracy(
    model: nn.Module,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    quantized: bool,
    device: str = "cpu",
    chunk: int = 64,
) -> float:
    """Top-1 accuracy over the (x, y) batches."""
    model.eval()
    right = total = 0
    for x, y in zip(xs, ys):
        for i in range(0, len(x), chunk):
            xb = (
                x[i : i + chunk].to(device).float().div_(255.0)
                if x.dtype == torch.uint8
                else x[i : i + chunk].to(device)
            )
            pred = model(xb, quantized=quantized).argmax(1).cpu()
            right += int((pred == y[i : i + chunk]).sum())
            total += len(pred)
    return right / max(1, total)


# --------------------------------------------------------------------------- data


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255.0).to(torch.uint8)


def build_sources(cfg: ClustTrainConfig) -> tuple[Source, Source, int]:
    """(train source, validation source, number of classes)."""
    if cfg.dtd:
        train = DTDDataset(cfg.dtd, size=cfg.sizes[0], split="train", seed=cfg.seed, scale_range=cfg.dtd_scale_range)
        try:
            val: Source = DTDDataset(
                cfg.dtd, size=cfg.sizes[0], split="val", seed=cfg.seed + 1, scale_range=cfg.dtd_scale_range
            )
        except RefQSRError:  # a tiny DTD-like folder without a validation split
            val = DTDDataset(
                cfg.dtd, size=cfg.sizes[0], split="all", seed=cfg.seed + 1, scale_range=cfg.dtd_scale_range
            )
        if cfg.classes is not None and cfg.classes != train.num_classes:
            raise RefQSRError(f"--classes {cfg.classes} does not match the {train.num_classes} classes in {cfg.dtd}")
        return train, val, train.num_classes
    classes = 47 if cfg.classes is None else int(cfg.classes)
    return (
        TextureDataset(classes, size=cfg.sizes[0], seed=cfg.seed),
        TextureDataset(classes, size=cfg.sizes[0], seed=cfg.seed + 1_000_003),
        classes,
    )


def validation_set(val: Source, cfg: ClustTrainConfig) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation crops per size, kept as uint8 tensors."""
    # textures: val_per_class samples per class; DTD: one crop of every validation image
    n = val.n_images if isinstance(val, DTDDataset) else val.num_classes * cfg.val_per_class
    out = {}
    for size in cfg.sizes:
        x, y = val.batch(range(n), size)
        out[size] = (_as_uint8(x), y)
    return out


def calibration_batches(train: Source, cfg: ClustTrainConfig) -> list[torch.Tensor]:
    """``calib_samples`` training-distribution crops (own seed stream), in batches cycling the sizes."""
    rng = np.random.default_rng((cfg.seed, 0xCA11B))
    idx = rng.integers(0, 2**40, size=cfg.calib_samples).tolist()
    per = max(1, cfg.batch)
    batches = []
    for k, i in enumerate(range(0, len(idx), per)):
        batches.append(train.batch(idx[i : i + per], cfg.sizes[k % len(cfg.sizes)])[0])
    return batches


# --------------------------------------------------------------------------- checkpoints and log


def _config_dict(cfg: ClustTrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["sizes"] = list(cfg.sizes)
    d["dtd_scale_range"] = list(cfg.dtd_scale_range)
    return d


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    elapsed: float,
    cfg: ClustTrainConfig,
    num_classes: int,
) -> None:
    atomic_torch_save(
        {
            "format": CKPT_FORMAT,
            "step": int(step),
            "elapsed_s": float(elapsed),
            "num_classes": int(num_classes),
            "config": _config_dict(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        },
        path,
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise RefQSRError(f"{path} is not a readable checkpoint ({type(err).__name__}); use --restart") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise RefQSRError(f"{path} is not a train_clust checkpoint; use --restart or another --out")
    return ck


def _check_resume(ck: dict[str, Any], cfg: ClustTrainConfig, num_classes: int, path: Path) -> None:
    old = ck["config"]
    new = _config_dict(cfg)
    diffs = [k for k in RESUME_KEYS if k != "classes" and old.get(k) != new.get(k)]
    if ck["num_classes"] != num_classes:
        diffs.insert(0, "classes")
    if diffs:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diffs if k != "classes")
        if "classes" in diffs:
            detail = f"classes: {ck['num_classes']} -> {num_classes}" + (f", {detail}" if detail else "")
        raise RefQSRError(f"{path} was made with different settings ({detail}); use --restart or another --out")


# --------------------------------------------------------------------------- the run


def _roundtrip_half(model: ClustBlock) -> None:
    """Round floats through fp16 as ``save_model`` stores them, so the reported numbers are the file's."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())


def _evaluate(model: nn.Module, val_set, quantized: bool, device: str) -> tuple[float, dict[int, float]]:
    by_size = {s: accuracy(model, [x], [y], quantized, device) for s, (x, y) in val_set.items()}
    return float(np.mean(list(by_size.values()))), by_size


def train_clust(cfg: ClustTrainConfig) -> dict[str, Any]:
    """Train (or resume), calibrate to 8 bits, save ``clustblock.pt``; returns the model card."""
    if cfg.steps < 0:
        raise RefQSRError(f"--steps must be >= 0, got {cfg.steps}")
    if cfg.batch < 1:
        raise RefQSRError(f"--batch must be >= 1, got {cfg.batch}")
    if not cfg.sizes or min(cfg.sizes) < 15:
        raise RefQSRError(f"crop sizes must be at least 15 px (ClustBlock's minimum), got {cfg.sizes}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RefQSRError("--device cuda requested but no CUDA device is available")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    for k in ("val_every", "log_every", "ckpt_every"):
        if getattr(cfg, k) < 1:
            raise RefQSRError(f"{k} must be >= 1")
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "last.pt", out / "log.csv"

    train, val, num_classes = build_sources(cfg)
    device = cfg.device
    torch.manual_seed(cfg.seed)
    model = make_net(num_classes, cfg.bn).to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    step, elapsed_before = 0, 0.0
    if ckpt_path.is_file() and not cfg.restart:
        ck = load_checkpoint(ckpt_path)
        _check_resume(ck, cfg, num_classes, ckpt_path)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        step, elapsed_before = int(ck["step"]), float(ck["elapsed_s"])
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
        rewrite_log(log_path, LOG_FIELDS, read_log(log_path, step))  # drop rows written after the checkpoint
    else:
        rewrite_log(log_path, LOG_FIELDS, [])
    resumed_from = step

    val_set = validation_set(val, cfg)
    run_t0 = time.time()

    def elapsed() -> float:
        return elapsed_before + (time.time() - run_t0)

    bar = None
    if not cfg.quiet and step < cfg.steps:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train_clust", unit="step", dynamic_ncols=True)
    run_loss: list[float] = []
    run_acc: list[float] = []
    last_val = float("nan")
    try:
        while step < cfg.steps:
            idx, size = step_batch_spec(step, cfg)
            x, y = train.batch(idx, size)
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, acc = train_step(model, optimizer, x.to(device), y.to(device))
            if not math.isfinite(loss):
                raise RefQSRError(f"loss became {loss} at step {step}; lower --lr")
            run_loss.append(loss)
            run_acc.append(acc)
            step += 1
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                row: dict[str, Any] = {
                    "step": step,
                    "lr": f"{lr:.3g}",
                    "loss": f"{np.mean(run_loss):.4f}",
                    "train_acc": f"{np.mean(run_acc):.4f}",
                    "val_acc": "",
                    "val_acc_by_size": "",
                    "elapsed_s": f"{elapsed():.1f}",
                }
                if step % cfg.val_every == 0 or step == cfg.steps:
                    last_val, by_size = _evaluate(model, val_set, False, device)
                    row["val_acc"] = f"{last_val:.4f}"
                    row["val_acc_by_size"] = " ".join(f"{s}:{a:.3f}" for s, a in by_size.items())
                append_log(log_path, LOG_FIELDS, row)
                if bar is not None:
                    bar.set_postfix(loss=row["loss"], acc=row["train_acc"], val=f"{last_val:.3f}")
                run_loss, run_acc = [], []
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt_path, model, optimizer, step, elapsed(), cfg, num_classes)
    except KeyboardInterrupt:
        save_checkpoint(ckpt_path, model, optimizer, step, elapsed(), cfg, num_classes)
        if bar is not None:
            bar.close()
        raise RefQSRError(f"interrupted at step {step}; checkpoint saved to {ckpt_path}, run again to resume") from None
    if bar is not None:
        bar.close()
    if not ckpt_path.is_file():  # steps == 0 on a fresh folder
        save_checkpoint(ckpt_path, model, optimizer, step, elapsed(), cfg, num_classes)

    # ---- fold BN, 8-bit min/max calibration (paper Sec. III-C-2), the final model
    net_acc = _evaluate(model, val_set, False, device)[0]
    model = to_clustblock(model).eval()
    _roundtrip_half(model)  # the weights as the saved file will hold them
    acc_fp, fp_by_size = _evaluate(model, val_set, False, device)
    model.calibrate([b.to(device) for b in calibration_batches(train, cfg)])
    _roundtrip_half(model)  # ranges as stored
    acc_q, q_by_size = _evaluate(model, val_set, True, device)
    card = {
        "model": "ClustBlock",
        "paper": "RefQSR Sec. III-C-2, Table I",
        "classes": num_classes,
        "class_names": list(train.classes),
        "dataset": (
            f"DTD ({card_path(cfg.dtd)})" if cfg.dtd else "procedural textures (refqsr_engine.training.textures)"
        ),
        "steps": step,
        "batch": cfg.batch,
        "crop_sizes": list(cfg.sizes),
        "lr": cfg.lr,
        "training_net": "BatchNorm twin, folded into the convs" if cfg.bn else "ClustBlock",
        "seed": cfg.seed,
        "val_samples": int(sum(len(y) for _, y in val_set.values())),
        "val_acc_trained_net": round(net_acc, 4),
        "val_acc_fp": round(acc_fp, 4),
        "val_acc_int8": round(acc_q, 4),
        "val_acc_fp_by_size": {str(s): round(a, 4) for s, a in fp_by_size.items()},
        "val_acc_int8_by_size": {str(s): round(a, 4) for s, a in q_by_size.items()},
        "calibration": f"8-bit min/max over {cfg.calib_samples} training crops",
        "calibrated": bool(model.calibrated),
        "train_wall_time_s": round(elapsed(), 1),
        "wall_time_s": round(elapsed_before + (time.time() - t_start), 1),
        "resumed_from_step": resumed_from,
        "device": device,
        "threads": cfg.threads,
    }
    save_model(out / "clustblock.pt", model.cpu(), card)
    atomic_write_text(json.dumps(card, indent=2) + "\n", out / "report.json")
    return card


# --------------------------------------------------------------------------- CLI


def _parse_sizes(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in value.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not sizes:
        raise click.BadParameter("at least one size")
    return sizes


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run folder (resumed if it holds last.pt)")
@click.option("--classes", type=int, default=None, help="texture classes (default 47; with --dtd: the folder's)")
@click.option("--steps", type=int, default=3000, show_default=True, help="total training steps")
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--no-bn", is_flag=True, help="train ClustBlock directly instead of the BatchNorm twin folded afterwards")
@click.option(
    "--sizes", default="48,72,96", show_default=True, callback=_parse_sizes, help="LR crop sizes, cycled per step"
)
@click.option(
    "--dtd", type=click.Path(exists=True, file_okay=False), default=None, help="train on DTD (images/<class>/*.jpg)"
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-every", type=int, default=250, show_default=True)
@click.option("--log-every", type=int, default=25, show_default=True)
@click.option("--ckpt-every", type=int, default=100, show_default=True)
@click.option("--calib-samples", type=int, default=256, show_default=True)
@click.option("--restart", is_flag=True, help="ignore an existing checkpoint and start over")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print the model card as JSON")
def main(
    out,
    classes,
    steps,
    batch,
    lr,
    no_bn,
    sizes,
    dtd,
    device,
    threads,
    seed,
    val_every,
    log_every,
    ckpt_every,
    calib_samples,
    restart,
    quiet,
    as_json,
) -> None:
    """Pre-train ClustBlock (paper Sec. III-C-2) and calibrate it to 8 bits."""
    cfg = ClustTrainConfig(
        out=out,
        classes=classes,
        steps=steps,
        batch=batch,
        lr=lr,
        bn=not no_bn,
        sizes=sizes,
        dtd=dtd,
        device=device,
        threads=threads,
        seed=seed,
        val_every=val_every,
        log_every=log_every,
        ckpt_every=ckpt_every,
        calib_samples=calib_samples,
        quiet=quiet,
        restart=restart,
    )

    def _term(_sig, _frame):  # SIGTERM: checkpoint and stop like Ctrl-C
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        card = train_clust(cfg)
    except RefQSRError as err:
        raise click.ClickException(str(err)) from None
    finally:
        signal.signal(signal.SIGTERM, old)
    if as_json:
        click.echo(json.dumps(card, indent=2))
    else:
        click.echo(
            f"ClustBlock: {card['classes']} classes, {card['steps']} steps, val acc fp {card['val_acc_fp']:.3f} / "
            f"int8 {card['val_acc_int8']:.3f}, {card['wall_time_s']:.0f} s -> {Path(out) / 'clustblock.pt'}"
        )


if __name__ == "__main__":
    main()
