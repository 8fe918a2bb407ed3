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
  subsampled scores agree with fastabx's statistically, not item for item; without subsampling they agree up to
  float rounding (GEMM summation order; cell scores are averaged in float64 where fastabx keeps float32).
* Collapse (ZeroSpeech order): average the cell error rates over contexts (and X speakers), then over speakers,
  then take the plain mean over (A phone, B phone) pairs.

Distances between frames (every item is a (T, D) sequence; longer-than-one-frame pairs go through DTW, see
``spidr.eval.dtw``, with the X item on the lattice rows):

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
speaker of it) whose DTWs are batched across units, and no whole-dataset distance matrix is ever built.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from spidr.eval.dtw import accumulated_costs, backtrack_lengths, cost_table_size, last_cells
from spidr.eval.items import (
    NEXT_COLUMN,
    PHONE_COLUMN,
    PREV_COLUMN,
    SPEAKER_COLUMN,
    Items,
    check_nonempty,
    check_within,
    frame_bounds,
    read_items,
)

logger = logging.getLogger(__name__)

Speaker = Literal["within", "across"]
Context = Literal["within", "any"]
DistanceName = Literal["angular", "cosine", "euclidean", "kl_symmetric", "identical"]
DISTANCES = ("angular", "cosine", "euclidean", "kl_symmetric", "identical")
KL_EPS = 1e-6
MIN_A_LEN = 2  # within-speaker cells need two A items: one of them is X, compared with the others

# Work sizes: frame distances of one flush (float32 elements), and lattice cells of one DTW batch.
FLUSH_ELEMENTS = 12_000_000
BATCH_ELEMENTS = 4_000_000
PARALLEL_MIN_WORK = 200_000_000  # multiply-adds of a frame-distance block worth running on several threads


@dataclass(frozen=True)
class AbxResult:
    """Outcome of an ABX evaluation.

    ``error_rate`` is a fraction (multiply by 100 for the usual percent); ``num_cells`` and ``num_triplets`` count
    what was scored after subsampling; ``num_pairs`` is the number of (A phone, B phone) pairs averaged last.
    """

    error_rate: float
    num_cells: int
    num_triplets: int
    num_pairs: int
    num_items: int


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
    frequency: int | str | Decimal = 50,
    max_size_group: int | None = 10,
    max_x_across: int | None = 5,
    seed: int = 0,
    librilight_bug: bool = False,
) -> AbxResult:
    """ABX evaluation of per-utterance features.

    Args:
        features: ``{#file: (T, D) array or tensor}`` computed on whole utterances at ``frequency`` Hz (a (T,)
            sequence of discrete units counts as (T, 1)). Any mapping works, e.g. a lazy ``FeatureDirectory``; each
            file is read once.
        items: an ``Items`` or the path of an item file.
        speaker, context: the ZeroSpeech condition (table in the module docstring).
        distance: frame distance; ``identical`` for discrete units.
        frequency: feature rate in Hz (int, or str for a non-integer rate).
        max_size_group: cap on the items of each (phone, BY, speaker) group; None or negative disables it.
        max_x_across: cap on the X speakers per A group (across speaker only); None or negative disables it.
        seed: seed of the subsampling permutations.
        librilight_bug: slice ``[start, end)`` like Libri-light / ZeroSpeech 2021 (drops each item's last frame).
    """
    if not isinstance(items, Items):
        items = read_items(items)
    if speaker not in ("within", "across"):
        raise ValueError(f"speaker = {speaker!r} is invalid: expected 'within' or 'across'")
    if context not in ("within", "any"):
        raise ValueError(f"context = {context!r} is invalid: expected 'within' or 'any'")
    if distance not in DISTANCES:
        raise ValueError(f"distance = {distance!r} is invalid: expected one of {', '.join(DISTANCES)}")
    max_size_group = _cap(max_size_group, "max_size_group")
    max_x_across = _cap(max_x_across, "max_x_across") if speaker == "across" else None

    starts, ends = frame_bounds(items, frequency, librilight_bug=librilight_bug)
    store = FrameStore.build(features, items, starts, ends, distance=distance)
    labels = _Labels.from_items(items, context=context)
    groups = _Groups.build(labels, max_size_group=max_size_group, seed=seed)
    units = (
        _within_units(groups)
        if speaker == "within"
        else _across_units(groups, max_x_across=max_x_across, seed=seed)
    )
    threads = torch.get_num_threads()
    with _threads(1):  # see _threads: only large frame-distance blocks use the caller's threads
        scorer = _CellScorer(store, groups, distance=distance, threads=threads)
        for unit in units:
            scorer.add(unit)
        cells = scorer.finish()
    if cells.score.size == 0:
        raise ValueError(
            f"{items.source}: no ABX cell for speaker={speaker}, context={context}: every phone needs a second "
            "phone with the same BY labels (and, within speaker, ≥ 2 items; across speaker, another speaker)"
        )
    error_rate, num_pairs = _collapse(cells, context=context)
    logger.info("ABX %s speaker, %s context, %s: %.3f%% over %d cells, %d triplets", speaker, context, distance,
                100 * error_rate, cells.score.size, int(cells.size.sum()))
    return AbxResult(
        error_rate=error_rate,
        num_cells=int(cells.score.size),
        num_triplets=int(cells.size.sum()),
        num_pairs=num_pairs,
        num_items=len(items),
    )


