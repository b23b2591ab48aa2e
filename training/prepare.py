"""Build an offline SR training set: ``OUT_DIR/train/*.png`` and ``OUT_DIR/val/*.png`` (HR images).

Sources, all available without a network:

* scikit-image's bundled sample photos (``skimage.data``; gray ones expanded to RGB);
* the Debian package ``mate-backgrounds`` (photos and artwork, 1280-5640 px wide), read from
  ``--mate-dir`` (default ``/work/data/mate/usr/share/backgrounds/mate``); when that folder is
  missing the script tries ``apt-get download mate-backgrounds`` + ``dpkg -x`` in a temporary
  folder, and otherwise goes on with scikit-image only.

Images are made RGB (alpha dropped), downscaled with Pillow LANCZOS so the long side is at most
``--max-side`` (1024) px, and written as PNG. Nearly flat images (mean absolute neighbour
difference < 1 grey level, e.g. transparent wallpapers whose RGB under the alpha is constant)
and images smaller than ``--min-side`` are left out; of a wallpaper shipped at several
resolutions (``Name.jpg``, ``Name_3840x2160.jpg``) only the largest is used. A fixed list of
images (:data:`VAL_NAMES`) goes to ``val/``, the rest to ``train/``. LR images are not written:
the training data set makes them with MATLAB-style bicubic.

Run: ``python -m refqsr_engine.training.prepare OUT_DIR``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import click
import numpy as np
from PIL import Image

from refqsr_engine.errors import RefQSRError
from refqsr_engine.training.datasets import find_images, load_rgb

DEFAULT_MATE_DIR = Path("/work/data/mate/usr/share/backgrounds/mate")
MATE_PACKAGE = "mate-backgrounds"

# scikit-image sample images shipped inside the wheel (no download). `cat` is `chelsea`.
SKIMAGE_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "colorwheel", "camera", "brick", "grass", "gravel", "coins", "moon", "clock",
    "stereo_motorcycle",
)
# Held out for validation (name = output file stem).
VAL_NAMES = ("skimage_astronaut", "skimage_coffee", "mate_nature_LadyBird", "mate_nature_Dune")

_RES_SUFFIX = re.compile(r"_\d+x\d+$")


@dataclass
class Source:
    name: str  # output stem
    origin: str  # human-readable origin
    load: Callable[[], np.ndarray]  # -> HxWx3 uint8


def _to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise RefQSRError(f"unexpected sample dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def skimage_sources() -> list[Source]:
    try:
        from skimage import data
    except ImportError:
        warnings.warn("scikit-image is not installed; no skimage sample images", stacklevel=2)
        return []

    def loader(name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            img = getattr(data, name)()
            if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
                img = img[0]
            return _to_rgb_uint8(img)

        return load

    return [Source(f"skimage_{n}", f"skimage.data.{n}", loader(n)) for n in SKIMAGE_NAMES if hasattr(data, n)]


def fetch_mate(dest: Path) -> Path | None:
    """``apt-get download mate-backgrounds`` + ``dpkg -x`` into ``dest``; the backgrounds folder or None."""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return None
    try:
        subprocess.run(["apt-get", "download", MATE_PACKAGE], cwd=dest, check=True,
                       capture_output=True, timeout=300)
        debs = sorted(dest.glob(f"{MATE_PACKAGE}_*.deb"))
        if not debs:
            return None
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(dest / "x")], check=True,
                       capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"could not fetch {MATE_PACKAGE}: {exc}", file=sys.stderr)
        return None
    folder = dest / "x" / "usr" / "share" / "backgrounds" / "mate"
    return folder if folder.is_dir() else None


def mate_sources(folder: Path) -> list[Source]:
    """One source per wallpaper; of several resolutions of one wallpaper, the largest."""
    groups: dict[str, list[Path]] = {}
    for path in find_images(folder):
        rel = path.relative_to(folder).with_suffix("")
        key = _RES_SUFFIX.sub("", rel.as_posix())
        groups.setdefault(key, []).append(path)
    sources = []
    for key, paths in sorted(groups.items()):
        def pixels(p: Path) -> int:
            with Image.open(p) as im:
                return im.size[0] * im.size[1]

        best = max(paths, key=pixels)
        name = "mate_" + re.sub(r"[^A-Za-z0-9_-]+", "_", key.replace("/", "_"))
        sources.append(Source(name, f"{MATE_PACKAGE}:{best.relative_to(folder).as_posix()}",
                              (lambda p=best: load_rgb(p))))
    return sources


def downscale(img: np.ndarray, max_side: int) -> np.ndarray:
    """Pillow LANCZOS so that max(h, w) <= max_side (unchanged if already small)."""
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(img).resize(size, Image.LANCZOS))


def flatness(img: np.ndarray) -> float:
    """Mean absolute horizontal + vertical neighbour difference of the grey image."""
    g = img.astype(np.float32).mean(axis=2)
    return float(np.abs(np.diff(g, axis=1)).mean() + np.abs(np.diff(g, axis=0)).mean())


def _write_png(img: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)


def _iter_sources(mate_dir: Path | None, use_mate: bool, tmp: Path, log: Callable[[str], None]) -> Iterator[Source]:
    yield from skimage_sources()
    if not use_mate:
        log("mate-backgrounds: not used (--no-mate)")
        return
    folder = mate_dir if mate_dir is not None and mate_dir.is_dir() else None
    if folder is None:
        log(f"mate-backgrounds: {mate_dir} missing; trying apt-get download {MATE_PACKAGE}")
        folder = fetch_mate(tmp)
    if folder is None:
        log("mate-backgrounds: unavailable; continuing with scikit-image images only")
        return
    log(f"mate-backgrounds: {folder}")
    yield from mate_sources(folder)


def prepare(
    out_dir: str | Path,
    mate_dir: str | Path | None = DEFAULT_MATE_DIR,
    use_mate: bool = True,
    max_side: int = 1024,
    min_side: int = 192,
    val_names: tuple[str, ...] = VAL_NAMES,
    log: Callable[[str], None] = print,
) -> dict:
    """Write ``out_dir/train`` and ``out_dir/val`` and ``out_dir/manifest.json``; return the manifest."""
    out = Path(out_dir)
    train_dir, val_dir = out / "train", out / "val"
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    records, skipped, seen = [], [], {}
    with tempfile.TemporaryDirectory(prefix="refqsr-prepare-") as tmp:
        for src in _iter_sources(Path(mate_dir) if mate_dir else None, use_mate, Path(tmp), log):
            try:
                img = src.load()
            except Exception as exc:  # one unreadable sample must not stop the build
                skipped.append((src.name, f"unreadable: {exc}"))
                continue
            orig = img.shape[:2]
            img = downscale(img, max_side)
            if min(img.shape[:2]) < min_side:
                skipped.append((src.name, f"too small ({img.shape[1]}x{img.shape[0]} < {min_side})"))
                continue
            flat = flatness(img)
            if flat < 1.0:
                skipped.append((src.name, f"nearly flat (mean |grad| {flat:.2f})"))
                continue
            digest = hashlib.sha256(img.tobytes()).hexdigest()
            if digest in seen:
                skipped.append((src.name, f"duplicate of {seen[digest]}"))
                continue
            seen[digest] = src.name
            split = "val" if src.name in val_names else "train"
            path = (val_dir if split == "val" else train_dir) / f"{src.name}.png"
            _write_png(img, path)
            records.append({
                "name": src.name, "split": split, "origin": src.origin,
                "original_hw": list(orig), "hw": list(img.shape[:2]),
            })
    # Leave no stale image from an earlier run with other settings.
    written = {(r["split"], r["name"]) for r in records}
    for split, folder in (("train", train_dir), ("val", val_dir)):
        for p in folder.glob("*.png"):
            if (split, p.stem) not in written:
                p.unlink()
    missing_val = sorted(set(val_names) - {r["name"] for r in records if r["split"] == "val"})
    n_train = sum(r["split"] == "train" for r in records)
    n_val = len(records) - n_train
    if n_train == 0:
        raise RefQSRError("no training image could be prepared")
    manifest = {
        "max_side": max_side, "min_side": min_side, "n_train": n_train, "n_val": n_val,
        "images": records, "skipped": [{"name": n, "why": w} for n, w in skipped],
    }
    tmp_manifest = out / ".manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp_manifest, out / "manifest.json")

    log(f"\n{'split':5s}  {'image':44s} {'size':>10s}  origin")
    for r in sorted(records, key=lambda r: (r["split"] != "val", r["name"])):
        log(f"{r['split']:5s}  {r['name']:44s} {r['hw'][1]:>4d}x{r['hw'][0]:<5d}  {r['origin']}")
    for name, why in skipped:
        log(f"skip   {name:44s} {why}")
    if missing_val:
        log(f"warning: validation images not available: {', '.join(missing_val)}")
    train_px = sum(r["hw"][0] * r["hw"][1] for r in records if r["split"] == "train")
    log(f"\n{n_train} train images ({train_px / 1e6:.1f} Mpx) -> {train_dir}\n{n_val} val images -> {val_dir}")
    return manifest


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--mate-dir", type=click.Path(path_type=Path), default=DEFAULT_MATE_DIR, show_default=True,
              help="Extracted mate-backgrounds folder (usr/share/backgrounds/mate).")
@click.option("--no-mate", is_flag=True, help="Use scikit-image images only.")
@click.option("--max-side", type=click.IntRange(min=64), default=1024, show_default=True,
              help="Downscale (LANCZOS) so the long side is at most this.")
@click.option("--min-side", type=click.IntRange(min=1), default=192, show_default=True,
              help="Leave out images whose short side is below this (after downscaling).")
def _cli(out_dir: Path, mate_dir: Path, no_mate: bool, max_side: int, min_side: int) -> None:
    """Build OUT_DIR/train and OUT_DIR/val (HR PNGs) from offline images."""
    try:
        prepare(out_dir, mate_dir, not no_mate, max_side, min_side)
    except RefQSRError as exc:
        raise click.ClickException(str(exc)) from exc


def main(argv: list[str] | None = None) -> None:
    _cli.main(args=argv, prog_name="python -m refqsr_engine.training.prepare")


if __name__ == "__main__":
    main()
