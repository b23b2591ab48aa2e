"""The bundled default model loads and upscales a held-out photo better than bicubic."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from refqsr_engine.engine.models_store import DEFAULT_MODEL, bundled_models, resolve_model
from refqsr_engine.metrics import bicubic_degrade, imresize, psnr_y, sr_to_uint8
from refqsr_engine.models.checkpoint import load_model
from refqsr_engine.models.model_info import model_bits
from refqsr_engine.models.patchwise import upscale_patchwise


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()[64:320, 128:384].copy()  # held out of training (validation image)


@pytest.mark.parametrize("name", [DEFAULT_MODEL] + bundled_models())
def test_bundled_models_beat_bicubic(photo, name):
    model, card = load_model(resolve_model(name))
    lr = bicubic_degrade(photo, 4)
    sr = upscale_patchwise(
        model, lr.transpose(2, 0, 1).astype(np.float32) / 255.0, patch=48, overlap=6, bits=model_bits(model)
    ).image  # each model at the bits it was trained for
    sr8 = np.clip(np.round(sr * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    bicubic = np.floor(np.clip(imresize(lr, scale=4.0), 0, 255) + 0.5).astype(np.uint8)
    ours, theirs = psnr_y(sr8, photo, 4), psnr_y(bicubic, photo, 4)
    assert ours > theirs + MARGIN_DB, (ours, theirs)
    assert card["steps"] > 0 and card["validation"]["mean"]["psnr_y"] > card["validation"]["mean"]["bicubic_psnr_y"]


def test_default_is_a_ddtb_refqsr_model_at_its_card_bits():
    from refqsr_engine.models.refqsr import RefQSR

    model, card = load_model(resolve_model(DEFAULT_MODEL))
    assert isinstance(model, RefQSR) and model.backbone.scheme == "ddtb"
    assert f"{model.b_high}-{model.b_low}" == card["bits"]
    assert card["task"] == "refqsr" and card["tail"] == "refer" and model.clustblock is not None


MARGIN_DB = 0.05


def _init_ranges(model, *inputs) -> None:
    model.train()
    with torch.no_grad():
        model(*inputs)
    model.eval()


def test_bundle_runs_models_at_their_own_bits(tmp_path):
    """The model card's quality and BitOPs come from running the model as it runs: a DDTB-4 model
    at 4 bits (not at full precision), a RefQSR model with its ClustBlock's assignment."""
    from PIL import Image
    from refqsr_engine.models.checkpoint import save_model
    from refqsr_engine.models.clustblock import ClustBlock
    from refqsr_engine.models.qconv import BitSpec
    from refqsr_engine.models.registry import build_refqsr, build_sr
    from refqsr_engine.training.bundle import bundle
    from skimage import data

    val = tmp_path / "val"
    val.mkdir()
    hr = data.astronaut()[100:196, 200:296].copy()
    Image.fromarray(hr).save(val / "a.png")
    torch.manual_seed(0)
    sr4 = build_sr("srresnet", "ddtb", (4,), n_blocks=4)
    _init_ranges(sr4, torch.rand(2, 3, 24, 24), BitSpec(4, 4))
    save_model(tmp_path / "d4.pt", sr4, half=False)
    card = json.loads(bundle(tmp_path / "d4.pt", "d4", val, out_dir=tmp_path).with_suffix(".json").read_text())
    lr = bicubic_degrade(hr, 4).transpose(2, 0, 1).astype(np.float32) / 255.0
    at4 = upscale_patchwise(sr4, lr, 96, 6, bits=BitSpec(4, 4)).image
    sr8 = np.clip(np.round(at4 * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    assert card["validation"]["mean"]["psnr_y"] == pytest.approx(psnr_y(sr8, hr, 4), abs=1e-9)
    assert card["validation"]["images"][0]["fqr"] == 4.0
    # 4 blocks, not the preset's 16: a quarter of the paper's 2.3176 G for 4-bit SRResNet
    assert card["bitops_urban100_setting"]["bitops_g"] == pytest.approx(2.3176 / 4, abs=1e-4)

    clust = ClustBlock(8)
    clust.calibrate(torch.rand(4, 3, 48, 48))
    refqsr = build_refqsr("srresnet", "pams", 8, 4, clust, tau=-1.0, n_blocks=4)
    _init_ranges(refqsr, torch.rand(2, 3, 24, 24), torch.rand(2, 3, 24, 24))
    save_model(tmp_path / "r.pt", refqsr, half=False)
    card = json.loads(bundle(tmp_path / "r.pt", "r", val, out_dir=tmp_path).with_suffix(".json").read_text())
    row = card["validation"]["images"][0]
    assert card["bitops_urban100_setting"]["bits"] == "8-4"
    assert 0 < row["reference_share"] <= 1 and 4.0 <= row["fqr"] <= 8.0

    # δ (CADyQ): BitOPs from the bits chosen per patch. Selectors forced to 8 bits everywhere cost
    # what the fixed 8-bit network costs, here and (estimated) at the Urban100 setting.
    from refqsr_engine.models.quant_cadyq import Delta, dynamic_convs

    cadyq = build_sr("srresnet", "cadyq", n_blocks=4)
    _init_ranges(cadyq, torch.rand(2, 3, 24, 24), Delta())
    for conv in dynamic_convs(cadyq):
        conv.selector.linear.weight.data.zero_()
        conv.selector.linear.bias.data.copy_(torch.tensor([0.0, 0.0, 1.0]))  # candidates (4, 6, 8): always 8
    save_model(tmp_path / "c.pt", cadyq, half=False)
    card = json.loads(bundle(tmp_path / "c.pt", "c", val, out_dir=tmp_path).with_suffix(".json").read_text())
    sr8 = build_sr("srresnet", "ddtb", (8,), n_blocks=4)
    _init_ranges(sr8, torch.rand(2, 3, 24, 24), BitSpec(8, 8))
    save_model(tmp_path / "d8.pt", sr8, half=False)
    card8 = json.loads(bundle(tmp_path / "d8.pt", "d8", val, out_dir=tmp_path).with_suffix(".json").read_text())
    assert card["bitops_urban100_setting"]["bits"] == "delta" and card["validation"]["images"][0]["fqr"] == 8.0
    assert card["validation"]["mean"]["bitops_g"] == pytest.approx(card8["validation"]["mean"]["bitops_g"], rel=1e-9)
    assert card["bitops_urban100_setting"]["bitops_g"] == pytest.approx(
        card8["bitops_urban100_setting"]["bitops_g"], abs=1e-4
    )


def _pytorch_noise_floor(pytorch, x: np.ndarray, want8: np.ndarray) -> tuple[float, int]:
    """PyTorch against itself with the input moved by 1e-6 (under a thousandth of one 8-bit level,
    the size of float reordering): the share of 8-bit pixels within one level, and the largest
    difference, the worst of three draws of the noise. Values on a rounding tie of a 4-bit grid (one
    step is 1/15 of a layer's range; 1/7 at 3 bits), or an arg-max tie of the shared flow, move some
    output pixels by a few levels with no error anywhere; how many depends on the trained ranges,
    so the compiled engine is held to this."""
    share, largest = 1.0, 0
    for seed in range(3):
        noisy = x + 1e-6 * np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
        diff = np.abs(sr_to_uint8(pytorch(noisy).image).astype(int) - want8)
        share, largest = min(share, float(np.mean(diff <= 1))), max(largest, int(diff.max()))
    return share, largest


def compiled_and_pytorch(
    name: str, lr: np.ndarray, root, patch: int = 24, mcpu: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Bundled model ``name`` compiled for this CPU (``patch`` px patches, batch 4) and in PyTorch, on one
    LR image (uint8 HxWx3), checked equal: the same clustering, PSNR >= 50 dB, and 8-bit pixels
    within one level as often as PyTorch's own output under float-sized input noise
    (:func:`_pytorch_noise_floor`; at least 99.5 % where that is higher), none further apart than 3
    levels or one more than that noise moves them. ``mcpu`` compiles for another x86 CPU than this one
    (it must run here). Returns both 8-bit images (compiled, PyTorch)."""
    from refqsr_engine.engine.compiler.compile_model import compile_model
    from refqsr_engine.engine.compiler.options import CompileOptions
    from refqsr_engine.engine.runtime import CompiledModel
    from refqsr_engine.pipeline.patchwise import run_patchwise

    x = lr.transpose(2, 0, 1).astype(np.float32) / 255.0
    opts = CompileOptions(model=name, patch=patch, batch=4, threads=2)
    compile_model(opts if mcpu is None else dataclasses.replace(opts, mcpu=mcpu), root / "art")
    run = run_patchwise(CompiledModel.load(root / "art"), x, patch, 6, 4)
    model, _ = load_model(resolve_model(name))

    def pytorch(lr_chw: np.ndarray):  # the model patch-wise at its own bits, as the engine runs it
        return upscale_patchwise(model, lr_chw, patch, 6, 4, bits=model_bits(model))

    ref = pytorch(x)
    got, want = run.image, ref.image
    assert got.shape == (3, 4 * lr.shape[0], 4 * lr.shape[1])
    if ref.clustering is not None:
        np.testing.assert_array_equal(run.clustering.reference_of, ref.clustering.reference_of.numpy())
    assert 10 * np.log10(1.0 / float(np.mean((got.astype(np.float64) - want) ** 2))) >= 50.0
    g8, w8 = sr_to_uint8(got), sr_to_uint8(want)
    diff = np.abs(g8.astype(int) - w8)
    floor_share, floor_max = _pytorch_noise_floor(pytorch, x, w8)
    assert np.mean(diff <= 1) >= min(0.995, floor_share - 0.005), (np.mean(diff <= 1), floor_share)
    assert diff.max() <= max(3, floor_max + 1), (diff.max(), floor_max)
    return g8, w8


def test_default_model_compiled_for_this_cpu_beats_bicubic_and_equals_pytorch(photo, tmp_path):
    """The user's main job end to end on the compiled llvm engine: the bundled default model,
    compiled, on a real held-out photo -- size, quality above bicubic, and PyTorch's output."""
    crop = photo[:128, :128]
    lr = bicubic_degrade(crop, 4)
    g8, _ = compiled_and_pytorch(DEFAULT_MODEL, lr, tmp_path)
    bicubic = np.floor(np.clip(imresize(lr, scale=4.0), 0, 255) + 0.5).astype(np.uint8)
    assert psnr_y(g8, crop, 4) > psnr_y(bicubic, crop, 4) + MARGIN_DB


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "carn_ddtb_refqsr84",
        "elan_light_ddtb8",
        "elan_light_ddtb_refqsr84",
        "elan_light_pams_refqsr84",
        "srresnet_cadyq",
        "srresnet_cadyq_refqsr3",
        "srresnet_cabm_refqsr3",
    ],
)
def test_bundled_models_of_every_kind_compiled_equal_pytorch(photo, tmp_path, name):
    """Every architecture and every kind of bits (fixed, RefQSR, δ, δ-RefQSR) as bundled, trained
    (48 px patches: ELAN-light pads to a multiple of 16, RefER pools by 3)."""
    compiled_and_pytorch(name, bicubic_degrade(photo[:192, :256], 4), tmp_path, patch=48)


@pytest.mark.parametrize("name", ["srresnet_ddtb_refqsr43", "carn_ddtb_refqsr43"])
def test_4_3_models_run_wholly_on_the_low_bit_avx2_kernel_and_equal_pytorch(photo, tmp_path, name):
    """The all-low-bit RefQSR models compiled for an AVX2-only CPU (core-avx2: no AVX-512, no VNNI):
    the reference (4-bit) and query (3-bit activations, 4-bit weights) convs all on the u4 x s4
    vpmaddubsw kernel, the ClustBlock's 8-bit convs integer, and the output PyTorch's."""
    assert name in bundled_models()
    compiled_and_pytorch(name, bicubic_degrade(photo[:96, :96], 4), tmp_path, mcpu="core-avx2")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    graphs = manifest["graphs"]
    for graph in ("reference", "query"):
        quantized = [v for b, v in zip(graphs[graph]["act_bits"], graphs[graph]["variants"]) if b != 32]
        assert quantized and set(quantized) == {"lowbit"}, (graph, graphs[graph]["variants"])
    # queries: 3-bit activations, the first block and RefER's convs at the reference's 4 bits
    assert set(graphs["query"]["act_bits"]) - {32} == {3, 4} and set(graphs["reference"]["act_bits"]) - {32} == {4}
    cb = graphs["clustblock"]
    assert all(v is not None for b, v in zip(cb["act_bits"], cb["variants"]) if b != 32), cb["variants"]
