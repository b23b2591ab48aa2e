"""The whole benchmark suite in one command, within a time budget (default 20 minutes):

    refqsr-engine bench all [--quick] [--out benchmarks/results] [--threads 2] [--val DIR]
        [--budget-min 20] [--configs NAME ...]
    python -m refqsr_engine.benchmarks            (the same)

1. latency + peak memory of every configuration (:mod:`.latency`, each in its own process);
2. Table II (BitOPs/FQR/PSNR/SSIM) and the Table VII patch-size study (:mod:`.quality`);
3. the patch-assignment picture of the largest validation image (``engine.explain``, RefQSR 8-4's
   ClustBlock and tau, Table II's patch size);
4. the plots (PSNR vs BitOPs, latency per configuration) and ``summary.md`` (the README tables),
   ``suite.json`` (machine, stage times, whether artifacts came from the cache).

Time budget: a latency size whose one run is predicted (from the same configuration's previous
size) to end after 62 % of the budget is skipped, and so is a quality pass predicted to end after
the budget less a reserve for the pictures; both are listed as skipped in every table. The plan
itself (:data:`.latency.PLAN`, :data:`.quality.FULL`) is sized to fit without skips on an idle
2-core CPU (~13-14 min estimated) once the compiled artifacts are cached. A first run compiles
the 16-block artifacts (minutes each); that time is reported but not counted against the budget
(``--prepare-only`` builds them without timing anything).
``--quick``: the smoke versions of every step (tiny models, tiny images), result files with a
``-quick`` stem.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import write_text_atomic
from . import latency, report

LATENCY_SHARE = 0.62  # of the budget, for preparing + latency; quality gets the rest
TAIL_RESERVE_S = 45.0  # explain picture, plots, summary


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refqsr-engine bench all",
        description="Latency, peak memory, BitOPs/quality tables, plots and the assignment picture.",
    )
    p.add_argument("--quick", action="store_true", help="smoke run of every step (tiny models and images)")
    p.add_argument("--out", default=str(latency.RESULTS_DIR), help="results folder (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--val", help="HR validation folder (default ./data/sr/val if present, else scikit-image photos)")
    p.add_argument("--budget-min", type=float, default=20.0, help="time budget in minutes (default 20)")
    p.add_argument("--configs", nargs="+", metavar="NAME", help="latency configurations (default: all)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency/memory step (quality, pictures only)")
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="only build what the suite needs (PTQ models, compiled artifacts, ONNX graphs; cached), time nothing",
    )
    return p


def _explain(pairs: list, model_path: str, patch: int, overlap: int, out: Path) -> dict[str, Any]:
    """The assignment picture of the largest validation image (its LR, as the models see it)."""
    from PIL import Image

    from ..engine.explain import explain_file

    pair = max(pairs, key=lambda p: p.lr.shape[0] * p.lr.shape[1])
    with tempfile.TemporaryDirectory(prefix="refqsr-explain-") as tmp:
        src = Path(tmp) / f"{Path(pair.name).name}_lr.png"
        Image.fromarray(pair.lr).save(src)
        info = explain_file(src, out, model=model_path, patch=patch, overlap=overlap)
    info["image"] = pair.name
    return {k: v for k, v in info.items() if k not in ("cells", "roles", "group", "input")}


def prepare_everything(args: argparse.Namespace, log: Callable[[str], None] = say) -> dict[str, Any]:
    """Fill the cache: every latency configuration's model/artifact/graph and every quality model."""
    from . import configs as C
    from . import quality

    t0 = time.time()
    largv = (["--quick"] if args.quick else []) + ["--threads", str(args.threads)]
    largs = latency.build_parser().parse_args(largv + (["--configs", *args.configs] if args.configs else []))
    largs.argv, largs.prepare_only = largv, True
    prep = latency.run_benchmark(largs, log)
    n_blocks = (quality.QUICK if args.quick else quality.FULL)["n_blocks"]
    models = {key: C.prepare_model(key, n_blocks)["weights"] for key, _ in quality.TABLE2}
    return {"prepared": prep["prepared"], "quality_models": models, "seconds": round(time.time() - t0, 1)}


