"""Tests for model/metrics/ against MONAI, brute force and hand-computed values."""

from __future__ import annotations

import math
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import brute_force_surface_distances, random_labels
from model.metrics import (
    DISTANCE_METRICS,
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    SegmentationMetrics,
    image_diagonal,
    predict_classes,
    predict_labels,
    surface_distances,
)

FIELDS = {"ASD": "asd", "AD": "ad", "HD95": "hd95", "D95": "d95"}


# ------------------------------------------------------------------------------ helpers


def monai_reference(pred, target, num_classes, spacing, include_background):
    """MONAI's four numbers for our four metrics, on one-hot masks (B, C)."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    n = max(num_classes, 2)
    p = torch.nn.functional.one_hot(pred, n).permute(0, 3, 1, 2).float()
    t = torch.nn.functional.one_hot(target, n).permute(0, 3, 1, 2).float()
    kw = {"include_background": include_background, "spacing": spacing}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty classes and deprecations
        return {
            "HD95": compute_hausdorff_distance(p, t, percentile=95, **kw),
            "D95": compute_hausdorff_distance(p, t, percentile=95, directed=True, **kw),
            "ASD": compute_average_surface_distance(p, t, symmetric=True, **kw),
            "AD": compute_average_surface_distance(p, t, symmetric=False, **kw),
        }


def logits_from_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Logits whose prediction is exactly ``labels`` (K = 1: +-3; K >= 2: one-hot * 5)."""
    if k == 1:
        return (labels.float() * 6 - 3)[:, None]
    return torch.nn.functional.one_hot(labels, k).permute(0, 3, 1, 2).float() * 5


# ------------------------------------------------------------------------------ MONAI agreement


