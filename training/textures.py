"""Procedural texture classification data: an offline stand-in for DTD (paper Sec. III-C-2).

ClustBlock's feature extractor is pre-trained as a texture classifier (the paper uses the 47 DTD
classes). DTD is not available offline, so this module renders textures procedurally: each
*family* (:data:`TEXTURE_FAMILIES`) is a vectorised numpy generator whose parameters -- scale,
orientation, phase, colours, contrast, noise, blur -- are drawn per sample.

Classes map onto families: class ``c`` of ``num_classes`` uses family ``c % F`` (``F`` families).
When ``num_classes > F`` a family backs several classes, and each gets its own *scale band*: the
family's log-period range is cut into as many equal bands as the family has classes, class
``c`` taking band ``c // F`` (so with 47 classes and 34 families, ``stripes`` is split into a
fine and a coarse class). Every sample is a pure function of ``(seed, index)``; the same index
rendered at another size keeps its parameters (only the canvas changes).

Rendering is numpy only: a 96x96 sample takes about a millisecond.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from refqsr_engine.errors import RefQSRError
from refqsr_engine.training.labelled import LabelledImageSet

Field = np.ndarray  # HxW (grey field in [0, 1], colourised later) or HxWx3 (RGB in [0, 1])
Generator = Callable[[np.random.Generator, int, float], Field]

TAU = 2.0 * math.pi
SQ3 = math.sqrt(3.0)

# --------------------------------------------------------------------------- helpers


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


def _frame(rng: np.random.Generator, size: int, rotate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by a random angle and shifted by a random phase: (u, v)."""
    y, x = _grid(size)
    th = rng.uniform(0.0, TAU) if rotate else 0.0
    c, s = math.cos(th), math.sin(th)
    ou, ov = rng.uniform(0.0, 512.0, size=2)
    return c * x + s * y + ou, -s * x + c * y + ov


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def _soft(d: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Anti-aliased step: 1 where the signed distance ``d`` (pixels) is positive."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def _hash(i: np.ndarray, j: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) value per integer lattice cell (vectorised integer hash)."""
    with np.errstate(over="ignore"):
        h = i.astype(np.int64).astype(np.uint32) * np.uint32(0x27D4EB2D)
        h = h ^ (j.astype(np.int64).astype(np.uint32) * np.uint32(0x165667B1))
        h = h + np.uint32(salt & 0xFFFFFFFF)
        h = h ^ (h >> np.uint32(15))
        h = h * np.uint32(0x2C1B3C6D)
        h = h ^ (h >> np.uint32(12))
        h = h * np.uint32(0x297A2D39)
        h = h ^ (h >> np.uint32(15))
    return h.astype(np.float64) * (1.0 / 4294967296.0)


def _salt(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**32))


def _value_noise(u: np.ndarray, v: np.ndarray, period: float, salt: int) -> np.ndarray:
    """Smooth lattice value noise in [0, 1] with feature size ``period`` pixels."""
    x, y = u / period, v / period
    i, j = np.floor(x), np.floor(y)
    fx, fy = x - i, y - j
    sx, sy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a, b = _hash(i, j, salt), _hash(i + 1, j, salt)
    c, d = _hash(i, j + 1, salt), _hash(i + 1, j + 1, salt)
    return (a + (b - a) * sx) * (1 - sy) + (c + (d - c) * sx) * sy


def _fbm(u: np.ndarray, v: np.ndarray, period: float, salt: int, octaves: int = 4, gain: float = 0.5) -> np.ndarray:
    out, amp, total = np.zeros_like(u), 1.0, 0.0
    for o in range(octaves):
        p = period / (2**o)
        if p < 0.75:
            break
        out += amp * _value_noise(u, v, p, salt + 7919 * o)
        total += amp
        amp *= gain
    return out / total


def _stretch(t: np.ndarray) -> np.ndarray:
    """Robust per-image contrast stretch to [0, 1] (1st/99th percentiles)."""
    lo, hi = np.percentile(t, (1.0, 99.0))
    if hi - lo < 1e-9:
        return np.full_like(t, 0.5)
    return np.clip((t - lo) / (hi - lo), 0.0, 1.0)


