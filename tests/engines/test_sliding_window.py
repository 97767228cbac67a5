"""Whole-image prediction (engines/predictor.py and utils/tiling.py): sliding windows against MONAI,
odd sizes, gating with the fill head, whole-image evaluation and test-time augmentation. The
``predict`` command: test_predict.py."""

import numpy as np
import pytest
import torch

from engines.sliding_window import ArrayImage, Predictor, cover_indices
from model.AuxNet import AuxNet
from model.losses import build_loss
from utils.tiling import NO_FILL, fill_label, gaussian_importance_map, window_starts

CPU = torch.device("cpu")


def tiny_net(seed=0, seg_classes=1):
    torch.manual_seed(seed)
    net = AuxNet(1, seg_classes, 1, depth=3, base_width=4, norm="batch").eval()  # BatchNorm: folded for prediction
    for m in net.modules():  # give BatchNorm non-trivial statistics so outputs vary over the image
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net


def test_window_starts_are_even_and_never_step_further_than_asked():
    assert window_starts(320, 64, 32) == list(range(0, 257, 32))
    starts = window_starts(300, 64, 48)
    assert starts[0] == 0 and starts[-1] == 300 - 64
    steps = np.diff(starts)
    assert steps.max() <= 48 and steps.max() - steps.min() <= 1
    assert window_starts(50, 64, 32) == [0] and window_starts(64, 64, 64) == [0]


def test_importance_map_is_monais():
    from monai.data.utils import compute_importance_map

    ref = compute_importance_map((64, 64), mode="gaussian", sigma_scale=0.125).numpy()
    np.testing.assert_allclose(gaussian_importance_map(64), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, overlap, classes", [((320, 224), 32, 1), ((256, 208), 16, 3), ((64, 128), 32, 1)])
def test_ungated_prediction_equals_monai_sliding_window(shape, overlap, classes):
    from monai.inferers import sliding_window_inference

    net = tiny_net(seed=1, seg_classes=classes)
    image = np.random.default_rng(0).random((*shape, 1)).astype(np.float32)
    predictor = Predictor(net, tile=64, overlap=overlap, batch_size=5, device=CPU)
    probs, stats = predictor.predict_array(ArrayImage(image))

    def activation(x):
        seg = net(x).seg
        return torch.sigmoid(seg) if classes == 1 else torch.softmax(seg, 1)

    with torch.no_grad():
        ref = sliding_window_inference(torch.from_numpy(image.transpose(2, 0, 1))[None], (64, 64), 5, activation,
                                       overlap=overlap / 64, mode="gaussian", sigma_scale=0.125)[0].numpy()
    assert probs.shape == ref.shape == (classes, *shape)
    assert np.abs(probs - ref).max() <= 1e-5
    assert stats.tiles == stats.decoded == len(window_starts(shape[0], 64, 64 - overlap)) * len(
        window_starts(shape[1], 64, 64 - overlap))


@pytest.mark.parametrize("shape", [(40, 50), (30, 200), (97, 131)])
def test_images_smaller_than_a_tile_or_not_a_multiple_are_predicted_whole(shape):
    net = tiny_net(seed=2)
    image = np.random.default_rng(1).random((*shape, 1)).astype(np.float32)
    probs, _ = Predictor(net, tile=64, overlap=16, batch_size=4, device=CPU).predict_array(ArrayImage(image))
    assert probs.shape == (1, *shape) and np.isfinite(probs).all() and 0 <= probs.min() <= probs.max() <= 1
    if shape[0] < 64 and shape[1] < 64:  # one window on the reflect-padded image, cropped
        padded = np.pad(image, ((0, 64 - shape[0]), (0, 64 - shape[1]), (0, 0)), mode="reflect")
        with torch.no_grad():
            ref = torch.sigmoid(net(torch.from_numpy(padded.transpose(2, 0, 1))[None]).seg)[0, :, :shape[0], :shape[1]]
        np.testing.assert_allclose(probs, ref.numpy(), atol=1e-6)


def test_a_constant_prediction_stays_constant_across_window_borders():
    net = tiny_net(seed=3)
    with torch.no_grad():
        net.outc.weight.zero_()
        net.outc.bias.fill_(0.7)
    image = np.random.default_rng(2).random((300, 260, 1)).astype(np.float32)
    probs, _ = Predictor(net, tile=64, overlap=24, batch_size=8, device=CPU).predict_array(ArrayImage(image))
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-0.7)), rtol=0, atol=1e-6)


