"""Load `config.yaml` and command-line overrides into a typed :class:`~configs.schema.Config`.

The schema (types, defaults, docs) lives in :mod:`configs.schema`. Loading collects *every* problem
(unknown key, wrong type) and hands them, together with the cross-field rules of
:mod:`configs.validator`, to one :class:`ConfigError`. The rules for runs that already exist
(resuming one, evaluating its checkpoint) are here too.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from configs.schema import FIELDS, Config
from configs.validator import validate
from utils.util import atomic_write_text, did_you_mean

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line, each with its fix."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


_HINTS = typing.get_type_hints(Config)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` checked against the annotation ``tp`` (ints are accepted for floats).

    Raises:
        TypeError: with a message naming the expected type.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(a) for a in choices}:
            return value
        hint = did_you_mean(str(value), [str(c) for c in choices])
        raise TypeError(f"expected one of {_type_name(tp)}{hint}")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg)
            except TypeError:
                continue
        raise TypeError(f"expected {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise TypeError(f"expected {_type_name(tp)}")
        return [coerce(v, item) for v in value]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise TypeError(f"expected {_type_name(tp)}")
        return {coerce(k, key_tp): coerce(v, val_tp) for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise TypeError("expected null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is dict and isinstance(value, dict):
        return value
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise TypeError(f"expected {_type_name(tp)}")


def parse_overrides(items: typing.Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``KEY=VALUE`` strings; values are parsed as YAML. Returns (overrides, problems)."""
    overrides: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"command-line argument {item!r} is not KEY=VALUE (e.g. BATCH_SIZE=4)")
            continue
        if _HINTS.get(key) in (str, Optional[str]) and raw not in ("null", "~"):
            overrides[key] = raw  # text options keep what was typed (RUN_ID=001 stays "001")
            continue
        try:
            overrides[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            overrides[key] = raw
    return overrides, problems


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` naming the file on any problem."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError([f"cannot read config file {str(path)!r}: {err.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError([f"{path} is not valid YAML: {err}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path} must hold a mapping of KEY: value, found {type(data).__name__}"])
    return data


def check_values(values: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Type-check raw values. Returns (valid values, {key: problem}) without raising."""
    valid: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for key, value in values.items():
        if key not in FIELDS:
            problems[key] = (
                f"{source}: unknown option {key!r}{did_you_mean(key, FIELDS)}; "
                f"valid options: {', '.join(FIELDS)}"
            )
            continue
        try:
            valid[key] = coerce(value, _HINTS[key])
        except TypeError as err:
            kind = "is not valid" if typing.get_origin(_HINTS[key]) is Literal else "has the wrong type"
            problems[key] = f"{source}: {key}={value!r} {kind}: {err}"
    return valid, problems


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load, override and validate a configuration.

    Keys missing from the file keep their defaults. A key with a bad value is reported and keeps
    its default meanwhile, so that the cross-field rules still run and every problem is listed.

    Args:
        path: YAML file (default: `configs/config.yaml`).
        overrides: ``KEY=VALUE`` strings from the command line.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: listing every problem found (file, keys, types and cross-field rules).
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    file_values, file_problems = check_values(read_yaml(path), source=str(path))
    cli, problems = parse_overrides(overrides)
    cli_values, cli_problems = check_values(cli, source="command line")
    # A bad value in the file that the command line replaces is no longer a problem.
    problems += [msg for key, msg in file_problems.items() if key not in cli]
    problems += list(cli_problems.values())
    cfg = Config(**{**file_values, **cli_values})
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source=str(path))
    return cfg


def save_config(cfg: Config, path: Path, resolved: Optional[dict[str, str]] = None) -> None:
    """Write the resolved configuration as YAML (atomically); ``resolved`` notes what an ``auto``
    option became on this machine, as trailing comments."""
    notes = "".join(f"# {key} resolved here: {why}\n" for key, why in (resolved or {}).items())
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False) + notes)


# ---- runs that already exist: resuming one, evaluating its checkpoint

#: Options a resumed run may change: they decide where and how fast it runs, not what it learns.
#: (TRAIN_EPOCHS extends or shortens the cosine decay from the next step on.)
RESUMABLE_KEYS = frozenset({
    "TRAIN_EPOCHS", "DATASET_DIR", "RESULTS_DIR", "NUM_WORKERS", "GPUs", "CPU_PROCESSES", "MASTER_ADDR",
    "MASTER_PORT", "NCCL_P2P_DISABLE", "LOG_WANDB", "LOG_LOCAL", "EXP_ID", "RUN_ID", "INPUT", "OUTPUT", "GATING",
    "TTA", "SAVE_PROBABILITIES", "EARLY_STOPPING", "COMPILE", "PLOT_EVERY", "PLOT_TILES",
})

#: Options ``eval`` takes from the command line; the others come from the checkpoint's run.
EVAL_KEYS = frozenset({
    "MODEL_WEIGHTS", "RESULTS_DIR", "EXP_ID", "RUN_ID", "DATASET_DIR", "NUM_WORKERS", "BATCH_SIZE", "GPUs",
    "CPU_PROCESSES", "MASTER_ADDR", "MASTER_PORT", "NCCL_P2P_DISABLE", "LOG_WANDB", "LOG_LOCAL",
    "MIXED_PRECISION", "CHANNELS_LAST", "SEG_THRESHOLD", "CLS_THRESHOLD", "EVAL_METRIC", "CMA_COEFFICIENTS",
    "DISTANCE_METRICS", "PIXEL_SPACING", "INCLUDE_BACKGROUND", "GATING", "TILE_OVERLAP",
    "TTA",
})

#: Options ``predict`` takes from the command line, beyond the evaluation options.
PREDICT_KEYS = EVAL_KEYS | {"INPUT", "OUTPUT", "SAVE_PROBABILITIES"}


def _typed(saved: dict[str, Any]) -> dict[str, Any]:
    values, _ = check_values({k: v for k, v in saved.items() if k in FIELDS}, source="saved run")
    return values


def resume_problems(saved: dict[str, Any], cfg: Config, where: Path) -> list[str]:
    """The options that differ from the run being resumed (its saved ``config.yaml``), each with the fix."""
    old, new = _typed(saved), cfg.to_dict()
    return [
        f"{key}={new[key]!r} but the run in {where} was made with {key}={old[key]!r}: resuming cannot change "
        f"it; use {key}={old[key]!r}, or start a new run (another RUN_ID) with MODEL_WEIGHTS={where}/last"
        for key in FIELDS
        if key not in RESUMABLE_KEYS and key in old and old[key] != new[key]
    ]


def config_for_checkpoint(saved: dict[str, Any], cfg: Config, given: typing.Iterable[str], fold: int,
                          allowed: typing.AbstractSet[str] = EVAL_KEYS) -> Config:
    """The configuration to evaluate a checkpoint with: its run's options (network, data, split,
    ``fold``), except the options of ``allowed`` (:data:`EVAL_KEYS`, :data:`PREDICT_KEYS`) that ``given``
    names, taken from ``cfg``.

    Raises:
        ConfigError: an option in ``given`` (typed on the command line) that the checkpoint fixes
            and that differs from it.
    """
    old, new = _typed(saved), cfg.to_dict()
    problems = [
        f"{key}={new[key]!r} but the checkpoint was trained with {key}={old[key]!r}: remove it from the command line"
        for key in given
        if key in FIELDS and key not in allowed and key in old and old[key] != new[key]
    ]
    if problems:
        raise ConfigError(problems, source="the eval command")
    chosen = {k: new[k] for k in given if k in allowed}
    return Config(**{**old, **chosen, "MODEL_WEIGHTS": cfg.MODEL_WEIGHTS, "DEFAULT_FOLD": fold})
