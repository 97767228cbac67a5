"""What keeps the device of a whole-image prediction busy: bands of the image made ahead on a
thread from rows each read once (by several readers at once where the file decodes) and uploaded
once (:class:`BandReader`), finished rows copied back while the device works
on the next band (:class:`HostRows`), and the prediction batch and blending device chosen from
the device's free memory (:func:`auto_batch`, :func:`blending_device`).

On the CPU, host and device are the same memory: the uploads and copies are no-ops, and the same
code runs.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Iterator, Optional

import numpy as np
import torch

#: Windows per forward pass on the CPU when PREDICT_BATCH is null. Measured with the default network
#: (128² windows, fp32, BatchNorm folded), one thread on a shared 2-core x86 CPU: 30.6, 32.8, 29.9,
#: 25.0 and 21.2 windows/s at batches of 4, 8, 16, 32 and 64 (larger batches leave the caches).
CPU_PREDICT_BATCH = 8
#: The largest automatic batch on a GPU (beyond it a batch no longer runs faster, it only holds memory).
MAX_AUTO_BATCH = 512
#: Share of the device's free memory the automatic batch may use (the rest: bands, blending, caches).
BATCH_MEMORY_SHARE = 0.5
#: Share of the device's free memory the blending of one band may use before it moves to the host.
BAND_MEMORY_SHARE = 0.25


def batch_for_memory(free_bytes: int, per_window_bytes: int, share: float = BATCH_MEMORY_SHARE,
                     cap: int = MAX_AUTO_BATCH) -> int:
    """The most windows a forward pass may take: ``share`` of ``free_bytes`` at ``per_window_bytes``
    each, at least 1 and at most ``cap``."""
    return int(max(1, min(cap, share * free_bytes // max(per_window_bytes, 1))))


def auto_batch(forward: Callable[[torch.Tensor], object], channels: int, tile: int,
               device: torch.device) -> tuple[int, str]:
    """The prediction batch for ``device``, and how it was chosen (for the run's notes).

    CPU: :data:`CPU_PREDICT_BATCH`. CUDA: one probe batch of 4 windows through ``forward`` measures
    the device memory a window needs (the allocator's peak over what was allocated before); the
    batch is :func:`batch_for_memory` of ``torch.cuda.mem_get_info``'s free memory.
    """
    if device.type != "cuda":
        return CPU_PREDICT_BATCH, f"{CPU_PREDICT_BATCH} (the CPU's)"
    probe = 4
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    forward(torch.zeros(probe, channels, tile, tile, device=device))
    torch.cuda.synchronize(device)
    per_window = (torch.cuda.max_memory_allocated(device) - before) // probe
    free, _ = torch.cuda.mem_get_info(device)
    batch = batch_for_memory(free, per_window)
    return batch, f"{batch} (auto: {free / 2**30:.1f} GiB free on {device}, {per_window / 2**20:.1f} MiB a window)"


def feature_budget(device: torch.device) -> int:
    """Bytes of encoder features that gated prediction may keep on ``device`` until the heads'
    decisions reach the host (once per band; past it, once per batch): on a GPU
    :data:`BAND_MEMORY_SHARE` of its free memory; on the CPU none (waiting for the CPU costs nothing,
    and host memory is better spent elsewhere)."""
    if device.type != "cuda":
        return 0
    return int(BAND_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0])


def band_bytes(channels: int, classes: int, tile: int, width: int, gating: bool) -> int:
    """Device memory the blending of one band of ``width`` pixels holds: input bands (the live one,
    the one read ahead and, with gating, the cell rows seen ahead), the weighted sums and weights
    (twice, while they shift), the finished rows and, with gating, a row of cells' probabilities."""
    inputs = (4 if gating else 2) * channels
    blend = 2 * (classes + 1) + classes + 1 + (classes if gating else 0)
    return 4 * tile * width * (inputs + blend)


def blending_device(device: torch.device, need_bytes: int, name: str) -> torch.device:
    """Where the bands of an image are blended: ``device``, unless it is a GPU whose free memory
    cannot hold ``need_bytes`` (see :data:`BAND_MEMORY_SHARE`); then the host, with a one-line note
    naming the image ``name``."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    if need_bytes <= BAND_MEMORY_SHARE * free:
        return device
    print(f"note: {name}: a band needs {need_bytes / 2**30:.2f} GiB, more than {device} has to spare "
          f"({free / 2**30:.2f} GiB free): its windows are blended on the host (slower)", flush=True)
    return torch.device("cpu")


def upload(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device`` without waiting for the device (pinned, asynchronous copy:
    a copy from pageable memory would wait for all the work queued before it)."""
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class BandReader:
    """The bands of an image (rows ``[y, y + tile)`` per row of windows) made on a background thread,
    in order, from chunks of rows that each hold every row once (:func:`utils.raster.row_chunks`,
    which may read several chunks ahead on threads of its own), and uploaded once to ``device``
    (from pinned memory on a GPU). Bands overlap, the reading does not: rows a band shares with the
    next are kept, not read again. A band is made when it is asked for or when it is the one after
    the furthest asked (one band ahead) and stays until :meth:`drop`; an error while reading or
    making one is raised by :meth:`get`.

    Args:
        chunks: ``(first row, rows)`` of the image, consecutive from row 0, covering every row a band
            needs (rows past the image's ``height`` are never asked for).
        make: the band at row ``y`` from the image's rows ``[y, min(y + tile, height))``: a
            (C, tile, width) float32 NumPy array.
        ys: the first row of each band, increasing.
        tile, height: band height and image height.
        device: where the bands go.
    """

    def __init__(self, chunks: Iterator[tuple[int, np.ndarray]], make: Callable[[int, np.ndarray], np.ndarray],
                 ys: list[int], tile: int, height: int, device: torch.device):
        self._chunks, self._make, self._ys, self._tile, self._height = chunks, make, ys, tile, height
        self._device = device
        self._ready: list[Future] = [Future() for _ in ys]
        self._bands: dict[int, torch.Tensor] = {}
        self._wanted, self._stop = -1, False
        self._turn = threading.Condition()
        self._thread = threading.Thread(target=self._produce, name="band-reader", daemon=True)
        self._thread.start()

    def get(self, i: int) -> torch.Tensor:
        """Band ``i`` on the device; making band ``i + 1`` may start."""
        if i not in self._bands:
            with self._turn:
                self._wanted = max(self._wanted, i)
                self._turn.notify()
            self._bands[i] = self._ready[i].result().to(self._device, non_blocking=True)
            self._ready[i] = None  # the host copy is the device's now
        return self._bands[i]

    def drop(self, i: int) -> None:
        self._bands.pop(i, None)

    def close(self) -> None:
        """Stop making bands; a read in progress finishes before this returns (and before the image
        may be closed)."""
        with self._turn:
            self._stop = True
            self._turn.notify()
        self._thread.join()

    def _produce(self) -> None:
        """The background thread: bands in order, each at most one past the furthest asked."""
        held: list[tuple[int, np.ndarray]] = []  # chunks that hold rows of the next bands
        i = 0
        try:
            for i, y in enumerate(self._ys):
                with self._turn:
                    while not self._stop and i > self._wanted + 1:
                        self._turn.wait()
                    if self._stop:
                        return
                end = min(y + self._tile, self._height)
                while not held or held[-1][0] + len(held[-1][1]) < end:
                    held.append(next(self._chunks))
                held = [(y0, rows) for y0, rows in held if y0 + len(rows) > y]  # no later band needs the rest
                band = torch.from_numpy(self._make(y, _rows(held, y, end)))
                self._ready[i].set_result(band.pin_memory() if self._device.type == "cuda" else band)
        except BaseException as exc:  # raised by get(); the bands after it cannot be made either
            for future in self._ready[i:]:
                if future is not None and not future.done():
                    future.set_exception(exc)
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()  # a generator's readers and handles are released on this thread


def _rows(held: list[tuple[int, np.ndarray]], y0: int, y1: int) -> np.ndarray:
    """Rows ``[y0, y1)`` of the image from consecutive chunks ``(first row, rows)`` that hold them
    (a view when one chunk does)."""
    parts = [rows[max(y0 - first, 0):y1 - first] for first, rows in held if first < y1 and first + len(rows) > y0]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class HostRows:
    """Finished rows on their way to the host: the copy of one band's rows runs while the device
    works on the next band, and the host waits for it only when that band has been queued.

    :meth:`put` takes ``(y0, tensors)`` (device tensors, None where not asked) and returns the
    previous band's ``(y0, arrays)`` once its copy is done (None for the first); :meth:`flush`
    returns the last one.
    """

    def __init__(self):
        self._pending: Optional[tuple[int, list, Optional[torch.cuda.Event]]] = None

    def put(self, y0: int, tensors: list[Optional[torch.Tensor]]):
        previous = self.flush()
        self._pending = (y0, *_copy_to_host(tensors))
        return previous

    def flush(self):
        if self._pending is None:
            return None
        y0, host, done = self._pending
        self._pending = None
        if done is not None:
            done.synchronize()
        return y0, [None if t is None else t.numpy() for t in host]


def _copy_to_host(tensors: list[Optional[torch.Tensor]]) -> tuple[list, Optional[torch.cuda.Event]]:
    """Host copies of ``tensors`` (asynchronous into pinned memory from a GPU), and the event that
    marks them done (None: already done)."""
    on_gpu = [t is not None and t.is_cuda for t in tensors]
    if not any(on_gpu):
        return [None if t is None else t.cpu() for t in tensors], None
    host = []
    for t in tensors:
        if t is None or not t.is_cuda:
            host.append(t)
            continue
        buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buffer.copy_(t, non_blocking=True)
        host.append(buffer)
    done = torch.cuda.Event()
    done.record()
    return host, done
