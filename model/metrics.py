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

Surface distances
-----------------
* The surface of a mask is its edge pixels, ``mask XOR binary_erosion(mask)`` with the 4-connected
  cross and everything outside the image counted as background (:func:`utils.sdf.boundary`).
  This is exactly the edge set MONAI's ``get_mask_edges`` produces (it crops to the union's
  bounding box with a margin of 1, zero-padding where the box leaves the image, so its erosion
  also treats the outside as background; distances do not depend on the crop offset).
* Distances are exact Euclidean distances from each edge pixel to the nearest edge pixel of the
  other mask, edge to edge, in pixels, or in physical units when ``spacing = (row, column)``
  pixel size is given (coordinates are scaled before measuring, as MONAI does).
* Per image and class, with ``d(P->G)`` the distances from prediction edges to target edges:

  - ``AD``   = mean of d(P->G)                                  (one-way average distance)
  - ``ASD``  = mean of the union d(P->G) + d(G->P), i.e. (sum + sum) / (n_P + n_G)
  - ``D95``  = 95th percentile of d(P->G)                       (one-way)
  - ``HD95`` = max(95th pct of d(P->G), 95th pct of d(G->P))     (symmetric)

  Percentiles use linear interpolation between order statistics (``torch.quantile`` /
  ``numpy.percentile`` default). These equal, to float32 rounding, MONAI's
  ``compute_average_surface_distance(symmetric=False)`` (AD), ``(symmetric=True)`` (ASD),
  ``compute_hausdorff_distance(percentile=95, directed=True)`` (D95) and
  ``(percentile=95)`` (HD95), applied to the one-hot masks, for every class whose prediction and
  target are both non-empty. Note two MONAI defaults that differ from the names above: its
  ``compute_average_surface_distance`` is one-way unless ``symmetric=True``, and it drops channel
  0 unless ``include_background=True``.
* Empty masks (where MONAI returns NaN or inf):

  - prediction and target both empty: the image is excluded from that class's distance average
    (Dice/IoU count it as agreement). In the per-image rows its distances are NaN
    ("not applicable"), so a NaN-skipping mean of a CSV column reproduces the summary value.
  - exactly one of them empty (a missed or a hallucinated object): every distance of that image
    and class is the worst case, the image diagonal ``sqrt((H * row)^2 + (W * column)^2)`` in the
    spacing's units, which exceeds any distance between two pixels of the image. These images
    are counted, never dropped: dropping them (as MONAI does) would make a model that misses more
    objects report a *better* HD95.
  - a class that is both-empty in every image of the set scores distance 0 (perfect agreement,
    as its Dice is 1).

* Dataset values are the mean over the counted images of the per-image values (sums and counts,
  all-reduced over DDP ranks), per class; the unsuffixed value is the mean over classes.

CMA
---
``CMA = sum_m w_m * score_m / sum_m w_m`` over the user's coefficients ``{metric: weight}``
(weights >= 0, not all 0), with ``score = DSC, IoU, TTR`` as they are and, for a distance metric,
``score = 1 - mean over classes of (mean over images of d / diagonal)``. Each image's ``d``
lies in [0, diagonal] (the worst case is the diagonal itself), so every score and CMA lie in
[0, 1] and higher is better; the mapping is linear, so it ranks models exactly as the distance
does, and it needs no scale parameter. With images of one size the score is ``1 - d / diagonal``.

Speed
-----
Edges are computed once per batch and shared by all four distance metrics, and each direction's
nearest-edge distances are computed once. On a CPU tensor the default backend builds a KD-tree
(``scipy.spatial.cKDTree``) over each mask's sparse edge points. On any other device the default
``"torch"`` backend runs without a Python loop over images: a cumulative max/min scan gives every
pixel's distance to the nearest edge pixel in its row, and each edge point of the other mask then
takes the exact minimum over its column, ``min_k (g[k, j]^2 + (i - k)^2)``, for all edge points of
the batch at once (in chunks that bound the memory).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from scipy.spatial import cKDTree

from utils.sdf import boundary, label_masks, spacing_pair
from utils.util import check_choice

__all__ = [
    "CMA_METRICS",
    "DISTANCE_BACKENDS",
    "DISTANCE_METRICS",
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "SegmentationMetrics",
    "SurfaceDistances",
    "confusion_counts",
    "image_diagonal",
    "predict_classes",
    "predict_labels",
    "surface_distances",
]

