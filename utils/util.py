"""Small shared helpers: atomic file writes and their
errors, seeding, process-group set-up."""

from __future__ import annotations

import errno
import json
import os
import random
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist



class RunError(RuntimeError):
    """A problem with what a run reads (data files, split, checkpoint), found after the config was
    validated. ``main.py`` prints it without a traceback and exits with status 2."""


_UMASK = os.umask(0)
os.umask(_UMASK)


class AtomicFile:
    """A hidden temporary file beside ``path`` (``.<name>.<random>.tmp``) that becomes ``path`` on
    :meth:`commit` (flushed, fsynced, then renamed: ``os.replace`` is atomic within a folder) or
    disappears on :meth:`discard`, on leaving a ``with`` block without a commit, or when dropped.
    So a crash never leaves a half-written file under the final name. The one implementation of an
    atomic write: :func:`atomic_write` for a file written at once, ``utils.raster_write`` for an
    output streamed over time.

    Attributes:
        path: the final path.
        tmp: the temporary file (a writer that needs a name, as GDAL does, closes :attr:`fh` and
            writes this).
        fh: the temporary file, open for binary reading and writing.
    """

    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
            self.fh = os.fdopen(fd, "w+b")
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        self.path, self.tmp = path, Path(tmp)
        # removes the temporary file if the owner is dropped without commit/discard
        self._finalizer = weakref.finalize(self, _remove_temp, self.fh, self.tmp)

    def commit(self, overwrite: bool = True) -> None:
        """Move the file into place; with ``overwrite=False`` a file already under :attr:`path` is
        left as it is and FileExistsError is raised (discard the temporary file then).

        The check comes just before the rename: only another process writing that very name in the
        same instant could slip between them."""
        if not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
        if not overwrite and os.path.lexists(self.path):
            raise FileExistsError(errno.EEXIST, "exists already and was not written by this command; it is left "
                                  "as it is", str(self.path))
        os.replace(self.tmp, self.path)
        self._finalizer.detach()

    def discard(self) -> None:
        """Close and remove the temporary file (nothing once committed; idempotent)."""
        self._finalizer()

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()


def _remove_temp(fh, tmp: Path) -> None:
    try:
        fh.close()  # may raise again (a full disk refuses the buffered rest): remove the file all the same
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Any], Any], overwrite: bool = True) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it to ``path``
    (see :class:`AtomicFile`); on any failure the temporary file is removed.

    Args:
        path: the file to write (its folder is created).
        write: writes the content into the file object it is given.
        overwrite: False: never replace an existing ``path`` (FileExistsError, the file left as it is).
    """
    with AtomicFile(path) as temp:
        write(temp.fh)
        temp.commit(overwrite)


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
    """Seed python's, numpy's and torch's global generators (torch's CUDA ones too) from ``seed``.

    The one seeding of the project: a run's start, each epoch (the trainer's epoch seed) and each
    loader worker (its torch seed) call it. numpy takes ``seed`` modulo 2**32, its largest seed.
    """
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

    MASTER_ADDR / MASTER_PORT must already be in the environment. (The process's threads are
    part of its runtime: ``engines.builders.build_runtime``.)
    """
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
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
