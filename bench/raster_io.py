"""Reading a whole scene as prediction does: seconds per megapixel and memory, per format and reader.

    python bench/raster_io.py [--size 4096] [--width 4096] [--workdir /tmp/raster_io]

Writes one synthetic scene (bench/inference.py's drawing) as a tiled deflate GeoTIFF (512² tiles)
and a lossless JPEG 2000 (GDAL's default 1024² tiles), then reads each whole, each way in a fresh
process: ``bands`` (what predict did before: every band of 128 rows at a step of 64 read through
:meth:`ImageReader.read_window`; run it with ``BENCH_TREE=<checkout of an older commit>`` for the
code before, whose GDAL block cache was unbounded) and ``chunks N`` (what predict
does now: :func:`utils.raster.row_chunks` with N readers). Reports wall and CPU seconds per MP,
the growth of the resident memory (VmRSS after the pass minus before, with the file still open) and
GDAL's block cache at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the code read: this tree, or BENCH_TREE (e.g. a checkout of an older commit, for the "before" rows)
sys.path.insert(0, os.environ.get("BENCH_TREE", str(ROOT)))


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def measure(path: str, how: str) -> dict:
    """One pass over ``path`` (``bands`` or ``chunks:<readers>``), in this process."""
    import rasterio

    from utils.raster import open_image
    from utils.tiling import window_starts

    lib = ctypes.CDLL(glob.glob(os.path.dirname(rasterio.__file__) + ".libs/libgdal*")[0])
    lib.GDALGetCacheUsed64.restype = ctypes.c_int64
    with open_image(path) as image:
        h, w = image.height, image.width
        before, wall, cpu = _rss_mib(), time.perf_counter(), time.process_time()
        if how == "bands":
            for y in window_starts(h, 128, 64):
                image.read_window(y, min(h, y + 128), 0, w)
        else:
            from utils.raster import row_chunks

            for _ in row_chunks(image, int(how.split(":")[1])):
                pass
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        grown, cache = _rss_mib() - before, lib.GDALGetCacheUsed64() / 2**20
    mp = h * w / 1e6
    return {"file": Path(path).name, "how": how, "s_per_mp": wall / mp, "cpu_s_per_mp": cpu / mp,
            "rss_growth_mib": grown, "gdal_cache_mib": cache}


def write_scene(workdir: Path, height: int, width: int) -> list[Path]:
    import rasterio
    from affine import Affine

    from bench.inference import make_scene, render_scene

    image = render_scene(make_scene(max(height, width), 7))[0][:height, :width]
    profile = dict(height=height, width=width, count=1, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000))
    tif, jp2 = workdir / "scene.tif", workdir / "scene.jp2"
    with rasterio.open(tif, "w", driver="GTiff", tiled=True, blockxsize=512, blockysize=512, compress="deflate",
                       **profile) as ds:
        ds.write(image, 1)
    with rasterio.open(jp2, "w", driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES", **profile) as ds:
        ds.write(image, 1)
    return [tif, jp2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="scene height")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/raster_io"))
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ways", nargs="+", default=None, help="bands and/or chunks:N (default: bands and every --readers)")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # the child: PATH HOW
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = [args.workdir / "scene.tif", args.workdir / "scene.jp2"]
    if not all(f.exists() for f in files):
        files = write_scene(args.workdir, args.size, args.width)
    print(f"{args.size}x{args.width} uint8 scene; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| file | read | s/MP (wall) | CPU s/MP | RSS growth MiB | GDAL cache MiB |\n|---|---|---|---|---|---|")
    for path in files:
        for how in args.ways or ["bands"] + [f"chunks:{n}" for n in args.readers]:
            done = subprocess.run([sys.executable, __file__, "--measure", str(path), how], capture_output=True,
                                  text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {r['file']} | {r['how']} | {r['s_per_mp']:.4f} | {r['cpu_s_per_mp']:.4f} | "
                  f"{r['rss_growth_mib']:.0f} | {r['gdal_cache_mib']:.0f} |")


if __name__ == "__main__":
    main()
