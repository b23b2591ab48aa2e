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

from ..pipeline.bits import FULL_PRECISION, SUPPORTED_BITS, check_bits  # noqa: F401 - re-exported


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


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

    ``scale``/``zero_point`` are scalars, or per-sample [N] tensors (broadcast over C, H, W).
    During ONNX export this becomes Clip -> QuantizeLinear -> DequantizeLinear (see QuantDequant).
    """
    if torch.onnx.is_in_onnx_export():
        return QuantDequant.apply(x, scale, zero_point, qmin, qmax)
    if scale.dim() == 1:
        scale, zero_point = scale.view(-1, 1, 1, 1), zero_point.view(-1, 1, 1, 1)
    return FakeQuantize.apply(x, scale, zero_point, qmin, qmax)


class FakeQuantize(torch.autograd.Function):
    """y = (round(clamp(x / s + z, qmin, qmax)) - z) * s, rounding straight-through.

    Clamping before rounding: values beyond the range get zero gradient and the bounds the whole
    of it, exactly as clipping to the bounds first; the forward value equals round-then-clamp.
    Written as one autograd node that keeps only its input (and the scalars) for the backward pass
    and recomputes the in-range mask there. The same formula as separate autograd ops keeps two
    more activation-sized tensors per call (the shifted input for clamp's mask, the grid values for
    the product's gradient), which is most of a QAT step's memory: several calls per conv.
    Gradients, with m = [qmin <= x / s + z <= qmax] (clamp's inclusive mask):
    dy/dx = m;  dy/ds = (q - z) - m * x / s;  dy/dz = s * (m - 1)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):  # type: ignore[override]
        ctx.save_for_backward(x, scale, zero_point)
        ctx.grid = (qmin, qmax)
        return (torch.round(torch.clamp(x / scale + zero_point, qmin, qmax)) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.grid
        u = x / scale + zero_point
        inside = (u >= qmin) & (u <= qmax)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            q = torch.round(torch.clamp(u, qmin, qmax))
            d_s = torch.where(inside, q - u, q - zero_point)  # q - u = q - z - x / s, u already at hand
            grad_s = _sum_to(grad * d_s, scale.shape)
        if ctx.needs_input_grad[2]:
            grad_z = _sum_to(torch.where(inside, 0.0, -grad * scale), zero_point.shape)
        return grad_x, grad_s, grad_z, None, None


def _sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient to a parameter's shape (a scalar, or per-sample [N, 1, 1, 1])."""
    if g.shape == shape:
        return g
    if len(shape) == 0:
        return g.sum()
    return g.sum(dim=tuple(d for d in range(g.dim()) if d >= len(shape) or shape[d] == 1), keepdim=True).view(shape)


def _onnx_int_type(qmin: int) -> int:
    return 2 if qmin >= 0 else 3  # onnx.TensorProto.UINT8 / INT8: the 8-bit container of the grid


class QuantDequant(torch.autograd.Function):
    """Export form of fake_quantize: standard ONNX QDQ in an 8-bit container. Grids narrower than
    the container (b < 8 bits) are expressed by a Clip to the b-bit range before QuantizeLinear;
    per-sample scales become per-axis (axis 0) quantization."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):  # type: ignore[override]
        if scale.dim() == 1:
            scale, zero_point = scale.view(-1, 1, 1, 1), zero_point.view(-1, 1, 1, 1)
        return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin: int, qmax: int):  # type: ignore[no-untyped-def]
        per_sample = scale.type().dim() == 1
        bscale, bzero = scale, zero_point
        if per_sample:
            axes = g.op("Constant", value_t=torch.tensor([1, 2, 3]))
            bscale, bzero = g.op("Unsqueeze", scale, axes), g.op("Unsqueeze", zero_point, axes)
        lo = g.op("Mul", g.op("Sub", g.op("Constant", value_t=torch.tensor(float(qmin))), bzero), bscale)
        hi = g.op("Mul", g.op("Sub", g.op("Constant", value_t=torch.tensor(float(qmax))), bzero), bscale)
        clipped = g.op("Min", g.op("Max", x, lo), hi)
        zp = g.op("Cast", zero_point, to_i=_onnx_int_type(qmin))
        kw = {"axis_i": 0} if per_sample else {}
        q = g.op("QuantizeLinear", clipped, scale, zp, **kw)
        return g.op("DequantizeLinear", q, scale, zp, **kw)


class DequantizeConstant(torch.autograd.Function):
    """Export form of a quantized weight: an int8/uint8 initializer and one DequantizeLinear."""

    @staticmethod
    def forward(ctx, q, scale, zero_point):  # type: ignore[override]
        return (q.float() - zero_point) * scale

    @staticmethod
    def symbolic(g, q, scale, zero_point):  # type: ignore[no-untyped-def]
        return g.op("DequantizeLinear", q, scale, zero_point)


def export_weight(weight: torch.Tensor, p: QuantParams) -> torch.Tensor:
    """The quantized weight as constants (int8 grid values, scale, zero point) + DequantizeLinear,
    computed outside the trace so that the ONNX graph stores integers, not float math on floats."""
    scale = float(p.scale)
    zero = int(round(float(p.zero_point)))
    dtype = torch.uint8 if p.qmin >= 0 else torch.int8
    w = torch.from_numpy(weight.detach().cpu().numpy().copy())
    q = torch.clamp(torch.round(w / scale) + zero, p.qmin, p.qmax).to(dtype)
    return DequantizeConstant.apply(q, torch.tensor(scale), torch.tensor(zero, dtype=dtype))


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
        # fp32 even under bf16 autocast: the b-bit grid and the range (DDTB's gate is a small MLP)
        # as the integer engine computes them; bf16 has only 8 significant bits
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.training and not bool(self.initialized):
                with torch.no_grad():
                    self.init_range(x)
                self.initialized.fill_(True)
            p = self.qparams(x)
            return fake_quantize(x, p.scale, p.zero_point, p.qmin, p.qmax)

    @property
    def is_dynamic(self) -> bool:
        """True when the range depends on the input (per-sample scale)."""
        return False


class WeightQuantizer(nn.Module, ABC):
    """Quantizes a weight tensor at the bit width given per call (weights are shared across paths)."""

    @abstractmethod
    def qparams(self, weight: torch.Tensor, bits: int) -> QuantParams:
        """Per-tensor integer parameters of ``weight`` at ``bits``."""

    def cached_qparams(self, weight: torch.Tensor, bits: int) -> QuantParams:
        """``qparams`` memoised in eval mode: the weights do not change between inference calls,
        and the percentile ranges cost ~40 ms per conv (torch.quantile). The key holds the
        tensor's version counter, so any in-place update (optimizer step, load_state_dict)
        invalidates it."""
        if self.training:
            return self.qparams(weight, bits)
        key = (bits, weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cache = self.__dict__.setdefault("_qparams_cache", {})
        if key not in cache:
            if len(cache) >= 8:  # stale keys of earlier weight versions
                cache.clear()
            with torch.no_grad():
                cache[key] = self.qparams(weight.detach(), bits)
        return cache[key]

    def forward(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        if check_bits(bits) == FULL_PRECISION:
            return weight
        if torch.onnx.is_in_onnx_export():
            with torch.no_grad():
                return export_weight(weight, self.cached_qparams(weight.detach(), bits))
        p = self.cached_qparams(weight, bits)
        return fake_quantize(weight, p.scale, p.zero_point, p.qmin, p.qmax)


def sample_for_statistics(x: torch.Tensor, limit: int = 1 << 18) -> torch.Tensor:
    """A flat, detached view of x, strided down to at most ``limit`` values (enough for a percentile, cheap to sort)."""
    flat = x.detach().flatten()
    if flat.numel() > limit:
        flat = flat[:: flat.numel() // limit + 1]
    return flat
