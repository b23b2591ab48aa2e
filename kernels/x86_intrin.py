"""AVX2 tensor intrinsics (TVM ``s_tir`` tensorize) for the integer conv kernels.

Registered under these names by :func:`register_avx2_intrinsics` (idempotent; importing
``tvm.s_tir.tensor_intrin`` is deliberately avoided, it takes over a minute):

``INT8_DOT_8x4``  (``refqsr_avx2_u8s8s32_dot_8x4``)
    ``C[8] += sum_k A[k] * B[8, k]``, k < 4, A uint8, B int8, C int32 (scope "local").
    One int32 load of 4 activations broadcast to 8 lanes, ``vpmaddubsw`` against the 32-byte
    8-out x 4-in weight tile (u8 x s8 -> adjacent pairs summed to **saturated** s16), ``vpmaddwd``
    with ones (-> s32), ``vpaddd`` into the accumulator. Exact only when no pair sum leaves int16
    (see ``layouts.int8_is_exact``: 7-bit activations or 7-bit weights).

``INT8_DOT_8x8_PAIR``  (``refqsr_avx2_u8s8s32_dot_8x8_i16pair``)
    ``C[8] += sum_k A[k] * B[k // 4, 8, k % 4]``, k < 8 (both 4-channel halves of a group):
    two ``vpmaddubsw``, one ``vpaddw``, one ``vpmaddwd`` with ones, ``vpaddd`` -- 3 instead of 4
    multiply-port uops per 64 MACs. Exact when two pair sums fit int16:
    ``4 * act_max * |w| <= 32767`` (u7 x s7, u8 x s6, u6 x s8).

``INT16_DOT_8x2``  (``refqsr_avx2_s16s16s32_dot_8x2``)
    ``C[8] += sum_k A[k] * B[8, k]``, k < 2, A and B int16, C int32: broadcast 2 activations,
    one ``vpmaddwd`` (s16 x s16, pairs summed exactly to s32), ``vpaddd``. Exact for any
    u8 x s8 operands (full 8-bit range), at twice the operand bytes.

``LOWBIT_DOT_8x4_I16``  (``refqsr_avx2_u8s8s16_dot_8x4``)
    ``C[8, 2] += A[2p] * B[8, 2p] + A[2p+1] * B[8, 2p+1]`` into an **int16** accumulator:
    ``vpmaddubsw`` + ``vpaddw``, no widening. Lane (o, p) of the 16 x s16 register is exactly
    ``vpmaddubsw``'s output lane 2*o + p. Exact while the accumulated pair sums fit int16
    (``layouts.lowbit_chunk_steps``), e.g. u4 x s4: 136 steps.

``PAIRSUM_8``  (``refqsr_avx2_s16s32_pairsum_8``)
    ``C[8] += P[8, 0] + P[8, 1]``: flushes an int16 accumulator into int32 with one
    ``vpmaddwd`` by ones + ``vpaddd``. C in scope "local" (register tile);
    ``PAIRSUM_8_GLOBAL`` is the same with C in the output buffer (scope "global").

``VNNI_DOT_8x4``  (``refqsr_avxvnni_u8s8s32_dot_8x4``), optional, not AVX2
    Same description as ``INT8_DOT_8x4`` with one ``vpdpbusd ymm`` (no int16 step, so exact for
    the full u8 x s8 range). Needs AVX-VNNI or AVX512-VNNI + VL; for CPUs that have it.

512-bit (AVX-512 BW + VNNI) versions, 16 output channels per zmm (weight tile ``[16][4]`` = 64 bytes):

``VNNI512_DOT_16x4``  (``refqsr_avx512vnni_u8s8s32_dot_16x4``)
    ``C[16] += sum_k A[k] * B[16, k]``, k < 4: 4 activations broadcast to 16 lanes, one
    ``vpdpbusd zmm`` (64 MACs, exact int32 sums of u8 x s8 products, no int16 step).

``LOWBIT512_DOT_16x4_I16``  (``refqsr_avx512bw_u8s8s16_dot_16x4``)
    ``C[16, 2] += A[2p] * B[16, 2p] + A[2p+1] * B[16, 2p+1]`` in int16: ``vpmaddubsw zmm`` +
    ``vpaddw zmm``; lane (o, p) is output lane 2*o + p. Same bound as ``LOWBIT_DOT_8x4_I16``.

``PAIRSUM_16`` / ``PAIRSUM_16_GLOBAL``
    ``C[16] += P[16, 0] + P[16, 1]``: one ``vpmaddwd zmm`` by ones + ``vpaddd``.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .host_cpu import host_cpu_flags

INT8_DOT_8x4 = "refqsr_avx2_u8s8s32_dot_8x4"
INT16_DOT_8x2 = "refqsr_avx2_s16s16s32_dot_8x2"
LOWBIT_DOT_8x4_I16 = "refqsr_avx2_u8s8s16_dot_8x4"
PAIRSUM_8 = "refqsr_avx2_s16s32_pairsum_8"
VNNI_DOT_8x4 = "refqsr_avxvnni_u8s8s32_dot_8x4"
INT8_DOT_8x8_PAIR = "refqsr_avx2_u8s8s32_dot_8x8_i16pair"
PAIRSUM_8_GLOBAL = "refqsr_avx2_s16s32_pairsum_8_global"
VNNI512_DOT_16x4 = "refqsr_avx512vnni_u8s8s32_dot_16x4"
LOWBIT512_DOT_16x4_I16 = "refqsr_avx512bw_u8s8s16_dot_16x4"
PAIRSUM_16 = "refqsr_avx512bw_s16s32_pairsum_16"
PAIRSUM_16_GLOBAL = "refqsr_avx512bw_s16s32_pairsum_16_global"

_PMADDUBSW = "llvm.x86.avx2.pmadd.ub.sw"  # <32 x i8> u8, <32 x i8> s8 -> <16 x i16> (saturating)
_PMADDWD = "llvm.x86.avx2.pmadd.wd"  # <16 x i16>, <16 x i16> -> <8 x i32>
# acc <8 x i32> += u8x4 . s8x4 per lane (AVX-VNNI / AVX512-VNNI+VL); this LLVM takes <32 x i8> operands
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.256"
_VPDPBUSD_512 = "llvm.x86.avx512.vpdpbusd.512"  # <16 x i32> += <64 x i8> u8 . <64 x i8> s8
_PMADDUBSW_512 = "llvm.x86.avx512.pmaddubs.w.512"  # <64 x i8>, <64 x i8> -> <32 x i16> (saturating)
_PMADDWD_512 = "llvm.x86.avx512.pmaddw.d.512"  # <32 x i16>, <32 x i16> -> <16 x i32>


# --- u8 x s8 -> s32 ------------------------------------------------------------------------


def _dot_desc(lanes: int, k: int, a_dtype: str, b_dtype: str):
    """``C[lanes] += sum_k A[k] * B[lanes, k]`` in int32: the description every dot intrinsic matches."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((k,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, k), b_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, k):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.Cast("int32", A[vj]) * T.Cast("int32", B[vi, vj])

    return desc


