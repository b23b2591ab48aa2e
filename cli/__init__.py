"""The ``refqsr-engine`` command (:mod:`.main`): the top layer, which dispatches to the engine,
training and benchmarks; nothing imports it."""
