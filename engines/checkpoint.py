"""Checkpoints: the one module that writes and reads them.

A checkpoint is a ``.pth`` dict::

    epoch      int, the last finished epoch (from 0)
    model      the network's state_dict
    loss       the loss's state_dict (learnable loss weights)
    optimizer, scheduler, scaler   their state_dicts (to resume)
    best       {"metric", "value", "epoch"}
    history    one record per finished epoch
    config     the run's resolved configuration (a plain dict)
    fold       the fold it was trained on
    head_trained  whether its classifier head was trained: by its run's MODEL, or loaded trained from
               the MODEL_WEIGHTS it started from (:func:`head_is_trained`); an AuxNet-ED run carries
               the head along untrained, and such a checkpoint does not gate tiles. Checkpoints made
               before it was recorded are judged by their MODEL (:func:`head_trained`)
    split      the data of that fold (:func:`utils.splits.split_record`), so that ``eval`` scores the
               checkpoint on its own test images wherever the file is copied to, and ``predict``
               scales its inputs as training did:
               train, test  [image ids]
               hashes       {image id: content hash of the image file} (:func:`utils.image_io.file_digest`);
                            ``eval`` refuses an image whose file changed since; folder datasets only
               inputs       how training scaled its pixels (:class:`utils.image_io.InputScaling`):
                            {"scaling": {dtype name: [offset, scale]}, "seen": [lo, hi]}: pixels of each
                            dtype became (raw - offset) / scale; ``seen`` is the range the training
                            pixels covered after it (the lowest 0.1 and highest 99.9 percentile of the
                            training images); e.g. {"scaling": {"uint8": [0, 255]}, "seen": [0.05, 0.93]}
               Checkpoints made before hashes and inputs were recorded lack them: nothing is checked,
               and inputs are scaled by their dtype's range.

Random streams are not stored: the trainer derives every one of them from (SEED, fold, epoch, rank)
at the start of each epoch (:func:`engines.SegTrainer.epoch_seed`), so the checkpoint of epoch k
determines epoch k+1 exactly. A checkpoint holding a NaN or an infinity is never written.

``eval`` and ``predict`` open a checkpoint once (:func:`engines.inference.load_for_inference`): the
configuration to run it with, its network, whether it can gate, and its split all come from that one
read (and so does training's final whole-image evaluation of its own checkpoint).

Every read uses ``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot run code while
it loads. Every write goes through a temporary file and a rename, so a crash never leaves half a
checkpoint under the final name.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from configs import Config
from configs.config_parser import saved_values
from model.stages import STAGES
from utils.run_paths import RunDir
from utils.util import RunError, atomic_torch_save


class CheckpointError(RunError):
    """A checkpoint that cannot be read, or does not fit the network or run it is loaded into."""


#: What to do about an unreadable MODEL_WEIGHTS (the usual reader's fix; see :func:`read_checkpoint`).
WEIGHTS_FIX = "point MODEL_WEIGHTS at a best.pth or last.pth that AuxNet saved"


def read_checkpoint(path: Path, map_location: Any = "cpu", fix: Optional[str] = WEIGHTS_FIX) -> dict[str, Any]:
    """The checkpoint dict in ``path`` (a bare state_dict is returned as ``{"model": state_dict}``).

    Args:
        path: the ``.pth`` file.
        map_location: where tensors are loaded (``torch.load``'s argument).
        fix: what the user should do when the file cannot be read, ending the error message (None:
            the caller adds its own).

    Raises:
        CheckpointError: naming the file, what it is (text, a zip archive, a truncated checkpoint…)
            and ``fix``, when it is not a readable ``.pth``.
    """
    if path.is_dir():
        hint = next((f"; did you mean {c.with_suffix('')}?" for c in RunDir(path).checkpoints()), "")
        raise CheckpointError(f"{path} is a folder, not a checkpoint{hint}")
    then = f"; {fix}" if fix else ""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # any failure of torch's reader on a user's file (it raises KeyError for text)
        raise CheckpointError(f"{path} cannot be read as a checkpoint: it {describe_unreadable(path, err)}{then}") \
            from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint saved by AuxNet{then}")
    if "model" not in state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {"model": state}
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} holds no network weights (expected a .pth saved by AuxNet){then}")
    return state


#: The start of a checkpoint in torch's legacy (pre-zip) format: a pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def describe_unreadable(path: Path, err: Exception) -> str:
    """What a file that ``torch.load`` failed on is, told from its first bytes ("is a text file…").

    torch's own message is kept only where it says what is wrong, and never its advice to load with
    ``weights_only=False``: that runs whatever code an unknown file holds.
    """
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if refused:  # a readable file, but with objects that only an unsafe load would build
        return (f"holds a {refused.group(1)} object besides tensors and plain values (objects other than those "
                "can run code as they load, so they are never loaded): save the network's state_dict alone")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(64)
    except OSError as os_err:
        return f"cannot be opened ({os_err.strerror or os_err})"
    if size == 0:
        return "is empty (0 bytes): a copy or a save that did not finish"
    if head.startswith(b"PK\x03\x04"):  # torch's format is a zip archive
        if not zipfile.is_zipfile(path):  # the archive's directory, at its end, is missing
            return (f"is a truncated PyTorch checkpoint ({size} bytes, its end is missing: a copy or a save that did "
                    "not finish)")
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return f"is a zip archive of {len(names)} file(s) ({', '.join(names[:3])}), not a PyTorch checkpoint"
        return f"is a damaged PyTorch checkpoint ({torch_reason(err)})"
    if head.startswith(_LEGACY_MAGIC):
        return f"is a damaged or truncated PyTorch checkpoint in the legacy format ({torch_reason(err)})"
    if head[:1] == b"\x80":
        return f"is a Python pickle, not a PyTorch checkpoint ({torch_reason(err)})"
    if _is_text(head):
        first_line = (head.decode("utf-8", errors="replace").strip().splitlines() or [""])[0]
        return f"is a text file (it starts with {first_line[:40]!r}), not a PyTorch checkpoint"
    return f"is not a PyTorch checkpoint (it starts with the bytes {head[:8].hex(' ')})"


def torch_reason(err: Exception) -> str:
    """The part of torch's message that says what is wrong (its first sentence, or what its
    weights-only reader refused), without its advice to load the file unsafely."""
    text = str(err)
    refused = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if refused:
        return f"{type(err).__name__}: {refused.group(1).strip()[:200]}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = re.split(r"(?<=[a-z0-9])\. ", first)[0].strip(" .")
    if not first or "weights_only" in first:
        return type(err).__name__
    return f"{type(err).__name__}: {first[:200]}"


def _is_text(head: bytes) -> bool:
    """Whether ``head`` looks like the start of a UTF-8 text file."""
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # a multi-byte character cut at the end of the sample
            head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(b >= 0x20 or b in b"\t\n\r\f" for b in head)


def saved_run(state: dict[str, Any]) -> tuple[Optional[dict[str, Any]], Optional[int]]:
    """(the saved configuration, the fold) of a checkpoint dict (see :func:`read_checkpoint`);
    (None, None) for bare weights."""
    config = state.get("config")
    if not isinstance(config, dict):
        return None, None
    return config, int(state.get("fold", config.get("DEFAULT_FOLD", 0)))


def saved_split(state: Mapping[str, Any]) -> dict[str, Any]:
    """The ``split`` record of a checkpoint dict (see the module docstring); ``{}`` for bare weights or a
    checkpoint made before the split was stored."""
    split = state.get("split")
    return split if isinstance(split, dict) else {}


def head_trained(state: Mapping[str, Any], model: str) -> bool:
    """Whether the classifier head in a checkpoint dict was trained: as recorded (``head_trained``) or,
    in a checkpoint made before that was recorded, told from its run's MODEL (``model`` for bare
    weights, which name none): a stage that trains the head, or one that starts from a trained
    network (AuxNet-D keeps the head it was given)."""
    recorded = state.get("head_trained")
    if isinstance(recorded, bool):
        return recorded
    config = state.get("config")
    stage = STAGES.get(config.get("MODEL", model) if isinstance(config, dict) else model)
    return stage is not None and stage.has_head and ("C" in stage.trains or stage.needs_weights)


def check_layers(path: Path, state: Mapping[str, Any], norm: str, activation: str) -> None:
    """Refuse a checkpoint whose network has other layers than NORM=``norm``, ACTIVATION=``activation``.

    The layers are the saved configuration's (a checkpoint made before NORM and ACTIVATION existed has
    BatchNorm and ReLU, see :func:`configs.config_parser.saved_values`); bare weights are judged by
    their keys (BatchNorm keeps running statistics, InstanceNorm and GroupNorm do not). The state_dicts
    of the norms differ, and so would loading: BatchNorm weights into an InstanceNorm network would
    drop the statistics silently, and InstanceNorm's scale and shift fit GroupNorm's shape although
    they mean something else.

    Raises:
        CheckpointError: naming the file, the option, both values and the fix.
    """
    config = state.get("config")
    if isinstance(config, dict):
        saved = saved_values(config)
        made = {key: [saved[key]] for key in ("NORM", "ACTIVATION") if key in saved}
    else:  # bare weights name no configuration: only BatchNorm's running statistics tell the norm apart
        made = {"NORM": ["batch"] if any(k.endswith(".running_mean") for k in state["model"]) else ["instance", "group"]}
    for key, asked in {"NORM": norm, "ACTIVATION": activation}.items():
        if key in made and asked not in made[key]:
            fix = " or ".join(f"{key}={value}" for value in made[key])
            raise CheckpointError(
                f"MODEL_WEIGHTS={str(path)!r} was trained with {fix}, but this run has {key}={asked}: "
                f"{_LAYER_WHY[key]}; use {fix}, or leave MODEL_WEIGHTS out to train {key}={asked} from scratch")


#: Why a network's weights do not carry over to another NORM or ACTIVATION (see :func:`check_layers`).
_LAYER_WHY = {
    "NORM": "the normalisation layers hold different weights (BatchNorm keeps running statistics, InstanceNorm "
            "and GroupNorm normalise each sample by its own)",
    "ACTIVATION": "its weights were learnt for the other activation",
}


#: Parameter name prefixes a checkpoint may lack (a UNet's, or one made before the fill head existed):
#: they keep their fresh initialisation (trained if the stage trains them, else frozen).
HEADS = ("fill_head.", "head.")


@dataclass
class LoadReport:
    """What :func:`load_weights` did: parameter names loaded, left as initialised, and ignored, and
    whether the file's head was trained (:func:`head_trained`)."""

    loaded: list[str]
    initialised: list[str]
    ignored: list[str]
    head_trained: bool = False


