"""The rule that picks the bundled default model, applied to the model cards.

    python -m refqsr_engine.training.default_rule      # every card's scores, and the model the rule picks

Among the RefQSR models (cards with ``task == "refqsr"``), the default is the one with the highest
mean PSNR-Y over the held-out sets (the mean of the validation, test and high-contrast set means, each
set weighted alike); models within :data:`TIE_DB` of that best score are tied, and of those the one
with the fewest BitOPs (at the paper's Urban100 setting) wins. A test asserts that the engine's
default is the model this rule picks (docs/models.md states the rule).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from refqsr_engine.engine.models_store import bundled_dir
from refqsr_engine.training.bundle import EVAL_SETS

TIE_DB = 0.02


class Candidate(NamedTuple):
    name: str
    score: float  # mean over EVAL_SETS of each set's mean PSNR-Y
    bitops_g: float


def candidates(cards: Mapping[str, Mapping[str, Any]]) -> list[Candidate]:
    """The RefQSR models of ``cards`` (name -> card) with their scores, best first.

    Raises ``ValueError`` when a RefQSR card lacks one of the sets: the rule cannot be applied then."""
    out = []
    for name, card in cards.items():
        if card.get("task") != "refqsr":
            continue
        evaluation = card.get("evaluation") or {}
        missing = [s for s in EVAL_SETS if s not in evaluation]
        if missing:
            raise ValueError(f"{name}: the card has no evaluation on {', '.join(missing)}")
        score = sum(float(evaluation[s]["psnr_y"]) for s in EVAL_SETS) / len(EVAL_SETS)
        out.append(Candidate(name, score, float(card["bitops_urban100_setting"]["bitops_g"])))
    return sorted(out, key=lambda c: (-c.score, c.bitops_g, c.name))


def choose_default(cards: Mapping[str, Mapping[str, Any]]) -> str:
    """The name the rule picks: best score; within :data:`TIE_DB` of it, the fewest BitOPs."""
    ranked = candidates(cards)
    if not ranked:
        raise ValueError("no RefQSR model among the cards")
    best = ranked[0].score
    tied = [c for c in ranked if best - c.score <= TIE_DB]
    return min(tied, key=lambda c: (c.bitops_g, c.name)).name


def bundled_cards(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    folder = folder or bundled_dir()
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def score_table(cards: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: each scored card's PSNR-Y per set, their mean, and the high-contrast and val/test gaps
    to the FP model of its architecture."""
    head = "| model | bits | " + " | ".join(EVAL_SETS) + " | mean | hicontrast - FP | val, test - FP | BitOPs (G) |"
    lines = [head, "| --- | --- |" + " ---: |" * (len(EVAL_SETS) + 4)]
    for name, card in cards.items():
        ev = card.get("evaluation")
        if not ev:
            continue
        psnr = {s: float(ev[s]["psnr_y"]) for s in EVAL_SETS}
        fp_name = f"{card['arch']}_fp"
        fp = (cards.get(fp_name) or {}).get("evaluation") if name != fp_name else None
        gap = {s: f"{psnr[s] - fp[s]['psnr_y']:+.3f}" for s in EVAL_SETS} if fp else dict.fromkeys(EVAL_SETS, "-")
        gap_vt = f"{gap['val']}, {gap['test']}" if fp else "-"
        bitops = float(card["bitops_urban100_setting"]["bitops_g"])
        lines.append(
            f"| `{name}` | {card.get('bits') or 32} | "
            + " | ".join(f"{psnr[s]:.3f}" for s in EVAL_SETS)
            + f" | {sum(psnr.values()) / len(psnr):.3f} | {gap['hicontrast']} | {gap_vt} | {bitops:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    cards = bundled_cards()
    print(score_table(cards))
    print()
    try:
        ranked = candidates(cards)
    except ValueError as err:
        raise SystemExit(f"error: {err} (python -m refqsr_engine.training.rescore --data data/sr NAME)") from None
    for c in ranked:
        print(f"{c.name:28s} mean {c.score:.3f} dB, {c.bitops_g:.2f} G BitOPs")
    print(f"default by the rule: {choose_default(cards)}")


if __name__ == "__main__":
    main()
