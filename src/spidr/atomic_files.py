"""Files written whole or not at all: a temporary name beside the target, renamed over it once complete.

A reader (or a rerun that takes an existing file as done) then sees either the earlier file or the complete new
one, never a truncated file left by a crash or a kill. Checkpoints add fsyncs on top (``train.checkpoint``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """The hidden temporary name ``path`` is written under: ``.<name>.partial`` in the same folder (so that the
    rename stays on one file system)."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


@contextmanager
def replaced_when_done(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to; when the block ends without an error it is renamed
    over ``path``, otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    partial = partial_path(path)
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    # The permissions any new file gets (0666 less the umask): safetensors creates its files 0600, so an exported
    # model or centroids file could not be read by the rest of a group on a shared cluster.
    os.chmod(partial, 0o666 & ~_umask())
    os.replace(partial, path)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # (not thread-safe for an instant; only where /proc has no answer)
    os.umask(mask)
    return mask


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``replaced_when_done``."""
    with replaced_when_done(path) as partial:
        partial.write_text(text, encoding="utf-8")
