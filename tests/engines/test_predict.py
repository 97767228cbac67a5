"""The ``predict`` command (engines/predict.py) and what it writes where: it goes on past a bad file
and lists it, falls back to GATING=false for a checkpoint that cannot gate, never replaces a file it
did not make, never writes beside its inputs or into a used OUTPUT, keeps both results of inputs that
share a stem, and a write error, a full disk or Ctrl-C leaves no partial output, temporary file or
empty folder behind. The sliding windows themselves: test_sliding_window.py."""

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from configs import load_config
from conftest import nan_checkpoint, predict_config
from engines import predict as predict_module
from engines.predict import RecordsFile, predict
from engines.sliding_window import Predictor
from model.AuxNet import AuxNet
from utils.raster_write import MaskWriter


def _images(folder: Path, *names: str, size: int = 64) -> Path:
    """Random gray images under ``folder`` (PNG or TIFF by suffix); a ``bad_`` name holds no image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        if name.startswith("bad_"):
            (folder / name).write_bytes(b"not an image")
        elif name.endswith(".tif"):
            tifffile.imwrite(folder / name, rng.integers(0, 256, (size, size), dtype=np.uint8))
        else:
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / name)
    return folder


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fd_path(fd: int) -> str:
    """The path of an open file descriptor (Linux's /proc; elsewhere the test is skipped)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd (Linux) to tell which output a file descriptor writes")
    return os.readlink(f"/proc/self/fd/{fd}")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _run(checkpoint, inputs, out, *extra):
    return predict(predict_config(checkpoint, f"INPUT={inputs}", f"OUTPUT={out}", "GATING=false", *extra))


# ---- a folder with a bad file, and a checkpoint that cannot gate


def test_predict_a_folder_goes_on_past_a_bad_file_and_lists_it(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(5)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (90, 150), dtype=np.uint8)).save(folder / "a.png")
    tifffile.imwrite(folder / "b16.tif", rng.integers(0, 65536, (130, 70), dtype=np.uint16), compression="zlib",
                     tile=(32, 32))
    (folder / "c.png").write_bytes(b"not a png at all")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "d_rgb.png")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    status = predict(predict_config(checkpoint, f"INPUT={folder}", f"OUTPUT={out}", "GATING=false",
                                  "SAVE_PROBABILITIES=true"))
    printed = capsys.readouterr().out
    assert status == 2
    assert "2 image(s) failed" in printed and "c.png" in printed and "d_rgb.png" in printed and "INPUT_CHANNELS" in printed
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["image"].split("/")[-1] for r in records] == ["a.png", "b16.tif"]
    mask = np.asarray(Image.open(out / "a_mask.png"))
    assert mask.shape == (90, 150) and set(np.unique(mask)) <= {0, 255}  # one foreground class: 0/255 gray
    assert np.asarray(Image.open(out / "b16_mask.png")).shape == (130, 70)
    prob = np.asarray(Image.open(out / "b16_prob.tif"))  # uint8 0-255 opens in Pillow
    assert prob.dtype == np.uint8 and prob.shape == (130, 70)
    assert ((prob > 127) == (np.asarray(Image.open(out / "b16_mask.png")) == 255)).mean() > 0.99
    assert (out / "a_overlay.png").is_file() and records[1]["tiles"] == records[1]["decoded"]


def test_predict_writes_a_palette_mask_of_class_indices_and_float32_probabilities_on_request(tmp_path):
    from conftest import write_checkpoint

    cfg = load_config(None, ["INPUT_SIZE=64", "UNET_DEPTH=3", "CONV_DEPTH=4", "MIXED_PRECISION=none",
                             "CHANNELS_LAST=false", "SEG_CLASSES=3", "LOSS=SoftDICE_CE"])
    torch.manual_seed(0)
    weights = write_checkpoint(tmp_path / "best.pth", cfg)
    inputs = _images(tmp_path / "in", "a.png")
    out = tmp_path / "out"
    assert _run(weights, inputs, out, "SAVE_PROBABILITIES=true", "PROBABILITIES_DTYPE=float32") == 0
    prob = tifffile.imread(out / "a_prob.tif")
    assert prob.dtype == np.float32 and prob.shape == (64, 64, 3)
    np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-5)
    with Image.open(out / "a_mask.png") as im:
        assert im.mode == "P" and im.getpalette()[:9] == [0, 0, 0, 230, 159, 0, 86, 180, 233]
        np.testing.assert_array_equal(np.asarray(im), prob.argmax(-1))  # the pixels are the class indices
    assert (out / "a_overlay.png").is_file()


