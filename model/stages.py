"""The MODEL values of AuxNet's staged training: what each one trains.

Standard library only, so that the configuration lists the MODEL choices without importing torch;
:class:`model.AuxNet.AuxNet` is the network they train.
"""

from __future__ import annotations

from typing import NamedTuple


class Stage(NamedTuple):
    """What one MODEL value means for training.

    Attributes:
        trains: the parts that learn, a subset of "EDC" (encoder, decoder, classifier head).
        has_head: the network carries the classifier head.
        decodes: the training forward pass runs the decoder (the loss scores segmentation).
        needs_weights: starts from a trained network (MODEL_WEIGHTS is required).
        summary: one line for messages and docs.
    """

    trains: str
    has_head: bool
    decodes: bool
    needs_weights: bool
    summary: str


#: Every MODEL value: the one table that decides what trains.
STAGES: dict[str, Stage] = {
    "AuxNet-EDC": Stage("EDC", True, True, False, "encoder, decoder and head together"),
    "AuxNet-ED": Stage("ED", True, True, False, "the segmentation U-Net; the head is carried along untrained"),
    "AuxNet-C": Stage("C", True, False, True, "only the head, on a trained network"),
    "AuxNet-D": Stage("D", True, True, True, "only the decoder, encoder frozen, on a trained network"),
    "UNet": Stage("ED", False, True, False, "a plain U-Net without a head"),
}
