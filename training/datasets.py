"""Super-resolution data sets: random training crops and whole-image test pairs.

* :class:`HRFolderDataset` -- aligned LR/HR training crops (HR ``lr_patch*scale`` square, LR
  ``lr_patch`` square) from a folder of HR images, with LR either read from a folder
  (DIV2K layout) or made once per image with MATLAB-style :func:`bicubic_degrade` and cached.
  Every sample is a pure function of ``(seed, epoch, index)``, so a resumed run sees exactly
  the stream an uninterrupted run would have seen (see :class:`StepBatchSampler`).
* :class:`PairedFolder` -- (name, LR, HR) uint8 pairs for evaluation (Set5 / Urban100 style).
* :func:`div2k_layout` -- ``(hr_dir, lr_dir)`` of a DIV2K-style root.

Images are always RGB: alpha is dropped, gray is expanded, 16-bit is rescaled to 8-bit,
EXIF orientation is applied.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from refqsr_engine.errors import RefQSRError
from refqsr_engine.metrics import bicubic_degrade
from torch.utils.data import Dataset, Sampler

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

# A sample key: a plain index (uses the data set's current epoch) or (epoch, index).
SampleKey = Union[int, "tuple[int, int]"]


# --------------------------------------------------------------------------- files and images


def find_images(folder: str | Path) -> list[Path]:
    """All images under ``folder`` (recursive), sorted by relative path.

    Raises :class:`RefQSRError` when the folder does not exist or holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise RefQSRError(f"image folder not found: {root}")
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise RefQSRError(f"no images found in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB (EXIF orientation applied, alpha dropped, gray expanded)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                gray = np.floor(np.clip(arr, 0, top) * (255.0 / top) + 0.5).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
            if im.mode == "P":
                im = im.convert("RGBA")  # palette with transparency -> RGBA -> RGB below
            if im.mode in ("LA", "La"):
                im = im.convert("L")
            rgb = im.convert("RGB")  # RGBA/CMYK/YCbCr/L/1 -> RGB (alpha is dropped, not composited)
            return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RefQSRError(f"cannot read image {path}: {exc}") from exc


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:  # malformed EXIF: Pillow would ignore it too
                orientation = 1
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RefQSRError(f"cannot read image {path}: {exc}") from exc
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def crop_to_scale(hr: np.ndarray, scale: int) -> np.ndarray:
    """Top-left crop so both sides are multiples of ``scale`` (what bicubic_degrade scores)."""
    h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
    return hr[:h, :w]


def dihedral(img: np.ndarray, hflip: bool, vflip: bool, transpose: bool) -> np.ndarray:
    """One of the 8 dihedral transforms (flips and 90-degree rotations) of an HxWxC array."""
    if hflip:
        img = img[:, ::-1]
    if vflip:
        img = img[::-1]
    if transpose:
        img = img.transpose(1, 0, 2)
    return img


# --------------------------------------------------------------------------- layouts


def div2k_layout(root: str | Path, scale: int = 4, split: str = "train") -> tuple[Path, Path | None]:
    """``(hr_dir, lr_dir)`` of a DIV2K-style root.

    ``root/DIV2K_{split}_HR`` holds ``0001.png`` ...; ``root/DIV2K_{split}_LR_bicubic/X{scale}``
    holds ``0001x{scale}.png`` .... ``lr_dir`` is ``None`` when the LR folder is absent (LR will
    then be made with :func:`bicubic_degrade`). Raises :class:`RefQSRError` without an HR folder.
    """
    root = Path(root)
    hr_dir = root / f"DIV2K_{split}_HR"
    if not hr_dir.is_dir():
        raise RefQSRError(f"{root} is not a DIV2K-style root: {hr_dir.name}/ is missing")
    lr_dir = root / f"DIV2K_{split}_LR_bicubic" / f"X{scale}"
    return hr_dir, (lr_dir if lr_dir.is_dir() else None)


def _resolve_lr_dir(lr_root: str | Path, scale: int) -> Path:
    lr_dir = Path(lr_root)
    if (lr_dir / f"X{scale}").is_dir():  # DIV2K_train_LR_bicubic/ given instead of .../X4
        lr_dir = lr_dir / f"X{scale}"
    if not lr_dir.is_dir():
        raise RefQSRError(f"LR folder not found: {lr_dir}")
    return lr_dir


def _match_lr(hr_root: Path, hr_path: Path, lr_dir: Path, lr_index: dict[str, Path], scale: int) -> Path:
    """The LR file of ``hr_path``: same relative path, stem ``NAME`` or ``NAMEx{scale}``, any extension."""
    rel = hr_path.relative_to(hr_root).with_suffix("")
    for cand in (rel.as_posix() + f"x{scale}", rel.as_posix()):
        if cand in lr_index:
            return lr_index[cand]
    raise RefQSRError(f"no LR image for {hr_path.name} in {lr_dir} (expected {rel.name}x{scale}.png or {rel.name}.png)")


def _lr_paths(hr_root: Path, hr_files: Sequence[Path], lr_root: str | Path, scale: int) -> list[Path]:
    lr_dir = _resolve_lr_dir(lr_root, scale)
    lr_index = {p.relative_to(lr_dir).with_suffix("").as_posix(): p for p in find_images(lr_dir)}
    return [_match_lr(hr_root, p, lr_dir, lr_index, scale) for p in hr_files]


def _checked_pair(hr: np.ndarray, lr: np.ndarray, scale: int, hr_path: Path, lr_path: Path) -> np.ndarray:
    """HR cropped to LR*scale; error when the sizes are not a x``scale`` pair."""
    lh, lw = lr.shape[:2]
    if hr.shape[0] // scale != lh or hr.shape[1] // scale != lw:
        raise RefQSRError(
            f"{lr_path.name} is {lw}x{lh} but {hr_path.name} is {hr.shape[1]}x{hr.shape[0]}; "
            f"expected the LR to be the HR size / {scale}"
        )
    return hr[: lh * scale, : lw * scale]


# --------------------------------------------------------------------------- training crops


class HRFolderDataset(Dataset):
    """Random aligned training crops: LR ``3 x lr_patch x lr_patch``, HR ``3 x P x P`` (P = lr_patch*scale).

    ``len == n_images * repeat``; index ``i`` draws from image ``i % n_images``. The crop position
    and the dihedral transform come from ``numpy.random.default_rng((seed, epoch, i))``, so a sample
    depends on nothing but ``(seed, epoch, i)``. Index with an int (current epoch, see
    :meth:`set_epoch`) or with ``(epoch, i)`` (what :class:`StepBatchSampler` yields).

    Images smaller than the HR patch are skipped with a warning. Decoded HR/LR pairs are cached in
    memory when ``cache`` is true (decode + bicubic once per image per process).
    """

    def __init__(
        self,
        root: str | Path,
        scale: int = 4,
        lr_patch: int = 48,
        lr_root: str | Path | None = None,
        repeat: int = 1,
        seed: int = 0,
        augment: bool = True,
        cache: bool = True,
    ) -> None:
        if int(scale) != scale or scale < 1:
            raise RefQSRError(f"scale must be a positive integer, got {scale}")
        if lr_patch < 1:
            raise RefQSRError(f"lr_patch must be positive, got {lr_patch}")
        if repeat < 1:
            raise RefQSRError(f"repeat must be >= 1, got {repeat}")
        if seed < 0:
            raise RefQSRError(f"seed must be >= 0, got {seed}")
        self.root = Path(root)
        self.scale = int(scale)
        self.lr_patch = int(lr_patch)
        self.hr_patch = self.lr_patch * self.scale
        self.repeat = int(repeat)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.cache = bool(cache)
        self.epoch = 0

        files = find_images(self.root)
        lr_files: list[Path | None] = (
            list(_lr_paths(self.root, files, lr_root, self.scale)) if lr_root is not None else [None] * len(files)
        )
        self.lr_root = None if lr_root is None else _resolve_lr_dir(lr_root, self.scale)
        keep, skipped = [], []
        for hr_path, lr_path in zip(files, lr_files):
            h, w = _image_size(hr_path)
            if min(h, w) < self.hr_patch:
                skipped.append(f"{hr_path.name} ({w}x{h})")
            else:
                keep.append((hr_path, lr_path))
        if skipped:
            warnings.warn(
                f"{len(skipped)} image(s) smaller than the {self.hr_patch}px HR patch skipped: " + ", ".join(skipped),
                stacklevel=2,
            )
        if not keep:
            raise RefQSRError(f"no image in {self.root} is at least {self.hr_patch}x{self.hr_patch} pixels")
        self.hr_files = [k[0] for k in keep]
        self.lr_files = [k[1] for k in keep]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # DataLoader workers started with "spawn" pickle the data set: no lock, no decoded images.
        state = self.__dict__.copy()
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- public helpers

    @property
    def n_images(self) -> int:
        return len(self.hr_files)

    def __len__(self) -> int:
        return self.n_images * self.repeat

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain int indices (as DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def pair(self, image_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Whole (LR, HR) uint8 pair of one image; HR cropped to LR*scale."""
        cached = self._cache.get(image_index)
        if cached is not None:
            return cached
        hr_path, lr_path = self.hr_files[image_index], self.lr_files[image_index]
        hr = load_rgb(hr_path)
        if lr_path is None:
            hr = np.ascontiguousarray(crop_to_scale(hr, self.scale))
            lr = bicubic_degrade(hr, self.scale)
        else:
            lr = load_rgb(lr_path)
            hr = np.ascontiguousarray(_checked_pair(hr, lr, self.scale, hr_path, lr_path))
        if min(lr.shape[:2]) < self.lr_patch:
            raise RefQSRError(
                f"{hr_path.name}: LR {lr.shape[1]}x{lr.shape[0]} is smaller than the {self.lr_patch}px patch"
            )
        if self.cache:
            with self._lock:
                self._cache[image_index] = (lr, hr)
        return lr, hr

    def crop_params(self, index: int, epoch: int | None = None) -> dict[str, int | bool]:
        """Where and how sample ``index`` of ``epoch`` is cut: image, LR top/left, flips, transpose."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        epoch = self.epoch if epoch is None else int(epoch)
        image = index % self.n_images
        lr, _ = self.pair(image)
        rng = np.random.default_rng((self.seed, epoch, index))
        top = int(rng.integers(0, lr.shape[0] - self.lr_patch + 1))
        left = int(rng.integers(0, lr.shape[1] - self.lr_patch + 1))
        flips = rng.integers(0, 2, size=3) if self.augment else np.zeros(3, dtype=int)
        return {
            "image": image,
            "top": top,
            "left": left,
            "hflip": bool(flips[0]),
            "vflip": bool(flips[1]),
            "transpose": bool(flips[2]),
        }

    def sample(self, index: int, epoch: int | None = None) -> dict[str, torch.Tensor | str | int]:
        """The training sample ``index`` of ``epoch`` (deterministic in (seed, epoch, index))."""
        p = self.crop_params(index, epoch)
        lr, hr = self.pair(p["image"])  # type: ignore[arg-type]
        t, l, s, lp = p["top"], p["left"], self.scale, self.lr_patch
        lr_crop = lr[t : t + lp, l : l + lp]
        hr_crop = hr[t * s : (t + lp) * s, l * s : (l + lp) * s]
        flips = (p["hflip"], p["vflip"], p["transpose"])
        return {
            "lr": to_tensor(dihedral(lr_crop, *flips)),
            "hr": to_tensor(dihedral(hr_crop, *flips)),
            "index": index,
        }

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor | str | int]:
        if isinstance(key, tuple):
            epoch, index = key
            return self.sample(int(index), int(epoch))
        return self.sample(int(key))


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    return {
        "lr": torch.stack([s["lr"] for s in samples]),
        "hr": torch.stack([s["hr"] for s in samples]),
        "index": torch.tensor([int(s["index"]) for s in samples]),
    }


class StepBatchSampler(Sampler):
    """Batches of ``(epoch, index)`` keys as a pure function of the step, for resumable training.

    Sample ``k = step * batch + j`` of the stream is position ``k % n`` of epoch ``k // n``'s
    permutation (``default_rng((seed, epoch)).permutation(n)``). Starting at ``start_step`` yields
    exactly the batches an uninterrupted run yields from that step on. Endless unless ``steps``.
    """

    def __init__(self, n: int, batch: int, seed: int = 0, start_step: int = 0, steps: int | None = None) -> None:
        if n < 1 or batch < 1:
            raise RefQSRError(f"need at least one sample and batch >= 1 (n={n}, batch={batch})")
        self.n, self.batch, self.seed = int(n), int(batch), int(seed)
        self.start_step = int(start_step)
        self.steps = steps
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, 0x5A3D, epoch)).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def batch_for_step(self, step: int) -> list[tuple[int, int]]:
        keys = []
        for k in range(step * self.batch, (step + 1) * self.batch):
            epoch, pos = divmod(k, self.n)
            keys.append((epoch, int(self._perm_for(epoch)[pos])))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.steps is None or step < self.start_step + self.steps:
            yield self.batch_for_step(step)
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("endless StepBatchSampler has no length")
        return int(self.steps)


