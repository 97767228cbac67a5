"""Load `config.yaml` and command-line overrides into a typed :class:`~configs.schema.Config`.

The schema (types, defaults, docs) lives in :mod:`configs.schema`. Loading collects *every* problem
(unknown key, wrong type) and hands them, together with the cross-field rules of
:mod:`configs.validator`, to one :class:`ConfigError`. The rules for runs that already exist
(resuming one, evaluating its checkpoint) are here too.

Reading a configuration needs no torch: ``import configs`` and typing a YAML file (or a
checkpoint's saved configuration) into a :class:`Config` (:func:`read_yaml`, :func:`load_yaml`,
:func:`check_values`, :func:`config_for_checkpoint`) import only the standard library, PyYAML and
torch-free modules. Validating it (:func:`load_config`) checks the machine and the loss registry,
and writing it uses the atomic writes of :mod:`utils.util`: those import torch when they run.
"""

from __future__ import annotations

import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from configs.schema import FIELDS, LEGACY_VALUES, TEXT_OPTIONS, Config, setting, yaml_text
from utils.choices import did_you_mean

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, noting every key a mapping sets twice (plain PyYAML keeps the last one
    silently, so a forgotten second ``BASE_LR:`` further down a file would win unseen)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[tuple[Any, int, int]] = []  # (key, first line, second line), 1-based

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges are meant to be overridden; complex keys cannot be compared
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first:
                self.duplicates.append((key, first[key], line))
            else:
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> tuple[Any, list[tuple[Any, int, int]]]:
    """``text`` parsed as YAML (safe), and each key set twice in one mapping as (key, first line, second line).

    Raises:
        yaml.YAMLError: ``text`` is not valid YAML.
    """
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def parse_overrides(items: typing.Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``KEY=VALUE`` strings; values are parsed as YAML. Returns (overrides, problems)."""
    overrides: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"command-line argument {item!r} is not KEY=VALUE (e.g. BATCH_SIZE=4)")
            continue
        if key in TEXT_OPTIONS and raw not in ("null", "~"):
            overrides[key] = raw  # text options keep what was typed (RUN_ID=001 stays "001")
            continue
        try:
            overrides[key], duplicates = parse_yaml(raw) if raw != "" else ("", [])
        except yaml.YAMLError:
            overrides[key], duplicates = raw, []
        problems += [f"command line: {key}={raw} sets {name!r} twice: keep one" for name, _, _ in duplicates]
    return overrides, problems


def load_yaml(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Read a YAML mapping: (its values, the keys it sets twice, each a problem naming the file and both lines).

    Raises:
        ConfigError: naming the file, when it cannot be read or is not a YAML mapping.
    """
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError([f"cannot read config file {str(path)!r}: {err.strerror}"]) from None
    try:
        data, duplicates = parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError([f"{path} is not valid YAML: {err}"]) from None
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        raise ConfigError([f"{path} must hold a mapping of KEY: value, found {type(data).__name__}"])
    return data, [f"{path}: {key!r} is set twice, on lines {a} and {b} (the second would silently replace "
                  "the first): keep one" for key, a, b in duplicates]


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` naming the file on any problem (duplicate keys included)."""
    data, problems = load_yaml(path)
    if problems:
        raise ConfigError(problems, source=str(path))
    return data


def non_finite(value: Any) -> Optional[float]:
    """The first NaN or infinity in ``value``, looking inside lists and mappings; None when there is none.

    One rule for every number of every option (typed floats, lists such as SCHEDULE_ALPHA, mappings
    such as CMA_COEFFICIENTS and the AUGMENTATIONS entries): no option has a meaning for NaN or
    infinity, and range checks cannot catch NaN (every comparison with it is false).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((bad for item in items if (bad := non_finite(item)) is not None), None)


def _shown(value: Any) -> str:
    """A value in a message as the user wrote it (text as is, anything else as YAML)."""
    return value if isinstance(value, str) else yaml_text(value)


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
            typed = coerce(value, _HINTS[key])
        except TypeError as err:
            kind = "is not valid" if typing.get_origin(_HINTS[key]) is Literal else "has the wrong type"
            problems[key] = f"{source}: {key}={_shown(value)} {kind}: {err}"
            continue
        bad = non_finite(typed)
        if bad is None:
            valid[key] = typed
            continue
        default = Config().to_dict()[key]
        scalar = typed is bad
        what, fix = ("is", "a finite number") if scalar else (f"holds {yaml_text(bad)}, which is", "finite numbers")
        problems[key] = (f"{source}: {key}={_shown(value)} {what} not a finite number: use {fix}, "
                         f"e.g. {setting(key, default)} (the default)")
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
    raw, problems = load_yaml(path)
    file_values, file_problems = check_values(raw, source=str(path))
    cli, cli_syntax = parse_overrides(overrides)
    problems += cli_syntax
    cli_values, cli_problems = check_values(cli, source="command line")
    # A bad value in the file that the command line replaces is no longer a problem.
    file_problems = {key: msg for key, msg in file_problems.items() if key not in cli}
    problems += [*file_problems.values(), *cli_problems.values()]
    cfg = Config(**{**file_values, **cli_values})
    notes = choose_for_model(cfg, typed=cli)
    # The rules check the machine and the loss registry, which need torch: imported when a
    # configuration is validated, not when one is read (see the module docstring).
    from configs.validator import validate

    # Rules that combine options skip those already reported: one problem is reported once.
    problems += validate(cfg, invalid=set(file_problems) | set(cli_problems))
    if problems:
        raise ConfigError(problems, source=str(path))
    for note in notes:  # only for a configuration that runs
        print(f"note: {note}", file=sys.stderr)
    return cfg


def choose_for_model(cfg: Config, typed: typing.Collection[str]) -> list[str]:
    """Set, in place, the options that MODEL makes meaningless at their default and that the user did
    not choose; returns one note per change.

    EVAL_METRIC: a model that does not decode (AuxNet-C trains only the head) cannot change a
    segmentation score, so the default DSC would keep the first epoch's checkpoint as best.pth;
    TTR (the head's tile accuracy) is chosen instead. "Not chosen": not ``typed`` on the command line
    and equal to the default (configs/config.yaml repeats every default, so a default read from a
    file counts as unset). A segmentation metric typed, or another one set in a file, is kept: the
    validator refuses it with the fix.
    """
    default = FIELDS["EVAL_METRIC"].default
    if not cfg.stage.decodes and "EVAL_METRIC" not in typed and cfg.EVAL_METRIC == default:
        cfg.EVAL_METRIC = "TTR"
        return [f"EVAL_METRIC=TTR: MODEL={cfg.MODEL} trains {cfg.stage.summary}, so {default} cannot change; "
                "best.pth is the epoch whose head scores best"]
    return []


def save_config(cfg: Config, path: Path, resolved: Optional[dict[str, str]] = None) -> None:
    """Write the resolved configuration as YAML (atomically); ``resolved`` notes what an ``auto``
    option became on this machine, as trailing comments."""
    from utils.util import atomic_write_text  # utils.util imports torch (see the module docstring)

    notes = "".join(f"# {key} resolved here: {why}\n" for key, why in (resolved or {}).items())
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False) + notes)


# ---- runs that already exist: resuming one, evaluating its checkpoint

#: Options a resumed run may change: they decide where and how fast it runs, not what it learns.
#: (TRAIN_EPOCHS extends or shortens the cosine decay from the next step on.)
RESUMABLE_KEYS = frozenset({
    "TRAIN_EPOCHS", "DATASET_DIR", "RESULTS_DIR", "NUM_WORKERS", "GPUs", "CPU_PROCESSES", "MASTER_ADDR",
    "MASTER_PORT", "NCCL_P2P_DISABLE", "LOG_WANDB", "LOG_LOCAL", "EXP_ID", "RUN_ID", "INPUT", "OUTPUT", "GATING",
    "TTA", "PREDICT_BATCH", "SAVE_PROBABILITIES", "PROBABILITIES_DTYPE", "EARLY_STOPPING", "COMPILE", "PLOT_EVERY",
    "PLOT_TILES", "SAVE_POLYGONS", "POLYGON_TOLERANCE",
})

#: Options ``eval`` takes from the command line; the others come from the checkpoint's run.
EVAL_KEYS = frozenset({
    "MODEL_WEIGHTS", "RESULTS_DIR", "EXP_ID", "RUN_ID", "DATASET_DIR", "NUM_WORKERS", "BATCH_SIZE", "GPUs",
    "CPU_PROCESSES", "MASTER_ADDR", "MASTER_PORT", "NCCL_P2P_DISABLE", "LOG_WANDB", "LOG_LOCAL",
    "MIXED_PRECISION", "CHANNELS_LAST", "SEG_THRESHOLD", "CLS_THRESHOLD", "EVAL_METRIC", "CMA_COEFFICIENTS",
    "DISTANCE_METRICS", "PIXEL_SPACING", "INCLUDE_BACKGROUND", "GATING", "GATE_THRESHOLD", "TILE_OVERLAP",
    "TTA", "PREDICT_BATCH",
})

#: Options ``predict`` takes from the command line, beyond the evaluation options.
PREDICT_KEYS = EVAL_KEYS | {"INPUT", "OUTPUT", "SAVE_PROBABILITIES", "PROBABILITIES_DTYPE", "SAVE_POLYGONS",
                               "POLYGON_TOLERANCE"}


def saved_values(saved: dict[str, Any]) -> dict[str, Any]:
    """The options of a saved configuration (a run's ``config.yaml``, a checkpoint's) that are still
    options and still valid, typed; the others are left out. An option it lacks because it was saved
    before the option existed is the value runs had then (:data:`~configs.schema.LEGACY_VALUES`), not
    today's default: a checkpoint without NORM has BatchNorm."""
    values, _ = check_values({k: v for k, v in saved.items() if k in FIELDS}, source="saved run")
    return {**{k: v for k, v in LEGACY_VALUES.items() if k not in saved}, **values}


def resume_problems(saved: dict[str, Any], cfg: Config, where: Path) -> list[str]:
    """The options that differ from the run being resumed (its saved ``config.yaml``), each with the fix."""
    old, new = saved_values(saved), cfg.to_dict()
    return [
        f"{setting(key, new[key])} but the run in {where} was made with {setting(key, old[key])}: resuming cannot "
        f"change it; use {setting(key, old[key])}, or start a new run (another RUN_ID) with "
        f"{setting('MODEL_WEIGHTS', f'{where}/last')}"
        for key in FIELDS
        if key not in RESUMABLE_KEYS and key in old and old[key] != new[key]
    ]


#: Options ``eval`` and ``predict`` choose for the device they run on, not the training run's
#: (``auto`` unless typed on the command line): a checkpoint trained with fp16 on a GPU must
#: evaluate on a CPU, which has no fp16 autocast.
DEVICE_KEYS = ("MIXED_PRECISION", "CHANNELS_LAST")


def config_for_checkpoint(saved: dict[str, Any], cfg: Config, given: typing.Iterable[str], fold: int,
                          allowed: typing.AbstractSet[str] = EVAL_KEYS) -> Config:
    """The configuration to evaluate a checkpoint with: its run's options (network, data, split,
    ``fold``), except the options of ``allowed`` (:data:`EVAL_KEYS`, :data:`PREDICT_KEYS`) that ``given``
    names, taken from ``cfg``; the :data:`DEVICE_KEYS` not in ``given`` are ``auto``.

    Raises:
        ConfigError: an option in ``given`` (typed on the command line) that the checkpoint fixes
            and that differs from it.
    """
    old, new = saved_values(saved), cfg.to_dict()
    problems = [
        f"{setting(key, new[key])} but the checkpoint was trained with {setting(key, old[key])}: "
        "remove it from the command line"
        for key in given
        if key in FIELDS and key not in allowed and key in old and old[key] != new[key]
    ]
    if problems:
        raise ConfigError(problems, source="the eval command")
    chosen = {k: new[k] for k in given if k in allowed}
    for_device = {k: FIELDS[k].default for k in DEVICE_KEYS if k not in given}
    return Config(**{**old, **for_device, **chosen, "MODEL_WEIGHTS": cfg.MODEL_WEIGHTS, "DEFAULT_FOLD": fold})
