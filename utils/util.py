"""Small shared helpers: argument checks with a "did you mean", atomic file writes, seeding, run
folders, process-group set-up."""

from __future__ import annotations

import errno
import json
import os
import random
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from utils.choices import check_choice, did_you_mean  # noqa: F401  (re-exported for their callers)


class RunError(RuntimeError):
    """A problem with what a run reads (data files, split, checkpoint), found after the config was
    validated. ``main.py`` prints it without a traceback and exits with status 2."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class WriteError(RunError):
    """A file of a run cannot be written: a full disk, a read-only or vanished folder, no permission."""


#: The fix for each reason a run's file cannot be written (by errno; anything else: the default).
_WRITE_FIXES = {
    errno.ENOSPC: "free space on that disk, or set RESULTS_DIR to a disk with room",
    errno.EDQUOT: "free space within your disk quota, or set RESULTS_DIR to a disk with room",
}
_WRITE_FIX = "make the folder writable, or set RESULTS_DIR to a writable disk"


@contextmanager
def writing(path: Path):
    """Run the body (which writes ``path``, or files in the folder ``path``); an OSError it raises
    becomes one :class:`WriteError` naming ``path`` (not the temporary file beside it that failed),
    the system's reason and the fix. So does the RuntimeError that ``torch.save`` raises when a
    write into its file object fails (its context is the OSError).

    Raises:
        WriteError: the write failed for a reason of the file system.
    """
    try:
        yield
    except RunError:
        raise
    except (OSError, RuntimeError) as err:
        cause = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, OSError)), None)
        if cause is None:
            raise
        name = errno.errorcode.get(cause.errno, "")
        reason = f"{cause.strerror or cause}{f' ({name})' if name else ''}"
        raise WriteError(f"cannot write {path}: {reason}; "
                         f"{_WRITE_FIXES.get(cause.errno, _WRITE_FIX)}") from err


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def make_writable_folder(folder: Path, what: str, fix: str) -> Optional[Path]:
    """Create ``folder`` (and its missing parents) and check that a file can be made in it.

    Args:
        folder: the folder to create (it may exist).
        what: how the error names it, e.g. "the run folder".
        fix: what the user should do, appended to the error.

    Returns:
        The topmost folder this call created (so a caller that ends up writing nothing can remove
        what it made), or None when ``folder`` already existed.

    Raises:
        RunError: the folder cannot be created or written (read-only file system, permissions, a
            file in the way), naming it, the system's reason and ``fix``.
    """
    folder = Path(folder)
    created = None
    for parent in [folder, *folder.parents]:
        if parent.exists() or parent == parent.parent:
            break
        created = parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise RunError(f"cannot write {what} {folder} ({err.strerror or err}): {fix}") from None
    return created


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(
    rank: int, world_size: int, local_rank: int, device: torch.device, timeout_s: float = 1800
) -> DistContext:
    """Join the process group (NCCL on CUDA, gloo on CPU) when ``world_size > 1``.

    MASTER_ADDR / MASTER_PORT must already be in the environment. Each CPU process gets
    :func:`cpu_threads` threads, so processes do not oversubscribe the cores (the local count:
    ``LOCAL_WORLD_SIZE`` under torchrun, else every process is local).
    """
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(local_processes(world_size)))
    return DistContext(rank, world_size, local_rank, device)


def local_processes(world_size: Optional[int] = None) -> int:
    """Training processes on this machine: ``LOCAL_WORLD_SIZE`` under torchrun, else ``world_size``
    (every process local), else the initialised process group's size, else 1."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    if local.isdigit() and int(local) > 0:
        return int(local)
    if world_size is not None:
        return world_size
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def cpu_threads(local_processes: int) -> int:
    """Threads for each of ``local_processes`` CPU processes: ``OMP_NUM_THREADS`` when the user set
    it (torchrun sets 1 for several processes), else the cores this process may run on (its CPU
    affinity, as ``taskset`` or a container limits it, not the machine's count) shared out evenly."""
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(local_processes, 1))


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
