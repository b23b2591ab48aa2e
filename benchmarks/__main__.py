"""``python -m refqsr_engine.benchmarks``: the latency benchmark (see :mod:`.latency`)."""
from .latency import main

raise SystemExit(main())
