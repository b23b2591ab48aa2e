"""Compile one exported graph to a TVM Relax VM executable (LLVM CPU).

    ONNX --prepare (fixed batch, folded constants)--> --fuse RefER warps--> Relax (from_onnx)
         --QDQ convs -> integer kernels--> legalize + fuse --> schedule the rest --> VM executable

The Relax pipeline is spelled out (the CPU default would leave every legalized op serial).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import onnx
import tvm
from tvm import relax

from ...kernels.amx import target_has_amx
from ...kernels.tir_build import as_target
from .cpu_schedule import cpu_schedule_pass, vector_lanes
from .float_conv_amx import DEFAULT_TERMS, rewrite_float_convs
from .qdq_conv import ConvReport, rewrite_qdq_convs
from .relax_import import graph_metadata, import_graph, static_input_shapes


@dataclass
class GraphBuild:
    """A compiled graph and what went into it."""

    name: str
    executable: Any  # tvm.relax.VMExecutable
    inputs: dict[str, list[int]]
    outputs: list[str]
    convs: list[ConvReport]
    refer_warps: int
    seconds: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "outputs": self.outputs,
            "integer_convs": sum(c.variant is not None for c in self.convs),
            "float_convs": sum(c.variant is None for c in self.convs),
            "variants": [c.variant for c in self.convs],
            "act_bits": [c.act_bits for c in self.convs],
            "refer_warps": self.refer_warps,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def _fast_softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Softmax with TVM's polynomial exp (vectorizes; relative error ~1e-7) instead of the libm
    call per element that ``exp`` becomes in LLVM: ELAN's window attention spends most of its
    softmax time in exp otherwise."""
    from tvm import topi

    return bb.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis))


#: Relax ops legalized our way on CPU targets
CPU_LEGALIZE = {"relax.nn.softmax": _fast_softmax}


def cpu_pipeline(target: tvm.target.Target, float_terms: int = DEFAULT_TERMS) -> tvm.transform.Pass:
    """The Relax build pipeline for an LLVM CPU target; ``float_terms``: bf16 products per MAC of
    the float convs on AMX targets (3: fp32-grade, 1: bf16)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    num_cores = int(target.attrs.get("num-cores", 1) or 1)

    @tvm.transform.module_pass(opt_level=0, name="RefQSRCpuPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if target_has_amx(target):  # the float convs with constant weights on bf16x3 AMX tiles
            for gv, func in list(mod.functions.items()):
                if isinstance(func, relax.Function):
                    mod, _ = rewrite_float_convs(mod, float_terms, func_name=gv.name_hint)
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                # the CPU default's legalize passes minus FoldConstant: constants were folded in
                # ONNX already, and Relax's folder compiles and runs a kernel per constant
                # expression (12 of 18 s of a 4-block graph's build)
                + [
                    relax.transform.LegalizeOps(customize_legalize_map=CPU_LEGALIZE),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                ]
                + [cpu_schedule_pass(num_cores, vector_lanes(target))]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def build_graph(
    model: onnx.ModelProto, name: str, batch: int, target=None, float_terms: int = DEFAULT_TERMS
) -> GraphBuild:
    """Compile ``model`` for ``batch`` patches per call on an LLVM ``target`` (``float_terms``: see
    :func:`cpu_pipeline`)."""
    tgt = as_target(target)
    from tvm.target import codegen

    vnni = bool(codegen.target_has_features("avxvnni", tgt) or codegen.target_has_features("avx512vnni", tgt))
    times = {}
    t0 = time.perf_counter()
    meta = graph_metadata(model)
    shapes = static_input_shapes(model, batch)
    mod, warps = import_graph(model, shapes, tgt)
    t1 = time.perf_counter()
    mod, result = rewrite_qdq_convs(mod, meta["convs"], vnni=vnni, target=tgt)
    t2 = time.perf_counter()
    exe = tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt, float_terms))
    t3 = time.perf_counter()
    times.update({"import": t1 - t0, "integer_convs": t2 - t1, "codegen": t3 - t2})
    outputs = [o.name for o in model.graph.output]
    return GraphBuild(name, exe, shapes, outputs, result.convs, warps, times)
