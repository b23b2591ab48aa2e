"""How long a compile will take, for the first-use message: learnt from this cache's past compiles.

The cache root holds ``compile_times.json``: per target kind, the seconds the last compile took per
stage (export, each graph build, the clustering kernel, writing). Without a past compile the
estimate uses a stage time measured on a 2-core AVX2 CPU, the slowest machine the engine targets.
"""

from __future__ import annotations

import json
from contextlib import suppress
from pathlib import Path

from ..files import write_atomic
from .artifact import cache_dir

# Seconds per compile stage with nothing learnt yet: srresnet_ddtb_refqsr84's 8 stages took about 100 s
# on a 2-core AMD EPYC (Zen 3, AVX2 only).
FALLBACK_STAGE_SECONDS = 13.0


def _times_file() -> Path:
    return cache_dir() / "compile_times.json"


def _read() -> dict[str, float]:
    try:
        data = json.loads(_times_file().read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and v > 0}


def estimate_seconds(target: str, stages: int) -> float:
    """Expected wall time of a compile with ``stages`` stages for ``target`` ("llvm" or "cuda")."""
    return stages * _read().get(target, FALLBACK_STAGE_SECONDS)


def record(target: str, stages: int, seconds: float) -> None:
    """Remember a finished compile's time per stage; a cache that cannot be written is no error."""
    times = _read()
    times[target] = seconds / max(1, stages)
    with suppress(OSError):
        write_atomic(_times_file(), lambda tmp: Path(tmp).write_text(json.dumps(times)))


def describe(seconds: float) -> str:
    """``about a minute`` / ``about 3 minutes`` / ``under a minute``."""
    if seconds < 45:
        return "under a minute"
    minutes = round(seconds / 60)
    return "about a minute" if minutes <= 1 else f"about {minutes} minutes"
