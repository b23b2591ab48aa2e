"""Quantizers (PAMS, DDTB, min/max) and QuantConv2d checked against independent numpy twins.

Every expected number here comes from a numpy (float64) re-implementation of the formula as the
papers / design notes state it, never from the code under test:

* PAMS activation: clip(x, -a, a); L = 2^(b-1) - 1; round(x_c * L / a) * a / L
* PAMS weight:     a = max|w|, same symmetric grid
* DDTB (asym.):    s = (u - l) / (2^b - 1); z = clip(round(-l / s), 0, 2^b - 1);
                   q = clip(round(x / s) + z, 0, 2^b - 1); out = (q - z) * s
* DDTB weight:     l, u = np.percentile(w, [1, 99]) (linear interpolation), then the formula above
* min/max:         l = min(min x, 0), u = max(max x, 0), same asymmetric formula

The code works in float32 and the twins in float64, so an input whose rounding argument lies
within ~1e-4 of a .5 tie could round the other way; ``_away_from_ties`` nudges such inputs
(or the test asserts there are none) so that the comparison is exact up to float32 noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refqsr_engine.benchmarks.train_memory import composed_fake_quantize
from refqsr_engine.models.qconv import BitSpec, QuantConv2d
from refqsr_engine.models.quant_ddtb import DdtbActivation, DdtbWeight
from refqsr_engine.models.quant_minmax import MinMaxActivation, MinMaxWeight
from refqsr_engine.models.quant_pams import PamsActivation, PamsWeight

TIE_MARGIN = 1e-3  # in units of one quantization step


# --------------------------------------------------------------------------- numpy twins


def np_pams(x: np.ndarray, alpha: float, bits: int) -> np.ndarray:
    levels = 2 ** (bits - 1) - 1
    xc = np.clip(x.astype(np.float64), -alpha, alpha)
    return np.round(xc * levels / alpha) * alpha / levels


def np_pams_weight(w: np.ndarray, bits: int) -> np.ndarray:
    return np_pams(w, float(np.abs(w.astype(np.float64)).max()), bits)


def np_asym_params(lower: float, upper: float, bits: int) -> tuple[float, float, int]:
    # the grid always contains 0 (zero padding must be exact): widen one-sided ranges first
    lower, upper = min(lower, 0.0), max(upper, 0.0)
    qmax = 2**bits - 1
    s = (upper - lower) / qmax
    z = float(np.clip(np.round(-lower / s), 0, qmax))
    return s, z, qmax


def np_asym(x: np.ndarray, lower: float, upper: float, bits: int) -> np.ndarray:
    s, z, qmax = np_asym_params(lower, upper, bits)
    q = np.clip(np.round(x.astype(np.float64) / s) + z, 0, qmax)
    return (q - z) * s


def np_ddtb_weight(w: np.ndarray, bits: int) -> np.ndarray:
    lo, hi = np.percentile(w.astype(np.float64), [1, 99])  # numpy default: linear interpolation
    return np_asym(w, lo, hi, bits)


def _near_tie(t: np.ndarray) -> np.ndarray:
    return np.abs(np.abs(t - np.floor(t)) - 0.5) < TIE_MARGIN


def _away_from_ties(x: np.ndarray, step: float) -> np.ndarray:
    """Move values whose x/step lies within TIE_MARGIN of a .5 tie by a quarter step."""
    x = x.astype(np.float64).copy()
    ties = _near_tie(x / step)
    x[ties] += 0.25 * step
    assert not _near_tie(x / step).any()
    return x.astype(np.float32)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- PAMS


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("alpha", [0.37, 1.0, 2.5])
def test_pams_activation_matches_numpy(bits: int, alpha: float) -> None:
    levels = 2 ** (bits - 1) - 1
    x = _rng(bits).standard_normal((2, 4, 9, 11))
    x = _away_from_ties(x * 1.5 * alpha, alpha / levels)
    assert (np.abs(x) > alpha).mean() > 0.1  # plenty of values are clipped
    q = PamsActivation(bits).eval()
    with torch.no_grad():
        q.alpha.fill_(alpha)
        out = q(_t(x)).numpy()
    expected = np_pams(x, alpha, bits)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * alpha)
    # the output really takes the 2L+1 values of the grid and nothing else
    assert np.unique(np.round(expected * levels / alpha)).size <= 2 * levels + 1


@pytest.mark.parametrize("bits", range(2, 9))
def test_pams_weight_matches_numpy(bits: int) -> None:
    w = _rng(10 + bits).standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.2
    step = np.abs(w.astype(np.float64)).max() / (2 ** (bits - 1) - 1)
    w = _away_from_ties(w, step)  # max|w| is never nudged (its ratio is an integer)
    out = PamsWeight()(_t(w), bits).numpy()
    np.testing.assert_allclose(out, np_pams_weight(w, bits), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- DDTB


def _static_ddtb(bits: int, lower: float, upper: float, channels: int = 4) -> DdtbActivation:
    q = DdtbActivation(bits, channels, dynamic=False).eval()
    with torch.no_grad():
        q.lower.fill_(lower)
        q.upper.fill_(upper)
    return q


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("bounds", [(-0.8, 1.7), (-2.0, 0.3), (0.2, 1.1), (-1.0, 1.05)])
def test_ddtb_static_activation_matches_numpy(bits: int, bounds: tuple[float, float]) -> None:
    lower, upper = bounds
    s, z, _ = np_asym_params(lower, upper, bits)
    assert not _near_tie(np.array([-lower / s])).any()
    x = _rng(bits).standard_normal((2, 4, 9, 11)) * (upper - lower) + (upper + lower) / 2
    x = _away_from_ties(x, s)
    assert (x < lower).any() and (x > upper).any()
    with torch.no_grad():
        out = _static_ddtb(bits, lower, upper)(_t(x)).numpy()
    np.testing.assert_allclose(out, np_asym(x, lower, upper, bits), rtol=0, atol=1e-5 * (upper - lower))


def test_ddtb_dynamic_gate_zero_init_equals_static() -> None:
    x = _t(_rng(1).standard_normal((3, 6, 8, 8)) * 2)
    dyn = DdtbActivation(4, 6, dynamic=True).eval()
    with torch.no_grad():
        dyn.lower.fill_(-1.1)
        dyn.upper.fill_(1.6)
        np.testing.assert_array_equal(dyn(x).numpy(), _static_ddtb(4, -1.1, 1.6, 6)(x).numpy())
    np.testing.assert_allclose(dyn(x).detach().numpy(), np_asym(x.numpy(), -1.1, 1.6, 4), rtol=0, atol=1e-5)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _np_gate_factors(q: DdtbActivation, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(upper factor, lower factor) per sample: 2*sigmoid(fc2(relu(fc1(channel means))))."""
    g = q.gate
    w1, b1 = g.fc1.weight.detach().double().numpy(), g.fc1.bias.detach().double().numpy()
    w2, b2 = g.fc2.weight.detach().double().numpy(), g.fc2.bias.detach().double().numpy()
    ctx = x.astype(np.float64).mean(axis=(2, 3))
    f = 2 * _sigmoid(np.maximum(ctx @ w1.T + b1, 0) @ w2.T + b2)
    return f[:, 0], f[:, 1]


