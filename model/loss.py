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
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.sdf import check_kernel_size, distance_transform, label_masks, normalize_sdm, signed_distance_map
from utils.tiling import NO_FILL
from utils.util import check_choice

SMOOTH = 1e-5
"""Additive smoothing of the region losses' numerator and denominator (as MONAI's ``smooth_nr`` and
``smooth_dr``): keeps a class that is absent from both target and prediction at loss 0 instead of
0/0, and is negligible against pixel counts otherwise."""

HEADS = ("binary", "multiclass")
WEIGHTINGS = ("static", "adaptive", "schedule")
SDM_DISTANCES = ("euclidean", "manhattan", "chebyshev")
SDM_NORMALIZATIONS = (None, "minmax", "dynamic_max", "static_max")


# ---------------------------------------------------------------------------------------------
# shared helpers


def _check_seg_inputs(seg_logits: Tensor, target: Tensor, who: str) -> None:
    """Raise a ValueError naming ``who`` unless logits and target fit the loss interface."""
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
    if target.numel() and bool(((target < 0) | (target >= n)).any()):
        raise ValueError(
            f"{who}: target holds class indices in [{int(target.min())}, {int(target.max())}] but a head "
            f"with K={k} output channel(s) has classes 0..{n - 1}"
        )


def _check_target_sdm(seg_logits: Tensor, target_sdm: Optional[Tensor], who: str) -> None:
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


def _head(k: int) -> str:
    return "binary" if k == 1 else "multiclass"


def _probabilities(seg_logits: Tensor) -> Tensor:
    """Sigmoid (K = 1) or softmax (K >= 2) probabilities in fp32, shape (B, K, H, W)."""
    x = seg_logits.float()
    return torch.sigmoid(x) if x.shape[1] == 1 else torch.softmax(x, dim=1)


def _one_hot(target: Tensor, k: int) -> Tensor:
    """fp32 (B, K, H, W) indicator of ``target``; for K = 1 the single foreground channel."""
    if k == 1:
        return target.unsqueeze(1).float()
    return label_masks(target.long(), range(k)).float()


def _region_channels(x: Tensor, include_background: bool) -> Tensor:
    """The class channels the region losses score.

    Multi-class: all K channels with the background, else channels 1..K-1. Binary (one channel,
    the foreground): with the background the complement ``1 - x`` is prepended, so the binary head
    scores both classes as a 2-channel softmax head would.
    """
    if x.shape[1] == 1:
        return torch.cat([1 - x, x], dim=1) if include_background else x
    return x if include_background else x[:, 1:]


def _foreground_channels(x: Tensor) -> Tensor:
    """Foreground channels: the single channel of a binary head, channels 1..K-1 otherwise."""
    return x if x.shape[1] == 1 else x[:, 1:]


def _pixel_nll(seg_logits: Tensor, target: Tensor) -> Tensor:
    """Per-pixel negative log-likelihood of the target class, fp32, shape (B, H, W)."""
    x = seg_logits.float()
    if x.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(x[:, 0], target.float(), reduction="none")
    return F.cross_entropy(x, target.long(), reduction="none")


