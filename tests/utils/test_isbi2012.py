"""Tests for utils/isbi2012.py: the ISBI 2012 training stacks (multi-page TIFFs) as a DATASET_DIR folder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import ISBI, ISBI_MISSING, em_like_stacks
from utils.image_io import load_folder
from utils.isbi2012 import main


def _stacks(tmp_path: Path, count: int = 3, size: int = 48) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    volume, labels = em_like_stacks(count, size, seed=1)
    tifffile.imwrite(tmp_path / "train-volume.tif", volume)
    tifffile.imwrite(tmp_path / "train-labels.tif", labels)
    return tmp_path / "train-volume.tif", tmp_path / "train-labels.tif", volume, labels


def test_the_stacks_become_images_and_masks_with_the_same_stems(tmp_path, capsys):
    volume_tif, labels_tif, volume, labels = _stacks(tmp_path)
    out = tmp_path / "data" / "isbi2012"
    assert main([str(volume_tif), str(labels_tif), str(out)]) == 0
    assert f"wrote 3 images and masks into {out}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00.png", "01.png", "02.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["00.png", "01.png", "02.png"]
    for n in range(3):
        image, mask = Image.open(out / "images" / f"0{n}.png"), Image.open(out / "masks" / f"0{n}.png")
        assert image.mode == mask.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), volume[n])
        np.testing.assert_array_equal(np.asarray(mask), labels[n])  # 0 = membrane, 255 = cell, as published
    readme = (out / "README.md").read_text()
    assert "ISBI 2012" in readme and "research and testing only" in readme and "Arganda-Carreras" in readme
    # the folder loads as a binary dataset: 255 is class 1 (cell)
    images = load_folder(out, input_channels=1, seg_classes=1, input_size=32)
    assert images.ids == ["00", "01", "02"]
    np.testing.assert_array_equal(images.get(0)[1], (labels[0] == 255).astype(np.uint8))
    assert sorted(p.name for p in out.parent.iterdir()) == ["isbi2012"]  # no staging folder left


@pytest.mark.skipif(not ISBI.is_dir(), reason=ISBI_MISSING)
def test_the_real_slices_restacked_convert_to_the_same_folder(tmp_path):
    """The layout of ../shared/data/isbi2012 exactly: its 30 PNGs stacked and converted give the same
    names, modes and pixels."""
    names = sorted(p.name for p in (ISBI / "images").iterdir())
    stack = {sub: np.stack([np.asarray(Image.open(ISBI / sub / n)) for n in names]) for sub in ("images", "masks")}
    tifffile.imwrite(tmp_path / "v.tif", stack["images"])
    tifffile.imwrite(tmp_path / "l.tif", stack["masks"])
    assert main([str(tmp_path / "v.tif"), str(tmp_path / "l.tif"), str(tmp_path / "out")]) == 0
    for sub in ("images", "masks"):
        assert sorted(p.name for p in (tmp_path / "out" / sub).iterdir()) == names
        for n in (names[0], names[-1]):
            ours, theirs = Image.open(tmp_path / "out" / sub / n), Image.open(ISBI / sub / n)
            assert ours.mode == theirs.mode and np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_bad_stacks_and_an_existing_folder_are_one_error_each_and_nothing_is_written(tmp_path, capsys):
    volume_tif, labels_tif, volume, labels = _stacks(tmp_path)
    out = tmp_path / "out"
    tifffile.imwrite(tmp_path / "short.tif", labels[:2])
    tifffile.imwrite(tmp_path / "classes.tif", (labels // 255).astype(np.uint8))
    tifffile.imwrite(tmp_path / "float.tif", volume.astype(np.float32))
    (tmp_path / "text.tif").write_text("not a tiff")
    cases = [
        ([volume_tif, tmp_path / "short.tif"], r"holds 3 pages of 48x48 but .*short.tif 2 of 48x48: give the volume "
                                               "and the labels of the same stack"),
        ([volume_tif, tmp_path / "classes.tif"], r"classes.tif holds the values \[0, 1\], but the challenge's labels "
                                                 r"are 0 \(membrane\) and 255 \(cell\): give train-labels.tif"),
        ([tmp_path / "float.tif", labels_tif], r"float.tif: float32 pages of shape \(48, 48\), but the challenge's "
                                               "train-volume.tif holds 8-bit gray pages"),
        ([tmp_path / "text.tif", labels_tif], r"text.tif: not a readable TIFF"),
        ([tmp_path / "nope.tif", labels_tif], r"nope.tif: no such file; give the challenge's train-volume.tif"),
    ]
    for args, message in cases:
        assert main([*map(str, args), str(out)]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and err.startswith("error: ") and "Traceback" not in err, err
        assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main([str(volume_tif), str(labels_tif), str(out)]) == 2
    assert "exists already: the converter writes a new folder only" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
