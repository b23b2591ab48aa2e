"""`python -m refqsr_engine.training.train_fp`: full-precision training (see training/loop.py)."""

from __future__ import annotations

from refqsr_engine.training.loop import make_command, run_command


def main(argv: list[str] | None = None) -> None:
    run_command(make_command("fp"), argv, "python -m refqsr_engine.training.train_fp")


if __name__ == "__main__":
    main()
