"""One logger interface — ``log(metrics, step)`` and ``close()`` — fanned out to the console, a
JSON-lines file and (optionally) Weights & Biases. Only the main process logs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm

from utils.run_paths import RunDir
from utils.util import WriteError, atomic_write_text, writing


def progress_bars() -> bool:
    """Whether progress bars are drawn: only when their stream (tqdm's, stderr) is a terminal. In a
    log file or a pipe each redraw would be a carriage return and a line of text (about a hundred an
    epoch); there the console logger's one line per epoch is the record."""
    return sys.stderr.isatty()


class ConsoleLogger:
    """One line per epoch, written through tqdm so progress bars stay intact."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        parts = [f"{k} {_fmt(v)}" for k, v in metrics.items() if "/" not in k or k.startswith("loss/")]
        tqdm.write(f"[epoch {step:>3}] " + " | ".join(parts))

    def rewind(self, history: list[Mapping[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonLinesLogger:
    """Appends one JSON object per call to ``path`` (written through at once, so a crash loses nothing).

    Raises (every method):
        WriteError: ``path`` cannot be written (a full disk…), naming it and the fix; a line that
            could not be written whole is cut off again, so the file never ends in half a line.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self._open()

    def _open(self):
        with writing(self.path):  # unbuffered: no line waits in memory, to fail later at close()
            return self.path.open("ab", buffering=0)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        record = {"epoch": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        line = memoryview((json.dumps(record) + "\n").encode())
        size = self._fh.seek(0, os.SEEK_END)
        try:
            with writing(self.path):
                while line:
                    line = line[self._fh.write(line):]
        except WriteError:
            with contextlib.suppress(OSError):  # the WriteError is the report; a resume rewinds the file anyway
                self._fh.truncate(size)
            raise

    def rewind(self, history: list[Mapping[str, Any]]) -> None:
        """Make the file hold exactly ``history`` (the records of a checkpoint's epochs): a crash between
        the checkpoint and the log line can otherwise leave an epoch twice, or not at all."""
        self._fh.close()
        with writing(self.path):
            atomic_write_text(self.path, "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n"
                                                 for r in history))
        self._fh = self._open()

    def close(self) -> None:
        self._fh.close()


class WandbLogger:
    """Weights & Biases, imported lazily. The mode comes from WANDB_MODE; without it, ``online``
    when an API key is configured and ``offline`` otherwise (so a run never fails for lack of a key)."""

    def __init__(self, project: str, name: str, config: dict, run_dir: Path):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")
        self._run = wandb.init(
            project=project, name=name, config=config, dir=str(run_dir), mode=mode, reinit="finish_previous",
            id=wandb_run_id(Path(run_dir)), resume="allow",
        )
        self._wandb = wandb

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def rewind(self, history: list[Mapping[str, Any]]) -> None:
        pass  # W&B keeps its own history; a resumed run logs from the next epoch on

    def log_images(self, images: Mapping[str, Path], step: int) -> None:
        self._run.log({name: self._wandb.Image(str(path)) for name, path in images.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


class MultiLogger:
    """Fans each call out to every logger it holds."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def rewind(self, history: list[Mapping[str, Any]]) -> None:
        for logger in self.loggers:
            logger.rewind(history)

    def log_images(self, images: Mapping[str, Path], step: int) -> None:
        """Send image files (the training curves, the overlays) to the loggers that take images."""
        for logger in self.loggers:
            if hasattr(logger, "log_images"):
                logger.log_images(images, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(
    run_dir: Path, *, is_main: bool, local: bool, wandb: bool, project: str, name: str, config: dict
) -> MultiLogger:
    """Console (+ ``log.jsonl`` when ``local``, + W&B when ``wandb``) on the main process; none elsewhere."""
    if not is_main:
        return MultiLogger([])
    loggers: list = [ConsoleLogger()]
    if local:
        loggers.append(JsonLinesLogger(RunDir(Path(run_dir)).log))
    if wandb:
        loggers.append(WandbLogger(project, name, config, Path(run_dir)))
    return MultiLogger(loggers)


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run folder, kept in ``wandb_id.txt`` so that a resumed run continues the
    same W&B run (made and written on first use)."""
    path = RunDir(Path(run_dir)).wandb_id
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)
    atomic_write_text(path, run_id + "\n")
    return run_id


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _fmt(v: Any) -> str:
    v = _jsonable(v)
    return f"{v:.4f}" if isinstance(v, float) else str(v)
