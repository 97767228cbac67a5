"""The generated folder datasets: the benchmark tasks of bench/reproduce.py, written as DATASET_DIR
folders (images/ and masks/, same stems; masks hold class indices) so that any configuration can
point at them. Each generator is deterministic in (its version, seed, arguments).

The product's own synthetic data (``DATASET_DIR: synthetic``) is :mod:`utils.synthetic`; these scenes
share its drawing of ellipses and lines.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from utils.synthetic import SYNTHETIC_CLASSES, _draw_ellipse, _draw_line
from utils.util import atomic_write, atomic_write_json


#: Bump when a folder-dataset generator changes; the version is part of the manifest.
FOLDER_DATASETS_VERSION = 1
#: Per-dataset versions that differ from FOLDER_DATASETS_VERSION (a generator changed on its own;
#: the others keep their version, seeds and folders).
DATASET_VERSIONS = {"lines_ellipses": 2}


def _truncated_normal(rng: np.random.Generator, mean: float, std: float, low: float, high: float,
                      shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian samples restricted to [low, high] by redrawing the ones outside (as scipy's truncnorm)."""
    out = rng.normal(mean, std, shape)
    bad = (out < low) | (out > high)
    while bad.any():
        out[bad] = rng.normal(mean, std, int(bad.sum()))
        bad = (out < low) | (out > high)
    return out


def _disk(radius: int) -> np.ndarray:
    """skimage.morphology.disk(radius): the pixels within ``radius`` of the centre (uint8)."""
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (yy**2 + xx**2 <= radius**2).astype(np.uint8)


def generate_lines_ellipses(
    seed: int, num_images: int, height: int = 200, width: int = 400
) -> tuple[np.ndarray, np.ndarray]:
    """Three-class scenes of the published multi-class U-Net benchmark (France1/unet-multiclass-pytorch,
    ``lib/generate_images.py``): randomly oriented lines and ellipses of varying gray level on a
    Gaussian noise background, drawn as that generator draws them.

    * Background: truncated Gaussian noise, mean uniform in [0.7, 0.9], sigma 0.1, limited to
      [0.6, 1.0].
    * Objects are flat (noise-free), each with its own gray level uniform in [0, 0.7], so they are
      darker than the background on average and told from it by level and by texture.
    * n = 1-9 ellipses, then n lines (the published generator draws as many lines as ellipses),
      lines always on top. Ellipse: integer centre, one semi-axis 5-19 px, the other that times
      0.5-2, any orientation. Line: integer centre, length 20-399 px, angle 0-179 degrees, drawn
      as a 1-px digital line between its (integer) end points and dilated by a disk of radius 1
      or 2, i.e. 3 or 5 px thick.
    * Image = floor(255 x level), as the published ``np.uint8(255 * img)``; one channel (the
      published RGB image repeats it three times).

    Departures from the published generator: ellipses are clipped at the image border (the
    published one wraps them around the image and folds rows below it onto row 0), and the random
    numbers come from NumPy's ``default_rng``. Version 1 of this generator put Gaussian noise on
    the objects too, drew lines and ellipses in random order, and drew 2-5 px lines with
    sub-pixel edges; with the noise on 2 px lines of a contrast near one noise sigma, the label of
    a line's edge pixels was barely decidable from the image, which the published task does not ask.

    Args:
        seed: the same seed always gives the same arrays.
        num_images: images to generate.
        height, width: image size (the benchmark's 400x200 images: height 200, width 400).

    Returns:
        ``images`` uint8 (N, height, width) and ``classes`` uint8 (N, height, width) with
        0 = background, 1 = line, 2 = ellipse.

    Raises:
        ValueError: a size or count below 1.
    """
    if num_images < 1 or height < 1 or width < 1:
        raise ValueError(f"num_images={num_images}, height={height} and width={width} must all be >= 1")
    rng = np.random.default_rng([DATASET_VERSIONS["lines_ellipses"], 2, seed])
    images = np.empty((num_images, height, width), np.uint8)
    classes = np.zeros((num_images, height, width), np.uint8)
    for n in range(num_images):
        scene = _truncated_normal(rng, rng.uniform(0.7, 0.9), 0.1, 0.6, 1.0, (height, width))
        count = int(rng.integers(1, 10))
        for _ in range(count):
            cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
            theta, level = math.radians(int(rng.integers(0, 180))), rng.uniform(0.0, 0.7)
            radius = int(rng.integers(5, 20))
            _draw_ellipse(scene, classes[n], cy, cx, radius, radius * rng.uniform(0.5, 2.0), theta, level,
                          SYNTHETIC_CLASSES["ellipse"])
        for _ in range(count):
            cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
            theta, level = -math.radians(int(rng.integers(0, 180))), rng.uniform(0.0, 0.7)
            length, thickness = int(rng.integers(20, width)), int(rng.integers(1, 3))
            ends = [(int(cx + s * length / 2 * math.cos(theta)), int(cy + s * length / 2 * math.sin(theta)))
                    for s in (1, -1)]
            line = cv2.line(np.zeros((height, width), np.uint8), *ends, 1, thickness=1, lineType=cv2.LINE_8)
            inside = cv2.dilate(line, _disk(thickness)).astype(bool)
            scene[inside] = level
            classes[n][inside] = SYNTHETIC_CLASSES["line"]
        images[n] = np.clip(np.floor(scene * 255), 0, 255)
    return images, classes


