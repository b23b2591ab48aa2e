"""What a RefQSR query's RefER blocks are fed, for evaluation and research (not a way to run a model).

``assigned``: the features of the reference the ClustBlock chose (RefQSR itself, as
``models.patchwise.TorchRunner`` runs it); ``self``: the query's own features (the paper's Table V
"self-reference"); ``aligned``: the query's own b_high reference-path features, i.e. a reference
that matches every query pixel exactly (what RefER could do with a perfect reference); ``high``: no
RefER, the query runs the reference path at b_high (the ceiling of the query path); ``skip``: every
RefER passes its input through (the floor: the query path without the blocks RefER replaces).
"""

from __future__ import annotations

import numpy as np
import torch
from refqsr_engine.models.patchwise import TorchRunner
from refqsr_engine.models.qconv import FP, BitSpec, PerSampleBits
from refqsr_engine.models.quant_cadyq import Selection
from refqsr_engine.models.refqsr import RefQSR

REFERENCE_MODES = ("assigned", "self", "aligned", "high", "skip")


class ReferenceModeRunner(TorchRunner):
    """:class:`~refqsr_engine.models.patchwise.TorchRunner` whose queries feed RefER one of
    :data:`REFERENCE_MODES`."""

    def __init__(self, model: RefQSR, bits: BitSpec | PerSampleBits = FP, reference: str = "assigned") -> None:
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCE_MODES)}, got {reference!r}")
        super().__init__(model, bits)
        self.reference_mode = reference

    @torch.no_grad()
    def query(self, x: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
        mode = self.reference_mode
        if mode == "assigned":
            return super().query(x, features)
        xt, sel = self._t(x), self._selection()
        if mode == "high":  # the query runs as a reference would
            out = self.model.reference_forward(xt, sel)[0]
            self._record(sel, "reference")
            return out.cpu().numpy()
        # "aligned": the query's own b_high features, a perfect match; "self"/"skip": none (self:
        # RefER reads the query's own features; skip: no RefER runs)
        feats = self.model.reference_features(xt) if mode == "aligned" else None
        out = self._query_forward(xt, feats, sel).cpu().numpy()
        self._record(sel, "query")
        return out

    def _query_forward(
        self,
        x: torch.Tensor,
        features: list[torch.Tensor] | None,
        selection: Selection | None,
        refer_outputs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.model.query_forward(
            x, features, selection=selection, refer_outputs=refer_outputs, skip_refers=self.reference_mode == "skip"
        )
