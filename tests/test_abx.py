"""ABX: hand-computed cells, collapse order, subsampling caps, slicing, invariances, and a brute-force reference."""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spidr import cli
from spidr.cli import main as cli_main
from spidr.eval import abx_frames, abx_scoring
from spidr.eval.abx import AbxResult, abx, abx_error_rate, frame_distances, prepare_frames
from spidr.eval.abx_cells import Groups, Labels
from spidr.eval.dtw import dtw
from spidr.eval.feature_dir import FeatureDirectory
from spidr.eval.items import Items, frame_bounds
from test_dtw import reference_dtw

RATE = 50


def frame_time(frame: int) -> str:
    """Centre of a 50 Hz frame, in seconds, written exactly."""
    return f"{(2 * frame + 1) / 100:.2f}"


def make_items(rows: list[tuple]) -> Items:
    """Rows (file, first frame, last frame, phone, speaker[, prev, next]) → Items; times are the frame centres."""
    columns: dict[str, list[str]] = defaultdict(list)
    for file, first, last, phone, speaker, *context in rows:
        prev, nxt = context or ("x", "y")
        for name, value in zip(
            ("#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker"),
            (file, frame_time(first), frame_time(last), phone, prev, nxt, speaker),
            strict=True,
        ):
            columns[name].append(value)
    return Items.from_columns(columns)


def scalar_task(values: dict[str, list[float]], rows: list[tuple]) -> tuple[dict[str, np.ndarray], Items]:
    return {name: np.asarray(v, dtype=np.float32)[:, None] for name, v in values.items()}, make_items(rows)


# ----------------------------------------------------------------------------------------------------------------
# Frame distances
# ----------------------------------------------------------------------------------------------------------------


def test_angular_distance_values() -> None:
    frames = prepare_frames(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]]), "angular")
    got = frame_distances(frames, frames, "angular")
    expected = torch.tensor([[0.0, 0.5, 1.0, 0.25], [0.5, 0.0, 0.5, 0.25], [1.0, 0.5, 0.0, 0.75],
                             [0.25, 0.25, 0.75, 0.0]])
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)  # float32 arccos near 1 is only ~1e-3 exact


def test_zero_frames_follow_the_singularity_rule() -> None:
    # fastabx replaces an all-zero frame by the uniform unit vector: two zero frames are at distance 0, and a zero
    # frame sits at the angle between the other frame and the diagonal (here 45° = 0.25, and 135° = 0.75).
    frames = prepare_frames(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]), "angular")
    got = frame_distances(frames, frames, "angular")
    assert got[0, 1].item() == pytest.approx(0.0, abs=1e-3)
    assert got[0, 2].item() == pytest.approx(0.25, abs=1e-6)
    assert got[0, 3].item() == pytest.approx(0.75, abs=1e-6)


def test_other_distances() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    torch.testing.assert_close(frame_distances(x, x, "euclidean"), torch.tensor([[0.0, 5.0], [5.0, 0.0]]))
    units = torch.tensor([[1.0], [2.0], [1.0]])
    torch.testing.assert_close(frame_distances(units, units, "identical"),
                               torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    got = frame_distances(p, p, "kl_symmetric")
    direct = 0.5 * ((p[0] - p[1]) * ((p[0] + 1e-6).log() - (p[1] + 1e-6).log())).sum()
    torch.testing.assert_close(got, torch.tensor([[0.0, direct], [direct, 0.0]]), atol=1e-5, rtol=1e-5)
    # Rows that do not sum to 1 (pooled or summed posteriors): the same formula, element by element.
    rows = torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.2, 0.8], [3.0, 5.0]])
    direct = 0.5 * ((rows[:, None] - rows[None]) * ((rows[:, None] + 1e-6).log() - (rows[None] + 1e-6).log())).sum(-1)
    torch.testing.assert_close(frame_distances(rows, rows, "kl_symmetric"), direct, atol=1e-4, rtol=1e-5)
    assert frame_distances(rows[:1], rows[1:2], "kl_symmetric").item() == pytest.approx(4.5 * math.log(10), rel=1e-5)
    with pytest.raises(ValueError, match="discrete units"):
        prepare_frames(torch.zeros(3, 2), "identical")


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed scores
# ----------------------------------------------------------------------------------------------------------------


def test_hand_computed_within_cell_with_a_tie() -> None:
    # One cell (A = a, B = b; b has a single item so it is never A). X = a1 = 0: d(a1, a2) = 1 = d(a1, b1), a tie
    # worth ½; X = a2 = 1: d(a2, a1) = 1 > d(a2, b1) = 0, wrong. Score ¼, error ¾, over 2·1·1 triplets.
    features, items = scalar_task({"f": [0.0, 1.0, 1.0]}, [("f", 0, 0, "a", "s"), ("f", 1, 1, "a", "s"),
                                                          ("f", 2, 2, "b", "s")])
    result = abx(features, items, distance="euclidean", frequency=RATE)
    assert result.error_rate == 0.75
    assert (result.num_cells, result.num_triplets, result.num_pairs) == (1, 2, 1)


