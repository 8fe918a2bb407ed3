"""Manifests: which audio files a corpus holds and how long each is.

Three formats, chosen by the file suffix (spec §6.1):

* ``.csv`` with a header naming at least ``path`` and ``num_samples`` (written as ``fileid,path,num_samples``).
  An *archive* CSV adds ``archive,byte_offset,byte_size``: the audio is the byte range [offset, offset + size) of
  an uncompressed tar, read through a read-only memory map. ``path`` is then the member's name inside the tar.
* ``.tsv`` in the fairseq layout: the first line is the root directory, then one ``relpath<TAB>num_samples`` per
  line. It cannot describe archive members.
* ``.jsonl``: one JSON object per line with the same fields as the CSV, archive fields included.

``spidr.data.scanning`` lists a folder or tar of audio files (``scan``): what ``spidr manifest`` writes.

``read_manifest`` returns a columnar ``Manifest`` (numpy arrays, no Python object per row: a 281k-file LibriSpeech
manifest holds ≈ 30 MB and reads in well under a second); indexing it gives ``ManifestEntry`` objects.

``num_samples`` counts samples *at 16 kHz*: for a file at another rate it is the length after resampling, the length
``spidr.data.audio`` will actually return. Relative paths are resolved against the manifest's own folder.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from spidr.atomic_files import replaced_when_done
from spidr.data import SAMPLE_RATE
from spidr.input_files import existing_file
from spidr.text_files import CsvRows, utf8_errors_named

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")
_BASE_COLUMNS = ("fileid", "path", "num_samples")
_ARCHIVE_COLUMNS = ("archive", "byte_offset", "byte_size")
_NEEDS_QUOTES = re.compile(r'[,"\r\n]')
ITER_CHUNK = 65536  # rows decoded at a time when iterating a manifest or writing one


@dataclass(frozen=True)
class ManifestEntry:
    """One utterance: a file on disk, or the byte range of a member of an uncompressed tar."""

    fileid: str
    path: str  # a file path, or the member name inside ``archive``
    num_samples: int  # at 16 kHz
    archive: str | None = None
    byte_offset: int | None = None
    byte_size: int | None = None

    @property
    def in_archive(self) -> bool:
        return self.archive is not None

    @property
    def location(self) -> str:
        """Where the audio lives, for messages: ``path`` or ``archive:path``."""
        return f"{self.archive}:{self.path}" if self.in_archive else self.path


def resampled_length(num_samples: int, sample_rate: int) -> int:
    """Length of ``num_samples`` samples at ``sample_rate`` after soxr resampling to 16 kHz (round half up)."""
    if sample_rate == SAMPLE_RATE:
        return num_samples
    return (2 * num_samples * SAMPLE_RATE + sample_rate) // (2 * sample_rate)


# --------------------------------------------------------------------------------------------------------------
# The columnar manifest
# --------------------------------------------------------------------------------------------------------------


class PackedStrings(Sequence[str]):
    """Many strings as one UTF-8 byte array and their offsets: two numpy arrays instead of one Python object per
    string, so a 281k-file corpus costs two allocations (and DataLoader workers forked from the parent never copy
    it by touching reference counts)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data = data  # (total bytes,) uint8
        self.offsets = offsets  # (len + 1,) int64

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> PackedStrings:
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    @classmethod
    def concatenate(cls, parts: Sequence[PackedStrings]) -> PackedStrings:
        if not parts:
            return cls(np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64))
        sizes = np.cumsum([0] + [p.data.size for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + size for p, size in zip(parts, sizes,
                                                                                                     strict=True)])
        return cls(np.concatenate([p.data for p in parts]), offsets)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.data[self.offsets[index] : self.offsets[index + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), ITER_CHUNK):
            yield from self.strings(start, min(start + ITER_CHUNK, len(self)))

    def strings(self, start: int = 0, stop: int | None = None) -> list[str]:
        """Strings ``start..stop`` as a list, decoded in one go when they are ASCII (the common case)."""
        stop = len(self) if stop is None else stop
        offsets = self.offsets[start : stop + 1]
        block = self.data[offsets[0] : offsets[-1]]
        if block.size and int(block.max()) >= 128:
            return [self[i] for i in range(start, stop)]
        text = block.tobytes().decode("ascii")
        bounds = (offsets - offsets[0]).tolist()
        return [text[a:b] for a, b in itertools.pairwise(bounds)]

    def take(self, indices: np.ndarray) -> PackedStrings:
        """The strings at ``indices``, packed."""
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        lengths = ends - starts
        offsets = np.zeros(indices.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        shifts = np.repeat(starts - offsets[:-1], lengths)
        return PackedStrings(self.data[shifts + np.arange(int(offsets[-1]))], offsets)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes


class Manifest(Sequence[ManifestEntry]):
    """A corpus as columns: ``num_samples`` (N,) int64 and the file ids, paths and archive fields packed in numpy
    arrays; ``manifest[i]`` builds the ``ManifestEntry`` of row i on demand.

    ``paths`` hold each row's path as written; a relative one resolves against ``base`` (the manifest's folder, or
    a fairseq TSV's root) when an entry is built. Memory is about (bytes of the paths and ids) + 8 bytes per row
    per numeric column, whatever the number of rows.
    """

    def __init__(
        self,
        *,
        fileids: PackedStrings,
        paths: PackedStrings,
        num_samples: np.ndarray,
        base: str = "",
        archives: tuple[str, ...] = (),
        archive_index: np.ndarray | None = None,
        byte_offset: np.ndarray | None = None,
        byte_size: np.ndarray | None = None,
        source: str = "<manifest>",
    ) -> None:
        self.fileids = fileids
        self.paths = paths
        self.num_samples = np.asarray(num_samples, dtype=np.int64)
        self.base = base
        self._base = str(Path(base)) if base else ""  # normalised as pathlib would, for resolve()
        self.archives = archives  # distinct archive paths, resolved; archive_index[i] = −1 for a plain file
        self.archive_index = archive_index
        self.byte_offset = byte_offset
        self.byte_size = byte_size
        self.source = source

    @classmethod
    def from_entries(cls, entries: Iterable[ManifestEntry], *, source: str = "<entries>") -> Manifest:
        builder = ManifestBuilder(base="", source=source)
        for e in entries:
            builder.append(e.fileid, e.path, e.num_samples, archive=e.archive, byte_offset=e.byte_offset,
                           byte_size=e.byte_size)
        return builder.build()

    def __len__(self) -> int:
        return self.num_samples.size

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"manifest index {index} out of range for {len(self)} entries")
        path = self.paths[index]
        archive = None if self.archive_index is None or self.archive_index[index] < 0 else \
            self.archives[self.archive_index[index]]
        if archive is not None:
            return ManifestEntry(self.fileids[index], path, int(self.num_samples[index]), archive,
                                 int(self.byte_offset[index]), int(self.byte_size[index]))
        return ManifestEntry(self.fileids[index], self.resolve(path), int(self.num_samples[index]))

    def resolve(self, path: str) -> str:
        """A row's path as an entry holds it: relative paths joined to ``base`` as pathlib joins them."""
        if not self.base or path.startswith("/"):
            return path
        if "./" in path or "//" in path or path.endswith("/") or path in (".", ".."):
            return str(Path(self.base) / path)
        return f"{self._base}/{path}" if self._base != "/" else f"/{path}"

    def __iter__(self) -> Iterator[ManifestEntry]:
        plain = self.archive_index is None
        for start in range(0, len(self), ITER_CHUNK):
            stop = min(start + ITER_CHUNK, len(self))
            if not plain:
                yield from (self[i] for i in range(start, stop))
                continue
            ids, paths = self.fileids.strings(start, stop), self.paths.strings(start, stop)
            lengths = self.num_samples[start:stop].tolist()
            resolve = self.resolve
            for fileid, path, length in zip(ids, paths, lengths, strict=True):
                yield ManifestEntry(fileid, resolve(path), length)

    def take(self, indices: np.ndarray) -> Manifest:
        """The rows at ``indices`` (a new manifest; columns are copied, not Python objects)."""
        indices = np.asarray(indices, dtype=np.int64)
        pick = (lambda column: None if column is None else column[indices])  # noqa: E731
        return Manifest(fileids=self.fileids.take(indices), paths=self.paths.take(indices),
                        num_samples=self.num_samples[indices], base=self.base, archives=self.archives,
                        archive_index=pick(self.archive_index), byte_offset=pick(self.byte_offset),
                        byte_size=pick(self.byte_size), source=self.source)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Manifest({len(self)} entries from {self.source})"

    @property
    def nbytes(self) -> int:
        """Memory held by the columns."""
        arrays = (self.num_samples, self.archive_index, self.byte_offset, self.byte_size)
        return self.fileids.nbytes + self.paths.nbytes + sum(a.nbytes for a in arrays if a is not None)


