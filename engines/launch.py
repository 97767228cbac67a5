"""Launching a command: one process per device (DDP), a ``torchrun`` launch, or this process alone.

The main rank picks (and checks) the run folder and tells the others; every rank then runs the
command. A :class:`~utils.util.RunError` (bad data files, an unusable checkpoint) ends every rank
with exit status 2, and a new run that trained nothing leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from configs import Config, ConfigError
from engines.run_dir import RunDir
from utils.util import DistContext, RunError, cleanup_distributed, init_distributed, make_writable_folder

#: A command: ``command(cfg, ctx, run)`` on every rank.
Command = Callable[[Config, DistContext, RunDir], None]
#: Picks the run folder on the main rank (may raise ConfigError): ``choose(cfg) -> RunDir``.
Chooser = Callable[[Config], RunDir]


def launch_plan(cfg: Config) -> tuple[int, list[torch.device]]:
    """(world size, device of each local rank)."""
    gpus = cfg.GPUs if cfg.GPUs is not None else list(range(torch.cuda.device_count()))
    if gpus:
        return len(gpus), [torch.device("cuda", g) for g in gpus]
    return cfg.CPU_PROCESSES, [torch.device("cpu")] * cfg.CPU_PROCESSES


def launch(cfg: Config, choose: Chooser, command: Command, exclusive: bool = False) -> int:
    """Choose the run folder, run ``command`` on every rank; returns the exit status (0 or 2).

    ``exclusive``: hold the run folder's :class:`RunLock` while the command runs (training)."""
    ctx = _join_torchrun(cfg) if "WORLD_SIZE" in os.environ and "RANK" in os.environ else None
    is_main = ctx is None or ctx.is_main
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
        except (ConfigError, RunError) as err:
            created = decision[2]
            decision = [None, str(err), False]
            if lock is not None:
                lock.release()
            if created:  # leave no empty run (or experiment) folder behind
                with contextlib.suppress(OSError):
                    run.root.rmdir()
                    run.root.parent.rmdir()
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
        _run_everywhere(cfg, run, command, ctx)
    except (RunError, mp.ProcessExitedException) as err:
        if isinstance(err, mp.ProcessExitedException) and err.exit_code != 2:
            raise
        if isinstance(err, RunError) and is_main:
            print(f"error: {err}", file=sys.stderr)
        if is_main and new_run and not run.has_checkpoints():
            shutil.rmtree(run.root, ignore_errors=True)  # nothing was trained: leave no empty run behind
            with contextlib.suppress(OSError):
                run.root.parent.rmdir()  # the experiment folder too, if this run was all it held
        return 2
    finally:
        if lock is not None:
            lock.release()
    return 0


def make_run_folder(root: Path) -> None:
    """Create the run folder; a folder that cannot be written is a RunError naming it."""
    make_writable_folder(root, "the run folder", "set RESULTS_DIR to a folder you can write")


class RunLock:
    """``.lock`` in a run folder, holding the pid of the process that trains in it; made atomically,
    removed on exit. A lock whose process is gone (killed) is stale and taken over.

    Raises:
        RunError: another live process holds the folder.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / ".lock"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(self.path)
                if holder is not None and _alive(holder):
                    raise RunError(f"{root} is in use by another run (pid {holder}, see {self.path}): wait for it, "
                                   "or choose another RUN_ID") from None
                print(f"removing the stale lock {self.path} (pid {holder} is gone)", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            self.pid = os.getpid()
            return
        raise RunError(f"cannot lock {root}: {self.path} keeps reappearing; is another run starting there?")

    def release(self) -> None:
        if _lock_holder(self.path) == self.pid:
            self.path.unlink(missing_ok=True)


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


def _join_torchrun(cfg: Config) -> DistContext:
    """Join the process group of a ``torchrun`` launch (before the run folder is chosen)."""
    _, devices = launch_plan(cfg)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = devices[local % len(devices)] if devices[0].type == "cuda" else torch.device("cpu")
    return init_distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local, device)


def _run_everywhere(cfg: Config, run: RunDir, command: Command, ctx: Optional[DistContext]) -> None:
    """Run ``command`` in this process, in ``torchrun``'s (``ctx``), or in one spawned process per device."""
    if ctx is not None:
        _run(ctx, cfg, run, command)
        return
    os.environ.setdefault("MASTER_ADDR", cfg.MASTER_ADDR)
    if cfg.MASTER_PORT is not None:
        os.environ.setdefault("MASTER_PORT", str(cfg.MASTER_PORT))
    if cfg.NCCL_P2P_DISABLE:
        os.environ["NCCL_P2P_DISABLE"] = "1"
    world, devices = launch_plan(cfg)
    if world > 1:
        mp.spawn(_spawned, args=(world, devices, cfg, run, command), nprocs=world, join=True)
    else:
        _run(init_distributed(0, 1, 0, devices[0]), cfg, run, command)


def _spawned(local_rank: int, world: int, devices, cfg: Config, run: RunDir, command: Command) -> None:
    try:
        _run(init_distributed(local_rank, world, local_rank, devices[local_rank]), cfg, run, command)
    except RunError as err:
        if local_rank == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _run(ctx: DistContext, cfg: Config, run: RunDir, command: Command) -> None:
    try:
        command(cfg, ctx, run)
    finally:
        cleanup_distributed()
