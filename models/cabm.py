"""CABM (Tian et al., CVPR 2023): content-aware bit mapping, CADyQ's selectors replaced by a table.

CABM observes that the bits CADyQ's selectors pick for a patch follow the patch's edge content, so
it calibrates, once, a lookup table from an edge score to one bit width per layer and drops the
per-layer selectors at inference. Here:

* edge score: mean |Laplacian| of the gray LR patch (3x3 kernel [[0,1,0],[1,-4,1],[0,1,0]] on the
  BT.601 luma in [0, 1], reflected border as OpenCV's default), the score CABM tabulates;
* bins: ``n_bins`` intervals of the calibration scores with equal patch counts (quantile edges),
  so that every bin is backed by data; a score outside the calibrated range falls in the first or
  last bin. (CABM reads its intervals off the calibration statistics as well; the paper does not
  pin down the spacing, and equal-count bins never leave a row without evidence.)
* table row of a bin: for each CADyQ conv (in module order, ``quant_cadyq.dynamic_convs``), the
  width its selector chose most often for the calibration patches in that bin (ties: the higher
  width, the conservative choice);
* inference: a model with a ``cabm`` table binds δ to the table's row of each patch's bin (see
  ``quant_cadyq.Selection.bind``); the selectors stay in the model but are not consulted;
* fine-tuning with the table fixed: ``train qat|refqsr --scheme cabm --init-from CADYQ_MODEL``
  (training/tasks.py) builds the table from training patches and trains with it, without a bit loss.

For δ-RefQSR the table spans the backbone's and the RefER convs; it is calibrated with each patch
serving as its own reference (reference path for every block, query path for block 0 and RefER),
as the paper builds CABM-RefQSR's table from a trained CADyQ-RefQSR.

The table lives in the model config (plain numbers, so fp16 weight storage cannot shift its bin
edges) and as non-persistent buffers on the model (``model.cabm``), so it follows ``.to(device)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .quant_cadyq import WEIGHT_BITS, Selection, dynamic_convs, gray, shifted


def edge_score(x: torch.Tensor) -> torch.Tensor:
    """[N] mean |3x3 Laplacian| (4-neighbour, reflect border) of each gray patch of ``x``
    [N, 3, H, W] (RGB in [0, 1]); shifted slices, not a conv, so that it exports as plain ops."""
    with torch.autocast(x.device.type, enabled=False):
        p = F.pad(gray(x.detach().float()), (1, 1, 1, 1), mode="reflect")
        lap = (shifted(p, -1, 0) + shifted(p, 1, 0)) + (shifted(p, 0, -1) + shifted(p, 0, 1)) - 4 * shifted(p, 0, 0)
        return lap.abs().mean(dim=(1, 2, 3))


class CabmTable(nn.Module):
    """edges [B-1] (ascending) and bits [B, L]: patch with score s takes row
    ``searchsorted(edges, s)`` (bin i holds edges[i-1] < s <= edges[i])."""

    def __init__(self, edges: Sequence[float], bits: Sequence[Sequence[int]]) -> None:
        super().__init__()
        rows = [list(map(int, r)) for r in bits]
        if not rows or len(rows) != len(edges) + 1 or len({len(r) for r in rows}) != 1 or not rows[0]:
            raise ValueError(
                f"a CABM table needs len(edges) + 1 rows of equal, non-zero length (got {len(edges)} edges, "
                f"{len(rows)} rows)"
            )
        e = torch.tensor([float(v) for v in edges], dtype=torch.float64)
        if len(e) > 1 and not bool((e[1:] >= e[:-1]).all()):
            raise ValueError("CABM bin edges must be ascending")
        # not persistent: the model config carries the table (see module docstring)
        self.register_buffer("edges", e, persistent=False)
        self.register_buffer("bits", torch.tensor(rows, dtype=torch.long), persistent=False)

    @property
    def n_bins(self) -> int:
        return self.bits.shape[0]

    @property
    def n_layers(self) -> int:
        return self.bits.shape[1]

    def bins(self, x: torch.Tensor) -> torch.Tensor:
        """[N] bin index of each patch of ``x``."""
        score = edge_score(x).to(self.edges.dtype)
        # searchsorted (left) as a count, which exports to ONNX: bin i holds edges[i-1] < s <= edges[i]
        return (self.edges.unsqueeze(0) < score.unsqueeze(1)).sum(dim=1)

    def lookup(self, x: torch.Tensor, n_layers: int) -> torch.Tensor:
        """[N, L] bits per patch and CADyQ conv; ``n_layers`` is the calling model's conv count."""
        if n_layers != self.n_layers:
            raise ValueError(f"the CABM table has {self.n_layers} layers, the model {n_layers} CADyQ convs")
        onehot = (self.bins(x).unsqueeze(1) == torch.arange(self.n_bins, device=x.device)).to(torch.float64)
        return (onehot @ self.bits.to(torch.float64)).long()  # the table row of each patch, as plain ops

    def as_config(self) -> dict[str, Any]:
        return {"edges": [float(v) for v in self.edges], "bits": self.bits.tolist()}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CabmTable:
        return cls(cfg["edges"], cfg["bits"])


