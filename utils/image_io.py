"""Reading dataset files: images and masks of a folder dataset, checked and decoded.

``DATASET_DIR/images/*`` and ``DATASET_DIR/masks/*`` are matched by file stem:

* images: PNG, JPEG (Pillow) or TIFF (:mod:`utils.tiff`, prediction's reader: a stack of pages gives
  one channel per page sample); 8/16-bit integer, or float already in [0, 1];
  grayscale or multi-channel, the channel count must equal ``input_channels``;
* masks: one channel of class indices 0 ... K-1, or binary 0/255. When *every* mask holds only the
  values 0 and 255 the dataset is read as binary and 255 becomes class 1 (so the ISBI 2012 EM
  labels, 255 = cell interior, load as they are). Masks must be lossless: a JPEG mask has stray
  values and is reported as such;
* dot-files (``.DS_Store``) are ignored, and so are other non-image files (a README) with a one-line
  notice; a broken link is an error.

While checking, every image is described by its identity and its intensities: a content hash of
its file (:func:`file_digest`; the split and the checkpoint keep it, so a file replaced under the
same name is refused, see :mod:`utils.splits`) and the range of its raw values
(:func:`percentile_range`). :class:`InputScaling` gathers the training images' scaling and ranges
for the checkpoint, so that prediction scales an input as training did and warns when it lies far
outside what training saw.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from utils.tiff import RasterError, read_tiff

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Decoded folder datasets stay in memory while they take at most this fraction of the machine's
# RAM, shared out among its training processes (each DataLoader worker shares its process's copy
# copy-on-write); beyond it, files are decoded per tile with a small per-process cache of recently
# used images.
MEMORY_CACHE_FRACTION = 0.25
LAZY_CACHE_IMAGES = 8
#: Percentiles of the pixel values that stand for an image's intensity range: robust to a few hot
#: or dead pixels, yet they still see a small bright object (0.1 % of a 512 x 512 image is 262 pixels).
RANGE_PERCENTILES = (0.1, 99.9)
#: At most this many pixels of an image (an evenly strided sample) go into :func:`percentile_range`.
RANGE_SAMPLE = 2**20
#: An input whose central range spans less than this fraction of training's range is far from it.
NARROW_FRACTION = 0.1
#: ... as is one lying mostly outside training's range widened by this fraction of its span each way.
WIDEN_FRACTION = 0.5


class DatasetError(ValueError):
    """The dataset on disk (or its split file) cannot be used; the message lists every problem."""


@dataclass(frozen=True)
class ImageEntry:
    """One image of a dataset: its id, size, intensity scaling and (folder datasets) files.

    Pixel values become ``(raw - offset) / scale``; for integer files that maps the dtype's range
    onto [0, 1]. The loaders also fill ``dtype`` (the raw pixels' dtype name), ``intensity`` (the
    :data:`RANGE_PERCENTILES` of the raw values, :func:`percentile_range`) and, for folder
    datasets, ``digest`` (:func:`file_digest` of the image file).
    """

    id: str
    height: int
    width: int
    channels: int
    offset: float
    scale: float
    image_path: Optional[Path] = None
    mask_path: Optional[Path] = None
    dtype: str = ""
    intensity: Optional[tuple[float, float]] = None
    digest: Optional[str] = None


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
    def digests(self) -> Optional[dict[str, str]]:
        """``{image id: content hash}`` (:func:`file_digest`), or None for data without files (synthetic)."""
        if any(e.digest is None for e in self.entries):
            return None
        return {e.id: e.digest for e in self.entries}

    @property
    def in_memory(self) -> bool:
        return self.arrays is not None

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image (H, W, C) raw dtype, mask (H, W) class indices)`` of image ``i``."""
        if self.arrays is not None:
            return self.arrays[i]
        return recently_used(self._recent, i, self._decode)

    def _decode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        entry = self.entries[i]
        image = _to_hwc(_read_image_file(entry.image_path), entry.image_path)
        return image, _decode_mask(_read_mask_file(entry.mask_path), self.mask_map_255, self.mask_dtype)


