"""Training augmentation with albumentations: a registry of transforms users may list in
AUGMENTATIONS (each parameter checked, with the valid choices) and the U-Net paper's elastic
deformation. The named recipes (``default``, ``flips``, ``none``) are :mod:`utils.augment_presets`'s.
Geometric transforms move image and mask together."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

# albumentations checks PyPI for a newer version on import unless told not to; nothing may
# download at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.augmentations.geometric.distortion import BaseDistortion  # noqa: E402
from albumentations.core.transforms_interface import BaseTransformInitSchema  # noqa: E402

from utils.augment_presets import DEFAULT_AUGMENTATIONS  # noqa: E402, F401  (re-exported: its importers' name)
from utils.choices import did_you_mean  # noqa: E402


class UNetElasticTransform(BaseDistortion):
    """Elastic deformation as in the U-Net paper (Ronneberger et al. 2015, sec. 3.1).

    Random displacement vectors on a coarse ``grid_size`` x ``grid_size`` grid, drawn from a
    Gaussian with ``sigma`` pixels standard deviation, interpolated bicubically to a per-pixel
    displacement field. (albumentations' own ``ElasticTransform`` smooths per-pixel noise instead,
    Simard et al.'s recipe.) Image: bilinear; mask: nearest neighbour; borders reflected.

    Args:
        sigma: standard deviation of the grid displacements, in pixels.
        grid_size: grid points per side (the paper: 3).
        p: probability of applying the transform.
    """

    class InitSchema(BaseTransformInitSchema):
        sigma: float
        grid_size: int

    def __init__(self, sigma: float = 10.0, grid_size: int = 3, p: float = 0.5):
        super().__init__(
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            keypoint_remapping_method="mask",
            p=p,
            border_mode=cv2.BORDER_REFLECT_101,
        )
        if not sigma >= 0:
            raise ValueError(f"sigma={sigma} must be >= 0")
        if grid_size < 2:
            raise ValueError(f"grid_size={grid_size} must be >= 2")
        self.sigma = float(sigma)
        self.grid_size = int(grid_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        grid = self.random_generator.normal(0, self.sigma, (2, self.grid_size, self.grid_size)).astype(np.float32)
        # Grid points sit on the image's corners, edge midpoints and centre (align-corners
        # sampling); cv2.resize would instead centre them in grid cells and extrapolate outwards.
        dx = _bicubic_upsample(grid[0], height, width)
        dy = _bicubic_upsample(grid[1], height, width)
        xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        return {"map_x": xs + dx, "map_y": ys + dy}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma", "grid_size")


def _bicubic_upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic interpolation of a (g, g) grid whose corner points sit on the image's corner pixels."""
    g = torch.from_numpy(grid)[None, None]
    out = torch.nn.functional.interpolate(g, size=(height, width), mode="bicubic", align_corners=True)
    return out[0, 0].numpy()


def _num(lo: float | None = None, hi: float | None = None, integer: bool = False) -> Callable[[Any], Optional[str]]:
    """Check a number lies in [lo, hi]; returns the problem or None."""

    def check(v: Any) -> Optional[str]:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return f"must be {'an integer' if integer else 'a number'}, got {v!r}"
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"must be in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], got {v!r}"
        return None

    return check


def _range_or_num(lo: float, hi: float) -> Callable[[Any], Optional[str]]:
    """A number, or a [low, high] pair of numbers, in [lo, hi]."""
    single = _num(lo, hi)

    def check(v: Any) -> Optional[str]:
        if isinstance(v, (list, tuple)):
            if len(v) != 2:
                return f"must be a number or a [low, high] pair, got {v!r}"
            for x in v:
                if (problem := single(x)) is not None:
                    return problem
            return None if v[0] <= v[1] else f"needs low <= high, got {v!r}"
        return single(v)

    return check


def _pair(v: Any) -> tuple[float, float]:
    return (float(v[0]), float(v[1])) if isinstance(v, (list, tuple)) else (-float(v), float(v))


# Geometric transforms: bilinear image, nearest-neighbour mask (class indices stay class indices),
# reflected borders (a constant fill would draw artificial edges into the tile).
_GEOMETRY = {
    "border_mode": cv2.BORDER_REFLECT_101,
    "interpolation": cv2.INTER_LINEAR,
    "mask_interpolation": cv2.INTER_NEAREST,
}


@dataclass(frozen=True)
class AugmentationSpec:
    """A registry entry: how to build the transform, and its parameters with defaults and checks."""

    build: Callable[..., A.BasicTransform]
    params: dict[str, tuple[Any, Callable[[Any], Optional[str]]]]
    doc: str


def _shift_scale_rotate(p: float, shift_limit: Any, scale_limit: Any, rotate_limit: Any) -> A.BasicTransform:
    # albumentations 2 warns that ShiftScaleRotate is a special case of Affine; build that.
    lo, hi = _pair(scale_limit)
    return A.Affine(
        translate_percent=_pair(shift_limit), scale=(1 + lo, 1 + hi), rotate=_pair(rotate_limit), p=p, **_GEOMETRY
    )


def _affine(p: float, scale: Any, translate_percent: Any, rotate: Any, shear: Any) -> A.BasicTransform:
    scale = tuple(scale) if isinstance(scale, (list, tuple)) else (float(scale), float(scale))
    return A.Affine(scale=scale, translate_percent=_pair(translate_percent), rotate=_pair(rotate), shear=_pair(shear),
                    p=p, **_GEOMETRY)


AUGMENTATIONS: dict[str, AugmentationSpec] = {
    "HorizontalFlip": AugmentationSpec(lambda p: A.HorizontalFlip(p=p), {}, "mirror left-right"),
    "VerticalFlip": AugmentationSpec(lambda p: A.VerticalFlip(p=p), {}, "mirror top-bottom"),
    "RandomRotate90": AugmentationSpec(lambda p: A.RandomRotate90(p=p), {}, "rotate by 0, 90, 180 or 270 degrees"),
    "ShiftScaleRotate": AugmentationSpec(
        _shift_scale_rotate,
        {
            "shift_limit": (0.0625, _range_or_num(-1, 1)),
            "scale_limit": (0.1, _range_or_num(-0.9, 10)),
            "rotate_limit": (45.0, _range_or_num(-360, 360)),
        },
        "shift (fraction of the side), scale (1 + limit) and rotate (degrees) by random amounts",
    ),
    "Affine": AugmentationSpec(
        _affine,
        {
            "scale": ((0.9, 1.1), _range_or_num(0.01, 100)),
            "translate_percent": (0.0, _range_or_num(-1, 1)),
            "rotate": (0.0, _range_or_num(-360, 360)),
            "shear": (0.0, _range_or_num(-90, 90)),
        },
        "albumentations Affine: scale factor, translation (fraction), rotation and shear (degrees)",
    ),
    "ElasticTransform": AugmentationSpec(
        lambda p, sigma, grid_size: UNetElasticTransform(sigma=sigma, grid_size=grid_size, p=p),
        {"sigma": (10.0, _num(0, None)), "grid_size": (3, _num(2, 64, integer=True))},
        "U-Net paper elastic deformation: grid_size^2 displacements with sigma px std, bicubic",
    ),
    "RandomBrightnessContrast": AugmentationSpec(
        lambda p, brightness_limit, contrast_limit: A.RandomBrightnessContrast(
            brightness_limit=_pair(brightness_limit), contrast_limit=_pair(contrast_limit), p=p
        ),
        {"brightness_limit": (0.2, _range_or_num(-1, 1)), "contrast_limit": (0.2, _range_or_num(-1, 1))},
        "add brightness and scale contrast by random amounts (fractions of the value range)",
    ),
    "GaussNoise": AugmentationSpec(
        lambda p, std_range: A.GaussNoise(std_range=_pair(std_range) if isinstance(std_range, (list, tuple))
                                          else (0.0, float(std_range)), p=p),
        {"std_range": ((0.01, 0.05), _range_or_num(0, 1))},
        "add Gaussian noise; std drawn from std_range (fraction of the value range 1.0)",
    ),
}


def augmentation_problems(spec: Any) -> list[str]:
    """Every problem in a user's augmentation list, each with its fix (empty when it is valid).

    ``spec`` is a list of mappings ``{name: <registry name>, p: <probability>, <param>: <value>}``.
    Checks: the list itself, each entry is a mapping, ``name`` is in :data:`AUGMENTATIONS` (with a
    "did you mean"), ``p`` is given and in [0, 1], each parameter is known to that transform (with
    a "did you mean") and its value is valid; finally albumentations' own checks.
    """
    if not isinstance(spec, (list, tuple)):
        return [f"must be a list of {{name: Transform, p: probability, ...}} entries, got {type(spec).__name__}"]
    problems: list[str] = []
    names = sorted(AUGMENTATIONS)
    for n, entry in enumerate(spec):
        where = f"entry {n}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping like {{name: HorizontalFlip, p: 0.5}}, got {entry!r}")
            continue
        name = entry.get("name")
        if not isinstance(name, str) or name not in AUGMENTATIONS:
            hint = did_you_mean(name, names) if isinstance(name, str) else ""
            what = "missing 'name'" if name is None else f"unknown transform {name!r}{hint}"
            problems.append(f"{where}: {what}; choose from {', '.join(names)}")
            continue
        where = f"entry {n} ({name})"
        registered = AUGMENTATIONS[name]
        entry_problems = []
        if "p" not in entry:
            entry_problems.append(f"{where}: missing 'p' (the probability of applying it, in [0, 1])")
        elif (problem := _num(0, 1)(entry["p"])) is not None:
            entry_problems.append(f"{where}: p {problem}")
        for key, value in entry.items():
            if key in ("name", "p"):
                continue
            if key not in registered.params:
                valid = ", ".join(registered.params) or "none"
                entry_problems.append(
                    f"{where}: unknown parameter {key!r}{did_you_mean(key, list(registered.params))}; "
                    f"valid parameters: {valid}"
                )
            elif (problem := registered.params[key][1](value)) is not None:
                entry_problems.append(f"{where}: {key} {problem}")
        if not entry_problems:
            try:
                _build_one(entry)
            except (ValueError, TypeError) as e:  # albumentations' own validation (pydantic)
                entry_problems.append(f"{where}: rejected by albumentations: {str(e).splitlines()[0]}")
        problems += entry_problems
    return problems