def load_weights(net: nn.Module, path: Path, state: Mapping[str, Any], model: str,
                 allow_missing: tuple[str, ...] = HEADS) -> LoadReport:
    """Load a checkpoint's network weights into ``net``.

    Args:
        net: the network.
        path: the checkpoint file (for messages).
        state: its content (:func:`read_checkpoint`).
        model: the MODEL ``net`` is built for (judges the head of bare weights, see :func:`head_trained`).
        allow_missing: name prefixes (e.g. ``"head."``) that may be absent from the file; they keep
            their fresh initialisation.

    Raises:
        CheckpointError: naming the file and the mismatching parameters when the architecture differs.
    """
    weights = state["model"]
    own = net.state_dict()
    missing = [k for k in own if k not in weights and not k.startswith(allow_missing)]
    shapes = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or shapes:
        raise CheckpointError(
            f"MODEL_WEIGHTS={str(path)!r} does not fit this network: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, wrong shape {shapes[:5]}; "
            "use the same INPUT_CHANNELS, UNET_DEPTH, CONV_DEPTH, SEG_CLASSES and CLS_CLASSES as the run that saved it"
        )
    net.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    return LoadReport(
        loaded=[k for k in own if k in weights],
        initialised=[k for k in own if k not in weights],
        ignored=[k for k in weights if k not in own],
        head_trained=head_trained(state, model),
    )


