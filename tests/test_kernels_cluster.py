"""ClustBlock clustering kernel (refqsr_engine.kernels.cluster_kernels) against its PyTorch twin,
models/clustblock.py (``affinity``, ``cluster_patches``): identical arg-max references and
reference/query split, similarities within 1e-5; and the PrimFunc called from Relax via R.call_tir.
The kernel's outputs go through ``assign_references``, the bookkeeping the engine applies to them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from refqsr_engine.kernels.cluster_kernels import build_affinity_kernel, build_cluster_kernel
from refqsr_engine.models.clustblock import Clustering, affinity, assign_references, cluster_patches

N_PATCHES, N_CLASSES = 600, 47
_CACHE: dict = {}


def kernel(n: int, c: int = N_CLASSES):
    if (n, c) not in _CACHE:
        _CACHE[(n, c)] = build_cluster_kernel(n, c)
    return _CACHE[(n, c)]


def assign(ref: np.ndarray, cos: np.ndarray, tau: float = 0.5) -> Clustering:
    """``assign_references`` on the kernel's numpy outputs."""
    return assign_references(
        torch.from_numpy(np.asarray(ref)), torch.from_numpy(np.asarray(cos, dtype=np.float32)), tau
    )


def cluster(k, v, tau: float = 0.5) -> Clustering:
    """Run the compiled clustering kernel on logits ``v`` ([N, C]) and assign references."""
    ref, cos = k(np.asarray(v, dtype=np.float32))
    return assign(ref, cos, tau)


def assert_same_clustering(v: np.ndarray, tau: float = 0.5) -> None:
    got = cluster(kernel(*v.shape), v, tau)
    ref = cluster_patches(torch.from_numpy(v), tau)
    m = affinity(torch.from_numpy(v)).numpy()
    np.testing.assert_array_equal(got.argmax, m.argmax(axis=1))
    np.testing.assert_array_equal(got.reference_of, ref.reference_of.numpy())
    np.testing.assert_array_equal(got.is_reference, ref.is_reference.numpy())
    np.testing.assert_allclose(got.similarity, ref.similarity.numpy(), rtol=0, atol=1e-5)
    assert got.num_references == ref.num_references and got.num_queries == ref.num_queries


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_random_logits_match_cluster_patches(seed: int, spread: float) -> None:
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal((N_PATCHES, N_CLASSES)) * spread).astype(np.float32)
    assert_same_clustering(v)


@pytest.mark.parametrize("seed", range(3))
def test_duplicate_patches_tie_to_first_index(seed: int) -> None:
    """Flat or repeated patches give identical rows of V, hence exactly equal columns of M: the
    arg-max must pick the first of them, as torch.argmax does."""
    rng = np.random.default_rng(100 + seed)
    base = (rng.standard_normal((40, N_CLASSES)) * 2).astype(np.float32)
    v = base[rng.integers(0, len(base), N_PATCHES)]
    m = affinity(torch.from_numpy(v)).numpy()
    # the test really has ties at the maximum
    assert any((row == row.max()).sum() > 1 for row in m)
    assert_same_clustering(v)


def test_tau_threshold_makes_isolated_references() -> None:
    rng = np.random.default_rng(7)
    v = (rng.standard_normal((N_PATCHES, N_CLASSES)) * 2).astype(np.float32)
    for tau in (-1.0, 0.3, 0.9, 1.1):
        assert_same_clustering(v, tau)
    loose = cluster(kernel(*v.shape), v, -1.0)
    strict = cluster(kernel(*v.shape), v, 1.1)
    assert strict.is_reference.all() and loose.num_queries > 0


def test_small_batch_and_fig4_toy_example() -> None:
    """N not a multiple of the vector width; the paper's Fig. 4 toy (5 patches, 3 classes)."""
    toy = np.array([[2, 0, 0], [4, 0, 0], [3, 1, 0], [0, 0, 3], [0, 1, 5]], dtype=np.float32)
    got = cluster(kernel(5, 3), toy, 0.5)
    ref = cluster_patches(torch.from_numpy(toy), 0.5)
    np.testing.assert_array_equal(got.reference_of, ref.reference_of.numpy())
    np.testing.assert_array_equal(got.is_reference, ref.is_reference.numpy())
    rng = np.random.default_rng(3)
    assert_same_clustering((rng.standard_normal((37, N_CLASSES)) * 3).astype(np.float32))


def test_affinity_matrix() -> None:
    rng = np.random.default_rng(11)
    v = (rng.standard_normal((37, N_CLASSES)) * 3).astype(np.float32)
    k = build_affinity_kernel(37, N_CLASSES)
    np.testing.assert_allclose(k(v), affinity(torch.from_numpy(v)).numpy(), rtol=1e-5, atol=1e-6)


def test_assign_bookkeeping() -> None:
    ref = np.array([1, 1, 1, 4, 4, 0])
    cos = np.array([0.9, 1.0, 0.2, 0.8, 1.0, 0.95], dtype=np.float32)
    a = assign(ref, cos, tau=0.5)
    # targets 0, 1, 4 are references; 2 (cos 0.2 < tau) becomes isolated; 3, 5 are queries
    np.testing.assert_array_equal(a.is_reference, [True, True, True, False, True, False])
    np.testing.assert_array_equal(a.reference_of, [0, 1, 2, 4, 4, 0])
    with pytest.raises(ValueError):
        assign(np.array([0, 3]), np.zeros(2), 0.5)


def test_prim_func_runs_from_relax_call_tir() -> None:
    import tvm
    from tvm import relax

    n, c = 37, N_CLASSES
    k = kernel(n, c)
    assert [s.shape for s in k.inputs] == [(n, c)]
    assert k.out_sinfo == [((n,), "int32"), ((n,), "float32")]
    bb = relax.BlockBuilder()
    v = relax.Var("v", relax.TensorType((n, c), "float32"))
    with bb.function("main", [v]):
        gv = bb.add_func(k.prim_func, "clust_assign")
        out = bb.emit(relax.call_tir(gv, [v], [relax.TensorType(s, d) for s, d in k.out_sinfo]))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=k.target), tvm.cpu())
    x = (np.random.default_rng(5).standard_normal((n, c)) * 2).astype(np.float32)
    ref_idx, cos = vm["main"](tvm.runtime.tensor(x))
    want_idx, want_cos = k(x)
    np.testing.assert_array_equal(ref_idx.numpy(), want_idx)
    np.testing.assert_array_equal(cos.numpy(), want_cos)
