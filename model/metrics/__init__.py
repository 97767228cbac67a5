"""Segmentation and classification metrics: Dice, IoU, TTR and exact surface distances.

Everything here takes plain tensors and arguments (no config object) and works on the tensors'
own device. The accumulator :class:`SegmentationMetrics` sums statistics batch by batch,
all-reduces them over ``torch.distributed`` and computes every metric once at the end.

Conventions
-----------
* ``num_classes`` is the number of segmentation output channels K (the ``SEG_CLASSES`` option):
  K = 1 is binary (sigmoid; label maps hold {0, 1}), K >= 2 is multi-class softmax (label maps
  hold 0 ... K-1, class 0 is the background). A binary problem therefore has the two label
  classes {0, 1}; class 1 is its foreground.
* Metrics are reported per class (``DSC/1``, ``HD95/2``, ...) for the foreground classes 1 ... ,
  and for class 0 as well when ``include_background`` is set. The unsuffixed name (``DSC``) is the
  mean of the per-class values over those classes.
* Classification (the tile classifier): logits (B, J); J = 1 is sigmoid with ``cls_threshold``,
  J >= 2 is argmax. ``TTR`` is the accuracy, correct / total over the whole evaluation set.

Modules
-------
* :mod:`model.metrics.names`: every metric name, which way is better, the distance metrics.
* :mod:`model.metrics.labels`: the one rule from outputs to labels and classes; checks on label maps.
* :mod:`model.metrics.surface`: the four surface distances per image and class (definitions there).
* :mod:`model.metrics.accumulator`: :class:`SegmentationMetrics`
  (pixel accuracy, Dice, IoU, TTR and CMA definitions there).
"""

from model.metrics.accumulator import SegmentationMetrics
from model.metrics.labels import labels_from_scores, predict_classes, predict_labels
from model.metrics.names import CMA_METRICS, DISTANCE_METRICS, HIGHER_IS_BETTER, METRIC_NAMES
from model.metrics.surface import DISTANCE_BACKENDS, SurfaceDistances, image_diagonal, surface_distances

__all__ = [
    "CMA_METRICS",
    "DISTANCE_BACKENDS",
    "DISTANCE_METRICS",
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "SegmentationMetrics",
    "SurfaceDistances",
    "image_diagonal",
    "labels_from_scores",
    "predict_classes",
    "predict_labels",
    "surface_distances",
]

