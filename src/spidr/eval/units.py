"""Discrete-unit files: one JSON object per utterance, ``{"name": ..., "units": [...]}``.

This is the layout of SpidR's shipped unit files (``name`` = LibriSpeech utterance id) and, with ``audio`` instead of
``name``, the one fastabx's ``Dataset.from_item_and_units`` reads (the key is then the audio file's stem). Reading
accepts either key and ``.gz`` files; writing uses ``name`` (pass ``audio_key="name"`` to fastabx).

Units are at the model's frame rate (50 Hz) unless written deduplicated, in which case consecutive repeats are
collapsed and the time alignment is lost (fine for a unit language model, not for ABX or unit quality). Such rows
carry ``"dedup": true``, so that readers needing the frame rate (ABX, PNMI, an LM trained on frame-rate units) refuse
them instead of reading them as if they had it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from spidr.atomic_files import replaced_when_done
from spidr.input_files import existing_file
from spidr.text_files import first_non_utf8_line


def open_text(path: str | Path, mode: str = "r") -> IO[str]:
    """Open a text file, gzip-compressed when its name ends in ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")
    return path.open(mode, encoding="utf-8")


def utterance_key(row: Mapping[str, object], *, where: str) -> str:
    """The utterance a JSONL row describes: its ``name``, else the stem of its ``audio`` path."""
    if "name" in row:
        return str(row["name"])
    if "audio" in row:
        return Path(str(row["audio"])).stem
    raise ValueError(f"{where}: row has neither a 'name' nor an 'audio' key (keys: {sorted(row)})")


def read_jsonl_rows(path: str | Path, *, field: str | tuple[str, ...], key: Callable[[str], str] = str,
                    refuse_deduplicated: str | None = None) -> Iterator[tuple[str, str, str, list]]:
    """``(utterance, where, found, row[found])`` for every row of a JSONL file keyed by ``name`` or ``audio``
    (``.gz`` read transparently), ``found`` being the first of the ``field`` names the row holds as a list;
    ``where`` names the file and line for error messages. ``key`` maps the row's name to the utterance key (e.g. to
    a file stem). Refuses bad JSON, rows without such a list and repeated utterances; with ``refuse_deduplicated``
    (why the reader needs frame-rate units), also rows written deduplicated (``"dedup": true``)."""
    for name, where, found, values, _ in read_jsonl_rows_with_lines(path, field=field, key=key,
                                                                    refuse_deduplicated=refuse_deduplicated):
        yield name, where, found, values


MAX_LINE_CHARS = 1 << 26  # a row of about 20M units (110 h at 50 Hz); parsed, a line takes about 14x its size


def numbered_lines(handle: IO[str], path: str | Path, *,
                   expected: str = "a JSONL file of units or frame labels") -> Iterator[tuple[int, str]]:
    """``enumerate(handle, start=1)``, with a file that is not UTF-8 text (audio given by mistake) named, and a line
    longer than ``MAX_LINE_CHARS`` refused before it is read whole (a 97 kB gzipped line took 1.7 GB to parse)."""
    number = 0
    try:
        while line := handle.readline(MAX_LINE_CHARS + 2):  # (room for the line's end, "\r\n")
            number += 1
            if len(line) > MAX_LINE_CHARS and len(line.rstrip("\r\n")) > MAX_LINE_CHARS:
                raise ValueError(f"{path}: line {number} is longer than {MAX_LINE_CHARS:,} characters, far beyond "
                                 f"any utterance's: expected {expected}")
            yield number, line
    except UnicodeDecodeError as error:
        found = first_non_utf8_line(path)  # (the text reader decodes ahead of the line it returns)
        where = f"line {found[0]}" if found else f"line {number + 1} or after"
        raise ValueError(f"{path}: {where} is not UTF-8 text ({error.reason}): expected {expected}") from None


def read_jsonl_rows_with_lines(path: str | Path, *, field: str | tuple[str, ...], key: Callable[[str], str] = str,
                               refuse_deduplicated: str | None = None) -> Iterator[tuple[str, str, str, list, str]]:
    """:func:`read_jsonl_rows` plus the raw line (lets :func:`holds_only_integers` skip a per-value type check)."""
    fields = (field,) if isinstance(field, str) else field
    seen: set[str] = set()
    with open_text(path) as handle:
        for number, line in numbered_lines(handle, path):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON ({error})") from None
            present = [f for f in fields if isinstance(row, dict) and isinstance(row.get(f), list)]
            if not present:
                raise ValueError(f"{where}: expected an object with a {' or '.join(map(repr, fields))} list")
            if len(present) > 1:  # units and phones in one row: which one the reader wants cannot be told
                raise ValueError(f"{where}: the row holds both {' and '.join(map(repr, present))}; give one per row")
            found = present[0]
            name = key(utterance_key(row, where=where))
            if name in seen:
                raise ValueError(f"{where}: utterance {name!r} appears twice")
            if refuse_deduplicated and row.get("dedup") is True:
                raise ValueError(f"{where}: the units of {name!r} were written deduplicated (spidr units --dedup: "
                                 f"repeats collapsed, no frame rate left); {refuse_deduplicated}")
            seen.add(name)
            yield name, where, found, row[found], line


FRAME_RATE_NEEDED = "ABX and unit quality compare units with frames: write the units without --dedup"


def holds_only_integers(values: list, array: np.ndarray, line: str) -> bool:
    """Whether a JSONL row's ``values`` list (``array`` = ``np.asarray(values)``) holds JSON integers only. numpy
    reads ``[1, true]`` as integers, so the values are checked one by one, but only when the row's text ``line``
    holds ``true`` or ``false``."""
    if array.size and array.dtype.kind not in "iu":
        return False
    return not (("true" in line or "false" in line) and any(type(u) is bool for u in values))


