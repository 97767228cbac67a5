"""Writing large-scene outputs: a streaming mask writer and a downsampled overlay preview.

Writing (:class:`MaskWriter`) takes horizontal bands of rows, top to bottom. Small outputs are
PNG; large ones (more than :data:`LARGE_MASK_PIXELS` pixels), ``.tif`` paths, outputs PNG cannot
hold and georeferenced ones are tiled, deflate-compressed BigTIFFs streamed one tile row at a
time. Outputs are written to a hidden temporary file beside the final path (``.<name>.<random>.tmp``,
:class:`utils.util.AtomicFile`) and renamed into place, so a crash never leaves a half-written file
under the final name; the temporary file is removed on every exception (KeyboardInterrupt included).
With ``overwrite=False`` an existing file under the final name is never replaced (the write fails
with FileExistsError and leaves it as it is). Reading is :mod:`utils.raster`.

Class masks (``MaskWriter(..., classes=K)``) are written so that an ordinary image viewer shows
them: with one foreground class (K = 2) the foreground is stored as 255 and the background as 0
(white on black); with more classes each pixel still holds its class index, and the file carries a
colour table (a palette PNG, a palette TIFF / GeoTIFF) that gives each class the colour of
:func:`class_palette` (background black). :class:`ClassMask` reads such a file back as class indices.
Class probabilities (:class:`ProbabilityWriter`) are uint8 0-255 (probability x 255) or float32.

Every problem with a file raises :class:`~utils.raster.RasterError` naming the file and the cause.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from utils.raster import SCAN_BAND_BYTES, TIFF_SUFFIXES, GeoRef, ImageReader, RasterError, open_image
from utils.util import AtomicFile, atomic_write

# Masks above this many pixels are written as tiled BigTIFF instead of PNG (PNG is buffered whole).
LARGE_MASK_PIXELS = 4096 * 4096
# Tile side of written TIFFs (a common GIS / viewer block size).
OUTPUT_TILE = 256
# The value a two-class mask stores for its foreground (0 stays background): white in any viewer.
BINARY_FOREGROUND = 255
# zlib level for written tiles: on masks, level 3 is ~3x faster than the default 6 and the output
# is still a few percent of the raw size.
ZLIB_LEVEL = 3

# TIFF field types: struct format of one value
_TIFF_TYPES = {1: "B", 2: "s", 3: "H", 4: "I", 6: "b", 7: "B", 8: "h", 9: "i", 11: "f", 12: "d", 16: "Q", 17: "q"}
_SAMPLE_FORMAT = {"u": 1, "b": 1, "i": 2, "f": 3}


def _encode_tag(code: int, type_: int, value: Any) -> tuple[int, int, int, bytes]:
    """``(code, type, count, little-endian bytes)`` of one IFD entry's value."""
    if type_ not in _TIFF_TYPES:
        raise RasterError(f"cannot copy TIFF tag {code} of type {type_}")
    if type_ == 2:
        data = (value.encode("latin-1") if isinstance(value, str) else bytes(value)) + b"\0"
        return code, type_, len(data), data
    values = np.atleast_1d(np.asarray(value)).ravel()
    data = struct.pack(f"<{len(values)}{_TIFF_TYPES[type_]}", *values.tolist())
    return code, type_, len(values), data


