"""ABX item files: reading them, and turning each item's times into a slice of frames.

An item file lists the speech segments ABX compares, one per row, with the columns
``#file onset offset #phone prev-phone next-phone speaker`` (ZeroSpeech 2021 / Libri-light layout; extra columns are
kept as labels). Three encodings are read, as fastabx reads them: ``.item`` (whitespace separated, one header line),
``.csv`` (comma separated, one header line) and ``.jsonl`` / ``.ndjson`` (one object per row).

Times are parsed as ``Decimal`` so that frame boundaries are exact: ``0.315 s · 50 Hz`` must be 15.75, not
15.749999. Frame ``i`` of features at ``f`` Hz is centred at ``(i + ½) / f`` seconds and belongs to an item when its
centre lies within ``[onset, offset]``, which gives ``start = ceil(onset·f − ½)`` and ``end = floor(offset·f − ½)``
inclusive. The Libri-light / ZeroSpeech 2021 code sliced ``[start, end)`` instead, dropping the last frame; that
behaviour is available as ``librilight_bug=True`` to reproduce published numbers.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from spidr.input_files import existing_file
from spidr.text_files import utf8_errors_named

FILE_COLUMN = "#file"
ONSET_COLUMN = "onset"
OFFSET_COLUMN = "offset"
PHONE_COLUMN = "#phone"
PREV_COLUMN = "prev-phone"
NEXT_COLUMN = "next-phone"
SPEAKER_COLUMN = "speaker"
TIME_COLUMNS = (FILE_COLUMN, ONSET_COLUMN, OFFSET_COLUMN)
HALF = Decimal("0.5")


@dataclass(frozen=True)
class Items:
    """The rows of an item file, column by column.

    ``files[i]`` is the feature file (relative path without extension) of item ``i``, ``onsets[i]`` /
    ``offsets[i]`` its times in seconds, and ``labels[name][i]`` the value of every other column, as a string.
    ``source`` names where the items came from, and ``lines[i]`` the line of item ``i`` in that file (None for
    items not read from a file), for error messages.
    """

    files: tuple[str, ...]
    onsets: tuple[Decimal, ...]
    offsets: tuple[Decimal, ...]
    labels: Mapping[str, tuple[str, ...]]
    source: str = "<items>"
    lines: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def where(self, i: int) -> str:
        """Which item ``i`` is: the one on its line of the item file (the header counts), else by its number."""
        return f"the item on line {self.lines[i]}" if self.lines is not None else f"item {i + 1}"

    def of_files(self, available: Container[str]) -> Items:
        """The items whose #file is in ``available`` (e.g. the features' mapping, when only some utterances have
        features), in order, each keeping its line; ``self`` when all are."""
        keep = [i for i, name in enumerate(self.files) if name in available]
        if len(keep) == len(self):
            return self
        return Items(
            files=tuple(self.files[i] for i in keep),
            onsets=tuple(self.onsets[i] for i in keep),
            offsets=tuple(self.offsets[i] for i in keep),
            labels={name: tuple(values[i] for i in keep) for name, values in self.labels.items()},
            source=self.source,
            lines=None if self.lines is None else tuple(self.lines[i] for i in keep),
        )

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence[object]], *, source: str = "<items>",
                     lines: Sequence[int] | None = None) -> Items:
        """Build items from ``{column: values}``; times may be ``Decimal``, ``str``, ``int`` or ``float``.

        Floats go through ``str`` (``0.1`` → ``Decimal("0.1")``), which is exact for values typed as decimals.
        """
        missing = [name for name in TIME_COLUMNS if name not in columns]
        if missing:
            raise ValueError(f"{source}: missing column(s) {missing}; expected at least {list(TIME_COLUMNS)}")
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{source}: columns have different lengths {lengths}")
        numbers = None if lines is None else tuple(lines)
        where = (lambda i: f"line {numbers[i]}") if numbers is not None else (lambda i: f"row {i + 1}")
        onsets = tuple(_parse_time(v, source, ONSET_COLUMN, where(i)) for i, v in enumerate(columns[ONSET_COLUMN]))
        offsets = tuple(_parse_time(v, source, OFFSET_COLUMN, where(i)) for i, v in enumerate(columns[OFFSET_COLUMN]))
        labels = {
            name: tuple(str(v) for v in values) for name, values in columns.items() if name not in TIME_COLUMNS
        }
        files = tuple(str(v) for v in columns[FILE_COLUMN])
        return cls(files=files, onsets=onsets, offsets=offsets, labels=labels, source=source, lines=numbers)

    def column(self, name: str) -> tuple[str, ...]:
        """Labels of one column; a clear error names the columns present when it is absent."""
        if name not in self.labels:
            raise ValueError(f"{self.source}: no column {name!r}; the item file has {sorted(self.labels)}")
        return self.labels[name]


def _parse_time(value: object, source: str, column: str, where: str) -> Decimal:
    try:
        time = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{source}: {where}: {column} = {value!r} is not a number of seconds") from None
    if not time.is_finite():
        raise ValueError(f"{source}: {where}: {column} = {value!r} is not a finite number of seconds")
    return time


def read_items(path: str | Path) -> Items:
    """Read an ``.item``, ``.csv`` or ``.jsonl``/``.ndjson`` item file (see the module docstring)."""
    path = Path(path)
    existing_file(path, "item file")
    with utf8_errors_named(path, "the item file"):
        match path.suffix:
            case ".item":
                columns, lines = _read_delimited(path, separator=None)
            case ".csv":
                columns, lines = _read_delimited(path, separator=",")
            case ".jsonl" | ".ndjson":
                columns, lines = _read_jsonl(path)
            case other:
                raise ValueError(f"item file {path}: extension {other!r} is not supported; use .item, .csv or "
                                 ".jsonl")
    if not columns or not next(iter(columns.values())):
        raise ValueError(f"item file {path} has no items")
    return Items.from_columns(columns, source=str(path), lines=lines)


def _read_delimited(path: Path, *, separator: str | None) -> tuple[dict[str, list[str]], list[int]]:
    """Header line then rows; ``separator=None`` splits on runs of whitespace (the ``.item`` format). Also returns
    each row's line number in the file (blank lines are skipped, and counted)."""
    # utf-8-sig: a spreadsheet's byte-order mark would otherwise glue onto "#file"
    with path.open(newline="", encoding="utf-8-sig") as handle:
        numbered = [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
    if not numbered:
        return {}, []
    numbers = [number for number, _ in numbered]
    lines = [line for _, line in numbered]
    rows = (
        [line.split() for line in lines] if separator is None else list(csv.reader(lines, delimiter=separator))
    )
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header):
        raise ValueError(f"item file {path}: duplicate column names in header {header}")
    columns: dict[str, list[str]] = {name: [] for name in header}
    for number, row in zip(numbers[1:], rows[1:], strict=True):
        if len(row) != len(header):
            raise ValueError(
                f"item file {path}: line {number} has {len(row)} fields, the header has {len(header)} ({header})"
            )
        for name, value in zip(header, row, strict=True):
            columns[name].append(value.strip())
    return columns, numbers[1:]


