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
from ..models.checkpoint import model_config
from ..models.clustblock import CLUST_BITS, ClustBlock
from ..models.matching import POOL
from ..models.qconv import FP, BitSpec, QuantConv2d
from ..models.refqsr import RefQSR
from ..models.backbone import SRBackbone

OPSET = 17


class ReferencePath(nn.Module):
    def __init__(self, model: RefQSR) -> None:
        super().__init__()
        self.model = model

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hr, features = self.model.reference_forward(patches)
        return (hr, *features)


class QueryPath(nn.Module):
    def __init__(self, model: RefQSR) -> None:
        super().__init__()
        self.model = model

    def forward(self, patches: torch.Tensor, *reference_features: torch.Tensor) -> torch.Tensor:
        return self.model.query_forward(patches, list(reference_features), hard=True)


class FixedBits(nn.Module):
    """An SR network called at one BitSpec (its trained bits, or full precision)."""

    def __init__(self, net: SRBackbone, bits: BitSpec) -> None:
        super().__init__()
        self.net, self.bits = net, bits

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.net(patches, self.bits)


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
                _rec.append(ConvRecord(names[mod], bits.act, bits.weight))
            hooks.append(m.register_forward_pre_hook(pre))
        elif isinstance(m, nn.Conv2d) and not any(isinstance(p, QuantConv2d) and p.conv is m for p in module.modules()):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, _rec=records: _rec.append(ConvRecord(names[mod], 32, 32))))
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return records


def export_graph(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, input_names: list[str], output_names: list[str],
    metadata: dict[str, Any],
) -> Path:
    """Export one graph with a dynamic batch axis and attach the per-conv bit metadata."""
    module = module.eval()
    convs = _conv_calls(module, inputs)
    dynamic = {n: {0: "batch"} for n in input_names + output_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constants are expected here
        torch.onnx.export(
            module, inputs, str(path), opset_version=OPSET, input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic, do_constant_folding=True, dynamo=False,
        )
    graph = onnx.load(str(path))
    conv_nodes = [n for n in graph.graph.node if n.op_type == "Conv"]
    if len(conv_nodes) != len(convs):
        raise RefQSRError(f"{path.name}: {len(conv_nodes)} Conv nodes for {len(convs)} conv calls; export is inconsistent")
    table = [{"node": n.name, "module": c.module, "act_bits": c.act_bits, "weight_bits": c.weight_bits} for n, c in zip(conv_nodes, convs)]
    props = {"refqsr.convs": json.dumps(table), **{f"refqsr.{k}": json.dumps(v) for k, v in metadata.items()}}
    for key, value in props.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return path


#: quantizers whose bits change per patch (CADyQ's selector, CABM's table): not in the engine yet
PER_PATCH_SCHEMES = ("cadyq", "cabm")


def _check_exportable(net: SRBackbone) -> None:
    if net.scheme in PER_PATCH_SCHEMES:
        raise RefQSRError(f"{net.scheme.upper()} models choose bits per patch; the compiled engine does not run them yet "
                          "(use --engine torch)")


def _check_patch(patch: int) -> None:
    if patch < 15 or patch % POOL:
        raise RefQSRError(f"patch size must be a multiple of {POOL} and >= 15 for export (got {patch})")


def export_refqsr(model: RefQSR, out_dir: str | Path, patch: int, batch: int = 2) -> dict[str, Path]:
    """Write clustblock/reference/query ONNX graphs for patches of ``patch`` LR pixels."""
    _check_patch(patch)
    _check_exportable(model.backbone)
    if model.clustblock is None or not bool(model.clustblock.calibrated):
        raise RefQSRError("the RefQSR model needs a calibrated ClustBlock to be exported")
    if model.tail != "refer":
        raise RefQSRError(f"the {model.tail!r}-tail RefQSR variant is a training ablation; it is not exported")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    meta = {"model": model_config(model), "patch": patch, "scale": model.backbone.scale}
    x = torch.rand(batch, 3, patch, patch)
    with torch.no_grad():
        _, feats = model.reference_forward(x)
    n_feat = [f"ref_feat_{k}" for k in range(len(feats))]
    paths = {
        "clustblock": export_graph(QuantClust(model.clustblock), (x,), out / "clustblock.onnx", ["patches"], ["logits"],
                                   {**meta, "bits": CLUST_BITS.act}),
        "reference": export_graph(ReferencePath(model), (x,), out / "reference.onnx", ["patches"], ["hr", *n_feat],
                                  {**meta, "bits": [model.b_high, model.b_high]}),
        "query": export_graph(QueryPath(model), (x, *feats), out / "query.onnx", ["patches", *n_feat], ["hr"],
                              {**meta, "bits": [model.b_low, model.b_medium]}),
    }
    return paths


def export_sr(net: SRBackbone, bits: BitSpec, out_dir: str | Path, patch: int, batch: int = 2) -> dict[str, Path]:
    """Write sr.onnx for a full- or fixed-precision SR network run at ``bits``."""
    _check_exportable(net)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net.eval()
    x = torch.rand(batch, 3, patch, patch)
    meta = {"model": model_config(net), "patch": patch, "scale": net.scale, "bits": [bits.act, bits.weight]}
    return {"sr": export_graph(FixedBits(net, bits), (x,), out / "sr.onnx", ["patches"], ["hr"], meta)}
