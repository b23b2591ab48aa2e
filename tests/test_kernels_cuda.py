"""CUDA conv kernels (refqsr_engine.kernels.conv2d_cuda): packing, the LLVM twins and the numpy
replay of the tensor-core kernels (integer: bit-exact vs torch; fp16: vs a numpy fp16-in,
fp32-accumulate conv), the nvcc builds' PTX and SASS (dp4a, s4 / s8 / f16 mma), and -- only where
a GPU exists -- the kernels themselves."""

import re

import numpy as np
import pytest
from refqsr_engine.kernels import conv2d_cuda as cc
from refqsr_engine.kernels import cuda_toolchain

HAS_NVCC = cuda_toolchain.nvcc_available()
HAS_GPU = cuda_toolchain.has_cuda_device()
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not on PATH: CUDA kernels cannot be built")
gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device (the kernels are only built and inspected)")

SMALL = {
    16: cc.Conv2dCudaShape(2, 16, 16, 12, 12),
    32: cc.Conv2dCudaShape(2, 32, 32, 12, 12),
    64: cc.Conv2dCudaShape(2, 64, 64, 12, 12),
}
PRODUCTION = cc.Conv2dCudaShape(1, 64, 64, 96, 96)
INTEGER_VARIANTS = tuple(v for v in cc.VARIANTS if v not in cc.FLOAT_VARIANTS)


def ranges(variant, signed):
    """(activation lo, hi, weight lo, hi) of a variant."""
    bits = 4 if variant == "s4mma" else 8
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
    return cc.pack_activations(variant, x, pad, signed=signed), cc.pack_weights(variant, w)


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


