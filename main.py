"""AuxNet command line.

    python main.py [train] [--config FILE] [KEY=VALUE ...]     train (the default command)
    python main.py eval --config FILE MODEL_WEIGHTS=... [...]   evaluate a checkpoint on the test split

Spawns one process per GPU (or CPU_PROCESSES on the CPU) for DDP, or joins a ``torchrun`` launch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shutil
import statistics
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from configs import Config, ConfigError, load_config, save_config
from configs.config_parser import config_for_checkpoint, parse_overrides, read_yaml, resume_problems
from utils.util import (DistContext, RunError, atomic_write_json, atomic_write_text, cleanup_distributed,
                        init_distributed, next_run_id, seed_everything)

COMMANDS = ("train", "eval")


def parse_args(argv: list[str]) -> argparse.Namespace:
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: configs/config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override any config option")
    args = parser.parse_args(argv)
    args.command = command
    return args


def resolve_run_dir(cfg: Config, command: str) -> Path:
    """``RESULTS_DIR/<EXP_ID>/<RUN_ID>``; ids are filled in when empty. ``eval`` of a checkpoint that
    lives in a run folder reports into that run (and uses its split)."""
    if command == "eval" and not cfg.RUN_ID:
        from configs.validator import resolve_weights_path

        ckpt_dir = resolve_weights_path(cfg.MODEL_WEIGHTS).resolve().parent
        for candidate in (ckpt_dir, ckpt_dir.parent):
            if (candidate / "tts.json").is_file():
                return candidate
    exp_dir = Path(cfg.RESULTS_DIR) / (cfg.EXP_ID or "default")
    return exp_dir / (cfg.RUN_ID or next_run_id(exp_dir))


def launch_plan(cfg: Config) -> tuple[int, list[torch.device]]:
    """(world size, device of each local rank)."""
    gpus = cfg.GPUs if cfg.GPUs is not None else list(range(torch.cuda.device_count()))
    if gpus:
        return len(gpus), [torch.device("cuda", g) for g in gpus]
    return cfg.CPU_PROCESSES, [torch.device("cpu")] * cfg.CPU_PROCESSES


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "eval":
            cfg = eval_config(cfg, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ctx = join_torchrun(cfg) if "WORLD_SIZE" in os.environ and "RANK" in os.environ else None
    is_main = ctx is None or ctx.is_main
    # The main rank picks (and checks) the run folder; under torchrun it tells the other ranks.
    decision: list = [None, None, False]  # run folder, error, created now
    if is_main:
        try:
            run_dir = resolve_run_dir(cfg, args.command)
            if args.command == "train" and (run_dir / "config.yaml").is_file():
                problems = resume_problems(read_yaml(run_dir / "config.yaml"), cfg, run_dir)
                if problems:
                    raise ConfigError(problems, source=f"resuming {run_dir}")
            decision = [str(run_dir), None, not run_dir.exists()]
            run_dir.mkdir(parents=True, exist_ok=True)
        except ConfigError as err:
            decision = [None, str(err), False]
    if ctx is not None and ctx.distributed:
        dist.broadcast_object_list(decision, src=0)
    if decision[1] is not None:
        if is_main:
            print(f"error: {decision[1]}", file=sys.stderr)
        cleanup_distributed()
        return 2
    run_dir, new_run = Path(decision[0]), decision[2]
    cfg.EXP_ID, cfg.RUN_ID = run_dir.parent.name, run_dir.name
    try:
        launch(cfg, run_dir, args.command, ctx)
    except (RunError, mp.ProcessExitedException) as err:
        if isinstance(err, mp.ProcessExitedException) and err.exit_code != 2:
            raise
        if isinstance(err, RunError) and is_main:
            print(f"error: {err}", file=sys.stderr)
        if is_main and new_run and not any(run_dir.rglob("*.pth")):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing was trained: leave no empty run behind
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()  # the experiment folder too, if this run was all it held
        return 2
    return 0


def eval_config(cfg: Config, overrides: list[str]) -> Config:
    """``eval`` evaluates a checkpoint as its run trained it: network, data, split and fold come from the
    checkpoint; the command line may set the evaluation options (see ``EVAL_KEYS``)."""
    from configs.validator import resolve_weights_path, validate

    if not cfg.MODEL_WEIGHTS:
        raise ConfigError(["`main.py eval` evaluates a checkpoint: set MODEL_WEIGHTS=path/to/best.pth"])
    path = resolve_weights_path(cfg.MODEL_WEIGHTS)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ConfigError([f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r} cannot be read as a checkpoint "
                           f"({type(err).__name__}): point it at a .pth saved by AuxNet"]) from None
    saved = state.get("config") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        return cfg  # bare weights: the command line describes the network
    given, _ = parse_overrides(overrides)
    cfg = config_for_checkpoint(saved, cfg, given, fold=state.get("fold", saved.get("DEFAULT_FOLD", 0)))
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems, source=f"the configuration saved in {path}")
    return cfg


def join_torchrun(cfg: Config) -> DistContext:
    """Join the process group of a ``torchrun`` launch (before the run folder is chosen)."""
    world, devices = launch_plan(cfg)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = devices[local % len(devices)] if devices[0].type == "cuda" else torch.device("cpu")
    return init_distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local, device)


def launch(cfg: Config, run_dir: Path, command: str, ctx: DistContext | None) -> None:
    """Run ``command`` in this process, in ``torchrun``'s (``ctx``), or in one spawned process per device."""
    if command == "train" and (ctx is None or ctx.is_main):
        save_config(cfg, run_dir / "config.yaml")
    if ctx is not None:
        run(ctx, cfg, run_dir, command)
        return
    os.environ.setdefault("MASTER_ADDR", cfg.MASTER_ADDR)
    os.environ.setdefault("MASTER_PORT", str(cfg.MASTER_PORT))
    if cfg.NCCL_P2P_DISABLE:
        os.environ["NCCL_P2P_DISABLE"] = "1"
    world, devices = launch_plan(cfg)
    if world > 1:
        mp.spawn(spawned, args=(world, devices, cfg, run_dir, command), nprocs=world, join=True)
    else:
        run(init_distributed(0, 1, 0, devices[0]), cfg, run_dir, command)


