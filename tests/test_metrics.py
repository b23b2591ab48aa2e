"""Metrics and MATLAB-style resizing, checked against independent implementations.

References: scikit-image (``rgb2ycbcr``, PSNR, SSIM), Pillow's float ('F' mode) bicubic
resize, a direct per-pixel evaluation of MATLAB's resampling formula, and hand-computed
values / analytic properties.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from refqsr_engine.errors import RefQSRError
from refqsr_engine.metrics import bicubic_degrade, imresize, psnr_y, rgb_to_y, ssim_map, ssim_y
from scipy import ndimage
from skimage import color, data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

SHAVE = 4
# Our metrics and skimage's do the same float64 arithmetic and differ only in summation
# order, so they agree to ~1e-12; 1e-6 is far tighter than the 1e-3 the task asks for.
METRIC_TOL = 1e-6


# --------------------------------------------------------------------------- fixtures


def _photos() -> dict[str, np.ndarray]:
    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee()}


def _noisy(img: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0.0, 8.0, img.shape), 0, 255).round().astype(np.uint8)


def _blurred(img: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(img.astype(np.float64), sigma=(1.2, 1.2, 0)).round().astype(np.uint8)


def _bicubic_sr(img: np.ndarray) -> np.ndarray:
    """A float 'SR' output (x4 down then up): exercises the round-to-8-bit path."""
    h, w = (img.shape[0] // 4) * 4, (img.shape[1] // 4) * 4
    hr = img[:h, :w]
    sr = imresize(imresize(hr.astype(np.float64), scale=0.25), scale=4.0)
    return np.pad(sr, ((0, img.shape[0] - h), (0, img.shape[1] - w), (0, 0)), mode="edge")


DEGRADATIONS = {"noisy": _noisy, "blurred": _blurred, "bicubic": _bicubic_sr}


def _ref_y(img: np.ndarray) -> np.ndarray:
    """Independent Y: skimage's rgb2ycbcr (same MATLAB constants), after 8-bit rounding."""
    if np.issubdtype(img.dtype, np.floating):
        img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return color.rgb2ycbcr(img)[..., 0]


def _shaved(y: np.ndarray, s: int = SHAVE) -> np.ndarray:
    return y[s:-s, s:-s]


# --------------------------------------------------------------------------- rgb_to_y


def test_rgb_to_y_hand_computed_pixels() -> None:
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]], [[0, 255, 0], [0, 0, 255], [128, 64, 32]]], np.uint8)
    # 16 + (65.481*128 + 128.553*64 + 24.966*32) / 255 = 16 + 17407.872 / 255
    expected = np.array([[16.0, 235.0, 81.481], [144.553, 40.966, 84.26616470588235]])
    np.testing.assert_allclose(rgb_to_y(px), expected, rtol=0, atol=1e-9)


def test_rgb_to_y_dtypes_and_gray() -> None:
    px = np.array([[[255, 0, 0], [128, 64, 32]]], np.uint8)
    y8 = rgb_to_y(px)
    assert y8.dtype == np.float64
    # uint16 is rescaled to [0,255]: 257 * v16 == v8 * 65535 / 255.
    np.testing.assert_allclose(rgb_to_y(px.astype(np.uint16) * 257), y8, atol=1e-9)
    np.testing.assert_allclose(rgb_to_y(px.astype(np.float32)), y8, atol=1e-4)
    gray = np.array([[0, 51, 255]], np.uint8)
    np.testing.assert_allclose(rgb_to_y(gray), [[16.0, 59.8, 235.0]], atol=1e-12)  # 16 + 219 * v / 255
    assert rgb_to_y(gray.astype(np.uint16) * 257).max() == pytest.approx(235.0)


def test_rgb_to_y_matches_skimage_on_photo() -> None:
    img = data.astronaut()
    np.testing.assert_allclose(rgb_to_y(img), color.rgb2ycbcr(img)[..., 0], atol=1e-9)


def test_rgb_to_y_rejects_bad_shape() -> None:
    with pytest.raises(RefQSRError):
        rgb_to_y(np.zeros((4, 4, 4), np.uint8))


# --------------------------------------------------------------------------- PSNR / SSIM


