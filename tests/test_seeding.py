"""Derived seeds: every combination of parts is its own seed; rank 0 keeps the run seed."""

from __future__ import annotations

import torch

from spidr.seeding import derived_seed, rank_seed


def test_sums_that_coincide_give_distinct_seeds() -> None:
    assert derived_seed(0, 1) != derived_seed(1, 0)
    seeds = {derived_seed(seed, epoch) for seed in range(20) for epoch in range(20)}
    assert len(seeds) == 400
    assert all(0 <= seed < 2**63 for seed in seeds)
    torch.Generator().manual_seed(max(seeds))  # a valid generator seed


def test_rank_seeds_are_distinct_across_runs_and_rank_0_keeps_the_run_seed() -> None:
    grid = {(run, rank): rank_seed(run, rank) for run in range(10) for rank in range(8)}
    assert len(set(grid.values())) == len(grid)  # run + rank made (0, 1) and (1, 0) share their streams
    assert all(rank_seed(run, 0) == run for run in range(10))  # single-process runs are seeded as before
    # nor does a rank start where an epoch's batch plan (derived_seed(seed, epoch)) or a batch's crops start
    others = {derived_seed(run, epoch) for run in range(10) for epoch in range(100)}
    others |= {derived_seed(run, 0, epoch, position)
               for run in range(10) for epoch in range(5) for position in range(8)}
    assert not others & set(grid.values())
