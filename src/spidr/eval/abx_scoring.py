"""ABX scoring: the item distances of streamed units through batched DTWs, then per-cell triplet counts.

Memory stays bounded: cells are scored unit by unit, the frame distances of one flush and the lattice cells of one
DTW batch are capped (``FLUSH_ELEMENTS``, ``BATCH_ELEMENTS``), and only per-cell results are kept.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import astuple, dataclass

import numpy as np
import torch

from spidr.eval.abx_cells import Groups, Unit
from spidr.eval.abx_frames import DistanceName, FrameStore, frame_distances
from spidr.eval.dtw import accumulated_costs, backtrack_lengths, cost_table_size, last_cells

# Work sizes: frame distances of one flush (float32 elements), and lattice cells of one DTW batch.
FLUSH_ELEMENTS = 12_000_000
BATCH_ELEMENTS = 4_000_000
PARALLEL_MIN_WORK = 200_000_000  # multiply-adds of a frame-distance block worth running on several threads


@dataclass
class _Chunk:
    """A block of rows of one unit: its (rows × cols) item distances are computed together."""

    unit: Unit
    row_slice: slice
    distances: torch.Tensor | None = None


@dataclass
class Cells:
    """Scored cells, one entry each."""

    a_phone: np.ndarray
    b_phone: np.ndarray
    context: np.ndarray
    speaker: np.ndarray
    x_speaker: np.ndarray
    score: np.ndarray
    size: np.ndarray


class _Workspace:
    """Reusable float32 scratch buffers: fresh multi-megabyte allocations cost a page fault per 4 KiB on first use."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, size: int) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[name] = torch.empty(size + size // 4)
        return buffer[:size]