def _constant_tiles(rng, n, classes, size=32):
    """Images whose class decides their gray level, as (image, label map) tiles without a boundary."""
    labels = rng.integers(0, classes, n)
    images = np.stack([np.full((1, size, size), 0.2 + 0.6 * c / max(classes - 1, 1), np.float32) for c in labels])
    images += rng.normal(0, 0.02, images.shape).astype(np.float32)
    masks = np.stack([np.full((size, size), c) for c in labels])
    return torch.from_numpy(images), torch.from_numpy(masks)


def _gated_labels_of_two_uniform_regions(classes: int, norm: str) -> tuple[np.ndarray, int]:
    """Train a tiny network on single-class tiles, then predict, gated, an image of two uniform
    regions (gray 0.2 = class 0, 0.8 = class k-1) each many tiles wide: (labels, k)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    net = AuxNet(1, classes, 1, depth=3, base_width=4, norm=norm)
    loss = build_loss("SoftDICE", seg_classes=classes, cls_classes=1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(60):
        images, masks = _constant_tiles(rng, 8, max(classes, 2))
        fill = torch.tensor([fill_label(m.numpy()) for m in masks])
        out = net(images)
        total = loss(out.seg, masks, out.cls, torch.zeros(8, dtype=torch.long), out.fill, fill).total
        opt.zero_grad()
        total.backward()
        opt.step()
    net.eval()
    # a whole image of two regions, one per class, each many tiles wide: every window is single-class
    k = max(classes, 2)
    image = np.concatenate([np.full((64, 128, 1), 0.2, np.float32), np.full((64, 128, 1), 0.2 + 0.6 / (k - 1) * (k - 1),
                                                                          np.float32)], axis=1)
    predictor = Predictor(net, tile=32, overlap=0, batch_size=8, device=CPU, gating=True)
    probs, stats = predictor.predict_array(ArrayImage(image))
    assert stats.decoded == 0 and stats.gated_off == stats.tiles == 16
    return predictor.labels(probs), k


@pytest.mark.parametrize("classes", [1, 3])
def test_the_fill_class_is_learned_and_gated_tiles_are_filled_with_it(classes):
    labels, k = _gated_labels_of_two_uniform_regions(classes, "batch")
    assert (labels[:, :128] == 0).all() and (labels[:, 128:] == k - 1).all()


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_per_window_statistics_lose_the_gray_level_of_a_uniform_window(norm):
    """Why NORM=batch stays the default: under InstanceNorm or GroupNorm a window of one gray level
    normalises to the same features whatever the level (every channel is constant up to the zero
    padding, and its mean is subtracted), so the same training as above cannot tell the two regions
    apart: both get one class, where BatchNorm's running statistics name each correctly."""
    labels, _ = _gated_labels_of_two_uniform_regions(1, norm)
    assert len(np.unique(labels)) == 1


def test_batchnorm_is_folded_where_its_shift_keeps_fp32():
    """Folding is exact in fp32. Under bf16 on a CPU where oneDNN computes bf16 the folded bias stays
    fp32 in the fused convolution (model.fused), so BatchNorm is folded there too; under fp16 (and
    bf16 elsewhere) the bias would be rounded to the low precision (probabilities moved by ~0.02
    on the default network), so the predictor keeps BatchNorm, in its own eval copy (the caller's
    network keeps its mode)."""
    from model.fused import _onednn_bf16

    net = tiny_net(seed=4).train()
    options = dict(tile=32, overlap=16, batch_size=4, device=CPU)
    has_bn = [any(isinstance(m, torch.nn.BatchNorm2d) for m in Predictor(net, amp_dtype=dtype, **options).net.modules())
              for dtype in (None, torch.bfloat16, torch.float16)]
    assert has_bn == [False, not _onednn_bf16(), True]
    for dtype in (torch.bfloat16, torch.float16):
        low = Predictor(net, amp_dtype=dtype, **options)
        assert low.net is not net and not low.net.training and net.training


