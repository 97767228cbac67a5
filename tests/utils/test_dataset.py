"""Data pipeline: file formats and errors, tiling and labels, splits and tts.json, synthetic data,
augmentation alignment, and the loaders' sampling."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage

import utils.image_io as image_io
import utils.synthetic as synthetic
from conftest import random_box
from utils.augment import DEFAULT_AUGMENTATIONS, UNetElasticTransform, augmentation_problems, build_augmentation
from utils.dataset import SceneSDM, TileDataset, build_datasets, make_loader
from utils.image_io import DatasetError, ImageEntry, ImageSet, load_folder
from utils.raster import RasterError, open_image
from utils.splits import make_folds, num_folds
from utils.synthetic import SYNTHETIC_VERSION, generate_synthetic, load_synthetic
from utils.tiling import boundary_label, tile_positions, tiles_of


def _build(source, tmp_path, **kw):
    args = dict(
        split_file=tmp_path / "run" / "tts.json", cache_dir=tmp_path / "cache", seed=0, input_size=32,
        input_channels=1, seg_classes=1, test_split=0.2, fold=0, cross_validation=False,
        train_composition="full", test_composition="full", tile_overlap=0, augmentations=None,
        synthetic_images=10, synthetic_size=64,
    )
    args.update(kw)
    return build_datasets(str(source), **args)


def _write(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, arr, **kw)
    else:
        Image.fromarray(arr).save(path, **kw)
    return path


def _pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray, ext=".png", mask_ext=".png", **kw):
    _write(root / "images" / f"{stem}{ext}", image, **kw)
    _write(root / "masks" / f"{stem}{mask_ext}", mask)


# --------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize(
    "length, size, overlap, expected",
    [
        (512, 128, 0, [0, 128, 256, 384]),
        (500, 128, 0, [0, 128, 256, 372]),  # last tile aligned to the border
        (128, 128, 0, [0]),
        (300, 128, 32, [0, 96, 172]),  # stride 96; 192 would overrun, so 300-128=172
        (352, 128, 16, [0, 112, 224]),  # ends exactly at the border: no extra tile
    ],
)
def test_tile_positions(length, size, overlap, expected):
    starts = tile_positions(length, size, overlap)
    assert starts == expected
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + size] = True
    assert covered.all()


@pytest.mark.parametrize("args, match", [((100, 128, 0), "smaller than the tile"), ((256, 128, 128), "overlap"),
                                         ((256, 128, -1), "overlap"), ((256, 0, 0), "size")])
def test_tile_positions_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        tile_positions(*args)


def test_boundary_label_is_any_adjacent_pair_of_different_classes():
    rng = np.random.default_rng(0)
    masks = [np.zeros((8, 8), np.uint8), np.full((8, 8), 2, np.uint8)]
    masks += [(rng.random((8, 8)) < q).astype(np.uint8) * rng.integers(1, 3) for q in (0.01, 0.02, 0.3)]
    one = np.zeros((8, 8), np.uint8)
    one[7, 7] = 1
    masks.append(one)
    for m in masks:
        reference = bool((np.diff(m, axis=0) != 0).any() or (np.diff(m, axis=1) != 0).any())
        assert boundary_label(m) == int(reference)
    assert boundary_label(one) == 1 and boundary_label(masks[0]) == 0


def test_num_folds():
    assert [num_folds(t) for t in (0.2, 0.25, 0.3, 0.5)] == [5, 4, 3, 2]
    with pytest.raises(ValueError, match="test_split"):
        num_folds(1.0)


# --------------------------------------------------------------------------------- file formats
def test_png_8_and_16_bit_gray_scale_by_dtype_range(tmp_path):
    rng = np.random.default_rng(1)
    img8 = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    img16 = rng.integers(0, 65536, (48, 40), dtype=np.uint16)
    mask = random_box(rng, 48, 40)
    _pair(tmp_path, "a", img8, mask)
    _pair(tmp_path, "b", img16, mask * 255)
    # Mixed 0/1 and 0/255 masks: values are then class indices, and 255 is out of range.
    with pytest.raises(DatasetError, match=r"masks/b.png: mask value\(s\) 255 >= 2 .*\n.*note: masks are read as binary"):
        load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)
    _write(tmp_path / "masks" / "a.png", mask * 255)
    images = load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)
    assert images.ids == ["a", "b"] and images.mask_map_255
    tiles = TileDataset(images, [(0, 16, 8), (1, 16, 8)], 32)
    for k, raw in enumerate((img8, img16)):
        item = tiles[k]
        expected = raw[16:48, 8:40].astype(np.float64) / np.iinfo(raw.dtype).max
        assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
        np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-6)
        np.testing.assert_array_equal(item["mask"].numpy(), mask[16:48, 8:40])
        assert item["mask"].dtype == torch.int64


def test_rgb_png_and_multichannel_tiffs(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    chw5 = rng.integers(0, 65536, (5, 40, 40), dtype=np.uint16)
    mask = random_box(rng, 40, 40)
    root3, root5 = tmp_path / "rgb", tmp_path / "five"
    _pair(root3, "png", rgb, mask)
    _pair(root3, "tif", rgb, mask, ext=".tif", mask_ext=".tif")  # contiguous (H, W, 3), axes YXS
    _pair(root5, "x", chw5, mask, ext=".tiff")  # (5, H, W), one page per channel
    images = load_folder(root3, input_channels=3, seg_classes=2, input_size=32)
    for i in range(2):
        item = TileDataset(images, [(i, 0, 8)], 32)[0]
        np.testing.assert_allclose(item["image"].numpy(), rgb[:32, 8:40].transpose(2, 0, 1) / 255.0, atol=1e-6)
        np.testing.assert_array_equal(item["mask"].numpy(), mask[:32, 8:40])
    item = TileDataset(load_folder(root5, input_channels=5, seg_classes=2, input_size=32), [(0, 8, 0)], 32)[0]
    np.testing.assert_allclose(item["image"].numpy(), chw5[:, 8:40, :32] / 65535.0, atol=1e-6)


def test_tiff_16_bit_gray_with_tiff_mask_and_float_tiff(tmp_path):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 65536, (33, 35), dtype=np.uint16)
    mask = random_box(rng, 33, 35)
    _pair(tmp_path, "g", img, mask, ext=".tif", mask_ext=".tiff")
    _pair(tmp_path, "f", (img / 65535.0).astype(np.float32), mask, ext=".tif")
    images = load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)
    for i in range(2):
        item = TileDataset(images, [(i, 1, 3)], 32)[0]
        np.testing.assert_allclose(item["image"][0].numpy(), img[1:, 3:] / 65535.0, atol=1e-6)
    _write(tmp_path / "images" / "f.tif", (img / 30000.0).astype(np.float32))
    with pytest.raises(DatasetError, match=r"images/f.tif: unreadable .*float images must already lie in \[0, 1\]"):
        load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)


def test_the_dataset_reads_a_tiff_with_the_reader_prediction_uses(tmp_path):
    # one TIFF reader (utils.tiff): the same pixels, the same stacking of pages, the same causes
    rng = np.random.default_rng(6)
    pages = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)  # two RGB pages: six channels
    mask = random_box(rng, 40, 40)
    _pair(tmp_path, "p", pages, mask, ext=".tif", mask_ext=".tif", compression="zlib", tile=(16, 16))
    images = load_folder(tmp_path, input_channels=6, seg_classes=2, input_size=32)  # before: "not one 2-D image"
    with open_image(tmp_path / "images" / "p.tif") as reader:
        np.testing.assert_array_equal(images.get(0)[0], reader.read_window(0, 40, 0, 40))
    cut = tmp_path / "images" / "p.tif"
    cut.write_bytes(cut.read_bytes()[:-2000])
    truncated = r"p.tif: file is truncated \(page 1 data ends at byte \d+, the file has \d+\)$"
    with pytest.raises(RasterError, match=truncated) as err:
        open_image(cut)
    cause = str(err.value).removeprefix(f"{cut}: ")
    with pytest.raises(DatasetError, match=rf"images/p.tif: unreadable \(ValueError: {re.escape(cause)}\)$"):
        load_folder(tmp_path, input_channels=6, seg_classes=2, input_size=32)


def test_jpeg_image_and_class_index_masks(tmp_path):
    rng = np.random.default_rng(4)
    smooth = ndimage.gaussian_filter(rng.random((48, 48)), 4)
    img = np.uint8(np.rint(255 * (smooth - smooth.min()) / np.ptp(smooth)))
    classes = np.zeros((48, 48), np.uint8)
    classes[5:20, 5:40], classes[25:45, 10:30] = 1, 2
    palette = Image.frombytes("P", (48, 48), classes.tobytes())  # palette PNG: pixels are the indices
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    _write(tmp_path / "images" / "j.jpg", img, quality=95)
    _pair(tmp_path, "k", img, classes)  # plain 8-bit class-index mask
    palette.save(tmp_path / "masks" / "j.png")
    images = load_folder(tmp_path, input_channels=1, seg_classes=3, input_size=32)
    assert not images.mask_map_255
    for i in range(2):
        item = TileDataset(images, [(i, 0, 0)], 32)[0]
        np.testing.assert_array_equal(item["mask"].numpy(), classes[:32, :32])
        # JPEG is lossy: close to the original, not equal
        assert np.abs(item["image"][0].numpy() - img[:32, :32] / 255.0).mean() < 3 / 255
    with pytest.raises(DatasetError, match=r"masks/k.png: mask value\(s\) 2 >= 2 \(SEG_CLASSES=1 allows 0..1\)"):
        load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)


def test_lazy_decoding_matches_the_in_memory_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    for stem in ("p", "q"):
        _pair(tmp_path, stem, rng.integers(0, 256, (64, 48), dtype=np.uint8), random_box(rng, 64, 48) * 255)
    cached = load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)
    monkeypatch.setattr(image_io, "MEMORY_CACHE_FRACTION", 0.0)
    lazy = load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)
    assert cached.in_memory and not lazy.in_memory
    tiles = tiles_of(cached, [0, 1], 32, 0)
    a, b = TileDataset(cached, tiles, 32), TileDataset(lazy, tiles, 32)
    for k in range(len(tiles)):
        assert torch.equal(a[k]["image"], b[k]["image"]) and torch.equal(a[k]["mask"], b[k]["mask"])


def test_the_memory_budget_is_shared_by_the_local_training_processes(tmp_path, monkeypatch):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(image_io, "MEMORY_CACHE_FRACTION", 4e6 / ram)  # 4 MB for one process
    rng = np.random.default_rng(6)
    _pair(tmp_path, "big", rng.integers(0, 256, (1024, 1280), dtype=np.uint8), random_box(rng, 1024, 1280) * 255)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert abs(image_io.memory_budget() - 4e6) <= 1
    assert load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32).in_memory  # 2.6 MB decoded
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes on this machine, 1 MB each
    assert abs(image_io.memory_budget() - 1e6) <= 1
    assert not load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32).in_memory


# --------------------------------------------------------------------------------- errors
def _good(root, stem="ok", size=(40, 40)):
    rng = np.random.default_rng(list(stem.encode()))
    _pair(root, stem, rng.integers(0, 256, size, dtype=np.uint8), random_box(rng, *size))


def _truncated_png(root, stem):
    _good(root, stem)
    path = root / "images" / f"{stem}.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_CASES = {
    "truncated image": (lambda r: _truncated_png(r, "trunc"), r"images/trunc.png: unreadable \(OSError: image file is truncated"),
    "garbage mask": (lambda r: (_good(r, "garb"), (r / "masks" / "garb.png").write_bytes(b"not a png")),
                     r"masks/garb.png: unreadable \(UnidentifiedImageError"),
    "missing mask": (lambda r: _write(r / "images" / "lonely.png", np.zeros((40, 40), np.uint8)),
                     r"images/lonely.png: missing mask"),
    "mask without image": (lambda r: _write(r / "masks" / "orphan.png", np.zeros((40, 40), np.uint8)),
                           r"masks/orphan.png: mask without an image"),
    "size mismatch": (lambda r: _pair(r, "mis", np.zeros((40, 40), np.uint8), np.zeros((40, 41), np.uint8)),
                      r"masks/mis.png: size 41x40 differs from images/mis.png \(40x40"),
    "mask value": (lambda r: _pair(r, "val", np.zeros((40, 40), np.uint8), np.full((40, 40), 7, np.uint8)),
                   r"masks/val.png: mask value\(s\) 7 >= 2"),
    "channels": (lambda r: _pair(r, "rgb", np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40), np.uint8)),
                 r"images/rgb.png: 3 channel\(s\), but INPUT_CHANNELS is 1"),
    "too small": (lambda r: _pair(r, "tiny", np.zeros((20, 40), np.uint8), np.zeros((20, 40), np.uint8)),
                  r"images/tiny.png: 40x20 pixels is smaller than INPUT_SIZE=32"),
    # issue #11: a broken link was called "not a supported image file"
    "broken link": (lambda r: (r / "images" / "gone.png").symlink_to(r / "nowhere.png"),
                    r"images/gone.png: a broken symbolic link \(to '.*nowhere.png', which does not exist\)"),
    "duplicate stem": (lambda r: (_good(r, "dup"), _write(r / "images" / "dup.tif", np.zeros((40, 40), np.uint8))),
                       r"images/dup.tif: same stem as images/dup.png"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_each_bad_file_is_reported(tmp_path, case):
    make, match = BAD_CASES[case]
    _good(tmp_path)
    make(tmp_path)
    with pytest.raises(DatasetError, match=match):
        load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)


def test_one_error_lists_every_bad_file(tmp_path):
    _good(tmp_path)
    for make, _ in BAD_CASES.values():
        make(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)
    message = str(info.value)
    assert message.startswith(f"{len(BAD_CASES)} problem(s) with the dataset in {tmp_path}")
    for _, match in BAD_CASES.values():
        assert re.search(match, message), match


def test_missing_folders_and_empty_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"lacks masks/"):
        load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match="has no images"):
        load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=32)
    with pytest.raises(DatasetError, match="does not exist"):
        _build(tmp_path / "nope", tmp_path)


# --------------------------------------------------------------------------------- EM data (ISBI 2012 layout)
def test_isbi2012_loads_without_conversion_and_trains(tmp_path, isbi_folder):
    count = len(list((isbi_folder / "images").glob("*.png")))  # 30 real slices, 5 EM-like ones
    splits = _build(isbi_folder, tmp_path, input_size=128, seg_classes=1, augmentations=DEFAULT_AUGMENTATIONS)
    assert len(splits.train_ids) == count * 4 // 5 and len(splits.test_ids) == count // 5
    assert len(splits.train) == count * 4 // 5 * 16 and len(splits.test) == count // 5 * 16
    for k in (0, len(splits.test) - 1):  # the first and last tiles
        item = splits.test[k]
        image_id, y, x = item["id"].split("_")
        y, x = int(y[1:]), int(x[1:])
        raw = np.asarray(Image.open(isbi_folder / "images" / f"{image_id}.png"))[y:y + 128, x:x + 128]
        label = np.asarray(Image.open(isbi_folder / "masks" / f"{image_id}.png"))[y:y + 128, x:x + 128]
        np.testing.assert_allclose(item["image"][0].numpy(), raw / 255.0, atol=1e-6)
        np.testing.assert_array_equal(item["mask"].numpy(), (label == 255).astype(np.int64))  # 1 = cell interior
    # A couple of optimisation steps on augmented tiles from the loader.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = make_loader(splits.train, batch_size=4, train=True, num_workers=0, seed=0, distributed=False,
                         pin_memory=False)
    losses = []
    for step, batch in zip(range(2), loader):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(batch["image"])[:, 0], batch["mask"].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 2 and all(np.isfinite(losses))


# --------------------------------------------------------------------------------- splits
def test_folds_partition_the_images_and_no_image_straddles_the_split(tmp_path):
    k = num_folds(0.25)
    test_sets = []
    for fold in range(k):
        s = _build("synthetic", tmp_path, test_split=0.25, fold=fold, cross_validation=True)
        assert set(s.train_ids).isdisjoint(s.test_ids)
        assert sorted(s.train_ids + s.test_ids) == [f"{i}" for i in range(10)]
        # tiles come only from their side's images, and every image's 4 tiles are present
        assert {t.split("_")[0] for t in s.train.ids} == set(s.train_ids)
        assert {t.split("_")[0] for t in s.test.ids} == set(s.test_ids)
        assert len(s.train) == 4 * len(s.train_ids) and len(s.test) == 4 * len(s.test_ids)
        test_sets.append(s.test_ids)
    flat = [i for t in test_sets for i in t]
    assert sorted(flat) == [f"{i}" for i in range(10)] and len(set(flat)) == 10
    assert sorted(len(t) for t in test_sets) == [2, 2, 3, 3]


def test_make_folds_is_seeded():
    ids = [f"im{i:02d}" for i in range(20)]
    assert make_folds(ids, 5, seed=3) == make_folds(list(reversed(ids)), 5, seed=3)
    assert make_folds(ids, 5, seed=3) != make_folds(ids, 5, seed=4)
    with pytest.raises(ValueError, match="cannot be split into 5 folds"):
        make_folds(ids[:4], 5, seed=0)


def test_tts_json_holds_image_ids_and_is_reused(tmp_path):
    first = _build("synthetic", tmp_path, seed=1)
    record = json.loads((tmp_path / "run" / "tts.json").read_text())
    assert record["num_folds"] == 5 and record["images"] == [str(i) for i in range(10)]
    assert [f["test"] for f in record["folds"]][0] == first.test_ids  # image ids, not tile ids
    # A repeated run with another seed still sees the stored split.
    again = _build("synthetic", tmp_path, seed=1234)
    assert again.test_ids == first.test_ids and again.train_ids == first.train_ids
    # Without the file, that seed gives another split.
    fresh = _build("synthetic", tmp_path, seed=1234, split_file=tmp_path / "other" / "tts.json")
    assert fresh.test_ids != first.test_ids


def test_test_ids_fix_the_test_split_and_the_tts_json_records_it(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        _good(root, f"frame{i}")
    s = _build(root, tmp_path, fixed_test_ids=["frame4", "frame1"])
    assert s.test_ids == ["frame1", "frame4"] and s.train_ids == ["frame0", "frame2", "frame3", "frame5"]
    record = json.loads((tmp_path / "run" / "tts.json").read_text())
    assert record["folds"] == [{"test": ["frame1", "frame4"]}] and record["num_folds"] == 1 and record["fixed"]
    assert _build(root, tmp_path, fixed_test_ids=["frame1", "frame4"]).test_ids == ["frame1", "frame4"]  # reused
    with pytest.raises(DatasetError, match=r"holds the test set frame1, frame4, not TEST_IDS frame2: use the TEST_IDS "
                                           r"it was made with, or start a new run"):
        _build(root, tmp_path, fixed_test_ids=["frame2"])
    with pytest.raises(DatasetError, match=r"TEST_IDS names 2 image\(s\) that are not in the dataset: frame7, "
                                           r"frame9; give the stems of its images \(file names without the suffix\), "
                                           r"e\.g\. frame0, frame1, frame2, \.\.\. \(3 more\)"):
        _build(root, tmp_path, fixed_test_ids=["frame9", "frame1", "frame7"], split_file=tmp_path / "new.json")
    with pytest.raises(DatasetError, match="TEST_IDS holds all 6 images of the dataset, so none is left to train on"):
        _build(root, tmp_path, fixed_test_ids=[f"frame{i}" for i in range(6)], split_file=tmp_path / "new.json")
    assert not (tmp_path / "new.json").exists()


def test_tts_json_that_no_longer_matches_the_files_is_an_error(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        _good(root, f"s{i}")
    _build(root, tmp_path, test_split=0.5)
    for sub in ("images", "masks"):
        (root / sub / "s3.png").unlink()
    _good(root, "s9")
    with pytest.raises(DatasetError, match=r"no longer matches.*1 image\(s\) of the split are no longer on disk \(s3\)"
                                           r".*1 image\(s\) on disk are not in the split \(s9\)"):
        _build(root, tmp_path, test_split=0.5)
    _build("synthetic", tmp_path, split_file=tmp_path / "syn.json", test_split=0.5)
    with pytest.raises(DatasetError, match="has 2 folds but TEST_SPLIT gives K=3"):
        _build("synthetic", tmp_path, split_file=tmp_path / "syn.json", test_split=0.34)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json is unreadable"):
        _build("synthetic", tmp_path, split_file=tmp_path / "bad.json")


def test_boundary_composition_keeps_only_boundary_tiles(tmp_path):
    full = _build("synthetic", tmp_path)
    only = _build("synthetic", tmp_path, train_composition="boundary", test_composition="boundary")
    for a, b in ((full.train, only.train), (full.test, only.test)):
        assert 0 < len(b) < len(a)
        assert list(b.ids) == [i for i, lab in zip(a.ids, a.labels) if lab == 1]
        assert all(b[k]["label"] == 1 for k in range(len(b)))
    with pytest.raises(ValueError, match=r"train_composition='edges' is not one of \['full', 'boundary'\]"):
        _build("synthetic", tmp_path, train_composition="edges")


def test_bad_arguments_name_the_argument(tmp_path):
    for kw, match in [({"fold": 5}, r"fold=5 does not exist: test_split=0.2 gives folds 0..4"),
                      ({"tile_overlap": 32}, r"tile_overlap=32 must be in \[0, input_size=32\)"),
                      ({"test_split": 0.7}, r"K=round\(1/test_split\)=1"),
                      ({"synthetic_images": 3}, r"synthetic_images=3 is fewer than the K=5 folds"),
                      ({"seg_classes": 4}, r"seg_classes=4 does not fit the synthetic data")]:
        with pytest.raises(ValueError, match=match):
            _build("synthetic", tmp_path, split_file=tmp_path / "x.json", **kw)


# --------------------------------------------------------------------------------- synthetic data
def test_synthetic_data_is_deterministic_and_cached(tmp_path, monkeypatch):
    a_img, a_cls = generate_synthetic(7, 3, 96)
    b_img, b_cls = generate_synthetic(7, 3, 96)
    c_img, _ = generate_synthetic(8, 3, 96)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_cls, b_cls) and not np.array_equal(a_img, c_img)
    first = load_synthetic(tmp_path, seed=7, num_images=3, size=96, channels=1, seg_classes=3)
    assert [p.name for p in tmp_path.iterdir()] == [f"synthetic_v{SYNTHETIC_VERSION}_seed7_n3_s96_c1.npz"]

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(synthetic, "generate_synthetic", fail)
    second = load_synthetic(tmp_path, seed=7, num_images=3, size=96, channels=1, seg_classes=3)
    for i in range(3):
        assert np.array_equal(first.get(i)[0], second.get(i)[0]) and np.array_equal(first.get(i)[1], a_cls[i])
    monkeypatch.undo()
    next(tmp_path.iterdir()).write_bytes(b"broken")
    with pytest.warns(UserWarning, match="unusable.*regenerating"):
        third = load_synthetic(tmp_path, seed=7, num_images=3, size=96, channels=1, seg_classes=3)
    assert np.array_equal(third.get(2)[0], a_img[2])


def test_synthetic_classes_and_contrast():
    images, classes = generate_synthetic(0, 4, 256)
    assert set(np.unique(classes)) == {0, 1, 2}
    gray = images[..., 0].astype(float) / 255
    # objects (either class) are clearly brighter than the background in every image
    for g, c in zip(gray, classes):
        assert g[c > 0].mean() - g[c == 0].mean() > 0.3
    # lines are thin (at most 6 px from another class: width <= 12), ellipses are not (>= 14 px)
    depth_line = max(ndimage.distance_transform_edt(c == 1).max() for c in classes)
    depth_ellipse = max(ndimage.distance_transform_edt(c == 2).max() for c in classes)
    assert depth_line <= 7 and depth_ellipse >= 14


def test_synthetic_binary_and_three_class_masks_agree(tmp_path):
    binary = _build("synthetic", tmp_path, seg_classes=1, split_file=tmp_path / "a.json")
    three = _build("synthetic", tmp_path, seg_classes=3, split_file=tmp_path / "b.json", input_channels=1)
    labels = np.concatenate([binary.train.labels, binary.test.labels])
    assert 0 < labels.mean() < 1  # both tile labels occur
    for k in range(0, len(binary.train), 7):
        m1, m3 = binary.train[k]["mask"], three.train[k]["mask"]
        assert set(m1.unique().tolist()) <= {0, 1} and set(m3.unique().tolist()) <= {0, 1, 2}
        assert torch.equal(m1, (m3 > 0).long())
    rgb = _build("synthetic", tmp_path, input_channels=3, split_file=tmp_path / "c.json")
    assert rgb.train[0]["image"].shape == (3, 32, 32)


# --------------------------------------------------------------------------------- augmentation
def test_default_augmentations_are_valid():
    assert augmentation_problems(DEFAULT_AUGMENTATIONS) == []
    assert len(build_augmentation(DEFAULT_AUGMENTATIONS).transforms) == len(DEFAULT_AUGMENTATIONS)
    assert build_augmentation([]) is None and build_augmentation(None) is None


def test_augmentation_problems_lists_every_problem():
    spec = [
        {"name": "HorizontalFlp", "p": 0.5},
        {"name": "VerticalFlip"},
        {"name": "GaussNoise", "p": 1.5, "std_rang": [0.1, 0.2]},
        {"name": "ElasticTransform", "p": 0.5, "sigma": -3, "grid_size": 2.5},
        {"name": "ShiftScaleRotate", "p": "often", "rotate_limit": [30, 10]},
        "HorizontalFlip",
    ]
    problems = augmentation_problems(spec)
    expected = [
        r"entry 0: unknown transform 'HorizontalFlp' \(did you mean 'HorizontalFlip'\?\); choose from Affine, ",
        r"entry 1 \(VerticalFlip\): missing 'p'",
        r"entry 2 \(GaussNoise\): p must be in \[0, 1\], got 1.5",
        r"entry 2 \(GaussNoise\): unknown parameter 'std_rang' \(did you mean 'std_range'\?\)",
        r"entry 3 \(ElasticTransform\): sigma must be in \[0, inf\], got -3",
        r"entry 3 \(ElasticTransform\): grid_size must be an integer, got 2.5",
        r"entry 4 \(ShiftScaleRotate\): p must be a number, got 'often'",
        r"entry 4 \(ShiftScaleRotate\): rotate_limit needs low <= high, got \[30, 10\]",
        r"entry 5: must be a mapping",
    ]
    assert len(problems) == len(expected)
    for pattern, problem in zip(expected, problems):
        assert re.match(pattern, problem), (pattern, problem)
    assert augmentation_problems({"name": "HorizontalFlip"})[0].startswith("must be a list")
    with pytest.raises(ValueError, match="invalid augmentations:\n  - entry 0: unknown transform"):
        build_augmentation(spec)


def _smooth_tile_set(seed=0, size=64, foreground=1):
    """An image whose mask is its own thresholded intensity (mask = foreground where image > 0.5)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), 5)
    raw = np.uint8(np.clip(np.rint(127.5 + field / field.std() * 60), 0, 255))
    mask = (raw >= 128).astype(np.uint8) * foreground  # raw >= 128  <=>  raw / 255 > 0.5
    entry = ImageEntry("s", size, size, 1, 0.0, 255.0)
    return ImageSet([entry], [(raw[..., None], mask)]), mask


