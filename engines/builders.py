"""Builders: translate the :class:`~configs.Config` into the plain arguments that the model, loss,
data, metrics, optimiser and trainer take, so that none of those reads the config itself."""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from configs import Config
from engines.checkpoint import LoadReport, check_layers, head_is_trained, load_weights, read_checkpoint
from engines.figures import make_plotter
from engines.SegTrainer import SegTrainer, TrainerSettings, TrainStep
from model.AuxNet import AuxNet
from model.losses import LossOptions
from model.losses import build_loss as make_loss
from model.metrics import SegmentationMetrics
from utils.augment_presets import AUGMENTATION_PRESETS
from utils.dataset import SceneSDM, Splits, build_datasets, make_loader
from utils.hardware import Runtime, compile_problem, resolve_runtime
from utils.image_io import DatasetError
from utils.loggers import build_loggers
from utils.run_paths import RunDir, cache_dir, resolve_weights_path
from utils.splits import split_record
from utils.util import DistContext, RunError, cpu_threads, local_processes



def build_runtime(cfg: Config, ctx: DistContext) -> Runtime:
    """This process's :class:`~utils.hardware.Runtime`: its CPU threads, and what MIXED_PRECISION and
    CHANNELS_LAST resolve to on ``ctx.device`` (see :func:`utils.hardware.resolve_runtime`).

    Called once per process: by the launcher on every rank, and by ``predict``. Under DDP it is a
    collective call for an ``auto`` or ``measure`` memory format (rank 0's decision is every rank's),
    and each CPU process gets :func:`~utils.util.cpu_threads` threads, so that processes do not
    oversubscribe the cores (the local count: ``LOCAL_WORLD_SIZE`` under torchrun, else every
    process is local).
    """
    threads = cpu_threads(local_processes(ctx.world_size)) if ctx.device.type == "cpu" else None
    return resolve_runtime(ctx.device, cfg.MIXED_PRECISION, cfg.CHANNELS_LAST, partial(_bare_model, cfg),
                           (cfg.BATCH_SIZE, cfg.INPUT_CHANNELS, cfg.INPUT_SIZE, cfg.INPUT_SIZE), threads=threads,
                           agree=_main_rank_value if ctx.distributed else None)


def _main_rank_value(value):
    """Rank 0's ``value`` on every rank (a collective call)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _bare_model(cfg: Config) -> AuxNet:
    """The configuration's network, freshly initialised."""
    return AuxNet(
        in_channels=cfg.INPUT_CHANNELS,
        seg_classes=cfg.SEG_CLASSES,
        cls_classes=cfg.CLS_CLASSES if cfg.has_head else 0,
        depth=cfg.UNET_DEPTH,
        base_width=cfg.CONV_DEPTH,
        seg_dropout=cfg.SEG_DROPOUT,
        cls_dropout=cfg.CLS_DROPOUT,
        norm=cfg.NORM,
        activation=cfg.ACTIVATION,
        head_trains_encoder=cfg.CLS_TRAINS_ENCODER,
    )


def build_network(cfg: Config, path: Optional[Path] = None,
                  state: Optional[Mapping[str, Any]] = None) -> tuple[AuxNet, Optional[LoadReport]]:
    """The network, with MODEL_WEIGHTS loaded and only the MODEL's parts left trainable, and the
    report of what MODEL_WEIGHTS loaded (None without weights).

    The heads may be missing from the file (a UNet checkpoint, or one made before the fill head
    existed): they start fresh, trained if the stage trains them, else frozen (the report says which).

    Args:
        cfg: the configuration.
        path, state: MODEL_WEIGHTS's file and its content, when the caller has read it already
            (:func:`engines.inference.load_for_inference`); else it is read here.

    Raises:
        CheckpointError: MODEL_WEIGHTS cannot be read, does not fit the network, or was trained with
            another NORM or ACTIVATION.
    """
    net = _bare_model(cfg)
    report = None
    if cfg.MODEL_WEIGHTS:
        if state is None:
            path = resolve_weights_path(cfg.MODEL_WEIGHTS)
            state = read_checkpoint(path)
        check_layers(path, state, cfg.NORM, cfg.ACTIVATION)
        report = load_weights(net, path, state, cfg.MODEL)
    net.set_trainable(cfg.stage.trains)
    return net, report