@pytest.mark.parametrize("backend", ["kdtree", "torch"])
@pytest.mark.parametrize(
    "k, spacing, include_background",
    [(1, None, False), (1, (0.7, 1.9), True), (3, None, False), (4, (2.5, 0.6), False), (3, 1.3, True)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_distances_match_monai(seed, k, spacing, include_background, backend):
    rng = np.random.default_rng(seed)
    pred = random_labels(rng, 5, k, 37, 52)
    target = random_labels(rng, 5, k, 37, 52)
    # speckle noise on one image: many one-pixel objects, edges everywhere
    pred[0] = torch.from_numpy(rng.integers(0, max(k, 2), (37, 52)))
    # a class missing from one prediction and another from one target (one-empty cases)
    last = max(k, 2) - 1
    pred[1][pred[1] == last] = 0
    target[2][target[2] == last] = 0
    ref = monai_reference(pred, target, k, spacing, include_background)
    ours = surface_distances(pred, target, k, spacing=spacing, include_background=include_background, backend=backend)

    classes = list(range(0 if include_background else 1, max(k, 2)))
    assert ours.classes == tuple(classes)
    p_any = torch.stack([(pred == c).flatten(1).any(1) for c in classes], 1)
    t_any = torch.stack([(target == c).flatten(1).any(1) for c in classes], 1)
    both = p_any & t_any
    one = p_any ^ t_any
    assert both.sum() >= 2 * len(classes) and one.sum() >= 2  # the cases we test are really there
    diag = image_diagonal(37, 52, spacing)
    assert ours.diagonal == pytest.approx(diag)
    for name, field in FIELDS.items():
        got = getattr(ours, field)
        assert got.shape == (5, len(classes)) and got.dtype == torch.float64
        torch.testing.assert_close(got[both], ref[name].double()[both], rtol=0, atol=1e-4, msg=name)
        assert torch.all(got[one] == diag), name
        assert torch.isnan(got[~p_any & ~t_any]).all(), name
    assert torch.equal(ours.both_empty, ~p_any & ~t_any)


def test_edges_at_image_border_match_monai():
    """Masks filling whole rows/columns: MONAI's crop pads with zeros, so the border is an edge."""
    pred = torch.zeros(2, 20, 30, dtype=torch.long)
    target = torch.zeros(2, 20, 30, dtype=torch.long)
    pred[0, :, :10] = 1
    target[0, :, :13] = 1
    pred[1] = 1  # the whole image: its edge is the image frame
    target[1, 3:17, 4:26] = 1
    ref = monai_reference(pred, target, 1, None, False)
    for backend in ("kdtree", "torch"):
        ours = surface_distances(pred, target, 1, backend=backend)
        for name, field in FIELDS.items():
            torch.testing.assert_close(getattr(ours, field), ref[name].double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["kdtree", "torch"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 2.0)])
def test_surface_distances_match_brute_force(backend, spacing):
    rng = np.random.default_rng(7)
    pred = random_labels(rng, 3, 1, 24, 31, sigma=2)
    target = random_labels(rng, 3, 1, 24, 31, sigma=2)
    ours = surface_distances(pred, target, 1, spacing=spacing, backend=backend)
    for b in range(3):
        ref = brute_force_surface_distances(pred[b].numpy() == 1, target[b].numpy() == 1, spacing)
        for name, field in FIELDS.items():
            assert getattr(ours, field)[b, 0].item() == pytest.approx(ref[name], abs=1e-4)


def test_torch_backend_chunks_give_same_values(monkeypatch):
    """A chunk smaller than one column's worth of points must not change anything."""
    import model.metrics.surface as metrics

    rng = np.random.default_rng(3)
    pred, target = random_labels(rng, 3, 3, 40, 40), random_labels(rng, 3, 3, 40, 40)
    full = surface_distances(pred, target, 3, backend="torch")
    monkeypatch.setattr(metrics, "_TORCH_CHUNK_ELEMENTS", 40 * 7)  # 7 points per chunk
    chunked = surface_distances(pred, target, 3, backend="torch")
    for field in FIELDS.values():
        torch.testing.assert_close(getattr(chunked, field), getattr(full, field), equal_nan=True)


# ------------------------------------------------------------------------------ hand-computed


def test_single_pixels_at_known_distance():
    pred = torch.zeros(1, 8, 8, dtype=torch.long)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    pred[0, 0, 0] = 1
    target[0, 3, 4] = 1
    for backend in ("kdtree", "torch"):
        d = surface_distances(pred, target, 1, backend=backend)
        for field in FIELDS.values():
            assert getattr(d, field).item() == pytest.approx(5.0)
        d = surface_distances(pred, target, 1, spacing=(2.0, 1.0), backend=backend)  # rows are 2 units
        for field in FIELDS.values():
            assert getattr(d, field).item() == pytest.approx(math.sqrt(6**2 + 4**2))


@pytest.mark.parametrize("backend", ["kdtree", "torch"])
def test_single_pixels_in_opposite_corners(backend):
    """The farthest possible pair: the nearest edge lies a full row length away."""
    pred = torch.zeros(1, 9, 14, dtype=torch.long)
    target = torch.zeros(1, 9, 14, dtype=torch.long)
    pred[0, 0, 0] = 1
    target[0, 8, 13] = 1
    d = surface_distances(pred, target, 1, spacing=(1.5, 1.0), backend=backend)
    for field in FIELDS.values():
        assert getattr(d, field).item() == pytest.approx(math.hypot(8 * 1.5, 13))
        assert getattr(d, field).item() < d.diagonal


def test_one_way_and_percentile_hand_case():
    """Prediction: target square plus one far pixel. 3x3 square edges = 8 pixels, centre interior."""
    target = torch.zeros(1, 12, 12, dtype=torch.long)
    target[0, 1:4, 1:4] = 1
    pred = target.clone()
    pred[0, 1, 11] = 1  # 8 columns right of the square's right edge pixel (1, 3)
    d = surface_distances(pred, target, 1)
    # P->G: 8 zeros and one 8 (9 values). G->P: 8 zeros.
    assert d.ad.item() == pytest.approx(8 / 9)
    assert d.asd.item() == pytest.approx(8 / 17)
    # 95th percentile of 9 sorted values [0]*8 + [8]: rank 0.95 * 8 = 7.6 -> 0 + 0.6 * 8 = 4.8
    assert d.d95.item() == pytest.approx(4.8)
    assert d.hd95.item() == pytest.approx(4.8)  # the G->P direction is all zeros


def test_dice_and_iou_by_hand():
    pred = torch.tensor([[[1, 1, 0], [2, 2, 0], [0, 0, 0]]])
    target = torch.tensor([[[1, 0, 0], [2, 2, 2], [0, 0, 1]]])
    # classes 0, 1, 2: tp 3, 1, 2; fp 2, 1, 0; fn 1, 1, 1
    m = SegmentationMetrics(3, distance_metrics=False, include_background=True)
    m.update_labels(pred, target)
    res = m.compute()
    assert [res[f"DSC/{c}"] for c in range(3)] == pytest.approx([6 / 9, 2 / 4, 4 / 5])
    assert [res[f"IoU/{c}"] for c in range(3)] == pytest.approx([3 / 6, 1 / 3, 2 / 3])

    m = SegmentationMetrics(3, distance_metrics=False)
    m.update_labels(pred, target)
    res = m.compute()
    assert "DSC/0" not in res
    assert res["DSC/1"] == pytest.approx(2 / 4) and res["DSC/2"] == pytest.approx(4 / 5)
    assert res["IoU/1"] == pytest.approx(1 / 3) and res["IoU/2"] == pytest.approx(2 / 3)
    assert res["DSC"] == pytest.approx((0.5 + 0.8) / 2) and res["IoU"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert not any(name in res for name in DISTANCE_METRICS) and "TTR" not in res


def test_pixel_accuracy_by_hand_counts_every_label_class():
    # 9 pixels, 6 correct ((0,0), (1,0), (1,1) and the background at (0,2), (2,0), (2,1)): the
    # background counts though it is not an evaluated class, whatever include_background says.
    pred = torch.tensor([[[1, 1, 0], [2, 2, 0], [0, 0, 0]]])
    target = torch.tensor([[[1, 0, 0], [2, 2, 2], [0, 0, 1]]])
    for include_background in (False, True):
        m = SegmentationMetrics(3, distance_metrics=False, include_background=include_background)
        m.update_labels(pred, target)
        assert m.compute()["ACC"] == pytest.approx(6 / 9)
        assert m.per_image()[0]["ACC"] == pytest.approx(6 / 9)
    # binary: the correct pixels are tp + tn
    m = SegmentationMetrics(1, distance_metrics=False)
    m.update_labels(torch.tensor([[[1, 0], [0, 0]]]), torch.tensor([[[1, 1], [0, 0]]]))
    assert m.compute()["ACC"] == pytest.approx(3 / 4)


def test_pixel_accuracy_is_pooled_over_batches_and_matches_numpy():
    rng = np.random.default_rng(5)
    preds = [random_labels(rng, b, 4, 17, 23) for b in (3, 1, 2)]
    targets = [random_labels(rng, b, 4, 17, 23) for b in (3, 1, 2)]
    m = SegmentationMetrics(4, distance_metrics=False)
    for p, t in zip(preds, targets):
        m.update_labels(p, t)
    p_all, t_all = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    assert m.compute()["ACC"] == pytest.approx(np.mean(p_all == t_all), rel=1e-12)
    np.testing.assert_allclose([r["ACC"] for r in m.per_image()], (p_all == t_all).mean(axis=(1, 2)), rtol=1e-12)


def test_dice_is_pooled_over_the_set_not_averaged_per_batch():
    a_pred = torch.tensor([[[1, 0, 0, 0]]])  # tp 1
    a_tgt = torch.tensor([[[1, 0, 0, 0]]])
    b_pred = torch.tensor([[[0, 0, 0, 0]]])  # fn 3
    b_tgt = torch.tensor([[[1, 1, 1, 0]]])
    m = SegmentationMetrics(1, distance_metrics=False)
    m.update_labels(a_pred, a_tgt)
    m.update_labels(b_pred, b_tgt)
    assert m.compute()["DSC"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 3))  # not (1 + 0) / 2
    rows = m.per_image()
    assert [r["DSC/1"] for r in rows] == [1.0, 0.0]


def test_predict_labels_and_classes():
    logits = torch.tensor([[[[-1.0, 0.1], [2.0, -3.0]]]])
    assert predict_labels(logits).tolist() == [[[0, 1], [1, 0]]]
    assert predict_labels(logits, threshold=0.6).tolist() == [[[0, 0], [1, 0]]]  # sigmoid(0.1) = 0.525
    multi = torch.tensor([[[[1.0, 0.0]], [[2.0, -1.0]], [[0.0, 3.0]]]])  # (1, 3, 1, 2)
    assert predict_labels(multi).tolist() == [[[1, 2]]]
    assert predict_labels(logits.bfloat16()).dtype == torch.int64
    assert predict_classes(torch.tensor([[0.3], [-0.2]])).tolist() == [1, 0]
    assert predict_classes(torch.tensor([[0.3], [-0.2]]), threshold=0.6).tolist() == [0, 0]
    assert predict_classes(torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0]])).tolist() == [1, 0]


