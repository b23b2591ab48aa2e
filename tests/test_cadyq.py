"""CADyQ (models/quant_cadyq.py) and δ-RefQSR against independent twins.

* the selector's features (numpy Sobel twin of the image gradient, unbiased std) and its hard choice;
* one CADyQ conv: forward = per-sample loop of a numpy PAMS fake-quant conv at the chosen bits;
  selector gradient = autograd of the softmax-mixed ("soft") twin; bit loss value and gradient by hand;
* networks: gradients reach every selector, an untrained CADyQ net is its 8-bit PAMS net, batch
  invariance, δ-RefQSR's paths (which block gets which bits), save/load round trips;
* BitOPs/FQR from the bits actually chosen, against hand counts;
* 3-step training runs of ``train qat --scheme cadyq`` and ``train refqsr --scheme cadyq --bits delta-3``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refqsr_engine.errors import RefQSRError
from refqsr_engine.models.bitops import PatchBits, Precision, count_bitops, patch_bits_of_run
from refqsr_engine.models.checkpoint import bits_label, load_model, model_config, save_model
from refqsr_engine.models.qconv import BitSpec, QuantConv2d
from refqsr_engine.models.quant_cadyq import (
    CadyqConv2d,
    Delta,
    DynamicRefER,
    Selection,
    dynamic_convs,
    image_gradient_features,
)
from refqsr_engine.models.refqsr import RefQSR
from refqsr_engine.models.registry import build_refqsr, build_sr
from torch import nn
from training_helpers import tiny_training_setup

GRAY = np.array([0.299, 0.587, 0.114])


def np_image_grad(x: np.ndarray) -> np.ndarray:
    """[N, 2]: mean |Sobel/8| of the gray image (edge-replicated border) in x and y, times 1e3."""
    g = np.einsum("nchw,c->nhw", x.astype(np.float64), GRAY)
    p = np.pad(g, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = g.shape[1:]

    def win(dy: int, dx: int) -> np.ndarray:
        return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (win(-1, 1) + 2 * win(0, 1) + win(1, 1) - win(-1, -1) - 2 * win(0, -1) - win(1, -1)) / 8
    gy = (win(1, -1) + 2 * win(1, 0) + win(1, 1) - win(-1, -1) - 2 * win(-1, 0) - win(-1, 1)) / 8
    return np.stack([np.abs(gx).mean(axis=(1, 2)), np.abs(gy).mean(axis=(1, 2))], axis=1) * 1e3


def np_pams(x: np.ndarray, alpha: float, bits: int) -> np.ndarray:
    levels = 2 ** (bits - 1) - 1
    return np.round(np.clip(x.astype(np.float64), -alpha, alpha) * levels / alpha) * alpha / levels


@torch.no_grad()
def grad_selector(conv: CadyqConv2d, t1: float = 30.0, t2: float = 50.0, scale: float = 0.1) -> CadyqConv2d:
    """Set the selector to pick 4 / 6 / 8 bits below t1 / between / above t2 of the summed image
    gradient G (logits 0, s(G - t1), s(2G - t1 - t2)), with a small random weight on the std."""
    lin = conv.selector.linear
    lin.weight.normal_(0, 1e-3)
    lin.weight[:, :2] = torch.tensor([[0.0], [scale], [2 * scale]])
    lin.bias.copy_(torch.tensor([0.0, -scale * t1, -scale * (t1 + t2)]))
    return conv


def _ready_conv(cin: int = 4, cout: int = 5, seed: int = 0) -> CadyqConv2d:
    """A CADyQ conv with set (initialised) activation ranges and a selector that varies its choice."""
    torch.manual_seed(seed)
    conv = CadyqConv2d(cin, cout, 3)
    for b, alpha in zip(conv.candidates, (0.9, 1.3, 2.1)):
        conv.act_quant[str(b)].alpha.data.fill_(alpha)
        conv.act_quant[str(b)].initialized.fill_(True)
    return grad_selector(conv)


def _bound(images: torch.Tensor) -> Selection:
    return Selection().bind(images, nn.Module())


def _images(n: int, size: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    amp = torch.linspace(0.05, 0.5, n).view(n, 1, 1, 1)
    return (0.5 + amp * (torch.rand(n, 3, size, size, generator=g) - 0.5)).clamp(0, 1)


# --------------------------------------------------------------------------- selector and one conv


def test_image_gradient_features_match_numpy_sobel():
    x = _images(4, 10)
    np.testing.assert_allclose(image_gradient_features(x).numpy(), np_image_grad(x.numpy()), rtol=1e-5, atol=1e-4)


def test_selector_logits_and_the_untrained_choice():
    conv = CadyqConv2d(4, 4, 3)
    x, images = torch.randn(3, 4, 6, 6), _images(3)
    feats = np.concatenate(
        [np_image_grad(images.numpy()), x.numpy().astype(np.float64).std(axis=(2, 3), ddof=1)], axis=1
    )
    w, b = (p.detach().double().numpy() for p in (conv.selector.linear.weight, conv.selector.linear.bias))
    logits = conv.selector(image_gradient_features(images), x)
    np.testing.assert_allclose(logits.detach().numpy(), feats @ w.T + b, rtol=1e-5)
    conv.eval()
    conv(x, _bound(images))
    assert conv.last_bits.tolist() == [8, 8, 8]  # CADyQ's start: the highest width everywhere


def _twin_choice(conv: CadyqConv2d, x: torch.Tensor, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(bits chosen per sample, softmax probabilities) from numpy features and the selector's weights."""
    feats = np.concatenate(
        [np_image_grad(images.numpy()), x.detach().numpy().astype(np.float64).std(axis=(2, 3), ddof=1)], axis=1
    )
    w, b = (p.detach().double().numpy() for p in (conv.selector.linear.weight, conv.selector.linear.bias))
    z = feats @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return np.array(conv.candidates)[z.argmax(axis=1)], p / p.sum(axis=1, keepdims=True)


