"""Batched dynamic time warping with fastabx's (torchdtw's) cost normalisation.

For a frame-distance lattice ``d`` of shape (N, M) the accumulated cost is

    C[0, 0] = d[0, 0],    C[i, j] = d[i, j] + min(C[i−1, j], C[i−1, j−1], C[i, j−1])

(steps ↑, ↖, ←; out-of-lattice neighbours count as +inf). The DTW distance is ``C[N−1, M−1] / path_length``,
where the path is backtracked *greedily* from (N−1, M−1): the diagonal when its cost is ≤ both others, else ←
(j − 1) when its cost is ≤ ↑, else ↑ (i − 1); once the path reaches the first row or column, the remaining edge steps
are counted too. The path length is not the length of the optimal path in general, and ties matter, so the exact
rule above is what makes scores comparable with fastabx.

All arithmetic is float32 in the same order as the reference C loop (``d + min(...)``; ``min`` is exact), so the
accumulated costs and the backtracked paths are bit-identical for identical lattices.

A batch is computed as an anti-diagonal wavefront: cells with ``i + j = k`` only depend on diagonals k − 1 and k − 2,
so one step updates one diagonal of every lattice at once. Costs are stored diagonal-major with i before the pair
index, ``costs[k + 1, i + 1, p] = C_p[i, k − i]``, where the three neighbours of diagonal k are contiguous row blocks
of the previous two diagonals; row 0 and ``costs[0]`` are +inf sentinels.
"""

from __future__ import annotations

import torch

INF = float("inf")


