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
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

INT8_DOT_8x4 = "refqsr_avx2_u8s8s32_dot_8x4"
INT16_DOT_8x2 = "refqsr_avx2_s16s16s32_dot_8x2"
LOWBIT_DOT_8x4_I16 = "refqsr_avx2_u8s8s16_dot_8x4"
PAIRSUM_8 = "refqsr_avx2_s16s32_pairsum_8"
VNNI_DOT_8x4 = "refqsr_avxvnni_u8s8s32_dot_8x4"
INT8_DOT_8x8_PAIR = "refqsr_avx2_u8s8s32_dot_8x8_i16pair"
PAIRSUM_8_GLOBAL = "refqsr_avx2_s16s32_pairsum_8_global"

_PMADDUBSW = "llvm.x86.avx2.pmadd.ub.sw"  # <32 x i8> u8, <32 x i8> s8 -> <16 x i16> (saturating)
_PMADDWD = "llvm.x86.avx2.pmadd.wd"  # <16 x i16>, <16 x i16> -> <8 x i32>
# acc <8 x i32> += u8x4 . s8x4 per lane (AVX-VNNI / AVX512-VNNI+VL); this LLVM takes <32 x i8> operands
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.256"


# --- u8 x s8 -> s32 ------------------------------------------------------------------------


@T.prim_func(s_tir=True)
def _int8_dot_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        for i, k in T.grid(8, 4):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])


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


@T.prim_func(s_tir=True)
def _vnni_dot_impl(
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
        C[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
            "int32x8", _VPDPBUSD, C[T.ramp(T.int32(0), 1, 8)], a_u8, b_s8
        )


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
        m0 = T.call_llvm_pure_intrin("int16x16", _PMADDUBSW, T.reinterpret(T.broadcast(a0, 8), dtype="uint8x32"),
                                     B.vload([0, 0, 0], dtype="int8x32"))
        m1 = T.call_llvm_pure_intrin("int16x16", _PMADDUBSW, T.reinterpret(T.broadcast(a1, 8), dtype="uint8x32"),
                                     B.vload([1, 0, 0], dtype="int8x32"))
        C[T.ramp(T.int32(0), 1, 8)] = C[T.ramp(T.int32(0), 1, 8)] + T.call_llvm_pure_intrin(
            "int32x8", _PMADDWD, m0 + m1, T.broadcast(T.int16(1), 16)
        )


# --- s16 x s16 -> s32 (exact full-range 8-bit operands) ---------------------------------------


@T.prim_func(s_tir=True)
def _int16_dot_desc(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((8, 2), "int16", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        for i, k in T.grid(8, 2):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])


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


@T.prim_func(s_tir=True)
def _lowbit_dot_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8, 2), "int16", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8, 0:2], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8, 0:2])
        for i, p, q in T.grid(8, 2, 2):
            with T.sblock("update"):
                vi, vp, vq = T.axis.remap("SSR", [i, p, q])
                C[vi, vp] = C[vi, vp] + T.Cast("int16", A[vp * 2 + vq]) * T.Cast("int16", B[vi, vp * 2 + vq])


@T.prim_func(s_tir=True)
def _lowbit_dot_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8, 2), "int16", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8, 0:2], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8, 0:2])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a_u8 = T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32")
        b_s8 = B.vload([0, 0], dtype="int8x32")
        C[0, T.ramp(T.int32(0), 1, 16)] = C[0, T.ramp(T.int32(0), 1, 16)] + T.call_llvm_pure_intrin(
            "int16x16", _PMADDUBSW, a_u8, b_s8
        )


def _pairsum(c_scope: str):
    @T.prim_func(s_tir=True)
    def desc(
        P: T.Buffer((8, 2), "int16", offset_factor=1, scope="local"),
        C: T.Buffer((8,), "int32", offset_factor=1, scope=c_scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], P[0:8, 0:2])
            T.writes(C[0:8])
            for i, p in T.grid(8, 2):
                with T.sblock("update"):
                    vi, vp = T.axis.remap("SR", [i, p])
                    C[vi] = C[vi] + T.Cast("int32", P[vi, vp])

    @T.prim_func(s_tir=True)
    def impl(
        P: T.Buffer((8, 2), "int16", offset_factor=1, scope="local"),
        C: T.Buffer((8,), "int32", offset_factor=1, scope=c_scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], P[0:8, 0:2])
            T.writes(C[0:8])
            p_s16 = P.vload([0, 0], dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] = C[T.ramp(T.int32(0), 1, 8)] + T.call_llvm_pure_intrin(
                "int32x8", _PMADDWD, p_s16, T.broadcast(T.int16(1), 16)
            )

    return desc, impl


_INTRINSICS = {
    INT8_DOT_8x4: (_int8_dot_desc, _int8_dot_impl),
    INT16_DOT_8x2: (_int16_dot_desc, _int16_dot_impl),
    LOWBIT_DOT_8x4_I16: (_lowbit_dot_desc, _lowbit_dot_impl),
    VNNI_DOT_8x4: (_int8_dot_desc, _vnni_dot_impl),
    INT8_DOT_8x8_PAIR: (_int8_pair_desc, _int8_pair_impl),
    PAIRSUM_8: _pairsum("local"),
    PAIRSUM_8_GLOBAL: _pairsum("global"),
}


def host_has_vnni() -> bool:
    """Whether this (Linux) CPU runs ``vpdpbusd ymm`` (AVX-VNNI, or AVX512-VNNI + VL)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx_vnni" in flags or ("avx512_vnni" in flags and "avx512vl" in flags)


def register_avx2_intrinsics() -> tuple[str, ...]:
    """Register the intrinsics above once per process; returns their names."""
    for name, (desc, impl) in _INTRINSICS.items():
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, desc, impl)
    return tuple(_INTRINSICS)


register_avx2_intrinsics()
