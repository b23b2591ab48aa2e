"""ClustBlock (paper Sec. III-C-2, Table I, eqs. (2)-(3)) against numpy / torch.nn.functional twins.

* affinity / cluster_patches: numpy softmax rows of V and of V^T, M = A @ A', argmax per row,
  numpy cosine similarity for the tau threshold; the toy example follows Fig. 4 (N=5, C=3).
* the feature extractor: a float64 twin built from F.conv2d and the module's weights, with 8-bit
  min/max quantization written in numpy (ranges = min/max of the calibration activations, widened
  to contain 0; weights: their own min/max).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refqsr_engine.models import qconv
from refqsr_engine.models.clustblock import ClustBlock, affinity, cluster_patches

# --------------------------------------------------------------------------- Fig. 4 toy example

# 5 patches, 3 texture classes: patches 0, 1, 2 favour class 0 (patch 1 most strongly),
# patches 3, 4 favour class 2 (patch 4 most strongly).
TOY_V = np.array(
    [
        [2.0, 0.0, 0.0],
        [4.0, 0.0, 0.0],
        [3.0, 1.0, 0.0],
        [0.0, 0.0, 3.0],
        [0.0, 1.0, 5.0],
    ]
)


def np_softmax_rows(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_affinity(v: np.ndarray) -> np.ndarray:
    a = np_softmax_rows(v)  # eq. (2): each row a distribution over classes
    a_t = np_softmax_rows(v.T)  # eq. (3): each row a distribution over patches
    return a @ a_t


def np_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_affinity_matches_numpy() -> None:
    m = affinity(torch.tensor(TOY_V, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(m, np_affinity(TOY_V), rtol=0, atol=1e-6)
    v = np.random.default_rng(0).standard_normal((9, 47)) * 3
    np.testing.assert_allclose(affinity(torch.tensor(v)).numpy(), np_affinity(v), rtol=0, atol=1e-12)


def test_fig4_toy_example_two_clusters() -> None:
    argmax = np_affinity(TOY_V).argmax(axis=1)
    # the figure's situation: two clusters, each pointing at one patch that points at itself
    np.testing.assert_array_equal(argmax, [1, 1, 1, 4, 4])
    assert argmax[argmax[1]] == 1 and argmax[argmax[4]] == 4

    c = cluster_patches(torch.tensor(TOY_V, dtype=torch.float32), tau=-1.0)
    np.testing.assert_array_equal(c.reference_of.numpy(), argmax)
    np.testing.assert_array_equal(c.is_reference.numpy(), [False, True, False, False, True])
    assert c.num_references == 2 and c.num_queries == 3
    clusters = {int(r) for r in c.reference_of}
    assert clusters == {1, 4}
    for i in range(5):
        ref = int(c.reference_of[i])
        assert int(c.reference_of[ref]) == ref  # every reference points to itself
    expected_sim = [np_cosine(TOY_V[i], TOY_V[argmax[i]]) for i in range(5)]
    np.testing.assert_allclose(c.similarity.numpy(), expected_sim, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tau", [0.97, 0.99, 0.9999])
def test_tau_makes_isolated_references(tau: float) -> None:
    argmax = np_affinity(TOY_V).argmax(axis=1)
    sim = np.array([np_cosine(TOY_V[i], TOY_V[argmax[i]]) for i in range(5)])
    pointed_at = np.zeros(5, dtype=bool)
    pointed_at[argmax] = True
    isolated = ~pointed_at & (sim < tau)
    # 0.97: patch 2 (cos 0.949) is isolated; 0.99: patches 2 and 3 (cos 0.981); patch 0 never (cos 1)
    assert isolated[2] and not isolated[0]
    c = cluster_patches(torch.tensor(TOY_V, dtype=torch.float32), tau=tau)
    np.testing.assert_array_equal(c.is_reference.numpy(), pointed_at | isolated)
    expected_ref = np.where(pointed_at | isolated, np.arange(5), argmax)
    np.testing.assert_array_equal(c.reference_of.numpy(), expected_ref)


def test_cluster_random_features_matches_numpy() -> None:
    v = np.random.default_rng(1).standard_normal((12, 47)).astype(np.float32) * 2
    tau = 0.2
    vd = v.astype(np.float64)
    argmax = np_affinity(vd).argmax(axis=1)
    m = np.sort(np_affinity(vd), axis=1)
    assert (m[:, -1] - m[:, -2]).min() > 1e-5  # no near-ties in the argmax
    sim = np.array([np_cosine(vd[i], vd[argmax[i]]) for i in range(12)])
    pointed_at = np.zeros(12, dtype=bool)
    pointed_at[argmax] = True
    is_ref = pointed_at | (sim < tau)
    c = cluster_patches(torch.from_numpy(v), tau=tau)
    np.testing.assert_array_equal(c.is_reference.numpy(), is_ref)
    np.testing.assert_array_equal(c.reference_of.numpy(), np.where(is_ref, np.arange(12), argmax))
    np.testing.assert_allclose(c.similarity.numpy(), sim, atol=1e-5)


# --------------------------------------------------------------------------- the feature extractor


def test_table1_layer_structure() -> None:
    cb = ClustBlock(num_classes=47)
    expected = [  # (kernel, stride, padding, c_in, c_out) of Table I
        (3, 3, 0, 3, 64),
        (3, 1, 0, 64, 64),
        (3, 1, 0, 64, 32),
    ]
    assert len(cb.convs) == 3
    for qc, (k, s, p, cin, cout) in zip(cb.convs, expected):
        c = qc.conv
        assert c.kernel_size == (k, k) and c.stride == (s, s) and c.padding == (p, p)
        assert (c.in_channels, c.out_channels) == (cin, cout)
        assert qc.scheme == "minmax" and qc.act_bits == [8]
    fc = cb.fc.conv  # QFC 32 x C as a 1x1 conv
    assert fc.kernel_size == (1, 1) and (fc.in_channels, fc.out_channels) == (32, 47) and fc.padding == (0, 0)
    assert cb.fc.scheme == "minmax" and cb.fc.act_bits == [8]
    n_params = sum(p.numel() for p in cb.parameters())
    assert n_params == (27 * 64 + 64) + (576 * 64 + 64) + (576 * 32 + 32) + (32 * 47 + 47)


def _patches(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish textures in [0, 1]: low-res noise upsampled, plus fine noise
    base = F.interpolate(torch.rand(n, 3, size // 6, size // 6, generator=g), size=(size, size), mode="bilinear")
    return (0.8 * base + 0.2 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def _np_asym(x: np.ndarray, lower: float, upper: float) -> tuple[np.ndarray, float, float]:
    s = (upper - lower) / 255
    z = float(np.clip(np.round(-lower / s), 0, 255))
    q = np.clip(np.round(x / s) + z, 0, 255)
    return (q - z) * s, s, z


def _layers(cb: ClustBlock) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    out = [(qc.conv.weight.detach().double(), qc.conv.bias.detach().double(), qc.conv.stride[0]) for qc in cb.convs]
    return out + [(cb.fc.conv.weight.detach().double(), cb.fc.conv.bias.detach().double(), 1)]


def _twin_fp(cb: ClustBlock, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Full-precision float64 forward; returns logits and the input of every layer."""
    h, inputs = x.double(), []
    layers = _layers(cb)
    for w, b, s in layers[:3]:
        inputs.append(h)
        h = F.relu(F.conv2d(h, w, b, stride=s))
    h = h.mean(dim=(2, 3), keepdim=True)
    inputs.append(h)
    w, b, _ = layers[3]
    return F.conv2d(h, w, b).flatten(1), inputs


