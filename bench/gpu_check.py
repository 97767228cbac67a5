"""The GPU paths in one call: exact SDMs, distance metrics, mixed-precision training, NCCL, prediction.

Run through ``bench/gpu_check.sh`` (which first runs every CUDA-marked test). Each check prints one
row of a table; the script exits 1 when any check fails, and 3 at once when the device asked for
does not exist (a CPU-only machine never "passes" a GPU check).

Rows, on ``--device`` (default ``cuda``):

* exact signed distance maps of 16×1×512² random-blob masks (:func:`utils.sdf.signed_distance_map`,
  ``method="exact"``) against SciPy's EDT on the CPU, one map at a time: median time of each, and
  the largest difference in pixels (goal ≤ 1e-4);
* the four distance metrics (:func:`model.metrics.surface_distances`: ASD, AD, HD95, D95) of 16
  random 256² three-class label maps against MONAI's ``compute_hausdorff_distance`` /
  ``compute_average_surface_distance`` on the CPU: time, largest difference (goal ≤ 1e-3 px);
* the default run (``python main.py``) for 2 epochs (1 warm-up + 1), once in bf16 and once in fp16
  with the GradScaler: best Dice, seconds per epoch and training steps per second (steps of BATCH_SIZE
  tiles over the epochs' training seconds; goal: Dice ≥ 0.80 after 2 epochs);
* the default run as the README's first command runs it, whole (goal on a GPU: ≤ 10 s wall);
* a 1-process DDP run over NCCL: AuxNet wrapped in ``DistributedDataParallel``, 3 training steps
  with the trainer's step and loss, an all-reduce of the metric statistics and a broadcast of a
  Python object (what :mod:`engines.launch` and the trainer do across ranks);
* ``main.py predict`` of a 4096² and an 8192² synthetic scene (the one of ``bench/inference.py``) with
  the first training run's weights, plain and gated: seconds, windows per second, windows decoded, Dice
  against the ground truth, and gated's speed-up over plain (goals on a GPU: plain 4096² ≥ 20,000
  windows/s, gated ≥ 2.5× plain);
* the 8192² scene tiled 2×2 into a 16384² tiled deflate GeoTIFF and a lossless JPEG 2000 (what
  orbiter archives ship; written with rasterio, a row "skipped" without it), each read, predicted
  (gated) and written by ``main.py predict``: the record's seconds (reading, prediction and the mask
  written; goals on a GPU ≤ 10 s and ≤ 20 s) beside the whole command's wall time.

The goals are the H200's; a row that misses one fails the table.

``--device cpu --smoke`` runs every row small on the CPU (gloo for NCCL, one fp32 training run, a
256² scene, a 512² GeoTIFF and JPEG 2000); ``tests/bench/test_gpu_check.py`` runs it so that the
script is known to work before a GPU ever runs it.

Usage:
    bash bench/gpu_check.sh                  # CUDA-marked tests, then this table
    python bench/gpu_check.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from bench.sdm import make_masks, scipy_sdm, timed  # noqa: E402
from model.metrics import surface_distances  # noqa: E402
from utils.sdf import signed_distance_map  # noqa: E402

#: exit status when the device asked for is absent
NO_DEVICE = 3


class Table:
    """Rows of ``check | result | reference | goal | met``; ``failed`` when any row missed its goal."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str, bool | None]] = []  # met: None for a row not run

    def add(self, check: str, result: str, reference: str, goal: str, ok: bool) -> None:
        self.rows.append((check, result, reference, goal, ok))
        print(f"  {'ok ' if ok else 'FAIL'} {check}: {result}", flush=True)

    def skip(self, check: str, why: str) -> None:
        """A row not run, for ``why``; it does not fail the table."""
        self.rows.append((check, f"not run: {why}", "", "", None))
        print(f"  skip {check}: {why}", flush=True)

    def error(self, check: str, err: BaseException) -> None:
        text = f"{type(err).__name__}: {err}".replace("|", "/").replace("\n", " ")[:300]
        self.add(check, text, "", "runs", False)

    @property
    def failed(self) -> bool:
        return any(row[4] is False for row in self.rows)

    def markdown(self) -> str:
        lines = ["| check | result | reference | goal | met |", "|---|---|---|---|---|"]
        met = {True: "yes", False: "**NO**", None: "skipped"}
        lines += [f"| {c} | {r} | {ref} | {g} | {met[ok]} |" for c, r, ref, g, ok in self.rows]
        return "\n".join(lines)


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# ------------------------------------------------------------------------------ the checks


