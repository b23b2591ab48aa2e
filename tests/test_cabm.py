"""CABM (models/cabm.py): edge score, lookup-table calibration, table inference, model files, fine-tuning.

* edge score against a numpy Laplacian twin;
* a table calibrated on selectors forced to choose by image gradient equals the table computed in
  numpy (quantile bin edges, per-bin per-layer mode) for an SR network and for δ-RefQSR;
* inference with a table uses the table's bits (selectors disabled), an all-8 table is the 8-bit net;
* save/load keeps the table exactly (fp16 weights do not touch it);
* ``train qat --scheme cabm`` and ``train refqsr --scheme cabm`` fine-tune from CADyQ model files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from refqsr_engine.errors import RefQSRError
from refqsr_engine.models.cabm import CabmTable, attach_cabm, build_cabm_table, edge_score
from refqsr_engine.models.checkpoint import load_model, model_config, save_model
from refqsr_engine.models.qconv import BitSpec
from refqsr_engine.models.quant_cadyq import CadyqConv2d, Delta, Selection, dynamic_convs
from refqsr_engine.models.refqsr import RefQSR
from refqsr_engine.models.registry import build_refqsr, build_sr
from training_helpers import tiny_training_setup

GRAY = np.array([0.299, 0.587, 0.114])


def np_gray(x: np.ndarray) -> np.ndarray:
    return np.einsum("nchw,c->nhw", x.astype(np.float64), GRAY)


def np_edge_score(x: np.ndarray) -> np.ndarray:
    """mean |Laplacian| of the gray patch, mirrored border (OpenCV's BORDER_REFLECT_101)."""
    g = np_gray(x)
    p = np.pad(g, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    lap = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * g
    return np.abs(lap).mean(axis=(1, 2))


def np_grad_sum(x: np.ndarray) -> np.ndarray:
    """CADyQ's image gradient feature, x + y: mean |Sobel/8| (edge-replicated border), times 1e3."""
    g = np_gray(x)
    p = np.pad(g, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = g.shape[1:]
    win = lambda dy, dx: p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]  # noqa: E731
    gx = (win(-1, 1) + 2 * win(0, 1) + win(1, 1) - win(-1, -1) - 2 * win(0, -1) - win(1, -1)) / 8
    gy = (win(1, -1) + 2 * win(1, 0) + win(1, 1) - win(-1, -1) - 2 * win(-1, 0) - win(-1, 1)) / 8
    return (np.abs(gx).mean(axis=(1, 2)) + np.abs(gy).mean(axis=(1, 2))) * 1e3


@torch.no_grad()
def force_by_gradient(conv: CadyqConv2d, t1: float, t2: float, scale: float = 0.1) -> None:
    """Selector choosing 4 / 6 / 8 bits for summed image gradient G < t1 / in [t1, t2] / > t2."""
    lin = conv.selector.linear
    lin.weight.zero_()
    lin.weight[:, :2] = torch.tensor([[0.0], [scale], [2 * scale]])
    lin.bias.copy_(torch.tensor([0.0, -scale * t1, -scale * (t1 + t2)]))


THRESHOLDS = [(15.0, 40.0), (25.0, 55.0), (35.0, 70.0), (10.0, 30.0), (45.0, 60.0), (20.0, 50.0)]


def forced(model: torch.nn.Module) -> list[tuple[float, float]]:
    convs = dynamic_convs(model)
    thresholds = [THRESHOLDS[k % len(THRESHOLDS)] for k in range(len(convs))]
    for conv, (t1, t2) in zip(convs, thresholds):
        force_by_gradient(conv, t1, t2)
    return thresholds


def patches(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Patches whose edge content spans a range: noise of random amplitude on a random smooth base."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(n, 1, 1, 1, generator=g) * 0.6
    base = torch.nn.functional.interpolate(torch.rand(n, 3, 3, 3, generator=g), size=(size, size), mode="bilinear")
    return (base * 0.5 + 0.25 + amp * (torch.rand(n, 3, size, size, generator=g) - 0.5)).clamp(0, 1)


def expected_table(
    x: np.ndarray, thresholds: list[tuple[float, float]], n_bins: int
) -> tuple[np.ndarray, list[list[int]]]:
    scores, grads = np_edge_score(x), np_grad_sum(x)
    edges = np.quantile(scores, np.arange(1, n_bins) / n_bins)
    bins = np.searchsorted(edges, scores, side="left")
    rows = []
    for b in range(n_bins):
        g = grads[bins == b]
        row = []
        for t1, t2 in thresholds:
            counts = Counter(np.where(g < t1, 4, np.where(g <= t2, 6, 8)).tolist())
            top = max(counts.values())
            row.append(max(v for v, c in counts.items() if c == top))
        rows.append(row)
    return edges, rows


def test_edge_score_matches_numpy_laplacian():
    x = patches(5, 10)
    np.testing.assert_allclose(edge_score(x).numpy(), np_edge_score(x.numpy()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["sr", "refqsr"])
def test_table_from_known_selectors(kind):
    torch.manual_seed(0)
    model = (
        build_sr("srresnet", "cadyq", n_blocks=3, n_feats=4)
        if kind == "sr"
        else build_refqsr("srresnet", "cadyq", 8, 3, n_blocks=4, n_feats=4, n_refer=1)
    )
    thresholds = forced(model)
    x = patches(40)
    table = build_cabm_table(model, x, n_bins=4, batch=16)
    edges, rows = expected_table(x.numpy(), thresholds, 4)
    assert table.n_layers == (6 if kind == "sr" else 8 + 2) == len(thresholds)
    np.testing.assert_allclose(table.edges.numpy(), edges, rtol=1e-6)
    assert table.bits.tolist() == rows
    assert len({v for r in rows for v in r}) >= 2  # the table is not trivially uniform


def test_inference_uses_the_table_not_the_selectors():
    torch.manual_seed(0)
    net = build_sr("srresnet", "cadyq", n_blocks=2, n_feats=4).train()
    x = patches(6)
    net(x, Delta())  # initialise the quantizer ranges
    net.eval()
    for conv in dynamic_convs(net):  # a selector would now give NaN logits
        conv.selector.linear.weight.data.fill_(float("nan"))
    scores = np_edge_score(x.numpy())
    edges = [float(np.quantile(scores, 1 / 3)), float(np.quantile(scores, 2 / 3))]
    rows = [[4, 4, 6, 4], [6, 8, 4, 6], [8, 8, 8, 6]]
    attach_cabm(net, CabmTable(edges, rows))
    sel = Selection()
    net(x, sel)
    bins = np.searchsorted(edges, scores, side="left")
    for layer, conv in enumerate(dynamic_convs(net)):
        assert conv.last_bits.tolist() == [rows[b][layer] for b in bins]
    assert all(r.term is None for r in sel.records)  # a fixed table: nothing for the bit loss
    attach_cabm(net, CabmTable(edges, [[8] * 4] * 3))
    torch.testing.assert_close(net(x, Delta()), net(x, BitSpec(8, 8)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layers"):
        attach_cabm(net, CabmTable([0.1], [[8] * 3] * 2))


@pytest.mark.parametrize("kind", ["sr", "refqsr"])
def test_table_survives_save_and_load(tmp_path, kind):
    torch.manual_seed(0)
    model = (
        build_sr("carn", "cadyq", n_blocks=4, n_feats=8)
        if kind == "sr"
        else build_refqsr("srresnet", "cadyq", 8, 4, n_blocks=4, n_feats=8, n_refer=1)
    )
    forced(model)
    x = patches(24)
    attach_cabm(model, build_cabm_table(model, x, n_bins=3))
    save_model(tmp_path / "m.pt", model)  # fp16 weights; the table sits in the config
    loaded, _ = load_model(tmp_path / "m.pt")
    assert model_config(loaded)["cabm"] == model_config(model)["cabm"]
    assert torch.equal(loaded.cabm.edges, model.cabm.edges) and torch.equal(loaded.cabm.bits, model.cabm.bits)
    model.eval()
    for net in (loaded, model):  # the bits each conv chose, per patch, must agree
        if kind == "sr":
            net(x, Delta())
        else:
            assert isinstance(net, RefQSR)
            net(x, x)
    for a, b in zip(dynamic_convs(loaded), dynamic_convs(model)):
        assert torch.equal(a.last_bits, b.last_bits)


# --------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    paths, teacher = tiny_training_setup(tmp_path_factory.mktemp("cabm"))
    root = paths["root"]
    cadyq = build_sr("srresnet", "cadyq", n_blocks=4, n_feats=8)
    cadyq.load_state_dict(teacher.state_dict(), strict=False)
    forced(cadyq)
    save_model(root / "cadyq.pt", cadyq)
    rq = build_refqsr("srresnet", "cadyq", 8, 3, n_blocks=4, n_feats=8)
    forced(rq)
    save_model(root / "cadyq_refqsr.pt", rq)
    return {"root": root}


def _cfg(setup, out: Path, task: str, bits: str, steps: int, **kw):
    from refqsr_engine.training.loop import TrainConfig

    root = setup["root"]
    return TrainConfig(
        data=str(root),
        out=str(out),
        steps=steps,
        task=task,
        bits=bits,
        batch=2,
        lr_patch=16,
        teacher=str(root / "teacher.pt"),
        val_every=steps,
        val_crop=64,
        ckpt_every=1,
        quiet=True,
        clustblock=str(root / "clust.pt") if task == "refqsr" else None,
        tau=-1.0,
        **kw,
    )


def test_cabm_fine_tuning_from_a_cadyq_model(setup, tmp_path):
    from refqsr_engine.training.loop import train

    root = setup["root"]
    train(
        _cfg(
            setup,
            tmp_path / "cabm",
            "qat",
            "delta",
            2,
            scheme="cabm",
            init_from=str(root / "cadyq.pt"),
            cabm_bins=3,
            cabm_calib=24,
        ),
        log=lambda s: None,
    )
    model, card = load_model(tmp_path / "cabm" / "best.pt")
    source, _ = load_model(root / "cadyq.pt")
    assert model.cabm.n_bins == 3 and model.cabm.n_layers == 8 and card["cabm_bins"] == 3
    assert len(set(model.cabm.bits.flatten().tolist())) >= 2  # calibrated from the forced selectors
    for a, b in zip(dynamic_convs(model), dynamic_convs(source)):  # selectors are not trained under a table
        assert torch.equal(a.selector.linear.weight, b.selector.linear.weight)
    # a CABM model as --init-from keeps its table
    train(
        _cfg(
            setup,
            tmp_path / "again",
            "qat",
            "delta",
            1,
            scheme="cabm",
            init_from=str(tmp_path / "cabm" / "best.pt"),
            cabm_bins=5,
        ),
        log=lambda s: None,
    )
    again, _ = load_model(tmp_path / "again" / "best.pt")
    assert torch.equal(again.cabm.bits, model.cabm.bits)
    with pytest.raises(RefQSRError, match="trained CADyQ model"):
        train(_cfg(setup, tmp_path / "bad", "qat", "delta", 1, scheme="cabm"), log=lambda s: None)


def test_cabm_refqsr_fine_tuning_from_a_cadyq_refqsr_model(setup, tmp_path):
    from refqsr_engine.training.loop import train

    train(
        _cfg(
            setup,
            tmp_path / "rq",
            "refqsr",
            "delta-3",
            1,
            scheme="cabm",
            init_from=str(setup["root"] / "cadyq_refqsr.pt"),
            cabm_bins=2,
            cabm_calib=8,
        ),
        log=lambda s: None,
    )
    model, card = load_model(tmp_path / "rq" / "best.pt")
    assert isinstance(model, RefQSR) and model.dynamic and model.cabm.bits.shape == (2, 8 + 4)
    assert card["bits"] == "delta-3" and np.isfinite(card["val_psnr_y"])
