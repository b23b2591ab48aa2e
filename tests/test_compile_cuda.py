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
from compile_helpers import PATCH, fuse_ops, psnr, small_refqsr
from refqsr_engine.engine.artifact import load_artifact
from refqsr_engine.engine.compiler import cuda_build as cb
from refqsr_engine.engine.compiler.compile_model import compile_model
from refqsr_engine.engine.compiler.options import CompileOptions
from refqsr_engine.engine.models_store import DEFAULT_ALIAS
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

    def get(bits, scheme="pams", arch="srresnet"):
        if (bits, scheme, arch) not in cache:
            model = small_refqsr(scheme, *bits, arch=arch)
            cache[bits, scheme, arch] = export_refqsr(model, tmp_path_factory.mktemp("onnx"), PATCH)
        return cache[bits, scheme, arch]

    return get


# ----------------------------------------------------------------------------------------------
# no nvcc needed


def test_variant_choice_is_exact_by_ranges():
    s = cc.Conv2dCudaShape(4, 64, 64, 24, 24)
    assert cb.choose_cuda_variant(4, -8, 7, s) == "s4mma"
    assert cb.choose_cuda_variant(4, -8, 7, s, "sm_90") == "s8mma"  # no int4 tensor cores on sm_90
    assert cb.choose_cuda_variant(3, -7, 7, s) == "s4mma"
    assert cb.choose_cuda_variant(4, -31, 31, s) == "s8mma"  # 4-bit activations, 6-bit weights
    assert cb.choose_cuda_variant(8, -8, 7, s) == "s8mma"
    assert cb.choose_cuda_variant(8, -128, 127, s) == "s8mma"
    assert cb.choose_cuda_variant(8, -130, 125, s) == "s8mma"  # DDTB asymmetric weights: shifted by -2
    assert cb.choose_cuda_variant(4, -9, 6, s) == "s4mma"  # 16 values: shifted by -1
    assert cb.choose_cuda_variant(4, -9, 7, s) == "s8mma"  # 17 values: no s4 shift
    assert cb.choose_cuda_variant(8, -255, 255, s) is None  # 511 values: no s8 shift either
    # channels are padded to the layout (3 -> 16, 48 -> 64 for s4), pixels are not
    assert cb.choose_cuda_variant(8, -1, 1, cc.Conv2dCudaShape(4, 3, 64, 8, 8)) == "s8mma"
    assert cb.choose_cuda_variant(4, -8, 7, cc.Conv2dCudaShape(4, 48, 64, 8, 8)) == "s4mma"
    assert cb.padded_shape(cc.Conv2dCudaShape(4, 27, 10, 8, 8), "s8mma") == cc.Conv2dCudaShape(4, 32, 16, 8, 8)
    fc = cc.Conv2dCudaShape(4, 32, 16, 1, 1, kernel=1)  # 4 pixels: no 16-row mma tile
    variant, why = cb.choose_cuda_variant_why(8, -130, 125, fc)
    assert variant == "dp4a" and "N*H*W % 16" in why
    big = cc.Conv2dCudaShape(1, 4096, 64, 8, 8)  # 255 * 4096 * 9 * (128 + 2 + 130) > 2**31: overflow
    assert cb.choose_cuda_variant(8, -130, 125, big) is None
    assert "overflow" in cb.choose_cuda_variant_why(8, -130, 125, big)[1]
    assert [cb.cuda_weight_shift("dp4a", *r) for r in ((-128, 127), (-130, 125), (-127, 128), (-175, 80))] == [
        0,
        -2,
        1,
        -47,
    ]
    assert cb.cuda_weight_shift("s4mma", -9, 6) == -1 and cb.cuda_weight_shift("s4mma", 0, 15) == 8
    assert cb.cuda_weight_shift("dp4a", -200, 100) is None


def test_conv_roofline_against_hand_counts():
    # SRResNet block conv at batch 16, 96 x 96: 16*96*96 px x 64 x 64 x 9 MACs; u8 activations
    # 16*98*98*64 B + s8 weights 64*9*64 B + int32 output 16*96*96*64*4 B
    r = cb.conv_roofline(cc.Conv2dCudaShape(16, 64, 64, 96, 96), 64, 64, "s8mma")
    macs, moved = 5_435_817_984, 9_834_496 + 36_864 + 37_748_736
    assert (r["useful_macs"], r["issued_macs"], r["bytes"]) == (macs, macs, moved)
    assert r["A100_us"] == pytest.approx(max(macs / 312e12, moved / 2.039e12) * 1e6, abs=1e-3)
    assert r["A100_bound"] == "memory" and r["H100_us"] == pytest.approx(moved / 3.35e12 * 1e6, abs=1e-3)
    # ClustBlock's stride-3 conv as im2col: 27 real channels padded to 32, 64 -> 64 channels
    r = cb.conv_roofline(cc.Conv2dCudaShape(16, 32, 64, 32, 32, 1), 27, 64, "s8mma")
    assert r["issued_over_useful"] == pytest.approx(32 / 27, abs=1e-4)
    # 4-bit: packed nibbles; no H100 int4 peak -> memory time only
    r = cb.conv_roofline(cc.Conv2dCudaShape(16, 64, 64, 96, 96), 64, 64, "s4mma")
    assert r["bytes"] == 9_834_496 // 2 + 36_864 // 2 + 37_748_736 and r["H100_bound"] == "memory"
    # the fused dequantize epilogue: fp16 output (half the int32 bytes), 4-byte RS, RZ per sample
    # and CS, CW per output channel; with a weight shift an int32 window term per output pixel
    r = cb.conv_roofline(cc.Conv2dCudaShape(16, 64, 64, 96, 96), 64, 64, "s4mma", epilogue="dequant")
    assert r["bytes"] == 9_834_496 // 2 + 36_864 // 2 + 37_748_736 // 2 + 8 * (16 + 64)
    r2 = cb.conv_roofline(cc.Conv2dCudaShape(16, 64, 64, 96, 96), 64, 64, "s4mma", epilogue="dequant_ws")
    assert r2["bytes"] == r["bytes"] + 16 * 96 * 96 * 4 and r2["epilogue"] == "dequant_ws"
    # fp16 upsampler conv 64 -> 256 at 192 x 192: fp16 activations and weights, fp32 output;
    # datasheet dense fp16: 312 TFLOPS (A100), 989.4 TFLOPS (H100)
    r = cb.conv_roofline(cc.Conv2dCudaShape(16, 64, 256, 192, 192), 64, 256, "f16mma")
    macs = 16 * 192 * 192 * 256 * 64 * 9
    moved = 16 * 194 * 194 * 64 * 2 + 256 * 9 * 64 * 2 + 16 * 192 * 192 * 256 * 4
    assert (r["useful_macs"], r["bytes"]) == (macs, moved)
    assert r["A100_us"] == pytest.approx(max(macs / 156e12, moved / 2.039e12) * 1e6, abs=1e-3)
    assert r["H100_us"] == pytest.approx(max(macs / 494.7e12, moved / 3.35e12) * 1e6, abs=1e-3)
    # stored in fp16 ("f16" epilogue): the output bytes halve; on the H100 the MACs now bound it
    r = cb.conv_roofline(cc.Conv2dCudaShape(16, 64, 256, 192, 192), 64, 256, "f16mma", epilogue="f16")
    assert r["bytes"] == moved - 16 * 192 * 192 * 256 * 2 and r["H100_bound"] == "compute"


