"""Whole-image prediction: evenly spaced sliding windows, Gaussian blending, classifier gating.

An image of any size is covered by windows of the tile size whose real step never exceeds the
asked one (:func:`utils.tiling.window_starts`); an image smaller than a tile is padded by
reflection. Each window's probabilities are weighted by a Gaussian importance map
(:func:`utils.tiling.gaussian_importance_map`, σ = tile/8) and the weighted sums are divided by the
summed weights, so neighbouring windows blend without seams. With gating off this is MONAI's
``sliding_window_inference(mode="gaussian")`` with evenly spaced windows.

**Gating.** The encoder and both heads run on every window, in batches; the decoder runs only on
the windows the classifier head calls "contains a boundary" (decided as TTR scores it:
``model.metrics.predict_classes`` with CLS_THRESHOLD), reusing the encoder's
features. Every other window is single-class: it contributes the one-hot probability of the class
the fill head names, blended with a far smaller weight (:data:`FILL_BLEND_WEIGHT`) so that where a
decoded window overlaps a filled one the decoder's pixels decide.

**Memory.** Windows are processed one row of windows (a band) at a time. Only the rows that later
windows can still reach are kept (at most one tile high, the full width); finished rows are handed
to the caller at once, so a scene of any height needs memory for one band, not for the image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from engines.forward import autocast_for, image_to
from model.AuxNet import AuxNet
from model.metrics import predict_classes
from utils.image_io import to_unit_range
from utils.tiling import gaussian_importance_map, window_starts
from utils.util import RunError

#: Blend weight of a gated-off (filled) window relative to a decoded one.
FILL_BLEND_WEIGHT = 1e-3


@dataclass
class PredictStats:
    """What one image's prediction did."""

    tiles: int = 0
    decoded: int = 0
    seconds: float = 0.0

    @property
    def gated_off(self) -> int:
        return self.tiles - self.decoded

    def as_dict(self) -> dict:
        return {"tiles": self.tiles, "decoded": self.decoded, "gated_off": self.gated_off,
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

    Args:
        net: the network (eval mode is set here). Gating needs its heads.
        tile: window side (INPUT_SIZE).
        overlap: pixels shared by neighbouring windows (the real overlap may be larger).
        batch_size: windows per forward pass.
        device, amp_dtype, channels_last: where and how the network runs.
        gating: skip the decoder on windows the head calls boundary-free.
        cls_threshold: boundary probability above which a window is decoded (one-output heads;
            a two-output head decides by argmax, as :func:`model.metrics.predict_classes`).
        progress: show a tqdm bar over windows.

    Raises:
        ValueError: gating without the classifier and fill heads.
    """

    def __init__(self, net: AuxNet, *, tile: int, overlap: int, batch_size: int, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False, gating: bool = False,
                 cls_threshold: float = 0.5, progress: bool = False):
        if gating and (net.head is None or net.fill_head is None):
            raise ValueError("gated prediction needs the classifier and fill heads; this network has none "
                             "(MODEL=UNet): use GATING=false")
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap={overlap} must be in [0, tile={tile})")
        self.net = net.eval()
        self.tile, self.step, self.batch_size = tile, tile - overlap, batch_size
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last
        self.gating, self.cls_threshold, self.progress = gating, cls_threshold, progress
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
        (H, W) uint8 into ``mask_writer``, probabilities (H, W, K) float16 into ``prob_writer``."""
        stats = PredictStats()
        for y0, probs in self.bands(image, stats):
            mask_writer.write_rows(y0, self.labels(probs, seg_threshold))
            if prob_writer is not None:
                prob_writer.write_rows(y0, probs.transpose(1, 2, 0).astype(np.float16))
        return stats

    def labels(self, probs: np.ndarray, seg_threshold: float = 0.5) -> np.ndarray:
        """Class indices (rows, W) uint8 of probabilities (K, rows, W), as the metrics threshold them."""
        if probs.shape[0] == 1:
            return (probs[0] > seg_threshold).astype(np.uint8)
        return probs.argmax(0).astype(np.uint8)

    # ------------------------------------------------------------------ the engine
    def bands(self, image, stats: Optional[PredictStats] = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first row, probabilities (K, rows, W))`` of finished rows, top to bottom.

        ``image`` has the reader interface (``height``, ``width``, ``read_window``, ``normalize``).

        Raises:
            RunError: the network produced non-finite probabilities (naming the rows).
        """
        stats = stats if stats is not None else PredictStats()
        started = time.perf_counter()
        h, w, t = image.height, image.width, self.tile
        hp, wp = max(h, t), max(w, t)  # an image smaller than a tile is padded to one
        ys, xs = window_starts(hp, t, self.step), window_starts(wp, t, self.step)
        acc = np.zeros((self.channels, t, wp), np.float32)  # rows [lo, lo + t) of the weighted sums
        wsum = np.zeros((t, wp), np.float32)
        lo = 0
        bar = tqdm(total=len(ys) * len(xs), desc="tiles", unit="tile", leave=False, disable=not self.progress)
        for y in ys:
            if y > lo:  # no later window reaches rows < y: hand them out
                yield from self._finish(acc, wsum, lo, y, h, w)
                _shift(acc, y - lo)
                _shift(wsum, y - lo)
                lo = y
            band = self._read_band(image, y, hp, wp)
            for start in range(0, len(xs), self.batch_size):
                batch = xs[start:start + self.batch_size]
                windows = np.stack([band[:, :, x:x + t] for x in batch])
                probs, decoded = self._predict_windows(torch.from_numpy(windows))
                for k, x in enumerate(batch):
                    weights = self.weights if decoded[k] else self.fill_weights
                    acc[:, :, x:x + t] += probs[k] * weights
                    wsum[:, x:x + t] += weights
                stats.tiles += len(batch)
                stats.decoded += int(decoded.sum())
                bar.update(len(batch))
        bar.close()
        yield from self._finish(acc, wsum, lo, hp, h, w)
        stats.seconds += time.perf_counter() - started

    def _read_band(self, image, y: int, hp: int, wp: int) -> np.ndarray:
        """Rows [y, y + tile) of the (reflect-padded) image, normalised: (C, tile, wp) float32."""
        rows = image.normalize(image.read_window(y, min(y + self.tile, image.height), 0, image.width))
        pad_y, pad_x = self.tile - rows.shape[0], wp - rows.shape[1]
        if pad_y or pad_x:
            rows = np.pad(rows, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect" if min(rows.shape[:2]) > 1
                          else "edge")
        return np.ascontiguousarray(rows.transpose(2, 0, 1))

    @torch.no_grad()
    def _predict_windows(self, windows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (n, K, t, t) of a batch of windows, and which were decoded (n,) bool."""
        x = image_to(windows, self.device, self.channels_last)
        with autocast_for(self.device, self.amp_dtype):
            skips, bottleneck = self.net.encode(x)
            if not self.gating:
                return _probabilities(self.net.decode(skips, bottleneck)), np.ones(len(windows), bool)
            cls, fill = self.net.classify(bottleneck)
            # the head's decision exactly as TTR scores it
            keep = (predict_classes(cls.float(), self.cls_threshold) == 1).nonzero().flatten()
            out = _one_hot_fill(fill.float().argmax(1), self.channels, self.tile)
            if keep.numel():
                seg = self.net.decode([s[keep] for s in skips], bottleneck[keep])
                out[keep.cpu().numpy()] = _probabilities(seg)
        decoded = np.zeros(len(windows), bool)
        decoded[keep.cpu().numpy()] = True
        return out, decoded

    def _finish(self, acc, wsum, lo: int, hi: int, h: int, w: int) -> Iterator[tuple[int, np.ndarray]]:
        """Blended probabilities of rows [lo, hi) (only those inside the image)."""
        end = min(hi, h)
        if end <= lo:
            return
        n = end - lo
        probs = acc[:, :n, :w] / wsum[:n, :w]
        if not np.isfinite(probs).all():
            raise RunError(f"the network produced non-finite probabilities in rows {lo}..{end - 1}: "
                           "the checkpoint's weights are not usable (retrain or check MODEL_WEIGHTS)")
        yield lo, probs


def _shift(a: np.ndarray, k: int) -> None:
    """Move rows k.. of the last-but-one axis to the front, in place; zeros after them."""
    a[..., : a.shape[-2] - k, :] = a[..., k:, :]  # numpy copies overlapping slices correctly
    a[..., a.shape[-2] - k:, :] = 0


def _probabilities(seg_logits: torch.Tensor) -> np.ndarray:
    x = seg_logits.float()
    p = torch.sigmoid(x) if x.shape[1] == 1 else torch.softmax(x, dim=1)
    return p.cpu().numpy()


def _one_hot_fill(classes: torch.Tensor, channels: int, tile: int) -> np.ndarray:
    """(n, K, t, t) probabilities of windows filled with one class each (K = 1: the foreground's)."""
    c = classes.cpu().numpy()
    if channels == 1:
        values = c[:, None].astype(np.float32)
    else:
        values = np.eye(channels, dtype=np.float32)[c]
    return np.ascontiguousarray(np.broadcast_to(values[:, :, None, None], (len(c), channels, tile, tile)))

