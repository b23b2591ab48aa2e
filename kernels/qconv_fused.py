"""One compiled quantized conv as the graph sees it: float in, float out, integer arithmetic inside.

``qconv(X, S, Z, W, SUMW, WS) -> Y`` replaces ``conv2d(dequantize(quantize(X, S, Z)), dequantize(Wq))``
of an exported QDQ graph, in three blocks of one PrimFunc:

``pack``   q = clamp(round_half_even(X / S[n]) + Z[n], qlo, qhi) (ONNX QuantizeLinear, saturated to the
           conv's b-bit grid), shifted to an unsigned grid u = q + offset (signed symmetric
           grids get offset 2^(b-1), so u is in 0 .. 2^b - 1) and packed as
           ``[N][C/8][H+2P][W+2P][8]``; padding (and channels beyond C) hold the zero point
           u0 = Z[n] + offset, which is the value of 0.0.
``conv``   the tensorized AVX2 / AVX-512 integer conv of :mod:`.conv2d_int8`: int32 sums of u * w.
``deq``    Y = (sum - u0[n] * SUMW[o]) * S[n] * WS[o]   (SUMW = sum of the integer weights of o).

Weights beyond s8 (DDTB's asymmetric 8-bit weights: w - zero point spans up to 255 values within
-255..255) on the "vnni512" variant: the kernel runs on w' = w - c (c = ``weight_shift``, chosen so
w' is s8) and the blocks ``wsum_row``/``wsum`` compute c * (window sum of u), which the "conv" block
adds to the sums: exact, one full-speed ``vpdpbusd`` per 64 MACs plus O(C + K^2) adds per pixel,
instead of a 16-bit kernel at half the MACs per instruction.

``S``/``Z`` are per sample (``[N]``: DDTB's dynamic ranges; static quantizers broadcast theirs),
``WS`` per output channel. The conv variant is chosen from the exact operand ranges (see
:func:`choose_variant`), so every variant used is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx

from . import layouts
from .conv2d_int8 import (
    _ACT_DTYPE,
    _LOWBIT,
    _W_DTYPE,
    DEFAULT_CONFIGS,
    GROUP,
    Conv2dShape,
    conv2d_stages,
    lanes_of,
    lowbit_chunk_groups,
    pack_weights,
    schedule_conv2d,
)
from .qconv_amx import pack_amx_weights, qconv_amx_compute
from .x86_intrin import deq16_intrinsic

INT32_MAX = 2**31 - 1


def grid_offset(bits: int, signed_container: bool) -> int:
    """Added to q so a b-bit grid starts at 0 (the integer kernels take unsigned activations):
    2^(b-1) for the symmetric grids of int8 containers, 0 for uint8 ones."""
    return 2 ** (bits - 1) if signed_container else 0


def grid_range(bits: int, signed_container: bool) -> tuple[int, int]:
    """The b-bit grid inside its 8-bit container (before the offset)."""
    if signed_container:
        half = 2 ** (bits - 1)
        return -half, half - 1
    return 0, 2**bits - 1


def weight_shift(w_min: int, w_max: int) -> int | None:
    """c with w - c in s8 for every w in [w_min, w_max]: 0 when the weights are s8 already,
    None when the range is wider than 256 values (no shift fits)."""
    if w_min >= -128 and w_max <= 127:
        return 0
    if w_max - w_min > 255:
        return None
    return w_min + 128  # w - c in [-128, w_max - w_min - 128], inside [-128, 127]


def vnni512_is_exact(act_max: int, w_min: int, w_max: int, taps: int) -> bool:
    """Whether the "vnni512" kernel (with its weight shift) is exact for these ranges over
    ``taps`` = C * K * K products per output: no int32 overflow in any partial sum.

    ``vpdpbusd`` adds 4 exact u8 x s8 products to int32 per lane (no int16 step, no saturation),
    so the only bound is int32: |sum u * w'| <= act_max * 128 * taps, |c * sum u| <= |c| *
    act_max * taps, |u0 * SUMW| <= act_max * max|w| * taps, and the epilogue adds these up."""
    c = weight_shift(w_min, w_max)
    if c is None:
        return False
    w_abs = max(abs(w_min), abs(w_max))
    return act_max * taps * (128 + abs(c) + w_abs) <= INT32_MAX


@dataclass(frozen=True)
class QConvSpec:
    """A quantized conv of the graph: its problem shape, activation grid and operand ranges."""

    shape: Conv2dShape
    act_bits: int  # b of the activation grid
    signed_container: bool  # int8 QDQ container (symmetric grid) vs uint8 (asymmetric)
    w_min: int  # integer weight range, zero point removed
    w_max: int

    @property
    def act_offset(self) -> int:
        return grid_offset(self.act_bits, self.signed_container)

    @property
    def q_range(self) -> tuple[int, int]:
        return grid_range(self.act_bits, self.signed_container)

    @property
    def act_max(self) -> int:
        return 2**self.act_bits - 1

    @property
    def weight_shift(self) -> int:
        """c of the "vnni512" kernel's w - c (0 when the weights are s8; see :func:`weight_shift`)."""
        c = weight_shift(self.w_min, self.w_max)
        if c is None:
            raise ValueError(f"weights {self.w_min}..{self.w_max} span more than 256 values: no s8 shift")
        return c


