"""The ISBI 2012 EM training data as a DATASET_DIR folder: a converter from the challenge's published
stacks, and where the data comes from.

    python -m utils.isbi2012 train-volume.tif train-labels.tif ../shared/data/isbi2012

The challenge published its training set as two multi-page TIFFs: ``train-volume.tif`` (30
serial-section TEM slices, 512x512, 8-bit gray) and ``train-labels.tif`` (their labels: 255 = cell
interior, 0 = membrane). The converter writes them as the folder layout every folder dataset uses
(``images/NN.png`` and ``masks/NN.png`` with the same stems, 8-bit gray, the labels kept 0/255:
a 0/255 mask is read as classes 0 = membrane and 1 = cell, see :mod:`utils.image_io`) plus a
``README.md`` naming the source and the terms. The folder appears whole or not at all (it is
written beside its final name and renamed), and an existing folder is never written into.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tifffile
from PIL import Image

#: Where the data comes from, and on what terms (shown by bench/reproduce.py when the data is missing).
SOURCE = ('the training set of the ISBI 2012 challenge "Segmentation of neuronal structures in EM stacks": '
          "train-volume.tif and train-labels.tif, 30 serial-section TEM slices (512x512, 4x4x50 nm per pixel) "
          "of the Drosophila first-instar larva ventral nerve cord, from the challenge's web site "
          "(brainiac2.mit.edu/isbi_challenge, after registering)")
TERMS = ("for research and testing only, citing Arganda-Carreras et al., Frontiers in Neuroanatomy 9:142 (2015) "
         "and Cardona et al., PLoS Biology 8(10):e1000502 (2010)")


class ConversionError(Exception):
    """A stack that cannot be converted, or a folder that must not be written; the message names the
    file and the fix."""


def read_stack(path: Path, what: str) -> np.ndarray:
    """The pages of a (multi-page) TIFF as one ``(N, H, W)`` uint8 array.

    Raises:
        ConversionError: a missing or unreadable file, or pages that are not 8-bit gray.
    """
    try:
        stack = tifffile.imread(path)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file; give the challenge's {what}") from None
    except Exception as err:  # noqa: BLE001 - tifffile raises many types for a bad file; each is named
        raise ConversionError(f"{path}: not a readable TIFF ({type(err).__name__}: {err}); give the "
                              f"challenge's {what}") from None
    stack = stack[None] if stack.ndim == 2 else stack
    if stack.ndim != 3 or stack.dtype != np.uint8:
        raise ConversionError(f"{path}: {stack.dtype} pages of shape {stack.shape[1:]}, but the challenge's {what} "
                              "holds 8-bit gray pages")
    return stack


def convert(volume: Path, labels: Path, out: Path) -> int:
    """Write the stacks ``volume`` and ``labels`` as the folder dataset ``out`` (see the module doc).

    Returns:
        The number of images written.

    Raises:
        ConversionError: a stack that cannot be read or does not match the other, labels other than
            0 and 255, or an ``out`` that exists already.
    """
    volume, labels, out = Path(volume), Path(labels), Path(out)
    if out.exists():
        raise ConversionError(f"{out} exists already: the converter writes a new folder only; remove it or give "
                              "another one")
    images = read_stack(volume, "train-volume.tif")
    masks = read_stack(labels, "train-labels.tif")
    if images.shape != masks.shape:
        raise ConversionError(f"{volume} holds {images.shape[0]} pages of {images.shape[1]}x{images.shape[2]} but "
                              f"{labels} {masks.shape[0]} of {masks.shape[1]}x{masks.shape[2]}: give the volume "
                              "and the labels of the same stack")
    values = np.unique(masks)
    if not set(values.tolist()) <= {0, 255}:
        raise ConversionError(f"{labels} holds the values {values.tolist()[:8]}, but the challenge's labels are "
                              "0 (membrane) and 255 (cell): give train-labels.tif")
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        _write_folder(staging, images, masks, volume, labels)
        os.rename(staging, out)  # the folder appears whole; fails if `out` appeared meanwhile
    except BaseException as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise ConversionError(f"cannot write {out} ({err.strerror or err}): choose a folder on a disk you can "
                                  "write, with room for about 16 MB") from None
        raise
    return len(images)


def _write_folder(folder: Path, images: np.ndarray, masks: np.ndarray, volume: Path, labels: Path) -> None:
    """``images/NN.png``, ``masks/NN.png`` (stems ``00``, ``01``, ...) and ``README.md`` in ``folder``."""
    width = max(2, len(str(len(images) - 1)))
    for sub, stack in (("images", images), ("masks", masks)):
        (folder / sub).mkdir()
        for n, page in enumerate(stack):
            Image.fromarray(page).save(folder / sub / f"{n:0{width}d}.png")
    (folder / "README.md").write_text(
        "# ISBI 2012 EM segmentation - training set\n\n"
        f"{len(images)} images of {images.shape[2]}x{images.shape[1]}, 8-bit gray (`images/`), with their labels "
        "(`masks/`: 255 = cell interior, 0 = membrane), converted by `python -m utils.isbi2012` from "
        f"`{volume.name}` and `{labels.name}`.\n\n"
        f"Source: {SOURCE}.\n\nTerms: {TERMS}.\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (2 with one error line when the input is bad)."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.isbi2012",
        description=f"Convert the ISBI 2012 training stacks into a DATASET_DIR folder. Source: {SOURCE}. "
                    f"Terms: {TERMS}.")
    parser.add_argument("volume", type=Path, help="train-volume.tif (multi-page TIFF, 8-bit gray)")
    parser.add_argument("labels", type=Path, help="train-labels.tif (multi-page TIFF, 0 = membrane, 255 = cell)")
    parser.add_argument("out", type=Path, help="the folder to write (new); configs/experiments/isbi2012.yaml "
                                               "reads ../shared/data/isbi2012")
    args = parser.parse_args(argv)
    try:
        count = convert(args.volume, args.labels, args.out)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {count} images and masks into {args.out} (use it as DATASET_DIR={args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
