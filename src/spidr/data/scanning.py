"""Scanning a corpus: the audio files of a folder (recursively, following links) or of an uncompressed tar, with
their lengths at 16 kHz read from their headers alone, and the files that could not be read, each with its reason.

``spidr manifest`` writes what ``scan`` finds; ``spidr extract`` and the evaluation commands scan a folder given in
place of a manifest.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from spidr.data import AUDIO_EXTENSIONS
from spidr.data.manifest import Manifest, ManifestBuilder, ManifestEntry, fileid_of, resampled_length, shared_fileids
from spidr.folder_walk import printable, walk_following_links

logger = logging.getLogger(__name__)


@dataclass
class ScanResult:
    entries: Manifest
    failures: list[tuple[str, str]] = field(default_factory=list)  # (location, reason) of unreadable files
    shared_fileids: dict[str, list[str]] = field(default_factory=dict)  # file id → locations, when several
    # The failures that name a file, as entries of length 0 (names printable): where it would have been, for naming
    # the files that share its id as if it had been read (spidr.eval.folder_extraction.unread_stems)
    unread: list[ManifestEntry] = field(default_factory=list)


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
    _warn_of_aliases(real_files.values(), "symbolic links")
    return sorted(files, key=lambda p: p.split(os.sep)), failures


def _warn_of_aliases(names_of_each_file: Iterable[list[str]], through: str) -> None:
    """Name a file listed under several names (kept: a linked file keeps its own name; but the same audio then
    counts once per name)."""
    aliases = sorted(sorted(names) for names in names_of_each_file if len(names) > 1)
    if aliases:
        logger.warning("%d file(s) are listed under several names through %s (e.g. %s), each once per name: "
                       "trained on and extracted as many times", len(aliases), through,
                       " and ".join(printable(name) for name in aliases[0][:2]))


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
        builder.append(fileid_of(path), path, num_samples)
    failures.sort(key=lambda failure: failure[0].split(os.sep))
    unread = [ManifestEntry(fileid_of(printable(path)), printable(path), 0) for path, _ in failures]
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
    names_of_data: dict[tuple[int, int], list[str]] = {}  # the same stored bytes: one file, linked
    for name, offset, size in members:
        names_of_data.setdefault((offset, size), []).append(name)
    _warn_of_aliases(names_of_data.values(), "links in the archive")
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
    unread = [ManifestEntry(fileid_of(printable(name)), printable(name), 0, location) for name, _ in failed
              if name is not None]
    for name, offset, size in tqdm(members, desc=f"scanning {archive}", unit="file", disable=not progress):
        entry = ManifestEntry(fileid_of(name), name, 0, location, offset, size)
        if not _is_utf8(name):
            failures.append((f"{location}:{printable(name)}", _NOT_UTF8))
            unread.append(ManifestEntry(fileid_of(printable(name)), printable(name), 0, location))
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
