"""ZeroSpeech 2021 (sLM21) and spoken StoryCloze file formats: gold files and submission files.

Benchmark layout (one ``gold.csv`` per task and split; ``filename`` is the wav stem, without extension):

* ``lexical/{dev,test}/gold.csv`` (sWUGGY): ``id,filename,voice,frequency,word,phones,length,correct``.
  ``correct`` is 1 for the word and 0 for its nonword(s); a word and its nonwords share ``id`` and ``voice``.
  ``frequency`` is the word's count in the LM training data (empty = unknown), ``length`` its number of phones.
* ``syntactic/{dev,test}/gold.csv`` (sBLIMP): ``id,filename,voice,type,subtype,transcription,correct``.
* ``tsc/{dev,test}/gold.csv`` and ``ssc/...`` (topic / spoken StoryCloze): ``id,filename,voice,type,transcription,
  correct``, one correct and one incorrect story per (id, voice). The real spoken StoryCloze release has no gold
  file: its wavs are named ``{n}_{prefix_id}_{correct|incorrect}.wav``, which
  :func:`storycloze_gold_from_filenames` turns into the same rows.

Extra columns are tolerated (and dropped); every required field is validated, and errors name the file, the line
and the column.

Submission layout: ``lexical/dev.txt``, ``syntactic/dev.txt``, ``tsc/dev.txt``, ``ssc/dev.txt`` (likewise
``test.txt``), one line ``<stem> <score>`` per wav of the split, where the score is any pseudo log-probability
(higher = more likely). Every wav must appear exactly once.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

from spidr.atomic_files import replaced_when_done, write_atomically
from spidr.input_files import existing_file
from spidr.text_files import CsvRows, utf8_errors_named

logger = logging.getLogger(__name__)

LEXICAL_COLUMNS = ("id", "filename", "voice", "frequency", "word", "phones", "length", "correct")
SYNTACTIC_COLUMNS = ("id", "filename", "voice", "type", "subtype", "transcription", "correct")
STORYCLOZE_COLUMNS = ("id", "filename", "voice", "type", "transcription", "correct")

# The toolkit's frequency bands, ``pandas.cut(frequency, [0, 1, 5, 20, 100, inf], right=False)``: a word seen 5 times
# is in "6-20" despite the label.
FREQUENCY_BANDS = (("oov", 0.0, 1.0), ("1-5", 1.0, 5.0), ("6-20", 5.0, 20.0), ("21-100", 20.0, 100.0),
                   (">100", 100.0, math.inf))

# ``{n}_{prefix_id}_{correct|incorrect}``: n is an integer, the prefix id may itself hold underscores.
STORYCLOZE_STEM = re.compile(r"(?P<n>\d+)_(?P<prefix>.+)_(?P<label>correct|incorrect)")


def frequency_band(frequency: float | None) -> str | None:
    """The toolkit's band of a word frequency (intervals closed on the left), None when unknown."""
    if frequency is None:
        return None
    for label, low, high in FREQUENCY_BANDS:
        if low <= frequency < high:
            return label
    return None


@dataclass(frozen=True)
class LexicalItem:
    """One wav of sWUGGY: a word (``correct``) or one of its nonwords."""

    id: str
    filename: str
    voice: str
    frequency: int | None  # count of the word in the LM training data; None = unknown
    word: str
    phones: str
    length: int  # number of phones
    correct: bool


@dataclass(frozen=True)
class SyntacticItem:
    """One wav of sBLIMP: a grammatical (``correct``) or ungrammatical sentence."""

    id: str
    filename: str
    voice: str
    type: str
    subtype: str
    transcription: str
    correct: bool


@dataclass(frozen=True)
class StoryClozeItem:
    """One wav of tSC / sSC: a story with its true (``correct``) or a false ending."""

    id: str
    filename: str
    voice: str
    type: str
    transcription: str
    correct: bool


GoldItem = LexicalItem | SyntacticItem | StoryClozeItem
Item = TypeVar("Item", LexicalItem, SyntacticItem, StoryClozeItem)


# --------------------------------------------------------------------------------------------------------------------
# Field parsers: each takes the raw CSV text and returns the value, or raises ValueError saying what was expected.


def _text(value: str) -> str:
    return value


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("expected a non-empty value")
    return value


