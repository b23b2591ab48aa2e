"""RefER's matching/warping (paper eqs. (4)-(7), Fig. 6) against independent twins.

Twins: torch.nn.functional.grid_sample (bilinear, border, align_corners=True) for the backward
warp, numpy for L2 normalisation + 3x3 average pooling and for the cost volume (einsum), a known
integer shift for the arg-max flow, and a float64 re-implementation of the whole RefER block
(numpy PAMS quantization, soft-argmax, F.interpolate, grid_sample, F.conv2d, F.prelu).

Flow convention (matching.py): flow[:, 0] = dx, flow[:, 1] = dy, and a query pixel p reads the
reference at p + flow(p).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refqsr_engine.models import refer as refer_module
from refqsr_engine.models.matching import (
    backward_warp,
    cost_volume,
    normalize_and_pool,
    pooled_flow,
    upsample_flow,
)
from refqsr_engine.models.refer import RefER

# --------------------------------------------------------------------------- twins


def gs_warp(feat: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp via grid_sample: pixel coordinates + flow, normalised for align_corners=True."""
    n, _, h, w = feat.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=feat.dtype), torch.arange(w, dtype=feat.dtype), indexing="ij")
    gx = 2 * (xs + flow[:, 0]) / (w - 1) - 1
    gy = 2 * (ys + flow[:, 1]) / (h - 1) - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=True)


def np_normalize_and_pool(x: np.ndarray, pool: int = 3) -> np.ndarray:
    x = x.astype(np.float64)
    unit = x / np.maximum(np.sqrt((x**2).sum(axis=1, keepdims=True)), 1e-12)
    n, c, h, w = unit.shape
    oh, ow = -(-h // pool), -(-w // pool)
    out = np.empty((n, c, oh, ow))
    for i in range(oh):  # adaptive average pooling: [floor(i*H/oh), ceil((i+1)*H/oh))
        y0, y1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            x0, x1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            out[:, :, i, j] = unit[:, :, y0:y1, x0:x1].mean(axis=(2, 3))
    return out


def np_pams(x: np.ndarray, alpha: float, bits: int) -> np.ndarray:
    levels = 2 ** (bits - 1) - 1
    return np.round(np.clip(x, -alpha, alpha) * levels / alpha) * alpha / levels


# --------------------------------------------------------------------------- backward warp


@pytest.mark.parametrize("size", [(7, 11), (12, 12), (24, 9)])
def test_backward_warp_matches_grid_sample(size: tuple[int, int]) -> None:
    h, w = size
    g = torch.Generator().manual_seed(h * w)
    feat = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    # fractional flows, many pointing outside the image
    flow = (torch.rand(2, 2, h, w, generator=g, dtype=torch.float64) * 2 - 1) * max(h, w) * 0.8
    flow += 0.123
    assert ((torch.arange(w) + flow[:, 0]) < 0).any() and ((torch.arange(w) + flow[:, 0]) > w - 1).any()
    out = backward_warp(feat, flow)
    ref = gs_warp(feat, flow)
    assert float((out - ref).abs().max()) < 1e-5
    # float32 as well
    out32 = backward_warp(feat.float(), flow.float())
    assert float((out32.double() - ref).abs().max()) < 1e-5


def test_backward_warp_gradients_match_grid_sample() -> None:
    g = torch.Generator().manual_seed(0)
    h, w = 9, 13
    feat = torch.randn(2, 4, h, w, generator=g, dtype=torch.float64)
    flow = (torch.rand(2, 2, h, w, generator=g, dtype=torch.float64) * 2 - 1) * 5 + 0.37
    weights = torch.randn(2, 4, h, w, generator=g, dtype=torch.float64)

    f1, fl1 = feat.clone().requires_grad_(), flow.clone().requires_grad_()
    (backward_warp(f1, fl1) * weights).sum().backward()
    f2, fl2 = feat.clone().requires_grad_(), flow.clone().requires_grad_()
    (gs_warp(f2, fl2) * weights).sum().backward()
    assert float(f1.grad.abs().sum()) > 0  # gradients reach the warped feature
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-7, atol=1e-9)
    # flow gradient (zero where the coordinate is clamped to the border, as grid_sample's)
    torch.testing.assert_close(fl1.grad, fl2.grad, rtol=1e-6, atol=1e-8)
    assert float(fl1.grad.abs().sum()) > 0