def test_fp16_layer_bound_and_graph_sums():
    """A conv as PyTorch fp16 runs it layer by layer: fp16 input, weights and output once, against
    its useful MACs at the fp16 peak; ``cuda_roofline`` sums it per patch, the float floor over the
    f16mma convs only, and gives no H100 figure for a build with int4 kernels."""
    from refqsr_engine.benchmarks.cuda_roofline import graph_rows

    # CARN's 1x1 cascade conv 256 -> 64 at 96 x 96, batch 16: memory-bound on both GPUs
    r = cb.with_fp16_layer({"useful_macs": 16 * 96 * 96 * 64 * 256}, 16 * 256 * 96 * 96, 16 * 64 * 96 * 96, 64 * 256)
    moved = 2 * (16 * 256 * 96 * 96 + 16 * 64 * 96 * 96 + 64 * 256)
    assert r["fp16_layer_bytes"] == moved
    assert r["H100_fp16_layer_us"] == pytest.approx(moved / 3.35e12 * 1e6, abs=1e-3)
    # the upsampler conv 64 -> 256 at 192 x 192: bound by its MACs on the H100
    macs = 16 * 192 * 192 * 256 * 64 * 9
    r = cb.with_fp16_layer({"useful_macs": macs}, 16 * 64 * 192 * 192, 16 * 256 * 192 * 192, 256 * 64 * 9)
    assert r["H100_fp16_layer_us"] == pytest.approx(macs / 494.7e12 * 1e6, abs=1e-3)

    def row(variant, a100, h100):
        return {
            "variant": variant,
            "useful_macs": 2e9,
            "A100_us": a100,
            "H100_us": h100,
            "A100_fp16_layer_us": 3.0,
            "H100_fp16_layer_us": 2.0,
        }

    traffic = {"A100_other_us": 5.0, "H100_other_us": 3.0}
    graphs = {
        "g": {
            "roofline": {"0": row("f16mma", 4.0, 2.0), "1": row("s8mma", 2.0, 1.0)},
            "f16mma_convs": 1,
            "kernel_traffic": traffic,
        }
    }
    (g,) = graph_rows({"batch": 2, "graphs": graphs})
    assert (g["A100_us"], g["H100_us"], g["H100_others_us"]) == (3.0, 1.5, 3.0)
    assert (g["A100_fp16_layers_us"], g["H100_float_floor_us"]) == (3.0, 1.0)
    assert g["H100_fp16_us"] == pytest.approx(4e9 / 494.7e12 * 1e6 / 2)
    graphs["g"]["roofline"]["1"]["variant"] = "s4mma"  # an sm_80 build: no int4 tensor cores on the H100
    (g,) = graph_rows({"batch": 2, "graphs": graphs})
    assert g["H100_us"] is None and g["H100_others_us"] is None and g["A100_us"] == 3.0


