"""Gated prediction of finished ``bench/peers.py`` runs at several GATE_THRESHOLD values: the table
that chose the default (0.4).

For each task and seed the run's final network (``last.pth``) predicts the task's whole test images
with gating at each threshold, scored as ``bench/peers.py`` scores (one
:class:`model.metrics.SegmentationMetrics`, whole images). Nothing is trained. A row's run that
reused another row's identical run (``same_run_as``) is read from that row's folder.

    python bench/gate_threshold.py --row batchnorm --tasks lines_ellipses hard_boundaries

prints, per task and threshold, the mean over the seeds of the mean Dice, the boundary class's IoU
and HD95, the share of windows decoded, and the prediction seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import peers  # noqa: E402

THRESHOLDS = (0.5, 0.4, 0.3, 0.2, 0.1)


def trained_folder(run: peers.Run) -> Path:
    """The folder holding the run's network: its own, or that of the run it reused."""
    folder = run.folder
    for _ in range(len(peers.ROWS)):
        result = json.loads((folder / "result.json").read_text())
        if not result.get("same_run_as"):
            return folder
        folder = folder.parent.parent / result["same_run_as"] / folder.name
    raise RuntimeError(f"{run.folder}: a cycle of same_run_as")


def sweep(run: peers.Run, thresholds) -> dict[float, tuple[float, float, float, float, float]]:
    """threshold -> (Dice, boundary IoU, boundary HD95, decoded share, predict s) of one run."""
    checkpoint, runtime, splits = peers.load_trained(run, trained_folder(run))
    out = {}
    for threshold in thresholds:
        gate_cfg = dataclasses.replace(checkpoint.cfg, GATE_THRESHOLD=threshold)
        predictor = peers.build_predictor(gate_cfg, checkpoint.net, checkpoint.can_gate, runtime, gating=True)
        scores = peers.score(run, splits, peers.whole_image_predict(predictor, gate_cfg.SEG_THRESHOLD))
        dice, iou = peers.headline(run.task, scores)
        out[threshold] = (dice, iou, scores[f"HD95/{run.task.boundary}"], scores["decoded"], scores["predict_s"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", default="batchnorm", choices=list(peers.ROWS))
    parser.add_argument("--tasks", nargs="+", default=list(peers.TASKS), choices=list(peers.TASKS))
    parser.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS))
    parser.add_argument("--results-dir", type=Path, default=peers.ROOT / "saved" / "peers")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"Gated prediction of the row '{peers.ROWS[args.row].label}' at each GATE_THRESHOLD, mean over the "
             f"seeds {', '.join(map(str, peers.SEEDS))} (`python bench/gate_threshold.py --row {args.row}`)", "",
             "| task | GATE_THRESHOLD | Dice | IoU boundary class | HD95 boundary class px | windows decoded | "
             "predict s |", "|---|---|---|---|---|---|---|"]
    for task in args.tasks:
        runs = [peers.Run(task, args.row, seed, i, args.results_dir) for i, seed in enumerate(peers.SEEDS)]
        runs = [r for r in runs if (r.folder / "result.json").is_file()]
        if not runs:
            print(f"{task}: no finished runs of {args.row} in {args.results_dir}", file=sys.stderr)
            continue
        per_seed = [sweep(r, args.thresholds) for r in runs]
        for t in args.thresholds:
            m = np.mean([s[t] for s in per_seed], axis=0)
            lines.append(f"| {task} | {t} | {m[0]:.4f} | {m[1]:.4f} | {m[2]:.2f} | {m[3]:.0%} | {m[4]:.1f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
