"""Distance transforms, signed distance maps and object boundaries, on the tensor's own device.

Conventions (shared by the losses and metrics built on this module):

* A *mask* is a stack of 2-D maps with the last two dims (H, W). Its nonzero pixels are the
  foreground (SciPy's reading of a binary image), except for ``method="conv"``, which reads a
  floating mask as soft foreground (see :func:`distance_transform`).
* :func:`distance_transform` gives every pixel its distance to the nearest foreground pixel (0 on
  the foreground itself) -- the opposite reading of SciPy's ``distance_transform_edt(x)``, which
  measures the distance of each *nonzero* pixel to the nearest *zero*:
  ``distance_transform(m) == distance_transform_edt(m == 0)``.
* :func:`signed_distance_map` is positive outside the object, negative inside and zero on its
  inner edge, as in the boundary-loss reference (Kervadec et al., "Boundary loss for highly
  unbalanced segmentation"): ``neg·edt(neg) − (edt(pos) − 1)·pos`` with SciPy's ``edt``.
* Distances are in pixels, or in physical units when ``spacing`` (row, column) is given.

Two methods:

* ``exact`` (:mod:`utils.sdf_exact`): exact distances for all three metrics. CPU tensors use the
  ``edt`` package (or SciPy) per map; other devices use a pure-torch separable algorithm (column
  offsets by prefix scans, then a windowed min-plus row pass that widens only where a pixel can
  still improve).
* ``conv`` (:mod:`utils.sdf_conv`): a cascade of 1-D min-plus convolutions that is differentiable
  with respect to a soft mask; exact for manhattan and (isotropic) chebyshev, a chamfer
  approximation for euclidean (error bounds in :func:`distance_transform`).

This module checks the arguments and holds the public functions; the two method modules compute.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from utils.sdf_conv import conv_distance, offset_length
from utils.sdf_choices import DISTANCES, NORMALIZATIONS
from utils.sdf_exact import BACKENDS, exact_distance, exact_sdm_cpu, exact_torch, resolve_backend
from utils.choices import check_choice

__all__ = [
    "BACKENDS",
    "BOUNDARY_METHODS",
    "DISTANCES",
    "METHODS",
    "NORMALIZATIONS",
    "TARGETS",
    "boundary",
    "check_kernel_size",
    "distance_transform",
    "label_masks",
    "max_distance",
    "normalize_sdm",
    "signed_distance_map",
    "spacing_pair",
]

METHODS = ("exact", "conv")
BOUNDARY_METHODS = ("erosion", "sobel")
TARGETS = ("foreground", "boundary")

Spacing = Union[None, float, Sequence[float]]

# ----------------------------------------------------------------------------- argument checks


def spacing_pair(spacing: Spacing) -> tuple[float, float]:
    """(row, column) pixel size from None, one number or a pair; ValueError otherwise."""
    if spacing is None:
        return 1.0, 1.0
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.tolist()
    if isinstance(spacing, (int, float, np.number)) and not isinstance(spacing, bool):
        pair = (float(spacing), float(spacing))
    else:
        try:
            pair = tuple(float(s) for s in spacing)
        except (TypeError, ValueError):
            pair = ()
    if len(pair) != 2 or not all(math.isfinite(s) and s > 0 for s in pair):
        raise ValueError(
            f"spacing={spacing!r} must be None, a positive number or a (row, column) pair of positive numbers"
        )
    return pair


def check_kernel_size(kernel_size, name: str = "kernel_size") -> int:
    """``kernel_size`` as an int; a ValueError naming ``name`` unless it is an odd int >= 3."""
    if (isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, np.integer))
            or kernel_size < 3 or kernel_size % 2 == 0):
        raise ValueError(f"{name}={kernel_size!r} must be an odd int >= 3 (e.g. 3, 5, 7)")
    return int(kernel_size)


def _check_h(h) -> float:
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h <= 0:
        raise ValueError(f"h={h!r} must be a positive finite number")
    return float(h)


def _check_mask(mask, min_ndim: int = 2) -> None:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.ndim < min_ndim:
        raise ValueError(f"mask must have at least {min_ndim} dims (..., H, W), got shape {tuple(mask.shape)}")
    if mask.shape[-1] == 0 or mask.shape[-2] == 0:
        raise ValueError(f"mask must have non-empty spatial dims (H, W), got shape {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"mask must be real (bool, integer or floating), got dtype {mask.dtype}")


def _result_dtype(mask: torch.Tensor) -> torch.dtype:
    # fp32 for everything (half precision cannot hold distances of large tiles to 1e-4 px); fp64
    # inputs keep fp64 so that gradients can be checked against finite differences.
    return torch.float64 if mask.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- boundary


def boundary(mask: torch.Tensor, method: str = "erosion") -> torch.Tensor:
    """Edge pixels of a binary mask.

    ``erosion``: ``mask XOR binary_erosion(mask)`` with the 4-connected (cross) structuring
    element and everything outside the image counted as background, i.e. exactly
    ``mask ^ scipy.ndimage.binary_erosion(mask)`` with SciPy's defaults, applied per 2-D map:
    the object's inner edge, one pixel wide.

    ``sobel``: pixels where the 3×3 Sobel gradient of the mask (mirror padding, so the image
    border is not an edge) is nonzero, as in the original AuxNet's ``compute_sobel_edges``
    per channel: a band about two pixels wide that straddles the edge (inner and outer pixels,
    diagonal neighbours included). Equals ``hypot(ndimage.sobel(m, 0, mode="mirror"),
    ndimage.sobel(m, 1, mode="mirror")) > 0``.

    Args:
        mask: binary mask, any dtype (nonzero = foreground); the last two dims are (H, W).
        method: ``"erosion"`` or ``"sobel"``.

    Shape:
        mask: (..., H, W). Returns the same shape.

    Returns:
        Bool tensor, True on edge pixels, on ``mask``'s device.

    Raises:
        ValueError: unknown ``method``, or ``mask`` not a tensor with at least 2 dims.
    """
    check_choice("method", method, BOUNDARY_METHODS)
    _check_mask(mask)
    m = mask.bool()
    h, w = m.shape[-2:]
    if method == "erosion":
        x = F.pad(m.reshape(-1, 1, h, w).to(torch.uint8), (1, 1, 1, 1), value=0)
        eroded = (
            x[..., 1:-1, 1:-1] & x[..., :-2, 1:-1] & x[..., 2:, 1:-1] & x[..., 1:-1, :-2] & x[..., 1:-1, 2:]
        )
        return m & ~eroded.reshape(m.shape).bool()

    # Mirror padding by index (F.pad's "reflect" refuses a side of length 1, where the mirror
    # image is the pixel itself).
    rows = torch.tensor([min(1, h - 1), *range(h), max(h - 2, 0)], device=m.device)
    cols = torch.tensor([min(1, w - 1), *range(w), max(w - 2, 0)], device=m.device)
    x = m.reshape(-1, 1, h, w).float().index_select(2, rows).index_select(3, cols)
    # Small integers: the fp32 convolution is exact, so "nonzero" needs no tolerance.
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=m.device)
    kernels = torch.stack([sobel_x, sobel_x.T]).unsqueeze(1)
    with torch.autocast(device_type=m.device.type, enabled=False):
        grads = F.conv2d(x, kernels)
    return (grads != 0).any(dim=1).reshape(m.shape)


# ----------------------------------------------------------------------------- helpers


def max_distance(height: int, width: int, distance: str = "euclidean", spacing: Spacing = None) -> float:
    """Largest distance between two pixels of a ``height`` × ``width`` tile.

    It bounds every value of :func:`signed_distance_map` (|φ| ≤ this), so ``static_max``
    normalisation divides by it to map all tiles of one size into [-1, 1] with one constant.

    Args:
        height: tile height H >= 1 (pixels).
        width: tile width W >= 1 (pixels).
        distance: ``"euclidean"``, ``"manhattan"`` or ``"chebyshev"``.
        spacing: pixel size (row, column), one number for both, or None (pixels).

    Returns:
        The distance between opposite corners: ``hypot(sy·(H−1), sx·(W−1))``,
        ``sy·(H−1) + sx·(W−1)`` or ``max(sy·(H−1), sx·(W−1))``. 0.0 for a 1×1 tile.

    Raises:
        ValueError: non-positive sizes, unknown ``distance`` or bad ``spacing``.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    check_choice("distance", distance, DISTANCES)
    sy, sx = spacing_pair(spacing)
    return offset_length(distance, sy * (height - 1), sx * (width - 1))