class CellScorer:
    """Streams units: batches their DTWs, scores their cells, keeps only per-cell results."""

    def __init__(self, store: FrameStore, groups: Groups, *, distance: DistanceName, threads: int) -> None:
        self.store = store
        self.groups = groups
        self.distance = distance
        self.pool: list[_Chunk] = []
        self.pool_elements = 0
        self.workspace = _Workspace()
        self.threads = threads
        self.results: list[tuple[np.ndarray, ...]] = []

    def add(self, unit: Unit) -> None:
        unit.lay_out(self.groups)
        col_frames = int(self.store.lengths[unit.cols].sum())
        row_frames = self.store.lengths[unit.rows]
        # Rows per chunk so that one chunk's frame distances fit in a flush.
        budget = max(FLUSH_ELEMENTS // max(col_frames, 1), 1)
        bounds = [0]
        cumulative = np.cumsum(row_frames)
        while bounds[-1] < unit.rows.size:
            base = cumulative[bounds[-1] - 1] if bounds[-1] else 0
            end = int(np.searchsorted(cumulative, base + budget, side="right"))
            bounds.append(min(max(end, bounds[-1] + 1), unit.rows.size))
        unit.pending = len(bounds) - 1
        for start, end in itertools.pairwise(bounds):
            elements = int(row_frames[start:end].sum()) * col_frames
            if self.pool and self.pool_elements + elements > FLUSH_ELEMENTS:
                self.flush()
            self.pool.append(_Chunk(unit, slice(start, end)))
            self.pool_elements += elements

    def finish(self) -> Cells:
        self.flush()
        if not self.results:
            empty = np.zeros(0, dtype=np.int64)
            return Cells(empty, empty, empty, empty, empty, np.zeros(0), empty)
        columns = [np.concatenate(parts) for parts in zip(*self.results, strict=True)]
        return Cells(*columns)

    def flush(self) -> None:
        if not self.pool:
            return
        self._compute_distances(self.pool)
        for chunk in self.pool:
            self._count(chunk)
        self.pool, self.pool_elements = [], 0

    def _compute_distances(self, chunks: list[_Chunk]) -> None:
        """Fill ``chunk.distances`` (rows × cols item DTW distances) for every chunk.

        X is on the lattice rows, except for an (X, A) pair of one A group of a symmetric unit where A comes first
        in the group: there the lattice is transposed, A on the rows. fastabx (torchdtw's symmetric ``dtw_batch``)
        computes that block's upper triangle only, earlier item on the rows, and mirrors it; the greedy backtrack
        can break ←/↑ ties differently on a transposed lattice (often, with discrete units), so the rule matters.

        The frame distances of every chunk are written into one flat buffer (one row-major block per chunk), then
        the transposed lattices after them; the lattice of a pair is a (rows × cols) window of that buffer.
        """
        store = self.store
        layouts = []
        for chunk in chunks:
            rows, cols = chunk.unit.rows[chunk.row_slice], chunk.unit.cols
            layouts.append((rows, cols, store.lengths[rows], store.lengths[cols]))
        sizes = [int(row_len.sum()) * int(col_len.sum()) for _, _, row_len, col_len in layouts]
        pair_parts, mirrored_parts = [], []
        base = pair_base = 0
        for chunk, (rows, cols, row_len, col_len), size in zip(chunks, layouts, sizes, strict=True):
            width = int(col_len.sum())
            row_off = np.cumsum(row_len) - row_len
            col_off = np.cumsum(col_len) - col_len
            # One entry per (row item, col item) pair, row-major: where its lattice starts, its row stride, sizes.
            start = base + row_off[:, None] * width + col_off[None, :]
            pair_parts.append(
                (start.ravel(), np.full(start.size, width), np.repeat(row_len, cols.size), np.tile(col_len, rows.size))
            )
            if chunk.unit.symmetric:
                row, col = _earlier_in_a_group(chunk)
                mirrored_parts.append((pair_base + row * cols.size + col, start[row, col], np.full(row.size, width),
                                       row_len[row], col_len[col]))
            base += size
            pair_base += start.size
        pairs = _Pairs(*(np.concatenate(parts) for parts in zip(*pair_parts, strict=True)))
        mirrored = tuple(np.concatenate(parts) for parts in zip(*mirrored_parts, strict=True)) if mirrored_parts \
            else None
        mirrored_size = int((mirrored[3] * mirrored[4]).sum()) if mirrored else 0
        max_rows = max(int(row_len.max()) for _, _, row_len, _ in layouts)
        max_cols = max(int(col_len.max()) for _, _, _, col_len in layouts)
        max_width = max(int(col_len.sum()) for _, _, _, col_len in layouts)
        # dtw_from_buffer reads up to (rows − 1) × width + cols cells past a lattice's start: finite padding. A
        # transposed lattice has at most max_cols rows, max_rows columns and a width of max_rows.
        longest = max(max_rows, max_cols)
        tail = longest * max(max_width, max_rows) + longest
        buffer = self.workspace.get("lattices", base + mirrored_size + tail)
        buffer[base:] = 0.0
        position = 0
        for (rows, cols, row_len, col_len), size in zip(layouts, sizes, strict=True):
            x = store.frames[_ranges(store.offsets[rows], row_len)]
            y = store.frames[_ranges(store.offsets[cols], col_len)]
            store.release()  # a spilled store: gathers map whole page-cache folios; hand them back at once
            parallel = size * x.shape[1] >= PARALLEL_MIN_WORK
            with torch_threads(self.threads if parallel else 1):
                frame_distances(x, y, self.distance, out=buffer[position : position + size].view(x.shape[0],
                                                                                                y.shape[0]))
            position += size
        if mirrored is not None:
            pairs = _with_transposed_lattices(buffer, pairs, mirrored, at=base)
        distances = _batched_dtw(buffer, pairs, self.workspace)
        position = 0
        for chunk in chunks:
            shape = (chunk.row_slice.stop - chunk.row_slice.start, chunk.unit.cols.size)
            chunk.distances = distances[position : position + shape[0] * shape[1]].view(shape)
            position += shape[0] * shape[1]

    def _count(self, chunk: _Chunk) -> None:
        """Add the chunk's triplet counts to its unit; emit the unit's cells once its last chunk is counted."""
        unit, groups = chunk.unit, self.groups
        distances = chunk.distances
        assert distances is not None
        row_group = unit.row_group_of[chunk.row_slice]
        a_of_row = unit.row_a[row_group]
        if unit.symmetric:
            # Rows are A items, laid out in the same group order as the columns: row k of A group r is the column
            # col_start[row_a[r]] + its rank in the group. Exclude it as its own A.
            rank = np.arange(row_group.size) + chunk.row_slice.start - _group_starts(unit.row_group_of)[row_group]
            distances[np.arange(row_group.size), unit.col_start[a_of_row] + rank] = float("inf")
        col_sizes = np.diff(np.append(unit.col_start, unit.cols.size))
        max_a = int(col_sizes[a_of_row].max())
        a_index = unit.col_start[a_of_row][:, None] + np.arange(max_a)[None, :]
        a_index = np.where(np.arange(max_a)[None, :] < col_sizes[a_of_row][:, None], a_index, unit.cols.size)
        padded = torch.cat([distances, torch.full((distances.shape[0], 1), float("inf"))], dim=1)
        to_a = padded.gather(1, torch.from_numpy(a_index)).sort(dim=1).values  # (rows, max |A|), +inf padded
        # 2·(#a closer than b + ½ #ties) = #(d_xa < d_xb) + #(d_xa ≤ d_xb), for every (x, b).
        twice = torch.searchsorted(to_a, distances) + torch.searchsorted(to_a, distances, right=True)
        col_phone = groups.phone[unit.col_groups][unit.col_group_of]
        row_phone = groups.phone[unit.col_groups][a_of_row]
        twice[torch.from_numpy(col_phone[None, :] == row_phone[:, None])] = 0  # same phone: not a B
        per_col_group = torch.zeros((row_group.size, unit.col_groups.size), dtype=torch.int64)
        per_col_group.index_add_(1, torch.from_numpy(unit.col_group_of), twice)
        if unit.counts is None:
            unit.counts = torch.zeros((unit.row_groups.size, unit.col_groups.size), dtype=torch.int64)
        unit.counts.index_add_(0, torch.from_numpy(row_group), per_col_group)
        chunk.distances = None
        unit.pending -= 1
        if unit.pending == 0:
            self.results.append(self._cells(unit))

    def _cells(self, unit: Unit) -> tuple[np.ndarray, ...]:
        groups = self.groups
        assert unit.counts is not None
        a_groups = unit.col_groups[unit.row_a]
        row_index, col_index = np.nonzero(groups.phone[a_groups][:, None] != groups.phone[unit.col_groups][None, :])
        num_x = np.bincount(unit.row_group_of, minlength=unit.row_groups.size)[row_index]
        col_sizes = np.diff(np.append(unit.col_start, unit.cols.size))
        num_a = col_sizes[unit.row_a][row_index] - (1 if unit.symmetric else 0)
        num_b = col_sizes[col_index]
        size = num_x * num_a * num_b
        twice = unit.counts.numpy()[row_index, col_index]
        a = a_groups[row_index]
        return (
            groups.phone[a],
            groups.phone[unit.col_groups[col_index]],
            groups.context[a],
            groups.speaker[a],
            groups.speaker[unit.row_groups[row_index]],
            1.0 - twice / (2.0 * size),
            size,
        )


def _earlier_in_a_group(chunk: _Chunk) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) indices in ``chunk`` of the pairs of a symmetric unit whose column is an item of the row's own A
    group placed before it (the lower triangle of each A group's block)."""
    unit = chunk.unit
    row_group = unit.row_group_of[chunk.row_slice]
    rank = np.arange(row_group.size) + chunk.row_slice.start - _group_starts(unit.row_group_of)[row_group]
    row = np.repeat(np.arange(row_group.size), rank)
    within = np.arange(row.size) - np.repeat(np.cumsum(rank) - rank, rank)  # 0 … rank − 1 for each row
    return row, np.repeat(unit.col_start[unit.row_a[row_group]], rank) + within


def _with_transposed_lattices(buffer: torch.Tensor, pairs: _Pairs, mirrored: tuple[np.ndarray, ...], *,
                              at: int) -> _Pairs:
    """Copy the lattice of each ``mirrored`` pair, transposed, into ``buffer`` from ``at`` on, and point those pairs
    at their copy. ``mirrored``: (pair index, lattice start, width, rows, cols) arrays."""
    index, start, width, rows, cols = mirrored
    sizes = rows * cols
    offsets = np.cumsum(sizes) - sizes
    local = np.arange(int(sizes.sum())) - np.repeat(offsets, sizes)  # row-major in the copy: (col i', row j')
    new_row, new_col = local // np.repeat(rows, sizes), local % np.repeat(rows, sizes)
    source = np.repeat(start, sizes) + new_col * np.repeat(width, sizes) + new_row
    buffer[at : at + local.size] = buffer[torch.from_numpy(source)]
    new_start, new_width, new_rows, new_cols = (part.copy() for part in astuple(pairs))
    new_start[index], new_width[index], new_rows[index], new_cols[index] = at + offsets, rows, cols, rows
    return _Pairs(new_start, new_width, new_rows, new_cols)


def _group_starts(group_of: np.ndarray) -> np.ndarray:
    """Index of the first element of each run in a sorted group-id array."""
    sizes = np.bincount(group_of)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]])


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """Concatenation of ``arange(start, start + length)`` for every pair, as an int64 tensor."""
    total = int(lengths.sum())
    shifts = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return torch.from_numpy(shifts + np.arange(total))


