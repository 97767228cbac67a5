"""AuxNet beside its peers, at equal budget: the same splits, tiles, epochs, schedule, precision and
augmentation, scored by one metric code on the same pixels of whole test images.

Rows (``--rows``):

* ``auxnet``: AuxNet trained **through the framework's own train command** (``python main.py``) with
  the default recipe plus only what the task needs (its data, classes, tile size); scored from the
  final epoch's ``last.pth`` with the framework's own predictor (Gaussian-weighted windows at 50 %
  overlap), ungated; ``auxnet`` also reports the same checkpoint's gated prediction (the head skips
  the decoder on windows it calls boundary-free) as the row ``AuxNet default, gated``.
* ``basicunet``: MONAI ``BasicUNet(features=(8, 16, 32, 64, 128, 8))`` (0.488 M parameters, as
  AuxNet's 0.483 M) and ``unet``: MONAI ``UNet(channels=(12, 24, 48, 96, 192), strides 2,
  num_res_units=1)`` (0.473 M); both with MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` on
  ``max(K, 2)`` output channels, AdamW at the same rates, the same warm-up and cosine per step, the
  same tiles, batches, augmentation and autocast/channels_last as the framework's runtime chooses,
  fed by the framework's own loader (so every network sees the same tiles in the same order);
  predicted with MONAI's ``sliding_window_inference`` (Gaussian, 50 % overlap).
* ``smp``: segmentation_models_pytorch ``Unet`` where it imports (it needs torchvision; where it
  does not import, the table says why).
* ablations of AuxNet (each a config option, see :data:`ABLATIONS`): ``--rows ablations``.

Tasks (``--tasks``, see :data:`TASKS`): ``touching_blobs`` (3 classes from instance labels:
background, cell interior, cell boundary), ``hard_boundaries`` (binary, thin touching structures),
``lines_ellipses`` (3 classes), ``isbi2012`` (EM membranes; 3-fold cross-validation over the 30
slices, so nothing is chosen on a test slice; needs the data folder, skipped with its reason
without it). Each seed is one replicate: a fresh training of every row; on ISBI seed number ``i``
(in the order given) trains fold ``i`` of the 3.

Every run is kept in ``--results-dir/<task>/<row>/seed<seed>/result.json`` and reused when the same
command (and, for AuxNet, the same configuration) made it, unless ``--force``; the tables
(mean ± sample std over the seeds, wall time, parameters) go to ``--out`` (markdown) and are printed.

Usage:
    python bench/peers.py                                   # every task, AuxNet and its peers, 3 seeds
    python bench/peers.py --tasks touching_blobs --rows ablations
    python bench/peers.py --tables-only                     # rewrite the tables from the runs on disk
    python bench/peers.py --tasks touching_blobs --epochs 1 --seeds 42 --results-dir /tmp/p --out /tmp/p.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.folder_datasets import FOLDER_DATASETS, ensure_folder_dataset  # noqa: E402
from bench.reproduce import git_commit, machine, write_fixed_split  # noqa: E402
from configs import load_config  # noqa: E402
from engines.builders import build_data, build_loaders, build_runtime, lr_factor  # noqa: E402
from engines.forward import autocast_for, image_to, place  # noqa: E402
from engines.inference import load_for_inference  # noqa: E402
from engines.predict import build_predictor  # noqa: E402
from engines.SegTrainer import seed_loader_epoch  # noqa: E402
from engines.sliding_window import ArrayImage  # noqa: E402
from model.metrics import SegmentationMetrics  # noqa: E402
from utils.image_io import to_unit_range  # noqa: E402
from utils.util import DistContext, atomic_write_json, atomic_write_text, seed_everything  # noqa: E402

DATA_SEED = 0  # every generated dataset is drawn from seed 0; the training SEED varies
SEEDS = (42, 1, 2)
ISBI_DIR = ROOT.parent / "shared" / "data" / "isbi2012"


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
        title: the table's title.
        data: a generated dataset's name (:data:`bench.folder_datasets.FOLDER_DATASETS`) or a folder.
        seg_classes: SEG_CLASSES of the runs (1 = binary).
        scored: the classes whose mean Dice / IoU the table reports (their names by index).
        boundary: the class whose IoU, HD95 and ASD the table reports (the task's boundary class).
        overrides: what the task needs beyond the default recipe (``KEY=VALUE``).
        test_ids: the fixed test images, or None for cross-validation folds (see ``folds``).
        folds: cross-validation: seed number i tests fold i of this many (contiguous blocks of ids).
    """

    title: str
    data: str
    seg_classes: int
    scored: dict[int, str]
    boundary: int
    overrides: tuple[str, ...] = ()
    test_ids: Optional[tuple[str, ...]] = None
    folds: int = 0


