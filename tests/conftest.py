"""Shared test helpers: random masks and label maps, the reference distances that the SDF, loss and
metric tests check against, the command line's tiny run, a trainer in this process, and checkpoints
written by the real writer.

The suite mirrors the packages: ``tests/configs``, ``tests/model``, ``tests/engines``, ``tests/utils``
and ``tests/bench`` test those folders; ``tests/`` itself holds the command-line tests (``main.py``
end to end) and the CUDA tests. No folder has an ``__init__.py``: pytest's default ``prepend``
import mode puts each test file's folder and tests/ (this file's folder) on ``sys.path``, so this
module is ``conftest`` both for pytest and for the test modules, helpers are imported by name
(``from conftest import blobs``) from any folder, and test file names must be unique across folders.
A test module never imports another one: what two of them share lives here.

Two helpers with a similar purpose are kept apart where their recipes differ (so every test keeps its
exact inputs): :func:`random_labels` / :func:`labels_with_every_class`, and :func:`blobs` (smooth
random shapes) / :func:`random_box` (one rectangle).

The fixtures: ``one_thread`` runs a test on one torch thread (see :func:`torch_threads`);
``trainers`` makes tiny trainers in the test's folder; ``checkpoint`` is a tiny network's checkpoint
as training writes it (:func:`write_checkpoint`). Tests marked ``cuda`` skip without a CUDA device.

The project's modules are imported inside the helpers that use them, so that collecting a test of a
low-level module (``utils/sdf.py``) does not import the trainer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

# ----------------------------------------------------------------------------- masks and label maps


def blobs(shape, seed: int = 0, sigma: float = 3.0, level: float = 0.55) -> np.ndarray:
    """Random smooth blobs: Gaussian-filtered uniform noise above its ``level`` quantile, per 2-D map.

    Args:
        shape: (..., H, W); the leading dimensions are independent maps.

    Returns:
        A bool array of ``shape``.
    """
    rng = np.random.default_rng(seed)
    noise = rng.random(shape)
    sig = (0,) * (len(shape) - 2) + (sigma, sigma)
    return ndi.gaussian_filter(noise, sig) > np.quantile(ndi.gaussian_filter(noise, sig), level)


def random_box(rng: np.random.Generator, h: int = 48, w: int = 48) -> np.ndarray:
    """A (H, W) uint8 0/1 mask holding one H/3 × W/3 rectangle in its upper-left half, so tiles of
    it have both labels."""
    m = np.zeros((h, w), np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    m[y:y + h // 3, x:x + w // 3] = 1
    return m


def random_labels(rng: np.random.Generator, b: int, k: int, h: int, w: int, sigma: float = 3.0) -> torch.Tensor:
    """Blobby random label maps (B, H, W): smoothed normal noise, argmax (K >= 2) or thresholded (K = 1).

    Blobs touch the image border, so the edge handling at the border is exercised too. A class may
    be missing from a map (see :func:`labels_with_every_class`).
    """
    x = ndi.gaussian_filter(rng.standard_normal((b, max(k, 1), h, w)), (0, 0, sigma, sigma))
    x /= x.std()
    if k == 1:
        return torch.from_numpy((x[:, 0] > 0.4).astype(np.int64))
    return torch.from_numpy(x.argmax(1).astype(np.int64))


def labels_with_every_class(seed: int, b: int, k: int, h: int, w: int, sigma: float = 2.0) -> torch.Tensor:
    """Blobby random (B, H, W) label maps with classes 0..max(K, 2)-1, every class in every map.

    Each map is the argmax of max(K, 2) smoothed uniform noise channels, drawn again until every class
    appears (so every class has a boundary and a signed distance map).
    """
    rng = np.random.default_rng(seed)
    n = max(k, 2)
    out = np.zeros((b, h, w), dtype=np.int64)
    for i in range(b):
        while len(np.unique(out[i])) < n:
            out[i] = ndi.gaussian_filter(rng.random((n, h, w)), (0, sigma, sigma)).argmax(0)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- reference distances


def brute_force_distance(fg: np.ndarray, distance: str, spacing) -> np.ndarray:
    """Distance of every pixel of a 2-D map to its nearest foreground pixel, by definition: the min
    over foreground pixels q of the metric of the physical offset p − q (small maps only).

    Args:
        distance: ``"euclidean"``, ``"manhattan"`` or ``"chebyshev"``.
        spacing: (row, column) pixel size.
    """
    sy, sx = spacing
    ii, jj = np.indices(fg.shape)
    qi, qj = np.nonzero(fg)
    dy = sy * np.abs(ii[..., None] - qi)
    dx = sx * np.abs(jj[..., None] - qj)
    if distance == "euclidean":
        d = np.hypot(dy, dx)
    elif distance == "manhattan":
        d = dy + dx
    else:
        d = np.maximum(dy, dx)
    return d.min(-1)


def ref_distance(fg: np.ndarray, distance: str, spacing=(1.0, 1.0)) -> np.ndarray:
    """Distance of every pixel of a 2-D map to its nearest foreground pixel (inf if none): SciPy's
    EDT / chamfer transforms, or :func:`brute_force_distance` where SciPy has no anisotropic spacing."""
    fg = fg.astype(bool)
    if not fg.any():
        return np.full(fg.shape, np.inf)
    sy, sx = spacing
    if distance == "euclidean":
        return ndi.distance_transform_edt(~fg, sampling=spacing)
    if sy == sx:
        metric = "taxicab" if distance == "manhattan" else "chessboard"
        return ndi.distance_transform_cdt(~fg, metric=metric).astype(float) * sy
    return brute_force_distance(fg, distance, spacing)


def ref_sdm(pos: np.ndarray, distance: str = "euclidean", spacing=(1.0, 1.0)) -> np.ndarray:
    """Kervadec et al.'s (boundary loss) signed distance map of one binary 2-D mask:
    neg·edt(neg) − (edt(pos) − 1)·pos in SciPy's convention; 0 everywhere if the mask has no edge."""
    pos = pos.astype(bool)
    if not pos.any() or pos.all():
        return np.zeros(pos.shape)
    neg = ~pos
    # SciPy's edt(x): distance of nonzero pixels of x to the nearest zero = ref_distance(~x).
    return neg * ref_distance(pos, distance, spacing) - (ref_distance(neg, distance, spacing) - 1) * pos


