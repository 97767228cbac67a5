"""A trainer restarted in the run folder of an earlier one, in process: after a kill between the
checkpoint and the log line, or during the first checkpoint write, the run goes on from its last
checkpoint with each epoch logged once; a smaller TRAIN_EPOCHS is refused; a resumed run ends
bit-identical to an uninterrupted one. (A resumed run's optimiser and schedule: test_trainer.py; a
run killed with SIGKILL through the command line: tests/test_cli_resume.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import fit_epochs, log_epochs, torch_threads
from engines.checkpoint import CheckpointError, read_checkpoint
from utils.run_paths import RunDir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


# ----------------------------------------------------------------------------- a kill between the checkpoint and the log line


def test_a_kill_after_the_log_line_and_before_last_pth_does_not_duplicate_epochs(trainers):
    first = trainers("TRAIN_EPOCHS=3")
    fit_epochs(first, 1)
    first.logger.close()
    run = first.settings.run
    # killed after epoch 1's log line, before its last.pth (the old order): the log said 0, 1
    with run.log.open("a") as fh:
        fh.write(json.dumps({"epoch": 1, "loss": 9.0}) + "\n")
    trainers("TRAIN_EPOCHS=3").fit()
    assert log_epochs(run) == [0, 1, 2]  # before: 0, 1, 1, 2


def test_a_kill_after_last_pth_and_before_the_log_line_does_not_lose_the_epoch(trainers):
    first = trainers("TRAIN_EPOCHS=3")
    fit_epochs(first, 2)
    first.logger.close()
    run = first.settings.run
    run.log.write_text(run.log.read_text().splitlines(keepends=True)[0])  # epoch 1's line never written
    trainers("TRAIN_EPOCHS=3").fit()
    assert log_epochs(run) == [0, 1, 2]


def test_a_kill_during_the_first_checkpoint_write_is_cleaned_up_and_said(trainers, capsys):
    trainer = trainers()
    run = trainer.settings.run
    leftover = run.root / ".last.pth.k2j3h4.tmp"
    leftover.write_bytes(b"half a checkpoint")
    run.log.write_text(json.dumps({"epoch": 0, "loss": 1.0}) + "\n")
    trainer.fit()
    out = capsys.readouterr().out
    assert "no finished checkpoint" in out and "starting again from epoch 0" in out
    assert not leftover.exists()
    assert log_epochs(run) == [0, 1]


def test_the_restart_message_names_the_removed_leftovers(trainers, capsys):
    trainer = trainers()
    (trainer.settings.run.root / ".last.pth.abc.tmp").write_bytes(b"x")
    trainer.resume_if_possible()
    out = capsys.readouterr().out
    assert "no finished checkpoint" in out and ".last.pth.abc.tmp" in out and "starting again from epoch 0" in out


# ----------------------------------------------------------------------------- a smaller TRAIN_EPOCHS


def test_resuming_with_a_smaller_train_epochs_is_refused(trainers):
    fit_epochs(trainers("TRAIN_EPOCHS=2"), 2)
    with pytest.raises(CheckpointError, match=r"has trained 2 epochs, more than the 1 .*raise TRAIN_EPOCHS"):
        trainers("TRAIN_EPOCHS=1").resume_if_possible()


# ----------------------------------------------------------------------------- exact resume


def test_resume_after_any_epoch_is_bit_identical_in_process(trainers, tmp_path):
    straight = trainers("TRAIN_EPOCHS=3", "SEG_DROPOUT=0.2", run=RunDir(tmp_path / "straight"))
    straight.fit()
    first = trainers("TRAIN_EPOCHS=3", "SEG_DROPOUT=0.2", run=RunDir(tmp_path / "resumed"))
    fit_epochs(first, 1)
    torch.manual_seed(12345)  # whatever the process drew in between must not matter
    resumed = trainers("TRAIN_EPOCHS=3", "SEG_DROPOUT=0.2", run=RunDir(tmp_path / "resumed"))
    resumed.fit()
    a, b = read_checkpoint(straight.settings.run.last), read_checkpoint(resumed.settings.run.last)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


