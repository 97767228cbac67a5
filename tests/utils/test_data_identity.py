"""Which data a run was made with: how training scaled its inputs (stored in the checkpoint, used by
predict, which warns on an input far outside what training saw), and the content hash of every image
(stored with the split; a file replaced under the same name is refused on resume and on eval)."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import utils.raster as raster
from conftest import ROOT, TINY, predict_config, run_cli
from engines.builders import build_runtime
from engines.forward import place
from engines.predict import build_predictor, predict
from engines.sliding_window import ArrayImage
from utils.dataset import build_datasets
from utils.image_io import RANGE_PERCENTILES, DatasetError, InputScaling, load_folder
from utils.raster import open_image
from utils.splits import resolve_split
from utils.util import DistContext
from bench.folder_datasets import ensure_folder_dataset

CPU = torch.device("cpu")
SIZE = 128


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 image of bright disks (about 200) on a dark noisy background (about 40), and its 0/1 mask."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(3):
        cy, cx, r = rng.integers(20, SIZE - 20, 2).tolist() + [int(rng.integers(10, 22))]
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    image = np.clip(40 + 160 * mask + rng.normal(0, 8, mask.shape), 0, 255).astype(np.uint8)
    return image, mask


def _folder_dataset(root: Path, n: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        image, mask = _scene(rng)
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


def _blake2b(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _build(root, tmp_path, **kw):
    args = dict(split_file=tmp_path / "run" / "tts.json", cache_dir=tmp_path / "cache", seed=0, input_size=32,
                input_channels=1, seg_classes=1, test_split=0.5, fold=0, cross_validation=False,
                train_composition="full", test_composition="full", augmentations=None, synthetic_images=4,
                synthetic_size=64)
    args.update(kw)
    return build_datasets(str(root), **args)


def _replace_content(path: Path) -> bytes:
    """Write other pixels into an image file under the same name; returns the original bytes."""
    original = path.read_bytes()
    image = np.asarray(Image.open(path))
    Image.fromarray(255 - image).save(path)
    return original


# ----------------------------------------------------------------------------- item 9: content hashes
def test_tts_json_records_each_images_hash_and_an_unchanged_dataset_is_reused(tmp_path):
    root = _folder_dataset(tmp_path / "data")
    first = _build(root, tmp_path)
    record = json.loads((tmp_path / "run" / "tts.json").read_text())
    assert record["hashes"] == {f"s{i}": _blake2b(root / "images" / f"s{i}.png") for i in range(4)}
    again = _build(root, tmp_path)
    assert (again.train_ids, again.test_ids) == (first.train_ids, first.test_ids)


def test_a_training_image_replaced_under_the_same_name_is_refused_on_resume(tmp_path):
    root = _folder_dataset(tmp_path / "data")
    split = _build(root, tmp_path)
    changed = root / "images" / f"{split.train_ids[0]}.png"
    before = _blake2b(changed)
    _replace_content(changed)
    with pytest.raises(DatasetError, match=(
            rf"^1 image\(s\) changed since the split file {tmp_path / 'run' / 'tts.json'} recorded them \(same name, "
            rf"other content\): {changed} \(was {before[:12]}, now {_blake2b(changed)[:12]}\)\. Restore the original "
            r"files, or start a new run \(another RUN_ID\) to train on the changed data$")):
        _build(root, tmp_path)


def test_a_split_file_without_hashes_still_loads_with_a_note(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "data")
    first = _build(root, tmp_path)
    split_file = tmp_path / "run" / "tts.json"
    record = json.loads(split_file.read_text())
    del record["hashes"]  # as written before hashes were recorded
    split_file.write_text(json.dumps(record))
    _replace_content(root / "images" / "s1.png")
    again = _build(root, tmp_path)
    assert (again.train_ids, again.test_ids) == (first.train_ids, first.test_ids)
    assert f"note: the split file {split_file} predates content hashes" in capsys.readouterr().err
    assert "hashes" not in json.loads(split_file.read_text())  # the user's file is left as it was


def test_synthetic_data_records_no_hashes_and_is_not_checked(tmp_path, capsys):
    _build("synthetic", tmp_path)
    _build("synthetic", tmp_path)
    assert "hashes" not in json.loads((tmp_path / "run" / "tts.json").read_text())
    assert "note" not in capsys.readouterr().err


def test_eval_of_a_checkpoints_split_refuses_a_changed_image(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "data")
    images = load_folder(root, input_channels=1, seg_classes=1, input_size=32)
    hashes = images.digests
    assert hashes == {f"s{i}": _blake2b(root / "images" / f"s{i}.png") for i in range(4)}
    _build(root, tmp_path, test_ids=["s0", "s1"], hashes=hashes)  # unchanged: fine
    _build(root, tmp_path, test_ids=["s0", "s1"], hashes=None)  # a checkpoint from before hashes: a note
    assert "note: the checkpoint's split predates content hashes" in capsys.readouterr().err
    _replace_content(root / "images" / "s3.png")  # a training image of that split
    with pytest.raises(DatasetError, match=(
            r"^1 image\(s\) changed since the checkpoint's split recorded them \(same name, other content\): "
            rf"{root / 'images' / 's3.png'} \(was {hashes['s3'][:12]}, now [0-9a-f]{{12}}\)\. Restore the original "
            r"files, or evaluate the checkpoint on the data it was trained on$")):
        _build(root, tmp_path, test_ids=["s0", "s1"], hashes=hashes)


def test_resolve_split_without_images_neither_records_nor_checks(tmp_path):
    # the signature used before hashes existed (bench/reproduce.py's callers) keeps working
    folds = resolve_split(tmp_path / "tts.json", ["a", "b", "c", "d"], seed=0, k=2, source="x",
                          cross_validation=False)
    assert sorted(sum(folds, [])) == ["a", "b", "c", "d"]
    assert "hashes" not in json.loads((tmp_path / "tts.json").read_text())


def test_bench_fixed_splits_record_the_hashes_that_resume_checks(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import reproduce

    data = ensure_folder_dataset(tmp_path / "data" / "smoke", "smoke")
    reproduce.write_split(tmp_path / "run", "smoke", 42,
                          reproduce.Options(results_dir=str(tmp_path), data_root=str(tmp_path / "data")))
    _build(data, tmp_path, input_size=64)
    assert "note" not in capsys.readouterr().err
    _replace_content(data / "images" / "001.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) changed since the split file .*001\.png \(was "):
        _build(data, tmp_path, input_size=64)


# ----------------------------------------------------------------------------- item 5: input scaling
def test_scaling_for_follows_training():
    only8 = InputScaling({"uint8": (0.0, 255.0)}, (0.1, 0.9))
    assert only8.scaling_for(np.uint8) == (0.0, 255.0)
    assert only8.scaling_for(np.uint16) == (0.0, 255.0)  # a 16-bit file holding 8-bit values
    assert only8.scaling_for(np.int16) == (0.0, 255.0)
    assert only8.scaling_for(np.float32) == (0.0, 1.0)  # floats stay as they are
    both = InputScaling({"uint8": (0.0, 255.0), "uint16": (0.0, 65535.0)}, (0.1, 0.9))
    assert both.scaling_for(np.uint16) == (0.0, 65535.0)
    assert both.scaling_for(np.int16) == (-32768.0, 65535.0)  # two dtypes seen, not this one: its own range
    floats = InputScaling({"float32": (0.0, 1.0)}, (0.1, 0.9))
    assert floats.scaling_for(np.uint8) == (0.0, 255.0)  # float training: an integer input uses its range
    assert InputScaling.from_dict(only8.as_dict()) == only8
    assert InputScaling.from_dict(None) is None
    with pytest.raises(ValueError, match="malformed input scaling record"):
        InputScaling.from_dict({"scaling": {"uint8": [0, 0]}, "seen": [0, 1]})


@pytest.mark.parametrize("lo, hi, expected", [
    (0.1, 0.9, None),
    (-0.2, 0.5, None),  # partly outside, within the widened range
    (0.45, 0.5, "span only 6.2 % of"),
    (0.0, 257.0, "lie mostly above"),
    (-3.0, -1.0, "lie mostly below"),
])
def test_far_means_narrow_or_mostly_outside_the_widened_range(lo, hi, expected):
    assert InputScaling({"uint8": (0.0, 255.0)}, (0.1, 0.9)).problem(lo, hi) == expected


def test_a_large_scene_is_measured_on_a_grid_of_windows_not_read_whole(tmp_path, monkeypatch):
    arr = np.zeros((2000, 3000), np.uint16)
    arr[::2] = 60000
    tifffile.imwrite(tmp_path / "big.tif", arr, tile=(256, 256), compression="zlib")
    read = []
    with open_image(tmp_path / "big.tif") as image:
        original = image.read_window
        monkeypatch.setattr(image, "read_window", lambda *w: read.append(w) or original(*w))
        assert image.use_scaling(InputScaling({"uint16": (0.0, 65535.0)}, (0.0, 0.95))) is None
    assert len(read) == raster.RANGE_SAMPLE_GRID ** 2
    assert all((y1 - y0, x1 - x0) == (256, 256) for y0, y1, x0, x1 in read)
    assert (read[0][0], read[0][2], read[-1][1], read[-1][3]) == (0, 0, 2000, 3000)


# ----------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained for 2 epochs on a small uint8 folder dataset (bright disks on a dark background)."""
    base = tmp_path_factory.mktemp("identity")
    data = _folder_dataset(base / "data")
    run_cli(*TINY, "TRAIN_EPOCHS=2", "GPUs=[]", f"DATASET_DIR={data}", f"RESULTS_DIR={base / 'results'}",
            "EXP_ID=identity", "AUGMENTATIONS=none")
    return base / "results" / "identity" / "run_001", data


