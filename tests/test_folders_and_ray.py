"""Folder mode: --recursive mirrors the source tree, --skip-existing leaves existing outputs alone;
and the same job on a local Ray cluster (2 actors) gives byte-identical outputs, also when a worker
dies mid-job (Ray restarts it and retries its batch: nothing lost, nothing duplicated)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from compile_helpers import PATCH, small_refqsr
from PIL import Image
from refqsr_engine.models.checkpoint import save_model

BATCH = 4


def cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "REFQSR_ENGINE_CACHE": str(cache)}
    cmd = [sys.executable, "-c", "from refqsr_engine.cli import run; run()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A model file, a warm cache for it, and a source tree: 2 images at the top, 2 in a/, 1 in a/b/,
    a hidden folder and a text file that are not images."""
    from skimage import data

    root = tmp_path_factory.mktemp("folders")
    model = root / "m.pt"
    save_model(model, small_refqsr("pams", seed=6), {}, half=False)
    src = root / "src"
    photo = Image.fromarray(data.astronaut())
    for i, rel in enumerate(["x.png", "y.jpg", "a/z.png", "a/w.webp", "a/b/v.png", ".hidden/u.png"]):
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.crop((40 * i, 30 * i, 40 * i + 56, 30 * i + 40)).save(path)
    (src / "a" / "notes.txt").write_text("not an image")
    args = ["--model", str(model), "--patch", str(PATCH), "--batch", str(BATCH)]
    warm = cli("upscale", str(src / "x.png"), str(root / "warm.png"), *args, cache=root / "cache")
    assert warm.returncode == 0, warm.stderr
    return src, args, root / "cache"


