"""Whole-image prediction: evenly spaced sliding windows, Gaussian blending, classifier gating.

An image of any size is covered by windows of the tile size whose real step never exceeds the
asked one (:func:`utils.tiling.window_starts`); an image smaller than a tile is padded by
reflection. Each window's probabilities are weighted by a Gaussian importance map
(:func:`utils.tiling.gaussian_importance_map`, σ = tile/8) and the weighted sums are divided by the
summed weights, so neighbouring windows blend without seams. With gating off this is MONAI's
``sliding_window_inference(mode="gaussian")`` with evenly spaced windows.

**Gating.** The heads decide which windows need the decoder (:class:`GatePlan`). The encoder and
both heads run on *cells*, a subset of the windows that still covers the image (every other window
at 50 % overlap); a cell is called boundary where the head's boundary probability exceeds
GATE_THRESHOLD (:func:`boundary_probability`; 0.4 by default, below the classifier's 0.5, so that
a cell it is unsure of is decoded). A boundary cell is decoded from its own
encoder features; the other windows that overlap it, and the filled cells next to it, are encoded
and decoded. Every other cell is single-class: it contributes the one-hot probability of the class
the fill head names, blended with a far smaller weight (:data:`FILL_BLEND_WEIGHT`) so that where a
decoded window overlaps a filled one the decoder's pixels decide.

**Test-time augmentation** (``tta``). Each decoded window is also predicted on mirrored copies
(``flips``: left-right, up-down and both; ``d4``: those and the four transposed ones, the eight
symmetries of the square) and the probabilities, mapped back, are averaged, as nnU-Net mirrors at
inference. The heads decide on the window itself, so gating is unchanged; filled windows cost
nothing more.

**Memory and the device.** Windows are processed one row of windows (a band) at a time, on the
device that runs the network: each band of the image is made on a background thread one band ahead,
from rows each read once (bands overlap, reads do not: :func:`utils.raster.row_chunks`, with
``readers`` threads where the file decodes), uploaded once (from pinned memory on a GPU), and its
windows are cut there; the weighted probabilities and weights of the rows that later windows can
still reach (at most one tile high, the full width) are summed there. The host receives only
finished rows, as class labels (uint8) or, when asked, probabilities, copied while the device works
on the next band. Nothing inside a band waits for the device: not a batch, and with gating one small
transfer of the heads' decisions per band (:meth:`Predictor._gated_row`). A scene of any height
needs memory for one band, not for the image (with gating, plus the input bands of the few rows of
cells that the heads see ahead). Where a band does not fit a GPU's free memory, that image is
blended on the host, with a note (:func:`engines.device_bands.blending_device`). The batch is
PREDICT_BATCH, or chosen from the device's free memory (:func:`engines.device_bands.auto_batch`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from engines.device_bands import BandReader, HostRows, auto_batch, band_bytes, blending_device, feature_budget, upload
from engines.forward import NonFiniteOutput, autocast_for, non_finite
from engines.gating import (FILL_BLEND_WEIGHT, GATE_REACH, GATE_THRESHOLD, GatePlan,  # noqa: F401 (re-exported)
                            cover_indices)
from model.AuxNet import AuxNet
from model.fused import inference_copy
from model.metrics import labels_from_scores
from utils.image_io import to_unit_range
from utils.loggers import progress_bars
from utils.raster import row_chunks
from utils.tiling import gaussian_importance_map, window_starts

_FLIPS = ((), (-1,), (-2,), (-2, -1))  # none, left-right, up-down, both
#: Test-time augmentation: the symmetries each decoded window is also predicted under, as
#: (transpose H and W first, dims flipped); the identity is always the first.
TTA_TRANSFORMS: dict[str, tuple[tuple[bool, tuple[int, ...]], ...]] = {
    "none": ((False, ()),),
    "flips": tuple((False, dims) for dims in _FLIPS),
    "d4": tuple((transpose, dims) for transpose in (False, True) for dims in _FLIPS),
}


@dataclass
class PredictStats:
    """What one image's prediction did."""

    tiles: int = 0
    decoded: int = 0
    classified: int = 0  # windows the heads ran on (gating)
    encoded: int = 0  # encoder passes, one per window without gating
    seconds: float = 0.0

    @property
    def gated_off(self) -> int:
        return self.tiles - self.decoded

    def as_dict(self) -> dict:
        return {"tiles": self.tiles, "decoded": self.decoded, "gated_off": self.gated_off,
                "classified": self.classified, "encoded": self.encoded,
                "seconds": round(self.seconds, 3),
                "tiles_per_s": round(self.tiles / self.seconds, 1) if self.seconds > 0 else None}


