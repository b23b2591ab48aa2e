"""Training data and the resumable FP trainer (training/datasets.py, prepare.py, train_fp.py).

Crops are checked against the whole-image arrays (exact slices of HR and of the whole-image
bicubic LR) and against an independent re-degradation of the HR crop (MATLAB bicubic away from
the crop border, where the kernel does not see outside the crop). The trainer is checked to
resume exactly: 2 + 2 steps (also after a SIGKILL) log the same losses as 4 uninterrupted steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from refqsr_engine.errors import RefQSRError
from refqsr_engine.metrics import bicubic_degrade
from refqsr_engine.training.datasets import (
    HRFolderDataset,
    PairedFolder,
    StepBatchSampler,
    dihedral,
    div2k_layout,
    find_images,
    load_rgb,
)
from refqsr_engine.training.loop import TrainConfig, train
from refqsr_engine.training.runlog import read_log
from skimage import data as skdata

SCALE = 4
# MATLAB bicubic x1/4 with antialiasing: kernel width 4 * 4 = 16 HR px, i.e. +-2 LR px plus one
# for the half-pixel grid; 3 LR px from a crop edge the LR value only depends on pixels inside.
BORDER = 3


# --------------------------------------------------------------------------- fixtures


def _synthetic(h: int, w: int, seed: int) -> np.ndarray:
    """Textured colour image: smooth waves + edges + noise (all 0..255)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    planes = [
        127 + 60 * np.sin(yy / (7 + 3 * c) + c) * np.cos(xx / (11 + c) - c) + 40 * ((xx + 2 * yy + 30 * c) % 64 < 32)
        for c in range(3)
    ]
    img = np.stack(planes, axis=2) + rng.normal(0, 10, (h, w, 3))
    return np.clip(img, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of HR images: synthetic (odd sizes), skimage photos, gray, RGBA, a nested one, a tiny one."""
    root = tmp_path_factory.mktemp("hr")
    Image.fromarray(_synthetic(263, 301, 0)).save(root / "synth_a.png")
    Image.fromarray(_synthetic(207, 250, 1)).save(root / "synth_b.bmp")
    Image.fromarray(skdata.chelsea()).save(root / "chelsea.png")
    Image.fromarray(skdata.camera()).save(root / "gray_camera.png")  # mode L
    rgba = np.dstack([skdata.astronaut()[:300, :260], np.linspace(0, 255, 260, dtype=np.uint8)[None].repeat(300, 0)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba_astronaut.png")
    (root / "nested").mkdir()
    Image.fromarray(skdata.coffee()[:260, :330]).save(root / "nested" / "coffee.PNG")
    Image.fromarray(_synthetic(60, 90, 2)).save(root / "tiny.png")  # smaller than every HR patch
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def div2k_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIV2K layout: DIV2K_train_HR/000N.png + DIV2K_train_LR_bicubic/X4/000Nx4.png (bicubic_degrade)."""
    root = tmp_path_factory.mktemp("div2k")
    hr_dir, lr_dir = root / "DIV2K_train_HR", root / "DIV2K_train_LR_bicubic" / "X4"
    hr_dir.mkdir()
    lr_dir.mkdir(parents=True)
    for i, img in enumerate([_synthetic(240, 280, 5), skdata.rocket()[:300, :400], _synthetic(220, 200, 6)], 1):
        Image.fromarray(img).save(hr_dir / f"{i:04d}.png")
        Image.fromarray(bicubic_degrade(img, SCALE)).save(lr_dir / f"{i:04d}x4.png")
    return root


def _np(t: torch.Tensor) -> np.ndarray:
    """3xHxW float [0,1] -> HxWx3 uint8 (exact for values that came from uint8)."""
    return (t.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def _dataset(root: Path, **kw) -> HRFolderDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HRFolderDataset(root, **kw)


# --------------------------------------------------------------------------- files and images


def test_find_images_recursive_sorted_and_filtered(hr_folder: Path) -> None:
    names = [p.relative_to(hr_folder).as_posix() for p in find_images(hr_folder)]
    assert names == sorted(names)
    assert "nested/coffee.PNG" in names and "synth_b.bmp" in names
    assert "notes.txt" not in names and len(names) == 7


def test_find_images_errors(tmp_path: Path) -> None:
    with pytest.raises(RefQSRError, match="no images"):
        find_images(tmp_path)
    with pytest.raises(RefQSRError, match="not found"):
        find_images(tmp_path / "missing")


def test_load_rgb_modes(hr_folder: Path, tmp_path: Path) -> None:
    gray = load_rgb(hr_folder / "gray_camera.png")
    assert gray.shape == (512, 512, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], skdata.camera()) and np.array_equal(gray[..., 0], gray[..., 2])
    rgba = load_rgb(hr_folder / "rgba_astronaut.png")
    assert np.array_equal(rgba, skdata.astronaut()[:300, :260])  # alpha dropped, colour untouched
    sixteen = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    g16 = load_rgb(tmp_path / "g16.png")
    assert g16.shape == (64, 64, 3)
    assert np.abs(g16[..., 1].astype(int) - np.round(sixteen / 257.0)).max() <= 1
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(RefQSRError, match="cannot read"):
        load_rgb(tmp_path / "bad.png")


def test_dihedral_covers_the_8_transforms() -> None:
    x = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    outs = {
        dihedral(x, h, v, t).tobytes() + bytes(dihedral(x, h, v, t).shape)
        for h in (0, 1)
        for v in (0, 1)
        for t in (0, 1)
    }
    assert len(outs) == 8
    assert np.array_equal(dihedral(x, True, True, False), np.rot90(x, 2))


# --------------------------------------------------------------------------- training crops


@pytest.mark.parametrize("lr_patch", [48, 24])
def test_crop_shapes_dtype_range(hr_folder: Path, lr_patch: int) -> None:
    ds = _dataset(hr_folder, lr_patch=lr_patch, repeat=2)
    assert len(ds) == 2 * ds.n_images
    for i in range(len(ds)):
        s = ds[i]
        assert s["lr"].shape == (3, lr_patch, lr_patch) and s["hr"].shape == (3, 4 * lr_patch, 4 * lr_patch)
        assert s["lr"].dtype == torch.float32 and s["hr"].dtype == torch.float32
        assert 0.0 <= float(s["lr"].min()) and float(s["hr"].max()) <= 1.0


def test_small_images_skipped_with_warning(hr_folder: Path) -> None:
    with pytest.warns(UserWarning, match="tiny.png"):
        ds = HRFolderDataset(hr_folder, lr_patch=48)
    assert "tiny.png" not in [p.name for p in ds.hr_files] and ds.n_images == 6
    with pytest.raises(RefQSRError, match="at least"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        HRFolderDataset(hr_folder, lr_patch=200)


def test_crop_is_exact_slice_of_whole_image_pair(hr_folder: Path) -> None:
    """HR crop == HR[region]; LR crop == bicubic_degrade(whole HR)[region / 4] (exactly)."""
    ds = _dataset(hr_folder, lr_patch=24, augment=False, repeat=4)
    for i in range(len(ds)):
        p = ds.crop_params(i)
        hr_whole = load_rgb(ds.hr_files[p["image"]])
        hr_whole = hr_whole[: hr_whole.shape[0] // 4 * 4, : hr_whole.shape[1] // 4 * 4]
        lr_whole = bicubic_degrade(hr_whole, SCALE)
        s = ds[i]
        t, l = p["top"], p["left"]
        assert np.array_equal(_np(s["hr"]), hr_whole[4 * t : 4 * (t + 24), 4 * l : 4 * (l + 24)])
        assert np.array_equal(_np(s["lr"]), lr_whole[t : t + 24, l : l + 24])


def test_lr_is_bicubic_of_hr_crop_away_from_border(hr_folder: Path) -> None:
    """Independent alignment check, with flips/rotations on: degrading the HR crop gives the LR crop
    inside (bicubic commutes with the dihedral transforms on a x4 grid)."""
    ds = _dataset(hr_folder, lr_patch=24, repeat=3, seed=7)
    transforms = set()
    for i in range(len(ds)):
        p = ds.crop_params(i)
        transforms.add((p["hflip"], p["vflip"], p["transpose"]))
        s = ds[i]
        lr, hr = _np(s["lr"]).astype(int), _np(s["hr"])
        redo = bicubic_degrade(hr, SCALE).astype(int)
        inner = (slice(BORDER, -BORDER), slice(BORDER, -BORDER))
        diff = np.abs(redo[inner] - lr[inner])
        assert diff.max() <= 1 and diff.mean() < 0.02, (i, diff.max(), diff.mean())
    assert len(transforms) >= 6  # the augmentations are actually drawn


def test_flips_rotations_applied_identically(hr_folder: Path) -> None:
    plain = _dataset(hr_folder, lr_patch=24, augment=False, repeat=3, seed=3)
    aug = _dataset(hr_folder, lr_patch=24, augment=True, repeat=3, seed=3)
    seen = set()
    for i in range(len(aug)):
        pa, pp = aug.crop_params(i), plain.crop_params(i)
        assert (pa["image"], pa["top"], pa["left"]) == (pp["image"], pp["top"], pp["left"])
        flips = (pa["hflip"], pa["vflip"], pa["transpose"])
        seen.add(flips)
        a, p = aug[i], plain[i]
        assert np.array_equal(_np(a["lr"]), dihedral(_np(p["lr"]), *flips))
        assert np.array_equal(_np(a["hr"]), dihedral(_np(p["hr"]), *flips))
    assert len(seen) >= 6


def test_determinism_under_seed_epoch_index(hr_folder: Path) -> None:
    a = _dataset(hr_folder, lr_patch=24, seed=11, repeat=2)
    b = _dataset(hr_folder, lr_patch=24, seed=11, repeat=2, cache=False)
    c = _dataset(hr_folder, lr_patch=24, seed=12, repeat=2)
    order = list(range(len(a)))
    first = {i: a[(1, i)] for i in order}
    for i in reversed(order):  # other access order, no cache
        sb = b[(1, i)]
        assert torch.equal(first[i]["lr"], sb["lr"]) and torch.equal(first[i]["hr"], sb["hr"])
    assert any(not torch.equal(first[i]["hr"], c[(1, i)]["hr"]) for i in order)
    assert any(not torch.equal(first[i]["hr"], a[(2, i)]["hr"]) for i in order)  # epochs differ
    a.set_epoch(1)
    assert torch.equal(a[0]["hr"], first[0]["hr"])
    import pickle

    clone = pickle.loads(pickle.dumps(a))  # what a "spawn" DataLoader worker receives
    assert torch.equal(clone[(1, 3)]["lr"], first[3]["lr"])


def test_div2k_layout_lr_files_match_computed_lr(hr_folder: Path, div2k_root: Path) -> None:
    hr_dir, lr_dir = div2k_layout(div2k_root)
    assert hr_dir.name == "DIV2K_train_HR" and lr_dir is not None and lr_dir.name == "X4"
    with_files = HRFolderDataset(hr_dir, lr_patch=24, lr_root=lr_dir, repeat=3, seed=4)
    # the LR_bicubic parent is accepted too
    parent = HRFolderDataset(hr_dir, lr_patch=24, lr_root=lr_dir.parent, repeat=3, seed=4)
    computed = HRFolderDataset(hr_dir, lr_patch=24, repeat=3, seed=4)
    for i in range(len(computed)):
        for other in (with_files, parent):
            assert torch.equal(other[i]["lr"], computed[i]["lr"]) and torch.equal(other[i]["hr"], computed[i]["hr"])
    with pytest.raises(RefQSRError, match="DIV2K"):
        div2k_layout(hr_folder)


def test_lr_folder_errors(div2k_root: Path, tmp_path: Path) -> None:
    hr_dir, _ = div2k_layout(div2k_root)
    lr_dir = tmp_path / "X4"
    lr_dir.mkdir()
    img = load_rgb(hr_dir / "0001.png")
    Image.fromarray(bicubic_degrade(img, SCALE)).save(lr_dir / "0001x4.png")
    with pytest.raises(RefQSRError, match="no LR image for 0002"):
        HRFolderDataset(hr_dir, lr_patch=24, lr_root=lr_dir)
    for name in ("0002", "0003"):
        Image.fromarray(load_rgb(hr_dir / f"{name}.png")[:100, :100]).save(lr_dir / f"{name}x4.png")
    ds = HRFolderDataset(hr_dir, lr_patch=24, lr_root=lr_dir)
    with pytest.raises(RefQSRError, match="expected the LR"):
        ds.pair(1)


def test_step_batch_sampler_resumes_the_same_stream() -> None:
    full = StepBatchSampler(n=10, batch=4, seed=3, steps=12)
    batches = list(full)
    assert len(batches) == 12 and all(len(b) == 4 for b in batches)
    assert list(StepBatchSampler(n=10, batch=4, seed=3, start_step=5, steps=7)) == batches[5:]
    keys = [k for b in batches for k in b]
    for epoch in range(4):  # 48 samples = 4 whole epochs + 8: every epoch is a permutation
        idx = [i for e, i in keys if e == epoch]
        assert sorted(idx) == list(range(10))


# --------------------------------------------------------------------------- test pairs


def test_paired_folder(hr_folder: Path, div2k_root: Path) -> None:
    pf = PairedFolder(hr_folder, center_crop=130)
    assert len(pf) == 7 and pf.names()[0] == "chelsea"
    for pair in pf:
        assert pair.hr.shape[0] == 4 * pair.lr.shape[0] and pair.hr.shape[1] == 4 * pair.lr.shape[1]
        assert max(pair.hr.shape[:2]) <= 128 and pair.hr.shape[2] == 3
        assert np.array_equal(pair.lr, bicubic_degrade(pair.hr, SCALE))
    whole = PairedFolder(hr_folder)
    full = whole[whole.names().index("synth_a")]
    assert full.name == "synth_a" and full.hr.shape == (260, 300, 3)  # cropped to multiples of 4
    hr_dir, lr_dir = div2k_layout(div2k_root)
    given = PairedFolder(hr_dir, lr_dir=lr_dir, center_crop=96)
    made = PairedFolder(hr_dir, center_crop=96)
    for g in given:
        assert g.hr.shape == (96, 96, 3) and g.lr.shape == (24, 24, 3)
    whole_given, whole_made = PairedFolder(hr_dir, lr_dir=lr_dir), PairedFolder(hr_dir)
    for i in range(len(made)):
        assert np.array_equal(whole_given[i].lr, whole_made[i].lr)
        assert np.array_equal(whole_given[i].hr, whole_made[i].hr)
        # the LR of a centre crop taken from the given LR is the matching slice
        t = (whole_made[i].lr.shape[0] - 24) // 2
        l_ = (whole_made[i].lr.shape[1] - 24) // 2
        assert np.array_equal(given[i].lr, whole_made[i].lr[t : t + 24, l_ : l_ + 24])


# --------------------------------------------------------------------------- prepare


def test_prepare_builds_train_and_val(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from refqsr_engine.training import prepare as prep

    monkeypatch.setattr(prep, "SKIMAGE_NAMES", ("astronaut", "coffee", "chelsea", "cat", "camera", "text"))
    mate = tmp_path / "mate" / "nature"
    mate.mkdir(parents=True)
    big = _synthetic(600, 1200, 3)
    Image.fromarray(big).save(mate / "Dune.jpg", quality=95)
    Image.fromarray(big[::2, ::2]).save(mate / "Wave.png")
    Image.fromarray(_synthetic(1200, 2400, 4)).save(mate / "Wave_2400x1200.png")  # same wallpaper, larger
    Image.fromarray(np.full((300, 400, 4), 255, np.uint8), "RGBA").save(mate / "Flat.png")
    out = tmp_path / "out"
    lines: list[str] = []
    m = prep.prepare(
        out,
        mate_dir=tmp_path / "mate",
        max_side=512,
        log=lines.append,
        use_test=False,
        use_hicontrast=False,
        val_names=("skimage_astronaut", "skimage_coffee", "mate_nature_Dune"),
    )
    val = sorted(p.stem for p in (out / "val").glob("*.png"))
    train_ = sorted(p.stem for p in (out / "train").glob("*.png"))
    assert val == ["mate_nature_Dune", "skimage_astronaut", "skimage_coffee"]
    assert train_ == ["mate_nature_Wave", "skimage_camera", "skimage_chelsea"]  # cat == chelsea; text too small
    wave = next(r for r in m["images"] if r["name"] == "mate_nature_Wave")
    assert wave["origin"].endswith("Wave_2400x1200.png") and wave["hw"] == [256, 512]
    for p in (out / "train").glob("*.png"):
        with Image.open(p) as im:
            assert im.mode == "RGB" and max(im.size) <= 512
    skipped = {s["name"]: s["why"] for s in m["skipped"]}
    assert "nearly flat" in skipped["mate_nature_Flat"] and "duplicate" in skipped["skimage_cat"]
    assert "too small" in skipped["skimage_text"]
    assert not list((out / "test").glob("*.png")) and m["n_test"] == 0  # --no-test
    # without the mate folder (and without apt): skimage only, said so
    monkeypatch.setattr(prep, "fetch_mate", lambda dest: None)
    monkeypatch.setattr(prep, "fetch_test", lambda dest: None)
    lines.clear()
    m2 = prep.prepare(
        tmp_path / "out2",
        mate_dir=tmp_path / "nowhere",
        max_side=512,
        log=lines.append,
        test_dir=tmp_path / "nowhere",
        use_hicontrast=False,
    )
    assert all(r["origin"].startswith("skimage") for r in m2["images"])
    assert any("scikit-image images only" in s for s in lines)
    assert any("no test split" in s for s in lines)


def test_prepare_puts_the_test_package_in_test_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every photo of the test package lands in test/ (downscaled like the rest), none in train/
    or val/; a copy of a training image is left out as a duplicate; a rerun without the test
    package removes the stale test images."""
    from refqsr_engine.training import prepare as prep

    monkeypatch.setattr(prep, "SKIMAGE_NAMES", ("astronaut", "chelsea"))
    lomiri = tmp_path / "lomiri"
    (lomiri / "contest").mkdir(parents=True)
    Image.fromarray(_synthetic(700, 1400, 5)).save(lomiri / "Bridge_by_Someone.jpg", quality=95)
    Image.fromarray(_synthetic(400, 600, 6)).save(lomiri / "sunset.png")
    Image.fromarray(skdata.chelsea()).save(lomiri / "cat_copy.png")  # already a training image
    Image.fromarray(_synthetic(400, 600, 7)).save(lomiri / "contest" / "nested.png")  # not the package's top level
    out = tmp_path / "out"
    m = prep.prepare(
        out,
        mate_dir=None,
        use_mate=False,
        max_side=512,
        log=lambda s: None,
        test_dir=lomiri,
        use_hicontrast=False,
        val_names=("skimage_astronaut",),
    )
    assert sorted(p.stem for p in (out / "test").glob("*.png")) == ["test_Bridge_by_Someone", "test_sunset"]
    assert sorted(p.stem for p in (out / "train").glob("*.png")) == ["skimage_chelsea"]
    assert sorted(p.stem for p in (out / "val").glob("*.png")) == ["skimage_astronaut"]
    assert (
        m["n_test"] == 2
        and "duplicate of skimage_chelsea" in {s["name"]: s["why"] for s in m["skipped"]}["test_cat_copy"]
    )
    bridge = next(r for r in m["images"] if r["name"] == "test_Bridge_by_Someone")
    assert (
        bridge["split"] == "test" and bridge["hw"] == [256, 512] and bridge["origin"].endswith("Bridge_by_Someone.jpg")
    )
    m2 = prep.prepare(
        out,
        mate_dir=None,
        use_mate=False,
        max_side=512,
        log=lambda s: None,
        use_test=False,
        use_hicontrast=False,
        val_names=("skimage_astronaut",),
    )
    assert m2["n_test"] == 0 and not list((out / "test").glob("*.png"))


# --------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trainset")
    (root / "train").mkdir()
    (root / "val").mkdir()
    Image.fromarray(_synthetic(200, 232, 0)).save(root / "train" / "a.png")
    Image.fromarray(skdata.chelsea()).save(root / "train" / "b.png")
    Image.fromarray(skdata.camera()[:220, :200]).save(root / "train" / "c.png")
    Image.fromarray(skdata.coffee()[100:180, 200:300]).save(root / "val" / "v1.png")
    Image.fromarray(_synthetic(72, 64, 9)).save(root / "val" / "v2.png")
    return root


def _cfg(data: Path, out: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        out=str(out),
        steps=steps,
        batch=2,
        lr_patch=24,
        val_every=2,
        ckpt_every=1,
        val_crop=64,
        threads=1,
        quiet=True,
    )


def _losses(out: Path) -> list[tuple[int, str]]:
    return [(int(r["step"]), r["loss"]) for r in read_log(out / "log.csv")]


def test_trainer_resumes_exactly(train_data: Path, tmp_path: Path) -> None:
    messages: list[str] = []
    run = tmp_path / "run"
    r1 = train(_cfg(train_data, run, 2), log=messages.append)
    assert r1["step"] == 2 and len(read_log(run / "log.csv")) == 2
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 2
    r2 = train(_cfg(train_data, run, 4), log=messages.append)
    assert r2["step"] == 4 and any("resuming" in m and "from step 2" in m for m in messages)
    rows = read_log(run / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert rows[1]["val_psnr"] and rows[3]["val_psnr"] and not rows[0]["val_psnr"]
    assert float(rows[3]["seconds"]) >= float(rows[1]["seconds"])
    # an uninterrupted 4-step run logs the very same losses: same batches, same optimizer state
    straight = tmp_path / "straight"
    train(_cfg(train_data, straight, 4), log=lambda s: None)
    assert _losses(straight) == _losses(run)
    # best.pt is a model file (fp16 weights) that load_model rebuilds; the card says what it is
    from refqsr_engine.models.checkpoint import load_model

    payload = torch.load(run / "best.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    model, card_in_file = load_model(run / "best.pt")
    assert model.n_blocks == 16 and card_in_file["steps"] in (2, 4)
    import json

    card = json.loads((run / "best.json").read_text())
    assert card["steps"] in (2, 4) and card["bicubic_psnr_y"] > 20 and card["data"]["n_train_images"] == 3
    # the card names the data from the data folder on, never by the machine's absolute path
    name = train_data.name
    assert (card["data"]["train_hr"], card["data"]["val"]) == (f"{name}/train", f"{name}/val")
    assert card["device"].startswith("cpu (")


def test_trainer_resumes_after_kill(train_data: Path, tmp_path: Path) -> None:
    """SIGKILL a training process mid-run; the restart continues from its last checkpoint."""
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "refqsr_engine.training.train_fp",
        "--data",
        str(train_data),
        "--out",
        str(run),
        "--steps",
        "1000",
        "--batch",
        "2",
        "--lr-patch",
        "24",
        "--val-every",
        "1000",
        "--val-crop",
        "64",
        "--ckpt-every",
        "2",
        "--threads",
        "1",
        "--quiet",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 40
        while time.time() < deadline and len(read_log(run / "log.csv")) < 3:
            time.sleep(0.1)
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert len(read_log(run / "log.csv")) >= 3, "the training process made no progress"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = torch.load(run / "last.pt", weights_only=False)["step"]
    assert done >= 2 and done % 2 == 0
    messages: list[str] = []
    train(_cfg(train_data, run, done + 2), log=messages.append)
    assert any(f"from step {done}" in m for m in messages)
    steps = [s for s, _ in _losses(run)]
    assert steps == list(range(1, done + 3))  # rows past the checkpoint were dropped, none repeated
    assert torch.load(run / "last.pt", weights_only=False)["step"] == done + 2


def test_trainer_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from refqsr_engine.training.train_fp import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(RefQSRError, match="no images"):
        train(
            TrainConfig(data=str(tmp_path / "empty"), out=str(tmp_path / "o"), steps=1, quiet=True), log=lambda s: None
        )
    for argv, msg in (
        (["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--steps", "1", "--quiet"], "no images"),
        (["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--steps", "1"], "does not exist"),
        (["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--steps", "-3"], "-3"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code != 0 and msg in err and "Traceback" not in err


def test_learning_rate_warmup_ramps_then_halves() -> None:
    from refqsr_engine.training.loop import lr_at

    cfg = TrainConfig(data=".", out=".", steps=10, lr=1e-4, halve_every=6, warmup=4)
    got = [lr_at(cfg, s) for s in range(8)]
    want = [2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4, 5e-5, 5e-5]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert lr_at(TrainConfig(data=".", out=".", steps=1, lr=1e-4), 0) == 1e-4  # no warmup: no ramp


def test_fp_training_continues_from_a_model_file(train_data: Path, tmp_path: Path) -> None:
    from refqsr_engine.models.checkpoint import load_model, save_model
    from refqsr_engine.models.registry import build_sr

    torch.manual_seed(3)
    source = build_sr("srresnet", n_blocks=2, n_feats=16)
    save_model(tmp_path / "src.pt", source, {"task": "fp"}, half=False)
    cfg = _cfg(train_data, tmp_path / "run", 1)
    cfg.init_from, cfg.lr, cfg.warmup = str(tmp_path / "src.pt"), 1e-3, 1000  # first step at 1e-6
    train(cfg, log=lambda s: None)
    trained, card = load_model(tmp_path / "run" / "best.pt")
    assert (trained.n_blocks, trained.sizes()) == (2, source.sizes()) and card["init"] == f"{tmp_path.name}/src.pt"
    for (name, a), b in zip(source.state_dict().items(), trained.state_dict().values()):
        np.testing.assert_allclose(b.float().numpy(), a.numpy(), atol=2e-3, rtol=2e-3, err_msg=name)
    quantized = build_sr("srresnet", "ddtb", (8,), n_blocks=2, n_feats=16)
    save_model(tmp_path / "q.pt", quantized, {"task": "qat"}, half=False)
    cfg = _cfg(train_data, tmp_path / "run_q", 1)
    cfg.init_from = str(tmp_path / "q.pt")
    with pytest.raises(RefQSRError, match="not a full-precision srresnet"):
        train(cfg, log=lambda s: None)
