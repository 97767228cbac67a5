"""Benchmark: distance transforms and signed distance maps of utils/sdf.py vs SciPy, edt, kornia.

For each batch shape (B×C×H×W) of random-blob masks, one table row per implementation:

* ``scipy``  -- a Python loop over the maps: ``distance_transform_edt`` (euclidean) or
  ``distance_transform_cdt`` (taxicab / chessboard); also the reference for the error columns.
* ``edt``    -- the ``edt`` package, one map per call (euclidean only).
* ``exact``  -- ``utils.sdf.distance_transform(method="exact")``.
* ``conv kK`` -- ``method="conv"`` with kernel_size K; ``+bwd`` adds the backward pass of a soft
  mask (the loss-time cost).
* ``kornia kK`` -- ``kornia.contrib.distance_transform`` (Pham et al.'s cascade), run once per shape
  (~70 s at 16×512² on a 2-core CPU).

Columns: median wall time, speed vs the SciPy loop (SciPy time / time, > 1 = faster), and the
error against SciPy in pixels: max / mean over all pixels, and over the pixels within 10 px of the
object (0 < d ≤ 10). A second table times signed distance maps against the boundary-loss reference
(``neg·edt(neg) − (edt(pos) − 1)·pos`` with SciPy, one map at a time).

Usage:
    python bench/sdm.py                  # all shapes, 3 repeats, kornia once per shape
    python bench/sdm.py --quick          # 1 repeat, no kornia at 512², no conv k5/k7
    python bench/sdm.py --repeats 5 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.sdf import distance_transform, signed_distance_map  # noqa: E402

SHAPES = [(16, 1, 256, 256), (16, 1, 512, 512), (16, 3, 256, 256)]
CDT_METRIC = {"manhattan": "taxicab", "chebyshev": "chessboard"}


def make_masks(shape, seed: int = 0) -> np.ndarray:
    """Random smooth blobs covering 25 % of each map (every map has object and background).

    Blob scale H/16: distances reach ~80 px at 256² and ~190 px at 512² (mean ~16 / ~31 px), so
    the conv method's relative error and kornia's step count are both exercised.
    """
    b, c, h, w = shape
    rng = np.random.default_rng(seed)
    sigma = h / 16
    noise = ndi.gaussian_filter(rng.random((b * c, h, w)), (0, sigma, sigma))
    level = np.quantile(noise.reshape(b * c, -1), 0.75, axis=1)[:, None, None]
    return (noise > level).reshape(shape)


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (after one warm-up call when repeats > 1)."""
    out = fn() if repeats > 1 else None
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def scipy_distance(maps: np.ndarray, distance: str) -> np.ndarray:
    if distance == "euclidean":
        return np.stack([ndi.distance_transform_edt(~m) for m in maps])
    return np.stack([ndi.distance_transform_cdt(~m, metric=CDT_METRIC[distance]) for m in maps]).astype(np.float64)


def scipy_sdm(maps: np.ndarray) -> np.ndarray:
    out = []
    for pos in maps:
        neg = ~pos
        out.append(neg * ndi.distance_transform_edt(neg) - (ndi.distance_transform_edt(pos) - 1) * pos)
    return np.stack(out)


