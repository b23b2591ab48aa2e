"""The validation images of the quality tables: (name, LR, HR) uint8 pairs.

A folder given with ``--val``, or the name of one of ``training.prepare``'s held-out sets (``val``,
``test``, ``hicontrast``: ``data/sr/NAME``); else ``data/sr/val`` under the current directory (the repository's
validation images, as ``python -m refqsr_engine.training.prepare data/sr`` writes them) when it
holds images; otherwise the scikit-image photos that ``prepare`` puts into its validation folder
(astronaut, coffee), made the same way (RGB, HR cropped to multiples of 4, LR by the project's
MATLAB-style bicubic degradation), so that the suite also runs outside a repository checkout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DEFAULT_VAL = Path("data/sr/val")  # relative to the current directory (a repository checkout)
FALLBACK_PHOTOS = ("astronaut", "coffee")  # the scikit-image photos of prepare's VAL_NAMES
SCALE = 4


class ValPair(NamedTuple):
    name: str
    lr: np.ndarray  # h x w x 3 uint8
    hr: np.ndarray  # 4h x 4w x 3 uint8


def _centre_crop(hr: np.ndarray, crop: tuple[int, int] | None) -> np.ndarray:
    """Centre crop to at most ``crop`` = (height, width) HR pixels, then to multiples of 4."""
    h, w = hr.shape[:2]
    if crop is not None:
        ch, cw = min(h, crop[0]), min(w, crop[1])
        y, x = (h - ch) // 2, (w - cw) // 2
        hr = hr[y : y + ch, x : x + cw]
    h, w = hr.shape[:2]
    return np.ascontiguousarray(hr[: h - h % SCALE, : w - w % SCALE])


def fallback_pairs(crop: tuple[int, int] | None = None) -> list[ValPair]:
    from skimage import data

    from ..metrics import bicubic_degrade

    pairs = []
    for name in FALLBACK_PHOTOS:
        img = np.asarray(getattr(data, name)())
        rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        hr = _centre_crop(rgb.astype(np.uint8), crop)
        pairs.append(ValPair(f"skimage_{name}", bicubic_degrade(hr, SCALE), hr))
    return pairs


def folder_pairs(folder: Path, crop: tuple[int, int] | None = None) -> list[ValPair]:
    from ..metrics import bicubic_degrade
    from ..training.datasets import find_images, load_rgb

    pairs = []
    for path in find_images(folder):
        hr = _centre_crop(load_rgb(path), crop)
        pairs.append(ValPair(path.relative_to(folder).with_suffix("").as_posix(), bicubic_degrade(hr, SCALE), hr))
    return pairs


def validation_set(
    val: str | Path | None = None, crop: tuple[int, int] | None = None, limit: int | None = None
) -> tuple[list[ValPair], dict[str, Any]]:
    """The pairs and a description of where they came from (``val`` None: the default folder if
    it holds images, else the fallback photos)."""
    from ..errors import RefQSRError
    from ..training.datasets import find_images
    from ..training.prepare import HELD_OUT

    folder = Path(val) if val is not None else DEFAULT_VAL
    if val is not None and not folder.is_dir() and str(val) in HELD_OUT:
        folder = DEFAULT_VAL.parent / str(val)
    if val is not None and not folder.is_dir():
        raise RefQSRError(f"validation folder {folder} does not exist")
    if folder.is_dir() and find_images(folder):
        pairs, source = folder_pairs(folder, crop), str(folder)
    else:
        pairs, source = fallback_pairs(crop), "fallback: scikit-image " + ", ".join(FALLBACK_PHOTOS)
    pairs = pairs[:limit] if limit else pairs
    info = {
        "source": source,
        "images": [{"name": p.name, "lr_size": [int(p.lr.shape[1]), int(p.lr.shape[0])]} for p in pairs],
        "degradation": "MATLAB-style bicubic x1/4 (metrics.bicubic_degrade)",
        "hr_crop": None if crop is None else [crop[1], crop[0]],
    }
    return pairs, info
