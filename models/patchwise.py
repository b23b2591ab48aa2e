"""Whole-image, patch-wise inference with the PyTorch models: the reference the engine is tested
against. tile -> (RefQSR: ClustBlock -> references first, then queries with their reference
features) -> blend-merge."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..engine.tiling import PatchGrid, PatchMerger, extract_patches, make_grid
from .clustblock import Clustering, cluster_patches
from .qconv import FP, BitSpec
from .refqsr import RefQSR
from .srresnet import SRResNet

Progress = Callable[[int, int], None]  # (patches just finished, patches in the image)


@dataclass
class PatchwiseResult:
    image: np.ndarray  # C x sH x sW float32, RGB in [0, 1] (not clipped)
    grid: PatchGrid
    clustering: Clustering | None


def _batches(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


@torch.no_grad()
def upscale_patchwise(
    model: SRResNet | RefQSR,
    lr: np.ndarray,
    patch: int = 96,
    overlap: int = 6,
    batch: int = 16,
    bits: BitSpec = FP,
    progress: Progress | None = None,
) -> PatchwiseResult:
    """Super-resolve an LR image (3 x H x W float32 in [0, 1]) patch by patch.

    SRResNet runs every patch at ``bits``; RefQSR clusters the patches with its ClustBlock, runs
    the references at b_high and the queries at b_low with RefER."""
    grid = make_grid(lr.shape[1], lr.shape[2], patch, overlap)
    backbone = model.backbone if isinstance(model, RefQSR) else model
    merger = PatchMerger(grid, backbone.scale, lr.shape[0])
    done = (lambda n: progress(n, grid.num_patches)) if progress is not None else (lambda n: None)

    device = next(model.parameters()).device

    def patches(idx: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(extract_patches(lr, grid, idx))).to(device)

    if not isinstance(model, RefQSR):
        for idx in _batches(range(grid.num_patches), batch):
            merger.add(idx, model(patches(idx), bits).cpu().numpy())
            done(len(idx))
        return PatchwiseResult(merger.result(), grid, None)

    if model.clustblock is None:
        raise ValueError("this RefQSR model has no ClustBlock to assign references")
    all_idx = list(range(grid.num_patches))
    v = torch.cat([model.clustblock(patches(idx)).cpu() for idx in _batches(all_idx, batch)])
    clustering = cluster_patches(v, model.tau)
    refs = [i for i in all_idx if clustering.is_reference[i]]
    queries = [i for i in all_idx if not clustering.is_reference[i]]
    needed = {int(clustering.reference_of[i]) for i in queries}
    kept: dict[int, list[torch.Tensor]] = {}
    for idx in _batches(refs, batch):
        sr, features = model.reference_forward(patches(idx))
        merger.add(idx, sr.cpu().numpy())
        for row, i in enumerate(idx):
            if i in needed:  # keep only the features some query will read
                kept[i] = [f[row] for f in features]
        done(len(idx))
    for idx in _batches(queries, batch):
        gathered = [torch.stack([kept[int(clustering.reference_of[i])][k] for i in idx]) for k in range(len(model.refers))]
        merger.add(idx, model.query_forward(patches(idx), gathered).cpu().numpy())
        done(len(idx))
    return PatchwiseResult(merger.result(), grid, clustering)