def _worley(u: np.ndarray, v: np.ndarray, period: float, salt: int, jitter: float = 0.9):
    """Cellular (Worley) noise on a jittered lattice: (F1, F2) distances in pixels and F1's cell id.

    The feature point of every lattice cell touching the patch is hashed once into a small table,
    then gathered for the 3x3 neighbourhood of each pixel's cell.
    """
    x, y = u / period, v / period
    ci, cj = np.floor(x), np.floor(y)
    i0, j0 = int(ci.min()) - 1, int(cj.min()) - 1
    ti, tj = np.meshgrid(
        np.arange(i0, int(ci.max()) + 2, dtype=np.float64),
        np.arange(j0, int(cj.max()) + 2, dtype=np.float64),
        indexing="ij",
    )
    tab_x = ti + 0.5 + jitter * (_hash(ti, tj, salt) - 0.5)
    tab_y = tj + 0.5 + jitter * (_hash(ti, tj, salt + 1) - 0.5)
    tab_id = _hash(ti, tj, salt + 2)
    ncol = ti.shape[1]
    base = (ci - i0).astype(np.intp) * ncol + (cj - j0).astype(np.intp)
    tab_x, tab_y, tab_id = tab_x.ravel(), tab_y.ravel(), tab_id.ravel()
    f1 = np.full(u.shape, np.inf)
    f2 = np.full(u.shape, np.inf)
    id1 = np.zeros(u.shape)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            k = base + (di * ncol + dj)
            d = (x - tab_x.take(k)) ** 2 + (y - tab_y.take(k)) ** 2
            closer = d < f1
            f2 = np.minimum(f2, np.maximum(f1, d))
            id1 = np.where(closer, tab_id.take(k), id1)
            f1 = np.minimum(f1, d)
    return np.sqrt(f1) * period, np.sqrt(f2) * period, id1


def _colour_pair(rng: np.random.Generator, min_dist: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    c0 = rng.uniform(0.0, 1.0, 3)
    for _ in range(16):
        c1 = rng.uniform(0.0, 1.0, 3)
        if np.linalg.norm(c1 - c0) >= min_dist:
            break
    return c0, c1


def _line_width(rng: np.random.Generator, p: float, lo: float, hi: float) -> float:
    return max(0.8, p * rng.uniform(lo, hi))


# --------------------------------------------------------------------------- generators
# Each takes (rng, size, period_px) and returns an HxW field in [0, 1] or an HxWx3 RGB image.


def _stripes_field(rng, n, p):
    """Sharp parallel stripes with a random duty cycle."""
    u, _ = _frame(rng, n)
    duty = rng.uniform(0.3, 0.7)
    f = _frac(u / p)
    # signed distance (px) to the nearest stripe edge; positive inside the stripe [0, duty)
    d = np.where(f < duty, np.minimum(f, duty - f), -np.minimum(f - duty, 1 - f)) * p
    return _soft(d)


def _sinusoid(rng, n, p):
    """Smooth sine waves, sometimes with a second harmonic."""
    u, _ = _frame(rng, n)
    t = np.sin(TAU * u / p)
    if rng.random() < 0.5:
        t = t + rng.uniform(0.2, 0.5) * np.sin(2 * TAU * u / p + rng.uniform(0, TAU))
    return _stretch(t)


def _checks(rng, n, p):
    """Checkerboard, sometimes rectangular."""
    u, v = _frame(rng, n)
    q = p * rng.uniform(0.7, 1.4)
    fu, fv = _frac(u / p), _frac(v / q)
    du = np.minimum(fu, 1 - fu) * p
    dv = np.minimum(fv, 1 - fv) * q
    parity = (np.floor(u / p) + np.floor(v / q)) % 2 * 2 - 1
    return _soft(parity * np.minimum(du, dv))


def _grid_lines(rng, n, p):
    """Thin orthogonal grid lines."""
    u, v = _frame(rng, n)
    w = _line_width(rng, p, 0.06, 0.16)
    fu, fv = _frac(u / p), _frac(v / p)
    d = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) * p
    return _soft(w / 2 - d)


def _dots_regular(rng, n, p):
    """Small round dots on a square lattice."""
    u, v = _frame(rng, n)
    r = p * rng.uniform(0.15, 0.3)
    du, dv = _frac(u / p) - 0.5, _frac(v / p) - 0.5
    return _soft(r - np.hypot(du, dv) * p)


