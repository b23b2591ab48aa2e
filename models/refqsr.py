"""The RefQSR wrapper (paper Fig. 3): one set of SR weights, two paths.

reference path: every ResBlock at (act b_high, weight b_high).
query path: first ResBlock at b_high, the following ones at (act b_low, weight b_medium), and the
last ``n_refer`` ResBlocks replaced by RefER blocks fed with the reference path's features.

``tail="highbit"`` is the paper's Table V "w/o RefER" ablation: the query path's last ``n_refer``
blocks stay ResBlocks, run at b_high, and no reference feature is used.
"""
from __future__ import annotations

import torch
from torch import nn

from .clustblock import DEFAULT_TAU, ClustBlock
from .qconv import BitSpec
from .refer import RefER
from .backbone import SRBackbone


def medium_bits(b_high: int, b_low: int) -> int:
    """b_medium = round((b_high + b_low) / 2) with Python's round (half to even): 8-5 -> 6,
    8-3 -> 6, 4-3 -> 4, 4-2 -> 3. Half-to-even is what reproduces the paper's Table II BitOPs for
    8-5 (65.49 G on Test4K needs 6-bit query weights, not 7)."""
    return round((b_high + b_low) / 2)


TAILS = ("refer", "highbit")


class RefQSR(nn.Module):
    def __init__(
        self,
        backbone: SRBackbone,
        b_high: int,
        b_low: int,
        n_refer: int = 2,
        clustblock: ClustBlock | None = None,
        tau: float = DEFAULT_TAU,
        tail: str = "refer",
    ) -> None:
        super().__init__()
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
        if backbone.scheme is None:
            raise ValueError("RefQSR needs a quantized backbone (scheme 'pams' or 'ddtb')")
        if not 0 < n_refer < backbone.n_blocks - 1:
            raise ValueError(f"n_refer must be in 1..{backbone.n_blocks - 2}")
        if b_low > b_high:
            raise ValueError("b_low must not exceed b_high")
        self.backbone = backbone
        self.b_high, self.b_low = b_high, b_low
        self.b_medium = medium_bits(b_high, b_low)
        self.tail = tail
        self.n_refer = n_refer
        self.refers = nn.ModuleList(
            RefER(backbone.n_feats, backbone.scheme, b_high, b_low) for _ in range(n_refer if tail == "refer" else 0)
        )
        self.clustblock = clustblock
        self.tau = tau

    def cost_sizes(self) -> dict[str, int | str]:
        """What BitOPs accounting (models.bitops.count_bitops) needs to know of this network."""
        net = self.backbone
        return {**net.sizes(), "n_refer": self.n_refer, "tail": self.tail}

    @property
    def high(self) -> BitSpec:
        return BitSpec(self.b_high, self.b_high)

    @property
    def low(self) -> BitSpec:
        return BitSpec(self.b_low, self.b_medium)

    @property
    def first_refer(self) -> int:
        """Index of the first ResBlock that RefER replaces on the query path."""
        return self.backbone.n_blocks - self.n_refer

    def query_block_bits(self) -> list[BitSpec]:
        """Bits of the query path's ResBlocks that stay ResBlocks (block 0 high, the rest low)."""
        return [self.high] + [self.low] * (self.first_refer - 1)

    def reference_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """HR output of reference patches and the features RefER needs: the input of each
        reference-path ResBlock that a RefER replaces on the query path (see refer.py)."""
        net, kept = self.backbone, []

        def step(k: int, feat: torch.Tensor) -> torch.Tensor:
            if k >= self.first_refer:
                kept.append(feat)
            return net.blocks[k](feat, self.high)

        return net.run(x, step), kept

    def query_forward(self, x: torch.Tensor, reference_features: list[torch.Tensor] | None,
                      hard: bool | None = None) -> torch.Tensor:
        """HR output of query patches, given the reference features gathered per query.

        ``reference_features=None`` feeds each RefER the query's own feature at its input: the
        paper's Table V "self-reference" ablation."""
        if reference_features is None:
            reference_features = [None] * len(self.refers)
        if self.tail == "refer" and len(reference_features) != len(self.refers):
            raise ValueError(f"expected {len(self.refers)} reference features, got {len(reference_features)}")
        net, bits = self.backbone, self.query_block_bits()

        def step(k: int, feat: torch.Tensor) -> torch.Tensor:
            if k < self.first_refer:
                return net.blocks[k](feat, bits[k])
            if self.tail == "highbit":
                return net.blocks[k](feat, self.high)
            ref_feat = reference_features[k - self.first_refer]
            return self.refers[k - self.first_refer](feat, feat if ref_feat is None else ref_feat, hard)

        return net.run(x, step)

    def forward(self, query: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward on (query, reference) patch pairs: (SR of queries, SR of references)."""
        sr_reference, features = self.reference_forward(reference)
        return self.query_forward(query, features), sr_reference
