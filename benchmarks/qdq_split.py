"""The engine's int8 split on an exported FP graph: which Conv nodes are the body convs (the
residual blocks' convs, the ones the engine quantizes), and a QDQ graph quantized only there.

ONNX Runtime's ``quantize_static(nodes_to_quantize=...)`` puts QuantizeLinear/DequantizeLinear on
the inputs and outputs of the listed convs, but other readers of a quantized tensor (a block's
skip Add, the global skip) then read the dequantized copy. The engine's identity paths carry the
unquantized tensor, so :func:`float_outside` points those readers back at the float tensor.
"""

from __future__ import annotations

import re
from typing import Any

#: modules inside a residual block (``net.blocks.<k>.<conv>``, as ``export_graph`` records them)
BODY_MODULE = re.compile(r"(?:^|\.)blocks\.\d+\.[^.]+$")


def body_conv_nodes(model: Any) -> list[str]:
    """Names of the Conv nodes of ``model`` (an ``onnx.ModelProto`` exported by ``export_sr``) that
    are convs of the residual blocks, in graph order; read from the ``refqsr.convs`` metadata
    (node -> PyTorch module) and checked against the graph's Conv nodes."""
    import json

    from ..errors import RefQSRError

    props = {p.key: p.value for p in model.metadata_props}
    if "refqsr.convs" not in props:
        raise RefQSRError("the ONNX graph has no refqsr.convs metadata: export it with export_sr")
    convs = {n.name for n in model.graph.node if n.op_type == "Conv"}
    picked = [e["node"] for e in json.loads(props["refqsr.convs"]) if BODY_MODULE.search(e["module"])]
    missing = [n for n in picked if n not in convs]
    if missing:
        raise RefQSRError(f"body conv(s) {', '.join(missing)} are not Conv nodes of the graph")
    if not picked:
        raise RefQSRError("the graph has no residual-block convs")
    return picked


def float_outside(model: Any, nodes: list[str]) -> int:
    """Point every reader of a dequantized activation that is not one of ``nodes`` and does not
    read a ``nodes`` conv's own output back at the float tensor the QuantizeLinear read; returns
    how many inputs were rewired; Q/DQ pairs no node reads any more are removed. Weight and bias
    DequantizeLinear nodes (no QuantizeLinear before them) are left alone. Modifies ``model`` in place."""
    keep = set(nodes)
    produced_by = {o: n for n in model.graph.node for o in n.output}
    rewired = 0
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear"]:
        q = produced_by.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a quantized initializer (weights, bias)
        source = produced_by.get(q.input[0])
        if source is not None and source.name in keep:
            continue  # a body conv's output: dequantized, as the int8 conv's output is
        for node in model.graph.node:
            if node.name in keep:
                continue
            for k, name in enumerate(node.input):
                if name == dq.output[0]:
                    node.input[k] = q.input[0]
                    rewired += 1
    _drop_unread(model, ("DequantizeLinear", "QuantizeLinear"))
    return rewired


def _drop_unread(model: Any, op_types: tuple[str, ...]) -> None:
    """Remove nodes of ``op_types`` whose outputs nothing reads (in that order: a DQ, then its Q)."""
    for op in op_types:
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type == op and not any(o in read for o in n.output)]
        for n in dead:
            model.graph.node.remove(n)