@pytest.mark.parametrize("kind", ["UNet", "no fill head"])
def test_a_checkpoint_that_cannot_gate_falls_back_to_gating_false_unless_gating_is_typed(checkpoint, tmp_path, capsys,
                                                                                        kind):
    from configs import ConfigError

    state = torch.load(checkpoint, weights_only=True)
    if kind == "UNet":
        state["model"] = AuxNet(1, 1, 0, depth=3, base_width=4).state_dict()
        state["config"] = {**state["config"], "MODEL": "UNet", "EVAL_METRIC": "DSC"}
        why = "MODEL=UNet has no classifier head"
    else:  # made before the fill head existed
        state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("fill_head.")}
        why = "it has no fill head (it was made before gated prediction existed)"
    old = tmp_path / "old.pth"
    torch.save(state, old)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "x.png")
    args = (f"INPUT={tmp_path / 'x.png'}", f"OUTPUT={tmp_path / 'o'}")
    # before: refused ("use GATING=false") although GATING was never typed, as the README says it falls back
    read = predict_config(old, *args)
    notes = [line for line in capsys.readouterr().out.splitlines(keepends=True) if "MIXED_PRECISION" not in line]
    assert "".join(notes) == f"note: GATING=false for MODEL_WEIGHTS={old}: {why}, so every tile is decoded\n"
    assert read.cfg.GATING is False and predict(read) == 0
    with pytest.raises(ConfigError, match=rf"GATING=true, but MODEL_WEIGHTS='{old}' cannot gate tiles: "
                                          rf"{re.escape(why)}\. "
                                          r"Use GATING=false \(or leave it out\), or train its heads first with "
                                          rf"`main.py train MODEL=AuxNet-C MODEL_WEIGHTS={old}`"):
        predict_config(old, *args, "GATING=true")
    from engines.inference import load_for_inference  # eval falls back and refuses alike

    args = [f"MODEL_WEIGHTS={old}"]
    assert load_for_inference(load_config(None, args), args).cfg.GATING is False
    with pytest.raises(ConfigError, match="GATING=true, but"):
        load_for_inference(load_config(None, [*args, "GATING=true"]), [*args, "GATING=true"])


#: Why an AuxNet-ED checkpoint does not gate (its head was carried along untrained).
UNTRAINED_HEAD = "its classifier head was never trained (MODEL=AuxNet-ED carries it along untrained)"


@pytest.mark.parametrize("model, recorded, gates", [
    ("AuxNet-ED", False, False),  # an ED run: the head is carried along untrained
    ("AuxNet-ED", None, False),  # made before head_trained was recorded: told from MODEL
    ("AuxNet-ED", True, True),  # an ED run that started from a trained head (MODEL_WEIGHTS)
    ("AuxNet-EDC", None, True),
    ("AuxNet-D", None, True),  # AuxNet-D starts from a trained network and keeps its head
])
def test_only_a_checkpoint_whose_head_was_trained_gates(checkpoint, tmp_path, capsys, model, recorded, gates):
    from configs import ConfigError
    from engines.inference import load_for_inference

    state = torch.load(checkpoint, weights_only=True)
    state["config"] = {**state["config"], "MODEL": model}
    if recorded is None:
        state.pop("head_trained", None)  # a checkpoint made before head_trained was recorded
    else:
        state["head_trained"] = recorded
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    args = [f"MODEL_WEIGHTS={path}", "GPUs=[]"]
    read = load_for_inference(load_config(None, args), args, "predict")
    notes = [line for line in capsys.readouterr().out.splitlines() if "MIXED_PRECISION" not in line]
    # before: an ED checkpoint gated by default, its untrained head deciding which windows to decode
    assert (read.can_gate, read.cfg.GATING) == (gates, gates)
    if gates:
        assert notes == []
        return
    assert notes == [f"note: GATING=false for MODEL_WEIGHTS={path}: {UNTRAINED_HEAD}, so every tile is decoded"]
    with pytest.raises(ConfigError, match=re.escape(f"cannot gate tiles: {UNTRAINED_HEAD}. Use GATING=false")):
        load_for_inference(load_config(None, [*args, "GATING=true"]), [*args, "GATING=true"], "predict")