def test_kernel_traffic_counts_the_lowered_calls():
    """Each PrimFunc call of the lowered graph moves its tensor arguments once: a conv kernel
    (by name) and two other kernels, counted against the shapes written out by hand."""
    from tvm import relax, te

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit_te(lambda a: te.compute((2, 6, 6, 8), lambda n, h, w, c: a[n, c, h, w]), x)
            y = bb.emit(
                relax.call_tir(
                    bb.add_func(
                        te.create_prim_func([te.placeholder((2, 6, 6, 8)), te.compute((2, 6, 6, 4), lambda *i: 0.0)]),
                        "qconv_s8mma_0",
                    ),
                    [t],
                    relax.TensorType((2, 6, 6, 4), "float32"),
                )
            )
            z = bb.emit_te(lambda a: te.compute((2, 4), lambda n, c: a[n, 0, 0, c] * 2.0), y)
            out = bb.emit_output(z)
        bb.emit_func_output(out)
    lowered = relax.transform.CallTIRRewrite()(bb.get())
    tr = cb.kernel_traffic(lowered, batch=2)
    conv = (2 * 6 * 6 * 8 + 2 * 6 * 6 * 4) * 4
    other = (2 * 8 * 6 * 6 + 2 * 6 * 6 * 8) * 4 + (2 * 6 * 6 * 4 + 2 * 4) * 4
    assert (tr["conv_kernels"], tr["other_kernels"]) == (1, 2)
    assert (tr["conv_bytes_per_patch"], tr["other_bytes_per_patch"]) == (conv // 2, other // 2)
    assert tr["H100_other_us"] == pytest.approx(other / 2 / 3.35e12 * 1e6, abs=1e-3)
    assert tr["other_top"][0]["bytes_per_patch"] == (2 * 8 * 6 * 6 + 2 * 6 * 6 * 8) * 4 // 2


def test_float_conv_folding_rule():
    """The folding of least roofline time within 1.3x issued / useful MACs: SRResNet's 9 x 9 tail (64 -> 3 at 384 x
    384) folds the kernel columns (N = 27 -> 32, output rows 8 wider); CARN's 3 x 3 tail needs rows
    and columns (27 -> 32 over the padded image); convs with many outputs fold nothing; the
    3-channel head, split in three fp16 pieces (9 channels, padded to 16), is over the limit
    whatever the folding: the fewest issued MACs."""
    tail9 = cb.float_conv_plan(16, 64, 3, 9, 384, 384)[0]
    assert tail9.folding == "kw" and tail9.shape == cc.Conv2dCudaShape(16, 64, 32, 384, 392, 9, kernel_w=1)
    assert (
        tail9.issued_macs / tail9.useful_macs == pytest.approx(32 / 27 * 392 / 384)
        and tail9.issued_macs <= 1.3 * tail9.useful_macs
    )
    tail3 = cb.float_conv_plan(16, 64, 3, 3, 384, 384)[0]
    assert tail3.folding == "khkw" and tail3.shape == cc.Conv2dCudaShape(16, 64, 32, 386, 386, 1)
    assert tail3.issued_macs / tail3.useful_macs == pytest.approx(32 / 27 * (386 / 384) ** 2)
    assert tail3.issued_macs <= 1.3 * tail3.useful_macs and tail3.epilogue == tail9.epilogue == "f16"
    # unfolded, CARN's tail would be faster by the roofline (its input dominates the bytes) but
    # computes 8 / 3 x the useful MACs: recorded beside the chosen plan, not taken
    over = tail3.report()["over_limit"]
    assert over["folding"] == "none" and over["issued_over_useful"] == pytest.approx(8 / 3, abs=1e-4)
    assert over["A100_us"] < tail3.roofline()["A100_us"] and over["H100_us"] < tail3.roofline()["H100_us"]
    # the 9 x 9 tail: "khkw" (248 of 243 channels) is within the limit too but writes 7.75x the
    # partial sums of "kw": the roofline keeps "kw"
    khkw9 = cb.FloatConvPlan(16, 64, 3, 9, 384, 384, "khkw")
    assert khkw9.issued_macs <= 1.3 * khkw9.useful_macs
    assert khkw9.roofline()["A100_us"] > tail9.roofline()["A100_us"] and "over_limit" not in tail9.report()
    up = cb.float_conv_plan(16, 64, 256, 3, 192, 192)[0]
    assert up.folding == "none" and up.issued_macs == up.useful_macs
    head = cb.float_conv_plan(16, 3, 64, 9, 96, 96)[0]
    assert head.folding == "none" and head.split == 3 and head.issued_macs * 3 == head.useful_macs * 16
    assert tail9.split == tail3.split == up.split == 1
    plan, why = cb.float_conv_plan(1, 16, 16, 3, 5, 5)  # 25 pixels: no 16-row tile in any folding
    assert plan is None and "N*H*W % 16" in why


def _f16_conv(x, w):
    """NCHW float64 conv of fp16-rounded operands ("same" padding): what f16mma computes, up to
    the fp32 rounding of its sums."""
    x16 = torch.from_numpy(np.asarray(x, np.float32).astype(np.float16).astype(np.float64))
    w16 = torch.from_numpy(np.asarray(w, np.float32).astype(np.float16).astype(np.float64))
    return torch.nn.functional.conv2d(x16, w16, padding=w.shape[-1] // 2).numpy()


def test_split_head_pack_and_twin_graph_are_fp32_grade():
    """A 3-channel head runs split: the pack kernel's channel blocks are fp16(x), fp16(x - fp16(x))
    and fp16(x) again (numpy's round to nearest even), and the rewritten graph (pack, kernel twin)
    is within fp32-grade error of a float64 conv of the unrounded operands, where plain fp16
    operands are not."""
    import tvm
    from refqsr_engine.engine.compiler.build import cpu_pipeline
    from refqsr_engine.kernels.tir_build import build_kernel
    from tvm import relax

    rng = np.random.default_rng(2)
    x = rng.random((2, 3, 8, 8)).astype(np.float32)
    pack = build_kernel("pack", cc.f16_pack_compute(2, 3, 8, 8, (1, 1, 1, 1), 16, split=3), 1, {"kind": "llvm"})
    halves = cc.unpack_halves(pack(x))[:, 1:-1, 1:-1]  # [N][H][W][16]
    hi = x.astype(np.float16).astype(np.float32).transpose(0, 2, 3, 1)
    lo = (x.transpose(0, 2, 3, 1) - hi).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(halves, np.concatenate([hi, lo, hi, np.zeros((2, 8, 8, 7), np.float32)], axis=3))

    wt = rng.standard_normal((64, 3, 3, 3)).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((2, 3, 8, 8), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.conv2d(xv, relax.const(wt), padding=[1] * 4)))
        bb.emit_func_output(y)
    mod, result = cb.rewrite_qdq_convs_cuda(bb.get(), [{"act_bits": 32, "module": "head"}], twin=True)
    assert result.float_plans[0]["split"] == 3 and result.float_plans[0]["kernel_problem"][0] == 16
    tgt = tvm.target.Target({"kind": "llvm"})
    exe = tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt))
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    xt, wt64 = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(wt.astype(np.float64))
    want = torch.nn.functional.conv2d(xt, wt64, padding=1).numpy()
    bound = torch.nn.functional.conv2d(xt.abs(), wt64.abs(), padding=1).numpy()
    assert np.all(np.abs(got - want) <= 2e-6 * bound)
    assert np.abs(_f16_conv(x, wt) - want).max() > 1e-4 * bound.max()  # what the split removes


FOLD_CASES = [(9, 4, 96, "kw"), (3, 46, 46, "khkw")]  # (K, H, W): sizes where the rule picks the folding


