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
    if start.shape[0] == 0:
        return buffer.new_zeros(0)
    rows, cols = rows.to(torch.int64), cols.to(torch.int64)
    costs = accumulated_costs(buffer, start.to(torch.int64), width.to(torch.int64), int(rows.max()), int(cols.max()))
    position, row_stride, diagonal_stride = last_cells(costs, rows, cols)
    flat = costs.reshape(-1)
    lengths = backtrack_lengths(flat, position, rows, cols, row_stride=row_stride, diagonal_stride=diagonal_stride)
    return flat[position] / lengths.to(torch.float32)


def cost_table_size(num: int, max_rows: int, max_cols: int) -> int:
    """Number of floats ``accumulated_costs`` needs for P = ``num`` lattices of at most max_rows × max_cols."""
    return (max_rows + max_cols) * (max_rows + 1) * num


def accumulated_costs(
    buffer: torch.Tensor,
    start: torch.Tensor,
    width: torch.Tensor,
    max_rows: int,
    max_cols: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Accumulated costs (K + 1, max_rows + 1, P) of the lattices, laid out as in the module docstring.

    Diagonal k only has cells for ``max(0, k − max_cols + 1) ≤ i ≤ min(k, max_rows − 1)``, and only those are
    computed. Every other cell that a later step reads is a +inf sentinel: row 0 (i = −1), diagonal −1, and the cell
    just past the end of each diagonal (i = k + 1, i.e. j = −1), set explicitly. ``out`` (``cost_table_size``
    floats) avoids an allocation.
    """
    num = start.shape[0]
    diagonals = max_rows + max_cols - 1
    shape = (diagonals + 1, max_rows + 1, num)
    if out is None:
        costs = torch.empty(shape, dtype=torch.float32, device=buffer.device)
    else:
        costs = out.view(shape)
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
        diagonal = costs[k + 1, low + 1 : high + 2]
        if k == 0:
            diagonal.copy_(distances)
        else:
            minimum = best[:size].view(high - low + 1, num)
            torch.minimum(costs[k, low : high + 1], costs[k, low + 1 : high + 2], out=minimum)  # ↑, ←
            torch.minimum(minimum, costs[k - 1, low : high + 1], out=minimum)  # ↖
            torch.add(distances, minimum, out=diagonal)
        if high + 1 < max_rows:
            costs[k + 1, high + 2] = INF  # cell (k + 1, −1), read as ← and ↖ by the next two diagonals
    return costs


def last_cells(
    costs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, int, int]:
    """Flat position of each lattice's last cell (rows − 1, cols − 1) in ``costs``, with the table's strides."""
    _, stride_rows, num = costs.shape
    diagonal_stride = stride_rows * num
    pair = torch.arange(num, device=costs.device)
    return (rows + cols - 1) * diagonal_stride + rows * num + pair, num, diagonal_stride


def backtrack_lengths(
    flat: torch.Tensor,
    position: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    *,
    row_stride: torch.Tensor | int,
    diagonal_stride: torch.Tensor | int,
) -> torch.Tensor:
    """Length of the greedy backtracked path of each lattice (int64, shape (P,)); see the module docstring.

    ``position`` is the flat index of each lattice's last cell in ``flat`` (one or several concatenated cost tables);
    from cell (i, j), the cell (i, j − 1) is ``diagonal_stride`` before, (i − 1, j) a further ``row_stride`` before.
    Strides may differ per lattice, so the paths of several batches are traced together.
    """
    i, j = rows - 1, cols - 1
    position = position.clone()
    parked = position - (i + j) * diagonal_stride - i * row_stride  # cell (0, 0): finished paths read there, unused
    length = torch.ones_like(position)
    while True:
        active = (i > 0) & (j > 0)
        if not bool(active.any()):
            break
        left_position = torch.where(active, position - diagonal_stride, parked)  # (i, j − 1)
        left = flat[left_position]
        up = flat[left_position - row_stride]  # (i − 1, j)
        diagonal = flat[left_position - diagonal_stride - row_stride]  # (i − 1, j − 1)
        go_diagonal = (diagonal <= left) & (diagonal <= up)
        go_left = ~go_diagonal & (left <= up)
        step_i = (active & ~go_left).to(torch.int64)  # ↖ or ↑
        step_j = (active & (go_diagonal | go_left)).to(torch.int64)  # ↖ or ←
        i -= step_i
        j -= step_j
        position -= (step_i + step_j) * diagonal_stride + step_i * row_stride
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
