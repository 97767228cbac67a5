"""Large-scene image reading for whole-image prediction (writing is :mod:`utils.raster_write`).

Scenes may be tens of thousands of pixels a side (orbiter scenes, EM sections, microscopy
mosaics), so nothing here needs a whole large image in memory. :func:`open_image` returns an
:class:`ImageReader`; windows come back ``(h, w, C)`` in the file's dtype:

* TIFF / BigTIFF (tifffile, through :mod:`utils.tiff`, which the training data loader reads with
  too), never loaded whole:

  - uncompressed contiguous data is memory-mapped (``numpy.memmap`` at the data offset); a window
    touches only the file pages it covers, and those are page cache, not process memory;
  - tiled or strip-compressed data is decoded segment by segment: a window decodes only the tiles
    or strips it intersects. Decoded segments are kept in a small LRU cache (``cache_bytes``,
    default :data:`DEFAULT_CACHE_BYTES`) because overlapping windows, and every window along a row
    of a striped file, need the same segments again. The most recent segment is always kept, so a
    file stored as a single compressed strip is decoded once (that strip is then the memory cost).
  - grayscale, RGB and multi-channel, planar or contiguous samples; 8/16/32-bit integer and float.
    A series of several pages (a stack written page by page) gives one channel per page sample,
    as the training data loader reads it (the same reader). Compressions tifffile decodes without extra packages
    include deflate/zlib and lzma; LZW and JPEG need ``pip install imagecodecs``.

* GeoTIFF and JPEG 2000 (``.jp2``/``.j2k``) go through rasterio (GDAL) when it is installed; GDAL
  reads windows block by block. Its block cache (``GDAL_CACHEMAX``, by default 5 % of the RAM, which
  held a whole 16384 x 8192 scene after one pass) is bounded during each of our reads to two
  :attr:`ImageReader.chunk_rows` chunks (:attr:`ImageReader.gdal_cache_bytes`): a read of a whole
  chunk decodes each block once, so a larger cache would only hold blocks never needed again. rasterio is an
  optional dependency: without it a GeoTIFF is read by tifffile (its GeoTIFF tags are still kept,
  so the output mask is georeferenced all the same) and a ``.jp2`` is an error that says to
  ``pip install rasterio``.

* PNG / JPEG (Pillow) are decoded whole on open: neither format can be read by window (PNG rows
  are one deflate stream, baseline JPEG one entropy-coded stream), and images in these formats are
  small in practice. Pillow's decompression-bomb limit applies; a larger scene should be a tiled
  TIFF. 16-bit colour PNGs are refused because Pillow would silently reduce them to 8 bits.

Intensity: ``(raw - reader.offset) / reader.scale`` maps onto [0, 1] (:meth:`ImageReader.normalize`).
Integer images use their dtype's range (uint8 / 255, uint16 / 65535), as the training data does;
float images must already lie in [0, 1]. A float image of at most :data:`FLOAT_SCAN_PIXELS` pixels
is scanned whole on open (window by window); a larger one is checked on a 3x3 grid of 256x256
windows only (:data:`FLOAT_SAMPLE_SIDE`), and :meth:`ImageReader.normalize` checks every window
it converts, so a bad value anywhere is still reported when prediction reaches it.
:meth:`ImageReader.use_scaling` scales as a checkpoint's training did instead
(:class:`utils.image_io.InputScaling`: a uint16 file holding 8-bit values is scaled like uint8
training images) and measures the image on a sample of windows (:data:`RANGE_SAMPLE_SIDE`) to
warn when it lies far outside what training saw.

**A whole pass** (prediction): :func:`row_chunks` reads every row once, top to bottom, in chunks
aligned to the file's blocks (tiles or strips, :attr:`ImageReader.chunk_rows`), and for formats that
decode (compressed TIFF, GeoTIFF, JPEG 2000) by several threads at once, each with its own handle:
a lossless JPEG 2000 decodes at ~0.1 s per megapixel on one core.

Every problem with a file raises :class:`RasterError` naming the file and the cause.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
from PIL import Image

from utils.image_io import (RANGE_PERCENTILES, RANGE_SAMPLE, InputScaling, dtype_intensity_range, percentile_range,
                            read_pillow_image, scaling_for, to_unit_range)
from utils.tiff import RasterError, TiffImage, geotiff_tags

TIFF_SUFFIXES = (".tif", ".tiff")
JP2_SUFFIXES = (".jp2", ".j2k")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
SUPPORTED_SUFFIXES = PILLOW_SUFFIXES + TIFF_SUFFIXES + JP2_SUFFIXES

# Decoded TIFF segments kept per reader, in bytes.
DEFAULT_CACHE_BYTES = 128 * 2**20
# Float images up to this many pixels are range-checked whole on open; larger ones are sampled on
# a 3x3 grid of windows of this side.
FLOAT_SCAN_PIXELS = 4096 * 4096
FLOAT_SAMPLE_SIDE = 256
# A chunk of :func:`row_chunks` holds about this many bytes (whole rows of the file's blocks, at least one).
CHUNK_BYTES = 4 * 2**20
# Rows read at a time when scanning a whole image (float check, overlay) stay under this many bytes.
SCAN_BAND_BYTES = 64 * 2**20
# use_scaling measures images up to RANGE_SAMPLE pixels whole, larger ones on an evenly spaced
# RANGE_SAMPLE_GRID x RANGE_SAMPLE_GRID grid of windows of this side (at most 1.6 M pixels read).
RANGE_SAMPLE_SIDE = 256
RANGE_SAMPLE_GRID = 5

@dataclass(frozen=True)
class GeoRef:
    """Georeferencing of an image, kept so an output mask can carry the same.

    Attributes:
        crs: coordinate reference system as WKT or ``"EPSG:<code>"``, or None when unknown.
        transform: affine pixel-to-map transform ``(a, b, c, d, e, f)``:
            ``x = a * col + b * row + c``, ``y = d * col + e * row + f`` (rasterio / GDAL order).
        tiff_tags: the input's GeoTIFF tags as ``(code, tiff type, value)``, copied verbatim into a
            TIFF output (empty when the input was not a GeoTIFF, e.g. a JPEG 2000).
    """

    crs: Optional[str]
    transform: tuple[float, float, float, float, float, float]
    tiff_tags: tuple[tuple[int, int, Any], ...] = ()


class ImageReader:
    """A 2-D image read by window; open one with :func:`open_image`.

    Attributes:
        path: the file.
        height, width, channels: image size; windows are ``(h, w, channels)``.
        dtype: pixel dtype of the windows (native byte order).
        offset, scale: ``(raw - offset) / scale`` maps pixel values onto [0, 1].
        georef: :class:`GeoRef` of a georeferenced image, else None.
        layout: how pixels are read: ``"memmap"``, ``"segments"`` (decoded per tile/strip),
            ``"decoded"`` (whole image in memory: PNG/JPEG) or ``"rasterio"``.
        block_rows: rows of the file's storage blocks (tiles or strips; 1 where any row can be read
            alone): reads aligned to them decode each block once.

    A reader is not thread-safe: open one per thread or worker process. Use it as a context
    manager, or call :meth:`close`.
    """

    def __init__(self, path: Path, height: int, width: int, channels: int, dtype: np.dtype,
                 georef: Optional[GeoRef], layout: str):
        self.path, self.height, self.width, self.channels = path, int(height), int(width), int(channels)
        self.georef, self.layout, self.block_rows = georef, layout, 1
        self.dtype = np.dtype(dtype).newbyteorder("=")
        try:  # the training data's scaling (utils.image_io), so prediction sees the same values
            self.offset, self.scale = dtype_intensity_range(self.dtype)
        except ValueError as exc:
            raise RasterError(f"{path}: {exc}") from None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.channels

    def read_window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels of rows ``[y0, y1)`` and columns ``[x0, x1)``.

        Returns:
            ``(y1 - y0, x1 - x0, channels)`` array of :attr:`dtype`, owned by the caller.

        Raises:
            ValueError: the window is empty or leaves the image.
            RasterError: the file's data cannot be read or decoded.
        """
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise ValueError(f"window rows [{y0}, {y1}) x cols [{x0}, {x1}) is empty or outside the "
                             f"{self.height} x {self.width} image {self.path}")
        return self._read(int(y0), int(y1), int(x0), int(x1))

    def normalize(self, window: np.ndarray) -> np.ndarray:
        """``(window - offset) / scale`` as float32 in [0, 1].

        Raises:
            RasterError: a float window holds values outside [0, 1] or NaN (the open-time check
                of a large float image only samples it).
        """
        if self.dtype.kind == "f":
            _check_unit_range(window, self.path, "a window")
        return to_unit_range(window, self.offset, self.scale)

    def use_scaling(self, inputs: Optional[InputScaling]) -> Optional[str]:
        """Scale this image as training scaled its inputs (:attr:`offset`, :attr:`scale` from
        :func:`utils.image_io.scaling_for`) and judge its intensities against training's.

        Args:
            inputs: the checkpoint's record, or None (a checkpoint made before it): the dtype's range
                is kept and nothing is judged.

        Returns:
            None, or a one-line warning naming the file, its intensity range, training's range (in the
            file's units) and what to do, when the image's :data:`~utils.image_io.RANGE_PERCENTILES`
            lie far outside what training saw (:meth:`~utils.image_io.InputScaling.problem`).

        Raises:
            RasterError: the sampled windows cannot be read.
        """
        self.offset, self.scale = scaling_for(self.dtype, inputs)
        if inputs is None:
            return None
        lo, hi = percentile_range(np.concatenate([self.read_window(*w).reshape(-1) for w in self._sample()]))
        reason = inputs.problem((lo - self.offset) / self.scale, (hi - self.offset) / self.scale)
        if reason is None:
            return None
        seen_lo, seen_hi = (v * self.scale + self.offset for v in inputs.seen)
        low, high = RANGE_PERCENTILES
        return (f"{self.path}: its intensities, {lo:.5g}..{hi:.5g} ({self.dtype}; {low:g} to {high:g} percentile), "
                f"{reason} the range of the training images, {seen_lo:.5g}..{seen_hi:.5g} in the same units "
                f"(training scaled {inputs.describe()}): the prediction is likely wrong. Rescale the image "
                "to that range, or train on images like it")

    def _sample(self) -> list[tuple[int, int, int, int]]:
        """Windows ``(y0, y1, x0, x1)`` that :meth:`use_scaling` measures: the whole image when small,
        else an evenly spaced grid (a scene is never read twice whole)."""
        h, w = self.height, self.width
        if h * w <= RANGE_SAMPLE:
            return [(0, h, 0, w)]
        side, n = RANGE_SAMPLE_SIDE, RANGE_SAMPLE_GRID
        ys = sorted({round(i * max(h - side, 0) / (n - 1)) for i in range(n)})
        xs = sorted({round(i * max(w - side, 0) / (n - 1)) for i in range(n)})
        return [(y, min(h, y + side), x, min(w, x + side)) for y in ys for x in xs]

    @property
    def chunk_rows(self) -> int:
        """Rows :func:`row_chunks` reads at a time: whole rows of blocks, about :data:`CHUNK_BYTES`."""
        row = self.width * self.channels * self.dtype.itemsize
        return self.block_rows * max(1, CHUNK_BYTES // max(1, self.block_rows * row))

    @property
    def parallel_reads(self) -> bool:
        """Whether reading decodes (compressed TIFF, GeoTIFF, JPEG 2000), so that several readers,
        each with its own handle (:meth:`reopen`), read faster than one."""
        return self.layout in ("segments", "rasterio")

    def reopen(self) -> "ImageReader":
        """Another reader of the same file, scaled as this one (for a thread of its own: a reader is
        not thread-safe); the open-time checks are not repeated.

        Raises:
            RasterError: the file cannot be opened again.
        """
        other = _open(self.path, DEFAULT_CACHE_BYTES)
        other.offset, other.scale = self.offset, self.scale
        return other

    def close(self) -> None:
        """Release the file; idempotent."""

    def __enter__(self) -> "ImageReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, {self.height}x{self.width}x{self.channels}, "
                f"{self.dtype}, {self.layout})")

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError


