"""PAMS (Li et al., ECCV 2020): symmetric quantization with a learnable activation bound alpha.

Activations: clip to [-alpha, alpha], uniform grid of 2^(b-1)-1 steps per side, zero point 0.
Weights: per-tensor max-abs, symmetric, same grid. Rounding is straight-through, so alpha receives
gradient both from clipped values (+-1) and through the step size.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant_base import ActivationQuantizer, QuantParams, WeightQuantizer, check_bits


def _symmetric_levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


class PamsActivation(ActivationQuantizer):
    def __init__(self, bits: int, channels: int = 0) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.alpha = nn.Parameter(torch.tensor(10.0))
        self.register_buffer("initialized", torch.tensor(False))

    def init_range(self, x: torch.Tensor) -> None:
        # PAMS starts alpha at the batch mean of the per-sample max |x|.
        per_sample = x.detach().abs().flatten(1).amax(dim=1)
        self.alpha.fill_(float(per_sample.mean().clamp_min(1e-4)))

    def qparams(self, x: torch.Tensor | None = None) -> QuantParams:
        levels = _symmetric_levels(self.bits)
        alpha = self.alpha.abs().clamp_min(1e-6)
        zero = torch.zeros((), device=alpha.device)
        return QuantParams(alpha / levels, zero, -levels, levels, self.bits)


class PamsWeight(WeightQuantizer):
    def qparams(self, weight: torch.Tensor, bits: int) -> QuantParams:
        levels = _symmetric_levels(check_bits(bits))
        max_abs = weight.detach().abs().max().clamp_min(1e-8)
        zero = torch.zeros((), device=weight.device)
        return QuantParams(max_abs / levels, zero, -levels, levels, bits)


__all__ = ["PamsActivation", "PamsWeight"]
