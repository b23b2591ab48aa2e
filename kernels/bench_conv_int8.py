"""GOP/s of the AVX2 integer conv kernels vs PyTorch's fbgemm int8 conv, in one process.

    python -m refqsr_engine.kernels.bench_conv_int8                  # batch 16, 64->64, 3x3, 48 and 96
    python -m refqsr_engine.kernels.bench_conv_int8 --sizes 48 --rounds 3 --variants int8 lowbit
    python -m refqsr_engine.kernels.bench_conv_int8 --fbgemm-isa both   # + fbgemm on its native ISA

TVM and fbgemm run with the same thread count (``--threads``, default 2: TVM_NUM_THREADS and
torch.set_num_threads), interleaved round by round so both see the same machine load; every call
is timed on its own and the table gives the best and the median call. GOP/s = 2 x MACs / s.

fbgemm: ``torch.ops.quantized.conv2d`` on a prepacked qint8 weight, quint8 channels-last input
(its native NHWC layout), output requantized to quint8 (included). ``--fbgemm-isa AVX2`` (default)
sets ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` so fbgemm runs the same instruction set as these kernels
even on an AVX-512/VNNI machine; ``native`` lets it pick (AVX-512 VNNI where present); ``both``
runs native in a child process as an extra column. The TVM kernels output int32 (no requantize).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[48, 96])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=4, help="timed calls per kernel per round")
    p.add_argument("--variants", nargs="+", default=["int8", "int8pair", "int16", "lowbit"],
                   choices=["int8", "int8pair", "int16", "lowbit", "vnni"],
                   help="vnni (not AVX2) is built with --vnni-mcpu and skipped when the CPU lacks VNNI")
    p.add_argument("--mcpu", default="core-avx2")
    p.add_argument("--vnni-mcpu", default="sapphirerapids")
    p.add_argument("--fbgemm-isa", default="AVX2", choices=["AVX2", "native", "both", "none"])
    p.add_argument("--fbgemm-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args(argv)


def _setup_env(args):
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.fbgemm_isa in ("AVX2", "both") and not args.fbgemm_only:
        os.environ["FBGEMM_ENABLE_INSTRUCTIONS"] = "AVX2"


def _fbgemm_case(torch, n, c, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.quantize_per_tensor(torch.rand(n, c, size, size, generator=g), 1 / 255.0, 0, torch.quint8)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.quantize_per_tensor(torch.randn(c, c, 3, 3, generator=g) * 0.05, 0.002, 0, torch.qint8)
    packed = torch.ops.quantized.conv2d_prepack(w, torch.zeros(c), [1, 1], [1, 1], [1, 1], 1)
    return lambda: torch.ops.quantized.conv2d(x, packed, 0.05, 64)


def _time_calls(fn, calls):
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _summary(ops, times):
    import numpy as np

    return {"best_gops": ops / min(times) / 1e9, "median_gops": ops / float(np.median(times)) / 1e9,
            "best_ms": min(times) * 1e3, "median_ms": float(np.median(times)) * 1e3, "samples": len(times)}


def _fbgemm_only(args):
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "fbgemm"
    res = {}
    for size in args.sizes:
        ops = 2 * args.batch * args.channels**2 * 9 * size * size
        fn = _fbgemm_case(torch, args.batch, args.channels, size)
        _time_calls(fn, 3)
        res[size] = _summary(ops, _time_calls(fn, args.rounds * args.calls))
    print(json.dumps(res))


def main(argv=None):
    args = _parse(argv)
    _setup_env(args)
    if args.fbgemm_only:
        return _fbgemm_only(args)

    import warnings

    import numpy as np
    import torch
    import tvm

    from .conv2d_int8 import build_conv2d_int8, default_target
    from .x86_intrin import host_has_vnni

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "fbgemm"
    target = default_target(args.mcpu, args.threads)
    dev = tvm.cpu()
    results = {}
    for size in args.sizes:
        n, c = args.batch, args.channels
        cases = {}
        for variant in args.variants:
            if variant == "vnni" and not host_has_vnni():
                print("skipping vnni: this CPU has neither AVX-VNNI nor AVX512-VNNI+VL", file=sys.stderr)
                continue
            tgt = default_target(args.vnni_mcpu, args.threads) if variant == "vnni" else target
            k = build_conv2d_int8(n, c, c, size, size, 3, tgt, variant=variant)
            rng = np.random.default_rng(0)
            s = k.shape
            a = tvm.runtime.tensor(rng.integers(0, k.act_max + 1, s.act_shape()).astype(k.act_dtype), dev)
            w = tvm.runtime.tensor(rng.integers(k.w_min, k.w_max + 1, s.weight_shape(k.group)).astype(k.weight_dtype), dev)
            out = tvm.runtime.empty(s.out_shape(), "int32", dev)
            cases[f"tvm_{variant}"] = (lambda f=k.func, a=a, w=w, o=out: f(a, w, o), k)
        if args.fbgemm_isa != "none":
            label = "fbgemm_avx2" if args.fbgemm_isa in ("AVX2", "both") else "fbgemm_native"
            cases[label] = (_fbgemm_case(torch, n, c, size), None)
        times = {name: [] for name in cases}
        for fn, _ in cases.values():
            _time_calls(fn, 2)  # warm-up
        for _ in range(args.rounds):
            for name, (fn, _) in cases.items():
                times[name] += _time_calls(fn, args.calls)
        ops = 2 * n * c * c * 9 * size * size
        results[size] = {name: _summary(ops, t) for name, t in times.items()}
        for name, (_, k) in cases.items():
            if k is not None:
                results[size][name]["tile"] = list(k.tile)
                results[size][name]["chunk_groups"] = k.chunk_groups
    if args.fbgemm_isa == "both":
        cmd = [sys.executable, "-m", __spec__.name if __spec__ else "refqsr_engine.kernels.bench_conv_int8",
               "--fbgemm-only", "--fbgemm-isa", "native", "--threads", str(args.threads), "--batch", str(args.batch),
               "--channels", str(args.channels), "--rounds", str(args.rounds), "--calls", str(args.calls),
               "--sizes", *map(str, args.sizes)]
        env = {k: v for k, v in os.environ.items() if k != "FBGEMM_ENABLE_INSTRUCTIONS"}
        child = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        for size in args.sizes:
            results[size]["fbgemm_native (separate process)"] = child[str(size)]

    if args.json:
        print(json.dumps(results, indent=1))
        return results
    print(f"conv 3x3 {args.channels}->{args.channels}, batch {args.batch}, threads {args.threads} "
          f"(TVM {tvm.runtime.num_threads()}, torch {torch.get_num_threads()}), mcpu {args.mcpu}, "
          f"fbgemm ISA {args.fbgemm_isa}")
    ref_name = next((k for k in ("fbgemm_avx2", "fbgemm_native") if k in results[args.sizes[0]]), None)
    print(f"{'size':>5} {'kernel':<34} {'best GOP/s':>10} {'median':>8} {'best ms':>8}"
          + (f"  {'x ' + ref_name + ' (median)':>22}" if ref_name else ""))
    for size in args.sizes:
        for name, r in results[size].items():
            ratio = f"  {r['median_gops'] / results[size][ref_name]['median_gops']:>22.2f}" if ref_name else ""
            print(f"{size:>5} {name:<34} {r['best_gops']:>10.1f} {r['median_gops']:>8.1f} {r['best_ms']:>8.2f}{ratio}")
    if "int8" in args.variants and "lowbit" in args.variants:
        for size in args.sizes:
            r8, lb = results[size]["tvm_int8"], results[size]["tvm_lowbit"]
            print(f"{size:>5} lowbit (u4 x s4) speed-up over int8: best {lb['best_gops'] / r8['best_gops']:.2f}x, "
                  f"median {lb['median_gops'] / r8['median_gops']:.2f}x")
    return results


if __name__ == "__main__":
    main()
