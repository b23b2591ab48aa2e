"""Per-kernel time profile of a compiled artifact's graphs: which kernels a speed-up should start from.

    python -m refqsr_engine.benchmarks.profile_graphs ARTIFACT [--graph query] [--batch 8] [--top 15]

Each graph runs once to warm up, then ``--repeats`` times with a VM instrument that timestamps every
call instruction (our TIR kernels, the packed integer convs, VM builtins). The kernels run
synchronously on the CPU, so the time between a call's before- and after-hook is the kernel's.
Calls are grouped by kernel name and
listed by total time with their share of the graph; the patch inputs are random images and the
RefER inputs the reference graph's own outputs, so the data-dependent kernels (quantizer ranges,
arg-max flow) do real work.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from refqsr_engine.errors import RefQSRError


class _CallTimer:
    """A Relax VM instrument: wall time of every call instruction, summed per kernel kind."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        self._stack: list[float] = []

    def __call__(self, func: Any, symbol: str, before_run: bool, ret_value: Any, *args: Any) -> int:
        if before_run:
            self._stack.append(time.perf_counter())
        else:
            start = self._stack.pop()
            key = re.sub(r"\d+$", "", str(symbol)).rstrip("_")  # conv2d_3 and conv2d_7 are one kind
            self.totals[key][0] += 1
            self.totals[key][1] += (time.perf_counter() - start) * 1000.0
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    def rows(self, repeats: int) -> list[dict[str, Any]]:
        return [{"name": k, "calls": int(v[0]) // repeats, "ms": v[1] / repeats} for k, v in self.totals.items()]


def profile_graph(
    artifact: str | Path, graph: str, batch: int | None = None, repeats: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Profile one graph of an artifact; returns {graph, batch, total_ms, kernels: [...] by time}."""
    import tvm
    from refqsr_engine.engine.runtime import CompiledModel
    from tvm import relax

    engine = CompiledModel.load(artifact)
    names = ("clustblock", "reference", "query") if engine.refqsr else ("sr",)
    if graph not in names:
        raise RefQSRError(f"graph {graph!r} is not in this artifact; it has {', '.join(names)}")
    b = batch or engine.batches[0]
    if b not in engine.batches:
        raise RefQSRError(f"batch {b} was not compiled; the artifact has {engine.batches}")
    rng = np.random.default_rng(seed)
    x = rng.random((b, 3, engine.patch, engine.patch), dtype=np.float32)
    inputs = [x]
    if graph == "query":
        _, feats = engine.reference(x[::-1].copy())
        inputs += feats
    lib = tvm.runtime.load_module(str(engine.artifact.file(f"{graph}_b{b}.so")))
    vm = relax.VirtualMachine(lib, engine.device)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a, dtype=np.float32), engine.device) for a in inputs]
    vm["main"](*args)  # warm-up (first-call allocations, thread pool start)
    t0 = time.perf_counter()
    for _ in range(repeats):
        vm["main"](*args)
    wall_ms = (time.perf_counter() - t0) * 1000.0 / repeats
    timer = _CallTimer()
    vm.set_instrument(tvm.runtime.convert(timer) if hasattr(tvm.runtime, "convert") else timer)
    for _ in range(repeats):
        vm["main"](*args)
    rows = timer.rows(repeats)
    total = sum(r["ms"] for r in rows)
    for r in rows:
        r["share"] = r["ms"] / total if total else 0.0
    rows.sort(key=lambda r: -r["ms"])
    return {"graph": graph, "batch": b, "patch": engine.patch, "total_ms": total, "wall_ms": wall_ms, "kernels": rows}


def format_profile(prof: dict[str, Any], top: int) -> str:
    lines = [
        f"{prof['graph']} graph, batch {prof['batch']} of {prof['patch']}-px patches: "
        f"{prof['wall_ms']:.1f} ms per run uninstrumented ({prof['wall_ms'] / prof['batch']:.1f} ms per patch), "
        f"{prof['total_ms']:.1f} ms in timed calls",
        f"{'kernel':60s} {'calls':>6s} {'ms':>9s} {'share':>6s}",
    ]
    for r in prof["kernels"][:top]:
        lines.append(f"{r['name'][:60]:60s} {r['calls']:6d} {r['ms']:9.2f} {100 * r['share']:5.1f}%")
    rest = prof["kernels"][top:]
    if rest:
        lines.append(
            f"{'(' + str(len(rest)) + ' more)':60s} {sum(r['calls'] for r in rest):6d} "
            f"{sum(r['ms'] for r in rest):9.2f} {100 * sum(r['share'] for r in rest):5.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m refqsr_engine.benchmarks.profile_graphs", description=__doc__.split("\n")[0]
    )
    ap.add_argument("artifact", help="compiled artifact directory (refqsr-engine compile -o DIR)")
    ap.add_argument("--graph", action="append", help="graph(s) to profile (default: all of the artifact's)")
    ap.add_argument("--batch", type=int, default=None, help="compiled batch size to run (default: the largest)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the profiles to this file")
    a = ap.parse_args(argv)
    try:
        from refqsr_engine.engine.artifact import load_artifact

        manifest = load_artifact(a.artifact).manifest
        graphs = a.graph or (["clustblock", "reference", "query"] if manifest["kind"] == "refqsr" else ["sr"])
        profiles = [profile_graph(a.artifact, g, a.batch, a.repeats) for g in graphs]
    except RefQSRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n\n".join(format_profile(p, a.top) for p in profiles))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(profiles, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
