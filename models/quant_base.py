"""What every quantizer shares: straight-through rounding, integer parameters, the two interfaces.

A fake-quantized tensor is always ``(q - zero_point) * scale`` with integer ``q`` in ``[qmin, qmax]``,
which is exactly ONNX QuantizeLinear/DequantizeLinear, so export and the integer engine read the
same numbers as training.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

FULL_PRECISION = 32
SUPPORTED_BITS = range(2, 9)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def check_bits(bits: int) -> int:
    if bits != FULL_PRECISION and bits not in SUPPORTED_BITS:
        raise ValueError(f"bit width {bits} is not supported (2..8, or 32 for full precision)")
    return bits


@dataclass(frozen=True)
class QuantParams:
    """Integer view of a quantizer: x ~ (q - zero_point) * scale, q in [qmin, qmax].

    ``scale`` and ``zero_point`` are tensors: scalars for per-tensor quantizers, shape [N] for
    per-sample (dynamic) ones. ``zero_point`` holds integers stored as float.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    bits: int


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """(clamp(round(x/s) + z, qmin, qmax) - z) * s with straight-through rounding.

    ``scale``/``zero_point`` broadcast against ``x`` (callers reshape per-sample ones to [N,1,1,1]).
    The clamp gives zero gradient to x outside the range and a gradient of +-1 to the bounds there,
    the same as clipping to learnable bounds first.
    """
    # Clamp before rounding: values beyond the range get zero gradient (and the bound gets +-1),
    # exactly as clipping to the bounds first; the forward value equals round-then-clamp.
    q = round_ste(torch.clamp(x / scale + zero_point, qmin, qmax))
    return (q - zero_point) * scale


class ActivationQuantizer(nn.Module, ABC):
    """Quantizes a conv input at a fixed bit width; owns its (learnable or calibrated) range.

    Subclasses set ``bits`` and ``self.initialized`` (a bool buffer): the first forward pass in
    training mode initialises the range from the data it sees (as PAMS and DDTB do), so a model
    fine-tuned from full-precision weights starts from sensible bounds.
    """

    bits: int

    @abstractmethod
    def qparams(self, x: torch.Tensor | None = None) -> QuantParams:
        """Integer parameters; dynamic quantizers need the input ``x`` (per-sample ranges)."""

    @abstractmethod
    def init_range(self, x: torch.Tensor) -> None:
        """Set the range from a batch of data (called once, on the first training forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                self.init_range(x)
            self.initialized.fill_(True)
        p = self.qparams(x)
        scale, zero = p.scale, p.zero_point
        if scale.dim() == 1:  # per-sample ranges broadcast over C, H, W
            scale, zero = scale.view(-1, 1, 1, 1), zero.view(-1, 1, 1, 1)
        return fake_quantize(x, scale, zero, p.qmin, p.qmax)

    @property
    def is_dynamic(self) -> bool:
        """True when the range depends on the input (per-sample scale)."""
        return False


class WeightQuantizer(nn.Module, ABC):
    """Quantizes a weight tensor at the bit width given per call (weights are shared across paths)."""

    @abstractmethod
    def qparams(self, weight: torch.Tensor, bits: int) -> QuantParams:
        """Per-tensor integer parameters of ``weight`` at ``bits``."""

    def forward(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        if check_bits(bits) == FULL_PRECISION:
            return weight
        p = self.qparams(weight, bits)
        return fake_quantize(weight, p.scale, p.zero_point, p.qmin, p.qmax)


def sample_for_statistics(x: torch.Tensor, limit: int = 1 << 18) -> torch.Tensor:
    """A flat, detached view of x, strided down to at most ``limit`` values (enough for a percentile, cheap to sort)."""
    flat = x.detach().flatten()
    if flat.numel() > limit:
        flat = flat[:: flat.numel() // limit + 1]
    return flat
