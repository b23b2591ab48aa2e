"""Reading and writing images for the CLI.

Pixels travel as float32 in [0, 1] so that 16-bit files keep their precision; the output is written
at the input's bit depth where the format allows (16-bit PNG/TIFF), else 8-bit. Pillow is the only
codec: it has no 16-bit colour mode, so 16-bit RGB(A) files are decoded twice (high bytes, then low
bytes, see ``_decode_16bit``) and written by the small PNG/TIFF writers at the bottom of this file.
EXIF orientation is applied on read; EXIF (orientation reset to 1) and the ICC profile are carried
over where the format allows. Pixel-count limit against decompression bombs; truncated files are
errors (ImageFile.LOAD_TRUNCATED_IMAGES is left False); writes are atomic (temp file + rename)."""

from __future__ import annotations

import io
import os
import struct
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin, TiffTags, UnidentifiedImageError

from ..errors import RefQSRError
from ..files import owned_temp_prefix, publish, remove_stale_temps

DEFAULT_MAX_PIXELS = 64_000_000  # LR pixels; ~8K x 8K, far above any sensible SR input

# Output format by extension (lower case); the batch mode also lists inputs by these (+ .gif).
OUTPUT_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
INPUT_EXTENSIONS = frozenset(OUTPUT_FORMATS) | {".gif"}
JPEG_QUALITY = 95  # also used for WebP (lossy)

_ORIENTATION = 0x0112
# TIFF tags that describe the source file's own strips/samples; carried over as "EXIF" they would
# contradict the written file (a TIFF's getexif() returns its whole first IFD).
_TIFF_LAYOUT_TAGS = (
    254,
    255,
    256,
    257,
    258,
    259,
    262,
    263,
    266,
    273,
    277,
    278,
    279,
    280,
    281,
    284,
    317,
    320,
    322,
    323,
    324,
    325,
    338,
    339,
    340,
    341,
    513,
    514,
    530,
    34675,
)
# Pillow rawmodes of 16-bit colour data and the rawmode that reads the other byte of each sample.
# ("N": native order, what libtiff hands over for compressed TIFFs.)
_SWAPPED = "B" if sys.byteorder == "little" else "L"
_LOW_BYTE_RAWMODE = {
    "RGB;16B": "RGB;16L",
    "RGB;16L": "RGB;16B",
    "RGB;16N": "RGB;16" + _SWAPPED,
    "RGBA;16B": "RGBA;16L",
    "RGBA;16L": "RGBA;16B",
    "RGBA;16N": "RGBA;16" + _SWAPPED,
}
# EXIF orientation -> numpy op on H x W (x C) arrays, the same transposes as ImageOps.exif_transpose.
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


@dataclass
class LoadedImage:
    rgb: np.ndarray  # H x W x 3 float32 in [0, 1]; gray files are replicated (the models are RGB)
    alpha: np.ndarray | None  # H x W float32 in [0, 1], or None
    gray: bool  # write the result back as gray
    bit_depth: int  # 8 or 16: the precision of the file's samples, and of the output where possible
    mode: str  # the file's Pillow mode, for reports
    info: dict  # "icc_profile" / "exif" (bytes) to carry over where the format allows


#: what a run needs besides its output image: the engine, one batch's intermediates (measured:
#: 1.8 GiB above the baseline for an 8K output at batch 8), headroom
WORKING_BYTES = 3 << 30


