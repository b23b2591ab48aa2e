"""High-contrast images: text, line art, grids, sharp shapes, facades, and graphic wallpapers.

The photos of ``train/``, ``val/`` and ``test/`` are soft natural scenes. Quantized networks whose
activation bounds were learned on them can clip the large activations that strong edges cause, a
loss those sets never show. This module makes the content that does show it:

* :func:`synthetic_image` renders one image of a kind (:data:`KINDS`) from a seed. Shapes are drawn
  at 4x and reduced with a box filter, so edges are sharp but anti-aliased, as in a rendering.
* The graphic wallpapers of three Debian packages (:data:`PACKAGES`) are split by name: those in
  :data:`EVAL_WALLPAPERS` go to the evaluation set, the others (their siblings) to training. The
  light and dark variants of one GNOME design go to the same side.

``training.prepare`` writes the evaluation images to ``hicontrast/`` (synthetic seeds
:data:`EVAL_SEEDS`) and the training siblings to ``train/`` (seeds :data:`TRAIN_SEEDS`), so no
evaluation image, nor any rendering of the same seed, is ever trained on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 744  # HR side of a synthetic image and of a wallpaper crop (LR 186: 2x2 patches of 96 px, 6 px overlap)
SUPERSAMPLE = 4
STRONG_EDGE = 64  # grey levels of |dx| + |dy| that count as a strong edge
MIN_STRONG_EDGES = 0.002  # an image with fewer strong-edge pixels than this share is left out
KINDS = ("text", "lineart", "grid", "shapes", "facade")
EVAL_SEEDS = (0, 1)  # per kind, for hicontrast/
TRAIN_SEEDS = tuple(range(100, 106))  # per kind, for train/

# (package, folder inside it)
PACKAGES = (
    ("gnome-backgrounds", "usr/share/backgrounds/gnome"),
    ("ukui-wallpapers", "usr/share/backgrounds"),
    ("lomiri-wallpapers-20.04", "usr/share/backgrounds"),
)
# Stems (GNOME designs without their -l/-d suffix) that go to the evaluation set.
EVAL_WALLPAPERS = frozenset(
    {"pixels", "truchet", "firstgeneration", "city", "rollpaper", "focal-ubuntukylin", "string"}
)
_VARIANT = re.compile(r"-[ld]$")

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype"))
WORDS = (
    "quantized super resolution reference query patch engine tensor kernel integer facade window "
    "grid street building archive 0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ typography line contrast edge "
    "station platform exit north south museum library open closed Monday 08:30 17:45 km/h"
).split()


def wallpaper_design(path: Path) -> str:
    """The design a wallpaper belongs to: its stem without a GNOME ``-l``/``-d`` variant suffix."""
    return _VARIANT.sub("", path.stem)


def is_eval_wallpaper(path: Path) -> bool:
    return wallpaper_design(path) in EVAL_WALLPAPERS


def _fonts() -> list[Path]:
    for folder in FONT_DIRS:
        found = sorted(p for p in folder.rglob("*.ttf")) if folder.is_dir() else []
        if found:
            return found
    return []


def _font(rng: np.random.Generator, px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    fonts = _fonts()
    if fonts:
        return ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), px)
    return ImageFont.load_default(size=px)  # Pillow's bundled font when no TrueType font is installed


def _colour(rng: np.random.Generator, dark: bool) -> tuple[int, int, int]:
    lo, hi = (0, 70) if dark else (185, 256)
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth two-colour gradient at an angle, size x size x 3 float."""
    a = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / size
    t = (np.cos(a) * x + np.sin(a) * y - min(0, np.cos(a)) - min(0, np.sin(a))) / (abs(np.cos(a)) + abs(np.sin(a)))
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _canvas(rng: np.random.Generator, size: int, base: np.ndarray | None = None) -> Image.Image:
    big = size * SUPERSAMPLE
    if base is None:
        return Image.new("RGB", (big, big), _colour(rng, dark=bool(rng.integers(2))))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((big, big), Image.BILINEAR)


def _reduce(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8)