def _read_jsonl(path: Path) -> tuple[dict[str, list[object]], list[int]]:
    columns: dict[str, list[object]] = {}
    numbers: list[int] = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                # parse_float=Decimal keeps "0.315" exact instead of going through binary floating point.
                row = json.loads(line, parse_float=Decimal)
            except json.JSONDecodeError as error:
                raise ValueError(f"item file {path}: line {number} is not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise ValueError(f"item file {path}: line {number} is not a JSON object")
            if not columns:
                columns = {name: [] for name in row}
            if set(row) != set(columns):
                raise ValueError(f"item file {path}: line {number} has keys {sorted(row)}, expected {sorted(columns)}")
            for name, value in row.items():
                columns[name].append(value)
            numbers.append(number)
    return columns, numbers


def decimal_frequency(frequency: int | str | Decimal | float) -> Decimal:
    """The feature rate in Hz as a ``Decimal``; non-integer floats are refused since they are not exact."""
    if isinstance(frequency, bool):
        raise ValueError(f"frequency = {frequency!r} is invalid: expected a number of Hz")
    if isinstance(frequency, float):
        if not frequency.is_integer():
            raise ValueError(f"frequency = {frequency!r}: pass a non-integer rate as a string (e.g. '12.5')")
        frequency = int(frequency)
    try:
        value = Decimal(str(frequency))
    except InvalidOperation:
        raise ValueError(f"frequency = {frequency!r} is not a number of Hz") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"frequency = {frequency!r} is invalid: expected a positive number of Hz")
    return value


def frame_bounds(
    items: Items, frequency: int | str | Decimal | float, *, librilight_bug: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """First frame and one-past-last frame of every item: two int64 arrays of shape (num_items,).

    ``start = ceil(onset·f − ½)`` and ``end = floor(offset·f − ½) + 1`` (exclusive), or without the ``+ 1`` in
    Libri-light bug mode. Bounds are not checked here; see ``check_nonempty`` and ``check_within``.
    """
    rate = decimal_frequency(frequency)
    starts = [int((onset * rate - HALF).to_integral_value(rounding=ROUND_CEILING)) for onset in items.onsets]
    last = 0 if librilight_bug else 1
    ends = [int((offset * rate - HALF).to_integral_value(rounding=ROUND_FLOOR)) + last for offset in items.offsets]
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def check_nonempty(items: Items, starts: np.ndarray, ends: np.ndarray) -> None:
    """Raise ``ValueError`` listing the items that select no frame at all."""
    empty = np.flatnonzero(ends <= starts)
    if empty.size:
        shown = ", ".join(f"{items.files[i]} [{items.onsets[i]}, {items.offsets[i]}] ({items.where(i)})"
                          for i in empty[:5].tolist())
        raise ValueError(
            f"{items.source}: {empty.size} item(s) are shorter than one frame at this frequency (check the frequency; "
            f"remove such items to evaluate units this large): {shown}{', ...' if empty.size > 5 else ''}"
        )


def check_within(items: Items, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, num_frames: int) -> None:
    """Raise ``ValueError`` if an item of ``rows`` (all of one file) runs past that file's ``num_frames`` frames."""
    bad = rows[(starts[rows] < 0) | (ends[rows] > num_frames)]
    if bad.size:
        i = int(bad[np.argmax(ends[bad])])  # the furthest: the first past the end may be off by a frame alone
        short_by = int(ends[i]) - num_frames
        why = ("usually the model drops the last frame (convolutions without padding) and the item ends with the "
               "file; pad the audio with a little trailing silence or the convolutions" if 0 < short_by <= 2 else
               "check the features' frame rate (frequency; --frequency on the command line), that they are (T, D) "
               "and not (D, T), and that they were computed on this item file's audio")
        raise ValueError(
            f"features of {items.files[i]!r} have {num_frames} frames but {items.where(i)} of {items.source} "
            f"([{items.onsets[i]}, {items.offsets[i]}] s) needs frames [{starts[i]}, {ends[i]}): {why}"
        )