def _dots_random(rng, n, p):
    """Dots of random sizes at random (jittered-lattice) positions, some cells empty."""
    u, v = _frame(rng, n)
    salt = _salt(rng)
    f1, _, cid = _worley(u, v, p, salt)
    r = p * (0.12 + 0.2 * cid)
    keep = _hash(np.floor(cid * 1e6), np.zeros_like(cid), salt + 5) < rng.uniform(0.6, 0.95)
    return _soft(r - f1) * keep


def _polka(rng, n, p):
    """Large dots on a staggered (hexagonal) lattice."""
    u, v = _frame(rng, n)
    r = p * rng.uniform(0.25, 0.4)
    x, y = u / p, v / (p * SQ3)
    a = np.hypot(_frac(x) - 0.5, (_frac(y) - 0.5) * SQ3)
    b = np.hypot(_frac(x + 0.5) - 0.5, (_frac(y + 0.5) - 0.5) * SQ3)
    return _soft(r - np.minimum(a, b) * p)


def _zigzag(rng, n, p):
    """Chevron stripes: stripes displaced by a triangle wave."""
    u, v = _frame(rng, n)
    lam = p * rng.uniform(1.5, 3.0)
    amp = lam * rng.uniform(0.25, 0.6)
    tri = np.abs(_frac(u / lam) - 0.5) * 2 * amp
    f = _frac((v + tri) / p)
    duty = rng.uniform(0.3, 0.6)
    d = np.where(f < duty, np.minimum(f, duty - f), -np.minimum(f - duty, 1 - f)) * p
    return _soft(d)


def _wavy(rng, n, p):
    """Wavy lines: stripes displaced by a sinusoid."""
    u, v = _frame(rng, n)
    lam = p * rng.uniform(2.0, 5.0)
    amp = p * rng.uniform(0.3, 1.2)
    f = _frac((v + amp * np.sin(TAU * u / lam)) / p)
    w = rng.uniform(0.2, 0.45)
    return _soft((w / 2 - np.minimum(f, 1 - f)) * p)


def _rings(rng, n, p):
    """Concentric rings around a centre inside or just outside the patch."""
    y, x = _grid(n)
    cx, cy = rng.uniform(-0.5 * n, 1.5 * n, 2)
    r = np.hypot(x - cx, y - cy)
    if rng.random() < 0.5:
        return 0.5 + 0.5 * np.sin(TAU * r / p)
    f = _frac(r / p)
    return _soft((0.25 - np.minimum(f, 1 - f)) * p)


def _spiral(rng, n, p):
    """Archimedean spiral arms around a centre in the patch."""
    y, x = _grid(n)
    cx, cy = rng.uniform(0.2 * n, 0.8 * n, 2)
    r = np.hypot(x - cx, y - cy)
    phi = np.arctan2(y - cy, x - cx)
    arms = int(rng.integers(1, 5)) * (1 if rng.random() < 0.5 else -1)
    return 0.5 + 0.5 * np.sin(arms * phi + TAU * r / p)


def _voronoi_cells(rng, n, p):
    """Flat-shaded Voronoi cells (stones, cobbles)."""
    u, v = _frame(rng, n)
    f1, f2, cid = _worley(u, v, p, _salt(rng))
    edge = _soft(f2 - f1 - rng.uniform(0.5, 2.0))
    return (0.15 + 0.85 * cid) * (0.6 + 0.4 * edge)


def _voronoi_cracks(rng, n, p):
    """Thin dark cracks along Voronoi cell borders (dry mud, crackle)."""
    u, v = _frame(rng, n)
    salt = _salt(rng)
    amp = p * rng.uniform(0.0, 0.25)
    du = amp * (_value_noise(u, v, p / 2, salt + 11) - 0.5)
    dv = amp * (_value_noise(u, v, p / 2, salt + 13) - 0.5)
    f1, f2, _ = _worley(u + du, v + dv, p, salt)
    w = rng.uniform(0.6, 1.6)
    return _soft(f2 - f1 - w)


def _cellular(rng, n, p):
    """Smooth cellular bumps (bubbles, pores): distance to the nearest feature point."""
    u, v = _frame(rng, n)
    f1, _, _ = _worley(u, v, p, _salt(rng))
    t = np.clip(f1 / p, 0.0, 1.0)
    return t if rng.random() < 0.5 else 1.0 - t