def _text(rng: np.random.Generator, size: int) -> np.ndarray:
    dark_bg = bool(rng.integers(2))
    img = _canvas(rng, size)
    img.paste(_colour(rng, dark_bg), (0, 0, *img.size))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(0, 8)) * SUPERSAMPLE
    while y < img.size[1]:
        px = int(rng.choice((9, 11, 13, 16, 20, 26, 34, 48)))
        font = _font(rng, px * SUPERSAMPLE)
        line = " ".join(rng.choice(WORDS, int(rng.integers(3, 12))))
        draw.text((int(rng.integers(-20, 20)) * SUPERSAMPLE, y), line, font=font, fill=_colour(rng, not dark_bg))
        y += int(px * rng.uniform(1.15, 1.8)) * SUPERSAMPLE
    return _reduce(img, size)


def _lineart(rng: np.random.Generator, size: int) -> np.ndarray:
    dark_bg = bool(rng.integers(2))
    img = _canvas(rng, size)
    img.paste(_colour(rng, dark_bg), (0, 0, *img.size))
    draw = ImageDraw.Draw(img)
    big = img.size[0]
    for _ in range(int(rng.integers(40, 90))):
        width = int(rng.choice((1, 1, 2, 3, 5))) * SUPERSAMPLE // 2 + 1
        ink = _colour(rng, not dark_bg)
        kind = int(rng.integers(3))
        if kind == 0:
            pts = [tuple(int(v) for v in rng.integers(0, big, 2)) for _ in range(int(rng.integers(2, 6)))]
            draw.line(pts, fill=ink, width=width)
        elif kind == 1:
            cx, cy = rng.integers(0, big, 2)
            r = int(rng.integers(8, big // 5))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=ink, width=width)
        else:
            x0, y0 = rng.integers(0, big, 2)
            x1, y1 = x0 + rng.integers(16, big // 3), y0 + rng.integers(16, big // 3)
            draw.rectangle((int(x0), int(y0), int(x1), int(y1)), outline=ink, width=width)
    return _reduce(img, size)


def _grid(rng: np.random.Generator, size: int) -> np.ndarray:
    """Checkerboards, stripes and rotated grids in tiles of several periods (aliasing-prone)."""
    out = np.empty((size, size, 3), np.float64)
    tiles = int(rng.choice((2, 3)))
    step = size // tiles
    y, x = np.mgrid[0:step, 0:step].astype(np.float64)
    for ty in range(tiles):
        for tx in range(tiles):
            period = rng.uniform(2.5, 24)
            a = rng.uniform(0, np.pi) if rng.integers(2) else 0.0
            u, v = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
            kind = int(rng.integers(3))
            if kind == 0:
                m = (np.floor(u / period) + np.floor(v / period)) % 2
            elif kind == 1:
                m = np.floor(u / period) % 2
            else:
                m = ((u % period) < max(1.0, period / 5)) | ((v % period) < max(1.0, period / 5))
            c0, c1 = np.array(_colour(rng, True)), np.array(_colour(rng, False))
            tile = c0 + (c1 - c0) * m[..., None].astype(np.float64)
            out[ty * step : (ty + 1) * step, tx * step : (tx + 1) * step] = tile
    rest = size - tiles * step
    if rest:
        out[tiles * step :] = out[tiles * step - rest : tiles * step]
        out[:, tiles * step :] = out[:, tiles * step - rest : tiles * step]
    return np.clip(out, 0, 255).astype(np.uint8)


def _shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _canvas(rng, size, _gradient(rng, size))
    draw = ImageDraw.Draw(img)
    big = img.size[0]
    for _ in range(int(rng.integers(60, 120))):
        ink = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.integers(0, big, 2)
        r = int(rng.integers(big // 80, big // 10))
        if rng.integers(2):
            n = int(rng.integers(3, 8))
            phase = rng.uniform(0, 2 * np.pi)
            angles = [phase + 2 * math.pi * k / n for k in range(n)]
            pts = [(int(cx + r * math.cos(a)), int(cy + r * math.sin(a))) for a in angles]
            draw.polygon(pts, fill=ink)
        else:
            draw.ellipse((cx - r, cy - r // 2, cx + r, cy + r // 2), fill=ink)
    return _reduce(img, size)


def _facade(rng: np.random.Generator, size: int) -> np.ndarray:
    """A building front: a wall with rows of framed windows, in perspective over a sky gradient."""
    big = size * SUPERSAMPLE
    wall = Image.new("RGB", (big, big), _colour(rng, dark=bool(rng.integers(2))))
    draw = ImageDraw.Draw(wall)
    cols, rows = int(rng.integers(5, 14)), int(rng.integers(5, 14))
    cw, rh = big / cols, big / rows
    glass, frame = _colour(rng, True), _colour(rng, False)
    fw = max(1, int(rng.uniform(0.02, 0.06) * cw))
    for r in range(rows):
        draw.line((0, int(r * rh), big, int(r * rh)), fill=frame, width=max(1, fw // 2))
        for c in range(cols):
            x0, y0 = c * cw + 0.22 * cw, r * rh + 0.2 * rh
            x1, y1 = (c + 1) * cw - 0.22 * cw, (r + 1) * rh - 0.15 * rh
            draw.rectangle((int(x0), int(y0), int(x1), int(y1)), fill=glass, outline=frame, width=fw)
            xm = int((x0 + x1) / 2)
            draw.line((xm, int(y0), xm, int(y1)), fill=frame, width=max(1, fw // 2))
    # Perspective: the wall recedes towards one side; the sky fills what it leaves.
    squeeze = rng.uniform(0.1, 0.35)
    left = bool(rng.integers(2))
    dst = [(0, 0), (big, big * squeeze), (big, big * (1 - squeeze)), (0, big)]
    if left:
        dst = [(0, big * squeeze), (big, 0), (big, big), (0, big * (1 - squeeze))]
    coeffs = _perspective_coeffs(dst, [(0, 0), (big, 0), (big, big), (0, big)])
    warped = wall.transform((big, big), Image.PERSPECTIVE, coeffs, Image.BICUBIC, fillcolor=(0, 0, 0))
    mask = Image.new("L", (big, big), 255).transform((big, big), Image.PERSPECTIVE, coeffs, Image.NEAREST)
    sky = _canvas(rng, size, _gradient(rng, size))
    sky.paste(warped, (0, 0), mask)
    return _reduce(sky, size)


def _perspective_coeffs(dst: list, src: list) -> list[float]:
    """Pillow's PERSPECTIVE coefficients mapping output points ``dst`` to input points ``src``."""
    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    b = np.array(src, dtype=np.float64).reshape(8)
    return list(np.linalg.solve(np.array(a, dtype=np.float64), b))


_RENDER: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "text": _text,
    "lineart": _lineart,
    "grid": _grid,
    "shapes": _shapes,
    "facade": _facade,
}


def synthetic_image(kind: str, seed: int, size: int = SIZE) -> np.ndarray:
    """One size x size x 3 uint8 rendering of ``kind`` (one of :data:`KINDS`), a function of ``seed``."""
    if kind not in _RENDER:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    rng = np.random.default_rng([KINDS.index(kind), seed])
    return np.ascontiguousarray(_RENDER[kind](rng, size))


def edge_energy(img: np.ndarray) -> np.ndarray:
    """Per-pixel |horizontal| + |vertical| difference of the grey image (h-1 x w-1)."""
    g = img.astype(np.float32).mean(axis=2)
    return np.abs(np.diff(g, axis=1))[:-1] + np.abs(np.diff(g, axis=0))[:, :-1]


def strong_edge_share(img: np.ndarray) -> float:
    """The share of pixels whose :func:`edge_energy` is at least :data:`STRONG_EDGE` grey levels."""
    return float((edge_energy(img) >= STRONG_EDGE).mean())


def busiest_crop(img: np.ndarray, size: int = SIZE, step: int = 32) -> np.ndarray:
    """The size x size window (or the whole side where the image is smaller) with the most edge energy."""
    h, w = img.shape[:2]
    ch, cw = min(h, size), min(w, size)
    e = np.pad(edge_energy(img), ((0, 1), (0, 1)))
    s = e.cumsum(0).cumsum(1)
    s = np.pad(s, ((1, 0), (1, 0)))
    best, at = -1.0, (0, 0)
    for y in range(0, h - ch + 1, step):
        for x in range(0, w - cw + 1, step):
            total = s[y + ch, x + cw] - s[y, x + cw] - s[y + ch, x] + s[y, x]
            if total > best:
                best, at = total, (y, x)
    y, x = at
    return np.ascontiguousarray(img[y : y + ch, x : x + cw])