def test_ddtb_dynamic_gate_bias_scales_bounds() -> None:
    bits, lower, upper = 5, -1.2, 1.5
    x = _rng(2).standard_normal((3, 6, 8, 8)) * 2
    q = DdtbActivation(bits, 6, dynamic=True).eval()
    with torch.no_grad():
        q.lower.fill_(lower)
        q.upper.fill_(upper)
        q.gate.fc2.bias.copy_(torch.tensor([0.7, -0.4]))
    # with fc2.weight still zero, the factors are 2*sigmoid(bias): (upper, lower)
    up_f, low_f = 2 * _sigmoid(0.7), 2 * _sigmoid(-0.4)
    lo_b, hi_b = q.bounds(_t(x))
    np.testing.assert_allclose(lo_b.detach().numpy(), np.full(3, low_f * lower), rtol=1e-6)
    np.testing.assert_allclose(hi_b.detach().numpy(), np.full(3, up_f * upper), rtol=1e-6)
    s, _, _ = np_asym_params(low_f * lower, up_f * upper, bits)
    x = _away_from_ties(x, s)
    with torch.no_grad():
        out = q(_t(x)).numpy()
    np.testing.assert_allclose(out, np_asym(x, low_f * lower, up_f * upper, bits), rtol=0, atol=1e-5)


