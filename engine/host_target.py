"""This host's LLVM CPU name, remembered in the cache: asking LLVM needs the TVM compiler (seconds
to import), and a run with a cached artifact must not pay for that. The entry is keyed by the
CPU's model name and flags, so another CPU (a moved cache, a migrated VM) asks LLVM again."""

from __future__ import annotations

import hashlib
import json
from contextlib import suppress
from pathlib import Path

from ..files import write_atomic
from ..kernels.host_cpu import host_cpu_flags
from .artifact import cache_dir


def _cpu_identity() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    text = model + "\0" + " ".join(sorted(host_cpu_flags()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _entry() -> Path:
    return cache_dir() / "host_mcpu.json"


def host_mcpu_cached() -> str:
    """:func:`refqsr_engine.kernels.host_cpu.host_mcpu`, from the cache when this CPU was seen."""
    ident = _cpu_identity()
    try:
        known = json.loads(_entry().read_text())
        if known.get("cpu") == ident and isinstance(known.get("mcpu"), str):
            return known["mcpu"]
    except (OSError, ValueError, AttributeError):
        pass
    from ..kernels.host_cpu import host_mcpu  # asks LLVM: imports the TVM compiler

    mcpu = host_mcpu()
    entry = json.dumps({"cpu": ident, "mcpu": mcpu})
    with suppress(OSError):  # a read-only cache: ask LLVM each time
        write_atomic(_entry(), lambda tmp: Path(tmp).write_text(entry))
    return mcpu
