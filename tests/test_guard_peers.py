"""The guard's peers: the engine's int8 split on the exported FP SRResNet (which convs, where the
QDQ pairs sit, how close it stays to fp32), OpenVINO's fp32 runner against ONNX Runtime, and the
verdicts of checks without floors. Small graphs (24-px patches) keep it fast."""

from __future__ import annotations

import numpy as np
import pytest

PATCH = 24


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The bundled FP SRResNet, its 24-px sr.onnx, and ORT's whole and split int8 graphs of it,
    built in a private cache."""
    import os

    from refqsr_engine.benchmarks import configs
    from refqsr_engine.models.checkpoint import load_model

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("REFQSR_ENGINE_CACHE")
    os.environ["REFQSR_ENGINE_CACHE"] = str(cache)
    try:
        fp = configs.prepare_onnx(str(configs.fp_source()), PATCH)["onnx"]
        split = configs.prepare_ort_static(fp, PATCH, split=True)["onnx"]
        whole = configs.prepare_ort_static(fp, PATCH)["onnx"]
    finally:
        if old is None:
            del os.environ["REFQSR_ENGINE_CACHE"]
        else:
            os.environ["REFQSR_ENGINE_CACHE"] = old
    model = load_model(configs.fp_source())[0].eval()
    return {"model": model, "fp32": fp, "split": split, "whole": whole}


def _block_convs(model) -> list[str]:
    """The PyTorch model's convs inside residual blocks (module names)."""
    import torch

    return [
        f"blocks.{k}.{name}"
        for k, block in enumerate(model.blocks)
        for name, m in block.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]


def _photo_patches(n: int = 2) -> np.ndarray:
    """LR patches cut from the benchmark's LR photo (real image content, not noise)."""
    from refqsr_engine.benchmarks.configs import make_lr

    lr = make_lr(96, 64)
    return np.ascontiguousarray(np.stack([lr[:, :PATCH, k * PATCH : (k + 1) * PATCH] for k in range(n)]))


def test_split_picks_exactly_the_body_convs(graphs):
    import onnx
    from refqsr_engine.benchmarks.qdq_split import body_conv_nodes

    g = onnx.load(graphs["fp32"])
    picked = body_conv_nodes(g)
    block_convs = _block_convs(graphs["model"])
    assert len(picked) == len(block_convs) == 2 * len(graphs["model"].blocks) == 32
    convs = [n for n in g.graph.node if n.op_type == "Conv"]
    all_torch_convs = [m for m in graphs["model"].modules() if m.__class__.__name__ == "Conv2d"]
    assert len(convs) == len(all_torch_convs)  # 37: head, 32 block convs, body end, 2 upsampler, tail
    # every block's two convs, each once; nothing of the head, body end, upsampler or tail
    blocks = sorted(n.split("/")[2] for n in picked)
    assert blocks == sorted([f"blocks.{k}" for k in range(16)] * 2)
    shapes = {i.name: tuple(i.dims) for i in g.graph.initializer}
    by_name = {n.name: n for n in convs}
    assert all(shapes[by_name[n].input[1]] == (64, 64, 3, 3) for n in picked)
    assert len(set(picked)) == len(picked)


def test_split_qdq_feeds_only_the_body_convs_and_stays_close_to_fp32(graphs, tmp_path):
    import onnx
    import onnxruntime as ort
    from refqsr_engine.benchmarks.configs import OrtRunner
    from refqsr_engine.benchmarks.qdq_split import body_conv_nodes

    q = onnx.load(graphs["split"])
    body = set(body_conv_nodes(onnx.load(graphs["fp32"])))
    produced_by = {o: n for n in q.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in q.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    dq_acts = 0
    for dq in (n for n in q.graph.node if n.op_type == "DequantizeLinear"):
        qn = produced_by.get(dq.input[0])
        if qn is None:  # weights and biases: read by body convs only
            assert {r.name for r in readers[dq.output[0]]} <= body
            continue
        dq_acts += 1
        assert qn.op_type == "QuantizeLinear"
        src = produced_by.get(qn.input[0])
        if src is not None and src.name in body:
            continue  # a body conv's output, requantized (what lets the runtimes fuse int8 convs)
        assert {r.name for r in readers[dq.output[0]]} <= body, dq.name
    # every body conv reads a dequantized input and weight; every other conv reads neither
    for conv in (n for n in q.graph.node if n.op_type == "Conv"):
        from_dq = [i in produced_by and produced_by[i].op_type == "DequantizeLinear" for i in conv.input[:2]]
        assert all(from_dq) if conv.name in body else not any(from_dq), conv.name
    assert dq_acts >= 2 * len(body)

    x = _photo_patches()

    def run(path):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})[0]

    ref, split, whole = run(graphs["fp32"]), run(graphs["split"]), run(graphs["whole"])

    def psnr(a):
        return 10 * np.log10(1.0 / np.mean((np.clip(a, 0, 1) - np.clip(ref, 0, 1)) ** 2))

    assert psnr(split) > 30.0  # int8 body convs: close to fp32 (34.4 dB here), not equal
    assert np.abs(split - ref).max() > 1e-4
    assert psnr(split) > psnr(whole) + 5  # fp32 head, upsampler, tail, skips: 34.4 vs 24.4 dB
    # ORT fuses the split's QDQ pairs into integer convs: one per body conv
    runner = OrtRunner(graphs["split"], 2, str(tmp_path / "opt.onnx"))
    assert runner.integer_ops == len(body)