def _check_unit_range(arr: np.ndarray, path: Path, where: str) -> None:
    if arr.size == 0:
        return
    lo, hi = float(np.min(arr)), float(np.max(arr))  # NaN propagates into both
    if not (0.0 <= lo and hi <= 1.0):
        found = "NaN values" if np.isnan(lo) else f"values in [{lo:g}, {hi:g}]"
        raise RasterError(f"{path}: float image with {found} in {where}: float images must already lie in [0, 1] "
                          "without NaN (integer images are scaled by their dtype's range)")


def _check_float_image(reader: ImageReader) -> None:
    """Range check of a float image on open: whole when small, else a 3x3 grid of windows."""
    h, w = reader.height, reader.width
    if h * w <= FLOAT_SCAN_PIXELS:
        rows = max(1, SCAN_BAND_BYTES // (w * reader.channels * reader.dtype.itemsize))
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            _check_unit_range(reader.read_window(y0, y1, 0, w), reader.path, f"rows {y0}:{y1}")
        return
    side = FLOAT_SAMPLE_SIDE
    for yc in (0, (h - side) // 2, h - side):
        for xc in (0, (w - side) // 2, w - side):
            y0, x0 = max(0, yc), max(0, xc)
            y1, x1 = min(h, y0 + side), min(w, x0 + side)
            _check_unit_range(reader.read_window(y0, y1, x0, x1), reader.path,
                              f"rows {y0}:{y1}, cols {x0}:{x1}")


def open_image(path: Union[str, Path], *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> ImageReader:
    """Open an image for windowed reading (see the module docstring for formats and memory).

    Args:
        path: a ``.tif``/``.tiff`` (incl. BigTIFF, GeoTIFF), ``.png``, ``.jpg``/``.jpeg`` or
            ``.jp2``/``.j2k`` file.
        cache_bytes: budget for decoded tiles/strips of a compressed TIFF.

    Returns:
        An :class:`ImageReader`; close it when done.

    Raises:
        RasterError: missing, unsupported, truncated or undecodable file; a float image outside
            [0, 1] (on the part checked, see the module docstring); ``.jp2`` without rasterio.
    """
    reader = _open(Path(path), cache_bytes)
    if reader.dtype.kind == "f":
        try:
            _check_float_image(reader)
        except BaseException:
            reader.close()
            raise
    return reader


def _open(path: Path, cache_bytes: int) -> ImageReader:
    """:func:`open_image` without the range check of float images."""
    if not path.is_file():
        raise RasterError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        reader = _open_tiff(path, cache_bytes)
    elif suffix in JP2_SUFFIXES:
        if _import_rasterio() is None:
            raise RasterError(f"{path}: reading JPEG 2000 needs rasterio (pip install rasterio)")
        reader = _RasterioReader(path, ())
    elif suffix in PILLOW_SUFFIXES:
        reader = _PillowReader(path)
    else:
        raise RasterError(f"{path}: unsupported image type {suffix!r}; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    return reader


def row_chunks(image: Any, readers: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """Every row of ``image`` once, top to bottom: ``(first row, (rows, W, C) raw pixels)`` in chunks
    of ``image.chunk_rows`` rows (64 for an image without it, e.g. an in-memory one).

    With ``readers`` > 1 and an image whose reading decodes (:attr:`ImageReader.parallel_reads`), the
    next ``readers`` chunks are read at once, each by a thread with its own handle
    (:meth:`ImageReader.reopen`, closed at the end); otherwise ``image`` reads them in the caller's
    thread. Chunks align to the file's blocks, so no two threads decode the same block. Memory:
    ``readers`` chunks besides the one yielded.

    Raises:
        RasterError: a chunk cannot be read (raised where that chunk is due).
    """
    h, w = image.height, image.width
    step = int(getattr(image, "chunk_rows", 64))
    starts = range(0, h, step)
    if readers <= 1 or len(starts) < 2 or not getattr(image, "parallel_reads", False):
        for y0 in starts:
            yield y0, image.read_window(y0, min(h, y0 + step), 0, w)
        return
    local, handles, lock = threading.local(), [], threading.Lock()

    def read(y0: int) -> np.ndarray:
        if not hasattr(local, "reader"):
            local.reader = image.reopen()
            with lock:
                handles.append(local.reader)
        return local.reader.read_window(y0, min(h, y0 + step), 0, w)

    pool = ThreadPoolExecutor(min(readers, len(starts)), thread_name_prefix="row-reader")
    ahead: dict[int, Future] = {}
    try:
        for i, y0 in enumerate(starts):
            for j in range(i, min(i + readers, len(starts))):  # keep `readers` chunks in flight
                if j not in ahead:
                    ahead[j] = pool.submit(read, starts[j])
            yield y0, ahead.pop(i).result()
    finally:
        for future in ahead.values():
            future.cancel()
        pool.shutdown(wait=True)  # reads in progress finish before their handles close
        for reader in handles:
            reader.close()


def _import_rasterio():
    """The rasterio module, or None when it is not installed (it is an optional dependency)."""
    try:
        import rasterio
    except ImportError:
        return None
    return rasterio


# --- PNG / JPEG -------------------------------------------------------------------------------
class _PillowReader(ImageReader):
    """PNG / JPEG decoded whole on open (neither format can be read by window)."""

    def __init__(self, path: Path):
        _refuse_16bit_colour_png(path)
        try:  # decoded as the training data loader decodes it (palette -> colours, etc.)
            arr = read_pillow_image(path)
        except Image.DecompressionBombError as exc:
            raise RasterError(f"{path}: {exc}; store a scene this large as a tiled TIFF, "
                              "which is read by window") from exc
        except Exception as exc:  # Pillow raises many types for bad data; report them as one
            raise RasterError(f"{path}: cannot decode image: {exc}") from exc
        if arr.ndim == 2:
            arr = arr[..., None]
        self._array = np.ascontiguousarray(arr)
        super().__init__(path, arr.shape[0], arr.shape[1], arr.shape[2], arr.dtype, None, "decoded")

    def _read(self, y0, y1, x0, x1):
        return self._array[y0:y1, x0:x1].copy()

    def close(self) -> None:
        self._array = np.empty((0, 0, self.channels), self.dtype)


def _refuse_16bit_colour_png(path: Path) -> None:
    """Pillow opens 16-bit RGB(A) / gray+alpha PNGs as 8-bit without a word; refuse them."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(26)
    except OSError as exc:
        raise RasterError(f"{path}: cannot read: {exc}") from exc
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) == 26:
        bit_depth, colour_type = head[24], head[25]
        if bit_depth == 16 and colour_type in (2, 4, 6):
            raise RasterError(f"{path}: 16-bit colour PNG: Pillow would reduce it to 8 bits; convert it to a TIFF")


# --- TIFF -------------------------------------------------------------------------------------
def _open_tiff(path: Path, cache_bytes: int) -> ImageReader:
    """A GeoTIFF through rasterio when it is installed, else any TIFF through :mod:`utils.tiff`."""
    if _import_rasterio() is not None:
        geotags = geotiff_tags(path)
        if geotags:
            return _RasterioReader(path, geotags)
    return _TiffReader(TiffImage.open(path, cache_bytes))


class _TiffReader(ImageReader):
    """TIFF / BigTIFF read by :class:`utils.tiff.TiffImage` (memory-mapped, or decoded per segment)."""

    def __init__(self, image: TiffImage):
        self._image = image
        georef = _georef_from_tags(image.geotags) if image.geotags else None
        try:
            super().__init__(image.path, image.height, image.width, image.channels, image.dtype, georef, image.layout)
        except BaseException:  # an unsupported pixel type
            image.close()
            raise
        self.block_rows = image.segment_rows

    @property
    def cache(self):
        """The decoded segments kept (bounded by ``cache_bytes``)."""
        return self._image.cache

    def _read(self, y0, y1, x0, x1):
        return self._image.read(y0, y1, x0, x1)

    def close(self) -> None:
        self._image.close()


def _georef_from_tags(tags: tuple[tuple[int, int, Any], ...]) -> GeoRef:
    """crs and affine transform from raw GeoTIFF tags (the tags themselves are what gets copied)."""
    values = {code: value for code, _, value in tags}
    transform = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    if 34264 in values:  # ModelTransformation: 4x4 row-major matrix
        m = [float(v) for v in values[34264]]
        transform = (m[0], m[1], m[3], m[4], m[5], m[7])
    elif 33550 in values and 33922 in values:  # pixel scale + the first tie point
        sx, sy = float(values[33550][0]), float(values[33550][1])
        i, j, _, x, y, _ = (float(v) for v in values[33922][:6])
        transform = (sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy)
    crs = None
    keys = [int(v) for v in values.get(34735, ())]
    for k in range(4, len(keys) - 3, 4):
        key_id, location, _, value = keys[k:k + 4]
        # ProjectedCSTypeGeoKey, else GeographicTypeGeoKey; 32767 means "user-defined"
        if key_id in (3072, 2048) and location == 0 and value not in (0, 32767):
            if crs is None or key_id == 3072:
                crs = f"EPSG:{value}"
    return GeoRef(crs=crs, transform=transform, tiff_tags=tags)


# --- rasterio (GeoTIFF, JPEG 2000) ------------------------------------------------------------
class _RasterioReader(ImageReader):
    """Any GDAL-readable raster via rasterio; GDAL reads windows block by block."""

    def __init__(self, path: Path, geotags: tuple[tuple[int, int, Any], ...]):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        try:
            with warnings.catch_warnings():
                # a plain (not georeferenced) JPEG 2000 is fine; georef is None then
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._ds = rasterio.open(path)
        except Exception as exc:  # RasterioIOError, CPLE_* errors
            raise RasterError(f"{path}: cannot read image: {exc}") from exc
        ds = self._ds
        if len(set(ds.dtypes)) != 1:
            ds.close()
            raise RasterError(f"{path}: bands have different pixel types {ds.dtypes}")
        transform = tuple(float(v) for v in tuple(ds.transform)[:6])
        crs = ds.crs.to_wkt() if ds.crs else None
        georef = None
        if geotags:
            georef = GeoRef(crs=crs or _georef_from_tags(geotags).crs, transform=transform, tiff_tags=geotags)
        elif crs is not None or transform != (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
            georef = GeoRef(crs=crs, transform=transform)
        try:
            super().__init__(path, ds.height, ds.width, ds.count, np.dtype(ds.dtypes[0]), georef, "rasterio")
        except RasterError:  # an unsupported pixel type
            ds.close()
            raise
        self.block_rows = int(ds.block_shapes[0][0])

    @property
    def gdal_cache_bytes(self) -> int:
        """GDAL's block cache during a read: two chunks. A chunk read needs no block again once it is
        copied, but the JPEG 2000 driver decodes several blocks before copying them: with a cache of
        one chunk it decoded a 4096-wide scene twice (0.23 s/MP instead of 0.11)."""
        return 2 * self.chunk_rows * self.width * self.channels * self.dtype.itemsize

    def _read(self, y0, y1, x0, x1):
        import rasterio
        from rasterio.windows import Window

        try:
            # GDAL's cache is per process and 5 % of the RAM unless bounded; rasterio sets it in bytes
            with rasterio.Env(GDAL_CACHEMAX=self.gdal_cache_bytes):
                bands = self._ds.read(window=Window(x0, y0, x1 - x0, y1 - y0))
        except Exception as exc:
            raise RasterError(f"{self.path}: cannot read rows {y0}:{y1}, cols {x0}:{x1}: {exc}") from exc
        return np.ascontiguousarray(np.moveaxis(bands, 0, -1))

    def close(self) -> None:
        self._ds.close()
