"""The default run, measured: what `python main.py` gives a new user, written to docs/.

    python bench/default_run.py            # the default run on this machine, then the README's figure
    python bench/default_run.py --avx2     # the same, plus a row with the CPU limited to AVX2

Each row runs ``python main.py RESULTS_DIR=<a fresh temporary folder>`` (the default configuration,
the GPUs this machine has, the synthetic data generated from scratch) and records its wall time, the
precision and memory format the run chose (its ``config.yaml`` says so), its peak resident memory,
the best epoch and its score, and the whole-image evaluation of ``best.pth`` from ``summary.json``
(ungated and gated). ``--avx2`` adds the same run under ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2``, the slow path of an older CPU. The rows, the machine and the commit go to
``docs/default_run.json`` (the numbers the README quotes; ``tests/bench/test_docs.py`` checks the
quotes against it) and ``docs/default_run.md`` (the same as a table).

Last, the first row's ``best.pth`` predicts a demo scene (``python -m utils.demo_scene``, a seed the
run does not train on) and the scene beside its prediction overlay becomes
``docs/figures/overlay.png`` (at most 1000 px wide), the README's figure.

Every file is written atomically, and only once every run has finished: a failed run writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.reproduce import git_commit, machine  # noqa: E402
from utils.util import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

DOCS = ROOT / "docs"
#: The environment of the ``--avx2`` row: oneDNN and ATen limited to AVX2 (no AVX-512, AMX, native bf16).
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
#: Side of the demo scene the figure shows, and the figure's largest width.
SCENE_SIZE, FIGURE_WIDTH = 1024, 1000


class RunFailed(RuntimeError):
    """A command of the measurement ended with a non-zero status."""


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` from the repository root with its output in ``log``.

    Returns:
        (wall seconds, peak resident memory in MiB of the command and the processes it waited for).

    Raises:
        RunFailed: the command failed (the message names the log).
    """
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RunFailed(f"{' '.join(cmd)} exited with status {proc.returncode}; its output: {log}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def resolved(config_text: str, option: str) -> str:
    """What a run chose for ``option`` (``auto`` resolved), from the note its ``config.yaml`` carries:
    ``# MIXED_PRECISION resolved here: auto: bf16 (CPU with native bf16: AMX-BF16)`` -> ``bf16``."""
    m = re.search(rf"^# {option} resolved here: (?:\w+: )?([\w-]+)", config_text, re.MULTILINE)
    if not m:
        raise RunFailed(f"the run's config.yaml does not say what {option} resolved to")
    return m.group(1)


def row_of(run: Path, wall: float, rss_mib: float, env: dict[str, str]) -> dict:
    """One row of the table from a finished run folder."""
    summary = json.loads((run / "summary.json").read_text())
    config = (run / "config.yaml").read_text()
    whole = summary["whole_image"]
    metric = summary["eval_metric"]
    row = {
        "env": env,
        "wall_s": round(wall, 1),
        "precision": resolved(config, "MIXED_PRECISION"),
        "memory_format": resolved(config, "CHANNELS_LAST"),
        "peak_rss_mib": round(rss_mib),
        "epochs": summary["final"]["epoch"] + 1,
        "eval_metric": metric,
        "best_epoch": summary["best_epoch"],
        "best_value": summary["best"][metric],
        "best_dsc": summary["best"]["DSC"],
        "whole_checkpoint": whole["checkpoint"],
    }
    for mode in ("ungated", "gated"):
        if mode in whole:
            for key in ("DSC", "HD95", "ACC", "gated_off_fraction"):
                row[f"whole_{key.lower()}_{mode}"] = whole[mode][key]
    return row


def default_row(tmp: Path, name: str, env_extra: dict[str, str]) -> tuple[dict, Path]:
    """Run ``python main.py`` into a fresh folder under ``tmp``; returns its row and run folder."""
    results = tmp / name
    env = {**os.environ, **env_extra}
    wall, rss = run_measured([sys.executable, "main.py", f"RESULTS_DIR={results}"], env, tmp / f"{name}.log")
    runs = sorted(results.glob("*/run_*"))
    if len(runs) != 1:
        raise RunFailed(f"expected one run folder under {results}, found {[str(r) for r in runs]}")
    print(f"{name}: {wall:.0f} s, log {tmp / f'{name}.log'}", flush=True)
    return row_of(runs[0], wall, rss, env_extra), runs[0]


def predict_demo(run: Path, tmp: Path) -> dict:
    """Predict a demo scene with ``run``'s best.pth; returns the files and the scene's Dice against its truth."""
    scene = tmp / "scene.tif"
    subprocess.run([sys.executable, "-m", "utils.demo_scene", str(scene), "--size", str(SCENE_SIZE), "--truth"],
                   cwd=ROOT, check=True, capture_output=True)
    out = tmp / "predict"
    predict = [sys.executable, "main.py", "predict", f"MODEL_WEIGHTS={run / 'best'}", f"INPUT={scene}", f"OUTPUT={out}"]
    wall, _ = run_measured(predict, dict(os.environ), tmp / "predict.log")
    from PIL import Image

    predicted = np.asarray(Image.open(out / "scene_mask.png")) > 0  # binary model: 0 / 255
    truth = np.asarray(Image.open(tmp / "scene_truth.png")) > 0  # the default model's foreground: any object
    dice = 2 * (predicted & truth).sum() / max(int(predicted.sum() + truth.sum()), 1)
    return {"scene": scene, "overlay": out / "scene_overlay.png", "dice": float(dice), "predict_s": round(wall, 1)}


def compose_figure(scene: Path, overlay: Path, path: Path, width: int = FIGURE_WIDTH) -> tuple[int, int]:
    """The scene (left) beside its prediction overlay (right), ``width`` px wide in all, as a PNG at ``path``.

    Returns:
        (width, height) of the figure.
    """
    import tifffile
    from PIL import Image

    gap = 8
    side = (width - gap) // 2
    image = Image.fromarray(tifffile.imread(scene)).convert("RGB").resize((side, side), Image.LANCZOS)
    shown = Image.open(overlay).convert("RGB").resize((side, side), Image.LANCZOS)
    figure = Image.new("RGB", (2 * side + gap, side), (255, 255, 255))
    figure.paste(image, (0, 0))
    figure.paste(shown, (side + gap, 0))
    figure = figure.quantize(colors=256, method=Image.Quantize.MEDIANCUT)  # a palette PNG: a few hundred KB
    atomic_write(path, lambda fh: figure.save(fh, format="PNG", optimize=True))
    return figure.size


ROW_TITLES = {"native": "this CPU as it is", "avx2": "limited to AVX2 (`" + " ".join(f"{k}={v}" for k, v in
                                                                                   AVX2_ENV.items()) + "`)"}


def render(record: dict) -> str:
    """docs/default_run.md: the rows as a table, with the machine, the commit and the command."""
    lines = [
        "# The default run",
        "",
        "Generated by `python bench/default_run.py --avx2` (do not edit; run it again to update). Each row is "
        "`python main.py` with the default `configs/config.yaml` into a fresh RESULTS_DIR, synthetic data generated "
        "from scratch: 12 images of 512², 144 training / 48 test tiles of 128², AuxNet-EDC, SoftDICE_BCE. "
        "Whole-image scores: `best.pth` predicted on the 3 test images (sliding window, half-tile overlap).",
        "",
        f"Machine: {record['machine']}. Commit: {record['commit']}.",
        "",
        "| row | wall s | precision | memory format | peak RSS MiB | best epoch | best DSC (tiles) | "
        "whole DSC | whole HD95 px | whole DSC, gated | whole HD95 gated px | gated off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in record["rows"].items():
        def cell(key: str, fmt: str) -> str:
            return format(r[key], fmt) if key in r else "–"
        lines.append(f"| {ROW_TITLES.get(name, name)} | {r['wall_s']:.0f} | {r['precision']} | {r['memory_format']} | "
                     f"{r['peak_rss_mib']} | {r['best_epoch']} (of 0–{r['epochs'] - 1}) | {r['best_dsc']:.4f} | "
                     f"{cell('whole_dsc_ungated', '.4f')} | {cell('whole_hd95_ungated', '.2f')} | "
                     f"{cell('whole_dsc_gated', '.4f')} | {cell('whole_hd95_gated', '.2f')} | "
                     f"{cell('whole_gated_off_fraction_gated', '.0%')} |")
    figure = record.get("figure")
    if figure:
        lines += ["", f"![A demo scene and its prediction](figures/overlay.png)", "",
                  f"`docs/figures/overlay.png`: a {figure['scene_size']}² demo scene (`python -m utils.demo_scene "
                  f"scene.tif --size {figure['scene_size']}`, seed 2024, which the run does not train on), left, and "
                  f"the overlay `python main.py predict` writes with the first row's `best.pth`, right (orange: "
                  f"foreground). Dice of the predicted mask against the scene's truth: {figure['dice']:.4f}; predict "
                  f"took {figure['predict_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--avx2", action="store_true", help="also run with the CPU limited to AVX2")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the files go (default: docs/)")
    args = parser.parse_args(argv)
    record = {"command": "python main.py", "commit": git_commit(), "machine": machine(), "rows": {}}
    with tempfile.TemporaryDirectory(prefix="default_run_") as folder:
        tmp = Path(folder)
        try:
            record["rows"]["native"], run = default_row(tmp, "native", {})
            if args.avx2:
                record["rows"]["avx2"], _ = default_row(tmp, "avx2", dict(AVX2_ENV))
            demo = predict_demo(run, tmp)
        except (RunFailed, subprocess.CalledProcessError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        figure = args.docs / "figures" / "overlay.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        size = compose_figure(demo["scene"], demo["overlay"], figure)
    record["figure"] = {"path": "docs/figures/overlay.png", "scene_size": SCENE_SIZE, "size": list(size),
                        "dice": demo["dice"], "predict_s": demo["predict_s"]}
    atomic_write_json(args.docs / "default_run.json", record)
    atomic_write_text(args.docs / "default_run.md", render(record))
    print(render(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
