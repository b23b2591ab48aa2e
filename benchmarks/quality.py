"""BitOPs / FQR / PSNR / SSIM of our models on the validation images: the paper's Table II layout
(FP, DDTB-8, DDTB-4, RefQSR 8-5, 8-4, 8-3, 4-3, 4-2) and its Table VII patch-size study.

    python -m refqsr_engine.benchmarks.quality [--quick] [--val DIR|val|test|hicontrast] [--threads 2] [--out DIR]

Every model runs patch-wise in PyTorch at its own bits, as the engine runs it (the compiled
engine matches its PyTorch twin within 1 LSB, checked by the latency benchmark), on the engine's
grid (every patch P x P, the last one shifted to the edge). BitOPs/FQR of each image come from
``models.bitops.count_bitops`` on that grid with the image's actual reference/query assignment
(``is_reference`` and ``reference_of`` are kept in the JSON), so padded and overlapping pixels are
counted as the engine computes them. BitOPs are reported as the mean per image, FQR as the
MAC-weighted mean over all images; next to them, the paper's Urban100 setting (1280x720 output,
72 px paper grid) at the reference share measured here. "Full image" rows run one forward over
the whole LR image. Quantized models are PTQ from the FP model unless a trained one is bundled
(see :mod:`.configs`); the ``weights`` column says which.

Table II runs at patch 72 (the paper's Urban100 setting; our validation images are about
Urban100's size); Table VII runs RefQSR 8-3 at 48, 72, 96, 256 and 384 px and FP / DDTB-8 on the
whole image and at 96 px (paper Table VII); runs shared by both tables are done once.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import configs as C

#: Table II rows: (model key, label), in the paper's order
TABLE2: list[tuple[str, str]] = [
    ("fp32", "SRResNet (FP32)"),
    ("ddtb-8", "SRResNet-DDTB (8 bit)"),
    ("refqsr-8-5", "+RefQSR (8-5 bit)"),
    ("refqsr-8-4", "+RefQSR (8-4 bit)"),
    ("refqsr-8-3", "+RefQSR (8-3 bit)"),
    ("ddtb-4", "SRResNet-DDTB (4 bit)"),
    ("refqsr-4-3", "+RefQSR (4-3 bit)"),
    ("refqsr-4-2", "+RefQSR (4-2 bit)"),
]
STUDY_MODEL = "refqsr-8-3"  # the RefQSR row of the paper's Table VII
STUDY_BASELINES = ("fp32", "ddtb-8")  # whole image and at the base patch size
PAPER_SETTING = {"lr_size": (180, 320), "patch": 72, "overlap": 6}  # Urban100's BitOPs setting (1280x720 out)

FULL = {
    "n_blocks": 16,
    "patch": 72,
    "overlap": 6,
    "batch": 16,
    "study_patches": [48, 72, 96, 256, 384],
    "study_base": 96,
    "crop": None,
    "limit": None,
}
QUICK = {
    "n_blocks": 4,
    "patch": 24,
    "overlap": 6,
    "batch": 4,
    "study_patches": [24, 48],
    "study_base": 48,
    "crop": (192, 256),
    "limit": 1,
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def image_bitops(model: Any, lr_hw: tuple[int, int], patch: int | None, overlap: int, clustering: Any) -> Any:
    """BitOPs report of one image: the engine grid with the actual assignment, or the whole image."""
    from ..models.bitops import count_bitops
    from ..models.model_info import describe, model_bits
    from ..models.refqsr import RefQSR

    if patch is not None:
        return describe(model, "evaluated").image_bitops(lr_hw, patch, overlap, clustering)
    if isinstance(model, RefQSR):
        raise ValueError("RefQSR works on patches; it has no whole-image row")
    bits = model_bits(model)
    return count_bitops(
        "srresnet", lr_hw, str(bits.act), None, grid="full", n_blocks=model.n_blocks, n_feats=model.n_feats
    )


def run_pass(model: Any, pairs: list, patch: int | None, overlap: int, batch: int) -> list[dict[str, Any]]:
    """One model over every validation image (patch-wise, or whole image when ``patch`` is None):
    per image PSNR/SSIM on Y (shave 4), BitOPs/FQR parts and the reference assignment."""
    import torch

    from ..metrics import psnr_y, sr_to_uint8, ssim_y
    from ..models.model_info import model_bits
    from ..models.patchwise import upscale_patchwise

    bits = model_bits(model)
    rows = []
    for pair in pairs:
        lr = np.ascontiguousarray(pair.lr.transpose(2, 0, 1), dtype=np.float32) / 255.0
        t = time.perf_counter()
        clustering = None
        if patch is None:
            with torch.no_grad():
                image = model(torch.from_numpy(lr)[None], bits)[0].numpy()
        else:
            result = upscale_patchwise(model, lr, patch, overlap, batch, bits)
            image, clustering = result.image, result.clustering
        seconds = time.perf_counter() - t
        sr = sr_to_uint8(image)
        report = image_bitops(model, pair.lr.shape[:2], patch, overlap, clustering)
        rows.append(
            {
                "image": pair.name,
                "psnr_y": psnr_y(sr, pair.hr, 4),
                "ssim_y": ssim_y(sr, pair.hr, 4),
                "seconds": round(seconds, 3),
                **report.as_dict(),
                "bitops_g": report.gbitops,
                "clustblock_g": report.total.clustblock / 1e9,  # unrounded: means are exact
                "act_bit_macs": report.total.act_bit_macs,
                "macs": report.total.macs,
                "is_reference": None if clustering is None else [bool(v) for v in clustering.is_reference.tolist()],
                "reference_of": None if clustering is None else [int(v) for v in clustering.reference_of.tolist()],
                "isolated_references": None if clustering is None else clustering.num_isolated,
            }
        )
    return rows


def aggregate(images: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean BitOPs / PSNR / SSIM per image, MAC-weighted FQR, reference share over all patches."""
    macs = sum(r["macs"] for r in images)
    patches = sum(r["patches"] for r in images)
    return {
        "bitops_g": float(np.mean([r["bitops_g"] for r in images])),
        "clustblock_g": float(np.mean([r["clustblock_g"] for r in images])),
        "fqr": sum(r["act_bit_macs"] for r in images) / macs if macs else 0.0,
        "psnr_y": float(np.mean([r["psnr_y"] for r in images])),
        "ssim_y": float(np.mean([r["ssim_y"] for r in images])),
        "reference_share": sum(r["references"] for r in images) / patches if patches else 1.0,
        "patches": patches,
    }


