"""ONNX -> Relax import details that matter for speed: the quantizers' per-sample clip."""

from __future__ import annotations

import numpy as np
import tvm
from onnx import TensorProto, helper
from refqsr_engine.engine.compiler.relax_import import import_graph
from tvm import relax


def _clip_graph() -> helper.ModelProto:
    """y = Min(Max(x, lo), hi) with per-sample bounds, as the DDTB quantizers export it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 8])
    lo = helper.make_tensor_value_info("lo", TensorProto.FLOAT, [2, 1, 1, 1])
    hi = helper.make_tensor_value_info("hi", TensorProto.FLOAT, [2, 1, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 8])
    nodes = [helper.make_node("Max", ["x", "lo"], ["m"]), helper.make_node("Min", ["m", "hi"], ["y"])]
    graph = helper.make_graph(nodes, "clip", [x, lo, hi], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_per_sample_clip_imports_as_pairwise_ops_and_matches_numpy():
    shapes = {"x": [2, 3, 4, 8], "lo": [2, 1, 1, 1], "hi": [2, 1, 1, 1]}
    mod, _ = import_graph(_clip_graph(), shapes)
    text = mod.script()
    # no broadcast_to + stack + reduce (two full-size copies and a serial reduction per clip)
    assert "R.stack" not in text and "R.broadcast_to" not in text
    assert "R.maximum" in text and "R.minimum" in text
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    x = rng.normal(size=shapes["x"]).astype(np.float32)
    lo = np.array([-0.5, -1.0], np.float32).reshape(2, 1, 1, 1)
    hi = np.array([0.25, 2.0], np.float32).reshape(2, 1, 1, 1)
    got = vm["main"](*(tvm.runtime.tensor(a, tvm.cpu()) for a in (x, lo, hi))).numpy()
    np.testing.assert_array_equal(got, np.minimum(np.maximum(x, lo), hi))


def test_constant_scalar_gathers_become_slices_and_match_numpy():
    """DDTB's gate reads factors[:, 0] and factors[:, -1]: no take(mode="fast") (and its warning)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])
    inits = [
        helper.make_tensor("k0", TensorProto.INT64, [], [0]),
        helper.make_tensor("km1", TensorProto.INT64, [], [-1]),
    ]
    nodes = [
        helper.make_node("Gather", ["x", "k0"], ["a"], axis=1),
        helper.make_node("Gather", ["x", "km1"], ["b"], axis=1),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [a, b], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    mod, _ = import_graph(model, {"x": [3, 2]})
    assert "R.take" not in mod.script()
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    xv = np.arange(6, dtype=np.float32).reshape(3, 2)
    got_a, got_b = vm["main"](tvm.runtime.tensor(xv, tvm.cpu()))
    np.testing.assert_array_equal(got_a.numpy(), xv[:, 0])
    np.testing.assert_array_equal(got_b.numpy(), xv[:, -1])
