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