class ManifestBuilder:
    """Rows appended one by one, packed into columns every ``chunk`` rows (memory: one chunk of Python strings)."""

    def __init__(self, *, base: str | Path, source: str, chunk: int = 65536) -> None:
        self.base = str(base)
        self.source = source
        self.chunk = chunk
        self._ids: list[str] = []
        self._paths: list[str] = []
        self._lengths: list[int] = []
        self._archive: list[int] = []
        self._offset: list[int] = []
        self._size: list[int] = []
        self._archives: dict[str, int] = {}
        self._parts: list[tuple[PackedStrings, PackedStrings, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def append(self, fileid: str, path: str, num_samples: int, *, archive: str | None = None,
               byte_offset: int | None = None, byte_size: int | None = None) -> None:
        self._ids.append(fileid)
        self._paths.append(path)
        self._lengths.append(num_samples)
        if archive is None:
            self._archive.append(-1)
            self._offset.append(0)
            self._size.append(0)
        else:
            resolved = str(Path(self.base) / archive) if self.base and not os.path.isabs(archive) else archive
            self._archive.append(self._archives.setdefault(resolved, len(self._archives)))
            self._offset.append(int(byte_offset or 0))
            self._size.append(int(byte_size or 0))
        if len(self._ids) >= self.chunk:
            self._pack()

    def _pack(self) -> None:
        if self._ids:
            self._parts.append((PackedStrings.from_strings(self._ids), PackedStrings.from_strings(self._paths),
                                np.asarray(self._lengths, dtype=np.int64), np.asarray(self._archive, dtype=np.int32),
                                np.asarray(self._offset, dtype=np.int64), np.asarray(self._size, dtype=np.int64)))
        self._ids, self._paths, self._lengths, self._archive, self._offset, self._size = [], [], [], [], [], []

    def build(self) -> Manifest:
        self._pack()
        parts = self._parts
        if parts:
            columns = [np.concatenate([p[k] for p in parts]) for k in range(2, 6)]
        else:
            columns = [np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64),
                       np.zeros(0, dtype=np.int64)]
        archived = bool(self._archives)
        return Manifest(
            fileids=PackedStrings.concatenate([p[0] for p in parts]),
            paths=PackedStrings.concatenate([p[1] for p in parts]),
            num_samples=columns[0],
            base=self.base,
            archives=tuple(self._archives),
            archive_index=columns[1] if archived else None,
            byte_offset=columns[2] if archived else None,
            byte_size=columns[3] if archived else None,
            source=self.source,
        )


def repeated_strings(strings: PackedStrings) -> set[str]:
    """The strings that occur more than once, without a Python object per entry kept (a manifest may list
    millions): one 64-bit hash per string in an array, then only the strings whose hash repeats are compared."""
    hashes = np.empty(len(strings), dtype=np.int64)
    for start in range(0, len(strings), ITER_CHUNK):
        stop = min(start + ITER_CHUNK, len(strings))
        hashes[start:stop] = [hash(string) for string in strings.strings(start, stop)]
    values, counts = np.unique(hashes, return_counts=True)
    candidates = np.flatnonzero(np.isin(hashes, values[counts > 1]))
    seen: set[str] = set()
    shared: set[str] = set()
    for index in candidates.tolist():
        string = strings[index]
        (shared if string in seen else seen).add(string)
    return shared


def shared_fileids(entries: Manifest) -> dict[str, list[str]]:
    """File ids that several rows hold (the same file name in two folders, a name repeated in a tar), each with the
    locations of its rows."""
    repeated = repeated_strings(entries.fileids)
    shared: dict[str, list[str]] = {}
    if repeated:
        for entry in entries:
            if entry.fileid in repeated:
                shared.setdefault(entry.fileid, []).append(entry.location)
    return shared


# --------------------------------------------------------------------------------------------------------------
# Archive members
# --------------------------------------------------------------------------------------------------------------

# One read-only descriptor per tar and process, read with os.pread (no shared file position, so forked loader
# workers may use an inherited one). Not a memory map: a tar truncated or replaced while mapped kills the process
# with SIGBUS at the next read of a page beyond its new end, where a read just comes back short.
_ARCHIVE_FILES: dict[str, int] = {}


def read_member(entry: ManifestEntry) -> bytes:
    """The bytes of an archive entry, read from its tar; OSError when the tar cannot be read or ends before it."""
    if entry.archive is None or entry.byte_offset is None or entry.byte_size is None:
        raise ValueError(f"{entry.path} is not an archive member")
    end, archive_size = entry.byte_offset + entry.byte_size, os.stat(entry.archive).st_size
    if end > archive_size:  # checked first: a manifest row claiming terabytes was a bare MemoryError
        raise OSError(f"byte range [{entry.byte_offset}, {end}) lies beyond the end of {entry.archive} "
                      f"({archive_size} bytes)")
    if hasattr(os, "pread"):
        descriptor = _ARCHIVE_FILES.get(entry.archive)
        if descriptor is None:  # (decoding threads may open it at once: one descriptor is kept, the others closed)
            opened = os.open(entry.archive, os.O_RDONLY | os.O_CLOEXEC)
            descriptor = _ARCHIVE_FILES.setdefault(entry.archive, opened)
            if descriptor != opened:
                os.close(opened)
        data = os.pread(descriptor, entry.byte_size, entry.byte_offset)
    else:  # Windows: no pread (nor fork, whose workers would share a file position); a file opened per read
        with open(entry.archive, "rb") as handle:
            handle.seek(entry.byte_offset)
            data = handle.read(entry.byte_size)
    if len(data) != entry.byte_size:  # (the archive shrank since)
        raise OSError(f"byte range [{entry.byte_offset}, {end}) lies beyond the end of {entry.archive} "
                      f"({os.stat(entry.archive).st_size} bytes)")
    return data


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


_MAX_INT_FIELD = 2**62  # int64 columns; far beyond any real length, offset or size


def _int_field(value: object, name: str, where: str, *, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}: {name} = {value!r} is not an integer") from None
    if number < minimum:
        raise ValueError(f"{where}: {name} = {number} must be >= {minimum}")
    if number > _MAX_INT_FIELD:
        raise ValueError(f"{where}: {name} = {number} is too large (at most {_MAX_INT_FIELD})")
    return number


def _add_record(builder: ManifestBuilder, record: dict[str, object], where: str) -> None:
    """Add a CSV row or JSON object (``path`` and ``num_samples`` required) to ``builder``."""
    for name in ("path", "num_samples"):
        if record.get(name) in (None, ""):
            raise ValueError(f"{where}: missing {name!r}")
    path = str(record["path"])
    num_samples = _int_field(record["num_samples"], "num_samples", where, minimum=0)
    fileid = str(record["fileid"]) if record.get("fileid") not in (None, "") else Path(path).stem
    present = [record.get(name) not in (None, "") for name in _ARCHIVE_COLUMNS]
    if not any(present):
        builder.append(fileid, path, num_samples)
        return
    if not all(present):
        raise ValueError(f"{where}: an archive entry needs all of {', '.join(_ARCHIVE_COLUMNS)}")
    builder.append(
        fileid,
        path,
        num_samples,
        archive=str(record["archive"]),
        byte_offset=_int_field(record["byte_offset"], "byte_offset", where, minimum=0),
        byte_size=_int_field(record["byte_size"], "byte_size", where, minimum=1),
    )


_PLAIN_HEADER = b"fileid,path,num_samples"
_BLOCK_BYTES = 1 << 25  # 32 MiB of CSV parsed at a time: temporaries stay bounded whatever the manifest size


def _read_plain_csv(path: Path) -> Manifest | None:
    """The common ``fileid,path,num_samples`` CSV parsed with numpy, block by block, without a Python object per
    row; None when the file holds anything else (quotes, other columns, an empty id, a non-digit length...): the
    csv module then reads it, and names the line of any error."""
    parts = []
    with path.open("rb") as handle:
        head = handle.readline().removeprefix(codecs.BOM_UTF8)  # spreadsheets save CSV with a byte-order mark
        if head.rstrip(b"\r\n") != _PLAIN_HEADER:
            return None
        carry = b""
        while True:
            block = handle.read(_BLOCK_BYTES)
            if not block:
                break
            block = carry + block
            cut = block.rfind(b"\n") + 1
            carry = block[cut:]
            if cut:
                part = _parse_plain_rows(np.frombuffer(block[:cut], dtype=np.uint8))
                if part is None:
                    return None
                parts.append(part)
        if carry:
            part = _parse_plain_rows(np.frombuffer(carry + b"\n", dtype=np.uint8))
            if part is None:
                return None
            parts.append(part)
    return Manifest(fileids=PackedStrings.concatenate([p[0] for p in parts]),
                    paths=PackedStrings.concatenate([p[1] for p in parts]),
                    num_samples=np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, dtype=np.int64),
                    base=str(path.parent), source=str(path))


