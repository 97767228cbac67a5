"""The configuration schema: every option with its type, default and one-line doc.

The dataclass is the single source of truth: `configs/config.yaml` repeats each default with the
doc as its comment, and docs/configuration.md (written by
`python -m configs.reference --write`) shows the same doc (tests compare all
three). Choices come from the registries that own them (the model stages, the metric names), so a
new stage or metric appears here without a second list; those modules import no torch, and neither
does this one.
"""

from __future__ import annotations

import dataclasses
import shlex
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import yaml

from model.layer_choices import ACTIVATIONS, DEFAULT_ACTIVATION, DEFAULT_NORM, NORMS
from model.metrics.names import METRIC_NAMES
from model.stages import STAGES, Stage
from utils.augment_presets import AUGMENTATION_PRESETS
from utils.sdf_choices import DISTANCES

ModelName = Literal[tuple(STAGES)]  # type: ignore[valid-type]
Composition = Literal["full", "boundary"]
Distance = Literal[DISTANCES]  # type: ignore[valid-type]
Normalization = Literal["static_max", "dynamic_max", "minmax", "none"]
MetricName = Literal[METRIC_NAMES]  # type: ignore[valid-type]
NormName = Literal[NORMS]  # type: ignore[valid-type]
ActivationName = Literal[ACTIVATIONS]  # type: ignore[valid-type]
AugmentationPreset = Literal[tuple(AUGMENTATION_PRESETS)]  # type: ignore[valid-type]


