"""`refqsr-engine explain`: the patch assignment of one image as a picture (the paper's Fig. 5).

The LR image is tiled on the engine's grid, its patches go through the ClustBlock and the
clustering (``models.clustblock``), and the picture shows the LR image upscaled for display with
every patch's cell outlined, a colour per reference group (a reference and the queries that use
it), references marked "R" with a heavy border, and isolated references (references no other
patch chose: run alone at b_high) in grey, marked "I" with a dashed border. Patches overlap by
``overlap`` px; each is drawn as its cell, the part of the image it owns (overlaps split at their
middle), so the cells tile the image.
"""

from __future__ import annotations

import colorsys
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RefQSRError
from ..pipeline.clustering import check_tau
from ..pipeline.tiling import check_engine_patch

DISPLAY_LONG_SIDE = 1024  # the picture's long side is about this (integer display scale, 1..8)
ISOLATED_RGB = (150, 150, 150)
QUERY_ALPHA, REFERENCE_ALPHA = 0.30, 0.55  # references are tinted more strongly than their queries


@dataclass
class Assignment:
    """One image's patches: cells (y0, x0, y1, x1) in LR pixels, role and group per patch."""

    cells: list[tuple[int, int, int, int]]
    roles: list[str]  # "reference" | "isolated" | "query"
    group: list[int]  # the reference patch each patch belongs to (its own index for references)
    patch: int
    overlap: int
    tau: float

    def summary(self) -> dict[str, Any]:
        return {
            "patches": len(self.roles),
            "references": sum(r != "query" for r in self.roles),
            "isolated_references": self.roles.count("isolated"),
            "queries": self.roles.count("query"),
            "groups": len(set(self.group)),
            "patch": self.patch,
            "overlap": self.overlap,
            "tau": self.tau,
        }


def _axis_cells(origins: tuple[int, ...], patch: int, length: int) -> list[tuple[int, int]]:
    """Per patch along one axis, the span it owns: neighbours split their overlap at its middle."""
    bounds = [0] + [(origins[k + 1] + origins[k] + patch) // 2 for k in range(len(origins) - 1)] + [length]
    return [(min(bounds[k], length), min(bounds[k + 1], length)) for k in range(len(origins))]


def load_clustering_model(model: str | None) -> tuple[Any, float | None]:
    """(ClustBlock, the model's tau or None) from ``model``: a RefQSR model (its ClustBlock and
    tau), a ClustBlock file, or None / "default" (the default model's, else the bundled ClustBlock)."""
    from ..models.checkpoint import load_model
    from ..models.clustblock import ClustBlock
    from ..models.refqsr import RefQSR
    from .models_store import DEFAULT_MODEL, bundled_dir, resolve_model

    name = model or DEFAULT_MODEL
    loaded, _ = load_model(resolve_model(name))
    if isinstance(loaded, RefQSR):
        if loaded.clustblock is None:
            raise RefQSRError(f"model {name} has no ClustBlock to assign references")
        return loaded.clustblock.eval(), loaded.tau
    if isinstance(loaded, ClustBlock):
        return loaded.eval(), None
    if name != DEFAULT_MODEL:
        raise RefQSRError(f"model {name} is not a RefQSR model or a ClustBlock; it assigns no references")
    clust, _ = load_model(bundled_dir().parent / "clustblock" / "textures47.pt")
    return clust.eval(), None


def assign(
    lr: np.ndarray, clustblock: Any, tau: float, patch: int = 96, overlap: int = 6, batch: int = 16
) -> Assignment:
    """Cluster the patches of an LR image (3 x H x W float32 in [0, 1]) as the engine does."""
    import torch

    from ..models.clustblock import cluster_patches
    from ..pipeline.tiling import extract_patches, make_grid

    grid = make_grid(lr.shape[1], lr.shape[2], patch, overlap)
    idx = list(range(grid.num_patches))
    with torch.no_grad():
        v = torch.cat(
            [
                clustblock(
                    torch.from_numpy(
                        np.ascontiguousarray(extract_patches(lr, grid, idx[i : i + batch]), dtype=np.float32)
                    )
                )
                for i in range(0, len(idx), batch)
            ]
        )
    c = cluster_patches(v, tau)
    targeted = np.zeros(grid.num_patches, bool)
    targeted[c.argmax.numpy()] = True
    is_ref = c.is_reference.numpy()
    roles = ["query" if not r else ("reference" if t else "isolated") for r, t in zip(is_ref, targeted)]
    rows, cols = _axis_cells(grid.ys, patch, lr.shape[1]), _axis_cells(grid.xs, patch, lr.shape[2])
    cells = [(y0, x0, y1, x1) for (y0, y1) in rows for (x0, x1) in cols]
    return Assignment(cells, roles, [int(g) for g in c.reference_of.tolist()], patch, overlap, float(tau))


def group_colours(a: Assignment) -> dict[int, tuple[int, int, int]]:
    """A distinct, saturated colour per reference group (golden-ratio hues), grey for isolated ones."""
    colours: dict[int, tuple[int, int, int]] = {}
    k = 0
    for g in a.group:
        if g in colours:
            continue
        if a.roles[g] == "isolated":
            colours[g] = ISOLATED_RGB
            continue
        r, gg, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 0.95)
        colours[g] = (int(255 * r), int(255 * gg), int(255 * b))
        k += 1
    return colours


