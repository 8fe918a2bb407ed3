"""Generator seeds derived from several integers (run seed, epoch, rank, batch position, ...).

A sum such as ``seed + epoch`` makes (seed s, epoch e + 1) repeat (seed s + 1, epoch e): two runs of a seed study
would then see the same batches one epoch apart. Hashing the whole tuple keeps every combination distinct.
"""

from __future__ import annotations

import hashlib


def derived_seed(*parts: int) -> int:
    """A 63-bit seed (a valid ``torch.Generator.manual_seed`` argument) from ``parts``, decorrelated across all."""
    digest = hashlib.blake2b("/".join(str(int(part)) for part in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# A part that no other derived seed has in second place (epochs and ranks are >= 0): derived_seed(seed, rank) was
# the seed of epoch ``rank``'s batch plan, so a rank's RNG started where that epoch's shuffle did.
RANK_STREAM = -1


def rank_seed(run_seed: int, rank: int) -> int:
    """The seed of one rank's RNG streams (dropout, layer drop): the run seed itself on rank 0, so that a
    single-process run is seeded as before, and a derived seed on the others (``run_seed + rank`` gave rank 1 of
    seed 0 the streams of rank 0 of seed 1)."""
    return run_seed if rank == 0 else derived_seed(run_seed, RANK_STREAM, rank)
