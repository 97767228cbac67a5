"""Pixel losses: each pixel's negative log-likelihood of its class (BCE, CE), focused (Focal) or
weighted toward the target's boundaries (wBCE) and between objects (wCE)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from torch import Tensor

from model.losses.base import (
    LossOptions, SegLoss, check_positive, foreground_channels, has_boundary, one_hot, pixel_nll,
)
from utils.sdf import DISTANCES, distance_transform, signed_distance_map
from utils.choices import check_choice


class BCELoss(SegLoss):
    """Binary cross-entropy on the sigmoid of a one-channel head, averaged over pixels.

    ``L = mean_x [ -y log σ(z) - (1-y) log(1-σ(z)) ]``. Binary heads only: use ``CE`` for K >= 2.
    """

    name = "BCE"
    heads = ("binary",)

    @classmethod
    def head_hint(cls) -> str:
        return "BCE is for SEG_CLASSES=1; use CE for a softmax head with SEG_CLASSES>=2"

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        return pixel_nll(seg_logits, target).mean()


class CELoss(SegLoss):
    """Cross-entropy of the softmax over K >= 2 classes, averaged over pixels.

    ``L = mean_x [ -log softmax(z)_{y(x)} ]``. Multi-class heads only: use ``BCE`` for K = 1.
    """

    name = "CE"
    heads = ("multiclass",)

    @classmethod
    def head_hint(cls) -> str:
        return "CE is for SEG_CLASSES>=2; use BCE for a sigmoid head with SEG_CLASSES=1"

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        return pixel_nll(seg_logits, target).mean()


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
        check_positive("focal_gamma", gamma, allow_zero=True)
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
            raise ValueError(f"focal_alpha={alpha!r} must be None or a number in [0, 1]")
        self.gamma, self.alpha = float(gamma), alpha

    @classmethod
    def from_options(cls, o: LossOptions) -> FocalLoss:
        return cls(gamma=o.focal_gamma, alpha=o.focal_alpha)

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        nll = pixel_nll(seg_logits, target)  # -log p_t, stable from the logits
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
        check_positive("wbce_w0", w0, allow_zero=True)
        check_positive("wbce_sigma", sigma)
        check_choice("sdm_distance", distance, DISTANCES)
        self.w0, self.sigma, self.distance = float(w0), float(sigma), distance

    @classmethod
    def from_options(cls, o: LossOptions) -> WeightedBCELoss:
        return cls(w0=o.wbce_w0, sigma=o.wbce_sigma, distance=o.sdm_distance)

    @torch.no_grad()
    def weight_map(self, target: Tensor, k: int) -> Tensor:
        """The fp32 (B, H, W) weight map w(x) of ``target`` for a head with ``k`` channels."""
        y = foreground_channels(one_hot(target, k))
        phi = signed_distance_map(y, distance=self.distance, method="exact", normalization=None).float()
        d = phi.abs().masked_fill(~has_boundary(y)[..., None, None], math.inf).amin(dim=1)
        return 1 + self.w0 * torch.exp(-(d**2) / (2 * self.sigma**2))

    def compute(self, seg_logits: Tensor, target: Tensor) -> Tensor:
        w = self.weight_map(target, seg_logits.shape[1])
        return (w * pixel_nll(seg_logits, target)).mean()


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
        check_positive("wce_w0", w0, allow_zero=True)
        check_positive("wce_sigma", sigma)
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} must be an int >= 1")
        self.w0, self.sigma, self.chunk = float(w0), float(sigma), chunk

    @classmethod
    def from_options(cls, o: LossOptions) -> WeightedCELoss:
        return cls(w0=o.wce_w0, sigma=o.wce_sigma)

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
        return (w * pixel_nll(seg_logits, target)).mean()
