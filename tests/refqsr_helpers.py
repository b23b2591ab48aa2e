"""A small RefQSR model with a calibrated ClustBlock and initialised quantizer ranges, for the tests
that need one to run, save or probe (not to check its numbers against hand-set values)."""

from __future__ import annotations

import torch
from refqsr_engine.models.clustblock import DEFAULT_TAU, ClustBlock
from refqsr_engine.models.refqsr import RefQSR
from refqsr_engine.models.registry import build_refqsr


def small_refqsr(seed: int, tau: float = DEFAULT_TAU, n_blocks: int = 4) -> RefQSR:
    """SRResNet DDTB-RefQSR 8-4 (``n_blocks`` ResBlocks, an 8-class ClustBlock), in eval mode, its
    quantizer ranges set by one training forward on random patches."""
    torch.manual_seed(seed)
    clust = ClustBlock(8)
    clust.calibrate(torch.rand(4, 3, 48, 48))
    model = build_refqsr("srresnet", "ddtb", 8, 4, clust, tau=tau, n_blocks=n_blocks)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 24, 24), torch.rand(2, 3, 24, 24))
    return model.eval()
