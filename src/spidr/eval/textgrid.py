"""Praat TextGrid phone alignments, as the Montreal Forced Aligner (MFA) writes them: one ``.TextGrid`` per utterance.

A TextGrid reads as the interval TSV of its ``phones`` tier (``unit_quality.interval_frames``, the TSV reader's own
code: the same exact frames at the alignment rate, the same refusals of overlapping intervals and of frames that no
interval covers), one utterance per file, with MFA's silences written ``SIL``:

* the tier is the interval tier named ``phones`` (any case; MFA's name), whatever other tiers (``words``) the file
  holds; a file without one is refused, naming the file and its tiers;
* MFA's silence labels, the empty label (MFA 2 and later) and ``sil`` / ``sp`` (MFA 1), become ``SIL``, the
  silence phone of the corpus and of SpidR's LibriSpeech alignments (spec corpus.md, evaluation §10): PNMI counts one
  silence class, whichever MFA wrote. ``spn`` (spoken noise: a word MFA had no pronunciation for) is kept as a label
  of its own, speech of unknown phones; like every label of ``unit_quality.SILENCE_LABELS`` it makes no ABX item
  (``spidr items``) and is left out of the probe's phone sequences;
* times are read as written (the Decimal of the file's text, as the TSV reader reads its columns), so a TextGrid and
  the TSV of the same numbers give the same frames, even for a boundary at a frame's centre.

ALIGNMENTS may be one ``.TextGrid`` file or a folder of them (searched recursively, links followed, ``.gz`` read;
the suffix in any case). An utterance is named by its file's stem (``84-121123-0000.TextGrid`` →
``84-121123-0000``), as ``spidr extract`` names features and units; where two files share a stem (TIMIT's
``dr1/fcjf0/sa1`` and ``dr1/mdab0/sa1``), each is named by its path below the folder without the suffix, as
``spidr extract`` then names them (``feature_dir.utterance_name``): never one file over another. The speaker of each
utterance (``spidr items``) is the folder that holds its TextGrid, as MFA takes a corpus's speaker folders
(``OUT/<speaker>/<utterance>.TextGrid``), or a folder above it that the name begins with (LibriSpeech's
``OUT/84/121123/84-121123-0000.TextGrid``: speaker 84, not chapter 121123), when every TextGrid of the folder lies
in a subfolder; otherwise, and for a single file, ``--speaker-pattern`` finds it in the name, as for an interval TSV
without a speaker column. A file cut short (its phone tier ending before its ``xmax``), a tier of MFA's files of
several speakers (``<speaker> - phones``) and an older Praat header are told apart; macOS's ``._`` companions are
not TextGrids.

Praat's two text formats ("long" and "short") are parsed by praatio (``spidr[eval]``), whose raw parse keeps the
times as written; UTF-8 and Praat's UTF-16 (with its byte order mark) are read. Praat's binary TextGrids are refused.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import ModuleType

from spidr.folder_walk import printable, walk_following_links

logger = logging.getLogger(__name__)

SUFFIX = ".textgrid"  # (compared in lower case: Praat and MFA write .TextGrid)
PHONE_TIER = "phones"
MFA_SILENCE = frozenset({"", "sil", "sp"})  # (lower case) MFA's silence labels, read as SILENCE
SILENCE = "SIL"
PURPOSE = "reading TextGrid alignments"
# (older Praat short text files write the class as a bare "TextGrid" line)
_HEADER = re.compile(r'\s*File type = "ooTextFile(?: short)?"\s*\n\s*(?:Object class = )?"TextGrid"')


# A time below 0: "xmin = -0.5" (long format) or a bare "-0.5" line (short format; labels are quoted)
_NEGATIVE_TIME = re.compile(r"(?m)^[ \t]*(?:x(?:min|max) = )?-[ \t]*\d[^\n]*")


def is_textgrid_name(name: str) -> bool:
    """Whether a file name is a TextGrid's (``x.TextGrid``, ``x.textgrid``, ``x.TextGrid.gz``)."""
    name = name.lower().removesuffix(".gz")
    return name.endswith(SUFFIX) and len(name) > len(SUFFIX)


def holds_textgrids(path: str | Path) -> bool:
    """Whether alignments at ``path`` are TextGrids: a folder (of TextGrids: ``textgrid_files`` checks), or a file
    named as a TextGrid."""
    path = Path(path)
    return path.is_dir() or is_textgrid_name(path.name)


