"""CUDA integer conv kernels (refqsr_engine.kernels.conv2d_cuda): packing, the LLVM twins and the
numpy replay of the s4 tensor-core kernel (bit-exact vs torch), the nvcc builds' PTX (dp4a, s4
mma), and -- only where a GPU exists -- the kernels themselves."""

import re

import numpy as np
import pytest
from refqsr_engine.kernels import conv2d_cuda as cc
from refqsr_engine.kernels import cuda_toolchain

HAS_NVCC = cuda_toolchain.nvcc_available()
HAS_GPU = cuda_toolchain.has_cuda_device()
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not on PATH: CUDA kernels cannot be built")
gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device (the kernels are only built and inspected)")

SMALL = {32: cc.Conv2dCudaShape(2, 32, 32, 12, 12), 64: cc.Conv2dCudaShape(2, 64, 64, 12, 12)}
PRODUCTION = cc.Conv2dCudaShape(1, 64, 64, 96, 96)


def ranges(variant, signed):
    """(activation lo, hi, weight lo, hi) of a variant."""
    bits = 8 if variant == "dp4a" else 4
    act = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return (*act, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def operands(shape, variant, signed, seed=0):
    """Random NCHW activations / OIHW weights with worst cases built in: batch 0 at the largest
    activation magnitude, half of the filters at the most negative weight, the rest random."""
    a_lo, a_hi, w_lo, w_hi = ranges(variant, signed)
    rng = np.random.default_rng(seed)
    x = rng.integers(a_lo, a_hi + 1, (shape.batch, shape.in_ch, shape.height, shape.width))
    w = rng.integers(w_lo, w_hi + 1, (shape.out_ch, shape.in_ch, shape.kernel, shape.kernel))
    x[0] = a_lo if signed else a_hi
    w[: shape.out_ch // 2] = w_lo
    return x, w, (a_lo if signed else a_hi)  # the border gets the extreme value too


def reference_conv(x, w, pad_value: int = 0) -> np.ndarray:
    """What the kernels compute, NCHW int64: ``sum x * w`` over the window, the border = ``pad_value``
    (float64 torch conv of the padded tensor: exact below 2**53)."""
    import torch

    x, w = np.asarray(x, dtype=np.int64), np.asarray(w, dtype=np.int64)
    p = w.shape[-1] // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=int(pad_value))
    out = torch.nn.functional.conv2d(torch.from_numpy(xp.astype(np.float64)), torch.from_numpy(w.astype(np.float64)))
    return out.numpy().astype(np.int64)


def pack(variant, x, w, pad, signed):
    if variant == "dp4a":
        return cc.pack_activations_dp4a(x, pad, signed=signed), cc.pack_weights_dp4a(w)
    return cc.pack_activations_s4(x, pad, signed=signed), cc.pack_weights_s4(w)


# ----------------------------------------------------------------------------------------------
# packing


def test_nibble_packing_worst_case_values_exact():
    u = np.array([[0, 15, 15, 0, 1, 14, 8, 7]])
    assert cc.pack_nibbles(u, signed=False)[0, 0] == 0x78E10FF0  # element i in bits 4i..4i+3
    s = np.array([[-8, 7, 0, -1, 1, -8, 7, 0]])
    words = cc.pack_nibbles(s, signed=True)
    assert words.dtype == np.uint32 and words[0, 0] == 0x0781F078
    np.testing.assert_array_equal(cc.unpack_nibbles(words, signed=True), s)
    np.testing.assert_array_equal(cc.unpack_nibbles(cc.pack_nibbles(u, False), signed=False), u)
    for bad, signed in ((16, False), (-1, False), (8, True), (-9, True)):
        with pytest.raises(ValueError):
            cc.pack_nibbles(np.full((1, 8), bad), signed)


@pytest.mark.parametrize("signed", [False, True])
def test_dp4a_packing_roundtrip_and_layout(signed):
    s = SMALL[32]
    x, w, pad = operands(s, "dp4a", signed, seed=1)
    a = cc.pack_activations_dp4a(x, pad, signed=signed)
    assert a.shape == s.act_shape("dp4a") and a.dtype == (np.int8 if signed else np.uint8)
    assert a[1, 13 // 4, 3 + 1, 5 + 1, 13 % 4] == x[1, 13, 3, 5]  # [n][c/4][h+1][w+1][c%4]
    assert np.all(a[:, :, 0] == pad) and np.all(a[:, :, :, -1] == pad)
    np.testing.assert_array_equal(cc.unpack_activations_dp4a(a), x)
    wp = cc.pack_weights_dp4a(w)
    assert wp.shape == s.weight_shape("dp4a") and wp[7, 2, 1, 0, 3] == w[7, 11, 1, 0]
    np.testing.assert_array_equal(cc.unpack_weights_dp4a(wp), w)


@pytest.mark.parametrize("signed", [False, True])
def test_s4_packing_roundtrip_and_layout(signed):
    s = SMALL[32]
    x, w, pad = operands(s, "s4mma", signed, seed=2)
    a = cc.pack_activations_s4(x, pad, signed=signed)
    assert a.shape == s.act_shape("s4mma") and a.dtype == np.uint32
    word = int(a[1, 3 + 1, 5 + 1, 13 // 8])  # [n][h+1][w+1][c/8], channel c in nibble c % 8
    nib = (word >> (4 * (13 % 8))) & 0xF
    assert (nib - 16 if signed and nib >= 8 else nib) == x[1, 13, 3, 5]
    np.testing.assert_array_equal(cc.unpack_activations_s4(a, signed=signed), x)
    assert np.all(cc.unpack_nibbles(a[:, 0], signed) == pad)
    wp = cc.pack_weights_s4(w)
    assert wp.shape == s.weight_shape("s4mma")
    np.testing.assert_array_equal(cc.unpack_weights_s4(wp), w)


def test_shape_and_arch_checks():
    with pytest.raises(ValueError, match="in_ch % 32"):
        cc.Conv2dCudaShape(1, 48, 64, 8, 8).check("s4mma")
    with pytest.raises(ValueError, match="N\\*H\\*W % 16"):
        cc.Conv2dCudaShape(1, 32, 32, 5, 5).check("s4mma")
    with pytest.raises(ValueError, match="multiples of 4"):
        cc.Conv2dCudaShape(1, 6, 8, 8, 8).check("dp4a")
    with pytest.raises(ValueError, match="arch"):
        cuda_toolchain.cuda_target("sm_75")
    assert str(cuda_toolchain.cuda_target("sm_86").attrs["arch"]) == "sm_86"
    # one 32-channel chunk count per parity: k64 needs an even number of chunks (C % 64 == 0)
    assert cc.s4mma_config(SMALL[32]).mma_shape == "m16n8k32"
    assert cc.s4mma_config(SMALL[64]).mma_shape == "m16n8k64"


# ----------------------------------------------------------------------------------------------
# CPU: LLVM twins and the replay of the s4 kernel, bit-exact vs torch float64


@pytest.mark.parametrize("variant", cc.VARIANTS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("channels", [32, 64])
def test_llvm_twin_matches_reference(variant, signed, channels):
    s = SMALL[channels]
    x, w, pad = operands(s, variant, signed, seed=channels + signed)
    a, wp = pack(variant, x, w, pad, signed)
    y = cc.build_conv2d_twin(s, variant, signed)(a, wp)
    assert y.shape == s.out_shape(variant) and y.dtype == np.int32
    np.testing.assert_array_equal(cc.unpack_output(y, variant), reference_conv(x, w, pad))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("channels", [32, 64])
def test_s4mma_fragment_math_matches_reference(signed, channels):
    """The CUDA kernel's warp tiling and fragment addressing, replayed with the PTX ISA layouts."""
    s = SMALL[channels]
    x, w, pad = operands(s, "s4mma", signed, seed=10 + channels)
    a, wp = pack("s4mma", x, w, pad, signed)
    y = cc.emulate_s4mma(s, a, wp, signed)
    np.testing.assert_array_equal(cc.unpack_output(y, "s4mma"), reference_conv(x, w, pad))


def test_s4mma_replay_detects_a_wrong_fragment_mapping(monkeypatch):
    """Negative control: swapping the two accumulator columns of a lane must be caught."""
    s = SMALL[32]
    x, w, pad = operands(s, "s4mma", False, seed=3)
    a, wp = pack("s4mma", x, w, pad, False)
    right = cc._c_index
    monkeypatch.setattr(cc, "_c_index", lambda shape, m0, o0, lane, reg: right(shape, m0, o0, lane, reg ^ 1))
    y = cc.emulate_s4mma(s, a, wp)
    assert not np.array_equal(cc.unpack_output(y, "s4mma"), reference_conv(x, w, pad))


# ----------------------------------------------------------------------------------------------
# nvcc builds (no GPU needed)

BUILDS = {
    "dp4a_u8": (PRODUCTION, "dp4a", False, "dp4a.u32.s32"),
    "dp4a_s8": (SMALL[32], "dp4a", True, "dp4a.s32.s32"),
    "s4_u4": (PRODUCTION, "s4mma", False, "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32"),
    "s4_s4": (SMALL[32], "s4mma", True, "mma.sync.aligned.m16n8k32.row.col.s32.s4.s4.s32"),
}


@pytest.fixture(scope="module")
def cuda_kernels():
    if not HAS_NVCC:
        pytest.skip("nvcc is not on PATH: CUDA kernels cannot be built")
    return {
        name: cc.build_conv2d_cuda(shape, variant, "sm_80", signed)
        for name, (shape, variant, signed, _) in BUILDS.items()
    }


@needs_nvcc
def test_build_env_registers_cuda_runtime():
    import tvm_ffi

    cuda_toolchain.ensure_cuda_build_env()
    cuda_toolchain.ensure_cuda_build_env()  # idempotent
    assert tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None
    if not HAS_GPU:
        assert not cuda_toolchain.has_cuda_device()  # the stub never passes for a driver


@needs_nvcc
@pytest.mark.parametrize("name", list(BUILDS))
def test_cuda_build_emits_integer_instructions(cuda_kernels, name):
    _, variant, _, instruction = BUILDS[name]
    k = cuda_kernels[name]
    ptx = k.device_code
    assert instruction in ptx
    ops = re.findall(r"\b(dp4a|mma\.sync)\b", ptx)
    assert ops and set(ops) == {"dp4a" if variant == "dp4a" else "mma.sync"}
    assert ".target sm_80" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx  # accumulators and fragments stay in registers
    info = cuda_toolchain.build_info(k.executable)
    assert info.binary and 0 < k.build_seconds < 120
    assert "threadIdx.x" in k.prim_func.script()  # the scheduled PrimFunc for R.call_tir


@needs_nvcc
def test_scheduled_prim_funcs_build_inside_relax_call_tir():
    import tvm
    from tvm import relax

    s = SMALL[32]
    bb = relax.BlockBuilder()
    a8 = relax.Var("a8", relax.TensorType(s.act_shape("dp4a"), "uint8"))
    w8 = relax.Var("w8", relax.TensorType(s.weight_shape("dp4a"), "int8"))
    a4 = relax.Var("a4", relax.TensorType(s.act_shape("s4mma"), "uint32"))
    w4 = relax.Var("w4", relax.TensorType(s.weight_shape("s4mma"), "uint32"))
    with bb.function("main", [a8, w8, a4, w4]):
        outs = []
        for variant, make, args in (
            ("dp4a", cc.conv2d_dp4a_primfunc, [a8, w8]),
            ("s4mma", cc.conv2d_s4mma_primfunc, [a4, w4]),
        ):
            gv = bb.add_func(make(s), f"conv2d_{variant}")
            outs.append(bb.emit(relax.call_tir(gv, args, relax.TensorType(s.out_shape(variant), "int32"))))
        bb.emit_func_output(relax.Tuple(outs))
    exe = cuda_toolchain.build_cuda(bb.get(), "sm_80")
    ptx = cuda_toolchain.device_code(exe, sass=False)
    assert "dp4a.u32.s32" in ptx and "mma.sync.aligned.m16n8k32.row.col.s32.u4.s4.s32" in ptx
    assert isinstance(exe, tvm.runtime.Executable)


# ----------------------------------------------------------------------------------------------
# GPU: the kernels themselves


@gpu
@pytest.mark.parametrize("name", list(BUILDS))
def test_cuda_kernel_matches_twin_and_reference(cuda_kernels, name):
    shape, variant, signed, _ = BUILDS[name]
    k = cuda_kernels[name]
    x, w, pad = operands(shape, variant, signed, seed=7)
    a, wp = k.pack_activations(x, pad), k.pack_weights(w)
    y = k(a, wp)
    np.testing.assert_array_equal(k.unpack_output(y), reference_conv(x, w, pad))
    if shape.height <= 24:  # the twin is a plain loop nest: only for the small shapes
        np.testing.assert_array_equal(y, cc.build_conv2d_twin(shape, variant, signed)(a, wp))
