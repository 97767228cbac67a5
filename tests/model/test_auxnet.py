"""AuxNet shapes, modes and freezing; BatchNorm folded for inference."""

import pytest
import torch

from model.AuxNet import AuxNet, fold_batchnorm
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
    net = AuxNet(1, 1, 1, depth=3, base_width=4, norm="batch")
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


def _with_statistics(net: AuxNet, seed: int) -> AuxNet:
    """``net`` with random BatchNorm statistics and affine parameters (folding the defaults, mean 0
    and variance 1, would test little)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=gen) * 0.5 + 1)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return net


def _assert_close(folded: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to 1e-5 of the output's scale (fp32 rounding of the folded weights, not a change of model)."""
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("depth", [3, 4, 5])
@pytest.mark.parametrize("model", list(STAGES))
def test_folded_batchnorm_gives_the_outputs_of_the_network(model, depth):
    stage = STAGES[model]
    seg, cls = (1, 3, 2)[depth - 3], (1 if depth % 2 else 2) if stage.has_head else 0
    torch.manual_seed(depth)
    net = _with_statistics(AuxNet(2, seg, cls, depth=depth, base_width=4, norm="batch"), seed=depth)
    net.set_trainable(stage.trains)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    # the training network is untouched: its mode, and every parameter and statistic
    assert net.training and net.inc.training == ("E" in stage.trains)
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not folded.training and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 4 * depth - 2

    net.eval()
    x = torch.randn(3, 2, 32, 48)
    with torch.no_grad():
        ref, out = net(x), folded(x)
        for name in ("seg", "cls", "fill"):
            r, o = getattr(ref, name), getattr(out, name)
            assert (r is None) == (o is None) == (name != "seg" and not stage.has_head)
            if r is not None:
                _assert_close(o, r)
        skips, bottleneck = folded.encode(x)
        ref_skips, ref_bottleneck = net.encode(x)
        for s, r in zip([*skips, bottleneck], [*ref_skips, ref_bottleneck]):
            _assert_close(s, r)
        _assert_close(folded.decode(skips, bottleneck), ref.seg)
        if stage.has_head:
            cls_logits, fill = folded.classify(bottleneck)
            _assert_close(cls_logits, ref.cls)
            _assert_close(fill, ref.fill)


def test_folding_keeps_the_memory_format_and_refuses_batchnorm_without_statistics():
    net = _with_statistics(AuxNet(1, 1, 1, depth=3, base_width=4, norm="batch"), seed=0).to(memory_format=torch.channels_last)
    folded = fold_batchnorm(net)
    assert folded.inc[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not folded.inc[0].weight.requires_grad and folded.inc[0].bias is not None
    x = torch.randn(2, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _assert_close(folded(x).seg, net.eval()(x).seg)
    blind = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="keeps no running statistics \\(track_running_stats=False\\): "
                                         "it cannot be folded into the convolution before it"):
        fold_batchnorm(blind)


@pytest.mark.parametrize("trains_encoder", [True, False])
def test_the_heads_loss_reaches_the_encoder_only_when_it_trains_it(trains_encoder):
    torch.manual_seed(0)
    net = AuxNet(1, 1, 1, depth=3, base_width=4, head_trains_encoder=trains_encoder).train()
    out = net(torch.randn(2, 1, 16, 16))
    (out.cls.sum() + out.fill.sum()).backward()  # the heads' outputs alone
    encoder = [p.grad for m in net.encoder_modules() for p in m.parameters()]
    heads = [p.grad for m in net.head_modules() for p in m.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in heads)
    reached = any(g is not None and g.abs().sum() > 0 for g in encoder)
    assert reached == trains_encoder
    assert all(p.grad is None for p in net.decoder_modules()[0].parameters())  # the decoder never


def test_a_detached_head_gives_the_same_outputs():
    torch.manual_seed(0)
    a = AuxNet(1, 2, 1, depth=3, base_width=4).eval()
    b = AuxNet(1, 2, 1, depth=3, base_width=4, head_trains_encoder=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 16, 16)
    for u, v in zip(a(x), b(x)):
        assert torch.equal(u, v)