def test_conv_output_is_the_per_sample_pams_conv_at_the_chosen_bits():
    conv = _ready_conv()
    x, images = torch.randn(6, 4, 7, 7), _images(6)
    bits, _ = _twin_choice(conv, x, images)
    assert len(set(bits.tolist())) >= 2, "the test selector should pick different widths"
    for mode in ("train", "eval"):
        conv.train(mode == "train")
        sel = _bound(images)
        out = conv(x, sel)
        assert conv.last_bits.tolist() == bits.tolist() and sel.records[0].bits.tolist() == bits.tolist()
        w = conv.conv.weight.detach().double().numpy()
        wq = torch.from_numpy(np_pams(w, float(np.abs(w).max()), 8))  # weights at CADyQ's 8 bits
        for i, b in enumerate(bits):
            alpha = conv.act_quant[str(b)].alpha.item()
            xi = torch.from_numpy(np_pams(x[i : i + 1].numpy(), alpha, int(b)))
            twin = F.conv2d(xi, wq, conv.conv.bias.detach().double(), padding=1)
            np.testing.assert_allclose(out[i : i + 1].detach().double().numpy(), twin.numpy(), atol=2e-5)


def test_straight_through_gradient_is_the_soft_mix_gradient():
    """Forward = hard choice; backward = gradient of sum_k p_k q_k(x) (CADyQ's straight-through)."""
    conv = _ready_conv().train()
    x0, images = torch.randn(5, 4, 6, 6), _images(5)
    g = torch.randn(5, 5, 6, 6)
    x = x0.clone().requires_grad_(True)
    (conv(x, _bound(images)) * g).sum().backward()

    # twin: the same quantizers and weights, mixed by the softmax, no hard part at all
    w_sel = conv.selector.linear.weight.detach().clone().requires_grad_(True)
    b_sel = conv.selector.linear.bias.detach().clone().requires_grad_(True)
    xt = x0.clone().requires_grad_(True)
    feats = torch.cat([image_gradient_features(images), xt.detach().std(dim=(2, 3))], dim=1)
    p = torch.softmax(F.linear(feats, w_sel, b_sel), dim=1)
    soft = sum(p[:, k].view(-1, 1, 1, 1) * conv.act_quant[str(b)](xt) for k, b in enumerate(conv.candidates))
    wq = conv.quantized_weight(8)
    (F.conv2d(soft, wq, conv.conv.bias, padding=1) * g).sum().backward()
    torch.testing.assert_close(conv.selector.linear.weight.grad, w_sel.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.selector.linear.bias.grad, b_sel.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-4, atol=1e-5)
    assert conv.selector.linear.bias.grad.abs().sum() > 0


