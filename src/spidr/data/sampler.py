"""Length-bucketed batch sampler with rank sharding and an exact, mid-epoch resumable position (spec §6.3–6.4).

For epoch ``e`` all ranks build the same global batch list from one generator seeded with a hash of (seed, e):

1. utterances shorter than ``min_sample_size`` are dropped; longer than ``max_sample_size`` count as clipped;
2. shuffle inside each length bucket, walk buckets from short to long and pack greedily while the batch cost stays
   ≤ ``max_batch_length`` (cost = sum of clipped lengths, or rows × longest when batches are padded). A batch never
   exceeds the budget, except a single utterance longer than the budget on its own (the loader clips utterances to
   ``min(max_sample_size, max_batch_length)`` so that cannot happen in training);
3. shuffle the batch order, then pad the list by repeating its first batches until its length is a multiple of the
   world size (or drop the remainder with ``drop_last``) — nothing is added when it already divides, unlike the
   reference (spec §14.11); rank ``r`` takes batches r, r + world, r + 2·world, … Each batch knows whether it is
   such a repeat (``is_repeat``), so that validation can leave repeats out of its means.

So within an epoch every kept utterance lands in exactly one batch of one rank, apart from the padding repeats.
The sampler remembers (epoch, position): ``state_dict()`` after consuming k batches and ``load_state_dict`` in a
fresh process continue with batch k + 1 of the same epoch. A pass that finishes an epoch is followed, on the next
``iter()``, by the next epoch, so a training loop may call ``set_epoch`` or not.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch

from spidr.seeding import derived_seed

logger = logging.getLogger(__name__)

PLAN_VERSION = 2  # bump when the batch plan of a given (seed, epoch) changes (2: epochs seeded by a hash)


# Queries per block of the packing's searchsorted: each block searches only the slice of the cumulative lengths its
# batches can end in, which stays in cache (one search over 4.5M sorted values cost 46x the 281k one, not 16x).
SEARCH_BLOCK = 1 << 16
# Items per block of the grouping by bucket: each block is sorted in cache and then copied out in runs, one per
# bucket (a stable sort of all items at once, then gathers through it, cost 50x the 281k time at 16x the items).
GROUP_BLOCK = 1 << 15


def _bucket_ids(lengths: np.ndarray, num_buckets: int, method: Literal["uniform", "percentile"]) -> np.ndarray:
    """Bucket index of each length; bucket b holds lengths in (edge_b, edge_b+1]."""
    if method == "uniform":
        edges = np.linspace(lengths.min() - 1, lengths.max() + 1, num_buckets + 1)
        # Equal widths: the bucket follows from a division (linear, where a search costs log(buckets) per length);
        # the float estimate is then corrected by at most one bucket against the exact edges.
        # Computed block by block so the temporaries stay in cache (fresh full-size arrays cost more in page faults
        # than the arithmetic).
        width = (edges[-1] - edges[0]) / num_buckets
        ids = np.empty(lengths.size, dtype=_bucket_type(num_buckets))
        for first in range(0, lengths.size, SEARCH_BLOCK):
            block = lengths[first : first + SEARCH_BLOCK]
            guess = np.clip(np.ceil((block - edges[0]) / width).astype(np.int64) - 1, 0, num_buckets - 1)
            guess -= (guess > 0) & (block <= edges[guess])
            guess += (guess < num_buckets - 1) & (block > edges[guess + 1])
            ids[first : first + SEARCH_BLOCK] = guess
        return ids
    if method == "percentile":
        edges = np.percentile(lengths, np.linspace(0, 100, num_buckets + 1))
    else:
        raise ValueError(f"data.bucket_method = {method!r} is invalid: expected 'uniform' or 'percentile'")
    ids = np.minimum(np.searchsorted(edges[1:], lengths, side="left"), num_buckets - 1)
    return ids.astype(_bucket_type(num_buckets))


def _bucket_type(num_buckets: int) -> type[np.signedinteger]:
    """int16 bucket ids where they fit: numpy's stable argsort of 16-bit keys is a radix sort."""
    return np.int16 if num_buckets <= np.iinfo(np.int16).max else np.int64


