"""One compiled quantized conv as the graph sees it: float in, float out, integer arithmetic inside.

``qconv(X, S, Z, W, SUMW, WS) -> Y`` replaces ``conv2d(dequantize(quantize(X, S, Z)), dequantize(Wq))``
of an exported QDQ graph, in three blocks of one PrimFunc:

``pack``   q = clamp(round_half_even(X / S[n]) + Z[n], qlo, qhi) (ONNX QuantizeLinear, saturated to the
           conv's b-bit grid), shifted to an unsigned grid u = q + offset (signed symmetric
           grids get offset 2^(b-1), so u is in 0 .. 2^b - 1) and packed as
           ``[N][C/8][H+2P][W+2P][8]``; padding (and channels beyond C) hold the zero point
           u0 = Z[n] + offset, which is the value of 0.0.
``conv``   the tensorized AVX2 integer conv of :mod:`.conv2d_int8`: int32 sums of u * w.
``deq``    Y = (sum - u0[n] * SUMW[o]) * S[n] * WS[o]   (SUMW = sum of the integer weights of o).

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
    _W_DTYPE,
    DEFAULT_CONFIGS,
    Conv2dShape,
    conv2d_stages,
    lowbit_chunk_groups,
    schedule_conv2d,
)


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


def choose_variant(act_max: int, w_min: int, w_max: int, vnni: bool = False, kernel: int = 3,
                   channel_groups: int = 8) -> str:
    """The fastest conv variant that is exact for these operand ranges.

    Order (speed measured on the test box, see ``bench_conv_int8``): "lowbit" when the int16
    chunks hold at least one 8-channel group, "vnni" where the CPU has it, "int8pair", "int8",
    and the exact 16-bit "int16" (full u8 x s8, or weights beyond s8) as the fallback.
    """
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
    g = layouts.GROUP[variant]
    act_dtype = _ACT_DTYPE[variant]
    X = te.placeholder((s.batch, s.in_ch, s.height, s.width), "float32", name="X")
    S = te.placeholder((s.batch,), "float32", name="S")
    Z = te.placeholder((s.batch,), "float32", name="Z")
    W = te.placeholder(s.weight_shape(g), _W_DTYPE[variant], name="W")
    SUMW = te.placeholder((s.o8 * 8,), "int32", name="SUMW")
    WS = te.placeholder((s.o8 * 8,), "float32", name="WS")
    qlo, qhi = (float(v) for v in spec.q_range)
    off = float(spec.act_offset)
    P = s.pad

    def pack(n, c, h, w, ci):
        ch = c * 8 + ci
        inside = tirx.all(ch < s.in_ch, h >= P, h < s.height + P, w >= P, w < s.width + P)
        x = X[n, tirx.min(ch, s.in_ch - 1), tirx.max(tirx.min(h - P, s.height - 1), 0),
              tirx.max(tirx.min(w - P, s.width - 1), 0)]
        q = tirx.max(tirx.min(tirx.nearbyint(x / S[n]) + Z[n], qhi), qlo)
        return tirx.Select(inside, q + off, Z[n] + off).astype(act_dtype)

    A = te.compute(s.act_shape(), pack, name="pack")
    acc = conv2d_stages(A, W, s, variant, chunk_groups)

    def deq(n, o, h, w):
        zp = (Z[n] + off).astype("int32")
        total = acc[n, o // 8, h, w, o % 8] - zp * SUMW[o]
        return total.astype("float32") * (S[n] * WS[o])

    Y = te.compute((s.batch, s.out_ch, s.out_height, s.out_width), deq, name="deq")
    return te.create_prim_func([X, S, Z, W, SUMW, WS, Y])


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
    _parallel_vectorize(sch, "deq", 3, 8)  # n, o, h parallel; rows vectorized
    return sch


def chunk_groups_for(spec: QConvSpec, variant: str) -> int:
    c8 = spec.shape.c8
    chunk = c8
    if variant == "lowbit":
        chunk = min(chunk, lowbit_chunk_groups(spec.shape, spec.act_max, spec.w_min, spec.w_max))
    while c8 % chunk:
        chunk -= 1
    return chunk


def qconv_primfunc(spec: QConvSpec, variant: str) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of ``spec`` with ``variant`` (see :func:`choose_variant`)."""
    func = qconv_compute(spec, variant, chunk_groups_for(spec, variant))
    sch = schedule_qconv(func, spec, variant)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("refqsr.variant", variant)


def pack_qconv_weights(w_int: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(packed weights, per-output-channel sums padded to O/8*8) of integer OIHW weights."""
    w_int = np.asarray(w_int, dtype=np.int64)
    packed = layouts.pack_weights(w_int, layouts.GROUP[variant], _W_DTYPE[variant])
    o8 = layouts.ceil8(w_int.shape[0])
    sums = np.zeros(o8, dtype=np.int32)
    sums[: w_int.shape[0]] = w_int.reshape(w_int.shape[0], -1).sum(axis=1)
    return packed, sums
