"""ClustBlock pre-training data and command: procedural textures, the DTD loader, train_clust.

* textures: every family renders HxWx3 uint8, deterministically per seed, fast; classes split
  families into scale bands; a nearest-class-mean classifier on hand-made features (numpy FFT and
  gradient statistics) separates the families far above chance.
* DTD: a tiny fake ``images/<class>/*.jpg`` folder (one image smaller than the crop).
* train_clust: one step lowers the loss on a fixed batch; the BatchNorm twin folds exactly into
  ClustBlock; an interrupted-and-resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from refqsr_engine.errors import RefQSRError
from refqsr_engine.models.checkpoint import load_model
from refqsr_engine.models.clustblock import ClustBlock
from refqsr_engine.training import textures as tx
from refqsr_engine.training.dtd import DTDDataset, dtd_classes, random_crop
from refqsr_engine.training.train_clust import (
    BNClustNet,
    ClustTrainConfig,
    make_optimizer,
    train_clust,
    train_step,
)

# --------------------------------------------------------------------------- textures


def test_families_render_shape_dtype_and_are_deterministic() -> None:
    fams = tx.TEXTURE_FAMILIES
    assert len(fams) >= 24 and len(set(tx.FAMILY_NAMES)) == len(fams)
    for fi, fam in enumerate(fams):
        for size in (17, 48, 96):
            a = tx.render_texture(fi, np.random.default_rng((3, fi)), size)
            b = tx.render_texture(fam.name, np.random.default_rng((3, fi)), size)
            c = tx.render_texture(fi, np.random.default_rng((4, fi)), size)
            assert a.shape == (size, size, 3) and a.dtype == np.uint8, fam.name
            np.testing.assert_array_equal(a, b)
            assert not np.array_equal(a, c), fam.name
        assert a.std() > 3.0, f"{fam.name} renders a flat image"


def test_render_speed_96px() -> None:
    times = []
    for fi in range(len(tx.TEXTURE_FAMILIES)):
        best = np.inf
        for k in range(3):
            t0 = time.perf_counter()
            tx.render_texture(fi, np.random.default_rng((fi, k)), 96)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    assert np.mean(times) < 0.010, f"mean {1e3 * np.mean(times):.2f} ms per 96x96 sample"
    assert max(times) < 0.025, f"slowest family {tx.FAMILY_NAMES[int(np.argmax(times))]}: {1e3 * max(times):.1f} ms"


def test_class_bands_partition_family_ranges() -> None:
    f = len(tx.TEXTURE_FAMILIES)
    specs = [tx.class_spec(c, 47) for c in range(47)]
    assert {s[0] for s in specs} == set(range(f))  # every family used
    assert len(set(specs)) == 47  # (family, band) unique per class
    for fam in range(f):
        mine = sorted(s[1] for s in specs if s[0] == fam)
        n = specs[fam][2]
        assert mine == list(range(n)) and all(s[2] == n for s in specs if s[0] == fam)
        ranges = [tx.band_period_range(tx.TEXTURE_FAMILIES[fam], b, n) for b in range(n)]
        assert ranges[0][0] == pytest.approx(tx.TEXTURE_FAMILIES[fam].period[0])
        assert ranges[-1][1] == pytest.approx(tx.TEXTURE_FAMILIES[fam].period[1])
        for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
            assert hi == pytest.approx(lo)
    names = tx.class_names(47)
    assert len(set(names)) == 47 and names[0] == "stripes-1of2" and names[f] == "stripes-2of2"
    assert tx.class_names(10) == list(tx.FAMILY_NAMES[:10])


def test_dataset_determinism_labels_and_batches() -> None:
    ds = tx.TextureDataset(num_classes=47, size=40, samples_per_class=3, seed=5)
    assert len(ds) == 141 and ds.label(50) == 3
    x, y = ds[50]
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and y == 3
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    np.testing.assert_array_equal(tx.TextureDataset(47, 40, 3, seed=5).render(50), ds.render(50))
    assert not np.array_equal(tx.TextureDataset(47, 40, 3, seed=6).render(50), ds.render(50))
    xb, yb = ds.batch([0, 1, 2, 47, 10**12], size=24)
    assert xb.shape == (5, 3, 24, 24) and yb.tolist() == [0, 1, 2, 0, 10**12 % 47]
    with pytest.raises(IndexError):
        ds[141]
    with pytest.raises(RefQSRError):
        tx.TextureDataset(num_classes=1)


def _features(img: np.ndarray) -> np.ndarray:
    """Colour-free texture statistics: radial power spectrum, gradient anisotropy, grey quantiles."""
    g = img.astype(np.float64).mean(2)
    g = (g - g.mean()) / (g.std() + 1e-6)
    n = g.shape[0]
    p = np.abs(np.fft.fftshift(np.fft.fft2(g))) ** 2
    yy, xx = np.mgrid[:n, :n] - n // 2
    r = np.hypot(xx, yy)
    edges = [0, 2, 4, 6, 9, 13, 18, n]
    spec = np.array([p[(r >= a) & (r < b)].sum() for a, b in zip(edges[:-1], edges[1:])])
    spec = np.log(spec / spec.sum() + 1e-9)
    gx, gy = np.diff(g, axis=1)[:-1], np.diff(g, axis=0)[:, :-1]
    m = np.hypot(gx, gy)
    ang = 2 * np.arctan2(gy, gx)
    aniso = np.hypot((m * np.cos(ang)).sum(), (m * np.sin(ang)).sum()) / m.sum()
    return np.concatenate([spec, [aniso, m.mean(), (m > 1).mean()], np.percentile(g, [5, 25, 50, 75, 95])])


def test_families_are_statistically_distinguishable() -> None:
    k = len(tx.TEXTURE_FAMILIES)
    train, test = tx.TextureDataset(k, size=48, seed=1), tx.TextureDataset(k, size=48, seed=2)
    xtr = np.array([_features(train.render(i)) for i in range(k * 8)])
    xte = np.array([_features(test.render(i)) for i in range(k * 3)])
    ytr, yte = np.arange(k * 8) % k, np.arange(k * 3) % k
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-9
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    means = np.stack([xtr[ytr == c].mean(0) for c in range(k)])
    pred = np.argmin(((xte[:, None] - means[None]) ** 2).sum(-1), axis=1)
    acc = float((pred == yte).mean())
    assert acc > 5.0 / k, f"nearest-class-mean accuracy {acc:.3f} (chance {1 / k:.3f})"
    # and the per-class mean images differ: no two families share their mean feature vector
    d = np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1)) + np.eye(k) * 1e9
    assert d.min() > 0.3


# --------------------------------------------------------------------------- DTD loader


def _fake_dtd(root: Path) -> Path:
    rng = np.random.default_rng(0)
    sizes = {"banded": [(90, 120), (100, 80), (64, 64)], "zigzagged": [(30, 40), (120, 90)], "dotted": [(80, 80)] * 3}
    for cls, shapes in sizes.items():
        d = root / "images" / cls
        d.mkdir(parents=True)
        for k, (h, w) in enumerate(shapes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{cls}_{k:04d}.jpg", quality=95)
    (root / "images" / "empty").mkdir()
    (root / "labels").mkdir()
    return root


def test_dtd_loader_on_fake_folder(tmp_path: Path) -> None:
    root = _fake_dtd(tmp_path / "dtd")
    assert dtd_classes(root) == ["banded", "dotted", "zigzagged"]
    assert dtd_classes(root / "images") == ["banded", "dotted", "zigzagged"]
    ds = DTDDataset(root, size=48, split="all", seed=3, repeat=2)
    assert ds.num_classes == 3 and ds.n_images == 8 and len(ds) == 16
    assert [ds.label(i) for i in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y == ds.label(i)
    small = ds.files.index(root / "images" / "zigzagged" / "zigzagged_0000.jpg")  # 40x30 < 48: resized
    assert ds.render(small).shape == (48, 48, 3)
    np.testing.assert_array_equal(ds.render(1), DTDDataset(root, size=48, split="all", seed=3).render(1))
    assert not np.array_equal(ds.render(1), DTDDataset(root, size=48, split="all", seed=4).render(1))
    xb, yb = ds.batch([0, 3, 7], size=32)
    assert xb.shape == (3, 3, 32, 32) and yb.tolist() == [0, 1, 2]
    # a crop without rescaling is an exact window of the image
    img = np.asarray(Image.open(ds.files[0]).convert("RGB"))
    crop = random_crop(img, 20, np.random.default_rng(0))
    hits = [
        (t, l)
        for t in range(img.shape[0] - 19)
        for l in range(img.shape[1] - 19)
        if np.array_equal(img[t : t + 20, l : l + 20], crop)
    ]
    assert hits
    # split: every 2nd image of a class held out with val_fraction 0.5
    tr, va = DTDDataset(root, split="train", val_fraction=0.5), DTDDataset(root, split="val", val_fraction=0.5)
    assert tr.n_images + va.n_images == 8 and not set(tr.files) & set(va.files)
    with pytest.raises(RefQSRError):
        DTDDataset(tmp_path / "missing")
    with pytest.raises(RefQSRError):
        DTDDataset(root, split="test")


# --------------------------------------------------------------------------- train_clust


def _fixed_batch(n: int = 16, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return tx.TextureDataset(8, size=size, seed=11).batch(range(n))


@pytest.mark.parametrize("bn", [True, False])
def test_one_step_lowers_loss_on_fixed_batch(bn: bool) -> None:
    torch.manual_seed(0)
    x, y = _fixed_batch()
    net = BNClustNet(8) if bn else ClustBlock(8)
    opt = make_optimizer(net, lr=1e-3)
    before, _ = train_step(net, opt, x, y)
    after, _ = train_step(net, opt, x, y)  # loss of the updated weights (returned before its own update)
    assert after < before - 1e-4, (before, after)


def test_bn_twin_folds_exactly_into_clustblock() -> None:
    torch.manual_seed(1)
    net = BNClustNet(8)
    with torch.no_grad():
        for bn in net.bns:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
    net.train()
    for size in (24, 40):  # give the BNs non-trivial running statistics
        net(_fixed_batch(8, size)[0])
    net.eval()
    cb = net.fold_into()
    x = _fixed_batch(6, 36)[0]
    with torch.no_grad():
        torch.testing.assert_close(cb(x, quantized=False), net(x), rtol=1e-4, atol=1e-4)


def _tiny_cfg(out: Path, steps: int, **kw) -> ClustTrainConfig:
    base = dict(
        out=str(out),
        classes=5,
        steps=steps,
        batch=4,
        sizes=(24, 30),
        val_per_class=1,
        val_every=2,
        log_every=1,
        ckpt_every=1,
        calib_samples=8,
        warmup=1,
        quiet=True,
        threads=1,
    )
    base.update(kw)
    return ClustTrainConfig(**base)


def _log_steps(out: Path) -> list[int]:
    with (out / "log.csv").open() as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_train_resume_continues_and_matches_uninterrupted(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    card_a = train_clust(_tiny_cfg(straight, 4))
    train_clust(_tiny_cfg(resumed, 2))
    assert torch.load(resumed / "last.pt", weights_only=False)["step"] == 2
    card_b = train_clust(_tiny_cfg(resumed, 4))
    assert card_b["resumed_from_step"] == 2 and card_b["steps"] == 4 and card_a["steps"] == 4
    assert _log_steps(resumed) == [1, 2, 3, 4] == _log_steps(straight)
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    model, card = load_model(resumed / "clustblock.pt")
    assert isinstance(model, ClustBlock) and bool(model.calibrated) and card["classes"] == 5
    assert 0.0 <= card["val_acc_int8"] <= 1.0 and card["val_acc_fp"] == card["val_acc_trained_net"]
    # a different setting cannot silently resume the run
    with pytest.raises(RefQSRError, match="different settings"):
        train_clust(_tiny_cfg(resumed, 5, batch=8))


def test_train_on_fake_dtd(tmp_path: Path) -> None:
    root = _fake_dtd(tmp_path / "dtd")
    card = train_clust(_tiny_cfg(tmp_path / "run", 2, classes=None, dtd=str(root), sizes=(32,)))
    assert card["classes"] == 3 and card["class_names"] == ["banded", "dotted", "zigzagged"]
    with pytest.raises(RefQSRError, match="does not match"):
        train_clust(_tiny_cfg(tmp_path / "run2", 1, classes=47, dtd=str(root)))
