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
        eval_<ckpt>.csv    ``eval``: one row per test tile
        eval_<ckpt>.json   ``eval``: the summary
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


def eval_outputs(checkpoint: Path) -> tuple[Path, Path]:
    """(per-tile CSV, summary JSON) that ``eval`` writes beside ``checkpoint``."""
    return checkpoint.with_name(f"eval_{checkpoint.stem}.csv"), checkpoint.with_name(f"eval_{checkpoint.stem}.json")


def next_run_id(exp_dir: Path) -> str:
    """``run_NNN`` one above the highest existing index in ``exp_dir``."""
    taken = [int(m.group(1)) for p in exp_dir.glob("run_*") if (m := re.fullmatch(r"run_(\d+)", p.name))]
    return f"run_{max(taken, default=0) + 1:03d}"


def run_dir_for(results_dir: str, exp_id: str, run_id: str) -> RunDir:
    """``RESULTS_DIR/<EXP_ID>/<RUN_ID>``; an empty EXP_ID is ``default``, an empty RUN_ID the next free one."""
    exp_dir = Path(results_dir) / (exp_id or "default")
    return RunDir(exp_dir / (run_id or next_run_id(exp_dir)))
