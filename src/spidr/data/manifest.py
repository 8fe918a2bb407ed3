"""Manifests: which audio files a corpus holds and how long each is.

Three formats, chosen by the file suffix (spec §6.1):

* ``.csv`` with a header naming at least ``path`` and ``num_samples`` (written as ``fileid,path,num_samples``).
  An *archive* CSV adds ``archive,byte_offset,byte_size``: the audio is the byte range [offset, offset + size) of
  an uncompressed tar, read through a read-only memory map. ``path`` is then the member's name inside the tar.
* ``.tsv`` in the fairseq layout: the first line is the root directory, then one ``relpath<TAB>num_samples`` per
  line. It cannot describe archive members.
* ``.jsonl``: one JSON object per line with the same fields as the CSV, archive fields included.

``read_manifest`` returns a columnar ``Manifest`` (numpy arrays, no Python object per row: a 281k-file LibriSpeech
manifest holds ≈ 30 MB and reads in well under a second); indexing it gives ``ManifestEntry`` objects.

``num_samples`` counts samples *at 16 kHz*: for a file at another rate it is the length after resampling, the length
``spidr.data.audio`` will actually return. Relative paths are resolved against the manifest's own folder.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import soundfile as sf

from spidr.atomic_files import replaced_when_done
from spidr.data import AUDIO_EXTENSIONS, SAMPLE_RATE
from spidr.folder_walk import printable, walk_following_links
from spidr.input_files import existing_file
from spidr.text_files import utf8_errors_named

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


@dataclass
class ScanResult:
    entries: Manifest
    failures: list[tuple[str, str]] = field(default_factory=list)  # (location, reason) of unreadable files
    shared_fileids: dict[str, list[str]] = field(default_factory=dict)  # file id → locations, when several
    # The failures that name a file, as entries of length 0 (names printable): where it would have been, for naming
    # the files that share its id as if it had been read (spidr.eval.folder_extraction.unread_stems)
    unread: list[ManifestEntry] = field(default_factory=list)


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
# Scanning a corpus
# --------------------------------------------------------------------------------------------------------------


class _MemberView(io.RawIOBase):
    """A read-only, seekable view of an archive member's byte range, read on demand: libsndfile reads a header
    through it without the member's audio being read (``read_member`` reads it all)."""

    def __init__(self, entry: ManifestEntry) -> None:
        super().__init__()
        self._file = open(entry.archive, "rb")  # noqa: SIM115 (closed by close())
        self._start, self._size, self._position = entry.byte_offset, entry.byte_size, 0
        self._name = entry.path
        if self._start + self._size > os.fstat(self._file.fileno()).st_size:
            self._file.close()
            raise OSError(f"byte range [{self._start}, {self._start + self._size}) lies beyond the end of "
                          f"{entry.archive}")

    def __repr__(self) -> str:  # how soundfile names the file in its errors: the member's name
        return repr(self._name)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:  # type: ignore[override]
        count = max(0, min(len(buffer), self._size - self._position))
        self._file.seek(self._start + self._position)
        data = self._file.read(count)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def _header_length(source: str | bytes | io.RawIOBase) -> int:
    info = sf.info(io.BytesIO(source) if isinstance(source, bytes) else source)
    if info.frames <= 0:
        raise ValueError("no audio samples")
    if info.frames >= UNKNOWN_LENGTH:
        raise ValueError(UNKNOWN_LENGTH_REASON)
    length = resampled_length(int(info.frames), int(info.samplerate))
    if length == 0:
        raise ValueError(f"no audio samples at 16 kHz ({info.frames} at {info.samplerate} Hz)")
    return length


# libsndfile's frame count for a stream whose header does not record its length (a FLAC written to a pipe)
UNKNOWN_LENGTH = 2**63 - 1
UNKNOWN_LENGTH_REASON = ("its header records no length (written to a pipe?); re-encode it to a file, e.g. "
                         "sox in.flac out.flac")
_READ_ERRORS = (sf.LibsndfileError, RuntimeError, ValueError, OSError)
_BUFFER_NAME = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # how soundfile names an in-memory file


def _is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as surrogates): a manifest is UTF-8 text,
    so such a name could be neither written nor read back."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_NOT_UTF8 = "the name is not valid UTF-8, which a manifest cannot hold; rename it (e.g. with convmv)"


# Audio that soundfile reads but a scan of the default extensions leaves out: counted, and named in a warning
OTHER_AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au")


