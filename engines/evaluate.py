"""The ``eval`` command.

``python main.py eval MODEL_WEIGHTS=<run>/best`` evaluates a checkpoint as its run trained it:
network, data, split and fold come from the configuration stored in the checkpoint; the command
line may set the evaluation options (:data:`configs.config_parser.EVAL_KEYS`).
"""

from __future__ import annotations

import csv
import io

import torch

from configs import Config, ConfigError
from configs.config_parser import config_for_checkpoint, parse_overrides
from configs.validator import validate
from engines.builders import build_data, build_loaders, build_metrics, build_model, precision_of
from engines.checkpoint import CheckpointError, resolve_weights_path, saved_run
from engines.forward import autocast_for, evaluate_model
from engines.launch import main_first
from engines.run_dir import RunDir, eval_outputs, run_dir_for
from utils.util import DistContext, atomic_write_json, atomic_write_text


def eval_config(cfg: Config, overrides: list[str]) -> Config:
    """The configuration to evaluate MODEL_WEIGHTS with: its run's, plus the evaluation options given.

    Raises:
        ConfigError: no MODEL_WEIGHTS, an unreadable checkpoint, or options it fixes set otherwise.
    """
    if not cfg.MODEL_WEIGHTS:
        raise ConfigError(["`main.py eval` evaluates a checkpoint: set MODEL_WEIGHTS=path/to/best.pth"])
    path = resolve_weights_path(cfg.MODEL_WEIGHTS)
    try:
        saved, fold = saved_run(path)
    except CheckpointError as err:
        raise ConfigError([f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r}: {err}"]) from None
    if saved is None:
        return cfg  # bare weights: the command line describes the network
    given, _ = parse_overrides(overrides)
    cfg = config_for_checkpoint(saved, cfg, given, fold=fold)
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems, source=f"the configuration saved in {path}")
    return cfg


def choose_run(cfg: Config) -> RunDir:
    """The run a checkpoint belongs to (its folder or the one above holds ``tts.json``), else the
    run RESULTS_DIR/EXP_ID/RUN_ID names."""
    if not cfg.RUN_ID:
        ckpt_dir = resolve_weights_path(cfg.MODEL_WEIGHTS).resolve().parent
        for candidate in (RunDir(ckpt_dir), RunDir(ckpt_dir.parent)):
            if candidate.split.is_file():
                return candidate
    return run_dir_for(cfg.RESULTS_DIR, cfg.EXP_ID, cfg.RUN_ID)


def evaluate(cfg: Config, ctx: DistContext, run: RunDir) -> None:
    """Evaluate MODEL_WEIGHTS on its fold's test split: a per-tile CSV and a summary JSON beside it."""
    splits = main_first(ctx, lambda: build_data(cfg, run.split, cfg.DEFAULT_FOLD))
    _, test_loader = build_loaders(cfg, splits, ctx)
    net = build_model(cfg).to(ctx.device)
    if cfg.CHANNELS_LAST:
        net = net.to(memory_format=torch.channels_last)
    dtype = precision_of(cfg)

    def autocast():
        return autocast_for(ctx.device, dtype)

    metrics = evaluate_model(net, test_loader, build_metrics(cfg, ctx.device)(), ctx.device, autocast,
                             cfg.CHANNELS_LAST)
    summary = metrics.compute()
    rows = metrics.gather_per_image()
    if ctx.is_main:
        ckpt = resolve_weights_path(cfg.MODEL_WEIGHTS)
        csv_path, json_path = eval_outputs(ckpt)
        atomic_write_text(csv_path, to_csv(rows))
        atomic_write_json(json_path, {"checkpoint": str(ckpt), "fold": cfg.DEFAULT_FOLD, "tiles": len(rows),
                                      "metrics": summary})
        print(f"evaluated {ckpt} (fold {cfg.DEFAULT_FOLD}) on {len(rows)} test tiles -> {json_path}")
        print(" | ".join(f"{k} {v:.4f}" for k, v in summary.items() if "/" not in k))


def to_csv(rows: list[dict]) -> str:
    """Rows of dicts as CSV text, columns in order of first appearance."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
