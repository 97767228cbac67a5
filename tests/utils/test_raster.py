"""Large-scene image I/O: windows equal the arrays written (every TIFF layout, PNG, JPEG), clean
errors for bad files, streaming mask writers (round trip, tiling, atomicity), overlay size, the
memory bound of windowed reading, and the optional rasterio path (GeoTIFF, JPEG 2000)."""

import errno
import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import utils.raster as raster
import utils.raster_write as raster_write
from utils.raster import RasterError, open_image
from utils.raster_write import ClassMask, MaskWriter, ProbabilityWriter, class_palette, overlay_png

H, W = 300, 517  # not multiples of any tile or strip size used below
RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)
RGB16 = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)
MULTI5 = RNG.integers(0, 256, (H, W, 5), dtype=np.uint8)
FLOAT = RNG.random((H, W), dtype=np.float32)
INT16 = RNG.integers(-32768, 32768, (H, W), dtype=np.int16)


def _hwc(arr: np.ndarray) -> np.ndarray:
    return arr[..., None] if arr.ndim == 2 else arr


def _windows(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """The whole image, its edges and corners, single pixels, tile-crossing and random windows."""
    wins = [(0, h, 0, w), (0, 1, 0, 1), (h - 1, h, w - 1, w), (h - 1, h, 0, w), (0, h, w - 1, w),
            (h - 45, h, w - 70, w), (0, 40, w - 33, w), (63, 129, 47, 97), (5, 6, 100, 400)]
    rng = np.random.default_rng(1)
    for _ in range(12):
        y0, x0 = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
        wins.append((y0, int(rng.integers(y0 + 1, h + 1)), x0, int(rng.integers(x0 + 1, w + 1))))
    return wins


def _assert_windows(reader, expected: np.ndarray) -> None:
    expected = _hwc(expected)
    assert reader.shape == expected.shape
    assert reader.dtype == expected.dtype
    for y0, y1, x0, x1 in _windows(*expected.shape[:2]):
        got = reader.read_window(y0, y1, x0, x1)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected[y0:y1, x0:x1], err_msg=f"window {(y0, y1, x0, x1)}")


# ---------------------------------------------------------------------------------------------
# TIFF layouts
# ---------------------------------------------------------------------------------------------
TIFF_CASES = {
    # id: (array as (H, W[, C]), array given to tifffile, imwrite kwargs, expected reader layout)
    "uncompressed-gray8": (GRAY8, GRAY8, {}, "memmap"),
    "uncompressed-rgb16-bigendian": (RGB16, RGB16, dict(byteorder=">"), "memmap"),
    "tiled-zlib-rgb16": (RGB16, RGB16, dict(tile=(64, 48), compression="zlib"), "segments"),
    "tiled-uncompressed": (GRAY8, GRAY8, dict(tile=(32, 32)), "segments"),
    "striped-zlib-predictor": (RGB16, RGB16, dict(rowsperstrip=7, compression="zlib", predictor=True), "segments"),
    "single-strip-lzma": (GRAY8, GRAY8, dict(compression="lzma"), "segments"),
    "bigtiff-uncompressed": (GRAY8, GRAY8, dict(bigtiff=True), "memmap"),
    "bigtiff-tiled-zlib-5ch": (MULTI5, MULTI5, dict(bigtiff=True, tile=(64, 64), compression="zlib",
                                                   photometric="minisblack", planarconfig="contig"), "segments"),
    "planar-rgb16-zlib": (RGB16, RGB16.transpose(2, 0, 1), dict(photometric="rgb", planarconfig="separate",
                                                               compression="zlib", rowsperstrip=16), "segments"),
    "planar-5ch-uncompressed": (MULTI5, MULTI5.transpose(2, 0, 1), dict(photometric="minisblack",
                                                                        planarconfig="separate"), "memmap"),
    "contiguous-5ch-tiled": (MULTI5, MULTI5, dict(photometric="minisblack", planarconfig="contig",
                                                  tile=(32, 64), compression="zlib"), "segments"),
    "pages-as-channels": (MULTI5, MULTI5.transpose(2, 0, 1), dict(photometric="minisblack"), "memmap"),
    "float32-tiled": (FLOAT, FLOAT, dict(tile=(64, 64), compression="zlib"), "segments"),
    "int16-striped": (INT16, INT16, dict(rowsperstrip=50, compression="zlib"), "segments"),
}