def test_backward_warp_integer_flow_is_a_shift() -> None:
    feat = torch.randn(1, 2, 10, 12)
    flow = torch.zeros(1, 2, 10, 12)
    flow[:, 0], flow[:, 1] = 2.0, -3.0  # read at (x + 2, y - 3)
    out = backward_warp(feat, flow)
    torch.testing.assert_close(out[..., 3:, :10], feat[..., :7, 2:], rtol=0, atol=0)


# --------------------------------------------------------------------------- pooling, cost volume


@pytest.mark.parametrize("size", [(48, 48), (24, 36), (10, 14), (7, 5)])
def test_normalize_and_pool_matches_numpy(size: tuple[int, int]) -> None:
    x = np.random.default_rng(size[0]).standard_normal((2, 16, *size)).astype(np.float32)
    out = normalize_and_pool(torch.from_numpy(x)).numpy()
    expected = np_normalize_and_pool(x)
    assert out.shape == (2, 16, -(-size[0] // 3), -(-size[1] // 3))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    if size[0] % 3 == 0 and size[1] % 3 == 0:  # plain 3x3 windows, stride 3
        xd = x.astype(np.float64)
        unit = xd / np.linalg.norm(xd, axis=1, keepdims=True)
        n, c, h, w = unit.shape
        blocks = unit.reshape(n, c, h // 3, 3, w // 3, 3).mean(axis=(3, 5))
        np.testing.assert_allclose(out, blocks, rtol=0, atol=1e-6)


def test_cost_volume_matches_einsum() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 16, 5, 7)).astype(np.float32)
    r = rng.standard_normal((2, 16, 6, 4)).astype(np.float32)
    out = cost_volume(torch.from_numpy(q), torch.from_numpy(r)).numpy()
    expected = np.einsum(
        "nci,ncj->nij", q.reshape(2, 16, -1).astype(np.float64), r.reshape(2, 16, -1).astype(np.float64)
    )
    assert out.shape == (2, 35, 24)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # E(i, j) = Fq(i) . Fr(j) with i, j row-major positions
    assert np.isclose(out[1, 2 * 7 + 3, 4 * 4 + 1], float(q[1, :, 2, 3] @ r[1, :, 4, 1]), atol=1e-5)


# --------------------------------------------------------------------------- flow from a known shift

SHIFT = (6, -9)  # (dy, dx) of torch.roll: R[y, x] = F[y - 6, x + 9]  =>  F(p) = R(p + (dx=-9, dy=+6))
EXPECTED_FLOW = (-9.0, 6.0)  # (dx, dy): where each query pixel reads the reference
CELLS_INTERIOR = (slice(0, 14), slice(3, 16))  # pooled query cells whose match does not wrap around
PIXELS_INTERIOR = (slice(0, 40), slice(10, 48))  # pixels whose upsampled flow only mixes interior cells


@pytest.fixture(scope="module")
def shifted() -> tuple[torch.Tensor, torch.Tensor]:
    """F: a random direction per 3x3 cell times a random positive amplitude per pixel, so that the
    pooled normalised features are unit vectors and each query cell's best match (largest dot
    product, eq. (5)) is its own copy in the reference. (With i.i.d. per-pixel noise the pooled
    vectors have different norms and a longer unrelated vector can win the dot product.)"""
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(2, 16, 16, 16, generator=g).repeat_interleave(3, dim=2).repeat_interleave(3, dim=3)
    amplitude = 0.5 + torch.rand(2, 1, 48, 48, generator=g)
    feat = direction * amplitude
    return feat, torch.roll(feat, shifts=SHIFT, dims=(2, 3))


def test_hard_flow_recovers_known_shift(shifted) -> None:
    feat, ref = shifted
    q, r = normalize_and_pool(feat), normalize_and_pool(ref)
    flow = pooled_flow(q, r, (48, 48), hard=True)
    assert flow.shape == (2, 2, 16, 16)
    inner = flow[:, :, CELLS_INTERIOR[0], CELLS_INTERIOR[1]]
    assert torch.all(inner[:, 0] == EXPECTED_FLOW[0]) and torch.all(inner[:, 1] == EXPECTED_FLOW[1])
    # warping the reference with the (upsampled) flow reproduces the query in the interior
    full = upsample_flow(flow, (48, 48))
    ys, xs = PIXELS_INTERIOR
    # (bilinear interpolation of a constant is that constant up to float32 rounding)
    assert float((full[:, 0, ys, xs] - EXPECTED_FLOW[0]).abs().max()) < 1e-5
    assert float((full[:, 1, ys, xs] - EXPECTED_FLOW[1]).abs().max()) < 1e-5
    warped = backward_warp(ref, full)
    assert float((warped - feat)[..., ys, xs].abs().max()) < 1e-4
    gs = gs_warp(ref, full)
    assert float((gs - feat)[..., ys, xs].abs().max()) < 1e-4
    # the opposite sign would not: warping with -flow is far from the query
    assert float((backward_warp(ref, -full) - feat)[..., ys, xs].abs().mean()) > 0.5


def test_soft_flow_close_to_hard(shifted) -> None:
    feat, ref = shifted
    q, r = normalize_and_pool(feat), normalize_and_pool(ref)
    hard = pooled_flow(q, r, (48, 48), hard=True)
    soft = pooled_flow(q, r, (48, 48), hard=False, temperature=1000.0)
    ci, cj = CELLS_INTERIOR
    assert float((soft - hard)[:, :, ci, cj].abs().max()) < 0.5
    # a numpy soft-argmax twin (eqs. (6), (7)) over the whole map
    qn, rn = q.double().numpy().reshape(2, 16, -1), r.double().numpy().reshape(2, 16, -1)
    e = 1000.0 * np.einsum("nci,ncj->nij", qn, rn)
    wgt = np.exp(e - e.max(axis=2, keepdims=True))
    wgt /= wgt.sum(axis=2, keepdims=True)
    centres = np.arange(16) * 3 + 1.0
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    pos = np.stack([xx.ravel(), yy.ravel()], axis=1)  # (x, y) of each pooled position
    disp = wgt @ pos - pos[None]
    expected = disp.transpose(0, 2, 1).reshape(2, 2, 16, 16)
    np.testing.assert_allclose(soft.numpy(), expected, rtol=0, atol=1e-3)


def test_hard_flow_matches_numpy_argmax_with_odd_size() -> None:
    """Non-multiple-of-3 sizes: displacements between adaptive-pooling cell centres."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 8, 4, 5, generator=g)
    r = torch.randn(1, 8, 4, 5, generator=g)
    h, w = 10, 14  # 4 x 5 cells of adaptive pooling
    flow = pooled_flow(q, r, (h, w), hard=True).numpy()

    def centres(size: int, cells: int) -> np.ndarray:
        return np.array([((k * size) // cells + (-(-((k + 1) * size) // cells)) - 1) / 2 for k in range(cells)])

    cy, cx = centres(h, 4), centres(w, 5)
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    pos = np.stack([xx.ravel(), yy.ravel()], axis=1)
    best = np.einsum("ci,cj->ij", q[0].reshape(8, -1).double().numpy(), r[0].reshape(8, -1).double().numpy()).argmax(1)
    expected = (pos[best] - pos).T.reshape(2, 4, 5)
    np.testing.assert_allclose(flow[0], expected, atol=1e-6)


# --------------------------------------------------------------------------- RefER block


def _refer(seed: int = 0, scheme: str = "pams") -> RefER:
    torch.manual_seed(seed)
    return RefER(16, scheme, b_high=8, b_low=4)


def _pair(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(2, 16, 24, 24, generator=g)
    query = torch.roll(ref, shifts=(3, -6), dims=(2, 3)) + 0.1 * torch.randn(2, 16, 24, 24, generator=g)
    return query, ref


@pytest.mark.parametrize("scheme", ["pams", "ddtb"])
def test_refer_shape_and_residual(scheme: str) -> None:
    m = _refer(0, scheme)
    query, ref = _pair()
    out = m(query, ref)  # training mode: initialises the quantizer ranges
    assert out.shape == query.shape
    assert not torch.equal(out, query)
    for conv in (m.conv1, m.conv2):
        with torch.no_grad():
            conv.conv.weight.zero_()
            conv.conv.bias.zero_()
    for mode in (True, False):
        m.train(mode)
        with torch.no_grad():
            assert torch.equal(m(query, ref), query)


def test_refer_eval_uses_hard_matching(monkeypatch) -> None:
    m = _refer()
    query, ref = _pair()
    m(query, ref)  # one training forward initialises the matching quantizer's range
    calls: list[tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor]] = []
    warps: list[torch.Tensor] = []
    real_pooled, real_warp = refer_module.pooled_flow, refer_module.backward_warp

    def rec_pooled(q, r, size, hard, *args, **kwargs):
        out = real_pooled(q, r, size, hard, *args, **kwargs)
        calls.append((q.detach(), r.detach(), hard, out.detach()))
        return out

    def rec_warp(feat, flow):
        warps.append(flow.detach())
        return real_warp(feat, flow)

    monkeypatch.setattr(refer_module, "pooled_flow", rec_pooled)
    monkeypatch.setattr(refer_module, "backward_warp", rec_warp)
    m.eval()
    with torch.no_grad():
        m(query, ref)
    (q, r, hard, pooled), flow = calls[-1], warps[-1]
    assert hard is True
    # the matching inputs are the b_low-quantized pooled features (eq. (4)), as their integer grid
    # values (value / scale) so that the arg-max sees exact integer dot products
    alpha = m.match_quant.alpha.item()
    step = alpha / (2 ** (4 - 1) - 1)
    np.testing.assert_allclose(
        q.numpy(), np.round(np_pams(np_normalize_and_pool(query.numpy()), alpha, 4) / step), atol=1e-6
    )
    np.testing.assert_allclose(
        r.numpy(), np.round(np_pams(np_normalize_and_pool(ref.numpy()), alpha, 4) / step), atol=1e-6
    )
    # hard flow: one displacement per pooled cell, a difference of cell centres (multiples of 3)
    hard_flow = pooled_flow(q, r, (24, 24), hard=True)
    torch.testing.assert_close(pooled, hard_flow, rtol=0, atol=0)
    assert torch.equal(pooled, 3 * torch.round(pooled / 3))
    # the flow used for the warp is its bilinear upsampling, equal to the cell value at cell centres
    torch.testing.assert_close(flow, F.interpolate(hard_flow, size=(24, 24), mode="bilinear", align_corners=False))
    torch.testing.assert_close(flow[:, :, 1::3, 1::3], hard_flow, rtol=0, atol=1e-6)

    m.train()
    m(query, ref)
    assert calls[-1][2] is False  # training: soft-argmax
    m.eval()
    with torch.no_grad():
        m(query, ref, hard=False)
    assert calls[-1][2] is False  # explicit override


def test_refer_training_forward_matches_float64_twin() -> None:
    """The whole block (soft-argmax path) re-implemented: numpy PAMS at b_low on the pooled features,
    eqs. (5)-(7), bilinear upsampling, grid_sample warp, 8-bit PAMS conv - PReLU - 8-bit PAMS conv,
    residual.

    The soft flow agrees with the twin to ~1e-5 px, so a conv input sitting within ~1e-5 of a
    rounding tie of the 8-bit grid may land on the neighbouring level: each stage is therefore
    checked on the code's own stage input (hooks), strictly where no tie is involved, and the
    end-to-end output is checked on the fraction of elements that agree."""
    m = _refer(2)
    query, ref = _pair(3)
    m(query, ref)  # initialise all ranges
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        conv.register_forward_hook(lambda mod, args, out, k=k: seen.__setitem__(k, (args[0].detach(), out.detach())))
        for k, conv in (("conv1", m.conv1), ("conv2", m.conv2))
    ]
    with torch.no_grad():
        out = m(query, ref)
    for h in hooks:
        h.remove()

    qd, rd = query.double(), ref.double()
    a_m = m.match_quant.alpha.item()
    qp = np_pams(np_normalize_and_pool(qd.numpy()), a_m, 4).reshape(2, 16, -1)
    rp = np_pams(np_normalize_and_pool(rd.numpy()), a_m, 4).reshape(2, 16, -1)
    e = 1000.0 * np.einsum("nci,ncj->nij", qp, rp)
    wgt = np.exp(e - e.max(axis=2, keepdims=True))
    wgt /= wgt.sum(axis=2, keepdims=True)
    centres = np.arange(8) * 3 + 1.0
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    pos = np.stack([xx.ravel(), yy.ravel()], axis=1)
    disp = torch.from_numpy((wgt @ pos - pos[None]).transpose(0, 2, 1).reshape(2, 2, 8, 8).copy())
    flow = F.interpolate(disp, size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(m.flow(query, ref, hard=False).double(), flow, rtol=0, atol=1e-3)
    diff = qd - gs_warp(rd, flow)
    # stage 1: the refinement input is F^q - F^{r->q}
    assert float((seen["conv1"][0].double() - diff).abs().max()) < 1e-4

    def qconv(x: torch.Tensor, conv) -> torch.Tensor:
        a = conv.act_quant["8"].alpha.item()
        w = conv.conv.weight.detach().double().numpy()
        wq = np_pams(w, float(np.abs(w).max()), 8)
        xq = np_pams(x.double().numpy(), a, 8)
        return F.conv2d(torch.from_numpy(xq), torch.from_numpy(wq), conv.conv.bias.detach().double(), padding=1)

    # stages 2, 3: each 8-bit conv on the code's own input
    for k in ("conv1", "conv2"):
        x_in, y_out = seen[k]
        err = (y_out.double() - qconv(x_in, getattr(m, k))).abs()
        assert float((err > 1e-4).double().mean()) < 1e-3, k
    torch.testing.assert_close(
        seen["conv2"][0].double(),
        F.prelu(seen["conv1"][1].double(), m.act.weight.detach().double()),
        rtol=1e-6,
        atol=1e-6,
    )
    torch.testing.assert_close(out.double(), qd + seen["conv2"][1].double(), rtol=1e-6, atol=1e-6)
    # end to end
    h = F.prelu(qconv(diff, m.conv1), m.act.weight.detach().double())
    expected = qd + qconv(h, m.conv2)
    err = (out.double() - expected).abs()
    assert float((err > 1e-4).double().mean()) < 0.05 and float(err.max()) < 0.05, float(err.max())


def test_refer_backward_reaches_parameters() -> None:
    m = _refer()
    query, ref = _pair()
    query.requires_grad_()
    ref.requires_grad_()
    m(query, ref).square().mean().backward()
    for name in ("conv1.conv.weight", "conv2.conv.weight", "conv1.act_quant.8.alpha", "act.weight"):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert float(query.grad.abs().sum()) > 0 and float(ref.grad.abs().sum()) > 0
