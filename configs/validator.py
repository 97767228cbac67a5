"""Cross-field rules for a :class:`~configs.config_parser.Config`.

:func:`validate` returns every problem it finds, each phrased with its fix; the loader raises them
together in one :class:`~configs.config_parser.ConfigError`. Nothing here uses ``assert``.
"""

from __future__ import annotations

import re
from pathlib import Path

from configs.config_parser import Config, did_you_mean


def resolve_weights_path(name: str) -> Path | None:
    """The checkpoint file MODEL_WEIGHTS names (``.pth`` may be omitted), or None if absent."""
    for candidate in (Path(name), Path(name + ".pth")):
        if candidate.is_file():
            return candidate
    return None


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
    from utils.dataset import augmentation_problems, num_folds

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
    if not 0 <= cfg.TILE_OVERLAP < cfg.INPUT_SIZE:
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
    if 2 <= cfg.UNET_DEPTH <= 8:
        factor = 2 ** (cfg.UNET_DEPTH - 1)
        if cfg.INPUT_SIZE < factor or cfg.INPUT_SIZE % factor:
            lower = max(factor, cfg.INPUT_SIZE // factor * factor)
            p.append(
                f"INPUT_SIZE={cfg.INPUT_SIZE} is not divisible by 2^(UNET_DEPTH-1)={factor}: "
                f"use e.g. {lower} or {lower + factor}, or a smaller UNET_DEPTH"
            )
    if cfg.MODEL in ("AuxNet-C", "AuxNet-D") and not cfg.MODEL_WEIGHTS:
        part = "classifier head" if cfg.MODEL == "AuxNet-C" else "decoder"
        p.append(
            f"MODEL={cfg.MODEL} trains only the {part} on a trained network: set MODEL_WEIGHTS to a "
            "checkpoint (e.g. the best.pth of an AuxNet-ED run)"
        )
    if cfg.MODEL_WEIGHTS and resolve_weights_path(cfg.MODEL_WEIGHTS) is None:
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
    import torch

    p: list[str] = []
    _in_range(p, "INIT_LR", cfg.INIT_LR, 0, lo_open=True)
    _in_range(p, "BASE_LR", cfg.BASE_LR, 0, lo_open=True)
    _in_range(p, "L2_DECAY", cfg.L2_DECAY, 0)
    _in_range(p, "WARMUP_EPOCHS", cfg.WARMUP_EPOCHS, 0)
    _in_range(p, "TRAIN_EPOCHS", cfg.TRAIN_EPOCHS, 1)
    if cfg.MIXED_PRECISION == "fp16" and not torch.cuda.is_available():
        p.append("MIXED_PRECISION=fp16 needs a CUDA GPU: use bf16 (CPU and recent GPUs) or none")
    return p


def _loss_rules(cfg: Config) -> list[str]:
    from model.loss import loss_problems, parse_loss

    p: list[str] = []
    if cfg.SDM_KERNEL_SIZE < 3 or cfg.SDM_KERNEL_SIZE % 2 == 0:
        p.append(f"SDM_KERNEL_SIZE={cfg.SDM_KERNEL_SIZE} must be odd and >= 3 (e.g. 3, 5, 7)")
    try:
        terms = parse_loss(cfg.LOSS)
    except ValueError as err:
        p.append(f"LOSS={cfg.LOSS!r}: {err}")
        terms = None
    if terms is not None:
        p += [f"LOSS={cfg.LOSS!r}: {msg}" for msg in loss_problems(terms, cfg.SEG_CLASSES, cfg.loss_weighting)]
        if cfg.STATIC_WEIGHTS is not None:
            if cfg.ADAPTIVE_WEIGHTS is True:
                p.append("STATIC_WEIGHTS is set but ADAPTIVE_WEIGHTS=true learns the weights: remove STATIC_WEIGHTS or set ADAPTIVE_WEIGHTS=false")
            elif len(cfg.STATIC_WEIGHTS) != len(terms):
                p.append(
                    f"STATIC_WEIGHTS has {len(cfg.STATIC_WEIGHTS)} weight(s) but LOSS={cfg.LOSS!r} has "
                    f"{len(terms)} term(s) {terms}: give one weight per term, in order"
                )
            if any(w < 0 for w in cfg.STATIC_WEIGHTS):
                p.append(f"STATIC_WEIGHTS={cfg.STATIC_WEIGHTS} has a negative weight: weights must be >= 0")
    _in_range(p, "CLAMP_DELTA", cfg.CLAMP_DELTA, 0, lo_open=True)
    _in_range(p, "SIGMOID_STEEPNESS", cfg.SIGMOID_STEEPNESS, 0, lo_open=True)
    _in_range(p, "WCE_W0", cfg.WCE_W0, 0)
    _in_range(p, "WCE_SIGMA", cfg.WCE_SIGMA, 0, lo_open=True)
    _in_range(p, "WBCE_W0", cfg.WBCE_W0, 0)
    _in_range(p, "WBCE_SIGMA", cfg.WBCE_SIGMA, 0, lo_open=True)
    _in_range(p, "FOCAL_GAMMA", cfg.FOCAL_GAMMA, 0)
    if cfg.FOCAL_ALPHA is not None:
        _in_range(p, "FOCAL_ALPHA", cfg.FOCAL_ALPHA, 0, 1)
    _in_range(p, "CLS_WEIGHT", cfg.CLS_WEIGHT, 0)
    if cfg.ADAPTIVE_WEIGHTS is True and cfg.CLS_WEIGHT != 1.0:
        p.append("CLS_WEIGHT is learned with ADAPTIVE_WEIGHTS=true: leave CLS_WEIGHT at 1.0")
    alpha = cfg.SCHEDULE_ALPHA
    if len(alpha) != 3 or not (0 <= alpha[0] <= alpha[2] <= 1 and alpha[1] >= 0):
        p.append(f"SCHEDULE_ALPHA={alpha} must be [start, step, max] with 0 <= start <= max <= 1 and step >= 0")
    return p


def _eval_rules(cfg: Config) -> list[str]:
    from model.metrics import DISTANCE_METRICS as DISTANCE_METRIC_NAMES, METRIC_NAMES

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
        elif metric == "TTR" and cfg.MODEL == "AuxNet-ED" and not cfg.MODEL_WEIGHTS:
            p.append(f"{where} scores the classifier head, which MODEL=AuxNet-ED does not train: use MODEL=AuxNet-EDC "
                     "or another metric")
        if metric in ("DSC", "IoU", "ASD", "AD", "HD95", "D95") and cfg.MODEL == "AuxNet-C":
            p.append(f"{where} scores segmentation, which MODEL=AuxNet-C does not train: use EVAL_METRIC=TTR")
    if cfg.PIXEL_SPACING is not None and (len(cfg.PIXEL_SPACING) != 2 or min(cfg.PIXEL_SPACING) <= 0):
        p.append(f"PIXEL_SPACING={cfg.PIXEL_SPACING} must be two positive numbers [row, column], or null")
    return p


def _runtime_rules(cfg: Config) -> list[str]:
    import torch

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
    if not str(cfg.MASTER_PORT).isdigit() or not 0 < int(cfg.MASTER_PORT) < 65536:
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
