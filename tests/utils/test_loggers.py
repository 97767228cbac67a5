"""utils/loggers.py: JSON lines, only the main process logs, W&B offline without a key."""

import json
import math

import torch

from utils.loggers import JsonLinesLogger, WandbLogger, build_loggers


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


def test_progress_bars_are_drawn_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from utils.loggers import progress_bars

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_bars()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file or a pipe
    assert not progress_bars()
