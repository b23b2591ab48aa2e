"""The repository speaks of the project, never of how the work on it went.

README.md, docs/, the benchmark reports, the model cards that ship in the package (beside each model
and inside it), the training recipes and the comments, docstrings and strings of the package code
and tests may not narrate the work: no numbered work
sessions or periods, no loans or leases of machines, no "this box", "today" or issue numbers, and
no paths of the machines the work ran on. Hardware is named only as the machine a measurement ran
on. Code identifiers are not prose: in Python files only comments and string literals are read, so
a variable named ``session`` or an API name such as ``InferenceSession`` is fine.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = (
    "benchmarks",
    "cli",
    "core",
    "engine",
    "export",
    "gpucheck",
    "kernels",
    "metrics",
    "models",
    "pipeline",
    "training",
    "research",
)

DIARY = re.compile(
    r"\bsessions?\b|\bwork periods?\b|\bloans?\b|\bon loan\b|\bleases?\b|\bleased\b|\bborrowed\b|\blent\b"
    r"|\bthis box\b|\btoday\b|\byesterday\b|\bissues? #?\d+|\btasks? #\d+"
    r"|\.gpudata|/work/|/root/|/home/\w",
    re.IGNORECASE,
)


def _prose_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    files += sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    files += sorted((ROOT / "core" / "data" / "models").glob("*.json"))
    files += sorted((ROOT / "core" / "data" / "clustblock").glob("*.json"))
    files += sorted((ROOT / "training" / "recipes").glob("*"))
    return [f for f in files if f.is_file()]


def _code_files() -> list[Path]:
    return sorted(p for d in (*PACKAGE_DIRS, "tests") for p in (ROOT / d).rglob("*.py"))


def _python_prose(text: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and string literal in Python source."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING) or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            out.append((tok.start[0], tok.string))
    return out


def _hits(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    chunks = _python_prose(text) if path.suffix == ".py" else list(enumerate(text.splitlines(), 1))
    return [f"{path.relative_to(ROOT)}:{line}: {m.group(0)!r}" for line, s in chunks for m in DIARY.finditer(s)]


def test_the_pattern_catches_diary_words_and_spares_api_names() -> None:
    caught = [
        "Session 11: the previous model",
        "measured on the loan",
        "this box is busy today",
        "see issue 3",
        "teacher: .gpudata/fp_best.pt",
        "/work/main/data",
    ]
    spared = ["ort.InferenceSession(path)", "so = ort.SessionOptions()", "a lenticular lens", "issued MACs"]
    assert all(DIARY.search(s) for s in caught)
    assert not any(DIARY.search(s) for s in spared)
    prose = _python_prose('session = ort.InferenceSession(p)  # one session per graph\nx = "no diary"\n')
    assert [s for _, s in prose] == ["# one session per graph", '"no diary"']


def test_the_card_inside_each_bundled_model_is_the_card_beside_it() -> None:
    """The card a loaded model carries (and a compiled artifact's manifest copies) is the reviewed
    ``NAME.json``, not an older text."""
    import json

    import torch

    models = sorted((ROOT / "core" / "data" / "models").glob("*.pt"))
    assert len(models) >= 18
    for path in models:
        embedded = torch.load(path, weights_only=True, map_location="cpu")["card"]
        assert embedded == json.loads(path.with_suffix(".json").read_text()), path.name


@pytest.mark.parametrize("kind", ["prose", "code"])
def test_no_work_diary(kind: str) -> None:
    files = _prose_files() if kind == "prose" else _code_files()
    assert len(files) > (20 if kind == "prose" else 100)
    hits = [h for f in files for h in _hits(f) if f.name != "test_docs_voice.py"]
    assert not hits, "work-diary words:\n" + "\n".join(hits[:40])
