"""RefER matching/warping kernels (refqsr_engine.kernels.refer_kernels) against their PyTorch twins
(models/matching.py, models/quant_base.fake_quantize, models/refer.RefER.flow(hard=True)) and
F.grid_sample(align_corners=True, padding_mode='border') for the warp.

Stage by stage on the twin's own inputs, then the fused pipeline end to end. Sizes: N=3, C=64,
24x24 and 48x48, and N=5, C=63, 21x27 (odd batch, odd channel count, non-square, 63 pooled cells:
not a multiple of the 8-cell vector tile). The kernels reproduce PyTorch's float32 rounding, so
most comparisons are exact; the tolerances the brief asks for are asserted as well.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refqsr_engine.kernels import refer_kernels as rk
from refqsr_engine.models.matching import (
    COSINE_GRID,
    POOL,
    argmax_positions,
    backward_warp,
    cosine_cells,
    normalize_and_pool,
    pooled_flow,
    shared_flow,
    upsample_flow,
)
from refqsr_engine.models.quant_base import fake_quantize
from refqsr_engine.models.refer import RefER

SMALL = (3, 64, 24, 24)
LARGE = (3, 64, 48, 48)
ODD = (5, 63, 21, 27)
SHAPES = [SMALL, LARGE, ODD]
_CACHE: dict = {}


def cached(name: str, *args, **kw):
    key = (name, args, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = getattr(rk, name)(*args, **kw)
    return _CACHE[key]


def features(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def grid_ints(x: torch.Tensor, scale: float, zp: float, qmin: int, qmax: int) -> torch.Tensor:
    """RefER.flow's integer grid values: round(fake_quantize(x) / scale)."""
    s, z = torch.tensor(scale), torch.tensor(zp)
    return torch.round(fake_quantize(x, s, z, qmin, qmax) / s)


def gs_warp(feat: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    n, _, h, w = feat.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=feat.dtype), torch.arange(w, dtype=feat.dtype), indexing="ij")
    grid = torch.stack([2 * (xs + flow[:, 0]) / (w - 1) - 1, 2 * (ys + flow[:, 1]) / (h - 1) - 1], dim=-1)
    return F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=True)


def test_tiny_shape_compiles_and_matches():
    """Pipeline on a minimal problem (2x2 pooled cells, 3 channels): an odd tile everywhere."""
    fq, fr = features((2, 3, 6, 6), 0)
    k = cached("build_refer_pipeline", 2, 3, 6, 6, -7, 7, return_index=True)
    warped, flow, idx = k(fq.numpy(), fr.numpy(), [0.1], [0.0])
    q, r = (grid_ints(normalize_and_pool(x), 0.1, 0.0, -7, 7) for x in (fq, fr))
    np.testing.assert_array_equal(idx, argmax_positions(q, r).numpy())
    np.testing.assert_array_equal(flow, upsample_flow(pooled_flow(q, r, (6, 6), hard=True), (6, 6)).numpy())
    np.testing.assert_array_equal(warped, backward_warp(fr, torch.from_numpy(flow)).numpy())


# --------------------------------------------------------------------------- (a) normalize + pool


