"""engine/image_io: bit depths, modes, EXIF/ICC, output formats, bad input, folder helpers."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, ImageOps
from refqsr_engine.engine.image_io import list_images, output_path_for, read_image, upscale_alpha, write_image
from refqsr_engine.errors import RefQSRError

ORIENTATION = 0x0112


def _photo(h: int = 12, w: int = 16) -> np.ndarray:
    from skimage import data

    return data.astronaut()[100 : 100 + h, 150 : 150 + w].copy()


def _u16(h: int = 9, w: int = 11, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (h, w, c)).astype(np.uint16)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_by_hand(samples: np.ndarray, bits: int = 16, width: int | None = None, height: int | None = None) -> bytes:
    """A PNG made without Pillow or image_io (filter 0), to check the reader independently."""
    h, w, c = samples.shape
    rows = samples.astype(">u2" if bits == 16 else np.uint8).view(np.uint8).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    ihdr = struct.pack(
        ">IIBBBBB",
        w if width is None else width,
        h if height is None else height,
        bits,
        {1: 0, 2: 4, 3: 2, 4: 6}[c],
        0,
        0,
        0,
    )
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _as_u16(x: np.ndarray) -> np.ndarray:
    return np.round(x * 65535).astype(np.uint16)


def _as_u8(x: np.ndarray) -> np.ndarray:
    return np.round(x * 255).astype(np.uint8)


def _write_loaded(path: Path, image) -> None:
    write_image(path, image.rgb, image.alpha, gray=image.gray, bit_depth=image.bit_depth, info=image.info)


# -- bit depth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_read_write_keeps_exact_values(tmp_path, channels):
    samples = _u16(c=channels)
    src = tmp_path / "in.png"
    src.write_bytes(_png_by_hand(samples))
    image = read_image(src)
    assert image.bit_depth == 16 and image.gray == (channels <= 2) and image.rgb.dtype == np.float32
    assert np.array_equal(_as_u16(image.rgb[..., 0]), samples[..., 0])
    if channels >= 3:
        assert np.array_equal(_as_u16(image.rgb), samples[..., :3])
    if channels in (2, 4):
        assert np.array_equal(_as_u16(image.alpha), samples[..., -1])
    for ext in ("png", "tif"):  # written back at 16 bits, read again: the same values
        _write_loaded(tmp_path / f"out.{ext}", image)
        again = read_image(tmp_path / f"out.{ext}")
        assert again.bit_depth == 16 and np.array_equal(_as_u16(again.rgb), _as_u16(image.rgb))
        assert (again.alpha is None) == (image.alpha is None)
        if image.alpha is not None:
            assert np.array_equal(_as_u16(again.alpha), samples[..., -1])
    if channels == 1:  # Pillow reads 16-bit gray itself: an independent check of the writer
        with Image.open(tmp_path / "out.png") as im:
            assert im.mode == "I;16" and np.array_equal(np.asarray(im), samples[..., 0])


def test_16bit_tiff_matches_tifffile(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    samples = _u16(c=3, seed=1)
    tifffile.imwrite(tmp_path / "zip.tif", samples, photometric="rgb", compression="zlib")  # libtiff path
    tifffile.imwrite(tmp_path / "big.tif", samples, photometric="rgb", byteorder=">")
    for name in ("zip.tif", "big.tif"):
        assert np.array_equal(_as_u16(read_image(tmp_path / name).rgb), samples)
    write_image(tmp_path / "out.tif", samples / 65535.0, bit_depth=16)
    assert np.array_equal(tifffile.imread(tmp_path / "out.tif"), samples)


def test_16bit_input_gives_8bit_where_the_format_has_no_16bit(tmp_path):
    (tmp_path / "in.png").write_bytes(_png_by_hand(_u16()))
    image = read_image(tmp_path / "in.png")
    for ext in ("jpg", "webp", "bmp"):
        _write_loaded(tmp_path / f"out.{ext}", image)
        with Image.open(tmp_path / f"out.{ext}") as im:
            assert im.mode == "RGB"
    _write_loaded(tmp_path / "out.png", read_image(tmp_path / "out.bmp"))  # 8-bit in: 8-bit out
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "RGB"


# -- modes ----------------------------------------------------------------------------------------


def test_gray_stays_gray(tmp_path):
    gray = _photo()[..., 1]
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(gray).convert("1").save(tmp_path / "b.png")
    for name in ("g.png", "b.png"):
        image = read_image(tmp_path / name)
        assert image.gray and image.bit_depth == 8 and image.alpha is None and image.rgb.shape == (12, 16, 3)
        for ext in ("png", "jpg", "tif", "bmp"):
            _write_loaded(tmp_path / f"out.{ext}", image)
            with Image.open(tmp_path / f"out.{ext}") as im:
                assert im.mode in ("L", "P"), ext  # BMP stores 8-bit gray as a gray palette
    _write_loaded(tmp_path / "out.png", read_image(tmp_path / "g.png"))
    with Image.open(tmp_path / "out.png") as im:
        assert np.array_equal(np.asarray(im), gray)


def test_palette_with_transparency_gives_alpha(tmp_path):
    pal = Image.fromarray(_photo()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    index = np.asarray(pal)
    pal.save(tmp_path / "p.png", transparency=int(index[0, 0]))
    pal.save(tmp_path / "p.gif")
    image = read_image(tmp_path / "p.png")
    assert not image.gray and image.alpha is not None
    assert np.array_equal(image.alpha == 0, index == index[0, 0]) and set(np.unique(image.alpha)) == {0.0, 1.0}
    assert np.array_equal(_as_u8(image.rgb), np.asarray(pal.convert("RGB")))
    opaque = read_image(tmp_path / "p.gif")
    assert opaque.alpha is None and not opaque.gray


def test_rgba_and_la_alpha_survive(tmp_path):
    alpha = np.tile(np.arange(16, dtype=np.uint8) * 17, (12, 1))
    Image.fromarray(np.dstack([_photo(), alpha]), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.dstack([_photo()[..., 0], alpha]), "LA").save(tmp_path / "la.png")
    for name, mode in (("a.png", "RGBA"), ("la.png", "LA")):
        image = read_image(tmp_path / name)
        assert np.array_equal(_as_u8(image.alpha), alpha)
        for ext in ("png", "tif", "webp"):
            _write_loaded(tmp_path / f"out.{ext}", image)
            with Image.open(tmp_path / f"out.{ext}") as im:
                assert im.mode == (mode if ext != "webp" else "RGBA")
                assert np.array_equal(np.asarray(im)[..., -1], alpha), ext
    flat = upscale_alpha(np.full((5, 7), 0.5, np.float32), (20, 28))
    assert flat.shape == (20, 28) and np.allclose(flat, 0.5, atol=1e-6)


def test_alpha_composited_on_white_for_jpeg_and_bmp(tmp_path):
    rgb = np.zeros((4, 4, 3), np.float32)
    alpha = np.zeros((4, 4), np.float32)
    alpha[:2] = 1.0  # top half opaque black, bottom half fully transparent
    for ext in ("jpg", "bmp"):
        write_image(tmp_path / f"o.{ext}", rgb, alpha)
        with Image.open(tmp_path / f"o.{ext}") as im:
            px = np.asarray(im.convert("RGB")).astype(int)
        assert im.mode == "RGB" and px[:2].max() <= 8 and px[2:].min() >= 247, ext


def test_cmyk_and_16bit_gray(tmp_path):
    Image.fromarray(_photo()).convert("CMYK").save(tmp_path / "c.jpg")
    Image.fromarray(_photo()).convert("CMYK").save(tmp_path / "c.tif", icc_profile=b"not a real profile")
    for name in ("c.jpg", "c.tif"):  # the second one's broken profile falls back to the plain conversion
        image = read_image(tmp_path / name)
        assert image.rgb.shape == (12, 16, 3) and not image.gray and image.mode == "CMYK"
        _write_loaded(tmp_path / "out.png", image)
        with Image.open(tmp_path / "out.png") as im:
            assert im.mode == "RGB" and "icc_profile" not in im.info  # a CMYK profile is not carried to RGB
    gray16 = _u16(c=1)[..., 0]
    Image.fromarray(gray16).save(tmp_path / "g16.tif")
    image = read_image(tmp_path / "g16.tif")
    assert image.gray and image.bit_depth == 16 and np.array_equal(_as_u16(image.rgb[..., 2]), gray16)


# -- metadata -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_applied_and_written_back_as_1(tmp_path, fmt):
    rgb = np.random.default_rng(2).integers(0, 256, (4, 6, 3)).astype(np.uint8)
    expected = {3: np.rot90(rgb, 2), 6: np.rot90(rgb, -1), 8: np.rot90(rgb, 1)}
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif"}[fmt]
    lossless = {"JPEG": {"quality": 100, "subsampling": 0}, "WEBP": {"lossless": True}}.get(fmt, {})
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[ORIENTATION], exif[0x010F] = orientation, "TestCam"  # Make: must be carried over
        src = tmp_path / f"o{orientation}.{ext}"
        Image.fromarray(rgb).save(src, fmt, exif=exif.tobytes(), **lossless)
        image = read_image(src)
        with Image.open(src) as im:
            pillow = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        assert np.array_equal(_as_u8(image.rgb), pillow), orientation  # all 8, as Pillow does them
        if orientation in expected and fmt in ("PNG", "TIFF"):  # lossless: the exact pixels
            assert np.array_equal(_as_u8(image.rgb), expected[orientation])
        dst = tmp_path / f"out{orientation}.{ext}"
        _write_loaded(dst, image)
        with Image.open(dst) as im:
            assert im.size == (image.rgb.shape[1], image.rgb.shape[0])
            assert im.getexif().get(ORIENTATION, 1) == 1 and im.getexif().get(0x010F) == "TestCam"


@pytest.mark.parametrize("ext, depth", [("png", 8), ("jpg", 8), ("webp", 8), ("tif", 8), ("png", 16), ("tif", 16)])
def test_icc_profile_carried(tmp_path, ext, depth):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(_photo()).save(tmp_path / "in.png", icc_profile=icc)
    image = read_image(tmp_path / "in.png")
    assert image.info["icc_profile"] == icc
    write_image(tmp_path / f"out.{ext}", image.rgb, gray=False, bit_depth=depth, info=image.info)
    with Image.open(tmp_path / f"out.{ext}") as im:
        assert im.info.get("icc_profile") == icc


# -- bad input ------------------------------------------------------------------------------------


def _truncated(path: Path, fmt: str) -> None:
    Image.fromarray(_photo(40, 40)).save(path, fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "input not found"),
        (lambda p: p.mkdir(), "input is not a file"),
        (lambda p: p.write_bytes(b"this is not an image"), "not an image Pillow can read"),
        (lambda p: p.write_bytes(b""), "not an image Pillow can read"),
        (lambda p: _truncated(p, "PNG"), "cannot read the image (image file is truncated"),
        (lambda p: _truncated(p, "JPEG"), "cannot read the image"),
        (
            lambda p: p.write_bytes(_png_by_hand(np.zeros((1, 1, 3), np.uint8), 8, width=0)),
            "not an image Pillow can read",
        ),
        (
            lambda p: p.write_bytes(_png_by_hand(np.zeros((1, 1, 3), np.uint8), 8, width=100_000, height=100_000)),
            "decompression bomb",
        ),
        (
            lambda p: p.write_bytes(_png_by_hand(np.zeros((1, 1, 3), np.uint8), 8, width=9000, height=9000)),
            "exceeds the limit of 64000000",
        ),
    ],
    ids=[
        "missing",
        "directory",
        "text",
        "empty",
        "truncated-png",
        "truncated-jpeg",
        "zero-size",
        "bomb",
        "over-max-pixels",
    ],
)
def test_bad_input_is_one_line_error_and_no_file(tmp_path, make, message):
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    make(src)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(RefQSRError) as err:
        _write_loaded(dst, read_image(src))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert sorted(tmp_path.iterdir()) == before and not dst.exists()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_max_pixels_override(tmp_path):
    Image.fromarray(_photo()).save(tmp_path / "in.png")
    with pytest.raises(RefQSRError, match="12x16|16x12"):
        read_image(tmp_path / "in.png", max_pixels=100)
    assert read_image(tmp_path / "in.png", max_pixels=12 * 16).rgb.shape == (12, 16, 3)


def test_failed_writes_leave_old_output_and_no_temp_file(tmp_path, monkeypatch):
    rgb = _photo() / np.float32(255)
    dst = tmp_path / "out.png"
    dst.write_bytes(b"previous result")

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(RefQSRError, match="cannot write .*No space left"):
        write_image(dst, rgb)
    monkeypatch.undo()
    assert dst.read_bytes() == b"previous result" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]

    def no_permission(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", no_permission)  # running as root, chmod would not stop us
    with pytest.raises(RefQSRError, match="cannot write to .*Permission denied"):
        write_image(dst, rgb)
    monkeypatch.undo()
    (tmp_path / "folder.png").mkdir()
    for bad, message in (
        ("nope/o.png", "does not exist"),
        ("o.gif", "unknown output format"),
        ("folder.png", "output is a folder"),
    ):
        with pytest.raises(RefQSRError, match=message):
            write_image(tmp_path / bad, rgb)
    write_image(dst, rgb)  # success replaces the old file
    with Image.open(dst) as im:
        assert im.size == (16, 12)


# -- folder helpers -------------------------------------------------------------------------------


def test_list_images_and_output_path_for(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.Tiff", ".hidden.png", "notes.txt", "d.webp", "e.jpeg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    (tmp_path / "sub.png" / "inner.png").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.Tiff", "d.webp", "e.jpeg"]
    with pytest.raises(RefQSRError, match="not a folder"):
        list_images(tmp_path / "a.jpg")
    out = tmp_path / "out"
    assert output_path_for(tmp_path / "b.PNG", out, None) == out / "b.PNG"
    assert output_path_for(tmp_path / "b.PNG", out, "webp") == out / "b.webp"
    assert output_path_for(tmp_path / "a.jpg", out, ".tif") == out / "a.tif"
    with pytest.raises(RefQSRError, match="overwrite the input"):
        output_path_for(tmp_path / "a.jpg", tmp_path, None)
    assert output_path_for(tmp_path / "x.gif", out, None) == out / "x.png"  # GIF is read, not written
    with pytest.raises(RefQSRError, match="cannot write .gif"):
        output_path_for(tmp_path / "x.png", out, "gif")