def test_ddtb_dynamic_gate_per_sample_bounds() -> None:
    """A non-zero gate: every sample of the batch is quantized with its own bounds."""
    torch.manual_seed(3)
    bits, lower, upper = 4, -0.9, 1.4
    x = _rng(3).standard_normal((3, 6, 8, 8)) * 1.5 + np.array([0.0, 1.0, -1.0])[:, None, None, None]
    q = DdtbActivation(bits, 6, dynamic=True).eval()
    with torch.no_grad():
        q.lower.fill_(lower)
        q.upper.fill_(upper)
        q.gate.fc2.weight.normal_(0, 1.0)
        q.gate.fc2.bias.copy_(torch.tensor([0.3, -0.2]))
    up_f, low_f = _np_gate_factors(q, x)
    assert np.ptp(up_f) > 0.05 and np.ptp(low_f) > 0.05  # the samples really differ
    x = x.astype(np.float32)
    with torch.no_grad():
        out = q(_t(x)).numpy()
        p = q.qparams(_t(x))
    assert p.scale.shape == (3,) and p.zero_point.shape == (3,)
    for n in range(3):
        lo_n, hi_n = low_f[n] * lower, up_f[n] * upper
        s, z, _ = np_asym_params(lo_n, hi_n, bits)
        assert not _near_tie(np.array([-lo_n / s])).any()
        np.testing.assert_allclose(float(p.scale[n]), s, rtol=1e-5)
        assert float(p.zero_point[n]) == z
        # float32 vs float64 may round a value sitting on a .5 tie either way: one step at most there
        ties = _near_tie(x[n].astype(np.float64) / s)
        assert ties.mean() < 0.01
        expected = np_asym(x[n], lo_n, hi_n, bits)
        np.testing.assert_allclose(out[n][~ties], expected[~ties], rtol=0, atol=1e-5)
        np.testing.assert_allclose(out[n][ties], expected[ties], rtol=0, atol=s * 1.001)


@pytest.mark.parametrize("bounds", [(0.2, 1.1), (-1.1, -0.2)])
def test_ddtb_grid_covers_one_sided_bounds(bounds: tuple[float, float]) -> None:
    lower, upper = bounds
    q = _static_ddtb(4, lower, upper)
    with torch.no_grad():
        out = q(torch.tensor([lower, upper]).view(1, 1, 1, 2)).flatten()
    # any grid of 16 levels containing [lower, upper] (or [min(l, 0), max(u, 0)]) has a step <= tol
    tol = (max(upper, 0.0) - min(lower, 0.0)) / 15
    assert abs(float(out[1]) - upper) <= tol and abs(float(out[0]) - lower) <= tol, out


