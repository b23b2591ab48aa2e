"""Plain min/max quantization (ClustBlock, paper Sec. III-C-2): ranges are the observed minimum and
maximum of the activations (calibrated, then frozen) and of the weights. Asymmetric uint8 grid."""

from __future__ import annotations

import torch

from .quant_base import ActivationQuantizer, QuantParams, WeightQuantizer, check_bits
from .quant_ddtb import _asymmetric_params


class MinMaxActivation(ActivationQuantizer):
    def __init__(self, bits: int, channels: int = 0) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.register_buffer("lower", torch.tensor(0.0))
        self.register_buffer("upper", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    def init_range(self, x: torch.Tensor) -> None:
        self.lower.fill_(float(x.detach().min()))
        self.upper.fill_(float(x.detach().max()))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Widen the range to cover x (calibration over many batches)."""
        if not bool(self.initialized):
            self.init_range(x)
            self.initialized.fill_(True)
            return
        self.lower.copy_(torch.minimum(self.lower, x.min()))
        self.upper.copy_(torch.maximum(self.upper, x.max()))

    def qparams(self, x: torch.Tensor | None = None) -> QuantParams:
        return _asymmetric_params(self.lower, self.upper, self.bits)


class MinMaxWeight(WeightQuantizer):
    def qparams(self, weight: torch.Tensor, bits: int) -> QuantParams:
        w = weight.detach()
        return _asymmetric_params(w.min(), w.max(), check_bits(bits))