# ----------------------------------------------------------------------------- public API


def _as_maps(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *mask.shape[-2:])


def distance_transform(
    mask: torch.Tensor,
    distance: str = "euclidean",
    method: str = "exact",
    spacing: Spacing = None,
    kernel_size: int = 3,
    *,
    target: str = "foreground",
    boundary_method: str = "erosion",
    h: float = 0.35,
    backend: str = "auto",
) -> torch.Tensor:
    """Distance of every pixel to the nearest foreground (or edge) pixel, per 2-D map.

    ``distance_transform(m)`` equals ``scipy.ndimage.distance_transform_edt(m == 0, sampling=spacing)``
    (and ``distance_transform_cdt(m == 0, metric="taxicab" | "chessboard")`` for manhattan /
    chebyshev); 0 on the foreground, +inf everywhere in a map without foreground (SciPy measures
    such a map to a phantom point outside the image; no distance exists).

    ``method="exact"`` (exact to 1e-4 px, with spacing; no gradient):

    * CPU tensors: ``backend="auto"`` uses the ``edt`` package for euclidean (faster than SciPy;
      SciPy's EDT when ``edt`` is not installed -- same numbers) and SciPy's
      ``distance_transform_cdt`` for manhattan / chebyshev with isotropic spacing (torch otherwise).
    * Other devices: pure torch on the tensor's device (``backend="torch"``, which also runs on
      CPU): the 1-D distance to the nearest source of each column by two prefix scans, then an
      exact row pass -- cummin for manhattan; for euclidean / chebyshev a min-plus / min-max search
      that stops, pixel by pixel, once no farther column can win (radius 8 for all pixels, then
      doubling for the remaining ones only). Batched over all maps, memory bounded by chunks of
      2^24 elements. On the CPU it is slower than ``edt`` (``bench/sdm.py`` measures both), which is
      why CPU tensors go to ``edt`` / SciPy.

    ``method="conv"`` (differentiable, fp32 even under autocast, fp64 for fp64 input): a cascade of
    min-plus convolutions, the hard-minimum counterpart of Pham et al.'s cascaded soft-min
    convolutions (GCPR 2020; kornia's ``distance_transform``). The result is
    ``min over sources q of (cost(q) + chamfer(p, q))``:

    * Soft sources: a pixel of value v in (0, 1] is a source at cost ``h·(1 − v)/v`` px (0 for
      v = 1, h for v = 0.5, 9h for v = 0.1, → ∞ as v → 0); v = 0 is no source. For a confident
      probability map the result is therefore that of the thresholded map (a background pixel at
      v = 1e-4 costs 3500 px at h = 0.35), so the SDM of a good prediction matches the target's.
      (Pham / kornia's soft minimum gives v the cost ``−h·log v``, only 3.2 px for v = 1e-4, which
      caps every distance of a sigmoid output at a few pixels.)
    * Gradient: differentiable almost everywhere; the gradient of a pixel's distance reaches the
      value of its nearest source (through its cost), and ``signed_distance_map`` adds the
      gradient of its ``pos`` / ``neg`` blending.
    * Speed: kornia runs ``max(H, W) / (k // 2)`` full-image k×k convolutions (one per pixel of
      distance). Here the cascade of each kernel direction (each primitive offset (a, b) of the
      k×k kernel) is run to its fixed point in a single pass: along every lattice line of that
      direction ``y[t] = min_u (x[u] + |t − u|·len(a, b))``, i.e. two running minima (cummin).
      The passes commute, so 4 passes (k=3), 8 (k=5) or 16 (k=7) give the exact shortest-path
      (chamfer) distance with the kernel's moves -- no iteration count, no early exit needed.
    * Hard minima, not log-sum-exp: a soft minimum that carries distances forward loses up to
      ``h·log(#near-ties)`` at every step, and the losses add up along the path; kornia avoids the
      build-up by re-binarising its front, which is why its result follows the number of steps
      (up to 29 % short on diagonals).

    Accuracy of ``conv`` for a binary mask:

    * manhattan, and chebyshev with isotropic spacing: exact, any ``kernel_size`` (tested against
      SciPy's ``distance_transform_cdt``).
    * euclidean: the chamfer distance of the k×k kernel's moves, never below the true distance and
      at most ``1/cos(θ/2) − 1`` above it (θ: widest angle between neighbouring moves): +8.2 %
      (k=3), +2.8 % (k=5), +1.3 % (k=7); exact along the moves' directions. Measured by
      ``bench/sdm.py`` on 16 random-blob masks of 512² (distances up to ~190 px, mean ~31 px),
      error vs SciPy in px, max / mean overall and max / mean within 10 px of the object:
      k=3: 15.1 / 1.36 and 0.81 / 0.18; k=5: 5.74 / 0.38 and 0.25 / 0.044; k=7: 3.15 / 0.13
      and 0.11 / 0.011 (kornia's cascade at k=3 on the same masks: 71.8 / 5.01 and 2.56 / 0.84).
      At 256² (distances up to ~80 px), k=3: 7.73 / 0.67 and 0.81 / 0.19.
    * chebyshev with anisotropic spacing: chamfer with moves costing ``max(sy·|a|, sx·|b|)``, an
      upper bound (exact where the kernel holds the offsets needed).

    Args:
        mask: binary mask (any dtype; nonzero = foreground) for ``exact``; for ``conv`` a soft
            mask in [0, 1] (values above 1 count as 1, below 0 as 0) or a binary one.
        distance: ``"euclidean"``, ``"manhattan"`` or ``"chebyshev"``.
        method: ``"exact"`` or ``"conv"``.
        spacing: pixel size (row, column), one number for both, or None (distances in pixels).
        kernel_size: ``conv`` only: odd k >= 3; the moves of a k×k kernel (euclidean accuracy).
        target: ``"foreground"`` (the mask's pixels) or ``"boundary"``: distance to the nearest
            edge pixel, ``boundary(mask, boundary_method)`` (binarised: no gradient to ``mask``).
        boundary_method: ``"erosion"`` or ``"sobel"``, see :func:`boundary`.
        h: ``conv`` only: soft-source scale (> 0): a pixel of value v costs h·(1 − v)/v px.
            Irrelevant for binary masks.
        backend: ``exact`` only: ``"auto"``, ``"torch"`` (any device), ``"edt"`` (CPU,
            euclidean) or ``"scipy"`` (CPU; manhattan / chebyshev need isotropic spacing).

    Shape:
        mask: (..., H, W), e.g. (B, C, H, W). Returns the same shape.

    Returns:
        Distances, float32 (float64 for float64 ``conv`` input), on ``mask``'s device.

    Raises:
        ValueError: an unknown choice, bad ``spacing`` / ``kernel_size`` / ``h``, a mask with fewer
            than 2 dims, or a backend that cannot serve the request (named in the message).
    """
    _check_mask(mask)
    check_choice("distance", distance, DISTANCES)
    check_choice("method", method, METHODS)
    check_choice("target", target, TARGETS)
    check_choice("boundary_method", boundary_method, BOUNDARY_METHODS)
    check_choice("backend", backend, BACKENDS)
    kernel_size = check_kernel_size(kernel_size)
    h = _check_h(h)
    sy, sx = spacing_pair(spacing)

    with torch.autocast(device_type=mask.device.type, enabled=False):
        if target == "boundary":
            mask = boundary(mask, boundary_method)
        maps = _as_maps(mask)
        if maps.shape[0] == 0:
            return torch.zeros(mask.shape, dtype=_result_dtype(mask), device=mask.device)
        if method == "exact":
            out = exact_distance(maps.bool(), distance, sy, sx, backend).to(mask.device)
        else:
            out = conv_distance(maps.to(_result_dtype(mask)), distance, sy, sx, kernel_size, h)
    return out.reshape(mask.shape)