def _honeycomb(rng, n, p):
    """Hexagonal cells with line borders."""
    u, v = _frame(rng, n)
    x, y = u / p, v / p
    ax, ay = _frac(x) - 0.5, (_frac(y / SQ3) - 0.5) * SQ3
    bx, by = _frac(x - 0.5) - 0.5, (_frac((y - SQ3 / 2) / SQ3) - 0.5) * SQ3
    use_a = ax * ax + ay * ay < bx * bx + by * by
    gx, gy = np.where(use_a, ax, bx), np.where(use_a, ay, by)
    edge = 0.5 - np.maximum(np.abs(gx), np.maximum(np.abs(0.5 * gx + SQ3 / 2 * gy), np.abs(0.5 * gx - SQ3 / 2 * gy)))
    w = _line_width(rng, p, 0.05, 0.14)
    return _soft(edge * p - w / 2)


def _bricks(rng, n, p):
    """Running-bond brick wall with mortar lines and per-brick shading."""
    u, v = _frame(rng, n, rotate=rng.random() < 0.3)
    if rng.random() < 0.5:
        u, v = v, u
    bw = p * rng.uniform(1.8, 3.0)
    row = np.floor(v / p)
    uu = u + (row % 2) * bw * 0.5
    fv, fu = _frac(v / p), _frac(uu / bw)
    d = np.minimum(np.minimum(fv, 1 - fv) * p, np.minimum(fu, 1 - fu) * bw)
    w = rng.uniform(0.6, max(0.8, 0.15 * p))
    shade = 0.75 + 0.25 * _hash(np.floor(uu / bw), row, _salt(rng))
    return _soft(d - w / 2) * shade


def _crosshatch(rng, n, p):
    """Two families of thin lines crossing at a random, non-right angle, slightly wobbly."""
    y, x = _grid(n)
    th = rng.uniform(0, math.pi)
    out = np.zeros((n, n))
    salt = _salt(rng)
    w = _line_width(rng, p, 0.08, 0.2)
    for k, dth in enumerate((0.0, rng.uniform(math.radians(35), math.radians(75)))):
        c, s = math.cos(th + dth), math.sin(th + dth)
        a = c * x + s * y + rng.uniform(0, p)
        a = a + 0.15 * p * (_value_noise(x, y, 2 * p, salt + k) - 0.5)
        f = _frac(a / p)
        out = np.maximum(out, _soft(w / 2 - np.minimum(f, 1 - f) * p))
    return 1.0 - out


def _plaid(rng, n, p):
    """Tartan: coloured bands along both axes, averaged (RGB)."""
    u, v = _frame(rng, n, rotate=rng.random() < 0.5)
    k = int(rng.integers(3, 6))
    widths = rng.dirichlet(np.ones(k)) * p * 3
    edges = np.concatenate([[0.0], np.cumsum(widths)])
    period = edges[-1]
    cols = rng.uniform(0.0, 1.0, (k, 3))

    def band(a: np.ndarray) -> np.ndarray:
        idx = np.clip(np.searchsorted(edges, _frac(a / period) * period, side="right") - 1, 0, k - 1)
        return cols[idx]

    return 0.5 * (band(u) + band(v))


def _noise(octaves: int) -> Generator:
    def gen(rng, n, p):
        u, v = _frame(rng, n)
        return _stretch(_fbm(u, v, p, _salt(rng), octaves=octaves, gain=rng.uniform(0.4, 0.65)))

    return gen


def _ridged(rng, n, p):
    """Ridged multifractal noise: sharp ridges (veins, crumpled paper)."""
    u, v = _frame(rng, n)
    t = 1.0 - np.abs(2 * _fbm(u, v, p, _salt(rng), octaves=3) - 1)
    return _stretch(t**2)


def _blobs(rng, n, p):
    """Sum of Gaussian blobs with random positions, sizes and signs (separable: one matmul)."""
    k = int(np.clip(rng.poisson((n / p) ** 2 * 1.2) + 1, 2, 64))
    cx = rng.uniform(-p, n + p, k)
    cy = rng.uniform(-p, n + p, k)
    sig = p * rng.uniform(0.2, 0.5, k)
    amp = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 1.0, k)
    r = np.arange(n, dtype=np.float64)
    gx = np.exp(-((r[None, :] - cx[:, None]) ** 2) / (2 * sig[:, None] ** 2))  # k x W
    gy = np.exp(-((r[None, :] - cy[:, None]) ** 2) / (2 * sig[:, None] ** 2))  # k x H
    return _stretch((amp[:, None] * gy).T @ gx)