def output_bytes(width: int, height: int, scale: int) -> int:
    """Bytes the upscaled image takes while it is merged: float32 RGB and alpha at ``scale``x."""
    return width * height * scale * scale * 4 * 4


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_output_fits(path: Path, width: int, height: int, scale: int) -> None:
    """Refuse, before any work, an image whose upscaled output would not fit in this machine's memory."""
    need, have = output_bytes(width, height, scale), available_bytes()
    if have is not None and need + WORKING_BYTES > have:
        raise RefQSRError(
            f"{path}: {width}x{height} upscaled x{scale} needs about {(need + WORKING_BYTES) / 2**30:.1f} GiB "
            f"of memory, {have / 2**30:.1f} GiB is available"
        )


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, output_scale: int | None = None) -> LoadedImage:
    """Read any image Pillow knows (first frame), upright per its EXIF orientation. With
    ``output_scale``, first check that its upscaled output fits in memory (:func:`check_output_fits`)."""
    path = Path(path)
    if not path.exists():
        raise RefQSRError(f"input not found: {path}")
    if not path.is_file():
        raise RefQSRError(f"input is not a file: {path}")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning fires at 89M pixels whatever --max-pixels says; the check below is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:
                    raise RefQSRError(
                        f"{path}: {im.width}x{im.height} exceeds the limit of {max_pixels} pixels "
                        "(raise it with --max-pixels)"
                    )
                if im.width == 0 or im.height == 0:
                    raise RefQSRError(f"{path}: the image is empty (0 pixels)")
                if output_scale is not None:
                    check_output_fits(path, im.width, im.height, output_scale)
                mode, rawmode = im.mode, _rawmode(im)  # the tile list is gone after load()
                im.load()
                data, bit_depth = _decode(im, path, rawmode)
                orientation, info = _metadata(im)  # after load: TIFF applies (and drops) its orientation itself
    except RefQSRError:
        raise
    except UnidentifiedImageError:
        raise RefQSRError(f"{path}: not an image Pillow can read") from None
    except Image.DecompressionBombError:
        raise RefQSRError(
            f"{path}: over {2 * Image.MAX_IMAGE_PIXELS} pixels, "
            "refused as a likely decompression bomb (Pillow's own limit)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as err:  # truncated / corrupt data
        raise RefQSRError(f"{path}: cannot read the image ({_one_line(err)})") from None
    if orientation in _ORIENT:
        data = np.ascontiguousarray(_ORIENT[orientation](data))
    channels = data.shape[2]
    alpha = data[..., -1].copy() if channels in (2, 4) else None
    color = data[..., : 1 if channels <= 2 else 3]
    gray = channels <= 2
    rgb = np.repeat(color, 3, axis=2) if gray else np.ascontiguousarray(color)
    return LoadedImage(rgb, alpha, gray, bit_depth, mode, info)


def upscale_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of an H x W float alpha to ``size`` = (height, width): alpha is not an image
    to super-resolve. Done in float ("F" mode) so 16-bit alpha keeps its precision."""
    out = Image.fromarray(np.ascontiguousarray(alpha, np.float32)).resize((size[1], size[0]), Image.BICUBIC)
    return np.clip(np.asarray(out), 0.0, 1.0)


def output_format(path: str | Path) -> str:
    """Pillow format for ``path``'s extension; checked before any work so a bad OUT fails fast."""
    path = Path(path)
    if not path.parent.is_dir():
        raise RefQSRError(f"output folder does not exist: {path.parent}")
    if path.is_dir():
        raise RefQSRError(f"output is a folder: {path}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise RefQSRError(f"output folder is not writable: {path.parent}")
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise RefQSRError(f"unknown output format for {path.name}: use .png, .jpg, .webp, .tif or .bmp")
    return fmt


def write_image(
    path: str | Path,
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    gray: bool = False,
    bit_depth: int = 8,
    info: dict | None = None,
) -> None:
    """Write H x W x 3 float RGB in [0, 1] (+ H x W alpha) to ``path``, format from the extension,
    16-bit where ``bit_depth`` is 16 and the format allows (PNG, TIFF). JPEG and BMP have no alpha:
    the image is composited on white there. The file appears complete or not at all, and an
    existing file is only replaced on success."""
    path = Path(path)
    fmt = output_format(path)
    info = info or {}
    depth = 16 if bit_depth == 16 and fmt in ("PNG", "TIFF") else 8
    samples = _quantize_rows(rgb, alpha, gray, fmt, depth)
    space = b"GRAY" if samples.shape[2] <= 2 else b"RGB "
    icc = info.get("icc_profile") if fmt != "BMP" else None
    if icc is not None and icc[16:20] != space:  # a profile for another colour model would mislabel the pixels
        icc = None
    exif = info.get("exif") if fmt != "BMP" else None
    try:
        remove_stale_temps(path.parent, f".{path.name}")  # left by a process killed while writing
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=owned_temp_prefix(f".{path.name}"), suffix=path.suffix)
    except OSError as err:
        raise RefQSRError(f"cannot write to {path.parent}: {err.strerror}") from None
    os.close(fd)
    try:
        if depth == 16:
            (_write_png16 if fmt == "PNG" else _write_tiff16)(tmp, samples, icc, exif)
        else:
            im = Image.fromarray(samples[..., 0] if samples.shape[2] == 1 else samples)
            extra: dict = {"quality": JPEG_QUALITY} if fmt in ("JPEG", "WEBP") else {}
            extra.update({k: v for k, v in (("icc_profile", icc), ("exif", exif)) if v})
            im.save(tmp, format=fmt, **extra)
        publish(tmp, path)
    except (OSError, ValueError) as err:  # disk full, EXIF too long for JPEG, ...
        raise RefQSRError(f"cannot write {path}: {_one_line(err)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_ROWS_PER_CHUNK = 256  # float temporaries of one chunk only: an 8K output never exists as float64/rounded copies


def _quantize_rows(rgb: np.ndarray, alpha: np.ndarray | None, gray: bool, fmt: str, depth: int) -> np.ndarray:
    """Float RGB (+ alpha) in [0, 1] -> the integer samples Pillow writes (H x W x planes), a band of
    rows at a time so that peak memory is the output plus one band."""
    maxval = 65535 if depth == 16 else 255
    luma = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as Pillow's convert("L")

    def band(rows: slice) -> np.ndarray:
        c = np.clip(rgb[rows], 0.0, 1.0)
        a = None
        if alpha is not None:
            a = np.clip(alpha[rows], 0.0, 1.0)[..., None]
            if fmt in (
                "JPEG",
                "BMP",
            ):  # what a viewer shows on a white page; dropping alpha would expose hidden colours
                c, a = c * a + (1.0 - a), None
        if gray:
            c = c @ luma
            c = c[..., None] if fmt != "WEBP" else np.repeat(c[..., None], 3, axis=2)  # WebP has no gray
        planes = c if a is None else np.concatenate([c, a], axis=2)
        if depth == 16 and fmt == "TIFF" and planes.shape[2] == 2:
            planes = planes[..., [0, 0, 0, 1]]  # Pillow cannot read 16-bit gray+alpha TIFF back: store RGBA
        planes *= maxval
        return np.round(planes, out=planes)

    height = rgb.shape[0]
    first = band(slice(0, min(height, _ROWS_PER_CHUNK)))
    samples = np.empty((height, *first.shape[1:]), np.uint16 if depth == 16 else np.uint8)
    samples[: len(first)] = first
    for r0 in range(_ROWS_PER_CHUNK, height, _ROWS_PER_CHUNK):
        samples[r0 : r0 + _ROWS_PER_CHUNK] = band(slice(r0, r0 + _ROWS_PER_CHUNK))
    return samples


def list_images(folder: Path, recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """The image files in ``folder`` (by extension, any case; hidden files and folders skipped),
    sorted; with ``recursive`` also those in its subfolders, except under ``exclude`` (an output
    folder inside the input one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RefQSRError(f"not a folder: {folder}")
    skip = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = list(current.iterdir())
        except OSError as err:
            raise RefQSRError(f"cannot list {current}: {err.strerror}") from None
        for p in entries:
            if p.name.startswith("."):
                continue
            if p.is_dir():
                if recursive and not p.is_symlink() and (skip is None or p.resolve() != skip):
                    pending.append(p)
            elif p.suffix.lower() in INPUT_EXTENSIONS and p.is_file():
                found.append(p)
    return sorted(found)


def output_path_for(src: Path, out_dir: Path, ext: str | None) -> Path:
    """Where the batch mode writes ``src``: same stem in ``out_dir``, extension ``ext`` ("png" or
    ".png") or the input's own (a format that is read but not written, GIF, becomes PNG); never
    the input file itself."""
    suffix = src.suffix if ext is None else "." + ext.lstrip(".")
    if ext is None and suffix.lower() not in OUTPUT_FORMATS and suffix.lower() in INPUT_EXTENSIONS:
        suffix = ".png"
    if suffix.lower() not in OUTPUT_FORMATS:
        raise RefQSRError(
            f"cannot write {suffix or 'extension-less'} files for {src.name}: choose .png, .jpg, .webp, .tif or .bmp"
        )
    dst = Path(out_dir) / (Path(src).stem + suffix)
    if dst.resolve() == Path(src).resolve():
        raise RefQSRError(f"output would overwrite the input {src}: choose another folder or extension")
    return dst


# -- reading helpers ------------------------------------------------------------------------------


def _decode(im: Image.Image, path: Path, rawmode: str | None) -> tuple[np.ndarray, int]:
    """The loaded image as H x W x C float32 in [0, 1] (C: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA)
    and its bit depth."""
    key = im.info.get("transparency")  # colour-key transparency (PNG tRNS) of non-palette images
    if rawmode in _LOW_BYTE_RAWMODE or rawmode == "LA;16B":
        return _key_alpha(_decode_16bit(im, path, rawmode), key) / np.float32(65535), 16
    if im.mode == "F":  # float TIFF: taken as [0, 1] gray, kept at 16 bits
        return np.clip(np.asarray(im, np.float32), 0, 1)[..., None], 16
    if im.mode.startswith("I"):  # "I;16*" and 32-bit "I": 16-bit gray
        return _key_alpha(np.clip(np.asarray(im), 0, 65535).astype(np.uint16)[..., None], key) / np.float32(65535), 16
    if im.mode == "CMYK":
        im = _cmyk_to_rgb(im)
    gray = im.mode in ("1", "L", "LA", "La")
    has_alpha = im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or key is not None
    target = ("LA" if has_alpha else "L") if gray else ("RGBA" if has_alpha else "RGB")
    return np.asarray(im.convert(target), np.float32).reshape(im.height, im.width, -1) / np.float32(255), 8


def _rawmode(im: Image.Image) -> str | None:
    """The rawmode Pillow decodes the file's samples with (PNG and TIFF), which tells 16-bit colour."""
    if not im.tile or im.format not in ("PNG", "TIFF"):
        return None
    args = im.tile[0][3]  # PNG: the rawmode; TIFF: (rawmode, ...)
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return rawmode if isinstance(rawmode, str) else None


def _decode_16bit(im: Image.Image, path: Path, rawmode: str) -> np.ndarray:
    """Exact 16-bit samples (H x W x 2/3/4 uint16) of a 16-bit colour PNG/TIFF. Pillow keeps only
    the high byte of each sample (``im`` is loaded that way); decoding the file again with the
    byte order swapped yields the low bytes. Its own C decoders still do the PNG filters,
    interlacing and TIFF compression. 16-bit gray+alpha is read whole as 8-bit "RGBA" (same 4 bytes
    per pixel)."""
    other = _LOW_BYTE_RAWMODE.get(rawmode, "RGBA")
    with Image.open(path) as again:
        again.tile = [
            t._replace(args=_with_rawmode(t[3], other))
            if hasattr(t, "_replace")
            else (*t[:3], _with_rawmode(t[3], other))
            for t in again.tile
        ]
        again.load()
        low = np.asarray(again)
    if rawmode == "LA;16B":  # bytes: L high, L low, A high, A low
        return low.astype(np.uint16).reshape(*low.shape[:2], 2, 2) @ np.array([256, 1], np.uint16)
    return (np.asarray(im).astype(np.uint16) << 8) | low


def _with_rawmode(args: str | tuple, rawmode: str) -> str | tuple:
    return rawmode if isinstance(args, str) else (rawmode, *args[1:])


def _key_alpha(samples: np.ndarray, key: int | tuple | None) -> np.ndarray:
    """Add an alpha channel (0 where a pixel equals the colour key) for 16-bit tRNS transparency."""
    if key is None or isinstance(key, bytes):
        return samples
    alpha = np.where((samples == np.asarray(key, samples.dtype)).all(axis=2), 0, 65535).astype(samples.dtype)
    return np.concatenate([samples, alpha[..., None]], axis=2)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK -> sRGB through the embedded profile where there is one (Pillow's plain conversion
    ignores ink behaviour), else Pillow's plain formula. The output is untagged, i.e. sRGB: the
    CMYK profile is not written to an RGB file (see write_image)."""
    icc = im.info.get("icc_profile")
    if icc:
        from PIL import ImageCms  # imported here: only CMYK files need LittleCMS

        try:
            return ImageCms.profileToProfile(
                im, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain conversion
    return im.convert("RGB")


def _metadata(im: Image.Image) -> tuple[int, dict]:
    """The EXIF orientation, and the ICC profile and EXIF to write back. The EXIF written back says
    orientation 1 since the pixels are made upright on read (viewers would otherwise rotate twice)."""
    info = {}
    icc = im.info.get("icc_profile")
    if icc:
        info["icc_profile"] = icc
    try:
        exif = im.getexif()
        orientation = exif.get(_ORIENTATION, 1)
        for tag in TiffTags.TAGS_V2_GROUPS:  # load sub-IFDs (Exif, GPS) while the file is open
            if tag in exif:
                exif.get_ifd(tag)
        for tag in _TIFF_LAYOUT_TAGS:
            exif.pop(tag, None)
        if len(exif):
            exif[_ORIENTATION] = 1
            info["exif"] = exif.tobytes()
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, struct.error):
        return 1, info  # damaged EXIF: the pixels are still good; kept as stored, EXIF not carried
    return orientation, info


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# -- 16-bit writers (Pillow has no 16-bit colour mode to save from) ---------------------------------


def _write_png16(path: str, samples: np.ndarray, icc: bytes | None, exif: bytes | None) -> None:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA) with iCCP and eXIf chunks."""
    h, w, c = samples.shape
    rows = samples.astype(">u2").view(np.uint8).reshape(h, w * c * 2)
    filtered = rows.copy()
    filtered[1:] -= rows[:-1]  # PNG "Up" filter (type 2), byte-wise mod 256: vectorised, and compresses photos well
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), filtered], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)))
        if icc:
            f.write(chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
        if exif:
            f.write(chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
        data = zlib.compress(raw, 6)
        for start in range(0, len(data), 1 << 20):
            f.write(chunk(b"IDAT", data[start : start + (1 << 20)]))
        f.write(chunk(b"IEND", b""))


def _write_tiff16(path: str, samples: np.ndarray, icc: bytes | None, exif: bytes | None) -> None:
    """An uncompressed little-endian 16-bit TIFF (gray, RGB or RGBA), one strip; the IFD is built by
    Pillow's ImageFileDirectory_v2, EXIF tags merged into it the way Pillow's TIFF writer does."""
    h, w, c = samples.shape
    ifd = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    if exif:
        tags = Image.Exif()
        tags.load(exif)
        for key in tags:
            ifd[key] = tags.get_ifd(key) if key in TiffTags.TAGS_V2_GROUPS else tags[key]
    ifd[256], ifd[257], ifd[258], ifd[259] = w, h, (16,) * c, 1
    ifd[262] = 1 if c == 1 else 2  # BlackIsZero / RGB
    ifd[273], ifd[277], ifd[278], ifd[279], ifd[284] = (
        0,
        c,
        h,
        samples.size * 2,
        1,
    )  # StripOffsets 0: made absolute by save()
    if c == 4:
        ifd[338] = 2  # unassociated alpha
    if icc:
        ifd[34675] = icc
    with open(path, "wb") as f:
        ifd.save(f)
        f.write(samples.astype("<u2").tobytes())
