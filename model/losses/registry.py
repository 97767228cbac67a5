"""The one registry of loss terms, and the builder: the names users write in ``LOSS``, the rules a
combination of terms must follow, and the :class:`CombinedLoss` a ``LOSS`` string names.

Each loss class says how it is built from the :class:`LossOptions` (its ``from_options``), which
heads it supports and which ``schedule`` group it belongs to; this module only lists the classes. A
new loss is one class in its module, its entry in :data:`LOSSES` and its name in the ``LOSS`` line
of :mod:`configs.schema` (a test checks that the two lists agree).
"""

from __future__ import annotations

import math
from typing import Optional

from model.losses.base import LossOptions, SegLoss, head_of
from model.losses.classification import ClassificationLoss
from model.losses.combined import WEIGHTINGS, CombinedLoss
from model.losses.distance import BoundaryLoss, ClampedSDMMAELoss, SDMMAELoss, SignSDMMAELoss
from model.losses.pixel import BCELoss, CELoss, FocalLoss, WeightedBCELoss, WeightedCELoss
from model.losses.region import GeneralizedDiceLoss, HardDiceLoss, IoULoss, SoftDiceLoss
from model.losses.skeleton import SoftClDiceLoss
from utils.choices import did_you_mean

LOSSES: dict[str, type[SegLoss]] = {
    cls.name: cls
    for cls in (
        BCELoss, CELoss, WeightedBCELoss, FocalLoss, SoftDiceLoss, HardDiceLoss, IoULoss,
        GeneralizedDiceLoss, SDMMAELoss, ClampedSDMMAELoss, SignSDMMAELoss, BoundaryLoss, WeightedCELoss,
        SoftClDiceLoss,
    )
}
"""Segmentation losses by their name in ``LOSS``, in the order the error messages list them."""

LOSS_HEADS: dict[str, tuple[str, ...]] = {name: cls.heads for name, cls in LOSSES.items()}
"""Heads each loss supports: ``"binary"`` (SEG_CLASSES = 1) and/or ``"multiclass"`` (>= 2)."""


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
    for term in terms:
        if term and term not in LOSSES:
            # Case-blind and more lenient than the default: users write "softdice" or "Dice".
            hint = did_you_mean(term, LOSSES, cutoff=0.5, ignore_case=True)
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
) -> list[str]:
    """Everything wrong with a list of (parsed) loss terms for a head and a weighting: the one place
    these rules live (the config validator and :func:`build_loss` both ask here).

    Args:
        terms: names from :func:`parse_loss`.
        seg_classes: SEG_CLASSES, the head's output channels (1 = binary).
        weighting: ``"static"``, ``"adaptive"`` or ``"schedule"``.
        static_weights: STATIC_WEIGHTS, one per term (None = all 1).

    Returns:
        One message per problem, each with its fix (empty when all is well).
    """
    if not isinstance(seg_classes, int) or seg_classes < 1:
        return [f"SEG_CLASSES={seg_classes!r} must be an int >= 1"]
    problems = []
    if weighting not in WEIGHTINGS:
        problems.append(f"weighting={weighting!r} is not one of {list(WEIGHTINGS)}")
    head = head_of(seg_classes)
    for term in terms:
        if term not in LOSSES:
            problems.append(f"unknown loss term {term!r}; valid names: {', '.join(LOSSES)}")
        elif head not in LOSS_HEADS[term]:
            problems.append(f"{term} does not support SEG_CLASSES={seg_classes} ({head} head): {LOSSES[term].head_hint()}")
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
    problems = loss_problems(terms, o.seg_classes, o.weighting, o.static_weights)
    if not isinstance(o.cls_classes, int) or o.cls_classes < 0:
        problems.append(f"cls_classes={o.cls_classes!r} must be an int >= 0 (0 = no classifier term)")
    if problems:
        raise ValueError("invalid loss configuration: " + "; ".join(problems))
    seg_terms = {name: LOSSES[name].from_options(o) for name in terms}
    weights = dict(zip(terms, o.static_weights or [1.0] * len(terms)))
    cls_term = None
    if o.cls_classes > 0:
        cls_term = ClassificationLoss(o.cls_classes)
        if o.weighting != "adaptive":  # adaptive learns the CLS weight as it learns the others
            weights["CLS"] = o.cls_weight
    start, step, top = o.schedule_alpha
    return CombinedLoss(seg_terms, cls_term, weighting=o.weighting, weights=weights,
                        alpha_start=start, alpha_step=step, alpha_max=top)