def _random_lines(rng, n, p):
    """Straight lines at random angles and offsets (scratches, straw)."""
    y, x = _grid(n)
    k = int(np.clip(rng.poisson(1.5 * n / p) + 2, 3, 24))
    th = rng.uniform(0, math.pi, k)
    if rng.random() < 0.5:  # mostly one direction
        th = rng.normal(rng.uniform(0, math.pi), 0.25, k)
    c, s = np.cos(th).astype(np.float32), np.sin(th).astype(np.float32)
    off = (rng.uniform(-n, n, k) * 0.75).astype(np.float32)
    half = (np.maximum(0.8, rng.uniform(0.5, 2.0, k)) / 2).astype(np.float32)
    xc, yc = (x - n / 2).astype(np.float32)[..., None], (y - n / 2).astype(np.float32)[..., None]
    d = np.abs(c * xc + s * yc - off) - half  # signed distance to each line's edge
    return _soft(-d.min(-1).astype(np.float64))


def _marble(rng, n, p):
    """Marble: sine veins displaced by turbulence."""
    u, v = _frame(rng, n)
    salt = _salt(rng)
    turb = _fbm(u, v, p * 2.0, salt, octaves=4)
    t = np.sin(TAU * u / (p * 2.0) + rng.uniform(3.0, 8.0) * turb)
    return np.abs(t) ** rng.uniform(0.3, 1.0)


def _woven(rng, n, p):
    """Basket weave: a checkerboard of blocks holding alternately horizontal and vertical strands."""
    u, v = _frame(rng, n, rotate=rng.random() < 0.5)
    strands = int(rng.integers(2, 5))
    s = p / strands
    parity = (np.floor(u / p) + np.floor(v / p)) % 2
    a = np.where(parity == 0, v, u)
    f = _frac(a / s)
    strand = np.sin(math.pi * f)  # rounded strand profile
    fu, fv = _frac(u / p), _frac(v / p)
    border = _soft(np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) * p - 0.5)
    return strand * (0.5 + 0.5 * border) * (0.8 + 0.2 * parity)


def _scales(rng, n, p):
    """Fish scales: overlapping discs in staggered rows, each with a dark rim."""
    u, v = _frame(rng, n)
    h = p * 0.5
    rr = p * rng.uniform(0.55, 0.7)
    base = np.floor(v / h)
    out = np.zeros_like(u)
    for k in (-1, 0, 1, 2):  # later (lower) rows are drawn over earlier ones
        row = base + k
        off = (row % 2) * p * 0.5
        cx = np.round((u - off) / p) * p + off
        cy = row * h
        d = np.hypot(u - cx, v - cy)
        inside = d < rr
        out = np.where(inside, _soft(rr - d - 1.2) * (0.55 + 0.45 * (1 - d / rr)), out)
    return out


def _herringbone(rng, n, p):
    """Herringbone: columns of short diagonal slats, alternating in direction."""
    u, v = _frame(rng, n, rotate=rng.random() < 0.5)
    col = np.floor(u / p)
    sign = np.where(col % 2 == 0, 1.0, -1.0)
    q = p * rng.uniform(0.4, 0.6)
    a = (v + sign * (u - col * p)) / math.sqrt(2)
    f = _frac(a / q)
    slat = _soft((0.5 - np.abs(f - 0.5)) * q - 0.6)
    fu = _frac(u / p)
    gap = _soft(np.minimum(fu, 1 - fu) * p - 0.5)
    return slat * gap * (0.85 + 0.15 * _hash(col, np.floor(a / q), _salt(rng)))


def _wood(rng, n, p):
    """Wood grain: elongated rings distorted by noise."""
    u, v = _frame(rng, n)
    salt = _salt(rng)
    stretch = rng.uniform(4.0, 12.0)
    cu, cv = rng.uniform(-3 * n, 3 * n), rng.uniform(-n, n)
    r = np.hypot((u - u.mean() - cu) / stretch, v - v.mean() - cv)
    r = r + p * rng.uniform(0.3, 1.0) * _fbm(u, v, p * 2, salt, octaves=3)
    f = _frac(r / p)
    return f ** rng.uniform(1.0, 4.0)