def paper_setting(key: str, share: float, n_blocks: int) -> dict[str, float]:
    """BitOPs/FQR in the paper's Urban100 setting at the reference share measured here."""
    from ..models.bitops import count_bitops

    spec = C.MODELS[key]
    s = PAPER_SETTING
    ref = share if spec["kind"] == "refqsr" else None
    rep = count_bitops(
        "srresnet", s["lr_size"], spec["bits"], s["patch"], s["overlap"], "paper", ref_fraction=ref, n_blocks=n_blocks
    )
    return {"bitops_g": rep.gbitops, "fqr": rep.total.fqr}


class Runner:
    """Loads each model once and runs each (model, patch) pass once (both tables share passes)."""

    def __init__(
        self, settings: dict[str, Any], pairs: list, say: Callable[[str], None], deadline: float | None = None
    ) -> None:
        self.settings, self.pairs, self.say, self.deadline = settings, pairs, say, deadline
        self.models: dict[str, tuple[Any, dict[str, Any]]] = {}
        self.passes: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
        self.rate: float | None = None  # slowest seconds per computed LR pixel so far: predicts a pass

    def pixels(self, patch: int | None) -> int:
        """LR pixels one pass computes: every patch in full (padding, overlaps) or the images."""
        from ..pipeline.tiling import make_grid

        if patch is None:
            return sum(p.lr.shape[0] * p.lr.shape[1] for p in self.pairs)
        return sum(
            make_grid(p.lr.shape[0], p.lr.shape[1], patch, self.settings["overlap"]).num_patches * patch * patch
            for p in self.pairs
        )

    def skipped(self, key: str, patch: int | None) -> str | None:
        """Why the pass is not run (the suite's time budget would be overrun), or None."""
        if self.deadline is None or self.rate is None or (key, patch) in self.passes:
            return None
        predicted = self.rate * self.pixels(patch)
        if time.time() + predicted <= self.deadline:
            return None
        return f"predicted at {predicted:.0f} s, past the suite's time budget"

    def model(self, key: str) -> tuple[Any, dict[str, Any]]:
        if key not in self.models:
            from ..models.checkpoint import load_model

            info = C.prepare_model(key, self.settings["n_blocks"])
            model, _ = load_model(info["path"])
            self.models[key] = (model, info)
        return self.models[key]

    def row(self, key: str, patch: int | None) -> dict[str, Any]:
        why = self.skipped(key, patch)
        if why is not None:
            self.say(f"{key} @ {'full image' if patch is None else f'{patch} px'}: skipped, {why}")
            return {"key": key, "bits": C.MODELS[key]["bits"], "patch": patch, "skipped": why}
        model, info = self.model(key)
        if (key, patch) not in self.passes:
            t = time.perf_counter()
            s = self.settings
            self.passes[(key, patch)] = run_pass(model, self.pairs, patch, s["overlap"], s["batch"])
            took = time.perf_counter() - t
            self.rate = max(self.rate or 0.0, took / self.pixels(patch))
            self.say(f"{key} @ {'full image' if patch is None else f'{patch} px'}: {took:.0f} s")
        images = self.passes[(key, patch)]
        agg = aggregate(images)
        return {
            "key": key,
            "bits": C.MODELS[key]["bits"],
            "weights": info["weights"],
            "weights_label": C.weights_label(info["weights"]),
            "model_file": Path(info["path"]).name,
            "patch": patch,
            **agg,
            "paper_setting": paper_setting(key, agg["reference_share"], self.settings["n_blocks"]),
            "images": images,
        }