@pytest.mark.parametrize("gating, classes", [(False, 1), (True, 1), (True, 3)])
def test_the_folded_network_predicts_what_the_network_predicts(monkeypatch, gating, classes):
    """The predictor runs a copy of the network with BatchNorm folded into the convolutions (and on
    the CPU fused with the activations, model.fused), under inference mode: the same probabilities (to fp32 rounding), labels and gating decisions as the
    network itself, which keeps its mode and weights."""
    import copy

    import engines.sliding_window as sliding_window

    net = tiny_net(seed=4, seg_classes=classes).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(5)
    image = rng.random((150, 170, 1)).astype(np.float32) * 0.2
    image[30:90, 40:120] += 0.7
    with torch.no_grad():  # a threshold that gates off about half the windows, whatever the random head says
        windows = torch.from_numpy(image.transpose(2, 0, 1)[None, :, :128, :160]).unfold(2, 32, 32).unfold(3, 32, 32)
        cls = copy.deepcopy(net).eval()(windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, 32, 32), decode=False).cls
    options = dict(tile=32, overlap=16, batch_size=4, device=CPU, gating=gating,
                   gate_threshold=torch.sigmoid(cls).median().item())
    folded = Predictor(net, **options)
    modes = []
    folded.net.inc.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    probs, stats = folded.predict_array(ArrayImage(image))
    assert net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.net.modules())
    assert modes and all(modes)

    monkeypatch.setattr(sliding_window, "inference_copy", lambda n, amp_dtype: copy.deepcopy(n).eval())
    plain = Predictor(net, **options)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.net.modules())
    ref, ref_stats = plain.predict_array(ArrayImage(image))
    assert np.abs(probs - ref).max() <= 1e-5
    np.testing.assert_array_equal(folded.labels(probs), plain.labels(ref))
    assert stats.as_dict() | {"seconds": 0, "tiles_per_s": 0} == ref_stats.as_dict() | {"seconds": 0, "tiles_per_s": 0}
    assert 0 < stats.decoded < stats.tiles if gating else stats.decoded == stats.tiles


def test_fill_label_and_the_ignored_tiles():
    assert fill_label(np.full((4, 4), 2)) == 2
    mixed = np.zeros((4, 4), int)
    mixed[0, 0] = 1
    assert fill_label(mixed) == NO_FILL
    loss = build_loss("SoftDICE", seg_classes=1, cls_classes=1)
    seg, cls, fill_logits = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1), torch.tensor([[4.0, -4.0], [0.0, 0.0]])
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    only_first = loss(seg, target, cls, torch.zeros(2, dtype=torch.long), fill_logits, torch.tensor([0, NO_FILL]))
    boundary_only = loss(seg, target, cls, torch.zeros(2, dtype=torch.long))
    expected = torch.nn.functional.cross_entropy(fill_logits[:1], torch.tensor([0]))
    assert float(only_first.terms["CLS"] - boundary_only.terms["CLS"]) == pytest.approx(float(expected), rel=1e-5)


def test_gating_a_network_without_heads_is_refused():
    net = AuxNet(1, 1, 0, depth=3, base_width=4)
    with pytest.raises(ValueError, match="GATING=false"):
        Predictor(net, tile=32, overlap=0, batch_size=2, device=CPU, gating=True)


