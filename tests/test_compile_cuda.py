"""`compile --target cuda` without a GPU: small RefQSR models compiled with nvcc and checked by their
manifests and PTX (4-3: int4 tensor cores in reference/query, dp4a in ClustBlock; 8-4: dp4a), the
CUDA rewrite's math checked on the CPU (the same rewritten graph with the kernels' LLVM twins vs
ONNX Runtime) and, only where a GPU exists, the artifact itself vs PyTorch.

A full CUDA artifact takes ~40 s on a 2-core Sapphire Rapids VM, so by default only the 4-3 model is
compiled (its ClustBlock has the 8-bit dp4a convs); ``REFQSR_SLOW_TESTS=1`` adds the whole 8-4
artifact and a separate look at the 8-4 reference graph's PTX and library."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from compile_helpers import PATCH, psnr, small_refqsr
from refqsr_engine.engine.artifact import load_artifact
from refqsr_engine.engine.compiler import cuda_build as cb
from refqsr_engine.engine.compiler.compile_model import compile_model
from refqsr_engine.engine.compiler.options import CompileOptions
from refqsr_engine.errors import RefQSRError
from refqsr_engine.kernels import conv2d_cuda as cc
from refqsr_engine.kernels import cuda_toolchain
from refqsr_engine.models.checkpoint import save_model

BATCH = 4
CUDA = {"kind": "cuda", "arch": "sm_80"}
HAS_NVCC = cuda_toolchain.nvcc_available()
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not on PATH: CUDA artifacts cannot be built")
gpu = pytest.mark.skipif(not cuda_toolchain.has_cuda_device(), reason="no CUDA device: artifacts are built, not run")


SLOW = bool(os.environ.get("REFQSR_SLOW_TESTS"))
slow = pytest.mark.skipif(not SLOW, reason="set REFQSR_SLOW_TESTS=1 (another ~25 s of CUDA builds)")
ARTIFACT_BITS = [(4, 3)] + ([(8, 4)] if SLOW else [])


@pytest.fixture(scope="module", params=ARTIFACT_BITS, ids=lambda b: f"{b[0]}-{b[1]}")
def compiled(request, tmp_path_factory):
    if not HAS_NVCC:
        pytest.skip("nvcc is not on PATH: CUDA artifacts cannot be built")
    bits = request.param
    model = small_refqsr("pams", *bits)
    root = tmp_path_factory.mktemp(f"cuda_{bits[0]}{bits[1]}")
    save_model(root / "model.pt", model, {}, half=False)
    opts = CompileOptions(model=str(root / "model.pt"), target="cuda", arch="sm_80", patch=PATCH, batch=BATCH)
    report = compile_model(opts, root / "artifact")
    return bits, model, root / "artifact", report


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(bits)``: that small model's ONNX graphs, exported once per module."""
    from refqsr_engine.export.onnx_export import export_refqsr

    cache = {}

    def get(bits):
        if bits not in cache:
            cache[bits] = export_refqsr(small_refqsr("pams", *bits), tmp_path_factory.mktemp("onnx"), PATCH)
        return cache[bits]

    return get


# ----------------------------------------------------------------------------------------------
# no nvcc needed


def test_variant_choice_is_exact_by_ranges():
    s = cc.Conv2dCudaShape(4, 64, 64, 24, 24)
    assert cb.choose_cuda_variant(4, -8, 7, s) == "s4mma"
    assert cb.choose_cuda_variant(3, -7, 7, s) == "s4mma"
    assert cb.choose_cuda_variant(4, -31, 31, s) == "dp4a"  # 4-bit activations, 6-bit weights
    assert cb.choose_cuda_variant(8, -8, 7, s) == "dp4a"
    assert cb.choose_cuda_variant(8, -128, 127, s) == "dp4a"
    assert cb.choose_cuda_variant(8, -255, 255, s) is None  # DDTB asymmetric weights: stays float
    assert cb.choose_cuda_variant(8, -1, 1, cc.Conv2dCudaShape(4, 3, 64, 8, 8)) is None  # C % 4
    assert cb.choose_cuda_variant(4, -8, 7, cc.Conv2dCudaShape(4, 16, 64, 8, 8)) == "dp4a"  # C % 32


def test_ptx_instruction_count():
    ptx = (
        "dp4a.u32.s32 %r1, %r2, %r3, %r4;\n dp4a.s32.s32 %r1, %r2, %r3, %r4;\n"
        "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 {..};\n"
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {..};"
    )
    assert cb.count_integer_instructions(ptx) == {"dp4a": 2, "mma_s4": 1}


# ----------------------------------------------------------------------------------------------
# the artifacts (nvcc, no GPU)


@needs_nvcc
def test_artifact_manifest(compiled):
    bits, model, artifact, report = compiled
    art = load_artifact(artifact, target=CUDA)
    man = art.manifest
    assert man["target"] == CUDA and man["bits"] == f"{bits[0]}-{bits[1]}"
    assert man["cluster"]["device"] == "host" and man["cluster"]["classes"] == model.clustblock.num_classes
    assert {"clustblock_b4.so", "reference_b4.so", "query_b4.so", "cluster.so", "query.onnx"} <= set(art.files)
    assert set(man["device_code"]) == {"clustblock", "reference", "query"}
    with pytest.raises(RefQSRError, match="target"):
        load_artifact(artifact, target={"kind": "llvm", "mcpu": "core-avx2"})
    for name, graph in man["graphs"].items():
        for i, (act, variant) in enumerate(zip(graph["act_bits"], graph["variants"])):
            if act == 32:
                assert variant is None
            elif variant is None:  # only ClustBlock's stride-3 first conv has no kernel
                assert (name, i) == ("clustblock", 0), graph["float_quantized"]
    assert report["device_code"] == man["device_code"]


