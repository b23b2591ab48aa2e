"""The fused quantized conv of :mod:`.qconv_fused` on Intel AMX tiles (variant ``"amx"``).

Same contract as the other variants -- ``main(X, S, Z, W, SUMW, WS, Y)``, float in, float out,
exact integer arithmetic inside -- with the conv as a tile GEMM per output row:

``pack``  u = clamp(round_half_even(X / S[n]) + Z[n], qlo, qhi) + offset, stored as
          ``[N][C/4][H+2P][W+2P][4]`` (4 channels of a pixel adjacent: one VNNI group), padding
          at the zero point u0 = Z[n] + offset. With a weight shift c, also the per-pixel channel
          sum ``usum[N][H+2P][W+2P]``.
``conv``  one parallel task per (sample, output row): for 32 output channels x 32 pixels at a
          time, 4 int32 accumulator tiles C[o][p] += W[o][c] . u[c][p] over the K x K taps and
          the 64-channel blocks (``tdpbsud``: s8 weights as the 16 x 64 A tile, the u8 activations
          of 16 pixels as the 16 x (16 x 4) B tile, read straight from the packed rows with a
          stride of one channel group), stored into a per-task ``[O][W]`` int32 row.
``deq``   Y[n, o, h, :] = (acc[o, :] + c * window_sum(u) - u0 * SUMW[o]) * S[n] * WS[o], 16 pixels
          per vector, written straight into the NCHW output.

Exactness: every product is an exact s8 x u8 and the tile unit sums them in int32 (no int16
step, no saturation), so the same int32 bound as "vnni512" holds (:func:`.qconv_fused.vnni512_is_exact`).
Weights beyond s8 (DDTB's asymmetric 8-bit weights) run as w - c with c * window_sum(u) added
back, exactly as "vnni512" does.

Applies to stride-1 convs with input channels a multiple of 64 and output channels and output
width multiples of 32 (SRResNet's and CARN's 64-channel body convs on 96-px patches); other
shapes keep the AVX-512 kernel (:func:`amx_fits`).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from . import amx
from .conv2d_int8 import Conv2dShape

#: input channels per K step (one 64-byte tile row of int8)
K_BLOCK = 64
#: output channels and pixels per accumulator-tile pair (2 x 16)
TILE2 = 32


def amx_fits(shape: Conv2dShape) -> bool:
    """Whether the AMX conv covers this problem (see the module doc)."""
    return (
        shape.stride == 1
        and shape.pad == shape.kernel // 2
        and shape.in_ch % K_BLOCK == 0
        and shape.out_ch % TILE2 == 0
        and shape.out_width % TILE2 == 0
    )


def pack_amx_weights(w_int: np.ndarray) -> np.ndarray:
    """Integer OIHW weights (already shifted into s8) as the A tiles ``[K*K][C/64][O][64]``
    (row o of a tile: the 64 input channels of one K step, in channel order)."""
    w = np.asarray(w_int, dtype=np.int64)
    o, c, kh, kw = w.shape
    if c % K_BLOCK:
        raise ValueError(f"AMX weights need input channels in multiples of {K_BLOCK}, got {c}")
    if w.min(initial=0) < -128 or w.max(initial=0) > 127:
        raise ValueError("AMX weights must be s8 (shift them first)")
    t = w.reshape(o, c // K_BLOCK, K_BLOCK, kh * kw).transpose(3, 1, 0, 2)
    return np.ascontiguousarray(t, dtype=np.int8)


def qconv_amx_compute(spec, shift: int = 0) -> tvm.tirx.PrimFunc:
    """PrimFunc ``main(X, S, Z, W, SUMW, WS, Y)`` of a :class:`.qconv_fused.QConvSpec` (scheduled:
    loops, parallelism and tile instructions are written out)."""
    s: Conv2dShape = spec.shape
    if not amx_fits(s):
        raise ValueError(f"the AMX conv does not cover {s}")
    N, C, O, H, W, K, P = s.batch, s.in_ch, s.out_ch, s.height, s.width, s.kernel, s.pad
    OH, OW = s.out_height, s.out_width
    Hp, Wp = H + 2 * P, W + 2 * P
    C4, CB, KK = C // 4, C // K_BLOCK, K * K
    qlo, qhi = (float(v) for v in spec.q_range)
    off = float(spec.act_offset)
    b_stride = Wp * 4  # bytes between the rows of a B tile (consecutive channel groups of one image row)
    sh = int(shift)

    def quant(S, Z, n, x):  # ONNX QuantizeLinear onto the b-bit grid, shifted to unsigned
        return (T.max(T.min(T.nearbyint(x / S[n]) + Z[n], qhi), qlo) + off).astype("uint32")

    def zp_word(Z, n):  # the zero point (the value of 0.0) in all 4 bytes
        return (Z[n] + off).astype("uint32") * T.uint32(0x01010101)

    def byte_sum(word):
        return (
            (word & T.uint32(255))
            + ((word >> T.uint32(8)) & T.uint32(255))
            + ((word >> T.uint32(16)) & T.uint32(255))
            + (word >> T.uint32(24))
        ).astype("int32")

    @T.prim_func(s_tir=True)
    def main(
        X: T.Buffer((N, C, H, W), "float32"),
        S: T.Buffer((N,), "float32"),
        Z: T.Buffer((N,), "float32"),
        Wt: T.Buffer((KK, CB, O, K_BLOCK), "int8"),
        SUMW: T.Buffer((O,), "int32"),
        WS: T.Buffer((O,), "float32"),
        Y: T.Buffer((N, O, OH, OW), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        # a pixel's 4 channels of a VNNI group as one little-endian u32 (byte i = channel 4g + i):
        # computed 16 pixels at a time from 4 contiguous input rows, no byte shuffles
        act = T.alloc_buffer((N, Hp, C4, Wp), "uint32")
        usum = T.alloc_buffer((N, Hp, Wp), "int32")
        for t in T.parallel(N * Hp * C4):
            if t // C4 % Hp >= P and t // C4 % Hp < H + P:
                for wp in range(P):
                    act[t // (Hp * C4), t // C4 % Hp, t % C4, wp] = zp_word(Z, t // (Hp * C4))
                    act[t // (Hp * C4), t // C4 % Hp, t % C4, W + P + wp] = zp_word(Z, t // (Hp * C4))
                for wo16 in range(W // 16):
                    for w16 in T.vectorized(16):
                        act[t // (Hp * C4), t // C4 % Hp, t % C4, (wo16 * 16 + w16) + P] = (
                            quant(
                                S, Z, t // (Hp * C4), X[t // (Hp * C4), t % C4 * 4, t // C4 % Hp - P, (wo16 * 16 + w16)]
                            )
                            | (
                                quant(
                                    S,
                                    Z,
                                    t // (Hp * C4),
                                    X[t // (Hp * C4), t % C4 * 4 + 1, t // C4 % Hp - P, (wo16 * 16 + w16)],
                                )
                                << T.uint32(8)
                            )
                            | (
                                quant(
                                    S,
                                    Z,
                                    t // (Hp * C4),
                                    X[t // (Hp * C4), t % C4 * 4 + 2, t // C4 % Hp - P, (wo16 * 16 + w16)],
                                )
                                << T.uint32(16)
                            )
                            | (
                                quant(
                                    S,
                                    Z,
                                    t // (Hp * C4),
                                    X[t // (Hp * C4), t % C4 * 4 + 3, t // C4 % Hp - P, (wo16 * 16 + w16)],
                                )
                                << T.uint32(24)
                            )
                        )
            else:
                for wp in range(Wp):
                    act[t // (Hp * C4), t // C4 % Hp, t % C4, wp] = zp_word(Z, t // (Hp * C4))
        if sh != 0:
            for t in T.parallel(N * Hp):
                for wp in range(Wp):
                    usum[t // Hp, t % Hp, wp] = 0
                for c4 in range(C4):
                    for wp in range(Wp):
                        usum[t // Hp, t % Hp, wp] = usum[t // Hp, t % Hp, wp] + byte_sum(act[t // Hp, t % Hp, c4, wp])
        for t in T.parallel(N * OH):
            cfg = T.alloc_buffer((64,), "uint8")
            acc = T.alloc_buffer((O, OW), "int32")
            wsum = T.alloc_buffer((OW,), "int32")
            amx.configure(cfg)
            for ob, pb in T.grid(O // TILE2, OW // TILE2):
                amx.zero_acc()
                for kh, kw, cb in T.grid(K, K, CB):
                    amx.multiply(
                        Wt, act, t // OH, t % OH + kh, ob, pb, kh * K + kw, cb, kw, K_BLOCK, b_stride, amx.TDPBSUD
                    )
                amx.store_acc(acc, ob * TILE2, pb * TILE2, OW)
            T.evaluate(T.call_llvm_intrin("void", amx.TILERELEASE))
            for wo in range(OW // 16):
                for wi in T.vectorized(16):
                    wsum[wo * 16 + wi] = 0
                if sh != 0:
                    for kh, kw in T.grid(K, K):
                        for wi in T.vectorized(16):
                            wsum[wo * 16 + wi] = wsum[wo * 16 + wi] + usum[t // OH, t % OH + kh, wo * 16 + wi + kw]
            for o, wo in T.grid(O, OW // 16):
                for wi in T.vectorized(16):
                    Y[t // OH, o, t % OH, wo * 16 + wi] = (
                        acc[o, wo * 16 + wi] + sh * wsum[wo * 16 + wi] - (Z[t // OH] + off).astype("int32") * SUMW[o]
                    ).astype("float32") * (S[t // OH] * WS[o])

    return main.with_attr("tirx.is_scheduled", True).with_attr("refqsr.variant", "amx")