def _cell_cluster(rng, scene, mask, cy, cx, radius, background) -> None:
    """Touching cells: ellipses on a jittered hexagonal grid inside a disc, separated by 1-3 px gaps
    of background (the membranes a boundary-aware loss must keep open)."""
    r_cell = rng.uniform(7, 12)
    gap = rng.uniform(1.0, 3.0)
    pitch = 2 * r_cell + gap
    rows = int(radius // (pitch * 0.866)) + 1
    for i in range(-rows, rows + 1):
        for j in range(-rows - 1, rows + 2):
            y = cy + i * pitch * 0.866
            x = cx + (j + 0.5 * (i % 2)) * pitch
            if (y - cy) ** 2 + (x - cx) ** 2 > radius**2 or rng.random() < 0.1:
                continue  # a ragged cluster edge and a few holes
            a = r_cell * rng.uniform(0.85, 1.0)
            _draw_ellipse(scene, mask, y + rng.normal(0, 0.5), x + rng.normal(0, 0.5), a, a * rng.uniform(0.8, 1.0),
                          rng.uniform(0, math.pi), background + rng.uniform(0.12, 0.22), 1)


def _uneven_background(rng: np.random.Generator, size: int, levels: tuple[float, float],
                       ramp: float) -> tuple[float, np.ndarray]:
    """A square scene's background: a gray level drawn from ``levels``, an illumination ramp of
    amplitude ``ramp`` in a random direction, and smooth clutter (a 7x7 grid of sigma 0.03, bicubic);
    returns (the level, the float32 scene)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    background = rng.uniform(*levels)
    angle = rng.uniform(0, 2 * math.pi)
    scene = (background + ramp * (math.cos(angle) * xx + math.sin(angle) * yy - 0.5)).astype(np.float32)
    scene += cv2.resize(rng.normal(0, 0.03, (7, 7)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return background, scene


def generate_hard_boundaries(seed: int, num_images: int, size: int = 768) -> tuple[np.ndarray, np.ndarray]:
    """Binary scenes where the boundary is the hard part: thin and touching structures at low
    contrast in large, mostly empty scenes.

    Each image has 1-2 sites (placed away from the border), each holding a cluster of touching
    cells (radius 7-12 px, 1-3 px background gaps between neighbours, cluster radius 50-90 px)
    and 3-6 thin lines (1.5-3 px thick, 40-160 px long) around it. Objects are 0.12-0.22 brighter
    than a background of 0.3-0.5 with a gentle ramp and smooth clutter; the scene is blurred
    (sigma 1 px) and gets Gaussian noise of sigma 0.07-0.10, so a 1 px gap is barely visible.
    At ``size`` 768 about 80 % of the 128-px tiles hold a single class.

    Args:
        seed: the same seed always gives the same arrays.
        num_images: images to generate.
        size: side length of each square image (>= 256).

    Returns:
        ``images`` uint8 (N, size, size) and ``masks`` uint8 (N, size, size) with 0 = background,
        1 = object.

    Raises:
        ValueError: ``num_images`` < 1 or ``size`` < 256.
    """
    if num_images < 1 or size < 256:
        raise ValueError(f"num_images={num_images} must be >= 1 and size={size} >= 256")
    rng = np.random.default_rng([FOLDER_DATASETS_VERSION, 3, seed])
    images = np.empty((num_images, size, size), np.uint8)
    masks = np.zeros((num_images, size, size), np.uint8)
    for n in range(num_images):
        background, scene = _uneven_background(rng, size, (0.3, 0.5), ramp=0.08)
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
            radius = rng.uniform(50, 90)
            _cell_cluster(rng, scene, masks[n], cy, cx, radius, background)
            for _ in range(int(rng.integers(3, 7))):
                angle_l = rng.uniform(0, 2 * math.pi)
                dist = radius + rng.uniform(15, 60)
                _draw_line(scene, masks[n], cy + dist * math.sin(angle_l), cx + dist * math.cos(angle_l),
                           rng.uniform(40, 160), rng.uniform(0, math.pi), rng.uniform(1.5, 3.0),
                           background + rng.uniform(0.12, 0.22), 1)
        scene = cv2.GaussianBlur(scene, (0, 0), 1.0)
        noisy = scene + rng.normal(0, rng.uniform(0.07, 0.10), scene.shape).astype(np.float32)
        images[n] = np.clip(np.rint(noisy * 255), 0, 255)
    return images, masks


def generate_touching_blobs(seed: int, num_images: int, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Three-class scenes derived from instance labels: clusters of touching cells whose outlines
    are a class of their own (background, cell interior, cell boundary), as in microscopy's
    interior/boundary segmentation, where telling two touching cells apart is the whole task.

    Each image holds 2-4 clusters (radius 50-110 px) of cells on a jittered hexagonal grid with a
    pitch *smaller* than the cell diameter, so neighbours overlap and touch with no background
    between them (later cells are drawn over earlier ones), plus 4-10 isolated cells. Cells are
    ellipses (semi-axes 8-15 px), each with its own gray level 0.15-0.30 above a background of
    0.25-0.40 (gentle ramp, smooth clutter) and a faint texture. Where two cells meet, the image
    shows a membrane only 0.04-0.12 darker than the cells, on a random 60-100 % of its pixels; the
    scene is blurred (sigma 1 px) and gets Gaussian noise of sigma 0.04-0.07.

    Labels come from the instance map: 1 = a cell's pixel, 2 = a cell's pixel with another label
    (another cell or background) among its 8 neighbours, i.e. every cell's 1-px inner outline
    (a 2-px line between touching cells), 0 = background.

    Args:
        seed: the same seed always gives the same arrays.
        num_images: images to generate.
        size: side length of each square image (>= 256).

    Returns:
        ``images`` uint8 (N, size, size) and ``classes`` uint8 (N, size, size): 0 background,
        1 interior, 2 boundary.

    Raises:
        ValueError: ``num_images`` < 1 or ``size`` < 256.
    """
    if num_images < 1 or size < 256:
        raise ValueError(f"num_images={num_images} must be >= 1 and size={size} >= 256")
    rng = np.random.default_rng([FOLDER_DATASETS_VERSION, 4, seed])
    images = np.empty((num_images, size, size), np.uint8)
    classes = np.zeros((num_images, size, size), np.uint8)
    for n in range(num_images):
        background, scene = _uneven_background(rng, size, (0.25, 0.40), ramp=0.06)
        instances = np.zeros((size, size), np.int32)
        cells = []  # (cy, cx, a, b, theta)
        for _ in range(int(rng.integers(2, 5))):
            cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
            radius = rng.uniform(50, 110)
            r_cell = rng.uniform(9, 14)
            pitch = 2 * r_cell * rng.uniform(0.8, 0.95)  # below the diameter: neighbours touch
            rows = int(radius // (pitch * 0.866)) + 1
            for i in range(-rows, rows + 1):
                for j in range(-rows - 1, rows + 2):
                    y = cy + i * pitch * 0.866 + rng.normal(0, 1.0)
                    x = cx + (j + 0.5 * (i % 2)) * pitch + rng.normal(0, 1.0)
                    if (y - cy) ** 2 + (x - cx) ** 2 > radius**2 or rng.random() < 0.1:
                        continue
                    a = r_cell * rng.uniform(0.85, 1.1)
                    cells.append((y, x, a, a * rng.uniform(0.75, 1.0), rng.uniform(0, math.pi)))
        for _ in range(int(rng.integers(4, 11))):
            a = rng.uniform(8, 15)
            cells.append((*rng.uniform(0.05 * size, 0.95 * size, 2), a, a * rng.uniform(0.6, 1.0),
                          rng.uniform(0, math.pi)))
        for k, (y, x, a, b, theta) in enumerate(cells, start=1):
            _draw_ellipse(scene, instances, y, x, a, b, theta, background + rng.uniform(0.15, 0.30), k)
        texture = cv2.GaussianBlur(rng.normal(0, 0.04, (size, size)).astype(np.float32), (0, 0), 2.0)
        scene += np.where(instances > 0, texture, 0).astype(np.float32)
        classes[n] = classes_from_instances(instances)
        between = (classes[n] == 2) & (ndimage.minimum_filter(instances, 3) > 0)  # touching another cell
        shown = between & (rng.random(between.shape) < rng.uniform(0.6, 1.0))
        scene[shown] -= rng.uniform(0.04, 0.12)
        scene = cv2.GaussianBlur(scene, (0, 0), 1.0)
        noisy = scene + rng.normal(0, rng.uniform(0.04, 0.07), scene.shape).astype(np.float32)
        images[n] = np.clip(np.rint(noisy * 255), 0, 255)
    return images, classes


def classes_from_instances(instances: np.ndarray) -> np.ndarray:
    """Interior/boundary classes of an instance map (0 = background, k > 0 = instance k): 0 background,
    2 an instance's pixel with another label among its 8 neighbours (pixels past the image border do
    not count), 1 the instance's other pixels."""
    hi = ndimage.maximum_filter(instances, 3, mode="nearest")
    lo = ndimage.minimum_filter(instances, 3, mode="nearest")
    classes = (instances > 0).astype(np.uint8)
    classes[(hi != lo) & (instances > 0)] = 2
    return classes


#: The generated folder datasets by name: generator and its keyword arguments.
FOLDER_DATASETS: dict[str, tuple] = {
    "lines_ellipses": (generate_lines_ellipses, {"num_images": 60, "height": 200, "width": 400}),
    "hard_boundaries": (generate_hard_boundaries, {"num_images": 24, "size": 768}),
    "smoke": (generate_hard_boundaries, {"num_images": 4, "size": 256}),
    "touching_blobs": (generate_touching_blobs, {"num_images": 24, "size": 512}),
}


def single_class_fraction(masks: np.ndarray, tile: int) -> float:
    """Fraction of the non-overlapping ``tile``-sized tiles of (N, H, W) ``masks`` that hold one class."""
    n, h, w = masks.shape
    single = total = 0
    for y in range(0, h - tile + 1, tile):
        for x in range(0, w - tile + 1, tile):
            t = masks[:, y:y + tile, x:x + tile].reshape(n, -1)
            single += int((t.min(axis=1) == t.max(axis=1)).sum())
            total += n
    return single / max(total, 1)


def write_folder_dataset(folder: Path, images: np.ndarray, masks: np.ndarray, manifest: dict) -> None:
    """Write ``images/NNN.png`` and ``masks/NNN.png`` (class indices, 8-bit) and ``manifest.json``.

    The manifest is written last, so a folder with a manifest is complete.
    """
    folder = Path(folder)
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(images) - 1)))
    for n, (image, mask) in enumerate(zip(images, masks)):
        stem = f"{n:0{width}d}"
        for sub, array in (("images", image), ("masks", mask)):
            ok, data = cv2.imencode(".png", array)
            if not ok:
                raise OSError(f"could not encode {folder / sub / stem}.png")
            atomic_write(folder / sub / f"{stem}.png", lambda fh, d=data: fh.write(d.tobytes()))
    atomic_write_json(folder / "manifest.json", manifest)


def ensure_folder_dataset(folder: Path, name: str, seed: int = 0) -> Path:
    """The generated dataset ``name`` (a key of :data:`FOLDER_DATASETS`) in ``folder``, written
    there first if it is missing.

    Raises:
        ValueError: an unknown ``name`` (the valid names are listed), or a folder that holds a
            different dataset (its manifest differs; delete the folder to regenerate it).
    """
    if name not in FOLDER_DATASETS:
        raise ValueError(f"unknown generated dataset {name!r}; valid names: {sorted(FOLDER_DATASETS)}")
    generator, kwargs = FOLDER_DATASETS[name]
    manifest = {"name": name, "generator": generator.__name__,
                "version": DATASET_VERSIONS.get(name, FOLDER_DATASETS_VERSION),
                "seed": seed, **kwargs}
    folder = Path(folder)
    path = folder / "manifest.json"
    if path.is_file():
        found = json.loads(path.read_text())
        if found != manifest:
            raise ValueError(f"{folder} holds a different dataset ({found}, wanted {manifest}): delete it to "
                             "regenerate")
        return folder
    images, masks = generator(seed, **kwargs)
    write_folder_dataset(folder, images, masks, manifest)
    return folder
