"""Tests for the generated folder datasets of bench/folder_datasets.py (the benchmark tasks of
bench/reproduce.py): shapes, classes, determinism, sparsity, and that the written folder loads."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bench.folder_datasets import (
    DATASET_VERSIONS,
    FOLDER_DATASETS,
    FOLDER_DATASETS_VERSION,
    classes_from_instances,
    ensure_folder_dataset,
    generate_hard_boundaries,
    generate_touching_blobs,
    generate_lines_ellipses,
    single_class_fraction,
)
from utils.image_io import load_folder


def test_lines_ellipses_shapes_classes_and_determinism():
    images, classes = generate_lines_ellipses(7, 3, height=200, width=400)
    assert images.shape == classes.shape == (3, 200, 400)
    assert images.dtype == classes.dtype == np.uint8
    for n in range(3):
        assert set(np.unique(classes[n])) == {0, 1, 2}  # background, lines and ellipses in every image
    again = generate_lines_ellipses(7, 3, height=200, width=400)
    assert np.array_equal(images, again[0]) and np.array_equal(classes, again[1])
    assert not np.array_equal(classes, generate_lines_ellipses(8, 3, height=200, width=400)[1])
    # as the published generator: flat (noise-free) objects, darker than the noisy background on
    # average; at most 9 ellipses and 9 lines per image, so at most 18 gray levels on the objects
    assert images[classes > 0].mean() < images[classes == 0].mean() - 50
    for n in range(3):
        assert len(np.unique(images[n][classes[n] > 0])) <= 18
        assert images[n][classes[n] == 0].std() > 10
        assert images[n][classes[n] == 0].min() >= int(0.6 * 255)


def test_hard_boundaries_are_sparse_thin_and_touching():
    _, kwargs = FOLDER_DATASETS["hard_boundaries"]
    images, masks = generate_hard_boundaries(0, **kwargs)
    assert images.shape == masks.shape == (kwargs["num_images"], kwargs["size"], kwargs["size"])
    assert set(np.unique(masks)) == {0, 1}
    assert single_class_fraction(masks, 128) >= 0.7  # large sparse scenes
    fg = masks.astype(bool)
    # thin gaps between touching cells: background pixels with foreground within 1 px on both sides
    gap = ~fg[:, 1:-1, 2:-2] & fg[:, 1:-1, :-4] & fg[:, 1:-1, 4:]
    assert gap.sum() > 100
    # low contrast: the object/background step is about two noise sigmas or less
    step = images[fg].mean() - images[~fg].mean()
    assert 0 < step < 0.25 * 255
    with pytest.raises(ValueError, match="size=100"):
        generate_hard_boundaries(0, 1, size=100)


def test_single_class_fraction_by_hand():
    masks = np.zeros((1, 4, 4), np.uint8)
    masks[0, 0, 0] = 1  # only the top-left 2x2 tile holds two classes
    assert single_class_fraction(masks, 2) == pytest.approx(3 / 4)


def test_ensure_folder_dataset_writes_a_loadable_folder_once(tmp_path):
    folder = ensure_folder_dataset(tmp_path / "smoke", "smoke", seed=0)
    _, kwargs = FOLDER_DATASETS["smoke"]
    images = load_folder(folder, input_channels=1, seg_classes=1, input_size=64)
    assert len(images) == kwargs["num_images"]
    image, mask = images.get(0)
    expected_images, expected_masks = generate_hard_boundaries(0, **kwargs)
    assert np.array_equal(image[..., 0], expected_images[0]) and np.array_equal(mask, expected_masks[0])
    stamp = (folder / "images" / "000.png").stat().st_mtime_ns
    ensure_folder_dataset(folder, "smoke", seed=0)  # present: not rewritten
    assert (folder / "images" / "000.png").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="different dataset"):
        ensure_folder_dataset(folder, "smoke", seed=1)
    with pytest.raises(ValueError, match="valid names"):
        ensure_folder_dataset(tmp_path / "x", "lines")


def test_a_dataset_version_of_its_own_is_in_the_manifest(tmp_path):
    """lines_ellipses changed on its own (version 2): a folder of version 1 is refused, not reused;
    the other datasets keep FOLDER_DATASETS_VERSION."""
    import json

    folder = ensure_folder_dataset(tmp_path / "lines_ellipses", "lines_ellipses", seed=0)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == DATASET_VERSIONS["lines_ellipses"] == 2
    assert json.loads((ensure_folder_dataset(tmp_path / "smoke", "smoke") / "manifest.json").read_text())[
        "version"] == FOLDER_DATASETS_VERSION
    (folder / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(ValueError, match="different dataset"):
        ensure_folder_dataset(folder, "lines_ellipses", seed=0)


def test_classes_from_instances_on_a_hand_made_map():
    # two touching 3x3 cells (1 and 2) and a lone 3x3 cell (3) whose centre is its only interior pixel
    inst = np.zeros((5, 11), np.int32)
    inst[1:4, 1:4], inst[1:4, 4:7], inst[1:4, 8:11] = 1, 2, 3
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 2, 2, 2, 2, 2, 2, 0, 2, 2, 2],
        [0, 2, 1, 2, 2, 1, 2, 0, 2, 1, 2],
        [0, 2, 2, 2, 2, 2, 2, 0, 2, 2, 2],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ], np.uint8)
    expected[2, 10] = 1  # cell 3 meets the image border there: pixels past the border do not count
    assert np.array_equal(classes_from_instances(inst), expected)


def test_touching_blobs_have_outlines_between_touching_cells():
    images, classes = generate_touching_blobs(3, 2, size=256)
    assert images.shape == classes.shape == (2, 256, 256) and images.dtype == classes.dtype == np.uint8
    again = generate_touching_blobs(3, 2, size=256)
    assert np.array_equal(images, again[0]) and np.array_equal(classes, again[1])
    for c in classes:
        assert set(np.unique(c)) == {0, 1, 2}
        # an interior pixel never has background among its 8 neighbours (the outline lies between)
        near_background = ndimage.binary_dilation(c == 0, np.ones((3, 3), bool))
        assert not (near_background & (c == 1)).any()
        # cells touch: some outline pixels have no background within 1 px (a line between two cells)
        assert ((c == 2) & ~near_background).sum() > 100
    # cells are brighter than the background
    assert images[classes > 0].mean() > images[classes == 0].mean() + 20
