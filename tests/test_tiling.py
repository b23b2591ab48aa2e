"""Tests for pipeline/tiling.py: grid layout, extraction/padding, seamless streaming merge."""

from __future__ import annotations

import numpy as np
import pytest
from refqsr_engine.errors import RefQSRError
from refqsr_engine.pipeline.tiling import PatchGrid, PatchMerger, extract_patches, make_grid

ODD_SIZES = [(1, 1), (5, 7), (71, 73), (97, 200), (181, 321)]
PATCHES = [48, 72, 96]
OVERLAP = 6


def _smooth_image(h: int, w: int, channels: int = 3) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = [np.sin(yy / 17.0 + c) * np.cos(xx / 23.0 - c) for c in range(channels)]
    return np.stack(planes).astype(np.float32)


def _random_image(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((channels, h, w), dtype=np.float32)


def _nearest_x4(x: np.ndarray) -> np.ndarray:
    # works on C x H x W and N x C x H x W: upsample the last two axes
    return np.repeat(np.repeat(x, 4, axis=-2), 4, axis=-1)


def _run(image: np.ndarray, patch: int, overlap: int, scale: int, model) -> np.ndarray:
    grid = make_grid(image.shape[1], image.shape[2], patch, overlap)
    merger = PatchMerger(grid, scale=scale, channels=image.shape[0])
    idx = list(range(grid.num_patches))
    merger.add(idx, model(extract_patches(image, grid)))
    return merger.result()


# ---------------------------------------------------------------- grid layout


@pytest.mark.parametrize(
    "length, patch, overlap, expected",
    [
        (320, 72, 6, (0, 66, 132, 198, 248)),
        (200, 96, 6, (0, 90, 104)),
        (138, 72, 6, (0, 66)),  # 66 == L - P: not duplicated
        (73, 72, 6, (0, 1)),
        (72, 72, 6, (0,)),
        (5, 72, 6, (0,)),
        (1, 48, 0, (0,)),
        (100, 48, 0, (0, 48, 52)),
    ],
)
def test_grid_origins_known_values(length: int, patch: int, overlap: int, expected: tuple) -> None:
    grid = make_grid(length, length, patch, overlap)
    assert grid.ys == expected
    assert grid.xs == expected
    assert grid.num_patches == len(expected) ** 2


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("overlap", [0, 1, 6, 20])
def test_grid_origin_invariants(patch: int, overlap: int) -> None:
    stride = patch - overlap
    for length in range(1, 4 * patch):
        ys = make_grid(length, 1, patch, overlap).ys
        assert ys[0] == 0
        if length <= patch:
            assert ys == (0,)
            continue
        assert ys[-1] == length - patch
        steps = np.diff(ys)
        assert (steps > 0).all() and (steps <= stride).all()
        assert len(ys) == -(-(length - overlap) // stride)  # ceil((L - o) / s) patches


def test_grid_origins_row_major_and_padding() -> None:
    grid = make_grid(10, 150, 72, 6)
    assert grid.ys == (0,) and grid.xs == (0, 66, 78)
    assert grid.origins() == [(0, 0), (0, 66), (0, 78)]
    assert (grid.padded_height, grid.padded_width) == (72, 150)
    tall = make_grid(150, 3, 48, 6)
    assert tall.origins() == [(0, 0), (42, 0), (84, 0), (102, 0)]
    assert (tall.padded_height, tall.padded_width) == (150, 48)


@pytest.mark.parametrize(
    "args",
    [
        (0, 10, 72, 6),  # empty height
        (10, 0, 72, 6),  # empty width
        (10, 10, 7, 0),  # patch too small
        (10, 10, 72, -1),  # negative overlap
        (10, 10, 72, 36),  # overlap == patch / 2
        (10, 10, 48, 30),  # overlap > patch / 2
        (10.5, 10, 72, 6),  # non-integer size
        (10, 10, True, 0),  # bool is not a size
    ],
)
def test_make_grid_rejects_bad_arguments(args: tuple) -> None:
    with pytest.raises(RefQSRError):
        make_grid(*args)


def test_grid_is_frozen() -> None:
    grid = make_grid(100, 100, 48, 6)
    assert isinstance(grid, PatchGrid)
    with pytest.raises(AttributeError):
        grid.patch = 64  # type: ignore[misc]


# ---------------------------------------------------------------- extraction


def test_extract_patches_match_slices() -> None:
    image = _random_image(97, 200)
    grid = make_grid(97, 200, 48, 6)
    patches = extract_patches(image, grid)
    assert patches.shape == (grid.num_patches, 3, 48, 48)
    assert patches.dtype == np.float32
    for k, (y, x) in enumerate(grid.origins()):
        assert np.array_equal(patches[k], image[:, y : y + 48, x : x + 48])
    subset = [7, 0, 3]
    assert np.array_equal(extract_patches(image, grid, subset), patches[subset])
    assert extract_patches(image, grid, []).shape == (0, 3, 48, 48)


def test_extract_pads_small_images_by_reflection() -> None:
    image = _random_image(5, 7)
    patch = extract_patches(image, make_grid(5, 7, 48, 6))[0]
    assert np.array_equal(patch[:, :5, :7], image)
    # rows 5, 6 mirror rows 3, 2 (reflect excludes the edge pixel)
    assert np.array_equal(patch[:, 5, :7], image[:, 3])
    assert np.array_equal(patch[:, 6, :7], image[:, 2])
    assert np.array_equal(patch[:, :5, 7], image[:, :, 5])
    assert np.isfinite(patch).all()


def test_extract_pads_one_pixel_image_with_edge() -> None:
    image = np.array([[[0.25]], [[0.5]]], dtype=np.float32)
    patch = extract_patches(image, make_grid(1, 1, 48, 0))[0]
    assert patch.shape == (2, 48, 48)
    assert (patch[0] == 0.25).all() and (patch[1] == 0.5).all()


def test_extract_rejects_bad_input() -> None:
    grid = make_grid(20, 30, 48, 6)
    with pytest.raises(RefQSRError):
        extract_patches(np.zeros((3, 30, 20), np.float32), grid)
    with pytest.raises(RefQSRError):
        extract_patches(np.zeros((20, 30), np.float32), grid)
    with pytest.raises(RefQSRError):
        extract_patches(np.zeros((3, 20, 30), np.float32), grid, [1])


# ---------------------------------------------------------------- merging


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("patch", PATCHES)
def test_round_trip_identity_scale1(size: tuple[int, int], patch: int) -> None:
    image = _random_image(*size, seed=size[0])
    out = _run(image, patch, OVERLAP, 1, lambda p: p)
    assert out.shape == image.shape and out.dtype == np.float32
    assert np.abs(out - image).max() < 1e-5


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("patch", PATCHES)
def test_round_trip_nearest_x4(size: tuple[int, int], patch: int) -> None:
    image = _random_image(*size, seed=size[1])
    out = _run(image, patch, OVERLAP, 4, _nearest_x4)
    reference = _nearest_x4(image)
    assert out.shape == (3, 4 * size[0], 4 * size[1])
    assert np.abs(out - reference).max() < 1e-5


def test_round_trip_real_photo() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    photo = skimage_data.astronaut()[100:223, 150:337]  # 123 x 187 x 3 uint8
    image = np.ascontiguousarray(photo.transpose(2, 0, 1), dtype=np.float32) / 255.0
    assert image.shape == (3, 123, 187)
    out = _run(image, 72, OVERLAP, 4, _nearest_x4)
    assert np.abs(out - _nearest_x4(image)).max() < 1e-5


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (139, 141), (181, 321), (320, 100)])
@pytest.mark.parametrize("patch", PATCHES)
def test_blend_weights_sum_to_one(size: tuple[int, int], patch: int) -> None:
    # 139 / 141 with P=72 put the shifted last patch 1 / 3 px after the previous one
    ones = np.ones((1, *size), dtype=np.float32)
    out = _run(ones, patch, OVERLAP, 4, _nearest_x4)
    assert out.shape == (1, 4 * size[0], 4 * size[1])
    assert np.abs(out - 1.0).max() < 1e-6


