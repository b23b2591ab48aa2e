"""GOP/s of the integer conv kernels (AVX2 and AVX-512) vs PyTorch's fbgemm int8 conv, in one process.

    python -m refqsr_engine.benchmarks.conv_int8                  # batch 16, 64->64, 3x3, 48 and 96
    python -m refqsr_engine.benchmarks.conv_int8 --sizes 48 --rounds 3 --variants int8 lowbit
    python -m refqsr_engine.benchmarks.conv_int8 --fbgemm-isa both   # + fbgemm on its native ISA
    python -m refqsr_engine.benchmarks.conv_int8 --mcpu host --fused --sizes 96 --batch 4
        # this CPU's mcpu (AVX-512 VNNI variants added, AMX where present), the fused float-in/float-out kernels
        # (quantize + pack, conv, dequantize epilogue) vs fbgemm on its native ISA

``--mcpu host`` is LLVM's name for this CPU; on an AVX-512 VNNI target the variant list gains
"vnni512" and "lowbit512" and fbgemm runs natively (``--fbgemm-isa auto``). ``--fused`` times
:mod:`refqsr_engine.kernels.qconv_fused` with each variant's typical ranges (``FUSED_CASES``: e.g.
"vnni512_ddtb8" is 8-bit DDTB with weights beyond s8, run through the weight shift) against
fbgemm's quantize -> conv -> requantize (column "fbgemm", ratios) and the same plus dequantize
("fbgemm_f32").

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
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=["int8", "int8pair", "int16", "lowbit", "vnni", "vnni512", "lowbit512", "amx"],
        help="default: the AVX2 four, plus vnni/vnni512/lowbit512 on an AVX-512 VNNI --mcpu and "
        "amx (--fused) on an AMX one; vnni is built with --vnni-mcpu and skipped when the CPU "
        "lacks VNNI",
    )
    p.add_argument("--mcpu", default="core-avx2", help='"host": this CPU (LLVM\'s name for it)')
    p.add_argument("--vnni-mcpu", default="host")
    p.add_argument(
        "--fbgemm-isa",
        default="auto",
        choices=["auto", "AVX2", "native", "both", "none"],
        help="auto: native for an AVX-512 VNNI --mcpu, AVX2 otherwise",
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="time the fused float-in/out kernels (qconv_fused) instead of the packed convs",
    )
    p.add_argument("--fbgemm-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args(argv)


def _resolve(args):
    """``host`` mcpus named, the fbgemm ISA and variant list fixed for the target."""
    from ..kernels.amx import target_has_amx
    from ..kernels.conv2d_int8 import default_target, host_mcpu, target_has_avx512_vnni

    args.mcpu = host_mcpu() if args.mcpu == "host" else args.mcpu
    args.vnni_mcpu = host_mcpu() if args.vnni_mcpu == "host" else args.vnni_mcpu
    avx512 = target_has_avx512_vnni(default_target(args.mcpu, args.threads))
    if args.fbgemm_isa == "auto":
        args.fbgemm_isa = "native" if avx512 else "AVX2"
    if args.variants is None:
        args.variants = ["int8", "int8pair", "int16", "lowbit"] + (["vnni", "vnni512", "lowbit512"] if avx512 else [])
        if args.fused and target_has_amx(default_target(args.mcpu, args.threads)):
            args.variants.append("amx")
    return args


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


def _fbgemm_f32_case(torch, n, c, size, seed=0):
    """float in, float out: quantize -> fbgemm conv (requantized) -> dequantize."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.quantize_per_tensor(torch.randn(c, c, 3, 3, generator=g) * 0.05, 0.002, 0, torch.qint8)
    packed = torch.ops.quantized.conv2d_prepack(w, torch.zeros(c), [1, 1], [1, 1], [1, 1], 1)
    return lambda: torch.ops.quantized.conv2d(
        torch.quantize_per_tensor(x, 1 / 255.0, 0, torch.quint8), packed, 0.05, 64
    ).dequantize()