def recently_used(cache: OrderedDict, key: Any, load: Callable[[Any], Any], size: Optional[int] = None) -> Any:
    """``cache[key]``, made by ``load(key)`` when missing; ``cache`` keeps the ``size`` (default
    :data:`LAZY_CACHE_IMAGES`) most recently used entries."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    cache[key] = value = load(key)
    if len(cache) > (LAZY_CACHE_IMAGES if size is None else size):
        cache.popitem(last=False)
    return value


# ---------------------------------------------------------------------------------------------


def _read_image_file(path: Path) -> np.ndarray:
    """Decode an image file as stored: (H, W) or (H, W, C) (normalised by :func:`_to_hwc`).
    Errors from the decoders propagate."""
    if path.suffix.lower() in (".tif", ".tiff"):
        return _read_tiff(path)
    return read_pillow_image(path)


def _read_tiff(path: Path) -> np.ndarray:
    """A whole TIFF ``(H, W, C)``, read as :mod:`utils.raster` reads its windows (:mod:`utils.tiff`).

    Raises:
        ValueError: the file cannot be read; the message gives the cause (the caller names the file).
    """
    try:
        return read_tiff(path)
    except RasterError as exc:
        raise ValueError(str(exc).removeprefix(f"{path}: ")) from None


def read_pillow_image(path: Path) -> np.ndarray:
    """Decode a PNG / JPEG whole as the picture it shows: (H, W) or (H, W, C) in the file's dtype.

    Palette images give their colours (RGB, or RGBA with transparency), 1-bit images become 8-bit
    gray, and CMYK / YCbCr / LAB / HSV become RGB. Shared by the dataset loader and
    :mod:`utils.raster`, so training and prediction see the same pixels.

    Raises:
        Whatever Pillow raises for a missing, truncated or undecodable file (decoded on the spot,
        so a bad file fails here and not later in a worker).
    """
    with Image.open(path) as im:
        im.load()
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
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
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


def _to_hwc(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def dtype_intensity_range(dtype: np.dtype) -> tuple[float, float]:
    """``(offset, scale)`` such that ``(raw - offset) / scale`` maps a dtype's range onto [0, 1].

    Integers use their dtype's full range (uint8 / 255, uint16 / 65535, int16 from -32768); bool
    and float are taken as they are ``(0, 1)`` (a float image must already lie in [0, 1]; checking
    that is the caller's job). Shared by the dataset loader and :mod:`utils.raster`.

    Raises:
        ValueError: an unsupported dtype (complex, object, ...).
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return 0.0, 1.0
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max) - float(info.min)
    if dtype.kind == "f":
        return 0.0, 1.0
    raise ValueError(f"unsupported pixel type {dtype}")


def _intensity_range(arr: np.ndarray) -> tuple[float, float]:
    """``(offset, scale)`` mapping the file's dtype range onto [0, 1].

    Raises:
        ValueError: a float image outside [0, 1] (floats have no dtype range to scale by), or an
            unsupported dtype.
    """
    offset, scale = dtype_intensity_range(arr.dtype)
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if not (0.0 <= lo and hi <= 1.0) or np.isnan(arr).any():
            raise ValueError(
                f"float image with values in [{lo:g}, {hi:g}]: float images must already lie in [0, 1] "
                "(integer images are scaled by their dtype's range)"
            )
    return offset, scale


