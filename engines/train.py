"""The ``train`` command: a new run, or the resumption of one; every fold under CROSS_VALIDATION."""

from __future__ import annotations

import dataclasses
import statistics

import torch.distributed as dist

from configs import Config, ConfigError, save_config
from configs.config_parser import read_yaml, resume_problems
from engines.builders import build_data, build_network, build_trainer
from engines.evaluate import whole_image_evaluation, whole_image_line
from engines.forward import NonFiniteOutput, place
from engines.inference import load_for_inference
from engines.launch import launch, main_first
from engines.SegTrainer import TrainingDiverged
from utils.hardware import Runtime
from utils.run_paths import RunDir, run_dir_for
from utils.splits import num_folds
from utils.util import DistContext, atomic_write_json, seed_everything, writing

#: The metrics of the results table, in order.
TABLE_KEYS = ("ACC", "DSC", "IoU", "TTR", "ASD", "AD", "HD95", "D95", "CMA", "loss")


def run(cfg: Config, overrides: list[str]) -> int:
    """``main.py train``: train in the run folder :func:`choose_run` picks, holding its lock; returns the
    exit status. (``overrides`` are already in ``cfg``.)"""
    return launch(cfg, choose_run, train, exclusive=True)


def choose_run(cfg: Config) -> RunDir:
    """The run folder to train in; an existing run is resumed only with the options it was made with.

    Raises:
        ConfigError: naming every option that differs from the existing run's ``config.yaml``.
        CheckpointError: MODEL_WEIGHTS cannot be read, or does not fit the network.
    """
    if cfg.MODEL_WEIGHTS:
        build_network(cfg)  # an unreadable or ill-fitting checkpoint is refused before any file is written
    run = run_dir_for(cfg.RESULTS_DIR, cfg.EXP_ID, cfg.RUN_ID)
    if run.config.is_file():
        problems = resume_problems(read_yaml(run.config), cfg, run.root)
        if problems:
            raise ConfigError(problems, source=f"resuming {run.root}")
    return run


def train(cfg: Config, ctx: DistContext, runtime: Runtime, run: RunDir) -> None:
    """Train every fold of the configuration (one unless CROSS_VALIDATION) in ``run``.

    ``config.yaml`` is written only once a fold really starts training (its checkpoint, if any, and
    its data loaded), so a refused or failed resume leaves the run's configuration as it was."""
    folds = list(range(num_folds(cfg.TEST_SPLIT))) if cfg.CROSS_VALIDATION else [cfg.DEFAULT_FOLD]
    summaries = {fold: train_fold(cfg, ctx, runtime, run, fold) for fold in folds}
    if ctx.is_main and cfg.CROSS_VALIDATION:
        write_cv_summary(run, summaries)


def train_fold(cfg: Config, ctx: DistContext, runtime: Runtime, run: RunDir, fold: int) -> dict:
    """Train one fold; returns its summary (best and final epoch)."""
    fold_dir = run.fold(fold, cfg.CROSS_VALIDATION)
    seed_everything(cfg.SEED + fold)
    splits = main_first(ctx, lambda: build_data(cfg, run.split, fold))
    trainer = build_trainer(cfg, ctx, runtime, fold_dir, splits, fold)
    try:
        trainer.resume_if_possible()
    except BaseException:
        trainer.logger.close()
        raise
    if ctx.is_main and trainer.start_epoch < trainer.settings.epochs:
        save_config(cfg, run.config, resolved=dict(runtime.notes))
    if ctx.is_main:
        print(f"run {fold_dir.root}  fold {fold}: {len(splits.train)} train / {len(splits.test)} test tiles, "
              f"device {ctx.device}, {ctx.world_size} process(es), {runtime.describe()}"
              + (", torch.compile (COMPILE=true)" if cfg.COMPILE else ""))
    try:
        summary = trainer.fit()
    finally:
        trainer.logger.close()
    if ctx.distributed:
        dist.barrier()  # the main rank has written the last checkpoints
    weights = fold_dir.best if fold_dir.best.is_file() else fold_dir.last
    checkpoint = load_for_inference(dataclasses.replace(cfg, MODEL_WEIGHTS=str(weights)))
    net = place(checkpoint.net, runtime.device, runtime.channels_last)
    try:
        whole = whole_image_evaluation(cfg, ctx, runtime, splits, net, checkpoint.can_gate)
    except NonFiniteOutput as err:  # the run's own checkpoint, not a MODEL_WEIGHTS the user gave
        raise TrainingDiverged(f"the whole-image evaluation of {weights} after training: {err}. The checkpoints "
                               "are kept; lower BASE_LR or set GRAD_CLIP, and train again") from None
    summary["whole_image"] = {"checkpoint": weights.name, **{m: r["summary"] for m, r in whole.items()}}
    if ctx.is_main:
        write_summary(fold_dir, summary)
        print(results_table(summary))
        print(whole_image_line(whole))
    return summary


def write_summary(fold_dir: RunDir, summary: dict) -> None:
    """``summary.json`` of a trained fold (its only writer): the best and final epochs and the
    whole-image evaluation, written atomically.

    Raises:
        WriteError: the file cannot be written (a full disk…); no temporary file is left.
    """
    with writing(fold_dir.summary):
        atomic_write_json(fold_dir.summary, summary)


def write_cv_summary(run: RunDir, summaries: dict[int, dict]) -> None:
    """``cv_summary.json``: every fold's summary and the mean ± std of the final epochs."""
    finals = [s["final"] for s in summaries.values() if s["final"]]
    keys = [k for k in finals[0] if isinstance(finals[0][k], (int, float)) and k not in ("epoch", "lr", "time_s")]
    cv = {k: {"mean": statistics.fmean(f[k] for f in finals), "std": statistics.pstdev(f[k] for f in finals)}
          for k in keys}
    with writing(run.cv_summary):
        atomic_write_json(run.cv_summary, {"folds": summaries, "final_mean_std": cv})
    print("cross-validation (final epoch, mean ± std over folds): " +
          ", ".join(f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in cv.items() if "/" not in k))


def results_table(summary: dict) -> str:
    """A plain-text table of the best and the final epoch."""
    rows = [("best", summary["best"]), ("final", summary["final"])]
    keys = [k for k in TABLE_KEYS if any(r and k in r for _, r in rows)]
    lines = ["| epoch | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, rec in rows:
        if rec:
            cells = [f"{rec[k]:.4f}" if isinstance(rec.get(k), float) else str(rec.get(k, "")) for k in keys]
            lines.append(f"| {label} ({rec['epoch']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
