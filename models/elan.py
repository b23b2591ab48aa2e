"""ELAN-light (Zhang et al., ECCV 2022, "Efficient Long-Range Attention Network for Image
Super-resolution") as an SRBackbone, with the paper's BitOPs accounting.

head: conv3x3 3->60 | body: 24 ELAB modules in 12 pairs, each module x + LFE(x) then x + GMSA(x);
the first module of a pair computes the attention maps, the second reuses them; every other pair
works on windows shifted by half a window | long skip from the head | tail: conv3x3 60->48 +
PixelShuffle(4) | mean shift around it all (RGB in [0, 1], so rgb_range 1). Inputs are reflect-padded
to a multiple of lcm(window sizes) = 16 as the official code does, and the output is cropped.
LFE = shift, 1x1 conv 60->120, ReLU, shift, 1x1 conv 120->60; the LFE residual units are the
``blocks`` (their two 1x1 convs are quantized). The GMSA stays full precision, as in RefQSR (Sec. IV-A-1).

BitOPs, paper Table IV (ELAN 104.29 / DDTB-8 10.32 / DDTB-4 3.85 G on Urban100): those three
numbers, and the Test2K/Test4K ones, are reproduced per LR pixel of the paper grid by 2 x MACs of
[the 48 LFE 1x1 convs, the 48 GMSA projections, the 12 q q^T products and the tail conv] at
(b/32)^2 plus the 24 A@V products at b/32 (softmax attention kept at 32 bits), head not counted;
see ``paper_style_bitops``. The project's ``count_bitops`` counts the quantized LFE convs only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import SRBackbone, Step
from .qconv import FP, BitSpec, QuantConv2d

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, as ELAN's (and EDSR's) MeanShift
WINDOW_SIZES = (4, 8, 16)
EXPANSION = 2  # LFE hidden width = 2 x n_feats (ELAN-light's r_expand)
SHIFT_GROUPS = 5  # left, right, up, down, identity


def shift_features(x: torch.Tensor) -> torch.Tensor:
    """ELAN's shift: channels split in 5 groups of C // 5 (the identity group takes the
    remainder), moved one pixel left / right / up / down / not at all, zero fill.

    Written as a zero pad, slices and a concat rather than the official masked depthwise conv, so
    that it stays data movement: an exported graph then has a Conv node only where a conv module
    is called (export's conv bookkeeping relies on that) and the shift costs no multiplies."""
    g = x.shape[1] // SHIFT_GROUPS
    if g == 0:
        return x
    # One zero border, then each group reads its window of it: output (i, j) = padded (i + 1 + dy, j + 1 + dx).
    padded = F.pad(x[:, : 4 * g], (1, 1, 1, 1))
    left = padded[:, 0 * g : 1 * g, 1:-1, 2:]  # out[j] = in[j + 1]
    right = padded[:, 1 * g : 2 * g, 1:-1, :-2]  # out[j] = in[j - 1]
    up = padded[:, 2 * g : 3 * g, 2:, 1:-1]  # out[i] = in[i + 1]
    down = padded[:, 3 * g : 4 * g, :-2, 1:-1]  # out[i] = in[i - 1]
    return torch.cat([left, right, up, down, x[:, 4 * g :]], dim=1)


class LFE(nn.Module):
    """Local feature extractor as a residual unit: x + conv1(shift(relu(conv0(shift(x))))).

    Each 1x1 conv quantizes its input after the shift (QuantConv2d quantizes what it receives);
    the shift only moves values and inserts zeros, which every quantizer grid here represents."""

    def __init__(self, channels: int, scheme: str | None, act_bits: Iterable[int], expansion: int = EXPANSION) -> None:
        super().__init__()
        bits = tuple(act_bits)
        self.conv0 = QuantConv2d(channels, channels * expansion, 1, scheme, bits)
        self.act = nn.ReLU()
        self.conv1 = QuantConv2d(channels * expansion, channels, 1, scheme, bits)

    def forward(self, x: torch.Tensor, bits: BitSpec = FP) -> torch.Tensor:
        hidden = self.act(self.conv0(shift_features(x), bits))
        return x + self.conv1(shift_features(hidden), bits)


def _to_windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B * H/size * W/size, size * size, C], windows row-major."""
    _, c, h, w = x.shape
    x = x.reshape(-1, c, h // size, size, w // size, size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, size * size, c)


def _from_windows(y: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``_to_windows``."""
    c = y.shape[-1]
    y = y.reshape(-1, h // size, w // size, size, size, c).permute(0, 5, 1, 3, 2, 4)
    return y.reshape(-1, c, h, w)


class GMSA(nn.Module):
    """Group-wise multi-scale self-attention: a 1x1 projection (+BatchNorm) split into one channel
    group per window size, attention softmax(q q^T) inside each window (ELAN's shared query-key),
    A @ V, and a 1x1 output projection.

    A module that computes attention projects to 2C channels (per group: q, then v); one that
    reuses its pair partner's attention projects to C (v only). ``shifted`` rolls the features
    by half a window before partitioning and back afterwards, so the windows of alternate pairs
    straddle the previous pair's window borders."""

    def __init__(self, channels: int, window_sizes: Sequence[int], shifted: bool, computes_attention: bool) -> None:
        super().__init__()
        self.window_sizes = tuple(window_sizes)
        self.shifted = shifted
        self.computes_attention = computes_attention
        width = 2 * channels if computes_attention else channels
        self.split = [width // len(self.window_sizes)] * len(self.window_sizes)
        self.project_in = nn.Sequential(nn.Conv2d(channels, width, 1), nn.BatchNorm2d(width))
        self.project_out = nn.Conv2d(channels, channels, 1)

    def forward(
        self, x: torch.Tensor, shared: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(output, attention maps per group). ``shared``: the pair partner's maps to reuse."""
        if self.computes_attention == (shared is not None):
            raise ValueError("a GMSA that computes attention takes no shared maps, a sharing one needs them")
        h, w = x.shape[-2:]
        outputs, maps = [], []
        for k, (group, size) in enumerate(zip(torch.split(self.project_in(x), self.split, dim=1), self.window_sizes)):
            half = size // 2  # rolled back by the same amount: an exact inverse even for odd sizes
            if self.shifted:
                group = torch.roll(group, shifts=(-half, -half), dims=(2, 3))
            windows = _to_windows(group, size)
            if self.computes_attention:
                q, v = windows.chunk(2, dim=-1)
                attn = torch.softmax(q @ q.transpose(-2, -1), dim=-1)
            else:
                attn, v = shared[k], windows  # type: ignore[index]
            y = _from_windows(attn @ v, size, h, w)
            if self.shifted:
                y = torch.roll(y, shifts=(half, half), dims=(2, 3))
            outputs.append(y)
            maps.append(attn)
        return self.project_out(torch.cat(outputs, dim=1)), maps


class ELANLight(SRBackbone):
    arch = "elan_light"

    def __init__(
        self,
        n_blocks: int = 24,
        n_feats: int = 60,
        scale: int = 4,
        scheme: str | None = None,
        act_bits: Iterable[int] = (),
        window_sizes: Sequence[int] = WINDOW_SIZES,
    ) -> None:
        """``n_blocks``: ELAB modules (= LFE blocks), even because modules come in attention-sharing
        pairs; ``n_feats`` a multiple of 3 (one attention group per window size)."""
        super().__init__()
        if n_blocks < 2 or n_blocks % 2:
            raise ValueError(f"ELAN's modules come in attention-sharing pairs: n_blocks must be even, got {n_blocks}")
        if n_feats % len(window_sizes):
            raise ValueError(f"n_feats ({n_feats}) must split evenly into {len(window_sizes)} attention groups")
        if scale not in (2, 3, 4):
            raise ValueError("ELAN-light supports x2, x3 and x4")
        self.scale = scale
        self.n_feats = n_feats
        self.scheme = scheme
        self.window_sizes = tuple(int(s) for s in window_sizes)
        self.pad_multiple = math.lcm(*self.window_sizes)
        bits = tuple(act_bits)
        self.register_buffer("rgb_mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Conv2d(3, n_feats, 3, padding=1)
        self.blocks = nn.ModuleList(LFE(n_feats, scheme, bits) for _ in range(n_blocks))
        # Module k belongs to pair k // 2; pairs alternate plain and shifted windows (pair 0 plain).
        self.attentions = nn.ModuleList(
            GMSA(n_feats, self.window_sizes, shifted=(k // 2) % 2 == 1, computes_attention=k % 2 == 0)
            for k in range(n_blocks)
        )
        self.tail = nn.Sequential(nn.Conv2d(n_feats, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))

    @staticmethod
    def block_conv_macs(n_feats: int) -> list[int]:
        return [n_feats * EXPANSION * n_feats, EXPANSION * n_feats * n_feats]

    def sizes(self) -> dict[str, Any]:
        return {**super().sizes(), "window_sizes": list(self.window_sizes)}

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.pad_multiple, (-w) % self.pad_multiple
        if not (pad_h or pad_w):
            return x
        # Reflect as the official code; it needs pad < size, so images smaller than the pad
        # (where the official code fails) are replicated instead.
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)

    def run(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        h, w = x.shape[-2:]
        head = self.head(self._pad(x) - self.rgb_mean)
        feat = head
        shared: list[torch.Tensor] | None = None
        for k, attention in enumerate(self.attentions):
            feat = step(k, feat)
            y, maps = attention(feat, None if attention.computes_attention else shared)
            shared = maps
            feat = feat + y
        out = self.tail(feat + head) + self.rgb_mean
        return out[..., : h * self.scale, : w * self.scale]

    def interpolation_init(self) -> ELANLight:
        return interpolation_init(self)


def bilinear_taps(scale: int) -> torch.Tensor:
    """[scale, 3] weights on LR offsets (-1, 0, +1) of each sub-pixel phase of bilinear upscaling
    with align_corners=False: HR pixel o reads LR coordinate (o + 0.5) / scale - 0.5."""
    taps = torch.zeros(scale, 3)
    for p in range(scale):
        d = (p + 0.5) / scale - 0.5  # offset from the LR pixel the phase belongs to, in (-0.5, 0.5)
        if d < 0:
            taps[p, 0], taps[p, 1] = -d, 1 + d
        else:
            taps[p, 1], taps[p, 2] = 1 - d, d
    return taps


@torch.no_grad()
def interpolation_init(net: ELANLight, small_scale: float = 1e-3) -> ELANLight:
    """Make the untrained ``net`` a bilinear upscaler (exact in the interior; the outermost LR
    pixel differs: the tail conv zero-pads the mean-shifted image and the padding to 16 reflects).

    The head's first 3 channels carry the mean-shifted RGB; every LFE's last conv and every GMSA's
    output projection start at zero, so each module starts as the identity and the body output
    equals the head; the long skip doubles it, so the tail maps RGB channel c to its scale^2
    sub-pixel phases with half the bilinear taps (the mean shifts cancel: the taps sum to 1). The
    tail's weights on the other channels are scaled by ``small_scale``: they barely change the
    output yet pass gradient to the body from the first step."""
    head = net.head
    head.weight[:3] = 0.0
    head.bias[:3] = 0.0
    for c in range(3):
        head.weight[c, c, 1, 1] = 1.0
    for block in net.blocks:
        block.conv1.conv.weight.zero_()
        block.conv1.conv.bias.zero_()
    for attention in net.attentions:
        attention.project_out.weight.zero_()
        attention.project_out.bias.zero_()
    tail: nn.Conv2d = net.tail[0]  # type: ignore[assignment]
    s = net.scale
    taps = bilinear_taps(s)
    tail.weight *= small_scale
    tail.bias.zero_()
    for c in range(3):
        for py in range(s):
            for px in range(s):
                out = c * s * s + py * s + px  # PixelShuffle's channel order
                tail.weight[out, :3] = 0.0
                tail.weight[out, c] = 0.5 * torch.outer(taps[py], taps[px])
    return net


# --------------------------------------------------------------------------- paper-style BitOPs


def paper_macs_per_pixel(
    n_blocks: int = 24, n_feats: int = 60, window_sizes: Sequence[int] = WINDOW_SIZES, scale: int = 4
) -> dict[str, int]:
    """MACs per LR pixel of the operations the paper's ELAN BitOPs count (module docstring)."""
    c = n_feats
    pairs = n_blocks // 2
    per_group = c // len(window_sizes)  # q and v channels per attention group
    window_macs = sum(s * s for s in window_sizes) * per_group  # one window matmul, per pixel
    return {
        "lfe": n_blocks * 2 * EXPANSION * c * c,
        # per pair: q/v projection C->2C and C->C output, then v projection C->C and C->C output
        "gmsa_projections": pairs * (2 * c * c + c * c + c * c + c * c),
        "attention_scores": pairs * window_macs,  # q q^T, only in the first module of a pair
        # The tail conv; 24 depthwise 3x3 shift convs on the 120-channel hidden features (the
        # official implementation of the shift) give the same 25,920 MACs per pixel in ELAN-light.
        "tail": c * 3 * scale * scale * 9,
        "attention_apply": n_blocks * window_macs,  # A @ V in every module
    }


def paper_style_bitops(
    lr_size: tuple[int, int], patch: int | None, overlap: int = 6, bits: int = 32, **sizes: int
) -> dict[str, float]:
    """ELAN BitOPs (G) as the RefQSR paper's Table IV counts them, by component, on its grid
    (``patch`` None: the whole image). Everything at (b/32)^2 except A @ V at b/32: its softmax
    attention operand stays at 32 bits. Reproduces 104.29 / 10.32 / 3.85 G (Urban100, 72 px),
    245.41 / 24.29 / 9.05 (Test2K, 96 px) and 1014.20 / 100.36 / 37.42 (Test4K, 96 px)."""
    from .bitops import grid_boxes  # here: bitops imports the registry, which imports this module

    h, w = lr_size
    boxes = grid_boxes(h, w, patch or 0, overlap, "paper" if patch else "full")
    pixels = sum(b.pixels for b in boxes)
    macs = paper_macs_per_pixel(**sizes)  # type: ignore[arg-type]
    both = (bits / 32) ** 2
    out = {k: 2.0 * m * pixels * (bits / 32 if k == "attention_apply" else both) / 1e9 for k, m in macs.items()}
    out["total"] = sum(out.values())
    return out


__all__ = [
    "ELANLight",
    "GMSA",
    "LFE",
    "interpolation_init",
    "paper_macs_per_pixel",
    "paper_style_bitops",
    "shift_features",
]