def _stem(name: str) -> str:
    """A TextGrid's utterance id: its name without ``.TextGrid`` (and ``.gz``)."""
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return name[: -len(SUFFIX)]


def textgrid_files(path: str | Path) -> dict[str, Path]:
    """``{utterance: TextGrid file}`` of a TextGrid file or of a folder of them (module docstring: the file's stem,
    or its path below the folder without the suffix where several files share the stem), in path order."""
    from spidr.input_files import existing_file

    path = Path(path)
    if not path.is_dir():
        existing_file(path, "alignment file")
        return {_stem(path.name): path}
    found: dict[str, str] = {}  # path below the folder without the suffix → the file's path below the folder
    for folder, names in walk_following_links(str(path)):
        relative = os.path.relpath(folder, path)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        for name in sorted(names):
            # (._x.TextGrid: macOS's AppleDouble companion of x.TextGrid on a copied drive, not a TextGrid)
            if name.startswith("._") or not is_textgrid_name(name) or not os.path.isfile(os.path.join(folder, name)):
                continue
            key = prefix + _stem(name)
            if key in found:
                raise ValueError(f"alignment folder {path}: both {found[key]} and {prefix}{name} are the TextGrid "
                                 f"of utterance {key!r}: keep one")
            found[key] = prefix + name
    if not found:
        raise ValueError(f"alignment folder {path} holds no .TextGrid file: a folder is read as the Montreal Forced "
                         "Aligner's output (one TextGrid per utterance, in speaker folders); give the .jsonl, .tsv "
                         "or .txt file of alignments of another format")
    keys = sorted(found, key=lambda key: key.split("/"))
    shared = {stem for stem, count in Counter(key.rsplit("/", 1)[-1] for key in keys).items() if count > 1}
    if not shared:
        return {key.rsplit("/", 1)[-1]: path / found[key] for key in keys}
    from spidr.eval.feature_dir import utterance_name  # (imports torch: only where stems repeat)

    return {utterance_name(key, shared): path / found[key] for key in keys}


def textgrid_speakers(path: str | Path) -> dict[str, str] | None:
    """``{utterance: speaker}``, the speaker being the folder that holds the utterance's TextGrid (MFA's speaker
    folders), where ``path`` is a folder whose TextGrids all lie in subfolders; None for one file, or a folder with
    TextGrids at its top (their speakers are then found in the names, by ``--speaker-pattern``)."""
    path = Path(path)
    if not path.is_dir():
        return None
    files = textgrid_files(path)
    from spidr.eval.item_writer import DEFAULT_SPEAKER_PATTERN

    speakers = {}
    for name, file in files.items():
        if file.parent == path:
            continue
        # The folder holding the file, unless a folder above it is the speaker the name begins with: LibriSpeech's
        # speaker/chapter/utterance layout (84/121123/84-121123-0000), where the holding folder is the chapter.
        folders = file.relative_to(path).parts[:-1]
        named = re.search(DEFAULT_SPEAKER_PATTERN, _stem(file.name))
        speakers[name] = named.group(1) if named and named.group(1) in folders[:-1] else folders[-1]
    if len(speakers) < len(files):
        if speakers:
            logger.warning("%s: %d of %d TextGrids lie at the top of the folder, in no speaker folder: the speakers "
                           "of all are taken from the utterance names (--speaker-pattern)", path,
                           len(files) - len(speakers), len(files))
        return None
    return speakers


def _praatio() -> tuple[ModuleType, ModuleType]:
    from spidr.extras import import_extra

    return (import_extra("praatio.utilities.textgrid_io", extra="eval", purpose=PURPOSE),
            import_extra("praatio.utilities.errors", extra="eval", purpose=PURPOSE))


def _text(path: Path) -> str:
    """The text of a TextGrid file: UTF-16 where it starts with a byte order mark (Praat's way for non-ASCII
    labels), else UTF-8 (MFA's); gzip-compressed when named ``.gz``."""
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:  # (not gzip; cut short)
            raise ValueError(f"{path} cannot be decompressed ({error}): expected a gzip-compressed TextGrid") from None
    if data.startswith(b"ooBinaryFile"):
        raise ValueError(f"{path} is a binary Praat file: save the TextGrid as a text file (Praat: Save as text "
                         "file) or give MFA's output")
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is neither UTF-8 nor UTF-16 text ({error.reason} at byte {error.start}): expected "
                         "a TextGrid text file") from None


