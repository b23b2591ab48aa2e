"""Which benchmark step a command line asks for: ``all`` (default), ``latency`` or ``quality``;
shared by ``python -m refqsr_engine.benchmarks`` and ``refqsr-engine bench``."""

from __future__ import annotations

import sys

STEPS = ("all", "latency", "quality")


def run(argv: list[str]) -> int:
    """Run the step named by ``argv[0]`` (``all`` when it names none) with the rest of ``argv``."""
    step, rest = (argv[0], argv[1:]) if argv and argv[0] in STEPS else ("all", argv)
    if step == "latency":
        from .latency import main
    elif step == "quality":
        from .quality import main
    else:
        from .suite import main
    from ..errors import RefQSRError

    try:
        return int(main(rest) or 0)
    except RefQSRError as err:  # a bad --val folder, an unreadable image: one line, no traceback
        print(f"refqsr-engine: error: {err}", file=sys.stderr)
        return 2
