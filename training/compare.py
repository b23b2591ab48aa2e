"""Quality table of trained models on held-out folders (the paper's Tables II and V on our data).

    python -m refqsr_engine.training.compare --val data/sr/val [--val data/sr/hicontrast ...] \\
        --row "FP=srresnet_fp" --row "DDTB-8=runs/ddtb8/best.pt" \\
        --row "RefQSR 8-4=runs/refqsr84/best.pt" --row "Self-reference=runs/refqsr84/best.pt@self" \\
        --row "w/o RefER=runs/norefer84/best.pt" --out table.md

Every model runs patch-wise (96 px, 6 px overlap) at its own bits, as the engine runs it, on whole
images; ``@self`` runs a RefQSR model with each query's own features fed to RefER (Table V's
"self-reference"). Columns: BitOPs and FQR from each image's actual reference assignment (engine
grid, mean over images) and at the paper's Urban100 setting (1280x720 output, 72 px patches, the
reference share measured here), PSNR/SSIM on Y (shave 4), and bicubic for comparison. A repeated
``--val`` (e.g. the test and high-contrast sets beside the validation set) adds a PSNR-Y column per
further folder; BitOPs, FQR and SSIM are those of the first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from refqsr_engine.engine.models_store import resolve_model
from refqsr_engine.errors import RefQSRError
from refqsr_engine.files import write_text_atomic
from refqsr_engine.models.checkpoint import load_model
from refqsr_engine.models.refqsr import RefQSR
from refqsr_engine.training.bundle import evaluate, urban100_bitops
from refqsr_engine.training.datasets import PairedFolder

SELF_SUFFIX = "@self"


def parse_row(text: str) -> tuple[str, str, bool]:
    """``"LABEL=PATH[@self]"`` -> (label, path, self_reference)."""
    label, sep, path = text.partition("=")
    if not sep or not label.strip() or not path.strip():
        raise RefQSRError(f"--row takes LABEL=PATH[{SELF_SUFFIX}], got {text!r}")
    self_ref = path.endswith(SELF_SUFFIX)
    return label.strip(), path[: -len(SELF_SUFFIX)] if self_ref else path, self_ref


def compare_row(
    label: str, path: str, self_reference: bool, folder: PairedFolder, more: dict[str, PairedFolder] | None = None
) -> dict[str, Any]:
    """One table row: the model's quality and BitOPs on ``folder``, and its PSNR-Y on each of ``more``."""
    model, card = load_model(resolve_model(path))
    if self_reference and not (isinstance(model, RefQSR) and model.tail == "refer"):
        raise RefQSRError(f"{path}: {SELF_SUFFIX} needs a RefQSR model with RefER blocks")
    quality = evaluate(model, folder, self_reference=self_reference)
    mean = quality["mean"]
    paper = urban100_bitops(model, mean)
    return {
        "label": label,
        "model": path,
        "self_reference": self_reference,
        "bits": paper["bits"],
        "steps": card.get("steps"),
        "bitops_g": mean["bitops_g"],
        "fqr": mean["fqr"],
        "bitops_urban100_g": paper["bitops_g"],
        "fqr_urban100": paper["fqr"],
        "reference_share": mean["reference_share"],
        "psnr_y": mean["psnr_y"],
        "ssim_y": mean["ssim_y"],
        "bicubic_psnr_y": mean["bicubic_psnr_y"],
        "bicubic_ssim_y": mean["bicubic_ssim_y"],
        "images": quality["images"],
        "more": {
            name: _psnr_only(evaluate(model, f, self_reference=self_reference)) for name, f in (more or {}).items()
        },
    }


def _psnr_only(quality: dict[str, Any]) -> dict[str, Any]:
    """What a further set's column needs of :func:`evaluate`'s result."""
    mean = quality["mean"]
    return {"psnr_y": mean["psnr_y"], "bicubic_psnr_y": mean["bicubic_psnr_y"], "images": quality["images"]}


def markdown(rows: list[dict[str, Any]], val: str) -> str:
    more = list(rows[0]["more"])
    head = (
        "| model | bits | train steps | BitOPs (G, val) | FQR (val) | BitOPs (G, Urban100 setting) "
        "| PSNR-Y (dB) | SSIM-Y |"
        + "".join(f" PSNR-Y, {name} |" for name in more)
        + "\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        + " ---: |" * len(more)
        + "\n"
    )
    bic = rows[0]
    lines = [
        f"| bicubic | - | - | - | - | - | {bic['bicubic_psnr_y']:.3f} | {bic['bicubic_ssim_y']:.4f} |"
        + "".join(f" {bic['more'][name]['bicubic_psnr_y']:.3f} |" for name in more)
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['bits']} | {r['steps'] if r['steps'] is not None else '-'} | "
            f"{r['bitops_g']:.3f} | {r['fqr']:.2f} | {r['bitops_urban100_g']:.2f} | "
            f"{r['psnr_y']:.3f} | {r['ssim_y']:.4f} |" + "".join(f" {r['more'][name]['psnr_y']:.3f} |" for name in more)
        )
    n = len(bic["images"])
    return f"Validation: {val} ({n} images, whole, x4, patch-wise 96 px)\n\n" + head + "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--val",
    "vals",
    multiple=True,
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder of HR images (held out); repeat for more sets (a PSNR-Y column each).",
)
@click.option(
    "--row",
    "rows",
    multiple=True,
    required=True,
    help=f"LABEL=MODEL[{SELF_SUFFIX}] (a bundled model's name or a model file), in table order.",
)
@click.option(
    "--val-crop", type=click.IntRange(min=0), default=0, help="Centre-crop to this HR size (0: whole images)."
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the table (and OUT.json).")
def main(vals: tuple[str, ...], rows: tuple[str, ...], val_crop: int, out: str | None) -> None:
    """Evaluate trained models side by side and print the markdown table."""
    val = vals[0]
    try:
        folder = PairedFolder(val, 4, None, val_crop or None)
        more = {Path(v).name: PairedFolder(v, 4, None, val_crop or None) for v in vals[1:]}
        if len(more) != len(vals) - 1 or Path(val).name in more:
            raise RefQSRError("each --val folder needs its own name (it heads a column)")
        results = []
        for text in rows:
            label, path, self_ref = parse_row(text)
            click.echo(f"evaluating {label} ({path}{' , self-reference' if self_ref else ''})", err=True)
            results.append(compare_row(label, path, self_ref, folder, more))
    except RefQSRError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    table = markdown(results, val)
    click.echo(table)
    if out:
        write_text_atomic(out, table)
        write_text_atomic(Path(out).with_suffix(".json"), json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
