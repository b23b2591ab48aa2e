"""Collapse each RefER's matching-and-warping subgraph into one ``refqsr.RefERWarp`` node.

The exported query graph spells RefER's hard matching out in standard ONNX (ReduceL2, AveragePool,
QDQ of the match quantizer, MatMul, ArgMax, Resize, GatherElements ...) so that ONNX Runtime runs
it. The engine runs our own kernel instead (:func:`refqsr_engine.kernels.refer_kernels.
refer_pipeline_primfunc`, bit-exact with the PyTorch twin), so before the Relax import the
subgraph that computes the aligned reference feature of RefER k -- everything in the ``/refers.k/``
scope that feeds the difference ``query - aligned`` and is not the refinement convs -- becomes

    aligned = refqsr.RefERWarp(query, reference, scale, zero_point)   attrs: qmin, qmax

with the match quantizer's (folded, static) scale and zero point and its integer grid. With
RefQSR's shared matching the ``/matcher/`` scope (one flow per query, from the block-1 features
of query and reference) becomes ``flow = refqsr.SharedFlow(query_match, reference_match)`` and
each RefER's warp ``aligned = refqsr.Warp(reference, flow)``. The Relax importer gets converters
for these ops (``relax_import``).
"""

from __future__ import annotations

import re
from collections import deque

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import RefQSRError

DOMAIN = "refqsr"
OP = "RefERWarp"  # paper matching: one RefER's matching and warp
SHARED_FLOW_OP = "SharedFlow"  # shared matching: the one flow per query
WARP_OP = "Warp"  # shared matching: one RefER's warp by that flow
MATCHER_SCOPE = "/matcher/"
_REFINEMENT = ("conv1/", "conv2/", "act/")


def _scope_of(name: str) -> str | None:
    m = re.match(r"^(.*?/refers\.\d+/)", name)
    return m.group(1) if m else None


def _difference_node(graph: onnx.GraphProto, scope: str, consumers: dict[str, list[onnx.NodeProto]]) -> onnx.NodeProto:
    """The ``query - aligned`` Sub directly in ``scope`` whose result feeds the refinement conv1."""
    for node in graph.node:
        if node.op_type == "Sub" and node.name.startswith(scope) and "/" not in node.name[len(scope) :]:
            if any(c.name.startswith(scope + "conv1/") for c in consumers.get(node.output[0], [])):
                return node
    raise RefQSRError(f"{scope}: cannot find the RefER difference (query - aligned) in the graph")


def _ancestors(output: str, producer: dict[str, onnx.NodeProto], inside) -> dict[str, onnx.NodeProto]:
    """The nodes that ``output`` depends on through nodes whose name satisfies ``inside``."""
    sub: dict[str, onnx.NodeProto] = {}
    todo = deque([output])
    while todo:
        name = todo.popleft()
        node = producer.get(name)
        if node is None or node.name in sub or not inside(node.name):
            continue
        sub[node.name] = node
        todo.extend(i for i in node.input if i)
    return sub


def _in_warp(scope: str | None = None):
    """Name test: inside RefER ``scope`` (any RefER when None), refinement convs excluded."""

    def inside(name: str) -> bool:
        s = _scope_of(name)
        return s is not None and (scope is None or s == scope) and not name[len(s) :].startswith(_REFINEMENT)

    return inside


def _outside_features(sub: dict[str, onnx.NodeProto], producer: dict[str, onnx.NodeProto], values: dict) -> list[str]:
    """Non-constant values the subgraph reads from outside itself."""
    outside = {
        i for n in sub.values() for i in n.input if i and (producer.get(i) is None or producer[i].name not in sub)
    }
    return sorted(i for i in outside if i not in values)


def _check_closed(
    sub: dict[str, onnx.NodeProto], outputs: set[str], consumers: dict[str, list[onnx.NodeProto]], scope: str
) -> None:
    for n in sub.values():  # nothing computed here but ``outputs`` may be used outside the subgraph
        for o in n.output:
            if o not in outputs and any(c.name not in sub for c in consumers.get(o, [])):
                raise RefQSRError(f"{scope}: {o} is used outside the RefER subgraph")


def _replace(
    graph: onnx.GraphProto, sub: dict[str, onnx.NodeProto], node: onnx.NodeProto, before: onnx.NodeProto
) -> None:
    """Drop ``sub``'s nodes and put ``node`` just before ``before``, the first reader of its
    output (so after the producers of everything it reads)."""
    keep = [n for n in graph.node if n.name not in sub]
    keep.insert(keep.index(before), node)
    del graph.node[:]
    graph.node.extend(keep)