def _vnni_dot_impl(lanes: int, vpdpbusd: str):
    """One ``vpdpbusd`` (ymm for 8 lanes, zmm for 16): exact int32 sums of u8 x s8 quads."""
    u8, s8, s32 = f"uint8x{4 * lanes}", f"int8x{4 * lanes}", f"int32x{lanes}"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8 = T.reinterpret(T.broadcast(a_i32, lanes), dtype=u8)
            b_s8 = B.vload([0, 0], dtype=s8)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                s32, vpdpbusd, C[T.ramp(T.int32(0), 1, lanes)], a_u8, b_s8
            )

    return impl


@T.prim_func(s_tir=True)
def _int8_dot_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a_u8 = T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32")
        b_s8 = B.vload([0, 0], dtype="int8x32")
        pairs = T.call_llvm_pure_intrin("int16x16", _PMADDUBSW, a_u8, b_s8)
        quads = T.call_llvm_pure_intrin("int32x8", _PMADDWD, pairs, T.broadcast(T.int16(1), 16))
        C[T.ramp(T.int32(0), 1, 8)] = C[T.ramp(T.int32(0), 1, 8)] + quads


# --- u8 x s8 -> s32, two vpmaddubsw summed in int16 before one vpmaddwd -----------------------


@T.prim_func(s_tir=True)
def _int8_pair_desc(
    A: T.Buffer((8,), "uint8", offset_factor=1),
    B: T.Buffer((2, 8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:8], B[0:2, 0:8, 0:4])
        T.writes(C[0:8])
        for i, h, k in T.grid(8, 2, 4):
            with T.sblock("update"):
                vi, vh, vk = T.axis.remap("SRR", [i, h, k])
                C[vi] = C[vi] + T.Cast("int32", A[vh * 4 + vk]) * T.Cast("int32", B[vh, vi, vk])


@T.prim_func(s_tir=True)
def _int8_pair_impl(
    A: T.Buffer((8,), "uint8", offset_factor=1),
    B: T.Buffer((2, 8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:8], B[0:2, 0:8, 0:4])
        T.writes(C[0:8])
        a0 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a1 = T.reinterpret(A.vload([4], "uint8x4"), dtype="int32")
        m0 = T.call_llvm_pure_intrin(
            "int16x16",
            _PMADDUBSW,
            T.reinterpret(T.broadcast(a0, 8), dtype="uint8x32"),
            B.vload([0, 0, 0], dtype="int8x32"),
        )
        m1 = T.call_llvm_pure_intrin(
            "int16x16",
            _PMADDUBSW,
            T.reinterpret(T.broadcast(a1, 8), dtype="uint8x32"),
            B.vload([1, 0, 0], dtype="int8x32"),
        )
        C[T.ramp(T.int32(0), 1, 8)] = C[T.ramp(T.int32(0), 1, 8)] + T.call_llvm_pure_intrin(
            "int32x8", _PMADDWD, m0 + m1, T.broadcast(T.int16(1), 16)
        )


# --- s16 x s16 -> s32 (exact full-range 8-bit operands) ---------------------------------------


@T.prim_func(s_tir=True)
def _int16_dot_impl(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((8, 2), "int16", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        a_i32 = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
        a_s16 = T.reinterpret(T.broadcast(a_i32, 8), dtype="int16x16")
        b_s16 = B.vload([0, 0], dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] = C[T.ramp(T.int32(0), 1, 8)] + T.call_llvm_pure_intrin(
            "int32x8", _PMADDWD, a_s16, b_s16
        )


# --- low-bit: u8 x s8 pair sums accumulated in int16, flushed with one vpmaddwd ---------------


def _lowbit_dot(lanes: int, pmaddubsw: str):
    """u8 x s8 pair sums into an int16 [lanes, 2] accumulator: ``vpmaddubsw`` + ``vpaddw`` on
    ``lanes`` output channels (8: ymm, 16: zmm)."""
    u8, s8, s16, halves = f"uint8x{4 * lanes}", f"int8x{4 * lanes}", f"int16x{2 * lanes}", 2 * lanes

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes, 2), "int16", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes, 0:2], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes, 0:2])
            for i, p, q in T.grid(lanes, 2, 2):
                with T.sblock("update"):
                    vi, vp, vq = T.axis.remap("SSR", [i, p, q])
                    C[vi, vp] = C[vi, vp] + T.Cast("int16", A[vp * 2 + vq]) * T.Cast("int16", B[vi, vp * 2 + vq])

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes, 2), "int16", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes, 0:2], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes, 0:2])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8 = T.reinterpret(T.broadcast(a_i32, lanes), dtype=u8)
            b_s8 = B.vload([0, 0], dtype=s8)
            C[0, T.ramp(T.int32(0), 1, halves)] = C[0, T.ramp(T.int32(0), 1, halves)] + T.call_llvm_pure_intrin(
                s16, pmaddubsw, a_u8, b_s8
            )

    return desc, impl