@pytest.mark.parametrize("k, h, w, folding", FOLD_CASES, ids=[c[3] for c in FOLD_CASES])
def test_folded_tail_replay_and_twin_graph_match_reference(k, h, w, folding):
    """A 16 -> 3 tail conv through the folded schedule: the numpy replay of the f16mma kernel on
    the folded weights plus the shift-add written out here from the documented index formula,
    and the rewritten Relax graph (pack, kernel twin, shift-add) built for LLVM, both against a
    float64 conv of the fp16-rounded operands; issued / useful <= 1.3."""
    import tvm
    from refqsr_engine.engine.compiler.build import cpu_pipeline
    from tvm import relax

    rng = np.random.default_rng(k)
    x = rng.standard_normal((1, 16, h, w)).astype(np.float32)
    wt = rng.standard_normal((3, 16, k, k)).astype(np.float32)
    want = _f16_conv(x, wt)
    bound = _f16_conv(np.abs(x), np.abs(wt))
    plan = cb.float_conv_plan(1, 16, 3, k, h, w)[0]
    assert plan.folding == folding and plan.issued_macs <= 1.3 * plan.useful_macs
    assert plan.epilogue == "f16"  # folded partial sums are stored in fp16
    a16, w16 = cc.pack_activations_f16(x, k), cc.pack_weights_f16(plan.weights(wt))
    part = cc.emulate_mma(plan.shape, a16, w16, False, "f16mma", plan.epilogue)
    assert part.dtype == np.float16

    def shift_add(p):
        total = np.zeros((1, 3, h, w), np.float64)
        for o in range(3):
            for i in range(k):
                for j in range(k):
                    if folding == "kw" and i == 0:
                        total[:, o] += p[:, :, j : j + w, o * k + j]
                    elif folding == "khkw":
                        total[:, o] += p[:, i : i + h, j : j + w, (o * k + i) * k + j]
        return total

    got = shift_add(part.astype(np.float64))
    # each partial sum rounded once to fp16: at most half an fp16 ulp (2**-11 relative) apart
    tol = 2e-5 * bound + 2.0**-11 * shift_add(np.abs(cc.emulate_f16mma(plan.shape, a16, w16)).astype(np.float64))
    assert np.all(np.abs(got - want) <= tol)
    assert np.abs(got - want).max() > 2e-5 * bound.max() / 4  # the fp16 store does round

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((1, 16, h, w), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.conv2d(xv, relax.const(wt), padding=[k // 2] * 4)))
        bb.emit_func_output(y)
    mod, result = cb.rewrite_qdq_convs_cuda(bb.get(), [{"act_bits": 32, "module": "tail"}], twin=True)
    assert result.convs[0].variant == "f16mma" and result.float_plans[0]["folding"] == folding
    assert result.float_plans[0]["issued_over_useful"] <= 1.3 and not result.f16_fallback
    tgt = tvm.target.Target({"kind": "llvm"})
    exe = tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt))
    out = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert out.shape == want.shape and np.all(np.abs(out - want) <= tol)


def test_rewritten_conv_output_fuses_with_what_follows():
    """The rewrite leaves no alias of a replaced conv's output (``y = lv``): FuseOps does not fuse
    across one, so the widening of the kernel's fp16 NHWC output to fp32 NCHW would run as a
    kernel of its own. After fusion: the pack, the conv kernel and one kernel for the widening,
    the bias add and the activation (a tanh: a ReLU would run in the kernel's epilogue)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((1, 16, 12, 12), "float32"))
    w = np.random.default_rng(0).standard_normal((16, 16, 3, 3)).astype(np.float32)
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=[1] * 4))
            y = bb.emit(relax.op.add(y, relax.const(np.ones((1, 16, 1, 1), np.float32))))
            out = bb.emit_output(bb.emit(relax.op.tanh(y)))
        bb.emit_func_output(out)
    mod, result = cb.rewrite_qdq_convs_cuda(bb.get(), [{"act_bits": 32, "module": "body"}], twin=True)
    assert result.convs[0].variant == "f16mma" and result.relu_folded == []
    bindings = [b for block in mod["main"].body.blocks for b in block.bindings]
    assert not any(isinstance(b.value, relax.Var) for b in bindings)
    calls = _call_tir_names(fuse_ops(mod))
    assert len(calls) == 3 and calls[1].startswith("fconv_f16mma")
    assert all(op in calls[2] for op in ("cast", "transpose", "add", "tanh"))


def _call_tir_names(mod) -> list[str]:
    from tvm import relax

    return [
        b.value.args[0].name_hint
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.call_tir"
    ]


def test_bias_relu_folds_into_the_conv_kernel():
    """``relu(conv(x) + b)`` read by two kernels (a residual add and a mean): the bias add and
    ReLU run in the f16mma kernel's store ("f16_relu", one rounding to fp16 after them), and both
    readers widen the kernel's fp16 NHWC output themselves, so no other kernel writes a
    feature map. The outputs against a float64 numpy conv of the fp16-rounded operands."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 12, 12)).astype(np.float32)
    w = (rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, (1, 16, 1, 1)).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=[1] * 4))
            r = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, relax.const(b)))))
            res = bb.emit_output(relax.op.add(r, xv))
            mean = bb.emit_output(relax.op.mean(r, axis=[2, 3], keepdims=False))  # as DDTB's bounds
        bb.emit_func_output(relax.Tuple([res, mean]))
    mod, result = cb.rewrite_qdq_convs_cuda(bb.get(), [{"act_bits": 32, "module": "body"}], twin=True)
    assert result.relu_folded == [0] and result.roofline[0]["epilogue"] == "f16_relu"
    assert result.half_tensors == 1  # r: a widening of the kernel's output, read twice
    calls = _call_tir_names(fuse_ops(mod))
    # the pack, the conv, the residual add and the mean (of the NHWC output, over its axes 1, 2)
    assert len(calls) == 4 and calls[1].startswith("fconv_f16mma") and "mean_of_half" in calls, calls
    exe = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    got_res, got_mean = (t.numpy() for t in relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)))
    r_got = got_res - x
    want = np.maximum(_f16_conv(x, w) + b, 0)
    assert 0.1 < np.mean(want == 0) < 0.9
    np.testing.assert_allclose(r_got, want, rtol=2e-3, atol=2e-3)
    # the kernel's fp16 output is what the readers see: r is fp16-representable (an fp32 bias add
    # after an fp16 store would not be), and the mean is over exactly those values
    r16 = (got_res - x).astype(np.float16)
    assert np.mean(np.abs(r_got - r16.astype(np.float32)) <= 1e-6 * np.abs(r_got).max()) > 0.99
    np.testing.assert_allclose(got_mean, want.mean(axis=(2, 3)), rtol=2e-3, atol=2e-3)


def _emit_relu_conv(builder, x, w: np.ndarray, b: np.ndarray):
    """Emit ``relu(conv3x3(x, w) + b)`` (padding 1) into ``builder``'s dataflow block."""
    from tvm import relax

    op, emit = relax.op, builder.emit
    return emit(op.nn.relu(emit(op.add(emit(op.nn.conv2d(x, relax.const(w), padding=[1] * 4)), relax.const(b)))))