def _parse_plain_rows(data: np.ndarray) -> tuple[PackedStrings, PackedStrings, np.ndarray] | None:
    """``fileid,path,num_samples`` lines (``data`` ends with a newline) → packed ids, packed paths, lengths; None
    when they hold a quote or bytes that are not UTF-8 (the csv module then names the line)."""
    if (data == ord('"')).any():
        return None
    if data.size and int(data.max()) >= 128:
        try:
            data.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            return None
    ends = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([[0], ends[:-1] + 1])
    stops = ends - (data[np.maximum(ends - 1, 0)] == ord("\r"))  # a CRLF file
    keep = stops > starts  # blank lines
    starts, stops = starts[keep], stops[keep]
    commas = np.flatnonzero(data == ord(","))
    first = np.searchsorted(commas, starts)
    if np.any(np.searchsorted(commas, stops) - first != 2):
        return None  # some row has more or fewer than three fields
    c1, c2 = commas[first], commas[first + 1]
    if np.any(c1 == starts) or np.any(c2 == c1 + 1) or np.any(stops == c2 + 1):
        return None  # an empty field
    if (stops - c2 - 1).max(initial=0) > 18:
        return None
    num_samples = np.zeros(starts.size, dtype=np.int64)
    for k in range(18):  # right-aligned digits, one column at a time
        position = stops - 18 + k
        valid = position > c2
        digit = data[np.where(valid, position, 0)].astype(np.int64) - ord("0")
        if np.any(valid & ((digit < 0) | (digit > 9))):
            return None
        num_samples = np.where(valid, num_samples * 10 + digit, num_samples)
    return _pack_ranges(data, starts, c1), _pack_ranges(data, c1 + 1, c2), num_samples