def _index(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """(producer of each value, consumers of each value)."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _fuse_shared_flow(model: onnx.ModelProto, values: dict) -> str | None:
    """Collapse the ``/matcher/`` scope (shared matching) into one ``refqsr.SharedFlow`` node;
    returns the name of the flow it computes, or None when the graph has no shared matcher."""
    graph = model.graph
    producer, consumers = _index(graph)
    scope_nodes = [n for n in graph.node if n.name.startswith(MATCHER_SCOPE)]
    if not scope_nodes:
        return None
    outputs = {
        o
        for n in scope_nodes
        for o in n.output
        if any(not c.name.startswith(MATCHER_SCOPE) for c in consumers.get(o, []))
    }
    if len(outputs) != 1:
        raise RefQSRError(f"{MATCHER_SCOPE}: expected one flow leaving the shared matcher, found {sorted(outputs)}")
    flow = outputs.pop()
    sub = _ancestors(flow, producer, lambda name: name.startswith(MATCHER_SCOPE))
    feats = _outside_features(sub, producer, values)
    graph_inputs = {i.name for i in graph.input}
    references = [f for f in feats if f in graph_inputs]
    if len(feats) != 2 or len(references) != 1:
        raise RefQSRError(
            f"{MATCHER_SCOPE}: the shared matcher should read one query feature and one reference input, reads {feats}"
        )
    reference = references[0]
    query = next(f for f in feats if f != reference)
    _check_closed(sub, {flow}, consumers, MATCHER_SCOPE)
    node = helper.make_node(
        SHARED_FLOW_OP, [query, reference], [flow], name=MATCHER_SCOPE + SHARED_FLOW_OP, domain=DOMAIN
    )
    first_reader = next(n for n in graph.node if n.name not in sub and flow in n.input)
    _replace(graph, sub, node, first_reader)
    return flow


def fuse_refer_warps(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` (prepared: constants folded, Clip split) in place; returns the number of
    RefER warps collapsed (the shared matcher, if any, is collapsed too)."""
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    flow = _fuse_shared_flow(model, values)
    producer, consumers = _index(graph)
    scopes = sorted({s for n in graph.node if (s := _scope_of(n.name))})
    diffs = {scope: _difference_node(graph, scope, consumers) for scope in scopes}
    if flow is not None:
        _fuse_warps_by_flow(graph, diffs, flow, producer, consumers, values)
        fused = len(diffs)
    else:
        fused = 0
        for scope, diff in diffs.items():
            query, aligned = diff.input[0], diff.input[1]
            # the warp subgraph: ancestors of `aligned` inside the scope, refinement excluded
            sub = _ancestors(aligned, producer, _in_warp(scope))
            feats = _outside_features(sub, producer, values)
            _check_closed(sub, {aligned}, consumers, scope)
            _replace(graph, sub, _refer_warp_node(graph, scope, sub, feats, query, aligned, values, producer), diff)
            producer = _index(graph)[0]
            fused += 1
    if (fused or flow is not None) and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return fused


def _fuse_warps_by_flow(
    graph: onnx.GraphProto,
    diffs: dict[str, onnx.NodeProto],
    flow: str,
    producer: dict[str, onnx.NodeProto],
    consumers: dict[str, list[onnx.NodeProto]],
    values: dict,
) -> None:
    """Shared matching: each RefER's ``aligned`` becomes ``Warp(reference, flow)``. The warps'
    sampling coordinates depend on the flow alone, so the exporter computes them once, in the
    first RefER's scope, for all: the RefERs' warp subgraphs are removed together."""
    union: dict[str, onnx.NodeProto] = {}
    nodes = []
    for scope, diff in diffs.items():
        aligned = diff.input[1]
        sub = _ancestors(aligned, producer, _in_warp())
        feats = _outside_features(sub, producer, values)
        if len(feats) != 2 or flow not in feats:
            raise RefQSRError(f"{scope}: the warp should read one reference feature and the shared flow, reads {feats}")
        reference = next(f for f in feats if f != flow)
        union.update(sub)
        nodes.append(
            (helper.make_node(WARP_OP, [reference, flow], [aligned], name=scope + WARP_OP, domain=DOMAIN), diff)
        )
    _check_closed(union, {diff.input[1] for diff in diffs.values()}, consumers, "RefER warps")
    for node, diff in nodes:
        _replace(graph, union, node, diff)
        union = {}  # removed with the first


def _refer_warp_node(
    graph: onnx.GraphProto,
    scope: str,
    sub: dict[str, onnx.NodeProto],
    feats: list[str],
    query: str,
    aligned: str,
    values: dict,
    producer: dict[str, onnx.NodeProto],
) -> onnx.NodeProto:
    """Paper matching: ``RefERWarp(query, reference, scale, zero_point)`` with the match quantizer's
    folded scale and zero point and its integer grid."""
    if query not in feats or len(feats) != 2:
        raise RefQSRError(f"{scope}: the warp subgraph should read the query and one reference feature, reads {feats}")
    reference = next(i for i in feats if i != query)
    quants = [n for n in sub.values() if n.op_type == "QuantizeLinear"]
    if not quants:
        raise RefQSRError(f"{scope}: no match quantizer in the RefER warp subgraph")
    quant = quants[0]
    if quant.input[1] not in values or quant.input[2] not in values:
        raise RefQSRError(f"{scope}: the match quantizer's scale is not static")
    clip_min = producer.get(quant.input[0])
    clip_max = producer.get(clip_min.input[0]) if clip_min is not None else None
    scale = float(values[quant.input[1]].reshape(-1)[0])
    zp = float(values[quant.input[2]].reshape(-1)[0])
    lo = float(values[clip_max.input[1]].reshape(-1)[0])
    hi = float(values[clip_min.input[1]].reshape(-1)[0])
    # the clip bounds are (q - zp) * scale: the grid in the container's integers
    qmin, qmax = int(round(lo / scale + zp)), int(round(hi / scale + zp))
    prefix = scope.strip("/").replace("/", "_")
    s_name, z_name = prefix + "__match_scale", prefix + "__match_zero_point"
    graph.initializer.append(numpy_helper.from_array(np.asarray([scale], np.float32), s_name))
    graph.initializer.append(numpy_helper.from_array(np.asarray([zp], np.float32), z_name))
    return helper.make_node(
        OP, [query, reference, s_name, z_name], [aligned], name=scope + OP, domain=DOMAIN, qmin=qmin, qmax=qmax
    )
