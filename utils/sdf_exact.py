"""The exact method of :mod:`utils.sdf`: exact distance transforms in torch on any device, and with
the ``edt`` package or SciPy on the CPU.

The functions take checked arguments -- bool source maps (N, H, W) and the pixel size ``sy, sx`` as
floats -- and leave the user-facing checks, conventions and documentation to
:func:`utils.sdf.distance_transform` and :func:`utils.sdf.signed_distance_map`.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from utils.choices import check_choice

#: Backends of the exact method (``backend`` of :func:`utils.sdf.distance_transform`).
BACKENDS = ("auto", "torch", "edt", "scipy")

# Stand-in row index of a missing source in the integer column pass: beyond any image side, so a
# column without a source gets offsets >= H, and small enough that ``index + _NO_SOURCE`` fits int32.
_NO_SOURCE = 1 << 30
# Exact row pass: every pixel first searches this many columns to each side (cheap shifted mins
# over the whole tensor); only the pixels that may still improve then gather windows twice as
# wide, again and again, until the whole row is covered.
_FIRST_RADIUS = 8
# Upper bound on the elements of one gathered window block (bounds temporary memory: 64 MiB fp32).
_MAX_WINDOW_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- exact: torch


def _column_offsets(src: torch.Tensor) -> torch.Tensor:
    """Row offset from each pixel to the nearest source pixel of its column (int32).

    Prefix scans of the source row indices, downward and upward: exact, O(H·W), no loop.
    Columns without a source give values >= H (test with ``offsets >= H``).
    """
    h = src.shape[-2]
    idx = torch.arange(h, device=src.device, dtype=torch.int32).view(h, 1)
    above = torch.cummax(torch.where(src, idx, -_NO_SOURCE), dim=-2).values
    below = torch.cummin(torch.where(src, idx, _NO_SOURCE).flip(-2), dim=-2).values.flip(-2)
    return torch.minimum(idx - above, below - idx)


def _exact_manhattan_torch(src: torch.Tensor, sy: float, sx: float) -> torch.Tensor:
    # L1 is separable: min_k (g_k + sx·|j − k|) = min(sx·j + cummin_{k≤j}(g_k − sx·k),
    # −sx·j + cummin_{k≥j}(g_k + sx·k)). fp64 keeps the cancellation in g − sx·k far below 1e-4.
    off = _column_offsets(src)
    g = torch.where(off >= src.shape[-2], math.inf, off.double() * sy)
    w = src.shape[-1]
    a = torch.arange(w, device=src.device, dtype=torch.float64) * sx
    forward = torch.cummin(g - a, dim=-1).values + a
    backward = torch.cummin((g + a).flip(-1), dim=-1).values.flip(-1) - a
    return torch.minimum(forward, backward)


def _exact_row_pass(g: torch.Tensor, distance: str, sx: float) -> torch.Tensor:
    """Exact ``D[j] = min_k combine(g[k], cost(j − k))`` along the last dim.

    Euclidean: ``g`` holds squared column distances, cost ``(sx·x)²``, combine ``+``.
    Chebyshev: ``g`` holds column distances, cost ``sx·|x|``, combine ``max``.

    Every pixel first searches ``_FIRST_RADIUS`` columns to each side (shifted minima over the whole
    tensor). A pixel whose best value after searching radius r is at most cost(r + 1) is final:
    no farther column can win. Only the others search again, with the radius doubled, so a pixel
    costs about four times its distance in column reads; typical masks settle within a few pixels,
    and only a map with very few sources reaches full rows.
    """
    if distance == "euclidean":
        combine = torch.add

        def cost(x):
            return (sx * x) ** 2
    else:
        combine = torch.maximum

        def cost(x):
            return sx * x

    n, h, w = g.shape
    out = g.clone()
    radius = min(_FIRST_RADIUS, w - 1)
    for x in range(1, radius + 1):
        c = torch.tensor(cost(float(x)), dtype=g.dtype, device=g.device)
        out[..., x:] = torch.minimum(out[..., x:], combine(g[..., :-x], c))
        out[..., :-x] = torch.minimum(out[..., :-x], combine(g[..., x:], c))

    flat_out = out.view(-1)
    # A row without any finite column distance (a map without sources) stays +inf: skip it.
    row_has_source = torch.isfinite(g).any(dim=-1, keepdim=True).expand_as(g).reshape(-1)
    while radius < w - 1:
        pending = ((flat_out > cost(float(radius + 1))) & row_has_source).nonzero().squeeze(1)
        if pending.numel() == 0:
            break
        radius = min(2 * radius, w - 1)
        # Windows as a strided view of the +inf-padded rows: gathering a pixel's window copies one
        # contiguous run (faster than indexing element by element).
        windows = F.pad(g, (radius, radius), value=math.inf).unfold(-1, 2 * radius + 1, 1)
        costs = cost(torch.arange(-radius, radius + 1, device=g.device).abs().to(g.dtype))
        chunk = max(1, _MAX_WINDOW_ELEMENTS // (2 * radius + 1))
        for start in range(0, pending.numel(), chunk):
            p = pending[start : start + chunk]
            vals = windows[p // (h * w), (p // w) % h, p % w]
            flat_out[p] = combine(vals, costs).amin(dim=1)
    return out


def exact_torch(src: torch.Tensor, distance: str, sy: float, sx: float) -> torch.Tensor:
    """Exact distance to the nearest True pixel of each (H, W) map of ``src``, in fp32 torch.

    Separable: the 1-D distance to the nearest source of each column comes from two prefix scans;
    the row pass then combines those column distances exactly (cummin for manhattan, a windowed
    min-plus / min-max search for euclidean / chebyshev). Runs on any device, batched over all
    leading dims; maps without a source are +inf.

    Shape:
        src: (N, H, W) bool. Returns (N, H, W) float32.
    """
    if distance == "manhattan":
        return _exact_manhattan_torch(src, sy, sx).float()
    off = _column_offsets(src)
    none = off >= src.shape[-2]
    if distance == "euclidean":
        g = torch.where(none, math.inf, (off.float() * sy) ** 2)
        return _exact_row_pass(g, distance, sx).sqrt_()
    g = torch.where(none, math.inf, off.float() * sy)
    return _exact_row_pass(g, distance, sx)


# ----------------------------------------------------------------------------- exact: CPU packages


def _cpu_threads() -> int:
    return max(1, torch.get_num_threads())


def resolve_backend(backend: str, distance: str, device: torch.device, sy: float, sx: float) -> str:
    """Concrete backend for ``method="exact"``; ValueError for impossible combinations."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if device.type != "cpu":
            return "torch"
        if distance == "euclidean":
            try:
                import edt  # noqa: F401
            except ImportError:
                return "scipy"
            return "edt"
        # SciPy's chamfer transform is exact for taxicab/chessboard but knows no spacing.
        return "scipy" if sy == sx else "torch"
    if backend in ("edt", "scipy") and device.type != "cpu":
        raise ValueError(f"backend={backend!r} needs a CPU tensor, got device {device}; use 'torch' or 'auto'")
    if backend == "edt" and distance != "euclidean":
        raise ValueError(f"backend='edt' computes only distance='euclidean', got distance={distance!r}")
    if backend == "scipy" and distance != "euclidean" and sy != sx:
        raise ValueError(
            f"backend='scipy' has no anisotropic spacing for distance={distance!r} "
            f"(distance_transform_cdt), got spacing=({sy}, {sx}); use 'torch' or 'auto'"
        )
    return backend