@pytest.mark.parametrize(
    "spec, exact",
    [
        ([{"name": "HorizontalFlip", "p": 1}, {"name": "VerticalFlip", "p": 0.5}, {"name": "RandomRotate90", "p": 1}], True),
        ([{"name": "ShiftScaleRotate", "p": 1, "shift_limit": 0.2, "scale_limit": 0.3, "rotate_limit": 90}], False),
        ([{"name": "Affine", "p": 1, "scale": [0.7, 1.4], "rotate": 45, "shear": 15}], False),
        ([{"name": "ElasticTransform", "p": 1, "sigma": 10, "grid_size": 3}], False),
    ],
    ids=["flips+rot90", "ShiftScaleRotate", "Affine", "ElasticTransform"],
)
def test_geometric_augmentation_keeps_image_and_mask_aligned(spec, exact):
    # Classes 0 and 2: a mask interpolated other than by nearest neighbour would show a 1 between them.
    images, mask = _smooth_tile_set(foreground=2)
    data = TileDataset(images, [(0, 0, 0)], 64, build_augmentation(spec, seed=0))
    moved = 0
    for _ in range(12):
        item = data[0]
        image, aug_mask = item["image"][0].numpy(), item["mask"].numpy()
        assert set(np.unique(aug_mask).tolist()) <= {0, 2}
        aug_mask = aug_mask // 2
        thresholded = (image > 0.5).astype(np.int64)
        moved += not np.array_equal(aug_mask, mask // 2)
        if exact:  # pixel permutations: no interpolation at all
            np.testing.assert_array_equal(aug_mask, thresholded)
            continue
        # Interpolated image vs nearest-neighbour mask may disagree only right at the mask's edge.
        wrong = aug_mask != thresholded
        edge = ndimage.binary_dilation(aug_mask ^ ndimage.binary_erosion(aug_mask), iterations=1) | \
            ndimage.binary_dilation((1 - aug_mask) ^ ndimage.binary_erosion(1 - aug_mask), iterations=1)
        assert not (wrong & ~edge).any()
        assert wrong.mean() < 0.03
        assert item["label"] == boundary_label(aug_mask)
    assert moved >= 8  # the transforms really moved the pixels


def test_misaligned_pairs_would_fail_the_alignment_check():
    images, mask = _smooth_tile_set()
    image = images.get(0)[0][..., 0] / 255.0
    wrong = np.fliplr(mask) != (image > 0.5)  # what an image-only flip would leave behind
    assert wrong.mean() > 0.1


def test_unet_elastic_displacements_have_sigma_pixels_at_the_grid_points():
    t = UNetElasticTransform(sigma=10.0, grid_size=3, p=1.0)
    t.set_random_seed(0)
    corner, centre = [], []
    for _ in range(300):
        maps = t.get_params_dependent_on_data({"shape": (65, 65)}, {})
        corner.append(maps["map_x"][0, 0] - 0.0)
        centre.append(maps["map_y"][32, 32] - 32.0)
        # smooth field: neighbouring pixels move almost together
        assert np.abs(np.diff(maps["map_x"], axis=1) - 1).max() < 2.0
    assert 8.5 < np.std(corner) < 11.5 and 8.5 < np.std(centre) < 11.5


def test_intensity_augmentations_leave_the_mask_alone_and_stay_in_range():
    images, mask = _smooth_tile_set()
    spec = [{"name": "RandomBrightnessContrast", "p": 1, "brightness_limit": 0.5, "contrast_limit": 0.5},
            {"name": "GaussNoise", "p": 1, "std_range": [0.1, 0.2]}]
    data = TileDataset(images, [(0, 0, 0)], 64, build_augmentation(spec, seed=0))
    plain = TileDataset(images, [(0, 0, 0)], 64)[0]["image"]
    for _ in range(5):
        item = data[0]
        assert np.array_equal(item["mask"].numpy(), mask)
        assert not torch.equal(item["image"], plain)
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0


def test_label_is_recomputed_after_augmentation():
    raw = np.full((64, 64, 1), 40, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:6, :6] = 1  # an object only in the corner
    raw[:6, :6] = 200
    images = ImageSet([ImageEntry("c", 64, 64, 1, 0.0, 255.0)], [(raw, mask)])
    zoom = build_augmentation([{"name": "Affine", "p": 1, "scale": 2.0}], seed=0)  # zoom x2 about the centre
    data = TileDataset(images, [(0, 0, 0)], 64, zoom)
    assert data.labels[0] == 1
    item = data[0]
    assert item["mask"].sum() == 0 and item["label"] == 0


# --------------------------------------------------------------------------------- loaders
def _indices(loader):
    return [i for batch in loader for i in batch["index"].tolist()]


def _tiny_dataset(n, augment=None):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (16, 16 * n, 1), dtype=np.uint8)
    mask = (raw[..., 0] > 128).astype(np.uint8)
    images = ImageSet([ImageEntry("t", 16, 16 * n, 1, 0.0, 255.0)], [(raw, mask)])
    return TileDataset(images, [(0, 0, 16 * k) for k in range(n)], 16, augment)