@pytest.mark.parametrize("case", list(TIFF_CASES))
def test_tiff_windows_equal_the_written_array(tmp_path, case):
    expected, stored, kwargs, layout = TIFF_CASES[case]
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, stored, **kwargs)
    with open_image(path) as reader:
        assert reader.layout == layout
        assert reader.georef is None
        _assert_windows(reader, expected)


@pytest.mark.parametrize("dtype, offset, scale", [
    (np.uint8, 0, 255), (np.uint16, 0, 65535), (np.int16, -32768, 65535), (np.float32, 0, 1),
])
def test_intensity_range_and_normalize(tmp_path, dtype, offset, scale):
    arr = {np.uint8: GRAY8, np.uint16: RGB16[..., 0], np.int16: INT16, np.float32: FLOAT}[dtype]
    tifffile.imwrite(tmp_path / "a.tif", arr)
    with open_image(tmp_path / "a.tif") as reader:
        assert (reader.offset, reader.scale) == (offset, scale)
        unit = reader.normalize(reader.read_window(0, 10, 0, 20))
        assert unit.dtype == np.float32
        np.testing.assert_allclose(unit[..., 0], (arr[:10, :20].astype(np.float64) - offset) / scale, rtol=1e-6)


def test_segment_cache_stays_within_its_budget(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", RGB16, rowsperstrip=4, compression="zlib")
    strip_bytes = 4 * W * 3 * 2
    with open_image(tmp_path / "a.tif", cache_bytes=10 * strip_bytes) as reader:
        for y0 in range(0, H - 64, 32):
            for x0 in range(0, W - 64, 64):
                window = reader.read_window(y0, y0 + 64, x0, x0 + 64)
                np.testing.assert_array_equal(window, RGB16[y0:y0 + 64, x0:x0 + 64])
                assert reader.cache.nbytes <= 10 * strip_bytes


# ---------------------------------------------------------------------------------------------
# PNG / JPEG
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arr", [GRAY8, RGB16[..., 0], RGB16[..., :3].astype(np.uint8),
                                 MULTI5[..., :4]], ids=["gray8", "gray16", "rgb8", "rgba8"])
def test_png_windows_equal_the_written_array(tmp_path, arr):
    Image.fromarray(arr).save(tmp_path / "a.png")
    with open_image(tmp_path / "a.png") as reader:
        assert reader.layout == "decoded"
        _assert_windows(reader, arr)


def test_palette_png_reads_as_its_colours(tmp_path):
    indices = (GRAY8 % 4).astype(np.uint8)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    im = Image.fromarray(indices, mode="P")
    im.putpalette(colours.ravel().tolist())
    im.save(tmp_path / "p.png")
    with open_image(tmp_path / "p.png") as reader:
        _assert_windows(reader, colours[indices])


def test_jpeg_windows_equal_the_decoded_file(tmp_path):
    yy, xx = np.mgrid[0:H, 0:W]
    smooth = np.stack([yy * 255 // H, xx * 255 // W, (yy + xx) * 255 // (H + W)], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    with Image.open(tmp_path / "a.jpg") as im:
        decoded = np.asarray(im)
    with open_image(tmp_path / "a.jpg") as reader:
        _assert_windows(reader, decoded)
        assert np.abs(reader.read_window(0, H, 0, W).astype(int) - smooth).mean() < 2  # and it is the image


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, dict(tile=(64, 64), compression="zlib")], ids=["uncompressed", "tiled"])
def test_truncated_tiff_is_a_raster_error_naming_the_file(tmp_path, kwargs):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, RGB16, **kwargs)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RasterError, match="cut.tif"):
        with open_image(path) as reader:
            reader.read_window(0, H, 0, W)


