"""Manifests: which audio files a corpus holds and how long each is.

Three formats, chosen by the file suffix (spec §6.1):

* ``.csv`` with a header naming at least ``path`` and ``num_samples`` (written as ``fileid,path,num_samples``).
  An *archive* CSV adds ``archive,byte_offset,byte_size``: the audio is the byte range [offset, offset + size) of
  an uncompressed tar, read through a read-only memory map. ``path`` is then the member's name inside the tar.
* ``.tsv`` in the fairseq layout: the first line is the root directory, then one ``relpath<TAB>num_samples`` per
  line. It cannot describe archive members.
* ``.jsonl``: one JSON object per line with the same fields as the CSV, archive fields included.

``num_samples`` counts samples *at 16 kHz*: for a file at another rate it is the length after resampling, the length
``spidr.data.audio`` will actually return. Relative paths are resolved against the manifest's own folder.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import mmap
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
AUDIO_EXTENSIONS = (".wav", ".flac")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")
_BASE_COLUMNS = ("fileid", "path", "num_samples")
_ARCHIVE_COLUMNS = ("archive", "byte_offset", "byte_size")


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
    entries: list[ManifestEntry] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (location, reason) of unreadable files


def resampled_length(num_samples: int, sample_rate: int) -> int:
    """Length of ``num_samples`` samples at ``sample_rate`` after soxr resampling to 16 kHz (round half up)."""
    if sample_rate == SAMPLE_RATE:
        return num_samples
    return (2 * num_samples * SAMPLE_RATE + sample_rate) // (2 * sample_rate)


# --------------------------------------------------------------------------------------------------------------
# Archive members
# --------------------------------------------------------------------------------------------------------------

_ARCHIVE_MAPS: dict[str, mmap.mmap] = {}  # one read-only map per tar and process (workers map their own)


def _archive_map(archive: str) -> mmap.mmap:
    mapped = _ARCHIVE_MAPS.get(archive)
    if mapped is None:
        with open(archive, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        _ARCHIVE_MAPS[archive] = mapped
    return mapped


def read_member(entry: ManifestEntry) -> bytes:
    """The bytes of an archive entry, read through a read-only memory map of its tar."""
    if entry.archive is None or entry.byte_offset is None or entry.byte_size is None:
        raise ValueError(f"{entry.path} is not an archive member")
    mapped = _archive_map(entry.archive)
    end = entry.byte_offset + entry.byte_size
    if end > len(mapped):
        raise OSError(f"byte range [{entry.byte_offset}, {end}) lies beyond the end of {entry.archive} "
                      f"({len(mapped)} bytes)")
    return mapped[entry.byte_offset : end]


# --------------------------------------------------------------------------------------------------------------
# Scanning a corpus
# --------------------------------------------------------------------------------------------------------------


def _header_length(source: str | bytes) -> int:
    info = sf.info(io.BytesIO(source) if isinstance(source, bytes) else source)
    if info.frames <= 0:
        raise ValueError("no audio samples")
    return resampled_length(int(info.frames), int(info.samplerate))


def _scan_directory(root: Path, exts: tuple[str, ...], *, progress: bool) -> ScanResult:
    from tqdm import tqdm

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file())
    result = ScanResult()
    for path in tqdm(files, desc=f"scanning {root}", unit="file", disable=not progress):
        try:
            num_samples = _header_length(str(path))
        except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as error:
            result.failures.append((str(path), str(error)))
            continue
        result.entries.append(ManifestEntry(path.stem, str(path.resolve()), num_samples))
    return result


def _scan_tar(archive: Path, exts: tuple[str, ...], *, progress: bool) -> ScanResult:
    from tqdm import tqdm

    try:
        with tarfile.open(archive, "r:") as tar:  # "r:" refuses compressed tars: members must be byte ranges
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).suffix.lower() in exts]
    except tarfile.ReadError as error:
        raise ValueError(f"{archive} is not an uncompressed tar archive ({error}); decompress it first") from error
    location = str(archive.resolve())
    result = ScanResult()
    for member in tqdm(members, desc=f"scanning {archive}", unit="file", disable=not progress):
        entry = ManifestEntry(Path(member.name).stem, member.name, 0, location, member.offset_data, member.size)
        try:
            num_samples = _header_length(read_member(entry))
        except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as error:
            result.failures.append((entry.location, str(error)))
            continue
        result.entries.append(ManifestEntry(entry.fileid, entry.path, num_samples, location, member.offset_data,
                                            member.size))
    return result


def scan(source: str | Path, exts: Sequence[str] = AUDIO_EXTENSIONS, *, progress: bool = True) -> ScanResult:
    """List the audio files of a directory (recursively) or of an uncompressed ``.tar``, with their length at 16 kHz.

    Only headers are read. Files that cannot be read are returned in ``failures`` and logged, never fatal.
    """
    source = Path(source)
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in exts)
    if source.is_dir():
        result = _scan_directory(source, exts, progress=progress)
    elif source.is_file() and source.suffix == ".tar":
        result = _scan_tar(source, exts, progress=progress)
    else:
        raise ValueError(f"{source} is neither a directory nor an uncompressed .tar file")
    for location, reason in result.failures:
        logger.warning("unreadable audio %s: %s", location, reason)
    if result.failures:
        logger.warning("%d of %d files could not be read", len(result.failures),
                       len(result.failures) + len(result.entries))
    return result


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def _int_field(value: object, name: str, where: str, *, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}: {name} = {value!r} is not an integer") from None
    if number < minimum:
        raise ValueError(f"{where}: {name} = {number} must be >= {minimum}")
    return number


def _entry_from_record(record: dict[str, object], base: Path, where: str) -> ManifestEntry:
    """Build an entry from a CSV row or JSON object (``path`` and ``num_samples`` required)."""
    for name in ("path", "num_samples"):
        if record.get(name) in (None, ""):
            raise ValueError(f"{where}: missing {name!r}")
    path = str(record["path"])
    num_samples = _int_field(record["num_samples"], "num_samples", where, minimum=0)
    fileid = str(record.get("fileid") or Path(path).stem)
    present = [record.get(name) not in (None, "") for name in _ARCHIVE_COLUMNS]
    if not any(present):
        return ManifestEntry(fileid, str(base / path), num_samples)
    if not all(present):
        raise ValueError(f"{where}: an archive entry needs all of {', '.join(_ARCHIVE_COLUMNS)}")
    return ManifestEntry(
        fileid,
        path,
        num_samples,
        str(base / str(record["archive"])),
        _int_field(record["byte_offset"], "byte_offset", where, minimum=0),
        _int_field(record["byte_size"], "byte_size", where, minimum=1),
    )


def _read_csv(path: Path) -> list[ManifestEntry]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("path", "num_samples") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: the header {reader.fieldnames} lacks column(s) {', '.join(missing)}; expected "
                             f"{','.join(_BASE_COLUMNS)} (plus {','.join(_ARCHIVE_COLUMNS)} for a tar archive)")
        return [_entry_from_record(row, path.parent, f"{path}:{i}") for i, row in enumerate(reader, start=2)]


def _read_tsv(path: Path) -> list[ManifestEntry]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path} is empty; a fairseq manifest starts with its root directory")
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = path.parent / root
    if not root.is_dir():
        raise ValueError(f"{path}:1: root directory {lines[0].strip()!r} does not exist")
    entries = []
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{path}:{i}: expected 'relative_path<TAB>num_samples', got {line!r}")
        num_samples = _int_field(fields[1], "num_samples", f"{path}:{i}", minimum=0)
        entries.append(ManifestEntry(Path(fields[0]).stem, str(root / fields[0]), num_samples))
    return entries


def _read_jsonl(path: Path) -> list[ManifestEntry]:
    entries = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{i}: not valid JSON ({error})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {line!r}")
        entries.append(_entry_from_record(record, path.parent, f"{path}:{i}"))
    return entries


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read a ``.csv``, ``.tsv`` (fairseq) or ``.jsonl`` manifest; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest {path} does not exist")
    match path.suffix:
        case ".csv":
            return _read_csv(path)
        case ".tsv":
            return _read_tsv(path)
        case ".jsonl":
            return _read_jsonl(path)
    raise ValueError(f"manifest {path} has suffix {path.suffix!r}; expected one of {', '.join(MANIFEST_SUFFIXES)}")


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _csv_text(entries: Sequence[ManifestEntry]) -> str:
    archived = any(e.in_archive for e in entries)
    columns = _BASE_COLUMNS + (_ARCHIVE_COLUMNS if archived else ())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for e in entries:
        row: list[object] = [e.fileid, e.path, e.num_samples]
        if archived:
            row += [e.archive or "", "" if e.byte_offset is None else e.byte_offset,
                    "" if e.byte_size is None else e.byte_size]
        writer.writerow(row)
    return buffer.getvalue()


def _tsv_text(entries: Sequence[ManifestEntry], root: str | Path | None, out: Path) -> str:
    if any(e.in_archive for e in entries):
        raise ValueError(f"{out}: a fairseq .tsv manifest cannot describe tar members; write a .csv or .jsonl")
    paths = [os.path.abspath(e.path) for e in entries]
    base = os.path.abspath(root) if root is not None else os.path.commonpath([os.path.dirname(p) for p in paths])
    lines = [base]
    for e, p in zip(entries, paths, strict=True):
        relative = os.path.relpath(p, base)
        if relative.startswith(".."):
            raise ValueError(f"{out}: {p} lies outside the root directory {base}")
        lines.append(f"{relative}\t{e.num_samples}")
    return "\n".join(lines) + "\n"


def _jsonl_text(entries: Sequence[ManifestEntry]) -> str:
    lines = []
    for e in entries:
        record: dict[str, object] = {"fileid": e.fileid, "path": e.path, "num_samples": e.num_samples}
        if e.in_archive:
            record |= {"archive": e.archive, "byte_offset": e.byte_offset, "byte_size": e.byte_size}
        lines.append(json.dumps(record))
    return "".join(line + "\n" for line in lines)


def write_manifest(
    entries: Iterable[ManifestEntry], out: str | Path, *, fairseq: bool = False, root: str | Path | None = None
) -> Path:
    """Write ``entries`` to ``out`` in the format its suffix names (``fairseq=True`` forces the TSV layout, whose root
    is ``root`` or the common folder of all files). The file is written to a temporary name and then renamed, so a
    failure never leaves a half-written manifest."""
    out = Path(out)
    entries = list(entries)
    if not entries:
        raise ValueError(f"{out}: refusing to write an empty manifest")
    if fairseq or out.suffix == ".tsv":
        text = _tsv_text(entries, root, out)
    elif out.suffix == ".csv":
        text = _csv_text(entries)
    elif out.suffix == ".jsonl":
        text = _jsonl_text(entries)
    else:
        raise ValueError(f"{out} has suffix {out.suffix!r}; expected one of {', '.join(MANIFEST_SUFFIXES)} "
                         "(or pass --fairseq for a TSV)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
