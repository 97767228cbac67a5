"""The device-resident predictor (engines/sliding_window.py, engines/device_bands.py, engines/gating.py):
the same probabilities as a direct sliding window over the whole image (plain, gated, TTA, several
classes), a fixed number of host transfers per band whatever the batch, bands read once each on a
background thread, and the prediction batch and blending device chosen for the device."""

import copy
import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from configs import load_config
from engines.device_bands import (CPU_PREDICT_BATCH, MAX_AUTO_BATCH, BandReader, band_bytes, batch_for_memory,
                                  blending_device)
from engines.gating import FILL_BLEND_WEIGHT, cover_indices
from engines.predict import build_predictor
from engines.sliding_window import ArrayImage, Predictor, boundary_probability
from model.metrics import predict_classes
from tests.engines.test_sliding_window import tiny_net
from utils.tiling import gaussian_importance_map, window_starts

CPU = torch.device("cpu")
_FLIPS = {"none": [()], "flips": [(), (-1,), (-2,), (-2, -1)]}


def reference(net, image, tile, overlap, gating=False, tta="none", threshold=0.5, reach=1):
    """The blended probabilities (K, H, W) of a whole image, window by window over the whole image
    (no bands, no batches): the plain Gaussian sliding window, or gated as engines.gating.GatePlan
    describes it (cells by cover_indices; a boundary cell decoded; a filled cell decoded when a
    boundary cell lies within ``reach`` cells; another window decoded when it overlaps a boundary
    cell, else left out; fills blended at FILL_BLEND_WEIGHT)."""
    net = copy.deepcopy(net).eval()
    h, w = image.shape[:2]
    step, t = tile - overlap, tile
    ys, xs = window_starts(h, t, step), window_starts(w, t, step)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    g = torch.from_numpy(gaussian_importance_map(t))

    def window(i, j):
        return x[:, :, ys[i]:ys[i] + t, xs[j]:xs[j] + t]

    def decoded(i, j):
        total = 0
        for dims in _FLIPS[tta]:
            seg = net(window(i, j).flip(dims) if dims else window(i, j)).seg
            p = torch.sigmoid(seg) if seg.shape[1] == 1 else torch.softmax(seg, 1)
            total = total + (p.flip(dims) if dims else p)
        return (total / len(_FLIPS[tta]))[0]

    k = net.outc.out_channels
    acc, wsum = torch.zeros(k, h, w), torch.zeros(h, w)
    rows, cols = cover_indices(ys, t), cover_indices(xs, t)
    heads = {}
    if gating:
        for r in rows:
            for c in cols:
                out = net(window(r, c), decode=False)
                heads[r, c] = (bool(predict_classes(out.cls, threshold)[0] == 1), int(out.fill.argmax(1)))
    boundary = [(rows.index(r), cols.index(c)) for (r, c), (b, _) in heads.items() if b]
    with torch.no_grad():
        for i in range(len(ys)):
            for j in range(len(xs)):
                weight, probs = g, None
                if not gating:
                    probs = decoded(i, j)
                elif i in rows and j in cols:
                    b, fill = heads[i, j]
                    near = any(abs(rows.index(i) - br) <= reach and abs(cols.index(j) - bc) <= reach
                               for br, bc in boundary)
                    if b or near:
                        probs = decoded(i, j)
                    else:
                        probs = torch.nn.functional.one_hot(torch.tensor(fill), max(k, 2)).float()[:k, None, None]
                        probs = (probs if k > 1 else torch.tensor([float(fill)])[:, None, None]).expand(k, t, t)
                        weight = g * np.float32(FILL_BLEND_WEIGHT)
                elif any(abs(ys[rows[br]] - ys[i]) < t and abs(xs[cols[bc]] - xs[j]) < t for br, bc in boundary):
                    probs = decoded(i, j)
                if probs is not None:
                    acc[:, ys[i]:ys[i] + t, xs[j]:xs[j] + t] += probs * weight
                    wsum[ys[i]:ys[i] + t, xs[j]:xs[j] + t] += weight
    return (acc / wsum).numpy()


def _scene(shape, seed):
    """An image with a few bright blocks on a noisy background: some windows boundary, most not."""
    rng = np.random.default_rng(seed)
    image = rng.random((*shape, 1)).astype(np.float32) * 0.2
    image[20:50, 30:70] += 0.7
    image[shape[0] - 40:shape[0] - 20, 10:30] += 0.5
    return image


def _median_threshold(net, image, tile):
    """A CLS_THRESHOLD that calls about half the cells boundary, whatever the random head says."""
    with torch.no_grad():
        x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
        windows = x.unfold(2, tile, tile).unfold(3, tile, tile).permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, tile, tile)
        return torch.sigmoid(copy.deepcopy(net).eval()(windows, decode=False).cls).median().item()


