"""Performance regression guard: speed ratios measured side by side, checked against recorded floors.

    python -m refqsr_engine.benchmarks.guard            # measure, compare, exit 1 on a regression
    python -m refqsr_engine.benchmarks.guard --update   # measure and record the new floors

A shared machine's absolute times drift by 2x; a ratio of two things timed alternately in one
process does much less. Each check times the engine against a peer in one process:

``end_to_end``  the default model, compiled for this CPU (the upscale cache), on a 320x180 LR
                photo vs PyTorch eager fp32 of the FP SRResNet (whole image), median of 3;
``int8_conv``   the fused int8 conv the compiler picks for a 64->64 3x3 layer (batch 8 of 96-px
                patches) vs PyTorch's fbgemm int8 conv (``benchmarks.conv_int8 --fused``);
``peer_*``      the default model's network time (its compiled graph calls on the 96-px patches
                of the 320x180 photo) vs OpenVINO and ONNX Runtime int8 (whole network and the
                engine's split), OpenVINO fp32 and PyTorch eager fp32, each with its PSNR-Y on
                ``--quality DIR`` (see :mod:`.peers`; OpenVINO comes with ``pip install '.[bench]'``).

Floors live in ``benchmarks/results/guard_floors.json``, keyed by the CPU's LLVM name (the kernels,
and so the ratios, differ per CPU); a ratio below ``floor * (1 - --tolerance)`` is a regression.
A CPU without recorded floors is measured and reported, not judged. Even ratios move by ~20 % on
a 2-core VM shared with other work, so the recorded floors are the lowest of several runs (``--update`` writes
one run's values: edit them down to the lowest you saw). They catch what matters: the AVX-512
build instead of the AMX one measured 1.83x end to end and 0.89x fbgemm, below both floors.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RefQSRError

FLOORS = Path(__file__).parent / "results" / "guard_floors.json"
DEFAULT_QUALITY = Path("data/sr/test")  # relative to the current directory (training.prepare writes it)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m refqsr_engine.benchmarks.guard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--update", action="store_true", help="record the measured ratios as this CPU's floors")
    p.add_argument("--tolerance", type=float, default=0.15, help="allowed shortfall below a floor (default 0.15)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--floors", type=Path, default=FLOORS)
    p.add_argument(
        "--checks",
        default=",".join(CHECKS),
        help=f"comma-separated groups to run (default all: {','.join(CHECKS)})",
    )
    p.add_argument(
        "--quality",
        type=Path,
        help=f"HR photos for the peers' PSNR-Y (default {DEFAULT_QUALITY} when present, else no PSNR-Y)",
    )
    return p.parse_args(argv)


def end_to_end_ratio(threads: int, runs: int = 3) -> dict[str, float]:
    """PyTorch eager fp32 time / compiled default model time on the 320x180 photo."""
    import numpy as np
    import torch

    from ..engine.models_store import resolve_model
    from ..engine.upscale import DEFAULT_BATCH, DEFAULT_PATCH, UpscaleOptions, compiled_engine
    from ..models.checkpoint import load_model
    from ..pipeline.patchwise import run_patchwise
    from .configs import make_lr

    torch.set_num_threads(threads)
    opts = UpscaleOptions(threads=threads, patch=DEFAULT_PATCH, batch=DEFAULT_BATCH)
    engine, _ = compiled_engine(opts)
    lr = make_lr(320, 180)
    fp = load_model(resolve_model("srresnet_fp"))[0].eval()
    x = torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32))[None]

    def run_torch():
        with torch.no_grad():
            fp(x)

    def run_engine():
        run_patchwise(engine, lr, opts.patch, opts.overlap, opts.batch)

    run_engine(), run_torch()
    t_engine, t_torch = [], []
    for _ in range(runs):
        for fn, out in ((run_engine, t_engine), (run_torch, t_torch)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    e, p = statistics.median(t_engine), statistics.median(t_torch)
    return {"ratio": p / e, "engine_s": e, "torch_s": p}


def int8_conv_ratio(threads: int) -> dict[str, float]:
    """Median GOP/s of the engine's fused int8 conv (the variant the compiler picks for an 8-bit
    DDTB layer here) / fbgemm's."""
    from ..kernels.amx import enable_amx, target_has_amx
    from ..kernels.conv2d_int8 import default_target, host_mcpu, target_has_avx512_vnni
    from .conv_int8 import main as bench

    target = default_target(host_mcpu(), threads)
    variant = (
        "amx"
        if target_has_amx(target) and enable_amx()
        else "vnni512"
        if target_has_avx512_vnni(target)
        else "int8pair"
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its own JSON print
        res = bench(
            [
                "--mcpu",
                "host",
                "--fused",
                "--sizes",
                "96",
                "--batch",
                "8",
                "--rounds",
                "3",
                "--threads",
                str(threads),
                "--variants",
                variant,
                "--json",
            ]
        )[96]
    fb = next(v for k, v in res.items() if k.startswith("fbgemm") and not k.endswith("_f32"))
    ours = res[f"tvm_{variant}"]
    return {
        "ratio": ours["median_gops"] / fb["median_gops"],
        "variant": variant,
        "gops": ours["median_gops"],
        "fbgemm_gops": fb["median_gops"],
    }


def _peers(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from .peers import peers_check

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    return peers_check(args.threads, args.quality, say=say)


#: check groups: each measures one or more named checks in one process
CHECKS: dict[str, Callable[[argparse.Namespace], dict[str, dict[str, Any]]]] = {
    "end_to_end": lambda args: {"end_to_end": end_to_end_ratio(args.threads)},
    "int8_conv": lambda args: {"int8_conv": int8_conv_ratio(args.threads)},
    "peers": _peers,
}


def judge(measured: dict[str, dict[str, Any]], floors: dict[str, float], tolerance: float) -> dict[str, str]:
    """Per check with a ratio: "ok", "REGRESSION" (ratio below floor * (1 - tolerance)) or "no
    floor yet"; a check that could not run: "skipped: <why>". Entries without either (the
    engine's own times) are not judged."""
    verdicts = {}
    for name, m in measured.items():
        if "skipped" in m:
            verdicts[name] = f"skipped: {m['skipped']}"
        elif "ratio" not in m:
            continue
        elif floors.get(name) is None:
            verdicts[name] = "no floor yet"
        else:
            verdicts[name] = "ok" if m["ratio"] >= floors[name] * (1 - tolerance) else "REGRESSION"
    return verdicts


def _details(m: dict[str, Any]) -> str:
    parts = []
    for k, v in m.items():
        if k in ("ratio", "kernels", "skipped") or v in ("", None):
            continue
        if k == "psnr_y":
            parts.append(f"PSNR-Y {v:.2f} dB")
        else:
            parts.append(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}")
    if m.get("kernels"):
        parts.append(f"convs: {m['kernels']}")
    return ", ".join(parts)


def _quality_dir(args: argparse.Namespace, groups: list[str]) -> str | None:
    """Set ``args.quality`` (None: no PSNR-Y); returns a note when quality is skipped."""
    if "peers" not in groups:
        return None
    if args.quality is None:
        if DEFAULT_QUALITY.is_dir():
            args.quality = DEFAULT_QUALITY
            return None
        return (
            f"no PSNR-Y: {DEFAULT_QUALITY} not found (python -m refqsr_engine.training.prepare data/sr "
            "builds it; or pass --quality DIR)"
        )
    if not args.quality.is_dir():
        raise RefQSRError(f"--quality {args.quality}: no such folder")
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    groups = [g.strip() for g in args.checks.split(",") if g.strip()]
    unknown = [g for g in groups if g not in CHECKS]
    try:
        if unknown:
            raise RefQSRError(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
        note = _quality_dir(args, groups)
    except RefQSRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from ..kernels.host_cpu import host_mcpu

    cpu = host_mcpu()
    floors_all: dict[str, Any] = json.loads(args.floors.read_text()) if args.floors.is_file() else {}
    floors = floors_all.get(cpu, {})
    measured: dict[str, dict[str, Any]] = {}
    for group in groups:
        measured.update(CHECKS[group](args))
    verdicts = judge(measured, floors, args.tolerance)
    failed = [name for name, v in verdicts.items() if v == "REGRESSION"]
    print(f"performance guard on {cpu}, {args.threads} threads (tolerance {args.tolerance:.0%})")
    for name, m in measured.items():
        verdict = verdicts.get(name, "")
        if name in floors and "ratio" in m:
            verdict = f"floor {floors[name]:.2f}x: {verdict}"
        ratio = f"{m['ratio']:5.2f}x" if "ratio" in m else "      "
        details = _details(m)
        print(f"  {name:<20} {ratio}  {f'({details})  ' if details else ''}{verdict}".rstrip())
    if note:
        print(f"  {note}")
    if args.update:
        floors_all[cpu] = {
            **floors,
            **{name: round(m["ratio"], 3) for name, m in measured.items() if "ratio" in m},
        }
        args.floors.parent.mkdir(parents=True, exist_ok=True)
        args.floors.write_text(json.dumps(floors_all, indent=1, sort_keys=True) + "\n")
        print(f"recorded the floors for {cpu} in {args.floors}")
        return 0
    if failed:
        print(f"regression: {', '.join(failed)} below the recorded floor", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
