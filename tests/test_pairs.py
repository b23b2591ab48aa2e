"""Algorithm 1 (paper Sec. IV-A-2): query/reference pairs with ClustBlock cosine similarity > tau.

Checked independently: the cosine of every returned pair recomputed in numpy (float64) from the
ClustBlock's outputs on the returned LR crops; crops equal the image regions they claim (LR from
``bicubic_degrade`` of the whole HR image, HR at ``scale`` times the LR box) and come from the same
image; the HR crop degraded on its own matches the LR crop away from the border. The search gives
up cleanly (RefQSRError, bounded time) when no pair can exist.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from refqsr_engine.errors import RefQSRError
from refqsr_engine.metrics import bicubic_degrade
from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.training.pairs import ImagePairs, PairSampler, cosine_similarity, sample_pairs
from refqsr_engine.training.textures import render_texture

P, S = 24, 4  # LR patch, scale (small so the tests stay fast)


def _hr_image(seed: int, families: tuple[int, int], h: int = 192, w: int = 320) -> np.ndarray:
    """Two textures side by side: crops differ in ClustBlock features depending on where they land."""
    rng = np.random.default_rng(seed)
    left = render_texture(families[0], rng, max(h, w))[:h, : w // 2]
    right = render_texture(families[1], rng, max(h, w))[:h, : w - w // 2]
    return np.ascontiguousarray(np.concatenate([left, right], axis=1))


@pytest.fixture(scope="module")
def hr_images() -> list[np.ndarray]:
    return [_hr_image(k, (k, k + 7)) for k in range(3)]


@pytest.fixture(scope="module")
def clust(hr_images) -> ClustBlock:
    """A random ClustBlock whose logits are centred on these images (FC bias shifted by the mean
    logit), so cosine similarities spread over [-1, 1] instead of all sitting near 1."""
    torch.manual_seed(0)
    cb = ClustBlock(16).eval()
    rng = np.random.default_rng(0)
    crops = []
    for hr in hr_images:
        lr = bicubic_degrade(hr, S)
        for _ in range(24):
            t, l = rng.integers(0, lr.shape[0] - P + 1), rng.integers(0, lr.shape[1] - P + 1)
            crops.append(lr[t : t + P, l : l + P])
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        cb.fc.conv.bias -= cb(x, quantized=False).mean(0)
    return cb


def _np_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _features(cb: ClustBlock, x: torch.Tensor, quantized: bool | None = None) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([cb(x[i : i + 1], quantized=quantized).numpy() for i in range(len(x))])


def _u8(t: torch.Tensor) -> np.ndarray:
    return np.round(t.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@pytest.mark.parametrize("calibrated", [False, True])
def test_pairs_exceed_tau_and_are_aligned(hr_images, clust, calibrated: bool) -> None:
    cb = clust
    if calibrated:  # the paper's setting: the 8-bit ClustBlock picks the pairs
        cb = ClustBlock(16)
        cb.load_state_dict(clust.state_dict())
        cb.calibrate([torch.rand(8, 3, P, P)])
    tau = 0.5
    src = ImagePairs(hr_images, S)
    out = sample_pairs(src, cb, batch=12, lr_patch=P, scale=S, tau=tau, rng=np.random.default_rng(3))
    st = out.stats
    assert out.query_lr.shape == out.ref_lr.shape == (12, 3, P, P)
    assert out.query_hr.shape == out.ref_hr.shape == (12, 3, P * S, P * S)
    assert len(st.tries) == 12 and min(st.tries) >= 1 and st.duplicated == 0
    assert st.total_tries > 12, "tau rejected nothing: the test would not exercise the repeat loop"
    assert st.evaluated >= st.total_tries

    # cosine recomputed independently (numpy, float64) from ClustBlock's outputs on the returned crops
    vq, vr = _features(cb, out.query_lr), _features(cb, out.ref_lr)
    cos = _np_cos(vq, vr)
    assert (np.array(st.similarity) > tau).all()
    np.testing.assert_allclose(cos, st.similarity, atol=1e-4)
    assert (cos > tau - 1e-5).all(), cos

    lrs = [bicubic_degrade(hr, S) for hr in hr_images]
    for k in range(12):
        img = st.images[k]
        for lr_t, hr_t, (t, l) in (
            (out.query_lr[k], out.query_hr[k], st.query_boxes[k]),
            (out.ref_lr[k], out.ref_hr[k], st.ref_boxes[k]),
        ):
            lr_c, hr_c = _u8(lr_t), _u8(hr_t)
            # same image: the crop is this image's region at its box, and no other image's
            np.testing.assert_array_equal(lr_c, lrs[img][t : t + P, l : l + P])
            np.testing.assert_array_equal(hr_c, hr_images[img][t * S : (t + P) * S, l * S : (l + P) * S])
            others = [j for j in range(len(lrs)) if j != img]
            assert not any(np.array_equal(lr_c, lrs[j][t : t + P, l : l + P]) for j in others)
            # LR/HR aligned: degrading the HR crop alone reproduces the LR crop away from its border
            m = 3
            own = bicubic_degrade(hr_c, S).astype(int)
            assert np.abs(own[m:-m, m:-m] - lr_c[m:-m, m:-m].astype(int)).max() <= 1


def test_accepts_lr_hr_pairs_and_sampler_object(hr_images, clust) -> None:
    pairs = [(bicubic_degrade(hr, S), hr) for hr in hr_images]
    sampler = PairSampler(pairs, clust, scale=S, seed=0, batch=4, lr_patch=P, tau=0.5)
    a, _ = sampler(), sampler()  # two batches: 8 pairs drawn
    assert a.query_lr.shape == (4, 3, P, P) and sampler.pairs == 8 and sampler.mean_tries >= 1
    again = PairSampler(pairs, clust, scale=S, seed=0, batch=4, lr_patch=P, tau=0.5)()
    torch.testing.assert_close(again.ref_hr, a.ref_hr, rtol=0, atol=0)  # deterministic per seed
    with pytest.raises(RefQSRError, match="not x4"):
        sample_pairs([(pairs[0][0], pairs[0][1][:-8])], clust, batch=1, lr_patch=P)


def test_gives_up_cleanly_when_tau_unreachable(hr_images, clust) -> None:
    t0 = time.perf_counter()
    with pytest.raises(RefQSRError, match="no query/reference pair"):
        sample_pairs(
            hr_images, clust, batch=4, lr_patch=P, scale=S, tau=1.01, max_tries=8, rng=np.random.default_rng(0)
        )
    assert time.perf_counter() - t0 < 10.0
    # a zero feature vector has no direction: similarity 0, never a match (and no NaN crash)
    zero = ClustBlock(16)
    with torch.no_grad():
        zero.fc.conv.weight.zero_()
        zero.fc.conv.bias.zero_()
    assert float(cosine_similarity(torch.zeros(3), torch.ones(3))) == 0.0
    with pytest.raises(RefQSRError):
        sample_pairs(
            hr_images[:1], zero, batch=2, lr_patch=P, scale=S, tau=0.0, max_tries=4, rng=np.random.default_rng(0)
        )


def test_uniform_black_image_and_fallback_to_other_images(hr_images, clust) -> None:
    black = np.zeros((128, 128, 3), np.uint8)
    out = sample_pairs([black], clust, batch=3, lr_patch=P, scale=S, tau=0.5, rng=np.random.default_rng(0))
    assert out.stats.tries == [1, 1, 1]  # every crop of a flat image has the same features
    assert float(out.query_hr.abs().max()) == 0.0 and float(out.ref_lr.abs().max()) == 0.0
    np.testing.assert_allclose(out.stats.similarity, 1.0, atol=1e-6)
    # a tau no texture crop pair reaches: slots give up on the texture image and use the black one
    out = sample_pairs(
        [hr_images[0], black],
        clust,
        batch=4,
        lr_patch=P,
        scale=S,
        tau=0.99999,
        max_tries=6,
        rng=np.random.default_rng(1),
    )
    assert out.stats.images == [1, 1, 1, 1] and out.stats.gave_up >= 1


def test_budget_exhausted_after_some_pairs_repeats_them(clust) -> None:
    black = np.zeros((128, 128, 3), np.uint8)
    with pytest.warns(RuntimeWarning, match="repeating found pairs"):
        out = sample_pairs(
            [black], clust, batch=4, lr_patch=P, scale=S, tau=0.5, max_total_tries=2, rng=np.random.default_rng(0)
        )
    assert out.stats.duplicated == 2 and out.query_lr.shape[0] == 4 and out.stats.evaluated == 2


def test_small_images_rejected(clust) -> None:
    with pytest.raises(RefQSRError, match="LR side"):
        sample_pairs([np.zeros((64, 64, 3), np.uint8)], clust, batch=1, lr_patch=P, scale=S)
    with pytest.raises(RefQSRError, match="uint8"):
        sample_pairs([np.zeros((128, 128), np.float32)], clust, batch=1, lr_patch=P, scale=S)