def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_recursive_mirrors_the_tree_and_skip_existing_leaves_outputs_alone(tree, tmp_path):
    src, args, cache = tree
    flat = cli("upscale", str(src), str(tmp_path / "flat"), *args, "--json", cache=cache)
    assert flat.returncode == 0, flat.stderr
    assert sorted(_outputs(tmp_path / "flat")) == ["x.png", "y.jpg"]
    out = tmp_path / "deep"
    proc = cli("upscale", str(src), str(out), *args, "--recursive", "--json", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert sorted(_outputs(out)) == ["a/b/v.png", "a/w.webp", "a/z.png", "x.png", "y.jpg"]
    assert Image.open(out / "a" / "b" / "v.png").size == (56 * 4, 40 * 4)
    (out / "a" / "z.png").write_bytes(b"kept")
    again = cli("upscale", str(src), str(out), *args, "--recursive", "--skip-existing", "--json", cache=cache)
    report = json.loads(again.stdout)
    assert again.returncode == 0 and len(report["existing"]) == 5 and report["images"] == []
    assert (out / "a" / "z.png").read_bytes() == b"kept"
    # an output folder inside the source tree is not read as input
    inside = cli("upscale", str(src), str(src / "a" / "out"), *args, "-r", "--json", cache=cache)
    assert inside.returncode == 0 and len(json.loads(inside.stdout)["images"]) == 5
    shutil.rmtree(src / "a" / "out")


def test_folder_options_need_a_folder(tree, tmp_path):
    src, args, cache = tree
    proc = cli("upscale", str(src / "x.png"), str(tmp_path / "o.png"), *args, "--recursive", cache=cache)
    assert proc.returncode == 2 and "folder mode only" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


class DiesOnce:
    """UpscaleActor whose process dies (os._exit) at its first image that names a marker file which
    does not exist yet; the marker makes the retry succeed."""

    def __init__(self, options, marker):
        from refqsr_engine.engine.distributed import UpscaleActor

        self.inner = UpscaleActor(options)
        self.marker = Path(marker)

    def __call__(self, batch):
        if any(str(s).endswith("z.png") for s in batch["input"]) and not self.marker.exists():
            self.marker.write_text("died once")
            os._exit(1)
        return self.inner(batch)


def test_ray_outputs_equal_the_single_process_run_even_when_a_worker_dies(tree, tmp_path, ray_local, monkeypatch):
    from ray import cloudpickle
    from refqsr_engine.engine import distributed
    from refqsr_engine.engine.upscale import UpscaleOptions

    src, args, cache = tree
    monkeypatch.setenv("REFQSR_ENGINE_CACHE", str(cache))  # the workers inherit it: the engine is cached
    single = tmp_path / "single"
    assert cli("upscale", str(src), str(single), *args, "-r", cache=cache).returncode == 0
    opts = UpscaleOptions(model=args[1], patch=PATCH, batch=BATCH, threads=1)
    report = distributed.upscale_folder_on_ray(src, tmp_path / "ray", opts, workers=2, recursive=True)
    assert len(report["images"]) == 5 and report["skipped"] == []
    assert _outputs(tmp_path / "ray") == _outputs(single)
    # a worker that dies mid-job: Ray restarts it and retries; every output once, identical
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "died"

    class Actor(DiesOnce):
        def __init__(self, options):
            super().__init__(options, marker)

    report = distributed.upscale_folder_on_ray(src, tmp_path / "ray2", opts, workers=2, recursive=True, actor=Actor)
    assert marker.exists() and len(report["images"]) == 5
    assert _outputs(tmp_path / "ray2") == _outputs(single)
    assert not [p for p in (tmp_path / "ray2").rglob(".*")]  # no temp file of the dead worker left


def test_cli_upscales_a_video_through_the_engine_and_keeps_its_audio(tree, tmp_path):
    """`upscale clip.mp4 out.mp4` with the compiled engine: every frame x4, the rate and the audio
    packets kept (the container handling itself is tested in test_video.py)."""
    import av
    import numpy as np
    from test_video import decoded, make_clip, packets, psnr

    src, args, cache = tree
    clip = make_clip(tmp_path / "clip.mp4", frames=6)
    proc = cli("upscale", str(clip), str(tmp_path / "out.mp4"), *args, "--json", cache=cache)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["frames"] == 6 and report["scale"] == 4 and report["audio_streams_copied"] == 1
    assert packets(clip, "audio") == packets(tmp_path / "out.mp4", "audio")
    with av.open(str(clip)) as a, av.open(str(tmp_path / "out.mp4")) as b:
        va, vb = a.streams.video[0], b.streams.video[0]
        assert (vb.width, vb.height) == (4 * va.width, 4 * va.height) and va.average_rate == vb.average_rate
    # a frame of the video equals the engine's image of the same decoded frame (up to the codec)
    first_in, first_out = decoded(clip)[0][1], decoded(tmp_path / "out.mp4")[0][1]
    Image.fromarray(first_in).save(tmp_path / "f.png")
    assert cli("upscale", str(tmp_path / "f.png"), str(tmp_path / "f4.png"), *args, cache=cache).returncode == 0
    assert psnr(first_out, np.asarray(Image.open(tmp_path / "f4.png"))) > 30
    bad = cli("upscale", str(clip), str(tmp_path / "o2.mp4"), *args, "--recursive", cache=cache)
    assert bad.returncode == 2 and "not videos" in bad.stderr
    bad = cli("upscale", str(src / "x.png"), str(tmp_path / "o.png"), *args, "--crf", "20", cache=cache)
    assert bad.returncode == 2 and "apply to videos" in bad.stderr


class FrameDiesOnce:
    """FrameActor whose process dies (os._exit) at its third frame while a marker file does not
    exist yet; the marker makes the retried call succeed."""

    def __init__(self, options, marker):
        from refqsr_engine.engine.distributed import FrameActor

        self.inner = FrameActor(options)
        self.marker, self.seen = Path(marker), 0

    def upscale(self, rgb):
        self.seen += 1
        if self.seen == 3 and not self.marker.exists():
            self.marker.write_text("died once")
            os._exit(1)
        return self.inner.upscale(rgb)


def test_a_video_on_ray_equals_the_single_process_run_even_when_a_worker_dies(tree, tmp_path, ray_local, monkeypatch):
    from ray import cloudpickle
    from refqsr_engine.engine import distributed
    from refqsr_engine.engine.upscale import UpscaleOptions
    from test_video import decoded, make_clip, packets

    src, args, cache = tree
    monkeypatch.setenv("REFQSR_ENGINE_CACHE", str(cache))
    clip = make_clip(tmp_path / "clip.mp4", frames=10)
    single = cli("upscale", str(clip), str(tmp_path / "single.mp4"), *args, cache=cache)
    assert single.returncode == 0, single.stderr
    opts = UpscaleOptions(model=args[1], patch=PATCH, batch=BATCH, threads=1)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "died"

    class Actor(FrameDiesOnce):
        def __init__(self, options):
            super().__init__(options, marker)

    done = []
    report = distributed.upscale_video_on_ray(
        clip, tmp_path / "ray.mp4", opts, workers=2, actor=Actor, progress=lambda n, total: done.append(n)
    )
    assert marker.exists() and report["frames"] == 10 and report["workers"] == 2 and done == list(range(1, 11))
    got, want = decoded(tmp_path / "ray.mp4"), decoded(tmp_path / "single.mp4")
    assert [p for p, _ in got] == [p for p, _ in want]  # the same frames, in order
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want))
    assert packets(tmp_path / "ray.mp4", "audio") == packets(clip, "audio")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
