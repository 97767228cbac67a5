"""Benchmark: whole-image prediction -- our sliding window, MONAI's, and gated -- on a sparse scene.

Part 1 (one run, side by side, on one synthetic scene of ``--size`` px a side, default 4096):

* (a) ``plain``  -- :class:`engines.sliding_window.Predictor`, ``gating=False``;
* (b) ``monai``  -- ``monai.inferers.sliding_window_inference(mode="gaussian", sigma_scale=0.125)``
  with the same network (encoder + decoder, sigmoid / softmax probabilities, the checkpoint's
  autocast precision and memory format) on the same normalised image;
* (c) ``gated``  -- :class:`~engines.sliding_window.Predictor`, ``gating=True`` at the checkpoint's
  GATE_THRESHOLD (0.4 for a new one; a checkout from before the option gates at CLS_THRESHOLD 0.5).

All three use 128-px windows (the checkpoint's INPUT_SIZE), 64 px overlap and 16 windows per
forward pass (PREDICT_BATCH), on ``--device`` (``cpu``, ``cuda`` or ``auto``: a GPU where torch sees one).
``--old-code DIR`` adds the rows (a0) and (c0): plain and gated prediction by another checkout of
the project (e.g. ``git archive 93649e8 | tar -x -C DIR``), run by that checkout's own bench worker
(on the CPU) with the same weights and scene, so an old and a new predictor are compared back to
back. With ``(size - tile)`` divisible by the step (4096 is), MONAI's windows start exactly
where :func:`utils.tiling.window_starts` puts ours, so (a) and (b) must agree to float rounding.
Each configuration runs in a fresh interpreter (so one's memory peak does not bleed into the next):
it loads the model and the image, warms the network up on one batch, then predicts the whole scene.
Reported per configuration:

* wall and CPU seconds of the prediction call (ours streams its finished rows to a ``.npy`` on
  disk as they come, as ``main.py predict`` streams them to its writers; MONAI returns one array);
* windows total / decoded / gated off, and windows per second (windows / wall);
* on a GPU, the device memory peak (``torch.cuda.max_memory_allocated``);
* Dice and HD95 (pixels) of the thresholded probabilities against the ground truth over the WHOLE
  scene (:class:`model.metrics.SegmentationMetrics`, computed in this parent process);
* peak RSS of the worker (``VmHWM``; :func:`_status_mib` says why not ``ru_maxrss``), and its growth
  over the RSS just before predicting (model, image and warm-up already in memory): what the
  prediction itself holds;
* where the time went: encoder, decoder and heads (timed around the network's ``encode`` /
  ``decode`` / ``classify``), and the rest (reading and normalising windows, Gaussian blending,
  MONAI's aggregation, writing).

Part 2: a ``--tiff-size`` (default 8192) px scene written band by band as a tiled, zlib-compressed
uint8 TIFF, predicted by ``python main.py predict`` (gated, same overlap and batch) in a subprocess
whose wall time, CPU time and peak RSS (``/usr/bin/time -v``; without it, ``ru_maxrss`` of the
children of a small wrapper process) are reported.

Ratios and goals are printed under the table. Beside the measured gated speed-up comes one that
does not drift with other processes' load: the speed-up (c) would have at (a)'s measured
per-window encoder and decoder cost (windows counted per part: with gating, the heads see only the
cells of :class:`engines.sliding_window.GatePlan`, so the encoder runs on far fewer windows than (a)).

Last, the network's arithmetic rate (FLOPs per window and per second of its encoder and decoder,
as the predictor runs it) beside that of one large 3×3 convolution on the same device in the same
precision: how much of what this device does on convolutions the network reaches. Near 100 %,
prediction is bound by the convolutions' arithmetic, and only fewer FLOPs would make it faster.

Threads: ``--threads N`` sets OMP_NUM_THREADS for every subprocess (training, workers, the CLI).
On a CPU shared with other processes, torch's default of one thread per core made every op wait
at an OpenMP barrier for a descheduled thread: 2 threads ran 5x slower than 1 here, and far more
so for small batches (the gated decoder), which distorts every ratio. Use ``--threads 1`` there.

The scene: the built-in synthetic data's recipe (:mod:`utils.synthetic`: its ellipse and line
helpers, object sizes and gray levels, blur σ = 1, Gaussian noise σ in [0.07, 0.12], uint8), with a
few clusters of objects on a big empty background, so that most windows hold a single class. It
is rendered in 512-px square blocks from global coordinates (objects crossing a block border are
drawn in every block they touch; the blur reads a 4-px margin), so a scene of any size needs
memory for one block only. The background clutter is a sum of plane waves (96-384 px
wavelength, about the feature size of the training clutter) instead of the training data's upsampled
coarse grid, because waves can be evaluated block by block.

Weights: a short ``python main.py`` training run (default AuxNet-EDC, 128 tiles, ``--epochs``
epochs after the warm-up) into ``--workdir``, or ``--weights PATH``.

Usage:
    python bench/inference.py                          # train, then both parts
    python bench/inference.py --threads 1              # the same on a CPU shared with other processes
    python bench/inference.py --weights /tmp/bench_inf/w/run_001/best.pth
    python bench/inference.py --weights W --size 1024 --tiff-size 2048    # a quick check
    python bench/inference.py --device cuda --size 8192 --tiff-size 0      # on a GPU
    python bench/inference.py --weights W --old-code /tmp/devpred-old --size 1024 --tiff-size 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.isolated import report, spawn  # noqa: E402

from utils.synthetic import SYNTHETIC_CLASSES, _draw_ellipse, _draw_line  # noqa: E402
from utils.tiling import window_starts  # noqa: E402

TILE, OVERLAP, BATCH, SIGMA_SCALE, CLS_THRESHOLD = 128, 64, 16, 0.125, 0.5
MODES = ("plain", "monai", "gated")
OLD_MODES = ("old-plain", "old-gated")  # --old-code: another checkout's predictor, plain and gated
LABELS = {"plain": "(a) ours, plain", "monai": "(b) MONAI sliding_window_inference", "gated": "(c) ours, gated",
          "old-plain": "(a0) --old-code, plain", "old-gated": "(c0) --old-code, gated"}

# Scene: square blocks rendered one at a time (also the TIFF's tile), with a margin for the blur.
BLOCK, BLUR_SIGMA, BLUR_MARGIN = 512, 1.0, 4
# Sparse layout: clusters per 4096^2 px (scaled with the area), objects per cluster, and the
# spread (px, one sigma) of a cluster's objects around its centre.
CLUSTERS_PER_4K, OBJECTS_PER_CLUSTER, CLUSTER_SPREAD = 8, 30, 150
WAVES, WAVE_AMPLITUDE, WAVELENGTHS = 16, 0.0125, (96.0, 384.0)
SINGLE_CLASS_GOAL = 0.70

# Goals printed beside the measurements.
GOAL_SPEED_VS_MONAI = 1.0     # (b) time / (a) time >= this
GOAL_MAX_DIFF = 1e-4          # max |p(a) - p(b)|
GOAL_GATED_SPEEDUP = 2.5      # (a) time / (c) time >= this
GOAL_DICE_LOSS = 0.005        # Dice(a) - Dice(c) <= this
GOAL_CLI_RSS_GIB = 1.5        # peak RSS of `main.py predict` on the TIFF scene
GOAL_SPEED_VS_OLD = 1.3       # windows/s of ours / of --old-code (the CPU goal)


# --------------------------------------------------------------------------------------------------
# The sparse synthetic scene

@dataclass(frozen=True)
class Scene:
    """Everything that defines a scene; pixels come from :func:`render_block`."""

    size: int
    seed: int
    level: float              # background gray level
    ramp: tuple[float, float]  # illumination ramp (amplitude, angle) across the whole scene
    waves: np.ndarray         # (WAVES, 4): amplitude, ky, kx (rad/px), phase
    noise_sigma: float
    objects: list             # ("ellipse" | "line", args of the drawing helper after (scene, classes))
    boxes: np.ndarray         # (n, 4) int: y0, y1, x0, x1 that hold each object


def make_scene(size: int, seed: int) -> Scene:
    """A scene of ``size``² px: the synthetic recipe's objects in a few clusters on an empty field."""
    rng = np.random.default_rng([20240, seed, size])
    angles = rng.uniform(0, 2 * math.pi, WAVES)
    k = 2 * math.pi / rng.uniform(*WAVELENGTHS, WAVES)
    waves = np.stack([np.full(WAVES, WAVE_AMPLITUDE), k * np.sin(angles), k * np.cos(angles),
                      rng.uniform(0, 2 * math.pi, WAVES)], axis=1)
    level, ramp = rng.uniform(0.15, 0.35), (rng.uniform(0, 0.15), rng.uniform(0, 2 * math.pi))
    n_clusters = max(1, round(CLUSTERS_PER_4K * (size / 4096) ** 2))
    centres = rng.uniform(0.1 * size, 0.9 * size, (n_clusters, 2))
    objects, boxes = [], []
    for centre in centres:
        for _ in range(OBJECTS_PER_CLUSTER):  # sizes and levels as utils.synthetic._synthetic_scene draws them
            cy, cx = centre + rng.normal(0, CLUSTER_SPREAD, 2)
            gray = rng.uniform(0.5, 0.9)
            if rng.random() < 0.6:
                a = rng.uniform(14, 40)
                b = a * rng.uniform(0.6, 1.0)
                objects.append(("ellipse", (cy, cx, a, b, rng.uniform(0, math.pi), gray, SYNTHETIC_CLASSES["ellipse"])))
                reach = a + 2
            else:
                length, theta, width = rng.uniform(60, 200), rng.uniform(0, math.pi), rng.uniform(6, 12)
                objects.append(("line", (cy, cx, length, theta, width, gray, SYNTHETIC_CLASSES["line"])))
                reach = length / 2 + width
            boxes.append((int(cy - reach), int(math.ceil(cy + reach)), int(cx - reach), int(math.ceil(cx + reach))))
    return Scene(size, seed, level, ramp, waves, rng.uniform(0.07, 0.12), objects, np.array(boxes, dtype=np.int64))