def brute_force_surface_distances(pred_mask: np.ndarray, target_mask: np.ndarray,
                                  spacing=(1.0, 1.0)) -> dict[str, float]:
    """ASD, AD, HD95 and D95 from all-pairs distances between the SciPy-eroded edges of two
    non-empty 2-D masks."""
    ep = np.argwhere(pred_mask ^ ndi.binary_erosion(pred_mask)) * np.asarray(spacing)
    eg = np.argwhere(target_mask ^ ndi.binary_erosion(target_mask)) * np.asarray(spacing)
    d = np.sqrt(((ep[:, None, :] - eg[None, :, :]) ** 2).sum(-1))
    pg, gp = d.min(1), d.min(0)
    return {
        "ASD": np.concatenate([pg, gp]).mean(),
        "AD": pg.mean(),
        "HD95": max(np.percentile(pg, 95), np.percentile(gp, 95)),
        "D95": np.percentile(pg, 95),
    }


# ----------------------------------------------------------------------------- threads


@contextmanager
def torch_threads(n: int):
    """Run the block on ``n`` torch threads. For tiny tensors thread hand-offs cost more than the
    work, and on a busy machine far more (a tiny 2-epoch run: under a second on one thread, over ten
    on two threads of two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


# ----------------------------------------------------------------------------- devices


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip on a machine without a CUDA device (``bench/gpu_check.sh`` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh runs these on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- the command line

#: The repository root, where main.py runs.
ROOT = Path(__file__).resolve().parents[1]

#: The ISBI-2012 EM data (30 images of 512² and their membrane masks), where it is checked out beside
#: the repository; the tests that use it skip without it (the EM-like stand-in below runs everywhere).
ISBI = ROOT.parent / "shared" / "data" / "isbi2012"
#: Why the real-data tests skip in a clone without it.
ISBI_MISSING = (f"ISBI 2012 data not found at {ISBI} (python -m utils.isbi2012 writes it from the challenge's "
                "stacks); the EM-like stand-in runs instead")


def em_like_stacks(count: int, size: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in for the ISBI 2012 training stacks: ``count`` EM-like slices ``(count, size, size)``
    uint8 and their labels (255 = cell, 0 = membrane), as ``train-volume.tif`` and
    ``train-labels.tif`` hold them.

    Cells are the Voronoi regions of random seeds (about 40 px across); membranes are their 2-3 px
    borders, dark on lighter, textured cell interiors, blurred and noisy as a TEM slice.
    """
    import cv2

    rng = np.random.default_rng(seed)
    volume = np.empty((count, size, size), np.uint8)
    labels = np.empty((count, size, size), np.uint8)
    for n in range(count):
        seeds = np.ones((size, size), np.uint8)
        points = rng.integers(0, size, (max(4, size * size // 1600), 2))
        seeds[points[:, 0], points[:, 1]] = 0
        _, cells = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
        edge = np.zeros((size, size), bool)
        edge[:-1] |= cells[:-1] != cells[1:]
        edge[:, :-1] |= cells[:, :-1] != cells[:, 1:]
        membrane = ndi.binary_dilation(edge, iterations=int(rng.integers(1, 3)))
        shade = rng.uniform(0.55, 0.8, cells.max() + 1)[cells]  # each cell its own gray
        scene = np.where(membrane, 0.2, shade) + ndi.gaussian_filter(rng.normal(0, 0.08, (size, size)), 2)
        scene = ndi.gaussian_filter(scene, 1.0) + rng.normal(0, 0.04, (size, size))
        volume[n] = np.clip(np.rint(scene * 255), 0, 255)
        labels[n] = np.where(membrane, 0, 255)
    return volume, labels


@pytest.fixture(scope="session")
def isbi_like(tmp_path_factory) -> Path:
    """A DATASET_DIR folder of 5 EM-like 512² slices (:func:`em_like_stacks`), made the user's way:
    the stacks written as multi-page TIFFs and converted by ``python -m utils.isbi2012``."""
    import tifffile

    from utils.isbi2012 import main as convert_main

    root = tmp_path_factory.mktemp("isbi_like")
    volume, labels = em_like_stacks(5)
    tifffile.imwrite(root / "train-volume.tif", volume)
    tifffile.imwrite(root / "train-labels.tif", labels)
    assert convert_main([str(root / "train-volume.tif"), str(root / "train-labels.tif"), str(root / "isbi")]) == 0
    return root / "isbi"


@pytest.fixture(params=["em_like", "real"])
def isbi_folder(request) -> Path:
    """The ISBI 2012 folder layout twice: the EM-like stand-in (:func:`isbi_like`, every clone) and the
    real data (:data:`ISBI`; skipped, with the reason, where it is not checked out)."""
    if request.param == "em_like":
        return request.getfixturevalue("isbi_like")
    if not ISBI.is_dir():
        pytest.skip(ISBI_MISSING)
    return ISBI

#: A command-line run that trains in seconds: 3 training images of 128² (tiles of 64²), 1 test image,
#: a 3-level U-Net 8 maps wide, no loader workers.
TINY = ["SYNTHETIC_IMAGES=4", "SYNTHETIC_SIZE=128", "INPUT_SIZE=64", "UNET_DEPTH=3", "CONV_DEPTH=8",
        "BATCH_SIZE=4", "WARMUP_EPOCHS=0", "BASE_LR=0.01", "TEST_SPLIT=0.25", "NUM_WORKERS=0"]

#: The environment of a main.py run in a test.
CLI_ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def cli_command(*args) -> list[str]:
    """``python main.py *args`` on the CPU unless ``args`` name the GPUs: our users have GPUs, and
    main.py takes every visible one by default, so a test that means the CPU says so (``GPUs=[]``)."""
    pin = [] if any(a.startswith("GPUs=") for a in args) else ["GPUs=[]"]
    return [sys.executable, "main.py", *args, *pin]


def run_cli(*args, check=True, timeout=300):
    """Run :func:`cli_command` ``(*args)`` in the repository root; with ``check``, a non-zero exit fails the test."""
    proc = subprocess.run(cli_command(*args), cwd=ROOT, env=CLI_ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def eval_summary(proc) -> Path:
    """The summary JSON an ``eval`` says it wrote (``evaluated ... -> <path>``)."""
    return Path(re.search(r"^evaluated .* -> (\S+)$", proc.stdout, re.MULTILINE).group(1))


# ----------------------------------------------------------------------------- a trainer in this process

#: The in-process tiny run: :data:`TINY`'s data and network, 2 epochs, the default BASE_LR and workers.
TINY_TRAINER = ["SYNTHETIC_IMAGES=4", "SYNTHETIC_SIZE=128", "INPUT_SIZE=64", "UNET_DEPTH=3", "CONV_DEPTH=8",
                "BATCH_SIZE=4", "WARMUP_EPOCHS=0", "TRAIN_EPOCHS=2", "TEST_SPLIT=0.25"]


def tiny_config(results_dir, *overrides: str):
    """The :data:`TINY_TRAINER` configuration with its results under ``results_dir``."""
    from configs import load_config

    return load_config(None, [*TINY_TRAINER, f"RESULTS_DIR={results_dir}", *overrides])


def make_trainer(cfg, run):
    """What ``engines.train.train_fold`` builds for fold 0 of ``cfg`` in the run folder ``run`` (a
    :class:`utils.run_paths.RunDir`), in this process on the CPU."""
    from engines.builders import build_data, build_runtime, build_trainer
    from utils.util import DistContext, seed_everything

    seed_everything(cfg.SEED)
    splits = build_data(cfg, run.split, fold=0)
    with torch_threads(1):  # the runtime sets a launched rank's threads: keep the test's one thread
        runtime = build_runtime(cfg, DistContext())
    return build_trainer(cfg, DistContext(), runtime, run, splits, fold=0)


@pytest.fixture
def trainers(tmp_path):
    """``trainers(*overrides, run=None)``: a trainer of :func:`tiny_config` in ``tmp_path`` (run folder
    ``tmp_path/run`` unless given, made if missing); its logger is closed after the test."""
    from utils.run_paths import RunDir

    made = []

    def make(*overrides: str, run=None):
        run = run or RunDir(tmp_path / "run")
        run.root.mkdir(parents=True, exist_ok=True)
        made.append(make_trainer(tiny_config(tmp_path, *overrides), run))
        return made[-1]

    yield make
    for trainer in made:
        trainer.logger.close()


def log_epochs(run) -> list[int]:
    """The epochs of the lines of ``run``'s log.jsonl, in order."""
    return [json.loads(line)["epoch"] for line in run.log.read_text().splitlines()]


def fit_epochs(trainer, epochs: int):
    """Fit until ``epochs`` epochs are done (the run's TRAIN_EPOCHS may be larger)."""
    full, trainer.settings.epochs = trainer.settings.epochs, epochs
    trainer.fit()
    trainer.settings.epochs = full


# ----------------------------------------------------------------------------- checkpoints


def write_checkpoint(path: Path, cfg, net=None, *, epoch: int = 0, split=None) -> Path:
    """Write ``path`` with :func:`engines.checkpoint.save_checkpoint`, the writer training uses: ``net``
    (default: the untrained network ``cfg`` builds), ``cfg``'s loss, a fresh optimiser, schedule and
    (disabled) scaler, no history, fold 0 and ``split``. Tests that need an odd file (bare weights, a
    damaged or old file) write that themselves.

    Returns:
        ``path``.
    """
    from engines.builders import build_loss, build_network
    from engines.checkpoint import head_is_trained, save_checkpoint

    net = build_network(cfg)[0] if net is None else net
    optimizer = torch.optim.AdamW(net.parameters())
    save_checkpoint(path, epoch=epoch, net=net, loss=build_loss(cfg), optimizer=optimizer,
                    scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                    scaler=torch.amp.GradScaler("cpu", enabled=False),
                    best={"metric": cfg.EVAL_METRIC, "value": 0.0, "epoch": epoch}, history=[],
                    config=cfg.to_dict(), fold=0, split=split, head_trained=head_is_trained(cfg, None))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The ``best.pth`` of a tiny untrained AuxNet-EDC (a 3-level U-Net 4 maps wide) in fp32, without a
    split, as training writes it."""
    from configs import load_config

    cfg = load_config(None, ["INPUT_SIZE=64", "UNET_DEPTH=3", "CONV_DEPTH=4", "MIXED_PRECISION=none",
                             "CHANNELS_LAST=false"])
    torch.manual_seed(0)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pth", cfg)


def nan_checkpoint(checkpoint: Path, path: Path) -> str:
    """Write ``checkpoint`` to ``path`` with NaN in one BatchNorm statistic; returns that weight's name."""
    import torch

    state = torch.load(checkpoint, weights_only=True)
    key = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][key][0] = float("nan")
    torch.save(state, path)
    return key


def predict_config(weights: Path, *overrides: str):
    """``main.py predict MODEL_WEIGHTS=weights *overrides`` on the CPU (``GPUs=[]``: predict takes a
    visible GPU), read as predict reads it: an :class:`engines.inference.Inference` (configuration,
    network, gating ability, split)."""
    from configs import load_config
    from engines.inference import load_for_inference

    args = [f"MODEL_WEIGHTS={weights}", "GPUs=[]", *overrides]
    return load_for_inference(load_config(None, args), args, "predict")