def _pack_ranges(data: np.ndarray, begin: np.ndarray, end: np.ndarray) -> PackedStrings:
    """The byte ranges [begin_i, end_i) of ``data`` (sorted, disjoint) as packed strings."""
    mark = np.zeros(data.size + 1, dtype=np.int8)
    mark[begin] = 1  # ranges are non-empty and separated, so no begin equals an end
    mark[end] = -1
    inside = np.cumsum(mark[:-1], dtype=np.int8).view(bool)
    offsets = np.zeros(begin.size + 1, dtype=np.int64)
    np.cumsum(end - begin, out=offsets[1:])
    return PackedStrings(data[inside], offsets)


def _read_csv(path: Path) -> Manifest:
    fast = _read_plain_csv(path)
    if fast is not None:
        return fast
    builder = ManifestBuilder(base=path.parent, source=str(path))
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None) or []
        missing = [c for c in ("path", "num_samples") if c not in header]
        if missing:
            raise ValueError(f"{path}: the header {header} lacks column(s) {', '.join(missing)}; expected "
                             f"{','.join(_BASE_COLUMNS)} (plus {','.join(_ARCHIVE_COLUMNS)} for a tar archive)")
        column = {name: header.index(name) for name in (*_BASE_COLUMNS, *_ARCHIVE_COLUMNS) if name in header}
        if set(column) == {"fileid", "path", "num_samples"} or set(column) == {"path", "num_samples"}:
            # The common layout: no dict per row, and no archive columns to look at.
            path_at, length_at, id_at = column["path"], column["num_samples"], column.get("fileid")
            width = len(header)
            for line, row in enumerate(reader, start=2):
                if len(row) != width:
                    if not row:
                        continue
                    raise ValueError(f"{path}:{line}: expected {width} fields ({','.join(header)}), got {len(row)}")
                relative, length = row[path_at], row[length_at]
                if not relative or not length:
                    raise ValueError(f"{path}:{line}: missing {'path' if not relative else 'num_samples'!r}")
                try:
                    num_samples = int(length)
                except ValueError:
                    num_samples = _int_field(length, "num_samples", f"{path}:{line}", minimum=0)
                if not 0 <= num_samples <= _MAX_INT_FIELD:
                    _int_field(length, "num_samples", f"{path}:{line}", minimum=0)
                fileid = row[id_at] if id_at is not None and row[id_at] else fileid_of(relative)
                builder.append(fileid, relative, num_samples)
        else:
            for line, row in enumerate(reader, start=2):
                if row:
                    _add_record(builder, dict(zip(header, row, strict=False)), f"{path}:{line}")
    return builder.build()


