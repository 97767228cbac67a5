"""AuxNet: a U-Net with a tile classifier branching off the bottleneck.

::

    x ─ Enc1 ───────────────────────────── Dec1 ─ OutConv ─▶ seg (B, SEG_CLASSES, H, W)
          └ Down ─ Enc2 ───────────── Dec2 ┘
                    └ Down ─ Bottleneck ┘
                                 ├ ClassifierHead ─▶ cls  (B, CLS_CLASSES)        "contains a boundary?"
                                 └ FillHead ───────▶ fill (B, max(SEG_CLASSES, 2)) "if not, which class?"

Each Enc, Dec and the Bottleneck is a :class:`ConvBlock`, (3×3 conv → norm → activation) × 2, whose
norm is BatchNorm, InstanceNorm or GroupNorm and activation ReLU or LeakyReLU (NORM, ACTIVATION).
Width doubles per level from ``base_width``; ``depth`` counts levels including the bottleneck, so
the input side must be divisible by 2^(depth-1). The head answers "does this tile contain an object
boundary?"; the fill head answers "if not, which class is the whole tile?", so that prediction can
skip the decoder on tiles without a boundary and fill them with that class. In AuxNet's staged training
(:data:`model.stages.STAGES`) it can be trained jointly with the U-Net, or
alone on a frozen encoder.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from model.layer_choices import ACTIVATIONS, DEFAULT_ACTIVATION, DEFAULT_NORM, GROUPS, LEAKY_SLOPE, NORMS
from utils.choices import check_choice

N = TypeVar("N", bound=nn.Module)

class AuxNetOutput(NamedTuple):
    """Raw logits: ``seg`` (B, K, H, W) or None when decoding is skipped; ``cls`` (B, J) and
    ``fill`` (B, max(K, 2)) or None without a head."""

    seg: Optional[torch.Tensor]
    cls: Optional[torch.Tensor]
    fill: Optional[torch.Tensor] = None


class InstanceNorm(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (its parameters, state_dict and results), faster on the CPU.

    torch computes instance norm as a batch norm of a (1, B·C, H, W) view, so a channels_last input
    is copied to the contiguous layout and its output comes back contiguous, which the next
    convolution copies back. On the CPU this layer normalises with GroupNorm of one group per
    channel instead, the same function (per sample and channel over H, W, with the same ε, scale and
    shift), whose kernel reads and writes channels_last as it is: in fp32 always, and in bf16
    without gradients (prediction, validation), with autocast off so that bf16 stays bf16 (its
    kernel accumulates in fp32). bf16 training keeps ``nn.InstanceNorm2d``: GroupNorm's bf16
    backward is slower. Measured on a 2-core Xeon, one thread, ``NORM=instance``, 8×1×128²
    channels_last: a training step in fp32 395 → 309 ms (BatchNorm 264), bf16 unchanged (198 ms);
    one 8×16×128² layer without gradients in bf16 1.76 → 1.04 ms. Other devices use
    ``nn.InstanceNorm2d`` as it is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4 and (x.dtype == torch.float32 or not torch.is_grad_enabled()):
            with torch.autocast("cpu", enabled=False):
                return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)
        return super().forward(x)


def norm_layer(norm: str, ch: int) -> nn.Module:
    """The normalisation layer ``norm`` (:data:`~model.layer_choices.NORMS`) of ``ch`` channels.

    batch: BatchNorm2d, normalising by the batch's statistics in training and by their running
    averages in eval mode. instance: InstanceNorm2d with a learnt scale and shift and no running
    statistics (MONAI BasicUNet's default): every sample, in training and inference alike, is
    normalised by its own per-channel statistics. group: GroupNorm of gcd(8, ch) groups (8 for
    widths that are multiples of 8), each sample by its own statistics over those groups.
    """
    if norm == "batch":
        return nn.BatchNorm2d(ch)
    if norm == "instance":
        return InstanceNorm(ch, affine=True)
    if norm == "group":
        return nn.GroupNorm(math.gcd(GROUPS, ch), ch)
    raise ValueError(f"norm={norm!r} is not one of {list(NORMS)}")


def activation_layer(activation: str) -> nn.Module:
    """The activation ``activation`` (:data:`~model.layer_choices.ACTIVATIONS`): ReLU, or LeakyReLU
    with slope 0.1 for negative inputs (MONAI BasicUNet's)."""
    if activation == "relu":
        return nn.ReLU(inplace=True)
    if activation == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
    raise ValueError(f"activation={activation!r} is not one of {list(ACTIVATIONS)}")


class ConvBlock(nn.Sequential):
    """(3×3 conv → norm → activation) × 2, then spatial dropout; norm is BatchNorm, InstanceNorm or
    GroupNorm (:func:`norm_layer`), activation ReLU or LeakyReLU (:func:`activation_layer`)."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, norm: str = DEFAULT_NORM,
                 activation: str = DEFAULT_ACTIVATION):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            norm_layer(norm, out_ch),
            activation_layer(activation),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            norm_layer(norm, out_ch),
            activation_layer(activation),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
        )


class Down(nn.Sequential):
    """2×2 max-pool, then a ConvBlock: one level down the encoder."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, **layers: str):
        super().__init__(nn.MaxPool2d(2), ConvBlock(in_ch, out_ch, dropout, **layers))


class Up(nn.Module):
    """2×2 transposed conv, concatenate the skip connection, ConvBlock: one level up the decoder."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, **layers: str):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        self.conv = ConvBlock(2 * out_ch, out_ch, dropout, **layers)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class ClassifierHead(nn.Sequential):
    """Global average pool → dropout → linear: tile-level logits from the bottleneck."""

    def __init__(self, in_ch: int, num_classes: int, dropout: float):
        super().__init__(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_ch, num_classes)
        )


class FillHead(ClassifierHead):
    """The class of a tile without a boundary (global average pool → dropout → linear, beside the
    classifier head): what gated prediction fills such a tile with."""


class AuxNet(nn.Module):
    """U-Net of configurable depth and width with an optional classifier head.

    Args:
        in_channels: image channels.
        seg_classes: segmentation output channels (1 = binary/sigmoid, >= 2 = softmax).
        cls_classes: classifier outputs (1 = sigmoid, 2 = softmax); 0 builds no head (plain U-Net).
            With a head comes the fill head (``max(seg_classes, 2)`` outputs).
        depth: levels including the bottleneck (>= 2).
        base_width: feature maps of the first level; doubles per level.
        seg_dropout: spatial dropout after each encoder and decoder block.
        cls_dropout: dropout before the head's linear layer.
        norm: the blocks' normalisation, one of :data:`~model.layer_choices.NORMS` (see :func:`norm_layer`).
        activation: the blocks' activation, one of :data:`~model.layer_choices.ACTIVATIONS`.
        head_trains_encoder: the heads' loss also trains the encoder (False: the heads see the
            bottleneck detached, so in training only the segmentation loss shapes the encoder).

    Shape:
        x: (B, in_channels, H, W) with H, W divisible by 2^(depth-1).
        Returns :class:`AuxNetOutput` with seg (B, seg_classes, H, W), cls (B, cls_classes) and
        fill (B, max(seg_classes, 2)).
    """

    def __init__(
        self,
        in_channels: int = 1,
        seg_classes: int = 1,
        cls_classes: int = 1,
        depth: int = 4,
        base_width: int = 16,
        seg_dropout: float = 0.0,
        cls_dropout: float = 0.0,
        norm: str = DEFAULT_NORM,
        activation: str = DEFAULT_ACTIVATION,
        head_trains_encoder: bool = True,
    ):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth={depth}: a U-Net needs at least 2 levels")
        check_choice("norm", norm, NORMS)
        check_choice("activation", activation, ACTIVATIONS)
        widths = [base_width * 2**i for i in range(depth)]
        self.depth = depth
        self.head_trains_encoder = head_trains_encoder
        layers = {"norm": norm, "activation": activation}
        self.inc = ConvBlock(in_channels, widths[0], seg_dropout, **layers)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], seg_dropout, **layers) for i in range(depth - 1))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], seg_dropout, **layers)
                                 for i in reversed(range(depth - 1)))
        self.outc = nn.Conv2d(widths[0], seg_classes, 1)
        self.head = ClassifierHead(widths[-1], cls_classes, cls_dropout) if cls_classes > 0 else None
        self.fill_head = FillHead(widths[-1], max(seg_classes, 2), cls_dropout) if cls_classes > 0 else None

    def encoder_modules(self) -> list[nn.Module]:
        return [self.inc, self.downs]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.ups, self.outc]

    def head_modules(self) -> list[nn.Module]:
        return [m for m in (self.head, self.fill_head) if m is not None]

    def forward(self, x: torch.Tensor, decode: bool = True) -> AuxNetOutput:
        skips, bottleneck = self.encode(x)
        # Without head_trains_encoder the heads read the bottleneck but their loss does not reach the
        # encoder, which then learns from the segmentation loss alone.
        cls, fill = self.classify(bottleneck if self.head_trains_encoder else bottleneck.detach())
        return AuxNetOutput(self.decode(skips, bottleneck) if decode else None, cls, fill)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The encoder: (skip connections, shallow to deep; the bottleneck)."""
        if x.shape[-1] % 2 ** (self.depth - 1) or x.shape[-2] % 2 ** (self.depth - 1):
            raise ValueError(
                f"input of size {tuple(x.shape[-2:])} is not divisible by 2^(depth-1)={2 ** (self.depth - 1)}"
            )
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        bottleneck = skips.pop()
        return skips, bottleneck

    def classify(self, bottleneck: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(boundary logits, fill-class logits) of the heads, or (None, None) without a head."""
        if self.head is None:
            return None, None
        return self.head(bottleneck), self.fill_head(bottleneck)

    def decode(self, skips: list[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        """The decoder: segmentation logits from the encoder's output (``skips`` is not modified)."""
        y = bottleneck
        for up, skip in zip(self.ups, reversed(skips)):
            y = up(y, skip)
        return self.outc(y)

    def set_trainable(self, parts: str) -> None:
        """Freeze everything but ``parts`` (a subset of "EDC": encoder, decoder, classifier head).

        Frozen parts also stay in eval mode (see :meth:`train`) so their BatchNorm statistics and
        dropout do not change while the other parts learn (InstanceNorm and GroupNorm keep no
        statistics: they normalise each sample by its own in either mode).
        """
        groups = {"E": self.encoder_modules(), "D": self.decoder_modules(), "C": self.head_modules()}
        self._frozen = [m for key, mods in groups.items() if key not in parts for m in mods]
        for key, mods in groups.items():
            for module in mods:
                module.requires_grad_(key in parts)

    def train(self, mode: bool = True) -> "AuxNet":
        super().train(mode)
        for module in getattr(self, "_frozen", []):
            module.eval()
        return self


def fold_batchnorm(net: N) -> N:
    """An inference copy of ``net`` (eval mode) in which every BatchNorm that follows a convolution
    in an ``nn.Sequential`` (each :class:`ConvBlock`) is folded into that convolution.

    In eval mode BatchNorm is the affine map ``y = (x - μ)·γ/√(var + ε) + β`` per channel, so the
    pair is one convolution with weight ``w·γ/√(var + ε)`` and bias ``(b - μ)·γ/√(var + ε) + β``
    (computed in float64, stored in the weight's dtype): the outputs equal the unfolded network's to
    float rounding, and inference skips a pass over every feature map. ``net`` itself, its mode and
    its state_dict are left as they are (checkpoints keep the training layout); the copy is for
    inference only: training it would no longer normalise by batch statistics. InstanceNorm and
    GroupNorm (NORM=instance, group) normalise each input by its own statistics, which no
    convolution can express: they stay as they are, and the copy is ``net`` in eval mode.

    Args:
        net: any module (an :class:`AuxNet`, or one holding its blocks).

    Returns:
        The folded copy, in eval mode, on ``net``'s device, its weights in their memory format.

    Raises:
        ValueError: a BatchNorm to fold keeps no running statistics (it normalises by each batch's
            own statistics even in eval mode, which no convolution can express).
    """
    folded = copy.deepcopy(net).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in reversed(range(1, len(seq))):  # from the end, so deleting keeps the earlier indices
            if isinstance(seq[i], nn.BatchNorm2d) and isinstance(seq[i - 1], nn.Conv2d):
                seq[i - 1] = _fold_conv_bn(seq[i - 1], seq[i])
                del seq[i]  # nn.Sequential renumbers the layers after it
    return folded


@torch.no_grad()
def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One convolution that computes ``bn(conv(x))`` of the eval-mode BatchNorm ``bn``."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} keeps no running statistics (track_running_stats=False): it cannot be folded "
                         "into the convolution before it")
    weight = conv.weight
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
    fused = copy.deepcopy(conv)
    # elementwise product with the weight first keeps its memory format (channels_last stays so)
    fused.weight = nn.Parameter((weight.double() * scale.view(-1, 1, 1, 1)).to(weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=False)
    return fused