def _predict(weights: Path, image: Path, out: Path) -> np.ndarray:
    assert predict(predict_config(weights, "GATING=false", f"INPUT={image}", f"OUTPUT={out}")) == 0
    return np.asarray(Image.open(out / f"{image.stem}_mask.png")) // 255  # one class: written as 0/255


def test_the_checkpoint_records_the_scaling_and_hashes_of_its_data(trained):
    run, data = trained
    split = torch.load(run / "best.pth", weights_only=True)["split"]
    files = {f"s{i}": data / "images" / f"s{i}.png" for i in range(4)}
    assert split["hashes"] == {k: _blake2b(p) for k, p in files.items()}
    assert split["hashes"] == json.loads((run / "tts.json").read_text())["hashes"]
    ranges = np.array([np.percentile(np.asarray(Image.open(files[i])), RANGE_PERCENTILES) for i in split["train"]])
    assert split["inputs"]["scaling"] == {"uint8": [0.0, 255.0]}
    assert split["inputs"]["seen"] == pytest.approx([ranges[:, 0].min() / 255, ranges[:, 1].max() / 255], abs=1e-6)


def test_a_16_bit_tiff_holding_8_bit_values_predicts_the_8_bit_mask(trained, tmp_path, capsys):
    run, data = trained
    image8 = np.asarray(Image.open(data / "images" / "s0.png"))
    tifffile.imwrite(tmp_path / "s0.tif", image8.astype(np.uint16), tile=(64, 64), compression="zlib")
    expected = _predict(run / "best.pth", data / "images" / "s0.png", tmp_path / "out8")
    assert 0.05 < expected.mean() < 0.95  # the network tells the disks from the background
    assert np.array_equal(_predict(run / "best.pth", tmp_path / "s0.tif", tmp_path / "out16"), expected)
    assert "warning" not in capsys.readouterr().out


