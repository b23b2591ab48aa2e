"""SRResNet and the RefQSR wrapper (paper Fig. 3, Sec. III-C-1) against independent twins.

* SRResNet: structure asserted on module attributes, the parameter count computed by hand, and the
  forward pass against a functional twin (F.conv2d / F.prelu / F.pixel_shuffle on the module's
  weights).
* Quantized SRResNet: PSNR between the quantized and the full-precision output after one
  calibration forward (train mode); numpy PAMS twin for one quantized conv.
* RefQSR: b_medium from the paper's formula, which BitSpec each ResBlock receives on each path
  (forward pre-hooks), which reference features RefER receives, the training forward and backward.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refqsr_engine.models.qconv import BitSpec, QuantConv2d
from refqsr_engine.models.refqsr import RefQSR, medium_bits
from refqsr_engine.models.registry import build_refqsr, build_sr
from refqsr_engine.models.srresnet import SRResNet
from torch import nn


def _smooth_image(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(h // 4, 2), max(w // 4, 2), generator=g)
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    peak = float(ref.max() - ref.min())
    mse = float(((a.double() - ref.double()) ** 2).mean())
    return 10 * math.log10(peak**2 / mse)


def np_pams(x: np.ndarray, alpha: float, bits: int) -> np.ndarray:
    levels = 2 ** (bits - 1) - 1
    return np.round(np.clip(x.astype(np.float64), -alpha, alpha) * levels / alpha) * alpha / levels


def _pams_conv_twin(conv, x: torch.Tensor, act_bits: int, weight_bits: int) -> torch.Tensor:
    """float64 conv of the numpy-twin-quantized input and weights (PAMS formulas)."""
    alpha = conv.act_quant[str(act_bits)].alpha.item()
    w = conv.conv.weight.detach().double().numpy()
    return F.conv2d(
        torch.from_numpy(np_pams(x.numpy(), alpha, act_bits)),
        torch.from_numpy(np_pams(w, float(np.abs(w).max()), weight_bits)),
        conv.conv.bias.detach().double(),
        padding=1,
    )


# --------------------------------------------------------------------------- SRResNet structure


def _assert_conv(conv: nn.Conv2d, cin: int, cout: int, k: int) -> None:
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels) == (cin, cout)
    assert conv.kernel_size == (k, k) and conv.stride == (1, 1) and conv.padding == (k // 2, k // 2)
    assert conv.bias is not None


def test_srresnet_structure() -> None:
    net = SRResNet()
    assert net.n_blocks == 16 and net.scale == 4
    _assert_conv(net.head[0], 3, 64, 9)
    assert isinstance(net.head[1], nn.PReLU) and len(net.head) == 2
    assert len(net.blocks) == 16
    for block in net.blocks:
        _assert_conv(block.conv1.conv, 64, 64, 3)
        _assert_conv(block.conv2.conv, 64, 64, 3)
        assert isinstance(block.act, nn.PReLU)
    _assert_conv(net.body_end, 64, 64, 3)
    ups = list(net.upsampler)
    assert len(ups) == 6
    for i in (0, 3):
        _assert_conv(ups[i], 64, 256, 3)
        assert isinstance(ups[i + 1], nn.PixelShuffle) and ups[i + 1].upscale_factor == 2
        assert isinstance(ups[i + 2], nn.PReLU)
    _assert_conv(net.tail, 64, 3, 9)


def test_srresnet_parameter_count() -> None:
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731  (weights + bias)
    prelu = 1  # one shared slope per PReLU
    expected = (
        conv(3, 64, 9)
        + prelu  # head
        + 16 * (2 * conv(64, 64, 3) + prelu)  # ResBlocks
        + conv(64, 64, 3)  # body end
        + 2 * (conv(64, 256, 3) + prelu)  # upsampler
        + conv(64, 3, 9)  # tail
    )
    assert expected == 1_545_238
    assert sum(p.numel() for p in SRResNet().parameters()) == expected
    # a PAMS network adds one learnable alpha per conv per activation bit width
    q = SRResNet(scheme="pams", act_bits=(8, 4))
    assert sum(p.numel() for p in q.parameters()) == expected + 16 * 2 * 2


def _twin_srresnet(net: SRResNet, x: torch.Tensor) -> torch.Tensor:
    """Full-precision functional twin, float64."""
    p = lambda t: t.detach().double()  # noqa: E731
    x = x.double()
    head = F.prelu(F.conv2d(x, p(net.head[0].weight), p(net.head[0].bias), padding=4), p(net.head[1].weight))
    f = head
    for b in net.blocks:
        c1, c2 = b.conv1.conv, b.conv2.conv
        r = F.prelu(F.conv2d(f, p(c1.weight), p(c1.bias), padding=1), p(b.act.weight))
        f = f + F.conv2d(r, p(c2.weight), p(c2.bias), padding=1)
    f = F.conv2d(f, p(net.body_end.weight), p(net.body_end.bias), padding=1) + head
    for i in (0, 3):
        conv, act = net.upsampler[i], net.upsampler[i + 2]
        f = F.prelu(F.pixel_shuffle(F.conv2d(f, p(conv.weight), p(conv.bias), padding=1), 2), p(act.weight))
    return F.conv2d(f, p(net.tail.weight), p(net.tail.bias), padding=4)


def test_srresnet_forward_matches_functional_twin_odd_size() -> None:
    torch.manual_seed(0)
    net = build_sr("srresnet")
    x = _smooth_image(2, 7, 9, 1)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 3, 28, 36)
    torch.testing.assert_close(out.double(), _twin_srresnet(net, x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- quantized SRResNet


@pytest.mark.parametrize("scheme", ["pams", "ddtb"])
def test_quantized_srresnet_close_to_fp(scheme: str) -> None:
    torch.manual_seed(0)
    fp = SRResNet().eval()
    q = SRResNet(scheme=scheme, act_bits=(8, 4))
    missing, unexpected = q.load_state_dict(fp.state_dict(), strict=False)
    assert not unexpected and all("act_quant" in k for k in missing)
    x = _smooth_image(2, 24, 24, 2)
    q.train()
    with torch.no_grad():  # calibration forwards: the first training forward sets every range
        q(x, BitSpec.uniform(8))
        q(x, BitSpec.uniform(4))
    q.eval()
    with torch.no_grad():
        ref = fp(x)
        psnr = {b: _psnr(q(x, BitSpec.uniform(b)), ref) for b in (8, 4)}
        assert torch.equal(q(x, BitSpec.uniform(32)), ref)  # 32 bits == the FP network
    assert psnr[8] > 30, psnr
    assert psnr[4] < psnr[8] - 3, psnr  # 4 bits is clearly further away


def test_quantized_conv_in_network_matches_numpy_twin() -> None:
    torch.manual_seed(0)
    net = SRResNet(scheme="pams", act_bits=(8, 4))
    x = _smooth_image(1, 12, 12, 3)
    net.train()
    with torch.no_grad():
        net(x, BitSpec(4, 6))
    net.eval()
    seen = {}
    conv = net.blocks[3].conv1
    h = conv.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    with torch.no_grad():
        net(x, BitSpec(4, 6))
    h.remove()
    err = (seen["y"].double() - _pams_conv_twin(conv, seen["x"], 4, 6)).abs()
    # float32 vs float64 might round a value sitting on a .5 tie differently: allow a rare outlier
    assert float((err > 1e-5).double().mean()) < 1e-3


# --------------------------------------------------------------------------- RefQSR


@pytest.mark.parametrize(
    "b_high, b_low, expected", [(8, 4, 6), (8, 5, 6), (8, 3, 6), (4, 3, 4), (4, 2, 3), (8, 8, 8), (6, 2, 4)]
)
def test_medium_bits(b_high: int, b_low: int, expected: int) -> None:
    assert medium_bits(b_high, b_low) == expected


def test_refqsr_rejects_bad_configs() -> None:
    with pytest.raises(ValueError):
        RefQSR(SRResNet(n_feats=8), 8, 4)  # full-precision backbone
    backbone = SRResNet(n_feats=8, scheme="pams", act_bits=(8, 4))
    with pytest.raises(ValueError):
        RefQSR(backbone, 4, 8)  # b_low > b_high
    for n_refer in (0, 15, 16):
        with pytest.raises(ValueError):
            RefQSR(backbone, 8, 4, n_refer=n_refer)


@pytest.fixture(scope="module")
def refqsr_model() -> RefQSR:
    torch.manual_seed(0)
    model = build_refqsr("srresnet", "pams", 8, 4)
    query, ref = _smooth_image(2, 24, 24, 4), _smooth_image(2, 24, 24, 5)
    model.train()
    with torch.no_grad():
        model(query, ref)  # initialise every quantizer range
    model.eval()
    return model


def test_refqsr_structure(refqsr_model: RefQSR) -> None:
    m = refqsr_model
    assert (m.b_high, m.b_low, m.b_medium) == (8, 4, 6)
    assert len(m.refers) == 2 and m.first_refer == 14
    assert m.high == BitSpec(8, 8) and m.low == BitSpec(4, 6)
    for r in m.refers:  # refinement convs at b_high, matching at b_low
        assert r.conv1.act_bits == [8] and r.conv2.act_bits == [8] and r.match_quant.bits == 4


def _record_blocks(model: RefQSR, log: list) -> list:
    handles = []
    for k, block in enumerate(model.backbone.blocks):
        handles.append(block.register_forward_pre_hook(lambda mod, args, k=k: log.append((k, args[1], args[0]))))
    return handles


def test_refqsr_bits_per_path_and_reference_features(refqsr_model: RefQSR) -> None:
    m = refqsr_model
    query, ref = _smooth_image(2, 24, 24, 6), _smooth_image(2, 24, 24, 7)
    log: list = []
    handles = _record_blocks(m, log)
    refer_inputs: list = []
    handles += [
        r.register_forward_pre_hook(lambda mod, args: refer_inputs.append((args[0], args[1]))) for r in m.refers
    ]
    block13_out: list = []
    handles.append(m.backbone.blocks[13].register_forward_hook(lambda mod, a, o: block13_out.append(o)))
    with torch.no_grad():
        sr_ref, feats = m.reference_forward(ref)
        ref_log, log[:] = list(log), []
        sr_query = m.query_forward(query, feats)
        query_log = list(log)
    for h in handles:
        h.remove()

    # reference path: all 16 ResBlocks at (b_high, b_high)
    assert [k for k, _, _ in ref_log] == list(range(16))
    assert all(bits == BitSpec(8, 8) for _, bits, _ in ref_log)
    # the reference features are the inputs of reference-path blocks 14 and 15
    assert len(feats) == 2
    assert feats[0] is ref_log[14][2] and feats[1] is ref_log[15][2]
    # query path: block 0 at (8, 8), blocks 1..13 at (b_low, b_medium) = (4, 6); 14 and 15 not run
    assert [k for k, _, _ in query_log] == list(range(14))
    assert query_log[0][1] == BitSpec(8, 8)
    assert all(bits == BitSpec(4, 6) for _, bits, _ in query_log[1:])
    # RefER k gets (query feature, reference feature k); the first one reads block 13's output
    assert len(refer_inputs) == 2
    assert refer_inputs[0][0] is block13_out[-1]
    assert refer_inputs[0][1] is feats[0] and refer_inputs[1][1] is feats[1]
    assert sr_ref.shape == sr_query.shape == (2, 3, 96, 96)

    # the reference path is exactly the plain SR network at b_high
    with torch.no_grad():
        torch.testing.assert_close(sr_ref, m.backbone(ref, BitSpec(8, 8)), rtol=0, atol=0)
    # the query path, wired by hand: head, blocks 0..13 at the paper's bits, 2 RefERs, reconstruction
    net = m.backbone
    with torch.no_grad():
        head = net.head(query)
        f = net.blocks[0](head, BitSpec(8, 8))
        for k in range(1, 14):
            f = net.blocks[k](f, BitSpec(4, 6))
        f = m.refers[1](m.refers[0](f, feats[0], True), feats[1], True)
        up = net.upsampler(net.body_end(f) + head)
        torch.testing.assert_close(sr_query, net.tail(up), rtol=0, atol=0)


def test_refqsr_query_path_uses_4bit_activations_and_6bit_weights(refqsr_model: RefQSR, monkeypatch) -> None:
    m = refqsr_model
    conv: QuantConv2d = m.backbone.blocks[1].conv1
    calls = {"4": 0, "8": 0}
    hooks = [conv.act_quant[b].register_forward_hook(lambda *a, b=b: calls.__setitem__(b, calls[b] + 1)) for b in calls]
    seen = {}
    hooks.append(conv.register_forward_hook(lambda mod, a, o: seen.update(x=a[0].detach(), y=o.detach())))
    query, ref = _smooth_image(1, 24, 24, 8), _smooth_image(1, 24, 24, 9)
    with torch.no_grad():
        _, feats = m.reference_forward(ref)
        assert calls == {"4": 0, "8": 1}
        m.query_forward(query, feats)
        assert calls == {"4": 1, "8": 1}
    for h in hooks:
        h.remove()
    err = (seen["y"].double() - _pams_conv_twin(conv, seen["x"], 4, 6)).abs()
    assert float((err > 1e-5).double().mean()) < 1e-3


@pytest.mark.parametrize("scheme", ["pams", "ddtb"])
def test_refqsr_training_forward_and_backward(scheme: str) -> None:
    torch.manual_seed(1)
    model = RefQSR(SRResNet(n_feats=16, scheme=scheme, act_bits=(8, 3)), b_high=8, b_low=3)
    assert model.b_medium == 6
    model.train()
    query, ref = _smooth_image(2, 18, 18, 10), _smooth_image(2, 18, 18, 11)
    sr_q, sr_r = model(query, ref)
    assert sr_q.shape == sr_r.shape == (2, 3, 72, 72)
    target_q, target_r = torch.rand(2, 3, 72, 72), torch.rand(2, 3, 72, 72)
    ((sr_q - target_q).abs().mean() + (sr_r - target_r).abs().mean()).backward()
    params = dict(model.named_parameters())

    def nonzero(name: str) -> bool:
        g = params[name].grad
        return g is not None and float(g.abs().sum()) > 0

    for k in range(2):  # RefER parameters
        for name in ("conv1.conv.weight", "conv1.conv.bias", "conv2.conv.weight", "act.weight"):
            assert nonzero(f"refers.{k}.{name}"), (k, name)
    bounds = ("alpha",) if scheme == "pams" else ("lower", "upper")
    for b in bounds:
        assert nonzero(f"refers.0.conv1.act_quant.8.{b}")
        assert nonzero(f"backbone.blocks.0.conv1.act_quant.8.{b}")  # block 0 at b_high (both paths)
        assert nonzero(f"backbone.blocks.5.conv2.act_quant.3.{b}")  # query path at b_low
        assert nonzero(f"backbone.blocks.5.conv2.act_quant.8.{b}")  # reference path at b_high
        assert nonzero(f"backbone.blocks.15.conv1.act_quant.8.{b}")  # reference-only block
    assert nonzero("backbone.blocks.5.conv1.conv.weight")
    if scheme == "ddtb":  # the dynamic gates learn too (their last layer starts at zero)
        assert nonzero("backbone.blocks.5.conv2.act_quant.3.gate.fc2.weight")
        assert nonzero("backbone.blocks.5.conv2.act_quant.3.gate.fc2.bias")
    # blocks 14, 15 never see b_low activations: their 3-bit quantizers stay untouched
    for b in bounds:
        assert params[f"backbone.blocks.15.conv1.act_quant.3.{b}"].grad is None


def _small_refqsr(tail: str = "refer"):
    from refqsr_engine.models.registry import build_refqsr

    torch.manual_seed(1)
    model = build_refqsr("srresnet", "ddtb", 8, 4, None, n_blocks=4, tail=tail)
    model.train()
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        model(x, x.flip(-1))  # initialise the quantizer ranges
    return model.eval(), x


def test_highbit_tail_is_the_backbone_with_its_last_blocks_at_b_high():
    model, x = _small_refqsr("highbit")
    net = model.backbone
    with torch.no_grad():
        head = net.head(x)
        feat = head
        bits = [model.high, model.low, model.high, model.high]  # block 0 high, 1 low, last n_refer=2 high
        for block, b in zip(net.blocks, bits):
            feat = block(feat, b)
        expected = net.tail(net.upsampler(net.body_end(feat) + head))
        got = model.query_forward(x, None)
    torch.testing.assert_close(got, expected)


def test_self_reference_feeds_each_refer_the_query_features_at_its_input():
    model, x = _small_refqsr()
    net = model.backbone
    with torch.no_grad():
        head = net.head(x)
        feat = head
        for block, b in zip(net.blocks[: model.first_refer], model.query_block_bits()):
            feat = block(feat, b)
        for refer in model.refers:
            feat = refer(feat, feat.clone())
        expected = net.tail(net.upsampler(net.body_end(feat) + head))
        got = model.query_forward(x, None)
        with_other = model.query_forward(x, [torch.rand_like(f) for f in model.reference_forward(x.flip(-1))[1]])
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, with_other)


def test_highbit_tail_bitops_count_the_tail_at_high_bits():
    from refqsr_engine.models.bitops import count_bitops

    # one 96x96 patch, a query (its own reference index points elsewhere): 2 blocks' convs at 8/8,
    # 14 blocks' at 4/6 for refer; highbit: block 0 + last 2 blocks at 8/8, 13 blocks at act 4 / weight 6
    macs = 64 * 64 * 9 * 96 * 96
    high = 2 * macs * (8 / 32) * (8 / 32)
    low = 2 * macs * (4 / 32) * (6 / 32)
    rep = count_bitops("srresnet", (96, 186), "8-4", 96, 6, "engine", [True, False], [0, 0], tail="highbit")
    ref_ops = 32 * high
    query_ops = 2 * (1 + 2) * high + 2 * 13 * low
    assert rep.total.network == pytest.approx(ref_ops + query_ops, rel=1e-9)
    assert rep.total.refer_convs == 0 and rep.total.cost_volume == 0


@pytest.mark.parametrize(
    "arch,matching", [("srresnet", "paper"), ("srresnet", "shared"), ("carn", "shared"), ("elan_light", "paper")]
)
def test_features_only_passes_stop_before_the_unneeded_work(arch: str, matching: str) -> None:
    """reference_features gives reference_forward's features without running the last block or
    the upsampler; high_block_outputs gives the outputs of the replaced blocks (forward hooks on a
    plain b_high backbone call) without running anything after the last block."""
    torch.manual_seed(0)
    small = {"srresnet": {"n_blocks": 4}, "carn": {}, "elan_light": {}}[arch]
    model = build_refqsr(arch, "ddtb", 8, 4, matching=matching, **small)
    x = _smooth_image(2, 24, 24, 8)
    model.train()
    with torch.no_grad():
        model(x, _smooth_image(2, 24, 24, 9))  # initialise every quantizer range
    model.eval()
    net, last = model.backbone, model.backbone.n_blocks - 1
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        b.register_forward_hook(lambda mod, a, o, k=k: outputs.__setitem__(k, o)) for k, b in enumerate(net.blocks)
    ]
    with torch.no_grad():
        _, want = model.reference_forward(x)
        net(x, BitSpec(8, 8))
        want_high = [outputs[k] for k in range(model.first_refer, last + 1)]
        outputs.clear()
        got = model.reference_features(x)
        assert last not in outputs  # the last block did not run
        got_high = model.high_block_outputs(x)
    for h in handles:
        h.remove()
    assert len(got) == len(want) == model.n_reference_features
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert len(got_high) == len(model.refers)
    for g, w in zip(got_high, want_high):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