def _dice_terms(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class sums over batch and pixels: intersection, prediction volume, target volume."""
    dims = (0, 2, 3)
    return (p * y).sum(dims), p.sum(dims), y.sum(dims)


def _has_boundary(y: Tensor) -> Tensor:
    """(B, C) bool: the (B, C, H, W) binary map has both foreground and background pixels."""
    yb = y.bool().flatten(2)
    return yb.any(-1) & ~yb.all(-1)


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name}={value!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")


# ---------------------------------------------------------------------------------------------
# the loss interface


class SegLoss(nn.Module):
    """Base of all segmentation losses: ``loss(seg_logits, target) -> scalar``.

    Subclasses implement :meth:`compute`; :meth:`forward` validates the inputs and runs
    :meth:`compute` in fp32 with autocast off. Class attributes tell the builder and the config
    validator what a loss supports.

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
        _check_seg_inputs(seg_logits, target, self.name)
        self.check_head(seg_logits.shape[1])
        _check_target_sdm(seg_logits, target_sdm, self.name)
        with torch.autocast(seg_logits.device.type, enabled=False):
            return self.scored(seg_logits, target, target_sdm)

    def scored(self, seg_logits: Tensor, target: Tensor, target_sdm: Optional[Tensor]) -> Tensor:
        """:meth:`compute`, given ``target_sdm`` when this term takes it."""
        if self.takes_scene_sdm and target_sdm is not None:
            return self.compute(seg_logits, target, target_sdm)
        return self.compute(seg_logits, target)

    def check_head(self, k: int) -> None:
        """Raise a ValueError if a head with ``k`` output channels is not supported."""
        if _head(k) not in self.heads:
            raise ValueError(f"{self.name} does not support a {_head(k)} head (K={k}): {_head_hint(self.name)}")

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        """The loss on already validated inputs; autocast is off when this runs."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute()")


# ---------------------------------------------------------------------------------------------
# pixel losses


class BCELoss(SegLoss):
    """Binary cross-entropy on the sigmoid of a one-channel head, averaged over pixels.

    ``L = mean_x [ -y log σ(z) - (1-y) log(1-σ(z)) ]``. Binary heads only: use ``CE`` for K >= 2.
    """

    name = "BCE"
    heads = ("binary",)

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        return _pixel_nll(seg_logits, target).mean()


class CELoss(SegLoss):
    """Cross-entropy of the softmax over K >= 2 classes, averaged over pixels.

    ``L = mean_x [ -log softmax(z)_{y(x)} ]``. Multi-class heads only: use ``BCE`` for K = 1.
    """

    name = "CE"
    heads = ("multiclass",)

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        return _pixel_nll(seg_logits, target).mean()


class FocalLoss(SegLoss):
    """Focal loss of Lin et al. (2017), averaged over pixels.

    ``FL(x) = -α_t (1 - p_t)^γ log p_t`` with ``p_t`` the probability of the target class
    (sigmoid for K = 1, softmax for K >= 2). ``γ = 0`` and no α give BCE / CE. ``α_t = α`` on
    foreground pixels (target > 0) and ``1 - α`` on background, which for a binary head is Lin et
    al.'s α-balancing; ``alpha=None`` leaves every pixel at weight 1.

    Args:
        gamma: focusing parameter γ >= 0 (2 in the paper).
        alpha: foreground weight α in [0, 1], or None.
    """

    name = "Focal"

    def __init__(self, gamma: float = 2.0, alpha: Optional[float] = None):
        super().__init__()
        _check_positive("focal_gamma", gamma, allow_zero=True)
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
            raise ValueError(f"focal_alpha={alpha!r} must be None or a number in [0, 1]")
        self.gamma, self.alpha = float(gamma), alpha

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        nll = _pixel_nll(seg_logits, target)  # -log p_t, stable from the logits
        p_t = torch.exp(-nll)
        loss = (1 - p_t).clamp_min(0) ** self.gamma * nll
        if self.alpha is not None:
            loss = torch.where(target > 0, self.alpha, 1 - self.alpha) * loss
        return loss.mean()


class WeightedBCELoss(SegLoss):
    """BCE (CE for K >= 2) weighted per pixel by the target's signed distance map.

    ``L = mean_x w(x) · ℓ(x)`` with ``ℓ`` the per-pixel BCE / CE and

        ``w(x) = 1 + w0 · exp(-φ(x)² / (2σ²))``,

    where ``φ`` is the target's signed distance map (:func:`utils.sdf.signed_distance_map`,
    method ``exact``, distance SDM_DISTANCE, *not* normalised, so σ is in pixels). The weight is
    ``1 + w0`` on the object's inner edge (φ = 0 there) and falls to 1 a few σ away. For K >= 2,
    ``φ`` is the SDM of the nearest foreground-class boundary (the smallest ``|φ_c|`` over
    classes 1..K-1). A map without a boundary (an empty or full class in that tile) gives weight 1.

    Args:
        w0: boundary weight w0 >= 0.
        sigma: width σ > 0 of the boundary band, in pixels.
        distance: SDM_DISTANCE.
    """

    name = "wBCE"

    def __init__(self, w0: float = 10.0, sigma: float = 5.0, distance: str = "euclidean"):
        super().__init__()
        _check_positive("wbce_w0", w0, allow_zero=True)
        _check_positive("wbce_sigma", sigma)
        check_choice("sdm_distance", distance, SDM_DISTANCES)
        self.w0, self.sigma, self.distance = float(w0), float(sigma), distance

    @torch.no_grad()
    def weight_map(self, target: Tensor, k: int) -> Tensor:
        """The fp32 (B, H, W) weight map w(x) of ``target`` for a head with ``k`` channels."""
        y = _foreground_channels(_one_hot(target, k))
        phi = signed_distance_map(y, distance=self.distance, method="exact", normalization=None).float()
        d = phi.abs().masked_fill(~_has_boundary(y)[..., None, None], math.inf).amin(dim=1)
        return 1 + self.w0 * torch.exp(-(d**2) / (2 * self.sigma**2))

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        w = self.weight_map(target, seg_logits.shape[1])
        return (w * _pixel_nll(seg_logits, target)).mean()


class WeightedCELoss(SegLoss):
    """Cross-entropy (BCE for K = 1) with the U-Net weight map of Ronneberger et al. (2015).

    ``L = mean_x w(x) · ℓ(x)`` with ``ℓ`` the per-pixel CE / BCE and

        ``w(x) = w_c(x) + w0 · exp(-(d1(x) + d2(x))² / (2σ²))``,

    * ``w_c(x) = n / (m · n_{y(x)})``: class balancing per image, with ``n`` its pixel count,
      ``n_c`` the pixels of class c and ``m`` the number of classes present, so that ``w_c``
      averages to 1 over the image and each present class carries the same total weight;
    * ``d1``, ``d2``: the Euclidean distances to the nearest and second-nearest object. Objects are
      the 4-connected components of each foreground class (``scipy.ndimage.label``); a pixel inside
      an object is at distance 0 from it. With fewer than two objects in the image the border term
      is 0.

    Cost: the labelling runs on the CPU (one device-to-host copy of the target per batch); then
    one exact EDT per object on the target's device, in chunks of ``chunk`` objects, so
    O(objects · H · W) time and O(chunk · H · W) memory per image. Fine for tiles with tens of
    objects; for hundreds per tile expect it to dominate the step.

    Args:
        w0: border weight w0 >= 0 (10 in the paper).
        sigma: border width σ > 0 in pixels (5 in the paper).
        chunk: objects per batched distance transform.
    """

    name = "wCE"

    def __init__(self, w0: float = 10.0, sigma: float = 5.0, chunk: int = 32):
        super().__init__()
        _check_positive("wce_w0", w0, allow_zero=True)
        _check_positive("wce_sigma", sigma)
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} must be an int >= 1")
        self.w0, self.sigma, self.chunk = float(w0), float(sigma), chunk

    @torch.no_grad()
    def weight_map(self, target: Tensor, k: int) -> Tensor:
        """The fp32 (B, H, W) U-Net weight map of ``target`` for a head with ``k`` channels."""
        b, h, w = target.shape
        n_classes = max(k, 2)
        counts = F.one_hot(target.long(), n_classes).flatten(1, 2).sum(1).float()  # (B, classes)
        present = (counts > 0).sum(1, keepdim=True).float()
        w_class = torch.where(counts > 0, (h * w) / (present * counts.clamp_min(1)), 0.0)
        weights = torch.gather(w_class, 1, target.long().flatten(1)).view(b, h, w)

        if self.w0 == 0:
            return weights
        labels_cpu = target.detach().cpu().numpy()
        for i in range(b):
            objects = self._objects(labels_cpu[i], n_classes)
            if len(objects) < 2:
                continue
            d12 = torch.full((2, h, w), math.inf, device=target.device)
            for start in range(0, len(objects), self.chunk):
                masks = torch.from_numpy(np.stack(objects[start : start + self.chunk])).to(target.device)
                # every pixel's distance to the object (0 on it): utils.sdf measures to the foreground
                d = distance_transform(masks, distance="euclidean", method="exact").float()
                d12 = torch.topk(torch.cat([d12, d]), 2, dim=0, largest=False).values
            weights[i] += self.w0 * torch.exp(-((d12[0] + d12[1]) ** 2) / (2 * self.sigma**2))
        return weights

    @staticmethod
    def _objects(labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
        """Boolean masks of the 4-connected components of every foreground class."""
        objects = []
        for c in range(1, n_classes):
            components, n = ndi.label(labels == c)
            objects += [components == j for j in range(1, n + 1)]
        return objects

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        w = self.weight_map(target, seg_logits.shape[1])
        return (w * _pixel_nll(seg_logits, target)).mean()


# ---------------------------------------------------------------------------------------------
# region losses


class _RegionLoss(SegLoss):
    """Shared argument of the region losses: which classes are scored."""

    def __init__(self, include_background: bool = False):
        super().__init__()
        self.include_background = bool(include_background)


class SoftDiceLoss(_RegionLoss):
    """1 - soft Dice on probabilities, per class over the whole batch, averaged over classes.

    ``Dice_c = (2 Σ p_c y_c + s) / (Σ p_c + Σ y_c + s)``, ``L = 1 - mean_c Dice_c``, sums over the
    batch and all pixels (a "batch Dice": a tile without foreground does not make the ratio
    undefined), ``s`` = :data:`SMOOTH`. Classes: 1..K-1, or all with ``include_background`` (for a
    binary head the background is ``1 - p``).

    Args:
        include_background: INCLUDE_BACKGROUND.
    """

    name = "SoftDICE"

    def probabilities(self, seg_logits: Tensor) -> Tensor:
        return _probabilities(seg_logits)

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        p = _region_channels(self.probabilities(seg_logits), self.include_background)
        y = _region_channels(_one_hot(target, seg_logits.shape[1]), self.include_background)
        inter, p_sum, y_sum = _dice_terms(p, y)
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
        include_background: INCLUDE_BACKGROUND.
        steepness: k > 0.
        threshold: t in (0, 1), binary heads only.
    """

    name = "HardDICE"

    def __init__(self, include_background: bool = False, steepness: float = 10.0, threshold: float = 0.5):
        super().__init__(include_background)
        _check_positive("sigmoid_steepness", steepness)
        if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
            raise ValueError(f"seg_threshold={threshold!r} must be a number in (0, 1)")
        self.steepness, self.threshold = float(steepness), float(threshold)

    def probabilities(self, seg_logits: Tensor) -> Tensor:
        p = _probabilities(seg_logits)
        if p.shape[1] == 1:
            return torch.sigmoid(self.steepness * (p - self.threshold))
        top2 = torch.topk(p, 2, dim=1)
        is_max = F.one_hot(top2.indices[:, 0], p.shape[1]).permute(0, 3, 1, 2).bool()
        best_other = torch.where(is_max, top2.values[:, 1:2], top2.values[:, 0:1])
        return torch.sigmoid(self.steepness * (p - best_other))