#: Whether a larger value is better, for every metric name (model selection by EVAL_METRIC).
HIGHER_IS_BETTER: dict[str, bool] = {
    "DSC": True,
    "IoU": True,
    "TTR": True,
    "ASD": False,
    "AD": False,
    "HD95": False,
    "D95": False,
    "CMA": True,
}
#: Every metric name, in report order (the valid EVAL_METRIC values).
METRIC_NAMES: tuple[str, ...] = tuple(HIGHER_IS_BETTER)
#: The surface-distance metrics (switched on and off together).
DISTANCE_METRICS: tuple[str, ...] = ("ASD", "AD", "HD95", "D95")
#: Metrics that may carry a CMA coefficient.
CMA_METRICS: tuple[str, ...] = tuple(m for m in METRIC_NAMES if m != "CMA")
#: Backends of :func:`surface_distances`.
DISTANCE_BACKENDS: tuple[str, ...] = ("auto", "kdtree", "torch")

_PERCENTILE = 0.95
# The torch backend materialises (edge points in a chunk) x H candidate distances; 2^24 float32
# values (64 MiB) per chunk keeps the working set small on any device while each chunk is still
# large enough to amortise kernel launches.
_TORCH_CHUNK_ELEMENTS = 1 << 24


class SurfaceDistances(NamedTuple):
    """Per-image, per-class surface distances (see the module docstring for the definitions).

    Every tensor is (B, C) float64 on the input's device, C = number of evaluated classes (in
    ``classes`` order). Entries where prediction and target are both empty are NaN (excluded);
    entries where exactly one is empty equal ``diagonal``.
    """

    asd: torch.Tensor
    ad: torch.Tensor
    hd95: torch.Tensor
    d95: torch.Tensor
    both_empty: torch.Tensor
    classes: tuple[int, ...]
    diagonal: float


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
    threshold = _check_threshold("threshold", threshold)
    logits = seg_logits.detach()
    if logits.shape[1] == 1:
        # fp32 so that a bf16/fp16 logit near the threshold is not rounded across it
        return (logits[:, 0].float().sigmoid() > threshold).long()
    return logits.argmax(dim=1)


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
    threshold = _check_threshold("threshold", threshold)
    logits = cls_logits.detach()
    if logits.shape[1] == 1:
        return (logits[:, 0].float().sigmoid() > threshold).long()
    return logits.argmax(dim=1)


# --------------------------------------------------------------------------------- overlap


