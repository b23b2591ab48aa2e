"""`refqsr-engine cache`: what the compiled-model cache holds, and removing what is no longer used.

An entry is *current* when the cache key its own compile options give now is its name: same
model bytes, same TVM and the same compiler sources. Entries of an older refqsr-engine, TVM or model
file are *stale* (no run will use them again); an entry whose manifest cannot be read is *damaged*.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import RefQSRError
from .artifact import MANIFEST, cache_dir, cache_key, cache_lock, format_target


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _state(entry: Path, manifest: dict[str, Any]) -> str:
    from .compiler.options import CompileOptions, artifact_cache_parts

    try:
        options = CompileOptions(**manifest["options"])
        return "current" if cache_key(**artifact_cache_parts(options)) == entry.name else "stale"
    except (KeyError, TypeError, ValueError, RefQSRError, OSError):
        return "stale"  # options of another version, or a model file that is gone


def cache_entries() -> list[dict[str, Any]]:
    """Every entry of the cache, oldest first: key, model, target, patch, batch, size, state."""
    root = cache_dir() / "artifacts"
    if not root.is_dir():
        return []
    rows = []
    for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        row: dict[str, Any] = {"key": entry.name, "path": str(entry), "bytes": _folder_bytes(entry)}
        try:
            manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
            info = manifest.get("model_info") or {}
            row.update(
                model=info.get("name") or manifest.get("model", {}).get("name"),
                bits=info.get("label"),
                target=format_target(manifest.get("target")),
                patch=manifest.get("patch"),
                batch=manifest.get("batch"),
                created=manifest.get("created"),
                state=_state(entry, manifest),
            )
        except (OSError, ValueError, AttributeError):
            row["state"] = "damaged"
        rows.append(row)
    return sorted(rows, key=lambda r: r.get("created") or "")


def remove_entries(everything: bool) -> list[dict[str, Any]]:
    """Remove the stale and damaged entries (``everything``: all of them), each under its lock so a
    running compile or load is not cut short; returns the removed rows."""
    removed = []
    for row in cache_entries():
        if everything or row["state"] != "current":
            with cache_lock(row["key"]) as entry:
                shutil.rmtree(entry, ignore_errors=True)
            removed.append(row)
    return removed


def format_entries(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"the cache {cache_dir()} holds no compiled models"
    lines = [f"{cache_dir()}:"]
    for r in rows:
        what = f"{r.get('model', '?')} ({r.get('bits') or '?'}), {r.get('target', '?')}"
        shape = f"patch {r.get('patch')}, batch {r.get('batch')}" if r.get("patch") else ""
        lines.append(f"  {r['key']}  {r['state']:<7}  {r['bytes'] / 1e6:6.1f} MB  {what}  {shape}".rstrip())
    total = sum(r["bytes"] for r in rows)
    lines.append(f"{len(rows)} entries, {total / 1e6:.1f} MB; `refqsr-engine cache --prune` removes the stale ones")
    return "\n".join(lines)
