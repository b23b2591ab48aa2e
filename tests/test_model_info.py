"""What the runtime knows of a model without PyTorch (pipeline.model_info, pipeline.bitops,
pipeline.clustering) against the PyTorch models and independent reference computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from refqsr_engine.models.bitops import column_map, count_bitops, patch_bits_of_run
from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.models.model_info import describe
from refqsr_engine.models.quant_cadyq import Selection, dynamic_convs
from refqsr_engine.models.registry import build_refqsr, build_sr
from refqsr_engine.pipeline.bitops import NetworkCost, decode_columns
from refqsr_engine.pipeline.clustering import assign_references
from refqsr_engine.pipeline.model_info import ModelInfo
from refqsr_engine.pipeline.tiling import make_grid
from test_cadyq import grad_selector


def _assign_by_hand(argmax: list[int], sim: list[float], tau: float) -> tuple[list[int], list[bool]]:
    """Sec. III-C-2 spelled out: targets of some arg-max are references; a query below tau is an
    isolated reference; a reference reads itself."""
    n = len(argmax)
    is_ref = [any(a == i for a in argmax) for i in range(n)]
    is_ref = [r or s < tau for r, s in zip(is_ref, sim)]
    return [i if is_ref[i] else argmax[i] for i in range(n)], is_ref


@pytest.mark.parametrize("seed", range(5))
def test_reference_assignment_matches_the_rule_spelled_out(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 12
    argmax = rng.integers(0, n, n)
    sim = rng.random(n).astype(np.float32)
    got = assign_references(argmax, sim, 0.5)
    want_ref_of, want_is_ref = _assign_by_hand(argmax.tolist(), sim.tolist(), 0.5)
    assert got.reference_of.tolist() == want_ref_of and got.is_reference.tolist() == want_is_ref
    isolated = [i for i in range(n) if want_is_ref[i] and i not in argmax.tolist()]
    assert got.num_isolated == len(isolated) and got.num_references + got.num_queries == n


def _delta_refqsr() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_refqsr("srresnet", "cadyq", 8, 3, n_blocks=5, n_feats=8)
    for k, conv in enumerate(dynamic_convs(model)):
        grad_selector(conv, 20.0 + 5 * k, 45.0 + 5 * k)
    model.clustblock = ClustBlock().eval()
    return model.eval()


@pytest.mark.parametrize("path", ["reference", "query"])
def test_bits_a_compiled_graph_returns_decode_to_what_pytorch_recorded(path: str) -> None:
    """Column j of a graph's bits output is what the j-th recorded conv chose (the export's order);
    the manifest's column map turns it into the PatchBits that patch_bits_of_run reads from the
    Selection itself."""
    model = _delta_refqsr()
    x = torch.rand(6, 3, 24, 24) * torch.tensor([0.02, 0.02, 0.3, 0.3, 1.0, 1.0]).view(6, 1, 1, 1)  # flat to busy
    sel = Selection(model.high.weight)
    with torch.no_grad():
        if path == "reference":
            model.reference_forward(x, sel)
        else:
            feats = model.reference_forward(torch.rand(6, 3, 24, 24))[1]
            model.query_forward(x, feats, selection=sel)
    names = {m: n for n, m in model.named_modules()}
    columns = column_map(model, [names[r.conv] for r in sel.records], model.high.weight, path)
    decoded = decode_columns(json.loads(json.dumps(columns)), sel.chosen_bits().numpy())
    assert decoded == patch_bits_of_run(model, sel, path)
    assert len({b.act for p in decoded for blk in p.blocks for b in blk}) > 1  # the patches did differ


def test_model_info_round_trips_through_json_and_counts_like_the_model() -> None:
    model = build_refqsr("carn", "ddtb", 8, 4, n_blocks=4, n_feats=16).eval()
    info = ModelInfo.from_dict(json.loads(json.dumps(describe(model, "m", {"k": 1}).as_dict())))
    assert info == describe(model, "m", {"k": 1}) and info.refqsr and info.label == "8-4"
    assert isinstance(info.network, NetworkCost) and info.network.n_blocks == 4
    n = make_grid(100, 150, 48, 6).num_patches
    ref_of = [0 if i < n // 2 else n - 1 for i in range(n)]
    is_ref = [i in (0, n - 1) for i in range(n)]
    clustering = assign_references(np.array(ref_of), np.ones(n, np.float32), 0.5)
    got = info.image_bitops((100, 150), 48, 6, clustering)
    want = count_bitops("carn", (100, 150), "8-4", 48, 6, "engine", is_ref, ref_of, **model.cost_sizes())
    assert got.as_dict() == want.as_dict()
    sr = build_sr("srresnet", "ddtb", (4,), n_blocks=2, n_feats=8).eval()
    info = describe(sr, "sr4")
    assert (info.kind, info.bits, info.label, info.tau) == ("sr", "4", "4", None)
    assert (
        info.uniform8_bitops((64, 64), 32, 4).as_dict()
        == count_bitops("srresnet", (64, 64), "8", 32, 4, "engine", **sr.sizes()).as_dict()
    )
