"""`python -m research.matching_variants`: how often RefER matching variants find
the right flow, on pairs whose flow is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from refqsr_engine.models.checkpoint import save_model
from refqsr_helpers import small_refqsr

from research.matching_variants import main, matched_share


def _cells(rows: int, cols: int) -> torch.Tensor:
    """[1, rows*cols, 3*rows, 3*cols]: each 3x3 pooling cell a different one-hot channel."""
    x = torch.zeros(1, rows * cols, 3 * rows, 3 * cols)
    for a in range(rows):
        for b in range(cols):
            x[0, a * cols + b, 3 * a : 3 * a + 3, 3 * b : 3 * b + 3] = 1.0
    return x


def test_matched_share_on_known_flows():
    x = _cells(4, 6)
    for cosine in (False, True):
        assert matched_share(x, x, (0, 0), cosine) == 1.0
    # the reference holds the query's content 3 px up and 6 px left: query pixel p is at p + (-3, -6)
    ref = torch.zeros_like(x)
    ref[..., :9, :12] = x[..., 3:, 6:]
    assert matched_share(x, ref, (-3, -6), cosine=True) == 1.0
    # scored against the wrong flow: only the first cell "matches" (its content is not in the
    # reference, every cost ties at 0, and ties go to index 0, i.e. to itself): 9 of 216 pixels
    assert matched_share(x, ref, (0, 0), cosine=True) == pytest.approx(9 / 216)


def test_paper_formula_prefers_strong_cells_cosine_does_not():
    # two kinds of cell: a weak one (norm 0.6 after pooling) and a strong one; in the dot product
    # of eq. (5) a weak cell's best match is a strong cell that points partly its way
    x = torch.zeros(1, 2, 3, 6)
    x[0, 0, :, :3] = 1.0  # cell 0: channel 0 everywhere (pooled norm 1)
    x[0, 0, 0, 3:] = 1.0  # cell 1: channel 0 on 3 of 9 pixels, channel 1 on the rest
    x[0, 1, 1:, 3:] = 1.0  # pooled cell 1 = (1/3, 2/3), norm 0.75; cell 0 = (1, 0)
    # paper: cell 1 . cell 0 = 1/3 < cell 1 . cell 1 = 5/9, so both find themselves here ...
    assert matched_share(x, x, (0, 0), cosine=False) == 1.0
    # ... but make cell 0 also point a little along channel 1 and it wins cell 1's match
    y = x.clone()
    y[0, 1, :, :3] = 0.9
    assert matched_share(y, y, (0, 0), cosine=False) < 1.0
    assert matched_share(y, y, (0, 0), cosine=True) == 1.0


def test_cli_on_a_small_model(tmp_path):
    from skimage import data

    save_model(tmp_path / "r.pt", small_refqsr(3), half=False)
    (tmp_path / "val").mkdir()
    Image.fromarray(data.astronaut()[:512, :512].copy()).save(tmp_path / "val" / "a.png")  # 128 px LR
    res = CliRunner().invoke(main, [str(tmp_path / "r.pt"), "--val", str(tmp_path / "val")])
    assert res.exit_code == 0, res.output
    rows = [ln.split("|")[1:5] for ln in res.output.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r[0].strip() for r in rows] == ["head"] * 4 + ["block 1"] * 4 + ["RefER 1"] * 6 + ["RefER 2"] * 6
    # head and block 1 run at the same precision on both paths: with a cosine, the same patch
    # matches itself everywhere (eq. (5)'s dot product need not: see the test above)
    assert [rows[i][2].strip() for i in (1, 5)] == ["100.0%"] * 2
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tiny / "a.png")
    res = CliRunner().invoke(main, [str(tmp_path / "r.pt"), "--val", str(tiny)])
    assert res.exit_code == 2 and "at least 126x108 px" in res.output


def test_cli_on_a_shared_matching_model(tmp_path):
    """A shared-matching model has no per-RefER matching (no trained-quantizer rows) and one more
    row: its own flow on block-1 features (an arg-max: on this untrained network a photo's flat
    regions give cells that tie, and ties go to the first cell, so not every cell finds itself)."""
    from compile_helpers import small_refqsr as compile_small_refqsr
    from skimage import data

    save_model(tmp_path / "s.pt", compile_small_refqsr("ddtb", matching="shared"), half=False)
    (tmp_path / "val").mkdir()
    Image.fromarray(data.astronaut()[:512, :512].copy()).save(tmp_path / "val" / "a.png")
    res = CliRunner().invoke(main, [str(tmp_path / "s.pt"), "--val", str(tmp_path / "val")])
    assert res.exit_code == 0, res.output
    rows = [ln.split("|")[1:5] for ln in res.output.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r[0].strip() for r in rows] == ["head"] * 4 + ["block 1"] * 5 + ["RefER 1"] * 5 + ["RefER 2"] * 5
    shared = rows[5]
    assert shared[1].strip().startswith("shared matching") and float(shared[2].strip()[:-1]) > 50
