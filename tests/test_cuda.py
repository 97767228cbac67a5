"""The CUDA paths, against CPU references: exact distance maps and SDMs, distance metrics, losses,
mixed-precision training with the GradScaler, pinned memory, NCCL, prediction and checkpoints.

Every test here is marked ``cuda`` and skips without a CUDA device; ``bench/gpu_check.sh`` runs them.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from conftest import blobs, random_labels, ref_sdm
from test_cli import eval_summary, run_cli
from engines.sliding_window import ArrayImage, Predictor
from model.AuxNet import AuxNet
from model.losses import build_loss
from model.metrics import SegmentationMetrics, surface_distances
from utils.sdf import distance_transform, signed_distance_map

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]
GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.mark.parametrize("distance, metric", [("euclidean", None), ("manhattan", "taxicab"),
                                              ("chebyshev", "chessboard")])
def test_exact_distance_on_cuda_equals_scipy(distance, metric):
    masks = blobs((6, 96, 80), seed=1)
    got = distance_transform(torch.from_numpy(masks).to(GPU), distance, "exact").cpu().double().numpy()
    for m, d in zip(masks, got):
        ref = ndi.distance_transform_edt(~m) if metric is None else ndi.distance_transform_cdt(~m, metric=metric)
        np.testing.assert_allclose(d, ref, atol=1e-4)


def test_exact_sdm_on_cuda_equals_the_boundary_loss_reference():
    masks = blobs((4, 1, 128, 128), seed=2)
    got = signed_distance_map(torch.from_numpy(masks).to(GPU), "euclidean", "exact").cpu().double().numpy()
    for m, d in zip(masks[:, 0], got[:, 0]):
        np.testing.assert_allclose(d, ref_sdm(m), atol=1e-4)


def test_surface_distances_on_cuda_equal_monai():
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(0)
    target = random_labels(rng, 4, 3, 64, 64)
    pred = random_labels(rng, 4, 3, 64, 64)
    ours = surface_distances(pred.to(GPU), target.to(GPU), 3)
    p, t = (torch.nn.functional.one_hot(x, 3).permute(0, 3, 1, 2).float() for x in (pred, target))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = {"hd95": compute_hausdorff_distance(p, t, percentile=95),
               "asd": compute_average_surface_distance(p, t, symmetric=True)}
    for name, value in ref.items():
        np.testing.assert_allclose(getattr(ours, name).cpu().double().numpy(), value.double().numpy(), atol=1e-3)


def test_metrics_on_cuda_equal_the_cpu():
    rng = np.random.default_rng(1)
    target = random_labels(rng, 6, 3, 48, 48)
    logits = torch.randn(6, 3, 48, 48)
    results = []
    for device in (CPU, GPU):
        metrics = SegmentationMetrics(3)
        metrics.update(logits.to(device), target.to(device))
        results.append(metrics.compute())
    for key, value in results[0].items():
        assert results[1][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize("loss_name", ["SoftDICE_BCE", "Boundary_SoftDICE", "sMAE_SoftDICE", "wBCE"])
def test_losses_on_cuda_equal_the_cpu(loss_name):
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 64, 64)
    target = torch.from_numpy(blobs((4, 64, 64), seed=3)).long()
    values, grads = [], []
    for device in (CPU, GPU):
        x = logits.to(device, copy=True).requires_grad_()  # a leaf of its own (.to(CPU) would be logits itself)
        out = build_loss(loss_name, seg_classes=1, cls_classes=0)(x, target.to(device))
        out.total.backward()
        values.append(float(out.total.detach()))
        grads.append(x.grad.cpu())
    assert values[1] == pytest.approx(values[0], rel=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_training_steps_on_cuda(dtype):
    torch.manual_seed(0)
    net = AuxNet(1, 1, 1, depth=4, base_width=8).to(GPU).to(memory_format=torch.channels_last)
    loss_fn = build_loss("SoftDICE_BCE", seg_classes=1, cls_classes=1)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    image = torch.rand(8, 1, 64, 64, device=GPU).contiguous(memory_format=torch.channels_last)
    mask = (image[:, 0] > 0.5).long()
    label = torch.ones(8, dtype=torch.long, device=GPU)
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=dtype):
            out = net(image)
            loss = loss_fn(out.seg, mask, out.cls, label).total
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_prediction_on_cuda_equals_the_cpu():
    torch.manual_seed(4)
    net = AuxNet(1, 1, 1, depth=3, base_width=4).eval()
    image = ArrayImage(np.random.default_rng(5).random((100, 140, 1)).astype(np.float32))
    probs = []
    for device in (CPU, GPU):
        predictor = Predictor(net.to(device), tile=32, overlap=16, batch_size=4, device=device)
        probs.append(predictor.predict_array(image)[0])
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-4)
    gated = Predictor(net.to(GPU), tile=32, overlap=16, batch_size=4, device=GPU, gating=True)
    out, stats = gated.predict_array(image)
    assert out.shape == probs[0].shape and np.isfinite(out).all() and stats.tiles > 0


def test_one_process_ddp_over_nccl():
    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import Table, check_ddp

    table = Table()
    check_ddp(table, GPU)
    assert not table.failed, table.markdown()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_tiny_run_on_the_gpu_trains_evaluates_and_predicts(tmp_path, precision):
    """The CLI on the GPU: pinned-memory loaders, autocast (fp16 with the GradScaler), the
    checkpoint, then `predict` with it on the GPU and `eval` on the CPU (map_location), where the
    precision is chosen for the CPU without being asked."""
    done = run_cli(f"RESULTS_DIR={tmp_path}", "GPUs=[0]", f"MIXED_PRECISION={precision}", "SYNTHETIC_IMAGES=4",
                   "SYNTHETIC_SIZE=128", "INPUT_SIZE=64", "TEST_SPLIT=0.25", "WARMUP_EPOCHS=1", "TRAIN_EPOCHS=1",
                   timeout=600)
    assert re.search(rf"device cuda:0, .*precision {precision}", done.stdout), done.stdout[:500]
    run = Path(re.search(r"^run (\S+)", done.stdout, re.MULTILINE).group(1))
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["final"]["loss"])
    image = tmp_path / "scene.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((200, 260)) * 255).astype(np.uint8)).save(image)
    run_cli("predict", f"MODEL_WEIGHTS={run / 'best.pth'}", f"INPUT={image}", f"OUTPUT={tmp_path / 'out'}",
            "GPUs=[0]", timeout=600)
    assert (tmp_path / "out" / "scene_mask.png").is_file()
    done = run_cli("eval", f"MODEL_WEIGHTS={run / 'best.pth'}", timeout=600)  # run_cli: GPUs=[], the CPU
    if precision == "fp16":  # no fp16 autocast on the CPU: eval picks the CPU's precision, with a note
        assert "MIXED_PRECISION" in done.stdout + done.stderr, done.stdout + done.stderr
    settings = json.loads(eval_summary(done).read_text())["settings"]
    assert settings["device"] == "cpu" and settings["precision"] in ("bf16", "none")
