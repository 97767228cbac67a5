"""Datasets, tiling, train/test splits, augmentation and data loaders.

Two sources feed the same :class:`TileDataset`:

* ``"synthetic"``: generated from the seed (ellipses and thick lines of varying gray levels on a
  noisy background), cached as ``.npz`` under ``cache_dir``;
* a folder ``DATASET_DIR`` holding ``images/`` and ``masks/`` whose files are matched by stem.

Every image is cut into ``input_size`` tiles (the last tile of a row or column is aligned to the
border, so tiles cover the whole image). A tile's classification label is 1 when its mask contains
a class boundary, i.e. two 4-adjacent pixels of different classes, which for a tile is the same as
"the mask is not constant". Splits are made over *images*, never tiles, so the tiles of one image
are all in train or all in test.

Items are dicts (default collate works)::

    image  float32 (C, H, W), scaled to [0, 1] by the file's dtype range (uint8 / 255, uint16 / 65535)
    mask   int64 (H, W), class indices (binary: {0, 1}; SEG_CLASSES = K >= 2: 0 ... K-1)
    label  int64 (), 1 = the tile's mask contains a class boundary (after augmentation)
    id     str, "<image id>_y<row>_x<col>", e.g. "07_y0256_x0128"
    index  int64 (), position in the dataset

Folder datasets, in short (details in :func:`load_folder`):

* images: PNG, JPEG (Pillow) or TIFF (tifffile); 8/16-bit integer, or float already in [0, 1];
  grayscale or multi-channel, the channel count must equal ``input_channels``;
* masks: one channel of class indices 0 ... K-1, or binary 0/255. When *every* mask holds only the
  values 0 and 255 the dataset is read as binary and 255 becomes class 1 (so the ISBI 2012 EM
  labels, 255 = cell interior, load as they are). Masks must be lossless: a JPEG mask has stray
  values and is reported as such;
* dot-files (``.DS_Store``) are ignored; anything else that is not a supported image is an error.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import random
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

# albumentations checks PyPI for a newer version on import unless told not to; nothing may
# download at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from albumentations.augmentations.geometric.distortion import BaseDistortion  # noqa: E402
from albumentations.core.transforms_interface import BaseTransformInitSchema  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info  # noqa: E402

from utils.util import atomic_write, atomic_write_json  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
COMPOSITIONS = ("full", "boundary")
# Bump when the synthetic generator changes, so stale caches are not reused.
SYNTHETIC_VERSION = 1
# Decoded folder datasets stay in memory while they take at most this fraction of the machine's
# RAM (each DataLoader worker shares them copy-on-write); beyond it, files are decoded per tile
# with a small per-process cache of recently used images.
MEMORY_CACHE_FRACTION = 0.25
LAZY_CACHE_IMAGES = 8


class DatasetError(ValueError):
    """The dataset on disk (or its split file) cannot be used; the message lists every problem."""


# ---------------------------------------------------------------------------------------------
# small pure helpers
# ---------------------------------------------------------------------------------------------
def num_folds(test_split: float) -> int:
    """Number of cross-validation folds, ``round(1 / test_split)``.

    Raises:
        ValueError: ``test_split`` is not in (0, 1).
    """
    if not 0 < test_split < 1:
        raise ValueError(f"test_split={test_split!r} must be in (0, 1)")
    return int(round(1 / test_split))


def tile_positions(length: int, size: int, overlap: int = 0) -> list[int]:
    """Start offsets of the tiles that cover ``[0, length)`` with tiles of ``size``.

    Tiles step by ``size - overlap``; when that does not end exactly at the border, one more tile
    is aligned to the border (it overlaps its neighbour by more than ``overlap``), so every pixel
    is covered and no tile leaves the image.

    Raises:
        ValueError: ``length < size``, ``size < 1`` or ``overlap`` not in ``[0, size)``.
    """
    if size < 1:
        raise ValueError(f"size={size} must be >= 1")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap={overlap} must be in [0, size={size})")
    if length < size:
        raise ValueError(f"length={length} is smaller than the tile size {size}")
    starts = list(range(0, length - size + 1, size - overlap))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def boundary_label(mask: np.ndarray) -> int:
    """1 when a tile's class mask contains a class boundary, else 0.

    Two 4-adjacent pixels of different classes exist exactly when the mask is not constant (the
    pixel grid is connected), which is cheaper to test.
    """
    return int(mask.min() != mask.max())


def _tile_id(image_id: str, y: int, x: int) -> str:
    return f"{image_id}_y{y:04d}_x{x:04d}"


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# images in memory (or decoded on demand)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageEntry:
    """One image of a dataset: its id, size, intensity scaling and (folder datasets) files.

    Pixel values become ``(raw - offset) / scale``; for integer files that maps the dtype's range
    onto [0, 1].
    """

    id: str
    height: int
    width: int
    channels: int
    offset: float
    scale: float
    image_path: Optional[Path] = None
    mask_path: Optional[Path] = None


class ImageSet:
    """The decoded images and masks of a dataset, by position.

    Args:
        entries: one :class:`ImageEntry` per image, in id order.
        arrays: ``(image (H, W, C) raw dtype, mask (H, W) class indices)`` per entry, or None to
            decode the files on demand (large folder datasets).
        mask_map_255: folder datasets read as binary 0/255 (255 becomes class 1 when decoding).
        mask_dtype: dtype class indices are stored in.
    """

    def __init__(
        self,
        entries: list[ImageEntry],
        arrays: Optional[list[tuple[np.ndarray, np.ndarray]]],
        mask_map_255: bool = False,
        mask_dtype: Any = np.uint8,
    ):
        self.entries = entries
        self.arrays = arrays
        self.mask_map_255 = mask_map_255
        self.mask_dtype = np.dtype(mask_dtype)
        self._recent: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    @property
    def in_memory(self) -> bool:
        return self.arrays is not None

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image (H, W, C) raw dtype, mask (H, W) class indices)`` of image ``i``."""
        if self.arrays is not None:
            return self.arrays[i]
        if i in self._recent:
            self._recent.move_to_end(i)
            return self._recent[i]
        entry = self.entries[i]
        image = _to_hwc(_read_image_file(entry.image_path), entry.image_path)
        mask = _decode_mask(_read_mask_file(entry.mask_path), self.mask_map_255, self.mask_dtype)
        self._recent[i] = (image, mask)
        if len(self._recent) > LAZY_CACHE_IMAGES:
            self._recent.popitem(last=False)
        return image, mask


