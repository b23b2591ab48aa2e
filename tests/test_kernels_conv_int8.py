"""AVX2 integer conv kernels (refqsr_engine.kernels): exactness vs torch float64 conv, saturation
worst cases, packed layouts, and that the built code really uses the integer SIMD instructions."""

import numpy as np
import pytest
import torch
from refqsr_engine.kernels import host_cpu, layouts
from refqsr_engine.kernels.conv_int8_avx2 import (
    build_conv2d_int8,
    build_conv2d_lowbit,
    host_has_vnni,
    int8_is_exact,
    lowbit_chunk_steps,
    pack_activations,
    pack_weights,
    unpack_output,
    zero_point_correction,
)


def reference(x, w, zero_point=0):
    """sum (x - zp) * w with zero padding of (x - zp), i.e. padding x with zp: float64 torch conv."""
    xf = torch.from_numpy(np.asarray(x, dtype=np.float64) - zero_point)
    wf = torch.from_numpy(np.asarray(w, dtype=np.float64))
    return torch.nn.functional.conv2d(xf, wf, padding=w.shape[-1] // 2).numpy().astype(np.int64)


def raw_reference(x, w, zero_point):
    """What the kernel returns: sum x * w over the window, the border padded with zero_point."""
    return reference(x, w, zero_point) + zero_point_correction(w, zero_point)[None, :, None, None]


def run_raw(kernel, x, w, zero_point=0, check=True):
    """Raw kernel sums (zero point not removed), NCHW."""
    a = kernel.pack_activations(x, zero_point)
    y = kernel(a, kernel.pack_weights(w), check=check)
    return unpack_output(y, w.shape[0])


_CACHE = {}


def kernel(*shape, variant="int8", **kw):
    key = (shape, variant, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = build_conv2d_int8(*shape, variant=variant, **kw)
    return _CACHE[key]


# ----------------------------------------------------------------------------------------------
# layouts and bounds (numpy only)


def test_pack_layout_facts():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 16, 5, 7))
    a = pack_activations(x, zero_point=9)
    assert a.shape == (2, 2, 7, 9, 8) and a.dtype == np.uint8
    assert a[1, 1, 3, 4, 5] == x[1, 13, 2, 3]  # [n][c/8][h+1][w+1][c%8]
    assert np.all(a[:, :, 0] == 9) and np.all(a[:, :, :, -1] == 9)  # border = zero point
    np.testing.assert_array_equal(layouts.unpack_activations(a, 16), x)

    w = rng.integers(-128, 128, (24, 16, 3, 3))
    p = pack_weights(w)
    assert p.shape == (3, 2, 3, 3, 2, 8, 4) and p.dtype == np.int8
    # [o/8][i/8][kh][kw][(i%8)//4][o%8][i%4]: one 32-byte tile = 8 outputs x 4 inputs
    assert p[2, 1, 0, 2, 1, 3, 2] == w[2 * 8 + 3, 8 + 4 + 2, 0, 2]
    np.testing.assert_array_equal(layouts.unpack_weights(p, 24, 16), w)
    p16 = pack_weights(w, group=2)
    assert p16.shape == (3, 2, 3, 3, 4, 8, 2) and p16.dtype == np.int16
    np.testing.assert_array_equal(layouts.unpack_weights(p16, 24, 16), w)

    # channel counts that are not multiples of 8 are zero-padded
    assert pack_activations(x[:, :3]).shape == (2, 1, 7, 9, 8)
    assert np.all(pack_weights(w[:5, :3])[:, :, :, :, :, 5:] == 0)
    y = np.arange(2 * 2 * 3 * 4 * 8).reshape(2, 2, 3, 4, 8)
    assert unpack_output(y, 13).shape == (2, 13, 3, 4) and unpack_output(y)[1, 9, 2, 3] == y[1, 1, 2, 3, 1]

    with pytest.raises(ValueError):
        pack_activations(x + 1)  # 256 does not fit u8
    with pytest.raises(ValueError):
        pack_weights(w * 2)


def test_saturation_bounds():
    assert int8_is_exact(127, -128, 127)  # u7 x s8: pair sums in [-32512, 32258]
    assert int8_is_exact(255, -64, 63)  # u8 x s7: pair sums in [-32640, 32130]
    assert not int8_is_exact(255, -128, 127)  # u8 x s8: 2*255*-128 = -65280
    assert int8_is_exact(128, -128, 127) and not int8_is_exact(129, -128, 127)  # -32768 fits
    assert layouts.madd_pair_range(255, -128, 127) == (-65280, 64770)
    assert lowbit_chunk_steps(15, -8, 7) == 136  # u4 x s4: 240 per pair sum
    assert lowbit_chunk_steps(15, -32, 31) == 34  # u4 x s6
    with pytest.raises(ValueError, match="saturate"):
        build_conv2d_int8(1, 8, 8, 4, 4, act_max=255, w_min=-128, w_max=127)


