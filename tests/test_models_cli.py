"""`refqsr-engine models`: every bundled model with the facts its card holds, and the help that points to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from refqsr_engine.cli.main import main
from refqsr_engine.engine.models_store import DEFAULT_ALIAS

MODELS = Path(__file__).resolve().parents[1] / "core" / "data" / "models"


def _cards() -> dict[str, dict]:
    return {p.stem: json.loads(p.with_suffix(".json").read_text()) for p in sorted(MODELS.glob("*.pt"))}


def test_json_lists_every_bundled_model_with_its_card_facts() -> None:
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    cards = _cards()
    assert set(rows) == set(cards) and len(rows) >= 18
    for name, card in cards.items():
        row = rows[name]
        assert row["arch"] == card["arch"]
        assert row["bits"] == (card.get("bits") or "32")
        assert row["psnr_y"] == pytest.approx(card["validation"]["mean"]["psnr_y"])
        assert row["bitops_g"] == pytest.approx(card["bitops_urban100_setting"]["bitops_g"])
        assert row["size_bytes"] == (MODELS / f"{name}.pt").stat().st_size
        assert row["hicontrast_psnr_y"] == pytest.approx(card["evaluation"]["hicontrast"]["psnr_y"])
        assert set(row["sets"]) == {"val", "test", "hicontrast"}
    assert [n for n, r in rows.items() if r["default"]] == [DEFAULT_ALIAS]


def test_text_table_has_one_line_per_model_and_marks_the_default() -> None:
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0 and result.stdout.endswith("\n")
    lines = result.stdout.splitlines()
    for name, card in _cards().items():
        line = next(x for x in lines if x.split()[:1] == [name])
        assert f"{card['validation']['mean']['psnr_y']:.3f}" in line
        assert f"{card['evaluation']['hicontrast']['psnr_y']:.3f}" in line
        assert ("(default)" in line) == (name == DEFAULT_ALIAS)


@pytest.mark.parametrize("command", [[], ["upscale"], ["compile"]])
def test_help_points_to_the_model_list(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "refqsr-engine models" in " ".join(result.stdout.split())
