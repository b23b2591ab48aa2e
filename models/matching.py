"""RefER's matching and warping steps (paper eqs. (4)-(7)) as plain functions.

These are the PyTorch definitions the compiled kernels are tested against. Coordinates are in
feature pixels, flows are (dx, dy) displacements from a query pixel to where it reads the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pipeline.bits import COSINE_BITS, POOL, pooled_size  # noqa: F401 - re-exported

SOFTMAX_TEMPERATURE = 1000.0
# Shared matching (RefQSR(matching="shared")): unit cell vectors on a fixed symmetric 8-bit grid.
# Components of a unit vector lie in [-1, 1], so the grid needs no learned range; integer costs
# are at most C * 127^2 (< 2^24 for C <= 1040), exact in float32 in any summation order.
COSINE_GRID = 2 ** (COSINE_BITS - 1) - 1
ROWS_PER_CHUNK = 4096  # bounds the [rows x positions] slab of the hard-argmax cost volume


def normalize_and_pool(feat: torch.Tensor, pool: int = POOL) -> torch.Tensor:
    """phi(F / ||F||): per-pixel L2 normalisation over channels, then adaptive average pooling to
    ceil(H/pool) x ceil(W/pool) (3x3 windows with stride 3 when H, W are multiples of 3)."""
    unit = F.normalize(feat, p=2, dim=1, eps=1e-12)
    h, w = feat.shape[-2:]
    if h % pool == 0 and w % pool == 0:  # the same windows; plain pooling exports to ONNX cleanly
        return F.avg_pool2d(unit, pool)
    return F.adaptive_avg_pool2d(unit, (pooled_size(h, pool), pooled_size(w, pool)))


def cosine_cells(feat: torch.Tensor, pool: int = POOL) -> torch.Tensor:
    """Integer grid values of the shared matching's cell vectors: :func:`normalize_and_pool`, each
    pooled cell normalised again to unit length (so the dot product of two cells is their cosine,
    and cells with a larger pooled norm do not win every arg-max), then round(clamp(127 u, -127,
    127)) (the clamp only guards rounding). Float values that are integers; no gradient (the flow
    is hard). The compiled twin is ``kernels.refer_kernels`` stage ``shared_flow``."""
    with torch.no_grad(), torch.autocast(feat.device.type, enabled=False):
        feat = feat if feat.dtype == torch.float32 else feat.float()  # (no Cast node in exported graphs)
        unit = F.normalize(normalize_and_pool(feat, pool), p=2, dim=1, eps=1e-12)
        return torch.round(torch.clamp(unit * float(COSINE_GRID), -COSINE_GRID, COSINE_GRID))


def shared_flow(query: torch.Tensor, reference: torch.Tensor, pool: int = POOL) -> torch.Tensor:
    """Full-resolution displacement [N, 2, H, W] from each query pixel into the reference: the
    first arg-max of the 8-bit cosine between :func:`cosine_cells` (see RefQSR's ``matching``)."""
    size = (query.shape[-2], query.shape[-1])
    with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
        flow = pooled_flow(cosine_cells(query, pool), cosine_cells(reference, pool), size, hard=True)
        return upsample_flow(flow, size)


def cell_centers(size: int, cells: int) -> torch.Tensor:
    """Centre (in input pixels) of each adaptive-average-pooling cell along one axis."""
    k = torch.arange(cells, dtype=torch.float64)
    start = torch.floor(k * size / cells)
    end = torch.ceil((k + 1) * size / cells)
    return ((start + end - 1) / 2).float()


def cell_grid(height: int, width: int, cells_h: int, cells_w: int) -> torch.Tensor:
    """[cells_h*cells_w, 2] (x, y) centres of the pooled positions, row-major."""
    cy = cell_centers(height, cells_h)
    cx = cell_centers(width, cells_w)
    yy, xx = torch.meshgrid(cy, cx, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)


def cost_volume(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """E(i, j) = Fq(i)^T Fr(j) over all position pairs: [N, hq*wq, hr*wr]  (eq. (5))."""
    q = query.flatten(2).transpose(1, 2)
    r = reference.flatten(2)
    return torch.bmm(q, r)


def argmax_positions(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For every query position, the index of the reference position with the highest cost
    (first index on ties). Computed in row chunks so large patches do not hold the whole volume."""
    q = query.flatten(2).transpose(1, 2)
    r = reference.flatten(2)
    out = [torch.bmm(q[:, s : s + ROWS_PER_CHUNK], r).argmax(dim=2) for s in range(0, q.shape[1], ROWS_PER_CHUNK)]
    return torch.cat(out, dim=1)


def pooled_flow(
    query: torch.Tensor,
    reference: torch.Tensor,
    full_size: tuple[int, int],
    hard: bool,
    temperature: float = SOFTMAX_TEMPERATURE,
) -> torch.Tensor:
    """Displacement [N, 2, h, w] (in full-resolution pixels) from each pooled query cell to its
    match in the reference: argmax at inference, soft-argmax with ``temperature`` in training (eq. (6), (7))."""
    n, _, h, w = query.shape
    grid = cell_grid(full_size[0], full_size[1], h, w).to(query.device)  # [h*w, 2]
    if hard:
        target = grid[argmax_positions(query, reference)]  # [N, h*w, 2]
    else:
        weights = torch.softmax(temperature * cost_volume(query, reference), dim=2)
        target = weights @ grid
    disp = target - grid.unsqueeze(0)
    return disp.transpose(1, 2).reshape(n, 2, h, w)


def upsample_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a displacement field to full size (values are already in full pixels)."""
    return F.interpolate(flow, size=size, mode="bilinear", align_corners=False)


def backward_warp(feat: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """out(p) = feat sampled bilinearly at p + flow(p), coordinates clamped to the border.

    Written out (floor, four taps, weights) rather than via grid_sample: this is the exact formula
    the compiled warp kernel implements; grid_sample(align_corners=True, padding_mode='border') is
    its independent twin in the tests."""
    n, c, h, w = feat.shape
    ys = torch.arange(h, dtype=feat.dtype, device=feat.device).view(1, h, 1)
    xs = torch.arange(w, dtype=feat.dtype, device=feat.device).view(1, 1, w)
    x = (xs + flow[:, 0]).clamp(0, w - 1)
    y = (ys + flow[:, 1]).clamp(0, h - 1)
    x0 = x.floor().clamp(max=max(w - 2, 0))
    y0 = y.floor().clamp(max=max(h - 2, 0))
    wx = (x - x0).unsqueeze(1)
    wy = (y - y0).unsqueeze(1)
    x0i, y0i = x0.long(), y0.long()
    x1i = (x0i + 1).clamp(max=w - 1)
    y1i = (y0i + 1).clamp(max=h - 1)
    flat = feat.flatten(2)

    def tap(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        index = (yi * w + xi).flatten(1).unsqueeze(1).expand(n, c, -1)
        return flat.gather(2, index).view(n, c, h, w)

    top = tap(y0i, x0i) * (1 - wx) + tap(y0i, x1i) * wx
    bottom = tap(y1i, x0i) * (1 - wx) + tap(y1i, x1i) * wx
    return top * (1 - wy) + bottom * wy
