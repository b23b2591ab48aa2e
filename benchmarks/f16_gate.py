"""PSNR-Y of the CUDA graph's fp16 float convs against the same graph with fp32 float convs, on
the CPU through the LLVM twins (no GPU needed).

    python -m refqsr_engine.benchmarks.f16_gate                     # default model, 4 val images, 48 x 48 LR
    python -m refqsr_engine.benchmarks.f16_gate --val data/sr/val --limit 4 --patch 48
    python -m refqsr_engine.benchmarks.f16_gate --compare epilogue  # fused fp16 epilogues vs fp32 ones
    python -m refqsr_engine.benchmarks.f16_gate --compare storage   # fp16 activations between kernels vs fp32
    python -m refqsr_engine.benchmarks.f16_gate --compare all       # all three changes against fp32

The model's reference graph (a whole 4x SR network: the graph that upscales reference patches) is
exported at ``--patch`` and rewritten for CUDA twice (:func:`~..engine.compiler.cuda_build.build_graph_twin`):
with every full-precision conv on f16mma (activations and weights rounded to fp16 as the GPU
kernel rounds them, fp32 sums) and with them left fp32. Both run on the centre ``4*patch`` crops
of the validation images (one LR patch each, the integer convs identical in both), and PSNR-Y
(shave 4, 8-bit output) against the HR crop is reported per image and as the mean; the gate is a
mean drop of at most 0.01 dB.

With ``--compare epilogue`` both builds have the float convs on f16mma, and what differs is the
integer convs' epilogue: dequantized in the s4mma / s8mma kernel and stored in fp16 (the
default) against int32 sums dequantized in fp32 by Relax ops. With ``--compare storage`` both
have f16mma and fused epilogues, and what differs is the activations the kernels pass each other:
in fp16 (the default, :mod:`~..engine.compiler.half_storage`, with each conv's bias add and ReLU
in its kernel's epilogue where nothing else reads its output) against fp32.
``--compare all`` sets the CUDA graph as compiled (f16mma, fused epilogues, fp16 storage) against
fp32 float convs, fp32 epilogues and fp32 storage. Same gate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

GATE_DB = 0.01


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--val", default=None, help="validation folder or held-out set name (default data/sr/val)")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--arch", default="sm_80")
    ap.add_argument("--compare", choices=["f16", "epilogue", "storage", "all"], default="f16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # (key, f16, fuse_epilogue, half_storage) of the baseline and the candidate build
    builds = {
        "f16": (("fp32", False, False, False), ("f16mma", True, False, False)),
        "epilogue": (("fp32_epilogue", True, False, False), ("fp16_epilogue", True, True, False)),
        "storage": (("fp32_storage", True, True, False), ("fp16_storage", True, True, True)),
        "all": (("fp32", False, False, False), ("f16mma_fused_half", True, True, True)),
    }[args.compare]

    import onnx
    import tvm
    from tvm import relax

    from ..engine.compiler.cuda_build import build_graph_twin
    from ..engine.models_store import resolve_model
    from ..export.onnx_export import export_refqsr, export_sr
    from ..kernels.conv2d_cuda import DEQUANT_EPILOGUES
    from ..metrics.quality import psnr_y, sr_to_uint8
    from ..models.checkpoint import load_model
    from ..models.refqsr import RefQSR
    from .valdata import SCALE, validation_set

    p = args.patch
    pairs, info = validation_set(args.val, crop=(SCALE * p, SCALE * p), limit=args.limit)
    pairs = [q for q in pairs if q.lr.shape[:2] == (p, p)]
    lr = np.stack([q.lr.transpose(2, 0, 1) for q in pairs]).astype(np.float32) / 255.0
    model, _ = load_model(resolve_model(args.model))
    model.eval()
    with tempfile.TemporaryDirectory(prefix="refqsr-f16gate-") as tmp:
        if isinstance(model, RefQSR):
            path = export_refqsr(model, f"{tmp}/onnx", p)["reference"]
        else:
            from ..models.model_info import model_bits

            path = export_sr(model, model_bits(model), f"{tmp}/onnx", p)["sr"]
        graph = onnx.load(str(path))
    out: dict[str, dict[str, float]] = {}
    seconds = {}
    plans = {}
    half = 0
    for key, f16, fuse, store in builds:
        t = time.perf_counter()
        exe, result = build_graph_twin(
            graph, len(pairs), arch=args.arch, f16=f16, fuse_epilogue=fuse, half_storage=store
        )
        y = relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(lr))
        sr = (y if hasattr(y, "numpy") else y[0]).numpy()
        seconds[key] = round(time.perf_counter() - t, 1)
        out[key] = {q.name: psnr_y(sr_to_uint8(s), q.hr, shave=SCALE) for q, s in zip(pairs, sr)}
        if f16:
            plans = {str(i): v["folding"] for i, v in result.float_plans.items()}
        fused = sum(r.get("epilogue") in DEQUANT_EPILOGUES for r in result.roofline.values())
        half = result.half_tensors
    base, cand = builds[0][0], builds[1][0]
    mean = {k: float(np.mean(list(v.values()))) for k, v in out.items()}
    drop = mean[base] - mean[cand]
    report = {
        "model": args.model,
        "graph": "reference" if isinstance(model, RefQSR) else "sr",
        "val": info["source"],
        "lr_patch": p,
        "images": {q.name: {k: round(out[k][q.name], 4) for k in out} for q in pairs},
        "mean_psnr_y": {k: round(v, 4) for k, v in mean.items()},
        "drop_db": round(drop, 4),
        "gate_db": GATE_DB,
        "passes": drop <= GATE_DB,
        "f16mma_convs": len(plans),
        "fused_epilogues": fused,
        "half_tensors": half,
        "seconds": seconds,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{args.model} {report['graph']} graph, {len(pairs)} images ({info['source']}), LR {p} x {p}")
        for name, v in report["images"].items():
            print(f"  {name:<32} {base} {v[base]:.4f} dB   {cand} {v[cand]:.4f} dB")
        print(
            f"  mean PSNR-Y {base} {mean[base]:.4f} dB, {cand} {mean[cand]:.4f} dB: drop {drop:.4f} dB "
            f"(gate {GATE_DB} dB: {'pass' if report['passes'] else 'FAIL'}); {len(plans)} float convs on f16mma, "
            f"{fused} integer convs with the fused epilogue, {half} activations stored in fp16"
        )
    return 0 if report["passes"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