def head_is_trained(cfg: Config, report: Optional[LoadReport]) -> bool:
    """Whether the head of a network trained as ``cfg`` is a trained one, for its checkpoints'
    ``head_trained``: its MODEL trains the head, or the head was loaded, trained, from MODEL_WEIGHTS
    (``report``)."""
    if not cfg.has_head:
        return False
    if cfg.trains_classifier:
        return True
    return (report is not None and report.head_trained
            and not any(k.startswith("head.") for k in report.initialised))


def save_checkpoint(path: Path, *, epoch: int, net: nn.Module, loss: nn.Module, optimizer, scheduler, scaler,
                    best: dict[str, Any], history: list[dict[str, Any]], config: dict[str, Any], fold: int,
                    split: Optional[dict[str, Any]] = None, head_trained: bool = False) -> None:
    """Write a training checkpoint atomically (see the module docstring for its content).

    Raises:
        CheckpointError: a weight, BatchNorm statistic or loss weight is NaN or infinite (nothing is written).
    """
    bad = [f"model.{k}" for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    bad += [f"loss.{k}" for k, v in loss.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to write {path}: {len(bad)} tensor(s) hold NaN or infinity ({bad[:4]}); "
                              "the previous checkpoint is left as it was")
    atomic_torch_save({
        "epoch": epoch,
        "model": net.state_dict(),
        "loss": loss.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "best": best,
        "history": history,
        "config": config,
        "fold": fold,
        "split": split,
        "head_trained": head_trained,
    }, path)


def damaged_last_fix(last: Path) -> str:
    """What to do when a run's own ``last.pth`` cannot be read: remove it (the run trains again from
    epoch 0) or, where the run's ``best.pth`` is readable, put that in its place (it resumes after
    the best epoch)."""
    best = RunDir(last.parent).best
    fix = f"this run's own last checkpoint is damaged: remove {last} to train the run again from epoch 0"
    try:
        epoch = read_checkpoint(best)["epoch"] if best.is_file() else None
    except (CheckpointError, KeyError):
        epoch = None  # no usable best.pth to offer
    if epoch is not None:
        fix += f", or copy {best} over it to resume after the best epoch ({epoch})"
    return fix


def restore_training(path: Path, *, net: nn.Module, loss: nn.Module, optimizer, scheduler, scaler,
                     device: torch.device) -> dict[str, Any]:
    """Load the training state of ``path`` into the given objects; returns the checkpoint dict
    (for its ``epoch``, ``best`` and ``history``).

    Raises:
        CheckpointError: the file is unreadable, or was made with another network, loss or optimiser.
    """
    try:
        state = read_checkpoint(path, map_location=device, fix=None)
    except CheckpointError as err:  # the run's own file, not one the user pointed at
        raise CheckpointError(f"{err}; {damaged_last_fix(path)}") from None
    missing = [k for k in ("epoch", "loss", "optimizer", "scheduler", "scaler", "best") if k not in state]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it lacks {missing} (bare weights, not a training "
                              "checkpoint); start a new run with MODEL_WEIGHTS pointing at it")
    try:
        net.load_state_dict(state["model"])
        loss.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:  # torch's own mismatch reports
        raise CheckpointError(
            f"cannot resume from {path} ({type(err).__name__}: {str(err)[:300]}): the run was made with "
            "another network or loss; start a new run (another RUN_ID), or pass MODEL_WEIGHTS to start from it"
        ) from err
    scheduler.load_state_dict(state["scheduler"])
    # LambdaLR restores the optimiser's saved rate, the old schedule's; the next step must use this
    # run's schedule (a larger TRAIN_EPOCHS stretches the decay from here on).
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scaler.load_state_dict(state["scaler"])
    return state