def test_a_run_records_whether_its_head_is_trained():
    from engines.checkpoint import LoadReport, head_is_trained

    def cfg(model):
        return load_config(None, [f"MODEL={model}", "EVAL_METRIC=TTR" if model == "AuxNet-C" else "EVAL_METRIC=DSC",
                                  "GPUs=[]"] + ([] if model in ("AuxNet-EDC", "AuxNet-ED", "UNet") else
                                                [f"MODEL_WEIGHTS={__file__}"]))

    def loaded(trained, head_initialised=False):
        return LoadReport(loaded=[], initialised=["head.fc.weight"] if head_initialised else [], ignored=[],
                          head_trained=trained)

    assert head_is_trained(cfg("AuxNet-EDC"), None) and head_is_trained(cfg("AuxNet-C"), loaded(False))
    assert not head_is_trained(cfg("AuxNet-ED"), None) and not head_is_trained(cfg("UNet"), None)
    assert head_is_trained(cfg("AuxNet-ED"), loaded(True))  # started from a trained head
    assert not head_is_trained(cfg("AuxNet-ED"), loaded(True, head_initialised=True))  # the file had none
    assert head_is_trained(cfg("AuxNet-D"), loaded(True)) and not head_is_trained(cfg("AuxNet-D"), loaded(False))


# ---- OUTPUT and INPUT


def test_output_equal_to_the_input_folder_is_refused_and_the_inputs_stay(checkpoint, tmp_path, capsys):
    inputs = _images(tmp_path / "in", "x.png", "x_mask.png")
    before = _snapshot(inputs)
    assert _run(checkpoint, inputs, inputs) == 2
    assert (f"OUTPUT={str(inputs)!r} is the INPUT folder: predict never writes beside its inputs; use e.g. "
            f"OUTPUT={inputs / 'predictions'}") in capsys.readouterr().out
    assert _snapshot(inputs) == before  # x_mask.png (a ground truth) is not replaced, nothing is added
    assert _run(checkpoint, inputs / "x.png", inputs) == 2  # the folder of a single INPUT file too
    assert _snapshot(inputs) == before


def test_a_new_subfolder_of_the_input_folder_is_safe_and_outputs_are_never_read_as_inputs(checkpoint, tmp_path):
    inputs = _images(tmp_path / "in", "x.png", "x_mask.png")
    before = _snapshot(inputs)
    for sub in ("predictions", "again"):  # the second run must not read the first one's outputs
        out = inputs / sub
        assert _run(checkpoint, inputs, out) == 0
        assert [Path(r["image"]).name for r in _records(out)] == ["x.png", "x_mask.png"]
        assert sorted(p.name for p in out.iterdir()) == [
            "predictions.jsonl", "x_mask.png", "x_mask_mask.png", "x_mask_overlay.png", "x_overlay.png"]
    assert {k: v for k, v in _snapshot(inputs).items() if "/" not in k} == before


