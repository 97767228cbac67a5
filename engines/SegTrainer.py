"""The training / evaluation loop. ``fit()`` reads like a table of contents; construction lives in
:mod:`engines.builders`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from engines.checkpoint import CheckpointError, restore_training, save_checkpoint
from engines.forward import NonFiniteOutput, autocast_for, evaluate_model, image_to, non_finite, place
from model.AuxNet import AuxNet, AuxNetOutput
from model.metrics import HIGHER_IS_BETTER
from utils.loggers import progress_bars
from utils.run_paths import RunDir
from utils.util import DistContext, RunError, seed_everything, writing


class TrainStep(nn.Module):
    """Network and loss in one module, so DDP (and the optimiser) see the learnable loss weights.

    ``forward`` returns the network's output and the loss; ``decode=False`` skips the decoder when
    only the classifier trains. ``sdm``: the batch's whole-image distance maps (SDM_SCOPE=image).
    """

    def __init__(self, net: AuxNet, loss: nn.Module, decode: bool, use_cls: bool):
        super().__init__()
        self.net, self.loss, self.decode, self.use_cls = net, loss, decode, use_cls
        loss.trust_targets()  # the dataset checked every mask's class indices as it loaded them

    def forward(self, image: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, fill: torch.Tensor,
                sdm: Optional[torch.Tensor] = None):
        out: AuxNetOutput = self.net(image, decode=self.decode)
        if not self.use_cls:
            return out, self.loss(out.seg, mask, target_sdm=sdm)
        return out, self.loss(out.seg, mask, out.cls, label, out.fill, fill, target_sdm=sdm)


@dataclass
class TrainerSettings:
    """The few options the loop itself needs (the builders translate the Config)."""

    run: RunDir
    epochs: int
    eval_metric: str
    save_best: bool
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    config: dict
    fold: int = 0
    seed: int = 0
    split: Optional[dict] = None
    head_trained: bool = False  # the network's head is a trained one (see engines.checkpoint.head_is_trained)
    grad_clip: Optional[float] = None
    early_stopping: Optional[int] = None
    plot_every: int = 0


class TrainingDiverged(RunError):
    """A loss, weight or BatchNorm statistic became NaN or infinite; the last good checkpoint is kept."""


#: Training steps between two check points. A step never waits for the device (no loss read on the
#: host, no ``if`` on a tensor), so a GPU runs ahead of Python. Every CHECK_EVERY steps, and at the end
#: of each epoch (so always before a checkpoint is written), the losses of the steps since the last
#: check are read in one transfer, the weights and BatchNorm statistics are checked for NaN and
#: infinity, and the progress bar's running loss is refreshed. A divergence is thus caught at most
#: CHECK_EVERY - 1 steps after it happened, naming the step, its tiles and its loss terms.
CHECK_EVERY = 50


class LossWindow:
    """The loss and its terms of the steps since the last check point, kept on the device.

    :meth:`add` writes one row per step with device-side copies only; :meth:`take` reads the rows
    to the host in one transfer (the check point's wait for the device) and empties the window. The
    steps' numbers and tile ids are host data and stay on the host.
    """

    def __init__(self, size: int, device: torch.device):
        self.size, self.device = size, device
        self.names: list[str] = []  # "loss", then the loss's terms in its order
        self.rows: Optional[torch.Tensor] = None  # (size, len(names)) fp32, on the device
        self.steps: list[tuple[int, list]] = []  # (step, tile ids) of each row in use

    def add(self, loss_out, step: int, ids: list) -> None:
        """Keep ``loss_out``'s total and terms (detached) as the next row; never waits for the device."""
        names = ["loss", *loss_out.terms]
        if self.rows is None:
            self.names = names
            self.rows = torch.empty(self.size, len(names), dtype=torch.float32, device=self.device)
        elif names != self.names:
            raise RuntimeError(f"the loss returned the terms {names[1:]} after {self.names[1:]}")
        values = [loss_out.total.detach(), *loss_out.terms.values()]
        self.rows[len(self.steps)] = torch.stack([v.float() for v in values])
        self.steps.append((step, ids))

    def full(self) -> bool:
        """Every row is in use: time for a check point."""
        return len(self.steps) == self.size

    def take(self) -> tuple[list[list[float]], list[tuple[int, list]]]:
        """The rows in use, on the host (one wait for the device), with their steps and tile ids;
        the window is empty afterwards."""
        rows = self.rows[:len(self.steps)].tolist() if self.steps else []
        steps, self.steps = self.steps, []
        return rows, steps


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of every random stream of ``epoch`` on ``rank`` (python, numpy, torch, CUDA, the
    augmentation and the loader's workers): a function of the three alone, so a run resumed after
    epoch k draws exactly what an uninterrupted one draws, and ranks draw different dropout masks."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**63


def seed_loader_epoch(loader, seed: int, epoch: int, rank: int) -> None:
    """Seed every random stream of ``epoch`` from :func:`epoch_seed` (python, numpy, torch, each
    sample's augmentation, the workers' generators) and the sampler's epoch: what a training epoch
    over ``loader`` draws then depends on (seed, epoch, rank) alone."""
    seed = epoch_seed(seed, epoch, rank)
    seed_everything(seed)
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)  # each sample's augmentation: from (seed, its index), in any worker
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed)  # the workers' global generators (nothing of ours draws from them)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


