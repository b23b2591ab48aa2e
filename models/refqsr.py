"""The RefQSR wrapper (paper Fig. 3): one set of SR weights, two paths.

reference path: every ResBlock at (act b_high, weight b_high).
query path: first ResBlock at b_high, the following ones at (act b_low, weight b_medium), and the
last ``n_refer`` ResBlocks replaced by RefER blocks fed with the reference path's features.

``matching`` decides where RefER's flow comes from:

* ``"paper"``: each RefER matches its own input (the query's b_low features) against the
  reference feature it warps, by eqs. (4)-(6): b_low match quantizer, dot product of pooled,
  per-pixel-normalised vectors.
* ``"shared"``: one flow per query, computed where both paths still run at b_high -- the input of
  ResBlock 1 (the output of the first block) -- by an 8-bit cosine (``matching.shared_flow``), and
  used by every RefER. Measured on the bundled paper-matching models (see docs/experiments, RefER
  matching): eq. (5) finds only 55-57 % of an identical patch even on identical features (larger
  pooled norms win the arg-max; a cosine finds 100 %), and at RefER depth a query's b_low features
  do not match the same patch's b_high features (0.1-17 % even with a cosine), so the paper's flow
  is close to random and RefER does not use its reference (with shared matching it does).
  One 8-bit cost volume per query replaces ``n_refer`` b_low ones.

``tail="highbit"`` is the paper's Table V "w/o RefER" ablation: the query path's last ``n_refer``
blocks stay ResBlocks, run at b_high, and no reference feature is used.

δ-RefQSR (CADyQ/CABM backbone, ``scheme="cadyq"``): "b_high" becomes δ. The reference path, the
query path's first ResBlock and the RefER refinement convs run at activation bits chosen per patch
and layer (selector or CABM table; weights at ``b_high``, CADyQ's 8); the other query blocks at
(b_low, b_medium) with b_medium = round((b_high + b_low) / 2) = 6 for δ-3 and δ-4: the paper
gives no b_medium for δ, and this is the fixed-precision rule with CADyQ's 8-bit weights in place
of b_high; Table II's δ-3/δ-4 BitOPs and FQRs are consistent with query weights at about 6 bits.
Each path binds δ to its own input, so references choose from reference patches and queries
from query patches.
"""

from __future__ import annotations

import torch
from torch import nn

from ..pipeline.bits import medium_bits
from .backbone import SRBackbone, Step
from .clustblock import DEFAULT_TAU, ClustBlock
from .matching import shared_flow
from .qconv import BitSpec, PerSampleBits
from .quant_cadyq import SCHEME as CADYQ
from .quant_cadyq import Delta, DynamicRefER, Selection, model_candidates
from .refer import RefER

TAILS = ("refer", "highbit")
MATCHINGS = ("paper", "shared")
MATCH_BLOCK = 1  # shared matching compares the input of this block (both paths at b_high up to it)


class _PassDone(Exception):
    """Ends a backbone pass early from inside its block step (``SRBackbone.run`` has no stop of
    its own; this keeps every architecture's ``run`` as it is)."""