def is_stem(value: str) -> bool:
    """Whether ``value`` can name an item in ZeroSpeech files: a wav stem, non-empty, without whitespace (a
    submission line is ``<stem> <score>``), not starting with a byte-order mark (the readers take one at the start of
    a file for the file's, not the first stem's)."""
    return bool(value) and not any(character.isspace() for character in value) and not value.startswith("\ufeff")


def _stem(value: str) -> str:
    if not is_stem(value):
        raise ValueError("expected a wav stem: non-empty, without whitespace")
    return value


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        # "3.0": pandas writes an integer column that has empty cells (nonword rows) as floats, and the toolkit
        # reads such a file (``astype(Int64Dtype())``)
        try:
            real = float(value)
        except ValueError:
            raise ValueError("expected a non-negative integer") from None
        if not real.is_integer():
            raise ValueError("expected a non-negative integer") from None
        number = int(real)
    if number < 0:
        raise ValueError("expected a non-negative integer")
    return number


def _optional_count(value: str) -> int | None:
    return None if value == "" else _count(value)


def _correct(value: str) -> bool:
    if value not in {"0", "1"}:
        raise ValueError("expected 1 (correct) or 0 (incorrect)")
    return value == "1"


PARSERS: dict[str, Callable[[str], object]] = {
    "id": _non_empty,
    "filename": _stem,
    "voice": _text,
    "frequency": _optional_count,
    "word": _text,
    "phones": _text,
    "length": _count,
    "type": _text,
    "subtype": _text,
    "transcription": _text,
    "correct": _correct,
}


def _read_gold(path: str | Path, item_type: type[Item]) -> list[Item]:
    path = Path(path)
    existing_file(path, "gold file")
    columns = [field.name for field in fields(item_type)]
    items: list[Item] = []
    seen: dict[str, int] = {}
    # utf-8-sig: a spreadsheet-saved file starts with a byte-order mark that would otherwise glue onto "id".
    with utf8_errors_named(path, "the gold file"), path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        # (stripped, as the values are: a file written with ', ' between fields reads as the released one)
        header = reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        if not header:
            raise ValueError(f"gold file {path} is empty: expected a header line {','.join(columns)} and rows")
        missing = [column for column in columns if column not in header]
        if missing:
            raise ValueError(f"{path}: header {','.join(header)!r} lacks the column(s) {', '.join(missing)} "
                             f"(expected {','.join(columns)})")
        for row in reader:
            line = reader.line_num
            if None in row:  # csv puts the fields beyond the header's under None (e.g. an unquoted comma in a text)
                raise ValueError(f"{path}: line {line}: has {len(header) + len(row[None])} fields, the header "
                                 f"{len(header)} (quote a field that holds a comma)")
            values = {}
            for column in columns:
                raw = row[column]
                if raw is None:  # a short row: csv fills the absent trailing fields with None
                    raise ValueError(f"{path}: line {line}: has fewer fields than the header")
                try:
                    values[column] = PARSERS[column](raw.strip())
                except ValueError as error:
                    raise ValueError(f"{path}: line {line}, column {column!r}: {error}, found {raw!r}") from None
            item = item_type(**values)
            if item.filename in seen:
                raise ValueError(f"{path}: line {line}: filename {item.filename!r} already on line "
                                 f"{seen[item.filename]}")
            seen[item.filename] = line
            items.append(item)
    if not items:
        raise ValueError(f"gold file {path} has no row")
    return items


