"""The streaming order of the patch-wise runtime: every patch once, each query after its
reference, and reference features alive for a bounded number of patches whatever the image size."""

import numpy as np
import pytest
import torch
from refqsr_engine.models.clustblock import Clustering
from refqsr_engine.pipeline.patchwise import query_schedule, run_patchwise


def _random_clustering(n: int, n_refs: int, seed: int) -> Clustering:
    rng = np.random.default_rng(seed)
    refs = np.sort(rng.choice(n, n_refs, replace=False))
    reference_of = np.array([i if i in refs else rng.choice(refs) for i in range(n)])
    is_ref = np.isin(np.arange(n), refs)
    return Clustering(
        torch.from_numpy(reference_of), torch.from_numpy(is_ref), torch.ones(n), torch.from_numpy(reference_of)
    )


def _replay(clustering: Clustering, batch: int) -> int:
    """Walk the schedule as the runtime does; check its invariants; return the peak number of
    references whose features are held."""
    order = query_schedule(clustering, batch)
    readers = dict(order.readers)
    ran, held, peak = set(), set(), 0
    for ref_idx, query_batches in order:
        assert 0 < len(ref_idx) <= batch
        ran.update(ref_idx)
        held.update(i for i in ref_idx if i in readers)
        peak = max(peak, len(held))
        for idx in query_batches:
            assert 0 < len(idx) <= batch
            for i in idx:
                r = int(clustering.reference_of[i])
                assert r in ran and r in held, "a query ran before its reference"
                ran.add(i)
                readers[r] -= 1
                if readers[r] == 0:
                    held.discard(r)
    n = len(clustering.is_reference)
    assert sorted(ran) == list(range(n)) and len(ran) == n
    assert not held, "features kept after their last query"
    return peak


@pytest.mark.parametrize("n,n_refs,batch", [(1, 1, 4), (7, 7, 4), (50, 3, 4), (300, 90, 16), (2000, 500, 16)])
def test_schedule_runs_each_patch_once_after_its_reference(n, n_refs, batch):
    _replay(_random_clustering(n, n_refs, seed=n), batch)


def test_held_features_bounded_by_batch_not_image():
    # Queries pick references at random, the worst case for locality: what is held is still the
    # current reference batch plus the references of one incomplete query batch.
    for n in (400, 4000):
        peak = _replay(_random_clustering(n, n // 4, seed=1), batch=16)
        assert peak <= 2 * 16, (n, peak)


class _CountingRunner:
    """A runner that records how many reference feature sets are alive during each query call."""

    refqsr, scale = True, 2

    def __init__(self, clustering: Clustering) -> None:
        self.clustering, self.alive, self.calls = clustering, 0, []

    def logits(self, x):
        return np.zeros((len(x), 4), np.float32)

    def cluster(self, v):
        return self.clustering

    def reference(self, x):
        return np.repeat(np.repeat(x, 2, axis=2), 2, axis=3), [x[:, :1].copy()]

    def query(self, x, features):
        # the gathered feature of each query is its reference's patch: a query must get its own reference's
        self.calls.append(len(x))
        return np.repeat(np.repeat(features[0].repeat(3, axis=1), 2, axis=2), 2, axis=3)

    def sr(self, x):
        raise AssertionError("not used for RefQSR")


def test_queries_get_their_own_reference_features():
    rng = np.random.default_rng(0)
    lr = rng.random((3, 40, 40), dtype=np.float32)
    # grid of 8x8 patches, overlap 0 -> 25 patches
    clustering = _random_clustering(25, 6, seed=3)
    out = run_patchwise(_CountingRunner(clustering), lr, patch=8, overlap=0, batch=4).image
    for i in range(25):
        r = int(clustering.reference_of[i])
        ri, ci = divmod(r, 5)
        qi, qc = divmod(i, 5)
        ref_patch = lr[0, ri * 8 : (ri + 1) * 8, ci * 8 : (ci + 1) * 8]
        got = out[:, qi * 16 : (qi + 1) * 16 : 2, qc * 16 : (qc + 1) * 16 : 2]
        if i == r:  # references pass through their own pixels
            np.testing.assert_allclose(got, lr[:, qi * 8 : (qi + 1) * 8, qc * 8 : (qc + 1) * 8], atol=1e-6)
        else:  # queries show their reference's first channel
            np.testing.assert_allclose(got, np.broadcast_to(ref_patch, (3, 8, 8)), atol=1e-6)
