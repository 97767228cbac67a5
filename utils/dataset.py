"""The tile dataset and its loaders: the entry point that turns DATASET_DIR into train and test sets.

Two sources feed the same :class:`TileDataset`:

* ``"synthetic"``: generated from the seed (ellipses and thick lines of varying gray levels on a
  noisy background), cached as ``.npz`` under ``cache_dir``;
* a folder ``DATASET_DIR`` holding ``images/`` and ``masks/`` whose files are matched by stem.

Every image is cut into ``input_size`` tiles (the last tile of a row or column is aligned to the
border, so tiles cover the whole image). A tile's classification label is 1 when its mask contains
a class boundary, i.e. two 4-adjacent pixels of different classes, which for a tile is the same as
"the mask is not constant". Splits are made over *images*, never tiles, so the tiles of one image
are all in train or all in test.

Items are dicts (default collate works)::

    image  float32 (C, H, W), scaled to [0, 1] by the file's dtype range (uint8 / 255, uint16 / 65535)
    mask   int64 (H, W), class indices (binary: {0, 1}; SEG_CLASSES = K >= 2: 0 ... K-1)
    label  int64 (), 1 = the tile's mask contains a class boundary (after augmentation)
    fill   int64 (), the tile's one class when it has no boundary, else -100 (ignored by the loss)
    id     str, "<image id>_y<row>_x<col>", e.g. "07_y0256_x0128"
    index  int64 (), position in the dataset
    sdm    float32 (C, H, W), only with ``scene_sdm``: the exact signed distance map of each
           foreground class measured over the *whole image* and cut to the tile (pixels; see
           :class:`SceneSDM`)

Folder datasets, in short (details in :func:`load_folder`):

* images: PNG, JPEG (Pillow) or TIFF (tifffile); 8/16-bit integer, or float already in [0, 1];
  grayscale or multi-channel, the channel count must equal ``input_channels``;
* masks: one channel of class indices 0 ... K-1, or binary 0/255. When *every* mask holds only the
  values 0 and 255 the dataset is read as binary and 255 becomes class 1 (so the ISBI 2012 EM
  labels, 255 = cell interior, load as they are). Masks must be lossless: a JPEG mask has stray
  values and is reported as such;
* dot-files (``.DS_Store``) are ignored, and so are other non-image files (a README) with a one-line
  notice; a broken link is an error.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from utils.augment import build_augmentation, seed_augmentation
from utils.image_io import (LAZY_CACHE_IMAGES, DatasetError, ImageSet, load_folder, memory_budget, recently_used,
                            to_unit_range)
from utils.sdf import signed_distance_map
from utils.splits import check_contents, check_test_ids, num_folds, resolve_split
from utils.synthetic import load_synthetic
from utils.tiling import boundary_label, fill_label, tile_id, tiles_of
from utils.util import atomic_write, seed_everything

if TYPE_CHECKING:
    import albumentations as A

COMPOSITIONS = ("full", "boundary")
#: Part of the name of :class:`SceneSDM`'s files: raise it when the maps' definition changes, so
#: files of the old definition are not reused.
SCENE_SDM_VERSION = 1
_CACHE_FIX = "free space there, set RESULTS_DIR to a larger disk, or use SDM_SCOPE: tile"


# the dataset
# ---------------------------------------------------------------------------------------------
class SceneSDM:
    """Signed distance maps of whole images, for losses that measure distances beyond a tile.

    A tile's own SDM knows only the structures inside the tile: a class absent from the tile has
    no map at all, so a false positive there costs a distance loss nothing, however far it lies
    from every true structure. Measured over the whole image, each pixel gets its true distance
    to the nearest boundary of its class (the setting of the boundary loss's paper, which trains
    on whole slices). The maps follow :func:`utils.sdf.signed_distance_map`, method ``exact``, in
    pixels (positive outside, 1 next to the object; 0 on its inner edge, negative further in);
    a class absent from (or covering) the whole image has a zero map.

    :meth:`prepare` computes every training image's maps once, when the training set is built (in
    the training process, so loader workers, which restart each epoch, inherit them instead of
    computing them again). They take 4 bytes per pixel and foreground class. They stay in memory
    when the images are in memory and images and maps together fit the share of RAM a decoded
    dataset may take (:data:`utils.image_io.MEMORY_CACHE_FRACTION`). Otherwise (a large dataset)
    each image's maps are written once to ``folder`` as ``.npy``, named by a hash of the mask and
    the options, so a later run, or another rank, reuses them (a file of the wrong shape or a
    truncated one is made again); they are then read through memory maps (the last
    :data:`utils.image_io.LAZY_CACHE_IMAGES` images' stay open), so a process holds only the pages
    of the tiles it reads and a loader worker receives the file names, not the maps.

    Under geometric augmentation the tile's maps move with its mask (nearest neighbour): flips and
    quarter turns keep them exact; scaling and warps carry the distances without rescaling them.

    Args:
        seg_classes: SEG_CLASSES (1 = binary: one map, of class 1; K >= 2: classes 1 ... K-1).
        distance: SDM_DISTANCE.
        folder: where maps that do not stay in memory are written (None: always in memory).
    """

    def __init__(self, seg_classes: int, distance: str = "euclidean", folder: Optional[Path] = None):
        self.classes, self.distance = max(int(seg_classes), 2), distance
        self.folder = None if folder is None else Path(folder)
        self._maps: dict[int, np.ndarray] = {}  # in memory
        self._files: dict[int, Path] = {}  # on disk
        # this process's memory maps of recently read files (each holds a file descriptor), never pickled
        self._mapped: OrderedDict[int, np.ndarray] = OrderedDict()

    def prepare(self, images: ImageSet, indices: Sequence[int]) -> None:
        """Compute the maps of images ``indices`` of ``images`` (see the class docstring for where they go).

        Raises:
            DatasetError: the maps go to ``folder`` and it cannot hold them (not writable, or full).
        """
        indices = sorted(set(int(i) for i in indices))
        size = 4 * (self.classes - 1) * sum(images.entries[i].height * images.entries[i].width for i in indices)
        held = sum(a.nbytes + m.nbytes for a, m in images.arrays) if images.in_memory else 0
        on_disk = self.folder is not None and (not images.in_memory or held + size > memory_budget())
        todo = [i for i in indices if i not in self._maps and i not in self._files]
        if on_disk and todo:
            self._check_folder(size)
        for i in todo:
            self._compute(images, i, on_disk)

    def of(self, images: ImageSet, index: int) -> np.ndarray:
        """float32 (C, H, W) maps of image ``index`` of ``images`` (computed here if not prepared)."""
        if index in self._maps:
            return self._maps[index]
        if index not in self._files:
            self._compute(images, index, on_disk=False)
            return self._maps[index]
        return recently_used(self._mapped, index, lambda i: np.load(self._files[i], mmap_mode="r"), LAZY_CACHE_IMAGES)

    def _check_folder(self, size: int) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.folder).free
        except OSError as e:
            raise DatasetError(f"SDM_SCOPE=image: cannot create {self.folder} for the whole-image distance maps "
                               f"({e.strerror or e}); {_CACHE_FIX}") from e
        if free < size:
            raise DatasetError(f"SDM_SCOPE=image: the whole-image distance maps of the training images need "
                               f"{size / 2**30:.1f} GiB in {self.folder}, which has {free / 2**30:.1f} GiB free; "
                               f"{_CACHE_FIX}")

    def _compute(self, images: ImageSet, index: int, on_disk: bool) -> None:
        mask = np.ascontiguousarray(images.get(index)[1])
        shape = (self.classes - 1, *mask.shape)
        path = None
        if on_disk:
            options = f"v{SCENE_SDM_VERSION} {self.classes} {self.distance} {mask.shape} {mask.dtype}"
            key = hashlib.sha1(options.encode())
            key.update(memoryview(mask).cast("B"))
            path = self.folder / f"scene_sdm_{key.hexdigest()[:20]}.npy"
            if _npy_holds(path, shape):  # made by an earlier run or another rank from the same mask
                self._files[index] = path
                return
        labels = torch.from_numpy(mask.astype(np.int64))[None]
        maps = signed_distance_map(labels, distance=self.distance, method="exact",
                                   num_classes=self.classes)[0, 1:].numpy().astype(np.float32)
        if path is None:
            self._maps[index] = maps
            return
        try:
            atomic_write(path, lambda fh: np.save(fh, maps))
        except OSError as e:
            raise DatasetError(f"SDM_SCOPE=image: cannot write the distance maps of image "
                               f"{images.entries[index].id!r} to {path} ({e.strerror or e}); {_CACHE_FIX}") from e
        self._files[index] = path

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mapped": OrderedDict()}  # workers open their own memory maps


def _npy_holds(path: Path, shape: tuple[int, ...]) -> bool:
    """True when ``path`` is a float32 ``.npy`` of ``shape`` (a complete file: its size is checked too)."""
    try:
        maps = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return maps.dtype == np.float32 and maps.shape == shape


class TileDataset(Dataset):
    """Tiles of the images of an :class:`ImageSet`, optionally augmented.

    Args:
        images: the images and masks.
        tiles: ``(image index, y, x)`` of each tile's top-left corner.
        input_size: tile side.
        augment: a Compose from :func:`build_augmentation`, or None.
        scene_sdm: add each tile's cut of its image's :class:`SceneSDM` maps as ``sdm``.

    Attributes:
        ids: tile ids, ``"<image id>_y<row>_x<col>"``.
        labels: int64 (N,), each tile's boundary label before augmentation.
    """

    def __init__(self, images: ImageSet, tiles: Sequence[tuple[int, int, int]], input_size: int,
                 augment: Optional[A.Compose] = None, scene_sdm: Optional[SceneSDM] = None):
        self.images = images
        self.scene_sdm = scene_sdm
        self.tiles = [tuple(map(int, t)) for t in tiles]
        if scene_sdm is not None:  # here, before loader workers exist: once a run, not once a worker and epoch
            scene_sdm.prepare(images, [i for i, _, _ in self.tiles])
        self.input_size = input_size
        self.augment = augment
        self.seed = 0  # of the augmentation, see reseed()
        self.ids = [tile_id(images.entries[i].id, y, x) for i, y, x in self.tiles]
        self.labels = np.array([boundary_label(self._raw(k)[1]) for k in range(len(self.tiles))], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def image_ids(self) -> list[str]:
        """Ids of the images this dataset's tiles come from, sorted."""
        return sorted({self.images.entries[i].id for i, _, _ in self.tiles})

    def _raw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        i, y, x = self.tiles[k]
        image, mask = self.images.get(i)
        s = self.input_size
        return image[y:y + s, x:x + s], mask[y:y + s, x:x + s]

    def reseed(self, seed: int) -> None:
        """Set the seed of this epoch's augmentation (the trainer's epoch seed, from SEED, fold,
        epoch and rank): sample ``k`` is augmented from (``seed``, ``k``) alone (see
        :meth:`__getitem__`), so which loader worker loads it, and how many there are, changes nothing.
        Loader workers copy the dataset when an epoch starts, so they take the seed set before it."""
        self.seed = int(seed)

    def __getitem__(self, k: int) -> dict[str, Any]:
        raw_image, mask = self._raw(k)
        i, y, x = self.tiles[k]
        entry = self.images.entries[i]
        image = to_unit_range(raw_image, entry.offset, entry.scale)
        sdm = None
        if self.scene_sdm is not None:
            s = self.input_size
            sdm = list(self.scene_sdm.of(self.images, i)[:, y:y + s, x:x + s])  # views: copied once, by np.stack below
        if self.augment is not None:
            seed_augmentation(self.augment, (self.seed, k))
            out = self.augment(image=image, mask=mask, **({"masks": sdm} if sdm is not None else {}))
            image = np.clip(out["image"], 0.0, 1.0, dtype=np.float32)
            mask = out["mask"]
            sdm = out.get("masks", sdm)
            if image.ndim == 2:  # some transforms drop a single channel axis
                image = image[..., None]
        extra = {} if sdm is None else {"sdm": torch.from_numpy(np.stack(sdm).astype(np.float32, copy=False))}
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "label": torch.tensor(boundary_label(mask), dtype=torch.int64),
            "fill": torch.tensor(fill_label(mask), dtype=torch.int64),
            "id": self.ids[k],
            "index": torch.tensor(k, dtype=torch.int64),
            **extra,
        }