def _write_gold(path: str | Path, items: Iterable[GoldItem], columns: Sequence[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_when_done(path) as partial, partial.open("w", newline="", encoding="utf-8") as handle:
        writer = CsvRows(handle)
        writer.writerow(columns)
        for item in items:
            row = []
            for column in columns:
                value = getattr(item, column)
                if isinstance(value, bool):
                    value = int(value)
                if isinstance(value, str) and value != value.strip():  # (read back stripped: "a " and "a" one id)
                    raise ValueError(f"cannot write {column} = {value!r} of {item.filename!r} to {path}: the gold "
                                     "file's fields are read stripped of surrounding white space")
                row.append("" if value is None else value)
            writer.writerow(row)


def read_lexical_gold(path: str | Path) -> list[LexicalItem]:
    """Rows of a sWUGGY ``gold.csv`` (columns :data:`LEXICAL_COLUMNS`), in file order."""
    return _read_gold(path, LexicalItem)


def read_syntactic_gold(path: str | Path) -> list[SyntacticItem]:
    """Rows of a sBLIMP ``gold.csv`` (columns :data:`SYNTACTIC_COLUMNS`), in file order."""
    return _read_gold(path, SyntacticItem)


def read_storycloze_gold(path: str | Path) -> list[StoryClozeItem]:
    """Rows of a tSC / sSC ``gold.csv`` (columns :data:`STORYCLOZE_COLUMNS`), in file order."""
    return _read_gold(path, StoryClozeItem)


def write_lexical_gold(path: str | Path, items: Iterable[LexicalItem]) -> None:
    """Write a sWUGGY ``gold.csv``; an unknown frequency is written as an empty field."""
    _write_gold(path, items, LEXICAL_COLUMNS)


def write_syntactic_gold(path: str | Path, items: Iterable[SyntacticItem]) -> None:
    """Write a sBLIMP ``gold.csv``."""
    _write_gold(path, items, SYNTACTIC_COLUMNS)


def write_storycloze_gold(path: str | Path, items: Iterable[StoryClozeItem]) -> None:
    """Write a tSC / sSC ``gold.csv``."""
    _write_gold(path, items, STORYCLOZE_COLUMNS)


def storycloze_gold_from_filenames(directory: str | Path) -> list[StoryClozeItem]:
    """StoryCloze rows from a folder of ``{n}_{prefix_id}_{correct|incorrect}.wav`` files (the real release).

    ``id`` is the prefix id (the pairs are grouped by it), ``voice``, ``type`` and ``transcription`` are empty.
    Rows come sorted by ``(n, prefix_id)``, the correct story first. Every prefix id must have exactly one correct
    and one incorrect wav, and every wav of the folder must follow the naming scheme.
    """
    directory = Path(directory)
    wavs = sorted(directory.glob("*.wav"))
    if not wavs:
        raise ValueError(f"{directory} holds no .wav file")
    labels: dict[str, dict[str, list[str]]] = {}
    order: dict[str, int] = {}
    for wav in wavs:
        match = STORYCLOZE_STEM.fullmatch(wav.stem)
        if match is None:
            raise ValueError(f"{wav}: expected a name of the form {{n}}_{{prefix_id}}_{{correct|incorrect}}.wav")
        prefix = match["prefix"]
        labels.setdefault(prefix, {"correct": [], "incorrect": []})[match["label"]].append(wav.stem)
        order[prefix] = min(order.get(prefix, int(match["n"])), int(match["n"]))
    items = []
    for prefix in sorted(labels, key=lambda prefix: (order[prefix], prefix)):
        correct, incorrect = labels[prefix]["correct"], labels[prefix]["incorrect"]
        if len(correct) != 1 or len(incorrect) != 1:
            raise ValueError(f"{directory}: prefix id {prefix!r} has {len(correct)} correct and {len(incorrect)} "
                             f"incorrect wavs ({', '.join(correct + incorrect)}); expected one of each")
        items.append(StoryClozeItem(prefix, correct[0], "", "", "", correct=True))
        items.append(StoryClozeItem(prefix, incorrect[0], "", "", "", correct=False))
    return items


# --------------------------------------------------------------------------------------------------------------------
# Submission files


def read_submission(path: str | Path) -> dict[str, float]:
    """``{stem: score}`` from a ``<stem> <score>`` file; blank lines are skipped.

    Refuses lines without exactly two fields (split on whitespace, so a tab is accepted like a space), scores that
    are not floats or are NaN, and a stem given twice. Infinite scores are accepted (a log-probability may be −inf).
    Lines that the official ZeroSpeech 2021 validator refuses (it splits each line on one space and takes no blank
    line) are read, and named in one warning: the file would not pass the official submission check as it is.
    """
    path = Path(path)
    existing_file(path, "submission file")
    scores: dict[str, float] = {}
    lines: dict[str, int] = {}
    unofficial: list[int] = []  # lines the official validator refuses
    with utf8_errors_named(path, "the submission file"), path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            # A byte-order mark (an editor's or a spreadsheet's) is not part of the first stem here; the official
            # validator reads it as part of it, and refuses line 1.
            byte_order_mark = number == 1 and line.startswith("\ufeff")
            line = line.removeprefix("\ufeff") if byte_order_mark else line
            if byte_order_mark or len(line.strip().split(" ")) != 2:  # the official check, word for word
                unofficial.append(number)
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}: line {number}: expected '<stem> <score>', found {line.rstrip()!r}")
            stem, text = parts
            try:
                score = float(text)
            except ValueError:
                raise ValueError(f"{path}: line {number}: score {text!r} of {stem!r} is not a float") from None
            if math.isnan(score):
                raise ValueError(f"{path}: line {number}: score of {stem!r} is NaN")
            if stem in scores:
                raise ValueError(f"{path}: line {number}: stem {stem!r} already on line {lines[stem]}")
            scores[stem] = score
            lines[stem] = number
    if not scores:
        raise ValueError(f"submission file {path} has no line")
    if unofficial:
        shown = ", ".join(str(number) for number in unofficial[:5]) + (" ..." if len(unofficial) > 5 else "")
        logger.warning("%s: %d line(s) (%s) are not '<stem> <score>' with one space, which the official ZeroSpeech "
                       "2021 validator refuses (blank lines, tabs, several spaces, a byte-order mark); read here all "
                       "the same", path, len(unofficial), shown)
    return scores


def write_submission(path: str | Path, scores: Mapping[str, float]) -> None:
    """Write ``<stem> <score>`` lines sorted by stem; scores are written with ``repr`` so that a round trip through
    :func:`read_submission` is bit-exact."""
    path = Path(path)
    text = submission_text(path, scores)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text)  # a kill while writing leaves the earlier file, not a cut one