def tier_intervals(path: str | Path, *, tier: str = PHONE_TIER) -> list[tuple[str, str, str]]:
    """``(onset, offset, label)`` of each interval of the tier named ``tier`` (any case) of a TextGrid file, the
    times as written, in the file's order, the labels stripped; empty intervals included."""
    textgrid_io, errors = _praatio()
    path = Path(path)
    text = _text(path)
    if not _HEADER.match(text):
        raise ValueError(f"{path} is not a Praat TextGrid text file (it begins {text[:40]!r}; expected "
                         "File type = \"ooTextFile\" and Object class = \"TextGrid\")")
    negative = _NEGATIVE_TIME.search(text)
    if negative:  # (praatio reads -0.5 as 0.5)
        line = text.count("\n", 0, negative.start()) + 1
        raise ValueError(f"{path}: line {line} holds a negative time ({negative.group(0).strip()!r}): expected times "
                         "in seconds from 0")
    try:
        parsed = textgrid_io.parseTextgridStr(text, includeEmptyIntervals=True)
    except (errors.PraatioException, ValueError, IndexError, KeyError) as error:
        raise ValueError(f"{path}: praatio cannot read this TextGrid ({type(error).__name__}: {error})") from None
    tiers = parsed["tiers"]
    found = [entry for entry in tiers if entry["name"].strip().lower() == tier.lower()]
    if len(found) != 1:
        names = ", ".join(repr(entry["name"]) for entry in tiers) or "none"
        if not found and any(entry["name"].strip().lower().endswith(f" - {tier.lower()}") for entry in tiers):
            raise ValueError(f"{path}: the phones of several speakers (tiers {names}, as MFA names the tiers of a "
                             "file of several speakers): one utterance of one speaker is read per TextGrid; split "
                             "the file by speaker")
        what = "no tier" if not found else f"{len(found)} tiers"
        raise ValueError(f"{path}: {what} named {tier!r} (its tiers: {names}); the phone intervals are read from the "
                         f"tier named {tier!r}, as the Montreal Forced Aligner names it")
    if found[0]["class"] != "IntervalTier":
        raise ValueError(f"{path}: tier {found[0]['name']!r} is a point tier ({found[0]['class']}); expected the "
                         "intervals of the phones")
    intervals = [(str(start), str(end), str(label).strip()) for start, end, label in found[0]["entries"]]
    if not intervals:
        raise ValueError(f"{path}: tier {found[0]['name']!r} has no interval")
    # A file cut short (a killed export) parses, without its last intervals: its tier ends before its xmax.
    if Decimal(intervals[-1][1]) < Decimal(repr(found[0]["xmax"])) - Decimal("0.01"):
        raise ValueError(f"{path}: tier {found[0]['name']!r} ends at {intervals[-1][1]} s, before its xmax of "
                         f"{found[0]['xmax']!r} s: a file cut short? (MFA's phone tiers end at the file's end)")
    return intervals


def read_textgrid_alignments(path: str | Path, alignment_rate_hz: int, *, tier: str = PHONE_TIER
                             ) -> Iterator[tuple[str, list[str]]]:
    """``(utterance, frame labels at alignment_rate_hz)`` of each TextGrid of ``path`` (a file or a folder; module
    docstring), as the interval TSV of its ``tier`` with MFA's silences written ``SIL`` reads."""
    from spidr.eval.unit_quality import interval_frames

    _praatio()  # (a missing praatio is named before the folder is searched)
    for name, file in textgrid_files(path).items():
        rows = [(number, name, onset, offset, SILENCE if label.lower() in MFA_SILENCE else label)
                for number, (onset, offset, label) in enumerate(tier_intervals(file, tier=tier), start=1)]
        where = printable(str(file))
        yield from interval_frames(where, rows, alignment_rate_hz,
                                   place=lambda number, where=where: f"{where}: interval {number} of tier {tier!r}")


def textgrids_digest(path: str | Path) -> str:
    """A sha256 of the TextGrids that alignments at ``path`` read (a file, or a folder: their names and contents),
    by which two evaluations' alignments are compared (``report.evaluation_settings``)."""
    digest = hashlib.sha256()
    for name, file in textgrid_files(path).items():
        digest.update(f"{name}\0".encode("utf-8", "surrogateescape"))
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()
