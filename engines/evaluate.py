"""The ``eval`` command.

``python main.py eval MODEL_WEIGHTS=<run>/best`` evaluates a checkpoint as its run trained it:
network, data, split and fold come from the configuration stored in the checkpoint; the command
line may set the evaluation options (:data:`configs.config_parser.EVAL_KEYS`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from configs import Config, ConfigError
from configs.config_parser import EVAL_KEYS, PREDICT_KEYS, config_for_checkpoint, parse_overrides, precision_note
from configs.validator import validate
from engines.builders import build_data, build_loaders, build_metrics, memory_format_of, precision_of
from engines.checkpoint import CheckpointError, read_checkpoint, resolve_weights_path, saved_run, stored_split
from engines.forward import autocast_for, evaluate_model
from engines.launch import launch_plan, main_first
from engines.predict import build_predictor, prediction_network, resolve_gating
from engines.predictor import ArrayImage, Predictor
from engines.run_dir import RunDir, eval_outputs
from model.AuxNet import AuxNet
from utils.image_io import ImageSet
from utils.util import DistContext, RunError, atomic_write_json, atomic_write_text


def eval_config(cfg: Config, overrides: list[str], command: str = "eval") -> Config:
    """The configuration to evaluate MODEL_WEIGHTS with: its run's, plus the evaluation options given;
    precision and memory format are chosen for this machine (see :data:`configs.config_parser.DEVICE_KEYS`),
    with a note when the precision is not the one the run was trained with.

    Raises:
        ConfigError: no MODEL_WEIGHTS, an unreadable checkpoint, options it fixes set otherwise, or
            GATING=true typed for a network that cannot gate (see :func:`engines.predict.resolve_gating`).
    """
    if not cfg.MODEL_WEIGHTS:
        raise ConfigError([f"`main.py {command}` needs a checkpoint: set MODEL_WEIGHTS=path/to/best.pth"])
    path = resolve_weights_path(cfg.MODEL_WEIGHTS)
    try:
        state = read_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError([f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r}: {err}"]) from None
    given, _ = parse_overrides(overrides)
    saved, fold = saved_run(state)
    if saved is not None:  # else bare weights: the command line describes the network
        cfg = config_for_checkpoint(saved, cfg, given, fold=fold,
                                    allowed=PREDICT_KEYS if command == "predict" else EVAL_KEYS)
        problems = validate(cfg)
        if problems:
            raise ConfigError(problems, source=f"the configuration saved in {path}")
        note = precision_note(saved, cfg, launch_plan(cfg)[1][0])
        if note:
            print(note)
    return resolve_gating(cfg, state["model"], typed="GATING" in given)


def choose_run(cfg: Config) -> RunDir:
    """The folder of the checkpoint: ``eval`` writes beside it, wherever it was copied or moved
    (never into RESULTS_DIR/EXP_ID/RUN_ID, which may be another run's)."""
    return RunDir(resolve_weights_path(cfg.MODEL_WEIGHTS).resolve().parent)


def checkpoint_test_ids(ckpt: Path) -> tuple[Optional[list[str]], Optional[Path]]:
    """(the test image ids stored in the checkpoint, None) or, for a checkpoint made before the
    split travelled with it, (None, the ``tts.json`` of its run folder: beside it, or one up for a fold).

    Raises:
        RunError: neither is there (evaluating on a split made now could score its training images).
    """
    state = read_checkpoint(ckpt)
    split = state.get("split")
    if isinstance(split, dict) and split.get("test"):
        return list(split["test"]), None
    for folder in (ckpt.parent, ckpt.parent.parent):
        if RunDir(folder).split.is_file():
            return None, RunDir(folder).split
    if "config" not in state:  # a bare state_dict: the run it came from is unknown
        raise RunError(f"{ckpt} holds only network weights (no configuration and no train/test split), so its "
                       "test images are unknown: evaluate the best.pth or last.pth that AuxNet saved in the run "
                       "folder, or copy that run's tts.json next to it and give its options on the command line")
    raise RunError(f"{ckpt} holds no train/test split (it predates storing one) and no tts.json is beside it: "
                   "copy its run's tts.json next to it, or evaluate it in its run folder")


def evaluate(cfg: Config, ctx: DistContext, run: RunDir) -> None:
    """Evaluate MODEL_WEIGHTS on its own test split (stored in it): a per-tile CSV and a summary JSON beside it."""
    test_ids, split_file = checkpoint_test_ids(resolve_weights_path(cfg.MODEL_WEIGHTS))
    hashes = stored_split(resolve_weights_path(cfg.MODEL_WEIGHTS)).get("hashes")  # images changed since: refused
    splits = main_first(ctx, lambda: build_data(cfg, split_file, cfg.DEFAULT_FOLD, test_ids=test_ids,
                                                scene_sdm=False, hashes=hashes))  # nothing trains: no distance maps
    _, test_loader = build_loaders(cfg, splits, ctx)
    net, can_gate = prediction_network(cfg, ctx.device)
    dtype = precision_of(cfg, ctx.device)

    def autocast():
        return autocast_for(ctx.device, dtype)

    metrics = evaluate_model(net, test_loader, build_metrics(cfg, ctx.device)(), ctx.device, autocast,
                             memory_format_of(cfg, ctx.device)[0])
    summary = metrics.compute()
    rows = metrics.gather_per_image()
    ckpt = resolve_weights_path(cfg.MODEL_WEIGHTS)
    whole = whole_image_evaluation(cfg, ctx, splits, net, can_gate)
    if ctx.is_main:
        csv_path, json_path = eval_outputs(ckpt)
        atomic_write_text(csv_path, to_csv(rows))
        images_csv = csv_path.with_name(csv_path.stem + "_images.csv")
        atomic_write_text(images_csv, to_csv([{"mode": m, **row} for m, r in whole.items() for row in r["images"]]))
        atomic_write_json(json_path, {"checkpoint": str(ckpt), "fold": cfg.DEFAULT_FOLD, "tiles": len(rows),
                                      "test_images": list(splits.test_ids),
                                      "metrics": summary,
                                      "whole_image": {m: r["summary"] for m, r in whole.items()}})
        print(f"evaluated {ckpt} (fold {cfg.DEFAULT_FOLD}) on {len(rows)} test tiles -> {json_path}")
        print("tiles: " + " | ".join(f"{k} {v:.4f}" for k, v in summary.items() if "/" not in k))
        print(whole_image_line(whole))


def whole_image_evaluation(cfg: Config, ctx: DistContext, splits, net: AuxNet, can_gate: bool) -> dict[str, dict]:
    """The test split's whole images predicted by ``net`` (see :func:`engines.predict.prediction_network`)
    without gating and, where its run trained the head and GATING is on, with gating:
    ``{"ungated": {"summary", "images"}, "gated": ...}``."""
    report = {}
    for mode in ("ungated", "gated") if cfg.GATING and cfg.trains_classifier and can_gate else ("ungated",):
        predictor = build_predictor(cfg, net, can_gate, ctx.device, gating=mode == "gated")
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
