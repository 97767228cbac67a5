"""The inference copy of a network: BatchNorm folded, and on the CPU each convolution fused with
its activation in one oneDNN call (:func:`inference_copy`).

Prediction spends most of its time in the U-Net's 3×3 convolutions and in the passes over every
feature map between them. On the CPU this copy removes those passes:

* BatchNorm (in eval mode an affine map per channel) is folded into the convolution before it
  (:func:`model.AuxNet.fold_batchnorm`);
* the activation after a convolution runs inside it, as a oneDNN post-op
  (``torch.ops.mkldnn._convolution_pointwise``, the fused convolution torch's own compiler emits
  for the CPU), so a block is two calls instead of six;
* the decoder's ``conv(cat([skip, up]))`` is computed as ``conv(up, W_up) + conv(skip, W_skip)``
  with the sum and the activation fused into the second call, so the concatenated map is never
  written (the weight splits along its input channels; the sums are the same products in another
  order);
* the encoder's 2×2 max-pool is a maximum of strided views (torch's ``max_pool2d`` computes the
  indices it then discards; this is 1.8–2.4× faster).

Precision: in fp32 the outputs equal the network's to float rounding (~1e-6). Under bf16 autocast
the weights are held in bf16 and each bias in fp32: oneDNN accumulates in fp32 and adds the fp32
bias before the one rounding of the output (in the decoder's split, the half over the skip, which
carries the bias, is rounded once more before the sum), so the folded BatchNorm's shift is not
rounded to bf16 (rounding it is why BatchNorm is not folded under fp16, or bf16 on a GPU), while
unfused bf16 rounds the convolution's output before BatchNorm subtracts its mean. Against an fp64
evaluation of three trained default networks on ISBI crops the copy's bf16 error was at most the
unfused network's (mean |Δp| 3.6e-4 against 4.9e-4, 4.6e-4 against 5.6e-4, 1.7e-3 against 2.6e-3;
tested on random networks).

NaN: oneDNN's fused ReLU gives 0 for NaN where torch's ReLU keeps it, so a NaN from an overflow
(inf − inf) could vanish inside the network. ReLU is therefore fused only where
:func:`activation_bound` proves that no activation can overflow for inputs up to
:data:`INPUT_BOUND`: trained default networks bound at 2e27 to 9e30, with UNET_DEPTH=5,
CONV_DEPTH=8 at about 2e34, and the limit is 1e36 (a deeper or wider network above it keeps
torch's ReLU: exact, slower). The predictor refuses NaN or infinite weights before it runs.

Anything else is left as the unfused eval copy: a network on another device, fp16, bf16 where
oneDNN computes no bf16 (an AVX2-only CPU: there ``auto`` precision is fp32 anyway), a network
without BatchNorm (NORM=instance or group: each sample's own statistics sit between convolution
and activation, so no activation fuses, and the decoder's split and the pooling alone measured
5–12 % slower there, one thread, three runs each), and a torch built without oneDNN.

Measured (``bench/inference.py --threads 1 --old-code``, 4096² scene, 3969 windows, against the
predictor before this copy existed, three runs on two sets of weights): bf16 on a 2-core Xeon with
AMX 1.62–2.20× the windows/s plain, 2.02–2.03× gated at the same threshold (1.55× gated at 0.4
against the old 0.5, which decodes fewer windows); fp32 limited to AVX2 1.17× and 1.30× (gated
1.17×, 1.23×).
On AVX2 the default network's 1.15 GFLOP per window run at 87–96 % of the rate of one large 3×3
convolution on that core: fp32 prediction there is bound by the convolutions' arithmetic, which no
fusion changes. ``torch.compile`` (inductor, ``freezing=True``) of the same network, 16 windows,
one thread: bf16 33.6 ms against this copy's 35.6 ms (the unfused network 55.7 ms); fp32 on AVX2
224.8 against 222.7 ms. Not used: it needs a C++ compiler at run time and compiles per input
shape, for at most 6 %.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from model.AuxNet import Up, fold_batchnorm

#: The largest input magnitude :func:`activation_bound` assumes: prediction's inputs are images
#: scaled to about [0, 1]; an integer image of another dtype than training's is scaled by training's
#: scale, at most a 32-bit image by uint8's 255: 4.3e9 / 255 ≈ 1.7e7. (Past the bound an overflow
#: still ends in an infinite logit, which the predictor reports; the bound is what makes it certain.)
INPUT_BOUND = 2e7
#: ReLU is fused only where :func:`activation_bound` stays below this: fp32 and bf16 overflow at
#: 3.4e38, and bf16's rounding grows a magnitude by less than 1.2× over 30 layers.
ACTIVATION_LIMIT = 1e36
#: oneDNN's convolution with fused post-ops, where this torch has it (None: the plain path).
_POINTWISE = (getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
              if torch.backends.mkldnn.is_available() else None)


def inference_copy(net: nn.Module, amp_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """An inference copy of ``net`` (eval mode) for autocast ``amp_dtype`` (None: fp32): BatchNorm
    folded where that is exact enough, and on the CPU the fused layers of this module's docstring.

    ``net`` itself (its mode, weights and memory format) is left as it is. The copy is for
    inference only (no weight of it requires gradients). Call it with the same autocast as before:
    fused layers cast their input to their weights' dtype, the others are autocast's.

    Args:
        net: an :class:`~model.AuxNet.AuxNet` (or any module: only the layers this module knows
            are replaced).
        amp_dtype: the autocast precision the copy will run under: None (fp32) fuses on the CPU
            (a network with BatchNorm),
            bf16 where oneDNN computes bf16 (:func:`_onednn_bf16`); fp16, bf16 elsewhere and other
            devices keep BatchNorm unfolded under autocast, as its folded shift would be rounded to
            the low precision.

    Returns:
        The copy, in eval mode, on ``net``'s device.
    """
    device = next(net.parameters(), torch.empty(0)).device
    fuses = (_POINTWISE is not None and device.type == "cpu" and any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
             and (amp_dtype is None or (amp_dtype == torch.bfloat16 and _onednn_bf16())))
    if not fuses:
        return (fold_batchnorm(net) if amp_dtype is None else copy.deepcopy(net).eval()).requires_grad_(False)
    dtype = amp_dtype or torch.float32
    fused = fold_batchnorm(net)
    # oneDNN's fused ReLU maps NaN to 0: fuse it only where no activation can overflow (finite
    # weights, bounded activations), so that a NaN could not arise to be hidden
    relu = activation_bound(fused) < ACTIVATION_LIMIT
    fused.requires_grad_(False)
    for parent in list(fused.modules()):
        for name, child in parent.named_children():
            if type(child) is Up:
                setattr(parent, name, FusedUp(child, dtype, relu))
    for module in list(fused.modules()):
        if isinstance(module, nn.Sequential):
            _fuse_in_place(module, dtype, relu)
    return fused


def activation_bound(net: nn.Module, input_bound: float = INPUT_BOUND) -> float:
    """An upper bound of the magnitude of every activation of ``net`` (BatchNorm folded, eval mode)
    for inputs with ``|x| <= input_bound``: ``B ← max(1, g)·B + max|b|`` over its convolutions,
    transposed convolutions and linear layers in order, where ``g`` is the largest L1 norm of an
    output's weights (all taps, for a transposed convolution). ReLU, LeakyReLU, max-pooling and
    concatenation do not increase the magnitude, and a layer a path skips has gain ≥ 1 in the chain,
    so every path is bounded. NaN or inf in a weight gives NaN or inf. Normalisation layers are not
    bounded here (no ReLU is fused after one).
    """
    bound = float(input_bound)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            w = m.weight.detach().double().abs()
            gain = (w.sum(dim=(0, 2, 3)) if isinstance(m, nn.ConvTranspose2d) else w.flatten(1).sum(1)).amax().item()
            shift = m.bias.detach().double().abs().amax().item() if m.bias is not None else 0.0
            bound = max(gain, 1.0) * bound + shift
    return bound


def _onednn_bf16() -> bool:
    """Whether oneDNN computes bf16 convolutions on this CPU (AVX512 or AVX-NE-CONVERT, within
    ONEDNN_MAX_CPU_ISA): below that its fused convolution refuses bf16, and autocast's own
    convolutions (emulated bf16) are what runs."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def _fuse_in_place(seq: nn.Sequential, dtype: torch.dtype, relu: bool) -> None:
    """Replace each 2-d convolution of ``seq`` (with the activation after it, where oneDNN can fuse
    it; ReLU only if ``relu``) by a :class:`FusedConv`, and each 2×2 max-pool by a :class:`MaxPool2x2`."""
    i = 0
    while i < len(seq):
        if _fusable(seq[i]):
            post = _activation(seq[i + 1], relu) if i + 1 < len(seq) else None
            seq[i] = FusedConv(seq[i], dtype, post)
            if post is not None:
                del seq[i + 1]  # nn.Sequential renumbers the layers after it
        elif isinstance(seq[i], nn.MaxPool2d) and _halves(seq[i]):
            seq[i] = MaxPool2x2()
        i += 1


