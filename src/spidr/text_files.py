"""Errors for text inputs that are not UTF-8: the message names the file, the first line that is not, and the bytes
around the fault (``UnicodeDecodeError`` alone gives a byte offset and no file)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


def not_utf8(path: str | Path, what: str) -> str:
    """The error message for ``path`` (described as ``what``, e.g. "the manifest") that is not UTF-8 text."""
    path = Path(path)
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return (f"{path}:{number}: not UTF-8 text ({line[max(error.start - 10, 0) : error.end + 10]!r}); "
                        f"save {what} as UTF-8")
    return f"{path}: not UTF-8 text; save {what} as UTF-8"


@contextlib.contextmanager
def utf8_errors_named(path: str | Path, what: str) -> Iterator[None]:
    """Within the block that reads ``path`` as text, a ``UnicodeDecodeError`` becomes a ``ValueError`` whose
    message is ``not_utf8``'s (the file, its first line that is not UTF-8, and what to do)."""
    try:
        yield
    except UnicodeDecodeError:
        raise ValueError(not_utf8(path, what)) from None
