"""The ``eval`` command.

``python main.py eval MODEL_WEIGHTS=<run>/best`` evaluates a checkpoint as its run trained it:
network, data, split and fold come from the configuration stored in the checkpoint; the command
line may set the evaluation options (:data:`configs.config_parser.EVAL_KEYS`).

Every eval records the settings that decide its numbers (:func:`eval_settings`) in its summary
JSON, and never replaces the files of an eval made with other settings: an eval with the same
settings replaces its own files (running it again is idempotent), one with new settings writes the
next free names, ``eval_<ckpt>_2.json`` and so on (see :func:`write_eval`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from configs import Config
from configs.config_parser import EVAL_KEYS
from engines.builders import build_data, build_loaders, build_metrics
from engines.forward import autocast_for, evaluate_model, place
from engines.inference import Inference, load_for_inference
from engines.launch import launch, main_first
from engines.predict import build_predictor
from engines.sliding_window import ArrayImage, Predictor
from model.AuxNet import AuxNet
from utils.hardware import Runtime
from utils.image_io import ImageSet, file_digest
from utils.run_paths import EvalFiles, RunDir, eval_outputs
from utils.util import DistContext, RunError, atomic_write_json, atomic_write_text


def run(cfg: Config, overrides: list[str]) -> int:
    """``main.py eval``: read MODEL_WEIGHTS (once, :func:`engines.inference.load_for_inference`) and
    evaluate it on every rank; returns the exit status.

    Raises:
        ConfigError: see :func:`~engines.inference.load_for_inference`.
        CheckpointError: its weights do not fit the network its configuration describes.
    """
    checkpoint = load_for_inference(cfg, overrides, "eval")
    return launch(checkpoint.cfg, partial(choose_run, checkpoint), partial(evaluate, checkpoint))


def choose_run(checkpoint: Inference, cfg: Config) -> RunDir:
    """The folder of the checkpoint: ``eval`` writes beside it, wherever it was copied or moved
    (never into RESULTS_DIR/EXP_ID/RUN_ID, which may be another run's)."""
    return RunDir(checkpoint.path.resolve().parent)


def checkpoint_test_ids(checkpoint: Inference) -> tuple[Optional[list[str]], Optional[Path]]:
    """(the test image ids stored in the checkpoint, None) or, for a checkpoint made before the
    split travelled with it, (None, the ``tts.json`` of its run folder: beside it, or one up for a fold).

    Raises:
        RunError: neither is there (evaluating on a split made now could score its training images).
    """
    ckpt = checkpoint.path
    if checkpoint.split.get("test"):
        return list(checkpoint.split["test"]), None
    for folder in (ckpt.parent, ckpt.parent.parent):
        if RunDir(folder).split.is_file():
            return None, RunDir(folder).split
    if not checkpoint.has_config:  # a bare state_dict: the run it came from is unknown
        raise RunError(f"{ckpt} holds only network weights (no configuration and no train/test split), so its "
                       "test images are unknown: evaluate the best.pth or last.pth that AuxNet saved in the run "
                       "folder, or copy that run's tts.json next to it and give its options on the command line")
    raise RunError(f"{ckpt} holds no train/test split (it predates storing one) and no tts.json is beside it: "
                   "copy its run's tts.json next to it, or evaluate it in its run folder")


def evaluate(checkpoint: Inference, cfg: Config, ctx: DistContext, runtime: Runtime, run: RunDir) -> None:
    """Evaluate the checkpoint on its own test split (stored in it): a summary JSON (with the settings)
    and per-tile and per-image CSVs beside it (see :func:`write_eval` for their names)."""
    test_ids, split_file = checkpoint_test_ids(checkpoint)
    hashes = checkpoint.split.get("hashes")  # images changed since: refused
    splits = main_first(ctx, lambda: build_data(cfg, split_file, cfg.DEFAULT_FOLD, test_ids=test_ids,
                                                scene_sdm=False, hashes=hashes))  # nothing trains: no distance maps
    _, test_loader = build_loaders(cfg, splits, ctx)
    net = place(checkpoint.net, runtime.device, runtime.channels_last)

    def autocast():
        return autocast_for(runtime.device, runtime.amp_dtype)

    metrics = evaluate_model(net, test_loader, build_metrics(cfg, ctx.device)(), ctx.device, autocast,
                             runtime.channels_last)
    summary = metrics.compute()
    rows = metrics.gather_per_image()
    ckpt = checkpoint.path
    whole = whole_image_evaluation(cfg, ctx, runtime, splits, net, checkpoint.can_gate)
    if ctx.is_main:
        settings = eval_settings(cfg, ckpt, runtime)
        files = write_eval(ckpt, settings, {
            "checkpoint": str(ckpt), "fold": cfg.DEFAULT_FOLD, "tiles": len(rows),
            "test_images": list(splits.test_ids), "metrics": summary,
            "whole_image": {m: r["summary"] for m, r in whole.items()}},
            tiles_csv=to_csv(rows),
            images_csv=to_csv([{"mode": m, **row} for m, r in whole.items() for row in r["images"]]))
        print(f"evaluated {ckpt} (fold {cfg.DEFAULT_FOLD}) on {len(rows)} test tiles -> {files.summary}")
        print("tiles: " + " | ".join(f"{k} {v:.4f}" for k, v in summary.items() if "/" not in k))
        print(whole_image_line(whole))


# ----------------------------------------------------------------------------- the settings of an eval

#: EVAL_KEYS that decide where and how fast an eval runs, not its numbers. MIXED_PRECISION and
#: CHANNELS_LAST do change the numbers (a little): they are recorded as resolved on the device
#: instead. Every other evaluation option (any added later too) is recorded as given.
RUNTIME_EVAL_KEYS = frozenset({
    "MODEL_WEIGHTS", "RESULTS_DIR", "EXP_ID", "RUN_ID", "NUM_WORKERS", "BATCH_SIZE", "GPUs", "CPU_PROCESSES",
    "MASTER_ADDR", "MASTER_PORT", "NCCL_P2P_DISABLE", "LOG_WANDB", "LOG_LOCAL", "MIXED_PRECISION", "CHANNELS_LAST",
})


def eval_settings(cfg: Config, checkpoint: Path, runtime: Runtime) -> dict[str, Any]:
    """What decides an eval's numbers: the checkpoint's content (its BLAKE2b hash, :func:`utils.image_io.file_digest`; the network, data and
    split come from it), each evaluation option that can change a result (thresholds, metrics,
    GATING, TILE_OVERLAP, TTA, DATASET_DIR as an absolute path), and the device type, precision and
    memory format the eval really ran with.

    Args:
        checkpoint: the checkpoint file evaluated.
        runtime: the device, precision and memory format the eval ran with.

    Returns:
        A JSON-ready dict; two evals with equal settings give the same numbers.
    """
    options = {key: getattr(cfg, key) for key in sorted(EVAL_KEYS - RUNTIME_EVAL_KEYS)}
    if "DATASET_DIR" in options and options["DATASET_DIR"] != "synthetic":
        options["DATASET_DIR"] = str(Path(options["DATASET_DIR"]).resolve())
    settings = {"checkpoint_digest": file_digest(checkpoint), **options,
                "device": runtime.device.type, "precision": runtime.precision, "memory_format": runtime.memory_format}
    return json.loads(json.dumps(settings))  # as read back from the JSON (tuples become lists, ...)


def recorded_settings(summary: Path) -> Optional[dict[str, Any]]:
    """The settings recorded in an eval's summary JSON; None when it has none (made before evals
    recorded them) or cannot be read: such an eval counts as made with other settings, never replaced."""
    try:
        settings = json.loads(summary.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def choose_eval_files(ckpt: Path, settings: dict[str, Any]) -> tuple[EvalFiles, bool, list[EvalFiles]]:
    """Where an eval of ``ckpt`` with ``settings`` goes.

    Returns:
        ``(files, same, kept)``: the files of the earlier eval with the same settings (``same``:
        they are replaced) or else the first set of names of which no file exists; ``kept``: the
        earlier evals passed over (made with other settings, or unreadable), left as they are.
    """
    kept = []
    for n in itertools.count(1):
        files = eval_outputs(ckpt, n)
        if not any(path.exists() for path in files.all()):
            return files, False, kept
        if recorded_settings(files.summary) == settings:
            return files, True, kept
        kept.append(files)


def write_eval(ckpt: Path, settings: dict[str, Any], summary: dict[str, Any], tiles_csv: str,
               images_csv: str) -> EvalFiles:
    """Write an eval's files beside ``ckpt`` (see :func:`choose_eval_files`), the summary with its
    ``settings`` and the names of its tables, each file atomically, and say which earlier evals
    (made with other settings) were kept.

    New names are claimed by creating the summary exclusively (``O_EXCL``) before anything is
    written, so two evals finishing at once never take the same names.

    Returns:
        The files written.
    """
    while True:
        files, same, kept = choose_eval_files(ckpt, settings)
        if same or _claim(files.summary):
            break
    try:
        atomic_write_text(files.tiles, tiles_csv)
        atomic_write_text(files.images, images_csv)
        atomic_write_json(files.summary, {**summary, "settings": settings,
                                          "files": {"tiles": files.tiles.name, "images": files.images.name}})
    except BaseException:
        if not same:  # leave no half-written eval under the names claimed
            for path in files.all():
                path.unlink(missing_ok=True)
        raise
    if same:
        print(f"same settings as the earlier eval {files.summary.name}: replaced it")
    if kept:
        print("kept the earlier eval(s) of " + ckpt.name + " made with other settings: "
              + "; ".join(f"{k.summary.name} ({settings_difference(recorded_settings(k.summary), settings)})"
                          for k in kept) + f"; this one is {files.summary.name}")
    return files


def _claim(path: Path) -> bool:
    """Create ``path`` empty if no file is there (atomically); False if one is."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        return False
    return True


def settings_difference(earlier: Optional[dict[str, Any]], now: dict[str, Any]) -> str:
    """How ``earlier`` settings differ from ``now``, as ``KEY=earlier value`` items."""
    if earlier is None:
        return "no settings recorded: made before evals recorded them, or unreadable"
    keys = [k for k in dict.fromkeys([*now, *earlier]) if earlier.get(k) != now.get(k)]
    return ", ".join("another checkpoint (" + str(earlier.get(k))[:12] + "…)" if k == "checkpoint_digest"
                     else f"{k}={earlier.get(k)!r}" for k in keys)


def whole_image_evaluation(cfg: Config, ctx: DistContext, runtime: Runtime, splits, net: AuxNet,
                           can_gate: bool) -> dict[str, dict]:
    """The test split's whole images predicted by ``net`` (see :func:`engines.inference.load_for_inference`)
    without gating and, where its run trained the head and GATING is on, with gating:
    ``{"ungated": {"summary", "images"}, "gated": ...}``."""
    report = {}
    for mode in ("ungated", "gated") if cfg.GATING and cfg.trains_classifier and can_gate else ("ungated",):
        predictor = build_predictor(cfg, net, can_gate, runtime, gating=mode == "gated")
        summary, rows = evaluate_whole_images(predictor, splits.test.images, splits.test_ids,
                                              build_metrics(cfg, ctx.device)(), ctx, cfg.SEG_THRESHOLD)
        report[mode] = {"summary": summary, "images": rows}
    return report


def whole_image_line(report: dict[str, dict]) -> str:
    """One line per mode: the headline whole-image metrics."""
    keys = ("ACC", "DSC", "IoU", "ASD", "HD95", "gated_off_fraction", "seconds")
    return "\n".join(f"whole images, {mode}: " + " | ".join(f"{k} {r['summary'][k]:.4f}" for k in keys
                                                             if k in r["summary"]) for mode, r in report.items())


def evaluate_whole_images(predictor: Predictor, images: ImageSet, ids: list[str], metrics, ctx: DistContext,
                          seg_threshold: float) -> tuple[dict, list[dict]]:
    """Predict whole images with ``predictor`` and score them: pixel accuracy, Dice, IoU and the
    surface distances on the whole image (a tile's HD95 is capped by the tile), and the tiles decoded.
    Each rank takes its share of ``ids``; the summary is all-reduced (a collective call under DDP).

    Returns:
        (summary, per-image rows).
    """
    index = {image_id: i for i, image_id in enumerate(images.ids)}
    totals = torch.zeros(3, dtype=torch.float64)  # tiles, decoded, seconds
    extra = {}
    for image_id in ids[ctx.rank::ctx.world_size]:
        raw, mask = images.get(index[image_id])
        entry = images.entries[index[image_id]]
        probs, stats = predictor.predict_array(ArrayImage(raw, entry.offset, entry.scale))
        pred = predictor.labels(probs, seg_threshold)
        metrics.update_labels(torch.from_numpy(pred)[None].to(ctx.device),
                              torch.from_numpy(mask.astype(np.int64))[None].to(ctx.device), ids=[image_id])
        totals += torch.tensor([stats.tiles, stats.decoded, stats.seconds], dtype=torch.float64)
        extra[image_id] = stats.as_dict()
    summary = metrics.compute()
    rows = metrics.gather_per_image()
    if ctx.distributed:
        totals = totals.to(ctx.device)
        dist.all_reduce(totals)
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, extra)
        extra = {k: v for part in gathered for k, v in part.items()}
    tiles, decoded, seconds = totals.tolist()
    summary = {**summary, "tiles": int(tiles), "decoded": int(decoded),
               "gated_off_fraction": 1 - decoded / max(tiles, 1), "seconds": seconds}
    return summary, [{**row, **extra.get(row["id"], {})} for row in rows]


def to_csv(rows: list[dict]) -> str:
    """Rows of dicts as CSV text, columns in order of first appearance."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