def _cap(value: int | None, name: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value < 0):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(f"{name} = {value!r} is invalid: expected an integer ≥ 2, or None / a negative value")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Features: every referenced span stored once, prepared for the distance
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameStore:
    """Frames of all items, prepared for the distance.

    ``frames`` (N, D) float32 holds, file after file, the span of each file that its items cover; item ``i`` is
    ``frames[offsets[i] : offsets[i] + lengths[i]]``.
    """

    frames: torch.Tensor
    offsets: np.ndarray
    lengths: np.ndarray

    @classmethod
    def build(
        cls,
        features: Mapping[str, object],
        items: Items,
        starts: np.ndarray,
        ends: np.ndarray,
        *,
        distance: DistanceName,
    ) -> FrameStore:
        check_nonempty(items, starts, ends)
        by_file: dict[str, list[int]] = defaultdict(list)
        for index, name in enumerate(items.files):
            by_file[name].append(index)
        missing = [name for name in by_file if name not in features]
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(by_file)} files of {items.source} have no features "
                f"(first: {missing[:3]}); for a directory, #file must be the path relative to it without extension"
            )
        spans = {name: (int(starts[rows].min()), int(ends[rows].max())) for name, rows in by_file.items()}
        total = sum(max(end - start, 0) for start, end in spans.values())
        offsets = np.zeros(len(items), dtype=np.int64)
        frames: torch.Tensor | None = None
        position = 0
        for name, rows in by_file.items():
            array = _as_frames(features[name], name)
            rows = np.asarray(rows)
            check_within(items, rows, starts, ends, array.shape[0])
            if frames is None:
                frames = torch.empty((total, array.shape[1]), dtype=torch.float32)
            elif array.shape[1] != frames.shape[1]:
                raise ValueError(f"features of {name!r} have dimension {array.shape[1]}, others {frames.shape[1]}")
            start, end = spans[name]
            frames[position : position + end - start] = array[start:end]
            offsets[rows] = position + starts[rows] - start
            position += end - start
        assert frames is not None  # items are never empty
        return cls(frames=prepare_frames(frames, distance), offsets=offsets, lengths=ends - starts)


def _as_frames(value: object, name: str) -> torch.Tensor:
    tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    if tensor.ndim == 1:
        tensor = tensor[:, None]  # a sequence of discrete units
    if tensor.ndim != 2:
        raise ValueError(f"features of {name!r} have shape {tuple(tensor.shape)}: expected (T, D) or (T,)")
    tensor = tensor.to(torch.float32)
    # One cheap reduction first; the element-wise check only runs when the sum is not finite (possibly by overflow).
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"features of {name!r} contain non-finite values")
    return tensor


