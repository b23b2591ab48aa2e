"""Whole-image, patch-wise inference with the PyTorch models: the reference the engine is tested
against. tile -> (RefQSR: ClustBlock -> references first, then queries with their reference
features) -> blend-merge."""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..engine.tiling import PatchGrid, PatchMerger, extract_patches, make_grid
from .backbone import SRBackbone
from .bitops import PatchBits, patch_bits_of_run
from .clustblock import Clustering, cluster_patches
from .qconv import FP, BitSpec, PerSampleBits
from .quant_cadyq import Selection
from .refqsr import RefQSR

Progress = Callable[[int, int], None]  # (patches just finished, patches in the image)


@dataclass
class PatchwiseResult:
    image: np.ndarray  # C x sH x sW float32, RGB in [0, 1] (not clipped)
    grid: PatchGrid
    clustering: Clustering | None
    #: seconds per stage: "cluster" (ClustBlock + clustering), "reference", "query" or "sr"
    #: (network batches), "merge" (patch extraction, feature gathering and blending)
    seconds: dict[str, float] = field(default_factory=dict)
    #: δ models (CADyQ/CABM, δ-RefQSR): the bits each patch ran at, in grid order (None otherwise)
    patch_bits: list[PatchBits] | None = None


def _batches(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


@dataclass
class QuerySchedule:
    """Reference batches, each followed by the query batches that become runnable once it has run.

    Queries are sorted by their reference's position, so after reference batch k every query whose
    reference is in batches 0..k can run; only full query batches run early (the last one takes the
    rest). Features of a reference are dropped after its last query, so at most about two batches'
    worth of reference features are alive at any time, whatever the image size."""

    steps: list[tuple[list[int], list[list[int]]]]
    readers: dict[int, int]  # reference -> queries that still need its features

    def __iter__(self):
        return iter(self.steps)


def query_schedule(clustering: Clustering, batch: int) -> QuerySchedule:
    """The streaming order of :func:`run_patchwise` for one image's reference assignment."""
    n = len(clustering.is_reference)
    refs = [i for i in range(n) if clustering.is_reference[i]]
    rank = {r: k for k, r in enumerate(refs)}
    queries = sorted(
        (i for i in range(n) if not clustering.is_reference[i]),
        key=lambda i: (rank[int(clustering.reference_of[i])], i),
    )
    refs_of = [int(clustering.reference_of[i]) for i in queries]
    ranks = [rank[r] for r in refs_of]  # ascending
    steps: list[tuple[list[int], list[list[int]]]] = []
    q = 0
    ref_batches = _batches(refs, batch)
    for b, ref_idx in enumerate(ref_batches):
        if b == len(ref_batches) - 1:
            end = len(queries)  # every reference has run: the rest, a short batch included
        else:  # only full batches of queries whose references have run go early
            ready = bisect.bisect_left(ranks, (b + 1) * batch)
            end = q + (ready - q) // batch * batch
        steps.append((ref_idx, _batches(queries[q:end], batch)))
        q = end
    return QuerySchedule(steps, dict(collections.Counter(refs_of)))


class PatchRunner(Protocol):
    """What the patch-wise algorithm needs from an engine (the PyTorch models or a compiled artifact)."""

    refqsr: bool  # RefQSR (cluster, references, queries) or one SR network for every patch
    scale: int

    def sr(self, x: np.ndarray) -> np.ndarray: ...  # patches [B,3,P,P] -> HR [B,3,sP,sP]

    def logits(self, x: np.ndarray) -> np.ndarray: ...  # ClustBlock class logits [B, C]

    def cluster(self, v: np.ndarray) -> Clustering: ...  # all logits of the image -> assignment

    def reference(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]: ...  # HR, RefER features

    def query(self, x: np.ndarray, features: list[np.ndarray]) -> np.ndarray: ...  # HR of queries

    # Runners of δ models also have ``chosen: list[list[PatchBits]] | None``: the bits of every
    # patch of every call (sr / reference / query), in call order; run_patchwise empties it first.


#: What a query's RefER blocks are fed (TorchRunner). "assigned": the features of the reference the
#: ClustBlock chose (RefQSR itself); "self": the query's own features (the paper's Table V
#: "self-reference"); "aligned": the query's own b_high reference-path features, i.e. a reference
#: that matches every query pixel exactly (what RefER could do with a perfect reference);
#: "high": no RefER, the query runs the reference path at b_high (the ceiling of the query path);
#: "skip": every RefER passes its input through (the floor: the query path without the blocks
#: RefER replaces). The last three are diagnostics (research/refer_probe.py), not ways to run a model.
REFERENCE_MODES = ("assigned", "self", "aligned", "high", "skip")


class TorchRunner:
    """:class:`PatchRunner` over the PyTorch models (the reference the compiled engine is tested against)."""

    def __init__(
        self, model: SRBackbone | RefQSR, bits: BitSpec | PerSampleBits = FP, reference: str = "assigned"
    ) -> None:
        """``reference``: what each query's RefER is fed, one of :data:`REFERENCE_MODES`.
        ``bits``: a CADyQ/CABM network's δ (``Delta``) makes every call record its choices."""
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {', '.join(REFERENCE_MODES)}, got {reference!r}")
        self.model, self.bits, self.reference_mode = model, bits, reference
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
        if self.reference_mode == "high":  # the query runs as a reference would
            out = self.model.reference_forward(xt, sel)[0]
            self._record(sel, "reference")
            return out.cpu().numpy()
        if self.reference_mode == "assigned":
            feats = [self._t(f) for f in features]
        elif self.reference_mode == "aligned":  # the query's own b_high features: a perfect match
            feats = self.model.reference_features(xt)
        else:  # "self", or "skip" (no RefER runs, the features are not read)
            feats = None
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
        """The RefQSR query call of :meth:`query`; a subclass may collect ``refer_outputs``."""
        return self.model.query_forward(
            x, features, selection=selection, refer_outputs=refer_outputs, skip_refers=self.reference_mode == "skip"
        )


def upscale_patchwise(
    model: SRBackbone | RefQSR,
    lr: np.ndarray,
    patch: int = 96,
    overlap: int = 6,
    batch: int = 16,
    bits: BitSpec = FP,
    progress: Progress | None = None,
    reference: str = "assigned",
) -> PatchwiseResult:
    """Super-resolve an LR image (3 x H x W float32 in [0, 1]) patch by patch with a PyTorch model.

    An SR network runs every patch at ``bits``; RefQSR clusters the patches with its ClustBlock, runs
    the references at b_high and the queries at b_low with RefER (``reference``: what RefER is fed,
    one of :data:`REFERENCE_MODES`)."""
    return run_patchwise(TorchRunner(model, bits, reference), lr, patch, overlap, batch, progress)


def run_patchwise(
    runner: PatchRunner,
    lr: np.ndarray,
    patch: int = 96,
    overlap: int = 6,
    batch: int = 16,
    progress: Progress | None = None,
) -> PatchwiseResult:
    """The patch-wise algorithm on any :class:`PatchRunner`: tile -> (RefQSR: cluster -> references
    first, keeping only the features some query needs -> queries with their gathered reference
    features) -> blend-merge."""
    grid = make_grid(lr.shape[1], lr.shape[2], patch, overlap)
    merger = PatchMerger(grid, runner.scale, lr.shape[0])
    done = (lambda n: progress(n, grid.num_patches)) if progress is not None else (lambda n: None)
    seconds = {"cluster": 0.0, "reference": 0.0, "query": 0.0, "sr": 0.0}
    t_start = time.perf_counter()

    def patches(idx: Sequence[int]) -> np.ndarray:
        return np.ascontiguousarray(extract_patches(lr, grid, idx), dtype=np.float32)

    def timed(stage: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        seconds[stage] += time.perf_counter() - t
        return out

    chosen = getattr(runner, "chosen", None)  # δ runners: bits per patch of each call, in call order
    if chosen is not None:
        chosen.clear()
    calls: list[Sequence[int]] = []  # the patches of each network call, in call order

    def finish(clustering: Clustering | None) -> PatchwiseResult:
        image = merger.result()
        seconds["merge"] = time.perf_counter() - t_start - sum(seconds.values())
        per_patch = None
        if chosen is not None:
            if len(chosen) != len(calls):
                raise RuntimeError(f"the runner recorded bits for {len(chosen)} of {len(calls)} calls")
            per_patch = [None] * grid.num_patches
            for idx, bits in zip(calls, chosen):
                for i, b in zip(idx, bits, strict=True):
                    per_patch[i] = b
        return PatchwiseResult(
            image, grid, clustering, {k: v for k, v in seconds.items() if v or k == "merge"}, per_patch
        )

    if not runner.refqsr:
        for idx in _batches(range(grid.num_patches), batch):
            calls.append(idx)
            merger.add(idx, timed("sr", runner.sr, patches(idx)))
            done(len(idx))
        return finish(None)

    all_idx = list(range(grid.num_patches))
    t = time.perf_counter()
    v = np.concatenate([runner.logits(patches(idx)) for idx in _batches(all_idx, batch)])
    clustering = runner.cluster(v)
    seconds["cluster"] = time.perf_counter() - t
    order = query_schedule(clustering, batch)
    kept: dict[int, list[np.ndarray]] = {}
    for ref_idx, query_batches in order:
        calls.append(ref_idx)
        sr, features = timed("reference", runner.reference, patches(ref_idx))
        merger.add(ref_idx, sr)
        for row, i in enumerate(ref_idx):
            if i in order.readers:  # keep only the features some query will read
                kept[i] = [f[row].copy() for f in features]
        done(len(ref_idx))
        for idx in query_batches:
            refs_of = [int(clustering.reference_of[i]) for i in idx]
            gathered = [np.stack([kept[r][k] for r in refs_of]) for k in range(len(kept[refs_of[0]]))]
            calls.append(idx)
            merger.add(idx, timed("query", runner.query, patches(idx), gathered))
            done(len(idx))
            for r in refs_of:  # a reference's features go once its last query has run
                order.readers[r] -= 1
                if order.readers[r] == 0:
                    del kept[r], order.readers[r]
    return finish(clustering)