class SharedMatcher(nn.Module):
    """The shared matching step as a module (no parameters), so that its calls have their own
    scope in exported graphs (``/matcher/``) and can be hooked."""

    def forward(self, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return shared_flow(query, reference)


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
        matching: str = "paper",
    ) -> None:
        super().__init__()
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {', '.join(MATCHINGS)}, got {matching!r}")
        if backbone.scheme is None:
            raise ValueError("RefQSR needs a quantized backbone (scheme 'pams', 'ddtb' or 'cadyq')")
        if not 0 < n_refer < backbone.n_blocks - 1:
            raise ValueError(f"n_refer must be in 1..{backbone.n_blocks - 2}")
        if b_low > b_high:
            raise ValueError("b_low must not exceed b_high")
        self.backbone = backbone
        self.b_high, self.b_low = b_high, b_low
        self.b_medium = medium_bits(b_high, b_low)
        self.tail = tail
        self.n_refer = n_refer
        self.matching = matching if tail == "refer" else "paper"
        self.shared = self.matching == "shared"
        self.dynamic = backbone.scheme == CADYQ  # δ-RefQSR
        n = n_refer if tail == "refer" else 0
        own = not self.shared
        if self.dynamic:
            candidates = model_candidates(backbone)
            refers = [DynamicRefER(backbone.n_feats, b_high, b_low, candidates, own_matching=own) for _ in range(n)]
        else:
            refers = [RefER(backbone.n_feats, backbone.scheme, b_high, b_low, own_matching=own) for _ in range(n)]
        self.refers = nn.ModuleList(refers)
        self.matcher = SharedMatcher() if self.shared else None
        self.clustblock = clustblock
        self.tau = tau

    def cost_sizes(self) -> dict[str, int | str]:
        """What BitOPs accounting (models.bitops.count_bitops) needs to know of this network."""
        net = self.backbone
        return {**net.sizes(), "n_refer": self.n_refer, "tail": self.tail, "matching": self.matching}

    @property
    def high(self) -> BitSpec | Delta:
        """The reference bits: (b_high, b_high), or δ with weights at b_high."""
        return Delta(self.b_high) if self.dynamic else BitSpec(self.b_high, self.b_high)

    @property
    def low(self) -> BitSpec:
        return BitSpec(self.b_low, self.b_medium)

    @property
    def first_refer(self) -> int:
        """Index of the first ResBlock that RefER replaces on the query path."""
        return self.backbone.n_blocks - self.n_refer

    def query_block_bits(self) -> list[BitSpec | Delta]:
        """Bits of the query path's ResBlocks that stay ResBlocks (block 0 high, the rest low)."""
        return [self.high] + [self.low] * (self.first_refer - 1)

    def _high_for(self, x: torch.Tensor, selection: Selection | None) -> BitSpec | PerSampleBits:
        """The high bits of one path call: b_high, or δ bound to this path's input ``x`` (into
        ``selection`` when the caller wants the record of the choices)."""
        if not self.dynamic:
            if selection is not None:
                raise ValueError("a Selection applies to δ-RefQSR (scheme 'cadyq') only")
            return self.high
        return (selection if selection is not None else self.high).bind(x, self)

    @property
    def n_reference_features(self) -> int:
        """Features a reference passes to its queries: one per RefER, plus the matching feature
        (last) with shared matching."""
        return len(self.refers) + (1 if self.shared else 0)

    def reference_forward(
        self, x: torch.Tensor, selection: Selection | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """HR output of reference patches and the features RefER needs: the input of each
        reference-path ResBlock that a RefER replaces on the query path (see refer.py), then, with
        shared matching, the input of block :data:`MATCH_BLOCK`.
        ``selection``: δ-RefQSR only, an unbound Selection that records the bits chosen."""
        hr, features = self._reference_pass(x, selection, features_only=False)
        assert hr is not None
        return hr, features

    def reference_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The features of :meth:`reference_forward` without its HR output: the pass stops at the
        input of the last ResBlock, so neither that block nor the upsampler runs (a RefER's
        reference needs no SR of its own: training RefERs alone, probes, export shapes)."""
        return self._reference_pass(x, None, features_only=True)[1]

    def _reference_pass(
        self, x: torch.Tensor, selection: Selection | None, features_only: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        net, kept, match = self.backbone, [], []
        high = self._high_for(x, selection)
        last = net.n_blocks - 1

        def step(k: int, feat: torch.Tensor) -> torch.Tensor:
            if k >= self.first_refer:
                kept.append(feat)
            if self.shared and k == MATCH_BLOCK:
                match.append(feat)
            if features_only and k == last:
                raise _PassDone  # every feature is in hand (the last one is this block's input)
            return net.blocks[k](feat, high)

        return self._run_until_done(x, step), kept + match

    def _run_until_done(self, x: torch.Tensor, step: Step) -> torch.Tensor | None:
        """The backbone's HR output, or None when ``step`` ended the pass early (:class:`_PassDone`)."""
        try:
            return self.backbone.run(x, step)
        except _PassDone:
            return None

    def query_forward(
        self,
        x: torch.Tensor,
        reference_features: list[torch.Tensor] | None,
        hard: bool | None = None,
        selection: Selection | None = None,
        refer_outputs: list[torch.Tensor] | None = None,
        skip_refers: bool = False,
    ) -> torch.Tensor:
        """HR output of query patches, given the reference features gathered per query.

        ``reference_features=None`` feeds each RefER the query's own feature at its input: the
        paper's Table V "self-reference" ablation. ``selection`` as in :meth:`reference_forward`.
        ``refer_outputs``: a list that receives each RefER's output feature (training targets).
        ``skip_refers`` (diagnostic): every RefER passes its input through, as if the blocks it
        replaces were removed -- the query path's floor, what a RefER adds is measured from it."""
        if reference_features is None:
            reference_features = [None] * self.n_reference_features
        if self.tail == "refer" and len(reference_features) != self.n_reference_features:
            raise ValueError(f"expected {self.n_reference_features} reference features, got {len(reference_features)}")
        net, high = self.backbone, self._high_for(x, selection)
        bits = [high] + self.query_block_bits()[1:]
        flow: list[torch.Tensor] = []  # shared matching: computed at MATCH_BLOCK, used by every RefER

        def step(k: int, feat: torch.Tensor) -> torch.Tensor:
            if self.shared and k == MATCH_BLOCK:
                ref_match = reference_features[-1]
                flow.append(self.matcher(feat, feat if ref_match is None else ref_match))
            if k < self.first_refer:
                return net.blocks[k](feat, bits[k])
            if self.tail == "highbit":
                return net.blocks[k](feat, high)
            if skip_refers:
                if refer_outputs is not None:
                    refer_outputs.append(feat)
                return feat
            ref_feat = reference_features[k - self.first_refer]
            refer = self.refers[k - self.first_refer]
            ref_feat = feat if ref_feat is None else ref_feat
            shared = flow[0] if flow else None
            # δ-RefQSR: RefER's refinement convs at δ too; else their default b_high
            out = refer(feat, ref_feat, hard, high if self.dynamic else None, flow=shared)
            if refer_outputs is not None:
                refer_outputs.append(out)
            return out

        return net.run(x, step)

    def high_block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of each ResBlock that a RefER replaces, with the whole network at b_high (fixed
        precision): what each RefER output would be if the patch had run at high bits."""
        if self.dynamic:
            raise ValueError("high_block_outputs is for fixed-precision RefQSR (δ has no single b_high)")
        net, outs = self.backbone, []

        def step(k: int, feat: torch.Tensor) -> torch.Tensor:
            out = net.blocks[k](feat, self.high)
            if k >= self.first_refer:
                outs.append(out)
            if k == net.n_blocks - 1:
                raise _PassDone  # the upsampler's output is not wanted
            return out

        self._run_until_done(x, step)
        return outs

    def forward(self, query: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward on (query, reference) patch pairs: (SR of queries, SR of references)."""
        sr_reference, features = self.reference_forward(reference)
        return self.query_forward(query, features), sr_reference
