"""`python -m refqsr_engine.training.train_qat [qat|refqsr] ...`: quantization-aware training of the
fixed-precision baselines and of RefQSR (see training/loop.py and training/tasks.py)."""

from __future__ import annotations

import click
from refqsr_engine.training.loop import make_command, run_command

group = click.Group(
    name="train_qat",
    commands=[make_command("qat"), make_command("refqsr")],
    help="Quantization-aware training: qat (fixed bits) or refqsr (b_high-b_low).",
)


def main(argv: list[str] | None = None) -> None:
    run_command(group, argv, "python -m refqsr_engine.training.train_qat")


if __name__ == "__main__":
    main()
