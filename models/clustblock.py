"""ClustBlock (paper Sec. III-C-2, Table I, eqs. (2)-(3)): an 8-bit texture feature extractor and
the clustering of patches into references and queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..pipeline.clustering import DEFAULT_TAU  # noqa: F401 - re-exported
from ..pipeline.clustering import assign_references as pipeline_assign
from .qconv import FP, BitSpec, QuantConv2d

CLUST_BITS = BitSpec.uniform(8)


class ClustBlock(nn.Module):
    """Table I: QConv 3x3 3->64 stride 3, QConv 3x3 64->64, QConv 3x3 64->32 (ReLU each, no padding),
    global average pooling, QFC 32->C. The FC is a 1x1 conv on the pooled vector so that every layer
    is the same quantized conv. All layers 8-bit min/max (calibrated after training)."""

    def __init__(self, num_classes: int = 47) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.convs = nn.ModuleList(
            [
                QuantConv2d(3, 64, 3, "minmax", (8,), stride=3, padding=0),
                QuantConv2d(64, 64, 3, "minmax", (8,), padding=0),
                QuantConv2d(64, 32, 3, "minmax", (8,), padding=0),
            ]
        )
        self.fc = QuantConv2d(32, num_classes, 1, "minmax", (8,), padding=0)
        self.register_buffer("calibrated", torch.tensor(False))

    def forward(self, patches: torch.Tensor, quantized: bool | None = None) -> torch.Tensor:
        """Class logits V (N x C) of LR patches in [0, 1]. Quantized once calibrated, unless told."""
        quantized = bool(self.calibrated) if quantized is None else quantized
        return self._run(patches, CLUST_BITS if quantized else FP, observe=False)

    @torch.no_grad()
    def calibrate(self, batches: list[torch.Tensor] | torch.Tensor) -> None:
        """Set every 8-bit activation range to the min/max seen over ``batches`` (full-precision pass)."""
        for batch in [batches] if isinstance(batches, torch.Tensor) else batches:
            self._run(batch, FP, observe=True)
        self.calibrated.fill_(True)

    def _run(self, x: torch.Tensor, bits: BitSpec, observe: bool) -> torch.Tensor:
        if x.shape[-1] < 15 or x.shape[-2] < 15:
            raise ValueError("ClustBlock needs patches of at least 15x15 pixels")
        h = x
        for conv in self.convs:
            if observe:
                conv.act_quant["8"].observe(h)
            h = F.relu(conv(h, bits))
        h = h.mean(dim=(2, 3), keepdim=True)
        if observe:
            self.fc.act_quant["8"].observe(h)
        return self.fc(h, bits).flatten(1)


@dataclass(frozen=True)
class Clustering:
    """Result of clustering N patches.

    ``reference_of[i]``: the patch whose features patch i uses (i itself for references).
    ``is_reference[i]``: True for patches run at b_high (cluster references and isolated ones).
    ``similarity[i]``: cosine similarity between V_i and V of its argmax reference.
    """

    reference_of: torch.Tensor
    is_reference: torch.Tensor
    similarity: torch.Tensor
    argmax: torch.Tensor  # the raw row arg-max of M (before isolated references are split off)

    @property
    def num_references(self) -> int:
        return int(self.is_reference.sum())

    @property
    def num_queries(self) -> int:
        return int((~self.is_reference).sum())

    @property
    def num_isolated(self) -> int:
        """References that no patch chose (their similarity fell below tau): run alone at b_high."""
        targeted = torch.zeros_like(self.is_reference)
        targeted[self.argmax] = True
        return int((self.is_reference & ~targeted).sum())


def affinity(v: torch.Tensor) -> torch.Tensor:
    """M = softmax_rows(V) . softmax_rows(V^T)   (eqs. (2), (3)); M[i, j] = sum_c A[i, c] A'[c, j]."""
    a = torch.softmax(v, dim=1)
    a_t = torch.softmax(v.t(), dim=1)
    return a @ a_t


def cluster_patches(v: torch.Tensor, tau: float = DEFAULT_TAU) -> Clustering:
    """Reference of patch i = argmax_j M[i, j]; every patch some row points at is a reference;
    a query whose cosine similarity to its reference is below ``tau`` becomes an isolated reference."""
    v = v.detach().float()
    argmax = affinity(v).argmax(dim=1)
    return assign_references(argmax, F.cosine_similarity(v, v[argmax], dim=1), tau)


def assign_references(argmax: torch.Tensor, similarity: torch.Tensor, tau: float = DEFAULT_TAU) -> Clustering:
    """The O(N) bookkeeping after the arg-max (:func:`refqsr_engine.pipeline.clustering.assign_references`,
    shared with the compiled engine), as tensors."""
    a = torch.as_tensor(argmax).detach().cpu().numpy()
    s = torch.as_tensor(similarity).detach().float().cpu().numpy()
    c = pipeline_assign(a, s, tau)
    return Clustering(
        torch.from_numpy(c.reference_of),
        torch.from_numpy(c.is_reference),
        torch.from_numpy(c.similarity),
        torch.from_numpy(c.argmax),
    )