@dataclass
class Splits:
    """Train and test datasets of one fold, and which images went where."""

    train: TileDataset
    test: TileDataset
    train_ids: list[str]
    test_ids: list[str]


def build_datasets(
    source: str,
    *,
    split_file: Path,
    cache_dir: Path,
    seed: int,
    input_size: int,
    input_channels: int,
    seg_classes: int,
    test_split: float,
    fold: int,
    cross_validation: bool,
    train_composition: str,
    test_composition: str,
    tile_overlap: int = 0,
    augmentations: Optional[list[dict[str, Any]]],
    synthetic_images: int,
    synthetic_size: int,
    test_ids: Optional[Sequence[str]] = None,
    fixed_test_ids: Optional[Sequence[str]] = None,
    hashes: Optional[Mapping[str, str]] = None,
    scene_sdm: Optional[SceneSDM] = None,
) -> Splits:
    """Load a dataset, split its images into folds and build the train/test tile datasets of ``fold``.

    Args:
        source: ``"synthetic"`` or a folder with ``images/`` and ``masks/``.
        split_file: the run's ``tts.json``; written if absent, reused (and checked) if present.
        cache_dir: where the synthetic data is cached.
        seed: seeds the synthetic data, the split and the augmentation.
        input_size: tile side in pixels.
        input_channels: image channels (checked against the files).
        seg_classes: model output channels: 1 = binary, >= 2 = classes incl. background.
        test_split: K = round(1 / test_split) folds; each fold's test set is about 1/K of the images.
        fold: which fold's test set to hold out (0 ... K-1).
        cross_validation: recorded in the split file (the caller loops over the folds).
        train_composition, test_composition: ``"full"`` or ``"boundary"`` (only tiles whose mask
            contains a class boundary, judged before augmentation).
        tile_overlap: pixels shared by neighbouring tiles.
        augmentations: transforms for the training set (see :func:`build_augmentation`), or None.
        synthetic_images, synthetic_size: number and side of the generated images.
        test_ids: the test images, given (a checkpoint's own split): ``split_file`` is then neither
            read nor written, and every other image is a training image.
        fixed_test_ids: the test images the user chose (TEST_IDS): the one split, recorded in
            ``split_file`` instead of K drawn folds (``fold`` must be 0).
        hashes: with ``test_ids``, the content hashes stored with them (None: a checkpoint made before
            hashes were recorded); an image whose file changed since is refused (:func:`check_contents`).
        scene_sdm: whole-image distance maps for the training tiles (``sdm``), or None.

    Returns:
        :class:`Splits`.

    Raises:
        ValueError: an argument out of range (named, with the valid values).
        DatasetError: the files or the split file are unusable (every problem listed).
    """
    for name, value in (("train_composition", train_composition), ("test_composition", test_composition)):
        if value not in COMPOSITIONS:
            raise ValueError(f"{name}={value!r} is not one of {list(COMPOSITIONS)}")
    if input_size < 1:
        raise ValueError(f"input_size={input_size} must be >= 1")
    if input_channels < 1:
        raise ValueError(f"input_channels={input_channels} must be >= 1")
    if seg_classes < 1:
        raise ValueError(f"seg_classes={seg_classes} must be >= 1")
    if not 0 <= tile_overlap < input_size:
        raise ValueError(f"tile_overlap={tile_overlap} must be in [0, input_size={input_size})")
    k = num_folds(test_split)
    if k < 2:
        raise ValueError(f"test_split={test_split} gives K=round(1/test_split)={k} folds: use test_split <= 0.5")
    if not 0 <= fold < k:
        raise ValueError(f"fold={fold} does not exist: test_split={test_split} gives folds 0..{k - 1}")

    if source == "synthetic":
        if synthetic_size < input_size:
            raise ValueError(f"synthetic_size={synthetic_size} is smaller than input_size={input_size}")
        if synthetic_images < k:
            raise ValueError(
                f"synthetic_images={synthetic_images} is fewer than the K={k} folds of test_split={test_split}"
            )
        images = load_synthetic(cache_dir, seed=seed, num_images=synthetic_images, size=synthetic_size,
                                channels=input_channels, seg_classes=seg_classes)
    else:
        root = Path(source)
        if not root.is_dir():
            raise DatasetError(
                f"dataset folder {source!r} does not exist: give a folder with images/ and masks/, or 'synthetic'"
            )
        images = load_folder(root, input_channels=input_channels, seg_classes=seg_classes, input_size=input_size)

    if test_ids is None:
        if fixed_test_ids is not None:
            check_test_ids(fixed_test_ids, images.ids)
        folds = resolve_split(split_file, images.ids, seed=seed, k=k,
                              source=source if source == "synthetic" else str(Path(source).resolve()),
                              cross_validation=cross_validation, images=images, test_ids=fixed_test_ids)
        test_ids = folds[fold]
    else:
        unknown = sorted(set(test_ids) - set(images.ids))
        if unknown:
            raise DatasetError(f"{len(unknown)} test image(s) of the checkpoint's split are not in the dataset "
                               f"({unknown[:5]}): give the DATASET_DIR it was trained on")
        check_contents(hashes, images, recorder="checkpoint's split",
                       fix="Restore the original files, or evaluate the checkpoint on the data it was trained on")
    held_out = set(test_ids)
    index = {image_id: i for i, image_id in enumerate(images.ids)}
    train_ids = [i for i in images.ids if i not in held_out]

    def dataset(ids: list[str], composition: str, augment: Optional[A.Compose], which: str,
                sdm: Optional[SceneSDM] = None) -> TileDataset:
        tiles = tiles_of(images, [index[i] for i in ids], input_size, tile_overlap)
        ds = TileDataset(images, tiles, input_size, augment, sdm)
        if composition == "boundary":
            keep = np.flatnonzero(ds.labels == 1)
            if keep.size == 0:
                raise DatasetError(
                    f"the {which} set of fold {fold} has no tile with a class boundary: "
                    f"use {which.upper()}_SET_COMPOSITION=full"
                )
            ds = TileDataset(images, [ds.tiles[j] for j in keep], input_size, augment, sdm)
        return ds

    augment = build_augmentation(augmentations, seed=seed) if augmentations else None
    return Splits(
        train=dataset(train_ids, train_composition, augment, "train", scene_sdm),
        test=dataset(list(test_ids), test_composition, None, "test"),
        train_ids=train_ids,
        test_ids=list(test_ids),
    )