def _group_by_bucket(buckets: np.ndarray, num_buckets: int, columns: Sequence[np.ndarray], *,
                     block_size: int = GROUP_BLOCK) -> tuple[list[np.ndarray], np.ndarray]:
    """``columns`` (each (N,), aligned with ``buckets``) reordered by bucket, stably (item order kept inside a bucket),
    and the (num_buckets + 1,) bounds of each bucket's slice. The same result as gathering every column through
    ``np.argsort(buckets, kind="stable")``, computed block by block: each block's stable sort runs in cache, and its
    items of bucket k go to one contiguous run after the earlier blocks' items of bucket k."""
    size = buckets.size
    firsts = range(0, size, block_size)
    counts = np.stack([np.bincount(buckets[first : first + block_size], minlength=num_buckets) for first in firsts])
    bounds = np.concatenate([[0], np.cumsum(counts.sum(0))])
    run_starts = bounds[:-1] + np.cumsum(counts, axis=0) - counts  # (blocks, buckets): where each block's run goes
    outputs = [np.empty(size, dtype=column.dtype) for column in columns]
    for block, first in enumerate(firsts):
        keys = buckets[first : first + block_size]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        start_in_block = np.cumsum(counts[block]) - counts[block]
        destination = run_starts[block][sorted_keys] + (np.arange(order.size) - start_in_block[sorted_keys])
        for output, column in zip(outputs, columns, strict=True):
            output[destination] = column[first : first + block_size][order]
    return outputs, bounds


def _greedy_bounds(lengths: np.ndarray, budget: int, longest_batch: int) -> list[int]:
    """Batch bounds of the greedy unpadded packing of ``lengths`` (already in batch order): from item s a batch ends
    at the largest e with sum(lengths[s:e]) ≤ budget (at least s + 1), and batches chain from item 0. Worked block
    by block: each block of starts takes its running sums and its searches in cache-sized arrays (a batch holds at
    most ``longest_batch`` items, so a block needs that many beyond its end)."""
    size = lengths.size
    bounds, begin = [0], 0
    while begin < size:
        first, last = begin, min(begin + SEARCH_BLOCK, size)
        block = lengths[first : min(last + longest_batch, size)]
        totals = np.zeros(block.size + 1, dtype=np.int64)  # cost of block items s..e−1 = totals[e] − totals[s]
        np.cumsum(block, out=totals[1:])
        found = np.searchsorted(totals, totals[: last - first] + budget, side="right") - 1
        ends = first + np.maximum(found, np.arange(1, last - first + 1))
        while begin < last:
            begin = int(ends[begin - first])
            bounds.append(begin)
    return bounds


class Batches(Sequence[list[int]]):
    """An epoch's batches without a Python list per batch: item ``k`` is batch ``sequence[k]``, the dataset
    indices ``flat[bounds[b] : bounds[b + 1]]``. Compares equal to any sequence of the same index lists."""

    def __init__(self, flat: np.ndarray, bounds: np.ndarray, sequence: np.ndarray, repeats: np.ndarray) -> None:
        """``repeats[k]``: batch ``k`` repeats an earlier one only to give every rank as many batches."""
        self.flat, self.bounds, self.sequence, self.repeats = flat, bounds, sequence, repeats

    def __len__(self) -> int:
        return self.sequence.size

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        batch = int(self.sequence[index])
        return self.flat[self.bounds[batch] : self.bounds[batch + 1]].tolist()

    def every(self, start: int, step: int) -> Batches:
        """Batches start, start + step, ... (one rank's share)."""
        return Batches(self.flat, self.bounds, self.sequence[start::step], self.repeats[start::step])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == list(b) for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


