"""Pictures of a run: its training curves and prediction overlays, as PNG files.

Plain inputs only (a list of epoch records; numpy arrays; the names of the distance metrics, which
the caller takes from their owner, :data:`model.metrics.DISTANCE_METRICS`), so the module is usable
on its own.
matplotlib is imported lazily with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Sequence

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
    # timings (time_s, train_s: seconds) are not learning curves
    numeric = [k for k in keys if k != "epoch" and not k.endswith("_s")
               and any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in history)]
    groups = {
        "loss": [k for k in numeric if k == "loss" or k.startswith("loss/")],
        "loss weights": [k for k in numeric if k.startswith("weight/")],
        "scores": [k for k in numeric if "/" not in k and k not in ("loss", "lr") and k not in distance_metrics],
        "distances": [k for k in numeric if k in distance_metrics],
        "learning rate": [k for k in numeric if k == "lr"],
    }
    return {name: ks for name, ks in groups.items() if ks}


#: The SDM-error panel's colour scale in pixels: -ERROR_SCALE_PX (blue) ... 0 (white) ... +ERROR_SCALE_PX
#: (red), the same for every tile and epoch, larger errors clipped. (Scaled per tile, a 1-px shift of a
#: tile whose largest error is 1 px looked as saturated as a missed object.)
ERROR_SCALE_PX = 5.0
#: Axis labels with their units, by panel of :func:`curve_groups`.
CURVE_UNITS = {"loss": "loss (log scale when positive)", "loss weights": "weight", "scores": "score (0 to 1)",
               "distances": "distance (px, or PIXEL_SPACING units)", "learning rate": "learning rate"}


def best_epoch(history: Sequence[Mapping[str, Any]], metric: str, higher_is_better: bool) -> Optional[int]:
    """The epoch whose finite ``metric`` is best (the first of equals, as the trainer keeps it), or None."""
    best = None
    for record in history:
        value = record.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        if best is None or (value > best[1] if higher_is_better else value < best[1]):
            best = (record.get("epoch"), value)
    return None if best is None else best[0]


def curves_figure(history: Sequence[Mapping[str, Any]], *, distance_metrics: Collection[str], title: str = "",
                  best: Optional[tuple[str, int]] = None):
    """The training curves as a matplotlib figure: one panel per group of :func:`curve_groups`, every
    key against the epoch, each axis labelled with its unit, ``title`` (the run's name) above, and a
    dashed line at the best epoch in every panel.

    Args:
        history: one record per epoch, each with ``epoch`` and the logged values (None = not finite).
        distance_metrics: the metric names drawn in the distances panel.
        title: the run's name, shown above the panels.
        best: ``(metric, epoch)`` of the best epoch (the one best.pth holds), or None.
    """
    plt = _pyplot()
    groups = curve_groups(history, distance_metrics=distance_metrics)
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4.2 * max(len(groups), 1), 3.8), dpi=72,
                             squeeze=False)
    epochs = [r.get("epoch", i) for i, r in enumerate(history)]
    for ax, (panel, keys) in zip(axes[0], groups.items()):
        for key in keys:
            ys = [r.get(key) for r in history]
            ys = [float(y) if isinstance(y, (int, float)) and math.isfinite(y) else math.nan for y in ys]
            ax.plot(epochs, ys, marker="o", markersize=3, label=key)
        if best is not None:
            ax.axvline(best[1], color="0.3", linestyle="--", linewidth=1, label=f"best {best[0]} (epoch {best[1]})")
        ax.set_title(panel, fontsize=11)
        ax.set_xlabel("epoch", fontsize=10)
        ax.set_ylabel(CURVE_UNITS.get(panel, panel), fontsize=10)
        if panel == "loss" and all(r.get("loss", 0) and r.get("loss", 0) > 0 for r in history):
            ax.set_yscale("log")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.82 if title else 0.88, wspace=0.3)
    return fig


def plot_curves(history: Sequence[Mapping[str, Any]], path: Path, *, distance_metrics: Collection[str],
                title: str = "", best: Optional[tuple[str, int]] = None) -> Path:
    """:func:`curves_figure` written to ``path`` (PNG), atomically."""
    return _save(curves_figure(history, distance_metrics=distance_metrics, title=title, best=best), path)


def overlays_figure(images: np.ndarray, truths: np.ndarray, preds: np.ndarray, errors: np.ndarray,
                    ids: Sequence[str], title: str = ""):
    """One row per tile: the image, the ground truth over it, the prediction over it, and the
    signed-distance error map (SDM of the prediction minus SDM of the ground truth, first foreground
    class, in pixels; red: the prediction's boundary lies outside the true one, blue: inside; white:
    exact) on the fixed scale of :data:`ERROR_SCALE_PX`, with its colour bar.

    The panels are composed as one RGB mosaic and drawn in a single axes (cheap enough to draw each epoch).

    Shape:
        images: (N, H, W) or (N, H, W, C) in [0, 1]; truths, preds: (N, H, W) class indices;
        errors: (N, H, W).
    """
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    rows = [np.concatenate([_gray(images[i]), _labels_over(images[i], truths[i]), _labels_over(images[i], preds[i]),
                            _diverging(errors[i])], axis=1) for i in range(len(ids))]
    if rows:  # small tiles are enlarged (nearest) to at least 128 px, so the labels fit their columns
        zoom = max(1, math.ceil(128 / rows[0].shape[0]))
        rows = [row.repeat(zoom, axis=0).repeat(zoom, axis=1) for row in rows]
    gap = np.ones((4, rows[0].shape[1], 3)) if rows else np.ones((1, 1, 3))
    mosaic = np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0) if rows else gap
    h, w = mosaic.shape[:2]
    head, foot = 48 if title else 28, 64  # pixels above (titles) and below (colour bar) the mosaic
    width = max(w, 512)
    fig = plt.figure(figsize=(width / 64, (h + head + foot) / 64), dpi=64)
    total = h + head + foot
    ax = fig.add_axes((0, foot / total, w / width, h / total))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    tile_w = w / 4
    for k, panel in enumerate(("image", "ground truth", "prediction", "SDM error (px)")):
        fig.text((k + 0.5) * tile_w / width, 1 - (head - 12) / total, panel, ha="center", va="center", fontsize=13)
    if title:
        fig.text(0.5, 1 - 12 / total, title, ha="center", va="center", fontsize=12, weight="bold")
    row_h = h / max(len(ids), 1)
    for i, tile in enumerate(ids):
        ax.text(3, i * row_h + 3, tile, color="white", fontsize=11, va="top",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": "none"})
    bar = fig.add_axes((2.3 * tile_w / width, 34 / total, 1.6 * tile_w / width, 12 / total))  # label fits the figure
    cmap = LinearSegmentedColormap.from_list("sdm_error", [(0, 0, 1), (1, 1, 1), (1, 0, 0)])
    colours = fig.colorbar(ScalarMappable(Normalize(-ERROR_SCALE_PX, ERROR_SCALE_PX), cmap), cax=bar,
                           orientation="horizontal", extend="both")
    colours.set_label("SDM error, px (beyond ±%g clipped)" % ERROR_SCALE_PX, fontsize=10)
    colours.ax.tick_params(labelsize=9)
    return fig


def plot_overlays(images: np.ndarray, truths: np.ndarray, preds: np.ndarray, errors: np.ndarray,
                  ids: Sequence[str], path: Path, title: str = "") -> Path:
    """:func:`overlays_figure` written to ``path`` (PNG), atomically."""
    return _save(overlays_figure(images, truths, preds, errors, ids, title), path)


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


def _diverging(error: np.ndarray, scale: float = ERROR_SCALE_PX) -> np.ndarray:
    """Blue (-``scale`` and below) - white (0) - red (+``scale`` and above): the same colours for the
    same error in every tile (the colour bar of :func:`overlays_figure`)."""
    error = np.asarray(error, dtype=np.float32)
    t = error / scale
    pos, neg = np.clip(t, 0, 1)[..., None], np.clip(-t, 0, 1)[..., None]
    white = np.ones(error.shape + (3,), dtype=np.float32)
    return white - pos * np.array([0, 1, 1], dtype=np.float32) - neg * np.array([1, 1, 0], dtype=np.float32)


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)
    return Path(path)
