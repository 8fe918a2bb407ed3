"""One writer per output folder: a process holds ``<folder>/.lock`` exclusively while it writes there.

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
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold ``folder/.lock`` (the folder is created) for the block, or raise ``ValueError`` naming ``what`` (e.g.
    "the extraction into feats/") and the process that holds it; with ``wait``, wait for that process instead (a
    corpus that another process is making is then reused)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                raise ValueError(f"{what} is being run by {holder} ({path} is locked); let it finish or stop it, "
                                 "then run this again") from None
            logger.info("%s is being run by %s: waiting for it", what, holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks (some network mounts): go on, unguarded
            logger.warning("cannot lock %s (%s): nothing stops a second process from writing there too", path,
                           error)
            yield
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        _held.add(handle.fileno())
        try:
            yield
        finally:
            _held.discard(handle.fileno())
