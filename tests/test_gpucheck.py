"""The GPU check's measuring code, run on a CPU artifact (the same functions run on CUDA on a GPU
host), its refusal without a GPU, and the bundle `prepare` writes (slow: two CUDA compiles)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from compile_helpers import compile_saved, small_refqsr
from refqsr_engine.engine.runtime import CompiledModel
from refqsr_engine.models.registry import build_sr

from gpucheck import run as gpurun

REPO = Path(__file__).resolve().parents[1]
PATCH, BATCH = 24, 4


@pytest.fixture(scope="module")
def cpu_engines(tmp_path_factory):
    """A small RefQSR and a small DDTB-4 network, each compiled for this CPU, with the PyTorch model."""
    root = tmp_path_factory.mktemp("gpucheck")
    refqsr = small_refqsr("ddtb", seed=4)
    torch.manual_seed(0)
    sr = build_sr("srresnet", "ddtb", (4,), n_blocks=2, n_feats=16)
    sr.train()
    sr(torch.rand(4, 3, PATCH, PATCH))  # quantizer ranges
    sr.eval()
    return {
        name: (CompiledModel.load(compile_saved(model, root / name, PATCH, BATCH)[0]), model)
        for name, model in (("refqsr", refqsr), ("sr", sr))
    }


def test_graph_checks_pass_for_a_correct_engine_and_fail_for_a_wrong_one(cpu_engines):
    engine, model = cpu_engines["refqsr"]
    rows = gpurun.check_graphs(engine, model, torch.device("cpu"), BATCH)
    assert set(rows) == {"clustblock", "reference", "query"} and gpurun.graphs_pass(rows), rows
    assert rows["clustblock"]["assignment_equal"] and rows["reference"]["psnr_db"] >= 50
    engine_sr, model_sr = cpu_engines["sr"]
    assert gpurun.graphs_pass(gpurun.check_graphs(engine_sr, model_sr, torch.device("cpu"), BATCH))
    other = small_refqsr("ddtb", seed=5)  # another network's weights: the check must fail
    assert not gpurun.graphs_pass(gpurun.check_graphs(engine, other, torch.device("cpu"), BATCH))


def test_resident_engine_passes_the_graph_checks_and_upscales_as_the_host_path(cpu_engines):
    """The device-resident path on the CPU device with the compiled graphs: features downloaded only
    for the check, queries on features gathered by device-to-device copies, the same image as the
    host path with one upload and one download per compiled batch."""
    from refqsr_engine.engine.runtime import RESIDENT_COPIES
    from refqsr_engine.pipeline.patchwise import run_patchwise

    engine, model = cpu_engines["refqsr"]
    resident = CompiledModel.load(engine.artifact.path, resident=True)
    rows = gpurun.check_graphs(resident, model, torch.device("cpu"), BATCH)
    assert gpurun.graphs_pass(rows) and rows["query"]["gathered_equal"], rows
    lr = np.ascontiguousarray(gpurun.photo_patches(1, 60, seed=3)[0])
    host = CompiledModel.load(engine.artifact.path, resident=False)
    want = run_patchwise(host, lr, PATCH, 4, BATCH)
    resident.copies = {"to_device": 0, "to_host": 0}
    got = run_patchwise(resident, lr, PATCH, 4, BATCH)
    np.testing.assert_array_equal(got.image, want.image)
    n_logit_batches = -(-got.grid.num_patches // BATCH)
    assert got.clustering.num_references < got.grid.num_patches  # queries ran on gathered features
    # the cluster call itself: one upload (logits), two downloads (reference, similarity)
    per_batch = sum(len(resident.plan(n)) for n in _call_sizes(got, BATCH))
    assert resident.copies["to_device"] == RESIDENT_COPIES["to_device"] * (n_logit_batches + per_batch) + 1
    assert resident.copies["to_host"] == RESIDENT_COPIES["to_host"] * (n_logit_batches + per_batch) + 2


def _call_sizes(result, batch: int) -> list[int]:
    """Patches of each reference / query call of run_patchwise (its streaming order)."""
    from refqsr_engine.pipeline.patchwise import query_schedule

    sizes = []
    for ref_idx, query_batches in query_schedule(result.clustering, batch):
        sizes.append(len(ref_idx))
        sizes += [len(q) for q in query_batches]
    return sizes


def test_timing_and_kernel_profile(cpu_engines):
    engine, _ = cpu_engines["refqsr"]
    times = gpurun.time_engine_graphs(engine, lambda: None, runs=3)
    assert set(times) == {"clustblock", "reference", "query"}
    assert all(0 < t["min_ms"] <= t["median_ms"] <= t["p90_ms"] for t in times.values())
    profile = gpurun.kernel_profile(engine, "query", lambda: None)
    assert profile and all(r["calls"] >= 1 and r["ms"] >= 0 for r in profile)
    assert [r["ms"] for r in profile] == sorted((r["ms"] for r in profile), reverse=True)
    assert any("conv" in r["function"] or "fused" in r["function"] for r in profile)
    # the instrument is removed afterwards: a plain run still works and returns the same
    x = gpurun.photo_patches(BATCH, PATCH)
    np.testing.assert_array_equal(engine.logits(x), engine.logits(x))


def test_timed_reports_sorted_statistics():
    calls = []
    t = gpurun.timed(lambda: calls.append(1), lambda: None, runs=20, warmup=2)
    assert len(calls) == 22 and t["runs"] == 20 and t["min_ms"] <= t["median_ms"] <= t["p90_ms"]


def test_run_refuses_without_a_gpu_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gpucheck", "run", str(tmp_path / "bundle"), str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "no CUDA GPU" in proc.stderr and not (tmp_path / "out").exists()


def test_packing_leaves_out_optional_models_over_the_carry_limit(tmp_path):
    """Over the limit the last optional model's artifact goes, and the archive is packed again;
    the first model is never dropped. Sizes against incompressible random files."""
    import tarfile

    from gpucheck.prepare import pack_within_limit

    rng = np.random.default_rng(0)
    stage = tmp_path / "stage"
    for key, size in (("default", 50_000), ("ddtb4", 200_000)):
        (stage / "artifacts" / key).mkdir(parents=True)
        (stage / "artifacts" / key / "graph.so").write_bytes(rng.bytes(size))
    (stage / "lib").mkdir()
    (stage / "lib" / "runtime.so").write_bytes(rng.bytes(30_000))
    models = {"default": {"model": "a"}, "ddtb4": {"model": "b"}}
    said = []
    left = pack_within_limit(stage, tmp_path / "b.tar.xz", 10_000, models, said.append, limit=150_000)
    assert list(left) == ["ddtb4"] and "b:" in left["ddtb4"] and list(models) == ["default"] and len(said) == 1
    with tarfile.open(tmp_path / "b.tar.xz") as tar:
        names = set(tar.getnames())
    assert "artifacts/default/graph.so" in names and not any(n.startswith("artifacts/ddtb4") for n in names)
    assert 10_000 + (tmp_path / "b.tar.xz").stat().st_size <= 150_000
    # within the limit nothing is left out; over it with no optional model left, the caller refuses
    models = {"default": {"model": "a"}}
    assert pack_within_limit(stage, tmp_path / "c.tar.xz", 0, models, said.append, limit=1 << 30) == {}
    assert pack_within_limit(stage, tmp_path / "d.tar.xz", 0, models, said.append, limit=1_000) == {}
    assert list(models) == ["default"]


@pytest.mark.slow
def test_prepare_fits_the_carry_limit_and_loads_without_tvm(tmp_path):
    from gpucheck.prepare import prepare

    desc = prepare(tmp_path / "bundle")
    assert desc["carry_bytes"] <= desc["carry_limit"] and "default" in desc["models"]
    assert set(desc["models"]) | set(desc["left_out"]) == {"default", "ddtb4"}
    assert desc["static_load"]["modules"] == [] and "no CUDA device" in desc["static_load"]["device"]
    assert all(sum(c.values()) > 0 for art in desc["device_code"].values() for c in art.values())
    assert {k["name"] for k in desc["kernels"]} == {f"{v}_{s}" for v in ("dp4a", "s8mma", "s4mma") for s in "us"}
    assert [k["function"] for k in desc["float_kernels"][:-1]] == ["f16mma_parts", "f16mma_shuffle"]
    functions = {"refer_pipeline", "refer_shared_flow", "refer_warp", "cluster_1024"}
    assert {k["function"] for k in desc["device_kernels"][:-1]} == functions
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text())["bundle_sha256"] == desc["bundle_sha256"]


@pytest.mark.slow
def test_device_kernel_check_on_the_cpu_and_the_cuda_build(tmp_path):
    """The RefER / clustering part of the check: its bundle built with the schedules for this CPU,
    then checked by the run's code (bit-exact, and a changed expected value is caught); the CUDA
    bundle builds with every kernel present."""
    from gpucheck.prepare import build_device_kernels

    folder = tmp_path / "cpu"
    build_device_kernels(folder, "sm_90", lambda msg: None, kind="llvm")
    rows = gpurun.check_device_kernels(folder, kind="cpu")
    assert len(rows) == 8 and all(r["bit_exact"] for r in rows), rows
    data = dict(np.load(folder / "device_kernels.npz"))
    data["s_flow"] = data["s_flow"].copy()
    data["s_flow"].flat[5] += 3.0
    np.savez(folder / "device_kernels.npz", **data)
    bad = {r["kernel"]: r["wrong"] for r in gpurun.check_device_kernels(folder, kind="cpu")}
    assert bad["refer_shared_flow:s_flow"] == 1 and bad["refer_pipeline:flow"] == 0
    rows = build_device_kernels(tmp_path / "cuda", "sm_90", lambda msg: None)
    assert all(r["kernels"] >= 1 for r in rows[:-1]) and rows[-1]["ptx"]["fma_f32"] > 0


def test_float_kernel_check_on_the_cpu_and_the_cuda_build(tmp_path):
    """The f16mma part of the check: its bundle built with the kernels' LLVM twins, checked by
    the run's code (every case within the bound of numpy's fp16 conv; a changed expected half and
    an unwritten border word are caught); the CUDA library builds with both kernels on f16 mma."""
    from refqsr_engine.kernels import cuda_toolchain

    from gpucheck.prepare import FLOAT_CASES, build_float_kernels

    folder = tmp_path / "cpu"
    build_float_kernels(folder, "sm_90", lambda msg: None, kind="llvm")
    rows = gpurun.check_float_kernels(folder, kind="cpu")
    assert [r["kernel"] for r in rows] == list(FLOAT_CASES) and all(r["within"] for r in rows), rows
    data = dict(np.load(folder / "float_kernels.npz"))
    parts = data["f16mma_parts_want"].copy()
    parts.flat[7] = np.float16(parts.flat[7] + 0.25)
    shuffled = data["f16mma_shuffle_want"].copy()
    assert not shuffled[:, 0].view(np.uint32).any()  # the border the kernel must write: zero
    shuffled[0, 0, 3, 5] = np.float16(1.0)
    sums = data["f16mma_sums_sums_want"].copy()
    sums[1, 2] += 0.5  # a tile's sum off by half a unit
    changed = {"f16mma_parts_want": parts, "f16mma_shuffle_want": shuffled, "f16mma_sums_sums_want": sums}
    np.savez(folder / "float_kernels.npz", **{**data, **changed})
    bad = {r["kernel"]: r["wrong"] for r in gpurun.check_float_kernels(folder, kind="cpu")}
    assert bad == {"f16mma_parts": 1, "f16mma_shuffle": 1, "f16mma_sums": 1}
    if cuda_toolchain.nvcc_available():
        rows = build_float_kernels(tmp_path / "cuda", "sm_90", lambda msg: None)
        assert rows[-1]["ptx"]["mma_f16"] >= 3 and rows[-1]["ptx"]["local_memory"] == 0
