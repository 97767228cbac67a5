"""How many times each command opens a checkpoint: ``torch.load`` calls of a tiny train, eval and predict.

    python bench/checkpoint_reads.py [--results-dir DIR]

Runs the three commands in this process (one CPU process, a 1-epoch run on 4 small synthetic
images) with ``torch.load`` wrapped to count its calls, and prints a table. A checkpoint should be
read once per command that reads one (training reads none unless it resumes or starts from
MODEL_WEIGHTS, then reads its end-of-training checkpoint once for the whole-image evaluation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main as cli  # noqa: E402

TINY = ["SYNTHETIC_IMAGES=4", "SYNTHETIC_SIZE=128", "INPUT_SIZE=64", "UNET_DEPTH=3", "CONV_DEPTH=8",
        "BATCH_SIZE=4", "WARMUP_EPOCHS=0", "TEST_SPLIT=0.25", "NUM_WORKERS=0", "TRAIN_EPOCHS=1", "GPUs=[]",
        "PLOT_EVERY=0", "PLOT_TILES=0"]


@contextmanager
def counting_loads(counter: list[str]):
    """Within the block, every ``torch.load`` appends the file it reads to ``counter``."""
    real = torch.load

    def load(f, *args, **kwargs):
        counter.append(str(f))
        return real(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def count(argv: list[str]) -> tuple[int, list[str]]:
    """(exit status, the files ``torch.load`` read) of ``main.py argv``."""
    calls: list[str] = []
    with counting_loads(calls):
        status = cli.main(list(argv))
    return status, calls


def measure(results: Path) -> list[tuple[str, int, int]]:
    """(command, exit status, torch.load calls) for train, eval and predict."""
    rows = []
    status, calls = count([*TINY, f"RESULTS_DIR={results}", "EXP_ID=reads", "RUN_ID=run"])
    rows.append(("train (new run, 1 epoch)", status, len(calls)))
    best = results / "reads" / "run" / "best.pth"
    status, calls = count(["eval", f"MODEL_WEIGHTS={best}", "GPUs=[]"])
    rows.append(("eval", status, len(calls)))
    scene = results / "scene.png"
    from PIL import Image
    import numpy as np

    Image.fromarray((np.random.default_rng(0).random((96, 80)) * 255).astype(np.uint8)).save(scene)
    status, calls = count(["predict", f"MODEL_WEIGHTS={best}", f"INPUT={scene}", f"OUTPUT={results / 'pred'}",
                           "GPUs=[]"])
    rows.append(("predict (one image)", status, len(calls)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.results_dir or Path(tmp))
    print("| command | exit | torch.load calls |\n|---|---|---|")
    for name, status, calls in rows:
        print(f"| {name} | {status} | {calls} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