def _triangles(rng, n, p):
    """Tiling of equilateral triangles in two tones with thin borders."""
    u, v = _frame(rng, n)
    b = 2 * v / (p * SQ3)
    a = u / p - b / 2
    fa, fb = _frac(a), _frac(b)
    fc = _frac(a + b)
    upper = fa + fb > 1
    if rng.random() < 0.5:  # two tones: upward / downward triangles
        parity = upper.astype(np.float64)
    else:  # a random tone per triangle
        parity = _hash(2 * np.floor(a) + upper, np.floor(b), _salt(rng))
    d = np.minimum(np.minimum(np.minimum(fa, 1 - fa), np.minimum(fb, 1 - fb)), np.minimum(fc, 1 - fc)) * p * SQ3 / 2
    return (0.2 + 0.8 * parity) * _soft(d - 0.6)


def _argyle(rng, n, p):
    """Argyle: elongated diamonds in two tones with a diagonal line overlay."""
    u, v = _frame(rng, n, rotate=rng.random() < 0.4)
    aspect = rng.uniform(1.3, 2.0)
    a, b = u / p + v / (p * aspect), u / p - v / (p * aspect)
    parity = (np.floor(a) + np.floor(b)) % 2
    fa, fb = _frac(a + 0.5), _frac(b + 0.5)
    line = _soft(0.06 * p - np.minimum(np.minimum(fa, 1 - fa), np.minimum(fb, 1 - fb)) * p * 0.7)
    return np.clip(0.25 + 0.6 * parity + 0.5 * line * (1 - 2 * parity) * 0.8, 0.0, 1.0)


def _speckle(rng, n, p):
    """Granular speckle: sparse bright/dark grains on a smooth background."""
    y, x = _grid(n)
    salt = _salt(rng)
    g = _hash(np.floor(x / p * 2.0), np.floor(y / p * 2.0), salt)
    dens = rng.uniform(0.05, 0.35)
    grains = (g < dens).astype(np.float64)
    fine = _value_noise(x, y, max(0.8, p / 2), salt + 3)
    return _stretch(0.7 * grains + 0.3 * fine)


def _gradient(rng, n, p):
    """Smooth, nearly textureless regions (sky, walls): gradients plus faint low-frequency noise."""
    u, v = _frame(rng, n)
    t = (u - u.min()) / max(np.ptp(u), 1.0) * rng.uniform(0.2, 1.0)
    t = t + rng.uniform(0.0, 0.4) * _fbm(u, v, p * 4, _salt(rng), octaves=2)
    return np.clip(0.5 + 0.4 * (t - t.mean()), 0.0, 1.0)


def _studs(rng, n, p):
    """Lattice of plus/cross shapes (studded, knurled)."""
    u, v = _frame(rng, n)
    du, dv = np.abs(_frac(u / p) - 0.5) * p, np.abs(_frac(v / p) - 0.5) * p
    arm = p * rng.uniform(0.25, 0.4)
    w = max(0.8, p * rng.uniform(0.06, 0.14))
    d = np.maximum(np.minimum(w - du, arm - dv), np.minimum(w - dv, arm - du))
    return _soft(d)


def _truchet(rng, n, p):
    """Truchet tiles of quarter arcs: meandering, maze-like lines."""
    u, v = _frame(rng, n)
    i, j = np.floor(u / p), np.floor(v / p)
    fu, fv = _frac(u / p), _frac(v / p)
    flip = _hash(i, j, _salt(rng)) < 0.5
    fu = np.where(flip, 1 - fu, fu)
    d1 = np.abs(np.hypot(fu, fv) - 0.5)
    d2 = np.abs(np.hypot(1 - fu, 1 - fv) - 0.5)
    w = max(0.8, p * rng.uniform(0.08, 0.2))
    return _soft(w / 2 - np.minimum(d1, d2) * p)


@dataclass(frozen=True)
class TextureFamily:
    """A texture generator and the range of its characteristic period (LR pixels)."""

    name: str
    generate: Generator
    period: tuple[float, float]
    colour: bool = True  # False: the generator returns RGB itself