def spawned(local_rank: int, world: int, devices, cfg: Config, run_dir: Path, command: str) -> None:
    try:
        run(init_distributed(local_rank, world, local_rank, devices[local_rank]), cfg, run_dir, command)
    except RunError as err:
        if local_rank == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run(ctx: DistContext, cfg: Config, run_dir: Path, command: str) -> None:
    try:
        if command == "train":
            train(cfg, ctx, run_dir)
        else:
            evaluate(cfg, ctx, run_dir)
    finally:
        cleanup_distributed()


def main_first(ctx: DistContext, make):
    """Run ``make()`` on the main rank first (it may write the split or the data cache), then on the
    others. A :class:`RunError` on the main rank is raised on every rank, so that all stop together."""
    if not ctx.distributed:
        return make()
    result, error = None, None
    if ctx.is_main:
        try:
            result = make()
        except RunError as err:
            error = err
    message = [str(error) if error is not None else None]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise error if ctx.is_main else RunError(message[0])
    return result if ctx.is_main else make()


def folds_of(cfg: Config) -> list[int]:
    from utils.dataset import num_folds

    return list(range(num_folds(cfg.TEST_SPLIT))) if cfg.CROSS_VALIDATION else [cfg.DEFAULT_FOLD]


def train(cfg: Config, ctx: DistContext, run_dir: Path) -> None:
    from engines.builders import build_data, build_trainer

    summaries = {}
    for fold in folds_of(cfg):
        fold_dir = run_dir / f"fold_{fold}" if cfg.CROSS_VALIDATION else run_dir
        seed_everything(cfg.SEED + fold)
        splits = main_first(ctx, lambda: build_data(cfg, run_dir / "tts.json", fold))
        trainer = build_trainer(cfg, ctx, fold_dir, splits, fold)
        if ctx.is_main:
            print(f"run {fold_dir}  fold {fold}: {len(splits.train)} train / {len(splits.test)} test tiles, "
                  f"device {ctx.device}, {ctx.world_size} process(es)")
        try:
            summaries[fold] = trainer.fit()
        finally:
            trainer.logger.close()
        if ctx.is_main:
            print(results_table(summaries[fold]))
    if ctx.is_main and cfg.CROSS_VALIDATION:
        finals = [s["final"] for s in summaries.values() if s["final"]]
        keys = [k for k in finals[0] if isinstance(finals[0][k], (int, float)) and k not in ("epoch", "lr", "time_s")]
        cv = {k: {"mean": statistics.fmean(f[k] for f in finals),
                  "std": statistics.pstdev(f[k] for f in finals)} for k in keys}
        atomic_write_json(run_dir / "cv_summary.json", {"folds": summaries, "final_mean_std": cv})
        print("cross-validation (final epoch, mean ± std over folds): " +
              ", ".join(f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in cv.items() if "/" not in k))