# ------------------------------------------------------------------------------ empty masks


def test_empty_masks_both_empty_excluded_one_empty_is_the_diagonal():
    h, w, spacing = 10, 16, (0.5, 2.0)
    diag = math.hypot(h * 0.5, w * 2.0)
    square = torch.zeros(h, w, dtype=torch.long)
    square[2:5, 3:7] = 1
    empty = torch.zeros(h, w, dtype=torch.long)
    shifted = torch.roll(square, 1, dims=0)  # one row down: every distance is 0 or 0.5
    pred = torch.stack([empty, square, empty, shifted])
    target = torch.stack([empty, empty, square, square])
    d = surface_distances(pred, target, 1, spacing=spacing)
    assert d.both_empty[:, 0].tolist() == [True, False, False, False]
    for field in FIELDS.values():
        v = getattr(d, field)[:, 0]
        assert math.isnan(v[0]) and v[1] == diag and v[2] == diag  # hallucinated / missed object
        assert 0 < v[3] <= 0.5

    m = SegmentationMetrics(1, spacing=spacing)
    logits = logits_from_labels(pred, 1)
    m.update(logits[:2], target[:2], ids=["both-empty", "hallucinated"])
    m.update(logits[2:], target[2:], ids=["missed", "shifted"])
    res = m.compute()
    for name, field in FIELDS.items():
        # image 0 is excluded: the mean runs over the other three, the one-empty ones included
        expected = (2 * diag + getattr(d, field)[3, 0].item()) / 3
        assert res[name] == pytest.approx(expected) and math.isfinite(res[name])
    rows = {r["id"]: r for r in m.per_image()}
    assert rows["both-empty"]["DSC/1"] == 1.0 and rows["both-empty"]["IoU/1"] == 1.0
    assert math.isnan(rows["both-empty"]["HD95/1"])
    assert rows["missed"]["DSC/1"] == 0.0 and rows["missed"]["HD95/1"] == diag
    assert rows["hallucinated"]["ASD/1"] == diag


