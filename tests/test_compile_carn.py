"""CARN through the compiler: small CARN-RefQSR models (4 residual blocks = 2 cascades of 2, one
RefER, 24-px patches) -> `compile` -> artifact -> compiled runtime, against the PyTorch model.

CARN brings what SRResNet's graph does not have: Concat of the cascades, 1x1 fusion convs, ReLU
(no PReLU) after convs and residual adds, and the mean shift around the network. LLVM: both
quantizers (DDTB 8-4, PAMS 8-4), whole images and each path checked as tests/test_compile_engine.py
checks SRResNet. CUDA (nvcc, no GPU needed): a PAMS 4-3 model is built and its manifest / PTX
checked, and the CUDA rewrite of its query graph, run on the CPU with the kernels' LLVM twins,
against ONNX Runtime; on a machine with a GPU the artifact itself against PyTorch.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from compile_helpers import (
    assert_compiled_image_matches,
    assert_images_match,
    close_patches,
    compile_saved,
    fuse_ops,
    psnr,
    small_refqsr,
    torch_paths,
)
from refqsr_engine.engine.artifact import load_artifact
from refqsr_engine.engine.compiler import cuda_build as cb
from refqsr_engine.engine.compiler.compile_model import compile_model
from refqsr_engine.engine.compiler.options import CompileOptions
from refqsr_engine.engine.runtime import CompiledModel
from refqsr_engine.kernels import cuda_toolchain
from refqsr_engine.models.checkpoint import save_model
from refqsr_engine.models.registry import build_sr
from skimage import data

PATCH = 24
BATCH = 4
CUDA = {"kind": "cuda", "arch": "sm_80"}
#: conv order of a 4-block CARN's reference graph: entry, then per cascading block c
#: (block 2c: conv1 conv2, local fusion, block 2c+1: conv1 conv2, local fusion) and its global
#: fusion, then 2 upsampler convs and the exit; the query graph is the same with RefER's two
#: refinement convs in place of block 3's
QUANTIZED = [
    False,
    True,
    True,
    False,
    True,
    True,
    False,
    False,
    True,
    True,
    False,
    True,
    True,
    False,
    False,
    False,
    False,
    False,
]


# ----------------------------------------------------------------------------------------------
# LLVM


# PAMS compiles the same graph pattern with static ranges (tests/test_compile_engine.py runs both
# quantizers on SRResNet); CARN's PAMS build is in the slow run to keep the default suite short.
@pytest.fixture(scope="module", params=["ddtb", pytest.param("pams", marks=pytest.mark.slow)])
def compiled(request, tmp_path_factory):
    model = small_refqsr(request.param, arch="carn")
    return (model, *compile_saved(model, tmp_path_factory.mktemp(f"carn_{request.param}"), PATCH, BATCH))


def test_compiled_image_equals_pytorch(compiled):
    model, artifact, _ = compiled
    lr = data.astronaut()[100:160, 180:250].astype(np.float32).transpose(2, 0, 1) / 255.0
    assert_compiled_image_matches(model, artifact, lr, PATCH, BATCH)


def test_reference_and_query_paths_each_match(compiled):
    model, artifact, _ = compiled
    engine = CompiledModel.load(artifact)
    refs, queries = close_patches(BATCH, PATCH)
    hr, feats = engine.reference(refs)
    want_hr, want_feats, want_q = torch_paths(model, refs, queries)
    assert_images_match(hr, want_hr)
    assert len(feats) == len(want_feats) == 1  # one RefER: the input of the last residual block
    close = np.abs(feats[0] - want_feats[0]) <= 1e-2 * float(np.abs(want_feats[0]).max())
    assert close.mean() >= 0.999  # a rounding tie may move a value by one quantization step
    assert_images_match(engine.query(queries, want_feats), want_q)
    # a short batch is padded inside the runtime and gives the same rows
    assert_images_match(engine.query(queries[:3], [w[:3] for w in want_feats]), want_q[:3])


def test_every_quantized_conv_is_integer_and_the_rest_float(compiled):
    _, _, report = compiled
    for name in ("reference", "query"):
        graph = report["graphs"][name]
        assert [b < 32 for b in graph["act_bits"]] == QUANTIZED, name
        assert [v is not None for v in graph["variants"]] == QUANTIZED, name
    query = report["graphs"]["query"]
    assert query["refer_warps"] == 1
    assert query["act_bits"][1:3] == [8, 8] and query["act_bits"][4:6] == [4, 4]  # block 0 high, block 1 low
    assert query["act_bits"][11:13] == [8, 8]  # RefER's refinement convs at b_high


def test_cascade_fusion_conv_is_scheduled_and_matches_torch():
    """CARN's 1x1 fusion, ReLU(conv1x1(concat(a, b)) + bias), through the CPU pipeline: the 1x1
    conv (no padding: its "pad" is a plain copy, inlined) gets the row-vector schedule (parallel,
    vectorized) instead of staying a serial loop nest, and computes torch's values."""
    import tvm
    from refqsr_engine.engine.compiler.build import cpu_pipeline
    from refqsr_engine.engine.compiler.cpu_schedule import cpu_schedule_pass
    from tvm import relax

    rng = np.random.default_rng(7)
    a, b = (rng.standard_normal((2, 16, 8, 24)).astype(np.float32) for _ in range(2))
    w = (rng.standard_normal((16, 32, 1, 1)) / 6).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    bb = relax.BlockBuilder()
    xa, xb = (relax.Var(n, relax.TensorType(a.shape, "float32")) for n in ("a", "b"))
    with bb.function("main", [xa, xb]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(relax.op.concat([xa, xb], axis=1), relax.const(w)))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1)))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    tgt = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2", "num-cores": 2})
    with tgt:
        fused = fuse_ops(mod)
        scheduled = cpu_schedule_pass(2, 8)(fused)
    convs = [
        f.script()
        for f in scheduled.functions.values()
        if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_nchw" in f.script()
    ]
    assert len(convs) == 1
    assert "T.parallel" in convs[0] and "T.vectorized" in convs[0] and 'sblock("pad_temp")' not in convs[0]
    vm = relax.VirtualMachine(tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt)), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    want = torch.relu(
        torch.nn.functional.conv2d(
            torch.cat([torch.from_numpy(a), torch.from_numpy(b)], 1), torch.from_numpy(w), torch.from_numpy(bias)
        )
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_full_precision_carn_sr_graph(tmp_path):
    """The fixed-precision path (one `sr` graph) with a 1-block CARN (one cascade of one)."""
    torch.manual_seed(0)
    net = build_sr("carn", n_blocks=1).eval()
    save_model(tmp_path / "fp.pt", net, {}, half=False)
    report = compile_model(CompileOptions(model=str(tmp_path / "fp.pt"), patch=15, batch=1, threads=2), tmp_path / "a")
    assert report["graphs"]["sr"]["float_convs"] == 1 + 2 + 1 + 1 + 2 + 1  # entry, block, 2 fusions, ups, exit
    engine = CompiledModel.load(tmp_path / "a")
    x = np.random.default_rng(0).random((2, 3, 15, 15), dtype=np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(engine.sr(x), want, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# CUDA

HAS_NVCC = cuda_toolchain.nvcc_available()
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not on PATH: CUDA artifacts cannot be built")
gpu = pytest.mark.skipif(not cuda_toolchain.has_cuda_device(), reason="no CUDA device: artifacts are built, not run")


@pytest.fixture(scope="module")
def cuda_compiled(tmp_path_factory):
    if not HAS_NVCC:
        pytest.skip("nvcc is not on PATH: CUDA artifacts cannot be built")
    model = small_refqsr("pams", 4, 3, arch="carn")
    root = tmp_path_factory.mktemp("carn_cuda_43")
    save_model(root / "model.pt", model, {}, half=False)
    opts = CompileOptions(model=str(root / "model.pt"), target="cuda", arch="sm_80", patch=PATCH, batch=BATCH)
    return model, root / "artifact", compile_model(opts, root / "artifact")


@needs_nvcc
def test_cuda_artifact_has_tensor_core_convs(cuda_compiled):
    model, artifact, report = cuda_compiled
    man = load_artifact(artifact, target=CUDA).manifest
    assert man["target"] == CUDA and man["bits"] == "4-3" and man["n_refer"] == 1
    assert man["cluster"]["device"] == "device" and man["clustering"] == "device"
    for name in ("reference", "query"):
        graph = report["graphs"][name]
        # 4- and 3-bit activations with s4 weights: every quantized conv on int4 tensor cores,
        # except RefER's b_high refinement convs on the query path (4-bit: also s4)
        assert [v not in (None, "f16mma") for v in graph["variants"]] == QUANTIZED, name
        # full-precision convs on fp16 tensor cores
        assert set(graph["variants"]) == {"f16mma", "s4mma"} and graph["float_quantized"] == {}
        assert report["device_code"][name]["mma_s4"] > 0
    assert 3 in report["graphs"]["query"]["act_bits"]


@needs_nvcc
def test_cuda_rewrite_of_query_graph_on_llvm_equals_onnxruntime(cuda_compiled):
    """The query graph as the CUDA build rewrites it (quantize/pack ops, the int4 kernel's LLVM
    twin, the dequantize epilogue; the RefER kernel, CPU-scheduled) built for the CPU, vs ONNX Runtime."""
    import tvm
    from tvm import relax

    ort = pytest.importorskip("onnxruntime")
    _, artifact, _ = cuda_compiled
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def onnxruntime(name, feeds):
        return ort.InferenceSession(str(artifact / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"]).run(
            None, feeds
        )

    refs, queries = close_patches(BATCH, PATCH, 5)
    _, feat = onnxruntime("reference", {"patches": refs})
    feeds = {"patches": queries, "ref_feat_0": feat}
    want = onnxruntime("query", feeds)[0]
    model = onnx.load(str(artifact / "query.onnx"))
    exe, result = cb.build_graph_twin(model, BATCH)
    assert [c.variant for c in result.convs].count("s4mma") == sum(QUANTIZED)
    out = relax.VirtualMachine(exe, tvm.cpu())["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input])
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    assert psnr(got, want) >= 50.0


@gpu
def test_cuda_artifact_on_gpu_matches_pytorch(cuda_compiled):
    model, artifact, _ = cuda_compiled
    engine = CompiledModel.load(artifact, target=CUDA)
    refs, queries = close_patches(BATCH, PATCH)
    hr, _ = engine.reference(refs)
    want_hr, want_feats, want_q = torch_paths(model, refs, queries)
    assert psnr(hr, want_hr) >= 50.0
    assert psnr(engine.query(queries, want_feats), want_q) >= 50.0