@dataclass
class ArrayImage:
    """An image held in memory, with the reader interface of :func:`utils.raster.open_image`.

    Args:
        array: (H, W, C) raw pixel values.
        offset, scale: pixel values become ``(raw - offset) / scale``.
    """

    array: np.ndarray
    offset: float = 0.0
    scale: float = 1.0
    path: str = "<array>"
    height: int = field(init=False)
    width: int = field(init=False)
    channels: int = field(init=False)

    def __post_init__(self):
        if self.array.ndim == 2:
            self.array = self.array[..., None]
        self.height, self.width, self.channels = self.array.shape

    def read_window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.array[y0:y1, x0:x1]

    def normalize(self, window: np.ndarray) -> np.ndarray:
        return to_unit_range(window, self.offset, self.scale)


class Predictor:
    """Sliding-window (optionally gated) prediction of whole images with one network.

    The predictor runs an inference copy of ``net`` in eval mode under ``torch.inference_mode``
    (:func:`model.fused.inference_copy`); ``net`` itself, its mode and its weights are not changed.
    The copy has its BatchNorm folded into the convolutions in fp32 everywhere and, on a CPU where
    oneDNN computes bf16, in bf16 too; on the CPU each convolution also runs with its ReLU in one
    oneDNN call and keeps its bias in fp32 (the same probabilities to ~1e-6 in fp32; in bf16 at
    most the unfused network's own error). Under fp16, and under bf16 elsewhere, BatchNorm is not
    folded: the folded bias would be rounded to the low precision, moving probabilities by up to
    ~0.02 (measured on the default network). Weights that hold NaN or inf are refused here.

    Args:
        net: the network, on ``device``. Gating needs its heads.
        tile: window side (INPUT_SIZE).
        overlap: pixels shared by neighbouring windows (the real overlap may be larger).
        batch_size: windows per forward pass; None: chosen for ``device``
            (:func:`engines.device_bands.auto_batch`; ``batch_note`` says how).
        device, amp_dtype, channels_last: where and how the network runs.
        gating: skip the decoder on windows the head calls boundary-free.
        gate_threshold: boundary probability above which a window is decoded (GATE_THRESHOLD;
            :func:`boundary_probability`). Below the classifier's own 0.5 on purpose: a skipped
            window that held a faint line loses it, a decoded one that did not costs only time.
        gate_reach: filled cells within this many cells of a boundary cell are decoded too
            (see :class:`GatePlan`).
        tta: test-time augmentation of decoded windows, a key of :data:`TTA_TRANSFORMS`.
        progress: show a tqdm bar over windows.
        readers: threads that read (decode) the image's rows ahead of the device, each with its own
            handle, where the file decodes (compressed TIFF, GeoTIFF, JPEG 2000; see
            :func:`utils.raster.row_chunks`): :func:`engines.predict.build_predictor` gives the run's
            CPU threads on a GPU, 1 on the CPU.

    Raises:
        ValueError: gating without the classifier and fill heads, an unknown ``tta``, a
            ``batch_size`` below 1.
        NonFiniteOutput: a weight of ``net`` holds NaN or inf.
    """

    def __init__(self, net: AuxNet, *, tile: int, overlap: int, device: torch.device,
                 batch_size: Optional[int] = None, amp_dtype: Optional[torch.dtype] = None,
                 channels_last: bool = False, gating: bool = False, gate_threshold: float = GATE_THRESHOLD,
                 gate_reach: int = GATE_REACH, tta: str = "none", progress: bool = False, readers: int = 1):
        if gating and (net.head is None or net.fill_head is None):
            raise ValueError("gated prediction needs the classifier and fill heads; this network has none "
                             "(MODEL=UNet): use GATING=false")
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap={overlap} must be in [0, tile={tile})")
        if tta not in TTA_TRANSFORMS:
            raise ValueError(f"tta={tta!r}: choose one of {' | '.join(TTA_TRANSFORMS)}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 (or None: chosen for the device)")
        check_finite(net)
        # a copy: the caller's network is untouched (see the class docstring)
        self.net = inference_copy(net, amp_dtype)
        self.tile, self.step = tile, tile - overlap
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last
        if not 0 <= gate_threshold <= 1:
            raise ValueError(f"gate_threshold={gate_threshold} must be in [0, 1]")
        self.gating, self.gate_threshold, self.gate_reach, self.progress = gating, gate_threshold, gate_reach, progress
        self.transforms = TTA_TRANSFORMS[tta]
        self.readers = max(1, int(readers))
        self.channels = net.outc.out_channels  # K: 1 = binary (foreground probability)
        weights = torch.from_numpy(gaussian_importance_map(tile))[None]  # (1, t, t)
        # A filled window is the head's guess for the whole window; where a decoded window overlaps
        # it, the decoder's pixels should decide, so fills blend with a far smaller weight (alone,
        # a fill still gives its class: the weight cancels in the division).
        self.weights, self.fill_weights = weights, weights * np.float32(FILL_BLEND_WEIGHT)
        if batch_size is None:
            batch_size, self.batch_note = auto_batch(self._decode_windows, _in_channels(net), tile, device)
        else:
            self.batch_note = f"{batch_size} (PREDICT_BATCH)"
        self.batch_size = batch_size
        # encoder features of a row of cells kept on the device until the band's one transfer
        self.feature_budget = feature_budget(device)

    # ------------------------------------------------------------------ results
    def predict_array(self, image) -> tuple[np.ndarray, PredictStats]:
        """Probabilities (K, H, W) float32 of a whole image, and the stats."""
        out = np.empty((self.channels, image.height, image.width), np.float32)
        stats = PredictStats()
        for y0, probs in self.bands(image, stats):
            out[:, y0:y0 + probs.shape[1]] = probs
        return out, stats

    def run(self, image, mask_writer, prob_writer=None, seg_threshold: float = 0.5,
            seen: Optional[Callable[[int, np.ndarray], None]] = None) -> PredictStats:
        """Predict ``image`` band by band into writers (``write_rows(y0, rows)``): class indices
        (H, W) uint8 into ``mask_writer``, probabilities (H, W, K) float32 into ``prob_writer``. The
        labels are made on the device; the probabilities leave it only for a ``prob_writer``.
        ``seen(y0, rows)`` is called with every row of the image's raw pixels once, as they are read
        (on the reading thread), e.g. to keep a preview (:class:`utils.raster_write.OverlaySample`)."""
        stats = PredictStats()
        for y0, labels, probs in self._blend(image, stats, seg_threshold, prob_writer is not None, seen):
            mask_writer.write_rows(y0, labels)
            if prob_writer is not None:
                prob_writer.write_rows(y0, probs.transpose(1, 2, 0))
        return stats

    def bands(self, image, stats: Optional[PredictStats] = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first row, probabilities (K, rows, W) float32)`` of finished rows, top to bottom.

        ``image`` has the reader interface (``height``, ``width``, ``read_window``, ``normalize``).

        Raises:
            NonFiniteOutput (a RunError): the network produced non-finite probabilities (naming the rows).
        """
        for y0, _, probs in self._blend(image, stats if stats is not None else PredictStats(), None, True):
            yield y0, probs

    def labels(self, probs: np.ndarray, seg_threshold: float = 0.5) -> np.ndarray:
        """Class indices (rows, W) uint8 of probabilities (K, rows, W), by the metrics' rule
        (:func:`model.metrics.labels_from_scores`)."""
        scores = torch.from_numpy(np.ascontiguousarray(probs))[None]  # torch takes no negative strides
        return labels_from_scores(scores, seg_threshold)[0].numpy().astype(np.uint8)

    # ------------------------------------------------------------------ the engine
    @torch.inference_mode()
    def _blend(self, image, stats: PredictStats, seg_threshold: Optional[float], want_probs: bool,
               seen: Optional[Callable[[int, np.ndarray], None]] = None,
               ) -> Iterator[tuple[int, Optional[np.ndarray], Optional[np.ndarray]]]:
        """Yield ``(first row, labels (rows, W) uint8 or None, probabilities (K, rows, W) or None)`` of
        finished rows on the host, top to bottom: labels when ``seg_threshold`` is given,
        probabilities when ``want_probs``. See :meth:`bands` for what it raises."""
        started = time.perf_counter()
        h, w, t, k = image.height, image.width, self.tile, self.channels
        hp, wp = max(h, t), max(w, t)  # an image smaller than a tile is padded to one
        ys, xs = window_starts(hp, t, self.step), window_starts(wp, t, self.step)
        store = blending_device(self.device, band_bytes(image.channels, k, t, wp, self.gating), str(image.path))
        # the columns of every window's pixels: windows are cut and blended by index, on the device
        cols = upload(np.array(xs)[:, None] + np.arange(t), store)
        plan = GatePlan(ys, xs, t, self.gate_reach, store) if self.gating else None
        weights = (self.weights.to(store), self.fill_weights.to(store))
        acc = torch.zeros((k, t, wp), device=store)  # rows [lo, lo + t) of the weighted sums
        wsum = torch.zeros((t, wp), device=store)
        lo = 0
        bar = tqdm(total=len(ys) * len(xs), desc="tiles", unit="tile", leave=False,
                   disable=not (self.progress and progress_bars()))
        chunks = _seen(row_chunks(image, self.readers), seen)
        reader = BandReader(chunks, lambda y, rows: self._make_band(image, rows, wp), ys, t, h, store)
        host = HostRows()
        try:
            for i, y in enumerate(ys):
                if y > lo:  # no later window reaches rows < y: hand them out
                    done = host.put(lo, self._finished(acc, wsum, lo, y, h, w, seg_threshold, want_probs))
                    if done is not None:
                        yield _checked(*done)
                    acc, wsum, lo = _shifted(acc, y - lo), _shifted(wsum, y - lo), y
                if plan is None:
                    self._decode_into(acc, wsum, reader.get(i), cols, weights[0])
                    stats.encoded += len(xs)
                    stats.decoded += len(xs)
                else:
                    self._gated_row(plan, reader, i, acc, wsum, cols, weights, stats)
                stats.tiles += len(xs)
                reader.drop(i)
                bar.update(len(xs))
            last = self._finished(acc, wsum, lo, hp, h, w, seg_threshold, want_probs)
            for done in (host.put(lo, last) if last is not None else None, host.flush()):
                if done is not None:
                    yield _checked(*done)
        finally:
            reader.close()
            bar.close()
        stats.seconds += time.perf_counter() - started

    def _gated_row(self, plan: GatePlan, reader: BandReader, i: int, acc: torch.Tensor, wsum: torch.Tensor,
                   cols: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], stats: PredictStats) -> None:
        """Blend the windows of row ``i`` that contribute into ``acc`` / ``wsum``.

        The heads run on the plan's cell rows that decide about row ``i`` and were not seen yet (a
        few rows ahead at most), batched across the row; the windows of row ``i`` that must be
        decoded are found on the device (:meth:`GatePlan.decode_mask`). Then, in one transfer, the
        host learns the heads' and the plan's decisions: it decodes the boundary cells from their
        own features, and encodes and decodes the windows the plan names, batched."""
        pending: list[_Cells] = []  # cells whose heads ran, waiting to be decoded from their features
        for r in plan.cell_rows_reaching(i):
            if r not in plan.heads:
                self._heads_of_row(plan, r, reader.get(r), cols, pending, stats)
        need = plan.decode_mask(i)
        flags = torch.cat([c.boundary for c in pending] + [need]).cpu().numpy()  # the band's one transfer
        self._decode_cells(plan, pending, flags[:-len(need)])
        extra = np.flatnonzero(flags[-len(need):])
        if plan.is_cell_row(i):  # its cells, but those decoded again below (weight 0)
            cells, boundary = upload(np.array(plan.cell_cols), acc.device), plan.heads[i]
            scale = torch.where(boundary, 1.0, np.float32(FILL_BLEND_WEIGHT)) * ~need[cells]
            _accumulate(acc, wsum, cols[cells], plan.probs.pop(i), weights[0] * scale[:, None, None, None])
            stats.decoded += int(plan.boundary_flags[i].sum())
        if len(extra):
            self._decode_into(acc, wsum, reader.get(i), cols[upload(extra, acc.device)], weights[0])
        stats.encoded += len(extra)
        stats.decoded += len(extra)

    def _heads_of_row(self, plan: GatePlan, r: int, band: torch.Tensor, cols: torch.Tensor,
                      pending: list["_Cells"], stats: PredictStats) -> None:
        """The heads on the cells of row ``r``, batched: their boundary flags into ``plan.heads``,
        each cell's fill (one-hot of the fill head's class) into ``plan.probs``, and each batch's
        encoder features into ``pending`` for the boundary cells' decoding. Past
        :attr:`feature_budget` the pending cells are decoded at once (a transfer of their flags)."""
        cells = cols[upload(np.array(plan.cell_cols), cols.device)]
        n, t = len(plan.cell_cols), self.tile
        plan.probs[r] = torch.empty((n, self.channels, t, t), device=cols.device)
        plan.boundary_flags[r] = np.zeros(n, bool)
        flags = []
        for start in range(0, n, self.batch_size):
            x = self._cut(band, cells[start:start + self.batch_size])
            features, boundary, fill = self._encode_heads(x)
            plan.probs[r][start:start + len(x)] = _one_hot_fill(fill, self.channels, t).to(cols.device)
            flags.append(boundary.to(cols.device))
            pending.append(_Cells(r, start, x, features, flags[-1]))
            if sum(c.nbytes for c in pending) > self.feature_budget:
                self._decode_cells(plan, pending, torch.cat([c.boundary for c in pending]).cpu().numpy())
                pending.clear()
        plan.heads[r] = torch.cat(flags)
        stats.classified += n
        stats.encoded += n

    def _decode_cells(self, plan: GatePlan, pending: list["_Cells"], flags: np.ndarray) -> None:
        """Decode the boundary cells of ``pending`` (``flags``: their boundary flags, in order) from
        their own encoder features into ``plan.probs``."""
        offset = 0
        for c in pending:
            own = flags[offset:offset + len(c.x)]
            offset += len(c.x)
            plan.boundary_flags[c.row][c.start:c.start + len(own)] = own
            if own.any():
                keep = upload(np.flatnonzero(own), c.x.device)
                probs = self._decode_features(c.features, keep, c.x)
                plan.probs[c.row][c.start + keep.to(plan.probs[c.row].device)] = probs.to(plan.probs[c.row].device)

    def _decode_into(self, acc: torch.Tensor, wsum: torch.Tensor, band: torch.Tensor, cols: torch.Tensor,
                     weights: torch.Tensor) -> None:
        """Encode, decode and blend the windows of ``band`` at ``cols`` (n, t), batched."""
        for start in range(0, len(cols), self.batch_size):
            idx = cols[start:start + self.batch_size]
            _accumulate(acc, wsum, idx, self._decode_windows(self._cut(band, idx)), weights)

    def _cut(self, band: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The windows (n, C, t, t) of ``band`` (C, t, W) at pixel columns ``cols`` (n, t), on the
        network's device in its memory format."""
        windows = band[:, :, cols].permute(2, 0, 1, 3).to(self.device, non_blocking=True)
        return windows.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _make_band(self, image, rows: np.ndarray, wp: int) -> np.ndarray:
        """A band from the image's raw ``rows`` [y, y + tile) (fewer at the bottom), normalised and
        reflect-padded: (C, tile, wp) float32."""
        rows = image.normalize(rows)
        pad_y, pad_x = self.tile - rows.shape[0], wp - rows.shape[1]
        if pad_y or pad_x:
            rows = np.pad(rows, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect" if min(rows.shape[:2]) > 1
                          else "edge")
        return np.require(rows.transpose(2, 0, 1), np.float32, ["C_CONTIGUOUS", "WRITEABLE"])

    @torch.inference_mode()
    def _decode_windows(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (n, K, t, t) float32 of a batch of windows, encoded and decoded."""
        with autocast_for(self.device, self.amp_dtype):
            return self._augmented(x, _probabilities(self.net.decode(*self.net.encode(x))))

    @torch.inference_mode()
    def _encode_heads(self, x: torch.Tensor) -> tuple[tuple, torch.Tensor, torch.Tensor]:
        """The encoder and heads on a batch of windows: (encoder features, boundary (n,) bool, fill
        class (n,)), all on the device. A window is boundary where :func:`boundary_probability`
        exceeds the gate threshold."""
        with autocast_for(self.device, self.amp_dtype):
            skips, bottleneck = self.net.encode(x)
            cls, fill = self.net.classify(bottleneck)
        return (skips, bottleneck), boundary_probability(cls) > self.gate_threshold, fill.float().argmax(1)

    @torch.inference_mode()
    def _decode_features(self, features: tuple, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (len(keep), K, t, t) of the windows ``keep`` of a batch, decoded from the
        batch's encoder ``features`` (the windows ``x`` for test-time augmentation)."""
        skips, bottleneck = features
        with autocast_for(self.device, self.amp_dtype):
            seg = self.net.decode([s[keep] for s in skips], bottleneck[keep])
            return self._augmented(x[keep], _probabilities(seg))

    def _augmented(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` (the windows ``x`` as they are) averaged with the probabilities of the windows'
        test-time symmetries, each mapped back (the identity only without TTA)."""
        if len(self.transforms) == 1:
            return probs
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        total = probs.clone()
        for transpose, dims in self.transforms[1:]:
            y = x.transpose(-2, -1) if transpose else x
            y = (y.flip(dims) if dims else y).contiguous(memory_format=fmt)
            p = _probabilities(self.net.decode(*self.net.encode(y)))
            p = p.flip(dims) if dims else p
            total += p.transpose(-2, -1) if transpose else p
        return total / len(self.transforms)

    def _finished(self, acc: torch.Tensor, wsum: torch.Tensor, lo: int, hi: int, h: int, w: int,
                  seg_threshold: Optional[float], want_probs: bool) -> Optional[list]:
        """Rows [lo, hi) (only those inside the image), blended on the device: [labels or None,
        probabilities or None, all finite (1,) bool]; None when no row is inside."""
        end = min(hi, h)
        if end <= lo:
            return None
        probs = acc[:, :end - lo, :w] / wsum[:end - lo, :w]
        labels = None
        if seg_threshold is not None:
            labels = labels_from_scores(probs[None], seg_threshold)[0].to(torch.uint8)
        return [labels, probs if want_probs else None, torch.isfinite(probs).all()[None]]


@dataclass
class _Cells:
    """A batch of cells whose heads ran: the decoder may still need their encoder features."""

    row: int
    start: int  # position of the first in the row's cells
    x: torch.Tensor
    features: tuple
    boundary: torch.Tensor

    @property
    def nbytes(self) -> int:
        skips, bottleneck = self.features
        return sum(f.numel() * f.element_size() for f in (*skips, bottleneck))


def _seen(chunks: Iterator[tuple[int, np.ndarray]],
          seen: Optional[Callable[[int, np.ndarray], None]]) -> Iterator[tuple[int, np.ndarray]]:
    """``chunks``, each also passed to ``seen`` (when given) as it goes by."""
    try:
        for y0, rows in chunks:
            if seen is not None:
                seen(y0, rows)
            yield y0, rows
    finally:
        chunks.close()  # the row readers stop with this generator


def _checked(y0: int, rows: list) -> tuple[int, Optional[np.ndarray], Optional[np.ndarray]]:
    """``(y0, labels, probabilities)`` of finished rows, once their finite flag says they are finite."""
    labels, probs, finite = rows
    if not finite[0]:  # the caller knows where the weights came from, and words the fix
        n = (labels if labels is not None else probs[0]).shape[0]
        raise NonFiniteOutput(f"the network produced non-finite probabilities in rows {y0}..{y0 + n - 1}: its "
                              "weights are NaN, or so large that its outputs overflow")
    return y0, labels, probs


def _accumulate(acc: torch.Tensor, wsum: torch.Tensor, cols: torch.Tensor, probs: torch.Tensor,
                weights: torch.Tensor) -> None:
    """Add windows' weighted probabilities and weights at their pixel columns, on ``acc``'s device.

    Shape:
        acc: (K, t, W); wsum: (t, W); cols: (n, t); probs: (n, K, t, t); weights: (1 or n, 1, t, t).
    """
    n, k, t, _ = probs.shape
    weights = weights.expand(n, 1, t, t)
    flat = cols.reshape(-1)
    acc.index_add_(2, flat, (probs.to(acc.device) * weights).permute(1, 2, 0, 3).reshape(k, t, n * t))
    wsum.index_add_(1, flat, weights[:, 0].permute(1, 0, 2).reshape(t, n * t))


def _shifted(a: torch.Tensor, k: int) -> torch.Tensor:
    """``a`` with rows k.. of its last-but-one axis moved to the front, zeros after them."""
    out = torch.zeros_like(a)
    out[..., : a.shape[-2] - k, :] = a[..., k:, :]
    return out


def check_finite(net: torch.nn.Module) -> None:
    """Raise :class:`NonFiniteOutput` naming the first weight of ``net`` that holds NaN or inf. Needed
    before prediction, not only after it: a fused ReLU (:mod:`model.fused`) maps NaN to 0, so NaN
    weights need not reach the output."""
    bad = non_finite(net)
    if bad:
        raise NonFiniteOutput(f"the network's weight {bad[0]} holds NaN or infinite values")


def _probabilities(seg_logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (float32, on the logits' device): sigmoid for one channel, else softmax.
    An infinite logit (an overflow; sigmoid and softmax would round it to a finite 0 or 1) gives NaN,
    which the band's finite check reports."""
    x = seg_logits.float()
    x = x + (x - x)  # exact for finite x; inf - inf = NaN
    return torch.sigmoid(x) if x.shape[1] == 1 else torch.softmax(x, dim=1)


def boundary_probability(cls_logits: torch.Tensor) -> torch.Tensor:
    """(n,) float32 probability that each window holds a boundary, from the classifier's (n, J)
    logits: sigmoid of the one output (J = 1), or the softmax of class 1 (J = 2)."""
    x = cls_logits.float()
    return torch.sigmoid(x[:, 0]) if x.shape[1] == 1 else torch.softmax(x, dim=1)[:, 1]


def _one_hot_fill(classes: torch.Tensor, channels: int, tile: int) -> torch.Tensor:
    """(n, K, t, t) probabilities of windows filled with one class each (K = 1: the foreground's)."""
    values = classes.float()[:, None] if channels == 1 else torch.nn.functional.one_hot(classes, channels).float()
    return values[:, :, None, None].expand(len(classes), channels, tile, tile)


def _in_channels(net: AuxNet) -> int:
    """The image channels ``net`` takes (its first convolution's input)."""
    return next(m for m in net.inc.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
