"""A conv whose input and weights are fake-quantized at bit widths chosen per call.

One set of weights serves every path (RefQSR's reference and query paths share weights); each
activation bit width the conv may run at has its own learnable range.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..pipeline.bits import FP, BitSpec  # noqa: F401 - re-exported
from .quant_base import FULL_PRECISION, check_bits
from .quantizers import make_activation_quantizer, make_weight_quantizer


class PerSampleBits(ABC):
    """Bits that are not one BitSpec for the whole batch but chosen per sample inside the convs
    (CADyQ's δ, models/quant_cadyq.py). A network binds such a value to its input before its
    blocks run (``SRBackbone.forward``), because the choice reads features of the input patch."""

    @abstractmethod
    def bind(self, x: torch.Tensor, model: nn.Module) -> PerSampleBits:
        """The per-call form of these bits for network input ``x`` of ``model``."""


class QuantConv2d(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        scheme: str | None,
        act_bits: Iterable[int] = (),
        stride: int = 1,
        padding: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.scheme = scheme
        wanted = sorted({check_bits(b) for b in act_bits} - {FULL_PRECISION}) if scheme else []
        self.act_quant = nn.ModuleDict(
            {str(b): make_activation_quantizer(scheme, b, in_channels) for b in wanted}  # type: ignore[arg-type]
        )
        self.weight_quant = make_weight_quantizer(scheme) if scheme else None

    @property
    def act_bits(self) -> list[int]:
        return sorted(int(b) for b in self.act_quant)

    def quantize_input(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == FULL_PRECISION:
            return x
        try:
            return self.act_quant[str(bits)](x)
        except KeyError:
            raise ValueError(f"this conv has no {bits}-bit activation quantizer (has {self.act_bits})") from None

    def quantized_weight(self, bits: int) -> torch.Tensor:
        if self.weight_quant is None or bits == FULL_PRECISION:
            return self.conv.weight
        return self.weight_quant(self.conv.weight, bits)

    def forward(self, x: torch.Tensor, bits: BitSpec = FP) -> torch.Tensor:
        if isinstance(bits, PerSampleBits):
            raise TypeError("per-sample (δ) bits need a CADyQ network (scheme 'cadyq')")
        if self.scheme is None or bits == FP:
            return self.conv(x)
        return self.grid_conv(self.quantize_input(x, bits.act), self.quantized_weight(bits.weight))

    def grid_conv(self, xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        """This conv on fake-quantized operands, in fp32 even under bf16 autocast: bf16 keeps 8
        significant bits, so its cast would move 8-bit grid values off their grid, and QAT would
        train a network that the integer engine (exact sums) does not run."""
        c = self.conv
        if not torch.is_autocast_enabled(xq.device.type):  # (also the ONNX export: no casts traced)
            return F.conv2d(xq, wq, c.bias, c.stride, c.padding)
        with torch.autocast(xq.device.type, enabled=False):
            bias = None if c.bias is None else c.bias.float()
            return F.conv2d(xq.float(), wq.float(), bias, c.stride, c.padding)
