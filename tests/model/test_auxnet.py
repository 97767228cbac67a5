"""AuxNet shapes, modes and freezing."""

import pytest
import torch

from model.AuxNet import AuxNet
from model.stages import STAGES


@pytest.mark.parametrize("depth, width, in_ch, seg, cls, size",
                         [(2, 4, 1, 1, 1, (32, 32)), (3, 8, 3, 3, 2, (48, 64)), (4, 4, 2, 2, 1, (64, 40)),
                          (5, 2, 1, 1, 2, (32, 48))])
def test_output_shapes(depth, width, in_ch, seg, cls, size):
    net = AuxNet(in_ch, seg, cls, depth, width)
    out = net(torch.randn(2, in_ch, *size))
    assert out.seg.shape == (2, seg, *size)
    assert out.cls.shape == (2, cls)


def test_width_doubles_per_level_and_head_sits_on_the_bottleneck():
    net = AuxNet(1, 1, 1, depth=4, base_width=8)
    assert net.inc[0].out_channels == 8
    assert [d[1][0].out_channels for d in net.downs] == [16, 32, 64]
    assert net.head[-1].in_features == 64


def test_unet_has_no_head_and_decode_can_be_skipped():
    unet = AuxNet(1, 2, 0, depth=3, base_width=4)
    out = unet(torch.randn(1, 1, 16, 16))
    assert unet.head is None and out.cls is None and out.seg.shape == (1, 2, 16, 16)
    aux = AuxNet(1, 1, 1, depth=3, base_width=4)
    out = aux(torch.randn(1, 1, 16, 16), decode=False)
    assert out.seg is None and out.cls.shape == (1, 1)


def test_indivisible_input_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by 2\\^\\(depth-1\\)=8"):
        AuxNet(1, 1, 1, depth=4, base_width=2)(torch.randn(1, 1, 36, 36))


@pytest.mark.parametrize("model", list(STAGES))
def test_set_trainable_freezes_the_other_parts(model):
    net = AuxNet(1, 1, 1, depth=3, base_width=4)
    parts = STAGES[model].trains
    net.set_trainable(parts)
    assert all(p.requires_grad == ("E" in parts) for p in net.inc.parameters())
    assert all(p.requires_grad == ("D" in parts) for p in net.outc.parameters())
    assert all(p.requires_grad == ("C" in parts) for p in net.head.parameters())
    net.train()
    assert net.inc.training == ("E" in parts) and net.head.training == ("C" in parts)


def test_frozen_encoder_keeps_batchnorm_statistics():
    net = AuxNet(1, 1, 1, depth=3, base_width=4)
    net.set_trainable("C")
    before = net.inc[1].running_mean.clone()
    net.train()
    net(torch.randn(4, 1, 16, 16) * 5 + 3)
    assert torch.equal(before, net.inc[1].running_mean)


def test_gradients_reach_every_trainable_parameter():
    net = AuxNet(2, 3, 2, depth=3, base_width=4, seg_dropout=0.1, cls_dropout=0.2)
    out = net(torch.randn(2, 2, 16, 16))
    (out.seg.square().mean() + out.cls.square().mean() + out.fill.square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_encode_classify_decode_equal_the_forward_pass():
    torch.manual_seed(0)
    net = AuxNet(1, 3, 1, depth=3, base_width=4).eval()
    x = torch.randn(3, 1, 32, 32)
    out = net(x)
    skips, bottleneck = net.encode(x)
    cls, fill = net.classify(bottleneck)
    assert torch.equal(net.decode(skips, bottleneck), out.seg)
    assert torch.equal(cls, out.cls) and torch.equal(fill, out.fill) and fill.shape == (3, 3)
    # decoding a subset of the tiles from the shared encoder output gives those tiles' segmentation
    part = net.decode([s[[0, 2]] for s in skips], bottleneck[[0, 2]])
    assert torch.allclose(part, out.seg[[0, 2]], atol=1e-6)
