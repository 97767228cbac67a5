"""Launching a command: one process per device (DDP), a ``torchrun`` launch, or this process alone.

The main rank picks (and checks) the run folder and tells the others; every rank then resolves
its :class:`~utils.hardware.Runtime` (threads, precision, memory format: once, together) and runs the
command with it. A :class:`~utils.util.RunError` (bad data files, an unusable checkpoint) ends every rank
with exit status 2; Ctrl-C ends them with :class:`Interrupted` (``main.py`` prints one line and exits
with 130). Whatever ends it, a new run that trained nothing leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from configs import Config, ConfigError
from engines.builders import build_runtime
from utils.hardware import Runtime
from utils.run_paths import RunDir
from utils.util import DistContext, RunError, cleanup_distributed, init_distributed, make_writable_folder

#: A command: ``command(cfg, ctx, runtime, run)`` on every rank; returns its exit status (None: 0).
Command = Callable[[Config, DistContext, Runtime, RunDir], Optional[int]]
#: Picks the run folder on the main rank (may raise ConfigError): ``choose(cfg) -> RunDir``.
Chooser = Callable[[Config], RunDir]

#: Exit status of a process ended by Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended the command; the message says what was kept and how to go on (may be empty)."""


def launch_plan(cfg: Config) -> tuple[int, list[torch.device]]:
    """(world size, device of each local rank)."""
    gpus = cfg.GPUs if cfg.GPUs is not None else list(range(torch.cuda.device_count()))
    if gpus:
        return len(gpus), [torch.device("cuda", g) for g in gpus]
    return cfg.CPU_PROCESSES, [torch.device("cpu")] * cfg.CPU_PROCESSES


def launch(cfg: Config, choose: Chooser, command: Command, exclusive: bool = False) -> int:
    """Choose the run folder, run ``command`` on every rank; returns the exit status (0 or 2).

    ``exclusive``: hold the run folder's :class:`RunLock` while the command runs (training).

    Raises:
        Interrupted: Ctrl-C, here or in a spawned process (after the clean-up).
    """
    ctx = join_torchrun(cfg)
    is_main = ctx is None or ctx.is_main
    run_named = bool(cfg.RUN_ID)  # else the same command would start the next run_NNN
    decision: list = [None, None, False]  # run folder, error, created now
    lock = None
    if is_main:
        try:
            run = choose(cfg)
            decision = [str(run.root), None, not run.root.exists()]
            make_run_folder(run.root)
            lock = RunLock(run.root) if exclusive else None
            if ctx is None:
                choose_port(cfg)
        except BaseException as err:
            with _ignoring_interrupts():
                if lock is not None:
                    lock.release()
                if decision[2]:  # leave no empty run (or experiment) folder behind
                    with contextlib.suppress(OSError):
                        run.root.rmdir()
                        run.root.parent.rmdir()
            if not isinstance(err, (ConfigError, RunError)):
                raise
            decision = [None, str(err), False]
    if ctx is not None and ctx.distributed:
        dist.broadcast_object_list(decision, src=0)
    if decision[1] is not None:
        if is_main:
            print(f"error: {decision[1]}", file=sys.stderr)
        cleanup_distributed()
        return 2
    run, new_run = RunDir(Path(decision[0])), decision[2]
    cfg.EXP_ID, cfg.RUN_ID = run.root.parent.name, run.root.name
    try:
        run_everywhere(cfg, run, command, ctx)
    except BaseException as err:
        status = exit_status(err)
        with _ignoring_interrupts():
            kept = is_main and run.has_checkpoints()
            if is_main and new_run and not kept:
                remove_run(run)  # nothing was trained: leave no half-made run behind
            if isinstance(err, RunError) and is_main:
                print(f"error: {err}", file=sys.stderr)
        if status == INTERRUPTED:
            raise Interrupted(interrupted_note(run, exclusive, new_run, kept, run_named) if is_main else "") from None
        if status is None:
            raise
        return status
    finally:
        if lock is not None:
            lock.release()
    return 0