class IoULoss(_RegionLoss):
    """1 - soft Jaccard index, per class over the whole batch, averaged over classes.

    ``J_c = (Σ p_c y_c + s) / (Σ p_c + Σ y_c - Σ p_c y_c + s)``, ``L = 1 - mean_c J_c``; classes and
    reduction as :class:`SoftDiceLoss`.

    Args:
        include_background: INCLUDE_BACKGROUND.
    """

    name = "IoU"

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        p = _region_channels(_probabilities(seg_logits), self.include_background)
        y = _region_channels(_one_hot(target, seg_logits.shape[1]), self.include_background)
        inter, p_sum, y_sum = _dice_terms(p, y)
        return 1 - ((inter + SMOOTH) / (p_sum + y_sum - inter + SMOOTH)).mean()


class GeneralizedDiceLoss(_RegionLoss):
    """Generalised Dice loss of Sudre et al. (2017), over the whole batch.

    ``L = 1 - (2 Σ_c w_c Σ_x p_c y_c + s) / (Σ_c w_c Σ_x (p_c + y_c) + s)`` with class weights
    ``w_c = 1 / (Σ_x y_c)²`` (sums over batch and pixels), so small classes count as much as large
    ones. Guard for empty classes (1/0²): as in MONAI, a class absent from the batch's target gets
    the largest weight among the present classes, so predicting it is still penalised; if no
    selected class is present all weights are 1. The weights are then normalised to sum to 1,
    which leaves the ratio unchanged but keeps the smoothing ``s`` = :data:`SMOOTH` negligible
    (raw 1/volume² weights would be ~1e-8 and ``s`` would dominate).

    Args:
        include_background: INCLUDE_BACKGROUND.
    """

    name = "GDL"

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        p = _region_channels(_probabilities(seg_logits), self.include_background)
        y = _region_channels(_one_hot(target, seg_logits.shape[1]), self.include_background)
        inter, p_sum, y_sum = _dice_terms(p, y)
        present = y_sum > 0
        w = torch.where(present, 1 / y_sum.clamp_min(1) ** 2, 0.0)
        w = torch.where(present, w, w.max()) if bool(present.any()) else torch.ones_like(w)
        w = w / w.sum()
        return 1 - (2 * (w * inter).sum() + SMOOTH) / ((w * (p_sum + y_sum)).sum() + SMOOTH)


