"""The RefER matching + warping kernel (:mod:`refqsr_engine.kernels.refer_kernels`, the whole
hard-matching pipeline) against its PyTorch twin, in one process.

    python -m refqsr_engine.benchmarks.refer_pipeline [N C H W]     # default 16 64 96 96

Prints (as JSON) the build time, whether both give bit-identical outputs, and the best and median
milliseconds per call of each, interleaved round by round.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
import tvm

from ..kernels.refer_kernels import build_refer_pipeline
from ..models.matching import POOL, backward_warp, normalize_and_pool, pooled_flow, upsample_flow
from ..models.quant_base import fake_quantize


def benchmark_pipeline(
    batch: int = 16,
    channels: int = 64,
    height: int = 96,
    width: int = 96,
    *,
    rounds: int = 5,
    calls: int = 2,
    torch_threads: int | None = None,
    target=None,
    seed: int = 0,
) -> dict:
    """Milliseconds per call of the compiled pipeline and of its PyTorch twin
    (``backward_warp(fr, RefER.flow(fq, fr, hard=True))`` written out with models.matching and a
    4-bit PAMS grid), interleaved round by round; best and median. TVM uses ``TVM_NUM_THREADS``
    (default: the CPU count), torch ``torch_threads`` (default: the same count)."""
    threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(int(torch_threads or threads))
    rng = np.random.default_rng(seed)
    fq = rng.standard_normal((batch, channels, height, width), dtype=np.float32)
    fr = rng.standard_normal((batch, channels, height, width), dtype=np.float32)
    scale, zp, qmin, qmax = np.float32(0.3 / 7), np.float32(0.0), -7, 7
    t0 = time.perf_counter()
    kernel = build_refer_pipeline(batch, channels, height, width, qmin, qmax, target=target, pool=POOL)
    build_s = time.perf_counter() - t0

    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (fq, fr, np.array([scale]), np.array([zp]))]
    outs = kernel.empty_outputs(dev)
    tq, tr = torch.from_numpy(fq), torch.from_numpy(fr)
    ts, tz = torch.tensor(scale), torch.tensor(zp)

    def run_torch():
        with torch.no_grad():
            q = torch.round(fake_quantize(normalize_and_pool(tq), ts, tz, qmin, qmax) / ts)
            r = torch.round(fake_quantize(normalize_and_pool(tr), ts, tz, qmin, qmax) / ts)
            flow = upsample_flow(pooled_flow(q, r, (height, width), hard=True), (height, width))
            return backward_warp(tr, flow), flow

    def run_tvm():
        kernel.func(*args, *outs)

    run_torch()
    run_tvm()
    warped_t, flow_t = run_torch()
    exact = bool(np.array_equal(outs[0].numpy(), warped_t.numpy()) and np.array_equal(outs[1].numpy(), flow_t.numpy()))
    times = {"tvm": [], "torch": []}
    for _ in range(rounds):
        for name, fn in (("tvm", run_tvm), ("torch", run_torch)):
            for _ in range(calls):
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1e3)
    res = {
        "shape": [batch, channels, height, width],
        "tvm_threads": threads,
        "torch_threads": torch.get_num_threads(),
        "build_s": round(build_s, 2),
        "bit_exact": exact,
    }
    for name, t in times.items():
        res[f"{name}_ms"] = round(float(np.median(t)), 2)
        res[f"{name}_best_ms"] = round(float(np.min(t)), 2)
    res["speedup_median"] = round(res["torch_ms"] / res["tvm_ms"], 2)
    return res


def main(argv=None) -> dict:
    dims = [int(a) for a in (sys.argv[1:5] if argv is None else argv)] or [16, 64, 96, 96]
    res = benchmark_pipeline(*dims)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
