"""The inference copy (model.fused): BatchNorm folded, convolution and activation fused by oneDNN on
the CPU, the decoder's concatenation split, the 2×2 max-pool of strided views. Compared with the
network itself in fp32, and in bf16 with an fp64 evaluation of it (GPUs=[]: these are CPU paths)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import model.fused as fused_module
from model.AuxNet import AuxNet, Up, fold_batchnorm
from model.fused import FusedConv, FusedUp, MaxPool2x2, inference_copy
from tests.model.test_auxnet import _with_statistics

CPU_BF16 = fused_module._POINTWISE is not None and fused_module._onednn_bf16()


def _net(norm="batch", activation="relu", depth=4, in_ch=2, seg=1, cls=1, width=4, seed=0, channels_last=True):
    torch.manual_seed(seed)
    net = _with_statistics(AuxNet(in_ch, seg, cls, depth=depth, base_width=width, norm=norm, activation=activation),
                           seed=seed)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _outputs(net, x, amp_dtype=None):
    with torch.inference_mode(), torch.autocast("cpu", amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        skips, bottleneck = net.encode(x)
        cls, fill = net.classify(bottleneck)
        return [t.float() for t in (*skips, bottleneck, net.decode(skips, bottleneck), cls, fill) if t is not None]


def _counts(net):
    kinds = (FusedConv, FusedUp, MaxPool2x2, torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.LeakyReLU,
             torch.nn.MaxPool2d)
    return {k.__name__: sum(type(m) is k for m in net.modules()) for k in kinds}


@pytest.mark.skipif(fused_module._POINTWISE is None, reason="this torch has no oneDNN fused convolution")
@pytest.mark.parametrize("norm, activation", [("batch", "relu"), ("batch", "leaky_relu"), ("instance", "relu"),
                                              ("group", "leaky_relu")])
@pytest.mark.parametrize("depth, seg, channels_last", [(2, 1, True), (3, 3, False), (4, 2, True)])
def test_fp32_copy_gives_the_networks_outputs(norm, activation, depth, seg, channels_last):
    net = _net(norm, activation, depth=depth, seg=seg, channels_last=channels_last).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copy_ = inference_copy(net)
    # the network is untouched: mode and every weight and statistic
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not copy_.training and not any(p.requires_grad for p in copy_.parameters())
    x = torch.randn(3, 2, 2 ** (depth + 2), 2 ** (depth + 1) * 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for got, ref in zip(_outputs(copy_, x), _outputs(net.eval(), x), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())

    counts = _counts(copy_)
    if norm != "batch":  # nothing fuses without BatchNorm: the eval copy as it is
        assert counts == _counts(net) and counts["FusedConv"] == counts["FusedUp"] == counts["MaxPool2x2"] == 0
        return
    assert counts["FusedUp"] == depth - 1
    assert counts["MaxPool2x2"] == depth - 1 and counts["MaxPool2d"] == 0
    assert counts["BatchNorm2d"] == 0
    # every 3×3 convolution is fused (the 1×1 output convolution and the transposed ones are not);
    # with BatchNorm the activation went into it, except a LeakyReLU after the decoder's sum
    assert counts["Conv2d"] == 1 and counts["FusedConv"] == 4 * depth - 2 + (depth - 1)
    left = counts["ReLU"] + counts["LeakyReLU"]
    assert left == (0 if activation == "relu" else depth - 1)


def test_maxpool_of_strided_views_is_max_pool2d_with_nan_and_inf():
    x = torch.randn(2, 3, 8, 6)
    # a NaN at each of the four offsets of a 2×2 cell
    for n, c, i, j in [(0, 0, 0, 1), (0, 2, 3, 2), (1, 0, 5, 5), (1, 1, 2, 4)]:
        x[n, c, i, j] = float("nan")
    x[1, 2, 5, 5], x[0, 1, 2, 2] = float("-inf"), float("inf")
    for fmt in (torch.contiguous_format, torch.channels_last):
        y, ref = MaxPool2x2()(x.contiguous(memory_format=fmt)), F.max_pool2d(x, 2)
        torch.testing.assert_close(y, ref, equal_nan=True, rtol=0, atol=0)
        assert y[0, 0, 0, 0].isnan() and y[0, 1, 1, 1] == float("inf")


@pytest.mark.skipif(not CPU_BF16, reason="oneDNN computes no bf16 convolution on this CPU (AVX2 or less)")
@pytest.mark.parametrize("activation, channels_last", [("relu", True), ("leaky_relu", True), ("relu", False)])
def test_bf16_copy_is_as_close_to_fp64_as_the_network_under_autocast(activation, channels_last):
    net = _net("batch", activation, depth=4, width=8, seed=3, channels_last=channels_last).eval()
    copy_ = inference_copy(net, torch.bfloat16)
    weights = [m.weight for m in copy_.modules() if isinstance(m, FusedConv)]
    biases = [m.bias for m in copy_.modules() if isinstance(m, FusedConv) and m.bias is not None]
    assert {w.dtype for w in weights} == {torch.bfloat16} and {b.dtype for b in biases} == {torch.float32}
    x = torch.rand(4, 2, 64, 64)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ref = _outputs(copy.deepcopy(net).double(), x.double())
    fused = _outputs(copy_, x, torch.bfloat16)
    autocast = _outputs(net, x, torch.bfloat16)
    for got, unfused, exact in zip(fused, autocast, ref, strict=True):
        err, own = (got - exact).abs(), (unfused - exact).abs()
        # the network's own bf16 error bounds the copy's (the copy rounds less: fp32 bias, one rounding)
        assert err.mean() <= 1.25 * own.mean() + 1e-6 and err.max() <= 2 * own.max() + 1e-6


def test_the_plain_eval_copy_where_nothing_fuses(monkeypatch):
    net = _net("batch", "relu", depth=3).eval()
    x = torch.randn(2, 2, 32, 32)
    # fp16: BatchNorm stays (its folded shift would be rounded to fp16); nothing is fused
    half = inference_copy(net, torch.float16)
    assert _counts(half)["BatchNorm2d"] == _counts(net)["BatchNorm2d"] and _counts(half)["FusedConv"] == 0
    # a torch without oneDNN's fused convolution: BatchNorm folded, layers as they were
    monkeypatch.setattr(fused_module, "_POINTWISE", None)
    plain = inference_copy(net)
    counts = _counts(plain)
    assert counts["BatchNorm2d"] == 0 and counts["FusedConv"] == 0 and counts["ReLU"] == _counts(net)["ReLU"]
    assert not any(isinstance(m, FusedUp) for m in plain.modules()) and any(isinstance(m, Up) for m in plain.modules())
    for got, ref in zip(_outputs(plain, x), _outputs(net, x), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_bf16_without_onednn_bf16_keeps_the_autocast_copy(monkeypatch):
    monkeypatch.setattr(fused_module, "_onednn_bf16", lambda: False)
    net = _net("batch", "relu", depth=3).eval()
    copy_ = inference_copy(net, torch.bfloat16)
    assert _counts(copy_) == _counts(net) and not copy_.training


def test_activation_bound_by_hand_and_above_every_activation():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(0.5)
    # one 3×3 convolution of ones: a pixel sees 9 inputs of at most 2, plus 0.5
    assert fused_module.activation_bound(torch.nn.Sequential(conv), input_bound=2.0) == 9 * 2 + 0.5
    with torch.no_grad():
        assert conv(torch.full((1, 1, 5, 5), 2.0))[0, 0, 2, 2] == 18.5
    # a network's every block output stays below its bound for inputs in [-1, 1]
    net = fold_batchnorm(_net("batch", "relu", depth=3, width=4, seed=5))
    bound = fused_module.activation_bound(net, input_bound=1.0)
    seen = []
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.abs().max().item()))
    with torch.no_grad():
        net(torch.rand(4, 2, 32, 32) * 2 - 1)
    assert len(seen) == 3 * 4 + 1 and max(seen) <= bound


def test_relu_is_not_fused_where_an_activation_could_overflow():
    """oneDNN's fused ReLU gives 0 for NaN; a network whose activations could overflow (inf - inf
    = NaN) keeps torch's ReLU, so that the NaN reaches the output and prediction reports it."""
    net = _net("batch", "relu", depth=3).eval()
    assert _counts(inference_copy(net))["ReLU"] == 0
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1000.0)
    assert fused_module.activation_bound(fold_batchnorm(net)) >= fused_module.ACTIVATION_LIMIT
    copy_ = inference_copy(net)
    counts = _counts(copy_)
    assert counts["ReLU"] == 2 * 3 + 2 * 2 and counts["FusedConv"] == 5 * 3 - 3
    x = torch.rand(2, 2, 32, 32) * 255
    outputs = list(zip(_outputs(copy_, x), _outputs(net, x), strict=True))
    assert outputs[-3][1].isnan().any()  # the network's output has NaN, and so has the copy's, in the same places
    for got, ref in outputs:
        assert torch.equal(got.isnan(), ref.isnan())
        finite = ref.isfinite()
        if finite.any():
            torch.testing.assert_close(got[finite], ref[finite], rtol=1e-3,
                                       atol=1e-3 * ref[finite].abs().max().item())