def _map_parallel(fn, n: int, threads: int) -> None:
    """Call ``fn(k)`` for k in range(n), over a thread pool (SciPy releases the GIL)."""
    if threads <= 1 or n <= 1:
        for k in range(n):
            fn(k)
        return
    with ThreadPoolExecutor(max_workers=min(threads, n)) as pool:
        list(pool.map(fn, range(n)))


def _cpu_distance(background: np.ndarray, distance: str, sy: float, sx: float, backend: str) -> np.ndarray:
    """SciPy-convention transform of one 2-D map: distance of each True pixel to the nearest False."""
    if backend == "edt":
        import edt

        return edt.edt(background, anisotropy=(sy, sx), black_border=False, parallel=_cpu_threads())
    from scipy import ndimage

    if distance == "euclidean":
        return ndimage.distance_transform_edt(background, sampling=(sy, sx))
    metric = "taxicab" if distance == "manhattan" else "chessboard"
    return ndimage.distance_transform_cdt(background, metric=metric) * sy


def _exact_cpu(src: torch.Tensor, distance: str, sy: float, sx: float, backend: str) -> torch.Tensor:
    """Exact distances on CPU with ``edt`` or SciPy, one map per call; empty maps are +inf."""
    maps = src.contiguous().numpy()
    out = np.full(maps.shape, np.inf, dtype=np.float32)

    def one(k: int) -> None:
        if maps[k].any():
            out[k] = _cpu_distance(~maps[k], distance, sy, sx, backend)

    # edt threads inside each call; SciPy is single-threaded, so run its maps side by side.
    _map_parallel(one, len(maps), 1 if backend == "edt" else _cpu_threads())
    return torch.from_numpy(out)


def exact_distance(src: torch.Tensor, distance: str, sy: float, sx: float, backend: str) -> torch.Tensor:
    """(N, H, W) bool sources → (N, H, W) float32 exact distances on ``src``'s device."""
    backend = resolve_backend(backend, distance, src.device, sy, sx)
    if backend == "torch":
        return exact_torch(src, distance, sy, sx)
    return _exact_cpu(src, distance, sy, sx, backend)


def exact_sdm_cpu(pos: torch.Tensor, distance: str, sy: float, sx: float, backend: str) -> torch.Tensor:
    """Exact SDM of (N, H, W) bool maps on CPU; one ``edt`` call per map gives both sides."""
    maps = pos.contiguous().numpy()
    out = np.zeros(maps.shape, dtype=np.float32)

    def one(k: int) -> None:
        p = maps[k]
        if p.all() or not p.any():
            return  # empty or full class: zero map
        if backend == "edt":
            import edt

            # Multi-label EDT: each pixel's distance to the nearest pixel of the other label, i.e.
            # to the background for foreground pixels and to the foreground for the rest.
            labels = 2 - p.view(np.uint8)
            d = edt.edt(labels, anisotropy=(sy, sx), black_border=False, parallel=_cpu_threads())
            out[k] = np.where(p, 1 - d, d)
        else:
            inside = _cpu_distance(p, distance, sy, sx, backend)
            outside = _cpu_distance(~p, distance, sy, sx, backend)
            out[k] = np.where(p, 1 - inside, outside)

    _map_parallel(one, len(maps), 1 if backend == "edt" else _cpu_threads())
    return torch.from_numpy(out)