def test_a_full_range_16_bit_image_warns_with_an_8_bit_trained_checkpoint(trained, tmp_path, capsys):
    run, data = trained
    image16 = np.asarray(Image.open(data / "images" / "s0.png")).astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "full.tif", image16)
    _predict(run / "best.pth", tmp_path / "full.tif", tmp_path / "out")
    lo, hi = np.percentile(image16, RANGE_PERCENTILES)
    seen = torch.load(run / "best.pth", weights_only=True)["split"]["inputs"]["seen"]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings == [
        f"warning: {tmp_path / 'full.tif'}: its intensities, {lo:.5g}..{hi:.5g} (uint16; 0.1 to 99.9 percentile), "
        f"lie mostly above the range of the training images, {seen[0] * 255:.5g}..{seen[1] * 255:.5g} in the same "
        "units (training scaled uint8: (raw - 0) / 255): the prediction is likely wrong. Rescale the image to that "
        "range, or train on images like it"]


def test_a_checkpoint_without_the_record_scales_by_the_dtype_as_before(trained, tmp_path, capsys):
    run, data = trained
    state = torch.load(run / "best.pth", weights_only=True)
    del state["split"]["inputs"]
    torch.save(state, tmp_path / "old.pth")
    raw = np.asarray(Image.open(data / "images" / "s0.png")).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s0.tif", raw)
    mask = _predict(tmp_path / "old.pth", tmp_path / "s0.tif", tmp_path / "out")
    read = predict_config(tmp_path / "old.pth", "GATING=false")
    cfg = read.cfg
    runtime = build_runtime(cfg, DistContext())  # as predict resolves it
    net, can_gate = place(read.net, runtime.device, runtime.channels_last), read.can_gate
    predictor = build_predictor(cfg, net, can_gate, runtime, gating=False)
    probs, _ = predictor.predict_array(ArrayImage(raw, 0.0, 65535.0))  # today's scaling: the dtype's range
    assert np.array_equal(mask, predictor.labels(probs, cfg.SEG_THRESHOLD))
    assert "warning" not in capsys.readouterr().out


def test_eval_and_resume_refuse_a_dataset_whose_image_changed(trained):
    run, data = trained
    results = run.parents[1]
    common = [*TINY, "GPUs=[]", f"RESULTS_DIR={results}", "EXP_ID=identity", "RUN_ID=run_001"]
    run_cli("eval", *common, f"MODEL_WEIGHTS={run / 'best.pth'}")  # unchanged: evaluates
    changed = data / "images" / "s2.png"
    original = _replace_content(changed)
    try:
        for args in (["eval", f"MODEL_WEIGHTS={run / 'best.pth'}"],
                     [f"DATASET_DIR={data}", "AUGMENTATIONS=none", "TRAIN_EPOCHS=3"]):
            proc = run_cli(*args, *common, check=False)
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert "Traceback" not in proc.stderr
            assert "1 image(s) changed since the " in proc.stderr and f"{changed} (was " in proc.stderr
    finally:
        changed.write_bytes(original)
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [0, 1]