def _class_maps(mask: torch.Tensor, num_classes: Optional[int]) -> torch.Tensor:
    """(B, C, H, W) per-class maps from one-hot / binary / soft maps or integer label maps."""
    if num_classes is None:
        if mask.ndim != 4:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)}: expected (B, C, H, W) class maps, or an integer "
                "label map (B, H, W) / (B, 1, H, W) together with num_classes"
            )
        return mask
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an int >= 1")
    if mask.is_floating_point():
        raise ValueError(f"a label map (with num_classes) must have an integer or bool dtype, got {mask.dtype}")
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise ValueError(
            f"label map of shape {tuple(mask.shape)}: expected (B, H, W) or (B, 1, H, W) with num_classes"
        )
    labels = mask.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"label values must lie in [0, num_classes={num_classes}), got min {int(labels.min())} "
            f"and max {int(labels.max())}"
        )
    return label_masks(labels, range(num_classes))


def label_masks(labels: torch.Tensor, classes) -> torch.Tensor:
    """(B, C, H, W) bool masks ``labels == c`` of an integer (B, H, W) label map, one per class in ``classes``."""
    if isinstance(classes, range):  # made on the device: a copy from the host would wait for it
        classes = torch.arange(classes.start, classes.stop, classes.step, device=labels.device, dtype=labels.dtype)
    else:
        classes = torch.as_tensor(list(classes), device=labels.device, dtype=labels.dtype)
    return labels.unsqueeze(1) == classes.view(1, -1, 1, 1)