def _background(scene: Scene, oy: int, ox: int, side: int) -> np.ndarray:
    """(side, side) float32 background from global pixel (oy, ox): level, ramp and waves."""
    y = np.arange(oy, oy + side, dtype=np.float64)[:, None]
    x = np.arange(ox, ox + side, dtype=np.float64)[None, :]
    amp, angle = scene.ramp
    out = scene.level + amp * (math.cos(angle) * x / scene.size + math.sin(angle) * y / scene.size - 0.5)
    for a, ky, kx, phase in scene.waves:  # cos(ky y + kx x + phase), separably
        out = out + a * (np.cos(ky * y + phase) * np.cos(kx * x) - np.sin(ky * y + phase) * np.sin(kx * x))
    return out.astype(np.float32)


def render_block(scene: Scene, y0: int, x0: int) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 image and the class map (0 background, 1 line, 2 ellipse) of the block at (y0, x0),
    clipped to the scene (at most BLOCK x BLOCK)."""
    m, side = BLUR_MARGIN, BLOCK + 2 * BLUR_MARGIN
    oy, ox = y0 - m, x0 - m
    canvas = _background(scene, oy, ox, side)
    classes = np.zeros((side, side), np.uint8)
    b = scene.boxes
    hits = np.flatnonzero((b[:, 1] >= oy) & (b[:, 0] < oy + side) & (b[:, 3] >= ox) & (b[:, 2] < ox + side))
    for i in hits:  # in list order: later objects cover earlier ones, as in the training data
        kind, (cy, cx, *rest) = scene.objects[i]
        draw = _draw_ellipse if kind == "ellipse" else _draw_line
        draw(canvas, classes, cy - oy, cx - ox, *rest)
    canvas = cv2.GaussianBlur(canvas, (0, 0), BLUR_SIGMA)
    h, w = min(BLOCK, scene.size - y0), min(BLOCK, scene.size - x0)
    noise = np.random.default_rng([scene.seed, y0, x0]).normal(0, scene.noise_sigma, (h, w)).astype(np.float32)
    image = np.clip(np.rint((canvas[m:m + h, m:m + w] + noise) * 255), 0, 255).astype(np.uint8)
    return image, classes[m:m + h, m:m + w]


def render_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The whole scene: image (H, W) uint8 and classes (H, W) uint8."""
    image = np.empty((scene.size, scene.size), np.uint8)
    classes = np.empty((scene.size, scene.size), np.uint8)
    for y0 in range(0, scene.size, BLOCK):
        for x0 in range(0, scene.size, BLOCK):
            img, cls = render_block(scene, y0, x0)
            image[y0:y0 + img.shape[0], x0:x0 + img.shape[1]] = img
            classes[y0:y0 + img.shape[0], x0:x0 + img.shape[1]] = cls
    return image, classes


