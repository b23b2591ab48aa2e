"""Collapse each RefER's matching-and-warping subgraph into one ``refqsr.RefERWarp`` node.

The exported query graph spells RefER's hard matching out in standard ONNX (ReduceL2, AveragePool,
QDQ of the match quantizer, MatMul, ArgMax, Resize, GatherElements ...) so that ONNX Runtime runs
it. The engine runs our own kernel instead (:func:`refqsr_engine.kernels.refer_kernels.
refer_pipeline_primfunc`, bit-exact with the PyTorch twin), so before the Relax import the
subgraph that computes the aligned reference feature of RefER k -- everything in the ``/refers.k/``
scope that feeds the difference ``query - aligned`` and is not the refinement convs -- becomes

    aligned = refqsr.RefERWarp(query, reference, scale, zero_point)   attrs: qmin, qmax

with the match quantizer's (folded, static) scale and zero point and its integer grid. The Relax
importer gets a converter for that op (:func:`refer_warp_converter`).
"""
from __future__ import annotations

import re
from collections import deque

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import RefQSRError

DOMAIN = "refqsr"
OP = "RefERWarp"
_REFINEMENT = ("conv1/", "conv2/", "act/")


def _scope_of(name: str) -> str | None:
    m = re.match(r"^(.*?/refers\.\d+/)", name)
    return m.group(1) if m else None


def _difference_node(graph: onnx.GraphProto, scope: str, consumers: dict[str, list[onnx.NodeProto]]) -> onnx.NodeProto:
    """The ``query - aligned`` Sub directly in ``scope`` whose result feeds the refinement conv1."""
    for node in graph.node:
        if node.op_type == "Sub" and node.name.startswith(scope) and "/" not in node.name[len(scope):]:
            if any(c.name.startswith(scope + "conv1/") for c in consumers.get(node.output[0], [])):
                return node
    raise RefQSRError(f"{scope}: cannot find the RefER difference (query - aligned) in the graph")


def fuse_refer_warps(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` (prepared: constants folded, Clip split) in place; returns the count."""
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    scopes = sorted({s for n in graph.node if (s := _scope_of(n.name))})
    fused = 0
    for scope in scopes:
        diff = _difference_node(graph, scope, consumers)
        query, aligned = diff.input[0], diff.input[1]
        # the warp subgraph: ancestors of `aligned` inside the scope, refinement excluded
        sub: dict[str, onnx.NodeProto] = {}
        todo = deque([aligned])
        while todo:
            name = todo.popleft()
            node = producer.get(name)
            if node is None or node.name in sub or not node.name.startswith(scope):
                continue
            if node.name[len(scope):].startswith(_REFINEMENT):
                continue
            sub[node.name] = node
            todo.extend(i for i in node.input if i)
        outside_inputs = {i for n in sub.values() for i in n.input if i and (producer.get(i) is None or producer[i].name not in sub)}
        feats = [i for i in outside_inputs if i not in values]
        if query not in feats or len(feats) != 2:
            raise RefQSRError(f"{scope}: the warp subgraph should read the query and one reference feature, reads {sorted(feats)}")
        reference = next(i for i in feats if i != query)
        for n in sub.values():  # nothing computed here may be used outside the subgraph
            for o in n.output:
                if o != aligned and any(c.name not in sub for c in consumers.get(o, [])):
                    raise RefQSRError(f"{scope}: {o} is used outside the RefER warp subgraph")
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
        node = helper.make_node(OP, [query, reference, s_name, z_name], [aligned], name=scope + OP,
                                domain=DOMAIN, qmin=qmin, qmax=qmax)
        keep = []
        inserted = False
        for n in graph.node:
            if n.name in sub:
                if not inserted:
                    keep.append(node)
                    inserted = True
                continue
            keep.append(n)
        # the fused node must come after both feature producers: put it just before the Sub
        keep.remove(node)
        keep.insert(keep.index(diff), node)
        del graph.node[:]
        graph.node.extend(keep)
        producer = {o: n for n in graph.node for o in n.output}
        fused += 1
    if fused and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return fused
