"""``python -m refqsr_engine.benchmarks [all|latency|quality] [options]``: the whole suite
(:mod:`.suite`, the default), or one of its steps."""

import sys

from .dispatch import run
from .latency import _exit_on_sigterm

_exit_on_sigterm()
raise SystemExit(run(sys.argv[1:]))
