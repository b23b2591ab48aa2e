"""`refqsr-engine upscale` with the PyTorch reference: output, patch-wise equivalence, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from refqsr_engine.cli.main import main
from refqsr_engine.models.checkpoint import load_model, save_model
from refqsr_engine.models.patchwise import upscale_patchwise
from refqsr_engine.models.registry import build_sr
from refqsr_helpers import small_refqsr


@pytest.fixture(scope="module")
def fp_model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_sr("srresnet").eval()
    path = tmp_path_factory.mktemp("models") / "fp.pt"
    save_model(path, model, {"name": "random-init test model"})
    return path


def _photo(h: int, w: int) -> np.ndarray:
    from skimage import data

    return data.astronaut()[100 : 100 + h, 150 : 150 + w].copy()


def run(*args: str):
    """The CLI on the PyTorch reference engine (fast; the compiled engine has its own tests)."""
    argv = list(args)
    if argv and argv[0] == "upscale" and "--engine" not in argv:
        argv += ["--engine", "torch"]
    return CliRunner().invoke(main, argv)


def test_checkpoint_roundtrip_is_fp16_rounding_only(fp_model_file):
    model, card = load_model(fp_model_file)
    assert card["name"] == "random-init test model"
    torch.manual_seed(0)
    twin = build_sr("srresnet").eval()
    with torch.no_grad():
        for p in twin.parameters():  # the file stores fp16: round the twin the same way
            p.copy_(p.half().float())
        x = torch.rand(1, 3, 20, 20)
        assert torch.equal(model(x), twin(x))


def test_refqsr_checkpoint_roundtrip(tmp_path):
    model = small_refqsr(1, tau=0.3, n_blocks=16)
    save_model(tmp_path / "r.pt", model, half=False)
    loaded, _ = load_model(tmp_path / "r.pt")
    q, r = torch.rand(2, 3, 24, 24), torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded(q, r)[0], model(q, r)[0])
    assert loaded.tau == 0.3 and loaded.clustblock is not None


def test_single_patch_equals_whole_image_forward(fp_model_file):
    model, _ = load_model(fp_model_file)
    lr = np.random.default_rng(0).random((3, 48, 48), dtype=np.float32)
    out = upscale_patchwise(model, lr, patch=48, overlap=6).image
    with torch.no_grad():
        ref = model(torch.from_numpy(lr)[None])[0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_upscale_writes_x4_image(tmp_path, fp_model_file):
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(_photo(37, 53)).save(src)
    result = run("upscale", str(src), str(dst), "--model", str(fp_model_file), "--patch", "32", "--quiet")
    assert result.exit_code == 0, result.output
    with Image.open(dst) as im:
        assert im.size == (53 * 4, 37 * 4) and im.mode == "RGB"


def test_upscale_keeps_alpha_and_gray(tmp_path, fp_model_file):
    rgba = np.dstack([_photo(20, 24), np.full((20, 24), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert (
        run("upscale", str(tmp_path / "a.png"), str(tmp_path / "a4.png"), "--model", str(fp_model_file), "-q").exit_code
        == 0
    )
    with Image.open(tmp_path / "a4.png") as im:
        assert im.mode == "RGBA" and im.size == (96, 80)
        assert np.asarray(im)[..., 3].min() == 128  # a flat alpha stays flat
    Image.fromarray(_photo(20, 24)[..., 0]).save(tmp_path / "g.png")
    assert (
        run("upscale", str(tmp_path / "g.png"), str(tmp_path / "g4.png"), "--model", str(fp_model_file), "-q").exit_code
        == 0
    )
    with Image.open(tmp_path / "g4.png") as im:
        assert im.mode == "L"


def test_json_report(tmp_path, fp_model_file):
    import json

    Image.fromarray(_photo(30, 30)).save(tmp_path / "in.png")
    result = run(
        "upscale", str(tmp_path / "in.png"), str(tmp_path / "o.png"), "--model", str(fp_model_file), "--json", "-q"
    )
    report = json.loads(result.output)
    assert report["hr_size"] == [120, 120] and report["patches"] == 1
    assert report["bitops"]["fqr"] == 32.0


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda p: None, "input not found"),
        (lambda p: p.write_bytes(b"this is not an image"), "not an image"),
        (lambda p: p.write_bytes(b""), "not an image"),
    ],
)
def test_bad_input_one_line_no_output(tmp_path, fp_model_file, make_input, message):
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    make_input(src)
    result = run("upscale", str(src), str(dst), "--model", str(fp_model_file), "-q")
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not dst.exists()


def test_truncated_png_and_existing_output_untouched(tmp_path, fp_model_file):
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(_photo(40, 40)).save(src)
    src.write_bytes(src.read_bytes()[:200])
    dst.write_bytes(b"previous result")
    result = run("upscale", str(src), str(dst), "--model", str(fp_model_file), "-q")
    assert result.exit_code == 2
    assert "cannot read" in result.output or "not an image" in result.output
    assert dst.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png"]  # no temp file left


def test_bad_options(tmp_path, fp_model_file):
    Image.fromarray(_photo(20, 20)).save(tmp_path / "in.png")
    cases = [
        (["--model", "no-such-model"], "neither a bundled model"),
        (["--model", str(fp_model_file), "--patch", "4"], "patch must be"),
        (["--model", str(fp_model_file), "--tau", "0.3"], "RefQSR models only"),
    ]
    for extra, message in cases:
        result = run("upscale", str(tmp_path / "in.png"), str(tmp_path / "o.png"), *extra, "-q")
        assert result.exit_code == 2 and message in result.output, result.output
    out = run("upscale", str(tmp_path / "in.png"), str(tmp_path / "o.xyz"), "--model", str(fp_model_file), "-q")
    assert out.exit_code == 2 and "unknown output format" in out.output
    missing_dir = run(
        "upscale", str(tmp_path / "in.png"), str(tmp_path / "nope" / "o.png"), "--model", str(fp_model_file), "-q"
    )
    assert missing_dir.exit_code == 2 and "does not exist" in missing_dir.output


def test_pixel_limit(tmp_path, fp_model_file):
    Image.fromarray(_photo(30, 30)).save(tmp_path / "in.png")
    result = run(
        "upscale",
        str(tmp_path / "in.png"),
        str(tmp_path / "o.png"),
        "--model",
        str(fp_model_file),
        "--max-pixels",
        "100",
        "-q",
    )
    assert result.exit_code == 2 and "exceeds the limit" in result.output


def test_16bit_and_exif_orientation_through_the_cli(tmp_path, fp_model_file):
    from refqsr_engine.engine.image_io import read_image, write_image

    write_image(tmp_path / "in16.png", _photo(20, 24).astype(np.float32) / 255, bit_depth=16)
    assert (
        run(
            "upscale", str(tmp_path / "in16.png"), str(tmp_path / "o16.png"), "--model", str(fp_model_file), "-q"
        ).exit_code
        == 0
    )
    assert (tmp_path / "o16.png").read_bytes()[24] == 16  # IHDR bit depth
    out = read_image(tmp_path / "o16.png")
    assert out.bit_depth == 16 and out.rgb.shape == (80, 96, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: 20 x 24 on disk, 24 x 20 upright
    Image.fromarray(_photo(20, 24)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert (
        run("upscale", str(tmp_path / "r.jpg"), str(tmp_path / "r4.jpg"), "--model", str(fp_model_file), "-q").exit_code
        == 0
    )
    with Image.open(tmp_path / "r4.jpg") as im:
        assert im.size == (80, 96) and im.getexif()[0x0112] == 1


def test_folder_mode_upscales_all_and_skips_unreadable(fp_model_file, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_photo(20, 24)).save(src / "a.png")
    Image.fromarray(_photo(16, 16)).convert("L").save(src / "b.jpg")
    (src / "broken.png").write_bytes(b"not a png")
    (src / "notes.txt").write_text("ignored: not an image extension")
    result = run(
        "upscale",
        str(src),
        str(tmp_path / "out"),
        "--model",
        str(fp_model_file),
        "--patch",
        "12",
        "--overlap",
        "2",
        "--ext",
        "png",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 1  # something was skipped
    report = __import__("json").loads(result.output)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert [s["input"].rsplit("/", 1)[-1] for s in report["skipped"]] == ["broken.png"]
    assert Image.open(tmp_path / "out" / "a.png").size == (96, 80)
    assert Image.open(tmp_path / "out" / "b.png").mode == "L"
    for r in report["images"]:
        assert {"read", "sr", "merge", "write", "total"} <= set(r["seconds"])
        assert r["bitops"]["bitops_g"] >= 0 and "bitops_8bit_only" in r


def test_bits_option_picks_or_checks_the_model(fp_model_file, tmp_path):
    Image.fromarray(_photo(16, 16)).save(tmp_path / "in.png")
    bad = run("upscale", str(tmp_path / "in.png"), str(tmp_path / "o.png"), "--bits", "4-2")
    assert bad.exit_code == 2 and "no bundled model runs at 4-2 bits" in bad.output
    picked = run(
        "upscale",
        str(tmp_path / "in.png"),
        str(tmp_path / "p.png"),
        "--bits",
        "4",
        "--engine",
        "torch",
        "--patch",
        "12",
        "--overlap",
        "2",
        "--json",
        "--quiet",
    )
    assert picked.exit_code == 0, picked.output
    assert json.loads(picked.output)["bitops"]["bits"] == "4"  # the bundled DDTB-4 model ran
    wrong = run(
        "upscale", str(tmp_path / "in.png"), str(tmp_path / "o.png"), "--model", str(fp_model_file), "--bits", "8"
    )
    assert wrong.exit_code == 2 and "runs at 32 bits, not 8" in wrong.output
    ok = run(
        "upscale",
        str(tmp_path / "in.png"),
        str(tmp_path / "o.png"),
        "--model",
        str(fp_model_file),
        "--bits",
        "32",
        "--patch",
        "12",
        "--overlap",
        "2",
        "--quiet",
    )
    assert ok.exit_code == 0 and not (tmp_path / "x.png").exists()
    gpu = run("upscale", str(tmp_path / "in.png"), str(tmp_path / "g.png"), "--target", "cuda")
    assert gpu.exit_code == 2 and "--engine tvm" in gpu.output