def test_an_existing_file_under_an_output_name_is_never_replaced(checkpoint, tmp_path, monkeypatch, capsys):
    inputs = _images(tmp_path / "in", "a.png", "b.png", "c.png")
    out = tmp_path / "out"
    original = predict_module.predict_file

    def another_process_writes_b_mask(cfg, predictor, path, folder, *args, **kwargs):
        if path.name == "b.png":  # a file that appears under an output's name while predict runs
            (folder / "b_mask.png").write_bytes(b"someone else's file")
        return original(cfg, predictor, path, folder, *args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_file", another_process_writes_b_mask)
    assert _run(checkpoint, inputs, out) == 2
    printed = capsys.readouterr().out
    assert (f"{inputs / 'b.png'}: cannot write its outputs: {out / 'b_mask.png'}: exists already and was not "
            "written by this command; it is left as it is") in printed
    assert (out / "b_mask.png").read_bytes() == b"someone else's file"
    assert sorted(p.name for p in out.iterdir()) == [
        "a_mask.png", "a_overlay.png", "b_mask.png", "c_mask.png", "c_overlay.png", "predictions.jsonl"]
    assert [Path(r["image"]).name for r in _records(out)] == ["a.png", "c.png"]


def test_mask_writer_without_overwrite_leaves_an_existing_file_and_no_temporary_file(tmp_path):
    (tmp_path / "m.png").write_bytes(b"keep")
    writer = MaskWriter(tmp_path / "m.png", 4, 4, overwrite=False)
    writer.write_rows(0, np.zeros((4, 4), np.uint8))
    with pytest.raises(FileExistsError, match="exists already and was not written by this command"):
        writer.close()
    assert not writer.committed and os.listdir(tmp_path) == ["m.png"]
    assert (tmp_path / "m.png").read_bytes() == b"keep"


# ---- two inputs with one stem


# ---- INPUT: a file, a folder, a glob pattern or a .txt list


def _inputs(given: str) -> list[str]:
    from configs.schema import Config

    return [str(p) for p in predict_module.check_inputs(Config(INPUT=given))]


def test_input_takes_a_glob_pattern_or_a_txt_list(tmp_path, capsys, monkeypatch):
    _images(tmp_path / "scenes", "b.tif", "a.tif", "c.png")
    _images(tmp_path / "scenes" / "deep", "d.tif")
    (tmp_path / "scenes" / "notes.tif.txt").write_text("not an image")
    s = tmp_path / "scenes"
    assert _inputs(f"{s}/*.tif") == [f"{s}/a.tif", f"{s}/b.tif"]
    assert _inputs(f"{s}/**/*.tif") == [f"{s}/a.tif", f"{s}/b.tif", f"{s}/deep/d.tif"]
    assert _inputs(f"{s}/[bc].*") == [f"{s}/b.tif", f"{s}/c.png"]
    (s / "list.txt").write_text(f"# test scenes\nc.png\n\n  deep/d.tif\n{s}/a.tif\nc.png\n")
    assert _inputs(f"{s}/list.txt") == [f"{s}/c.png", f"{s}/deep/d.tif", f"{s}/a.tif"]  # in its order, once each
    monkeypatch.chdir(s)
    assert _inputs("*.png") == ["c.png"]


def test_an_input_pattern_or_list_that_names_no_image_is_one_clear_error(tmp_path):
    from configs import ConfigError

    _images(tmp_path, "a.png")
    with pytest.raises(ConfigError, match=re.escape(f"INPUT='{tmp_path}/*.tif' (a glob pattern) matches no image "
                                                    "(.png, .jpg, .jpeg, .tif, .tiff, .jp2, .j2k)")):
        _inputs(f"{tmp_path}/*.tif")
    with pytest.raises(ConfigError, match=re.escape(f"INPUT='{tmp_path}/scene.tif': no such file or folder (nor a "
                                                    "glob pattern: use *, ? or [...])")):
        _inputs(f"{tmp_path}/scene.tif")
    (tmp_path / "list.txt").write_text("a.png\nmissing.tif\nlist.txt\n")
    with pytest.raises(ConfigError) as err:
        _inputs(f"{tmp_path}/list.txt")
    assert err.value.problems == [
        f"INPUT='{tmp_path}/list.txt' line 2: {tmp_path}/missing.tif: no such file; fix or remove the line",
        f"INPUT='{tmp_path}/list.txt' line 3: {tmp_path}/list.txt is not an image (.png, .jpg, .jpeg, .tif, .tiff, "
        ".jp2, .j2k); fix or remove the line"]
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="lists no image: write one image path a line"):
        _inputs(f"{tmp_path}/empty.txt")


def test_predict_segments_the_images_a_glob_pattern_matches(checkpoint, tmp_path):
    inputs = _images(tmp_path / "in", "a.png", "b.tif", "c.png")
    out = tmp_path / "out"
    assert _run(checkpoint, f"{inputs}/*.png", out) == 0
    assert [Path(r["image"]).name for r in _records(out)] == ["a.png", "c.png"]


def test_two_inputs_with_one_stem_keep_both_results(checkpoint, tmp_path, capsys):
    inputs = _images(tmp_path / "in", "scene.png", "scene.tif", "other.png")
    out = tmp_path / "out"
    assert _run(checkpoint, inputs, out, "SAVE_PROBABILITIES=true") == 0
    assert ("note: inputs that share a name keep both results, named with their suffix: "
            "scene.png -> scene_png_mask, scene.tif -> scene_tif_mask") in capsys.readouterr().out
    records = _records(out)
    assert [Path(r["mask"]).name for r in records] == ["other_mask.png", "scene_png_mask.png", "scene_tif_mask.png"]
    for key in ("mask", "overlay", "probabilities"):
        assert len({r[key] for r in records}) == 3 and all(Path(r[key]).is_file() for r in records)
    assert len(list(out.iterdir())) == 3 * 3 + 1


