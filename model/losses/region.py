"""Region losses: overlap of the predicted and target masks per class, over the whole batch or per
image (soft and near-hard Dice, Jaccard, generalised Dice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.losses.base import (
    SMOOTH, LossOptions, SegLoss, check_positive, class_probabilities, dice_terms, one_hot, region_channels,
)


class RegionLoss(SegLoss):
    """Shared arguments of the region losses: which classes are scored, and over what.

    Args:
        include_background: INCLUDE_BACKGROUND.
        batch_dice: BATCH_DICE. True: one ratio per class with its sums over the whole batch (a
            "batch Dice": a tile without a class leaves the ratio defined, and a few false pixels
            there weigh as little as in any tile). False: one ratio per image and class, averaged
            (MONAI's ``DiceLoss`` default): in a tile without the class, any predicted pixel of it
            drives that image's ratio towards 0, so false detections in empty tiles cost the most.
    """

    def __init__(self, include_background: bool = False, batch_dice: bool = True):
        super().__init__()
        self.include_background = bool(include_background)
        self.batch_dice = bool(batch_dice)

    @classmethod
    def from_options(cls, o: LossOptions) -> RegionLoss:
        return cls(include_background=o.include_background, batch_dice=o.batch_dice)

    def terms(self, probabilities: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`dice_terms` of the scored classes: (C,) sums, or (B, C) without ``batch_dice``."""
        p = region_channels(probabilities, self.include_background)
        y = region_channels(one_hot(target, num_classes), self.include_background)
        return dice_terms(p, y, self.batch_dice)


class SoftDiceLoss(RegionLoss):
    """1 - soft Dice on probabilities, averaged over classes (and images).

    ``Dice_c = (2 Σ p_c y_c + s) / (Σ p_c + Σ y_c + s)``, ``L = 1 - mean_c Dice_c``, sums over the
    batch and all pixels (``batch_dice``; a tile without foreground does not make the ratio
    undefined) or over each image's pixels, then ``L = 1 - mean_{b,c} Dice_{b,c}``; ``s`` =
    :data:`SMOOTH`. Classes: 1..K-1, or all with ``include_background`` (for a binary head the
    background is ``1 - p``).

    Args: as :class:`RegionLoss`.
    """

    name = "SoftDICE"

    def probabilities(self, seg_logits: Tensor) -> Tensor:
        return class_probabilities(seg_logits)

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        inter, p_sum, y_sum = self.terms(self.probabilities(seg_logits), target, seg_logits.shape[1])
        return 1 - ((2 * inter + SMOOTH) / (p_sum + y_sum + SMOOTH)).mean()


class HardDiceLoss(SoftDiceLoss):
    """1 - Dice of the thresholded (binary) or argmax (multi-class) prediction, kept differentiable.

    The hard decision is replaced by a steep sigmoid of slope ``k`` = SIGMOID_STEEPNESS:

    * binary: ``h(x) = σ(k · (p(x) - t))`` with ``p`` the foreground probability and ``t`` =
      SEG_THRESHOLD (``p > t`` in the limit k → ∞);
    * multi-class: ``h_c(x) = σ(k · (p_c(x) - max_{j≠c} p_j(x)))``, which tends to the one-hot
      argmax.

    ``h`` then enters the soft Dice of :class:`SoftDiceLoss`. With probabilities in [0, 1] the
    sigmoid's argument lies in [-k, k]: k = 10 gives 0.9933 for a confident pixel, so a perfect
    prediction scores ``σ(-k(1-t))`` rather than 0; a larger k is closer to the hard Dice but passes
    gradients only near the decision boundary.

    Args:
        include_background, batch_dice: as :class:`RegionLoss`.
        steepness: k > 0.
        threshold: t in (0, 1), binary heads only.
    """

    name = "HardDICE"

    def __init__(self, include_background: bool = False, steepness: float = 10.0, threshold: float = 0.5,
                 batch_dice: bool = True):
        super().__init__(include_background, batch_dice)
        check_positive("sigmoid_steepness", steepness)
        if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
            raise ValueError(f"seg_threshold={threshold!r} must be a number in (0, 1)")
        self.steepness, self.threshold = float(steepness), float(threshold)

    @classmethod
    def from_options(cls, o: LossOptions) -> HardDiceLoss:
        return cls(include_background=o.include_background, steepness=o.sigmoid_steepness, threshold=o.seg_threshold,
                   batch_dice=o.batch_dice)

    def probabilities(self, seg_logits: Tensor) -> Tensor:
        p = class_probabilities(seg_logits)
        if p.shape[1] == 1:
            return torch.sigmoid(self.steepness * (p - self.threshold))
        top2 = torch.topk(p, 2, dim=1)
        is_max = F.one_hot(top2.indices[:, 0], p.shape[1]).permute(0, 3, 1, 2).bool()
        best_other = torch.where(is_max, top2.values[:, 1:2], top2.values[:, 0:1])
        return torch.sigmoid(self.steepness * (p - best_other))


class IoULoss(RegionLoss):
    """1 - soft Jaccard index, averaged over classes (and images).

    ``J_c = (Σ p_c y_c + s) / (Σ p_c + Σ y_c - Σ p_c y_c + s)``, ``L = 1 - mean_c J_c``; classes and
    reduction as :class:`SoftDiceLoss`.

    Args: as :class:`RegionLoss`.
    """

    name = "IoU"

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        inter, p_sum, y_sum = self.terms(class_probabilities(seg_logits), target, seg_logits.shape[1])
        return 1 - ((inter + SMOOTH) / (p_sum + y_sum - inter + SMOOTH)).mean()


class GeneralizedDiceLoss(RegionLoss):
    """Generalised Dice loss of Sudre et al. (2017), over the whole batch or per image (averaged).

    ``L = 1 - (2 Σ_c w_c Σ_x p_c y_c + s) / (Σ_c w_c Σ_x (p_c + y_c) + s)`` with class weights
    ``w_c = 1 / (Σ_x y_c)²`` (sums over batch and pixels, or over each image's pixels without
    ``batch_dice``), so small classes count as much as large ones. Guard for empty classes (1/0²):
    as in MONAI, a class absent from the target gets the largest weight among the present classes,
    so predicting it is still penalised; if no selected class is present all weights are 1. The
    weights are then normalised to sum to 1, which leaves the ratio unchanged but keeps the
    smoothing ``s`` = :data:`SMOOTH` negligible (raw 1/volume² weights would be ~1e-8 and ``s``
    would dominate).

    Args: as :class:`RegionLoss`.
    """

    name = "GDL"

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        inter, p_sum, y_sum = (t.reshape(-1, t.shape[-1]) for t in  # (rows, C): one row, or one per image
                               self.terms(class_probabilities(seg_logits), target, seg_logits.shape[1]))
        present = y_sum > 0
        w = torch.where(present, 1 / y_sum.clamp_min(1) ** 2, 0.0)
        w = torch.where(present, w, w.amax(-1, keepdim=True))
        w = torch.where(present.any(-1, keepdim=True), w, 1.0)  # no sync: decided on the device
        w = w / w.sum(-1, keepdim=True)
        ratio = (2 * (w * inter).sum(-1) + SMOOTH) / ((w * (p_sum + y_sum)).sum(-1) + SMOOTH)
        return 1 - ratio.mean()
