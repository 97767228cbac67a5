"""The built-in synthetic dataset: ellipses and thick lines of varying gray levels on a noisy,
unevenly lit background, generated deterministically from the seed and cached as ``.npz``."""

from __future__ import annotations

import math
import warnings
import json
from pathlib import Path

import cv2
import numpy as np

from utils.image_io import ImageEntry, ImageSet, percentile_range
from utils.util import atomic_write, atomic_write_json

# Bump when the synthetic generator changes, so stale caches are not reused.
SYNTHETIC_VERSION = 1
SYNTHETIC_CLASSES = {"background": 0, "line": 1, "ellipse": 2}


def _draw_ellipse(scene, classes, cy, cx, a, b, theta, level, label) -> None:
    height, width = scene.shape[:2]
    r = int(math.ceil(max(a, b)))
    y0, y1 = max(0, int(cy) - r - 1), min(height, int(cy) + r + 2)
    x0, x1 = max(0, int(cx) - r - 1), min(width, int(cx) + r + 2)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(theta), math.sin(theta)
    inside = ((dx * c + dy * s) / a) ** 2 + ((dy * c - dx * s) / b) ** 2 <= 1
    scene[y0:y1, x0:x1][inside] = level
    classes[y0:y1, x0:x1][inside] = label


def _draw_line(scene, classes, cy, cx, length, theta, width, level, label) -> None:
    height, img_width = scene.shape[:2]
    hy, hx = math.sin(theta) * length / 2, math.cos(theta) * length / 2
    py, px, qy, qx = cy - hy, cx - hx, cy + hy, cx + hx
    margin = width / 2 + 1
    y0, y1 = max(0, int(min(py, qy) - margin)), min(height, int(max(py, qy) + margin) + 1)
    x0, x1 = max(0, int(min(px, qx) - margin)), min(img_width, int(max(px, qx) + margin) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    vy, vx = qy - py, qx - px
    t = np.clip(((yy - py) * vy + (xx - px) * vx) / (vy * vy + vx * vx), 0, 1)
    inside = (yy - py - t * vy) ** 2 + (xx - px - t * vx) ** 2 <= (width / 2) ** 2
    scene[y0:y1, x0:x1][inside] = level
    classes[y0:y1, x0:x1][inside] = label


def _synthetic_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One noise-free scene (float32 gray levels) and its class map (0 background, 1 line, 2 ellipse)."""
    # Background: a gray level with a gentle illumination ramp, so no single global threshold
    # separates objects from background in every image.
    yy, xx = np.mgrid[0:size, 0:size] / size
    ramp_angle = rng.uniform(0, 2 * math.pi)
    scene = (
        rng.uniform(0.15, 0.35)
        + rng.uniform(0, 0.15) * (math.cos(ramp_angle) * xx + math.sin(ramp_angle) * yy - 0.5)
    ).astype(np.float32)
    # Smooth background clutter (features ~size/8 wide): object evidence must come from shape and
    # local contrast, not from the gray level alone.
    coarse = rng.normal(0, 0.05, (9, 9)).astype(np.float32)
    scene += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    classes = np.zeros((size, size), np.uint8)
    # Objects gather around a few centres, leaving empty regions: some tiles hold no boundary,
    # which gives the tile classifier two classes to learn.
    n_centres = int(rng.integers(1, 4))
    centres = rng.uniform(0.1 * size, 0.9 * size, (n_centres, 2))
    n_objects = max(1, int(rng.integers(15, 35) * (size / 512) ** 2))
    for _ in range(n_objects):
        cy, cx = centres[rng.integers(n_centres)] + rng.normal(0, size / 8, 2)
        level = rng.uniform(0.5, 0.9)  # above background by >= ~1.5 noise sigmas
        if rng.random() < 0.6:
            a = rng.uniform(14, 40)
            b = a * rng.uniform(0.6, 1.0)
            _draw_ellipse(scene, classes, cy, cx, a, b, rng.uniform(0, math.pi), level, SYNTHETIC_CLASSES["ellipse"])
        else:
            _draw_line(scene, classes, cy, cx, rng.uniform(60, 200), rng.uniform(0, math.pi),
                       rng.uniform(6, 12), level, SYNTHETIC_CLASSES["line"])
    # Soft edges, as an optical system would blur them: the exact boundary is a little uncertain.
    return cv2.GaussianBlur(scene, (0, 0), 1.0), classes


def generate_synthetic(seed: int, num_images: int, size: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Generate the built-in dataset: ellipses and thick lines on a Gaussian-noise background.

    Each image has 15-35 objects (scaled with area relative to 512^2) clustered around 1-3
    centres: ellipses (semi-axes 14-40 px) and lines (60-200 px long, 6-12 px thick), each with
    its own gray level in [0.55, 0.95], on a background of 0.15-0.35 with a gentle ramp, plus
    Gaussian noise (sigma 0.05-0.10 per image, independent per channel). Later objects cover
    earlier ones. Extra channels repeat the scene at a random gain in [0.7, 1].

    Args:
        seed: the same seed always gives the same arrays.
        num_images: images to generate.
        size: side length of each square image.
        channels: image channels.

    Returns:
        ``images`` uint8 (N, size, size, channels) and ``classes`` uint8 (N, size, size) with 0 =
        background, 1 = line, 2 = ellipse.
    """
    if num_images < 1 or size < 1 or channels < 1:
        raise ValueError(f"num_images={num_images}, size={size} and channels={channels} must all be >= 1")
    rng = np.random.default_rng([SYNTHETIC_VERSION, seed])
    images = np.empty((num_images, size, size, channels), np.uint8)
    classes = np.empty((num_images, size, size), np.uint8)
    for n in range(num_images):
        scene, classes[n] = _synthetic_scene(rng, size)
        noise_sigma = rng.uniform(0.07, 0.12)
        for c in range(channels):
            gain = 1.0 if c == 0 else rng.uniform(0.7, 1.0)
            noisy = scene * gain + rng.normal(0, noise_sigma, (size, size)).astype(np.float32)
            images[n, :, :, c] = np.clip(np.rint(noisy * 255), 0, 255)
    return images, classes


def load_synthetic(
    cache_dir: Path, *, seed: int, num_images: int, size: int, channels: int, seg_classes: int
) -> ImageSet:
    """The synthetic dataset as an :class:`ImageSet`, generated once and cached.

    The cache file ``cache_dir/synthetic_v<version>_seed<seed>_n<N>_s<size>_c<channels>.npz`` is
    written atomically. A cache file that cannot be read or does not match its name is regenerated
    (with a warning).

    Args:
        seg_classes: 1 or 2 give a binary mask (lines and ellipses are foreground); 3 keeps the
            classes 0 background, 1 line, 2 ellipse.

    Raises:
        ValueError: ``seg_classes`` not in 1, 2, 3.
    """
    if seg_classes not in (1, 2, 3):
        raise ValueError(
            f"seg_classes={seg_classes} does not fit the synthetic data: use 1 or 2 (binary) or 3 "
            "(background, lines, ellipses)"
        )
    cache_dir = Path(cache_dir)
    path = cache_dir / f"synthetic_v{SYNTHETIC_VERSION}_seed{seed}_n{num_images}_s{size}_c{channels}.npz"
    images = classes = None
    if path.is_file():
        try:
            with np.load(path) as data:
                images, classes = data["images"], data["classes"]
            if images.shape != (num_images, size, size, channels) or classes.shape != (num_images, size, size):
                raise ValueError(f"arrays of shape {images.shape} / {classes.shape}")
        except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt, and said so
            warnings.warn(f"synthetic data cache {path} is unusable ({type(e).__name__}: {e}); regenerating it")
            images = classes = None
    if images is None:
        images, classes = generate_synthetic(seed, num_images, size, channels)
        atomic_write(path, lambda fh: np.savez(fh, images=images, classes=classes))
    if seg_classes < 3:
        classes = (classes > 0).astype(np.uint8)
    width = len(str(num_images - 1))
    # No content hashes (``digest``): the images are a function of the seed and SYNTHETIC_VERSION, which
    # the run records, and OpenCV's resampling may differ in the last bit between machines, so a hash
    # would refuse the same data regenerated elsewhere.
    entries = [ImageEntry(f"{n:0{width}d}", size, size, channels, 0.0, 255.0, dtype=images.dtype.name,
                          intensity=percentile_range(images[n])) for n in range(num_images)]
    return ImageSet(entries, [(images[n], classes[n]) for n in range(num_images)])


# ---------------------------------------------------------------------------------------------

# Generated folder datasets: the benchmark tasks of bench/reproduce.py, written as DATASET_DIR
# folders (images/ and masks/, same stems; masks hold class indices) so that any configuration can
# point at them. Each generator is deterministic in (its version, seed, arguments).

#: Bump when a folder-dataset generator changes; the version is part of the manifest.
FOLDER_DATASETS_VERSION = 1
#: Per-dataset versions that differ from FOLDER_DATASETS_VERSION (a generator changed on its own;
#: the others keep their version, seeds and folders).
DATASET_VERSIONS = {"lines_ellipses": 2}
LINES_ELLIPSES_CLASSES = {"background": 0, "line": 1, "ellipse": 2}


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
                          LINES_ELLIPSES_CLASSES["ellipse"])
        for _ in range(count):
            cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
            theta, level = -math.radians(int(rng.integers(0, 180))), rng.uniform(0.0, 0.7)
            length, thickness = int(rng.integers(20, width)), int(rng.integers(1, 3))
            ends = [(int(cx + s * length / 2 * math.cos(theta)), int(cy + s * length / 2 * math.sin(theta)))
                    for s in (1, -1)]
            line = cv2.line(np.zeros((height, width), np.uint8), *ends, 1, thickness=1, lineType=cv2.LINE_8)
            inside = cv2.dilate(line, _disk(thickness)).astype(bool)
            scene[inside] = level
            classes[n][inside] = LINES_ELLIPSES_CLASSES["line"]
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
    yy, xx = np.mgrid[0:size, 0:size] / size
    for n in range(num_images):
        background = rng.uniform(0.3, 0.5)
        angle = rng.uniform(0, 2 * math.pi)
        scene = (background + 0.08 * (math.cos(angle) * xx + math.sin(angle) * yy - 0.5)).astype(np.float32)
        scene += cv2.resize(rng.normal(0, 0.03, (7, 7)).astype(np.float32), (size, size),
                            interpolation=cv2.INTER_CUBIC)
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


#: The generated folder datasets by name: generator and its keyword arguments.
FOLDER_DATASETS: dict[str, tuple] = {
    "lines_ellipses": (generate_lines_ellipses, {"num_images": 60, "height": 200, "width": 400}),
    "hard_boundaries": (generate_hard_boundaries, {"num_images": 24, "size": 768}),
    "smoke": (generate_hard_boundaries, {"num_images": 4, "size": 256}),
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
