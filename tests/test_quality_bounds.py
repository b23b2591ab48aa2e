"""Every bundled quantized model's card says how far it is from its FP model on the held-out sets and,
where it misses a bound, why: checked against the cards' own scores with plain arithmetic."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from refqsr_engine.cli.main import main
from refqsr_engine.engine.models_store import bundled_dir
from refqsr_engine.training import quality_bounds as qb

# The bounds the project states (docs/models.md): dB below the same architecture's FP model.
LIMITS = {"val": 0.05, "test": 0.05, "hicontrast": 0.2}


def _cards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(bundled_dir().glob("*.json"))}


def _quantized(cards: dict[str, dict]) -> dict[str, dict]:
    return {n: c for n, c in cards.items() if c.get("task") in ("qat", "refqsr") and c.get("bits") not in (None, "32")}


def test_every_quantized_card_holds_its_gaps_and_the_bounds_they_meet() -> None:
    cards = _cards()
    quantized = _quantized(cards)
    assert len(quantized) >= 15
    for name, card in quantized.items():
        block = card.get("quality_bounds")
        assert block is not None, f"{name}: no quality_bounds block (python -m refqsr_engine.training.quality_bounds)"
        fp = cards[f"{card['arch']}_fp"]["evaluation"]
        for s, limit in LIMITS.items():
            gap = card["evaluation"][s]["psnr_y"] - fp[s]["psnr_y"]
            assert block["gap_db"][s] == pytest.approx(gap, abs=1e-4), (name, s)
            assert block["met"][s] == (gap >= -limit), (name, s)
        assert block["all_met"] == all(block["met"].values())
        if block["all_met"]:
            assert "why_not" not in block
        else:
            assert len(block.get("why_not", "")) > 40, f"{name} misses a bound and its card does not say why"


def test_the_stored_blocks_are_what_the_module_computes_now() -> None:
    cards = _cards()
    assert {n: c["quality_bounds"] for n, c in _quantized(cards).items()} == qb.all_blocks(cards)


def test_a_miss_without_a_reason_is_refused() -> None:
    cards = _cards()
    card = copy.deepcopy(cards["srresnet_ddtb8"])
    card["evaluation"]["hicontrast"]["psnr_y"] -= 1.0
    with pytest.raises(ValueError, match="misses the bound on hicontrast"):
        qb.bounds_block("unnamed_model", card, cards)


def test_models_json_and_table_show_the_bounds() -> None:
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(main, ["models", "--json"]).stdout)}
    cards = _cards()
    for name, card in cards.items():
        assert rows[name]["quality_bounds"] == card.get("quality_bounds")
    table = CliRunner().invoke(main, ["models"]).stdout
    for name, card in _quantized(cards).items():
        line = next(x for x in table.splitlines() if x.startswith(name + " ") or x.startswith(name + "  "))
        assert line.rstrip().endswith("met" if card["quality_bounds"]["all_met"] else "missed"), line


def test_the_docs_table_is_the_cards_table() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    start = "<!-- bounds: python -m refqsr_engine.training.quality_bounds -->\n"
    block = text.split(start)[1].split("<!-- /bounds -->")[0]
    assert block.strip() == qb.bounds_table(qb.all_blocks(_cards())).strip()