def write_tiff(scene: Scene, path: Path) -> None:
    """The scene as a tiled (BLOCK²), zlib-compressed uint8 TIFF, rendered one tile at a time."""
    import tifffile

    def tiles() -> Iterator[np.ndarray]:
        for y0 in range(0, scene.size, BLOCK):
            for x0 in range(0, scene.size, BLOCK):
                img, _ = render_block(scene, y0, x0)
                tile = np.zeros((BLOCK, BLOCK), np.uint8)  # edge tiles are padded to the tile shape
                tile[:img.shape[0], :img.shape[1]] = img
                yield tile

    tifffile.imwrite(path, tiles(), shape=(scene.size, scene.size), dtype=np.uint8, tile=(BLOCK, BLOCK),
                     compression="zlib", bigtiff=scene.size ** 2 > 2**31)


def single_class_fraction(truth: np.ndarray, tile: int, step: int) -> tuple[int, int]:
    """(single-class windows, windows) of the prediction windows over a label map."""
    ys, xs = window_starts(truth.shape[0], tile, step), window_starts(truth.shape[1], tile, step)
    single = sum(int(truth[y:y + tile, x:x + tile].min() == truth[y:y + tile, x:x + tile].max())
                 for y in ys for x in xs)
    return single, len(ys) * len(xs)


# --------------------------------------------------------------------------------------------------
# Worker side: one configuration per fresh process.