def _listed(name: str, exts: tuple[str, ...], left_out: dict[str, int] | None) -> bool:
    """Whether a scan of ``exts`` lists the file ``name``; one it leaves out that is audio of another format
    (``OTHER_AUDIO_EXTENSIONS``) is counted in ``left_out``, by extension."""
    extension = os.path.splitext(name)[1].lower()
    if extension in exts:
        return True
    if left_out is not None and extension in OTHER_AUDIO_EXTENSIONS:
        left_out[extension] = left_out.get(extension, 0) + 1
    return False


def _audio_files(root: str, exts: tuple[str, ...], left_out: dict[str, int] | None = None
                 ) -> tuple[list[str], list[tuple[str, str]]]:
    """The audio files under ``root`` (sorted, absolute, symbolic links kept as named) and the failures: links that
    lead to no file and other non-regular files. Symbolic links to folders are followed; a real folder is entered
    once, so a link back to a parent (a loop) ends the walk there instead of going on forever. ``left_out``
    counts, by extension, the files of another audio format (``OTHER_AUDIO_EXTENSIONS``) that ``exts`` leaves out."""
    files, failures = [], []
    real_files: dict[str, list[str]] = {}  # a file's real path → the paths it is listed by
    # (deterministic: the same alias of a folder reached twice is kept every time)
    for folder, names in walk_following_links(root):
        real_folder = None
        for name in names:
            if not _listed(name, exts, left_out):
                continue
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                files.append(path)
                if os.path.islink(path):
                    real = os.path.realpath(path)
                else:
                    real_folder = real_folder or os.path.realpath(folder)
                    real = os.path.join(real_folder, name)
                real_files.setdefault(real, []).append(path)
            elif os.path.islink(path):
                failures.append((path, f"symbolic link to {os.readlink(path)!r}, which leads to no file"))
            else:
                failures.append((path, "not a regular file"))
    aliases = sorted(sorted(paths) for paths in real_files.values() if len(paths) > 1)
    if aliases:  # (kept: a linked file keeps its own name; but the same audio then counts once per name)
        logger.warning("%d file(s) are listed under several names through symbolic links (e.g. %s), each once per "
                       "name: trained on and extracted as many times", len(aliases),
                       " and ".join(printable(path) for path in aliases[0][:2]))
    return sorted(files, key=lambda p: p.split(os.sep)), failures


def _warn_left_out(source: Path, left_out: Mapping[str, int], exts: tuple[str, ...], include_hint: str | None
                   ) -> None:
    """Name the audio files of other extensions a scan of ``source`` left out, and how to list them
    (``include_hint``; default: the ``--ext`` of the commands that have one)."""
    if left_out:
        counts = ", ".join(f"{count} {extension}" for extension, count in sorted(left_out.items()))
        hint = include_hint or f"list them with --ext {','.join([*exts, *sorted(left_out)])}"
        logger.warning("%s: %d audio file(s) of other extensions left out (%s): %s", source, sum(left_out.values()),
                       counts, hint)


def _scan_directory(root: Path, exts: tuple[str, ...], *, progress: bool, include_hint: str | None = None
                    ) -> ScanResult:
    from tqdm import tqdm

    # Absolute, but symbolic links not resolved: a linked file keeps its own name (its utterance id) and folder.
    left_out: dict[str, int] = {}
    files, failures = _audio_files(os.path.abspath(root), exts, left_out)
    _warn_left_out(root, left_out, exts, include_hint)
    builder = ManifestBuilder(base="", source=str(root))
    for path in tqdm(files, desc=f"scanning {root}", unit="file", disable=not progress):
        if not _is_utf8(path):
            failures.append((path, _NOT_UTF8))
            continue
        try:
            num_samples = _header_length(path)
        except _READ_ERRORS as error:
            failures.append((path, str(error)))
            continue
        builder.append(_stem(path), path, num_samples)
    failures.sort(key=lambda failure: failure[0].split(os.sep))
    unread = [ManifestEntry(_stem(printable(path)), printable(path), 0) for path, _ in failures]
    return ScanResult(builder.build(), [(printable(path), printable(reason)) for path, reason in failures],
                      unread=unread)