def to_unit_range(raw: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """Raw pixel values as float32 ``(raw - offset) / scale``: the one scaling that training,
    evaluation and prediction all apply (multiplying by ``1 / scale``, so every path gives the same
    bits)."""
    image = raw.astype(np.float32)
    if offset:
        image -= np.float32(offset)
    image *= np.float32(1.0 / scale)
    return image


def file_digest(path: Path) -> str:
    """Content hash of a file's bytes: 32 hex digits of BLAKE2b (16-byte digest), read in 1 MiB blocks.

    The identity of an image in a split (:mod:`utils.splits`): another file under the same name
    has another hash. BLAKE2b runs at about 1 GB/s, so it costs little beside decoding the file.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def percentile_range(raw: np.ndarray) -> tuple[float, float]:
    """The :data:`RANGE_PERCENTILES` of an array's values (all channels together), in its own units;
    an array larger than :data:`RANGE_SAMPLE` values is sampled with an even stride."""
    flat = raw.reshape(-1).view(np.uint8) if raw.dtype.kind == "b" else raw.reshape(-1)
    lo, hi = np.percentile(flat[::max(1, flat.size // RANGE_SAMPLE)], RANGE_PERCENTILES)
    return float(lo), float(hi)


@dataclass(frozen=True)
class InputScaling:
    """How training scaled its inputs, stored in the checkpoint (``split["inputs"]``) so that
    prediction scales the same way and can tell an input far from what training saw.

    Attributes:
        scaling: ``{dtype name: (offset, scale)}`` for every dtype among the training images; their
            pixels became ``(raw - offset) / scale``.
        seen: the range the training pixels covered after that scaling: the lowest and highest of
            the images' :data:`RANGE_PERCENTILES`.
    """

    scaling: Mapping[str, tuple[float, float]]
    seen: tuple[float, float]

    @classmethod
    def of(cls, entries: Sequence[ImageEntry]) -> "InputScaling":
        """The scaling of the images ``entries`` (filled by the loaders: ``dtype`` and ``intensity``).

        Raises:
            ValueError: no entries, or an entry the loaders did not describe.
        """
        if not entries:
            raise ValueError("InputScaling.of needs at least one training image")
        if any(not e.dtype or e.intensity is None for e in entries):
            raise ValueError("InputScaling.of needs images read by the dataset loaders (dtype and intensity)")
        scaling = {e.dtype: (float(e.offset), float(e.scale)) for e in entries}
        lows = [(e.intensity[0] - e.offset) / e.scale for e in entries]
        highs = [(e.intensity[1] - e.offset) / e.scale for e in entries]
        return cls(dict(sorted(scaling.items())), (round(min(lows), 6), round(max(highs), 6)))

    def as_dict(self) -> dict[str, Any]:
        """The plain form stored in the checkpoint: ``{"scaling": {dtype: [offset, scale]}, "seen": [lo, hi]}``."""
        return {"scaling": {k: list(v) for k, v in self.scaling.items()}, "seen": list(self.seen)}

    @classmethod
    def from_dict(cls, record: Optional[Mapping[str, Any]]) -> Optional["InputScaling"]:
        """The inverse of :meth:`as_dict`; None for None (a checkpoint made before the record existed).

        Raises:
            ValueError: a malformed record (naming what is wrong).
        """
        if record is None:
            return None
        try:
            scaling = {str(k): (float(v[0]), float(v[1])) for k, v in dict(record["scaling"]).items()}
            lo, hi = (float(v) for v in record["seen"])
            for name, (_, scale) in scaling.items():
                np.dtype(name)
                if not scale > 0:
                    raise ValueError(f"scale {scale} of {name}")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed input scaling record {dict(record)!r} ({type(e).__name__}: {e})") from None
        if not scaling or not lo <= hi:
            raise ValueError(f"malformed input scaling record {dict(record)!r}")
        return cls(scaling, (lo, hi))

    def scaling_for(self, dtype: Any) -> tuple[float, float]:
        """``(offset, scale)`` of an input of ``dtype``: training's scaling of that dtype; for another
        integer dtype, training's scaling when training saw exactly one dtype, an integer one (a
        uint16 file holding 8-bit values is then scaled as the uint8 training images were); else
        the dtype's own range (:func:`dtype_intensity_range`: floats and bools as they are).

        Raises:
            ValueError: an unsupported dtype.
        """
        dtype = np.dtype(dtype)
        own = dtype_intensity_range(dtype)
        if dtype.name in self.scaling:
            return self.scaling[dtype.name]
        if dtype.kind in "ui" and len(self.scaling) == 1:
            (name, scaling), = self.scaling.items()
            if np.dtype(name).kind in "ui":
                return scaling
        return own

    def problem(self, lo: float, hi: float) -> Optional[str]:
        """Why an input whose scaled values span ``[lo, hi]`` (its :data:`RANGE_PERCENTILES`) is far
        from :attr:`seen`, or None when it is not: its span is under :data:`NARROW_FRACTION` of
        training's, or most of it lies outside training's range widened by :data:`WIDEN_FRACTION`
        of its span on each side. The answer completes "its intensities ... the range of the training images"."""
        seen_lo, seen_hi = self.seen
        span = max(seen_hi - seen_lo, 1e-6)
        if hi - lo < NARROW_FRACTION * span:
            return f"span only {100 * (hi - lo) / span:.1f} % of"
        inside = min(hi, seen_hi + WIDEN_FRACTION * span) - max(lo, seen_lo - WIDEN_FRACTION * span)
        if inside < 0.5 * (hi - lo):
            return f"lie mostly {'above' if lo + hi > seen_lo + seen_hi else 'below'}"
        return None

    def describe(self) -> str:
        """The scaling in words, e.g. ``"uint8: (raw - 0) / 255"``."""
        return ", ".join(f"{k}: (raw - {o:g}) / {s:g}" for k, (o, s) in self.scaling.items())


def scaling_for(dtype: Any, inputs: Optional[InputScaling]) -> tuple[float, float]:
    """``(offset, scale)`` for an input of ``dtype``: :meth:`InputScaling.scaling_for`, or the dtype's
    range (:func:`dtype_intensity_range`) without a record (a checkpoint made before it existed).

    Raises:
        ValueError: an unsupported dtype.
    """
    return dtype_intensity_range(dtype) if inputs is None else inputs.scaling_for(dtype)


def _decode_mask(raw: np.ndarray, map_255: bool, dtype: np.dtype) -> np.ndarray:
    if map_255:
        return (raw == 255).astype(dtype)
    return raw.astype(dtype, copy=False)


def memory_budget() -> int:
    """Bytes of decoded data a process may keep in memory: MEMORY_CACHE_FRACTION of the RAM, shared
    out among the training processes of this machine (:func:`utils.util.local_processes`; each
    holds its own copy of what it decodes)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not exposed on this platform
        total = 8 * 2**30
    from utils.util import local_processes  # here, not at the top: reading files needs no torch

    return int(total * MEMORY_CACHE_FRACTION) // local_processes()


