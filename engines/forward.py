"""The forward pass that training, evaluation and prediction share: batches to the device in the
chosen memory format, autocast in the chosen precision, and the evaluation loop."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from model.AuxNet import AuxNet


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
    beside the head being trained."""
    net.eval()
    for batch in loader:
        with autocast():
            out = net(image_to(batch["image"], device, channels_last))
        has_cls = out.cls is not None
        metrics.update(
            out.seg.float(), batch["mask"].to(device),
            out.cls.float() if has_cls else None, batch["label"].to(device) if has_cls else None,
            ids=list(batch["id"]),
        )
    return metrics
