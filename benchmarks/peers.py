"""The guard's peers check: the engine's network time against int8 and fp32 peers, with each
one's PSNR-Y beside its speed.

The engine is the default model compiled for this CPU; its *network time* is the time of its
compiled graph calls (``run_patchwise``'s "reference", "query" or "sr" seconds) on the 96-px
patches of the 320x180 LR image, without clustering (ClustBlock and assignment) and merging.
Every patch peer runs the same patches (``pipeline.tiling`` grid), in batches of the engine's
size, and is timed over its graph calls only:

``ov_int8``         ONNX Runtime's static QDQ int8 quantization of the FP SRResNet (every conv and
                    what ORT quantizes with them), compiled by OpenVINO's CPU plugin;
``ov_int8_split``   the same with QDQ only around the residual blocks' convs (the engine's split:
                    head, body-end conv, upsampler, tail and skip paths fp32);
``ort_int8``, ``ort_int8_split``  the same two graphs on ONNX Runtime;
``ov_fp32``         the FP graph on OpenVINO (fp32);
``torch_fp32``      PyTorch eager fp32 of the FP SRResNet, one forward over the whole image.

Ratio: peer time / engine network time (median of alternated runs). Quality: mean PSNR-Y (Y,
shave 4) over a folder of HR photos (LR by the project's bicubic degradation), each runner on
its graph patch-wise as timed (the PyTorch peer on whole images); cached per runner and graph
hash, since it does not change between runs.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: name -> (label, runtime, graph); graph: "fp32", "int8" (whole network) or "int8-split"
PEERS: dict[str, tuple[str, str, str]] = {
    "ov_int8": ("OpenVINO int8 (ORT static QDQ, whole network)", "openvino", "int8"),
    "ov_int8_split": ("OpenVINO int8, engine's split (QDQ on the body convs)", "openvino", "int8-split"),
    "ort_int8": ("ONNX Runtime int8 (static QDQ, whole network)", "ort", "int8"),
    "ort_int8_split": ("ONNX Runtime int8, engine's split", "ort", "int8-split"),
    "ov_fp32": ("OpenVINO fp32", "openvino", "fp32"),
    "torch_fp32": ("PyTorch eager fp32 (whole image)", "torch-whole", "fp32"),
}
QUALITY_CACHE = "guard_quality.json"  # under configs.bench_cache()
NETWORK_STAGES = ("reference", "query", "sr")


def check_name(peer: str) -> str:
    return f"peer_{peer}"


def prepare_graphs(patch: int) -> dict[str, str]:
    """The three ONNX graphs of the FP SRResNet (exported and quantized once, cached)."""
    from .configs import fp_source, prepare_onnx, prepare_ort_static

    fp = prepare_onnx(str(fp_source()), patch)["onnx"]
    return {
        "fp32": fp,
        "int8": prepare_ort_static(fp, patch)["onnx"],
        "int8-split": prepare_ort_static(fp, patch, split=True)["onnx"],
    }


def make_runner(peer: str, graphs: dict[str, str], threads: int, batch: int, patch: int, scratch: str) -> Any:
    """The runner of one peer, or a one-line string saying why it cannot run here."""
    _, runtime, graph = PEERS[peer]
    if runtime == "openvino":
        from .ov_runner import OvRunner, openvino_missing

        missing = openvino_missing()
        return missing if missing else OvRunner(graphs[graph], threads, batch, patch)
    if runtime == "ort":
        from .configs import OrtRunner

        return OrtRunner(graphs[graph], threads, str(Path(scratch) / f"{peer}.onnx"))
    from .configs import WholeImage, fp_source, load_torch

    return WholeImage(load_torch(str(fp_source()))[0].eval())


def kernels(runner: Any) -> str:
    """What shows which kernels a peer ran: OpenVINO's conv primitives, ORT's integer ops."""
    if hasattr(runner, "conv_primitives"):
        return ", ".join(f"{n} {k}" for k, n in runner.conv_primitives().items())
    if getattr(runner, "optimized_ops", None):
        from .configs import INTEGER_OPS

        ops = runner.optimized_ops
        ints = {k: v for k, v in ops.items() if k in INTEGER_OPS}
        return ", ".join(f"{n} {k}" for k, n in ints.items()) or f"no integer ops, {ops.get('Conv', 0)} Conv"
    return ""


def network_seconds(seconds: dict[str, float]) -> float:
    """The graph calls' share of a ``run_patchwise`` result's stage seconds."""
    return sum(seconds.get(k, 0.0) for k in NETWORK_STAGES)


def time_alternated(fns: dict[str, Callable[[], float]], runs: int) -> dict[str, float]:
    """Median seconds of each timing function (each returns the seconds it measured), after one
    warm-up call each, the functions alternated within every run."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            times[k].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# quality


def image_set_digest(folder: Path) -> str:
    """A digest of the photos of ``folder`` (names and contents): the quality cache's key part."""
    from ..training.datasets import find_images

    h = hashlib.sha256()
    for path in find_images(folder):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def mean_psnr_y(upscale: Callable[[np.ndarray], np.ndarray], folder: Path) -> float:
    """Mean PSNR-Y (shave 4) of ``upscale`` (LR C x H x W float in [0, 1] -> HR C x 4H x 4W) over
    the photos of ``folder``."""
    from ..metrics import psnr_y, sr_to_uint8
    from .valdata import folder_pairs

    scores = []
    for pair in folder_pairs(folder):
        lr = np.ascontiguousarray(pair.lr.transpose(2, 0, 1), dtype=np.float32) / 255.0
        scores.append(psnr_y(sr_to_uint8(upscale(lr)), pair.hr, 4))
    return float(np.mean(scores))


