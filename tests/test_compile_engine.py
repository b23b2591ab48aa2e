"""The compiled engine end to end: a RefQSR model -> `compile` -> artifact -> compiled runtime,
checked against the PyTorch reference (same patches, same clustering), plus what the compiler must
guarantee: integer convs in the built code, our RefER kernel in place of the ONNX subgraph, the
clustering kernel's bucket padding, and artifacts that refuse the wrong target."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from compile_helpers import (
    PATCH,
    assert_compiled_image_matches,
    assert_images_match,
    close_patches,
    compile_saved,
    small_refqsr,
    torch_paths,
)
from refqsr_engine.cli.main import main
from refqsr_engine.engine.compiler.compile_model import compile_model
from refqsr_engine.engine.compiler.onnx_prep import prepare_onnx
from refqsr_engine.engine.compiler.options import CompileOptions
from refqsr_engine.engine.compiler.refer_fuse import OP, fuse_refer_warps
from refqsr_engine.engine.compiler.relax_import import static_input_shapes
from refqsr_engine.engine.runtime import CompiledModel
from refqsr_engine.errors import RefQSRError
from refqsr_engine.kernels.conv2d_int8 import target_has_avx512_vnni
from refqsr_engine.models.checkpoint import save_model
from refqsr_engine.models.clustblock import cluster_patches
from skimage import data

BATCH = 4


@pytest.fixture(scope="module", params=["ddtb", "pams"])
def compiled(request, tmp_path_factory):
    model = small_refqsr(request.param)
    return (
        request.param,
        model,
        *compile_saved(model, tmp_path_factory.mktemp(f"compiled_{request.param}"), PATCH, BATCH),
    )


def _lr_image() -> np.ndarray:
    return data.astronaut()[100:160, 180:250].astype(np.float32).transpose(2, 0, 1) / 255.0


def test_compiled_image_equals_pytorch(compiled):
    _, model, artifact, _ = compiled
    assert_compiled_image_matches(model, artifact, _lr_image(), PATCH, BATCH)


def test_reference_and_query_paths_each_match(compiled):
    _, model, artifact, _ = compiled
    engine = CompiledModel.load(artifact)
    refs, queries = close_patches(BATCH, PATCH)
    hr, feats = engine.reference(refs)
    want_hr, want_feats, want_q = torch_paths(model, refs, queries)
    assert_images_match(hr, want_hr)
    for f, wf in zip(feats, want_feats):  # a rounding tie may move a value by one quantization step
        close = np.abs(f - wf) <= 1e-2 * float(np.abs(wf).max())
        assert close.mean() >= 0.999
    assert_images_match(engine.query(queries, want_feats), want_q)
    # a short batch is padded inside the runtime and gives the same rows
    assert_images_match(engine.query(queries[:3], [w[:3] for w in want_feats]), want_q[:3])


def test_quantized_convs_are_integer_in_the_built_code(compiled):
    scheme, _, artifact, report = compiled
    for name, graph in report["graphs"].items():
        for bits, variant in zip(graph["act_bits"], graph["variants"]):
            assert (variant is None) == (bits == 32), (name, bits, variant)
    query = report["graphs"]["query"]
    assert query["refer_warps"] == 2
    # the artifact is built for this CPU: AVX-512 VNNI hosts get the zmm vpdpbusd kernel everywhere
    # (it is exact for every range here and costs the same per MAC at 4 and 8 bits), AVX2 hosts the
    # int16-chunk low-bit / pair kernels for the 4-bit blocks
    target = __import__("json").loads((artifact / "manifest.json").read_text())["target"]
    avx512 = target_has_avx512_vnni(target)
    if avx512:
        assert set(query["variants"]) == {None, "vnni512"}, query["variants"]
    else:
        assert "lowbit" in query["variants"] or "int8pair" in query["variants"]
    if shutil.which("objdump") is None:
        pytest.skip("objdump not available")
    asm = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(artifact / f"query_b{BATCH}.so")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    bodies = re.split(r"\n(?=[0-9a-f]+ <)", asm)
    qconv = "\n".join(b for b in bodies if re.match(r"[0-9a-f]+ <qconv_", b))
    assert qconv, "no qconv kernels in the library"
    if avx512:  # u8 x s8 quads summed exactly into int32 zmm lanes
        assert re.search(r"vpdpbusd\s+%zmm", qconv)
    else:
        assert "vpmaddwd" in qconv  # int32 accumulation of integer products
        assert "vpmaddubsw" in qconv  # u8 x s8 products of the low-bit kernels
    refer = "\n".join(b for b in bodies if re.match(r"[0-9a-f]+ <refer_warp", b))
    assert "vpmaddwd" in refer  # the cost volume on the integer grid


def test_refer_subgraph_becomes_our_kernel(compiled):
    _, _, artifact, _ = compiled
    model = onnx.load(str(artifact / "query.onnx"))
    prepared = prepare_onnx(model, static_input_shapes(model, BATCH))
    assert fuse_refer_warps(prepared) == 2
    ops = [n.op_type for n in prepared.graph.node]
    assert ops.count(OP) == 2
    for gone in ("ArgMax", "GatherElements", "ReduceL2", "AveragePool", "Resize"):
        assert gone not in ops


@pytest.mark.parametrize("n", [1, 37, 64, 65])
def test_cluster_kernel_bucket_padding_matches_pytorch(compiled, n):
    _, _, artifact, _ = compiled
    engine = CompiledModel.load(artifact)
    v = torch.randn(n, 16) * 3
    got = engine.cluster(v.numpy())
    want = cluster_patches(v, engine.tau)
    np.testing.assert_array_equal(got.reference_of, want.reference_of.numpy())
    np.testing.assert_array_equal(got.is_reference, want.is_reference.numpy())


def test_artifact_refuses_other_target(compiled):
    _, _, artifact, _ = compiled
    with pytest.raises(RefQSRError, match="target"):
        CompiledModel.load(artifact, target={"kind": "cuda", "arch": "sm_80"})


def test_compile_cli_rejects_bad_options(tmp_path):
    from refqsr_engine.engine.models_list import model_row
    from refqsr_engine.engine.models_store import DEFAULT_ALIAS

    runner = CliRunner()
    trained = model_row(DEFAULT_ALIAS)["bits"]  # the default model's bits, from its card
    for args, message in (
        (["--patch", "20"], "multiple of 3"),
        (["--model", str(tmp_path / "missing.pt")], "neither a bundled model"),
        (["--bits", "8" if trained != "8" else "4"], f"trained for {trained} bits"),
    ):
        result = runner.invoke(main, ["compile", *args, "-o", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


def test_upscale_cli_tvm_engine_compiles_once_and_matches_torch(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("REFQSR_ENGINE_CACHE", str(tmp_path / "cache"))
    model = small_refqsr("pams", seed=5)
    save_model(tmp_path / "m.pt", model, {}, half=False)
    lr = (_lr_image().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    Image.fromarray(lr).save(tmp_path / "in.png")
    common = [
        "--model",
        str(tmp_path / "m.pt"),
        "--patch",
        str(PATCH),
        "--batch",
        str(BATCH),
        "--threads",
        "2",
        "--json",
        "--quiet",
    ]
    runner = CliRunner()
    reports, stderr = [], []
    for engine, out, quiet in (("tvm", "tvm1.png", []), ("tvm", "tvm2.png", []), ("torch", "torch.png", ["-q"])):
        argv = ["upscale", str(tmp_path / "in.png"), str(tmp_path / out), "--engine", engine, *common[:-1], *quiet]
        result = runner.invoke(main, argv)
        assert result.exit_code == 0, result.output
        reports.append(__import__("json").loads(result.stdout))
        stderr.append(result.stderr)
    assert reports[0]["compiled_now"] and not reports[1]["compiled_now"]  # cached after the first run
    # the first use announces the compile (what, for which device, where cached) and numbers its stages
    cache = str(tmp_path / "cache")
    assert "compiling m for this CPU (" in stderr[0] and "first use" in stderr[0] and cache in stderr[0]
    assert "[1/" in stderr[0] and "writing the artifact" in stderr[0], stderr[0]
    assert "compiling" not in stderr[1] and stderr[2] == ""
    assert reports[0]["references"] == reports[2]["references"]
    got = np.asarray(Image.open(tmp_path / "tvm2.png"), dtype=np.int16)
    want = np.asarray(Image.open(tmp_path / "torch.png"), dtype=np.int16)
    assert got.shape == want.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
    assert np.mean(np.abs(got - want) <= 1) >= 0.999
    # the cached engine on a 16-bit grayscale PNG: written back as 16-bit gray
    gray16 = lr[..., 1].astype(np.uint16) * 257
    la = Image.fromarray(gray16).convert("I;16")
    la.save(tmp_path / "g16.png")
    result = runner.invoke(main, ["upscale", str(tmp_path / "g16.png"), str(tmp_path / "g16_x4.png"), *common])
    assert result.exit_code == 0 and not __import__("json").loads(result.output)["compiled_now"], result.output
    out = Image.open(tmp_path / "g16_x4.png")
    assert out.mode.startswith("I;16") and out.size == (lr.shape[1] * 4, lr.shape[0] * 4)


@pytest.mark.parametrize("n, plan", [(16, [16]), (3, [4]), (5, [4, 4]), (13, [16]), (20, [16, 4]), (33, [16, 16, 4])])
def test_batch_plan_wastes_the_fewest_slots(n, plan):
    engine = CompiledModel.__new__(CompiledModel)  # the plan needs only the compiled sizes
    engine.batches = [16, 4]
    assert engine.plan(n) == plan


def test_parallel_graph_builds_give_the_same_artifact(tmp_path):
    """--jobs 2 builds the (graph, batch) pairs in worker processes; the libraries must behave
    exactly like the sequential build's."""
    from refqsr_engine.models.registry import build_sr

    torch.manual_seed(0)
    net = build_sr("srresnet", n_blocks=1).eval()
    save_model(tmp_path / "fp.pt", net, {}, half=False)
    outs = []
    for jobs in (1, 2):
        compile_model(
            CompileOptions(model=str(tmp_path / "fp.pt"), patch=15, batch=4, threads=1, jobs=jobs),
            tmp_path / f"a{jobs}",
        )
        engine = CompiledModel.load(tmp_path / f"a{jobs}")
        x = np.random.default_rng(0).random((5, 3, 15, 15), dtype=np.float32)
        outs.append(engine.sr(x))  # runs a 4-batch and a padded 1-batch
    np.testing.assert_array_equal(outs[0], outs[1])
    with torch.no_grad():
        np.testing.assert_allclose(outs[0], net(torch.from_numpy(x)).numpy(), atol=1e-4)


