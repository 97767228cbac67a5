"""The pictures the trainer writes into the run folder: ``curves.png`` (every loss term and weight,
every metric, the learning rate) and ``overlays.png`` (a fixed set of test tiles: image, ground
truth, prediction and the signed-distance error map). See :mod:`utils.plots` for the drawing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from engines.forward import autocast_for, image_to
from model.AuxNet import AuxNet
from model.metrics import DISTANCE_METRICS, HIGHER_IS_BETTER, predict_labels
from utils.hardware import Runtime
from utils.plots import best_epoch, plot_curves, plot_overlays
from utils.run_paths import RunDir
from utils.sdf import signed_distance_map


def fixed_tiles(dataset, n: int) -> list[int]:
    """``n`` test tiles, the same every epoch: those with a class boundary first (they show the
    boundary errors), spread evenly over the set."""
    if n <= 0 or len(dataset) == 0:
        return []
    labels = np.asarray(getattr(dataset, "labels", np.zeros(len(dataset))))
    pool = np.flatnonzero(labels == 1) if (labels == 1).sum() >= n else np.arange(len(dataset))
    picks = np.linspace(0, len(pool) - 1, num=min(n, len(pool))).round().astype(int)
    return [int(pool[i]) for i in dict.fromkeys(picks)]


@torch.no_grad()
def predict_tiles(net: AuxNet, dataset, indices: list[int], device: torch.device, amp_dtype,
                  channels_last: bool, seg_threshold: float) -> dict[str, Any]:
    """Images, ground truths, predictions and SDM errors of ``dataset[indices]`` (numpy)."""
    items = [dataset[i] for i in indices]
    images = torch.stack([it["image"] for it in items])
    truths = torch.stack([it["mask"] for it in items])
    was_training = net.training
    net.eval()
    with autocast_for(device, amp_dtype):
        seg = net(image_to(images, device, channels_last)).seg.float().cpu()
    net.train(was_training)
    preds = predict_labels(seg, seg_threshold)
    k = max(seg.shape[1], 2)
    error = (signed_distance_map(preds, num_classes=k)[:, 1] - signed_distance_map(truths, num_classes=k)[:, 1])
    return {
        "images": images.permute(0, 2, 3, 1).numpy().squeeze(-1) if images.shape[1] == 1
        else images.permute(0, 2, 3, 1).numpy(),
        "truths": truths.numpy(), "preds": preds.numpy(), "errors": error.numpy(),
        "ids": [it["id"] for it in items],
    }


def make_plotter(run_root: Path, net: AuxNet, test_set, runtime: Runtime, seg_threshold: float, tiles: int,
                 log_images: Optional[Callable] = None, *, name: str = "", eval_metric: str = "DSC"):
    """``plot(history, epoch)``: write ``curves.png`` and ``overlays.png`` to ``run_root`` (and hand
    them to ``log_images(files, step)``, e.g. W&B); the overlays are predicted as ``runtime`` says.
    Both carry the run's ``name``; the curves mark the best epoch by ``eval_metric`` (the one best.pth holds)."""
    indices = fixed_tiles(test_set, tiles)
    run = RunDir(Path(run_root))

    def plot(history: list[dict[str, Any]], epoch: int) -> dict[str, Path]:
        best = best_epoch(history, eval_metric, HIGHER_IS_BETTER[eval_metric])
        files = {"curves": plot_curves(history, run.curves, distance_metrics=DISTANCE_METRICS, title=name,
                                       best=None if best is None else (eval_metric, best))}
        if indices:
            shown = predict_tiles(net, test_set, indices, runtime.device, runtime.amp_dtype, runtime.channels_last,
                                  seg_threshold)
            files["overlays"] = plot_overlays(shown["images"], shown["truths"], shown["preds"], shown["errors"],
                                              shown["ids"], run.overlays, title=f"{name}, epoch {epoch}" if name else "")
        if log_images is not None:
            log_images(files, epoch)
        return files

    return plot
