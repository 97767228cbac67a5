"""The ``predict`` command: segment whole images of any size with a trained checkpoint.

    python main.py predict MODEL_WEIGHTS=<run>/best INPUT=<image, folder, 'glob*.tif' or list.txt> [OUTPUT=<folder>]
                           [GATING=true|false] [TTA=none|flips|d4] [TILE_OVERLAP=…] [PREDICT_BATCH=…] [SAVE_PROBABILITIES=true]

The network, classes and input scaling come from the checkpoint's configuration. Per image it
writes ``<stem>_mask.png`` (or a tiled ``.tif`` for large scenes and georeferenced inputs, keeping
the georeferencing; one foreground class as 0/255, more as class indices with a colour table),
``<stem>_overlay.png`` (downsampled for large scenes), optionally ``<stem>_prob.tif`` (probabilities,
uint8 0-255 or float32: PROBABILITIES_DTYPE), optionally ``<stem>_polygons.geojson`` (SAVE_POLYGONS:
one polygon per connected region of each class, see :mod:`utils.polygons`), and one JSON line in
``predictions.jsonl``. A folder
goes on past a bad file and lists every failure at the end (exit status 2). This module predicts in
one process; over several (``torchrun``, ``GPUs=[0,1]``, ``CPU_PROCESSES=N``) the files are shared
among them, with these rules and writers: see :mod:`engines.predict_ddp`.

What predict writes, and where (it never destroys a file):

- Without OUTPUT it writes into a fresh ``predict_<n>/`` beside the checkpoint. OUTPUT must be a
  new or empty folder: one that holds anything (an earlier ``predictions.jsonl``, the inputs
  themselves) is refused before anything is predicted, so runs are never mixed or replaced. The
  only exception is what a killed predict leaves behind, its hidden temporary files
  (``.<name>.<random>.tmp``, see :func:`temporary_leftovers`): they are removed, with a note.
- OUTPUT equal to the INPUT folder is refused by that rule; a new or empty subfolder of INPUT is
  safe, because the inputs are listed once, before anything is written, from the top level of INPUT
  only. Every output is renamed into place only if no file has that name, so even a file that
  appears during the run is never replaced.
- Inputs that share a stem (``scene.png``, ``scene.tif``) keep both results: their outputs are named
  with the suffix (``scene_png_mask.png``, ``scene_tif_mask.png``), with a note.
- ``predictions.jsonl`` is rewritten whole, atomically, after each image (:class:`RecordsFile`): a
  kill never leaves half a line, and every image it lists has all its outputs (only a kill -9 can
  leave part of the outputs of the image being written, without a line).
- An OUTPUT that cannot be created or written is one error before any prediction. A write error
  while saving one image's outputs removes that image's partial outputs and lists it among the
  failures; a full disk, a read-only file system or a permission error stops the folder at once
  (every later image would fail the same way). A predict that wrote nothing removes the OUTPUT
  folder it created (never one the user made).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
from tqdm import tqdm

from configs import Config, ConfigError
from engines.builders import build_runtime
from engines.checkpoint import CheckpointError
from engines.forward import NonFiniteOutput, place
from engines.inference import Inference
from engines.launch import launch_plan
from engines.sliding_window import Predictor, check_finite
from model.AuxNet import AuxNet
from utils.hardware import Runtime
from utils.image_io import InputScaling
from utils.polygons import KeptRows, write_polygons
from utils.raster import SUPPORTED_SUFFIXES, RasterError, open_image
from utils.raster_write import ClassMask, MaskWriter, OverlaySample, ProbabilityWriter, overlay_png
from utils.run_paths import RunDir
from utils.util import DistContext, RunError, atomic_write, atomic_write_text, make_writable_folder

#: Hidden temporary files of an interrupted write into a predict folder: ``atomic_write`` and
#: raster_write's temporary outputs (``tempfile.mkstemp`` names: ``.<output name>.<8 random>.tmp``)
#: and the write probe of :func:`~utils.util.make_writable_folder` (``.write_test.<pid>``).
_LEFTOVER = re.compile(r"\..+\.(png|tif|tiff|jsonl|geojson)\.[a-z0-9_]{8}\.tmp|\.write_test\.\d+")
#: Write errors after which every later output in the folder would fail the same way, and the fix.
_FOLDER_ERRORS = {
    errno.ENOSPC: "free some space on that disk, or choose an OUTPUT on another one",
    errno.EDQUOT: "free some of your disk quota, or choose an OUTPUT on another disk",
    errno.EROFS: "choose an OUTPUT on a file system you can write",
    errno.EACCES: "choose an OUTPUT you can write",
    errno.EPERM: "choose an OUTPUT you can write",
}


#: Characters that make INPUT a glob pattern (``scenes/*.tif``) rather than a path.
_GLOB_CHARS = re.compile(r"[*?\[]")


def check_inputs(cfg: Config) -> list[Path]:
    """The image files INPUT names: a file; every supported file of a folder (its top level, sorted);
    every file a glob pattern matches (``scenes/*.tif``, ``data/**/*.png``; sorted; quote it for the
    shell); or every path a ``.txt`` list holds (one a line, in its order; blank lines and ``#``
    comments skipped; relative paths are relative to the list's folder).

    Raises:
        ConfigError: no INPUT, a missing path, a pattern that matches no image, a folder without
            images, or a list with a missing or unsupported entry (naming its line).
    """
    if not cfg.INPUT:
        raise ConfigError(["`main.py predict` needs INPUT=<image file, folder, glob pattern or .txt list>"])
    path = Path(cfg.INPUT)
    if path.is_file() and path.suffix.lower() == ".txt":
        return _listed_inputs(path, cfg.INPUT)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file()]
        where = f"INPUT={cfg.INPUT!r} holds"
    elif _GLOB_CHARS.search(cfg.INPUT):
        found = [Path(p) for p in glob.glob(cfg.INPUT, recursive=True) if Path(p).is_file()]
        where = f"INPUT={cfg.INPUT!r} (a glob pattern) matches"
    else:
        raise ConfigError([f"INPUT={cfg.INPUT!r}: no such file or folder (nor a glob pattern: use *, ? or [...])"])
    files = sorted(p for p in found if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise ConfigError([f"{where} no image ({', '.join(SUPPORTED_SUFFIXES)})"])
    skipped = [p.name for p in found if p not in files and not p.name.startswith(".")]
    if skipped:
        print(f"note: skipping {len(skipped)} file(s) that are not images: {', '.join(skipped[:5])}")
    return files


def _listed_inputs(listing: Path, given: str) -> list[Path]:
    """The image files a ``.txt`` list names (see :func:`check_inputs`).

    Raises:
        ConfigError: the list cannot be read, is empty, or names a missing or unsupported file
            (every such line).
    """
    try:
        lines = listing.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"INPUT={given!r}: cannot read the list ({err})"]) from None
    files, problems = [], []
    for n, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        file = Path(entry) if Path(entry).is_absolute() else listing.parent / entry
        if not file.is_file():
            problems.append(f"INPUT={given!r} line {n}: {file}: no such file; fix or remove the line")
        elif file.suffix.lower() not in SUPPORTED_SUFFIXES:
            problems.append(f"INPUT={given!r} line {n}: {file} is not an image ({', '.join(SUPPORTED_SUFFIXES)}); "
                            "fix or remove the line")
        else:
            files.append(file)
    if problems:
        raise ConfigError(problems)
    if not files:
        raise ConfigError([f"INPUT={given!r} lists no image: write one image path a line"])
    return list(dict.fromkeys(files))


def output_dir(cfg: Config, checkpoint: Path) -> Path:
    """OUTPUT, checked new or empty, or the next free ``predict_<n>/`` beside the ``checkpoint`` file.

    Nothing is created or removed here (see :func:`prepare_output`).

    Raises:
        ConfigError: OUTPUT is the INPUT folder, a file, or a folder that holds anything but the
            temporary leftovers of a killed predict.
    """
    if not cfg.OUTPUT:
        return RunDir(checkpoint.resolve().parent).next_predictions()
    out = Path(cfg.OUTPUT)
    if not out.exists():
        return out
    if not out.is_dir():
        raise ConfigError([f"OUTPUT={cfg.OUTPUT!r} is a file: set OUTPUT to a new or empty folder"])
    inputs = Path(cfg.INPUT) if Path(cfg.INPUT).is_dir() else Path(cfg.INPUT).parent
    if out.resolve() == inputs.resolve():
        raise ConfigError([f"OUTPUT={cfg.OUTPUT!r} is the INPUT folder: predict never writes beside its inputs; "
                           f"use e.g. OUTPUT={inputs / 'predictions'}"])
    try:
        leftovers = set(temporary_leftovers(out))
        held = sorted(p.name for p in out.iterdir() if p not in leftovers)
    except OSError as err:
        raise RunError(f"cannot read the OUTPUT folder {out} ({err.strerror or err}): choose an OUTPUT you can "
                       "write") from None
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError([f"OUTPUT={cfg.OUTPUT!r} is not empty (it holds {shown}): predict writes only into a "
                           "new or empty folder, so results of two runs are never mixed or replaced; choose "
                           f"another OUTPUT, empty {out}, or leave OUTPUT unset for a fresh predict_<n>/ "
                           "beside the checkpoint"])
    return out


def temporary_leftovers(folder: Path) -> list[Path]:
    """The hidden temporary files that a killed write left in ``folder`` (see ``_LEFTOVER``)."""
    return sorted(p for p in folder.iterdir() if _LEFTOVER.fullmatch(p.name) and p.is_file())


def prepare_output(out: Path) -> Optional[Path]:
    """Create ``out`` (checked writable) and remove the temporary leftovers of a killed predict.

    Returns:
        The topmost folder created now (to remove if nothing gets written), or None.

    Raises:
        RunError: ``out`` cannot be created or written, naming it and the fix.
    """
    made = make_writable_folder(out, "the OUTPUT folder", "choose an OUTPUT you can write (or leave it unset "
                                "for predict_<n>/ beside the checkpoint)")
    leftovers = temporary_leftovers(out)
    if leftovers:
        for p in leftovers:
            p.unlink()
        print(f"note: removed {len(leftovers)} temporary file(s) that an interrupted predict left in {out}")
    return made


def remove_if_empty(out: Path, made: Optional[Path]) -> None:
    """Remove ``out`` and its parents up to ``made`` (the folders this predict created) if nothing
    was written into them: a predict that failed on every file, or was interrupted, leaves no empty
    folder behind. A folder the user made, or one that holds anything, stays."""
    if made is None:
        return
    for folder in [out, *out.parents]:
        try:
            folder.rmdir()  # only an empty folder can be removed
        except OSError as err:  # not empty (something was written there): keep it
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                print(f"warning: could not remove the empty folder {folder} ({err.strerror}): delete it by hand")
            return
        if folder == made:
            return


def output_names(files: list[Path]) -> dict[Path, str]:
    """The name each input's outputs start with: its stem, or ``<stem>_<suffix>`` for inputs that
    share a stem (``scene.png``, ``scene.tif`` → ``scene_png``, ``scene_tif``), so that no result
    replaces another. Stems are compared ignoring case (a case-insensitive disk would merge them);
    a name still taken gets ``_2``, ``_3``, ...; a one-line note lists the renamed inputs."""
    stems = Counter(p.stem.casefold() for p in files)
    names: dict[Path, str] = {}
    used: set[str] = set()
    for p in files:
        base = p.stem if stems[p.stem.casefold()] == 1 else f"{p.stem}_{p.suffix[1:]}"
        name, n = base, 2
        while name.casefold() in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name.casefold())
        names[p] = name
    renamed = [f"{p.name} -> {name}_mask" for p, name in names.items() if name != p.stem]
    if renamed:
        print(f"note: inputs that share a name keep both results, named with their suffix: {', '.join(renamed)}")
    return names


def build_predictor(cfg: Config, net: AuxNet, can_gate: bool, runtime: Runtime, gating: bool,
                    progress: bool = False) -> Predictor:
    """A :class:`Predictor` of ``net`` with the configuration's tile, overlap and PREDICT_BATCH (null: chosen
    for the device, not the training BATCH_SIZE), run as ``runtime`` says. Where the network runs on a
    GPU, the image is read by as many threads as the run's CPU threads (``runtime.threads``) where its
    format decodes; on the CPU by one (the network has the cores: two readers on a loaded 2-core
    machine read a JPEG 2000 at 0.17 s/MP, one at 0.11).

    Raises:
        CheckpointError: see :func:`check_gating`.
    """
    check_gating(cfg, can_gate, gating)
    return Predictor(net, tile=cfg.INPUT_SIZE, overlap=cfg.predict_overlap, batch_size=cfg.PREDICT_BATCH,
                     device=runtime.device, amp_dtype=runtime.amp_dtype, channels_last=runtime.channels_last,
                     gating=gating, gate_threshold=cfg.GATE_THRESHOLD, tta=cfg.TTA, progress=progress,
                     readers=runtime.threads if runtime.device.type == "cuda" else 1)


def check_gating(cfg: Config, can_gate: bool, gating: bool) -> None:
    """Refuse ``gating`` of a network that cannot gate.

    Raises:
        CheckpointError: gating asked of a network that cannot gate (see
            :func:`engines.inference.gating_unavailable`).
    """
    if gating and not can_gate:
        raise CheckpointError(
            f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r} has no fill head (a UNet, or a checkpoint made before "
            "gated prediction existed), so tiles cannot be gated: use GATING=false, or retrain"
        )


def check_weights(checkpoint: Inference) -> None:
    """Refuse a checkpoint whose weights hold NaN or inf, naming it and the fix, before any output is made.

    Raises:
        NonFiniteOutput: a weight holds NaN or inf.
    """
    try:
        check_finite(checkpoint.net)
    except NonFiniteOutput as err:
        raise NonFiniteOutput(f"MODEL_WEIGHTS={checkpoint.cfg.MODEL_WEIGHTS}: {err}; it cannot predict: use another "
                              "checkpoint of its run (last.pth or best.pth), or train again") from None


def predict(checkpoint: Inference) -> int:
    """Segment every image of INPUT into OUTPUT with the checkpoint, in this process; returns the exit
    status (2 when any image failed). (``main.py predict`` starts here for one process, see
    :func:`engines.predict_ddp.run`.)"""
    cfg = checkpoint.cfg
    try:
        files = check_inputs(cfg)
        out = output_dir(cfg, checkpoint.path)
        check_weights(checkpoint)
        # one process: the first device a training run would use, resolved as a launched rank resolves it
        runtime = build_runtime(cfg, DistContext(device=launch_plan(cfg)[1][0]))
        net = place(checkpoint.net, runtime.device, runtime.channels_last)
        predictor = build_predictor(cfg, net, checkpoint.can_gate, runtime, cfg.GATING, progress=True)
        inputs = training_inputs(cfg, checkpoint.split)
        made = prepare_output(out)  # last: nothing is created before everything else was checked
    except (ConfigError, RunError) as err:
        print(f"error: {err}", flush=True)
        return 2
    try:
        done, failures, stopped = predict_files(cfg, predictor, files, out, inputs)
    finally:
        remove_if_empty(out, made)
    return report(done, len(files), out, failures, [stopped] if stopped else [])


def report(done: int, total: int, out: Path, failures: list[str], stopped: list[str]) -> int:
    """Print what a predict did (how many images, every failure, why it stopped early); returns the exit
    status (2 when any image failed)."""
    print(f"predicted {done} of {total} image(s) into {out}")
    if failures:
        print(f"error: {len(failures)} image(s) failed:\n" + "\n".join(f"  - {f}" for f in failures))
    for why in stopped:
        print(f"error: {why}")
    return 2 if failures else 0


def predict_files(cfg: Config, predictor: Predictor, files: list[Path], out: Path,
                  inputs: Optional[InputScaling] = None) -> tuple[int, list[str], str]:
    """Predict each file into ``out`` (scaled as training scaled ``inputs``), recording each finished
    one in ``predictions.jsonl`` (rewritten atomically after each image).

    Returns:
        (images predicted, one message per failed image, why the folder stopped early or "").
    """
    jsonl = RecordsFile(out / "predictions.jsonl")
    records, failures, stopped = predict_each(
        cfg, predictor, files, range(len(files)), output_names(files), out, inputs, finished=jsonl.add)
    return len(records), list(failures.values()), stopped


#: What :func:`predict_each` returns: (the records of the images predicted, by input index; the
#: failure message of each image that failed, by input index; why it stopped early, or "").
Results = tuple[dict[int, dict], dict[int, str], str]


def predict_each(cfg: Config, predictor: Predictor, files: list[Path], mine: Iterable[int], names: dict[Path, str],
                 out: Path, inputs: Optional[InputScaling],
                 finished: Optional[Callable[[dict], None]] = None) -> Results:
    """Predict ``files[i]`` for each ``i`` of ``mine`` into ``out``, its outputs named after ``names``
    (:func:`output_names`). An image that fails is listed and the others go on, unless no later output
    could be written (:func:`stops_folder`). The one loop of one process and of each rank
    (:mod:`engines.predict_ddp`).

    Args:
        finished: called with each image's record once its outputs are written (one process adds
            it to ``predictions.jsonl``); if it raises, that image fails and its outputs are removed.
    """
    mine = list(mine)
    records: dict[int, dict] = {}
    failures: dict[int, str] = {}
    for n, i in enumerate(mine):
        path = files[i]
        try:
            record = predict_file(cfg, predictor, path, out, names[path], inputs)
            if finished is not None:
                try:
                    finished(record)
                except BaseException:
                    remove_outputs([record["mask"], record["overlay"], record["probabilities"], record["polygons"]])
                    raise
        except PREDICT_ERRORS as err:
            failures[i] = failure(path, out, err)
            if stops_folder(err):
                return records, failures, stop_message(out, err, len(mine) - n - 1)
            continue
        records[i] = record
        say(done_line(path, record))
    return records, failures, ""


def say(line: str) -> None:
    """Print ``line`` above any progress bar in one write: processes that share a terminal or a pipe
    (the ranks of a multi-process predict) never split each other's lines (``tqdm.write`` writes
    the text and its newline separately)."""
    tqdm.write(line + "\n", end="")


#: What fails one image (and is listed at the end) rather than the whole predict.
PREDICT_ERRORS = (RasterError, RunError, OSError)


def failure(path: Path, out: Path, err: Exception) -> str:
    """The failure message of the input ``path`` (printed now, listed at the end)."""
    message = _failure_message(path, out, err)
    say(f"failed: {message}")
    return message


def stops_folder(err: Exception) -> bool:
    """Whether every later output in the folder would fail as ``err`` did (a full disk, a read-only file system...)."""
    return isinstance(err, OSError) and err.errno in _FOLDER_ERRORS


def stop_message(out: Path, err: OSError, left: int) -> str:
    """Why the predict stopped early (``err``, see :func:`stops_folder`), and that ``left`` images were not predicted."""
    return (f"stopped: cannot write into {out} ({os.strerror(err.errno)}): {_FOLDER_ERRORS[err.errno]}; "
            f"{left} image(s) were not predicted")


def done_line(path: Path, record: dict) -> str:
    """The line printed for an image predicted."""
    return (f"{path.name}: {record['height']}x{record['width']} px, {record['tiles']} tiles, "
            f"{record['decoded']} decoded, {record['gated_off']} gated off, {record['seconds']:.2f} s "
            f"({record['tiles_per_s']} tiles/s) -> {record['mask']}")


def training_inputs(cfg: Config, split: Mapping[str, Any]) -> Optional[InputScaling]:
    """How MODEL_WEIGHTS's training scaled its inputs, from its ``split`` record (None for a checkpoint
    made before that was stored).

    Raises:
        CheckpointError: the checkpoint's record is malformed.
    """
    try:
        return InputScaling.from_dict(split.get("inputs"))
    except ValueError as err:
        raise CheckpointError(f"MODEL_WEIGHTS={cfg.MODEL_WEIGHTS!r} is damaged: its split holds a {err}; use "
                              "another checkpoint of the run (last.pth or best.pth), or retrain") from err


def _failure_message(path: Path, out: Path, err: Exception) -> str:
    """One line naming the input and what went wrong."""
    if isinstance(err, OSError):  # raster reading wraps its OSErrors in RasterError: this is a write
        where = err.filename or out
        return f"{path}: cannot write its outputs: {where}: {err.strerror or err}"
    return str(err) if str(err).startswith(str(path)) else f"{path}: {err}"


class RecordsFile:
    """``predictions.jsonl`` of one predict: rewritten whole, atomically, with each record added (a
    kill never leaves half a line); its first write refuses a file this predict did not make. Each
    record is serialised once, when it is added: for thousands of images the rewrite copies the
    earlier lines, not their records."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []

    def add(self, *records: dict) -> None:
        """Append ``records`` and rewrite the file.

        Raises:
            FileExistsError: the file exists before this predict's first record.
            OSError: it cannot be written (the records are then not added).
        """
        if not self.lines and self.path.exists():
            raise FileExistsError(errno.EEXIST, "exists already and was not written by this predict; it is left "
                                  "as it is", str(self.path))
        lines = [json.dumps(r) + "\n" for r in records]
        text = "".join(self.lines + lines).encode()
        # the first write never replaces a file, not even one made since the check above
        atomic_write(self.path, lambda fh: fh.write(text), overwrite=bool(self.lines))
        self.lines += lines


