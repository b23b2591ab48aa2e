"""The quality results (:mod:`.quality`) as JSON and Markdown: Table II and the Table VII patch study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_text_atomic


def _header(results: dict[str, Any]) -> list[str]:
    s, v = results["settings"], results["validation"]
    images = ", ".join(f"{i['name']} ({i['lr_size'][0]}x{i['lr_size'][1]} LR)" for i in v["images"])
    ps = s["paper_setting"]
    lines = [
        f"Validation: {len(v['images'])} image(s) from {v['source']}: {images}; LR by {v['degradation']}."
        + (f" HR centre-cropped to {v['hr_crop'][0]}x{v['hr_crop'][1]}." if v.get("hr_crop") else ""),
        f"Models: {s['n_blocks']}-block SRResNet x4, run patch-wise in PyTorch at their own bits on the engine's "
        f"grid (overlap {s['overlap']}, batch {s['batch']}); `weights` says where the weights come from "
        "(PTQ from FP = the bundled FP SRResNet's weights with calibrated quantizer ranges and identity RefER "
        "blocks, no quantization-aware training).",
        "BitOPs: mean per image over the validation images, counted on the engine grid (every patch PxP, "
        "padding and overlaps included) with each image's actual reference/query assignment; ClustBlock "
        f"(8-bit) on its own. FQR: MAC-weighted over all images. `paper setting`: the same model costed at "
        f"{ps['lr_size'][1] * 4}x{ps['lr_size'][0] * 4} output, {ps['patch']} px patches on the paper's grid, at the "
        "reference share measured here. PSNR/SSIM: Y channel, shave 4, SR rounded to 8 bits.",
    ]
    if results.get("quick"):
        lines.append("**Quick run**: tiny models and one small crop; a smoke test, not a measurement.")
    return lines


def table2_markdown(results: dict[str, Any]) -> str:
    lines = (
        ["# Table II for our models (paper layout)", ""]
        + _header(results)
        + [
            "",
            f"Patch {results['settings']['patch']} px.",
            "",
            "| model | weights | BitOPs (G) | FQR | PSNR-Y (dB) | SSIM-Y | references | ClustBlock (G) | "
            "paper setting BitOPs (G) / FQR |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    )
    for r in results["table2"]:
        if "skipped" in r:
            lines.append(f"| {r['label']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        refs = f"{100 * r['reference_share']:.0f} % of {r['patches']}" if r["bits"].count("-") else "-"
        clust = f"{r['clustblock_g']:.3f}" if r["clustblock_g"] else "-"
        lines.append(
            f"| {r['label']} | {r['weights_label']} | {r['bitops_g']:.2f} | {r['fqr']:.2f} | {r['psnr_y']:.2f} | "
            f"{r['ssim_y']:.4f} | {refs} | {clust} | {r['paper_setting']['bitops_g']:.2f} / "
            f"{r['paper_setting']['fqr']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def study_markdown(results: dict[str, Any]) -> str:
    lines = (
        ["# Patch-size study (paper Table VII layout)", ""]
        + _header(results)
        + [
            "",
            "| model | bits | weights | patch | patches | BitOPs (G) | FQR | PSNR-Y (dB) | SSIM-Y | references |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    )
    names = {"fp32": "SRResNet", "ddtb-8": "SRResNet-DDTB", "refqsr-8-3": "+RefQSR"}
    for r in results["patch_study"]:
        patch = "full image" if r["patch"] is None else f"{r['patch']}x{r['patch']}"
        if "skipped" in r:
            lines.append(
                f"| {names.get(r['key'], r['key'])} | {r['bits']} | skipped: {r['skipped']} | {patch} | | | | | | |"
            )
            continue
        refs = f"{100 * r['reference_share']:.0f} %" if r["bits"].count("-") else "-"
        lines.append(
            f"| {names.get(r['key'], r['key'])} | {r['bits']} | {r['weights_label']} | {patch} | {r['patches']} | "
            f"{r['bitops_g']:.2f} | {r['fqr']:.2f} | {r['psnr_y']:.2f} | {r['ssim_y']:.4f} | {refs} |"
        )
    lines += [
        "",
        "Patches larger than an image are padded to the full patch (the engine's fixed shapes), and "
        "padded pixels are counted: on images smaller than the patch, large patches cost more BitOPs.",
    ]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``table2.json/.md`` and ``patch_size.json/.md`` (``-quick`` stems for a quick run)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "-quick" if results.get("quick") else ""
    common = {k: v for k, v in results.items() if k not in ("table2", "patch_study")}
    paths = []
    for stem, key, render in (("table2", "table2", table2_markdown), ("patch_size", "patch_study", study_markdown)):
        payload = {**common, "rows": results[key]}
        paths.append(write_text_atomic(out / f"{stem}{tag}.json", json.dumps(payload, indent=1) + "\n"))
        paths.append(write_text_atomic(out / f"{stem}{tag}.md", render(results)))
    return paths
