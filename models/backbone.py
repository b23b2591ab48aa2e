"""What every SR network must offer RefQSR, export, training and BitOPs accounting.

An SR network is a chain of *blocks*, its quantized residual units in call order (SRResNet's and
CARN's ResBlocks, ELAN's local feature extractors), embedded in whatever full-precision structure
the architecture has around them (heads, cascades, attention, upsamplers). ``run(x, step)`` computes
the network with ``step(k, feat)`` standing in for block k. That one hook is all RefQSR needs: its
reference path records the inputs of the blocks that RefER replaces, its query path swaps those
blocks for RefER, and every other part of the network stays the architecture's own code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .qconv import FP, BitSpec, PerSampleBits, QuantConv2d

Step = Callable[[int, torch.Tensor], torch.Tensor]


class SRBackbone(nn.Module, ABC):
    """Base class. Subclasses set ``arch`` (their registry name), ``scale``, ``n_feats`` (the width
    of the features a block maps to features of the same shape), ``scheme`` and ``blocks`` (an
    ``nn.ModuleList`` whose members are called as ``block(feat, bits) -> feat``), and define ``run``
    and ``block_conv_macs``."""

    arch: str
    scale: int
    n_feats: int
    scheme: str | None
    blocks: nn.ModuleList

    @abstractmethod
    def run(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """HR output of LR ``x`` [N,3,H,W] in [0, 1], with block k computed as ``step(k, feat)``."""

    @staticmethod
    @abstractmethod
    def block_conv_macs(n_feats: int) -> list[int]:
        """Multiply-accumulates per LR pixel of each quantized conv in one block (BitOPs, FQR)."""

    def sizes(self) -> dict[str, Any]:
        """The preset overrides that rebuild this network (saved in model files)."""
        return {"n_blocks": self.n_blocks, "n_feats": self.n_feats, "scale": self.scale}

    @abstractmethod
    def interpolation_init(self) -> SRBackbone:
        """Start as a bilinear upscaler (training on a CPU spends its few steps on detail)."""

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def act_bits(self) -> list[int]:
        """Activation bit widths the blocks' quantized convs were built for."""
        return sorted({b for m in self.blocks.modules() if isinstance(m, QuantConv2d) for b in m.act_bits})

    def forward(self, x: torch.Tensor, bits: BitSpec | PerSampleBits | Sequence[BitSpec] = FP) -> torch.Tensor:
        """``bits``: one BitSpec for every block, one per block, or per-sample bits (CADyQ's δ),
        bound here to the input so that every block's convs see this batch's patch features."""
        if isinstance(bits, PerSampleBits):
            bits = bits.bind(x, self)
        per_block = [bits] * self.n_blocks if isinstance(bits, (BitSpec, PerSampleBits)) else list(bits)
        if len(per_block) != self.n_blocks:
            raise ValueError(f"expected {self.n_blocks} BitSpecs, got {len(per_block)}")
        return self.run(x, lambda k, feat: self.blocks[k](feat, per_block[k]))
