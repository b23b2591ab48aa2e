"""CUDA ("same" or 1x1, stride 1) convolutions for ``--target cuda``: int8 and int4 tensor cores
(``mma.sync`` on packed u8/s8 and u4/s4 words), dp4a, and fp16 tensor cores for the float convs
(``f16mma``: packed fp16 pairs, fp32 sums), plus an LLVM "twin" of each that runs on the CPU.

All compute the raw integer sum ``out[n,o,h,w] = sum_{c,kh,kw} a[n,c,h+kh,w+kw] * w[o,c,kh,kw]``
(int32) over activations **pre-padded** by the caller (the pad value is the zero point; the
zero-point term, and a weight shift if any, are handled outside, as for the CPU kernels in
:mod:`.layouts`).

Variant ``"dp4a"`` (int8; ``C % 4 == 0``)::

    activations  [N][C/4][H+2P][W+2P][4]   uint8 (u8 activations) or int8 (s8)   "NCHW4c"
    weights      [O][C/4][K][K][4]         int8                                    "OIHW4i"
    output       [N][O][H][W]              int32                                   NCHW

  Four consecutive input channels are one 32-bit word, the operand of one ``dp4a`` (4 MACs).
  u8 x s8 is ``dp4a.u32.s32`` -- exact for the full ranges, no offset trick (CUDA C's
  ``__dp4a`` has no mixed-sign overload, so the instruction is emitted through ``T.ptx.dp4a``).
  Schedule: a block computes 2 rows x up to 32 pixels x up to 32 output channels; thread
  (ty, tx) holds 2 rows x 4 channels in registers; per chunk of 16 input channels the window
  of activations and the weights of the block are staged in shared memory.

Variants ``"s4mma"`` (int4; ``C % 32 == 0``) and ``"s8mma"`` (int8; ``C % 16 == 0``), both with
``O % 8 == 0`` and ``N*H*W % 16 == 0``::

    activations  [N][H+2P][W+2P][C/e]      uint32, e channels per word   NHWC, packed
    weights      [O][K*K][C/e]             uint32, e channels per word   O(kh kw)I, packed
    output       [N][H][W][O]              int32                         NHWC

  e = 8 nibbles (s4) or 4 bytes (s8): channel ``c`` is element ``c % e`` (bits
  ``(32/e)*(c%e)``..) of word ``c // e``, two's complement for signed values. TVM's own ``int4``
  buffers are not used (they give wrong results), so the words are packed here
  (:func:`pack_nibbles`, :func:`pack_bytes`) and handed to ``mma`` as ``.b32`` registers.
  Implicit GEMM: M = output pixels (n, h, w flattened), N = output channels, K = (kh, kw, c)
  split into chunks of 4 words (32 channels for s4, 16 for s8) ``j -> (tap = j // (C/chunk),
  channel block = j % (C/chunk))``. One mma consumes two chunks when the chunk count is even
  (``m16n8k64`` s4, ``m16n8k32`` s8), otherwise one (``m16n8k32`` s4, ``m16n8k16`` s8). With NHWC
  words, the e consecutive K elements a lane holds in one register (PTX ISA fragment layout: lane
  ``4*g + t`` holds row ``g`` (+8), columns ``e*t..e*t+e-1`` of each K half) are exactly one
  word: every fragment register is one aligned 32-bit word, no shuffles.

  Schedule: a warp computes 16*MT pixels x 8*NT channels (MT <= 2, NT <= 4), a block BP x BG
  warps (at most 4). Per mma step the block's threads copy the next step's A tile (BP*16*MT
  pixel rows x 8 words) and B tile (BG*8*NT channel rows x 8 words) from global memory into
  registers, run the current step's mmas on fragments read from one shared-memory buffer, store
  the registers into the other buffer and synchronise (double buffering: the global loads are in
  flight during the mmas). Shared-memory rows are 12 words apart (4 for one-chunk steps), so a
  fragment load's 32 lanes hit 32 distinct banks.

  Activations are unsigned (u4 0..15 / u8 0..255, default) or signed (``act_signed=True``);
  weights signed. PTX has the mixed ``.u4.s4`` and ``.u8.s8`` forms, so unsigned activations
  need no offset/correction term.

Variant ``"f16mma"`` (float; ``C % 8 == 0``, ``O % 8 == 0``, ``N*H*W % 16 == 0``): the same
implicit GEMM with e = 2 fp16 halves a word (channel ``c`` in bits ``16*(c%2)``.. of word ``c//2``,
:func:`pack_halves`), chunks of 8 channels, ``mma.sync ... m16n8k16 .f32.f16.f16.f32`` (two chunks)
or ``m16n8k8`` (one), fp32 accumulators and a float32 NHWC output of ``sum x16 * w16``. The kernel
may have ``kernel_w`` columns other than its ``kernel`` rows (a K x 1 kernel for a folded tail);
:func:`f16_pack_compute` is the elementwise kernel that rounds, pads and packs fp32 activations.

Epilogues (:data:`EPILOGUES`, the ``epilogue`` argument of the tensor-core kernels, their twins
and :func:`emulate_mma`): each accumulator is transformed at its one store. "f16" (f16mma) stores
the fp32 sum rounded to fp16; "dequant" / "dequant_ws" (s4mma, s8mma) take per-sample scale and
zero-point operands, per-output-channel weight sums and scales, and a per-pixel int32 window term
(read only by "dequant_ws"), and store ``fp16(fp32(acc + ws - u0 * sum_w) * (s * w_scale))``
(:func:`dequant_epilogue_reference`): fp16 NHWC, half the bytes of the raw sums. Each has a
"_relu" form ("f16_relu", "dequant_relu", "dequant_ws_relu") with one more operand, a per-output-
channel fp32 bias added to the fp32 value before a ReLU and the one rounding to fp16: the conv's
own bias add and activation, so its output needs no kernel of its own before the next readers.
The integer ones also have a "_res_relu" form ("dequant_res_relu", "dequant_ws_res_relu") that
adds an fp16 NHWC residual of the output's shape after the bias, before the ReLU: a residual
block's ``relu(conv + b + x)``.

Without a GPU nothing here runs on CUDA: the kernels are built with nvcc through
:mod:`.cuda_toolchain` and checked by their PTX and SASS, while the twins (the same packed
layouts, plain TIR, built for LLVM) and :func:`emulate_mma` (the mma kernels' own staging,
fragment and output index math replayed in numpy against the PTX ISA fragment layouts) are
tested bit-exact on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

from . import cuda_toolchain
from .tir_build import TirKernel, build_kernel, divisor_at_most

__all__ = [
    "FLOAT_VARIANTS",
    "VARIANTS",
    "conv2d_f16_compute",
    "conv2d_f16mma_primfunc",
    "emulate_f16mma",
    "f16_pack_compute",
    "SPLIT_PARTS",
    "out_dtype",
    "pack_activations_f16",
    "pack_halves",
    "pack_weights_f16",
    "unpack_halves",
    "Conv2dCudaShape",
    "CudaConvKernel",
    "COMPUTES",
    "MAX_PARTS",
    "MMA_BITS",
    "PRIMFUNCS",
    "build_conv2d_cuda",
    "build_conv2d_twin",
    "conv2d_dp4a_compute",
    "conv2d_dp4a_primfunc",
    "conv2d_s4_compute",
    "conv2d_s4mma_primfunc",
    "conv2d_s8_compute",
    "conv2d_s8mma_primfunc",
    "emulate_mma",
    "emulate_s4mma",
    "emulate_s8mma",
    "mma_chunk_channels",
    "mma_config",
    "pack_activations",
    "pack_activations_s8",
    "pack_bytes",
    "pack_weights",
    "pack_weights_s8",
    "s8mma_config",
    "unpack_activations_s8",
    "unpack_bytes",
    "unpack_weights_s8",
    "pack_activations_dp4a",
    "pack_activations_s4",
    "pack_nibbles",
    "pack_weights_dp4a",
    "pack_weights_s4",
    "s4mma_config",
    "unpack_activations_dp4a",
    "unpack_activations_s4",
    "unpack_nibbles",
    "unpack_output",
    "unpack_weights_dp4a",
    "unpack_weights_s4",
]

VARIANTS = ("dp4a", "s4mma", "s8mma", "f16mma")
#: the tensor-core variants: bits per operand element
MMA_BITS = {"s4mma": 4, "s8mma": 8, "f16mma": 16}
#: the tensor-core variants on float operands (fp16 halves, fp32 sums); the others are integer
FLOAT_VARIANTS = ("f16mma",)
#: the most input parts an f16mma 1x1 kernel reads in place (CARN's cascade concatenates four)
MAX_PARTS = 4


#: epilogues of the tensor-core kernels, applied to the accumulators before the one store:
#: None, the raw sums (int32 / fp32); "f16", the fp32 sums rounded to fp16 (f16mma);
#: "dequant", the integer sums dequantized in fp32 and rounded to fp16 (s4mma / s8mma, see
#: :func:`dequant_epilogue_reference`); "dequant_ws", the same with per-pixel int32 terms added
#: to the sums first (a weight shift's ``c * window sum``)
EPILOGUES = (
    None,
    "f16",
    "dequant",
    "dequant_ws",
    "f16_relu",
    "dequant_relu",
    "dequant_ws_relu",
    "dequant_res_relu",
    "dequant_ws_res_relu",
)
#: the integer epilogues: ``main(A, W, RS, RZ, CS, CW, WS, conv)`` (a bias ``B`` before ``conv``
#: in the "_relu" forms, and a residual ``R`` after it in the "_res_relu" forms)
DEQUANT_EPILOGUES = (
    "dequant",
    "dequant_ws",
    "dequant_relu",
    "dequant_ws_relu",
    "dequant_res_relu",
    "dequant_ws_res_relu",
)
#: the epilogues that add a per-output-channel bias ``B`` and apply a ReLU before the fp16 store
RELU_EPILOGUES = ("f16_relu", "dequant_relu", "dequant_ws_relu", "dequant_res_relu", "dequant_ws_res_relu")
#: the epilogues that also add an fp16 NHWC residual ``R`` (after the bias, before the ReLU)
RESIDUAL_EPILOGUES = ("dequant_res_relu", "dequant_ws_res_relu")


def base_epilogue(epilogue: str | None) -> str | None:
    """The epilogue without its bias, residual and ReLU steps: "dequant_ws_res_relu" -> "dequant_ws"."""
    for suffix in ("_res_relu", "_relu"):
        if epilogue in RELU_EPILOGUES and epilogue.endswith(suffix):
            return epilogue[: -len(suffix)]
    return epilogue


def with_relu(epilogue: str, residual: bool = False) -> str:
    """The bias-and-ReLU form of an epilogue: "dequant" -> "dequant_relu" ("dequant_res_relu"
    with a ``residual``, integer epilogues only)."""
    if epilogue not in (("dequant", "dequant_ws") if residual else ("f16", "dequant", "dequant_ws")):
        raise ValueError(f"no {'residual ' if residual else ''}bias-and-ReLU form of the epilogue {epilogue!r}")
    return f"{epilogue}_res_relu" if residual else f"{epilogue}_relu"


def window_term_shape(shape: Conv2dCudaShape, epilogue: str | None) -> tuple[int, int, int]:
    """Shape of an integer epilogue's WS operand: ``[N][H][W]`` for "dequant_ws", a one-element
    placeholder (not read) for "dequant"."""
    return (shape.batch, shape.height, shape.width) if base_epilogue(epilogue) == "dequant_ws" else (1, 1, 1)


def out_dtype(variant: str, epilogue: str | None = None) -> str:
    """Element type of a variant's output: fp32 sums for the float variants, int32 otherwise;
    fp16 with an epilogue."""
    _check_epilogue(variant, epilogue)
    if epilogue is not None:
        return "float16"
    return "float32" if variant in FLOAT_VARIANTS else "int32"


def _check_epilogue(variant: str, epilogue: str | None) -> None:
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if base_epilogue(epilogue) == "f16" and variant not in FLOAT_VARIANTS:
        raise ValueError(f"the f16 epilogue is for float variants, not {variant}")
    if epilogue in DEQUANT_EPILOGUES and (variant in FLOAT_VARIANTS or variant not in MMA_BITS):
        raise ValueError(f"the dequant epilogue is for the integer tensor-core variants, not {variant}")


def dequant_epilogue_reference(
    acc: np.ndarray,
    row_scale: np.ndarray,
    row_zero: np.ndarray,
    col_sum: np.ndarray,
    col_scale: np.ndarray,
    window: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    residual: np.ndarray | None = None,
) -> np.ndarray:
    """What the "dequant" epilogue writes for NHWC int32 sums ``acc[n][h][w][o]``:
    ``fp16(fp32(acc + window[n,h,w] - row_zero[n] * col_sum[o]) * fp32(row_scale[n] * col_scale[o]))``
    ("dequant_ws"; no window term for "dequant"), the integer terms in int32 and the scale product
    in fp32, the graph epilogue's order, rounded once to fp16 (round to nearest even). With
    ``bias`` ("_relu" forms) ``fp16(max(y + bias[o], 0))`` for that fp32 ``y``, with ``residual``
    (NHWC fp16, "_res_relu") ``fp16(max(y + bias[o] + residual, 0))``."""
    n, o = acc.shape[0], acc.shape[3]
    total = acc.astype(np.int64) - (np.asarray(row_zero, np.int64).reshape(n, 1, 1, 1) * np.asarray(col_sum, np.int64))
    if window is not None:
        total = total + np.asarray(window, np.int64).reshape(n, acc.shape[1], acc.shape[2], 1)
    total = total.astype(np.int32).astype(np.float32)
    scale = np.asarray(row_scale, np.float32).reshape(n, 1, 1, 1) * np.asarray(col_scale, np.float32).reshape(o)
    y = total * scale
    if bias is not None:
        y = y + np.asarray(bias, np.float32).reshape(o)
        if residual is not None:
            y = y + np.asarray(residual, np.float16).astype(np.float32)
        y = np.maximum(y, np.float32(0))
    return y.astype(np.float16)


@dataclass(frozen=True)
class Conv2dCudaShape:
    """A stride-1, "same"-padded conv problem and its packed buffer shapes per variant."""

    batch: int
    in_ch: int
    out_ch: int
    height: int
    width: int
    kernel: int = 3
    kernel_w: int = 0  # kernel columns when they differ from the rows (the tensor-core variants); 0: square
    # tensors whose channel concatenation is the input (f16mma 1x1 only): each fp16 NHWC
    # ``part_shape``, read in place by the kernel instead of one packed operand
    parts: int = 1

    def __post_init__(self):
        for name in ("batch", "in_ch", "out_ch", "height", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and >= 1, got {self.kernel}")
        if self.kernel_w < 0 or (self.kernel_w and self.kernel_w % 2 == 0):
            raise ValueError(f"kernel_w must be odd (or 0: square), got {self.kernel_w}")
        if not 1 <= self.parts <= MAX_PARTS:
            raise ValueError(f"parts must be 1..{MAX_PARTS}, got {self.parts}")
        if self.parts > 1 and (self.taps != 1 or self.in_ch % self.parts):
            raise ValueError(f"{self.parts} input parts need a 1x1 kernel and in_ch % parts == 0")

    @property
    def kw_taps(self) -> int:
        """Kernel columns (``kernel`` rows)."""
        return self.kernel_w or self.kernel

    @property
    def taps(self) -> int:
        return self.kernel * self.kw_taps

    @property
    def pad(self) -> int:
        return self.kernel // 2

    @property
    def padded_hw(self) -> tuple[int, int]:
        return self.height + self.kernel - 1, self.width + self.kw_taps - 1

    @property
    def pixels(self) -> int:
        return self.batch * self.height * self.width

    def check(self, variant: str) -> None:
        """Raise ``ValueError`` unless the variant's layout fits this shape."""
        _check_variant(variant)
        if self.kernel_w and self.kernel_w != self.kernel and variant not in MMA_BITS:
            raise ValueError(f"{variant} takes square kernels only")
        if variant == "dp4a":
            if self.in_ch % 4 or self.out_ch % 4:
                raise ValueError(f"dp4a needs in_ch and out_ch multiples of 4, got {self.in_ch}, {self.out_ch}")
        else:
            chunk = mma_chunk_channels(variant)
            if self.in_ch % chunk or self.out_ch % 8:
                raise ValueError(
                    f"{variant} needs in_ch % {chunk} == 0 and out_ch % 8 == 0, got {self.in_ch}, {self.out_ch}"
                )
            if self.pixels % 16:
                raise ValueError(f"{variant} needs N*H*W % 16 == 0 (16-pixel MMA rows), got {self.pixels}")
        if self.parts > 1 and (variant != "f16mma" or self.part_ch % mma_chunk_channels(variant)):
            raise ValueError(
                f"input parts need f16mma and whole K chunks a part, got {variant} with {self.part_ch} channels a part"
            )

    @property
    def part_ch(self) -> int:
        """Channels of one input part."""
        return self.in_ch // self.parts

    @property
    def part_shape(self) -> tuple[int, int, int, int]:
        """fp16 NHWC shape of one input part: its channel ``c`` is the concatenation's channel
        ``p * part_ch + c`` of part ``p``; a pair of halves read as one word is the packed operand's
        word (:func:`pack_halves`)."""
        return (self.batch, self.height, self.width, self.part_ch)

    def act_shape(self, variant: str) -> tuple[int, ...]:
        hp, wp = self.padded_hw
        if _check_variant(variant) == "dp4a":
            return (self.batch, self.in_ch // 4, hp, wp, 4)
        return (self.batch, hp, wp, self.in_ch // (32 // MMA_BITS[variant]))

    def weight_shape(self, variant: str) -> tuple[int, ...]:
        k = self.kernel
        if _check_variant(variant) == "dp4a":
            return (self.out_ch, self.in_ch // 4, k, k, 4)
        return (self.out_ch, self.taps, self.in_ch // (32 // MMA_BITS[variant]))

    def out_shape(self, variant: str) -> tuple[int, ...]:
        if _check_variant(variant) == "dp4a":
            return (self.batch, self.out_ch, self.height, self.width)
        return (self.batch, self.height, self.width, self.out_ch)


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant


def mma_chunk_channels(variant: str) -> int:
    """Input channels of one K chunk of a tensor-core variant: 4 words of one fragment row
    (32 nibbles for "s4mma", 16 bytes for "s8mma", 8 halves for "f16mma")."""
    return 4 * (32 // MMA_BITS[variant])


# ----------------------------------------------------------------------------------------------
# numpy packing


def _as_int(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        if x.dtype.kind == "f" and np.all(np.isfinite(x)) and np.array_equal(x, np.round(x)):
            return x.astype(np.int64)
        raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    return x.astype(np.int64)


def _check_range(x: np.ndarray, lo: int, hi: int, what: str) -> None:
    if x.size and (x.min() < lo or x.max() > hi):
        raise ValueError(f"{what} must be in {lo}..{hi}, got [{x.min()}, {x.max()}]")


def _act_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _pad_nchw(x: np.ndarray, pad_value: int, kernel: int) -> np.ndarray:
    n, c, h, w = x.shape
    p = kernel // 2
    buf = np.full((n, c, h + 2 * p, w + 2 * p), int(pad_value), dtype=np.int64)
    buf[:, :, p : p + h, p : p + w] = x
    return buf


def pack_activations_dp4a(x, pad_value: int = 0, kernel: int = 3, signed: bool = False) -> np.ndarray:
    """NCHW u8 (or s8 with ``signed``) activations -> ``[N][C/4][H+2P][W+2P][4]``, border = ``pad_value``."""
    x = _as_int(x, "x")
    if x.ndim != 4 or x.shape[1] % 4:
        raise ValueError(f"activations must be NCHW with C % 4 == 0, got shape {x.shape}")
    lo, hi = _act_range(8, signed)
    _check_range(x, lo, hi, "activations")
    _check_range(np.asarray([pad_value]), lo, hi, "pad_value")
    buf = _pad_nchw(x, pad_value, kernel)
    n, c, hp, wp = buf.shape
    buf = buf.reshape(n, c // 4, 4, hp, wp).transpose(0, 1, 3, 4, 2)
    return np.ascontiguousarray(buf.astype(np.int8 if signed else np.uint8))


def unpack_activations_dp4a(a: np.ndarray, kernel: int = 3) -> np.ndarray:
    """Inverse of :func:`pack_activations_dp4a` (drops the border), int64 NCHW."""
    n, c4, hp, wp, _ = a.shape
    p = kernel // 2
    x = a.astype(np.int64).transpose(0, 1, 4, 2, 3).reshape(n, c4 * 4, hp, wp)
    return np.ascontiguousarray(x[:, :, p : hp - p, p : wp - p])


def pack_weights_dp4a(w) -> np.ndarray:
    """OIHW s8 weights -> ``[O][C/4][K][K][4]`` int8."""
    w = _as_int(w, "w")
    if w.ndim != 4 or w.shape[1] % 4:
        raise ValueError(f"weights must be OIHW with I % 4 == 0, got shape {w.shape}")
    _check_range(w, -128, 127, "weights")
    o, i, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(o, i // 4, 4, kh, kw).transpose(0, 1, 3, 4, 2).astype(np.int8))


def unpack_weights_dp4a(wp: np.ndarray) -> np.ndarray:
    o, i4, kh, kw, _ = wp.shape
    return np.ascontiguousarray(wp.astype(np.int64).transpose(0, 1, 4, 2, 3).reshape(o, i4 * 4, kh, kw))


def pack_nibbles(v, signed: bool) -> np.ndarray:
    """Pack the last axis (a multiple of 8) of 4-bit integers into uint32 words: element ``i`` of a
    group of 8 in bits ``4i..4i+3`` (two's complement when ``signed``)."""
    v = _as_int(v, "values")
    if v.shape[-1] % 8:
        raise ValueError(f"the packed axis must be a multiple of 8, got {v.shape[-1]}")
    lo, hi = _act_range(4, signed)
    _check_range(v, lo, hi, "4-bit values")
    nib = (v & 0xF).astype(np.uint32).reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
    shifts = 4 * np.arange(8, dtype=np.uint32)
    return np.ascontiguousarray(np.bitwise_or.reduce(nib << shifts, axis=-1).astype(np.uint32))


def unpack_nibbles(words: np.ndarray, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: uint32 words -> int64 values, 8 per word along the last axis."""
    words = np.asarray(words).astype(np.uint32)
    nib = (words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    v = nib.astype(np.int64)
    if signed:
        v = v - ((v & 8) << 1)
    return v.reshape(*words.shape[:-1], words.shape[-1] * 8)


def pack_bytes(v, signed: bool) -> np.ndarray:
    """Pack the last axis (a multiple of 4) of 8-bit integers into uint32 words: element ``i`` of a
    group of 4 in bits ``8i..8i+7`` (two's complement when ``signed``), the byte order of a
    little-endian ``[..][4]`` int8 array."""
    v = _as_int(v, "values")
    if v.shape[-1] % 4:
        raise ValueError(f"the packed axis must be a multiple of 4, got {v.shape[-1]}")
    lo, hi = _act_range(8, signed)
    _check_range(v, lo, hi, "8-bit values")
    b = (v & 0xFF).astype(np.uint32).reshape(*v.shape[:-1], v.shape[-1] // 4, 4)
    shifts = 8 * np.arange(4, dtype=np.uint32)
    return np.ascontiguousarray(np.bitwise_or.reduce(b << shifts, axis=-1).astype(np.uint32))


def unpack_bytes(words: np.ndarray, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_bytes`: uint32 words -> int64 values, 4 per word along the last axis."""
    words = np.asarray(words).astype(np.uint32)
    v = ((words[..., None] >> (8 * np.arange(4, dtype=np.uint32))) & 0xFF).astype(np.int64)
    if signed:
        v = v - ((v & 0x80) << 1)
    return v.reshape(*words.shape[:-1], words.shape[-1] * 4)


def pack_halves(v) -> np.ndarray:
    """Round the last axis (a multiple of 2) to fp16 (round to nearest even, as ``cvt.rn.f16.f32``)
    and pack it into uint32 words: element ``i`` of a pair in bits ``16i..16i+15``, the order of a
    little-endian ``[..][2]`` float16 array."""
    v = np.asarray(v, np.float32)
    if v.shape[-1] % 2:
        raise ValueError(f"the packed axis must be a multiple of 2, got {v.shape[-1]}")
    return np.ascontiguousarray(v.astype(np.float16)).view(np.uint32).copy()


def unpack_halves(words: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_halves`: uint32 words -> the fp16 values as float32, 2 per word."""
    return np.ascontiguousarray(np.asarray(words, np.uint32)).view(np.float16).astype(np.float32)


def _pack_words(v, bits: int, signed: bool) -> np.ndarray:
    if bits == 16:
        return pack_halves(v)
    return pack_nibbles(v, signed) if bits == 4 else pack_bytes(v, signed)


def _unpack_words(words, bits: int, signed: bool) -> np.ndarray:
    if bits == 16:
        return unpack_halves(words)
    return unpack_nibbles(words, signed) if bits == 4 else unpack_bytes(words, signed)


def _pack_activations_mma(x, bits: int, pad_value: int, kernel: int, signed: bool) -> np.ndarray:
    """NCHW activations of ``bits`` (8 or 4) -> ``[N][H+2P][W+2P][C/(32/bits)]`` uint32."""
    x = _as_int(x, "x")
    lanes = 32 // bits
    if x.ndim != 4 or x.shape[1] % lanes:
        raise ValueError(f"activations must be NCHW with C % {lanes} == 0, got shape {x.shape}")
    lo, hi = _act_range(bits, signed)
    _check_range(np.asarray([pad_value]), lo, hi, "pad_value")
    return _pack_words(_pad_nchw(x, pad_value, kernel).transpose(0, 2, 3, 1), bits, signed)


def _unpack_activations_mma(a: np.ndarray, bits: int, kernel: int, signed: bool) -> np.ndarray:
    p = kernel // 2
    x = _unpack_words(a, bits, signed).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x[:, :, p : x.shape[2] - p, p : x.shape[3] - p])


def _pack_weights_mma(w, bits: int) -> np.ndarray:
    """OIHW signed weights of ``bits`` -> ``[O][K*K][I/(32/bits)]`` uint32."""
    w = _as_int(w, "w")
    lanes = 32 // bits
    if w.ndim != 4 or w.shape[1] % lanes:
        raise ValueError(f"weights must be OIHW with I % {lanes} == 0, got shape {w.shape}")
    o, i, kh, kw = w.shape
    return _pack_words(w.transpose(0, 2, 3, 1).reshape(o, kh * kw, i), bits, signed=True)


def _unpack_weights_mma(wp: np.ndarray, bits: int, kernel: int) -> np.ndarray:
    v = _unpack_words(wp, bits, signed=True)
    return np.ascontiguousarray(v.reshape(wp.shape[0], kernel, kernel, -1).transpose(0, 3, 1, 2))


def pack_activations_s8(x, pad_value: int = 0, kernel: int = 3, signed: bool = False) -> np.ndarray:
    """NCHW u8 (or s8 with ``signed``) activations -> ``[N][H+2P][W+2P][C/4]`` uint32 (4 channels a word)."""
    return _pack_activations_mma(x, 8, pad_value, kernel, signed)


def unpack_activations_s8(a: np.ndarray, kernel: int = 3, signed: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_activations_s8` (drops the border), int64 NCHW."""
    return _unpack_activations_mma(a, 8, kernel, signed)


def pack_weights_s8(w) -> np.ndarray:
    """OIHW s8 weights -> ``[O][K*K][I/4]`` uint32."""
    return _pack_weights_mma(w, 8)


def unpack_weights_s8(wp: np.ndarray, kernel: int = 3) -> np.ndarray:
    return _unpack_weights_mma(wp, 8, kernel)


def pack_activations_f16(x, kernel: int = 3, kernel_w: int = 0) -> np.ndarray:
    """NCHW float activations -> ``[N][H+K-1][W+KW-1][C/2]`` uint32 of fp16 pairs, border 0.0
    (``kernel_w`` 0: square kernel)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[1] % 2:
        raise ValueError(f"activations must be NCHW with C % 2 == 0, got shape {x.shape}")
    ph, pw = kernel // 2, (kernel_w or kernel) // 2
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    return pack_halves(xp.transpose(0, 2, 3, 1))


def pack_weights_f16(w) -> np.ndarray:
    """OIHW float weights -> ``[O][KH*KW][I/2]`` uint32 of fp16 pairs."""
    w = np.asarray(w, np.float32)
    if w.ndim != 4 or w.shape[1] % 2:
        raise ValueError(f"weights must be OIHW with I % 2 == 0, got shape {w.shape}")
    o, i, kh, kw = w.shape
    return pack_halves(w.transpose(0, 2, 3, 1).reshape(o, kh * kw, i))


def pack_activations(variant: str, x, pad_value: int = 0, kernel: int = 3, signed: bool = False) -> np.ndarray:
    """The activations of ``variant`` packed (see the module docstring)."""
    if _check_variant(variant) == "f16mma":
        return pack_activations_f16(x, kernel)
    pack = {"dp4a": pack_activations_dp4a, "s4mma": pack_activations_s4, "s8mma": pack_activations_s8}
    return pack[variant](x, pad_value, kernel, signed)


def pack_weights(variant: str, w) -> np.ndarray:
    """The weights of ``variant`` packed (see the module docstring)."""
    pack = {
        "dp4a": pack_weights_dp4a,
        "s4mma": pack_weights_s4,
        "s8mma": pack_weights_s8,
        "f16mma": pack_weights_f16,
    }
    return pack[_check_variant(variant)](w)


def pack_activations_s4(x, pad_value: int = 0, kernel: int = 3, signed: bool = False) -> np.ndarray:
    """NCHW u4 (0..15, or s4 -8..7 with ``signed``) activations -> ``[N][H+2P][W+2P][C/8]`` uint32."""
    return _pack_activations_mma(x, 4, pad_value, kernel, signed)


def unpack_activations_s4(a: np.ndarray, kernel: int = 3, signed: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_activations_s4` (drops the border), int64 NCHW."""
    return _unpack_activations_mma(a, 4, kernel, signed)


def pack_weights_s4(w) -> np.ndarray:
    """OIHW s4 weights (-8..7) -> ``[O][K*K][I/8]`` uint32."""
    return _pack_weights_mma(w, 4)


def unpack_weights_s4(wp: np.ndarray, kernel: int = 3) -> np.ndarray:
    return _unpack_weights_mma(wp, 4, kernel)


def unpack_output(y, variant: str) -> np.ndarray:
    """Kernel output -> NCHW (``dp4a`` is NCHW already, the mma variants are NHWC)."""
    y = np.asarray(y.numpy() if hasattr(y, "numpy") else y)
    if _check_variant(variant) in MMA_BITS:
        y = y.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y)


# ----------------------------------------------------------------------------------------------
# dp4a: compute (the LLVM twin) and CUDA schedule


def conv2d_dp4a_compute(shape: Conv2dCudaShape, act_signed: bool = False) -> tvm.tirx.PrimFunc:
    """Unscheduled ``main(A, W, conv)`` on the dp4a layouts: the twin (builds for LLVM) and the
    input of :func:`conv2d_dp4a_primfunc`."""
    s = shape
    s.check("dp4a")
    A = te.placeholder(s.act_shape("dp4a"), "int8" if act_signed else "uint8", name="A")
    Wt = te.placeholder(s.weight_shape("dp4a"), "int8", name="W")
    c4 = te.reduce_axis((0, s.in_ch // 4), "c4")
    kh = te.reduce_axis((0, s.kernel), "kh")
    kw = te.reduce_axis((0, s.kernel), "kw")
    ci = te.reduce_axis((0, 4), "ci")
    out = te.compute(
        s.out_shape("dp4a"),
        lambda n, o, h, w: te.sum(
            A[n, c4, h + kh, w + kw, ci].astype("int32") * Wt[o, c4, kh, kw, ci].astype("int32"),
            axis=[c4, kh, kw, ci],
        ),
        name="conv",
    )
    return te.create_prim_func([A, Wt, out])


def _dp4a_intrin(act_dtype: str):
    """(desc, impl) of one ``dp4a`` on 4-byte shared-memory operands into an int32 register."""
    op = "dp4a.u32.s32" if act_dtype == "uint8" else "dp4a.s32.s32"
    a_word = "uint32" if act_dtype == "uint8" else "int32"
    a_vec = "uint8x4" if act_dtype == "uint8" else "int8x4"

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), act_dtype, offset_factor=1, align=4, scope="shared"),
        B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for i in range(4):
                with T.sblock("update"):
                    vi = T.axis.remap("R", [i])
                    C[0] = C[0] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), act_dtype, offset_factor=1, align=4, scope="shared"),
        B: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            T.ptx[op](
                C[0], T.reinterpret(a_word, A.vload([0], a_vec)), T.reinterpret("int32", B.vload([0], "int8x4")), C[0]
            )

    return desc, impl


_DP4A_INTRINS = {"uint8": "refqsr_dp4a_u8s8s32", "int8": "refqsr_dp4a_s8s8s32"}
_REGISTERED: set[str] = set()


def _register_dp4a(act_dtype: str) -> str:
    name = _DP4A_INTRINS[act_dtype]
    if name not in _REGISTERED:
        tvm.s_tir.TensorIntrin.register(name, *_dp4a_intrin(act_dtype), override=True)
        _REGISTERED.add(name)
    return name


@dataclass(frozen=True)
class Dp4aConfig:
    """Tiles of the dp4a schedule (see the module docstring)."""

    tx: int  # threads along the width (pixels)
    ty: int  # threads along output channels
    ot: int  # output channels per thread
    th: int  # rows per thread (and per block)
    cc: int  # 4-channel groups per shared-memory stage


def dp4a_config(shape: Conv2dCudaShape) -> Dp4aConfig:
    """Divisor-based tiles: <= 32 px x <= 8 x 4 channels x <= 2 rows per 256-thread block."""
    tx = divisor_at_most(shape.width, 32)
    ot = divisor_at_most(shape.out_ch, 4)
    ty = divisor_at_most(shape.out_ch // ot, max(1, min(8, 256 // tx)))
    return Dp4aConfig(tx, ty, ot, divisor_at_most(shape.height, 2), divisor_at_most(shape.in_ch // 4, 4))


def _cooperative_fetch(sch: tvm.s_tir.Schedule, block, depth: int, ty: int, tx: int) -> None:
    """Spread a shared-memory copy (its loops start at ``depth``) over the block's threads, one
    4-byte word per thread and step."""
    inner = sch.get_loops(block)[depth:]
    fused = sch.fuse(*inner[:-1])
    _, ly, lx = sch.split(fused, [None, ty, tx])
    sch.bind(ly, "threadIdx.y")
    sch.bind(lx, "threadIdx.x")
    sch.vectorize(inner[-1])


def conv2d_dp4a_primfunc(
    shape: Conv2dCudaShape, act_signed: bool = False, config: Dp4aConfig | None = None
) -> tvm.tirx.PrimFunc:
    """The CUDA-scheduled dp4a conv ``conv2d_dp4a(A, W, conv)`` (thread-bound, dp4a-tensorized,
    destination-passing: ``R.call_tir(gv, [a, w], out_sinfo)``)."""
    act_dtype = "int8" if act_signed else "uint8"
    intrin = _register_dp4a(act_dtype)
    cfg = config or dp4a_config(shape)
    sch = tvm.s_tir.Schedule(conv2d_dp4a_compute(shape, act_signed))
    blk = sch.get_sblock("conv")
    n, o, h, w, c4, kh, kw, ci = sch.get_loops(blk)
    o_b, o_t, o_i = sch.split(o, [None, cfg.ty, cfg.ot])
    h_b, h_i = sch.split(h, [None, cfg.th])
    w_b, w_t = sch.split(w, [None, cfg.tx])
    c_o, c_i = sch.split(c4, [None, cfg.cc])
    sch.reorder(n, o_b, h_b, w_b, o_t, w_t, c_o, c_i, kh, kw, h_i, o_i, ci)
    sch.bind(sch.fuse(n, o_b, h_b, w_b), "blockIdx.x")
    sch.bind(o_t, "threadIdx.y")
    sch.bind(w_t, "threadIdx.x")
    store = sch.cache_write(blk, 0, "local")  # th x ot int32 accumulators per thread
    sch.reverse_compute_at(store, w_t)
    for index in (0, 1):  # the activation window and the weights of one channel chunk
        shared = sch.cache_read(blk, index, "shared")
        sch.compute_at(shared, c_o)
        _cooperative_fetch(sch, shared, 4, cfg.ty, cfg.tx)  # below bx, ty, tx, c_o
    sch.decompose_reduction(blk, c_o)
    sch.tensorize(ci, intrin)
    for loop in (kw, h_i, o_i):  # registers, not local memory, for the accumulator tile
        sch.unroll(loop)
    # a symbol of its own: bb.add_func next to a Relax "main" must not clash
    return sch.mod["main"].with_attr("global_symbol", "conv2d_dp4a")


# ----------------------------------------------------------------------------------------------
# tensor cores (s4, s8): fragment index math (shared by the TIR kernels and the numpy emulation)

#: mma shapes by (variant, chunks per mma): K = 4 words of the fragment row per chunk
_MMA_SHAPES = {
    ("s4mma", 2): "m16n8k64",
    ("s4mma", 1): "m16n8k32",
    ("s8mma", 2): "m16n8k32",
    ("s8mma", 1): "m16n8k16",
    ("f16mma", 2): "m16n8k16",
    ("f16mma", 1): "m16n8k8",
}


@dataclass(frozen=True)
class MmaConfig:
    """Geometry of a tensor-core kernel for one shape.

    A warp computes ``16*mt`` pixels x ``8*nt`` output channels; a block has ``bp x bg`` warps
    (``bp`` pixel tiles x ``bg`` channel tiles) and per mma step stages its A tile (``bm`` pixel
    rows x ``kw`` words) and B tile (``bn`` channels x ``kw`` words) in shared memory, two
    buffers deep."""

    mma_shape: str  # s4: "m16n8k64" (two 32-channel chunks per mma) or "m16n8k32"; s8: "m16n8k32" / "m16n8k16"
    chunks_per_mma: int
    ksteps: int  # mma steps along K = K*K * C / (chunk * chunks_per_mma)
    mt: int  # 16-pixel tiles per warp
    nt: int  # 8-channel tiles per warp
    warps: int  # warps per block (threadIdx.y) = bp * bg
    bits: int = 4  # bits per operand element: 4 ("s4mma"), 8 ("s8mma") or 16 ("f16mma")
    bp: int = 1  # warp tiles of a block along the pixels
    bg: int = 1  # warp tiles of a block along the output channels

    @property
    def chunk(self) -> int:  # input channels per K chunk
        return 4 * (32 // self.bits)

    @property
    def a_regs(self) -> int:  # .b32 registers of one A fragment
        return 2 * self.chunks_per_mma

    @property
    def b_regs(self) -> int:
        return self.chunks_per_mma

    @property
    def kw(self) -> int:  # 32-bit words of one pixel (or channel) row per mma step
        return 4 * self.chunks_per_mma

    @property
    def stride(self) -> int:
        """Words between two rows of a shared-memory tile: the 8 rows x 4 words a fragment load
        reads (row ``lane//4``, word ``lane%4``) fall in 32 distinct banks for strides 4 and 12."""
        return 4 if self.kw == 4 else 12

    @property
    def bm(self) -> int:  # pixel rows of a block tile
        return self.bp * 16 * self.mt

    @property
    def bn(self) -> int:  # output channels of a block tile
        return self.bg * 8 * self.nt

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def a_loads(self) -> int:  # words of the A stage each thread copies (the last pass guarded)
        return -(-self.bm * self.kw // self.threads)

    @property
    def b_loads(self) -> int:
        return -(-self.bn * self.kw // self.threads)


def mma_config(shape: Conv2dCudaShape, variant: str = "s4mma") -> MmaConfig:
    """Tiles of the tensor-core kernel ``variant`` for ``shape``: up to 2 x 4 mma tiles a warp,
    up to 4 warps a block (channel tiles first, then pixel tiles)."""
    shape.check(variant)
    bits = MMA_BITS[variant]
    chunks = shape.taps * shape.in_ch // mma_chunk_channels(variant)
    cpm = 2 if chunks % 2 == 0 else 1
    mt = divisor_at_most(shape.pixels // 16, 2)
    nt = divisor_at_most(shape.out_ch // 8, 4)
    bg = divisor_at_most(shape.out_ch // (8 * nt), 4)
    bp = divisor_at_most(shape.pixels // (16 * mt), 4 // bg)
    return MmaConfig(_MMA_SHAPES[variant, cpm], cpm, chunks // cpm, mt, nt, bp * bg, bits, bp, bg)


def s4mma_config(shape: Conv2dCudaShape) -> MmaConfig:
    return mma_config(shape, "s4mma")


def s8mma_config(shape: Conv2dCudaShape) -> MmaConfig:
    return mma_config(shape, "s8mma")


def _grid(shape: Conv2dCudaShape, cfg: MmaConfig) -> tuple[int, int]:
    """(blocks along the pixels, blocks along the output channels)."""
    return shape.pixels // cfg.bm, shape.out_ch // cfg.bn


def _chunk(shape: Conv2dCudaShape, cfg: MmaConfig, ks, half):
    """K chunk ``half`` (0..chunks_per_mma-1) of mma step ``ks`` -> (kh, kw, channel block)."""
    per_tap = shape.in_ch // cfg.chunk
    j = ks * cfg.chunks_per_mma + half
    tap = j // per_tap
    return tap // shape.kw_taps, tap % shape.kw_taps, j % per_tap


def _pixel(shape: Conv2dCudaShape, p):
    hw = shape.height * shape.width
    return p // hw, (p // shape.width) % shape.height, p % shape.width


def _block_m0(shape, cfg, bx):
    """First pixel of block ``bx``'s tile."""
    return (bx // _grid(shape, cfg)[1]) * cfg.bm


def _block_o0(shape, cfg, bx):
    """First output channel of block ``bx``'s tile."""
    return (bx % _grid(shape, cfg)[1]) * cfg.bn


def _a_frag(cfg, wm, mi, lane, reg):
    """Shared-memory offset of A-fragment register ``reg`` of ``lane`` for the warp's 16-pixel
    tile ``mi`` (PTX: row ``lane//4`` (+8 for odd ``reg``), K columns ``e*(lane%4)``..``+e-1`` of
    K half ``reg//2``: word ``4*(reg//2) + lane%4`` of the row)."""
    row = wm * 16 * cfg.mt + 16 * mi + lane // 4 + 8 * (reg % 2)
    return row * cfg.stride + 4 * (reg // 2) + lane % 4


def _b_frag(cfg, wn, ni, lane, reg):
    """Shared-memory offset of B-fragment register ``reg`` (column ``lane//4``, K rows
    ``e*(lane%4)``..``+e-1`` of K half ``reg``)."""
    row = wn * 8 * cfg.nt + 8 * ni + lane // 4
    return row * cfg.stride + 4 * reg + lane % 4


def _c_index(shape, m0, o0, lane, reg):
    """Output element of accumulator register ``reg`` (row ``lane//4`` (+8 for reg >= 2), column
    ``2*(lane%4) + reg%2``)."""
    n, h, w = _pixel(shape, m0 + lane // 4 + 8 * (reg // 2))
    return n, h, w, o0 + 2 * (lane % 4) + reg % 2


def shuffle_out_shape(shape: Conv2dCudaShape, pad: int) -> tuple[int, int, int, int]:
    """The words a pixel-shuffle store writes: the next conv's packed fp16 operand
    ``[N][2H + 2*pad][2W + 2*pad][out_ch / 8]`` (``out_ch / 4`` channels after the shuffle)."""
    return (shape.batch, 2 * shape.height + 2 * pad, 2 * shape.width + 2 * pad, shape.out_ch // 8)


def shuffle_channel_order(out_ch: int) -> np.ndarray:
    """The conv's output channel each kernel channel computes under a pixel-shuffle store: kernel
    channel ``o = s*C + c`` (``C = out_ch / 4``, sub-pixel ``s = 2*dy + dx``) is the conv's channel
    ``4*c + s`` (PixelShuffle / DepthToSpace CRD order). Two neighbouring kernel channels are then
    neighbouring channels of one output pixel: a lane's accumulator pair is one 32-bit word."""
    o = np.arange(out_ch)
    return (o % (out_ch // 4)) * 4 + o // (out_ch // 4)


def _shuffle_index(shape, pad, idx):
    """Word (n, Y, X, word) that output element ``idx`` = (n, h, w, o) (kernel channel order,
    :func:`shuffle_channel_order`) goes to, in half ``o % 2`` of the word."""
    n, h, w, o = idx
    quarter = shape.out_ch // 4
    sub, c = o // quarter, o % quarter
    return n, 2 * h + sub // 2 + pad, 2 * w + sub % 2 + pad, c // 2


def _shuffle_border(shape, pad, dst, j, select):
    """((y check, x check), where): the word ``where`` next to the word ``dst`` that a
    pixel-shuffle store writes, neighbour ``j`` (0..7 of the 8 around it), is a border word (the
    next conv's zero padding, pad 1) that this store also zeroes when both checks hold: each
    border word is written once, by the store of the interior pixel nearest to it. ``select``:
    ``T.Select`` in the kernel, ``np.where`` in the replay."""
    n, y, x, word = dst
    k = j + j // 4  # 0..8 without the centre
    dy, dx = k // 3 - 1, k % 3 - 1
    last_y, last_x = 2 * shape.height + pad - 1, 2 * shape.width + pad - 1
    y_at = select(dy < 0, pad, select(dy > 0, last_y, y))
    x_at = select(dx < 0, pad, select(dx > 0, last_x, x))
    return (y == y_at, x == x_at), (n, y + dy, x + dx, word)


def _acc_index(shape, cfg, m0, o0, ty, lane, cr):
    """Output element of accumulator ``cr`` of warp ``ty``'s ``mt x nt`` tiles in the block at
    (``m0``, ``o0``): tile (cr // (4*nt), cr // 4 % nt), register cr % 4 (:func:`_c_index`)."""
    m = m0 + (ty // cfg.bg) * 16 * cfg.mt + 16 * (cr // (4 * cfg.nt))
    o = o0 + (ty % cfg.bg) * 8 * cfg.nt + 8 * (cr // 4 % cfg.nt)
    return _c_index(shape, m, o, lane, cr % 4)


def tile_sums_shape(shape: Conv2dCudaShape, variant: str) -> tuple[int, int]:
    """``[pixel tiles][out_ch]``: what a kernel with ``tile_sums`` also writes, the fp32 sum of
    its stored (fp16) outputs over each block tile's ``bm`` pixels, per output channel."""
    return shape.pixels // mma_config(shape, variant).bm, shape.out_ch


def _sum_slot(cfg, ty, lane, c):
    """(row slot, column of the block tile) of a thread's column sum ``c`` (0 .. 2*nt - 1: the
    accumulator column ``2*(lane%4) + c%2`` of its 8-channel tile ``c//2``) in the block's
    reduction buffer: one row slot per pixel row ``lane//4`` of each warp along the pixels."""
    slot = (ty // cfg.bg) * 8 + lane // 4
    return slot, (ty % cfg.bg) * 8 * cfg.nt + 8 * (c // 2) + 2 * (lane % 4) + c % 2


def tile_sums_why_not(shape: Conv2dCudaShape, variant: str, epilogue: str | None, pad: int | None) -> str | None:
    """Why the kernel ``variant`` of ``shape`` with this store cannot write tile sums; None if it can."""
    if variant not in MMA_BITS:
        return "tile sums need a tensor-core kernel"
    if epilogue is None or pad is not None:
        return "tile sums need an fp16 store (an epilogue) without a pixel-shuffle store"
    if (shape.height * shape.width) % mma_config(shape, variant).bm:
        return "tile sums need whole block tiles per sample"
    return None


def _check_tile_sums(shape: Conv2dCudaShape, variant: str, epilogue: str | None, pad: int | None, sums: bool) -> None:
    why = tile_sums_why_not(shape, variant, epilogue, pad) if sums else None
    if why:
        raise ValueError(why)


def _a_src(shape, cfg, m0, ks, idx):
    """Index into the activation words of word ``idx`` (row ``idx // kw``, word ``idx % kw``) of
    the A stage of step ``ks``, for the block whose pixels start at ``m0``. Word ``k`` of a row
    is word ``k % 4`` of K chunk ``k // 4``: K columns ``e*k``..``e*k+e-1`` of the step, e = 32 /
    bits elements a word."""
    row, k = idx // cfg.kw, idx % cfg.kw
    n, h, w = _pixel(shape, m0 + row)
    kh, kw, cb = _chunk(shape, cfg, ks, k // 4)
    return n, h + kh, w + kw, cb * 4 + k % 4


def _a_part(shape, index):
    """(part, index into that part's words) of word ``index`` = (n, y, x, word) of the
    concatenated operand of an input split in ``shape.parts`` (word ``w`` of a pixel is word
    ``w % (part_ch / 2)`` of part ``w // (part_ch / 2)``)."""
    n, y, x, word = index
    per_part = shape.part_ch // 2
    return word // per_part, (n, y, x, word % per_part)


def _from_part(part, values: list):
    """``values[part]`` for a ``part`` known only at run time: nested ``if_then_else``, so only
    the chosen value is loaded."""
    value = values[-1]
    for p in range(len(values) - 2, -1, -1):
        value = tvm.tirx.if_then_else(part == p, values[p], value)
    return value


def _a_load(shape, srcs, index):
    """The kernel's load of activation word ``index`` (:func:`_a_src`) from ``srcs``: the packed
    operand, or for split inputs the fp16 parts, a pair of halves read as one 32-bit word from
    the part :func:`_a_part` names (a K chunk lies in one part: the branch is uniform per step)."""
    if shape.parts == 1:
        return srcs[0][index]
    part, (n, y, x, word) = _a_part(shape, index)

    pairs = [T.reinterpret("uint32", srcs[p][n, y, x, T.Ramp(2 * word, 1, 2)]) for p in range(shape.parts)]
    return _from_part(part, pairs)


def _b_src(shape, cfg, o0, ks, idx):
    """Index into the weight words of word ``idx`` of the B stage of step ``ks``, for the block
    whose output channels start at ``o0``."""
    row, k = idx // cfg.kw, idx % cfg.kw
    kh, kw, cb = _chunk(shape, cfg, ks, k // 4)
    return o0 + row, kh * shape.kw_taps + kw, cb * 4 + k % 4


def _stage_dst(cfg, idx):
    """Shared-memory offset (within one buffer) of word ``idx`` of an A or B stage."""
    return (idx // cfg.kw) * cfg.stride + idx % cfg.kw


def _mma_compute(
    shape: Conv2dCudaShape,
    variant: str,
    act_signed: bool,
    epilogue: str | None = None,
    shuffle_pad: int | None = None,
    tile_sums: bool = False,
) -> tvm.tirx.PrimFunc:
    """The twin of a tensor-core variant ``main(A, W, conv)``: the same packed words, elements
    unpacked with shifts (fp16 halves reinterpreted and widened to fp32: the products of two
    halves are exact in fp32, the sums are fp32, as the tensor cores' ``.f32`` accumulators).
    With ``epilogue`` "f16" the sums are rounded to fp16; with "dequant" / "dequant_ws" it is
    ``main(A, W, RS, RZ, CS, CW, WS, conv)`` (:func:`dequant_epilogue_reference`); a "_relu"
    form takes a bias ``B`` before ``conv``, a "_res_relu" form ``B`` and a residual ``R``. With
    ``shuffle_pad`` the fp16 values go to the words a pixel-shuffle store writes
    (:func:`conv2d_f16mma_primfunc`), the border words 0. With ``tile_sums`` it also returns
    ``S``, the per-channel fp32 sums of the stored values over each block tile's pixels."""
    _check_epilogue(variant, epilogue)
    _check_shuffle(shape, variant, epilogue, shuffle_pad)
    _check_tile_sums(shape, variant, epilogue, shuffle_pad, tile_sums)
    s, bits = shape, MMA_BITS[variant]
    per_word = 32 // bits
    mask, sign = (1 << bits) - 1, 1 << (bits - 1)
    s.check(variant)
    if s.parts == 1:
        acts = [te.placeholder(s.act_shape(variant), "uint32", name="A")]
    else:
        acts = [te.placeholder(s.part_shape, "float16", name=f"A{p or ''}") for p in range(s.parts)]
    Wt = te.placeholder(s.weight_shape(variant), "uint32", name="W")
    kh = te.reduce_axis((0, s.kernel), "kh")
    kw = te.reduce_axis((0, s.kw_taps), "kw")
    cw = te.reduce_axis((0, s.in_ch // per_word), "cw")
    ci = te.reduce_axis((0, per_word), "ci")

    def element(word, i, signed):
        v = (word >> (i * bits).astype("uint32")) & tvm.tirx.const(mask, "uint32")
        if bits == 16:
            return tvm.tirx.reinterpret("float16", v.astype("uint16")).astype("float32")
        v = v.astype("int32")
        return v - ((v & sign) << 1) if signed else v

    def activation(n, y, x, cw, ci):  # element ci of word cw of pixel (y, x) of the operand
        if s.parts == 1:
            return element(acts[0][n, y, x, cw], ci, act_signed)
        c = 2 * cw + ci  # a 1x1 conv of concatenated fp16 parts (y, x: the pixel itself)
        return _from_part(c // s.part_ch, [a[n, y, x, c % s.part_ch] for a in acts]).astype("float32")

    out = te.compute(
        s.out_shape(variant),
        lambda n, h, w, o: te.sum(
            activation(n, h + kh, w + kw, cw, ci) * element(Wt[o, kh * s.kw_taps + kw, cw], ci, True),
            axis=[kh, kw, cw, ci],
        ),
        name="conv" if epilogue is None else "acc",
    )
    relu, res = epilogue in RELU_EPILOGUES, epilogue in RESIDUAL_EPILOGUES
    B = te.placeholder((s.out_ch,), "float32", name="B")
    R = te.placeholder(s.out_shape(variant), "float16", name="R")

    def finish(v, n, h, w, o):  # the fp32 value of output element (n, h, w, o) -> what is stored
        if relu:
            v = v + B[o]
            if res:
                v = v + R[n, h, w, o].astype("float32")
            v = te.max(v, tvm.tirx.const(0.0, "float32"))
        return v.astype("float16")

    if base_epilogue(epilogue) == "f16" and shuffle_pad is not None:
        acc, pad, quarter = out, shuffle_pad, s.out_ch // 4

        def half_bits(n, h, w, o):
            return tvm.tirx.reinterpret("uint16", finish(acc[n, h, w, o], n, h, w, o)).astype("uint32")

        def word(n, y, x, cw):  # word cw of pixel (y, x) of the padded, shuffled map
            inside = tvm.tirx.all(y >= pad, y < 2 * s.height + pad, x >= pad, x < 2 * s.width + pad)
            yy = te.min(te.max(y - pad, 0), 2 * s.height - 1)
            xx = te.min(te.max(x - pad, 0), 2 * s.width - 1)
            o = ((yy % 2) * 2 + xx % 2) * quarter + 2 * cw
            value = half_bits(n, yy // 2, xx // 2, o) | (half_bits(n, yy // 2, xx // 2, o + 1) << 16)
            return tvm.tirx.if_then_else(inside, value, tvm.tirx.const(0, "uint32"))

        out = te.compute(shuffle_out_shape(s, pad), word, name="conv")
        return te.create_prim_func([*acts, Wt, *([B] if relu else []), out])

    def with_sums(out):  # [conv] or [conv, S]
        if not tile_sums:
            return [out]
        bm = mma_config(s, variant).bm
        r = te.reduce_axis((0, bm), "r")
        sums = te.compute(
            tile_sums_shape(s, variant),
            lambda t, o: te.sum(out[(*_pixel(s, t * bm + r), o)].astype("float32"), axis=r),
            name="S",
        )
        return [out, sums]

    if base_epilogue(epilogue) == "f16":
        acc = out
        out = te.compute(s.out_shape(variant), lambda n, h, w, o: finish(acc[n, h, w, o], n, h, w, o), name="conv")
        return te.create_prim_func([*acts, Wt, *([B] if relu else []), *with_sums(out)])
    if epilogue in DEQUANT_EPILOGUES:
        acc = out
        RS = te.placeholder((s.batch,), "float32", name="RS")
        RZ = te.placeholder((s.batch,), "int32", name="RZ")
        CS = te.placeholder((s.out_ch,), "int32", name="CS")
        CW = te.placeholder((s.out_ch,), "float32", name="CW")
        WS = te.placeholder(window_term_shape(s, epilogue), "int32", name="WS")

        def total(n, h, w, o):
            v = acc[n, h, w, o] - RZ[n] * CS[o]
            return v + WS[n, h, w] if base_epilogue(epilogue) == "dequant_ws" else v

        out = te.compute(
            s.out_shape(variant),
            lambda n, h, w, o: finish(total(n, h, w, o).astype("float32") * (RS[n] * CW[o]), n, h, w, o),
            name="conv",
        )
        extra = [B] if relu else []
        return te.create_prim_func([*acts, Wt, RS, RZ, CS, CW, WS, *extra, *([R] if res else []), *with_sums(out)])
    return te.create_prim_func([*acts, Wt, out])


#: the parts of x that the channel blocks of a split f16mma operand hold: hi = fp16(x), lo =
#: fp16(x - hi); with weights [w_hi, w_hi, w_lo] the sum is x_hi*w_hi + x_lo*w_hi + x_hi*w_lo
SPLIT_PARTS = ("hi", "lo", "hi")


def f16_pack_compute(
    batch: int, in_ch: int, height: int, width: int, pads: tuple[int, int, int, int], packed_ch: int, split: int = 1
) -> tvm.tirx.PrimFunc:
    """``main(X, A)``: NCHW float32 activations ``[batch][in_ch][height][width]`` -> the f16mma
    operand ``[batch][top+height+bottom][left+width+right][packed_ch/2]`` uint32, each value
    rounded to fp16 (round to nearest even: ``cvt.rn.f16.f32`` in CUDA, ``fptrunc`` in LLVM),
    channel ``c`` in half ``c % 2`` of word ``c // 2``; the border and the channels from
    ``split * in_ch`` to ``packed_ch`` hold 0.0. With ``split`` > 1 channel block ``b`` (channels
    ``b*in_ch`` ..) holds part :data:`SPLIT_PARTS` ``[b]`` of x: a conv of few input channels
    summed from fp16 pieces of its fp32 operands. One elementwise kernel: conversion, padding and
    packing."""
    top, left, bottom, right = pads
    if packed_ch % 2 or packed_ch < split * in_ch or not 1 <= split <= len(SPLIT_PARTS):
        raise ValueError(f"packed_ch must be even and >= split * in_ch, got {packed_ch} for {split} x {in_ch}")
    i64 = lambda v: tvm.tirx.IntImm("int64", v)  # noqa: E731 - Relax's legalized ops have int64 shapes: FuseTIR needs equal buffer types
    X = te.placeholder(tuple(map(i64, (batch, in_ch, height, width))), "float32", name="X")

    def half(n, m, y, x):
        inside = tvm.tirx.all(m < split * in_ch, y >= top, y < top + height, x >= left, x < left + width)
        c = tvm.te.min(m, split * in_ch - 1) % in_ch
        v = tvm.tirx.if_then_else(inside, X[n, c, y - top, x - left], tvm.tirx.const(0.0))
        h = v.astype("float16")
        if split > 1:  # block 1: the remainder x - hi, rounded to fp16 in its turn
            lo = (v - h.astype("float32")).astype("float16")
            h = tvm.tirx.if_then_else(m // in_ch == 1, lo, h)
        return tvm.tirx.reinterpret("uint16", h).astype("uint32")

    out = te.compute(
        tuple(map(i64, (batch, top + height + bottom, left + width + right, packed_ch // 2))),
        lambda n, y, x, cw: half(n, 2 * cw, y, x) | (half(n, 2 * cw + 1, y, x) << tvm.tirx.const(16, "uint32")),
        name="pack",
    )
    return te.create_prim_func([X, out])


def conv2d_f16_compute(
    shape: Conv2dCudaShape,
    act_signed: bool = False,
    epilogue: str | None = None,
    shuffle_pad: int | None = None,
    tile_sums: bool = False,
) -> tvm.tirx.PrimFunc:
    """The f16 twin ``main(A, W, conv)``: the same packed fp16 pairs, fp32 products and sums."""
    return _mma_compute(shape, "f16mma", act_signed, epilogue, shuffle_pad, tile_sums)


def conv2d_s4_compute(
    shape: Conv2dCudaShape, act_signed: bool = False, epilogue: str | None = None, tile_sums: bool = False
) -> tvm.tirx.PrimFunc:
    """The s4 twin ``main(A, W, conv)``: the same packed words, nibbles unpacked with shifts."""
    return _mma_compute(shape, "s4mma", act_signed, epilogue, tile_sums=tile_sums)


def conv2d_s8_compute(
    shape: Conv2dCudaShape, act_signed: bool = False, epilogue: str | None = None, tile_sums: bool = False
) -> tvm.tirx.PrimFunc:
    """The s8 twin ``main(A, W, conv)``: the same packed words, bytes unpacked with shifts."""
    return _mma_compute(shape, "s8mma", act_signed, epilogue, tile_sums=tile_sums)


def _check_shuffle(shape: Conv2dCudaShape, variant: str, epilogue: str | None, pad: int | None) -> None:
    if pad is None:
        return
    if variant != "f16mma" or base_epilogue(epilogue) != "f16" or pad != 1 or shape.out_ch % 8:
        raise ValueError(
            "a pixel-shuffle store needs f16mma, an fp16 epilogue, pad 1 and out_ch % 8 == 0, "
            f"got {variant}, {epilogue}, pad {pad}, {shape.out_ch} channels"
        )


def _pair_word(lo, hi):
    """Two fp16 values as one word, ``lo`` in bits 0..15 (:func:`pack_halves`)."""
    return T.bitwise_or(
        T.Cast("uint32", T.reinterpret("uint16", lo)),
        T.shift_left(T.Cast("uint32", T.reinterpret("uint16", hi)), T.uint32(16)),
    )


def _border_if(shape, pad, dst, j):
    (y_check, x_check), _ = _shuffle_border(shape, pad, dst, j, T.Select)
    return T.And(y_check, x_check)


def _border_at(shape, pad, dst, j):
    return _shuffle_border(shape, pad, dst, j, T.Select)[1]


def _mma_primfunc(
    shape: Conv2dCudaShape,
    variant: str,
    act_signed: bool,
    epilogue: str | None = None,
    shuffle_pad: int | None = None,
    tile_sums: bool = False,
) -> tvm.tirx.PrimFunc:
    """A CUDA implicit-GEMM conv on tensor cores. Per mma step the block's threads copy the A and
    B tiles of the *next* step from global memory into registers, run the current step's mmas on
    fragments read from one shared-memory buffer, then store the registers into the other buffer
    and synchronise: global loads overlap the mmas, one barrier a step. The index math is
    :func:`_a_src` / :func:`_b_src` / :func:`_stage_dst` (staging), :func:`_a_frag` /
    :func:`_b_frag` (fragments) and :func:`_c_index` (output). ``epilogue`` (:data:`EPILOGUES`)
    is applied to each accumulator at its store: "dequant" / "dequant_ws" take five more buffers
    (per-sample scale and zero point, per-output-channel weight sum and scale, per-pixel window
    term) and write fp16; a "_relu" form takes the bias ``B`` before ``conv``. With ``tile_sums``
    the kernel also writes ``S`` after ``conv`` (:func:`tile_sums_shape`): each block sums its
    stored outputs per channel, per thread over its rows, then over the threads' row slots in
    shared memory (:func:`_sum_slot`) in a fixed order -- a statistic of the output (a mean)
    without reading it again."""
    _check_epilogue(variant, epilogue)
    _check_shuffle(shape, variant, epilogue, shuffle_pad)
    _check_tile_sums(shape, variant, epilogue, shuffle_pad, tile_sums)
    s, cfg = shape, mma_config(shape, variant)
    mt, nt, ra, rb, ksteps = cfg.mt, cfg.nt, cfg.a_regs, cfg.b_regs, cfg.ksteps
    gm, gn = _grid(s, cfg)
    blocks, warps, threads, bg = gm * gn, cfg.warps, cfg.threads, cfg.bg
    a_total, b_total, na, nb = cfg.bm * cfg.kw, cfg.bn * cfg.kw, cfg.a_loads, cfg.b_loads
    a_buf, b_buf = cfg.bm * cfg.stride, cfg.bn * cfg.stride
    acc_ty, store_ty = out_dtype(variant), out_dtype(variant, epilogue)
    if cfg.bits == 16:
        a_ty, b_ty = "fp16", "fp16"
    elif cfg.bits == 4:
        a_ty, b_ty = ("int4" if act_signed else "uint4"), "int4"
    else:
        a_ty, b_ty = ("int8" if act_signed else "uint8"), "int8"
    mma_shape = cfg.mma_shape
    w_shape, o_shape = s.weight_shape(variant), s.out_shape(variant)
    # the activation operand: packed words, or the fp16 parts A, A1, .. of a split input
    a_shape, a_dtype = (s.act_shape(variant), "uint32") if s.parts == 1 else (s.part_shape, "float16")
    # the output: NHWC elements, or with a pixel-shuffle store the next conv's packed words
    shuffle = shuffle_pad is not None
    c_shape, c_dtype = (shuffle_out_shape(s, shuffle_pad), "uint32") if shuffle else (o_shape, store_ty)

    relu, res = epilogue in RELU_EPILOGUES, epilogue in RESIDUAL_EPILOGUES
    s_shape = tile_sums_shape(s, variant) if tile_sums else (1, 1)
    slots, bn, gn_ = cfg.bp * 8, cfg.bn, gn

    def _store(v, idx, eps=None):
        """The stored value of accumulator ``v`` of output element ``idx`` = (n, h, w, o);
        ``eps``: every epilogue operand, RS, RZ, CS, CW, WS, B, R (each form reads its own)."""
        if epilogue is None:
            return v
        o = idx[3]
        if base_epilogue(epilogue) == "f16":
            y = v
        else:
            rs, rz, cs, cw, ws = eps[:5]
            n = idx[0]
            total = v - rz[n] * cs[o]
            if base_epilogue(epilogue) == "dequant_ws":
                total = total + ws[idx[0], idx[1], idx[2]]
            y = T.cast(total, "float32") * (rs[n] * cw[o])
        if relu:
            y = y + eps[5][o]
            if res:
                y = y + T.cast(eps[6][idx[0], idx[1], idx[2], o], "float32")
            y = T.max(y, T.float32(0.0))
        return T.cast(y, "float16")

    ws_shape = window_term_shape(s, epilogue)

    @T.macro
    def store_with_sums(conv, S, eps, bx, ty, lane, acc, m0, o0):
        # the outputs, then their per-channel sums over the block tile's pixels
        stored = T.sblock_alloc_buffer((mt * nt * 4,), "float16", scope="local")
        csum = T.sblock_alloc_buffer((nt * 2,), "float32", scope="local")
        red = T.sblock_alloc_buffer((slots * bn,), "float32", scope="shared")
        for cr in T.unroll(mt * nt * 4):
            stored[cr] = _store(acc[cr], _acc_index(s, cfg, m0, o0, ty, lane, cr), eps)
            conv[_acc_index(s, cfg, m0, o0, ty, lane, cr)] = stored[cr]
        for c in T.unroll(nt * 2):
            csum[c] = T.float32(0.0)
        for cr in T.unroll(mt * nt * 4):  # column (cr // 4 % nt, cr % 2): rows in cr order
            csum[cr // 4 % nt * 2 + cr % 2] = csum[cr // 4 % nt * 2 + cr % 2] + T.cast(stored[cr], "float32")
        for c in T.unroll(nt * 2):
            red[_sum_slot(cfg, ty, lane, c)[0] * bn + _sum_slot(cfg, ty, lane, c)[1]] = csum[c]
        T.tvm_storage_sync("shared")
        if ty * 32 + lane < bn:
            csum[0] = T.float32(0.0)
            for r in T.unroll(slots):
                csum[0] = csum[0] + red[r * bn + ty * 32 + lane]
            S[bx // gn_, o0 + ty * 32 + lane] = csum[0]

    @T.macro
    def tile(srcs, W, conv, S, eps, bx, ty, lane):
        # one block's tile: double-buffered staging, the mma steps and the stored outputs
        a_sh = T.sblock_alloc_buffer((2 * a_buf,), "uint32", scope="shared")
        b_sh = T.sblock_alloc_buffer((2 * b_buf,), "uint32", scope="shared")
        acc = T.sblock_alloc_buffer((mt * nt * 4,), acc_ty, scope="local")
        af = T.sblock_alloc_buffer((mt * ra,), "uint32", scope="local")
        bf = T.sblock_alloc_buffer((nt * rb,), "uint32", scope="local")
        a_next = T.sblock_alloc_buffer((na,), "uint32", scope="local")
        b_next = T.sblock_alloc_buffer((nb,), "uint32", scope="local")
        m0 = _block_m0(s, cfg, bx)
        o0 = _block_o0(s, cfg, bx)
        for i in T.unroll(mt * nt * 4):
            acc[i] = T.cast(0, acc_ty)
        for i in T.unroll(na):  # step 0 -> buffer 0
            if i * threads + ty * 32 + lane < a_total:
                a_sh[_stage_dst(cfg, i * threads + ty * 32 + lane)] = _a_load(
                    s, srcs, _a_src(s, cfg, m0, 0, i * threads + ty * 32 + lane)
                )
        for i in T.unroll(nb):
            if i * threads + ty * 32 + lane < b_total:
                b_sh[_stage_dst(cfg, i * threads + ty * 32 + lane)] = W[
                    _b_src(s, cfg, o0, 0, i * threads + ty * 32 + lane)
                ]
        T.tvm_storage_sync("shared")
        for ks in range(ksteps):
            if ks + 1 < ksteps:  # the next step's tiles: global -> registers
                for i in T.unroll(na):
                    if i * threads + ty * 32 + lane < a_total:
                        a_next[i] = _a_load(s, srcs, _a_src(s, cfg, m0, ks + 1, i * threads + ty * 32 + lane))
                for i in T.unroll(nb):
                    if i * threads + ty * 32 + lane < b_total:
                        b_next[i] = W[_b_src(s, cfg, o0, ks + 1, i * threads + ty * 32 + lane)]
            for ar in T.unroll(mt * ra):  # fragments of this step: shared -> registers
                af[ar] = a_sh[(ks % 2) * a_buf + _a_frag(cfg, ty // bg, ar // ra, lane, ar % ra)]
            for br in T.unroll(nt * rb):
                bf[br] = b_sh[(ks % 2) * b_buf + _b_frag(cfg, ty % bg, br // rb, lane, br % rb)]
            for mi in T.unroll(mt):
                for ni in T.unroll(nt):
                    T.evaluate(
                        T.ptx_legacy.mma(
                            mma_shape,
                            "row",
                            "col",
                            a_ty,
                            b_ty,
                            "fp32" if acc_ty == "float32" else "int32",
                            af.data,
                            mi * ra,
                            bf.data,
                            ni * rb,
                            acc.data,
                            (mi * nt + ni) * 4,
                            False,
                            dtype=acc_ty,
                        )
                    )
            if ks + 1 < ksteps:  # registers -> the other buffer
                for i in T.unroll(na):
                    if i * threads + ty * 32 + lane < a_total:
                        a_sh[((ks + 1) % 2) * a_buf + _stage_dst(cfg, i * threads + ty * 32 + lane)] = a_next[i]
                for i in T.unroll(nb):
                    if i * threads + ty * 32 + lane < b_total:
                        b_sh[((ks + 1) % 2) * b_buf + _stage_dst(cfg, i * threads + ty * 32 + lane)] = b_next[i]
            T.tvm_storage_sync("shared")
        if shuffle:  # accumulator pairs (columns 2t, 2t+1: neighbouring channels) as words
            for cp in T.unroll(mt * nt * 2):
                conv[_shuffle_index(s, shuffle_pad, _acc_index(s, cfg, m0, o0, ty, lane, 2 * cp))] = _pair_word(
                    _store(acc[2 * cp], _acc_index(s, cfg, m0, o0, ty, lane, 2 * cp), eps),
                    _store(acc[2 * cp + 1], _acc_index(s, cfg, m0, o0, ty, lane, 2 * cp + 1), eps),
                )
                for j in T.unroll(8):  # the border words next to it that it owns: zero
                    if _border_if(
                        s, shuffle_pad, _shuffle_index(s, shuffle_pad, _acc_index(s, cfg, m0, o0, ty, lane, 2 * cp)), j
                    ):
                        conv[
                            _border_at(
                                s,
                                shuffle_pad,
                                _shuffle_index(s, shuffle_pad, _acc_index(s, cfg, m0, o0, ty, lane, 2 * cp)),
                                j,
                            )
                        ] = T.uint32(0)
        elif tile_sums:
            store_with_sums(conv, S, eps, bx, ty, lane, acc, m0, o0)
        else:
            for cr in T.unroll(mt * nt * 4):
                conv[_acc_index(s, cfg, m0, o0, ty, lane, cr)] = _store(
                    acc[cr], _acc_index(s, cfg, m0, o0, ty, lane, cr), eps
                )

    # one signature with every epilogue operand; the kernel keeps the ones its epilogue reads
    # (the block reads only those, so the others are unused parameters and are dropped)
    kept = {"A", "W", "conv", *(f"A{p}" for p in range(1, s.parts)), *(["S"] if tile_sums else [])}
    kept |= {"RS", "RZ", "CS", "CW", "WS"} if epilogue in DEQUANT_EPILOGUES else set()
    kept |= {"B"} if relu else set()
    kept |= {"R"} if res else set()

    def whole(*buffers):  # the read regions of the kept buffers, each buffer in full
        return [b[tuple(slice(None) for _ in b.shape)] for b in buffers if b.name in kept]

    @T.prim_func(s_tir=True)
    def main(
        A: T.Buffer(a_shape, a_dtype),
        A1: T.Buffer(a_shape, a_dtype),
        A2: T.Buffer(a_shape, a_dtype),
        A3: T.Buffer(a_shape, a_dtype),
        W: T.Buffer(w_shape, "uint32"),
        RS: T.Buffer((s.batch,), "float32"),
        RZ: T.Buffer((s.batch,), "int32"),
        CS: T.Buffer((s.out_ch,), "int32"),
        CW: T.Buffer((s.out_ch,), "float32"),
        WS: T.Buffer(ws_shape, "int32"),
        B: T.Buffer((s.out_ch,), "float32"),
        R: T.Buffer(o_shape, "float16"),
        conv: T.Buffer(c_shape, c_dtype),
        S: T.Buffer(s_shape, "float32"),
    ):
        T.func_attr({"tirx.noalias": True})

        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(32, thread="threadIdx.x"):
                    with T.sblock("block_tile"):
                        T.reads(whole(A, A1, A2, A3, W, RS, RZ, CS, CW, WS, B, R))
                        T.writes(whole(conv, S))
                        tile((A, A1, A2, A3), W, conv, S, (RS, RZ, CS, CW, WS, B, R), bx, ty, lane)

    main = tvm.tirx.PrimFunc([p for p in main.params if p.name in kept], main.body, main.ret_type, main.attrs)
    return main.with_attr("global_symbol", f"conv2d_{variant}")


def conv2d_s4mma_primfunc(
    shape: Conv2dCudaShape, act_signed: bool = False, epilogue: str | None = None, tile_sums: bool = False
) -> tvm.tirx.PrimFunc:
    """The CUDA s4 implicit-GEMM conv ``conv2d_s4mma(A, W, conv)`` (u4/s4 x s4, ``m16n8k64``/``k32``)."""
    return _mma_primfunc(shape, "s4mma", act_signed, epilogue, tile_sums=tile_sums)


def conv2d_s8mma_primfunc(
    shape: Conv2dCudaShape, act_signed: bool = False, epilogue: str | None = None, tile_sums: bool = False
) -> tvm.tirx.PrimFunc:
    """The CUDA s8 implicit-GEMM conv ``conv2d_s8mma(A, W, conv)`` (u8/s8 x s8, ``m16n8k32``/``k16``)."""
    return _mma_primfunc(shape, "s8mma", act_signed, epilogue, tile_sums=tile_sums)


def conv2d_f16mma_primfunc(
    shape: Conv2dCudaShape,
    act_signed: bool = False,
    epilogue: str | None = None,
    shuffle_pad: int | None = None,
    tile_sums: bool = False,
) -> tvm.tirx.PrimFunc:
    """The CUDA fp16 implicit-GEMM conv ``conv2d_f16mma(A, W, conv)`` (f16 x f16 -> f32,
    ``m16n8k16``/``k8``); ``act_signed`` has no meaning for float operands. With ``shuffle_pad``
    the output is pixel-shuffled (x2, channels in :func:`shuffle_channel_order`) into the next
    conv's packed operand with a zero border of that width (:func:`shuffle_out_shape`)."""
    return _mma_primfunc(shape, "f16mma", act_signed, epilogue, shuffle_pad, tile_sums)


# ----------------------------------------------------------------------------------------------
# numpy emulation of the tensor-core kernels: their own index functions + the PTX ISA fragment layouts


def _mma_reference(a_regs: np.ndarray, b_regs: np.ndarray, chunks: int, act_signed: bool, bits: int) -> np.ndarray:
    """One warp-wide ``mma.m16n8k{K}`` on per-lane registers ``a_regs[2*chunks][32]``,
    ``b_regs[chunks][32]`` (uint32), per the PTX ISA fragment layouts of .u4/.s4, .u8/.s8 and
    .f16 operands, with e = 32 / bits elements a register and K = 4e per chunk: A register r of lane
    4g+t holds row g + 8*(r%2), columns 4e*(r//2) + e*t .. +e-1; B register r holds rows
    4e*r + e*t .. +e-1 of column g; accumulator r is row g + 8*(r//2), column 2t + r%2. Element
    i of a register is bits ``bits*i``.. of the word. Returns ``[32][4]`` int64 (float64 for fp16
    operands: their products and a K <= 16 sum are exact in float64)."""
    e = 32 // bits
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    kind = np.float64 if bits == 16 else np.int64
    a_mat = np.zeros((16, 4 * e * chunks), kind)
    b_mat = np.zeros((4 * e * chunks, 8), kind)
    el = np.arange(e)
    for r in range(2 * chunks):
        a_mat[(g + 8 * (r % 2))[:, None], (4 * e * (r // 2) + e * t)[:, None] + el] = _unpack_words(
            a_regs[r][:, None], bits, act_signed
        )
    for r in range(chunks):
        b_mat[(4 * e * r + e * t)[:, None] + el, g[:, None]] = _unpack_words(b_regs[r][:, None], bits, True)
    d = a_mat @ b_mat
    return np.stack([d[g + 8 * (r // 2), 2 * t + r % 2] for r in range(4)], axis=1)


def emulate_mma(
    shape: Conv2dCudaShape,
    a_words: np.ndarray,
    w_words: np.ndarray,
    act_signed: bool = False,
    variant: str = "s4mma",
    epilogue: str | None = None,
    epilogue_args: tuple[np.ndarray, ...] = (),
    shuffle_pad: int | None = None,
    tile_sums: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Replay the tensor-core kernel ``variant`` in numpy, block by block: the same staging into
    two shared-memory buffers (``_a_src``, ``_b_src``, ``_stage_dst``; every thread's copies,
    the guarded last pass included), the same fragment reads (``_a_frag``, ``_b_frag``) and
    output writes (``_c_index``), the mma itself per the PTX ISA (:func:`_mma_reference`).
    Returns the NHWC int64 output (float32 for "f16mma": each mma's sum added to fp32
    accumulators). This checks the kernel's address math on a CPU; what it cannot check is the
    hardware's agreement with our reading of the ISA, or the barriers. ``epilogue`` replays the
    kernel's store of each accumulator (``epilogue_args``: the integer epilogue's RS, RZ, CS, CW, WS,
    then the bias of a "_relu" form and the residual of a "_res_relu" form),
    with the element (n, o) that :func:`_c_index` gives it: fp16 output. For a shape of
    ``parts`` > 1, ``a_words`` is the list of fp16 NHWC parts (:attr:`Conv2dCudaShape.part_shape`).
    With ``shuffle_pad`` it replays the pixel-shuffle store (:func:`_shuffle_index`, the border
    words of :func:`_shuffle_border`) and returns the words written, 0xFFFF in any half no store
    reached. With ``tile_sums`` it returns ``(output, S)``, the block sums reduced as the kernel
    does (:func:`_sum_slot`: fp32, per thread in accumulator order, then over the row slots)."""
    _check_epilogue(variant, epilogue)
    _check_shuffle(shape, variant, epilogue, shuffle_pad)
    _check_tile_sums(shape, variant, epilogue, shuffle_pad, tile_sums)
    cfg = mma_config(shape, variant)
    sums = np.zeros(tile_sums_shape(shape, variant), np.float32) if tile_sums else None
    gm, gn = _grid(shape, cfg)
    lane, tid = np.arange(32), np.arange(cfg.threads)
    if shape.parts == 1:
        a_words = np.asarray(a_words, np.uint32)
    else:  # the fp16 parts, each pair of halves read as one word, as the kernel does
        a_words = [np.ascontiguousarray(p, np.float16).view(np.uint32) for p in a_words]
    w_words = np.asarray(w_words, np.uint32)
    acc_kind = np.float32 if variant in FLOAT_VARIANTS else np.int64
    out = np.zeros(shape.out_shape(variant), acc_kind if epilogue is None else np.float32)
    if shuffle_pad is not None:  # fp16 bits of the shuffled map, 0xFFFF until a store reaches them
        halves = np.full((*shuffle_out_shape(shape, shuffle_pad)[:3], shape.out_ch // 4), 0xFFFF, np.uint16)
    a_buf, b_buf = cfg.bm * cfg.stride, cfg.bn * cfg.stride
    for bx in range(gm * gn):
        m0, o0 = _block_m0(shape, cfg, bx), _block_o0(shape, cfg, bx)
        a_sh = np.zeros(2 * a_buf, np.uint32)
        b_sh = np.zeros(2 * b_buf, np.uint32)

        def stage(ks, m0=m0, o0=o0, a_sh=a_sh, b_sh=b_sh):
            for i in range(cfg.a_loads):
                idx = i * cfg.threads + tid
                idx = idx[idx < cfg.bm * cfg.kw]
                a_sh[(ks % 2) * a_buf + _stage_dst(cfg, idx)] = _gather_words(
                    shape, a_words, _a_src(shape, cfg, m0, ks, idx)
                )
            for i in range(cfg.b_loads):
                idx = i * cfg.threads + tid
                idx = idx[idx < cfg.bn * cfg.kw]
                b_sh[(ks % 2) * b_buf + _stage_dst(cfg, idx)] = w_words[_b_src(shape, cfg, o0, ks, idx)]

        acc = np.zeros((cfg.warps, cfg.mt, cfg.nt, 32, 4), acc_kind)
        stage(0)
        for ks in range(cfg.ksteps):
            if ks + 1 < cfg.ksteps:  # the buffer of step ks - 1, read by then
                stage(ks + 1)
            base_a, base_b = (ks % 2) * a_buf, (ks % 2) * b_buf
            for ty in range(cfg.warps):
                wm, wn = ty // cfg.bg, ty % cfg.bg
                af = [
                    np.stack([a_sh[base_a + _a_frag(cfg, wm, mi, lane, r)] for r in range(cfg.a_regs)])
                    for mi in range(cfg.mt)
                ]
                bf = [
                    np.stack([b_sh[base_b + _b_frag(cfg, wn, ni, lane, r)] for r in range(cfg.b_regs)])
                    for ni in range(cfg.nt)
                ]
                for mi in range(cfg.mt):
                    for ni in range(cfg.nt):
                        d = _mma_reference(af[mi], bf[ni], cfg.chunks_per_mma, act_signed, cfg.bits)
                        acc[ty, mi, ni] += d.astype(acc_kind)
        red = np.zeros((cfg.bp * 8, cfg.bn), np.float32) if tile_sums else None  # the block's reduction buffer
        for ty in range(cfg.warps):
            wm, wn = ty // cfg.bg, ty % cfg.bg
            csum = np.zeros((2 * cfg.nt, 32), np.float32) if tile_sums else None
            for mi in range(cfg.mt):
                for ni in range(cfg.nt):
                    for r in range(4):
                        m, o = m0 + wm * 16 * cfg.mt + 16 * mi, o0 + wn * 8 * cfg.nt + 8 * ni
                        value = _emulate_store(
                            acc[ty, mi, ni, :, r], _c_index(shape, m, o, lane, r), epilogue, epilogue_args
                        )
                        if shuffle_pad is None:
                            out[_c_index(shape, m, o, lane, r)] = value
                            if tile_sums:
                                csum[2 * ni + r % 2] += value.astype(np.float32)
                            continue
                        dst = _shuffle_index(shape, shuffle_pad, _c_index(shape, m, o, lane, r))
                        halves[(*dst[:3], 2 * dst[3] + r % 2)] = value.astype(np.float16).view(np.uint16)
                        for j in range(8 if r % 2 == 0 else 0):  # a pair's store zeroes its border words
                            (y_check, x_check), at = _shuffle_border(shape, shuffle_pad, dst, j, np.where)
                            hit = y_check & x_check
                            for half in (0, 1):
                                halves[tuple(a[hit] for a in at[:3]) + (2 * at[3][hit] + half,)] = 0
            for c in range(2 * cfg.nt if tile_sums else 0):
                slot, col = _sum_slot(cfg, ty, lane, c)
                red[slot, col] = csum[c]
        if tile_sums:
            total = np.zeros(cfg.bn, np.float32)
            for r in range(cfg.bp * 8):
                total += red[r]
            sums[bx // gn, o0 : o0 + cfg.bn] = total
    if tile_sums:
        return out.astype(np.float16), sums
    if shuffle_pad is not None:
        return halves.view(np.uint32)
    return out if epilogue is None else out.astype(np.float16)


def _gather_words(shape: Conv2dCudaShape, a_words, index) -> np.ndarray:
    """The replay of :func:`_a_load`: the words at ``index`` of the packed operand, or of the
    parts (a list of word views) that :func:`_a_part` names."""
    if shape.parts == 1:
        return a_words[index]
    part, inner = _a_part(shape, index)
    part = np.broadcast_to(part, np.broadcast(*inner).shape)
    words = np.zeros(part.shape, np.uint32)
    for p, source in enumerate(a_words):
        taken = part == p
        words[taken] = source[tuple(np.broadcast_to(i, part.shape)[taken] for i in inner)]
    return words


def _emulate_store(v: np.ndarray, idx, epilogue: str | None, args: tuple[np.ndarray, ...]) -> np.ndarray:
    """What the kernel stores for accumulators ``v`` of output elements ``idx`` (float32 values,
    exactly representable: fp16 after the epilogue); ``args``: the epilogue's operands (then the
    bias of a "_relu" form, then the residual of a "_res_relu" form)."""
    if epilogue is None:
        return v
    o = idx[3]
    if base_epilogue(epilogue) == "f16":
        y = v.astype(np.float32)
    else:
        rs, rz, cs, cw, ws = args[:5]
        n = idx[0]
        total = v.astype(np.int64) - np.asarray(rz, np.int64)[n] * np.asarray(cs, np.int64)[o]
        if base_epilogue(epilogue) == "dequant_ws":
            total = total + np.asarray(ws, np.int64)[idx[0], idx[1], idx[2]]
        total = total.astype(np.int32)
        scale = np.asarray(rs, np.float32)[n] * np.asarray(cw, np.float32)[o]
        y = total.astype(np.float32) * scale
    if epilogue in RELU_EPILOGUES:  # the bias follows the integer epilogue's five operands
        y = y + np.asarray(args[0 if base_epilogue(epilogue) == "f16" else 5], np.float32)[o]
        if epilogue in RESIDUAL_EPILOGUES:
            y = y + np.asarray(args[6], np.float16)[idx[0], idx[1], idx[2], o].astype(np.float32)
        y = np.maximum(y, np.float32(0))
    return y.astype(np.float16).astype(np.float32)


def emulate_s4mma(
    shape: Conv2dCudaShape, a_words: np.ndarray, w_words: np.ndarray, act_signed: bool = False
) -> np.ndarray:
    """:func:`emulate_mma` of the s4 kernel."""
    return emulate_mma(shape, a_words, w_words, act_signed, "s4mma")


def emulate_f16mma(shape: Conv2dCudaShape, a_words: np.ndarray, w_words: np.ndarray) -> np.ndarray:
    """:func:`emulate_mma` of the fp16 kernel (float32 NHWC output)."""
    return emulate_mma(shape, a_words, w_words, False, "f16mma")


def emulate_s8mma(
    shape: Conv2dCudaShape, a_words: np.ndarray, w_words: np.ndarray, act_signed: bool = False
) -> np.ndarray:
    """:func:`emulate_mma` of the s8 kernel."""
    return emulate_mma(shape, a_words, w_words, act_signed, "s8mma")


# ----------------------------------------------------------------------------------------------
# build


_TWIN_TARGET = {"kind": "llvm"}

#: variant -> the unscheduled compute (the twin) and the CUDA-scheduled kernel
COMPUTES = {
    "dp4a": conv2d_dp4a_compute,
    "s4mma": conv2d_s4_compute,
    "s8mma": conv2d_s8_compute,
    "f16mma": conv2d_f16_compute,
}
PRIMFUNCS = {
    "dp4a": conv2d_dp4a_primfunc,
    "s4mma": conv2d_s4mma_primfunc,
    "s8mma": conv2d_s8mma_primfunc,
    "f16mma": conv2d_f16mma_primfunc,
}


def build_conv2d_twin(shape: Conv2dCudaShape, variant: str = "dp4a", act_signed: bool = False) -> TirKernel:
    """The unscheduled compute of ``variant`` on the same packed layouts, built for LLVM (runs here):
    ``twin(a_packed, w_packed) -> out`` (numpy in, numpy out)."""
    func = COMPUTES[_check_variant(variant)](shape, act_signed)
    return build_kernel(
        f"conv2d_{variant}_twin", func, 2, target=_TWIN_TARGET, info={"variant": variant, "act_signed": act_signed}
    )


class CudaConvKernel:
    """A conv built for CUDA: the scheduled ``prim_func`` (for ``R.call_tir``), the executable,
    its CUDA source / PTX (``device_code``) and, on a machine with a GPU, ``kernel(a, w) -> out``
    on packed numpy arrays."""

    def __init__(
        self,
        shape: Conv2dCudaShape,
        variant: str,
        arch: str,
        act_signed: bool,
        prim_func: tvm.tirx.PrimFunc,
        executable,
    ):
        self.shape, self.variant, self.arch, self.act_signed = shape, variant, arch, act_signed
        self.prim_func = prim_func
        self.executable = executable
        self._device_code: str | None = None

    @property
    def build_seconds(self) -> float:
        return cuda_toolchain.build_info(self.executable).seconds

    @property
    def source(self) -> str:
        """The CUDA C that TVM generated (and nvcc compiled)."""
        return cuda_toolchain.build_info(self.executable).source

    @property
    def device_code(self) -> str:
        """PTX (and SASS where ``cuobjdump`` exists) of the built kernel."""
        if self._device_code is None:
            self._device_code = cuda_toolchain.device_code(self.executable)
        return self._device_code

    @property
    def act_dtype(self) -> str:
        if self.variant in MMA_BITS:
            return "uint32"
        return "int8" if self.act_signed else "uint8"

    def pack_activations(self, x, pad_value: int = 0) -> np.ndarray:
        if self.variant == "f16mma":
            return pack_activations_f16(x, self.shape.kernel, self.shape.kernel_w)
        return pack_activations(self.variant, x, pad_value, self.shape.kernel, self.act_signed)

    def pack_weights(self, w) -> np.ndarray:
        return pack_weights(self.variant, w)

    def unpack_output(self, y) -> np.ndarray:
        return unpack_output(y, self.variant)

    def __call__(self, a, w) -> np.ndarray:
        """Run on ``tvm.cuda(0)`` (needs a GPU): packed numpy operands in, packed int32 output out."""
        if not cuda_toolchain.has_cuda_device():
            raise RuntimeError("no CUDA device: this kernel can be built and inspected here, not run")
        s, dev = self.shape, tvm.cuda(0)
        w_dtype = "uint32" if self.variant in MMA_BITS else "int8"
        a_t = tvm.runtime.tensor(np.ascontiguousarray(a, dtype=self.act_dtype), dev)
        w_t = tvm.runtime.tensor(np.ascontiguousarray(w, dtype=w_dtype), dev)
        out = tvm.runtime.empty(s.out_shape(self.variant), out_dtype(self.variant), dev)
        self.executable["main"](a_t, w_t, out)
        dev.sync()
        return out.numpy()

    def __repr__(self) -> str:
        s = self.shape
        return (
            f"CudaConvKernel({self.variant}, {self.arch}, N={s.batch}, {s.in_ch}->{s.out_ch}, "
            f"{s.height}x{s.width}, act={'signed' if self.act_signed else 'unsigned'})"
        )


def build_conv2d_cuda(
    shape: Conv2dCudaShape, variant: str = "dp4a", arch: str = "sm_80", act_signed: bool = False
) -> CudaConvKernel:
    """Schedule and compile ``variant`` ("dp4a": u8/s8 x s8, "s4mma": u4/s4 x s4, "s8mma": u8/s8 x
    s8) for ``arch``
    with nvcc (see :mod:`.cuda_toolchain`; works without a GPU)."""
    _check_variant(variant)
    shape.check(variant)
    func = PRIMFUNCS[variant](shape, act_signed)
    exe = cuda_toolchain.build_cuda(func, arch)
    return CudaConvKernel(shape, variant, arch, act_signed, func, exe)
