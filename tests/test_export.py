"""ONNX export: ONNX Runtime runs the exported QDQ graphs and matches PyTorch; the graphs carry
integer weights, QDQ activations in 8-bit containers and per-conv bit metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from compile_helpers import assert_images_match, ort_session, small_refqsr
from onnx import numpy_helper
from refqsr_engine.errors import RefQSRError
from refqsr_engine.export.onnx_export import export_refqsr, export_sr
from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.models.qconv import BitSpec
from refqsr_engine.models.registry import build_refqsr, build_sr

PATCH = 24
N_BLOCKS = 4


def _model(scheme: str):
    # A 4-block network keeps the export quick; the slow test exports the full 16-block one.
    return small_refqsr(scheme, patch=PATCH)


@pytest.fixture(scope="module", params=["pams", "ddtb"])
def exported(request, tmp_path_factory):
    model = _model(request.param)
    paths = export_refqsr(model, tmp_path_factory.mktemp(request.param), PATCH)
    return request.param, model, paths


@pytest.mark.parametrize("optimize", [False, True])
def test_ort_matches_pytorch(exported, optimize):
    _, model, paths = exported
    torch.manual_seed(11)
    x = torch.rand(3, 3, PATCH, PATCH)
    q = torch.rand(5, 3, PATCH, PATCH)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        hr, feats = model.reference_forward(x)
        gathered = [f[[0, 2, 1, 0, 2]] for f in feats]
        hq = model.query_forward(q, gathered, hard=True)
        logits = model.clustblock(x)
    ref_out = ort_session(paths["reference"], optimize).run(None, {"patches": x.numpy()})
    assert_images_match(ref_out[0], hr.numpy())
    for got, want in zip(ref_out[1:], feats):
        rel = np.linalg.norm(got - want.numpy()) / np.linalg.norm(want.numpy())
        assert rel < 1e-2
    feeds = {"patches": q.numpy(), **{f"ref_feat_{k}": g.numpy() for k, g in enumerate(gathered)}}
    assert_images_match(ort_session(paths["query"], optimize).run(None, feeds)[0], hq.numpy())
    got = ort_session(paths["clustblock"], optimize).run(None, {"patches": x.numpy()})[0]
    np.testing.assert_allclose(got, logits.numpy(), rtol=1e-4, atol=1e-4)


def _initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Constant tensors: initializers and Constant nodes (the exporter emits both)."""
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return consts


def test_graph_structure_and_bit_metadata(exported):
    scheme, model, paths = exported
    graph = onnx.load(str(paths["query"]))
    assert graph.opset_import[0].version >= 17
    meta = {p.key: p.value for p in graph.metadata_props}
    convs = json.loads(meta["refqsr.convs"])
    kept = N_BLOCKS - 2
    # head + kept ResBlocks x 2 + 2 RefERs x 2 + body end + 2 upsampler convs + tail
    assert len(convs) == 1 + 2 * kept + 4 + 1 + 2 + 1
    bits = {c["module"]: (c["act_bits"], c["weight_bits"]) for c in convs}
    assert bits["model.backbone.blocks.0.conv1"] == (8, 8)
    assert all(bits[f"model.backbone.blocks.{k}.conv2"] == (4, 6) for k in range(1, kept))
    assert bits["model.refers.1.conv2"] == (8, 8)
    assert bits["model.backbone.tail"] == (32, 32)
    assert not any(f"blocks.{k}." in m for m in bits for k in range(kept, N_BLOCKS))
    producers = {o: n for n in graph.graph.node for o in n.output}
    inits = _initializers(graph.graph)
    nodes = {n.name: n for n in graph.graph.node}
    for c in convs:
        conv = nodes[c["node"]]
        x_src, w_src = producers.get(conv.input[0]), producers.get(conv.input[1])
        if c["act_bits"] == 32:
            assert w_src is None or w_src.op_type != "DequantizeLinear"
            continue
        assert x_src.op_type == "DequantizeLinear" and w_src.op_type == "DequantizeLinear"
        q_w = inits[w_src.input[0]]  # the weight is stored as integers
        assert q_w.dtype in (np.int8, np.uint8)
        b = c["weight_bits"]
        lo, hi = (-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1) if scheme == "pams" else (0, 2**b - 1)
        assert q_w.min() >= lo and q_w.max() <= hi
        assert producers[x_src.input[0]].op_type == "QuantizeLinear"
    assert meta["refqsr.patch"] == str(PATCH)


def test_low_bit_activations_use_few_levels(exported):
    """A 4-bit conv input in the exported graph takes at most 16 distinct integer values."""
    scheme, _, paths = exported
    graph = onnx.load(str(paths["query"]))
    convs = {c["node"]: c for c in json.loads({p.key: p.value for p in graph.metadata_props}["refqsr.convs"])}
    node = next(n for n in graph.graph.node if n.name in convs and convs[n.name]["act_bits"] == 4)
    producers = {o: n for n in graph.graph.node for o in n.output}
    q_name = producers[node.input[0]].input[0]  # DequantizeLinear's integer input
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(
            q_name, onnx.TensorProto.UINT8 if scheme == "ddtb" else onnx.TensorProto.INT8, None
        )
    )
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    torch.manual_seed(5)
    feeds = {"patches": np.random.rand(2, 3, PATCH, PATCH).astype(np.float32)}
    for k in range(2):
        feeds[f"ref_feat_{k}"] = np.random.randn(2, 64, PATCH, PATCH).astype(np.float32)
    q = sess.run([q_name], feeds)[0]
    assert len(np.unique(q)) <= 16 and len(np.unique(q)) >= 4


def test_fixed_precision_sr_export(tmp_path):
    torch.manual_seed(2)
    net = build_sr("srresnet", "ddtb", (8,), n_blocks=N_BLOCKS)
    net.train()
    net(torch.rand(2, 3, PATCH, PATCH), BitSpec(8, 8))
    net.eval()
    path = export_sr(net, BitSpec(8, 8), tmp_path, PATCH)["sr"]
    x = torch.rand(2, 3, PATCH, PATCH)
    with torch.no_grad():
        want = net(x, BitSpec(8, 8)).numpy()
    assert_images_match(ort_session(path, False).run(None, {"patches": x.numpy()})[0], want)


def test_export_refuses_bad_patch_and_uncalibrated_clustblock(tmp_path):
    model = build_refqsr("srresnet", "pams", 8, 4, ClustBlock(8))
    with pytest.raises(RefQSRError, match="multiple of 3"):
        export_refqsr(model, tmp_path, 25)
    with pytest.raises(RefQSRError, match="calibrated ClustBlock"):
        export_refqsr(model, tmp_path, 24)


@pytest.mark.slow
def test_full_size_refqsr_export(tmp_path):
    torch.manual_seed(3)
    clust = ClustBlock(16)
    clust.calibrate(torch.rand(6, 3, 48, 48))
    model = build_refqsr("srresnet", "pams", 8, 4, clust)
    model.train()
    model(torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48))
    model.eval()
    paths = export_refqsr(model, tmp_path, 48)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        hr, _ = model.reference_forward(x)
    got = ort_session(paths["reference"], False).run(None, {"patches": x.numpy()})[0]
    mse = float(np.mean((got - hr.numpy()) ** 2))
    assert 10 * np.log10(1 / mse) >= 50
