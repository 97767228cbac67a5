"""Whole-image prediction: evenly spaced sliding windows, Gaussian blending, classifier gating.

An image of any size is covered by windows of the tile size whose real step never exceeds the
asked one (:func:`utils.tiling.window_starts`); an image smaller than a tile is padded by
reflection. Each window's probabilities are weighted by a Gaussian importance map
(:func:`utils.tiling.gaussian_importance_map`, σ = tile/8) and the weighted sums are divided by the
summed weights, so neighbouring windows blend without seams. With gating off this is MONAI's
``sliding_window_inference(mode="gaussian")`` with evenly spaced windows.

**Gating.** The heads decide which windows need the decoder (:class:`GatePlan`). The encoder and
both heads run on *cells*, a subset of the windows that still covers the image (every other window
at 50 % overlap); the classifier's call on a cell is made exactly as TTR scores it
(``model.metrics.predict_classes`` with CLS_THRESHOLD). A boundary cell is decoded from its own
encoder features; the other windows that overlap it, and the filled cells next to it, are encoded
and decoded. Every other cell is single-class: it contributes the one-hot probability of the class
the fill head names, blended with a far smaller weight (:data:`FILL_BLEND_WEIGHT`) so that where a
decoded window overlaps a filled one the decoder's pixels decide.

**Test-time augmentation** (``tta``). Each decoded window is also predicted on mirrored copies
(``flips``: left-right, up-down and both; ``d4``: those and the four transposed ones, the eight
symmetries of the square) and the probabilities, mapped back, are averaged, as nnU-Net mirrors at
inference. The heads decide on the window itself, so gating is unchanged; filled windows cost
nothing more.

**Memory.** Windows are processed one row of windows (a band) at a time. Only the rows that later
windows can still reach are kept (at most one tile high, the full width); finished rows are handed
to the caller at once, so a scene of any height needs memory for one band, not for the image (with
gating, plus the input bands of the few rows of cells that the heads see ahead).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from engines.forward import NonFiniteOutput, autocast_for, image_to
from model.AuxNet import AuxNet, fold_batchnorm
from model.metrics import labels_from_scores, predict_classes
from utils.image_io import to_unit_range
from utils.loggers import progress_bars
from utils.tiling import gaussian_importance_map, window_starts

#: Blend weight of a gated-off (filled) window relative to a decoded one.
FILL_BLEND_WEIGHT = 1e-3
#: Windows within this many cells of a boundary cell are decoded too (see :class:`GatePlan`).
GATE_REACH = 1
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

    The predictor runs an inference copy of ``net`` in eval mode under ``torch.inference_mode``;
    ``net`` itself, its mode and its weights are not changed. In fp32 (no ``amp_dtype``) the copy has
    its BatchNorm folded into the convolutions (:func:`model.AuxNet.fold_batchnorm`: the same
    probabilities to ~1e-6, 1.08-1.14x the windows/s on an AVX2 CPU). Under autocast it is not
    folded: the folded bias would be rounded to bf16/fp16, moving probabilities by up to ~0.02
    against the unfolded network's own bf16 error of ~0.004 (measured on the default network).

    Args:
        net: the network. Gating needs its heads.
        tile: window side (INPUT_SIZE).
        overlap: pixels shared by neighbouring windows (the real overlap may be larger).
        batch_size: windows per forward pass.
        device, amp_dtype, channels_last: where and how the network runs.
        gating: skip the decoder on windows the head calls boundary-free.
        cls_threshold: boundary probability above which a window is decoded (one-output heads;
            a two-output head decides by argmax, as :func:`model.metrics.predict_classes`).
        gate_reach: filled cells within this many cells of a boundary cell are decoded too
            (see :class:`GatePlan`).
        tta: test-time augmentation of decoded windows, a key of :data:`TTA_TRANSFORMS`.
        progress: show a tqdm bar over windows.

    Raises:
        ValueError: gating without the classifier and fill heads, or an unknown ``tta``.
    """

    def __init__(self, net: AuxNet, *, tile: int, overlap: int, batch_size: int, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False, gating: bool = False,
                 cls_threshold: float = 0.5, gate_reach: int = GATE_REACH, tta: str = "none",
                 progress: bool = False):
        if gating and (net.head is None or net.fill_head is None):
            raise ValueError("gated prediction needs the classifier and fill heads; this network has none "
                             "(MODEL=UNet): use GATING=false")
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap={overlap} must be in [0, tile={tile})")
        if tta not in TTA_TRANSFORMS:
            raise ValueError(f"tta={tta!r}: choose one of {' | '.join(TTA_TRANSFORMS)}")
        # exact only in fp32 (see the class docstring); a copy either way: the caller's network is untouched
        self.net = fold_batchnorm(net) if amp_dtype is None else copy.deepcopy(net).eval()
        self.tile, self.step, self.batch_size = tile, tile - overlap, batch_size
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last
        self.gating, self.cls_threshold, self.gate_reach, self.progress = gating, cls_threshold, gate_reach, progress
        self.transforms = TTA_TRANSFORMS[tta]
        self.channels = net.outc.out_channels  # K: 1 = binary (foreground probability)
        self.weights = gaussian_importance_map(tile)
        # A filled window is the head's guess for the whole window; where a decoded window overlaps
        # it, the decoder's pixels should decide, so fills blend with a far smaller weight (alone,
        # a fill still gives its class: the weight cancels in the division).
        self.fill_weights = self.weights * np.float32(FILL_BLEND_WEIGHT)

    # ------------------------------------------------------------------ results
    def predict_array(self, image) -> tuple[np.ndarray, PredictStats]:
        """Probabilities (K, H, W) float32 of a whole image, and the stats."""
        out = np.empty((self.channels, image.height, image.width), np.float32)
        stats = PredictStats()
        for y0, probs in self.bands(image, stats):
            out[:, y0:y0 + probs.shape[1]] = probs
        return out, stats

    def run(self, image, mask_writer, prob_writer=None, seg_threshold: float = 0.5) -> PredictStats:
        """Predict ``image`` band by band into writers (``write_rows(y0, rows)``): class indices
        (H, W) uint8 into ``mask_writer``, probabilities (H, W, K) float32 into ``prob_writer``."""
        stats = PredictStats()
        for y0, probs in self.bands(image, stats):
            mask_writer.write_rows(y0, self.labels(probs, seg_threshold))
            if prob_writer is not None:
                prob_writer.write_rows(y0, probs.transpose(1, 2, 0))
        return stats

    def labels(self, probs: np.ndarray, seg_threshold: float = 0.5) -> np.ndarray:
        """Class indices (rows, W) uint8 of probabilities (K, rows, W), by the metrics' rule
        (:func:`model.metrics.labels_from_scores`)."""
        scores = torch.from_numpy(np.ascontiguousarray(probs))[None]  # torch takes no negative strides
        return labels_from_scores(scores, seg_threshold)[0].numpy().astype(np.uint8)

    # ------------------------------------------------------------------ the engine
    def bands(self, image, stats: Optional[PredictStats] = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first row, probabilities (K, rows, W))`` of finished rows, top to bottom.

        ``image`` has the reader interface (``height``, ``width``, ``read_window``, ``normalize``).

        Raises:
            NonFiniteOutput (a RunError): the network produced non-finite probabilities (naming the rows).
        """
        stats = stats if stats is not None else PredictStats()
        started = time.perf_counter()
        h, w, t = image.height, image.width, self.tile
        hp, wp = max(h, t), max(w, t)  # an image smaller than a tile is padded to one
        ys, xs = window_starts(hp, t, self.step), window_starts(wp, t, self.step)
        plan = GatePlan(ys, xs, t, self.gate_reach) if self.gating else None
        acc = np.zeros((self.channels, t, wp), np.float32)  # rows [lo, lo + t) of the weighted sums
        wsum = np.zeros((t, wp), np.float32)
        lo = 0
        bar = tqdm(total=len(ys) * len(xs), desc="tiles", unit="tile", leave=False, disable=not (self.progress and progress_bars()))
        rows = _BandCache(lambda y: self._read_band(image, y, hp, wp))
        for i, y in enumerate(ys):
            if y > lo:  # no later window reaches rows < y: hand them out
                yield from self._finish(acc, wsum, lo, y, h, w)
                _shift(acc, y - lo)
                _shift(wsum, y - lo)
                lo = y
            if plan is None:
                placed = [(x, probs, True) for x, probs in self._decode_row(rows.get(i, y), xs, range(len(xs)))]
                stats.encoded += len(xs)
            else:
                placed = self._gated_row(plan, rows, i, stats)
            for x, probs, decoded in placed:
                weights = self.weights if decoded else self.fill_weights
                acc[:, :, x:x + t] += probs * weights
                wsum[:, x:x + t] += weights
                stats.decoded += int(decoded)
            stats.tiles += len(xs)
            rows.drop(i)
            bar.update(len(xs))
        bar.close()
        yield from self._finish(acc, wsum, lo, hp, h, w)
        stats.seconds += time.perf_counter() - started

    def _gated_row(self, plan: "GatePlan", rows: "_BandCache", i: int, stats: PredictStats) -> list:
        """The windows of row ``i`` that contribute, as ``(x, probabilities (K, t, t), decoded)``.

        Heads run on the plan's cell rows that decide about row ``i`` (a few rows ahead at most):
        a cell is decoded from its own features where its head says boundary, else filled. Then
        the windows that :meth:`GatePlan.needs_decoding` names are encoded and decoded."""
        for r in plan.cell_rows_reaching(i):
            if r not in plan.heads:
                band, cells = rows.get(r, plan.ys[r]), [plan.xs[c] for c in plan.cell_cols]
                probs, decoded = [], []
                for start in range(0, len(cells), self.batch_size):
                    p, d = self._predict_windows(_windows(band, cells[start:start + self.batch_size], self.tile))
                    probs.extend(p)
                    decoded.extend(d)
                plan.record(r, probs, np.array(decoded, bool))
                stats.classified += len(cells)
                stats.encoded += len(cells)
        extra = [j for j in range(len(plan.xs)) if plan.needs_decoding(i, j)]
        stats.encoded += len(extra)
        placed = []
        if i in plan.heads:  # a row of cells: those not decoded again below
            cells = zip(plan.cell_cols, plan.probs.pop(i), plan.heads[i])
            placed = [(plan.xs[c], p, bool(d)) for c, p, d in cells if c not in extra]
        placed += [(x, p, True) for x, p in self._decode_row(rows.get(i, plan.ys[i]), plan.xs, extra)]
        return placed

    def _decode_row(self, band: np.ndarray, xs: list[int], columns) -> Iterator[tuple[int, np.ndarray]]:
        """``(x, probabilities (K, t, t))`` of the windows of ``band`` in ``columns``, decoded."""
        columns = list(columns)
        for start in range(0, len(columns), self.batch_size):
            batch = [xs[j] for j in columns[start:start + self.batch_size]]
            yield from zip(batch, self._decode_windows(_windows(band, batch, self.tile)))

    def _read_band(self, image, y: int, hp: int, wp: int) -> np.ndarray:
        """Rows [y, y + tile) of the (reflect-padded) image, normalised: (C, tile, wp) float32."""
        rows = image.normalize(image.read_window(y, min(y + self.tile, image.height), 0, image.width))
        pad_y, pad_x = self.tile - rows.shape[0], wp - rows.shape[1]
        if pad_y or pad_x:
            rows = np.pad(rows, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect" if min(rows.shape[:2]) > 1
                          else "edge")
        return np.ascontiguousarray(rows.transpose(2, 0, 1))

    @torch.inference_mode()
    def _decode_windows(self, windows: torch.Tensor) -> np.ndarray:
        """Probabilities (n, K, t, t) of a batch of windows, encoded and decoded."""
        x = image_to(windows, self.device, self.channels_last)
        with autocast_for(self.device, self.amp_dtype):
            probs = _probabilities(self.net.decode(*self.net.encode(x)))
            return self._augmented(x, probs).cpu().numpy()

    @torch.inference_mode()
    def _predict_windows(self, windows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Heads on a batch of windows: probabilities (n, K, t, t), decoded (n,) bool. A window the
        classifier calls boundary is decoded from its encoder features; any other is filled with
        the fill head's class."""
        x = image_to(windows, self.device, self.channels_last)
        with autocast_for(self.device, self.amp_dtype):
            skips, bottleneck = self.net.encode(x)
            cls, fill = self.net.classify(bottleneck)
            # the head's decision exactly as TTR scores it
            keep = (predict_classes(cls.float(), self.cls_threshold) == 1).nonzero().flatten()
            out = _one_hot_fill(fill.float().argmax(1), self.channels, self.tile)
            if keep.numel():
                seg = self.net.decode([s[keep] for s in skips], bottleneck[keep])
                out[keep.cpu().numpy()] = self._augmented(x[keep], _probabilities(seg)).cpu().numpy()
        decoded = np.zeros(len(windows), bool)
        decoded[keep.cpu().numpy()] = True
        return out, decoded

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

    def _finish(self, acc, wsum, lo: int, hi: int, h: int, w: int) -> Iterator[tuple[int, np.ndarray]]:
        """Blended probabilities of rows [lo, hi) (only those inside the image)."""
        end = min(hi, h)
        if end <= lo:
            return
        n = end - lo
        probs = acc[:, :n, :w] / wsum[:n, :w]
        if not np.isfinite(probs).all():  # the caller knows where the weights came from, and words the fix
            raise NonFiniteOutput(f"the network produced non-finite probabilities in rows {lo}..{end - 1}: its "
                                  "weights are NaN, or so large that its outputs overflow")
        yield lo, probs


