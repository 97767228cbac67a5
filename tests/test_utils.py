"""Atomic writes, run ids, the learning-rate schedule and the loggers."""

import json
import math
import os

import pytest
import torch

from utils.loggers import JsonLinesLogger, WandbLogger, build_loggers
from utils.run_paths import next_run_id
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


def test_next_run_id(tmp_path):
    assert next_run_id(tmp_path) == "run_001"
    (tmp_path / "run_001").mkdir()
    (tmp_path / "run_007").mkdir()
    (tmp_path / "run_x").mkdir()
    assert next_run_id(tmp_path) == "run_008"


def test_lr_schedule_warmup_then_cosine():
    from engines.builders import lr_factor

    f = lambda s: lr_factor(s, warmup=10, decay=20, start=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.55)
    assert f(10) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.5)
    assert f(30) == pytest.approx(0.0, abs=1e-12)
    assert f(40) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, warmup=0, decay=4, start=0.1) == 1.0
    values = [f(s) for s in range(10, 31)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_json_lines_logger(tmp_path):
    log = JsonLinesLogger(tmp_path / "log.jsonl")
    log.log({"loss": torch.tensor(0.5), "DSC": 0.9, "HD95": math.inf}, step=0)
    log.log({"loss": 0.25}, step=1)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == [{"epoch": 0, "loss": 0.5, "DSC": 0.9, "HD95": None}, {"epoch": 1, "loss": 0.25}]


def test_only_the_main_process_logs(tmp_path):
    assert build_loggers(tmp_path, is_main=False, local=True, wandb=True, project="p", name="n", config={}).loggers == []
    assert not (tmp_path / "log.jsonl").exists()


def test_wandb_logger_works_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))
    logger = WandbLogger("auxnet-test", "run", {"SEED": 1}, tmp_path)
    logger.log({"loss": 1.0}, step=0)
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


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
