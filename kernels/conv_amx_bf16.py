"""Float 2-D convolution on Intel AMX bf16 tiles, with fp32-grade accuracy by splitting (``bf16x3``).

``main(X, WH, WL, B, [R,] Y)``: Y = conv2d(X, W) + B (+ R), X/Y fp32 NCHW, stride 1, "same" padding.

bf16 keeps 8 bits of an fp32 mantissa. Splitting both operands, x = xh + xl and w = wh + wl
(xh = bf16(x), xl = bf16(x - xh)), and summing the three largest products
``wh*xh + wh*xl + wl*xh`` in fp32 leaves an error of about |x w| 2^-16 per product (the dropped
``wl*xl`` and the rounding of xl, wl) -- far below what changes an 8-bit output image, where one
bf16 product alone (``terms=1``) errs by up to 2^-8. The tile unit (``tdpbf16ps``: a 16 x 32
bf16 tile times a 32 x 16 one into 16 x 16 fp32, 8,192 MACs per instruction) does the three
products at 3x the single cost, still several times the AVX-512 fp32 FMA rate.

Layout: activations packed per call as ``[N][C/2][H+2P][W+2P]`` u32 words holding the bf16 of
channels 2g (low half) and 2g+1 (high half) of a pixel -- one VNNI pair, so 16 pixels of a tile
row are 64 contiguous bytes -- for xh and xl; weights packed at compile time as A tiles
``[K*K][C/32][O][32]`` (bf16 bits in u16) for wh and wl. One parallel task per (sample, output
row): 32 output channels x 32 pixels in 4 fp32 accumulator tiles at a time, stored into a per-task
``[O][W]`` row, then bias (and residual) added on the way to the NCHW output.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from . import amx

#: input channels per K step (one 64-byte tile row of bf16)
K_BLOCK = 32
#: output channels and pixels per accumulator-tile pair (2 x 16)
TILE2 = 32


def bf16_fits(batch: int, in_ch: int, out_ch: int, out_width: int, stride: int = 1) -> bool:
    """Whether :func:`conv_bf16_compute` covers this conv."""
    return stride == 1 and in_ch % K_BLOCK == 0 and out_ch % TILE2 == 0 and out_width % TILE2 == 0 and batch >= 1


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (u16) of fp32 values, rounded to nearest even (finite inputs)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def split_bf16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) bf16 bits with hi + lo ~= x to about 16 mantissa bits."""
    hi = bf16_bits(x)
    lo = bf16_bits(np.asarray(x, np.float32) - bf16_value(hi))
    return hi, lo


def pack_bf16_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 OIHW weights as the hi and lo A tiles ``[K*K][C/32][O][32]`` (u16 bf16 bits)."""
    w = np.asarray(w, dtype=np.float32)
    o, c, kh, kw = w.shape
    if c % K_BLOCK:
        raise ValueError(f"bf16 AMX weights need input channels in multiples of {K_BLOCK}, got {c}")
    t = np.ascontiguousarray(w.reshape(o, c // K_BLOCK, K_BLOCK, kh * kw).transpose(3, 1, 0, 2))
    hi, lo = split_bf16(t)
    return hi, lo


def hi_bits(x):
    """TIR: fp32 -> its bf16 bits (in the low half of a u32), rounded to nearest even."""
    u = T.reinterpret("uint32", x)
    return (u + T.uint32(0x7FFF) + ((u >> T.uint32(16)) & T.uint32(1))) >> T.uint32(16)


def lo_bits(x):
    """TIR: bf16 bits of x - bf16(x), the second half of the split."""
    return hi_bits(x - T.reinterpret("float32", hi_bits(x) << T.uint32(16)))


def pair(f, x0, x1):
    """TIR: two channels' bf16 (``f`` = hi_bits or lo_bits) as one VNNI word."""
    return f(x0) | (f(x1) << T.uint32(16))


