"""What a user can do wrong, or do to the tool, gives one line and exit status 2 (or works), never a
traceback, never a lost or half-written file: each probe of docs/reliability.md, mostly through the
CLI in a fresh process."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from compile_helpers import PATCH, small_refqsr
from PIL import Image
from refqsr_engine.engine import image_io
from refqsr_engine.models.checkpoint import save_model

BATCH = 4


def cli(*args: str, cache: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``refqsr-engine ARGS`` in a fresh process with its own cache folder."""
    env = {**os.environ, "REFQSR_ENGINE_CACHE": str(cache), **(env or {})}
    cmd = [sys.executable, "-c", "from refqsr_engine.cli import run; run()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith(("refqsr-engine: error", "Error:"))]
    assert len(errors) == 1 and words in errors[0], proc.stderr


def _photo(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    from skimage import data

    Image.fromarray(data.astronaut()).resize(size).save(path)
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A small RefQSR model file and a cache holding its compiled engine: (model, cache, image)."""
    root = tmp_path_factory.mktemp("reliability")
    model = root / "m.pt"
    save_model(model, small_refqsr("pams", seed=2), {}, half=False)
    image = _photo(root / "in.png")
    proc = cli(
        "upscale",
        str(image),
        str(root / "warm.png"),
        "--model",
        str(model),
        "--patch",
        str(PATCH),
        "--batch",
        str(BATCH),
        cache=root / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    return model, root / "cache", image


def _upscale(compiled, src, dst, *extra, cache=None):
    model, default_cache, _ = compiled
    return cli(
        "upscale",
        str(src),
        str(dst),
        "--model",
        str(model),
        "--patch",
        str(PATCH),
        "--batch",
        str(BATCH),
        *extra,
        cache=cache or default_cache,
    )


def test_the_input_is_never_the_output(compiled, tmp_path):
    src = shutil.copy(compiled[2], tmp_path / "x.png")
    before = Path(src).read_bytes()
    one_line_error(_upscale(compiled, src, src), "is the input")
    one_line_error(_upscale(compiled, src, tmp_path / "." / "x.png"), "is the input")
    assert Path(src).read_bytes() == before


def test_user_errors_come_before_any_compile_and_within_a_second(compiled, tmp_path):
    empty = tmp_path / "empty-cache"
    for args, words in [
        ((tmp_path / "missing.png", tmp_path / "o.png"), "input not found"),
        ((compiled[2], tmp_path / "o.xyz"), "unknown output format"),
        ((compiled[2], tmp_path / "no" / "such" / "o.png"), "output folder does not exist"),
    ]:
        t0 = time.perf_counter()
        proc = _upscale(compiled, *args, cache=empty)
        one_line_error(proc, words)
        assert time.perf_counter() - t0 < 10  # a fresh interpreter; what matters: no compile ran
        assert not empty.exists()
    warm = _upscale(compiled, tmp_path / "missing.png", tmp_path / "o.png")
    one_line_error(warm, "input not found")


def test_an_unwritable_output_folder_is_found_before_the_work(compiled, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(image_io.os, "access", lambda p, m: False if str(p) == str(tmp_path) else real_access(p, m))
    with pytest.raises(image_io.RefQSRError, match="not writable"):
        image_io.output_format(tmp_path / "o.png")


@pytest.mark.parametrize("tau", ["2", "-5", "nan"])
def test_tau_out_of_range_is_refused(compiled, tmp_path, tau):
    one_line_error(_upscale(compiled, compiled[2], tmp_path / "o.png", "--tau", tau), "--tau")
    assert not (tmp_path / "o.png").exists()


def test_an_edited_manifest_is_refused_and_recompile_repairs_even_a_broken_one(compiled, tmp_path):
    model, cache, image = compiled
    mine = tmp_path / "cache"
    shutil.copytree(cache, mine)
    entry = next(p for p in (mine / "artifacts").iterdir() if p.is_dir())
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["model_info"]["tau"] = 1.9  # every patch a reference
    (entry / "manifest.json").write_text(json.dumps(manifest))
    proc = _upscale(compiled, image, tmp_path / "o.png", cache=mine)
    one_line_error(proc, "digest")
    assert "--recompile" in proc.stderr and not (tmp_path / "o.png").exists()
    broken = (entry / "manifest.json").read_bytes()
    (entry / "manifest.json").write_bytes(b"#" + broken[1:])  # its first byte broken
    one_line_error(_upscale(compiled, image, tmp_path / "o.png", cache=mine), "--recompile")
    repaired = _upscale(compiled, image, tmp_path / "o.png", "--recompile", "--json", cache=mine)
    assert repaired.returncode == 0, repaired.stderr
    assert json.loads(repaired.stdout)["compiled_now"]
    again = _upscale(compiled, image, tmp_path / "o2.png", "--json", cache=mine)
    assert again.returncode == 0 and not json.loads(again.stdout)["compiled_now"]


def test_a_cache_that_cannot_be_written(compiled, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    one_line_error(_upscale(compiled, compiled[2], tmp_path / "o.png", cache=not_a_folder), "cannot write to the cache")
    # a cache holding the entry whose lock cannot be taken (read-only): it is read without the lock
    mine = tmp_path / "cache"
    shutil.copytree(compiled[1], mine)
    for lock in (mine / "artifacts").glob("*.lock"):
        lock.unlink()
        lock.mkdir()  # opening it for writing fails as on a read-only filesystem
    proc = _upscale(compiled, compiled[2], tmp_path / "o.png", "--json", cache=mine)
    assert proc.returncode == 0 and not json.loads(proc.stdout)["compiled_now"], proc.stderr


def test_folder_mode_destinations_and_gif_inputs(compiled, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(compiled[2], src / "a.png")
    Image.open(compiled[2]).convert("P").save(src / "b.gif")
    dst_file = tmp_path / "dst-file"
    dst_file.write_text("x")
    one_line_error(_upscale(compiled, src, dst_file), "is a file")
    assert dst_file.read_text() == "x"
    proc = _upscale(compiled, src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]  # GIF is read, PNG written


@pytest.mark.parametrize(
    "args, words",
    [
        (("upscale", "IN", "OUT", "--patch", "99999"), "--patch must be a multiple of 3"),
        (("upscale", "IN", "OUT", "--patch", "8"), "--patch must be a multiple of 3"),
        (("upscale", "IN", "OUT", "--batch", "300"), "--batch"),
        (("explain", "IN", "OUT", "--patch", "100000"), "--patch must be a multiple of 3"),
        (("compile", "-o", "ART", "--patch", "8"), "--patch must be a multiple of 3"),
        (("compile", "-o", "ART", "--batch", "300"), "--batch"),
        (("bitops", "--hr-size", "1280x720", "--patch", "5"), "patch must be"),
        (("bitops", "--hr-size", "1280x720", "--patch", "-5"), "patch must be"),
        (("bitops", "--hr-size", "1280x720", "--overlap", "500"), "overlap must be"),
        (("bitops", "--hr-size", "1280x720", "--bits", "9-12"), "bit width 9 is not supported"),
    ],
)
def test_option_ranges_agree_and_fail_in_one_line(compiled, tmp_path, args, words):
    subst = {"IN": str(compiled[2]), "OUT": str(tmp_path / "o.png"), "ART": str(tmp_path / "art")}
    t0 = time.perf_counter()
    proc = cli(*(subst.get(a, a) for a in args), cache=tmp_path / "c")
    one_line_error(proc, words)
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "art").exists()


def test_threads_do_not_make_a_second_cache_entry_and_the_cache_command_prunes(compiled, tmp_path):
    mine = tmp_path / "cache"
    shutil.copytree(compiled[1], mine)
    proc = _upscale(compiled, compiled[2], tmp_path / "o.png", "--threads", "1", "--json", cache=mine)
    assert proc.returncode == 0 and not json.loads(proc.stdout)["compiled_now"], proc.stderr
    stale = mine / "artifacts" / "0123456789abcdef0123"
    shutil.copytree(next(p for p in (mine / "artifacts").iterdir() if p.is_dir()), stale)
    listed = {r["key"]: r["state"] for r in json.loads(cli("cache", "--json", cache=mine).stdout)}
    assert listed[stale.name] == "stale" and sorted(listed.values()) == ["current", "stale"]
    removed = json.loads(cli("cache", "--prune", "--json", cache=mine).stdout)
    assert [r["key"] for r in removed] == [stale.name] and not stale.exists()
    assert [r["state"] for r in json.loads(cli("cache", "--json", cache=mine).stdout)] == ["current"]
    cli("cache", "--clear", cache=mine)
    assert json.loads(cli("cache", "--json", cache=mine).stdout) == []


def test_an_output_too_large_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    path = _photo(tmp_path / "big.png", (300, 200))
    monkeypatch.setattr(image_io, "available_bytes", lambda: image_io.WORKING_BYTES + 300 * 200 * 16 * 16 - 1)
    with pytest.raises(image_io.RefQSRError, match="GiB of memory"):
        image_io.read_image(path, output_scale=4)
    monkeypatch.setattr(image_io, "available_bytes", lambda: image_io.WORKING_BYTES + 300 * 200 * 16 * 16)
    assert image_io.read_image(path, output_scale=4).rgb.shape == (200, 300, 3)


def test_sigterm_during_the_write_leaves_no_file_and_kills_leave_nothing_behind(compiled, tmp_path):
    model, cache, image = compiled
    out = tmp_path / "o.png"
    out.write_bytes(b"an older output")
    # the CLI, with the final rename of the write held back until the test signals it
    script = (
        "import sys, time\n"
        "from refqsr_engine.engine import image_io\n"
        "real = image_io.publish\n"
        "def slow(tmp, path):\n"
        "    print('WRITING', flush=True); time.sleep(60); real(tmp, path)\n"
        "image_io.publish = slow\n"
        "from refqsr_engine.cli import run\n"
        "sys.argv = ['refqsr-engine'] + sys.argv[1:]\n"
        "run()\n"
    )
    env = {**os.environ, "REFQSR_ENGINE_CACHE": str(cache)}
    args = ["upscale", str(image), str(out), "--model", str(model), "--patch", str(PATCH), "--batch", str(BATCH)]
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert out.read_bytes() == b"an older output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]  # no temp file left
    # a temp file of a killed process (SIGKILL runs no cleanup) goes at the next write there
    dead = tmp_path / f".o.png.{2**22 + 12345}.tmp-abc.png"
    dead.write_bytes(b"x")
    alive = tmp_path / f".o.png.{os.getpid()}.tmp-def.png"
    alive.write_bytes(b"x")
    image_io.write_image(out, np.zeros((8, 8, 3), np.float32))
    assert not dead.exists() and alive.exists()


def test_json_output_draws_no_progress_bars(compiled, tmp_path):
    proc = _upscale(compiled, compiled[2], tmp_path / "o.png", "--json")
    assert proc.returncode == 0 and "patch/s" not in proc.stderr and "%|" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["lr_size"] == [48, 64] and not math.isnan(report["bitops"]["bitops_g"])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("engine", ["torch", "tvm"])
def test_a_model_file_that_would_run_code_is_refused(tmp_path, engine):
    import torch

    torch.save({"format": 1, "state_dict": {}, "card": _RunsCode()}, tmp_path / "evil.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from refqsr_engine.cli import run; run()",
            "upscale",
            str(_photo(tmp_path / "i.png")),
            str(tmp_path / "o.png"),
            "--model",
            str(tmp_path / "evil.pt"),
            "--engine",
            engine,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "REFQSR_ENGINE_CACHE": str(tmp_path / "c")},
        timeout=300,
    )
    one_line_error(proc, "evil.pt")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "o.png").exists()
