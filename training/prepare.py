"""Build an offline SR training set: ``OUT_DIR/train/*.png`` and ``OUT_DIR/val/*.png`` (HR images).

Sources, all available without a network:

* scikit-image's bundled sample photos (``skimage.data``; gray ones expanded to RGB);
* the Debian package ``mate-backgrounds`` (photos and artwork, 1280-5640 px wide), read from
  ``--mate-dir`` (default ``data/mate/usr/share/backgrounds/mate``, the package extracted with
  ``dpkg -x`` into ``data/mate`` of the current directory); when that folder is missing the
  script tries ``apt-get download mate-backgrounds`` + ``dpkg -x`` in a temporary folder, and
  otherwise goes on with scikit-image only;
* for a test split from another source than the training photos: the Debian package
  ``lomiri-wallpapers-16.04`` (the Ubuntu 16.04 community wallpapers: 15 photos, 1920-4896 px wide),
  read from ``--test-dir`` (default ``data/lomiri/usr/share/backgrounds``, likewise) or fetched the
  same way; every image of it goes to ``test/``, none to ``train/``. Without it, no test split;
* for the high-contrast evaluation set ``hicontrast/`` (:mod:`.hicontrast`): renderings of text, line
  art, grids, sharp shapes over gradients and facades, and crops of the graphic wallpapers of
  ``gnome-backgrounds``, ``ukui-wallpapers`` and ``lomiri-wallpapers-20.04`` (read from
  ``--hicontrast-dir``, default ``data/hicontrast-src/PACKAGE``, or fetched likewise). The wallpapers
  not chosen for evaluation and renderings of other seeds go to ``train/``. ``--no-hicontrast``
  leaves both out.

Images are made RGB (alpha dropped), downscaled with Pillow LANCZOS so the long side is at most
``--max-side`` (1024) px, and written as PNG. Nearly flat images (mean absolute neighbour
difference < 1 grey level, e.g. transparent wallpapers whose RGB under the alpha is constant)
and images smaller than ``--min-side`` are left out; of a wallpaper shipped at several
resolutions (``Name.jpg``, ``Name_3840x2160.jpg``) only the largest is used. A fixed list of
images (:data:`VAL_NAMES`) goes to ``val/``, the rest to ``train/``, the test package to ``test/``
(a second held-out set, larger than ``val/`` and from photographers the training set never saw, for
comparisons finer than four images can settle), the high-contrast set to ``hicontrast/`` (each
image its busiest 744 px window). LR images are not written:
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image
from refqsr_engine.errors import RefQSRError
from refqsr_engine.training import hicontrast
from refqsr_engine.training.datasets import find_images, load_rgb

DEFAULT_MATE_DIR = Path("data/mate/usr/share/backgrounds/mate")  # relative to the current directory
MATE_PACKAGE = "mate-backgrounds"
MATE_SUBDIR = "usr/share/backgrounds/mate"
DEFAULT_TEST_DIR = Path("data/lomiri/usr/share/backgrounds")
TEST_PACKAGE = "lomiri-wallpapers-16.04"
TEST_SUBDIR = "usr/share/backgrounds"
DEFAULT_HICONTRAST_DIR = Path("data/hicontrast-src")  # holds PACKAGE/ (each extracted with dpkg -x)
HELD_OUT = ("val", "test", "hicontrast")  # the sets no training image comes from
SPLITS = ("train", *HELD_OUT)

# scikit-image sample images shipped inside the wheel (no download). `cat` is `chelsea`.
SKIMAGE_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "brick",
    "grass",
    "gravel",
    "coins",
    "moon",
    "clock",
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
    split: str | None = None  # "test"/"hicontrast" as given; else val if named in VAL_NAMES, train otherwise
    crop: bool = False  # keep only the busiest hicontrast.SIZE window (after downscaling)
    graphic: bool = False  # flat areas with sharp edges: judged by its share of strong edges, not flatness


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


def fetch_package(package: str, subdir: str, dest: Path) -> Path | None:
    """``apt-get download PACKAGE`` + ``dpkg -x`` into ``dest``; its ``subdir`` folder or None."""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return None
    try:
        subprocess.run(["apt-get", "download", package], cwd=dest, check=True, capture_output=True, timeout=300)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if not debs:
            return None
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(dest / package)], check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"could not fetch {package}: {exc}", file=sys.stderr)
        return None
    folder = dest / package / subdir
    return folder if folder.is_dir() else None


def fetch_mate(dest: Path) -> Path | None:
    return fetch_package(MATE_PACKAGE, MATE_SUBDIR, dest)


def fetch_test(dest: Path) -> Path | None:
    return fetch_package(TEST_PACKAGE, TEST_SUBDIR, dest)


def testset_sources(folder: Path) -> list[Source]:
    """Every image directly in ``folder`` (the test package's photos), for ``test/``."""
    return [
        Source(
            "test_" + re.sub(r"[^A-Za-z0-9_-]+", "_", p.stem),
            f"{TEST_PACKAGE}:{p.name}",
            (lambda p=p: load_rgb(p)),
            split="test",
        )
        for p in sorted(find_images(folder))
        if p.parent == folder
    ]


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
        sources.append(
            Source(name, f"{MATE_PACKAGE}:{best.relative_to(folder).as_posix()}", (lambda p=best: load_rgb(p)))
        )
    return sources


def hicontrast_sources(root: Path | None, tmp: Path, log: Callable[[str], None]) -> Iterator[Source]:
    """The synthetic renderings and the graphic wallpapers (:mod:`.hicontrast`): evaluation images
    to ``hicontrast``, the other seeds and wallpapers to ``train``."""
    for split, seeds in (("hicontrast", hicontrast.EVAL_SEEDS), ("train", hicontrast.TRAIN_SEEDS)):
        for kind in hicontrast.KINDS:
            for seed in seeds:
                yield Source(
                    f"synth_{kind}_{seed}",
                    f"hicontrast.synthetic_image({kind!r}, {seed})",
                    (lambda k=kind, s=seed: hicontrast.synthetic_image(k, s, hicontrast.SIZE)),
                    split=split,
                    graphic=True,
                )
    for package, subdir in hicontrast.PACKAGES:
        given = root / package / subdir if root is not None else None
        fetch = lambda dest, package=package, subdir=subdir: fetch_package(package, subdir, dest)  # noqa: E731
        folder = _package_folder(given, package, fetch, tmp, log)
        if folder is None:
            log(f"{package}: unavailable; its wallpapers are left out")
            continue
        for path in sorted(find_images(folder)):
            chosen = hicontrast.is_eval_wallpaper(path)
            yield Source(
                "hc_" + re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem),
                f"{package}:{path.relative_to(folder).as_posix()}",
                (lambda p=path: load_rgb(p)),
                split="hicontrast" if chosen else "train",
                crop=chosen,
                graphic=True,
            )


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


