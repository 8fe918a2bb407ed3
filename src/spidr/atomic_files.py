"""Files written whole or not at all: a temporary name beside the target, renamed over it once complete.

A reader (or a rerun that takes an existing file as done) then sees either the earlier file or the complete new
one, never a truncated file left by a crash or a kill. Checkpoints add fsyncs on top (``train.checkpoint``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """The hidden temporary name this process writes ``path`` under: ``.<name>.<host>-<pid>.partial`` in the same
    folder (so that the rename stays on one file system), ``<host>`` 6 hex digits of the host name's hash (a name
    near the file system's 255 bytes still fits). It is the writer's own: with one name for every writer, a second
    run writing the same output (a command started twice) renamed the first one's half-written file into place, and
    the first then failed or said it was done."""
    return path.with_name(f".{path.name}.{_writer()}{PARTIAL_SUFFIX}")


def new_partial_path(path: Path) -> Path:
    """``partial_path(path)``, after removing the temporaries of ``path`` that killed writers on this host left
    (their process is gone; ``.<name>.partial``, the name of earlier versions, too)."""
    path.with_name(f".{path.name}{PARTIAL_SUFFIX}").unlink(missing_ok=True)
    if os.name == "posix":  # (os.kill(pid, 0) is no liveness test elsewhere)
        prefix, host = f".{path.name}.", _host()
        for stale in path.parent.glob(f"{glob.escape(prefix + host)}-*{PARTIAL_SUFFIX}"):
            pid = stale.name[len(prefix) + len(host) + 1 : -len(PARTIAL_SUFFIX)]
            if pid.isdigit() and not _alive(int(pid)):
                stale.unlink(missing_ok=True)
    return partial_path(path)


def _writer() -> str:
    return f"{_host()}-{os.getpid()}"


def _host() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def replaced_when_done(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to; when the block ends without an error it is renamed
    over ``path``, otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    partial = new_partial_path(path)
    # Made here first, so that it gets the permissions of any new file in its folder (the umask, or the folder's
    # default ACL); a writer that makes its own file (safetensors: 0600) is set back to them, so that an exported
    # model or centroids file stays readable by the rest of a group on a shared cluster.
    partial.unlink(missing_ok=True)  # (this process's, left by an earlier write that failed to clean up)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    intended = stat.S_IMODE(os.stat(partial).st_mode)
    try:
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
        raise type(error)(error.errno, error.strerror, str(path)) from None


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``replaced_when_done``."""
    with replaced_when_done(path) as partial:
        partial.write_text(text, encoding="utf-8")


def save_figure(figure: Any, path: str | Path, *, dpi: int) -> None:
    """Save a matplotlib figure as PNG through ``replaced_when_done``: a failed or killed save leaves no truncated
    image (the earlier one stays)."""
    with replaced_when_done(path) as partial:
        figure.savefig(partial, dpi=dpi, format="png")