def _list_folder(folder: Path, problems: list[str], root: Path) -> dict[str, Path]:
    """Supported files of ``folder`` by stem. Files and folders that are not images (a README,
    notes.txt) are ignored with a one-line notice; a broken link or an unreadable image name is a problem."""
    found: dict[str, Path] = {}
    ignored: list[str] = []
    for path in sorted(folder.iterdir()):
        rel = path.relative_to(root)
        if path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():
            problems.append(f"{rel}: a broken symbolic link (to {os.readlink(path)!r}, which does not exist)")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append(path.name + ("/" if path.is_dir() else ""))
        elif not path.is_file():
            problems.append(f"{rel}: not a file (an image name on a {'folder' if path.is_dir() else 'special file'})")
        elif path.stem in found:
            problems.append(f"{rel}: same stem as {found[path.stem].relative_to(root)} (stems must be unique)")
        else:
            found[path.stem] = path
    if ignored:
        print(f"note: ignoring {len(ignored)} non-image entr{'y' if len(ignored) == 1 else 'ies'} in "
              f"{folder.relative_to(root)}/: {', '.join(ignored[:5])}{', …' if len(ignored) > 5 else ''}",
              file=sys.stderr)
    return found


def load_folder(root: Path, *, input_channels: int, seg_classes: int, input_size: int) -> ImageSet:
    """Read and check every image/mask pair of a folder dataset.

    ``root/images/*`` and ``root/masks/*`` are matched by file stem. Every file is decoded once to
    check it; the decoded arrays are kept when they fit in :data:`MEMORY_CACHE_FRACTION` of RAM.
    Each image's entry records its dtype, intensity range and content hash (see :class:`ImageEntry`).

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
    budget = memory_budget()
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
            described = dict(dtype=image.dtype.name, intensity=percentile_range(image), digest=file_digest(ipath))
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
        entries.append(ImageEntry(stem, h, w, c, offset, scale, ipath, mpath, **described))
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
    # A 0/255 dataset with a few odd masks: name those masks only, not every mask holding 255.
    binary = [set(u.tolist()) <= {0, 255} and 255 in u for _, u in raw_masks]
    looks_255 = not map_255 and num_classes <= 255 and sum(binary) > len(binary) / 2
    saw_255 = False
    for (mpath, uniq), is_binary in zip(raw_masks, binary):
        values = uniq.tolist()
        if looks_255:
            if not set(values) <= {0, 255}:
                odd = ", ".join(str(v) for v in values if v not in (0, 255))
                problems.append(f"{mpath.relative_to(root)}: mask value(s) {odd} are neither 0 nor 255 (the other "
                                f"masks of this dataset are binary 0/255): fix this mask")
            continue
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