@T.macro
def _pack_split_row(X, xh, xl, n, hp, g, H, W, P, width, lo_terms):
    """One packed row ``xh/xl[n, hp, g, 0:width]`` of channel pair g: zeros where padded (rows and
    columns outside the image, columns up to ``width``), else :func:`pair` of hi / lo bits."""
    if hp >= P and hp < H + P:
        for wp in range(P):
            xh[n, hp, g, wp] = T.uint32(0)
            xl[n, hp, g, wp] = T.uint32(0)
        for wp in range(width - W - P):
            xh[n, hp, g, W + P + wp] = T.uint32(0)
            xl[n, hp, g, W + P + wp] = T.uint32(0)
        for wo16 in range(W // 16):
            for w16 in T.vectorized(16):
                xh[n, hp, g, wo16 * 16 + w16 + P] = pair(
                    hi_bits, X[n, g * 2, hp - P, wo16 * 16 + w16], X[n, g * 2 + 1, hp - P, wo16 * 16 + w16]
                )
        if lo_terms:
            for wo16 in range(W // 16):
                for w16 in T.vectorized(16):
                    xl[n, hp, g, wo16 * 16 + w16 + P] = pair(
                        lo_bits, X[n, g * 2, hp - P, wo16 * 16 + w16], X[n, g * 2 + 1, hp - P, wo16 * 16 + w16]
                    )
    else:
        for wp in range(width):
            xh[n, hp, g, wp] = T.uint32(0)
            xl[n, hp, g, wp] = T.uint32(0)


def conv_bf16_compute(
    batch: int,
    in_ch: int,
    out_ch: int,
    height: int,
    width: int,
    kernel: int = 3,
    padding: int | None = None,
    terms: int = 3,
    residual: bool = False,
) -> tvm.tirx.PrimFunc:
    """PrimFunc ``main(X, WH, WL, B, [R,] Y)`` (scheduled). ``terms`` 3 (bf16x3, fp32-grade) or 1
    (plain bf16: WL is ignored)."""
    if terms not in (1, 3):
        raise ValueError("terms must be 1 (bf16) or 3 (bf16x3)")
    N, C, O, H, W, K = batch, in_ch, out_ch, height, width, kernel
    P = K // 2 if padding is None else int(padding)
    OH, OW = H + 2 * P - K + 1, W + 2 * P - K + 1
    if not bf16_fits(N, C, O, OW):
        raise ValueError(f"the bf16 AMX conv does not cover C={C}, O={O}, output width {OW}")
    Hp, Wp = H + 2 * P, W + 2 * P
    C2, CB, KK = C // 2, C // K_BLOCK, K * K
    b_stride = Wp * 4  # bytes between the rows of a B tile (consecutive channel pairs of one image row)
    lo_terms = terms == 3

    @T.prim_func(s_tir=True)
    def main(
        X: T.Buffer((N, C, H, W), "float32"),
        WH: T.Buffer((KK, CB, O, K_BLOCK), "uint16"),
        WL: T.Buffer((KK, CB, O, K_BLOCK), "uint16"),
        Bias: T.Buffer((O,), "float32"),
        R: T.Buffer((N, O, OH, OW), "float32"),
        Y: T.Buffer((N, O, OH, OW), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        xh = T.alloc_buffer((N, Hp, C2, Wp), "uint32")
        xl = T.alloc_buffer((N, Hp, C2, Wp), "uint32")
        for t in T.parallel(N * Hp * C2):
            _pack_split_row(X, xh, xl, t // (Hp * C2), t // C2 % Hp, t % C2, H, W, P, Wp, lo_terms)
        for t in T.parallel(N * OH):
            cfg = T.alloc_buffer((64,), "uint8")
            acc = T.alloc_buffer((O, OW), "float32")
            amx.configure(cfg)
            for ob, pb in T.grid(O // TILE2, OW // TILE2):
                amx.zero_acc()
                for kh, kw, cb in T.grid(K, K, CB):
                    amx.multiply(
                        WH, xh, t // OH, t % OH + kh, ob, pb, kh * K + kw, cb, kw, K_BLOCK * 2, b_stride, amx.TDPBF16PS
                    )
                    if lo_terms:  # wh . xl (the wh tiles are still loaded), then wl . xh
                        amx.multiply_b(xl, t // OH, t % OH + kh, cb, pb, kw, b_stride, amx.TDPBF16PS)
                        amx.multiply(
                            WL,
                            xh,
                            t // OH,
                            t % OH + kh,
                            ob,
                            pb,
                            kh * K + kw,
                            cb,
                            kw,
                            K_BLOCK * 2,
                            b_stride,
                            amx.TDPBF16PS,
                        )
                amx.store_acc(acc, ob * TILE2, pb * TILE2, OW)
            T.evaluate(T.call_llvm_intrin("void", amx.TILERELEASE))
            for o, wo in T.grid(O, OW // 16):
                if residual:
                    for wi in T.vectorized(16):
                        Y[t // OH, o, t % OH, wo * 16 + wi] = (
                            acc[o, wo * 16 + wi] + Bias[o] + R[t // OH, o, t % OH, wo * 16 + wi]
                        )
                else:
                    for wi in T.vectorized(16):
                        Y[t // OH, o, t % OH, wo * 16 + wi] = acc[o, wo * 16 + wi] + Bias[o]

    func = main
    if not residual:  # drop the R parameter: main(X, WH, WL, B, Y)
        func = _without_param(func, 4)
    return func.with_attr("tirx.is_scheduled", True).with_attr("refqsr.variant", f"amx_bf16x{terms}")


def _without_param(func: tvm.tirx.PrimFunc, index: int) -> tvm.tirx.PrimFunc:
    params = list(func.params)  # TVM 0.27: the parameters are the buffers themselves
    params.pop(index)
    return tvm.tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def fold_fits(batch: int, in_ch: int, out_ch: int, kernel: int, out_width: int, stride: int = 1) -> bool:
    """Whether :func:`conv_bf16_fold_compute` covers this conv (few outputs, wide kernel)."""
    return (
        stride == 1
        and batch >= 1
        and in_ch % K_BLOCK == 0
        and out_ch * kernel <= TILE2
        and kernel > 1
        and out_width % 16 == 0
    )


def pack_fold_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 OIHW weights as the hi and lo A tiles ``[K][C/32][32][32]`` of the folded conv: row
    o*K + kw of tap row kh holds W[o, :, kh, kw] (rows beyond O*K are zero)."""
    w = np.asarray(w, dtype=np.float32)
    o, c, kh, kw = w.shape
    if c % K_BLOCK or o * kw > TILE2:
        raise ValueError(f"the folded bf16 conv needs C % {K_BLOCK} == 0 and O*K <= {TILE2}, got {w.shape}")
    t = np.zeros((kh, c // K_BLOCK, TILE2, K_BLOCK), np.float32)
    # [O, C, KH, KW] -> [KH, C/32, O*KW, 32]
    t[:, :, : o * kw] = (
        w.reshape(o, c // K_BLOCK, K_BLOCK, kh, kw).transpose(3, 1, 0, 4, 2).reshape(kh, c // K_BLOCK, o * kw, K_BLOCK)
    )
    return split_bf16(t)


def conv_bf16_fold_compute(
    batch: int, in_ch: int, out_ch: int, height: int, width: int, kernel: int, terms: int = 3
) -> tvm.tirx.PrimFunc:
    """PrimFunc ``main(X, WH, WL, B, Y)`` for convs with few output channels and a wide kernel
    (SRResNet's 9 x 9, 64 -> 3 tail): the kernel columns are folded into the tile rows.

    A tile product needs 16 output rows; 3 output channels would waste 13/16 of it. Instead row
    o*K + kw of the A tiles holds the weights of (o, kw) for one kernel row kh, so one pass over
    the padded input columns gives Z[o*K + kw][col] = sum_{kh, c} W[o, c, kh, kw] X[c, h + kh, col]
    (27 of 32 rows used), and Y[o, w] = B[o] + sum_kw Z[o*K + kw][w + kw] -- a K-tap shifted sum in
    the epilogue. Same split-bf16 products and fp32 sums as :func:`conv_bf16_compute`."""
    if terms not in (1, 3):
        raise ValueError("terms must be 1 (bf16) or 3 (bf16x3)")
    N, C, O, H, W, K = batch, in_ch, out_ch, height, width, kernel
    P = K // 2
    if not fold_fits(N, C, O, K, W):
        raise ValueError(f"the folded bf16 AMX conv does not cover C={C}, O={O}, K={K}, width {W}")
    Hp, Wp = H + 2 * P, W + 2 * P
    Wa = -(-Wp // TILE2) * TILE2  # padded columns, whole tile pairs (beyond Wp: zeros)
    C2, CB = C // 2, C // K_BLOCK
    b_stride = Wa * 4
    lo_terms = terms == 3

    @T.prim_func(s_tir=True)
    def main(
        X: T.Buffer((N, C, H, W), "float32"),
        WH: T.Buffer((K, CB, TILE2, K_BLOCK), "uint16"),
        WL: T.Buffer((K, CB, TILE2, K_BLOCK), "uint16"),
        Bias: T.Buffer((O,), "float32"),
        Y: T.Buffer((N, O, H, W), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        xh = T.alloc_buffer((N, Hp, C2, Wa), "uint32")
        xl = T.alloc_buffer((N, Hp, C2, Wa), "uint32")
        for t in T.parallel(N * Hp * C2):
            _pack_split_row(X, xh, xl, t // (Hp * C2), t // C2 % Hp, t % C2, H, W, P, Wa, lo_terms)
        for t in T.parallel(N * H):
            cfg = T.alloc_buffer((64,), "uint8")
            acc = T.alloc_buffer((TILE2, Wa), "float32")
            amx.configure(cfg)
            for pb in range(Wa // TILE2):
                amx.zero_acc()
                for kh, cb in T.grid(K, CB):  # one tap row; the kernel columns are tile rows
                    amx.multiply(WH, xh, t // H, t % H + kh, 0, pb, kh, cb, 0, K_BLOCK * 2, b_stride, amx.TDPBF16PS)
                    if lo_terms:  # wh . xl, then wl . xh
                        amx.multiply_b(xl, t // H, t % H + kh, cb, pb, 0, b_stride, amx.TDPBF16PS)
                        amx.multiply(WL, xh, t // H, t % H + kh, 0, pb, kh, cb, 0, K_BLOCK * 2, b_stride, amx.TDPBF16PS)
                amx.store_acc(acc, 0, pb * TILE2, Wa)
            T.evaluate(T.call_llvm_intrin("void", amx.TILERELEASE))
            for o, wo in T.grid(O, W // 16):
                for wi in T.vectorized(16):
                    Y[t // H, o, t % H, wo * 16 + wi] = Bias[o]
                for kw in range(K):
                    for wi in T.vectorized(16):
                        Y[t // H, o, t % H, wo * 16 + wi] = (
                            Y[t // H, o, t % H, wo * 16 + wi] + acc[o * K + kw, wo * 16 + wi + kw]
                        )

    return main.with_attr("tirx.is_scheduled", True).with_attr("refqsr.variant", f"amx_bf16x{terms}_fold")