TEXTURE_FAMILIES: tuple[TextureFamily, ...] = (
    TextureFamily("stripes", _stripes_field, (3.0, 16.0)),
    TextureFamily("sinusoid", _sinusoid, (4.0, 20.0)),
    TextureFamily("checks", _checks, (3.0, 16.0)),
    TextureFamily("grid", _grid_lines, (5.0, 20.0)),
    TextureFamily("dots_regular", _dots_regular, (4.0, 14.0)),
    TextureFamily("dots_random", _dots_random, (5.0, 16.0)),
    TextureFamily("polka", _polka, (8.0, 22.0)),
    TextureFamily("zigzag", _zigzag, (4.0, 12.0)),
    TextureFamily("wavy", _wavy, (4.0, 12.0)),
    TextureFamily("rings", _rings, (4.0, 16.0)),
    TextureFamily("spiral", _spiral, (5.0, 16.0)),
    TextureFamily("voronoi_cells", _voronoi_cells, (6.0, 24.0)),
    TextureFamily("voronoi_cracks", _voronoi_cracks, (8.0, 28.0)),
    TextureFamily("cellular", _cellular, (5.0, 20.0)),
    TextureFamily("honeycomb", _honeycomb, (7.0, 22.0)),
    TextureFamily("bricks", _bricks, (5.0, 14.0)),
    TextureFamily("crosshatch", _crosshatch, (4.0, 12.0)),
    TextureFamily("plaid", _plaid, (4.0, 12.0), colour=False),
    TextureFamily("noise_fine", _noise(2), (1.5, 4.0)),
    TextureFamily("noise_medium", _noise(3), (5.0, 12.0)),
    TextureFamily("noise_coarse", _noise(5), (16.0, 48.0)),
    TextureFamily("ridged_noise", _ridged, (8.0, 28.0)),
    TextureFamily("blobs", _blobs, (6.0, 24.0)),
    TextureFamily("random_lines", _random_lines, (4.0, 16.0)),
    TextureFamily("marble", _marble, (8.0, 28.0)),
    TextureFamily("woven", _woven, (8.0, 20.0)),
    TextureFamily("scales", _scales, (7.0, 20.0)),
    TextureFamily("herringbone", _herringbone, (6.0, 16.0)),
    TextureFamily("wood", _wood, (3.0, 10.0)),
    TextureFamily("triangles", _triangles, (6.0, 20.0)),
    TextureFamily("argyle", _argyle, (8.0, 24.0)),
    TextureFamily("speckle", _speckle, (1.5, 5.0)),
    TextureFamily("smooth", _gradient, (10.0, 40.0)),
    TextureFamily("studs", _studs, (6.0, 16.0)),
    TextureFamily("truchet", _truchet, (6.0, 16.0)),
)
FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in TEXTURE_FAMILIES)


# --------------------------------------------------------------------------- rendering


def _colourise(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    c0, c1 = _colour_pair(rng)
    if rng.random() < 0.25:  # three-colour ramp
        cm = rng.uniform(0.0, 1.0, 3)
        lo = np.clip(t * 2, 0, 1)[..., None]
        hi = np.clip(t * 2 - 1, 0, 1)[..., None]
        return np.where(t[..., None] < 0.5, c0 + (cm - c0) * lo, cm + (c1 - cm) * hi)
    return c0 + (c1 - c0) * t[..., None]


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1 2 1]/4 blur with edge replication."""
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    return 0.25 * h[:-2] + 0.5 * h[1:-1] + 0.25 * h[2:]


def band_period_range(family: TextureFamily, band: int = 0, n_bands: int = 1) -> tuple[float, float]:
    """The sub-range of ``family``'s period range (equal cuts in log scale) used by ``band``."""
    if not 0 <= band < n_bands:
        raise RefQSRError(f"band {band} out of range for {n_bands} band(s)")
    lo, hi = (math.log(x) for x in family.period)
    step = (hi - lo) / n_bands
    return math.exp(lo + band * step), math.exp(lo + (band + 1) * step)


