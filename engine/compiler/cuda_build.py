"""``--target cuda``: exported graphs -> Relax -> integer convs on int8 / int4 tensor cores or dp4a,
float convs on fp16 tensor cores -> CUDA.

How this differs from the LLVM path (:mod:`.build`, :mod:`.qdq_conv`):

* **RefER kernels, GPU-scheduled.** As on LLVM, each RefER's matching-and-warp subgraph (or the
  shared matcher and its warps) is collapsed by :mod:`.refer_fuse` (:func:`import_graph_cuda`);
  the ``R.call_tir`` calls get the GPU schedules of the CPU kernels' computes
  (:mod:`refqsr_engine.kernels.refer_cuda`: same integer grid, arg-max and float32 rounding, so
  the flow is the CPU kernel's), marked opaque so that FuseOps and dlight leave them alone.
* **The integer conv is three pieces, not one fused kernel.** Each quantized conv
  ``conv2d(dequantize(quantize(x, s, z)), dequantize(Wq, ws, wz))`` becomes

  1. Relax ops that quantize and lay out the activations: ``x`` is padded with 0.0 in float
     (0.0 quantizes exactly to the zero point, so the border gets ``u0 = z + offset``), then
     ``u = clamp(round(x / s) + z, qlo, qhi) + offset`` on the conv's b-bit grid (``R.round``
     lowers to ``nearbyint`` on LLVM and ``nearbyintf`` in CUDA C, round-half-even like ONNX
     QuantizeLinear), cast and permuted into the kernel's layout -- for the tensor-core kernels
     8 nibbles or 4 bytes are shifted into one uint32 word (``strided_slice``, ``left_shift``,
     ``add``); a strided conv first stacks the K x K strided views of its input (im2col), and
     with a weight shift ``c`` the window sums of ``u`` are computed beside the pack;
  2. ``R.call_tir`` of a hand-scheduled kernel of :mod:`refqsr_engine.kernels.conv2d_cuda`:
     ``s8mma`` (u8 x s8, ``mma.sync ... .u8.s8``), ``s4mma`` (u4 x s4, ``mma.sync ... .u4.s4``)
     or ``dp4a`` (``dp4a.u32.s32``) on the weights ``w - c``, giving raw int32 sums;
  3. the epilogue ``y = float(acc + c * wsum - u0[n] * sum_w[o]) * (s[n] * ws[o])``: for s4mma /
     s8mma inside the kernel at its store, written as fp16 NHWC (``"dequant"``, ``"dequant_ws"``
     with a shift; one rounding to fp16 after the exact fp32 math), then widened to fp32 NCHW by
     a Relax op; for dp4a (and with ``fuse_epilogue=False``) as Relax ops on the int32 sums.

  FuseOps merges the injective ops of 1 and 3 into one kernel each; the conv kernel itself is
  marked opaque so nothing is fused into its hand-written schedule.
* **Variant choice** (:func:`choose_cuda_variant_why`) is by exact operand ranges and the shape
  with its channels padded to the layout: ``s4mma`` when the activations have <= 4 bits, the
  integer weights (zero point removed) span at most 16 values and the arch has int4 tensor cores
  (not sm_90); else ``s8mma`` for up to 8 bits and 256 weight values; ``dp4a`` where no mma tile
  fits (fewer than 16 output pixels), with the reason recorded. Weights outside the operand's
  signed range run shifted (:func:`cuda_weight_shift`). A conv whose int32 sums could overflow,
  or that has dilation or groups, stays the graph's float QDQ conv (exact fake-quantized math,
  just not integer); no bundled model has one.
* **Full-precision convs** (``act_bits`` 32) become an fp16 pack kernel, the ``f16mma`` kernel
  (fp16 operands, fp32 sums; weights rounded and packed at compile time) and NHWC -> NCHW; the
  bias add stays in the graph; the kernel stores its sums in fp16 except for the split head. Few
  output channels fold kernel taps into the GEMM N dimension (:func:`float_conv_plan`,
  :class:`FloatConvPlan`: the folding of least roofline time within :data:`FOLD_LIMIT` issued /
  useful MACs, a shift-add after the kernel), and the RGB head runs split in three fp16 products
  (fp32-grade). A conv no f16mma layout takes stays on dlight's fp32 schedule, the reason
  in ``f16_fallback``.
* **fp16 activations between kernels** (:mod:`.half_storage`): in the SR graphs every feature
  map that FuseOps would write in fp32 for several kernels (a block's output read by its residual
  add, the next pack, DDTB's mean and a concatenation) is stored in fp16 and widened in each
  reader; the ops compute in fp32 as before. A conv whose output only a bias add and a ReLU
  read runs them in its kernel's epilogue (the "_relu" forms of
  :data:`~refqsr_engine.kernels.conv2d_cuda.EPILOGUES`: one fp16 rounding after them), and the
  readers of that ReLU widen the kernel's fp16 NHWC output themselves; an integer conv's
  ``relu(conv + b + x)`` with ``x`` a kernel's fp16 NHWC output takes the "_res_relu" form and
  reads ``x`` in its store. None of this in the ClustBlock (:func:`stores_half`).
* The ClustBlock clustering kernel runs on the device: its GPU schedule
  (:func:`~refqsr_engine.kernels.refer_cuda.cluster_primfunc_cuda`) is built into ``cluster.so``
  for the arch (:func:`build_cluster_library_cuda`; ``"device": "device"`` in the manifest).
* The Relax pipeline is the CUDA default's pieces minus ``FoldConstant`` (constants are folded
  in ONNX already, and the folder compiles a kernel per constant expression). nvcc runs without
  ``--use_fast_math`` (IEEE division and sqrt, as in ONNX Runtime and PyTorch), in two steps --
  CUDA C -> PTX -> fatbin -- so the PTX the device-code check scans costs no second front-end
  run (:func:`_compile_cuda_source`).

The same rewrite with ``twin=True`` calls the kernels' plain-TIR LLVM twins (same packed layouts),
so the whole rewritten graph can be built for the CPU and checked against ONNX Runtime on a
machine without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ...errors import RefQSRError
from ...kernels import conv2d_cuda as cc
from ...kernels import cuda_toolchain
from ...kernels.qconv_fused import grid_offset, grid_range
from .cuda_means import SumsKernel, means_from_tile_sums
from .half_storage import OPAQUE as _OPAQUE
from .half_storage import bound_values, fp16_view, store_half
from .half_storage import reader_counts as _reader_counts
from .qdq_conv import ConvReport, QDQConvResult, _const, _op_name, classify_conv
from .relax_import import graph_metadata, static_input_shapes

_S4_RANGE, _S8_RANGE = (-8, 7), (-128, 127)
INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# import and variant choice


def import_graph_cuda(
    model: onnx.ModelProto, batch: int, refer_target: tvm.target.Target | None = None
) -> tuple[tvm.IRModule, dict[str, list[int]], int]:
    """Relax module of ``model`` at ``batch`` patches with the RefER kernels scheduled for
    ``refer_target`` (a CUDA target: the GPU schedules; None: the CPU kernels, for the LLVM twin);
    returns (module, input shapes, RefER warps fused)."""
    from .relax_import import import_graph

    shapes = static_input_shapes(model, batch)
    mod, warps = import_graph(model, shapes, refer_target)
    return mod, shapes, warps


def cuda_weight_shift(variant: str, w_min: int, w_max: int) -> int | None:
    """c such that every ``w - c`` fits the variant's signed weight operand (s4 for "s4mma", s8
    otherwise): 0 when the weights fit as they are, None when their range is too wide. The
    kernel runs on ``w - c`` and ``c * (window sum of u)`` is added back in the epilogue, the
    same exact split as the CPU engine's AVX-512 kernels (:func:`~...kernels.qconv_fused.weight_shift`)."""
    lo, hi = _S4_RANGE if variant == "s4mma" else _S8_RANGE
    if lo <= w_min and w_max <= hi:
        return 0
    if w_max - w_min > hi - lo:
        return None
    return w_min - lo


def integer_conv_is_exact(act_bits: int, w_min: int, w_max: int, shift: int, taps: int) -> bool:
    """No int32 overflow in the kernel's sums, the shift term or the zero-point term over ``taps``
    = C * K * K products per output (the bound of :func:`~...kernels.qconv_fused.vnni512_is_exact`)."""
    act_max = 2**act_bits - 1
    w_abs = max(abs(w_min), abs(w_max))
    return act_max * taps * (128 + abs(shift) + w_abs) <= INT32_MAX


#: input / output channel multiples of each kernel's layout
CHANNEL_MULTIPLES = {"dp4a": (4, 4), "s4mma": (32, 8), "s8mma": (16, 8)}
#: the arches whose tensor cores take int4 operands (sm_90 has none: there ``mma ... .s4`` is emulated)
INT4_MMA_ARCHS = ("sm_80", "sm_86", "sm_89")


