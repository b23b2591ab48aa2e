"""The Relax pass that moves full-precision convs onto AMX bf16 tiles (targets with AMX).

After :mod:`.qdq_conv` has made every quantized conv an integer kernel, the convs left are the
network's full-precision layers: on SRResNet the upsampler's 64 -> 256 convs (at 2x and 4x the
patch size) and the last body conv, 30-45 % of a patch's time on the AVX-512 fp32 schedule. A
conv with its bias, as TVM 0.27 imports an ONNX Conv::

    y = R.nn.conv2d(x, W)                     # W constant, fp32
    b = R.reshape(B, [1, O, 1, 1])            # B constant
    z = R.add(y, b)

becomes ``R.call_tir(conv_bf16x3, [x, WH, WL, B])`` (:mod:`refqsr_engine.kernels.conv_amx_bf16`:
split-bf16 products, fp32 sums; about 3e-6 relative error against a float64 conv, PyTorch's fp32
conv itself is at 2e-6). Convs with few outputs and a wide kernel (SRResNet's 9 x 9, 64 -> 3 tail)
take the folded variant (kernel columns as tile rows). Convs neither covers (input channels not a
multiple of 32, strides, the 3-channel head) stay on the fp32 schedule.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ...kernels.conv_amx_bf16 import (
    bf16_fits,
    conv_bf16_compute,
    conv_bf16_fold_compute,
    fold_fits,
    pack_bf16_weights,
    pack_fold_weights,
)
from .qdq_conv import _op_name

#: products per MAC: 3 = bf16x3 (fp32-grade), 1 = plain bf16
DEFAULT_TERMS = 3


def _constant(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, terms: int):
        super().__init__(mod)
        self.terms = terms
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.rewritten = 0

    def _bound(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

    def _bias(self, expr, out_ch: int) -> np.ndarray | None:
        value = self._bound(expr)
        if _op_name(value) == "relax.reshape":
            value = value.args[0]
        b = _constant(value)
        if b is None or b.dtype != np.float32 or b.size != out_ch:
            return None
        if b.ndim == 4 and b.shape != (1, out_ch, 1, 1):
            return None
        return b.reshape(out_ch)

    def visit_call_(self, call: relax.Call):  # noqa: D102 - visitor hook
        call = super().visit_call_(call)
        if _op_name(call) != "relax.add":
            return call
        conv = self._bound(call.args[0])
        if _op_name(conv) != "relax.nn.conv2d":
            return call
        x, weight = conv.args
        w = _constant(weight)
        a = conv.attrs
        if (
            w is None
            or w.dtype != np.float32
            or w.ndim != 4
            or x.ty.dtype != "float32"
            or a.data_layout != "NCHW"
            or a.kernel_layout != "OIHW"
            or int(a.groups) != 1
            or [int(v) for v in a.dilation] != [1, 1]
            or [int(v) for v in a.strides] != [1, 1]
        ):
            return call
        pad = [int(v) for v in a.padding]
        o, c, kh, kw = w.shape
        n, _, h, wd = (int(v) for v in x.ty.shape)
        if len(set(pad)) != 1 or kh != kw or pad[0] != kh // 2:
            return call
        bias = self._bias(call.args[1], o)
        if bias is None:
            return call
        if bf16_fits(n, c, o, wd):
            fold, build, pack = False, conv_bf16_compute, pack_bf16_weights
        elif fold_fits(n, c, o, kh, wd):  # few outputs, wide kernel (the 9 x 9 tail)
            fold, build, pack = True, conv_bf16_fold_compute, pack_fold_weights
        else:
            return call
        key = (n, c, o, h, wd, kh, self.terms, fold)
        if key not in self.kernels:
            prim = build(n, c, o, h, wd, kh, terms=self.terms)
            name = f"conv_bf16x{self.terms}{'_fold' if fold else ''}_{len(self.kernels)}"
            self.kernels[key] = self.builder_.add_func(prim.with_attr("global_symbol", name), name)
        wh, wl = pack(w)
        self.rewritten += 1
        args = [x, relax.const(wh), relax.const(wl), relax.const(bias.astype(np.float32))]
        return relax.call_tir(self.kernels[key], args, relax.TensorType(call.ty.shape, "float32"))


def rewrite_float_convs(
    mod: tvm.IRModule, terms: int = DEFAULT_TERMS, func_name: str = "main"
) -> tuple[tvm.IRModule, int]:
    """Replace every covered float conv + bias of ``mod[func_name]`` by the AMX bf16 kernel;
    returns the new module and how many convs moved."""
    rewriter = _Rewriter(mod, terms)
    new_func = rewriter.visit_expr(mod[func_name])
    out = rewriter.builder_.get()
    out[func_name] = new_func
    out = relax.transform.DeadCodeElimination([func_name])(out)
    return out, rewriter.rewritten