# ---------------------------------------------------------------------------------------------
# skeleton loss


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


class SoftClDiceLoss(_RegionLoss):
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

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        p = _region_channels(_probabilities(seg_logits), self.include_background)
        y = _region_channels(_one_hot(target, seg_logits.shape[1]), self.include_background)
        skel_p = soft_skeleton(p, self.iterations)
        with torch.no_grad():  # the target's skeleton is a constant
            skel_y = soft_skeleton(y, self.iterations)
        dims, s = (0, 2, 3), self.smooth
        tprec = ((skel_p * y).sum(dims) + s) / (skel_p.sum(dims) + s)
        tsens = ((skel_y * p).sum(dims) + s) / (skel_y.sum(dims) + s)
        return 1 - (2 * tprec * tsens / (tprec + tsens)).mean()


# ---------------------------------------------------------------------------------------------
# distance-map losses


class _DistanceLoss(SegLoss):
    """Shared arguments of the distance-map losses (foreground classes 1..K-1, or the binary channel)."""

    schedule_group = "boundary"

    def __init__(
        self, distance: str = "euclidean", normalization: Optional[str] = "static_max", kernel_size: int = 3
    ):
        super().__init__()
        check_choice("sdm_distance", distance, SDM_DISTANCES)
        check_choice("sdm_normalization", normalization, SDM_NORMALIZATIONS)
        check_kernel_size(kernel_size, "sdm_kernel_size")
        self.distance, self.normalization, self.kernel_size = distance, normalization, kernel_size

    def sdm(self, mask: Tensor, method: str) -> Tensor:
        """Signed distance map of a (B, C, H, W) mask with this loss's settings, fp32."""
        return signed_distance_map(
            mask, distance=self.distance, method=method, normalization=self.normalization,
            kernel_size=self.kernel_size,
        ).float()