def _build_one(entry: dict[str, Any]) -> A.BasicTransform:
    registered = AUGMENTATIONS[entry["name"]]
    kwargs = {key: default for key, (default, _) in registered.params.items()}
    kwargs.update({k: v for k, v in entry.items() if k not in ("name", "p")})
    return registered.build(p=float(entry["p"]), **kwargs)


def build_augmentation(spec: Optional[Sequence[dict[str, Any]]], seed: Optional[int] = None) -> Optional[A.Compose]:
    """An albumentations ``Compose`` of the listed transforms, applied in order (None for an empty
    list or None).

    Geometric transforms move image and mask together (mask: nearest neighbour, so class indices
    stay class indices; borders reflected, so no artificial edges appear).

    Args:
        spec: see :func:`augmentation_problems`.
        seed: seeds the random generators (see :func:`seed_augmentation`; the training set reseeds
            them per sample).

    Raises:
        ValueError: listing every problem :func:`augmentation_problems` finds.
    """
    if not spec:
        return None
    problems = augmentation_problems(spec)
    if problems:
        raise ValueError("invalid augmentations:\n" + "\n".join(f"  - {p}" for p in problems))
    compose = A.Compose([_build_one(entry) for entry in spec])
    seed_augmentation(compose, seed)
    return compose


def seed_augmentation(compose: A.BaseCompose, seed: int | tuple[int, ...] | None) -> None:
    """Give ``compose`` and every transform in it one shared pair of generators (numpy and python)
    seeded from ``seed`` (an int or a tuple of ints, e.g. (epoch seed, sample index); None: fresh entropy).

    One pair for all: the transforms draw one after another from one stream, so their draws are
    independent. (albumentations' own ``Compose(seed=s)`` seeds every transform with the same ``s``,
    so two transforms of equal ``p`` always fire together, e.g. both flips or neither.) Costs about
    15 µs, against some 250 µs for the default recipe on a 64² tile.
    """
    sequence = np.random.SeedSequence(None if seed is None else np.atleast_1d(np.asarray(seed, np.uint64)).tolist())
    numbers = np.random.default_rng(sequence)
    py = random.Random(int(sequence.generate_state(1, np.uint64)[0]))
    stack: list = [compose]
    while stack:
        transform = stack.pop()
        transform.set_random_state(numbers, py)
        stack += getattr(transform, "transforms", [])