TASKS: dict[str, Task] = {
    "touching_blobs": Task(
        "Touching cells, 3 classes from instance labels (18 training / 6 test images of 512²)",
        "touching_blobs", 3, {1: "interior", 2: "boundary"}, 2, ("LOSS=CE_SoftDICE",),
        test_ids=tuple(f"{n:03d}" for n in range(18, 24))),
    "hard_boundaries": Task(
        "Hard boundaries, binary: thin, touching, low-contrast structures (9 training / 15 test scenes of 768²)",
        "hard_boundaries", 1, {1: "object"}, 1, (), test_ids=tuple(f"{n:03d}" for n in range(9, 24))),
    "lines_ellipses": Task(
        "Lines and ellipses, 3 classes (50 training / 10 test images of 400×200, 96-px tiles)",
        "lines_ellipses", 3, {1: "line", 2: "ellipse"}, 1,
        ("LOSS=CE_SoftDICE", "INPUT_SIZE=96"), test_ids=tuple(f"{n:03d}" for n in range(50, 60))),
    "isbi2012": Task(
        "ISBI 2012 EM membranes, 3-fold cross-validation over the 30 slices (20 training / 10 test each)",
        str(ISBI_DIR), 1, {0: "membrane", 1: "cell"}, 0, (), folds=3),
}


@dataclass(frozen=True)
class Row:
    """One row: AuxNet with ``overrides`` (``peer`` None) or a peer network by name."""

    label: str
    overrides: tuple[str, ...] = ()
    peer: Optional[str] = None
    #: the row a change column compares with (and whose options this row's start from)
    reference: str = "auxnet"
    #: LOSS terms added to the task's own LOSS (boundary-aware ablations), e.g. ("Boundary",).
    extra_terms: tuple[str, ...] = ()
    #: LOSS term of the task's own LOSS replaced: (old, new), e.g. ("CE", "wCE").
    swap_term: Optional[tuple[str, str]] = None


#: The default before GATE_THRESHOLD=0.4 (BatchNorm; gating at the classifier's
#: 0.5): what the rows of :data:`CHANGES` change from, and the row ``batchnorm``.
BATCHNORM_DEFAULT = ("NORM=batch", "GATE_THRESHOLD=0.5")
#: What the ablations change from: the default recipe before they chose CLS_WEIGHT=0.1 (each ablation
#: row is this plus one change, compared with the row ``previous``).
PREVIOUS_DEFAULT = ("CLS_WEIGHT=1.0", *BATCHNORM_DEFAULT)

PEERS: dict[str, Row] = {
    "auxnet": Row("AuxNet default"),
    "batchnorm": Row("AuxNet, previous default (gated at GATE_THRESHOLD=0.5)", BATCHNORM_DEFAULT),
    "auxnet_cldice": Row("AuxNet, previous default + clDice", BATCHNORM_DEFAULT, extra_terms=("clDice",)),
    "auxnet_wce": Row("AuxNet default, wCE / wBCE instead of CE / BCE", swap_term=("CE", "wCE")),
    "basicunet": Row("MONAI BasicUNet + DiceCE", peer="basicunet"),
    "unet": Row("MONAI UNet + DiceCE", peer="unet"),
    "smp": Row("SMP Unet + DiceCE", peer="smp"),
}