def display_scale(height: int, width: int) -> int:
    return int(min(8, max(1, round(DISPLAY_LONG_SIDE / max(height, width)))))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _dashed_rect(
    draw: Any, box: tuple[int, int, int, int], colour: tuple[int, int, int], width: int, dash: int
) -> None:
    x0, y0, x1, y1 = box
    for a, b in (((x0, y0), (x1, y0)), ((x0, y1), (x1, y1)), ((x0, y0), (x0, y1)), ((x1, y0), (x1, y1))):
        length = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
        for s in range(0, length, 2 * dash):
            e = min(s + dash, length)
            if a[1] == b[1]:
                draw.line([(a[0] + s, a[1]), (a[0] + e, a[1])], fill=colour, width=width)
            else:
                draw.line([(a[0], a[1] + s), (a[0], a[1] + e)], fill=colour, width=width)


def render(rgb: np.ndarray, a: Assignment, scale: int | None = None):
    """The picture (a PIL RGB image) of an H x W x 3 float LR image and its assignment."""
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    s = scale or display_scale(h, w)
    base = Image.fromarray(np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8))
    base = base.resize((w * s, h * s), Image.BICUBIC)
    tint = np.asarray(base, dtype=np.float32).copy()
    colours = group_colours(a)
    for (y0, x0, y1, x1), role, g in zip(a.cells, a.roles, a.group):
        alpha = QUERY_ALPHA if role == "query" else REFERENCE_ALPHA
        region = tint[y0 * s : y1 * s, x0 * s : x1 * s]
        region[...] = (1.0 - alpha) * region + alpha * np.asarray(colours[g], np.float32)
    out = Image.fromarray(np.clip(np.round(tint), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    thin, heavy = max(1, s // 2), max(3, s + 1)
    font = _font(max(10, min(48, a.patch * s // 4)))
    for (y0, x0, y1, x1), role in zip(a.cells, a.roles):
        box = (x0 * s, y0 * s, x1 * s - 1, y1 * s - 1)
        if role == "reference":
            draw.rectangle(box, outline=(255, 255, 255), width=heavy)
        elif role == "isolated":
            _dashed_rect(draw, box, (0, 0, 0), heavy, max(4, 2 * s))
        else:
            draw.rectangle(box, outline=(0, 0, 0), width=thin)
        if role != "query":
            label = "R" if role == "reference" else "I"
            cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
            draw.text(
                (cx, cy),
                label,
                fill=(255, 255, 255),
                font=font,
                anchor="mm",
                stroke_width=max(1, s // 2),
                stroke_fill=(0, 0, 0),
            )
    return out


def explain_file(
    src: str | Path,
    dst: str | Path,
    model: str | None = None,
    patch: int = 96,
    overlap: int = 6,
    tau: float | None = None,
    max_pixels: int = 64_000_000,
) -> dict[str, Any]:
    """Write the assignment picture of image ``src`` to ``dst`` atomically; returns its summary."""
    from ..files import publish
    from ..pipeline.tiling import make_grid
    from .image_io import output_format, read_image

    fmt = output_format(dst)  # a bad output path fails before any work
    make_grid(1, 1, patch, overlap)  # as do bad patch/overlap values
    check_engine_patch(patch)
    check_tau(tau)
    image = read_image(src, max_pixels)
    clustblock, model_tau = load_clustering_model(model)
    from ..models.clustblock import DEFAULT_TAU

    used_tau = tau if tau is not None else (model_tau if model_tau is not None else DEFAULT_TAU)
    lr = np.ascontiguousarray(image.rgb.transpose(2, 0, 1), dtype=np.float32)
    a = assign(lr, clustblock, used_tau, patch, overlap)
    picture = render(image.rgb, a)
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".tmp-", suffix=dst.suffix)
    os.close(fd)
    try:
        picture.save(tmp, format=fmt)
        publish(tmp, dst)
    except OSError as err:
        raise RefQSRError(f"cannot write {dst}: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    h, w = image.rgb.shape[:2]
    scale = display_scale(h, w)
    return {
        "input": str(src),
        "output": str(dst),
        "lr_size": [h, w],  # (height, width), as upscale reports it
        "picture_size": [h * scale, w * scale],
        "display_scale": scale,
        **a.summary(),
        "roles": a.roles,
        "group": a.group,
        "cells": a.cells,
    }
