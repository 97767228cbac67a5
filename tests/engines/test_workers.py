"""NUM_WORKERS changes nothing that is learned. Every random draw of a training
sample (its augmentation) comes from (SEED, fold, epoch, rank, sample index) alone, never from the
loader worker that happens to load it, so 0, 2 or 3 workers give bit-identical batches and weights
on the CPU, and a run resumed with another NUM_WORKERS continues exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import make_trainer, tiny_config, torch_threads
from engines.checkpoint import read_checkpoint
from utils.run_paths import RunDir
from utils.augment import build_augmentation, seed_augmentation
from utils.dataset import make_loader
from utils.util import seed_everything

# three workers on a two-core machine: torch's advice to use fewer is beside the point here
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

#: Dropout on (drawn in the training process), the default augmentations (drawn per sample).
SETTINGS = ["SEG_DROPOUT=0.2", "AUGMENTATIONS=default"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def batches_and_weights(root, workers: int, steps: int = 2):
    """The batches of epoch 1 (seeded as the trainer seeds it) and the weights after ``steps`` of them."""
    trainer = make_trainer(tiny_config(root, *SETTINGS, f"NUM_WORKERS={workers}"), RunDir(root / "run"))
    try:
        trainer.seed_epoch(1)
        batches = list(trainer.train_loader)
        trainer.ddp.train()
        for batch in batches[:steps]:
            trainer.optimise(batch)
        return batches, trainer.step.net.state_dict()
    finally:
        trainer.logger.close()


def test_any_num_workers_draws_the_same_batches_and_learns_the_same_weights(tmp_path):
    # before the fix each worker reseeded the augmentation from its own id: 0 and 2 workers learned
    # different weights (DSC 0.662 vs 0.741 after one epoch of the run)
    reference, weights = batches_and_weights(tmp_path / "w0", 0)
    assert len(reference) == 3
    for workers in (2, 3):
        batches, other = batches_and_weights(tmp_path / f"w{workers}", workers)
        assert [b["id"] for b in batches] == [b["id"] for b in reference]
        for key in ("image", "mask", "label", "fill", "index"):
            assert all(torch.equal(a[key], b[key]) for a, b in zip(reference, batches)), (workers, key)
        assert all(torch.equal(weights[k], other[k]) for k in weights), (workers, [k for k in weights
                                                                                  if not torch.equal(weights[k], other[k])])


def test_a_run_resumed_with_other_num_workers_is_bit_identical(tmp_path):
    straight = make_trainer(tiny_config(tmp_path, *SETTINGS, "NUM_WORKERS=0"), RunDir(tmp_path / "straight"))
    first = make_trainer(tiny_config(tmp_path, *SETTINGS, "NUM_WORKERS=2"), RunDir(tmp_path / "resumed"))
    first.settings.epochs = 1  # stopped after epoch 0 (the schedule stays that of two epochs)
    resumed = None
    try:
        straight.fit()
        first.fit()
        torch.manual_seed(12345)  # whatever the process drew in between must not matter
        resumed = make_trainer(tiny_config(tmp_path, *SETTINGS, "NUM_WORKERS=3"), RunDir(tmp_path / "resumed"))
        resumed.fit()
    finally:
        for trainer in (straight, first, resumed):
            if trainer is not None:
                trainer.logger.close()
    assert resumed.resumed and resumed.start_epoch == 2
    a, b = read_checkpoint(straight.settings.run.last)["model"], read_checkpoint(resumed.settings.run.last)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_transform_draws_its_own_numbers():
    # albumentations' Compose(seed=s) gives every transform the same seed, so HorizontalFlip and
    # VerticalFlip (both p=0.5) flipped together or not at all: half of the flips never happened
    flips = build_augmentation([{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}], seed=0)
    image = np.arange(4, dtype=np.float32).reshape(2, 2, 1)
    seen = set()
    for k in range(64):
        seed_augmentation(flips, (7, k))
        out = flips(image=image)["image"][..., 0]
        seen.add((bool(out[0, 0] in (1, 3)), bool(out[0, 0] in (2, 3))))  # (left-right, up-down)
    assert seen == {(False, False), (True, False), (False, True), (True, True)}


def test_a_sample_draws_the_same_augmentation_wherever_it_is_loaded():
    spec = [{"name": "GaussNoise", "p": 1, "std_range": [0.2, 0.2]}]
    augment = build_augmentation(spec, seed=0)
    image = np.full((8, 8, 1), 0.5, np.float32)

    def draw(seed, k):
        seed_augmentation(augment, (seed, k))
        return augment(image=image)["image"]

    first = draw(3, 5)
    draw(3, 6), draw(9, 5)  # other samples drawn in between (another order, another worker)
    assert np.array_equal(draw(3, 5), first)
    assert not np.array_equal(draw(3, 6), first) and not np.array_equal(draw(4, 5), first)


class _Draws(torch.utils.data.Dataset):
    """One sample: the loader worker's torch seed and a draw from each global generator."""

    def __len__(self):
        return 1

    def __getitem__(self, k):
        return torch.initial_seed(), random.random(), float(np.random.rand()), float(torch.rand(()))


def test_a_loader_worker_is_seeded_by_the_one_seeding_function():
    loader = make_loader(_Draws(), batch_size=1, train=False, num_workers=1, seed=7, distributed=False,
                         pin_memory=False)
    (seed, *drawn), = [[v.item() for v in sample] for sample in loader]
    seed_everything(seed)  # before: python's generator was seeded from seed % 2**32, unlike the others
    assert seed >= 2**32 and drawn == [random.random(), float(np.random.rand()), float(torch.rand(()))]