def _rss_probe(model: str, src, dst, *extra: str) -> dict:
    import json
    import sys
    from pathlib import Path

    probe = Path(__file__).with_name("rss_probe.py")
    out = subprocess.run(
        [sys.executable, str(probe), model, str(src), str(dst), *extra], capture_output=True, text=True, timeout=3000
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _photo_lr(width: int, height: int):
    from PIL import Image

    return Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC)


# Float32 merge accumulator (12 B), 8-bit samples (3 B) and Pillow's 4-byte RGB copy per output pixel.
BYTES_PER_OUTPUT_PIXEL = 24


def test_peak_memory_grows_with_the_output_not_the_patch_count(compiled, tmp_path):
    """Upscale a small and a large image with the same compiled engine in fresh processes: beyond
    the output's own buffers, the large one (1000+ patches) needs no more memory than the small one
    (streamed batches, reference features dropped after their last query)."""
    scheme, _, artifact, _ = compiled
    if scheme != "ddtb":
        pytest.skip("one quantizer is enough for the memory bound")
    model = str(artifact.parent / "model.pt")
    runs = {}
    for name, size in (("small", (72, 48)), ("large", (640, 360))):
        _photo_lr(*size).save(tmp_path / f"{name}.png")
        runs[name] = _rss_probe(
            model,
            tmp_path / f"{name}.png",
            tmp_path / f"{name}_x4.png",
            "--artifact",
            str(artifact),
            "--patch",
            str(PATCH),
            "--batch",
            str(BATCH),
        )
    small, large = runs["small"], runs["large"]
    assert large["patches"] > 500 and large["hr_size"] == [1440, 2560]
    extra_small = small["peak_mib"] - small["rss_before_mib"]
    extra_large = large["peak_mib"] - large["rss_before_mib"]
    out_pixels = 1440 * 2560
    assert extra_large <= extra_small + BYTES_PER_OUTPUT_PIXEL * out_pixels / 2**20, runs