def normalize_sdm(sdm: torch.Tensor, normalization: Optional[str], distance: str = "euclidean",
                  spacing: Spacing = None) -> torch.Tensor:
    """Normalise (..., H, W) signed distance maps as :func:`signed_distance_map` does (see there);
    ``static_max`` divides by :func:`max_distance` of the maps' own H x W. Zero maps stay zero."""
    check_choice("normalization", normalization, NORMALIZATIONS)
    if normalization is None:
        return sdm
    if normalization == "static_max":
        largest = max_distance(sdm.shape[-2], sdm.shape[-1], distance, spacing)
        return sdm / largest if largest > 0 else sdm
    dims = (-2, -1)
    if normalization == "dynamic_max":
        top = sdm.abs().amax(dim=dims, keepdim=True)
        return sdm / torch.where(top > 0, top, torch.ones_like(top))
    # minmax: negative part to [-1, 0] by its own extreme, positive part to [0, 1] by its own.
    top = sdm.clamp_min(0).amax(dim=dims, keepdim=True)
    bottom = (-sdm).clamp_min(0).amax(dim=dims, keepdim=True)
    top = torch.where(top > 0, top, torch.ones_like(top))
    bottom = torch.where(bottom > 0, bottom, torch.ones_like(bottom))
    return torch.where(sdm > 0, sdm / top, sdm / bottom)