class _TiledTiffSink:
    """Streams a tiled, deflate-compressed BigTIFF: rows fill one tile row, which is compressed and
    appended; the directory (IFD) is written last.

    Written by hand rather than with tifffile's writer because tifffile pulls tiles from an
    iterator, while prediction pushes row bands; a single-page tiled BigTIFF is a few fixed tags.
    """

    def __init__(self, fh, height: int, width: int, channels: int, dtype: np.dtype, extratags,
                 palette: Optional[np.ndarray] = None, nodata: Optional[int] = None):
        self.fh, self.height, self.width, self.channels = fh, height, width, channels
        self.dtype = dtype.newbyteorder("<")
        self.extratags = list(extratags)
        if palette is not None:  # ColorMap: every red, then every green, then every blue, as 16-bit values
            table = np.zeros((2 ** (self.dtype.itemsize * 8), 3), np.uint16)
            table[:len(palette)] = np.asarray(palette, np.uint16) * 257
            self.extratags.append((320, 3, table.T.ravel()))
        if nodata is not None:  # GDAL_NODATA, as GDAL writes it: the value as ASCII text
            self.extratags.append((42113, 2, str(int(nodata))))
        self.photometric = 3 if palette is not None else 1  # palette colours, else min-is-black data
        self.across = math.ceil(width / OUTPUT_TILE)
        self.band = np.zeros((OUTPUT_TILE, self.across * OUTPUT_TILE, channels), self.dtype)
        self.filled = 0  # rows of the current tile row already in self.band
        self.rows_done = 0
        self.offsets: list[int] = []
        self.counts: list[int] = []
        fh.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, 0))  # first-IFD offset is patched at the end

    def add_rows(self, y0: int, rows: np.ndarray) -> None:
        i = 0
        while i < len(rows):
            take = min(OUTPUT_TILE - self.filled, len(rows) - i)
            self.band[self.filled:self.filled + take, :self.width] = rows[i:i + take]
            self.filled += take
            self.rows_done += take
            i += take
            if self.filled == OUTPUT_TILE or self.rows_done == self.height:
                self._flush_tile_row()

    def _flush_tile_row(self) -> None:
        self.band[self.filled:] = 0  # the last tile row is padded to full tiles with zeros
        for c in range(self.across):
            tile = np.ascontiguousarray(self.band[:, c * OUTPUT_TILE:(c + 1) * OUTPUT_TILE])
            data = zlib.compress(tile.tobytes(), ZLIB_LEVEL)
            self.offsets.append(self.fh.tell())
            self.counts.append(len(data))
            self.fh.write(data)
        self.filled = 0

    def finish(self) -> None:
        c, bits = self.channels, self.dtype.itemsize * 8
        entries = [
            _encode_tag(256, 4, self.width),
            _encode_tag(257, 4, self.height),
            _encode_tag(258, 3, [bits] * c),
            _encode_tag(259, 3, 8),  # Adobe deflate
            _encode_tag(262, 3, self.photometric),
            _encode_tag(277, 3, c),
            _encode_tag(284, 3, 1),  # contiguous samples
            _encode_tag(322, 3, OUTPUT_TILE),
            _encode_tag(323, 3, OUTPUT_TILE),
            _encode_tag(324, 16, self.offsets),
            _encode_tag(325, 16, self.counts),
            _encode_tag(339, 3, [_SAMPLE_FORMAT[self.dtype.kind]] * c),
        ]
        if c > 1:
            entries.append(_encode_tag(338, 3, [0] * (c - 1)))  # extra samples: unspecified
        entries += [_encode_tag(code, type_, value) for code, type_, value in self.extratags]
        entries.sort(key=lambda e: e[0])
        # values longer than 8 bytes go before the IFD, each at an 8-byte aligned offset
        fh = self.fh
        fields = []
        for code, type_, count, data in entries:
            if len(data) <= 8:
                fields.append(struct.pack("<HHQ", code, type_, count) + data.ljust(8, b"\0"))
            else:
                fh.write(b"\0" * (-fh.tell() % 8))
                fields.append(struct.pack("<HHQQ", code, type_, count, fh.tell()))
                fh.write(data)
        fh.write(b"\0" * (-fh.tell() % 8))
        ifd = fh.tell()
        fh.write(struct.pack("<Q", len(fields)) + b"".join(fields) + struct.pack("<Q", 0))
        fh.seek(8)
        fh.write(struct.pack("<Q", ifd))


class _PngSink:
    """Buffers the (small) mask and encodes it as PNG at the end."""

    def __init__(self, fh, height: int, width: int, channels: int, dtype: np.dtype,
                 palette: Optional[np.ndarray] = None):
        self.fh, self.palette = fh, palette
        self.array = np.zeros((height, width, channels), dtype)

    def add_rows(self, y0: int, rows: np.ndarray) -> None:
        self.array[y0:y0 + len(rows)] = rows

    def finish(self) -> None:
        arr = self.array[..., 0] if self.array.shape[2] == 1 else self.array
        picture = Image.fromarray(arr)
        if self.palette is not None:  # a "P" image: the pixels stay class indices, the palette colours them
            picture.putpalette(np.asarray(self.palette, np.uint8).ravel().tolist())
        picture.save(self.fh, format="PNG")