@pytest.mark.parametrize("bits", range(2, 9))
def test_ddtb_weight_matches_numpy(bits: int) -> None:
    w = (_rng(20 + bits).standard_normal((16, 8, 3, 3)) * 0.1).astype(np.float32)
    lo, hi = np.percentile(w.astype(np.float64), [1, 99])
    s, z, _ = np_asym_params(lo, hi, bits)
    assert not _near_tie(np.array([-lo / s])).any()
    w = _away_from_ties(w, s)
    lo, hi = np.percentile(w.astype(np.float64), [1, 99])  # percentiles of the nudged weights
    assert (w < lo).sum() > 0 and (w > hi).sum() > 0  # some weights are clamped to the grid ends
    s, z, _ = np_asym_params(lo, hi, bits)
    assert not _near_tie(w.astype(np.float64) / s).any() and not _near_tie(np.array([-lo / s])).any()
    out = DdtbWeight()(_t(w), bits).numpy()
    expected = np_ddtb_weight(w, bits)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    # clamped weights sit exactly on the grid ends
    np.testing.assert_allclose(out[w > hi], (2**bits - 1 - z) * s, rtol=1e-5)
    np.testing.assert_allclose(out[w < lo], -z * s, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- integer grid


def _assert_on_grid(out: torch.Tensor, p, per_sample: bool = False) -> None:
    scale, zero = p.scale.detach().double(), p.zero_point.detach().double()
    if per_sample:
        scale, zero = scale.view(-1, 1, 1, 1), zero.view(-1, 1, 1, 1)
    q = out.detach().double() / scale + zero
    assert torch.allclose(q, q.round(), atol=1e-3), float((q - q.round()).abs().max())
    assert torch.equal(zero, zero.round())  # integer zero points
    assert int(q.round().min()) >= p.qmin and int(q.round().max()) <= p.qmax
    symmetric = (-(2 ** (p.bits - 1) - 1), 2 ** (p.bits - 1) - 1)  # PAMS
    asymmetric = (0, 2**p.bits - 1)  # DDTB, min/max (uint8-style)
    assert (p.qmin, p.qmax) in (symmetric, asymmetric)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_integer_grid_property(bits: int) -> None:
    torch.manual_seed(bits)
    x = torch.randn(3, 6, 10, 10) * 2 + 0.3
    w = torch.randn(8, 6, 3, 3) * 0.1

    pams = PamsActivation(bits).train()
    _assert_on_grid(pams(x), pams.qparams())
    _assert_on_grid(PamsWeight()(w, bits), PamsWeight().qparams(w, bits))

    static = DdtbActivation(bits, 6, dynamic=False).train()
    _assert_on_grid(static(x), static.qparams(x))
    dyn = DdtbActivation(bits, 6, dynamic=True).train()
    with torch.no_grad():
        dyn.gate.fc2.weight.normal_(0, 0.5)
    out = dyn(x)
    _assert_on_grid(out, dyn.qparams(x), per_sample=True)
    _assert_on_grid(DdtbWeight()(w, bits), DdtbWeight().qparams(w, bits))

    mm = MinMaxActivation(bits).train()
    mm.observe(x)
    _assert_on_grid(mm(x), mm.qparams())
    _assert_on_grid(MinMaxWeight()(w, bits), MinMaxWeight().qparams(w, bits))


def test_minmax_matches_numpy() -> None:
    x = _rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32) + 0.5
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    x = _away_from_ties(x, np_asym_params(lo, hi, 8)[0])
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    mm = MinMaxActivation(8).eval()
    mm.observe(_t(x))
    with torch.no_grad():
        out = mm(_t(x)).numpy()
    np.testing.assert_allclose(out, np_asym(x, lo, hi, 8), rtol=0, atol=1e-5)
    # a ReLU-like input (all >= 0) still has 0 on its grid
    pos = np.abs(x)
    mm2 = MinMaxActivation(8).eval()
    mm2.observe(_t(pos))
    p = mm2.qparams()
    assert float(p.zero_point) == 0.0
    np.testing.assert_allclose(float(p.scale), pos.max() / 255, rtol=1e-6)