#: AuxNet's ablations: one option changed per row from the previous default (:data:`PREVIOUS_DEFAULT`),
#: the recipe they were measured against when they chose the default.
ABLATIONS: dict[str, Row] = {name: replace(row, overrides=PREVIOUS_DEFAULT + row.overrides, reference="previous")
                             for name, row in {
    "norm_instance": Row("NORM=instance", ("NORM=instance",)),
    "norm_group": Row("NORM=group", ("NORM=group",)),
    "leaky_relu": Row("ACTIVATION=leaky_relu", ("ACTIVATION=leaky_relu",)),
    "instance_leaky": Row("NORM=instance, ACTIVATION=leaky_relu", ("NORM=instance", "ACTIVATION=leaky_relu")),
    "dice_background": Row("INCLUDE_BACKGROUND=true (Dice also of the background)", ("INCLUDE_BACKGROUND=true",)),
    "cls_0": Row("CLS_WEIGHT=0 (head carried, not trained)", ("CLS_WEIGHT=0",)),
    "cls_0.1": Row("CLS_WEIGHT=0.1", ("CLS_WEIGHT=0.1",)),
    "cls_0.3": Row("CLS_WEIGHT=0.3", ("CLS_WEIGHT=0.3",)),
    "cls_detached": Row("CLS_TRAINS_ENCODER=false (heads trained on the encoder's features)",
                        ("CLS_TRAINS_ENCODER=false",)),
    "aug_flips": Row("AUGMENTATIONS=flips", ("AUGMENTATIONS=flips",)),
    "aug_none": Row("AUGMENTATIONS=none", ("AUGMENTATIONS=none",)),
    "boundary": Row("+ Boundary, α schedule", ("ADAPTIVE_WEIGHTS=schedule",), extra_terms=("Boundary",)),
    "cldice": Row("+ clDice", extra_terms=("clDice",)),
    "smae": Row("+ sMAE", extra_terms=("sMAE",)),
    "wce": Row("wCE / wBCE instead of CE / BCE", swap_term=("CE", "wCE")),
    }.items()}
ABLATIONS = {"previous": Row("AuxNet, CLS_WEIGHT=1.0 (the default before CLS_WEIGHT=0.1)", PREVIOUS_DEFAULT),
             **ABLATIONS}

#: One change each from the previous default (:data:`BATCHNORM_DEFAULT`, compared with the row
#: ``batchnorm``): what the next default was chosen from.
CHANGES: dict[str, Row] = {name: replace(row, overrides=BATCHNORM_DEFAULT + row.overrides, reference="batchnorm")
                           for name, row in {
    "default_instance": Row("NORM=instance, GATE_THRESHOLD=0.3",
                            ("NORM=instance", "GATE_THRESHOLD=0.3")),
    "default_background": Row("INCLUDE_BACKGROUND=true", ("INCLUDE_BACKGROUND=true",)),
    "default_image_dice": Row("BATCH_DICE=false (Dice per image, as MONAI's)", ("BATCH_DICE=false",)),
    "default_image_dice_bg": Row("BATCH_DICE=false, INCLUDE_BACKGROUND=true (MONAI's Dice)",
                                 ("BATCH_DICE=false", "INCLUDE_BACKGROUND=true")),
    "default_d5w8": Row("UNET_DEPTH=5, CONV_DEPTH=8 (BasicUNet's levels and widths)", ("UNET_DEPTH=5", "CONV_DEPTH=8")),
    }.items()}
ROWS: dict[str, Row] = {**PEERS, **ABLATIONS, **CHANGES}
ROW_SETS = {"peers": list(PEERS), "ablations": list(ABLATIONS), "changes": ["batchnorm", *CHANGES]}


# ------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """One (task, row, seed): where it lives and what it trains on."""

    task_name: str
    row_name: str
    seed: int
    replicate: int  # the seed's position: the fold on a cross-validated task
    results: Path
    epochs: Optional[int] = None
    task: Task = field(init=False)
    row: Row = field(init=False)

    def __post_init__(self):
        self.task, self.row = TASKS[self.task_name], ROWS[self.row_name]

    @property
    def folder(self) -> Path:
        return self.results / self.task_name / self.row_name / (f"seed{self.seed}" + (
            f"_e{self.epochs}" if self.epochs is not None else ""))

    @property
    def data_dir(self) -> Path:
        return (self.results / "data" / self.task.data) if self.task.data in FOLDER_DATASETS else Path(self.task.data)

    def test_ids(self, ids: list[str]) -> list[str]:
        if self.task.test_ids is not None:
            return list(self.task.test_ids)
        return [str(x) for x in np.array_split(np.array(sorted(ids), dtype=object), self.task.folds)[self.replicate]]

    def loss(self) -> str:
        """The run's LOSS: the task's, or the default's, with the row's terms added or swapped."""
        given = dict(o.split("=", 1) for o in self.task.overrides)
        terms = given.get("LOSS", load_config(None, []).LOSS).split("_")
        if self.row.swap_term:
            old, new = self.row.swap_term
            binary = self.task.seg_classes == 1
            old, new = ("BCE", "wBCE") if binary else (old, new)
            terms = [new if t == old else t for t in terms]
        return "_".join(terms + list(self.row.extra_terms))

    def overrides(self) -> list[str]:
        """The ``KEY=VALUE`` options of the run (for AuxNet: its command line; for a peer: its loader)."""
        out = [f"DATASET_DIR={self.data_dir}", f"SEG_CLASSES={self.task.seg_classes}", f"SEED={self.seed}",
               *[o for o in self.task.overrides if not o.startswith("LOSS=")], f"LOSS={self.loss()}",
               *self.row.overrides, f"RESULTS_DIR={self.folder.parent.parent}", f"EXP_ID={self.row_name}",
               f"RUN_ID={self.folder.name}",
               "SAVE_MODEL=false", "DISTANCE_METRICS=false", "PLOT_TILES=0",
               f"TEST_SPLIT={1 / (self.task.folds or 4):.6f}"]
        if self.epochs is not None:
            out += [f"TRAIN_EPOCHS={self.epochs}", "WARMUP_EPOCHS=0"]
        return out

    def command(self) -> list[str]:
        return ["python", "main.py", *self.overrides()]


