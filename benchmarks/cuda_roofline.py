"""Per-patch roofline of a CUDA artifact's conv kernels beside PyTorch fp16's bound.

    python -m refqsr_engine.benchmarks.cuda_roofline                       # default model, sm_80, compiled here
    python -m refqsr_engine.benchmarks.cuda_roofline --model srresnet_ddtb4 --arch sm_90
    python -m refqsr_engine.benchmarks.cuda_roofline --artifact ART        # an artifact's manifest

For every graph, the manifest's per-conv ``roofline`` (each conv kernel's lower bound on its time
from datasheet peaks: max(issued MACs / tensor-core peak, bytes / bandwidth), integer convs on
int8 / int4, full-precision convs on fp16 tensor cores) is summed and divided by the batch: the
conv kernels' bound per patch on an A100 SXM4 and an H100 SXM5. Beside it, PyTorch fp16's bound:
the graph's useful MACs (every conv, real channels) at the dense fp16 tensor-core peak, the best a
network run in fp16 could do on the same GPU whatever its kernels. The "+others" column adds
every other kernel the compiled graph runs (packs, epilogues, shift-adds, DDTB's bound
computations, concatenations, pixel shuffles, RefER warps: the manifest's ``kernel_traffic``,
counted on the lowered graph, each kernel's tensors read or written once, at the memory
bandwidth).

Two more columns put the compute-only bound in context. "fp16 layers": the same convs as a
layer-by-layer fp16 framework runs them (each conv's fp16 input, weights and output moved once,
max of its fp16 MAC time and its memory time): a like-for-like bound for PyTorch fp16. "float
floor": that sum over the full-precision convs alone, which the engine runs in fp16 too: no
schedule that runs one layer per kernel can go below it, whatever its integer convs do. The H100
has no int4 tensor cores: a build with ``s4mma`` kernels (sm_80/86/89) has no H100 figure (use
``--arch sm_90``). All are bounds computed from shapes, not measurements.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

GPUS = ("A100", "H100")


def graph_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per graph of a CUDA artifact's manifest: convs, useful MACs per patch, and per GPU
    (microseconds per patch) the summed conv roofline, the other kernels, the fp16 bound, the fp16
    layer-by-layer bound and the float floor; None where the figure does not apply (an int4
    kernel on a GPU without int4 tensor cores) or the manifest predates it."""
    from ..engine.compiler.cuda_build import DATASHEET_PEAKS

    batch = int(manifest["batch"])
    rows = []
    for name, graph in manifest["graphs"].items():
        roof = graph["roofline"].values()
        useful = sum(r["useful_macs"] for r in roof)
        row: dict[str, Any] = {
            "graph": name,
            "convs": len(roof),
            "f16mma": graph.get("f16mma_convs", 0),
            "useful_gmacs_per_patch": useful / batch / 1e9,
        }

        def per_patch(key: str, rows=roof) -> float | None:
            values = [r.get(key) for r in rows]
            return None if None in values else sum(values) / batch

        for gpu in GPUS:
            native = all(r["variant"] in DATASHEET_PEAKS[gpu] or r["variant"] == "dp4a" for r in roof)
            row[f"{gpu}_us"] = per_patch(f"{gpu}_us") if native else None
            traffic = graph.get("kernel_traffic")
            row[f"{gpu}_others_us"] = traffic[f"{gpu}_other_us"] if traffic and native else None
            row[f"{gpu}_fp16_us"] = useful / DATASHEET_PEAKS[gpu]["f16mma"] * 1e6 / batch
            row[f"{gpu}_fp16_layers_us"] = per_patch(f"{gpu}_fp16_layer_us")
            floats = [r for r in roof if r["variant"] == "f16mma"]
            row[f"{gpu}_float_floor_us"] = per_patch(f"{gpu}_fp16_layer_us", floats)
        rows.append(row)
    return rows


def _manifest(args) -> dict[str, Any]:
    if args.artifact:
        return json.loads((Path(args.artifact) / "manifest.json").read_text())
    from ..engine.compiler.compile_model import compile_model
    from ..engine.compiler.options import CompileOptions

    opts = CompileOptions(model=args.model, target="cuda", arch=args.arch, patch=args.patch, batch=args.batch)
    with tempfile.TemporaryDirectory(prefix="refqsr-roofline-") as tmp:
        compile_model(opts, Path(tmp) / "artifact", keep_onnx=False)
        return json.loads((Path(tmp) / "artifact" / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--arch", default="sm_80", choices=["sm_80", "sm_86", "sm_89", "sm_90"])
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--artifact", help="read this CUDA artifact's manifest instead of compiling")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    man = _manifest(args)
    rows = graph_rows(man)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    model = man.get("model", {}).get("name", args.model)
    print(f"{model}, {man['target']['arch']}, patch {man['patch']}, batch {man['batch']}: microseconds per patch")
    cols = ("convs", "+others", "fp16 bound", "fp16 layers", "float floor")
    keys = ("_us", "_others_us", "_fp16_us", "_fp16_layers_us", "_float_floor_us")
    for gpu in GPUS:
        print(f"{gpu:<11}{'convs':>6}{'f16mma':>7}{'GMAC':>8}" + "".join(f"{c:>13}" for c in cols))
        for r in rows:
            line = f"{r['graph']:<11}{r['convs']:>6}{r['f16mma']:>7}{r['useful_gmacs_per_patch']:>8.3f}"
            for key in keys:
                v = r[gpu + key]
                if v is not None and key == "_others_us":
                    v += r[gpu + "_us"]
                line += f"{'-':>13}" if v is None else f"{v:>13.2f}"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
