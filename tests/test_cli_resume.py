"""Exact resume through the command line: a run killed with SIGKILL (kill -9) after its first
checkpoint, in the middle of the next epoch, and resumed, ends with weights bit-identical to an
uninterrupted run's (on the CPU: augmentation, dropout and shuffling included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from conftest import CLI_ENV, ROOT, TINY, cli_command, run_cli

#: Dropout on, so that the random streams of the network matter too.
ARGS = [*TINY, "TRAIN_EPOCHS=2", "SEG_DROPOUT=0.2", "EXP_ID=exact"]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pth", weights_only=True)["model"]


def test_a_run_killed_mid_epoch_and_resumed_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    run_cli(*ARGS, f"RESULTS_DIR={tmp_path / 'straight'}", "RUN_ID=r")
    straight = tmp_path / "straight" / "exact" / "r"

    killed = tmp_path / "killed" / "exact" / "r"
    proc = subprocess.Popen(cli_command(*ARGS, f"RESULTS_DIR={tmp_path / 'killed'}", "RUN_ID=r"),
                            cwd=ROOT, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "last.pth").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # kill -9: in epoch 1, after epoch 0's checkpoint
    proc.wait()
    assert torch.load(killed / "last.pth", weights_only=True)["epoch"] < 1
    assert (killed / ".lock").is_file()  # left behind by the kill: stale, taken over below

    resumed = run_cli(*ARGS, f"RESULTS_DIR={tmp_path / 'killed'}", "RUN_ID=r")
    assert "resuming" in resumed.stdout and "taking over the lock" in resumed.stderr
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    epochs = [json.loads(line)["epoch"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]
    assert not list(killed.glob(".*.tmp")) and not (killed / ".lock").exists()
