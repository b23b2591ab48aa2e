"""Latency and peak-memory benchmark of the compiled engine against its peers.

    python -m refqsr_engine.benchmarks.latency [--quick] [--threads 2] [--out benchmarks/results]
        [--sizes WxH ...] [--repeats N] [--budget S] [--configs NAME ...] [--check crop|smallest|all|none]

The same LR image (a crop/resize of a scikit-image photo) and the same patch grid go through every
configuration of :mod:`.configs`. This process stays small (no torch/TVM import): one child
process prepares every model (compiled artifacts and ONNX graphs are cached under
``cache_dir()/bench``; the first run compiles five 16-block artifacts, minutes each), then every
configuration is timed in its own child (:mod:`.run_one`), so that its peak memory is its own.
What a run times is described in :mod:`.run_one`; results go to ``<out>/latency.json`` and
``latency.md`` (``latency-quick.*`` for ``--quick``) via :mod:`.report`.

The default plan (:data:`PLAN`) is sized for the 20-minute suite on an idle 2-core CPU, where one
96 x 96 batch of 16 patches through a 16-block network takes ~9-14 s (2 threads): every
configuration at 320x180 (warm-up on a 2 x 2-patch crop, then up to 3 runs within a 20 s
budget; ~4 min in all); the engine's RefQSR 8-4, DDTB-8 and fp32, PyTorch eager and ONNX Runtime
int8 at 512x270 (one run; ~1 min); the engine's RefQSR 8-4 and DDTB-8 and PyTorch eager at
1024x540 (one run each, 72 patches; ~2.5 min). Per-batch medians/p90/min come from the
network calls inside the runs (a 1024x540 run gives 4 full reference/query batches and more).
``--sizes`` replaces the plan by every configuration at every size given. Outputs of the engine
and ONNX Runtime are compared with their PyTorch twin on a 2 x 2-patch crop of the smallest image
(``--check``). ``--quick`` (the test's smoke run): one 96x64 image (20 patches), 4-block models,
patch 24, batch 1 (one compiled batch size per graph keeps compiling short), 1 run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from . import configs as C
from . import report
from .run_one import PROGRESS

DEFAULT_SIZES = ["320x180", "512x270", "1024x540"]
#: The default plan: per LR size, the configurations timed there (None: all), the most runs and
#: the seconds of runs allowed per configuration (a run that would end past it is not started).
PLAN: list[dict[str, Any]] = [
    {"size": "320x180", "configs": None, "repeats": 3, "budget_s": 20.0},
    {
        "size": "512x270",
        "configs": ["engine-refqsr-8-4", "engine-ddtb-8", "engine-fp32", "torch-whole-fp32", "ort-int8"],
        "repeats": 1,
        "budget_s": None,
    },
    {
        "size": "1024x540",
        "configs": ["engine-refqsr-8-4", "engine-ddtb-8", "torch-whole-fp32"],
        "repeats": 1,
        "budget_s": None,
    },
]
QUICK = {"sizes": ["96x64"], "n_blocks": 4, "repeats": 1, "patch": 24, "overlap": 6, "batch": 1}
FULL = {"n_blocks": 16, "patch": 96, "overlap": 6, "batch": 16}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return w, h


def default_repeats(width: int, height: int) -> int:
    """3 timed runs up to 320x180 LR pixels, 1 above (a 1024x540 run of one 16-block
    configuration takes over a minute on a 2-core CPU)."""
    return 3 if width * height <= 320 * 180 else 1


def plan_sizes(
    sizes: list[str] | None,
    repeats: int | None,
    warmup: str,
    check: str,
    budget: float | None = None,
    configs: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Sizes in ascending pixel count (peak memory is read after each), each with the
    configurations timed there, most runs, time budget, warm-up kind and twin check.

    ``sizes`` None: :data:`PLAN` (restricted to ``configs`` when given); else every configuration
    at every size with ``repeats`` (default: :func:`default_repeats`) and ``budget``.
    Warm-up ``auto``: one per process, on a crop of 2 x 2 patches of the first size the process
    times; later sizes run in the already warm process (``"none"``). ``full`` / ``crop``: that
    warm-up before every size. Check ``crop``/``smallest``: the twin check on the smallest size
    (on its 2 x 2-patch crop / on the whole image); ``all``: the whole image at every size."""
    names = configs or C.config_names()
    if sizes is None:
        rows = [{**row, "configs": [n for n in names if row["configs"] is None or n in row["configs"]]} for row in PLAN]
        rows = [r for r in rows if r["configs"]]
        if repeats:
            rows = [{**r, "repeats": repeats} for r in rows]
        if budget is not None:
            rows = [{**r, "budget_s": budget} for r in rows]
    else:
        rows = [{"size": s, "configs": list(names), "repeats": repeats, "budget_s": budget} for s in sizes]
    parsed = sorted(((parse_size(r["size"]), r) for r in rows), key=lambda t: (t[0][0] * t[0][1], t[0]))
    plan = []
    for i, ((w, h), row) in enumerate(parsed):
        checked: str | bool = False
        if check == "all":
            checked = "image"
        elif check in ("crop", "smallest") and i == 0:
            checked = "crop" if check == "crop" else "image"
        plan.append(
            {
                "size": f"{w}x{h}",
                "width": w,
                "height": h,
                "configs": row["configs"],
                "repeats": row["repeats"] or default_repeats(w, h),
                "budget_s": row["budget_s"],
                "warmup": ("crop" if i == 0 else "none") if warmup == "auto" else warmup,
                "check": checked,
            }
        )
    return plan


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def machine_info() -> dict[str, Any]:
    """CPU model and flags (/proc/cpuinfo), CPUs, memory, load and library versions (no imports)."""
    cpu, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gb = None
    try:
        kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        mem_gb = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gb": mem_gb,
        "isa": sorted(flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"}),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in (
                "refqsr-engine",
                "torch",
                "apache-tvm",
                "onnxruntime",
                "onnx",
                "numpy",
                "pillow",
                "matplotlib",
                "scikit-image",
            )
        },
    }


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "TVM_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def run_child(
    args: list[str], threads: int, timeout: float, log: Path, say: Callable[[str], None] | None = None
) -> tuple[dict[str, Any] | None, str]:
    """Run ``run_one`` with ``args``; (its JSON answer, "") or (None, the tail of its stderr).
    Its stderr goes to ``log``; lines starting with ``PROGRESS`` are also passed to ``say``."""
    cmd = [sys.executable, "-m", "refqsr_engine.benchmarks.run_one", *args]
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=_child_env(threads))
        killed = threading.Event()
        timer = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
        timer.start()
        try:
            for line in proc.stderr:
                err.write(line)
                if say is not None and line.startswith(PROGRESS):
                    say(line[len(PROGRESS) :].strip())
            proc.wait()
        except BaseException:  # interrupted: do not leave the child running
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        out.seek(0)
        answer = out.read()
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and "Warning:" not in ln]
    tail = " | ".join(lines[-3:])
    if proc.returncode != 0:
        return None, f"timed out after {timeout:.0f} s" if killed.is_set() else f"exit {proc.returncode}: {tail}"
    try:
        return json.loads(answer.strip().splitlines()[-1]), ""
    except (json.JSONDecodeError, IndexError):
        return None, f"no JSON answer: {tail}"