class GatePlan:
    """Which windows of an evenly spaced grid the heads see, and which are decoded.

    The heads run on *cells*: the fewest windows of the grid, per axis, whose neighbours are at
    most a tile apart (every other window at 50 % overlap; see :func:`cover_indices`), so the cells
    cover the image. A cell the classifier calls boundary is decoded from its own features; the
    others are filled with the fill head's class. Then these windows are encoded and decoded:

    * a window that is not a cell and overlaps a boundary cell (every window that sees a part of
      it, as a plain sliding window would);
    * a filled cell next to a boundary cell (within ``reach`` cells): a boundary the head missed in
      a cell lies most often beside one it found, where an object crosses the cells' edge.

    A scene without boundaries costs one encoder pass per cell, about a quarter of the windows at
    50 % overlap. Measured on the 4096² scene of ``bench/inference.py`` (3,969 windows, 1,024
    cells): reach 0 decoded 681 windows and lost 0.013 Dice against the plain sliding window;
    reach 1 decoded 866 (185 cells encoded a second time) and lost 0.0001.

    Args:
        ys, xs: window starts of the grid (rows, columns).
        tile: window side.
        reach: neighbourhood of a boundary cell (in cells) whose filled cells are decoded too.
    """

    def __init__(self, ys: list[int], xs: list[int], tile: int, reach: int = GATE_REACH):
        self.ys, self.xs = ys, xs
        self.cell_rows, self.cell_cols = cover_indices(ys, tile), cover_indices(xs, tile)
        self._col_index = {c: k for k, c in enumerate(self.cell_cols)}
        self._row_index = {r: k for k, r in enumerate(self.cell_rows)}
        # the cells each window overlaps, per axis (as positions in cell_rows / cell_cols)
        self._rows_touch = [[k for k, r in enumerate(self.cell_rows) if abs(ys[r] - y) < tile] for y in ys]
        self._cols_touch = [[k for k, c in enumerate(self.cell_cols) if abs(xs[c] - x) < tile] for x in xs]
        self.reach = reach
        self.heads: dict[int, np.ndarray] = {}  # cell row -> boundary flag per cell column
        self.probs: dict[int, list] = {}  # cell row -> probabilities per cell, until placed

    def cell_rows_reaching(self, i: int) -> list[int]:
        """The cell rows (grid row indices) whose heads decide about window row ``i``."""
        return [self.cell_rows[k] for k in _widen(self._rows_touch[i], self.reach, len(self.cell_rows))]

    def record(self, r: int, probs: list, boundary: np.ndarray) -> None:
        self.heads[r], self.probs[r] = boundary, probs

    def needs_decoding(self, i: int, j: int) -> bool:
        """Window (i, j) must be decoded (again): a cell whose head said no boundary but one of its
        neighbours (within ``reach`` cells) did, or any other window that overlaps a boundary cell."""
        if i in self._row_index and j in self._col_index:
            r, c = self._row_index[i], self._col_index[j]
            if self.heads[i][c]:
                return False  # decoded from its own features already
            rows, cols = _widen([r], self.reach, len(self.cell_rows)), _widen([c], self.reach, len(self.cell_cols))
        else:
            rows, cols = self._rows_touch[i], self._cols_touch[j]
        return any(self.heads[self.cell_rows[k]][cols].any() for k in rows)