def _calibration_ranges(cb: ClustBlock, batches: list[torch.Tensor]) -> list[tuple[float, float]]:
    per_batch = [_twin_fp(cb, b)[1] for b in batches]
    ranges = []
    for layer in range(4):
        lo = min(float(inp[layer].min()) for inp in per_batch)
        hi = max(float(inp[layer].max()) for inp in per_batch)
        ranges.append((min(lo, 0.0), max(hi, 0.0)))
    return ranges


@pytest.fixture(scope="module")
def calibrated() -> tuple[ClustBlock, list[torch.Tensor]]:
    torch.manual_seed(0)
    cb = ClustBlock(num_classes=47)
    batches = [_patches(4, 72, 1), _patches(4, 72, 2)]
    cb.calibrate(batches)
    return cb, batches


def test_shapes_and_full_precision_matches_twin() -> None:
    torch.manual_seed(0)
    cb = ClustBlock(num_classes=47)
    for n, size in [(5, 72), (2, 96), (3, 15)]:
        x = _patches(n, size, n)
        out = cb(x, quantized=False)
        assert out.shape == (n, 47)
        torch.testing.assert_close(out.double(), _twin_fp(cb, x)[0], rtol=1e-5, atol=1e-6)
    assert not bool(cb.calibrated)


def test_calibration_ranges_are_min_max(calibrated) -> None:
    cb, batches = calibrated
    assert bool(cb.calibrated)
    ranges = _calibration_ranges(cb, batches)
    for qc, (lo, hi) in zip(list(cb.convs) + [cb.fc], ranges):
        p = qc.act_quant["8"].qparams()
        np.testing.assert_allclose(float(p.scale), (hi - lo) / 255, rtol=1e-5)
        assert float(p.zero_point) == np.clip(np.round(-lo / ((hi - lo) / 255)), 0, 255)