def test_bit_loss_value_and_gradient_by_hand():
    conv = _ready_conv().train()
    x, images = torch.randn(6, 4, 6, 6), _images(6)
    bits, p = _twin_choice(conv, x, images)
    sel = _bound(images)
    conv(x, sel)
    conv(x, sel)  # two layers' worth of terms (the same conv twice)
    expected_bits = np.array(conv.candidates, dtype=np.float64)
    mean_b = p @ expected_bits  # E_p[b] per sample
    assert float(sel.bit_loss().detach()) == pytest.approx(2 * np.mean(bits / mean_b), rel=1e-5)
    sel.bit_loss().backward()
    # d/dz_k of mean_i(E_i) / stopgrad(E_i): p_ik (b_k - E_i) / E_i / N, times 2 calls
    dz = 2 * p * (expected_bits[None, :] - mean_b[:, None]) / mean_b[:, None] / len(bits)
    np.testing.assert_allclose(conv.selector.linear.bias.grad.numpy(), dz.sum(axis=0), rtol=1e-4, atol=1e-7)
    assert (conv.selector.linear.bias.grad[-1] > 0) and (conv.selector.linear.bias.grad[0] < 0)  # descent lowers bits


def test_eval_records_no_bit_terms_and_delta_needs_binding():
    conv = _ready_conv().eval()
    sel = _bound(_images(2))
    conv(torch.randn(2, 4, 5, 5), sel)
    assert sel.records[0].term is None and float(sel.bit_loss()) == 0.0
    with pytest.raises(TypeError, match="network"):
        conv(torch.randn(2, 4, 5, 5), Delta())
    with pytest.raises(TypeError, match="CADyQ"):
        QuantConv2d(4, 4, 3, "pams", (8,))(torch.randn(1, 4, 5, 5), Delta())
    with pytest.raises(ValueError, match="already bound"):
        sel.bind(_images(2), nn.Module())


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("arch, n_blocks", [("srresnet", 4), ("carn", 4)])
def test_network_gradient_reaches_every_selector(arch, n_blocks):
    torch.manual_seed(0)
    net = build_sr(arch, "cadyq", n_blocks=n_blocks, n_feats=8).train()
    convs = dynamic_convs(net)
    assert len(convs) == 2 * n_blocks and net.act_bits() == [4, 6, 8]
    sel = Selection()
    out = net(_images(2, 10), sel)
    assert [id(r.conv) for r in sel.records] == [id(c) for c in convs]  # call order = module order
    (out.abs().mean() + 1e-3 * sel.bit_loss()).backward()
    for conv in convs:
        assert conv.selector.linear.weight.grad is not None and conv.selector.linear.weight.grad.abs().sum() > 0
        assert conv.last_bits.shape == (2,)


