"""Tests for bench/reproduce.py: the experiment files, the fixed splits, and one end-to-end smoke
run of the script (tiny generated data, one epoch) with its results table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import reproduce  # noqa: E402
from bench.folder_datasets import ensure_folder_dataset  # noqa: E402
from configs import load_config  # noqa: E402
from utils.splits import resolve_split  # noqa: E402


def test_every_experiment_file_is_registered_and_a_valid_configuration(tmp_path):
    files = {p.stem for p in reproduce.CONFIG_DIR.glob("*.yaml")}
    assert files == set(reproduce.EXPERIMENTS)
    for table in reproduce.TABLES.values():
        assert set(table["rows"]) <= set(reproduce.EXPERIMENTS)
    data = ensure_folder_dataset(tmp_path / "smoke", "smoke")
    for name, exp in reproduce.EXPERIMENTS.items():
        # The configuration is checked, not its data: a folder dataset (generated, or ISBI 2012 under
        # ../shared, which a user's clone lacks) is stood in for by a small generated one.
        folder = reproduce.dataset_dir(name, reproduce.Options())[0] != "synthetic"
        overrides = [f"DATASET_DIR={data}"] if folder else []
        if exp.after:
            (tmp_path / "w.pth").touch()  # the validator checks that the file exists
            overrides.append(f"MODEL_WEIGHTS={tmp_path / 'w.pth'}")
        cfg = load_config(reproduce.CONFIG_DIR / f"{name}.yaml", overrides)
        assert cfg.EXP_ID == name and not cfg.SAVE_MODEL  # no model selection on the test split
        assert exp.seeds == (42,) or exp.seeds == reproduce.MULTI_SEEDS


def test_fixed_split_is_fold_zero_and_reused_by_main(tmp_path):
    opts = reproduce.Options(results_dir=str(tmp_path), data_root=str(tmp_path / "data"))
    data = ensure_folder_dataset(tmp_path / "data" / "smoke", "smoke")
    folder = tmp_path / "run"
    reproduce.write_split(folder, "smoke", 42, opts)
    ids = sorted(p.stem for p in (data / "images").iterdir())
    folds = resolve_split(folder / "tts.json", ids, seed=42, k=2, source=str(data), cross_validation=False)
    assert folds[0] == ["002", "003"] and folds[1] == ["000", "001"]
    assert "27" in reproduce.ISBI_TEST and len(reproduce.ISBI_TEST) == 3


def test_dry_run_prints_the_commands_and_bad_names_fail(capsys):
    assert reproduce.main(["--dry-run", "staged_c"]) == 0
    out = capsys.readouterr().out
    assert "configs/experiments/staged_c.yaml SEED=42 RUN_ID=seed42 MODEL_WEIGHTS=saved/reproduce/staged_ed/" in out
    assert reproduce.main(["nope"]) == 2
    assert "unknown experiment(s) ['nope']" in capsys.readouterr().err


def test_names_after_the_seeds_are_experiments_not_seeds(capsys):
    assert reproduce._seeds_last(["--seeds", "42", "1", "hard_cmae", "--dry-run"]) == [
        "hard_cmae", "--dry-run", "--seeds", "42", "1"]
    assert reproduce.main(["--dry-run", "--seeds", "42", "1", "hard_cmae"]) == 0
    out = capsys.readouterr().out
    assert "hard_cmae.yaml SEED=42 RUN_ID=seed42" in out and "hard_cmae.yaml SEED=1 RUN_ID=seed1" in out


def test_a_table_names_the_commits_of_its_own_rows_only(tmp_path):
    """The staged table shows seed 42 of hard_dice_bce: the commits of its other seeds are not its."""
    opts = reproduce.Options(results_dir=str(tmp_path))
    for name, seed, commit in [("hard_dice_bce", 42, "aaa"), ("hard_dice_bce", 1, "bbb"),
                               ("staged_ed", 42, "aaa"), ("staged_c", 42, "aaa")]:
        folder = reproduce.run_folder(name, seed, opts)
        folder.mkdir(parents=True)
        whole = {"DSC": 0.9, "HD95": 3.0, "seconds": 1.0, "gated_off_fraction": 0.5}
        (folder / "summary.json").write_text(json.dumps({
            "final": {"epoch": 1, "TTR": 0.8}, "whole_image": {"ungated": whole, "gated": whole}}))
        (folder / "reproduce.json").write_text(json.dumps({
            "command": "python main.py", "wall_s": 60.0, "commit": commit, "machine": "m"}))
    text = reproduce.render(["staged"], opts, lambda name: list(reproduce.EXPERIMENTS[name].seeds))
    assert "Commit: aaa." in text and "bbb" not in text


def test_delta_is_relative_to_the_baseline_mean_and_flags_seed_noise():
    assert reproduce._delta([8.0, 8.0], [10.0, 10.0]) == "-20 %"  # no spread: beyond noise
    assert reproduce._delta([6.0, 10.0], [10.0, 10.0]) == "-20 % (within noise)"  # |8 - 10| <= 2 + 0
    assert reproduce._delta([], [10.0]) == "–" and reproduce._delta([5.0], None) == "– (no baseline)"


def test_smoke_run_end_to_end_writes_the_table(tmp_path):
    cmd = [sys.executable, "bench/reproduce.py", "--results-dir", str(tmp_path), "--data-root",
           str(tmp_path / "data"), "--epochs", "1", "smoke"]
    # the script's pipeline on the CPU: its runs take every visible GPU (tests/test_cuda.py covers the GPU)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "smoke" / "seed42_e1"
    record = json.loads((run / "reproduce.json").read_text())
    assert record["command"].startswith("python main.py --config configs/experiments/smoke.yaml SEED=42")
    assert record["wall_s"] > 0 and "cores" in record["machine"] and record["commit"]
    assert json.loads((run / "tts.json").read_text())["folds"][0]["test"] == ["002", "003"]
    table = (tmp_path / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| pipeline check"))
    assert "min |" in row and "`python main.py --config configs/experiments/smoke.yaml" in row
    assert "Machine:" in table and "Commit:" in table
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "reusing" in again.stdout  # a finished run is not retrained


def test_missing_isbi_data_is_one_message_with_its_source_terms_and_converter(tmp_path, monkeypatch, capsys):
    """Before: a FileNotFoundError traceback from writing the split. Now: exit 2 before any run, saying
    where the data goes, where it comes from, on what terms, and the command that converts it."""
    monkeypatch.setattr(reproduce, "ROOT", tmp_path / "repo")  # a clone without ../shared beside it
    assert reproduce.main(["isbi2012", "isbi2012_wce", "smoke", "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert (f"the ISBI 2012 data is not at {tmp_path / 'shared' / 'data' / 'isbi2012'} (DATASET_DIR: "
            "../shared/data/isbi2012 of configs/experiments/isbi2012.yaml, configs/experiments/isbi2012_wce.yaml)"
            ) in err
    assert 'ISBI 2012 challenge "Segmentation of neuronal structures in EM stacks"' in err
    assert "terms: for research and testing only, citing Arganda-Carreras et al." in err
    assert ("python -m utils.isbi2012 train-volume.tif train-labels.tif ../shared/data/isbi2012\n") in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "repo").exists()


def test_real_experiments_write_docs_results_and_smoke_or_short_runs_do_not():
    """Before: every run wrote RESULTS_DIR/results.md and the published tables lived, by hand, in the README."""
    assert reproduce.results_path(["isbi2012", "hard_cldice"], reproduce.Options()) == reproduce.DOCS_RESULTS
    assert reproduce.DOCS_RESULTS == ROOT / "docs" / "results.md"
    assert reproduce.results_path(["smoke"], reproduce.Options()) == ROOT / "saved" / "reproduce" / "results.md"
    assert reproduce.results_path(["isbi2012"], reproduce.Options(epochs=1)) == ROOT / "saved/reproduce/results.md"
    assert reproduce.results_path(["isbi2012"], reproduce.Options(results_dir="/tmp/x")) == Path("/tmp/x/results.md")


def test_rerunning_one_table_keeps_the_other_published_tables(tmp_path):
    opts = reproduce.Options(results_dir=str(tmp_path))
    seeds = lambda name: list(reproduce.EXPERIMENTS[name].seeds)  # noqa: E731
    published = reproduce.DOCS_INTRO + "\n" + "\n".join(
        f"<!-- table: {t} -->\n## old {t}\n\n| old row of {t} |\n" for t in ("isbi2012", "staged", "lines_ellipses"))
    # no run on disk: a fresh clone's --tables-only keeps every published table as it was
    assert reproduce.merge_tables(published, ["isbi2012", "staged"], opts, seeds) == reproduce.DOCS_INTRO + "\n" + \
        "\n".join(f"<!-- table: {t} -->\n## old {t}\n\n| old row of {t} |\n" for t in ("isbi2012", "lines_ellipses",
                                                                                      "staged"))
    for name in ("hard_dice_bce", "staged_ed", "staged_c"):  # the staged table's runs
        folder = reproduce.run_folder(name, 42, opts)
        folder.mkdir(parents=True)
        whole = {"DSC": 0.9, "HD95": 3.0, "seconds": 1.0, "gated_off_fraction": 0.5}
        (folder / "summary.json").write_text(json.dumps({
            "final": {"epoch": 1, "TTR": 0.8}, "whole_image": {"ungated": whole, "gated": whole}}))
        (folder / "reproduce.json").write_text(json.dumps({
            "command": "python main.py", "wall_s": 60.0, "commit": "abc1234", "machine": "m"}))
    merged = reproduce.merge_tables(published, ["staged"], opts, seeds)
    parts = reproduce.split_tables(merged)
    assert list(parts) == ["isbi2012", "lines_ellipses", "staged"]  # the order of TABLES
    assert parts["isbi2012"] == "<!-- table: isbi2012 -->\n## old isbi2012\n\n| old row of isbi2012 |\n"
    assert "old staged" not in merged and "Commit: abc1234." in parts["staged"]
    assert "| joint: AuxNet-EDC (`hard_dice_bce`) | 2 | 0.9000 | 3.00 |" in parts["staged"]
