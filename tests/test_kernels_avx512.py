"""The AVX-512 integer conv kernels ("vnni512", "lowbit512"): bit-exact against a float64 torch
conv of the same integers, worst-case operands included (the no-overflow bounds), the fused
kernel's weight shift for weights beyond s8, and that the code really runs in zmm registers.
Skipped on CPUs without AVX-512 F+BW+VNNI (checked in /proc/cpuinfo)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from refqsr_engine.kernels.conv2d_int8 import (
    Conv2dShape,
    build_conv2d_int8,
    default_target,
    host_mcpu,
    unpack_output,
)
from refqsr_engine.kernels.layouts import zero_point_correction
from refqsr_engine.kernels.qconv_fused import QConvSpec, choose_variant, pack_qconv_weights, qconv_primfunc
from refqsr_engine.kernels.x86_intrin import host_has_avx512_vnni

sys.path.insert(0, str(Path(__file__).parent))
from test_kernels_qconv import CASES, _reference, case_problem  # noqa: E402

pytestmark = pytest.mark.skipif(not host_has_avx512_vnni(), reason="CPU without AVX-512 F+BW+VNNI")


def _host_target():
    return default_target(host_mcpu(), num_cores=2)


def _int_conv(q, w, stride=1, pad=1):
    """sum q * w over each window (q already zero-point shifted), exact in float64 -> int64."""
    y = F.conv2d(
        torch.tensor(np.asarray(q, np.float64)), torch.tensor(np.asarray(w, np.float64)), stride=stride, padding=pad
    )
    return y.numpy().astype(np.int64)


_KERNELS = {}


def _kernel(shape, variant, **ranges):
    key = (shape, variant, tuple(sorted(ranges.items())))
    if key not in _KERNELS:
        _KERNELS[key] = build_conv2d_int8(*shape, target=_host_target(), variant=variant, **ranges)
    return _KERNELS[key]


def _raw(k, x, w, zp):
    """The kernel's raw sums (border padded with zp, zp not removed), NCHW int64."""
    y = k(k.pack_activations(x, zp), k.pack_weights(w))
    return unpack_output(y, w.shape[0]).astype(np.int64)


def _raw_reference(x, w, zp):
    return _int_conv(np.asarray(x) - zp, w, pad=w.shape[-1] // 2) + zero_point_correction(w, zp)[None, :, None, None]


# ----------------------------------------------------------------------------------------------
# packed kernels


@pytest.mark.parametrize(
    "shape",
    [(2, 64, 64, 12, 12), (1, 64, 24, 5, 7), (1, 3, 64, 6, 10), (1, 64, 3, 5, 8), (1, 16, 40, 5, 5, 1)],
    ids=["64to64", "64to24-odd", "3to64", "64to3", "1x1"],
)
def test_vnni512_random_full_u8_s8(shape):
    k = _kernel(shape, "vnni512")
    n, c, o, h, w_ = shape[:5]
    ks = shape[5] if len(shape) > 5 else 3
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 256, (n, c, h, w_))
    wt = rng.integers(-128, 128, (o, c, ks, ks))
    np.testing.assert_array_equal(_raw(k, x, wt, 201), _raw_reference(x, wt, 201))


def test_vnni512_worst_case_and_zmm():
    """u8 255 x s8 -128 / 127 everywhere: every vpdpbusd quad is at its extreme (-130560 / 129540)
    and the int32 sums (|.| <= 255 * 128 * 576 = 18.8M) are exact -- no int16 step to saturate."""
    k = _kernel((1, 64, 64, 6, 12), "vnni512")
    x = np.full((1, 64, 6, 12), 255)
    for v in (-128, 127):
        wt = np.full((64, 64, 3, 3), v)
        np.testing.assert_array_equal(_raw(k, x, wt, 255), _raw_reference(x, wt, 255))
    asm = k.asm()
    assert "vpdpbusd" in asm and "%zmm" in asm
    assert "vpmaddubsw" not in asm  # no saturating int16 step


def test_lowbit512_worst_case_u4_s6():
    """u4 15 x s6 -32 / 31: a vpmaddubsw pair sum reaches -960 / 930, 34 of them fit int16;
    one 8-channel group of a 3x3 conv is 18, so the kernel flushes every group (chunk 1)."""
    k = _kernel((1, 64, 64, 5, 12), "lowbit512", act_max=15, w_min=-32, w_max=31)
    assert k.chunk_groups == 1
    x = np.full((1, 64, 5, 12), 15)
    for v in (-32, 31):
        wt = np.full((64, 64, 3, 3), v)
        np.testing.assert_array_equal(_raw(k, x, wt, 15), _raw_reference(x, wt, 15))
    rng = np.random.default_rng(1)
    x = rng.integers(0, 16, (1, 64, 5, 12))
    wt = rng.integers(-32, 32, (64, 64, 3, 3))
    np.testing.assert_array_equal(_raw(k, x, wt, 3), _raw_reference(x, wt, 3))
    asm = k.asm()
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm and "%zmm" in asm
    with pytest.raises(ValueError):
        k(k.pack_activations(np.full((1, 64, 5, 12), 16)), k.pack_weights(wt))