def attach_cabm(model: nn.Module, table: CabmTable) -> nn.Module:
    """Give ``model`` (a CADyQ SR network or δ-RefQSR) the table; its δ calls then use it."""
    n = len(dynamic_convs(model))
    if n != table.n_layers:
        raise ValueError(f"the CABM table has {table.n_layers} layers, the model {n} CADyQ convs")
    ref = next(model.parameters(), None)
    model.cabm = table.to(ref.device) if ref is not None else table
    return model


def detach_cabm(model: nn.Module) -> nn.Module:
    """Back to the selectors (e.g. to recalibrate)."""
    if getattr(model, "cabm", None) is not None:
        del model.cabm
    return model


def _mode(values: list[int]) -> int:
    counts = Counter(values)
    best = max(counts.values())
    return max(v for v, c in counts.items() if c == best)  # ties: the higher width


@torch.no_grad()
def selector_choices(
    model: nn.Module, patches: torch.Tensor, batch: int = 32, weight_bits: int = WEIGHT_BITS
) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """Run ``model``'s selectors (eval mode, no table) on ``patches`` [N, 3, h, w].

    Returns the edge scores [N] and, per patch and CADyQ conv (module order), every width the conv
    chose for it (one entry per call: δ-RefQSR's block 0 runs on both paths)."""
    from .refqsr import RefQSR  # refqsr imports quant_cadyq; cabm is imported by neither

    convs = dynamic_convs(model)
    if not convs:
        raise ValueError("CABM calibration needs a CADyQ network (scheme 'cadyq')")
    column = {id(c): col for col, c in enumerate(convs)}
    table = getattr(model, "cabm", None)
    was_training = model.training
    model.eval()
    if table is not None:
        del model.cabm  # calibrate the selectors, not an older table
    choices: list[list[list[int]]] = []
    try:
        for start in range(0, patches.shape[0], batch):
            x = patches[start : start + batch].to(convs[0].conv.weight.device)
            sels = [Selection(weight_bits)]
            if isinstance(model, RefQSR):
                # each patch is its own reference: the reference path covers every block, the
                # query path block 0 and the RefER convs
                sels.append(Selection(weight_bits))
                _, feats = model.reference_forward(x, sels[0])
                model.query_forward(x, feats, selection=sels[1])
            else:
                model(x, sels[0])
            part = [[[] for _ in convs] for _ in range(x.shape[0])]
            for sel in sels:
                for r in sel.records:
                    for i, b in enumerate(r.bits.tolist()):
                        part[i][column[id(r.conv)]].append(int(b))
            choices.extend(part)
    finally:
        if table is not None:
            model.cabm = table
        model.train(was_training)
    return edge_score(patches), choices


def build_cabm_table(model: nn.Module, patches: torch.Tensor, n_bins: int = 8, batch: int = 32) -> CabmTable:
    """Calibrate a CABM table for the CADyQ ``model`` on ``patches`` [N, 3, h, w] (LR, [0, 1])."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    if patches.shape[0] < n_bins:
        raise ValueError(f"{patches.shape[0]} calibration patches cannot fill {n_bins} bins")
    scores, choices = selector_choices(model, patches, batch)
    n_layers = len(choices[0])
    s = scores.double()
    edges = torch.quantile(s, torch.arange(1, n_bins, dtype=torch.float64) / n_bins) if n_bins > 1 else s[:0]
    bins = torch.searchsorted(edges, s).tolist()
    rows: list[list[int] | None] = []
    for b in range(n_bins):
        members = [i for i, k in enumerate(bins) if k == b]
        if not members:  # only with many tied scores: filled from a neighbour below
            rows.append(None)
            continue
        rows.append([_mode([v for i in members for v in choices[i][layer]]) for layer in range(n_layers)])
    filled: list[list[int]] = []
    for row in rows:
        if row is None:
            row = filled[-1] if filled else next(r for r in rows if r is not None)
        filled.append(row)
    return CabmTable(edges.tolist(), filled)


__all__ = ["CabmTable", "attach_cabm", "build_cabm_table", "detach_cabm", "edge_score", "selector_choices"]
