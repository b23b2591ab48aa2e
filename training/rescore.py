"""Score bundled models on the held-out sets and write the results into their model cards.

    python -m refqsr_engine.training.rescore --data data/sr [NAME ...]

Each model runs patch-wise (96 px, 6 px overlap) at its own bits on every image of ``DATA/val``,
``DATA/test`` and ``DATA/hicontrast`` (:data:`~refqsr_engine.training.bundle.EVAL_SETS`); the card's
``evaluation`` block gets each set's mean PSNR/SSIM-Y, bicubic's, and each image's PSNR-Y, and says
which engine produced them. ``--engine tvm`` (the default) runs the compiled CPU engine, the integer
kernels users run and about ten times faster than the PyTorch fake-quantized twin (``--engine
torch``); the two agree within the rounding ties the engine tests bound. The weights are written back
unchanged (fp16 in, fp16 out); only the card changes. No name: every bundled model.
"""

from __future__ import annotations

import sys
import time

import click
import torch
from refqsr_engine.engine.models_store import bundled_dir, bundled_models
from refqsr_engine.errors import RefQSRError
from refqsr_engine.models.checkpoint import load_model
from refqsr_engine.training.bundle import EVAL_SETS, evaluate_sets, write_card

PATCH, OVERLAP = 96, 6


def rescore(name: str, data: str, engine: str = "tvm") -> dict:
    """Evaluate bundled model ``name`` on the sets under ``data`` and rewrite its card; return the block."""
    path = bundled_dir() / f"{name}.pt"
    if not path.is_file():
        raise RefQSRError(f"no bundled model {name!r} (bundled: {', '.join(bundled_models())})")
    model, card = load_model(path)
    runner, label = None, "PyTorch (fake-quantized twin)"
    if engine == "tvm":
        from refqsr_engine.engine.host_target import host_mcpu_cached
        from refqsr_engine.engine.upscale import UpscaleOptions, Upscaler

        runner = Upscaler(UpscaleOptions(model=name, patch=PATCH, overlap=OVERLAP)).runner
        label = f"compiled engine, llvm -mcpu={host_mcpu_cached()}"
    with torch.no_grad():
        card["evaluation"] = evaluate_sets(
            None if runner else model, data, runner=runner, engine=label, patch=PATCH, overlap=OVERLAP
        )
    write_card(path, model, card)
    return card["evaluation"]


@click.command()
@click.argument("names", nargs=-1)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help=f"Folder holding {', '.join(EVAL_SETS)} (as training.prepare writes it).",
)
@click.option(
    "--engine",
    type=click.Choice(["tvm", "torch"]),
    default="tvm",
    show_default=True,
    help="The compiled engine or the PyTorch model.",
)
def main(names: tuple[str, ...], data: str, engine: str) -> None:
    """Re-score NAMES (default: every bundled model) on the held-out sets."""
    try:
        for name in names or bundled_models():
            start = time.perf_counter()
            block = rescore(name, data, engine)
            scores = "  ".join(f"{s} {block[s]['psnr_y']:.3f}" for s in EVAL_SETS)
            click.echo(f"{name:28s} {scores}  ({time.perf_counter() - start:.0f} s)")
    except RefQSRError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