def _read_tsv(path: Path) -> Manifest:
    with path.open(encoding="utf-8-sig") as handle:
        first = handle.readline()
        if not first:
            raise ValueError(f"{path} is empty; a fairseq manifest starts with its root directory")
        root = Path(first.strip())
        if not root.is_absolute():
            root = path.parent / root
        if not root.is_dir():
            raise ValueError(f"{path}:1: root directory {first.strip()!r} does not exist")
        builder = ManifestBuilder(base=root, source=str(path))
        for i, line in enumerate(handle, start=2):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2:
                raise ValueError(f"{path}:{i}: expected 'relative_path<TAB>num_samples', got {line.rstrip()!r}")
            num_samples = _int_field(fields[1], "num_samples", f"{path}:{i}", minimum=0)
            builder.append(fileid_of(fields[0]), fields[0], num_samples)
    return builder.build()


def _read_jsonl(path: Path) -> Manifest:
    builder = ManifestBuilder(base=path.parent, source=str(path))
    with path.open(encoding="utf-8-sig") as handle:
        for i, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{i}: not valid JSON ({error})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {line.rstrip()!r}")
            _add_record(builder, record, f"{path}:{i}")
    return builder.build()


def read_manifest(path: str | Path) -> Manifest:
    """Read a ``.csv``, ``.tsv`` (fairseq) or ``.jsonl`` manifest into a columnar ``Manifest``; errors name the file
    and line. Reading streams the file: memory holds the columns, never one Python object per row."""
    path = Path(path)
    existing_file(path, "manifest", hint=f"spidr manifest {path} OUT.csv lists its audio files")
    readers = {".csv": _read_csv, ".tsv": _read_tsv, ".jsonl": _read_jsonl}
    if path.suffix not in readers:
        raise ValueError(f"manifest {path} has suffix {path.suffix!r}; expected one of "
                         f"{', '.join(MANIFEST_SUFFIXES)}")
    with utf8_errors_named(path, "the manifest"):
        return readers[path.suffix](path)