def test_openvino_fp32_matches_onnxruntime(graphs):
    pytest.importorskip("openvino")
    import onnxruntime as ort
    from refqsr_engine.benchmarks.ov_runner import OvRunner

    x = _photo_patches(3)
    s = ort.InferenceSession(graphs["fp32"], providers=["CPUExecutionProvider"])
    ref = s.run(None, {s.get_inputs()[0].name: x})[0]
    out = OvRunner(graphs["fp32"], 2, batch=2, patch=PATCH).sr(x)  # 3 patches: a padded second batch
    assert out.shape == ref.shape == (3, 3, 4 * PATCH, 4 * PATCH)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_openvino_runs_the_split_graph_on_int8_convs(graphs):
    pytest.importorskip("openvino")
    import onnx
    from refqsr_engine.benchmarks.ov_runner import OvRunner
    from refqsr_engine.benchmarks.qdq_split import body_conv_nodes

    prims = OvRunner(graphs["split"], 2, batch=1, patch=PATCH).conv_primitives()
    int8 = sum(n for k, n in prims.items() if k.endswith("_I8"))
    assert int8 == len(body_conv_nodes(onnx.load(graphs["fp32"]))), prims
    assert sum(prims.values()) == 37


def test_judge_reports_new_checks_without_floors():
    from refqsr_engine.benchmarks.guard import judge

    measured = {
        "end_to_end": {"ratio": 2.5},
        "engine_network": {"seconds": 0.4, "psnr_y": 27.0},
        "peer_ov_int8": {"ratio": 0.8, "seconds": 0.32},
        "peer_ov_fp32": {"skipped": "openvino not installed"},
    }
    verdicts = judge(measured, {"end_to_end": 2.0, "peer_ov_int8": 1.0}, 0.15)
    assert verdicts == {
        "end_to_end": "ok",
        "peer_ov_int8": "REGRESSION",  # 0.8 < 1.0 * 0.85
        "peer_ov_fp32": "skipped: openvino not installed",
    }
    assert judge(measured, {}, 0.15)["peer_ov_int8"] == "no floor yet"


def test_quality_is_computed_once_per_key_and_kept(tmp_path):
    from refqsr_engine.benchmarks.peers import QualityCache, mean_psnr_y
    from refqsr_engine.metrics import bicubic_degrade

    rng = np.random.default_rng(0)
    hr = (rng.random((32, 48, 3)) * 255).astype(np.uint8)
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.fromarray(hr).save(tmp_path / "photos" / "a.png")
    calls = []

    def nearest(lr):  # LR C x H x W in [0, 1] -> 4x nearest
        calls.append(lr.shape)
        return lr.repeat(4, axis=1).repeat(4, axis=2)

    def compute():
        return mean_psnr_y(nearest, tmp_path / "photos")

    cache = QualityCache(tmp_path / "q.json")
    first, fresh = cache.get("k", compute)
    assert fresh and calls == [(3, 8, 12)]
    # independent: PSNR on BT.601 Y of the 8-bit nearest upscale, 4 px shaved
    sr = bicubic_degrade(hr, 4).astype(np.float64).repeat(4, 0).repeat(4, 1)
    w = np.array([65.481, 128.553, 24.966]) / 255.0
    y_sr, y_hr = (16 + sr @ w)[4:-4, 4:-4], (16 + hr.astype(np.float64) @ w)[4:-4, 4:-4]
    assert first == pytest.approx(10 * np.log10(255.0**2 / np.mean((y_sr - y_hr) ** 2)), abs=1e-6)
    again, fresh = QualityCache(tmp_path / "q.json").get("k", compute)
    assert (again, fresh) == (first, False) and len(calls) == 1


def test_peers_without_openvino_are_skipped_with_a_note(monkeypatch):
    import sys

    from refqsr_engine.benchmarks.ov_runner import MISSING, openvino_missing
    from refqsr_engine.benchmarks.peers import make_runner

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    assert openvino_missing() == MISSING == "openvino not installed (pip install '.[bench]')"
    assert make_runner("ov_int8", {"int8": "unused.onnx"}, 2, 8, 96, "unused") == MISSING


def test_guard_refuses_a_missing_quality_folder_and_unknown_checks(tmp_path, capsys):
    from refqsr_engine.benchmarks.guard import main

    assert main(["--checks", "peers", "--quality", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quality" in err and "no such folder" in err
    assert main(["--checks", "peers,nope"]) == 2
    assert "unknown check(s) nope" in capsys.readouterr().err
