"""Patch tiling for the engine: cut an LR image (C x H x W) into fixed-size patches and
blend the super-resolved patches back into one HR image without seams.

The compiled network has fixed input shapes, so every patch is exactly P x P; the last
patch along an axis is shifted back to end at the image edge, and images smaller than a
patch are padded (the padding is cropped away after merging).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from refqsr_engine.errors import RefQSRError

MIN_PATCH = 8


@dataclass(frozen=True)
class PatchGrid:
    """Origins of the P x P patches that cover a `height` x `width` LR image."""

    height: int
    width: int
    patch: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def num_patches(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def padded_height(self) -> int:
        """Height the image is padded to before extraction (== height unless height < patch)."""
        return max(self.height, self.patch)

    @property
    def padded_width(self) -> int:
        return max(self.width, self.patch)

    def origins(self) -> list[tuple[int, int]]:
        """(y, x) origin of every patch, row-major: index k is row k // len(xs), column k % len(xs)."""
        return [(y, x) for y in self.ys for x in self.xs]


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass but never a meaningful size
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RefQSRError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise RefQSRError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _axis_origins(length: int, patch: int, stride: int) -> tuple[int, ...]:
    """Origins 0, s, 2s, ... then length - patch, so the last patch ends at the edge."""
    if length <= patch:
        return (0,)
    last = length - patch
    origins = list(range(0, last, stride))  # strictly below `last`: no duplicate of it
    origins.append(last)
    return tuple(origins)


#: The engine's patch sizes: ClustBlock's stride-3 convs and RefER's 3 x 3 pooling need a multiple
#: of 3 and at least 15 px; above 384 px one batch's HR intermediates (64 channels at 4x the patch)
#: take gigabytes, and larger patches gain nothing.
ENGINE_PATCH = (15, 384)


def check_engine_patch(patch: int, compiled: bool = True) -> int:
    """``patch`` if the engine can run it, else a one-line error that states the rule. The PyTorch
    reference (``compiled`` False) runs any size from MIN_PATCH up to the same maximum."""
    lo, hi = ENGINE_PATCH if compiled else (MIN_PATCH, ENGINE_PATCH[1])
    if not isinstance(patch, int) or not lo <= patch <= hi or (compiled and patch % 3):
        rule = f"a multiple of 3 in {lo}..{hi}" if compiled else f"in {lo}..{hi} (--engine torch)"
        raise RefQSRError(f"--patch must be {rule}, got {patch}")
    return patch


def make_grid(height: int, width: int, patch: int, overlap: int) -> PatchGrid:
    """Grid of same-size patches with stride patch - overlap (last patch shifted to the edge)."""
    height = _check_int("height", height, 1)
    width = _check_int("width", width, 1)
    patch = _check_int("patch", patch, MIN_PATCH)
    overlap = _check_int("overlap", overlap, 0)
    # overlap < P/2 keeps the stride above P/2, so regular neighbours never overlap 3-deep
    if 2 * overlap >= patch:
        raise RefQSRError(f"overlap must be < patch / 2 (patch={patch}), got {overlap}")
    stride = patch - overlap
    return PatchGrid(
        height=height,
        width=width,
        patch=patch,
        overlap=overlap,
        ys=_axis_origins(height, patch, stride),
        xs=_axis_origins(width, patch, stride),
    )


def _pad_mode(size: int, pad: int) -> str:
    # 'reflect' needs at least 2 pixels to mirror; a 1-pixel axis can only be repeated
    if pad == 0 or size >= 2:
        return "reflect"
    return "edge"


