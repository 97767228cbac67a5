"""The accumulator of an evaluation, :class:`SegmentationMetrics`: it sums statistics batch by batch,
all-reduces them over ``torch.distributed`` and computes every metric once at the end -- pixel
accuracy, Dice, IoU, TTR, the surface distances of :mod:`model.metrics.surface`, and CMA.

Pixel accuracy
--------------
``ACC = correct pixels / pixels`` over every label class (background included, whatever
``include_background`` says), summed over the whole evaluation set and all ranks before the
ratio is taken. A pixel is correct when its predicted label equals the target label, i.e. the
correct pixels are the trace of the confusion matrix, ``sum_c tp_c`` over all label classes. It is
reported (``ACC``, and per image) but is not a model-selection metric: on sparse scenes it rewards
predicting background everywhere.

Dice and IoU
------------
True/false positives and false negatives are summed per class over the whole evaluation set (and
over all DDP ranks) and the ratio is taken once: ``DSC = 2 tp / (2 tp + fp + fn)``,
``IoU = tp / (tp + fp + fn)``; never a mean of per-batch or per-image ratios. A class that is
empty in every prediction and every target (tp = fp = fn = 0) scores 1 (perfect agreement).
The per-image rows use the same formulas on one image.

CMA
---
``CMA = sum_m w_m * score_m / sum_m w_m`` over the user's coefficients ``{metric: weight}``
(weights >= 0, not all 0), with ``score = DSC, IoU, TTR`` as they are and, for a distance metric,
``score = 1 - mean over classes of (mean over images of d / diagonal)``. Each image's ``d``
lies in [0, diagonal] (the worst case is the diagonal itself), so every score and CMA lie in
[0, 1] and higher is better; the mapping is linear, so it ranks models exactly as the distance
does, and it needs no scale parameter. With images of one size the score is ``1 - d / diagonal``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from model.metrics.labels import (
    _check_label_maps,
    _check_num_classes,
    _check_threshold,
    _classes,
    predict_classes,
    predict_labels,
)
from model.metrics.names import CMA_METRICS, DISTANCE_METRICS
from model.metrics.surface import DISTANCE_BACKENDS, _distances_from_masks, image_diagonal
from utils.sdf import label_masks, spacing_pair
from utils.choices import check_choice


# --------------------------------------------------------------------------------- overlap


def _confusion(p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positives, false positives and false negatives of boolean masks ``(..., H, W)`` per leading index."""
    tp = (p & t).sum(dim=(-2, -1))
    fp = p.sum(dim=(-2, -1)) - tp
    fn = t.sum(dim=(-2, -1)) - tp
    return tp, fp, fn


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 / 0 = 1 (nothing to find and nothing found is agreement)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(num))


# --------------------------------------------------------------------------------- accumulator


