"""The loss interface (:class:`SegLoss`), the options every term is built from (:class:`LossOptions`),
the checks of a loss's inputs, and the tensor helpers that several losses share.

Nothing here knows a loss by name: each loss module defines its classes on top of :class:`SegLoss`
and :mod:`model.losses.registry` lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.sdf import label_masks

SMOOTH = 1e-5
"""Additive smoothing of the region losses' numerator and denominator (as MONAI's ``smooth_nr`` and
``smooth_dr``): keeps a class that is absent from both target and prediction at loss 0 instead of
0/0, and is negligible against pixel counts otherwise."""

HEADS = ("binary", "multiclass")


# ---------------------------------------------------------------------------------------------
# the options


@dataclass(frozen=True)
class LossOptions:
    """Every option a loss term or the combination may take (the config's loss section).

    Each loss class reads the fields it needs in its :meth:`SegLoss.from_options`.

    Attributes:
        seg_classes: SEG_CLASSES (1 = binary sigmoid head).
        cls_classes: CLS_CLASSES; 0 = no classifier term, else a term ``CLS`` (BCE for 1, CE for >= 2).
        weighting: ``"static"``, ``"adaptive"`` (learnable) or ``"schedule"`` (see :class:`CombinedLoss`).
        static_weights: one weight per LOSS term, in order (None = all 1); ``static`` and ``schedule``.
        cls_weight: fixed weight of ``CLS`` under ``static`` and ``schedule`` (``adaptive`` learns it and
            ignores this one).
        include_background: INCLUDE_BACKGROUND, for SoftDICE, HardDICE, IoU, GDL.
        batch_dice: BATCH_DICE, for SoftDICE, HardDICE, IoU, GDL: one ratio per class over the whole
            batch (True) or one per image and class, averaged (False).
        sdm_distance, sdm_normalization, sdm_kernel_size: distance maps of MAE, cMAE, sMAE and
            Boundary (kernel: the ``conv`` SDM of MAE, cMAE, sMAE; wBCE uses ``sdm_distance`` only).
        clamp_delta: cMAE's δ.
        sigmoid_steepness: slope of HardDICE's and sMAE's sigmoids.
        seg_threshold: HardDICE's threshold (binary head).
        wce_w0, wce_sigma: wCE's U-Net weight map.
        wbce_w0, wbce_sigma: wBCE's boundary weight.
        focal_gamma, focal_alpha: Focal's γ and α.
        schedule_alpha: the ``schedule`` α: (start, step per epoch, maximum).
        cldice_iterations: clDice's soft-skeleton erosions.
    """

    seg_classes: int = 1
    cls_classes: int = 0
    weighting: str = "static"
    static_weights: Optional[list[float]] = None
    cls_weight: float = 0.1
    include_background: bool = False
    batch_dice: bool = True
    sdm_distance: str = "euclidean"
    sdm_normalization: Optional[str] = "static_max"
    sdm_kernel_size: int = 3
    clamp_delta: float = 0.1
    sigmoid_steepness: float = 10.0
    seg_threshold: float = 0.5
    wce_w0: float = 10.0
    wce_sigma: float = 5.0
    wbce_w0: float = 10.0
    wbce_sigma: float = 5.0
    focal_gamma: float = 2.0
    focal_alpha: Optional[float] = None
    schedule_alpha: tuple[float, float, float] = (0.01, 0.01, 0.9)
    cldice_iterations: int = 10


# ---------------------------------------------------------------------------------------------
# input checks


def check_seg_inputs(seg_logits: Tensor, target: Tensor, who: str, values: bool = True) -> None:
    """Raise a ValueError naming ``who`` unless logits and target fit the loss interface;
    ``values=False`` trusts the target's class indices (their check waits for the device)."""
    if not isinstance(seg_logits, Tensor) or seg_logits.dim() != 4 or not seg_logits.is_floating_point():
        got = tuple(seg_logits.shape) if isinstance(seg_logits, Tensor) else type(seg_logits).__name__
        raise ValueError(f"{who}: seg_logits must be a float (B, K, H, W) tensor of raw logits, got {got}")
    if not isinstance(target, Tensor) or target.dim() != 3:
        got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"{who}: target must be a (B, H, W) tensor of class indices, got {got}")
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"{who}: target must hold integer class indices, got dtype {target.dtype}")
    b, k, h, w = seg_logits.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(
            f"{who}: target shape {tuple(target.shape)} does not match seg_logits {tuple(seg_logits.shape)}; "
            f"expected ({b}, {h}, {w})"
        )
    n = max(k, 2)
    # One device sync per call: an out-of-range index would otherwise surface as a device-side
    # assert on CUDA (or silently wrong one-hot maps).
    if values and target.numel() and bool(((target < 0) | (target >= n)).any()):
        raise ValueError(
            f"{who}: target holds class indices in [{int(target.min())}, {int(target.max())}] but a head "
            f"with K={k} output channel(s) has classes 0..{n - 1}"
        )


