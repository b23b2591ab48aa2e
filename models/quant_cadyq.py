"""CADyQ (Hong et al., ECCV 2022): content-aware dynamic quantization, bits chosen per patch and layer.

How bits are chosen. Every quantized block conv is a :class:`CadyqConv2d`: a PAMS
:class:`~.qconv.QuantConv2d` with one activation quantizer per candidate width (4, 6, 8) and a
:class:`BitSelector`, a linear layer over the patch's image-gradient magnitude (2 values) and the
per-channel standard deviation of the conv input (C values) giving one logit per candidate. The
forward value is always the input quantized at the arg-max candidate (hard selection); in training
the gradient is that of the softmax-weighted mix of the candidate quantizations (straight-through),
which is how the selector learns from the reconstruction loss. The bit loss (CADyQ's "weighted
bits") pushes the choices down; see :meth:`Selection.bit_loss`.

How bits travel. A network is called with ``Delta()`` (the δ setting) instead of a ``BitSpec``.
Before the blocks run, the network binds it to its input (``SRBackbone.forward``, RefQSR's paths):
the result, a :class:`Selection`, holds the per-patch image-gradient features (computed once from
the LR input) and, for CABM models, the lookup table's bits per patch and layer. It reaches every
conv through the blocks' ordinary ``bits`` argument, and collects what each conv chose
(``Selection.records``: conv, bits per sample, bit-loss term). Nothing global is involved; every
conv also keeps its latest choice in ``last_bits`` ([N], int64), for inspection.

Readings of CADyQ's code (github.com/Cheeun/CADyQ) and deliberate differences:

* Weights stay at one width (8 bits, CADyQ's ``k_bits``; the per-sample choice is the activation
  width). The RefQSR paper's Table II agrees: SRResNet-CADyQ's 6.02 G BitOPs on Urban100 is the
  32-bit 148.32 G x (8/32) x (5.18/32), its FQR being 5.18.
* Image gradient: mean |Sobel| (kornia's normalised 3x3 kernels, replicate border) of the BT.601
  gray LR patch in [0, 1], x and y, times 1e3, as CADyQ's ``spatial_gradient`` feature. The
  activation std is unbiased and detached, as CADyQ's.
* Selector start: all weights 1, biases 0 except +1 on the highest candidate, as CADyQ, so an
  untrained selector picks 8 bits everywhere and a network fine-tuned from an 8-bit model starts
  as that model.
* Straight-through form: ``hard.detach() + (soft - soft.detach())`` rather than CADyQ's
  ``hard.detach() - soft.detach() + soft``: the same gradient (the input, every candidate's range
  and the selector get the gradient of the softmax mix), but the forward value is exactly the hard
  choice (no rounding residue), so training and inference forwards agree bit for bit.
* As everywhere in this project, a block's identity carries the unquantized block input and the
  residual branch output is not re-quantized (CADyQ's EDSR/SRResNet quantize both with PAMS).
* Bit loss: CADyQ sums the weighted bits over the batch; here they are averaged over the batch
  (summed over layers), so the weight does not depend on the batch size (see ``--bit-weight``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..pipeline.bits import DELTA_WEIGHT_BITS
from .qconv import FP, BitSpec, PerSampleBits, QuantConv2d
from .quant_base import check_bits, fake_quantize
from .refer import RefER

SCHEME = "cadyq"
CANDIDATES = (4, 6, 8)  # CADyQ's search space
WEIGHT_BITS = DELTA_WEIGHT_BITS  # CADyQ's k_bits: the width of every weight under δ
GRAD_SCALE = 1e3  # CADyQ scales the mean gradient magnitude by 1e3 before the selector

_GRAY = (0.299, 0.587, 0.114)  # kornia.color.rgb_to_grayscale


def gray(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB -> [N, 1, H, W] luma with kornia's (BT.601) weights."""
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def shifted(p: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The H x W window of a 1-px padded [N, 1, H+2, W+2] map, offset by (dy, dx) in -1..1."""
    h, w = p.shape[-2] - 2, p.shape[-1] - 2
    return p[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def image_gradient_features(x: torch.Tensor) -> torch.Tensor:
    """CADyQ's patch descriptor: [N, 2] mean |d/dx| and |d/dy| of the gray patch, times 1e3.

    kornia's spatial_gradient(mode="sobel", normalized=True): the Sobel kernels divided by their
    L1 norm (8), replicate border; written as shifted slices rather than a 1-channel conv, so that
    the exported graph has no extra Conv node and every engine sums the same terms."""
    with torch.autocast(x.device.type, enabled=False):  # a patch statistic: fp32 even under bf16 autocast
        p = F.pad(gray(x.detach().float()), (1, 1, 1, 1), mode="replicate")
        s = shifted
        gx = (s(p, -1, 1) - s(p, -1, -1)) + 2 * (s(p, 0, 1) - s(p, 0, -1)) + (s(p, 1, 1) - s(p, 1, -1))
        gy = (s(p, 1, -1) - s(p, -1, -1)) + 2 * (s(p, 1, 0) - s(p, -1, 0)) + (s(p, 1, 1) - s(p, -1, 1))
        return torch.cat([gx.abs().mean(dim=(2, 3)), gy.abs().mean(dim=(2, 3))], dim=1) * (GRAD_SCALE / 8.0)


class BitSelector(nn.Module):
    """logits = Linear([image gradient (2), std of each input channel (C)]) -> one per candidate."""

    def __init__(self, channels: int, candidates: Sequence[int] = CANDIDATES) -> None:
        super().__init__()
        self.candidates = tuple(candidates)
        self.linear = nn.Linear(channels + 2, len(self.candidates))
        with torch.no_grad():  # CADyQ's start: the highest width wins until training says otherwise
            self.linear.weight.fill_(1.0)
            self.linear.bias.zero_()
            self.linear.bias[-1] = 1.0

    def forward(self, image_grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        std = x.detach().float().std(dim=(2, 3))  # CADyQ detaches the layer statistic
        features = torch.cat([image_grad.to(std.dtype), std], dim=1)
        return self.linear(features)


@dataclass
class Choice:
    """What one CADyQ conv call chose: the conv, bits per sample ([N] int64) and, in training with
    a selector, the bit-loss term per sample (else None)."""

    conv: CadyqConv2d
    bits: torch.Tensor
    term: torch.Tensor | None


@dataclass(frozen=True)
class Delta(PerSampleBits):
    """δ: activation bits chosen per patch and layer (CADyQ's selector or a CABM table), weights at
    ``weight`` bits. Immutable, so it can be stored and reused; each network call binds it to its
    input as a fresh :class:`Selection`."""

    weight: int = WEIGHT_BITS

    def __post_init__(self) -> None:
        check_bits(self.weight)

    def bind(self, x: torch.Tensor, model: nn.Module) -> Selection:
        return Selection(self.weight).bind(x, model)


class Selection(PerSampleBits):
    """One network call's δ context: the per-patch features the selectors read, the CABM table's
    bits (when the model has a table), and the record of what every CADyQ conv chose.

    Pass one to a network (``net(x, sel)``) to read ``sel.records`` / ``sel.bit_loss()`` after the
    call; a Selection serves one call (one input batch)."""

    def __init__(self, weight: int = WEIGHT_BITS) -> None:
        self.weight = check_bits(weight)
        self.image_grad: torch.Tensor | None = None
        self.table_bits: torch.Tensor | None = None  # [N, L] CABM bits, column l for dynamic conv l
        self._columns: dict[int, int] = {}
        self.records: list[Choice] = []

    @property
    def bound(self) -> bool:
        return self.image_grad is not None

    def bind(self, x: torch.Tensor, model: nn.Module) -> Selection:
        """Compute the per-patch features of the network input ``x``; ``model`` is the network
        being called (its ``cabm`` table, if any, replaces the selectors)."""
        if self.bound:
            raise ValueError("this Selection is already bound to an input; use a fresh one per call")
        self.image_grad = image_gradient_features(x)
        table = getattr(model, "cabm", None)
        if table is not None:
            convs = dynamic_convs(model)
            self.table_bits = table.lookup(x, len(convs))
            self._columns = {id(c): col for col, c in enumerate(convs)}
        return self

    def table_choice(self, conv: CadyqConv2d) -> torch.Tensor | None:
        """The CABM table's bits for ``conv`` per sample, or None (no table: the selector decides)."""
        if self.table_bits is None:
            return None
        try:
            col = self._columns[id(conv)]
        except KeyError:
            raise ValueError("this conv is not in the model's CABM table (bind to the model that owns it)") from None
        return self.table_bits[:, col : col + 1].squeeze(1)  # a slice (not a gather) in exported graphs

    def record(self, conv: CadyqConv2d, bits: torch.Tensor, term: torch.Tensor | None) -> None:
        self.records.append(Choice(conv, bits, term))

    def chosen_bits(self) -> torch.Tensor:
        """[N, L] the bits every recorded conv chose per sample, columns in call order."""
        return torch.stack([r.bits for r in self.records], dim=1)

    def by_conv(self) -> dict[int, Choice]:
        """Records keyed by ``id(conv)`` (a conv called twice keeps its last call)."""
        return {id(r.conv): r for r in self.records}

    def bit_loss(self) -> torch.Tensor:
        """CADyQ's bit loss: over the convs that chose in training, the batch mean of
        ``b_hard / E_p[b]`` with the expectation detached; its value is about the number of
        layers, its gradient pushes every selector towards lower bits in proportion to
        ``p_k (b_k - E_p[b]) / E_p[b]``. Zero when nothing was selected in training."""
        terms = [r.term.mean() for r in self.records if r.term is not None]
        if not terms:
            device = self.image_grad.device if self.image_grad is not None else None
            return torch.zeros((), device=device)
        return torch.stack(terms).sum()


class CadyqConv2d(QuantConv2d):
    """PAMS QuantConv2d plus a bit selector: called with a bound :class:`Selection` it quantizes
    each sample's input at the candidate chosen for it; called with a BitSpec it is a plain
    fixed-precision QuantConv2d (RefQSR's query path at b_low)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        act_bits: Iterable[int] = (),
        candidates: Sequence[int] = CANDIDATES,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = True,
    ) -> None:
        cands = tuple(sorted({check_bits(b) for b in candidates}))
        if len(cands) < 2 or max(cands) > 8:
            raise ValueError(f"CADyQ needs at least two candidate widths in 2..8, got {list(candidates)}")
        super().__init__(
            in_channels, out_channels, kernel_size, SCHEME, set(act_bits) | set(cands), stride, padding, bias
        )
        self.candidates = cands
        self.selector = BitSelector(in_channels, cands)
        self.last_bits: torch.Tensor | None = None

    @classmethod
    def from_quant_conv(cls, conv: QuantConv2d, candidates: Sequence[int] = CANDIDATES) -> CadyqConv2d:
        """A CADyQ conv with ``conv``'s shape, weights and activation widths (plus the candidates)."""
        c = conv.conv
        new = cls(
            c.in_channels,
            c.out_channels,
            c.kernel_size[0],
            conv.act_bits,
            candidates,
            c.stride[0],
            c.padding[0],
            c.bias is not None,
        )
        new.conv.load_state_dict(c.state_dict())
        return new

    def select(self, x: torch.Tensor, sel: Selection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input quantized per sample, bits chosen [N], bit-loss term [N] or None)."""
        if torch.onnx.is_in_onnx_export():
            return self._export_select(x, sel)
        n = x.shape[0]
        rows = torch.arange(n, device=x.device)
        cands = torch.tensor(self.candidates, device=x.device)
        # every candidate quantizes the whole batch (elementwise, cheap next to the conv); each
        # sample then takes its own: exact, whatever the other candidates computed
        qs = torch.stack([self.quantize_input(x, b) for b in self.candidates])  # [K, N, C, H, W]
        fixed = sel.table_choice(self)
        if fixed is not None:
            fixed = fixed.to(x.device).long().contiguous()
            idx = torch.searchsorted(cands, fixed).clamp_max(len(cands) - 1)
            if not bool((cands[idx] == fixed).all()):
                raise ValueError(
                    f"CABM table bits {sorted(set(fixed.tolist()))} are not all among {list(self.candidates)}"
                )
            return qs[idx, rows], fixed, None
        if not sel.bound:
            raise ValueError("a Selection must be bound to the network input before the convs run")
        logits = self.selector(sel.image_grad, x)
        idx = logits.argmax(dim=1)
        chosen = cands[idx]
        hard = qs[idx, rows]
        if not self.training:
            return hard, chosen, None
        p = torch.softmax(logits.float(), dim=1)  # [N, K]
        soft = (p.t().reshape(len(cands), n, 1, 1, 1) * qs).sum(dim=0)
        # forward: exactly the hard choice; backward: only through the soft mix, as CADyQ (the
        # input, every candidate's range and the selector all get the p-weighted gradient)
        xq = hard.detach() + (soft - soft.detach())
        soft_bits = p @ cands.float()
        bits_ste = chosen.float() + (soft_bits - soft_bits.detach())
        return xq, chosen, bits_ste / soft_bits.detach()

    def _export_select(self, x: torch.Tensor, sel: Selection) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The inference choice as graph operations: candidate index per sample (the CABM table's
        bits matched to the candidates, else the selector's arg-max), then the input clipped to that
        candidate's PAMS range and quantized with a per-sample scale (QDQ along axis 0) in the
        8-bit container: round(clip(x, -a, a) / s) for s = a / (2^(b-1) - 1) is the b-bit grid."""
        cands = torch.tensor(self.candidates, device=x.device, dtype=torch.float32)
        fixed = sel.table_choice(self)
        if fixed is not None:
            onehot = (fixed.float().unsqueeze(1) == cands.unsqueeze(0)).float()
        else:
            logits = self.selector(sel.image_grad, x)
            onehot = (logits.argmax(dim=1, keepdim=True) == torch.arange(len(cands), device=x.device)).float()
        # per-sample values as one-hot sums, not gathers: plain elementwise ops in every engine
        params = [self.act_quant[str(b)].qparams() for b in self.candidates]
        alpha = (onehot * torch.stack([p.scale * p.qmax for p in params])).sum(dim=1)  # [N] clip bound of each sample
        scale = (onehot * torch.stack([p.scale for p in params])).sum(dim=1)
        a = alpha.view(-1, 1, 1, 1)
        clipped = torch.minimum(torch.maximum(x, -a), a)
        xq = fake_quantize(clipped, scale, torch.zeros_like(scale), -127, 127)
        return xq, (onehot * cands).sum(dim=1).long(), None

    def forward(self, x: torch.Tensor, bits: BitSpec | PerSampleBits = FP) -> torch.Tensor:
        if not isinstance(bits, Selection):
            if isinstance(bits, PerSampleBits):
                raise TypeError("call the network with Delta(), not its convs: it binds δ to the network input")
            out = super().forward(x, bits)
            self.last_bits = torch.full((x.shape[0],), bits.act, dtype=torch.long, device=x.device)
            return out
        with torch.autocast(x.device.type, enabled=False):  # the choice in fp32, as the engine makes it
            xq, chosen, term = self.select(x.float(), bits)
        bits.record(self, chosen, term)
        self.last_bits = chosen.detach()
        return self.grid_conv(xq, self.quantized_weight(bits.weight))


def convert_to_cadyq(root: nn.Module, candidates: Sequence[int] = CANDIDATES) -> nn.Module:
    """Replace every plain QuantConv2d under ``root`` by a CadyqConv2d of the same shape (in place).

    Done after an architecture is built, so SRResNet, CARN and ELAN-light get CADyQ without a
    line of their own: their blocks only pass ``bits`` on to their convs."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is QuantConv2d:
                setattr(module, name, CadyqConv2d.from_quant_conv(child, candidates))
    return root


def dynamic_convs(model: nn.Module) -> list[CadyqConv2d]:
    """The CADyQ convs of ``model`` in module order (the layer order of CABM tables)."""
    return [m for m in model.modules() if isinstance(m, CadyqConv2d)]


def model_candidates(model: nn.Module) -> tuple[int, ...]:
    convs = dynamic_convs(model)
    if not convs:
        raise ValueError("not a CADyQ network")
    return convs[0].candidates


class DynamicRefER(RefER):
    """RefER for δ-RefQSR: its two refinement convs (b_high in RefQSR) are CADyQ convs with their
    own selectors, so they run at δ like the reference path; the matching features stay at b_low."""

    def __init__(
        self, channels: int, b_high: int, b_low: int, candidates: Sequence[int] = CANDIDATES, **kw: Any
    ) -> None:
        super().__init__(channels, SCHEME, b_high, b_low, **kw)
        self.conv1 = CadyqConv2d.from_quant_conv(self.conv1, candidates)
        self.conv2 = CadyqConv2d.from_quant_conv(self.conv2, candidates)


__all__ = [
    "BitSelector",
    "CadyqConv2d",
    "Choice",
    "Delta",
    "DynamicRefER",
    "Selection",
    "CANDIDATES",
    "WEIGHT_BITS",
    "convert_to_cadyq",
    "dynamic_convs",
    "image_gradient_features",
    "model_candidates",
]