class BucketBatchSampler:
    """Yields lists of dataset indices; see the module docstring for the batching rules.

    ``lengths`` holds every dataset item's length in samples (the manifest's ``num_samples``). ``section``: the
    config section of the settings (``data``, ``validation.NAME``), named by errors.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        max_batch_length: int,
        min_sample_size: int = 0,
        max_sample_size: int | None = None,
        num_buckets: int = 1000,
        bucket_method: Literal["uniform", "percentile"] = "uniform",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        padded: bool = False,
        section: str = "data",
    ) -> None:
        self.section = section
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size = {world_size})")
        all_lengths = np.asarray(lengths, dtype=np.int64)
        kept = all_lengths >= min_sample_size
        num_kept = int(np.count_nonzero(kept))
        if num_kept == 0:
            raise ValueError(f"none of the {len(all_lengths)} utterances is at least {section}.min_sample_size = "
                             f"{min_sample_size} samples long")
        dropped = len(all_lengths) - num_kept
        if dropped:
            logger.info("dropped %d of %d utterances shorter than %d samples", dropped, len(all_lengths),
                        min_sample_size)
        clip = max_sample_size if max_sample_size is not None else int(all_lengths.max())
        # Per-item arrays in 32 bits where they fit: the grouping below and each epoch's shuffle move half the bytes.
        index_type = np.int32 if len(all_lengths) <= np.iinfo(np.int32).max else np.int64
        length_type = np.int32 if clip <= np.iinfo(np.int32).max else np.int64
        kept_indices = np.flatnonzero(kept).astype(index_type)
        clipped = np.minimum(all_lengths[kept_indices], clip).astype(length_type)
        buckets = _bucket_ids(clipped, num_buckets, bucket_method)
        # Kept items grouped by bucket once, stably: each epoch then shuffles inside every group, so its permutations
        # and gathers stay within one bucket's slice, in cache. One permutation of all items followed by a sort by
        # bucket (the earlier way, same distribution) cost 30× the time at 16× the utterances, its random accesses
        # missing the cache once the arrays outgrow it. The kept items are stored in that grouped order only
        # (dataset indices ascending inside each bucket), so the sampler holds one copy of its per-item arrays.
        (self.indices, self.clipped), self._group_bounds = _group_by_bucket(buckets, num_buckets,
                                                                           (kept_indices, clipped))
        del buckets, kept_indices, clipped
        self.max_batch_length = max_batch_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.padded = padded
        self.epoch = 0
        self.position = 0  # batches of ``epoch`` already handed out (consumed)
        self._cache: tuple[int, Batches] | None = None
        self._fingerprint: tuple[int, str] | None = None  # (epoch, plan_fingerprint)

    @property
    def buckets(self) -> np.ndarray:
        """(num kept,) bucket id of each kept item, in the stored (grouped) order."""
        counts = np.diff(self._group_bounds)
        return np.repeat(np.arange(counts.size, dtype=_bucket_type(counts.size)), counts)

    # ----------------------------------------------------------------------------------------------------------
    # The batches of one epoch
    # ----------------------------------------------------------------------------------------------------------

    def _bounds(self, lengths: np.ndarray) -> np.ndarray:
        """Batch bounds of the greedy packing of ``lengths`` (clipped, in batch order): a batch takes items while its
        cost stays within ``max_batch_length`` (always at least one); one ``searchsorted`` per block or batch
        instead of a Python step per utterance."""
        budget = self.max_batch_length
        if self.padded:
            bounds = [0]
            # cost of items s..e−1 = (e − s) · max(lengths[s:e]), nondecreasing in e; at most budget // lengths[s]
            # items fit, so the running max is only needed over that window.
            while bounds[-1] < lengths.size:
                begin = bounds[-1]
                window = lengths[begin : begin + budget // max(int(lengths[begin]), 1) + 1]
                costs = np.maximum.accumulate(window) * np.arange(1, window.size + 1)
                bounds.append(begin + max(int(np.searchsorted(costs, budget, side="right")), 1))
        else:
            bounds = _greedy_bounds(lengths, budget, budget // max(int(self.clipped.min()), 1) + 1)
        return np.asarray(bounds, dtype=np.int64)

    def _shuffled_by_bucket(self, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, clipped lengths) of the kept items, bucket by bucket from short to long, each bucket in
        a uniformly random order."""
        positions = np.empty(self.indices.size, dtype=np.int64)
        starts, ends = self._group_bounds[:-1], self._group_bounds[1:]
        for start, end in zip(starts[ends > starts].tolist(), ends[ends > starts].tolist(), strict=True):
            positions[start:end] = torch.randperm(end - start, generator=generator).numpy() + start
        return self.indices[positions], self.clipped[positions]

    def _plan(self, epoch: int) -> Batches:
        """Every rank's batches of ``epoch`` in order, padded (or cut) to a multiple of the world size."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        if self.shuffle:
            flat, lengths = self._shuffled_by_bucket(generator)
        else:
            order = np.lexsort((self.indices, self.clipped))  # by clipped length, ties by dataset index
            flat, lengths = self.indices[order], self.clipped[order]
        bounds = self._bounds(lengths)
        count = bounds.size - 1
        sequence = torch.randperm(count, generator=generator).numpy() if self.shuffle else np.arange(count)
        remainder = count % self.world_size
        if remainder and self.drop_last:
            sequence = sequence[: count - remainder]
        elif remainder:
            sequence = np.concatenate([sequence, sequence[np.arange(self.world_size - remainder) % count]])
        repeats = np.arange(sequence.size) >= count
        if sequence.size == 0:
            raise ValueError(f"epoch {epoch} has fewer batches than the {self.world_size} ranks and "
                             f"{self.section}.drop_last is true; set drop_last = false or use more data / smaller "
                             "batches")
        return Batches(flat, bounds, sequence, repeats)

    def scored_samples(self, epoch: int = 0) -> int:
        """Samples the batches of ``epoch`` hand to the model, padding repeats left out: every row is cropped to
        its batch's shortest (unless ``padded``), and every utterance to ``max_sample_size``."""
        batches = self._plan(epoch)
        used = np.unique(batches.sequence[~batches.repeats])  # (drop_last may leave batches out)
        by_index = np.zeros(int(self.indices.max()) + 1, dtype=np.int64)
        by_index[self.indices] = self.clipped
        lengths = by_index[batches.flat]  # batch b's rows are flat[bounds[b]:bounds[b + 1]]
        starts = batches.bounds[:-1]
        per_batch = (np.add.reduceat(lengths, starts) if self.padded
                     else np.minimum.reduceat(lengths, starts) * np.diff(batches.bounds))
        return int(per_batch[used].sum())

    def global_batches(self, epoch: int) -> Batches:
        """Every rank's batches of ``epoch`` in order, padded (or cut) to a multiple of the world size."""
        return self._plan(epoch)

    def batches(self, epoch: int) -> Batches:
        """This rank's batches of ``epoch`` (global batches rank, rank + world, ...)."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._plan(epoch).every(self.rank, self.world_size))
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    # ----------------------------------------------------------------------------------------------------------
    # Iteration and resumable position
    # ----------------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` from its start; calling it with the current epoch keeps the position (so a resumed
        run that calls ``set_epoch`` at the top of its epoch loop continues mid-epoch)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def iter_planned(self) -> Iterator[tuple[int, int, list[int]]]:
        """Yield (epoch, position, indices) from the current position to the end of the epoch."""
        if self.position >= len(self.batches(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        batches = self.batches(epoch)
        for position in range(self.position, len(batches)):
            self.position = position + 1  # a direct consumer has taken it; the loader corrects for read-ahead
            yield epoch, position, batches[position]

    def is_repeat(self, epoch: int, position: int) -> bool:
        """Whether this rank's batch ``position`` of ``epoch`` is a padding repeat of another rank's batch."""
        return bool(self.batches(epoch).repeats[position])

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, indices in self.iter_planned():
            yield indices

    def mark_consumed(self, epoch: int, position: int) -> None:
        """Record that batch ``position`` of ``epoch`` was consumed (the DataLoader reads the sampler ahead)."""
        self.epoch, self.position = epoch, position + 1

    def plan_fingerprint(self, epoch: int) -> str:
        """A digest of this rank's batches of ``epoch`` (their order and contents): a resumed position means the
        same batches only under the same digest. Bucket, crop or padding settings, or a reordered manifest, can
        change the batches and keep their count."""
        if self._fingerprint is None or self._fingerprint[0] != epoch:
            batches = self.batches(epoch)
            digest = hashlib.blake2b(digest_size=16)
            for array in (batches.flat, batches.bounds, batches.sequence, self.clipped):
                digest.update(np.ascontiguousarray(array).astype(np.int64, copy=False).tobytes())
            self._fingerprint = (epoch, digest.hexdigest())
        return self._fingerprint[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_items": len(self.indices),
            "num_batches": len(self.batches(self.epoch)),
            "plan": PLAN_VERSION,
            "fingerprint": self.plan_fingerprint(self.epoch),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; if the data or the world size changed, restart the saved epoch."""
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        mine = self.state_dict()
        # A state saved without "plan" comes from a version that seeded epochs with seed + epoch: its position
        # points into another order of batches.
        changed = [k for k in ("seed", "world_size", "num_items", "num_batches", "plan") if state.get(k) != mine[k]]
        if not changed and "fingerprint" in state and state["fingerprint"] != mine["fingerprint"]:
            changed = ["fingerprint"]  # (a state saved before it existed is trusted on the rest, as it was)
        if changed:
            logger.warning(
                "sampler state does not match this run (%s differ: saved %s, now %s); restarting epoch %d from its "
                "first batch", ", ".join(changed), {k: state.get(k) for k in changed}, {k: mine[k] for k in changed},
                self.epoch,
            )
            self.position = 0