class _RasterioSink:
    """A tiled, deflate-compressed GeoTIFF through rasterio, for georeferencing that exists only
    as crs/transform (e.g. from a JPEG 2000), which GDAL encodes as GeoTIFF keys.

    Rows are handed to GDAL a whole row of tiles at a time: GDAL then fills every tile it is given,
    whatever its block cache holds (the input's reads bound that cache, :mod:`utils.raster`; a tile
    flushed half filled would be written, read back and written again)."""

    def __init__(self, tmp: Path, height: int, width: int, channels: int, dtype: np.dtype, georef: GeoRef,
                 palette: Optional[np.ndarray] = None, nodata: Optional[int] = None):
        import rasterio
        from affine import Affine  # a rasterio dependency

        self.width, self.height = width, height
        self.band = np.empty((OUTPUT_TILE, width, channels), dtype)
        self.filled = self.y0 = 0  # rows in self.band, and the image row of its first
        self.ds = rasterio.open(
            tmp, "w", driver="GTiff", height=height, width=width, count=channels, dtype=dtype.name,
            crs=georef.crs, transform=Affine(*georef.transform), tiled=True, blockxsize=OUTPUT_TILE,
            blockysize=OUTPUT_TILE, compress="deflate", BIGTIFF="YES", nodata=nodata,
        )
        if palette is not None:
            self.ds.write_colormap(1, {k: (*map(int, rgb), 255) for k, rgb in enumerate(palette)})

    def add_rows(self, y0: int, rows: np.ndarray) -> None:
        i = 0
        while i < len(rows):
            take = min(OUTPUT_TILE - self.filled, len(rows) - i)
            self.band[self.filled:self.filled + take] = rows[i:i + take]
            self.filled, i = self.filled + take, i + take
            if self.filled == OUTPUT_TILE or self.y0 + self.filled == self.height:
                self._flush()

    def _flush(self) -> None:
        from rasterio.windows import Window

        band = self.band[:self.filled]
        self.ds.write(np.moveaxis(band, -1, 0), window=Window(0, self.y0, self.width, len(band)))
        self.y0, self.filled = self.y0 + self.filled, 0

    def finish(self) -> None:
        self.ds.close()


def _png_can_hold(dtype: np.dtype, channels: int) -> bool:
    return (dtype == np.uint8 and channels in (1, 3, 4)) or (dtype == np.uint16 and channels == 1)


