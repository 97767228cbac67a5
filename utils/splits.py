"""Train/test splits over *images* (never tiles): K folds drawn from the seed and kept in the run's
``tts.json``, which is reused (and checked against the files on disk) when it exists.

``tts.json`` (one per run; shared by the folds of a cross-validation) is a JSON object::

    source            "synthetic", or the dataset folder's absolute path
    seed              SEED the folds were drawn with
    num_folds         K = round(1 / TEST_SPLIT)
    cross_validation  CROSS_VALIDATION when it was made
    images            every image id (file stem), sorted
    folds             [{"test": [image ids]}, ...]: fold f's test images (its training images are the others)
    fixed             true when TEST_IDS chose the test images: then ``folds`` is that one split and
                      ``num_folds`` is 1 (absent, i.e. false, for drawn folds)
    hashes            {image id: content hash} of every image file (:func:`utils.image_io.file_digest`,
                      BLAKE2b of the file's bytes); folder datasets only (synthetic data is a function
                      of the seed); absent from files made before hashes were recorded

A reused file must still describe the dataset: the same image ids and, where it has hashes, the
same content under each name. A file replaced under the same name is refused (:func:`check_contents`),
naming the file and both hashes, since a resumed run or an evaluation would otherwise mix data it
was not made with. A file without ``hashes`` is used as it is, with a one-line note.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from utils.image_io import DatasetError, ImageSet, InputScaling
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


def check_test_ids(test_ids: Sequence[str], image_ids: Sequence[str]) -> None:
    """Refuse TEST_IDS that name no image of the dataset, or leave none to train on.

    Raises:
        DatasetError: naming the unknown stems and a few valid ones.
    """
    known = set(image_ids)
    unknown = sorted(set(test_ids) - known)
    if unknown:
        raise DatasetError(f"TEST_IDS names {len(unknown)} image(s) that are not in the dataset: {_preview(unknown)}; "
                           f"give the stems of its images (file names without the suffix), e.g. "
                           f"{_preview(sorted(known), 3)}")
    if known <= set(test_ids):
        raise DatasetError(f"TEST_IDS holds all {len(known)} images of the dataset, so none is left to train on: "
                           "leave some out of TEST_IDS")


def resolve_split(
    split_file: Path, image_ids: Sequence[str], *, seed: int, k: int, source: str, cross_validation: bool,
    images: Optional[ImageSet] = None, test_ids: Optional[Sequence[str]] = None,
) -> list[list[str]]:
    """The folds of a run: read from ``split_file`` when it exists, else made and written there.

    The file (``tts.json``, see the module docstring) records the image ids of every fold's test
    set (image ids, never tile ids) and the images' content hashes. A reused file is checked
    against the images on disk.

    Args:
        images: the dataset's images: their content hashes (:attr:`ImageSet.digests`, folder
            datasets) are written into a new file and checked against a reused one.
        test_ids: the test images TEST_IDS fixes (checked by :func:`check_test_ids`): the one split
            replaces the K drawn folds; a reused file must hold the same.

    Raises:
        DatasetError: the file is malformed, was made for a different number of folds, or no
            longer matches the images on disk (naming the missing and the new ids, or the files
            whose content changed).
    """
    split_file = Path(split_file)
    ids = sorted(image_ids)
    digests = images.digests if images is not None else None
    fixed = sorted(test_ids) if test_ids is not None else None
    if fixed is not None:
        k = 1
    if not split_file.is_file():
        folds = [fixed] if fixed is not None else make_folds(ids, k, seed)
        record = {
            "source": source,
            "seed": seed,
            "num_folds": k,
            "cross_validation": cross_validation,
            "images": ids,
            "folds": [{"test": fold} for fold in folds],
            **({"fixed": True} if fixed is not None else {}),
            **({"hashes": digests} if digests is not None else {}),
        }
        # Atomic, and deterministic in (ids, k, seed): ranks racing to write it write the same file.
        atomic_write_json(split_file, record)
        return folds
    try:
        record = json.loads(split_file.read_text())
        folds = [list(map(str, f["test"])) for f in record["folds"]]
        stored = [str(i) for i in record["images"]]
        hashes = record.get("hashes")
        hashes = None if hashes is None else {str(i): str(h) for i, h in dict(hashes).items()}
        was_fixed = bool(record.get("fixed", False))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(
            f"split file {split_file} is unreadable ({type(e).__name__}: {e}); delete it to make a new split"
        ) from e
    flat = [i for f in folds for i in f]
    # drawn folds partition the images; a fixed split is one test set among them
    covered = set(flat) <= set(stored) if was_fixed else sorted(flat) == sorted(stored)
    if not covered or len(set(flat)) != len(flat):
        raise DatasetError(
            f"split file {split_file} is corrupt: its folds do not partition its images; delete it to make a new split"
        )
    if fixed is not None and folds != [fixed]:
        held = f"the test set {_preview(folds[0])}" if len(folds) == 1 else f"{len(folds)} drawn folds"
        raise DatasetError(f"split file {split_file} holds {held}, not TEST_IDS {_preview(fixed)}: use the TEST_IDS "
                           "it was made with, or start a new run (another RUN_ID)")
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
    if images is not None and digests is not None:
        check_contents(hashes, images, recorder=f"split file {split_file}",
                       fix="Restore the original files, or start a new run (another RUN_ID) to train on the "
                           "changed data")
    return folds


def check_contents(stored: Optional[Mapping[str, str]], images: ImageSet, *, recorder: str, fix: str) -> None:
    """Refuse images whose file changed since ``stored`` recorded their content hashes.

    Args:
        stored: ``{image id: content hash}`` recorded earlier (a split file's or a checkpoint's); None
            when the record predates hashes: nothing is checked then, with a one-line note.
        images: the dataset as it is now (data without hashes, synthetic, is not checked).
        recorder: what recorded ``stored``, for the messages, e.g. ``"split file run/tts.json"``.
        fix: what to do, the error's last sentence.

    Raises:
        DatasetError: naming each changed image file with both hashes (12 digits), and ``fix``.
    """
    current = images.digests
    if current is None:
        return
    if stored is None:
        print(f"note: the {recorder} predates content hashes: images replaced since it was made cannot be "
              "detected", file=sys.stderr)
        return
    files = {e.id: e.image_path for e in images.entries}
    changed = [f"{files[i]} (was {stored[i][:12]}, now {current[i][:12]})"
               for i in sorted(set(stored) & set(current)) if stored[i] != current[i]]
    if changed:
        raise DatasetError(f"{len(changed)} image(s) changed since the {recorder} recorded them (same name, other "
                           f"content): {_preview(changed, 3)}. {fix}")


def split_record(images: ImageSet, train_ids: Sequence[str], test_ids: Sequence[str]) -> dict[str, Any]:
    """The ``split`` a checkpoint stores (see :mod:`engines.checkpoint`): the fold's image ids, the
    content hashes of its images (folder datasets) and how its training images were scaled
    (:class:`utils.image_io.InputScaling`)."""
    index = {image_id: i for i, image_id in enumerate(images.ids)}
    digests = images.digests
    record: dict[str, Any] = {"train": list(train_ids), "test": list(test_ids)}
    if digests is not None:
        record["hashes"] = {i: digests[i] for i in sorted([*train_ids, *test_ids])}
    record["inputs"] = InputScaling.of([images.entries[index[i]] for i in train_ids]).as_dict()
    return record


def _preview(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")