def _pad_to_grid(image: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Pad bottom/right up to one patch when the image is smaller than a patch."""
    pad_y = grid.padded_height - grid.height
    pad_x = grid.padded_width - grid.width
    if pad_y == 0 and pad_x == 0:
        return image
    # pad each axis separately: the two axes may need different modes
    if pad_y:
        image = np.pad(image, ((0, 0), (0, pad_y), (0, 0)), mode=_pad_mode(grid.height, pad_y))
    if pad_x:
        image = np.pad(image, ((0, 0), (0, 0), (0, pad_x)), mode=_pad_mode(grid.width, pad_x))
    return image


def _check_indices(indices: Sequence[int] | np.ndarray, num_patches: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise RefQSRError("patch indices must be a 1-D sequence of integers")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= num_patches):
        raise RefQSRError(f"patch index out of range [0, {num_patches})")
    return idx


def extract_patches(image: np.ndarray, grid: PatchGrid, indices: Sequence[int] | None = None) -> np.ndarray:
    """N x C x P x P patches of a C x H x W image for the given patch indices (all if None)."""
    if image.ndim != 3 or image.shape[1:] != (grid.height, grid.width):
        raise RefQSRError(f"image must be C x {grid.height} x {grid.width} for this grid, got {image.shape}")
    idx = np.arange(grid.num_patches) if indices is None else _check_indices(indices, grid.num_patches)
    padded = _pad_to_grid(image, grid)
    p, ncols = grid.patch, len(grid.xs)
    out = np.empty((len(idx), image.shape[0], p, p), dtype=image.dtype)
    for n, k in enumerate(idx):
        y, x = grid.ys[k // ncols], grid.xs[k % ncols]
        out[n] = padded[:, y : y + p, x : x + p]
    return out


def _axis_weights(origins: tuple[int, ...], patch: int, scale: int) -> list[np.ndarray]:
    """Per-patch 1-D HR blend weights along one axis; at every HR coordinate they sum to 1.

    Each patch ramps linearly (pixel centres, values strictly inside (0, 1)) across its
    actual overlap with each neighbour. Because the last patch is shifted back, its overlap
    with the previous one can exceed `overlap` and even reach the patch before that; the
    per-coordinate normalisation keeps the sum exactly 1 in that case too.
    """
    size = patch * scale
    starts = [o * scale for o in origins]
    raw = []
    for i, start in enumerate(starts):
        w = np.ones(size, dtype=np.float64)
        pos = np.arange(size) + 0.5  # pixel centres relative to the patch start
        if i > 0 and (ramp := starts[i - 1] + size - start) > 0:  # ramp up across the overlap with the previous patch
            w *= np.clip(pos / ramp, 0.0, 1.0)
        if (
            i + 1 < len(starts) and (ramp := size - (starts[i + 1] - start)) > 0
        ):  # ramp down across the overlap with the next
            w *= np.clip((size - pos) / ramp, 0.0, 1.0)
        raw.append(w)
    # normalise so the covering patches' weights sum to 1 at each coordinate
    total = np.zeros(starts[-1] + size, dtype=np.float64)
    for start, w in zip(starts, raw):
        total[start : start + size] += w
    return [w / total[start : start + size] for start, w in zip(starts, raw)]


class PatchMerger:
    """Streaming blend of HR patches (C x sP x sP) into the HR image (C x sH x sW).

    Weights are separable and sum to 1 everywhere, so one accumulator of the output size
    is enough: no weight-sum buffer and no division at the end.
    """

    def __init__(self, grid: PatchGrid, scale: int, channels: int, dtype: type = np.float32) -> None:
        self.grid = grid
        self.scale = _check_int("scale", scale, 1)
        self.channels = _check_int("channels", channels, 1)
        self.dtype = np.dtype(dtype)
        self._wy = [w.astype(self.dtype) for w in _axis_weights(grid.ys, grid.patch, self.scale)]
        self._wx = [w.astype(self.dtype) for w in _axis_weights(grid.xs, grid.patch, self.scale)]
        # accumulate only the real image: padding (image smaller than a patch) is cropped on add
        self._out = np.zeros((self.channels, grid.height * self.scale, grid.width * self.scale), dtype=self.dtype)
        self._added = np.zeros(grid.num_patches, dtype=bool)

    def add(self, indices: Sequence[int], hr_patches: np.ndarray) -> None:
        """Blend a batch of HR patches (N x C x sP x sP) for the given patch indices."""
        idx = _check_indices(indices, self.grid.num_patches)
        hp = self.grid.patch * self.scale
        expected = (len(idx), self.channels, hp, hp)
        if hr_patches.shape != expected:
            raise RefQSRError(f"HR patches must have shape {expected}, got {hr_patches.shape}")
        if len(np.unique(idx)) != len(idx) or self._added[idx].any():
            raise RefQSRError("a patch was added twice")  # would double its contribution
        ncols = len(self.grid.xs)
        for n, k in enumerate(idx):
            self._blend(int(k) // ncols, int(k) % ncols, hr_patches[n])
        self._added[idx] = True

    def _blend(self, row: int, col: int, patch: np.ndarray) -> None:
        s = self.scale
        y0, x0 = self.grid.ys[row] * s, self.grid.xs[col] * s
        # crop to the image: only non-empty when the image is smaller than a patch
        h = min(patch.shape[1], self._out.shape[1] - y0)
        w = min(patch.shape[2], self._out.shape[2] - x0)
        weight = self._wy[row][:h, None] * self._wx[col][None, :w]
        self._out[:, y0 : y0 + h, x0 : x0 + w] += patch[:, :h, :w] * weight

    @property
    def complete(self) -> bool:
        return bool(self._added.all())

    def result(self) -> np.ndarray:
        """The merged HR image; raises if a patch was never added."""
        if not self.complete:
            missing = np.flatnonzero(~self._added)
            raise RefQSRError(
                f"{len(missing)} of {self.grid.num_patches} patches were never added (first: {missing[:5].tolist()})"
            )
        return self._out