class SegTrainer:
    """Trains a :class:`TrainStep` and evaluates it after every epoch.

    Args:
        step: network + loss (see :class:`TrainStep`).
        optimizer, scheduler: the scheduler is stepped once per optimisation step.
        train_loader, test_loader: loaders from :func:`utils.dataset.make_loader`.
        metrics: a fresh :class:`model.metrics.SegmentationMetrics` is made by calling this.
        logger: a :class:`utils.loggers.MultiLogger`.
        ctx: this process's place in the launch.
        settings: see :class:`TrainerSettings`.
    """

    def __init__(self, step, optimizer, scheduler, train_loader, test_loader, metrics, logger, ctx: DistContext,
                 settings: TrainerSettings):
        self.step = place(step, ctx.device, settings.channels_last)
        self.ddp = (
            DistributedDataParallel(self.step, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
            if ctx.distributed else self.step
        )
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.test_loader = train_loader, test_loader
        self.make_metrics, self.logger, self.ctx, self.settings = metrics, logger, ctx, settings
        use_scaler = settings.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=use_scaler)
        self.start_epoch, self.best_value, self.best_epoch = 0, None, None
        self.history: list[dict[str, Any]] = []
        self.resumed: Optional[bool] = None  # None until resume_if_possible() ran
        self.plotter = None  # set by the builders: plot(history, epoch, final) -> None

    # ------------------------------------------------------------------ table of contents
    def fit(self) -> dict[str, Any]:
        """Train for the configured epochs (resuming from ``last.pth`` if present); return a summary."""
        self.resume_if_possible()
        for epoch in range(self.start_epoch, self.settings.epochs):
            started = time.perf_counter()
            self.seed_epoch(epoch)
            train_stats = self.train_epoch(epoch)
            trained = time.perf_counter()
            eval_stats = self.evaluate_epoch(epoch)
            record = {**train_stats, **eval_stats, "train_s": trained - started,
                      "time_s": time.perf_counter() - started}
            improved = self.track_best(epoch, eval_stats)
            self.history.append({"epoch": epoch, **record})
            self.save_checkpoint(epoch, improved)  # before the log line: a kill between them is rewound
            self.start_epoch = epoch + 1
            self.logger.log(record, step=epoch)
            stop = self.should_stop(epoch)
            self.plot(epoch, final=stop or epoch == self.settings.epochs - 1)
            if stop:
                break
        return self.summary()

    # ------------------------------------------------------------------ steps
    def seed_epoch(self, epoch: int) -> None:
        """Seed every random stream of ``epoch`` and the sampler's epoch (see :func:`seed_loader_epoch`)."""
        seed_loader_epoch(self.train_loader, self.settings.seed, epoch, self.ctx.rank)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns the mean loss and each term and weight (averaged
        over every rank's batches).

        The steps never wait for the device: their losses stay there until a check point (every
        :data:`CHECK_EVERY` steps and at the end of the epoch, before it is evaluated or saved),
        which reads them, sums them on the host in fp64 and checks the run (:meth:`check_health`).

        Raises:
            TrainingDiverged: see :meth:`check_health`.
        """
        self.ddp.train()
        self.step.loss.set_epoch(epoch)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate of the epoch's first step
        window = LossWindow(CHECK_EVERY, self.ctx.device)
        sums: dict[str, float] = {}
        batches = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False,
                       disable=not (self.ctx.is_main and progress_bars()), dynamic_ncols=True)
        for n, batch in enumerate(batches, start=1):
            step = self.scheduler.last_epoch  # this optimisation step's index in the run
            window.add(self.optimise(batch), step, list(batch.get("id", [])))
            if window.full():
                self.check_health(window, sums, epoch)
                batches.set_postfix(loss=f"{sums['loss'] / n:.4f}")
        self.check_health(window, sums, epoch)
        means = self.all_reduce_means(sums, len(self.train_loader))
        stats = {"lr": lr, "loss": means.get("loss", math.nan)}
        stats |= {f"loss/{k}": v for k, v in means.items() if k != "loss"}
        stats |= {f"weight/{k}": float(v) for k, v in self.step.loss.current_weights().items()}
        return stats

    def optimise(self, batch: dict[str, Any]):
        """Forward, backward and one optimiser step on a batch; returns the loss output.

        Nothing here reads a tensor's value on the host, so Python never waits for the device and a
        GPU stays busy: a non-finite loss or weight is found at the next check point
        (:meth:`check_health`). Under fp16 the GradScaler keeps its own waits (it reads whether the
        gradients are finite to skip a step and adjust its scale); bf16 and fp32 need none.
        """
        with self.autocast():
            _, loss_out = self.ddp(*self.to_device(batch))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss_out.total).backward()
        if self.settings.grad_clip:
            self.scaler.unscale_(self.optimizer)
            trained = [p for p in self.step.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trained, self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss_out

    def check_health(self, window: "LossWindow", sums: dict[str, float], epoch: int) -> None:
        """A check point: stop a diverged run, else add the window's losses to ``sums`` (host, fp64).

        Under DDP every rank calls it at the same steps, and one small all-reduce makes every rank
        stop together when any rank's loss or weights are not finite.

        Raises:
            TrainingDiverged: a loss of a step since the last check point, or now a weight or
                BatchNorm statistic, is NaN or infinite; names the step, its tiles and its loss terms.
        """
        rows, steps = window.take()
        problem = first_non_finite_loss(window.names, rows, steps, epoch)
        if problem is None:
            bad = non_finite(self.step)
            if bad:
                problem = non_finite_weights(bad, window.names, rows, steps, epoch)
        if self.ctx.distributed:
            flag = torch.tensor([problem is not None], dtype=torch.int32, device=self.ctx.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if problem is None and bool(flag):
                problem = f"training diverged on another rank in epoch {epoch} (its message names the step)"
        if problem is not None:
            raise TrainingDiverged(f"{problem}. {self.kept()}. Lower BASE_LR, set GRAD_CLIP, or check these tiles")
        for row in rows:
            for name, value in zip(window.names, row):
                sums[name] = sums.get(name, 0.0) + value

    def evaluate_epoch(self, epoch: int) -> dict[str, float]:
        """The evaluation metrics after ``epoch``.

        Raises:
            TrainingDiverged: the network's outputs are NaN or infinite although its weights are
                finite (they grew until the outputs overflow; the training loss, on BatchNorm's
                batch statistics, may stay finite meanwhile). Nothing of this epoch is saved.
        """
        try:
            return self.evaluate().compute()
        except NonFiniteOutput as err:
            largest = largest_weight(self.step.net)
            cause = (f"the outputs overflowed: the largest weight has grown to {largest:.3g}" if math.isfinite(largest)
                     else f"a weight is {largest}")
            fixes = "Lower BASE_LR or set GRAD_CLIP" + {
                None: "", torch.bfloat16: ", or set MIXED_PRECISION=none",
                torch.float16: ", or set MIXED_PRECISION=bf16 or none (fp16 overflows above 65504)",
            }[self.settings.amp_dtype]
            raise TrainingDiverged(f"training diverged in epoch {epoch}: {err}; {cause}. {self.kept()}. {fixes}") from None

    def kept(self) -> str:
        """What a stopped run leaves: the last checkpoint, as it was, or none."""
        last = self.settings.run.last
        return f"{last} is left as it was" if last.is_file() else "no checkpoint was written"

    def evaluate(self, loader=None):
        """Run the test split (this rank's shard) through the network; returns the metrics object,
        whose ``compute()`` all-reduces over ranks."""
        return evaluate_model(self.step.net, loader or self.test_loader, self.make_metrics(), self.ctx.device,
                              self.autocast, self.settings.channels_last)

    def track_best(self, epoch: int, eval_stats: dict[str, float]) -> bool:
        """Remember the best epoch by the evaluation metric; True when this epoch is the new best
        (a NaN or infinite value is never the best)."""
        value = eval_stats.get(self.settings.eval_metric, math.nan)
        if not math.isfinite(value):
            if self.ctx.is_main:
                tqdm.write(f"warning: epoch {epoch}: {self.settings.eval_metric} is {value}; "
                           "this epoch cannot be the best")
            return False
        better = self.best_value is None or (
            value > self.best_value if HIGHER_IS_BETTER[self.settings.eval_metric] else value < self.best_value
        )
        if better:
            self.best_value, self.best_epoch = value, epoch
        return better

    def should_stop(self, epoch: int) -> bool:
        """EARLY_STOPPING: True when the best epoch is that many epochs behind ``epoch``."""
        patience = self.settings.early_stopping
        if not patience or epoch - (self.best_epoch if self.best_epoch is not None else -1) < patience:
            return False
        if self.ctx.is_main:
            tqdm.write(f"early stopping after epoch {epoch}: {self.settings.eval_metric} has not improved for "
                       f"{patience} epoch(s) (best: epoch {self.best_epoch})")
        return True

    def save_checkpoint(self, epoch: int, improved: bool) -> None:
        """``last.pth`` every epoch and ``best.pth`` on improvement, written atomically (main rank).

        Raises:
            WriteError: a file cannot be written (a full disk…); the one it replaces is left as it was.
        """
        if not self.ctx.is_main:
            return
        state = dict(
            epoch=epoch, net=self.step.net, loss=self.step.loss, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler,
            best={"metric": self.settings.eval_metric, "value": self.best_value, "epoch": self.best_epoch},
            history=self.history, config=self.settings.config, fold=self.settings.fold, split=self.settings.split,
            head_trained=self.settings.head_trained,
        )
        if improved and self.settings.save_best:  # best first: last.pth never records a best.pth not yet written
            with writing(self.settings.run.best):
                save_checkpoint(self.settings.run.best, **state)
        with writing(self.settings.run.last):
            save_checkpoint(self.settings.run.last, **state)

    def resume_if_possible(self) -> bool:
        """Continue from ``last.pth`` in the run folder, if one exists (once; later calls do nothing).
        Leftovers of an interrupted write are removed and the log is rewound to the checkpoint.

        Returns:
            True when training resumes from a checkpoint.

        Raises:
            CheckpointError: an unreadable checkpoint, or a TRAIN_EPOCHS below its epochs.
        """
        if self.resumed is not None:
            return self.resumed
        run = self.settings.run
        leftovers = clean_leftovers(run) if self.ctx.is_main else []
        path = run.last
        if not path.is_file():
            self.resumed = False
            if self.ctx.is_main and (leftovers or (run.log.is_file() and run.log.stat().st_size)):
                tqdm.write(f"no finished checkpoint in {run.root} (removed {leftovers or 'nothing'}): "
                           "starting again from epoch 0")
            self.logger.rewind([])
            return False
        state = restore_training(path, net=self.step.net, loss=self.step.loss, optimizer=self.optimizer,
                                 scheduler=self.scheduler, scaler=self.scaler, device=self.ctx.device)
        if state["epoch"] + 1 > self.settings.epochs:
            raise CheckpointError(
                f"{path} has trained {state['epoch'] + 1} epochs, more than the {self.settings.epochs} "
                "(WARMUP_EPOCHS + TRAIN_EPOCHS) asked for; resuming cannot shorten a run: raise TRAIN_EPOCHS "
                "to extend it, or start a new run (another RUN_ID)")
        self.start_epoch = state["epoch"] + 1
        self.best_value, self.best_epoch = state["best"]["value"], state["best"]["epoch"]
        self.history = state.get("history", [])
        self.logger.rewind(self.history)
        self.resumed = True
        if self.ctx.is_main:
            tqdm.write(f"resuming {self.settings.run.root} after epoch {state['epoch']}")
        return True

    def plot(self, epoch: int, final: bool) -> None:
        """The training curves and prediction overlays (main rank; every ``plot_every`` epochs and at the end)."""
        if self.plotter is None or not self.ctx.is_main:
            return
        every = self.settings.plot_every
        if final or (every and (epoch + 1) % every == 0):
            with writing(self.settings.run.root):
                self.plotter(self.history, epoch)

    def summary(self) -> dict[str, Any]:
        """The final and the best epoch's metrics (``engines.train`` adds the whole-image evaluation
        and writes ``summary.json``)."""
        return {
            "eval_metric": self.settings.eval_metric,
            "best_epoch": self.best_epoch,
            "best": next((h for h in self.history if h["epoch"] == self.best_epoch), None),
            "final": self.history[-1] if self.history else None,
        }

    # ------------------------------------------------------------------ helpers
    def all_reduce_means(self, sums: dict[str, float], batches: int) -> dict[str, float]:
        """Per-batch means of ``sums`` over every rank's batches (a collective call under DDP)."""
        if not self.ctx.distributed:
            return {k: v / max(batches, 1) for k, v in sums.items()}
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys] + [float(batches)], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(totals)
        count = max(float(totals[-1]), 1.0)
        return {k: float(v) / count for k, v in zip(keys, totals[:-1].tolist())}

    def to_device(self, batch: dict[str, Any]):
        dev = self.ctx.device
        image = image_to(batch["image"], dev, self.settings.channels_last)
        sdm = batch["sdm"].to(dev, non_blocking=True) if "sdm" in batch else None
        return (image, *(batch[k].to(dev, non_blocking=True) for k in ("mask", "label", "fill")), sdm)

    def autocast(self):
        return autocast_for(self.ctx.device, self.settings.amp_dtype)


