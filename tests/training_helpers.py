"""A tiny training set-up shared by the CADyQ and CABM training tests: two photo crops to train on,
one to validate on, a 4-block SRResNet teacher (bilinear start) and a calibrated ClustBlock."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from refqsr_engine.models.checkpoint import save_model
from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.models.registry import build_sr
from refqsr_engine.models.srresnet import SRResNet, interpolation_init
from skimage import data


def tiny_training_setup(root: Path) -> tuple[dict[str, Path], SRResNet]:
    """Write train/, val/, teacher.pt and clust.pt under ``root``; returns their paths and the teacher."""
    (root / "train").mkdir()
    (root / "val").mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()[:120, :120]).save(root / "train" / f"{name}.png")
    Image.fromarray(data.rocket()[100:164, 100:164]).save(root / "val" / "rocket.png")
    torch.manual_seed(0)
    teacher = interpolation_init(build_sr("srresnet", n_blocks=4, n_feats=8))
    save_model(root / "teacher.pt", teacher)
    clust = ClustBlock(8)
    clust.calibrate(torch.rand(8, 3, 24, 24))
    save_model(root / "clust.pt", clust)
    return {"root": root, "teacher": root / "teacher.pt", "clust": root / "clust.pt"}, teacher
