"""The runtime's device-resident path (engine.runtime.CompiledModel with ``resident``): one upload
and one download per compiled batch, the RefER features kept and gathered on the device.

Exercised on the CPU device of the TVM runtime with stand-in graphs (small numpy functions behind
the VM interface, returning TVM tensors): the same code path as on a GPU -- views, device-to-device
copies, padding of short batches -- with every host<->device copy counted by wrapping
``tvm_runtime.to_device`` / ``to_numpy``. The images are checked against the same functions run
by the patch-wise algorithm on plain numpy (the default feature keeping of run_patchwise).
"""

from __future__ import annotations

import numpy as np
import pytest
from refqsr_engine.engine import runtime, tvm_runtime
from refqsr_engine.pipeline.clustering import assign_references
from refqsr_engine.pipeline.patchwise import run_patchwise

SCALE, PATCH, OVERLAP, CLASSES = 2, 8, 2, 5


def ref_net(x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Stand-in reference graph: HR patches and two RefER features of different shapes."""
    hr = np.repeat(np.repeat(x, SCALE, axis=2), SCALE, axis=3) * 0.5
    return hr, [np.tanh(x * 3.0 + 0.25), x.mean(axis=1, keepdims=True) ** 2]


def query_net(x: np.ndarray, f0: np.ndarray, f1: np.ndarray) -> np.ndarray:
    """Stand-in query graph: depends on every feature, so a wrongly gathered row shows."""
    y = x + 0.3 * f0 - 0.7 * f1
    return np.repeat(np.repeat(y, SCALE, axis=2), SCALE, axis=3)


def logits_net(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], 3, -1).mean(axis=2) @ np.arange(3 * CLASSES, dtype=np.float32).reshape(3, CLASSES)


def clustering(v: np.ndarray):
    """A fixed assignment: every 4th patch a reference, the others its queries (spread over
    several reference batches)."""
    n = len(v)
    argmax = np.array([i - i % 4 for i in range(n)], dtype=np.int64)
    return assign_references(argmax, np.ones(n, np.float32), 0.5)


class NumpyRunner:
    refqsr, scale = True, SCALE

    def sr(self, x):
        raise AssertionError("RefQSR runs no sr graph")

    def logits(self, x):
        return logits_net(x)

    def cluster(self, v):
        return clustering(v)

    def reference(self, x):
        return ref_net(x)

    def query(self, x, features):
        return query_net(x, *features)


def _tensor(a: np.ndarray):
    return tvm_runtime.load_runtime().from_dlpack(tvm_runtime.aligned(np.ascontiguousarray(a, dtype=np.float32)))


class StandInVM:
    """A graph behind the Relax VM interface: TVM tensors in (read without the counted helpers),
    TVM tensors out."""

    def __init__(self, fn, calls: dict, name: str) -> None:
        self.fn, self.calls, self.name = fn, calls, name

    def __call__(self, *args):
        self.calls[self.name] += 1
        out = self.fn(*[np.from_dlpack(a).copy() for a in args])
        outs = [out[0], *out[1]] if isinstance(out, tuple) else [out]
        return [_tensor(o) for o in outs]


def stand_in_model(resident: bool, batches=(4, 1)):
    """A CompiledModel over the stand-in graphs (what __init__ would set from an artifact)."""
    m = runtime.CompiledModel.__new__(runtime.CompiledModel)
    calls = {"clustblock": 0, "reference": 0, "query": 0}
    fns = {"clustblock": logits_net, "reference": ref_net, "query": query_net}
    m.refqsr, m.scale, m.kind = True, SCALE, "refqsr"
    m.batches, m.batch = list(batches), batches[0]
    m.device = tvm_runtime.device("cpu")
    m.vms = {(g, b): StandInVM(fns[g], calls, g) for g in fns for b in batches}
    m.dynamic_graphs, m.chosen = set(), None
    m.resident, m.copies = resident, {"to_device": 0, "to_host": 0}
    m.cluster = clustering  # the clustering kernel has its own test (tests/test_kernels_cluster.py)
    return m, calls


@pytest.fixture
def counted(monkeypatch):
    """Counts of tvm_runtime.to_device / to_numpy calls."""
    counts = {"to_device": 0, "to_host": 0}
    up, down = tvm_runtime.to_device, tvm_runtime.to_numpy

    def to_device(a, dev):
        counts["to_device"] += 1
        return up(a, dev)

    def to_numpy(t):
        counts["to_host"] += 1
        return down(t)

    monkeypatch.setattr(tvm_runtime, "to_device", to_device)
    monkeypatch.setattr(tvm_runtime, "to_numpy", to_numpy)
    return counts


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "host"])
def test_patchwise_image_and_copies(counted, resident):
    rng = np.random.default_rng(3)
    lr = rng.random((3, 30, 38), dtype=np.float32)
    want = run_patchwise(NumpyRunner(), lr, PATCH, OVERLAP, batch=4)
    model, calls = stand_in_model(resident)
    got = run_patchwise(model, lr, PATCH, OVERLAP, batch=4)
    np.testing.assert_array_equal(got.clustering.reference_of, want.clustering.reference_of)
    np.testing.assert_allclose(got.image, want.image, rtol=0, atol=1e-6)
    n_feat = 2
    assert calls["query"] > 1 and calls["reference"] > 1  # several batches of each, short ones padded
    if resident:
        # one upload (patches) and one download (logits / HR) per compiled batch
        per_batch = runtime.RESIDENT_COPIES
        n = sum(calls.values())
        assert counted == {"to_device": per_batch["to_device"] * n, "to_host": per_batch["to_host"] * n}
    else:  # the host path: features down after each reference batch, up again for each query batch
        assert counted["to_device"] == calls["clustblock"] + calls["reference"] + (1 + n_feat) * calls["query"]
        assert counted["to_host"] == calls["clustblock"] + (1 + n_feat) * calls["reference"] + calls["query"]
    assert model.copies == counted


def test_gather_pads_short_batches_with_a_real_row():
    model, _ = stand_in_model(True)
    x = np.random.default_rng(0).random((3, 3, PATCH, PATCH), dtype=np.float32)
    _, feats = model.reference(x)
    rows = model.gather_features([model.keep_features(feats, i) for i in (2, 0)])
    f0, f1 = (np.from_dlpack(t) for t in model._gather(rows, 4))
    _, (w0, w1) = ref_net(x)
    np.testing.assert_array_equal(f0, w0[[2, 0, 2, 2]])
    np.testing.assert_array_equal(f1, w1[[2, 0, 2, 2]])


def test_device_features_come_back_whole_across_sub_batches():
    model, _ = stand_in_model(True)
    x = np.random.default_rng(1).random((6, 3, PATCH, PATCH), dtype=np.float32)  # plan: 4 + 1 + 1
    assert model.plan(6) == [4, 1, 1]
    hr, feats = model.reference(x)
    want_hr, want = ref_net(x)
    np.testing.assert_allclose(hr, want_hr, rtol=0, atol=0)
    for got, w in zip(feats.numpy(), want, strict=True):
        np.testing.assert_array_equal(got, w)
    assert [t.shape[0] for _, _, (t, _) in feats.parts] == [4, 1, 1]
    with pytest.raises(IndexError):
        feats.row(6)
