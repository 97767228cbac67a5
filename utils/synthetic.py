"""The built-in synthetic dataset: ellipses and thick lines of varying gray levels on a noisy,
unevenly lit background, generated deterministically from the seed and cached as ``.npz``."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import cv2
import numpy as np

from utils.image_io import ImageEntry, ImageSet, percentile_range
from utils.util import atomic_write

# Bump when the synthetic generator changes, so stale caches are not reused.
SYNTHETIC_VERSION = 1
#: The class of each kind of object, here and in bench.folder_datasets' lines_ellipses scenes.
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