def run_suite(args: argparse.Namespace, argv: list[str], log: Callable[[str], None] = say) -> dict[str, Any]:
    start = t0 = time.time()  # t0: where the time budget starts (moved past a first build of artifacts)
    out = Path(args.out)
    tag = "-quick" if args.quick else ""
    budget = 60.0 * args.budget_min
    timing: dict[str, float] = {}
    suite: dict[str, Any] = {
        "benchmark": "suite",
        "quick": args.quick,
        "budget_s": budget,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "refqsr-engine bench all " + shlex.join(argv),
        "machine": latency.machine_info(),
        "files": [],
        "pictures": {},
    }
    lat = None
    if not args.no_latency:  # first: this process must still be small (no torch) while children are measured
        largv = (["--quick"] if args.quick else []) + ["--threads", str(args.threads), "--out", str(out)]
        largv += ["--configs", *args.configs] if args.configs else []
        largs = latency.build_parser().parse_args(largv)
        largs.argv, largs.deadline_s = largv, LATENCY_SHARE * budget
        t = time.time()
        lat = latency.run_benchmark(largs, log)
        timing["latency_seconds"] = time.time() - t
        suite["files"] += [str(p) for p in report.write(lat, out, f"latency{tag}")]
        built = [n for n, c in lat["configs"].items() if c.get("compiled_now") or c.get("exported_now")]
        suite["cache_note"] = (
            "compiled artifacts and ONNX graphs from the cache"
            if not built
            else f"built now (not cached before; {lat['timing']['prepare_seconds']:.0f} s, outside the "
            "time budget): " + ", ".join(built)
        )
        if built:  # the budget is for measuring: compiling the artifacts the first time is not counted
            t0 += lat["timing"]["prepare_seconds"]
    else:
        suite["cache_note"] = "latency not run"

    from . import configs as C
    from . import plots, quality, quality_report, summary
    from .valdata import validation_set

    t = time.time()
    q = quality.run_quality(args.quick, args.val, args.threads, log, deadline=t0 + budget - TAIL_RESERVE_S)
    timing["quality_seconds"] = time.time() - t
    suite["files"] += [str(p) for p in quality_report.write(q, out)]

    t = time.time()
    s = quality.QUICK if args.quick else quality.FULL
    pairs, _ = validation_set(args.val, s["crop"], s["limit"])
    refqsr = C.prepare_model("refqsr-8-4", s["n_blocks"])
    explain_png = out / f"explain{tag}.png"
    suite["explain"] = _explain(pairs, refqsr["path"], s["patch"], s["overlap"], explain_png)
    suite["pictures"]["patch assignment (RefQSR 8-4 ClustBlock, " + suite["explain"]["image"] + ")"] = explain_png.name
    bitops_png = plots.psnr_vs_bitops(q, out / f"psnr_vs_bitops{tag}.png")
    suite["pictures"]["PSNR vs BitOPs"] = bitops_png.name
    files = [explain_png, bitops_png]
    if lat is not None:
        files.append(plots.latency(lat, out / f"latency{tag}.png"))
        suite["pictures"]["latency"] = files[-1].name
    suite["files"] += [str(p) for p in files]
    timing["pictures_seconds"] = time.time() - t

    timing["total_seconds"] = time.time() - start
    timing["budgeted_seconds"] = time.time() - t0  # total less a first build of the artifacts
    suite["timing"] = {k: round(v, 1) for k, v in timing.items()}
    suite["within_budget"] = timing["budgeted_seconds"] <= budget
    suite["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    md = write_text_atomic(out / f"summary{tag}.md", summary.markdown(suite, lat, q))
    suite["files"].append(str(md))
    js = out / f"suite{tag}.json"
    suite["files"].append(str(js))
    write_text_atomic(js, json.dumps(suite, indent=1) + "\n")
    return suite


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.threads < 1 or args.budget_min <= 0:
        print("--threads and --budget-min must be positive", file=sys.stderr)
        return 2
    try:
        if args.configs:
            from .configs import select_configs

            select_configs(args.configs)
    except ValueError as err:
        print(str(err), file=sys.stderr)
        return 2
    if args.prepare_only:
        done = prepare_everything(args)
        built = [n for n, c in done["prepared"].items() if c.get("compiled_now") or c.get("exported_now")]
        print(f"prepared in {done['seconds']:.0f} s; built now: {', '.join(built) or 'nothing (all cached)'}")
        return 0
    suite = run_suite(args, argv)
    for f in suite["files"]:
        print(f"wrote {f}")
    t = suite["timing"]["total_seconds"]
    print(
        f"suite finished in {t:.0f} s ({t / 60:.1f} min; {suite['timing']['budgeted_seconds']:.0f} s counted against "
        f"the {suite['budget_s'] / 60:.0f}-min budget: {'within' if suite['within_budget'] else 'OVER'}); "
        f"{suite['cache_note']}"
    )
    return 0