class SDMMAELoss(_DistanceLoss):
    """L1 between the predicted and the target signed distance maps (SDMs).

    ``L = mean |φ̂ - φ|`` over batch, foreground classes and pixels, where

    * ``φ̂`` = SDM of the predicted foreground probabilities by the differentiable ``conv`` method
      of :func:`utils.sdf.signed_distance_map`, so gradients reach the network;
    * ``φ`` = SDM of the target by the *same* ``conv`` method (no gradient): a perfect prediction
      then scores 0, where the exact EDT would leave the conv method's approximation error as a
      floor.

    Both use SDM_DISTANCE, SDM_NORMALIZATION and SDM_KERNEL_SIZE. Convention of
    :mod:`utils.sdf`: positive outside, negative inside.

    A class without a boundary in a tile (absent, or covering it) has a zero target map, and
    fitting φ̂ to 0 would push the prediction toward p ≈ 1/2 (the soft SDM is 0 only between
    object and background). Such maps contribute 0 to the L1 (they still count in the mean, as
    the zero maps of :class:`BoundaryLoss` do): empty tiles are left to the region terms.

    Args:
        distance: SDM_DISTANCE.
        normalization: SDM_NORMALIZATION (None: pixels).
        kernel_size: SDM_KERNEL_SIZE.
    """

    name = "MAE"

    def maps(self, seg_logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Predicted SDM (with grad), target SDM, the target's foreground indicator (all
        (B, C, H, W)) and a (B, C, 1, 1) 0/1 mask of the maps whose target has a boundary."""
        p = _foreground_channels(_probabilities(seg_logits))
        y = _foreground_channels(_one_hot(target, seg_logits.shape[1]))
        with torch.no_grad():
            phi = self.sdm(y, "conv")
            valid = _has_boundary(y)[..., None, None].float()
        return self.sdm(p, "conv"), phi, y, valid

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        phi_hat, phi, _, valid = self.maps(seg_logits, target)
        return ((phi_hat - phi).abs() * valid).mean()


class ClampedSDMMAELoss(SDMMAELoss):
    """L1 between SDMs clamped to ±δ (DeepSDF's clamped L1), so capacity goes to the boundary band.

    ``L = mean |clamp(φ̂, -δ, δ) - clamp(φ, -δ, δ)|`` with φ̂, φ as in :class:`SDMMAELoss` and
    δ = CLAMP_DELTA, in the units of SDM_NORMALIZATION (pixels when it is None). Pixels where both
    maps are beyond ±δ on the same side give no gradient. Maps without a target boundary
    contribute 0, as in :class:`SDMMAELoss`.

    Args:
        delta: δ > 0.
        distance, normalization, kernel_size: as :class:`SDMMAELoss`.
    """

    name = "cMAE"

    def __init__(
        self,
        delta: float = 0.1,
        distance: str = "euclidean",
        normalization: Optional[str] = "static_max",
        kernel_size: int = 3,
    ):
        super().__init__(distance, normalization, kernel_size)
        _check_positive("clamp_delta", delta)
        self.delta = float(delta)

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        phi_hat, phi, _, valid = self.maps(seg_logits, target)
        clamped = (phi_hat.clamp(-self.delta, self.delta) - phi.clamp(-self.delta, self.delta)).abs()
        return (clamped * valid).mean()


class SignSDMMAELoss(SDMMAELoss):
    """MAE plus a soft penalty on sign disagreement between predicted and target SDM.

    ``L = mean |φ̂ - φ| + mean σ(-k · φ̂ · s)``, with φ̂, φ and the first term as in
    :class:`SDMMAELoss`, ``k`` = SIGMOID_STEEPNESS and ``s = +1`` where the target is background
    (φ > 0), ``-1`` on the object (φ <= 0). ``σ(-k φ̂ s)`` is a soft indicator that φ̂ has the
    wrong sign: near 1 when it is wrong, near 0 when it is right, 1/2 at φ̂ = 0. The sign term
    also covers tiles without a target boundary: on an empty tile it pushes φ̂ positive (p down).

    Never negative: the "agreement" form ``-mean(tanh(kφ̂/2) · s')`` with ``s'`` the target's
    sign, which can go below zero, equals ``2 · (second term) - 1``, so this is the same objective
    shifted and scaled to [0, 1]. Hence sMAE is safe under adaptive weighting as it stands.
    A correct prediction still pays ``σ(-k|φ̂|)`` on the pixels next to the boundary, whose SDM
    is near 0: the minimum is small but not 0.

    Args:
        steepness: k > 0.
        distance, normalization, kernel_size: as :class:`SDMMAELoss`.
    """

    name = "sMAE"

    def __init__(
        self,
        steepness: float = 10.0,
        distance: str = "euclidean",
        normalization: Optional[str] = "static_max",
        kernel_size: int = 3,
    ):
        super().__init__(distance, normalization, kernel_size)
        _check_positive("sigmoid_steepness", steepness)
        self.steepness = float(steepness)

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        phi_hat, phi, y, valid = self.maps(seg_logits, target)
        s = 1 - 2 * y  # +1 outside the object, -1 inside
        return ((phi_hat - phi).abs() * valid).mean() + torch.sigmoid(-self.steepness * phi_hat * s).mean()


class BoundaryLoss(_DistanceLoss):
    """Boundary loss of Kervadec et al. (2019): probabilities integrated against the target SDM.

    ``L = mean_{b, c, x} p_c(x) · φ_c(x)`` over the batch, the foreground classes c (1..K-1; the
    single channel of a binary head) and all pixels, with ``p`` the sigmoid / softmax probability
    and ``φ`` the target's exact signed distance map (:func:`utils.sdf.signed_distance_map`,
    method ``exact``, SDM_DISTANCE, SDM_NORMALIZATION):
    ``φ = negmask · d(negmask) - (d(posmask) - 1) · posmask``, positive outside the object,
    negative or 0 inside.

    **It can be negative**: its minimum, reached by the perfect prediction, is
    ``mean min(φ, 0) <= 0``. With ``nonnegative=True`` that constant is subtracted:

        ``L' = L - mean min(φ, 0) = mean [ p · max(φ, 0) + (1 - p) · max(-φ, 0) ] >= 0``,

    zero exactly for the perfect prediction and with the same gradient as L. :func:`build_loss`
    uses it under adaptive weighting, where a negative term would drive its log-variance to -∞.

    A class without a boundary in a tile (absent, or covering it) has a zero map, as in the
    reference implementation, so it adds 0 and no gradient: a boundary loss alone cannot remove
    false positives from an empty tile, which is why it is combined with a region loss. Given
    ``target_sdm`` (SDM_SCOPE=image: the maps measured over the whole image, in pixels, cut to
    the tile; see :class:`utils.dataset.SceneSDM`), φ is that map with the same normalisation
    (``static_max``: the tile's own constant, so values beyond 1 mean "farther than the tile's
    diagonal"), and a false positive in an empty tile costs its true distance to the nearest
    object of its class.

    Args:
        nonnegative: subtract the perfect prediction's value (see above).
        distance: SDM_DISTANCE.
        normalization: SDM_NORMALIZATION (None: pixels, as in the paper).
    """

    name = "Boundary"
    takes_scene_sdm = True

    def __init__(
        self, nonnegative: bool = False, distance: str = "euclidean", normalization: Optional[str] = "static_max"
    ):
        super().__init__(distance, normalization)
        self.nonnegative = bool(nonnegative)
        self.can_be_negative = not self.nonnegative

    def compute(self, seg_logits: Tensor, target: Tensor, target_sdm: Optional[Tensor] = None) -> Tensor:
        p = _foreground_channels(_probabilities(seg_logits))
        with torch.no_grad():
            if target_sdm is None:
                phi = self.sdm(_foreground_channels(_one_hot(target, seg_logits.shape[1])), "exact")
            else:
                phi = normalize_sdm(target_sdm.float(), self.normalization, self.distance)
        loss = (p * phi).mean()
        if self.nonnegative:
            loss = loss - phi.clamp(max=0).mean()
        return loss


# ---------------------------------------------------------------------------------------------
# registry and names


LOSSES: dict[str, type] = {
    cls.name: cls
    for cls in (
        BCELoss, CELoss, WeightedBCELoss, FocalLoss, SoftDiceLoss, HardDiceLoss, IoULoss,
        GeneralizedDiceLoss, SDMMAELoss, ClampedSDMMAELoss, SignSDMMAELoss, BoundaryLoss, WeightedCELoss,
        SoftClDiceLoss,
    )
}
"""Segmentation losses by their name in ``LOSS``."""

LOSS_HEADS: dict[str, tuple[str, ...]] = {name: cls.heads for name, cls in LOSSES.items()}
"""Heads each loss supports: ``"binary"`` (SEG_CLASSES = 1) and/or ``"multiclass"`` (>= 2)."""


def _head_hint(name: str) -> str:
    if name == "BCE":
        return "BCE is for SEG_CLASSES=1; use CE for a softmax head with SEG_CLASSES>=2"
    if name == "CE":
        return "CE is for SEG_CLASSES>=2; use BCE for a sigmoid head with SEG_CLASSES=1"
    return f"it supports {' and '.join(LOSS_HEADS[name])} heads"


def parse_loss(loss: str) -> list[str]:
    """Split a LOSS string into its term names, in order.

    Args:
        loss: names from :data:`LOSSES` joined by ``_``, e.g. ``"SoftDICE_Boundary"`` (case-sensitive).

    Returns:
        The names, e.g. ``["SoftDICE", "Boundary"]``.

    Raises:
        ValueError: naming every unknown term (with a "did you mean") and the valid names, or on an
            empty string, an empty term (``"A__B"``) or a repeated term.
    """
    valid = ", ".join(LOSSES)
    if not isinstance(loss, str) or not loss.strip():
        raise ValueError(f"LOSS={loss!r} is empty: join one or more of {valid} with '_'")
    terms = loss.strip().split("_")
    problems = []
    if "" in terms:
        problems.append(f"LOSS={loss!r} has an empty term (doubled, leading or trailing '_')")
    by_lower = {name.lower(): name for name in LOSSES}
    for term in terms:
        if term and term not in LOSSES:
            close = difflib.get_close_matches(term.lower(), list(by_lower), n=1, cutoff=0.5)
            hint = f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
            extra = " (the classifier term CLS is added by CLS_CLASSES, not LOSS)" if term == "CLS" else ""
            problems.append(f"unknown loss term {term!r}{hint}{extra}")
    repeated = sorted({t for t in terms if t and terms.count(t) > 1})
    if repeated:
        problems.append(f"repeated loss term(s) {repeated}: give each term once")
    if problems:
        raise ValueError("; ".join(problems) + f". Valid names: {valid}")
    return terms


def loss_problems(
    terms: list[str],
    seg_classes: int,
    weighting: str = "static",
    static_weights: Optional[list[float]] = None,
    cls_weight: float = 1.0,
) -> list[str]:
    """Everything wrong with a list of (parsed) loss terms for a head and a weighting: the one place
    these rules live (the config validator and :func:`build_loss` both ask here).

    Args:
        terms: names from :func:`parse_loss`.
        seg_classes: SEG_CLASSES, the head's output channels (1 = binary).
        weighting: ``"static"``, ``"adaptive"`` or ``"schedule"``.
        static_weights: STATIC_WEIGHTS, one per term (None = all 1).
        cls_weight: CLS_WEIGHT.

    Returns:
        One message per problem, each with its fix (empty when all is well).
    """
    if not isinstance(seg_classes, int) or seg_classes < 1:
        return [f"SEG_CLASSES={seg_classes!r} must be an int >= 1"]
    problems = []
    if weighting not in WEIGHTINGS:
        problems.append(f"weighting={weighting!r} is not one of {list(WEIGHTINGS)}")
    head = _head(seg_classes)
    for term in terms:
        if term not in LOSSES:
            problems.append(f"unknown loss term {term!r}; valid names: {', '.join(LOSSES)}")
        elif head not in LOSS_HEADS[term]:
            problems.append(f"{term} does not support SEG_CLASSES={seg_classes} ({head} head): {_head_hint(term)}")
    if weighting == "schedule":
        groups = {LOSSES[t].schedule_group for t in terms if t in LOSSES}
        boundary_names = [n for n, c in LOSSES.items() if c.schedule_group == "boundary"]
        if "boundary" not in groups:
            problems.append(
                f"schedule weighting moves weight from the region terms to the boundary terms, but {terms} "
                f"has no boundary term: add one of {boundary_names} (e.g. SoftDICE_Boundary)"
            )
        if "region" not in groups:
            problems.append(
                f"schedule weighting needs a region term next to the boundary terms in {terms} "
                "(e.g. SoftDICE_Boundary): a boundary loss alone does not train (Kervadec et al.)"
            )
    if weighting == "adaptive" and cls_weight != 1.0:
        problems.append("CLS_WEIGHT is learned with ADAPTIVE_WEIGHTS=true: leave CLS_WEIGHT at 1.0")
    if static_weights is not None:
        if weighting == "adaptive":
            problems.append("STATIC_WEIGHTS is set but ADAPTIVE_WEIGHTS=true learns the weights: remove "
                            "STATIC_WEIGHTS or set ADAPTIVE_WEIGHTS=false")
        elif len(static_weights) != len(terms):
            problems.append(f"STATIC_WEIGHTS has {len(static_weights)} weight(s) but LOSS={'_'.join(terms)!r} has "
                            f"{len(terms)} term(s) {terms}: give one weight per term, in order")
        if any(not (isinstance(w, (int, float)) and math.isfinite(w)) or w < 0 for w in static_weights):
            problems.append(f"STATIC_WEIGHTS={static_weights} has a negative weight (or a non-finite one): weights must be finite and >= 0")
    return problems


# ---------------------------------------------------------------------------------------------
# classification term


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
        if t.numel() and bool(((t < 0) | (t >= n) | (t != t.round())).any()):
            raise ValueError(f"CLS: cls_target must hold class indices 0..{n - 1}")
        with torch.autocast(x.device.type, enabled=False):
            if j == 1:
                return F.binary_cross_entropy_with_logits(x, t.float())
            return F.cross_entropy(x, t.long())


# ---------------------------------------------------------------------------------------------
# combined loss


class LossOutput(NamedTuple):
    """What :class:`CombinedLoss` returns.

    Attributes:
        total: the weighted sum to back-propagate (scalar, fp32, with grad).
        terms: each computed term, unweighted and detached, by name (``"CLS"`` for the classifier).
        weights: each configured term's current effective weight, by name.
    """

    total: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]


class CombinedLoss(nn.Module):
    """Weighted sum of named segmentation terms and, optionally, the classifier term ``CLS``.

    Weighting modes:

    * ``static``: ``total = Σ_i w_i L_i`` with fixed weights.
    * ``adaptive``: homoscedastic uncertainty (Kendall, Gal & Cipolla 2018):
      ``total = Σ_i exp(-s_i) L_i + s_i``, with one learnable log-variance ``s_i`` per term
      (initialised to 0, i.e. weight 1), reported as weight ``exp(-s_i)``. The optimum
      ``s_i = log L_i`` exists only for ``L_i > 0``: a negative term would send ``s_i`` to -∞ and
      the total to -∞, so every term must be non-negative (the builder uses the shifted
      :class:`BoundaryLoss`, and :class:`SignSDMMAELoss` is non-negative by construction); a
      term flagged ``can_be_negative`` is refused.
    * ``schedule``: the rebalancing of Kervadec et al.: ``α = min(alpha_max, alpha_start +
      alpha_step · epoch)``; boundary terms (``schedule_group == "boundary"``) are weighted
      ``α · w_i``, region terms ``(1 - α) · w_i``, ``CLS`` keeps its fixed weight. The defaults
      (0.01, +0.01 per epoch) are the paper's; the authors' code stops lowering the region weight
      at 0.1, hence ``alpha_max = 0.9`` (unlike their code, the boundary weight also stops there,
      so the weights stay a convex combination).

    All parameters of this module (the ``s_i``, in ``adaptive`` mode only) are loss weights: give
    them no weight decay. Keep the module inside the module that
    DDP wraps so that the ``s_i`` are all-reduced; a term that is skipped in a call (no
    ``seg_logits`` or no ``cls_logits``) still adds ``0 · s_i`` so that every parameter receives a
    gradient and DDP needs no ``find_unused_parameters``.

    Args:
        seg_terms: segmentation losses by name, in order.
        cls_term: the classifier's loss, or None.
        weighting: ``"static"``, ``"adaptive"`` or ``"schedule"``.
        weights: fixed weight per term name (``static``, ``schedule``); missing names get 1.
        alpha_start, alpha_step, alpha_max: the ``schedule`` mode's α.

    Raises:
        ValueError: on an unknown weighting, a negative or non-finite weight, no terms, a
            ``schedule`` without a boundary or region term, or a term that can be negative under
            ``adaptive``.
    """

    def __init__(
        self,
        seg_terms: dict[str, SegLoss],
        cls_term: Optional[ClassificationLoss] = None,
        *,
        weighting: str = "static",
        weights: Optional[dict[str, float]] = None,
        alpha_start: float = 0.01,
        alpha_step: float = 0.01,
        alpha_max: float = 0.9,
    ):
        super().__init__()
        check_choice("weighting", weighting, WEIGHTINGS)
        if not seg_terms and cls_term is None:
            raise ValueError("CombinedLoss needs at least one term")
        self.seg_terms = nn.ModuleDict(seg_terms)
        self.cls_term = cls_term
        self.names = list(seg_terms) + (["CLS"] if cls_term is not None else [])
        self.weighting = weighting
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"weights given for {unknown}, which are not terms of this loss ({self.names})")
        for name, w in weights.items():
            _check_positive(f"weight of {name}", w, allow_zero=True)
        self.fixed = {name: float(weights.get(name, 1.0)) for name in self.names}
        for name, value in (("alpha_start", alpha_start), ("alpha_step", alpha_step), ("alpha_max", alpha_max)):
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
        self.alpha_start, self.alpha_step, self.alpha_max = float(alpha_start), float(alpha_step), float(alpha_max)
        self.epoch = 0
        if weighting == "schedule":
            groups = {t.schedule_group for t in seg_terms.values()}
            if groups != {"region", "boundary"}:
                raise ValueError(
                    f"schedule weighting needs at least one region and one boundary term, got {list(seg_terms)}"
                )
        if weighting == "adaptive":
            negative = [name for name, t in seg_terms.items() if t.can_be_negative]
            if negative:
                raise ValueError(
                    f"adaptive weighting needs non-negative terms, but {negative} can be negative: "
                    "build Boundary with nonnegative=True (build_loss does) or use the schedule weighting"
                )
            self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (from 0) that the ``schedule`` weighting's α follows; other modes ignore it."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be an int >= 0")
        self.epoch = epoch

    @property
    def alpha(self) -> float:
        """The ``schedule`` weighting's current α."""
        return min(self.alpha_max, self.alpha_start + self.alpha_step * self.epoch)

    def current_weights(self) -> dict[str, float]:
        """Each term's effective weight now: fixed, scheduled, or ``exp(-s_i)``."""
        if self.weighting == "adaptive":
            return dict(zip(self.names, torch.exp(-self.log_vars.detach()).float().tolist()))
        if self.weighting == "schedule":
            a = self.alpha
            scale = {"boundary": a, "region": 1 - a}
            group = {name: term.schedule_group for name, term in self.seg_terms.items()}
            return {name: self.fixed[name] * (scale[group[name]] if name in group else 1.0) for name in self.names}
        return dict(self.fixed)

    def forward(
        self,
        seg_logits: Optional[Tensor],
        target: Optional[Tensor],
        cls_logits: Optional[Tensor] = None,
        cls_target: Optional[Tensor] = None,
        fill_logits: Optional[Tensor] = None,
        fill_target: Optional[Tensor] = None,
        target_sdm: Optional[Tensor] = None,
    ) -> LossOutput:
        """Compute every applicable term and their weighted total.

        Args:
            seg_logits: raw segmentation logits, or None (classifier-only training: only CLS).
            target: segmentation class indices (ignored when ``seg_logits`` is None).
            cls_logits: raw classifier logits, or None (no CLS term this call).
            cls_target: classifier class indices (needed with ``cls_logits``).
            fill_logits, fill_target: the fill head's logits and each tile's class (or NO_FILL),
                added to the CLS term (see :class:`ClassificationLoss`).
            target_sdm: the target's whole-image distance maps cut to the tile (SDM_SCOPE=image),
                for the terms that take them (see :meth:`SegLoss.forward`), or None.

        Shape:
            seg_logits: (B, K, H, W); target: (B, H, W); cls_logits: (B, J); cls_target: (B,).

        Returns:
            :class:`LossOutput`.

        Raises:
            ValueError: on inputs a term cannot take, ``cls_logits`` given to a loss built without
                a classifier term, or a call that leaves no term to compute.
        """
        losses: dict[str, Tensor] = {}
        if seg_logits is not None and len(self.seg_terms):
            _check_seg_inputs(seg_logits, target, "CombinedLoss")
            for term in self.seg_terms.values():
                term.check_head(seg_logits.shape[1])
            _check_target_sdm(seg_logits, target_sdm, "CombinedLoss")
            with torch.autocast(seg_logits.device.type, enabled=False):
                for name, term in self.seg_terms.items():
                    losses[name] = term.scored(seg_logits, target, target_sdm)
        if cls_logits is not None:
            if self.cls_term is None:
                raise ValueError(
                    "cls_logits given, but this loss was built without a classifier term (cls_classes=0)"
                )
            if cls_target is None:
                raise ValueError("cls_logits given without cls_target")
            losses["CLS"] = self.cls_term(cls_logits, cls_target, fill_logits, fill_target)
        if not losses:
            raise ValueError(
                f"no loss term to compute: pass seg_logits (terms {list(self.seg_terms)}) and/or cls_logits"
            )

        weights = self.current_weights()
        if self.weighting == "adaptive":
            s = self.log_vars
            total = s.sum() * 0  # every s_i joins the graph, even for a term skipped this call
            for i, name in enumerate(self.names):
                if name in losses:
                    total = total + torch.exp(-s[i]) * losses[name] + s[i]
        else:
            total = sum(weights[name] * value for name, value in losses.items())
        return LossOutput(total, {k: v.detach() for k, v in losses.items()}, weights)


# ---------------------------------------------------------------------------------------------
# builder


@dataclass(frozen=True)
class LossOptions:
    """Every option a loss term or the combination may take (the config's loss section).

    Attributes:
        seg_classes: SEG_CLASSES (1 = binary sigmoid head).
        cls_classes: CLS_CLASSES; 0 = no classifier term, else a term ``CLS`` (BCE for 1, CE for >= 2).
        weighting: ``"static"``, ``"adaptive"`` (learnable) or ``"schedule"`` (see :class:`CombinedLoss`).
        static_weights: one weight per LOSS term, in order (None = all 1); ``static`` and ``schedule``.
        cls_weight: fixed weight of ``CLS`` (must stay 1.0 under ``adaptive``, which learns it).
        include_background: INCLUDE_BACKGROUND, for SoftDICE, HardDICE, IoU, GDL.
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
    cls_weight: float = 1.0
    include_background: bool = False
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


def _sdm(o: LossOptions) -> dict:
    return {"distance": o.sdm_distance, "normalization": o.sdm_normalization, "kernel_size": o.sdm_kernel_size}


#: How each LOSS term is made from the options: the one table that maps options to constructors.
TERM_FACTORIES: dict[str, Callable[[LossOptions], SegLoss]] = {
    "BCE": lambda o: BCELoss(),
    "CE": lambda o: CELoss(),
    "wBCE": lambda o: WeightedBCELoss(w0=o.wbce_w0, sigma=o.wbce_sigma, distance=o.sdm_distance),
    "Focal": lambda o: FocalLoss(gamma=o.focal_gamma, alpha=o.focal_alpha),
    "SoftDICE": lambda o: SoftDiceLoss(include_background=o.include_background),
    "HardDICE": lambda o: HardDiceLoss(include_background=o.include_background, steepness=o.sigmoid_steepness,
                                       threshold=o.seg_threshold),
    "IoU": lambda o: IoULoss(include_background=o.include_background),
    "GDL": lambda o: GeneralizedDiceLoss(include_background=o.include_background),
    "MAE": lambda o: SDMMAELoss(**_sdm(o)),
    "cMAE": lambda o: ClampedSDMMAELoss(delta=o.clamp_delta, **_sdm(o)),
    "sMAE": lambda o: SignSDMMAELoss(steepness=o.sigmoid_steepness, **_sdm(o)),
    # Under learned weights a term must be >= 0 (see CombinedLoss): Boundary is shifted by its minimum.
    "Boundary": lambda o: BoundaryLoss(distance=o.sdm_distance, normalization=o.sdm_normalization,
                                       nonnegative=o.weighting == "adaptive"),
    "wCE": lambda o: WeightedCELoss(w0=o.wce_w0, sigma=o.wce_sigma),
    "clDice": lambda o: SoftClDiceLoss(include_background=o.include_background, iterations=o.cldice_iterations),
}


def build_loss(loss: str, options: Optional[LossOptions] = None, **overrides) -> CombinedLoss:
    """Build the :class:`CombinedLoss` that a LOSS string names.

    Args:
        loss: LOSS, e.g. ``"SoftDICE_BCE_Boundary"`` (see :func:`parse_loss`).
        options: the :class:`LossOptions` (default: all defaults).
        overrides: fields of :class:`LossOptions` to replace (``build_loss("BCE", seg_classes=1)``).

    Returns:
        The loss; under ``adaptive``, ``Boundary`` is its non-negative shift (see :class:`BoundaryLoss`).

    Raises:
        ValueError: listing every problem of the combination (:func:`loss_problems`), or the first
            out-of-range option a term's constructor finds (named).
    """
    o = LossOptions(**{**(options.__dict__ if options else {}), **overrides})
    terms = parse_loss(loss)
    problems = loss_problems(terms, o.seg_classes, o.weighting, o.static_weights, o.cls_weight)
    if not isinstance(o.cls_classes, int) or o.cls_classes < 0:
        problems.append(f"cls_classes={o.cls_classes!r} must be an int >= 0 (0 = no classifier term)")
    if problems:
        raise ValueError("invalid loss configuration: " + "; ".join(problems))
    seg_terms = {name: TERM_FACTORIES[name](o) for name in terms}
    weights = dict(zip(terms, o.static_weights or [1.0] * len(terms)))
    cls_term = None
    if o.cls_classes > 0:
        cls_term = ClassificationLoss(o.cls_classes)
        if o.weighting != "adaptive":
            weights["CLS"] = o.cls_weight
    start, step, top = o.schedule_alpha
    return CombinedLoss(seg_terms, cls_term, weighting=o.weighting, weights=weights,
                        alpha_start=start, alpha_step=step, alpha_max=top)
