"""RefQSR's shared matching (``matching="shared"``): one 8-bit cosine flow per query, from the
input of block 1, used by every RefER. Checked against independent computations: a numpy
cosine arg-max, the backbone's own blocks run by hand, hand-counted BitOPs, ONNX Runtime and the
compiled engine against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from compile_helpers import (
    PATCH,
    assert_compiled_image_matches,
    assert_images_match,
    compile_saved,
    ort_session,
    small_refqsr,
)
from refqsr_engine.engine.compiler.onnx_prep import prepare_onnx
from refqsr_engine.engine.compiler.refer_fuse import MATCHER_SCOPE, SHARED_FLOW_OP, WARP_OP, fuse_refer_warps
from refqsr_engine.engine.compiler.relax_import import static_input_shapes
from refqsr_engine.export.onnx_export import export_refqsr
from refqsr_engine.models.bitops import count_bitops
from refqsr_engine.models.checkpoint import load_model, save_model
from refqsr_engine.models.matching import cosine_cells, shared_flow
from refqsr_engine.models.refqsr import MATCH_BLOCK
from refqsr_engine.models.registry import build_refqsr


@pytest.fixture(scope="module")
def model():
    return small_refqsr("ddtb", matching="shared")


def _numpy_cosine_argmax(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """First arg-max over reference cells of the cosine of 3x3-mean-pooled unit pixel vectors."""

    def cells(f):
        n, c, h, w = f.shape
        u = f / np.linalg.norm(f, axis=1, keepdims=True)
        p = u.reshape(n, c, h // 3, 3, w // 3, 3).mean(axis=(3, 5)).reshape(n, c, -1)
        return p / np.linalg.norm(p, axis=1, keepdims=True)

    return np.einsum("nci,ncj->nij", cells(q.astype(np.float64)), cells(r.astype(np.float64))).argmax(axis=2)


def test_cosine_cells_are_the_8_bit_unit_cells_and_the_flow_follows_their_argmax():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 18, 24, generator=g)
    r = torch.roll(q, shifts=(3, 6), dims=(2, 3)) + 0.2 * torch.randn(2, 16, 18, 24, generator=g)
    cells = cosine_cells(q)
    assert cells.abs().max() <= 127 and torch.equal(cells, cells.round())
    norms = cells.flatten(2).norm(dim=1)
    assert float((norms - 127).abs().max()) < 0.6 * np.sqrt(16)  # unit vectors on a 1/127 grid
    flow = shared_flow(q, r)
    best = _numpy_cosine_argmax(q.numpy(), r.numpy())
    # at the pooled cell centres (3k + 1) the flow is the displacement to the numpy arg-max cell
    w_cells = 24 // 3
    centre = flow[:, :, 1::3, 1::3].flatten(2).numpy()  # [N, 2, cells]
    i = np.arange(best.shape[1])
    want = np.stack([3 * (best % w_cells - i % w_cells), 3 * (best // w_cells - i // w_cells)], axis=1)
    assert (np.abs(centre - want).max(axis=1) < 1e-4).mean() > 0.98  # 8-bit rounding may flip a near tie


def test_reference_features_end_with_the_input_of_block_1(model):
    x = torch.rand(3, 3, PATCH, PATCH)
    net = model.backbone
    with torch.no_grad():
        _, feats = model.reference_forward(x)
        block1_input = net.blocks[0](net.head(x), model.high)
    assert model.n_reference_features == len(feats) == model.n_refer + 1
    torch.testing.assert_close(feats[-1], block1_input, rtol=0, atol=0)
    assert not any(".match_quant." in k for k in model.state_dict())  # no per-RefER matching


def test_one_flow_per_query_reaches_every_refer(model):
    """The matcher runs once per query call on (query block-1 input, reference block-1 input);
    each RefER warps its own reference feature by that flow."""
    x = torch.rand(2, 3, PATCH, PATCH)
    ref = torch.roll(x, shifts=(6, 3), dims=(2, 3))
    flows, calls = [], []
    hook = model.matcher.register_forward_hook(lambda m, i, o: flows.append((i, o)))
    for r in model.refers:  # record the flow each RefER aligns its reference with
        r.align = lambda q, f, hard, flow, orig=r.align: calls.append(flow) or orig(q, f, hard, flow)
    try:
        with torch.no_grad():
            _, feats = model.reference_forward(ref)
            model.query_forward(x, feats)
            _, own = model.reference_forward(x)
    finally:
        hook.remove()
        for r in model.refers:
            del r.align
    assert len(flows) == 1 and len(calls) == model.n_refer
    (q_in, r_in), flow = flows[0]
    torch.testing.assert_close(r_in, feats[-1], rtol=0, atol=0)
    assert torch.equal(q_in, own[-1])  # the query's block-1 input is computed at b_high, as the reference's
    assert all(c is flow for c in calls)
    torch.testing.assert_close(flow, shared_flow(own[-1], feats[-1]), rtol=0, atol=0)


def test_self_reference_and_aligned_give_zero_flow(model):
    x = torch.rand(2, 3, PATCH, PATCH)
    seen = []
    h = model.matcher.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model.query_forward(x, None)
        model.query_forward(x, model.reference_forward(x)[1])
    h.remove()
    assert len(seen) == 2 and all(not bool(f.any()) for f in seen)


def test_checkpoint_round_trip_and_old_files_default_to_paper(tmp_path, model):
    save_model(tmp_path / "m.pt", model, {}, half=False)
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.matching == "shared" and loaded.matcher is not None
    x = torch.rand(2, 3, PATCH, PATCH)
    with torch.no_grad():
        a = model.query_forward(x, model.reference_forward(x)[1])
        b = loaded.query_forward(x, loaded.reference_forward(x)[1])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    paper = small_refqsr("ddtb")
    save_model(tmp_path / "p.pt", paper, {}, half=False)
    raw = torch.load(tmp_path / "p.pt", weights_only=False)
    raw["config"].pop("matching")  # as written before shared matching existed
    torch.save(raw, tmp_path / "p.pt")
    assert load_model(tmp_path / "p.pt")[0].matching == "paper"


def test_bad_matching_is_refused():
    with pytest.raises(ValueError, match="matching must be one of"):
        build_refqsr("srresnet", "ddtb", 8, 4, n_blocks=4, matching="nearest")


def test_bitops_count_one_8_bit_cost_volume_per_query():
    """72-px patches: 24 x 24 pooled cells each side, 64 channels. Paper matching: two RefER cost
    volumes at 4 bits; shared: one at 8 bits. BitOPs = 2 * MACs * (b/32)^2."""
    kw = dict(
        arch="srresnet",
        lr_size=(72, 72),
        bits="8-4",
        patch=72,
        overlap=6,
        grid="engine",
        is_reference=[False],
        reference_of=[0],
    )
    paper = count_bitops(**kw, matching="paper").as_dict()
    shared = count_bitops(**kw, matching="shared").as_dict()
    macs = (24 * 24) ** 2 * 64
    assert paper["cost_volume_g"] == pytest.approx(round(2 * 2 * macs * (4 / 32) ** 2 / 1e9, 4))
    assert shared["cost_volume_g"] == pytest.approx(round(2 * macs * (8 / 32) ** 2 / 1e9, 4))
    assert shared["bitops_g"] - paper["bitops_g"] == pytest.approx((2 * macs / 16 - 4 * macs / 64) / 1e9, abs=1e-3)


def test_onnx_runtime_runs_the_shared_graph_as_pytorch(tmp_path, model):
    paths = export_refqsr(model, tmp_path, PATCH)
    x, q = torch.rand(3, 3, PATCH, PATCH), torch.rand(5, 3, PATCH, PATCH)
    with torch.no_grad():
        _, feats = model.reference_forward(x)
        gathered = [f[[0, 2, 1, 0, 2]] for f in feats]
        want = model.query_forward(q, gathered, hard=True)
    feeds = {"patches": q.numpy(), **{f"ref_feat_{k}": g.numpy() for k, g in enumerate(gathered)}}
    assert len(feeds) == model.n_refer + 2
    assert_images_match(ort_session(paths["query"], False).run(None, feeds)[0], want.numpy())


def test_fuse_leaves_one_shared_flow_and_a_warp_per_refer(tmp_path, model):
    paths = export_refqsr(model, tmp_path, PATCH)
    graph = onnx.load(str(paths["query"]))
    prepared = prepare_onnx(graph, static_input_shapes(graph, 4))
    assert fuse_refer_warps(prepared) == model.n_refer
    ops = [n.op_type for n in prepared.graph.node]
    assert ops.count(SHARED_FLOW_OP) == 1 and ops.count(WARP_OP) == model.n_refer
    assert "ArgMax" not in ops and "GatherElements" not in ops and "MatMul" not in ops
    assert not any(n.name.startswith(MATCHER_SCOPE) and n.op_type != SHARED_FLOW_OP for n in prepared.graph.node)
    flow_node = next(n for n in prepared.graph.node if n.op_type == SHARED_FLOW_OP)
    assert flow_node.input[1] == f"ref_feat_{model.n_refer}"
    warp_refs = sorted(n.input[0] for n in prepared.graph.node if n.op_type == WARP_OP)
    assert warp_refs == [f"ref_feat_{k}" for k in range(model.n_refer)]


def test_compiled_engine_upscales_as_pytorch(tmp_path, model):
    from skimage import data

    artifact, report = compile_saved(model, tmp_path, PATCH, 4)
    assert report["graphs"]["query"]["refer_warps"] == model.n_refer
    lr = data.astronaut()[100:160, 180:250].astype(np.float32).transpose(2, 0, 1) / 255.0
    assert_compiled_image_matches(model, artifact, lr, PATCH, 4)


def test_match_block_is_computed_at_b_high_on_both_paths(model):
    assert MATCH_BLOCK == 1 and model.query_block_bits()[0] == model.high


def test_cuda_build_fuses_the_matcher_and_its_twin_equals_onnxruntime(tmp_path, model):
    """The CUDA import collapses the shared matcher and every warp into our kernels; the graph as
    the CUDA build rewrites it, built for the CPU (with the CPU kernels, whose GPU schedules
    tests/test_kernels_refer_cuda.py checks), returns ONNX Runtime's image."""
    import tvm
    from refqsr_engine.engine.compiler import cuda_build as cb
    from refqsr_engine.kernels import cuda_toolchain
    from tvm import relax

    if not cuda_toolchain.nvcc_available():
        pytest.skip("nvcc is not on PATH: CUDA artifacts cannot be built")
    paths = export_refqsr(model, tmp_path, PATCH)
    graph = onnx.load(str(paths["query"]))
    assert cb.import_graph_cuda(graph, 4)[2] == model.n_refer
    exe, result = cb.build_graph_twin(graph, 4)
    assert "s8mma" in [c.variant for c in result.convs]
    x = torch.rand(4, 3, PATCH, PATCH)
    with torch.no_grad():
        feats = model.reference_forward(torch.roll(x, shifts=(3, 6), dims=(2, 3)))[1]
    feeds = {"patches": x.numpy(), **{f"ref_feat_{k}": f.numpy() for k, f in enumerate(feats)}}
    want = ort_session(paths["query"], False).run(None, feeds)[0]
    out = relax.VirtualMachine(exe, tvm.cpu())["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in graph.graph.input])
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    assert_images_match(got, want)