# --------------------------------------------------------------------------- STE gradients


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pams_ste_gradients(bits: int) -> None:
    alpha = 1.3
    step = alpha / (2 ** (bits - 1) - 1)
    g = torch.Generator().manual_seed(bits)
    inside = (torch.rand(200, generator=g) * 2 - 1) * (alpha - step)  # |x| <= alpha - step
    outside = torch.sign(torch.randn(200, generator=g)) * (alpha + step + torch.rand(200, generator=g))
    x = torch.cat([inside, outside]).view(1, 4, 10, 10).requires_grad_()
    q = PamsActivation(bits).eval()
    with torch.no_grad():
        q.alpha.fill_(alpha)
    q(x).sum().backward()
    grad = x.grad.flatten()
    np.testing.assert_allclose(grad[:200].numpy(), 1.0, atol=1e-6)
    np.testing.assert_array_equal(grad[200:].numpy(), 0.0)
    # alpha: +-1 from each clipped value (sign of x) plus the step-size term of the others
    assert q.alpha.grad is not None and float(q.alpha.grad.abs()) > 0
    xi = inside.double().numpy()
    levels = 2 ** (bits - 1) - 1
    expected = np.sign(outside.numpy()).sum() + (np.round(xi * levels / alpha) / levels - xi / alpha).sum()
    np.testing.assert_allclose(float(q.alpha.grad), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pams_ste_just_beyond_alpha_is_clipped(bits: int) -> None:
    alpha = 1.3
    step = alpha / (2 ** (bits - 1) - 1)
    g = torch.Generator().manual_seed(bits)
    beyond = alpha + step * (0.05 + 0.4 * torch.rand(100, generator=g))  # (alpha, alpha + step/2)
    x = torch.cat([beyond, -beyond]).view(1, 2, 10, 10).requires_grad_()
    q = PamsActivation(bits).eval()
    with torch.no_grad():
        q.alpha.fill_(alpha)
    (q(x) * torch.sign(x.detach())).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), 0.0)  # clipped values: no gradient to x
    # clipped values: d out / d alpha = sign(x), times the loss weight sign(x): +1 each
    np.testing.assert_allclose(q.alpha.grad.item(), 200.0, rtol=1e-5)


def test_ddtb_ste_gradients_reach_both_bounds() -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 4, 8, 8) * 2).requires_grad_()
    for dynamic in (False, True):
        q = DdtbActivation(4, 4, dynamic=dynamic).eval()
        with torch.no_grad():
            q.lower.fill_(-1.0)
            q.upper.fill_(1.5)
        weights = torch.randn(2, 4, 8, 8)
        (q(x) * weights).sum().backward()
        assert q.lower.grad is not None and float(q.lower.grad.abs()) > 1e-3
        assert q.upper.grad is not None and float(q.upper.grad.abs()) > 1e-3
        xd = x.detach()
        clipped = (xd < -1.5) | (xd > 2.0)  # clearly beyond the grid ends
        assert torch.all(x.grad[clipped] == 0)
        inside = (xd > -0.8) & (xd < 1.3)
        torch.testing.assert_close(x.grad[inside], weights[inside], rtol=1e-5, atol=1e-5)
        x.grad = None
        # clipped values push the upper bound with their full weight: d out / d u = 1 above u
        q2 = DdtbActivation(4, 4, dynamic=False).eval()
        with torch.no_grad():
            q2.lower.fill_(-1.0)
            q2.upper.fill_(1.5)
        q2(torch.full((1, 4, 2, 2), 5.0)).sum().backward()
        np.testing.assert_allclose(float(q2.upper.grad), 16.0, rtol=1e-5)
        np.testing.assert_allclose(float(q2.lower.grad), 0.0, atol=1e-4)


@pytest.mark.parametrize("per_sample", [False, True])
def test_fake_quantize_node_equals_the_composed_ops(per_sample: bool) -> None:
    from refqsr_engine.models.quant_base import fake_quantize

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 8, 6, 6, generator=g) * 3).requires_grad_()
    shape = (4,) if per_sample else ()
    scale = (torch.rand(shape, generator=g) * 0.3 + 0.05).requires_grad_()
    zero = torch.round(torch.rand(shape, generator=g) * 10).requires_grad_()
    w = torch.randn(4, 8, 6, 6, generator=g)
    grads = []
    for f in (composed_fake_quantize, fake_quantize):
        x.grad = scale.grad = zero.grad = None
        y = f(x, scale, zero, 0, 15)
        (y * w).sum().backward()
        grads.append((y.detach(), x.grad.clone(), scale.grad.clone(), zero.grad.clone()))
    (y0, gx0, gs0, gz0), (y1, gx1, gs1, gz1) = grads
    assert torch.equal(y0, y1)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-6)
    torch.testing.assert_close(gs1, gs0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gz1, gz0, rtol=1e-5, atol=1e-5)
    assert int((gx1 == 0).sum()) > 0 and int((gx1 != 0).sum()) > 0  # both sides of the clamp seen