def _one_input_graph(shape: tuple[int, ...], body):
    """An IRModule whose ``main(x)`` (fp32 ``shape``) returns ``body(builder, x)``'s output var."""
    from tvm import relax

    builder = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(shape, "float32"))
    with builder.function("main", [xv]):
        with builder.dataflow():
            out = builder.emit_output(body(builder, xv))
        builder.emit_func_output(out)
    return builder.get()


def test_one_by_one_conv_reads_concatenated_parts_in_place():
    """CARN's cascade: a 1x1 conv of ``concat((a, concat((b, c))))`` where a and b are ReLU'd
    conv outputs (fp16 NHWC kernel outputs) and c is not. The kernel reads a and b in place and
    c from one fp16 NHWC copy: no kernel concatenates or packs. The output against a float64
    numpy computation with the same fp16 roundings."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    wa, wb = ((rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32) for _ in range(2))
    ba, bb_ = (rng.uniform(-0.3, 0.3, (1, 16, 1, 1)).astype(np.float32) for _ in range(2))
    w1 = (rng.standard_normal((8, 48, 1, 1)) / 7).astype(np.float32)
    op = relax.op

    def body(builder, xv):
        emit = builder.emit
        a, b = _emit_relu_conv(builder, xv, wa, ba), _emit_relu_conv(builder, xv, wb, bb_)
        c = emit(op.add(xv, relax.const(np.float32(1))))
        cat = emit(op.concat([a, emit(op.concat([b, c], axis=1))], axis=1))
        return emit(op.nn.conv2d(cat, relax.const(w1)))

    table = [{"act_bits": 32, "module": "body"}] * 3
    mod, result = cb.rewrite_qdq_convs_cuda(_one_input_graph(x.shape, body), table, twin=True)
    assert result.input_parts == {2: {"parts": 3, "in_place": 2}} and sorted(result.relu_folded) == [0, 1]
    calls = _call_tir_names(fuse_ops(mod))
    assert not any("concatenate" in c for c in calls), calls
    assert sum("f16pack" in c for c in calls) <= 2, calls  # x, for the two 3x3 convs: nothing packs cat
    assert sum(c.startswith("fconv_f16mma") for c in calls) == 3
    exe = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    parts = [np.maximum(_f16_conv(x, w) + b, 0) for w, b in ((wa, ba), (wb, bb_))] + [x + np.float32(1)]
    want = _f16_conv(np.concatenate(parts, axis=1), w1)  # each part rounded to fp16, as the kernels store it
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_concatenation_of_parts_narrower_than_a_chunk_is_packed():
    """A 1x1 conv of three 12-channel tensors (36 channels, padded to 40 for the K chunks, as
    ELAN-light's 60-channel thirds): no in-place parts (a part must fill whole chunks), the
    concatenation packed as before, and the output against float64 numpy."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 12, 4, 8)).astype(np.float32)
    w = (rng.standard_normal((16, 36, 1, 1)) / 6).astype(np.float32)
    op = relax.op

    def body(builder, xv):
        emit = builder.emit
        parts = [xv, emit(op.add(xv, relax.const(np.float32(1)))), emit(op.multiply(xv, relax.const(np.float32(2))))]
        return emit(op.nn.conv2d(emit(op.concat(parts, axis=1)), relax.const(w)))

    mod, result = cb.rewrite_qdq_convs_cuda(
        _one_input_graph(x.shape, body), [{"act_bits": 32, "module": "body"}], twin=True
    )
    assert result.input_parts == {} and result.convs[0].variant == "f16mma"
    exe = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    cat = np.concatenate([x, x + np.float32(1), x * np.float32(2)], axis=1)
    want = _f16_conv(cat, w)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("relu", [True, False])
def test_pixel_shuffle_is_stored_by_the_producing_kernel(relu):
    """An upsampler: ``relu(conv(x) + b)`` (16 -> 64 channels; or the conv alone), the x2 pixel
    shuffle as ONNX exports it (reshape, permute, reshape) and a 3x3 conv of the result. The
    first kernel stores its output shuffled into the second conv's padded, packed operand: no
    kernel runs between the two convs. The output against a float64 numpy computation with
    torch's pixel_shuffle and the same fp16 roundings."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 16, 6, 8)).astype(np.float32)
    w1 = (rng.standard_normal((64, 16, 3, 3)) / 12).astype(np.float32)
    b1 = rng.uniform(-0.3, 0.3, (1, 64, 1, 1)).astype(np.float32)
    w2 = (rng.standard_normal((8, 16, 3, 3)) / 12).astype(np.float32)
    op = relax.op

    def body(builder, xv):
        emit = builder.emit
        y = _emit_relu_conv(builder, xv, w1, b1) if relu else emit(op.nn.conv2d(xv, relax.const(w1), padding=[1] * 4))
        y = emit(op.reshape(y, [1, 16, 2, 2, 6, 8]))
        y = emit(op.reshape(emit(op.permute_dims(y, [0, 1, 4, 2, 5, 3])), [1, 16, 12, 16]))
        return emit(op.nn.conv2d(y, relax.const(w2), padding=[1] * 4))

    table = [{"act_bits": 32, "module": "body"}] * 2
    mod, result = cb.rewrite_qdq_convs_cuda(_one_input_graph(x.shape, body), table, twin=True)
    assert result.shuffle_stores == [0] and result.relu_folded == ([0] if relu else [])
    calls = _call_tir_names(fuse_ops(mod))
    assert calls[1].startswith("fconv_f16mma") and calls[2].startswith("fconv_f16mma"), calls
    exe = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    first = np.maximum(_f16_conv(x, w1) + b1, 0) if relu else _f16_conv(x, w1)
    want = _f16_conv(torch.nn.functional.pixel_shuffle(torch.from_numpy(first), 2).numpy(), w2)
    assert want.shape == got.shape == (1, 8, 12, 16)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_nested_concats_flatten():
    """CARN's cascade: each concatenation extends the previous one. Flattened, every concat reads
    the parts (no concat of a concat) and the outputs equal numpy's concatenations."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((1, 2, 3, 3)).astype(np.float32) for _ in range(4)]
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType((1, 2, 3, 3), "float32")) for i in range(4)]
    with bb.function("main", xs):
        with bb.dataflow():
            c1 = bb.emit(relax.op.concat([xs[0], xs[1]], axis=1))
            c2 = bb.emit(relax.op.concat([c1, xs[2]], axis=1))
            c3 = bb.emit(relax.op.concat([c2, xs[3]], axis=1))
            out = bb.emit_output(relax.Tuple([relax.op.nn.relu(c1), relax.op.nn.relu(c2), relax.op.nn.relu(c3)]))
        bb.emit_func_output(out)
    mod = cb.flatten_concats(bb.get())
    concats = [
        b.value
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.concat"
    ]
    assert sorted(len(c.args[0].fields) for c in concats) == [2, 3, 4]
    tgt = tvm.target.Target({"kind": "llvm"})
    exe = tvm.compile(mod, target=tgt)
    got = relax.VirtualMachine(exe, tvm.cpu())["main"](*[tvm.runtime.tensor(p) for p in parts])
    for k, y in zip((2, 3, 4), got):
        np.testing.assert_array_equal(y.numpy(), np.maximum(np.concatenate(parts[:k], axis=1), 0))


