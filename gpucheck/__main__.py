"""`python -m gpucheck prepare|run ...` (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .bundle import CheckError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpucheck", description=__doc__)
    sub = p.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="compile and bundle what the GPU host needs (this machine)")
    prep.add_argument("--out", type=Path, default=Path(".gpucheck"))
    prep.add_argument("--arch", default="sm_90")
    run = sub.add_parser("run", help="run the check on a GPU host")
    run.add_argument("bundle", type=Path, help="the folder `prepare` wrote")
    run.add_argument("out", type=Path, help="folder for report.json, report.md and the output images")
    run.add_argument("--quick", action="store_true", help="fewer timing runs (a smoke test of the check)")
    args = p.parse_args(argv)
    try:
        if args.step == "prepare":
            from .prepare import prepare

            prepare(args.out, args.arch)
        else:
            from .run import run as run_check

            run_check(args.bundle, args.out, quick=args.quick)
    except CheckError as err:
        print(f"gpucheck: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