# --------------------------------------------------------------------------- test pairs


class Pair(NamedTuple):
    name: str
    lr: np.ndarray  # h x w x 3 uint8
    hr: np.ndarray  # (h*scale) x (w*scale) x 3 uint8


class PairedFolder:
    """Whole-image (name, LR, HR) uint8 pairs of a test set (Set5 / Urban100 style).

    LR comes from ``lr_dir`` (``NAMEx4.png`` or ``NAME.png``; a ``LR_bicubic`` folder with an
    ``X4`` sub-folder is accepted) or is made with :func:`bicubic_degrade`. ``center_crop``
    (HR pixels, rounded down to a multiple of ``scale``) keeps evaluation cheap. Pairs are
    computed on first access and cached.
    """

    def __init__(
        self,
        hr_dir: str | Path,
        scale: int = 4,
        lr_dir: str | Path | None = None,
        center_crop: int | None = None,
    ) -> None:
        self.hr_dir = Path(hr_dir)
        self.scale = int(scale)
        self.hr_files = find_images(self.hr_dir)
        self.lr_files: list[Path | None] = (
            list(_lr_paths(self.hr_dir, self.hr_files, lr_dir, self.scale))
            if lr_dir is not None
            else [None] * len(self.hr_files)
        )
        if center_crop is not None and center_crop < self.scale:
            raise RefQSRError(f"center_crop must be at least the scale ({self.scale}), got {center_crop}")
        self.center_crop = None if center_crop is None else (int(center_crop) // self.scale) * self.scale
        self._cache: dict[int, Pair] = {}

    def __len__(self) -> int:
        return len(self.hr_files)

    def names(self) -> list[str]:
        return [p.relative_to(self.hr_dir).with_suffix("").as_posix() for p in self.hr_files]

    def _crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """LR-grid (top, left, height, width) of the centre crop, in LR pixels."""
        s = self.scale
        lh, lw = h // s, w // s
        if self.center_crop is None:
            return 0, 0, lh, lw
        ch, cw = min(lh, self.center_crop // s), min(lw, self.center_crop // s)
        return (lh - ch) // 2, (lw - cw) // 2, ch, cw

    def __getitem__(self, i: int) -> Pair:
        if i < 0:
            i += len(self)
        if i in self._cache:
            return self._cache[i]
        hr_path, lr_path = self.hr_files[i], self.lr_files[i]
        hr = load_rgb(hr_path)
        s = self.scale
        if min(hr.shape[:2]) < s:
            raise RefQSRError(f"{hr_path.name} is smaller than the scale {s}")
        t, l, ch, cw = self._crop_box(*hr.shape[:2])
        if lr_path is None:
            hr = np.ascontiguousarray(hr[t * s : (t + ch) * s, l * s : (l + cw) * s])
            lr = bicubic_degrade(hr, s)
        else:
            lr_full = load_rgb(lr_path)
            hr_full = _checked_pair(hr, lr_full, s, hr_path, lr_path)
            hr = np.ascontiguousarray(hr_full[t * s : (t + ch) * s, l * s : (l + cw) * s])
            lr = np.ascontiguousarray(lr_full[t : t + ch, l : l + cw])
        pair = Pair(hr_path.relative_to(self.hr_dir).with_suffix("").as_posix(), lr, hr)
        self._cache[i] = pair
        return pair

    def __iter__(self) -> Iterator[Pair]:
        for i in range(len(self)):
            yield self[i]
