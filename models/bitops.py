"""BitOPs of the PyTorch models: their :class:`~refqsr_engine.pipeline.bitops.NetworkCost`, and
the bits a δ (CADyQ/CABM) model chose in a run. The accounting itself is
:mod:`refqsr_engine.pipeline.bitops`, shared with the compiled engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..pipeline import bitops as accounting
from ..pipeline.bitops import (  # noqa: F401 - the accounting API, re-exported for model code and tests
    GRIDS,
    BitOpsReport,
    NetworkCost,
    PatchBits,
    Precision,
    grid_boxes,
    hr_to_lr,
    parse_size,
)
from .matching import COSINE_BITS
from .qconv import BitSpec
from .quant_cadyq import CadyqConv2d, Selection
from .refqsr import RefQSR
from .registry import arch_config


def network_cost(arch: str, **sizes: int | str) -> NetworkCost:
    """The cost description of an architecture; ``sizes`` override its preset (n_blocks, n_feats,
    n_refer, tail, matching), for non-default networks."""
    cfg = {**arch_config(arch), **sizes}
    return NetworkCost(
        arch=arch,
        n_blocks=int(cfg["n_blocks"]),
        feats=int(cfg["n_feats"]),
        n_refer=int(cfg["n_refer"]),
        block_macs_per_px=tuple(int(m) for m in cfg["cls"].block_conv_macs(int(cfg["n_feats"]))),
        tail=str(cfg.get("tail", "refer")),
        shared_match=cfg.get("matching", "paper") == "shared",
    )


def count_bitops(
    arch: str,
    lr_size: tuple[int, int],
    bits: str | Precision,
    patch: int | None = 96,
    overlap: int = 6,
    grid: str = "paper",
    is_reference: Sequence[bool] | None = None,
    reference_of: Sequence[int] | None = None,
    ref_fraction: float | None = None,
    patch_bits: Sequence[PatchBits] | None = None,
    **sizes: int | str,
) -> BitOpsReport:
    """:func:`refqsr_engine.pipeline.bitops.count_bitops` for an architecture by name."""
    return accounting.count_bitops(
        network_cost(arch, **sizes),
        lr_size,
        bits,
        patch,
        overlap,
        grid,
        is_reference,
        reference_of,
        ref_fraction,
        patch_bits,
    )


def _path_layout(
    model: nn.Module, path: str
) -> tuple[nn.Module, range, dict[int, BitSpec], list[nn.Module], int | None, bool]:
    """Which convs a δ call of ``path`` ran and how: (network, blocks run as blocks, fixed bits of
    blocks that ran at fixed widths, RefER modules run, the cost volume's operand width, shared
    matching)."""
    if isinstance(model, RefQSR):
        net = model.backbone
        if path == "reference":
            run_blocks, fixed, refers = range(net.n_blocks), {}, []
        elif path == "query":
            run_blocks = range(net.n_blocks if model.tail == "highbit" else model.first_refer)
            fixed = {k: model.low for k in range(1, model.first_refer)}
            refers = list(model.refers)
        else:
            raise ValueError(f"RefQSR paths are 'reference' and 'query', not {path!r}")
    elif path == "sr":
        net, run_blocks, fixed, refers = model, range(model.n_blocks), {}, []
    else:
        raise ValueError(f"an SR network has the path 'sr', not {path!r}")
    shared = isinstance(model, RefQSR) and model.shared
    match_bits = (COSINE_BITS if shared else model.b_low) if refers else None
    return net, run_blocks, fixed, refers, match_bits, shared and bool(refers)


def _cadyq_convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, CadyqConv2d)]


def patch_bits_of_run(model: nn.Module, selection: Selection, path: str = "sr") -> list[PatchBits]:
    """Per-sample :class:`PatchBits` of one δ call of ``model`` recorded in ``selection``.

    ``path``: "sr" (a CADyQ/CABM SR network called with the selection), "reference" or "query"
    (the δ-RefQSR path the selection was passed to). Convs the path ran at fixed bits (the query
    path's low blocks) get the model's (b_low, b_medium)."""
    records = selection.by_conv()
    if not records:
        raise ValueError("the selection recorded no CADyQ conv: run the model with it first")
    n = next(iter(records.values())).bits.shape[0]
    w = selection.weight
    net, run_blocks, fixed, refers, match_bits, shared = _path_layout(model, path)

    def conv_bits(conv: nn.Module, fixed_bits: BitSpec | None = None) -> list[BitSpec]:
        r = records.get(id(conv))
        if r is None:
            if fixed_bits is None:
                raise ValueError("a conv of this path has no recorded bits (wrong model or path?)")
            return [fixed_bits] * n
        return [BitSpec(int(b), w) for b in r.bits.tolist()]

    per_block = [[conv_bits(c, fixed.get(k)) for c in _cadyq_convs(net.blocks[k])] for k in run_blocks]
    per_refer = [[conv_bits(c) for c in _cadyq_convs(r)] for r in refers]
    return [
        PatchBits(
            tuple(tuple(c[i] for c in block) for block in per_block),
            tuple(tuple(c[i] for c in refer) for refer in per_refer),
            match_bits,
            shared,
        )
        for i in range(n)
    ]


def column_map(model: nn.Module, conv_names: Sequence[str], weight: int, path: str = "sr") -> dict[str, Any]:
    """How the bits a compiled δ graph returns (column j: what the conv named ``conv_names[j]``
    chose for each patch) make the :class:`PatchBits` of :func:`patch_bits_of_run`, as plain data
    for the artifact's manifest (read by :func:`refqsr_engine.pipeline.bitops.decode_columns`)."""
    modules = dict(model.named_modules())
    column_of = {id(modules[name]): j for j, name in enumerate(conv_names)}
    net, run_blocks, fixed, refers, match_bits, shared = _path_layout(model, path)

    def entry(conv: nn.Module, fixed_bits: BitSpec | None = None) -> int | list[int]:
        if id(conv) in column_of:
            return column_of[id(conv)]
        if fixed_bits is None:
            raise ValueError("a conv of this path is neither a column of the graph nor at fixed bits")
        return [fixed_bits.act, fixed_bits.weight]

    return {
        "blocks": [[entry(c, fixed.get(k)) for c in _cadyq_convs(net.blocks[k])] for k in run_blocks],
        "refers": [[entry(c) for c in _cadyq_convs(r)] for r in refers],
        "match_bits": match_bits,
        "shared_match": shared,
        "weight": int(weight),
    }


__all__ = [
    "GRIDS",
    "BitOpsReport",
    "NetworkCost",
    "PatchBits",
    "Precision",
    "column_map",
    "count_bitops",
    "grid_boxes",
    "hr_to_lr",
    "network_cost",
    "parse_size",
    "patch_bits_of_run",
]
