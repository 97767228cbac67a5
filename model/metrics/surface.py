"""Exact surface distances (ASD, AD, HD95, D95) per image and class, edge to edge.

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
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.spatial import cKDTree

from model.metrics.labels import _check_label_maps, _check_num_classes, _classes
from utils.sdf import boundary, label_masks, spacing_pair
from utils.choices import check_choice

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