@needs_nvcc
def test_device_code_has_integer_instructions(compiled):
    bits, _, _, report = compiled
    code = report["device_code"]
    graphs = report["graphs"]
    assert code["clustblock"]["dp4a"] > 0 and code["clustblock"]["mma_s4"] == 0  # 8-bit ClustBlock
    if bits == (8, 4):
        for name in ("reference", "query"):  # 8-bit blocks; 4-bit query convs have 6-bit weights
            assert code[name]["dp4a"] > 0 and code[name]["mma_s4"] == 0
            assert set(graphs[name]["variants"]) == {None, "dp4a"}
    else:
        for name in ("reference", "query"):  # 4- and 3-bit activations, s4 weights: tensor cores
            assert code[name]["mma_s4"] > 0 and code[name]["dp4a"] == 0
            assert set(graphs[name]["variants"]) == {None, "s4mma"}
        assert 3 in graphs["query"]["act_bits"]


@slow
@needs_nvcc
def test_8bit_graph_uses_dp4a_and_library_embeds_it(exported, tmp_path):
    built = cb.build_graph_cuda(onnx.load(str(exported((8, 4))["reference"])), "reference", BATCH, "sm_80")
    graph = built.report()
    assert graph["act_bits"].count(8) == 8 and graph["variants"].count("dp4a") == 8
    assert built.device_code["dp4a"] > 0 and built.device_code["mma_s4"] == 0
    ptx = cuda_toolchain.device_code(built.executable, sass=False)  # registered with the toolchain
    assert ".target sm_80" in ptx and "dp4a.u32.s32" in ptx  # u8 activations x s8 weights
    assert "ld.local" not in ptx  # no register spills anywhere in the graph
    lib = tmp_path / "reference.so"
    built.executable.export_library(str(lib))
    assert cb.library_has_binary(lib, built.binary)  # the fatbin, not CUDA source, is in the library


# ----------------------------------------------------------------------------------------------
# the rewrite's math on the CPU: the same rewritten graph with LLVM twins vs ONNX Runtime

#: 8-4 ClustBlock: dp4a on uint8 asymmetric activations, negated -127..128 weights, a 1x1 conv,
#: "valid" padding and a strided conv left float; 4-3 query: s4 tensor cores on 3/4-bit grids of
#: int8 containers (offset 4/8) and the RefER warp as plain Relax ops
TWIN_CASES = [((8, 4), "clustblock"), ((4, 3), "query")]


def _onnxruntime(path, feeds):
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(graphs, name):
    """Patches, and for the query graph a reference's features from ORT (close patches, as in use)."""
    rng = np.random.default_rng(5)
    refs = rng.random((BATCH, 3, PATCH, PATCH), dtype=np.float32)
    if name != "query":
        return {"patches": refs}
    _, *feats = _onnxruntime(graphs["reference"], {"patches": refs})
    queries = np.clip(refs + rng.normal(0, 0.02, refs.shape).astype(np.float32), 0, 1)
    return {"patches": queries, **{f"ref_feat_{k}": f for k, f in enumerate(feats)}}


@pytest.mark.parametrize("bits, name", TWIN_CASES, ids=[f"{b[0]}-{b[1]}-{n}" for b, n in TWIN_CASES])
def test_rewritten_graph_on_llvm_equals_onnxruntime(exported, bits, name):
    import tvm
    from tvm import relax

    graphs = exported(bits)
    model = onnx.load(str(graphs[name]))
    exe, result = cb.build_graph_twin(model, BATCH)
    assert ("s4mma" if bits == (4, 3) else "dp4a") in [c.variant for c in result.convs]
    feeds = _feeds(graphs, name)
    want = _onnxruntime(graphs[name], feeds)[0]
    out = relax.VirtualMachine(exe, tvm.cpu())["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input])
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    if name == "clustblock":  # logits: no [0, 1] image range
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    else:
        assert psnr(got, want) >= 50.0


# ----------------------------------------------------------------------------------------------
# GPU only


@gpu
def test_artifact_on_gpu_matches_pytorch(compiled):
    from refqsr_engine.engine.runtime import CompiledModel

    _, model, artifact, _ = compiled
    engine = CompiledModel.load(artifact, target=CUDA)
    rng = np.random.default_rng(1)
    refs = rng.random((BATCH, 3, PATCH, PATCH), dtype=np.float32)
    queries = np.clip(refs + rng.normal(0, 0.02, refs.shape).astype(np.float32), 0, 1)
    hr, feats = engine.reference(refs)
    with torch.no_grad():
        want_hr, want_feats = model.reference_forward(torch.from_numpy(refs))
        want_q = model.query_forward(torch.from_numpy(queries), list(want_feats), hard=True).numpy()
        want_logits = model.clustblock(torch.from_numpy(refs), quantized=True).numpy()
    assert psnr(hr, want_hr.numpy()) >= 50.0
    assert psnr(engine.query(queries, [w.numpy() for w in want_feats]), want_q) >= 50.0
    # a rounding tie may move one activation by a quantization step: compare loosely
    np.testing.assert_allclose(engine.logits(refs), want_logits, atol=1e-2 * float(np.abs(want_logits).max()))
