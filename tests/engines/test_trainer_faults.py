"""Faults during training, in process: weights that become NaN or infinite stop the run with the
step and leave the checkpoints as they were, and a non-finite network is never saved; a run whose
outputs overflow while its weights stay finite stops with the epoch and the cause; a full disk while
writing a checkpoint, log.jsonl or summary.json is one clean error naming the file and the fix, the
previous checkpoint intact."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import subprocess

import numpy as np
import pytest
import torch

from conftest import TINY, fit_epochs, log_epochs, run_cli, tiny_config, torch_threads
from engines.builders import build_network
from engines.checkpoint import CheckpointError, read_checkpoint
from engines.forward import NonFiniteOutput, non_finite
from engines.sliding_window import ArrayImage, Predictor
from utils.run_paths import RunDir
from engines.SegTrainer import TrainingDiverged
from engines.train import write_summary
from utils.loggers import JsonLinesLogger
from utils.util import WriteError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def overflowing(net) -> None:
    """Make ``net``'s outputs overflow with finite weights (its largest, a BatchNorm scale, becomes
    1000): every parameter times 1000, so each of the ~20 layers scales its output up (BatchNorm in
    eval mode keeps its running statistics) until the logits reach inf, and inf - inf gives NaN."""
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1000.0)


# ----------------------------------------------------------------------------- non-finite weights: the NaN guard


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
    net = build_network(tiny_config("unused", "NORM=batch"))[0]
    assert non_finite(net) == []
    net.inc[1].running_var[0] = math.inf
    assert non_finite(net) == ["inc.1.running_var"]


def test_a_non_finite_checkpoint_is_never_written(trainers, tmp_path):
    trainer = trainers("NORM=batch")
    trainer.step.net.inc[1].running_var.fill_(math.inf)
    with pytest.raises(CheckpointError, match="refusing to write .* NaN or infinity .*inc.1.running_var"):
        trainer.save_checkpoint(0, improved=True)
    assert not trainer.settings.run.last.exists() and not trainer.settings.run.best.exists()


# ----------------------------------------------------------------------------- outputs overflow


def test_outputs_that_overflow_stop_the_run_with_the_epoch_and_the_cause(trainers, monkeypatch):
    trainer = trainers("TRAIN_EPOCHS=3", "MIXED_PRECISION=none")
    fit_epochs(trainer, 1)
    run = trainer.settings.run
    before = {p: p.read_bytes() for p in (run.last, run.best)}
    train_epoch = trainer.train_epoch

    def train_then_overflow(epoch):  # as BASE_LR=30 does: the loss (on batch statistics) stays finite
        stats = train_epoch(epoch)
        overflowing(trainer.step.net)
        return stats

    monkeypatch.setattr(trainer, "train_epoch", train_then_overflow)
    # before: the epoch was scored (DSC 0, ACC = the background's share), saved and logged
    with pytest.raises(TrainingDiverged, match=(
            r"^training diverged in epoch 1: the network's outputs are NaN or infinite in 1 of 1 evaluation "
            r"batch\(es\); the outputs overflowed: the largest weight has grown to 1\.0\de\+03\. "
            rf"{run.last} is left as it was\. Lower BASE_LR or set GRAD_CLIP$")):
        trainer.fit()
    assert {p: p.read_bytes() for p in (run.last, run.best)} == before
    assert log_epochs(run) == [0]


def test_a_first_epoch_that_overflows_leaves_no_checkpoint(trainers, monkeypatch):
    trainer = trainers("MIXED_PRECISION=bf16")  # autocast: lowering the precision is a fix too
    monkeypatch.setattr(trainer, "train_epoch", lambda epoch: overflowing(trainer.step.net) or {})
    with pytest.raises(TrainingDiverged, match=r"in epoch 0: .*grown to 1e\+03\. no checkpoint was written\. "
                                               r"Lower BASE_LR or set GRAD_CLIP, or set MIXED_PRECISION=none$"):
        trainer.fit()
    assert not trainer.settings.run.last.exists() and not trainer.settings.run.best.exists()


def test_the_predictor_names_the_rows_and_blames_no_option(trainers):
    # before: "the checkpoint's weights are not usable (retrain or check MODEL_WEIGHTS)", also when
    # training's own whole-image evaluation met them and MODEL_WEIGHTS was never set
    net = trainers().step.net
    overflowing(net)
    predictor = Predictor(net, tile=64, overlap=0, batch_size=4, device=torch.device("cpu"), amp_dtype=None,
                          channels_last=False)
    image = ArrayImage(np.random.default_rng(0).integers(0, 256, (64, 64, 1), dtype=np.uint8), 0.0, 255.0)
    with pytest.raises(NonFiniteOutput, match=r"^the network produced non-finite probabilities in rows 0\.\.63: its "
                                              r"weights are NaN, or so large that its outputs overflow$"):
        predictor.predict_array(image)


# ----------------------------------------------------------------------------- a full disk

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk_message(path) -> str:
    return (rf"^cannot write {re.escape(str(path))}: No space left on device \(ENOSPC\); free space on that disk, "
            r"or set RESULTS_DIR to a disk with room$")


class FullFile(io.FileIO):
    """A file on a full disk: the first ``room`` bytes are written, then every write fails with ENOSPC."""

    room = 0

    def write(self, data) -> int:
        if self.room <= 0:
            raise ENOSPC
        n = min(len(data), self.room)
        self.room -= n
        return super().write(memoryview(data)[:n])


@pytest.fixture
def fill_disk(monkeypatch):
    """``fill_disk(fails_in)``: every atomic write (``utils.util.atomic_write``'s ``os.fdopen``) from now
    on meets a full disk, in ``write`` (torch.save turns it into a RuntimeError) or in ``fsync``."""

    def fill(fails_in: str = "write") -> None:
        if fails_in == "write":
            monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: FullFile(fd, "wb"))
        else:
            def fsync(fd):
                raise ENOSPC
            monkeypatch.setattr(os, "fsync", fsync)

    return fill


def leftovers(run: RunDir) -> list[str]:
    return sorted(p.name for p in run.root.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("fails_in", ["write", "fsync"])
def test_a_full_disk_while_saving_a_checkpoint_is_one_clean_error_and_keeps_the_previous_one(
        trainers, fill_disk, fails_in):
    trainer = trainers("TRAIN_EPOCHS=3")
    fit_epochs(trainer, 1)
    run = trainer.settings.run
    before = {p: p.read_bytes() for p in (run.last, run.best)}
    fill_disk(fails_in)
    # before: torch's "RuntimeError: [enforce fail at inline_container.cc] . unexpected pos", exit 1
    with pytest.raises(WriteError, match=full_disk_message(run.best)):
        trainer.save_checkpoint(1, improved=True)
    with pytest.raises(WriteError, match=full_disk_message(run.last)):
        trainer.save_checkpoint(1, improved=False)
    assert {p: p.read_bytes() for p in (run.last, run.best)} == before
    assert leftovers(run) == []


def test_a_full_disk_while_writing_the_summary_is_one_clean_error(trainers, fill_disk):
    trainer = trainers()
    fill_disk()
    with pytest.raises(WriteError, match=full_disk_message(trainer.settings.run.summary)):
        write_summary(trainer.settings.run, trainer.summary())
    assert leftovers(trainer.settings.run) == [] and not trainer.settings.run.summary.exists()


def test_a_full_disk_while_logging_names_log_jsonl_and_leaves_no_half_line(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    logger = JsonLinesLogger(path)
    logger.log({"loss": 1.0}, step=0)
    logger.close()
    half = FullFile(path, "ab")
    half.room = 10  # the disk fills up in the middle of the next line
    monkeypatch.setattr(logger, "_fh", half)
    with pytest.raises(WriteError, match=full_disk_message(path)):
        logger.log({"loss": 0.5}, step=1)
    logger.close()
    assert path.read_text() == json.dumps({"epoch": 0, "loss": 1.0}) + "\n"
    with pytest.raises(WriteError, match=full_disk_message(path)):  # the rewind of a resume, too
        with monkeypatch.context() as m:
            m.setattr(os, "fdopen", lambda fd, *args, **kwargs: FullFile(fd, "wb"))
            logger.rewind([{"epoch": 0, "loss": 1.0}])
    assert path.read_text() == json.dumps({"epoch": 0, "loss": 1.0}) + "\n" and sorted(os.listdir(tmp_path)) == [
        "log.jsonl"]


@contextlib.contextmanager
def tmpfs(mount, size: str):
    """A tmpfs of ``size`` at ``mount`` (a real file system that fills up), or a skip where mounting
    is not allowed (not root, a container without the right)."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(done.stderr or done.stdout).strip() or done.returncode}): "
                    "the injected full disk of the tests above stands in")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: two checkpoints of the tiny network and the plots fit."""
    with tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


def test_a_really_full_disk_stops_the_checkpoint_log_and_summary_cleanly(trainers, small_disk):
    trainer = trainers("TRAIN_EPOCHS=3", run=RunDir(small_disk / "run"))
    try:
        fit_epochs(trainer, 1)  # two checkpoints of ~0.4 MB and the plots fit in 2 MiB
        run = trainer.settings.run
        before = {p: p.read_bytes() for p in (run.last, run.best)}
        with open(small_disk / "filler", "wb", buffering=0) as fh:  # take the rest of the disk
            with pytest.raises(OSError, match="No space left on device"):
                while True:
                    fh.write(b"\0" * 4096)
        with pytest.raises(WriteError, match=full_disk_message(run.best)):
            trainer.save_checkpoint(1, improved=True)
        with pytest.raises(WriteError, match=full_disk_message(run.log)):
            trainer.logger.log({"loss": 0.5, "note": "x" * 8192}, step=1)
        with pytest.raises(WriteError, match=full_disk_message(run.summary)):
            write_summary(run, trainer.summary())
        assert {p: p.read_bytes() for p in (run.last, run.best)} == before
        assert leftovers(run) == [] and log_epochs(run) == [0]
    finally:
        trainer.logger.close()  # before the disk is unmounted


def test_a_run_whose_first_checkpoint_meets_a_full_disk_exits_2_with_the_file_and_the_fix(tmp_path):
    # 400 KiB: the synthetic data's cache (~130 KiB), config.yaml, tts.json and the log fit; best.pth
    # (~410 KiB) does not. Before: "OSError: [Errno 28]" then torch's RuntimeError traceback, exit 1
    with tmpfs(tmp_path / "disk", "400k") as disk:
        proc = run_cli(*TINY, "TRAIN_EPOCHS=1", "GPUs=[]", f"RESULTS_DIR={disk}", check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.rstrip().endswith(
            f"error: cannot write {disk}/default/run_001/best.pth: No space left on device (ENOSPC); "
            "free space on that disk, or set RESULTS_DIR to a disk with room")
        assert "Traceback" not in proc.stderr
        assert not (disk / "default").exists()  # a new run that saved no checkpoint leaves no folder