def check_target_sdm(seg_logits: Tensor, target_sdm: Optional[Tensor], who: str) -> None:
    """Raise a ValueError naming ``who`` unless ``target_sdm`` is None or one float map per
    foreground class of every tile: (B, 1, H, W) for a binary head, (B, K - 1, H, W) otherwise."""
    if target_sdm is None:
        return
    b, k, h, w = seg_logits.shape
    expected = (b, 1 if k == 1 else k - 1, h, w)
    if not isinstance(target_sdm, Tensor) or not target_sdm.is_floating_point() or tuple(target_sdm.shape) != expected:
        got = (f"{tuple(target_sdm.shape)} {target_sdm.dtype}" if isinstance(target_sdm, Tensor)
               else type(target_sdm).__name__)
        raise ValueError(f"{who}: target_sdm must be a float {expected} tensor (one map per foreground class), got {got}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name}={value!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")


def head_of(k: int) -> str:
    """The head that ``k`` output channels make: ``"binary"`` for one, ``"multiclass"`` otherwise."""
    return "binary" if k == 1 else "multiclass"


# ---------------------------------------------------------------------------------------------
# tensor helpers shared by the losses


def class_probabilities(seg_logits: Tensor) -> Tensor:
    """Sigmoid (K = 1) or softmax (K >= 2) probabilities in fp32, shape (B, K, H, W)."""
    x = seg_logits.float()
    return torch.sigmoid(x) if x.shape[1] == 1 else torch.softmax(x, dim=1)


def one_hot(target: Tensor, k: int) -> Tensor:
    """fp32 (B, K, H, W) indicator of ``target``; for K = 1 the single foreground channel."""
    if k == 1:
        return target.unsqueeze(1).float()
    return label_masks(target.long(), range(k)).float()


def region_channels(x: Tensor, include_background: bool) -> Tensor:
    """The class channels the region losses score.

    Multi-class: all K channels with the background, else channels 1..K-1. Binary (one channel,
    the foreground): with the background the complement ``1 - x`` is prepended, so the binary head
    scores both classes as a 2-channel softmax head would.
    """
    if x.shape[1] == 1:
        return torch.cat([1 - x, x], dim=1) if include_background else x
    return x if include_background else x[:, 1:]


def foreground_channels(x: Tensor) -> Tensor:
    """Foreground channels: the single channel of a binary head, channels 1..K-1 otherwise."""
    return x if x.shape[1] == 1 else x[:, 1:]


def pixel_nll(seg_logits: Tensor, target: Tensor) -> Tensor:
    """Per-pixel negative log-likelihood of the target class, fp32, shape (B, H, W)."""
    x = seg_logits.float()
    if x.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(x[:, 0], target.float(), reduction="none")
    return F.cross_entropy(x, target.long(), reduction="none")