def _offset_model(scale: int, offsets: np.ndarray, indices: list[int]):
    """Nearest x`scale` upsampling plus a different constant per patch (a seam generator)."""

    def model(patches: np.ndarray) -> np.ndarray:
        up = np.repeat(np.repeat(patches, scale, axis=-2), scale, axis=-1)
        return up + offsets[indices][:, None, None, None]

    return model


def _max_neighbour_jump(img: np.ndarray) -> float:
    return max(np.abs(np.diff(img, axis=1)).max(), np.abs(np.diff(img, axis=2)).max())


@pytest.mark.parametrize(
    "size, patch, slack",
    [
        ((181, 321), 72, 1.0),  # regular overlaps plus larger shifted-last-patch overlaps
        ((97, 200), 48, 1.0),
        ((139, 141), 72, 2.0),  # last patch 1-3 px after the previous: 3 patches overlap
    ],
)
def test_no_seams_with_per_patch_offsets(size: tuple[int, int], patch: int, slack: float) -> None:
    scale = 4
    image = _smooth_image(*size)
    grid = make_grid(*size, patch, OVERLAP)
    offsets = np.random.default_rng(1).uniform(-1.0, 1.0, grid.num_patches).astype(np.float32)
    offsets[0], offsets[1] = -1.0, 1.0  # guarantee a large difference between neighbours
    idx = list(range(grid.num_patches))
    merger = PatchMerger(grid, scale=scale, channels=3)
    merger.add(idx, _offset_model(scale, offsets, idx)(extract_patches(image, grid)))
    out = merger.result()

    offset_diff = float(offsets.max() - offsets.min())
    own_gradient = _max_neighbour_jump(_nearest_x4(image))
    shortest_ramp = scale * OVERLAP  # every overlap is at least o LR px wide
    jump = _max_neighbour_jump(out)
    assert jump <= slack * offset_diff / shortest_ramp + own_gradient + 1e-5
    assert jump < 0.15 * offset_diff  # a hard stitch would jump by ~offset_diff
    # sanity: the offsets really reached the output (it is not just the plain upsample)
    assert np.abs(out - _nearest_x4(image)).max() > 0.5


