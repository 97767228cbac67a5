"""``predict`` over several processes (engines/predict_ddp.py): the files are shared among the ranks
(largest first, balanced), each image is predicted and written once, and the outputs and the one
``predictions.jsonl`` are those of one process, byte for byte, on a spawned launch (CPU_PROCESSES=2)
and on a ``torchrun`` launch, both on gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CLI_ENV, ROOT, cli_command, nan_checkpoint, predict_config, torch_threads
from engines.predict import predict
from engines.predict_ddp import predict_on_ranks, share_files

# ---- the sharing rule


def test_files_are_shared_largest_first_to_the_least_loaded_rank():
    # 50 -> r0; 40 -> r1; 30 -> r1 (40 < 50); 20 -> r0 (50 < 70); 10 -> r0 (70 = 70, 2 = 2 files: lowest rank)
    assert share_files([10, 50, 30, 20, 40], 2) == [[0, 1, 3], [2, 4]]
    assert share_files([7, 7, 7, 7, 7], 3) == [[0, 3], [1, 4], [2]]  # ties: fewest files, then input order
    assert share_files([0, 0, 0, 0], 2) == [[0, 2], [1, 3]]  # unreadable (0 bytes) files are spread too
    assert share_files([100, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    assert share_files([5], 3) == [[0], [], []]


# ---- two processes predict what one process predicts

#: Timing fields of a record: they differ from run to run.
TIMING = ("seconds", "tiles_per_s")
#: One image per size (pixels and bytes differ, so the sharing is not input order), and a file that is no image.
SIZES = {"a.png": (64, 64), "b.png": (96, 80), "c.tif": (48, 120), "d.png": (130, 70)}


@pytest.fixture(scope="module")
def one_process(checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(the INPUT folder, what one process predicts of it, on one thread)."""
    import tifffile

    folder = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(3)
    for name, shape in SIZES.items():
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        tifffile.imwrite(folder / name, pixels) if name.endswith(".tif") else Image.fromarray(pixels).save(folder / name)
    (folder / "bad.png").write_bytes(b"not an image")
    out = folder.parent / "one"
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the runtime's threads: as each rank below, so the sums are the same
    try:
        with torch_threads(1):
            status = predict(predict_config(checkpoint, f"INPUT={folder}", f"OUTPUT={out}", "GATING=false",
                                            "MIXED_PRECISION=none"))
    finally:
        os.environ.pop("OMP_NUM_THREADS") if threads is None else os.environ.__setitem__("OMP_NUM_THREADS", threads)
    assert status == 2
    return folder, out


def _records(out: Path) -> list[dict]:
    """The records of ``out``'s predictions.jsonl without timings, their paths relative to ``out``."""
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        for key in TIMING:
            row.pop(key)
        for key in ("mask", "overlay"):
            row[key] = Path(row[key]).relative_to(out).as_posix()
    return rows


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file in ``out`` but predictions.jsonl (see :func:`_records`), by name."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "predictions.jsonl"}


@pytest.mark.parametrize("launcher", [
    [],  # spawned by main.py: CPU_PROCESSES=2
    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
], ids=["spawned", "torchrun"])
def test_two_processes_write_what_one_process_writes(checkpoint, one_process, tmp_path, launcher):
    folder, reference = one_process
    out = tmp_path / "two"
    args = cli_command("predict", f"MODEL_WEIGHTS={checkpoint}", f"INPUT={folder}", f"OUTPUT={out}", "GATING=false",
                       "MIXED_PRECISION=none", "CPU_PROCESSES=2")
    command = args if not launcher else [*launcher, *args[1:]]  # torchrun runs main.py itself
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**CLI_ENV, "OMP_NUM_THREADS": "1"})
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0, said  # before: every rank predicted every file (exit 0 with 8 records)
    if not launcher:
        assert proc.returncode == 2, said  # torchrun reports a rank's status 2 as its own failure (exit 1)
    # bytes: d 130x70 > b 96x80 > c (TIFF) 48x120 > a 64x64 > bad.png
    assert "sharing 5 image(s) among 2 processes, largest first: rank 0 3, rank 1 2" in proc.stdout, said
    assert f"predicted 4 of 5 image(s) into {out}" in proc.stdout, said  # once, by rank 0
    assert proc.stdout.count("predicted 4 of 5") == 1
    assert "error: 1 image(s) failed:" in proc.stdout and "bad.png" in proc.stdout
    for name in SIZES:  # each image predicted once, by one rank (a second write would fail: no replacing)
        assert sum(line.startswith(f"{name}: ") for line in proc.stdout.splitlines()) == 1, said
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())  # no other file
    assert _outputs(out) == _outputs(reference)  # masks and overlays, byte for byte
    assert _records(out) == _records(reference)  # one record per image, in input order
    assert [Path(r["image"]).name for r in _records(out)] == list(SIZES)


def test_a_checkpoint_with_nan_weights_is_refused_before_the_processes_start(checkpoint, tmp_path, capsys):
    bad = tmp_path / "nan.pth"
    key = nan_checkpoint(checkpoint, bad)
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "a.png")
    read = predict_config(bad, f"INPUT={folder}", f"OUTPUT={out}", "GATING=false", "CPU_PROCESSES=2")
    assert predict_on_ranks(read) == 2
    said = capsys.readouterr().out
    assert f"error: MODEL_WEIGHTS={bad}: the network's weight {key} holds NaN or infinite values; it cannot predict" in said
    assert "sharing" not in said and not out.exists()
