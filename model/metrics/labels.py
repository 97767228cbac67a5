"""Label maps: the one rule that turns the network's outputs into labels (:func:`labels_from_scores`,
used by the metrics, the predictor and the figures), and the checks on label maps that the surface
distances and the accumulator share (conventions in :mod:`model.metrics`).
"""

from __future__ import annotations

from typing import Any

import torch


# --------------------------------------------------------------------------------- validation


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"num_classes must be an int >= 1 (1 = binary, K >= 2 = K classes incl. background), "
            f"got {num_classes!r}"
        )
    return num_classes


def _check_threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_label_maps(pred: Any, target: Any, num_labels: int) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (B, H, W) label-map tensor, got {shape}")
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(f"{name} must hold integer labels (e.g. int64), got dtype {t.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target are on different devices: {pred.device} vs {target.device}")
    for name, t in (("pred", pred), ("target", target)):
        if t.numel():
            lo, hi = (int(v) for v in torch.aminmax(t if t.dtype != torch.bool else t.byte()))
            if lo < 0 or hi >= num_labels:
                raise ValueError(f"{name} labels must lie in [0, {num_labels - 1}], got values in [{lo}, {hi}]")


def _classes(num_classes: int, include_background: bool) -> tuple[int, ...]:
    return tuple(range(0 if include_background else 1, max(num_classes, 2)))


# --------------------------------------------------------------------------------- predictions


def labels_from_scores(scores: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Labels from per-class scores: the one rule by which outputs become labels.

    One output (K = 1) is the foreground probability: foreground where ``score > threshold``.
    K >= 2 outputs: ``argmax`` over them, the first on a tie (``threshold`` is not used); softmax
    keeps the order of the logits, so either may be given. :func:`predict_labels` and
    :func:`predict_classes` call it with the logits (their sigmoid for K = 1), the predictor with
    its blended probabilities.

    Args:
        scores: K = 1: probabilities; K >= 2: logits or probabilities.
        threshold: foreground probability threshold for K = 1, in [0, 1].

    Shape:
        scores: (B, K, ...). Returns (B, ...).

    Returns:
        int64 labels on ``scores``' device, values in {0, 1} (K = 1) or 0 ... K-1.

    Raises:
        ValueError: ``scores`` is not a tensor of at least 2 dims, or ``threshold`` is outside [0, 1].
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim < 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a (B, K, ...) tensor, got {shape}")
    threshold = _check_threshold("threshold", threshold)
    if scores.shape[1] == 1:
        return (scores[:, 0] > threshold).long()
    return scores.argmax(dim=1)


def predict_labels(seg_logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Label map from segmentation logits.

    Args:
        seg_logits: raw logits. K = 1: binary, foreground where ``sigmoid(logit) > threshold``.
            K >= 2: ``argmax`` over the K classes (``threshold`` is not used).
        threshold: foreground probability threshold for K = 1, in [0, 1].

    Shape:
        seg_logits: (B, K, H, W). Returns (B, H, W).

    Returns:
        int64 label map on ``seg_logits``' device, values in {0, 1} (K = 1) or 0 ... K-1.

    Raises:
        ValueError: ``seg_logits`` is not a 4-D tensor, or ``threshold`` is outside [0, 1].
    """
    if not isinstance(seg_logits, torch.Tensor) or seg_logits.ndim != 4:
        shape = tuple(seg_logits.shape) if isinstance(seg_logits, torch.Tensor) else type(seg_logits).__name__
        raise ValueError(f"seg_logits must be a (B, K, H, W) tensor, got {shape}")
    logits = seg_logits.detach()
    # fp32 so that a bf16/fp16 logit near the threshold is not rounded across it
    return labels_from_scores(logits.float().sigmoid() if logits.shape[1] == 1 else logits, threshold)


def predict_classes(cls_logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Class predictions from classification logits.

    Args:
        cls_logits: raw logits. J = 1: positive where ``sigmoid(logit) > threshold``;
            J >= 2: ``argmax`` (``threshold`` is not used).
        threshold: positive-class probability threshold for J = 1, in [0, 1].

    Shape:
        cls_logits: (B, J). Returns (B,).

    Returns:
        int64 class indices on ``cls_logits``' device.

    Raises:
        ValueError: ``cls_logits`` is not a 2-D tensor, or ``threshold`` is outside [0, 1].
    """
    if not isinstance(cls_logits, torch.Tensor) or cls_logits.ndim != 2:
        shape = tuple(cls_logits.shape) if isinstance(cls_logits, torch.Tensor) else type(cls_logits).__name__
        raise ValueError(f"cls_logits must be a (B, J) tensor, got {shape}")
    logits = cls_logits.detach()
    return labels_from_scores(logits.float().sigmoid() if logits.shape[1] == 1 else logits, threshold)