class SegmentationMetrics:
    """Accumulates segmentation (and tile-classification) statistics over an evaluation set.

    Per batch, :meth:`update` adds per-class tp/fp/fn, correctly labelled and total pixels, per-class sums and counts of the four
    surface distances (and of distance / diagonal, for CMA), and classification correct/total;
    :meth:`compute` all-reduces these sums over ``torch.distributed`` (when initialised) and
    returns every metric once. Definitions are in this module's docstring and, for the distances,
    in :mod:`model.metrics.surface`.

    Args:
        num_classes: segmentation channels K (1 = binary; K >= 2 = classes incl. background).
        distance_metrics: also compute ASD, AD, HD95 and D95 (the costly part).
        spacing: pixel size for distances: ``None`` (pixels), a number, or ``(row, column)``.
        include_background: also score class 0 (and include it in the class means).
        seg_threshold: foreground probability threshold for K = 1.
        cls_threshold: positive-class probability threshold for a 1-logit classifier.
        cma_coefficients: ``{metric: weight}`` for CMA over ``CMA_METRICS``; ``None`` = no CMA.
        device: where the running sums live (for NCCL, the rank's GPU); ``None`` = the device of
            the first batch.
        backend: distance backend, see :func:`surface_distances`.

    Raises:
        ValueError: an invalid argument (named in the message with the valid choices).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        distance_metrics: bool = True,
        spacing: float | Sequence[float] | None = None,
        include_background: bool = False,
        seg_threshold: float = 0.5,
        cls_threshold: float = 0.5,
        cma_coefficients: Mapping[str, float] | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.distance_metrics = bool(distance_metrics)
        self.spacing = spacing_pair(spacing)
        self.include_background = bool(include_background)
        self.seg_threshold = _check_threshold("seg_threshold", seg_threshold)
        self.cls_threshold = _check_threshold("cls_threshold", cls_threshold)
        self.cma_coefficients = self._check_cma(cma_coefficients)
        check_choice("backend", backend, DISTANCE_BACKENDS)
        self.backend = backend
        self.classes = _classes(self.num_classes, self.include_background)
        self._fixed_device = torch.device(device) if device is not None else None
        self.reset()

    def _check_cma(self, coefficients: Mapping[str, float] | None) -> dict[str, float] | None:
        if coefficients is None:
            return None
        if not isinstance(coefficients, Mapping) or not coefficients:
            raise ValueError(f"cma_coefficients must be a non-empty {{metric: weight}} mapping, got {coefficients!r}")
        out: dict[str, float] = {}
        for name, weight in coefficients.items():
            if name not in CMA_METRICS:
                raise ValueError(f"cma_coefficients: unknown metric {name!r}; valid metrics are {list(CMA_METRICS)}")
            if name in DISTANCE_METRICS and not self.distance_metrics:
                raise ValueError(
                    f"cma_coefficients uses {name!r} but distance_metrics is off; switch it on or drop {name!r}"
                )
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight) and weight >= 0
            ):
                raise ValueError(f"cma_coefficients[{name!r}] must be a finite number >= 0, got {weight!r}")
            out[name] = float(weight)
        if sum(out.values()) <= 0:
            raise ValueError(f"cma_coefficients must have a positive weight sum, got {coefficients!r}")
        return out

    def reset(self) -> None:
        """Forget every statistic (call at the start of each evaluation)."""
        self.device = self._fixed_device
        self._sums: dict[str, torch.Tensor] = {}
        self._rows: list[dict[str, Any]] = []
        self._images = 0  # local running index for default ids

    def _state(self, device: torch.device) -> dict[str, torch.Tensor]:
        if not self._sums:
            self.device = self.device or device
            c, z = len(self.classes), lambda *s: torch.zeros(*s, dtype=torch.float64, device=self.device)
            # float64 sums: counts stay exact up to 2^53 and one buffer all-reduces in one call
            self._sums = {
                "tp": z(c), "fp": z(c), "fn": z(c),
                "dist_sum": z(len(DISTANCE_METRICS), c),
                "score_sum": z(len(DISTANCE_METRICS), c),
                "dist_count": z(c),
                "cls": z(2),  # correct, total
                "pixels": z(2),  # correctly labelled, total
                "images": z(1),
            }  # fmt: skip
        return self._sums

    @torch.no_grad()
    def update(
        self,
        seg_logits: torch.Tensor,
        target: torch.Tensor,
        cls_logits: torch.Tensor | None = None,
        cls_target: torch.Tensor | None = None,
        ids: Sequence[Any] | None = None,
    ) -> None:
        """Add one batch given the network's raw logits.

        Args:
            seg_logits: segmentation logits (thresholded / argmaxed by :func:`predict_labels`).
            target: ground-truth labels (any dtype holding integer values).
            cls_logits: classifier logits, or ``None`` (no TTR from this batch).
            cls_target: classifier targets; required with ``cls_logits``.
            ids: one identifier per image for :meth:`per_image` (default: a running index on
                this process; pass real ids under DDP).

        Shape:
            seg_logits: (B, K, H, W); target: (B, H, W) or (B, 1, H, W); cls_logits: (B, J);
            cls_target: (B,).

        Raises:
            ValueError: inconsistent shapes, K different from ``num_classes``, labels out of
                range, or only one of ``cls_logits`` / ``cls_target``.
        """
        if not isinstance(seg_logits, torch.Tensor) or seg_logits.ndim != 4:
            shape = tuple(seg_logits.shape) if isinstance(seg_logits, torch.Tensor) else type(seg_logits).__name__
            raise ValueError(f"seg_logits must be a (B, K, H, W) tensor, got {shape}")
        if seg_logits.shape[1] != self.num_classes:
            raise ValueError(f"seg_logits has {seg_logits.shape[1]} channels but num_classes is {self.num_classes}")
        cls_pred = None if cls_logits is None else predict_classes(cls_logits, self.cls_threshold)
        self.update_labels(predict_labels(seg_logits, self.seg_threshold), target, cls_pred, cls_target, ids)

    @torch.no_grad()
    def update_labels(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        cls_pred: torch.Tensor | None = None,
        cls_target: torch.Tensor | None = None,
        ids: Sequence[Any] | None = None,
    ) -> None:
        """Add one batch given predicted label maps (and predicted classes).

        Same as :meth:`update` with ``pred = predict_labels(seg_logits)`` and
        ``cls_pred = predict_classes(cls_logits)``; shapes pred (B, H, W), cls_pred (B,).
        """
        if not isinstance(pred, torch.Tensor) or pred.ndim != 3:
            shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
            raise ValueError(f"pred must be a (B, H, W) label-map tensor, got {shape}")
        target = self._check_target(target, pred)
        b = pred.shape[0]
        ids = self._check_ids(ids, b)
        if (cls_pred is None) != (cls_target is None):
            raise ValueError("cls_logits/cls_pred and cls_target must be given together (or both None)")
        if cls_pred is not None:
            cls_target = torch.as_tensor(cls_target, device=pred.device)
            if cls_pred.shape != (b,) or cls_target.shape != (b,):
                raise ValueError(
                    f"classification predictions and targets must be ({b},), got "
                    f"{tuple(cls_pred.shape)} and {tuple(cls_target.shape)}"
                )
        self._add(pred, target, cls_pred, cls_target, ids)

    def _check_target(self, target: Any, pred: torch.Tensor) -> torch.Tensor:
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"target must be a tensor, got {type(target).__name__}")
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if target.shape != pred.shape:
            raise ValueError(
                f"target must be (B, H, W) or (B, 1, H, W) matching the prediction {tuple(pred.shape)}, "
                f"got {tuple(target.shape)}"
            )
        target = target.to(pred.device)
        if target.dtype.is_floating_point and not torch.equal(target, target.round()):
            raise ValueError("target holds non-integer values; expected class labels")
        return target.long()

    def _check_ids(self, ids: Sequence[Any] | None, b: int) -> list[Any]:
        if ids is None:
            ids = list(range(self._images, self._images + b))
        elif isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if len(ids) != b:
            raise ValueError(f"ids must have one entry per image ({b}), got {len(ids)}")
        self._images += b
        return ids

    def _add(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        cls_pred: torch.Tensor | None,
        cls_target: torch.Tensor | None,
        ids: list[Any],
    ) -> None:
        _check_label_maps(pred, target, max(self.num_classes, 2))
        s = self._state(pred.device)
        if pred.shape[0] == 0:
            return
        dev = s["tp"].device
        p, t = label_masks(pred, self.classes), label_masks(target, self.classes)
        tp, fp, fn = _confusion(p, t)
        s["tp"] += tp.sum(0).to(dev, torch.float64)
        s["fp"] += fp.sum(0).to(dev, torch.float64)
        s["fn"] += fn.sum(0).to(dev, torch.float64)
        s["images"] += pred.shape[0]
        # Trace of the confusion matrix over *all* label classes (not only the evaluated ones).
        correct = (pred == target).sum(dim=(-2, -1))
        s["pixels"] += torch.stack([correct.sum(), torch.tensor(target.numel(), device=correct.device)]).to(
            dev, torch.float64)
        row = {"ids": ids, "dsc": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
               "acc": correct.double() / (pred.shape[-2] * pred.shape[-1])}
        if self.distance_metrics:
            *d, both_empty = _distances_from_masks(p, t, self.spacing, self.backend)
            d = torch.stack(d).to(dev)  # (4, B, C)
            counted = ~both_empty.to(dev)
            diag = image_diagonal(*pred.shape[-2:], self.spacing)
            s["dist_sum"] += torch.where(counted, d, 0.0).sum(1)
            s["score_sum"] += torch.where(counted, d / diag, 0.0).sum(1)
            s["dist_count"] += counted.sum(0)
            row["dist"] = d
        if cls_pred is not None:
            correct = cls_pred.to(dev) == cls_target.to(dev)  # type: ignore[union-attr]
            s["cls"] += torch.stack([correct.sum(), torch.tensor(correct.numel(), device=dev)]).double()
            row["cls_pred"], row["cls_target"] = cls_pred, cls_target
        self._rows.append(row)

    # ----------------------------------------------------------------------------- results

    def _reduced(self) -> dict[str, torch.Tensor]:
        if not self._sums:
            # A rank that saw no batch still joins the all-reduce with zeros.
            self._state(self._fixed_device or torch.device("cpu"))
        names = list(self._sums)
        flat = torch.cat([self._sums[k].flatten() for k in names])  # a copy: compute() is repeatable
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        out, offset = {}, 0
        for k in names:
            size = self._sums[k].numel()
            out[k] = flat[offset : offset + size].reshape(self._sums[k].shape)
            offset += size
        return out

    def compute(self) -> dict[str, float]:
        """Every metric over all updates (and all DDP ranks): a collective call under DDP.

        Returns:
            ``{name: value}`` with ``ACC`` (pixel accuracy), ``DSC``, ``IoU`` (and ``DSC/<c>``, ``IoU/<c>`` per class);
            ``ASD``, ``AD``, ``HD95``, ``D95`` (and per class) when ``distance_metrics``;
            ``TTR`` when classification was given in any update; ``CMA`` when
            ``cma_coefficients`` was given. Plain floats, never NaN or inf.

        Raises:
            RuntimeError: no image was counted on any rank, or CMA needs ``TTR`` and no
                classification was given.
        """
        s = self._reduced()
        if s["images"].item() == 0:
            raise RuntimeError("SegmentationMetrics.compute() called before any image was counted")
        res: dict[str, float] = {}
        scores: dict[str, float] = {}
        correct_px, pixels = s["pixels"].tolist()
        res["ACC"] = correct_px / pixels if pixels > 0 else 1.0
        dsc = _ratio(2 * s["tp"], 2 * s["tp"] + s["fp"] + s["fn"])
        iou = _ratio(s["tp"], s["tp"] + s["fp"] + s["fn"])
        for name, per_class in (("DSC", dsc), ("IoU", iou)):
            res[name] = scores[name] = per_class.mean().item()
            res.update({f"{name}/{c}": v for c, v in zip(self.classes, per_class.tolist())})
        if self.distance_metrics:
            count = s["dist_count"].clamp(min=1)  # count 0: every image both-empty → 0 (agreement)
            means, norm = s["dist_sum"] / count, s["score_sum"] / count
            for k, name in enumerate(DISTANCE_METRICS):
                res[name] = means[k].mean().item()
                res.update({f"{name}/{c}": v for c, v in zip(self.classes, means[k].tolist())})
                scores[name] = 1.0 - norm[k].mean().item()
        correct, total = s["cls"].tolist()
        if total > 0:
            res["TTR"] = scores["TTR"] = correct / total
        if self.cma_coefficients is not None:
            missing = [m for m in self.cma_coefficients if m not in scores]
            if missing:
                raise RuntimeError(
                    f"CMA needs {missing}, which was not computed (TTR needs classifier logits in update())"
                )
            weight = sum(self.cma_coefficients.values())
            res["CMA"] = sum(w * scores[m] for m, w in self.cma_coefficients.items()) / weight
        return res

    def per_image(self) -> list[dict[str, Any]]:
        """One row per counted image on this process, for a CSV.

        Returns:
            Dicts with ``id``, ``ACC``, ``DSC/<c>``, ``IoU/<c>``, the four distances per class when
            ``distance_metrics`` (NaN where prediction and target are both empty), and
            ``cls_pred``, ``cls_target``, ``TTR`` (1.0 correct / 0.0 wrong) when classification
            was given for that batch.
        """
        rows: list[dict[str, Any]] = []
        for batch in self._rows:
            dsc, iou, acc = batch["dsc"].tolist(), batch["iou"].tolist(), batch["acc"].tolist()
            dists = batch["dist"].tolist() if "dist" in batch else None
            cls_p = batch["cls_pred"].tolist() if "cls_pred" in batch else None
            cls_t = batch["cls_target"].tolist() if "cls_pred" in batch else None
            for b, image_id in enumerate(batch["ids"]):
                row: dict[str, Any] = {"id": image_id, "ACC": acc[b]}
                for k, c in enumerate(self.classes):
                    row[f"DSC/{c}"], row[f"IoU/{c}"] = dsc[b][k], iou[b][k]
                if dists is not None:
                    for m, name in enumerate(DISTANCE_METRICS):
                        row.update({f"{name}/{c}": dists[m][b][k] for k, c in enumerate(self.classes)})
                if cls_p is not None:
                    row["cls_pred"], row["cls_target"] = cls_p[b], cls_t[b]  # type: ignore[index]
                    row["TTR"] = float(cls_p[b] == cls_t[b])  # type: ignore[index]
                rows.append(row)
        return rows

    def gather_per_image(self) -> list[dict[str, Any]]:
        """:meth:`per_image` rows of all DDP ranks (a collective call; every rank gets all rows).

        Rows are sorted by ``id`` when all ids are ints or all are strings, otherwise they are in
        rank order. Without an initialised process group this is :meth:`per_image`.
        """
        rows = self.per_image()
        if dist.is_available() and dist.is_initialized():
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        ids = [r["id"] for r in rows]
        if all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or all(isinstance(i, str) for i in ids):
            rows.sort(key=lambda r: r["id"])
        return rows
