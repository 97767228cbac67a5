"""TIFF / BigTIFF reading with tifffile, never loading a large image whole: the one TIFF reader,
used by :mod:`utils.raster` (windows of a scene to predict) and by the dataset loader
(:func:`read_tiff`: a whole image is one window), so training and prediction see the same pixels.

Uncompressed contiguous data is memory-mapped (``numpy.memmap`` at the data offset); tiled or
strip-compressed data is decoded segment by segment, each window decoding only the tiles or strips
it intersects, with a small LRU cache of decoded segments (the most recent is always kept). A
series of several pages (a stack written page by page) gives one channel per page sample; planar
and contiguous samples both become ``(h, w, channels)``.

Every problem with a file raises :class:`RasterError` naming the file and the cause.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import tifffile

# GeoTIFF tags copied verbatim from a georeferenced input to the output mask: ModelPixelScale,
# ModelTiepoint, ModelTransformation, GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)


class RasterError(ValueError):
    """An image file cannot be read, or an output cannot be written; the message names the file."""


def read_tiff(path: Path) -> np.ndarray:
    """The first image of a TIFF, whole: ``(H, W, C)`` in the file's dtype (native byte order).

    Raises:
        RasterError: the file cannot be read or decoded, naming it and the cause.
    """
    with TiffImage.open(path, cache_bytes=0) as image:  # each segment is decoded once: nothing to keep
        return image.read(0, image.height, 0, image.width)


@contextmanager
def _tiff_errors(path: Path):
    """Turn what tifffile raises for a bad file (TiffFileError, ValueError, struct.error, ...) into
    one RasterError naming the file."""
    try:
        yield
    except RasterError:
        raise
    except Exception as exc:
        raise RasterError(f"{path}: cannot read TIFF: {exc}") from exc


def geotiff_tags(path: Path) -> tuple[tuple[int, int, Any], ...]:
    """The GeoTIFF tags of the first page of ``path`` (see :attr:`TiffImage.geotags`), without
    decoding any pixel.

    Raises:
        RasterError: the file is not a readable TIFF.
    """
    with _tiff_errors(path), tifffile.TiffFile(path) as tif:
        first = tif.pages[0]
        return _geotiff_tags(first) if first.is_geotiff else ()


def _geotiff_tags(page) -> tuple[tuple[int, int, Any], ...]:
    return tuple(
        (code, int(page.tags[code].dtype), page.tags[code].value) for code in GEOTIFF_TAGS if code in page.tags
    )


class _SegmentCache:
    """LRU of decoded segments bounded by bytes; the newest entry is always kept."""

    def __init__(self, budget: int):
        self.budget, self.nbytes = int(budget), 0
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[int, int]) -> Optional[np.ndarray]:
        arr = self._items.get(key)
        if arr is not None:
            self._items.move_to_end(key)
        return arr

    def put(self, key: tuple[int, int], arr: np.ndarray) -> None:
        self._items[key] = arr
        self.nbytes += arr.nbytes
        while self.nbytes > self.budget and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


class _MemmapPart:
    """One uncompressed contiguous page, memory-mapped as (planes, 1, H, W, samples)."""

    def __init__(self, path: Path, page, channel0: int):
        file_dtype = np.dtype(page.parent.byteorder + page.dtype.char)
        self.channel0 = channel0
        self.array = np.memmap(path, dtype=file_dtype, mode="r", offset=page.dataoffsets[0], shape=page.shaped)

    def read_into(self, out: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
        planes, samples = self.array.shape[0], self.array.shape[4]
        block = self.array[:, 0, y0:y1, x0:x1, :]  # (planes, h, w, samples)
        block = np.moveaxis(block, 0, 2).reshape(y1 - y0, x1 - x0, planes * samples)
        out[..., self.channel0:self.channel0 + planes * samples] = block

    def close(self) -> None:
        self.array = None


class _SegmentPart:
    """One tiled or striped page, decoded per segment (tile or strip) through tifffile."""

    def __init__(self, reader: "TiffImage", page, index: int, channel0: int):
        planes, _, height, width, samples = page.shaped
        self.reader, self.index, self.channel0 = reader, index, channel0
        self.planes, self.samples, self.height, self.width = planes, samples, height, width
        if page.is_tiled:
            self.seg_h, self.seg_w = page.tilelength, page.tilewidth
        else:
            self.seg_h, self.seg_w = min(page.rowsperstrip or height, height), width
        self.down, self.across = math.ceil(height / self.seg_h), math.ceil(width / self.seg_w)
        self.offsets, self.counts = page.dataoffsets, page.databytecounts
        expected = planes * self.down * self.across
        if len(self.offsets) != expected or len(self.counts) != expected:
            raise RasterError(f"{reader.path}: page {index} has {len(self.offsets)} data segments, expected {expected}")
        self.kind = "tile" if page.is_tiled else "strip"
        self.nodata, self.jpegtables, self.dtype = page.nodata, page.jpegtables, page.dtype
        self.decode = page.decode  # a closure; raises on first use when a codec is missing

    def probe(self) -> None:
        """Decode the first stored segment, so a missing codec or bad data fails on open."""
        for i, count in enumerate(self.counts):
            if count:
                plane, rest = divmod(i, self.down * self.across)
                r, c = divmod(rest, self.across)
                self._segment(i, plane, r, c)
                return

    def read_into(self, out: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
        for r in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
            ys = r * self.seg_h
            a0, a1 = max(y0, ys), min(y1, ys + self.seg_h)
            for c in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                xs = c * self.seg_w
                b0, b1 = max(x0, xs), min(x1, xs + self.seg_w)
                for p in range(self.planes):
                    seg = self._segment(p * self.down * self.across + r * self.across + c, p, r, c)
                    ch = self.channel0 + p * self.samples
                    out[a0 - y0:a1 - y0, b0 - x0:b1 - x0, ch:ch + self.samples] = seg[a0 - ys:a1 - ys, b0 - xs:b1 - xs]

    def _segment(self, i: int, plane: int, r: int, c: int) -> np.ndarray:
        """Decoded segment ``i`` cropped to the image: ``(rows, cols, samples)``."""
        key = (self.index, i)
        seg = self.reader.cache.get(key)
        if seg is not None:
            return seg
        ys, xs = r * self.seg_h, c * self.seg_w
        rows, cols = min(self.seg_h, self.height - ys), min(self.seg_w, self.width - xs)
        where = f"{self.kind} {i} of page {self.index}"
        if self.counts[i] == 0:  # a segment never written (sparse file) holds the fill value
            seg = np.full((rows, cols, self.samples), self.nodata, self.dtype)
        else:
            data = self.reader.read_bytes(self.offsets[i], self.counts[i], where)
            try:
                decoded, position, _ = self.decode(data, i, jpegtables=self.jpegtables)
            except Exception as exc:  # codecs raise many types (zlib.error, ValueError, KeyError...)
                hint = " (pip install imagecodecs)" if "imagecodecs" in str(exc) else ""
                raise RasterError(f"{self.reader.path}: cannot decode {where}: {exc}{hint}") from exc
            misplaced = decoded is None or tuple(position[:4]) != (plane, 0, ys, xs)
            if misplaced or decoded.shape[1] < rows or decoded.shape[2] < cols:
                got = None if decoded is None else decoded.shape
                raise RasterError(f"{self.reader.path}: {where} is corrupt (decoded shape {got})")
            # copy: the cache must not keep the padded tile or the decoder's buffer alive
            seg = np.array(decoded[0, :rows, :cols], dtype=self.reader.dtype)
        self.reader.cache.put(key, seg)
        return seg

    def close(self) -> None:
        self.decode = None


class TiffImage:
    """The first image of a TIFF / BigTIFF, read by window: memory-mapped when uncompressed and
    contiguous, else decoded per segment (tile or strip). The first series' pages are stacked as
    channels. Open one with :meth:`open`; close it when done (or use it as a context manager).

    Attributes:
        path: the file.
        height, width, channels: image size; windows are ``(h, w, channels)``.
        dtype: pixel dtype of the windows (native byte order).
        layout: ``"memmap"`` or ``"segments"``.
        geotags: the first page's GeoTIFF tags as ``(code, tiff type, value)`` (empty when none).
        cache: the decoded segments kept (see :data:`utils.raster.DEFAULT_CACHE_BYTES`).
    """

    def __init__(self, path: Path, tif: tifffile.TiffFile, cache_bytes: int):
        self.path, self._tif, self._fh = path, tif, None
        self.cache = _SegmentCache(cache_bytes)
        series = tif.series[0]
        pages = [p.aspage() if p is not None else None for p in series.pages]
        if not pages or any(p is None for p in pages):
            raise RasterError(f"{path}: the TIFF's first image has missing pages")
        first = pages[0]
        if first.dtype is None:
            raise RasterError(f"{path}: unsupported TIFF pixel type "
                              f"(SampleFormat {first.sampleformat}, {first.bitspersample}-bit)")
        height, width = first.shaped[2], first.shaped[3]
        size = path.stat().st_size
        self._parts: list[Union[_MemmapPart, _SegmentPart]] = []
        channels = 0
        for index, page in enumerate(pages):
            planes, depth, h, w, samples = page.shaped
            if depth != 1:
                raise RasterError(f"{path}: volumetric TIFF pages (depth {depth}) are not supported")
            if (h, w) != (height, width) or page.dtype != first.dtype:
                raise RasterError(f"{path}: page {index} is {h}x{w} {page.dtype}, "
                                  f"page 0 is {height}x{width} {first.dtype}")
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True) if n]
            if page.is_final:
                ends.append(page.dataoffsets[0] + page.nbytes)
            if ends and max(ends) > size:
                raise RasterError(f"{path}: file is truncated (page {index} data ends at byte {max(ends)}, "
                                  f"the file has {size})")
            part = _MemmapPart(path, page, channels) if page.is_final else _SegmentPart(self, page, index, channels)
            self._parts.append(part)
            channels += planes * samples
        self.height, self.width, self.channels = height, width, channels
        self.dtype = np.dtype(first.dtype).newbyteorder("=")
        self.layout = "memmap" if all(isinstance(p, _MemmapPart) for p in self._parts) else "segments"
        self.geotags = _geotiff_tags(first) if first.is_geotiff else ()
        for part in self._parts:
            if isinstance(part, _SegmentPart):
                part.probe()

    def read_bytes(self, offset: int, count: int, where: str) -> bytes:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(offset)
        data = self._fh.read(count)
        if len(data) != count:
            raise RasterError(f"{self.path}: file is truncated ({where} needs {count} bytes at {offset})")
        return data

    @classmethod
    def open(cls, path: Path, cache_bytes: int) -> "TiffImage":
        """Open ``path``; the first stored segment of each compressed page is decoded on the spot.

        Raises:
            RasterError: missing, truncated, corrupt or undecodable file, naming it and the cause.
        """
        with _tiff_errors(path):
            tif = tifffile.TiffFile(path)
            try:
                return cls(Path(path), tif, cache_bytes)
            except BaseException:
                tif.close()
                raise

    @property
    def segment_rows(self) -> int:
        """Rows of the tallest tile or strip (1 for memory-mapped data): a read of whole multiples of
        it, aligned to it, decodes each segment once."""
        return max((p.seg_h for p in self._parts if isinstance(p, _SegmentPart)), default=1)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``[y0, y1)`` and columns ``[x0, x1)`` (inside the image): ``(h, w, channels)``.

        Raises:
            RasterError: the file's data cannot be read or decoded.
        """
        out = np.empty((y1 - y0, x1 - x0, self.channels), self.dtype)
        for part in self._parts:
            part.read_into(out, y0, y1, x0, x1)
        return out

    def close(self) -> None:
        for part in self._parts:
            part.close()
        self.cache.clear()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._tif.close()

    def __enter__(self) -> "TiffImage":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
