"""`refqsr-engine models`: the bundled models as their cards describe them (no PyTorch needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import RefQSRError
from .models_store import DEFAULT_ALIAS, bundled_dir, bundled_models

# Column order and headers of the text table.
_COLUMNS = (
    ("name", "model"),
    ("arch", "arch"),
    ("bits", "bits"),
    ("psnr_y", "PSNR-Y"),
    ("ssim_y", "SSIM-Y"),
    ("hicontrast_psnr_y", "high-contrast"),
    ("bitops_g", "BitOPs (G)"),
    ("size_mb", "size (MB)"),
    ("bounds", "vs FP"),
)


def model_row(name: str, folder: Path | None = None) -> dict[str, Any]:
    """One bundled model's facts, read from its card ``NAME.json`` and its file's size."""
    folder = folder or bundled_dir()
    card_path = folder / f"{name}.json"
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as err:
        raise RefQSRError(f"{card_path}: unreadable model card ({err})") from None
    mean = (card.get("validation") or {}).get("mean") or {}
    setting = card.get("bitops_urban100_setting") or {}
    evaluation = card.get("evaluation") or {}
    sets = {name: block["psnr_y"] for name, block in evaluation.items() if isinstance(block, dict)}
    return {
        "name": name,
        "default": name == DEFAULT_ALIAS,
        "arch": card.get("arch"),
        # FP cards carry no bits field: they run at 32.
        "bits": card.get("bits") or "32",
        "scheme": card.get("scheme"),
        "psnr_y": mean.get("psnr_y"),
        "ssim_y": mean.get("ssim_y"),
        "validation_images": len((card.get("validation") or {}).get("images") or []),
        # PSNR-Y per held-out set (val, test, hicontrast) where the card was scored on them
        "sets": sets,
        "hicontrast_psnr_y": sets.get("hicontrast"),
        "bitops_g": setting.get("bitops_g"),
        # δ models choose bits per patch: their count at the Urban100 setting is scaled from validation.
        "bitops_estimated": "estimate" in setting,
        "size_bytes": (folder / f"{name}.pt").stat().st_size,
        # quantized models: gaps to the FP model per set, the bounds met, and why not where one is missed
        "quality_bounds": card.get("quality_bounds"),
    }


def model_rows(folder: Path | None = None) -> list[dict[str, Any]]:
    """Every bundled model, in name order."""
    return [model_row(name, folder) for name in bundled_models()]


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "name":
        return f"{value} (default)" if row["default"] else str(value)
    if key == "bounds":
        bounds = row.get("quality_bounds")
        return "-" if not bounds else ("met" if bounds["all_met"] else "missed")
    if key == "size_mb":
        return f"{row['size_bytes'] / 1e6:.1f}"
    if value is None:
        return "-"
    if key in ("psnr_y", "hicontrast_psnr_y"):
        return f"{value:.3f}"
    if key == "ssim_y":
        return f"{value:.4f}"
    if key == "bitops_g":
        return f"{value:.2f}" + ("*" if row["bitops_estimated"] else "")
    return str(value)


def format_models(rows: list[dict[str, Any]]) -> str:
    """A text table; PSNR-Y/SSIM-Y on the held-out validation photos, BitOPs at the Urban100 setting."""
    cells = [[header for _, header in _COLUMNS]] + [[_cell(r, key) for key, _ in _COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells
    ]
    n_val = max((r["validation_images"] for r in rows), default=0)
    lines += [
        "",
        f"PSNR-Y / SSIM-Y: mean over the {n_val} held-out validation photos (patch 96, shave 4);",
        "high-contrast: PSNR-Y on the high-contrast set (text, line art, grids, facades, graphics).",
        "BitOPs: quantized feature extraction of a 1280x720 output at patch 72 (the paper's Urban100 setting);",
        "* = a content-aware model's count, scaled from the bits it chose on the validation photos.",
        "vs FP: within 0.05 dB of the FP model on the validation and test sets and 0.2 dB on the high-contrast",
        "set (met), or not (missed: `models --json` gives the gaps and the reason).",
        "Use one with: refqsr-engine upscale IN OUT --model NAME   (`default` is the one marked).",
    ]
    return "\n".join(line.rstrip() for line in lines)
