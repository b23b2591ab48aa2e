"""Rows and text for `refqsr-engine bitops`."""

from __future__ import annotations

from typing import Any

from ..errors import RefQSRError
from ..models.bitops import count_bitops, hr_to_lr, parse_size
from ..models.registry import arch_config
from ..pipeline.bitops import Precision
from ..pipeline.tiling import make_grid

COUNTED = (
    "counted: 2*MACs*(b_w/32)*(b_a/32) over the quantized block convs (ResBlocks; ELAN: LFEs); "
    "for RefQSR also the RefER "
    "refinement convs (b_high) and the RefER cost volume (b_low operands), with overlapping patch "
    "pixels counted in every patch. Not counted: full-precision parts "
    "(head, upsampler, tail; CARN's 1x1 fusions; ELAN's GMSA), normalisation, "
    "pooling, arg-max, flow upsampling, warping. ClustBlock (8-bit) is listed on its own."
)


def bitops_rows(
    arch: str, hr_size: str, patch: int, overlap: int, bits: str, ref_fraction: float | None, grid: str
) -> list[dict[str, Any]]:
    """One row per bit setting (``bits``: one or a comma list, e.g. "32,8,4,8-4,4-3") and grid."""
    settings = [b.strip() for b in bits.split(",") if b.strip()]
    if not settings:
        raise RefQSRError("--bits is empty: give e.g. 8, or a list such as 32,8,4,8-4")
    for b in settings:  # an unsupported setting is named before anything else is asked for
        try:
            Precision.parse(b)
        except ValueError as err:
            raise RefQSRError(str(err)) from None
    if patch != 0:
        make_grid(1, 1, patch, overlap)  # patch and overlap checked (0 = the whole image)
    elif overlap < 0:
        raise RefQSRError(f"overlap must be >= 0, got {overlap}")
    if any("-" in b for b in settings) and ref_fraction is None:
        raise RefQSRError("RefQSR bits need --ref-fraction (the share of reference patches, e.g. 0.35)")
    try:
        scale = arch_config(arch)["scale"]
        lr = hr_to_lr(parse_size(hr_size), scale)
        grids = ["full"] if patch == 0 else (["paper", "engine"] if grid == "both" else [grid])
        return [
            count_bitops(
                arch, lr, b, patch or None, overlap, g, ref_fraction=ref_fraction if "-" in b else None
            ).as_dict()
            for b in settings
            for g in grids
        ]
    except ValueError as err:
        raise RefQSRError(str(err)) from None


def format_table(rows: list[dict[str, Any]]) -> str:
    """Several settings side by side (paper Tables II/IV style), as a Markdown table."""
    r0 = rows[0]
    lines = [
        f"{r0['arch']} x4, LR {r0['lr_size'][1]}x{r0['lr_size'][0]}, overlap {r0['overlap']}",
        "",
        "| bits | grid | patch | patches | BitOPs (G) | FQR | blocks (G) "
        "| RefER convs (G) | cost volume (G) | ClustBlock (G) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['bits']} | {r['grid']} | {r['patch'] or 'full'} | {r['patches']} "
            f"| {r['bitops_g']:.2f} | {r['fqr']:.2f} "
            f"| {r['resblocks_g']:.2f} | {r['refer_convs_g']:.2f} "
            f"| {r['cost_volume_g']:.3f} | {r['clustblock_g']:.3f} |"
        )
    return "\n".join(lines + [""] + paper_style_note(rows) + [COUNTED])


def paper_style_note(rows: list[dict[str, Any]]) -> list[str]:
    """ELAN-light: the paper's Table IV counts more than the quantized LFEs (see models/elan.py);
    its count beside ours, for the fixed-precision rows on the paper's grid or the full image."""
    if rows[0]["arch"] != "elan_light":
        return []
    from ..models.elan import paper_style_bitops

    seen = {}
    for r in rows:
        if "-" not in r["bits"] and r["grid"] in ("paper", "full"):
            seen[r["bits"]] = paper_style_bitops(tuple(r["lr_size"]), r["patch"], r["overlap"], int(r["bits"]))["total"]
    if not seen:
        return []
    counts = ", ".join(f"{b}-bit {g:.2f} G" for b, g in seen.items())
    return [
        f"as the paper's Table IV counts ELAN (LFEs, GMSA projections and q.q^T at (b/32)^2, A.V at b/32, "
        f"tail conv): {counts}"
    ]


def format_bitops(rows: list[dict[str, Any]]) -> str:
    if len({r["bits"] for r in rows}) > 1:
        return format_table(rows)
    lines = []
    for r in rows:
        where = (
            "full image" if r["grid"] == "full" else f"{r['grid']} grid, {r['patch']}px patches, overlap {r['overlap']}"
        )
        lines.append(
            f"{r['arch']} x4 {r['bits']}-bit, LR {r['lr_size'][1]}x{r['lr_size'][0]}, {where}, {r['patches']} patches:"
            f" BitOPs {r['bitops_g']:.2f} G, FQR {r['fqr']:.2f}"
        )
        if r["refer_convs_g"] or r["cost_volume_g"]:
            lines.append(
                f"    blocks {r['resblocks_g']:.2f} G + RefER convs {r['refer_convs_g']:.2f} G + cost volume "
                f"{r['cost_volume_g']:.3f} G; ClustBlock {r['clustblock_g']:.3f} G; references {r['references']:.1f}"
            )
    lines += paper_style_note(rows) + [COUNTED]
    return "\n".join(lines)
