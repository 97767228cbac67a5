"""Shared test helpers: random masks and label maps, and the reference distances that the SDF, loss
and metric tests check against.

They are plain functions, imported by name (``from conftest import blobs``): tests/ has no
``__init__.py``, so pytest's default ``prepend`` import mode puts tests/ on ``sys.path`` and this
module is ``conftest`` both for pytest and for the test modules.

Two helpers with a similar purpose are kept apart where their recipes differ (so every test keeps its
exact inputs): :func:`random_labels` / :func:`labels_with_every_class`, and :func:`blobs` (smooth
random shapes) / :func:`random_box` (one rectangle).

The one fixture, ``one_thread``, runs a test on one torch thread (see :func:`torch_threads`); tests
marked ``cuda`` skip without a CUDA device.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

# ----------------------------------------------------------------------------- masks and label maps


def blobs(shape, seed: int = 0, sigma: float = 3.0, level: float = 0.55) -> np.ndarray:
    """Random smooth blobs: Gaussian-filtered uniform noise above its ``level`` quantile, per 2-D map.

    Args:
        shape: (..., H, W); the leading dimensions are independent maps.

    Returns:
        A bool array of ``shape``.
    """
    rng = np.random.default_rng(seed)
    noise = rng.random(shape)
    sig = (0,) * (len(shape) - 2) + (sigma, sigma)
    return ndi.gaussian_filter(noise, sig) > np.quantile(ndi.gaussian_filter(noise, sig), level)


def random_box(rng: np.random.Generator, h: int = 48, w: int = 48) -> np.ndarray:
    """A (H, W) uint8 0/1 mask holding one H/3 × W/3 rectangle in its upper-left half, so tiles of
    it have both labels."""
    m = np.zeros((h, w), np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    m[y:y + h // 3, x:x + w // 3] = 1
    return m


def random_labels(rng: np.random.Generator, b: int, k: int, h: int, w: int, sigma: float = 3.0) -> torch.Tensor:
    """Blobby random label maps (B, H, W): smoothed normal noise, argmax (K >= 2) or thresholded (K = 1).

    Blobs touch the image border, so the edge handling at the border is exercised too. A class may
    be missing from a map (see :func:`labels_with_every_class`).
    """
    x = ndi.gaussian_filter(rng.standard_normal((b, max(k, 1), h, w)), (0, 0, sigma, sigma))
    x /= x.std()
    if k == 1:
        return torch.from_numpy((x[:, 0] > 0.4).astype(np.int64))
    return torch.from_numpy(x.argmax(1).astype(np.int64))


def labels_with_every_class(seed: int, b: int, k: int, h: int, w: int, sigma: float = 2.0) -> torch.Tensor:
    """Blobby random (B, H, W) label maps with classes 0..max(K, 2)-1, every class in every map.

    Each map is the argmax of max(K, 2) smoothed uniform noise channels, drawn again until every class
    appears (so every class has a boundary and a signed distance map).
    """
    rng = np.random.default_rng(seed)
    n = max(k, 2)
    out = np.zeros((b, h, w), dtype=np.int64)
    for i in range(b):
        while len(np.unique(out[i])) < n:
            out[i] = ndi.gaussian_filter(rng.random((n, h, w)), (0, sigma, sigma)).argmax(0)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- reference distances


def brute_force_distance(fg: np.ndarray, distance: str, spacing) -> np.ndarray:
    """Distance of every pixel of a 2-D map to its nearest foreground pixel, by definition: the min
    over foreground pixels q of the metric of the physical offset p − q (small maps only).

    Args:
        distance: ``"euclidean"``, ``"manhattan"`` or ``"chebyshev"``.
        spacing: (row, column) pixel size.
    """
    sy, sx = spacing
    ii, jj = np.indices(fg.shape)
    qi, qj = np.nonzero(fg)
    dy = sy * np.abs(ii[..., None] - qi)
    dx = sx * np.abs(jj[..., None] - qj)
    if distance == "euclidean":
        d = np.hypot(dy, dx)
    elif distance == "manhattan":
        d = dy + dx
    else:
        d = np.maximum(dy, dx)
    return d.min(-1)


def ref_distance(fg: np.ndarray, distance: str, spacing=(1.0, 1.0)) -> np.ndarray:
    """Distance of every pixel of a 2-D map to its nearest foreground pixel (inf if none): SciPy's
    EDT / chamfer transforms, or :func:`brute_force_distance` where SciPy has no anisotropic spacing."""
    fg = fg.astype(bool)
    if not fg.any():
        return np.full(fg.shape, np.inf)
    sy, sx = spacing
    if distance == "euclidean":
        return ndi.distance_transform_edt(~fg, sampling=spacing)
    if sy == sx:
        metric = "taxicab" if distance == "manhattan" else "chessboard"
        return ndi.distance_transform_cdt(~fg, metric=metric).astype(float) * sy
    return brute_force_distance(fg, distance, spacing)


def ref_sdm(pos: np.ndarray, distance: str = "euclidean", spacing=(1.0, 1.0)) -> np.ndarray:
    """Kervadec et al.'s (boundary loss) signed distance map of one binary 2-D mask:
    neg·edt(neg) − (edt(pos) − 1)·pos in SciPy's convention; 0 everywhere if the mask has no edge."""
    pos = pos.astype(bool)
    if not pos.any() or pos.all():
        return np.zeros(pos.shape)
    neg = ~pos
    # SciPy's edt(x): distance of nonzero pixels of x to the nearest zero = ref_distance(~x).
    return neg * ref_distance(pos, distance, spacing) - (ref_distance(neg, distance, spacing) - 1) * pos


def brute_force_surface_distances(pred_mask: np.ndarray, target_mask: np.ndarray,
                                  spacing=(1.0, 1.0)) -> dict[str, float]:
    """ASD, AD, HD95 and D95 from all-pairs distances between the SciPy-eroded edges of two
    non-empty 2-D masks."""
    ep = np.argwhere(pred_mask ^ ndi.binary_erosion(pred_mask)) * np.asarray(spacing)
    eg = np.argwhere(target_mask ^ ndi.binary_erosion(target_mask)) * np.asarray(spacing)
    d = np.sqrt(((ep[:, None, :] - eg[None, :, :]) ** 2).sum(-1))
    pg, gp = d.min(1), d.min(0)
    return {
        "ASD": np.concatenate([pg, gp]).mean(),
        "AD": pg.mean(),
        "HD95": max(np.percentile(pg, 95), np.percentile(gp, 95)),
        "D95": np.percentile(pg, 95),
    }


# ----------------------------------------------------------------------------- threads


@contextmanager
def torch_threads(n: int):
    """Run the block on ``n`` torch threads. For tiny tensors thread hand-offs cost more than the
    work, and on a busy machine far more (a tiny 2-epoch run: under a second on one thread, over ten
    on two threads of two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


# ----------------------------------------------------------------------------- devices


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip on a machine without a CUDA device (``bench/gpu_check.sh`` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh runs these on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
