"""engines/figures.py through the trainer: the curves and overlays of a run are written at its end,
cheaply, with the curves grouped as utils/plots.py groups them."""

from __future__ import annotations

import time

import pytest

from conftest import torch_threads
from model.metrics import DISTANCE_METRICS
from utils.plots import curve_groups


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


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