def _package_folder(
    given: Path | None, package: str, fetch: Callable[[Path], Path | None], tmp: Path, log: Callable[[str], None]
) -> Path | None:
    """``given`` if it is a folder, else the package fetched into ``tmp`` (None when unavailable)."""
    if given is not None and given.is_dir():
        log(f"{package}: {given}")
        return given
    log(f"{package}: {given} missing; trying apt-get download {package}")
    folder = fetch(tmp)
    if folder is not None:
        log(f"{package}: {folder}")
    return folder


def _iter_sources(
    mate_dir: Path | None,
    use_mate: bool,
    test_dir: Path | None,
    use_test: bool,
    tmp: Path,
    log: Callable[[str], None],
    hicontrast_dir: Path | None = None,
    use_hicontrast: bool = True,
) -> Iterator[Source]:
    yield from skimage_sources()
    if not use_mate:
        log("mate-backgrounds: not used (--no-mate)")
    elif (folder := _package_folder(mate_dir, MATE_PACKAGE, fetch_mate, tmp, log)) is None:
        log("mate-backgrounds: unavailable; continuing with scikit-image images only")
    else:
        yield from mate_sources(folder)
    if not use_test:
        log(f"{TEST_PACKAGE}: not used (--no-test)")
    elif (folder := _package_folder(test_dir, TEST_PACKAGE, fetch_test, tmp, log)) is None:
        log(f"{TEST_PACKAGE}: unavailable; no test split")
    else:
        yield from testset_sources(folder)
    if use_hicontrast:
        yield from hicontrast_sources(hicontrast_dir, tmp, log)
    else:
        log("high-contrast set: not built (--no-hicontrast)")