def choose_variant(
    act_max: int,
    w_min: int,
    w_max: int,
    vnni: bool = False,
    kernel: int = 3,
    channel_groups: int = 8,
    avx512: bool = False,
    amx: bool = False,
) -> str:
    """The fastest conv variant that is exact for these operand ranges.

    ``amx`` (target with AMX and a problem :func:`.qconv_amx.amx_fits` covers): "amx" under the
    same int32 bound as "vnni512" -- a 16 x 16 x 64 tile product per instruction, 2.3-2.8x the
    fused "vnni512" conv here (``benchmarks.conv_int8 --fused``).

    ``avx512`` (target with AVX-512 F+BW+VNNI): "vnni512" for every range it is exact for
    (weights spanning <= 256 values, shifted into s8). With ``vpdpbusd zmm`` a u8 x s8 MAC costs
    what a u4 x s6 one does, and it measured faster than the int16-chunk "lowbit512" at every
    bit width (``benchmarks.conv_int8 --mcpu host``), so low-bit layers take it too.
    Otherwise (AVX2 order, measured on a 2-core Sapphire Rapids VM): "lowbit" when the int16 chunks hold at least
    one 8-channel group, "vnni" where the CPU has it, "int8pair", "int8", and the exact 16-bit
    "int16" (full u8 x s8, or weights beyond s8) as the fallback.
    """
    exact32 = vnni512_is_exact(act_max, w_min, w_max, channel_groups * 8 * kernel * kernel)
    if amx and exact32:
        return "amx"
    if avx512 and exact32:
        return "vnni512"
    if w_min < -128 or w_max > 127:
        return "int16"
    if act_max <= 15:
        try:
            lowbit_chunk_groups(Conv2dShape(1, channel_groups * 8, 8, kernel, kernel, kernel), act_max, w_min, w_max)
            return "lowbit"
        except ValueError:
            pass
    if vnni:
        return "vnni"
    if layouts.lowbit_chunk_steps(act_max, w_min, w_max) >= 2:
        return "int8pair"
    if layouts.int8_is_exact(act_max, w_min, w_max):
        return "int8"
    return "int16"