class MaskWriter:
    """Writes a mask (or any (H, W, C) raster, e.g. float16 class probabilities) from horizontal
    bands of rows given top to bottom, atomically.

    The format: a tiled (256 x 256), deflate-compressed BigTIFF when ``path`` ends in ``.tif`` /
    ``.tiff``, when the output has more than :data:`LARGE_MASK_PIXELS` pixels, when PNG cannot
    hold it (PNG: uint8 with 1, 3 or 4 channels, uint16 with 1) or when ``like`` is
    georeferenced; PNG otherwise. :attr:`path` is the file really written: a ``.tif``/``.tiff``
    path is kept, a ``.png`` suffix is replaced by the chosen format's, any other name gets it
    appended (``out/scene_mask`` becomes ``out/scene_mask.png`` or ``out/scene_mask.tif``).

    Memory: a TIFF output holds one row of tiles (256 rows x width); a PNG output (small by the
    rule above) is buffered whole. Georeferencing: a GeoTIFF input's GeoTIFF tags are copied
    verbatim; georeferencing known only as crs/transform (a JPEG 2000 read by rasterio) is
    written through rasterio. Nothing exists under :attr:`path` until :meth:`close` succeeds
    (:attr:`committed` then turns True).

    Args:
        path: output file (see above for the suffix).
        height, width: output size.
        dtype: pixel type (uint8, uint16, int16, float16, float32, ...).
        like: the input's reader; its georeferencing is copied when it has the same size.
        channels: samples per pixel (e.g. K class probabilities).
        overwrite: replace a file already under :attr:`path` on :meth:`close`; when False,
            :meth:`close` raises FileExistsError instead and leaves that file as it is.
        classes: the rows are class indices ``0 ... classes-1`` (uint8, one channel), written so that
            a viewer shows them (see the module docstring): 2 classes as 0/255 gray, more as indices
            with a colour table. None: the values are stored as given.
        nodata: a TIFF output declares this value as "no data" (GDAL_NODATA); None: no declaration.

    Raises:
        ValueError: bad size, dtype, channels or classes, or ``like`` georeferenced with another size.
    """

    def __init__(self, path: Union[str, Path], height: int, width: int, dtype: Any = np.uint8,
                 like: Optional[ImageReader] = None, channels: int = 1, overwrite: bool = True,
                 classes: Optional[int] = None, nodata: Optional[int] = None):
        self.height, self.width, self.channels = int(height), int(width), int(channels)
        self.dtype = np.dtype(dtype)
        if self.height < 1 or self.width < 1 or self.channels < 1:
            raise ValueError(f"output size {height} x {width} x {channels} must be positive")
        if self.dtype.kind not in "uif" or self.dtype.itemsize > 8:
            raise ValueError(f"unsupported output dtype {self.dtype}")
        if classes is not None and not (2 <= classes <= 256 and self.dtype == np.uint8 and self.channels == 1):
            raise ValueError(f"a class mask holds 2 to 256 classes in one uint8 channel, not {classes} classes in "
                             f"{self.channels} {self.dtype} channel(s)")
        self.classes = classes
        palette = class_palette(classes) if classes is not None and classes > 2 else None
        georef = like.georef if like is not None else None
        if georef is not None and (like.height, like.width) != (self.height, self.width):
            raise ValueError(
                f"the output is {self.height} x {self.width} but the georeferenced input {like.path} is "
                f"{like.height} x {like.width}; its georeferencing would not fit"
            )
        path = Path(path)
        as_tiff = (path.suffix.lower() in TIFF_SUFFIXES or self.height * self.width > LARGE_MASK_PIXELS
                   or not _png_can_hold(self.dtype, self.channels) or georef is not None)
        self.format = "tiff" if as_tiff else "png"
        if path.suffix.lower() in TIFF_SUFFIXES:
            self.path = path
        else:
            base = path.with_suffix("") if path.suffix.lower() == ".png" else path
            self.path = base.with_name(base.name + (".tif" if as_tiff else ".png"))
        self._next_row = 0
        self.overwrite, self.committed = overwrite, False
        self._temp = AtomicFile(self.path)
        try:
            if as_tiff and georef is not None and not georef.tiff_tags:
                if self.dtype == np.float16:
                    raise ValueError("a georeferenced float16 output is not supported by GDAL; use float32")
                self._temp.fh.close()  # GDAL writes the temporary file by name
                self._sink = _RasterioSink(self._temp.tmp, self.height, self.width, self.channels, self.dtype, georef,
                                           palette, nodata)
            elif as_tiff:
                tags = georef.tiff_tags if georef is not None else ()
                self._sink = _TiledTiffSink(self._temp.fh, self.height, self.width, self.channels, self.dtype, tags,
                                            palette, nodata)
            else:
                self._sink = _PngSink(self._temp.fh, self.height, self.width, self.channels, self.dtype, palette)
        except BaseException:
            self._temp.discard()
            raise

    def write_rows(self, y0: int, rows: np.ndarray) -> None:
        """Write rows ``[y0, y0 + len(rows))``; bands must come in order, without gaps.

        Args:
            y0: first row; must equal the number of rows written so far.
            rows: ``(h, width)`` or ``(h, width, channels)``. Integer values must fit the output
                dtype (checked: a silent wrap-around would corrupt the mask).

        Raises:
            ValueError: out-of-order band, wrong shape, values outside the output dtype's range,
                or float values for an integer output.
        """
        rows = np.asarray(rows)
        if rows.ndim == 2:
            rows = rows[..., None]
        if y0 != self._next_row:
            raise ValueError(f"{self.path}: rows must be written in order: expected row {self._next_row}, got {y0}")
        if rows.ndim != 3 or rows.shape[1:] != (self.width, self.channels) or y0 + len(rows) > self.height:
            raise ValueError(
                f"{self.path}: a band at row {y0} of shape {rows.shape} does not fit the "
                f"{self.height} x {self.width} x {self.channels} output"
            )
        rows = self._cast(rows)
        if self.classes is not None:
            rows = self._class_values(rows)
        self._sink.add_rows(y0, rows)
        self._next_row += len(rows)

    def _class_values(self, rows: np.ndarray) -> np.ndarray:
        """Class indices as stored: checked below ``classes``; with 2 classes the foreground becomes
        :data:`BINARY_FOREGROUND` (white)."""
        top = int(rows.max()) if rows.size else 0
        if top >= self.classes:
            raise ValueError(f"{self.path}: class index {top} in a mask of {self.classes} classes [0, {self.classes})")
        return rows * np.uint8(BINARY_FOREGROUND) if self.classes == 2 else rows

    def _cast(self, rows: np.ndarray) -> np.ndarray:
        if rows.dtype == self.dtype or rows.size == 0:
            return rows.astype(self.dtype, copy=False)
        if self.dtype.kind in "ui":
            if rows.dtype.kind not in "uib":
                raise ValueError(f"{self.path}: cannot store {rows.dtype} values in a {self.dtype} output")
            info = np.iinfo(self.dtype)
            lo, hi = int(rows.min()), int(rows.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"{self.path}: values in [{lo}, {hi}] do not fit the output dtype {self.dtype}")
        return rows.astype(self.dtype)

    def close(self) -> None:
        """Finish the file and move it into place.

        Raises:
            ValueError: not all rows were written (nothing is left on disk).
            FileExistsError: ``overwrite`` is False and a file exists under :attr:`path`.
            OSError: the file cannot be written (disk full, ...): nothing is left on disk.
        """
        if self._temp is None:
            return
        try:
            if self._next_row != self.height:
                raise ValueError(f"{self.path}: only {self._next_row} of {self.height} rows were written")
            self._sink.finish()
            self._temp.commit(self.overwrite)
            self.committed = True
        except BaseException:
            self._temp.discard()
            raise
        finally:
            self._temp = None

    def abort(self) -> None:
        """Drop the output: the temporary file is removed and nothing appears under :attr:`path`."""
        if self._temp is not None:
            if isinstance(self._sink, _RasterioSink):
                self._sink.ds.close()
            self._temp.discard()
            self._temp = None

    def __enter__(self) -> "MaskWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ProbabilityWriter(MaskWriter):
    """Writes class probabilities in [0, 1], given as float rows, as uint8 ``round(255 p)`` (the
    default: a TIFF that Pillow and image viewers open, to 1/510 of the value) or float32 (exact, for
    analysis). Otherwise a :class:`MaskWriter`.

    Raises:
        ValueError: ``dtype`` is neither uint8 nor float32 (and see :class:`MaskWriter`).
    """

    DTYPES = ("uint8", "float32")

    def __init__(self, path: Union[str, Path], height: int, width: int, channels: int, dtype: str = "uint8",
                 like: Optional[ImageReader] = None, overwrite: bool = True):
        if str(dtype) not in self.DTYPES:
            raise ValueError(f"probabilities are written as {' or '.join(self.DTYPES)}, not {dtype}")
        super().__init__(path, height, width, np.dtype(dtype), like=like, channels=channels, overwrite=overwrite)

    def _cast(self, rows: np.ndarray) -> np.ndarray:
        if self.dtype == np.uint8:
            return np.round(np.clip(rows.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
        return rows.astype(np.float32)


class ClassMask:
    """The class indices of a mask :class:`MaskWriter` wrote with ``classes``, read by bands of rows
    (what :func:`overlay_png` takes): ``mask[y0:y1, x0:x1]`` is an ``(h, w)`` array of indices.

    A PNG (small by :data:`LARGE_MASK_PIXELS`) is decoded whole, as its raw values (a palette PNG's
    indices, not its colours); a TIFF is read by window. Use it as a context manager.

    Raises:
        RasterError: the file cannot be read.
    """

    def __init__(self, path: Union[str, Path], classes: int):
        path = Path(path)
        self.classes, self._array, self._reader = classes, None, None
        if path.suffix.lower() in TIFF_SUFFIXES:
            self._reader = open_image(path)
            self.shape = (self._reader.height, self._reader.width)
        else:
            try:
                with Image.open(path) as im:
                    self._array = np.asarray(im)
            except OSError as exc:
                raise RasterError(f"{path}: cannot read the mask: {exc}") from exc
            self.shape = self._array.shape[:2]

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        if self._reader is not None:
            y0, y1, _ = rows.indices(self.shape[0])
            x0, x1, _ = cols.indices(self.shape[1])
            values = self._reader.read_window(y0, y1, x0, x1)[..., 0]
        else:
            values = self._array[rows, cols]
        return values // BINARY_FOREGROUND if self.classes == 2 else values

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> "ClassMask":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# overlay preview
# ---------------------------------------------------------------------------------------------
# Distinct, colour-blind-aware first colours (Okabe-Ito, then Tableau); more classes get
# golden-angle hues.
_BASE_COLOURS = np.array([
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
    (204, 121, 167), (255, 0, 0), (0, 255, 255), (148, 103, 189), (140, 86, 75), (188, 189, 34),
], dtype=np.uint8)


def class_palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours; row 0 (background, drawn transparent) is black."""
    palette = np.zeros((max(num_classes, 1), 3), np.uint8)
    for k in range(1, num_classes):
        if k - 1 < len(_BASE_COLOURS):
            palette[k] = _BASE_COLOURS[k - 1]
        else:
            hue = (k * 0.618033988749895) % 1.0
            palette[k] = np.round(255 * np.array(_hsv_to_rgb(hue, 0.85, 0.95)))
    return palette


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


class OverlaySample:
    """Every ``step``-th row and column of an image's shown channels (the first, or the first three),
    kept as its rows pass by (:meth:`add`, e.g. from :meth:`engines.sliding_window.Predictor.run`),
    so that :func:`overlay_png` needs no second read of the image. ``step`` is the smallest integer
    that brings the longer side to at most ``max_side``; striding keeps the values exact.

    Args:
        image: the image (its ``height``, ``width``, ``channels``, ``dtype``).
        max_side: longest side of the overlay.
    """

    def __init__(self, image: ImageReader, max_side: int = 2048):
        self.height, self.width = image.height, image.width
        self.step = max(1, math.ceil(max(self.height, self.width) / max_side))
        self.shown = min(image.channels, 3) if image.channels >= 3 else 1
        out_h, out_w = math.ceil(self.height / self.step), math.ceil(self.width / self.step)
        self.pixels = np.empty((out_h, out_w, self.shown), image.dtype)
        self._rows = np.zeros(out_h, bool)  # which sampled rows arrived

    def add(self, y0: int, rows: np.ndarray) -> None:
        """Keep the sampled pixels of the image's raw ``rows`` (n, W, C) that start at row ``y0``."""
        first = -(-y0 // self.step) * self.step  # the first sampled row at or after y0
        kept = rows[first - y0::self.step, ::self.step, :self.shown]
        self.pixels[first // self.step:first // self.step + len(kept)] = kept
        self._rows[first // self.step:first // self.step + len(kept)] = True

    def read(self, reader: ImageReader) -> "OverlaySample":
        """Fill the sample from ``reader`` in bands of rows (one pass over the file); returns self."""
        h, w = self.height, self.width
        # bands are a multiple of `step` rows, so striding inside each band matches global striding
        band = max(self.step, SCAN_BAND_BYTES // (w * reader.channels * reader.dtype.itemsize) // self.step * self.step)
        for y0 in range(0, h, band):
            self.add(y0, reader.read_window(y0, min(h, y0 + band), 0, w))
        return self

    @property
    def complete(self) -> bool:
        return bool(self._rows.all())


def _mask_band(mask: Any, y0: int, y1: int, width: int) -> np.ndarray:
    if isinstance(mask, ImageReader):
        return mask.read_window(y0, y1, 0, width)[..., 0]
    return np.asarray(mask[y0:y1, 0:width])


def overlay_png(path: Union[str, Path], reader: ImageReader, mask: Any, num_classes: int,
                max_side: int = 2048, alpha: float = 0.5, overwrite: bool = True,
                sample: Optional[OverlaySample] = None) -> tuple[int, int]:
    """Write a colour overlay of the image and its class mask as a small PNG, atomically.

    The image and mask are downsampled by taking every ``step``-th pixel (``step`` the smallest
    integer that brings the longer side to at most ``max_side``; striding keeps class values exact).
    Both are read in bands of rows, so a 30000 x 30000 scene costs one pass over the file and a few
    tens of MB; with ``sample`` (kept while predicting) the image is not read at all. The image is
    shown in gray (one or two channels) or RGB (first three), contrast-stretched to its 0.5-99.5
    percentiles (16-bit EM and microscopy images often use a small part of the range); class 0 is
    left transparent, class k > 0 is blended with ``class_palette(num_classes)[k]``.

    Args:
        path: output PNG.
        reader: the image.
        mask: ``(H, W)`` class indices: a numpy array or memmap, anything sliced as
            ``mask[y0:y1, x0:x1]`` (a :class:`ClassMask` of a written class mask), or an
            :class:`ImageReader` of a written one-channel mask of raw indices.
        num_classes: number of classes K (mask values 0 ... K-1).
        max_side: longest side of the PNG.
        alpha: opacity of the class colours.
        overwrite: replace an existing ``path``; when False, an existing file is left as it is and
            FileExistsError is raised.
        sample: the image's pixels, already sampled for ``max_side`` (every row seen); None: read
            from ``reader``.

    Returns:
        ``(height, width)`` of the PNG.

    Raises:
        ValueError: mask size differs from the image's, or holds values outside [0, K); a ``sample``
            that has not seen every row of the image (a bug of its caller).
        RasterError: the image cannot be read.
    """
    h, w = reader.height, reader.width
    mask_shape = (mask.height, mask.width) if isinstance(mask, ImageReader) else tuple(mask.shape[:2])
    if mask_shape != (h, w):
        raise ValueError(f"mask of shape {mask_shape} does not match the {h} x {w} image {reader.path}")
    if sample is None:
        sample = OverlaySample(reader, max_side).read(reader)
    elif not sample.complete or (sample.height, sample.width) != (h, w):
        raise ValueError(f"the overlay sample of {reader.path} has not seen every row of the image")
    step, shown = sample.step, sample.shown
    out_h, out_w = sample.pixels.shape[:2]
    image = (sample.pixels.astype(np.float32) - reader.offset) / reader.scale
    classes = np.empty((out_h, out_w), np.int64)
    band = max(step, SCAN_BAND_BYTES // w // step * step)  # a multiple of `step` rows, as the sample
    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        classes[y0 // step:math.ceil(y1 / step)] = _mask_band(mask, y0, y1, w)[::step, ::step]
    lo_cls, hi_cls = int(classes.min()), int(classes.max())
    if lo_cls < 0 or hi_cls >= num_classes:
        raise ValueError(
            f"mask values in [{lo_cls}, {hi_cls}] are outside the {num_classes} classes [0, {num_classes})"
        )

    finite = image[np.isfinite(image)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = 0.0, 1.0
    image = np.clip((np.nan_to_num(image) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(image, 3, axis=2) if shown == 1 else image
    painted = classes > 0
    colours = class_palette(num_classes).astype(np.float32)
    rgb[painted] = (1 - alpha) * rgb[painted] + alpha * colours[classes[painted]]
    picture = Image.fromarray(np.round(rgb).astype(np.uint8))
    atomic_write(Path(path), lambda fh: picture.save(fh, format="PNG"), overwrite)
    return out_h, out_w