# ----------------------------------------------------------------------------------------------
# int8 (vpmaddubsw) kernel


@pytest.mark.parametrize(
    "shape",
    [(2, 64, 64, 12, 12), (1, 64, 64, 7, 13), (2, 3, 64, 6, 10), (1, 64, 3, 5, 8), (1, 16, 24, 5, 5, 1)],
    ids=["n2-64to64-12x12", "odd-width-7x13", "3to64", "64to3", "1x1"],
)
def test_int8_matches_reference(shape):
    k = kernel(*shape)
    n, c, o, h, w = shape[:5]
    ks = shape[5] if len(shape) > 5 else 3
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 128, (n, c, h, w))
    wt = rng.integers(-128, 128, (o, c, ks, ks))
    zp = 37
    np.testing.assert_array_equal(run_raw(k, x, wt, zp), raw_reference(x, wt, zp))
    np.testing.assert_array_equal(k.conv_nchw(x, wt, zp), reference(x, wt, zp))


def test_int8_worst_case_u7_activations():
    """All activations at 127 against weights at -128 / 127 (and alternating): every vpmaddubsw
    pair sum is at its extreme (-32512 / 32258) and the result is still exact."""
    k = kernel(2, 64, 64, 12, 12)
    x = np.full((2, 64, 12, 12), 127)
    patterns = [np.full((64, 64, 3, 3), -128), np.full((64, 64, 3, 3), 127)]
    alt = np.where((np.arange(64)[:, None] + np.arange(64)[None, :]) % 2, 127, -128)
    patterns.append(np.broadcast_to(alt[:, :, None, None], (64, 64, 3, 3)).copy())
    for wt in patterns:
        for zp in (0, 127):  # zp 127: the padded border is at the maximum too
            np.testing.assert_array_equal(run_raw(k, x, wt, zp), raw_reference(x, wt, zp))


def test_int8_worst_case_s7_weights():
    """The other reduce-range choice: full u8 activations (255) x 7-bit weights (-64 / 63)."""
    k = kernel(1, 64, 64, 6, 8, act_max=255, w_min=-64, w_max=63)
    x = np.full((1, 64, 6, 8), 255)
    for v in (-64, 63):
        wt = np.full((64, 64, 3, 3), v)
        np.testing.assert_array_equal(run_raw(k, x, wt, 255), raw_reference(x, wt, 255))


