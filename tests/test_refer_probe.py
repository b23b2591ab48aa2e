"""`python -m research.refer_probe`: what a RefQSR model's RefER gets, four ways.

Each mode is checked against the network run by hand on the query patch (``query_forward`` /
``reference_forward`` with explicit features), and the CLI's ``high`` row against the backbone run
at b_high on every patch by the plain SR path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from refqsr_engine.metrics import psnr_y
from refqsr_engine.models.checkpoint import save_model
from refqsr_engine.models.patchwise import TorchRunner, upscale_patchwise
from refqsr_engine.models.qconv import BitSpec
from refqsr_engine.training.datasets import PairedFolder
from refqsr_engine.training.reference_modes import ReferenceModeRunner
from refqsr_helpers import small_refqsr

from research.refer_probe import main, probe


@pytest.fixture(scope="module")
def model():
    return small_refqsr(2, tau=-1.0)  # tau -1: every other patch is a query of the first


def test_each_mode_feeds_refer_what_it_says(model):
    q = np.random.default_rng(0).random((2, 3, 24, 24), dtype=np.float32)
    ref = np.random.default_rng(1).random((2, 3, 24, 24), dtype=np.float32)
    xq, xr = torch.from_numpy(q), torch.from_numpy(ref)
    with torch.no_grad():
        ref_feats = model.reference_forward(xr)[1]
        own_high_out, own_high_feats = model.reference_forward(xq)
        want = {
            "assigned": model.query_forward(xq, ref_feats),
            "self": model.query_forward(xq, None),
            "aligned": model.query_forward(xq, own_high_feats),
            "high": own_high_out,
            "skip": _refinement_zeroed(model).query_forward(xq, ref_feats),
        }
    got = {m: ReferenceModeRunner(model, reference=m).query(q, [f.numpy() for f in ref_feats]) for m in want}
    np.testing.assert_array_equal(TorchRunner(model).query(q, [f.numpy() for f in ref_feats]), got["assigned"])
    for mode in want:
        np.testing.assert_allclose(got[mode], want[mode].numpy(), rtol=0, atol=1e-6, err_msg=mode)
    assert not np.allclose(got["assigned"], got["aligned"])  # the modes are really different inputs


def _refinement_zeroed(model):
    """A copy whose RefER refinements output exactly zero (second conv's weight and bias zeroed):
    each RefER returns its input, which is what ``skip`` must give."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for refer in zeroed.refers:
            refer.conv2.conv.weight.zero_()
            refer.conv2.conv.bias.zero_()
    return zeroed


def test_unknown_mode_is_refused(model):
    with pytest.raises(ValueError, match="reference must be one of"):
        ReferenceModeRunner(model, reference="other")


def test_cli_table_and_the_high_row_is_the_backbone_at_b_high(model, tmp_path):
    from skimage import data

    (tmp_path / "val").mkdir()
    hr = data.astronaut()[:384, :744].copy()  # 96 x 186 LR: two 96-px patches, a reference and a query
    Image.fromarray(hr).save(tmp_path / "val" / "a.png")
    save_model(tmp_path / "r.pt", model, half=False)
    folder = PairedFolder(tmp_path / "val", 4, None, None)
    result = probe(model, folder)
    pair = folder[0]
    lr = pair.lr.transpose(2, 0, 1).astype(np.float32) / 255.0
    high = upscale_patchwise(model.backbone, lr, 96, 6, bits=BitSpec(8, 8)).image
    high8 = np.clip(np.round(high * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    assert result["modes"]["high"]["psnr_y"] == pytest.approx(psnr_y(high8, hr, 4), abs=1e-6)
    assert len({round(r["psnr_y"], 6) for r in result["modes"].values()}) == 5

    res = CliRunner().invoke(main, [str(tmp_path / "r.pt"), "--val", str(tmp_path / "val")])
    assert res.exit_code == 0, res.output
    lines = [
        ln for ln in res.output.splitlines() if ln.startswith("| ") and "RefER input" not in ln and "---" not in ln
    ]
    assert [ln.split("|")[1].strip() for ln in lines] == ["assigned", "self", "aligned", "high", "skip"]
    assert float(lines[3].split("|")[2]) == pytest.approx(result["modes"]["high"]["psnr_y"], abs=1e-3)
    room = result["modes"]["high"]["psnr_y"] - result["modes"]["skip"]["psnr_y"]
    assert f"Room for RefER (high - skip): {room:+.3f} dB" in res.output
    assert "maps onto themselves" in res.output and len(result["self_match"]) == 2


def test_cli_refuses_a_model_without_refer(tmp_path):
    from refqsr_engine.models.registry import build_sr

    (tmp_path / "val").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "val" / "a.png")
    save_model(tmp_path / "s.pt", build_sr("srresnet", "ddtb", (8,), n_blocks=2).eval(), half=False)
    res = CliRunner().invoke(main, [str(tmp_path / "s.pt"), "--val", str(tmp_path / "val")])
    assert res.exit_code == 2 and "needs a RefQSR model" in res.output


def test_self_match_counter_scores_the_argmax_flow(model):
    from research.refer_probe import SelfMatchCounter

    # 4 x 4 pooling cells, each a different one-hot channel: every cell's best match is itself
    distinct = torch.zeros(1, 64, 12, 12)
    for a in range(4):
        for b in range(4):
            distinct[0, a * 4 + b, 3 * a : 3 * a + 3, 3 * b : 3 * b + 3] = 1.0
    same = torch.zeros(1, 64, 12, 12)
    same[0, 5] = 1.0  # every cell alike: arg-max ties go to cell 0, so only cell 0 finds itself
    counter = SelfMatchCounter(model)
    with torch.no_grad():
        model.refers[0](distinct, distinct.clone(), hard=True)
        model.refers[1](same, same.clone(), hard=True)
    counter.remove()
    assert counter.pixels == [144, 144]
    assert counter.shares()[0] == 1.0
    assert counter.shares()[1] < 0.25
    with torch.no_grad():
        model.refers[0](distinct, distinct, hard=True)  # removed hooks count nothing
    assert counter.pixels == [144, 144]


def test_self_match_counter_scores_the_shared_flow():
    """With shared matching the counter reads the one flow per query: in aligned mode (the
    query's own block-1 features) an 8-bit cosine finds every cell of distinct features."""
    from compile_helpers import small_refqsr as compile_small_refqsr

    from research.refer_probe import SelfMatchCounter

    model = compile_small_refqsr("ddtb", matching="shared")
    counter = SelfMatchCounter(model)
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        model.query_forward(x, model.reference_forward(x)[1])  # aligned
        model.query_forward(x, model.reference_forward(torch.flip(x, dims=(3,)))[1])
    counter.remove()
    assert counter.pixels == [2 * 2 * 24 * 24]
    assert 0.5 < counter.shares()[0] < 0.95  # the aligned half all, the mirrored half mostly not


def test_feature_error_runner_scores_the_last_refer_against_the_block_at_b_high(model):
    """Per query batch: mean |last RefER output - last block's output with the patch wholly at
    b_high|, both taken here with forward hooks (a plain backbone call at b_high for the target);
    in 'skip' the feature in the last RefER's place is the output of the last block before the
    RefERs; 'self' and 'assigned' give different errors; 'high' runs no RefER and scores nothing."""
    from research.refer_probe import FeatureErrorRunner

    q = np.random.default_rng(2).random((2, 3, 24, 24), dtype=np.float32)
    ref = np.random.default_rng(3).random((2, 3, 24, 24), dtype=np.float32)
    xq = torch.from_numpy(q)
    with torch.no_grad():
        ref_feats = [f.numpy() for f in model.reference_forward(torch.from_numpy(ref))[1]]
    kept: dict[str, torch.Tensor] = {}
    handles = [
        model.refers[-1].register_forward_hook(lambda m, a, o: kept.__setitem__("refer", o)),
        model.backbone.blocks[model.first_refer - 1].register_forward_hook(
            lambda m, a, o: kept.setdefault("before", o)
        ),
        model.backbone.blocks[-1].register_forward_hook(lambda m, a, o: kept.__setitem__("high", o)),
    ]
    errors = {}
    for mode in ("assigned", "self", "skip"):
        kept.clear()
        with torch.no_grad():
            model.query_forward(xq, None if mode == "self" else [torch.from_numpy(f) for f in ref_feats])
            model.backbone(xq, BitSpec(8, 8))
        mine = kept["before"] if mode == "skip" else kept["refer"]
        want = float((mine - kept["high"]).abs().mean())
        runner = FeatureErrorRunner(model, mode)
        runner.query(q, ref_feats)
        assert runner.mean_error() == pytest.approx(want, rel=1e-6), mode
        errors[mode] = want
    for h in handles:
        h.remove()
    assert errors["assigned"] != pytest.approx(errors["self"], rel=1e-3)
    assert errors["skip"] != pytest.approx(errors["assigned"], rel=1e-3)
    high = FeatureErrorRunner(model, "high")
    high.query(q, ref_feats)
    assert high.mean_error() is None