def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process in MiB, from /proc/self/status.

    The peak is VmHWM, not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux a spawned process's
    ru_maxrss starts from its parent's peak (the kernel carries the forking process's high-water mark
    across ``execve``), so a worker of a parent that once held 800 MiB reports >= 800 MiB. VmHWM
    belongs to the worker's own address space, which ``execve`` made fresh.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (this bench measures memory on Linux)")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _instrument(net, seconds: dict, windows: dict) -> None:
    """Time every call of ``net.encode`` / ``decode`` / ``classify`` into ``seconds`` (CPU: no sync
    needed), and count the windows each saw into ``windows``."""
    for name in ("encode", "decode", "classify"):
        original = getattr(net, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_name] += time.perf_counter() - start
                windows[_name] += len(args[-1])  # the input, or the bottleneck

        setattr(net, name, timed)


def _open_npy(path: Path, shape: tuple[int, ...]):
    """A file to stream a C-ordered float32 array of ``shape`` into, header written."""
    fh = open(path, "wb")
    np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return fh


def run_throughput(job: dict) -> dict:
    """How fast the network itself runs beside the fastest this device runs a convolution: the
    predictor's network (its inference copy, the checkpoint's precision and memory format) on
    BATCH windows, encoder and decoder, against one large 3×3 convolution (256 → 256 channels,
    8×64²) in the same precision and format. FLOPs by ``torch.utils.flop_counter`` (2 per
    multiply-add). Best of 6 calls each, after a warm-up."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from engines.forward import autocast_for, image_to

    checkpoint, net, predictor = _predictor(job, gating=False)
    device = torch.device(job.get("device", "cpu"))
    net.eval()
    fast, amp, channels_last = predictor.net, predictor.amp_dtype, predictor.channels_last
    x = image_to(torch.rand(BATCH, checkpoint.cfg.INPUT_CHANNELS, TILE, TILE), device, channels_last)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.decode(*net.encode(x))
    net_flops = counter.get_total_flops()
    big = image_to(torch.rand(8, 256, 64, 64), device, channels_last)
    weight = torch.rand(256, 256, 3, 3, device=device)
    weight = weight.contiguous(memory_format=torch.channels_last) if channels_last else weight
    conv_flops = 2 * 8 * 256 * 256 * 9 * 64 * 64

    def best(fn) -> float:
        with torch.inference_mode(), autocast_for(device, amp):
            fn()
            times = []
            for _ in range(6):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
        return min(times)

    net_s = best(lambda: fast.decode(*fast.encode(x)))
    conv_s = best(lambda: F.conv2d(big, weight, padding=1))
    return {"gflop_per_window": net_flops / BATCH / 1e9, "net_gflops": net_flops / net_s / 1e9,
            "conv_gflops": conv_flops / conv_s / 1e9, "precision": str(amp or torch.float32).removeprefix("torch.")}


def _predictor(job: dict, gating: bool):
    """(the checkpoint as `main.py predict` reads it, its network placed on the job's device, the
    predictor `main.py predict` makes of it) for the bench's windows, overlap and batch."""
    import torch

    from configs import load_config
    from engines.builders import build_runtime
    from engines.forward import place
    from engines.inference import load_for_inference
    from engines.predict import build_predictor
    from utils.util import DistContext

    overrides = [f"MODEL_WEIGHTS={job['weights']}", f"TILE_OVERLAP={OVERLAP}", f"PREDICT_BATCH={BATCH}",
                 f"CLS_THRESHOLD={CLS_THRESHOLD}", f"GATING={'true' if gating else 'false'}"]
    checkpoint = load_for_inference(load_config(None, overrides), overrides, "predict")
    if checkpoint.cfg.INPUT_SIZE != TILE:
        raise SystemExit(f"the checkpoint's INPUT_SIZE is {checkpoint.cfg.INPUT_SIZE}; this bench compares "
                         f"{TILE}-px windows")
    runtime = build_runtime(checkpoint.cfg, DistContext(device=torch.device(job.get("device", "cpu"))))
    net = place(checkpoint.net, runtime.device, runtime.channels_last)
    return checkpoint, net, build_predictor(checkpoint.cfg, net, checkpoint.can_gate, runtime, gating)


