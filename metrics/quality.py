"""PSNR / SSIM on the BT.601 Y channel, following the SR literature's MATLAB conventions.

Papers (EDSR, RCAN, RefQSR, ...) report metrics on Y = MATLAB ``rgb2ycbcr`` luma, with
``scale`` pixels shaved from every border and SSIM from Wang et al.'s ``ssim_index.m``
(11x11 Gaussian, sigma 1.5, 'valid' filtering). Deviating from any of these shifts the
numbers enough to make comparisons with published tables meaningless.
"""

from __future__ import annotations

import math

import numpy as np
from refqsr_engine.errors import RefQSRError

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])  # BT.601 on [0,1] RGB -> [16,235] Y
_SSIM_WIN = 11
_SSIM_SIGMA = 1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_DATA_RANGE = 255.0


def _as_unit_range(img: np.ndarray) -> np.ndarray:
    """Map uint8 / uint16 / float-in-[0,255] to float64 in [0,1]."""
    if img.dtype == np.uint8:
        return img.astype(np.float64) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float64) / 65535.0
    if np.issubdtype(img.dtype, np.floating):
        return img.astype(np.float64) / 255.0
    raise RefQSRError(f"unsupported image dtype {img.dtype}; expected uint8, uint16 or float in [0,255]")


def sr_to_uint8(chw: np.ndarray) -> np.ndarray:
    """A network's output (C x H x W float RGB in [0, 1], unclipped) as the 8-bit H x W x C image
    it is written and scored as: clipped, rounded half to even."""
    return np.clip(np.round(chw * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma as MATLAB ``rgb2ycbcr``: Y = 16 + 65.481 R + 128.553 G + 24.966 B.

    ``img`` is HxWx3 RGB or HxW gray (taken as R = G = B); uint8, uint16 (rescaled to
    [0,255]) or float already in [0,255]. Returns float64 HxW in [16, 235].
    """
    img = np.asarray(img)
    unit = _as_unit_range(img)
    if unit.ndim == 2:
        # Gray: R = G = B = v, and the weights sum to 219.
        return 16.0 + _Y_WEIGHTS.sum() * unit
    if unit.ndim == 3 and unit.shape[2] == 3:
        return 16.0 + unit @ _Y_WEIGHTS
    raise RefQSRError(f"expected an HxWx3 RGB or HxW gray image, got shape {img.shape}")


def _quantize_sr(sr: np.ndarray) -> np.ndarray:
    """Float SR output is saved as 8-bit before scoring, so score the 8-bit values."""
    if np.issubdtype(sr.dtype, np.floating):
        return np.clip(np.round(sr), 0.0, 255.0)
    return sr


def _y_pair(sr: np.ndarray, hr: np.ndarray, shave: int, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate, convert both images to Y and shave ``shave`` pixels off every border."""
    sr, hr = np.asarray(sr), np.asarray(hr)
    if sr.shape != hr.shape:
        raise RefQSRError(f"SR and HR shapes differ: {sr.shape} vs {hr.shape}")
    if shave < 0:
        raise RefQSRError(f"shave must be >= 0, got {shave}")
    h, w = sr.shape[:2]
    if h - 2 * shave < min_size or w - 2 * shave < min_size:
        raise RefQSRError(
            f"image {h}x{w} is too small: after shaving {shave} px per border it must be at least {min_size}x{min_size}"
        )
    crop = (slice(shave, h - shave), slice(shave, w - shave))
    return rgb_to_y(_quantize_sr(sr))[crop], rgb_to_y(hr)[crop]


def psnr_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """PSNR (dB, data range 255) on the Y channel after shaving; ``inf`` for identical images."""
    y_sr, y_hr = _y_pair(sr, hr, shave, min_size=1)
    mse = float(np.mean((y_sr - y_hr) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(_DATA_RANGE**2 / mse)


def _gaussian_1d() -> np.ndarray:
    """Normalised 1-D Gaussian; its outer product is MATLAB ``fspecial('gaussian', 11, 1.5)``."""
    r = np.arange(_SSIM_WIN, dtype=np.float64) - (_SSIM_WIN - 1) / 2.0
    g = np.exp(-(r * r) / (2.0 * _SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering (no padding): output shrinks by len(g)-1 per axis."""
    win = np.lib.stride_tricks.sliding_window_view
    rows = win(img, g.size, axis=0) @ g
    return win(rows, g.size, axis=1) @ g


def ssim_map(y1: np.ndarray, y2: np.ndarray) -> np.ndarray:
    """Wang et al. SSIM map of two float images in [0,255], 'valid' region only."""
    g = _gaussian_1d()
    c1 = (_SSIM_K1 * _DATA_RANGE) ** 2
    c2 = (_SSIM_K2 * _DATA_RANGE) ** 2
    mu1, mu2 = _filter_valid(y1, g), _filter_valid(y2, g)
    # Population (biased) moments, as ssim_index.m: E[xy] - E[x]E[y].
    var1 = _filter_valid(y1 * y1, g) - mu1 * mu1
    var2 = _filter_valid(y2 * y2, g) - mu2 * mu2
    cov = _filter_valid(y1 * y2, g) - mu1 * mu2
    num = (2.0 * mu1 * mu2 + c1) * (2.0 * cov + c2)
    den = (mu1 * mu1 + mu2 * mu2 + c1) * (var1 + var2 + c2)
    return num / den


def ssim_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """Mean SSIM (Wang et al. 2004, MATLAB ``ssim_index.m``) on the Y channel after shaving."""
    y_sr, y_hr = _y_pair(sr, hr, shave, min_size=_SSIM_WIN)
    return float(ssim_map(y_sr, y_hr).mean())
