"""The files of a run, and of a checkpoint's folder, named in one place.

::

    RESULTS_DIR/
        .cache/                the data cache shared by every run (:func:`cache_dir`)
        <EXP_ID>/<RUN_ID>/     one run (:class:`RunDir`)
            config.yaml        the resolved configuration
            tts.json           the train/test split (every fold)
            cv_summary.json    CROSS_VALIDATION: mean and std over folds
            fold_<k>/          CROSS_VALIDATION: one folder per fold holding the files below
            .lock              held by the process training in the folder
            log.jsonl          one line per epoch
            wandb_id.txt       the W&B run id (LOG_WANDB), so a resumed run continues it
            curves.png, overlays.png   the training curves and a few test tiles
            last.pth, best.pth checkpoints
            summary.json       best and final epoch
            eval_<ckpt>.json   ``eval``: the summary, with the settings that produced it
            eval_<ckpt>.csv    ``eval``: one row per test tile
            eval_<ckpt>_images.csv  ``eval``: one row per whole test image
            eval_<ckpt>_<n>.*  ``eval``: the n-th eval of the checkpoint with other settings (n >= 2)
            predict_<n>/       ``predict`` without OUTPUT: the n-th prediction folder

``eval`` and ``predict`` write beside the checkpoint, wherever it was copied: their folder is the
checkpoint's (``RunDir(checkpoint.parent)``), which is a run folder only when the checkpoint still
lies in one. This module imports nothing but the standard library, so that the configuration
(which checks MODEL_WEIGHTS) and the engines both name paths through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: The suffix of a checkpoint file (MODEL_WEIGHTS may omit it).
CHECKPOINT_SUFFIX = ".pth"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder (or of one fold's folder under CROSS_VALIDATION, or of the
    folder a checkpoint lies in)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def split(self) -> Path:
        return self.root / "tts.json"

    @property
    def cv_summary(self) -> Path:
        return self.root / "cv_summary.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb_id.txt"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def overlays(self) -> Path:
        return self.root / "overlays.png"

    @property
    def last(self) -> Path:
        return self.root / f"last{CHECKPOINT_SUFFIX}"

    @property
    def best(self) -> Path:
        return self.root / f"best{CHECKPOINT_SUFFIX}"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def fold(self, k: int, cross_validation: bool) -> "RunDir":
        """Where fold ``k`` keeps its log, checkpoints and summary."""
        return RunDir(self.root / f"fold_{k}") if cross_validation else self

    def has_checkpoints(self) -> bool:
        return any(self.root.rglob(f"*{CHECKPOINT_SUFFIX}"))

    def checkpoints(self) -> list[Path]:
        """The run's checkpoints that exist: ``best.pth``, ``last.pth`` (in that order)."""
        return [p for p in (self.best, self.last) if p.is_file()]

    def eval_files(self, checkpoint: str, n: int = 1) -> "EvalFiles":
        """The files of the ``n``-th eval of the checkpoint named ``checkpoint`` (its stem, e.g. ``best``)
        (counting only evals with different settings): ``eval_<stem>.json`` / ``.csv`` /
        ``_images.csv`` for n = 1, ``eval_<stem>_<n>.json`` / ``.csv`` / ``_images.csv`` for n >= 2."""
        if n < 1:
            raise ValueError(f"eval index {n} must be >= 1")
        base = self.root / (f"eval_{checkpoint}" + (f"_{n}" if n > 1 else ""))
        return EvalFiles(base.with_name(f"{base.name}.json"), base.with_name(f"{base.name}.csv"),
                         base.with_name(f"{base.name}_images.csv"))

    def next_predictions(self) -> Path:
        """``predict_<n>/`` one above the highest existing index (``predict`` without OUTPUT)."""
        return self.root / f"predict_{_next_index(self.root, 'predict_')}"


@dataclass(frozen=True)
class EvalFiles:
    """The files of one ``eval`` of a checkpoint: its summary (which records the settings) and two tables."""

    summary: Path  # the summary JSON
    tiles: Path  # one row per test tile
    images: Path  # one row per whole test image (and prediction mode)

    def all(self) -> tuple[Path, Path, Path]:
        return self.summary, self.tiles, self.images


def eval_outputs(checkpoint: Path, n: int = 1) -> EvalFiles:
    """The files of the ``n``-th eval of ``checkpoint``, beside it (see :meth:`RunDir.eval_files`)."""
    return RunDir(checkpoint.parent).eval_files(checkpoint.stem, n)


def _next_index(folder: Path, prefix: str) -> int:
    """One above the highest ``n`` of the entries ``<prefix><n>`` in ``folder`` (1 when there is none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    taken = [int(m.group(1)) for p in folder.glob(f"{prefix}*") if (m := pattern.fullmatch(p.name))]
    return max(taken, default=0) + 1


def next_run_id(exp_dir: Path) -> str:
    """``run_NNN`` one above the highest existing index in ``exp_dir``."""
    return f"run_{_next_index(exp_dir, 'run_'):03d}"


def run_dir_for(results_dir: str, exp_id: str, run_id: str) -> RunDir:
    """``RESULTS_DIR/<EXP_ID>/<RUN_ID>``; an empty EXP_ID is ``default``, an empty RUN_ID the next free one."""
    exp_dir = Path(results_dir) / (exp_id or "default")
    return RunDir(exp_dir / (run_id or next_run_id(exp_dir)))


def cache_dir(results_dir: str) -> Path:
    """``RESULTS_DIR/.cache``: the data cache (decoded images, whole-image distance maps) every run shares."""
    return Path(results_dir) / ".cache"


def resolve_weights_path(name: str) -> Optional[Path]:
    """The checkpoint file MODEL_WEIGHTS names (``.pth`` may be omitted), or None if absent."""
    for candidate in (Path(name), Path(name + CHECKPOINT_SUFFIX)):
        if candidate.is_file():
            return candidate
    return None
