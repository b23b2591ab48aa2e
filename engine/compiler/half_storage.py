"""fp16 storage of the float activations that the CUDA graph's kernels pass to each other.

After the conv rewrite (:mod:`.cuda_build`) every conv kernel reads packed operands and writes
fp16, but the Relax ops between the kernels (bias adds, activations, residual adds, DDTB's
per-sample bounds, concatenations) work on fp32 tensors, and FuseOps writes an fp32 tensor
wherever one feeds several kernels: a block's output read by its residual add, the next
block's pack and bound computation and a concatenation. Those reads and writes are most of the
bytes the graph moves besides the convs'.

:func:`store_half` rounds each such tensor to fp16 where it is made and widens it back to fp32
at every reader (where the tensor is itself only a widening of a kernel's fp16 output -- a conv
whose bias add and ReLU run in its epilogue -- every reader widens that output instead,
exactly), so the arithmetic of every op stays fp32 and only the stored tensor is fp16
(half the bytes; a relative rounding of at most 2**-11). A tensor is stored in fp16 when it is a
dataflow value of the graph (not an output: the runtime reads outputs as fp32), a feature map
(``[N][C][H][W]`` with H, W > 1; a per-sample scale or zero point keeps fp32), read by two or
more bindings, and every reader is a Relax operator or a non-opaque ``call_tir``
(the conv rewrite's packs), whose widening cast FuseOps fuses into the reader's kernel; an
opaque kernel (the RefER warps) reads fp32, and a tensor it reads stays fp32.

The float consumers of these tensors round them to fp16 in any case (the f16mma packs), and the
quantized ones put them on a grid of at most 256 steps; what the fp16 storage costs in PSNR-Y is
measured by ``python -m refqsr_engine.benchmarks.f16_gate --compare storage``.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves such a call_tir alone


def mean_of_half(x: te.Tensor, axes: list[int] | None, keepdims: bool) -> te.Tensor:
    """``relax.mean`` of an fp16 tensor as its legalization computes it in fp32 (the sum over
    ``axes``, then a division by their size), each element widened to fp32 inside the sum."""
    nd = len(x.shape)
    axes = list(range(nd)) if axes is None else sorted(a % nd for a in axes)
    red = {a: te.reduce_axis((0, x.shape[a]), f"k{a}") for a in axes}
    count = 1
    for a in axes:
        count *= int(x.shape[a])
    shape = [1 if a in red else x.shape[a] for a in range(nd) if keepdims or a not in red]

    def total(*idx):
        kept = iter(idx)
        full = []
        for a in range(nd):
            if a in red:
                full.append(red[a])
                if keepdims:
                    next(kept)
            else:
                full.append(next(kept))
        return te.sum(x[tuple(full)].astype("float32"), axis=list(red.values()))

    summed = te.compute(shape, total, name="x_red")
    return te.compute(shape, lambda *i: summed(*i) / tvm.tirx.const(float(count), "float32"), name="T_divide")


def bound_values(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """Var -> the value of its binding, over the function's blocks."""
    return {b.var: b.value for block in func.body.blocks for b in block.bindings}


def reader_counts(func: relax.Function) -> dict[relax.Var, int]:
    """Var -> how many bindings (and the function's result) read it."""
    return {v: len(r) for v, r in _readers(func).items()}


def _readers(func: relax.Function) -> dict[relax.Var, list[relax.Expr]]:
    """Var -> the binding values (and the function's result) that read it."""
    readers: dict[relax.Var, list[relax.Expr]] = {}
    body = func.body
    for block in body.blocks:
        for binding in block.bindings:
            for v in relax.analysis.free_vars(binding.value):
                readers.setdefault(v, []).append(binding.value)
    for v in relax.analysis.free_vars(body.body):
        readers.setdefault(v, []).append(body.body)
    return readers


def _fuses_a_cast(mod: tvm.IRModule, reader: relax.Expr) -> bool:
    """Whether a widening cast on this reader's operand fuses into the reader's kernel."""
    if not isinstance(reader, relax.Call) or not isinstance(reader.op, tvm.ir.Op):
        return False
    if reader.op.name != "relax.call_tir":
        return True
    callee = mod[reader.args[0]] if isinstance(reader.args[0], tvm.ir.GlobalVar) else None
    if not isinstance(callee, tvm.tirx.PrimFunc):
        return False
    pattern = callee.attrs.get("op_pattern") if callee.attrs else None
    return pattern is None or int(pattern) != OPAQUE


def half_candidates(mod: tvm.IRModule, func_name: str = "main") -> set[relax.Var]:
    """The dataflow vars of ``mod[func_name]`` that :func:`store_half` stores in fp16."""
    func = mod[func_name]
    chosen: set[relax.Var] = set()
    for var, readers in _readers(func).items():
        ty = var.ty
        if not isinstance(var, relax.DataflowVar) or not isinstance(ty, relax.TensorType):
            continue
        if ty.dtype != "float32" or len(readers) < 2:
            continue
        if ty.ndim != 4 or int(ty.shape[2]) == 1 or int(ty.shape[3]) == 1:
            continue  # not a feature map: per-sample scales and zero points keep their fp32
        if all(_fuses_a_cast(mod, r) for r in readers):
            chosen.add(var)
    return chosen


