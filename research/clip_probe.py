"""Where does a quantized model lose PSNR on high-contrast content? Clipping rates and ablations.

    python -m research.clip_probe MODEL --set data/sr/hicontrast --set data/sr/val [--crop 384]

Two measurements on each folder (whole images or centre crops, patch-wise 96 px as the engine runs):

* per quantized conv: the share of its input activations outside the quantizer's range (what the
  learned bounds clip), the largest input over the upper bound, and the share of weights the
  weight quantizer clips;
* PSNR-Y of the model four ways: as it is; with every activation range widened to the input's
  min/max (no activation clipping, same bits); with weights quantized over their min/max instead
  of their 1st/99th percentile; both. The largest gain names the cause.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import click
import numpy as np
import torch
from refqsr_engine.engine.models_store import resolve_model
from refqsr_engine.models import quant_ddtb
from refqsr_engine.models.checkpoint import load_model
from refqsr_engine.models.qconv import QuantConv2d
from refqsr_engine.models.quant_base import QuantParams
from refqsr_engine.training.bundle import evaluate
from refqsr_engine.training.datasets import PairedFolder


@contextlib.contextmanager
def unclipped_activations() -> Iterator[None]:
    """Every DDTB activation range widened, per sample, to contain that sample's min and max."""
    original = quant_ddtb.DdtbActivation.qparams

    def qparams(self: Any, x: torch.Tensor | None = None) -> QuantParams:
        lower, upper = self.bounds(x)
        if x is not None:
            lo = x.detach().amin(dim=(1, 2, 3))
            hi = x.detach().amax(dim=(1, 2, 3))
            lower = torch.minimum(lower * torch.ones_like(lo), lo)
            upper = torch.maximum(upper * torch.ones_like(hi), hi)
        return quant_ddtb._asymmetric_params(lower, upper, self.bits)

    quant_ddtb.DdtbActivation.qparams = qparams
    try:
        yield
    finally:
        quant_ddtb.DdtbActivation.qparams = original


def _forget_weight_ranges(model: torch.nn.Module) -> None:
    """Drop the eval-mode memo of every weight quantizer's range (it holds the percentile in force)."""
    for mod in model.modules():
        mod.__dict__.pop("_qparams_cache", None)


@contextlib.contextmanager
def minmax_weights(model: torch.nn.Module) -> Iterator[None]:
    """DDTB weights quantized over their min/max (no percentile clip)."""
    original = quant_ddtb.WEIGHT_PERCENTILE
    quant_ddtb.WEIGHT_PERCENTILE = 1.0
    _forget_weight_ranges(model)
    try:
        yield
    finally:
        quant_ddtb.WEIGHT_PERCENTILE = original
        _forget_weight_ranges(model)


def clip_stats(model: torch.nn.Module, folder: PairedFolder) -> list[dict[str, Any]]:
    """Per quantized conv and activation bit width: clipped share of inputs, max input / upper bound."""
    stats: dict[str, dict[str, float]] = defaultdict(lambda: {"n": 0.0, "clipped": 0.0, "over": 0.0})
    hooks = []
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantConv2d):
            continue
        for bits, quant in mod.act_quant.items():

            def hook(q: Any, args: tuple, key: str = f"{name}@{bits}") -> None:
                x = args[0].detach()
                p = q.qparams(x)
                scale = p.scale.view(-1, 1, 1, 1) if p.scale.dim() == 1 else p.scale
                zero = p.zero_point.view(-1, 1, 1, 1) if p.zero_point.dim() == 1 else p.zero_point
                lo, hi = (p.qmin - zero) * scale, (p.qmax - zero) * scale
                s = stats[key]
                s["n"] += x.numel()
                s["clipped"] += float(((x < lo) | (x > hi)).sum())
                s["over"] = max(s["over"], float((x / hi.clamp_min(1e-9)).max()))

            hooks.append(quant.register_forward_pre_hook(hook))
    try:
        evaluate(model, folder)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantConv2d) and mod.weight_quant is not None:
            w = mod.conv.weight.detach()
            p = mod.weight_quant.qparams(w, 8)
            lo, hi = (p.qmin - p.zero_point) * p.scale, (p.qmax - p.zero_point) * p.scale
            w_clip = float(((w < lo) | (w > hi)).float().mean())
            w_over = float(w.abs().max() / max(abs(float(lo)), abs(float(hi))))
            for key, s in stats.items():
                if key.split("@")[0] == name:
                    rows.append(
                        {
                            "conv": key,
                            "act_clipped": s["clipped"] / max(s["n"], 1),
                            "act_max_over_upper": s["over"],
                            "w_clipped": w_clip,
                            "w_max_over_range": w_over,
                        }
                    )
    return rows


def psnr_ablations(model: torch.nn.Module, folder: PairedFolder) -> dict[str, float]:
    out = {}
    for label, ctx in (
        ("as is", contextlib.nullcontext()),
        ("activations unclipped", unclipped_activations()),
        ("weights min/max", minmax_weights(model)),
    ):
        with ctx, torch.no_grad():
            out[label] = evaluate(model, folder)["mean"]["psnr_y"]
    with unclipped_activations(), minmax_weights(model), torch.no_grad():
        out["both"] = evaluate(model, folder)["mean"]["psnr_y"]
    return out


@click.command()
@click.argument("model_name")
@click.option("--set", "sets", multiple=True, required=True, help="Folder of HR images (repeatable).")
@click.option("--crop", type=int, default=0, help="Centre-crop HR images to this size (0: whole).")
@click.option("--fp", default=None, help="The FP model to print beside (e.g. srresnet_fp).")
@click.option("--stats-only", is_flag=True, help="Only the clipping statistics (no PSNR ablations).")
def main(model_name: str, sets: tuple[str, ...], crop: int, fp: str | None, stats_only: bool) -> None:
    """Clipping statistics and PSNR ablations of MODEL_NAME on each folder."""
    torch.set_grad_enabled(False)
    model, _ = load_model(resolve_model(model_name))
    model.eval()
    fp_model = load_model(resolve_model(fp))[0].eval() if fp else None
    for folder_name in sets:
        folder = PairedFolder(folder_name, 4, None, crop or None)
        click.echo(f"\n## {model_name} on {folder_name} ({len(folder)} images)")
        if fp_model is not None:
            click.echo(f"FP ({fp}): {evaluate(fp_model, folder)['mean']['psnr_y']:.3f} dB")
        for label, value in ({} if stats_only else psnr_ablations(model, folder)).items():
            click.echo(f"{label:24s} {value:.3f} dB")
        rows = clip_stats(model, folder)
        click.echo("| conv | act clipped % | max act / upper | w clipped % | max |w| / range |")
        click.echo("| --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            click.echo(
                f"| {r['conv']} | {100 * r['act_clipped']:.3f} | {r['act_max_over_upper']:.2f} "
                f"| {100 * r['w_clipped']:.2f} | {r['w_max_over_range']:.2f} |"
            )
        click.echo(f"mean act clipped: {100 * np.mean([r['act_clipped'] for r in rows]):.3f} %")


if __name__ == "__main__":
    main()
