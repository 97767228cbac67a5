"""``main.py predict`` in one process, or over many devices on torch.distributed.

    torchrun --nproc_per_node=N main.py predict MODEL_WEIGHTS=... INPUT=<folder>
    python main.py predict MODEL_WEIGHTS=... INPUT=<folder> GPUs=[0,1]        (or CPU_PROCESSES=N, GPUs=[])

With one process this is :func:`engines.predict.predict`. With several (a ``torchrun`` launch, or one
spawned process per device as :func:`engines.launch.launch_plan` plans for training), the files are
shared among the ranks, largest first, each to the rank with the fewest bytes so far
(:func:`share_files`, the same on every rank: no scheduler, no messages while predicting):

- Rank 0 (the launching process when the processes are spawned) checks INPUT, OUTPUT and gating,
  creates OUTPUT and shares the files, once, with the rules and messages of one process; the other
  ranks receive that decision (or its error) and never look at OUTPUT themselves.
- Each rank predicts its own files with the per-image writers of :mod:`engines.predict`: every
  output is written atomically by the one rank that predicts its image, never twice.
- Rank 0 gathers every rank's records and failures (``all_gather_object``) and writes one
  ``predictions.jsonl``, in input order, then prints the summary with the failures of every rank;
  every rank ends with rank 0's exit status (2 when any image failed anywhere).

A Ctrl-C or an error on one rank ends every rank (:func:`engines.launch.run_everywhere`); the
images already finished keep their whole outputs, the one being written leaves nothing, and
``predictions.jsonl`` (written only at the end) is not written.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from configs import Config, ConfigError
from engines.forward import place
from engines.inference import Inference, load_for_inference
from engines.launch import (INTERRUPTED, Interrupted, choose_port, exit_status, join_torchrun, processes,
                            run_everywhere)
from engines.predict import (RecordsFile, Results, build_predictor, check_gating, check_inputs, check_weights,
                             output_dir, output_names, predict, predict_each, prepare_output, remove_if_empty,
                             report, training_inputs)
from utils.hardware import Runtime
from utils.image_io import InputScaling
from utils.run_paths import RunDir
from utils.util import DistContext, RunError, cleanup_distributed


def run(cfg: Config, overrides: list[str]) -> int:
    """``main.py predict``: read MODEL_WEIGHTS (once per process, :func:`engines.inference.load_for_inference`)
    and predict with it in this process (:func:`engines.predict.predict`), or over one process per
    device (:func:`predict_on_ranks`); returns the exit status.

    Raises:
        ConfigError: see :func:`~engines.inference.load_for_inference`.
        CheckpointError: its weights do not fit the network its configuration describes.
    """
    checkpoint = load_for_inference(cfg, overrides, "predict")
    if processes(checkpoint.cfg) > 1:
        return predict_on_ranks(checkpoint)
    return predict(checkpoint)


@dataclass
class Plan:
    """What rank 0 decided, once, for every rank."""

    files: list[Path]  #: the inputs, in input order
    names: dict[Path, str]  #: the name each input's outputs start with (see engines.predict.output_names)
    shares: list[list[int]]  #: the indices into ``files`` each rank predicts
    out: Path  #: OUTPUT, created
    made: Optional[Path]  #: the topmost folder created for it (removed again if nothing was written)
    inputs: Optional[InputScaling]  #: how training scaled its inputs


def share_files(sizes: list[int], ranks: int) -> list[list[int]]:
    """Share files among ``ranks``: largest first, each to the rank with the least so far (then the
    fewest files, then the lowest rank), so that the ranks finish close together; the same answer
    for the same sizes, on every rank.

    Args:
        sizes: the size of each file (its bytes: a cheap measure of its pixels, read without decoding).

    Returns:
        For each rank, the indices of its files, in input order.
    """
    loads, shares = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], len(shares[r]), r))
        shares[rank].append(i)
        loads[rank] += sizes[i]
    return [sorted(share) for share in shares]


def _file_size(path: Path) -> int:
    """Bytes of ``path``; 0 for a file that cannot be read (it fails quickly, on whichever rank gets it)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def plan(checkpoint: Inference, ranks: int, pick_port: bool) -> Plan:
    """Check INPUT, OUTPUT and gating, share the files among ``ranks``, and create OUTPUT (last, as one
    process does: nothing is created before everything else was checked).

    Args:
        pick_port: choose MASTER_PORT for the processes this one will spawn.

    Raises:
        ConfigError, RunError: what one process refuses (see :func:`engines.predict.predict`).
    """
    cfg = checkpoint.cfg
    files = check_inputs(cfg)
    out = output_dir(cfg, checkpoint.path)
    check_weights(checkpoint)
    check_gating(cfg, checkpoint.can_gate, cfg.GATING)
    inputs = training_inputs(cfg, checkpoint.split)
    names = output_names(files)
    shares = share_files([_file_size(p) for p in files], ranks)
    print(f"sharing {len(files)} image(s) among {ranks} processes, largest first: "
          + ", ".join(f"rank {r} {len(share)}" for r, share in enumerate(shares)), flush=True)
    if pick_port:
        choose_port(cfg)
    return Plan(files, names, shares, out, prepare_output(out), inputs)


