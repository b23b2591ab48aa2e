"""The CSV curve every training command writes (one row per logged step), kept consistent with
the checkpoint: on resume, rows past the checkpoint's step are dropped."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def atomic_write_text(text: str, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, rename: never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_log(path: Path, up_to_step: int | None = None) -> list[dict[str, str]]:
    """Rows of a run log (all, or those with step <= ``up_to_step``)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if up_to_step is None:
        return rows
    return [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= up_to_step]


def rewrite_log(path: Path, fields: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """Replace the log with a header and ``rows`` (atomically)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def append_log(path: Path, fields: Sequence[str], row: dict[str, Any]) -> None:
    """Append one row (header first if the file is new), flushed to disk."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())