def confusion_counts(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, include_background: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positives, false positives and false negatives per image and class.

    Args:
        pred: predicted label map.
        target: ground-truth label map.
        num_classes: segmentation channels K (1 = binary labels {0, 1}; K >= 2 = labels 0 ... K-1).
        include_background: also count class 0.

    Shape:
        pred, target: (B, H, W). Each output: (B, C), C = evaluated classes.

    Returns:
        ``(tp, fp, fn)``, int64 on the inputs' device.

    Raises:
        ValueError: bad shapes, dtypes or labels outside the class range.
    """
    num_classes = _check_num_classes(num_classes)
    _check_label_maps(pred, target, max(num_classes, 2))
    classes = _classes(num_classes, include_background)
    return _confusion(label_masks(pred, classes), label_masks(target, classes))


def _confusion(p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tp = (p & t).sum(dim=(-2, -1))
    fp = p.sum(dim=(-2, -1)) - tp
    fn = t.sum(dim=(-2, -1)) - tp
    return tp, fp, fn


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 / 0 = 1 (nothing to find and nothing found is agreement)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(num))


# --------------------------------------------------------------------------------- distances


def image_diagonal(height: int, width: int, spacing: float | Sequence[float] | None = None) -> float:
    """The worst-case distance: ``sqrt((H * row)^2 + (W * column)^2)``, in the spacing's units.

    It exceeds the distance between any two pixel centres of the image, so a missed or
    hallucinated object always scores worse than any real prediction.
    """
    sy, sx = spacing_pair(spacing)
    return math.hypot(height * sy, width * sx)


def surface_distances(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    include_background: bool = False,
    backend: str = "auto",
) -> SurfaceDistances:
    """ASD, AD, HD95 and D95 per image and class, edge to edge, exact Euclidean.

    Definitions, MONAI equivalence and empty-mask handling are in the module docstring.

    Args:
        pred: predicted label map.
        target: ground-truth label map.
        num_classes: segmentation channels K (1 = binary labels {0, 1}; K >= 2 = labels 0 ... K-1).
        spacing: pixel size, ``None`` (pixels), a number (isotropic) or ``(row, column)``.
        include_background: also evaluate class 0.
        backend: ``"kdtree"`` (SciPy KD-tree per image, CPU), ``"torch"`` (batched, no loop over
            images, any device) or ``"auto"`` (``kdtree`` for CPU tensors, ``torch`` otherwise).
            Both give the same values (float32 rounding of the distances aside).

    Shape:
        pred, target: (B, H, W). Outputs: (B, C), C = evaluated classes.

    Returns:
        :class:`SurfaceDistances` on the inputs' device.

    Raises:
        ValueError: bad shapes, dtypes, labels, ``spacing`` or ``backend``.
    """
    num_classes = _check_num_classes(num_classes)
    _check_label_maps(pred, target, max(num_classes, 2))
    scale = spacing_pair(spacing)
    check_choice("backend", backend, DISTANCE_BACKENDS)
    classes = _classes(num_classes, include_background)
    p, t = label_masks(pred, classes), label_masks(target, classes)
    *d, both_empty = _distances_from_masks(p, t, scale, backend)
    return SurfaceDistances(*d, both_empty=both_empty, classes=classes, diagonal=image_diagonal(*p.shape[-2:], scale))


def _distances_from_masks(
    p: torch.Tensor, t: torch.Tensor, scale: tuple[float, float], backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ASD, AD, HD95, D95, both_empty), each shaped like ``p.shape[:-2]``, from bool masks (..., H, W).

    A non-empty mask always has an edge pixel (its top row borders background or the outside),
    so "no edge pixels" is "empty mask".
    """
    lead, (h, w) = p.shape[:-2], p.shape[-2:]
    n = int(np.prod(lead)) if lead else 1
    # Edges once for both masks; maps 0..n-1 are the prediction's, n..2n-1 the target's.
    edges = boundary(torch.cat([p.reshape(n, h, w), t.reshape(n, h, w)]))
    if backend == "torch" or (backend == "auto" and edges.device.type != "cpu"):
        seg, dist_ = _nearest_edge_torch(edges, scale)
    else:
        seg, dist_ = _nearest_edge_kdtree(edges, scale)
    counts, sums, q95 = _segment_stats(seg, dist_, 2 * n, _PERCENTILE)
    n_p, n_g = counts[:n], counts[n:]
    s_pg, s_gp = sums[:n], sums[n:]
    q_pg, q_gp = q95[:n], q95[n:]
    asd = (s_pg + s_gp) / (n_p + n_g).clamp(min=1)
    ad = s_pg / n_p.clamp(min=1)
    hd95 = torch.maximum(q_pg, q_gp)
    d95 = q_pg
    # Empty cases replace whatever the arithmetic gave (inf from "no edge in the other mask").
    both_empty = (n_p == 0) & (n_g == 0)
    one_empty = (n_p == 0) ^ (n_g == 0)
    diag = image_diagonal(h, w, scale)
    out = []
    for v in (asd, ad, hd95, d95):
        v = torch.where(one_empty, torch.full_like(v, diag), v)
        v = torch.where(both_empty, torch.full_like(v, float("nan")), v)
        out.append(v.reshape(lead))
    return (*out, both_empty.reshape(lead))  # type: ignore[return-value]


def _nearest_edge_kdtree(edges: torch.Tensor, scale: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """For every edge point, the distance to the nearest edge point of the paired map (KD-tree).

    ``edges`` (2n, H, W): map m < n is paired with map m + n and vice versa. Returns the map index
    of each edge point (non-decreasing) and its distance (float64, inf if the paired map is empty).
    """
    e = edges.cpu().numpy()
    two_n = e.shape[0]
    n = two_n // 2
    # flatnonzero + divmod is ~20x faster than a 3-D np.nonzero on a large stack
    flat = np.flatnonzero(e)
    seg, pix = np.divmod(flat, e.shape[1] * e.shape[2])
    rows, cols = np.divmod(pix, e.shape[2])
    pts = np.stack([rows * scale[0], cols * scale[1]], axis=1)
    counts = np.bincount(seg, minlength=two_n)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    out = np.full(len(seg), np.inf)
    for m in range(n):
        a, b = slice(bounds[m], bounds[m + 1]), slice(bounds[m + n], bounds[m + n + 1])
        if counts[m] and counts[m + n]:
            # Unbalanced trees build faster and query as fast here: each tree serves one query.
            out[a] = cKDTree(pts[b], leafsize=32, balanced_tree=False).query(pts[a], k=1)[0]
            out[b] = cKDTree(pts[a], leafsize=32, balanced_tree=False).query(pts[b], k=1)[0]
    return torch.from_numpy(seg).to(edges.device), torch.from_numpy(out).to(edges.device)


def _nearest_edge_torch(edges: torch.Tensor, scale: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`_nearest_edge_kdtree`, batched in torch on ``edges``' device.

    Exact separable search: ``g[m, k, j]`` = horizontal distance from (k, j) to the nearest edge
    pixel of map m in row k (two cumulative scans), then for an edge point (i, j) of the paired
    map, ``d^2 = min_k (g[m, k, j] * sx)^2 + ((i - k) * sy)^2`` over the whole column. Squared pixel
    distances are integers, exact in float32 up to 2^24, so the only rounding is the square root
    (and the spacing's product when one is given).
    """
    two_n, h, w = edges.shape
    n = two_n // 2
    dev = edges.device
    sy, sx = scale
    col = torch.arange(w, device=dev, dtype=torch.int32)  # int32 halves the scans' memory
    # Sentinels put "no edge on this side" at least w away, so gap >= w means no edge in the row.
    left = torch.where(edges, col, -2 * w).cummax(dim=-1).values
    right = torch.where(edges, col, 3 * w).flip(-1).cummin(dim=-1).values.flip(-1)
    gap = torch.minimum(col - left, right - col)
    gx2 = torch.where(gap < w, (gap.float() * sx).square(), torch.full_like(gap, float("inf"), dtype=torch.float32))
    gx2_cols = gx2.transpose(1, 2).contiguous()  # (2n, W, H): one column is a contiguous row
    seg, i, j = edges.nonzero(as_tuple=True)
    paired = torch.remainder(seg + n, two_n)
    rows = torch.arange(h, device=dev, dtype=torch.float32)
    d2 = torch.empty(seg.shape[0], device=dev, dtype=torch.float32)
    step = max(1, _TORCH_CHUNK_ELEMENTS // h)
    for start in range(0, seg.shape[0], step):  # chunks of points, not a loop over images
        sl = slice(start, start + step)
        cand = gx2_cols[paired[sl], j[sl]]  # (q, H)
        cand += ((i[sl, None].float() - rows) * sy).square()
        d2[sl] = cand.amin(dim=1)
    return seg, d2.sqrt().double()


def _segment_stats(
    seg: torch.Tensor, values: torch.Tensor, n_seg: int, q: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, sum and q-quantile (linear interpolation, as ``torch.quantile``) per segment.

    ``seg`` holds each value's segment index; segments without values get quantile NaN.
    """
    dev = values.device
    counts = torch.bincount(seg, minlength=n_seg)
    sums = torch.zeros(n_seg, dtype=torch.float64, device=dev).index_add_(0, seg, values)
    if values.numel() == 0:
        return counts, sums, torch.full((n_seg,), float("nan"), dtype=torch.float64, device=dev)
    # Sort by value, then stably by segment: each segment's values become contiguous and sorted.
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(seg[order], stable=True)]
    ordered = values[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = q * (counts - 1).clamp(min=0).double()
    lo, hi = rank.floor().long(), rank.ceil().long()
    last = values.numel() - 1
    v_lo = ordered[(starts + lo).clamp(max=last)]
    v_hi = ordered[(starts + hi).clamp(max=last)]
    quant = v_lo + (v_hi - v_lo) * (rank - lo.double())
    quant = torch.where(counts > 0, quant, torch.full_like(quant, float("nan")))
    return counts, sums, quant


# --------------------------------------------------------------------------------- accumulator


class SegmentationMetrics:
    """Accumulates segmentation (and tile-classification) statistics over an evaluation set.

    Per batch, :meth:`update` adds per-class tp/fp/fn, correctly labelled and total pixels, per-class sums and counts of the four
    surface distances (and of distance / diagonal, for CMA), and classification correct/total;
    :meth:`compute` all-reduces these sums over ``torch.distributed`` (when initialised) and
    returns every metric once. Definitions are in the module docstring.

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
