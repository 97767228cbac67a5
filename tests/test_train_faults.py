"""Issue 22, training: a run whose outputs overflow while its weights stay finite stops with the
epoch and the cause (item 7); a full disk while writing a checkpoint, log.jsonl or summary.json is
one clean error naming the file and the fix, the previous checkpoint intact (item 10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import torch_threads
from engines.forward import NonFiniteOutput
from engines.predictor import ArrayImage, Predictor
from engines.SegTrainer import TrainingDiverged
from test_faults import fit_epochs, log_epochs, trainers  # noqa: F401  (trainers: a fixture)


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


# ----------------------------------------------------------------------------- item 7: outputs overflow


def test_outputs_that_overflow_stop_the_run_with_the_epoch_and_the_cause(trainers, monkeypatch):
    trainer = trainers("TRAIN_EPOCHS=3", "MIXED_PRECISION=none")
    fit_epochs(trainer, 1)
    run = trainer.s.run
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
                                               r"Lower BASE_LR or set GRAD_CLIP, or set MIXED_PRECISION=none"):
        trainer.fit()
    assert not trainer.s.run.last.exists() and not trainer.s.run.best.exists()


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
