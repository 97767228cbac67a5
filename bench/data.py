"""Is the data loader ever the bottleneck? Loader throughput vs one training step's consumption.

On the default synthetic data (or a folder dataset), with the default augmentations, the script
measures in one run:

* ``loader w=N``: tiles/s of the training DataLoader alone (augmentation included) with N worker
  processes, iterating whole epochs after a warm-up epoch (workers persist, so start-up is not
  counted);
* ``step``: tiles/s one training step consumes: forward + backward + AdamW on a fixed batch of
  AuxNet (U-Net depth 4, width 16, classifier head), bf16 autocast and channels_last as the
  trainer's defaults;
* ``loader+step w=N``: both together, as a training epoch runs them.

``loader / step`` above 1 means the loader produces tiles faster than the step eats them; with
``num_workers > 0`` loading also overlaps the step. Also printed: the time to generate the default
synthetic dataset (uncached) and to load it from its cache.

Run:  python bench/data.py [--source synthetic|DATASET_DIR] [--steps 10] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.AuxNet import AuxNet  # noqa: E402
from utils.augment import DEFAULT_AUGMENTATIONS  # noqa: E402
from utils.dataset import build_datasets, make_loader  # noqa: E402
from utils.synthetic import generate_synthetic, load_synthetic  # noqa: E402

INPUT_SIZE = 128
BATCH_SIZES = (8, 16)
WORKERS = (0, 2)


def make_model() -> torch.nn.Module:
    return AuxNet(in_channels=1, seg_classes=1, cls_classes=1, depth=4, base_width=16)


def loader_rate(loader, epochs: int = 2) -> float:
    """Tiles/s of whole epochs, after one warm-up epoch."""
    for _ in loader:
        pass
    count, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch + 1)
        for batch in loader:
            count += batch["image"].shape[0]
    return count / (time.perf_counter() - start)


def train_step(model, optimizer, batch) -> None:
    image = batch["image"].contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(image).seg.float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], batch["mask"].float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def step_rate(batch, steps: int) -> float:
    """Tiles/s of repeated training steps on one fixed batch (median step time)."""
    model = make_model().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer, batch)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, batch)
        times.append(time.perf_counter() - start)
    return batch["image"].shape[0] / statistics.median(times)


def epoch_rate(loader, steps: int) -> float:
    """Tiles/s of loader + training step together, over ``steps`` batches after one warm-up."""
    model = make_model().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    it = iter(loader)
    train_step(model, optimizer, next(it))
    count, start = 0, time.perf_counter()
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        train_step(model, optimizer, batch)
        count += batch["image"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="synthetic", help="'synthetic' or a folder with images/ and masks/")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        generate_synthetic(args.seed, 12, 512)
        generate_s = time.perf_counter() - start
        load_synthetic(tmp / "cache", seed=args.seed, num_images=12, size=512, channels=1, seg_classes=1)
        start = time.perf_counter()
        load_synthetic(tmp / "cache", seed=args.seed, num_images=12, size=512, channels=1, seg_classes=1)
        cached_s = time.perf_counter() - start

        start = time.perf_counter()
        splits = build_datasets(
            args.source, split_file=tmp / "tts.json", cache_dir=tmp / "cache", seed=args.seed,
            input_size=INPUT_SIZE, input_channels=1, seg_classes=1, test_split=0.2, fold=0,
            cross_validation=False, train_composition="full", test_composition="full",
            augmentations=DEFAULT_AUGMENTATIONS, synthetic_images=12, synthetic_size=512,
        )
        build_s = time.perf_counter() - start
        train = splits.train

        print(f"source: {args.source}; {len(train)} training tiles of {INPUT_SIZE}x{INPUT_SIZE}, default augmentations; "
              f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
        print(f"synthetic default (12 x 512^2): generate {generate_s:.2f} s, load from cache {cached_s * 1000:.0f} ms; "
              f"build_datasets({args.source!r}) {build_s:.2f} s\n")
        header = ("| batch | loader w=0 | loader w=2 | step | loader+step w=0 | loader+step w=2 "
                  "| loader w=0 / step | loader w=2 / step |")
        print(header)
        print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
        for batch_size in BATCH_SIZES:
            loaders = {
                w: make_loader(train, batch_size=batch_size, train=True, num_workers=w, seed=args.seed,
                               distributed=False, pin_memory=False)
                for w in WORKERS
            }
            load = {w: loader_rate(loader) for w, loader in loaders.items()}
            step = step_rate(next(iter(loaders[0])), args.steps)
            both = {w: epoch_rate(loader, args.steps) for w, loader in loaders.items()}
            print(f"| {batch_size} | {load[0]:.0f} | {load[2]:.0f} | {step:.1f} | {both[0]:.1f} | {both[2]:.1f} "
                  f"| {load[0] / step:.0f}x | {load[2] / step:.0f}x |")
            del loaders
        print("\n(tiles/s; 'step' = forward + backward + AdamW of AuxNet depth 4 width 16, bf16 autocast)")


if __name__ == "__main__":
    main()
