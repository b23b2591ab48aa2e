"""CARN (Ahn et al., ECCV 2018) x2/x4 as the SR-quantization literature (CADyQ, RefQSR) uses it.

mean shift (subtract the DIV2K RGB mean) | entry conv3x3 3->F | g cascading blocks, each g residual
blocks (conv3x3-ReLU-conv3x3 + identity, then ReLU) whose outputs are concatenated with the block
input and fused by 1x1 conv + ReLU after every residual block (local cascade); the cascading
blocks are wired the same way with their own 1x1 fusions (global cascade) | upsampler: per x2,
conv3x3 F->4F + ReLU + PixelShuffle(2) | exit conv3x3 F->3 | mean shift back.

``n_blocks`` counts residual blocks and must be a perfect square g*g (the published CARN: 9 = 3
cascading blocks x 3): local and global cascades keep the same shape for small test models (4).
Only the residual blocks' 3x3 convs are quantized (QuantConv2d); the entry, the 1x1 fusions, the
upsampler and the exit stay full precision, as in CADyQ and RefQSR. Images are RGB in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import SRBackbone, Step
from .qconv import FP, BitSpec, QuantConv2d

#: DIV2K RGB mean for images in [0, 1] (CARN's MeanShift with rgb_range 1)
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


class CARNResBlock(nn.Module):
    """conv-ReLU-conv + identity, then ReLU (CARN's ResidualBlock). Both conv inputs are
    quantized; the identity carries the unquantized block input (as SRResNet's ResBlock)."""

    def __init__(self, channels: int, scheme: str | None, act_bits: Iterable[int]) -> None:
        super().__init__()
        bits = tuple(act_bits)
        self.conv1 = QuantConv2d(channels, channels, 3, scheme, bits)
        self.conv2 = QuantConv2d(channels, channels, 3, scheme, bits)

    def forward(self, x: torch.Tensor, bits: BitSpec = FP) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x, bits)), bits))


def _fusion(n_feats: int, parts: int) -> nn.Conv2d:
    """1x1 conv fusing ``parts`` concatenated feature maps back to ``n_feats`` channels."""
    return nn.Conv2d(parts * n_feats, n_feats, 1)


