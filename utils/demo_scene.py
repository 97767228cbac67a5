"""A demo scene to predict on: one large image drawn by the built-in synthetic generator.

    python -m utils.demo_scene scene.tif                # 2048 x 2048, 8-bit gray, tiled TIFF
    python main.py predict MODEL_WEIGHTS=saved/default/run_001/best INPUT=scene.tif

The scene is :func:`utils.synthetic.generate_synthetic`'s drawing (ellipses and thick lines on a
noisy, unevenly lit background) at the size asked, from a seed the default run does not train on,
so the default model segments it as it would a new image of its kind. ``--truth`` also writes the
scene's true class mask beside it (``<stem>_truth.png``, a palette PNG: values 0 background, 1 line,
2 ellipse, shown in the overlay's colours) to compare the prediction with. Files are written
atomically and never replace an existing file.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tifffile
from PIL import Image

from utils.raster_write import class_palette
from utils.synthetic import SYNTHETIC_CLASSES, generate_synthetic
from utils.util import atomic_write

#: The seed of the demo scene (the default run draws its images from SEED: 42).
DEMO_SEED = 2024
#: Suffixes the scene can be written as.
SUFFIXES = (".tif", ".tiff", ".png")


def write_demo_scene(path: Path, size: int = 2048, seed: int = DEMO_SEED, channels: int = 1,
                     truth: bool = False) -> list[Path]:
    """Write a ``size`` x ``size`` synthetic scene to ``path`` (a tiled, deflate TIFF or a PNG, by suffix).

    Args:
        path: ``.tif``/``.tiff`` or ``.png``.
        size: side of the square scene in pixels (>= 64).
        seed: the generator's seed.
        channels: image channels (the network's INPUT_CHANNELS).
        truth: also write the true classes as ``<stem>_truth.png``.

    Returns:
        The files written.

    Raises:
        ValueError: an unknown suffix, a size below 64 or channels below 1.
        FileExistsError: a file of that name exists (it is left as it is).
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: write the scene as {', '.join(SUFFIXES)}")
    if size < 64 or channels < 1:
        raise ValueError(f"--size {size} must be >= 64 and --channels {channels} >= 1")
    images, classes = generate_synthetic(seed, 1, size, channels)
    image = images[0, :, :, 0] if channels == 1 else images[0]
    if path.suffix.lower() == ".png":
        atomic_write(path, lambda fh: Image.fromarray(image).save(fh, format="PNG"), overwrite=False)
    else:
        encoded = io.BytesIO()  # tifffile wants a named file or a buffer, not the temporary file's descriptor
        tifffile.imwrite(encoded, image, tile=(256, 256), compression="zlib", photometric="minisblack")
        atomic_write(path, lambda fh: fh.write(encoded.getvalue()), overwrite=False)
    written = [path]
    if truth:
        truth_path = path.with_name(f"{path.stem}_truth.png")
        # a palette PNG: its pixel values are the classes, and a viewer shows each in its overlay colour
        picture = Image.frombytes("P", (size, size), classes[0].astype(np.uint8).tobytes())
        picture.putpalette(class_palette(len(SYNTHETIC_CLASSES)).ravel().tolist())
        atomic_write(truth_path, lambda fh: picture.save(fh, format="PNG"), overwrite=False)
        written.append(truth_path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (2 with one error line when an argument is bad)."""
    parser = argparse.ArgumentParser(prog="python -m utils.demo_scene", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="the scene to write (.tif or .png)")
    parser.add_argument("--size", type=int, default=2048, help="side in pixels (default 2048)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help=f"generator seed (default {DEMO_SEED})")
    parser.add_argument("--channels", type=int, default=1, help="image channels (default 1, as INPUT_CHANNELS)")
    parser.add_argument("--truth", action="store_true", help="also write the true classes as <stem>_truth.png")
    args = parser.parse_args(argv)
    try:
        written = write_demo_scene(args.path, args.size, args.seed, args.channels, args.truth)
    except (ValueError, OSError) as err:
        if isinstance(err, FileExistsError):
            message = f"{err.filename or args.path} exists already: give a new file name"
        elif isinstance(err, OSError):
            message = f"cannot write {err.filename or args.path} ({err.strerror or err}): choose a folder you can write"
        else:
            message = str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(map(str, written))} ({args.size}x{args.size}); predict it with:  python main.py predict "
          f"MODEL_WEIGHTS=<run>/best INPUT={args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