def test_output_names_stay_distinct_when_a_suffixed_name_is_taken():
    from engines.predict import output_names

    files = [Path(n) for n in ("scene.png", "scene.tif", "scene_png.jpg", "Scene.jpeg")]
    assert output_names(sorted(files)) == {
        Path("Scene.jpeg"): "Scene_jpeg", Path("scene.png"): "scene_png", Path("scene.tif"): "scene_tif",
        Path("scene_png.jpg"): "scene_png_2"}


# ---- a used OUTPUT, and a fresh predict_<n>/ without one


def test_a_used_output_is_refused_before_anything_is_predicted(checkpoint, tmp_path, capsys):
    inputs = _images(tmp_path / "in", "a.png")
    out = tmp_path / "out"
    assert _run(checkpoint, inputs, out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert _run(checkpoint, inputs, out) == 2
    printed = capsys.readouterr().out
    assert (f"OUTPUT={str(out)!r} is not empty (it holds a_mask.png, a_overlay.png, predictions.jsonl): predict "
            "writes only into a new or empty folder, so results of two runs are never mixed or replaced; choose "
            f"another OUTPUT, empty {out}, or leave OUTPUT unset for a fresh predict_<n>/ beside the checkpoint"
            ) in printed
    assert "predicted" not in printed and _snapshot(out) == before


def test_without_output_every_predict_writes_a_fresh_folder_beside_the_checkpoint(checkpoint, tmp_path):
    weights = tmp_path / "run" / "best.pth"
    weights.parent.mkdir()
    shutil.copy(checkpoint, weights)
    inputs = _images(tmp_path / "in", "a.png")
    for n in (1, 2):
        assert predict(predict_config(weights, f"INPUT={inputs}", "GATING=false")) == 0
        assert len(_records(weights.parent / f"predict_{n}")) == 1


# ---- leftovers of a killed predict, and folders of a predict that wrote nothing

LEFTOVERS = (".a_mask.png.k2j_9x0q.tmp", ".predictions.jsonl.ab12cd34.tmp", ".write_test.4242")


def test_the_temporary_leftovers_of_a_killed_predict_are_removed(checkpoint, tmp_path, capsys):
    inputs = _images(tmp_path / "in", "a.png")
    out = tmp_path / "out"
    out.mkdir()
    for name in LEFTOVERS:
        (out / name).write_bytes(b"\0" * 1000)
    assert _run(checkpoint, inputs, out) == 0
    assert f"note: removed 3 temporary file(s) that an interrupted predict left in {out}" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["a_mask.png", "a_overlay.png", "predictions.jsonl"]


def test_every_temporary_file_predict_writes_is_hidden_and_recognised_as_a_leftover(checkpoint, tmp_path,
                                                                                    monkeypatch):
    inputs = _images(tmp_path / "in", "a.png", "b.tif")
    temporaries, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: temporaries.append(_fd_path(fd)) or real(fd))
    assert _run(checkpoint, inputs, tmp_path / "out", "SAVE_PROBABILITIES=true") == 0
    names = sorted({Path(p).name.rsplit(".", 2)[0] for p in temporaries})
    assert names == [".a_mask.png", ".a_overlay.png", ".a_prob.tif", ".b_mask.png", ".b_overlay.png", ".b_prob.tif",
                     ".predictions.jsonl"]
    assert all(predict_module._LEFTOVER.fullmatch(Path(p).name) for p in temporaries)
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]  # none is left