#: --fused: (activation bits, int8 container, weight range) each variant is timed with
FUSED_CASES = {
    "int8": (7, False, (-128, 127)),
    "int8pair": (7, False, (-64, 63)),
    "int16": (8, False, (-200, 55)),  # DDTB 8-bit: weights beyond s8
    "lowbit": (4, False, (-8, 7)),
    "vnni": (8, False, (-128, 127)),
    "vnni512": (8, False, (-128, 127)),
    "vnni512_ddtb8": (8, False, (-200, 55)),  # weight shift + window sums
    "vnni512_u4": (4, False, (-8, 7)),  # the low-bit layers on an AVX-512 VNNI target
    "lowbit512": (4, False, (-8, 7)),
    "amx": (8, False, (-128, 127)),  # AMX tiles (fused only: no packed int32-out variant)
    "amx_ddtb8": (8, False, (-200, 55)),
    "amx_u4": (4, False, (-8, 7)),
}


def _fused_case(variant_label: str, n: int, c: int, size: int, target):
    import numpy as np
    import tvm

    from ..kernels.conv2d_int8 import Conv2dShape
    from ..kernels.qconv_fused import QConvSpec, pack_qconv_weights, qconv_primfunc

    bits, signed, (wlo, whi) = FUSED_CASES[variant_label]
    variant = variant_label.split("_")[0]
    shape = Conv2dShape(n, c, c, size, size, 3)
    spec = QConvSpec(shape, bits, signed, wlo, whi)
    exe = tvm.compile(tvm.IRModule({"main": qconv_primfunc(spec, variant)}), target=target)
    rng = np.random.default_rng(0)
    w = rng.integers(wlo, whi + 1, (c, c, 3, 3))
    w.flat[0], w.flat[1] = wlo, whi
    packed, sums = pack_qconv_weights(w, variant, spec.weight_shift if variant in ("vnni512", "amx") else None)
    dev = tvm.cpu()
    args = [
        rng.normal(0, 1, (n, c, size, size)).astype(np.float32),
        np.full(n, 0.02, np.float32),
        np.full(n, 0 if signed else 2 ** (bits - 1), np.float32),
        packed,
        sums,
        np.full(sums.shape[0], 0.005, np.float32),
    ]
    args = [tvm.runtime.tensor(a, dev) for a in args]
    y = tvm.runtime.empty((n, c, size, size), "float32", dev)
    f = exe["main"]
    return lambda: f(*args, y)


def _packed_case(variant: str, n: int, c: int, size: int, target):
    import numpy as np
    import tvm

    from ..kernels.conv2d_int8 import build_conv2d_int8

    k = build_conv2d_int8(n, c, c, size, size, 3, target, variant=variant)
    rng = np.random.default_rng(0)
    s, dev = k.shape, tvm.cpu()
    a = tvm.runtime.tensor(rng.integers(0, k.act_max + 1, s.act_shape()).astype(k.act_dtype), dev)
    w = tvm.runtime.tensor(
        rng.integers(k.w_min, k.w_max + 1, s.weight_shape(k.group, k.lanes)).astype(k.weight_dtype), dev
    )
    out = tvm.runtime.empty(s.out_shape(k.lanes), "int32", dev)
    return (lambda f=k.func: f(a, w, out)), k


