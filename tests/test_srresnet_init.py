"""interpolation_init: an untrained SRResNet that already upscales like x2-x2 bilinear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from refqsr_engine.models.registry import build_sr
from refqsr_engine.models.srresnet import interpolation_init


def test_interpolation_init_matches_bilinear_twice():
    torch.manual_seed(0)
    net = interpolation_init(build_sr("srresnet")).eval()
    x = torch.rand(2, 3, 20, 20)
    with torch.no_grad():
        out = net(x)
    twin = F.interpolate(
        F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
        scale_factor=2,
        mode="bilinear",
        align_corners=False,
    )
    interior = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # zero padding differs at borders
    assert (out[interior] - twin[interior]).abs().max() < 0.02


def test_interpolation_init_still_trains_every_part():
    torch.manual_seed(0)
    net = interpolation_init(build_sr("srresnet"))
    x, y = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 48, 48)
    F.l1_loss(net(x), y).backward()
    # zero-initialised residual branches still get gradient through their second conv
    assert net.blocks[5].conv2.conv.weight.grad.abs().sum() > 0
    assert net.tail.weight.grad[:, 3:].abs().sum() > 0
    assert net.head[0].weight.grad.abs().sum() > 0