def remove_outputs(paths: list) -> None:
    """Remove outputs of an image that could not be finished (None entries are skipped). A file
    that cannot be removed is named, not hidden."""
    for p in paths:
        if p is None:
            continue
        try:
            Path(p).unlink(missing_ok=True)
        except OSError as err:
            say(f"warning: could not remove the partial output {p} ({err.strerror}): delete it by hand")


def predict_file(cfg: Config, predictor: Predictor, path: Path, out: Path, name: Optional[str] = None,
                 inputs: Optional[InputScaling] = None) -> dict:
    """Predict one image file into ``out``, scaled as training scaled ``inputs`` (see
    :meth:`utils.raster.ImageReader.use_scaling`, which warns when the image lies far outside what
    training saw); returns its JSON record. Outputs are named after ``name`` (default: the file's
    stem); see :func:`write_outputs`.

    Raises:
        RasterError: the file cannot be read; RunError: it does not fit the network (channels);
        OSError: an output cannot be written (disk full, read-only, a file already there).
    """
    with open_image(path) as image:
        if image.channels != cfg.INPUT_CHANNELS:
            raise RunError(f"{image.channels} channel(s), but the network takes INPUT_CHANNELS={cfg.INPUT_CHANNELS}")
        warning = image.use_scaling(inputs)
        if warning:
            say(f"warning: {warning}")
        classes = max(cfg.SEG_CLASSES, 2)
        return {"image": str(path), **write_outputs(cfg, predictor, image, out, name or path.stem, classes)}