def _time_calls(fn, calls):
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _summary(ops, times):
    import numpy as np

    return {
        "best_gops": ops / min(times) / 1e9,
        "median_gops": ops / float(np.median(times)) / 1e9,
        "best_ms": min(times) * 1e3,
        "median_ms": float(np.median(times)) * 1e3,
        "samples": len(times),
    }


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
    args = _resolve(_parse(argv))
    _setup_env(args)
    if args.fbgemm_only:
        return _fbgemm_only(args)

    import warnings

    import torch
    import tvm

    from ..kernels.amx import enable_amx
    from ..kernels.conv2d_int8 import AVX512_VARIANTS, default_target
    from ..kernels.x86_intrin import host_has_avx512_vnni, host_has_vnni

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "fbgemm"
    target = default_target(args.mcpu, args.threads)
    results = {}
    for size in args.sizes:
        n, c = args.batch, args.channels
        cases = {}
        for variant in args.variants:
            if variant == "vnni" and not host_has_vnni():
                print("skipping vnni: this CPU has neither AVX-VNNI nor AVX512-VNNI+VL", file=sys.stderr)
                continue
            if variant in AVX512_VARIANTS and not host_has_avx512_vnni():
                print(f"skipping {variant}: this CPU lacks AVX-512 F+BW+VNNI", file=sys.stderr)
                continue
            if variant == "amx" and not (args.fused and enable_amx()):
                print("skipping amx: --fused only, on a CPU (and kernel) with AMX", file=sys.stderr)
                continue
            tgt = default_target(args.vnni_mcpu, args.threads) if variant == "vnni" else target
            if args.fused:
                labels = [v for v in FUSED_CASES if v.split("_")[0] == variant]
                for label in labels:
                    cases[f"tvm_{label}"] = (_fused_case(label, n, c, size, tgt), None)
            else:
                cases[f"tvm_{variant}"] = _packed_case(variant, n, c, size, tgt)
        if args.fbgemm_isa != "none":
            label = "fbgemm_avx2" if args.fbgemm_isa in ("AVX2", "both") else "fbgemm_native"
            cases[label] = (_fbgemm_case(torch, n, c, size), None)
            if args.fused:
                cases[label + "_f32"] = (_fbgemm_f32_case(torch, n, c, size), None)
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
        cmd = [
            sys.executable,
            "-m",
            __spec__.name if __spec__ else "refqsr_engine.benchmarks.conv_int8",
            "--fbgemm-only",
            "--fbgemm-isa",
            "native",
            "--threads",
            str(args.threads),
            "--batch",
            str(args.batch),
            "--channels",
            str(args.channels),
            "--rounds",
            str(args.rounds),
            "--calls",
            str(args.calls),
            "--sizes",
            *map(str, args.sizes),
        ]
        env = {k: v for k, v in os.environ.items() if k != "FBGEMM_ENABLE_INSTRUCTIONS"}
        child = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        for size in args.sizes:
            results[size]["fbgemm_native (separate process)"] = child[str(size)]

    if args.json:
        print(json.dumps(results, indent=1))
        return results
    print(
        f"conv 3x3 {args.channels}->{args.channels}, batch {args.batch}, threads {args.threads} "
        f"(TVM {tvm.runtime.num_threads()}, torch {torch.get_num_threads()}), mcpu {args.mcpu}, "
        f"fbgemm ISA {args.fbgemm_isa}, {'fused float-in/out' if args.fused else 'packed int32-out'} kernels"
    )
    ref_name = next((k for k in ("fbgemm_avx2", "fbgemm_native") if k in results[args.sizes[0]]), None)
    int8_name = "tvm_vnni512" if "tvm_vnni512" in results[args.sizes[0]] else "tvm_int8"
    int8_name = int8_name if int8_name in results[args.sizes[0]] else None
    print(
        f"{'size':>5} {'kernel':<34} {'best GOP/s':>10} {'median':>8} {'best ms':>8}"
        + (f"  {'x ' + ref_name:>18}" if ref_name else "")
        + (f"  {'x ' + int8_name:>14}" if int8_name else "")
    )
    for size in args.sizes:
        for name, r in results[size].items():
            line = f"{size:>5} {name:<34} {r['best_gops']:>10.1f} {r['median_gops']:>8.1f} {r['best_ms']:>8.2f}"
            for ref, width in ((ref_name, 18), (int8_name, 14)):
                if ref:
                    line += f"  {r['median_gops'] / results[size][ref]['median_gops']:>{width}.2f}"
            print(line)
    print("(ratios of median GOP/s)")
    return results


if __name__ == "__main__":
    main()
