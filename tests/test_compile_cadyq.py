"""CADyQ and CABM SR networks and δ-RefQSR (bits chosen per patch and layer) through export and
the compiled engine: the ONNX graphs in ONNX Runtime and the compiled artifact give PyTorch's
images and the bits PyTorch chose, and `upscale` reports the BitOPs of those bits."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from compile_helpers import compile_saved, psnr, small_refqsr
from PIL import Image
from refqsr_engine.export.onnx_export import export_refqsr, export_sr
from refqsr_engine.models.cabm import attach_cabm, build_cabm_table
from refqsr_engine.models.qconv import QuantConv2d
from refqsr_engine.models.quant_cadyq import Delta, Selection, dynamic_convs, image_gradient_features
from refqsr_engine.models.registry import build_sr
from refqsr_engine.pipeline.tiling import extract_patches, make_grid
from test_cadyq import _photo_lr, grad_selector

PATCH = 24


def _photo_patches() -> torch.Tensor:
    lr = _photo_lr(80)
    grid = make_grid(lr.shape[1], lr.shape[2], PATCH, 2)
    return torch.from_numpy(np.ascontiguousarray(extract_patches(lr, grid, list(range(grid.num_patches))), np.float32))


def split_photo_in_thirds(model: torch.nn.Module) -> None:
    """Set every selector to give the photo's patches 4, 6 or 8 bits by thirds of their gradient."""
    g = image_gradient_features(_photo_patches()).sum(dim=1)
    t1, t2 = (float(torch.quantile(g, q)) for q in (1 / 3, 2 / 3))
    for k, conv in enumerate(dynamic_convs(model)):
        grad_selector(conv, t1 + k, t2 + k)


def delta_net(table: bool, n_blocks: int = 4) -> torch.nn.Module:
    """A small CADyQ SRResNet with set activation ranges and selectors whose choices differ between
    the patches of a photo; ``table``: CABM, a lookup table calibrated from those selectors."""
    torch.manual_seed(0)
    net = build_sr("srresnet", "cadyq", n_blocks=n_blocks, n_feats=8)
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, PATCH, PATCH), Delta())  # PAMS ranges from a first batch
    net.eval()
    split_photo_in_thirds(net)
    if table:
        attach_cabm(net, build_cabm_table(net, _photo_patches(), n_bins=4))
    return net


def delta_refqsr() -> torch.nn.Module:
    model = small_refqsr("cadyq", 8, 3)
    split_photo_in_thirds(model)
    model.tau = 0.7
    return model


def chosen(sel: Selection) -> np.ndarray:
    return sel.chosen_bits().numpy()


def torch_run(net: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    sel = Selection()
    with torch.no_grad():
        hr = net(x, sel)
    return hr.numpy(), chosen(sel)


def upscale_both_engines(tmp_path, monkeypatch, model_file) -> tuple[dict, np.ndarray, np.ndarray]:
    """`upscale` of the photo with the PyTorch and the compiled engine: (reports, tvm image, torch image)."""
    from refqsr_engine.engine.upscale import UpscaleOptions, Upscaler

    monkeypatch.setenv("REFQSR_ENGINE_CACHE", str(tmp_path / "cache"))
    lr = np.round(_photo_lr(80).transpose(1, 2, 0) * 255).astype(np.uint8)
    Image.fromarray(lr).save(tmp_path / "in.png")
    reports = {}
    for engine in ("torch", "tvm"):
        up = Upscaler(UpscaleOptions(model=str(model_file), engine=engine, patch=PATCH, overlap=2, batch=4))
        reports[engine] = up.upscale_file(tmp_path / "in.png", tmp_path / f"{engine}.png")
    got, want = (np.asarray(Image.open(tmp_path / f"{e}.png"), dtype=int) for e in ("tvm", "torch"))
    return reports, got, want


def quantized(*modules: torch.nn.Module) -> int:
    return sum(isinstance(m, QuantConv2d) for module in modules for m in module.modules())


@pytest.mark.parametrize("table", [False, True], ids=["cadyq", "cabm"])
def test_delta_graph_in_onnx_runtime_equals_pytorch(tmp_path, table):
    net = delta_net(table)
    x = _photo_patches()
    want_hr, want_bits = torch_run(net, x)
    assert len(np.unique(want_bits)) > 1  # the patches do choose differently
    path = export_sr(net, Delta(), tmp_path, PATCH)["sr"]
    hr, bits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"patches": x.numpy()})
    np.testing.assert_array_equal(bits, want_bits)
    assert_close_but_for_tie_flips(hr, want_hr, atol=2e-4)


