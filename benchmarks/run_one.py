"""One step of the latency benchmark in its own process, so that each configuration's peak memory
is its own; the result is one JSON object on stdout (everything else the libraries print goes to
stderr).

``python -m refqsr_engine.benchmarks.run_one prepare SPEC``
    builds/loads the models, compiles the artifacts and exports the ONNX graphs every configuration
    needs (cached) and writes the LR test images next to SPEC.
``python -m refqsr_engine.benchmarks.run_one measure SPEC NAME``
    times configuration NAME on every LR image of SPEC.

What ``measure`` times, per image size of the plan that lists the configuration (ascending): the
warm-up the plan asks for (``full``: the whole image, ``crop``: its top-left 2 x 2 patches,
``none``: the process is already warm from the smaller sizes), then runs of the whole pipeline on
the same image: at least one, at most ``repeats``, and no new one once ``budget_s`` seconds of
runs have passed (a time budget per configuration and size). A run is the wall time
(``time.perf_counter``) of ``run_patchwise`` (tile, network batches, blend-merge; RefQSR also
clusters), or for the whole-image PyTorch peer of one ``model(x)`` forward including the
numpy/tensor conversions. Every network call inside the runs is timed as well
(:class:`BatchTimer`), so one run of a large image gives many per-batch samples. Per-stage times come from
``PatchwiseResult.seconds``; the CPU time of the process during a run (``time.process_time``, all
threads) is kept too: CPU / wall near the thread count means the run had its cores to itself.
Loading the runner (model files, compiled libraries, ORT ``InferenceSession``) is
timed separately and not part of a run.

Peak memory: ``VmHWM`` of /proc/self/status (the process's resident high-water mark) after every
size, sizes in ascending order, before the untimed PyTorch-twin check; ``ru_maxrss`` of
``RUSAGE_SELF`` is recorded too, but on Linux it starts from the launching process's peak (it
survives fork and exec), which is why the launcher is kept small. ``baseline`` is the peak after
the imports the runner needs, before any model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import configs as C

PROGRESS = "[bench] "  # stderr lines the parent passes on to its user


def progress(msg: str) -> None:
    print(PROGRESS + msg, file=sys.stderr, flush=True)


def summarize(times: list[float]) -> dict[str, float]:
    """median, p90 (linear interpolation between repeats), min and mean of run times in seconds."""
    arr = np.asarray(times, dtype=np.float64)
    return {
        "median": float(np.median(arr)),
        "p90": float(np.percentile(arr, 90)),
        "min": float(arr.min()),
        "mean": float(arr.mean()),
    }


def memory_mb() -> dict[str, float | None]:
    """Peak resident memory of this process so far (MB): VmHWM, ru_maxrss (self, children)."""
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1.0 / 1024.0 if sys.platform != "darwin" else 1.0 / (1024.0 * 1024.0)  # KB on Linux, bytes on macOS
    ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return {
        "peak_rss_mb": round(hwm if hwm is not None else ru_self, 1),
        "vm_hwm_mb": None if hwm is None else round(hwm, 1),
        "ru_maxrss_mb": round(ru_self, 1),
        "ru_maxrss_children_mb": round(ru_children, 1),
    }


def network_batches(n_patches: int, n_references: int | None, batch: int) -> int:
    """Network batches of one image: ceil(N / batch), or for RefQSR ceil(refs / batch) +
    ceil(queries / batch) (the ClustBlock's batches are not counted)."""
    if n_references is None:
        return math.ceil(n_patches / batch)
    return math.ceil(n_references / batch) + math.ceil((n_patches - n_references) / batch)


def to_8bit(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.int16)


def compare_8bit(got: np.ndarray, want: np.ndarray, max_fraction: float = 1e-3) -> dict[str, Any]:
    """Two 8-bit images agree when at most ``max_fraction`` of their values differ by more than 1."""
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    frac = float(np.mean(diff > 1))
    return {"max_abs_diff_8bit": int(diff.max()), "frac_over_1lsb": frac, "within_1lsb": frac <= max_fraction}


class BatchTimer:
    """A ``PatchRunner`` that forwards every call to ``runner`` and records (stage, patches,
    seconds) of each network call: the per-batch samples of the latency table."""

    STAGES = {"sr": "sr", "logits": "cluster", "reference": "reference", "query": "query"}

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.refqsr = runner.refqsr
        self.scale = runner.scale
        self.calls: list[tuple[str, int, float]] = []

    def _timed(self, name: str, *args: Any) -> Any:
        t = time.perf_counter()
        out = getattr(self.runner, name)(*args)
        self.calls.append((self.STAGES[name], int(args[0].shape[0]), time.perf_counter() - t))
        return out

    def sr(self, x: np.ndarray) -> np.ndarray:
        return self._timed("sr", x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._timed("logits", x)

    def reference(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return self._timed("reference", x)

    def query(self, x: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
        return self._timed("query", x, features)

    def cluster(self, v: np.ndarray) -> Any:
        return self.runner.cluster(v)


def batch_stats(calls: list[tuple[str, int, float]], batch: int) -> dict[str, dict[str, Any]]:
    """Per stage: median / p90 / min ms over the full batches (``batch`` patches), and how many
    full and short (last, partial) batches there were; stages with no full batch use all calls."""
    out: dict[str, dict[str, Any]] = {}
    for stage in sorted({c[0] for c in calls}):
        mine = [c for c in calls if c[0] == stage]
        full = [c[2] for c in mine if c[1] == batch]
        samples = full or [c[2] for c in mine]
        stats = summarize(samples)
        out[stage] = {
            "full_batches": len(full),
            "short_batches": len(mine) - len(full),
            "patches_per_sample": batch if full else round(float(np.mean([c[1] for c in mine])), 2),
            **{f"{k}_ms": round(1000 * v, 3) for k, v in stats.items() if k != "mean"},
        }
    return out


def run_once(runner: Any, lr: np.ndarray, patch: int, overlap: int, batch: int) -> dict[str, Any]:
    """Time one run of a runner on one LR image; returns seconds, stage seconds, the HR image and
    the patch/clustering counts."""
    if isinstance(runner, C.WholeImage):
        t, cpu = time.perf_counter(), time.process_time()
        image = runner(lr)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        return {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "stages": {"forward": seconds},
            "image": image,
            "patches": None,
            "references": None,
            "clustering": None,
        }
    from ..pipeline.patchwise import run_patchwise

    t, cpu = time.perf_counter(), time.process_time()
    result = run_patchwise(runner, lr, patch, overlap, batch)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    cl = result.clustering
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "stages": dict(result.seconds),
        "image": result.image,
        "patches": result.grid.num_patches,
        "references": None if cl is None else cl.num_references,
        "clustering": cl,
    }


def twin_check(
    prepared: dict[str, Any], lr: np.ndarray, got: dict[str, Any], patch: int, overlap: int, batch: int
) -> dict[str, Any]:
    """Run the PyTorch model the configuration was built from (same file, same grid) once, untimed
    as a benchmark, and compare its 8-bit HR image with the configuration's (``got["hr"]``, a
    saved 8-bit image; ``got["reference_of"]``, its clustering)."""
    from ..models.patchwise import TorchRunner
    from ..pipeline.patchwise import run_patchwise

    model, bits = C.load_torch(prepared["model_path"])
    t = time.perf_counter()
    want = run_patchwise(TorchRunner(model, bits), lr, patch, overlap, batch)
    twin_seconds = time.perf_counter() - t
    out = {**compare_8bit(np.load(got["hr"]), to_8bit(want.image)), "twin_seconds": round(twin_seconds, 4)}
    if got["reference_of"] is not None:
        out["same_clustering"] = bool(np.array_equal(got["reference_of"], np.asarray(want.clustering.reference_of)))
    return out


def _warmup_image(lr: np.ndarray, mode: str, patch: int, overlap: int) -> np.ndarray:
    if mode == "crop":  # 2 x 2 patches: every stage runs once, at a fraction of the image's cost
        side = 2 * patch - overlap
        return np.ascontiguousarray(lr[:, : min(lr.shape[1], side), : min(lr.shape[2], side)])
    return lr


def measure(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """Time configuration ``name`` on every size of ``spec`` (see the module docstring)."""
    cfg = next(c for c in spec["configs"] if c["name"] == name)
    prepared = spec["prepared"][name]
    threads, patch, overlap, batch = spec["threads"], spec["patch"], spec["overlap"], spec["batch"]
    import torch  # every runner goes through the patch-wise code, which imports torch

    if cfg["runner"] == "tvm":
        import tvm  # noqa: F401
        from tvm import relax  # noqa: F401
    elif cfg["runner"] == "ort":
        import onnxruntime  # noqa: F401
    from ..models import patchwise  # noqa: F401

    torch.set_num_threads(threads)
    baseline = memory_mb()
    t = time.perf_counter()
    runner = C.build_runner(cfg, prepared, threads, spec["work"])
    load_seconds = time.perf_counter() - t
    record: dict[str, Any] = {
        "name": name,
        "ok": True,
        "load_seconds": round(load_seconds, 4),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "baseline_rss_mb": baseline["peak_rss_mb"],
        "sizes": {},
    }
    if isinstance(runner, C.OrtRunner):
        record["ort_optimized_ops"] = runner.optimized_ops
        record["ort_integer_ops"] = runner.integer_ops
    checks: dict[str, dict[str, Any]] = {}
    timer = None if isinstance(runner, C.WholeImage) else BatchTimer(runner)
    warm = False
    rate = None  # seconds per LR pixel of the last size timed: predicts the next size's run
    for size in spec["sizes"]:
        if name not in size.get("configs", [name]):
            continue
        key = size["size"]
        deadline = spec.get("deadline")
        if deadline and rate is not None:
            predicted = rate * size["width"] * size["height"]
            if time.time() + predicted > deadline:  # the suite's time budget: a later size would overrun it
                record["sizes"][key] = {
                    "skipped": f"one run predicted at {predicted:.0f} s would end past the suite's time budget"
                }
                continue
        lr = np.load(spec["images"][key])
        warmup = size["warmup"] if size["warmup"] != "none" or warm else "crop"  # first size of this config
        if warmup != "none":
            run_once(timer or runner, _warmup_image(lr, warmup, patch, overlap), patch, overlap, batch)
        warm = True
        if timer is not None:
            timer.calls.clear()
        runs: list[dict[str, Any]] = []
        budget = math.inf if size.get("budget_s") is None else float(size["budget_s"])
        started = time.perf_counter()
        # another run only if it is expected to end within the budget (runs of one image take alike)
        while not runs or (
            len(runs) < size["repeats"] and time.perf_counter() - started + runs[-1]["seconds"] <= budget
        ):
            run = run_once(timer or runner, lr, patch, overlap, batch)
            image, clustering = run.pop("image"), run.pop("clustering")  # keep one HR image at a time
            runs.append(run)
        last = runs[-1]
        check = size.get("check")
        # parked on disk, compared at the end; ORT's own quantization has no PyTorch twin
        if check and cfg["runner"] in C.TWIN_CHECKED and not cfg.get("ort_quant"):
            if check == "crop":  # the twin on 2 x 2 patches only: the full image's twin run costs a run
                crop = run_once(runner, _warmup_image(lr, "crop", patch, overlap), patch, overlap, batch)
                image, clustering = crop["image"], crop["clustering"]
            hr_path = Path(spec["work"]) / f"hr_{name}_{key}.npy"
            np.save(hr_path, to_8bit(image))
            checks[key] = {
                "hr": hr_path,
                "on": "image" if check is True or check == "image" else "crop",
                "reference_of": None if clustering is None else np.asarray(clustering.reference_of),
            }
        del image, clustering
        stats = summarize([r["seconds"] for r in runs])
        n_batches = None if last["patches"] is None else network_batches(last["patches"], last["references"], batch)
        stages = sorted({k for r in runs for k in r["stages"]})
        record["sizes"][key] = {
            "repeats": len(runs),
            "max_repeats": size["repeats"],
            "budget_s": size.get("budget_s"),
            "warmup": warmup,
            "times": [round(r["seconds"], 5) for r in runs],
            "batches": None if timer is None else batch_stats(timer.calls, batch),
            **{k: round(v, 5) for k, v in stats.items()},
            "stages": {k: round(float(np.median([r["stages"].get(k, 0.0) for r in runs])), 5) for k in stages},
            "patches": last["patches"],
            "references": last["references"],
            "network_batches": n_batches,
            "per_batch": None if n_batches is None else round(stats["median"] / n_batches, 5),
            "cpu_seconds_median": round(float(np.median([r["cpu_seconds"] for r in runs])), 5),
            "peak_rss_mb_so_far": memory_mb()["peak_rss_mb"],
        }
        rate = stats["median"] / (size["width"] * size["height"])
    record["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    record.update(memory_mb())
    record["peak_rss_delta_mb"] = round(record["peak_rss_mb"] - baseline["peak_rss_mb"], 1)
    del runner
    for key, got in checks.items():  # after the memory figures: the twin is not part of this configuration
        lr = np.load(spec["images"][key])
        if got["on"] == "crop":
            lr = _warmup_image(lr, "crop", patch, overlap)
        record["sizes"][key]["check"] = {**twin_check(prepared, lr, got, patch, overlap, batch), "on": got["on"]}
    return record


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the LR images next to the spec and prepare every configuration's model files."""
    t = time.perf_counter()
    work = Path(spec["work"])
    images = {}
    for size in spec["sizes"]:
        path = work / f"lr_{size['size']}.npy"
        np.save(path, C.make_lr(size["width"], size["height"]))
        images[size["size"]] = str(path)
    prepared = C.prepare_all(spec["configs"], spec["n_blocks"], spec["patch"], spec["batch"], spec["threads"], progress)
    return {"images": images, "prepared": prepared, "seconds": round(time.perf_counter() - t, 2)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("prepare", "measure") or (argv[0] == "measure" and len(argv) != 3):
        print("usage: run_one prepare SPEC | run_one measure SPEC NAME", file=sys.stderr)
        return 2
    out_fd = os.dup(1)  # the JSON answer goes here; anything printed while working goes to stderr
    os.dup2(2, 1)
    spec = json.loads(Path(argv[1]).read_text())
    result = prepare(spec) if argv[0] == "prepare" else measure(spec, argv[2])
    sys.stdout.flush()
    with os.fdopen(out_fd, "w") as out:
        out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