# ---------------------------------------------------------------------------------------------
# folder datasets
# ---------------------------------------------------------------------------------------------
def _read_image_file(path: Path) -> np.ndarray:
    """Decode an image file as stored: (H, W), (H, W, C) or, for TIFF, whatever layout the file
    declares (normalised by :func:`_to_hwc`). Errors from the decoders propagate."""
    if path.suffix.lower() in (".tif", ".tiff"):
        return _read_tiff(path)
    with Image.open(path) as im:
        im.load()  # decodes now, so a truncated file fails here and not later in a worker
        if im.mode == "P":  # palette colours, not indices, are the picture
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode == "1":
            im = im.convert("L")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        return np.asarray(im)


def _read_mask_file(path: Path) -> np.ndarray:
    """Decode a mask file to a 2-D array of raw values (palette PNGs give their indices)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        arr = _read_tiff(path)
    else:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and path.suffix.lower() not in (".tif", ".tiff"):
        # A gray mask saved as RGB(A): accept it only when the colour channels agree (lossless).
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2:
        raise ValueError(f"a mask must have one channel of class indices, got an array of shape {arr.shape}")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "ui":
        raise ValueError(f"a mask must hold integer class indices, got dtype {arr.dtype}")
    return arr


def _read_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        arr = series.asarray()
        axes = series.axes
    arr = np.asarray(arr)
    if arr.ndim == 3 and axes.endswith("S"):
        return arr  # contiguous samples: (H, W, C)
    if arr.ndim == 3:
        return np.moveaxis(arr, 0, -1)  # planar samples or pages (SYX, CYX, QYX, ...): (C, H, W)
    if arr.ndim == 2:
        return arr
    raise ValueError(f"TIFF with axes {axes!r} and shape {arr.shape} is not one 2-D image")


def _to_hwc(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _intensity_range(arr: np.ndarray) -> tuple[float, float]:
    """``(offset, scale)`` mapping the file's dtype range onto [0, 1].

    Raises:
        ValueError: a float image outside [0, 1] (floats have no dtype range to scale by), or an
            unsupported dtype.
    """
    if arr.dtype.kind == "b":
        return 0.0, 1.0
    if arr.dtype.kind in "ui":
        info = np.iinfo(arr.dtype)
        return float(info.min), float(info.max) - float(info.min)
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if not (0.0 <= lo and hi <= 1.0) or np.isnan(arr).any():
            raise ValueError(
                f"float image with values in [{lo:g}, {hi:g}]: float images must already lie in [0, 1] "
                "(integer images are scaled by their dtype's range)"
            )
        return 0.0, 1.0
    raise ValueError(f"unsupported pixel type {arr.dtype}")


def _decode_mask(raw: np.ndarray, map_255: bool, dtype: np.dtype) -> np.ndarray:
    if map_255:
        return (raw == 255).astype(dtype)
    return raw.astype(dtype, copy=False)


def _memory_budget() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not exposed on this platform
        total = 8 * 2**30
    return int(total * MEMORY_CACHE_FRACTION)


def _list_folder(folder: Path, problems: list[str], root: Path) -> dict[str, Path]:
    """Supported files of ``folder`` by stem; every other entry is a problem."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        rel = path.relative_to(root)
        if path.name.startswith("."):
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{rel}: not a supported image file (use {', '.join(IMAGE_SUFFIXES)})")
        elif path.stem in found:
            problems.append(f"{rel}: same stem as {found[path.stem].relative_to(root)} (stems must be unique)")
        else:
            found[path.stem] = path
    return found


