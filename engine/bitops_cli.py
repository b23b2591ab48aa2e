"""Rows and text for `refqsr-engine bitops`."""
from __future__ import annotations

from typing import Any

from ..errors import RefQSRError
from ..models.bitops import count_bitops, hr_to_lr, parse_size
from ..models.registry import arch_config

COUNTED = (
    "counted: 2*MACs*(b_w/32)*(b_a/32) over the quantized ResBlock convs; for RefQSR also the RefER "
    "refinement convs (b_high) and the RefER cost volume (b_low operands), with overlapping patch "
    "pixels counted in every patch. Not counted: full-precision head/upsampler/tail, normalisation, "
    "pooling, arg-max, flow upsampling, warping. ClustBlock (8-bit) is listed on its own."
)


def bitops_rows(arch: str, hr_size: str, patch: int, overlap: int, bits: str, ref_fraction: float | None, grid: str) -> list[dict[str, Any]]:
    if "-" in bits and ref_fraction is None:
        raise RefQSRError("RefQSR bits need --ref-fraction (the share of reference patches, e.g. 0.35)")
    try:
        scale = arch_config(arch)["scale"]
        lr = hr_to_lr(parse_size(hr_size), scale)
        grids = ["full"] if patch == 0 else (["paper", "engine"] if grid == "both" else [grid])
        return [count_bitops(arch, lr, bits, patch or None, overlap, g, ref_fraction=ref_fraction).as_dict() for g in grids]
    except ValueError as err:
        raise RefQSRError(str(err)) from None


def format_bitops(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        where = "full image" if r["grid"] == "full" else f"{r['grid']} grid, {r['patch']}px patches, overlap {r['overlap']}"
        lines.append(
            f"{r['arch']} x4 {r['bits']}-bit, LR {r['lr_size'][1]}x{r['lr_size'][0]}, {where}, {r['patches']} patches:"
            f" BitOPs {r['bitops_g']:.2f} G, FQR {r['fqr']:.2f}"
        )
        if r["refer_convs_g"] or r["cost_volume_g"]:
            lines.append(
                f"    ResBlocks {r['resblocks_g']:.2f} G + RefER convs {r['refer_convs_g']:.2f} G + cost volume "
                f"{r['cost_volume_g']:.3f} G; ClustBlock {r['clustblock_g']:.3f} G; references {r['references']:.1f}"
            )
    lines.append(COUNTED)
    return "\n".join(lines)
