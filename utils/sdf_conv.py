"""The ``conv`` method of :mod:`utils.sdf`: a cascade of min-plus convolutions, differentiable with
respect to a soft mask (accuracy and the soft-source cost are documented in
:func:`utils.sdf.distance_transform`).

The functions take checked arguments: floating (N, H, W) maps and the pixel size ``sy, sx`` as floats.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch


def offset_length(distance: str, dy: float, dx: float) -> float:
    """Length of the offset (dy, dx) (physical units, non-negative) in ``distance``: the cost of a
    kernel move here, the corner-to-corner distance in :func:`utils.sdf.max_distance`."""
    if distance == "euclidean":
        return math.hypot(dy, dx)
    if distance == "manhattan":
        return dy + dx
    return max(dy, dx)


# ----------------------------------------------------------------------------- conv: min-plus cascade


def _kernel_moves(radius: int) -> list[tuple[int, int]]:
    """Primitive offsets (a, b) of a (2r+1)² kernel, one per ± pair: a > 0, or a = 0 and b = 1."""
    moves = []
    for a in range(radius + 1):
        for b in range(-radius, radius + 1):
            if (a == 0 and b <= 0) or math.gcd(a, abs(b)) != 1:
                continue
            moves.append((a, b))
    return moves


@functools.lru_cache(maxsize=32)
def _line_layout(h: int, w: int, a: int, b: int, device: torch.device):
    """Index maps that lay the lattice lines of direction (a, b) out as rows of a 2-D array.

    Pixel (i, j) lies on line ``b·i − a·j`` (constant along the direction); consecutive pixels of
    a line differ by (a, b), so ``i // a`` (or ``j // |b|`` for steep directions, to keep the
    array small) numbers them 0, 1, 2, ... Every line crosses the rectangle in one contiguous run.

    Returns:
        gather: (L·P,) int32 pixel index per cell, ``h·w`` (a +inf pad) where no pixel lies.
        scatter: (h·w,) int32 cell index per pixel.
        lines, positions: L and P.
    """
    i = torch.arange(h).view(h, 1).expand(h, w)
    j = torch.arange(w).view(1, w).expand(h, w)
    line = b * i - a * j
    line = line - line.min()
    pos = i // a if a >= abs(b) else (j // abs(b))
    lines, positions = int(line.max()) + 1, int(pos.max()) + 1
    scatter = (line * positions + pos).reshape(-1)
    gather = torch.full((lines * positions,), h * w, dtype=torch.int64)
    gather[scatter] = torch.arange(h * w)
    return gather.to(torch.int32).to(device), scatter.to(torch.int32).to(device), lines, positions


def _ramp(x: torch.Tensor, step: float, dim: int) -> torch.Tensor:
    shape = [1] * x.ndim
    shape[dim] = x.shape[dim]
    return (torch.arange(x.shape[dim], device=x.device, dtype=x.dtype) * step).view(shape)


def _min_plus_values(x: torch.Tensor, step: float, dim: int, use_numpy: Optional[bool] = None) -> torch.Tensor:
    """Values of ``y[t] = min_u (x[u] + step·|t − u|)`` along ``dim`` (no autograd).

    ``min_{u≤t}(x[u] + step·(t − u)) = step·t + cummin(x − step·u)``, and the mirror image for
    u ≥ t. On CPU, NumPy's ``minimum.accumulate`` does the running minima faster than
    ``torch.cummin`` (which also writes an int64 index per element) and scans a reversed view
    without copying; elsewhere torch. ``use_numpy`` overrides the choice (tests run both on CPU).
    """
    if use_numpy is None:
        use_numpy = x.device.type == "cpu"
    if not use_numpy:
        ramp = _ramp(x, step, dim)
        forward = torch.cummin(x - ramp, dim=dim).values + ramp
        backward = torch.cummin((x + ramp).flip(dim), dim=dim).values.flip(dim) - ramp
        return torch.minimum(forward, backward)
    dim = dim % x.ndim
    if dim != x.ndim - 1:
        # NumPy scans the last axis several times faster than a strided one: transpose there.
        return _min_plus_values(x.transpose(dim, -1), step, -1, True).transpose(dim, -1).contiguous()
    a = x.detach().contiguous().numpy()
    ramp = np.arange(a.shape[-1], dtype=a.dtype) * a.dtype.type(step)
    forward = a - ramp
    np.minimum.accumulate(forward, axis=-1, out=forward)
    forward += ramp
    backward = a + ramp
    reverse = backward[..., ::-1]
    np.minimum.accumulate(reverse, axis=-1, out=reverse)
    backward -= ramp
    np.minimum(forward, backward, out=forward)
    return torch.from_numpy(forward)


class _MinPlus1d(torch.autograd.Function):
    """Differentiable ``_min_plus_values``: the gradient of y[t] goes to its arg-min x[u]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: float, dim: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.step, ctx.dim = step, dim
        return _min_plus_values(x, step, dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        dim, n = ctx.dim, x.shape[ctx.dim]
        # Recompute the arg-min sources with torch's index-returning scans (forward skipped them).
        ramp = _ramp(x, ctx.step, dim)
        forward, forward_src = torch.cummin(x - ramp, dim=dim)
        backward, backward_src = torch.cummin((x + ramp).flip(dim), dim=dim)
        backward, backward_src = backward.flip(dim) - ramp, (n - 1) - backward_src.flip(dim)
        src = torch.where(forward + ramp <= backward, forward_src, backward_src)
        return torch.zeros_like(x).scatter_add_(dim, src, grad.contiguous()), None, None


def _min_plus_1d(x: torch.Tensor, step: float, dim: int) -> torch.Tensor:
    """``y[t] = min_u (x[u] + step·|t − u|)`` along ``dim``: two running minima, differentiable.

    This is the fixed point of the 3-tap min-plus cascade ``y ← min(y, y[t±1] + step)``, reached
    in one pass instead of one convolution per pixel of distance.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _MinPlus1d.apply(x, step, dim)
    return _min_plus_values(x, step, dim)


def _min_plus_direction(x: torch.Tensor, a: int, b: int, step: float) -> torch.Tensor:
    """``_min_plus_1d`` along every lattice line of direction (a, b) of the (N, H, W) maps ``x``."""
    if (a, b) == (0, 1):
        return _min_plus_1d(x, step, dim=-1)
    if (a, b) == (1, 0):
        return _min_plus_1d(x, step, dim=-2)
    n, h, w = x.shape
    gather, scatter, lines, positions = _line_layout(h, w, a, b, x.device)
    flat = torch.cat([x.reshape(n, h * w), x.new_full((n, 1), math.inf)], dim=1)
    laid = flat.index_select(1, gather).view(n, lines, positions)
    laid = _min_plus_1d(laid, step, dim=-1)
    return laid.reshape(n, lines * positions).index_select(1, scatter).view(n, h, w)


def conv_distance(
    mask: torch.Tensor, distance: str, sy: float, sx: float, kernel_size: int, h: float
) -> torch.Tensor:
    """Min-plus cascade distance of each (H, W) map of a soft mask (see :func:`utils.sdf.distance_transform`).

    Shape:
        mask: (N, H, W) floating, values clamped to [0, 1]. Returns (N, H, W), same dtype.
    """
    # A pixel of value v is a source at cost h·(1 − v)/v; 0 is none. torch.where, not clamp, so
    # that values exactly at 1 still pass a gradient; the inner where keeps 1/0 out of the graph.
    m = torch.where(mask > 1, torch.ones_like(mask), mask)
    positive = m > 0
    cost = torch.where(positive, h * (1 - m) / torch.where(positive, m, torch.ones_like(m)), math.inf)

    if distance == "manhattan":
        moves = [(0, 1), (1, 0)]
    elif distance == "chebyshev" and sy == sx:
        moves = _kernel_moves(1)  # the 8-neighbour path metric is already exact
    else:
        moves = _kernel_moves(kernel_size // 2)
    # Isotropic spacing: run in pixel steps (integers stay exact in fp32), rescale at the end.
    scale = sy if sy == sx else 1.0
    d = cost / scale if scale != 1.0 else cost
    for a, b in moves:
        if a >= d.shape[-2] or abs(b) >= d.shape[-1]:
            continue  # no two pixels of the tile are this far apart
        d = _min_plus_direction(d, a, b, offset_length(distance, sy * a / scale, sx * abs(b) / scale))
    return d * scale if scale != 1.0 else d

