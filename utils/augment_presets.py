"""The named AUGMENTATIONS recipes (``default``, ``flips``, ``none``): lists of transforms as a user
would write them in AUGMENTATIONS.

Standard library only, so that the configuration lists the names without importing torch or
albumentations; :func:`utils.augment.build_augmentation` builds the transforms they name.
"""

from __future__ import annotations

from typing import Any

#: The default recipe: the 8 flips and quarter turns, small shifts, scalings and rotations, the U-Net
#: paper's elastic deformation, brightness/contrast and noise.
DEFAULT_AUGMENTATIONS: list[dict[str, Any]] = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "VerticalFlip", "p": 0.5},
    {"name": "RandomRotate90", "p": 0.5},
    {"name": "ShiftScaleRotate", "p": 0.3, "shift_limit": 0.05, "scale_limit": 0.1, "rotate_limit": 30},
    {"name": "ElasticTransform", "p": 0.3, "sigma": 10.0, "grid_size": 3},
    {"name": "RandomBrightnessContrast", "p": 0.3, "brightness_limit": 0.1, "contrast_limit": 0.1},
    {"name": "GaussNoise", "p": 0.2, "std_range": [0.01, 0.04]},
]

#: Only the 8 flips and quarter turns (the dihedral group of the square), the pixels themselves
#: unchanged: the default recipe's first three transforms, each with p=0.5. (So the 8 orientations are not
#: equally likely: the identity, the half turn and the two mirror flips come 3/16 of the time each, the
#: quarter turns and the two diagonal flips 1/16 each.)
FLIP_AUGMENTATIONS: list[dict[str, Any]] = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "VerticalFlip", "p": 0.5},
    {"name": "RandomRotate90", "p": 0.5},
]

#: Every named recipe (the text values of AUGMENTATIONS), each a list of transforms.
AUGMENTATION_PRESETS: dict[str, list[dict[str, Any]]] = {
    "default": DEFAULT_AUGMENTATIONS,
    "flips": FLIP_AUGMENTATIONS,
    "none": [],
}