def _tar_audio_members(tar: tarfile.TarFile, exts: tuple[str, ...], left_out: dict[str, int] | None = None
                       ) -> tuple[list[tuple[str, int, int]], list[tuple[str | None, str]]]:
    """``(name, data offset, size)`` of each audio member, links mapped to the data they stand for, and the
    failures (name, reason): links to nothing in the archive, members that hold no data, and (name None) a cut in
    a truncated archive. A member whose data the cut reaches is listed here and fails when its audio is read.
    ``left_out`` counts the members of another audio format that ``exts`` leaves out (``_audio_files``).

    A hard link shares the data of the member of its target name stored before it (as ``tar -x`` restores it); a
    symbolic link leads, relative to its folder, to the member of that name the archive ends with."""
    held: dict[str, tuple[int, int] | None] = {}  # member name → (offset, size) of its data, as far as read
    symlinks: dict[str, str] = {}  # member name → the name it leads to
    audio = []  # (member, its data when met: None for a symbolic link, which is followed at the end)
    cut_short: list[str] = []
    for member in _members_before_any_cut(tar, cut_short):
        name = os.path.normpath(member.name)
        # Where tar -x puts it: through the folder links read so far ("voices/c.wav" with voices -> speakers is
        # speakers/c.wav), so that links are found wherever a path through a linked folder names them.
        placed = _placed(symlinks, name)
        if member.isfile():
            # a sparse member (tar --sparse) stores only its non-zero blocks: no byte range holds its file
            held[placed] = None if member.issparse() else (member.offset_data, member.size)
        elif member.islnk():
            held[placed] = held.get(_placed(symlinks, os.path.normpath(member.linkname)))
        elif member.issym():  # kept as written: "d/../t.wav" climbs from where the link d leads, not from "."
            symlinks[placed] = os.path.join(os.path.dirname(name), member.linkname)
        elif member.isdir():
            continue
        if _listed(name, exts, left_out):
            audio.append((member, held.get(placed) if member.isfile() or member.islnk() else None))
    members, failures = [], []
    for member, data in audio:
        if member.issym():
            target = _follow(symlinks, os.path.normpath(member.name))
            data = held.get(target)
        if data is not None:
            members.append((member.name, *data))
        else:
            failures.append((member.name, _why_no_data(member, target if member.issym() else None)))
    failures += [(None, f"the archive is cut short ({why}): only the members before the cut are listed")
                 for why in cut_short]
    return members, failures


def _why_no_data(member: tarfile.TarInfo, target: str | None) -> str:
    """Why an audio member gives no byte range of data (``target``: where a symbolic link leads)."""
    if member.isfile() and member.issparse():
        return "a sparse member (tar --sparse), whose bytes are not stored as one range: create the archive without " \
               "--sparse"
    if member.islnk():
        return f"hard link to {member.linkname!r}, which no member before it holds"
    if member.issym():
        return f"symbolic link to {target!r}, which no member of the archive holds"
    return "not a regular file"


def _members_before_any_cut(tar: tarfile.TarFile, cut: list[str]) -> Iterator[tarfile.TarInfo]:
    """The archive's members in order; of a truncated archive, those before the cut (and why, appended to ``cut``)."""
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as error:
            cut.append(str(error))
            return
        if member is None:  # tarfile also ends here at a header cut short: the rest must be the end-of-archive zeros
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(1 << 20).strip(b"\0"):
                cut.append(f"bytes at offset {tar.offset} are neither a member header nor the end of the archive")
            return
        yield member


def _placed(symlinks: dict[str, str], name: str) -> str:
    """The member name ``name`` stands for with the folder links on its way followed, not a link it is itself (as
    ``link()`` and ``tar -x`` place a member)."""
    folder, base = os.path.split(name)
    if not folder:
        return name
    resolved = _follow(symlinks, folder)
    return base if resolved == "." else os.path.join(resolved, base)


def _follow(symlinks: dict[str, str], name: str) -> str:
    """The member name that ``name`` stands for once every symbolic link on its way is followed, the links to
    folders included (``voices -> speakers`` makes ``voices/a.wav`` lead to ``speakers/a.wav``), as ``realpath``
    resolves a path on disk; given up after 40 links as the kernel does (the name reached then is returned)."""
    pending = name.split(os.sep)[::-1]  # components still to walk, next one last
    resolved: list[str] = []
    links_left = 40
    while pending:
        component = pending.pop()
        if component in ("", "."):
            continue
        if component == "..":
            if not resolved:  # above the archive's top: outside what it holds (tar -x would leave the folder)
                return os.path.join("..", *pending[::-1])
            resolved.pop()
            continue
        here = os.path.join(*resolved, component)
        target = symlinks.get(here)
        if target is None or links_left == 0:
            resolved.append(component)
            continue
        links_left -= 1
        if os.path.isabs(target):  # leads out of the archive (tar -x would follow it on the extracting machine)
            return os.path.join(target, *pending[::-1])
        # the stored target is joined to the link's folder, as written: walk it from the top
        resolved = []
        pending.extend(target.split(os.sep)[::-1])
    return os.path.join(*resolved) if resolved else "."


