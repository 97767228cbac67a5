"""The forward pass that training, evaluation and prediction share: batches to the device in the
chosen memory format, autocast in the chosen precision, and the evaluation loop."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from model.AuxNet import AuxNet, AuxNetOutput
from utils.util import RunError


class NonFiniteOutput(RunError):
    """The network produced NaN or infinite outputs (NaN weights, or weights so large that the
    outputs overflow). The message names what was being computed, never a cause it cannot know:
    the caller, which knows where the weights came from (a training run, MODEL_WEIGHTS), words the fix."""


def place(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``module`` on ``device``, its parameters in the channels_last memory format when asked."""
    module = module.to(device)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def image_to(image: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch of images on ``device``, in the channels_last memory format when asked."""
    image = image.to(device, non_blocking=True)
    return image.contiguous(memory_format=torch.channels_last) if channels_last else image


def autocast_for(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast in ``dtype`` on ``device``'s type, or a no-op context when ``dtype`` is None."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate_model(net: AuxNet, loader, metrics, device: torch.device, autocast, channels_last: bool):
    """Feed every batch of ``loader`` through ``net`` (eval mode) into ``metrics``; return ``metrics``.

    Evaluation always decodes: under MODEL=AuxNet-C the frozen decoder's segmentation is scored
    beside the head being trained. Under DDP every rank must call it (the check below is collective).

    Raises:
        NonFiniteOutput: an output of some batch (on any rank) is NaN or infinite: scores of such
            outputs (DSC 0, ACC = the background's share) would pass for a poor but real result.
    """
    net.eval()
    # batches with a non-finite output: one reduction per batch, kept on the device and read once
    # at the end, so evaluation never waits for the device batch by batch
    bad = torch.zeros((), dtype=torch.int64, device=device)
    batches = 0
    for batch in loader:
        with autocast():
            out = net(image_to(batch["image"], device, channels_last))
        bad += ~all_finite(out)
        batches += 1
        has_cls = out.cls is not None
        metrics.update(
            out.seg.float(), batch["mask"].to(device),
            out.cls.float() if has_cls else None, batch["label"].to(device) if has_cls else None,
            ids=list(batch["id"]),
        )
    counts = torch.stack([bad, torch.tensor(batches, device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)  # every rank learns of it, and raises with the others
    bad, batches = counts.tolist()
    if bad:
        raise NonFiniteOutput(f"the network's outputs are NaN or infinite in {bad} of {batches} evaluation batch(es)")
    return metrics


def all_finite(out: AuxNetOutput) -> torch.Tensor:
    """A 0-dim bool tensor on the outputs' device: every output of ``out`` is finite (no synchronisation)."""
    finite = torch.isfinite(out.seg).all()
    for extra in (out.cls, out.fill):
        if extra is not None:
            finite &= torch.isfinite(extra).all()
    return finite


def non_finite(module: nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers (BatchNorm statistics) that hold a
    NaN or an infinity. One synchronisation: the max-norm of a finite tensor is always finite."""
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    if not named:
        return []
    norms = torch.stack(torch._foreach_norm([t.detach() for _, t in named], float("inf")))
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return []
    return [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