def ensure_data(run: Run) -> Optional[str]:
    """Generate the run's data when it is a generated dataset; the reason it cannot run, or None."""
    if run.task.data in FOLDER_DATASETS:
        ensure_folder_dataset(run.data_dir, run.task.data, DATA_SEED)
    elif not (run.data_dir / "images").is_dir():
        return (f"{run.data_dir} is missing: the ISBI 2012 training slices (images/ and masks/) are not on this "
                "machine")
    return None


def prepare(run: Run) -> Optional[str]:
    """Write the run's data (generated) and ``tts.json``; the reason it cannot run, or None."""
    reason = ensure_data(run)
    if reason:
        return reason
    images_dir = run.data_dir / "images"
    ids = sorted(p.stem for p in images_dir.iterdir() if not p.name.startswith("."))
    run.folder.mkdir(parents=True, exist_ok=True)
    write_fixed_split(run.folder, images_dir, run.test_ids(ids), num_folds=run.task.folds or 4, seed=run.seed)
    return None


def train_auxnet(run: Run) -> dict:
    """Train through ``main.py``; returns the wall time and the training time of the epochs."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    start = time.perf_counter()
    with open(run.folder / "train.log", "w") as log:
        done = subprocess.run([sys.executable, *run.command()[1:]], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not (run.folder / "last.pth").is_file():
        tail = (run.folder / "train.log").read_text().strip().splitlines()[-6:]
        raise RuntimeError(f"main.py exited {done.returncode}:\n  " + "\n  ".join(tail))
    epochs = [json.loads(line) for line in (run.folder / "log.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_s": wall, "train_s": sum(e.get("train_s", e.get("time_s", 0.0)) for e in epochs)}


def load_trained(run: Run, folder: Optional[Path] = None):
    """A finished AuxNet run's final network (``last.pth`` of ``folder``, default the run's own) as
    :func:`engines.inference.load_for_inference` reads it, its runtime and its data splits."""
    folder = folder or run.folder
    cfg = load_config(None, [*run.overrides(), f"MODEL_WEIGHTS={folder / 'last.pth'}"])
    checkpoint = load_for_inference(cfg, overrides=[], command="eval")
    runtime = build_runtime(checkpoint.cfg, DistContext(device=bench_device(cfg)))
    splits = build_data(checkpoint.cfg, folder / "tts.json", fold=0, scene_sdm=False)
    return checkpoint, runtime, splits


def whole_image_predict(predictor, seg_threshold: float) -> Callable:
    """:func:`score`'s ``predict`` for the framework's predictor: (labels, share of windows decoded)."""
    def predict(raw, entry):
        probs, stats = predictor.predict_array(ArrayImage(raw, entry.offset, entry.scale))
        return predictor.labels(probs, seg_threshold), stats.decoded / max(stats.tiles, 1)
    return predict


def score_auxnet(run: Run) -> dict[str, dict]:
    """Whole test images predicted from ``last.pth`` with the framework's predictor, ungated and gated."""
    checkpoint, runtime, splits = load_trained(run)
    out = {}
    for mode in ("ungated", "gated") if checkpoint.can_gate else ("ungated",):
        predictor = build_predictor(checkpoint.cfg, checkpoint.net, checkpoint.can_gate, runtime,
                                    gating=mode == "gated")
        out[mode] = score(run, splits, whole_image_predict(predictor, checkpoint.cfg.SEG_THRESHOLD))
    out["params"] = sum(p.numel() for p in checkpoint.net.parameters())
    return out


def bench_device(cfg) -> torch.device:
    """Where ``main.py`` trains a run of ``cfg`` (its first GPU, or the CPU): every row runs there."""
    if cfg.GPUs == [] or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", (cfg.GPUs or [0])[0])