def fileid_of(path: str) -> str:
    """The file id of a path: ``Path(path).stem`` without building a Path (this runs once per manifest row)."""
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _write_csv(entries: Manifest, handle: IO[str]) -> None:
    archived = entries.archive_index is not None
    # CsvRows quotes a field holding a bare carriage return, which the csv module leaves as it is; found in none of
    # the strings at once (13 is "\r" in UTF-8), the csv module writes alone: CsvRows' check of every row of a tar's
    # members cost ≈ 20 % of the write
    carriage_return = (any(bool((strings.data == 13).any()) for strings in (entries.fileids, entries.paths))
                       or "\r" in str(entries.base or "") or any("\r" in str(a) for a in entries.archives or ()))
    writer = CsvRows(handle) if carriage_return else csv.writer(handle, lineterminator="\n")
    writer.writerow(_BASE_COLUMNS + (_ARCHIVE_COLUMNS if archived else ()))
    if not archived:  # rows formatted chunk by chunk; the csv module only for fields that need quoting
        for start in range(0, len(entries), ITER_CHUNK):
            stop = min(start + ITER_CHUNK, len(entries))
            ids, paths = entries.fileids.strings(start, stop), entries.paths.strings(start, stop)
            rows = [(fileid, entries.resolve(p), n)
                    for fileid, p, n in zip(ids, paths, entries.num_samples[start:stop].tolist(), strict=True)]
            if any(_NEEDS_QUOTES.search(f"{a}{b}") for a, b, _ in rows):
                writer.writerows(rows)
            else:
                handle.write("".join(f"{a},{b},{n}\n" for a, b, n in rows))
        return
    for e in entries:
        row: list[object] = [e.fileid, e.path, e.num_samples]
        if archived:
            row += [e.archive or "", "" if e.byte_offset is None else e.byte_offset,
                    "" if e.byte_size is None else e.byte_size]
        writer.writerow(row)