def render_texture(
    family: int | str | TextureFamily,
    rng: np.random.Generator,
    size: int = 72,
    band: int = 0,
    n_bands: int = 1,
) -> np.ndarray:
    """One ``size x size x 3`` uint8 texture of ``family`` (index, name or object).

    Draws, in order: the period (log-uniform within the band), the generator's own parameters,
    colours, contrast, noise level and blur.
    """
    fam = _family(family)
    if size < 1:
        raise RefQSRError(f"texture size must be positive, got {size}")
    lo, hi = band_period_range(fam, band, n_bands)
    p = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    t = np.asarray(fam.generate(rng, int(size), p), dtype=np.float64)
    img = _colourise(rng, np.clip(t, 0.0, 1.0)) if fam.colour else t
    contrast = rng.uniform(0.55, 1.0)
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = mean + (img - mean) * contrast
    if rng.random() < 0.3:
        img = _blur(img)
    sigma = rng.uniform(0.0, 0.03)
    img = img + sigma * rng.standard_normal(img.shape)
    return np.clip(np.floor(img * 255.0 + 0.5), 0, 255).astype(np.uint8)


def _family(family: int | str | TextureFamily) -> TextureFamily:
    if isinstance(family, TextureFamily):
        return family
    if isinstance(family, str):
        try:
            return TEXTURE_FAMILIES[FAMILY_NAMES.index(family)]
        except ValueError:
            raise RefQSRError(f"unknown texture family {family!r}; known: {', '.join(FAMILY_NAMES)}") from None
    if not 0 <= int(family) < len(TEXTURE_FAMILIES):
        raise RefQSRError(f"texture family index {family} out of range 0..{len(TEXTURE_FAMILIES) - 1}")
    return TEXTURE_FAMILIES[int(family)]


def class_spec(c: int, num_classes: int) -> tuple[int, int, int]:
    """``(family index, band, n_bands)`` of class ``c`` among ``num_classes``."""
    f_count = len(TEXTURE_FAMILIES)
    if not 0 <= c < num_classes:
        raise RefQSRError(f"class {c} out of range for {num_classes} classes")
    fam = c % f_count
    n_bands = (num_classes - fam + f_count - 1) // f_count
    return fam, c // f_count, n_bands


def class_names(num_classes: int) -> list[str]:
    """Human-readable class names: the family name, with ``-<band>of<n>`` when split into bands."""
    names = []
    for c in range(num_classes):
        fam, band, n = class_spec(c, num_classes)
        names.append(FAMILY_NAMES[fam] if n == 1 else f"{FAMILY_NAMES[fam]}-{band + 1}of{n}")
    return names


class TextureDataset(LabelledImageSet):
    """``num_classes * samples_per_class`` procedural texture samples.

    Sample ``i`` has class ``i % num_classes`` (so every prefix is class-balanced) and is a pure
    function of ``(seed, i)``; ``size`` is the default side, any sample may be rendered at another
    size with :meth:`render` / :meth:`batch` (same parameters, different canvas).
    ``ds[i]`` returns ``(3 x size x size float tensor in [0, 1], class)``.
    """

    def __init__(self, num_classes: int = 47, size: int = 72, samples_per_class: int = 100, seed: int = 0) -> None:
        if num_classes < 2:
            raise RefQSRError(f"need at least 2 texture classes, got {num_classes}")
        if samples_per_class < 1:
            raise RefQSRError(f"samples_per_class must be >= 1, got {samples_per_class}")
        if size < 15:
            raise RefQSRError(f"texture size must be at least 15 (ClustBlock's minimum), got {size}")
        self.num_classes = int(num_classes)
        self.size = int(size)
        self.samples_per_class = int(samples_per_class)
        self.seed = int(seed)
        self.classes = class_names(self.num_classes)
        self._specs = [class_spec(c, self.num_classes) for c in range(self.num_classes)]

    def __len__(self) -> int:
        return self.num_classes * self.samples_per_class

    def label(self, index: int) -> int:
        return int(index) % self.num_classes

    def render(self, index: int, size: int | None = None) -> np.ndarray:
        """Sample ``index`` as HxWx3 uint8 (any non-negative index; ``len`` only bounds iteration)."""
        if index < 0:
            raise IndexError(f"negative texture index {index}")
        fam, band, n_bands = self._specs[self.label(index)]
        rng = np.random.default_rng((self.seed, int(index)))
        return render_texture(fam, rng, self.size if size is None else int(size), band, n_bands)
