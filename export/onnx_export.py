"""Trained PyTorch models -> ONNX graphs in standard QDQ form (opset 17, dynamic batch).

A RefQSR model becomes three graphs, the units the runtime schedules:
  clustblock.onnx  patches [N,3,P,P]                        -> logits [N,C]
  reference.onnx   patches                                  -> hr [N,3,sP,sP], ref_feat_k [N,F,P,P]
  query.onnx       patches, ref_feat_k (gathered per query) -> hr
A fixed-precision or full-precision SR network becomes one graph, sr.onnx.

Every quantized conv reads Clip -> QuantizeLinear -> DequantizeLinear activations and an integer
weight initializer -> DequantizeLinear, so ONNX Runtime runs the very same files. Bit widths below
8 live inside the 8-bit containers (the Clip range); the graph metadata ``refqsr.convs`` names
each Conv node's real activation and weight bits, in node order.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from ..errors import RefQSRError
from ..models.backbone import SRBackbone
from ..models.checkpoint import model_config
from ..models.clustblock import CLUST_BITS, ClustBlock
from ..models.matching import POOL
from ..models.qconv import FP, BitSpec, QuantConv2d
from ..models.quant_cadyq import SCHEME as CADYQ
from ..models.quant_cadyq import Delta, Selection
from ..models.refqsr import RefQSR

OPSET = 17


def _chosen_bits(sel: Selection | None) -> tuple[torch.Tensor, ...]:
    """δ graphs' extra output: [N, L] bits of the CADyQ convs in call order (none otherwise)."""
    return () if sel is None else (sel.chosen_bits(),)


def _column_convs(model: nn.Module, sel: Selection) -> list[str]:
    """Module names of the CADyQ convs behind the columns of ``sel.chosen_bits()``."""
    names = {m: n for n, m in model.named_modules()}
    return [names[r.conv] for r in sel.records]


class ReferencePath(nn.Module):
    def __init__(self, model: RefQSR) -> None:
        super().__init__()
        self.model = model

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sel = Selection(self.model.high.weight) if self.model.dynamic else None
        hr, features = self.model.reference_forward(patches, sel)
        return (hr, *features, *_chosen_bits(sel))


class QueryPath(nn.Module):
    def __init__(self, model: RefQSR) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, patches: torch.Tensor, *reference_features: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        sel = Selection(self.model.high.weight) if self.model.dynamic else None
        hr = self.model.query_forward(patches, list(reference_features), hard=True, selection=sel)
        return (hr, *_chosen_bits(sel)) if sel is not None else hr


class FixedBits(nn.Module):
    """An SR network called at one BitSpec (its trained bits, or full precision)."""

    def __init__(self, net: SRBackbone, bits: BitSpec) -> None:
        super().__init__()
        self.net, self.bits = net, bits

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.net(patches, self.bits)


class DeltaBits(nn.Module):
    """A CADyQ/CABM SR network called with δ: outputs the HR patches and the activation bits each
    patch chose in each CADyQ conv ([N, L] int64, columns in call order)."""

    def __init__(self, net: SRBackbone, bits: Delta) -> None:
        super().__init__()
        self.net, self.bits = net, bits

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sel = Selection(self.bits.weight)
        return (self.net(patches, sel), *_chosen_bits(sel))


class QuantClust(nn.Module):
    def __init__(self, clust: ClustBlock) -> None:
        super().__init__()
        self.clust = clust

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.clust(patches, quantized=True)


@dataclass
class ConvRecord:
    module: str
    act_bits: int
    weight_bits: int