def padded_shape(shape: cc.Conv2dCudaShape, variant: str) -> cc.Conv2dCudaShape:
    """``shape`` with its channels rounded up to the multiples of ``variant``'s layout."""
    mc, mo = CHANNEL_MULTIPLES[variant]
    return dataclasses.replace(shape, in_ch=-(-shape.in_ch // mc) * mc, out_ch=-(-shape.out_ch // mo) * mo)


def why_not_variant(variant: str, act_bits: int, w_min: int, w_max: int, shape: cc.Conv2dCudaShape) -> str | None:
    """None when ``variant`` computes this conv exactly and its layout takes the (padded) shape,
    else why not."""
    try:
        padded_shape(shape, variant).check(variant)
    except ValueError as err:
        return str(err)
    shift = cuda_weight_shift(variant, w_min, w_max)
    if shift is None:
        return f"weights {w_min}..{w_max} span more values than the {variant} operand"
    if not integer_conv_is_exact(act_bits, w_min, w_max, shift, shape.in_ch * shape.kernel**2):
        return "int32 sums could overflow"
    return None


def choose_cuda_variant_why(
    act_bits: int, w_min: int, w_max: int, shape: cc.Conv2dCudaShape, arch: str = "sm_80"
) -> tuple[str | None, str | None]:
    """(variant, why no tensor core): the kernel that is exact for these operands and takes
    ``shape`` once its channels are padded to the layout, tensor cores first -- "s4mma" (<= 4-bit
    activations, weights within 16 values; not on sm_90), "s8mma" (<= 8 bits, 256 values),
    "dp4a" -- or None: the conv stays float. Weights are taken with a shift
    (:func:`cuda_weight_shift`). The second item says why a conv that got "dp4a" (or nothing)
    has no tensor-core kernel."""
    why = []
    if act_bits <= 4 and arch in INT4_MMA_ARCHS:
        reason = why_not_variant("s4mma", act_bits, w_min, w_max, shape)
        if reason is None:
            return "s4mma", None
    if act_bits <= 8:
        reason = why_not_variant("s8mma", act_bits, w_min, w_max, shape)
        if reason is None:
            return "s8mma", None
        why.append(f"s8mma: {reason}")
        reason = why_not_variant("dp4a", act_bits, w_min, w_max, shape)
        if reason is None:
            return "dp4a", "; ".join(why)
        why.append(f"dp4a: {reason}")
    else:
        why.append(f"{act_bits}-bit activations")
    return None, "; ".join(why)


def choose_cuda_variant(
    act_bits: int, w_min: int, w_max: int, shape: cc.Conv2dCudaShape, arch: str = "sm_80"
) -> str | None:
    """The variant of :func:`choose_cuda_variant_why`."""
    return choose_cuda_variant_why(act_bits, w_min, w_max, shape, arch)[0]


#: datasheet peaks of dense tensor-core MACs per second (half the TOPS / TFLOPS) and of memory
#: bytes per second, from the NVIDIA A100 and H100 datasheets: A100 SXM4 80 GB (INT8 624 TOPS,
#: INT4 1248 TOPS, FP16 312 TFLOPS, 2039 GB/s) and H100 SXM5 (INT8 1979 TOPS, no INT4 tensor
#: cores, FP16 989.4 TFLOPS, 3.35 TB/s), dense (no sparsity). dp4a has no datasheet figure:
#: memory time only.
DATASHEET_PEAKS = {
    "A100": {"s8mma": 312e12, "s4mma": 624e12, "f16mma": 156e12, "bytes": 2.039e12},
    "H100": {"s8mma": 989.5e12, "f16mma": 494.7e12, "bytes": 3.35e12},
}


def conv_roofline(
    shape: cc.Conv2dCudaShape,
    in_ch: int,
    out_ch: int,
    variant: str,
    useful_macs: int | None = None,
    epilogue: str | None = None,
) -> dict[str, Any]:
    """One conv kernel against the datasheet peaks: useful MACs (the real channels; given as
    ``useful_macs`` for a folded float conv, whose kernel problem is not the conv's), issued MACs
    (the padded problem the kernel computes), the bytes it must move at least (packed activations
    with their border, packed weights, the output in the kernel's store type -- int32 / fp32 sums,
    fp16 with an ``epilogue`` -- and the "dequant" epilogue's per-sample and per-channel operands,
    each once) and, per GPU, the lower bound on its time in microseconds: max(issued / peak MACs,
    bytes / bandwidth)."""
    taps = shape.taps
    bits = cc.MMA_BITS.get(variant, 8)
    hp, wp = shape.padded_hw
    useful = shape.pixels * out_ch * in_ch * taps if useful_macs is None else int(useful_macs)
    issued = shape.pixels * shape.out_ch * shape.in_ch * taps
    out_bytes = np.dtype(cc.out_dtype(variant, epilogue)).itemsize
    moved = (shape.batch * hp * wp * shape.in_ch + shape.out_ch * taps * shape.in_ch) * bits // 8
    moved += shape.pixels * shape.out_ch * out_bytes
    if epilogue in cc.DEQUANT_EPILOGUES:  # RS, RZ per sample, CS, CW per output channel: 4 bytes each
        moved += 8 * (shape.batch + shape.out_ch)
    if cc.base_epilogue(epilogue) == "dequant_ws":  # the int32 window term per output pixel
        moved += shape.pixels * 4
    if epilogue in cc.RELU_EPILOGUES:  # the fp32 bias per output channel
        moved += shape.out_ch * 4
    if epilogue in cc.RESIDUAL_EPILOGUES:  # the fp16 residual, one per output element
        moved += shape.pixels * shape.out_ch * 2
    out: dict[str, Any] = {
        "variant": variant,
        "epilogue": epilogue,
        "useful_macs": useful,
        "issued_macs": issued,
        "issued_over_useful": round(issued / useful, 4),
        "bytes": moved,
    }
    return _timed(out)


def _timed(roof: dict[str, Any]) -> dict[str, Any]:
    """``roof`` with, per GPU, ``<gpu>_us`` = max(issued MACs / peak, bytes / bandwidth) and what binds."""
    out = dict(roof)
    for gpu, peak in DATASHEET_PEAKS.items():
        memory = roof["bytes"] / peak["bytes"] * 1e6
        compute = roof["issued_macs"] / peak[roof["variant"]] * 1e6 if roof["variant"] in peak else None
        out[f"{gpu}_us"] = round(max(memory, compute or 0.0), 3)
        out[f"{gpu}_bound"] = "memory" if compute is None or memory >= compute else "compute"
    return out


def with_tile_sums(roof: dict[str, Any], sums_shape: Sequence[int]) -> dict[str, Any]:
    """``roof`` of a kernel that also writes its fp32 tile sums (:func:`.cuda_means.means_from_tile_sums`)."""
    return _timed(dict(roof, bytes=roof["bytes"] + 4 * int(np.prod(sums_shape)), tile_sums=list(sums_shape)))


def with_fp16_layer(roof: dict[str, Any], in_elems: int, out_elems: int, weight_elems: int) -> dict[str, Any]:
    """``roof`` plus the same conv as a layer-by-layer fp16 framework runs it (PyTorch fp16 on
    tensor cores): its fp16 input, weights and output each moved once (``fp16_layer_bytes``) and,
    per GPU, ``<gpu>_fp16_layer_us`` = max(useful MACs / fp16 peak, bytes / bandwidth). Summed over
    a graph it is a like-for-like bound beside the compute-only one (useful MACs at the fp16 peak),
    which no kernel whose operands come from and go to memory can reach where bytes bind."""
    moved = 2 * (int(in_elems) + int(out_elems) + int(weight_elems))
    out = dict(roof, fp16_layer_bytes=moved)
    for gpu, peak in DATASHEET_PEAKS.items():
        t = max(roof["useful_macs"] / peak["f16mma"], moved / peak["bytes"]) * 1e6
        out[f"{gpu}_fp16_layer_us"] = round(t, 3)
    return out


@dataclass(frozen=True)
class _ConvPlan:
    """One quantized conv as the rewrite sees it (after im2col and channel padding, if any)."""

    shape: cc.Conv2dCudaShape  # the kernel's problem: output size, padded channels, kernel
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    act_bits: int
    signed_container: bool
    w_int: np.ndarray  # OIHW integer weights of the kernel's problem, zero point removed, padded with 0
    w_scale: np.ndarray  # [O] float32 (0 for padded output channels)
    in_ch: int  # real input channels of the kernel's problem (before padding to the layout)
    out_ch: int  # real output channels of the conv
    im2col: tuple[int, int, int] | None = None  # (K, stride h, stride w): a strided conv as a 1x1 conv

    @property
    def offset(self) -> int:
        return grid_offset(self.act_bits, self.signed_container)

    @property
    def q_range(self) -> tuple[int, int]:
        return grid_range(self.act_bits, self.signed_container)

    def padded(self, variant: str) -> _ConvPlan:
        """The plan with channels padded to ``variant``'s layout: input channels hold u = 0,
        output channels zero weights (sliced off after the epilogue)."""
        shape = padded_shape(self.shape, variant)
        c_pad, o_pad = shape.in_ch - self.shape.in_ch, shape.out_ch - self.shape.out_ch
        w_int = np.pad(self.w_int, ((0, o_pad), (0, c_pad), (0, 0), (0, 0)))
        return dataclasses.replace(self, shape=shape, w_int=w_int, w_scale=np.pad(self.w_scale, (0, o_pad)))


#: issued / useful MACs up to which a float conv takes the least folding (few output channels)
FOLD_LIMIT = 1.3
#: the foldings of a float conv's kernel taps into the GEMM N dimension, least first: none;
#: "kw", N = (o, kw), a K x 1 conv over the padded input; "khkw", N = (o, kh, kw), a 1 x 1 conv
FOLDINGS = ("none", "kw", "khkw")


def _ceil(v: int, m: int) -> int:
    return -(-v // m) * m


@dataclass(frozen=True)
class FloatConvPlan:
    """A stride-1 float conv (``batch`` x ``in_ch`` -> ``out_ch``, ``kernel`` x ``kernel``,
    ``height`` x ``width`` outputs) as an f16mma kernel problem ``shape`` with its kernel taps
    folded into the output channels as ``folding`` says. The folded kernel writes partial sums
    ``P[n][y][x][m]``: for "kw", ``m = o*K + j`` and ``out[n,o,h,w] = sum_j P[n,h,w+j,m]``; for
    "khkw", ``m = (o*K + i)*K + j`` and ``out[n,o,h,w] = sum_{i,j} P[n,h+i,w+j,m]``."""

    batch: int
    in_ch: int
    out_ch: int
    kernel: int
    height: int
    width: int
    folding: str = "none"
    split: int = 1  # fp16 pieces per operand product (:data:`~...kernels.conv2d_cuda.SPLIT_PARTS`)
    # a faster plan over FOLD_LIMIT, not taken: its folding, issued / useful MACs and bounds
    over_limit: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def epilogue(self) -> str | None:
        """The kernel stores its fp32 sums rounded to fp16 ("f16": half the output bytes, which
        dominate these memory-bound convs; a folded plan's partial sums are summed in fp32 by the
        shift-add), except a split conv (the RGB head), whose output keeps fp32 for the first
        quantizer (:data:`SPLIT_MAX_CHANNELS`)."""
        return "f16" if self.split == 1 else None

    def roofline(self) -> dict[str, Any]:
        """:func:`conv_roofline` of the kernel problem, against the conv's useful MACs."""
        s = self.shape
        return conv_roofline(s, s.in_ch, s.out_ch, "f16mma", self.useful_macs, self.epilogue)

    @property
    def taps_folded(self) -> int:
        return {"none": 1, "kw": self.kernel, "khkw": self.kernel**2}[self.folding]

    @property
    def shape(self) -> cc.Conv2dCudaShape:
        b, k, h, w = self.batch, self.kernel, self.height, self.width
        c = _ceil(self.split * self.in_ch, cc.mma_chunk_channels("f16mma"))  # zero channels up to a K chunk
        o = _ceil(self.out_ch * self.taps_folded, 8)
        if self.folding == "none":
            return cc.Conv2dCudaShape(b, c, o, h, w, k)
        if self.folding == "kw":
            return cc.Conv2dCudaShape(b, c, o, h, w + k - 1, k, kernel_w=1)
        return cc.Conv2dCudaShape(b, c, o, h + k - 1, w + k - 1, 1)

    @property
    def useful_macs(self) -> int:
        return self.batch * self.height * self.width * self.out_ch * self.in_ch * self.kernel**2

    @property
    def issued_macs(self) -> int:
        s = self.shape
        return s.pixels * s.out_ch * s.in_ch * s.taps

    def weights(self, w: np.ndarray) -> np.ndarray:
        """OIHW float weights of the conv -> OIHW weights of the kernel problem (zero padded); with
        ``split``, the input channel blocks [w_hi, w_hi, w_lo] (w_lo = w - fp16(w), rounded to
        fp16 when packed) against the activation blocks [x_hi, x_lo, x_hi]."""
        s, k, o = self.shape, self.kernel, self.out_ch
        w = np.asarray(w, np.float32)
        if self.split > 1:
            hi = w.astype(np.float16).astype(np.float32)
            w = np.concatenate([hi, hi, w - hi][: self.split], axis=1)
        c = w.shape[1]
        if self.folding == "none":
            folded = w
        elif self.folding == "kw":  # [o*K + j][c][i][0] = w[o][c][i][j]
            folded = w.transpose(0, 3, 1, 2).reshape(o * k, c, k, 1)
        else:  # [(o*K + i)*K + j][c][0][0] = w[o][c][i][j]
            folded = w.transpose(0, 2, 3, 1).reshape(o * k * k, c, 1, 1)
        pad = ((0, s.out_ch - folded.shape[0]), (0, s.in_ch - c), (0, 0), (0, 0))
        return np.pad(folded.astype(np.float32), pad)

    def report(self) -> dict[str, Any]:
        return {
            "variant": "f16mma",
            "folding": self.folding,
            "epilogue": self.epilogue,
            "split": self.split,
            "kernel_problem": [self.shape.in_ch, self.shape.out_ch, self.shape.kernel, self.shape.kw_taps],
            "useful_macs": self.useful_macs,
            "issued_macs": self.issued_macs,
            "issued_over_useful": round(self.issued_macs / self.useful_macs, 4),
            **({"over_limit": self.over_limit} if self.over_limit else {}),
        }


#: input channels up to which a float conv runs split (3 fp16 products a MAC, fp32-grade sums):
#: the RGB head, whose output feeds the first quantizer (fp16 rounding there moves activations
#: across quantization steps: -0.016 dB PSNR-Y on DDTB-4 SRResNet), and whose 3 channels pad to
#: 8 or 16 anyway
SPLIT_MAX_CHANNELS = 5


def _roofline_us(r: dict[str, Any]) -> float:
    """The ranking of a roofline: its bounds summed over the datasheet GPUs."""
    return sum(r[f"{gpu}_us"] for gpu in DATASHEET_PEAKS)


def float_conv_plan(
    batch: int, in_ch: int, out_ch: int, kernel: int, height: int, width: int
) -> tuple[FloatConvPlan | None, str | None]:
    """(plan, why none): among the foldings (:data:`FOLDINGS`) whose issued MACs are at most
    :data:`FOLD_LIMIT` x the useful ones, the one of least roofline time (:meth:`FloatConvPlan.roofline`,
    summed over the datasheet GPUs; folded partial sums written in fp16); when none is within the
    limit (a 3-channel input padded to 16 is over it whatever the folding), the least time of
    all. A faster plan over the limit is not taken (the limit bounds the wasted tensor-core work)
    but recorded in the chosen plan's report as ``over_limit``. None with the reason when no
    f16mma layout takes the conv. Convs of at most :data:`SPLIT_MAX_CHANNELS` input channels run
    split in three (x_hi w_hi + x_lo w_hi + x_hi w_lo)."""
    fits, why = [], None
    split = 3 if in_ch <= SPLIT_MAX_CHANNELS else 1
    for folding in FOLDINGS if kernel > 1 else ("none",):
        plan = FloatConvPlan(batch, in_ch, out_ch, kernel, height, width, folding, split)
        try:
            plan.shape.check("f16mma")
        except ValueError as err:
            why = why or str(err)
            continue
        fits.append((plan, _roofline_us(plan.roofline())))
    if not fits:
        return None, why
    within = [f for f in fits if f[0].issued_macs <= FOLD_LIMIT * f[0].useful_macs]
    chosen, t_chosen = min(within or fits, key=lambda f: f[1])
    fastest, t_fastest = min(fits, key=lambda f: f[1])
    if t_fastest < t_chosen:
        r = fastest.roofline()
        over = {"folding": fastest.folding, "issued_over_useful": r["issued_over_useful"]}
        over.update({f"{gpu}_us": r[f"{gpu}_us"] for gpu in DATASHEET_PEAKS})
        chosen = dataclasses.replace(chosen, over_limit=over)
    return chosen, None


def _kernel_options(epilogue: str | None, shuffle_pad: int | None, tile_sums: bool = False) -> dict[str, Any]:
    options: dict[str, Any] = {"epilogue": epilogue} if epilogue else {}
    options = {**options, "shuffle_pad": shuffle_pad} if shuffle_pad is not None else options
    return {**options, "tile_sums": True} if tile_sums else options


def _cuda_kernel(
    shape: cc.Conv2dCudaShape,
    variant: str,
    epilogue: str | None = None,
    shuffle_pad: int | None = None,
    tile_sums: bool = False,
) -> tvm.tirx.PrimFunc:
    func = cc.PRIMFUNCS[variant](shape, False, **_kernel_options(epilogue, shuffle_pad, tile_sums))
    return func.with_attr("tirx.is_scheduled", True)  # dlight must not touch it


def _twin_kernel(
    shape: cc.Conv2dCudaShape,
    variant: str,
    epilogue: str | None = None,
    shuffle_pad: int | None = None,
    tile_sums: bool = False,
) -> tvm.tirx.PrimFunc:
    return cc.COMPUTES[variant](shape, False, **_kernel_options(epilogue, shuffle_pad, tile_sums))


# ----------------------------------------------------------------------------------------------
# the rewrite


@dataclass
class _FoldableOutput:
    """A conv kernel whose fp16 NHWC output the graph widens to fp32 NCHW unchanged (no channel
    slice), with what it takes to call it again with the bias-and-ReLU form of its epilogue."""

    index: int
    shape: cc.Conv2dCudaShape
    variant: str
    epilogue: str
    args: list
    roofline: Callable[[str], dict[str, Any]]  # epilogue -> the conv's roofline entry


def _bias_vector(expr: relax.Expr, bindings: dict, out_ch: int) -> np.ndarray | None:
    """The per-output-channel bias of ``add(conv, expr)``: a constant, or a reshape of one, whose
    values vary along the channel axis of NCHW only; None otherwise."""
    if isinstance(expr, relax.Var):
        expr = bindings.get(expr, expr)
    if isinstance(expr, relax.Call) and _op_name(expr) == "relax.reshape":
        inner = expr.args[0]
        inner = bindings.get(inner, inner) if isinstance(inner, relax.Var) else inner
        shape = [int(v) for v in expr.ty.shape]
        expr = inner
    elif isinstance(expr, tvm.ir.GenericConst):
        shape = [int(v) for v in expr.ty.shape]
    else:
        return None
    if not isinstance(expr, tvm.ir.GenericConst) or expr.ty.dtype != "float32":
        return None
    if shape not in ([1, out_ch, 1, 1], [out_ch, 1, 1]):
        return None
    return expr.value.numpy().astype(np.float32).reshape(out_ch)


@mutator
class _CudaRewriter(PyExprMutator):
    def __init__(
        self,
        mod: tvm.IRModule,
        table: Sequence[dict],
        twin: bool,
        result: CudaConvResult,
        arch: str,
        f16: bool = True,
        fuse_epilogue: bool = True,
        fold_relu: bool = True,
        func_name: str = "main",
    ):
        super().__init__(mod)
        self.fold_relu = fold_relu and fuse_epilogue  # the bias-and-ReLU forms are the fused epilogues'
        self.arch = arch
        self.f16 = f16
        self.fuse_epilogue = fuse_epilogue
        self.table = list(table)
        self.make_kernel = _twin_kernel if twin else _cuda_kernel
        self.result = result
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        # for folding a conv's bias add and ReLU into its kernel: the input graph's bindings and
        # readers, and the rewritten convs' output vars
        func = mod[func_name]
        self.old_bindings = bound_values(func)
        self.old_readers = _reader_counts(func)
        self.foldable: dict[relax.Var, _FoldableOutput] = {}
        self.part_copies: dict[relax.Expr, relax.Var] = {}  # concatenated tensor -> its fp16 NHWC copy
        # a conv kernel's fp16 NHWC output -> the conv as that kernel runs it (its epilogue and
        # every operand): what it takes to call the kernel again with another store
        self.kernel_outputs: dict[relax.Var, _FoldableOutput] = {}
        # each conv's packed weights constant, conv index, kernel shape and variant
        self.weights: list[tuple[relax.Constant, int, cc.Conv2dCudaShape, str]] = []
        self.sums_made = 0

    def visit_call_(self, call: relax.Call):  # noqa: D102 - visitor hook
        old = call
        call = super().visit_call_(call)
        if _op_name(call) == "relax.nn.relu" and self.fold_relu:
            folded = self._fold_bias_relu(old, call)
            return call if folded is None else folded
        if _op_name(call) != "relax.nn.conv2d":
            return call
        report, matched = classify_conv(call, self.table, self.result, self.lookup_binding)
        if matched is None:
            return self._float_conv(call, report) if self.f16 else call
        index = report.index
        plan = self._plan(call, matched, report)
        if isinstance(plan, str):
            variant, why = None, plan
        else:
            variant, why = choose_cuda_variant_why(report.act_bits, *report.weight_range, plan.shape, self.arch)
        if variant is None:
            self.result.float_reasons[index] = why
            return call  # the graph's own float QDQ conv: exact fake-quantized math
        if why:
            self.result.no_mma_reasons[index] = why
        return self._integer_conv(matched[0], plan.padded(variant), variant, report)

    def _plan(self, call: relax.Call, matched, report: ConvReport) -> _ConvPlan | str:
        """The conv's integer problem, or why it has none (a string)."""
        quant, wdeq = matched
        wq = _const(wdeq.args[0], "weight").astype(np.int64)
        wscale = _const(wdeq.args[1], "weight scale").astype(np.float32).reshape(-1)
        wzero = _const(wdeq.args[2], "weight zero point").astype(np.int64).reshape(-1)
        if wzero.size != 1 or wscale.size not in (1, wq.shape[0]):
            raise RefQSRError(
                f"conv {report.index}: weights must be per-tensor (or per-output-channel scale) quantized"
            )
        w_int = wq - int(wzero[0])
        report.weight_range = (int(w_int.min()), int(w_int.max()))
        w_scale = np.broadcast_to(wscale, (wq.shape[0],)).astype(np.float32)
        a = call.attrs
        if [int(v) for v in a.dilation] != [1, 1] or int(a.groups) != 1:
            return "dilation or groups other than 1"
        if a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
            return f"layout {a.data_layout}/{a.kernel_layout}"
        o, ci, kh, kw = w_int.shape
        if kh != kw or kh % 2 == 0:
            return f"kernel {kh}x{kw} (the kernels take odd square ones)"
        n, _, oh, ow = (int(v) for v in call.ty.shape)
        strides = tuple(int(v) for v in a.strides)
        pads = tuple(int(v) for v in a.padding)
        im2col, k = None, kh
        if strides != (1, 1):
            # a strided conv is a 1x1 conv on the K*K strided views of its padded input, stacked
            # along the channels tap-major: channel (kh*K + kw)*C + c
            w_int = w_int.transpose(0, 2, 3, 1).reshape(o, kh * kw * ci, 1, 1)
            im2col, ci, k = (kh, *strides), kh * kw * ci, 1
        # stride 1: the padded input is exactly the kernel's (OH+K-1) x (OW+K-1) window buffer;
        # the channels are padded to the chosen kernel's layout later (_ConvPlan.padded)
        shape = cc.Conv2dCudaShape(n, ci, o, oh, ow, k)
        return _ConvPlan(shape, pads, report.act_bits, quant.attrs.out_dtype == "int8", w_int, w_scale, ci, o, im2col)

    # -- the three pieces ---------------------------------------------------------------------
    def _integer_conv(self, quant: relax.Call, plan: _ConvPlan, variant: str, report: ConvReport) -> relax.Expr:
        x, s, z = quant.args
        n = plan.shape.batch
        shift = cuda_weight_shift(variant, *report.weight_range)
        s4 = self._per_sample(s, n, "float32", quant.attrs.axis)
        z4 = self._per_sample(z, n, "float32", quant.attrs.axis)
        packed, wsum = self._pack_activations(x, s4, z4, plan, variant, shift)
        weights = self._weights(plan, variant, shift)
        self.weights.append((weights, report.index, plan.shape, variant))
        # the dequantize epilogue runs in the kernel (fp16 NHWC out); a weight shift's term
        # c * (window sum of u) comes in per pixel
        epilogue = None
        if self.fuse_epilogue and variant in cc.MMA_BITS:
            epilogue = "dequant_ws" if shift else "dequant"
        out = relax.TensorType(plan.shape.out_shape(variant), cc.out_dtype(variant, epilogue))
        if epilogue:
            args = [packed, weights, *self._epilogue_operands(s4, z4, plan, shift, wsum)]
            acc = self.builder_.emit(relax.call_tir(self._kernel(plan.shape, variant, epilogue), args, out))
        else:
            acc = self.builder_.emit(relax.call_tir(self._kernel(plan.shape, variant), [packed, weights], out))
        report.variant = variant
        report.shape = (
            n,
            plan.shape.in_ch,
            plan.shape.out_ch,
            plan.shape.height,
            plan.shape.width,
            plan.shape.kernel,
            1,
            *plan.pads,
        )
        self.result.weight_shifts[report.index] = shift
        x_elems = int(np.prod([int(v) for v in x.ty.shape]))
        out_elems = n * plan.out_ch * plan.shape.height * plan.shape.width
        weight_elems = plan.out_ch * plan.in_ch * plan.shape.taps

        def roofline(e: str | None) -> dict[str, Any]:  # this conv's entry with epilogue e
            roof = conv_roofline(plan.shape, plan.in_ch, plan.out_ch, variant, epilogue=e)
            return with_fp16_layer(roof, x_elems, out_elems, weight_elems)

        self.result.roofline[report.index] = roofline(epilogue)
        if plan.im2col:
            self.result.im2col[report.index] = list(plan.im2col)
        if epilogue:
            y = self._fused_output(acc, plan)
            if plan.shape.out_ch == plan.out_ch:
                self.foldable[y] = _FoldableOutput(report.index, plan.shape, variant, epilogue, list(args), roofline)
            return y
        return self._epilogue(acc, s4, z4, plan, variant, shift, wsum)

    def _epilogue_operands(self, s4, z4, plan: _ConvPlan, shift: int, wsum) -> list[relax.Expr]:
        """RS, RZ ([N]: the activation scale and the grid's zero ``u0 = z + offset`` per sample),
        CS, CW ([O]: the sum of each output channel's unshifted integer weights, its scale), WS
        (``[N][H][W]``: ``shift * wsum``; a one-element zero without a shift): the operands of the
        kernel's integer epilogue, the terms of :meth:`_epilogue`."""
        op, emit, n, o = relax.op, self.builder_.emit, plan.shape.batch, plan.shape.out_ch
        rs = emit(op.broadcast_to(emit(op.reshape(s4, [-1])), [n]))
        u0 = emit(op.astype(op.add(z4, relax.const(float(plan.offset), "float32")), "int32"))
        rz = emit(op.broadcast_to(emit(op.reshape(u0, [-1])), [n]))
        cs = relax.const(plan.w_int.reshape(o, -1).sum(axis=1).astype(np.int32))
        if shift:
            h, w = plan.shape.height, plan.shape.width
            ws = emit(op.reshape(op.multiply(wsum, relax.const(shift, "int32")), [n, h, w]))
        else:
            ws = relax.const(np.zeros((1, 1, 1), np.int32))
        return [rs, rz, cs, relax.const(plan.w_scale.astype(np.float32)), ws]

    def _fused_output(self, y16, plan: _ConvPlan) -> relax.Expr:
        """The fp16 NHWC output of a "dequant" kernel as the graph's fp32 NCHW tensor."""
        op = relax.op
        y = op.permute_dims(op.astype(y16, "float32"), [0, 3, 1, 2])
        if plan.shape.out_ch != plan.out_ch:
            y = op.strided_slice(y, axes=[1], begin=[0], end=[plan.out_ch])
        return self.builder_.emit(y)

    # -- full-precision convs: fp16 tensor cores ----------------------------------------------
    def _float_plan(self, call: relax.Call) -> tuple[FloatConvPlan, np.ndarray] | str:
        """The conv's f16mma plan and its OIHW fp32 weights, or why it has none (a string)."""
        a = call.attrs
        weight = call.args[1]
        if isinstance(weight, relax.Var):
            weight = self.lookup_binding(weight) or weight
        if not isinstance(weight, tvm.ir.GenericConst):
            return "weights are not a constant"
        if [int(v) for v in a.dilation] != [1, 1] or int(a.groups) != 1:
            return "dilation or groups other than 1"
        if [int(v) for v in a.strides] != [1, 1]:
            return "stride other than 1"
        if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or call.ty.dtype != "float32":
            return f"layout {a.data_layout}/{a.kernel_layout} or dtype {call.ty.dtype}"
        w = weight.value.numpy().astype(np.float32)
        o, c, kh, kw = w.shape
        if kh != kw or kh % 2 == 0:
            return f"kernel {kh}x{kw} (f16mma takes odd square ones)"
        n, _, oh, ow = (int(v) for v in call.ty.shape)
        plan, why = float_conv_plan(n, c, o, kh, oh, ow)
        return why if plan is None else (plan, w)

    def _float_conv(self, call: relax.Call, report: ConvReport) -> relax.Expr:
        """``conv2d(x, W)`` (fp32) -> fp16 pack of x, the f16mma kernel (fp32 sums), the shift-add
        of a folded plan and NHWC -> NCHW; the bias add after it stays as it is."""
        planned = self._float_plan(call)
        if isinstance(planned, str):
            self.result.f16_fallback[report.index] = planned
            return call  # dlight's fp32 schedule
        plan, w = planned
        op, emit = relax.op, self.builder_.emit
        s = plan.shape
        x = call.args[0]
        n, c, h, wd = (int(v) for v in x.ty.shape)
        pads = tuple(int(v) for v in call.attrs.padding)
        if (h + pads[0] + pads[2], wd + pads[1] + pads[3]) != s.padded_hw:
            self.result.f16_fallback[report.index] = f"padding {pads} does not give the padded input {s.padded_hw}"
            return call
        split = self._input_parts(x, plan, report.index) if not any(pads) else None
        if split is not None:  # a 1x1 conv of a concatenation: the kernel reads the parts in place
            kernel_shape, operands = split
        else:  # the operand written by the kernel that makes x (a pixel shuffle), or a pack
            operand = self._shuffled_operand(x, plan, pads)
            kernel_shape, operands = s, [self._f16_pack(x, plan, pads) if operand is None else operand]
        weights = relax.const(cc.pack_weights_f16(plan.weights(w)))
        self.weights.append((weights, report.index, kernel_shape, "f16mma"))
        out_ty = relax.TensorType(s.out_shape("f16mma"), cc.out_dtype("f16mma", plan.epilogue))
        kernel = self._kernel(kernel_shape, "f16mma", plan.epilogue)
        acc = emit(relax.call_tir(kernel, [*operands, weights], out_ty))
        part = emit(op.astype(acc, "float32")) if plan.epilogue else acc  # fp16 sums (a fold's: summed in fp32)
        y = self._unfold(part, plan)
        report.variant = "f16mma"
        report.shape = (n, c, plan.out_ch, plan.height, plan.width, plan.kernel, 1, *pads)
        self.result.float_plans[report.index] = plan.report()
        out_elems = n * plan.out_ch * plan.height * plan.width

        def roofline(e: str | None) -> dict[str, Any]:  # this conv's entry with epilogue e
            roof = conv_roofline(s, s.in_ch, s.out_ch, "f16mma", plan.useful_macs, e)
            return with_fp16_layer(roof, n * c * h * wd, out_elems, w.size)

        self.result.roofline[report.index] = roofline(plan.epilogue)  # = plan.roofline() + the fp16 layer
        out = emit(op.permute_dims(y, [0, 3, 1, 2]))
        if plan.folding == "none" and plan.epilogue == "f16" and s.out_ch == plan.out_ch:
            args = [*operands, weights]
            self.foldable[out] = _FoldableOutput(report.index, kernel_shape, "f16mma", plan.epilogue, args, roofline)
            self.kernel_outputs[acc] = self.foldable[out]
        return out

    def _pixel_shuffle_source(self, x: relax.Expr) -> relax.Expr | None:
        """``v`` when ``x`` is the x2 pixel shuffle of NCHW ``v`` (``reshape`` to [N, C, 2, 2, H, W],
        ``permute_dims`` [0, 1, 4, 2, 5, 3], ``reshape`` to [N, C, 2H, 2W]: DepthToSpace CRD, as
        PixelShuffle exports); None otherwise."""
        outer = self._bound(x)
        if not (isinstance(outer, relax.Call) and _op_name(outer) == "relax.reshape"):
            return None
        middle = self._bound(outer.args[0])
        if not (isinstance(middle, relax.Call) and _op_name(middle) == "relax.permute_dims"):
            return None
        if middle.attrs.axes is None or [int(a) for a in middle.attrs.axes] != [0, 1, 4, 2, 5, 3]:
            return None
        inner = self._bound(middle.args[0])
        if not (isinstance(inner, relax.Call) and _op_name(inner) == "relax.reshape"):
            return None
        v = inner.args[0]
        if not isinstance(v.ty, relax.TensorType) or v.ty.ndim != 4:
            return None
        n, c4, h, w = (int(d) for d in v.ty.shape)
        shapes = [int(d) for d in inner.ty.shape], [int(d) for d in outer.ty.shape]
        if c4 % 4 or shapes != ([n, c4 // 4, 2, 2, h, w], [n, c4 // 4, 2 * h, 2 * w]):
            return None
        return v

    def _shuffled_operand(self, x: relax.Expr, plan: FloatConvPlan, pads: tuple[int, ...]) -> relax.Expr | None:
        """The f16mma operand of ``x``, written by the kernel that makes it, when ``x`` is the x2
        pixel shuffle of an f16mma kernel's fp16 output that the graph only widens: that kernel
        again, its output channels permuted (:func:`~...kernels.conv2d_cuda.shuffle_channel_order`)
        so that it stores the shuffled map straight into this conv's padded, packed operand
        (border zeroed) -- no kernel between the two convs. None when the pattern does not hold."""
        v = self._pixel_shuffle_source(x)
        if v is None or plan.split != 1 or set(pads) != {1}:
            return None
        src = self._nhwc_half(v)
        conv = None if src is None else self.kernel_outputs.get(src)
        if conv is None or conv.variant != "f16mma":  # the integer kernels have no shuffled store
            return None
        out_shape = cc.shuffle_out_shape(conv.shape, 1)
        if plan.shape.act_shape("f16mma") != out_shape or plan.shape.in_ch * 4 != conv.shape.out_ch:
            return None
        order = cc.shuffle_channel_order(conv.shape.out_ch)
        acts = conv.shape.parts  # the operands before the weights; after them, the bias of "f16_relu"
        permuted = [relax.const(c.value.numpy()[order]) for c in conv.args[acts:]]  # weights, bias
        kernel = self._kernel(conv.shape, "f16mma", conv.epilogue, shuffle_pad=1)
        operand = relax.call_tir(kernel, [*conv.args[:acts], *permuted], relax.TensorType(out_shape, "uint32"))
        self.result.shuffle_stores.append(conv.index)
        return self.builder_.emit(operand)

    def _f16_pack(self, x: relax.Expr, plan: FloatConvPlan, pads: tuple[int, ...]) -> relax.Expr:
        """The f16mma operand of NCHW fp32 ``x``: one kernel converts, pads and packs it."""
        s = plan.shape
        n, c, h, wd = (int(v) for v in x.ty.shape)
        key = ("pack", n, c, h, wd, pads, s.in_ch, plan.split)
        if key not in self.kernels:
            name = f"f16pack_{len(self.kernels)}"
            prim = cc.f16_pack_compute(n, c, h, wd, pads, s.in_ch, plan.split).with_attr("global_symbol", name)
            self.kernels[key] = self.builder_.add_func(prim, name)
        return self.builder_.emit(
            relax.call_tir(self.kernels[key], [x], relax.TensorType(s.act_shape("f16mma"), "uint32"))
        )

    def _concat_leaves(self, x: relax.Expr) -> list[relax.Expr]:
        """The tensors whose channel concatenation ``x`` is, through nested concatenations."""
        value = self._bound(x)
        if (
            isinstance(value, relax.Call)
            and _op_name(value) == "relax.concat"
            and isinstance(value.args[0], relax.Tuple)
            and int(value.attrs.axis) == 1
        ):
            return [leaf for field_ in value.args[0].fields for leaf in self._concat_leaves(field_)]
        return [x]

    def _input_parts(self, x: relax.Expr, plan: FloatConvPlan, index: int) -> tuple[cc.Conv2dCudaShape, list] | None:
        """(kernel shape, fp16 NHWC parts) when ``x`` of 1x1 conv ``index`` is a channel
        concatenation of 2 to :data:`~...kernels.conv2d_cuda.MAX_PARTS` tensors of equal,
        whole-chunk widths: each part an fp16 NHWC kernel output that ``x`` only widens (read in
        place, no copy), or else the part rounded to fp16 NHWC (the rounding the pack does;
        FuseOps places it), recorded in ``input_parts``. The concatenation is then never packed:
        the kernel reads each K chunk from its part."""
        if plan.kernel != 1 or plan.split != 1 or plan.folding != "none":
            return None
        leaves = self._concat_leaves(x)
        widths = {int(v.ty.shape[1]) for v in leaves}
        if not 2 <= len(leaves) <= cc.MAX_PARTS or len(widths) != 1 or plan.shape.in_ch != len(leaves) * min(widths):
            return None  # parts of unequal widths, or channels padded up to a K chunk
        try:
            shape = dataclasses.replace(plan.shape, parts=len(leaves))
            shape.check("f16mma")
        except ValueError:  # a part of less than a K chunk
            return None
        parts, in_place = [], 0
        for leaf in leaves:
            src = self._nhwc_half(leaf, shape.part_shape)
            if src is not None:
                parts.append(src)
                in_place += 1
            else:  # one copy a tensor, whichever convs read it
                if leaf not in self.part_copies:
                    copy = relax.op.astype(relax.op.permute_dims(leaf, [0, 2, 3, 1]), "float16")
                    self.part_copies[leaf] = self.builder_.emit(copy)
                parts.append(self.part_copies[leaf])
        self.result.input_parts[index] = {"parts": len(parts), "in_place": in_place}
        return shape, parts

    def _nhwc_half(self, x: relax.Expr, shape: tuple[int, ...] | None = None) -> relax.Var | None:
        """The fp16 NHWC tensor (of ``shape``, when given) that NCHW fp32 ``x`` only widens and
        permutes (:func:`~.half_storage.fp16_view`), as the rewrite exposes a kernel's output; None
        when ``x`` is anything else."""
        view = fp16_view(x, self._bound) if isinstance(x, relax.Var) else None
        if view is None or view[1] != [0, 3, 1, 2]:
            return None
        return view[0] if shape is None or tuple(int(d) for d in view[0].ty.shape) == tuple(shape) else None

    def _unfold(self, part: relax.Expr, plan: FloatConvPlan) -> relax.Expr:
        """NHWC ``[N][H][W][O]`` conv output from the kernel's partial sums (see :class:`FloatConvPlan`):
        strided slices of the channel axis (stride = folded taps) summed over the folded taps;
        FuseOps makes it one elementwise kernel."""
        op, o, k, h, w = relax.op, plan.out_ch, plan.kernel, plan.height, plan.width
        if plan.folding == "none":
            if plan.shape.out_ch == o:
                return part
            return self.builder_.emit(op.strided_slice(part, axes=[3], begin=[0], end=[o]))
        t = plan.taps_folded
        total = None
        for i in range(k if plan.folding == "khkw" else 1):
            for j in range(k):
                m = i * k + j if plan.folding == "khkw" else j
                tap = op.strided_slice(
                    part, axes=[1, 2, 3], begin=[i, j, m], end=[i + h, j + w, m + t * (o - 1) + 1], strides=[1, 1, t]
                )
                total = tap if total is None else op.add(total, tap)
        return self.builder_.emit(total)

    def _fold_bias_relu(self, old: relax.Call, new: relax.Call) -> relax.Expr | None:
        """``relu(add(y, bias))`` of a rewritten conv's output ``y`` read by nothing else -> the
        same kernel with the bias-and-ReLU epilogue (:data:`~...kernels.conv2d_cuda.RELU_EPILOGUES`),
        widened to fp32 NCHW: one rounding to fp16 after the fp32 bias add and ReLU, and no kernel
        between the conv and its readers. An integer conv's ``relu(add(add(y, bias), x))`` with
        ``x`` a widening of an fp16 NHWC kernel output of y's shape (a residual block whose input
        another kernel wrote) takes the "_res_relu" form, ``x`` read in the epilogue. None when
        neither pattern matches."""
        old_add = old.args[0]
        old_sum = self.old_bindings.get(old_add) if isinstance(old_add, relax.Var) else None
        if not (isinstance(old_sum, relax.Call) and _op_name(old_sum) == "relax.add"):
            return None
        if self.old_readers.get(old_add, 0) != 1:
            return None
        new_sum = self._bound(new.args[0])
        if not (isinstance(new_sum, relax.Call) and _op_name(new_sum) == "relax.add"):
            return None
        for k in (0, 1):
            found = self._conv_plus_bias(old_sum, new_sum, k)
            if found is not None:  # relu(conv + bias)
                conv, bias = found
                return self._refold(conv, cc.with_relu(conv.epilogue), [relax.const(bias)])
            inner_old, inner_new = old_sum.args[k], self._bound(new_sum.args[k])
            inner = self.old_bindings.get(inner_old) if isinstance(inner_old, relax.Var) else None
            if not (isinstance(inner, relax.Call) and _op_name(inner) == "relax.add"):
                continue
            if self.old_readers.get(inner_old, 0) != 1 or not isinstance(inner_new, relax.Call):
                continue
            for j in (0, 1):  # relu((conv + bias) + x)
                found = self._conv_plus_bias(inner, inner_new, j)
                if found is None or found[0].variant not in ("s4mma", "s8mma"):
                    continue
                conv, bias = found
                residual = self._nhwc_half(new_sum.args[1 - k], conv.shape.out_shape(conv.variant))
                if residual is None:
                    continue
                epilogue = cc.with_relu(conv.epilogue, residual=True)
                return self._refold(conv, epilogue, [relax.const(bias), residual])
        return None

    def _unalias(self, expr: relax.Expr) -> relax.Expr:
        """A var of the new function past the aliases (``y = lv``) the mutator binds replaced convs to."""
        while isinstance(expr, relax.Var) and isinstance(self.lookup_binding(expr), relax.Var):
            expr = self.lookup_binding(expr)
        return expr

    def _bound(self, expr: relax.Expr) -> relax.Expr | None:
        """The value bound to a var of the new function, past its aliases."""
        expr = self._unalias(expr)
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

    def _conv_plus_bias(self, old_sum: relax.Call, new_sum: relax.Call, k: int):
        """(the foldable conv, its bias) when operand ``k`` of ``add`` is a rewritten conv's
        output read only by it and the other operand a per-channel constant; else None."""
        conv_old, conv_new = old_sum.args[k], self._unalias(new_sum.args[k])
        found = self.foldable.get(conv_new) if isinstance(conv_new, relax.Var) else None
        if found is None or self.old_readers.get(conv_old, 0) != 1:
            return None
        bias = _bias_vector(old_sum.args[1 - k], self.old_bindings, found.shape.out_ch)
        return None if bias is None else (found, bias)

    def _refold(self, conv: _FoldableOutput, epilogue: str, extra: list) -> relax.Expr:
        """The conv's kernel again with ``epilogue`` and its ``extra`` operands, widened to NCHW fp32."""
        out_ty = relax.TensorType(conv.shape.out_shape(conv.variant), cc.out_dtype(conv.variant, epilogue))
        kernel = self._kernel(conv.shape, conv.variant, epilogue)
        acc = self.builder_.emit(relax.call_tir(kernel, [*conv.args, *extra], out_ty))
        self.kernel_outputs[acc] = dataclasses.replace(conv, epilogue=epilogue, args=[*conv.args, *extra])
        self.result.roofline[conv.index] = conv.roofline(epilogue)
        self.result.relu_folded.append(conv.index)
        return relax.op.permute_dims(relax.op.astype(acc, "float32"), [0, 3, 1, 2])

    def sums_kernel(self, gv: tvm.ir.GlobalVar) -> SumsKernel | None:
        """The tile-sums form of conv kernel ``gv`` (:func:`.cuda_means.means_from_tile_sums`), or
        None: a pack, a pixel-shuffle store, int32 sums, or block tiles that straddle samples."""
        found = [key for key, k in self.kernels.items() if k.same_as(gv) and isinstance(key[0], cc.Conv2dCudaShape)]
        if not found or cc.tile_sums_why_not(*found[0]):
            return None
        shape, variant, epilogue, _ = found[0]
        name, prim = self._named(len(self.kernels) + self.sums_made, shape, variant, epilogue, None, tile_sums=True)
        self.sums_made += 1
        return SumsKernel(name, prim, cc.tile_sums_shape(shape, variant))

    def owner(self, args: Sequence[relax.Expr]) -> tuple[int, cc.Conv2dCudaShape, str]:
        """(conv index, kernel shape, variant) of a kernel call with operands ``args``, by its weights."""
        for weights, index, shape, variant in self.weights:
            if any(weights.same_as(a) for a in args):
                return index, shape, variant
        raise RefQSRError("a conv kernel call whose weights no conv of the rewrite owns")

    def _kernel(
        self, shape: cc.Conv2dCudaShape, variant: str, epilogue: str | None = None, shuffle_pad: int | None = None
    ) -> tvm.ir.GlobalVar:
        key = (shape, variant, epilogue, shuffle_pad)  # convs that differ only in their weights share code
        if key not in self.kernels:
            name, prim = self._named(len(self.kernels), shape, variant, epilogue, shuffle_pad)
            self.kernels[key] = self.builder_.add_func(prim, name)
        return self.kernels[key]

    def _named(
        self,
        number: int,
        shape: cc.Conv2dCudaShape,
        variant: str,
        epilogue: str | None,
        shuffle_pad: int | None,
        tile_sums: bool = False,
    ) -> tuple[str, tvm.tirx.PrimFunc]:
        """(name, PrimFunc) of conv kernel ``number``, named as :data:`_CONV_NAME` expects, opaque to FuseOps."""
        prefix = "fconv" if variant in cc.FLOAT_VARIANTS else "qconv"
        name = f"{prefix}_{variant}_{number}"
        prim = self.make_kernel(shape, variant, epilogue, shuffle_pad, tile_sums=tile_sums)
        return name, prim.with_attr("global_symbol", name).with_attr("op_pattern", _OPAQUE)

    def _pack_activations(self, x, s4, z4, plan: _ConvPlan, variant: str, shift: int):
        """(packed activations, window sums of u or None): the kernel's operand, and for a
        shifted weight grid the ``[N][1][H][W]`` int32 sums of u under each window."""
        op, emit = relax.op, self.builder_.emit
        top, left, bottom, right = plan.pads
        if any(plan.pads):  # 0.0 quantizes to the zero point: the border holds u0, as the kernels expect
            x = emit(op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], "constant", 0.0))
        if plan.im2col:
            x = emit(self._im2col(x, plan))
        qlo, qhi = plan.q_range
        q = emit(op.add(op.round(op.divide(x, s4)), z4))
        q = emit(op.minimum(op.maximum(q, relax.const(float(qlo), "float32")), relax.const(float(qhi), "float32")))
        u = op.add(q, relax.const(float(plan.offset), "float32"))
        wsum = None
        if shift:
            u = emit(u)
            wsum = self._window_sum(u, plan)
        s = plan.shape
        if s.in_ch != plan.in_ch:  # padded channels hold u = 0: no term of the sums sees them
            u = emit(op.nn.pad(u, [0, 0, 0, s.in_ch - plan.in_ch, 0, 0, 0, 0], "constant", 0.0))
        hp, wp = s.padded_hw
        if variant == "dp4a":  # [N][C/4][Hp][Wp][4] u8
            u = op.reshape(emit(op.astype(u, "uint8")), [s.batch, s.in_ch // 4, 4, hp, wp])
            return emit(op.permute_dims(u, [0, 1, 3, 4, 2])), wsum
        # s4mma / s8mma: [N][Hp][Wp][C/e] uint32, channel c in element c % e (e = 8 nibbles or
        # 4 bytes). Slices, shifts and adds (disjoint bits: add == or) are injective, so FuseOps
        # makes the whole pack one kernel (a sum over the element axis, or take, would start a second one)
        bits = cc.MMA_BITS[variant]
        e = 32 // bits
        u = op.reshape(op.permute_dims(op.astype(u, "uint32"), [0, 2, 3, 1]), [s.batch, hp, wp, s.in_ch // e, e])
        u = emit(u)
        word = None
        for i in range(e):
            element = op.strided_slice(u, axes=[4], begin=[i], end=[i + 1])
            element = op.left_shift(element, relax.const(bits * i, "uint32")) if i else element
            word = element if word is None else op.add(word, element)
        return emit(op.reshape(word, s.act_shape(variant))), wsum

    @staticmethod
    def _im2col(x, plan: _ConvPlan) -> relax.Expr:
        """``[N][K*K*C][OH][OW]``: the K*K strided views of the padded input, tap-major."""
        k, sh, sw = plan.im2col
        oh, ow = plan.shape.height, plan.shape.width
        views = [
            relax.op.strided_slice(
                x, axes=[2, 3], begin=[i, j], end=[i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1], strides=[sh, sw]
            )
            for i in range(k)
            for j in range(k)
        ]
        return relax.op.concat(views, axis=1)

    def _window_sum(self, u, plan: _ConvPlan) -> relax.Expr:
        """``[N][1][H][W]`` int32: the sum of u over the real channels and the K x K taps of each
        output's window (exact: at most 255 * C * K * K)."""
        op, emit = relax.op, self.builder_.emit
        row = emit(op.sum(op.astype(u, "int32"), axis=[1], keepdims=True))  # [N][1][Hp][Wp]
        k, h, w = plan.shape.kernel, plan.shape.height, plan.shape.width
        if k == 1:
            return row
        total = None
        for i in range(k):
            for j in range(k):
                tap = op.strided_slice(row, axes=[2, 3], begin=[i, j], end=[i + h, j + w])
                total = tap if total is None else op.add(total, tap)
        return emit(total)

    def _weights(self, plan: _ConvPlan, variant: str, shift: int) -> relax.Expr:
        w = plan.w_int - shift
        w[plan.out_ch :] = 0  # padded output channels: sliced off
        w[:, plan.in_ch :] = 0  # padded input channels: u = 0 there
        return relax.const(cc.pack_weights(variant, w))

    def _epilogue(self, acc, s4, z4, plan: _ConvPlan, variant: str, shift: int, wsum) -> relax.Expr:
        """``y = float(acc + shift * wsum - u0[n] * sum_w[o]) * (s[n] * ws[o])``, sum_w over the
        unshifted weights: the CPU engine's epilogue."""
        op, emit = relax.op, self.builder_.emit
        o = plan.shape.out_ch
        if variant in cc.MMA_BITS:  # NHWC -> NCHW
            acc = op.permute_dims(acc, [0, 3, 1, 2])
        sum_w = plan.w_int.reshape(o, -1).sum(axis=1).astype(np.int32).reshape(1, o, 1, 1)
        u0 = op.astype(op.add(z4, relax.const(float(plan.offset), "float32")), "int32")
        if shift:
            acc = op.add(acc, op.multiply(wsum, relax.const(shift, "int32")))
        total = op.subtract(acc, op.multiply(u0, relax.const(sum_w)))
        scale = op.multiply(s4, relax.const(plan.w_scale.reshape(1, o, 1, 1)))
        y = op.multiply(op.astype(total, "float32"), scale)
        if o != plan.out_ch:
            y = op.strided_slice(y, axes=[1], begin=[0], end=[plan.out_ch])
        return emit(y)

    def _per_sample(self, value: relax.Expr, n: int, dtype: str, axis: int) -> relax.Expr:
        """A scalar or per-sample ([N], quantize axis 0) scale / zero point, broadcastable over NCHW."""
        ty = value.ty
        if not isinstance(ty, relax.TensorType) or ty.ndim not in (0, 1):
            raise RefQSRError("quantized conv: activation scales must be per tensor or per sample")
        size = int(ty.shape[0]) if ty.ndim == 1 else 1
        if size != 1 and (size != n or int(axis) != 0):
            raise RefQSRError("quantized conv: activation scales must be per tensor or per sample")
        if ty.dtype != dtype:
            value = self.builder_.emit(relax.op.astype(value, dtype))
        return self.builder_.emit(relax.op.reshape(value, [size, 1, 1, 1]))


@mutator
class _ConcatFlattener(PyExprMutator):
    """``concat((concat((a, b)), c))`` -> ``concat((a, b, c))`` (same axis). CARN's cascade
    concatenates each block's output onto the previous concatenation; flattened, an inner
    concatenation read only by its pack fuses into that pack and is never written as an fp32
    tensor (what the outer one needs it reads from the parts)."""

    def visit_call_(self, call: relax.Call):  # noqa: D102 - visitor hook
        call = super().visit_call_(call)
        if _op_name(call) != "relax.concat" or not isinstance(call.args[0], relax.Tuple):
            return call
        axis, parts, changed = int(call.attrs.axis), [], False
        for field_ in call.args[0].fields:
            inner = self.lookup_binding(field_) if isinstance(field_, relax.Var) else None
            if (
                isinstance(inner, relax.Call)
                and _op_name(inner) == "relax.concat"
                and isinstance(inner.args[0], relax.Tuple)
                and int(inner.attrs.axis) == axis
            ):
                parts.extend(inner.args[0].fields)
                changed = True
            else:
                parts.append(field_)
        return relax.op.concat(parts, axis) if changed else call


def flatten_concats(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    """:class:`_ConcatFlattener` over ``mod[func_name]``, the concatenations left unread removed."""
    flattener = _ConcatFlattener(mod)
    new_func = flattener.visit_expr(mod[func_name])
    out = flattener.builder_.get()
    out[func_name] = new_func
    return relax.transform.DeadCodeElimination([func_name])(out)


@dataclass
class CudaConvResult(QDQConvResult):
    """The per-conv report plus why quantized convs stayed float (conv index -> reason)."""

    float_reasons: dict[int, str] = field(default_factory=dict)
    weight_shifts: dict[int, int] = field(default_factory=dict)  # conv index -> c of w - c
    no_mma_reasons: dict[int, str] = field(default_factory=dict)  # conv index -> why dp4a, not a tensor core
    im2col: dict[int, list[int]] = field(default_factory=dict)  # conv index -> [K, stride h, stride w]
    roofline: dict[int, dict[str, Any]] = field(default_factory=dict)  # conv index -> conv_roofline(...)
    float_plans: dict[int, dict[str, Any]] = field(default_factory=dict)  # conv index -> FloatConvPlan.report()
    f16_fallback: dict[int, str] = field(default_factory=dict)  # full-precision conv index -> why not f16mma
    half_tensors: int = 0  # activations the kernels pass each other in fp16 (:func:`.half_storage.store_half`)
    relu_folded: list[int] = field(default_factory=list)  # conv indices whose bias add and ReLU run in the kernel
    # 1x1 conv index -> {"parts": tensors whose concatenation it reads in place, "in_place": how
    # many of them are kernel outputs read without a copy}
    input_parts: dict[int, dict[str, int]] = field(default_factory=dict)
    # conv indices whose kernel stores its output pixel-shuffled into the next conv's operand
    shuffle_stores: list[int] = field(default_factory=list)
    # conv indices whose kernel also writes the tile sums that DDTB's means of its output read
    tile_sums: list[int] = field(default_factory=list)
    tile_sum_means: int = 0  # the spatial means taken from tile sums (no mean kernel)


def rewrite_qdq_convs_cuda(
    mod: tvm.IRModule,
    conv_table: Sequence[dict],
    twin: bool = False,
    func_name: str = "main",
    arch: str = "sm_80",
    f16: bool = True,
    fuse_epilogue: bool = True,
    half_storage: bool = True,
) -> tuple[tvm.IRModule, CudaConvResult]:
    """Replace every QDQ conv of ``mod[func_name]`` that a CUDA kernel can compute exactly by
    quantize/pack ops, the kernel (its LLVM twin with ``twin``) and the dequantize epilogue, and
    (``f16``) every full-precision conv by an f16mma kernel; ``arch`` decides which tensor cores
    the kernels may use. With ``fuse_epilogue`` the s4mma / s8mma kernels dequantize in their
    store and write fp16 (``"dequant"``, ``"dequant_ws"`` with a weight shift); without, int32
    sums and the epilogue as Relax ops (exact fp32). The result has no var-to-var aliases (FuseOps
    does not fuse across one) and no concatenation of a concatenation (:func:`flatten_concats`);
    with ``half_storage`` the float activations passed between kernels are stored in fp16
    (:func:`.half_storage.store_half`), and a conv's bias add and ReLU run in its fused epilogue
    where nothing else reads its output (one fp16 rounding after them)."""
    result = CudaConvResult()
    rewriter = _CudaRewriter(
        mod, conv_table, twin, result, arch, f16, fuse_epilogue, fold_relu=half_storage, func_name=func_name
    )
    new_func = rewriter.visit_expr(mod[func_name])
    out = rewriter.builder_.get()
    out[func_name] = new_func
    if len(result.convs) != len(conv_table):
        raise RefQSRError(f"the graph has {len(result.convs)} convs, its refqsr.convs metadata {len(conv_table)}")
    # the mutator binds each replaced conv's var to the new expression's var (``y = lv``): such
    # aliases stop FuseOps at the conv's output, so the widening to fp32 NCHW and the bias add,
    # activation and next pack would run as two kernels with a full fp32 tensor between them
    out = relax.transform.CanonicalizeBindings()(out)
    out = flatten_concats(out, func_name)  # its dead-code pass drops the rewrite's leftovers too
    if half_storage and fuse_epilogue:
        out, sums = means_from_tile_sums(out, rewriter.sums_kernel, func_name)
        result.tile_sum_means = sums.means
        for args in sums.calls:
            index, shape, variant = rewriter.owner(args)
            result.tile_sums.append(index)
            result.roofline[index] = with_tile_sums(result.roofline[index], cc.tile_sums_shape(shape, variant))
    if half_storage:
        out, result.half_tensors = store_half(out, func_name)
    return out, result


# ----------------------------------------------------------------------------------------------
# build


#: the PrimFuncs of the rewritten convs, as :meth:`_CudaRewriter._kernel` names them (everything
#: else a graph runs is "other")
_CONV_NAME = r"(?:qconv_(?:dp4a|s4mma|s8mma)|fconv_f16mma)_\d+"
_CONV_FUNC = re.compile(f"^{_CONV_NAME}$")


def _tensor_bytes(ty: Any) -> int:
    return int(np.prod([int(v) for v in ty.shape])) * tvm.DataType(ty.dtype).bits // 8


def kernel_traffic(mod: tvm.IRModule, batch: int, top: int = 5) -> dict[str, Any]:
    """What the compiled graph's kernels move, from its lowered ``main`` (destination-passing
    calls of PrimFuncs, the output the last argument): per kernel call its tensor arguments'
    bytes, each read or written once. Totals for the conv kernels and for all other kernels (the
    packs, epilogues, shift-adds, DDTB's bound computations, concatenations, pixel shuffles,
    RefER warps), per patch, and per GPU the other kernels' time at the datasheet bandwidth
    (``<gpu>_other_us``): a lower bound on what the kernels between the convs cost, counted on the
    graph that runs rather than estimated per conv; ``top``: the other kernels moving the most."""
    calls: list[tuple[str, int]] = []
    main = mod["main"]
    for block in main.body.blocks:
        for binding in block.bindings:
            v = binding.value
            if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.GlobalVar)):
                continue
            if not isinstance(mod[v.op], tvm.tirx.PrimFunc):
                continue
            moved = sum(_tensor_bytes(a.ty) for a in v.args if isinstance(getattr(a, "ty", None), relax.TensorType))
            calls.append((v.op.name_hint, moved))
    conv = [c for c in calls if _CONV_FUNC.match(c[0])]
    other = [c for c in calls if not _CONV_FUNC.match(c[0])]
    other_bytes = sum(b for _, b in other)
    out: dict[str, Any] = {
        "conv_kernels": len(conv),
        "other_kernels": len(other),
        "conv_bytes_per_patch": sum(b for _, b in conv) // batch,
        "other_bytes_per_patch": other_bytes // batch,
        "other_top": [
            {"kernel": k, "bytes_per_patch": b // batch} for k, b in sorted(other, key=lambda c: -c[1])[:top]
        ],
    }
    for gpu, peak in DATASHEET_PEAKS.items():
        out[f"{gpu}_other_us"] = round(other_bytes / batch / peak["bytes"] * 1e6, 3)
    return out


def cuda_pipeline(target: tvm.target.Target, traffic: list | None = None, batch: int = 1) -> tvm.transform.Pass:
    """The CUDA default pipeline's pieces, minus FoldConstant (see the module docstring); with
    ``traffic`` (a list) :func:`kernel_traffic` of the lowered graph is appended to it."""
    from tvm.relax.backend.cuda import pipeline as cuda

    @tvm.transform.module_pass(opt_level=0, name="RefQSRCudaPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            # LegalizeOps, AnnotateTIROpPattern, FuseOps, FuseTIR, dlight's default GPU rules
            legalize = [p for p in cuda.legalize_passes(target) if p.info.name != "FoldConstant"]
            lowered = tvm.transform.Sequential(
                cuda.library_dispatch_passes(target) + legalize + cuda.dataflow_lower_passes(target)
            )(mod)
            if traffic is not None:
                traffic.append(kernel_traffic(lowered, batch))
            return tvm.transform.Sequential(cuda.finalize_passes(target))(lowered)

    return _pipeline


def _nvcc(args: list[str]) -> None:
    proc = subprocess.run(["nvcc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RefQSRError(f"nvcc {' '.join(args)} failed:\n{proc.stderr[-4000:]}")


def _compile_cuda_source(code: str, arch: str) -> tuple[str, bytes]:
    """CUDA C -> (PTX, fatbin), with nvcc's front end run once.

    TVM's own hook compiles straight to a fatbin, whose embedded PTX is compressed, so looking at
    the device code took a second front-end run (as long as the build). Here the source goes to
    PTX with TVM's flags minus ``--use_fast_math`` (IEEE division and sqrt, as in ONNX Runtime
    and PyTorch), and the PTX to a fatbin (ptxas + fatbinary: SASS for ``arch`` plus the PTX).
    """
    from tvm.support import nvcc

    with tempfile.TemporaryDirectory(prefix="refqsr-nvcc-") as tmp:
        src, ptx_path, fatbin = (os.path.join(tmp, f) for f in ("k.cu", "k.ptx", "k.fatbin"))
        with open(src, "w") as f:
            f.write(code)
        _nvcc(
            [
                "--ptx",
                "-O3",
                "-arch",
                arch,
                "--expt-relaxed-constexpr",
                "--expt-extended-lambda",
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT162_OPERATORS__",
                "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
                "-diag-suppress=177",
                "-o",
                ptx_path,
                src,
            ]
        )
        ptxas = getattr(nvcc, "_ptxas_option_flags", lambda: [])()  # TVM's register-usage settings
        _nvcc(
            [
                "--fatbin",
                "-arch",
                arch,
                *([f"--ptxas-options={','.join(ptxas)}"] if ptxas else []),
                "-o",
                fatbin,
                ptx_path,
            ]
        )
        with open(ptx_path) as f_ptx, open(fatbin, "rb") as f_bin:
            return f_ptx.read(), f_bin.read()


@contextlib.contextmanager
def _cuda_compile_hook(arch: str, sink: list):
    """While building, TVM's ``tvm_callback_cuda_compile`` is :func:`_compile_cuda_source`;
    every (source, PTX, fatbin) it makes is appended to ``sink``."""
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    original = tvm_ffi.get_global_func(name)

    def hook(code, *_rest):
        ptx, binary = _compile_cuda_source(str(code), arch)
        sink.append((str(code), ptx, binary))
        return bytearray(binary)

    tvm_ffi.register_global_func(name, hook, override=True)
    try:
        yield
    finally:
        tvm_ffi.register_global_func(name, original, override=True)


_DP4A_RE = re.compile(r"\bdp4a\.[us]32\.[us]32\b")
_MMA_S4_RE = re.compile(r"\bmma\.sync\.aligned\.m16n8k(?:32|64)\.row\.col\.s32\.[us]4\.s4\.s32\b")
_MMA_S8_RE = re.compile(r"\bmma\.sync\.aligned\.m16n8k(?:16|32)\.row\.col\.s32\.[us]8\.s8\.s32\b")
_MMA_F16_RE = re.compile(r"\bmma\.sync\.aligned\.m16n8k(?:8|16)\.row\.col\.f32\.f16\.f16\.f32\b")


def count_integer_instructions(ptx: str) -> dict[str, int]:
    """``{"dp4a": n, "mma_s4": n, "mma_s8": n, "mma_f16": n}``: integer dot-product / int4 / int8
    tensor-core instructions in ``ptx``, and the fp16 ones (f32 accumulators) of the float convs."""
    return {
        "dp4a": len(_DP4A_RE.findall(ptx)),
        "mma_s4": len(_MMA_S4_RE.findall(ptx)),
        "mma_s8": len(_MMA_S8_RE.findall(ptx)),
        "mma_f16": len(_MMA_F16_RE.findall(ptx)),
    }


@dataclass
class CudaGraphBuild:
    """A graph compiled for CUDA and what went into it."""

    name: str
    executable: Any  # tvm.relax.VMExecutable
    inputs: dict[str, list[int]]
    outputs: list[str]
    result: CudaConvResult
    device_code: dict[str, int]
    binary: bytes  # the fatbin nvcc made (the proof that device code exists)
    seconds: dict[str, float] = field(default_factory=dict)
    sass: dict[str, dict[str, int]] | None = None  # kernel -> SASS opcode counts; None: no cuobjdump
    refer_warps: int = 0  # RefER warps (or shared-matching warps) run by the GPU-scheduled kernels
    traffic: dict[str, Any] | None = None  # kernel_traffic of the lowered graph

    def report(self) -> dict[str, Any]:
        convs = self.result.convs
        return {
            "inputs": self.inputs,
            "outputs": self.outputs,
            "integer_convs": sum(c.variant is not None and c.variant not in cc.FLOAT_VARIANTS for c in convs),
            "float_convs": sum(c.variant is None or c.variant in cc.FLOAT_VARIANTS for c in convs),
            "f16mma_convs": sum(c.variant == "f16mma" for c in convs),
            "variants": [c.variant for c in convs],
            "act_bits": [c.act_bits for c in convs],
            "weight_ranges": [list(c.weight_range) if c.weight_range else None for c in convs],
            "float_quantized": {str(i): why for i, why in self.result.float_reasons.items()},
            "weight_shifts": [self.result.weight_shifts.get(c.index) for c in convs],
            "im2col": {str(i): v for i, v in self.result.im2col.items()},
            "dp4a_why": {str(i): why for i, why in self.result.no_mma_reasons.items()},
            "roofline": {str(i): r for i, r in self.result.roofline.items()},
            "kernel_traffic": self.traffic,
            "f16mma": {str(i): p for i, p in self.result.float_plans.items()},
            "f16_fallback": {str(i): why for i, why in self.result.f16_fallback.items()},
            "refer_warps": self.refer_warps,
            "half_tensors": self.result.half_tensors,
            "relu_epilogues": sorted(self.result.relu_folded),
            "input_parts": {str(i): v for i, v in sorted(self.result.input_parts.items())},
            "shuffle_stores": sorted(self.result.shuffle_stores),
            "tile_sums": sorted(self.result.tile_sums),
            "tile_sum_means": self.result.tile_sum_means,
            "device_code": self.device_code,
            "sass": sass_summary(self.sass),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def stores_half(graph_name: str) -> bool:
    """Whether the graph's kernels pass activations in fp16 (:func:`.half_storage.store_half`):
    the SR graphs, whose fp16 storage is gated on PSNR-Y (``benchmarks.f16_gate --compare
    storage``); not the ClustBlock, whose logits pick each patch's reference by arg-max and stay
    as the CPU engine computes them (an fp16 input moves values across the 8-bit quantizer's
    rounding ties)."""
    return graph_name != "clustblock"


def build_graph_cuda(model: onnx.ModelProto, name: str, batch: int, arch: str = "sm_80") -> CudaGraphBuild:
    """Compile ``model`` for ``batch`` patches per call for CUDA ``arch`` (nvcc; no GPU needed)."""
    cuda_toolchain.ensure_cuda_build_env()
    target = cuda_toolchain.cuda_target(arch)
    times = {}
    t0 = time.perf_counter()
    meta = graph_metadata(model)
    mod, shapes, warps = import_graph_cuda(model, batch, target)
    t1 = time.perf_counter()
    mod, result = rewrite_qdq_convs_cuda(mod, meta["convs"], arch=arch, half_storage=stores_half(name))
    t2 = time.perf_counter()
    compiled: list = []
    traffic: list = []
    with target, _cuda_compile_hook(arch, compiled):
        exe = tvm.compile(mod, target=target, relax_pipeline=cuda_pipeline(target, traffic, batch))
    t3 = time.perf_counter()
    # TVM silently keeps a source-only module when its CUDA runtime is missing: then the hook
    # never ran and there is no device code
    if not compiled or not all(binary for _, _, binary in compiled):
        raise RefQSRError(f"{name}: TVM kept CUDA source only; no device binary was built")
    source = "\n".join(src for src, _, _ in compiled)
    ptx = "\n".join(p for _, p, _ in compiled)
    binary = b"".join(b for _, _, b in compiled)
    # registered with the toolchain, so cuda_toolchain.device_code(exe) gives this PTX
    cuda_toolchain._BUILD_INFO[exe] = cuda_toolchain.CudaBuildInfo(arch, source, binary, t3 - t2, ptx)
    times.update({"import": t1 - t0, "integer_convs": t2 - t1, "codegen": t3 - t2})
    outputs = [o.name for o in model.graph.output]
    sass = None
    if cuda_toolchain.sass_tools():
        sass = {}
        for _, _, fatbin in compiled:
            counts = cuda_toolchain.sass_counts(fatbin)
            if counts is None:
                raise RefQSRError(f"{name}: cuobjdump could not disassemble the device binary")
            sass.update(counts)
    built = CudaGraphBuild(name, exe, shapes, outputs, result, count_integer_instructions(ptx), binary, times, sass)
    built.refer_warps = warps
    built.traffic = traffic[0] if traffic else None
    return built


#: the SASS kernels of the integer convs: TVM names a PrimFunc's kernel ``<symbol>_kernel``
_CONV_KERNEL = re.compile(f"^{_CONV_NAME}_kernel$")


def sass_summary(sass: dict[str, dict[str, int]] | None) -> dict[str, Any] | None:
    """What the manifest records of a graph's SASS: the opcode counts and resource usage
    (registers, shared / local / stack bytes) of every integer conv kernel, the opcode totals over
    those and over all kernels of the graph, and the kernels that use local memory (``LDL``/``STL``
    or local bytes: register spills). None when no SASS was read."""
    if sass is None:
        return None
    conv = {k: v for k, v in sorted(sass.items()) if _CONV_KERNEL.match(k)}

    def total(kernels):
        return {op: sum(c[op] for c in kernels.values()) for op in (*cuda_toolchain.SASS_OPCODES, "total")}

    return {
        "tool": "cuobjdump -sass",
        "kernels": len(sass),
        "conv_kernels": conv,
        "conv_totals": total(conv),
        "all_totals": total(sass),
        "local_memory": sorted(k for k, c in sass.items() if c["LDL"] or c["STL"] or c.get("local_bytes")),
    }


def build_graph_twin(
    model: onnx.ModelProto,
    batch: int,
    target: Any = None,
    arch: str = "sm_80",
    f16: bool = True,
    fuse_epilogue: bool = True,
    half_storage: bool = True,
):
    """The CUDA rewrite of ``model`` with the kernels' LLVM twins in place of the CUDA kernels,
    built for the CPU with the LLVM path's pipeline (:func:`.build.cpu_pipeline`): the CUDA
    graph's math, runnable without a GPU (``f16=False``: the full-precision convs left fp32;
    ``fuse_epilogue=False``: int32 sums and the fp32 Relax epilogue; ``half_storage=False``: the
    activations between kernels kept fp32).
    Returns ``(executable, CudaConvResult)``."""
    from .build import cpu_pipeline

    tgt = tvm.target.Target(target or {"kind": "llvm", "mcpu": "core-avx2", "num-cores": os.cpu_count() or 1})
    mod, _, _ = import_graph_cuda(model, batch)
    mod, result = rewrite_qdq_convs_cuda(
        mod,
        graph_metadata(model)["convs"],
        twin=True,
        arch=arch,
        f16=f16,
        fuse_epilogue=fuse_epilogue,
        half_storage=half_storage,
    )
    return tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt)), result


def build_cluster_library_cuda(classes: int, buckets: Sequence[int], arch: str, path: str | Path) -> dict[str, int]:
    """The clustering kernel's GPU schedule for every patch-count bucket (``cluster_<n>``), built
    for CUDA ``arch`` with the graphs' nvcc settings and exported to ``path``; returns its device
    kernel count (``{"kernels": n}``)."""
    from ...kernels.refer_cuda import cluster_primfunc_cuda

    cuda_toolchain.ensure_cuda_build_env()
    target = cuda_toolchain.cuda_target(arch)
    funcs = {
        f"cluster_{n}": cluster_primfunc_cuda(n, classes).with_attr("global_symbol", f"cluster_{n}") for n in buckets
    }
    compiled: list = []
    with target, _cuda_compile_hook(arch, compiled):
        exe = tvm.compile(tvm.IRModule(funcs), target=target)
    if not compiled or not all(binary for _, _, binary in compiled):
        raise RefQSRError("clustering kernel: TVM kept CUDA source only; no device binary was built")
    exe.export_library(str(path))
    binary = b"".join(b for _, _, b in compiled)
    if not library_has_binary(path, binary):
        raise RefQSRError(f"{Path(path).name} does not embed the CUDA device binary")
    ptx = "\n".join(p for _, p, _ in compiled)
    return {"kernels": len(re.findall(r"^(?:\.visible\s+)?\.entry\s", ptx, flags=re.M))}


def library_has_binary(lib: str | Path, binary: bytes) -> bool:
    """Whether the exported library embeds the device binary nvcc produced."""
    data = Path(lib).read_bytes()
    return len(binary) > 0 and binary in data
