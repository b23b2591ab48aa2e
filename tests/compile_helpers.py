"""Shared by the export, compile and runtime tests: small models (4 blocks keep export and compile
quick), ONNX Runtime runners (``InferenceSession``) and the image-match criterion."""

from __future__ import annotations

import numpy as np
import torch
from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.models.registry import build_refqsr

PATCH = 24
N_BLOCKS = 4


def small_refqsr(
    scheme: str,
    b_high: int = 8,
    b_low: int = 4,
    seed: int = 3,
    patch: int = PATCH,
    arch: str = "srresnet",
    n_blocks: int = N_BLOCKS,
    matching: str = "paper",
):
    """A freshly initialised RefQSR model with calibrated quantizers (and a varying DDTB gate)."""
    torch.manual_seed(seed)
    clust = ClustBlock(16)
    clust.calibrate(torch.rand(6, 3, patch, patch))
    model = build_refqsr(arch, scheme, b_high, b_low, clust, n_blocks=n_blocks, matching=matching)
    model.train()
    model(torch.rand(4, 3, patch, patch), torch.rand(4, 3, patch, patch))  # initialise quantizer ranges
    if scheme == "ddtb":  # make the dynamic gate actually vary per sample
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "gate") and m.gate is not None:
                    m.gate.fc2.weight.normal_(0, 0.5)
                    m.gate.fc2.bias.uniform_(-0.5, 0.5)
    return model.eval()


def psnr(got: np.ndarray, want: np.ndarray) -> float:
    """PSNR (dB) between two float images in [0, 1]."""
    mse = float(np.mean((np.asarray(got, np.float64) - want) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-30))


def assert_images_match(got: np.ndarray, want: np.ndarray, within_one: float = 0.999) -> None:
    """The engine's equality bar against PyTorch / ONNX Runtime: PSNR >= 50 dB and a share
    ``within_one`` of 8-bit pixels within 1 level. (Exact equality is not the right bar: a float
    conv summed in another order can move a value across a rounding tie of the next quantizer,
    which then changes by one quantization step.)"""
    assert psnr(got, want) >= 50.0
    g8 = np.clip(np.round(np.asarray(got) * 255), 0, 255)
    w8 = np.clip(np.round(np.asarray(want) * 255), 0, 255)
    assert np.mean(np.abs(g8 - w8) <= 1) >= within_one


def ort_session(path, optimize: bool = False):
    """An ONNX Runtime CPU ``InferenceSession``, 2 threads; without optimisation (plain QDQ semantics) unless
    ``optimize`` (then ORT fuses QDQ into its int8 kernels)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def compile_saved(model, root, patch: int, batch: int, threads: int = 2):
    """Save ``model`` under ``root`` and compile it for this CPU: (artifact folder, compile report)."""
    from refqsr_engine.engine.compiler.compile_model import compile_model
    from refqsr_engine.engine.compiler.options import CompileOptions
    from refqsr_engine.models.checkpoint import save_model

    save_model(root / "model.pt", model, {"note": "test model"}, half=False)
    report = compile_model(
        CompileOptions(model=str(root / "model.pt"), patch=patch, batch=batch, threads=threads), root / "artifact"
    )
    return root / "artifact", report


def assert_compiled_image_matches(
    model, artifact, lr: np.ndarray, patch: int, batch: int, within_one: float = 0.999
) -> None:
    """A whole image through the compiled artifact equals the PyTorch model run patch-wise: the
    same clustering, both paths used, and :func:`assert_images_match`."""
    from refqsr_engine.engine.runtime import CompiledModel
    from refqsr_engine.models.patchwise import upscale_patchwise
    from refqsr_engine.pipeline.patchwise import run_patchwise

    got = run_patchwise(CompiledModel.load(artifact), lr, patch, 6, batch)
    want = upscale_patchwise(model, lr, patch, 6, batch)
    np.testing.assert_array_equal(got.clustering.reference_of, want.clustering.reference_of.numpy())
    assert got.clustering.num_references > 0 and got.clustering.num_queries > 0  # both paths ran
    assert_images_match(got.image, want.image, within_one)


def close_patches(batch: int, patch: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random reference patches and queries close to them (as the clustering pairs them in use)."""
    rng = np.random.default_rng(seed)
    refs = rng.random((batch, 3, patch, patch), dtype=np.float32)
    return refs, np.clip(refs + rng.normal(0, 0.02, refs.shape).astype(np.float32), 0, 1)


def torch_paths(model, refs: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The PyTorch RefQSR model's reference HR, RefER features and query HR (hard matching)."""
    with torch.no_grad():
        hr, feats = model.reference_forward(torch.from_numpy(refs))
        query = model.query_forward(torch.from_numpy(queries), list(feats), hard=True)
    return hr.numpy(), [f.numpy() for f in feats], query.numpy()


def fuse_ops(mod):
    """``mod`` through the build pipelines' legalize and fusion steps (LegalizeOps,
    AnnotateTIROpPattern, FuseOps, FuseTIR), in the current target context."""
    import tvm
    from tvm import relax

    passes = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    return tvm.transform.Sequential(passes)(mod)
