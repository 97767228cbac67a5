"""utils/plots.py: pictures that read correctly — the SDM-error panel on one fixed scale in pixels with
its colour bar, readable tile ids, curves with units, the run's name and the best epoch marked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from utils.plots import (ERROR_SCALE_PX, _diverging, best_epoch, curves_figure, overlays_figure, plot_curves,
                         plot_overlays)

HISTORY = [
    {"epoch": 0, "lr": 0.003, "loss": 1.0, "loss/BCE": 0.6, "weight/BCE": 1.0, "DSC": 0.80, "HD95": 4.0},
    {"epoch": 1, "lr": 0.002, "loss": 0.8, "loss/BCE": 0.5, "weight/BCE": 1.0, "DSC": 0.90, "HD95": 2.0},
    {"epoch": 2, "lr": 0.001, "loss": 0.7, "loss/BCE": 0.4, "weight/BCE": 1.0, "DSC": 0.90, "HD95": None},
    {"epoch": 3, "lr": 0.000, "loss": 0.6, "loss/BCE": 0.3, "weight/BCE": 1.0, "DSC": 0.85, "HD95": 3.0},
]


@pytest.fixture
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_best_epoch_is_the_first_of_the_best_finite_values():
    assert best_epoch(HISTORY, "DSC", higher_is_better=True) == 1  # epoch 2 only equals it
    assert best_epoch(HISTORY, "HD95", higher_is_better=False) == 1  # None (not finite) is never the best
    assert best_epoch([{"epoch": 0, "HD95": math.nan}], "HD95", higher_is_better=False) is None
    assert best_epoch(HISTORY, "TTR", higher_is_better=True) is None


def test_a_one_pixel_error_has_the_same_pale_colour_in_every_tile():
    """Before, each tile was scaled by its own largest error: a tile whose only error was 1 px showed it
    saturated red, as a 10-px error in another tile."""
    one_px = _diverging(np.array([[1.0, 0.0]]))[0, 0]
    assert np.allclose(one_px, [1, 1 - 1 / ERROR_SCALE_PX, 1 - 1 / ERROR_SCALE_PX])  # 20 % red at a 5-px scale
    both = _diverging(np.array([[1.0, 10.0, -10.0]]))[0]
    assert np.allclose(both[0], one_px)  # unchanged by a larger error elsewhere
    assert np.allclose(both[1], [1, 0, 0]) and np.allclose(both[2], [0, 0, 1])  # beyond the scale: clipped


def test_overlays_have_a_colour_bar_on_the_fixed_scale_in_pixels_and_readable_ids(tmp_path, close_figures):
    rng = np.random.default_rng(0)
    n, size = 2, 32
    images = rng.random((n, size, size))
    truths = (rng.random((n, size, size)) > 0.5).astype(np.int64)
    errors = rng.normal(0, 20, (n, size, size))  # errors far beyond the scale do not change it
    fig = overlays_figure(images, truths, truths, errors, ["img_000_t3", "img_001_t7"], title="default/run_001, epoch 5")
    bar = fig.axes[-1]
    assert bar.get_xlim() == pytest.approx((-ERROR_SCALE_PX, ERROR_SCALE_PX))
    assert bar.get_xlabel() == "SDM error, px (beyond ±5 clipped)"
    texts = {t.get_text(): t for t in fig.texts}
    assert {"image", "ground truth", "prediction", "SDM error (px)", "default/run_001, epoch 5"} <= set(texts)
    ids = [t for t in fig.axes[0].texts if t.get_text().startswith("img_")]
    assert [t.get_text() for t in ids] == ["img_000_t3", "img_001_t7"]
    assert min(t.get_fontsize() for t in [*ids, *texts.values()]) >= 10  # before: 6-pt ids, 8-pt titles
    path = plot_overlays(images, truths, truths, errors, ["a", "b"], tmp_path / "overlays.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_carry_units_the_run_name_and_the_best_epoch(tmp_path, close_figures):
    fig = curves_figure(HISTORY, distance_metrics=("HD95",), title="default/run_001", best=("DSC", 1))
    assert fig._suptitle.get_text() == "default/run_001"
    labels = {ax.get_title(): ax.get_ylabel() for ax in fig.axes}
    assert labels == {"loss": "loss (log scale when positive)", "loss weights": "weight", "scores": "score (0 to 1)",
                      "distances": "distance (px, or PIXEL_SPACING units)", "learning rate": "learning rate"}
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch"
        marks = [line for line in ax.get_lines() if line.get_label() == "best DSC (epoch 1)"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [1, 1], ax.get_title()
    path = plot_curves(HISTORY, tmp_path / "curves.png", distance_metrics=("HD95",))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
