"""ELAN-light through the compiler: a small ELAN-RefQSR model (4 LFE blocks = 2 pairs, the last two
LFEs replaced by RefER, DDTB 8-4) -> `compile` -> artifact -> compiled runtime, against PyTorch.

ELAN brings what the conv networks do not have: window attention (MatMul, Softmax, the window
partition's Reshape/Transpose, the shifted windows' roll as Slice/Concat), the shift-conv's
Pad/Slice/Concat, BatchNorm folded into the 1x1 projections, and attention shared by the two
modules of a pair. The patch (48) is a multiple of every window (16) and of the RefER pooling.
"""

from __future__ import annotations

import numpy as np
import pytest
from compile_helpers import (
    assert_compiled_image_matches,
    assert_images_match,
    close_patches,
    compile_saved,
    torch_paths,
)
from refqsr_engine.engine.compiler.compile_model import compile_model
from refqsr_engine.engine.compiler.options import CompileOptions
from refqsr_engine.engine.runtime import CompiledModel
from refqsr_engine.kernels import cuda_toolchain
from refqsr_engine.models.checkpoint import save_model
from skimage import data
from test_elan import _calibrated_refqsr

PATCH = 48
BATCH = 2
#: per graph: head, then per LFE (or RefER) its two convs, per GMSA its projections in and out
#: (the first module of a pair projects to q and v, the second to v only), then the tail
QUANTIZED = [False] + [True, True, False, False] * 4 + [False]
#: the 4-bit query path's rounding ties move a few pixels by 2-4 levels (as for the bundled SRResNet)
WITHIN_ONE = 0.995


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    model = _calibrated_refqsr(PATCH)
    return (model, *compile_saved(model, tmp_path_factory.mktemp("elan"), PATCH, BATCH))


def test_compiled_image_equals_pytorch(compiled):
    model, artifact, _ = compiled
    lr = data.astronaut()[100:220, 180:330].astype(np.float32).transpose(2, 0, 1) / 255.0
    assert_compiled_image_matches(model, artifact, lr, PATCH, BATCH, WITHIN_ONE)


def test_reference_and_query_paths_each_match(compiled):
    model, artifact, _ = compiled
    engine = CompiledModel.load(artifact)
    refs, queries = close_patches(BATCH, PATCH)
    hr, feats = engine.reference(refs)
    want_hr, want_feats, want_q = torch_paths(model, refs, queries)
    assert_images_match(hr, want_hr, within_one=WITHIN_ONE)
    assert len(feats) == len(want_feats) == 2  # the inputs of the last two LFEs
    for got_f, want_f in zip(feats, want_feats):
        assert np.abs(got_f - want_f).max() <= 1e-2 * float(np.abs(want_f).max())
    assert_images_match(engine.query(queries, want_feats), want_q, within_one=WITHIN_ONE)


def test_lfe_convs_are_integer_attention_stays_float(compiled):
    _, _, report = compiled
    for name in ("reference", "query"):
        graph = report["graphs"][name]
        assert [b < 32 for b in graph["act_bits"]] == QUANTIZED, name
        assert [v is not None for v in graph["variants"]] == QUANTIZED, name
    query = report["graphs"]["query"]
    assert query["refer_warps"] == 2  # both RefER warps became the compiled warp kernel
    assert query["act_bits"][1:3] == [8, 8] and query["act_bits"][5:7] == [4, 4]  # LFE 0 high, LFE 1 low
    assert query["act_bits"][9:11] == query["act_bits"][13:15] == [8, 8]  # RefER refinement at b_high


@pytest.mark.slow
@pytest.mark.skipif(not cuda_toolchain.nvcc_available(), reason="nvcc is not on PATH: CUDA artifacts cannot be built")
def test_cuda_build_puts_the_lfe_convs_on_integer_kernels(tmp_path):
    """ELAN-light's real width (60 channels, padded to the int8 kernel's 16-channel chunks)."""
    model = _calibrated_refqsr(PATCH, n_feats=60)
    save_model(tmp_path / "model.pt", model, {}, half=False)
    opts = CompileOptions(model=str(tmp_path / "model.pt"), target="cuda", arch="sm_80", patch=PATCH, batch=BATCH)
    report = compile_model(opts, tmp_path / "artifact")
    for name in ("reference", "query"):
        assert [v not in (None, "f16mma") for v in report["graphs"][name]["variants"]] == QUANTIZED, name
