"""Start-up cost of a one-image `refqsr-engine upscale` process with a cached (or given) artifact.

    python -m refqsr_engine.benchmarks.startup [--image IN.png | --size 320x180] [--artifact ART]
        [--runs 5] [--threads N] [--json]

Each run is a fresh ``python -X importtime -m refqsr_engine.cli.main upscale ... --json`` process
(the first run warms the page cache and is not counted). Reported per run and as medians: the
process's wall time; the network time (cluster, reference, query or sr stages of the report); the
overhead (wall minus network); the time before the first patch runs (imports, engine setup with the
artifact's integrity check, image read: what the process spent before the ``cluster`` / ``sr``
stage); the imports (``-X importtime``'s top-level cumulative microseconds); and whether PyTorch,
ONNX or the TVM compiler were imported (they must not be, with a cached artifact).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HEAVY = ("torch", "onnx", "onnxruntime", "tvm")


def _photo(size: tuple[int, int], path: Path) -> None:
    """scikit-image's astronaut, resized (Pillow bicubic) to ``size`` (width, height)."""
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).resize(size, Image.BICUBIC).save(path)


def import_times(stderr: str) -> tuple[float, set[str]]:
    """(seconds of top-level imports, top-level packages imported) from ``-X importtime`` output.
    A package whose import was refused (a few microseconds, no submodules) is not counted as loaded."""
    total_us, loaded = 0, set()
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if not cumulative.isdigit():
            continue
        if not name.startswith(" ") and line.split("|")[2][1:2] != " ":  # a top-level import
            total_us += int(cumulative)
        top = name.strip().split(".")[0]
        if top in HEAVY and ("." in name.strip() or int(cumulative) > 100):
            loaded.add(top)
    return total_us / 1e6, loaded


def run_once(image: Path, out: Path, extra: list[str], env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-X", "importtime", "-m", "refqsr_engine.cli.main", "upscale", str(image), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + ["--json", "-q", *extra], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"upscale failed: {proc.stderr.strip().splitlines()[-1:]}")
    report = json.loads(proc.stdout)
    sec = report["seconds"]
    network = sum(sec.get(k, 0.0) for k in ("cluster", "reference", "query", "sr"))
    imports, heavy = import_times(proc.stderr)
    return {
        "wall_s": wall,
        "network_s": network,
        "overhead_s": wall - network,
        # everything but the patch-wise run and the write (which follow the read): imports, engine
        # setup, image read, and the interpreter's exit
        "before_first_patch_s": wall - (sec["total"] - sec["read"]),
        "setup_s": sec["setup"],
        "imports_s": imports,
        "heavy_imports": sorted(heavy),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", type=Path, help="input image (default: a 320x180 photo made from scikit-image)")
    p.add_argument("--size", default="320x180", help="size of the made photo, WIDTHxHEIGHT")
    p.add_argument("--artifact", help="run this artifact (default: the cached one of the default model)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    env = dict(os.environ)
    extra = (["--artifact", args.artifact] if args.artifact else []) + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    with tempfile.TemporaryDirectory() as tmp:
        image = args.image
        if image is None:
            w, h = (int(v) for v in args.size.lower().split("x"))
            image = Path(tmp) / "in.png"
            _photo((w, h), image)
        out = Path(tmp) / "out.png"
        run_once(image, out, extra, env)  # warm-up (and the compile, when nothing is cached)
        runs = [run_once(image, out, extra, env) for _ in range(args.runs)]
    keys = ("wall_s", "network_s", "overhead_s", "before_first_patch_s", "setup_s", "imports_s")
    summary = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    summary["heavy_imports"] = sorted({m for r in runs for m in r["heavy_imports"]})
    if args.json:
        print(json.dumps({"median": summary, "runs": runs}, indent=2))
        return
    for k in keys:
        print(f"{k:>22}: {summary[k]:.3f}  (runs: {', '.join(f'{r[k]:.3f}' for r in runs)})")
    print(f"{'heavy imports':>22}: {', '.join(summary['heavy_imports']) or 'none'}")


if __name__ == "__main__":
    main()
