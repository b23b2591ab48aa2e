"""Research tools that are not installed with the package: run them from the repository root as
``python -m research.<tool>``. Each one's findings and exact commands are in docs/experiments/."""
