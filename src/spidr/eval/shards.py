"""One extraction split into parts that separate processes run: which utterances part K of N extracts.

Part K of N takes every N-th utterance in order of decreasing length, starting with the K-th longest, so the parts
hold nearly equal amounts of audio (within one file's length) whatever the corpus's length distribution. Every
process computes the same split from the same manifest, with no communication: the parts may run at once (torchrun,
srun, a SLURM array) or one after another, on one machine or several that share the output folder.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (numpy is imported where a split is computed: `spidr --help` imports this module)
    import numpy as np


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (1-based) of ``count``; ``Shard()`` is the whole extraction."""

    index: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count}: expected part K of N with 1 ≤ K ≤ N")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def is_whole(self) -> bool:
        return self.count == 1

    @property
    def folder_name(self) -> str:
        """``shard-03-of-12``: zero-padded, so a listing sorts in part order."""
        return f"shard-{self.index:0{len(str(self.count))}d}-of-{self.count}"

    def members(self, num_samples: np.ndarray) -> np.ndarray:
        """(N,) bool: the utterances of this part, given every utterance's length (N,) in samples."""
        return part_numbers(num_samples, self.count) == self.index


WHOLE = Shard()


def every_part(count: int) -> tuple[Shard, ...]:
    """Parts 1..``count`` of one extraction."""
    return tuple(Shard(index, count) for index in range(1, count + 1))


def part_numbers(num_samples: np.ndarray, count: int) -> np.ndarray:
    """(N,) int64: the part (1..``count``) that takes each utterance, given every utterance's length (N,) in samples
    (one sort for every part's ``members``)."""
    import numpy as np

    order = np.argsort(-np.asarray(num_samples, dtype=np.int64), kind="stable")
    numbers = np.empty(len(order), dtype=np.int64)
    numbers[order] = np.arange(len(order)) % count + 1
    return numbers


def parse_shard(text: str) -> Shard:
    """``--shard K/N`` (argparse type): part K of N, 1 ≤ K ≤ N."""
    index, slash, count = text.partition("/")
    if not (slash and index.strip().isdigit() and count.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N, part K of N (e.g. 3/8)")
    try:
        return Shard(int(index), int(count))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