def first_non_finite_loss(names: list[str], rows: list[list[float]], steps: list, epoch: int) -> Optional[str]:
    """The first step of ``rows`` (see :class:`LossWindow`) whose loss or a term is not finite,
    described (:func:`describe_step`); None when every one is finite."""
    for row, (step, ids) in zip(rows, steps):
        if not all(map(math.isfinite, row)):
            return describe_step(f"the loss became {row[0]}", names, row, step, ids, epoch)
    return None


def non_finite_weights(bad: list[str], names: list[str], rows: list[list[float]], steps: list, epoch: int) -> str:
    """Non-finite tensors ``bad`` found at a check point, described with the steps since the last
    check point and the one of them with the largest loss (the likeliest culprit)."""
    what = f"{len(bad)} tensor(s) are not finite ({', '.join(bad[:4])}{', …' if len(bad) > 4 else ''})"
    if not rows:
        return f"training diverged in epoch {epoch}: {what}"
    worst = max(range(len(rows)), key=lambda i: rows[i][0])
    what = (f"after the optimiser steps {steps[0][0]}..{steps[-1][0]} {what} (checked every {CHECK_EVERY} "
            f"steps); step {steps[worst][0]} had the largest loss of those")
    return describe_step(what, names, rows[worst], *steps[worst], epoch)


def describe_step(what: str, names: list[str], row: list[float], step: int, ids: list, epoch: int) -> str:
    """``training diverged at step …``: ``what``, then the step's loss, its terms and its tiles."""
    terms = dict(zip(names[1:], row[1:]))
    return (f"training diverged at step {step} (epoch {epoch}): {what}; loss {row[0]:.4g}, terms {terms}; "
            f"tiles {ids}")


def largest_weight(module: nn.Module) -> float:
    """The largest magnitude among ``module``'s floating-point parameters (inf or NaN if one is)."""
    params = [p.detach() for p in module.parameters() if p.is_floating_point()]
    return float(torch.stack(torch._foreach_norm(params, float("inf"))).max()) if params else 0.0


def clean_leftovers(run: RunDir) -> list[str]:
    """Remove the temporary files of a checkpoint (or other) write that a kill interrupted; returns their names."""
    found = sorted(p for p in run.root.glob(".*.tmp") if p.is_file())
    for p in found:
        p.unlink(missing_ok=True)
    return [p.name for p in found]