def test_ptx_instruction_count():
    ptx = (
        "dp4a.u32.s32 %r1, %r2, %r3, %r4;\n dp4a.s32.s32 %r1, %r2, %r3, %r4;\n"
        "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 {..};\n"
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {..};\n"
        "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {..};\n"
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {..};"
    )
    assert cb.count_integer_instructions(ptx) == {"dp4a": 2, "mma_s4": 1, "mma_s8": 2, "mma_f16": 1}


# ----------------------------------------------------------------------------------------------
# the artifacts (nvcc, no GPU)


@needs_nvcc
def test_artifact_manifest(compiled):
    bits, model, artifact, report = compiled
    art = load_artifact(artifact, target=CUDA)
    man = art.manifest
    assert man["target"] == CUDA and man["bits"] == f"{bits[0]}-{bits[1]}" and man["float_math"] == "f16mma"
    assert man["cluster"]["device"] == "device" and man["clustering"] == "device"
    assert man["cluster"]["classes"] == model.clustblock.num_classes
    assert {"clustblock_b4.so", "reference_b4.so", "query_b4.so", "cluster.so", "query.onnx"} <= set(art.files)
    assert set(man["device_code"]) == {"clustblock", "reference", "query"}
    with pytest.raises(RefQSRError, match="target"):
        load_artifact(artifact, target={"kind": "llvm", "mcpu": "core-avx2"})
    for graph in man["graphs"].values():
        for act, variant in zip(graph["act_bits"], graph["variants"]):
            if act == 32:  # full precision: fp16 tensor cores
                assert variant == "f16mma"
            else:  # every quantized conv, ClustBlock's stride-3 first conv included (im2col)
                assert variant is not None, graph["float_quantized"]
        assert graph["float_quantized"] == {}
    assert man["graphs"]["clustblock"]["im2col"] == {"0": [3, 3, 3]}
    assert report["device_code"] == man["device_code"]
    # RefER matching + warp as the GPU-scheduled kernels in the query graph, the clustering on the device
    assert man["graphs"]["query"]["refer_warps"] == model.n_refer > 0
    assert man["graphs"]["reference"]["refer_warps"] == man["graphs"]["clustblock"]["refer_warps"] == 0
    assert man["cluster"]["arch"] == "sm_80" and man["cluster"]["kernels"] >= len(man["cluster"]["buckets"])
    # the runtime keeps each batch on the GPU: patches up, HR patches down, once per compiled batch
    assert man["runtime"] == {"resident": True, "copies_per_batch": {"to_device": 1, "to_host": 1}}


@needs_nvcc
def test_device_code_has_integer_instructions(compiled):
    bits, _, _, report = compiled
    code = report["device_code"]
    graphs = report["graphs"]
    # 8-bit ClustBlock: int8 tensor cores, dp4a only for the FC on BATCH pooled pixels (< 16 rows)
    assert code["clustblock"]["mma_s8"] > 0 and code["clustblock"]["mma_s4"] == 0
    assert graphs["clustblock"]["variants"] == ["s8mma", "s8mma", "s8mma", "dp4a"]
    assert list(graphs["clustblock"]["dp4a_why"]) == ["3"] and "N*H*W % 16" in graphs["clustblock"]["dp4a_why"]["3"]
    if bits == (8, 4):
        for name in ("reference", "query"):  # 8-bit blocks; 4-bit query convs have 6-bit weights
            assert code[name]["mma_s8"] > 0 and code[name]["mma_s4"] == 0 and code[name]["dp4a"] == 0
            assert set(graphs[name]["variants"]) == {"f16mma", "s8mma"} and code[name]["mma_f16"] > 0
    else:
        for name in ("reference", "query"):  # 4- and 3-bit activations, s4 weights: tensor cores
            assert code[name]["mma_s4"] > 0 and code[name]["dp4a"] == 0
            assert set(graphs[name]["variants"]) == {"f16mma", "s4mma"} and code[name]["mma_f16"] > 0
        assert 3 in graphs["query"]["act_bits"]


@slow
@needs_nvcc
def test_8bit_graph_uses_int8_tensor_cores_and_library_embeds_it(exported, tmp_path):
    built = cb.build_graph_cuda(onnx.load(str(exported((8, 4))["reference"])), "reference", BATCH, "sm_80")
    graph = built.report()
    assert graph["act_bits"].count(8) == 8 and graph["variants"].count("s8mma") == 8
    assert built.device_code["mma_s8"] > 0 and built.device_code["mma_s4"] == 0 and built.device_code["dp4a"] == 0
    ptx = cuda_toolchain.device_code(built.executable, sass=False)  # registered with the toolchain
    assert ".target sm_80" in ptx and "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32" in ptx  # u8 x s8
    assert "ld.local" not in ptx  # no register spills anywhere in the graph
    lib = tmp_path / "reference.so"
    built.executable.export_library(str(lib))
    assert cb.library_has_binary(lib, built.binary)  # the fatbin, not CUDA source, is in the library


# ----------------------------------------------------------------------------------------------
# the bundled models: every quantized conv an integer kernel, for sm_80 and sm_90

BUNDLED = [DEFAULT_ALIAS, "srresnet_ddtb4"]
#: about 80 s a compile here: two by default (the default model on sm_80, DDTB-4 on sm_90), all
#: four with REFQSR_SLOW_TESTS=1, and there also the 8-4 CARN (DDTB's asymmetric 8-bit weights,
#: shifted) and the SRResNet 4-3 on sm_80
BUNDLED_CASES = [(m, a) for m in BUNDLED for a in ("sm_80", "sm_90") if SLOW or (m == BUNDLED[0]) == (a == "sm_80")]
BUNDLED_CASES += [(m, "sm_80") for m in ("carn_ddtb_refqsr84", "srresnet_ddtb_refqsr43") if SLOW and m not in BUNDLED]


