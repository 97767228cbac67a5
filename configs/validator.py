"""Cross-field rules for a :class:`~configs.config_parser.Config`.

:func:`validate` returns every problem it finds, each phrased with its fix; the loader raises them
together in one :class:`~configs.config_parser.ConfigError`. Nothing here uses ``assert``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from configs.schema import STAGES, Config
from engines.checkpoint import resolve_weights_path
from model.losses import loss_problems, parse_loss
from model.metrics import DISTANCE_METRICS as DISTANCE_METRIC_NAMES
from model.metrics import METRIC_NAMES
from utils.augment import augmentation_problems
from utils.sdf import check_kernel_size
from utils.splits import num_folds
from utils.util import did_you_mean


def _in_range(problems: list[str], key: str, value, lo=None, hi=None, lo_open=False, hi_open=False):
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open or lo is None else "["
        right = ")" if hi_open or hi is None else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        shown = f"{value:g}" if isinstance(value, float) else repr(value)
        problems.append(f"{key}={shown} is out of range: use a value in {span}")


def _data_rules(cfg: Config) -> list[str]:
    p: list[str] = []
    _in_range(p, "TEST_SPLIT", cfg.TEST_SPLIT, 0, 1, lo_open=True, hi_open=True)
    if 0 < cfg.TEST_SPLIT < 1:
        folds = num_folds(cfg.TEST_SPLIT)
        if folds < 2:
            p.append(f"TEST_SPLIT={cfg.TEST_SPLIT} gives K=round(1/TEST_SPLIT)={folds} folds: use TEST_SPLIT <= 0.5")
        elif not 0 <= cfg.DEFAULT_FOLD < folds:
            p.append(f"DEFAULT_FOLD={cfg.DEFAULT_FOLD} does not exist: TEST_SPLIT={cfg.TEST_SPLIT} gives folds 0..{folds - 1}")
    _in_range(p, "NUM_WORKERS", cfg.NUM_WORKERS, 0)
    _in_range(p, "SEED", cfg.SEED, 0, 2**32 - 1)
    if cfg.TILE_OVERLAP is not None and not 0 <= cfg.TILE_OVERLAP < cfg.INPUT_SIZE:
        p.append(f"TILE_OVERLAP={cfg.TILE_OVERLAP} must be in [0, INPUT_SIZE={cfg.INPUT_SIZE})")
    if cfg.DATASET_DIR == "synthetic":
        _in_range(p, "SYNTHETIC_IMAGES", cfg.SYNTHETIC_IMAGES, 2)
        if 0 < cfg.TEST_SPLIT <= 0.5 and cfg.SYNTHETIC_IMAGES < num_folds(cfg.TEST_SPLIT):
            p.append(f"SYNTHETIC_IMAGES={cfg.SYNTHETIC_IMAGES} is fewer than the {num_folds(cfg.TEST_SPLIT)} folds of "
                     f"TEST_SPLIT={cfg.TEST_SPLIT}: raise SYNTHETIC_IMAGES or TEST_SPLIT")
        if cfg.SYNTHETIC_SIZE < cfg.INPUT_SIZE:
            p.append(f"SYNTHETIC_SIZE={cfg.SYNTHETIC_SIZE} is smaller than INPUT_SIZE={cfg.INPUT_SIZE}: raise SYNTHETIC_SIZE")
        if cfg.SEG_CLASSES not in (1, 2, 3):
            p.append(f"SEG_CLASSES={cfg.SEG_CLASSES} does not fit the synthetic data: use 1 or 2 (binary) or 3 (background, lines, ellipses)")
    else:
        root = Path(cfg.DATASET_DIR)
        missing = [d for d in ("images", "masks") if not (root / d).is_dir()]
        if missing:
            p.append(
                f"DATASET_DIR={cfg.DATASET_DIR!r} lacks the folder(s) {', '.join(missing)}: point it at a folder "
                "holding images/ and masks/ (files matched by stem), or use DATASET_DIR=synthetic"
            )
    if isinstance(cfg.AUGMENTATIONS, list):
        p += [f"AUGMENTATIONS: {msg}" for msg in augmentation_problems(cfg.AUGMENTATIONS)]
    return p


def _model_rules(cfg: Config) -> list[str]:
    p: list[str] = []
    _in_range(p, "UNET_DEPTH", cfg.UNET_DEPTH, 2, 8)
    _in_range(p, "CONV_DEPTH", cfg.CONV_DEPTH, 1)
    _in_range(p, "INPUT_CHANNELS", cfg.INPUT_CHANNELS, 1)
    _in_range(p, "BATCH_SIZE", cfg.BATCH_SIZE, 1)
    _in_range(p, "INPUT_SIZE", cfg.INPUT_SIZE, 1)
    if 2 <= cfg.UNET_DEPTH <= 8 and cfg.INPUT_SIZE >= 1:
        factor = 2 ** (cfg.UNET_DEPTH - 1)
        if cfg.INPUT_SIZE < factor or cfg.INPUT_SIZE % factor:
            lower = max(factor, cfg.INPUT_SIZE // factor * factor)
            p.append(
                f"INPUT_SIZE={cfg.INPUT_SIZE} is not divisible by 2^(UNET_DEPTH-1)={factor}: "
                f"use e.g. {lower} or {lower + factor}, or a smaller UNET_DEPTH"
            )
    if cfg.stage.needs_weights and not cfg.MODEL_WEIGHTS:
        p.append(
            f"MODEL={cfg.MODEL} trains {cfg.stage.summary}: set MODEL_WEIGHTS to a "
            "checkpoint (e.g. the best.pth of an AuxNet-ED run)"
        )
    if cfg.MODEL_WEIGHTS and resolve_weights_path(cfg.MODEL_WEIGHTS) is None:
        folder = Path(cfg.MODEL_WEIGHTS)
        inside = [n for n in ("best", "last") if (folder / f"{n}.pth").is_file()] if folder.is_dir() else []
        if inside:
            p.append(f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r} is a run folder, not a checkpoint: use "
                     + " or ".join(repr(str(folder / n)) for n in inside))
        elif folder.is_dir():
            p.append(f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r} is a folder without best.pth or last.pth: point it at a .pth file")
        else:
            p.append(f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r}: no such file (nor {cfg.MODEL_WEIGHTS + '.pth'!r})")
    _in_range(p, "SEG_CLASSES", cfg.SEG_CLASSES, 1)
    _in_range(p, "SEG_DROPOUT", cfg.SEG_DROPOUT, 0, 1, hi_open=True)
    _in_range(p, "SEG_THRESHOLD", cfg.SEG_THRESHOLD, 0, 1, lo_open=True, hi_open=True)
    if cfg.CLS_CLASSES not in (1, 2):
        p.append(f"CLS_CLASSES={cfg.CLS_CLASSES}: the head predicts 'tile contains a boundary'; use 1 (sigmoid) or 2 (softmax)")
    _in_range(p, "CLS_DROPOUT", cfg.CLS_DROPOUT, 0, 1, hi_open=True)
    _in_range(p, "CLS_THRESHOLD", cfg.CLS_THRESHOLD, 0, 1, lo_open=True, hi_open=True)
    return p


def _optim_rules(cfg: Config) -> list[str]:
    p: list[str] = []
    _in_range(p, "INIT_LR", cfg.INIT_LR, 0, lo_open=True)
    _in_range(p, "BASE_LR", cfg.BASE_LR, 0, lo_open=True)
    _in_range(p, "L2_DECAY", cfg.L2_DECAY, 0)
    _in_range(p, "WARMUP_EPOCHS", cfg.WARMUP_EPOCHS, 0)
    _in_range(p, "TRAIN_EPOCHS", cfg.TRAIN_EPOCHS, 1)
    if cfg.GRAD_CLIP is not None:
        _in_range(p, "GRAD_CLIP", cfg.GRAD_CLIP, 0, lo_open=True)
    if cfg.EARLY_STOPPING is not None:
        _in_range(p, "EARLY_STOPPING", cfg.EARLY_STOPPING, 1)
    _in_range(p, "PLOT_EVERY", cfg.PLOT_EVERY, 0)
    _in_range(p, "PLOT_TILES", cfg.PLOT_TILES, 0, 64)
    if cfg.MIXED_PRECISION == "fp16" and not torch.cuda.is_available():
        p.append("MIXED_PRECISION=fp16 needs a CUDA GPU: use auto, bf16 (CPU and recent GPUs) or none")
    return p


def _loss_rules(cfg: Config) -> list[str]:
    p: list[str] = []
    try:
        check_kernel_size(cfg.SDM_KERNEL_SIZE, "SDM_KERNEL_SIZE")
    except ValueError as err:
        p.append(str(err))
    try:
        terms = parse_loss(cfg.LOSS)
    except ValueError as err:
        p.append(f"LOSS={cfg.LOSS!r}: {err}")
        terms = None
    if terms is not None:
        p += loss_problems(terms, cfg.SEG_CLASSES, cfg.loss_weighting, cfg.STATIC_WEIGHTS, cfg.CLS_WEIGHT)
        if cfg.SDM_SCOPE == "image" and "Boundary" not in terms:
            p.append(f"SDM_SCOPE=image measures the Boundary term's target distances over the whole image, but "
                     f"LOSS={cfg.LOSS!r} has no Boundary term: add Boundary to LOSS or set SDM_SCOPE=tile")
    _in_range(p, "CLAMP_DELTA", cfg.CLAMP_DELTA, 0, lo_open=True)
    _in_range(p, "SIGMOID_STEEPNESS", cfg.SIGMOID_STEEPNESS, 0, lo_open=True)
    _in_range(p, "WCE_W0", cfg.WCE_W0, 0)
    _in_range(p, "WCE_SIGMA", cfg.WCE_SIGMA, 0, lo_open=True)
    _in_range(p, "WBCE_W0", cfg.WBCE_W0, 0)
    _in_range(p, "WBCE_SIGMA", cfg.WBCE_SIGMA, 0, lo_open=True)
    _in_range(p, "CLDICE_ITERATIONS", cfg.CLDICE_ITERATIONS, 1)
    _in_range(p, "FOCAL_GAMMA", cfg.FOCAL_GAMMA, 0)
    if cfg.FOCAL_ALPHA is not None:
        _in_range(p, "FOCAL_ALPHA", cfg.FOCAL_ALPHA, 0, 1)
    _in_range(p, "CLS_WEIGHT", cfg.CLS_WEIGHT, 0)
    alpha = cfg.SCHEDULE_ALPHA
    if len(alpha) != 3 or not (0 <= alpha[0] <= alpha[2] <= 1 and alpha[1] >= 0):
        p.append(f"SCHEDULE_ALPHA={alpha} must be [start, step, max] with 0 <= start <= max <= 1 and step >= 0")
    return p


def _eval_rules(cfg: Config) -> list[str]:
    p: list[str] = []
    needs: dict[str, str] = {}
    if cfg.EVAL_METRIC == "CMA":
        for key, weight in cfg.CMA_COEFFICIENTS.items():
            if key not in METRIC_NAMES or key == "CMA":
                valid = [m for m in METRIC_NAMES if m != "CMA"]
                p.append(f"CMA_COEFFICIENTS: unknown metric {key!r}{did_you_mean(key, valid)}; valid: {', '.join(valid)}")
            elif weight < 0:
                p.append(f"CMA_COEFFICIENTS[{key}]={weight} must be >= 0")
            elif weight > 0:
                needs[key] = f"CMA_COEFFICIENTS[{key}]"
        if sum(max(w, 0) for w in cfg.CMA_COEFFICIENTS.values()) <= 0:
            p.append("CMA_COEFFICIENTS must have at least one positive weight")
    else:
        needs[cfg.EVAL_METRIC] = f"EVAL_METRIC={cfg.EVAL_METRIC}"
    for metric, where in needs.items():
        if metric in DISTANCE_METRIC_NAMES and not cfg.DISTANCE_METRICS:
            p.append(f"{where} needs the distance metrics: set DISTANCE_METRICS=true")
        if metric == "TTR" and not cfg.has_head:
            p.append(f"{where} scores the classifier head, which MODEL=UNet lacks: use an AuxNet model or another metric")
        elif metric == "TTR" and not cfg.trains_classifier and not cfg.MODEL_WEIGHTS:
            trainer = next(name for name, stage in STAGES.items() if "C" in stage.trains)
            p.append(f"{where} scores the classifier head, which MODEL={cfg.MODEL} does not train: use MODEL={trainer} "
                     "or another metric")
        if metric not in ("TTR", "CMA") and not cfg.stage.decodes:
            p.append(f"{where} scores segmentation, which MODEL={cfg.MODEL} does not train: use EVAL_METRIC=TTR")
    if cfg.PIXEL_SPACING is not None and (len(cfg.PIXEL_SPACING) != 2 or min(cfg.PIXEL_SPACING) <= 0):
        p.append(f"PIXEL_SPACING={cfg.PIXEL_SPACING} must be two positive numbers [row, column], or null")
    return p


def _runtime_rules(cfg: Config) -> list[str]:
    p: list[str] = []
    if cfg.GPUs:
        count = torch.cuda.device_count()
        if count == 0:
            p.append(f"GPUs={cfg.GPUs} but no CUDA GPU is visible: use GPUs=[] to train on the CPU")
        else:
            bad = [g for g in cfg.GPUs if not 0 <= g < count]
            if bad:
                p.append(f"GPUs={cfg.GPUs}: no GPU {bad}; visible GPUs are 0..{count - 1}")
        if len(set(cfg.GPUs)) != len(cfg.GPUs):
            p.append(f"GPUs={cfg.GPUs} lists a GPU twice")
    _in_range(p, "CPU_PROCESSES", cfg.CPU_PROCESSES, 1)
    if cfg.MASTER_PORT is not None and (not str(cfg.MASTER_PORT).isdigit() or not 0 < int(cfg.MASTER_PORT) < 65536):
        p.append(f"MASTER_PORT={cfg.MASTER_PORT!r} must be a port number in 1..65535")
    for key in ("EXP_ID", "RUN_ID"):
        value = getattr(cfg, key)
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            p.append(f"{key}={value!r} must be a plain folder name (letters, digits, '.', '_', '-')")
    return p


def validate(cfg: Config) -> list[str]:
    """Every cross-field problem in ``cfg``, each with its fix (empty list when valid)."""
    problems: list[str] = []
    for rules in (_data_rules, _model_rules, _optim_rules, _loss_rules, _eval_rules, _runtime_rules):
        problems += rules(cfg)
    return problems
