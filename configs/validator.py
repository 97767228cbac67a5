"""Cross-field rules for a :class:`~configs.config_parser.Config`.

:func:`validate` returns every problem it finds, each phrased with its fix; the loader raises them
together in one :class:`~configs.config_parser.ConfigError`. Nothing here uses ``assert``.

Each mistake is reported once: the range of every numeric option is checked first
(:data:`RANGES`), and a rule that combines options skips when one of them is already reported
(``SEG_CLASSES=0`` is out of range; it is not also "unfit for the synthetic data" and "unfit for
the loss").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

from configs.schema import STAGES, Config, setting
from model.losses import loss_problems, parse_loss
from model.metrics import DISTANCE_METRICS as DISTANCE_METRIC_NAMES
from model.metrics import METRIC_NAMES
from utils.augment import augmentation_problems
from utils.sdf import check_kernel_size
from utils.run_paths import RunDir, resolve_weights_path
from utils.splits import num_folds
from utils.choices import did_you_mean


class Problems(list):
    """The problems found so far, and the options they concern (:meth:`ok` asks whether a rule's
    inputs are still unreported)."""

    def __init__(self, invalid: Iterable[str] = ()):
        super().__init__()
        self.invalid = set(invalid)

    def add(self, message: str, *keys: str) -> None:
        """Report ``message``, a problem with the options ``keys``."""
        self.append(message)
        self.invalid.update(keys)

    def ok(self, *keys: str) -> bool:
        """True when none of ``keys`` has a problem reported yet."""
        return self.invalid.isdisjoint(keys)


#: The valid range of each numeric option: (low, high, low excluded, high excluded); None = unbounded.
#: An option set to null (GRAD_CLIP, FOCAL_ALPHA, ...) is not checked.
RANGES: dict[str, tuple] = {
    "TEST_SPLIT": (0, 1, True, True), "NUM_WORKERS": (0, None), "SEED": (0, 2**32 - 1),
    "UNET_DEPTH": (2, 8), "CONV_DEPTH": (1, None), "INPUT_CHANNELS": (1, None), "BATCH_SIZE": (1, None),
    "INPUT_SIZE": (1, None), "SEG_CLASSES": (1, None), "SEG_DROPOUT": (0, 1, False, True),
    "SEG_THRESHOLD": (0, 1, True, True), "CLS_DROPOUT": (0, 1, False, True), "CLS_THRESHOLD": (0, 1, True, True),
    "GATE_THRESHOLD": (0, 1, True, True),
    "INIT_LR": (0, None, True), "BASE_LR": (0, None, True), "L2_DECAY": (0, None), "WARMUP_EPOCHS": (0, None),
    "TRAIN_EPOCHS": (1, None), "GRAD_CLIP": (0, None, True), "EARLY_STOPPING": (1, None), "PLOT_EVERY": (0, None),
    "PLOT_TILES": (0, 64), "CLAMP_DELTA": (0, None, True), "SIGMOID_STEEPNESS": (0, None, True),
    "WCE_W0": (0, None), "WCE_SIGMA": (0, None, True), "WBCE_W0": (0, None), "WBCE_SIGMA": (0, None, True),
    "CLDICE_ITERATIONS": (1, None), "FOCAL_GAMMA": (0, None), "FOCAL_ALPHA": (0, 1), "CLS_WEIGHT": (0, None),
    "CPU_PROCESSES": (1, None), "POLYGON_TOLERANCE": (0, None), "PREDICT_BATCH": (1, None),
}


def _in_range(p: Problems, key: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open or lo is None else "["
        right = ")" if hi_open or hi is None else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        shown = f"{value:g}" if isinstance(value, float) else repr(value)
        p.add(f"{key}={shown} is out of range: use a value in {span}", key)


def _range_rules(cfg: Config, p: Problems) -> None:
    for key, bounds in RANGES.items():
        value = getattr(cfg, key)
        if value is not None and p.ok(key):
            _in_range(p, key, value, *bounds)


def _data_rules(cfg: Config, p: Problems) -> None:
    if p.ok("TEST_SPLIT"):
        folds = num_folds(cfg.TEST_SPLIT)
        if folds < 2:
            p.add(f"TEST_SPLIT={cfg.TEST_SPLIT} gives K=round(1/TEST_SPLIT)={folds} folds: use TEST_SPLIT <= 0.5",
                  "TEST_SPLIT")
        elif p.ok("DEFAULT_FOLD") and not 0 <= cfg.DEFAULT_FOLD < folds:
            p.add(f"DEFAULT_FOLD={cfg.DEFAULT_FOLD} does not exist: TEST_SPLIT={cfg.TEST_SPLIT} gives folds "
                  f"0..{folds - 1}", "DEFAULT_FOLD")
    _test_ids_rules(cfg, p)
    overlap = cfg.TILE_OVERLAP
    if overlap is not None and p.ok("TILE_OVERLAP"):
        if p.ok("INPUT_SIZE") and not 0 <= overlap < cfg.INPUT_SIZE:
            p.add(f"TILE_OVERLAP={overlap} must be in [0, INPUT_SIZE={cfg.INPUT_SIZE})", "TILE_OVERLAP")
        elif overlap < 0:
            p.add(f"TILE_OVERLAP={overlap} must be >= 0", "TILE_OVERLAP")
    if cfg.DATASET_DIR == "synthetic":
        if p.ok("SYNTHETIC_IMAGES"):
            _in_range(p, "SYNTHETIC_IMAGES", cfg.SYNTHETIC_IMAGES, 2)
        if p.ok("SYNTHETIC_IMAGES", "TEST_SPLIT") and cfg.SYNTHETIC_IMAGES < num_folds(cfg.TEST_SPLIT):
            p.add(f"SYNTHETIC_IMAGES={cfg.SYNTHETIC_IMAGES} is fewer than the {num_folds(cfg.TEST_SPLIT)} folds of "
                  f"TEST_SPLIT={cfg.TEST_SPLIT}: raise SYNTHETIC_IMAGES or TEST_SPLIT", "SYNTHETIC_IMAGES")
        if p.ok("SYNTHETIC_SIZE", "INPUT_SIZE") and cfg.SYNTHETIC_SIZE < cfg.INPUT_SIZE:
            p.add(f"SYNTHETIC_SIZE={cfg.SYNTHETIC_SIZE} is smaller than INPUT_SIZE={cfg.INPUT_SIZE}: raise "
                  "SYNTHETIC_SIZE", "SYNTHETIC_SIZE")
        if p.ok("SEG_CLASSES") and cfg.SEG_CLASSES not in (1, 2, 3):
            p.add(f"SEG_CLASSES={cfg.SEG_CLASSES} does not fit the synthetic data: use 1 or 2 (binary) or 3 "
                  "(background, lines, ellipses)", "SEG_CLASSES")
    else:
        root = Path(cfg.DATASET_DIR)
        missing = [d for d in ("images", "masks") if not (root / d).is_dir()]
        if missing:
            p.add(
                f"DATASET_DIR={cfg.DATASET_DIR!r} lacks the folder(s) {', '.join(missing)}: point it at a folder "
                "holding images/ and masks/ (files matched by stem), or use DATASET_DIR=synthetic", "DATASET_DIR"
            )
    if isinstance(cfg.AUGMENTATIONS, list):
        for msg in augmentation_problems(cfg.AUGMENTATIONS):
            p.add(f"AUGMENTATIONS: {msg}", "AUGMENTATIONS")


def _test_ids_rules(cfg: Config, p: Problems) -> None:
    """TEST_IDS fixes one split: not empty, no stem twice, no folds to draw or choose. (Whether each stem
    is an image of DATASET_DIR is checked when the data is loaded: :func:`utils.splits.check_test_ids`.)"""
    ids = cfg.TEST_IDS
    if ids is None or not p.ok("TEST_IDS"):
        return
    if not ids:
        p.add("TEST_IDS=[] holds no image: list the stems of the test images, or use TEST_IDS=null", "TEST_IDS")
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        p.add(f"TEST_IDS lists {', '.join(twice)} more than once: list each test image once", "TEST_IDS")
    if cfg.CROSS_VALIDATION:
        p.add("TEST_IDS fixes one test split, but CROSS_VALIDATION=true draws K folds: use CROSS_VALIDATION=false, "
              "or TEST_IDS=null", "TEST_IDS")
    elif p.ok("DEFAULT_FOLD") and cfg.DEFAULT_FOLD != 0:
        p.add(f"DEFAULT_FOLD={cfg.DEFAULT_FOLD} chooses a drawn fold, but TEST_IDS fixes the one split: use "
              "DEFAULT_FOLD=0, or TEST_IDS=null", "DEFAULT_FOLD")


def _model_rules(cfg: Config, p: Problems) -> None:
    if p.ok("UNET_DEPTH", "INPUT_SIZE"):
        factor = 2 ** (cfg.UNET_DEPTH - 1)
        if cfg.INPUT_SIZE < factor or cfg.INPUT_SIZE % factor:
            lower = max(factor, cfg.INPUT_SIZE // factor * factor)
            p.add(
                f"INPUT_SIZE={cfg.INPUT_SIZE} is not divisible by 2^(UNET_DEPTH-1)={factor}: "
                f"use e.g. {lower} or {lower + factor}, or a smaller UNET_DEPTH", "INPUT_SIZE"
            )
    if p.ok("MODEL", "MODEL_WEIGHTS") and cfg.stage.needs_weights and not cfg.MODEL_WEIGHTS:
        p.add(
            f"MODEL={cfg.MODEL} trains {cfg.stage.summary}: set MODEL_WEIGHTS to a "
            "checkpoint (e.g. the best.pth of an AuxNet-ED run)", "MODEL_WEIGHTS"
        )
    if p.ok("MODEL_WEIGHTS") and cfg.MODEL_WEIGHTS and resolve_weights_path(cfg.MODEL_WEIGHTS) is None:
        folder = Path(cfg.MODEL_WEIGHTS)
        inside = RunDir(folder).checkpoints() if folder.is_dir() else []
        if inside:
            p.add(f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r} is a run folder, not a checkpoint: use "
                  + " or ".join(setting("MODEL_WEIGHTS", str(c)) for c in inside), "MODEL_WEIGHTS")
        elif folder.is_dir():
            p.add(f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r} is a folder without best.pth or last.pth: point it at a "
                  ".pth file", "MODEL_WEIGHTS")
        else:
            p.add(f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r}: no such file (nor {cfg.MODEL_WEIGHTS + '.pth'!r})",
                  "MODEL_WEIGHTS")
    if p.ok("CLS_CLASSES") and cfg.CLS_CLASSES not in (1, 2):
        p.add(f"CLS_CLASSES={cfg.CLS_CLASSES}: the head predicts 'tile contains a boundary'; use 1 (sigmoid) or "
              "2 (softmax)", "CLS_CLASSES")


def runs_on_cpu(cfg: Config) -> bool:
    """Whether ``cfg`` runs on the CPU: GPUs=[] asks for it, or no CUDA GPU is visible."""
    return cfg.GPUs == [] or not torch.cuda.is_available()


def _optim_rules(cfg: Config, p: Problems) -> None:
    if p.ok("MIXED_PRECISION") and cfg.MIXED_PRECISION == "fp16" and runs_on_cpu(cfg):
        where = "GPUs=[] runs on the CPU" if cfg.GPUs == [] else "no CUDA GPU is visible"
        p.add(f"MIXED_PRECISION=fp16 needs a CUDA GPU but {where}: use MIXED_PRECISION=auto, bf16 (CPU and "
              "recent GPUs) or none", "MIXED_PRECISION")


def _loss_rules(cfg: Config, p: Problems) -> None:
    try:
        check_kernel_size(cfg.SDM_KERNEL_SIZE, "SDM_KERNEL_SIZE")
    except ValueError as err:
        p.add(str(err), "SDM_KERNEL_SIZE")
    try:
        terms = parse_loss(cfg.LOSS)
    except ValueError as err:
        p.add(f"LOSS={cfg.LOSS!r}: {err}", "LOSS")
        terms = None
    if terms is not None and p.ok("SEG_CLASSES"):
        # An option already reported joins these rules as its default, so it is not blamed twice.
        weights = cfg.STATIC_WEIGHTS if p.ok("STATIC_WEIGHTS") else None
        for msg in loss_problems(terms, cfg.SEG_CLASSES, cfg.loss_weighting, weights):
            p.add(msg, "LOSS")
    if terms is not None and cfg.SDM_SCOPE == "image" and "Boundary" not in terms:
        p.add(f"SDM_SCOPE=image measures the Boundary term's target distances over the whole image, but "
              f"LOSS={cfg.LOSS!r} has no Boundary term: add Boundary to LOSS or set SDM_SCOPE=tile", "SDM_SCOPE")
    alpha = cfg.SCHEDULE_ALPHA
    if p.ok("SCHEDULE_ALPHA") and (len(alpha) != 3 or not (0 <= alpha[0] <= alpha[2] <= 1 and alpha[1] >= 0)):
        p.add(f"SCHEDULE_ALPHA={alpha} must be [start, step, max] with 0 <= start <= max <= 1 and step >= 0",
              "SCHEDULE_ALPHA")


def _eval_rules(cfg: Config, p: Problems) -> None:
    needs: dict[str, str] = {}
    if cfg.EVAL_METRIC == "CMA" and p.ok("CMA_COEFFICIENTS"):
        for key, weight in cfg.CMA_COEFFICIENTS.items():
            if key not in METRIC_NAMES or key == "CMA":
                valid = [m for m in METRIC_NAMES if m != "CMA"]
                p.add(f"CMA_COEFFICIENTS: unknown metric {key!r}{did_you_mean(key, valid)}; valid: {', '.join(valid)}",
                      "CMA_COEFFICIENTS")
            elif weight < 0:
                p.add(f"CMA_COEFFICIENTS[{key}]={weight} must be >= 0", "CMA_COEFFICIENTS")
            elif weight > 0:
                needs[key] = f"CMA_COEFFICIENTS[{key}]"
        if sum(max(w, 0) for w in cfg.CMA_COEFFICIENTS.values()) <= 0:
            p.add("CMA_COEFFICIENTS must have at least one positive weight", "CMA_COEFFICIENTS")
    elif cfg.EVAL_METRIC != "CMA":
        needs[cfg.EVAL_METRIC] = f"EVAL_METRIC={cfg.EVAL_METRIC}"
    for metric, where in needs.items():
        if metric in DISTANCE_METRIC_NAMES and not cfg.DISTANCE_METRICS:
            p.add(f"{where} needs the distance metrics: set DISTANCE_METRICS=true", "EVAL_METRIC")
        if metric == "TTR" and not cfg.has_head:
            p.add(f"{where} scores the classifier head, which MODEL=UNet lacks: use an AuxNet model or another metric",
                  "EVAL_METRIC")
        elif metric == "TTR" and not cfg.trains_classifier and not cfg.MODEL_WEIGHTS:
            trainer = next(name for name, stage in STAGES.items() if "C" in stage.trains)
            p.add(f"{where} scores the classifier head, which MODEL={cfg.MODEL} does not train: use MODEL={trainer} "
                  "or another metric", "EVAL_METRIC")
        if metric not in ("TTR", "CMA") and not cfg.stage.decodes:
            p.add(f"{where} scores segmentation, which MODEL={cfg.MODEL} does not train: use EVAL_METRIC=TTR",
                  "EVAL_METRIC")
    spacing = cfg.PIXEL_SPACING
    if p.ok("PIXEL_SPACING") and spacing is not None and (len(spacing) != 2 or min(spacing) <= 0):
        p.add(f"PIXEL_SPACING={spacing} must be two positive numbers [row, column], or null", "PIXEL_SPACING")


def _runtime_rules(cfg: Config, p: Problems) -> None:
    if cfg.GPUs and p.ok("GPUs"):
        count = torch.cuda.device_count()
        if count == 0:
            p.add(f"GPUs={cfg.GPUs} but no CUDA GPU is visible: use GPUs=[] to train on the CPU", "GPUs")
        else:
            bad = [g for g in cfg.GPUs if not 0 <= g < count]
            if bad:
                p.add(f"GPUs={cfg.GPUs}: no GPU {bad}; visible GPUs are 0..{count - 1}", "GPUs")
        if len(set(cfg.GPUs)) != len(cfg.GPUs):
            p.add(f"GPUs={cfg.GPUs} lists a GPU twice", "GPUs")
    if cfg.MASTER_PORT is not None and (not str(cfg.MASTER_PORT).isdigit() or not 0 < int(cfg.MASTER_PORT) < 65536):
        p.add(f"MASTER_PORT={cfg.MASTER_PORT!r} must be a port number in 1..65535", "MASTER_PORT")
    for key in ("EXP_ID", "RUN_ID"):
        value = getattr(cfg, key)
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            p.add(f"{key}={value!r} must be a plain folder name (letters, digits, '.', '_', '-')", key)


def validate(cfg: Config, invalid: Iterable[str] = ()) -> list[str]:
    """Every problem in ``cfg``, each with its fix, each reported once (empty list when valid).

    Args:
        cfg: the configuration.
        invalid: options already reported (e.g. a value of the wrong type, replaced by its default
            meanwhile): no rule reports them again, and the rules that combine them with others skip.

    Returns:
        One message per problem: the single-option ranges first, then the cross-field rules.
    """
    p = Problems(invalid)
    for rules in (_range_rules, _data_rules, _model_rules, _optim_rules, _loss_rules, _eval_rules, _runtime_rules):
        rules(cfg, p)
    return list(p)