@pytest.mark.parametrize("variant", INTEGER_VARIANTS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("channels", [32, 64])
def test_llvm_twin_matches_reference(variant, signed, channels):
    s = SMALL[channels]
    x, w, pad = operands(s, variant, signed, seed=channels + signed)
    a, wp = pack(variant, x, w, pad, signed)
    y = cc.build_conv2d_twin(s, variant, signed)(a, wp)
    assert y.shape == s.out_shape(variant) and y.dtype == np.int32
    np.testing.assert_array_equal(cc.unpack_output(y, variant), reference_conv(x, w, pad))


MMA_CASES = [("s4mma", 32), ("s4mma", 64), ("s8mma", 16), ("s8mma", 32), ("s8mma", 64)]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("variant, channels", MMA_CASES)
def test_mma_fragment_math_matches_reference(variant, signed, channels):
    """The CUDA kernel's warp tiling and fragment addressing, replayed with the PTX ISA layouts
    (s8: m16n8k16 for 16 channels, m16n8k32 otherwise)."""
    s = SMALL[channels]
    x, w, pad = operands(s, variant, signed, seed=10 + channels)
    a, wp = pack(variant, x, w, pad, signed)
    y = cc.emulate_mma(s, a, wp, signed, variant)
    np.testing.assert_array_equal(cc.unpack_output(y, variant), reference_conv(x, w, pad))


def test_s8_packing_roundtrip_and_layout():
    s = SMALL[32]
    x, w, pad = operands(s, "s8mma", False, seed=4)
    a = cc.pack_activations_s8(x, pad)
    assert a.shape == s.act_shape("s8mma") == (2, 14, 14, 8) and a.dtype == np.uint32
    word = int(a[1, 3 + 1, 5 + 1, 13 // 4])  # [n][h+1][w+1][c/4], channel c in byte c % 4
    assert (word >> (8 * (13 % 4))) & 0xFF == x[1, 13, 3, 5]
    np.testing.assert_array_equal(cc.unpack_activations_s8(a), x)
    wp = cc.pack_weights_s8(w)
    assert wp.shape == s.weight_shape("s8mma") == (32, 9, 8)
    np.testing.assert_array_equal(cc.unpack_weights_s8(wp), w)
    # the byte order of an int8 [..][4] array read as little-endian uint32
    v = np.array([[-128, 127, -1, 5]])
    assert cc.pack_bytes(v, signed=True)[0, 0] == np.array([-128, 127, -1, 5], np.int8).view("<u4")[0]
    with pytest.raises(ValueError):
        cc.pack_bytes(np.array([[128, 0, 0, 0]]), signed=True)


def test_s8mma_replay_detects_a_wrong_fragment_mapping(monkeypatch):
    """Negative controls for the s8 replay: the K halves of the A fragment, the shared-memory
    rows of the staged words (rows 2i and 2i+1 exchanged), the accumulator columns, and the ISA
    layout read with the s4 geometry (8 elements a register where s8 has 4) must each change the
    result."""
    s = SMALL[32]
    x, w, pad = operands(s, "s8mma", False, seed=5)
    a, wp = pack("s8mma", x, w, pad, False)
    want = reference_conv(x, w, pad)
    np.testing.assert_array_equal(cc.unpack_output(cc.emulate_s8mma(s, a, wp), "s8mma"), want)
    cfg = cc.s8mma_config(s)
    wrong = {
        "_a_frag": lambda right: lambda cfg, wm, mi, lane, reg: right(cfg, wm, mi, lane, reg ^ 2),
        "_stage_dst": lambda right: lambda cfg, idx: right(cfg, (idx // cfg.kw ^ 1) * cfg.kw + idx % cfg.kw),
        "_c_index": lambda right: lambda shape, m0, o0, lane, reg: right(shape, m0, o0, lane, reg ^ 1),
        "_unpack_words": lambda right: lambda words, bits, signed: cc.unpack_nibbles(words, signed)[..., :4],
    }
    assert cfg.stride == 12 and cfg.kw == 8  # m16n8k32: two 16-channel chunks a step
    for name, make in wrong.items():
        right = getattr(cc, name)
        monkeypatch.setattr(cc, name, make(right))
        got = cc.unpack_output(cc.emulate_s8mma(s, a, wp), "s8mma")
        monkeypatch.setattr(cc, name, right)
        assert not np.array_equal(got, want), name


def _fragment_reads(frag, cfg, warps: int, tiles: int, regs: int) -> set[int]:
    """Every shared-memory word the fragment loads of all warps, tiles, lanes and registers read."""
    lane = np.arange(32)
    return {int(o) for w in range(warps) for t in range(tiles) for r in range(regs) for o in frag(cfg, w, t, lane, r)}


def test_mma_staging_covers_every_word_once():
    """Each step's A and B tiles land in shared memory word for word: the threads' copies (the
    guarded last pass included) reach every row and word of the tile exactly once, within one
    buffer, and the fragment reads stay inside the rows that were written."""
    for variant, shape in (("s8mma", SMALL[32]), ("s8mma", SMALL[16]), ("s4mma", SMALL[64]), ("s8mma", PRODUCTION)):
        cfg = cc.mma_config(shape, variant)
        for total, loads, rows in ((cfg.bm * cfg.kw, cfg.a_loads, cfg.bm), (cfg.bn * cfg.kw, cfg.b_loads, cfg.bn)):
            idx = np.arange(loads * cfg.threads)
            idx = idx[idx < total]
            dst = cc._stage_dst(cfg, idx)
            assert len(np.unique(dst)) == total and dst.max() < rows * cfg.stride
        lane = np.arange(32)
        a_rd = _fragment_reads(cc._a_frag, cfg, cfg.bp, cfg.mt, cfg.a_regs)
        b_rd = _fragment_reads(cc._b_frag, cfg, cfg.bg, cfg.nt, cfg.b_regs)
        all_a = np.arange(cfg.bm * cfg.kw)
        all_b = np.arange(cfg.bn * cfg.kw)
        assert a_rd == set(cc._stage_dst(cfg, all_a).tolist()) and b_rd == set(cc._stage_dst(cfg, all_b).tolist())
        # fragment loads of one register: 32 lanes in 32 distinct banks (no bank conflicts)
        assert len({int(o) % 32 for o in cc._a_frag(cfg, 0, 0, lane, 0)}) == 32
        assert len({int(o) % 32 for o in cc._b_frag(cfg, 0, 0, lane, 0)}) == 32


# ----------------------------------------------------------------------------------------------
# nvcc builds (no GPU needed)

BUILDS = {
    "dp4a_u8": (PRODUCTION, "dp4a", False, "dp4a.u32.s32"),
    "dp4a_s8": (SMALL[32], "dp4a", True, "dp4a.s32.s32"),
    "s4_u4": (PRODUCTION, "s4mma", False, "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32"),
    "s4_s4": (SMALL[32], "s4mma", True, "mma.sync.aligned.m16n8k32.row.col.s32.s4.s4.s32"),
    "s8_u8": (PRODUCTION, "s8mma", False, "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32"),
    "s8_s8": (SMALL[16], "s8mma", True, "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32"),
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


# ----------------------------------------------------------------------------------------------
# CPU: asymmetric weights through the weight shift (what the CUDA rewrite does), vs torch


def window_sums(x, pad_value: int, kernel: int) -> np.ndarray:
    """``[N][1][H][W]``: the sum of the padded activations over every output's K x K x C window."""
    p = kernel // 2
    xp = np.pad(np.asarray(x, np.int64), ((0, 0), (0, 0), (p, p), (p, p)), constant_values=int(pad_value))
    row = xp.sum(axis=1, keepdims=True)
    h, w = x.shape[2], x.shape[3]
    return sum(row[:, :, i : i + h, j : j + w] for i in range(kernel) for j in range(kernel))


@pytest.mark.parametrize(
    "variant, w_lo, w_hi, act_bits",
    [
        ("dp4a", -130, 125, 8),
        ("dp4a", -175, 80, 8),
        ("dp4a", -127, 128, 8),
        ("s8mma", -130, 125, 8),
        ("s4mma", -9, 6, 4),
        ("s4mma", 0, 15, 4),
    ],
)
def test_weight_shift_twin_matches_reference(variant, w_lo, w_hi, act_bits):
    """DDTB's asymmetric weights (w - zero point beyond the kernel's signed range): the kernel
    runs on ``w - c`` and ``c * window sum + u0 * sum w`` is corrected outside, as in the CUDA
    graph; the result must equal torch's float64 conv of the zero-point-free operands."""
    from refqsr_engine.engine.compiler import cuda_build as cb

    s = SMALL[32]
    rng = np.random.default_rng(w_lo + 1000)
    u0 = (1 << (act_bits - 1)) + 3  # the activation zero point (border value)
    u = rng.integers(0, 1 << act_bits, (s.batch, s.in_ch, s.height, s.width))
    u[0] = (1 << act_bits) - 1
    w = rng.integers(w_lo, w_hi + 1, (s.out_ch, s.in_ch, s.kernel, s.kernel))
    w[: s.out_ch // 4] = w_lo
    w[s.out_ch // 4 : s.out_ch // 2] = w_hi
    c = cb.cuda_weight_shift(variant, w_lo, w_hi)
    assert c != 0 and cb.why_not_variant(variant, act_bits, w_lo, w_hi, s) is None
    a, wp = pack(variant, u, w - c, u0, False)
    acc = cc.unpack_output(cc.build_conv2d_twin(s, variant, False)(a, wp), variant).astype(np.int64)
    sum_w = w.reshape(s.out_ch, -1).sum(axis=1).reshape(1, -1, 1, 1)
    got = acc + c * window_sums(u, u0, s.kernel) - u0 * sum_w
    np.testing.assert_array_equal(got, reference_conv(u - u0, w, 0))
    with pytest.raises(ValueError):  # unshifted, the weights do not fit the operand
        pack(variant, u, w, u0, False)


# ----------------------------------------------------------------------------------------------
# SASS (cuobjdump, no GPU needed)

HAS_CUOBJDUMP = cuda_toolchain.sass_tools() is not None
needs_sass = pytest.mark.skipif(
    not (HAS_NVCC and HAS_CUOBJDUMP),
    reason="nvcc, cuobjdump or nvdisasm missing (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)",
)


def test_parse_sass_counts_opcodes_per_kernel():
    dump = """
\t\tFunction : conv_a_kernel
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;   /* 0x00000a0000017a02 */
        /*0950*/                   IMMA.16832.U8.S8 R28, R44.ROW, R32.reuse.COL, RZ ;   /* 0x000000202c1c7237 */
        /*0960*/              @!P0 STL [R1], R2 ;   /* 0x0000000201007387 */
        /*0970*/                   LDL.64 R4, [R1] ;   /* 0x0000000001047983 */
\t\tFunction : conv_b_kernel
        /*0000*/                   IDP.4A.U8.S8 R5, R6, R7, R5 ;   /* 0x0000000706057226 */
        /*0010*/               @P1 LDS.128 R8, [R2] ;   /* 0x0000000002087984 */
        /*0020*/                   EXIT ;   /* 0x000000000000794d */
"""
    got = cuda_toolchain.parse_sass(dump)
    assert set(got) == {"conv_a_kernel", "conv_b_kernel"}
    a, b = got["conv_a_kernel"], got["conv_b_kernel"]
    assert (a["IMMA"], a["STL"], a["LDL"], a["total"]) == (1, 1, 1, 4)
    assert (b["IDP"], b["LDS"], b["IMMA"], b["total"]) == (1, 1, 0, 3)


def test_parse_res_usage():
    dump = """
Resource usage:
 Common:
  GLOBAL:0
 Function main_kernel:
  REG:72 STACK:0 SHARED:12272 LOCAL:0 CONSTANT[0]:376 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function other_kernel:
  REG:255 STACK:16 SHARED:0 LOCAL:24 CONSTANT[0]:368 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert cuda_toolchain.parse_res_usage(dump) == {
        "main_kernel": {"registers": 72, "stack_bytes": 0, "shared_bytes": 12272, "local_bytes": 0},
        "other_kernel": {"registers": 255, "stack_bytes": 16, "shared_bytes": 0, "local_bytes": 24},
    }


SASS_CASES = [(v, a) for v in ("s8mma", "s4mma", "dp4a", "f16mma") for a in ("sm_80", "sm_90")]


@needs_sass
@pytest.mark.parametrize("variant, arch", SASS_CASES, ids=[f"{v}-{a}" for v, a in SASS_CASES])
def test_sass_tensor_core_instructions_and_no_spills(variant, arch):
    """Every ``mma.sync`` of the s8 kernel is one ``IMMA`` on sm_80 and sm_90, and of the s4
    kernel on sm_80 (ptxas keeps the step loop, or unrolls it: a multiple of the mma tiles of one
    step); sm_90 has no int4 tensor cores (ptxas emulates ``mma ... .s4``: fewer IMMA than mma
    tiles a step, so the compiler never picks the s4 kernel for sm_90); the f16 kernel's are
    ``HMMA`` (fp32 accumulators) on both; dp4a is ``IDP.4A``. The
    tensor-core kernels stage through shared memory (LDS, STS, BAR); no kernel touches local
    memory (LDL, STL)."""
    k = cc.build_conv2d_cuda(PRODUCTION, variant, arch)
    sass = cuda_toolchain.sass_counts(cuda_toolchain.build_info(k.executable).binary)
    assert sass is not None and len(sass) == 1
    (counts,) = sass.values()
    assert counts["LDL"] == 0 and counts["STL"] == 0
    assert counts["local_bytes"] == counts["stack_bytes"] == 0 and 0 < counts["registers"] <= 255
    if variant == "dp4a":
        assert counts["IDP"] > 0 and counts["IMMA"] == 0
        return
    cfg = cc.mma_config(PRODUCTION, variant)
    tiles = cfg.mt * cfg.nt  # mma.sync per step
    assert counts["IDP"] == 0 and counts["LDS"] > 0 and counts["STS"] > 0 and counts["BAR"] > 0
    # both buffers of the A and B tiles (TVM trims a buffer to its last word read); sm_90 adds
    # the 1 KiB of shared memory it reserves per block
    words = 2 * (cfg.bm + cfg.bn) * cfg.stride
    reserved = 1024 if arch == "sm_90" else 0
    assert 4 * (words - 2 * cfg.stride) + reserved <= counts["shared_bytes"] <= 4 * words + reserved + 64
    mma, other = ("HMMA", "IMMA") if variant == "f16mma" else ("IMMA", "HMMA")
    assert counts[other] == 0
    if variant == "s4mma" and arch == "sm_90":
        assert 0 < counts["IMMA"] < tiles
    else:
        assert counts[mma] % tiles == 0 and tiles <= counts[mma] <= cfg.ksteps * tiles


# ----------------------------------------------------------------------------------------------
# fp16 tensor cores (f16mma): fp16 operands, fp32 sums


F16_SHAPES = {
    "k16": cc.Conv2dCudaShape(2, 16, 16, 12, 12),  # 18 chunks of 8 channels: m16n8k16
    "k8": cc.Conv2dCudaShape(1, 8, 24, 8, 6),  # 9 chunks: m16n8k8
    "kx1": cc.Conv2dCudaShape(1, 16, 32, 8, 10, 3, kernel_w=1),  # a K x 1 kernel (the folded tail)
    "1x1": cc.Conv2dCudaShape(2, 24, 16, 4, 6, 1),  # 3 chunks: m16n8k8
}


def float_operands(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((shape.batch, shape.in_ch, shape.height, shape.width)).astype(np.float32)
    w = rng.standard_normal((shape.out_ch, shape.in_ch, shape.kernel, shape.kw_taps)).astype(np.float32)
    return x, w


def f16_reference(x, w) -> np.ndarray:
    """NCHW float32: operands rounded to fp16 (numpy, round to nearest even), each product exact
    in fp32, summed in fp32 over (kh, kw, c) in that order -- the twin's loop order."""
    x16 = np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
    w16 = np.asarray(w, np.float32).astype(np.float16).astype(np.float32)
    n, c, h, wd = x16.shape
    o, _, kh, kw = w16.shape
    xp = np.pad(x16, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
    acc = np.zeros((n, o, h, wd), np.float32)
    for i in range(kh):
        for j in range(kw):
            for ci in range(c):
                acc += xp[:, ci, None, i : i + h, j : j + wd] * w16[None, :, ci, i, j, None, None]
    return acc


def test_f16_packing_layout_and_rounding():
    words = cc.pack_halves(np.array([[1.0, -2.0]]))
    assert words.dtype == np.uint32 and words[0, 0] == 0xC0003C00  # element i in bits 16i..16i+15
    tie = np.float32(1 + 2**-11)  # halfway between 1 and the next fp16: rounds to even (1.0)
    assert cc.unpack_halves(cc.pack_halves(np.array([tie, 65504.0], np.float32)))[0] == 1.0
    s = F16_SHAPES["kx1"]
    x, w = float_operands(s, 1)
    a = cc.pack_activations_f16(x, s.kernel, s.kernel_w)
    assert a.shape == s.act_shape("f16mma") == (1, 10, 10, 8)  # rows padded by 1, columns not
    word = int(a[0, 3 + 1, 5, 13 // 2])
    assert np.float32(np.uint16(word >> 16).view(np.float16)) == np.float32(np.float16(x[0, 13, 3, 5]))
    wp = cc.pack_weights_f16(w)
    assert wp.shape == s.weight_shape("f16mma") == (32, 3, 8)
    np.testing.assert_array_equal(
        cc.unpack_halves(wp).reshape(32, 3, 16).transpose(0, 2, 1)[..., None], w.astype(np.float16)
    )


@pytest.mark.parametrize("name", list(F16_SHAPES))
def test_f16mma_replay_and_twin_match_fp16_reference(name):
    """The f16 kernel's staging and fragment math replayed with the PTX ISA layouts (e = 2 halves
    a register) against a numpy fp16-in, fp32-accumulate conv (the replay sums each mma in
    float64 first: a different fp32 rounding order, so within 1e-5 of the sum of |products|), and
    the LLVM twin equal to the reference exactly (same fp16 rounding, same fp32 loop order)."""
    s = F16_SHAPES[name]
    x, w = float_operands(s, seed=len(name))
    a, wp = cc.pack_activations_f16(x, s.kernel, s.kernel_w), cc.pack_weights_f16(w)
    want = f16_reference(x, w)
    bound = f16_reference(np.abs(x), np.abs(w))
    cfg = cc.mma_config(s, "f16mma")
    assert cfg.mma_shape == ("m16n8k8" if name in ("k8", "1x1") else "m16n8k16")  # odd / even chunk counts
    got = cc.unpack_output(cc.emulate_f16mma(s, a, wp), "f16mma")
    assert got.dtype == np.float32
    assert np.all(np.abs(got - want) <= 1e-5 * bound + 1e-30)
    twin = cc.build_conv2d_twin(s, "f16mma")(a, wp)
    assert twin.dtype == np.float32
    np.testing.assert_array_equal(cc.unpack_output(twin, "f16mma"), want)


def test_f16mma_replay_detects_a_wrong_fragment_mapping(monkeypatch):
    """Negative controls for the f16 replay: the K halves of the A fragment swapped, the lane
    mapping transposed (row ``lane % 8``, word ``lane // 8`` instead of ``lane // 4``, ``lane % 4``),
    the staged rows exchanged, the accumulator columns swapped and the words read as bytes must
    each move the result far from the reference."""
    s = F16_SHAPES["k16"]
    x, w = float_operands(s, seed=3)
    a, wp = cc.pack_activations_f16(x, s.kernel), cc.pack_weights_f16(w)
    want = f16_reference(x, w)
    cfg = cc.mma_config(s, "f16mma")
    assert cfg.kw == 8 and cfg.stride == 12

    def transposed(right):
        def frag(cfg, wm, mi, lane, reg):
            lane_t = (lane % 8) * 4 + lane // 8
            return right(cfg, wm, mi, lane_t, reg)

        return frag

    wrong = {
        "_a_frag": lambda right: lambda cfg, wm, mi, lane, reg: right(cfg, wm, mi, lane, reg ^ 2),
        "_b_frag": transposed,
        "_stage_dst": lambda right: lambda cfg, idx: right(cfg, (idx // cfg.kw ^ 1) * cfg.kw + idx % cfg.kw),
        "_c_index": lambda right: lambda shape, m0, o0, lane, reg: right(shape, m0, o0, lane, reg ^ 1),
        "_unpack_words": lambda right: lambda words, bits, signed: cc.unpack_bytes(words, signed)[..., :2],
    }
    for name, make in wrong.items():
        right = getattr(cc, name)
        monkeypatch.setattr(cc, name, make(right))
        got = cc.unpack_output(cc.emulate_f16mma(s, a, wp), "f16mma")
        monkeypatch.setattr(cc, name, right)
        assert np.abs(got - want).max() > 0.1, name


F16_BUILDS = {
    "f16_k16": (PRODUCTION, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"),
    "f16_k8": (F16_SHAPES["k8"], "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32"),
}


@needs_nvcc
@pytest.mark.parametrize("name", list(F16_BUILDS))
def test_cuda_build_emits_f16_mma(name):
    shape, instruction = F16_BUILDS[name]
    k = cc.build_conv2d_cuda(shape, "f16mma", "sm_80")
    ptx = k.device_code
    assert instruction in ptx and ".target sm_80" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx
    if HAS_GPU:  # the kernel itself against the numpy reference
        x, w = float_operands(shape, seed=9)
        y = k(k.pack_activations(x), k.pack_weights(w))
        bound = f16_reference(np.abs(x), np.abs(w))
        assert np.all(np.abs(k.unpack_output(y) - f16_reference(x, w)) <= 1e-5 * bound + 1e-30)


def dequant_reference(acc_nchw, rs, rz, cs, cw, ws) -> np.ndarray:
    """The integer epilogue written out: NHWC fp16 of
    ``fp32(acc + ws[n,h,w] - rz[n] * cs[o]) * fp32(rs[n] * cw[o])`` from NCHW int64 sums."""
    acc = np.asarray(acc_nchw, np.int64).transpose(0, 2, 3, 1)
    if ws.size > 1:
        acc = acc + ws.astype(np.int64)[..., None]
    n, o = acc.shape[0], acc.shape[3]
    total = (acc - rz.astype(np.int64)[:, None, None, None] * cs.astype(np.int64)[None, None, None, :]).astype(
        np.float32
    )
    scale = rs.astype(np.float32).reshape(n, 1, 1, 1) * cw.astype(np.float32).reshape(1, 1, 1, o)
    return (total * scale).astype(np.float16)


def epilogue_operands(shape, w, window, seed=1):
    """Per-sample scales / zero points, per-channel weight sums / scales, all distinct, and the
    per-pixel window term (``window``) or its one-element placeholder."""
    rng = np.random.default_rng(seed)
    rs = rng.uniform(1e-3, 2e-2, shape.batch).astype(np.float32)
    rz = rng.integers(0, 9, shape.batch).astype(np.int32)
    cs = np.asarray(w, np.int64).reshape(shape.out_ch, -1).sum(axis=1).astype(np.int32)
    cw = rng.uniform(1e-3, 2e-2, shape.out_ch).astype(np.float32)
    ws = rng.integers(-300, 300, (shape.batch, shape.height, shape.width) if window else (1, 1, 1))
    return rs, rz, cs, cw, ws.astype(np.int32)


@pytest.mark.parametrize("variant, epilogue", [("s4mma", "dequant"), ("s8mma", "dequant"), ("s8mma", "dequant_ws")])
def test_dequant_epilogue_replay_and_twin_match_reference(variant, epilogue):
    """The integer epilogues (scale per sample and per output channel, zero-point term, the
    per-pixel window term of "dequant_ws", fp16 store): the numpy replay of the kernel and the
    LLVM twin against the epilogue written out on torch's integer conv; a replay whose epilogue
    takes the channel scale of the wrong channel (o + 1), or the window term of the wrong pixel,
    differs, so a wrong mapping is caught."""
    from refqsr_engine.kernels.tir_build import build_kernel

    shape = cc.Conv2dCudaShape(2, 32, 16, 4, 8)
    x, w, pad = operands(shape, variant, False)
    a, wp = pack(variant, x, w, pad, False)
    ops = epilogue_operands(shape, w, epilogue == "dequant_ws")
    want = dequant_reference(reference_conv(x, w, pad), *ops)
    assert np.abs(want.astype(np.float32)).max() > 1.0  # values well inside fp16, not all zero
    replay = cc.emulate_mma(shape, a, wp, False, variant, epilogue, ops)
    assert replay.dtype == np.float16 and np.array_equal(replay, want)
    twin = build_kernel(
        "dequant_twin", cc.COMPUTES[variant](shape, False, epilogue=epilogue), 7, target={"kind": "llvm"}
    )
    got = twin(a, wp, *ops)
    got = got.numpy() if hasattr(got, "numpy") else got
    assert got.dtype == np.float16 and np.array_equal(got, want)
    rs, rz, cs, cw, ws = ops
    wrong = cc.emulate_mma(shape, a, wp, False, variant, epilogue, (rs, rz, cs, np.roll(cw, -1), ws))
    assert not np.array_equal(wrong, want)
    if epilogue == "dequant_ws":  # the window term of the wrong pixel (w + 1)
        wrong = cc.emulate_mma(shape, a, wp, False, variant, epilogue, (rs, rz, cs, cw, np.roll(ws, -1, axis=2)))
        assert not np.array_equal(wrong, want)


def relu_bias(shape, seed=2) -> np.ndarray:
    """A per-output-channel bias on both sides of zero, so the ReLU clips part of every channel."""
    return np.random.default_rng(seed).uniform(-0.5, 0.5, shape.out_ch).astype(np.float32)


RELU_CASES = [
    ("s4mma", "dequant_relu"),
    ("s8mma", "dequant_relu"),
    ("s8mma", "dequant_ws_relu"),
    ("s4mma", "dequant_res_relu"),
    ("s8mma", "dequant_ws_res_relu"),
]


@pytest.mark.parametrize("variant, epilogue", RELU_CASES)
def test_dequant_relu_epilogue_replay_and_twin_match_reference(variant, epilogue):
    """The integer epilogues' bias-and-ReLU forms: ``fp16(max(y + b[o] (+ r), 0))`` of the
    dequantized fp32 ``y`` (and an fp16 NHWC residual ``r`` in the "_res_relu" forms), written
    out on torch's integer conv, against the numpy replay and the LLVM twin; the bias of the
    wrong channel (o + 1), or the residual of the wrong pixel, is caught."""
    from refqsr_engine.kernels.tir_build import build_kernel

    shape = cc.Conv2dCudaShape(2, 32, 16, 4, 8)
    x, w, pad = operands(shape, variant, False)
    a, wp = pack(variant, x, w, pad, False)
    ops = epilogue_operands(shape, w, cc.base_epilogue(epilogue) == "dequant_ws")
    bias = relu_bias(shape)
    res = epilogue in cc.RESIDUAL_EPILOGUES
    r = np.random.default_rng(3).uniform(-1, 1, shape.out_shape(variant)).astype(np.float16)
    extra = (bias, r) if res else (bias,)
    y = dequant_reference(reference_conv(x, w, pad), *ops).astype(np.float32)  # fp16 of y: same sign
    want = cc.dequant_epilogue_reference(
        reference_conv(x, w, pad).transpose(0, 2, 3, 1), *ops[:4], ops[4] if ops[4].size > 1 else None, *extra
    )
    assert 0.05 < np.mean(want == 0) < 0.95 and np.abs(y).max() > 1.0  # the ReLU clips some, not all
    replay = cc.emulate_mma(shape, a, wp, False, variant, epilogue, (*ops, *extra))
    assert replay.dtype == np.float16 and np.array_equal(replay, want)
    n_args = 9 if res else 8
    twin = build_kernel(
        "relu_twin", cc.COMPUTES[variant](shape, False, epilogue=epilogue), n_args, target={"kind": "llvm"}
    )
    got = twin(a, wp, *ops, *extra)
    got = got.numpy() if hasattr(got, "numpy") else got
    assert got.dtype == np.float16 and np.array_equal(got, want)
    wrong = cc.emulate_mma(shape, a, wp, False, variant, epilogue, (*ops, np.roll(bias, -1), *extra[1:]))
    assert not np.array_equal(wrong, want)
    if res:  # the residual of the wrong pixel (w + 1)
        wrong = cc.emulate_mma(shape, a, wp, False, variant, epilogue, (*ops, bias, np.roll(r, -1, axis=2)))
        assert not np.array_equal(wrong, want)


def test_f16_relu_epilogue_replay_and_twin_match_reference():
    """f16mma's "f16_relu": ``fp16(max(sum + b[o], 0))`` of the fp32 sums, the twin exactly (same
    loop order as the numpy reference) and the replay within its fp32 summation-order bound."""
    s = F16_SHAPES["k16"]
    x, w = float_operands(s, seed=4)
    a, wp = cc.pack_activations_f16(x, s.kernel, s.kernel_w), cc.pack_weights_f16(w)
    bias = relu_bias(s) * 8
    acc = f16_reference(x, w).transpose(0, 2, 3, 1)
    want = np.maximum(acc + bias, np.float32(0)).astype(np.float16)
    assert 0.05 < np.mean(want == 0) < 0.95
    from refqsr_engine.kernels.tir_build import build_kernel

    twin = build_kernel(
        "f16_relu_twin", cc.COMPUTES["f16mma"](s, False, epilogue="f16_relu"), 3, target={"kind": "llvm"}
    )
    got = twin(a, wp, bias)
    got = got.numpy() if hasattr(got, "numpy") else got
    assert got.dtype == np.float16 and np.array_equal(got, want)
    replay = cc.emulate_mma(s, a, wp, False, "f16mma", "f16_relu", (bias,))
    bound = f16_reference(np.abs(x), np.abs(w)).transpose(0, 2, 3, 1)
    close = np.abs(replay.astype(np.float32) - want.astype(np.float32)) <= 1e-5 * bound + 2e-3 * np.abs(want)
    assert replay.dtype == np.float16 and close.all()


def split_operands(shape, seed=0):
    """Random fp16 NHWC parts of ``shape`` and OIHW weights; the NCHW fp32 concatenation of the parts."""
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal(shape.part_shape).astype(np.float16) for _ in range(shape.parts)]
    w = rng.standard_normal((shape.out_ch, shape.in_ch, 1, 1)).astype(np.float32)
    return parts, w, np.concatenate(parts, axis=3).transpose(0, 3, 1, 2).astype(np.float32)


@pytest.mark.parametrize("parts, part_ch", [(2, 64), (3, 16), (4, 8)])
def test_f16mma_input_parts_replay_and_twin_match_reference(parts, part_ch):
    """A 1x1 f16mma conv reading its input as fp16 NHWC parts in place (each pair of halves one
    word): the replay of the kernel's loads against the numpy fp16 conv of the concatenation
    (within the fp32 summation-order bound) and, word for word, against the replay of the packed
    concatenation; the LLVM twin equal to the reference exactly (same loop order)."""
    s = cc.Conv2dCudaShape(2, parts * part_ch, 16, 4, 8, kernel=1, parts=parts)
    ps, w, x = split_operands(s, seed=parts)
    wp = cc.pack_weights_f16(w)
    want = f16_reference(x, w)
    bound = f16_reference(np.abs(x), np.abs(w))
    got = cc.unpack_output(cc.emulate_mma(s, ps, wp, False, "f16mma"), "f16mma")
    assert np.all(np.abs(got - want) <= 1e-5 * bound + 1e-30)
    packed = cc.Conv2dCudaShape(2, parts * part_ch, 16, 4, 8, kernel=1)
    np.testing.assert_array_equal(
        got, cc.unpack_output(cc.emulate_f16mma(packed, cc.pack_activations_f16(x, 1), wp), "f16mma")
    )
    from refqsr_engine.kernels.tir_build import build_kernel

    twin = build_kernel("parts_twin", cc.COMPUTES["f16mma"](s, False), parts + 1, target={"kind": "llvm"})
    out = twin(*ps, wp)
    out = out.numpy() if hasattr(out, "numpy") else out
    np.testing.assert_array_equal(cc.unpack_output(out, "f16mma"), want)


def test_f16mma_input_parts_replay_detects_a_wrong_part_mapping(monkeypatch):
    """Negative controls: the parts passed in another order, and the kernel's part index off by
    one (each word read from the next part), must each move the replay far from the reference."""
    s = cc.Conv2dCudaShape(2, 96, 16, 4, 8, kernel=1, parts=3)
    ps, w, x = split_operands(s, seed=5)
    wp = cc.pack_weights_f16(w)
    want = f16_reference(x, w)
    swapped = cc.unpack_output(cc.emulate_mma(s, [ps[1], ps[0], ps[2]], wp, False, "f16mma"), "f16mma")
    assert np.abs(swapped - want).max() > 0.1

    right = cc._a_part

    def next_part(shape, index):
        part, inner = right(shape, index)
        return (part + 1) % shape.parts, inner

    monkeypatch.setattr(cc, "_a_part", next_part)
    got = cc.unpack_output(cc.emulate_mma(s, ps, wp, False, "f16mma"), "f16mma")
    assert np.abs(got - want).max() > 0.1


def test_input_parts_shape_checks():
    with pytest.raises(ValueError, match="1x1"):
        cc.Conv2dCudaShape(2, 128, 16, 4, 8, kernel=3, parts=2)
    with pytest.raises(ValueError, match="parts must be"):
        cc.Conv2dCudaShape(2, 128, 16, 4, 8, kernel=1, parts=cc.MAX_PARTS + 1)
    with pytest.raises(ValueError, match="f16mma"):
        cc.Conv2dCudaShape(2, 128, 16, 4, 8, kernel=1, parts=2).check("s8mma")
    with pytest.raises(ValueError, match="whole K chunks"):
        cc.Conv2dCudaShape(2, 24, 16, 4, 8, kernel=1, parts=2).check("f16mma")  # 12 channels a part


@needs_nvcc
def test_f16mma_input_parts_build_for_cuda():
    """The split-input kernel through nvcc: fp16 parts as parameters, each pair of halves loaded
    as one 32-bit word (no 16-bit global loads), the f16 mma, no local memory."""
    s = cc.Conv2dCudaShape(2, 128, 16, 4, 8, kernel=1, parts=2)
    exe = cuda_toolchain.build_cuda(cc.conv2d_f16mma_primfunc(s, epilogue="f16_relu"), "sm_80")
    source = cuda_toolchain.build_info(exe).source
    assert "half* __restrict__ A_ptr, half* __restrict__ A1_ptr" in source
    ptx = cuda_toolchain.device_code(exe)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
    assert re.search(r"ld\.global(?:\.nc)?\.(?:u32|b32)", ptx)
    assert not re.search(r"ld\.global(?:\.nc)?\.(?:u16|b16)", ptx)
    assert "ld.local" not in ptx and "st.local" not in ptx


def shuffle_case(seed=0):
    """A 3x3 f16mma conv (16 -> 32 channels, 4 x 6) with a bias both ways of zero, and the packed
    operand of the next 3x3 conv that a "f16_relu" pixel-shuffle store must write: numpy's fp16
    conv + bias, ReLU, fp16, torch's pixel_shuffle, then the fp16 pack with its zero border."""
    import torch

    s = cc.Conv2dCudaShape(2, 16, 32, 4, 6)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 16, 4, 6)).astype(np.float32)
    w = (rng.standard_normal((32, 16, 3, 3)) / 6).astype(np.float32)
    b = rng.uniform(-0.3, 0.3, 32).astype(np.float32)
    y = np.maximum(f16_reference(x, w) + b[None, :, None, None], np.float32(0)).astype(np.float16)
    shuffled = torch.nn.functional.pixel_shuffle(torch.from_numpy(y.astype(np.float32)), 2).numpy()
    return s, x, w, b, cc.pack_activations_f16(shuffled, 3)


def test_f16mma_shuffle_store_replay_and_twin_match_reference():
    """The pixel-shuffle store (kernel channels in :func:`shuffle_channel_order`, accumulator pairs
    stored as words at the shuffled pixels, the border zeroed by the nearest interior stores):
    the LLVM twin equals the reference words exactly; the replay writes every word once it is
    reached (no 0xFFFF left), zeros on the border, and values within the fp32 summation-order
    bound of the reference."""
    s, x, w, b, want = shuffle_case()
    order = cc.shuffle_channel_order(32)
    assert sorted(order) == list(range(32)) and list(order[:3]) == [0, 4, 8]
    a, wp = cc.pack_activations_f16(x, 3), cc.pack_weights_f16(w[order])
    from refqsr_engine.kernels.tir_build import build_kernel

    func = cc.COMPUTES["f16mma"](s, False, epilogue="f16_relu", shuffle_pad=1)
    twin = build_kernel("shuffle_twin", func, 3, target={"kind": "llvm"})
    got = twin(a, wp, b[order])
    got = got.numpy() if hasattr(got, "numpy") else got
    assert got.shape == cc.shuffle_out_shape(s, 1) == want.shape == (2, 10, 14, 4)
    np.testing.assert_array_equal(got, want)
    replay = cc.emulate_mma(s, a, wp, False, "f16mma", "f16_relu", (b[order],), shuffle_pad=1)
    halves = replay.view(np.uint16)
    assert not (halves == 0xFFFF).any()
    assert not replay[:, [0, -1]].any() and not replay[:, :, [0, -1]].any()
    values, expected = replay.view(np.float16).astype(np.float32), want.view(np.float16).astype(np.float32)
    assert np.all(np.abs(values - expected) <= 2e-3 * np.abs(expected) + 1e-4)
    assert 0.05 < np.mean(expected[:, 1:-1, 1:-1] == 0) < 0.95


def test_f16mma_shuffle_store_replay_detects_wrong_mappings(monkeypatch):
    """Negative controls: weights in the conv's own channel order (no permutation), and a store
    that zeroes no border word, must each be caught."""
    s, x, w, b, want = shuffle_case(seed=2)
    a = cc.pack_activations_f16(x, 3)
    unpermuted = cc.emulate_mma(s, a, cc.pack_weights_f16(w), False, "f16mma", "f16_relu", (b,), shuffle_pad=1)
    diff = unpermuted.view(np.float16).astype(np.float32) - want.view(np.float16).astype(np.float32)
    assert np.abs(diff).max() > 0.1
    order = cc.shuffle_channel_order(32)
    right = cc._shuffle_border
    monkeypatch.setattr(cc, "_shuffle_border", lambda *args: ((False, False), right(*args)[1]))
    replay = cc.emulate_mma(s, a, cc.pack_weights_f16(w[order]), False, "f16mma", "f16_relu", (b[order],), 1)
    assert (replay.view(np.uint16) == 0xFFFF).any()


@needs_nvcc
def test_f16mma_shuffle_store_builds_for_cuda():
    """The pixel-shuffle store through nvcc: the f16 mma, 32-bit word stores only (each lane's
    accumulator pair one word), no local memory."""
    s = cc.Conv2dCudaShape(2, 16, 32, 4, 6)
    ptx = cuda_toolchain.device_code(
        cuda_toolchain.build_cuda(cc.conv2d_f16mma_primfunc(s, epilogue="f16_relu", shuffle_pad=1), "sm_80")
    )
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx
    assert set(re.findall(r"st\.global\.[a-z0-9.]+", ptx)) == {"st.global.u32"}
    assert "ld.local" not in ptx and "st.local" not in ptx
    with pytest.raises(ValueError, match="pixel-shuffle"):
        cc.conv2d_f16mma_primfunc(s, epilogue="f16_relu", shuffle_pad=2)


@needs_nvcc
@pytest.mark.parametrize(
    "variant, epilogue", [("s8mma", "dequant_ws_relu"), ("s8mma", "dequant_ws_res_relu"), ("f16mma", "f16_relu")]
)
def test_relu_epilogues_build_for_cuda(variant, epilogue):
    """The bias-and-ReLU stores through nvcc: the mma, a max against zero and fp16 stores."""
    shape = cc.Conv2dCudaShape(2, 32, 16, 4, 8)
    builder = cc.conv2d_s8mma_primfunc if variant == "s8mma" else cc.conv2d_f16mma_primfunc
    ptx = cuda_toolchain.device_code(cuda_toolchain.build_cuda(builder(shape, epilogue=epilogue), "sm_80"))
    assert re.search(r"mma\.sync\.aligned\.m16n8k\d+\.row\.col", ptx)
    # nvcc may flush an fp32 denormal in the max: it rounds to an fp16 zero in the store either way
    assert re.search(r"max\.(?:ftz\.)?f32", ptx) and re.search(r"st\.global\.(?:b16|u16)", ptx)


@needs_nvcc
def test_dequant_epilogue_builds_for_cuda():
    """The s8mma kernel with its "dequant_ws" epilogue through nvcc: int8 mma in the PTX and fp16
    stores of the output (``st.global.b16`` / ``.u16``), no 32-bit output stores left."""
    shape = cc.Conv2dCudaShape(2, 32, 16, 4, 8)
    exe = cuda_toolchain.build_cuda(cc.conv2d_s8mma_primfunc(shape, epilogue="dequant_ws"), "sm_80")
    ptx = cuda_toolchain.device_code(exe)
    assert re.search(r"mma\.sync\.aligned\.m16n8k\d+\.row\.col\.s32\.u8\.s8\.s32", ptx)
    assert re.search(r"cvt\.rn\.f16\.f32", ptx)
    assert re.search(r"st\.global\.(?:b16|u16)", ptx)


# ----------------------------------------------------------------------------------------------
# tile sums: per-channel sums of the stored outputs over each block tile (a mean without a re-read)

TILE_SUM_CASES = {
    "s8mma": (cc.Conv2dCudaShape(2, 32, 64, 16, 8), "dequant_relu"),  # 2 pixel tiles a sample
    "f16mma": (cc.Conv2dCudaShape(2, 16, 256, 4, 8), "f16_relu"),  # 2 channel tiles a block row
}


def tile_sums_case(variant):
    """(shape, epilogue, packed operands, epilogue operands, the stored output by an independent
    reference): a conv with a bias-and-ReLU store."""
    shape, epilogue = TILE_SUM_CASES[variant]
    if variant == "f16mma":
        x, w = float_operands(shape, seed=5)
        a, wp = cc.pack_activations_f16(x, shape.kernel), cc.pack_weights_f16(w)
        bias = relu_bias(shape) * 4
        want = np.maximum(f16_reference(x, w).transpose(0, 2, 3, 1) + bias, np.float32(0)).astype(np.float16)
        return shape, epilogue, a, wp, (bias,), want
    x, w, pad = operands(shape, variant, False)
    a, wp = pack(variant, x, w, pad, False)
    ops = (*epilogue_operands(shape, w, False), relu_bias(shape))
    acc = reference_conv(x, w, pad).transpose(0, 2, 3, 1)
    want = cc.dequant_epilogue_reference(acc, *ops[:4], None, ops[5])
    return shape, epilogue, a, wp, ops, want


def block_sums(y, shape, variant) -> np.ndarray:
    """float64 sums of NHWC ``y`` over each block tile's pixels (consecutive n, h, w), per channel."""
    bm = cc.mma_config(shape, variant).bm
    return y.astype(np.float64).reshape(-1, bm, shape.out_ch).sum(axis=1)


@pytest.mark.parametrize("variant", list(TILE_SUM_CASES))
def test_tile_sums_replay_and_twin_match_reference(variant):
    """With ``tile_sums`` the kernel also writes the fp32 per-channel sums of its stored fp16
    outputs over each block tile: the replay (the kernel's own reduction order) and the LLVM twin
    against float64 sums of the independently computed output, within fp32 rounding."""
    from refqsr_engine.kernels.tir_build import build_kernel

    shape, epilogue, a, wp, ops, want = tile_sums_case(variant)
    assert 0.05 < np.mean(want == 0) < 0.95  # the ReLU clips some outputs, not all
    ref = block_sums(want, shape, variant)
    scale = block_sums(np.abs(want), shape, variant) + 1e-3
    out, sums = cc.emulate_mma(shape, a, wp, False, variant, epilogue, ops, tile_sums=True)
    assert sums.shape == cc.tile_sums_shape(shape, variant) and sums.dtype == np.float32
    if variant == "f16mma":  # the replay sums in another order than the reference: a few fp16 ulps
        assert np.abs(out.astype(np.float32) - want.astype(np.float32)).max() <= 2e-3 * np.abs(want).max()
    else:
        assert np.array_equal(out, want)
    assert np.all(np.abs(sums - block_sums(out, shape, variant)) <= 1e-6 * scale)
    assert np.all(np.abs(sums - ref) <= 2e-3 * scale)
    twin = build_kernel(
        "sums_twin",
        cc.COMPUTES[variant](shape, False, epilogue=epilogue, tile_sums=True),
        2 + len(ops),
        target={"kind": "llvm"},
    )
    got, got_sums = twin(a, wp, *ops)
    got, got_sums = (v.numpy() if hasattr(v, "numpy") else v for v in (got, got_sums))
    assert np.all(np.abs(got_sums - block_sums(got, shape, variant)) <= 1e-6 * scale)
    assert np.all(np.abs(got_sums - ref) <= 2e-3 * scale)


def test_tile_sums_replay_detects_a_wrong_slot_mapping(monkeypatch):
    """The reduction's index math (:func:`_sum_slot`, shared by the kernel and its replay): two
    neighbouring columns exchanged, or two threads' row slots written to one, must each move the
    sums away from the reference."""
    shape, epilogue, a, wp, ops, want = tile_sums_case("s8mma")
    ref = block_sums(want, shape, "s8mma")
    right = cc._sum_slot
    wrong = {
        "columns": lambda cfg, ty, lane, c: (right(cfg, ty, lane, c)[0], right(cfg, ty, lane, c ^ 1)[1]),
        "slots": lambda cfg, ty, lane, c: (right(cfg, ty, lane, c)[0] // 2 * 2, right(cfg, ty, lane, c)[1]),
    }
    for name, slot in wrong.items():
        monkeypatch.setattr(cc, "_sum_slot", slot)
        _, sums = cc.emulate_mma(shape, a, wp, False, "s8mma", epilogue, ops, tile_sums=True)
        monkeypatch.setattr(cc, "_sum_slot", right)
        assert np.abs(sums - ref).max() > 0.1, name


def test_tile_sums_checks():
    shape, epilogue = TILE_SUM_CASES["s8mma"]
    with pytest.raises(ValueError, match="fp16 store"):
        cc.conv2d_s8mma_primfunc(shape, tile_sums=True)
    with pytest.raises(ValueError, match="whole block tiles"):
        cc.conv2d_s8mma_primfunc(cc.Conv2dCudaShape(2, 32, 64, 4, 8), epilogue=epilogue, tile_sums=True)
    with pytest.raises(ValueError, match="pixel-shuffle"):
        cc.conv2d_f16mma_primfunc(cc.Conv2dCudaShape(2, 16, 32, 4, 6), epilogue="f16", shuffle_pad=1, tile_sums=True)


@needs_sass
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tile_sums_kernel_sass(arch):
    """The production s8 conv with tile sums through nvcc and ptxas: IMMA as without them, the
    reduction through shared memory (two barriers more than the step loop's), no local memory."""
    shape = cc.Conv2dCudaShape(1, 64, 64, 96, 96)
    exe = cuda_toolchain.build_cuda(cc.conv2d_s8mma_primfunc(shape, epilogue="dequant_relu", tile_sums=True), arch)
    sass = cuda_toolchain.sass_counts(cuda_toolchain.build_info(exe).binary)
    (counts,) = sass.values()
    assert counts["LDL"] == 0 and counts["STL"] == 0 and counts["local_bytes"] == 0
    assert counts["IMMA"] > 0 and counts["HMMA"] == 0 and counts["BAR"] > 0
    ptx = cuda_toolchain.device_code(exe)
    assert re.search(r"st\.shared\.f32", ptx) and re.search(r"ld\.shared\.f32", ptx)
