"""The Relax pass that makes every quantized conv an integer conv.

TVM 0.27 imports an exported QDQ conv as float math on fake-quantized values::

    q  = R.quantize(x, s, z, axis=0)          # x already clipped to the b-bit range by the graph
    xd = R.dequantize(q, s, z, axis=0)
    wd = R.dequantize(Wq, ws, wz)              # integer constant
    y  = R.nn.conv2d(xd, wd, strides, padding)

This pass replaces ``y`` by ``R.call_tir(qconv, [x, S, Z, W', SUMW, WS])`` with the fused
integer kernel of :mod:`refqsr_engine.kernels.qconv_fused` (quantize + pack, tensorized integer
conv, dequantize epilogue); the quantize/dequantize bindings become dead and are removed.

The activation bit width b of each conv is not in the QDQ ops (an 8-bit container holds every
b <= 8); the exporter writes it into the graph metadata ``refqsr.convs``, one entry per Conv node
in node order, and the importer keeps that order, so the convs are matched to the table by
position -- and checked: a table entry with b < 32 must meet a QDQ conv and vice versa.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ...errors import RefQSRError
from ...kernels.amx import target_has_amx
from ...kernels.conv2d_int8 import Conv2dShape, target_has_avx512_vnni
from ...kernels.qconv_amx import amx_fits
from ...kernels.qconv_fused import QConvSpec, choose_variant, chunk_groups_for, pack_qconv_weights, qconv_primfunc

FULL_PRECISION = 32


@dataclass
class ConvReport:
    """What the pass did with one conv (for the compile report and the tests)."""

    index: int
    module: str
    act_bits: int
    weight_range: tuple[int, int] | None = None
    variant: str | None = None  # None: stayed a float conv (full-precision layer)
    shape: tuple[int, ...] = ()


@dataclass
class QDQConvResult:
    convs: list[ConvReport] = field(default_factory=list)

    @property
    def integer_convs(self) -> list[ConvReport]:
        return [c for c in self.convs if c.variant is not None]


def _op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _const(expr, what: str) -> np.ndarray:
    if not isinstance(expr, tvm.ir.GenericConst):
        raise RefQSRError(f"quantized conv: the {what} is not a constant; cannot build an integer conv")
    return expr.value.numpy()


def match_qdq_conv(call: relax.Call, lookup) -> tuple[relax.Call, relax.Call] | None:
    """(quantize, weight dequantize) of ``conv2d(dequantize(quantize(x)), dequantize(Wq))``, or None;
    ``lookup`` is the mutator's ``lookup_binding``."""

    def bound(expr):
        return lookup(expr) if isinstance(expr, relax.Var) else None

    data, weight = call.args
    deq, wdeq = bound(data), bound(weight)
    if _op_name(deq) != "relax.dequantize" or _op_name(wdeq) != "relax.dequantize":
        return None
    quant = bound(deq.args[0])
    if _op_name(quant) != "relax.quantize":
        return None
    return quant, wdeq


def classify_conv(call: relax.Call, table: Sequence[dict], result: QDQConvResult, lookup):
    """Match the next conv of the graph to its metadata entry (by position) and to the QDQ pattern;
    returns (report, matched or None for a full-precision conv). Disagreements are errors."""
    index = len(result.convs)
    if index >= len(table):
        raise RefQSRError(f"the graph has more convs than its refqsr.convs metadata ({len(table)})")
    entry = table[index]
    report = ConvReport(index, entry.get("module", "?"), int(entry["act_bits"]))
    result.convs.append(report)
    matched = match_qdq_conv(call, lookup)
    if report.act_bits >= FULL_PRECISION:
        if matched is not None:
            raise RefQSRError(
                f"conv {index} ({report.module}) is quantized in the graph but full precision in the metadata"
            )
        return report, None
    if matched is None:
        raise RefQSRError(
            f"conv {index} ({report.module}) is {report.act_bits}-bit in the metadata but has no QDQ pattern"
        )
    return report, matched