def _tsv_root(entries: Sequence[ManifestEntry], root: str | Path | None, out: Path) -> str:
    if any(e.in_archive for e in entries):
        raise ValueError(f"{out}: a fairseq .tsv manifest cannot describe tar members; write a .csv or .jsonl")
    if root is not None:
        return os.path.abspath(root)
    common = None  # the common folder, folded entry by entry (os.path.commonpath of all would hold every path)
    for e in entries:
        folder = os.path.dirname(os.path.abspath(e.path))
        common = folder if common is None else os.path.commonpath([common, folder])
    return common or os.sep


_TSV_SEPARATORS = re.compile(r"[\t\r\n]")  # a fairseq TSV line holds a tab-separated path and length, unquoted


def _write_tsv(entries: Sequence[ManifestEntry], base: str, handle: IO[str], out: Path) -> None:
    if _TSV_SEPARATORS.search(base):
        raise ValueError(f"{out}: the root directory {base!r} holds a tab or line break, which a .tsv manifest cannot "
                         "hold; write a .csv or .jsonl")
    if base != base.strip():  # (read_manifest, as fairseq, strips the first line: another folder would be read)
        raise ValueError(f"{out}: the root directory {base!r} ends with white space, which the first line of a .tsv "
                         "manifest cannot hold (it is read stripped, as fairseq reads it); write a .csv or .jsonl")
    handle.write(base + "\n")
    for e in entries:
        relative = os.path.relpath(os.path.abspath(e.path), base)
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            raise ValueError(f"{out}: {os.path.abspath(e.path)} lies outside the root directory {base}")
        if _TSV_SEPARATORS.search(relative):
            raise ValueError(f"{out}: the file name {e.path!r} holds a tab or line break, which a .tsv manifest "
                             "cannot hold; write a .csv or .jsonl")
        handle.write(f"{relative}\t{e.num_samples}\n")


def _write_jsonl(entries: Sequence[ManifestEntry], handle: IO[str]) -> None:
    for e in entries:
        record: dict[str, object] = {"fileid": e.fileid, "path": e.path, "num_samples": e.num_samples}
        if e.in_archive:
            record |= {"archive": e.archive, "byte_offset": e.byte_offset, "byte_size": e.byte_size}
        handle.write(json.dumps(record) + "\n")


