"""Resumable extraction: what an output folder holds, and which utterances are finished.

``OUT/.extract/state.json`` names what is being extracted (settings, a fingerprint of the model and one of the
utterance list); ``OUT/.extract/journal.jsonl`` gets one line per finished batch, written after that batch's
``.npy`` files were renamed into place and its unit rows flushed::

    {"done": [manifest indices], "skipped": {location: reason}, "units_bytes": {"layer_05": size, ...}}

A restarted extraction skips every journaled utterance (its files are never rewritten) and truncates each units
file to the size the last complete journal line recorded, so rows of a batch that was cut short disappear with it
and that batch is redone. A torn last line (the process was killed while writing it) is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from spidr.atomic_files import write_atomically
from spidr.data.manifest import ITER_CHUNK, Manifest

logger = logging.getLogger(__name__)

STATE_DIR = ".extract"
FORMAT = 1


# What a changed fingerprint means (the fingerprints themselves tell a user nothing)
_FINGERPRINTS = {"model": "a model with other weights or config", "utterances": "another list of utterances",
                 "benchmark": "a benchmark made again: its info.json differs"}


def identity_differences(previous: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """What differs between two extraction identities (``state.json``), in words: each changed entry by name,
    a changed setting with its two values, and an entry the earlier one lacks as the work of an older spidr."""
    parts = []
    changed = sorted(k for k in {*previous, *current} if previous.get(k) != current.get(k))
    if any(k in current for k in changed):  # an entry only the earlier one holds follows from the others' changes
        changed = [k for k in changed if k in current]
    for key in changed:
        old, new = previous.get(key), current.get(key)
        if key not in previous:
            parts.append(f"{key} (that folder was begun by an older spidr, which wrote other outputs)")
        elif key in _FINGERPRINTS:
            parts.append(f"{key} ({_FINGERPRINTS[key]})")
        elif isinstance(old, dict) and isinstance(new, dict):
            values = [f"{name}: {json.dumps(old.get(name))} → {json.dumps(new.get(name))}"
                      for name in sorted({*old, *new}) if old.get(name) != new.get(name)]
            parts.append(f"{key} ({'; '.join(values)})")
        else:
            parts.append(f"{key} ({json.dumps(old)} → {json.dumps(new)})")
    return ", ".join(parts)


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-1 of the model's config and of every state tensor's bytes: another checkpoint, another fingerprint."""
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def entries_fingerprint(manifest: Manifest) -> str:
    """SHA-1 of the utterances (ids, resolved paths, lengths) in order."""
    digest = hashlib.sha1(str(len(manifest)).encode())
    for start in range(0, len(manifest), ITER_CHUNK):
        stop = min(start + ITER_CHUNK, len(manifest))
        entries = [manifest[i] for i in range(start, stop)] if manifest.archive_index is not None else None
        locations = [e.location for e in entries] if entries else [
            manifest.resolve(p) for p in manifest.paths.strings(start, stop)]
        digest.update("\n".join(manifest.fileids.strings(start, stop)).encode())
        digest.update("\n".join(locations).encode())
        digest.update(manifest.num_samples[start:stop].tobytes())
    return digest.hexdigest()


