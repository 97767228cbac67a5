"""Reproduce the published results (docs/results.md): every experiment is a config file and one command.

Each experiment is ``configs/experiments/<NAME>.yaml`` (a plain configuration: ``python main.py
--config configs/experiments/<NAME>.yaml`` trains it) plus one entry of :data:`EXPERIMENTS` here
saying what the run needs around it: the table it belongs to, its seeds, a fixed test split, and
for a second training stage the experiment whose weights it starts from. For each experiment and
seed this script

1. generates the dataset the config's DATASET_DIR names, when it is one of the generated datasets
   (:data:`bench.folder_datasets.FOLDER_DATASETS`) and missing (deterministic, data seed 0);
2. writes the run's ``tts.json`` with the experiment's test images as fold 0 (the split is
   then reused by ``main.py`` as any existing split is);
3. runs ``python main.py --config <file> SEED=<seed> RUN_ID=seed<seed> [...]`` in
   ``RESULTS_DIR/<EXP_ID>/seed<seed>/`` and records the command, its wall time, the commit and
   the machine in ``reproduce.json`` beside the run's ``summary.json``;

then writes the results tables (markdown) from the runs' summary files and prints them: to
``docs/results.md`` for the real experiments (a table with runs on disk is replaced, every other is
kept as published), to ``RESULTS_DIR/results.md`` for a smoke run, a shortened ``--epochs`` run or
another ``--results-dir``. A finished run (``summary.json`` and ``reproduce.json`` present, made by
the same command from the same version of the config file) is reused, not retrained, unless
``--force``; any other is deleted and started again, so every wall time is one uninterrupted run of
the current configuration.

Every metric in the tables is the final epoch's model (``SAVE_MODEL: false`` in the experiment
configs: nothing is selected on the test split) scored on the test split's *whole images*
(``summary.json``'s ``whole_image`` entry: sliding-window prediction, half-tile overlap), except
TTR, the tile classifier's accuracy on the test tiles at the final epoch.

Usage:
    python bench/reproduce.py --list                 # the experiments and their tables
    python bench/reproduce.py --dry-run isbi2012     # print the commands only
    python bench/reproduce.py isbi2012 lines_ellipses
    python bench/reproduce.py --tables-only          # rewrite docs/results.md from the runs on disk
    python bench/reproduce.py --epochs 1 --seeds 42 --results-dir /tmp/r smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.image_io import file_digest  # noqa: E402
from utils.isbi2012 import SOURCE as ISBI_SOURCE, TERMS as ISBI_TERMS  # noqa: E402
from bench.folder_datasets import FOLDER_DATASETS, ensure_folder_dataset  # noqa: E402
from utils.splits import num_folds  # noqa: E402
from utils.util import atomic_write_json, atomic_write_text, cpu_threads  # noqa: E402

CONFIG_DIR = ROOT / "configs" / "experiments"
#: The seed every generated dataset is drawn from (the training SEED varies, the data does not).
DATA_SEED = 0
MULTI_SEEDS = (42, 1, 2)


@dataclass(frozen=True)
class Experiment:
    """What a run of ``configs/experiments/<name>.yaml`` needs around ``main.py``.

    Attributes:
        table: the results table it is a row of (a key of :data:`TABLES`).
        label: the row's name.
        seeds: the seeds it runs with by default (three where a spread matters).
        test_ids: image ids (file stems) of the fixed test split, written as fold 0 of
            ``tts.json``; ``None`` = ``main.py``'s seeded split.
        after: an experiment whose run (same seed) must finish first; its ``last.pth`` becomes
            this one's MODEL_WEIGHTS (a second training stage).
    """

    table: str
    label: str
    seeds: tuple[int, ...] = (42,)
    test_ids: Optional[tuple[str, ...]] = None
    after: Optional[str] = None


ISBI_TEST = ("27", "28", "29")  # the published U-Net's protocol: train on 0-26, test on slices 27-29
LINES_TEST = tuple(f"{n:03d}" for n in range(50, 60))  # 10 of the 60 generated images
HARD_TEST = tuple(f"{n:03d}" for n in range(9, 24))  # 15 of the 24 generated scenes; 000-008 train

#: Every experiment; the name is its config file's stem.
EXPERIMENTS: dict[str, Experiment] = {
    "isbi2012": Experiment("isbi2012", "SoftDICE_BCE (region losses only)", MULTI_SEEDS, ISBI_TEST),
    "isbi2012_wce": Experiment("isbi2012", "SoftDICE_wCE (U-Net weight map)", MULTI_SEEDS, ISBI_TEST),
    "isbi2012_boundary": Experiment("isbi2012", "SoftDICE_BCE_Boundary, α schedule", MULTI_SEEDS, ISBI_TEST),
    "isbi2012_smae": Experiment("isbi2012", "SoftDICE_BCE_sMAE", MULTI_SEEDS, ISBI_TEST),
    "lines_ellipses": Experiment("lines_ellipses", "AuxNet-EDC, CE_SoftDICE, 3 classes", test_ids=LINES_TEST),
    "lines_ellipses_60": Experiment("lines_ellipses", "the same, 60 epochs (over the 15-min budget here)",
                                    test_ids=LINES_TEST),
    "hard_dice_bce": Experiment("hard_boundaries", "SoftDICE_BCE", MULTI_SEEDS, HARD_TEST),
    "hard_boundary": Experiment("hard_boundaries", "SoftDICE_BCE_Boundary, α schedule", MULTI_SEEDS, HARD_TEST),
    "hard_boundary_image": Experiment("hard_boundaries", "SoftDICE_BCE_Boundary, α schedule, whole-scene distances",
                                      MULTI_SEEDS, HARD_TEST),
    "hard_cldice_boundary_image": Experiment(
        "hard_boundaries", "SoftDICE_BCE_clDice_Boundary, α schedule, whole-scene distances", MULTI_SEEDS, HARD_TEST),
    "hard_smae": Experiment("hard_boundaries", "SoftDICE_BCE_sMAE", MULTI_SEEDS, HARD_TEST),
    "hard_cmae": Experiment("hard_boundaries", "SoftDICE_BCE_cMAE", MULTI_SEEDS, HARD_TEST),
    "hard_wbce": Experiment("hard_boundaries", "SoftDICE_wBCE", MULTI_SEEDS, HARD_TEST),
    "hard_cldice": Experiment("hard_boundaries", "SoftDICE_BCE_clDice (centreline Dice)", MULTI_SEEDS, HARD_TEST),
    "hard_adaptive": Experiment("hard_boundaries", "SoftDICE_BCE_Boundary, learnable weights", MULTI_SEEDS,
                                HARD_TEST),
    "staged_ed": Experiment("staged", "stage 1: AuxNet-ED", test_ids=HARD_TEST),
    "staged_c": Experiment("staged", "stage 2: AuxNet-C on stage 1", test_ids=HARD_TEST, after="staged_ed"),
    "smoke": Experiment("smoke", "pipeline check (tiny data, not a result)", test_ids=("002", "003")),
}

#: Each table: its title, the experiments of its rows (in order), and a sentence under it.
TABLES: dict[str, dict] = {
    "isbi2012": {
        "title": "ISBI 2012 EM: 27 training slices, test slices 27-29, whole images",
        "rows": ["isbi2012", "isbi2012_wce", "isbi2012_boundary", "isbi2012_smae"],
        "note": "Published PyTorch U-Net on the same split: IoU 0.758 (non-standard IoU function), pixel "
                "accuracy 90.87 %. IoU per class (membrane = class 0, cell = class 1) and their mean; HD95 and "
                "ASD of the membrane class in pixels; mean over the 3 test slices, then mean ± std over the seeds listed "
                "(final epoch).",
    },
    "lines_ellipses": {
        "title": "Lines and ellipses, 3 classes: 400x200 images, 96-px tiles, 50 %-overlap prediction",
        "rows": ["lines_ellipses", "lines_ellipses_60"],
        "note": "Published multi-class U-Net: mean IoU 0.97 on full images. Mean IoU over background, lines "
                "and ellipses on the 10 full test images; the images are drawn as the published generator draws "
                "them (flat objects on a noisy background, lines over ellipses: bench/folder_datasets.py, version 2). "
                "Trained with flips and quarter turns; prediction averages the 8 flips and turns of each window "
                "(TTA d4).",
    },
    "hard_boundaries": {
        "title": "Hard boundaries (thin, touching, low-contrast structures in sparse 768² scenes), equal epochs",
        "rows": ["hard_dice_bce", "hard_boundary", "hard_boundary_image", "hard_smae", "hard_cmae", "hard_wbce",
                 "hard_adaptive", "hard_cldice", "hard_cldice_boundary_image"],
        "note": "Mean ± std over the seeds listed (whole test scenes, final epoch; HD95 and ASD are the mean "
                "over the 15 scenes). ΔHD95 and ΔHD95 gated are relative to SoftDICE_BCE's ungated mean; a "
                "change counts as beyond seed noise when it exceeds both std summed. 'gated': the head's "
                "gated prediction (windows it calls boundary-free are filled, not decoded).",
    },
    "staged": {
        "title": "Staged (AuxNet-ED, then AuxNet-C) against joint (AuxNet-EDC) training on the hard-boundary task",
        "rows": ["hard_dice_bce", "staged_ed", "staged_c"],
        "note": "Seed 42. 'gated off' is the fraction of prediction windows the head sent to the fill head "
                "instead of the decoder; prediction seconds are summed over the 15 test scenes.",
    },
    "smoke": {"title": "Smoke run (tiny data; checks the pipeline, not a result)", "rows": ["smoke"], "note": ""},
}


# ------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Options:
    """What the command line changes for every run."""

    results_dir: Optional[str] = None  # None: the config's RESULTS_DIR
    data_root: Optional[str] = None  # None: the config's DATASET_DIR
    epochs: Optional[int] = None  # None: the config's epochs; else TRAIN_EPOCHS=epochs, no warm-up
    force: bool = False


def read_experiment(name: str) -> dict:
    """The raw YAML of ``configs/experiments/<name>.yaml``."""
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}


def run_id(seed: int, opts: Options) -> str:
    """``seed<seed>``, plus ``_e<epochs>`` for a shortened run (never mistaken for a full one)."""
    return f"seed{seed}" + (f"_e{opts.epochs}" if opts.epochs is not None else "")


def run_folder(name: str, seed: int, opts: Options) -> Path:
    raw = read_experiment(name)
    results = opts.results_dir or raw.get("RESULTS_DIR", "saved")
    return ROOT / results / (raw.get("EXP_ID") or name) / run_id(seed, opts)


def dataset_dir(name: str, opts: Options) -> tuple[str, Optional[str]]:
    """(DATASET_DIR to use, the generated dataset's name or None)."""
    given = str(read_experiment(name).get("DATASET_DIR", "synthetic"))
    generated = Path(given).name if Path(given).name in FOLDER_DATASETS else None
    if generated and opts.data_root:
        return str(Path(opts.data_root) / generated), generated
    return given, generated


def command(name: str, seed: int, opts: Options) -> list[str]:
    """The ``main.py`` command line of one run (relative paths: it runs in the repository root)."""
    cmd = ["python", "main.py", "--config", f"configs/experiments/{name}.yaml", f"SEED={seed}",
           f"RUN_ID={run_id(seed, opts)}"]
    if opts.results_dir:
        cmd.append(f"RESULTS_DIR={opts.results_dir}")
    if opts.data_root and dataset_dir(name, opts)[1]:
        cmd.append(f"DATASET_DIR={dataset_dir(name, opts)[0]}")
    if opts.epochs is not None:
        cmd += [f"TRAIN_EPOCHS={opts.epochs}", "WARMUP_EPOCHS=0"]
    after = EXPERIMENTS[name].after
    if after:
        weights = run_folder(after, seed, opts) / "last.pth"
        cmd.append(f"MODEL_WEIGHTS={os.path.relpath(weights, ROOT)}")
    return cmd


def write_split(folder: Path, name: str, seed: int, opts: Options) -> None:
    """``tts.json`` with the experiment's test images as fold 0 (see :func:`write_fixed_split`)."""
    test = list(EXPERIMENTS[name].test_ids or ())
    data_dir, _ = dataset_dir(name, opts)
    k = num_folds(float(read_experiment(name).get("TEST_SPLIT", 0.2)))
    try:
        write_fixed_split(folder, ROOT / data_dir / "images", test, k, seed)
    except ValueError as err:
        raise SystemExit(f"{name}: {err}") from None


def write_fixed_split(folder: Path, images_dir: Path, test: list[str], num_folds: int, seed: int) -> None:
    """``folder/tts.json`` with the images ``test`` (file stems) as fold 0 and the other images of
    ``images_dir`` in the other ``num_folds - 1`` folds, in the format of :mod:`utils.splits`; ``main.py``
    then trains fold 0 of it as it reuses any existing split.

    Raises:
        ValueError: a test image is not in ``images_dir``.
    """
    images_dir = Path(images_dir).resolve()
    files = {p.stem: p for p in images_dir.iterdir() if not p.name.startswith(".")}
    ids = sorted(files)
    missing = sorted(set(test) - set(ids))
    if missing:
        raise ValueError(f"test images {missing} are not in {images_dir}")
    rest = [i for i in ids if i not in test]
    folds = [list(test)] + [sorted(map(str, part))
                            for part in np.array_split(np.array(rest, dtype=object), num_folds - 1)]
    atomic_write_json(folder / "tts.json", {
        "source": str(images_dir.parent), "seed": seed, "num_folds": num_folds, "cross_validation": False,
        "images": ids, "folds": [{"test": f} for f in folds], "hashes": {i: file_digest(files[i]) for i in ids},
    })


def missing_data(names: list[str], opts: Options) -> list[str]:
    """One message per dataset folder that ``names`` read and that is not there (generated datasets
    are made when needed, so only the ones a user brings can be missing): where it should be, where it
    comes from, and the command that puts it there."""
    folders: dict[str, list[str]] = {}
    for name in names:
        data_dir, generated = dataset_dir(name, opts)
        if not generated and data_dir != "synthetic" and not (ROOT / data_dir / "images").is_dir():
            folders.setdefault(data_dir, []).append(name)
    messages = []
    for data_dir, users in folders.items():
        where = (f"{(ROOT / data_dir).resolve()} (DATASET_DIR: {data_dir} of "
                 f"{', '.join(f'configs/experiments/{u}.yaml' for u in users)})")
        if Path(data_dir).name == "isbi2012":
            messages.append(f"the ISBI 2012 data is not at {where}.\n  It is {ISBI_SOURCE}; terms: {ISBI_TERMS}.\n"
                            f"  Put it there with (in the repository root):  python -m utils.isbi2012 train-volume.tif "
                            f"train-labels.tif {data_dir}")
        else:
            messages.append(f"no dataset at {where}: put its images/ and masks/ there")
    return messages


def git_commit() -> str:
    """The commit, with ``+dirty`` when the working tree differs from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> str:
    """CPU model and cores, GPU if any, torch version."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU"
    # The threads a run uses: OMP_NUM_THREADS, else the cores taskset or a container allows.
    return f"{cpu}, {os.cpu_count()} cores ({cpu_threads(1)} thread(s) a run), {gpu}, torch {torch.__version__}"


def config_digest(name: str) -> str:
    """SHA-256 of the experiment's config file: a run made from another version is not reused."""
    return hashlib.sha256((CONFIG_DIR / f"{name}.yaml").read_bytes()).hexdigest()[:16]


def is_current(folder: Path, name: str, cmd: list[str]) -> bool:
    """The run in ``folder`` finished, with this command and this version of the config file."""
    try:
        record = json.loads((folder / "reproduce.json").read_text())
    except (OSError, ValueError):
        return False
    current = ((folder / "summary.json").is_file() and record.get("command") == shlex.join(cmd)
               and record.get("config_sha256") == config_digest(name))
    after = EXPERIMENTS[name].after
    if current and after:  # a second stage is stale once its first stage was trained again
        first = folder.parent.parent / after / folder.name / "reproduce.json"
        current = first.is_file() and first.stat().st_mtime < (folder / "reproduce.json").stat().st_mtime
    return current


def run_one(name: str, seed: int, opts: Options, dry_run: bool) -> Optional[bool]:
    """Train one (experiment, seed); True when it ran, False when it was reused, None on failure."""
    folder = run_folder(name, seed, opts)
    cmd = command(name, seed, opts)
    if dry_run:
        print(shlex.join(cmd))
        return True
    if is_current(folder, name, cmd) and not opts.force:
        print(f"{name} seed {seed}: reusing {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}")
        return False
    after = EXPERIMENTS[name].after
    if after and not (run_folder(after, seed, opts) / "last.pth").is_file():
        print(f"{name} seed {seed}: needs a finished run of {after} (seed {seed}) first", file=sys.stderr)
        return None
    data_dir, generated = dataset_dir(name, opts)
    if generated:
        ensure_folder_dataset(ROOT / data_dir, generated, DATA_SEED)
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished (or --force) run of ours: start it again from nothing
    if EXPERIMENTS[name].test_ids:
        write_split(folder, name, seed, opts)
    print(f"{name} seed {seed}: {shlex.join(cmd)}", flush=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    start = time.perf_counter()
    with open(folder / "reproduce.log", "w") as log:
        done = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not (folder / "summary.json").is_file():
        tail = (folder / "reproduce.log").read_text().strip().splitlines()[-5:]
        print(f"{name} seed {seed}: FAILED (exit {done.returncode}):\n  " + "\n  ".join(tail), file=sys.stderr)
        return None
    atomic_write_json(folder / "reproduce.json", {
        "experiment": name, "seed": seed, "command": shlex.join(cmd), "config_sha256": config_digest(name),
        "wall_s": round(wall, 1),
        "commit": git_commit(), "machine": machine(), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    print(f"{name} seed {seed}: done in {wall / 60:.1f} min", flush=True)
    return True


# ------------------------------------------------------------------------------------ tables


def load_run(name: str, seed: int, opts: Options) -> Optional[dict]:
    """A finished run's summary plus its ``reproduce.json`` record (``run``), or None."""
    folder = run_folder(name, seed, opts)
    try:
        summary = json.loads((folder / "summary.json").read_text())
        summary["run"] = json.loads((folder / "reproduce.json").read_text())
    except (OSError, ValueError):
        return None
    return summary


def _whole(summary: dict, mode: str = "ungated") -> dict:
    return summary.get("whole_image", {}).get(mode, {})


def _fmt(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def _wall(runs: list[dict]) -> str:
    walls = [r["run"]["wall_s"] for r in runs]
    mean = statistics.fmean(walls)
    return f"{mean / 60:.1f} min" + (" each" if len(walls) > 1 else "")


def _command(runs: list[dict], seeds: list[int]) -> str:
    cmd = runs[0]["run"]["command"]
    if len(seeds) > 1:
        cmd = cmd.replace(f"SEED={seeds[0]}", "SEED={" + ",".join(map(str, seeds)) + "}").replace(
            f"RUN_ID=seed{seeds[0]}", "RUN_ID=seed{…}")
    return f"`{cmd}`"


def _epochs(summary: dict) -> int:
    return int(summary["final"]["epoch"]) + 1


def _delta(values: list[float], baseline: Optional[list[float]]) -> str:
    """Relative change of the mean of ``values`` from the mean of ``baseline``, marked "(within
    noise)" unless the difference of the means exceeds the two standard deviations summed."""
    if not values:
        return "–"
    if not baseline:
        return "– (no baseline)"
    mean, base = statistics.fmean(values), statistics.fmean(baseline)
    noise = statistics.pstdev(values) + statistics.pstdev(baseline)
    return f"{100 * (mean - base) / base:+.0f} %" + ("" if abs(mean - base) > noise else " (within noise)")


def table_rows(table: str, opts: Options, seeds_for) -> tuple[list[list[str]], list[dict]]:
    """The body rows of one table (see :data:`TABLES`), and the runs they were made from."""
    rows, used = [], []
    baseline_hd95 = None
    for name in TABLES[table]["rows"]:
        exp = EXPERIMENTS[name]
        seeds = [42] if table == "staged" else seeds_for(name)
        found = [(s, r) for s in seeds if (r := load_run(name, s, opts)) is not None]
        if not found:
            rows.append([f"{exp.label} (`{name}`)", "not run"] + [""] * (len(HEADERS[table]) - 2))
            continue
        seeds_run, runs = [s for s, _ in found], [r for _, r in found]
        used.extend(runs)
        label = f"{exp.label} (`{name}`)"
        if not all(is_current(run_folder(name, s, opts), name, command(name, s, opts)) for s in seeds_run):
            label += " **stale: made from an older config file**"
        ung = [_whole(r) for r in runs]
        gat = [_whole(r, "gated") for r in runs]
        col = lambda key, d=ung: [x[key] for x in d if key in x]  # noqa: E731
        common = [_wall(runs), _command(runs, seeds_run)]
        if table == "isbi2012":
            miou = [(a + b) / 2 for a, b in zip(col("IoU/0"), col("IoU/1"))]
            rows.append([label, f"{len(runs)} ({','.join(map(str, seeds_run))})", str(_epochs(runs[0])),
                         _fmt([100 * v for v in col("ACC")], 2),
                         _fmt(col("IoU/0"), 4), _fmt(col("IoU/1"), 4), _fmt(miou, 4), _fmt(col("DSC/1"), 4),
                         _fmt(col("HD95/0"), 2), _fmt(col("ASD/0"), 2), *common])
        elif table == "lines_ellipses":
            rows.append([label, str(_epochs(runs[0])), _fmt(col("IoU"), 4), _fmt(col("IoU/1"), 4),
                         _fmt(col("IoU/2"), 4), _fmt([100 * v for v in col("ACC")], 2), _fmt(col("IoU", gat), 4),
                         _fmt(col("gated_off_fraction", gat), 2), *common])
        elif table in ("hard_boundaries", "smoke"):
            hd, hd_gated = col("HD95"), col("HD95", gat)
            first = name == TABLES[table]["rows"][0]
            if first:
                baseline_hd95 = hd
            ttr = [r["final"]["TTR"] for r in runs if "TTR" in r["final"]]
            rows.append([label, f"{len(runs)} ({','.join(map(str, seeds_run))})", str(_epochs(runs[0])),
                         _fmt(col("DSC"), 4), _fmt(hd, 2), "–" if first else _delta(hd, baseline_hd95),
                         _fmt(col("ASD"), 2), _fmt(col("DSC", gat), 4), _fmt(hd_gated, 2),
                         _delta(hd_gated, baseline_hd95), _fmt(ttr, 3), *common])
        elif table == "staged":
            ttr = [r["final"]["TTR"] for r in runs if "TTR" in r["final"]]
            rows.append([label if name != "hard_dice_bce" else "joint: AuxNet-EDC (`hard_dice_bce`)",
                         str(_epochs(runs[0])), _fmt(col("DSC"), 4), _fmt(col("HD95"), 2), _fmt(ttr, 3),
                         _fmt(col("seconds"), 1), _fmt(col("DSC", gat), 4), _fmt(col("HD95", gat), 2),
                         _fmt(col("gated_off_fraction", gat), 2), _fmt(col("seconds", gat), 1), *common])
    return rows, used


HEADERS: dict[str, list[str]] = {
    "isbi2012": ["loss", "seeds", "epochs", "pixel acc %", "IoU membrane", "IoU cell", "mean IoU", "Dice cell",
                 "HD95 membrane px", "ASD membrane px", "wall", "command"],
    "lines_ellipses": ["setting", "epochs", "mean IoU", "IoU lines", "IoU ellipses", "pixel acc %",
                       "mean IoU, gated", "gated off", "wall", "command"],
    "hard_boundaries": ["loss", "seeds", "epochs", "Dice", "HD95 px", "ΔHD95", "ASD px", "Dice, gated",
                        "HD95 gated px", "ΔHD95 gated", "TTR", "wall", "command"],
    "staged": ["training", "epochs", "Dice", "HD95 px", "TTR", "predict s", "Dice, gated", "HD95 gated px",
               "gated off", "predict s, gated", "wall", "command"],
}
HEADERS["smoke"] = HEADERS["hard_boundaries"]


#: Where the tables of the real experiments go (the repository's results page).
DOCS_RESULTS = ROOT / "docs" / "results.md"
DOCS_INTRO = (
    "# Results\n\n"
    "Generated by `python bench/reproduce.py` (do not edit: run it again to update a table; `--tables-only` "
    "rewrites them from the runs on disk). Each row is one experiment, `python bench/reproduce.py NAME` (NAME in "
    "the first column): it generates the data if needed, fixes the test split and runs the command shown; wall "
    "time is that command's, per run. Every number is the *final* epoch (`SAVE_MODEL: false`: nothing is "
    "selected on the test split), scored on the test split's whole images (sliding window, half-tile overlap); "
    "TTR is the tile classifier's accuracy on the test tiles. What the tables show, and what was tried: "
    "[experiments.md](experiments.md).\n"
)
TABLE_MARK = "<!-- table: {} -->"


def render_table(table: str, opts: Options, seeds_for) -> str:
    """The markdown of one table, with its note, machine and commit, opened by its marker
    (``<!-- table: NAME -->``, which :func:`merge_tables` finds)."""
    spec = TABLES[table]
    rows, runs = table_rows(table, opts, seeds_for)
    out = [TABLE_MARK.format(table), f"## {spec['title']}\n"]
    if spec["note"]:
        out.append(spec["note"] + "\n")
    if runs:
        machines = sorted({r["run"]["machine"] for r in runs})
        commits = sorted({r["run"]["commit"] for r in runs})
        out.append(f"Machine: {'; '.join(machines)}. Commit: {', '.join(commits)}.\n")
    header = HEADERS[table]
    out.append("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    out.extend("| " + " | ".join(r) + " |" for r in rows)
    out.append("")
    return "\n".join(out)


def render(tables: list[str], opts: Options, seeds_for, intro: str = "") -> str:
    """The markdown of ``tables`` (see :func:`render_table`) after ``intro``."""
    return (intro or "Each row is one experiment, `python bench/reproduce.py NAME` (NAME in the first column): "
            "it generates the data if needed, fixes the test split and runs the command shown; wall time is that "
            "command's, per run.\n") + "\n" + "\n".join(render_table(t, opts, seeds_for) for t in tables)


def split_tables(text: str) -> dict[str, str]:
    """The sections of a results page by table name (each from its marker to the next)."""
    parts: dict[str, str] = {}
    for table in TABLES:
        mark = TABLE_MARK.format(table)
        if mark in text:
            start = text.index(mark)
            ends = [text.index(m, start + 1) for m in (TABLE_MARK.format(t) for t in TABLES) if m in text[start + 1:]]
            parts[table] = text[start:min(ends) if ends else len(text)].rstrip("\n") + "\n"
    return parts


def merge_tables(existing: str, tables: list[str], opts: Options, seeds_for) -> str:
    """docs/results.md: ``tables`` that have finished runs rendered anew, every other table kept as
    ``existing`` has it (a run of one experiment does not remove the others' published tables), in
    :data:`TABLES` order."""
    kept = split_tables(existing)
    # a table without a finished run on disk (a fresh clone's --tables-only) keeps its published rows
    kept.update({t: render_table(t, opts, seeds_for) for t in tables
                 if t not in kept or table_rows(t, opts, seeds_for)[1]})
    return DOCS_INTRO + "\n" + "\n".join(kept[t] for t in TABLES if t in kept)


def results_path(names: list[str], opts: Options) -> Path:
    """Where the tables go: docs/results.md for the real experiments (their own RESULTS_DIR, full epochs,
    no smoke run); ``RESULTS_DIR/results.md`` for a smoke run, a shortened (--epochs) run or another
    --results-dir, so those never reach the repository's results page."""
    if opts.epochs is None and opts.results_dir is None and "smoke" not in names:
        return DOCS_RESULTS
    return ROOT / (opts.results_dir or read_experiment(names[0]).get("RESULTS_DIR", "saved")) / "results.md"


# ------------------------------------------------------------------------------------ command line


def _seeds_last(argv: list[str]) -> list[str]:
    """``argv`` with ``--seeds`` and its numbers moved to the end, so that experiment names after
    the seeds (``--seeds 42 1 2 NAME``) are not read as seeds."""
    if "--seeds" not in argv:
        return list(argv)
    i = argv.index("--seeds")
    j = i + 1
    while j < len(argv) and argv[j].lstrip("-").isdigit():
        j += 1
    return argv[:i] + argv[j:] + argv[i:j]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="experiments to run (default: all but smoke)")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds for every named experiment (default: its own)")
    parser.add_argument("--epochs", type=int, help="TRAIN_EPOCHS for a shortened (smoke) run, no warm-up; "
                                                    "its runs are kept apart (RUN_ID seed<s>_e<epochs>)")
    parser.add_argument("--results-dir", help="RESULTS_DIR for every run (default: the configs', saved/reproduce)")
    parser.add_argument("--data-root", help="where generated datasets go (default: the configs' DATASET_DIR)")
    parser.add_argument("--force", action="store_true", help="retrain runs that already finished")
    parser.add_argument("--tables-only", action="store_true", help="only rewrite the tables from finished runs")
    args = parser.parse_args(_seeds_last(sys.argv[1:] if argv is None else argv))

    if args.list:
        for name, exp in EXPERIMENTS.items():
            after = f", after {exp.after}" if exp.after else ""
            print(f"{name:20s} table {exp.table:16s} seeds {','.join(map(str, exp.seeds)):8s} {exp.label}{after}")
        return 0
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        print(f"error: unknown experiment(s) {unknown}; valid: {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    if args.epochs is not None and args.epochs < 1:
        print("error: --epochs must be >= 1", file=sys.stderr)
        return 2
    opts = Options(args.results_dir, args.data_root, args.epochs, args.force)
    names = args.names or [n for n in EXPERIMENTS if n != "smoke"]

    def seeds_for(name: str) -> list[int]:
        return list(args.seeds) if args.seeds else list(EXPERIMENTS[name].seeds)

    if not (args.tables_only or args.dry_run):
        missing = missing_data(names, opts)
        if missing:
            print("\n".join(f"error: {m}" for m in missing), file=sys.stderr)
            return 2
    failed = []
    if not args.tables_only:
        for name in names:
            for seed in seeds_for(name):
                if run_one(name, seed, opts, args.dry_run) is None:
                    failed.append(f"{name} seed {seed}")
    if args.dry_run:
        return 0
    # The named experiments' tables, and every other table with a finished run: results.md always
    # holds everything measured so far.
    finished = [n for n in EXPERIMENTS if any(load_run(n, s, opts) for s in seeds_for(n))]
    tables = [t for t in TABLES if any(EXPERIMENTS[n].table == t for n in [*names, *finished])]
    path = results_path(names, opts)
    if path == DOCS_RESULTS:
        tables = [t for t in tables if t != "smoke"]
        text = merge_tables(path.read_text() if path.exists() else "", tables, opts, seeds_for)
    else:
        text = render(tables, opts, seeds_for)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    print(text)
    print(f"tables written to {path}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
