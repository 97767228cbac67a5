"""Tests for utils/demo_scene.py: the demo scene to predict on."""

from __future__ import annotations

import json

import numpy as np
import tifffile
from PIL import Image

from conftest import predict_config
from engines.predict import predict
from utils.demo_scene import DEMO_SEED, main
from utils.synthetic import generate_synthetic


def test_the_scene_is_the_synthetic_generators_drawing_with_its_truth(tmp_path, capsys):
    assert main([str(tmp_path / "scene.tif"), "--size", "128", "--truth"]) == 0
    assert f"wrote {tmp_path / 'scene.tif'}, {tmp_path / 'scene_truth.png'} (128x128)" in capsys.readouterr().out
    images, classes = generate_synthetic(DEMO_SEED, 1, 128)
    with tifffile.TiffFile(tmp_path / "scene.tif") as tif:
        assert tif.pages[0].is_tiled and tif.pages[0].dtype == np.uint8
        np.testing.assert_array_equal(tif.asarray(), images[0, :, :, 0])
    truth = Image.open(tmp_path / "scene_truth.png")
    assert truth.mode == "P" and truth.getpalette()[3:6] == [230, 159, 0]  # class 1 in the overlay's colour
    np.testing.assert_array_equal(np.asarray(truth), classes[0])
    assert main([str(tmp_path / "small.png"), "--size", "64", "--seed", "3"]) == 0
    small = generate_synthetic(3, 1, 64)[0][0, ..., 0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "small.png")), small)


def test_an_existing_file_or_a_bad_argument_is_one_error(tmp_path, capsys):
    (tmp_path / "scene.tif").write_bytes(b"mine")
    assert main([str(tmp_path / "scene.tif"), "--size", "64"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'scene.tif'} exists already: give a new file name\n"
    assert (tmp_path / "scene.tif").read_bytes() == b"mine"
    assert main([str(tmp_path / "scene.jpg")]) == 2
    assert "scene.jpg: write the scene as .tif, .tiff, .png" in capsys.readouterr().err
    assert main([str(tmp_path / "s.png"), "--size", "32"]) == 2
    assert "--size 32 must be >= 64" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_predict_segments_the_demo_scene(checkpoint, tmp_path):
    assert main([str(tmp_path / "scene.tif"), "--size", "256"]) == 0
    out = tmp_path / "out"
    assert predict(predict_config(checkpoint, f"INPUT={tmp_path / 'scene.tif'}", f"OUTPUT={out}", "GATING=false")) == 0
    (record,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert (record["height"], record["width"]) == (256, 256) and (out / "scene_overlay.png").is_file()
