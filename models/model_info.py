"""A PyTorch model described for the runtime (:class:`~refqsr_engine.pipeline.model_info.ModelInfo`)
and the small questions asked of a model: its bits, whether it chooses them per patch."""

from __future__ import annotations

from typing import Any

import torch

from ..pipeline.model_info import ModelInfo
from .bitops import column_map, network_cost
from .checkpoint import bits_label, model_config
from .qconv import FP, BitSpec
from .quant_cadyq import SCHEME as CADYQ
from .quant_cadyq import Delta
from .refqsr import RefQSR


def is_dynamic(model: torch.nn.Module) -> bool:
    """A δ model: CADyQ/CABM bits chosen per patch and layer (an SR network or δ-RefQSR)."""
    net = model.backbone if isinstance(model, RefQSR) else model
    return getattr(net, "scheme", None) == CADYQ


def model_bits(model: torch.nn.Module) -> BitSpec | Delta:
    """The bits a model runs at: its single trained activation width, FP for RefQSR (it sets its
    own bits per path), or δ (``Delta``) for a CADyQ/CABM network."""
    if is_dynamic(model):
        return FP if isinstance(model, RefQSR) else Delta()
    if isinstance(model, RefQSR) or getattr(model, "scheme", None) is None:
        return FP
    bits = model.act_bits()
    if len(bits) != 1:
        raise ValueError(f"model has several activation bit widths {bits}; it is not a fixed-precision model")
    return BitSpec.uniform(bits[0])


def bitops_setting(model: torch.nn.Module) -> tuple[str, str, dict[str, int | str]]:
    """What ``count_bitops`` needs of a model: its architecture, its bits ("8-4", "8", "32",
    "delta", "delta-3") and its network sizes."""
    if isinstance(model, RefQSR):
        high = "delta" if model.dynamic else str(model.b_high)
        return model.backbone.arch, f"{high}-{model.b_low}", model.cost_sizes()
    return model.arch, "delta" if is_dynamic(model) else str(model_bits(model).act), model.sizes()


def describe(
    model: torch.nn.Module,
    name: str,
    card: dict[str, Any] | None = None,
    dynamic_convs: dict[str, list[str]] | None = None,
) -> ModelInfo:
    """``model`` as the runtime sees it. ``dynamic_convs``: for δ models, per graph the names of the
    convs behind the columns of the bits the graph returns (the export's metadata)."""
    arch, setting, sizes = bitops_setting(model)
    refqsr = isinstance(model, RefQSR)
    net = model.backbone if refqsr else model
    columns = None
    if dynamic_convs:
        weight = (model.high if refqsr else model_bits(model)).weight
        columns = {path: column_map(model, names, weight, path) for path, names in dynamic_convs.items()}
    return ModelInfo(
        name=name,
        kind="refqsr" if refqsr else "sr",
        bits=setting,
        label=bits_label(model_config(model)),
        scale=int(net.scale),
        tau=float(model.tau) if refqsr else None,
        network=network_cost(arch, **sizes),
        delta_columns=columns,
        card=dict(card or {}),
    )