def run_quality(
    quick: bool = False,
    val: str | None = None,
    threads: int = 2,
    say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
    deadline: float | None = None,
) -> dict[str, Any]:
    """Both tables as one results dict: ``{"settings", "validation", "table2", "patch_study"}``.
    ``deadline`` (``time.time()`` seconds): passes predicted to end after it are skipped and
    listed as such (Table II first, then the patch study in :data:`FULL`'s order)."""
    import torch

    from .valdata import validation_set

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    s = dict(QUICK if quick else FULL)
    pairs, validation = validation_set(val, s["crop"], s["limit"])
    runner = Runner(s, pairs, say, deadline)
    say(f"quality: {len(pairs)} validation image(s) from {validation['source']}")
    table2 = [{**runner.row(key, s["patch"]), "label": label} for key, label in TABLE2]
    study = []
    for key in STUDY_BASELINES:
        for patch in (None, s["study_base"]):
            study.append({**runner.row(key, patch), "label": C.MODELS[key]["bits"]})
    for patch in s["study_patches"]:
        study.append({**runner.row(STUDY_MODEL, patch), "label": C.MODELS[STUDY_MODEL]["bits"]})
    return {
        "benchmark": "quality",
        "quick": quick,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            **{k: v for k, v in s.items() if k != "crop"},
            "threads": threads,
            "grid": "engine",
            "paper_setting": {
                "lr_size": list(PAPER_SETTING["lr_size"]),
                "patch": PAPER_SETTING["patch"],
                "overlap": PAPER_SETTING["overlap"],
                "grid": "paper",
            },
        },
        "validation": validation,
        "table2": table2,
        "patch_study": study,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m refqsr_engine.benchmarks.quality",
        description="Table II (BitOPs/FQR/PSNR/SSIM) and Table VII (patch sizes) for our models.",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 4-block models, one small crop, patches 24/48")
    p.add_argument(
        "--val",
        help="HR folder, or a held-out set of data/sr: val, test, hicontrast (default ./data/sr/val if present, "
        "else scikit-image photos)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS_DIR))
    return p


def main(argv: list[str] | None = None) -> int:
    from . import quality_report

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    results = run_quality(args.quick, args.val, args.threads)
    for path in quality_report.write(results, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