def test_lowbit512_u4_s4_chunks():
    k = _kernel((1, 64, 64, 4, 12), "lowbit512")  # u4 x s4: 136 steps, 7 groups -> chunk 4
    assert k.chunk_groups == 4
    x = np.full((1, 64, 4, 12), 15)
    for v in (-8, 7):
        wt = np.full((64, 64, 3, 3), v)
        np.testing.assert_array_equal(_raw(k, x, wt, 0), _raw_reference(x, wt, 0))


def test_avx512_variants_refuse_an_avx2_target():
    with pytest.raises(ValueError, match="AVX-512"):
        build_conv2d_int8(1, 8, 8, 4, 4, target=default_target("core-avx2"), variant="vnni512")


# ----------------------------------------------------------------------------------------------
# fused kernel (quantize + pack -> conv -> dequantize) with the AVX-512 variant choice


def _run_fused(spec, variant, x, s, z, w, ws):
    exe = tvm.compile(tvm.IRModule({"main": qconv_primfunc(spec, variant)}), target=_host_target())
    packed, sums = pack_qconv_weights(w, variant, spec.weight_shift if variant == "vnni512" else None)
    wsp = np.zeros(sums.shape[0], np.float32)
    wsp[: w.shape[0]] = ws
    dev = tvm.cpu()
    sh = spec.shape
    y = tvm.runtime.empty((sh.batch, sh.out_ch, sh.out_height, sh.out_width), "float32", dev)
    exe["main"](*[tvm.runtime.tensor(np.asarray(a), dev) for a in (x, s, z, packed, sums, wsp)], y)
    return y.numpy()


@pytest.mark.parametrize("w_range", [(-255, 0), (0, 255), (-200, 55), (-128, 127)])
def test_fused_vnni512_weight_shift_worst_case_bit_exact(w_range):
    """DDTB 8-bit: u8 activations x weights spanning 256 values beyond s8. With S = WS = 1 the
    output is float32(the exact integer sum): compared bit for bit, activations all at 255 with
    zero point 0 / 255 (border included) and weights at both ends of the range. Width 16: the
    dequantize runs through the 16 x 16 transposing intrinsic."""
    wlo, whi = w_range
    shape = Conv2dShape(1, 64, 64, 4, 16, 3, 1, 1)
    spec = QConvSpec(shape, 8, False, wlo, whi)
    assert choose_variant(spec.act_max, wlo, whi, True, 3, shape.c8, avx512=True) == "vnni512"
    x = np.full((1, 64, 4, 16), 1e3, np.float32)  # saturates to q = 255
    for zp in (0.0, 255.0):
        for pattern in ("lo", "hi", "mixed"):
            w = np.full((64, 64, 3, 3), wlo if pattern == "lo" else whi)
            if pattern == "mixed":
                w[::2] = wlo
            y = _run_fused(
                spec, "vnni512", x, np.ones(1, np.float32), np.full(1, zp, np.float32), w, np.ones(64, np.float32)
            )
            want = _int_conv(np.full((1, 64, 4, 16), 255.0) - zp, w).astype(np.float32)
            np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}->{c[2]}k{c[5]}s{c[6]}b{c[8]}{'s' if c[9] else 'u'}")
def test_fused_host_choice_matches_float64_conv(case):
    """Every case of test_kernels_qconv on the host target, with the AVX-512 variant choice."""
    spec, x, s, z, w, ws, want = case_problem(case)
    wlo, whi = case[-1]
    variant = choose_variant(spec.act_max, spec.w_min, spec.w_max, True, spec.shape.kernel, spec.shape.c8, avx512=True)
    assert variant == ("int16" if whi - wlo > 255 else "vnni512")
    y = _run_fused(spec, variant, x, s, z, w, ws)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("bits, signed, w_range", [(4, True, (-7, 7)), (8, False, (-60, 195)), (8, True, (-127, 127))])
def test_fused_vnni512_transposed_dequantize(bits, signed, w_range):
    """Widths and channel counts divisible by 16 take the 16 x 16 transposing dequantize, whose
    code depends on the grid offset (8 / 0 / 128 here); per-sample scales and zero points."""
    n, c, o, h, w_ = 2, 64, 32, 3, 32
    rng = np.random.default_rng(bits + w_range[1])
    wlo, whi = w_range
    w = rng.integers(wlo, whi + 1, (o, c, 3, 3))
    w.flat[0], w.flat[1] = wlo, whi
    shape = Conv2dShape(n, c, o, h, w_, 3, 1, 1)
    spec = QConvSpec(shape, bits, signed, wlo, whi)
    s = rng.uniform(0.01, 0.05, n).astype(np.float32)
    z = (np.zeros(n) if signed else rng.integers(0, 2**bits, n)).astype(np.float32)
    x = rng.normal(0, 1, (n, c, h, w_)).astype(np.float32)
    x.flat[0], x.flat[-1] = 1e3, -1e3
    ws = rng.uniform(0.001, 0.01, o).astype(np.float32)
    lo, hi = spec.q_range
    want = _reference(x, s, z, w, ws, lo, hi, 1, 1)
    y = _run_fused(spec, "vnni512", x, s, z, w, ws)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