def test_fake_quantize_keeps_only_its_input_for_backward() -> None:
    from refqsr_engine.models.quant_base import fake_quantize

    x = torch.randn(2, 16, 32, 32, requires_grad=True)
    scale, zero = torch.tensor(0.1, requires_grad=True), torch.tensor(3.0)

    def saved_bytes(f) -> int:
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            f(x, scale, zero, 0, 15)
        return sum(total)

    activation = x.numel() * x.element_size()
    assert saved_bytes(fake_quantize) <= activation + 16  # x, and the two scalars
    assert saved_bytes(composed_fake_quantize) >= 2 * activation


# --------------------------------------------------------------------------- range initialisation


def test_pams_first_training_forward_initialises_alpha() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6) * torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1, 1)
    expected = np.abs(x.numpy()).reshape(4, -1).max(axis=1).mean()
    q = PamsActivation(4).train()
    q(x)
    np.testing.assert_allclose(float(q.alpha.detach()), expected, rtol=1e-6)
    assert bool(q.initialized)
    q(x * 10)  # a second training batch does not re-initialise
    np.testing.assert_allclose(float(q.alpha.detach()), expected, rtol=1e-6)

    fresh = PamsActivation(4).eval()
    before = fresh.alpha.item()
    fresh(x)
    assert fresh.alpha.item() == before and not bool(fresh.initialized)


def test_ddtb_first_training_forward_initialises_bounds() -> None:
    # small tensor: exact percentiles
    x = _rng(7).standard_normal((2, 4, 8, 8)).astype(np.float32) * 1.7 + 0.2
    q = DdtbActivation(4, 4, dynamic=False).train()
    q(_t(x))
    lo, hi = np.percentile(x.astype(np.float64), [1, 99])
    np.testing.assert_allclose([q.lower.item(), q.upper.item()], [lo, hi], rtol=1e-5, atol=1e-6)
    q(_t(x * 5))
    np.testing.assert_allclose([q.lower.item(), q.upper.item()], [lo, hi], rtol=1e-5, atol=1e-6)

    # big tensor (> 2^18 values): strided subsample, percentiles within sampling error
    big = _rng(8).standard_normal((4, 16, 96, 96)).astype(np.float32) * 2.0 - 0.5
    qb = DdtbActivation(4, 16, dynamic=True).train()
    qb(_t(big))
    lo, hi = np.percentile(big.astype(np.float64), [1, 99])
    np.testing.assert_allclose([qb.lower.item(), qb.upper.item()], [lo, hi], atol=0.05)

    fresh = DdtbActivation(4, 4, dynamic=False).eval()
    fresh(_t(x))
    assert (fresh.lower.item(), fresh.upper.item()) == (-1.0, 1.0) and not bool(fresh.initialized)


@pytest.mark.parametrize("bits, pct", [(2, 99.0), (4, 99.0), (6, 99.99), (8, 100.0)])
def test_ddtb_initial_bounds_clip_less_at_higher_widths(bits: int, pct: float) -> None:
    # DDTB's 1 % clip at <= 4 bits, 1e-4 at 5-7, the first batch's min/max at 8 (init_percentile)
    x = _rng(9).standard_normal((2, 4, 16, 16)).astype(np.float32) * 1.3 - 0.1
    q = DdtbActivation(bits, 4, dynamic=False).train()
    q(_t(x))
    lo, hi = np.percentile(x.astype(np.float64), [100.0 - pct, pct])
    np.testing.assert_allclose([q.lower.item(), q.upper.item()], [lo, hi], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bit widths


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_unsupported_bits_raise(bits: int) -> None:
    w = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError):
        PamsActivation(bits)
    with pytest.raises(ValueError):
        DdtbActivation(bits, 4)
    with pytest.raises(ValueError):
        MinMaxActivation(bits)
    with pytest.raises(ValueError):
        PamsWeight()(w, bits)
    with pytest.raises(ValueError):
        DdtbWeight()(w, bits)
    with pytest.raises(ValueError):
        BitSpec(bits, 8)
    with pytest.raises(ValueError):
        BitSpec(8, bits)
    with pytest.raises(ValueError):
        QuantConv2d(2, 4, 3, "pams", (bits,))