def test_leftovers_beside_real_files_are_left_with_them(checkpoint, tmp_path, capsys):
    inputs = _images(tmp_path / "in", "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / LEFTOVERS[0]).write_bytes(b"")
    (out / ".notes.tmp").write_bytes(b"a hidden file of the user's")  # not a name predict makes
    assert _run(checkpoint, inputs, out) == 2
    assert "(it holds .notes.tmp)" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == [LEFTOVERS[0], ".notes.tmp"]


def test_a_predict_that_fails_on_every_file_leaves_no_folder_it_made(checkpoint, tmp_path, capsys):
    inputs = _images(tmp_path / "in", "bad_1.png", "bad_2.png")
    assert _run(checkpoint, inputs, tmp_path / "new" / "deeper") == 2
    assert "2 image(s) failed" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["in"]
    (tmp_path / "mine").mkdir()  # an empty OUTPUT the user made stays
    assert _run(checkpoint, inputs, tmp_path / "mine") == 2
    assert (tmp_path / "mine").is_dir() and not os.listdir(tmp_path / "mine")


# ---- write errors, a full disk, Ctrl-C


def _fail_fsync(monkeypatch, error, name_part: str, occurrence: int = 1):
    """Make ``os.fsync`` raise ``error`` on the ``occurrence``-th temporary file whose name holds
    ``name_part`` (every output is flushed with fsync before its rename)."""
    real, seen = os.fsync, []

    def fsync(fd):
        if name_part in _fd_path(fd):
            seen.append(fd)
            if len(seen) == occurrence:
                raise error
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("where, occurrence", [("b_mask", 1), ("b_overlay", 1), ("predictions.jsonl", 2)])
def test_a_full_disk_stops_the_folder_and_leaves_only_whole_results(checkpoint, tmp_path, monkeypatch, capsys,
                                                                     where, occurrence):
    inputs = _images(tmp_path / "in", "a.png", "b.png", "c.png")
    out = tmp_path / "out"
    _fail_fsync(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), where, occurrence)
    assert _run(checkpoint, inputs, out) == 2
    printed = capsys.readouterr().out
    assert f"  - {inputs / 'b.png'}: cannot write its outputs: {out}: No space left on device" in printed
    assert (f"error: stopped: cannot write into {out} (No space left on device): free some space on that disk, "
            "or choose an OUTPUT on another one; 1 image(s) were not predicted") in printed
    assert "predicted 1 of 3 image(s)" in printed
    assert sorted(os.listdir(out)) == ["a_mask.png", "a_overlay.png", "predictions.jsonl"]  # no b_*, no .tmp
    assert [Path(r["image"]).name for r in _records(out)] == ["a.png"]


def test_another_write_error_fails_that_image_only(checkpoint, tmp_path, monkeypatch, capsys):
    inputs = _images(tmp_path / "in", "a.png", "b.png", "c.png")
    out = tmp_path / "out"
    _fail_fsync(monkeypatch, OSError(errno.EIO, os.strerror(errno.EIO)), "b_overlay")
    assert _run(checkpoint, inputs, out) == 2
    printed = capsys.readouterr().out
    assert f"error: 1 image(s) failed:\n  - {inputs / 'b.png'}: cannot write its outputs: {out}: Input/output error" \
        in printed and "stopped" not in printed
    assert [Path(r["image"]).name for r in _records(out)] == ["a.png", "c.png"]
    assert sorted(os.listdir(out)) == ["a_mask.png", "a_overlay.png", "c_mask.png", "c_overlay.png",
                                       "predictions.jsonl"]


@pytest.mark.parametrize("where", ["a_mask", "b_mask", "b_prob", "b_overlay", "predictions.jsonl"])
def test_ctrl_c_leaves_only_whole_results_and_no_temporary_file(checkpoint, tmp_path, monkeypatch, where):
    inputs = _images(tmp_path / "in", "a.png", "b.png")
    out = tmp_path / "new" / "out"
    _fail_fsync(monkeypatch, KeyboardInterrupt(), where, occurrence=2 if where == "predictions.jsonl" else 1)
    with pytest.raises(KeyboardInterrupt):
        _run(checkpoint, inputs, out, "SAVE_PROBABILITIES=true")
    if where == "a_mask":  # nothing was written: the folders this predict made are gone
        assert not (tmp_path / "new").exists()
        return
    assert sorted(os.listdir(out)) == ["a_mask.png", "a_overlay.png", "a_prob.tif", "predictions.jsonl"]
    assert [Path(r["image"]).name for r in _records(out)] == ["a.png"]


def test_an_output_that_cannot_be_written_is_one_error_before_predicting(checkpoint, tmp_path, monkeypatch,
                                                                          capsys):
    inputs = _images(tmp_path / "in", "a.png")
    out = tmp_path / "out"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr(predict_module, "predict_files", lambda *a: pytest.fail("predicted into a read-only OUTPUT"),
                        raising=False)
    assert _run(checkpoint, inputs, out) == 2
    errors = [line for line in capsys.readouterr().out.splitlines(keepends=True) if not line.startswith("note: ")]
    assert "".join(errors) == (f"error: cannot write the OUTPUT folder {out} (Read-only file system): "
                                       "choose an OUTPUT you can write (or leave it unset for predict_<n>/ beside "
                                       "the checkpoint)\n")
    assert os.listdir(tmp_path) == ["in"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder (chmod does not stop it); "
                    "the monkeypatched and the tmpfs tests cover this")