@pytest.mark.parametrize("shape", SHAPES)
def test_normalize_and_pool(shape):
    fq, _ = features(shape, 1)
    fq[0, :, :3, :3] = 0.0  # an all-zero window: the 1e-12 clamp of F.normalize
    got = cached("build_normalize_pool", *shape)(fq.numpy())
    want = normalize_and_pool(fq).numpy()
    assert got.shape == (shape[0], shape[1], shape[2] // 3, shape[3] // 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got, want)  # same float32 operation order as PyTorch


# --------------------------------------------------------------------------- (b) quantize


GRIDS = [  # (scale, zero_point, qmin, qmax, dtype)
    (0.3 / 7, 0.0, -7, 7, "int16"),  # PAMS 4-bit, symmetric
    (0.05, 7.0, 0, 15, "int16"),  # asymmetric 4-bit (odd zero point)
    (2.0**-4, 0.0, -1, 1, "int8"),  # PAMS 2-bit; exact halves below
    (2.0**-5, 3.0, 0, 7, "int32"),  # asymmetric 3-bit, exact halves + odd zero point
    (0.002, 128.0, 0, 255, "int16"),  # 8-bit unsigned grid: q - zp spans -128..127
]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[2]}..{g[3]}-zp{g[1]:g}-{g[4]}")
def test_quantize_grid_values_exact(grid):
    scale, zp, qmin, qmax, dtype = grid
    n, c, h, w = 3, 64, 8, 8
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, c, h, w, generator=g) * 0.15
    # exact half steps (x / scale = k + 0.5): round half to even, as torch.round
    x[0, 0] = (torch.arange(h * w, dtype=torch.float32).view(h, w) - 20.5) * scale
    k = cached("build_quantize", n, c, h, w, qmin, qmax, dtype)
    got = k(x.numpy(), [scale], [zp])
    assert got.dtype == np.dtype(dtype)
    want = grid_ints(x, scale, zp, qmin, qmax).numpy()
    np.testing.assert_array_equal(got, want)
    assert got.min() >= qmin - zp and got.max() <= qmax - zp
    assert len(np.unique(got)) > 2


# --------------------------------------------------------------------------- (c) match, (d) flow


