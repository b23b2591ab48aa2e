"""Peak resident memory of one upscale, measured in a fresh process (run by the memory tests).

    python tests/rss_probe.py MODEL IN OUT [--artifact DIR] [--patch P] [--batch B]

Sets the engine up (the cached compiled default, or the artifact DIR), resets the kernel's peak-RSS
mark, upscales IN to OUT the way `refqsr-engine upscale` does, and prints JSON: the resident set
before the image, its peak during the image, and the output's size in bytes (8-bit samples)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--patch", type=int, default=None, help="default: upscale's")
    ap.add_argument("--batch", type=int, default=None, help="default: upscale's")
    args = ap.parse_args()

    from refqsr_engine.engine.upscale import UpscaleOptions, Upscaler

    args.patch = args.patch or UpscaleOptions.patch
    args.batch = args.batch or UpscaleOptions.batch

    if args.artifact:  # a prebuilt artifact: the torch model only supplies the BitOPs report
        from refqsr_engine.engine.runtime import CompiledModel

        up = Upscaler(UpscaleOptions(model=args.model, engine="torch", patch=args.patch, batch=args.batch))
        up.runner = CompiledModel.load(args.artifact)
    else:
        up = Upscaler(UpscaleOptions(model=args.model, engine="tvm", patch=args.patch, batch=args.batch))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    report = up.upscale_file(args.src, args.dst)
    peak = _status_kib("VmHWM")
    h, w = report["hr_size"]
    print(
        json.dumps(
            {
                "rss_before_mib": before / 1024,
                "peak_mib": peak / 1024,
                "output_mib": h * w * 3 / 2**20,
                "hr_size": [h, w],
                "patches": report["patches"],
                "seconds": report["seconds"]["total"],
            }
        )
    )


if __name__ == "__main__":
    main()