def fp16_view(var: relax.Var, lookup: Callable[[relax.Var], relax.Expr | None]) -> tuple[relax.Var, list[int]] | None:
    """(src, perm) when ``var`` is an fp32 widening of the 4-D fp16 tensor ``src``, permuted so
    that axis i is src's axis ``perm[i]`` (casts to fp32 and ``permute_dims`` only, as the conv
    rewrite widens a kernel's fp16 NHWC output); None otherwise. ``lookup``: a var's bound value."""
    perm, expr = [0, 1, 2, 3], var
    while True:
        if isinstance(expr, relax.Var):
            ty = expr.ty
            if expr is not var and isinstance(ty, relax.TensorType) and ty.dtype == "float16" and ty.ndim == 4:
                return expr, perm
            value = lookup(expr)
            if value is None:
                return None
            expr = value
        elif isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.astype":
            inner = expr.args[0]
            if expr.attrs.dtype != "float32" or inner.ty.dtype not in ("float16", "float32"):
                return None
            expr = inner
        elif isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.permute_dims":
            axes = [0, 1, 2, 3] if expr.attrs.axes is None else [int(a) for a in expr.attrs.axes]
            perm = [axes[p] for p in perm]
            expr = expr.args[0]
        else:
            return None


@mutator
class _HalfStorage(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, chosen: set[relax.Var], func_name: str):
        super().__init__(mod)
        self.chosen = chosen
        self.bindings = bound_values(mod[func_name])
        # new fp32 var -> (its fp16 source, the permutation that gives the fp32 var from it): a
        # copy made at the binding (identity), or a kernel's own fp16 output the var only widens
        self.half: dict[relax.Var, tuple[relax.Var, list[int]]] = {}

    def _current(self, var: relax.Var) -> relax.Var:
        remapped = self.get_var_remap(var)
        return var if remapped is None else remapped

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:  # noqa: D102 - visitor hook
        super().visit_var_binding_(binding)
        if binding.var in self.chosen:
            new = self._current(binding.var)
            view = fp16_view(binding.var, self.bindings.get)
            if view is not None:  # exact: every reader widens the kernel's fp16 output itself
                self.half[new] = (self._current(view[0]), view[1])
            else:
                self.half[new] = (self.builder_.emit(relax.op.astype(new, "float16")), [0, 1, 2, 3])

    def _widened(self, var: relax.Var) -> relax.Expr:
        src, perm = self.half[var]
        wide = relax.op.astype(src, "float32")
        return wide if perm == [0, 1, 2, 3] else relax.op.permute_dims(wide, perm)

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: D102 - visitor hook
        arg = call.args[0] if call.args else None
        if (
            isinstance(call.op, tvm.ir.Op)
            and call.op.name == "relax.mean"
            and isinstance(arg, relax.DataflowVar)
            and self._current(arg) in self.half
        ):
            # a legalized mean (a sum, then the division) is "out-elementwise fusable", which takes
            # no cast before it: this one reads the fp16 copy itself and sums in fp32
            axes = [0, 1, 2, 3] if call.attrs.axis is None else [int(a) % 4 for a in call.attrs.axis]
            keepdims = bool(call.attrs.keepdims)
            src, perm = self.half[self._current(arg)]
            kept = [perm[a] for a in range(4) if a not in axes]
            if keepdims or kept == sorted(kept):  # the source's axis order gives the mean's
                mean = self.builder_.call_te(mean_of_half, src, [perm[a] for a in axes], keepdims)
                return relax.op.permute_dims(mean, perm) if keepdims and perm != [0, 1, 2, 3] else mean
        return super().visit_call_(call)

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> relax.Expr:  # noqa: D102 - visitor hook
        new = self._current(var)
        if new in self.half:  # a reader: widen the fp16 tensor in its own binding (fused into the reader)
            return self.builder_.emit(self._widened(new))
        return new


def store_half(mod: tvm.IRModule, func_name: str = "main") -> tuple[tvm.IRModule, int]:
    """``mod`` with the tensors of :func:`half_candidates` stored in fp16; returns the module and
    how many tensors that is."""
    chosen = half_candidates(mod, func_name)
    if not chosen:
        return mod, 0
    mutator_ = _HalfStorage(mod.clone(), chosen, func_name)  # the builder's module is updated in place
    new_func = mutator_.visit_expr(mod[func_name])
    out = mutator_.builder_.get()
    out[func_name] = new_func
    return relax.transform.DeadCodeElimination([func_name])(out), len(chosen)  # the unread views
