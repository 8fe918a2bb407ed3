"""Training data of a unit LM: one token stream, random windows drawn from (seed, step), a held-out split.

The training utterances, each encoded as ``BOS u … EOS``, are concatenated in stem order into one stream; a training
sample is a window of ``context + 1`` tokens starting anywhere in it (fairseq's ``--sample-break-mode none``). The
windows of optimizer step ``s`` are drawn from a generator seeded with ``(seed, s)`` for the *global* batch, and rank
``r`` of ``W`` takes rows ``r·B/W … (r+1)·B/W − 1``. So the data of a step depends on nothing but the step: a resumed
run sees the same windows as an uninterrupted one, and W ranks see together what one process sees alone.

Held-out utterances (``val_fraction``) are chosen by a hash of their stem, so the split does not depend on file order
or on the other utterances; validation reads the held-out stream in consecutive windows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from spidr.lm.tokens import Vocabulary, smallest_int_dtype
from spidr.seeding import derived_seed


def is_held_out(stem: str, fraction: float, seed: int) -> bool:
    """Deterministic per-stem choice of the validation utterances."""
    digest = hashlib.sha256(f"{seed}:{stem}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def token_stream(sequences: Mapping[str, np.ndarray], vocab: Vocabulary) -> torch.Tensor:
    """(N,) every sequence as ``BOS u … EOS``, in stem order, in the smallest signed integer dtype that holds the
    vocabulary's ids (int16 up to 32,765 units: 2 bytes a token, where int64 took 8 on every rank for the whole run;
    the windows drawn from it are int64)."""
    dtype = smallest_int_dtype(vocab.size - 1)
    stream = np.empty(sum(len(values) + 2 for values in sequences.values()), dtype=dtype)  # filled in place
    start = 0
    for stem in sorted(sequences):
        values = sequences[stem]
        stream[start] = vocab.bos
        stream[start + 1 : start + 1 + len(values)] = values
        stream[start + 1 + len(values)] = vocab.eos
        start += len(values) + 2
    return torch.from_numpy(stream)


@dataclass(frozen=True)
class WindowSampler:
    """The (rows, context + 1) windows of one rank's micro-batch at one step."""

    stream: torch.Tensor
    context: int
    batch_size: int  # global, per optimizer step
    seed: int

    def __post_init__(self) -> None:
        if self.stream.numel() < self.context + 1:
            raise ValueError(f"the training data has {self.stream.numel()} tokens, fewer than one window of "
                             f"model.context + 1 = {self.context + 1}; lower model.context or add data")

    def windows(self, step: int, *, rank: int = 0, world_size: int = 1, micro: int = 0, num_micro: int = 1,
                attempt: int = 0) -> torch.Tensor:
        """``attempt``: how many tries of ``step`` were skipped as non-finite before this one; a retry draws other
        windows (the same ones would likely fail again, until the run gave up as diverged)."""
        seed = self.seed * 1_000_003 + step if attempt == 0 else derived_seed(self.seed, step, attempt)
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, self.stream.numel() - self.context, (self.batch_size,), generator=generator)
        per_rank = self.batch_size // world_size
        per_micro = per_rank // num_micro
        first = rank * per_rank + micro * per_micro
        mine = starts[first:first + per_micro]
        offsets = torch.arange(self.context + 1)
        return self.stream[mine[:, None] + offsets[None, :]].long()


def validation_windows(stream: torch.Tensor, context: int, batch_size: int, *, max_tokens: int = 0, rank: int = 0,
                       world_size: int = 1) -> Iterator[torch.Tensor]:
    """(rows, context + 1) int64: consecutive non-overlapping windows of ``context + 1`` tokens (sharing one token),
    ``batch_size`` at a time; the last, shorter window is padded with -1 (ignored).

    ``max_tokens`` (> 0) keeps about that many tokens of a longer stream: windows spread evenly over it, the first
    and the last among them, so that validation costs the same at any corpus size (its held-out share grows with
    the corpus). With ``world_size`` ranks, rank ``r`` takes every ``world_size``-th of those windows from the
    ``r``-th: together the ranks score each window once."""
    if stream.numel() < 2:
        return
    starts = np.arange(0, stream.numel() - 1, context)
    if max_tokens > 0 and starts.size * context > max_tokens:
        wanted = max(max_tokens // context, 1)
        starts = starts[np.unique(np.linspace(0, starts.size - 1, wanted).round().astype(np.int64))]
    starts = starts[rank::world_size].tolist()
    for i in range(0, len(starts), batch_size):
        rows = []
        for start in starts[i:i + batch_size]:
            window = stream[start:start + context + 1]
            if window.numel() < context + 1:
                window = torch.cat([window, window.new_full((context + 1 - window.numel(),), -1)])
            rows.append(window)
        yield torch.stack(rows).long()


def scored_targets(stream: torch.Tensor, context: int, *, bos: int | None = None, max_tokens: int = 0) -> int:
    """How many targets a validation scores over ``stream`` (every rank's windows together): each window's tokens
    after its first, but padding and ``bos``, the windows being ``validation_windows``' (``max_tokens``)."""
    count = 0
    for rows in validation_windows(stream, context, 4096, max_tokens=max_tokens):
        targets = rows[:, 1:]
        scored = targets >= 0
        if bos is not None:
            scored &= targets != bos
        count += int(scored.sum())
    return count