def run_config(job: dict) -> dict:
    """Predict the scene with one configuration; write the probabilities (H, W, K) to job["out"]."""
    if job["mode"] == "throughput":
        return run_throughput(job)
    import torch

    from engines.forward import autocast_for, image_to
    from engines.sliding_window import ArrayImage, PredictStats
    from utils.image_io import dtype_intensity_range

    torch.manual_seed(0)
    checkpoint, net, predictor = _predictor(job, gating=job["mode"] == "gated")
    cfg = checkpoint.cfg
    device = torch.device(job.get("device", "cpu"))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    net, amp, channels_last = predictor.net, predictor.amp_dtype, predictor.channels_last
    raw = np.load(job["image"])
    image = ArrayImage(raw, *dtype_intensity_range(raw.dtype))  # uint8 / 255, as open_image reads a file
    k = predictor.channels

    with torch.no_grad(), autocast_for(device, amp):  # warm-up: oneDNN builds its kernels once
        warm = image_to(torch.zeros(BATCH, cfg.INPUT_CHANNELS, TILE, TILE), device, channels_last)
        skips, bottleneck = net.encode(warm)
        net.decode(skips, bottleneck), net.classify(bottleneck)
    seconds = {"encode": 0.0, "decode": 0.0, "classify": 0.0}
    windows = {"encode": 0, "decode": 0, "classify": 0}
    if device.type == "cpu":  # on a GPU the calls return before the work is done: no split there
        _instrument(net, seconds, windows)
    else:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _status_mib("VmRSS")
    h, w = image.height, image.width

    if job["mode"] == "monai":
        from monai.inferers import sliding_window_inference

        def network(x: torch.Tensor) -> torch.Tensor:  # what Predictor does per batch with gating off
            x = image_to(x, device, channels_last)
            with autocast_for(device, amp):
                seg = net.decode(*net.encode(x)).float()
            return torch.sigmoid(seg) if seg.shape[1] == 1 else torch.softmax(seg, dim=1)

        start, cpu = time.perf_counter(), _cpu_seconds()
        with torch.no_grad():
            inputs = torch.from_numpy(image.normalize(image.array)).permute(2, 0, 1)[None].to(device)  # (1, C, H, W)
            out = sliding_window_inference(inputs, (TILE, TILE), BATCH, network, overlap=OVERLAP / TILE,
                                           mode="gaussian", sigma_scale=SIGMA_SCALE, device=device, sw_device=device)
            probs = out[0].permute(1, 2, 0).cpu().numpy()  # (H, W, K)
            sync()
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        n = len(window_starts(h, TILE, TILE - OVERLAP)) * len(window_starts(w, TILE, TILE - OVERLAP))
        stats = {"tiles": n, "decoded": n, "gated_off": 0}
        peak = _status_mib("VmHWM")
        np.save(job["out"], probs)
    else:
        start, cpu = time.perf_counter(), _cpu_seconds()
        counted = PredictStats()
        with _open_npy(Path(job["out"]), (h, w, k)) as fh:
            for _, band in predictor.bands(image, counted):  # finished rows, top to bottom
                fh.write(np.ascontiguousarray(band.transpose(1, 2, 0)).tobytes())
        sync()
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        stats = {"tiles": counted.tiles, "decoded": counted.decoded, "gated_off": counted.gated_off}
        peak = _status_mib("VmHWM")
    net_seconds = sum(seconds.values())
    device_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {**stats, "seconds": wall, "cpu_seconds": cpu, "peak_mib": peak, "rss_before_mib": rss_before,
            "device": str(device), "device_peak_mib": device_peak, "batch": predictor.batch_size,
            "split": seconds, "windows": windows,
            "rest_seconds": wall - net_seconds, "precision": str(amp).replace("torch.", "") if amp else "fp32",
            "channels_last": channels_last, "k": k, "seg_threshold": cfg.SEG_THRESHOLD,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def rusage_wrapper(argv: list[str]) -> None:
    """Run ``argv`` and print its exit status, peak RSS and CPU seconds (this small process has no
    other child, and its child starts from this process's small high-water mark, not the bench's)."""
    start = time.perf_counter()
    rc = subprocess.call(argv)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = time.perf_counter() - start
    print("RUSAGE " + json.dumps({"rc": rc, "peak_mib": usage.ru_maxrss / 1024, "seconds": seconds,
                                  "cpu_seconds": usage.ru_utime + usage.ru_stime}))


# --------------------------------------------------------------------------------------------------
# Parent side

def child_env(threads: int) -> dict:
    """The environment of every subprocess: ``threads`` > 0 caps torch's intra-op threads (OpenMP)."""
    if threads <= 0:
        return dict(os.environ)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def train_weights(workdir: Path, epochs: int, env: dict) -> Path:
    """A short `main.py` training run (default model and tiles) into ``workdir``; its best.pth."""
    cmd = [sys.executable, "main.py", f"RESULTS_DIR={workdir}", "EXP_ID=w", f"TRAIN_EPOCHS={epochs}"]
    print(f"training: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    run = re.search(r"^run (\S+)", done.stdout, re.MULTILINE)
    if done.returncode or not run:
        sys.exit(f"training failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    best = Path(run.group(1)) / "best.pth"
    summary = [line for line in done.stdout.splitlines() if line.startswith("| best")]
    print(f"trained in {time.perf_counter() - start:.0f} s -> {best}" + (f"  {summary[0]}" if summary else ""))
    return best


def scores(probs_path: Path, truth: np.ndarray, k: int, seg_threshold: float) -> dict:
    """Dice and HD95 of the whole scene's prediction against the ground truth."""
    import torch

    from model.metrics import SegmentationMetrics, labels_from_scores

    probs = torch.from_numpy(np.load(probs_path)).permute(2, 0, 1)[None]  # (1, K, H, W)
    pred = labels_from_scores(probs, seg_threshold).to(torch.uint8)
    metrics = SegmentationMetrics(k, distance_metrics=True, seg_threshold=seg_threshold)
    metrics.update_labels(pred, torch.from_numpy(truth)[None])
    res = metrics.compute()
    return {"dice": res["DSC"], "hd95": res["HD95"]}


def cli_predict(weights: Path, tif: Path, out: Path, timeout: float, env: dict) -> dict:
    """Wall time and peak RSS of `main.py predict` on ``tif``."""
    cmd = [sys.executable, "main.py", "predict", f"MODEL_WEIGHTS={weights}", f"INPUT={tif}", f"OUTPUT={out}",
           f"TILE_OVERLAP={OVERLAP}", f"PREDICT_BATCH={BATCH}", "GATING=true", f"CLS_THRESHOLD={CLS_THRESHOLD}"]
    time_bin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    if time_bin:
        full, how = [time_bin, "-v", *cmd], "/usr/bin/time -v"
    else:
        full, how = [sys.executable, str(Path(__file__).resolve()), "--rusage", "--", *cmd], "ru_maxrss of children"
    start = time.perf_counter()
    try:
        done = subprocess.run(full, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "command": " ".join(cmd[1:]), "how": how}
    wall = time.perf_counter() - start
    res = {"command": " ".join(cmd[1:]), "how": how, "seconds": wall}
    if time_bin:
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        res["peak_mib"] = int(peak.group(1)) / 1024 if peak else float("nan")
        cpu = re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", done.stderr)
        res["cpu_seconds"] = sum(map(float, cpu)) if len(cpu) == 2 else float("nan")
    else:
        line = [x for x in done.stdout.splitlines() if x.startswith("RUSAGE ")]
        usage = json.loads(line[-1][7:]) if line else {}
        res["peak_mib"] = usage.get("peak_mib", float("nan"))
        res["cpu_seconds"] = usage.get("cpu_seconds", float("nan"))
    if done.returncode:
        res["error"] = f"exit {done.returncode}: " + ((done.stdout + done.stderr).strip().splitlines() or ["?"])[-1]
    records = out / "predictions.jsonl"
    if records.is_file():
        record = json.loads(records.read_text().splitlines()[-1])
        res.update({key: record[key] for key in ("tiles", "decoded", "gated_off")}, predict_seconds=record["seconds"])
    return res


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def print_throughput(r: dict) -> None:
    """The network's arithmetic rate beside one large convolution's (:func:`run_throughput`)."""
    if "error" in r:
        print(f"\nnetwork throughput: {r['error']}")
        return
    print(f"\nnetwork throughput ({r['precision']}): the predictor's network does {r['gflop_per_window']:.3f} GFLOP "
          f"per {TILE}² window at {r['net_gflops']:.0f} GFLOP/s; one large 3×3 convolution (256 → 256 channels, "
          f"8×64²) runs at {r['conv_gflops']:.0f} GFLOP/s: the network at {r['net_gflops'] / r['conv_gflops']:.0%} "
          "of it")


def print_report(args, rows: dict, diff: float, cli: dict | None, single: tuple[int, int]) -> None:
    print()
    header = ["configuration", "wall s", "windows/s", "CPU s", "windows", "decoded", "gated off", "encoded", "Dice",
              "HD95 px", "peak RSS MiB", "Δ RSS MiB", "device peak MiB", "encoder s", "decoder s", "heads s", "rest s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode in [m for m in (*MODES, *OLD_MODES) if m in rows]:
        r = rows[mode]
        if "error" in r:
            lines.append(f"| {LABELS[mode]} | {r['error']} |" + " |" * (len(header) - 2))
            continue
        s = r["split"]
        lines.append("| " + " | ".join([
            LABELS[mode], f"{r['seconds']:.1f}", f"{r['tiles'] / r['seconds']:.0f}", f"{r['cpu_seconds']:.1f}",
            str(r["tiles"]), str(r["decoded"]), str(r["gated_off"]), str(r["windows"]["encode"]), f"{r['dice']:.4f}",
            f"{r['hd95']:.2f}", f"{r['peak_mib']:.0f}", f"{r['peak_mib'] - r['rss_before_mib']:.0f}",
            f"{r.get('device_peak_mib', float('nan')):.0f}",
            f"{s['encode']:.1f}", f"{s['decode']:.1f}", f"{s['classify']:.2f}", f"{r['rest_seconds']:.1f}"]) + " |")
    print("\n".join(lines))

    a, b, c = (rows[m] for m in MODES)
    print()
    goals = ["| goal | measured | met |", "|---|---|---|"]
    for new, old in (("plain", "old-plain"), ("gated", "old-gated")):
        if old in rows and "error" not in rows[old] and "error" not in rows[new]:
            ratio = rows[old]["seconds"] / rows[new]["seconds"]
            goals.append(f"| {LABELS[new]} windows/s ≥ {GOAL_SPEED_VS_OLD:g}× {LABELS[old]} | {ratio:.2f}× | "
                         f"{_yes(ratio >= GOAL_SPEED_VS_OLD)} |")
    if "error" not in a and "error" not in b:
        ratio = b["seconds"] / a["seconds"]
        goals.append(f"| (a) no slower than (b): time (b)/(a) ≥ {GOAL_SPEED_VS_MONAI:g} | {ratio:.2f} | "
                     f"{_yes(ratio >= GOAL_SPEED_VS_MONAI)} |")
        cpu_ratio = b["cpu_seconds"] / a["cpu_seconds"]
        goals.append(f"| … the same in CPU time | {cpu_ratio:.2f} | {_yes(cpu_ratio >= GOAL_SPEED_VS_MONAI)} |")
        goals.append(f"| (a) = (b): max \\|p(a) − p(b)\\| ≤ {GOAL_MAX_DIFF:g} | {diff:.2e} | "
                     f"{_yes(diff <= GOAL_MAX_DIFF)} |")
    if "error" not in a and "error" not in c:
        speed, loss = a["seconds"] / c["seconds"], a["dice"] - c["dice"]
        goals.append(f"| (c) ≥ {GOAL_GATED_SPEEDUP:g}× faster than (a): time (a)/(c) | {speed:.2f}× | "
                     f"{_yes(speed >= GOAL_GATED_SPEEDUP)} |")
        cpu_speed = a["cpu_seconds"] / c["cpu_seconds"]
        goals.append(f"| … the same in CPU time (less sensitive to other processes) | {cpu_speed:.2f}× | "
                     f"{_yes(cpu_speed >= GOAL_GATED_SPEEDUP)} |")
        # (c)'s time had its network run at (a)'s per-window speed: the same work, without the drift of a
        # CPU that other processes share between the two runs
        per_window = {part: a["split"][part] / a["windows"][part] for part in ("encode", "decode")}
        same_speed = sum(per_window[part] * c["windows"][part] for part in per_window) \
            + c["split"]["classify"] + c["rest_seconds"]
        modelled = a["seconds"] / same_speed
        goals.append(f"| … estimated at (a)'s per-window encoder / decoder speed | {modelled:.2f}× | "
                     f"{_yes(modelled >= GOAL_GATED_SPEEDUP)} |")
        goals.append(f"| (c) Dice loss (a) − (c) ≤ {GOAL_DICE_LOSS:g} | {loss:+.4f} | "
                     f"{_yes(loss <= GOAL_DICE_LOSS)} |")
    frac = single[0] / single[1]
    goals.append(f"| scene: ≥ {SINGLE_CLASS_GOAL:.0%} of {TILE}-px windows single-class (ground truth) | "
                 f"{single[0]} / {single[1]} = {frac:.1%} | {_yes(frac >= SINGLE_CLASS_GOAL)} |")
    if cli is not None:
        if "peak_mib" in cli and not math.isnan(cli["peak_mib"]):
            gib = cli["peak_mib"] / 1024
            goals.append(f"| `main.py predict` on {args.tiff_size}² TIFF: peak RSS < {GOAL_CLI_RSS_GIB:g} GiB | "
                         f"{gib:.2f} GiB ({cli['peak_mib']:.0f} MiB) | "
                         f"{_yes(gib < GOAL_CLI_RSS_GIB and 'error' not in cli)} |")
    print("\n".join(goals))

    if cli is not None:
        print()
        print(f"| `main.py predict`, {args.tiff_size}×{args.tiff_size} uint8 TIFF (tiled {BLOCK}², zlib) | value |")
        print("|---|---|")
        if "error" in cli:
            print(f"| error | {cli['error']} |")
        print(f"| wall time, whole command (s) | {cli.get('seconds', float('nan')):.1f} |")
        print(f"| CPU time, whole command (s) | {cli.get('cpu_seconds', float('nan')):.1f} |")
        if "tiles" in cli:
            print(f"| prediction (s), as the command reports it | {cli['predict_seconds']:.1f} |")
            print(f"| windows / decoded / gated off | {cli['tiles']} / {cli['decoded']} / {cli['gated_off']} |")
        print(f"| peak RSS (MiB), by {cli['how']} | {cli.get('peak_mib', float('nan')):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rusage", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help="checkpoint to use (default: train one first)")
    parser.add_argument("--epochs", type=int, default=2, help="TRAIN_EPOCHS of that training run (after 1 warm-up)")
    parser.add_argument("--size", type=int, default=4096, help="side of the part-1 scene (px); (size - 128) %% 64 == 0")
    parser.add_argument("--tiff-size", type=int, default=8192, help="side of the part-2 TIFF scene (0 = skip part 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                        help="where (a)-(c) run: cpu, cuda, or auto (cuda where torch sees a GPU)")
    parser.add_argument("--old-code", type=Path, default=None,
                        help="another checkout of the project (e.g. git archive 93649e8 | tar -x -C DIR): its "
                             "plain and gated prediction run as rows (a0) and (c0), on the CPU")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_inf"), help="scratch folder")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of every subprocess (OMP_NUM_THREADS; 0 = torch's default, one per "
                             "core). On a CPU shared with other processes use 1: OpenMP threads that wait for each "
                             "other at every op's barrier make a 2-thread run several times slower than 1 thread")
    args, rest = parser.parse_known_args()
    if args.worker:
        report(run_config(json.loads(args.worker)))
        return
    if args.rusage:
        return rusage_wrapper([x for x in rest if x != "--"])
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.size < TILE or (args.size - TILE) % (TILE - OVERLAP):
        parser.error(f"--size={args.size}: (size - {TILE}) must be a multiple of {TILE - OVERLAP}, so that MONAI's "
                     "windows start where ours do (e.g. 4096)")
    if args.tiff_size and args.tiff_size % 16:
        parser.error(f"--tiff-size={args.tiff_size} must be a multiple of 16 (TIFF tile rule)")

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device is available to torch {torch.__version__}")
    old_worker = args.old_code / "bench" / "inference.py" if args.old_code else None
    if old_worker is not None and not old_worker.is_file():
        parser.error(f"--old-code {args.old_code}: no bench/inference.py there (a checkout of the project?)")
    began = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.2f} on {os.cpu_count()} cores" + (
        " (above the core count: other processes share the CPU; times are inflated and drift)"
        if load > (os.cpu_count() or 1) else ""))
    env = child_env(args.threads)
    weights = args.weights or train_weights(args.workdir, args.epochs, env)
    if not Path(weights).is_file():
        sys.exit(f"--weights {weights}: no such file")

    t = time.perf_counter()
    scene = make_scene(args.size, args.seed)
    image, classes = render_scene(scene)
    image_path = args.workdir / f"scene_{args.size}.npy"
    np.save(image_path, image)
    del image
    print(f"scene {args.size}²: {len(scene.objects)} objects in {len(scene.objects) // OBJECTS_PER_CLUSTER} "
          f"clusters, rendered in {time.perf_counter() - t:.1f} s")

    rows: dict = {}
    for mode in (*MODES, *(OLD_MODES if old_worker else ())):
        out = args.workdir / f"probs_{mode}.npy"
        job = {"mode": mode.removeprefix("old-"), "weights": str(weights), "image": str(image_path), "out": str(out),
               "device": device}
        rows[mode] = r = spawn(str(old_worker) if mode in OLD_MODES else __file__, job, env, args.timeout)
        if "error" not in r:
            truth = classes if r["k"] == 3 else (classes > 0).astype(np.uint8)
            r.update(scores(out, truth, r["k"], r["seg_threshold"]))
        print(f"  {LABELS[mode]}: " + (r["error"] if "error" in r else
              f"{r['seconds']:.1f} s, Dice {r['dice']:.4f}, peak RSS {r['peak_mib']:.0f} MiB; "
              f"load average now {os.getloadavg()[0]:.2f}"), flush=True)
    throughput = spawn(__file__, {"mode": "throughput", "weights": str(weights), "device": device}, env,
                       args.timeout)
    info = next((r for r in rows.values() if "error" not in r), {})
    k = info.get("k", 1)
    truth = classes if k == 3 else (classes > 0).astype(np.uint8)
    single = single_class_fraction(truth, TILE, TILE - OVERLAP)
    del classes, truth
    diff = float("nan")
    if "error" not in rows["plain"] and "error" not in rows["monai"]:
        pa = np.load(args.workdir / "probs_plain.npy", mmap_mode="r")
        pb = np.load(args.workdir / "probs_monai.npy", mmap_mode="r")
        diff = max(float(np.abs(pa[y:y + 512] - pb[y:y + 512]).max()) for y in range(0, pa.shape[0], 512))

    cli = None
    if args.tiff_size:
        t = time.perf_counter()
        tif = args.workdir / f"scene_{args.tiff_size}.tif"
        write_tiff(make_scene(args.tiff_size, args.seed + 1), tif)
        own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"TIFF {args.tiff_size}² written in {time.perf_counter() - t:.1f} s ({tif.stat().st_size / 2**20:.0f} "
              f"MiB on disk); peak RSS of this bench so far {own_peak:.0f} MiB",
              flush=True)
        out = args.workdir / f"predict_{args.tiff_size}"
        if out.exists():
            shutil.rmtree(out)
        cli = cli_predict(Path(weights), tif, out, args.timeout, env)
        print(f"  main.py predict: {cli.get('error', 'ok')}, {cli.get('seconds', float('nan')):.1f} s", flush=True)

    print(f"\ntorch {info.get('torch')} on {device}, {info.get('threads')} thread(s) (--threads {args.threads}); "
          f"precision {info.get('precision')} (the checkpoint's), channels_last {info.get('channels_last')}; "
          f"windows {TILE} px, overlap {OVERLAP} px, {BATCH} per batch; weights {weights}")
    print_report(args, rows, diff, cli, single)
    print_throughput(throughput)
    if cli is not None:
        print(f"\ncommand of part 2: python {cli['command']}")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}; whole bench {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