def test_quantized_matches_numpy_twin_and_is_close_to_fp(calibrated, monkeypatch) -> None:
    """Every quantized conv's operands equal the numpy twin's, layer by layer, and the logits equal
    a float64 conv of the model's last operands.

    The twin quantizes (float64) the float64 output of the previous layer computed from the
    model's own previous operands, so each layer is checked on its own. Float32 (the model) and
    float64 (the twin) can round a value lying within float rounding of a .5 tie to neighbouring
    codes, and which way depends on the CPU's float kernels; such a flip is allowed only for
    values within 1e-3 of a tie, by one code, and at most at a handful of elements. A wrong scale,
    zero point or rounding mode moves codes everywhere, so it still fails here on every CPU."""
    cb, batches = calibrated
    x = _patches(6, 72, 3)
    ranges = _calibration_ranges(cb, batches)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_conv2d = F.conv2d

    def recording_conv2d(inp, w, *args, **kwargs):
        seen.append((inp.detach().double(), w.detach().double()))
        return real_conv2d(inp, w, *args, **kwargs)

    monkeypatch.setattr(qconv.F, "conv2d", recording_conv2d)
    with torch.no_grad():
        q = cb(x)  # calibrated -> quantized by default
    monkeypatch.undo()
    with torch.no_grad():
        fp = cb(x, quantized=False)
    assert len(seen) == 4
    h = x.double()  # the float input of the layer being checked
    for i, ((xq, wq), (w, b, stride), (lo, hi)) in enumerate(zip(seen, _layers(cb), ranges)):
        twin, scale, _ = _np_asym(h.numpy(), lo, hi)
        codes, twin_codes = np.round(xq.numpy() / scale), np.round(twin / scale)
        flipped = codes != twin_codes
        tie_distance = np.abs(np.abs(h.numpy() / scale - np.floor(h.numpy() / scale)) - 0.5)
        assert np.abs(codes - twin_codes).max() <= 1, i
        assert np.all(tie_distance[flipped] < 1e-3), i
        assert flipped.sum() <= 4, (i, int(flipped.sum()))
        wn = w.numpy()
        w_twin, w_scale, _ = _np_asym(wn, min(wn.min(), 0.0), max(wn.max(), 0.0))
        np.testing.assert_allclose(wq.numpy(), w_twin, rtol=0, atol=1e-3 * w_scale)
        h = F.conv2d(xq, wq, b, stride=stride)
        if i < 3:
            h = F.relu(h)
            if i == 2:
                h = h.mean(dim=(2, 3), keepdim=True)
    rel_twin = float((q.double() - h.flatten(1)).norm() / h.norm())
    assert rel_twin < 1e-5, rel_twin
    rel_fp = float((q - fp).norm() / fp.norm())
    assert 0 < rel_fp < 0.05, rel_fp


def test_quantized_conv_inputs_on_8bit_grid(calibrated, monkeypatch) -> None:
    cb, batches = calibrated
    ranges = _calibration_ranges(cb, batches)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_conv2d = F.conv2d

    def recording_conv2d(x, w, *args, **kwargs):
        seen.append((x.detach().double(), w.detach().double()))
        return real_conv2d(x, w, *args, **kwargs)

    monkeypatch.setattr(qconv.F, "conv2d", recording_conv2d)
    with torch.no_grad():
        cb(_patches(3, 72, 4), quantized=True)
    assert len(seen) == 4
    for (x, w), (lo, hi) in zip(seen, ranges):
        s, z = (hi - lo) / 255, float(np.clip(np.round(-lo / ((hi - lo) / 255)), 0, 255))
        q = x / s + z
        assert torch.allclose(q, q.round(), atol=2e-3)
        assert q.round().min() >= 0 and q.round().max() <= 255
        wl, wh = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
        ws = (wh - wl) / 255
        qw = w / ws + np.round(-wl / ws)
        assert torch.allclose(qw, qw.round(), atol=2e-3)
        assert qw.round().min() >= 0 and qw.round().max() <= 255


@pytest.mark.parametrize("shape", [(14, 14), (14, 72), (72, 14), (8, 8)])
def test_small_patches_raise(shape: tuple[int, int]) -> None:
    cb = ClustBlock(num_classes=5)
    with pytest.raises(ValueError):
        cb(torch.rand(1, 3, *shape), quantized=False)
    with pytest.raises(ValueError):
        cb.calibrate(torch.rand(1, 3, *shape))
