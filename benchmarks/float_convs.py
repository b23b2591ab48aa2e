"""The compiled engine's float convs against PyTorch (oneDNN), one SRResNet x4 conv shape at a time.

    python -m refqsr_engine.benchmarks.float_convs [--quick] [--batch 16 4] [--mcpu host core-avx2]
        [--threads 2] [--repeats 5] [--out float_convs.json]

Each shape (conv + bias, fp32, NCHW) is built as a one-conv Relax module through the engine's own
pipeline (:func:`refqsr_engine.engine.compiler.build.cpu_pipeline`: on AMX targets the bf16x3 tile
kernels where they cover the shape, else legalize, fuse, schedule with the weight pre-packed) and
run in the Relax VM; PyTorch runs ``torch.nn.functional.conv2d`` on the
same tensors. All use ``--threads`` threads; for each shape every ``--mcpu`` build and PyTorch are
timed alternately (one warm-up each), so rows of one shape compare side by side, and the table
gives the median of ``--repeats`` runs, GFLOP/s (2 x MACs) and TVM / PyTorch speed.
``--quick``: batch 1, 3 repeats, the 192 / 384 px shapes at half size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ConvShape:
    name: str
    cin: int
    cout: int
    kernel: int
    size: int  # input height = width

    @property
    def pad(self) -> int:
        return self.kernel // 2

    def gflop(self, batch: int) -> float:
        return 2.0 * batch * self.cout * self.cin * self.kernel**2 * self.size**2 / 1e9


#: SRResNet x4's float convs (head, body when unquantized, upsampler at LR and 2x, tail at 4x)
SHAPES = (
    ConvShape("head 3->64 9x9", 3, 64, 9, 96),
    ConvShape("body 64->64 3x3", 64, 64, 3, 96),
    ConvShape("up1 64->256 3x3", 64, 256, 3, 96),
    ConvShape("up2 64->256 3x3", 64, 256, 3, 192),
    ConvShape("tail 64->3 9x9", 64, 3, 9, 384),
)


def conv_module(shape: ConvShape, batch: int, weight: np.ndarray, bias: np.ndarray):
    """A Relax module ``main(x) = conv2d(x, weight) + bias`` with the parameters as constants."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, shape.cin, shape.size, shape.size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=shape.pad))
            y = bb.emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod: tvm.IRModule = bb.get()
    return mod


def build_conv(shape: ConvShape, batch: int, weight: np.ndarray, bias: np.ndarray, target) -> Callable:
    """The engine's build of one conv: returns ``f(x: tvm tensor) -> tvm tensor``."""
    import tvm
    from tvm import relax

    from ..engine.compiler.build import cpu_pipeline

    tgt = tvm.target.Target(target)
    exe = tvm.compile(conv_module(shape, batch, weight, bias), target=tgt, relax_pipeline=cpu_pipeline(tgt))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    return vm["main"]


def _time(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(shape: ConvShape, batch: int, targets: list[dict], repeats: int, seed: int = 0) -> list[dict[str, Any]]:
    """Build, check and time one shape on every target and in torch, the runs alternating
    (target 1, target 2, ..., torch, target 1, ...) so that all see the same machine load."""
    import torch
    import tvm

    rng = np.random.default_rng(seed)
    w = (
        rng.standard_normal((shape.cout, shape.cin, shape.kernel, shape.kernel)) / shape.kernel / np.sqrt(shape.cin)
    ).astype(np.float32)
    b = rng.standard_normal(shape.cout).astype(np.float32)
    x = rng.random((batch, shape.cin, shape.size, shape.size), dtype=np.float32)
    xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
    xv = tvm.runtime.tensor(x)

    def run_torch():
        with torch.no_grad():
            return torch.nn.functional.conv2d(xt, wt, bt, padding=shape.pad)

    want = run_torch().numpy()
    built = []
    for target in targets:
        t0 = time.perf_counter()
        f = build_conv(shape, batch, w, b, target)
        built.append((target, f, time.perf_counter() - t0, float(np.max(np.abs(f(xv).numpy() - want)))))
    tvm_s: list[list[float]] = [[] for _ in built]
    torch_s = []
    for _ in range(repeats):
        for i, (_, f, _, _) in enumerate(built):
            tvm_s[i].append(_time(lambda f=f: f(xv)))
        torch_s.append(_time(run_torch))
    t_torch, gflop = statistics.median(torch_s), shape.gflop(batch)
    rows = []
    for (target, _, build_s, err), runs in zip(built, tvm_s):
        t_tvm = statistics.median(runs)
        rows.append(
            {
                "shape": shape.name,
                **asdict(shape),
                "batch": batch,
                "mcpu": target["mcpu"],
                "gflop": gflop,
                "tvm_ms": 1e3 * t_tvm,
                "torch_ms": 1e3 * t_torch,
                "tvm_gflops": gflop / t_tvm,
                "torch_gflops": gflop / t_torch,
                "ratio": t_torch / t_tvm,
                "max_abs_err": err,
                "build_s": build_s,
                "tvm_runs_ms": [1e3 * t for t in runs],
                "torch_runs_ms": [1e3 * t for t in torch_s],
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'shape':<18} {'px':>4} {'batch':>5} {'mcpu':<11} {'TVM ms':>9} {'torch ms':>9} {'TVM GF/s':>9} "
        f"{'torch GF/s':>10} {'ratio':>6} {'max err':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['shape']:<18} {r['size']:>4} {r['batch']:>5} {r['mcpu']:<11} "
            f"{r['tvm_ms']:>9.2f} {r['torch_ms']:>9.2f} "
            f"{r['tvm_gflops']:>9.1f} {r['torch_gflops']:>10.1f} {r['ratio']:>6.2f} {r['max_abs_err']:>8.1e}"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m refqsr_engine.benchmarks.float_convs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="batch 1, 3 repeats, the big shapes at half size")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 16 4; --quick: 1)")
    p.add_argument(
        "--mcpu", nargs="+", default=["host", "core-avx2"], help="LLVM CPUs to build for ('host' = this CPU)"
    )
    p.add_argument("--shapes", nargs="+", default=None, help="shape names' first words (head body up1 up2 tail)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per shape (default 5; --quick: 3)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    import torch

    from ..engine.compiler.options import host_mcpu

    torch.set_num_threads(args.threads)
    batches = args.batch or ([1] if args.quick else [16, 4])
    repeats = args.repeats or (3 if args.quick else 5)
    shapes = [s for s in SHAPES if args.shapes is None or s.name.split()[0] in args.shapes]
    if args.quick:
        shapes = [ConvShape(s.name, s.cin, s.cout, s.kernel, min(s.size, 96 if s.size <= 192 else 192)) for s in shapes]
    targets = [
        {"kind": "llvm", "mcpu": host_mcpu() if mcpu == "host" else mcpu, "num-cores": args.threads}
        for mcpu in args.mcpu
    ]
    rows = []
    for batch in batches:
        for shape in shapes:
            for row in measure(shape, batch, targets, repeats):
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    if args.out is not None:
        import tvm

        meta = {
            "threads": args.threads,
            "repeats": repeats,
            "quick": args.quick,
            "tvm": tvm.__version__,
            "torch": torch.__version__,
            "host_mcpu": host_mcpu(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
