"""utils/util.py: atomic writes (whole files, usual permissions, the previous file kept on a failure)."""

import os

import pytest
import torch

from utils.util import atomic_torch_save, atomic_write, atomic_write_text


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    from utils.util import _UMASK

    atomic_write_text(tmp_path / "f.txt", "x")  # mkstemp alone would leave 0600
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~_UMASK


def test_atomic_write_can_refuse_to_replace_a_file(tmp_path):
    path = tmp_path / "mask.png"
    path.write_text("the user's")
    with pytest.raises(FileExistsError, match="exists already and was not written by this command"):
        atomic_write(path, lambda fh: fh.write(b"new"), overwrite=False)
    assert path.read_text() == "the user's" and os.listdir(tmp_path) == ["mask.png"]
    atomic_write(tmp_path / "new.png", lambda fh: fh.write(b"new"), overwrite=False)
    assert (tmp_path / "new.png").read_bytes() == b"new"


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pth"
    atomic_torch_save({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"epoch": 2, "x": Unpicklable()}, path)
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


@pytest.mark.parametrize("omp, affinity, local, threads", [
    (None, {0, 1, 2, 3}, 1, 4),
    (None, {0, 1, 2, 3}, 2, 2),
    (None, {0}, 1, 1),             # taskset -c 0 on a 2-core machine: one thread, not os.cpu_count()
    (None, {0, 1}, 4, 1),          # never 0
    ("1", {0, 1, 2, 3}, 1, 1),     # the user's OMP_NUM_THREADS wins (torchrun sets 1)
    ("3", {0, 1}, 2, 3),
    ("junk", {0, 1, 2, 3}, 2, 2),  # not a count: ignored
])
def test_cpu_threads_honour_omp_num_threads_and_the_cpu_affinity(monkeypatch, omp, affinity, local, threads):
    import os

    from utils.util import cpu_threads

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpu_threads(local) == threads