def loss_options(cfg: Config) -> LossOptions:
    """The loss section of the configuration."""
    return LossOptions(
        seg_classes=cfg.SEG_CLASSES,
        cls_classes=cfg.CLS_CLASSES if cfg.trains_classifier else 0,
        weighting=cfg.loss_weighting,
        static_weights=cfg.STATIC_WEIGHTS,
        cls_weight=cfg.CLS_WEIGHT,
        include_background=cfg.INCLUDE_BACKGROUND,
        batch_dice=cfg.BATCH_DICE,
        sdm_distance=cfg.SDM_DISTANCE,
        sdm_normalization=None if cfg.SDM_NORMALIZATION == "none" else cfg.SDM_NORMALIZATION,
        sdm_kernel_size=cfg.SDM_KERNEL_SIZE,
        clamp_delta=cfg.CLAMP_DELTA,
        sigmoid_steepness=cfg.SIGMOID_STEEPNESS,
        seg_threshold=cfg.SEG_THRESHOLD,
        wce_w0=cfg.WCE_W0,
        wce_sigma=cfg.WCE_SIGMA,
        wbce_w0=cfg.WBCE_W0,
        wbce_sigma=cfg.WBCE_SIGMA,
        focal_gamma=cfg.FOCAL_GAMMA,
        focal_alpha=cfg.FOCAL_ALPHA,
        schedule_alpha=tuple(cfg.SCHEDULE_ALPHA),
        cldice_iterations=cfg.CLDICE_ITERATIONS,
    )


def build_loss(cfg: Config) -> nn.Module:
    return make_loss(cfg.LOSS, loss_options(cfg))


def build_data(cfg: Config, split_file: Optional[Path], fold: int, test_ids: Optional[list[str]] = None,
               scene_sdm: bool = True, hashes: Optional[dict[str, str]] = None) -> Splits:
    """The train and test tile datasets of ``fold`` (of ``test_ids`` when given: a checkpoint's own split,
    whose images must still have the content ``hashes`` stored with it); ``scene_sdm=False`` skips the
    training tiles' whole-image distance maps (SDM_SCOPE=image) when nothing will train.

    Raises:
        RunError: naming DATASET_DIR, for any bad, missing or mismatched file or split.
    """
    augmentations = (AUGMENTATION_PRESETS[cfg.AUGMENTATIONS] if isinstance(cfg.AUGMENTATIONS, str)
                     else cfg.AUGMENTATIONS)
    with _dataset_errors(cfg):
        return build_datasets(
            cfg.DATASET_DIR,
            split_file=split_file,
            cache_dir=cache_dir(cfg.RESULTS_DIR),
            seed=cfg.SEED,
            input_size=cfg.INPUT_SIZE,
            input_channels=cfg.INPUT_CHANNELS,
            seg_classes=cfg.SEG_CLASSES,
            test_split=cfg.TEST_SPLIT,
            fold=fold,
            cross_validation=cfg.CROSS_VALIDATION,
            train_composition=cfg.TRAIN_SET_COMPOSITION,
            test_composition=cfg.TEST_SET_COMPOSITION,
            tile_overlap=cfg.train_overlap,
            augmentations=augmentations,
            synthetic_images=cfg.SYNTHETIC_IMAGES,
            synthetic_size=cfg.SYNTHETIC_SIZE,
            test_ids=test_ids,
            fixed_test_ids=cfg.TEST_IDS,
            hashes=hashes,
            scene_sdm=(SceneSDM(cfg.SEG_CLASSES, cfg.SDM_DISTANCE, folder=cache_dir(cfg.RESULTS_DIR))
                       if cfg.SDM_SCOPE == "image" and scene_sdm else None),
        )


def build_loaders(cfg: Config, splits: Splits, ctx: DistContext):
    """The train and test loaders (RunError, naming DATASET_DIR, when a split is too small)."""
    common = dict(num_workers=cfg.NUM_WORKERS, seed=cfg.SEED, distributed=ctx.distributed,
                  pin_memory=ctx.device.type == "cuda")
    with _dataset_errors(cfg):
        return (
            make_loader(splits.train, batch_size=cfg.BATCH_SIZE, train=True, **common),
            make_loader(splits.test, batch_size=cfg.BATCH_SIZE, train=False, **common),
        )


@contextmanager
def _dataset_errors(cfg: Config):
    """Turn a data problem (bad, missing or mismatched files; a split too small) into a RunError."""
    try:
        yield
    except DatasetError as err:
        raise RunError(f"DATASET_DIR={cfg.DATASET_DIR!r}: {err}") from err


def build_metrics(cfg: Config, device: torch.device):
    """A factory of fresh metric accumulators (one per evaluation)."""
    cma = {k: w for k, w in cfg.CMA_COEFFICIENTS.items() if w > 0}
    return partial(
        SegmentationMetrics,
        cfg.SEG_CLASSES,
        distance_metrics=cfg.DISTANCE_METRICS,
        spacing=cfg.PIXEL_SPACING,
        include_background=cfg.INCLUDE_BACKGROUND,
        seg_threshold=cfg.SEG_THRESHOLD,
        cls_threshold=cfg.CLS_THRESHOLD,
        cma_coefficients=cma if cfg.EVAL_METRIC == "CMA" else None,
        device=device,
    )