@pytest.mark.parametrize("gating, tta, classes", [(False, "none", 1), (False, "none", 3), (True, "none", 1),
                                                  (True, "none", 3), (False, "flips", 1), (True, "flips", 3)])
def test_the_predictor_equals_a_whole_image_sliding_window(gating, tta, classes):
    """Sides where the windows coincide with the reference's (160 = 32 + 4 x 32): the bands, the
    device-side windows and blending, and the gating decisions made on the device give the
    probabilities of a direct window-by-window computation to 1e-5 (fp32)."""
    net = tiny_net(seed=11, seg_classes=classes)
    image = _scene((160, 192), seed=12)
    threshold = _median_threshold(net, image, 32)
    probs, stats = Predictor(net, tile=32, overlap=16, batch_size=3, device=CPU, gating=gating, tta=tta,
                             gate_threshold=threshold).predict_array(ArrayImage(image))
    ref = reference(net, image, 32, 16, gating=gating, tta=tta, threshold=threshold)
    assert probs.shape == ref.shape == (classes, 160, 192)
    assert np.abs(probs - ref).max() <= 1e-5
    assert 0 < stats.decoded < stats.tiles if gating else stats.decoded == stats.tiles


def test_boundary_probability_of_one_and_two_output_heads():
    logits = torch.tensor([[0.0], [math.log(3.0)]])  # sigmoid: 1/2, 3/4
    assert boundary_probability(logits).tolist() == pytest.approx([0.5, 0.75])
    two = torch.tensor([[0.0, 0.0], [0.0, math.log(9.0)]])  # softmax of class 1: 1/2, 9/10
    assert boundary_probability(two).tolist() == pytest.approx([0.5, 0.9])


def test_the_gate_threshold_decides_which_windows_are_decoded():
    """Every head probability of a sigmoid lies in (0, 1): at threshold 0 every window is decoded
    and the gated prediction is the plain one; at 1 none is, and every pixel is a filled class; in
    between, a lower threshold never decodes fewer windows."""
    net = tiny_net(seed=15)
    image = _scene((96, 128), seed=16)
    plain, _ = Predictor(net, tile=32, overlap=16, device=CPU).predict_array(ArrayImage(image))
    decoded = {}
    for threshold in (0.0, 0.3, 0.5, 1.0):
        probs, stats = Predictor(net, tile=32, overlap=16, device=CPU, gating=True,
                                 gate_threshold=threshold).predict_array(ArrayImage(image))
        decoded[threshold] = stats.decoded
        if threshold == 0.0:
            assert stats.decoded == stats.tiles and np.abs(probs - plain).max() <= 1e-5
        if threshold == 1.0:
            assert stats.decoded == 0 and set(np.unique(probs)) <= {0.0, 1.0}
    assert decoded[0.0] >= decoded[0.3] >= decoded[0.5] >= decoded[1.0]
    with pytest.raises(ValueError, match=r"gate_threshold=1.5 must be in \[0, 1\]"):
        Predictor(net, tile=32, overlap=16, device=CPU, gating=True, gate_threshold=1.5)


def test_the_predictor_gates_at_the_configuration_default():
    """A Predictor built without ``gate_threshold`` (a library caller, a bench) gates as
    ``main.py predict`` does by default."""
    assert Predictor(tiny_net(seed=15), tile=32, overlap=16, device=CPU, gating=True).gate_threshold == \
        load_config(None, []).GATE_THRESHOLD == 0.4