def test_decoded_windows_outweigh_filled_ones_where_they_overlap():
    from engines.sliding_window import FILL_BLEND_WEIGHT

    net = tiny_net(seed=6)
    image = np.random.default_rng(7).random((32, 64, 1)).astype(np.float32)
    predictor = Predictor(net, tile=32, overlap=16, batch_size=8, device=CPU, gating=True, gate_reach=0)
    # windows at x = 0, 16, 32; the heads see the cells x = 0 and 32 (not decoded again: reach 0)
    # cell 0 boundary, decoded from its features (0.9); cell 32 filled with class 0; others decoded (0.5)
    predictor._encode_heads = lambda windows: (([], windows), torch.tensor([True, False]), torch.tensor([0, 0]))
    predictor._decode_features = lambda features, keep, windows: torch.full((len(keep), 1, 32, 32), 0.9)
    predictor._decode_windows = lambda windows: torch.full((len(windows), 1, 32, 32), 0.5)
    probs, stats = predictor.predict_array(ArrayImage(image))
    assert (stats.tiles, stats.classified, stats.decoded) == (3, 2, 2)  # x = 16 overlaps the boundary cell
    w = gaussian_importance_map(32)
    left, right = w[:, 16:], w[:, :16]  # weights of a window's right and left halves
    np.testing.assert_allclose(probs[0, :, 16:32], (0.9 * left + 0.5 * right) / (left + right), rtol=1e-5)
    # columns 32..47: window 16 (decoded, 0.5) and cell 32 (filled, 0) overlap: the decoder decides
    expected = 0.5 * left / (left + FILL_BLEND_WEIGHT * right)
    np.testing.assert_allclose(probs[0, :, 32:48], expected, rtol=1e-5)
    assert probs[0, :, 32:41].min() > 0.49 and np.allclose(probs[0, :, 48:], 0.0)


def test_cover_indices_keeps_the_fewest_windows_that_still_cover():
    assert cover_indices([0], 32) == [0]
    assert cover_indices([0, 10], 32) == [0, 1]
    assert cover_indices([0, 16, 32, 48, 64], 32) == [0, 2, 4]  # every other window at 50 % overlap
    assert cover_indices([0, 16, 32, 48], 32) == [0, 2, 3]  # and always the last
    assert cover_indices([0, 8, 16, 24, 32, 40], 32) == [0, 4, 5]  # 75 % overlap: every fourth


def test_gating_decodes_the_windows_that_overlap_a_boundary_cell_and_the_cells_next_to_it():
    net = tiny_net(seed=6)
    image = np.zeros((160, 160, 1), np.float32)
    image[40:44, 40:44] = 1.0  # a mark only the cell at (32, 32) contains
    predictor = Predictor(net, tile=32, overlap=16, batch_size=4, device=CPU, gating=True)
    decoded_at = []

    def heads(windows):  # (features, boundary, fill class): boundary where the mark is
        return ([], windows), windows.flatten(1).amax(1) > 0, torch.zeros(len(windows), dtype=torch.long)

    def decode(windows):
        decoded_at.extend(windows.flatten(1).sum(1).tolist())
        return torch.ones((len(windows), 1, 32, 32))

    predictor._encode_heads, predictor._decode_windows = heads, decode
    predictor._decode_features = lambda features, keep, windows: torch.ones((len(keep), 1, 32, 32))
    probs, stats = predictor.predict_array(ArrayImage(image))
    # a 9 x 9 grid (starts 0, 16, ..., 128); the heads see the 5 x 5 cells at 0, 32, ..., 128. Decoded:
    # the boundary cell from its own features; the 8 other windows that start at 16, 32 or 48 on
    # both axes (they overlap it); the 8 cells next to it (encoded a second time)
    assert (stats.tiles, stats.classified, stats.decoded, stats.encoded) == (81, 25, 17, 25 + 16)
    assert len(decoded_at) == 16
    labels = predictor.labels(probs)
    assert labels[:96, :96].all() and not labels[96:].any() and not labels[:, 96:].any()


