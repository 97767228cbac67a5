"""The combined loss: a weighted sum of named segmentation terms and the classifier term, with
static, learned (uncertainty) or scheduled weights."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from model.losses.base import SegLoss, check_positive, check_seg_inputs, check_target_sdm
from model.losses.classification import ClassificationLoss
from utils.choices import check_choice

WEIGHTINGS = ("static", "adaptive", "schedule")


class LossOutput(NamedTuple):
    """What :class:`CombinedLoss` returns.

    Attributes:
        total: the weighted sum to back-propagate (scalar, fp32, with grad).
        terms: each computed term, unweighted and detached, by name (``"CLS"`` for the classifier).
        weights: each configured term's current effective weight, by name (a float, or under
            adaptive weighting a detached 0-dim tensor, so that the step never waits for the device).
    """

    total: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, Union[float, Tensor]]


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
            check_positive(f"weight of {name}", w, allow_zero=True)
        self.fixed = {name: float(weights.get(name, 1.0)) for name in self.names}
        for name, value in (("alpha_start", alpha_start), ("alpha_step", alpha_step), ("alpha_max", alpha_max)):
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
        self.alpha_start, self.alpha_step, self.alpha_max = float(alpha_start), float(alpha_step), float(alpha_max)
        self.epoch = 0
        self.check_targets = True  # see trust_targets()
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

    def trust_targets(self) -> None:
        """Stop checking the targets' class indices on every call (shapes and dtypes are still
        checked). The check reads the targets on the host: on a GPU a wait for the device in every
        training step. The trainer trusts them because the dataset checked every mask's values when
        it loaded it, and tiling and augmentation keep class indices."""
        self.check_targets = False
        if self.cls_term is not None:
            self.cls_term.check_targets = False

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (from 0) that the ``schedule`` weighting's α follows; other modes ignore it."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be an int >= 0")
        self.epoch = epoch

    @property
    def alpha(self) -> float:
        """The ``schedule`` weighting's current α."""
        return min(self.alpha_max, self.alpha_start + self.alpha_step * self.epoch)

    def current_weights(self) -> dict[str, Union[float, Tensor]]:
        """Each term's effective weight now: fixed, scheduled, or ``exp(-s_i)`` (a detached 0-dim
        tensor on the loss's device; ``float()`` reads it)."""
        if self.weighting == "adaptive":  # 0-dim tensors: reading them would wait for the device every step
            return dict(zip(self.names, torch.exp(-self.log_vars.detach()).float().unbind()))
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
            check_seg_inputs(seg_logits, target, "CombinedLoss", values=self.check_targets)
            for term in self.seg_terms.values():
                term.check_head(seg_logits.shape[1])
            check_target_sdm(seg_logits, target_sdm, "CombinedLoss")
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