@dataclass(frozen=True)
class _Pairs:
    """Item pairs whose lattice is ``buffer[start + i·width + j]`` for i < num_rows, j < num_cols."""

    start: np.ndarray
    width: np.ndarray
    num_rows: np.ndarray
    num_cols: np.ndarray


def _batched_dtw(buffer: torch.Tensor, pairs: _Pairs, workspace: _Workspace) -> torch.Tensor:
    """DTW of every pair; ``buffer`` holds the lattices, padded as ``dtw_from_buffer`` requires.

    Pairs are batched by their number of rows (X frames), ordered by columns within a batch, and each batch is cut
    so that its padded size (pairs × rows × max cols) stays within ``BATCH_ELEMENTS``. The accumulated costs of all
    batches go into one table so that a single greedy backtrack traces every path at once.
    """
    order = np.lexsort((pairs.num_cols, pairs.num_rows))
    sorted_rows, sorted_cols = pairs.num_rows[order], pairs.num_cols[order]
    batches = []  # (first, end, rows, max cols)
    runs = np.flatnonzero(np.diff(sorted_rows)) + 1
    for run_start, run_end in itertools.pairwise([0, *runs.tolist(), order.size]):
        rows = int(sorted_rows[run_start])
        position = run_start
        while position < run_end:
            # Columns grow along the run: take pairs while pairs × rows × (cols of the last one) fits.
            fits = np.flatnonzero(
                np.arange(1, run_end - position + 1) * rows * sorted_cols[position:run_end] <= BATCH_ELEMENTS
            )
            end = position + (int(fits[-1]) + 1 if fits.size else 1)
            batches.append((position, end, rows, int(sorted_cols[end - 1])))
            position = end
    sizes = [cost_table_size(end - first, rows, cols) for first, end, rows, cols in batches]
    table = workspace.get("costs", sum(sizes))
    starts = torch.from_numpy(pairs.start[order])
    widths = torch.from_numpy(pairs.width[order])
    row_counts = torch.from_numpy(sorted_rows).to(torch.int64)
    col_counts = torch.from_numpy(sorted_cols).to(torch.int64)
    last = torch.empty(order.size, dtype=torch.int64)
    row_stride = torch.empty(order.size, dtype=torch.int64)
    diagonal_stride = torch.empty(order.size, dtype=torch.int64)
    offset = 0
    for (first, end, rows, cols), size in zip(batches, sizes, strict=True):
        costs = accumulated_costs(
            buffer, starts[first:end], widths[first:end], rows, cols, out=table[offset : offset + size]
        )
        position, row_stride[first:end], diagonal_stride[first:end] = last_cells(
            costs, row_counts[first:end], col_counts[first:end]
        )
        last[first:end] = position + offset
        offset += size
    lengths = backtrack_lengths(
        table, last, row_counts, col_counts, row_stride=row_stride, diagonal_stride=diagonal_stride
    )
    out = torch.empty(order.size, dtype=torch.float32)
    out[torch.from_numpy(order)] = table[last] / lengths.to(torch.float32)
    return out


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` torch threads.

    ABX scoring is mostly many small operations (a diagonal of a DTW batch, a few hundred frames' distances), where
    OpenMP only adds overhead, and on a busy machine threads spin-waiting for cores held by other processes make them
    up to 100× slower. So scoring runs on one thread, and only frame-distance blocks of at least
    ``PARALLEL_MIN_WORK`` multiply-adds use the caller's ``torch.get_num_threads()``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


