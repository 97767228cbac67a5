"""Signed distance maps and object boundaries, computed on the tensor's own device."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def boundary(mask: torch.Tensor, method: str = "erosion") -> torch.Tensor:
    """Edge pixels of a binary mask.

    ``erosion``: ``mask XOR binary_erosion(mask)`` with the 4-connected (cross) structuring
    element and everything outside the image counted as background, i.e. exactly
    ``mask ^ scipy.ndimage.binary_erosion(mask)`` with SciPy's defaults, applied per 2-D map.

    Args:
        mask: binary mask, any dtype; the last two dims are (H, W).
        method: ``"erosion"``.

    Shape:
        mask: (..., H, W). Returns the same shape.

    Returns:
        Bool tensor, True on edge pixels, on ``mask``'s device.
    """
    if method != "erosion":
        raise ValueError(f"boundary method {method!r} is not one of ['erosion']")
    m = mask.bool()
    h, w = m.shape[-2:]
    x = F.pad(m.reshape(-1, 1, h, w).to(torch.uint8), (1, 1, 1, 1), value=0)
    eroded = (
        x[..., 1:-1, 1:-1] & x[..., :-2, 1:-1] & x[..., 2:, 1:-1] & x[..., 1:-1, :-2] & x[..., 1:-1, 2:]
    )
    return m & ~eroded.reshape(m.shape).bool()
