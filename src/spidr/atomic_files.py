"""Files written whole or not at all: a temporary name beside the target, renamed over it once complete.

A reader (or a rerun that takes an existing file as done) then sees either the earlier file or the complete new
one, never a truncated file left by a crash or a kill. Checkpoints add fsyncs on top (``train.checkpoint``).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO

PARTIAL_SUFFIX = ".partial"


def new_partial_path(path: Path) -> Path:
    """A hidden temporary name of this writer's own for ``path``: ``.<name>.<8 random hex digits>.partial`` in the
    same folder (so that the rename stays on one file system; a name too long for the file system's 255 bytes is
    replaced by its hash). With one name for every writer, a second run writing the same output (a command started
    twice) renamed the first one's half-written file into place, and the first then failed or said it was done.

    The first call for a folder in a process removes the temporaries that killed writers left there: those that no
    process holds locked (``new_held_partial``), whatever host or PID namespace wrote them."""
    _sweep_once(path.parent)
    return path.with_name(f".{fitting_name(path.name, MAX_NAME_BYTES)}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def fitting_name(name: str, max_bytes: int) -> str:
    """``name``, or its hash when it takes more than ``max_bytes`` bytes: the part of a hidden companion file's
    name (a temporary, a lock) that leaves room for its additions within a file name's 255 bytes."""
    return name if len(name.encode()) <= max_bytes else hashlib.blake2b(name.encode(), digest_size=8).hexdigest()


def is_partial_name(name: str) -> bool:
    """Whether ``name`` is a writer's temporary (``new_partial_path``): a killed writer leaves one behind."""
    return re.fullmatch(rf"\..+\.[0-9a-f]{{8}}{re.escape(PARTIAL_SUFFIX)}", name) is not None


MAX_NAME_BYTES = 255 - 1 - 1 - 8 - len(PARTIAL_SUFFIX)  # "." name "." token suffix within a file name's 255 bytes
_SWEPT: set[str] = set()  # folders whose dead temporaries this process removed (once: a folder may hold 100k files)


def new_held_partial(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary for ``path`` (``new_partial_path``), made and opened for writing, with an exclusive lock held
    on it until the returned handle is closed: the sign, for other processes' sweeps, that its writer lives.

    Another process's first write into the folder sweeps it; made but not yet locked, the file looked like a dead
    writer's and was removed under us (three extraction parts started at once failed on it). The lock is taken on the
    handle the file was made with, and the name is checked to still lead to it; where a sweep came first, a new
    temporary is made."""
    try:
        import fcntl
    except ImportError:  # no flock: sweeps never remove anything either
        fcntl = None
    for _attempt in range(100):
        partial = new_partial_path(path)
        handle = os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        if fcntl is None:
            return partial, handle
        try:
            _lock(handle, fcntl)
            if names_the_file(partial, handle):
                return partial, handle
        except BaseException:
            handle.close()
            raise
        handle.close()  # swept between its making and its lock: removed already
    raise OSError(f"{path.parent}: every temporary file made here was removed before it could be locked (100 tries)")


def _lock(handle: BinaryIO, fcntl: Any) -> None:
    fcntl.flock(handle, fcntl.LOCK_EX)


def names_the_file(path: Path, handle: IO[Any]) -> bool:
    """Whether ``path`` still leads to the file ``handle`` has open (not removed, nor replaced by another)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _sweep_once(folder: Path) -> None:
    key = os.path.abspath(folder)
    if key in _SWEPT:
        return
    _SWEPT.add(key)
    try:
        import fcntl
    except ImportError:  # no flock: no way to tell a live writer's file from a dead one's
        return
    try:
        entries = [entry for entry in os.scandir(folder)
                   if entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX) and entry.is_file()]
    except OSError:  # (no folder yet)
        return
    for entry in entries:
        try:
            with open(entry.path, "r+b") as handle:  # (writable: NFS's flock takes an exclusive lock on no other)
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(entry.path)  # unlocked: its writer is gone
        except OSError:  # held by a live writer (BlockingIOError), or gone already
            continue


