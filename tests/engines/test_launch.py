"""engines/launch.py: what ends a command leaves nothing half-made and says one true line. An
unreadable MODEL_WEIGHTS is refused before a run folder exists; any failure of a new run that trained
nothing removes it; Ctrl-C exits with 130 and how to go on; the run lock refuses a live holder, takes
over a stale one (also without file locks) and two restarts racing for one stale lock never both win;
unreadable checkpoints say what the file is, never torch's advice to load it unsafely."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs import load_config
from conftest import ROOT, TINY, run_cli, tiny_config, torch_threads
from engines.checkpoint import CheckpointError, read_checkpoint, restore_training
from engines.evaluate import checkpoint_test_ids
from engines.inference import load_for_inference
from engines.launch import Interrupted, RunLock, launch
from utils.run_paths import RunDir
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


def leftovers(folder: Path) -> list[str]:
    """Lock and temporary files under ``folder``."""
    return sorted(p.name for p in folder.rglob(".*") if p.name == ".lock" or p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- item 12: MODEL_WEIGHTS is read first


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_an_unreadable_model_weights_is_one_line_and_no_run_folder(trained, tmp_path, kind):
    if kind == "text":  # before: KeyError: 101 from torch's reader, exit 1, run_001/tts.json left behind
        weights = tmp_path / "weights.pth"
        weights.write_text("hello, these are my notes\n")
        what = "is a text file (it starts with 'hello, these are my notes'), not a PyTorch checkpoint"
    else:
        data = (trained / "best.pth").read_bytes()
        weights = tmp_path / "best.pth"
        weights.write_bytes(data[: len(data) // 2])
        what = (f"is a truncated PyTorch checkpoint ({len(data) // 2} bytes, its end is missing: a copy or a save "
                "that did not finish)")
    proc = run_cli(*CLI, "TRAIN_EPOCHS=1", f"RESULTS_DIR={tmp_path / 'out'}", f"MODEL_WEIGHTS={weights}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: {weights} cannot be read as a checkpoint: it {what}; {WEIGHTS_FIX}"]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- launch: any failure, Ctrl-C


def _launch(tmp_path, command, *overrides):
    """``launch`` of ``command`` in this process (one CPU process) for a new run under ``tmp_path``."""
    cfg = tiny_config(tmp_path / "out", "GPUs=[]", *overrides)
    with torch_threads(1):
        return launch(cfg, lambda c: RunDir(tmp_path / "out" / "x" / (c.RUN_ID or "run_001")), command,
                      exclusive=True)


def test_a_new_run_that_trained_nothing_is_removed_whatever_ends_it(tmp_path):
    def broken(cfg, ctx, runtime, run):
        run.split.write_text("{}")  # some files are written, then a bug (not a RunError) strikes
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):  # before: run_001/tts.json stayed
        _launch(tmp_path, broken)
    assert not (tmp_path / "out" / "x").exists()

    def interrupted(cfg, ctx, runtime, run):
        run.split.write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=rf"^nothing was trained, and {tmp_path / 'out' / 'x' / 'run_001'} was "
                                          "removed$"):
        _launch(tmp_path, interrupted)
    assert not (tmp_path / "out" / "x").exists()


def test_an_interrupted_run_with_a_checkpoint_says_how_to_resume_and_releases_its_lock(tmp_path):
    def one_epoch_then_ctrl_c(cfg, ctx, runtime, run):
        run.last.write_bytes(b"a checkpoint")
        raise KeyboardInterrupt

    run = tmp_path / "out" / "x" / "run_001"
    # no RUN_ID given: the same command alone would start run_002
    with pytest.raises(Interrupted, match=rf"^{run} keeps its last checkpoint; resume with the same command and "
                                          "RUN_ID=run_001$"):
        _launch(tmp_path, one_epoch_then_ctrl_c)
    assert (run / "last.pth").is_file() and leftovers(run) == []
    with pytest.raises(Interrupted, match=rf"^{run} keeps its last checkpoint; resume with the same command$"):
        _launch(tmp_path, one_epoch_then_ctrl_c, "RUN_ID=run_001")


def _interrupt(args: list[str], wait_for: str) -> subprocess.CompletedProcess:
    """Run main.py with ``args``, send it SIGINT (Ctrl-C) once a stdout line holds ``wait_for``."""
    # As from a terminal: a shell's background job (nohup, `&` in a script, some CI runners) starts its
    # children with SIGINT ignored, and Python then never turns it into KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
                                 "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if wait_for in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + out, err)


def test_ctrl_c_during_training_is_one_line_exit_130_and_leaves_no_lock_or_temporary_file(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    proc = _interrupt([*CLI, "TRAIN_EPOCHS=100000", f"RESULTS_DIR={tmp_path}", "EXP_ID=t", "RUN_ID=run_001"],
                      wait_for="resuming")
    assert proc.returncode == 130, proc.stderr  # before: a KeyboardInterrupt traceback, exit 1
    assert "Traceback" not in proc.stderr
    last_line = [line for line in proc.stderr.splitlines() if line.strip()][-1]  # after the progress bars
    assert last_line == f"interrupted: {run} keeps its last checkpoint; resume with the same command"
    assert leftovers(run) == []
    assert read_checkpoint(run / "last.pth")["epoch"] >= 0


def test_ctrl_c_during_predict_is_one_line_exit_130_and_leaves_no_temporary_file(trained, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for n in range(40):  # enough that the Ctrl-C sent after the first image lands before the last one
        Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(tmp_path / "in" / f"{n:02d}.png")
    proc = _interrupt(["predict", "GPUs=[]", f"MODEL_WEIGHTS={trained / 'best'}", f"INPUT={tmp_path / 'in'}",
                       f"OUTPUT={tmp_path / 'out'}"], wait_for="00.png")
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()][-1] == "interrupted"
    assert leftovers(tmp_path / "out") == []


# ----------------------------------------------------------------------------- the run lock


def _take_lock(root: Path, start, done, won) -> None:
    start.wait()
    try:
        lock = RunLock(root)
    except RunError:
        won.put(False)
        done.wait()
        return
    won.put(True)
    done.wait()  # hold it until the other process has tried
    lock.release()


def test_two_restarts_racing_for_one_stale_lock_never_both_win(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mp = multiprocessing.get_context("fork")
    for attempt in range(40):
        root = tmp_path / str(attempt)
        root.mkdir()
        (root / ".lock").write_text(f"{dead.pid}\n")  # left by a run that was killed
        start, done, won = mp.Barrier(2), mp.Barrier(2), mp.Queue()
        racers = [mp.Process(target=_take_lock, args=(root, start, done, won)) for _ in range(2)]
        for p in racers:
            p.start()
        results = sorted(won.get(timeout=60) for _ in racers)
        for p in racers:
            p.join(60)
        assert results == [False, True], f"attempt {attempt}: {results}"  # before: both won, now and then
        assert not (root / ".lock").exists()


def test_the_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, capsys):
    lock = RunLock(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(RunError, match=rf"in use by another run \(pid {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid}\n")
    RunLock(tmp_path).release()  # stale: taken over
    assert not (tmp_path / ".lock").exists()
    assert f"taking over the lock {tmp_path / '.lock'} of pid {dead.pid}, which has ended" in capsys.readouterr().err
    # a lock left by a killed run whose pid now belongs to another process (reused) is stale too:
    # staleness is whether the file is locked, not whether its pid is alive (before: refused)
    (tmp_path / ".lock").write_text(f"{os.getppid()}\n")
    RunLock(tmp_path).release()
    assert not (tmp_path / ".lock").exists()


def test_the_run_lock_without_file_locks_relies_on_the_pid_and_says_so(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # a file system without flock (Lustre without -o flock)
    lock = RunLock(tmp_path)
    assert "has no file locks (No locks available): the run lock relies on the pid in it" in capsys.readouterr().err
    with pytest.raises(RunError, match=rf"in use by another run \(pid {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()
    assert not (tmp_path / ".lock").exists()


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
        args = [*CLI, f"MODEL_WEIGHTS={bare}"]  # bare weights: the command line describes the network
        checkpoint_test_ids(load_for_inference(load_config(None, args), args))


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