def write_outputs(cfg: Config, predictor: Predictor, image, out: Path, name: str, classes: int) -> dict:
    """Predict ``image`` into ``<name>_mask``, ``<name>_overlay.png``, (SAVE_PROBABILITIES)
    ``<name>_prob.tif`` and (SAVE_POLYGONS) ``<name>_polygons.geojson`` under ``out``; returns their
    part of the JSON record. The mask opens in an image viewer (``classes`` = 2: 0/255; more: a
    palette of class indices, see :class:`~utils.raster_write.MaskWriter`); the probabilities are
    PROBABILITIES_DTYPE. The image is read once: the overlay's pixels are sampled as prediction reads
    its rows (:class:`~utils.raster_write.OverlaySample`).

    No output replaces an existing file. On any failure (Ctrl-C included) the outputs this call
    already moved into place are removed and the temporary ones are discarded, so an image is
    written whole or not at all.

    Raises:
        OSError: an output cannot be written; FileExistsError: a file already has its name.
    """
    mask = prob = polygons = None
    try:
        with ExitStack() as writers:  # closed in reverse order; an error aborts both
            mask = writers.enter_context(MaskWriter(out / f"{name}_mask", image.height, image.width, np.uint8,
                                                    like=image, overwrite=False, classes=classes))
            if cfg.SAVE_PROBABILITIES:
                prob = writers.enter_context(ProbabilityWriter(out / f"{name}_prob.tif", image.height, image.width,
                                                               predictor.channels, cfg.PROBABILITIES_DTYPE,
                                                               like=image, overwrite=False))
            rows = KeptRows(mask, image.height, image.width) if cfg.SAVE_POLYGONS else mask
            sample = OverlaySample(image)
            stats = predictor.run(image, rows, prob, cfg.SEG_THRESHOLD, seen=sample.add)
        if cfg.SAVE_POLYGONS:  # the class mask, in the input's map coordinates when it is georeferenced
            georef = image.georef
            write_polygons(out / f"{name}_polygons.geojson", rows.array, cfg.POLYGON_TOLERANCE,
                           georef.transform if georef else None, georef.crs if georef else None, overwrite=False)
            polygons = out / f"{name}_polygons.geojson"
        overlay = out / f"{name}_overlay.png"
        with ClassMask(mask.path, classes) as written:
            overlay_png(overlay, image, written, classes, overwrite=False, sample=sample)  # last: whole or not at all
    except BaseException:
        remove_outputs([w.path for w in (mask, prob) if w is not None and w.committed] + [polygons])
        raise
    return {"height": image.height, "width": image.width, "mask": str(mask.path), "overlay": str(overlay),
            "probabilities": str(prob.path) if prob else None, "polygons": str(polygons) if polygons else None,
            **stats.as_dict()}
