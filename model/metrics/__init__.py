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

import importlib

#: Each re-exported name: the module that defines it. Imported on first use (PEP 562), so that
#: :mod:`model.metrics.names` (the metric names the configuration lists) needs no torch.
_EXPORTS = {
    "SegmentationMetrics": "accumulator",
    "labels_from_scores": "labels",
    "predict_classes": "labels",
    "predict_labels": "labels",
    "CMA_METRICS": "names",
    "DISTANCE_METRICS": "names",
    "HIGHER_IS_BETTER": "names",
    "METRIC_NAMES": "names",
    "DISTANCE_BACKENDS": "surface",
    "SurfaceDistances": "surface",
    "image_diagonal": "surface",
    "surface_distances": "surface",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
