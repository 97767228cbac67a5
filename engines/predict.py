"""The ``predict`` command: segment whole images of any size with a trained checkpoint.

    python main.py predict MODEL_WEIGHTS=<run>/best INPUT=<image or folder> [OUTPUT=<folder>]
                           [GATING=true|false] [TTA=none|flips|d4] [TILE_OVERLAP=…] [BATCH_SIZE=…] [SAVE_PROBABILITIES=true]

The network, classes and input scaling come from the checkpoint's configuration. Per image it
writes ``<stem>_mask.png`` (or a tiled ``.tif`` for large scenes and georeferenced inputs, keeping
the georeferencing), ``<stem>_overlay.png`` (downsampled for large scenes), optionally
``<stem>_prob.tif`` (float16 probabilities), and one JSON line in ``predictions.jsonl``. A folder
goes on past a bad file and lists every failure at the end (exit status 2).
"""

from __future__ import annotations

import dataclasses
import json
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from tqdm import tqdm

from configs import Config, ConfigError
from engines.builders import build_network, memory_format_of, precision_of
from engines.checkpoint import CheckpointError, resolve_weights_path
from engines.forward import place
from engines.launch import launch_plan
from engines.predictor import Predictor
from model.AuxNet import AuxNet
from utils.raster import SUPPORTED_SUFFIXES, RasterError, open_image
from utils.raster_write import MaskWriter, overlay_png
from utils.util import RunError


def check_inputs(cfg: Config) -> list[Path]:
    """The image files INPUT names (a file, or every supported file of a folder, sorted).

    Raises:
        ConfigError: no INPUT, a missing path, or a folder without images.
    """
    if not cfg.INPUT:
        raise ConfigError(["`main.py predict` needs INPUT=<image file or folder>"])
    path = Path(cfg.INPUT)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError([f"INPUT={cfg.INPUT!r}: no such file or folder"])
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise ConfigError([f"INPUT={cfg.INPUT!r} holds no image ({', '.join(SUPPORTED_SUFFIXES)})"])
    skipped = [p.name for p in path.iterdir() if p.is_file() and p not in files and not p.name.startswith(".")]
    if skipped:
        print(f"note: skipping {len(skipped)} file(s) that are not images: {', '.join(skipped[:5])}")
    return files


def output_dir(cfg: Config) -> Path:
    """OUTPUT, or the next free ``predict_<n>/`` beside the checkpoint."""
    if cfg.OUTPUT:
        return Path(cfg.OUTPUT)
    parent = resolve_weights_path(cfg.MODEL_WEIGHTS).resolve().parent
    taken = [int(m.group(1)) for p in parent.glob("predict_*") if (m := re.fullmatch(r"predict_(\d+)", p.name))]
    return parent / f"predict_{max(taken, default=0) + 1}"


def prediction_network(cfg: Config, device: torch.device) -> tuple[AuxNet, bool]:
    """The network of MODEL_WEIGHTS on ``device``, and whether it can gate: it has heads, and its
    fill head was loaded (a checkpoint made before the fill head existed has none)."""
    net, report = build_network(cfg)
    fill_loaded = report is not None and not any(k.startswith("fill_head.") for k in report.initialised)
    can_gate = net.head is not None and fill_loaded
    return place(net, device, memory_format_of(cfg, device)[0]), can_gate


def gating_unavailable(cfg: Config, weights: Mapping[str, Any]) -> Optional[str]:
    """Why the network of ``cfg`` with the checkpoint's ``weights`` cannot gate, or None when it can
    (the same rule as :func:`prediction_network`, told from the file before the network is built)."""
    if not cfg.has_head:
        return f"MODEL={cfg.MODEL} has no classifier head"
    if not any(k.startswith("fill_head.") for k in weights):
        return "it has no fill head (it was made before gated prediction existed)"
    return None