def _graph_mma(graph: dict, arch: str) -> str:
    """The integer tensor-core variant a bundled graph's convs take: int4 where every quantized
    conv has at most 4-bit activations and the arch has int4 tensor cores (sm_80), else int8."""
    low = max(a for a in graph["act_bits"] if a < 32) <= 4
    return "s4mma" if low and arch == "sm_80" else "s8mma"


@pytest.fixture(scope="module", params=BUNDLED_CASES, ids=[f"{m}-{a}" for m, a in BUNDLED_CASES])
def bundled(request, tmp_path_factory):
    """A bundled model compiled for CUDA at the shipped patch and batch (about a minute each)."""
    if not HAS_NVCC:
        pytest.skip("nvcc is not on PATH: CUDA artifacts cannot be built")
    name, arch = request.param
    out = tmp_path_factory.mktemp(f"{name}_{arch}") / "artifact"
    opts = CompileOptions(model=name, target="cuda", arch=arch, patch=96, batch=16)
    report = compile_model(opts, out, keep_onnx=False)
    return name, arch, out, report


@needs_nvcc
def test_bundled_model_convs_are_all_tensor_core(bundled):
    """Every quantized conv an integer tensor-core kernel, every full-precision conv f16mma (no
    dlight fallback), each with its roofline; the tails' folding within 1.3x issued MACs."""
    name, arch, artifact, report = bundled
    man = load_artifact(artifact, target={"kind": "cuda", "arch": arch}).manifest
    expected = {"clustblock", "reference", "query"} if "refqsr" in name else {"sr"}
    assert set(man["graphs"]) == expected
    shifted = 0
    for graph_name, graph in man["graphs"].items():
        assert graph["float_quantized"] == {}, (graph_name, graph["float_quantized"])
        for act, variant, wr, shift in zip(
            graph["act_bits"], graph["variants"], graph["weight_ranges"], graph["weight_shifts"]
        ):
            assert (variant == "f16mma") == (act == 32)
            if variant != "f16mma":
                lo, hi = (-8, 7) if variant == "s4mma" else (-128, 127)
                assert lo <= wr[0] - shift and wr[1] - shift <= hi  # the kernel's operand holds w - c
                shifted += shift != 0
        assert graph["integer_convs"] == sum(a < 32 for a in graph["act_bits"])
        # tensor cores for every conv at batch 16: int4 for graphs of at most 4-bit activations on
        # sm_80 (DDTB-4, the 4-3 models' reference and query), int8 otherwise
        mma = _graph_mma(graph, arch)
        assert {v for v in graph["variants"] if v != "f16mma"} == {mma} and graph["dp4a_why"] == {}
        roof = graph["roofline"]
        assert sorted(roof, key=int) == [str(i) for i, v in enumerate(graph["variants"]) if v]
        for i, r in roof.items():
            assert r["A100_us"] > 0 and r["H100_us"] > 0
            if graph["variants"][int(i)] != "f16mma":
                assert 1.0 <= r["issued_over_useful"] <= 1.2
        # the lowered graph's conv kernel calls move what the per-conv bounds say they must
        # (two counts: the calls' tensor arguments against the shape formulas)
        traffic = graph["kernel_traffic"]
        assert traffic["conv_kernels"] == len(roof) and traffic["other_kernels"] > 0
        conv_bytes = sum(r["bytes"] for r in roof.values()) / man["batch"]
        assert traffic["conv_bytes_per_patch"] == pytest.approx(conv_bytes, rel=1e-2)
        assert graph["f16_fallback"] == {} and graph["f16mma_convs"] == graph["act_bits"].count(32)
        # the SR graphs' kernels pass activations in fp16 and run bias + ReLU in their epilogues
        # where they can; the ClustBlock's logits stay exact
        assert (graph["half_tensors"] > 0) == (graph_name != "clustblock")
        assert graph_name != "clustblock" or graph["relu_epilogues"] == []
        for i, r in roof.items():
            assert (r["epilogue"] in cc.RELU_EPILOGUES) == (int(i) in graph["relu_epilogues"])
        # CARN: the cascade's twelve 1x1 convs read their concatenations' parts in place, and the
        # upsampler's two convs store their outputs pixel-shuffled into the next convs' operands
        carn = name.startswith("carn") and graph_name != "clustblock"
        ones = [i for i, p in graph["f16mma"].items() if p["kernel_problem"][2:] == [1, 1] and p["folding"] == "none"]
        assert sorted(graph["input_parts"], key=int) == (sorted(ones, key=int) if carn else [])
        assert all(2 <= p["parts"] <= 4 and 0 <= p["in_place"] <= p["parts"] for p in graph["input_parts"].values())
        assert len(graph["shuffle_stores"]) == (2 if carn else 0)
        # DDTB's gate means of conv outputs come from the producing kernels' tile sums
        # (CARN's: SRResNet's means read PReLU outputs, which no kernel stores)
        assert not (carn and "ddtb" in name) or graph["tile_sum_means"] >= len(graph["tile_sums"]) > 0
        assert all(roof[str(i)]["tile_sums"][1] % 8 == 0 for i in graph["tile_sums"])  # counted in its bytes
        assert not carn or not any("concatenate" in k["kernel"] for k in traffic["other_top"])
        assert sorted(graph["f16mma"], key=int) == [str(i) for i, a in enumerate(graph["act_bits"]) if a == 32]
        splits = []
        for i, plan in graph["f16mma"].items():
            c, o = plan["kernel_problem"][:2]
            if plan["split"] == 3:  # the RGB head: 3 x 3 channels padded to 16
                splits.append(i)
                assert c == 16 and plan["issued_over_useful"] == pytest.approx(16 / 3, abs=1e-4)
            elif o == 32:  # the 64 -> 3 tail, folded
                assert plan["folding"] != "none" and plan["issued_over_useful"] <= 1.3
            else:
                assert plan["folding"] == "none" and plan["issued_over_useful"] == 1.0
            assert roof[i]["variant"] == "f16mma"
        assert splits == (["0"] if graph["f16mma_convs"] else [])
        if graph["f16mma_convs"]:
            assert man["device_code"][graph_name]["mma_f16"] > 0
    if name == "carn_ddtb_refqsr84":
        assert shifted > 0  # DDTB's asymmetric 8-bit weights beyond s8 are among them
    for graph_name, counts in man["device_code"].items():
        mma = _graph_mma(man["graphs"][graph_name], arch)
        assert counts["dp4a"] == 0 and counts["mma_s4" if mma == "s4mma" else "mma_s8"] > 0, graph_name


