"""`python -m refqsr_engine.training.compare`: the Tables II/V quality table of trained models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from refqsr_engine.metrics import bicubic_degrade, psnr_y
from refqsr_engine.models.checkpoint import save_model
from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.models.qconv import BitSpec
from refqsr_engine.models.registry import build_refqsr, build_sr
from refqsr_engine.training.compare import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("compare")
    (root / "val").mkdir()
    hr = data.astronaut()[64:448, 64:448].copy()  # 96x96 LR: exactly one 96-px engine patch
    Image.fromarray(hr).save(root / "val" / "a.png")
    torch.manual_seed(0)
    sr8 = build_sr("srresnet", "ddtb", (8,), n_blocks=4)
    sr8.train()
    with torch.no_grad():
        sr8(torch.rand(2, 3, 24, 24), BitSpec(8, 8))
    save_model(root / "d8.pt", sr8.eval(), {"steps": 7}, half=False)
    clust = ClustBlock(8)
    clust.calibrate(torch.rand(4, 3, 48, 48))
    refqsr = build_refqsr("srresnet", "ddtb", 8, 4, clust, tau=-1.0, n_blocks=4)
    refqsr.train()
    with torch.no_grad():
        refqsr(torch.rand(2, 3, 24, 24), torch.rand(2, 3, 24, 24))
    save_model(root / "r.pt", refqsr.eval(), half=False)
    return root, hr, sr8


def test_table_rows_match_an_independent_evaluation(setup, tmp_path):
    root, hr, sr8 = setup
    out = tmp_path / "t.md"
    res = CliRunner().invoke(
        main,
        [
            "--val",
            str(root / "val"),
            "--row",
            f"D8={root / 'd8.pt'}",
            "--row",
            f"Ref={root / 'r.pt'}",
            "--row",
            f"Self={root / 'r.pt'}@self",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in rows] == ["D8", "Ref", "Self"] and rows[2]["self_reference"]
    # D8: the whole 96x96 LR image is one patch, so it is the network at 8 bits on the image
    lr = bicubic_degrade(hr, 4).transpose(2, 0, 1).astype(np.float32) / 255.0
    with torch.no_grad():
        want = sr8(torch.from_numpy(lr)[None], BitSpec(8, 8))[0].numpy()
    want8 = np.clip(np.round(want * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    assert rows[0]["psnr_y"] == pytest.approx(psnr_y(want8, hr, 4), abs=1e-6)
    assert rows[0]["fqr"] == 8.0 and rows[0]["steps"] == 7
    # 1 patch, 4 blocks x 2 convs of 64->64 3x3 at 8/8 bits: 2 * MACs * (8/32)^2 each
    assert rows[0]["bitops_g"] == pytest.approx(2 * 8 * 64 * 64 * 9 * 96 * 96 * (8 / 32) ** 2 / 1e9, rel=1e-9)
    table = out.read_text()
    assert "| D8 | 8 | 7 |" in table and "| bicubic |" in table


def test_bad_rows_are_one_line_errors(setup):
    root, _, _ = setup
    runner = CliRunner()
    res = runner.invoke(main, ["--val", str(root / "val"), "--row", "no-equals-sign"])
    assert res.exit_code == 2 and "LABEL=PATH" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["--val", str(root / "val"), "--row", f"x={root / 'd8.pt'}@self"])
    assert res.exit_code == 2 and "needs a RefQSR model" in res.output
    res = runner.invoke(main, ["--val", str(root / "val"), "--row", f"x={root / 'missing.pt'}"])
    assert res.exit_code == 2 and "neither a bundled model" in res.output


def test_a_second_set_gets_its_own_column(setup, tmp_path):
    """--val twice: the second folder's PSNR-Y is the network's on that image (independent forward)."""
    from skimage import data

    root, _, sr8 = setup
    hc = tmp_path / "hicontrast"
    hc.mkdir()
    hr2 = data.camera()[100:484, 50:434]
    hr2 = np.repeat(hr2[..., None], 3, axis=2).copy()
    Image.fromarray(hr2).save(hc / "b.png")
    out = tmp_path / "t.md"
    res = CliRunner().invoke(
        main, ["--val", str(root / "val"), "--val", str(hc), "--row", f"D8={root / 'd8.pt'}", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    row = json.loads(out.with_suffix(".json").read_text())[0]
    lr = bicubic_degrade(hr2, 4).transpose(2, 0, 1).astype(np.float32) / 255.0
    with torch.no_grad():
        want = sr8(torch.from_numpy(lr)[None], BitSpec(8, 8))[0].numpy()
    want8 = np.clip(np.round(want * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    assert row["more"]["hicontrast"]["psnr_y"] == pytest.approx(psnr_y(want8, hr2, 4), abs=1e-6)
    assert "PSNR-Y, hicontrast |" in out.read_text()
    same = CliRunner().invoke(main, ["--val", str(hc), "--val", str(hc), "--row", f"D8={root / 'd8.pt'}"])
    assert same.exit_code == 2 and "its own name" in same.output
