"""Issue 22: unreadable checkpoints say what the file is, never torch's advice to load it unsafely."""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.checkpoint import CheckpointError, read_checkpoint, restore_training
from engines.evaluate import checkpoint_test_ids
from engines.run_dir import RunDir
from test_cli import TINY, run_cli
from utils.util import RunError

#: The CLI's tiny run on the CPU in fp32 (an epoch in well under a second on one free core).
CLI = [*TINY, "GPUs=[]", "MIXED_PRECISION=none"]
WEIGHTS_FIX = "point MODEL_WEIGHTS at a best.pth or last.pth that AuxNet saved"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-epoch run made by the command line (its folder)."""
    results = tmp_path_factory.mktemp("results")
    run_cli(*CLI, "TRAIN_EPOCHS=1", f"RESULTS_DIR={results}", "EXP_ID=t")
    return results / "t" / "run_001"


def copy_run(run: Path, to: Path) -> Path:
    """A copy of the run folder ``run`` at ``to``/t/run_001 (so a test may change it)."""
    copy = to / "t" / "run_001"
    shutil.copytree(run, copy)
    return copy


# ----------------------------------------------------------------------------- messages that say what is true


def test_a_damaged_last_pth_of_the_run_itself_says_so_and_how_to_go_on(trained, tmp_path):
    run = RunDir(copy_run(trained, tmp_path))
    data = run.last.read_bytes()
    run.last.write_bytes(data[: len(data) // 3])
    resume = dict(net=None, loss=None, optimizer=None, scheduler=None, scaler=None, device="cpu")
    what = f"{run.last} cannot be read as a checkpoint: it is a truncated PyTorch checkpoint"
    fix = f"this run's own last checkpoint is damaged: remove {run.last} to train the run again from epoch 0"
    with pytest.raises(CheckpointError) as err:  # before: "point it at a .pth saved by AuxNet"
        restore_training(run.last, **resume)
    assert str(err.value).startswith(what) and str(err.value).endswith(
        f"; {fix}, or copy {run.best} over it to resume after the best epoch (0)")
    run.best.write_text("also damaged")
    with pytest.raises(CheckpointError) as err:
        restore_training(run.last, **resume)
    assert str(err.value).endswith(f"; {fix}") and "MODEL_WEIGHTS" not in str(err.value)


def test_eval_of_bare_weights_says_they_hold_no_configuration_or_split(trained, tmp_path):
    bare = tmp_path / "weights.pth"
    torch.save(read_checkpoint(trained / "best.pth")["model"], bare)
    # before: "holds no train/test split (it predates storing one)"
    with pytest.raises(RunError, match=rf"^{bare} holds only network weights \(no configuration and no train/test "
                                       r"split\), so its test images are unknown: evaluate the best.pth or last.pth "
                                       "that AuxNet saved in the run folder, or copy that run's tts.json next to it"):
        checkpoint_test_ids(bare)


def _numpy_checkpoint(path: Path) -> None:
    torch.save({"model": {"w": torch.ones(1)}, "mean": np.zeros(3)}, path)


#: numpy's array rebuilder, as pickles name it (numpy.core or numpy._core, by version)
_RECONSTRUCT = f"{np.zeros(1).__reduce__()[0].__module__}.{np.zeros(1).__reduce__()[0].__name__}"


def _plain_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))


def _zip_archive(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not weights")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, for the protocol-4 pickle
@pytest.mark.parametrize("make, what", [
    (_numpy_checkpoint, f"holds a {_RECONSTRUCT} object besides tensors and plain values "
                        "(objects other than those can run code as they load, so they are never loaded): save the "
                        "network's state_dict alone"),
    (_plain_pickle, "is a Python pickle, not a PyTorch checkpoint (UnpicklingError: Unsupported operand 149)"),
    (_zip_archive, "is a zip archive of 1 file(s) (notes.txt), not a PyTorch checkpoint"),
    (lambda p: p.write_bytes(b""), "is empty (0 bytes): a copy or a save that did not finish"),
    (lambda p: p.write_bytes(bytes(range(64))), "is not a PyTorch checkpoint (it starts with the bytes 00 01 02 03 "
                                                "04 05 06 07)"),
])
def test_an_unreadable_checkpoint_says_what_the_file_is_and_never_to_load_it_unsafely(tmp_path, make, what):
    path = tmp_path / "model.pth"
    make(path)
    with pytest.raises(CheckpointError) as err:  # before: torch's text, with "weights_only=False" advice
        read_checkpoint(path)
    assert str(err.value) == f"{path} cannot be read as a checkpoint: it {what}; {WEIGHTS_FIX}"
    assert "weights_only" not in str(err.value)