class CARN(SRBackbone):
    arch = "carn"

    def __init__(
        self,
        n_blocks: int = 9,
        n_feats: int = 64,
        scale: int = 4,
        scheme: str | None = None,
        act_bits: Iterable[int] = (),
    ) -> None:
        super().__init__()
        groups = math.isqrt(max(n_blocks, 0))
        if n_blocks < 1 or groups * groups != n_blocks:
            raise ValueError(f"CARN needs a perfect square number of residual blocks (g cascades of g), got {n_blocks}")
        if scale not in (2, 4):
            raise ValueError("CARN supports x2 and x4")
        self.scale = scale
        self.n_feats = n_feats
        self.scheme = scheme
        self.groups = groups
        bits = tuple(act_bits)
        self.register_buffer("rgb_mean", torch.tensor(DIV2K_MEAN).view(1, 3, 1, 1), persistent=False)
        self.entry = nn.Conv2d(3, n_feats, 3, padding=1)
        self.blocks = nn.ModuleList(CARNResBlock(n_feats, scheme, bits) for _ in range(n_blocks))
        # local_fusions[c][i]: after residual block i of cascading block c, over i + 2 feature maps
        self.local_fusions = nn.ModuleList(
            nn.ModuleList(_fusion(n_feats, i + 2) for i in range(groups)) for _ in range(groups)
        )
        self.global_fusions = nn.ModuleList(_fusion(n_feats, i + 2) for i in range(groups))
        stages: list[nn.Module] = []
        for _ in range({2: 1, 4: 2}[scale]):
            stages += [nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1), nn.ReLU(), nn.PixelShuffle(2)]
        self.upsampler = nn.Sequential(*stages)
        self.exit = nn.Conv2d(n_feats, 3, 3, padding=1)

    @staticmethod
    def block_conv_macs(n_feats: int) -> list[int]:
        return [n_feats * n_feats * 9] * 2

    def run(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        g = self.groups
        feat = self.entry(x - self.rgb_mean)
        cascade = feat
        for c in range(g):
            # one cascading block, its residual blocks being blocks c*g .. c*g+g-1
            local, out = feat, feat
            for i in range(g):
                local = torch.cat([local, step(c * g + i, out)], dim=1)
                out = F.relu(self.local_fusions[c][i](local))
            cascade = torch.cat([cascade, out], dim=1)
            feat = F.relu(self.global_fusions[c](cascade))
        return self.exit(self.upsampler(feat)) + self.rgb_mean

    def interpolation_init(self) -> CARN:
        return interpolation_init(self)


@torch.no_grad()
def interpolation_init(net: CARN, small_scale: float = 1e-3) -> CARN:
    """Initialise ``net`` so that, before any training, it upscales like x2(-x2) bilinear interpolation.

    ReLUs would cut the mean-shifted RGB signal v = x - mean, so it travels as its positive and
    negative parts on channels 0..5 (v+ on 0..2, v- on 3..5): the entry writes (v, -v), the first
    residual block's closing ReLU splits them (every second conv starts at zero, so each residual
    branch starts as the identity), each 1x1 fusion passes the newest feature map's channels 0..5
    through, each upsampling stage maps them to the 4 sub-pixel phases of a x2 bilinear filter
    (non-negative taps of a non-negative signal: the ReLU keeps them), and the exit computes
    v = v+ - v- before the mean is added back. All other weights keep their random initialisation,
    except the exit's weights on the other channels, scaled by ``small_scale`` so they barely
    perturb the output yet pass gradients to the whole network from the first step.
    """
    f = net.n_feats
    if f < 6:
        raise ValueError("interpolation_init needs at least 6 feature channels")

    def carry(conv: nn.Conv2d, src: int) -> None:
        """Rows 0..5 of ``conv`` copy input channels src..src+5 (centre tap), nothing else."""
        k = conv.kernel_size[0] // 2
        conv.weight[:6] = 0.0
        conv.bias[:6] = 0.0
        for c in range(6):
            conv.weight[c, src + c, k, k] = 1.0

    entry = net.entry
    entry.weight[:6] = 0.0
    entry.bias[:6] = 0.0
    for c in range(3):
        entry.weight[c, c, 1, 1] = 1.0
        entry.weight[3 + c, c, 1, 1] = -1.0
    for block in net.blocks:
        block.conv2.conv.weight.zero_()
        block.conv2.conv.bias.zero_()
    for fusions in net.local_fusions:
        for i, conv in enumerate(fusions):
            carry(conv, (i + 1) * f)  # the newest map: residual block i's output
    for c, conv in enumerate(net.global_fusions):
        carry(conv, (c + 1) * f)  # cascading block c's output
    phases = (torch.tensor([0.25, 0.75, 0.0]), torch.tensor([0.0, 0.75, 0.25]))  # x2 bilinear taps
    for conv in (m for m in net.upsampler if isinstance(m, nn.Conv2d)):
        for c in range(6):
            for dy in range(2):
                for dx in range(2):
                    out = 4 * c + 2 * dy + dx  # PixelShuffle's channel order
                    conv.weight[out] = 0.0
                    conv.weight[out, c] = torch.outer(phases[dy], phases[dx])
                    conv.bias[out] = 0.0
    exit_conv = net.exit
    exit_conv.weight[:, 6:] *= small_scale
    exit_conv.weight[:, :6] = 0.0
    exit_conv.bias.zero_()
    for c in range(3):
        exit_conv.weight[c, c, 1, 1] = 1.0
        exit_conv.weight[c, 3 + c, 1, 1] = -1.0
    return net