class QualityCache:
    """Mean PSNR-Y per (runner, graph hash, image set), kept in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute: Callable[[], float]) -> tuple[float, bool]:
        """(PSNR-Y, computed now)."""
        if key in self.data:
            return self.data[key], False
        value = compute()
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)
        return value, True


def patchwise_upscale(runner: Any, patch: int, overlap: int, batch: int) -> Callable[[np.ndarray], np.ndarray]:
    from ..pipeline.patchwise import run_patchwise

    return lambda lr: run_patchwise(runner, lr, patch, overlap, batch).image


# ---------------------------------------------------------------------------------------------
# the check


def peers_check(
    threads: int,
    quality_dir: Path | None,
    runs: int = 3,
    say: Callable[[str], None] = lambda msg: None,
) -> dict[str, dict[str, Any]]:
    """One measurement per peer (``check_name(peer)`` -> {ratio, seconds, psnr_y, kernels, ...} or
    {skipped}); ``engine_network`` holds the engine's own times and PSNR-Y."""
    import torch

    from ..engine.artifact import sha256_file
    from ..engine.upscale import DEFAULT_BATCH, DEFAULT_PATCH, UpscaleOptions, compiled_engine
    from ..pipeline.patchwise import run_patchwise
    from ..pipeline.tiling import extract_patches, make_grid
    from .configs import bench_cache, fp_source, make_lr

    torch.set_num_threads(threads)
    opts = UpscaleOptions(threads=threads, patch=DEFAULT_PATCH, batch=DEFAULT_BATCH)
    engine, _ = compiled_engine(opts, say)
    patch, batch, overlap = engine.patch, engine.batch, opts.overlap
    lr = make_lr(320, 180)
    grid = make_grid(lr.shape[1], lr.shape[2], patch, overlap)
    x = np.ascontiguousarray(extract_patches(lr, grid), dtype=np.float32)
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    graphs = prepare_graphs(patch)

    runners: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="guard-peers-") as scratch:  # ORT's optimized graphs, read at load
        for peer in PEERS:
            say(f"peers: preparing {peer}")
            runner = make_runner(peer, graphs, threads, batch, patch, scratch)
            if isinstance(runner, str):
                out[check_name(peer)] = {"skipped": runner}
            else:
                runners[peer] = runner

    stages: dict[str, float] = {}

    def engine_network() -> float:
        seconds = run_patchwise(engine, lr, patch, overlap, batch).seconds
        stages.update(seconds)
        return network_seconds(seconds)

    def timer(peer: str) -> Callable[[], float]:
        runner = runners[peer]
        whole = PEERS[peer][1] == "torch-whole"

        def timed() -> float:
            t = time.perf_counter()
            if whole:
                runner(lr)
            else:
                for b in batches:
                    runner.sr(b)
            return time.perf_counter() - t

        return timed

    say(f"peers: timing the engine and {len(runners)} peer(s) on {grid.num_patches} patches, {runs} runs")
    fns = {"engine": engine_network, **{peer: timer(peer) for peer in runners}}
    med = time_alternated(fns, runs)
    engine_s = med["engine"]
    out["engine_network"] = {
        "seconds": engine_s,
        "cluster_s": stages.get("cluster", 0.0),
        "merge_s": stages.get("merge", 0.0),
        "patches": grid.num_patches,
        "model": Path(engine.manifest["model"]["file"]).stem,
    }
    for peer, runner in runners.items():
        out[check_name(peer)] = {
            "ratio": med[peer] / engine_s,
            "seconds": med[peer],
            "kernels": kernels(runner),
        }

    out = {"engine_network": out["engine_network"], **{check_name(p): out[check_name(p)] for p in PEERS}}
    if quality_dir is None:
        return out
    cache = QualityCache(bench_cache() / QUALITY_CACHE)
    images = image_set_digest(quality_dir)
    key = f"engine:{Path(engine.artifact.path).name}:{images}"
    say("peers: PSNR-Y of the engine (cached after the first run)")
    out["engine_network"]["psnr_y"] = cache.get(
        key, lambda: mean_psnr_y(patchwise_upscale(engine, patch, overlap, batch), quality_dir)
    )[0]
    for peer, runner in runners.items():
        _, runtime, graph = PEERS[peer]
        source = graphs[graph] if runtime != "torch-whole" else str(fp_source())
        key = f"{runtime}:{sha256_file(source)[:16]}:{images}"
        say(f"peers: PSNR-Y of {peer} (cached after the first run)")

        def compute(peer: str = peer, runner: Any = runner, graph: str = graph) -> float:
            runtime = PEERS[peer][1]
            if runtime == "torch-whole":
                return mean_psnr_y(runner, quality_dir)
            if runtime == "openvino":  # one patch per call: no padded patches on small images
                from .ov_runner import OvRunner

                runner = OvRunner(graphs[graph], threads, 1, patch)
                return mean_psnr_y(patchwise_upscale(runner, patch, overlap, 1), quality_dir)
            return mean_psnr_y(patchwise_upscale(runner, patch, overlap, batch), quality_dir)

        out[check_name(peer)]["psnr_y"] = cache.get(key, compute)[0]
    return out
