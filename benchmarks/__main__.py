"""``python -m refqsr_engine.benchmarks``: the latency benchmark (see :mod:`.latency`)."""
from .latency import _exit_on_sigterm, main

_exit_on_sigterm()
raise SystemExit(main())
