"""Widen learned activation ranges that clip strong edges away (DDTB, PAMS and CADyQ models).

    python -m refqsr_engine.training.calibrate MODEL OUT.pt --data data/sr/train [--clip 1e-5] [--bits 8]

DDTB learns each activation quantizer's bounds on the training crops. Bounds learned on soft photos
clip the large activations that high-contrast edges cause (0.1-0.8 % of the inputs of every body conv
of the SRResNet DDTB-8, up to 3x the upper bound, on the high-contrast set), and a clipped activation
is an error the following layers amplify. This pass runs the model at its own bits on ``--crops``
random crops of the training images (which hold high-contrast content), measures for every
activation quantizer of the chosen bit widths how far its inputs reach beyond its bounds (as
multiples of the bound in effect, the dynamic gate included), and scales both learned bounds by the
smallest factor >= 1 that leaves at most ``--clip`` of the inputs outside (a symmetric PAMS/CADyQ
range, by the larger of its two factors). Weights, gates and every other parameter stay as they are;
the result is a model file to bundle or to fine-tune from.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from refqsr_engine.engine.models_store import resolve_model
from refqsr_engine.errors import RefQSRError
from refqsr_engine.models.checkpoint import load_model, save_model
from refqsr_engine.models.model_info import model_bits
from refqsr_engine.models.qconv import QuantConv2d
from refqsr_engine.models.quant_base import ActivationQuantizer
from refqsr_engine.models.quant_ddtb import DdtbActivation
from refqsr_engine.models.quant_pams import PamsActivation
from refqsr_engine.models.refqsr import RefQSR
from refqsr_engine.training.datasets import HRFolderDataset

# Multiples of the bound: fine steps near 1 where most overshoot lies, up to 16x.
EDGES = np.concatenate([np.arange(1.0, 2.0, 0.01), np.arange(2.0, 4.0, 0.05), np.arange(4.0, 16.01, 0.25)])


@dataclass
class Overshoot:
    """Counts of one quantizer's inputs beyond each multiple of its upper and lower bounds."""

    total: int = 0
    upper: np.ndarray = field(default_factory=lambda: np.zeros(len(EDGES), np.int64))
    lower: np.ndarray = field(default_factory=lambda: np.zeros(len(EDGES), np.int64))

    def add(self, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> None:
        shape = (-1,) + (1,) * (x.dim() - 1)
        lo = lower.reshape(shape) if lower.dim() else lower
        hi = upper.reshape(shape) if upper.dim() else upper
        self.total += x.numel()
        up = (x / hi.clamp_min(1e-12)).flatten()
        self.upper += _beyond(up[up > 1.0])
        if float(lower.min()) < 0:  # a lower bound of 0 (ReLU inputs) clips nothing that matters
            down = (x / lo.clamp_max(-1e-12)).flatten()
            self.lower += _beyond(down[down > 1.0])

    def factor(self, clip: float, counts: np.ndarray) -> float:
        """The smallest edge whose share of inputs beyond it is at most ``clip``."""
        allowed = clip * self.total
        ok = np.nonzero(counts <= allowed)[0]
        return float(EDGES[ok[0]]) if len(ok) else float(EDGES[-1])


def _beyond(ratios: torch.Tensor) -> np.ndarray:
    """How many ratios lie beyond each edge."""
    if ratios.numel() == 0:
        return np.zeros(len(EDGES), np.int64)
    idx = np.searchsorted(EDGES, ratios.double().cpu().numpy(), side="left")  # ratio > EDGES[k] for k < idx
    counts = np.bincount(idx, minlength=len(EDGES) + 1)
    return counts[::-1].cumsum()[::-1][1:].astype(np.int64)


def range_quantizers(model: torch.nn.Module, bits: Iterable[int]) -> dict[str, ActivationQuantizer]:
    """The learned-range activation quantizers (DDTB, PAMS) of ``model`` at ``bits``, by conv@bits."""
    wanted = {int(b) for b in bits}
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantConv2d):
            for b, quant in mod.act_quant.items():
                if isinstance(quant, (DdtbActivation, PamsActivation)) and int(b) in wanted:
                    out[f"{name}@{b}"] = quant
    return out


def bounds(quant: ActivationQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) in effect for input ``x``: DDTB's gated bounds (widened to hold 0, as its grid
    does) or PAMS's symmetric +-alpha."""
    if isinstance(quant, DdtbActivation):
        lower, upper = quant.bounds(x)
        return torch.clamp(lower.detach(), max=0.0), torch.clamp(upper.detach(), min=0.0)
    alpha = quant.alpha.detach().abs()
    return -alpha, alpha