def qconv_compute(spec: QConvSpec, variant: str, chunk_groups: int | None = None) -> tvm.tirx.PrimFunc:
    """PrimFunc ``main(X, S, Z, W, SUMW, WS, Y)`` (unscheduled)."""
    s = spec.shape
    g, lanes = GROUP[variant], lanes_of(variant)
    act_dtype = _ACT_DTYPE[variant]
    X = te.placeholder((s.batch, s.in_ch, s.height, s.width), "float32", name="X")
    S = te.placeholder((s.batch,), "float32", name="S")
    Z = te.placeholder((s.batch,), "float32", name="Z")
    W = te.placeholder(s.weight_shape(g, lanes), _W_DTYPE[variant], name="W")
    SUMW = te.placeholder((s.o8 * 8,), "int32", name="SUMW")
    WS = te.placeholder((s.o8 * 8,), "float32", name="WS")
    qlo, qhi = (float(v) for v in spec.q_range)
    off = float(spec.act_offset)
    P = s.pad

    def quantize(x, n):
        return tirx.max(tirx.min(tirx.nearbyint(x / S[n]) + Z[n], qhi), qlo) + off

    def source(n, ch, h, w):  # the input pixel under packed position (h, w), clamped into X
        return (
            n,
            tirx.min(ch, s.in_ch - 1),
            tirx.max(tirx.min(h - P, s.height - 1), 0),
            tirx.max(tirx.min(w - P, s.width - 1), 0),
        )

    def inside(ch, h, w):
        return tirx.all(ch < s.in_ch, h >= P, h < s.height + P, w >= P, w < s.width + P)

    def pack(n, c, h, w, ci):
        ch = c * 8 + ci
        return tirx.Select(inside(ch, h, w), quantize(X[source(n, ch, h, w)], n), Z[n] + off).astype(act_dtype)

    A = te.compute(s.act_shape(), pack, name="pack")
    shift = spec.weight_shift if variant == "vnni512" else 0
    if not shift and (spec.w_min < -128 or spec.w_max > 127) and variant != "int16":
        raise ValueError(f"variant {variant!r} cannot hold weights {spec.w_min}..{spec.w_max}")
    bias = None
    if shift:  # sum u * w = c * sum u + sum u * (w - c): c * sum u joins the conv's sums
        wsum = window_sum(A, s, shift)
        bias = lambda n, og, h, w, oi: wsum[n, h, w]  # noqa: E731
    acc = conv2d_stages(A, W, s, variant, chunk_groups, bias)

    def deq(n, o, h, w):
        zp = (Z[n] + off).astype("int32")
        total = acc[n, o // lanes, h, w, o % lanes] - zp * SUMW[o]
        return total.astype("float32") * (S[n] * WS[o])

    Y = te.compute((s.batch, s.out_ch, s.out_height, s.out_width), deq, name="deq")
    return te.create_prim_func([X, S, Z, W, SUMW, WS, Y])


def window_sum(A: te.Tensor, s: Conv2dShape, scale: int = 1) -> te.Tensor:
    """``[N][OH][OW]`` int32: ``scale`` x the sum of the packed activations (real channels) under each window."""
    r = te.reduce_axis((0, s.in_ch), "r")
    row = te.compute(
        (s.batch, s.height + 2 * s.pad, s.width + 2 * s.pad),
        lambda n, h, w: te.sum(A[n, r // 8, h, w, r % 8].astype("int32"), axis=[r]),
        name="wsum_row",
    )
    kh = te.reduce_axis((0, s.kernel), "kh")
    kw = te.reduce_axis((0, s.kernel), "kw")
    return te.compute(
        (s.batch, s.out_height, s.out_width),
        lambda n, h, w: te.sum(scale * row[n, h * s.stride + kh, w * s.stride + kw], axis=[kh, kw]),
        name="wsum",
    )


def _schedule_window_sum(sch: tvm.s_tir.Schedule) -> None:
    """Parallel over (n, row), the reductions outside a vectorized pixel loop."""
    for name in ("wsum_row", "wsum"):
        block = sch.get_sblock(name)
        n, h, w, *red = sch.get_loops(block)
        sch.reorder(*red, w)
        sch.parallel(sch.fuse(n, h))
        extent = int(sch.get(w).extent)
        lanes = max(d for d in range(1, 17) if extent % d == 0)  # an exact split: no predicate
        if lanes > 1:  # vectorize before decompose_reduction (the update must keep its init)
            sch.vectorize(sch.split(w, [None, lanes])[1])
        sch.decompose_reduction(block, red[0])


def _parallel_vectorize(sch: tvm.s_tir.Schedule, block: str, n_parallel: int, lanes: int) -> None:
    loops = sch.get_loops(sch.get_sblock(block))
    sch.parallel(sch.fuse(*loops[:n_parallel]))
    inner = loops[-1]
    extent = int(sch.get(inner).extent)
    if extent % lanes == 0 and extent > lanes:
        _, inner = sch.split(inner, [None, lanes])
    if int(sch.get(inner).extent) <= 64:
        sch.vectorize(inner)


def schedule_qconv(func: tvm.tirx.PrimFunc, spec: QConvSpec, variant: str) -> tvm.s_tir.Schedule:
    """The conv block as :func:`.conv2d_int8.schedule_conv2d`; pack and dequantize parallel and vectorized."""
    sch = schedule_conv2d(func, spec.shape, variant, DEFAULT_CONFIGS[variant])
    _parallel_vectorize(sch, "pack", 3, 8)  # n, c8, h parallel; the 8 packed channels as one vector
    if variant == "vnni512" and spec.weight_shift:
        _schedule_window_sum(sch)
    if variant == "vnni512" and spec.shape.out_width % 16 == 0 and spec.shape.out_ch % 16 == 0:
        _deq_transposed(sch, spec)
    else:
        _parallel_vectorize(sch, "deq", 3, 8)  # n, o, h parallel; rows vectorized (strided loads)
    return sch


def _deq_transposed(sch: tvm.s_tir.Schedule, spec: QConvSpec) -> None:
    """The [N][O/16][H][W][16] sums dequantized 16 x 16 tiles at a time, transposed in registers
    (:func:`.x86_intrin.deq16_intrinsic`); parallel over (n, row) so a row's sums stay in L1.
    (Dequantizing inside the conv's register tiles measured slower: scalar scatter stores.)"""
    n, o, h, w = sch.get_loops(sch.get_sblock("deq"))
    ob, oi = sch.split(o, [None, 16])
    wo, wi = sch.split(w, [None, 16])
    sch.reorder(n, h, ob, wo, oi, wi)
    sch.parallel(sch.fuse(n, h))
    sch.tensorize(oi, deq16_intrinsic(float(spec.act_offset)))


def chunk_groups_for(spec: QConvSpec, variant: str) -> int:
    c8 = spec.shape.c8
    chunk = c8
    if variant in _LOWBIT:
        chunk = min(chunk, lowbit_chunk_groups(spec.shape, spec.act_max, spec.w_min, spec.w_max))
    while c8 % chunk:
        chunk -= 1
    return chunk


def qconv_primfunc(spec: QConvSpec, variant: str) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of ``spec`` with ``variant`` (see :func:`choose_variant`)."""
    if variant == "amx":
        return qconv_amx_compute(spec, spec.weight_shift)
    func = qconv_compute(spec, variant, chunk_groups_for(spec, variant))
    sch = schedule_qconv(func, spec, variant)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("refqsr.variant", variant)


def pack_qconv_weights(w_int: np.ndarray, variant: str, shift: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(packed weights, per-output-channel sums padded to O/8*8) of integer OIHW weights.

    "vnni512" and "amx" pack w - ``shift``; pass the kernel's :attr:`QConvSpec.weight_shift` (the default,
    :func:`weight_shift` of the weights' own range, agrees only for a spec made from these weights).
    The sums stay those of w.
    """
    w_int = np.asarray(w_int, dtype=np.int64)
    if variant in ("vnni512", "amx"):
        if shift is None:
            shift = weight_shift(int(w_int.min()), int(w_int.max())) if w_int.size else 0
        if shift is None:
            raise ValueError(f"weights span more than 256 values: no s8 shift for {variant!r}")
        packed = pack_amx_weights(w_int - shift) if variant == "amx" else pack_weights(w_int - shift, variant)
    else:
        packed = pack_weights(w_int, variant)
    o8 = layouts.ceil8(w_int.shape[0])
    sums = np.zeros(o8, dtype=np.int32)
    sums[: w_int.shape[0]] = w_int.reshape(w_int.shape[0], -1).sum(axis=1)
    return packed, sums
