"""Can RefER's matching find a patch's content in its reference? Matching variants on a trained model.

    python -m research.matching_variants MODEL --val DIR

Pairs whose right flow is known: for 96-px LR patches every 48 px of every validation image (where
the shifted one fits), the reference is

* ``same``: the same patch, so the right flow is zero everywhere;
* ``shifted``: the patch 30 px down and 12 px right (multiples of the pooling cell), so the right
  flow is (-12, -30) px (dx, dy) on the overlap, which is scored (less one cell along its inner
  edges).

The query side is the query path (self-reference mode, so it does not depend on an assignment),
the reference side the b_high reference path, as RefER sees them. A pixel counts as matched when
its arg-max flow is within half a pooling cell of the right one
(:data:`~research.refer_probe.SELF_MATCH_PX`). Features matched:

* ``head``, ``block 1``: the head conv's and the first ResBlock's output (both at b_high or full
  precision on both paths, so equal content gives equal features);
* ``RefER k``: the input of RefER block k, where the paper matches, with b_low query features
  (and, as a control, with the reference also run through the query path).

Formulas: ``paper`` is eqs. (4)-(6) (per-pixel L2 normalisation, 3x3 average pooling, dot product)
in float, and at RefER depths also with the model's trained b_low quantizer; ``cosine`` normalises
the pooled vectors again, in float and on symmetric 8-bit and b_low grids (range: the 99.9th
percentile of the query's |values|; the integer vectors are normalised too, i.e. the arg-max of
q . r / |r| on grid values). It is an analysis of trained models, not part of inference; the engine
runs ``paper``.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from refqsr_engine.engine.models_store import resolve_model
from refqsr_engine.errors import RefQSRError
from refqsr_engine.models.checkpoint import load_model
from refqsr_engine.models.matching import POOL, normalize_and_pool, pooled_flow, shared_flow, upsample_flow
from refqsr_engine.models.refqsr import RefQSR
from refqsr_engine.training.datasets import PairedFolder

from research.refer_probe import SELF_MATCH_PX

PATCH = 96
SHIFT = (30, 12)  # (dy, dx) LR px of the shifted reference; multiples of the 3-px pooling cell


def patch_pairs(
    folder: PairedFolder, patch: int = PATCH, shift: tuple[int, int] = SHIFT
) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, shifted references): patches every ``patch // 2`` px of every LR image, where the
    shifted one fits too."""
    qs, rs = [], []
    dy, dx = shift
    for i in range(len(folder)):
        lr = torch.from_numpy(folder[i].lr.transpose(2, 0, 1).astype(np.float32) / 255.0)
        for y in range(0, lr.shape[-2] - patch - dy + 1, patch // 2):
            for x in range(0, lr.shape[-1] - patch - dx + 1, patch // 2):
                qs.append(lr[:, y : y + patch, x : x + patch])
                rs.append(lr[:, y + dy : y + dy + patch, x + dx : x + dx + patch])
    if not qs:
        raise RefQSRError(f"no validation image is at least {patch + dy}x{patch + dx} px in LR")
    return torch.stack(qs), torch.stack(rs)


def matched_share(
    query: torch.Tensor, reference: torch.Tensor, want: tuple[int, int], cosine: bool, quantize=None
) -> float:
    """:func:`flow_share` of the arg-max flow between two features ([N, C, H, W] before pooling)
    under a matching formula: eq. (4)-(6), or a cosine, on optionally quantized pooled vectors."""
    pq, pr = normalize_and_pool(query), normalize_and_pool(reference)
    if cosine:
        pq, pr = F.normalize(pq, dim=1), F.normalize(pr, dim=1)
    if quantize is not None:
        pq, pr = quantize(pq), quantize(pr)
    size = (query.shape[-2], query.shape[-1])
    return flow_share(upsample_flow(pooled_flow(pq, pr, size, hard=True), size), want)


def flow_share(flow: torch.Tensor, want: tuple[int, int]) -> float:
    """Share of scored query pixels whose flow [N, 2, H, W] is within half a cell of ``want`` =
    (dy, dx) px, the reference content sitting at query pixel + want; pixels whose right match
    falls outside the reference (and one cell along those edges) are not scored."""
    size = flow.shape[-2:]
    dy, dx = want
    err = (flow - torch.tensor([float(dx), float(dy)]).view(1, 2, 1, 1)).norm(dim=1)
    # the overlap, less one cell along each edge that borders unmatched content (the bilinear
    # upsampling blends those cells' flows into their neighbours' pixels)
    top, bottom = (-dy + POOL if dy < 0 else 0), (size[0] - dy - POOL if dy > 0 else size[0])
    left, right = (-dx + POOL if dx < 0 else 0), (size[1] - dx - POOL if dx > 0 else size[1])
    return float((err[:, top:bottom, left:right] < SELF_MATCH_PX).float().mean())


def symmetric_grid(x: torch.Tensor, bits: int, bound: float) -> torch.Tensor:
    """Integer values of a symmetric ``bits`` grid over [-bound, bound] (zero exactly representable)."""
    levels = 2 ** (bits - 1) - 1
    return torch.round(x.clamp(-bound, bound) * (levels / bound))


@torch.no_grad()
def _features(model: RefQSR, x: torch.Tensor, path: str) -> dict[str, torch.Tensor]:
    """head, block-1 output and each RefER depth's input, on the query or the reference path,
    caught by forward hooks while that path runs."""
    net = model.backbone
    out: dict[str, torch.Tensor] = {}
    deep: list[torch.Tensor] = []
    hooks = [
        net.head.register_forward_hook(lambda _m, _a, o: out.__setitem__("head", o)),
        net.blocks[0].register_forward_hook(lambda _m, _a, o: out.__setitem__("block 1", o)),
    ]
    if path == "query":
        hooks += [r.register_forward_hook(lambda _m, args, _o: deep.append(args[0])) for r in model.refers]
    try:
        if path == "reference":
            deep = model.reference_features(x)[: len(model.refers)]  # (not shared matching's block-1 feature)
        else:
            model.query_forward(x, None)
    finally:
        for h in hooks:
            h.remove()
    out.update({f"RefER {k + 1}": f for k, f in enumerate(deep)})
    return out


@torch.no_grad()
def measure(model: RefQSR, queries: torch.Tensor, shifted: torch.Tensor) -> list[dict[str, Any]]:
    """One row per (features, formula): the matched share on the same and on the shifted pairs."""
    if not (isinstance(model, RefQSR) and model.tail == "refer"):
        raise RefQSRError("the analysis needs a RefQSR model with RefER blocks")
    fq = _features(model, queries, "query")
    high = (_features(model, queries, "reference"), _features(model, shifted, "reference"))
    low = (fq, _features(model, shifted, "query"))
    want = {"same": (0, 0), "shifted": (-SHIFT[0], -SHIFT[1])}
    rows = []
    for name in fq:
        refer = model.refers[int(name.split()[1]) - 1] if name.startswith("RefER") else None
        bound = float(F.normalize(normalize_and_pool(fq[name]), dim=1).abs().flatten().quantile(0.999))
        formulas: list[tuple[str, bool, Any, tuple]] = [
            ("paper, float", False, None, high),
            ("cosine, float", True, None, high),
        ]
        # cosine of the integer vectors: quantized, then normalised (a plain dot product of grid
        # values would favour the cells with the larger integer norms, as eq. (5) does)
        formulas += [
            (
                f"cosine, {b}-bit",
                True,
                lambda p, b=b, bound=bound: F.normalize(symmetric_grid(p, b, bound), dim=1),
                high,
            )
            for b in (8, model.b_low)
        ]
        if refer is not None:
            # the reference through the query path too: are the two paths' features the obstacle?
            formulas.append(("cosine, float, reference at query bits", True, None, low))
        name_rows = [
            {
                "features": name,
                "formula": label,
                **{
                    pair: matched_share(fq[name], ref[name], want[pair], cosine, quantize)
                    for pair, ref in zip(want, refs)
                },
            }
            for label, cosine, quantize, refs in formulas
        ]
        if name == "block 1" and model.shared:  # the model's own flow (matching.shared_flow), as it runs
            name_rows.insert(
                1,
                {
                    "features": name,
                    "formula": "shared matching (8-bit cosine, the model's flow)",
                    **{pair: flow_share(shared_flow(fq[name], ref[name]), want[pair]) for pair, ref in zip(want, high)},
                },
            )
        if refer is not None and refer.match_quant is not None:  # the block's own matching, after "paper, float"
            name_rows.insert(
                1,
                {
                    "features": name,
                    "formula": f"paper, trained {model.b_low}-bit quantizer",
                    **{
                        pair: flow_share(refer.flow(fq[name], ref[name], hard=True), want[pair])
                        for pair, ref in zip(want, high)
                    },
                },
            )
        rows += name_rows
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| features | formula | same patch | shifted patch (overlap) |\n| --- | --- | ---: | ---: |\n"
    return (
        head
        + "\n".join(f"| {r['features']} | {r['formula']} | {r['same']:.1%} | {r['shifted']:.1%} |" for r in rows)
        + "\n"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_name")
@click.option("--val", required=True, type=click.Path(exists=True, file_okay=False), help="Folder of HR images.")
def main(model_name: str, val: str) -> None:
    """Matched shares of RefER matching variants on a trained RefQSR model."""
    try:
        model, _ = load_model(resolve_model(model_name))
        queries, shifted = patch_pairs(PairedFolder(val, 4, None, None))
        rows = measure(model.eval(), queries, shifted)
    except RefQSRError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(f"{model_name}: {queries.shape[0]} patches of {PATCH} px, b_low {model.b_low}, shift {SHIFT} px\n")
    click.echo(markdown(rows))


if __name__ == "__main__":
    main()
