"""Reading and writing images for the CLI: Pillow, EXIF orientation applied, alpha kept aside,
pixel-count limit against decompression bombs, atomic writes (temp file + rename)."""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import RefQSRError
from ..files import publish

DEFAULT_MAX_PIXELS = 64_000_000  # LR pixels; ~8K x 8K, far above any sensible SR input


@dataclass
class LoadedImage:
    rgb: np.ndarray  # H x W x 3 uint8
    alpha: np.ndarray | None  # H x W uint8, or None
    mode: str  # the file's Pillow mode, to write the output back in kind
    info: dict  # ICC profile / EXIF to carry over where the format allows


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    path = Path(path)
    if not path.exists():
        raise RefQSRError(f"input not found: {path}")
    if not path.is_file():
        raise RefQSRError(f"input is not a file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:
                    raise RefQSRError(
                        f"{path}: {im.width}x{im.height} exceeds the limit of {max_pixels} pixels (raise it with --max-pixels)"
                    )
                im.load()
                mode = im.mode
                info = {k: im.info[k] for k in ("icc_profile",) if k in im.info}
                im = ImageOps.exif_transpose(im)
    except RefQSRError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RefQSRError(f"{path}: not an image Pillow can read (or an implausibly large one)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise RefQSRError(f"{path}: cannot read the image ({err})") from None
    if im.width == 0 or im.height == 0:
        raise RefQSRError(f"{path}: the image is empty (0 pixels)")
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    alpha = np.asarray(im.convert("RGBA"))[..., 3].copy() if has_alpha else None
    rgb = np.asarray(im.convert("RGB")).copy()
    return LoadedImage(rgb, alpha, mode, info)


def output_format(path: str | Path) -> str:
    """Pillow format for ``path``'s extension; checked before any work so a bad OUT fails fast."""
    path = Path(path)
    if not path.parent.is_dir():
        raise RefQSRError(f"output folder does not exist: {path.parent}")
    if path.is_dir():
        raise RefQSRError(f"output is a folder: {path}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise RefQSRError(f"unknown output format for {path.name}: use .png, .jpg, .webp, .tif or .bmp")
    return fmt


def write_image(path: str | Path, rgb: np.ndarray, alpha: np.ndarray | None = None, gray: bool = False, info: dict | None = None) -> None:
    """Write uint8 RGB (+ alpha) to ``path``, format from the extension; the file appears complete
    or not at all, and an existing file is only replaced on success."""
    path = Path(path)
    fmt = output_format(path)
    im = Image.fromarray(rgb, "RGB")
    if gray:
        im = im.convert("L")
    if alpha is not None and fmt not in ("JPEG", "BMP"):
        im.putalpha(Image.fromarray(alpha, "L"))
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    except OSError as err:
        raise RefQSRError(f"cannot write to {path.parent}: {err.strerror}") from None
    os.close(fd)
    try:
        extra = {"icc_profile": info["icc_profile"]} if info and "icc_profile" in info and fmt in ("PNG", "JPEG", "WEBP", "TIFF") else {}
        im.save(tmp, format=fmt, **extra)
        publish(tmp, path)
    except OSError as err:
        raise RefQSRError(f"cannot write {path}: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
