"""An exported ONNX graph -> a Relax module with fixed shapes, plus the graph's refqsr metadata."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import tvm
from tvm import relax

from ...errors import RefQSRError
from ...kernels.refer_kernels import backward_warp_primfunc, refer_pipeline_primfunc, shared_flow_primfunc
from ...kernels.tir_build import as_target
from .half_storage import OPAQUE as _OPAQUE
from .onnx_prep import prepare_onnx
from .refer_fuse import OP, SHARED_FLOW_OP, WARP_OP, fuse_refer_warps


def graph_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The ``refqsr.*`` metadata the exporter wrote (JSON values), keys without the prefix."""
    meta = {}
    for prop in model.metadata_props:
        if prop.key.startswith("refqsr."):
            meta[prop.key[len("refqsr.") :]] = json.loads(prop.value)
    if "convs" not in meta:
        raise RefQSRError("the ONNX graph carries no refqsr.convs metadata; export it with refqsr-engine")
    return meta


def input_names(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def static_input_shapes(model: onnx.ModelProto, batch: int) -> dict[str, list[int]]:
    """Every graph input's shape with the (symbolic) batch axis set to ``batch``."""
    shapes = {}
    for inp in model.graph.input:
        if inp.name not in input_names(model):
            continue
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and not (i == 0 and d.dim_value != batch and d.dim_param):
                dims.append(d.dim_value if i else batch)
            else:
                dims.append(batch if i == 0 else 0)
        if any(v <= 0 for v in dims):
            raise RefQSRError(f"input {inp.name} has an unknown non-batch dimension: {dims}")
        shapes[inp.name] = dims
    return shapes


def _refer_primfunc(stage: str, target: tvm.target.Target, shape: tuple[int, ...], **kw) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of a RefER stage for ``target``: the CPU kernels on LLVM, their
    GPU schedules (same computes, :mod:`~refqsr_engine.kernels.refer_cuda`) on CUDA, marked opaque
    so that no fusion replaces the schedule."""
    from ...models.matching import POOL

    n, c, h, w = shape
    if target.kind.name == "cuda":
        from ...kernels.refer_cuda import refer_primfunc_cuda

        return refer_primfunc_cuda(stage, n, c, h, w, pool=POOL, **kw).with_attr("op_pattern", _OPAQUE)
    if stage == "pipeline":
        return refer_pipeline_primfunc(n, c, h, w, kw["qmin"], kw["qmax"], target, pool=POOL)
    if stage == "shared_flow":
        return shared_flow_primfunc(n, c, h, w, target, pool=POOL, **kw)
    return backward_warp_primfunc(n, c, h, w, target, pool=POOL)


def _refer_warp_converter(target: tvm.target.Target):
    """Importer converter of ``refqsr.RefERWarp``: our RefER kernel through ``R.call_tir``."""
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class RefERWarp(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            fq, fr, scale, zp = inputs
            n, c, h, w = (int(v) for v in fq.ty.shape)
            prim = _refer_primfunc("pipeline", target, (n, c, h, w), qmin=int(attr["qmin"]), qmax=int(attr["qmax"]))
            out = _kernel_call(bb, prim, "refer_warp", [fq, fr, scale, zp], [(n, c, h, w), (n, 2, h, w)])
            return bb.emit(relax.TupleGetItem(out, 0))  # (warped, flow): the warped reference

    return RefERWarp


def _kernel_call(bb, prim, prefix: str, args: list, out_shape: tuple[int, ...] | list[tuple[int, ...]]):
    """``R.call_tir`` of one of our scheduled PrimFuncs (float32 outputs: one shape, or a list of
    shapes for a tuple), added under a fresh name."""
    name = f"{prefix}_{len([g for g in bb.get().functions if g.name_hint.startswith(prefix)])}"
    gv = bb.add_func(prim.with_attr("global_symbol", name), name)
    sinfo = (
        [relax.TensorType(o, "float32") for o in out_shape]
        if isinstance(out_shape, list)
        else relax.TensorType(out_shape, "float32")
    )
    return bb.emit(relax.call_tir(gv, args, sinfo))


def _shared_matching_converters(target: tvm.target.Target) -> dict[str, Any]:
    """Importer converters of ``refqsr.SharedFlow`` (the shared matching's flow) and ``refqsr.Warp``
    (a RefER's warp by it): our kernels through ``R.call_tir``, with the matching's constants."""
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from ...models.matching import COSINE_GRID

    class SharedFlow(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            fq, fr = inputs
            n, c, h, w = (int(v) for v in fq.ty.shape)
            prim = _refer_primfunc("shared_flow", target, (n, c, h, w), cosine_grid=COSINE_GRID)
            return _kernel_call(bb, prim, "shared_flow", [fq, fr], (n, 2, h, w))

    class Warp(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            feat, flow = inputs
            n, c, h, w = (int(v) for v in feat.ty.shape)
            return _kernel_call(
                bb,
                _refer_primfunc("backward_warp", target, (n, c, h, w)),
                "refer_warp_by_flow",
                [feat, flow],
                (n, c, h, w),
            )

    return {SHARED_FLOW_OP: SharedFlow, WARP_OP: Warp}


def _pairwise_converter(name: str):
    """ONNX Max/Min as Relax's binary maximum/minimum.

    TVM's importer broadcasts every input to the full shape, stacks them and reduces over the
    new axis: for the quantizers' per-sample clip ``Min(Max(x, lo[N,1,1,1]), hi)`` that is two
    full-size copies and a serial reduction per clip -- a quarter of the quantized graphs' time in
    the profile (``benchmarks/profile_graphs.py``). The pairwise form is an injective op that
    fuses with its neighbours."""
    from tvm.relax.frontend.onnx import onnx_frontend

    base = getattr(onnx_frontend, name)

    class Pairwise(base):  # type: ignore[misc, valid-type]
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            if all(isinstance(i, tvm.ir.GenericConst) for i in inputs):
                return super()._impl_v1(bb, inputs, attr, params)  # folded at import
            return cls._impl_dynamic(bb, inputs)

    Pairwise.__name__ = name
    return Pairwise


@contextlib.contextmanager
def _extra_converters(extra: Mapping[str, Any]):
    """The importer looks its converters up in ``_get_convert_map()`` per node: add ours for a while."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map

    def patched():
        return {**original(), **extra}

    onnx_frontend._get_convert_map = patched
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def import_graph(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], target: tvm.target.Target | None = None
) -> tuple[tvm.IRModule, int]:
    """Relax module of ``model`` at the given input shapes (parameters embedded as constants),
    with each RefER warp subgraph replaced by our kernel (CPU-scheduled for an LLVM ``target``,
    GPU-scheduled for a CUDA one); returns (module, RefER warps fused)."""
    from tvm.relax.frontend.onnx import from_onnx

    prepared = prepare_onnx(model, shapes)
    warps = fuse_refer_warps(prepared)
    tgt = target if isinstance(target, tvm.target.Target) and target.kind.name == "cuda" else as_target(target)
    converters = {
        OP: _refer_warp_converter(tgt),
        **_shared_matching_converters(tgt),
        "Max": _pairwise_converter("Max"),
        "Min": _pairwise_converter("Min"),
    }
    with _extra_converters(converters):
        # No FoldConstant here: it would turn the dequantized integer weights into float constants
        # (and compile a kernel per constant expression, ~15 s); the build pipeline folds later.
        mod = from_onnx(prepared, keep_params_in_input=False)
    return mod, warps
