"""Batched DTW against hand-computed lattices and an independent per-pair reference loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spidr.eval.dtw import dtw, dtw_batch, dtw_from_buffer


def reference_dtw(distances: np.ndarray) -> np.float32:
    """The fastabx / torchdtw rule written as plain loops (float32, d + min(...), greedy backtrack)."""
    d = distances.astype(np.float32)
    rows, cols = d.shape
    cost = np.zeros((rows, cols), dtype=np.float32)
    cost[0, 0] = d[0, 0]
    for i in range(1, rows):
        cost[i, 0] = np.float32(d[i, 0] + cost[i - 1, 0])
    for j in range(1, cols):
        cost[0, j] = np.float32(d[0, j] + cost[0, j - 1])
    for i in range(1, rows):
        for j in range(1, cols):
            cost[i, j] = np.float32(d[i, j] + min(cost[i - 1, j], cost[i - 1, j - 1], cost[i, j - 1]))
    i, j, length = rows - 1, cols - 1, 1
    while i > 0 and j > 0:
        up, left, diagonal = cost[i - 1, j], cost[i, j - 1], cost[i - 1, j - 1]
        if diagonal <= left and diagonal <= up:
            i, j = i - 1, j - 1
        elif left <= up:
            j -= 1
        else:
            i -= 1
        length += 1
    length += i + j
    return np.float32(cost[-1, -1] / np.float32(length))


def test_hand_computed_path_and_normalisation() -> None:
    # Costs: row 0 = 1, 3, 6; row 1 = 5, 1 + min(3, 1, 5) = 2, 1 + min(6, 3, 2) = 3. From (1, 2): ← (cost 2 beats
    # ↖ 3 and ↑ 6) to (1, 1), then ↖ to (0, 0): 3 cells, so 3 / 3.
    lattice = torch.tensor([[1.0, 2.0, 3.0], [4.0, 1.0, 1.0]])
    assert dtw(lattice) == 1.0


def test_diagonal_wins_ties() -> None:
    # Costs: row 0 = 2, 3, 5; row 1 = 2, 2, 4. From (1, 2): ← (2 < ↖ 3); at (1, 1) ↖ and ← both cost 2 and the
    # diagonal wins: path (1, 2), (1, 1), (0, 0) → 4 / 3. Preferring ← would give (1, 0) and a 4-cell path: 4 / 4.
    lattice = torch.tensor([[2.0, 1.0, 2.0], [0.0, 0.0, 2.0]])
    assert dtw(lattice) == pytest.approx(4.0 / 3.0)


def test_left_wins_ties_with_up_and_edge_steps_count() -> None:
    # Costs by row: (2, 4, 5), (2, 3, 5), (2, 4, 3), (4, 3, 5). From (3, 2): ↑ and ← both cost 3 (↖ 4): ← wins, to
    # (3, 1); then ↖ (2) to (2, 0); on the first column the 2 remaining ↑ steps count: 5 cells → 5 / 5.
    # Preferring ↑ would give (2, 2), (1, 1), (0, 0): 4 cells → 5 / 4.
    lattice = torch.tensor([[2.0, 2.0, 1.0], [0.0, 1.0, 2.0], [0.0, 2.0, 0.0], [2.0, 1.0, 2.0]])
    assert dtw(lattice) == 1.0


def test_single_frame_and_straight_lattices() -> None:
    assert dtw(torch.tensor([[0.25]])) == 0.25
    assert dtw(torch.tensor([[1.0, 2.0, 3.0]])) == pytest.approx(2.0)  # one row: cumulative 6 over 3 cells
    assert dtw(torch.tensor([[1.0], [3.0]])) == pytest.approx(2.0)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**31 - 1),
    st.integers(min_value=1, max_value=7),
    st.integers(min_value=1, max_value=7),
    st.sampled_from(["uniform", "binary", "halves"]),
)
def test_batch_matches_reference_bit_for_bit(seed: int, max_rows: int, max_cols: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    num = 6
    if kind == "uniform":
        lattices = rng.random((num, max_rows, max_cols), dtype=np.float32)
    elif kind == "binary":  # discrete units: many exact ties
        lattices = rng.integers(0, 2, (num, max_rows, max_cols)).astype(np.float32)
    else:
        lattices = rng.integers(0, 3, (num, max_rows, max_cols)).astype(np.float32) / 2
    rows = rng.integers(1, max_rows + 1, num)
    cols = rng.integers(1, max_cols + 1, num)
    got = dtw_batch(torch.from_numpy(lattices), torch.from_numpy(rows), torch.from_numpy(cols)).numpy()
    expected = np.array([reference_dtw(lattices[p, : rows[p], : cols[p]]) for p in range(num)])
    np.testing.assert_array_equal(got, expected)


def test_padding_content_is_ignored() -> None:
    rng = np.random.default_rng(0)
    lattice = rng.random((3, 4), dtype=np.float32)
    padded = np.full((1, 6, 9), 7.0, dtype=np.float32)
    padded[0, :3, :4] = lattice
    got = dtw_batch(torch.from_numpy(padded), torch.tensor([3]), torch.tensor([4]))
    assert got.item() == reference_dtw(lattice)


def test_lattices_read_from_a_shared_buffer() -> None:
    # Two lattices as windows of one row-major 3 × 5 block (row stride 5), plus finite padding after it.
    rng = np.random.default_rng(1)
    block = rng.random((3, 5), dtype=np.float32)
    buffer = torch.cat([torch.from_numpy(block.ravel()), torch.zeros(3 * 5 + 5)])
    start, width = torch.tensor([0, 2]), torch.tensor([5, 5])
    got = dtw_from_buffer(buffer, start, width, torch.tensor([3, 2]), torch.tensor([2, 3]))
    expected = [reference_dtw(block[:3, :2]), reference_dtw(block[:2, 2:5])]
    np.testing.assert_array_equal(got.numpy(), np.array(expected))


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        dtw(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="P, N, M"):
        dtw_batch(torch.zeros(3, 3), torch.tensor([1]), torch.tensor([1]))
