"""The files of a run, named in one place.

::

    RESULTS_DIR/<EXP_ID>/<RUN_ID>/
        config.yaml        the resolved configuration
        tts.json           the train/test split (every fold)
        cv_summary.json    CROSS_VALIDATION: mean and std over folds
        fold_<k>/          CROSS_VALIDATION: one folder per fold holding the files below
        log.jsonl          one line per epoch
        last.pth, best.pth checkpoints
        summary.json       best and final epoch
        eval_<ckpt>.json   ``eval``: the summary, with the settings that produced it
        eval_<ckpt>.csv    ``eval``: one row per test tile
        eval_<ckpt>_images.csv  ``eval``: one row per whole test image
        eval_<ckpt>_<n>.*  ``eval``: the n-th eval of the checkpoint with other settings (n >= 2)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder (or of one fold's folder under CROSS_VALIDATION)."""

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
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "last.pth"

    @property
    def best(self) -> Path:
        return self.root / "best.pth"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def fold(self, k: int, cross_validation: bool) -> "RunDir":
        """Where fold ``k`` keeps its log, checkpoints and summary."""
        return RunDir(self.root / f"fold_{k}") if cross_validation else self

    def has_checkpoints(self) -> bool:
        return any(self.root.rglob("*.pth"))


@dataclass(frozen=True)
class EvalFiles:
    """The files of one ``eval`` of a checkpoint: its summary (which records the settings) and two tables."""

    summary: Path  # the summary JSON
    tiles: Path  # one row per test tile
    images: Path  # one row per whole test image (and prediction mode)

    def all(self) -> tuple[Path, Path, Path]:
        return self.summary, self.tiles, self.images


def eval_outputs(checkpoint: Path, n: int = 1) -> EvalFiles:
    """The files of the ``n``-th eval of ``checkpoint`` (counting only evals with different
    settings), beside it: ``eval_<stem>.json`` / ``.csv`` / ``_images.csv`` for n = 1,
    ``eval_<stem>_<n>.json`` / ``.csv`` / ``_images.csv`` for n >= 2."""
    if n < 1:
        raise ValueError(f"eval index {n} must be >= 1")
    base = f"eval_{checkpoint.stem}" + (f"_{n}" if n > 1 else "")
    return EvalFiles(checkpoint.with_name(f"{base}.json"), checkpoint.with_name(f"{base}.csv"),
                     checkpoint.with_name(f"{base}_images.csv"))


def next_run_id(exp_dir: Path) -> str:
    """``run_NNN`` one above the highest existing index in ``exp_dir``."""
    taken = [int(m.group(1)) for p in exp_dir.glob("run_*") if (m := re.fullmatch(r"run_(\d+)", p.name))]
    return f"run_{max(taken, default=0) + 1:03d}"


def run_dir_for(results_dir: str, exp_id: str, run_id: str) -> RunDir:
    """``RESULTS_DIR/<EXP_ID>/<RUN_ID>``; an empty EXP_ID is ``default``, an empty RUN_ID the next free one."""
    exp_dir = Path(results_dir) / (exp_id or "default")
    return RunDir(exp_dir / (run_id or next_run_id(exp_dir)))