def test_int8_saturation_is_real_and_guarded():
    """u8 x s8 at the extremes does saturate in vpmaddubsw: the kernel refuses such inputs, and
    forcing them through gives a wrong sum (so the worst-case tests above can fail)."""
    k = kernel(2, 64, 64, 12, 12)
    x = np.full((2, 64, 12, 12), 255)
    wt = np.full((64, 64, 3, 3), -128)
    with pytest.raises(ValueError, match="activations <= 127"):
        run_raw(k, x, wt, 255)
    forced = run_raw(k, x, wt, 255, check=False)
    exact = raw_reference(x, wt, 255)  # every pair sum -65280, saturated to -32768
    assert np.all(forced > exact) and np.all(forced == exact // 65280 * 32768)


@pytest.mark.parametrize("act_max,w_min,w_max", [(127, -64, 63), (255, -32, 31), (63, -128, 127)])
def test_int8pair_exact_at_its_bounds(act_max, w_min, w_max):
    """Two vpmaddubsw pair sums added in int16: worst case 4 * act_max * |w| (<= 32640)."""
    k = kernel(1, 64, 64, 5, 7, variant="int8pair", act_max=act_max, w_min=w_min, w_max=w_max)
    x = np.full((1, 64, 5, 7), act_max)
    for v in (w_min, w_max):
        wt = np.full((64, 64, 3, 3), v)
        np.testing.assert_array_equal(run_raw(k, x, wt, act_max), raw_reference(x, wt, act_max))
    rng = np.random.default_rng(act_max)
    x = rng.integers(0, act_max + 1, (1, 64, 5, 7))
    wt = rng.integers(w_min, w_max + 1, (64, 64, 3, 3))
    np.testing.assert_array_equal(k.conv_nchw(x, wt, act_max // 2), reference(x, wt, act_max // 2))
    with pytest.raises(ValueError, match="int8pair"):
        build_conv2d_int8(1, 8, 8, 4, 4, variant="int8pair", act_max=127, w_min=-128, w_max=127)


def test_int16_variant_exact_full_range():
    k = kernel(1, 64, 64, 6, 9, variant="int16")
    assert k.tile == (1, 8)  # odd width: no 2-pixel tile, 1 pixel x 8 channel groups
    assert kernel(2, 64, 64, 12, 12, variant="int16").tile == (2, 4) and kernel(2, 64, 64, 12, 12).tile == (1, 8)
    x = np.full((1, 64, 6, 9), 255)
    for wt in (np.full((64, 64, 3, 3), -128), np.full((64, 64, 3, 3), 127)):
        np.testing.assert_array_equal(run_raw(k, x, wt, 255), raw_reference(x, wt, 255))
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (1, 64, 6, 9))
    wt = rng.integers(-128, 128, (64, 64, 3, 3))
    np.testing.assert_array_equal(k.conv_nchw(x, wt, 200), reference(x, wt, 200))


# ----------------------------------------------------------------------------------------------
# low-bit (int16 accumulation) kernel


def test_lowbit_u4s4_random_and_worst_case():
    k = build_conv2d_lowbit(2, 64, 64, 12, 12)  # u4 x s4
    assert k.chunk_groups == 4  # 4 groups x 9 taps x 2 halves = 72 <= 136 int16 steps
    rng = np.random.default_rng(4)
    x = rng.integers(0, 16, (2, 64, 12, 12))
    wt = rng.integers(-8, 8, (64, 64, 3, 3))
    np.testing.assert_array_equal(k.conv_nchw(x, wt, 8), reference(x, wt, 8))
    x = np.full((2, 64, 12, 12), 15)
    for v in (-8, 7):
        wt = np.full((64, 64, 3, 3), v)
        np.testing.assert_array_equal(run_raw(k, x, wt, 15), raw_reference(x, wt, 15))


def test_lowbit_s6_weights_odd_width():
    k = build_conv2d_lowbit(1, 64, 64, 5, 11, act_max=15, w_min=-32, w_max=31)
    assert k.chunk_groups == 1  # 18 steps <= 34
    x = np.full((1, 64, 5, 11), 15)
    for v in (-32, 31):
        wt = np.full((64, 64, 3, 3), v)
        np.testing.assert_array_equal(run_raw(k, x, wt, 15), raw_reference(x, wt, 15))
    with pytest.raises(ValueError):
        k(k.pack_activations(np.full((1, 64, 5, 11), 16)), k.pack_weights(wt))


@pytest.mark.skipif(not host_has_vnni(), reason="CPU without AVX-VNNI / AVX512-VNNI+VL")
def test_vnni_variant_exact_full_range():
    """Optional non-AVX2 variant (vpdpbusd): 256-bit code for Sapphire Rapids, and exact for the
    full u8 x s8 range when built for this host and run. Only the host build runs: "sapphirerapids"
    emits the VEX form (AVX-VNNI), which CPUs with only AVX512-VNNI + VL (AMD Zen 4) lack; for
    them LLVM emits the EVEX form of the same instruction."""
    spr = build_conv2d_int8(
        1, 64, 64, 6, 8, variant="vnni", target={"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
    )
    assert "vpdpbusd" in spr.asm() and "%zmm" not in spr.asm()
    k = build_conv2d_int8(
        1, 64, 64, 6, 8, variant="vnni", target={"kind": "llvm", "mcpu": host_cpu.host_mcpu(), "num-cores": 2}
    )
    assert "vpdpbusd" in k.asm()
    x = np.full((1, 64, 6, 8), 255)
    for v in (-128, 127):
        wt = np.full((64, 64, 3, 3), v)
        np.testing.assert_array_equal(run_raw(k, x, wt, 255), raw_reference(x, wt, 255))


# ----------------------------------------------------------------------------------------------
# generated code


def test_generated_code_uses_integer_simd():
    asm = kernel(2, 64, 64, 12, 12).asm()
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm and "vpbroadcastd" in asm
    assert "%ymm" in asm and "%zmm" not in asm  # AVX2 only
    ir = kernel(2, 64, 64, 12, 12).llvm_ir()
    assert "llvm.x86.avx2.pmadd.ub.sw" in ir and "llvm.x86.avx2.pmadd.wd" in ir

    pair = kernel(1, 64, 64, 5, 7, variant="int8pair", act_max=127, w_min=-64, w_max=63).asm()
    assert pair.count("vpmaddubsw") == 2 * pair.count("vpmaddwd") and "vpaddw" in pair

    asm16 = kernel(1, 64, 64, 6, 9, variant="int16").asm()
    assert "vpmaddwd" in asm16 and "vpmaddubsw" not in asm16

    lb = build_conv2d_lowbit(1, 64, 64, 4, 4).asm()
    assert "vpmaddubsw" in lb and "vpaddw" in lb and "vpmaddwd" in lb
