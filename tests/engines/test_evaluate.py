"""engines/evaluate.py: the settings an eval records, and the rule that an eval never replaces one
made with other settings (the CLI end to end is in tests/test_cli.py)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from configs import load_config
from engines import evaluate
from engines.evaluate import RUNTIME_EVAL_KEYS, eval_settings, write_eval
from utils.hardware import Runtime
from utils.run_paths import eval_outputs

SUMMARY = {"metrics": {"DSC": 0.5}}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "best.pth"
    path.write_bytes(b"weights")
    return path


def settings(**changes):
    return {"checkpoint_digest": "ab" * 16, "TTA": "none", "GATING": True, "device": "cpu", "precision": "none",
            "memory_format": "contiguous", **changes}


def test_the_settings_are_the_options_that_change_the_numbers_as_resolved(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    cfg = load_config(None, [f"MODEL_WEIGHTS={ckpt}", "TTA=d4", "SEG_THRESHOLD=0.3", "DATASET_DIR=data",
                             "BATCH_SIZE=3", "GPUs=[]"])
    runtime = Runtime(torch.device("cpu"), torch.bfloat16, True, threads=1, notes={})
    got = eval_settings(cfg, ckpt, runtime)
    assert got["checkpoint_digest"] == hashlib.blake2b(b"weights", digest_size=16).hexdigest()
    assert (got["TTA"], got["SEG_THRESHOLD"], got["DATASET_DIR"]) == ("d4", 0.3, str(tmp_path / "data"))
    assert (got["device"], got["precision"], got["memory_format"]) == ("cpu", "bf16", "channels_last")
    assert {"GATING", "TILE_OVERLAP", "CLS_THRESHOLD", "EVAL_METRIC", "CMA_COEFFICIENTS", "DISTANCE_METRICS",
            "PIXEL_SPACING", "INCLUDE_BACKGROUND"} <= set(got)
    assert not set(got) & RUNTIME_EVAL_KEYS  # where and how fast (BATCH_SIZE, GPUs, ...) is not a setting
    assert json.loads(json.dumps(got)) == got


def test_an_eval_made_before_settings_were_recorded_is_kept(ckpt, capsys):
    old = eval_outputs(ckpt)
    old.summary.write_text(json.dumps(SUMMARY))  # what evals wrote before: no "settings"
    files = write_eval(ckpt, settings(), SUMMARY, "id\n1\n", "mode,id\n")
    assert files == eval_outputs(ckpt, 2) and json.loads(old.summary.read_text()) == SUMMARY
    assert "eval_best.json (no settings recorded: made before evals recorded them, or unreadable); " \
           "this one is eval_best_2.json" in capsys.readouterr().out
    written = json.loads(files.summary.read_text())
    assert written["settings"] == settings() and written["files"] == {"tiles": "eval_best_2.csv",
                                                                      "images": "eval_best_2_images.csv"}
    assert files.tiles.read_text() == "id\n1\n" and files.images.read_text() == "mode,id\n"


def test_names_with_any_file_are_taken_and_the_same_settings_are_found_after_them(ckpt, capsys):
    write_eval(ckpt, settings(), SUMMARY, "a\n", "b\n")
    eval_outputs(ckpt, 2).images.write_text("a table left without its summary")
    eval_outputs(ckpt, 3).summary.write_text("")  # unreadable
    files = write_eval(ckpt, settings(TTA="flips"), SUMMARY, "c\n", "d\n")
    assert files == eval_outputs(ckpt, 4)
    assert "eval_best.json (TTA='none'); eval_best_2.json (no settings" in capsys.readouterr().out
    assert eval_outputs(ckpt, 2).images.read_text() == "a table left without its summary"
    assert write_eval(ckpt, settings(TTA="flips"), SUMMARY, "e\n", "f\n") == eval_outputs(ckpt, 4)
    assert eval_outputs(ckpt, 4).tiles.read_text() == "e\n"
    assert "same settings as the earlier eval eval_best_4.json: replaced it" in capsys.readouterr().out
    other = write_eval(ckpt, settings(checkpoint_digest="cd" * 16), SUMMARY, "g\n", "h\n")
    assert other == eval_outputs(ckpt, 5)
    assert "eval_best.json (another checkpoint (abababababab…))" in capsys.readouterr().out


def test_a_failed_write_leaves_no_eval_under_the_new_names(ckpt, monkeypatch):
    write_eval(ckpt, settings(), SUMMARY, "a\n", "b\n")
    real = evaluate.atomic_write_text

    def full_disk(path, text):
        if path.name.endswith("_images.csv"):
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(evaluate, "atomic_write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_eval(ckpt, settings(TTA="d4"), SUMMARY, "c\n", "d\n")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best.pth", "eval_best.csv", "eval_best.json",
                                                             "eval_best_images.csv"]
