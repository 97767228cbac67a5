"""bench/gpu_check.sh and bench/gpu_check.py: a clear failure without a GPU, and every check working
(small, on the CPU) before a GPU ever runs them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

# PYTHON: the shell script's interpreter is this one (on PATH may be another, without torch)
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "PYTHON": sys.executable}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


@no_gpu
@pytest.mark.parametrize("command", [["bash", "bench/gpu_check.sh"], [sys.executable, "bench/gpu_check.py"]])
def test_without_a_gpu_the_check_fails_clearly_and_checks_nothing(command):
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert "no CUDA device is available" in done.stderr and "nothing was checked" in done.stderr
    assert "== CUDA-marked tests" not in done.stdout and "| check |" not in done.stdout


def test_every_check_runs_small_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--smoke",
                           "--workdir", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    table = done.stdout[done.stdout.index("| check |"):].splitlines()[2:]
    checks = [row.split(" | ")[0].lstrip("| ") for row in table]
    assert len(checks) == 10 and all(row.endswith(("| yes |", "| skipped |")) for row in table), "\n".join(table)
    assert [c.split(",")[0].split(" ")[0] for c in checks] == ["exact", "ASD/AD/HD95/D95", "default", "python",
                                                               "1-process", "predict", "predict", "predict",
                                                               "predict", "predict"]
    assert checks[7] == "predict 256² scene, gated / plain" and "steps/s" in table[2]
    assert "over gloo" in checks[4]
    assert checks[8:] == ["predict 512² GeoTIFF, gated", "predict 512² lossless JPEG 2000, gated"]
    have_rasterio = importlib.util.find_spec("rasterio") is not None
    assert all(row.endswith("| yes |" if have_rasterio else "| skipped |") for row in table[8:]), "\n".join(table)