def _pairsum(lanes: int, pmaddwd: str, c_scope: str):
    """Flush an int16 [lanes, 2] accumulator into int32: one ``vpmaddwd`` by ones + ``vpaddd``."""
    s16, s32, halves = f"int16x{2 * lanes}", f"int32x{lanes}", 2 * lanes

    @T.prim_func(s_tir=True)
    def desc(
        P: T.Buffer((lanes, 2), "int16", offset_factor=1, scope="local"),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope=c_scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], P[0:lanes, 0:2])
            T.writes(C[0:lanes])
            for i, p in T.grid(lanes, 2):
                with T.sblock("update"):
                    vi, vp = T.axis.remap("SR", [i, p])
                    C[vi] = C[vi] + T.Cast("int32", P[vi, vp])

    @T.prim_func(s_tir=True)
    def impl(
        P: T.Buffer((lanes, 2), "int16", offset_factor=1, scope="local"),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope=c_scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], P[0:lanes, 0:2])
            T.writes(C[0:lanes])
            p_s16 = P.vload([0, 0], dtype=s16)
            C[T.ramp(T.int32(0), 1, lanes)] = C[T.ramp(T.int32(0), 1, lanes)] + T.call_llvm_pure_intrin(
                s32, pmaddwd, p_s16, T.broadcast(T.int16(1), halves)
            )

    return desc, impl


_INTRINSICS = {
    INT8_DOT_8x4: (_dot_desc(8, 4, "uint8", "int8"), _int8_dot_impl),
    INT16_DOT_8x2: (_dot_desc(8, 2, "int16", "int16"), _int16_dot_impl),
    LOWBIT_DOT_8x4_I16: _lowbit_dot(8, _PMADDUBSW),
    VNNI_DOT_8x4: (_dot_desc(8, 4, "uint8", "int8"), _vnni_dot_impl(8, _VPDPBUSD)),
    INT8_DOT_8x8_PAIR: (_int8_pair_desc, _int8_pair_impl),
    PAIRSUM_8: _pairsum(8, _PMADDWD, "local"),
    PAIRSUM_8_GLOBAL: _pairsum(8, _PMADDWD, "global"),
    VNNI512_DOT_16x4: (_dot_desc(16, 4, "uint8", "int8"), _vnni_dot_impl(16, _VPDPBUSD_512)),
    LOWBIT512_DOT_16x4_I16: _lowbit_dot(16, _PMADDUBSW_512),
    PAIRSUM_16: _pairsum(16, _PMADDWD_512, "local"),
    PAIRSUM_16_GLOBAL: _pairsum(16, _PMADDWD_512, "global"),
}


