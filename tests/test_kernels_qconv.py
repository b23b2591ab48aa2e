"""The fused quantized conv (quantize + pack -> integer conv -> dequantize) against a float64
PyTorch conv of the same integer grid values, for every variant it picks, worst-case ranges
included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from refqsr_engine.kernels.conv2d_int8 import Conv2dShape, default_target
from refqsr_engine.kernels.qconv_fused import QConvSpec, choose_variant, pack_qconv_weights, qconv_primfunc


def _reference(x, s, z, w, ws, lo, hi, stride, pad):
    q = np.clip(np.round(x / s[:, None, None, None]) + z[:, None, None, None], lo, hi)
    xd = torch.tensor((q - z[:, None, None, None]).astype(np.float64))
    y = F.conv2d(xd, torch.tensor(w.astype(np.float64)), stride=stride, padding=pad).numpy()
    return y * (s[:, None, None, None] * ws[None, :, None, None]).astype(np.float64)


CASES = [
    # N, C, O, H, W, K, stride, pad, bits, signed container, weight range
    (2, 64, 64, 12, 12, 3, 1, 1, 8, False, (-255, 255)),  # asymmetric 8-bit weights beyond s8
    (2, 64, 64, 12, 12, 3, 1, 1, 8, True, (-127, 127)),  # PAMS 8-bit
    (2, 64, 64, 12, 12, 3, 1, 1, 4, False, (-31, 32)),  # DDTB 4-bit activations, 6-bit weights
    (2, 64, 64, 12, 12, 3, 1, 1, 4, True, (-7, 7)),  # PAMS 4-bit
    (2, 64, 64, 12, 12, 3, 1, 1, 7, False, (-64, 63)),
    (2, 3, 64, 24, 24, 3, 3, 0, 8, False, (-128, 127)),  # ClustBlock conv 1: stride 3, no padding, 3 channels
    (2, 32, 47, 1, 1, 1, 1, 0, 8, False, (-128, 127)),  # ClustBlock FC as a 1x1 conv, 47 classes
]


def case_problem(case: tuple) -> tuple:
    """One CASES entry as a conv problem: (spec, x, s, z, w, ws, want), with weights at both ends of
    their range, activations saturating at both ends of the grid, and the float64 reference."""
    n, c, o, h, w_, k, stride, pad, bits, signed, (wlo, whi) = case
    rng = np.random.default_rng(sum(case[:9]))
    shape = Conv2dShape(n, c, o, h, w_, k, stride, pad)
    w = rng.integers(wlo, whi + 1, (o, c, k, k))
    w.flat[0], w.flat[1] = wlo, whi  # the extremes occur
    spec = QConvSpec(shape, bits, signed, int(w.min()), int(w.max()))
    s = rng.uniform(0.01, 0.05, n).astype(np.float32)
    z = (np.zeros(n) if signed else rng.integers(0, 2**bits, n)).astype(np.float32)
    x = rng.normal(0, 1, (n, c, h, w_)).astype(np.float32)
    x.flat[0], x.flat[-1] = 1e3, -1e3  # saturates at both ends of the grid
    ws = rng.uniform(0.001, 0.01, o).astype(np.float32)
    lo, hi = spec.q_range
    return spec, x, s, z, w, ws, _reference(x, s, z, w, ws, lo, hi, stride, pad)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}->{c[2]}k{c[5]}s{c[6]}b{c[8]}{'s' if c[9] else 'u'}")
def test_fused_qconv_matches_float64_conv(case):
    spec, x, s, z, w, ws, want = case_problem(case)
    shape = spec.shape
    variant = choose_variant(spec.act_max, spec.w_min, spec.w_max, False, shape.kernel, shape.c8)
    exe = tvm.compile(tvm.IRModule({"main": qconv_primfunc(spec, variant)}), target=default_target(num_cores=2))
    packed, sums = pack_qconv_weights(w, variant)
    wsp = np.zeros(sums.shape[0], np.float32)
    wsp[: len(ws)] = ws
    dev = tvm.cpu()
    y = tvm.runtime.empty(want.shape, "float32", dev)
    exe["main"](*[tvm.runtime.tensor(a, dev) for a in (x, s, z, packed, sums, wsp)], y)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize(
    "ranges, vnni, expected",
    [
        ((255, -128, 127), False, "int16"),
        ((255, -255, 255), True, "int16"),  # weights beyond s8: only the 16-bit kernel holds them
        ((255, -128, 127), True, "vnni"),
        ((15, -8, 7), False, "lowbit"),
        ((15, -31, 32), False, "lowbit"),
        ((127, -64, 63), False, "int8pair"),
        ((127, -128, 127), False, "int8"),
    ],
)
def test_variant_choice_is_exact_and_fastest(ranges, vnni, expected):
    assert choose_variant(*ranges, vnni=vnni) == expected
    assert choose_variant(*ranges, vnni=vnni, avx512=False) == expected  # AVX2 targets unchanged


@pytest.mark.parametrize(
    "ranges, channel_groups, expected",
    [
        ((255, -200, 55), 8, "vnni512"),  # DDTB 8-bit: 256 weight values beyond s8, shifted into s8
        ((255, 0, 255), 8, "vnni512"),
        ((255, -255, 0), 8, "vnni512"),
        ((255, -255, 255), 8, "int16"),  # 511 values: no s8 shift
        ((255, -128, 127), 8, "vnni512"),
        ((15, -31, 32), 8, "vnni512"),  # low-bit: vpdpbusd zmm beat the int16-chunk lowbit512
        ((15, -8, 7), 8, "vnni512"),
        ((255, -128, 127), 4096, "vnni"),  # 294912 taps: 255 * (128 + 128) * taps overflows int32
    ],
)
def test_variant_choice_avx512(ranges, channel_groups, expected):
    assert choose_variant(*ranges, vnni=True, channel_groups=channel_groups, avx512=True) == expected


def test_weight_shift_bounds():
    from refqsr_engine.kernels.qconv_fused import vnni512_is_exact, weight_shift

    assert weight_shift(-128, 127) == 0 and weight_shift(-5, 5) == 0
    for lo, hi in ((-255, 0), (0, 255), (-200, 55), (-130, 0)):
        c = weight_shift(lo, hi)
        assert -128 <= lo - c and hi - c <= 127
    assert weight_shift(-255, 1) is None
    assert vnni512_is_exact(255, -255, 0, 64 * 9) and not vnni512_is_exact(255, -255, 1, 9)