def test_train_loader_shuffles_each_epoch_reproducibly():
    data = _tiny_dataset(20)
    loader = make_loader(data, batch_size=4, train=True, num_workers=0, seed=3, distributed=False, pin_memory=False)
    orders = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        orders.append(_indices(loader))
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(20))
    assert orders[0] != orders[1] and orders[0] != list(range(20))
    twin = make_loader(data, batch_size=4, train=True, num_workers=0, seed=3, distributed=False, pin_memory=False)
    twin.sampler.set_epoch(1)
    assert _indices(twin) == orders[1]


@pytest.mark.parametrize("n, batch, drop", [(17, 8, True), (18, 8, False), (16, 8, False), (5, 1, False), (9, 4, True)])
def test_drop_last_only_when_a_single_tile_would_be_left(n, batch, drop):
    loader = make_loader(_tiny_dataset(n), batch_size=batch, train=True, num_workers=0, seed=0, distributed=False,
                         pin_memory=False)
    sizes = [len(b["id"]) for b in loader]
    assert loader.drop_last is drop
    assert 1 not in sizes or batch == 1
    assert sum(sizes) == n - (n % batch if drop else 0)


def test_a_single_tile_is_too_few_to_train():
    with pytest.raises(ValueError, match="training set has 1 tile"):
        make_loader(_tiny_dataset(1), batch_size=2, train=True, num_workers=0, seed=0, distributed=False,
                    pin_memory=False)