def test_class_absent_everywhere_scores_perfect_agreement():
    pred = torch.zeros(2, 6, 6, dtype=torch.long)
    target = torch.zeros(2, 6, 6, dtype=torch.long)
    pred[:, 1:3, 1:3] = 1
    target[:, 1:3, 1:4] = 1  # class 2 never appears
    m = SegmentationMetrics(3, cma_coefficients={"DSC": 1.0, "HD95": 1.0})
    m.update_labels(pred, target)
    res = m.compute()
    assert res["DSC/2"] == 1.0 and res["IoU/2"] == 1.0 and res["HD95/2"] == 0.0 and res["ASD/2"] == 0.0
    assert res["HD95/1"] == pytest.approx(1.0) and res["HD95"] == pytest.approx(0.5)
    assert all(math.isfinite(v) for v in res.values())


# ------------------------------------------------------------------------------ accumulator


def _random_batch(rng, n, k, h=32, w=40):
    pred, target = random_labels(rng, n, k, h, w), random_labels(rng, n, k, h, w)
    cls_logits = torch.from_numpy(rng.standard_normal((n, 2))).float()
    cls_target = torch.from_numpy(rng.integers(0, 2, n))
    return logits_from_labels(pred, k), target, cls_logits, cls_target


@pytest.mark.parametrize("k", [1, 3])
def test_accumulating_batches_equals_one_big_batch(k):
    rng = np.random.default_rng(11)
    logits, target, cls_logits, cls_target = _random_batch(rng, 10, k)
    kw = {"spacing": (0.8, 1.2), "cma_coefficients": {"DSC": 0.5, "TTR": 0.2, "HD95": 0.3}}
    whole = SegmentationMetrics(k, **kw)
    whole.update(logits, target, cls_logits, cls_target)
    parts = SegmentationMetrics(k, **kw)
    for sl in (slice(0, 3), slice(3, 4), slice(4, 10)):
        parts.update(logits[sl], target[sl][:, None].float(), cls_logits[sl], cls_target[sl])  # (B, 1, H, W) target
    a, b = whole.compute(), parts.compute()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    ra, rb = whole.per_image(), parts.per_image()
    assert [r["id"] for r in rb] == list(range(10))
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[c] for c in x], [y[c] for c in x], rtol=1e-12)