class ExtractionJournal:
    """The state of one output folder; see the module docstring."""

    def __init__(self, out_dir: Path, identity: Mapping[str, Any], *, num_entries: int, restart: bool,
                 replace_other: bool = False, outputs: Sequence[str] = ()) -> None:
        """``outputs``: glob patterns (in ``out_dir``) of what an extraction writes; starting over deletes them, so
        that nothing of the replaced extraction stays beside the new one. Without a journal, finding any of them
        is refused (their origin is unknown), unless ``restart`` or ``replace_other``."""
        self.dir = out_dir / STATE_DIR
        self.identity = json.loads(json.dumps({"format": FORMAT, **identity}))  # as state.json holds it
        self.done = np.zeros(num_entries, dtype=bool)
        self.skipped: dict[str, str] = {}
        self.units_bytes: dict[str, int] = {}
        state_path = self.dir / "state.json"
        previous = self._read_state(state_path)
        if previous is not None and previous != self.identity and not restart:
            changed = identity_differences(previous, self.identity)
            if replace_other:
                logger.info("%s held an extraction with other %s: starting over", out_dir, changed)
                restart = True
        if previous is not None and previous != self.identity and not restart:
            raise ValueError(
                f"{out_dir} holds an extraction with other {changed}; use another output folder, or "
                "restart (spidr extract --restart) to replace it"
            )
        found = sorted(path for pattern in outputs for path in out_dir.glob(pattern))
        if previous is None and found and not restart:
            if not replace_other:
                raise ValueError(
                    f"{out_dir} holds {', '.join(p.name for p in found[:4])}{' ...' if len(found) > 4 else ''} but "
                    f"no record of the extraction that wrote them ({STATE_DIR}/); use another output folder, or "
                    "restart (spidr extract --restart) to replace them"
                )
            logger.info("%s held features without the journal of the extraction that wrote them: starting over",
                        out_dir)
            restart = True
        if previous is None or restart:
            for path in found:  # what the replaced extraction wrote: never left beside the new one
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            write_atomically(state_path, json.dumps(self.identity, indent=1) + "\n")
        else:
            self._replay()
        self._handle: IO[str] = (self.dir / "journal.jsonl").open("a", encoding="utf-8")

    @staticmethod
    def _read_state(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}

    def _replay(self) -> None:
        path = self.dir / "journal.jsonl"
        if not path.is_file():
            return
        good, last = 0, b""
        with path.open("rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # the torn last line of a killed run: its batch is redone
                self.done[np.asarray(record["done"], dtype=np.int64)] = True
                self.skipped.update(record["skipped"])
                self.units_bytes = record["units_bytes"]
                good, last = good + len(line), line
        with path.open("r+b") as handle:
            handle.truncate(good)
            if last and not last.endswith(b"\n"):  # complete, but killed before its newline
                handle.seek(good)
                handle.write(b"\n")
        logger.info("resuming: %d of %d utterances already extracted", int(self.done.sum()), self.done.size)

    def record(self, indices: np.ndarray, skipped: Mapping[str, str], units_bytes: Mapping[str, int]) -> None:
        """Journal a finished batch (call after its files are in place and its unit rows flushed)."""
        self.done[indices] = True
        self.skipped.update(skipped)
        self.units_bytes = dict(units_bytes)
        line = {"done": np.asarray(indices).tolist(), "skipped": dict(skipped), "units_bytes": self.units_bytes}
        self._handle.write(json.dumps(line) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class UnitsFiles:
    """``OUT/codebook_units/layer_LL.jsonl`` files, appended batch by batch, cut back to the journaled sizes."""

    def __init__(self, folder: Path, journaled: Mapping[str, int]) -> None:
        self.folder = folder
        self.handles: dict[str, IO[str]] = {}
        folder.mkdir(parents=True, exist_ok=True)
        missing = sorted(key for key, size in journaled.items() if size and not (folder / f"{key}.jsonl").is_file())
        if missing:
            raise ValueError(f"{folder}: the units of {', '.join(missing)} are journaled but missing; restart the "
                             "extraction (spidr extract --restart)")
        for path in folder.glob("layer_*.jsonl"):
            size = journaled.get(path.stem, 0)
            if path.stat().st_size < size:
                raise ValueError(f"{path} is shorter ({path.stat().st_size} bytes) than its journal says ({size}): "
                                 "the extraction state is inconsistent; restart it (spidr extract --restart)")
            with path.open("r+b") as handle:
                handle.truncate(size)

    def append(self, key: str, rows: list[str]) -> None:
        handle = self.handles.get(key)
        if handle is None:
            handle = self.handles[key] = (self.folder / f"{key}.jsonl").open("a", encoding="utf-8")
        handle.write("".join(rows))

    def sizes(self) -> dict[str, int]:
        """Flush and return every file's size (what the journal records)."""
        for handle in self.handles.values():
            handle.flush()
        return {path.stem: path.stat().st_size for path in sorted(self.folder.glob("layer_*.jsonl"))}

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