@contextmanager
def replaced_when_done(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to; when the block ends without an error it is renamed
    over ``path``, otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    # Made here first, so that it gets the permissions of any new file in its folder (the umask, or the folder's
    # default ACL); a writer that makes its own file (safetensors: 0600) is set back to them, so that an exported
    # model or centroids file stays readable by the rest of a group on a shared cluster.
    try:
        partial, held = new_held_partial(path)  # (a writer replacing the file by name loses the lock: only sweeps see)
    except OSError as error:  # (a read-only file system: named by the user's path, not the hidden temporary's)
        raise named_error(error, path) from None
    try:
        intended = stat.S_IMODE(os.stat(partial).st_mode)
        try:
            with naming_errors(path, temporary=partial):
                yield partial
                if stat.S_IMODE(os.stat(partial).st_mode) != intended:
                    os.chmod(partial, intended)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        try:
            os.replace(partial, path)
        except OSError as error:  # (a folder where the file goes): named by the user's path, the temporary removed
            partial.unlink(missing_ok=True)
            raise named_error(error, path) from None
    finally:
        held.close()


@contextmanager
def naming_errors(path: str | Path, *, temporary: Path | None = None) -> Iterator[None]:
    """An ``OSError`` raised in the block that names no file (a failed write's), or names ``temporary`` (the hidden
    file written for ``path``), names ``path`` instead: the user's file. For one of several files written at once,
    the innermost ``replaced_when_done`` would otherwise name its own."""
    try:
        yield
    except OSError as error:
        hidden = None if temporary is None else str(temporary)
        if error.filename is None or error.filename == hidden:
            raise named_error(error, path) from error
        if hidden is not None and error.filename2 == hidden:  # (shutil.copyfile: source, then the destination)
            raise type(error)(error.errno, error.strerror or str(error), error.filename, None, str(path)) from error
        raise


def named_error(error: OSError, path: str | Path) -> OSError:
    """``error`` (a failed write: no file named, or a writer's hidden temporary) naming ``path``, the user's file."""
    return type(error)(error.errno, error.strerror or str(error), str(path))


def failed_write(error: BaseException, path: str | Path) -> OSError | None:
    """The ``OSError`` behind ``error`` raised while writing ``path``, naming ``path``; None for any other error.
    torch's zip writer (``torch.save``) turns the OSError of a write to a full disk into a RuntimeError ("unexpected
    pos"), which told the user neither the file nor the cause."""
    failed = error if isinstance(error, OSError) else error.__context__
    if isinstance(error, OSError | RuntimeError) and isinstance(failed, OSError):
        return named_error(failed, path)
    return None


class _CheckedWrites:
    """A file handle seen by ``np.save`` as a plain writer: numpy writes a real file through a C ``FILE*`` whose
    ``fclose`` it never checks, so the last buffered bytes failing to reach a full disk (or past a file size limit)
    left a cut ``.npy`` file and no error. Through ``handle.write`` every failed write raises."""

    def __init__(self, handle: BinaryIO) -> None:
        self.write, self.flush = handle.write, handle.flush


def save_npy(handle: BinaryIO, array: Any) -> None:
    """``np.save(handle, array)`` that raises on every failed write (``_CheckedWrites``)."""
    import numpy as np

    np.save(_CheckedWrites(handle), array)


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``replaced_when_done``."""
    with replaced_when_done(path) as partial:
        partial.write_text(text, encoding="utf-8")


def save_figure(figure: Any, path: str | Path, *, dpi: int) -> None:
    """Save a matplotlib figure as PNG through ``replaced_when_done``: a failed or killed save leaves no truncated
    image (the earlier one stays)."""
    with replaced_when_done(path) as partial:
        figure.savefig(partial, dpi=dpi, format="png")
