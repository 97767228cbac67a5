"""Segmentation losses behind one interface, and :class:`CombinedLoss`, which fuses any subset.

Every loss is a small ``nn.Module`` called as ``loss(seg_logits, target) -> scalar``:

* ``seg_logits`` (B, K, H, W) raw logits. ``K = 1`` is a binary head (sigmoid; ``target`` in
  {0, 1}); ``K >= 2`` is a softmax head whose class 0 is the background.
* ``target`` (B, H, W) integer class indices (bool is accepted for binary heads).

Logits are cast to fp32 and autocast is switched off inside the losses, so they are safe to call
from an autocast region (bf16 or fp16). Target distance maps are computed inside the losses, on
the tensor's device and under ``torch.no_grad()``, with :mod:`utils.sdf`.

Names (as users write them in ``LOSS``, joined by ``_``, e.g. ``SoftDICE_Boundary``):

============  =======================================================  ==========  ========
name          what                                                     heads       schedule
============  =======================================================  ==========  ========
``BCE``       binary cross-entropy                                     binary      region
``CE``        cross-entropy                                            multi       region
``wBCE``      BCE (CE for K >= 2) weighted toward the target boundary  both        region
``Focal``     focal loss (Lin et al. 2017)                             both        region
``SoftDICE``  1 - soft Dice                                            both        region
``HardDICE``  1 - Dice of (almost) thresholded predictions             both        region
``IoU``       1 - soft Jaccard                                         both        region
``GDL``       generalised Dice (Sudre et al. 2017)                     both        region
``MAE``       L1 between predicted and target SDM                      both        boundary
``cMAE``      L1 between SDMs clamped to +-CLAMP_DELTA                 both        boundary
``sMAE``      MAE + soft sign disagreement                             both        boundary
``Boundary``  Kervadec et al. boundary loss (can be negative)          both        boundary
``wCE``       CE with the U-Net weight map (Ronneberger et al. 2015)   both        region
``clDice``    1 - soft centreline Dice (Shit et al. 2021)              both        boundary
============  =======================================================  ==========  ========

"region" losses compare masks; "boundary" losses (the distance-map losses, and clDice, which
compares skeletons) take the weight alpha of the ``schedule`` weighting mode (see
:class:`CombinedLoss`).

Modules: :mod:`~model.losses.base` (the interface, :class:`LossOptions`, input checks),
:mod:`~model.losses.pixel`, :mod:`~model.losses.region`, :mod:`~model.losses.distance`,
:mod:`~model.losses.skeleton` (the terms), :mod:`~model.losses.classification` (``CLS``),
:mod:`~model.losses.combined` (the weighting) and :mod:`~model.losses.registry` (the names, their
rules and :func:`build_loss`).
"""

from model.losses.base import HEADS, SMOOTH, LossOptions, SegLoss
from model.losses.classification import ClassificationLoss
from model.losses.combined import WEIGHTINGS, CombinedLoss, LossOutput
from model.losses.distance import BoundaryLoss, ClampedSDMMAELoss, SDMMAELoss, SignSDMMAELoss
from model.losses.pixel import BCELoss, CELoss, FocalLoss, WeightedBCELoss, WeightedCELoss
from model.losses.region import GeneralizedDiceLoss, HardDiceLoss, IoULoss, SoftDiceLoss
from model.losses.registry import LOSS_HEADS, LOSSES, build_loss, loss_problems, parse_loss
from model.losses.skeleton import SoftClDiceLoss, soft_skeleton

__all__ = [
    "HEADS", "LOSS_HEADS", "LOSSES", "SMOOTH", "WEIGHTINGS",
    "BCELoss", "BoundaryLoss", "CELoss", "ClampedSDMMAELoss", "ClassificationLoss", "CombinedLoss", "FocalLoss",
    "GeneralizedDiceLoss", "HardDiceLoss", "IoULoss", "LossOptions", "LossOutput", "SDMMAELoss", "SegLoss",
    "SignSDMMAELoss", "SoftClDiceLoss", "SoftDiceLoss", "WeightedBCELoss", "WeightedCELoss",
    "build_loss", "loss_problems", "parse_loss", "soft_skeleton",
]