def prepare(
    out_dir: str | Path,
    mate_dir: str | Path | None = DEFAULT_MATE_DIR,
    use_mate: bool = True,
    max_side: int = 1024,
    min_side: int = 192,
    val_names: tuple[str, ...] = VAL_NAMES,
    log: Callable[[str], None] = print,
    test_dir: str | Path | None = DEFAULT_TEST_DIR,
    use_test: bool = True,
    hicontrast_dir: str | Path | None = DEFAULT_HICONTRAST_DIR,
    use_hicontrast: bool = True,
) -> dict:
    """Write ``out_dir/train``, ``out_dir/val``, ``out_dir/test`` (when the test package is there),
    ``out_dir/hicontrast`` and ``out_dir/manifest.json``; return the manifest."""
    out = Path(out_dir)
    dirs = {split: out / split for split in SPLITS}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    records, skipped, seen = [], [], {}
    with tempfile.TemporaryDirectory(prefix="refqsr-prepare-") as tmp:
        for src in _iter_sources(
            Path(mate_dir) if mate_dir else None,
            use_mate,
            Path(test_dir) if test_dir else None,
            use_test,
            Path(tmp),
            log,
            Path(hicontrast_dir) if hicontrast_dir else None,
            use_hicontrast,
        ):
            try:
                img = src.load()
            except Exception as exc:  # one unreadable sample must not stop the build
                skipped.append((src.name, f"unreadable: {exc}"))
                continue
            orig = img.shape[:2]
            img = downscale(img, max_side)
            if src.crop:
                img = hicontrast.busiest_crop(img, hicontrast.SIZE)
            if min(img.shape[:2]) < min_side:
                skipped.append((src.name, f"too small ({img.shape[1]}x{img.shape[0]} < {min_side})"))
                continue
            if src.graphic:
                share = hicontrast.strong_edge_share(img)
                if share < hicontrast.MIN_STRONG_EDGES:
                    skipped.append((src.name, f"few strong edges ({100 * share:.2f} % of pixels)"))
                    continue
            elif (flat := flatness(img)) < 1.0:
                skipped.append((src.name, f"nearly flat (mean |grad| {flat:.2f})"))
                continue
            digest = hashlib.sha256(img.tobytes()).hexdigest()
            if digest in seen:
                skipped.append((src.name, f"duplicate of {seen[digest]}"))
                continue
            seen[digest] = src.name
            split = src.split or ("val" if src.name in val_names else "train")
            path = dirs[split] / f"{src.name}.png"
            _write_png(img, path)
            records.append(
                {
                    "name": src.name,
                    "split": split,
                    "origin": src.origin,
                    "original_hw": list(orig),
                    "hw": list(img.shape[:2]),
                }
            )
    # Leave no stale image from an earlier run with other settings.
    written = {(r["split"], r["name"]) for r in records}
    for split, folder in dirs.items():
        for p in folder.glob("*.png"):
            if (split, p.stem) not in written:
                p.unlink()
    missing_val = sorted(set(val_names) - {r["name"] for r in records if r["split"] == "val"})
    n_train, n_val, n_test, n_hicontrast = (sum(r["split"] == split for r in records) for split in SPLITS)
    if n_train == 0:
        raise RefQSRError("no training image could be prepared")
    manifest = {
        "max_side": max_side,
        "min_side": min_side,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "n_hicontrast": n_hicontrast,
        "images": records,
        "skipped": [{"name": n, "why": w} for n, w in skipped],
    }
    tmp_manifest = out / ".manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp_manifest, out / "manifest.json")

    log(f"\n{'split':5s}  {'image':44s} {'size':>10s}  origin")
    for r in sorted(records, key=lambda r: ({"val": 0, "test": 1, "hicontrast": 2}.get(r["split"], 3), r["name"])):
        log(f"{r['split']:5s}  {r['name']:44s} {r['hw'][1]:>4d}x{r['hw'][0]:<5d}  {r['origin']}")
    for name, why in skipped:
        log(f"skip   {name:44s} {why}")
    if missing_val:
        log(f"warning: validation images not available: {', '.join(missing_val)}")
    train_px = sum(r["hw"][0] * r["hw"][1] for r in records if r["split"] == "train")
    log(
        f"\n{n_train} train images ({train_px / 1e6:.1f} Mpx) -> {dirs['train']}\n{n_val} val images -> {dirs['val']}"
        f"\n{n_test} test images -> {dirs['test']}\n{n_hicontrast} high-contrast images -> {dirs['hicontrast']}"
    )
    return manifest


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--mate-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_MATE_DIR,
    show_default=True,
    help="Extracted mate-backgrounds folder (usr/share/backgrounds/mate).",
)
@click.option("--no-mate", is_flag=True, help="Use scikit-image images only.")
@click.option(
    "--test-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_TEST_DIR,
    show_default=True,
    help=f"Extracted {TEST_PACKAGE} folder (usr/share/backgrounds): the test split's photos.",
)
@click.option("--no-test", is_flag=True, help="Build no test split.")
@click.option(
    "--hicontrast-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_HICONTRAST_DIR,
    show_default=True,
    help="Folder holding the extracted wallpaper packages of the high-contrast set (PACKAGE/usr/share/...).",
)
@click.option("--no-hicontrast", is_flag=True, help="Build no high-contrast set (and none of its siblings in train).")
@click.option(
    "--max-side",
    type=click.IntRange(min=64),
    default=1024,
    show_default=True,
    help="Downscale (LANCZOS) so the long side is at most this.",
)
@click.option(
    "--min-side",
    type=click.IntRange(min=1),
    default=192,
    show_default=True,
    help="Leave out images whose short side is below this (after downscaling).",
)
def _cli(
    out_dir: Path,
    mate_dir: Path,
    no_mate: bool,
    test_dir: Path,
    no_test: bool,
    hicontrast_dir: Path,
    no_hicontrast: bool,
    max_side: int,
    min_side: int,
) -> None:
    """Build OUT_DIR/train, OUT_DIR/val, OUT_DIR/test and OUT_DIR/hicontrast (HR PNGs) from offline images."""
    try:
        prepare(
            out_dir,
            mate_dir,
            not no_mate,
            max_side,
            min_side,
            test_dir=test_dir,
            use_test=not no_test,
            hicontrast_dir=hicontrast_dir,
            use_hicontrast=not no_hicontrast,
        )
    except RefQSRError as exc:
        raise click.ClickException(str(exc)) from exc


def main(argv: list[str] | None = None) -> None:
    _cli.main(args=argv, prog_name="python -m refqsr_engine.training.prepare")


if __name__ == "__main__":
    main()