@pytest.mark.parametrize("scheme", ["pams", "ddtb"])
def test_32_bits_is_full_precision(scheme: str) -> None:
    torch.manual_seed(0)
    conv = QuantConv2d(3, 5, 3, scheme, (8, 4))
    x = torch.randn(2, 3, 7, 9)
    c = conv.conv
    ref = F.conv2d(x, c.weight, c.bias, padding=1)
    torch.testing.assert_close(conv(x, BitSpec(32, 32)), ref, rtol=0, atol=0)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=0)
    for wq in (PamsWeight(), DdtbWeight()):
        assert torch.equal(wq(c.weight, 32), c.weight)


def test_quantconv_pams_matches_numpy_twin() -> None:
    torch.manual_seed(1)
    conv = QuantConv2d(4, 6, 3, "pams", act_bits=(8, 4)).eval()
    alpha4, alpha8 = 1.1, 2.7
    with torch.no_grad():
        conv.act_quant["4"].alpha.fill_(alpha4)
        conv.act_quant["8"].alpha.fill_(alpha8)
    w = conv.conv.weight.detach().numpy()
    w = _away_from_ties(w, np.abs(w.astype(np.float64)).max() / 31)  # max|w| itself is never moved
    w = _away_from_ties(w, np.abs(w.astype(np.float64)).max() / 7)
    with torch.no_grad():
        conv.conv.weight.copy_(_t(w))
    x = _away_from_ties(_rng(9).standard_normal((2, 4, 9, 7)) * 1.5, alpha4 / 7)
    x = _away_from_ties(x, alpha8 / 127)
    with torch.no_grad():
        out = conv(_t(x), BitSpec(4, 6))
    xq = _t(np_pams(x, alpha4, 4))
    wq = _t(np_pams_weight(w, 6))
    expected = F.conv2d(xq, wq, conv.conv.bias.detach(), padding=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the 8-bit quantizer serves BitSpec(8, .); mixed full-precision sides work as well
    with torch.no_grad():
        out8 = conv(_t(x), BitSpec(8, 32))
        out_w = conv(_t(x), BitSpec(32, 4))
    torch.testing.assert_close(
        out8, F.conv2d(_t(np_pams(x, alpha8, 8)), conv.conv.weight, conv.conv.bias, padding=1), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        out_w, F.conv2d(_t(x), _t(np_pams_weight(w, 4)), conv.conv.bias, padding=1), rtol=1e-5, atol=1e-5
    )
    # no 5-bit activation quantizer was asked for
    with pytest.raises(ValueError):
        conv(_t(x), BitSpec(5, 5))


def test_weight_qparams_are_cached_in_eval_and_follow_weight_updates():
    from refqsr_engine.models.quant_ddtb import DdtbWeight

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8, 3, 3))
    quant = DdtbWeight().eval()
    first = quant(w, 4)
    assert torch.equal(first, quant(w, 4))
    with torch.no_grad():
        w.mul_(3.0)  # in-place update: the cached range must not be reused
    expected = quant.qparams(w.detach(), 4)
    got = quant.cached_qparams(w, 4)
    assert torch.equal(got.scale, expected.scale) and torch.equal(got.zero_point, expected.zero_point)
    quant.train()
    assert quant(w, 4).requires_grad  # training still differentiates through the weights


def test_train_memory_benchmark_runs_each_kind_in_a_child(capsys) -> None:
    from refqsr_engine.benchmarks.train_memory import main

    main(["--kinds", "ddtb8", "delta3", "--batch", "1", "--crop", "12", "--steps", "1", "--threads", "1"])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ddtb8") or ln.startswith("| delta3")]
    assert len(rows) == 2 and all("one node" in r for r in rows)
    assert all(float(r.split("|")[3]) > 0 for r in rows)
