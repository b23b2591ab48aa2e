"""Small models for the compile/runtime tests (4 blocks keep export and compile quick)."""
from __future__ import annotations

import torch

from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.models.registry import build_refqsr

PATCH = 24
N_BLOCKS = 4


def small_refqsr(scheme: str, b_high: int = 8, b_low: int = 4, seed: int = 3, patch: int = PATCH):
    """A freshly initialised RefQSR model with calibrated quantizers (and a varying DDTB gate)."""
    torch.manual_seed(seed)
    clust = ClustBlock(16)
    clust.calibrate(torch.rand(6, 3, patch, patch))
    model = build_refqsr("srresnet", scheme, b_high, b_low, clust, n_blocks=N_BLOCKS)
    model.train()
    model(torch.rand(4, 3, patch, patch), torch.rand(4, 3, patch, patch))  # initialise quantizer ranges
    if scheme == "ddtb":  # make the dynamic gate actually vary per sample
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "gate") and m.gate is not None:
                    m.gate.fc2.weight.normal_(0, 0.5)
                    m.gate.fc2.bias.uniform_(-0.5, 0.5)
    return model.eval()
