"""The ``refqsr-engine`` command (:mod:`.main`): the top layer, which dispatches to the engine,
training and benchmarks; nothing imports it."""

import sys


def run() -> None:
    """The console entry point: :func:`.main.main`, with a Ctrl-C during start-up (while the
    command's modules import) reported in one line like one during the work."""
    try:
        from .main import main

        main()
    except KeyboardInterrupt:
        sys.stderr.write("refqsr-engine: interrupted\n")
        sys.exit(130)
