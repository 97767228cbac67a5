"""NORM and ACTIVATION: the conv block against MONAI's, per-sample normalisation, GroupNorm's groups,
parameter counts, and whole-image (gated) prediction of InstanceNorm and GroupNorm networks against
MONAI's sliding windows."""

import numpy as np
import pytest
import torch
from torch import nn

from engines.sliding_window import ArrayImage, Predictor
from model.AuxNet import AuxNet, ConvBlock, InstanceNorm, fold_batchnorm
from model.layer_choices import ACTIVATIONS, NORMS

CPU = torch.device("cpu")


def _randomise_affine(module: nn.Module, seed: int) -> None:
    """Give every norm layer's scale and shift non-trivial values (they start at 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.InstanceNorm2d, nn.GroupNorm, nn.BatchNorm2d)) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)


@pytest.mark.parametrize("norm, monai_norm", [
    ("instance", ("instance", {"affine": True})),
    ("group", ("group", {"num_groups": 4})),  # 12 channels: gcd(8, 12) = 4 groups
    ("batch", "batch"),
])
def test_conv_block_equals_monai_two_conv(norm, monai_norm):
    from monai.networks.nets.basic_unet import TwoConv

    torch.manual_seed(0)
    ours = ConvBlock(3, 12, 0.0, norm=norm, activation="leaky_relu")
    ref = TwoConv(2, 3, 12, act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}), norm=monai_norm,
                  bias=False, dropout=0.0)
    _randomise_affine(ours, seed=1)
    with torch.no_grad():
        for conv, norm_layer, theirs in ((ours[0], ours[1], ref.conv_0), (ours[3], ours[4], ref.conv_1)):
            theirs.conv.weight.copy_(conv.weight)
            theirs.adn.N.weight.copy_(norm_layer.weight)
            theirs.adn.N.bias.copy_(norm_layer.bias)
    x = torch.randn(3, 3, 24, 20) * 2 + 1
    for mode in (True, False):  # training and eval mode (BatchNorm: batch statistics, then running ones)
        ours.train(mode), ref.train(mode)
        torch.testing.assert_close(ours(x.clone()), ref(x.clone()), rtol=1e-6, atol=1e-6)


def test_relu_and_leaky_relu_are_what_they_say():
    block = ConvBlock(1, 4, 0.0, norm="instance", activation="leaky_relu")
    assert isinstance(block[2], nn.LeakyReLU) and block[2].negative_slope == 0.1 and block[2].inplace
    assert isinstance(ConvBlock(1, 4, 0.0)[2], nn.ReLU) and isinstance(ConvBlock(1, 4, 0.0)[1], nn.BatchNorm2d)
    instance = ConvBlock(1, 4, 0.0, norm="instance")[1]
    assert isinstance(instance, nn.InstanceNorm2d) and instance.affine and not instance.track_running_stats


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_cpu_instance_norm_equals_torchs(channels_last):
    """InstanceNorm's CPU path (GroupNorm of one group per channel) gives nn.InstanceNorm2d's outputs
    and gradients to fp32 rounding, and in bf16 without gradients its outputs to bf16 rounding, in
    the input's memory format."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 6, 10, 12, generator=gen) * 3 + 1)
    ours, ref = InstanceNorm(6, affine=True), nn.InstanceNorm2d(6, affine=True)
    _randomise_affine(ours, 6)
    ref.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [x.clone().contiguous(memory_format=fmt).requires_grad_(True) for _ in range(2)]
    y_ours, y_ref = ours(xs[0]), ref(xs[1])
    assert (y_ours - y_ref).abs().max() <= 1e-5
    upstream = torch.randn(y_ref.shape, generator=gen)
    (y_ours * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    assert (xs[0].grad - xs[1].grad).abs().max() <= 1e-4
    assert (ours.weight.grad - ref.weight.grad).abs().max() <= 1e-3
    for grad in (True, False):  # bf16: nn.InstanceNorm2d when training, GroupNorm without gradients
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            y_bf16 = ours(x.to(torch.bfloat16).contiguous(memory_format=fmt))
        assert y_bf16.dtype == torch.bfloat16 and (y_bf16.float() - y_ref.detach()).abs().max() <= 0.05
        assert y_bf16.is_contiguous(memory_format=fmt) or grad


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_a_samples_output_does_not_depend_on_the_other_samples(norm):
    torch.manual_seed(0)
    net = AuxNet(1, 3, 1, depth=3, base_width=8, norm=norm)
    _randomise_affine(net, seed=2)
    x = torch.randn(4, 1, 32, 32)
    others = torch.randn(4, 1, 32, 32) * 5 + 3
    for mode in (True, False):
        net.train(mode)
        with torch.no_grad():
            alone, together = net(x[:1]), net(torch.cat([x[:1], others]))
        torch.testing.assert_close(together.seg[:1], alone.seg, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.cls[:1], alone.cls, rtol=1e-5, atol=1e-5)
    # BatchNorm in training mode does depend on them (the contrast that makes the test mean something)
    bn = AuxNet(1, 3, 1, depth=3, base_width=8).train()
    with torch.no_grad():
        assert (bn(torch.cat([x[:1], others])).seg[:1] - bn(x[:1]).seg).abs().max() > 1e-2


@pytest.mark.parametrize("width, groups", [(8, 8), (12, 4), (16, 8), (4, 4), (6, 2)])
def test_group_norm_has_gcd_8_width_groups(width, groups):
    norm = ConvBlock(1, width, 0.0, norm="group")[1]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == groups and norm.num_channels == width


def test_every_norm_has_the_same_parameters_and_only_batch_norm_keeps_statistics():
    counts = {norm: sum(p.numel() for p in AuxNet(1, 3, 1, depth=4, base_width=16, norm=norm).parameters())
              for norm in NORMS}
    assert counts["batch"] == counts["instance"] == counts["group"]
    buffers = {norm: [n for n, _ in AuxNet(1, 3, 1, depth=3, base_width=4, norm=norm).named_buffers()]
               for norm in NORMS}
    assert buffers["batch"] and buffers["instance"] == buffers["group"] == []


def test_an_unknown_norm_or_activation_is_refused_by_name():
    with pytest.raises(ValueError, match=r"norm='layer' is not one of \['batch', 'instance', 'group'\]"):
        AuxNet(norm="layer")
    with pytest.raises(ValueError, match=r"activation='leaky' is not one of \['relu', 'leaky_relu'\] "
                                         r"\(did you mean 'leaky_relu'\?\)"):
        AuxNet(activation="leaky")
    assert ACTIVATIONS == ("relu", "leaky_relu")


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_folding_leaves_instance_and_group_norm_and_the_outputs(norm):
    torch.manual_seed(0)
    net = AuxNet(1, 2, 1, depth=3, base_width=8, norm=norm, activation="leaky_relu").train()
    _randomise_affine(net, seed=3)
    folded = fold_batchnorm(net)
    kinds = {nn.InstanceNorm2d: "instance", nn.GroupNorm: "group"}
    assert sum(isinstance(m, next(k for k, v in kinds.items() if v == norm)) for m in folded.modules()) == 2 * 5
    assert net.training and not folded.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).seg, net.eval()(x).seg, rtol=0, atol=0)


