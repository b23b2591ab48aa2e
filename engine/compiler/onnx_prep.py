"""Make an exported ONNX graph static and plain before the Relax importer sees it.

The importer of TVM 0.27 trips over three things PyTorch's exporter emits: ``Clip`` with an
omitted bound (it reads the empty input as ``None``), scalar bounds that come out of shape
arithmetic (imported as ``PrimValue`` where a tensor is expected), and ``Constant`` nodes; and it
warns about a fourth, Gathers with a constant index (rewritten as slices). The
engine compiles fixed batch shapes anyway, so the graph is first pinned to those shapes and
everything that no longer depends on the data is folded into initializers. Quantize/dequantize
pairs are never folded: they are the pattern the integer-conv pass looks for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

#: never folded, even on constant inputs: the QDQ structure must reach the Relax pass intact
KEEP_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: folding results larger than this stay in the graph (they would bloat the parameter set)
FOLD_LIMIT = 1 << 20


def pin_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """Replace the symbolic dimensions of the named graph inputs by fixed ones."""
    known = {i.name for i in model.graph.input}
    unknown = set(shapes) - known
    if unknown:
        raise ValueError(f"graph has no inputs named {sorted(unknown)} (inputs: {sorted(known)})")
    for inp in model.graph.input:
        if inp.name not in shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) != len(shapes[inp.name]):
            raise ValueError(f"input {inp.name}: rank {len(dims)}, got shape {list(shapes[inp.name])}")
        for d, v in zip(dims, shapes[inp.name]):
            d.ClearField("dim_param")
            d.dim_value = int(v)


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _split_clip(graph: onnx.GraphProto) -> None:
    """Clip(x, lo, hi) -> Min(Max(x, lo), hi), omitting absent bounds (same values, NaN aside)."""
    nodes = []
    for node in graph.node:
        if node.op_type != "Clip" or len(node.input) == 1:
            nodes.append(node)
            continue
        cur = node.input[0]
        lo = node.input[1] if len(node.input) > 1 else ""
        hi = node.input[2] if len(node.input) > 2 else ""
        if lo:
            out = node.output[0] if not hi else node.output[0] + "__lo"
            nodes.append(helper.make_node("Max", [cur, lo], [out], name=node.name + "__max"))
            cur = out
        if hi:
            nodes.append(helper.make_node("Min", [cur, hi], [node.output[0]], name=node.name + "__min"))
        if not lo and not hi:
            nodes.append(helper.make_node("Identity", [cur], [node.output[0]], name=node.name + "__id"))
    del graph.node[:]
    graph.node.extend(nodes)


def _scalar_gather_to_slice(graph: onnx.GraphProto) -> None:
    """Gather(x, k) with a constant scalar k -> Squeeze(Slice(x, k, k + 1)).

    The DDTB gate reads its two factors as ``factors[:, 0]`` / ``factors[:, 1]``: Gathers with a
    constant index, which TVM lowers to ``take(mode="fast")`` and warns about once per use
    (hundreds of "Fast mode segfaults ..." lines on a user's first compile). A slice says the
    same without an index to check."""
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = []
    for node in graph.node:
        k = consts.get(node.input[1]) if node.op_type == "Gather" and len(node.input) == 2 else None
        if k is None or k.ndim != 0:
            nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        k = int(k)
        stem = node.output[0] + "__slice"
        for name, value in (("starts", k), ("ends", k + 1 if k != -1 else np.iinfo(np.int64).max), ("axes", axis)):
            graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), f"{stem}_{name}"))
        nodes.append(
            helper.make_node(
                "Slice",
                [node.input[0], f"{stem}_starts", f"{stem}_ends", f"{stem}_axes"],
                [stem],
                name=node.name + "__slice",
            )
        )
        nodes.append(
            helper.make_node("Squeeze", [stem, f"{stem}_axes"], [node.output[0]], name=node.name + "__squeeze")
        )
    del graph.node[:]
    graph.node.extend(nodes)


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    return shapes


def _fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate, node by node in order, every node whose inputs are known; returns nodes folded."""
    graph = model.graph
    values: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shapes = _static_shapes(model)
    keep, folded = [], 0
    for node in graph.node:
        result: list[np.ndarray] | None = None
        if node.op_type == "Shape" and node.input[0] in shapes and not node.attribute:
            result = [np.asarray(shapes[node.input[0]], dtype=np.int64)]
        elif node.op_type not in KEEP_OPS and all(i == "" or i in values for i in node.input) and node.input:
            try:
                result = _evaluate(node, values)
            except Exception:  # an op the reference runtime lacks: leave it to TVM
                result = None
        if result is None or any(r.size > FOLD_LIMIT for r in result):
            keep.append(node)
            continue
        for name, arr in zip(node.output, result):
            values[name] = arr
            graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
        folded += 1
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def _evaluate(node: onnx.NodeProto, values: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    inputs = [i for i in node.input if i]
    sub = helper.make_graph(
        [node],
        "fold",
        [
            helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), values[i].shape)
            for i in inputs
        ],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
    )
    opset = [helper.make_opsetid("", 17)]
    ev = ReferenceEvaluator(helper.make_model(sub, opset_imports=opset))
    return [np.asarray(r) for r in ev.run(None, {i: values[i] for i in inputs})]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def prepare_onnx(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` with fixed input shapes, constant subgraphs folded and Clip split."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    pin_input_shapes(out, shapes)
    _constants_to_initializers(out.graph)
    _split_clip(out.graph)
    _scalar_gather_to_slice(out.graph)
    while _fold_constants(out):  # shapes become known as their producers fold
        pass
    _drop_unused_initializers(out.graph)
    del out.graph.value_info[:]
    return out