def load_folder(root: Path, *, input_channels: int, seg_classes: int, input_size: int) -> ImageSet:
    """Read and check every image/mask pair of a folder dataset.

    ``root/images/*`` and ``root/masks/*`` are matched by file stem. Every file is decoded once to
    check it; the decoded arrays are kept when they fit in :data:`MEMORY_CACHE_FRACTION` of RAM.

    Args:
        root: the dataset folder.
        input_channels: channels every image must have.
        seg_classes: the model's output channels; mask values must be < ``max(seg_classes, 2)``.
        input_size: tile side; images must be at least this large in both directions.

    Returns:
        An :class:`ImageSet` in stem order.

    Raises:
        DatasetError: listing every problem: a missing folder, unsupported or duplicate files,
            unreadable or truncated files, an image without a mask or a mask without an image,
            image/mask size mismatch, wrong channel count, image smaller than ``input_size``,
            mask values >= ``max(seg_classes, 2)`` (naming the file and the values).
    """
    root = Path(root)
    missing = [d for d in ("images", "masks") if not (root / d).is_dir()]
    if missing:
        raise DatasetError(
            f"dataset folder {root} lacks {' and '.join(d + '/' for d in missing)}: a folder dataset holds "
            "images/ and masks/ with files matched by stem"
        )
    problems: list[str] = []
    images = _list_folder(root / "images", problems, root)
    masks = _list_folder(root / "masks", problems, root)
    for stem in sorted(set(masks) - set(images)):
        problems.append(f"{masks[stem].relative_to(root)}: mask without an image (no images/{stem}.*)")
    num_classes = max(seg_classes, 2)
    mask_dtype = np.uint8 if num_classes <= 256 else np.uint16 if num_classes <= 65536 else np.int64
    budget = _memory_budget()
    used = 0
    entries: list[ImageEntry] = []
    arrays: list[tuple[np.ndarray, np.ndarray]] = []
    raw_masks: list[tuple[Path, np.ndarray]] = []  # (path, unique values) for the 0/255 check
    for stem in sorted(images):
        ipath = images[stem]
        irel = ipath.relative_to(root)
        if stem not in masks:
            problems.append(f"{irel}: missing mask (no masks/{stem}.* )")
            continue
        mpath = masks[stem]
        mrel = mpath.relative_to(root)
        image = mask = None
        try:
            image = _to_hwc(_read_image_file(ipath), ipath)
            offset, scale = _intensity_range(image)
        except Exception as e:  # noqa: BLE001 - decoders raise many types; each is reported below
            problems.append(f"{irel}: unreadable ({type(e).__name__}: {e})")
            image = None
        try:
            mask = _read_mask_file(mpath)
        except Exception as e:  # noqa: BLE001 - as above
            lossy = mpath.suffix.lower() in (".jpg", ".jpeg")
            hint = " (masks must be lossless: save them as PNG or TIFF)" if lossy else ""
            problems.append(f"{mrel}: unreadable ({type(e).__name__}: {e}){hint}")
            mask = None
        if image is None or mask is None:
            continue
        h, w, c = image.shape
        ok = True
        if mask.shape != (h, w):
            problems.append(
                f"{mrel}: size {mask.shape[1]}x{mask.shape[0]} differs from {irel} ({w}x{h}, width x height)"
            )
            ok = False
        if c != input_channels:
            problems.append(
                f"{irel}: {c} channel(s), but INPUT_CHANNELS is {input_channels} "
                f"(array shape {image.shape} read as H x W x C)"
            )
            ok = False
        if h < input_size or w < input_size:
            problems.append(f"{irel}: {w}x{h} pixels is smaller than INPUT_SIZE={input_size}")
            ok = False
        raw_masks.append((mpath, np.unique(mask)))
        if not ok:
            continue
        entries.append(ImageEntry(stem, h, w, c, offset, scale, ipath, mpath))
        used += image.nbytes + h * w * np.dtype(mask_dtype).itemsize
        if arrays is not None and used <= budget:
            arrays.append((image, mask))
        else:
            arrays = None  # too big to keep: decode per tile instead

    map_255 = (
        num_classes <= 255
        and bool(raw_masks)
        and all(set(u.tolist()) <= {0, 255} for _, u in raw_masks)
        and any(255 in u for _, u in raw_masks)
    )
    saw_255 = False
    for mpath, uniq in raw_masks:
        values = uniq.tolist()
        bad = [v for v in values if not 0 <= v < num_classes] if not map_255 else []
        if bad:
            saw_255 |= 255 in bad
            shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
            hint = " (JPEG is lossy: save masks as PNG or TIFF)" if mpath.suffix.lower() in (".jpg", ".jpeg") else ""
            problems.append(
                f"{mpath.relative_to(root)}: mask value(s) {shown} >= {num_classes} "
                f"(SEG_CLASSES={seg_classes} allows 0..{num_classes - 1}){hint}"
            )
    if problems:
        if saw_255:
            problems.append(
                "note: masks are read as binary 0/255 only when every mask holds just the values 0 and 255; "
                "otherwise values are class indices"
            )
        raise DatasetError(
            f"{len(problems)} problem(s) with the dataset in {root}:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    if not entries:
        raise DatasetError(f"the dataset in {root} has no images (images/ holds no {', '.join(IMAGE_SUFFIXES)} files)")
    if arrays is not None:
        arrays = [(img, _decode_mask(m, map_255, mask_dtype)) for img, m in arrays]
    return ImageSet(entries, arrays, mask_map_255=map_255, mask_dtype=mask_dtype)


# ---------------------------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------------------------
SYNTHETIC_CLASSES = {"background": 0, "line": 1, "ellipse": 2}


def _draw_ellipse(scene, classes, cy, cx, a, b, theta, level, label) -> None:
    size = scene.shape[0]
    r = int(math.ceil(max(a, b)))
    y0, y1 = max(0, int(cy) - r - 1), min(size, int(cy) + r + 2)
    x0, x1 = max(0, int(cx) - r - 1), min(size, int(cx) + r + 2)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(theta), math.sin(theta)
    inside = ((dx * c + dy * s) / a) ** 2 + ((dy * c - dx * s) / b) ** 2 <= 1
    scene[y0:y1, x0:x1][inside] = level
    classes[y0:y1, x0:x1][inside] = label


def _draw_line(scene, classes, cy, cx, length, theta, width, level, label) -> None:
    size = scene.shape[0]
    hy, hx = math.sin(theta) * length / 2, math.cos(theta) * length / 2
    py, px, qy, qx = cy - hy, cx - hx, cy + hy, cx + hx
    margin = width / 2 + 1
    y0, y1 = max(0, int(min(py, qy) - margin)), min(size, int(max(py, qy) + margin) + 1)
    x0, x1 = max(0, int(min(px, qx) - margin)), min(size, int(max(px, qx) + margin) + 1)
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
    entries = [ImageEntry(f"{n:0{width}d}", size, size, channels, 0.0, 255.0) for n in range(num_images)]
    return ImageSet(entries, [(images[n], classes[n]) for n in range(num_images)])


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------
def make_folds(image_ids: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """Partition image ids into ``k`` folds of near-equal size, shuffled by ``seed``.

    Returns:
        ``k`` sorted lists of ids; fold ``f`` is the test set of fold ``f``.

    Raises:
        ValueError: fewer ids than folds (a fold would have no test image), or ``k < 2``.
    """
    ids = sorted(image_ids)
    if k < 2:
        raise ValueError(f"k={k} folds: need at least 2 (TEST_SPLIT <= 0.5)")
    if len(ids) < k:
        raise ValueError(
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


# ---------------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------------
class UNetElasticTransform(BaseDistortion):
    """Elastic deformation as in the U-Net paper (Ronneberger et al. 2015, sec. 3.1).

    Random displacement vectors on a coarse ``grid_size`` x ``grid_size`` grid, drawn from a
    Gaussian with ``sigma`` pixels standard deviation, interpolated bicubically to a per-pixel
    displacement field. (albumentations' own ``ElasticTransform`` smooths per-pixel noise instead,
    Simard et al.'s recipe.) Image: bilinear; mask: nearest neighbour; borders reflected.

    Args:
        sigma: standard deviation of the grid displacements, in pixels.
        grid_size: grid points per side (the paper: 3).
        p: probability of applying the transform.
    """

    class InitSchema(BaseTransformInitSchema):
        sigma: float
        grid_size: int

    def __init__(self, sigma: float = 10.0, grid_size: int = 3, p: float = 0.5):
        super().__init__(
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            keypoint_remapping_method="mask",
            p=p,
            border_mode=cv2.BORDER_REFLECT_101,
        )
        if not sigma >= 0:
            raise ValueError(f"sigma={sigma} must be >= 0")
        if grid_size < 2:
            raise ValueError(f"grid_size={grid_size} must be >= 2")
        self.sigma = float(sigma)
        self.grid_size = int(grid_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        grid = self.random_generator.normal(0, self.sigma, (2, self.grid_size, self.grid_size)).astype(np.float32)
        # Grid points sit on the image's corners, edge midpoints and centre (align-corners
        # sampling); cv2.resize would instead centre them in grid cells and extrapolate outwards.
        dx = _bicubic_upsample(grid[0], height, width)
        dy = _bicubic_upsample(grid[1], height, width)
        xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        return {"map_x": xs + dx, "map_y": ys + dy}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma", "grid_size")


def _bicubic_upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic interpolation of a (g, g) grid whose corner points sit on the image's corner pixels."""
    g = torch.from_numpy(grid)[None, None]
    out = torch.nn.functional.interpolate(g, size=(height, width), mode="bicubic", align_corners=True)
    return out[0, 0].numpy()


def _num(lo: float | None = None, hi: float | None = None, integer: bool = False) -> Callable[[Any], Optional[str]]:
    """Check a number lies in [lo, hi]; returns the problem or None."""

    def check(v: Any) -> Optional[str]:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return f"must be {'an integer' if integer else 'a number'}, got {v!r}"
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"must be in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], got {v!r}"
        return None

    return check


def _range_or_num(lo: float, hi: float) -> Callable[[Any], Optional[str]]:
    """A number, or a [low, high] pair of numbers, in [lo, hi]."""
    single = _num(lo, hi)

    def check(v: Any) -> Optional[str]:
        if isinstance(v, (list, tuple)):
            if len(v) != 2:
                return f"must be a number or a [low, high] pair, got {v!r}"
            for x in v:
                if (problem := single(x)) is not None:
                    return problem
            return None if v[0] <= v[1] else f"needs low <= high, got {v!r}"
        return single(v)

    return check


def _pair(v: Any) -> tuple[float, float]:
    return (float(v[0]), float(v[1])) if isinstance(v, (list, tuple)) else (-float(v), float(v))


# Geometric transforms: bilinear image, nearest-neighbour mask (class indices stay class indices),
# reflected borders (a constant fill would draw artificial edges into the tile).
_GEOMETRY = {
    "border_mode": cv2.BORDER_REFLECT_101,
    "interpolation": cv2.INTER_LINEAR,
    "mask_interpolation": cv2.INTER_NEAREST,
}


@dataclass(frozen=True)
class AugmentationSpec:
    """A registry entry: how to build the transform, and its parameters with defaults and checks."""

    build: Callable[..., A.BasicTransform]
    params: dict[str, tuple[Any, Callable[[Any], Optional[str]]]]
    doc: str


def _shift_scale_rotate(p: float, shift_limit: Any, scale_limit: Any, rotate_limit: Any) -> A.BasicTransform:
    # albumentations 2 warns that ShiftScaleRotate is a special case of Affine; build that.
    lo, hi = _pair(scale_limit)
    return A.Affine(
        translate_percent=_pair(shift_limit), scale=(1 + lo, 1 + hi), rotate=_pair(rotate_limit), p=p, **_GEOMETRY
    )


def _affine(p: float, scale: Any, translate_percent: Any, rotate: Any, shear: Any) -> A.BasicTransform:
    scale = tuple(scale) if isinstance(scale, (list, tuple)) else (float(scale), float(scale))
    return A.Affine(scale=scale, translate_percent=_pair(translate_percent), rotate=_pair(rotate), shear=_pair(shear),
                    p=p, **_GEOMETRY)


AUGMENTATIONS: dict[str, AugmentationSpec] = {
    "HorizontalFlip": AugmentationSpec(lambda p: A.HorizontalFlip(p=p), {}, "mirror left-right"),
    "VerticalFlip": AugmentationSpec(lambda p: A.VerticalFlip(p=p), {}, "mirror top-bottom"),
    "RandomRotate90": AugmentationSpec(lambda p: A.RandomRotate90(p=p), {}, "rotate by 0, 90, 180 or 270 degrees"),
    "ShiftScaleRotate": AugmentationSpec(
        _shift_scale_rotate,
        {
            "shift_limit": (0.0625, _range_or_num(-1, 1)),
            "scale_limit": (0.1, _range_or_num(-0.9, 10)),
            "rotate_limit": (45.0, _range_or_num(-360, 360)),
        },
        "shift (fraction of the side), scale (1 + limit) and rotate (degrees) by random amounts",
    ),
    "Affine": AugmentationSpec(
        _affine,
        {
            "scale": ((0.9, 1.1), _range_or_num(0.01, 100)),
            "translate_percent": (0.0, _range_or_num(-1, 1)),
            "rotate": (0.0, _range_or_num(-360, 360)),
            "shear": (0.0, _range_or_num(-90, 90)),
        },
        "albumentations Affine: scale factor, translation (fraction), rotation and shear (degrees)",
    ),
    "ElasticTransform": AugmentationSpec(
        lambda p, sigma, grid_size: UNetElasticTransform(sigma=sigma, grid_size=grid_size, p=p),
        {"sigma": (10.0, _num(0, None)), "grid_size": (3, _num(2, 64, integer=True))},
        "U-Net paper elastic deformation: grid_size^2 displacements with sigma px std, bicubic",
    ),
    "RandomBrightnessContrast": AugmentationSpec(
        lambda p, brightness_limit, contrast_limit: A.RandomBrightnessContrast(
            brightness_limit=_pair(brightness_limit), contrast_limit=_pair(contrast_limit), p=p
        ),
        {"brightness_limit": (0.2, _range_or_num(-1, 1)), "contrast_limit": (0.2, _range_or_num(-1, 1))},
        "add brightness and scale contrast by random amounts (fractions of the value range)",
    ),
    "GaussNoise": AugmentationSpec(
        lambda p, std_range: A.GaussNoise(std_range=_pair(std_range) if isinstance(std_range, (list, tuple))
                                          else (0.0, float(std_range)), p=p),
        {"std_range": ((0.01, 0.05), _range_or_num(0, 1))},
        "add Gaussian noise; std drawn from std_range (fraction of the value range 1.0)",
    ),
}

DEFAULT_AUGMENTATIONS: list[dict[str, Any]] = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "VerticalFlip", "p": 0.5},
    {"name": "RandomRotate90", "p": 0.5},
    {"name": "ShiftScaleRotate", "p": 0.3, "shift_limit": 0.05, "scale_limit": 0.1, "rotate_limit": 30},
    {"name": "ElasticTransform", "p": 0.3, "sigma": 10.0, "grid_size": 3},
    {"name": "RandomBrightnessContrast", "p": 0.3, "brightness_limit": 0.1, "contrast_limit": 0.1},
    {"name": "GaussNoise", "p": 0.2, "std_range": [0.01, 0.04]},
]


def augmentation_problems(spec: Any) -> list[str]:
    """Every problem in a user's augmentation list, each with its fix (empty when it is valid).

    ``spec`` is a list of mappings ``{name: <registry name>, p: <probability>, <param>: <value>}``.
    Checks: the list itself, each entry is a mapping, ``name`` is in :data:`AUGMENTATIONS` (with a
    "did you mean"), ``p`` is given and in [0, 1], each parameter is known to that transform (with
    a "did you mean") and its value is valid; finally albumentations' own checks.
    """
    if not isinstance(spec, (list, tuple)):
        return [f"must be a list of {{name: Transform, p: probability, ...}} entries, got {type(spec).__name__}"]
    problems: list[str] = []
    names = sorted(AUGMENTATIONS)
    for n, entry in enumerate(spec):
        where = f"entry {n}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping like {{name: HorizontalFlip, p: 0.5}}, got {entry!r}")
            continue
        name = entry.get("name")
        if not isinstance(name, str) or name not in AUGMENTATIONS:
            hint = _did_you_mean(name, names) if isinstance(name, str) else ""
            what = "missing 'name'" if name is None else f"unknown transform {name!r}{hint}"
            problems.append(f"{where}: {what}; choose from {', '.join(names)}")
            continue
        where = f"entry {n} ({name})"
        registered = AUGMENTATIONS[name]
        entry_problems = []
        if "p" not in entry:
            entry_problems.append(f"{where}: missing 'p' (the probability of applying it, in [0, 1])")
        elif (problem := _num(0, 1)(entry["p"])) is not None:
            entry_problems.append(f"{where}: p {problem}")
        for key, value in entry.items():
            if key in ("name", "p"):
                continue
            if key not in registered.params:
                valid = ", ".join(registered.params) or "none"
                entry_problems.append(
                    f"{where}: unknown parameter {key!r}{_did_you_mean(key, list(registered.params))}; "
                    f"valid parameters: {valid}"
                )
            elif (problem := registered.params[key][1](value)) is not None:
                entry_problems.append(f"{where}: {key} {problem}")
        if not entry_problems:
            try:
                _build_one(entry)
            except (ValueError, TypeError) as e:  # albumentations' own validation (pydantic)
                entry_problems.append(f"{where}: rejected by albumentations: {str(e).splitlines()[0]}")
        problems += entry_problems
    return problems


def _build_one(entry: dict[str, Any]) -> A.BasicTransform:
    registered = AUGMENTATIONS[entry["name"]]
    kwargs = {key: default for key, (default, _) in registered.params.items()}
    kwargs.update({k: v for k, v in entry.items() if k not in ("name", "p")})
    return registered.build(p=float(entry["p"]), **kwargs)


def build_augmentation(spec: Optional[Sequence[dict[str, Any]]], seed: Optional[int] = None) -> Optional[A.Compose]:
    """An albumentations ``Compose`` of the listed transforms, applied in order (None for an empty
    list or None).

    Geometric transforms move image and mask together (mask: nearest neighbour, so class indices
    stay class indices; borders reflected, so no artificial edges appear).

    Args:
        spec: see :func:`augmentation_problems`.
        seed: seeds the Compose's own random generators (reseeded per DataLoader worker).

    Raises:
        ValueError: listing every problem :func:`augmentation_problems` finds.
    """
    if not spec:
        return None
    problems = augmentation_problems(spec)
    if problems:
        raise ValueError("invalid augmentations:\n" + "\n".join(f"  - {p}" for p in problems))
    return A.Compose([_build_one(entry) for entry in spec], seed=seed)


# ---------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------
class TileDataset(Dataset):
    """Tiles of the images of an :class:`ImageSet`, optionally augmented.

    Args:
        images: the images and masks.
        tiles: ``(image index, y, x)`` of each tile's top-left corner.
        input_size: tile side.
        augment: a Compose from :func:`build_augmentation`, or None.

    Attributes:
        ids: tile ids, ``"<image id>_y<row>_x<col>"``.
        labels: int64 (N,), each tile's boundary label before augmentation.
    """

    def __init__(self, images: ImageSet, tiles: Sequence[tuple[int, int, int]], input_size: int,
                 augment: Optional[A.Compose] = None):
        self.images = images
        self.tiles = [tuple(map(int, t)) for t in tiles]
        self.input_size = input_size
        self.augment = augment
        self.ids = [_tile_id(images.entries[i].id, y, x) for i, y, x in self.tiles]
        self.labels = np.array([boundary_label(self._raw(k)[1]) for k in range(len(self.tiles))], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def image_ids(self) -> list[str]:
        """Ids of the images this dataset's tiles come from, sorted."""
        return sorted({self.images.entries[i].id for i, _, _ in self.tiles})

    def _raw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        i, y, x = self.tiles[k]
        image, mask = self.images.get(i)
        s = self.input_size
        return image[y:y + s, x:x + s], mask[y:y + s, x:x + s]

    def reseed(self, seed: int) -> None:
        """Reseed the augmentation's random generators (done per DataLoader worker)."""
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def __getitem__(self, k: int) -> dict[str, Any]:
        raw_image, mask = self._raw(k)
        entry = self.images.entries[self.tiles[k][0]]
        image = raw_image.astype(np.float32)
        if entry.offset:
            image -= entry.offset
        image *= np.float32(1.0 / entry.scale)
        if self.augment is not None:
            out = self.augment(image=image, mask=mask)
            image = np.clip(out["image"], 0.0, 1.0, dtype=np.float32)
            mask = out["mask"]
            if image.ndim == 2:  # some transforms drop a single channel axis
                image = image[..., None]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "label": torch.tensor(boundary_label(mask), dtype=torch.int64),
            "id": self.ids[k],
            "index": torch.tensor(k, dtype=torch.int64),
        }


def tiles_of(
    images: ImageSet, image_indices: Sequence[int], input_size: int, overlap: int
) -> list[tuple[int, int, int]]:
    """``(image index, y, x)`` of every tile of the given images, row by row."""
    tiles = []
    for i in image_indices:
        e = images.entries[i]
        for y in tile_positions(e.height, input_size, overlap):
            for x in tile_positions(e.width, input_size, overlap):
                tiles.append((i, y, x))
    return tiles


@dataclass
class Splits:
    """Train and test datasets of one fold, and which images went where."""

    train: TileDataset
    test: TileDataset
    fold: int
    num_folds: int
    train_ids: list[str]
    test_ids: list[str]


def build_datasets(
    source: str,
    *,
    split_file: Path,
    cache_dir: Path,
    seed: int,
    input_size: int,
    input_channels: int,
    seg_classes: int,
    test_split: float,
    fold: int,
    cross_validation: bool,
    train_composition: str,
    test_composition: str,
    tile_overlap: int = 0,
    augmentations: Optional[list[dict[str, Any]]],
    synthetic_images: int,
    synthetic_size: int,
) -> Splits:
    """Load a dataset, split its images into folds and build the train/test tile datasets of ``fold``.

    Args:
        source: ``"synthetic"`` or a folder with ``images/`` and ``masks/``.
        split_file: the run's ``tts.json``; written if absent, reused (and checked) if present.
        cache_dir: where the synthetic data is cached.
        seed: seeds the synthetic data, the split and the augmentation.
        input_size: tile side in pixels.
        input_channels: image channels (checked against the files).
        seg_classes: model output channels: 1 = binary, >= 2 = classes incl. background.
        test_split: K = round(1 / test_split) folds; each fold's test set is about 1/K of the images.
        fold: which fold's test set to hold out (0 ... K-1).
        cross_validation: recorded in the split file (the caller loops over the folds).
        train_composition, test_composition: ``"full"`` or ``"boundary"`` (only tiles whose mask
            contains a class boundary, judged before augmentation).
        tile_overlap: pixels shared by neighbouring tiles.
        augmentations: transforms for the training set (see :func:`build_augmentation`), or None.
        synthetic_images, synthetic_size: number and side of the generated images.

    Returns:
        :class:`Splits`.

    Raises:
        ValueError: an argument out of range (named, with the valid values).
        DatasetError: the files or the split file are unusable (every problem listed).
    """
    for name, value in (("train_composition", train_composition), ("test_composition", test_composition)):
        if value not in COMPOSITIONS:
            raise ValueError(f"{name}={value!r} is not one of {list(COMPOSITIONS)}")
    if input_size < 1:
        raise ValueError(f"input_size={input_size} must be >= 1")
    if input_channels < 1:
        raise ValueError(f"input_channels={input_channels} must be >= 1")
    if seg_classes < 1:
        raise ValueError(f"seg_classes={seg_classes} must be >= 1")
    if not 0 <= tile_overlap < input_size:
        raise ValueError(f"tile_overlap={tile_overlap} must be in [0, input_size={input_size})")
    k = num_folds(test_split)
    if k < 2:
        raise ValueError(f"test_split={test_split} gives K=round(1/test_split)={k} folds: use test_split <= 0.5")
    if not 0 <= fold < k:
        raise ValueError(f"fold={fold} does not exist: test_split={test_split} gives folds 0..{k - 1}")

    if source == "synthetic":
        if synthetic_size < input_size:
            raise ValueError(f"synthetic_size={synthetic_size} is smaller than input_size={input_size}")
        if synthetic_images < k:
            raise ValueError(
                f"synthetic_images={synthetic_images} is fewer than the K={k} folds of test_split={test_split}"
            )
        images = load_synthetic(cache_dir, seed=seed, num_images=synthetic_images, size=synthetic_size,
                                channels=input_channels, seg_classes=seg_classes)
    else:
        root = Path(source)
        if not root.is_dir():
            raise DatasetError(
                f"dataset folder {source!r} does not exist: give a folder with images/ and masks/, or 'synthetic'"
            )
        images = load_folder(root, input_channels=input_channels, seg_classes=seg_classes, input_size=input_size)

    folds = resolve_split(split_file, images.ids, seed=seed, k=k,
                          source=source if source == "synthetic" else str(Path(source).resolve()),
                          cross_validation=cross_validation)
    test_ids = folds[fold]
    held_out = set(test_ids)
    index = {image_id: i for i, image_id in enumerate(images.ids)}
    train_ids = [i for i in images.ids if i not in held_out]

    def dataset(ids: list[str], composition: str, augment: Optional[A.Compose], which: str) -> TileDataset:
        tiles = tiles_of(images, [index[i] for i in ids], input_size, tile_overlap)
        ds = TileDataset(images, tiles, input_size, augment)
        if composition == "boundary":
            keep = np.flatnonzero(ds.labels == 1)
            if keep.size == 0:
                raise DatasetError(
                    f"the {which} set of fold {fold} has no tile with a class boundary: "
                    f"use {which.upper()}_SET_COMPOSITION=full"
                )
            ds = TileDataset(images, [ds.tiles[j] for j in keep], input_size, augment)
        return ds

    augment = build_augmentation(augmentations, seed=seed) if augmentations else None
    return Splits(
        train=dataset(train_ids, train_composition, augment, "train"),
        test=dataset(list(test_ids), test_composition, None, "test"),
        fold=fold,
        num_folds=k,
        train_ids=train_ids,
        test_ids=list(test_ids),
    )


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, reproducible from ``seed + epoch`` (like DistributedSampler,
    for one process). Call ``set_epoch`` before each epoch, or every epoch repeats the same order."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order, without padding, so across ranks every sample
    is evaluated exactly once (ranks may get one sample more or less)."""

    def __init__(self, length: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def _seed_worker(worker_id: int) -> None:
    """Seed a DataLoader worker from the loader's generator (``torch.initial_seed()`` is already
    ``base_seed + worker_id``), including the augmentation's own generators, so workers draw
    different but reproducible augmentations."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(seed)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    num_workers: int,
    seed: int,
    distributed: bool,
    pin_memory: bool,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> DataLoader:
    """A DataLoader for training (shuffled) or evaluation (ordered).

    Training: a fresh permutation per epoch from ``seed`` (``DistributedSampler`` when
    distributed); both samplers have ``set_epoch``, which the trainer calls each epoch. The last
    batch is dropped only when it would hold a single tile (BatchNorm statistics of one sample
    are noise). Evaluation: in order; when distributed, rank ``r`` gets indices ``r::world`` with
    no padding, so no sample is counted twice. Workers persist across epochs and are seeded from
    ``seed`` and the rank.

    Args:
        dataset: a map-style dataset (e.g. :class:`TileDataset`).
        batch_size: samples per batch and per process.
        train: training (shuffle) or evaluation (ordered) loader.
        num_workers: worker processes (0 = load in this process).
        seed: seeds the shuffling and the workers' random generators.
        distributed: shard across the processes of the initialised process group.
        pin_memory: page-locked batches (useful with CUDA).
        rank, world_size: this process's place; default: from ``torch.distributed``.

    Raises:
        ValueError: ``batch_size < 1``, ``num_workers < 0``, or a training set that leaves no batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    if distributed:
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    else:
        rank, world_size = 0, 1
    drop_last = False
    if train:
        sampler: Sampler[int] = (
            DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
            if distributed else EpochShuffleSampler(len(dataset), seed)
        )
        per_process = len(sampler)
        drop_last = batch_size > 1 and per_process % batch_size == 1
        if per_process == 0 or (drop_last and per_process == 1):
            raise ValueError(
                f"the training set has {len(dataset)} tile(s), {per_process} per process: too few to train on "
                "(add images, lower TEST_SPLIT or use TRAIN_SET_COMPOSITION=full)"
            )
        # The main process's augmentation stream differs per rank too (num_workers=0).
        if hasattr(dataset, "reseed"):
            dataset.reseed(seed + 1_000_003 * rank)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    generator = torch.Generator()
    generator.manual_seed(seed + 1_000_003 * rank)  # the workers' base seed, different per rank
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
    )