def peer_network(name: str, out_channels: int) -> torch.nn.Module:
    """A peer network (2-D, one input channel).

    Raises:
        ImportError: its library does not import here (the message says why).
    """
    if name == "basicunet":
        from monai.networks.nets import BasicUNet

        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=out_channels, features=(8, 16, 32, 64, 128, 8))
    if name == "unet":
        from monai.networks.nets import UNet

        return UNet(spatial_dims=2, in_channels=1, out_channels=out_channels, channels=(12, 24, 48, 96, 192),
                    strides=(2, 2, 2, 2), num_res_units=1)
    if name == "smp":
        try:
            import segmentation_models_pytorch as smp
        except Exception as err:  # torchvision beside a CPU torch fails with RuntimeError, not ImportError
            raise ImportError(f"segmentation_models_pytorch does not import: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120]}") from None
        return smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=out_channels)
    raise ValueError(f"unknown peer {name!r}")


def train_peer(run: Run) -> tuple[dict, Callable]:
    """Train a peer on the framework's loader with the framework's schedule; returns the timings and
    the whole-image predictor (MONAI ``sliding_window_inference``)."""
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss

    start = time.perf_counter()
    cfg = load_config(None, run.overrides())
    ctx = DistContext(device=bench_device(cfg))
    runtime = build_runtime(cfg, ctx)
    seed_everything(cfg.SEED)
    net = place(peer_network(run.row.peer, max(cfg.SEG_CLASSES, 2)), ctx.device, runtime.channels_last)
    splits = build_data(cfg, run.folder / "tts.json", fold=0, scene_sdm=False)
    loader, _ = build_loaders(cfg, splits, ctx)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.BASE_LR, weight_decay=cfg.L2_DECAY)
    schedule = partial(lr_factor, warmup=cfg.WARMUP_EPOCHS * len(loader), decay=cfg.TRAIN_EPOCHS * len(loader),
                       start=cfg.INIT_LR / cfg.BASE_LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    train_s = 0.0
    for epoch in range(cfg.WARMUP_EPOCHS + cfg.TRAIN_EPOCHS):
        seed_loader_epoch(loader, cfg.SEED, epoch, 0)  # the trainer's seeding: the same augmentation draws
        net.train()
        began = time.perf_counter()
        for batch in loader:
            image = image_to(batch["image"], ctx.device, runtime.channels_last)
            mask = batch["mask"].to(ctx.device)[:, None]
            with autocast_for(ctx.device, runtime.amp_dtype):
                logits = net(image)
            loss = loss_fn(logits.float(), mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        train_s += time.perf_counter() - began
    net.eval()

    @torch.inference_mode()
    def predict(raw, entry):
        x = torch.from_numpy(to_unit_range(raw, entry.offset, entry.scale).transpose(2, 0, 1)[None].copy())
        x = image_to(x, ctx.device, runtime.channels_last)
        with autocast_for(ctx.device, runtime.amp_dtype):
            logits = sliding_window_inference(x, (cfg.INPUT_SIZE,) * 2, cfg.BATCH_SIZE * 2, net, overlap=0.5,
                                              mode="gaussian")
        return logits.float().argmax(1)[0].cpu().numpy(), 1.0

    timing = {"wall_s": time.perf_counter() - start, "train_s": train_s,
              "params": sum(p.numel() for p in net.parameters())}
    return timing, (predict, splits)


def score(run: Run, splits, predict: Callable) -> dict:
    """Per-class Dice, IoU and surface distances over the test split's whole images (one metric code
    for every row: :class:`model.metrics.SegmentationMetrics`, background included)."""
    metrics = SegmentationMetrics(run.task.seg_classes, distance_metrics=True, include_background=True)
    images = splits.test.images
    index = {image_id: i for i, image_id in enumerate(images.ids)}
    decoded, started = [], time.perf_counter()
    for image_id in splits.test_ids:
        raw, mask = images.get(index[image_id])
        pred, share = predict(raw, images.entries[index[image_id]])
        decoded.append(share)
        metrics.update_labels(torch.from_numpy(np.asarray(pred, dtype=np.int64))[None],
                              torch.from_numpy(mask.astype(np.int64))[None], ids=[image_id])
    return {**metrics.compute(), "predict_s": time.perf_counter() - started, "decoded": float(np.mean(decoded))}


#: Options added after finished runs of these tables were made, with the value those runs had: a run
#: whose option has that value is the same run as one made before the option existed.
ADDED_SINCE = {"BATCH_DICE": True, "GATE_THRESHOLD": 0.5}

#: The options a peer's run reads: its data, tiles, augmentation, schedule, precision and seed.
PEER_KEYS = ("DATASET_DIR", "SEED", "SEG_CLASSES", "INPUT_SIZE", "INPUT_CHANNELS", "BATCH_SIZE", "TILE_OVERLAP",
             "TEST_SPLIT", "AUGMENTATIONS", "TRAIN_SET_COMPOSITION", "TEST_SET_COMPOSITION", "INIT_LR", "BASE_LR",
             "L2_DECAY", "WARMUP_EPOCHS", "TRAIN_EPOCHS", "MIXED_PRECISION", "CHANNELS_LAST", "GPUs", "TEST_IDS",
             "CROSS_VALIDATION", "SYNTHETIC_IMAGES", "SYNTHETIC_SIZE")


def run_spec(run: Run) -> dict:
    """What makes two runs the same: the network (or peer), the resolved configuration but where it is
    written (RESULTS_DIR, EXP_ID, RUN_ID; for a peer only :data:`PEER_KEYS`), and on a cross-validated
    task the fold."""
    cfg = load_config(None, run.overrides()).to_dict()
    for key in ("RESULTS_DIR", "EXP_ID", "RUN_ID"):
        cfg.pop(key)
    for key, value in ADDED_SINCE.items():  # a run made before the option existed had this value
        if cfg.get(key) == value:
            cfg.pop(key)
    if run.row.peer:  # only what the peers' training reads (AuxNet's options change nothing of theirs)
        cfg = {key: cfg[key] for key in PEER_KEYS}
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"config": digest, "peer": run.row.peer, "fold": run.replicate if run.task.folds else None}


def finished_twin(run: Run, spec: dict) -> Optional[tuple[str, dict]]:
    """Another row's finished run of the same task and seed with the same :func:`run_spec` (e.g. an
    ablation that became the default), one that trained its network itself (not a reuse, whose
    folder may later hold another run): (its row, its result)."""
    for path in sorted((run.results / run.task_name).glob(f"*/{run.folder.name}/result.json")):
        if path.parent != run.folder:
            found = json.loads(path.read_text())
            if found.get("spec") == spec and not found.get("same_run_as"):  # the run that trained it
                return path.parent.parent.name, found
    return None


def run_one(run: Run, force: bool) -> Optional[dict]:
    """Train and score one run, or reuse it (its own earlier result, or a twin's: see
    :func:`finished_twin`); its result, or ``{"skipped": why}`` when it cannot run here."""
    path = run.folder / "result.json"
    reason = ensure_data(run)
    if reason:
        return {"skipped": reason}
    spec = run_spec(run)
    if path.is_file() and not force:
        found = json.loads(path.read_text())
        if found.get("spec") == spec:
            return found
    twin = None if force else finished_twin(run, spec)
    if twin:
        result = {**twin[1], "same_run_as": twin[0]}
        if run.folder.exists():  # an earlier run's network and logs are not this result's
            shutil.rmtree(run.folder)
        run.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result)
        print(f"{run.task_name} / {run.row.label} / seed {run.seed}: the same configuration as {twin[0]}'s run",
              flush=True)
        return result
    if run.row.peer:
        try:
            peer_network(run.row.peer, 2)
        except ImportError as err:
            return {"skipped": str(err)}
    if run.folder.exists():
        shutil.rmtree(run.folder)
    prepare(run)
    print(f"{run.task_name} / {run.row.label} / seed {run.seed} ...", flush=True)
    if run.row.peer:
        timing, (predict, splits) = train_peer(run)
        scores = {"ungated": score(run, splits, predict)}
    else:
        timing = train_auxnet(run)
        scores = score_auxnet(run)
        timing["params"] = scores.pop("params")
    result = {"spec": spec, "command": shlex.join(run.command()), **timing, "scores": scores, "commit": git_commit(), "machine": machine(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    atomic_write_json(path, result)
    u = scores["ungated"]
    print(f"  {timing['wall_s']:.0f} s; DSC {u['DSC']:.4f}, boundary IoU {u[f'IoU/{run.task.boundary}']:.4f}",
          flush=True)
    return result


# ------------------------------------------------------------------------------------ tables


def mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def headline(task: Task, score: dict) -> tuple[float, float]:
    """(mean Dice over the task's scored classes, IoU of its boundary class) of one run's scores."""
    return statistics.mean(score[f"DSC/{c}"] for c in task.scored), score[f"IoU/{task.boundary}"]


def paired_change(values: dict[int, float], reference: dict[int, float]) -> str:
    """Mean change from ``reference`` over the seeds both have, with ``*`` where a paired t-test over
    the seeds gives p < 0.05 (every row sees the same data order and augmentation for a seed)."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return "—"
    delta = statistics.mean(values[s] - reference[s] for s in seeds)
    significant = False
    if len(seeds) >= 3:
        a, b = [values[s] for s in seeds], [reference[s] for s in seeds]
        if any(x != y for x, y in zip(a, b)):
            significant = bool(ttest_rel(a, b).pvalue < 0.05)
    return f"{delta:+.4f}{'*' if significant else ''}"


def row_cells(task: Task, results: list[dict], mode: str, reference: dict[int, tuple[float, float]]) -> list[str]:
    """The table cells of one row from its runs' results (one per seed); ``reference`` holds AuxNet
    default's (Dice, boundary IoU) by seed, for the change columns."""
    done = [r for r in results if mode in r.get("scores", {})]
    if not done:
        return []
    scores = [r["scores"][mode] for r in done]
    b = task.boundary
    heads = {r["seed"]: headline(task, r["scores"][mode]) for r in done}
    dsc = [h[0] for h in heads.values()]
    iou = [statistics.mean(s[f"IoU/{c}"] for c in task.scored) for s in scores]
    cells = [mean_std(dsc), mean_std(iou)]
    if len(task.scored) > 1:
        cells += [" / ".join(f"{statistics.mean(s[f'DSC/{c}'] for s in scores):.4f}" for c in task.scored)]
    cells += [mean_std([s[f"IoU/{b}"] for s in scores]), mean_std([s[f"HD95/{b}"] for s in scores], 2),
              mean_std([s[f"ASD/{b}"] for s in scores], 2), mean_std([s["ACC"] for s in scores])]
    cells += [paired_change({k: v[0] for k, v in heads.items()}, {k: v[0] for k, v in reference.items()}),
              paired_change({k: v[1] for k, v in heads.items()}, {k: v[1] for k, v in reference.items()})]
    wall = [r["wall_s"] for r in done]
    train = [r["train_s"] for r in done]
    predict = [s["predict_s"] for s in scores]
    cells += [f"{done[0]['params'] / 1e6:.3f}", f"{statistics.mean(train):.0f} / {statistics.mean(wall):.0f}",
              f"{statistics.mean(predict):.1f}", str(len(scores))]
    return cells


def task_table(name: str, rows: list[str], runs: dict[str, list[dict]], title: str) -> str:
    """The markdown table of one task: a row per model (and AuxNet's gated prediction), each compared
    with its reference row (:attr:`Row.reference`)."""
    task = TASKS[name]
    names = list(task.scored.values())
    head = ["model", f"Dice ({' + '.join(names)})", "IoU"]
    if len(task.scored) > 1:
        head += [f"Dice {' / '.join(names)}"]
    bname = {**task.scored, 0: task.scored.get(0, "background")}[task.boundary]
    head += [f"IoU {bname}", f"HD95 {bname} px", f"ASD {bname} px", "pixel acc.", "Δ Dice", f"Δ IoU {bname}",
             "params M", "train / wall s", "predict s", "seeds"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped = []
    for row_name in rows:
        results = runs.get(row_name, [])
        if not any("scores" in r for r in results):
            why = next((r["skipped"] for r in results if "skipped" in r), None)
            if why:
                skipped.append(f"{ROWS[row_name].label}: {why}")
            continue
        reference = {r["seed"]: headline(task, r["scores"]["ungated"]) for r in runs.get(ROWS[row_name].reference, [])
                     if "ungated" in r.get("scores", {})}
        is_reference = any(ROWS[other].reference == row_name for other in rows if other != row_name)
        for mode in ("ungated", "gated"):
            cells = row_cells(task, results, mode, reference)
            if cells and is_reference and mode == "ungated":
                cells[head.index("Δ Dice") - 1:head.index("Δ Dice") + 1] = ["(reference)", "(reference)"]
            if cells:
                label = ROWS[row_name].label + (", gated" if mode == "gated" else "")
                lines.append("| " + " | ".join([label, *cells]) + " |")
    if skipped:
        lines += [""] + [f"- not run: {s}" for s in skipped]
    return "\n".join(lines)


def write_tables(tasks: list[str], rows: list[str], seeds: list[int], results_dir: Path, out: Path,
                 epochs: Optional[int]) -> str:
    parts = ["# AuxNet beside its peers\n\nWritten by `bench/peers.py` (do not edit: rerun it). The runs: "
             "`python bench/peers.py --threads 1` (AuxNet and the peers on every task) and `python bench/peers.py "
             "--threads 1 --tasks touching_blobs --rows ablations` (AuxNet's ablations), `--rows changes` (one change "
             "each from the previous default); the tables: `python bench/peers.py --tables-only --rows peers "
             "ablations changes`. One thread per run, so that two runs side by side on a 2-core machine time alike "
             "(under the load of other work, so the time columns compare rows within a table only).",
             "PROVENANCE Mean ± sample std over the seeds (" + ", ".join(map(str, seeds)) + "); whole test images; "
             "the final epoch's network (nothing selected on the test images). HD95 and ASD are the mean over the test "
             "images. Δ: the mean change from the table's reference row ('AuxNet default'; for the ablations, the "
             "previous default they were measured against) over the same seeds (each seed gives every row the same "
             "data order and augmentation), * where a paired t-test over the seeds gives p < 0.05. 'train / wall s': "
             "the training epochs' time and the whole command's; 'predict s': the test images' prediction. 'gated': "
             "the same network predicting with its head (windows it calls boundary-free are filled, not decoded)."]
    machines, commits = set(), set()
    for name in tasks:
        runs: dict[str, list[dict]] = {}
        for row_name in rows:
            for i, seed in enumerate(seeds):
                path = Run(name, row_name, seed, i, results_dir, epochs).folder / "result.json"
                if path.is_file():
                    result = json.loads(path.read_text())
                    runs.setdefault(row_name, []).append({"seed": seed, **result})
                    machines.add(result.get("machine", "?"))
                    commits.add(result.get("commit", "?"))
        task = TASKS[name]
        peer_rows = [r for r in rows if r in PEERS]
        if any(r in runs for r in peer_rows):
            parts.append(task_table(name, peer_rows, runs, f"### {task.title}"))
        ablation_rows = [r for r in ABLATIONS if r in rows]
        if any(r in runs for r in ablation_rows if r != "previous"):
            parts.append(task_table(name, ablation_rows, runs, f"#### {task.title}: ablations, one change from the "
                                    "previous default each"))
        change_rows = [r for r in ["batchnorm", *CHANGES] if r in rows]
        if any(r in runs for r in change_rows if r != "batchnorm"):
            parts.append(task_table(name, change_rows, runs, f"#### {task.title}: one change from the previous "
                                    f"default ({', '.join(BATCHNORM_DEFAULT)}) each"))
    made = (f"Made on {'; '.join(sorted(machines)) or machine()}, at commit(s) {', '.join(sorted(commits)) or '—'}. "
            if machines else "")
    parts[1] = parts[1].replace("PROVENANCE ", made)
    text = "\n\n".join(parts) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    return text


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--rows", nargs="+", default=["peers"],
                        help=f"row names or sets: {', '.join(ROW_SETS)}; rows: {', '.join(ROWS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--epochs", type=int, default=None, help="shortened runs (no warm-up): a smoke test")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "saved" / "peers")
    parser.add_argument("--out", type=Path, default=None, help="markdown tables (default: docs/peers.md, or "
                        "RESULTS_DIR/peers.md for shortened runs)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every run (default: the framework's choice, all cores); 1 keeps "
                             "timings steady on a shared machine")
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--force", action="store_true", help="train again even where a finished run exists")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # main.py's runs and this process's runtime
        torch.set_num_threads(args.threads)
    rows = list(dict.fromkeys(r for name in args.rows for r in ROW_SETS.get(name, [name])))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join([*ROW_SETS, *ROWS])}")
    results_dir = args.results_dir.resolve()
    out = args.out or (ROOT / "docs" / "peers.md" if args.epochs is None else results_dir / "peers.md")
    failed = 0
    if not args.tables_only:
        for name in args.tasks:
            for i, seed in enumerate(args.seeds):
                for row_name in rows:
                    run = Run(name, row_name, seed, i, results_dir, args.epochs)
                    try:
                        result = run_one(run, args.force)
                    except Exception as err:  # one failed run is reported; the others go on
                        failed += 1
                        print(f"{name} / {row_name} / seed {seed}: FAILED: {err}", file=sys.stderr, flush=True)
                        continue
                    if result and "skipped" in result:
                        print(f"{name} / {row_name}: skipped: {result['skipped']}", flush=True)
    print(write_tables(args.tasks, rows, args.seeds, results_dir, out, args.epochs))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
