"""Peak memory and time of QAT training steps on the CPU, per kind of model (SRResNet x4, 16 blocks).

    python -m refqsr_engine.benchmarks.train_memory [--kinds ddtb8 cadyq refqsr84 delta3] [--batch 16]
        [--crop 48] [--threads 2] [--steps 2] [--reference-ops]

Each kind runs in its own process: one forward pass without gradients (allocator warm-up), then
``--steps`` training forward + backward passes on random crops (the loss a plain mean |SR|; the
memory is the autograd graph, not the loss). Reported: the process's peak RSS and seconds per
step. ``--reference-ops`` runs fake quantization as separate autograd ops
(:func:`composed_fake_quantize`, the same formula) instead of the one-node
:class:`~refqsr_engine.models.quant_base.FakeQuantize`, to measure what the node saves.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

KINDS = ("ddtb8", "cadyq", "refqsr84", "delta3")


def composed_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``FakeQuantize`` written as separate autograd ops (straight-through rounding by detach)."""
    if scale.dim() == 1:
        scale, zero = scale.view(-1, 1, 1, 1), zero.view(-1, 1, 1, 1)
    c = torch.clamp(x / scale + zero, qmin, qmax)
    return (c + (torch.round(c) - c).detach() - zero) * scale


def _step_fn(kind: str, batch: int, crop: int):
    from refqsr_engine.models.clustblock import ClustBlock
    from refqsr_engine.models.qconv import BitSpec
    from refqsr_engine.models.quant_cadyq import Delta
    from refqsr_engine.models.registry import build_refqsr, build_sr

    x, r = torch.rand(batch, 3, crop, crop), torch.rand(batch, 3, crop, crop)
    if kind == "ddtb8":
        net = build_sr("srresnet", "ddtb", (8,))
        return net, lambda: net(x, BitSpec(8, 8)).abs().mean()
    if kind == "cadyq":
        net = build_sr("srresnet", "cadyq")
        return net, lambda: net(x, Delta()).abs().mean()
    clust = ClustBlock(8)
    clust.calibrate(torch.rand(4, 3, 48, 48))
    net = build_refqsr("srresnet", "ddtb" if kind == "refqsr84" else "cadyq", 8, 4 if kind == "refqsr84" else 3, clust)
    return net, lambda: sum(o.abs().mean() for o in net(x, r))


def measure_one(kind: str, batch: int, crop: int, threads: int, steps: int, reference_ops: bool) -> dict:
    """Run in this process: peak RSS (GB) and seconds per training step of one kind."""
    if reference_ops:
        from refqsr_engine.models import quant_base

        quant_base.FakeQuantize.apply = staticmethod(composed_fake_quantize)
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    net, loss = _step_fn(kind, batch, crop)
    net.train()
    with torch.no_grad():
        loss()
    t = time.perf_counter()
    for _ in range(steps):
        loss().backward()
    return {
        "kind": kind,
        "batch": batch,
        "crop": crop,
        "threads": threads,
        "reference_ops": reference_ops,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "seconds_per_step": (time.perf_counter() - t) / steps,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=48, help="LR crop size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reference-ops", action="store_true", help="fake quantization as separate autograd ops")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one kind, in a fresh process, so the peak RSS is its own
        print(
            json.dumps(measure_one(args.kinds[0], args.batch, args.crop, args.threads, args.steps, args.reference_ops))
        )
        return
    print(
        "| kind | fake quantization | peak RSS (GB) | s/step |  "
        f"(batch {args.batch}, {args.crop} px, {args.threads} threads)"
    )
    print("| --- | --- | ---: | ---: |")
    for kind in args.kinds:
        cmd = [
            sys.executable,
            "-m",
            "refqsr_engine.benchmarks.train_memory",
            "--child",
            "--kinds",
            kind,
            "--batch",
            str(args.batch),
            "--crop",
            str(args.crop),
            "--threads",
            str(args.threads),
            "--steps",
            str(args.steps),
        ]
        if args.reference_ops:
            cmd.append("--reference-ops")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        ops = "separate ops" if args.reference_ops else "one node"
        print(f"| {kind} | {ops} | {row['peak_rss_gb']:.2f} | {row['seconds_per_step']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
