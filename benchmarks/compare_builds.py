"""Compiled artifacts of one model side by side: wall time (alternating runs in one process, with
PyTorch eager fp32 of the bundled FP SRResNet as the yardstick) and, with ``--quality``, PSNR-Y /
SSIM-Y on the validation photos and how far their images are from the first artifact's.

    refqsr-engine compile --mcpu rocketlake -o avx512.art          # e.g. the same model, two CPUs
    refqsr-engine compile -o amx.art && refqsr-engine compile --float-math bf16 -o amx_bf16.art
    python -m refqsr_engine.benchmarks.compare_builds avx512.art amx.art amx_bf16.art --quality

What one build choice (kernels, ``--mcpu``, ``--float-math``) is worth, measured without the
machine's load drifting between the builds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m refqsr_engine.benchmarks.compare_builds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("artifacts", nargs="+", type=Path, help="artifact directories (refqsr-engine compile -o)")
    p.add_argument("--size", default="320x180", help="LR size WxH of the timed photo (default 320x180)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per build")
    p.add_argument("--batch", type=int, default=8, help="patches per network call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager yardstick")
    p.add_argument("--quality", action="store_true", help="PSNR/SSIM on the validation photos, image differences")
    p.add_argument("--val", default=None, help="validation folder (default: the benchmarks' own)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import os

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    from ..engine.artifact import load_artifact
    from ..engine.models_store import resolve_model
    from ..engine.runtime import CompiledModel
    from ..models.checkpoint import load_model
    from ..pipeline.patchwise import run_patchwise
    from .configs import make_lr
    from .latency import parse_size

    torch.set_num_threads(args.threads)
    width, height = parse_size(args.size)
    lr = make_lr(width, height)
    runners = {str(a): CompiledModel(load_artifact(a)) for a in args.artifacts}
    patch = {name: int(r.patch) for name, r in runners.items()}
    fns = {name: (lambda r=r, p=patch[name]: run_patchwise(r, lr, p, 6, args.batch)) for name, r in runners.items()}
    if not args.no_torch:
        fp = load_model(resolve_model("srresnet_fp"))[0].eval()
        x = torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32))[None]

        def torch_eager():
            with torch.no_grad():
                fp(x)

        fns["PyTorch eager fp32 (srresnet_fp)"] = torch_eager
    for f in fns.values():
        f()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.runs):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    first = next(iter(runners))
    base = statistics.median(times[first])
    print(
        f"{width}x{height} LR -> x4, {args.threads} threads, {args.runs} alternating runs (median s; "
        f"speed vs {first}" + ("" if args.no_torch else "; vs PyTorch eager") + ")"
    )
    yard = None if args.no_torch else statistics.median(times["PyTorch eager fp32 (srresnet_fp)"])
    for name, t in times.items():
        med = statistics.median(t)
        line = f"  {name:<48} {med:7.3f} s  {base / med:5.2f}x"
        if yard is not None:
            line += f"  {yard / med:5.2f}x"
        print(line)
    if args.quality:
        _quality(runners, args)
    return 0


def _quality(runners: dict, args: argparse.Namespace) -> None:
    from ..metrics.quality import psnr_y, ssim_y
    from ..pipeline.patchwise import run_patchwise
    from .valdata import validation_set

    pairs, info = validation_set(args.val)
    images: dict[str, list[np.ndarray]] = {}
    print(f"quality on {info['source']} ({len(pairs)} photos, PSNR-Y / SSIM-Y, shave 4):")
    for name, r in runners.items():
        ps, ss, images[name] = [], [], []
        for p in pairs:
            sr = run_patchwise(r, p.lr.transpose(2, 0, 1).astype(np.float32) / 255, int(r.patch), 6, args.batch).image
            sr8 = np.clip(np.round(sr.transpose(1, 2, 0) * 255), 0, 255)
            images[name].append(sr8)
            ps.append(psnr_y(sr8, p.hr, 4))
            ss.append(ssim_y(sr8, p.hr, 4))
        print(f"  {name:<48} {np.mean(ps):.4f} / {np.mean(ss):.4f}")
    first = next(iter(images))
    for name in list(images)[1:]:
        diffs = [np.abs(a - b) for a, b in zip(images[first], images[name])]
        share = np.mean([(d > 0).mean() for d in diffs]) * 100
        print(f"  {name} vs {first}: max {max(d.max() for d in diffs):.0f} levels, {share:.3f} % of values differ")


if __name__ == "__main__":
    raise SystemExit(main())