def _widen(indices: list[int], reach: int, n: int) -> np.ndarray:
    """``indices`` (consecutive) and ``reach`` more on each side, within [0, n)."""
    return np.arange(max(indices[0] - reach, 0), min(indices[-1] + reach + 1, n))


def cover_indices(starts: list[int], tile: int) -> list[int]:
    """The fewest of ``starts`` (always the first and last) whose neighbours are at most ``tile``
    apart, so that their windows still cover everything the windows of all ``starts`` cover."""
    keep = [0]
    while keep[-1] < len(starts) - 1:
        cur = keep[-1]
        reach = [j for j in range(cur + 1, len(starts)) if starts[j] - starts[cur] <= tile]
        keep.append(reach[-1] if reach else cur + 1)
    return keep


class _BandCache:
    """The bands of the rows of windows, read once each and kept until their row is placed (a cell
    row is read one row early, for its heads)."""

    def __init__(self, read):
        self._read, self._bands = read, {}

    def get(self, i: int, y: int) -> np.ndarray:
        if i not in self._bands:
            self._bands[i] = self._read(y)
        return self._bands[i]

    def drop(self, i: int) -> None:
        self._bands.pop(i, None)


def _windows(band: np.ndarray, xs: list[int], tile: int) -> torch.Tensor:
    """(n, C, t, t) windows of a band at columns ``xs``."""
    return torch.from_numpy(np.stack([band[:, :, x:x + tile] for x in xs]))


def _shift(a: np.ndarray, k: int) -> None:
    """Move rows k.. of the last-but-one axis to the front, in place; zeros after them."""
    a[..., : a.shape[-2] - k, :] = a[..., k:, :]  # numpy copies overlapping slices correctly
    a[..., a.shape[-2] - k:, :] = 0


def _probabilities(seg_logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (float32, on the logits' device): sigmoid for one channel, else softmax."""
    x = seg_logits.float()
    return torch.sigmoid(x) if x.shape[1] == 1 else torch.softmax(x, dim=1)


def _one_hot_fill(classes: torch.Tensor, channels: int, tile: int) -> np.ndarray:
    """(n, K, t, t) probabilities of windows filled with one class each (K = 1: the foreground's)."""
    c = classes.cpu().numpy()
    if channels == 1:
        values = c[:, None].astype(np.float32)
    else:
        values = np.eye(channels, dtype=np.float32)[c]
    return np.ascontiguousarray(np.broadcast_to(values[:, :, None, None], (len(c), channels, tile, tile)))