def test_evaluation_shards_without_padding_and_in_order():
    data = _tiny_dataset(10)
    assert _indices(make_loader(data, batch_size=3, train=False, num_workers=0, seed=0, distributed=False,
                                pin_memory=False)) == list(range(10))
    shards = [_indices(make_loader(data, batch_size=3, train=False, num_workers=0, seed=0, distributed=True,
                                   pin_memory=False, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def test_distributed_training_uses_a_distributed_sampler_with_set_epoch():
    data = _tiny_dataset(10)
    loaders = [make_loader(data, batch_size=5, train=True, num_workers=0, seed=0, distributed=True,
                           pin_memory=False, rank=r, world_size=2) for r in range(2)]
    for loader in loaders:
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        loader.sampler.set_epoch(1)
    a, b = (_indices(loader) for loader in loaders)
    assert sorted(a + b) == list(range(10)) and a != sorted(a)
    loaders[0].sampler.set_epoch(2)
    assert _indices(loaders[0]) != a


def test_training_workers_restart_each_epoch_and_draw_each_samples_augmentation_from_the_seed_and_index():
    spec = [{"name": "GaussNoise", "p": 1, "std_range": [0.2, 0.2]}]
    data = _tiny_dataset(4, build_augmentation(spec, seed=0))
    data.tiles = [data.tiles[0]] * 4  # the same tile four times: differences come from the RNG
    data.ids = [data.ids[0]] * 4

    def images(workers=2):
        loader = make_loader(data, batch_size=1, train=True, num_workers=workers, seed=5, distributed=False,
                             pin_memory=False)
        # issue #11: workers restart each epoch, and so copy the seed the trainer sets per epoch
        assert not loader.persistent_workers
        loader.sampler.set_epoch(0)
        return {int(b["index"]): b["image"] for b in loader}, loader

    (first, loader), (second, _) = images(), images()
    assert all(torch.equal(first[k], second[k]) for k in range(4))
    data.reseed(77)  # what SegTrainer.seed_epoch does
    again = {int(b["index"]): b["image"] for b in loader}
    assert all(torch.equal(again[k], b["image"]) for b in loader for k in [int(b["index"])])
    assert not all(torch.equal(again[k], first[k]) for k in range(4))
    # indices 0..3 are spread over two workers; no two items share an augmentation draw
    assert len({first[k].sum().item() for k in range(4)}) == 4
    # issue 22: which worker loads a sample, or none, changes nothing
    alone, _ = images(workers=0)  # make_loader sets seed 5 again
    assert all(torch.equal(alone[k], first[k]) for k in range(4))


def test_default_collate_gives_the_documented_batch(tmp_path):
    s = _build("synthetic", tmp_path, seg_classes=3)
    batch = next(iter(make_loader(s.test, batch_size=4, train=False, num_workers=0, seed=0, distributed=False,
                                  pin_memory=False)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == torch.int64
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["id"][0] == f"{s.test_ids[0]}_y0000_x0000" and batch["id"][1] == f"{s.test_ids[0]}_y0000_x0032"
    assert float(batch["image"].min()) >= 0 and float(batch["image"].max()) <= 1
    assert os.path.isfile(tmp_path / "run" / "tts.json")


def test_non_image_files_are_ignored_with_a_one_line_notice(tmp_path, capsys):
    # issue #11: a README or notes.txt inside images/ blocked training
    _good(tmp_path, "a")
    _good(tmp_path, "b")
    (tmp_path / "images" / "README").write_text("about these images")
    (tmp_path / "images" / "notes.txt").write_text("x")
    images = load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=16)
    assert images.ids == ["a", "b"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ignoring 2 non-image entries in images/: README, notes.txt" in err


def test_one_bad_mask_in_a_0_255_dataset_is_the_only_one_named(tmp_path):
    # issue #11: the mask value error listed every mask (all hold 255) instead of the one bad file
    rng = np.random.default_rng(0)
    for stem in ("a", "b", "c"):
        _pair(tmp_path, stem, rng.integers(0, 256, (40, 40), dtype=np.uint8), random_box(rng, 40, 40) * 255)
    odd = random_box(rng, 40, 40) * 255
    odd[0, 0] = 128
    _pair(tmp_path, "d", rng.integers(0, 256, (40, 40), dtype=np.uint8), odd)
    with pytest.raises(DatasetError) as err:
        load_folder(tmp_path, input_channels=1, seg_classes=1, input_size=16)
    message = str(err.value)
    assert "1 problem(s)" in message and "masks/d.png: mask value(s) 128 are neither 0 nor 255" in message
    assert "a.png" not in message and "b.png" not in message


@pytest.mark.parametrize("value, names", [
    ("[{name: HorizontalFlip, p: 1.0}, {name: RandomRotate90, p: 0.5}]", ["HorizontalFlip", "RandomRotate90"]),
    ("none", None),
    ("default", [type(t).__name__ for t in build_augmentation(DEFAULT_AUGMENTATIONS).transforms]),
    ("flips", ["HorizontalFlip", "VerticalFlip", "RandomRotate90"]),
])
def test_every_form_of_augmentations_reaches_the_training_set(tmp_path, value, names):
    from configs import load_config
    from engines.builders import build_data

    cfg = load_config(None, [f"AUGMENTATIONS={value}", f"RESULTS_DIR={tmp_path}", "SYNTHETIC_IMAGES=5",
                             "SYNTHETIC_SIZE=128"])
    splits = build_data(cfg, tmp_path / "tts.json", 0)
    augment = splits.train.augment
    assert (augment is None) if names is None else [type(t).__name__ for t in augment.transforms] == names
    assert splits.test.augment is None


def test_flips_give_the_8_flips_and_quarter_turns_and_nothing_else():
    from utils.augment_presets import AUGMENTATION_PRESETS

    augment = build_augmentation(AUGMENTATION_PRESETS["flips"], seed=0)
    assert [(type(t).__name__, t.p) for t in augment.transforms] == [
        ("HorizontalFlip", 0.5), ("VerticalFlip", 0.5), ("RandomRotate90", 0.5)]
    image = np.arange(9, dtype=np.uint8).reshape(3, 3)  # no symmetry: each of the 8 maps gives another image
    dihedral = {np.rot90(m, k).tobytes() for m in (image, image.T) for k in range(4)}
    seen = {}
    for n in range(400):
        out = augment(image=image, mask=image)
        assert np.array_equal(out["image"], out["mask"])  # image and mask move together
        seen[out["image"].tobytes()] = seen.get(out["image"].tobytes(), 0) + 1
    assert set(seen) == dihedral
    # each transform fires half the time: the identity, the half turn and the two flips come 3/16 of the
    # time (75 of 400; e.g. identity = no flip or both flips, then no turn: 1/4 * 5/8 + 1/4 * 1/8), the
    # quarter turns and the two diagonal mirrors 1/16 (25 of 400)
    often = {np.rot90(image, 2).tobytes(), image.tobytes(), image[::-1].tobytes(), image[:, ::-1].tobytes()}
    assert all(55 <= seen[m] <= 95 for m in often) and all(10 <= seen[m] <= 40 for m in dihedral - often)


# ------------------------------------------------------------------------- whole-image distances
def _scipy_scene_sdm(mask: np.ndarray, c: int) -> np.ndarray:
    """The boundary-loss reference SDM of class c over the whole mask (SciPy EDT)."""
    pos = mask == c
    if not pos.any() or pos.all():
        return np.zeros(mask.shape)
    return ndimage.distance_transform_edt(~pos) * ~pos - (ndimage.distance_transform_edt(pos) - 1) * pos


def test_scene_sdm_tiles_carry_the_whole_images_distances(tmp_path):
    # 96x64 images, 32-px tiles: a disk of class 1 and a bar of class 2 in the top-left tiles,
    # so most tiles hold neither class and only the whole image knows how far they are
    rng = np.random.default_rng(0)
    for n in range(5):
        mask = np.zeros((64, 96), np.uint8)
        yy, xx = np.mgrid[:64, :96]
        mask[(yy - 10 - n) ** 2 + (xx - 12) ** 2 <= 36] = 1
        mask[20:23, 2:30] = 2
        if n == 4:
            mask[:] = 0  # an image without any object: zero maps
        _pair(tmp_path / "data", f"{n:02d}", rng.integers(0, 255, (64, 96), dtype=np.uint8), mask)
    scene = SceneSDM(3)
    splits = _build(tmp_path / "data", tmp_path, seg_classes=3, scene_sdm=scene)
    ds = splits.train
    # every training image's maps exist once the set is built, before any loader worker starts
    assert sorted(scene._maps) == sorted({i for i, _, _ in ds.tiles})
    assert "sdm" not in splits.test[0]  # the test tiles are scored by metrics, not losses
    far = 0
    for k in range(len(ds)):
        i, y, x = ds.tiles[k]
        mask = ds.images.get(i)[1]
        item = ds[k]
        assert item["sdm"].shape == (2, 32, 32) and item["sdm"].dtype == torch.float32
        for c in (1, 2):
            ref = _scipy_scene_sdm(mask, c)[y:y + 32, x:x + 32]
            np.testing.assert_allclose(item["sdm"][c - 1].numpy(), ref, atol=1e-4)
        far += int(item["sdm"].min() > 0 and item["mask"].max() == 0)
    assert far > 0  # tiles with no object still carry (positive) distances


@pytest.mark.parametrize("why", ["lazy dataset", "over the memory budget", "in memory"])
def test_scene_sdm_of_a_large_dataset_lives_in_files_read_through_memory_maps(tmp_path, monkeypatch, why):
    import pickle

    import utils.dataset as dataset_module

    rng = np.random.default_rng(2)
    for n in range(5):
        mask = np.zeros((64, 96), np.uint8)
        mask[8 + n:20 + n, 60:70] = 1
        mask[40:43, 5:40] = 2
        _pair(tmp_path / "data", f"{n:02d}", rng.integers(0, 255, (64, 96), dtype=np.uint8), mask)
    if why == "lazy dataset":  # decoded per tile (the maps would fit the budget): not in memory either
        monkeypatch.setattr(image_io, "MEMORY_CACHE_FRACTION", 0.0)
        monkeypatch.setattr(dataset_module, "memory_budget", lambda: 2**40)
    elif why == "over the memory budget":  # images held in memory (61 kB); the maps (197 kB) fit the
        monkeypatch.setattr(dataset_module, "memory_budget", lambda: 200_000)  # budget, but not beside them
    monkeypatch.setattr(dataset_module, "LAZY_CACHE_IMAGES", 2)  # memory maps kept open (file descriptors)
    folder = tmp_path / "results" / ".cache"
    scene = SceneSDM(3, folder=folder)
    ds = _build(tmp_path / "data", tmp_path, seg_classes=3, scene_sdm=scene).train
    assert ds.images.in_memory == (why != "lazy dataset")
    trained = sorted({i for i, _, _ in ds.tiles})
    if why == "in memory":  # a small dataset: the maps stay in memory, nothing is written
        assert sorted(scene._maps) == trained and not scene._files and not folder.exists()
        return
    assert not scene._maps and sorted(scene._files) == trained
    assert sorted(p.name for p in folder.glob("scene_sdm_*.npy")) == sorted(p.name for p in scene._files.values())
    assert not list(folder.glob(".*.tmp"))  # written atomically, nothing left behind
    for k in range(len(ds)):
        i, y, x = ds.tiles[k]
        mask = ds.images.get(i)[1]
        for c in (1, 2):
            ref = _scipy_scene_sdm(mask, c)[y:y + 32, x:x + 32]
            np.testing.assert_allclose(ds[k]["sdm"][c - 1].numpy(), ref, atol=1e-4)
        assert len(scene._mapped) <= 2
    # a loader worker receives file names, not maps (nor this process's memory maps), and reads the same
    assert scene._mapped and len(pickle.dumps(scene)) < 2000
    loader = make_loader(ds, batch_size=len(ds), train=False, num_workers=1, seed=0, distributed=False,
                         pin_memory=False)
    batch = next(iter(loader))
    assert torch.equal(batch["sdm"], torch.stack([ds[k]["sdm"] for k in range(len(ds))]))
    # a later run (or another rank) reuses the files instead of computing the maps again
    monkeypatch.setattr(dataset_module, "signed_distance_map", lambda *a, **k: pytest.fail("recomputed"))
    again = SceneSDM(3, folder=folder)
    again.prepare(ds.images, trained)
    assert again._files == scene._files
    np.testing.assert_array_equal(again.of(ds.images, trained[0]), scene.of(ds.images, trained[0]))


def test_scene_sdm_files_are_keyed_by_the_mask_checked_on_reuse_and_fail_clearly(tmp_path, monkeypatch):
    import utils.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "memory_budget", lambda: 0)  # every map goes to a file
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 10:30] = 1
    moved = np.roll(mask, 5, axis=1)
    entries = [ImageEntry(f"m{k}", 40, 50, 1, 0.0, 255.0) for k in range(2)]
    images = ImageSet(entries, [(np.zeros((40, 50, 1), np.uint8), m) for m in (mask, moved)])
    folder = tmp_path / ".cache"
    scene = SceneSDM(1, folder=folder)
    scene.prepare(images, [0, 1])
    assert scene._files[0] != scene._files[1]  # another mask, another file
    SceneSDM(1, "chebyshev", folder=folder).prepare(images, [0])
    assert len(list(folder.glob("*.npy"))) == 3  # another distance, another file
    # a truncated file (an interrupted copy) is made again, not read
    path = scene._files[0]
    path.write_bytes(path.read_bytes()[:200])
    fresh = SceneSDM(1, folder=folder)
    fresh.prepare(images, [0])
    np.testing.assert_allclose(fresh.of(images, 0)[0], _scipy_scene_sdm(mask, 1), atol=1e-4)
    # a folder that cannot be made, or a disk without room: a DatasetError naming the folder and the way out
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(DatasetError, match=r"cannot create .*a_file.*SDM_SCOPE: tile"):
        SceneSDM(1, folder=blocked / ".cache").prepare(images, [0])
    monkeypatch.setattr(dataset_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(DatasetError, match=r"need .*GiB in .*\.cache2, which has 0\.0 GiB free"):
        SceneSDM(1, folder=tmp_path / ".cache2").prepare(images, [0, 1])


def test_scene_sdm_moves_with_the_mask_under_flips_and_turns(tmp_path):
    rng = np.random.default_rng(1)
    for n in range(5):
        mask = np.zeros((64, 64), np.uint8)
        mask[5 + n:15 + n, 40:50] = 1
        _pair(tmp_path / "data", f"{n:02d}", rng.integers(0, 255, (64, 64), dtype=np.uint8), mask)
    augment = [{"name": "HorizontalFlip", "p": 1.0}, {"name": "RandomRotate90", "p": 1.0}]
    ds = _build(tmp_path / "data", tmp_path, scene_sdm=SceneSDM(1), augmentations=augment).train
    for k in range(len(ds)):
        item = ds[k]
        assert item["sdm"].shape == (1, 32, 32)  # binary head: one map, of class 1
        sdm, mask = item["sdm"][0].numpy(), item["mask"].numpy()
        # inside the object the map is <= 0, outside it is >= 1: the map still fits the mask
        assert (sdm[mask == 1] <= 0).all() and (sdm[mask == 0] >= 1).all()
