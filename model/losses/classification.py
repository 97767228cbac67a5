"""The tile heads' loss: the boundary classifier's BCE / CE, plus the fill head's CE."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.tiling import NO_FILL


class ClassificationLoss(nn.Module):
    """The tile heads' loss: the boundary classifier's BCE for one output (sigmoid) or CE for two or
    more (softmax), plus, when fill logits are given, the fill head's CE over the tiles without a
    boundary (their one class; tiles with a boundary carry :data:`NO_FILL` and are ignored).

    Args:
        num_classes: CLS_CLASSES >= 1.

    Shape:
        cls_logits: (B, J), or (B,) for J = 1; cls_target: (B,) class indices (or (B, 1) for J = 1);
        fill_logits: (B, F); fill_target: (B,) class indices or NO_FILL. Returns a scalar, fp32.

    Raises:
        ValueError: on shapes or class indices that do not fit.
    """

    name = "CLS"

    def __init__(self, num_classes: int):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"cls_classes={num_classes!r} must be an int >= 1")
        self.num_classes = num_classes
        self.check_targets = True  # False: trust cls_target's class indices (see CombinedLoss.trust_targets)

    def forward(self, cls_logits: Tensor, cls_target: Tensor, fill_logits: Optional[Tensor] = None,
                fill_target: Optional[Tensor] = None) -> Tensor:
        boundary = self.boundary_loss(cls_logits, cls_target)
        if fill_logits is None:
            return boundary
        if fill_target is None or fill_target.shape != fill_logits.shape[:1]:
            raise ValueError(f"CLS: fill_logits {tuple(fill_logits.shape)} need a fill_target of shape "
                             f"({fill_logits.shape[0]},), got {None if fill_target is None else tuple(fill_target.shape)}")
        with torch.autocast(fill_logits.device.type, enabled=False):
            x, t = fill_logits.float(), fill_target.long()
            # sum / count rather than mean: a batch whose tiles all have a boundary adds 0 (with a graph).
            fill = F.cross_entropy(x, t, ignore_index=NO_FILL, reduction="sum") / (t != NO_FILL).sum().clamp_min(1)
        return boundary + fill

    def boundary_loss(self, cls_logits: Tensor, cls_target: Tensor) -> Tensor:
        """The boundary classifier's BCE / CE alone."""
        if not isinstance(cls_logits, Tensor) or not isinstance(cls_target, Tensor):
            raise ValueError("CLS: cls_logits and cls_target must both be tensors")
        x = cls_logits.float()
        j = self.num_classes
        if j == 1 and x.dim() == 2 and x.shape[1] == 1:
            x = x[:, 0]
        t = cls_target.reshape(-1) if (j == 1 and cls_target.dim() == 2) else cls_target
        want = (t.shape[0],) if j == 1 else (t.shape[0], j)
        if tuple(x.shape) != want or t.dim() != 1:
            raise ValueError(
                f"CLS: cls_logits {tuple(cls_logits.shape)} and cls_target {tuple(cls_target.shape)} do not fit "
                f"CLS_CLASSES={j}: expected logits (B, {j}) and a target (B,)"
            )
        n = max(j, 2)
        if self.check_targets and t.numel() and bool(((t < 0) | (t >= n) | (t != t.round())).any()):
            raise ValueError(f"CLS: cls_target must hold class indices 0..{n - 1}")
        with torch.autocast(x.device.type, enabled=False):
            if j == 1:
                return F.binary_cross_entropy_with_logits(x, t.float())
            return F.cross_entropy(x, t.long())
