"""BitOPs/FQR against the paper's published numbers and against closed-form hand counts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner
from refqsr_engine.cli.main import main
from refqsr_engine.models.bitops import Precision, count_bitops, grid_boxes

MACS_PER_PX = 64 * 64 * 9  # one 3x3 64->64 conv
N_CONVS = 32  # 16 ResBlocks x 2


@pytest.mark.parametrize(
    "lr_size, bits, patch, grid, expected",
    [
        ((180, 320), "32", 72, "paper", 148.32),  # Table II, Urban100 setting
        ((180, 320), "8", 72, "paper", 9.27),
        ((180, 320), "4", 72, "paper", 2.32),
        ((270, 512), "32", 96, "paper", 349.02),  # Table II, Test2K
        ((270, 512), "8", 96, "paper", 21.81),
        ((540, 1024), "32", 96, "paper", 1442.41),  # Table VII / II, Test4K
        ((540, 1024), "8", 96, "paper", 90.15),
        ((540, 1024), "4", 96, "paper", 22.54),
        ((540, 1024), "32", None, "full", 1304.60),  # Table VII, full image
        ((540, 1024), "8", None, "full", 81.54),
    ],
)
def test_paper_numbers(lr_size, bits, patch, grid, expected):
    # Exact integer counts; within one unit of the paper's last printed digit. All but one agree
    # after rounding; Test4K 96px at 32 bits is 1442.4166 G exactly, printed 1442.41 in the paper.
    report = count_bitops("srresnet", lr_size, bits, patch, 6, grid)
    assert abs(report.gbitops - expected) <= 0.0100001


def test_paper_grid_stretches_last_patch():
    boxes = grid_boxes(180, 320, 72, 6, "paper")
    xs = sorted({(b.x, b.w) for b in boxes})
    ys = sorted({(b.y, b.h) for b in boxes})
    assert xs == [(0, 72), (66, 72), (132, 72), (198, 122)]
    assert ys == [(0, 72), (66, 114)]
    assert sum(b.pixels for b in boxes) == 338 * 186


def test_engine_grid_counts_fixed_patches():
    report = count_bitops("srresnet", (180, 320), "32", 72, 6, "engine")
    # origins x: 0,66,132,198,248 ; y: 0,66,108 -> 15 patches of 72x72
    assert report.num_patches == 15
    assert report.total.network == pytest.approx(15 * 72 * 72 * MACS_PER_PX * N_CONVS * 2)


def _query_patch_by_hand(p: int, b_high: int, b_low: int, b_med: int) -> tuple[float, float]:
    """One p x p query patch of SRResNet-RefQSR, written out term by term."""
    macs = p * p * MACS_PER_PX
    first = 2 * 2 * macs * (b_high / 32) ** 2
    low = 26 * 2 * macs * (b_med / 32) * (b_low / 32)
    refer_convs = 4 * 2 * macs * (b_high / 32) ** 2
    positions = (p // 3) ** 2
    cost_volume = 2 * 2 * positions * positions * 64 * (b_low / 32) ** 2
    fqr = (2 * b_high + 26 * b_low + 4 * b_high) / 32
    return first + low + refer_convs + cost_volume, fqr


@pytest.mark.parametrize("setting, b_med", [("8-4", 6), ("8-5", 6), ("8-3", 6), ("4-3", 4), ("4-2", 3)])
def test_refqsr_query_patch_by_hand(setting, b_med):
    b_high, b_low = (int(b) for b in setting.split("-"))
    report = count_bitops("srresnet", (96, 96), setting, 96, 6, "engine", is_reference=[False], reference_of=[0])
    expected, fqr = _query_patch_by_hand(96, b_high, b_low, b_med)
    assert report.total.network == pytest.approx(expected, rel=1e-12)
    assert report.total.fqr == pytest.approx(fqr, rel=1e-12)


def test_refqsr_mixed_assignment_is_sum_of_parts():
    # 2x2 engine grid on 150x150 with 96 patches: one reference, three queries.
    refs = [True, False, False, False]
    report = count_bitops("srresnet", (150, 150), "8-4", 96, 6, "engine", refs, [0, 0, 0, 0])
    ref_cost = 96 * 96 * MACS_PER_PX * N_CONVS * 2 * (8 / 32) ** 2
    query_cost, _ = _query_patch_by_hand(96, 8, 4, 6)
    assert report.total.network == pytest.approx(ref_cost + 3 * query_cost, rel=1e-12)
    assert report.num_references == 1
    assert report.total.clustblock > 0


def test_refqsr_test4k_close_to_paper():
    # With the reference share implied by the paper's own FQR (5.87 for 8-4 on Test4K), our
    # accounting lands within 1% of Table II's BitOPs (60.89 G) and reproduces its FQR.
    report = count_bitops("srresnet", (540, 1024), "8-4", 96, 6, "paper", ref_fraction=0.345)
    assert round(report.total.fqr, 2) == 5.87
    assert report.gbitops == pytest.approx(60.89, rel=0.01)


def test_precision_parsing():
    assert Precision.parse("8-4") == Precision(8, 4)
    for bad in ["9", "4-8", "8-32", "x", "8-4-2", "1"]:
        with pytest.raises(ValueError):
            Precision.parse(bad)


def test_cli_prints_paper_value():
    result = CliRunner().invoke(
        main, ["bitops", "--arch", "srresnet", "--hr-size", "1280x720", "--patch", "72", "--bits", "8"]
    )
    assert result.exit_code == 0, result.output
    assert "BitOPs 9.27 G" in result.output
    assert "counted:" in result.output


def test_cli_full_image_and_errors():
    runner = CliRunner()
    out = runner.invoke(main, ["bitops", "--hr-size", "4096x2160", "--patch", "0", "--bits", "32"])
    assert "BitOPs 1304.60 G" in out.output
    bad = runner.invoke(main, ["bitops", "--hr-size", "4096", "--bits", "8"])
    assert bad.exit_code == 2 and "bad size" in bad.output and "Traceback" not in bad.output
    refq = runner.invoke(main, ["bitops", "--hr-size", "1280x720", "--bits", "8-4"])
    assert refq.exit_code == 2 and "--ref-fraction" in refq.output


def test_console_script_runs():
    # The installed entry point (not just the click object) answers.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "refqsr_engine.cli.main",
            "bitops",
            "--hr-size",
            "4096x2160",
            "--patch",
            "96",
            "--bits",
            "32",
            "--grid",
            "paper",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "BitOPs 1442.42 G" in proc.stdout


def test_cli_prints_a_table_for_a_list_of_settings():
    out = CliRunner().invoke(
        main,
        [
            "bitops",
            "--hr-size",
            "1280x720",
            "--patch",
            "72",
            "--grid",
            "paper",
            "--bits",
            "32,8,4,8-4,4-3",
            "--ref-fraction",
            "0.3",
        ],
    )
    assert out.exit_code == 0, out.output
    rows = {
        line.split("|")[1].strip(): line.split("|")[5].strip()
        for line in out.output.splitlines()
        if line.startswith("| ") and "paper" in line
    }
    assert rows["32"] == "148.32" and rows["8"] == "9.27" and rows["4"] == "2.32"  # paper Table II
    # RefQSR sits between its two widths: 4-3 below 4-bit, 8-4 below 8-bit and above 4-bit
    assert float(rows["4-3"]) < float(rows["4"]) < float(rows["8-4"]) < float(rows["8"])
    empty = CliRunner().invoke(main, ["bitops", "--hr-size", "1280x720", "--bits", ","])
    assert empty.exit_code == 2 and "--bits is empty" in empty.output


def test_cli_shows_the_paper_style_elan_count_beside_ours():
    out = CliRunner().invoke(
        main,
        [
            "bitops",
            "--arch",
            "elan_light",
            "--hr-size",
            "1280x720",
            "--patch",
            "72",
            "--grid",
            "paper",
            "--bits",
            "32,8,4",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "| 32 | paper | 72 | 8 | 43.45 |" in out.output  # ours: the quantized LFE convs
    assert "32-bit 104.29 G, 8-bit 10.32 G, 4-bit 3.85 G" in out.output  # Table IV's ELAN rows
    carn = CliRunner().invoke(
        main, ["bitops", "--arch", "carn", "--hr-size", "1280x720", "--patch", "72", "--bits", "32"]
    )
    assert "BitOPs 83.43 G" in carn.output and "Table IV counts ELAN" not in carn.output
