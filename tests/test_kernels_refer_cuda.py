"""GPU schedules of the RefER and ClustBlock kernels (refqsr_engine.kernels.refer_cuda).

Without a GPU, two checks:

* the schedules themselves (``bind=False``: the thread loops left serial, the costs / affinities
  in registers inside the arg-max loops as on the GPU), built for LLVM, against the PyTorch twins
  (models/matching.py, RefER.flow(hard=True), models/clustblock.py) bit for bit, and against the
  CPU kernels (the RefER ones with REFQSR_SLOW_TESTS=1);
* the CUDA builds for sm_80 and sm_90 through nvcc: every kernel present under its function's
  name, the fenced products as ``mul.rn.f32``, the FMAs as ``fma.rn.f32``, IEEE square roots and
  divisions (no ``.approx``: no fast math), round-half-even grid values (``cvt.rni``).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from refqsr_engine.kernels import cuda_toolchain
from refqsr_engine.kernels import refer_cuda as rc
from refqsr_engine.kernels import refer_kernels as rk
from refqsr_engine.kernels.cluster_kernels import build_cluster_kernel, cluster_compute
from refqsr_engine.kernels.tir_build import build_kernel, no_contract
from refqsr_engine.models.clustblock import affinity
from refqsr_engine.models.matching import (
    COSINE_GRID,
    argmax_positions,
    backward_warp,
    cosine_cells,
    normalize_and_pool,
    pooled_flow,
    shared_flow,
    upsample_flow,
)
from refqsr_engine.models.quant_base import fake_quantize

SMALL = (3, 16, 24, 24)
ODD = (5, 63, 21, 27)  # odd batch and channels, 63 pooled cells: not a multiple of the 8-cell tile
#: the CPU kernels (AVX2 builds, ~20 s more) are compared with too: PyTorch alone is the reference
SLOW = bool(os.environ.get("REFQSR_SLOW_TESTS"))
needs_nvcc = pytest.mark.skipif(not cuda_toolchain.nvcc_available(), reason="nvcc is not on PATH")


def features(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    fq, fr = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    return fq + 0.5 * fr, fr  # related query and reference, so matches are not arbitrary


def twin(stage: str, shape, **kw):
    """The GPU schedule of ``stage`` with serial thread loops, built for the CPU (an FMA target:
    the explicit fused multiply-adds are single roundings there, as ``fmaf`` on the GPU)."""
    func, n_in = rk.refer_compute(stage, rk.RefERShape(*shape), **kw)
    return build_kernel(f"twin_{stage}", rc.schedule_refer_cuda(func, bind=False), n_in, None)


def grid_ints(x: torch.Tensor, scale: float, zp: float, qmin: int, qmax: int) -> torch.Tensor:
    s, z = torch.tensor(scale), torch.tensor(zp)
    return torch.round(fake_quantize(x, s, z, qmin, qmax) / s)


@pytest.mark.parametrize("shape,grid", [(SMALL, (-7, 7, 0.02, 0.0)), (ODD, (0, 7, 0.03, 3.0))], ids=["small", "odd"])
def test_pipeline_schedule_is_pytorch_and_cpu_kernel_bit_for_bit(shape, grid):
    n, c, h, w = shape
    qmin, qmax, scale, zp = grid
    fq, fr = features(shape, 1)
    warped, flow, idx = twin("pipeline", shape, qmin=qmin, qmax=qmax, return_index=True)(
        fq.numpy(), fr.numpy(), [scale], [zp]
    )
    q, r = (grid_ints(normalize_and_pool(x), scale, zp, qmin, qmax) for x in (fq, fr))
    want_flow = upsample_flow(pooled_flow(q, r, (h, w), hard=True), (h, w))
    np.testing.assert_array_equal(idx, argmax_positions(q, r).numpy())
    np.testing.assert_array_equal(flow, want_flow.numpy())
    np.testing.assert_array_equal(warped, backward_warp(fr, want_flow).numpy())
    assert len(np.unique(idx)) > 1  # a real matching, not one constant cell
    if not SLOW:
        return
    cpu = rk.build_refer_pipeline(n, c, h, w, qmin, qmax, return_index=True)
    for got, want in zip((warped, flow, idx), cpu(fq.numpy(), fr.numpy(), [scale], [zp])):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [SMALL, ODD], ids=["small", "odd"])
def test_shared_flow_and_warp_schedules_are_pytorch_bit_for_bit(shape):
    fq, fr = features(shape, 2)
    flow, idx = twin("shared_flow", shape, cosine_grid=COSINE_GRID, return_index=True)(fq.numpy(), fr.numpy())
    want = shared_flow(fq, fr)
    np.testing.assert_array_equal(flow, want.numpy())
    np.testing.assert_array_equal(idx, argmax_positions(cosine_cells(fq), cosine_cells(fr)).numpy())
    warped = twin("backward_warp", shape)(fr.numpy(), flow)
    np.testing.assert_array_equal(warped, backward_warp(fr, want).numpy())
    if SLOW:
        n, c, h, w = shape
        cpu_flow, cpu_idx = rk.build_shared_flow(n, c, h, w, return_index=True, cosine_grid=COSINE_GRID)(
            fq.numpy(), fr.numpy()
        )
        np.testing.assert_array_equal(idx, cpu_idx)
        np.testing.assert_array_equal(flow, cpu_flow)


def cluster_twin(n: int, c: int):
    return build_kernel("twin_cluster", rc.schedule_cluster_cuda(cluster_compute(n, c), bind=False), 1, None)


@pytest.mark.parametrize("n,c,dup", [(200, 47, False), (133, 16, True)], ids=["random", "duplicates"])
def test_cluster_schedule_assigns_as_pytorch_and_the_cpu_kernel(n, c, dup):
    rng = np.random.default_rng(n)
    v = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    if dup:  # repeated rows: exact ties at the maximum, which must go to the first index
        v = v[rng.integers(0, 20, n)]
    ref, cos = cluster_twin(n, c)(v)
    m = affinity(torch.from_numpy(v)).numpy()
    np.testing.assert_array_equal(ref, m.argmax(axis=1))
    cpu_ref, cpu_cos = build_cluster_kernel(n, c)(v)
    np.testing.assert_array_equal(ref, cpu_ref)
    np.testing.assert_array_equal(cos, cpu_cos)
    vt = torch.from_numpy(v)
    want_cos = torch.nn.functional.cosine_similarity(vt, vt[torch.from_numpy(ref.astype(np.int64))], dim=1)
    np.testing.assert_allclose(cos, want_cos.numpy(), rtol=0, atol=1e-5)


def test_cuda_math_forms():
    """Under device_math("cuda") a fenced product is __fmul_rn; anything else cannot be fenced."""
    from refqsr_engine.kernels.tir_build import device_math, fma
    from tvm import te

    a = te.var("a", "float32")
    with device_math("cuda"):
        assert no_contract(a * a).op.name == "tirx.call_pure_extern"
        assert no_contract(a * a).args[0].value == "__fmul_rn" and fma(a, a, a).args[0].value == "fmaf"
        with pytest.raises(ValueError, match="products"):
            no_contract(a + a)
    assert "fence" in str(no_contract(a * a)) and fma(a, a, a).op.name == "tirx.fma"
    with pytest.raises(ValueError):
        with device_math("metal"):
            pass


def test_exp_f32_within_one_ulp_and_zero_below_its_range():
    from refqsr_engine.kernels.tir_build import exp_f32
    from tvm import te

    size = 1 << 16
    x_in = te.placeholder((size,), "float32", name="x")
    k = build_kernel("exp", te.create_prim_func([x_in, te.compute((size,), lambda i: exp_f32(x_in[i]))]), 1)
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-100, 0, size // 2), rng.uniform(-87, 88, size // 2)]).astype(np.float32)
    y = k(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    ok = x >= -87
    ulps = np.abs(y[ok] - want[ok]) / np.spacing(want[ok].astype(np.float32))
    assert ulps.max() <= 1.0, ulps.max()
    assert (y[~ok] == 0).all() and k(np.zeros(size, np.float32))[0] == 1.0


def _entries(ptx: str) -> list[str]:
    return re.findall(r"\.entry\s+(\w+)\(", ptx)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_builds_have_named_ieee_kernels(arch):
    n, c, h, w = 2, 16, 24, 24
    funcs = {
        "refer_pipeline": rc.refer_primfunc_cuda("pipeline", n, c, h, w, qmin=-7, qmax=7),
        "refer_shared_flow": rc.refer_primfunc_cuda("shared_flow", n, c, h, w, cosine_grid=COSINE_GRID),
        "refer_warp": rc.refer_primfunc_cuda("backward_warp", n, c, h, w),
        "cluster_64": rc.cluster_primfunc_cuda(64, 16),
    }
    exe = rc.build_cuda_kernel(funcs, arch)
    info = cuda_toolchain.build_info(exe)
    assert info.binary and info.arch == arch
    with rc.no_fast_math():
        ptx = cuda_toolchain.device_code(exe, sass=False)
    assert f".target {arch}" in ptx
    entries = _entries(ptx)
    for name in funcs:  # TVM names a PrimFunc's kernels <symbol>_kernel, <symbol>_kernel_1, ...
        assert f"{name}_kernel" in entries, (name, entries)
    # the pipeline: norms, pools, packs, the matcher, the flow and its upsampling, the warp
    assert sum(e.startswith("refer_pipeline_kernel") for e in entries) >= 10
    assert "threadIdx.x" in info.source and "blockIdx.x" in info.source
    counts = {k: len(re.findall(k, ptx)) for k in (r"mul\.rn\.f32", r"fma\.rn\.f32", r"sqrt\.rn\.f32", r"div\.rn\.f32")}
    assert all(counts.values()), counts
    # IEEE division and square root (no fast math), and no math-library expf (ex2.approx): the
    # clustering's exponentials are exp_f32's FMAs
    approx = {line.split()[0] for line in ptx.splitlines() if ".approx" in line or ".ftz" in line}
    assert not approx, approx
    assert re.search(r"cvt\.rni\.", ptx)  # grid values round half to even (nearbyintf)
    assert "__fmul_rn" in info.source and "fmaf(" in info.source
