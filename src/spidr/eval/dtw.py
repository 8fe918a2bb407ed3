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

The batch is computed as an anti-diagonal wavefront: cells with ``i + j = k`` only depend on diagonals k − 1 and
k − 2, so one step updates a whole diagonal of every lattice at once. The lattices are stored skewed, diagonal-major
(``S[k, p, i] = d[p, i, k − i]``), where the three neighbours of diagonal k are plain shifted slices of the previous
two diagonals.
"""

from __future__ import annotations

import torch

INF = float("inf")


def skew(lattices: torch.Tensor) -> torch.Tensor:
    """(P, N, M) lattices → (N + M − 1, P, N) with ``out[k, p, i] = lattices[p, i, k − i]`` (+inf off the lattice)."""
    num, rows, cols = lattices.shape
    width = cols + rows
    padded = torch.full((num, rows, width), INF, dtype=lattices.dtype, device=lattices.device)
    padded[:, :, :cols] = lattices
    # Reading the padded rows with a row stride of width − 1 shifts row i right by i; what falls before the start of a
    # row is the +inf tail of the previous one (row i needs i ≤ rows padding cells there, and there are `rows`).
    diagonals = rows + cols - 1
    shifted = padded.as_strided((num, rows, diagonals), (rows * width, width - 1, 1))
    return shifted.permute(2, 0, 1).contiguous()


def accumulated_costs(skewed: torch.Tensor) -> torch.Tensor:
    """Accumulated DTW costs of skewed lattices (K, P, N) → (K + 1, P, N + 1).

    Row ``k + 1`` holds diagonal ``k``; row 0 and column 0 are +inf sentinels, so cell (i, j) of lattice p lives at
    ``[i + j + 1, p, i + 1]``.
    """
    diagonals, num, rows = skewed.shape
    costs = torch.full((diagonals + 1, num, rows + 1), INF, dtype=skewed.dtype, device=skewed.device)
    costs[1, :, 1:] = skewed[0]
    for k in range(1, diagonals):
        previous, before = costs[k], costs[k - 1]
        best = torch.minimum(torch.minimum(previous[:, :-1], previous[:, 1:]), before[:, :-1])  # ↑, ←, ↖
        torch.add(skewed[k], best, out=costs[k + 1, :, 1:])
    return costs


def backtrack_lengths(costs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Length of the greedy backtracked path of each lattice (int64, shape (P,)); see the module docstring."""
    _, num, stride = costs.shape
    flat = costs.reshape(-1)
    pair = torch.arange(num, device=costs.device)
    i, j = rows.to(torch.int64) - 1, cols.to(torch.int64) - 1
    length = torch.ones(num, dtype=torch.int64, device=costs.device)

    def cost(ii: torch.Tensor, jj: torch.Tensor) -> torch.Tensor:
        # Indices stay in range for finished paths too (i or j = −1 lands on a sentinel), so no masking is needed.
        return flat[((ii + jj + 1) * num + pair) * stride + ii + 1]

    while True:
        active = (i > 0) & (j > 0)
        if not bool(active.any()):
            break
        up, left, diagonal = cost(i - 1, j), cost(i, j - 1), cost(i - 1, j - 1)
        go_diagonal = (diagonal <= left) & (diagonal <= up)
        go_left = ~go_diagonal & (left <= up)
        go_up = ~go_diagonal & ~go_left
        i = i - (active & ~go_left).to(torch.int64)  # ↖ or ↑
        j = j - (active & ~go_up).to(torch.int64)  # ↖ or ←
        length += active.to(torch.int64)
    return length + i + j  # the remaining straight run along the first row or column


def dtw_batch(lattices: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Normalised DTW distance of P padded lattices.

    Args:
        lattices: (P, N, M) float32 frame distances; lattice p is valid on ``[:rows[p], :cols[p]]`` and its padding
            is ignored.
        rows, cols: (P,) integer true sizes, each ≥ 1.

    Returns:
        (P,) float32: accumulated cost at (rows − 1, cols − 1) divided by the greedy path length.
    """
    if lattices.ndim != 3:
        raise ValueError(f"dtw_batch expects lattices of shape (P, N, M), got {tuple(lattices.shape)}")
    num = lattices.shape[0]
    if num == 0:
        return lattices.new_zeros(0)
    lattices = lattices.to(torch.float32)
    costs = accumulated_costs(skew(lattices))
    rows64, cols64 = rows.to(torch.int64), cols.to(torch.int64)
    stride = costs.shape[2]
    pair = torch.arange(num, device=lattices.device)
    final = costs.reshape(-1)[((rows64 + cols64 - 1) * num + pair) * stride + rows64]  # cell (rows − 1, cols − 1)
    return final / backtrack_lengths(costs, rows64, cols64).to(torch.float32)


def dtw(distances: torch.Tensor) -> float:
    """Normalised DTW distance of one (N, M) frame-distance lattice."""
    if distances.ndim != 2 or min(distances.shape) == 0:
        raise ValueError(f"dtw expects a non-empty (N, M) lattice, got shape {tuple(distances.shape)}")
    rows, cols = distances.shape
    return float(dtw_batch(distances[None], torch.tensor([rows]), torch.tensor([cols]))[0])