def run_benchmark(args: argparse.Namespace, say=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Prepare, measure every configuration in its own process, and assemble the results dict."""
    t0 = time.perf_counter()
    base = QUICK if args.quick else FULL
    settings = {
        "quick": bool(args.quick),
        "threads": args.threads,
        "photo": C.PHOTO,
        "n_blocks": args.n_blocks or base["n_blocks"],
        "patch": args.patch or base["patch"],
        "overlap": base["overlap"] if args.overlap is None else args.overlap,
        "batch": args.batch or base["batch"],
        "check": args.check,
    }
    plan = plan_sizes(
        args.sizes or (QUICK["sizes"] if args.quick else None),
        args.repeats or (QUICK["repeats"] if args.quick else None),
        args.warmup,
        args.check,
        args.budget,
        args.configs,
    )
    settings.update(sizes=[p["size"] for p in plan], plan=plan)
    configs = C.select_configs(args.configs)
    results: dict[str, Any] = {
        "benchmark": "latency",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m refqsr_engine.benchmarks.latency " + shlex.join(args.argv),
        "machine": machine_info(),
        "settings": settings,
        "configs": {},
    }
    with tempfile.TemporaryDirectory(prefix="refqsr-bench-") as work_name:
        work = Path(work_name)
        spec = {**settings, "sizes": plan, "configs": configs, "work": str(work), "deadline": None}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        say(
            f"preparing {len(configs)} configurations (models, compiled artifacts, ONNX graphs; cached under "
            f"{C.bench_cache()})"
        )
        prep, err = run_child(["prepare", str(spec_path)], args.threads, args.timeout, work / "prepare.log", say)
        if prep is None:
            raise RuntimeError(f"preparing the configurations failed: {err}")
        t_prep = time.perf_counter() - t0
        if getattr(args, "prepare_only", False):  # the cache is warm now; nothing is timed
            return {"benchmark": "prepare", "prepared": prep["prepared"], "seconds": round(t_prep, 1)}
        spec.update(images=prep["images"], prepared=prep["prepared"])
        if getattr(args, "deadline_s", None):  # seconds for measuring; building artifacts does not count
            built = any(c.get("compiled_now") or c.get("exported_now") for c in prep["prepared"].values())
            spec["deadline"] = time.time() + args.deadline_s - (0.0 if built else t_prep)
        spec_path.write_text(json.dumps(spec))
        for i, cfg in enumerate(configs, 1):
            t = time.perf_counter()
            rec, err = run_child(
                ["measure", str(spec_path), cfg["name"]], args.threads, args.timeout, work / f"{cfg['name']}.log"
            )
            entry = {**cfg, **{k: v for k, v in prep["prepared"][cfg["name"]].items() if k != "model_path"}}
            entry["model_file"] = Path(prep["prepared"][cfg["name"]]["model_path"]).name
            entry.update(rec if rec is not None else {"ok": False, "error": err})
            results["configs"][cfg["name"]] = entry
            summary = (
                ", ".join(
                    f"{s} " + ("skipped" if "skipped" in r else f"{r['median']:.3f} s")
                    for s, r in entry["sizes"].items()
                )
                if rec
                else err
            )
            say(f"[{i}/{len(configs)}] {cfg['label']}: {summary} ({time.perf_counter() - t:.0f} s)")
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    total = time.perf_counter() - t0
    results["timing"] = {
        "prepare_seconds": round(t_prep, 1),
        "measure_seconds": round(total - t_prep, 1),
        "total_seconds": round(total, 1),
    }
    return report.finalize(results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m refqsr_engine.benchmarks.latency",
        description="Latency and peak memory of the compiled engine and its peers.",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        metavar="WxH",
        help=f"LR sizes, every configuration at each (default: the plan over {' '.join(DEFAULT_SIZES)})",
    )
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--repeats", type=int, help="most timed runs per size (default: 3 up to 320x180, else 1)")
    p.add_argument(
        "--budget", type=float, help="seconds of timed runs per configuration and size (default: the plan's)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 96x64, 4-block models, patch 24, batch 1, 1 repeat")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for latency.json / latency.md")
    p.add_argument("--configs", nargs="+", metavar="NAME", help=f"subset of: {' '.join(C.config_names())}")
    p.add_argument(
        "--check",
        choices=("crop", "smallest", "all", "none"),
        default="crop",
        help="compare outputs with the PyTorch twins: on a 2x2-patch crop of the smallest image (default), "
        "the whole smallest image, every image, or not at all",
    )
    p.add_argument("--warmup", choices=("auto", "full", "crop"), default="auto")
    p.add_argument("--n-blocks", type=int, help="SRResNet blocks (default 16; --quick 4)")
    p.add_argument("--patch", type=int, help="LR patch size (default 96; --quick 24)")
    p.add_argument("--overlap", type=int, help="patch overlap (default 6)")
    p.add_argument("--batch", type=int, help="patches per network batch (default 16; --quick 1)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each child process")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1):
        print("--threads and --repeats must be >= 1", file=sys.stderr)
        return 2
    try:
        C.select_configs(args.configs)
        for s in args.sizes or []:
            parse_size(s)
    except (ValueError, argparse.ArgumentTypeError) as err:
        print(str(err), file=sys.stderr)
        return 2
    results = run_benchmark(args)
    json_path, md_path = report.write(results, args.out, "latency-quick" if args.quick else "latency")
    for line in report.ratio_lines(results):
        print(line)
    for flag in results["flags"]:
        print(f"FLAG: {flag}")
    print(f"wrote {json_path} and {md_path}")
    return 1 if any(not r.get("ok") for r in results["configs"].values()) else 0


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that the running child is killed and the work folder removed."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


if __name__ == "__main__":
    _exit_on_sigterm()
    raise SystemExit(main())
