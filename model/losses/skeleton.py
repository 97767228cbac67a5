"""The skeleton loss: soft clDice (Shit et al. 2021), which scores the overlap of predicted and target
centre lines, and the differentiable soft skeleton it is built on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.losses.base import LossOptions, class_probabilities, one_hot, region_channels
from model.losses.region import RegionLoss


def _soft_erode(x: Tensor) -> Tensor:
    """Grey-level erosion with the 3x3 cross (min over the 4-neighbourhood); outside the image
    counts as +inf, so the border does not erode."""
    vertical = -F.max_pool2d(-x, (3, 1), 1, (1, 0))
    horizontal = -F.max_pool2d(-x, (1, 3), 1, (0, 1))
    return torch.minimum(vertical, horizontal)


def _soft_dilate(x: Tensor) -> Tensor:
    """Grey-level dilation with the 3x3 square; outside the image counts as -inf."""
    return F.max_pool2d(x, 3, 1, 1)


def soft_skeleton(x: Tensor, iterations: int) -> Tensor:
    """Soft skeleton of Shit et al. (2021, clDice): Lantuejoul's morphological skeleton with min/max
    pooling, so it is differentiable and works on probabilities.

    ``skel = relu(x - open(x))``, then ``iterations`` times: ``x = erode(x)``,
    ``d = relu(x - open(x))``, ``skel += relu(d - skel * d)``; erosion uses the 3x3 cross and
    dilation the 3x3 square. On a binary mask it is the union of the residues of the first
    ``iterations + 1`` erosions, so it reaches the medial axis of structures up to about
    ``2 * iterations + 1`` pixels thick.

    Shape:
        x: (B, C, H, W) in [0, 1]. Returns the same shape, in [0, 1].
    """
    eroded = _soft_erode(x)  # open(x) = dilate(erode(x)), and erode(x) is also the next level
    skel = F.relu(x - _soft_dilate(eroded))
    for _ in range(iterations):
        x, eroded = eroded, _soft_erode(eroded)
        delta = F.relu(x - _soft_dilate(eroded))
        skel = skel + F.relu(delta - skel * delta)
    return skel


class SoftClDiceLoss(RegionLoss):
    """1 - soft clDice (centreline Dice) of Shit et al. (2021), per class over the whole batch.

    ``Tprec_c = (Σ S(p_c) y_c + s) / (Σ S(p_c) + s)`` (how much of the predicted skeleton lies in
    the target), ``Tsens_c = (Σ S(y_c) p_c + s) / (Σ S(y_c) + s)`` (how much of the target's
    skeleton is predicted), ``clDice_c = 2 Tprec Tsens / (Tprec + Tsens)``, ``L = 1 - mean_c
    clDice_c``; ``S`` is :func:`soft_skeleton`, sums over batch and pixels, ``s`` = 1 as in the
    reference code. A missed thin structure costs its length rather than its (small) area, so
    the term favours recall of thin and faint structures and their connectivity. Classes: as
    :class:`SoftDiceLoss`. Its ``schedule`` group is ``boundary``: under ``ADAPTIVE_WEIGHTS:
    schedule``, ``SoftDICE_clDice`` is the paper's ``(1 - α) Dice + α clDice``.

    Args:
        include_background: INCLUDE_BACKGROUND.
        iterations: CLDICE_ITERATIONS, erosions of the soft skeleton (>= 1); set it to at least the
            half-thickness, in pixels, of the thickest structure.
    """

    name = "clDice"
    schedule_group = "boundary"
    smooth = 1.0

    def __init__(self, include_background: bool = False, iterations: int = 10):
        super().__init__(include_background)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"cldice_iterations={iterations!r} must be an int >= 1")
        self.iterations = iterations

    @classmethod
    def from_options(cls, o: LossOptions) -> SoftClDiceLoss:
        return cls(include_background=o.include_background, iterations=o.cldice_iterations)

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        p = region_channels(class_probabilities(seg_logits), self.include_background)
        y = region_channels(one_hot(target, seg_logits.shape[1]), self.include_background)
        skel_p = soft_skeleton(p, self.iterations)
        with torch.no_grad():  # the target's skeleton is a constant
            skel_y = soft_skeleton(y, self.iterations)
        dims, s = (0, 2, 3), self.smooth
        tprec = ((skel_p * y).sum(dims) + s) / (skel_p.sum(dims) + s)
        tsens = ((skel_y * p).sum(dims) + s) / (skel_y.sum(dims) + s)
        return 1 - (2 * tprec * tsens / (tprec + tsens)).mean()