def test_whole_image_evaluation_scores_the_whole_images_against_numpy_and_monai():
    """Pixel accuracy, Dice and IoU from NumPy, HD95 from MONAI, on the whole predicted images (not
    capped by the tile: an object missed far away counts at its real distance)."""
    import warnings

    from monai.metrics import compute_hausdorff_distance

    from engines.evaluate import evaluate_whole_images
    from model.metrics import SegmentationMetrics
    from utils.image_io import ImageEntry, ImageSet
    from utils.util import DistContext

    net = tiny_net(seed=8)
    rng = np.random.default_rng(9)
    arrays, entries = [], []
    for k, (h, w) in enumerate([(96, 120), (70, 64)]):
        image = (rng.random((h, w, 1)) * 255).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[10:40, 15:60] = 1
        mask[h - 8:, w - 6:] = 1  # a far corner: a whole-image distance, beyond a 32-px tile
        arrays.append((image, mask))
        entries.append(ImageEntry(f"img{k}", h, w, 1, 0.0, 255.0))
    predictor = Predictor(net, tile=32, overlap=16, batch_size=4, device=CPU)
    summary, rows = evaluate_whole_images(predictor, ImageSet(entries, arrays), ["img0", "img1"],
                                          SegmentationMetrics(1), DistContext(), 0.5)
    preds = [predictor.labels(predictor.predict_array(ArrayImage(a[0], 0.0, 255.0))[0]) for a in arrays]
    masks = [a[1] for a in arrays]
    correct = sum(int((p == m).sum()) for p, m in zip(preds, masks))
    assert summary["ACC"] == pytest.approx(correct / sum(m.size for m in masks), rel=1e-12)
    tp = sum(int(((p == 1) & (m == 1)).sum()) for p, m in zip(preds, masks))
    fp = sum(int(((p == 1) & (m == 0)).sum()) for p, m in zip(preds, masks))
    fn = sum(int(((p == 0) & (m == 1)).sum()) for p, m in zip(preds, masks))
    assert summary["DSC"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-9)
    assert summary["IoU"] == pytest.approx(tp / (tp + fp + fn), rel=1e-9)
    for row, p, m in zip(rows, preds, masks):
        assert row["ACC"] == pytest.approx(float((p == m).mean()), rel=1e-12)
        assert row["tiles"] == len(window_starts(max(m.shape[0], 32), 32, 16)) * len(window_starts(max(m.shape[1], 32), 32, 16))
        if p.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = compute_hausdorff_distance(torch.from_numpy(p)[None, None].float(),
                                                 torch.from_numpy(m)[None, None].float(), percentile=95)
            assert row["HD95/1"] == pytest.approx(float(ref), abs=1e-3)


# ---- test-time augmentation: the average over the square's symmetries, each mapped back

_SYMMETRIES = {  # image -> transformed image, and the inverse on (K, H, W) probabilities, in NumPy
    "flips": [(lambda a: a, lambda p: p), (lambda a: a[:, ::-1], lambda p: p[:, :, ::-1]),
              (lambda a: a[::-1], lambda p: p[:, ::-1]), (lambda a: a[::-1, ::-1], lambda p: p[:, ::-1, ::-1])],
}
_SYMMETRIES["d4"] = _SYMMETRIES["flips"] + [
    (lambda a, k=k: np.rot90(a, k), lambda p, k=k: np.rot90(p, -k, axes=(1, 2))) for k in (1, 3)] + [
    (lambda a: a.transpose(1, 0, 2), lambda p: p.transpose(0, 2, 1)),
    (lambda a: np.rot90(a.transpose(1, 0, 2), 2), lambda p: np.rot90(p, -2, axes=(1, 2)).transpose(0, 2, 1))]