def _conv_calls(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[ConvRecord]:
    """Every conv the forward pass runs, in call order, with the bits it ran at."""
    records: list[ConvRecord] = []
    names = {m: n for n, m in module.named_modules()}
    hooks = []
    for m in module.modules():
        if isinstance(m, QuantConv2d):

            def pre(mod, args, _rec=records):
                bits = args[1] if len(args) > 1 else FP
                if mod.scheme is None:
                    bits = FP
                elif isinstance(bits, Selection):  # δ: any candidate width, in the 8-bit container
                    bits = BitSpec(max(mod.candidates), bits.weight)
                _rec.append(ConvRecord(names[mod], bits.act, bits.weight))

            hooks.append(m.register_forward_pre_hook(pre))
        elif isinstance(m, nn.Conv2d) and not any(isinstance(p, QuantConv2d) and p.conv is m for p in module.modules()):
            hooks.append(
                m.register_forward_pre_hook(lambda mod, args, _rec=records: _rec.append(ConvRecord(names[mod], 32, 32)))
            )
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return records


def export_graph(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    metadata: dict[str, Any],
) -> Path:
    """Export one graph with a dynamic batch axis and attach the per-conv bit metadata."""
    module = module.eval()
    convs = _conv_calls(module, inputs)
    dynamic = {n: {0: "batch"} for n in input_names + output_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constants are expected here
        torch.onnx.export(
            module,
            inputs,
            str(path),
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic,
            do_constant_folding=True,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    conv_nodes = [n for n in graph.graph.node if n.op_type == "Conv"]
    if len(conv_nodes) != len(convs):
        raise RefQSRError(
            f"{path.name}: {len(conv_nodes)} Conv nodes for {len(convs)} conv calls; export is inconsistent"
        )
    table = [
        {"node": n.name, "module": c.module, "act_bits": c.act_bits, "weight_bits": c.weight_bits}
        for n, c in zip(conv_nodes, convs)
    ]
    props = {"refqsr.convs": json.dumps(table), **{f"refqsr.{k}": json.dumps(v) for k, v in metadata.items()}}
    for key, value in props.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return path


def _check_patch(patch: int) -> None:
    if patch < 15 or patch % POOL:
        raise RefQSRError(f"patch size must be a multiple of {POOL} and >= 15 for export (got {patch})")


def export_refqsr(model: RefQSR, out_dir: str | Path, patch: int, batch: int = 2) -> dict[str, Path]:
    """Write clustblock/reference/query ONNX graphs for patches of ``patch`` LR pixels."""
    _check_patch(patch)
    if model.clustblock is None or not bool(model.clustblock.calibrated):
        raise RefQSRError("the RefQSR model needs a calibrated ClustBlock to be exported")
    if model.tail != "refer":
        raise RefQSRError(f"the {model.tail!r}-tail RefQSR variant is a training ablation; it is not exported")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    meta = {"model": model_config(model), "patch": patch, "scale": model.backbone.scale}
    x = torch.rand(batch, 3, patch, patch)
    ref_meta, query_meta = {"bits": [model.b_high, model.b_high]}, {"bits": [model.b_low, model.b_medium]}
    extra: list[str] = []
    with torch.no_grad():
        if model.dynamic:  # δ references: both paths also output the bits of their CADyQ convs
            sel_r, sel_q = Selection(model.high.weight), Selection(model.high.weight)
            _, feats = model.reference_forward(x, sel_r)
            model.query_forward(x, feats, hard=True, selection=sel_q)
            ref_meta = {"bits": ["delta", model.high.weight], "dynamic_convs": _column_convs(model, sel_r)}
            query_meta = {"bits": [model.b_low, model.b_medium], "dynamic_convs": _column_convs(model, sel_q)}
            extra = ["bits"]
        else:
            feats = model.reference_features(x)
    sizes = sorted({tuple(f.shape[-2:]) for f in feats if f.shape[-2] % POOL or f.shape[-1] % POOL})
    if sizes:  # e.g. ELAN-light pads patches to a multiple of 16 before its blocks
        raise RefQSRError(
            f"patch size {patch} gives this network's RefER features of {sizes[0][0]}x{sizes[0][1]} px, "
            f"not a multiple of {POOL}; pick another --patch (any multiple of 48 suits every network)"
        )
    n_feat = [f"ref_feat_{k}" for k in range(len(feats))]
    paths = {
        "clustblock": export_graph(
            QuantClust(model.clustblock),
            (x,),
            out / "clustblock.onnx",
            ["patches"],
            ["logits"],
            {**meta, "bits": CLUST_BITS.act},
        ),
        "reference": export_graph(
            ReferencePath(model),
            (x,),
            out / "reference.onnx",
            ["patches"],
            ["hr", *n_feat, *extra],
            {**meta, **ref_meta},
        ),
        "query": export_graph(
            QueryPath(model),
            (x, *feats),
            out / "query.onnx",
            ["patches", *n_feat],
            ["hr", *extra],
            {**meta, **query_meta},
        ),
    }
    return paths


def export_sr(
    net: SRBackbone, bits: BitSpec | Delta, out_dir: str | Path, patch: int, batch: int = 2
) -> dict[str, Path]:
    """Write sr.onnx for a full- or fixed-precision SR network run at ``bits``, or for a CADyQ/CABM
    network at δ (``Delta``): then the graph also outputs ``bits`` [N, L], each patch's choice in
    each CADyQ conv (metadata ``refqsr.dynamic_convs`` names the convs of the columns)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net.eval()
    x = torch.rand(batch, 3, patch, patch)
    meta = {"model": model_config(net), "patch": patch, "scale": net.scale}
    if (net.scheme == CADYQ) != isinstance(bits, Delta):
        raise RefQSRError("CADyQ/CABM networks choose their bits per patch: export them at δ (and only them)")
    if isinstance(bits, Delta):
        with torch.no_grad():
            sel = Selection(bits.weight)
            net(x, sel)
        meta.update(bits=["delta", bits.weight], dynamic_convs=_column_convs(net, sel))
        return {"sr": export_graph(DeltaBits(net, bits), (x,), out / "sr.onnx", ["patches"], ["hr", "bits"], meta)}
    meta["bits"] = [bits.act, bits.weight]
    return {"sr": export_graph(FixedBits(net, bits), (x,), out / "sr.onnx", ["patches"], ["hr"], meta)}
