"""Issue #11, in process: faults injected into the trainer (NaN learning rates, a kill between the
checkpoint and the log line, a kill during the first checkpoint write, a smaller TRAIN_EPOCHS), and
the options and reports added with them (GRAD_CLIP, EARLY_STOPPING, the MODEL_WEIGHTS load report,
the curves and overlays, the run lock, per-rank seeds)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import torch_threads
from engines.builders import build_network
from engines.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from engines.launch import RunLock
from utils.run_paths import RunDir
from engines.SegTrainer import TrainingDiverged, epoch_seed, non_finite
from model.metrics import DISTANCE_METRICS
from test_trainer import make_trainer, tiny_config
from utils.plots import curve_groups
from utils.util import RunError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def trainers(tmp_path):
    """``trainers(*overrides, run=None)``: a tiny-config trainer (run folder ``tmp_path/run``); loggers closed after."""
    made = []

    def make(*overrides: str, run: RunDir | None = None):
        run = run or RunDir(tmp_path / "run")
        run.root.mkdir(exist_ok=True)
        made.append(make_trainer(tiny_config(tmp_path, *overrides), run))
        return made[-1]

    yield make
    for trainer in made:
        trainer.logger.close()


def log_epochs(run: RunDir) -> list[int]:
    return [json.loads(line)["epoch"] for line in run.log.read_text().splitlines()]


def fit_epochs(trainer, epochs: int):
    """Fit until ``epochs`` epochs are done (the run's TRAIN_EPOCHS may be larger)."""
    full, trainer.settings.epochs = trainer.settings.epochs, epochs
    trainer.fit()
    trainer.settings.epochs = full


# ----------------------------------------------------------------------------- bug 3: the NaN guard


def test_a_huge_lr_stops_with_the_step_tiles_and_terms_and_leaves_the_checkpoints_untouched(trainers):
    trainer = trainers("TRAIN_EPOCHS=4")
    fit_epochs(trainer, 1)
    run = trainer.settings.run
    before = {p: p.read_bytes() for p in (run.last, run.best)}
    # before the fix, BASE_LR=1e6 finished epochs with every BatchNorm running variance at inf, saved
    # them and selected them as best; the loss itself stayed finite (1e12, 1e19)
    trainer.scheduler.base_lrs = [1e6 for _ in trainer.scheduler.base_lrs]
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e6
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit()
    message = str(err.value)
    assert "training diverged at step" in message and "(epoch 1)" in message
    assert "tiles [" in message and "_y0" in message and "terms {" in message and "SoftDICE" in message
    assert f"{run.last} is left as it was" in message and "BASE_LR" in message
    assert {p: p.read_bytes() for p in (run.last, run.best)} == before
    for path in (run.last, run.best):
        state = read_checkpoint(path)
        assert state["epoch"] == 0
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert log_epochs(run) == [0]


def test_the_parameter_guard_names_a_non_finite_batchnorm_buffer():
    net = build_network(tiny_config("unused"))[0]
    assert non_finite(net) == []
    net.inc[1].running_var[0] = math.inf
    assert non_finite(net) == ["inc.1.running_var"]


def test_a_non_finite_checkpoint_is_never_written(trainers, tmp_path):
    trainer = trainers()
    trainer.step.net.inc[1].running_var.fill_(math.inf)
    with pytest.raises(CheckpointError, match="refusing to write .* NaN or infinity .*inc.1.running_var"):
        trainer.save_checkpoint(0, improved=True)
    assert not trainer.settings.run.last.exists() and not trainer.settings.run.best.exists()


# ----------------------------------------------------------------------------- bug 2: the log after a crash


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


# ----------------------------------------------------------------------------- bug 4: a smaller TRAIN_EPOCHS


def test_resuming_with_a_smaller_train_epochs_is_refused(trainers):
    fit_epochs(trainers("TRAIN_EPOCHS=2"), 2)
    with pytest.raises(CheckpointError, match=r"has trained 2 epochs, more than the 1 .*raise TRAIN_EPOCHS"):
        trainers("TRAIN_EPOCHS=1").resume_if_possible()


# ----------------------------------------------------------------------------- exact resume, seeds


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


def test_every_rank_and_epoch_draws_its_own_seed():
    seeds = {epoch_seed(42, epoch, rank) for epoch in range(20) for rank in range(8)}
    assert len(seeds) == 160
    assert epoch_seed(42, 3, 1) == epoch_seed(42, 3, 1)


# ----------------------------------------------------------------------------- GRAD_CLIP, EARLY_STOPPING


def test_grad_clip_bounds_the_gradient_norm(trainers):
    trainer = trainers("GRAD_CLIP=0.001")
    trainer.ddp.train()
    trainer.optimise(next(iter(trainer.train_loader)))
    grads = [p.grad for p in trainer.step.parameters() if p.grad is not None]
    assert float(torch.nn.utils.get_total_norm(grads)) <= 0.001 * 1.0001


def test_early_stopping_stops_after_patience_epochs_without_improvement(trainers, monkeypatch, capsys):
    trainer = trainers("TRAIN_EPOCHS=6", "EARLY_STOPPING=2")

    class Flat:
        def compute(self):
            return {"DSC": 0.5}

    monkeypatch.setattr(trainer, "evaluate", lambda loader=None: Flat())
    summary = trainer.fit()
    assert [h["epoch"] for h in trainer.history] == [0, 1, 2] and summary["best_epoch"] == 0
    assert "early stopping after epoch 2" in capsys.readouterr().out


# ----------------------------------------------------------------------------- load report, AuxNet-D from UNet


def test_auxnet_d_starts_from_a_unet_checkpoint_and_reports_the_new_frozen_head(trainers, tmp_path, capsys):
    unet = build_network(tiny_config(tmp_path, "MODEL=UNet"))[0]
    torch.save(unet.state_dict(), tmp_path / "unet.pth")
    trainer = trainers("MODEL=AuxNet-D", f"MODEL_WEIGHTS={tmp_path / 'unet.pth'}")
    out = capsys.readouterr().out
    assert "newly initialised" in out and "(head, fill_head)" in out and "frozen at their initialisation" in out
    assert all(not p.requires_grad for p in trainer.step.net.head.parameters())


# ----------------------------------------------------------------------------- curves and overlays


def test_curves_and_overlays_are_written_at_the_end_and_cheaply(trainers):
    trainer = trainers("ADAPTIVE_WEIGHTS=true")
    trainer.fit()
    run = trainer.settings.run
    for name in ("curves.png", "overlays.png"):
        assert (run.root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    started = time.perf_counter()
    trainer.plot(1, final=True)
    assert time.perf_counter() - started < 5.0  # measured: ~0.6 s on two busy cores, imports done
    groups = curve_groups(trainer.history, distance_metrics=DISTANCE_METRICS)
    assert set(groups["loss"]) == {"loss", "loss/SoftDICE", "loss/BCE", "loss/CLS"}
    assert set(groups["loss weights"]) == {"weight/SoftDICE", "weight/BCE", "weight/CLS"}
    assert "DSC" in groups["scores"] and "HD95" in groups["distances"] and groups["learning rate"] == ["lr"]


# ----------------------------------------------------------------------------- bug 5: the run lock


def test_the_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, capsys):
    lock = RunLock(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(RunError, match=rf"in use by another run \(pid {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid}\n")
    RunLock(tmp_path).release()  # stale: taken over
    assert not (tmp_path / ".lock").exists()
    assert f"taking over the lock {tmp_path / '.lock'} of pid {dead.pid}, which has ended" in capsys.readouterr().err
    # a lock left by a killed run whose pid now belongs to another process (reused) is stale too:
    # staleness is whether the file is locked, not whether its pid is alive (before: refused)
    (tmp_path / ".lock").write_text(f"{os.getppid()}\n")
    RunLock(tmp_path).release()
    assert not (tmp_path / ".lock").exists()


def test_the_run_lock_without_file_locks_relies_on_the_pid_and_says_so(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # a file system without flock (Lustre without -o flock)
    lock = RunLock(tmp_path)
    assert "has no file locks (No locks available): the run lock relies on the pid in it" in capsys.readouterr().err
    with pytest.raises(RunError, match=rf"in use by another run \(pid {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()
    assert not (tmp_path / ".lock").exists()
