"""ABX phone discriminability with fastabx's semantics (ZeroSpeech 2021 / Libri-light compatible).

An ABX *triplet* (a, b, x) has a and x of the same phone and b of another; it is right when x is closer to a than to
b: ``1[d(a, x) < d(b, x)] + ½·1[d(a, x) = d(b, x)]``. Items are grouped into *cells* of triplets that share their
labels, scored as the mean over their triplets, and the error rate is ``1 − score`` averaged level by level.

Cells (fastabx ``Task`` with ON ``#phone``; "A", "B", "X" are the sets of items each role draws from):

| speaker | context | BY (a = b = x)              | ACROSS (a = b ≠ x) |
|---------|---------|-----------------------------|--------------------|
| within  | within  | prev-phone, next-phone, speaker | —              |
| within  | any     | speaker                     | —                  |
| across  | within  | prev-phone, next-phone      | speaker            |
| across  | any     | —                           | speaker            |

* Within speaker, X is A itself and an item is never its own X (the A–X diagonal is +inf), so a cell has
  ``|A|·(|A| − 1)·|B|`` triplets and needs ``|A| ≥ 2`` (fastabx ``MIN_A_LEN``, on the size before subsampling).
  Across speaker, X is the same phone (and BY labels) from another speaker: ``|A|·|B|·|X|`` triplets, any sizes.
* Subsampling: ``max_size_group`` keeps at most that many items of every (phone, BY, speaker) group, chosen by a
  seeded permutation that depends only on the group's size, so a group keeps the same items whether it plays A, B
  or X (fastabx shuffles every cell with one seed, which has exactly this property). ``max_x_across`` keeps, for
  each A group, at most that many X speakers, again by a seeded size-only permutation of the candidate speakers in
  sorted order. The selection is deterministic under ``seed`` but not the one polars' RNG draws in fastabx, so
  subsampled scores agree with fastabx's statistically, not item for item; without subsampling they agree with
  fastabx 0.7.x (``max_size_group=None``) up to float rounding (GEMM summation order; cell scores are averaged in
  float64 where fastabx keeps float32). fastabx 0.8.0 aligns every pair with X on the lattice rows, within speaker
  too, and moved ``max_x_across`` before the per-cell cap: with it, only DTW ties broken on a transposed lattice
  differ (random discrete units, 80 items: error rates within 2.5e-4 of ours).
* Collapse (ZeroSpeech order): average the cell error rates over contexts (and X speakers), then over speakers,
  then take the plain mean over (A phone, B phone) pairs.

Distances between frames (every item is a (T, D) sequence; longer-than-one-frame pairs go through DTW, see
``spidr.eval.dtw``, with the X item on the lattice rows, except that within speaker, where X and A are one set, a
pair of A items is aligned once with the earlier item of the group on the rows, as fastabx's symmetric DTW does:
the greedy backtrack can break a tie differently on a transposed lattice, which is common with discrete units):

* ``angular`` (alias ``cosine``): ``arccos(clamp(â·b̂, −1, 1)) / π`` on L2-normalised frames. An all-zero frame is
  replaced by the uniform unit vector ``1/√D`` as fastabx's "singularity border" does: two zero frames are at distance
  0 and a zero frame is at the angle between the other frame and the diagonal, not at a fixed maximal distance.
  fastabx also appends a column (1e-12, or −2e-12 for zero frames) whose contribution to a dot product, at most
  4e-24, never changes a float32 ``arccos``, so it is left out.
* ``euclidean``: ``torch.cdist`` without the matrix-multiplication shortcut.
* ``kl_symmetric``: ``½·Σ (p − q)(log(p + ε) − log(q + ε))`` with ε = 1e-6, for probability vectors.
* ``identical``: 0/1 inequality of one-dimensional discrete units.

Memory stays bounded: features of the referenced spans of each file are stored once (items are views into them,
so overlapping triphones cost nothing), cells are scored in streamed *units* (one BY group, and for ACROSS one
speaker of it) whose DTWs are batched across units, and no whole-dataset distance matrix is ever built. A frame
store above ``abx_frames.MAX_RESIDENT_BYTES`` (1 GiB) lives in a memory-mapped scratch file in TMPDIR (its blocks
reserved when it is made) whose pages are handed back between flushes, so 350k triphone items of 768-dimensional
features run in a few GB of RAM.

The code follows the data: ``abx_frames`` (features → one frame store, frame distances) → ``abx_cells`` (labels →
subsampled groups → units of cells) → ``abx_scoring`` (batched DTWs → per-cell counts) → ``_collapse`` here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from spidr.eval.abx_cells import Context, Groups, Labels, across_units, within_units
from spidr.eval.abx_frames import DISTANCES, DistanceName, FrameStore, frame_distances, prepare_frames
from spidr.eval.abx_scoring import Cells, CellScorer, torch_threads
from spidr.eval.items import Items, frame_bounds, read_items

logger = logging.getLogger(__name__)

__all__ = ["DISTANCES", "AbxResult", "FrameStore", "abx", "abx_error_rate", "frame_distances", "prepare_frames"]

Speaker = Literal["within", "across"]


@dataclass(frozen=True)
class AbxResult:
    """Outcome of an ABX evaluation.

    ``error_rate`` is a fraction (multiply by 100 for the usual percent); ``num_cells`` and ``num_triplets`` count
    what was scored after subsampling; ``num_pairs`` is the number of (A phone, B phone) pairs averaged last, and
    ``pair_error_rates`` their error rates (fractions, averaged over contexts and speakers as ``error_rate`` is;
    ``error_rate`` is their mean): which phones the representation confuses. (A, B) and (B, A) are two pairs: A is
    the phone of A and X.

    ``speaker_error_rates`` gives each speaker's error rate on its own cells (within speaker: the speaker of A, B and
    X; across speaker: that of A and B, X's speakers averaged): the mean over the (A, B) pairs that speaker has cells
    for of each pair's mean over its cells of that speaker. Which speakers the representation finds hard; their
    mean is not ``error_rate`` where speakers have cells for different pairs.
    """

    error_rate: float
    num_cells: int
    num_triplets: int
    num_pairs: int
    num_items: int
    pair_error_rates: Mapping[tuple[str, str], float] = field(default_factory=dict)
    speaker_error_rates: Mapping[str, float] = field(default_factory=dict)


def abx_error_rate(features: Mapping[str, object], items: Items | str | Path, **options: Any) -> float:
    """ABX error rate (a fraction in [0, 1]) of ``features`` on ``items``: ``abx(...).error_rate``, same options."""
    return abx(features, items, **options).error_rate


def abx(
    features: Mapping[str, object],
    items: Items | str | Path,
    *,
    speaker: Speaker = "within",
    context: Context = "within",
    distance: DistanceName = "angular",
    frequency: int | str | Decimal | None = None,
    max_size_group: int | None = 10,
    max_x_across: int | None = 5,
    seed: int = 0,
    librilight_bug: bool = False,
) -> AbxResult:
    """ABX evaluation of per-utterance features.

    Args:
        features: ``{#file: (T, D) array or tensor}`` computed on whole utterances at ``frequency`` Hz (a (T,)
            sequence of discrete units counts as (T, 1)). Any mapping works, e.g. a lazy ``FeatureDirectory``; each
            file is read once. Keys may also be paths ending with the item files' #file (``84/121123/84-121123-0000``
            for ``84-121123-0000``), as ``spidr extract`` names files (``StemKeyed``).
        items: an ``Items`` or the path of an item file.
        speaker, context: the ZeroSpeech condition (table in the module docstring).
        distance: frame distance; ``identical`` for discrete units.
        frequency: feature rate in Hz (int, or str for a non-integer rate); None reads them at 50 Hz (the base
            models' rate), with a warning: features at another rate misplace every item, and nothing here can tell
            (``spidr.eval.feature_dir.extraction_frame_rate`` reads the rate an extraction recorded).
        max_size_group: cap on the items of each (phone, BY, speaker) group; None or negative disables it.
        max_x_across: cap on the X speakers per A group (across speaker only); None or negative disables it.
        seed: seed of the subsampling permutations.
        librilight_bug: slice ``[start, end)`` like Libri-light / ZeroSpeech 2021 (drops each item's last frame).
    """
    from spidr.eval.feature_dir import StemKeyed

    if not isinstance(items, Items):
        items = read_items(items)
    if not isinstance(features, StemKeyed):  # as the CLI: an item's #file finds path-keyed features by their id
        features = StemKeyed(features)
    if speaker not in ("within", "across"):
        raise ValueError(f"speaker = {speaker!r} is invalid: expected 'within' or 'across'")
    if context not in ("within", "any"):
        raise ValueError(f"context = {context!r} is invalid: expected 'within' or 'any'")
    if distance not in DISTANCES:
        raise ValueError(f"distance = {distance!r} is invalid: expected one of {', '.join(DISTANCES)}")
    max_size_group = _cap(max_size_group, "max_size_group")
    max_x_across = _cap(max_x_across, "max_x_across") if speaker == "across" else None

    if not len(items):
        raise ValueError(f"{items.source} holds no items to score")
    if frequency is None:  # (as the CLI warns where no rate is recorded)
        logger.warning("abx: no frequency given: the features are read at 50 Hz (a 100 Hz front end, e.g. "
                       "configs/tiny.toml's, needs frequency=100)")
        frequency = 50
    starts, ends = frame_bounds(items, frequency, librilight_bug=librilight_bug)
    store = FrameStore.build(features, items, starts, ends, distance=distance)
    labels = Labels.from_items(items, context=context)
    groups = Groups.build(labels, max_size_group=max_size_group, seed=seed)
    units = (
        within_units(groups)
        if speaker == "within"
        else across_units(groups, max_x_across=max_x_across, seed=seed)
    )
    threads = torch.get_num_threads()
    with torch_threads(1):  # see torch_threads: only large frame-distance blocks use the caller's threads
        scorer = CellScorer(store, groups, distance=distance, threads=threads)
        for unit in units:
            scorer.add(unit)
        cells = scorer.finish()
    if cells.score.size == 0:
        raise ValueError(
            f"{items.source}: no ABX cell for speaker={speaker}, context={context}: every phone needs a second "
            "phone with the same BY labels (and, within speaker, ≥ 2 items; across speaker, another speaker)"
        )
    (a_phone, b_phone), pair_errors = _collapse(cells, context=context)
    speaker_codes, speaker_errors = _by_speaker(cells)
    error_rate = float(pair_errors.mean())
    logger.info("ABX %s speaker, %s context, %s: %.3f%% over %d cells, %d triplets", speaker, context, distance,
                100 * error_rate, cells.score.size, int(cells.size.sum()))
    return AbxResult(
        error_rate=error_rate,
        num_cells=int(cells.score.size),
        num_triplets=int(cells.size.sum()),
        num_pairs=int(pair_errors.size),
        num_items=len(items),
        pair_error_rates={(str(labels.phone_names[a]), str(labels.phone_names[b])): float(error)
                          for a, b, error in zip(a_phone, b_phone, pair_errors, strict=True)},
        speaker_error_rates={str(labels.speaker_names[code]): float(error)
                             for code, error in zip(speaker_codes, speaker_errors, strict=True)},
    )


def _cap(value: int | None, name: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value < 0):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(f"{name} = {value!r} is invalid: expected an integer ≥ 2, or None / a negative value")
    return value



def _collapse(cells: Cells, *, context: Context) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The (A, B) phone pairs' codes and their (P,) mean errors: over contexts (and X speakers), then speakers
    (fastabx ``collapse``; the error rate is then their mean). With context "any" every cell of an (A, B) pair is
    averaged at once, A and X speakers alike (one flat mean, not a mean per A speaker first)."""
    if context == "within":
        keys, scores = _group_mean((cells.a_phone, cells.b_phone, cells.speaker), cells.score)
        keys, scores = _group_mean(keys[:2], scores)
    else:
        keys, scores = _group_mean((cells.a_phone, cells.b_phone), cells.score)
    return (keys[0], keys[1]), scores


def _by_speaker(cells: Cells) -> tuple[np.ndarray, np.ndarray]:
    """The codes of the speakers (of A) with cells and their mean errors: each (A, B) pair's mean over that speaker's
    cells (contexts and X speakers alike), then the mean over the speaker's pairs."""
    keys, scores = _group_mean((cells.a_phone, cells.b_phone, cells.speaker), cells.score)
    (speaker,), scores = _group_mean(keys[2:], scores)
    return speaker, scores


def _group_mean(keys: tuple[np.ndarray, ...], values: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    unique, inverse = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    sums = np.bincount(inverse, weights=values, minlength=len(unique))
    counts = np.bincount(inverse, minlength=len(unique))
    return tuple(unique.T), sums / counts