def int_features(shape, seed: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, (n, c, h // 3, w // 3), generator=g).float()
    r = torch.randint(lo, hi + 1, (n, c, h // 3, w // 3), generator=g).float()
    return q, r


@pytest.mark.parametrize("shape", [SMALL, ODD])
@pytest.mark.parametrize("grid", [(-1, 1), (-7, 7), (-128, 127)], ids=["2bit", "4bit", "8bit"])
def test_match_argmax_exact(shape, grid):
    """Arg-max over the exact integer cost volume, first index on ties (2-bit grids tie a lot)."""
    n, c, h, w = shape
    q, r = int_features(shape, 3, *grid)
    k = cached("build_match", n, c, h // 3, w // 3)
    got = k(q.numpy().astype(np.int16), r.numpy().astype(np.int16))
    want = argmax_positions(q, r).numpy()
    np.testing.assert_array_equal(got, want)
    # independent twin: int64 cost volume, first arg-max
    cost = np.einsum("nci,ncj->nij", q.flatten(2).numpy().astype(np.int64), r.flatten(2).numpy().astype(np.int64))
    np.testing.assert_array_equal(got, cost.argmax(axis=2))
    if grid == (-1, 1):
        assert ((cost == cost.max(axis=2, keepdims=True)).sum(axis=2) > 1).any()  # ties present


@pytest.mark.parametrize("dtype", ["int8", "int32"])
def test_match_other_storage_types(dtype):
    n, c, h, w = SMALL
    q, r = int_features(SMALL, 12, -7, 7)
    k = cached("build_match", n, c, h // 3, w // 3, dtype)
    np.testing.assert_array_equal(k(q.numpy().astype(dtype), r.numpy().astype(dtype)), argmax_positions(q, r).numpy())


def test_match_all_equal_costs_picks_first():
    n, c, h, w = SMALL
    k = cached("build_match", n, c, h // 3, w // 3)
    z = np.zeros((n, c, h // 3, w // 3), np.int16)
    np.testing.assert_array_equal(k(z, z), 0)


def test_match_generic_variant():
    """The portable (non-AVX2) schedule gives the same indices."""
    n, c, h, w = ODD
    q, r = int_features(ODD, 4, -7, 7)
    k = cached("build_match", n, c, h // 3, w // 3, variant="generic")
    np.testing.assert_array_equal(
        k(q.numpy().astype(np.int16), r.numpy().astype(np.int16)), argmax_positions(q, r).numpy()
    )


@pytest.mark.parametrize("shape", [SMALL, ODD])
def test_pooled_flow_exact(shape):
    n, c, h, w = shape
    q, r = int_features(shape, 5, -7, 7)
    idx = argmax_positions(q, r).numpy().astype(np.int32)
    got = cached("build_pooled_flow", n, h // 3, w // 3)(idx)
    np.testing.assert_array_equal(got, pooled_flow(q, r, (h, w), hard=True).numpy())


# --------------------------------------------------------------------------- (e) upsample


@pytest.mark.parametrize("shape", [SMALL, LARGE, ODD, (2, 1, 66, 72)])
def test_upsample_flow(shape):
    n, _, H, W = shape
    h, w = H // 3, W // 3
    g = torch.Generator().manual_seed(6)
    hard = (torch.randint(-(w - 1), w, (n, 2, h, w), generator=g) * 3).float()  # arg-max flows
    soft = torch.randn(n, 2, h, w, generator=g) * 7.3  # any values
    k = cached("build_upsample_flow", n, h, w, H, W)
    for fp in (hard, soft):
        got = k(fp.numpy())
        want = upsample_flow(fp, (H, W)).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got, want)  # PyTorch's evaluation order, see torch_upsample_order


# --------------------------------------------------------------------------- (f) warp


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_warp(shape):
    n, c, H, W = shape
    fr, _ = features(shape, 7)
    g = torch.Generator().manual_seed(8)
    flow = (torch.rand(n, 2, H, W, generator=g) * 2 - 1) * max(H, W) * 0.8 + 0.123  # many outside
    # dyadic flows: p + flow is exact in float32, so float32 rounding of the sampling position is
    # not part of the comparison with grid_sample (whose own coordinate normalisation rounds too)
    flow = torch.round(flow * 1024) / 1024
    flow[0, :, 0, :4] = torch.tensor([[0.0, 1.0, -1.0, 2.5], [0.0, -2.0, 3.0, 0.5]])  # integer taps
    got = cached("build_backward_warp", *shape)(fr.numpy(), flow.numpy())
    want = backward_warp(fr, flow).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, gs_warp(fr.double(), flow.double()).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, gs_warp(fr, flow).numpy(), rtol=0, atol=3e-5)


# --------------------------------------------------------------------------- pipeline


def refer_twin(channels: int, scheme: str, bits: int) -> RefER:
    refer = RefER(channels, scheme, b_high=8, b_low=bits).eval()
    mq = refer.match_quant
    with torch.no_grad():
        if scheme == "pams":
            mq.alpha.fill_(0.3)
        else:  # minmax: an asymmetric range, nonzero zero point
            mq.lower.fill_(-0.2)
            mq.upper.fill_(0.35)
    return refer


@pytest.mark.parametrize(
    "shape,scheme,bits",
    [(SMALL, "pams", 4), (LARGE, "pams", 4), (ODD, "pams", 4), (ODD, "minmax", 3)],
    ids=["small-pams4", "large-pams4", "odd-pams4", "odd-minmax3"],
)
def test_pipeline_matches_refer_flow_and_warp(shape, scheme, bits):
    n, c, H, W = shape
    refer = refer_twin(c, scheme, bits)
    with torch.no_grad():
        p = refer.match_quant.qparams()
    scale, zp = float(p.scale), float(p.zero_point)
    if scheme == "minmax":
        assert zp != 0
    fq, fr = features(shape, 9)
    fq = fq + 0.5 * fr  # related query and reference, so matches are not arbitrary
    with torch.no_grad():
        flow_t = refer.flow(fq, fr, hard=True)
        warped_t = backward_warp(fr, flow_t)
    q, r = (grid_ints(normalize_and_pool(x), scale, zp, p.qmin, p.qmax) for x in (fq, fr))

    k = cached("build_refer_pipeline", n, c, H, W, p.qmin, p.qmax, return_index=True)
    warped, flow, idx = k(fq.numpy(), fr.numpy(), [scale], [zp])
    np.testing.assert_array_equal(idx, argmax_positions(q, r).numpy())
    np.testing.assert_array_equal(flow, flow_t.numpy())
    np.testing.assert_allclose(warped, warped_t.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(warped, warped_t.numpy())
    # grid_sample on these (non-dyadic) positions differs by its own coordinate rounding
    np.testing.assert_allclose(warped, gs_warp(fr.double(), flow_t.double()).numpy(), rtol=0, atol=1e-4)
    if shape == SMALL:  # without the index output: the same PrimFunc minus one buffer
        k2 = cached("build_refer_pipeline", n, c, H, W, p.qmin, p.qmax)
        assert len(k2.outputs) == 2
        w2, f2 = k2(fq.numpy(), fr.numpy(), [scale], [zp])
        np.testing.assert_array_equal(w2, warped)
        np.testing.assert_array_equal(f2, flow)


@pytest.mark.parametrize("shift", [(3, 6), (-6, 3)])
def test_pipeline_known_shift(shift):
    """Reference = query moved by (dy, dx) (multiples of the pooling size): the flow is (dx, dy)
    away from the wrapped border and the warped reference equals the query there."""
    n, c, H, W = LARGE
    dy, dx = shift
    fq, _ = features(LARGE, 10)
    fr = torch.roll(fq, shifts=(dy, dx), dims=(2, 3))  # fr[y + dy, x + dx] = fq[y, x]
    k = cached("build_refer_pipeline", n, c, H, W, -7, 7, return_index=True)
    warped, flow, _ = k(fq.numpy(), fr.numpy(), [0.3 / 7], [0.0])
    m = 3 * 2 + max(abs(dy), abs(dx))  # margin: the wrapped band plus one cell of interpolation
    inner = (slice(None), slice(None), slice(m, H - m), slice(m, W - m))
    np.testing.assert_allclose(flow[:, 0][inner[:1] + inner[2:]], dx, atol=1e-5)
    np.testing.assert_allclose(flow[:, 1][inner[:1] + inner[2:]], dy, atol=1e-5)
    np.testing.assert_allclose(warped[inner], fq.numpy()[inner], rtol=0, atol=1e-5)


def test_pipeline_runs_from_relax_call_tir():
    import tvm
    from tvm import relax

    n, c, H, W = SMALL
    k = cached("build_refer_pipeline", n, c, H, W, -7, 7, return_index=True)
    assert k.out_sinfo == [((n, c, H, W), "float32"), ((n, 2, H, W), "float32"), ((n, (H // 3) * (W // 3)), "int32")]
    bb = relax.BlockBuilder()
    args = [relax.Var(s.name, relax.TensorType(s.shape, s.dtype)) for s in k.inputs]
    with bb.function("main", args):
        gv = bb.add_func(k.prim_func, "refer_pipeline")
        out = bb.emit(relax.call_tir(gv, args, [relax.TensorType(s, d) for s, d in k.out_sinfo]))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=k.target), tvm.cpu())
    fq, fr = features(SMALL, 11)
    inputs = [fq.numpy(), fr.numpy(), np.array([0.05], np.float32), np.array([0.0], np.float32)]
    got = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    for a, b in zip(got, k(*inputs)):
        np.testing.assert_array_equal(a.numpy(), b)


# --------------------------------------------------------------------------- shared matching


def numpy_cosine_cells(feat: np.ndarray) -> np.ndarray:
    """An independent float64 twin of matching.cosine_cells (exact windows): unit pixels, 3x3 mean,
    unit cells, round(127 u). Float64 may round a value that float32 puts on a .5 tie differently,
    so callers compare through the arg-max, not value by value."""
    n, c, h, w = feat.shape
    f = feat.astype(np.float64)
    unit = f / np.maximum(np.sqrt((f * f).sum(1, keepdims=True)), 1e-12)
    pooled = unit.reshape(n, c, h // 3, 3, w // 3, 3).mean(axis=(3, 5))
    cells = pooled / np.maximum(np.sqrt((pooled * pooled).sum(1, keepdims=True)), 1e-12)
    return np.round(np.clip(cells * 127, -127, 127))


@pytest.mark.parametrize("shape", SHAPES)
def test_shared_flow_equals_pytorch_and_numpy(shape):
    """Stage ``shared_flow`` returns matching.shared_flow bit for bit, and its arg-max cells are
    those of a float64 numpy computation of the 8-bit cosine (up to ties)."""
    n, c, h, w = shape
    fq, fr = features(shape, 21)
    fr = 0.5 * fr + torch.roll(fq, shifts=(3, -6), dims=(2, 3))  # related, so the arg-max is not a coin toss
    k = cached("build_shared_flow", n, c, h, w, return_index=True, cosine_grid=COSINE_GRID)
    flow, idx = k(fq.numpy(), fr.numpy())
    np.testing.assert_array_equal(flow, shared_flow(fq, fr).numpy())
    np.testing.assert_array_equal(idx, argmax_positions(cosine_cells(fq), cosine_cells(fr)).numpy())
    q, r = numpy_cosine_cells(fq.numpy()), numpy_cosine_cells(fr.numpy())
    cost = np.einsum("nci,ncj->nij", q.reshape(n, c, -1), r.reshape(n, c, -1))
    best = cost.max(axis=2)
    picked = np.take_along_axis(cost, idx[..., None].astype(np.int64), axis=2)[..., 0]
    assert (picked == best).mean() > 0.99  # float32 vs float64 grid values differ on rare .5 ties


def test_shared_flow_finds_a_known_shift_and_itself():
    n, c, H, W = LARGE
    fq, _ = features(LARGE, 22)
    k = cached("build_shared_flow", n, c, H, W, cosine_grid=COSINE_GRID)
    flow = k(fq.numpy(), fq.numpy())
    assert not flow.any()  # a cosine is largest against itself: every cell finds itself
    dy, dx = 6, -3
    flow = k(fq.numpy(), torch.roll(fq, shifts=(dy, dx), dims=(2, 3)).numpy())
    m = 3 * 2 + 6
    np.testing.assert_allclose(flow[:, 0, m : H - m, m : W - m], dx, atol=1e-5)
    np.testing.assert_allclose(flow[:, 1, m : H - m, m : W - m], dy, atol=1e-5)


def test_backward_warp_primfunc_is_the_warp_kernel():
    """What the importer calls for a shared-matching RefER (``Warp``) is the tested warp stage."""
    import tvm
    from tvm import relax

    n, c, H, W = SMALL
    prim = rk.backward_warp_primfunc(n, c, H, W)
    bb = relax.BlockBuilder()
    feat_v = relax.Var("feat", relax.TensorType((n, c, H, W), "float32"))
    flow_v = relax.Var("flow", relax.TensorType((n, 2, H, W), "float32"))
    with bb.function("main", [feat_v, flow_v]):
        gv = bb.add_func(prim.with_attr("global_symbol", "warp"), "warp")
        bb.emit_func_output(bb.emit(relax.call_tir(gv, [feat_v, flow_v], relax.TensorType((n, c, H, W), "float32"))))
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=rk.as_target(None)), tvm.cpu())
    feat, _ = features(SMALL, 23)
    flow = torch.rand(n, 2, H, W) * 10 - 5
    got = vm["main"](tvm.runtime.tensor(feat.numpy()), tvm.runtime.tensor(flow.numpy())).numpy()
    np.testing.assert_array_equal(got, backward_warp(feat, flow).numpy())


def test_kernel_defaults_are_the_models_constants():
    """The kernels import nothing from the models: their default pooling size is the models' own."""
    assert rk.POOL == POOL


def test_shared_flow_needs_the_cosine_grid():
    """The shared matching's grid comes from the caller; it is not guessed."""
    with pytest.raises(ValueError, match="cosine_grid"):
        rk.refer_compute("shared_flow", rk.RefERShape(1, 4, 6, 6))
    with pytest.raises(ValueError, match="cosine_grid"):
        rk.refer_compute("shared_flow", rk.RefERShape(1, 4, 6, 6), cosine_grid=0)


def test_shape_checks():
    with pytest.raises(ValueError):
        rk.RefERShape(1, 8, 10, 12)  # not a multiple of 3
    with pytest.raises(ValueError):
        rk.build_quantize(1, 8, 2, 2, 0, 0)  # empty grid
    with pytest.raises(ValueError):
        rk.build_upsample_flow(1, 4, 4, 9, 9)
    k = cached("build_normalize_pool", *SMALL)
    with pytest.raises(ValueError):
        k(np.zeros((1, 64, 24, 24), np.float32))


@pytest.mark.slow
def test_benchmark_pipeline_vs_torch():
    """N=16, C=64, 96x96: compiled pipeline vs the PyTorch twin (printed, not asserted)."""
    from refqsr_engine.benchmarks.refer_pipeline import benchmark_pipeline

    res = benchmark_pipeline(16, 64, 96, 96)
    print(res)
    assert res["tvm_ms"] > 0 and res["torch_ms"] > 0
