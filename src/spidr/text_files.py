"""Errors for text inputs that are not UTF-8: the message names the file, the first line that is not, and the bytes
around the fault (``UnicodeDecodeError`` alone gives a byte offset and no file)."""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO


def first_non_utf8_line(path: str | Path) -> tuple[int, bytes] | None:
    """The number of the first line of ``path`` (gzip-compressed when it ends in ``.gz``) that is not UTF-8, with
    the bytes around the fault; None when every line is. Read in bounded pieces (a binary file given by mistake may
    hold no newline), each decoded where the last one stopped."""
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    number, last = 1, b""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as handle:
        while piece := handle.readline(1 << 20):
            try:
                decoder.decode(piece)
            except UnicodeDecodeError as error:
                return number, piece[max(error.start - 10, 0) : error.end + 10]
            number += piece.endswith(b"\n")
            last = piece
    try:
        decoder.decode(b"", final=True)  # a sequence cut short by the end of the file
    except UnicodeDecodeError:
        return number, last[-10:]
    return None


def not_utf8(path: str | Path, what: str) -> str:
    """The error message for ``path`` (described as ``what``, e.g. "the manifest") that is not UTF-8 text."""
    found = first_non_utf8_line(path)
    if found is None:
        return f"{path}: not UTF-8 text; save {what} as UTF-8"
    return f"{path}:{found[0]}: not UTF-8 text ({found[1]!r}); save {what} as UTF-8"


@contextlib.contextmanager
def utf8_errors_named(path: str | Path, what: str) -> Iterator[None]:
    """Within the block that reads ``path`` as text, a ``UnicodeDecodeError`` becomes a ``ValueError`` whose
    message is ``not_utf8``'s (the file, its first line that is not UTF-8, and what to do)."""
    try:
        yield
    except UnicodeDecodeError:
        raise ValueError(not_utf8(path, what)) from None


class CsvRows:
    """``csv.writer(handle, lineterminator="\\n")`` that also quotes a field holding a bare carriage return: minimal
    quoting quotes only the characters of the line terminator it is given, while the csv reader ends a line at a
    bare "\\r", so such a field (a file name may hold one) split its row in two when read back."""

    def __init__(self, handle: IO[str]) -> None:
        self._minimal = csv.writer(handle, lineterminator="\n")
        self._quoted = csv.writer(handle, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)

    def writerow(self, row: Sequence[object]) -> None:
        carriage_return = any(isinstance(field, str) and "\r" in field for field in row)
        (self._quoted if carriage_return else self._minimal).writerow(row)

    def writerows(self, rows: Iterable[Sequence[object]]) -> None:
        for row in rows:
            self.writerow(row)
