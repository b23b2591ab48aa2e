"""training.calibrate: widened activation ranges clip at most the asked share of the inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from refqsr_engine.models.quant_ddtb import DdtbActivation
from refqsr_engine.models.quant_pams import PamsActivation
from refqsr_engine.training import calibrate as cal


def outside_share(x: np.ndarray, lower: float, upper: float) -> float:
    return float(((x < lower) | (x > upper)).mean())


@pytest.mark.parametrize("clip", [0.0, 1e-3, 2e-2])
def test_ddtb_bounds_widened_to_the_asked_clip_rate(clip: float) -> None:
    torch.manual_seed(0)
    q = DdtbActivation(8, channels=4, dynamic=False)
    with torch.no_grad():
        q.lower.fill_(-0.5)
        q.upper.fill_(1.0)
    x = torch.randn(8, 4, 16, 16) * 0.8 + 0.2  # tails beyond both bounds
    before = outside_share(x.numpy(), -0.5, 1.0)
    assert before > 0.05
    stats = {"q": cal.Overshoot()}
    stats["q"].add(x, *cal.bounds(q, x))
    report = cal.widen({"q": q}, stats, clip)
    lo, hi = float(q.lower), float(q.upper)
    assert outside_share(x.numpy(), lo, hi) <= clip + 1e-12
    # the smallest such factor on the edge grid: one edge less clips more than asked
    fu = report["q"]["upper_factor"]
    k = int(np.searchsorted(cal.EDGES, fu))
    if k > 0 and clip > 0:
        assert float((x.numpy() > 1.0 * cal.EDGES[k - 1]).mean()) > clip / 2  # half the budget per side


def test_pams_range_widened_symmetrically() -> None:
    q = PamsActivation(8)
    with torch.no_grad():
        q.alpha.fill_(1.0)
    x = torch.linspace(-3.0, 1.5, 10001).reshape(1, 1, 1, -1)
    stats = {"q": cal.Overshoot()}
    stats["q"].add(x, *cal.bounds(q, x))
    report = cal.widen({"q": q}, stats, 0.0)
    assert report["q"]["upper_factor"] == report["q"]["lower_factor"] >= 3.0
    assert float(q.alpha) >= 3.0 and outside_share(x.numpy(), -float(q.alpha), float(q.alpha)) == 0.0


def test_a_zero_lower_bound_is_left_alone() -> None:
    """Inputs of a ReLU-like range (lower 0) give no lower factor: the grid holds 0 exactly anyway."""
    q = DdtbActivation(8, channels=1, dynamic=False)
    with torch.no_grad():
        q.lower.fill_(0.0)
        q.upper.fill_(1.0)
    x = torch.tensor([-0.5, 0.2, 2.0]).reshape(1, 1, 1, 3)
    stats = {"q": cal.Overshoot()}
    stats["q"].add(x, *cal.bounds(q, x))
    report = cal.widen({"q": q}, stats, 0.0)
    assert report["q"]["lower_factor"] == 1.0 and float(q.lower) == 0.0
    assert float(q.upper) >= 2.0
