"""MATLAB-compatible ``imresize`` (bicubic, antialiased downscaling) in vectorised numpy.

SR benchmarks generate LR inputs with MATLAB's ``imresize(hr, 1/4, 'bicubic')``; any other
resizer (OpenCV, plain PIL, torch) gives slightly different LR images and shifts PSNR by
tenths of a dB, so the exact MATLAB algorithm is reproduced here:

* Keys cubic kernel with a = -0.5;
* when downscaling, the kernel is stretched by 1/scale (antialiasing) and its taps are
  normalised to sum to one;
* out-of-range taps read the image mirrored with the edge pixel repeated (``[1..n, n..1]``);
* dimensions are resized one at a time, the one shrinking most first (MATLAB's order).
"""

from __future__ import annotations

import math

import numpy as np
from refqsr_engine.errors import RefQSRError

_KERNEL_WIDTH = 4.0  # support of the Keys cubic kernel, in input pixels, at scale 1


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel, a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0))
    return inner + outer


def _contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-pixel tap weights and (0-based, mirrored) input indices, as MATLAB.

    Returns ``(weights, indices)``, both of shape ``(out_len, taps)``.
    """
    antialias = scale < 1.0
    width = _KERNEL_WIDTH / scale if antialias else _KERNEL_WIDTH
    x = np.arange(1, out_len + 1, dtype=np.float64)
    # Output pixel x (1-based) maps to input coordinate u so that pixel areas line up.
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based, may run off the image
    dist = u[:, None] - idx
    # Antialiasing widens the kernel: h(x) = scale * k(scale * x); the scale cancels below.
    weights = _cubic(scale * dist) if antialias else _cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    # Symmetric mirroring with the edge repeated: period 2n sequence [0..n-1, n-1..0].
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    indices = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    # Drop tap columns that are zero for every output pixel (MATLAB does the same).
    keep = np.any(weights != 0.0, axis=0)
    return weights[:, keep], indices[:, keep]


def _resize_axis(img: np.ndarray, axis: int, out_len: int, scale: float) -> np.ndarray:
    """Resize ``img`` along one axis; a loop over the few taps, vectorised over pixels."""
    weights, indices = _contributions(img.shape[axis], out_len, scale)
    # Broadcast each tap's per-output weight along ``axis`` only.
    bshape = [1] * img.ndim
    bshape[axis] = out_len
    out = np.zeros(img.shape[:axis] + (out_len,) + img.shape[axis + 1 :], dtype=np.float64)
    for t in range(weights.shape[1]):
        out += np.take(img, indices[:, t], axis=axis) * weights[:, t].reshape(bshape)
    return out


def _resolve_sizes(
    in_hw: tuple[int, int],
    scale: float | None,
    output_shape: tuple[int, int] | None,
) -> tuple[tuple[float, float], tuple[int, int]]:
    """Return per-axis (scales, output sizes) following MATLAB's rules."""
    if (scale is None) == (output_shape is None):
        raise RefQSRError("imresize: give exactly one of `scale` or `output_shape`")
    if scale is not None:
        if not scale > 0:
            raise RefQSRError(f"imresize: scale must be positive, got {scale}")
        # MATLAB: output size = ceil(scale * input size); the scale itself is kept as given.
        sizes = (int(math.ceil(scale * in_hw[0])), int(math.ceil(scale * in_hw[1])))
        return (float(scale), float(scale)), sizes
    out_h, out_w = (int(v) for v in output_shape)  # type: ignore[union-attr]
    if out_h <= 0 or out_w <= 0:
        raise RefQSRError(f"imresize: output_shape must be positive, got {output_shape}")
    return (out_h / in_hw[0], out_w / in_hw[1]), (out_h, out_w)


def imresize(
    img: np.ndarray,
    scale: float | None = None,
    output_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resize an HxW or HxWxC image like MATLAB ``imresize(img, ..., 'bicubic')``.

    Exactly one of ``scale`` (same factor for H and W) or ``output_shape`` (H, W) is
    required. Computation is in float64; the result is neither rounded nor clipped.
    """
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise RefQSRError(f"imresize: expected a non-empty HxW or HxWxC image, got shape {arr.shape}")
    scales, sizes = _resolve_sizes((arr.shape[0], arr.shape[1]), scale, output_shape)
    # MATLAB resizes the dimension with the smallest scale first (stable for ties: H, W).
    for axis in sorted(range(2), key=lambda a: scales[a]):
        if sizes[axis] == arr.shape[axis] and scales[axis] == 1.0:
            continue  # identity along this axis
        arr = _resize_axis(arr, axis, sizes[axis], scales[axis])
    return arr


def bicubic_degrade(hr: np.ndarray, scale: int = 4) -> np.ndarray:
    """Standard x``scale`` LR generation: crop to multiples of ``scale``, MATLAB bicubic down.

    Takes a uint8/uint16 HxW or HxWxC image and returns the same dtype, rounded (half away
    from zero, as MATLAB) and clipped to the dtype's range.
    """
    hr = np.asarray(hr)
    if hr.dtype not in (np.uint8, np.uint16):
        raise RefQSRError(f"bicubic_degrade: expected a uint8 or uint16 image, got {hr.dtype}")
    if hr.ndim not in (2, 3):
        raise RefQSRError(f"bicubic_degrade: expected an HxW or HxWxC image, got shape {hr.shape}")
    if int(scale) != scale or scale < 1:
        raise RefQSRError(f"bicubic_degrade: scale must be a positive integer, got {scale}")
    scale = int(scale)
    h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
    if h == 0 or w == 0:
        raise RefQSRError(f"bicubic_degrade: image {hr.shape[:2]} is smaller than scale {scale}")
    lr = imresize(hr[:h, :w], scale=1.0 / scale)
    top = float(np.iinfo(hr.dtype).max)
    # floor(x + 0.5) == MATLAB's round for the non-negative values left after clipping.
    return np.floor(np.clip(lr, 0.0, top) + 0.5).astype(hr.dtype)