def dice_terms(p: Tensor, y: Tensor, batch: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Intersection, prediction volume and target volume: per class summed over the batch and the
    pixels, shape (C,) (``batch``), or per image and class summed over the pixels, shape (B, C)."""
    dims = (0, 2, 3) if batch else (2, 3)
    return (p * y).sum(dims), p.sum(dims), y.sum(dims)


def has_boundary(y: Tensor) -> Tensor:
    """(B, C) bool: the (B, C, H, W) binary map has both foreground and background pixels."""
    yb = y.bool().flatten(2)
    return yb.any(-1) & ~yb.all(-1)


# ---------------------------------------------------------------------------------------------
# the loss interface


class SegLoss(nn.Module):
    """Base of all segmentation losses: ``loss(seg_logits, target) -> scalar``.

    Subclasses implement :meth:`compute` and, when they take options, :meth:`from_options`;
    :meth:`forward` validates the inputs and runs :meth:`compute` in fp32 with autocast off. Class
    attributes tell the builder and the config validator what a loss supports.

    Attributes:
        name: the name in ``LOSS``.
        heads: the heads the loss supports, a subset of ``("binary", "multiclass")``.
        schedule_group: ``"region"`` or ``"boundary"``: which weight the ``schedule`` mode gives it.
        can_be_negative: True if the value can drop below zero (not allowed under adaptive weights).
        takes_scene_sdm: :meth:`compute` accepts ``target_sdm``, the target's distance maps
            measured over the whole image (SDM_SCOPE=image), instead of computing them per tile.
    """

    name: str = ""
    heads: tuple[str, ...] = HEADS
    schedule_group: str = "region"
    can_be_negative: bool = False
    takes_scene_sdm: bool = False

    @classmethod
    def from_options(cls, o: LossOptions) -> SegLoss:
        """The term as ``LOSS`` builds it from the options (a loss without options: its defaults).

        Raises:
            ValueError: naming the first out-of-range option the constructor finds.
        """
        return cls()

    @classmethod
    def head_hint(cls) -> str:
        """The fix to suggest when a head is not supported (see :meth:`check_head`)."""
        return f"it supports {' and '.join(cls.heads)} heads"

    def forward(self, seg_logits: Tensor, target: Tensor, target_sdm: Optional[Tensor] = None) -> Tensor:
        """Validated, fp32 loss value.

        Args:
            seg_logits: raw logits.
            target: class indices.
            target_sdm: whole-image distance maps of the foreground classes cut to the tile
                (pixels), used by the terms that take them (:attr:`takes_scene_sdm`), or None.

        Shape:
            seg_logits: (B, K, H, W); target: (B, H, W); target_sdm: (B, C, H, W), C = 1 for a
            binary head, K - 1 otherwise. Returns a scalar.

        Raises:
            ValueError: on shapes, dtypes or class indices that do not fit, or a head (K) that the
                loss does not support.
        """
        check_seg_inputs(seg_logits, target, self.name)
        self.check_head(seg_logits.shape[1])
        check_target_sdm(seg_logits, target_sdm, self.name)
        with torch.autocast(seg_logits.device.type, enabled=False):
            return self.scored(seg_logits, target, target_sdm)

    def scored(self, seg_logits: Tensor, target: Tensor, target_sdm: Optional[Tensor]) -> Tensor:
        """:meth:`compute`, given ``target_sdm`` when this term takes it."""
        if self.takes_scene_sdm and target_sdm is not None:
            return self.compute(seg_logits, target, target_sdm)
        return self.compute(seg_logits, target)

    def check_head(self, k: int) -> None:
        """Raise a ValueError if a head with ``k`` output channels is not supported."""
        if head_of(k) not in self.heads:
            raise ValueError(f"{self.name} does not support a {head_of(k)} head (K={k}): {self.head_hint()}")

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        """The loss on already validated inputs; autocast is off when this runs."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute()")
