"""The training step never waits for the device: no tensor is read on the host inside a step, only
at the check points (every CHECK_EVERY steps and at the end of the epoch); the epoch's loss is the
mean of its steps' losses; a loss or a statistic that becomes non-finite between check points is
caught at the next one, named, and nothing is saved."""

from __future__ import annotations

import importlib
import math
from contextlib import contextmanager

import pytest
import torch

from conftest import log_epochs, torch_threads
from engines.SegTrainer import TrainingDiverged
from model.losses.combined import LossOutput

seg_trainer = importlib.import_module("engines.SegTrainer")  # the module: the package re-exports the class

#: The tensor methods that read a tensor's values on the host (on a GPU: a wait for the device).
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")

#: Check points every 4 steps over an epoch of 9 (3 passes over the tiny run's 3 batches): after
#: steps 4 and 8 and at the end.
EVERY, PASSES = 4, 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def nine_steps(trainers, monkeypatch):
    """``nine_steps(*overrides)``: a tiny trainer whose epoch is 9 steps (its 3 batches, 3 times) with a
    check point every 4 steps."""
    monkeypatch.setattr(seg_trainer, "CHECK_EVERY", EVERY)

    def make(*overrides):
        trainer = trainers(*overrides)
        trainer.train_loader = list(trainer.train_loader) * PASSES
        return trainer

    return make


@contextmanager
def counting_host_reads(trainer, log: list, monkeypatch):
    """Append ``(method, where)`` to ``log`` for every host read of a tensor in the block, ``where``
    being ``"step"`` inside a step (:meth:`SegTrainer.optimise` and the keeping of its losses),
    ``"check"`` inside a check point and ``"epoch"`` elsewhere. The optimiser's step counters are not
    counted: torch keeps them on the host on every device (unless capturable)."""
    place = ["epoch"]

    def marked(where, method):
        def run(*args, **kwargs):
            place[0] = where
            try:
                return method(*args, **kwargs)
            finally:
                place[0] = "epoch"
        return run

    def counted(name, original):
        def read(self, *args, **kwargs):
            if not any(self is state.get("step") for state in trainer.optimizer.state.values()):
                log.append((name, place[0]))
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "check_health", marked("check", trainer.check_health))
        patch.setattr(trainer, "optimise", marked("step", trainer.optimise))
        patch.setattr(seg_trainer.LossWindow, "add", marked("step", seg_trainer.LossWindow.add))
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        yield


def recording_steps(trainer, monkeypatch) -> list:
    """The list that each step's LossOutput is appended to."""
    outputs = []
    optimise = trainer.optimise
    monkeypatch.setattr(trainer, "optimise", lambda batch: outputs.append(optimise(batch)) or outputs[-1])
    return outputs


@pytest.mark.parametrize("overrides, weights_read", [
    ((), 0),  # static weights are floats
    (("LOSS=SoftDICE_CE", "ADAPTIVE_WEIGHTS=true", "SEG_CLASSES=3"), 3),  # learned: read once, at the end
], ids=["default", "adaptive-multiclass"])
def test_a_step_reads_no_tensor_on_the_host_between_check_points(nine_steps, monkeypatch, overrides, weights_read):
    # before: every step read each loss term (float), the loss's finiteness (bool), every weight's
    # (bool), the targets' class range (bool, twice) and, with adaptive weights, the weights (tolist)
    trainer = nine_steps(*overrides)
    checks = []
    check_health = trainer.check_health
    monkeypatch.setattr(trainer, "check_health", lambda window, sums, epoch: checks.append(
        trainer.scheduler.last_epoch) or check_health(window, sums, epoch))
    reads = []
    trainer.ddp.train()
    with counting_host_reads(trainer, reads, monkeypatch):
        stats = trainer.train_epoch(0)
    assert [r for r in reads if r[1] == "step"] == []
    assert checks == [4, 8, 9]
    assert reads.count(("tolist", "check")) == len(checks)  # the window's losses, in one transfer
    assert reads.count(("__bool__", "check")) == len(checks)  # the weights' and statistics' health
    assert len([r for r in reads if r[1] == "check"]) == 2 * len(checks)
    assert reads.count(("__float__", "epoch")) == weights_read == len(reads) - 2 * len(checks)
    assert math.isfinite(stats["loss"])


def test_the_epochs_loss_and_terms_are_the_means_of_its_steps(nine_steps, monkeypatch):
    trainer = nine_steps()
    outputs = recording_steps(trainer, monkeypatch)
    stats = trainer.train_epoch(0)
    assert len(outputs) == EVERY * 2 + 1
    by_hand = {"loss": [float(o.total.detach()) for o in outputs]}
    for name in outputs[0].terms:
        by_hand[f"loss/{name}"] = [float(o.terms[name]) for o in outputs]
    assert set(by_hand) == {"loss", "loss/SoftDICE", "loss/BCE", "loss/CLS"}
    for key, values in by_hand.items():
        assert stats[key] == pytest.approx(sum(values) / len(values), rel=1e-12), key
    assert stats["weight/SoftDICE"] == stats["weight/BCE"] == 1.0


def test_a_loss_that_becomes_infinite_is_caught_at_the_next_check_point_named_and_nothing_saved(
        nine_steps, monkeypatch):
    trainer = nine_steps()
    batches = trainer.train_loader
    loss = trainer.step.loss
    calls = []
    forward = loss.forward

    def infinite_at_step_5(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(1)
        return out if len(calls) != 6 else LossOutput(out.total * math.inf, out.terms, out.weights)

    monkeypatch.setattr(loss, "forward", infinite_at_step_5)
    run = trainer.settings.run
    with pytest.raises(TrainingDiverged, match=(
            r"^training diverged at step 5 \(epoch 0\): the loss became inf; loss inf, terms \{'SoftDICE': "
            rf"[0-9.]+, 'BCE': [0-9.]+, 'CLS': [0-9.]+\}}; tiles \[{', '.join(repr(i) for i in batches[5]['id'])}\]\. "
            r"no checkpoint was written\. Lower BASE_LR, set GRAD_CLIP, or check these tiles$")):
        trainer.fit()
    assert len(calls) == 8  # caught at the check point after step 8 (0-based 7), not at the end of the epoch
    assert not run.last.exists() and not run.best.exists() and log_epochs(run) == []


def test_a_statistic_that_becomes_nan_is_caught_at_the_next_check_point_named_and_nothing_saved(
        nine_steps, monkeypatch):
    trainer = nine_steps("TRAIN_EPOCHS=1", "NORM=batch")
    optimise = trainer.optimise
    steps = []

    def nan_after_step_5(batch):
        out = optimise(batch)
        steps.append(out)
        if len(steps) == 6:  # BatchNorm's running variance: the training loss, on batch statistics, stays finite
            trainer.step.net.inc[1].running_var[0] = math.nan
        return out

    monkeypatch.setattr(trainer, "optimise", nan_after_step_5)
    run = trainer.settings.run
    with pytest.raises(TrainingDiverged, match=(
            r"^training diverged at step [4-7] \(epoch 0\): after the optimiser steps 4\.\.7 1 tensor\(s\) are not "
            r"finite \(net\.inc\.1\.running_var\) \(checked every 4 steps\); step [4-7] had the largest loss of those; "
            r"loss [0-9.]+, terms \{'SoftDICE': .*\}; tiles \['.*_y0.*'\]\. no checkpoint was written\. "
            r"Lower BASE_LR, set GRAD_CLIP, or check these tiles$")):
        trainer.fit()
    assert len(steps) == 8
    assert not run.last.exists() and not run.best.exists() and log_epochs(run) == []