def prepare_frames(frames: torch.Tensor, distance: DistanceName) -> torch.Tensor:
    """Per-frame preprocessing of (N, D) frames, in place where possible (angular: L2 normalisation)."""
    if distance in ("angular", "cosine"):
        norms = frames.norm(dim=1, keepdim=True)
        zero = norms[:, 0] == 0
        frames.div_(norms.masked_fill_(zero[:, None], 1.0))
        frames[zero] = 1.0 / math.sqrt(frames.shape[1])  # fastabx's singularity rule, see the module docstring
    elif distance == "identical" and frames.shape[1] != 1:
        raise ValueError(
            f"the 'identical' distance compares discrete units: features must be (T,) or (T, 1), got dimension "
            f"{frames.shape[1]}"
        )
    return frames


def frame_distances(
    x: torch.Tensor, y: torch.Tensor, distance: DistanceName, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """All frame-to-frame distances between prepared frames x (n, D) and y (m, D) → (n, m) float32 (into ``out``)."""
    if out is None:
        out = torch.empty((x.shape[0], y.shape[0]), dtype=torch.float32)
    match distance:
        case "angular" | "cosine":
            return torch.mm(x, y.T, out=out).clamp_(-1.0, 1.0).acos_().div_(math.pi)
        case "euclidean":
            return out.copy_(torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist"))
        case "kl_symmetric":
            log_x, log_y = (x + KL_EPS).log(), (y + KL_EPS).log()
            # Centring each log row changes nothing for probability vectors and keeps float32 precision near 0.
            log_x -= log_x.mean(1, keepdim=True)
            log_y -= log_y.mean(1, keepdim=True)
            self_x = (x * log_x).sum(1, keepdim=True)
            self_y = (y * log_y).sum(1, keepdim=True).T
            return out.copy_(0.5 * (self_x + self_y - x @ log_y.T - log_x @ y.T))
        case "identical":
            return out.copy_(x[:, 0, None] != y[None, :, 0])
    raise ValueError(f"distance = {distance!r} is invalid: expected one of {', '.join(DISTANCES)}")


# ----------------------------------------------------------------------------------------------------------------
# Labels, groups and subsampling
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Labels:
    """Integer codes of each item's phone, context (0 for context "any") and speaker, with the phone names."""

    phone: np.ndarray
    context: np.ndarray
    speaker: np.ndarray
    phone_names: np.ndarray

    @classmethod
    def from_items(cls, items: Items, *, context: Context) -> _Labels:
        phone_names, phone = np.unique(np.asarray(items.column(PHONE_COLUMN)), return_inverse=True)
        _, speaker = np.unique(np.asarray(items.column(SPEAKER_COLUMN)), return_inverse=True)
        if context == "within":
            pairs = np.stack([np.asarray(items.column(PREV_COLUMN)), np.asarray(items.column(NEXT_COLUMN))], axis=1)
            _, context_code = np.unique(pairs, axis=0, return_inverse=True)
        else:
            context_code = np.zeros(len(items), dtype=np.int64)
        return cls(phone.ravel(), context_code.ravel(), speaker.ravel(), phone_names)


@dataclass(frozen=True)
class _Groups:
    """Items grouped by (phone, context, speaker), each group subsampled once.

    ``members[g]`` are the kept item indices of group g (in item order), ``size[g]`` its size before subsampling.
    """

    phone: np.ndarray
    context: np.ndarray
    speaker: np.ndarray
    size: np.ndarray
    members: list[np.ndarray]

    @classmethod
    def build(cls, labels: _Labels, *, max_size_group: int | None, seed: int) -> _Groups:
        keys = np.stack([labels.phone, labels.context, labels.speaker], axis=1)
        unique, group_of_item = np.unique(keys, axis=0, return_inverse=True)
        group_of_item = group_of_item.ravel()
        order = np.argsort(group_of_item, kind="stable")
        sizes = np.bincount(group_of_item, minlength=len(unique))
        members = np.split(order, np.cumsum(sizes)[:-1])
        if max_size_group is not None:
            members = [m if m.size <= max_size_group else m[np.sort(_permutation(m.size, seed)[:max_size_group])]
                       for m in members]
        return cls(unique[:, 0], unique[:, 1], unique[:, 2], sizes, members)


@functools.cache
def _permutation(size: int, seed: int) -> np.ndarray:
    """The seeded permutation used for every group of ``size`` elements (same size, same choice, as in fastabx)."""
    return np.random.default_rng(seed).permutation(size)


# ----------------------------------------------------------------------------------------------------------------
# Units: one BY group (within) or one (BY group, speaker) (across), holding every cell whose A lives there
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """Cells sharing their B candidates, scored from one (rows × cols) matrix of item distances.

    Columns are the items of ``col_groups`` (the A and B groups), rows the X items of ``row_groups``. Row group r
    holds the X items of group ``row_groups[r]`` and is paired with the A column group ``row_a[r]``. In a symmetric
    (within speaker) unit the row groups are A groups themselves and each row item is excluded as its own A.
    """

    col_groups: np.ndarray
    row_groups: np.ndarray
    row_a: np.ndarray
    symmetric: bool
    cols: np.ndarray = field(init=False)
    col_group_of: np.ndarray = field(init=False)
    col_start: np.ndarray = field(init=False)
    rows: np.ndarray = field(init=False)
    row_group_of: np.ndarray = field(init=False)
    pending: int = 0
    counts: torch.Tensor | None = None

    def lay_out(self, groups: _Groups) -> None:
        col_members = [groups.members[g] for g in self.col_groups]
        self.cols = np.concatenate(col_members)
        col_sizes = np.array([m.size for m in col_members])
        self.col_group_of = np.repeat(np.arange(len(col_members)), col_sizes)
        self.col_start = np.concatenate([[0], np.cumsum(col_sizes)[:-1]])
        row_members = [groups.members[g] for g in self.row_groups]
        self.rows = np.concatenate(row_members)
        self.row_group_of = np.repeat(np.arange(len(row_members)), [m.size for m in row_members])


def _within_units(groups: _Groups) -> Iterator[_Unit]:
    by_key: dict[tuple[int, int], list[int]] = defaultdict(list)
    for g, key in enumerate(zip(groups.context.tolist(), groups.speaker.tolist(), strict=True)):
        by_key[key].append(g)
    for members in by_key.values():
        col_groups = np.asarray(members)
        a_local = np.flatnonzero(groups.size[col_groups] >= MIN_A_LEN)
        if col_groups.size < 2 or a_local.size == 0:
            continue  # no B phone, or no A group with two items
        yield _Unit(col_groups=col_groups, row_groups=col_groups[a_local], row_a=a_local, symmetric=True)


def _across_units(groups: _Groups, *, max_x_across: int | None, seed: int) -> Iterator[_Unit]:
    same_phone: dict[tuple[int, int], list[int]] = defaultdict(list)  # (phone, context) → groups, by speaker
    by_key: dict[tuple[int, int], list[int]] = defaultdict(list)  # (context, speaker) → groups
    for g, (phone, context, speaker) in enumerate(
        zip(groups.phone.tolist(), groups.context.tolist(), groups.speaker.tolist(), strict=True)
    ):
        same_phone[phone, context].append(g)
        by_key[context, speaker].append(g)
    for members in by_key.values():
        if len(members) < 2:
            continue  # no B phone
        row_groups, row_a = [], []
        for a_local, a in enumerate(members):
            candidates = [g for g in same_phone[int(groups.phone[a]), int(groups.context[a])] if g != a]
            if max_x_across is not None and len(candidates) > max_x_across:
                chosen = np.sort(_permutation(len(candidates), seed)[:max_x_across])
                candidates = [candidates[c] for c in chosen]
            row_groups += candidates
            row_a += [a_local] * len(candidates)
        if row_groups:
            yield _Unit(np.asarray(members), np.asarray(row_groups), np.asarray(row_a), symmetric=False)


# ----------------------------------------------------------------------------------------------------------------
# Scoring: batched DTWs over many units, then per-cell counts
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """A block of rows of one unit: its (rows × cols) item distances are computed together."""

    unit: _Unit
    row_slice: slice
    distances: torch.Tensor | None = None


@dataclass
class _Cells:
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


class _CellScorer:
    """Streams units: batches their DTWs, scores their cells, keeps only per-cell results."""

    def __init__(self, store: FrameStore, groups: _Groups, *, distance: DistanceName, threads: int) -> None:
        self.store = store
        self.groups = groups
        self.distance = distance
        self.pool: list[_Chunk] = []
        self.pool_elements = 0
        self.workspace = _Workspace()
        self.threads = threads
        self.results: list[tuple[np.ndarray, ...]] = []

    def add(self, unit: _Unit) -> None:
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

    def finish(self) -> _Cells:
        self.flush()
        if not self.results:
            empty = np.zeros(0, dtype=np.int64)
            return _Cells(empty, empty, empty, empty, empty, np.zeros(0), empty)
        columns = [np.concatenate(parts) for parts in zip(*self.results, strict=True)]
        return _Cells(*columns)

    def flush(self) -> None:
        if not self.pool:
            return
        self._compute_distances(self.pool)
        for chunk in self.pool:
            self._count(chunk)
        self.pool, self.pool_elements = [], 0

    def _compute_distances(self, chunks: list[_Chunk]) -> None:
        """Fill ``chunk.distances`` (rows × cols item DTW distances, X on the lattice rows) for every chunk.

        The frame distances of every chunk are written into one flat buffer (one row-major block per chunk); the
        lattice of a pair is then a (rows × cols) window of its chunk's block.
        """
        store = self.store
        layouts = []
        for chunk in chunks:
            rows, cols = chunk.unit.rows[chunk.row_slice], chunk.unit.cols
            layouts.append((rows, cols, store.lengths[rows], store.lengths[cols]))
        max_rows = max(int(row_len.max()) for _, _, row_len, _ in layouts)
        max_cols = max(int(col_len.max()) for _, _, _, col_len in layouts)
        max_width = max(int(col_len.sum()) for _, _, _, col_len in layouts)
        sizes = [int(row_len.sum()) * int(col_len.sum()) for _, _, row_len, col_len in layouts]
        # dtw_from_buffer reads up to max_rows × width + max_cols cells past a lattice's start: finite padding.
        tail = max_rows * max_width + max_cols
        buffer = self.workspace.get("lattices", sum(sizes) + tail)
        buffer[sum(sizes) :] = 0.0
        pair_parts = []
        base = 0
        for (rows, cols, row_len, col_len), size in zip(layouts, sizes, strict=True):
            x = store.frames[_ranges(store.offsets[rows], row_len)]
            y = store.frames[_ranges(store.offsets[cols], col_len)]
            parallel = size * x.shape[1] >= PARALLEL_MIN_WORK
            with _threads(self.threads if parallel else 1):
                frame_distances(x, y, self.distance, out=buffer[base : base + size].view(x.shape[0], y.shape[0]))
            width = y.shape[0]
            row_off = np.cumsum(row_len) - row_len
            col_off = np.cumsum(col_len) - col_len
            # One entry per (row item, col item) pair, row-major: where its lattice starts, its row stride, sizes.
            start = base + row_off[:, None] * width + col_off[None, :]
            pair_parts.append(
                (start.ravel(), np.full(start.size, width), np.repeat(row_len, cols.size), np.tile(col_len, rows.size))
            )
            base += size
        pairs = _Pairs(*(np.concatenate(parts) for parts in zip(*pair_parts, strict=True)))
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

    def _cells(self, unit: _Unit) -> tuple[np.ndarray, ...]:
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
def _threads(count: int) -> Iterator[None]:
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


def _collapse(cells: _Cells, *, context: Context) -> tuple[float, int]:
    """Mean error over contexts (and X speakers), then speakers, then (A, B) phone pairs (fastabx ``collapse``)."""
    if context == "within":
        keys, scores = _group_mean((cells.a_phone, cells.b_phone, cells.speaker), cells.score)
        keys, scores = _group_mean(keys[:2], scores)
    else:
        keys, scores = _group_mean((cells.a_phone, cells.b_phone), cells.score)
    return float(scores.mean()), int(scores.size)


def _group_mean(keys: tuple[np.ndarray, ...], values: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    unique, inverse = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    sums = np.bincount(inverse, weights=values, minlength=len(unique))
    counts = np.bincount(inverse, minlength=len(unique))
    return tuple(unique.T), sums / counts