def submission_text(path: str | Path, scores: Mapping[str, float]) -> str:
    """The lines ``write_submission`` writes to ``path`` (named in errors: a stem a line cannot hold, a NaN)."""
    lines = []
    for stem in sorted(scores):
        score = float(scores[stem])  # numpy scalars would otherwise be written as 'np.float64(...)'
        if not is_stem(stem):
            raise ValueError(f"cannot write stem {stem!r} to {path}: stems must be non-empty, without whitespace, "
                             "not starting with a byte-order mark")
        if math.isnan(score):
            raise ValueError(f"cannot write the NaN score of {stem!r} to {path}")
        lines.append(f"{stem} {score!r}\n")
    return "".join(lines)


def score_number(value: object, stem: str, where: str | Path | None = None) -> float:
    """An item's score as a float: any real number (a float, an int, a numpy or 0-d torch scalar, a Decimal); an
    ``ItemScore`` or other object is refused, saying which number to give."""
    try:
        if isinstance(value, (str, bytes)):  # (float() reads "1.5"; the tasks would compare the strings)
            raise TypeError
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        prefix = f"{where}: " if where is not None else ""
        raise TypeError(f"{prefix}the score of {stem!r} is {type(value).__name__}, not a number: give each item one "
                        "float (an ItemScore's .mean, lm-score's default norm, or .logprob)") from None


def check_complete(scores: Mapping[str, float], gold_rows: Iterable[GoldItem], where: str | Path) -> None:
    """Raise if ``scores`` misses a wav of ``gold_rows`` or scores a stem the gold does not list.

    The message starts with ``where`` (the submission file) and gives the counts and a few stems of each kind.
    """
    for stem, value in scores.items():
        if math.isnan(score_number(value, stem, where)):
            raise ValueError(f"{where}: the score of {stem!r} is NaN")
    expected = {row.filename for row in gold_rows}
    missing = sorted(expected - scores.keys())
    extra = sorted(scores.keys() - expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} stem(s) of the gold file missing ({_some(missing)})")
    if extra:
        problems.append(f"{len(extra)} stem(s) not in the gold file ({_some(extra)})")
    if problems:
        raise ValueError(f"{where}: {' and '.join(problems)}; expected exactly one line per wav "
                         f"({len(expected)} in all)")


def _some(names: Sequence[str], count: int = 3) -> str:
    shown = ", ".join(repr(name) for name in names[:count])
    return shown + (", ..." if len(names) > count else "")