@mutator
class _Rewriter(PyExprMutator):
    def __init__(
        self,
        mod: tvm.IRModule,
        table: Sequence[dict],
        vnni: bool,
        result: QDQConvResult,
        avx512: bool = False,
        amx: bool = False,
    ):
        super().__init__(mod)
        self.amx = amx
        self.table = list(table)
        self.vnni = vnni
        self.avx512 = avx512
        self.result = result
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def visit_call_(self, call: relax.Call):  # noqa: D102 - visitor hook
        call = super().visit_call_(call)
        if _op_name(call) != "relax.nn.conv2d":
            return call
        report, matched = classify_conv(call, self.table, self.result, self.lookup_binding)
        return call if matched is None else self._integer_conv(call, matched, report)

    def _integer_conv(self, call: relax.Call, matched, report: ConvReport) -> relax.Expr:
        quant, wdeq = matched
        attrs = call.attrs
        if [int(v) for v in attrs.dilation] != [1, 1] or int(attrs.groups) != 1:
            raise RefQSRError(f"conv {report.index}: only dilation 1 and groups 1 are supported")
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
            raise RefQSRError(f"conv {report.index}: expected NCHW/OIHW, got {attrs.data_layout}/{attrs.kernel_layout}")
        stride = [int(v) for v in attrs.strides]
        pad = [int(v) for v in attrs.padding]
        if stride[0] != stride[1] or len(set(pad)) != 1:
            raise RefQSRError(f"conv {report.index}: needs equal strides and symmetric padding, got {stride} / {pad}")
        x, s, z = quant.args[0], quant.args[1], quant.args[2]
        n, c, h, w = (int(v) for v in x.ty.shape)
        container = quant.attrs.out_dtype
        # integer weights with their zero point removed, and the per-output-channel scale
        wq = _const(wdeq.args[0], "weight").astype(np.int64)
        wscale = _const(wdeq.args[1], "weight scale").astype(np.float32)
        wzero = _const(wdeq.args[2], "weight zero point").astype(np.int64)
        o, ci, kh, kw = wq.shape
        if kh != kw or ci != c:
            raise RefQSRError(f"conv {report.index}: unsupported weight shape {wq.shape}")
        if wzero.size > 1 or wscale.size not in (1, o):
            raise RefQSRError(
                f"conv {report.index}: weights must be per-tensor (or per-output-channel scale) quantized"
            )
        w_int = wq - int(wzero.reshape(-1)[0])
        shape = Conv2dShape(n, c, o, h, w, kh, stride[0], pad[0])
        spec = QConvSpec(shape, report.act_bits, container == "int8", int(w_int.min()), int(w_int.max()))
        # one kernel per (problem, grid, variant, int16 chunking): convs that differ only in
        # their weights share code
        variant = choose_variant(
            spec.act_max, spec.w_min, spec.w_max, self.vnni, kh, shape.c8, self.avx512, self.amx and amx_fits(shape)
        )
        # "vnni512" and "amx" bake their weight shift into the code
        shift = spec.weight_shift if variant in ("vnni512", "amx") else 0
        key = (shape, spec.act_bits, spec.signed_container, variant, chunk_groups_for(spec, variant), shift)
        if key not in self.kernels:
            prim = qconv_primfunc(spec, variant)
            name = f"qconv_{variant}_{len(self.kernels)}"
            self.kernels[key] = self.builder_.add_func(prim.with_attr("global_symbol", name), name)
        gv = self.kernels[key]
        packed, sums = pack_qconv_weights(w_int, variant, shift)
        ws = np.zeros(sums.shape[0], dtype=np.float32)
        ws[:o] = np.broadcast_to(wscale.reshape(-1), (o,))
        report.weight_range = (spec.w_min, spec.w_max)
        report.variant = variant
        report.shape = (n, c, o, h, w, kh, stride[0], pad[0])
        s_n = self._per_sample(s, n, "float32")
        z_n = self._per_sample(z, n, "float32")
        out = relax.TensorType(call.ty.shape, "float32")
        return relax.call_tir(gv, [x, s_n, z_n, relax.const(packed), relax.const(sums), relax.const(ws)], out)

    def _per_sample(self, value: relax.Expr, n: int, dtype: str) -> relax.Expr:
        """A scalar or [N] scale/zero point as an [N] tensor of ``dtype``."""
        sinfo = value.ty
        if not isinstance(sinfo, relax.TensorType) or sinfo.ndim not in (0, 1):
            raise RefQSRError("quantized conv: activation scales must be per tensor or per sample")
        if sinfo.ndim == 1 and int(sinfo.shape[0]) not in (1, n):
            raise RefQSRError("quantized conv: activation scales must be per tensor or per sample")
        if sinfo.dtype != dtype:
            value = self.builder_.emit(relax.op.astype(value, dtype))
        return self.builder_.emit(relax.op.broadcast_to(value, relax.ShapeExpr([n])))


def rewrite_qdq_convs(
    mod: tvm.IRModule, conv_table: Sequence[dict], vnni: bool = False, func_name: str = "main", target=None
) -> tuple[tvm.IRModule, QDQConvResult]:
    """Replace every QDQ conv of ``mod[func_name]`` by the fused integer kernel; returns the new
    module (dead quantize/dequantize bindings removed) and a per-conv report.

    ``target`` (the LLVM target the module is built for; default: the current target context,
    if any) enables the 512-bit kernels when it has AVX-512 F+BW+VNNI; without one, only
    ``vnni`` (AVX-VNNI ymm) is known and the AVX2-width kernels are used."""
    if target is None:
        target = tvm.target.Target.current(allow_none=True)
    avx512 = target is not None and target_has_avx512_vnni(target)
    use_amx = target is not None and target_has_amx(target)
    result = QDQConvResult()
    rewriter = _Rewriter(mod, conv_table, vnni, result, avx512, use_amx)
    new_func = rewriter.visit_expr(mod[func_name])
    builder_mod = rewriter.builder_.get()
    builder_mod[func_name] = new_func
    if len(result.convs) != len(conv_table):
        raise RefQSRError(f"the graph has {len(result.convs)} convs, its refqsr.convs metadata {len(conv_table)}")
    builder_mod = relax.transform.DeadCodeElimination([func_name])(builder_mod)
    return builder_mod, result