def signed_distance_map(
    mask: torch.Tensor,
    distance: str = "euclidean",
    method: str = "exact",
    normalization: Optional[str] = None,
    spacing: Spacing = None,
    kernel_size: int = 3,
    *,
    num_classes: Optional[int] = None,
    h: float = 0.35,
    backend: str = "auto",
) -> torch.Tensor:
    """Signed distance map of every class: positive outside, negative inside, 0 on the inner edge.

    Per class map ``pos`` (``neg = 1 − pos``), the boundary-loss reference convention
    ``φ = neg·edt(neg) − (edt(pos) − 1)·pos``, where SciPy's ``edt(x)`` is the distance of each
    nonzero pixel of x to the nearest zero -- in this module's terms
    ``φ = neg·distance_transform(pos) − (distance_transform(neg) − 1)·pos``: a background pixel
    gets its distance to the object (1 next to it), an object pixel 1 minus its distance to the
    background (0 on the inner edge, −1 one pixel further in). The same formula with the
    manhattan / chebyshev distance for those metrics. For ``conv`` with a soft mask the formula
    blends both sides with the probabilities, and its gradient reaches the mask.

    Empty and full classes give a zero map: no boundary exists, and neither SciPy (distances to a
    phantom point outside the image) nor ``edt`` (inf) gives a usable value. For ``conv``, empty
    means no pixel > 0, full means no pixel < 1.

    Normalisation, per map: ``None`` (raw distances); ``"dynamic_max"``: divide by the map's own
    max |φ|; ``"minmax"``: the negative part by its own largest magnitude and the positive part by
    its own max, to [−1, 0] and [0, 1]; ``"static_max"``: divide by
    :func:`max_distance` (H, W, distance, spacing), the same constant for every tile of a size.
    Zero maps stay zero.

    Args:
        mask: (B, C, H, W) class maps -- one-hot, binary or (``conv``) soft probabilities; or,
            with ``num_classes``, an integer label map (B, H, W) or (B, 1, H, W).
        distance: ``"euclidean"``, ``"manhattan"`` or ``"chebyshev"``.
        method: ``"exact"`` (CPU: ``edt``/SciPy; other devices: torch) or ``"conv"``
            (differentiable); see :func:`distance_transform`.
        normalization: None, ``"minmax"``, ``"dynamic_max"`` or ``"static_max"``.
        spacing: pixel size (row, column), one number for both, or None (pixels).
        kernel_size: ``conv`` only: odd k >= 3 (euclidean accuracy, see
            :func:`distance_transform`).
        num_classes: number of classes K of an integer label map (labels in [0, K)); None for
            class maps.
        h: ``conv`` only: soft-source scale, see :func:`distance_transform`.
        backend: ``exact`` only, see :func:`distance_transform`.

    Shape:
        mask: (B, C, H, W), or (B, H, W) / (B, 1, H, W) labels with ``num_classes``.
        Returns (B, C, H, W) (C = ``num_classes`` for label maps).

    Returns:
        Float32 SDMs (float64 for a float64 ``conv`` input) on ``mask``'s device.

    Raises:
        ValueError: unknown choices, bad shapes, labels outside [0, num_classes), bad
            ``spacing`` / ``kernel_size`` / ``h``, or an impossible ``backend``.
    """
    _check_mask(mask)
    check_choice("distance", distance, DISTANCES)
    check_choice("method", method, METHODS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_choice("backend", backend, BACKENDS)
    kernel_size = check_kernel_size(kernel_size)
    h = _check_h(h)
    sy, sx = spacing_pair(spacing)
    classes = _class_maps(mask, num_classes)
    shape = classes.shape
    if classes.numel() == 0:
        return torch.zeros(shape, dtype=_result_dtype(mask), device=mask.device)

    with torch.autocast(device_type=mask.device.type, enabled=False):
        maps = _as_maps(classes)
        if method == "exact":
            pos = maps.bool()
            resolved = resolve_backend(backend, distance, pos.device, sy, sx)
            if resolved == "torch":
                d = exact_torch(torch.cat([pos, ~pos]), distance, sy, sx)
                to_object, to_background = d[: len(pos)], d[len(pos) :]
                sdm = torch.where(pos, 1 - to_background, to_object)
                boundary_exists = pos.any(dim=(-2, -1)) & (~pos).any(dim=(-2, -1))
                sdm = torch.where(boundary_exists[:, None, None], sdm, torch.zeros_like(sdm))
            else:
                sdm = exact_sdm_cpu(pos, distance, sy, sx, resolved).to(mask.device)
        else:
            p = maps.to(_result_dtype(mask))
            p = torch.where(p > 1, torch.ones_like(p), torch.where(p < 0, torch.zeros_like(p), p))
            d = conv_distance(torch.cat([p, 1 - p]), distance, sy, sx, kernel_size, h)
            # An infinite distance only occurs in empty / full maps, zeroed below; make it finite
            # first so that 0·inf cannot turn into NaN in the product or its gradient.
            d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
            to_object, to_background = d[: len(p)], d[len(p) :]
            sdm = (1 - p) * to_object - (to_background - 1) * p
            boundary_exists = (p > 0).any(dim=(-2, -1)) & (p < 1).any(dim=(-2, -1))
            sdm = torch.where(boundary_exists[:, None, None], sdm, torch.zeros_like(sdm))
        sdm = normalize_sdm(sdm, normalization, distance, spacing)
    return sdm.reshape(shape)