def check_manifest_suffix(out: Path, *, fairseq: bool = False) -> None:
    """Raise unless ``out``'s suffix names a manifest format (``.tsv`` with ``fairseq``): it is read back by it."""
    if fairseq and out.suffix != ".tsv":
        raise ValueError(f"output {out} has suffix {out.suffix!r}, but --fairseq writes the fairseq TSV layout, which "
                         "is read back by its .tsv suffix; name the output *.tsv")
    if out.suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"output {out} has suffix {out.suffix!r}; expected one of {', '.join(MANIFEST_SUFFIXES)}")


def _check_rows(entries: Manifest, out: Path) -> None:
    """Refuse a row that ``read_manifest`` would refuse (a length out of range, an empty path, an archive range
    that is none) or read otherwise (an empty file id, read as the path's stem), naming it: written, it failed (or
    changed) only when read back."""
    def first(rows: np.ndarray) -> int | None:
        found = np.flatnonzero(rows)
        return int(found[0]) if found.size else None

    lengths = entries.num_samples
    if (row := first((lengths < 0) | (lengths > _MAX_INT_FIELD))) is not None:
        raise ValueError(f"{out}: row {row + 1} ({entries.paths[row]!r}) has num_samples = {int(lengths[row])}; "
                         f"expected an integer in [0, {_MAX_INT_FIELD}]")
    if (row := first(np.diff(entries.paths.offsets) == 0)) is not None:
        raise ValueError(f"{out}: row {row + 1} (file id {entries.fileids[row]!r}) has an empty path")
    if (row := first(np.diff(entries.fileids.offsets) == 0)) is not None:
        raise ValueError(f"{out}: row {row + 1} ({entries.paths[row]!r}) has an empty file id, which a manifest "
                         f"reads as the file's stem; give it one")
    if entries.archive_index is not None:
        archived = entries.archive_index >= 0
        bad = archived & ((entries.byte_offset < 0) | (entries.byte_size < 1)
                          | (entries.byte_offset > _MAX_INT_FIELD) | (entries.byte_size > _MAX_INT_FIELD))
        if (row := first(bad)) is not None:
            raise ValueError(f"{out}: row {row + 1} ({entries[row].location}) has the byte range offset "
                             f"{int(entries.byte_offset[row])}, size {int(entries.byte_size[row])}; expected an "
                             "offset >= 0 and a size >= 1")


def write_manifest(
    entries: Iterable[ManifestEntry], out: str | Path, *, fairseq: bool = False, root: str | Path | None = None
) -> Path:
    """Write ``entries`` to ``out`` in the format its suffix names: ``.tsv`` is the fairseq layout, whose root is
    ``root`` or the common folder of all files (``fairseq=True`` asks for it, and then requires that suffix: the
    suffix is what ``read_manifest`` reads the format from). Rows are streamed to a temporary name that is then
    renamed, so a failure never leaves a half-written manifest."""
    out = Path(out)
    check_manifest_suffix(out, fairseq=fairseq)
    if not isinstance(entries, Manifest):
        try:
            entries = Manifest.from_entries(entries)
        except UnicodeEncodeError as error:  # (a file name of bytes that are not UTF-8, kept as surrogates)
            raise ValueError(f"{out}: {error.object!r} is not UTF-8 text, which a manifest cannot hold") from None
    if not len(entries):
        raise ValueError(f"{out}: refusing to write an empty manifest")
    _check_rows(entries, out)
    tsv = out.suffix == ".tsv"
    base = _tsv_root(entries, root, out) if tsv else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_when_done(out) as partial, partial.open("w", encoding="utf-8", newline="") as handle:
        if tsv:
            _write_tsv(entries, base, handle, out)
        elif out.suffix == ".csv":
            _write_csv(entries, handle)
        else:
            _write_jsonl(entries, handle)
    return out


def utterances_digest(entries: Manifest) -> str:
    """SHA-256 of a corpus's utterances (ids and lengths, in order). Paths are left out: the same corpus seen from
    another machine sharing the folder, or moved with it, is the same."""
    digest = hashlib.sha256(entries.fileids.data.tobytes())
    digest.update(entries.fileids.offsets.astype("<i8").tobytes())
    digest.update(entries.num_samples.astype("<i8").tobytes())
    return digest.hexdigest()
