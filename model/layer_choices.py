"""The choices of AuxNet's layers: its normalisation (NORM) and activation (ACTIVATION), and their defaults.

Standard library only, so that the configuration lists them without importing torch;
:class:`model.AuxNet.ConvBlock` builds the layers they name. The defaults are set here, once: the
configuration's default and the network's constructor default are these.
"""

from __future__ import annotations

#: The normalisation layers of a ConvBlock (the valid NORM values): BatchNorm (running statistics of
#: the training batches), InstanceNorm (each sample's own statistics per channel, with a learnt
#: scale and shift) and GroupNorm (each sample's own statistics over groups of channels).
NORMS = ("batch", "instance", "group")
#: The activations of a ConvBlock (the valid ACTIVATION values).
ACTIVATIONS = ("relu", "leaky_relu")

#: The default NORM and ACTIVATION (of the configuration and of :class:`model.AuxNet.AuxNet`).
DEFAULT_NORM = "batch"
DEFAULT_ACTIVATION = "relu"

#: LeakyReLU's slope for negative inputs (MONAI BasicUNet's).
LEAKY_SLOPE = 0.1
#: GroupNorm's most groups: a block of ``ch`` channels gets gcd(GROUPS, ch) groups.
GROUPS = 8
