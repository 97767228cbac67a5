"""The command line end to end: fail-fast validation, a 2-epoch run, resume, eval, DDP on the CPU."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, eval_summary, run_cli


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_bad_config_fails_fast_with_every_problem_and_leaves_nothing(tmp_path):
    proc = run_cli("MODEL=AuxNet-XYZ", "LOSS=Foo_BCE", "INPUT_SIZE=100", f"RESULTS_DIR={tmp_path / 'out'}",
                   check=False)
    assert proc.returncode == 2
    assert "3 problem(s)" in proc.stderr
    assert "AuxNet-XYZ" in proc.stderr and "Foo" in proc.stderr and "INPUT_SIZE=100" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_help_shows_the_commands_the_overrides_and_examples(capsys):
    import main

    for argv in (["--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as done:
            main.parse_args(argv)
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: python main.py [train | eval | predict] [--config FILE] [KEY=VALUE ...]\n")
        assert "eval --config" not in text  # before: `eval --config FILE ...`, as if a config file were needed
        for line in ("  eval     evaluate a checkpoint on its own test split: needs MODEL_WEIGHTS=<checkpoint>",
                     "  predict  segment images with a checkpoint: needs MODEL_WEIGHTS=<checkpoint> and INPUT=<image, "
                     "folder,",
                     "  python main.py eval MODEL_WEIGHTS=saved/default/run_001/best",
                     "  python main.py predict MODEL_WEIGHTS=saved/default/run_001/best INPUT='scenes/*.tif' "
                     "OUTPUT=masks"):
            assert line in text.splitlines()
        assert "values are YAML: BATCH_SIZE=4 'GPUs=[0,1]'" in text


def test_eval_needs_weights(tmp_path):
    proc = run_cli("eval", f"RESULTS_DIR={tmp_path}", check=False)
    assert proc.returncode == 2 and "MODEL_WEIGHTS" in proc.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    proc = run_cli(*TINY, "TRAIN_EPOCHS=2", f"RESULTS_DIR={results}", "EXP_ID=smoke")
    (results / "console.txt").write_text(proc.stdout + proc.stderr)  # what a redirected log holds
    return results / "smoke" / "run_001"


def test_a_redirected_log_has_one_line_per_epoch_and_no_progress_bar(trained_run):
    console = (trained_run.parents[1] / "console.txt").read_text()
    # before: the bar redrawn at each step, as carriage returns (or, on some streams, a line each)
    assert "\r" not in console and "it/s" not in console and "epoch 0:" not in console
    assert [line.split("]")[0] for line in console.splitlines() if line.startswith("[epoch")] == [
        "[epoch   0", "[epoch   1"]


def test_two_epoch_run_writes_everything_and_learns(trained_run):
    for name in ("config.yaml", "tts.json", "log.jsonl", "last.pth", "best.pth", "summary.json"):
        assert (trained_run / name).is_file(), name
    log = read_log(trained_run)
    assert [r["epoch"] for r in log] == [0, 1]
    for key in ("DSC", "IoU", "TTR", "ASD", "HD95", "loss", "loss/SoftDICE", "loss/BCE", "loss/CLS", "lr"):
        assert key in log[-1], key
    assert 0.0 <= log[-1]["DSC"] <= 1.0
    assert log[1]["loss"] < log[0]["loss"]
    ckpt = torch.load(trained_run / "last.pth", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["config"]["RUN_ID"] == "run_001"
    assert not list(trained_run.glob("*.tmp"))


def test_resume_continues_after_the_last_epoch(trained_run):
    split_before = (trained_run / "tts.json").read_text()
    proc = run_cli(*TINY, "TRAIN_EPOCHS=3", f"RESULTS_DIR={trained_run.parents[1]}", "EXP_ID=smoke",
                   "RUN_ID=run_001")
    assert "resuming" in proc.stdout + proc.stderr
    assert [r["epoch"] for r in read_log(trained_run)] == [0, 1, 2]
    assert (trained_run / "tts.json").read_text() == split_before


def test_eval_command_writes_csv_and_summary(trained_run):
    run_cli("eval", *TINY, f"RESULTS_DIR={trained_run.parents[1]}", f"MODEL_WEIGHTS={trained_run / 'best'}")
    summary = json.loads((trained_run / "eval_best.json").read_text())
    rows = (trained_run / "eval_best.csv").read_text().splitlines()
    assert summary["tiles"] == len(rows) - 1 > 0
    assert "DSC" in summary["metrics"] and "HD95" in summary["metrics"]
    assert rows[0].startswith("id")
    assert set(summary["whole_image"]) == {"ungated", "gated"}  # an AuxNet-EDC run: both, GATING defaults to true


def test_eval_with_gating_off_scores_only_the_ungated_prediction(trained_run):
    proc = run_cli("eval", *TINY, f"RESULTS_DIR={trained_run.parents[1]}", f"MODEL_WEIGHTS={trained_run / 'best'}",
                   "GATING=false")
    summary = json.loads(eval_summary(proc).read_text())
    assert set(summary["whole_image"]) == {"ungated"} and summary["settings"]["GATING"] is False
    images = (trained_run / summary["files"]["images"]).read_text().splitlines()[1:]
    assert images and all(row.startswith("ungated,") for row in images)


def test_ddp_on_two_cpu_processes(tmp_path):
    # MASTER_PORT unset: the launcher picks a free port (a fixed one may be taken by another run)
    run_cli(*TINY, "TRAIN_EPOCHS=1", "CPU_PROCESSES=2", f"RESULTS_DIR={tmp_path}")
    log = read_log(tmp_path / "default" / "run_001")
    assert len(log) == 1 and 0.0 <= log[0]["DSC"] <= 1.0


def test_eval_on_two_cpu_processes_shares_the_images_and_gives_the_metrics_of_one(tmp_path):
    # 5 images, 3 of them for testing: rank 0 predicts two whole images, rank 1 one, and each scores
    # its share of the tiles; the sums are all-reduced (an image predicted by both would count twice)
    data = ["SYNTHETIC_IMAGES=5", "TEST_SPLIT=0.4"]
    run_cli(*TINY, *data, "TRAIN_EPOCHS=2", f"RESULTS_DIR={tmp_path}")
    run = tmp_path / "default" / "run_001"
    evals = {}
    for processes in (1, 2):
        proc = run_cli("eval", f"MODEL_WEIGHTS={run / 'best.pth'}", f"CPU_PROCESSES={processes}")
        summary = json.loads(eval_summary(proc).read_text())
        images = (run / summary["files"]["images"]).read_text().splitlines()
        tiles = (run / summary["files"]["tiles"]).read_text()
        evals[processes] = summary, images, tiles
    (one, one_images, one_tiles), (two, two_images, two_tiles) = evals[1], evals[2]
    assert len(one["test_images"]) == 3 and two["test_images"] == one["test_images"]
    assert two["tiles"] == one["tiles"] > 0 and two_tiles == one_tiles
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-12)  # sums all-reduced in another order
    for mode, whole in one["whole_image"].items():
        assert whole["tiles"] == two["whole_image"][mode]["tiles"] > 0
        same = {k: v for k, v in whole.items() if k != "seconds"}
        assert {k: two["whole_image"][mode][k] for k in same} == pytest.approx(same, rel=1e-12), mode

    def scores(rows):  # per image: the metrics and tile counts, not the timings (the last two columns)
        return [row.split(",")[:-2] for row in rows]

    assert len(one_images) == 1 + 3 * len(one["whole_image"])  # the header, then each image once per mode
    assert scores(two_images) == scores(one_images)


def test_stage_c_trains_only_the_head_of_a_trained_network(trained_run, tmp_path):
    proc = run_cli(*TINY, "TRAIN_EPOCHS=1", f"RESULTS_DIR={tmp_path}", "MODEL=AuxNet-C",  # EVAL_METRIC: TTR, chosen
                   f"MODEL_WEIGHTS={trained_run / 'best'}")
    assert "note: EVAL_METRIC=TTR: MODEL=AuxNet-C trains only the head" in proc.stderr
    before = torch.load(trained_run / "best.pth", weights_only=False)["model"]
    after = torch.load(tmp_path / "default" / "run_001" / "last.pth", weights_only=False)["model"]
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head", "fill_head"}  # the two heads of stage C
    log = read_log(tmp_path / "default" / "run_001")
    assert "TTR" in log[0] and "DSC" in log[0] and "loss/SoftDICE" not in log[0]


def test_unet_with_the_combined_score(tmp_path):
    run_cli(*TINY, "TRAIN_EPOCHS=1", f"RESULTS_DIR={tmp_path}", "MODEL=UNet", "EVAL_METRIC=CMA",
            "CMA_COEFFICIENTS={DSC: 0.7, HD95: 0.3}")
    log = read_log(tmp_path / "default" / "run_001")
    assert "CMA" in log[0] and "TTR" not in log[0] and "loss/CLS" not in log[0]


@pytest.mark.parametrize("processes", [1, 2])
def test_bad_data_files_fail_cleanly_and_leave_no_run(tmp_path, processes):
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for n in range(5):
        Image.fromarray(np.full((64, 64), 40 * n, np.uint8)).save(data / "images" / f"{n}.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "masks" / f"{n}.png")
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(data / "masks" / "3.png")  # class 7 of 1
    (data / "images" / "4.png").write_bytes(b"not a png")
    proc = run_cli(*TINY, f"DATASET_DIR={data}", f"RESULTS_DIR={tmp_path / 'out'}", f"CPU_PROCESSES={processes}",
                   "MASTER_PORT=29533", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "3.png" in proc.stderr and "4.png" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").rglob("run_*"))


def test_a_checkpoint_of_another_architecture_is_a_clear_error(trained_run, tmp_path):
    proc = run_cli(*TINY, "CONV_DEPTH=16", f"RESULTS_DIR={tmp_path}", f"MODEL_WEIGHTS={trained_run / 'best'}",
                   check=False)
    assert proc.returncode == 2 and "does not fit this network" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("run_*"))
    proc = run_cli("eval", *TINY, "CONV_DEPTH=16", f"MODEL_WEIGHTS={trained_run / 'best'}", check=False)
    assert proc.returncode == 2 and "trained with CONV_DEPTH=8: remove it" in proc.stderr


def test_resume_refuses_changed_options_and_keeps_the_run(trained_run):
    before = (trained_run / "config.yaml").read_text()
    proc = run_cli(*TINY, "TRAIN_EPOCHS=2", "BASE_LR=0.5", "LOSS=SoftDICE", f"RESULTS_DIR={trained_run.parents[1]}",
                   "EXP_ID=smoke", "RUN_ID=run_001", check=False)
    assert proc.returncode == 2
    assert "BASE_LR=0.5 but the run" in proc.stderr and "LOSS=SoftDICE but the run" in proc.stderr
    assert (trained_run / "config.yaml").read_text() == before and (trained_run / "last.pth").is_file()


def test_one_epoch_on_the_isbi2012_em_data(tmp_path, isbi_folder):
    run_cli(f"DATASET_DIR={isbi_folder}", "TRAIN_EPOCHS=1", "WARMUP_EPOCHS=0", "UNET_DEPTH=3", "CONV_DEPTH=8",
            "BATCH_SIZE=4", f"RESULTS_DIR={tmp_path}")
    (record,) = read_log(tmp_path / "default" / "run_001")
    assert record["DSC"] > 0.5 and json.loads((tmp_path / "default" / "run_001" / "tts.json").read_text())


# ----------------------------------------------------------------------------- issue #11: faults


def test_eval_of_a_copied_checkpoint_uses_its_own_split_and_writes_beside_it(trained_run, tmp_path):
    # before: the copy was scored on RESULTS_DIR/default/run_001/tts.json (another project's split,
    # which may hold the checkpoint's own training images) and overwrote that run's eval files
    other = tmp_path / "other_project"
    decoy = other / "default" / "run_001"
    decoy.mkdir(parents=True)
    (decoy / "tts.json").write_text("decoy")
    (other / "ckpts").mkdir()
    copy = other / "ckpts" / "best.pth"
    copy.write_bytes((trained_run / "best.pth").read_bytes())
    originals = {p.name for p in trained_run.iterdir()}
    run_cli("eval", f"RESULTS_DIR={other}", f"MODEL_WEIGHTS={other / 'ckpts' / 'best'}")
    result = json.loads((other / "ckpts" / "eval_best.json").read_text())
    split = json.loads((trained_run / "tts.json").read_text())
    assert result["test_images"] == split["folds"][0]["test"]
    assert (decoy / "tts.json").read_text() == "decoy" and {p.name for p in decoy.iterdir()} == {"tts.json"}
    assert {p.name for p in trained_run.iterdir()} == originals


def test_evals_with_other_settings_are_kept_and_the_same_eval_replaces_its_own(trained_run, tmp_path):
    # before: every eval of best.pth wrote eval_best.json/.csv, so an eval with TTA=flips silently
    # replaced the TTA=none one, and neither file said which settings had produced it
    copy = tmp_path / "best.pth"
    copy.write_bytes((trained_run / "best.pth").read_bytes())
    plain = run_cli("eval", f"MODEL_WEIGHTS={copy}", "GATING=false")
    first = (tmp_path / "eval_best.json").read_text()
    flips = run_cli("eval", f"MODEL_WEIGHTS={copy}", "GATING=false", "TTA=flips")
    assert eval_summary(plain) == tmp_path / "eval_best.json" and eval_summary(flips) == tmp_path / "eval_best_2.json"
    assert "kept the earlier eval(s) of best.pth made with other settings: eval_best.json (TTA='none'); " \
           "this one is eval_best_2.json" in flips.stdout
    assert (tmp_path / "eval_best.json").read_text() == first
    a, b = (json.loads((tmp_path / f"eval_best{n}.json").read_text()) for n in ("", "_2"))
    assert (a["settings"]["TTA"], b["settings"]["TTA"]) == ("none", "flips")
    assert {k for k in a["settings"] if a["settings"][k] != b["settings"][k]} == {"TTA"}
    digest = hashlib.blake2b(copy.read_bytes(), digest_size=16).hexdigest()  # an independent hash of the file
    assert a["settings"]["checkpoint_digest"] == digest and a["settings"]["GATING"] is False
    assert a["settings"]["device"] == "cpu" and a["settings"]["memory_format"] in ("channels_last", "contiguous")
    assert a["settings"]["precision"] in ("bf16", "none")  # MIXED_PRECISION=auto, resolved on this CPU
    assert b["files"] == {"tiles": "eval_best_2.csv", "images": "eval_best_2_images.csv"}
    assert all((tmp_path / name).read_text().startswith(head) for name, head in [
        ("eval_best_2.csv", "id,"), ("eval_best_2_images.csv", "mode,id,")])
    again = run_cli("eval", f"MODEL_WEIGHTS={copy}", "GATING=false")  # the same eval: replaces its own files
    assert eval_summary(again) == tmp_path / "eval_best.json"
    assert "same settings as the earlier eval eval_best.json: replaced it" in again.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pth", "eval_best.csv", "eval_best.json", "eval_best_2.csv", "eval_best_2.json",
        "eval_best_2_images.csv", "eval_best_images.csv"]
    c = json.loads((tmp_path / "eval_best.json").read_text())
    assert c["settings"] == a["settings"] and c["metrics"] == a["metrics"]


def test_a_huge_learning_rate_stops_cleanly_and_leaves_no_half_made_run(tmp_path):
    proc = run_cli(*TINY, "TRAIN_EPOCHS=1", "BASE_LR=1e6", f"RESULTS_DIR={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "training diverged at step" in proc.stderr and "tiles [" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("run_*"))


def test_a_refused_resume_leaves_config_yaml_as_it_was(trained_run, tmp_path):
    copy = tmp_path / "smoke" / "run_001"
    copy.mkdir(parents=True)
    for p in trained_run.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    before = (copy / "config.yaml").read_text()
    epochs = json.loads((copy / "summary.json").read_text())["final"]["epoch"] + 1
    common = [*TINY, f"RESULTS_DIR={tmp_path}", "EXP_ID=smoke", "RUN_ID=run_001"]
    # a smaller TRAIN_EPOCHS silently trained nothing (and was recorded)
    proc = run_cli(*common, f"TRAIN_EPOCHS={epochs - 1}", check=False)
    assert proc.returncode == 2 and "resuming cannot shorten a run" in proc.stderr, proc.stderr
    assert (copy / "config.yaml").read_text() == before
    # a truncated last.pth was blamed on "another network or loss", after config.yaml was rewritten
    data = (copy / "last.pth").read_bytes()
    (copy / "last.pth").write_bytes(data[: len(data) // 2])
    proc = run_cli(*common, f"TRAIN_EPOCHS={epochs + 1}", check=False)
    assert proc.returncode == 2 and "cannot be read as a checkpoint" in proc.stderr, proc.stderr
    assert "another network" not in proc.stderr and "Traceback" not in proc.stderr
    assert (copy / "config.yaml").read_text() == before


def test_a_run_folder_in_use_is_refused(trained_run):
    from engines.launch import RunLock

    lock = RunLock(trained_run)  # this (live) process holds it
    try:
        proc = run_cli(*TINY, "TRAIN_EPOCHS=9", f"RESULTS_DIR={trained_run.parents[1]}", "EXP_ID=smoke",
                       "RUN_ID=run_001", check=False)
    finally:
        lock.release()
    assert proc.returncode == 2 and f"in use by another run (pid {os.getpid()}" in proc.stderr


def test_a_busy_port_and_an_unwritable_results_dir_are_clean_errors(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(*TINY, "CPU_PROCESSES=2", f"MASTER_PORT={port}", f"RESULTS_DIR={tmp_path / 'a'}", check=False)
    assert proc.returncode == 2 and f"MASTER_PORT={port} is in use" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "a").rglob("*"))  # no config-only run folder left
    (tmp_path / "file").write_text("not a folder")
    proc = run_cli(*TINY, f"RESULTS_DIR={tmp_path / 'file' / 'runs'}", check=False)
    assert proc.returncode == 2 and "cannot write the run folder" in proc.stderr and "Traceback" not in proc.stderr


def test_misleading_config_messages_are_fixed(trained_run, tmp_path):
    proc = run_cli(*TINY, f"MODEL_WEIGHTS={trained_run}", "INPUT_SIZE=0", f"RESULTS_DIR={tmp_path}", check=False)
    assert proc.returncode == 2
    assert f"is a run folder, not a checkpoint: use MODEL_WEIGHTS={trained_run / 'best'}" in proc.stderr
    assert "INPUT_SIZE=0 is out of range" in proc.stderr and "not divisible" not in proc.stderr


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_eval_and_predict_open_the_checkpoint_once(trained_run, tmp_path, monkeypatch, command):
    """``main.py eval`` and ``predict`` read MODEL_WEIGHTS with one ``torch.load`` (in this process, on
    the CPU). Before: eval read it 4 times (configuration, test split, hashes, weights), predict 3."""
    import main as cli
    from conftest import torch_threads

    best = tmp_path / "best.pth"  # eval writes beside the checkpoint: not into the shared run
    best.write_bytes((trained_run / "best.pth").read_bytes())
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 80), dtype=np.uint8)).save(tmp_path / "scene.png")
    argv = {"eval": ["eval", f"MODEL_WEIGHTS={best}", "GPUs=[]"],
            "predict": ["predict", f"MODEL_WEIGHTS={best}", f"INPUT={tmp_path / 'scene.png'}",
                        f"OUTPUT={tmp_path / 'out'}", "GPUs=[]"]}[command]
    reads, load = [], torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    with torch_threads(torch.get_num_threads()):  # a launch sets the CPU threads of this process
        assert cli.main(argv) == 0
    assert reads == [str(best)]


def test_instance_norm_leaky_relu_and_flips_train_evaluate_and_predict(tmp_path):
    """NORM=instance ACTIVATION=leaky_relu AUGMENTATIONS=flips (issue 26's ablations) end to end on the
    CPU: the run saves them, and eval and predict take them from the checkpoint (MODEL_WEIGHTS of
    another NORM: test_checkpoint_layers.py)."""
    run_cli(*TINY, "TRAIN_EPOCHS=1", f"RESULTS_DIR={tmp_path}", "EXP_ID=norm", "NORM=instance",
            "ACTIVATION=leaky_relu", "AUGMENTATIONS=flips")
    run = tmp_path / "norm" / "run_001"
    state = torch.load(run / "best.pth", weights_only=True)
    assert (state["config"]["NORM"], state["config"]["ACTIVATION"], state["config"]["AUGMENTATIONS"]) == (
        "instance", "leaky_relu", "flips")
    assert not any(k.endswith("running_mean") for k in state["model"])
    summary = eval_summary(run_cli("eval", f"MODEL_WEIGHTS={run / 'best'}"))
    assert 0.0 <= json.loads(summary.read_text())["metrics"]["DSC"] <= 1.0
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 80), dtype=np.uint8)).save(tmp_path / "x.png")
    run_cli("predict", f"MODEL_WEIGHTS={run / 'best'}", f"INPUT={tmp_path / 'x.png'}", f"OUTPUT={tmp_path / 'out'}")
    assert np.asarray(Image.open(tmp_path / "out" / "x_mask.png")).shape == (96, 80)


def test_a_checkpoint_records_that_its_head_was_trained(trained_run):
    assert torch.load(trained_run / "best.pth", weights_only=True)["head_trained"] is True  # MODEL=AuxNet-EDC