def test_an_output_in_a_folder_without_write_permission_is_one_error(checkpoint, tmp_path, capsys):
    inputs = _images(tmp_path / "in", "a.png")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert _run(checkpoint, inputs, locked / "out") == 2
    finally:
        locked.chmod(0o755)
    assert f"error: cannot write the OUTPUT folder {locked / 'out'} (Permission denied)" in capsys.readouterr().out


# ---- the same on real file systems: a read-only and a tiny tmpfs (needs root and mount rights)


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(options)``: a tmpfs under tmp_path mounted with ``options``, unmounted at the end."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True) if shutil.which("mount") else None
        if done is None or done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() if done else 'no mount command'}): "
                        "the monkeypatched tests cover the same cases")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_an_output_on_a_read_only_file_system_is_one_error(checkpoint, tmp_path, tmpfs, capsys):
    inputs = _images(tmp_path / "in", "a.png")
    out = tmpfs("ro,size=64k") / "out"
    assert _run(checkpoint, inputs, out) == 2
    errors = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("note: ")]
    assert errors[0].startswith(f"error: cannot write the OUTPUT folder {out} (Read-only file system)")


def test_a_disk_that_fills_up_stops_the_folder_cleanly(checkpoint, tmp_path, tmpfs, capsys):
    inputs = _images(tmp_path / "in", "a.png", "b.png", "c.png", size=160)  # overlays of noise: ~75 kB each
    out = tmpfs("size=120k")
    assert _run(checkpoint, inputs, out) == 2
    printed = capsys.readouterr().out
    assert (f"error: stopped: cannot write into {out} (No space left on device): free some space on that disk, "
            "or choose an OUTPUT on another one; 1 image(s) were not predicted") in printed
    assert sorted(os.listdir(out)) == ["a_mask.png", "a_overlay.png", "predictions.jsonl"]
    assert [Path(r["image"]).name for r in _records(out)] == ["a.png"]


# ---- polygons (SAVE_POLYGONS)


