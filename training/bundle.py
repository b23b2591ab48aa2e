"""Ship a trained model inside the package: evaluate it on a validation folder and write
``core/data/models/NAME.pt`` (fp16, the project's model format) with ``NAME.json``, its model card
(training facts from the run plus validation PSNR/SSIM on Y, bicubic for comparison, and BitOPs).

Run: ``python -m refqsr_engine.training.bundle RUN/best.pt NAME --val DIR``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from refqsr_engine.engine.models_store import bundled_dir
from refqsr_engine.errors import RefQSRError
from refqsr_engine.files import write_text_atomic
from refqsr_engine.metrics import imresize, psnr_y, sr_to_uint8, ssim_y
from refqsr_engine.models.bitops import count_bitops
from refqsr_engine.models.checkpoint import load_model, save_model
from refqsr_engine.models.model_info import bitops_setting, describe, is_dynamic, model_bits
from refqsr_engine.models.patchwise import TorchRunner
from refqsr_engine.models.refqsr import RefQSR
from refqsr_engine.pipeline.patchwise import PatchRunner, PatchwiseResult, run_patchwise
from refqsr_engine.training.datasets import Pair, PairedFolder
from refqsr_engine.training.prepare import HELD_OUT

URBAN100_LR = (180, 320)  # the paper's BitOPs setting: 1280x720 output, 72 px patches
# The held-out sets every card is scored on (``training.prepare`` writes them under one folder).
EVAL_SETS = HELD_OUT


def upscale_pair(
    model: torch.nn.Module, pair: Pair, patch: int, overlap: int, reference: str = "assigned"
) -> tuple[np.ndarray, PatchwiseResult]:
    """SR of one validation pair's LR (HWC uint8), patch-wise at the model's own bits."""
    runner = TorchRunner(model, model_bits(model)) if reference == "assigned" else None
    if runner is None:
        from refqsr_engine.training.reference_modes import ReferenceModeRunner

        runner = ReferenceModeRunner(model, model_bits(model), reference)
    return run_pair(runner, pair, patch, overlap)


def run_pair(runner: PatchRunner, pair: Pair, patch: int, overlap: int) -> tuple[np.ndarray, PatchwiseResult]:
    """:func:`upscale_pair` on a given patch runner (e.g. one that also measures something)."""
    lr = pair.lr.transpose(2, 0, 1).astype(np.float32) / 255.0
    result = run_patchwise(runner, lr, patch, overlap)
    return sr_to_uint8(result.image), result


def evaluate(
    model: torch.nn.Module | None,
    folder: PairedFolder,
    patch: int = 96,
    overlap: int = 6,
    self_reference: bool = False,
    runner: PatchRunner | None = None,
) -> dict[str, Any]:
    """Mean PSNR/SSIM (Y, shave 4) of the model, run patch-wise at its own bits as the engine runs
    it, with each image's BitOPs/FQR (engine grid, actual reference assignment), and of bicubic.
    ``self_reference`` (RefQSR): RefER gets each query's own features (Table V ablation).
    ``runner``: run the patches on it (e.g. the compiled engine's) instead of PyTorch; it carries
    its model's ``info``, and ``model`` may be None."""
    if runner is not None and self_reference:
        raise RefQSRError("self-reference runs on the PyTorch model only")
    info = runner.info if runner is not None else describe(model, "evaluated")
    rows = []
    for i in range(len(folder)):
        pair = folder[i]
        if runner is not None:
            sr, result = run_pair(runner, pair, patch, overlap)
        else:
            sr, result = upscale_pair(model, pair, patch, overlap, "self" if self_reference else "assigned")
        bic = np.floor(np.clip(imresize(pair.lr, scale=4.0), 0, 255) + 0.5).astype(np.uint8)
        ops = info.image_bitops(pair.lr.shape[:2], patch, overlap, result.clustering, result.patch_bits)
        rows.append(
            {
                "image": pair.name,
                "psnr_y": psnr_y(sr, pair.hr, 4),
                "ssim_y": ssim_y(sr, pair.hr, 4),
                "bicubic_psnr_y": psnr_y(bic, pair.hr, 4),
                "bicubic_ssim_y": ssim_y(bic, pair.hr, 4),
                "bitops_g": ops.gbitops,
                "fqr": ops.total.fqr,
                "reference_share": ops.num_references / ops.num_patches,
                "bitops8_g": info.uniform8_bitops(pair.lr.shape[:2], patch, overlap).gbitops,
            }
        )
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
    return {"mean": mean, "images": rows, "patch": patch, "overlap": overlap}


def evaluate_sets(
    model: torch.nn.Module | None,
    data: str | Path,
    sets: Sequence[str] = EVAL_SETS,
    runner: PatchRunner | None = None,
    engine: str = "PyTorch (fake-quantized twin)",
    patch: int = 96,
    overlap: int = 6,
) -> dict[str, Any]:
    """:func:`evaluate` on each held-out set ``data/NAME`` (whole images): a card's ``evaluation``
    block, which says what ran (``engine``, patch, overlap) and, per set, its folder, the mean
    PSNR/SSIM on Y with bicubic's, and each image's PSNR-Y. Raises if a set is missing."""
    out: dict[str, Any] = {"engine": engine, "patch": patch, "overlap": overlap}
    for name in sets:
        folder = Path(data) / name
        if not folder.is_dir():
            raise RefQSRError(f"evaluation set {folder} is missing (python -m refqsr_engine.training.prepare {data})")
        quality = evaluate(model, PairedFolder(folder, 4), patch, overlap, runner=runner)
        mean = quality["mean"]
        out[name] = {
            "folder": f"{Path(data).name}/{name}",
            "psnr_y": mean["psnr_y"],
            "ssim_y": mean["ssim_y"],
            "bicubic_psnr_y": mean["bicubic_psnr_y"],
            "images": {r["image"]: round(r["psnr_y"], 4) for r in quality["images"]},
        }
    return out


def urban100_bitops(model: torch.nn.Module, mean: dict[str, float]) -> dict[str, Any]:
    """BitOPs/FQR at the paper's Urban100 setting (1280x720 output, 72 px patches) given the
    validation means of :func:`evaluate`: RefQSR at the share of reference patches measured there;
    δ models (bits chosen per patch, and no Urban100 images here to choose them on) as the network's
    8-bit count there times validation's ratio of the chosen bits' BitOPs to 8-bit BitOPs."""
    arch, setting, sizes = bitops_setting(model)
    if is_dynamic(model):
        at8 = describe(model, "evaluated").uniform8_bitops(URBAN100_LR, 72, 6, "paper")
        ratio = mean["bitops_g"] / mean["bitops8_g"]
        return {
            "bits": setting,
            "lr_size": list(URBAN100_LR),
            "patch": 72,
            "overlap": 6,
            "bitops_g": round(at8.gbitops * ratio, 4),
            "fqr": round(mean["fqr"], 4),
            "estimate": "8-bit BitOPs at this setting x (chosen-bits BitOPs / 8-bit BitOPs) on validation",
        }
    share = mean["reference_share"] if isinstance(model, RefQSR) else None
    return count_bitops(arch, URBAN100_LR, setting, 72, 6, "paper", ref_fraction=share, **sizes).as_dict()


def bundle(
    model_path: str | Path,
    name: str,
    val: str | Path,
    val_crop: int | None = None,
    out_dir: str | Path | None = None,
    history: Sequence[str] = (),
    data: str | Path | None = None,
) -> Path:
    """Write NAME.pt + NAME.json into ``out_dir`` (default: the package's bundled models).
    ``history``: facts of the model's training beyond the run's own card (where its starting
    weights came from, earlier stages, the device), appended to the card's ``history`` list.
    ``data``: the folder holding the held-out sets (:data:`EVAL_SETS`), scored into ``evaluation``."""
    model, card = load_model(model_path)
    folder = PairedFolder(val, 4, None, val_crop)
    quality = evaluate(model, folder)
    bitops = urban100_bitops(model, quality["mean"])
    card = {**card, "name": name, "validation": quality, "bitops_urban100_setting": bitops}
    if data is not None:
        card["evaluation"] = evaluate_sets(model, data)
    if history:
        card["history"] = [*card.get("history", []), *history]
    out = Path(out_dir or bundled_dir()) / f"{name}.pt"
    write_card(out, model, card)
    return out


def write_card(out: Path, model: torch.nn.Module, card: dict[str, Any]) -> None:
    """The model file with ``card`` inside and the same card beside it as ``NAME.json``."""
    save_model(out, model, card)
    write_text_atomic(out.with_suffix(".json"), json.dumps(card, indent=2) + "\n")


@click.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("name")
@click.option(
    "--val", required=True, type=click.Path(exists=True, file_okay=False), help="Folder of HR validation images."
)
@click.option("--val-crop", type=int, default=None, help="Centre-crop validation images to this HR size.")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help=f"Folder holding the held-out sets ({', '.join(EVAL_SETS)}), scored into the card's evaluation.",
)
@click.option(
    "--history",
    multiple=True,
    help="A fact of the model's training for the card's history list (repeatable), e.g. its starting weights.",
)
def main(
    model_path: str, name: str, val: str, val_crop: int | None, data: str | None, history: tuple[str, ...]
) -> None:
    try:
        out = bundle(model_path, name, val, val_crop, history=history, data=data)
    except RefQSRError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    card = json.loads(out.with_suffix(".json").read_text())
    m = card["validation"]["mean"]
    click.echo(
        f"wrote {out}: PSNR-Y {m['psnr_y']:.3f} dB (bicubic {m['bicubic_psnr_y']:.3f}), SSIM-Y {m['ssim_y']:.4f}"
    )


if __name__ == "__main__":
    main()
