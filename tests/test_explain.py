"""`refqsr-engine explain`: the patch-assignment picture (paper Fig. 5) and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from refqsr_engine.cli.main import main
from refqsr_engine.engine import explain as X
from refqsr_engine.errors import RefQSRError

COFFEE = Path(__file__).resolve().parents[1] / "examples" / "coffee_lr.png"  # 150x100


def test_cells_tile_the_image():
    # origins 0, 24, 42 of 30-px patches on a 72-px axis: overlaps split at their middle
    assert X._axis_cells((0, 24, 42), 30, 72) == [(0, 27), (27, 48), (48, 72)]
    assert X._axis_cells((0,), 96, 50) == [(0, 50)]  # one patch larger than the image


def test_picture_marks_references_and_queries(tmp_path):
    dst = tmp_path / "assign.png"
    info = X.explain_file(COFFEE, dst, patch=30, tau=0.9)
    assert dst.is_file() and not list(tmp_path.glob(".tmp-*"))
    s = info["display_scale"]
    with Image.open(dst) as im:
        assert im.size == (150 * s, 100 * s) == tuple(info["picture_size"][::-1])
        pic = np.asarray(im.convert("RGB"), dtype=np.float32)
    roles, group, cells = info["roles"], info["group"], info["cells"]
    assert info["patches"] == len(roles) == len(cells) == 24
    assert info["references"] + info["queries"] == 24 and "query" in roles and "reference" in roles
    # the picture is the LR image upscaled for display, tinted with the group's colour: more for references
    rgb = np.asarray(Image.open(COFFEE).convert("RGB"))
    base = np.asarray(Image.fromarray(rgb).resize((150 * s, 100 * s), Image.BICUBIC), dtype=np.float32)
    a = X.Assignment(cells, roles, group, 30, 6, 0.9)
    colours = X.group_colours(a)
    ref, query = roles.index("reference"), roles.index("query")
    assert roles[group[query]] == "reference"  # a query belongs to the group of the reference it uses
    for i, alpha in ((ref, X.REFERENCE_ALPHA), (query, X.QUERY_ALPHA)):
        y0, x0, y1, x1 = cells[i]
        y, x = (y0 * s + (y1 - y0) * s // 4), (x0 * s + (x1 - x0) * s // 4)  # off the border and the label
        want = (1 - alpha) * base[y, x] + alpha * np.asarray(colours[group[i]], np.float32)
        assert np.abs(pic[y, x] - want).max() <= 1.0, (roles[i], pic[y, x], want)
    # a reference's border is white; a query's is black
    y0, x0, y1, x1 = cells[ref]
    assert pic[y0 * s + 1, (x0 + x1) * s // 2].tolist() == [255, 255, 255]
    y0, x0, y1, x1 = cells[query]
    assert pic[y1 * s - 1, (x0 + x1) * s // 2].tolist() == [0, 0, 0]
    # isolated references are grey, their own group
    for i, r in enumerate(roles):
        if r == "isolated":
            assert group[i] == i and colours[i] == X.ISOLATED_RGB


def test_bad_inputs_are_one_line_errors(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(RefQSRError, match="not an image"):
        X.explain_file(not_image, tmp_path / "a.png")
    with pytest.raises(RefQSRError, match="not found"):
        X.explain_file(tmp_path / "missing.png", tmp_path / "a.png")
    with pytest.raises(RefQSRError, match="unknown output format"):
        X.explain_file(COFFEE, tmp_path / "a.txt")
    with pytest.raises(RefQSRError, match="multiple of 3 in 15"):
        X.explain_file(COFFEE, tmp_path / "a.png", patch=12, overlap=2)
    assert not list(tmp_path.glob("a.*"))
    existing = tmp_path / "keep.png"
    existing.write_bytes(b"old")
    with pytest.raises(RefQSRError):
        X.explain_file(not_image, existing)
    assert existing.read_bytes() == b"old"  # replaced only on success

    runner = CliRunner()
    res = runner.invoke(main, ["explain", str(not_image), str(tmp_path / "b.png")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and res.output.startswith("refqsr-engine: error:")
    res = runner.invoke(main, ["explain", str(COFFEE), str(tmp_path / "b.png"), "--tau", "3"])
    assert res.exit_code == 2 and "tau" in res.output
    res = runner.invoke(main, ["explain", str(COFFEE), str(tmp_path / "b.png"), "--model", "srresnet_fp.pt"])
    assert res.exit_code == 2  # neither bundled nor a file
    res = runner.invoke(main, ["explain", str(COFFEE), str(tmp_path / "c.png"), "--patch", "48"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"wrote {tmp_path / 'c.png'}") and (tmp_path / "c.png").is_file()