def test_summary_equals_monai_mean_over_images_and_classes():
    """Dataset HD95/ASD = mean over counted images, then over classes (all non-empty here)."""
    rng = np.random.default_rng(5)
    pred = random_labels(rng, 6, 3, 40, 40, sigma=4)
    target = random_labels(rng, 6, 3, 40, 40, sigma=4)
    for c in (1, 2):  # make sure every class is present in every image
        pred[:, c, c] = c
        target[:, c, c] = c
    ref = monai_reference(pred, target, 3, None, False)
    m = SegmentationMetrics(3)
    m.update(logits_from_labels(pred, 3), target)
    res = m.compute()
    for name in DISTANCE_METRICS:
        per_class = ref[name].double().mean(0)
        assert res[f"{name}/1"] == pytest.approx(per_class[0].item(), abs=1e-4)
        assert res[name] == pytest.approx(per_class.mean().item(), abs=1e-4)


def test_ttr_and_cma_by_hand():
    pred = torch.zeros(2, 10, 10, dtype=torch.long)
    target = torch.zeros(2, 10, 10, dtype=torch.long)
    target[:, 2:6, 2:6] = 1
    pred[:, 2:6, 2:5] = 1  # one column short: tp 12, fn 4; distances 0 or 1
    coeffs = {"DSC": 0.5, "TTR": 0.25, "HD95": 0.25}
    m = SegmentationMetrics(1, cma_coefficients=coeffs)
    cls_logits = torch.tensor([[2.0], [-2.0]])  # predicts 1, 0
    m.update(logits_from_labels(pred, 1), target, cls_logits, torch.tensor([1, 1]))
    res = m.compute()
    dsc = 2 * 24 / (2 * 24 + 8)
    assert res["DSC"] == pytest.approx(dsc) and res["TTR"] == 0.5
    # P->G: 10 edge pixels of the 4x3 block; (3, 4) and (4, 4) are 1 from column 5, the rest
    # lie on the target's edge. G->P: 12 edge pixels; the 4 on column 5 are 1 away.
    # 95th percentiles: rank 0.95 * 9 = 8.55 in [0]*8 + [1, 1] -> 1; [0]*8 + [1]*4 -> 1.
    assert res["HD95"] == pytest.approx(1.0) and res["D95"] == pytest.approx(1.0)
    assert res["ASD"] == pytest.approx(6 / 22) and res["AD"] == pytest.approx(2 / 10)
    diag = math.hypot(10, 10)
    assert res["CMA"] == pytest.approx(0.5 * dsc + 0.25 * 0.5 + 0.25 * (1 - 1 / diag))
    rows = m.per_image()
    assert [(r["cls_pred"], r["cls_target"], r["TTR"]) for r in rows] == [(1, 1, 1.0), (0, 1, 0.0)]


def test_cma_is_bounded_by_worst_case():
    """Everything wrong: a missed object everywhere → every score 0 → CMA 0."""
    pred = torch.zeros(3, 8, 8, dtype=torch.long)
    target = torch.zeros(3, 8, 8, dtype=torch.long)
    target[:, 2:4, 2:4] = 1
    coeffs = {name: 1.0 for name in ("DSC", "IoU", "ASD", "AD", "HD95", "D95")}
    m = SegmentationMetrics(1, cma_coefficients=coeffs)
    m.update_labels(pred, target)
    assert m.compute()["CMA"] == pytest.approx(0.0, abs=1e-12)
    m.reset()
    m.update_labels(target, target)
    assert m.compute()["CMA"] == pytest.approx(1.0)


def test_compute_is_repeatable_and_reset_clears():
    rng = np.random.default_rng(4)
    logits, target, _, _ = _random_batch(rng, 3, 1)
    m = SegmentationMetrics(1)
    m.update(logits, target)
    assert m.compute() == m.compute()
    m.reset()
    with pytest.raises(RuntimeError, match="before any image"):
        m.compute()
    assert m.per_image() == []