def check_sdm(table: Table, device: torch.device, smoke: bool) -> None:
    shape = (4, 1, 64, 64) if smoke else (16, 1, 512, 512)
    masks = make_masks(shape)
    mask_t = torch.from_numpy(masks).to(device)
    seconds, sdm = timed(lambda: signed_distance_map(mask_t, "euclidean", "exact"), 3, _sync(device))
    ref_seconds, ref = timed(lambda: scipy_sdm(masks.reshape(-1, *shape[2:])), 1 if smoke else 3, lambda: None)
    err = float(np.abs(sdm.double().cpu().numpy().reshape(ref.shape) - ref).max())
    name = "×".join(map(str, shape))
    table.add(f"exact SDM {name}", f"{seconds * 1e3:.1f} ms on {device.type}, max error {err:.1e} px",
              f"SciPy EDT (CPU) {ref_seconds * 1e3:.1f} ms", "error ≤ 1e-4 px", err <= 1e-4)


def check_metrics(table: Table, device: torch.device, smoke: bool) -> None:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    n, side, k = (4, 64, 3) if smoke else (16, 256, 3)
    blobs = make_masks((n, 2, side, side), seed=1)
    target = torch.from_numpy(blobs[:, 0].astype(np.int64) + 2 * blobs[:, 1]).clamp(max=k - 1)
    pred = torch.from_numpy(np.roll(target.numpy(), 2, axis=2))  # a shifted prediction: distances of a few px
    p, t = pred.to(device), target.to(device)
    seconds, ours = timed(lambda: surface_distances(p, t, k), 3, _sync(device))
    one_hot = [torch.nn.functional.one_hot(x, k).permute(0, 3, 1, 2).float() for x in (pred, target)]

    def monai():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {
                "hd95": compute_hausdorff_distance(*one_hot, percentile=95),
                "d95": compute_hausdorff_distance(*one_hot, percentile=95, directed=True),
                "asd": compute_average_surface_distance(*one_hot, symmetric=True),
                "ad": compute_average_surface_distance(*one_hot, symmetric=False),
            }

    ref_seconds, ref = timed(monai, 1, lambda: None)
    diff = max(float((getattr(ours, name).double().cpu() - ref[name].double()).abs().max()) for name in ref)
    table.add(f"ASD/AD/HD95/D95, {n}×{side}², {k} classes",
              f"{seconds * 1e3:.1f} ms on {device.type}, max difference {diff:.1e} px",
              f"MONAI (CPU) {ref_seconds * 1e3:.0f} ms", "difference ≤ 1e-3 px", diff <= 1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main_py(args: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "main.py", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)
    return done, time.perf_counter() - start


def _tail(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
    return f"exit {done.returncode}: {lines[-1]}"


def _gpus(device: torch.device) -> str:
    """The GPUs option that runs ``main.py`` on ``device`` (the GPU the table checks, or the CPU)."""
    return f"GPUs=[{device.index or 0}]" if device.type == "cuda" else "GPUs=[]"


def _run_main(args: list[str], device: torch.device, smoke: bool, timeout: float = 600):
    """``python main.py`` with ``args`` on ``device`` (smoke: 4 images of 128²); returns
    ``(completed process, wall seconds, run folder or None)``."""
    args = [*args, f"MASTER_PORT={_free_port()}", _gpus(device)]
    if smoke:
        args += ["SYNTHETIC_IMAGES=4", "SYNTHETIC_SIZE=128", "INPUT_SIZE=64", "TEST_SPLIT=0.25"]
    done, wall = _main_py(args, dict(os.environ), timeout)
    run = re.search(r"^run (\S+)", done.stdout, re.MULTILINE)
    return done, wall, Path(run.group(1)) if not done.returncode and run else None


def check_training(table: Table, device: torch.device, smoke: bool, workdir: Path, precision: str) -> Path | None:
    """A 2-epoch default run in ``precision``; returns its best checkpoint."""
    done, wall, folder = _run_main([f"RESULTS_DIR={workdir}", f"EXP_ID={precision}", "WARMUP_EPOCHS=1",
                                    "TRAIN_EPOCHS=1", f"MIXED_PRECISION={precision}"], device, smoke)
    check = f"default run, 2 epochs, {precision}" + (" (smoke: 4 images of 128²)" if smoke else "")
    if folder is None:
        table.add(check, _tail(done), "", "runs", False)
        return None
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    per_epoch = sum(r["time_s"] for r in records) / len(records)
    tiles = re.search(r"(\d+) train / \d+ test tiles", done.stdout)
    train_s = sum(r.get("train_s", r["time_s"]) for r in records)
    steps = -(-int(tiles.group(1)) // 8) * len(records) if tiles else 0  # BATCH_SIZE 8, the default
    rate = f", {steps / train_s:.1f} steps/s ({steps} steps of 8)" if steps else ""
    dice = summary["best"]["DSC"]
    chosen = re.search(r"precision ([^,]+)", done.stdout)
    goal = 0.0 if smoke else 0.80
    table.add(check, f"DSC {dice:.4f}, {per_epoch:.1f} s/epoch{rate}, {wall:.0f} s in all",
              f"precision said: {chosen.group(1) if chosen else '?'}", f"DSC ≥ {goal:.2f}", dice >= goal)
    return folder / "best.pth"


def check_default_run(table: Table, device: torch.device, smoke: bool, workdir: Path) -> None:
    """``python main.py`` as the README's first command runs it (every option its default), whole:
    start, 12 epochs, whole-image evaluation, exit (goal on a GPU: ≤ 10 s)."""
    args = [f"RESULTS_DIR={workdir}", "EXP_ID=default"] + (["WARMUP_EPOCHS=1", "TRAIN_EPOCHS=1"] if smoke else [])
    done, wall, folder = _run_main(args, device, smoke)
    check = "python main.py (the default run), whole" + (" (smoke: 2 epochs)" if smoke else "")
    if folder is None:
        table.add(check, _tail(done), "", "runs", False)
        return
    dice = json.loads((folder / "summary.json").read_text())["best"]["DSC"]
    on_gpu = device.type == "cuda" and not smoke
    table.add(check, f"{wall:.1f} s wall, best DSC {dice:.4f}", "", "≤ 10 s wall on a GPU" if on_gpu else "runs",
              not on_gpu or wall <= 10)


def check_ddp(table: Table, device: torch.device) -> None:
    """Three DDP training steps in a 1-process group (NCCL on CUDA, gloo on the CPU)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from engines.SegTrainer import TrainStep
    from model.AuxNet import AuxNet
    from model.losses import build_loss
    from utils.tiling import NO_FILL

    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    start = time.perf_counter()
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = AuxNet(1, 1, 1, depth=4, base_width=8).to(device)
        step = TrainStep(net, build_loss("SoftDICE_BCE", seg_classes=1, cls_classes=1), decode=True, use_cls=True)
        ddp = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        image = torch.rand(4, 1, 64, 64, device=device)
        image[:2] = 0.0  # two tiles of one class, two with boundaries
        mask = (image > 0.5).long()[:, 0]
        boundary = (mask.flatten(1).amax(1) != mask.flatten(1).amin(1)).long()
        fill = torch.where(boundary.bool(), torch.full_like(boundary, NO_FILL), mask.flatten(1)[:, 0])
        losses = []
        for _ in range(3):
            _, loss = ddp(image, mask, boundary, fill)
            opt.zero_grad()
            loss.total.backward()
            opt.step()
            losses.append(float(loss.total.detach()))
        stats = torch.tensor([1.0, 2.0, 3.0], device=device)
        dist.all_reduce(stats)
        message = [None]
        message[0] = "broadcast"
        dist.broadcast_object_list(message, src=0)
        ok = all(np.isfinite(losses)) and stats.tolist() == [1.0, 2.0, 3.0] and message == ["broadcast"]
        table.add(f"1-process DDP over {backend}",
                  f"3 steps, losses {' → '.join(f'{v:.3f}' for v in losses)}, all_reduce + broadcast ok, "
                  f"{time.perf_counter() - start:.1f} s", "", "finite losses, collectives exact", ok)
    finally:
        dist.destroy_process_group()


def check_prediction(table: Table, device: torch.device, smoke: bool, weights: Path | None, workdir: Path) -> None:
    """Synthetic scenes predicted plain and gated (4096² and 8192²; smoke: 256²), then the largest of
    them tiled 2×2 as a GeoTIFF and as a lossless JPEG 2000 (16384²; smoke: 512²)."""
    if weights is None or not weights.is_file():
        table.add("predict a scene", "no weights: the bf16 training run failed", "", "runs", False)
        return
    from PIL import Image

    from bench.inference import make_scene, render_scene

    for size in (256,) if smoke else (4096, 8192):
        image, classes = render_scene(make_scene(size, 0))
        path = workdir / f"scene_{size}.png"
        Image.fromarray(image).save(path)
        _predict_scene(table, device, smoke, weights, workdir, path, classes > 0)
    _predict_archive_formats(table, device, smoke, weights, workdir, np.tile(image, (2, 2)), np.tile(classes > 0, (2, 2)))


def _predict(table: Table, device: torch.device, weights: Path, path: Path, out: Path, gating: bool,
             truth: np.ndarray, check: str) -> dict | None:
    """``main.py predict`` of ``path`` into ``out``; its record, with ``dice`` (of the mask against
    ``truth``) and ``wall`` (the whole command) added; None after a row saying why it failed."""
    import tifffile
    from PIL import Image

    args = [f"MODEL_WEIGHTS={weights}", f"INPUT={path}", f"OUTPUT={out}", f"GATING={str(gating).lower()}",
            _gpus(device)]
    done, wall = _main_py(["predict", *args], dict(os.environ), 600)
    log = out / "predictions.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if done.returncode or not records:
        table.add(check, _tail(done), "", "runs", False)
        return None
    mask = Path(records[-1]["mask"])
    pred = (tifffile.imread(mask) if mask.suffix == ".tif" else np.asarray(Image.open(mask))) > 0
    dice = 2 * float((pred & truth).sum()) / max(float(pred.sum() + truth.sum()), 1.0)
    return {**records[-1], "dice": dice, "wall": wall}


def _predict_scene(table: Table, device: torch.device, smoke: bool, weights: Path, workdir: Path, path: Path,
                   truth: np.ndarray) -> None:
    """Rows for ``main.py predict`` of one scene, plain and gated, and gated's speed-up (goals on a GPU:
    plain ≥ 20,000 windows/s, gated ≥ 2.5× plain)."""
    size = truth.shape[0]
    on_gpu = device.type == "cuda" and not smoke
    rates = {}
    for gating in (False, True):
        check = f"predict {size}² scene, gating {str(gating).lower()}"
        r = _predict(table, device, weights, path, workdir / f"predict_{size}_{gating}", gating, truth, check)
        if r is None:
            continue
        rates[gating] = r["tiles_per_s"]
        fast = not gating and size == 4096 and on_gpu  # the windows/s goal: plain, on the bench's scene
        table.add(check, f"{r['seconds']:.1f} s ({r['tiles_per_s']} windows/s), {r['decoded']}/{r['tiles']} decoded, "
                  f"Dice {r['dice']:.4f}", f"{r['wall']:.0f} s whole command",
                  "runs" if smoke else "Dice ≥ 0.5, ≥ 20,000 windows/s" if fast else "Dice ≥ 0.5",
                  smoke or (r["dice"] >= 0.5 and (not fast or r["tiles_per_s"] >= 20_000)))
    if len(rates) == 2 and rates[False]:
        speedup = rates[True] / rates[False]
        table.add(f"predict {size}² scene, gated / plain", f"{speedup:.2f}× the windows/s", "", "≥ 2.5× on a GPU",
                  not on_gpu or speedup >= 2.5)


def _predict_archive_formats(table: Table, device: torch.device, smoke: bool, weights: Path, workdir: Path,
                             image: np.ndarray, truth: np.ndarray) -> None:
    """A scene as orbiter archives ship it, a tiled deflate GeoTIFF and a lossless JPEG 2000, read,
    predicted (gated) and written by ``main.py predict`` (goals on a GPU for 16384²: ≤ 10 s and ≤ 20 s,
    the record's seconds: reading, prediction and writing of the mask)."""
    size = image.shape[0]
    formats = (("GeoTIFF", "tif", 10, dict(driver="GTiff", tiled=True, blockxsize=512, blockysize=512,
                                           compress="deflate", BIGTIFF="IF_SAFER")),
               ("lossless JPEG 2000", "jp2", 20, dict(driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES")))
    try:
        import rasterio
        from affine import Affine
    except ImportError:
        for name, *_ in formats:
            table.skip(f"predict {size}² {name}, gated", "rasterio is not installed (pip install rasterio)")
        return
    on_gpu = device.type == "cuda" and not smoke
    profile = dict(height=size, width=size, count=1, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000))
    for name, suffix, goal, options in formats:
        check = f"predict {size}² {name}, gated"
        path = workdir / f"scene_{size}.{suffix}"
        start = time.perf_counter()
        with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"), rasterio.open(path, "w", NUM_THREADS="ALL_CPUS", **options,
                                                                      **profile) as ds:
            ds.write(image, 1)
        written = time.perf_counter() - start
        r = _predict(table, device, weights, path, workdir / f"predict_{size}_{suffix}", True, truth, check)
        if r is not None:
            table.add(check, f"{r['seconds']:.1f} s ({r['tiles_per_s']} windows/s), {r['decoded']}/{r['tiles']} "
                      f"decoded, Dice {r['dice']:.4f}", f"{r['wall']:.0f} s whole command; file written in "
                      f"{written:.0f} s", f"≤ {goal} s on a GPU" if on_gpu else "runs",
                      not on_gpu or r["seconds"] <= goal)


# ------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--smoke", action="store_true", help="every check small (for the CPU self-test)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is available to torch {torch.__version__} "
              f"(CUDA build: {torch.version.cuda or 'none, a CPU-only wheel'}); nothing was checked. "
              "Run it on a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        return NO_DEVICE
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"device: CPU, torch {torch.__version__}")
    table = Table()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        weights = None
        checks = [
            ("exact SDM", lambda: check_sdm(table, device, args.smoke)),
            ("distance metrics", lambda: check_metrics(table, device, args.smoke)),
        ]
        for name, run in checks:
            try:
                run()
            except Exception as err:  # a failing check is a row of the table, not the end of the others
                table.error(name, err)
        precisions = ("bf16", "fp16") if device.type == "cuda" else ("none",) if args.smoke else ("bf16", "none")
        for precision in precisions:
            try:
                best = check_training(table, device, args.smoke, workdir, precision)
                weights = weights or best
            except Exception as err:
                table.error(f"default run, {precision}", err)
        for name, run in (("default run", lambda: check_default_run(table, device, args.smoke, workdir)),
                          ("DDP", lambda: check_ddp(table, device)),
                          ("predict", lambda: check_prediction(table, device, args.smoke, weights, workdir))):
            try:
                run()
            except Exception as err:
                table.error(name, err)
    print()
    print(table.markdown())
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
