"""Tests for utils/sdf.py against independent references: SciPy's EDT / chamfer transforms, a
brute-force numpy distance for anisotropic manhattan / chebyshev (SciPy's cdt has no spacing),
the boundary-loss reference SDM formula, hand-computed normalisations, and gradcheck for conv."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from conftest import blobs, brute_force_distance, ref_distance, ref_sdm
from utils.sdf import (
    DISTANCES,
    boundary,
    distance_transform,
    max_distance,
    signed_distance_map,
)

ATOL = 1e-4  # px: the exactness bound


# ----------------------------------------------------------------------------- references


def special_maps(h: int, w: int) -> np.ndarray:
    """Thin lines, single pixels, corners, empty and full maps of size (h, w)."""
    maps = np.zeros((8, h, w), dtype=bool)
    maps[0, h // 2, :] = True  # horizontal line
    maps[1, :, w // 3] = True  # vertical line
    idx = np.arange(min(h, w))
    maps[2, idx, idx] = True  # diagonal line
    maps[3, h // 3, w // 2] = True  # single pixel
    maps[4, 0, 0] = True  # corner pixel: farthest pixels need full-row searches
    maps[5, h - 1, w - 1] = True
    maps[5, 0, w // 2] = True  # two far-apart pixels
    # maps[6] stays empty
    maps[7] = True  # full
    return maps


def as_tensor(maps: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(maps))


def check_close(out: torch.Tensor, ref: np.ndarray, atol: float = ATOL) -> None:
    out = out.numpy().astype(np.float64)
    finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(out), finite), "inf pattern differs (maps without foreground)"
    np.testing.assert_allclose(out[finite], ref[finite], rtol=0, atol=atol)


# ----------------------------------------------------------------------------- boundary


@pytest.mark.parametrize("shape", [(3, 17, 23), (2, 1, 9), (2, 8, 1), (1, 1, 1)])
def test_boundary_erosion_matches_scipy(shape):
    m = blobs(shape, seed=1, sigma=1.5)
    m[0, 0, :] = True
    out = boundary(as_tensor(m), "erosion")
    ref = np.stack([x ^ ndi.binary_erosion(x) for x in m])
    assert out.dtype == torch.bool
    assert np.array_equal(out.numpy(), ref)


@pytest.mark.parametrize("shape", [(3, 17, 23), (2, 1, 9), (2, 8, 1), (2, 2, 5)])
def test_boundary_sobel_matches_scipy(shape):
    m = blobs(shape, seed=2, sigma=1.5)
    out = boundary(as_tensor(m).float(), "sobel")
    sobel = [(ndi.sobel(x, 0, mode="mirror"), ndi.sobel(x, 1, mode="mirror")) for x in m.astype(float)]
    ref = np.stack([np.hypot(gy, gx) > 0 for gy, gx in sobel])
    assert np.array_equal(out.numpy(), ref)


def test_boundary_sobel_is_two_sided_and_ignores_image_border():
    m = torch.zeros(1, 1, 6, 6)
    m[..., 2:4, 2:4] = 1
    edges = boundary(m, "sobel")[0, 0]
    # The 2×2 square's Sobel band covers the square and its 8-neighbourhood ring: a 4×4 block.
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[1:5, 1:5] = True
    assert torch.equal(edges, expected)
    assert not boundary(torch.ones(1, 5, 5), "sobel").any()  # mirror padding: no edge at the border


# ----------------------------------------------------------------------------- exact distances


SHAPES = [(29, 41), (31, 17), (1, 13), (12, 1), (7, 7)]


def exact_cases():
    for distance in DISTANCES:
        yield distance, "torch"
        yield distance, "auto"
        yield distance, "scipy"
    yield "euclidean", "edt"


@pytest.mark.parametrize("distance,backend", list(exact_cases()))
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_matches_scipy_on_blobs_lines_pixels_empty_full(distance, backend, shape):
    h, w = shape
    maps = np.concatenate([blobs((3, h, w), seed=h * w), special_maps(h, w)])
    out = distance_transform(as_tensor(maps), distance, "exact", backend=backend)
    assert out.dtype == torch.float32 and out.shape == maps.shape
    check_close(out, np.stack([ref_distance(m, distance) for m in maps]))


@pytest.mark.parametrize("distance,backend", list(exact_cases()))
@pytest.mark.parametrize("spacing", [(2.0, 0.5), (0.7, 1.3), (0.25, 0.25)])
def test_exact_with_spacing(distance, backend, spacing):
    maps = np.concatenate([blobs((2, 23, 19), seed=5), special_maps(23, 19)])
    if backend == "scipy" and distance != "euclidean" and spacing[0] != spacing[1]:
        with pytest.raises(ValueError, match="backend='scipy' has no anisotropic spacing"):
            distance_transform(as_tensor(maps), distance, spacing=spacing, backend=backend)
        return
    out = distance_transform(as_tensor(maps), distance, spacing=spacing, backend=backend)
    check_close(out, np.stack([ref_distance(m, distance, spacing) for m in maps]))


def test_brute_force_reference_agrees_with_scipy():
    # The anisotropic reference itself, checked where SciPy applies.
    m = blobs((1, 15, 18), seed=3)[0]
    edt = ndi.distance_transform_edt(~m, sampling=(2.0, 0.5))
    np.testing.assert_allclose(brute_force_distance(m, "euclidean", (2.0, 0.5)), edt)
    for distance, metric in (("chebyshev", "chessboard"), ("manhattan", "taxicab")):
        ref = ndi.distance_transform_cdt(~m, metric=metric)
        np.testing.assert_allclose(brute_force_distance(m, distance, (1, 1)), ref)


@pytest.mark.parametrize("distance", DISTANCES)
def test_exact_torch_on_a_larger_batch_with_far_pixels(distance):
    # Sparse sources in 96-wide rows drive the row search through every widening step.
    rng = np.random.default_rng(7)
    maps = rng.random((3, 2, 40, 96)) > 0.9985
    maps[0, 0] = False
    maps[0, 0, 39, 95] = True
    out = distance_transform(as_tensor(maps), distance, backend="torch")
    assert out.shape == maps.shape
    check_close(out.reshape(-1, 40, 96), np.stack([ref_distance(m, distance) for m in maps.reshape(-1, 40, 96)]))


def test_exact_accepts_bool_int_and_float_masks_and_any_leading_dims():
    m = blobs((2, 3, 11, 14), seed=9)
    ref = distance_transform(as_tensor(m))
    assert ref.shape == (2, 3, 11, 14)
    for t in (as_tensor(m).to(torch.uint8), as_tensor(m).float(), as_tensor(m).double()):
        assert torch.equal(distance_transform(t), ref)
    assert torch.equal(distance_transform(as_tensor(m[0, 0])), ref[0, 0])  # a single (H, W) map
    assert distance_transform(torch.zeros(0, 1, 4, 5)).shape == (0, 1, 4, 5)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("method", ["exact", "conv"])
def test_distance_to_boundary(distance, method):
    m = blobs((3, 21, 26), seed=11)
    for boundary_method in ("erosion", "sobel"):
        out = distance_transform(as_tensor(m), distance, method, target="boundary", boundary_method=boundary_method)
        edges = boundary(as_tensor(m), boundary_method).numpy()
        ref = np.stack([ref_distance(e, distance) for e in edges])
        if method == "exact" or distance != "euclidean":
            check_close(out, ref)
        else:
            assert np.all(out.numpy() >= ref - ATOL)


# ----------------------------------------------------------------------------- conv


@pytest.mark.parametrize("distance", ["manhattan", "chebyshev"])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_is_exact_for_manhattan_and_chebyshev(distance, kernel_size, shape):
    h, w = shape
    maps = np.concatenate([blobs((2, h, w), seed=h + w), special_maps(h, w)])
    out = distance_transform(as_tensor(maps).float(), distance, "conv", kernel_size=kernel_size)
    check_close(out, np.stack([ref_distance(m, distance) for m in maps]))


@pytest.mark.parametrize("spacing", [(0.5, 0.5), (2.0, 0.75)])
def test_conv_manhattan_is_exact_with_spacing(spacing):
    maps = np.concatenate([blobs((2, 19, 24), seed=4), special_maps(19, 24)])
    out = distance_transform(as_tensor(maps), "manhattan", "conv", spacing=spacing)
    check_close(out, np.stack([ref_distance(m, "manhattan", spacing) for m in maps]))


def test_conv_chebyshev_is_exact_with_isotropic_and_an_upper_bound_with_anisotropic_spacing():
    maps = np.concatenate([blobs((2, 19, 24), seed=4), special_maps(19, 24)])
    out = distance_transform(as_tensor(maps), "chebyshev", "conv", spacing=0.5)
    check_close(out, np.stack([ref_distance(m, "chebyshev", (0.5, 0.5)) for m in maps]))
    out = distance_transform(as_tensor(maps), "chebyshev", "conv", spacing=(1.5, 1.0), kernel_size=5).numpy()
    ref = np.stack([ref_distance(m, "chebyshev", (1.5, 1.0)) for m in maps])
    finite = np.isfinite(ref)
    assert np.all(out[finite] >= ref[finite] - ATOL)
    assert np.all(out[finite] <= 1.5 * ref[finite] + ATOL)


# Chamfer bound: 1 / cos(θ/2) − 1, θ the widest angle between neighbouring kernel moves:
# 45° between (1, 0) and (1, 1) for k = 3, atan(1/2) for k = 5, atan(1/3) for k = 7.
WIDEST_ANGLE = {3: math.pi / 4, 5: math.atan(1 / 2), 7: math.atan(1 / 3)}
CHAMFER_BOUND = {k: 1 / math.cos(angle / 2) - 1 for k, angle in WIDEST_ANGLE.items()}


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_conv_euclidean_within_chamfer_bound(kernel_size):
    maps = np.concatenate([blobs((3, 37, 45), seed=12), special_maps(37, 45)])
    out = distance_transform(as_tensor(maps), "euclidean", "conv", kernel_size=kernel_size).numpy()
    ref = np.stack([ref_distance(m, "euclidean") for m in maps])
    finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(out), finite)
    err = out[finite] - ref[finite]
    assert err.min() >= -ATOL  # never below the true distance
    assert np.all(err <= CHAMFER_BOUND[kernel_size] * ref[finite] + ATOL)
    # Distances along the kernel's moves are exact: the single pixel's row and column.
    h0, w0 = 37 // 3, 45 // 2
    np.testing.assert_allclose(out[6][h0], ref[6][h0], atol=ATOL)
    np.testing.assert_allclose(out[6][:, w0], ref[6][:, w0], atol=ATOL)
    # A larger kernel is more accurate.
    if kernel_size > 3:
        coarse = distance_transform(as_tensor(maps), "euclidean", "conv", kernel_size=kernel_size - 2).numpy()
        assert np.all(out[finite] <= coarse[finite] + ATOL) and (out[finite] < coarse[finite] - 1e-3).any()


def test_conv_euclidean_with_anisotropic_spacing_is_a_close_upper_bound():
    maps = np.concatenate([blobs((2, 25, 30), seed=13), special_maps(25, 30)])
    out = distance_transform(as_tensor(maps), "euclidean", "conv", spacing=(2.0, 0.5), kernel_size=7).numpy()
    ref = np.stack([ref_distance(m, "euclidean", (2.0, 0.5)) for m in maps])
    finite = np.isfinite(ref)
    err = out[finite] - ref[finite]
    assert err.min() >= -ATOL and np.all(err <= 0.15 * ref[finite] + ATOL)


def test_min_plus_pass_numpy_and_torch_branches_agree_with_brute_force():
    # The CPU runs NumPy scans; other devices run torch.cummin. Both against the definition.
    from utils.sdf_conv import _min_plus_values

    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 7, 9, generator=g, dtype=torch.float64) * 10
    x[x > 7] = math.inf
    x[0, :, :] = math.inf  # a map without any source
    for dim, step in ((-1, 1.0), (-2, 0.7), (1, 2.5)):
        n = x.shape[dim]
        t = torch.arange(n, dtype=torch.float64)
        cost = step * (t[:, None] - t[None, :]).abs()  # [t, u]
        xm = x.movedim(dim, -1)
        ref = (xm[..., None, :] + cost).amin(-1).movedim(-1, dim)
        for use_numpy in (True, False):
            torch.testing.assert_close(_min_plus_values(x, step, dim, use_numpy), ref, rtol=0, atol=1e-12)


def test_conv_soft_source_costs_h_times_odds_against():
    # One pixel of value v = 0.25, nothing else: every distance is h·(1 − v)/v = 3h plus the
    # (exact, along the row) distance to it.
    m = torch.zeros(1, 1, 1, 6, dtype=torch.float64)
    m[..., 2] = 0.25
    for h in (0.35, 2.0):
        out = distance_transform(m, "euclidean", "conv", h=h)[0, 0, 0]
        expected = 3 * h + torch.tensor([2.0, 1, 0, 1, 2, 3], dtype=torch.float64)
        torch.testing.assert_close(out, expected)
    # A weak source wins over a full source while its cost is smaller than the detour.
    m[..., 5] = 1.0
    out = distance_transform(m, "manhattan", "conv", h=0.35)[0, 0, 0]
    weak = 3 * 0.35
    torch.testing.assert_close(out, torch.tensor([2 + weak, 1 + weak, weak, 2, 1, 0], dtype=torch.float64))


def test_conv_sdm_of_confident_probabilities_matches_the_thresholded_mask():
    m = as_tensor(blobs((2, 1, 30, 34), seed=16))
    logits = torch.where(m, 9.0, -9.0) + torch.randn(m.shape, generator=torch.Generator().manual_seed(0))
    prob = torch.sigmoid(logits)
    for distance in DISTANCES:
        soft = signed_distance_map(prob, distance, "conv")
        hard = signed_distance_map(m, distance, "conv")
        torch.testing.assert_close(soft, hard, rtol=0, atol=0.02)


def test_conv_runs_in_fp32_under_autocast():
    m = as_tensor(blobs((2, 1, 20, 24), seed=14)).float()
    ref = distance_transform(m, "euclidean", "conv")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distance_transform(m, "euclidean", "conv")
        sdm = signed_distance_map(m, "euclidean", "conv")
    assert out.dtype == torch.float32 and sdm.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    half = distance_transform(m.bfloat16(), "euclidean", "conv")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, rtol=0, atol=0)


@pytest.mark.parametrize("distance", DISTANCES)
def test_conv_gradcheck(distance):
    torch.manual_seed(0)
    p = (0.05 + 0.9 * torch.rand(1, 2, 5, 6, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: distance_transform(x, distance, "conv", kernel_size=5), (p,))
    for normalization in (None, "minmax", "static_max"):
        assert torch.autograd.gradcheck(
            lambda x: signed_distance_map(x, distance, "conv", normalization=normalization), (p,)
        )


def test_conv_gradient_of_binary_mask_is_finite_and_reaches_the_mask():
    m = as_tensor(blobs((2, 1, 24, 28), seed=15)).float()
    m[1] = 0  # an empty map: zero SDM, zero but finite gradient
    m.requires_grad_()
    for distance in DISTANCES:
        sdm = signed_distance_map(m, distance, "conv", normalization="static_max")
        (g,) = torch.autograd.grad(sdm.square().sum(), m)
        assert torch.isfinite(g).all()
        assert g[0].abs().sum() > 0
        assert g[1].abs().sum() == 0


def test_conv_finite_differences_on_a_probability_map():
    # Moving one pixel's probability changes the SDM by the gradient's prediction.
    torch.manual_seed(1)
    p = torch.rand(1, 1, 12, 12, dtype=torch.float64) * 0.2
    p[..., 3:8, 4:9] = 0.8 + 0.2 * torch.rand(5, 5, dtype=torch.float64)
    p.requires_grad_()
    loss = signed_distance_map(p, "euclidean", "conv").sum()
    (g,) = torch.autograd.grad(loss, p)
    eps = 1e-6
    for idx in [(0, 0, 5, 6), (0, 0, 3, 4), (0, 0, 10, 1)]:
        q = p.detach().clone()
        q[idx] += eps
        up = signed_distance_map(q, "euclidean", "conv").sum()
        q[idx] -= 2 * eps
        down = signed_distance_map(q, "euclidean", "conv").sum()
        assert abs((up - down).item() / (2 * eps) - g[idx].item()) < 1e-5


# ----------------------------------------------------------------------------- signed distance maps


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("backend", ["auto", "torch", "scipy"])
def test_sdm_exact_matches_reference(distance, backend):
    maps = np.concatenate([blobs((3, 27, 33), seed=21), special_maps(27, 33)])
    out = signed_distance_map(as_tensor(maps).reshape(1, -1, 27, 33), distance, backend=backend)
    assert out.shape == (1, len(maps), 27, 33) and out.dtype == torch.float32
    ref = np.stack([ref_sdm(m, distance) for m in maps])
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("distance", DISTANCES)
def test_sdm_conv_matches_reference_where_exact(distance):
    maps = np.concatenate([blobs((3, 27, 33), seed=22), special_maps(27, 33)])
    out = signed_distance_map(as_tensor(maps).reshape(1, -1, 27, 33).float(), distance, "conv", kernel_size=7)
    out = out[0].numpy()
    ref = np.stack([ref_sdm(m, distance) for m in maps])
    if distance == "euclidean":
        # chamfer: |φ| only grows, by at most the k = 7 bound
        assert np.all(np.abs(out) >= np.abs(ref) - ATOL) and np.all(np.sign(out) * np.sign(ref) >= 0)
        dist = np.where(ref > 0, ref, 1 - ref)  # the underlying distance
        assert np.all(np.abs(out - ref) <= CHAMFER_BOUND[7] * dist + ATOL)
    else:
        np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", ["auto", "torch", "scipy"])
def test_sdm_with_anisotropic_spacing(backend):
    maps = np.concatenate([blobs((2, 21, 26), seed=23), special_maps(21, 26)])
    spacing = (1.5, 0.5)
    out = signed_distance_map(as_tensor(maps)[None], "euclidean", spacing=spacing, backend=backend)[0].numpy()
    np.testing.assert_allclose(out, np.stack([ref_sdm(m, "euclidean", spacing) for m in maps]), rtol=0, atol=ATOL)
    out = signed_distance_map(as_tensor(maps)[None], "chebyshev", spacing=spacing)[0].numpy()
    np.testing.assert_allclose(out, np.stack([ref_sdm(m, "chebyshev", spacing) for m in maps]), rtol=0, atol=ATOL)


def test_sdm_label_maps_equal_one_hot_and_multi_class():
    rng = np.random.default_rng(24)
    labels = np.zeros((2, 30, 35), dtype=np.int64)
    labels[blobs((2, 30, 35), seed=25, level=0.6)] = 1
    labels[blobs((2, 30, 35), seed=26, level=0.8)] = 2
    labels[1, 20:, 30:] = 3
    labels[0, 0, 0] = rng.integers(0, 3)
    t = torch.from_numpy(labels)
    one_hot = torch.nn.functional.one_hot(t, 5).permute(0, 3, 1, 2)  # class 4 is absent: empty
    for distance in DISTANCES:
        out = signed_distance_map(t, distance, num_classes=5)
        assert out.shape == (2, 5, 30, 35)
        torch.testing.assert_close(out, signed_distance_map(one_hot, distance), rtol=0, atol=0)
        torch.testing.assert_close(out, signed_distance_map(t[:, None].int(), distance, num_classes=5), rtol=0, atol=0)
        ref = np.stack([[ref_sdm(labels[b] == c, distance) for c in range(5)] for b in range(2)])
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=ATOL)
    assert (out[:, 4] == 0).all()  # empty class


def test_sdm_empty_and_full_classes_are_zero_maps():
    m = torch.zeros(2, 2, 9, 10)
    m[1] = 1  # full
    for method in ("exact", "conv"):
        for backend in ("auto", "torch"):
            out = signed_distance_map(m, method=method, backend=backend, normalization="minmax")
            assert torch.equal(out, torch.zeros_like(out))


def test_sdm_hand_computed_and_normalisations():
    # One row: object = first four pixels. Inside: 1 − (distance to background) = −3, −2, −1, 0;
    # outside: distance to the object = 1, 2.
    m = torch.tensor([[[[1, 1, 1, 1, 0, 0]]]])
    for distance in DISTANCES:
        raw = signed_distance_map(m, distance)
        torch.testing.assert_close(raw, torch.tensor([[[[-3.0, -2, -1, 0, 1, 2]]]]))
        minmax = signed_distance_map(m, distance, normalization="minmax")
        torch.testing.assert_close(minmax, torch.tensor([[[[-1.0, -2 / 3, -1 / 3, 0, 0.5, 1]]]]))
        dynamic = signed_distance_map(m, distance, normalization="dynamic_max")
        torch.testing.assert_close(dynamic, torch.tensor([[[[-1.0, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3]]]]))
        static = signed_distance_map(m, distance, normalization="static_max")
        torch.testing.assert_close(static, raw / 5)  # 1×6 tile: farthest pixels are 5 apart
    # A 3×3 square in a 5×5 tile, chebyshev with spacing 2: the centre is 2·2 − 1 = 3 deep.
    sq = torch.zeros(1, 1, 5, 5)
    sq[..., 1:4, 1:4] = 1
    raw = signed_distance_map(sq, "chebyshev", spacing=2.0)
    assert raw[0, 0, 2, 2] == 1 - 4 and raw[0, 0, 1, 1] == 1 - 2 and raw[0, 0, 0, 0] == 2
    static = signed_distance_map(sq, "chebyshev", spacing=2.0, normalization="static_max")
    torch.testing.assert_close(static, raw / 8)  # max(2·4, 2·4)
    minmax = signed_distance_map(sq, "chebyshev", spacing=2.0, normalization="minmax")
    assert minmax.min() == -1 and minmax.max() == 1 and minmax[0, 0, 1, 1] == -1 / 3


def test_max_distance_by_hand():
    assert max_distance(3, 4) == pytest.approx(math.hypot(2, 3))
    assert max_distance(3, 4, "manhattan") == 5
    assert max_distance(3, 4, "chebyshev") == 3
    assert max_distance(3, 4, "euclidean", (2.0, 0.5)) == pytest.approx(math.hypot(4, 1.5))
    assert max_distance(3, 4, "manhattan", (2.0, 0.5)) == pytest.approx(5.5)
    assert max_distance(1, 1) == 0
    # It bounds the SDM of any mask of that size.
    m = as_tensor(special_maps(13, 17))[:, None]
    for distance in DISTANCES:
        assert signed_distance_map(m, distance).abs().max() <= max_distance(13, 17, distance)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"distance": "cosine"}, r"distance='cosine' is not one of \['euclidean', 'manhattan', 'chebyshev'\]"),
        ({"method": "fast"}, r"method='fast' is not one of \['exact', 'conv'\]"),
        ({"kernel_size": 4}, "kernel_size=4 must be an odd int >= 3"),
        ({"kernel_size": 1}, "kernel_size=1 must be an odd int >= 3"),
        ({"spacing": (1.0, -1.0)}, "spacing=.* must be None, a positive number or a"),
        ({"spacing": (1.0, 2.0, 3.0)}, "spacing=.* must be None"),
        ({"h": 0}, "h=0 must be a positive finite number"),
        ({"backend": "cuda"}, r"backend='cuda' is not one of"),
        ({"target": "edges"}, r"target='edges' is not one of \['foreground', 'boundary'\]"),
        ({"boundary_method": "canny"}, r"boundary_method='canny' is not one of"),
        ({"distance": "manhattan", "backend": "edt"}, "backend='edt' computes only distance='euclidean'"),
        ({"distance": "chebyshev", "backend": "scipy", "spacing": (1, 2)}, "backend='scipy' has no anisotropic"),
    ],
)
def test_distance_transform_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distance_transform(torch.ones(1, 1, 4, 4), **kwargs)


def test_bad_masks_and_label_maps():
    with pytest.raises(ValueError, match="at least 2 dims"):
        distance_transform(torch.ones(5))
    with pytest.raises(ValueError, match="non-empty spatial dims"):
        distance_transform(torch.ones(1, 0, 4))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        distance_transform(np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\) class maps"):
        signed_distance_map(torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"label values must lie in \[0, num_classes=2\)"):
        signed_distance_map(torch.full((1, 4, 4), 2), num_classes=2)
    with pytest.raises(ValueError, match="integer or bool dtype"):
        signed_distance_map(torch.ones(1, 4, 4), num_classes=2)
    with pytest.raises(ValueError, match="num_classes=0 must be an int >= 1"):
        signed_distance_map(torch.ones(1, 4, 4, dtype=torch.long), num_classes=0)
    with pytest.raises(ValueError, match=r"normalization='max' is not one of \[None, 'minmax'"):
        signed_distance_map(torch.ones(1, 1, 4, 4), normalization="max")
    with pytest.raises(ValueError, match=r"method='canny' is not one of \['erosion', 'sobel'\]"):
        boundary(torch.ones(4, 4), "canny")
    with pytest.raises(ValueError, match="height=0 must be an int >= 1"):
        max_distance(0, 4)