def test_streaming_shuffled_batches_match_single_add() -> None:
    image = _random_image(181, 321, seed=3)
    grid = make_grid(181, 321, 48, OVERLAP)
    patches = _nearest_x4(extract_patches(image, grid))
    whole = PatchMerger(grid, scale=4, channels=3)
    whole.add(range(grid.num_patches), patches)

    order = np.random.default_rng(2).permutation(grid.num_patches)
    streamed = PatchMerger(grid, scale=4, channels=3)
    for batch in np.array_split(order, 7):
        assert not streamed.complete
        # the runtime extracts each batch on demand, in its own order
        streamed.add(batch, _nearest_x4(extract_patches(image, grid, batch)))
    assert streamed.complete
    assert np.allclose(streamed.result(), whole.result(), atol=1e-6, rtol=0)


def test_merger_reports_missing_and_duplicate_patches() -> None:
    grid = make_grid(100, 100, 48, OVERLAP)
    hr = np.zeros((2, 3, 192, 192), np.float32)
    merger = PatchMerger(grid, scale=4, channels=3)
    merger.add([0, 1], hr)
    with pytest.raises(RefQSRError, match="never added"):
        merger.result()
    with pytest.raises(RefQSRError):
        merger.add([1, 2], hr)  # 1 already added
    with pytest.raises(RefQSRError):
        merger.add([2, 2], hr)  # duplicate inside the batch
    with pytest.raises(RefQSRError):
        merger.add([2], hr)  # batch size does not match indices
    with pytest.raises(RefQSRError):
        merger.add([2, 3], np.zeros((2, 3, 48, 48), np.float32))  # LR-sized patches
    with pytest.raises(RefQSRError):
        merger.add([grid.num_patches, 2], hr)  # index out of range


def test_merger_honours_dtype() -> None:
    image = _random_image(50, 60).astype(np.float64)
    grid = make_grid(50, 60, 48, OVERLAP)
    merger = PatchMerger(grid, scale=1, channels=3, dtype=np.float64)
    merger.add(range(grid.num_patches), extract_patches(image, grid))
    out = merger.result()
    assert out.dtype == np.float64
    assert np.abs(out - image).max() < 1e-12
