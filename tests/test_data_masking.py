"""Span masking: exact expectations on small cases, invariants, determinism and the reference statistics."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REFERENCE, requires_shared
from spidr.config import MaskingConfig
from spidr.data.masking import (
    _place_without_overlap,
    _span_lengths,
    compute_mask_indices,
    span_mask,
    span_mask_from_lengths,
)


def runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of every run of True in a 1-D bool tensor."""
    out, start = [], None
    for i, value in enumerate([*row.tolist(), False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            out.append((start, i - start))
            start = None
    return out


def no_padding(batch: int, frames: int) -> torch.Tensor:
    return torch.zeros(batch, frames, dtype=torch.bool)


def test_expected_coverage_matches_the_closed_form() -> None:
    """One row of 500 frames: exactly n = 40 spans of 10 with distinct starts uniform in [0, 490), so frame t stays
    unmasked with the hypergeometric probability C(490 − k_t, 40) / C(490, 40), k_t = starts covering t."""
    frames, length, spans, slots = 500, 10, 40, 490
    expected = 0.0
    for t in range(frames):
        covering = min(t, slots - 1) - max(0, t - length + 1) + 1
        expected += 1 - math.comb(slots - covering, spans) / math.comb(slots, spans)
    expected /= frames  # ≈ 0.56, the "1 − (1 − p/l)^l" fraction before equalisation

    generator = torch.Generator().manual_seed(123)
    fractions = torch.tensor([
        span_mask(MaskingConfig(), no_padding(1, frames), generator=generator).float().mean().item()
        for _ in range(300)
    ])
    tolerance = 5 * fractions.std().item() / math.sqrt(len(fractions))
    assert abs(fractions.mean().item() - expected) < tolerance, (fractions.mean().item(), expected)
    assert 0.55 < expected < 0.58


def test_two_spans_in_twenty_frames_hand_computed() -> None:
    """T = 20, l = 10, p = 0.8: n = int(1.6 + u) ≤ 2, raised to min_masks = 2; starts a ≠ b uniform in [0, 10), so
    the row masks 10 + |a − b| frames, with P(|a − b| = d) = 2 (10 − d) / 90."""
    generator = torch.Generator().manual_seed(7)
    draws = 1500
    counts = Counter(
        int(span_mask(MaskingConfig(), no_padding(1, 20), generator=generator).sum()) - 10 for _ in range(draws)
    )
    assert set(counts) <= set(range(1, 10))
    for d in range(1, 10):
        p = 2 * (10 - d) / 90
        sigma = math.sqrt(p * (1 - p) / draws)
        assert abs(counts[d] / draws - p) < 5 * sigma, (d, counts[d] / draws, p)


def test_min_masks_without_overlap_gives_exact_runs() -> None:
    """p·T/l = 0.67 → n ∈ {0, 1}, raised to min_masks = 3: exactly 3 separate runs of 3 frames (each placement
    uses at most 3 + 2 spacing + 2·2 discarded fragment frames, so all three always fit in 40 frames)."""
    cfg = MaskingConfig(mask_prob=0.05, mask_length=3, min_masks=3, no_mask_overlap=True, mask_min_space=1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        (row,) = span_mask(cfg, no_padding(1, 40), generator=generator)
        assert [length for _, length in runs(row)] == [3, 3, 3]


def test_no_overlap_keeps_min_space_between_spans() -> None:
    cfg = MaskingConfig(mask_prob=0.5, mask_length=4, no_mask_overlap=True, mask_min_space=2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):
        (row,) = span_mask(cfg, no_padding(1, 120), generator=generator)
        found = runs(row)
        assert all(length == 4 for _, length in found)
        gaps = [s2 - (s1 + l1) for (s1, l1), (s2, _) in itertools.pairwise(found)]
        assert len(found) >= 2
        assert all(gap >= 2 for gap in gaps)


def test_without_min_masks_a_tiny_probability_can_mask_nothing() -> None:
    cfg = MaskingConfig(mask_prob=0.01, min_masks=0)
    generator = torch.Generator().manual_seed(0)
    totals = {int(span_mask(cfg, no_padding(1, 50), generator=generator).sum()) for _ in range(40)}
    assert 0 in totals
    assert totals <= {0, 10}


@pytest.mark.parametrize("selection", ["static", "uniform", "normal", "poisson"])
@pytest.mark.parametrize("no_overlap", [False, True])
def test_rows_are_equalised_and_padding_is_never_masked(selection: str, no_overlap: bool) -> None:
    cfg = MaskingConfig(mask_selection=selection, mask_other=2.0, no_mask_overlap=no_overlap)
    lengths = torch.tensor([200, 57, 133, 90])
    generator = torch.Generator().manual_seed(3)
    for _ in range(10):
        mask = span_mask_from_lengths(cfg, lengths, 200, generator=generator)
        assert mask.shape == (4, 200)
        assert mask.dtype == torch.bool
        counts = mask.sum(dim=1)
        assert torch.all(counts == counts[0])
        assert counts[0] >= 1
        padding = torch.arange(200)[None, :] >= lengths[:, None]
        assert not (mask & padding).any()


def test_uniform_span_lengths_stay_in_range() -> None:
    cfg = MaskingConfig(mask_selection="uniform", mask_other=3.0, mask_length=5, no_mask_overlap=True,
                        mask_min_space=1, mask_prob=0.3)
    generator = torch.Generator().manual_seed(5)
    seen = set()
    for _ in range(40):
        (row,) = span_mask(cfg, no_padding(1, 300), generator=generator)
        seen |= {length for _, length in runs(row)}
    assert seen <= set(range(3, 11))
    assert len(seen) > 4


def test_poisson_span_lengths_follow_poisson_of_the_mask_length() -> None:
    """fairseq's "poisson" spans: Poisson(mask_length), mean and variance both mask_length (the reference drew
    Poisson(U[0, 1) · mask_length): mean 5 for a length of 10, and one span in ten empty; spec §14.14)."""
    from spidr.data.masking import _span_lengths

    lengths = torch.tensor(_span_lengths(20000, 1000, selection="poisson", mask_length=10, mask_other=0.0,
                                         generator=torch.Generator().manual_seed(0)), dtype=torch.float64)
    assert abs(lengths.mean().item() - 10.0) < 0.1  # standard error of the mean: sqrt(10 / 20000) = 0.022
    assert abs(lengths.var().item() - 10.0) < 0.5
    assert (lengths == 0).float().mean().item() < 0.001  # P(0) = e^-10 = 4.5e-5


def test_same_generator_state_same_mask() -> None:
    cfg = MaskingConfig(no_mask_overlap=True, mask_selection="poisson")  # the path that ignored the seed (§14.13)
    padding = torch.arange(150)[None, :] >= torch.tensor([150, 120, 80])[:, None]
    first = span_mask(cfg, padding, generator=torch.Generator().manual_seed(11))
    again = span_mask(cfg, padding, generator=torch.Generator().manual_seed(11))
    other = span_mask(cfg, padding, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_shared_count_without_padding_mask() -> None:
    """Without a padding mask every row gets the same number of spans (one shared draw); counts stay equal."""
    generator = torch.Generator().manual_seed(0)
    mask = compute_mask_indices((5, 100), None, mask_prob=0.8, mask_length=10, min_masks=2, generator=generator)
    assert mask.shape == (5, 100)
    assert len(set(mask.sum(dim=1).tolist())) == 1


def test_zero_rows() -> None:
    assert span_mask(MaskingConfig(), no_padding(0, 10), generator=torch.Generator()).shape == (0, 10)


@requires_shared
def test_mean_masked_fraction_matches_reference_stats() -> None:
    stats = json.loads((REFERENCE / "reference_facts.json").read_text())["mask_stats"]
    generator = torch.Generator().manual_seed(0)
    fractions = [span_mask(MaskingConfig(), no_padding(4, 200), generator=generator).float().mean().item()
                 for _ in range(200)]
    mean = sum(fractions) / len(fractions)
    # Two independent 200-call means differ by about √2 · std / √200; allow four of those.
    tolerance = 4 * math.sqrt(2) * stats["std_fraction"] / math.sqrt(200)
    assert abs(mean - stats["mean_fraction"]) < tolerance, (mean, stats["mean_fraction"])
    assert stats["min_fraction"] - 0.05 <= min(fractions)
    assert max(fractions) <= stats["max_fraction"] + 0.05


@requires_shared
def test_reference_masks_reproduced_exactly() -> None:
    """Same generator seed, same draws in the same order: the fixture masks come out bit for bit."""
    io = torch.load(REFERENCE / "spidr_small_io.pt", weights_only=True)
    mask = span_mask(MaskingConfig(), no_padding(2, 99), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, io["mask"])
    padded = io["padded"]
    mask = span_mask(MaskingConfig(), padded["padding_mask"], generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, padded["mask"])


def test_rows_one_frame_apart_are_trimmed_to_the_fewest_too() -> None:
    """Rows whose masked counts differ by a single frame are trimmed like any other (a bound off by one kept them
    apart, and the random masks above never differ by exactly one)."""
    lengths = torch.tensor([9, 8, 7])
    padding = torch.arange(9)[None, :] >= lengths[:, None]
    apart_by_one = 0
    for seed in range(60):
        options = {"mask_prob": 0.5, "mask_length": 1, "generator": torch.Generator().manual_seed(seed)}
        free_mask = compute_mask_indices((3, 9), padding, require_same_masks=False, **options)
        options["generator"] = torch.Generator().manual_seed(seed)  # the same rows, then trimmed
        trimmed = compute_mask_indices((3, 9), padding, **options)
        free = free_mask.sum(dim=1)
        assert trimmed.sum(dim=1).tolist() == [int(free.min())] * 3
        assert not (trimmed & ~free_mask).any()
        apart_by_one += int(free.max() - free.min() == 1)
    assert apart_by_one >= 5  # the case this test is about did come up


def test_a_row_barely_longer_than_its_spans_takes_the_reference_start_range():
    """T = 12, l = 10, 2 spans: the reference shrinks the start range when T − l <= n (to T − n − 1 = 9 → starts
    {0, 1, 2}): 2 distinct starts out of 3, so 12 frames masked with P = 1/3 ({0, 2}) and 11 otherwise."""
    generator = torch.Generator().manual_seed(0)
    draws = 600
    full = sum(int(compute_mask_indices((1, 12), None, mask_prob=0.8, mask_length=10, min_masks=2,
                                        generator=generator).sum()) == 12 for _ in range(draws))
    sigma = math.sqrt(draws * (1 / 3) * (2 / 3))
    assert abs(full - draws / 3) < 5 * sigma, full



def test_uniform_span_lengths_take_every_integer_from_mask_other_to_twice_the_length() -> None:
    """Spec §5: "uniform" → integers in [mask_other, 2l], both ends included (fairseq's randint(other, 2l + 1))."""
    lengths = _span_lengths(3000, 1000, selection="uniform", mask_length=5, mask_other=3.0,
                            generator=torch.Generator().manual_seed(0))
    assert set(lengths) == set(range(3, 11))


def test_normal_span_lengths_are_clipped_to_at_least_one_frame() -> None:
    """Spec §5: round(N(l, mask_other)) clipped to >= 1. With l = 1, sigma = 3 more than half the draws round to
    <= 0: they all become 1 (no empty and no negative span)."""
    lengths = torch.tensor(_span_lengths(4000, 1000, selection="normal", mask_length=1, mask_other=3.0,
                                         generator=torch.Generator().manual_seed(0)))
    assert int(lengths.min()) == 1
    assert (lengths == 1).float().mean().item() > 0.5  # P(round(N(1, 3)) <= 1) = P(N < 1.5) = 0.57


def test_when_every_span_is_empty_the_first_becomes_one_frame_shorter_than_the_row() -> None:
    """Spec §5 step 2: if all lengths are 0, the first becomes min(l, sz − 1), so a row is never wholly masked by
    this fallback. One uniform span in [0, 20] is 0 for some seed: find it with the same draw."""
    seed = next(s for s in range(1000)
                if int(torch.randint(0, 21, (1,), generator=torch.Generator().manual_seed(s))) == 0)
    for frames, expected in ((5, 4), (50, 10)):
        lengths = _span_lengths(1, frames, selection="uniform", mask_length=10, mask_other=0.0,
                                generator=torch.Generator().manual_seed(seed))
        assert lengths == [expected], frames


def test_a_span_as_long_as_the_row_fits_without_overlap() -> None:
    """A span fits an interval of exactly its length: one span of 10 in 10 frames masks them all."""
    assert _place_without_overlap(10, [10], 0, torch.Generator().manual_seed(0)).tolist() == list(range(10))
    mask = compute_mask_indices((1, 10), None, mask_prob=0.0, mask_length=10, min_masks=1, no_overlap=True,
                                generator=torch.Generator().manual_seed(0))
    assert mask.all()


def test_no_overlap_keeps_a_free_fragment_as_long_as_the_shortest_span() -> None:
    """7 frames, two spans of 3, min_space 1. The first starts at o in 0..4 (uniform); a fragment of exactly 3 free
    frames is left only when o is 0 (frames 4..6) or 4 (frames 0..2), and the second span then fills it; for
    o in 1..3 it fits nowhere and is dropped. So: either runs (0, 3), (4, 3), or one run starting at 1, 2 or 3."""
    outcomes: Counter[tuple[tuple[int, int], ...]] = Counter()
    for seed in range(80):
        (row,) = compute_mask_indices((1, 7), None, mask_prob=0.0, mask_length=3, min_masks=2, no_overlap=True,
                                      min_space=1, generator=torch.Generator().manual_seed(seed))
        found = tuple(runs(row))
        assert found == ((0, 3), (4, 3)) or (len(found) == 1 and found[0][1] == 3 and found[0][0] in (1, 2, 3)), found
        outcomes[found] += 1
    assert outcomes[((0, 3), (4, 3))] >= 15  # P = 2/5: expected 32 of 80


def test_no_overlap_places_the_longest_span_first() -> None:
    """Spec §5 step 4: longest first. Spans of 8 and 2 in 10 frames: the 8 goes first at 0, 1 or 2, and the 2 fits
    beside it unless the 8 sits at 1. So the 8-frame span is always placed (shortest first, the 2 would usually
    leave no room for it)."""
    totals = Counter()
    for seed in range(60):
        placed = _place_without_overlap(10, [2, 8], 0, torch.Generator().manual_seed(seed)).tolist()
        if len(placed) == 8:
            assert placed == list(range(1, 9))
        else:
            assert placed == list(range(10))
        totals[len(placed)] += 1
    assert set(totals) == {8, 10}


@pytest.mark.parametrize("selection", ["static", "uniform", "normal", "poisson"])
@pytest.mark.parametrize("no_overlap", [False, True])
def test_a_mask_depends_on_its_generator_only_for_every_span_length_rule(selection: str, no_overlap: bool) -> None:
    """Every draw goes through the generator passed in (module docstring), for each mask_selection and both
    placements: the global RNG's state, changed between calls, changes nothing."""
    cfg = MaskingConfig(mask_selection=selection, mask_other=2.0, no_mask_overlap=no_overlap)
    padding = torch.arange(150)[None, :] >= torch.tensor([150, 120, 80])[:, None]
    masks = []
    for global_seed in (1, 2, 3):
        torch.manual_seed(global_seed)
        masks.append(span_mask(cfg, padding, generator=torch.Generator().manual_seed(11)))
    assert all(torch.equal(masks[0], other) for other in masks[1:])


def test_a_span_that_fits_nowhere_leaves_the_shorter_spans_placed() -> None:
    """No-overlap placement: "a span that fits nowhere is dropped" — only that span; the shorter ones placed after it
    (longest first) still go in."""
    for seed in range(5):
        masked = _place_without_overlap(12, [20, 3], 0, torch.Generator().manual_seed(seed))
        assert len(masked) == 3
        assert masked.tolist() == list(range(int(masked[0]), int(masked[0]) + 3))
        assert 0 <= int(masked[0]) <= 9


# Over every span rule, overlap or not, any lengths: padding never masked, rows equal, a pure function of
# the generator; without overlap (one row, static spans) every run is one span, min_space apart.
@settings(max_examples=100, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=5), extra=st.integers(0, 20),
       prob=st.floats(0, 1), length=st.integers(1, 30),
       selection=st.sampled_from(["static", "uniform", "normal", "poisson"]), other=st.integers(0, 5),
       no_overlap=st.booleans(), min_space=st.integers(0, 3), min_masks=st.integers(0, 4),
       seed=st.integers(0, 2**32 - 1))
def test_span_masks_never_touch_padding_and_rows_are_equal(  # noqa: PLR0917 (hypothesis passes them by name)
        lengths, extra, prob, length, selection, other, no_overlap, min_space, min_masks, seed) -> None:
    cfg = MaskingConfig(mask_prob=prob, mask_length=length, mask_selection=selection,
                        mask_other=min(other, 2 * length), no_mask_overlap=no_overlap, mask_min_space=min_space,
                        min_masks=min_masks)
    padding = torch.arange(max(lengths) + extra)[None, :] >= torch.tensor(lengths)[:, None]
    mask = span_mask(cfg, padding, generator=torch.Generator().manual_seed(seed))
    assert mask.shape == padding.shape
    assert mask.dtype == torch.bool
    assert not (mask & padding).any()
    assert (mask.sum(1) == mask.sum(1)[0]).all()
    assert torch.equal(span_mask(cfg, padding, generator=torch.Generator().manual_seed(seed)), mask)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(frames=st.integers(0, 300), prob=st.floats(0, 1), length=st.integers(1, 20), min_space=st.integers(1, 4),
       min_masks=st.integers(0, 4), seed=st.integers(0, 2**32 - 1))
def test_spans_without_overlap_are_whole_and_min_space_apart(  # noqa: PLR0917 (hypothesis passes them by name)
        frames, prob, length, min_space, min_masks, seed) -> None:
    mask = compute_mask_indices((1, frames), torch.zeros(1, frames, dtype=torch.bool), mask_prob=prob,
                                mask_length=length, generator=torch.Generator().manual_seed(seed),
                                min_masks=min_masks, no_overlap=True, min_space=min_space)
    spans = runs(mask[0])
    assert all(run == length for _, run in spans), spans
    assert all(b - (a + n) >= min_space for (a, n), (b, _) in itertools.pairwise(spans))
    assert len(spans) <= max(min_masks, int(prob * frames / length + 1))
