"""Tests for the loss terms of model/losses/: hand-computed values on tiny tensors, SciPy / MONAI
references on random inputs, gradients, empty targets, autocast, and the combined loss's weighting
modes. The names, their rules and the builder: tests/model/test_loss_registry.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from torch import nn

from conftest import labels_with_every_class, ref_sdm
from model.losses import (
    LOSS_HEADS,
    LOSSES,
    SMOOTH,
    BoundaryLoss,
    ClassificationLoss,
    CombinedLoss,
    FocalLoss,
    HardDiceLoss,
    SoftClDiceLoss,
    SoftDiceLoss,
    WeightedBCELoss,
    WeightedCELoss,
    build_loss,
    loss_problems,
    soft_skeleton,
)

BIG = 20.0  # logit magnitude of a "confident" prediction: sigmoid(20) = 1 - 2e-9
SIG5 = 1 / (1 + math.exp(-5))  # σ(5): HardDICE's soft 1 for p = 1 with k = 10, t = 0.5


def binary_logits(pred) -> torch.Tensor:
    """(B, 1, H, W) logits of ±BIG for a 0/1 prediction map (B, H, W)."""
    pred = torch.as_tensor(pred)
    return torch.where(pred.bool(), BIG, -BIG).float().unsqueeze(1)


def multi_logits(pred, k: int) -> torch.Tensor:
    """(B, K, H, W) logits: BIG on the predicted class, 0 elsewhere."""
    return BIG * F.one_hot(torch.as_tensor(pred).long(), k).permute(0, 3, 1, 2).float()


def t(rows) -> torch.Tensor:
    """A (1, H, W) int64 target from nested lists."""
    return torch.tensor([rows], dtype=torch.long)


# --------------------------------------------------------------------------------------- inputs


def test_bad_inputs_raise_clear_errors():
    loss = LOSSES["SoftDICE"]()
    with pytest.raises(ValueError, match=r"seg_logits must be a float \(B, K, H, W\)"):
        loss(torch.zeros(1, 2, 2), t([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="does not match seg_logits"):
        loss(torch.zeros(1, 1, 3, 3), t([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="integer class indices"):
        loss(torch.zeros(1, 1, 2, 2), t([[0, 1], [1, 0]]).float())
    with pytest.raises(ValueError, match=r"classes 0..1"):
        loss(torch.zeros(1, 1, 2, 2), t([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="BCE does not support a multiclass head.*use CE"):
        LOSSES["BCE"]()(torch.zeros(1, 3, 2, 2), t([[0, 2], [1, 0]]))


# --------------------------------------------------------------------------------------- pixel losses


Y2 = [[1, 1], [0, 0]]  # binary target
HALF2 = [[1, 0], [1, 0]]  # right on 2 of 4 pixels
Y3 = [[0, 1], [2, 2]]  # 3-class target


@pytest.mark.parametrize("name", ["BCE", "Focal"])
def test_binary_pixel_losses_hand_values(name):
    loss = LOSSES[name]()
    y = t(Y2)
    # perfect: -log σ(20) ≈ 2e-9; worst: -log σ(-20) ≈ 20; half: two pixels at 0, two at 20
    assert loss(binary_logits(y), y).item() == pytest.approx(0, abs=1e-6)
    assert loss(binary_logits(1 - y), y).item() == pytest.approx(20, abs=1e-4)
    assert loss(binary_logits(t(HALF2)), y).item() == pytest.approx(10, abs=1e-4)
    # p = 1/2 everywhere: BCE = ln 2; focal (γ = 2) = (1/2)² ln 2
    expected = math.log(2) * (0.25 if name == "Focal" else 1.0)
    assert loss(torch.zeros(1, 1, 2, 2), y).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["CE", "Focal"])
def test_multiclass_pixel_losses_hand_values(name):
    loss = LOSSES[name]()
    y = t(Y3)
    assert loss(multi_logits(y, 3), y).item() == pytest.approx(0, abs=1e-6)
    # wrong class at 20 while the target's logit is 0: -log softmax = 20 + log(1 + 2e-20·...) ≈ 20
    assert loss(multi_logits((y + 1) % 3, 3), y).item() == pytest.approx(20, abs=1e-4)
    assert loss(multi_logits(t([[0, 1], [0, 1]]), 3), y).item() == pytest.approx(10, abs=1e-4)
    # uniform over 4 classes: CE = ln 4, focal = (3/4)² ln 4
    expected = math.log(4) * (0.5625 if name == "Focal" else 1.0)
    assert loss(torch.zeros(1, 4, 2, 2), t([[0, 1], [2, 3]])).item() == pytest.approx(expected, rel=1e-6)


def test_focal_gamma_zero_is_cross_entropy_and_alpha_balances():
    g = torch.Generator().manual_seed(0)
    x1, y1 = torch.randn(2, 1, 5, 5, generator=g), torch.randint(0, 2, (2, 5, 5), generator=g)
    x3, y3 = torch.randn(2, 3, 5, 5, generator=g), torch.randint(0, 3, (2, 5, 5), generator=g)
    assert FocalLoss(gamma=0)(x1, y1).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(x1[:, 0], y1.float()).item(), rel=1e-6)
    assert FocalLoss(gamma=0)(x3, y3).item() == pytest.approx(F.cross_entropy(x3, y3).item(), rel=1e-6)
    # α = 0.25 on the 2 foreground pixels, 0.75 on the 2 background ones, each (1/2)² ln 2
    assert FocalLoss(alpha=0.25)(torch.zeros(1, 1, 2, 2), t(Y2)).item() == pytest.approx(
        0.5 * 0.25 * math.log(2), rel=1e-6)


# --------------------------------------------------------------------------------------- region losses


REGION = ["SoftDICE", "HardDICE", "IoU", "GDL"]
# binary, target Y2: (perfect, worst, half-right HALF2) by hand; HardDICE through σ(10 (p - 1/2))
BINARY_REGION = {
    "SoftDICE": (0.0, 1.0, 0.5),
    "HardDICE": (1 - SIG5, SIG5, 0.5),
    "IoU": (0.0, 1.0, 2 / 3),
    "GDL": (0.0, 1.0, 0.5),
}


@pytest.mark.parametrize("name", REGION)
def test_binary_region_losses_hand_values(name):
    loss = LOSSES[name]()
    y = t(Y2)
    perfect, worst, half = BINARY_REGION[name]
    assert loss(binary_logits(y), y).item() == pytest.approx(perfect, abs=1e-5)
    assert loss(binary_logits(1 - y), y).item() == pytest.approx(worst, abs=1e-5)
    assert loss(binary_logits(t(HALF2)), y).item() == pytest.approx(half, abs=1e-5)


@pytest.mark.parametrize("name,expected", [("SoftDICE", 4 / 15), ("IoU", 5 / 12), ("GDL", 5 / 16)])
def test_binary_region_losses_with_background(name, expected):
    # target one pixel, prediction two pixels: foreground Dice 2/3, IoU 1/2; background (3 pixels,
    # predicted 2, both right) Dice 4/5, IoU 2/3; GDL weights 1 and 1/9: 1 - 2(1 + 2/9)/(3 + 5/9)
    loss = LOSSES[name](include_background=True)
    y = t([[1, 0], [0, 0]])
    assert loss(binary_logits(t([[1, 1], [0, 0]])), y).item() == pytest.approx(expected, abs=1e-5)


def _hard_multi(case: str) -> float:
    """HardDICE (k = 10) on Y3 by hand: a predicted class has h = σ(10 (1 - 0)), the others σ(-10)."""
    a, b = 1 / (1 + math.exp(-10)), 1 / (1 + math.exp(10))
    if case == "perfect":  # class 1 predicted on its 1 pixel, class 2 on its 2
        dice1 = 2 * a / ((a + 3 * b) + 1)
        dice2 = 2 * (2 * a) / ((2 * a + 2 * b) + 2)
    else:  # [[0, 1], [2, 0]]: each class predicted on one pixel; class 2 hits one of its two
        dice1 = 2 * a / ((a + 3 * b) + 1)
        dice2 = 2 * (a + b) / ((a + 3 * b) + 2)
    return 1 - (dice1 + dice2) / 2


@pytest.mark.parametrize("name", REGION)
def test_multiclass_region_losses_hand_values(name):
    loss = LOSSES[name]()
    y = t(Y3)
    half = {  # prediction [[0, 1], [2, 0]]: class 1 right; class 2 one of two pixels
        "SoftDICE": 1 - (1 + 2 / 3) / 2,
        "HardDICE": _hard_multi("half"),
        "IoU": 1 - (1 + 1 / 2) / 2,
        "GDL": 1 - 2 * (1 + 1 / 4) / (2 + 3 / 4),  # weights 1/1², 1/2²
    }[name]
    perfect = _hard_multi("perfect") if name == "HardDICE" else 0.0
    assert loss(multi_logits(y, 3), y).item() == pytest.approx(perfect, abs=1e-5)
    assert loss(multi_logits((y + 1) % 3, 3), y).item() == pytest.approx(1.0, abs=1e-4)
    assert loss(multi_logits(t([[0, 1], [2, 0]]), 3), y).item() == pytest.approx(half, abs=1e-5)


def test_gdl_empty_class_takes_the_largest_weight():
    # class 2 absent from the target but predicted once: weight 1 (= class 1's), 1 - 2/(2 + 1)
    loss = LOSSES["GDL"]()
    assert loss(multi_logits(t([[0, 1], [2, 0]]), 3), t([[0, 1], [0, 0]])).item() == pytest.approx(1 / 3, abs=1e-5)


def test_region_losses_match_monai_on_random_inputs():
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 4, 9, 9, generator=g), torch.randint(0, 4, (3, 9, 9), generator=g)
    for bg in (False, True):
        kw = dict(softmax=True, to_onehot_y=True, include_background=bg, batch=True, smooth_nr=0, smooth_dr=0)
        cases = [
            (SoftDiceLoss(bg), monai_losses.DiceLoss(**kw)),
            (LOSSES["IoU"](bg), monai_losses.DiceLoss(jaccard=True, **kw)),
            (LOSSES["GDL"](bg), monai_losses.GeneralizedDiceLoss(**kw)),
        ]
        for ours, ref in cases:
            assert ours(x, y).item() == pytest.approx(ref(x, y.unsqueeze(1)).item(), abs=1e-5)


def test_region_losses_per_image_match_monai_batch_false():
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 9, 9, generator=g)
    y = torch.randint(0, 4, (3, 9, 9), generator=g)
    y[:, 0, :4] = torch.arange(4)  # every class in every image: MONAI's unsmoothed ratios stay defined
    y_missing = y.clone()
    y_missing[1][y_missing[1] == 2] = 3  # image 1 has no class 2: the smoothing decides its ratio
    for bg in (False, True):
        kw = dict(softmax=True, to_onehot_y=True, include_background=bg, batch=False)
        cases = [
            (SoftDiceLoss(bg, batch_dice=False), monai_losses.DiceLoss(smooth_nr=SMOOTH, smooth_dr=SMOOTH, **kw), y_missing),
            (LOSSES["IoU"](bg, batch_dice=False), monai_losses.DiceLoss(jaccard=True, smooth_nr=0, smooth_dr=0, **kw), y),
            (LOSSES["GDL"](bg, batch_dice=False), monai_losses.GeneralizedDiceLoss(smooth_nr=0, smooth_dr=0, **kw), y),
        ]
        for ours, ref, target in cases:
            assert ours(x, target).item() == pytest.approx(ref(x, target.unsqueeze(1)).item(), abs=1e-5)


def test_per_image_dice_charges_a_false_pixel_in_an_empty_tile_fully():
    # tile A: one object pixel, found; tile B: no object, one false pixel. Batch Dice: 1 - 2·1/(2 + 1);
    # per image: Dice 1 for A and (0 + s)/(1 + s) ≈ 0 for B, so 1 - (1 + 0)/2
    target = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    logits = binary_logits([[[1, 0], [0, 0]], [[0, 0], [0, 1]]])
    assert SoftDiceLoss()(logits, target).item() == pytest.approx(1 / 3, abs=1e-5)
    assert SoftDiceLoss(batch_dice=False)(logits, target).item() == pytest.approx(0.5, abs=1e-4)
    hard = HardDiceLoss(steepness=1e4, batch_dice=False)(logits, target).item()
    assert hard == pytest.approx(0.5, abs=1e-3)


def test_hard_dice_approaches_hard_dice_with_steep_sigmoid():
    g = torch.Generator().manual_seed(2)
    x, y = 3 * torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)
    pred = F.one_hot(x.argmax(1), 3).permute(0, 3, 1, 2).float()[:, 1:]
    yy = F.one_hot(y, 3).permute(0, 3, 1, 2).float()[:, 1:]
    inter, total = (pred * yy).sum((0, 2, 3)), (pred + yy).sum((0, 2, 3))
    hard = 1 - (2 * inter / total).mean().item()
    assert HardDiceLoss(steepness=1e4)(x, y).item() == pytest.approx(hard, abs=1e-3)


# --------------------------------------------------------------------------------------- weighted CE


def test_wbce_hand_values():
    # one foreground pixel in a 3×3 tile: SDM 0 at it, 1 at its 4 neighbours, √2 at the corners
    y = t([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    w0, sigma = 10.0, 5.0
    edge, corner = math.exp(-1 / (2 * sigma**2)), math.exp(-2 / (2 * sigma**2))
    mean_w = (1 + w0 + 4 * (1 + w0 * edge) + 4 * (1 + w0 * corner)) / 9
    loss = WeightedBCELoss(w0=w0, sigma=sigma)
    assert loss(torch.zeros(1, 1, 3, 3), y).item() == pytest.approx(math.log(2) * mean_w, rel=1e-5)
    assert loss(binary_logits(y), y).item() == pytest.approx(0, abs=1e-6)
    assert loss(binary_logits(1 - y), y).item() == pytest.approx(20 * mean_w, rel=1e-5)


def test_wbce_matches_scipy_weight_map_multiclass():
    rng = np.random.default_rng(3)
    y = labels_with_every_class(3, 2, 3, 12, 12)
    x = torch.from_numpy(rng.normal(size=(2, 3, 12, 12))).float()
    w = np.ones((2, 12, 12))
    for b in range(2):
        d = np.full((12, 12), np.inf)
        for c in (1, 2):
            m = y[b].numpy() == c
            if m.any() and not m.all():
                d = np.minimum(d, np.abs(ref_sdm(m)))
        w[b] = 1 + 10 * np.exp(-(d**2) / 50)
    ce = F.cross_entropy(x, y, reduction="none").numpy()
    assert WeightedBCELoss()(x, y).item() == pytest.approx(float((w * ce).mean()), rel=1e-5)


def test_wce_hand_values():
    # objects at both ends of a 1×5 row: d1 + d2 = 4 on every pixel; class weights 5/(2·2), 5/(2·3)
    y = t([[1, 0, 0, 0, 1]])
    border = 10 * math.exp(-16 / 50)
    w = np.array([1.25, 5 / 6, 5 / 6, 5 / 6, 1.25]) + border
    loss = WeightedCELoss()
    assert loss(torch.zeros(1, 1, 1, 5), y).item() == pytest.approx(math.log(2) * w.mean(), rel=1e-5)
    assert loss(binary_logits(1 - y), y).item() == pytest.approx(20 * w.mean(), rel=1e-5)
    assert loss(binary_logits(y), y).item() == pytest.approx(0, abs=1e-6)
    # a single object has no second-nearest object: class weights only
    assert loss(torch.zeros(1, 1, 1, 5), t([[1, 1, 0, 0, 0]])).item() == pytest.approx(math.log(2), rel=1e-6)


def test_wce_matches_scipy_unet_weight_map():
    rng = np.random.default_rng(5)
    y = np.zeros((2, 16, 16), dtype=np.int64)
    for b in range(2):  # separate squares of classes 1 and 2
        for _ in range(4):
            r, c = rng.integers(0, 13, 2)
            y[b, r : r + 3, c : c + 3] = rng.integers(1, 3)
    x = torch.from_numpy(rng.normal(size=(2, 3, 16, 16))).float()
    ref = np.zeros((2, 16, 16))
    for b in range(2):
        counts = np.bincount(y[b].ravel(), minlength=3)
        wc = np.where(counts > 0, y[b].size / ((counts > 0).sum() * np.maximum(counts, 1)), 0)[y[b]]
        dists = []
        for c in (1, 2):
            lab, n = ndi.label(y[b] == c)
            dists += [ndi.distance_transform_edt(lab != j) for j in range(1, n + 1)]
        d = np.sort(np.stack(dists), axis=0)
        ref[b] = wc + 10 * np.exp(-((d[0] + d[1]) ** 2) / 50)
    ce = F.cross_entropy(x, torch.from_numpy(y), reduction="none").numpy()
    value = WeightedCELoss(chunk=3)(x, torch.from_numpy(y)).item()  # chunks of 3: several topk merges
    assert value == pytest.approx(float((ref * ce).mean()), rel=1e-5)


# --------------------------------------------------------------------------------------- boundary loss


SQUARE = [[0] * 5, [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0] * 5]


def test_boundary_hand_values():
    # 3×3 square in a 5×5 tile: SDM -1 at the centre, 0 on the 8 inner edge pixels, 1 on the 12
    # pixels beside the square, √2 on the 4 diagonal corners
    y = t(SQUARE)
    outside = 12 + 4 * math.sqrt(2)
    raw = BoundaryLoss(normalization=None)
    assert raw(binary_logits(y), y).item() == pytest.approx(-1 / 25, abs=1e-6)
    assert raw(binary_logits(1 - y), y).item() == pytest.approx(outside / 25, abs=1e-6)
    assert raw(torch.zeros(1, 1, 5, 5), y).item() == pytest.approx(0.5 * (outside - 1) / 25, abs=1e-6)
    shifted = BoundaryLoss(nonnegative=True, normalization=None)
    assert shifted(binary_logits(y), y).item() == pytest.approx(0, abs=1e-6)
    assert shifted(binary_logits(1 - y), y).item() == pytest.approx((outside + 1) / 25, abs=1e-6)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("normalization", [None, "static_max"])
def test_boundary_equals_scipy_reference_on_random_masks(k, normalization):
    b, h, w = 3, 20, 17
    g = torch.Generator().manual_seed(7)
    y = labels_with_every_class(8, b, k, h, w)
    x = 3 * torch.randn(b, k, h, w, generator=g)
    p = torch.sigmoid(x) if k == 1 else torch.softmax(x, 1)
    ref = 0.0
    classes = [1] if k == 1 else [1, 2]  # foreground classes
    for i in range(b):
        for c in classes:
            sdm = ref_sdm(y[i].numpy() == c)
            ref += float((p[i, 0 if k == 1 else c].double().numpy() * sdm).sum())
    ref /= b * len(classes) * h * w
    if normalization == "static_max":  # the tile's largest distance, corner to corner
        ref /= math.hypot(h - 1, w - 1)
    assert abs(BoundaryLoss(normalization=normalization)(x, y).item() - ref) < 1e-5


def test_boundary_with_whole_image_distances():
    # An empty 5x5 tile whose nearest object lies 40 px away (SDM_SCOPE=image): the tile's own
    # map is zero, so a false positive costs nothing; the whole image's map charges its distance.
    y = torch.zeros(1, 5, 5, dtype=torch.long)
    dist = 40.0 + torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)  # 40 ... 64 px
    x = binary_logits(torch.ones(1, 5, 5))  # the whole tile predicted foreground
    p = torch.sigmoid(x)
    assert BoundaryLoss(normalization=None)(x, y).item() == 0.0
    raw = BoundaryLoss(normalization=None)(x, y, dist).item()
    assert raw == pytest.approx(float((p * dist).mean()), rel=1e-6) and raw > 40
    # static_max divides by the tile's own constant (its diagonal), as for the tile's own maps
    scaled = BoundaryLoss(normalization="static_max")(x, y, dist).item()
    assert scaled == pytest.approx(raw / math.hypot(4, 4), rel=1e-6)
    # on a tile that holds the object, the whole image's map cut to the tile is the tile's own map
    # wherever the nearest boundary lies inside the tile: both give the same value
    y = t(SQUARE)
    own = torch.from_numpy(ref_sdm(y[0].numpy() == 1)).float()[None, None]
    x = binary_logits(1 - y)
    assert BoundaryLoss(normalization=None)(x, y, own).item() == pytest.approx(
        BoundaryLoss(normalization=None)(x, y).item(), abs=1e-6)


def test_combined_loss_gives_whole_image_distances_to_boundary_only():
    x, y = _batch()
    dist = torch.full((x.shape[0], 1, *x.shape[2:]), 7.0)
    combined = build_loss("SoftDICE_BCE_Boundary", seg_classes=1, sdm_normalization=None)
    with_maps, without = combined(x, y, target_sdm=dist), combined(x, y)
    for name in ("SoftDICE", "BCE"):
        assert with_maps.terms[name].item() == without.terms[name].item()
    assert with_maps.terms["Boundary"].item() == pytest.approx(float((torch.sigmoid(x.detach()) * 7).mean()), rel=1e-6)
    with pytest.raises(ValueError, match=r"target_sdm must be a float \(2, 1, 10, 10\) tensor"):
        combined(x, y, target_sdm=dist[:, :, :4])
    with pytest.raises(ValueError, match="one map per foreground class"):
        BoundaryLoss()(multi_logits(y, 3), y, dist)


# --------------------------------------------------------------------------------------- SDM losses
#
# The predicted SDM comes from utils.sdf's differentiable ``conv`` method: a pixel of probability
# p is a source at cost -0.35·log p (px). So p = 1/2 everywhere gives cost c = 0.35·log 2 on both
# sides and φ̂ = (1-p)·c - (c-1)·p = 1/2 everywhere; p = σ(±20) gives the hard mask's SDM (the
# 3-px chamfer is exact on the 5×5 square: straight steps 1, diagonal steps √2).
#
# Target SQUARE: φ = -1 (centre), 0 (8 inner-edge pixels), 1 (12 beside), √2 (4 corners).
# Its complement (worst prediction): φ̂ = 2 (centre), 1 (inner edge), 0 (beside), 1-√2 (corners).

R2 = math.sqrt(2)


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


SDM_HAND = {  # (perfect, worst, p = 1/2), normalization None, δ = 0.5 for cMAE, k = 10 for sMAE
    "MAE": (0.0, (3 + 8 + 12 + 4 * (2 * R2 - 1)) / 25, (1.5 + 8 * 0.5 + 12 * 0.5 + 4 * (R2 - 0.5)) / 25),
    "cMAE": (0.0, (1 + 8 * 0.5 + 12 * 0.5 + 4 * (R2 - 0.5)) / 25, (1 + 8 * 0.5) / 25),
    "sMAE": (
        # sign term σ(-k φ̂ s), s = -1 inside, +1 outside; φ̂ = 0 costs 1/2
        (_sig(-10) + 8 * 0.5 + 12 * _sig(-10) + 4 * _sig(-10 * R2)) / 25,
        (3 + 8 + 12 + 4 * (2 * R2 - 1)) / 25 + (_sig(20) + 8 * _sig(10) + 12 * 0.5 + 4 * _sig(10 * (R2 - 1))) / 25,
        (1.5 + 8 * 0.5 + 12 * 0.5 + 4 * (R2 - 0.5)) / 25 + (9 * _sig(5) + 16 * _sig(-5)) / 25,
    ),
}


def _ref_soft_skeleton(x: np.ndarray, iterations: int) -> np.ndarray:
    """The clDice paper's soft skeleton written with SciPy's grey morphology: erosion by the 3x3
    cross (outside = +inf), dilation by the 3x3 square (outside = -inf)."""
    cross = ndi.generate_binary_structure(2, 1)

    def erode(a):
        return np.stack([ndi.grey_erosion(c, footprint=cross, mode="constant", cval=np.inf) for c in a])

    def open_(a):
        e = erode(a)
        return np.stack([ndi.grey_dilation(c, size=(3, 3), mode="constant", cval=-np.inf) for c in e])

    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    skel = relu(x - open_(x))
    for _ in range(iterations):
        x = erode(x)
        delta = relu(x - open_(x))
        skel = skel + relu(delta - skel * delta)
    return skel


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_soft_skeleton_matches_scipy_grey_morphology(iterations):
    x = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    ref = _ref_soft_skeleton(x.reshape(-1, 17, 23).numpy(), iterations).reshape(x.shape)
    np.testing.assert_allclose(soft_skeleton(x, iterations).numpy(), ref, atol=1e-12)


def test_soft_skeleton_of_a_bar_is_its_centre_line():
    bar = torch.zeros(1, 1, 9, 12)
    bar[..., 3:6, 2:10] = 1  # 3 px thick, 8 px long
    centre = torch.zeros_like(bar)
    centre[..., 4, 3:9] = 1  # its first erosion by the cross: the middle row less one pixel each end
    assert torch.equal(soft_skeleton(bar, 3), centre)
    disk = torch.from_numpy(np.hypot(*np.mgrid[-7:8, -7:8]) <= 6.5).float()[None, None]
    skel = soft_skeleton(disk, 7)
    assert skel[0, 0, 7, 7] == 1 and skel.sum() < 0.1 * disk.sum()  # thin, and reaches the centre


def test_cldice_hand_values():
    y = torch.zeros(1, 9, 12, dtype=torch.long)
    y[:, 3:6, 2:10] = 1  # skeleton: row 4, columns 3-8 (6 px)
    pred = torch.zeros_like(y)
    pred[:, 3:6, 2:6] = 1  # the left half: skeleton row 4, columns 3-4 (2 px), all inside y
    loss = SoftClDiceLoss(iterations=3)
    assert loss(binary_logits(y), y).item() == pytest.approx(0, abs=1e-6)
    # Tprec = (2 + 1) / (2 + 1) = 1, Tsens = (3 + 1) / (6 + 1) = 4/7: clDice = 2 (4/7) / (11/7) = 8/11
    assert loss(binary_logits(pred), y).item() == pytest.approx(3 / 11, abs=1e-6)
    # the same with a softmax head: its foreground channel scores the same
    two = torch.stack([-binary_logits(pred)[:, 0], binary_logits(pred)[:, 0]], 1)
    assert SoftClDiceLoss(iterations=3)(two, y).item() == pytest.approx(3 / 11, abs=1e-6)
    # a missed thin line costs more than its area does under Dice: 1 of 2 equal-area objects missed
    blob = torch.zeros(1, 12, 12, dtype=torch.long)
    blob[:, 1:5, 1:5] = 1  # 16 px square
    both = blob.clone()
    both[:, 9, 0:12] = 1  # 12 px line... of 1 px thickness
    both[:, 10, 2:6] = 1  # ...plus 4 px: 16 px in all
    assert SoftClDiceLoss(iterations=3)(binary_logits(blob), both) > SoftDiceLoss()(binary_logits(blob), both)


def test_cldice_iterations_are_checked_and_passed_from_the_options():
    with pytest.raises(ValueError, match="cldice_iterations=0 must be an int >= 1"):
        SoftClDiceLoss(iterations=0)
    assert build_loss("SoftDICE_clDice", cldice_iterations=4).seg_terms["clDice"].iterations == 4
    # clDice is a boundary term under the schedule: the paper's (1 - alpha) Dice + alpha clDice
    assert loss_problems(["SoftDICE", "clDice"], 1, "schedule") == []


@pytest.mark.parametrize("name", ["MAE", "cMAE", "sMAE"])
def test_sdm_losses_hand_values(name):
    y = t(SQUARE)
    loss = build_loss(name, seg_classes=1, sdm_normalization=None, clamp_delta=0.5).seg_terms[name]
    perfect, worst, half = SDM_HAND[name]
    assert loss(binary_logits(y), y).item() == pytest.approx(perfect, abs=1e-5)
    assert loss(binary_logits(1 - y), y).item() == pytest.approx(worst, abs=1e-5)
    assert loss(torch.zeros(1, 1, 5, 5), y).item() == pytest.approx(half, abs=1e-5)


def test_sdm_losses_on_empty_target():
    # no target boundary: the L1 parts give 0 and no gradient; sMAE's sign term still pushes the
    # foreground logits down (φ̂ up) everywhere it reaches
    g = torch.Generator().manual_seed(23)
    y = torch.zeros(2, 9, 9, dtype=torch.long)
    for name in ("MAE", "cMAE", "sMAE"):
        x = torch.randn(2, 1, 9, 9, generator=g, requires_grad=True)
        value = build_loss(name, seg_classes=1).seg_terms[name](x, y)
        value.backward()
        if name == "sMAE":
            assert value.item() > 0 and (x.grad >= 0).all() and x.grad.sum() > 0
        else:
            assert value.item() == 0 and (x.grad == 0).all()


@pytest.mark.parametrize("name", ["MAE", "cMAE"])
@pytest.mark.parametrize("k", [1, 3])
def test_sdm_losses_match_scipy_on_hard_predictions(name, k):
    # manhattan: utils.sdf's conv method is exact for binary masks, so for (almost) hard
    # predictions the loss must equal the L1 between SciPy SDMs (taxicab chamfer), normalised
    # by the tile's largest manhattan distance (H-1) + (W-1)
    b, h, w = 2, 14, 15
    y, pred = labels_with_every_class(21, b, k, h, w), labels_with_every_class(22, b, k, h, w)
    logits = binary_logits(pred) * 3 if k == 1 else 3 * multi_logits(pred, k)  # σ(-60): cost 21 px

    def sdm(mask):
        pos = mask.astype(bool)
        inside = ndi.distance_transform_cdt(pos, metric="taxicab")
        outside = ndi.distance_transform_cdt(~pos, metric="taxicab")
        return np.where(pos, 1 - inside, outside) / ((h - 1) + (w - 1))

    delta = 0.1
    diffs = []
    for i in range(b):
        for c in ([1] if k == 1 else range(1, k)):
            a, r = sdm(pred[i].numpy() == c), sdm(y[i].numpy() == c)
            if name == "cMAE":
                a, r = np.clip(a, -delta, delta), np.clip(r, -delta, delta)
            diffs.append(np.abs(a - r))
    loss = build_loss(name, seg_classes=k, sdm_distance="manhattan", clamp_delta=delta).seg_terms[name]
    assert loss(logits, y).item() == pytest.approx(float(np.mean(diffs)), abs=1e-5)


# --------------------------------------------------------------------------------------- all losses


def _cases():
    """(name, K) for every loss and every head it supports."""
    return [(n, k) for n in LOSSES for k in (1, 3) if ("binary" if k == 1 else "multiclass") in LOSS_HEADS[n]]


@pytest.mark.parametrize("name,k", _cases())
def test_gradients_are_finite_and_nonzero(name, k):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, k, 12, 12, generator=g, requires_grad=True)
    y = labels_with_every_class(11, 2, k, 12, 12)
    loss = build_loss(name, seg_classes=k).seg_terms[name]
    value = loss(x, y)
    value.backward()
    assert value.dtype == torch.float32 and value.dim() == 0 and torch.isfinite(value)
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name,k", _cases())
@pytest.mark.parametrize("fill", [0, 1])
def test_empty_and_full_targets_give_finite_values(name, k, fill):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, k, 8, 8, generator=g, requires_grad=True)
    y = torch.full((2, 8, 8), fill, dtype=torch.long)  # all background, or all class 1
    value = build_loss(name, seg_classes=k).seg_terms[name](x, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["SoftDICE", "IoU", "GDL"])
def test_region_losses_on_empty_target(name):
    y = torch.zeros(1, 2, 2, dtype=torch.long)
    loss = LOSSES[name]()
    # nothing to find, ~nothing predicted (4 σ(-20)): 1 - s/(4σ(-20) + s) ≈ 8e-4, not 0/0 = NaN;
    # one false pixel: 1 - s/(1 + s) ≈ 1
    leak = 4 / (1 + math.exp(BIG))
    assert loss(binary_logits(y), y).item() == pytest.approx(1 - SMOOTH / (leak + SMOOTH), abs=1e-6)
    assert loss(binary_logits(t([[1, 0], [0, 0]])), y).item() == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("name,k", _cases())
def test_autocast_bf16_computes_in_fp32(name, k):
    g = torch.Generator().manual_seed(13)
    net = nn.Conv2d(2, k, 3, padding=1)
    image = torch.randn(2, 2, 12, 12, generator=g)
    y = labels_with_every_class(13, 2, k, 12, 12)
    loss = build_loss(name, seg_classes=k).seg_terms[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(image)
        assert logits.dtype == torch.bfloat16
        value = loss(logits, y)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    # the same bf16 logits, cast by hand, outside autocast: identical, so nothing ran in bf16
    assert value.item() == pytest.approx(loss(logits.detach().float(), y).item(), rel=1e-6, abs=1e-7)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# --------------------------------------------------------------------------------------- combined


def _batch(k: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, k, 10, 10, generator=g, requires_grad=True), labels_with_every_class(seed, 2, k, 10, 10)


def test_static_weights():
    x, y = _batch()
    combined = build_loss("SoftDICE_BCE_Boundary", seg_classes=1, static_weights=[1.0, 0.5, 2.0])
    out = combined(x, y)
    parts = {n: LOSSES[n](**({"normalization": "static_max"} if n == "Boundary" else {}))(x, y) for n in out.terms}
    assert list(out.terms) == ["SoftDICE", "BCE", "Boundary"]
    assert out.weights == {"SoftDICE": 1.0, "BCE": 0.5, "Boundary": 2.0}
    expected = parts["SoftDICE"] + 0.5 * parts["BCE"] + 2 * parts["Boundary"]
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(not v.requires_grad for v in out.terms.values())
    assert list(combined.parameters()) == []


def test_schedule_weights_follow_kervadec_alpha():
    x, y = _batch()
    combined = build_loss("SoftDICE_BCE_Boundary", seg_classes=1, weighting="schedule")
    for epoch, alpha in [(0, 0.01), (10, 0.11), (89, 0.9), (500, 0.9)]:
        combined.set_epoch(epoch)
        out = combined(x, y)
        assert out.weights["Boundary"] == pytest.approx(alpha)
        assert out.weights["SoftDICE"] == out.weights["BCE"] == pytest.approx(1 - alpha)
        expected = (1 - alpha) * (out.terms["SoftDICE"] + out.terms["BCE"]) + alpha * out.terms["Boundary"]
        assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="epoch=-1"):
        combined.set_epoch(-1)


def test_adaptive_weights_start_at_one_and_shift_boundary():
    x, y = _batch()
    combined = build_loss("SoftDICE_Boundary", seg_classes=1, weighting="adaptive", sdm_normalization=None)
    assert list(combined.parameters()) == [combined.log_vars]
    out = combined(x, y)
    assert out.weights == {"SoftDICE": 1.0, "Boundary": 1.0}
    raw = BoundaryLoss(normalization=None)(x, y)
    # the shift is minus the perfect prediction's value, mean min(φ, 0)
    shift = -np.mean([np.minimum(ref_sdm(m.numpy() == 1), 0) for m in y])
    assert shift > 0 and out.terms["Boundary"].item() >= 0
    assert out.terms["Boundary"].item() == pytest.approx(raw.item() + shift, abs=1e-6)
    assert out.total.item() == pytest.approx(sum(out.terms.values()).item(), rel=1e-6)  # s_i = 0
    out.total.backward()
    # ∂/∂s_i [exp(-s_i) L_i + s_i] = 1 - L_i at s_i = 0
    expected = 1 - torch.stack([out.terms["SoftDICE"], out.terms["Boundary"]])
    assert torch.allclose(combined.log_vars.grad, expected, atol=1e-6)
    with pytest.raises(ValueError, match="can be negative"):
        CombinedLoss({"Boundary": BoundaryLoss()}, weighting="adaptive")


@pytest.mark.parametrize("cls_classes", [1, 2])
def test_classifier_term(cls_classes):
    x, y = _batch()
    g = torch.Generator().manual_seed(3)
    cls_logits = torch.randn(2, cls_classes, generator=g)
    label = torch.tensor([0, 1])
    combined = build_loss("SoftDICE", seg_classes=1, cls_classes=cls_classes, static_weights=[1.0], cls_weight=0.5)
    out = combined(x, y, cls_logits, label)
    expected = (F.binary_cross_entropy_with_logits(cls_logits[:, 0], label.float()) if cls_classes == 1
                else F.cross_entropy(cls_logits, label))
    assert out.terms["CLS"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.total.item() == pytest.approx((out.terms["SoftDICE"] + 0.5 * out.terms["CLS"]).item(), rel=1e-6)
    only_cls = combined(None, None, cls_logits, label)
    assert list(only_cls.terms) == ["CLS"]
    assert list(combined(x, y).terms) == ["SoftDICE"]
    with pytest.raises(ValueError, match=r"CLS_CLASSES"):
        combined(x, y, torch.randn(2, 3), label)
    with pytest.raises(ValueError, match=r"class indices 0\.\.1"):
        ClassificationLoss(cls_classes)(cls_logits, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="built without a classifier term"):
        build_loss("SoftDICE", seg_classes=1)(x, y, cls_logits, label)


def test_adaptive_classifier_only_step_still_touches_every_log_variance():
    combined = build_loss("SoftDICE_Boundary", seg_classes=1, cls_classes=1, weighting="adaptive")
    out = combined(None, None, torch.randn(4, 1), torch.tensor([0, 1, 1, 0]))
    out.total.backward()
    grad = combined.log_vars.grad
    assert grad is not None and grad[0] == 0 and grad[1] == 0 and grad[2] != 0
    assert out.weights.keys() == {"SoftDICE", "Boundary", "CLS"}


def test_learnable_weights_move_and_stay_finite_for_200_steps(one_thread):
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centres = torch.tensor([[5.0, 6.0], [9.0, 10.0], [8.0, 4.0], [11.0, 11.0]])
    target = torch.stack([((yy - cy) ** 2 + (xx - cx) ** 2 <= 12).long() for cy, cx in centres])
    image = (target.float() + 0.3 * torch.randn(4, 16, 16)).unsqueeze(1)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))
    combined = build_loss("SoftDICE_BCE_Boundary", seg_classes=1, weighting="adaptive")
    optimizer = torch.optim.Adam([
        {"params": net.parameters()},
        {"params": list(combined.parameters()), "weight_decay": 0.0},
    ], lr=0.01)
    start = combined.log_vars.detach().clone()
    for _ in range(200):
        out = combined(net(image), target)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        assert torch.isfinite(out.total)
        assert all(math.isfinite(w) for w in out.weights.values())
        assert out.terms["Boundary"] >= 0
    moved = (combined.log_vars.detach() - start).abs()
    assert torch.isfinite(combined.log_vars).all()
    assert (moved > 0.1).all(), moved
    assert out.terms["SoftDICE"] < 0.3  # and the network learnt the disks
