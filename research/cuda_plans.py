"""Which kernel every conv of every bundled model takes on CUDA, per arch, without building code.

    python -m research.cuda_plans [--arch sm_80 sm_90] [--models NAME ...] [--out FILE.json]

Each model is exported to ONNX (patch 96) and each graph imported at batch 16 and put through the
CUDA rewrite (:func:`~refqsr_engine.engine.compiler.cuda_build.rewrite_qdq_convs_cuda`), the same
decisions ``compile --target cuda`` makes, minus nvcc: per graph, the variant of each conv, the
quantized convs left in float (``float_quantized``, with the reason) and the full-precision convs
left off f16mma (``f16_fallback``). Prints one line per model, graph and arch; exit 1 if any
quantized conv stays float.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def plan_model(name: str, arches: list[str], patch: int = 96, batch: int = 16) -> dict[str, Any]:
    import onnx
    from refqsr_engine.engine.compiler.cuda_build import import_graph_cuda, rewrite_qdq_convs_cuda
    from refqsr_engine.engine.compiler.relax_import import graph_metadata
    from refqsr_engine.engine.models_store import resolve_model
    from refqsr_engine.export.onnx_export import export_refqsr, export_sr
    from refqsr_engine.models.checkpoint import load_model
    from refqsr_engine.models.model_info import model_bits
    from refqsr_engine.models.refqsr import RefQSR

    model, _ = load_model(resolve_model(name))
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, RefQSR):
            graphs = export_refqsr(model, Path(tmp), patch)
        else:
            graphs = export_sr(model, model_bits(model), Path(tmp), patch)
        for graph, path in graphs.items():
            proto = onnx.load(str(path))
            table = graph_metadata(proto)["convs"]
            for arch in arches:
                mod, _, _ = import_graph_cuda(proto, batch)
                _, result = rewrite_qdq_convs_cuda(mod, table, twin=True, arch=arch)
                variants = [c.variant for c in result.convs]
                out[f"{graph}@{arch}"] = {
                    "convs": len(variants),
                    "variants": dict(collections.Counter(str(v) for v in variants)),
                    "float_quantized": {str(i): why for i, why in result.float_reasons.items()},
                    "f16_fallback": {str(i): why for i, why in result.f16_fallback.items()},
                    "dp4a_why": {str(i): why for i, why in result.no_mma_reasons.items()},
                }
    return out


def main(argv: list[str] | None = None) -> int:
    from refqsr_engine.engine.models_store import bundled_models

    p = argparse.ArgumentParser(prog="python -m research.cuda_plans", description=__doc__)
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    p.add_argument("--models", nargs="+", default=None, help="bundled model names (default: all)")
    p.add_argument("--out", type=Path, default=None, help="write every plan as JSON")
    args = p.parse_args(argv)
    plans, bad = {}, 0
    for name in args.models or bundled_models():
        plans[name] = plan_model(name, args.arch)
        for key, plan in plans[name].items():
            bad += len(plan["float_quantized"])
            print(
                f"{name:26s} {key:18s} convs {plan['convs']:3d}  {plan['variants']}"
                f"  float_quantized {len(plan['float_quantized'])}  f16_fallback {len(plan['f16_fallback'])}",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(plans, indent=1) + "\n")
    print(f"quantized convs left in float: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
