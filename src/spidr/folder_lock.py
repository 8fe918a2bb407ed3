"""One writer per output: a process holds ``<folder>/.lock`` exclusively while it writes into a folder, or
``.<name>.lock`` beside a single output (``output_lock``) from its command's start to its end.

Two runs into one folder (a command started twice, a resume while the first run still lives) would interleave their
writes: duplicated unit rows, checkpoints of two runs. ``flock`` locks are released by the kernel when the process
ends, however it ends (kill -9 included), so a stale lock never blocks a rerun. A forked child (a data-loader
worker) would hold the lock as long as it lives, since the lock belongs to the open file, which it shares: each child
drops its copy at the fork, so the lock dies with the process that took it. Where ``fcntl`` is missing (Windows)
nothing is locked.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from spidr.atomic_files import fitting_name, names_the_file

LOCK_NAME = ".lock"

logger = logging.getLogger(__name__)

_held: set[int] = set()  # descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child: point each inherited lock descriptor at /dev/null (the parent keeps its lock; the child's
    copy of the file object may still close the descriptor later, harmlessly)."""
    for fd in _held:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, fd)
        os.close(null)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def missing_folders(folder: str | Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first: what creating it would make."""
    missing, folder = [], Path(os.path.abspath(folder))
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first, as ``missing_folders`` lists them) while they are empty: what a refused
    command made and left empty. A folder that holds anything, and every folder above it, stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, *, wait: bool = False,
                made: Sequence[Path] | None = None) -> Iterator[None]:
    """Hold ``folder/.lock`` (the folder is created) for the block, or raise ``ValueError`` naming ``what`` (e.g.
    "the extraction into feats/") and the process that holds it; with ``wait``, wait for that process instead (a
    corpus that another process is making is then reused).

    A block that raises (a refused input, a failed run) leaves no lock or folder it made behind: the lock is removed
    while held if this call made it or the folder holds nothing else, then the folders made for this command (by this
    call, or ``made``: the folders the caller made, deepest first) while empty. A folder that was there stays. A rerun
    then starts from what was there."""
    folder = Path(folder)
    made = missing_folders(folder) if made is None else made
    lock_was_there = (folder / LOCK_NAME).exists()
    folder.mkdir(parents=True, exist_ok=True)
    only_lock = _only_lock_in(folder)
    try:
        with _locked(folder / LOCK_NAME, what, wait=wait, remove=False,
                     unlink_if_failed=lambda: not lock_was_there or only_lock()):
            yield
    except BaseException:
        remove_empty_folders(made)
        raise


def _only_lock_in(folder: Path) -> Callable[[], bool]:
    """Whether, now, ``folder`` holds nothing but its lock."""

    def check() -> bool:
        try:
            return [entry.name for entry in os.scandir(folder)] == [LOCK_NAME]
        except OSError:
            return False

    return check


def lock_holder(folder: str | Path) -> str | None:
    """Who holds ``folder/.lock`` now ("process 123"), or None when nobody does (or nothing can be told: no lock
    file, no ``flock``). Asked before removing what a lock holder may be writing."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        # (writable, not created: NFS emulates flock with POSIX locks, and grants an exclusive one only to a writer;
        # read-only, the attempt failed there and a running holder read as none)
        handle = (Path(folder) / LOCK_NAME).open("r+", encoding="utf-8")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        except OSError:
            return None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def output_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``path`` (a file or folder that one command makes) for the block, or raise
    ``ValueError`` naming ``what`` and the holder. A lock beside the output, not in it, leaves the other outputs
    of that folder free (units of two layers written side by side) and adds nothing to an output folder; the lock
    file is removed at the end. With the check for an existing output made under it, a command started twice no
    longer computes twice and silently keeps the later result."""
    path = Path(os.path.abspath(path))  # "." and "out/.." have a name here, and one spelling of a place is one lock
    made = missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)  # (where the command is about to write anyway)
    try:
        with _locked(path.with_name(f".{fitting_name(path.name, MAX_NAME_BYTES)}.lock"), what, wait=False,
                     remove=True):
            yield
    finally:  # (a refused command leaves no empty folder; one that wrote its output leaves it in place)
        remove_empty_folders(made)


MAX_NAME_BYTES = 255 - len("..lock")


@contextlib.contextmanager
def _locked(path: Path, what: str, *, wait: bool, remove: bool,
            unlink_if_failed: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created) for the block; ``remove``: unlink it while still held at
    the end; ``unlink_if_failed``: also when the block raises and that says so. A process that opened it just before
    that removal and locks it after sees that the name no longer leads to its file, and starts again on the new one
    (so two processes never both hold "the" lock)."""
    handle = _acquire(path, what, wait=wait, remove=remove)
    if handle is None:  # nothing could be locked: unguarded (warned)
        try:
            yield
        finally:
            if remove:
                with contextlib.suppress(OSError):
                    path.unlink()
        return
    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        _held.add(handle.fileno())
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            _held.discard(handle.fileno())
            if remove or (failed and unlink_if_failed()):
                with contextlib.suppress(OSError):
                    path.unlink()


def _acquire(path: Path, what: str, *, wait: bool, remove: bool) -> IO[str] | None:
    """``path`` opened (created) and locked, once nobody else holds it (``wait``) or at once (else ``ValueError``
    naming ``what`` and the holder); None where no lock can be had (no ``flock``, a file system without locks, or
    an output's lock that cannot be made beside it), warned."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform
        return None
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # (again, if a refused holder removed it)
            handle = path.open("a+", encoding="utf-8")
        except OSError as error:
            if not remove:  # (a folder's own lock: the writer cannot write there either)
                raise
            # Beside the output, in a folder the user may not write to (``--out .`` in one's folder of a shared
            # tree): the output itself may still be writable.
            logger.warning("cannot make the lock %s (%s): nothing stops a second process from writing there too",
                           path, error.strerror or error)
            return None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                handle.close()
                raise ValueError(f"{what} is being run by {holder} ({path} is locked); let it finish or stop it, "
                                 "then run this again") from None
            logger.info("%s is being run by %s: waiting for it", what, holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks (some network mounts): go on, unguarded
            handle.close()
            logger.warning("cannot lock %s (%s): nothing stops a second process from writing there too", path,
                           error)
            return None
        if names_the_file(path, handle):
            return handle
        handle.close()  # the holder removed the file we opened: lock the new one
