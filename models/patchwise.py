"""The PyTorch models as a :class:`~refqsr_engine.pipeline.patchwise.PatchRunner`: the reference
the compiled engine is tested against, run through the same patch-wise algorithm."""

from __future__ import annotations

import numpy as np
import torch

from ..pipeline.patchwise import PatchwiseResult, Progress, run_patchwise
from .backbone import SRBackbone
from .bitops import PatchBits, patch_bits_of_run
from .clustblock import Clustering, cluster_patches
from .qconv import FP, BitSpec, PerSampleBits
from .quant_cadyq import Selection
from .refqsr import RefQSR


class TorchRunner:
    """:class:`PatchRunner` over the PyTorch models (the reference the compiled engine is tested against)."""

    def __init__(self, model: SRBackbone | RefQSR, bits: BitSpec | PerSampleBits = FP) -> None:
        """``bits``: a CADyQ/CABM network's δ (``Delta``) makes every call record its choices."""
        self.model, self.bits = model, bits
        self.refqsr = isinstance(model, RefQSR)
        self.scale = (model.backbone if self.refqsr else model).scale
        self.device = next(model.parameters()).device
        if self.refqsr and model.clustblock is None:
            raise ValueError("this RefQSR model has no ClustBlock to assign references")
        dynamic = model.dynamic if self.refqsr else isinstance(bits, PerSampleBits)
        self.chosen: list[list[PatchBits]] | None = [] if dynamic else None

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def _selection(self) -> Selection | None:
        """A fresh record of δ choices for one call (None for fixed bits)."""
        if self.chosen is None:
            return None
        return Selection(self.model.high.weight if self.refqsr else self.bits.weight)

    def _record(self, selection: Selection | None, path: str) -> None:
        if selection is not None:
            self.chosen.append(patch_bits_of_run(self.model, selection, path))

    @torch.no_grad()
    def sr(self, x: np.ndarray) -> np.ndarray:
        sel = self._selection()
        out = self.model(self._t(x), sel if sel is not None else self.bits).cpu().numpy()
        self._record(sel, "sr")
        return out

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.model.clustblock(self._t(x)).cpu().numpy()

    def cluster(self, v: np.ndarray) -> Clustering:
        return cluster_patches(torch.from_numpy(v), self.model.tau)

    @torch.no_grad()
    def reference(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        sel = self._selection()
        hr, feats = self.model.reference_forward(self._t(x), sel)
        self._record(sel, "reference")
        return hr.cpu().numpy(), [f.cpu().numpy() for f in feats]

    @torch.no_grad()
    def query(self, x: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
        xt, sel = self._t(x), self._selection()
        out = self._query_forward(xt, [self._t(f) for f in features], sel).cpu().numpy()
        self._record(sel, "query")
        return out

    def _query_forward(
        self,
        x: torch.Tensor,
        features: list[torch.Tensor] | None,
        selection: Selection | None,
        refer_outputs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The RefQSR query call of :meth:`query`; a subclass may feed RefER otherwise or collect
        ``refer_outputs``."""
        return self.model.query_forward(x, features, selection=selection, refer_outputs=refer_outputs)


def upscale_patchwise(
    model: SRBackbone | RefQSR,
    lr: np.ndarray,
    patch: int = 96,
    overlap: int = 6,
    batch: int = 16,
    bits: BitSpec = FP,
    progress: Progress | None = None,
) -> PatchwiseResult:
    """Super-resolve an LR image (3 x H x W float32 in [0, 1]) patch by patch with a PyTorch model.

    An SR network runs every patch at ``bits``; RefQSR clusters the patches with its ClustBlock, runs
    the references at b_high and the queries at b_low with RefER."""
    return run_patchwise(TorchRunner(model, bits), lr, patch, overlap, batch, progress)