def test_save_polygons_writes_the_mask_as_geojson_in_the_inputs_map_coordinates(checkpoint, tmp_path):
    """A georeferenced input (10 m pixels, EPSG:32633) gives polygons in map coordinates whose areas add
    up to the mask's foreground; the file is in the record and its temporary name is a known leftover."""
    from utils.polygons import signed_area
    from utils.raster import open_image

    rng = np.random.default_rng(0)
    scene = (rng.random((96, 96)) * 60).astype(np.uint8)
    scene[20:60, 30:80] += 150  # a bright block, so the untrained network's mask has some structure
    geo = [(33550, "d", 3, (10.0, 10.0, 0.0), False), (33922, "d", 6, (0, 0, 0, 500000.0, 4000000.0, 0), False),
           (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), False)]
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "geo.tif", scene, extratags=geo)
    out = tmp_path / "out"
    assert _run(checkpoint, tmp_path / "in", out, "SAVE_POLYGONS=true", "POLYGON_TOLERANCE=0") == 0
    record = _records(out)[0]
    assert record["polygons"] == str(out / "geo_polygons.geojson")
    collection = json.loads((out / "geo_polygons.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    with open_image(record["mask"]) as mask:
        foreground = int(np.count_nonzero(mask.read_window(0, 96, 0, 96)))
    assert 0 < foreground < 96 * 96
    rings = [r for f in collection["features"] for r in f["geometry"]["coordinates"]]
    assert sum(signed_area(np.array(r[:-1])) for r in rings) == pytest.approx(foreground * 100)  # 10 m x 10 m
    assert sum(f["properties"]["pixels"] for f in collection["features"]) == foreground
    xs, ys = zip(*(v for r in rings for v in r))
    assert 500000 <= min(xs) and max(xs) <= 500960 and 3999040 <= min(ys) and max(ys) <= 4000000
    assert predict_module._LEFTOVER.fullmatch(".geo_polygons.geojson.ab12cd34.tmp")


def test_without_save_polygons_no_polygons_are_written(checkpoint, tmp_path):
    inputs = _images(tmp_path / "in", "a.png")
    assert _run(checkpoint, inputs, tmp_path / "out") == 0
    assert _records(tmp_path / "out")[0]["polygons"] is None
    assert not list((tmp_path / "out").glob("*.geojson"))


# ---- the input is read once


@pytest.mark.parametrize("suffix", [".tif", ".jp2"])
def test_predict_reads_each_input_row_once_with_several_readers(checkpoint, tmp_path, monkeypatch, suffix):
    """Bands overlap (64-pixel windows at 50 %) and the overlay shows the input, yet each input row is
    read exactly once per predict, by 3 readers (as on a GPU host with 3 CPU threads), and the overlay is the one
    read from the file. (Reading the input's intensity range for a checkpoint that records its training
    scaling samples a few windows besides; this checkpoint records none.)"""
    import threading

    import utils.raster as raster
    from utils.raster_write import ClassMask, overlay_png

    rng = np.random.default_rng(3)
    scene = rng.integers(0, 256, (200, 150), dtype=np.uint8)
    scene[40:120, 30:100] = 255  # some structure for the mask
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / f"scene{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, scene, tile=(32, 32), compression="zlib")
    else:
        rasterio = pytest.importorskip("rasterio")  # georeferenced: the mask is written through rasterio too
        with rasterio.open(path, "w", driver="JP2OpenJPEG", height=200, width=150, count=1, dtype="uint8",
                           crs="EPSG:32633", transform=rasterio.Affine(10, 0, 500000, 0, -10, 4000000),
                           QUALITY=100, REVERSIBLE="YES", BLOCKXSIZE=64, BLOCKYSIZE=32) as ds:
            ds.write(scene[None])
    monkeypatch.setattr(raster, "CHUNK_BYTES", 64 * 150, raising=False)  # 2 blocks of 32 rows a chunk
    monkeypatch.setattr(predict_module, "Predictor", lambda *a, **k: Predictor(*a, **{**k, "readers": 3}))
    reads, lock, original = np.zeros(200, int), threading.Lock(), raster.ImageReader.read_window
    readers = set()

    def counted(self, y0, y1, x0, x1):
        if self.path == path:
            with lock:
                reads[y0:y1] += 1
                readers.add((id(self), threading.current_thread().name))
        return original(self, y0, y1, x0, x1)

    monkeypatch.setattr(raster.ImageReader, "read_window", counted)
    assert _run(checkpoint, tmp_path / "in", tmp_path / "out") == 0
    assert reads.tolist() == [1] * 200
    handles, threads_ = {h for h, _ in readers}, {t for _, t in readers}
    assert len(handles) == len(threads_) == len(readers) <= 3  # a handle of its own per reading thread
    assert all(t.startswith("row-reader") for t in threads_)
    record = _records(tmp_path / "out")[0]
    monkeypatch.setattr(raster.ImageReader, "read_window", original)
    with raster.open_image(path) as image, ClassMask(record["mask"], 2) as mask:
        overlay_png(tmp_path / "read.png", image, mask, 2)
    assert Path(record["overlay"]).read_bytes() == (tmp_path / "read.png").read_bytes()


def test_records_file_serialises_each_record_once_and_rewrites_the_whole_file(tmp_path, monkeypatch):
    dumped = []
    real_dumps = json.dumps
    monkeypatch.setattr(predict_module.json, "dumps", lambda obj, **kw: dumped.append(obj) or real_dumps(obj, **kw))
    path = tmp_path / "predictions.jsonl"
    jsonl = RecordsFile(path)
    records = [{"image": f"{i}.png", "tiles": i} for i in range(50)]
    for r in records:
        jsonl.add(r)
    assert dumped == records  # once each, not once per rewrite (1275 times)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records

    def full(*_args, **_kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(predict_module, "atomic_write", full)
    with pytest.raises(OSError):
        jsonl.add({"image": "late.png"})
    assert len(jsonl.lines) == 50 and len(path.read_text().splitlines()) == 50  # not added, file as it was

    other = tmp_path / "other.jsonl"
    other.write_text("not ours\n")
    with pytest.raises(FileExistsError, match="exists already and was not written by this predict"):
        RecordsFile(other).add({"image": "a.png"})
    assert other.read_text() == "not ours\n"


def test_a_checkpoint_with_nan_weights_is_refused_before_anything_is_written(checkpoint, tmp_path, capsys):
    bad = tmp_path / "nan.pth"
    key = nan_checkpoint(checkpoint, bad)
    inputs, out = _images(tmp_path / "in", "a.png"), tmp_path / "out"
    assert _run(bad, inputs, out) == 2
    assert (f"error: MODEL_WEIGHTS={bad}: the network's weight {key} holds NaN or infinite values; it cannot "
            "predict: use another checkpoint of its run (last.pth or best.pth), or train again") in capsys.readouterr().out
    assert not out.exists()