def test_identical_features_give_chance_and_orthogonal_give_zero() -> None:
    rows = [("f", i, i + 1, "ab"[i // 2 % 2], "s") for i in range(0, 16, 2)]
    same = {"f": np.ones((16, 4), dtype=np.float32)}
    assert abx_error_rate(same, make_items(rows)) == 0.5  # every comparison is a tie
    one_hot = np.zeros((16, 4), dtype=np.float32)
    for i in range(0, 16, 2):
        one_hot[i : i + 2, i // 2 % 2] = 1.0  # phone a on axis 0, phone b on axis 1
    assert abx_error_rate({"f": one_hot}, make_items(rows)) == 0.0


def test_collapse_averages_contexts_then_speakers_then_pairs() -> None:
    # Pair (a, b) has three cells: speaker s1 / context c1 → error 0, s1 / c2 → 1, s2 / c1 → 1. Averaging contexts,
    # then speakers gives (½ + 1) / 2 = ¾, not the cell mean ⅔.
    values = {"f": [0.0, 0.1, 5.0, 0.0, 1.0, 0.5], "g": [0.0, 1.0, 0.5]}
    rows = [
        ("f", 0, 0, "a", "s1", "c1", "c1"), ("f", 1, 1, "a", "s1", "c1", "c1"), ("f", 2, 2, "b", "s1", "c1", "c1"),
        ("f", 3, 3, "a", "s1", "c2", "c2"), ("f", 4, 4, "a", "s1", "c2", "c2"), ("f", 5, 5, "b", "s1", "c2", "c2"),
        ("g", 0, 0, "a", "s2", "c1", "c1"), ("g", 1, 1, "a", "s2", "c1", "c1"), ("g", 2, 2, "b", "s2", "c1", "c1"),
    ]
    features, items = scalar_task(values, rows)
    result = abx(features, items, distance="euclidean", frequency=RATE)
    assert result.num_cells == 3
    assert result.error_rate == pytest.approx(0.75)


def test_hand_computed_across_speaker() -> None:
    # s1: a1 = 0, b1 = 1; s2: a2 = 0.2, b2 = 0.1. Cells (A, B, X): (a s1, b s1, a s2): x = 0.2 is nearer a1 (0.2)
    # than b1 (0.8): right. (b s1, a s1, b s2): x = 0.1, d(b1) = 0.9 > d(a1) = 0.1: wrong. (a s2, b s2, a s1):
    # x = 0, d(a2) = 0.2 > d(b2) = 0.1: wrong. (b s2, a s2, b s1): x = 1, d(b2) = 0.9 > d(a2) = 0.8: wrong.
    # Pairs: (a, b) → (0 + 1) / 2, (b, a) → 1; mean ¾.
    features, items = scalar_task({"f": [0.0, 1.0], "g": [0.2, 0.1]}, [
        ("f", 0, 0, "a", "s1"), ("f", 1, 1, "b", "s1"), ("g", 0, 0, "a", "s2"), ("g", 1, 1, "b", "s2")])
    for context in ("within", "any"):
        result = abx(features, items, speaker="across", context=context, distance="euclidean", frequency=RATE)
        assert result.error_rate == pytest.approx(0.75)
        assert (result.num_cells, result.num_triplets) == (4, 4)
    # Within speaker no cell exists: every group has a single item.
    with pytest.raises(ValueError, match="no ABX cell"):
        abx(features, items, speaker="within", distance="euclidean", frequency=RATE)


def test_dtw_is_used_with_x_on_the_rows() -> None:
    # Multi-frame items: x = [0, 0, 3], a = [0, 3], b = [0, 0, 0]. d(x, a) = DTW(|x_i − a_j|) = 0 (path of 3 cells);
    # d(x, b) = 3 / 3 = 1. Within cell (A = a-phone: items x and a): both X choices are right, error 0.
    values = {"f": [0.0, 0.0, 3.0, 0.0, 3.0, 0.0, 0.0, 0.0]}
    features, items = scalar_task(values, [("f", 0, 2, "a", "s"), ("f", 3, 4, "a", "s"), ("f", 5, 7, "b", "s")])
    assert abx_error_rate(features, items, distance="euclidean", frequency=RATE) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Subsampling and slicing
# ----------------------------------------------------------------------------------------------------------------


def test_max_size_group_caps_a_b_and_x() -> None:
    rng = np.random.default_rng(0)
    rows = [("f", i, i, "a", "s") for i in range(5)] + [("f", i, i, "b", "s") for i in range(5, 8)]
    features = {"f": rng.normal(size=(8, 3)).astype(np.float32)}
    items = make_items(rows)
    full = abx(features, items, max_size_group=None)
    assert (full.num_cells, full.num_triplets) == (2, 5 * 4 * 3 + 3 * 2 * 5)
    capped = abx(features, items, max_size_group=2)
    assert (capped.num_cells, capped.num_triplets) == (2, 2 * 1 * 2 + 2 * 1 * 2)
    assert abx(features, items, max_size_group=2, seed=0) == capped  # deterministic under the seed
    assert abx(features, items, max_size_group=-1) == full  # negative disables, as in the fastabx CLI
    with pytest.raises(ValueError, match="max_size_group"):
        abx(features, items, max_size_group=1)


def test_max_x_across_caps_x_speakers() -> None:
    rng = np.random.default_rng(0)
    rows = [(f"f{s}", k, k, "ab"[k], f"s{s}") for s in range(4) for k in range(2)]
    features = {f"f{s}": rng.normal(size=(2, 3)).astype(np.float32) for s in range(4)}
    items = make_items(rows)
    # 4 speakers × 2 A phones, each with 3 candidate X speakers, or 2 when capped.
    assert abx(features, items, speaker="across", max_x_across=None).num_cells == 4 * 2 * 3
    assert abx(features, items, speaker="across", max_x_across=2).num_cells == 4 * 2 * 2


def test_librilight_bug_drops_the_last_frame() -> None:
    # Two-frame items whose first frames are all 0: only the last frame tells a from b. Sliced [start, end] they
    # are perfectly discriminated; sliced [start, end) like Libri-light, every comparison is a tie.
    values = {"f": [0.0, 1.0, 0.0, 1.0, 0.0, 5.0, 0.0, 5.0]}
    rows = [("f", 0, 1, "a", "s"), ("f", 2, 3, "a", "s"), ("f", 4, 5, "b", "s"), ("f", 6, 7, "b", "s")]
    features, items = scalar_task(values, rows)
    assert abx_error_rate(features, items, distance="euclidean") == 0.0
    assert abx_error_rate(features, items, distance="euclidean", librilight_bug=True) == 0.5


# ----------------------------------------------------------------------------------------------------------------
# Invariances and statistics
# ----------------------------------------------------------------------------------------------------------------


def random_task(seed: int, *, num_items: int = 60, speakers: int = 3, phones: str = "abc", dim: int = 4,
                discrete: bool = False) -> tuple[dict[str, np.ndarray], Items]:
    rng = np.random.default_rng(seed)
    features, rows = {}, []
    for s in range(speakers):
        name = f"spk{s}/utt"
        features[name] = (rng.integers(0, 3, 80) if discrete else rng.normal(size=(80, dim))).astype(np.float32)
        features[name][rng.random(80) < 0.05] = 0.0  # a few all-zero frames
    for _ in range(num_items):
        s, first = int(rng.integers(speakers)), int(rng.integers(0, 75))
        rows.append((f"spk{s}/utt", first, first + int(rng.integers(0, 4)), str(rng.choice(list(phones))), f"s{s}",
                     str(rng.choice(["p", "q"])), str(rng.choice(["n", "m"]))))  # context "within" needs both
    return features, make_items(rows)


def write_item_file(path: Path, items: Items) -> None:
    """``items`` as a ZeroSpeech .item file (space-separated, with the context and speaker columns)."""
    header = ["#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker"]
    lines = [" ".join(header)] + [" ".join([items.files[i], str(items.onsets[i]), str(items.offsets[i]),
                                           *(items.labels[c][i] for c in header[3:])]) for i in range(len(items))]
    path.write_text("\n".join(lines) + "\n")


def reference_abx(features: dict[str, np.ndarray], items: Items, *, speaker: str, context: str,
                  distance: str, mirror: bool = True) -> tuple[float, int]:
    """fastabx's definition written triplet by triplet (no subsampling): the error rate and the number of cells.
    ``mirror=False``: X always on the lattice rows, which is not fastabx's rule within speaker (a wrong reference,
    to show that the rule matters)."""
    by_pair, num_cells = reference_pair_errors(features, items, speaker=speaker, context=context, distance=distance,
                                               mirror=mirror)
    return float(np.mean(list(by_pair.values()))), num_cells


def reference_pair_errors(features: dict[str, np.ndarray], items: Items, *, speaker: str, context: str,
                          distance: str, mirror: bool = True) -> tuple[dict[tuple[str, str], float], int]:
    """``reference_abx``'s (A phone, B phone) → error rate, each pair's mean over contexts then speakers, and the
    number of cells."""
    cells = reference_cells(features, items, speaker=speaker, distance=distance, context=context, mirror=mirror)
    by_speaker = defaultdict(list)
    for pa, pb, sa, error in cells:
        by_speaker[pa, pb, sa if context == "within" else 0].append(error)
    by_pair = defaultdict(list)
    for (pa, pb, _), errors in by_speaker.items():
        by_pair[pa, pb].append(np.mean(errors))
    return {pair: float(np.mean(errors)) for pair, errors in by_pair.items()}, len(cells)


def reference_cells(features: dict[str, np.ndarray], items: Items, *, speaker: str, context: str,
                    distance: str, mirror: bool = True) -> list[tuple[str, str, str, float]]:
    """Every cell triplet by triplet: (A phone, B phone, speaker of A, error rate)."""
    starts, ends = frame_bounds(items, RATE)
    seqs = []
    for i in range(len(items)):
        array = np.asarray(features[items.files[i]], dtype=np.float32)
        seqs.append((array[:, None] if array.ndim == 1 else array)[starts[i] : ends[i]])

    def frames(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return np.where(norms == 0, 1 / np.sqrt(x.shape[1]), x / np.where(norms == 0, 1, norms))

    def d(i: int, j: int) -> float:
        x, y = seqs[i], seqs[j]
        if distance == "angular":
            lattice = np.arccos(np.clip(frames(x) @ frames(y).T, -1, 1)) / np.pi
        elif distance == "euclidean":
            lattice = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
        elif distance == "kl_symmetric":
            x64, y64 = x.astype(np.float64)[:, None], y.astype(np.float64)[None]
            lattice = 0.5 * ((x64 - y64) * (np.log(x64 + 1e-6) - np.log(y64 + 1e-6))).sum(-1)
        else:
            lattice = (x[:, None, 0] != y[None, :, 0]).astype(np.float32)
        return reference_dtw(lattice)

    phone, spk = items.column("#phone"), items.column("speaker")
    ctx = list(zip(items.column("prev-phone"), items.column("next-phone"), strict=True)) if context == "within" \
        else [0] * len(items)
    groups = defaultdict(list)
    for i in range(len(items)):
        groups[phone[i], ctx[i], spk[i]].append(i)
    cells = []
    for (pa, ca, sa), a_items in groups.items():
        for (pb, cb, sb), b_items in groups.items():
            if pb == pa or cb != ca or sb != sa:
                continue
            if speaker == "within":
                x_sets = [a_items] if len(a_items) >= 2 else []
            else:
                x_sets = [g for (px, cx, sx), g in groups.items() if px == pa and cx == ca and sx != sa]
            for x_items in x_sets:
                # Within speaker, X and A are one set; fastabx aligns a pair once, the earlier item on the rows.
                def d_xa(x: int, a: int) -> float:
                    return d(a, x) if mirror and speaker == "within" and a < x else d(x, a)

                score = [1.0 if d_xa(x, a) < d(x, b) else 0.5 if d_xa(x, a) == d(x, b) else 0.0
                         for x in x_items for a in a_items if a != x for b in b_items]
                cells.append((pa, pb, sa, 1 - np.mean(score)))
    return cells


@pytest.mark.parametrize(("speaker", "context"), [("within", "within"), ("within", "any"), ("across", "within"),
                                                  ("across", "any")])
def test_each_phone_pair_s_error_rate_is_the_reference_s_and_their_mean_the_error_rate(speaker, context):
    """Truth: the reference written triplet by triplet, per (A, B) pair: mean over contexts, then speakers. The pairs
    are ordered ((A, B) ≠ (B, A): A is the phone of A and X), named by the item file's phones."""
    for seed in range(2):
        features, items = random_task(seed, num_items=40, phones="abcd")
        result = abx(features, items, speaker=speaker, context=context, distance="euclidean", frequency=RATE,
                     max_size_group=None, max_x_across=None)
        expected, _ = reference_pair_errors(features, items, speaker=speaker, context=context, distance="euclidean")
        assert set(result.pair_error_rates) == set(expected)
        for pair, error in expected.items():
            assert result.pair_error_rates[pair] == pytest.approx(error, abs=1e-12), pair
        assert result.num_pairs == len(expected)
        assert any(a != b and (b, a) in expected and expected[a, b] != pytest.approx(expected[b, a])
                   for a, b in expected), "the task should tell (A, B) from (B, A)"
        assert result.error_rate == pytest.approx(np.mean(list(result.pair_error_rates.values())), abs=1e-15)


@pytest.mark.parametrize(("speaker", "context"), [("within", "within"), ("within", "any"), ("across", "within"),
                                                  ("across", "any")])
def test_each_speaker_s_error_rate_is_the_reference_s_on_that_speaker_s_cells(speaker, context):
    """Truth: the triplet-by-triplet cells of each speaker (of A) alone: per (A, B) pair, the mean of its cells
    (contexts and X speakers alike), then the mean over the speaker's pairs. Cut down to one speaker's items (within
    speaker, where cells never mix speakers), ABX's error rate is that speaker's."""
    for seed in range(2):
        features, items = random_task(seed, num_items=40, phones="abcd")
        result = abx(features, items, speaker=speaker, context=context, distance="euclidean", frequency=RATE,
                     max_size_group=None, max_x_across=None)
        by_pair = defaultdict(list)
        for pa, pb, sa, error in reference_cells(features, items, speaker=speaker, context=context,
                                                 distance="euclidean"):
            by_pair[sa, pa, pb].append(error)
        by_speaker = defaultdict(list)
        for (sa, _, _), errors in by_pair.items():
            by_speaker[sa].append(np.mean(errors))
        expected = {sa: float(np.mean(errors)) for sa, errors in by_speaker.items()}
        assert len(expected) >= 2
        assert result.speaker_error_rates == pytest.approx(expected, abs=1e-12)
        if speaker == "within":
            speakers = items.column("speaker")
            for name, error in expected.items():
                rows = [i for i in range(len(items)) if speakers[i] == name]
                alone = Items.from_columns({"#file": [items.files[i] for i in rows],
                                            "onset": [items.onsets[i] for i in rows],
                                            "offset": [items.offsets[i] for i in rows],
                                            **{c: [items.labels[c][i] for i in rows] for c in items.labels}})
                assert abx(features, alone, speaker="within", context=context, distance="euclidean", frequency=RATE,
                           max_size_group=None).error_rate == pytest.approx(error, abs=1e-12), name


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("speaker", "context"), [("within", "within"), ("within", "any"), ("across", "within"),
                                                  ("across", "any")])
@pytest.mark.parametrize("distance", ["angular", "euclidean", "identical"])
def test_matches_brute_force_reference(seed: int, speaker: str, context: str, distance: str) -> None:
    features, items = random_task(seed, discrete=distance == "identical")
    result = abx(features, items, speaker=speaker, context=context, distance=distance, max_size_group=None,
                 max_x_across=None)
    expected, num_cells = reference_abx(features, items, speaker=speaker, context=context, distance=distance)
    assert result.num_cells == num_cells
    assert result.error_rate == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("speaker", "context"), [("within", "within"), ("across", "any")])
def test_kl_symmetric_matches_brute_force_on_rows_that_are_not_distributions(speaker: str, context: str) -> None:
    """Non-negative frames of any sum (pooled posteriors), a few all-zero: the formula element by element."""
    features, items = random_task(2)
    features = {name: np.abs(array) * np.random.default_rng(3).uniform(0.1, 5.0, (len(array), 1)).astype(np.float32)
                for name, array in features.items()}
    result = abx(features, items, speaker=speaker, context=context, distance="kl_symmetric", max_size_group=None,
                 max_x_across=None)
    expected, num_cells = reference_abx(features, items, speaker=speaker, context=context, distance="kl_symmetric")
    assert result.num_cells == num_cells
    assert result.error_rate == pytest.approx(expected, abs=1e-12)



def _short_items_on_units(seed: int, count: int) -> tuple[dict[str, np.ndarray], Items]:
    """One file of 400 random units (0-2) and ``count`` items of 1-5 frames at random places, phones a/b in turn,
    one speaker: DTW ties abound."""
    rng = np.random.default_rng(seed)
    features = {"u": rng.integers(0, 3, 400).astype(np.float32)}
    rows = []
    for k in range(count):
        first = int(rng.integers(0, 390))
        rows.append(("u", first, first + int(rng.integers(1, 6)), "ab"[k % 2], "s"))
    return features, make_items(rows)

@pytest.mark.parametrize("flush_elements", [abx_scoring.FLUSH_ELEMENTS, 300])
def test_within_speaker_pairs_are_aligned_once_with_the_earlier_item_on_the_rows(monkeypatch, flush_elements):
    """Discrete units tie often, and the greedy backtrack of a transposed lattice may break a tie the other way:
    DTW([2,0,1,1,0,2], [0,0,0,2,0]) is 4/7, and 2/3 transposed. fastabx computes each within-speaker A-A pair
    once, the earlier item on the rows; so must we, also when a group's rows are cut into several chunks."""
    lattice = torch.tensor([[float(a != b) for b in (0, 0, 0, 2, 0)] for a in (2, 0, 1, 1, 0, 2)])
    assert dtw(lattice) == pytest.approx(4 / 7)
    assert dtw(lattice.T) == pytest.approx(2 / 3)
    monkeypatch.setattr(abx_scoring, "FLUSH_ELEMENTS", flush_elements)
    order_matters = 0
    for seed in range(6):
        features, items = _short_items_on_units(seed, 40)
        result = abx(features, items, context="any", distance="identical", max_size_group=None).error_rate
        expected, x_on_rows = _within_speaker_references(seed)
        assert result == pytest.approx(expected, abs=1e-12)
        order_matters += x_on_rows != pytest.approx(expected, abs=1e-12)
    assert order_matters >= 3, "the task should hold ties that the lattice orientation breaks differently"


@functools.cache
def _within_speaker_references(seed: int) -> tuple[float, float]:
    """The reference's error rates on ``_short_items_on_units(seed, 40)``: fastabx's (the earlier item on the
    rows), then with X always on the rows; computed once for every FLUSH_ELEMENTS (≈ 2.5 s a seed)."""
    features, items = _short_items_on_units(seed, 40)
    expected, _ = reference_abx(features, items, speaker="within", context="any", distance="identical")
    x_on_rows, _ = reference_abx(features, items, speaker="within", context="any", distance="identical",
                                 mirror=False)
    return expected, x_on_rows


@pytest.mark.parametrize("speaker", ["within", "across"])
def test_invariant_to_speaker_names_and_row_order(speaker: str) -> None:
    features, items = random_task(3, num_items=80)
    baseline = abx_error_rate(features, items, speaker=speaker, max_size_group=None, max_x_across=None)
    names = {"s0": "zz", "s1": "aa", "s2": "mm"}
    renamed = {**items.labels, "speaker": tuple(names[s] for s in items.labels["speaker"])}
    relabelled = Items(items.files, items.onsets, items.offsets, renamed)
    assert abx_error_rate(features, relabelled, speaker=speaker, max_size_group=None, max_x_across=None) == \
        pytest.approx(baseline, abs=1e-12)
    order = np.random.default_rng(0).permutation(len(items))
    shuffled = Items(
        tuple(items.files[i] for i in order), tuple(items.onsets[i] for i in order),
        tuple(items.offsets[i] for i in order), {k: tuple(v[i] for i in order) for k, v in items.labels.items()},
    )
    assert abx_error_rate(features, shuffled, speaker=speaker, max_size_group=None, max_x_across=None) == \
        pytest.approx(baseline, abs=1e-12)
    # With caps the kept items depend only on each group's size and order, not on speaker names.
    capped = abx_error_rate(features, items, speaker=speaker, max_size_group=3)
    assert abx_error_rate(features, relabelled, speaker=speaker, max_size_group=3) == pytest.approx(capped, abs=1e-12)


@pytest.mark.parametrize(("speaker", "context"), [("within", "within"), ("within", "any"), ("across", "within"),
                                                  ("across", "any")])
def test_perfect_features_give_zero_and_random_features_give_chance(speaker: str, context: str) -> None:
    features, items = random_task(4, num_items=240, speakers=4, dim=16)
    starts, ends = frame_bounds(items, RATE)
    # Perfect: every frame of an item is the one-hot vector of its phone (items never overlap in this layout).
    perfect, rows = {}, []
    for i, phone in enumerate(items.column("#phone")):
        vector = np.zeros((ends[i] - starts[i], 3), dtype=np.float32)
        vector[:, "abc".index(phone)] = 1.0
        perfect[f"item{i}"] = vector
        rows.append((f"item{i}", 0, ends[i] - starts[i] - 1, phone, items.column("speaker")[i],
                     items.column("prev-phone")[i], "n"))
    assert abx_error_rate(perfect, make_items(rows), speaker=speaker, context=context) == 0.0
    random_rate = abx_error_rate(features, items, speaker=speaker, context=context, max_size_group=None)
    assert abs(random_rate - 0.5) < 0.06


# ----------------------------------------------------------------------------------------------------------------
# Errors, feature directories and the command line
# ----------------------------------------------------------------------------------------------------------------


def test_input_errors() -> None:
    features, items = scalar_task({"f": [0.0, 1.0, 1.0]}, [("f", 0, 0, "a", "s"), ("f", 1, 1, "a", "s"),
                                                          ("f", 2, 3, "b", "s")])
    with pytest.raises(ValueError, match="have 3 frames but item 3"):
        abx(features, items, distance="euclidean")
    with pytest.raises(ValueError, match="no features"):
        abx({}, items)
    with pytest.raises(ValueError, match=r"features of 'f' contain non-finite values \(the first: nan at frame 1, "
                                         r"dimension 0\)"):
        abx({"f": np.array([[0.0], [np.nan], [1.0], [1.0]])}, items)
    with pytest.raises(ValueError, match="discrete units"):
        abx({"f": np.zeros((4, 2))}, items, distance="identical")
    with pytest.raises(ValueError, match="speaker"):
        abx(features, items, speaker="both")  # type: ignore[arg-type]


def write_feature_tree(root: Path, features: dict[str, np.ndarray]) -> None:
    for index, (name, array) in enumerate(features.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if index % 2:
            torch.save(torch.from_numpy(array), path.with_suffix(".pt"))
        else:
            np.save(path.with_suffix(".npy"), array)


def test_feature_directory(tmp_path: Path) -> None:
    write_feature_tree(tmp_path, {"spk0/a": np.zeros((3, 2), np.float32), "spk1/b": np.ones((4, 2), np.float32)})
    directory = FeatureDirectory(tmp_path)
    assert sorted(directory) == ["spk0/a", "spk1/b"]
    assert tuple(directory["spk1/b"].shape) == (4, 2)
    np.save(tmp_path / "spk0" / "b.npy", np.zeros(2))
    torch.save(torch.zeros(2), tmp_path / "spk0" / "b.pt")
    with pytest.raises(ValueError, match="both"):
        FeatureDirectory(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        FeatureDirectory(tmp_path / "spk0" / "missing")


def test_a_feature_directory_follows_linked_folders_once(tmp_path: Path) -> None:
    """Features gathered with links (a speaker's folder from another extraction): `kmeans` and `units` left the
    linked folder out without a word. A link back to a parent must not loop."""
    write_feature_tree(tmp_path / "elsewhere", {"spk9/z": np.ones((2, 2), np.float32)})
    write_feature_tree(tmp_path / "layer", {"spk0/a": np.zeros((3, 2), np.float32)})
    (tmp_path / "layer" / "spk9").symlink_to(tmp_path / "elsewhere" / "spk9")
    (tmp_path / "layer" / "spk0" / "up").symlink_to(tmp_path / "layer")  # a loop
    directory = FeatureDirectory(tmp_path / "layer")
    assert sorted(directory) == ["spk0/a", "spk9/z"]
    assert tuple(directory["spk9/z"].shape) == (2, 2)


def test_command_line_by_pair_gives_every_pair_worst_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--by-pair: the (A, B) pairs' error rates as abx() gives them (tested against the reference above), in percent,
    worst first; the JSON's by_pair and the table after the sentence hold the same rows."""
    features, items = random_task(5, num_items=50, phones="abcd")
    write_feature_tree(tmp_path / "features", features)
    item_file = tmp_path / "task.item"
    write_item_file(item_file, items)
    command = ["abx", str(tmp_path / "features"), str(item_file), "--frequency", "50", "--by-pair"]
    expected = abx(features, items, frequency=50).pair_error_rates
    assert cli.main([*command, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["by_pair"]
    assert {(row["a"], row["b"]): row["abx_error_rate"] for row in rows} == pytest.approx(
        {pair: 100 * error for pair, error in expected.items()})
    assert len(rows) == len(expected)
    errors = [row["abx_error_rate"] for row in rows]
    assert errors == sorted(errors, reverse=True)
    assert cli.main(command) == 0
    table = capsys.readouterr().out.split("A\tB\tABX error rate %\n")[1].splitlines()
    assert [line.split("\t") for line in table] == [[row["a"], row["b"], f"{row['abx_error_rate']:.3f}"]
                                                    for row in rows]
    assert cli.main([*command[:-1], "--json"]) == 0
    assert "by_pair" not in json.loads(capsys.readouterr().out)


def test_command_line_by_speaker_gives_every_speaker_worst_first(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--by-speaker: abx()'s speaker error rates (tested against the reference above) in percent, worst first, in the
    JSON's by_speaker and as a table after the sentence (after the pairs' table when both are asked for)."""
    features, items = random_task(5, num_items=50, phones="abcd")
    write_feature_tree(tmp_path / "features", features)
    item_file = tmp_path / "task.item"
    write_item_file(item_file, items)
    command = ["abx", str(tmp_path / "features"), str(item_file), "--frequency", "50", "--speaker", "across",
               "--by-speaker"]
    expected = abx(features, items, frequency=50, speaker="across").speaker_error_rates
    assert len(expected) >= 2
    assert cli.main([*command, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["by_speaker"]
    assert {row["speaker"]: row["abx_error_rate"] for row in rows} == pytest.approx(
        {name: 100 * error for name, error in expected.items()})
    assert len(rows) == len(expected)
    errors = [row["abx_error_rate"] for row in rows]
    assert errors == sorted(errors, reverse=True)
    assert cli.main([*command, "--by-pair"]) == 0
    out = capsys.readouterr().out
    assert out.index("A\tB\tABX error rate %") < out.index("speaker\tABX error rate %")
    table = out.split("speaker\tABX error rate %\n")[1].splitlines()
    assert [line.split("\t") for line in table] == [[row["speaker"], f"{row['abx_error_rate']:.3f}"] for row in rows]
    assert cli.main([*command[:-1], "--json"]) == 0
    assert "by_speaker" not in json.loads(capsys.readouterr().out)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    features, items = random_task(5, num_items=50)
    write_feature_tree(tmp_path / "features", features)
    item_file = tmp_path / "task.item"
    write_item_file(item_file, items)
    lines = item_file.read_text().splitlines()
    assert cli.main(["abx", str(tmp_path / "features"), str(item_file), "--json", "--max-size-group", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "no frame rate is recorded for" in caplog.text
    assert "assuming 50 Hz; give --frequency if it is another" in caplog.text
    assert report["abx_error_rate"] == pytest.approx(100 * abx_error_rate(features, items, max_size_group=4))
    assert report["distance"] == "angular"

    # Units JSONL rows are keyed by the stem of their audio path, as fastabx's from_item_and_units does.
    units = {name.replace("/", "-"): values for name, values in random_task(5, discrete=True)[0].items()}
    units_file = tmp_path / "units.jsonl"
    units_file.write_text("".join(json.dumps({"audio": f"/corpus/{name}.wav", "units": values.astype(int).tolist()})
                                  + "\n" for name, values in units.items()))
    unit_items = Items(tuple(f.replace("/", "-") for f in items.files), items.onsets, items.offsets, items.labels)
    item_file.write_text("\n".join(line.replace("/", "-") for line in lines) + "\n")
    assert cli.main(["abx", str(units_file), str(item_file), "--speaker", "across", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = abx_error_rate(units, unit_items, speaker="across", distance="identical")
    assert (report["distance"], report["abx_error_rate"]) == ("identical", pytest.approx(100 * expected))
    assert cli.main(["abx", str(units_file), str(item_file), "--distance", "angular"]) == 2
    assert "use --distance identical" in capsys.readouterr().err
    # units keyed by utterance id also answer item files whose #file is a path (spidr units names rows by stem)
    item_file.write_text("\n".join(lines[:1] + [f"corpus/{line.replace('/', '-')}" for line in lines[1:]]) + "\n")
    assert cli.main(["abx", str(units_file), str(item_file), "--speaker", "across", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["abx_error_rate"] == pytest.approx(100 * expected)
    # ids at or above 2^24 would merge in float32 (16777216 == 16777217): refused
    large = {name: values.astype(np.int64) + 2**24 for name, values in units.items()}
    with pytest.raises(ValueError, match=r"reach 167772\d\d: discrete ABX takes unit ids below 2\^24"):
        abx_error_rate(large, unit_items, distance="identical")


@pytest.mark.parametrize("speaker", ["within", "across"])
def test_a_store_spilled_to_a_scratch_file_gives_the_same_result(speaker: str, monkeypatch) -> None:
    """Above MAX_RESIDENT_BYTES the frames live in a memory-mapped scratch file, released between flushes."""
    features, items = random_task(3, num_items=80, dim=6)
    in_memory = abx(features, items, speaker=speaker, max_size_group=None)
    monkeypatch.setattr(abx_frames, "MAX_RESIDENT_BYTES", 256)  # every store spills
    monkeypatch.setattr(abx_scoring, "FLUSH_ELEMENTS", 2000)  # many flushes, each followed by a release
    releases = []
    real_release = abx_frames._ScratchFrames.release
    monkeypatch.setattr(abx_frames._ScratchFrames, "release", lambda self: (releases.append(1), real_release(self)))
    spilled = abx(features, items, speaker=speaker, max_size_group=None)
    assert spilled == in_memory
    assert len(releases) > 3


def test_a_full_scratch_folder_is_an_error_naming_it_before_any_frame_is_written(monkeypatch, tmp_path) -> None:
    """The scratch file's blocks are reserved when it is made: on a full TMPDIR a page of a sparse file mapped into
    memory fails when first written, with SIGBUS (the process dies, minutes into a long ABX, with no message)."""
    features, items = random_task(3, num_items=20, dim=6)
    in_memory = abx(features, items, max_size_group=None)
    monkeypatch.setattr(abx_frames, "MAX_RESIDENT_BYTES", 256)  # every store spills
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    reserved = []
    real_fallocate = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, size: (reserved.append((offset, size)),
                                                                        real_fallocate(fd, offset, size))[1])
    assert abx(features, items, max_size_group=None) == in_memory
    (offset, size), = reserved
    assert offset == 0  # the whole file at once
    assert size > 256

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"No space left on device: ABX needs a \d+\.\d MiB scratch file") as caught:
        abx(features, items, max_size_group=None)
    assert caught.value.filename == str(tmp_path)
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_feature_directory_keys_are_packed_and_found_by_bisection(tmp_path: Path) -> None:
    features = {f"spk{s}/sub/utt{u}": np.zeros((3, 2), dtype=np.float32) for s in range(3) for u in range(5)}
    write_feature_tree(tmp_path, features)
    directory = FeatureDirectory(tmp_path)
    assert list(directory) == sorted(features)
    assert all(key in directory for key in features)
    assert "spk0/sub/utt9" not in directory
    assert 3 not in directory
    assert directory.frame_count("spk2/sub/utt4") == 3
    with pytest.raises(KeyError):
        directory["nope"]


def test_features_a_distance_cannot_compare_are_refused_by_name() -> None:
    units = {"u": np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)}
    items = make_items([("u", 0, 1, "a", "s"), ("u", 2, 3, "b", "s"), ("u", 4, 5, "a", "s"), ("u", 6, 7, "b", "s")])
    # normalised, every unit id would be the same direction (+1): ABX at chance without a word
    with pytest.raises(ValueError, match="features of 'u' have one dimension: the 'angular' distance"):
        abx(units, items)
    assert abx(units, items, distance="identical").error_rate == pytest.approx(0.0)
    logits = {"u": np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)}
    with pytest.raises(ValueError, match=r"features of 'u' have negative values .*'kl_symmetric' distance compares "
                                         r"probability vectors"):
        abx(logits, items, distance="kl_symmetric")
    empty = Items((), (), (), dict.fromkeys(items.labels, ()), source="empty.item")
    with pytest.raises(ValueError, match=r"empty\.item holds no items to score"):
        abx(units, empty, distance="identical")


def test_max_size_group_draws_a_uniform_seeded_subset():
    """--max-size-group keeps a seeded random subset of a large group: the first N items every time would make
    --seed do nothing."""
    # A group of 5 'a' items capped at 2: over 200 seeds every item is kept in about 2/5 of them.
    rows = [("f", i, i, "a", "s") for i in range(5)] + [("f", 5, 5, "b", "s")]
    from spidr.eval.abx_cells import Groups, Labels

    kept = np.zeros(5)
    for seed in range(200):
        groups = Groups.build(Labels.from_items(make_items(rows), context="any"), max_size_group=2, seed=seed)
        kept[groups.members[0]] += 1
    assert np.all(np.abs(kept / 200 - 0.4) < 0.12)


def test_across_any_context_collapse_is_a_flat_mean_over_a_and_x_speakers():
    """mut A3 (across/any collapsed speaker by speaker). Truth (fastabx ``Score.collapse``: columns ending in ``_x``
    are dropped, then zerospeech_abx's levels = ["speaker"] for context 'any' average every row of an (A, B) pair
    at once): cell error rates (A speaker 0, X speaker 1) = 1.0, (0, 2) = 1.0, (1, 0) = 0.0 on one phone pair give
    an error rate of 2/3, not the speaker-by-speaker ½ (``Cells.score`` is a cell's error rate)."""
    from spidr.eval.abx import _collapse
    from spidr.eval.abx_scoring import Cells

    zeros = np.zeros(3, dtype=np.int64)
    cells = Cells(a_phone=zeros, b_phone=zeros + 1, context=zeros, speaker=np.array([0, 0, 1]),
                  x_speaker=np.array([1, 2, 0]), score=np.array([1.0, 1.0, 0.0]), size=np.ones(3, dtype=np.int64))
    (a_phone, b_phone), pair_errors = _collapse(cells, context="any")
    assert (a_phone.tolist(), b_phone.tolist()) == ([0], [1])
    assert pair_errors.tolist() == pytest.approx([2 / 3])


# (tests below: wiring that a mutation round, 54 mutants over evaluate, probe, reports and plots, found untested)

def _abx_task(tmp_path):
    """A feature folder and item file: 5 speakers, 2 phones, 2 contexts, items of 3 to 6 frames, groups larger than
    --max-size-group 2 and A speakers with more than 2 X speakers."""
    rng = np.random.default_rng(0)
    features = {f"spk{s}/utt": rng.normal(size=(200, 4)).astype(np.float32) for s in range(5)}
    rows = []
    for _ in range(250):
        s, first = int(rng.integers(5)), int(rng.integers(0, 190))
        rows.append((f"spk{s}/utt", first, first + int(rng.integers(2, 6)), str(rng.choice(["a", "b"])), f"s{s}",
                     str(rng.choice(["p", "q"])), str(rng.choice(["n", "m"]))))
    items = make_items(rows)
    write_feature_tree(tmp_path / "features", features)
    write_item_file((tmp_path / "task.item"), items)
    return features, items


@pytest.mark.parametrize("options", [
    {"speaker": "across", "context": "any", "max_size_group": 2, "max_x_across": 2, "seed": 7},
    {"speaker": "within", "context": "within", "max_size_group": 2, "seed": 3, "librilight_bug": True},
])
def test_abx_command_passes_every_option_on(tmp_path, capsys, options):
    """mut C01 (--max-x-across dropped), C02 (--seed dropped), C03 (--librilight-bug dropped), C04 (--context
    dropped). Truth: the command's score equals abx_error_rate called with the same options (and each option
    changes that score here, so a dropped one shows)."""
    from spidr.eval.abx import abx_error_rate

    features, items = _abx_task(tmp_path)
    argv = ["abx", str(tmp_path / "features"), str(tmp_path / "task.item"), "--json", "--frequency", "50"]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = abx_error_rate(features, items, **options)
    assert printed["abx_error_rate"] == pytest.approx(100 * expected)
    defaults = {"speaker": options["speaker"], "context": "within", "max_size_group": 10, "max_x_across": 5, "seed": 0,
                "librilight_bug": False}
    for key, value in options.items():  # each option given changes the score: the comparison above can tell
        if value != defaults[key]:
            assert abx_error_rate(features, items, **{**options, key: defaults[key]}) != expected, key


def test_units_quality_reads_interval_alignments_at_the_rate_given(tmp_path, capsys):
    """mut C05 (--alignment-rate not passed to unit_quality: 50 Hz labels were compared as 100 Hz ones and refused
    on their length). Truth: at 50 Hz, units [0, 1, 1] and labels [A, B, B] give PNMI 1 and purity 1."""
    (tmp_path / "units.jsonl").write_text(json.dumps({"name": "u", "units": [0, 1, 1]}) + "\n")
    (tmp_path / "ali.tsv").write_text("u\t0\t0.02\tA\nu\t0.02\t0.06\tB\n")
    assert cli.main(["units-quality", str(tmp_path / "units.jsonl"), str(tmp_path / "ali.tsv"),
                     "--alignment-rate", "50", "--unit-rate", "50", "--num-units", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["phone_purity"] == pytest.approx(1.0)
    assert report["pnmi"] == pytest.approx(1.0, abs=1e-6)


def test_the_api_defaults_are_zerospeech_s_caps():
    """mut A10 (abx()'s max_x_across default 10 instead of 5; no test had more than 5 candidate X speakers with the
    default). Truth: the documented ZeroSpeech / libri-light-abx2 defaults, max_size_group 10 and max_x_across 5,
    also the CLI's: on 8 speakers (7 candidate X speakers per A group) the default call is the explicit (10, 5) call
    and keeps 5 X speakers per A group."""
    features, items = random_task(1, num_items=160, speakers=8)
    default = abx(features, items, speaker="across", context="any")
    assert default == abx(features, items, speaker="across", context="any", max_size_group=10, max_x_across=5)
    uncapped = abx(features, items, speaker="across", context="any", max_size_group=10, max_x_across=None)
    assert default.num_cells < uncapped.num_cells


def _rescaled(items: Items, factor: int) -> Items:
    """The same items with every time divided by ``factor`` (exact in Decimal)."""
    return Items(items.files, tuple(t / factor for t in items.onsets), tuple(t / factor for t in items.offsets),
                 items.labels)


@pytest.mark.parametrize("speaker", ["within", "across"])
def test_the_frequency_given_reaches_the_frame_bounds(speaker):
    """mut A01 (abx() sliced the items at 50 Hz whatever ``frequency`` said: every test ran at 50 Hz).
    Truth: times halved and the rate doubled select the same frames (ceil(t·f − ½) is unchanged), so the score is
    identical; at 50 Hz the halved times would select other frames."""
    features, items = random_task(0)
    half = _rescaled(items, 2)
    for got, expected in zip(frame_bounds(half, 100), frame_bounds(items, 50), strict=True):
        np.testing.assert_array_equal(got, expected)
    at_50 = abx(features, items, speaker=speaker, max_size_group=None, max_x_across=None)
    at_100 = abx(features, half, speaker=speaker, frequency=100, max_size_group=None, max_x_across=None)
    assert at_100 == at_50
    assert abx(features, _rescaled(items, 4), speaker=speaker, frequency="200", max_size_group=None,
               max_x_across=None) == at_50  # a rate given as a string too


def test_the_seed_chooses_the_x_speakers_across():
    """mut A04 (``seed`` not passed to across_units: the X speakers kept by --max-x-across were always seed 0's).
    The existing option test also caps --max-size-group, whose seed alone already changes the score.
    Truth: without a group cap, 5 speakers give every A group 4 candidate X speakers of which 2 are kept: over 8
    seeds the kept speakers, hence the score, change (the number of cells does not)."""
    features, items = random_task(2, num_items=150, speakers=5)
    results = [abx(features, items, speaker="across", context="any", max_size_group=None, max_x_across=2, seed=seed)
               for seed in range(8)]
    assert len({r.num_cells for r in results}) == 1
    assert len({round(r.error_rate, 12) for r in results}) > 1


def test_a_capped_group_keeps_its_items_in_item_order_and_scores_as_those_items_alone():
    """mut C07 (the kept items of a capped group in permutation order, not sorted). ``Groups.members`` is documented
    "in item order", and within speaker the earlier item of an A–A pair is on the lattice rows (fastabx's symmetric
    DTW): with discrete units the order breaks DTW ties. Truth: scoring with ``max_size_group`` equals the
    brute-force reference run on the kept items alone (their relative order unchanged)."""
    differ = 0
    for seed in range(6):
        features, items = _short_items_on_units(seed, 64)
        groups = Groups.build(Labels.from_items(items, context="any"), max_size_group=20, seed=seed)
        for members in groups.members:
            assert members.size == 20
            assert np.all(np.diff(members) > 0)
        kept = np.sort(np.concatenate(groups.members))
        subset = Items(tuple(items.files[i] for i in kept), tuple(items.onsets[i] for i in kept),
                       tuple(items.offsets[i] for i in kept), {k: tuple(v[i] for i in kept) for k, v in
                                                               items.labels.items()})
        got = abx(features, items, context="any", distance="identical", max_size_group=20, seed=seed).error_rate
        expected, _ = reference_abx(features, subset, speaker="within", context="any", distance="identical")
        assert got == pytest.approx(expected, abs=1e-12)
        differ += expected != pytest.approx(
            abx(features, items, context="any", distance="identical", max_size_group=None).error_rate, abs=1e-12)
    assert differ  # (the cap does change the score here)


def test_tiny_frames_keep_their_direction_under_the_angular_distance():
    """mut F06 (frames of small norm taken for all-zero ones). The angular distance compares directions: only an
    all-zero frame has none (fastabx's singularity rule). Truth by hand: (1e-4, 0) and (0, 2e-4) are orthogonal,
    distance ½; (1e-4, 0) and (3, 0) share a direction, distance 0."""
    import torch

    from spidr.eval.abx import frame_distances, prepare_frames

    frames = prepare_frames(torch.tensor([[1e-4, 0.0], [0.0, 2e-4], [3.0, 0.0]]), "angular")
    got = frame_distances(frames, frames, "angular")
    assert got[0, 1].item() == pytest.approx(0.5, abs=1e-6)
    assert got[0, 2].item() == pytest.approx(0.0, abs=1e-3)  # float32 arccos near 1
    assert got[1, 2].item() == pytest.approx(0.5, abs=1e-6)


def test_abx_of_in_memory_features_keyed_by_path_finds_the_items_by_utterance_id() -> None:
    """abx() matched exact keys only, while its own error message (and unit_quality, and the CLI) found
    ``{"spk/f": features}`` from an item file naming ``f``. Hand case: two phones a/b in alternating 2-frame
    segments, one-hot features: every triplet is decided right (0 %); the shuffled features of another key 'g'
    would not be taken for 'f' (api30 defect 5)."""
    rows = [("f", i, i + 1, "ab"[i // 2 % 2], "s") for i in range(0, 16, 2)]
    one_hot = np.zeros((16, 4), dtype=np.float32)
    for i in range(0, 16, 2):
        one_hot[i : i + 2, i // 2 % 2] = 1.0
    assert abx_error_rate({"f": one_hot}, make_items(rows)) == 0.0
    assert abx_error_rate({"spk/f": one_hot}, make_items(rows)) == 0.0
    assert abx_error_rate({"spk/f": one_hot, "other/g": one_hot[::-1].copy()}, make_items(rows)) == 0.0
    with pytest.raises(ValueError, match="have no features"):
        abx_error_rate({"spk/g": one_hot}, make_items(rows))


def _items(rows: list[tuple]) -> Items:
    """Rows (file, first frame, last frame, phone, speaker) → Items, times the centres of 50 Hz frames."""
    columns: dict[str, list[str]] = defaultdict(list)
    for file, first, last, phone, speaker in rows:
        for name, value in zip(("#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker"),
                               (file, f"{(2 * first + 1) / 100:.2f}", f"{(2 * last + 1) / 100:.2f}", phone, "x", "y",
                                speaker), strict=True):
            columns[name].append(value)
    return Items.from_columns(columns)


def test_features_of_two_widths_are_refused_naming_the_file() -> None:
    """mut D08 (the width check dropped: a one-dimensional file after a two-dimensional one was broadcast into both
    columns of the frame store, and ABX scored features that no file holds, without a word)."""
    items = _items([("f", 0, 0, "a", "s"), ("f", 1, 1, "a", "s"), ("g", 0, 0, "b", "s"), ("g", 1, 1, "b", "s")])
    features = {"f": np.array([[1.0, 0.0], [1.0, 0.1]], dtype=np.float32),
                "g": np.array([[0.0], [1.0]], dtype=np.float32)}
    with pytest.raises(ValueError, match=r"features of 'g' have dimension 1, others 2"):
        abx(features, items, distance="euclidean")


def test_one_dimensional_features_are_refused_by_the_cosine_distance_too() -> None:
    """mut D04 (the one-dimension refusal kept for 'angular' only: 'cosine', the same normalised comparison, put
    every unit id on one direction and gave ABX at chance without a word)."""
    units = {"u": np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)}
    items = _items([("u", 0, 1, "a", "s"), ("u", 2, 3, "b", "s"), ("u", 4, 5, "a", "s"), ("u", 6, 7, "b", "s")])
    with pytest.raises(ValueError, match="features of 'u' have one dimension: the 'cosine' distance"):
        abx(units, items, distance="cosine")


def test_finite_features_whose_sum_overflows_are_scored() -> None:
    """mut D03 (the element-wise check skipped when the cheap sum is not finite: features that are all finite but
    whose float32 sum overflows, 4 × 2e38 here, crashed with an IndexError looking for a non-finite value). Hand
    count (euclidean: the first column's differences are exact zeros): d(A, X) = 0 < d(B, X) = 1 for every
    (A, B, X): error rate 0."""
    features = {"f": np.array([[2e38, 0.0], [2e38, 0.0], [2e38, 1.0], [2e38, 1.0]], dtype=np.float32)}
    items = _items([("f", 0, 0, "a", "s"), ("f", 1, 1, "a", "s"), ("f", 2, 2, "b", "s"), ("f", 3, 3, "b", "s")])
    assert abx(features, items, distance="euclidean", context="any").error_rate == pytest.approx(0.0)


PHONES = ("AA", "IY", "UW", "EH")


def _corpus(rate: int, *, seconds: float = 4.0, dim: int = 16, seed: int = 0):
    """Two speakers, two utterances each, one 0.2 s item per phone every 0.25 s up to 0.25 s before the end;
    features at ``rate`` Hz that encode the phone (plus noise), so ABX is well below chance when read right."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((len(PHONES), dim))
    features, columns = {}, {c: [] for c in ("#file", "onset", "offset", "#phone", "prev-phone", "next-phone",
                                             "speaker")}
    for speaker in ("s1", "s2"):
        for u in range(2):
            name = f"{speaker}-{u}"
            frames = int(seconds * rate)
            feats = 0.3 * rng.standard_normal((frames, dim))
            k = 0
            while (k + 1) * 0.25 + 0.25 <= seconds:
                onset, phone = k * 0.25, PHONES[(k + u) % len(PHONES)]
                first, last = int(onset * rate), int((onset + 0.2) * rate)
                feats[first:last] += protos[PHONES.index(phone)]
                for column, value in zip(columns, (name, f"{onset:.2f}", f"{onset + 0.2:.2f}", phone, "x", "y",
                                                   speaker), strict=True):
                    columns[column].append(value)
                k += 1
            features[name] = feats.astype(np.float32)
    return features, Items.from_columns(columns)


def test_abx_without_a_frequency_reads_50_hz_and_says_so(caplog):
    """abx() read features at 50 Hz in silence when frequency was left out (the CLI reads the recorded rate, or warns):
    100 Hz features then gave another error rate with no word. The default is still 50 Hz, now with a warning."""
    features, items = _corpus(100)
    right = abx(features, items, speaker="across", context="any", frequency=100).error_rate
    with caplog.at_level(logging.WARNING, logger="spidr.eval.abx"):
        assumed = abx(features, items, speaker="across", context="any").error_rate
    assert assumed != right
    assert assumed == abx(features, items, speaker="across", context="any", frequency=50).error_rate
    assert [r.getMessage() for r in caplog.records] == [
        "abx: no frequency given: the features are read at 50 Hz (a 100 Hz front end, e.g. configs/tiny.toml's, "
        "needs frequency=100)"]


def test_abx_features_given_as_d_by_t_are_named_as_such():
    """HuBERT-like features with D > T handed over as (D, T): every item fits in D "frames", so the only error was
    that the files' "dimensions" (their lengths) differ, with no word of the layout."""
    features, items = _corpus(50, dim=600)
    features["s1-1"] = features["s1-1"][:190]  # lengths differ (items end by 3.75 s = frame 187)
    with pytest.raises(ValueError, match=r"\(given as \(D, T\)\? each array must be \(T, D\), frames first\)"):
        abx({name: value.T for name, value in features.items()}, items, speaker="across", context="any",
            frequency=50)


def test_abx_overrun_hint_is_judged_on_the_furthest_item_not_the_first():
    """(D, T) features with small D: the first item past the end overruns by 1-2 frames, so the message blamed the
    convolutions ("pad the audio"), though later items overrun by 150 frames; the furthest one names the rate and
    the layout."""
    features, items = _corpus(50, dim=9)
    with pytest.raises(ValueError, match="have 9 frames but") as raised:
        abx({name: value.T for name, value in features.items()}, items, speaker="across", context="any",
            frequency=50)
    assert "convolutions" not in str(raised.value)
    assert "that they are (T, D) and not (D, T)" in str(raised.value)
    assert "[3.50, 3.70] s) needs frames [175, 185)" in str(raised.value)


def test_abx_units_of_strings_are_refused_naming_the_utterance():
    """Units read from a text file and split (strings): torch's own TypeError came out, naming no utterance."""
    features, items = _corpus(50)
    units = {name: np.argmax(value[:, :4], axis=1).astype(str) for name, value in features.items()}
    with pytest.raises(ValueError, match=r"^features of 's1-0' are of dtype <U\d+: expected numbers"):
        abx(units, items, speaker="across", context="any", distance="identical", frequency=50)


def test_items_of_the_files_that_have_features():
    """Features of some utterances only: abx refuses the items of the others (naming how to keep the rest), and
    items.of_files(features) keeps exactly the items of the files given, in order, with their lines."""
    features, items = _corpus(50)
    some = {name: value for name, value in features.items() if name != "s2-1"}
    with pytest.raises(ValueError, match=r"give abx\(\) items.of_files\(features\)"):
        abx(some, items, speaker="across", context="any", frequency=50)
    kept = items.of_files(some)
    assert kept.files == tuple(name for name in items.files if name != "s2-1")
    assert kept.onsets == tuple(o for name, o in zip(items.files, items.onsets, strict=True) if name != "s2-1")
    assert kept.labels["#phone"] == tuple(p for name, p in zip(items.files, items.labels["#phone"], strict=True)
                                          if name != "s2-1")
    assert items.of_files(features) is items
    assert abx(some, kept, speaker="across", context="any", frequency=50).error_rate < 0.25


def items_of(rows: list[tuple]) -> Items:
    """(file, first frame, last frame, phone, speaker, prev, next) → Items at 50 Hz (times at the frame centres)."""
    names = ("#file", "onset", "offset", "#phone", "speaker", "prev-phone", "next-phone")
    columns: dict[str, list[str]] = {name: [] for name in names}
    for file, first, last, phone, speaker, prev, nxt in rows:
        for name, value in zip(names, (file, f"{(2 * first + 1) / 100:.2f}", f"{(2 * last + 1) / 100:.2f}", phone,
                                       speaker, prev, nxt), strict=True):
            columns[name].append(value)
    return Items.from_columns(columns)


def abx_or_none(features: dict, items: Items, options: dict) -> AbxResult | None:
    """``abx(...)``, or None for a task that holds no ABX cell."""
    try:
        return abx(features, items, **options)
    except ValueError as error:
        if "no ABX cell" not in str(error):
            raise
        return None


# The error rate does not change when phones, contexts and files are renamed (by any bijection), the features scaled
# by a power of two (angular distance; exact in floating point: another factor rounds the normalised frames
# differently, which breaks the exact ties of an item aligned with its own frames in the other orientation, as in
# test_within_speaker_pairs_are_aligned_once_with_the_earlier_item_on_the_rows), or features of files without items
# added, with or without the subsampling caps.
@settings(max_examples=50, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), num_items=st.integers(4, 40), speakers=st.integers(1, 4),
       phones=st.integers(2, 4), dim=st.integers(2, 4), speaker=st.sampled_from(["within", "across"]),
       context=st.sampled_from(["within", "any"]), caps=st.sampled_from([(None, None), (2, 2), (3, 5), (10, 5)]),
       rename_seed=st.integers(0, 1000), scale=st.sampled_from([2.0**k for k in range(-10, 11)]))
def test_abx_does_not_depend_on_names_or_the_features_scale(  # noqa: PLR0917
        seed, num_items, speakers, phones, dim, speaker, context, caps, rename_seed, scale) -> None:
    rng = np.random.default_rng(seed)
    features = {f"f{s}": rng.normal(size=(60, dim)).astype(np.float32) for s in range(speakers)}
    rows = []
    for _ in range(num_items):
        s, first = int(rng.integers(speakers)), int(rng.integers(0, 55))
        rows.append((f"f{s}", first, first + int(rng.integers(0, 4)), "abcd"[int(rng.integers(phones))], f"s{s}",
                     "pq"[int(rng.integers(2))], "nm"[int(rng.integers(2))]))
    options = {"speaker": speaker, "context": context, "max_size_group": caps[0], "max_x_across": caps[1],
               "frequency": 50}
    base = abx_or_none(features, items_of(rows), options)
    rename = np.random.default_rng(rename_seed)
    phone = dict(zip("abcd", rename.permutation(["zz", "a", "Q", "ph4"]).tolist(), strict=True))
    contexts = dict(zip("pqnm", ["n", "m", "p", "q"] if rename.random() < 0.5 else ["q", "p", "m", "n"], strict=True))
    file = {f"f{s}": f"file_{rename.integers(10**6)}_{s}" for s in range(speakers)}
    renamed = [(file[f], first, last, phone[p], s, contexts[prev], contexts[nxt])
               for f, first, last, p, s, prev, nxt in rows]
    scaled = {file[name]: values * np.float32(scale) for name, values in features.items()}
    other = abx_or_none(scaled | {"unused": np.zeros((3, dim), np.float32)}, items_of(renamed), options)
    if base is None:
        assert other is None
        return
    assert other is not None
    assert other.num_cells == base.num_cells
    assert other.num_triplets == base.num_triplets
    assert other.error_rate == pytest.approx(base.error_rate, abs=1e-9)


def test_the_abx_log_line_names_the_speaker_condition(caplog):
    """Was a defect (det34): abx() reused the name ``speaker`` for the codes of _by_speaker: the INFO line read
    'ABX [0 1] speaker, ...'."""
    rng = np.random.default_rng(0)
    features = {f"f{s}": rng.normal(size=(40, 3)).astype(np.float32) for s in range(2)}
    items = make_items([(f"f{s}", 4 * k, 4 * k + 2, "ab"[k % 2], f"s{s}") for s in range(2) for k in range(8)])
    with caplog.at_level(logging.INFO, logger="spidr.eval.abx"):
        abx(features, items, speaker="across", context="any", frequency=50)
    assert "ABX across speaker, any context, angular" in caplog.text


def test_command_line_by_pair_header_counts_the_pairs_it_lists(tmp_path, capsys):
    """mut34 A09 (the header gave the number of cells as the number of pairs). Truth: the table lists every (A, B)
    pair once, and its header says how many: 3 phones, 6 ordered pairs, of many more cells (two speakers)."""
    rng = np.random.default_rng(1)
    (tmp_path / "f").mkdir()
    lines = ["#file onset offset #phone prev-phone next-phone speaker"]
    for speaker in ("s1", "s2"):
        np.save(tmp_path / "f" / f"{speaker}_u.npy", rng.normal(size=(200, 3)).astype(np.float32))
        for index in range(18):
            phone = "abc"[index % 3]
            lines.append(f"{speaker}_u {0.2 * index:.2f} {0.2 * index + 0.1:.2f} {phone} x y {speaker}")
    (tmp_path / "t.item").write_text("\n".join(lines) + "\n")
    result = abx({"s1_u": np.load(tmp_path / "f" / "s1_u.npy"), "s2_u": np.load(tmp_path / "f" / "s2_u.npy")},
                 tmp_path / "t.item", frequency=50)
    assert result.num_cells != result.num_pairs == 6
    assert cli_main(["abx", str(tmp_path / "f"), str(tmp_path / "t.item"), "--frequency", "50", "--by-pair"]) == 0
    head, table = capsys.readouterr().out.split("A\tB\tABX error rate %\n")
    assert head.rstrip().endswith("6 (A, B) phone pairs (A: the phone of A and X), worst first:")
    assert len(table.splitlines()) == 6


def _axis_task(tmp_path: Path) -> tuple[dict[str, np.ndarray], Path]:
    """6 files of 50 frames at 50 Hz, 9 items each of phones a/b/c whose frames point along their own axis."""
    rng = np.random.default_rng(0)
    lines = ["#file onset offset #phone prev-phone next-phone speaker"]
    features = {}
    for u in range(6):
        values = 0.1 * rng.normal(size=(50, 8))
        for k in range(9):
            phone = (u + k) % 3
            values[5 * k + 1 : 5 * k + 5, phone] += 1.0
            lines.append(f"f{u} {0.1 * k + 0.02:.2f} {0.1 * k + 0.10:.2f} {'abc'[phone]} x y s{u % 2}")
        features[f"f{u}"] = values.astype(np.float32)
    (tmp_path / "t.item").write_text("\n".join(lines) + "\n")
    return features, tmp_path / "t.item"


@pytest.mark.parametrize("distance", ["angular", "euclidean"])
def test_abx_does_not_depend_on_the_scale_of_the_features(tmp_path, distance):
    """Was a defect (nonfinite34). Features × 2^66 (finite in float32; a power of two, so exact) are the same features
    to both distances. Their squares overflow float32: angular normalised every frame to 0, every distance ½ (ABX
    50.000 % exactly instead of ~0 %); euclidean distances became inf and DTW costs tied (43.75 % on the command-line
    experiment). No error."""
    from spidr.eval.abx import abx

    features, items = _axis_task(tmp_path)
    clean = abx(features, items, frequency=50, distance=distance).error_rate
    scaled = abx({k: v * np.float32(2.0**66) for k, v in features.items()}, items, frequency=50,
                 distance=distance).error_rate
    assert clean < 0.1
    assert scaled == pytest.approx(clean, abs=1e-6)


def test_command_line_by_speaker_header_counts_the_speakers_it_lists(tmp_path, capsys) -> None:
    """The --by-speaker table's header gives the number of speakers listed (not of pairs), as --by-pair's gives
    the number of pairs; a speaker with cells is listed once, under its own name."""
    features, items = random_task(5, num_items=50, phones="abcd")
    write_feature_tree(tmp_path / "features", features)
    write_item_file(tmp_path / "task.item", items)
    expected = abx(features, items, frequency=50, speaker="within").speaker_error_rates
    assert cli.main(["abx", str(tmp_path / "features"), str(tmp_path / "task.item"), "--frequency", "50",
                     "--speaker", "within", "--by-speaker"]) == 0
    out = capsys.readouterr().out
    header, table = out.split("speaker\tABX error rate %\n")
    assert header.rstrip("\n").endswith(f"{len(expected)} speakers (of A and B), worst first:")
    assert sorted(line.split("\t")[0] for line in table.splitlines()) == sorted(expected)


@pytest.mark.parametrize("huge_in", ["x", "y"])
def test_euclidean_frame_distances_whose_squares_overflow_float32_are_the_true_distances(huge_in) -> None:
    """Frames near 1e20 (finite in float32, their squares not): the euclidean distances are the true ones (3-4-5
    triangles, by hand), whichever of x and y holds the large values, not inf nor the distances of scaled frames."""
    small = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    large = torch.tensor([[3e20, 0.0], [0.0, 4e20]])
    x, y = (large, small) if huge_in == "x" else (small, large)
    got = frame_distances(x, y, "euclidean")
    want = torch.tensor([[3e20, 3e20], [4e20, 4e20]])
    torch.testing.assert_close(got, want if huge_in == "x" else want.T, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(frame_distances(large, large, "euclidean"),
                               torch.tensor([[0.0, 5e20], [5e20, 0.0]]), rtol=1e-6, atol=1e14)


@pytest.mark.parametrize("unsupported", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_scratch_folder_without_fallocate_still_gives_the_abx_of_the_frames_in_memory(monkeypatch, tmp_path,
                                                                                        unsupported) -> None:
    """A file system that cannot reserve blocks (posix_fallocate: EOPNOTSUPP, or EINVAL on some) is no error: the
    scratch file is made sparse as before, and ABX is the one of the frames held in memory."""
    features, items = random_task(3, num_items=20, dim=6)
    in_memory = abx(features, items, max_size_group=None)
    monkeypatch.setattr(abx_frames, "MAX_RESIDENT_BYTES", 256)  # every store spills
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def cannot(fd, offset, size):
        raise OSError(unsupported, os.strerror(unsupported))

    monkeypatch.setattr(os, "posix_fallocate", cannot)
    assert abx(features, items, max_size_group=None) == in_memory