@pytest.mark.parametrize("degrade", sorted(DEGRADATIONS))
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_psnr_ssim_match_skimage(name: str, degrade: str) -> None:
    hr = _photos()[name]
    sr = DEGRADATIONS[degrade](hr)
    y_sr, y_hr = _shaved(_ref_y(sr)), _shaved(_ref_y(hr))
    ref_psnr = peak_signal_noise_ratio(y_hr, y_sr, data_range=255)
    # skimage filters the full image with reflect padding but then averages only the map
    # cropped by the filter radius (5 px) -- exactly the 'valid' region we compute, so the
    # two means are the same quantity with no further adjustment.
    ref_ssim = structural_similarity(
        y_hr, y_sr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert psnr_y(sr, hr, SHAVE) == pytest.approx(ref_psnr, abs=METRIC_TOL)
    assert ssim_y(sr, hr, SHAVE) == pytest.approx(ref_ssim, abs=METRIC_TOL)


def test_ssim_map_is_skimage_map_cropped() -> None:
    """Like-with-like at map level: our 'valid' map == skimage's full map minus 5 px borders."""
    hr = data.astronaut()
    y_hr, y_sr = _ref_y(hr), _ref_y(_noisy(hr))
    _, full = structural_similarity(
        y_hr, y_sr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, full=True
    )
    ours = ssim_map(y_hr, y_sr)
    assert ours.shape == (y_hr.shape[0] - 10, y_hr.shape[1] - 10)
    np.testing.assert_allclose(ours, full[5:-5, 5:-5], rtol=0, atol=1e-9)


def test_float_sr_is_rounded_before_scoring() -> None:
    hr = data.chelsea()
    sr = hr.astype(np.float64) + 0.3  # rounds back to hr exactly
    assert psnr_y(sr, hr, SHAVE) == math.inf
    assert ssim_y(sr, hr, SHAVE) == pytest.approx(1.0, abs=1e-12)


def test_metric_errors() -> None:
    a = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(RefQSRError, match="shapes differ"):
        psnr_y(a, np.zeros((32, 31, 3), np.uint8), SHAVE)
    with pytest.raises(RefQSRError, match="too small"):
        ssim_y(a[:18, :18], a[:18, :18], SHAVE)  # 10x10 left < 11x11 window
    with pytest.raises(RefQSRError, match="too small"):
        psnr_y(a[:8, :8], a[:8, :8], SHAVE)


# --------------------------------------------------------------------------- imresize

# Pillow keeps images and its intermediate (after the horizontal pass) in float32: a half
# ulp at 256 is 7.6e-6, so two roundings plus accumulation stay below ~3e-5 (measured
# 1.3e-5 .. 2.3e-5). A kernel mismatch (a=-0.75, no antialiasing, half-pixel shift) shows up
# as errors of 1e-1 and more, so 1e-4 cleanly separates "same kernel" from "different".
PIL_TOL = 1e-4
# Pillow truncates and renormalises the kernel at borders, MATLAB mirrors: only output
# pixels whose support crosses the border differ (<= 2 px here); compare 8 px inside.
PIL_MARGIN = 8


def _pillow_resize(y: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    pil = Image.fromarray(y.astype(np.float32))  # mode 'F'
    assert pil.mode == "F"
    return np.asarray(pil.resize((out_hw[1], out_hw[0]), Image.BICUBIC), dtype=np.float64)


@pytest.mark.parametrize(
    "kwargs, out_hw",
    [
        ({"scale": 0.25}, (128, 128)),  # the x4 LR generation case
        ({"output_shape": (200, 150)}, (200, 150)),  # non-integer, unequal factors
        ({"output_shape": (77, 301)}, (77, 301)),  # down in H, up in W
        ({"scale": 2.0}, (1024, 1024)),  # upscaling: plain Keys kernel
    ],
)
def test_imresize_matches_pillow_interior(kwargs: dict, out_hw: tuple[int, int]) -> None:
    y = rgb_to_y(data.astronaut())
    ours = imresize(y, **kwargs)
    assert ours.shape == out_hw and ours.dtype == np.float64
    m = PIL_MARGIN
    diff = np.abs(ours - _pillow_resize(y, out_hw))[m:-m, m:-m]
    assert diff.max() < PIL_TOL


def _direct_matlab_1d(x: np.ndarray, out_len: int, scale: float) -> np.ndarray:
    """Per-pixel evaluation of MATLAB's formula with np.pad 'symmetric' borders (slow, clear)."""

    def keys(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return 1.5 * t**3 - 2.5 * t**2 + 1
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2 if t <= 2 else 0.0

    stretch = min(scale, 1.0)  # antialiasing widens the kernel only when shrinking
    pad = int(math.ceil(2 / stretch)) + 2
    xp = np.pad(x, pad, mode="symmetric")  # MATLAB mirrors with the edge repeated
    out = np.empty(out_len)
    for j in range(out_len):
        u = (j + 0.5) / scale - 0.5  # 0-based input coordinate of output pixel j
        ks = range(int(math.floor(u - 2 / stretch)), int(math.ceil(u + 2 / stretch)) + 1)
        w = np.array([keys(stretch * (u - k)) for k in ks])
        out[j] = np.dot(w / w.sum(), [xp[k + pad] for k in ks])
    return out


@pytest.mark.parametrize("scale", [0.25, 0.5, 2.0])
def test_imresize_borders_match_direct_formula(scale: float) -> None:
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (13, 11))
    ours = imresize(img, scale=scale)
    ref = np.apply_along_axis(_direct_matlab_1d, 0, img, ours.shape[0], scale)
    ref = np.apply_along_axis(_direct_matlab_1d, 1, ref, ours.shape[1], scale)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kwargs", [{"scale": 0.25}, {"scale": 3.0}, {"output_shape": (9, 40)}])
def test_imresize_keeps_constant_image(kwargs: dict) -> None:
    out = imresize(np.full((37, 53, 3), 123.4), **kwargs)
    np.testing.assert_allclose(out, 123.4, rtol=0, atol=1e-10)


@pytest.mark.parametrize("scale", [0.25, 0.5, 2.0])
def test_imresize_reproduces_linear_ramp_in_interior(scale: float) -> None:
    # Keys (a=-0.5) reproduces linear functions, also when stretched by an integer factor.
    i, j = np.meshgrid(np.arange(64.0), np.arange(48.0), indexing="ij")
    out = imresize(3.0 * i + 0.5 * j + 7.0, scale=scale)
    ui = (np.arange(out.shape[0]) + 0.5) / scale - 0.5  # MATLAB's sample positions, 0-based
    uj = (np.arange(out.shape[1]) + 0.5) / scale - 0.5
    expected = 3.0 * ui[:, None] + 0.5 * uj[None, :] + 7.0
    m = 3  # outermost outputs see the mirrored (non-linear) border
    np.testing.assert_allclose(out[m:-m, m:-m], expected[m:-m, m:-m], rtol=0, atol=1e-9)


def test_imresize_output_shapes_follow_matlab_ceil() -> None:
    assert imresize(np.zeros((101, 99)), scale=0.25).shape == (26, 25)  # ceil(25.25), ceil(24.75)
    assert imresize(np.zeros((7, 5, 3)), scale=0.5).shape == (4, 3, 3)
    assert imresize(np.zeros((10, 10)), scale=1 / 3).shape == (4, 4)
    assert imresize(np.zeros((10, 10, 2)), output_shape=(3, 17)).shape == (3, 17, 2)


def test_imresize_argument_errors() -> None:
    with pytest.raises(RefQSRError):
        imresize(np.zeros((8, 8)))
    with pytest.raises(RefQSRError):
        imresize(np.zeros((8, 8)), scale=0.5, output_shape=(4, 4))


def test_bicubic_degrade_shape_dtype_and_rounding() -> None:
    rng = np.random.default_rng(2)
    hr = rng.integers(0, 256, (101, 99, 3), dtype=np.uint8)
    lr = bicubic_degrade(hr, 4)
    assert lr.shape == (25, 24, 3) and lr.dtype == np.uint8
    expected = np.floor(np.clip(imresize(hr[:100, :96], scale=0.25), 0, 255) + 0.5)
    np.testing.assert_array_equal(lr, expected.astype(np.uint8))
    assert bicubic_degrade(hr[..., 0], 4).shape == (25, 24)
    hr16 = hr.astype(np.uint16) * 257
    assert bicubic_degrade(hr16, 4).dtype == np.uint16
    with pytest.raises(RefQSRError):
        bicubic_degrade(hr.astype(np.float32), 4)