def measure(
    model: torch.nn.Module, quantizers: dict[str, ActivationQuantizer], batches: Iterable[torch.Tensor]
) -> dict[str, Overshoot]:
    """Run ``model`` at its own bits on the LR batches and count every quantizer's overshoot."""
    stats = {key: Overshoot() for key in quantizers}
    hooks = []
    for key, quant in quantizers.items():

        def hook(q: ActivationQuantizer, args: tuple, key: str = key) -> None:
            x = args[0].detach()
            stats[key].add(x, *bounds(q, x))

        hooks.append(quant.register_forward_pre_hook(hook))
    bits = model_bits(model)
    try:
        with torch.no_grad():
            for lr in batches:
                if isinstance(model, RefQSR):
                    model(lr, lr)  # both paths: the patch as its own reference
                else:
                    model(lr, bits)
    finally:
        for h in hooks:
            h.remove()
    return stats


def widen(quantizers: dict[str, ActivationQuantizer], stats: dict[str, Overshoot], clip: float) -> dict[str, Any]:
    """Scale each quantizer's learned bounds by its factors; return them per quantizer."""
    report = {}
    with torch.no_grad():
        for key, quant in quantizers.items():
            s = stats[key]
            fu, fl = s.factor(clip / 2, s.upper), s.factor(clip / 2, s.lower)  # half the budget per side
            if isinstance(quant, DdtbActivation):
                quant.upper.mul_(fu)
                quant.lower.mul_(fl)
            else:  # one symmetric range: the larger factor
                fu = fl = max(fu, fl)
                quant.alpha.mul_(fu)
            report[key] = {"upper_factor": fu, "lower_factor": fl, "inputs": s.total}
    return report


def crops(data: str | Path, n: int, lr_patch: int, batch: int, seed: int) -> list[torch.Tensor]:
    ds = HRFolderDataset(data, 4, lr_patch, seed=seed, augment=True)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds), size=n, replace=n > len(ds))
    lrs = [ds[int(i)]["lr"] for i in idx]
    return [torch.stack(lrs[i : i + batch]) for i in range(0, n, batch)]


def calibrate(
    model_name: str,
    out: str | Path,
    data: str | Path,
    clip: float = 1e-5,
    bits: Iterable[int] = (8,),
    n_crops: int = 128,
    lr_patch: int = 96,
    seed: int = 0,
) -> dict[str, Any]:
    """Widen the DDTB activation bounds of ``model_name``'s ``bits``-bit quantizers; write ``out``."""
    if not 0 <= clip < 1:
        raise RefQSRError(f"--clip must be in [0, 1), got {clip}")
    model, card = load_model(resolve_model(model_name))
    quantizers = range_quantizers(model, bits)
    if not quantizers:
        raise RefQSRError(f"{model_name}: no DDTB or PAMS activation quantizer at {sorted(set(bits))} bits")
    stats = measure(model, quantizers, crops(data, n_crops, lr_patch, 16, seed))
    report = widen(quantizers, stats, clip)
    note = (
        f"activation bounds of the {sorted(set(bits))}-bit quantizers widened to clip at most {clip:g} "
        f"of the inputs on {n_crops} {lr_patch}-px crops of {Path(data).as_posix()} (training.calibrate)"
    )
    card = {**card, "history": [*card.get("history", []), note], "calibration": {"clip": clip, "factors": report}}
    save_model(out, model, card)
    return report


@click.command()
@click.argument("model_name")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Training HR folder.")
@click.option("--clip", type=float, default=1e-5, show_default=True, help="Share of inputs left outside the bounds.")
@click.option("--bits", "bits", type=int, multiple=True, default=(8,), show_default=True, help="Bit widths to widen.")
@click.option("--crops", "n_crops", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr-patch", type=click.IntRange(min=16), default=96, show_default=True)
def main(model_name: str, out: str, data: str, clip: float, bits: tuple[int, ...], n_crops: int, lr_patch: int) -> None:
    """Widen MODEL_NAME's activation ranges so that at most --clip of the inputs are clipped; write OUT."""
    try:
        report = calibrate(model_name, out, data, clip, bits, n_crops, lr_patch)
    except RefQSRError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    fu = [r["upper_factor"] for r in report.values()]
    fl = [r["lower_factor"] for r in report.values()]
    click.echo(
        f"wrote {out}: {len(report)} quantizers; "
        f"upper x{min(fu):.2f}..{max(fu):.2f}, lower x{min(fl):.2f}..{max(fl):.2f}"
    )


if __name__ == "__main__":
    main()