@pytest.mark.slow
def test_8k_output_peak_memory_under_2gib_beyond_the_output(tmp_path):
    """The issue's bound: a 1920x1080 photo -> 7680x4320 with the bundled default model on the
    compiled engine stays under 2 GiB of resident memory beyond the output image itself."""
    _photo_lr(1920, 1080).save(tmp_path / "in.png")
    run = _rss_probe("default", tmp_path / "in.png", tmp_path / "out.png")
    assert run["hr_size"] == [4320, 7680]
    assert run["peak_mib"] - run["rss_before_mib"] - run["output_mib"] < 2048, run


def test_profile_graphs_times_every_kernel_of_a_graph(compiled):
    """The per-kernel profiler (benchmarks/profile_graphs.py) on a compiled RefQSR artifact."""
    from refqsr_engine.benchmarks.profile_graphs import format_profile, profile_graph

    _, _, artifact, _ = compiled
    prof = profile_graph(artifact, "query", repeats=1)
    names = [k["name"] for k in prof["kernels"]]
    assert any(n.startswith("qconv") for n in names) and any(n.startswith("refer_warp") for n in names)
    assert prof["total_ms"] > 0 and prof["wall_ms"] > 0
    assert sum(k["share"] for k in prof["kernels"]) == pytest.approx(1.0)
    assert "query graph" in format_profile(prof, 5)
    with pytest.raises(RefQSRError, match="not in this artifact"):
        profile_graph(artifact, "sr")
