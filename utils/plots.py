"""Pictures of a run: its training curves and prediction overlays, as PNG files.

Plain inputs only (a list of epoch records; numpy arrays; the names of the distance metrics, which
the caller takes from their owner, :data:`model.metrics.DISTANCE_METRICS`), so the module is usable
on its own.
matplotlib is imported lazily with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from utils.util import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def curve_groups(history: Sequence[Mapping[str, Any]], *, distance_metrics: Collection[str]) -> dict[str, list[str]]:
    """The keys of ``history`` by panel: losses (total and every term), loss weights, scores, distances
    (the ``distance_metrics``: in pixels or physical units, drawn apart from the scores in [0, 1]),
    learning rate."""
    keys = list(dict.fromkeys(k for record in history for k in record))
    numeric = [k for k in keys if k not in ("epoch", "time_s")
               and any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in history)]
    groups = {
        "loss": [k for k in numeric if k == "loss" or k.startswith("loss/")],
        "loss weights": [k for k in numeric if k.startswith("weight/")],
        "scores": [k for k in numeric if "/" not in k and k not in ("loss", "lr") and k not in distance_metrics],
        "distances": [k for k in numeric if k in distance_metrics],
        "learning rate": [k for k in numeric if k == "lr"],
    }
    return {name: ks for name, ks in groups.items() if ks}


def plot_curves(history: Sequence[Mapping[str, Any]], path: Path, *, distance_metrics: Collection[str]) -> Path:
    """One panel per group of :func:`curve_groups`, every key against the epoch; written atomically.

    Args:
        history: one record per epoch, each with ``epoch`` and the logged values (None = not finite).
        path: the PNG to write.
        distance_metrics: the metric names drawn in the distances panel.
    """
    plt = _pyplot()
    groups = curve_groups(history, distance_metrics=distance_metrics)
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4.2 * max(len(groups), 1), 3.4), dpi=72,
                             squeeze=False)
    epochs = [r.get("epoch", i) for i, r in enumerate(history)]
    for ax, (title, keys) in zip(axes[0], groups.items()):
        for key in keys:
            ys = [r.get(key) for r in history]
            ys = [float(y) if isinstance(y, (int, float)) and math.isfinite(y) else math.nan for y in ys]
            ax.plot(epochs, ys, marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "loss" and all(r.get("loss", 0) and r.get("loss", 0) > 0 for r in history):
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.88, wspace=0.25)
    return _save(fig, path, plt)


def plot_overlays(images: np.ndarray, truths: np.ndarray, preds: np.ndarray, errors: np.ndarray,
                  ids: Sequence[str], path: Path) -> Path:
    """One row per tile: the image, the ground truth over it, the prediction over it, and the
    signed-distance error map (SDM of the prediction minus SDM of the ground truth, first foreground
    class; red: the prediction's boundary lies outside the true one, blue: inside; white: exact).

    The panels are composed as one RGB mosaic and drawn in a single axes (cheap enough to draw each epoch).

    Shape:
        images: (N, H, W) or (N, H, W, C) in [0, 1]; truths, preds: (N, H, W) class indices;
        errors: (N, H, W).
    """
    plt = _pyplot()
    rows = [np.concatenate([_gray(images[i]), _labels_over(images[i], truths[i]), _labels_over(images[i], preds[i]),
                            _diverging(errors[i])], axis=1) for i in range(len(ids))]
    gap = np.ones((4, rows[0].shape[1], 3)) if rows else np.ones((1, 1, 3))
    mosaic = np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0) if rows else gap
    h, w = mosaic.shape[:2]
    fig = plt.figure(figsize=(max(w, 256) / 64, h / 64 + 0.5), dpi=64)
    ax = fig.add_axes((0, 0, 1, h / (h + 32)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    tile_w = w / 4
    for k, title in enumerate(("image", "ground truth", "prediction", "SDM error")):
        fig.text((k + 0.5) * tile_w / w, 1 - 12 / (h + 32), title, ha="center", va="center", fontsize=8)
    for i, tile in enumerate(ids):
        ax.text(2, i * (h + 4) / max(len(ids), 1) + 8, tile, color="yellow", fontsize=6, va="top")
    return _save(fig, path, plt)


def _gray(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] of a grayscale or multi-channel image (first three channels)."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, axis=-1)


def _labels_over(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image with every foreground class tinted (class 1 red, then other hues), half transparent."""
    rgb = _gray(image)
    hues = np.array([[1, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.4, 1], [1, 0.8, 0], [0.8, 0.2, 1]], dtype=np.float32)
    labels = np.asarray(labels)
    fg = labels > 0
    colour = hues[(np.maximum(labels, 1) - 1) % len(hues)]
    rgb[fg] = 0.5 * rgb[fg] + 0.5 * colour[fg]
    return rgb


def _diverging(error: np.ndarray) -> np.ndarray:
    """Blue (negative) - white (0) - red (positive), scaled by the largest magnitude."""
    error = np.asarray(error, dtype=np.float32)
    t = error / (float(np.abs(error).max()) or 1.0)
    pos, neg = np.clip(t, 0, 1)[..., None], np.clip(-t, 0, 1)[..., None]
    white = np.ones(error.shape + (3,), dtype=np.float32)
    return white - pos * np.array([0, 1, 1], dtype=np.float32) - neg * np.array([1, 1, 0], dtype=np.float32)


def _save(fig, path: Path, plt) -> Path:
    try:
        atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)
    return Path(path)
