"""The high-contrast evaluation set: renderings, wallpaper split, busiest crop, and prepare's folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from refqsr_engine.training import hicontrast


@pytest.mark.parametrize("kind", hicontrast.KINDS)
def test_renderings_are_sharp_deterministic_and_seeded(kind: str) -> None:
    a = hicontrast.synthetic_image(kind, 0, 128)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, hicontrast.synthetic_image(kind, 0, 128))
    assert not np.array_equal(a, hicontrast.synthetic_image(kind, 1, 128))
    # high contrast: some neighbours differ by a large step (numpy, independent of edge_energy)
    g = a.astype(np.int32).mean(axis=2)
    steps = np.abs(np.diff(g, axis=1))
    assert steps.max() >= 64


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        hicontrast.synthetic_image("clouds", 0)


def test_busiest_crop_finds_the_window_with_the_edges() -> None:
    img = np.full((200, 300, 3), 128, np.uint8)
    img[120:180, 200:260:2] = 255  # stripes: the only edges
    crop = hicontrast.busiest_crop(img, size=96, step=4)
    assert crop.shape == (96, 96, 3)

    # brute force over the same windows: the crop's edge count is the maximum
    def edges(a: np.ndarray) -> int:
        return int((np.abs(np.diff(a.astype(int).mean(axis=2), axis=1)) > 50).sum())

    best = max(edges(img[y : y + 96, x : x + 96]) for y in range(0, 105, 4) for x in range(0, 205, 4))
    assert edges(crop) == best > 0
    small = hicontrast.busiest_crop(img[:50, :60], size=96)
    assert small.shape == (50, 60, 3)


def test_wallpaper_designs_stay_on_one_side() -> None:
    assert hicontrast.wallpaper_design(Path("pixels-l.webp")) == hicontrast.wallpaper_design(Path("pixels-d.webp"))
    assert hicontrast.is_eval_wallpaper(Path("truchet-d.webp")) and hicontrast.is_eval_wallpaper(Path("city.png"))
    assert not hicontrast.is_eval_wallpaper(Path("grid-l.webp"))
    assert not hicontrast.is_eval_wallpaper(Path("solid-l.webp"))


def test_prepare_writes_the_set_apart_from_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation seeds and chosen wallpapers land in hicontrast/ only; other seeds and sibling
    wallpapers in train/; flat wallpapers are left out; no name is in both folders."""
    from refqsr_engine.training import prepare as prep

    monkeypatch.setattr(prep, "SKIMAGE_NAMES", ("astronaut",))
    monkeypatch.setattr(hicontrast, "SIZE", 96)
    monkeypatch.setattr(hicontrast, "TRAIN_SEEDS", (100,))
    root = tmp_path / "src"
    gnome = root / "gnome-backgrounds" / "usr/share/backgrounds/gnome"
    gnome.mkdir(parents=True)
    checker = (np.indices((400, 400)).sum(axis=0) // 8 % 2 * 255).astype(np.uint8)
    rgb = np.repeat(checker[..., None], 3, axis=2)
    Image.fromarray(rgb).save(gnome / "pixels-l.png")
    Image.fromarray(255 - rgb).save(gnome / "pixels-d.png")
    Image.fromarray(rgb[::-1, ::2].copy()).save(gnome / "grid-l.png")
    Image.fromarray(np.full((400, 400, 3), 90, np.uint8)).save(gnome / "flat-l.png")
    monkeypatch.setattr(prep, "fetch_package", lambda package, subdir, dest: None)  # the other two packages
    out = tmp_path / "out"
    lines: list[str] = []
    m = prep.prepare(
        out,
        use_mate=False,
        use_test=False,
        max_side=512,
        min_side=64,
        log=lines.append,
        hicontrast_dir=root,
        val_names=(),
    )
    hc = sorted(p.stem for p in (out / "hicontrast").glob("*.png"))
    train_ = sorted(p.stem for p in (out / "train").glob("*.png"))
    kinds = hicontrast.KINDS
    assert hc == sorted(["hc_pixels-d", "hc_pixels-l"] + [f"synth_{k}_{s}" for k in kinds for s in (0, 1)])
    assert train_ == sorted(["hc_grid-l", "skimage_astronaut"] + [f"synth_{k}_100" for k in kinds])
    assert not set(hc) & set(train_)
    with Image.open(out / "hicontrast" / "hc_pixels-l.png") as im:
        assert im.size == (96, 96)  # the busiest window, not the whole wallpaper
    assert "few strong edges" in {s["name"]: s["why"] for s in m["skipped"]}["hc_flat-l"]
    assert m["n_hicontrast"] == len(hc)
    assert any("ukui-wallpapers: unavailable" in s for s in lines)


def test_quality_benchmark_takes_a_held_out_set_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from refqsr_engine.benchmarks import valdata

    folder = tmp_path / "data" / "sr" / "hicontrast"
    folder.mkdir(parents=True)
    Image.fromarray(hicontrast.synthetic_image("grid", 0, 64)).save(folder / "g.png")
    monkeypatch.chdir(tmp_path)
    pairs, info = valdata.validation_set("hicontrast")
    assert [p.name for p in pairs] == ["g"] and info["source"] == "data/sr/hicontrast"
    assert pairs[0].hr.shape == (64, 64, 3) and pairs[0].lr.shape == (16, 16, 3)
    from refqsr_engine.errors import RefQSRError

    with pytest.raises(RefQSRError, match="does not exist"):
        valdata.validation_set("nowhere")