@pytest.mark.parametrize("tta, classes", [("flips", 1), ("d4", 3), ("flips", 3)])
def test_tta_is_the_mean_over_symmetric_images_of_the_plain_prediction(tta, classes):
    # On a square image whose window grid is symmetric (starts 0, 32, 64), each symmetry maps the
    # windows onto windows and the Gaussian map onto itself, so TTA equals predicting the whole
    # transformed image without TTA and mapping it back (the 8 elements of the dihedral group).
    net = tiny_net(seed=8, seg_classes=classes)
    image = np.random.default_rng(8).random((128, 128, 1)).astype(np.float32)
    plain = Predictor(net, tile=64, overlap=32, batch_size=4, device=CPU)
    refs = [inverse(plain.predict_array(ArrayImage(np.ascontiguousarray(forward(image))))[0])
            for forward, inverse in _SYMMETRIES[tta]]
    assert len(refs) == {"flips": 4, "d4": 8}[tta]
    probs, stats = Predictor(net, tile=64, overlap=32, batch_size=4, device=CPU, tta=tta).predict_array(
        ArrayImage(image))
    np.testing.assert_allclose(probs, np.mean(refs, axis=0), atol=2e-6)
    assert np.abs(probs - refs[0]).max() > 1e-3  # the network is not symmetric: TTA changes something
    assert stats.decoded == stats.tiles == 9


def test_tta_with_gating_augments_the_decoded_windows_and_leaves_the_fills():
    net = tiny_net(seed=9)
    image = np.random.default_rng(9).random((96, 96, 1)).astype(np.float32)
    with torch.no_grad():  # a head that calls every window boundary: gated equals plain, TTA included
        net.head[-1].weight.zero_()
        net.head[-1].bias.fill_(10.0)
    plain = Predictor(net, tile=32, overlap=16, batch_size=4, device=CPU, tta="flips").predict_array(ArrayImage(image))
    gated, stats = Predictor(net, tile=32, overlap=16, batch_size=4, device=CPU, gating=True,
                             tta="flips").predict_array(ArrayImage(image))
    assert stats.decoded == stats.tiles
    np.testing.assert_allclose(gated, plain[0], atol=1e-6)
    with torch.no_grad():  # a head that calls no window boundary: TTA has nothing to augment
        net.head[-1].bias.fill_(-10.0)
    filled = [Predictor(net, tile=32, overlap=16, batch_size=4, device=CPU, gating=True, tta=t).predict_array(
        ArrayImage(image)) for t in ("none", "d4")]
    assert filled[0][1].decoded == filled[1][1].decoded == 0
    np.testing.assert_array_equal(filled[0][0], filled[1][0])


def test_an_unknown_tta_is_refused_by_name():
    with pytest.raises(ValueError, match="tta='rot'.*none \\| flips \\| d4"):
        Predictor(tiny_net(), tile=32, overlap=0, batch_size=2, device=CPU, tta="rot")


def test_nan_weights_and_infinite_logits_are_reported_not_rounded():
    """A fused ReLU maps NaN to 0, and sigmoid / softmax round an infinite logit to 0 or 1: the
    predictor checks the weights before it runs, and turns infinite logits into NaN probabilities,
    which the band's finite check reports."""
    from engines.forward import NonFiniteOutput
    from engines.sliding_window import _probabilities

    net = tiny_net(seed=1)
    with torch.no_grad():
        net.downs[1][1][1].running_var[2] = float("nan")
    with pytest.raises(NonFiniteOutput, match=r"^the network's weight downs\.1\.1\.1\.running_var holds NaN or "
                                              r"infinite values$"):
        Predictor(net, tile=32, overlap=0, batch_size=2, device=CPU)
    logits = torch.tensor([[[[float("inf"), -float("inf"), 3.0]]]])
    probs = _probabilities(logits)
    assert probs[0, 0, 0, :2].isnan().all() and probs[0, 0, 0, 2] == torch.sigmoid(torch.tensor(3.0))
    two = _probabilities(torch.tensor([[[[float("inf"), 1.0]], [[0.0, 2.0]]]]))
    assert two[:, :, :, 0].isnan().all() and torch.equal(two[0, :, 0, 1], torch.softmax(torch.tensor([1.0, 2.0]), 0))