# ------------------------------------------------------------------ whole images, gated and not


def _net(norm, classes, seed=0):
    torch.manual_seed(seed)
    net = AuxNet(1, classes, 1, depth=3, base_width=8, norm=norm, activation="leaky_relu").eval()
    _randomise_affine(net, seed=seed + 10)
    return net


def _image(shape=(144, 176)):
    """Noise with a bright rectangle, and a uniform band (whole windows of one value: InstanceNorm
    divides by a variance of 0 + eps there). The sides are 32 + a multiple of 16, where our windows
    (evenly spaced) and MONAI's (at multiples of the step) are the same."""
    rng = np.random.default_rng(5)
    image = rng.random((*shape, 1)).astype(np.float32) * 0.2
    image[30:90, 40:120] += 0.7
    image[-48:] = 0.5
    return image


def _monai(net, image, tile, overlap, classes):
    from monai.inferers import sliding_window_inference

    def activation(x):
        seg = net(x).seg
        return torch.sigmoid(seg) if classes == 1 else torch.softmax(seg, 1)

    with torch.no_grad():
        return sliding_window_inference(torch.from_numpy(image.transpose(2, 0, 1))[None], (tile, tile), 4,
                                        activation, overlap=overlap / tile, mode="gaussian", sigma_scale=0.125)[0].numpy()


@pytest.mark.parametrize("norm, classes", [("instance", 1), ("group", 3), ("instance", 3)])
def test_whole_image_prediction_equals_monai_sliding_windows_and_gating_decodes_what_it_must(norm, classes):
    """Each window is normalised by its own statistics, in our predictor as in MONAI's: the ungated
    prediction is MONAI's; gated with a head that calls every window a boundary it is the same (the
    decoded windows do not depend on which others share their batch); gated with a head that calls
    none a boundary, every pixel is the fill head's class."""
    net = _net(norm, classes)
    image = _image()
    options = dict(tile=32, overlap=16, batch_size=4, device=CPU)
    probs, stats = Predictor(net, **options).predict_array(ArrayImage(image))
    ref = _monai(net, image, 32, 16, classes)
    assert np.isfinite(probs).all() and np.abs(probs - ref).max() <= 1e-5
    assert stats.decoded == stats.tiles

    with torch.no_grad():
        net.head[-1].weight.zero_()
        net.head[-1].bias.fill_(20.0)  # boundary everywhere
    gated, stats = Predictor(net, gating=True, **options).predict_array(ArrayImage(image))
    assert stats.decoded == stats.tiles and np.abs(gated - ref).max() <= 1e-5

    k = max(classes, 2)
    with torch.no_grad():
        net.head[-1].bias.fill_(-20.0)  # no boundary anywhere: fill with class k - 1
        net.fill_head[-1].weight.zero_()
        net.fill_head[-1].bias.copy_(torch.arange(k, dtype=torch.float32) * 10)
    predictor = Predictor(net, gating=True, **options)
    filled, stats = predictor.predict_array(ArrayImage(image))
    assert stats.decoded == 0 and (predictor.labels(filled) == k - 1).all()


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_bf16_whole_image_prediction_of_instance_and_group_norm_is_close_to_fp32(norm):
    net = _net(norm, 3, seed=1)
    image = _image((96, 96))
    options = dict(tile=32, overlap=16, batch_size=4, device=CPU)
    fp32, _ = Predictor(net, **options).predict_array(ArrayImage(image))
    bf16, _ = Predictor(net, amp_dtype=torch.bfloat16, **options).predict_array(ArrayImage(image))
    assert np.isfinite(bf16).all() and np.abs(bf16 - fp32).max() < 0.05