def test_metric_names_and_directions():
    assert set(METRIC_NAMES) == {"DSC", "IoU", "TTR", "ASD", "AD", "HD95", "D95", "CMA"}
    assert set(HIGHER_IS_BETTER) == set(METRIC_NAMES)
    assert [n for n in METRIC_NAMES if not HIGHER_IS_BETTER[n]] == list(DISTANCE_METRICS)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.0}, "num_classes"),
        ({"num_classes": 1, "seg_threshold": 1.5}, "seg_threshold"),
        ({"num_classes": 1, "cls_threshold": -0.1}, "cls_threshold"),
        ({"num_classes": 1, "spacing": (1.0, 0.0)}, "spacing"),
        ({"num_classes": 1, "spacing": (1.0, 2.0, 3.0)}, "spacing"),
        ({"num_classes": 1, "backend": "cuda"}, "backend"),
        ({"num_classes": 1, "cma_coefficients": {"Dice": 1.0}}, "unknown metric 'Dice'.*valid metrics"),
        ({"num_classes": 1, "cma_coefficients": {"DSC": -1.0}}, r"cma_coefficients\['DSC'\]"),
        ({"num_classes": 1, "cma_coefficients": {"DSC": 0.0}}, "positive weight sum"),
        ({"num_classes": 1, "cma_coefficients": {"CMA": 1.0}}, "unknown metric 'CMA'"),
        ({"num_classes": 1, "distance_metrics": False, "cma_coefficients": {"HD95": 1.0}}, "distance_metrics is off"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationMetrics(**kwargs)


def test_update_rejects_bad_input():
    m = SegmentationMetrics(3)
    logits = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="3 channels but num_classes is 1"):
        SegmentationMetrics(1).update(logits, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="target must be"):
        m.update(logits, torch.zeros(2, 8, 9))
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\]"):
        m.update(logits, torch.full((2, 8, 8), 3))
    with pytest.raises(ValueError, match="non-integer"):
        m.update(logits, torch.full((2, 8, 8), 0.5))
    with pytest.raises(ValueError, match="together"):
        m.update(logits, torch.zeros(2, 8, 8), cls_logits=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="ids must have one entry per image"):
        m.update(logits, torch.zeros(2, 8, 8), ids=["a"])
    with pytest.raises(ValueError, match="seg_logits must be"):
        predict_labels(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="cls_logits must be"):
        predict_classes(torch.zeros(2))
    with pytest.raises(ValueError, match="pred and target shapes differ"):
        surface_distances(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="integer labels"):
        surface_distances(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), 1)


def test_cma_with_ttr_but_no_classifier_says_so():
    m = SegmentationMetrics(1, cma_coefficients={"DSC": 1.0, "TTR": 1.0})
    m.update_labels(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="TTR"):
        m.compute()


# ------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data: tuple, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        logits, target, cls_logits, cls_target, kwargs = data
        n = logits.shape[0]
        mine = list(range(rank, n, world))  # DistributedSampler's interleaved shards
        m = SegmentationMetrics(3, **kwargs)
        m.update(logits[mine[:2]], target[mine[:2]], cls_logits[mine[:2]], cls_target[mine[:2]], ids=mine[:2])
        rest = mine[2:]  # ShardSampler's shards: no padded duplicates to count twice
        m.update(logits[rest], target[rest], cls_logits[rest], cls_target[rest], ids=rest)
        torch.save({"res": m.compute(), "rows": m.gather_per_image()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduced_metrics_equal_single_process(tmp_path):
    rng = np.random.default_rng(21)
    logits, target, cls_logits, cls_target = _random_batch(rng, 9, 3)
    kwargs = {"spacing": (1.0, 0.7), "cma_coefficients": {"DSC": 0.5, "TTR": 0.2, "HD95": 0.3}}
    mp.spawn(
        _ddp_worker,
        args=(2, _free_port(), (logits, target, cls_logits, cls_target, kwargs), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    single = SegmentationMetrics(3, **kwargs)
    single.update(logits, target, cls_logits, cls_target)
    expected = single.compute()
    # independent Dice from NumPy on the whole set
    pred = logits.argmax(1).numpy()
    tgt = target.numpy()
    for c in (1, 2):
        tp = np.sum((pred == c) & (tgt == c))
        fp, fn = np.sum((pred == c) & (tgt != c)), np.sum((pred != c) & (tgt == c))
        assert expected[f"DSC/{c}"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert out["res"].keys() == expected.keys()
        for key, value in expected.items():
            assert out["res"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        rows = out["rows"]
        assert [r["id"] for r in rows] == list(range(9))  # every image once, sorted by id
        for r, s in zip(rows, single.per_image()):
            np.testing.assert_allclose([r[c] for c in s if c != "id"], [s[c] for c in s if c != "id"], rtol=1e-12)