# loaders
# ---------------------------------------------------------------------------------------------
class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, reproducible from ``seed + epoch`` (like DistributedSampler,
    for one process). Call ``set_epoch`` before each epoch, or every epoch repeats the same order."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order, without padding, so across ranks every sample
    is evaluated exactly once (ranks may get one sample more or less)."""

    def __init__(self, length: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def _seed_worker(worker_id: int) -> None:
    """Seed a DataLoader worker's global python, numpy and torch generators from the loader's
    generator (``torch.initial_seed()`` is already ``base_seed + worker_id``), so that a draw from
    them would at least be reproducible. :class:`TileDataset` draws from none of them: its
    augmentation is seeded per sample (see :meth:`TileDataset.reseed`), whichever worker loads the sample."""
    seed_everything(torch.initial_seed())


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    num_workers: int,
    seed: int,
    distributed: bool,
    pin_memory: bool,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> DataLoader:
    """A DataLoader for training (shuffled) or evaluation (ordered).

    Training: a fresh permutation per epoch from ``seed`` (``DistributedSampler`` when
    distributed); both samplers have ``set_epoch``, which the trainer calls each epoch. The last
    batch is dropped only when it would hold a single tile (BatchNorm statistics of one sample
    are noise). Evaluation: in order; when distributed, rank ``r`` gets indices ``r::world`` with
    no padding, so no sample is counted twice. A training sample's augmentation is drawn from the
    dataset's seed (``seed`` and the rank here; the trainer's epoch seed each epoch) and its index
    alone, so ``num_workers`` changes no batch (see :meth:`TileDataset.reseed`); training workers
    restart each epoch so that they copy the new seed, evaluation workers persist.

    Args:
        dataset: a map-style dataset (e.g. :class:`TileDataset`).
        batch_size: samples per batch and per process.
        train: training (shuffle) or evaluation (ordered) loader.
        num_workers: worker processes (0 = load in this process).
        seed: seeds the shuffling and the workers' random generators.
        distributed: shard across the processes of the initialised process group.
        pin_memory: page-locked batches (useful with CUDA).
        rank, world_size: this process's place; default: from ``torch.distributed``.

    Raises:
        ValueError: ``batch_size < 1`` or ``num_workers < 0``.
        DatasetError: a training set that leaves no batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    if distributed:
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    else:
        rank, world_size = 0, 1
    drop_last = False
    if train:
        sampler: Sampler[int] = (
            DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
            if distributed else EpochShuffleSampler(len(dataset), seed)
        )
        per_process = len(sampler)
        drop_last = batch_size > 1 and per_process % batch_size == 1
        if per_process == 0 or (drop_last and per_process == 1):
            raise DatasetError(
                f"the training set has {len(dataset)} tile(s), {per_process} per process: too few to train on "
                "(add images, lower TEST_SPLIT or use TRAIN_SET_COMPOSITION=full)"
            )
        # Each rank draws other augmentations (the trainer reseeds per epoch, from the rank too).
        if hasattr(dataset, "reseed"):
            dataset.reseed(seed + 1_000_003 * rank)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    generator = torch.Generator()
    generator.manual_seed(seed + 1_000_003 * rank)  # the workers' base seed, different per rank
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        # Training workers start afresh each epoch with a copy of the dataset, and so of the seed the
        # trainer set for the epoch: a resumed run then draws the augmentations of an uninterrupted one.
        persistent_workers=num_workers > 0 and not train,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
    )
