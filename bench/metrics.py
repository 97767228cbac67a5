"""Surface-distance speed: model.metrics vs MONAI, same masks, same machine, same run.

For each shape (B x K x H x W) the script times our one call that produces all four distance
metrics (ASD, AD, HD95, D95) against the four MONAI calls that produce the same four numbers:

    compute_hausdorff_distance(percentile=95)                  -> HD95
    compute_hausdorff_distance(percentile=95, directed=True)   -> D95
    compute_average_surface_distance(symmetric=True)           -> ASD
    compute_average_surface_distance(symmetric=False)          -> AD

MONAI gets one-hot float masks with ``include_background=True`` (so the K = 1 shapes keep their
single foreground channel and K = 3 scores all three channels); we get the label maps and score
the same classes. Masks are a few random ellipses per class with a jittered, rescaled prediction,
so every class is non-empty in both masks (MONAI returns inf/NaN otherwise). Times are the median
of --repeats runs after one warm-up; "max |diff|" is over all four metrics, images and classes.

Run:  python bench/metrics.py [--repeats 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.metrics import surface_distances  # noqa: E402

SHAPES = [(16, 1, 256, 256), (16, 3, 256, 256), (16, 1, 512, 512)]


def ellipse_labels(b: int, k: int, h: int, w: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and prediction label maps: 3 ellipses per image (classes taken in turn), the
    prediction's ellipses jittered and rescaled."""
    yy, xx = np.mgrid[0:h, 0:w]
    num_labels = max(k, 2)
    target = np.zeros((b, h, w), np.int64)
    pred = np.zeros((b, h, w), np.int64)
    for i in range(b):
        # redraw until every class is present in both maps (a later ellipse can cover an earlier one)
        while not all((m == c).any() for m in (target[i], pred[i]) for c in range(num_labels)):
            target[i] = pred[i] = 0
            for n in range(3):
                c = 1 + n % (num_labels - 1)
                cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
                ry, rx = rng.uniform(0.04, 0.12) * h, rng.uniform(0.04, 0.12) * w
                target[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = c
                cy, cx = cy + rng.normal(0, 3), cx + rng.normal(0, 3)
                ry, rx = ry * rng.uniform(0.85, 1.15), rx * rng.uniform(0.85, 1.15)
                pred[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = c
    return torch.from_numpy(pred), torch.from_numpy(target)


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (imports, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # MONAI's deprecation notices
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats} (median, ms)\n")
    header = (
        "| shape | MONAI HD95 | MONAI D95 | MONAI ASD | MONAI AD | MONAI total | ours kdtree | speed-up "
        "| ours torch (CPU) | speed-up | max abs diff |"
    )
    if torch.cuda.is_available():
        header += " ours torch (CUDA) | speed-up |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for b, k, h, w in SHAPES:
        pred, target = ellipse_labels(b, k, h, w, rng)
        num_labels = max(k, 2)
        classes = list(range(num_labels)) if k > 1 else [1]
        oh_p = torch.nn.functional.one_hot(pred, num_labels).permute(0, 3, 1, 2)[:, classes].float()
        oh_t = torch.nn.functional.one_hot(target, num_labels).permute(0, 3, 1, 2)[:, classes].float()
        calls = {
            "HD95": lambda: compute_hausdorff_distance(oh_p, oh_t, include_background=True, percentile=95),
            "D95": lambda: compute_hausdorff_distance(
                oh_p, oh_t, include_background=True, percentile=95, directed=True
            ),
            "ASD": lambda: compute_average_surface_distance(oh_p, oh_t, include_background=True, symmetric=True),
            "AD": lambda: compute_average_surface_distance(oh_p, oh_t, include_background=True, symmetric=False),
        }
        monai_ms, monai_val = {}, {}
        for name, fn in calls.items():
            monai_ms[name], monai_val[name] = timed(fn, args.repeats)
        total = sum(monai_ms.values())
        include_bg = k > 1
        ours_ms, ours = timed(
            lambda: surface_distances(pred, target, k, include_background=include_bg, backend="kdtree"), args.repeats
        )
        torch_ms, ours_t = timed(
            lambda: surface_distances(pred, target, k, include_background=include_bg, backend="torch"), args.repeats
        )
        diff = 0.0
        for res in (ours, ours_t):
            for name, field in (("HD95", "hd95"), ("D95", "d95"), ("ASD", "asd"), ("AD", "ad")):
                diff = max(diff, (getattr(res, field) - monai_val[name].double()).abs().max().item())
        if not math.isfinite(diff):
            raise SystemExit("non-finite difference: an empty mask slipped into the benchmark")
        line = (
            f"| {b}x{k}x{h}x{w} | {monai_ms['HD95']:.0f} | {monai_ms['D95']:.0f} | {monai_ms['ASD']:.0f} "
            f"| {monai_ms['AD']:.0f} | {total:.0f} | {ours_ms:.1f} | {total / ours_ms:.1f}x "
            f"| {torch_ms:.1f} | {total / torch_ms:.1f}x | {diff:.1e} |"
        )
        if torch.cuda.is_available():
            pc, tc = pred.cuda(), target.cuda()
            cuda_ms, ours_c = timed(
                lambda: surface_distances(pc, tc, k, include_background=include_bg, backend="torch"), args.repeats
            )
            cdiff = max((getattr(ours_c, f).cpu() - monai_val[n].double()).abs().max().item()
                        for n, f in (("HD95", "hd95"), ("D95", "d95"), ("ASD", "asd"), ("AD", "ad")))
            line += f" {cuda_ms:.1f} (diff {cdiff:.1e}) | {total / cuda_ms:.0f}x |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
