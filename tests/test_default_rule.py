"""The default model is the one docs/models.md's rule picks from the model cards."""

from __future__ import annotations

import pytest
from refqsr_engine.engine.models_store import DEFAULT_ALIAS
from refqsr_engine.training.default_rule import bundled_cards, candidates, choose_default


def card(task: str, val: float, test: float, hc: float, bitops: float) -> dict:
    return {
        "task": task,
        "evaluation": {"val": {"psnr_y": val}, "test": {"psnr_y": test}, "hicontrast": {"psnr_y": hc}},
        "bitops_urban100_setting": {"bitops_g": bitops},
    }


def test_highest_mean_over_the_sets_wins() -> None:
    cards = {
        "a": card("refqsr", 33.0, 30.0, 27.0, 10.0),  # mean 30.0
        "b": card("refqsr", 32.0, 30.0, 28.3, 10.0),  # mean 30.1
        "fp": card("fp", 40.0, 40.0, 40.0, 99.0),  # not a RefQSR model
    }
    assert choose_default(cards) == "b"
    assert [c.name for c in candidates(cards)] == ["b", "a"]


def test_a_tie_goes_to_fewer_bitops() -> None:
    cards = {
        "best": card("refqsr", 33.0, 30.0, 27.06, 10.0),  # mean 30.02
        "cheap": card("refqsr", 33.0, 30.0, 27.0, 6.0),  # mean 30.00: within 0.02 dB
        "cheaper_but_worse": card("refqsr", 33.0, 30.0, 26.9, 1.0),  # 0.053 dB below: not tied
    }
    assert choose_default(cards) == "cheap"
    cards["cheap"]["evaluation"]["hicontrast"]["psnr_y"] = 26.99  # now 0.023 dB below
    assert choose_default(cards) == "best"


def test_a_card_without_a_set_is_refused() -> None:
    c = card("refqsr", 33.0, 30.0, 27.0, 10.0)
    del c["evaluation"]["hicontrast"]
    with pytest.raises(ValueError, match="hicontrast"):
        choose_default({"m": c})


def test_the_engine_default_follows_the_rule() -> None:
    assert DEFAULT_ALIAS == choose_default(bundled_cards())