def resolve_gating(cfg: Config, weights: Mapping[str, Any], typed: bool) -> Config:
    """``cfg`` with GATING off, and a one-line note, when its checkpoint cannot gate and GATING was
    not typed on the command line (a UNet is then predicted as it can be); unchanged otherwise.

    Raises:
        ConfigError: GATING=true typed for a checkpoint that cannot gate, naming the fix.
    """
    why = gating_unavailable(cfg, weights) if cfg.GATING else None
    if why is None:
        return cfg
    if typed:
        raise ConfigError([f"GATING=true, but MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r} cannot gate tiles: {why}. Use "
                           "GATING=false (or leave it out), or train its heads first with `main.py train "
                           f"MODEL=AuxNet-C MODEL_WEIGHTS={cfg.MODEL_WEIGHTS}`"], source="the command line")
    print(f"note: GATING=false for MODEL_WEIGHTS={cfg.MODEL_WEIGHTS}: {why}, so every tile is decoded")
    return dataclasses.replace(cfg, GATING=False)


def build_predictor(cfg: Config, net: AuxNet, can_gate: bool, device: torch.device, gating: bool,
                    progress: bool = False) -> Predictor:
    """A :class:`Predictor` of ``net`` with the configuration's tile, overlap, batch and precision.

    Raises:
        CheckpointError: gating asked of a network that cannot gate (see :func:`prediction_network`).
    """
    if gating and not can_gate:
        raise CheckpointError(
            f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r} has no fill head (a UNet, or a checkpoint made before "
            "gated prediction existed), so tiles cannot be gated: use GATING=false, or retrain"
        )
    return Predictor(net, tile=cfg.INPUT_SIZE, overlap=cfg.predict_overlap, batch_size=cfg.BATCH_SIZE,
                     device=device, amp_dtype=precision_of(cfg, device),
                     channels_last=memory_format_of(cfg, device)[0], gating=gating,
                     cls_threshold=cfg.CLS_THRESHOLD, tta=cfg.TTA, progress=progress)


def predict(cfg: Config) -> int:
    """Segment every image of INPUT into OUTPUT; returns the exit status (2 when any image failed)."""
    try:
        files = check_inputs(cfg)
        device = launch_plan(cfg)[1][0]  # one process: the first device a training run would use
        predictor = build_predictor(cfg, *prediction_network(cfg, device), device, cfg.GATING, progress=True)
    except (ConfigError, RunError) as err:
        print(f"error: {err}", flush=True)
        return 2
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for path in files:
        try:
            record = predict_file(cfg, predictor, path, out)
        except (RasterError, RunError) as err:
            message = str(err) if str(err).startswith(str(path)) else f"{path}: {err}"
            failures.append(message)
            tqdm.write(f"failed: {message}")
            continue
        with (out / "predictions.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        tqdm.write(f"{path.name}: {record['height']}x{record['width']} px, {record['tiles']} tiles, "
                   f"{record['decoded']} decoded, {record['gated_off']} gated off, {record['seconds']:.2f} s "
                   f"({record['tiles_per_s']} tiles/s) -> {record['mask']}")
    print(f"predicted {len(files) - len(failures)} of {len(files)} image(s) into {out}")
    if failures:
        print(f"error: {len(failures)} image(s) failed:\n" + "\n".join(f"  - {f}" for f in failures))
        return 2
    return 0


def predict_file(cfg: Config, predictor: Predictor, path: Path, out: Path) -> dict:
    """Predict one image file into ``out``; returns its JSON record.

    Raises:
        RasterError: the file cannot be read; RunError: it does not fit the network (channels).
    """
    with open_image(path) as image:
        if image.channels != cfg.INPUT_CHANNELS:
            raise RunError(f"{image.channels} channel(s), but the network takes INPUT_CHANNELS={cfg.INPUT_CHANNELS}")
        classes = max(cfg.SEG_CLASSES, 2)
        mask = MaskWriter(out / f"{path.stem}_mask", image.height, image.width, np.uint8, like=image)
        prob = (MaskWriter(out / f"{path.stem}_prob.tif", image.height, image.width, np.float16, like=image,
                           channels=predictor.channels) if cfg.SAVE_PROBABILITIES else None)
        with mask, (prob if prob is not None else nullcontext()):
            stats = predictor.run(image, mask, prob, cfg.SEG_THRESHOLD)
        overlay = out / f"{path.stem}_overlay.png"
        with open_image(mask.path) as written:
            overlay_png(overlay, image, written, classes)
        return {"image": str(path), "height": image.height, "width": image.width, "mask": str(mask.path),
                "overlay": str(overlay), "probabilities": str(prob.path) if prob else None, **stats.as_dict()}
