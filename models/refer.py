"""RefER: reference-based error refinement (paper Fig. 6, eqs. (4)-(7)).

Which reference feature is warped: the reference path's feature at the SAME depth as the query
feature, i.e. for the RefER that replaces ResBlock k, the input of the reference path's ResBlock k
(the output of its block k-1, computed entirely at b_high). Same depth because (a) the cost volume
compares query and reference in one feature space, so both must come from the same layer, and
(b) the difference F^q - F^{r->q} then isolates what the low-bit query path got wrong at that
depth, which is what the refinement convs learn to undo before the residual adds F^q back.
"""

from __future__ import annotations

import torch
from torch import nn

from .matching import SOFTMAX_TEMPERATURE, backward_warp, normalize_and_pool, pooled_flow, upsample_flow
from .qconv import BitSpec, PerSampleBits, QuantConv2d
from .quantizers import make_activation_quantizer


class RefER(nn.Module):
    def __init__(
        self,
        channels: int,
        scheme: str,
        b_high: int,
        b_low: int,
        temperature: float = SOFTMAX_TEMPERATURE,
        own_matching: bool = True,
    ) -> None:
        """``own_matching=False``: the block is given its flow (RefQSR's shared matching) and has no
        matching step, hence no match quantizer, of its own."""
        super().__init__()
        self.b_high = b_high
        self.b_low = b_low
        self.temperature = temperature
        # Matching features are quantized to b_low (eq. (4)); a static range, because the cost
        # volume compares query and reference values and both must sit on one grid.
        self.match_quant = make_activation_quantizer(scheme, b_low, channels, static=True) if own_matching else None
        self.conv1 = QuantConv2d(channels, channels, 3, scheme, (b_high,))
        self.act = nn.PReLU()
        self.conv2 = QuantConv2d(channels, channels, 3, scheme, (b_high,))

    def flow(self, query: torch.Tensor, reference: torch.Tensor, hard: bool) -> torch.Tensor:
        """Full-resolution displacement [N, 2, H, W] from query pixels into the reference feature."""
        q = self.match_quant(normalize_and_pool(query))
        r = self.match_quant(normalize_and_pool(reference))
        if hard:
            # Arg-max on the integer grid values: dot products of small integers are exact in
            # float32, so ties (frequent at b_low bits) break the same way (first index) in
            # PyTorch, ONNX Runtime and the compiled integer kernel. The positive scale does not
            # change the arg-max.
            # Dequantized values are (int - zero_point) * scale, so value / scale is an integer.
            scale = self.match_quant.qparams().scale
            q, r = torch.round(q / scale), torch.round(r / scale)
        size = (query.shape[-2], query.shape[-1])
        return upsample_flow(pooled_flow(q, r, size, hard, self.temperature), size)

    def align(
        self, query: torch.Tensor, reference: torch.Tensor, hard: bool | None, flow: torch.Tensor | None
    ) -> torch.Tensor:
        """The reference feature warped onto the query: by ``flow`` when given (shared matching),
        else by this block's own matching (``hard``: arg-max, default at inference, or soft-argmax,
        default in training)."""
        if flow is None:
            if self.match_quant is None:
                raise ValueError("this RefER has no matching step of its own: pass the shared flow")
            hard = (not self.training) if hard is None else hard
            flow = self.flow(query, reference, hard)
        return backward_warp(reference, flow)

    def forward(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        hard: bool | None = None,
        bits: BitSpec | PerSampleBits | None = None,
        flow: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``bits``: of the refinement convs (δ-RefQSR: the query path's bound δ); default b_high."""
        bits = BitSpec.uniform(self.b_high) if bits is None else bits
        aligned = self.align(query, reference, hard, flow)
        refinement = self.conv2(self.act(self.conv1(query - aligned, bits)), bits)
        return query + refinement
