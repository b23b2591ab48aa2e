"""The Describable Textures Dataset (DTD, Cimpoi et al. 2014) for pre-training ClustBlock.

Layout (as distributed): ``dtd/images/<class>/<class>_NNNN.jpg``, 47 classes x 120 images.
``root`` may be the ``dtd`` folder or its ``images`` folder. Classes are the sub-folder names,
sorted alphabetically (label = position). The train/validation split is deterministic: within each
class, every ``1/val_fraction``-th image (sorted by name) is held out.

A sample is a random ``size x size`` crop (deterministic in ``(seed, index)``), optionally after a
random down-scaling (``scale_range``; ClustBlock sees LR patches, DTD photos are full resolution),
with the short side resized up to ``size`` first when the image is smaller than the crop.
Sample ``i`` comes from image ``i % n_images``; ``len == n_images * repeat``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from refqsr_engine.errors import RefQSRError
from refqsr_engine.training.datasets import IMAGE_EXTENSIONS, load_rgb
from refqsr_engine.training.labelled import LabelledImageSet

SPLITS = ("train", "val", "all")


def dtd_images_dir(root: str | Path) -> Path:
    """The folder holding one sub-folder per class: ``root/images`` or ``root`` itself."""
    root = Path(root)
    if not root.is_dir():
        raise RefQSRError(f"DTD folder not found: {root}")
    images = root / "images"
    return images if images.is_dir() else root


def dtd_classes(root: str | Path) -> list[str]:
    """Class names (sub-folders holding at least one image), sorted alphabetically."""
    images = dtd_images_dir(root)
    classes = sorted(
        d.name
        for d in images.iterdir()
        if d.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in d.iterdir() if p.is_file())
    )
    if not classes:
        raise RefQSRError(f"{images} holds no class folders with images (expected images/<class>/*.jpg)")
    return classes


def _resize_rgb(img: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def random_crop(
    img: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """A ``size x size`` crop of HxWx3 uint8 ``img``: random down-scale factor from ``scale_range``
    (never below the crop), short side resized up to ``size`` when smaller, then a random window."""
    h, w = img.shape[:2]
    lo, hi = scale_range
    f = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else float(lo)
    f = max(f, size / min(h, w))  # the scaled image must still hold the crop
    if abs(f - 1.0) > 1e-6:
        nh, nw = max(size, int(round(h * f))), max(size, int(round(w * f)))
        img = _resize_rgb(img, nh, nw)
        h, w = nh, nw
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return np.ascontiguousarray(img[top : top + size, left : left + size])


class DTDDataset(LabelledImageSet):
    """Random crops of DTD images with their class label; ``ds[i] -> (3 x size x size in [0, 1], label)``.

    ``cache`` keeps decoded images in memory (DTD decoded is about 3 GB: leave it off for the full set).
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 72,
        split: str = "train",
        val_fraction: float = 0.1,
        seed: int = 0,
        repeat: int = 1,
        scale_range: tuple[float, float] = (1.0, 1.0),
        cache: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise RefQSRError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise RefQSRError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if size < 1 or repeat < 1:
            raise RefQSRError(f"size and repeat must be positive (size={size}, repeat={repeat})")
        lo, hi = scale_range
        if not 0.0 < lo <= hi:
            raise RefQSRError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.root = dtd_images_dir(root)
        self.classes = dtd_classes(root)
        self.num_classes = len(self.classes)
        self.size, self.seed, self.repeat = int(size), int(seed), int(repeat)
        self.scale_range = (float(lo), float(hi))
        self.split = split
        every = max(2, int(round(1.0 / val_fraction)))
        self.files: list[Path] = []
        self.labels: list[int] = []
        for label, name in enumerate(self.classes):
            files = sorted(
                (p for p in (self.root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                key=lambda p: p.name,
            )
            for k, p in enumerate(files):
                is_val = k % every == every - 1
                if split == "all" or (split == "val") == is_val:
                    self.files.append(p)
                    self.labels.append(label)
        if not self.files:
            raise RefQSRError(f"the {split!r} split of {self.root} is empty")
        self.cache = bool(cache)
        self._cache: dict[int, np.ndarray] = {}

    @property
    def n_images(self) -> int:
        return len(self.files)

    def __len__(self) -> int:
        return self.n_images * self.repeat

    def label(self, index: int) -> int:
        return self.labels[int(index) % self.n_images]

    def image(self, image_index: int) -> np.ndarray:
        img = self._cache.get(image_index)
        if img is None:
            img = load_rgb(self.files[image_index])
            if self.cache:
                self._cache[image_index] = img
        return img

    def render(self, index: int, size: int | None = None) -> np.ndarray:
        """Sample ``index`` as ``size x size x 3`` uint8 (deterministic in ``(seed, index, size)``)."""
        if index < 0:
            raise IndexError(f"negative index {index}")
        size = self.size if size is None else int(size)
        rng = np.random.default_rng((self.seed, int(index), size))
        return random_crop(self.image(int(index) % self.n_images), size, rng, self.scale_range)
