"""What ``eval`` and ``predict`` make of a checkpoint, read once: the configuration to run it with,
its network, whether it can gate tiles, and its split (:func:`load_for_inference`).

The file itself (its keys, reading, writing) is :mod:`engines.checkpoint`'s; this module turns its
content into a command's inputs. Training's final whole-image evaluation of its own checkpoint
reads it here too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from configs import Config, ConfigError
from configs.config_parser import EVAL_KEYS, PREDICT_KEYS, config_for_checkpoint, parse_overrides, saved_values
from configs.schema import setting
from configs.validator import validate
from engines.builders import build_network
from engines.checkpoint import CheckpointError, head_trained, read_checkpoint, saved_run, saved_split
from engines.launch import launch_plan
from model.AuxNet import AuxNet
from utils.hardware import resolve_precision
from utils.run_paths import resolve_weights_path


@dataclass(frozen=True)
class Inference:
    """A checkpoint read for ``eval`` or ``predict`` (:func:`load_for_inference`).

    Attributes:
        path: the checkpoint file.
        cfg: the configuration to run it with.
        net: its network, weights loaded, on the CPU (each process places it on its device).
        can_gate: whether it can gate tiles (:func:`gating_unavailable`).
        split: its ``split`` record (:func:`saved_split`; ``{}`` when it has none).
        has_config: whether it holds its run's configuration (False for bare weights).
    """

    path: Path
    cfg: Config
    net: AuxNet
    can_gate: bool
    split: dict[str, Any]
    has_config: bool


def load_for_inference(cfg: Config, overrides: Optional[Sequence[str]] = None, command: str = "eval") -> Inference:
    """Read the checkpoint MODEL_WEIGHTS names, once, and make from it the configuration, network,
    gating ability and split to evaluate or predict with.

    Args:
        cfg: the loaded configuration (``main.py``'s YAML file and command line).
        overrides: the command line's ``KEY=VALUE`` items: the configuration is the checkpoint's run's,
            plus the evaluation options they set (:data:`configs.config_parser.EVAL_KEYS`, or
            ``PREDICT_KEYS`` for ``predict``), validated; precision and memory format are chosen for
            this machine, with a note when the precision is not the one the run was trained with;
            GATING is switched off, with a note, for a checkpoint that cannot gate (see
            :func:`resolve_gating`). None: ``cfg`` is the checkpoint's own run's, used as it is
            (training's final evaluation of its checkpoint).
        command: ``eval`` or ``predict``, for the messages and the options it takes.

    Raises:
        ConfigError: no MODEL_WEIGHTS, an unreadable checkpoint, options it fixes set otherwise, or
            GATING=true typed for a checkpoint that cannot gate.
        CheckpointError: its weights do not fit the network its configuration describes (or, with
            ``overrides`` None, the run's own checkpoint cannot be read).
    """
    if not cfg.MODEL_WEIGHTS:
        raise ConfigError([f"`main.py {command}` needs a checkpoint: set MODEL_WEIGHTS=path/to/best.pth"])
    path = resolve_weights_path(cfg.MODEL_WEIGHTS)
    try:
        state = read_checkpoint(path)
    except CheckpointError as err:
        if overrides is None:  # the run's own checkpoint, not a MODEL_WEIGHTS the user typed
            raise
        raise ConfigError([f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r}: {err}"]) from None
    saved, fold = saved_run(state)
    if overrides is not None:
        given, _ = parse_overrides(overrides)
        if saved is not None:  # else bare weights: the command line describes the network
            cfg = _checkpoint_config(saved, fold, cfg, given, path, command)
        cfg = resolve_gating(cfg, gating_unavailable(cfg, state), typed="GATING" in given)
    net, _ = build_network(cfg, path, state)
    return Inference(path, cfg, net, can_gate=gating_unavailable(cfg, state) is None, split=saved_split(state),
                     has_config=saved is not None)


def _checkpoint_config(saved: dict[str, Any], fold: int, cfg: Config, given: Mapping[str, Any], path: Path,
                       command: str) -> Config:
    """The checkpoint's run's configuration with the options ``given`` on the command line, validated,
    and the precision note printed (see :func:`load_for_inference`)."""
    cfg = config_for_checkpoint(saved, cfg, given, fold=fold, allowed=PREDICT_KEYS if command == "predict" else EVAL_KEYS)
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems, source=f"the configuration saved in {path}")
    note = precision_note(saved, cfg, launch_plan(cfg)[1][0])
    if note:
        print(note)
    return cfg


def gating_unavailable(cfg: Config, state: Mapping[str, Any]) -> Optional[str]:
    """Why the network of ``cfg`` with the checkpoint dict ``state`` cannot gate tiles, or None when it
    can: it has a head and a fill head, and its head was trained (:func:`head_trained`)."""
    if not cfg.has_head:
        return f"MODEL={cfg.MODEL} has no classifier head"
    if not any(k.startswith("fill_head.") for k in state["model"]):
        return "it has no fill head (it was made before gated prediction existed)"
    if not head_trained(state, cfg.MODEL):
        return f"its classifier head was never trained (MODEL={cfg.MODEL} carries it along untrained)"
    return None


def resolve_gating(cfg: Config, why: Optional[str], typed: bool) -> Config:
    """``cfg`` with GATING off, and a one-line note, when its checkpoint cannot gate (``why``, see
    :func:`gating_unavailable`) and GATING was not typed on the command line (a UNet is then predicted
    as it can be); unchanged otherwise.

    Raises:
        ConfigError: GATING=true typed for a checkpoint that cannot gate, naming the fix.
    """
    if why is None or not cfg.GATING:
        return cfg
    if typed:
        raise ConfigError([f"GATING=true, but MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r} cannot gate tiles: {why}. Use "
                           "GATING=false (or leave it out), or train its heads first with `main.py train "
                           f"MODEL=AuxNet-C MODEL_WEIGHTS={cfg.MODEL_WEIGHTS}`"], source="the command line")
    print(f"note: GATING=false for MODEL_WEIGHTS={cfg.MODEL_WEIGHTS}: {why}, so every tile is decoded")
    return replace(cfg, GATING=False)


def precision_note(saved: dict[str, Any], cfg: Config, device: torch.device) -> Optional[str]:
    """A note when the precision ``cfg`` resolves to on ``device`` is not the one the checkpoint's run
    (``saved``) set explicitly, e.g. fp16 on its GPU, fp32 on this CPU; None when they agree.

    A run made with ``auto`` recorded no precision (it was chosen for its machine), so there is
    nothing to compare with.
    """
    trained = saved_values(saved).get("MIXED_PRECISION", "auto")
    if trained == "auto":
        return None
    used = resolve_precision(cfg.MIXED_PRECISION, device)[0]
    if used == trained:
        return None
    how = "auto" if cfg.MIXED_PRECISION == "auto" else "as asked on the command line"
    return (f"note: the checkpoint was trained with {setting('MIXED_PRECISION', trained)}; this machine uses "
            f"{'fp32' if used == 'none' else used} ({how})")
