"""bench/peers.py: the side-by-side harness. Its scoring against hand-computed Dice/IoU/distances, its
LOSS and split plumbing, and a one-epoch run of AuxNet (through main.py) beside MONAI's BasicUNet."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("monai")

from bench import peers  # noqa: E402
from bench.peers import Row, Run, Task  # noqa: E402
from configs import load_config  # noqa: E402
from engines.builders import build_data  # noqa: E402

TINY = ("INPUT_SIZE=64", "UNET_DEPTH=3", "CONV_DEPTH=8", "BATCH_SIZE=4", "BASE_LR=0.01", "GPUs=[]",
        "MIXED_PRECISION=none", "CHANNELS_LAST=false")


@pytest.fixture
def tiny_task(monkeypatch):
    task = Task("tiny", "smoke", 1, {1: "object"}, 1, TINY, test_ids=("002", "003"))
    monkeypatch.setitem(peers.TASKS, "tiny", task)
    return task


def test_score_matches_hand_computed_values(tiny_task, tmp_path):
    run = Run("tiny", "basicunet", 42, 0, tmp_path, epochs=1)
    assert peers.prepare(run) is None
    cfg = load_config(None, run.overrides())
    splits = build_data(cfg, run.folder / "tts.json", fold=0, scene_sdm=False)
    assert splits.test_ids == ["002", "003"]
    masks = [splits.test.images.get(splits.test.images.ids.index(i))[1] for i in splits.test_ids]

    exact = peers.score(run, splits, lambda raw, entry: (_truth(splits, raw), 1.0))
    assert exact["DSC/1"] == exact["IoU/1"] == 1.0 and exact["HD95/1"] == 0.0 and exact["ACC"] == 1.0

    empty = peers.score(run, splits, lambda raw, entry: (np.zeros(raw.shape[:2], np.int64), 1.0))
    fg = sum(int((m > 0).sum()) for m in masks)
    bg = sum(int((m == 0).sum()) for m in masks)
    assert empty["DSC/1"] == 0.0
    assert empty["IoU/0"] == pytest.approx(bg / (bg + fg))  # every pixel called background
    assert empty["ACC"] == pytest.approx(bg / (bg + fg))


def _truth(splits, raw):
    images = splits.test.images
    for i in range(len(images.ids)):
        image, mask = images.get(i)
        if image is raw or np.array_equal(image, raw):
            return mask.astype(np.int64)
    raise AssertionError("image not found")


def test_loss_of_each_ablation_row(monkeypatch, tmp_path):
    multi = Task("m", "smoke", 3, {1: "a", 2: "b"}, 2, ("LOSS=CE_SoftDICE",), test_ids=("002",))
    binary = Task("b", "smoke", 1, {1: "a"}, 1, (), test_ids=("002",))
    monkeypatch.setitem(peers.TASKS, "m", multi)
    monkeypatch.setitem(peers.TASKS, "b", binary)
    assert Run("m", "auxnet", 1, 0, tmp_path).loss() == "CE_SoftDICE"
    assert Run("m", "wce", 1, 0, tmp_path).loss() == "wCE_SoftDICE"
    assert Run("m", "boundary", 1, 0, tmp_path).loss() == "CE_SoftDICE_Boundary"
    assert Run("b", "auxnet", 1, 0, tmp_path).loss() == "SoftDICE_BCE"
    assert Run("b", "wce", 1, 0, tmp_path).loss() == "SoftDICE_wBCE"
    assert "ADAPTIVE_WEIGHTS=schedule" in Run("b", "boundary", 1, 0, tmp_path).overrides()
    for name in peers.ROWS:  # every row's options are a valid configuration of both tasks
        for task in ("m", "b"):
            run = Run(task, name, 1, 0, tmp_path)
            known = [o for o in run.overrides() if o.split("=")[0] in load_config(None, []).to_dict()]
            assert known == run.overrides()


def test_cross_validated_task_tests_one_fold_per_seed(monkeypatch, tmp_path):
    monkeypatch.setitem(peers.TASKS, "cv", Task("cv", "x", 1, {1: "a"}, 1, folds=3))
    ids = [f"{n:02d}" for n in range(30)]
    folds = [Run("cv", "auxnet", s, i, tmp_path).test_ids(ids) for i, s in enumerate((42, 1, 2))]
    assert folds == [ids[0:10], ids[10:20], ids[20:30]]


def test_one_epoch_of_auxnet_beside_basicunet(tiny_task, tmp_path, capsys):
    out = tmp_path / "peers.md"
    args = ["--tasks", "tiny", "--rows", "auxnet", "basicunet", "smp", "--seeds", "42", "--epochs", "1",
            "--results-dir", str(tmp_path), "--out", str(out), "--threads", "1"]
    assert peers.main(args) == 0
    table = out.read_text()
    for label in ("| AuxNet default |", "| MONAI BasicUNet + DiceCE |"):
        assert label in table
    for row in ("auxnet", "basicunet"):
        result = json.loads((tmp_path / "tiny" / row / "seed42_e1" / "result.json").read_text())
        scores = result["scores"]["ungated"]
        assert 0 <= scores["DSC/1"] <= 1 and result["train_s"] > 0 and result["params"] > 0
    # a second call reuses the finished runs
    before = (tmp_path / "tiny" / "auxnet" / "seed42_e1" / "result.json").stat().st_mtime_ns
    capsys.readouterr()
    assert peers.main(args) == 0
    assert "..." not in capsys.readouterr().out
    assert (tmp_path / "tiny" / "auxnet" / "seed42_e1" / "result.json").stat().st_mtime_ns == before


def test_a_row_with_the_configuration_of_a_finished_run_reuses_it(tiny_task, tmp_path, monkeypatch):
    first = Run("tiny", "cls_detached", 42, 0, tmp_path, epochs=1)
    assert peers.ensure_data(first) is None
    spec = peers.run_spec(first)
    first.folder.mkdir(parents=True)
    (first.folder / "result.json").write_text(json.dumps({"spec": spec, "scores": {}, "wall_s": 1.0}))
    # the same options written differently: a twin; another option: not
    monkeypatch.setitem(peers.ROWS, "same", Row("same", ("CLS_TRAINS_ENCODER=false", "CLS_WEIGHT=1", "NORM=batch",
                                                         "GATE_THRESHOLD=0.5", "BATCH_DICE=true")))
    monkeypatch.setitem(peers.ROWS, "other", Row("other", ("CLS_WEIGHT=1.0",)))
    twin = Run("tiny", "same", 42, 0, tmp_path, epochs=1)
    assert peers.run_spec(twin) == spec
    assert peers.finished_twin(twin, spec) == ("cls_detached", json.loads((first.folder / "result.json").read_text()))
    assert peers.run_spec(Run("tiny", "other", 42, 0, tmp_path, epochs=1)) != spec
    assert peers.finished_twin(twin, {**spec, "config": "x"}) is None
    # options added since the run was made, at the value it had, leave the identity as it was
    assert set(peers.ADDED_SINCE) == {"BATCH_DICE", "GATE_THRESHOLD"}
    monkeypatch.setitem(peers.ROWS, "gate", Row("gate", peers.ROWS["same"].overrides[:-2] + ("GATE_THRESHOLD=0.3",)))
    assert peers.run_spec(Run("tiny", "gate", 42, 0, tmp_path, epochs=1)) != spec
    # a reuse is never the run reused: only the row that trained the network is
    monkeypatch.setitem(peers.ROWS, "a_reuse", Row("a_reuse", peers.ROWS["same"].overrides))  # found first
    reuse = Run("tiny", "a_reuse", 42, 0, tmp_path, epochs=1)
    reuse.folder.mkdir(parents=True)
    (reuse.folder / "result.json").write_text(json.dumps({"spec": spec, "same_run_as": "cls_detached"}))
    monkeypatch.setitem(peers.ROWS, "third", Row("third", peers.ROWS["same"].overrides))
    assert peers.finished_twin(Run("tiny", "third", 42, 0, tmp_path, epochs=1), spec)[0] == "cls_detached"