def read_units(path: str | Path) -> dict[str, np.ndarray]:
    """``{utterance: int32 array of units}`` at the model's frame rate from a units JSONL file (``.gz`` read
    transparently); deduplicated rows are refused.

    Each row's list becomes an array in one numpy call; a row is checked element by element only when its text
    holds ``true`` or ``false`` (a JSON boolean would otherwise pass as an integer).
    """
    from spidr.eval.feature_dir import refuse_unfinished_extraction

    path = Path(path)
    existing_file(path, "units file")
    refuse_unfinished_extraction(path)
    units: dict[str, np.ndarray] = {}
    for key, where, _, values, line in read_jsonl_rows_with_lines(path, field="units",
                                                                  refuse_deduplicated=FRAME_RATE_NEEDED):
        array = np.asarray(values)
        if not holds_only_integers(values, array, line):
            raise ValueError(f"{where}: 'units' of {key!r} must be a list of integers")
        if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{where}: 'units' of {key!r} do not fit in 32 bits")
        units[key] = array.astype(np.int32)
    if not units:
        raise ValueError(f"units file {path} has no utterance")
    return units


def unit_ids(values: object, what: str) -> np.ndarray:
    """``values`` (a sequence, array or tensor of unit ids) as int64, refusing ids that are not whole numbers: a
    float id (1.7, NaN) was cut to an integer silently, so metrics counted a unit the caller never gave. ``what``
    names the sequence in the message (``utterance 'x'``)."""
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if array.dtype.kind in "iub":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "f":
        whole = np.isfinite(array) & (array == np.round(array)) if array.size else np.ones(0, dtype=bool)
        if whole.all():
            return array.astype(np.int64)
        raise ValueError(f"{what}: unit ids must be whole numbers, found {array[~whole][0].item()!r} (dtype "
                         f"{array.dtype})")
    raise ValueError(f"{what}: expected unit ids (integers), got an array of dtype {array.dtype}")


def deduplicate(units: Sequence[int] | np.ndarray) -> np.ndarray:
    """Collapse runs of repeated units: ``[3, 3, 5, 5, 5, 3] → [3, 5, 3]``."""
    array = np.asarray(units)
    if array.size == 0:
        return array
    keep = np.ones(array.size, dtype=bool)
    keep[1:] = array[1:] != array[:-1]
    return array[keep]


def _writable_units(name: object, values: Sequence[int] | np.ndarray) -> np.ndarray:
    """One utterance's units as (T,) int64, refusing what the readers would refuse or read otherwise: a name that is
    not a string, ids that are not whole numbers (1.7 was written as 1), negative ids (and uint64 ids past int64,
    which wrapped to negative ones), anything but one sequence."""
    if not isinstance(name, str):
        raise ValueError(f"utterance name {name!r} is a {type(name).__name__}, not a string")
    raw = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if raw.dtype.kind == "u" and raw.size and int(raw.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"utterance {name!r}: unit id {int(raw.max())} does not fit in 64 bits")
    array = unit_ids(raw, f"utterance {name!r}")
    if array.ndim != 1:
        raise ValueError(f"utterance {name!r}: expected a 1-D sequence of unit ids, got shape {array.shape}")
    if array.size and int(array.min()) < 0:
        raise ValueError(f"utterance {name!r}: unit ids must be non-negative, found {int(array.min())}")
    return array


@contextlib.contextmanager
def _gzip_text(partial: Path, path: Path) -> Iterator[IO[str]]:
    """A gzip text file written to ``partial`` whose header names ``path`` and no time: gzip.open would record the
    temporary's name (which ``gunzip -N`` restores, and a later sweep deletes as a killed writer's) and the time
    (the same units, other bytes)."""
    with partial.open("wb") as raw, gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, mtime=0) as packed, \
            io.TextIOWrapper(packed, encoding="utf-8") as text:
        yield text


def write_units(
    path: str | Path,
    units: Mapping[str, Sequence[int] | np.ndarray] | Iterable[tuple[str, np.ndarray]],
    *,
    dedup: bool = False,
    before_rename: Callable[[Path, int], None] | None = None,
) -> int:
    """Write ``{"name": utterance, "units": [...]}`` rows (gzip when ``path`` ends in ``.gz``), with ``"dedup": true``
    when ``dedup``; returns the count.

    ``units`` may be computed as it is read (``spidr units`` assigns file by file), so the rows go to a temporary file
    beside ``path``, renamed to ``path`` once all are written: a failure partway leaves no truncated file, and an
    earlier ``path`` stays as it was. ``before_rename(complete temporary file, count)`` runs just before the rename
    (``spidr units`` records the file there: a kill can then leave a record without its units file, which a rerun
    rewrites, but no units file without its record, which a rerun refused as existing).
    """
    path = Path(path)
    items = units.items() if isinstance(units, Mapping) else units
    count = 0
    with replaced_when_done(path) as partial:
        with (_gzip_text(partial, path) if path.suffix == ".gz" else partial.open("w", encoding="utf-8")) as handle:
            for name, values in items:
                array = _writable_units(name, values)
                array = deduplicate(array) if dedup else array
                row = {"name": name, "units": array.tolist(), **({"dedup": True} if dedup else {})}
                handle.write(json.dumps(row) + "\n")
                count += 1
        if before_rename is not None:
            before_rename(partial, count)
    return count