def assert_close_but_for_tie_flips(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    """``got`` equals ``want`` within ``atol`` except where a quantizer rounded a value lying on a
    .5 tie the other way. ONNX Runtime and PyTorch sum convolutions in different orders, and which
    way such a value rounds depends on the CPU's float kernels; one flipped 4-to-8-bit step moves
    only the outputs in its receptive field (at most a few hundred of these 442,368 values), by a
    few output levels at most. So: at most 0.2 % of the values beyond ``atol``, none beyond 0.02
    (about 5 levels of 8 bits). A wrong scale, zero point or bit choice moves most values."""
    off = np.abs(got - want) > atol
    assert off.mean() <= 2e-3, f"{int(off.sum())} of {off.size} values beyond atol {atol}"
    np.testing.assert_allclose(got, want, atol=0.02)


@pytest.mark.parametrize("table", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["cadyq", "cabm"])
def test_compiled_delta_network_upscales_as_pytorch_and_counts_the_chosen_bits(tmp_path, monkeypatch, table):
    """`upscale` on the compiled engine: the image of the PyTorch engine (within one level), every
    quantized conv an integer kernel with per-patch scales, and the BitOPs of the bits chosen."""
    from refqsr_engine.engine.runtime import CompiledModel

    net = delta_net(table, n_blocks=3)
    artifact, report = compile_saved(net, tmp_path, PATCH, 4)
    assert report["graphs"]["sr"]["integer_convs"] == quantized(*net.blocks)
    x = _photo_patches()
    hr, bits = CompiledModel.load(artifact)._run("sr", x.numpy())
    want_hr, want_bits = torch_run(net, x)
    np.testing.assert_array_equal(bits, want_bits)
    assert_close_but_for_tie_flips(hr, want_hr, atol=5e-4)
    reports, got, want = upscale_both_engines(tmp_path, monkeypatch, tmp_path / "model.pt")
    assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.99
    ops = {e: r["bitops"] for e, r in reports.items()}
    assert ops["tvm"] == ops["torch"] and 4.0 < ops["tvm"]["fqr"] < 8.0


def test_delta_refqsr_graphs_in_onnx_runtime_equal_pytorch(tmp_path):
    """δ-RefQSR's reference graph (δ) and query graph (first block and RefER convs at δ, the rest at
    b_low) return PyTorch's outputs and choices."""
    model = delta_refqsr()
    x = _photo_patches()
    paths = export_refqsr(model, tmp_path, PATCH)
    sel_r, sel_q = Selection(), Selection()
    with torch.no_grad():
        hr_r, feats = model.reference_forward(x, sel_r)
        hr_q = model.query_forward(x, feats, hard=True, selection=sel_q)
    bits_r, bits_q = chosen(sel_r), chosen(sel_q)
    assert len(np.unique(bits_r)) > 1 and len(np.unique(bits_q)) > 1
    session = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    hr, *got_feats, bits = session["reference"].run(None, {"patches": x.numpy()})
    # the same bits; values equal up to the odd rounding tie on an 8-bit grid (float op order)
    np.testing.assert_array_equal(bits, bits_r)
    assert psnr(hr, hr_r.numpy()) > 60
    for g, f in zip(got_feats, feats, strict=True):
        assert psnr(g / 8, f.numpy() / 8) > 60
    feeds = {"patches": x.numpy(), **{f"ref_feat_{k}": f.numpy() for k, f in enumerate(feats)}}
    hr, bits = session["query"].run(None, feeds)
    np.testing.assert_array_equal(bits, bits_q)
    assert psnr(hr, hr_q.numpy()) > 60


@pytest.mark.slow
def test_compiled_delta_refqsr_upscales_as_pytorch_and_counts_the_chosen_bits(tmp_path, monkeypatch):
    model = delta_refqsr()
    _, report = compile_saved(model, tmp_path, PATCH, 4)
    blocks, graphs = model.backbone.blocks, report["graphs"]
    # every quantized conv an integer kernel (per-patch scales at δ), each RefER's warp fused
    assert graphs["reference"]["integer_convs"] == quantized(*blocks)
    assert graphs["query"]["integer_convs"] == quantized(*blocks[: model.first_refer], *model.refers)
    assert graphs["query"]["refer_warps"] == model.n_refer
    reports, got, want = upscale_both_engines(tmp_path, monkeypatch, tmp_path / "model.pt")
    assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.99
    ops = {e: r["bitops"] for e, r in reports.items()}
    assert ops["tvm"] == ops["torch"] and 0 < ops["tvm"]["references"] < ops["tvm"]["patches"]
    assert 3.0 < ops["tvm"]["fqr"] < 8.0


@pytest.mark.slow
def test_cuda_build_of_delta_refqsr_runs_delta_convs_on_int8_mma_and_its_twin_equals_onnxruntime(tmp_path):
    """The CUDA artifact (nvcc, no GPU needed): every quantized conv of both paths an integer
    int8 tensor-core kernel with per-patch scales; the reference graph as the CUDA build rewrites it, built for
    the CPU, returns ONNX Runtime's image and exactly its chosen bits."""
    import onnx
    import tvm
    from refqsr_engine.engine.compiler import cuda_build as cb
    from refqsr_engine.engine.compiler.compile_model import compile_model
    from refqsr_engine.engine.compiler.options import CompileOptions
    from refqsr_engine.kernels import cuda_toolchain
    from refqsr_engine.models.checkpoint import save_model
    from tvm import relax

    if not cuda_toolchain.nvcc_available():
        pytest.skip("nvcc is not on PATH: CUDA artifacts cannot be built")
    model = delta_refqsr()
    save_model(tmp_path / "model.pt", model, {}, half=False)
    opts = CompileOptions(model=str(tmp_path / "model.pt"), target="cuda", arch="sm_80", patch=PATCH, batch=4)
    report = compile_model(opts, tmp_path / "artifact")
    blocks = model.backbone.blocks
    for name, n in (
        ("reference", quantized(*blocks)),
        ("query", quantized(*blocks[: model.first_refer], *model.refers)),
    ):
        graph = report["graphs"][name]
        assert graph["variants"].count("s8mma") == graph["integer_convs"] == n and graph["outputs"][-1] == "bits"
    graph = onnx.load(str(tmp_path / "artifact" / "reference.onnx"))
    exe, _ = cb.build_graph_twin(graph, 4)
    x = _photo_patches()[:4].numpy()
    hr, *_, bits = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x))
    want_hr, *_, want_bits = ort.InferenceSession(
        str(tmp_path / "artifact" / "reference.onnx"), providers=["CPUExecutionProvider"]
    ).run(None, {"patches": x})
    np.testing.assert_array_equal(bits.numpy(), want_bits)
    assert psnr(hr.numpy(), want_hr) >= 50.0
