"""SRResNet x4 as the SR-quantization literature (PAMS, DDTB, CADyQ) uses it, without BatchNorm.

head: conv9x9 3->64 + PReLU | body: 16 ResBlocks (conv3x3-PReLU-conv3x3 + skip) -> conv3x3, plus the
global skip from the head | upsampler: 2 x [conv3x3 64->256, PixelShuffle(2), PReLU] | tail: conv9x9
64->3. Only the ResBlock convs are quantized; head, body-end conv, upsampler and tail stay full
precision (as in every method the paper compares with). Images are RGB in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .backbone import SRBackbone, Step
from .qconv import FP, BitSpec, QuantConv2d


class ResBlock(nn.Module):
    """conv-PReLU-conv + identity. Both conv inputs are quantized; the identity carries the
    unquantized block input, as DDTB's SRResNet does (quantizing it adds error at every block)."""

    def __init__(self, channels: int, scheme: str | None, act_bits: Iterable[int]) -> None:
        super().__init__()
        bits = tuple(act_bits)
        self.conv1 = QuantConv2d(channels, channels, 3, scheme, bits)
        self.act = nn.PReLU()
        self.conv2 = QuantConv2d(channels, channels, 3, scheme, bits)

    def forward(self, x: torch.Tensor, bits: BitSpec = FP) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x, bits)), bits)


class SRResNet(SRBackbone):
    arch = "srresnet"

    def __init__(
        self,
        n_blocks: int = 16,
        n_feats: int = 64,
        scale: int = 4,
        scheme: str | None = None,
        act_bits: Iterable[int] = (),
    ) -> None:
        super().__init__()
        if scale not in (2, 4):
            raise ValueError("SRResNet supports x2 and x4")
        self.scale = scale
        self.n_feats = n_feats
        self.scheme = scheme
        bits = tuple(act_bits)
        self.head = nn.Sequential(nn.Conv2d(3, n_feats, 9, padding=4), nn.PReLU())
        self.blocks = nn.ModuleList(ResBlock(n_feats, scheme, bits) for _ in range(n_blocks))
        self.body_end = nn.Conv2d(n_feats, n_feats, 3, padding=1)
        stages: list[nn.Module] = []
        for _ in range({2: 1, 4: 2}[scale]):
            stages += [nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1), nn.PixelShuffle(2), nn.PReLU()]
        self.upsampler = nn.Sequential(*stages)
        self.tail = nn.Conv2d(n_feats, 3, 9, padding=4)

    @staticmethod
    def block_conv_macs(n_feats: int) -> list[int]:
        return [n_feats * n_feats * 9] * 2

    def run(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        head = self.head(x)
        feat = head
        for k in range(self.n_blocks):
            feat = step(k, feat)
        return self.tail(self.upsampler(self.body_end(feat) + head))

    def interpolation_init(self) -> SRResNet:
        return interpolation_init(self)


@torch.no_grad()
def interpolation_init(net: SRResNet, small_scale: float = 1e-3) -> SRResNet:
    """Initialise ``net`` so that, before any training, it upscales like x2-x2 bilinear interpolation.

    The architecture is unchanged; only the starting point differs: the first 3 head channels
    carry RGB, every ResBlock's second conv starts at zero (each residual
    branch starts as the identity), PReLU slopes start at 1, each upsampling stage maps RGB to the
    4 sub-pixel phases of a x2 bilinear filter, and the tail reads the RGB channels. All other
    weights keep their random initialisation, except the body-end conv and the tail's weights on
    the non-RGB channels, scaled by ``small_scale`` so they barely perturb the output yet pass
    gradients from the first step. Training
    then spends its steps on detail instead of on learning to interpolate, which matters on a CPU.
    """

    def rgb_passthrough(conv: nn.Conv2d) -> None:
        k = conv.kernel_size[0] // 2
        conv.weight[:3, :3] = 0.0
        conv.bias[:3] = 0.0
        for c in range(3):
            conv.weight[c, c, k, k] = 1.0

    rgb_passthrough(net.head[0])
    for block in net.blocks:
        block.conv2.conv.weight.zero_()
        block.conv2.conv.bias.zero_()
    # Not zero: the blocks must receive gradient from the first step (Adam's step size does not
    # depend on the gradient's scale, so a small weight costs no speed).
    net.body_end.weight *= small_scale
    net.body_end.bias.zero_()
    for module in net.modules():
        if isinstance(module, nn.PReLU):
            module.weight.fill_(1.0)
    phases = (torch.tensor([0.25, 0.75, 0.0]), torch.tensor([0.0, 0.75, 0.25]))  # x2 bilinear taps
    for conv in (m for m in net.upsampler if isinstance(m, nn.Conv2d)):
        for c in range(3):
            for dy in range(2):
                for dx in range(2):
                    out = 4 * c + 2 * dy + dx  # PixelShuffle's channel order
                    conv.weight[out] = 0.0
                    conv.weight[out, c] = torch.outer(phases[dy], phases[dx])
                    conv.bias[out] = 0.0
    net.tail.weight[:, 3:] *= small_scale
    rgb_passthrough(net.tail)
    return net
