"""Scale-out on Ray: a folder of images upscaled by a pool of actors (``refqsr-engine upscale SRC DST
--ray [ADDRESS] --workers N``, or :func:`upscale_folder_on_ray`).

The images are a Ray Data dataset of (input, output) paths planned as the single-process run plans
them (:mod:`.folders`); ``map_batches`` with an actor class gives each worker one engine, loaded once:
the compiled artifact of its own machine's cache, compiled there on first use (or ``--artifact``,
which every worker must be able to read). Each actor writes its outputs itself, atomically, under the
same names as a single-process run. An actor that dies is restarted and its batch retried: a retried
image is written again whole, so no output is lost or duplicated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RefQSRError
from .folders import make_parent, plan_folder
from .upscale import UpscaleOptions, Upscaler


class UpscaleActor:
    """One engine per Ray worker; a batch is a few (input, output) rows."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.upscaler = Upscaler(UpscaleOptions(**options))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors, seconds = [], []
        for src, dst in zip(batch["input"], batch["output"]):
            t0 = time.perf_counter()
            try:
                make_parent(Path(dst))
                self.upscaler.upscale_file(src, dst)
                errors.append("")
            except RefQSRError as err:
                errors.append(str(err))
            seconds.append(time.perf_counter() - t0)
        return {**batch, "error": np.array(errors, dtype=object), "seconds": np.array(seconds)}


def _ray():
    try:
        import ray
    except ImportError:
        raise RefQSRError("--ray needs Ray: pip install 'refqsr-engine[ray]'") from None
    return ray


def _actor_options(opts: UpscaleOptions, workers: int, gpus_per_worker: float) -> tuple[UpscaleOptions, dict]:
    """The engine options of each actor and the resources and restarts it asks Ray for: the cores
    it runs on (``--threads``, default one: no oversubscription), a GPU each for CUDA artifacts, and
    a replacement when it dies (its work is run again; outputs are written whole)."""
    if workers < 1:
        raise RefQSRError(f"--workers must be at least 1, got {workers}")
    if opts.target == "cuda" and gpus_per_worker <= 0:
        gpus_per_worker = 1.0
    opts = dataclasses.replace(opts, threads=opts.threads or 1)
    resources = {"num_cpus": opts.threads, "num_gpus": gpus_per_worker or None, "max_restarts": -1}
    return opts, {**resources, "max_task_retries": -1}


@contextlib.contextmanager
def _ray_session(ray: Any, address: str | None) -> Iterator[None]:
    """Ray as the caller left it: a local instance or ``address`` is started (and stopped) here
    unless the process is connected already."""
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, ignore_reinit_error=True, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def upscale_folder_on_ray(
    src_dir: str | Path,
    dst_dir: str | Path,
    opts: UpscaleOptions,
    address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    ext: str | None = None,
    recursive: bool = False,
    skip_existing: bool = False,
    actor: type = UpscaleActor,
) -> dict[str, Any]:
    """Upscale a folder on a Ray cluster (``address``; None: a local one on this machine) with
    ``workers`` actors. Returns the report of the single-process folder mode (images, skipped,
    existing), with seconds per image as the actors measured them."""
    ray = _ray()
    opts, resources = _actor_options(opts, workers, gpus_per_worker)
    plan = plan_folder(src_dir, dst_dir, ext, recursive, skip_existing)
    skipped = [{"input": str(src), "error": why} for src, why in plan.refused]
    report: dict[str, Any] = {"images": [], "skipped": skipped, "existing": [str(p) for p in plan.existing]}
    if not plan.jobs:
        return report
    with _ray_session(ray, address):
        rows = [{"input": str(src), "output": str(dst)} for src, dst in plan.jobs]
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * workers))
        results = ds.map_batches(
            actor,
            fn_constructor_kwargs={"options": dataclasses.asdict(opts)},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            **resources,
        ).take_all()
    for r in sorted(results, key=lambda r: r["input"]):
        if r["error"]:
            report["skipped"].append({"input": r["input"], "error": r["error"]})
        else:
            report["images"].append({"input": r["input"], "output": r["output"], "seconds": float(r["seconds"])})
    report["workers"] = workers
    return report


class FrameActor:
    """One engine per Ray worker for a video's frames."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.upscaler = Upscaler(UpscaleOptions(**options))

    def upscale(self, rgb: np.ndarray) -> np.ndarray:
        return self.upscaler.upscale_rgb(rgb)[0]


class RayFrames:
    """A :class:`~refqsr_engine.engine.video.FrameMapper` over a pool of :class:`FrameActor`: frames go
    round-robin, two per actor in flight, and come back in order for the encoder."""

    def __init__(self, ray: Any, actors: list[Any]) -> None:
        self.ray, self.actors, self.sent = ray, actors, 0
        self.window = 2 * len(actors)

    def submit(self, rgb: np.ndarray) -> Any:
        actor = self.actors[self.sent % len(self.actors)]
        self.sent += 1
        return actor.upscale.remote(rgb)

    def result(self, handle: Any) -> np.ndarray:
        return self.ray.get(handle)


def upscale_video_on_ray(
    src: str | Path,
    dst: str | Path,
    opts: UpscaleOptions,
    address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    codec: str | None = None,
    crf: float | None = None,
    progress: Any = None,
    say: Any = None,
    actor: type = FrameActor,
) -> dict[str, Any]:
    """A video upscaled by ``workers`` Ray actors: this process decodes, sends the frames out
    (streamed: at most two per actor in flight, so memory stays bounded), encodes the results in
    order and copies the audio and subtitles, as :func:`~refqsr_engine.engine.video.upscale_video`.
    A dead actor is restarted and its frames upscaled again."""
    from .video import upscale_video

    ray = _ray()
    opts, resources = _actor_options(opts, workers, gpus_per_worker)
    with _ray_session(ray, address):
        remote = ray.remote(actor).options(**resources)
        pool = [remote.remote(dataclasses.asdict(opts)) for _ in range(workers)]
        try:
            report = upscale_video(src, dst, RayFrames(ray, pool), codec=codec, crf=crf, progress=progress, say=say)
        finally:
            for a in pool:
                ray.kill(a)
    report["workers"] = workers
    return report
