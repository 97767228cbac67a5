"""The training / evaluation loop. ``fit()`` reads like a table of contents; construction lives in
:mod:`engines.builders`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from engines.checkpoint import restore_training, save_checkpoint
from engines.forward import autocast_for, evaluate_model, image_to, place
from engines.run_dir import RunDir
from model.AuxNet import AuxNet, AuxNetOutput
from model.metrics import HIGHER_IS_BETTER
from utils.util import DistContext, atomic_write_json


class TrainStep(nn.Module):
    """Network and loss in one module, so DDP (and the optimiser) see the learnable loss weights.

    ``forward`` returns the network's output and the loss; ``decode=False`` skips the decoder when
    only the classifier trains.
    """

    def __init__(self, net: AuxNet, loss: nn.Module, decode: bool, use_cls: bool):
        super().__init__()
        self.net, self.loss, self.decode, self.use_cls = net, loss, decode, use_cls

    def forward(self, image: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, fill: torch.Tensor):
        out: AuxNetOutput = self.net(image, decode=self.decode)
        if not self.use_cls:
            return out, self.loss(out.seg, mask)
        return out, self.loss(out.seg, mask, out.cls, label, out.fill, fill)


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
        self.make_metrics, self.logger, self.ctx, self.s = metrics, logger, ctx, settings
        use_scaler = settings.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=use_scaler)
        self.start_epoch, self.best_value, self.best_epoch = 0, None, None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ table of contents
    def fit(self) -> dict[str, Any]:
        """Train for the configured epochs (resuming from ``last.pth`` if present); return a summary."""
        self.resume_if_possible()
        for epoch in range(self.start_epoch, self.s.epochs):
            started = time.perf_counter()
            train_stats = self.train_epoch(epoch)
            eval_stats = self.evaluate().compute()
            record = {**train_stats, **eval_stats, "time_s": time.perf_counter() - started}
            improved = self.track_best(epoch, eval_stats)
            self.logger.log(record, step=epoch)
            self.history.append({"epoch": epoch, **record})
            self.save_checkpoint(epoch, improved)
        return self.summary()

    # ------------------------------------------------------------------ steps
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns the mean loss and each term and weight."""
        self.ddp.train()
        self.step.loss.set_epoch(epoch)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate of the epoch's first step
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        batches = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False, disable=not self.ctx.is_main,
                       dynamic_ncols=True)
        for n, batch in enumerate(batches, start=1):
            loss_out = self.optimise(batch)
            for name, value in {"loss": loss_out.total.detach(), **loss_out.terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            weights = loss_out.weights
            batches.set_postfix(loss=f"{sums['loss'] / n:.4f}")
        n = max(len(self.train_loader), 1)
        stats = {"lr": lr, "loss": sums.get("loss", math.nan) / n}
        stats |= {f"loss/{k}": v / n for k, v in sums.items() if k != "loss"}
        stats |= {f"weight/{k}": float(v) for k, v in weights.items()}
        return stats

    def optimise(self, batch: dict[str, Any]):
        """Forward, backward and one optimiser step on a batch; returns the loss output."""
        with self.autocast():
            _, loss_out = self.ddp(*self.to_device(batch))
        if not torch.isfinite(loss_out.total):
            raise FloatingPointError(
                f"the loss became {float(loss_out.total)} (terms: "
                f"{ {k: float(v) for k, v in loss_out.terms.items()} }): lower BASE_LR or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss_out.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss_out

    def evaluate(self, loader=None):
        """Run the test split (this rank's shard) through the network; returns the metrics object,
        whose ``compute()`` all-reduces over ranks."""
        return evaluate_model(self.step.net, loader or self.test_loader, self.make_metrics(), self.ctx.device,
                              self.autocast, self.s.channels_last)

    def track_best(self, epoch: int, eval_stats: dict[str, float]) -> bool:
        """Remember the best epoch by the evaluation metric; True when this epoch is the new best."""
        value = eval_stats.get(self.s.eval_metric, math.nan)
        if not math.isfinite(value):
            return False
        better = self.best_value is None or (
            value > self.best_value if HIGHER_IS_BETTER[self.s.eval_metric] else value < self.best_value
        )
        if better:
            self.best_value, self.best_epoch = value, epoch
        return better

    def save_checkpoint(self, epoch: int, improved: bool) -> None:
        """``last.pth`` every epoch and ``best.pth`` on improvement, written atomically (main rank)."""
        if not self.ctx.is_main:
            return
        state = dict(
            epoch=epoch, net=self.step.net, loss=self.step.loss, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler,
            best={"metric": self.s.eval_metric, "value": self.best_value, "epoch": self.best_epoch},
            history=self.history, config=self.s.config, fold=self.s.fold,
        )
        if improved and self.s.save_best:  # best first: last.pth never records a best.pth not yet written
            save_checkpoint(self.s.run.best, **state)
        save_checkpoint(self.s.run.last, **state)

    def resume_if_possible(self) -> None:
        """Continue from ``last.pth`` in the run folder, if one exists."""
        path = self.s.run.last
        if not path.is_file():
            return
        state = restore_training(path, net=self.step.net, loss=self.step.loss, optimizer=self.optimizer,
                                 scheduler=self.scheduler, scaler=self.scaler, device=self.ctx.device)
        self.start_epoch = state["epoch"] + 1
        self.best_value, self.best_epoch = state["best"]["value"], state["best"]["epoch"]
        self.history = state.get("history", [])
        if self.ctx.is_main:
            tqdm.write(f"resuming {self.s.run.root} after epoch {state['epoch']}")

    def summary(self) -> dict[str, Any]:
        """Final and best epochs' metrics, written to ``summary.json`` (main rank)."""
        summary = {
            "eval_metric": self.s.eval_metric,
            "best_epoch": self.best_epoch,
            "best": next((h for h in self.history if h["epoch"] == self.best_epoch), None),
            "final": self.history[-1] if self.history else None,
        }
        if self.ctx.is_main:
            atomic_write_json(self.s.run.summary, summary)
        return summary

    # ------------------------------------------------------------------ helpers
    def to_device(self, batch: dict[str, Any]):
        dev = self.ctx.device
        image = image_to(batch["image"], dev, self.s.channels_last)
        return (image, *(batch[k].to(dev, non_blocking=True) for k in ("mask", "label", "fill")))

    def autocast(self):
        return autocast_for(self.ctx.device, self.s.amp_dtype)

