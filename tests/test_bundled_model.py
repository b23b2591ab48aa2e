"""The bundled default model loads and upscales a held-out photo better than bicubic."""
from __future__ import annotations

import numpy as np
import pytest

from refqsr_engine.engine.models_store import DEFAULT_MODEL, resolve_model
from refqsr_engine.metrics import bicubic_degrade, imresize, psnr_y
from refqsr_engine.models.checkpoint import load_model
from refqsr_engine.models.patchwise import upscale_patchwise


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()[64:320, 128:384].copy()  # held out of training (validation image)


def test_default_model_beats_bicubic(photo):
    model, card = load_model(resolve_model(DEFAULT_MODEL))
    lr = bicubic_degrade(photo, 4)
    sr = upscale_patchwise(model, lr.transpose(2, 0, 1).astype(np.float32) / 255.0, patch=48, overlap=6).image
    sr8 = np.clip(np.round(sr * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    bicubic = np.floor(np.clip(imresize(lr, scale=4.0), 0, 255) + 0.5).astype(np.uint8)
    ours, theirs = psnr_y(sr8, photo, 4), psnr_y(bicubic, photo, 4)
    assert ours > theirs + MARGIN_DB, (ours, theirs)
    assert card["steps"] > 0 and card["validation"]["mean"]["psnr_y"] > card["validation"]["mean"]["bicubic_psnr_y"]


MARGIN_DB = 0.05