def errors(out: np.ndarray, ref: np.ndarray, near: np.ndarray) -> list[str]:
    err = np.abs(out.astype(np.float64) - ref)
    return [f"{err.max():.3g}", f"{err.mean():.3g}", f"{err[near].max():.3g}", f"{err[near].mean():.3g}"]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat, no kornia at 512², no conv k5/k7")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 3; 1 with --quick)")
    parser.add_argument("--device", default="cpu", help="device of ours (default cpu); others always run on CPU")
    parser.add_argument("--no-kornia", action="store_true", help="skip kornia entirely")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cpu_sync = lambda: None  # noqa: E731

    try:
        import edt
    except ImportError:
        edt = None
    kornia_dt = None
    if not args.no_kornia:
        try:
            from kornia.contrib import distance_transform as kornia_dt
        except ImportError:
            print("kornia not installed: its rows are skipped")

    header = ["shape", "distance", "method", "ms", "x SciPy", "max err", "mean err"]
    header += ["max err <=10px", "mean err <=10px"]
    rows, sdm_rows = [], []
    for shape in SHAPES:
        b, c, h, w = shape
        name = f"{b}x{c}x{h}x{w}"
        masks = make_masks(shape)
        maps = masks.reshape(-1, h, w)
        mask_t = torch.from_numpy(masks).to(device)
        soft_t = mask_t.float()
        for distance in ("euclidean", "manhattan", "chebyshev"):
            t_ref, ref = timed(lambda: scipy_distance(maps, distance), repeats, cpu_sync)
            ref = ref.reshape(shape)
            near = (ref > 0) & (ref <= 10)

            def row(method: str, seconds: float, out: np.ndarray | None) -> None:
                errs = errors(out, ref, near) if out is not None else ["-"] * 4
                rows.append([name, distance, method, f"{1000 * seconds:.1f}", f"{t_ref / seconds:.2f}", *errs])

            row("scipy loop", t_ref, ref)
            if distance == "euclidean" and edt is not None:
                t, out = timed(lambda: np.stack([edt.edt(~m, black_border=False) for m in maps]), repeats, cpu_sync)
                row("edt loop", t, out.reshape(shape))
            t, out = timed(lambda: distance_transform(mask_t, distance, "exact"), repeats, sync)
            row("exact", t, out.cpu().numpy())
            kernels = (3,) if (args.quick or distance != "euclidean") else (3, 5, 7)
            for k in kernels:
                with torch.no_grad():
                    t, out = timed(lambda: distance_transform(soft_t, distance, "conv", kernel_size=k), repeats, sync)
                row(f"conv k{k}", t, out.cpu().numpy())
            if distance == "euclidean":

                def forward_backward():
                    x = soft_t.clone().requires_grad_()
                    y = distance_transform(x, distance, "conv", kernel_size=3)
                    torch.where(torch.isfinite(y), y, 0).sum().backward()
                    return x.grad

                t, _ = timed(forward_backward, repeats, sync)
                row("conv k3 +bwd", t, None)
                if kornia_dt is not None and not (args.quick and h >= 512):
                    x = torch.from_numpy(masks).float().reshape(-1, 1, h, w)
                    with torch.no_grad():
                        t, out = timed(lambda: kornia_dt(x, kernel_size=3, h=0.35), 1, cpu_sync)
                    row("kornia k3 (1 call)", t, out.reshape(shape).numpy())
            print(f"done {name} {distance}", file=sys.stderr, flush=True)

        t_ref, ref = timed(lambda: scipy_sdm(maps), repeats, cpu_sync)
        ref = ref.reshape(shape)
        near = np.abs(ref) <= 10
        for method, fn in [
            ("scipy reference loop", None),
            ("exact", lambda: signed_distance_map(mask_t, "euclidean", "exact")),
            ("conv k3", lambda: signed_distance_map(soft_t, "euclidean", "conv")),
        ]:
            if fn is None:
                t, out = t_ref, ref
            else:
                with torch.no_grad():
                    t, out = timed(fn, repeats, sync)
                out = out.cpu().numpy()
            sdm_rows.append([name, "euclidean", method, f"{1000 * t:.1f}", f"{t_ref / t:.2f}", *errors(out, ref, near)])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ours on {device}, median of {repeats}\n")
    print("Distance transforms (distance of every pixel to the nearest object pixel), error in px vs SciPy:\n")
    print(table(header, rows))
    print("\nSigned distance maps (euclidean), error in px vs the SciPy reference:\n")
    sdm_header = header[:7] + ["max err |phi|<=10", "mean err |phi|<=10"]
    print(table(sdm_header, sdm_rows))


if __name__ == "__main__":
    main()