def test_untrained_cadyq_net_is_its_8bit_net_and_batch_invariant():
    torch.manual_seed(0)
    net = build_sr("srresnet", "cadyq", n_blocks=4, n_feats=8).train()
    x = _images(3, 10)
    net(x, Delta())  # initialises the quantizer ranges
    net.eval()
    torch.testing.assert_close(net(x, Delta()), net(x, BitSpec(8, 8)), rtol=0, atol=0)
    for conv in dynamic_convs(net):  # now a selector that varies its choice
        grad_selector(conv)
    batched = net(x, Delta())
    assert net.blocks[0].conv1.last_bits.tolist() == [4, 6, 8]  # one width per patch
    singles = torch.cat([net(x[i : i + 1], Delta()) for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-6)


def test_delta_refqsr_paths_use_the_right_bits():
    torch.manual_seed(0)
    model = build_refqsr("srresnet", "cadyq", 8, 3, n_blocks=6, n_feats=8)
    assert model.dynamic and (model.b_high, model.b_low, model.b_medium) == (8, 3, 6)
    assert all(isinstance(r, DynamicRefER) for r in model.refers) and model.backbone.act_bits() == [3, 4, 6, 8]
    seen: dict[int, object] = {}
    for k, block in enumerate(model.backbone.blocks):
        block.register_forward_pre_hook(lambda m, args, k=k: seen.__setitem__(k, args[1]))
    model.eval()
    x = _images(2, 12)
    sel_r, sel_q = Selection(), Selection()
    _, feats = model.reference_forward(x, sel_r)
    assert all(seen[k] is sel_r for k in range(6)) and len(sel_r.records) == 12
    seen.clear()
    model.query_forward(x, feats, selection=sel_q)
    assert seen[0] is sel_q and all(seen[k] == BitSpec(3, 6) for k in (1, 2, 3)) and set(seen) == {0, 1, 2, 3}
    refer_convs = [m for r in model.refers for m in (r.conv1, r.conv2)]
    recorded = [id(r.conv) for r in sel_q.records]
    assert recorded == [id(c) for c in (model.backbone.blocks[0].conv1, model.backbone.blocks[0].conv2, *refer_convs)]
    assert model.backbone.blocks[2].conv1.last_bits.tolist() == [3, 3]
    with pytest.raises(ValueError, match="δ-RefQSR"):
        build_refqsr("srresnet", "pams", 8, 3, n_blocks=6, n_feats=8).reference_forward(x, Selection())


@pytest.mark.parametrize("kind", ["sr", "refqsr"])
def test_save_load_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "sr":
        model = build_sr("carn", "cadyq", n_blocks=4, n_feats=8)
    else:
        model = build_refqsr("srresnet", "cadyq", 8, 4, n_blocks=5, n_feats=8)
    for k, conv in enumerate(dynamic_convs(model)):
        grad_selector(conv, 20.0 + 5 * k, 45.0 + 5 * k)
    save_model(tmp_path / "m.pt", model, half=False)
    loaded, _ = load_model(tmp_path / "m.pt")
    cfg = model_config(loaded)
    assert cfg["scheme"] == "cadyq" and cfg["candidates"] == [4, 6, 8]
    assert bits_label(cfg) == ("δ" if kind == "sr" else "δ-4")
    model.eval()
    x = _images(2, 12)
    if kind == "sr":
        torch.testing.assert_close(loaded(x, Delta()), model(x, Delta()), rtol=0, atol=0)
    else:
        torch.testing.assert_close(loaded(x, x), model(x, x), rtol=0, atol=0)
    for a, b in zip(dynamic_convs(loaded), dynamic_convs(model)):
        assert torch.equal(a.selector.linear.weight, b.selector.linear.weight)


# --------------------------------------------------------------------------- BitOPs from chosen bits


def test_precision_parses_delta_settings():
    assert Precision.parse("delta") == Precision(8, None, True) and Precision.parse("δ").label == "δ"
    assert Precision.parse("delta-3") == Precision(8, 3, True) and Precision.parse("δ-4").label == "δ-4"
    assert Precision.parse("8-4") == Precision(8, 4) and Precision.parse("8-4").label == "8-4"
    for bad in ["delta-9", "delta3", "deltax", "delta-", "δ-1"]:
        with pytest.raises(ValueError):
            Precision.parse(bad)
    with pytest.raises(ValueError, match="patch_bits"):
        count_bitops("srresnet", (96, 96), "delta", 96, 6, "engine")


def test_bitops_from_chosen_bits_by_hand():
    n_feats, macs = 8, 8 * 8 * 9  # every SRResNet block conv: C*C*9 MACs per LR pixel
    a, b = BitSpec(4, 8), BitSpec(8, 8)
    # one 16x16 image, 16-px patches, no overlap: 1 patch; then 2x1 patches on a 16x32 image
    pb1 = PatchBits(((a, b), (b, b), (a, a), (BitSpec(6, 8), a)))
    report = count_bitops("srresnet", (16, 16), "delta", 16, 0, "engine", patch_bits=[pb1], n_blocks=4, n_feats=n_feats)
    acts = [4, 8, 8, 8, 4, 4, 6, 4]
    hand = sum(2 * macs * 256 * (8 / 32) * (act / 32) for act in acts)
    assert report.total.network == pytest.approx(hand, rel=1e-12)
    assert report.total.fqr == pytest.approx(np.mean(acts), rel=1e-12) and report.precision == "δ"
    # δ-3 RefQSR: a reference and a query (block 0 at δ, blocks 1 low (3, 6), two RefERs at δ)
    low = BitSpec(3, 6)
    ref = PatchBits(((b, b),) * 4)
    query = PatchBits(((a, b), (low, low)), ((a, a), (b, a)), 3)
    report = count_bitops(
        "srresnet",
        (16, 32),
        "delta-3",
        16,
        0,
        "engine",
        is_reference=[True, False],
        reference_of=[0, 0],
        patch_bits=[ref, query],
        n_blocks=4,
        n_feats=n_feats,
        n_refer=2,
    )
    conv = lambda act, w: 2 * macs * 256 * (w / 32) * (act / 32)  # noqa: E731
    positions = 6 * 6  # ceil(16 / 3) squared, for query and reference alike
    ref_convs = [(8, 8)] * 8
    query_convs = [(4, 8), (8, 8), (3, 6), (3, 6), (4, 8), (4, 8), (8, 8), (4, 8)]  # (act, weight) in call order
    hand_cost_volume = 2 * 2 * positions * positions * n_feats * (3 / 32) ** 2
    hand = sum(conv(act, w) for act, w in ref_convs + query_convs) + hand_cost_volume
    assert report.total.network == pytest.approx(hand, rel=1e-12)
    assert report.total.fqr == pytest.approx(np.mean([act for act, _ in ref_convs + query_convs]), rel=1e-12)
    assert report.num_references == 1 and report.total.clustblock > 0 and report.precision == "δ-3"


def test_patch_bits_of_a_run_are_the_recorded_choices():
    torch.manual_seed(0)
    model = build_refqsr("srresnet", "cadyq", 8, 3, n_blocks=5, n_feats=8).eval()
    for k, conv in enumerate(dynamic_convs(model)):
        grad_selector(conv, 20.0 + 5 * k, 45.0 + 5 * k)
    x = _images(3, 12)
    sel_r, sel_q = Selection(), Selection()
    _, feats = model.reference_forward(x, sel_r)
    ref_bits = [[(c.last_bits.tolist()) for c in (blk.conv1, blk.conv2)] for blk in model.backbone.blocks]
    assert {b for blk in ref_bits for c in blk for b in c} == {4, 6, 8}  # the selectors do differ
    model.query_forward(x, feats, selection=sel_q)
    for i, pb in enumerate(patch_bits_of_run(model, sel_r, "reference")):
        assert [[s.act for s in blk] for blk in pb.blocks] == [[c[i] for c in blk] for blk in ref_bits]
        assert all(s.weight == 8 for blk in pb.blocks for s in blk) and not pb.refers
    net = model.backbone
    for i, pb in enumerate(patch_bits_of_run(model, sel_q, "query")):
        assert len(pb.blocks) == model.first_refer and len(pb.refers) == 2 and pb.match_bits == 3
        assert [s.act for s in pb.blocks[0]] == [
            int(net.blocks[0].conv1.last_bits[i]),
            int(net.blocks[0].conv2.last_bits[i]),
        ]
        assert all(s == BitSpec(3, 6) for blk in pb.blocks[1:] for s in blk)
        assert [s.act for s in pb.refers[1]] == [
            int(model.refers[1].conv1.last_bits[i]),
            int(model.refers[1].conv2.last_bits[i]),
        ]


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    return tiny_training_setup(tmp_path_factory.mktemp("cadyq"))[0]


def _cfg(setup, out: Path, task: str, bits: str, steps: int, **kw):
    from refqsr_engine.training.loop import TrainConfig

    return TrainConfig(
        data=str(setup["root"]),
        out=str(out),
        steps=steps,
        task=task,
        bits=bits,
        batch=2,
        lr_patch=16,
        teacher=str(setup["teacher"]),
        val_every=steps,
        val_crop=64,
        ckpt_every=1,
        quiet=True,
        clustblock=str(setup["clust"]) if task == "refqsr" else None,
        tau=-1.0,
        **kw,
    )


def test_train_qat_cadyq_three_steps(setup, tmp_path):
    from refqsr_engine.training.loop import train

    out = train(_cfg(setup, tmp_path / "cadyq", "qat", "delta", 3, scheme="cadyq", bit_weight=1e-3), log=lambda s: None)
    assert out["step"] == 3
    model, card = load_model(tmp_path / "cadyq" / "best.pt")
    assert dynamic_convs(model) and card["scheme"] == "cadyq" and card["bits"] == "delta" and card["bit_weight"] == 1e-3
    assert np.isfinite(card["val_psnr_y"]) and bits_label(model_config(model)) == "δ"
    # the selectors trained (they start with all weights 1)
    assert any(not torch.all(c.selector.linear.weight == 1) for c in dynamic_convs(model))


def test_train_refqsr_cadyq_delta3_three_steps(setup, tmp_path):
    from refqsr_engine.training.loop import train

    out = train(_cfg(setup, tmp_path / "rq", "refqsr", "delta-3", 3, scheme="cadyq"), log=lambda s: None)
    assert out["step"] == 3
    model, card = load_model(tmp_path / "rq" / "best.pt")
    assert isinstance(model, RefQSR) and model.dynamic and (model.b_high, model.b_low, model.b_medium) == (8, 3, 6)
    assert card["bits"] == "delta-3" and np.isfinite(card["val_psnr_y"])


def test_bad_delta_settings(setup, tmp_path):
    from refqsr_engine.training.loop import train

    with pytest.raises(RefQSRError, match="--bits delta"):
        train(_cfg(setup, tmp_path / "a", "qat", "8", 1, scheme="cadyq"), log=lambda s: None)
    with pytest.raises(RefQSRError, match="needs --scheme cadyq"):
        train(_cfg(setup, tmp_path / "b", "qat", "delta", 1, scheme="pams"), log=lambda s: None)
    with pytest.raises(RefQSRError, match="b_high-b_low"):
        train(_cfg(setup, tmp_path / "c", "refqsr", "delta", 1, scheme="cadyq"), log=lambda s: None)


def test_delta_networks_export_only_at_delta(tmp_path):
    """A CADyQ network's bits are chosen per patch: exporting it at fixed bits is refused in one line."""
    from refqsr_engine.errors import RefQSRError
    from refqsr_engine.export.onnx_export import export_sr
    from refqsr_engine.models.qconv import BitSpec

    with pytest.raises(RefQSRError, match="per patch"):
        export_sr(build_sr("srresnet", "cadyq", n_blocks=2).eval(), BitSpec(8, 8), tmp_path, 24)
    with pytest.raises(RefQSRError, match="per patch"):
        export_sr(build_sr("srresnet", "pams", (8,), n_blocks=2).eval(), Delta(), tmp_path, 24)


def _varied_selectors(model: nn.Module) -> nn.Module:
    for k, conv in enumerate(dynamic_convs(model)):
        grad_selector(conv, 20.0 + 5 * k, 45.0 + 5 * k)
    return model


def _photo_lr(size: int = 40) -> np.ndarray:
    from skimage import data

    img = data.astronaut()[100 : 100 + 4 * size, 150 : 150 + 4 * size]
    return np.ascontiguousarray(img[::4, ::4].transpose(2, 0, 1), dtype=np.float32) / 255.0


def test_patchwise_delta_records_each_patchs_bits_as_a_lone_run_chooses():
    """Patch-wise inference of a CADyQ network in batches reports, per grid patch, the bits that
    the same patch chooses when run alone (the selectors read per-patch statistics only)."""
    from refqsr_engine.models.model_info import describe, model_bits
    from refqsr_engine.models.patchwise import upscale_patchwise
    from refqsr_engine.pipeline.tiling import extract_patches

    torch.manual_seed(0)
    net = _varied_selectors(build_sr("srresnet", "cadyq", n_blocks=4, n_feats=8)).eval()
    lr = _photo_lr()
    result = upscale_patchwise(net, lr, patch=16, overlap=2, batch=3, bits=model_bits(net))
    assert len(result.patch_bits) == result.grid.num_patches > 3
    seen = set()
    for i, pb in enumerate(result.patch_bits):
        x = torch.from_numpy(np.ascontiguousarray(extract_patches(lr, result.grid, [i]), dtype=np.float32))
        sel = Selection()
        with torch.no_grad():
            net(x, sel)
        assert pb == patch_bits_of_run(net, sel, "sr")[0]
        seen |= {s.act for blk in pb.blocks for s in blk}
    assert len(seen) > 1  # the test image makes the selectors differ between patches
    ops = describe(net, "net").image_bitops(lr.shape[1:], 16, 2, patch_bits=result.patch_bits)
    lo, hi = (
        describe(build_sr("srresnet", "ddtb", (b,), n_blocks=4, n_feats=8), "q").image_bitops(lr.shape[1:], 16, 2)
        for b in (4, 8)
    )
    assert lo.gbitops <= ops.gbitops <= hi.gbitops and ops.gbitops not in (lo.gbitops, hi.gbitops)


def test_upscale_with_the_torch_engine_runs_a_delta_refqsr_model(tmp_path):
    """δ-RefQSR through `upscale --engine torch`: the image is the patch-wise PyTorch result and the
    reported BitOPs are counted from the bits each patch chose (references δ, queries b_low)."""
    from PIL import Image
    from refqsr_engine.engine.upscale import UpscaleOptions, Upscaler
    from refqsr_engine.models.checkpoint import load_model
    from refqsr_engine.models.clustblock import ClustBlock
    from refqsr_engine.models.model_info import describe
    from refqsr_engine.models.patchwise import upscale_patchwise

    torch.manual_seed(0)
    model = _varied_selectors(build_refqsr("srresnet", "cadyq", 8, 3, n_blocks=5, n_feats=8)).eval()
    model.clustblock = ClustBlock().eval()
    model.tau = 0.9
    save_model(tmp_path / "m.pt", model, {})
    lr = _photo_lr()
    Image.fromarray(np.round(lr.transpose(1, 2, 0) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    up = Upscaler(UpscaleOptions(model=str(tmp_path / "m.pt"), engine="torch", patch=16, overlap=2, batch=4))
    report = up.upscale_file(tmp_path / "in.png", tmp_path / "out.png")
    lr8 = np.asarray(Image.open(tmp_path / "in.png"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    model = load_model(tmp_path / "m.pt")[0]
    want = upscale_patchwise(model, lr8, 16, 2, batch=4)
    got = np.asarray(Image.open(tmp_path / "out.png"))
    assert np.abs(got.astype(int) - np.clip(np.round(want.image.transpose(1, 2, 0) * 255), 0, 255)).max() <= 1
    pb, refs = want.patch_bits, want.clustering.is_reference.tolist()
    assert all(not p.refers for p, r in zip(pb, refs) if r) and all(p.refers for p, r in zip(pb, refs) if not r)
    assert 0 < sum(refs) < len(refs)
    ops = describe(model, "m").image_bitops(lr.shape[1:], 16, 2, want.clustering, pb)
    assert report["bitops"]["bitops_g"] == pytest.approx(ops.gbitops, abs=1e-4)