def opt(default: Any = dataclasses.MISSING, doc: str = "", *, default_factory: Any = dataclasses.MISSING):
    """A Config field with its one-line ``doc`` (kept in the field's metadata)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"doc": doc})


@dataclass
class Config:
    """All run options. Each field's one-line doc is the comment in `configs/config.yaml` and the
    meaning in docs/configuration.md (tests keep the three in step)."""

    # directories
    DATASET_DIR: str = opt(
        "synthetic",
        "folder with images/ and masks/ (same stems), or `synthetic` (built-in, generated from SEED)",
    )
    RESULTS_DIR: str = opt("saved", "runs go to RESULTS_DIR/<EXP_ID>/<RUN_ID>/")
    # dataset
    SEED: int = opt(42, "seeds the split, the synthetic data, weight init and augmentation")
    TRAIN_SET_COMPOSITION: Composition = opt("full", "full | boundary (only tiles that contain a class boundary)")
    TEST_SET_COMPOSITION: Composition = opt("full", "full | boundary")
    TEST_SPLIT: float = opt(0.2, "fraction of images (not tiles) held out for testing")
    CROSS_VALIDATION: bool = opt(False, "train K = round(1/TEST_SPLIT) folds, one after another")
    TEST_IDS: Optional[list[str]] = opt(
        None,
        "image stems that form the test split, e.g. [frame16, frame17] (null = drawn from SEED by TEST_SPLIT)",
    )
    DEFAULT_FOLD: int = opt(0, "fold used when CROSS_VALIDATION is off (0 ... K-1)")
    NUM_WORKERS: int = opt(0, "DataLoader worker processes (0 = load in the training process)")
    TILE_OVERLAP: Optional[int] = opt(
        None,
        "pixels shared by neighbouring tiles (null = 0 when training, INPUT_SIZE/2 when predicting)",
    )
    SYNTHETIC_IMAGES: int = opt(12, "synthetic data: number of large images to generate")
    SYNTHETIC_SIZE: int = opt(512, "synthetic data: side length of each generated image (pixels)")
    AUGMENTATIONS: Union[AugmentationPreset, list[dict]] = opt(
        "default",
        "`default`, `flips` (only the 8 flips and quarter turns), `none`, or a list of {name: Transform, p: prob, <param>: value}",
    )
    # model
    MODEL: ModelName = opt(
        "AuxNet-EDC",
        "AuxNet-EDC | AuxNet-ED | AuxNet-C | AuxNet-D | UNet (what trains: E=encoder, D=decoder, C=classifier head)",
    )
    MODEL_WEIGHTS: Optional[str] = opt(
        None,
        "checkpoint (.pth, suffix optional) to start from; required by AuxNet-C and AuxNet-D",
    )
    INPUT_SIZE: int = opt(128, "tile side length (pixels); divisible by 2^(UNET_DEPTH-1)")
    INPUT_CHANNELS: int = opt(1, "image channels")
    UNET_DEPTH: int = opt(4, "U-Net levels including the bottleneck")
    CONV_DEPTH: int = opt(16, "feature maps of the first level (doubles per level)")
    # the defaults of NORM and ACTIVATION are model.layer_choices's (the network's own defaults too)
    NORM: NormName = opt(DEFAULT_NORM, "batch | instance | group: normalisation in every conv block (group: gcd(8, width) groups)")
    ACTIVATION: ActivationName = opt(DEFAULT_ACTIVATION, "relu | leaky_relu (slope 0.1): activation in every conv block")
    BATCH_SIZE: int = opt(8, "tiles per step and per process")
    # segmentation
    SEG_CLASSES: int = opt(1, "output channels: 1 = binary (sigmoid), >= 2 = classes incl. background (softmax)")
    SEG_DROPOUT: float = opt(0.0, "dropout in encoder and decoder blocks")
    SEG_THRESHOLD: float = opt(0.5, "foreground probability threshold for binary masks")
    # classification
    CLS_CLASSES: int = opt(1, "classifier outputs: 1 = sigmoid, 2 = softmax (\"tile contains a boundary\")")
    CLS_DROPOUT: float = opt(0.3, "dropout before the classifier's linear layer")
    CLS_THRESHOLD: float = opt(0.5, "positive-class probability threshold (CLS_CLASSES = 1)")
    CLS_TRAINS_ENCODER: bool = opt(
        True,
        "the classifier's loss also trains the encoder (false: it does not; better ungated segmentation, worse gating on sparse scenes)",
    )
    # optimiser
    INIT_LR: float = opt(1e-4, "learning rate at the start of the warm-up")
    BASE_LR: float = opt(3e-3, "learning rate reached at the end of the warm-up, then cosine decay to 0")
    L2_DECAY: float = opt(1e-4, "AdamW weight decay (not applied to learnable loss weights)")
    WARMUP_EPOCHS: int = opt(1, "linear warm-up epochs (0 = none)")
    TRAIN_EPOCHS: int = opt(11, "epochs after the warm-up")
    GRAD_CLIP: Optional[float] = opt(None, "max gradient norm per step (null = no clipping)")
    EARLY_STOPPING: Optional[int] = opt(None, "stop after this many epochs without a better EVAL_METRIC (null = never)")
    MIXED_PRECISION: Literal["auto", "bf16", "fp16", "none"] = opt(
        "auto",
        "auto | bf16 | fp16 (CUDA only) | none: autocast for the forward pass (auto: bf16 where native, else fp32)",
    )
    CHANNELS_LAST: Union[bool, Literal["auto", "measure"]] = opt(
        "auto",
        "auto | measure | true | false: channels_last memory format (auto: yes on CPUs with oneDNN, timed on GPUs)",
    )
    COMPILE: bool = opt(False, "torch.compile the network for training (minutes of compiling on first use, cached after; faster steps only in long runs)")
    # signed distance maps
    SDM_KERNEL_SIZE: int = opt(3, "kernel of the cascaded-convolution SDM used for predictions (odd, >= 3)")
    SDM_DISTANCE: Distance = opt("euclidean", "euclidean | manhattan | chebyshev")
    SDM_NORMALIZATION: Normalization = opt("static_max", "static_max | dynamic_max | minmax | none")
    SDM_SCOPE: Literal["tile", "image"] = opt(
        "tile",
        "Boundary loss target distances: tile (within each tile, as the reference code) | image (measured over the whole image: a false positive in an empty tile costs its distance)",
    )
    # loss
    LOSS: str = opt(
        "SoftDICE_BCE",
        "terms joined by `_`: BCE CE wBCE Focal SoftDICE HardDICE IoU GDL MAE cMAE sMAE Boundary wCE clDice",
    )
    INCLUDE_BACKGROUND: bool = opt(
        False,
        "region losses (Dice, IoU, GDL) also score the background (binary heads: the 1-p channel)",
    )
    BATCH_DICE: bool = opt(
        True,
        "region losses (Dice, IoU, GDL): true = one ratio per class over the whole batch | false = one per image and class, averaged (MONAI's DiceLoss; false pixels in a tile without the class cost most)",
    )
    ADAPTIVE_WEIGHTS: Union[bool, Literal["schedule"]] = opt(
        False,
        "false = STATIC_WEIGHTS | true = learnable (uncertainty) weights | schedule = boundary terms by a rising alpha",
    )
    STATIC_WEIGHTS: Optional[list[float]] = opt(None, "one weight per LOSS term (null = all 1.0)")
    CLAMP_DELTA: float = opt(0.1, "cMAE: SDMs are clamped to +-CLAMP_DELTA (in normalised units)")
    SIGMOID_STEEPNESS: float = opt(10.0, "slope of the steep sigmoids in HardDICE and sMAE")
    WCE_W0: float = opt(10.0, "wCE: border weight w0 of the U-Net weight map")
    WCE_SIGMA: float = opt(5.0, "wCE: border width sigma (pixels) of the U-Net weight map")
    WBCE_W0: float = opt(10.0, "wBCE: pixel weight 1 + w0*exp(-sdm^2 / (2 sigma^2)) peaks at 1 + w0 on the boundary")
    WBCE_SIGMA: float = opt(5.0, "wBCE: width sigma (pixels) of the band around the boundary")
    CLDICE_ITERATIONS: int = opt(10, "clDice: erosions of the soft skeleton (>= half the thickest structure, in pixels)")
    FOCAL_GAMMA: float = opt(2.0, "Focal: focusing exponent gamma")
    FOCAL_ALPHA: Optional[float] = opt(
        None,
        "Focal: weight alpha of foreground pixels (background 1 - alpha; null = unweighted)",
    )
    CLS_WEIGHT: float = opt(0.1, "weight of the classifier's loss term (static and schedule weighting; adaptive learns it)")
    SCHEDULE_ALPHA: list[float] = opt(
        default_factory=lambda: [0.01, 0.01, 0.9],
        doc="schedule weighting: alpha start, rise per epoch, maximum (boundary terms x alpha, others x 1-alpha)",
    )
    # evaluation
    SAVE_MODEL: bool = opt(True, "keep best.pth (selected by EVAL_METRIC) beside last.pth")
    EVAL_METRIC: MetricName = opt("DSC", "DSC | IoU | TTR | ASD | AD | HD95 | D95 | CMA")
    CMA_COEFFICIENTS: dict[str, float] = opt(
        default_factory=lambda: {"DSC": 0.5, "TTR": 0.2, "HD95": 0.3},
        doc="weights of the combined score CMA (distances enter as scores in [0, 1])",
    )
    DISTANCE_METRICS: bool = opt(True, "also compute ASD, AD, HD95, D95 each epoch")
    PIXEL_SPACING: Optional[list[float]] = opt(
        None,
        "[row, column] pixel size for distances in physical units (null = pixels)",
    )
    PLOT_EVERY: int = opt(0, "write curves.png and overlays.png every N epochs (0 = only at the end of the run)")
    PLOT_TILES: int = opt(4, "test tiles shown in overlays.png (0 = no overlays)")
    # prediction
    INPUT: Optional[str] = opt(None, "predict: what to segment: an image file, a folder of images, a glob pattern ('scenes/*.tif') or a .txt list of paths")
    OUTPUT: Optional[str] = opt(None, "predict: output folder (null = predict_<n>/ beside the checkpoint)")
    GATING: bool = opt(True, "predict / whole-image eval: decode only the tiles the head says contain a boundary")
    GATE_THRESHOLD: float = opt(
        0.4,
        "gating: a window is decoded where the head's boundary probability exceeds this (lower = safer for faint, thin structures, slower)",
    )
    TTA: Literal["none", "flips", "d4"] = opt(
        "none",
        "predict / whole-image eval: also decode mirrored tiles and average (flips = 4x, d4 = 8x the decoder time)",
    )
    PREDICT_BATCH: Optional[int] = opt(None, "predict / whole-image eval: windows per forward pass (null = chosen from the GPU's free memory; 8 on a CPU)")
    SAVE_PROBABILITIES: bool = opt(False, "predict: also write the class probabilities (<stem>_prob.tif, one channel per class; binary: the foreground's)")
    PROBABILITIES_DTYPE: Literal["uint8", "float32"] = opt(
        "uint8",
        "predict: uint8 (0-255 = probability x 255, opens in image viewers) | float32 (0-1, exact)",
    )
    SAVE_POLYGONS: bool = opt(False, "predict: also write the mask as polygons (<stem>_polygons.geojson, map coordinates when georeferenced)")
    POLYGON_TOLERANCE: float = opt(1.0, "predict: polygon simplification tolerance in pixels (0 = exact pixel edges)")
    # distributed
    GPUs: Optional[list[int]] = opt(None, "GPU indices to run on (train, eval, predict), one process each (null = all visible; [] = CPU)")
    CPU_PROCESSES: int = opt(1, "processes on the CPU for train, eval and predict (gloo DDP when > 1)")
    MASTER_ADDR: str = opt("localhost", "rendezvous address for multi-process training")
    MASTER_PORT: Optional[Union[int, str]] = opt(None, "rendezvous port (null = a free one, chosen at launch)")
    NCCL_P2P_DISABLE: bool = opt(False, "set NCCL_P2P_DISABLE=1 (work-around for GPUs without working peer-to-peer)")
    # logging
    LOG_WANDB: bool = opt(False, "log to Weights & Biases (mode from WANDB_MODE; offline when no API key is set)")
    LOG_LOCAL: bool = opt(True, "write log.jsonl in the run folder")
    EXP_ID: str = opt("", "experiment folder name (\"\" = default)")
    RUN_ID: str = opt("", "run folder name (\"\" = next free run_NNN; an existing run with last.pth is resumed)")

    # ---- derived views (not options)
    @property
    def stage(self) -> Stage:
        """What MODEL trains, whether it has a head, decodes, needs MODEL_WEIGHTS."""
        return STAGES[self.MODEL]

    @property
    def train_overlap(self) -> int:
        """Pixels shared by neighbouring training / evaluation tiles."""
        return 0 if self.TILE_OVERLAP is None else self.TILE_OVERLAP

    @property
    def predict_overlap(self) -> int:
        """Pixels shared by neighbouring prediction windows (half a tile unless TILE_OVERLAP is set)."""
        return self.INPUT_SIZE // 2 if self.TILE_OVERLAP is None else self.TILE_OVERLAP

    @property
    def loss_weighting(self) -> str:
        """ADAPTIVE_WEIGHTS as the loss library names it: static, adaptive or schedule."""
        return {False: "static", True: "adaptive", "schedule": "schedule"}[self.ADAPTIVE_WEIGHTS]

    @property
    def has_head(self) -> bool:
        return self.stage.has_head

    @property
    def trains_classifier(self) -> bool:
        return "C" in self.stage.trains

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
"""Every option by name, in schema order."""

#: The value each option had before it existed: what a saved configuration (a checkpoint's, a run's
#: config.yaml) that lacks the key was made with, whatever the option's default is now. A checkpoint
#: made before NORM and ACTIVATION existed has BatchNorm and ReLU; one made before GATE_THRESHOLD gated at 0.5
#: (the default CLS_THRESHOLD, which decided then). (Saved configurations hold every
#: option of their time, so a later change of a default needs no entry; a new option does whenever
#: its default is not what runs did before it existed.)
LEGACY_VALUES: dict[str, Any] = {"NORM": "batch", "ACTIVATION": "relu", "CLS_TRAINS_ENCODER": True,
                                 "GATE_THRESHOLD": 0.5}


#: Options whose command-line value is kept as typed, not parsed as YAML (``RUN_ID=001`` stays "001").
TEXT_OPTIONS: frozenset[str] = frozenset(
    key for key, tp in typing.get_type_hints(Config).items() if tp in (str, Optional[str])
)


def yaml_text(value: Any) -> str:
    """``value`` as YAML flow text, as a user writes it: ``null``, ``true``, ``.nan``, ``[1.0, 0.5]``,
    ``{DSC: 0.5}`` (Python's ``None``, ``True`` or ``nan`` would be read back as text, or rejected)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31 - 1, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def setting(key: str, value: Any) -> str:
    """``KEY=VALUE`` exactly as it must be typed on the command line to set option ``key`` to
    ``value`` (quoted for the shell where needed), so a message's suggested fix can be pasted as is.

    Text options are taken as typed (see :data:`TEXT_OPTIONS`); every other value is YAML.
    """
    text = value if key in TEXT_OPTIONS and isinstance(value, str) else yaml_text(value)
    return shlex.quote(f"{key}={text}")