def predict_on_ranks(checkpoint: Inference) -> int:
    """Predict INPUT over ``torchrun``'s processes, or over one spawned process per device; returns the
    exit status, the same on every rank (2 when any image failed, or INPUT or OUTPUT was refused).

    Raises:
        Interrupted: Ctrl-C, here or in another process (after the clean-up).
    """
    cfg = checkpoint.cfg
    ctx = join_torchrun(cfg)
    is_main = ctx is None or ctx.is_main
    decision: list = [None, None]  # the plan, or the error refusing it
    if is_main:
        try:
            decision = [plan(checkpoint, processes(cfg), pick_port=ctx is None), None]
        except (ConfigError, RunError) as err:
            decision = [None, str(err)]
    if ctx is not None and ctx.distributed:
        dist.broadcast_object_list(decision, src=0)
    shared, error = decision
    if error is not None:
        if is_main:
            print(f"error: {error}", flush=True)
        cleanup_distributed()
        return 2
    try:
        return run_everywhere(cfg, RunDir(shared.out), partial(predict_share, checkpoint, shared), ctx)
    except BaseException as err:
        status = exit_status(err)
        if status == INTERRUPTED:
            raise Interrupted("") from None
        if status is None:
            raise
        return status  # a rank's error, said by that rank
    finally:
        if is_main:
            remove_if_empty(shared.out, shared.made)


def predict_share(checkpoint: Inference, shared: Plan, cfg: Config, ctx: DistContext, runtime: Runtime,
                  run: RunDir) -> int:
    """One rank: predict its share of ``shared.files`` into ``run.root``, then gather every rank's
    results; rank 0 writes ``predictions.jsonl`` and the summary. Returns rank 0's exit status."""
    net = place(checkpoint.net, runtime.device, runtime.channels_last)
    predictor = build_predictor(cfg, net, checkpoint.can_gate, runtime, cfg.GATING, progress=ctx.is_main)
    results = predict_each(cfg, predictor, shared.files, shared.shares[ctx.rank], shared.names, run.root,
                           shared.inputs)
    everyone = [results]
    if ctx.distributed:
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, results)
    status = [finish(shared, run.root, everyone) if ctx.is_main else None]
    if ctx.distributed:
        dist.broadcast_object_list(status, src=0)
    return status[0]


def finish(shared: Plan, out: Path, everyone: list[Results]) -> int:
    """Rank 0, after every rank is done: write one ``predictions.jsonl`` in input order and print the
    summary; returns the exit status."""
    records = dict(item for results in everyone for item in results[0].items())
    failures = dict(item for results in everyone for item in results[1].items())
    stopped = [results[2] for results in everyone if results[2]]
    status = 0
    if records:
        jsonl = out / "predictions.jsonl"
        try:
            RecordsFile(jsonl).add(*(records[i] for i in sorted(records)))
        except OSError as err:
            print(f"error: cannot write {jsonl} ({err.strerror or err}); the {len(records)} image(s) predicted "
                  "keep their outputs", flush=True)
            status = 2
    return report(len(records), len(shared.files), out, [failures[i] for i in sorted(failures)], stopped) or status
