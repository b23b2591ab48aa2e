"""Query/reference training pairs by ClustBlock similarity (paper Algorithm 1, Sec. IV-A-2).

For each of the N pairs of a mini-batch: pick an image, crop a query (LR crop and the aligned HR
crop), then crop candidate references from the same image until the cosine similarity of their
ClustBlock feature vectors exceeds tau (0.5 in the paper).

Algorithm 1 loops forever on an image that never yields a match; here the search is bounded:

* ``max_tries`` candidates per query; when they are used up the slot gives up on that image and
  starts over with another image (images that failed are avoided while others remain);
* ``max_total_tries`` candidates over the whole call; when it runs out with at least one pair
  found, the missing slots repeat found pairs (``stats.duplicated``, with a warning); with no pair
  at all it raises :class:`RefQSRError`.

A feature vector of zero norm has an undefined cosine; it counts as similarity 0 (no match).

Candidates are evaluated in batches: each round, every unfinished slot draws a few candidates
(1, 2, 4, ... up to ``candidates_per_round``) and all of them go through ClustBlock in one call.
The accepted reference is the *first* candidate above tau in drawing order, so batching does not
change which pair Algorithm 1 would return for the same draws; candidates drawn after it are
computed and discarded (``stats.evaluated`` counts them, ``stats.tries`` does not).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from refqsr_engine.errors import RefQSRError
from refqsr_engine.metrics import bicubic_degrade
from refqsr_engine.models.clustblock import DEFAULT_TAU, ClustBlock

__all__ = ["ImagePairs", "PairBatch", "PairStats", "PairSampler", "cosine_similarity", "sample_pairs"]


class ImagePairs:
    """Whole-image (LR, HR) uint8 pairs for :func:`sample_pairs`, LR made once and cached.

    ``images``: a sequence of ``(lr, hr)`` pairs or of HR arrays (HxWx3 uint8; LR = MATLAB-style
    :func:`bicubic_degrade`, HR cropped to a multiple of ``scale``), or an object with
    ``pair(i) -> (lr, hr)`` and ``n_images`` (e.g. ``training.datasets.HRFolderDataset``).
    """

    def __init__(self, images: Any, scale: int = 4) -> None:
        if int(scale) != scale or scale < 1:
            raise RefQSRError(f"scale must be a positive integer, got {scale}")
        self.scale = int(scale)
        self._source = images if hasattr(images, "pair") and hasattr(images, "n_images") else None
        self._items: list[Any] = [] if self._source is not None else list(images)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self._source.n_images) if self._source is not None else len(self._items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._cache.get(i)
        if got is not None:
            return got
        if self._source is not None:
            lr, hr = self._source.pair(i)
        else:
            item = self._items[i]
            if isinstance(item, np.ndarray):
                hr = _check_image(item, f"image {i}")
                s = self.scale
                hr = np.ascontiguousarray(hr[: hr.shape[0] // s * s, : hr.shape[1] // s * s])
                lr = bicubic_degrade(hr, s)
            else:
                lr, hr = item
                lr, hr = _check_image(lr, f"LR image {i}"), _check_image(hr, f"HR image {i}")
        lr, hr = np.asarray(lr), np.asarray(hr)
        lh, lw = lr.shape[:2]
        if hr.shape[0] // self.scale != lh or hr.shape[1] // self.scale != lw:
            raise RefQSRError(f"image {i}: HR {hr.shape[1]}x{hr.shape[0]} is not x{self.scale} of LR {lw}x{lh}")
        pair = (lr, hr[: lh * self.scale, : lw * self.scale])
        self._cache[i] = pair
        return pair


def _check_image(img: Any, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise RefQSRError(f"{what}: expected an HxWx3 uint8 array, got {img.dtype} {img.shape}")
    return img


@dataclass
class PairStats:
    """What the search did. Per returned pair: ``tries`` (candidates drawn up to and including the
    accepted one, over every image the slot tried), ``images``, ``query_boxes`` / ``ref_boxes``
    (LR top, left), ``similarity`` (as computed by the sampler). Totals: ``evaluated`` candidates
    run through ClustBlock, ``queries`` cropped, ``gave_up`` images abandoned after ``max_tries``,
    ``duplicated`` slots filled by repeating a found pair."""

    tries: list[int] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    query_boxes: list[tuple[int, int]] = field(default_factory=list)
    ref_boxes: list[tuple[int, int]] = field(default_factory=list)
    similarity: list[float] = field(default_factory=list)
    evaluated: int = 0
    queries: int = 0
    gave_up: int = 0
    duplicated: int = 0
    clust_calls: int = 0

    @property
    def total_tries(self) -> int:
        return int(sum(self.tries))

    @property
    def mean_tries(self) -> float:
        return float(np.mean(self.tries)) if self.tries else float("nan")


class PairBatch(NamedTuple):
    query_lr: torch.Tensor  # N x 3 x p x p, float in [0, 1]
    query_hr: torch.Tensor  # N x 3 x (p*scale) x (p*scale)
    ref_lr: torch.Tensor
    ref_hr: torch.Tensor
    stats: PairStats


def cosine_similarity(vq: torch.Tensor, vr: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (broadcastable) feature vectors; 0 where either norm is 0."""
    vq, vr = vq.double(), vr.double()
    num = (vq * vr).sum(-1)
    den = vq.norm(dim=-1) * vr.norm(dim=-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


@dataclass
class _Slot:
    image: int = -1
    q_box: tuple[int, int] = (0, 0)
    vq: torch.Tensor | None = None
    tries_image: int = 0  # candidates drawn for the current image
    tries_total: int = 0  # over every image this slot tried
    round: int = 0  # rounds on the current image (candidate count doubles per round)


def _crop(img: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return img[top : top + size, left : left + size]


def _to_tensor(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(batch))).permute(0, 3, 1, 2).float().div_(255.0)


def sample_pairs(
    images: Any,
    clustblock: ClustBlock,
    batch: int = 16,
    lr_patch: int = 48,
    scale: int = 4,
    tau: float = DEFAULT_TAU,
    max_tries: int = 64,
    max_total_tries: int | None = None,
    candidates_per_round: int = 8,
    rng: np.random.Generator | None = None,
    quantized: bool | None = None,
) -> PairBatch:
    """Algorithm 1: ``batch`` (query, reference) pairs whose ClustBlock features have cosine > ``tau``.

    ``images``: :class:`ImagePairs` (reuse one across calls: LR is computed once) or anything it
    accepts. ``quantized``: run ClustBlock 8-bit (default: when it is calibrated, as the paper).
    ``max_total_tries`` defaults to ``4 * batch * max_tries``. Returns :class:`PairBatch`.
    """
    if batch < 1 or lr_patch < 15 or max_tries < 1 or candidates_per_round < 1:
        raise RefQSRError(
            f"need batch >= 1, lr_patch >= 15, max_tries >= 1, candidates_per_round >= 1 "
            f"(got {batch}, {lr_patch}, {max_tries}, {candidates_per_round})"
        )
    src = images if isinstance(images, ImagePairs) and images.scale == scale else ImagePairs(images, scale)
    if len(src) == 0:
        raise RefQSRError("no images to sample pairs from")
    eligible = [i for i in range(len(src)) if min(src[i][0].shape[:2]) >= lr_patch]
    if not eligible:
        raise RefQSRError(f"no image has an LR side of at least {lr_patch} px (LR = HR / {scale})")
    rng = np.random.default_rng() if rng is None else rng
    budget = 4 * batch * max_tries if max_total_tries is None else int(max_total_tries)
    device = next(clustblock.parameters()).device
    was_training = clustblock.training
    clustblock.eval()
    stats = PairStats()
    failed: set[int] = set()
    slots = [_Slot() for _ in range(batch)]
    done: list[tuple[_Slot, tuple[int, int], float] | None] = [None] * batch

    def features(crops: list[np.ndarray]) -> torch.Tensor:
        stats.clust_calls += 1
        with torch.no_grad():
            return clustblock(_to_tensor(crops).to(device), quantized=quantized).float().cpu()

    def random_box(img: int) -> tuple[int, int]:
        h, w = src[img][0].shape[:2]
        return int(rng.integers(0, h - lr_patch + 1)), int(rng.integers(0, w - lr_patch + 1))

    try:
        while stats.evaluated < budget:
            pending = [k for k in range(batch) if done[k] is None]
            if not pending:
                break
            # new queries (one ClustBlock call for every slot that needs one)
            fresh = [k for k in pending if slots[k].vq is None]
            if fresh:
                crops = []
                for k in fresh:
                    pool = [i for i in eligible if i not in failed] or eligible
                    s = slots[k]
                    s.image = int(pool[int(rng.integers(0, len(pool)))])
                    s.q_box = random_box(s.image)
                    s.tries_image, s.round = 0, 0
                    crops.append(_crop(src[s.image][0], *s.q_box, lr_patch))
                stats.queries += len(fresh)
                for k, v in zip(fresh, features(crops)):
                    slots[k].vq = v
            # candidates: 1, 2, 4, ... per slot, all slots in one call
            owners, boxes, crops = [], [], []
            left = budget - stats.evaluated
            for k in pending:
                s = slots[k]
                n = min(2**s.round, candidates_per_round, max_tries - s.tries_image, left)
                if n <= 0:
                    continue
                left -= n
                for _ in range(n):
                    box = random_box(s.image)
                    owners.append(k)
                    boxes.append(box)
                    crops.append(_crop(src[s.image][0], *box, lr_patch))
            if not crops:
                break
            sims = cosine_similarity(torch.stack([slots[k].vq for k in owners]), features(crops))
            stats.evaluated += len(crops)
            for k in pending:
                s = slots[k]
                mine = [j for j, o in enumerate(owners) if o == k]
                if not mine:
                    continue
                hit = next((j for j in mine if float(sims[j]) > tau), None)
                if hit is not None:
                    drawn = mine.index(hit) + 1
                    s.tries_image += drawn
                    s.tries_total += drawn
                    done[k] = (s, boxes[hit], float(sims[hit]))
                    continue
                s.tries_image += len(mine)
                s.tries_total += len(mine)
                s.round += 1
                if s.tries_image >= max_tries:  # give up on this image; a new one next round
                    failed.add(s.image)
                    stats.gave_up += 1
                    s.vq = None
    finally:
        clustblock.train(was_training)

    found = [k for k in range(batch) if done[k] is not None]
    if not found:
        raise RefQSRError(
            f"no query/reference pair with ClustBlock cosine similarity > {tau} after {stats.evaluated} "
            f"candidates ({stats.gave_up} image attempts gave up after {max_tries} tries each); "
            f"lower tau or check the images"
        )
    if len(found) < batch:
        stats.duplicated = batch - len(found)
        warnings.warn(
            f"Algorithm-1 budget ({budget} candidates) ran out with {len(found)}/{batch} pairs; "
            f"repeating found pairs for the rest",
            RuntimeWarning,
            stacklevel=2,
        )
        for k in range(batch):
            if done[k] is None:
                done[k] = done[found[int(rng.integers(0, len(found)))]]

    q_lr, q_hr, r_lr, r_hr = [], [], [], []
    hp = lr_patch * scale
    for s, r_box, sim in done:
        lr, hr = src[s.image]
        (qt, ql), (rt, rl) = s.q_box, r_box
        q_lr.append(_crop(lr, qt, ql, lr_patch))
        q_hr.append(_crop(hr, qt * scale, ql * scale, hp))
        r_lr.append(_crop(lr, rt, rl, lr_patch))
        r_hr.append(_crop(hr, rt * scale, rl * scale, hp))
        stats.tries.append(s.tries_total)
        stats.images.append(s.image)
        stats.query_boxes.append(s.q_box)
        stats.ref_boxes.append(r_box)
        stats.similarity.append(sim)
    return PairBatch(_to_tensor(q_lr), _to_tensor(q_hr), _to_tensor(r_lr), _to_tensor(r_hr), stats)


class PairSampler:
    """Repeated :func:`sample_pairs` over one image set (LR cached), with running statistics."""

    def __init__(
        self, images: Any, clustblock: ClustBlock, scale: int = 4, seed: int | None = None, **kwargs: Any
    ) -> None:
        self.images = images if isinstance(images, ImagePairs) else ImagePairs(images, scale)
        self.clustblock = clustblock
        self.scale = scale
        self.kwargs = kwargs
        self.rng = np.random.default_rng(seed)
        self.batches = 0
        self.pairs = 0
        self.tries = 0
        self.evaluated = 0

    def __call__(self) -> PairBatch:
        out = sample_pairs(self.images, self.clustblock, scale=self.scale, rng=self.rng, **self.kwargs)
        self.batches += 1
        self.pairs += len(out.stats.tries)
        self.tries += out.stats.total_tries
        self.evaluated += out.stats.evaluated
        return out

    @property
    def mean_tries(self) -> float:
        return self.tries / self.pairs if self.pairs else float("nan")
