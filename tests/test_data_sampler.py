"""Bucketed batch sampler: batch budget, coverage across ranks, epoch seeding and exact mid-epoch resume."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spidr.data import sampler as sampler_module
from spidr.data.sampler import BucketBatchSampler, _bucket_ids, _group_by_bucket


def random_lengths(n: int = 300, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1000, 60_000, size=n).tolist()


def make(lengths: list[int], **kwargs: object) -> BucketBatchSampler:
    defaults: dict[str, object] = {"max_batch_length": 150_000, "min_sample_size": 2000, "max_sample_size": 40_000,
                                   "num_buckets": 20}
    return BucketBatchSampler(lengths, **(defaults | kwargs))  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50_000), min_size=1, max_size=80),
    budget=st.integers(2000, 120_000),
    padded=st.booleans(),
    method=st.sampled_from(["uniform", "percentile"]),
)
def test_batches_never_exceed_the_budget(lengths: list[int], budget: int, padded: bool, method: str) -> None:
    if max(lengths) < 1000:
        lengths = [*lengths, 1000]
    sampler = BucketBatchSampler(lengths, max_batch_length=budget, min_sample_size=1000, max_sample_size=30_000,
                                 num_buckets=7, bucket_method=method, padded=padded)  # type: ignore[arg-type]
    for batch in sampler.batches(0):
        clipped = [min(lengths[i], 30_000) for i in batch]
        cost = len(batch) * max(clipped) if padded else sum(clipped)
        assert cost <= budget or len(batch) == 1  # only a lone over-budget utterance may exceed it


def test_short_dropped_long_clipped() -> None:
    lengths = [500, 1999, 2000, 100_000, 30_000]
    sampler = make(lengths, max_batch_length=40_000 + 30_000)
    seen = sorted(i for batch in sampler.batches(0) for i in batch)
    assert seen == [2, 3, 4]  # 500 and 1999 are below min_sample_size
    # 100 000 counts as 40 000: it fits with the 30 000 one, but not with both others.
    assert all(sum(min(lengths[i], 40_000) for i in b) <= 70_000 for b in sampler.batches(0))


def test_unshuffled_batches_are_contiguous_in_length() -> None:
    lengths = random_lengths()
    sampler = make(lengths, shuffle=False)
    flat = [min(lengths[i], 40_000) for batch in sampler.batches(0) for i in batch]
    assert flat == sorted(flat)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_utterance_once_per_epoch_across_ranks(world_size: int) -> None:
    lengths = random_lengths()
    kept = {i for i, n in enumerate(lengths) if n >= 2000}
    for epoch in (0, 1):
        samplers = [make(lengths, rank=r, world_size=world_size) for r in range(world_size)]
        per_rank = [s.batches(epoch) for s in samplers]
        assert len({len(b) for b in per_rank}) == 1  # every rank steps the same number of times
        global_batches = samplers[0].global_batches(epoch)
        unpadded = make(lengths).global_batches(epoch)  # world 1 never pads
        padding = len(global_batches) - len(unpadded)
        assert 0 <= padding < world_size  # no extra world of batches when it already divides (spec §14.11)
        assert global_batches[: len(unpadded)] == unpadded
        assert global_batches[len(unpadded):] == unpadded[:padding]
        counts = Counter(i for batches in per_rank for b in batches for i in b)
        assert set(counts) == kept
        repeated = Counter(i for b in unpadded[:padding] for i in b)
        assert all(counts[i] == 1 + repeated[i] for i in kept)


def test_drop_last_drops_the_remainder() -> None:
    lengths = random_lengths()
    full = make(lengths).global_batches(0)
    samplers = [make(lengths, rank=r, world_size=4, drop_last=True) for r in range(4)]
    assert samplers[0].global_batches(0) == full[: len(full) - len(full) % 4]
    assert sum(len(s) for s in samplers) == len(full) - len(full) % 4


def test_each_epoch_has_its_own_seed_and_seeds_do_not_shift_into_epochs() -> None:
    lengths = random_lengths()
    a, b = make(lengths, seed=5), make(lengths, seed=5)
    assert a.batches(0) == b.batches(0)
    assert a.batches(0) != a.batches(1)
    a.set_epoch(1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)  # not cumulative: epoch 2 does not depend on the epochs before
    # A seed of seed + epoch made the run with seed 6 replay seed 5's epochs one epoch early (a seed study's runs
    # then saw the same batches).
    assert make(lengths, seed=6).batches(0) != make(lengths, seed=5).batches(1)
    assert make(lengths, seed=7).batches(0) != make(lengths, seed=5).batches(2)


@pytest.mark.parametrize("world_size", [1, 3, 4, 7])
def test_exactly_the_padding_batches_are_marked_as_repeats(world_size: int) -> None:
    lengths = random_lengths(n=50)
    distinct = make(lengths).global_batches(0)
    samplers = [make(lengths, rank=r, world_size=world_size) for r in range(world_size)]
    originals: list[list[int]] = []
    repeats: list[list[int]] = []
    for sampler in samplers:
        for position, batch in enumerate(sampler.batches(0)):
            (repeats if sampler.is_repeat(0, position) else originals).append(batch)
    assert len(repeats) == -len(distinct) % world_size
    assert sorted(originals) == sorted(distinct)  # every distinct batch counted once, on one rank
    assert all(batch in originals for batch in repeats)


def test_resume_mid_epoch_continues_with_the_same_batches() -> None:
    lengths = random_lengths()
    uninterrupted = make(lengths, world_size=2, rank=1, seed=3)
    uninterrupted.set_epoch(4)
    expected = list(uninterrupted)
    interrupted = make(lengths, world_size=2, rank=1, seed=3)
    interrupted.set_epoch(4)
    iterator = iter(interrupted)
    consumed = [next(iterator) for _ in range(5)]
    state = interrupted.state_dict()
    assert state["epoch"] == 4
    assert state["position"] == 5

    resumed = make(lengths, world_size=2, rank=1, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # a loop calling set_epoch(current) keeps the position
    assert consumed + list(resumed) == expected
    # The next pass is the next epoch, as for the uninterrupted run.
    uninterrupted.set_epoch(5)
    assert list(resumed) == list(uninterrupted)


def test_a_finished_epoch_is_followed_by_the_next() -> None:
    sampler = make(random_lengths())
    first, second = list(sampler), list(sampler)
    assert sampler.epoch == 1
    assert first == sampler.batches(0)
    assert second == sampler.batches(1)


def test_state_from_another_world_size_restarts_the_epoch(caplog: pytest.LogCaptureFixture) -> None:
    lengths = random_lengths()
    old = make(lengths, world_size=2)
    iterator = iter(old)
    next(iterator)
    new = make(lengths, world_size=3)
    with caplog.at_level(logging.WARNING):
        new.load_state_dict(old.state_dict())
    assert "world_size" in caplog.text
    assert (new.epoch, new.position) == (0, 0)


def test_state_saved_under_another_batch_plan_restarts_the_epoch(caplog: pytest.LogCaptureFixture) -> None:
    """A position saved when epochs were seeded with seed + epoch points into another order of batches: resuming it
    would repeat some utterances of the epoch and skip others."""
    lengths = random_lengths()
    saver = make(lengths)
    saver.set_epoch(3)
    state = {**saver.state_dict(), "position": 5}
    del state["plan"]  # as saved before the plan was versioned
    sampler = make(lengths)
    with caplog.at_level(logging.WARNING):
        sampler.load_state_dict(state)
    assert "plan" in caplog.text
    assert (sampler.epoch, sampler.position) == (3, 0)
    same = make(lengths)
    same.load_state_dict({**state, "plan": sampler_module.PLAN_VERSION})
    assert (same.epoch, same.position) == (3, 5)


def test_state_of_other_batches_of_the_same_count_restarts_the_epoch(caplog: pytest.LogCaptureFixture) -> None:
    """num_buckets 20 → 21 (or another bucket method, crop length, manifest order) may keep the batch count:
    the position was then resumed into other batches, some utterances seen twice in the epoch and others never."""
    lengths = random_lengths(2000)
    old = make(lengths, num_buckets=20)
    old.set_epoch(2)
    consumed = [batch for _, batch in zip(range(10), old, strict=False)]
    state = old.state_dict()
    for change in ({"num_buckets": 21}, {"max_sample_size": 39_900}):  # each keeps the 435 batches
        new = make(lengths, **change)
        new.set_epoch(2)
        assert len(new) == state["num_batches"], change
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            new.load_state_dict(state)
        assert "fingerprint differ" in caplog.text, change
        assert (new.epoch, new.position) == (2, 0)
    same = make(lengths, num_buckets=20)
    same.load_state_dict(state)
    assert (same.epoch, same.position) == (2, 10)
    assert consumed + list(same) == list(make(lengths, num_buckets=20).batches(2))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="min_sample_size"):
        make([100, 200])
    with pytest.raises(ValueError, match="rank"):
        make(random_lengths(), rank=2, world_size=2)
    with pytest.raises(ValueError, match="drop_last"):
        make([50_000], world_size=2, rank=0, drop_last=True).batches(0)


def _greedy(lengths: list[int], order: np.ndarray, budget: int, *, padded: bool) -> list[list[int]]:
    """The packing rule item by item: add an utterance while the batch cost stays within the budget."""
    batches, current, total, longest = [], [], 0, 0
    for item in order.tolist():
        length = lengths[item]
        cost = (len(current) + 1) * max(longest, length) if padded else total + length
        if current and cost > budget:
            batches.append(current)
            current, total, longest = [], 0, 0
        current.append(item)
        total += length
        longest = max(longest, length)
    return [*batches, current] if current else batches


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 50_000), min_size=1, max_size=120), budget=st.integers(1, 150_000),
       padded=st.booleans(), seed=st.integers(0, 3))
def test_vectorised_packing_is_the_greedy_rule(lengths: list[int], budget: int, padded: bool, seed: int) -> None:
    sampler = BucketBatchSampler(lengths, max_batch_length=budget, num_buckets=5, padded=padded)
    order = np.random.default_rng(seed).permutation(len(lengths))
    expected = _greedy(lengths, order, budget, padded=padded)
    for block in (sampler_module.SEARCH_BLOCK, 1, 7):  # blocked search: blocks of one or a few starts too
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sampler_module, "SEARCH_BLOCK", block)
            bounds = sampler._bounds(np.asarray(lengths)[order])  # nothing dropped or clipped
        assert [order[a:b].tolist() for a, b in itertools.pairwise(bounds)] == expected


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 400_000), min_size=1, max_size=200), num_buckets=st.integers(1, 1000))
def test_uniform_buckets_by_division_match_the_edges(lengths: list[int], num_buckets: int) -> None:
    array = np.asarray(lengths, dtype=np.int64)
    edges = np.linspace(array.min() - 1, array.max() + 1, num_buckets + 1)
    # lengths that fall exactly on inner edges, where a rounding error would pick the neighbour bucket
    on_edges = np.unique(np.round(edges[1:-1])[np.round(edges[1:-1]) == edges[1:-1]].astype(np.int64))
    array = np.concatenate([array, on_edges[(on_edges >= array.min()) & (on_edges <= array.max())]])
    expected = np.minimum(np.searchsorted(edges[1:], array, side="left"), num_buckets - 1)
    np.testing.assert_array_equal(_bucket_ids(array, num_buckets, "uniform"), expected)


@given(buckets=st.lists(st.integers(0, 40), min_size=1, max_size=300),
       block_size=st.sampled_from([1, 2, 7, 64, 1 << 15]))
def test_blocked_grouping_is_the_stable_sort_by_bucket(buckets: list[int], block_size: int) -> None:
    keys = np.asarray(buckets, dtype=np.int16)
    values = np.random.default_rng(len(buckets)).integers(0, 10**6, size=keys.size).astype(np.int32)
    (indices, grouped), bounds = _group_by_bucket(keys, 41, (np.arange(keys.size), values), block_size=block_size)
    order = np.argsort(keys, kind="stable")  # the independent truth: numpy's stable sort
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_array_equal(grouped, values[order])
    assert grouped.dtype == np.int32
    np.testing.assert_array_equal(bounds, np.searchsorted(keys[order], np.arange(42), side="left"))


def test_large_epochs_are_planned_without_a_list_per_batch() -> None:
    lengths = np.random.default_rng(0).integers(16_000, 560_000, size=200_000)
    sampler = BucketBatchSampler(lengths, max_batch_length=3_800_000, world_size=64, rank=5)
    batches = sampler.batches(0)
    assert isinstance(batches.flat, np.ndarray)
    assert batches.flat.size == lengths.size  # every utterance once (padding repeats batch ids, not indices)
    assert sum(len(b) for b in batches) == sum(len(b) for b in sampler.global_batches(0)[5::64])


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(2000, 50_000), min_size=1, max_size=150), num_buckets=st.integers(1, 30),
       seed=st.integers(0, 5))
def test_shuffled_epochs_walk_buckets_from_short_to_long(lengths: list[int], num_buckets: int, seed: int) -> None:
    sampler = make(lengths, num_buckets=num_buckets, max_sample_size=None, seed=seed, max_batch_length=10**9)
    flat = sampler.global_batches(0).flat  # one batch holds the epoch's whole order
    buckets = dict(zip(sampler.indices.tolist(), sampler.buckets.tolist(), strict=True))
    order = [buckets[index] for index in flat.tolist()]
    assert order == sorted(order)
    assert sorted(flat.tolist()) == sorted(sampler.indices.tolist())


def test_each_bucket_is_shuffled_uniformly() -> None:
    """Two buckets of three utterances: over 3,600 epochs every one of the 6 × 6 joint orders is about equally
    frequent (expected 100 each) and the short bucket always comes first."""
    from scipy.stats import chisquare

    lengths = [20_000, 20_000, 20_000, 40_000, 40_000, 40_000]
    sampler = make(lengths, num_buckets=2, max_sample_size=None, max_batch_length=10**9)
    counts = Counter(tuple(sampler.global_batches(epoch).flat.tolist()) for epoch in range(3600))
    assert all(set(order[:3]) == {0, 1, 2} for order in counts)
    assert len(counts) == 36
    assert chisquare(list(counts.values())).pvalue > 1e-3


@pytest.mark.parametrize(("padded", "budget", "batches", "expected"), [
    (False, 600, [[0, 1, 2], [3], [4]], 3 * 100 + 400 + 500),
    (True, 1000, [[0, 1, 2], [3, 4]], 100 + 200 + 300 + 400 + 500),
])
def test_scored_samples_counts_each_batch_cropped_to_its_shortest(padded: bool, budget: int,
                                                                   batches: list[list[int]], expected: int) -> None:
    """S9: lengths 100..500, unshuffled, pack by hand as ``batches`` (cropped: cost = sum <= 600; padded: cost =
    rows x longest <= 1000). A cropped batch scores rows x its shortest; a padded one every real sample."""
    sampler = BucketBatchSampler([100, 200, 300, 400, 500], max_batch_length=budget, shuffle=False, num_buckets=1,
                                 padded=padded)
    assert [list(b) for b in sampler.global_batches(0)] == batches
    assert sampler.scored_samples() == expected


def test_percentile_buckets_hold_equal_shares_of_the_utterances() -> None:
    """S11: bucket_method = "percentile" makes equal-frequency buckets; on lengths 1, 2, 4, ..., 2**15 four such
    buckets hold 4 utterances each (uniform-width buckets would put 14 of the 16 in the first)."""
    lengths = [2**k for k in range(16)]
    sampler = BucketBatchSampler(lengths, max_batch_length=10**6, num_buckets=4, bucket_method="percentile")
    assert np.bincount(sampler.buckets, minlength=4).tolist() == [4, 4, 4, 4]




def two_batches(**kwargs: object) -> BucketBatchSampler:
    return BucketBatchSampler([20_000] * 4, max_batch_length=40_000, num_buckets=1, **kwargs)  # type: ignore[arg-type]


def test_fewer_batches_than_ranks_are_repeated_cyclically_so_every_rank_gets_one() -> None:
    """2 batches, 5 ranks: 3 repeats (batches 0, 1, 0 of the epoch's order), every rank one batch, each utterance
    on a non-repeat batch exactly once."""
    distinct = two_batches().global_batches(0)
    assert len(distinct) == 2
    samplers = [two_batches(rank=r, world_size=5) for r in range(5)]
    assert samplers[0].global_batches(0) == [distinct[0], distinct[1], distinct[0], distinct[1], distinct[0]]
    assert [len(s) for s in samplers] == [1] * 5
    assert [s.is_repeat(0, 0) for s in samplers] == [False, False, True, True, True]
    kept = Counter(i for s in samplers for b in s.batches(0) if not s.is_repeat(0, 0) for i in b)
    assert sorted(kept) == [0, 1, 2, 3]
    assert set(kept.values()) == {1}


def test_shuffled_epochs_shuffle_the_order_of_the_batches() -> None:
    """Spec §6.4: the list of batches is permuted each epoch. Ten short utterances make one batch and ten long ones
    five: the short batch must not always come first (it does unshuffled)."""
    lengths = [10_000] * 10 + [50_000] * 10
    shuffled = BucketBatchSampler(lengths, max_batch_length=100_000, num_buckets=2)
    ordered = BucketBatchSampler(lengths, max_batch_length=100_000, num_buckets=2, shuffle=False)
    where = Counter()
    for epoch in range(60):
        batches = shuffled.batches(epoch)
        assert len(batches) == 6
        (position,) = [k for k, b in enumerate(batches) if len(b) == 10]
        where[position] += 1
    assert len(where) >= 4  # uniform over 6 places: all 6 almost surely within 60 epochs
    assert [len(b) for b in ordered.batches(0)] == [10, 2, 2, 2, 2, 2]


def test_a_state_saved_in_a_later_epoch_resumes_at_its_position() -> None:
    """A trainer saves at every checkpoint: the state of epoch 1 must carry epoch 1's fingerprint, not the one first
    computed in epoch 0 (a resume would then restart the epoch)."""
    lengths = np.random.default_rng(0).integers(1000, 60_000, size=300).tolist()
    kwargs = {"max_batch_length": 150_000, "min_sample_size": 2000, "max_sample_size": 40_000, "num_buckets": 20}
    sampler = BucketBatchSampler(lengths, **kwargs)
    sampler.state_dict()  # a checkpoint in epoch 0
    list(sampler)
    iterator = iter(sampler)
    consumed = [next(iterator) for _ in range(3)]
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    resumed = BucketBatchSampler(lengths, **kwargs)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (1, 3)
    assert consumed + list(resumed) == list(BucketBatchSampler(lengths, **kwargs).batches(1))


def test_a_resume_under_another_seed_says_the_seed_changed(caplog: pytest.LogCaptureFixture) -> None:
    saved = two_batches(seed=5)
    next(iter(saved))
    state = saved.state_dict()
    for fresh_state in (state, {k: v for k, v in state.items() if k != "fingerprint"}):  # also as saved before it
        other = two_batches(seed=6)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            other.load_state_dict(fresh_state)
        assert "seed" in caplog.text
        assert (other.epoch, other.position) == (0, 0)


def test_percentile_buckets_are_right_closed_like_the_uniform_ones() -> None:
    """P01. Lengths 1..5, 4 percentile buckets: the edges are the quartiles 1, 2, 3, 4, 5 and bucket b holds
    (edge_b, edge_b+1] (the shortest joins bucket 0), so the buckets hold {1, 2}, {3}, {4}, {5}. A left-closed
    search would give {1}, {2}, {3}, {4, 5}."""
    ids = _bucket_ids(np.array([1, 2, 3, 4, 5]), 4, "percentile")
    assert ids.tolist() == [0, 0, 1, 2, 3]
    sampler = BucketBatchSampler([5, 4, 3, 2, 1], max_batch_length=100, num_buckets=4, bucket_method="percentile")
    assert np.bincount(sampler.buckets, minlength=4).tolist() == [2, 1, 1, 1]


# (min, max, num_buckets, length on an inner edge): cases where (length − edge_0) / width rounds above the edge's
# index, so the float guess lands one bucket too high and only the exact edge comparison puts it back.
@pytest.mark.parametrize(("low", "high", "num_buckets", "length"), [
    (223967, 597996, 279, 265525), (268250, 478497, 648, 431776), (102920, 349074, 765, 184971),
    (248085, 387929, 996, 318007), (45973, 98917, 730, 72445),
])
def test_a_length_exactly_on_a_uniform_edge_belongs_to_the_lower_bucket(low: int, high: int, num_buckets: int,
                                                                        length: int) -> None:
    """P02. Spec §6.3: uniform edges evenly spaced between min − 1 and max + 1, assignment by right-closed search.
    The length equals an inner edge exactly, so it belongs to the bucket that edge closes."""
    edges = np.linspace(low - 1, high + 1, num_buckets + 1)
    (k,) = np.flatnonzero(edges == length)  # the inner edge it lies on
    ids = _bucket_ids(np.array([low, length, high]), num_buckets, "uniform")
    assert ids.tolist() == [0, k - 1, num_buckets - 1]


def test_scored_samples_leave_out_the_batches_drop_last_drops() -> None:
    """P11. Lengths 100..500, budget 600, unshuffled: batches [0, 1, 2], [3], [4]. With 2 ranks and drop_last the
    third batch is dropped, so 3 · 100 + 400 = 700 samples are scored (not 1200)."""
    sampler = BucketBatchSampler([100, 200, 300, 400, 500], max_batch_length=600, shuffle=False, num_buckets=1,
                                 world_size=2, drop_last=True)
    assert [list(b) for b in sampler.global_batches(0)] == [[0, 1, 2], [3]]
    assert sampler.scored_samples() == 700


def test_turning_shuffle_on_with_one_utterance_per_bucket_restarts_the_epoch(caplog) -> None:
    """P13. One utterance per bucket: shuffled and unshuffled epochs have the same utterance order and the same
    batches, only the batch order differs. A position saved unshuffled points into another order once shuffled."""
    lengths = [1000 * (k + 1) for k in range(12)]
    kwargs = {"max_batch_length": 3000, "num_buckets": 1000}
    saver = BucketBatchSampler(lengths, shuffle=False, **kwargs)
    iterator = iter(saver)
    next(iterator), next(iterator)
    state = saver.state_dict()
    shuffled = BucketBatchSampler(lengths, shuffle=True, **kwargs)
    assert [sorted(b) for b in shuffled.batches(0)] != [sorted(b) for b in saver.batches(0)]  # another order
    with caplog.at_level(logging.WARNING):
        shuffled.load_state_dict(state)
    assert "fingerprint" in caplog.text
    assert (shuffled.epoch, shuffled.position) == (0, 0)


def test_a_state_saved_before_fingerprints_resumes_at_its_position(caplog) -> None:
    """P17. The module trusts a state saved before the fingerprint existed when everything else matches."""
    lengths = np.random.default_rng(0).integers(1000, 60_000, size=300).tolist()
    kwargs = {"max_batch_length": 150_000, "min_sample_size": 2000, "max_sample_size": 40_000, "num_buckets": 20}
    saver = BucketBatchSampler(lengths, **kwargs)
    saver.set_epoch(2)
    iterator = iter(saver)
    consumed = [next(iterator) for _ in range(4)]
    state = {k: v for k, v in saver.state_dict().items() if k != "fingerprint"}
    resumed = BucketBatchSampler(lengths, **kwargs)
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(state)
    assert not caplog.records
    assert (resumed.epoch, resumed.position) == (2, 4)
    assert consumed + list(resumed) == list(BucketBatchSampler(lengths, **kwargs).batches(2))