def exit_status(err: BaseException) -> Optional[int]:
    """The exit status a failure of the command ends with: 2 for a :class:`RunError` (in this or a
    spawned process), :data:`INTERRUPTED` for Ctrl-C, None for anything else (a bug: its traceback)."""
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(err, RunError):
        return 2
    if isinstance(err, mp.ProcessExitedException) and err.exit_code in (2, INTERRUPTED):
        return err.exit_code
    return None


def interrupted_note(run: RunDir, exclusive: bool, new_run: bool, kept: bool, run_named: bool) -> str:
    """What an interrupted command kept, and how to go on (the part after "interrupted: ")."""
    if not exclusive:
        return ""
    if kept:
        again = "the same command" + ("" if run_named else f" and RUN_ID={run.root.name}")
        return f"{run.root} keeps its last checkpoint; resume with {again}"
    if new_run:
        return f"nothing was trained, and {run.root} was removed"
    return f"no checkpoint was written in {run.root}"


def remove_run(run: RunDir) -> None:
    """Remove a run folder, and its experiment folder if the run was all it held."""
    shutil.rmtree(run.root, ignore_errors=True)
    with contextlib.suppress(OSError):
        run.root.parent.rmdir()


@contextlib.contextmanager
def _ignoring_interrupts():
    """Ignore a second Ctrl-C while the clean-up after the first (or after an error) runs, so that
    it finishes; only the main thread can set a signal handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def make_run_folder(root: Path) -> None:
    """Create the run folder; a folder that cannot be written is a RunError naming it."""
    make_writable_folder(root, "the run folder", "set RESULTS_DIR to a folder you can write")


#: ``flock`` failures that mean the file system has no locks (Lustre without -o flock, some FUSE)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """``.lock`` in a run folder, locked (``flock``) by the process that trains in it for as long as it
    lives, and holding its pid for messages; removed on release.

    The operating system drops the lock when its process ends, however it ends: a lock left behind
    by a killed run is free, and taking it over is one atomic step, so two restarts that find the same
    stale lock cannot both win. On a file system without file locks the pid alone decides (with a
    note): a lock whose process is gone is taken over, but two restarts at the same moment are not told apart.

    Raises:
        RunError: another live process holds the folder.
    """

    def __init__(self, root: Path):
        self.root, self.path, self.fd, self.pid = Path(root), RunDir(Path(root)).lock, None, os.getpid()
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in _NO_LOCKS:
                    print(f"note: the file system of {self.root} has no file locks ({err.strerror}): the run lock "
                          "relies on the pid in it", file=sys.stderr)
                    self._lock_by_pid()
                    return
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise RunError(f"cannot lock {self.path} ({err.strerror}): set RESULTS_DIR to a folder you "
                                   "can write") from None
                raise self._busy(_lock_holder(self.path)) from None
            if _same_file(fd, self.path):
                self.fd = fd
            else:  # the holder released (removed) the file as it was locked: lock the one there now
                os.close(fd)
        previous = _lock_holder(self.path)
        if previous is not None and previous != self.pid:
            print(f"taking over the lock {self.path} of pid {previous}, which has ended", file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{self.pid}\n".encode(), 0)

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first, while still locked: a process
        waiting on this file then finds it gone and locks a new one)."""
        if self.fd is None:
            if _lock_holder(self.path) == self.pid:  # locked by pid only
                self.path.unlink(missing_ok=True)
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def _busy(self, holder: Optional[int]) -> RunError:
        return RunError(f"{self.root} is in use by another run (pid {holder}, see {self.path}): wait for it, "
                        "or choose another RUN_ID")

    def _lock_by_pid(self) -> None:
        """The lock without ``flock``: the file made exclusively, a lock of a dead pid taken over."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(self.path)
                if holder is not None and _alive(holder):
                    raise self._busy(holder) from None
                print(f"taking over the lock {self.path} of pid {holder}, which has ended", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{self.pid}\n")
            return
        raise RunError(f"cannot lock {self.root}: {self.path} keeps reappearing; is another run starting there?")


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path``."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _lock_holder(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def choose_port(cfg: Config) -> None:
    """MASTER_PORT for a multi-process launch: a free port when none was set (config or environment),
    else the one set, checked free.

    Raises:
        RunError: the MASTER_PORT set is in use.
    """
    if launch_plan(cfg)[0] < 2:
        return
    if cfg.MASTER_PORT is None and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind((cfg.MASTER_ADDR if cfg.MASTER_ADDR != "localhost" else "127.0.0.1", 0))
            cfg.MASTER_PORT = s.getsockname()[1]
        return
    port = int(cfg.MASTER_PORT if cfg.MASTER_PORT is not None else os.environ["MASTER_PORT"])
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            raise RunError(f"MASTER_PORT={port} is in use (another training run?): set another MASTER_PORT, "
                           "or leave it unset (null) to pick a free one") from None


def main_first(ctx: DistContext, make):
    """Run ``make()`` on the main rank first (it may write the split or the data cache), then on the
    others. A :class:`RunError` on the main rank is raised on every rank, so that all stop together."""
    if not ctx.distributed:
        return make()
    result, error = None, None
    if ctx.is_main:
        try:
            result = make()
        except RunError as err:
            error = err
    message = [str(error) if error is not None else None]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise error if ctx.is_main else RunError(message[0])
    return result if ctx.is_main else make()


def join_torchrun(cfg: Config) -> Optional[DistContext]:
    """Join the process group of a ``torchrun`` launch (before the run folder is chosen); None when
    this process was not started by ``torchrun``."""
    if not under_torchrun():
        return None
    _, devices = launch_plan(cfg)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = devices[local % len(devices)] if devices[0].type == "cuda" else torch.device("cpu")
    return init_distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local, device)


def under_torchrun() -> bool:
    """Whether ``torchrun`` (``torch.distributed.run``) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def processes(cfg: Config) -> int:
    """How many processes run a command: ``torchrun``'s world size, else one per device (:func:`launch_plan`)."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else launch_plan(cfg)[0]


def run_everywhere(cfg: Config, run: RunDir, command: Command, ctx: Optional[DistContext]) -> int:
    """Run ``command`` in this process, in ``torchrun``'s (``ctx``), or in one spawned process per device.

    Returns:
        The command's exit status (0 when it returns None); a spawned process that ends with another
        status raises ``torch.multiprocessing.ProcessExitedException`` (see :func:`exit_status`).
    """
    if ctx is not None:
        return _run(ctx, cfg, run, command)
    os.environ.setdefault("MASTER_ADDR", cfg.MASTER_ADDR)
    if cfg.MASTER_PORT is not None:
        os.environ.setdefault("MASTER_PORT", str(cfg.MASTER_PORT))
    if cfg.NCCL_P2P_DISABLE:
        os.environ["NCCL_P2P_DISABLE"] = "1"
    world, devices = launch_plan(cfg)
    if world > 1:
        workers = mp.spawn(_spawned, args=(world, devices, cfg, run, command), nprocs=world, join=False)
        try:
            while not workers.join():
                pass
        except KeyboardInterrupt:
            _stop_workers(workers.processes)
            raise
        return 0
    return _run(init_distributed(0, 1, 0, devices[0]), cfg, run, command)


def _stop_workers(processes, grace_s: float = 5.0, wait_s: float = 60.0) -> None:
    """After Ctrl-C: give the spawned processes ``grace_s`` to end on their own (a terminal's Ctrl-C
    reaches them too), pass it on to those still running (only this process was signalled), and wait
    up to ``wait_s`` for their clean-up before terminating them."""
    with _ignoring_interrupts():
        for p in processes:
            p.join(grace_s)
        for p in processes:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)
        for p in processes:
            p.join(wait_s)
            if p.is_alive():
                p.terminate()
                p.join()


def _spawned(local_rank: int, world: int, devices, cfg: Config, run: RunDir, command: Command) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored while the process started (main.py)
    try:
        status = _run(init_distributed(local_rank, world, local_rank, devices[local_rank]), cfg, run, command)
    except RunError as err:
        if local_rank == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)  # quietly: the launching process reports it, once
    if status:
        sys.exit(status)  # the launching process reads it from the exit code


def _run(ctx: DistContext, cfg: Config, run: RunDir, command: Command) -> int:
    """Resolve this rank's runtime (with the other ranks: a collective call) and run ``command`` with it;
    returns its exit status."""
    try:
        return command(cfg, ctx, build_runtime(cfg, ctx), run) or 0
    finally:
        cleanup_distributed()