def results_table(summary: dict) -> str:
    """A plain-text table of the best and the final epoch."""
    rows = [("best", summary["best"]), ("final", summary["final"])]
    keys = [k for k in ("DSC", "IoU", "TTR", "ASD", "AD", "HD95", "D95", "CMA", "loss")
            if any(r and k in r for _, r in rows)]
    lines = ["| epoch | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, rec in rows:
        if rec:
            cells = [f"{rec[k]:.4f}" if isinstance(rec.get(k), float) else str(rec.get(k, "")) for k in keys]
            lines.append(f"| {label} ({rec['epoch']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(cfg: Config, ctx: DistContext, run_dir: Path) -> None:
    """Evaluate MODEL_WEIGHTS on its fold's test split: a per-image CSV and a summary JSON beside it."""
    from functools import partial

    from engines.builders import AMP_DTYPES, build_data, build_loaders, build_metrics, build_model
    from engines.SegTrainer import autocast_for, evaluate_model

    splits = main_first(ctx, lambda: build_data(cfg, run_dir / "tts.json", cfg.DEFAULT_FOLD))
    _, test_loader = build_loaders(cfg, splits, ctx)
    net = build_model(cfg).to(ctx.device)
    if cfg.CHANNELS_LAST:
        net = net.to(memory_format=torch.channels_last)
    autocast = partial(autocast_for, ctx.device, AMP_DTYPES[cfg.MIXED_PRECISION])
    metrics = evaluate_model(net, test_loader, build_metrics(cfg, ctx.device)(), ctx.device, autocast,
                             cfg.CHANNELS_LAST)
    summary = metrics.compute()
    rows = metrics.gather_per_image()
    if ctx.is_main:
        from configs.validator import resolve_weights_path

        ckpt = resolve_weights_path(cfg.MODEL_WEIGHTS)
        out = ckpt.parent if (run_dir / "tts.json").is_file() and ckpt.resolve().is_relative_to(run_dir.resolve()) \
            else run_dir  # beside the checkpoint when it belongs to this run (a fold's own folder under CV)
        atomic_write_text(out / f"eval_{ckpt.stem}.csv", to_csv(rows))
        atomic_write_json(out / f"eval_{ckpt.stem}.json",
                          {"checkpoint": str(ckpt), "fold": cfg.DEFAULT_FOLD, "tiles": len(rows), "metrics": summary})
        print(f"evaluated {ckpt} (fold {cfg.DEFAULT_FOLD}) on {len(rows)} test tiles -> {out / f'eval_{ckpt.stem}.json'}")
        print(" | ".join(f"{k} {v:.4f}" for k, v in summary.items() if "/" not in k))


def to_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