def _scan_tar(archive: Path, exts: tuple[str, ...], *, progress: bool, include_hint: str | None = None
              ) -> ScanResult:
    from tqdm import tqdm

    left_out: dict[str, int] = {}
    try:
        with tarfile.open(archive, "r:") as tar:  # "r:" refuses compressed tars: members must be byte ranges
            members, failed = _tar_audio_members(tar, exts, left_out)
    except tarfile.ReadError as error:
        raise ValueError(f"{archive} is not an uncompressed tar archive ({error}); decompress it first") from error
    _warn_left_out(archive, left_out, exts, include_hint)
    location = str(archive.resolve())
    builder = ManifestBuilder(base="", source=str(archive))
    failures = [(location if name is None else f"{location}:{printable(name)}", printable(reason))
                for name, reason in failed]
    unread = [ManifestEntry(_stem(printable(name)), printable(name), 0, location) for name, _ in failed
              if name is not None]
    for name, offset, size in tqdm(members, desc=f"scanning {archive}", unit="file", disable=not progress):
        entry = ManifestEntry(_stem(name), name, 0, location, offset, size)
        if not _is_utf8(name):
            failures.append((f"{location}:{printable(name)}", _NOT_UTF8))
            unread.append(ManifestEntry(_stem(printable(name)), printable(name), 0, location))
            continue
        try:
            with _MemberView(entry) as view:
                num_samples = _header_length(view)
        except _READ_ERRORS as error:
            failures.append((entry.location, _BUFFER_NAME.sub(repr(name), str(error))))
            unread.append(entry)
            continue
        builder.append(entry.fileid, name, num_samples, archive=location, byte_offset=offset, byte_size=size)
    return ScanResult(builder.build(), failures, unread=unread)


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


def scan(source: str | Path, exts: Sequence[str] = AUDIO_EXTENSIONS, *, progress: bool = True,
         include_hint: str | None = None, log_failures: bool = True) -> ScanResult:
    """List the audio files of a directory (recursively, following symbolic links) or of an uncompressed ``.tar``,
    with their length at 16 kHz.

    Only headers are read: a file whose header cannot be read, a link that leads to no file and a name that is not
    UTF-8 are returned in ``failures`` and logged, never fatal; a truncated file with a readable header is kept with
    its header's length. A file id held by several files is logged (all of them are kept). Audio files of other
    extensions are counted in a warning, with ``include_hint``: how to list them (default: ``--ext``).
    ``log_failures=False``: the unreadable files are counted in the log, not named (the caller lists them).
    """
    source = Path(source)
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in exts)
    if source.is_dir():
        result = _scan_directory(source, exts, progress=progress, include_hint=include_hint)
    elif source.is_file() and source.suffix.lower() == ".tar":
        result = _scan_tar(source, exts, progress=progress, include_hint=include_hint)
    else:
        raise ValueError(f"{source} is neither a directory nor an uncompressed .tar file")
    for location, reason in result.failures if log_failures else ():
        logger.warning("unreadable audio %s: %s", location, reason)
    if result.failures:
        logger.warning("%d of %d files could not be read", len(result.failures),
                       len(result.failures) + len(result.entries))
    result.shared_fileids = shared_fileids(result.entries)
    if result.shared_fileids:
        fileid, locations = next(iter(result.shared_fileids.items()))
        logger.warning("%d file ids are each held by several files (e.g. %r: %s); all are kept, and spidr extract "
                       "names its outputs by folder and file id (two in one folder, such as one name with two "
                       "extensions, collide there too); item and alignment files must name these utterances by "
                       "path (%s/%s), the id alone being refused", len(result.shared_fileids), fileid,
                       ", ".join(locations[:3]), os.path.basename(os.path.dirname(locations[0])), fileid)
    return result


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
                fileid = row[id_at] if id_at is not None and row[id_at] else _stem(relative)
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
            builder.append(_stem(fields[0]), fields[0], num_samples)
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


def _stem(path: str) -> str:
    """``Path(path).stem`` without building a Path (this runs once per manifest row)."""
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _write_csv(entries: Manifest, handle: IO[str]) -> None:
    archived = entries.archive_index is not None
    writer = csv.writer(handle, lineterminator="\n")
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
        entries = Manifest.from_entries(entries)
    if not len(entries):
        raise ValueError(f"{out}: refusing to write an empty manifest")
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