@pytest.mark.parametrize("gating", [False, True])
def test_host_transfers_do_not_grow_with_the_batches(monkeypatch, gating):
    """No transfer to the host per batch: the windows of a band are cut, predicted and blended on the
    device, and the host receives finished rows once per band (with gating, plus one transfer of
    the heads' decisions per band where the encoder features of a row of cells fit the device, as
    on a GPU). Counted: every Tensor.cpu / numpy / item / tolist call."""
    calls = []
    for name in ("cpu", "numpy", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    net = tiny_net(seed=13)
    image = _scene((96, 288), seed=14)
    threshold = _median_threshold(net, image, 32)
    counts = []
    for batch in (2, 64):
        predictor = Predictor(net, tile=32, overlap=16, batch_size=batch, device=CPU, gating=gating,
                              gate_threshold=threshold)
        predictor.feature_budget = 2**40  # a GPU's: a whole row of cells' features stays on the device
        calls.clear()
        predictor.predict_array(ArrayImage(image))
        counts.append(len(calls))
    bands = len(window_starts(96, 32, 16))  # 5 rows of windows, 17 windows a row
    assert counts[0] == counts[1] <= (8 if gating else 6) * bands, counts


def test_each_row_is_read_once_on_a_background_thread():
    """Bands overlap by half (tile 32, step 16) but reads do not: every pixel row is read exactly
    once per prediction, off the main thread."""
    net = tiny_net(seed=15)
    image = _scene((128, 96), seed=16)
    reads = []

    class Recorded(ArrayImage):
        chunk_rows = 24  # not a multiple of the step: bands straddle chunks

        def read_window(self, y0, y1, x0, x1):
            reads.append((y0, y1, x0, x1, threading.current_thread() is threading.main_thread()))
            return super().read_window(y0, y1, x0, x1)

    for gating in (False, True):
        reads.clear()
        probs, _ = Predictor(net, tile=32, overlap=16, batch_size=4, device=CPU,
                             gating=gating).predict_array(Recorded(image))
        rows = np.zeros(128, int)
        for y0, y1, x0, x1, _ in reads:
            rows[y0:y1] += 1
            assert (x0, x1) == (0, 96)
        assert rows.tolist() == [1] * 128
        assert not any(main for *_, main in reads)
        assert np.array_equal(probs, Predictor(net, tile=32, overlap=16, batch_size=4, device=CPU,
                                               gating=gating).predict_array(ArrayImage(image))[0])


def test_a_reading_error_reaches_the_caller_and_the_reader_thread_ends():
    class Broken(ArrayImage):
        def read_window(self, y0, y1, x0, x1):
            if y0 >= 32:
                raise OSError("disk gone")
            return super().read_window(y0, y1, x0, x1)

    before = threading.active_count()
    with pytest.raises(OSError, match="disk gone"):
        Predictor(tiny_net(), tile=32, overlap=16, batch_size=4, device=CPU).predict_array(Broken(_scene((96, 64), 1)))
    assert threading.active_count() == before


def test_band_reader_makes_one_band_ahead_from_chunks_read_once():
    made, pulled = [], []
    rows = np.arange(30, dtype=np.float32)[:, None, None] * np.ones((1, 2, 1), np.float32)  # (30, 2, 1)

    def chunks():
        for y0 in range(0, 30, 7):
            pulled.append(y0)
            yield y0, rows[y0:y0 + 7]

    def make(y, band_rows):
        made.append(y)
        return np.ascontiguousarray(band_rows.transpose(2, 0, 1))

    reader = BandReader(chunks(), make, [0, 10, 20], 10, 30, CPU)
    try:
        assert reader.get(0)[0, :, 0].tolist() == list(range(10))
        reader._ready[1].result()  # made ahead while band 0 is used
        assert made == [0, 10] and pulled == [0, 7, 14]  # band 2 waits until band 1 is asked for
        assert reader.get(2)[0, :, 0].tolist() == list(range(20, 30))
        assert pulled == [0, 7, 14, 21, 28]
    finally:
        reader.close()


def test_the_prediction_batch_is_chosen_for_the_device_not_the_training_batch():
    net = tiny_net(seed=17)
    runtime = SimpleNamespace(device=CPU, amp_dtype=None, channels_last=False, threads=1)
    auto = build_predictor(load_config(None, ["BATCH_SIZE=3", "GPUs=[]"]), net, True, runtime, gating=False)
    assert auto.batch_size == CPU_PREDICT_BATCH and "CPU" in auto.batch_note
    set_ = build_predictor(load_config(None, ["BATCH_SIZE=3", "PREDICT_BATCH=5", "GPUs=[]"]), net, True, runtime,
                           gating=False)
    assert set_.batch_size == 5
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        Predictor(net, tile=32, overlap=0, batch_size=0, device=CPU)


def test_predict_batch_below_one_is_refused_by_name():
    from configs import ConfigError

    with pytest.raises(ConfigError, match="PREDICT_BATCH"):
        load_config(None, ["PREDICT_BATCH=0"])


def test_batch_for_memory():
    gib, mib = 2**30, 2**20
    assert batch_for_memory(8 * gib, 40 * mib) == 102  # half of 8 GiB at 40 MiB a window
    assert batch_for_memory(200 * gib, 1 * mib) == MAX_AUTO_BATCH
    assert batch_for_memory(10 * mib, 40 * mib) == 1


def test_a_band_that_does_not_fit_the_gpu_is_blended_on_the_host(monkeypatch, capsys):
    gpu = torch.device("cuda", 0)
    need = band_bytes(1, 1, 128, 16384, gating=True)
    assert need == 4 * 128 * 16384 * (4 + 2 * 2 + 2 + 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need * 10, need * 20))
    assert blending_device(gpu, need, "big.tif") == gpu and capsys.readouterr().out == ""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need, need * 2))
    assert blending_device(gpu, need, "big.tif") == CPU
    assert capsys.readouterr().out.startswith("note: big.tif: a band needs ")
    assert blending_device(CPU, need, "big.tif") == CPU
