"""Train/test splits over *images* (never tiles): K folds drawn from the seed and kept in the run's
``tts.json``, which is reused (and checked against the files on disk) when it exists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.image_io import DatasetError
from utils.util import atomic_write_json


def num_folds(test_split: float) -> int:
    """Number of cross-validation folds, ``round(1 / test_split)``.

    Raises:
        ValueError: ``test_split`` is not in (0, 1).
    """
    if not 0 < test_split < 1:
        raise ValueError(f"test_split={test_split!r} must be in (0, 1)")
    return int(round(1 / test_split))


def make_folds(image_ids: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """Partition image ids into ``k`` folds of near-equal size, shuffled by ``seed``.

    Returns:
        ``k`` sorted lists of ids; fold ``f`` is the test set of fold ``f``.

    Raises:
        ValueError: ``k < 2``.
        DatasetError: fewer ids than folds (a fold would have no test image).
    """
    ids = sorted(image_ids)
    if k < 2:
        raise ValueError(f"k={k} folds: need at least 2 (TEST_SPLIT <= 0.5)")
    if len(ids) < k:
        raise DatasetError(
            f"{len(ids)} image(s) cannot be split into {k} folds (K = round(1/TEST_SPLIT)): "
            "add images or raise TEST_SPLIT"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[i] for i in part) for part in np.array_split(order, k)]


def resolve_split(
    split_file: Path, image_ids: Sequence[str], *, seed: int, k: int, source: str, cross_validation: bool
) -> list[list[str]]:
    """The folds of a run: read from ``split_file`` when it exists, else made and written there.

    The file (``tts.json``) records the image ids of every fold's test set (image ids, never tile
    ids). A reused file is checked against the images on disk.

    Raises:
        DatasetError: the file is malformed, was made for a different number of folds, or no
            longer matches the images on disk (naming the missing and the new ids).
    """
    split_file = Path(split_file)
    ids = sorted(image_ids)
    if not split_file.is_file():
        folds = make_folds(ids, k, seed)
        record = {
            "source": source,
            "seed": seed,
            "num_folds": k,
            "cross_validation": cross_validation,
            "images": ids,
            "folds": [{"test": fold} for fold in folds],
        }
        # Atomic, and deterministic in (ids, k, seed): ranks racing to write it write the same file.
        atomic_write_json(split_file, record)
        return folds
    try:
        record = json.loads(split_file.read_text())
        folds = [list(map(str, f["test"])) for f in record["folds"]]
        stored = [str(i) for i in record["images"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f"split file {split_file} is unreadable ({type(e).__name__}: {e}); delete it to make a new split"
        ) from e
    flat = [i for f in folds for i in f]
    if sorted(flat) != sorted(stored) or len(set(flat)) != len(flat):
        raise DatasetError(
            f"split file {split_file} is corrupt: its folds do not partition its images; delete it to make a new split"
        )
    if len(folds) != k:
        raise DatasetError(
            f"split file {split_file} has {len(folds)} folds but TEST_SPLIT gives K={k}: use the TEST_SPLIT "
            f"it was made with, or delete it to make a new split"
        )
    gone = sorted(set(stored) - set(ids))
    new = sorted(set(ids) - set(stored))
    if gone or new:
        parts = []
        if gone:
            parts.append(f"{len(gone)} image(s) of the split are no longer on disk ({_preview(gone)})")
        if new:
            parts.append(f"{len(new)} image(s) on disk are not in the split ({_preview(new)})")
        raise DatasetError(
            f"split file {split_file} no longer matches the dataset {source}: {'; '.join(parts)}. Restore the "
            "files, or delete the split file (or start a new run) to make a new split"
        )
    return folds


def _preview(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")