def test_random_bytes_png_is_a_raster_error(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(RasterError, match="noise.png.*cannot decode"):
        open_image(path)


def test_truncated_png_is_a_raster_error(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(GRAY8).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(RasterError, match="cut.png"):
        open_image(path)


def test_corrupt_tile_fails_when_read_naming_the_file(tmp_path):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, GRAY8, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    with open_image(path) as reader:  # the first tile is fine, so the file opens
        reader.read_window(0, 64, 0, 64)
        with pytest.raises(RasterError, match="bad.tif.*tile 5"):
            reader.read_window(0, 64, 0, W)


def test_tiff_compression_needing_imagecodecs_is_a_clear_error(tmp_path):
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, GRAY8, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        entry = tif.pages[0].tags[259].offset  # classic TIFF entry: code, type, count, value
    data = bytearray(path.read_bytes())
    data[entry + 8:entry + 10] = struct.pack("<H", 5)  # claim LZW
    path.write_bytes(bytes(data))
    if _has_imagecodecs():
        pytest.skip("imagecodecs is installed: LZW is decodable")
    with pytest.raises(RasterError, match="lzw.tif.*imagecodecs"):
        open_image(path)


def _has_imagecodecs() -> bool:
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        return False
    return True


def test_16bit_colour_png_is_refused(tmp_path):
    """Pillow would read it as 8-bit; the file is written by hand since Pillow cannot write it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = b"".join(b"\0" + RGB16[y, :8].astype(">u2").tobytes() for y in range(4))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 4, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    (tmp_path / "rgb16.png").write_bytes(png)
    with pytest.raises(RasterError, match="rgb16.png.*16-bit colour"):
        open_image(tmp_path / "rgb16.png")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(RasterError, match="nope.tif: no such file"):
        open_image(tmp_path / "nope.tif")
    (tmp_path / "a.bmp").write_bytes(b"BM")
    with pytest.raises(RasterError, match=r"a.bmp: unsupported image type '.bmp'"):
        open_image(tmp_path / "a.bmp")


def test_jp2_without_rasterio_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(raster, "_import_rasterio", lambda: None)
    (tmp_path / "scene.jp2").write_bytes(b"\0" * 16)
    with pytest.raises(RasterError, match=r"scene.jp2.*pip install rasterio"):
        open_image(tmp_path / "scene.jp2")


def test_unsupported_pixel_type_is_a_raster_error_naming_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((8, 8), np.complex64))
    with pytest.raises(RasterError, match="c.tif: unsupported pixel type complex64"):
        open_image(tmp_path / "c.tif")


def test_window_outside_the_image_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", GRAY8)
    with open_image(tmp_path / "a.tif") as reader:
        for window in [(0, H + 1, 0, W), (5, 5, 0, W), (-1, 3, 0, 3), (0, 3, 10, 2)]:
            with pytest.raises(ValueError, match="outside"):
                reader.read_window(*window)


def test_float_outside_unit_range_is_refused_on_open(tmp_path):
    bad = FLOAT.copy()
    bad[H - 1, W - 1] = 1.5
    tifffile.imwrite(tmp_path / "f.tif", bad)
    message = r"f.tif: float image with values in \[[0-9.e-]+, 1.5\] in rows 0:300: .*must already lie in \[0, 1\]"
    with pytest.raises(RasterError, match=message):
        open_image(tmp_path / "f.tif")


def test_large_float_image_is_sampled_on_open_and_checked_per_window(tmp_path, monkeypatch):
    # treat the 300 x 517 image as large: sampled windows are rows {0, 134, 268} x cols {0, 242, 485}, 32 a side
    monkeypatch.setattr(raster, "FLOAT_SCAN_PIXELS", 1000)
    monkeypatch.setattr(raster, "FLOAT_SAMPLE_SIDE", 32)
    bad = FLOAT.copy()
    bad[50, 158] = np.nan  # outside every sampled window
    tifffile.imwrite(tmp_path / "f.tif", bad, tile=(32, 32), compression="zlib")
    with open_image(tmp_path / "f.tif") as reader:
        reader.normalize(reader.read_window(0, 8, 0, 8))
        with pytest.raises(RasterError, match="f.tif: float image with NaN values in a window"):
            reader.normalize(reader.read_window(0, H, 0, W))
    bad[140, 250] = -0.5  # inside a sampled window: caught on open
    tifffile.imwrite(tmp_path / "f.tif", bad, tile=(32, 32), compression="zlib")
    with pytest.raises(RasterError, match=r"values in \[-0.5, .*rows 134:166, cols 242:274"):
        open_image(tmp_path / "f.tif")


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------
def _write_in_bands(writer: MaskWriter, arr: np.ndarray, bands=(1, 7, 100, 33, 256, 300)) -> None:
    y, i = 0, 0
    while y < arr.shape[0]:
        n = bands[i % len(bands)]
        writer.write_rows(y, arr[y:y + n])
        y, i = y + min(n, arr.shape[0] - y), i + 1


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_mask_round_trip(tmp_path, dtype):
    mask = (RGB16[..., 0] % 1000).astype(dtype) if dtype == np.uint16 else GRAY8 % 5
    with MaskWriter(tmp_path / "m.png", H, W, dtype=dtype) as writer:
        _write_in_bands(writer, mask)
    assert (writer.format, writer.path) == ("png", tmp_path / "m.png")
    with Image.open(writer.path) as im:
        np.testing.assert_array_equal(np.asarray(im), mask)
    assert os.listdir(tmp_path) == ["m.png"]


def _assert_tiled_bigtiff(path: Path, expected: np.ndarray) -> None:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled
        assert (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_array_equal(page.asarray(), expected)


def test_tiff_mask_round_trip(tmp_path):
    mask = GRAY8 % 7
    with MaskWriter(tmp_path / "m.tif", H, W) as writer:
        _write_in_bands(writer, mask)
    assert (writer.format, writer.path) == ("tiff", tmp_path / "m.tif")
    _assert_tiled_bigtiff(writer.path, mask)
    assert os.listdir(tmp_path) == ["m.tif"]


def test_large_mask_becomes_tiled_bigtiff(tmp_path, monkeypatch):
    monkeypatch.setattr(raster_write, "LARGE_MASK_PIXELS", 100 * 100)
    mask = (RGB16[..., 1] % 300).astype(np.uint16)
    with MaskWriter(tmp_path / "m.png", H, W, dtype=np.uint16) as writer:
        _write_in_bands(writer, mask)
    assert writer.path == tmp_path / "m.tif"
    _assert_tiled_bigtiff(writer.path, mask)


def test_probabilities_write_as_multichannel_float16_tiff(tmp_path):
    probs = RNG.random((H, W, 3)).astype(np.float16)
    with MaskWriter(tmp_path / "probs", H, W, dtype=np.float16, channels=3) as writer:
        _write_in_bands(writer, probs)
    assert writer.path == tmp_path / "probs.tif"
    _assert_tiled_bigtiff(writer.path, probs)


def test_writer_refuses_bad_bands(tmp_path):
    with MaskWriter(tmp_path / "m.png", 10, 20) as writer:
        with pytest.raises(ValueError, match="in order: expected row 0, got 2"):
            writer.write_rows(2, np.zeros((2, 20), np.uint8))
        with pytest.raises(ValueError, match=r"do not fit the output dtype uint8"):
            writer.write_rows(0, np.full((2, 20), 300, np.int64))
        with pytest.raises(ValueError, match="cannot store float64"):
            writer.write_rows(0, np.zeros((2, 20)))
        with pytest.raises(ValueError, match="does not fit"):
            writer.write_rows(0, np.zeros((2, 21), np.uint8))
        writer.write_rows(0, np.ones((10, 20), np.int64))  # in-range integers of another dtype are fine
    with Image.open(tmp_path / "m.png") as im:
        assert np.asarray(im).tolist() == np.ones((10, 20)).tolist()


@pytest.mark.parametrize("name", ["m.png", "m.tif"])
def test_failed_write_leaves_neither_output_nor_temp(tmp_path, name):
    with pytest.raises(RuntimeError, match="boom"):
        with MaskWriter(tmp_path / name, H, W) as writer:
            writer.write_rows(0, GRAY8[:100])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    writer = MaskWriter(tmp_path / name, H, W)
    writer.write_rows(0, GRAY8[:100])
    with pytest.raises(ValueError, match="only 100 of 300 rows"):
        writer.close()
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_previous_output(tmp_path):
    with MaskWriter(tmp_path / "m.tif", H, W) as writer:
        writer.write_rows(0, GRAY8)
    before = (tmp_path / "m.tif").read_bytes()
    with pytest.raises(RuntimeError):
        with MaskWriter(tmp_path / "m.tif", H, W) as writer:
            writer.write_rows(0, GRAY8[:10] // 2)
            raise RuntimeError("crash")
    assert (tmp_path / "m.tif").read_bytes() == before
    assert os.listdir(tmp_path) == ["m.tif"]


def test_a_discarded_output_whose_file_cannot_be_closed_leaves_no_temporary_file(tmp_path, monkeypatch):
    class CloseFails(io.FileIO):  # as a full disk refuses the buffered rest when the file is closed
        def close(self):
            super().close()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: CloseFails(fd, "r+"))
    writer = MaskWriter(tmp_path / "m.png", H, W)
    with pytest.raises(OSError, match="No space left"):
        writer.abort()
    assert os.listdir(tmp_path) == []  # before: the hidden .m.png.<random>.tmp stayed


GEO_TAGS = [
    (33550, "d", 3, (10.0, 10.0, 0.0), False),  # ModelPixelScale
    (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), False),  # ModelTiepoint
    # GeoKeyDirectory: model type projected, raster type area, ProjectedCSType = EPSG 32633
    (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), False),
    (34737, "s", 0, "WGS 84 / UTM zone 33N|", False),  # GeoAsciiParams
]


def test_geotiff_georeferencing_is_kept_and_copied_to_the_mask(tmp_path):
    tifffile.imwrite(tmp_path / "geo.tif", GRAY8, extratags=GEO_TAGS, tile=(64, 64), compression="zlib")
    with open_image(tmp_path / "geo.tif") as reader:
        _assert_windows(reader, GRAY8)
        assert reader.georef is not None
        assert reader.georef.transform == (10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)
        assert "32633" in reader.georef.crs
        with pytest.raises(ValueError, match="georeferencing would not fit"):
            MaskWriter(tmp_path / "small.png", 10, 10, like=reader)
        with MaskWriter(tmp_path / "m.png", H, W, like=reader) as writer:  # georeferenced: TIFF
            writer.write_rows(0, GRAY8 % 3)
    assert writer.path == tmp_path / "m.tif"
    _assert_tiled_bigtiff(writer.path, GRAY8 % 3)
    with tifffile.TiffFile(writer.path) as out:
        tags = out.pages[0].tags
        for code, _, _, value, _ in GEO_TAGS:
            assert tags[code].value == (value if isinstance(value, str) else tuple(value))
        assert out.pages[0].is_geotiff


# ---------------------------------------------------------------------------------------------
# overlay
# ---------------------------------------------------------------------------------------------
def test_overlay_is_small_and_colours_classes(tmp_path):
    h, w = 3000, 1000
    image = np.full((h, w), 1000, np.uint16)  # a 16-bit image using a small part of its range
    image[h // 2:] = 3000  # stretched to 0 (top half) and 255 (bottom half)
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(256, 256), compression="zlib")
    mask = np.lib.format.open_memmap(tmp_path / "mask.npy", mode="w+", dtype=np.uint8, shape=(h, w))
    mask[:] = 0
    mask[:, 500:] = 2
    with open_image(tmp_path / "img.tif") as reader:
        size = overlay_png(tmp_path / "ov.png", reader, mask, num_classes=3, max_side=256)
    with Image.open(tmp_path / "ov.png") as im:
        rgb = np.asarray(im).astype(int)
    assert size == rgb.shape[:2] == (250, 84) and max(size) <= 256
    left, right = rgb[:, :40], rgb[:, 45:]
    assert (left[..., 0] == left[..., 1]).all() and (left[..., 1] == left[..., 2]).all()  # class 0: gray
    np.testing.assert_array_equal(left[:125], 0)
    np.testing.assert_array_equal(left[125:], 255)
    expected = 0.5 * 127.5 + 0.5 * class_palette(3)[2]  # half the rows 0, half 255, blended
    np.testing.assert_allclose(right.reshape(-1, 3).mean(0), expected, atol=1.0)
    assert sorted(os.listdir(tmp_path)) == ["img.tif", "mask.npy", "ov.png"]


def test_overlay_accepts_a_written_mask_and_checks_values(tmp_path):
    Image.fromarray(RGB16[..., :3].astype(np.uint8)).save(tmp_path / "img.png")
    with MaskWriter(tmp_path / "m.tif", H, W) as writer:
        writer.write_rows(0, GRAY8 % 4)
    with open_image(tmp_path / "img.png") as reader, open_image(writer.path) as mask:
        assert overlay_png(tmp_path / "ov.png", reader, mask, num_classes=4) == (H, W)
        with pytest.raises(ValueError, match=r"mask values in \[0, 3\] are outside the 3 classes"):
            overlay_png(tmp_path / "ov2.png", reader, mask, num_classes=3)
        with pytest.raises(ValueError, match="does not match"):
            overlay_png(tmp_path / "ov2.png", reader, np.zeros((H, W - 1), np.uint8), num_classes=3)
    assert not (tmp_path / "ov2.png").exists()


def test_class_palette_is_distinct():
    palette = class_palette(40)
    assert palette.shape == (40, 3) and palette[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in palette}) == 40


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _pattern(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    y = np.arange(y0, y1, dtype=np.uint32)[:, None]
    x = np.arange(x0, x1, dtype=np.uint32)[None, :]
    return ((y * 31 + x * 17 + (x * y) % 251) % 65536).astype(np.uint16)


def test_windowed_reading_of_a_compressed_tiff_does_not_load_it(tmp_path):
    side, win = 4096, 512
    image_bytes = side * side * 2  # 32 MiB
    tifffile.imwrite(tmp_path / "big.tif", _pattern(0, side, 0, side), tile=(256, 256), compression="zlib")
    tracemalloc.start()
    try:
        probe = np.ones(image_bytes // 4, np.uint8)  # numpy reports its buffers to tracemalloc
        seen = tracemalloc.get_traced_memory()[0]
        del probe
        if seen < image_bytes // 4:
            pytest.skip("tracemalloc does not see numpy allocations here")
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with open_image(tmp_path / "big.tif", cache_bytes=2 * 2**20) as reader:
            for y0 in range(0, side, win):
                for x0 in range(0, side, win):
                    window = reader.read_window(y0, y0 + win, x0, x0 + win)
                    if not np.array_equal(window[..., 0], _pattern(y0, y0 + win, x0, x0 + win)):
                        pytest.fail(f"window at {(y0, x0)} differs from the written image")
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < image_bytes / 4, f"peak {peak / 2**20:.1f} MiB for a {image_bytes / 2**20:.0f} MiB image"


# ---------------------------------------------------------------------------------------------
# rasterio (optional): GeoTIFF and JPEG 2000
# ---------------------------------------------------------------------------------------------
def _rasterio_write(path: Path, arr: np.ndarray, driver: str, **options):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    transform = Affine(0.5, 0.0, 300000.0, 0.0, -0.5, 5000000.0)
    with rasterio.open(path, "w", driver=driver, height=arr.shape[0], width=arr.shape[1], count=arr.shape[2],
                       dtype=arr.dtype.name, crs="EPSG:32632", transform=transform, **options) as ds:
        ds.write(np.moveaxis(arr, -1, 0))
    return rasterio, transform


def _assert_georeferenced_like(rasterio, path: Path, transform) -> None:
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 32632
        assert tuple(ds.transform)[:6] == pytest.approx(tuple(transform)[:6])


def test_rasterio_geotiff_read_and_mask_keeps_crs(tmp_path):
    arr = RGB16[..., :3]
    rasterio, transform = _rasterio_write(tmp_path / "geo.tif", arr, "GTiff", tiled=True, compress="deflate")
    with open_image(tmp_path / "geo.tif") as reader:
        assert reader.layout == "rasterio"
        _assert_windows(reader, arr)
        assert reader.georef.transform == pytest.approx(tuple(transform)[:6])
        with MaskWriter(tmp_path / "m.png", H, W, like=reader) as writer:
            _write_in_bands(writer, GRAY8 % 3)
    _assert_tiled_bigtiff(writer.path, GRAY8 % 3)
    _assert_georeferenced_like(rasterio, writer.path, transform)


def test_rasterio_jpeg2000_read_and_mask_keeps_crs(tmp_path):
    arr = _hwc(GRAY8)
    rasterio, transform = _rasterio_write(tmp_path / "scene.jp2", arr, "JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES")
    with open_image(tmp_path / "scene.jp2") as reader:
        _assert_windows(reader, arr)
        assert reader.georef is not None and not reader.georef.tiff_tags
        with MaskWriter(tmp_path / "m", H, W, like=reader) as writer:  # crs/transform only: rasterio writes
            _write_in_bands(writer, GRAY8 % 3)
    assert writer.path == tmp_path / "m.tif"
    with tifffile.TiffFile(writer.path) as tif:
        assert tif.pages[0].is_tiled
        np.testing.assert_array_equal(tif.pages[0].asarray(), GRAY8 % 3)
    _assert_georeferenced_like(rasterio, writer.path, transform)
    assert sorted(os.listdir(tmp_path)) == ["m.tif", "scene.jp2"]


# ---------------------------------------------------------------------------------------------
# class masks a viewer shows, probabilities a viewer opens
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_binary_class_mask_is_0_255_gray_and_reads_back_as_indices(tmp_path, suffix):
    labels = (GRAY8 > 127).astype(np.uint8)
    with MaskWriter(tmp_path / f"m{suffix}", H, W, classes=2) as writer:
        _write_in_bands(writer, labels)
    with Image.open(writer.path) as im:  # before: 0/1, an all-black picture
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), labels * 255)
    with ClassMask(writer.path, 2) as mask:
        np.testing.assert_array_equal(mask[0:H, 0:W], labels)
        np.testing.assert_array_equal(mask[10:20, 5:9], labels[10:20, 5:9])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_multiclass_mask_holds_indices_with_a_colour_per_class(tmp_path, suffix):
    labels = GRAY8 % 4
    with MaskWriter(tmp_path / f"m{suffix}", H, W, classes=4) as writer:
        _write_in_bands(writer, labels)
    with Image.open(writer.path) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), labels)  # the pixels are still the class indices
        rgb = np.asarray(im.convert("RGB"))
    colours = [(0, 0, 0), (230, 159, 0), (86, 180, 233), (0, 158, 115)]  # background black, then Okabe-Ito
    np.testing.assert_array_equal(rgb, np.array(colours, np.uint8)[labels])
    if suffix == ".tif":
        with tifffile.TiffFile(writer.path) as tif:
            assert tif.pages[0].photometric == 3  # palette
            np.testing.assert_array_equal(tif.pages[0].colormap[:, :4].T // 257, colours)
    with ClassMask(writer.path, 4) as mask:
        np.testing.assert_array_equal(mask[0:H, 0:W], labels)


def test_a_class_mask_refuses_indices_beyond_its_classes(tmp_path):
    with pytest.raises(ValueError, match=r"class index 2 in a mask of 2 classes \[0, 2\)"):
        with MaskWriter(tmp_path / "m", H, W, classes=2) as writer:
            writer.write_rows(0, np.full((H, W), 2, np.uint8))
    with pytest.raises(ValueError, match="a class mask holds 2 to 256 classes in one uint8 channel, not 3 classes "
                                         "in 1 uint16 channel"):
        MaskWriter(tmp_path / "m", H, W, np.uint16, classes=3)
    assert os.listdir(tmp_path) == []


def test_a_tiff_mask_declares_nodata_when_asked(tmp_path):
    with MaskWriter(tmp_path / "m.tif", H, W, classes=3, nodata=255) as writer:
        writer.write_rows(0, GRAY8 % 3)
    with MaskWriter(tmp_path / "plain.tif", H, W, classes=3) as plain:
        plain.write_rows(0, GRAY8 % 3)
    with tifffile.TiffFile(writer.path) as tif, tifffile.TiffFile(plain.path) as other:
        assert tif.pages[0].nodata == 255 and other.pages[0].nodata == 0 and 42113 not in other.pages[0].tags


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_probabilities_are_uint8_0_255_by_default_or_float32(tmp_path, dtype):
    probs = np.array([[0.0, 0.5, 1.0, 0.25], [1 / 255, 0.998, 0.002, 0.75]], np.float32)
    with ProbabilityWriter(tmp_path / "p.tif", 2, 4, channels=1, dtype=dtype) as writer:
        writer.write_rows(0, probs)
    with Image.open(writer.path) as im:  # before: float16, which Pillow cannot open
        got = np.asarray(im)
    if dtype == "uint8":
        np.testing.assert_array_equal(got, [[0, 128, 255, 64], [1, 254, 1, 191]])
    else:
        np.testing.assert_array_equal(got, probs)
    with pytest.raises(ValueError, match="probabilities are written as uint8 or float32, not float16"):
        ProbabilityWriter(tmp_path / "q.tif", 2, 4, channels=1, dtype="float16")


def test_rasterio_geotiff_class_mask_has_the_colour_table_and_nodata(tmp_path):
    arr = _hwc(GRAY8)
    rasterio, transform = _rasterio_write(tmp_path / "scene.jp2", arr, "JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES")
    with open_image(tmp_path / "scene.jp2") as reader:
        with MaskWriter(tmp_path / "m", H, W, like=reader, classes=3, nodata=255) as writer:
            _write_in_bands(writer, GRAY8 % 3)
    _assert_georeferenced_like(rasterio, writer.path, transform)
    with rasterio.open(writer.path) as ds:
        assert ds.nodata == 255
        assert [ds.colormap(1)[k] for k in range(3)] == [(0, 0, 0, 255), (230, 159, 0, 255), (86, 180, 233, 255)]
        np.testing.assert_array_equal(ds.read(1), GRAY8 % 3)


# ---------------------------------------------------------------------------------------------
# a whole pass: rows read once, in block-aligned chunks, by several readers; GDAL's cache bounded
# ---------------------------------------------------------------------------------------------
def _chunks_of(reader, readers):
    chunks = list(raster.row_chunks(reader, readers))
    return [y0 for y0, _ in chunks], np.concatenate([rows for _, rows in chunks])


@pytest.mark.parametrize("kind", ["jp2", "geotiff", "tiff"])
def test_row_chunks_read_every_row_once_aligned_to_blocks_by_several_handles(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(raster, "CHUNK_BYTES", 96 * W * 3 * 2)  # 96 rows of RGB16: 3 blocks of 32 rows
    if kind == "tiff":
        tifffile.imwrite(tmp_path / "s.tif", RGB16, tile=(32, 32), compression="zlib")
        path = tmp_path / "s.tif"
    else:
        driver, path = ("JP2OpenJPEG", tmp_path / "s.jp2") if kind == "jp2" else ("GTiff", tmp_path / "s.tif")
        options = (dict(QUALITY=100, REVERSIBLE="YES", BLOCKXSIZE=64, BLOCKYSIZE=32) if kind == "jp2"
                   else dict(tiled=True, blockxsize=64, blockysize=32, compress="deflate"))
        _rasterio_write(path, RGB16, driver, **options)
    opened = []
    original = raster.ImageReader.reopen
    monkeypatch.setattr(raster.ImageReader, "reopen", lambda self: opened.append(original(self)) or opened[-1])
    with open_image(path) as reader:
        assert reader.parallel_reads and reader.block_rows == 32 and reader.chunk_rows == 96
        one_starts, one = _chunks_of(reader, 1)
        three_starts, three = _chunks_of(reader, 3)
    assert one_starts == three_starts == list(range(0, H, 96))
    np.testing.assert_array_equal(one, RGB16)  # lossless JPEG 2000 included
    np.testing.assert_array_equal(three, RGB16)
    assert 1 <= len(opened) <= 3  # a handle a thread (an idle thread is reused), not the caller's
    assert all(r.offset == 0 and r.scale == 65535 for r in opened)


def _gdal_cache_used():
    """Bytes in GDAL's block cache (through rasterio's own libgdal), or a skip where it cannot be found."""
    import ctypes
    import ctypes.util
    import glob

    rasterio = pytest.importorskip("rasterio")
    found = glob.glob(os.path.dirname(rasterio.__file__) + ".libs/libgdal*") or [ctypes.util.find_library("gdal")]
    if not found[0]:
        pytest.skip("GDAL's shared library cannot be located to read its cache")
    lib = ctypes.CDLL(found[0])
    lib.GDALGetCacheUsed64.restype = ctypes.c_int64
    return lib.GDALGetCacheUsed64


def test_gdal_block_cache_is_bounded_to_two_chunks_during_a_whole_pass(tmp_path, monkeypatch):
    """GDAL keeps 5 % of the RAM of blocks unless told otherwise: a pass over a JPEG 2000 held the
    whole image. Bounded, it holds at most two chunks."""
    used = _gdal_cache_used()
    monkeypatch.setattr(raster, "CHUNK_BYTES", 64 * W, raising=False)  # 64 rows of GRAY8: 2 blocks of 32 rows
    _rasterio_write(tmp_path / "s.jp2", GRAY8[..., None], "JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES",
                    BLOCKXSIZE=64, BLOCKYSIZE=32)
    with open_image(tmp_path / "s.jp2") as reader:
        peak = 0
        for y0 in range(0, H, 64):  # the chunks of a pass
            reader.read_window(y0, min(H, y0 + 64), 0, W)
            peak = max(peak, used())
        assert 0 < peak <= 2 * 64 * W < H * W
        assert reader.gdal_cache_bytes == 2 * 64 * W


def test_overlay_from_rows_kept_while_they_pass_equals_the_overlay_read_from_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", RGB16, tile=(32, 32), compression="zlib")
    mask = (GRAY8 % 3).astype(np.uint8)
    with open_image(tmp_path / "img.tif") as reader:
        overlay_png(tmp_path / "read.png", reader, mask, num_classes=3, max_side=100)
        sample = raster_write.OverlaySample(reader, max_side=100)
        assert sample.step == 6  # 517 / 6 <= 100: not a divisor of the chunks' 37 rows
        for y0 in range(0, H, 37):
            sample.add(y0, RGB16[y0:y0 + 37])
        overlay_png(tmp_path / "kept.png", reader, mask, num_classes=3, max_side=100, sample=sample)
        partial = raster_write.OverlaySample(reader, max_side=100)
        partial.add(0, RGB16[:200])
        with pytest.raises(ValueError, match=r"img.tif has not seen every row"):
            overlay_png(tmp_path / "bad.png", reader, mask, num_classes=3, max_side=100, sample=partial)
    assert (tmp_path / "kept.png").read_bytes() == (tmp_path / "read.png").read_bytes()
    assert not (tmp_path / "bad.png").exists()
