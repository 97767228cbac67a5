"""Distance-map losses: the predicted or target signed distance maps (SDMs) of :mod:`utils.sdf`
compared (MAE, cMAE, sMAE) or integrated against the probabilities (Kervadec's Boundary loss)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from model.losses.base import (
    LossOptions, SegLoss, check_positive, class_probabilities, foreground_channels, has_boundary, one_hot,
)
from utils.sdf import DISTANCES, NORMALIZATIONS, check_kernel_size, normalize_sdm, signed_distance_map
from utils.choices import check_choice


def _sdm_options(o: LossOptions) -> dict:
    """The options of the distance maps, as :class:`SDMMAELoss` and its variants take them."""
    return {"distance": o.sdm_distance, "normalization": o.sdm_normalization, "kernel_size": o.sdm_kernel_size}


class _DistanceLoss(SegLoss):
    """Shared arguments of the distance-map losses (foreground classes 1..K-1, or the binary channel)."""

    schedule_group = "boundary"

    def __init__(
        self, distance: str = "euclidean", normalization: Optional[str] = "static_max", kernel_size: int = 3
    ):
        super().__init__()
        check_choice("sdm_distance", distance, DISTANCES)
        check_choice("sdm_normalization", normalization, NORMALIZATIONS)
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

    @classmethod
    def from_options(cls, o: LossOptions) -> SDMMAELoss:
        return cls(**_sdm_options(o))

    def maps(self, seg_logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Predicted SDM (with grad), target SDM, the target's foreground indicator (all
        (B, C, H, W)) and a (B, C, 1, 1) 0/1 mask of the maps whose target has a boundary."""
        p = foreground_channels(class_probabilities(seg_logits))
        y = foreground_channels(one_hot(target, seg_logits.shape[1]))
        with torch.no_grad():
            phi = self.sdm(y, "conv")
            valid = has_boundary(y)[..., None, None].float()
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
        check_positive("clamp_delta", delta)
        self.delta = float(delta)

    @classmethod
    def from_options(cls, o: LossOptions) -> ClampedSDMMAELoss:
        return cls(delta=o.clamp_delta, **_sdm_options(o))

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
        check_positive("sigmoid_steepness", steepness)
        self.steepness = float(steepness)

    @classmethod
    def from_options(cls, o: LossOptions) -> SignSDMMAELoss:
        return cls(steepness=o.sigmoid_steepness, **_sdm_options(o))

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

    zero exactly for the perfect prediction and with the same gradient as L. :meth:`from_options`
    builds it under adaptive weighting, where a negative term would drive its log-variance to -∞.

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

    @classmethod
    def from_options(cls, o: LossOptions) -> BoundaryLoss:
        # Under learned weights a term must be >= 0 (see CombinedLoss): Boundary is shifted by its minimum.
        return cls(distance=o.sdm_distance, normalization=o.sdm_normalization, nonnegative=o.weighting == "adaptive")

    def compute(self, seg_logits: Tensor, target: Tensor, target_sdm: Optional[Tensor] = None) -> Tensor:
        p = foreground_channels(class_probabilities(seg_logits))
        with torch.no_grad():
            if target_sdm is None:
                phi = self.sdm(foreground_channels(one_hot(target, seg_logits.shape[1])), "exact")
            else:
                phi = normalize_sdm(target_sdm.float(), self.normalization, self.distance)
        loss = (p * phi).mean()
        if self.nonnegative:
            loss = loss - phi.clamp(max=0).mean()
        return loss