def dtw_from_buffer(
    buffer: torch.Tensor,
    start: torch.Tensor,
    width: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Normalised DTW distance of P lattices stored row-major in one flat float32 buffer.

    Lattice p is ``buffer[start[p] + i·width[p] + j]`` for i < rows[p], j < cols[p]. Each step reads a diagonal of
    every lattice straight from the buffer, so no padded copy of the lattices is ever made. Cells past a lattice's true
    size (up to the batch's largest size) read whatever follows it, which never affects its DTW as long as it is not
    NaN; the caller keeps every index up to ``max(start + (rows_max − 1)·width + cols_max)`` inside the buffer.

    Returns:
        (P,) float32: accumulated cost at (rows − 1, cols − 1) divided by the greedy path length.
    """
    num = start.shape[0]
    if num == 0:
        return buffer.new_zeros(0)
    rows64, cols64 = rows.to(torch.int64), cols.to(torch.int64)
    max_rows, max_cols = int(rows64.max()), int(cols64.max())
    costs = accumulated_costs(buffer, start.to(torch.int64), width.to(torch.int64), max_rows, max_cols)
    row_stride = num
    diagonal_stride = (max_rows + 1) * num
    pair = torch.arange(num, device=buffer.device)
    final_position = (rows64 + cols64 - 1) * diagonal_stride + rows64 * row_stride + pair  # cell (rows − 1, cols − 1)
    lengths = backtrack_lengths(costs, rows64, cols64)
    return costs.reshape(-1)[final_position] / lengths.to(torch.float32)


def accumulated_costs(
    buffer: torch.Tensor, start: torch.Tensor, width: torch.Tensor, max_rows: int, max_cols: int
) -> torch.Tensor:
    """Accumulated costs (K + 1, max_rows + 1, P) of the lattices, laid out as in the module docstring.

    Diagonal k only has cells for ``max(0, k − max_cols + 1) ≤ i ≤ min(k, max_rows − 1)``, and only those are
    computed. Every other cell that a later step reads is a +inf sentinel: row 0 (i = −1), diagonal −1, and the cell
    just past the end of each diagonal (i = k + 1, i.e. j = −1), set explicitly.
    """
    num = start.shape[0]
    diagonals = max_rows + max_cols - 1
    costs = torch.empty((diagonals + 1, max_rows + 1, num), dtype=torch.float32, device=buffer.device)
    costs[0] = INF
    costs[:, 0] = INF
    # Lattice p's cell (i, k − i) is buffer[start + i·(width − 1) + k]: one base index per (i, p), shifted by k.
    base = (start[None, :] + torch.arange(max_rows, device=buffer.device)[:, None] * (width[None, :] - 1)).reshape(-1)
    best = torch.empty(max_rows * num, dtype=torch.float32, device=buffer.device)
    frames = torch.empty(max_rows * num, dtype=torch.float32, device=buffer.device)
    for k in range(diagonals):
        low, high = max(0, k - max_cols + 1), min(k, max_rows - 1)
        size = (high - low + 1) * num
        distances = torch.index_select(
            buffer.narrow(0, k, buffer.shape[0] - k), 0, base[low * num : (high + 1) * num], out=frames[:size]
        ).view(high - low + 1, num)
        out = costs[k + 1, low + 1 : high + 2]
        if k == 0:
            out.copy_(distances)
        else:
            minimum = best[:size].view(high - low + 1, num)
            torch.minimum(costs[k, low : high + 1], costs[k, low + 1 : high + 2], out=minimum)  # ↑, ←
            torch.minimum(minimum, costs[k - 1, low : high + 1], out=minimum)  # ↖
            torch.add(distances, minimum, out=out)
        if high + 1 < max_rows:
            costs[k + 1, high + 2] = INF  # cell (k + 1, −1), read as ← and ↖ by the next two diagonals
    return costs


def backtrack_lengths(costs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Length of the greedy backtracked path of each lattice (int64, shape (P,)); see the module docstring."""
    _, stride_rows, num = costs.shape
    flat = costs.reshape(-1)
    diagonal_stride = stride_rows * num
    i, j = rows - 1, cols - 1
    # Flat position of the current cell (i, j); its neighbours are fixed offsets from it.
    position = (i + j + 1) * diagonal_stride + (i + 1) * num + torch.arange(num, device=costs.device)
    parked = diagonal_stride + num  # cell (0, 0): an in-range place for finished paths, whose reads are unused
    length = torch.ones(num, dtype=torch.int64, device=costs.device)
    while True:
        active = (i > 0) & (j > 0)
        if not bool(active.any()):
            break
        left_position = torch.where(active, position - diagonal_stride, parked)  # (i, j − 1)
        left = flat[left_position]
        up = flat[left_position - num]  # (i − 1, j)
        diagonal = flat[left_position - diagonal_stride - num]  # (i − 1, j − 1)
        go_diagonal = (diagonal <= left) & (diagonal <= up)
        go_left = ~go_diagonal & (left <= up)
        step_i = (active & ~go_left).to(torch.int64)  # ↖ or ↑
        step_j = (active & (go_diagonal | go_left)).to(torch.int64)  # ↖ or ←
        i -= step_i
        j -= step_j
        position -= (step_i + step_j) * diagonal_stride + step_i * num
        length += active.to(torch.int64)
    return length + i + j  # the remaining straight run along the first row or column


def dtw_batch(lattices: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Normalised DTW distance of P padded lattices.

    Args:
        lattices: (P, N, M) frame distances; lattice p is valid on ``[:rows[p], :cols[p]]``, its padding is ignored.
        rows, cols: (P,) integer true sizes, each ≥ 1.

    Returns:
        (P,) float32: accumulated cost at (rows − 1, cols − 1) divided by the greedy path length.
    """
    if lattices.ndim != 3:
        raise ValueError(f"dtw_batch expects lattices of shape (P, N, M), got {tuple(lattices.shape)}")
    num, max_rows, max_cols = lattices.shape
    buffer = torch.cat([lattices.to(torch.float32).reshape(-1), lattices.new_zeros(max_cols, dtype=torch.float32)])
    start = torch.arange(num) * (max_rows * max_cols)
    return dtw_from_buffer(buffer, start, torch.full((num,), max_cols), rows, cols)


def dtw(distances: torch.Tensor) -> float:
    """Normalised DTW distance of one (N, M) frame-distance lattice."""
    if distances.ndim != 2 or min(distances.shape) == 0:
        raise ValueError(f"dtw expects a non-empty (N, M) lattice, got shape {tuple(distances.shape)}")
    rows, cols = distances.shape
    return float(dtw_batch(distances[None], torch.tensor([rows]), torch.tensor([cols]))[0])