def _fusable(module: nn.Module) -> bool:
    """Whether ``module`` is a plain 2-d convolution (zero padding given as sizes) oneDNN computes."""
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple)


def _halves(pool: nn.MaxPool2d) -> bool:
    """Whether ``pool`` is the plain 2×2, stride 2 max-pool that :class:`MaxPool2x2` computes."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (pair(pool.kernel_size) == pair(pool.stride) == (2, 2) and pair(pool.padding) == (0, 0)
            and pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices)


def _activation(module: nn.Module, relu: bool = True) -> Optional[tuple[str, list]]:
    """oneDNN's name and scalars of an activation it can fuse (ReLU only if ``relu``), or None.
    (Its LeakyReLU keeps NaN, as torch's does; its ReLU gives 0 for NaN.)"""
    if isinstance(module, nn.ReLU) and relu:
        return "relu", []
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", [module.negative_slope]
    return None


class FusedConv(nn.Module):
    """A 2-d convolution and the activation after it (ReLU, LeakyReLU, or none) in one oneDNN call.

    Holds the convolution's weight in ``dtype`` (its memory format kept) and its bias in fp32;
    the input is cast to ``dtype``. No gradients: inference only.
    """

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, post: Optional[tuple[str, list]] = None):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().to(dtype))
        bias = conv.bias.detach().float() if conv.bias is not None else None
        self.register_buffer("bias", bias)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.attr, self.scalars = post if post is not None else ("none", [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _POINTWISE(x.to(self.weight.dtype), self.weight, self.bias, self.padding, self.stride,
                          self.dilation, self.groups, self.attr, self.scalars, "")

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel_size="
                f"{tuple(self.weight.shape[2:])}, padding={tuple(self.padding)}, {self.weight.dtype}, "
                f"post={self.attr}")


class FusedUp(nn.Module):
    """:class:`~model.AuxNet.Up` without the concatenation: the block's first convolution over
    ``cat([skip, up(x)])`` is split along its input channels into one over ``skip`` (with the bias)
    and one over ``up(x)`` that adds the first's output and applies the activation in the same call;
    the rest of the block follows as it is (fused by :func:`inference_copy`)."""

    def __init__(self, up: Up, dtype: torch.dtype, relu: bool = True):
        super().__init__()
        self.up = up.up
        first, block = up.conv[0], list(up.conv)
        post = _activation(block[1], relu) if len(block) > 1 else None
        # the activation is fused after the sum where oneDNN can (ReLU); else it stays in the rest
        fused_relu = post is not None and post[0] == "relu"
        self.rest = nn.Sequential(*block[2 if fused_relu else 1:])
        skip_channels = first.in_channels - up.up.out_channels
        self.skip_conv = FusedConv(_part(first, slice(None, skip_channels), bias=True), dtype)
        self.up_conv = FusedConv(_part(first, slice(skip_channels, None), bias=False), dtype,
                                 post if fused_relu else None)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        partial, c = self.skip_conv(skip), self.up_conv
        u = self.up(x).to(c.weight.dtype)
        if u.dtype == torch.float32 or u.is_contiguous(memory_format=torch.channels_last):
            # oneDNN fuses only ReLU after a sum (not LeakyReLU): that one runs as a layer after it
            y = _POINTWISE.binary(u, partial, c.weight, None, c.padding, c.stride, c.dilation, c.groups, "add", 1.0,
                                  "relu" if c.attr == "relu" else None, [], "")
        else:  # bf16 in the contiguous format: torch's fused sum has no bf16 kernel, so add, then ReLU
            y = _POINTWISE(u, c.weight, None, c.padding, c.stride, c.dilation, c.groups, "none", [], "").add_(partial)
            if c.attr == "relu":
                y = y.relu_()
        return self.rest(y)


def _part(conv: nn.Conv2d, channels: slice, bias: bool) -> nn.Conv2d:
    """The convolution over the input channels ``channels`` of ``conv`` (its bias only if ``bias``)."""
    weight = conv.weight.detach()
    fmt = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    part = copy.deepcopy(conv)
    part.weight = nn.Parameter(weight[:, channels].contiguous(memory_format=fmt), requires_grad=False)
    part.in_channels = part.weight.shape[1]
    if not bias:
        part.bias = None
    return part


class MaxPool2x2(nn.Module):
    """2×2 max-pool, stride 2, as the maximum of the even and odd rows, then of the even and odd
    columns of that (strided views; no indices; input sides even, as
    :meth:`model.AuxNet.AuxNet.encode` checks). NaN propagates as in ``max_pool2d``. One thread,
    16×16×128² channels_last: bf16 2.36 → 0.99 ms, fp32 2.39 → 1.33 ms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.maximum(x[..., ::2, :], x[..., 1::2, :])
        return torch.maximum(rows[..., ::2], rows[..., 1::2])
