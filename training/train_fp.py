"""Resumable full-precision training of an x4 SR network (SRResNet), the starting point of RefQSR.

Recipe (the paper's baselines / EDSR code): L1 loss, Adam (0.9, 0.999, 1e-8), lr 1e-4 halved every
``--halve-every`` steps, batches of 16 random 48x48 LR crops (192x192 HR) with flips/rotations.

``RUN_DIR`` holds

* ``last.pt``   -- model, optimizer, step, RNG states, best score, run config; written atomically
  (temp file + ``os.replace``) every ``--ckpt-every`` steps, at the end and on SIGINT/SIGTERM.
  When it exists, training continues from it; the data stream is a pure function of the step
  (:class:`StepBatchSampler`), so a resumed run sees the batches an uninterrupted one would.
* ``log.csv``   -- ``step,loss,val_psnr,bicubic_psnr,seconds,lr``: one row every ``--log-every``
  steps (loss = mean over those steps; val columns filled on validation steps; seconds =
  cumulative wall time over all sessions). Rows past the checkpoint are dropped on resume.
* ``best.pt`` + ``best.json`` -- the best validation PSNR-Y model (``models.checkpoint`` format, fp16) and a
  model card (steps, val PSNR, bicubic PSNR, data used).

Validation: whole val images (centre crops of at most ``--val-crop`` HR px), LR by MATLAB-style
bicubic, SR rounded to 8 bit, PSNR on Y with a ``scale`` px border shave (as the paper).

Run: ``python -m refqsr_engine.training.train_fp --data DIR --out RUN_DIR --steps N``. ``DIR`` is a
folder with ``train/`` (and ``val/``) as written by :mod:`refqsr_engine.training.prepare`, a
DIV2K-style root (``DIV2K_train_HR`` [+ ``DIV2K_train_LR_bicubic/X4``], ``DIV2K_valid_HR``), or a
plain folder of HR images (then pass ``--val``).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from refqsr_engine.errors import RefQSRError
from refqsr_engine.metrics import imresize, psnr_y
from refqsr_engine.models.checkpoint import atomic_torch_save, save_model
from refqsr_engine.training.runlog import append_log, atomic_write_text, read_log, rewrite_log
from refqsr_engine.models.registry import arch_config, arch_names, build_sr
from refqsr_engine.models.srresnet import interpolation_init
from refqsr_engine.training.datasets import (
    HRFolderDataset,
    PairedFolder,
    StepBatchSampler,
    collate,
    div2k_layout,
    to_tensor,
)

LOG_FIELDS = ("step", "loss", "val_psnr", "bicubic_psnr", "seconds", "lr")
CKPT_VERSION = 1
# Settings that change the data stream or the model: a resume with other values warns / fails.
_STREAM_KEYS = ("batch", "lr_patch", "seed", "repeat", "train_hr", "train_lr")


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
    init: str = "interp"  # "interp": start as a bilinear upscaler (models.srresnet.interpolation_init); "random"
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
    quiet: bool = False
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
    card: dict[str, Any] = {"train_hr": cfg.train_hr, "train_lr": cfg.train_lr or "bicubic_degrade",
                            "n_train_images": n_train, "val": cfg.val, "val_crop": cfg.val_crop}
    manifest = Path(cfg.data) / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            origins = sorted({r["origin"].split(":")[0].split(".data.")[0] for r in m.get("images", [])})
            card["sources"] = origins
            card["manifest"] = str(manifest)
        except (ValueError, KeyError, TypeError):
            pass
    return card


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
    def __call__(self, model: torch.nn.Module) -> float:
        was_training = model.training
        model.eval()
        scores = []
        for p in self.pairs:
            sr = model(to_tensor(p.lr).unsqueeze(0))[0]
            sr8 = sr.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
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


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Step decay: ``lr * 0.5 ** (step // halve_every)`` (learning rate of the step after ``step``)."""
    return cfg.lr * 0.5 ** (step // cfg.halve_every)


# --------------------------------------------------------------------------- training


class _StopFlag:
    """SIGINT/SIGTERM -> finish the current step, checkpoint, return."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
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
    model = build_sr(cfg.arch)
    if cfg.init == "interp":
        interpolation_init(model)
    elif cfg.init != "random":
        raise RefQSRError(f"unknown --init {cfg.init!r}: use interp or random")
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)

    step, elapsed_before, best_psnr, best_step = 0, 0.0, -math.inf, -1
    if last_path.is_file():
        try:
            ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise RefQSRError(f"cannot read checkpoint {last_path}: {exc}") from exc
        old = ckpt.get("config", {})
        if old.get("arch", cfg.arch) != cfg.arch:
            raise RefQSRError(f"{last_path} is a {old.get('arch')} run; use another --out for {cfg.arch}")
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
        log(f"starting {out}: {cfg.arch} x{scale}, {dataset.n_images} train images, "
            f"{len(validator.pairs) if validator else 0} val images")
    if validator is not None:
        log(f"bicubic val PSNR-Y: {validator.bicubic_psnr:.3f} dB")

    def save_last() -> None:
        atomic_torch_save({
            "version": CKPT_VERSION, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": _rng_state(), "seconds": elapsed_before + (time.time() - t0), "best_psnr": best_psnr,
            "best_step": best_step, "config": asdict(cfg),
        }, last_path)

    def save_best(val_psnr: float | None) -> None:
        card = {
            "arch": cfg.arch, "scale": scale, "precision": "fp32 trained, stored fp16", "steps": step,
            "val_psnr_y": val_psnr, "bicubic_psnr_y": validator.bicubic_psnr if validator else None,
            "val_images": validator.names if validator else [], "metric": f"PSNR on Y, shave {scale}, SR rounded to 8 bit",
            "loss": "L1", "optimizer": {"name": "Adam", "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps,
                                        "halve_every": cfg.halve_every},
            "batch": cfg.batch, "lr_patch": cfg.lr_patch, "seed": cfg.seed, "init": cfg.init,
            "data": _data_card(cfg, dataset.n_images), "torch": torch.__version__,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        save_model(best_path, model, card)  # the project's one model format (fp16 weights + config + card)
        atomic_write_text(json.dumps(card, indent=2) + "\n", out / "best.json")

    t0 = time.time()
    if step >= cfg.steps:
        log(f"already at step {step} >= --steps {cfg.steps}; nothing to do")
        return {"step": step, "best_psnr": best_psnr, "stopped": False}

    sampler = StepBatchSampler(len(dataset), cfg.batch, cfg.seed, start_step=step, steps=cfg.steps - step)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
                        persistent_workers=False)
    l1 = torch.nn.L1Loss()
    loss_sum, loss_n, last_val = 0.0, 0, None
    bar = tqdm(total=cfg.steps, initial=step, disable=cfg.quiet, unit="step", dynamic_ncols=True)
    stopped = False
    with _StopFlag() as stop:
        for batch in loader:
            lr_now = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr_now
            loss = l1(model(batch["lr"]), batch["hr"])
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
                val_psnr = validator(model)
                last_val = val_psnr
                if val_psnr > best_psnr:
                    best_psnr, best_step = val_psnr, step
                    save_best(val_psnr)
                if not cfg.quiet:
                    bar.write(f"step {step}: val PSNR-Y {val_psnr:.3f} dB (bicubic {validator.bicubic_psnr:.3f}, "
                              f"best {best_psnr:.3f} @ {best_step})")
            if step % cfg.log_every == 0 or val_psnr is not None or step == cfg.steps or stop.signum:
                append_log(log_path, LOG_FIELDS, {
                    "step": step, "loss": _fmt(loss_sum / loss_n, 6), "val_psnr": _fmt(val_psnr, 4),
                    "bicubic_psnr": _fmt(validator.bicubic_psnr, 4) if val_psnr is not None else "",
                    "seconds": _fmt(elapsed_before + time.time() - t0, 1), "lr": f"{lr_now:.3g}",
                })
                loss_sum, loss_n = 0.0, 0
            bar.set_postfix(loss=f"{loss_v:.4f}", psnr=_fmt(last_val, 2) or "-")
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop.signum:
                save_last()
            if stop.signum:
                stopped = True
                log(f"signal {stop.signum}: stopped at step {step}; checkpoint {last_path}")
                break
    bar.close()
    if validator is None and not stopped:
        save_best(None)
    if not stopped:
        log(f"done: step {step}, best val PSNR-Y {_fmt(best_psnr, 3) or '-'} dB at step {best_step}")
    return {"step": step, "best_psnr": best_psnr, "best_step": best_step, "stopped": stopped}


# --------------------------------------------------------------------------- CLI


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="prepare.py output (train/, val/), a DIV2K-style root, or a folder of HR images.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumed if last.pt exists).")
@click.option("--steps", required=True, type=click.IntRange(min=0), help="Total optimizer steps.")
@click.option("--arch", type=click.Choice(arch_names()), default="srresnet", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr-patch", type=click.IntRange(min=4), default=48, show_default=True, help="LR crop size.")
@click.option("--lr", "lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--init", type=click.Choice(["interp", "random"]), default="interp", show_default=True,
              help="Start from a bilinear-upscaling network (interp) or plain random weights.")
@click.option("--halve-every", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Halve the learning rate every N steps.")
@click.option("--val", type=click.Path(exists=True, file_okay=False), default=None,
              help="Validation HR folder (default: DATA/val or DATA/DIV2K_valid_HR).")
@click.option("--val-crop", type=click.IntRange(min=0), default=256, show_default=True,
              help="Centre-crop val images to at most this many HR px (0: whole images).")
@click.option("--val-max-images", type=click.IntRange(min=1), default=None, help="Use only the first N val images.")
@click.option("--val-every", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--ckpt-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per image per epoch.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader workers.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def _cli(**kw: Any) -> None:
    """Train a full-precision x4 SR network with L1 loss (resumable)."""
    kw["val_crop"] = kw["val_crop"] or None
    cfg = TrainConfig(**kw)
    try:
        train(cfg, log=lambda s: print(s, flush=True))
    except RefQSRError as exc:
        raise click.ClickException(str(exc)) from exc


def main(argv: list[str] | None = None) -> None:
    try:
        _cli.main(args=argv, prog_name="python -m refqsr_engine.training.train_fp", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help
        if exc.exit_code:
            sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