def build_optimizer(cfg: Config, step: TrainStep, steps_per_epoch: int):
    """AdamW (L2_DECAY on the network only, never on learnable loss weights) and a per-step
    schedule: linear warm-up INIT_LR → BASE_LR over WARMUP_EPOCHS, then cosine to 0 over TRAIN_EPOCHS."""
    groups = [
        {"params": [p for p in step.net.parameters() if p.requires_grad], "weight_decay": cfg.L2_DECAY},
        {"params": [p for p in step.loss.parameters() if p.requires_grad], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.BASE_LR)
    warmup = cfg.WARMUP_EPOCHS * steps_per_epoch
    decay = cfg.TRAIN_EPOCHS * steps_per_epoch
    schedule = partial(lr_factor, warmup=warmup, decay=decay, start=cfg.INIT_LR / cfg.BASE_LR)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def lr_factor(step: int, *, warmup: int, decay: int, start: float) -> float:
    """Multiplier of BASE_LR at optimisation ``step`` (see :func:`build_optimizer`)."""
    if step < warmup:
        return start + (1.0 - start) * step / warmup
    t = min((step - warmup) / max(decay, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def build_trainer(cfg: Config, ctx: DistContext, runtime: Runtime, run: RunDir, splits: Splits,
                  fold: int = 0) -> SegTrainer:
    net, report = build_network(cfg)
    if ctx.is_main and report is not None:
        print(load_report_line(cfg, report))
    if cfg.COMPILE:
        compile_network(net, ctx.device)
    step = TrainStep(net, build_loss(cfg), decode=cfg.stage.decodes, use_cls=cfg.trains_classifier)
    train_loader, test_loader = build_loaders(cfg, splits, ctx)
    optimizer, scheduler = build_optimizer(cfg, step, max(len(train_loader), 1))
    name = f"{run.root.parent.name}/{run.root.name}"  # the run's name in W&B and on its figures
    logger = build_loggers(
        run.root, is_main=ctx.is_main, local=cfg.LOG_LOCAL, wandb=cfg.LOG_WANDB,
        project="AuxNet", name=name, config=cfg.to_dict(),
    )
    settings = TrainerSettings(
        run=run,
        epochs=cfg.WARMUP_EPOCHS + cfg.TRAIN_EPOCHS,
        eval_metric=cfg.EVAL_METRIC,
        save_best=cfg.SAVE_MODEL,
        amp_dtype=runtime.amp_dtype,
        channels_last=runtime.channels_last,
        config=cfg.to_dict(),
        fold=fold,
        seed=cfg.SEED + fold,
        split=split_record(splits.train.images, splits.train_ids, splits.test_ids),
        head_trained=head_is_trained(cfg, report),
        grad_clip=cfg.GRAD_CLIP,
        early_stopping=cfg.EARLY_STOPPING,
        plot_every=cfg.PLOT_EVERY,
    )
    trainer = SegTrainer(step, optimizer, scheduler, train_loader, test_loader, build_metrics(cfg, ctx.device),
                         logger, ctx, settings)
    if ctx.is_main:
        trainer.plotter = make_plotter(run.root, trainer.step.net, splits.test, runtime, cfg.SEG_THRESHOLD,
                                       cfg.PLOT_TILES, logger.log_images, name=name, eval_metric=cfg.EVAL_METRIC)
    return trainer


def compile_network(net: nn.Module, device: torch.device) -> None:
    """COMPILE: ``torch.compile`` the network in place (``nn.Module.compile``: its state_dict keys,
    and so its checkpoints, stay those of the plain network).

    Raises:
        RunError: torch.compile cannot build kernels on ``device`` here (no C++ compiler on the CPU,
            no Triton on CUDA), with the fix.
    """
    problem = compile_problem(device)
    if problem:
        raise RunError(f"COMPILE=true: {problem}. Install it, or set COMPILE=false")
    net.compile()


def load_report_line(cfg: Config, report: LoadReport) -> str:
    """What MODEL_WEIGHTS gave the network: tensors loaded, newly initialised (and whether they train), ignored."""
    def parts(names: list[str]) -> str:
        tops = list(dict.fromkeys(n.split(".")[0] for n in names))
        return f"{len(names)} ({', '.join(tops[:6])}{', …' if len(tops) > 6 else ''})" if names else "0"

    line = (f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS}: loaded {parts(report.loaded)} tensors, newly initialised "
            f"{parts(report.initialised)}, ignored {parts(report.ignored)} from the file")
    if report.initialised and "C" not in cfg.stage.trains:
        line += f"; the new tensors are not trained by MODEL={cfg.MODEL} (frozen at their initialisation)"
    return line