@needs_nvcc
def test_bundled_model_sass_has_tensor_cores_and_no_spills(bundled):
    """The compiled device code itself (``cuobjdump -sass`` of the fatbin): every integer conv
    kernel issues tensor-core IMMA instructions and every float conv kernel HMMA, and no kernel
    of any graph spills registers to local memory (LDL/STL)."""
    if cuda_toolchain.sass_tools() is None:
        pytest.skip(
            "cuobjdump or nvdisasm missing (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm): no SASS counts"
        )
    name, arch, artifact, _ = bundled
    man = load_artifact(artifact, target={"kind": "cuda", "arch": arch}).manifest
    for graph_name, graph in man["graphs"].items():
        sass = graph["sass"]
        assert sass is not None and sass["kernels"] > 0
        kernels = sass["conv_kernels"]
        assert kernels  # convs of one shape share a kernel
        floats = [k for k in kernels if k.startswith("fconv_f16mma_")]
        assert bool(floats) == ("f16mma" in graph["variants"]), (graph_name, sorted(kernels))
        for kernel, counts in kernels.items():
            mma, other = ("HMMA", "IMMA") if kernel in floats else ("IMMA", "HMMA")
            assert counts[mma] > 0 and counts[other] == 0 and counts["IDP"] == 0, (graph_name, kernel, counts)
            assert counts["LDL"] == 0 and counts["STL"] == 0, (graph_name, kernel, counts)
            assert counts["local_bytes"] == 0 and counts["shared_bytes"] > 0, (graph_name, kernel, counts)
        assert sass["conv_totals"]["IMMA"] == sum(c["IMMA"] for c in kernels.values())
        assert sass["conv_totals"]["HMMA"] == sum(c["HMMA"] for c in kernels.values())
        assert sass["local_memory"] == [] and sass["all_totals"]["LDL"] == sass["all_totals"]["STL"] == 0


# ----------------------------------------------------------------------------------------------
# the rewrite's math on the CPU: the same rewritten graph with LLVM twins vs ONNX Runtime

#: 8-4 ClustBlock: s8 tensor cores on uint8 asymmetric activations, shifted -127..128 weights,
#: "valid" padding, the stride-3 3-channel conv as an im2col 1x1 conv (27 -> 32 channels) and the
#: 1x1 FC on dp4a; 4-3 query: s4 tensor cores on 3/4-bit grids of int8 containers (offset 4/8)
#: and the RefER warps as the (CPU-scheduled) RefER kernels, and the same on sm_90 with s8 tensor cores; DDTB 8-4
#: reference: asymmetric 8-bit weights beyond s8 (weight shift); DDTB 8-4 CARN reference: the
#: bias-and-ReLU epilogues and the residual blocks' relu(conv + b + x) in the integer kernels
TWIN_CASES = [
    ("pams", (8, 4), "clustblock", "sm_80", "srresnet"),
    ("pams", (4, 3), "query", "sm_80", "srresnet"),
    ("pams", (4, 3), "query", "sm_90", "srresnet"),
    ("ddtb", (8, 4), "reference", "sm_80", "srresnet"),
    ("ddtb", (8, 4), "reference", "sm_90", "carn"),
]


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


@pytest.mark.parametrize(
    "scheme, bits, name, arch, net",
    TWIN_CASES,
    ids=[f"{net}-{sc}-{b[0]}-{b[1]}-{n}-{a}" for sc, b, n, a, net in TWIN_CASES],
)
def test_rewritten_graph_on_llvm_equals_onnxruntime(exported, scheme, bits, name, arch, net):
    import tvm
    from tvm import relax

    graphs = exported(bits, scheme, net)
    model = onnx.load(str(graphs[name]))
    exe, result = cb.build_graph_twin(model, BATCH, arch=arch, half_storage=cb.stores_half(name))
    assert (result.half_tensors > 0) == (name != "clustblock")
    epilogues = {r["epilogue"] for r in result.roofline.values()}
    if net == "carn":  # every residual block but the first reads its input in the integer kernel
        assert {"dequant_ws_res_relu", "dequant_ws_relu", "f16_relu"} <= epilogues, epilogues
    variants = {c.variant for c in result.convs}
    assert ("s4mma" if bits == (4, 3) and arch == "sm_80" else "s8mma") in variants
    assert arch == "sm_80" or "s4mma" not in variants
    assert not result.float_reasons  # every quantized conv is an integer conv
    if scheme == "ddtb" and net == "carn" and name != "clustblock":  # gate means from the kernels' tile sums
        assert result.tile_sum_means > 0 and result.tile_sums
    # every full-precision conv on fp16 tensor cores (their fp16 rounding is within the 50 dB below)
    assert not result.f16_fallback
    assert all((c.variant == "f16mma") == (c.act_bits == 32) for c in result.convs)
    if name == "clustblock":
        assert 0 in result.im2col and result.convs[0].variant == "s8mma"
    if scheme == "ddtb":  # weights beyond s8 run shifted
        beyond = [
            c.index
            for c in result.convs
            if c.weight_range and not -128 <= min(c.weight_range) <= max(c.weight_range) <= 127
        ]
        assert beyond and all(result.weight_shifts[i] != 0 for i in beyond)
    feeds = _feeds(graphs, name)
    want = _onnxruntime(graphs[name], feeds)[0]
    out = relax.VirtualMachine(exe, tvm.cpu())["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input])
    got = (out if hasattr(out, "numpy") else out[0]).numpy()
    if name == "clustblock":  # logits: no [0, 1] image range
        # integer sums are exact, the float conv's are not: a value on a rounding tie of the next
        # quantizer may move by one step in one sample, so most samples must agree to 1e-6
        top = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * top)
        assert np.sum(np.abs(got - want).max(axis=1) <= 1e-6 * top) >= BATCH - 1
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
