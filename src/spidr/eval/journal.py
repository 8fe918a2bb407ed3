"""Resumable extraction: what an output folder holds, and which utterances are finished.

``OUT/.extract/state.json`` names what is being extracted (settings, a fingerprint of the model and one of the
utterance list); ``OUT/.extract/journal.jsonl`` gets one line per finished batch, written after that batch's
``.npy`` files were renamed into place and its unit rows flushed::

    {"done": [manifest indices], "skipped": {location: reason}, "units_bytes": {"layer_05": size, ...}}

A restarted extraction skips every journaled utterance (its files are never rewritten) and truncates each units
file to the size the last complete journal line recorded, so rows of a batch that was cut short disappear with it
and that batch is redone. A torn last line (the process was killed while writing it) is ignored.

``audio_stamps.npy`` beside the journal holds the size and modification time of the audio file of each utterance
it extracts: audio rewritten in place under the same names and lengths (which ``state.json`` cannot tell) is
refused, or extracted again, not topped up.

An extraction split into parts (``spidr.eval.shards``) keeps one journal and one set of units files per part in
``OUT/.extract/shard-K-of-N/``; the part that finishes last joins the units files into ``OUT/codebook_units/`` and
``OUT/kmeans_units/`` (``join_part_units``) and writes ``metadata.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from spidr.atomic_files import replaced_when_done, save_npy, write_atomically
from spidr.data.manifest import ITER_CHUNK, Manifest
from spidr.eval.shards import WHOLE, Shard, every_part
from spidr.folder_lock import LOCK_NAME, folder_lock, lock_holder

logger = logging.getLogger(__name__)

STATE_DIR = ".extract"
FORMAT = 1
STAMPS_FILE = "audio_stamps.npy"  # in each journal's folder: the audio stamps of the utterances it extracts
NOT_THIS_PART = -2  # the stamps of the rows another part extracts


# What a changed fingerprint means (the fingerprints themselves tell a user nothing)
_FINGERPRINTS = {"model": "a model with other weights or config", "utterances": "another list of utterances",
                 "benchmark": "a benchmark made again: its info.json differs",
                 "audio": "audio files of other sizes or modification times"}


def identity_differences(previous: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """What differs between two extraction identities (``state.json``), in words: each changed entry by name,
    a changed setting with its two values, and an entry the earlier one lacks as the work of an older spidr."""
    parts = []
    changed = sorted(k for k in {*previous, *current} if previous.get(k) != current.get(k))
    if any(k in current for k in changed):  # an entry only the earlier one holds follows from the others' changes
        changed = [k for k in changed if k in current]
    codebooks_changed = (previous.get("settings", {}).get("codebooks") != current.get("settings", {}).get("codebooks"))
    for key in changed:
        old, new = previous.get(key), current.get(key)
        if key == "parts":  # (absent: one process extracts the whole)
            parts.append(f"parts ({old or 1} → {new or 1}: each part's share depends on their number)")
        elif key == "kmeans":  # (absent: no k-means units; else layer → centroids fingerprint)
            old, new = old or {}, new or {}
            layers = [f"layer {int(layer)}: {'centroids' if layer in old else 'none'} → "
                      f"{'none' if layer not in new else 'other centroids' if layer in old else 'centroids'}"
                      for layer in sorted({*old, *new}) if old.get(layer) != new.get(layer)]
            parts.append(f"k-means units ({'; '.join(layers)})")
        elif key == "unit_rows" and codebooks_changed:  # (recorded with codebook units: told by the settings)
            continue
        elif key not in previous:
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
    return _tensors_digest(digest, model.state_dict().items())


# The modules whose weights compute a model's layer features (``get_intermediate_outputs``), named alike in a full
# SpidR / DinoSR and in its exported student (``spidr.models.student``), and the settings that shape that computation
# (the others train: dropout, codebooks, schedules); a few leave no trace in the tensors' shapes (the heads).
FEATURE_MODULES = ("feature_extractor.", "feature_projection.", "student.")
FEATURE_SETTINGS = ("extractor_type", "extractor_mode", "extractor_conv_bias", "extractor_conv_layer_config",
                    "encoder_embed_dim", "encoder_pos_conv_kernel", "encoder_pos_conv_groups",
                    "encoder_pos_conv_depth", "encoder_num_layers", "encoder_num_heads", "encoder_ff_interm_features",
                    "encoder_layer_norm_first", "encoder_qkv_bias")


def features_fingerprint(model: torch.nn.Module) -> str:
    """SHA-1 of what computes the model's layer features (the front end's, projection's and encoder's tensors and
    ``FEATURE_SETTINGS``): the same for a checkpoint and for its exported student, which give the same features;
    another for another model's, or for the same weights in another precision or architecture."""
    settings = {name: getattr(model.cfg, name) for name in FEATURE_SETTINGS}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
    tensors = [(name, tensor) for name, tensor in model.state_dict().items() if name.startswith(FEATURE_MODULES)]
    return _tensors_digest(digest, tensors)


