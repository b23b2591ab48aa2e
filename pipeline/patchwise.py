"""The patch-wise algorithm every engine runs: tile -> (RefQSR: cluster -> references first, then
queries with their reference features) -> blend-merge. An engine plugs in as a
:class:`PatchRunner`: the compiled artifact (``engine.runtime``) or the PyTorch models
(``models.patchwise.TorchRunner``), so both are tested on the same algorithm."""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .clustering import Clustering
from .tiling import PatchGrid, PatchMerger, extract_patches, make_grid

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
    patch_bits: list[Any] | None = None


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


def keep_rows(features: list[np.ndarray], row: int) -> list[np.ndarray]:
    """A copy of patch ``row``'s features (the default of ``PatchRunner.keep_features``)."""
    return [f[row].copy() for f in features]


def gather_rows(kept: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per feature, the kept rows stacked into a batch (the default of ``PatchRunner.gather_features``)."""
    return [np.stack([rows[k] for rows in kept]) for k in range(len(kept[0]))]


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
    # A runner may also have ``keep_features(features, row)`` and ``gather_features(kept)``, which
    # default to keep_rows / gather_rows: a runner that keeps its features elsewhere (on a GPU)
    # hands out its own handles there.


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
    keep = getattr(runner, "keep_features", keep_rows)
    gather = getattr(runner, "gather_features", gather_rows)
    kept: dict[int, Any] = {}
    for ref_idx, query_batches in order:
        calls.append(ref_idx)
        sr, features = timed("reference", runner.reference, patches(ref_idx))
        merger.add(ref_idx, sr)
        for row, i in enumerate(ref_idx):
            if i in order.readers:  # keep only the features some query will read
                kept[i] = keep(features, row)
        done(len(ref_idx))
        for idx in query_batches:
            refs_of = [int(clustering.reference_of[i]) for i in idx]
            gathered = gather([kept[r] for r in refs_of])
            calls.append(idx)
            merger.add(idx, timed("query", runner.query, patches(idx), gathered))
            done(len(idx))
            for r in refs_of:  # a reference's features go once its last query has run
                order.readers[r] -= 1
                if order.readers[r] == 0:
                    del kept[r], order.readers[r]
    return finish(clustering)