def host_has_vnni() -> bool:
    """Whether this (Linux) CPU runs ``vpdpbusd ymm`` (AVX-VNNI, or AVX512-VNNI + VL)."""
    flags = host_cpu_flags()
    return "avx_vnni" in flags or ("avx512_vnni" in flags and "avx512vl" in flags)


def host_has_avx512_vnni() -> bool:
    """Whether this (Linux) CPU runs the 512-bit kernels (AVX-512 F + BW + VNNI)."""
    return {"avx512f", "avx512bw", "avx512_vnni"} <= host_cpu_flags()


def register_avx2_intrinsics() -> tuple[str, ...]:
    """Register the intrinsics above once per process; returns their names."""
    for name, (desc, impl) in _INTRINSICS.items():
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, desc, impl)
    return tuple(_INTRINSICS)


register_avx2_intrinsics()


# --- dequantize a 16 x 16 tile of [pixel][channel] int32 sums into 16 channel rows -------------


def _deq16_script(off: float, impl: bool) -> str:
    """TVMScript of the dequantize tile (desc or impl) for activation grid offset ``off``."""
    zp = "Z[0]" if off == 0 else f"Z[0] + T.float32({off!r})"
    head = """
@T.prim_func(s_tir=True)
def main(a: T.handle, y: T.handle, sw: T.handle, ws: T.handle, s: T.handle, z: T.handle):
    ys = T.int32()
    yh = T.int32()
    A = T.match_buffer(a, (16, 16), "int32", offset_factor=1)
    # [channel][row][pixel]: the unit row dim keeps the tile's region matchable in [N][O][H][W]
    Y = T.match_buffer(y, (16, 1, 16), "float32", strides=(ys, yh, 1), offset_factor=1)
    SW = T.match_buffer(sw, (16,), "int32", offset_factor=1)
    WS = T.match_buffer(ws, (16,), "float32", offset_factor=1)
    S = T.match_buffer(s, (1,), "float32", offset_factor=1)
    Z = T.match_buffer(z, (1,), "float32", offset_factor=1)
    with T.sblock("root"):
        T.reads(A[0:16, 0:16], Z[0:1], SW[0:16], S[0:1], WS[0:16])
        T.writes(Y[0:16, 0:1, 0:16])
"""
    if not impl:
        return (
            head
            + f"""        for i, j in T.grid(16, 16):
            with T.sblock("update"):
                vi, vj = T.axis.remap("SS", [i, j])
                Y[vi, 0, vj] = T.Cast("float32", A[vj, vi] - T.Cast("int32", {zp}) * SW[vi]) * (S[0] * WS[vi])
"""
        )
    lanes = "T.Ramp(0, 1, 16)"
    body = [
        f'        corr = T.Broadcast(T.Cast("int32", {zp}), 16) * SW[{lanes}]',
        f"        scale = T.Broadcast(S[0], 16) * WS[{lanes}]",
    ]
    # one vector per pixel (16 channels), converted in registers, then transposed with shuffles
    body += [f'        t{j} = T.Cast("float32x16", A[{j}, {lanes}] - corr) * scale' for j in range(16)]
    vecs = ", ".join(f"t{j}" for j in range(16))
    body += [
        f"        Y[{i}, 0, {lanes}] = T.Shuffle([{vecs}], [{', '.join(str(i + 16 * j) for j in range(16))}])"
        for i in range(16)
    ]
    return head + "\n".join(body) + "\n"


def deq16_intrinsic(off: float) -> str:
    """Register (once) and name the tensor intrinsic that dequantizes a 16-pixel x 16-channel tile
    ``Y[c, p] = float(A[p, c] - int(Z + off) * SW[c]) * (S * WS[c])``: 16 contiguous int32 loads,
    vector math per pixel, a 16 x 16 transpose in registers, 16 contiguous row stores -- instead of
    16 strided scalar loads per output vector."""
    from tvm.script import from_source

    name = f"refqsr_avx512_deq16x16_off{float(off):g}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(
            name, from_source(_deq16_script(float(off), False)), from_source(_deq16_script(float(off), True))
        )
    return name
