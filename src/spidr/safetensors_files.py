"""Safetensors files whose bytes depend only on their tensors and metadata: the safetensors library writes the
metadata's keys in a random order (a Rust hash map), so two exports of one model, or two k-means runs with one seed,
had different file hashes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` and ``metadata`` to ``path`` as safetensors, the header's keys sorted (tensor offsets are
    relative to the data section, which follows the header unchanged)."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data section to 8 bytes
    with Path(path).open("wb") as handle:
        handle.write(len(header).to_bytes(8, "little"))
        handle.write(header)
        handle.write(data[8 + length :])
