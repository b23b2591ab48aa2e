"""Per-sample channel means from the conv kernels' tile sums, in the CUDA graph.

DDTB's dynamic bounds start from ``mean(x, axes=[2, 3])`` of each quantized conv's input, and in
the rewritten graph ``x`` is mostly the fp32 NCHW widening of a conv kernel's fp16 NHWC output.
A mean kernel would read that whole map once more (1.18 MB a 96 x 96 x 64 patch). Here the
kernel that writes the map is called in its ``tile_sums`` form instead
(:func:`~...kernels.conv2d_cuda.tile_sums_shape`): it also writes the per-channel fp32 sums of
its stored values over each block tile, and the mean is the sum of a sample's tile sums
divided by its pixel count: ``[N][tiles][C]`` floats, about 3 % of the map. The values summed
are the stored fp16 outputs, as the mean of the widened map sums them; only the order of the
fp32 additions differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

from .half_storage import bound_values, fp16_view


@dataclass(frozen=True)
class SumsKernel:
    """A conv kernel's ``tile_sums`` form: its name and PrimFunc, and the shape of the sums."""

    name: str
    prim: tvm.tirx.PrimFunc
    sums_shape: tuple[int, int]  # [pixel tiles of the batch][output channels]


#: a conv kernel's GlobalVar -> its tile-sums form, or None where it has none
SumsFactory = Callable[[tvm.ir.GlobalVar], "SumsKernel | None"]


def _call_tir_target(value: relax.Expr) -> tvm.ir.GlobalVar | None:
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir":
        gv = value.args[0]
        return gv if isinstance(gv, tvm.ir.GlobalVar) else None
    return None


def _spatial_mean_of(call: relax.Expr, lookup) -> relax.Var | None:
    """The fp16 NHWC tensor whose NCHW widening ``call`` averages over H and W; None otherwise."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.mean"):
        return None
    arg = call.args[0]
    if not isinstance(arg, relax.Var) or call.attrs.axis is None:
        return None
    if sorted(int(a) % 4 for a in call.attrs.axis) != [2, 3]:
        return None
    view = fp16_view(arg, lookup)
    if view is None or view[1] != [0, 3, 1, 2]:
        return None
    return view[0]


def mean_of_tile_sums(sums: te.Tensor, batch: int, pixels: int, shape: list[int]) -> te.Tensor:
    """``[N][C]`` (or ``[N][C][1][1]``: ``shape``) means from ``[tiles][C]`` fp32 tile sums, a
    sample's tiles consecutive: the sum of its tiles, divided by its ``pixels``."""
    tiles = int(sums.shape[0]) // batch
    t = te.reduce_axis((0, tiles), "t")
    total = te.compute(shape, lambda n, c, *_: te.sum(sums[n * tiles + t, c], axis=t), name="sample_sums")
    return te.compute(shape, lambda *i: total(*i) / tvm.tirx.const(float(pixels), "float32"), name="T_divide")


@mutator
class _TileSumMeans(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, factory: SumsFactory, func_name: str):
        super().__init__(mod)
        values = bound_values(mod[func_name])
        self.made: dict[tvm.ir.GlobalVar, tuple[tvm.ir.GlobalVar, SumsKernel] | None] = {}
        self.factory = factory
        self.outputs: set[relax.Var] = set()  # the kernel outputs whose kernel writes tile sums too
        self.means: dict[relax.Var, relax.Var] = {}  # mean -> the kernel output it averages
        for var, value in values.items():
            src = _spatial_mean_of(value, values.get)
            if src is None or not isinstance(src, relax.DataflowVar) or not isinstance(var, relax.DataflowVar):
                continue
            gv = _call_tir_target(values.get(src))
            if gv is not None and self._sums_form(gv) is not None:
                self.outputs.add(src)
                self.means[var] = src
        self.sums: dict[relax.Var, relax.Var] = {}  # kernel output -> its tile sums in the new graph
        self.replaced: list[list[relax.Expr]] = []  # the operands of each kernel call given tile sums
        self.averaged = 0

    def _sums_form(self, gv: tvm.ir.GlobalVar) -> tuple[tvm.ir.GlobalVar, SumsKernel] | None:
        if gv not in self.made:
            kernel = self.factory(gv)
            self.made[gv] = None if kernel is None else (self.builder_.add_func(kernel.prim, kernel.name), kernel)
        return self.made[gv]

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:  # noqa: D102 - visitor hook
        var, value = binding.var, binding.value
        if var in self.outputs:  # the kernel, writing its tile sums too
            gv, kernel = self._sums_form(_call_tir_target(value))
            args = [self.visit_expr(a) for a in value.args[1].fields]
            out_ty = [value.ty, relax.TensorType(kernel.sums_shape, "float32")]
            both = self.builder_.emit(relax.call_tir(gv, args, out_ty))
            self.set_var_remap(var, self.builder_.emit(relax.TupleGetItem(both, 0)))
            self.sums[var] = self.builder_.emit(relax.TupleGetItem(both, 1))
            self.replaced.append(args)
            return
        if var in self.means and self.means[var] in self.sums:
            self.set_var_remap(var, self._mean(value, self.sums[self.means[var]]))
            self.averaged += 1
            return
        super().visit_var_binding_(binding)

    def _mean(self, mean: relax.Call, sums: relax.Var) -> relax.Var:
        """The mean from the tile sums: one small kernel."""
        n, _, h, w = (int(d) for d in mean.args[0].ty.shape)
        return self.builder_.emit(
            self.builder_.call_te(mean_of_tile_sums, sums, n, h * w, [int(d) for d in mean.ty.shape])
        )


@dataclass
class TileSumMeans:
    """What :func:`means_from_tile_sums` changed: the operands of each kernel call that now
    writes tile sums, and how many means read them."""

    calls: list[list[relax.Expr]]
    means: int


def means_from_tile_sums(
    mod: tvm.IRModule, factory: SumsFactory, func_name: str = "main"
) -> tuple[tvm.IRModule, TileSumMeans]:
    """``mod`` with every spatial mean of a conv kernel's widened output taken from the kernel's
    tile sums (``factory`` gives a kernel's tile-sums form, or None where it has none)."""
    rewriter = _TileSumMeans(mod.clone(), factory, func_name)
    if not rewriter.outputs:
        return mod, TileSumMeans([], 0)
    new_func = rewriter.visit_expr(mod[func_name])
    out = rewriter.builder_.get()
    out[func_name] = new_func
    out = relax.transform.DeadCodeElimination([func_name])(out)
    return out, TileSumMeans(rewriter.replaced, rewriter.averaged)
