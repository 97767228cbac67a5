"""Which windows of a sliding-window grid the heads see and which are decoded (:class:`GatePlan`).

The plan's decisions are tensors on the device that predicts: the heads' boundary flags of each
row of cells stay there, and the windows of a row that must be decoded are found there
(:meth:`GatePlan.decode_mask`), so the predictor never waits for the device to make a decision.
"""

from __future__ import annotations

import numpy as np
import torch

#: Blend weight of a gated-off (filled) window relative to a decoded one.
FILL_BLEND_WEIGHT = 1e-3
#: Windows within this many cells of a boundary cell are decoded too (see :class:`GatePlan`).
GATE_REACH = 1
#: The head's boundary probability above which a window is decoded: the configuration's
#: GATE_THRESHOLD default (a test keeps the two equal).
GATE_THRESHOLD = 0.4


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
        device: where the heads' flags live (the device that predicts).
    """

    def __init__(self, ys: list[int], xs: list[int], tile: int, reach: int = GATE_REACH,
                 device: torch.device = torch.device("cpu")):
        self.ys, self.xs, self.reach = ys, xs, reach
        self.cell_rows, self.cell_cols = cover_indices(ys, tile), cover_indices(xs, tile)
        self._row_index = {r: k for k, r in enumerate(self.cell_rows)}
        # the cells each window overlaps, per axis (as positions in cell_rows / cell_cols)
        self._rows_touch = [[k for k, r in enumerate(self.cell_rows) if abs(ys[r] - y) < tile] for y in ys]
        cols_touch = [[k for k, c in enumerate(self.cell_cols) if abs(xs[c] - x) < tile] for x in xs]
        # per window column: the cell columns whose boundary makes it decoded, as (columns, cells)
        # masks: a window that is not a cell looks at the cells it overlaps, a cell at its neighbours
        n, m = len(xs), len(self.cell_cols)
        touch, near = np.zeros((n, m), bool), np.zeros((n, m), bool)
        own = np.zeros(n, np.int64)
        is_cell = np.zeros(n, bool)
        for j in range(n):
            touch[j, cols_touch[j]] = True
        for k, c in enumerate(self.cell_cols):
            near[c, _widen([k], reach, m)] = True
            own[c], is_cell[c] = k, True
        self._touch, self._near = torch.from_numpy(touch).to(device), torch.from_numpy(near).to(device)
        self._own, self._is_cell = torch.from_numpy(own).to(device), torch.from_numpy(is_cell).to(device)
        self.heads: dict[int, torch.Tensor] = {}  # cell row -> boundary flag per cell column (device)
        self.boundary_flags: dict[int, np.ndarray] = {}  # the same, on the host once transferred
        self.probs: dict[int, torch.Tensor] = {}  # cell row -> probabilities per cell, until placed

    def cell_rows_reaching(self, i: int) -> list[int]:
        """The cell rows (grid row indices) whose heads decide about window row ``i``."""
        return [self.cell_rows[k] for k in _widen(self._rows_touch[i], self.reach, len(self.cell_rows))]

    def is_cell_row(self, i: int) -> bool:
        return i in self._row_index

    def decode_mask(self, i: int) -> torch.Tensor:
        """(windows of a row,) bool on the device: the windows of row ``i`` that must be encoded and
        decoded (again): a cell whose head said no boundary while one of its neighbours (within
        ``reach`` cells) did, or any other window that overlaps a boundary cell. The heads of
        :meth:`cell_rows_reaching` ``i`` must be known."""
        touching = self._any_boundary(self._rows_touch[i])
        need = (self._touch & touching).any(1)
        if i not in self._row_index:
            return need
        near = self._any_boundary(_widen([self._row_index[i]], self.reach, len(self.cell_rows)))
        cell_need = (self._near & near).any(1) & ~self.heads[i][self._own]  # a boundary cell is decoded already
        return torch.where(self._is_cell, cell_need, need)

    def _any_boundary(self, rows) -> torch.Tensor:
        """(cell columns,) bool: a boundary cell in any of the cell rows ``rows`` (positions)."""
        return torch.stack([self.heads[self.cell_rows[k]] for k in rows]).any(0)


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