def codebook_units_source(model: torch.nn.Module) -> str:
    """``"codebook:<sha1>"``: what a units file's record names as the source of a model's codebook units (the
    argmax of its prediction heads), from the features' fingerprint and the heads' tensors, so that another model's
    codebook units (a random-init one's, say) are told apart."""
    # (the type too: SpidR's heads read their own layers, DinoSR's the last, so the same weights give other units)
    digest = hashlib.sha1(f"{features_fingerprint(model)}:{model.cfg.model_type}".encode())
    return "codebook:" + _tensors_digest(digest, [(name, tensor) for name, tensor in model.state_dict().items()
                                                  if name.startswith("heads.")])


def _tensors_digest(digest: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    for name, tensor in tensors:
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


def audio_stamps(manifest: Manifest, rows: np.ndarray | None = None) -> np.ndarray:
    """(N, 2) int64: the size and modification time (whole seconds, as tar and every copy that keeps times keep it)
    of the audio file of each utterance (an archive's, for its members; −1 for a file that cannot be found, whose
    utterance is skipped as unreadable); ``rows`` (N,) bool: only these (``NOT_THIS_PART`` elsewhere)."""
    stamps = np.full((len(manifest), 2), NOT_THIS_PART, dtype=np.int64)
    archives: dict[str, tuple[int, int]] = {}

    def stamp(path: str) -> tuple[int, int]:
        try:
            status = os.stat(path)
        except OSError:
            return -1, -1
        return status.st_size, status.st_mtime_ns // 1_000_000_000

    for start in range(0, len(manifest), ITER_CHUNK):
        stop = min(start + ITER_CHUNK, len(manifest))
        wanted = range(start, stop) if rows is None else start + np.flatnonzero(rows[start:stop])
        if manifest.archive_index is None:
            paths = manifest.paths.strings(start, stop)
            for index in wanted:
                stamps[index] = stamp(manifest.resolve(paths[index - start]))
        else:
            for index in wanted:
                entry = manifest[int(index)]
                if entry.archive is not None and entry.archive not in archives:  # (one stat per archive)
                    archives[entry.archive] = stamp(entry.archive)
                stamps[index] = stamp(entry.path) if entry.archive is None else archives[entry.archive]
    return stamps


def audio_changes(recorded: np.ndarray, current: np.ndarray, locate: Callable[[int], str]) -> str:
    """The files whose stamps (``audio_stamps``) differ, in words: the first one's location (``locate(index)``) and
    how, and how many others; "" if none."""
    changed = np.flatnonzero((recorded != current).any(axis=1))
    if not changed.size:
        return ""
    first = int(changed[0])
    how = ("missing then, present now" if recorded[first, 0] == -1 else "missing now" if current[first, 0] == -1
           else "size or modification time")
    return f"{locate(first)} ({how})" + (f" and {changed.size - 1} other file(s)" if changed.size > 1 else "")


def recorded_stamps(journal_dir: Path) -> np.ndarray | None:
    """The audio stamps a journal (``journal_dir``: ``OUT/.extract`` or a part's folder in it) recorded, or None."""
    try:
        return np.load(journal_dir / STAMPS_FILE, allow_pickle=False)
    except (OSError, ValueError):
        return None


def changed_audio(journal_dir: Path, stamps: np.ndarray, locate: Callable[[int], str]) -> str:
    """``audio_changes`` since the stamps recorded in ``journal_dir`` ("" where it recorded none)."""
    recorded = recorded_stamps(journal_dir)
    if recorded is None or recorded.shape != stamps.shape:
        return ""
    return audio_changes(recorded, stamps, locate)


def changed_audio_error(out_dir: Path, changed: str) -> ValueError:
    return ValueError(f"{out_dir} holds an extraction of audio files changed since: {changed}, as their sizes and "
                      "modification times tell (a copy keeps the times with cp -p, rsync -a or tar); use another "
                      "output folder, or restart (spidr extract --restart) to extract them again")


def recorded_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` as ``state.json`` holds it (JSON types: tuples as lists)."""
    return json.loads(json.dumps({"format": FORMAT, **identity}))


@dataclasses.dataclass
class JournalState:
    """What a journal records: the finished utterances, the files skipped, and each units file's journaled size."""

    done: np.ndarray  # (N,) bool
    skipped: dict[str, str]
    units_bytes: dict[str, int]


def read_journal(path: Path, num_entries: int) -> tuple[JournalState, int, bool]:
    """The state ``path`` records over ``num_entries`` utterances, the byte length of its complete lines, and whether
    the last of them lacks its newline (killed between the two). A torn last line is ignored."""
    state = JournalState(np.zeros(num_entries, dtype=bool), {}, {})
    good, last = 0, b""
    if path.is_file():
        with path.open("rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # the torn last line of a killed run: its batch is redone
                state.done[np.asarray(record["done"], dtype=np.int64)] = True
                state.skipped.update(record["skipped"])
                state.units_bytes = record["units_bytes"]
                good, last = good + len(line), line
    return state, good, bool(last) and not last.endswith(b"\n")


def _restart_replaces_all(out_dir: Path, shard: Shard) -> bool:
    """Whether a restart of ``shard`` starts the whole extraction into ``out_dir`` over: without parts, or where the
    extraction was finished (its parts' unit rows are merged: no part of it can start over alone)."""
    if shard.is_whole:
        return True
    if not (out_dir / "metadata.json").is_file():
        return False
    logger.warning("%s holds a finished extraction: --restart with part %s starts the whole extraction over, every "
                   "part included", out_dir, shard)
    return True


class ExtractionJournal:
    """The state of one output folder, or of one part of it (``spidr.eval.shards``); see the module docstring."""

    def __init__(self, out_dir: Path, identity: Mapping[str, Any], *, num_entries: int, restart: bool,
                 replace_other: bool = False, outputs: Sequence[str] = (), shard: Shard = WHOLE,
                 stamps: np.ndarray | None = None, locate: Callable[[int], str] | None = None) -> None:
        """``stamps``: the ``audio_stamps`` of the utterances this journal extracts, recorded in ``STAMPS_FILE``: where
        they differ from those recorded, the extraction (of a part: that part) is refused, naming the first changed
        file (``locate(index)``), unless ``restart`` or ``replace_other``, which start it over. Each part compares its
        own files: parts on machines that each hold their own copy of the audio do not disagree.

        ``outputs``: glob patterns (in ``out_dir``) of what an extraction writes; starting over deletes them, so
        that nothing of the replaced extraction stays beside the new one. Without a journal, finding any of them
        is refused (their origin is unknown), unless ``restart`` or ``replace_other``.

        ``shard``: the part this process extracts. Its journal and unit rows live in ``.extract/shard-K-of-N/``, and
        ``restart`` starts only that part over, unless the folder holds a finished extraction or another one: then
        everything is replaced, as without parts. Nothing is removed while another process works in the folder
        (each holds its part's lock, asked first). Call under the folder's own lock (``spidr.folder_lock``), which
        every process takes for this set-up, so that two parts started together do not both start the folder over.
        This process holds its part's lock from here to ``close``: a second one on the same part is refused."""
        self.dir = out_dir / STATE_DIR
        self.part_dir = self.dir if shard.is_whole else self.dir / shard.folder_name
        self.identity = recorded_identity(identity)
        previous = self._read_state(self.dir / "state.json")
        replace_all = previous is None or (restart and _restart_replaces_all(out_dir, shard))
        if previous is not None and previous != self.identity and not (restart or replace_other):
            raise ValueError(
                f"{out_dir} holds an extraction with other {identity_differences(previous, self.identity)}; use "
                "another output folder, or restart (spidr extract --restart) to replace it"
            )
        if previous is not None and previous != self.identity:
            logger.info("%s held an extraction with other %s: starting over", out_dir,
                        identity_differences(previous, self.identity))
            replace_all = True
        changed = "" if replace_all or stamps is None else changed_audio(self.part_dir, stamps, locate or str)
        if changed and not (restart or replace_other):
            raise changed_audio_error(out_dir, changed)
        if changed:
            logger.info("%s: audio files changed since (%s): starting over", out_dir, changed)
            replace_all = replace_all or shard.is_whole  # (a part: that part alone, below)
            restart = True
        found = sorted(path for pattern in outputs for path in out_dir.glob(pattern))
        if previous is None and found and not (restart or replace_other):
            raise ValueError(
                f"{out_dir} holds {', '.join(p.name for p in found[:4])}{' ...' if len(found) > 4 else ''} but "
                f"no record of the extraction that wrote them ({STATE_DIR}/); use another output folder, or "
                "restart (spidr extract --restart) to replace them"
            )
        if previous is None and found and not restart:
            logger.info("%s held features without the journal of the extraction that wrote them: starting over",
                        out_dir)
        if replace_all:
            self._start_over(out_dir, found)
        what = f"an extraction into {out_dir}" if shard.is_whole else f"part {shard} of the extraction into {out_dir}"
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(folder_lock(self.part_dir, what))
        try:
            if restart and not replace_all:  # this part alone starts over
                for path in (self.part_dir / "journal.jsonl", *units_files(self.part_dir).values()):
                    path.unlink(missing_ok=True)
            if stamps is not None:  # (recorded now too where a spidr that did not record them began the folder)
                self._record_stamps(stamps)
            state, good, unterminated = read_journal(self.part_dir / "journal.jsonl", num_entries)
            self.done, self.skipped, self.units_bytes = state.done, state.skipped, state.units_bytes
            if (self.part_dir / "journal.jsonl").is_file():
                self._cut_journal(good, unterminated=unterminated)
            self._handle: IO[str] = (self.part_dir / "journal.jsonl").open("a", encoding="utf-8")
        except BaseException:
            self._lock.close()
            raise

    def _start_over(self, out_dir: Path, found: Sequence[Path]) -> None:
        """Remove the extraction's outputs ``found`` and its journals, unless a process still works in the folder,
        and record the new identity."""
        self._refuse_running_parts(out_dir)
        # First what makes the folder look finished or resumable: a kill below leaves a folder of unknown origin
        (self.dir / "state.json").unlink(missing_ok=True)
        (out_dir / "metadata.json").unlink(missing_ok=True)
        remove_paths([*found, self.dir])  # what the replaced extraction wrote: never left beside the new one
        self.dir.mkdir(parents=True)
        write_atomically(self.dir / "state.json", json.dumps(self.identity, indent=1) + "\n")

    def _record_stamps(self, stamps: np.ndarray) -> None:
        recorded = recorded_stamps(self.part_dir)
        if recorded is None or not np.array_equal(recorded, stamps):
            with replaced_when_done(self.part_dir / STAMPS_FILE) as partial, partial.open("wb") as handle:
                save_npy(handle, stamps)

    def _refuse_running_parts(self, out_dir: Path) -> None:
        """Raise ``ValueError`` if a process works in this folder (the whole extraction, or one of its parts)."""
        for folder in (self.dir, *sorted(self.dir.glob("shard-*"))):
            holder = lock_holder(folder)
            if holder is not None:
                what = "an extraction" if folder == self.dir else f"{folder.name} of the extraction"
                raise ValueError(f"{what} into {out_dir} is being run by {holder} ({folder / LOCK_NAME} is locked); "
                                 "let it finish or stop it, then run this again")

    @staticmethod
    def _read_state(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}

    def _cut_journal(self, good: int, *, unterminated: bool) -> None:
        """Cut a torn last line off, and end a complete one that lost its newline: the next line stays readable."""
        with (self.part_dir / "journal.jsonl").open("r+b") as handle:
            handle.truncate(good)
            if unterminated:
                handle.seek(good)
                handle.write(b"\n")
        if good:
            logger.info("resuming: %d utterances already extracted", int(self.done.sum()))

    def record(self, indices: np.ndarray, skipped: Mapping[str, str], units_bytes: Mapping[str, int]) -> None:
        """Journal a finished batch (call after its files are in place and its unit rows flushed)."""
        self.done[indices] = True
        self.skipped.update(skipped)
        self.units_bytes = dict(units_bytes)
        line = {"done": np.asarray(indices).tolist(), "skipped": dict(skipped), "units_bytes": self.units_bytes}
        self._handle.write(json.dumps(line) + "\n")
        self._handle.flush()

    def close(self) -> None:
        """Close the journal and release this part's lock."""
        try:
            self._handle.close()
        finally:
            self._lock.close()


# Unit rows by kind: codebook units are journaled as "layer_LL" (as before k-means units were), k-means ones as
# "kmeans_layer_LL"; each kind has its folder below the extraction (or below a part's journal folder).
UNIT_FOLDERS = {"": "codebook_units", "kmeans_": "kmeans_units"}


def remove_paths(paths: Iterable[Path]) -> None:
    """Remove each of ``paths``, a file or a folder with all it holds (one that is gone already: nothing)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def units_file(root: Path, key: str) -> Path:
    """Where the unit rows ``key`` live below ``root``: "layer_05" → ``root/codebook_units/layer_05.jsonl``,
    "kmeans_layer_06" → ``root/kmeans_units/layer_06.jsonl``."""
    prefix = "kmeans_" if key.startswith("kmeans_") else ""
    return root / UNIT_FOLDERS[prefix] / f"{key.removeprefix(prefix)}.jsonl"


def units_files(root: Path) -> dict[str, Path]:
    """The units files below ``root``, by key (``units_file``'s inverse)."""
    return {prefix + path.stem: path for prefix, folder in UNIT_FOLDERS.items()
            for path in sorted((root / folder).glob("layer_*.jsonl"))}


class UnitsFiles:
    """The units files below ``root`` (``units_file``), appended batch by batch, cut back to the journaled sizes."""

    def __init__(self, root: Path, journaled: Mapping[str, int]) -> None:
        self.root = root
        self.handles: dict[str, IO[str]] = {}
        missing = sorted(key for key, size in journaled.items() if size and not units_file(root, key).is_file())
        if missing:
            raise ValueError(f"{root}: the units of {', '.join(missing)} are journaled but missing; restart the "
                             "extraction (spidr extract --restart)")
        for key, path in units_files(root).items():
            size = journaled.get(key, 0)
            if path.stat().st_size < size:
                raise ValueError(f"{path} is shorter ({path.stat().st_size} bytes) than its journal says ({size}): "
                                 "the extraction state is inconsistent; restart it (spidr extract --restart)")
            with path.open("r+b") as handle:
                handle.truncate(size)

    def append(self, key: str, rows: list[str]) -> None:
        handle = self.handles.get(key)
        if handle is None:
            path = units_file(self.root, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.handles[key] = path.open("a", encoding="utf-8")
        handle.write("".join(rows))

    def sizes(self) -> dict[str, int]:
        """Flush and return every file's size (what the journal records)."""
        for handle in self.handles.values():
            handle.flush()
        return {key: path.stat().st_size for key, path in units_files(self.root).items()}

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def part_states(out_dir: Path, count: int, num_entries: int, *,
                part_of: np.ndarray | None = None) -> dict[Shard, JournalState]:
    """What the journal of each of the ``count`` parts records (a part not begun: nothing done).

    With ``part_of`` ((N,) part number of each utterance, ``spidr.eval.shards.part_numbers``), each state's ``done``
    holds only that part's utterances, in order: the memory of one (N,) array, not one per part (1,000 parts of a
    300k-file corpus held 300 MB)."""
    states = {}
    for part in every_part(count):
        state = read_journal(out_dir / STATE_DIR / part.folder_name / "journal.jsonl", num_entries)[0]
        if part_of is not None:
            state.done = state.done[part_of == part.index]
        states[part] = state
    return states


def join_part_units(out_dir: Path, parts: Mapping[Shard, JournalState]) -> None:
    """Each layer's unit rows of every part, in part order and each cut at its journaled size, into
    ``OUT/codebook_units/layer_LL.jsonl`` and ``OUT/kmeans_units/layer_LL.jsonl`` (written under a temporary name
    and renamed)."""
    keys = sorted({key for state in parts.values() for key, size in state.units_bytes.items() if size})
    for key in keys:
        target = units_file(out_dir, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with replaced_when_done(target) as partial, partial.open("wb") as handle:
            for part, state in parts.items():
                size = state.units_bytes.get(key, 0)
                source = units_file(out_dir / STATE_DIR / part.folder_name, key)
                if size and (not source.is_file() or source.stat().st_size < size):
                    raise ValueError(f"{source} is missing or shorter than its journal says ({size} bytes): restart "
                                     f"that part (spidr extract --shard {part} --restart)")
                if size:
                    with source.open("rb") as rows:
                        _copy_bytes(rows, handle, size)


def _copy_bytes(source: IO[bytes], target: IO[bytes], size: int, chunk: int = 1 << 22) -> None:
    while size > 0:
        block = source.read(min(chunk, size))
        if not block:
            raise ValueError(f"{source.name} ended {size} bytes before its journaled size")
        target.write(block)
        size -= len(block)


def remove_part_units(out_dir: Path, parts: Sequence[Shard]) -> None:
    """Delete the parts' units files once the extraction's own folders hold their rows (their journals stay)."""
    for part in parts:
        for path in units_files(out_dir / STATE_DIR / part.folder_name).values():
            path.unlink()
