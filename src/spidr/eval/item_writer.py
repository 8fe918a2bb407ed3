"""ABX item files from your own phone alignments: ``spidr items``.

alignments (any format ``read_alignments`` reads) → per utterance, its phone segments (runs of one label at the
alignment rate: two identical phones in a row make one segment, as in frame alignments they are one) → every phone
whose two neighbours and itself are speech (no silence label) → one row, as the ZeroSpeech 2021 / Libri-light item
files have it (spec evaluation §1.6):

* ``triphone`` items: onset / offset span the whole previous + centre + next stretch (ABX "on triphone", the
  ZeroSpeech 2021 task, read with ``--context within``);
* ``phoneme`` items: onset / offset span the centre phone only (the ABX-LS phoneme task), its neighbours kept as
  the context labels.

The speaker of each utterance is the fifth column of an interval TSV whose header names it ``speaker``
(``spidr synth-corpus``'s ``alignments.tsv``), or the folder holding its TextGrid in a folder of speaker folders (the
Montreal Forced Aligner's ``OUT/<speaker>/<utterance>.TextGrid``), else the first group of ``speaker_pattern`` in
its name (LibriSpeech's ``84-121123-0000`` → ``84`` by default). Rows are written in utterance then time order, times
in seconds (the alignment rate's frames, so at most half a 10 ms frame off the aligner's own times).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the CLI's parser reads this module's constants without numpy)
    import numpy as np

    from spidr.eval.items import Items
    from spidr.eval.unit_quality import Alignments

ITEM_HEADER = "#file onset offset #phone prev-phone next-phone speaker"
KINDS = ("triphone", "phoneme")
DEFAULT_SPEAKER_PATTERN = r"^([^-_]+)"  # LibriSpeech's speaker-chapter-utterance, spk_utterance


def segments(codes: np.ndarray) -> list[tuple[int, int, int]]:
    """``(first frame, end frame (exclusive), code)`` of each run of one code in ``codes`` (T,)."""
    import numpy as np

    if not len(codes):
        return []
    starts = np.flatnonzero(np.diff(codes)) + 1
    bounds = [0, *starts.tolist(), len(codes)]
    return [(bounds[i], bounds[i + 1], int(codes[bounds[i]])) for i in range(len(bounds) - 1)]


def interval_speakers(path: str | Path) -> dict[str, str] | None:
    """``{utterance: speaker}`` from the fifth column of an interval TSV whose header names it ``speaker``
    (``utt_id onset offset phone speaker``, as ``spidr synth-corpus`` writes ``alignments.tsv``), or None for a file
    without one (another fifth column, a word or a score, is no speaker; another format). A line without a speaker
    under such a header is refused: falling back to the names would silently drop the speakers the file gives.
    For TextGrids, the folder holding each (``textgrid.textgrid_speakers``: MFA's speaker folders)."""
    from spidr.eval.textgrid import holds_textgrids, textgrid_speakers
    from spidr.eval.unit_quality import holds_frame_labels
    from spidr.eval.units import numbered_lines, open_text

    path = Path(path)
    if holds_textgrids(path):
        return textgrid_speakers(path)
    if not path.name.removesuffix(".gz").endswith((".tsv", ".txt")) or holds_frame_labels(path):
        return None
    speakers: dict[str, str] = {}
    with open_text(path) as handle:
        for number, line in numbered_lines(handle, path, expected="a TSV of phone intervals"):
            fields = [field.strip() for field in (line.split("\t") if "\t" in line else line.split())]
            if number == 1:
                if len(fields) < 5 or fields[4].lower() != "speaker":
                    return None
                continue
            if not any(fields):
                continue
            if len(fields) < 5 or not fields[4]:
                raise ValueError(f"{path}: line {number} gives no speaker, but the header names a fifth column "
                                 "'speaker': give every line its speaker, or --speaker-pattern to take it from the "
                                 "names instead")
            known = speakers.setdefault(fields[0], fields[4])
            if known != fields[4]:
                raise ValueError(f"{path}: line {number}: utterance {fields[0]!r} is said by {fields[4]!r}, but by "
                                 f"{known!r} on an earlier line (the fifth column is the speaker)")
    return speakers or None


def item_rows(alignments: Alignments, *, alignment_rate_hz: float, kind: str = "triphone",
              speaker_pattern: str = DEFAULT_SPEAKER_PATTERN, speakers: Mapping[str, str] | None = None,
              silence_labels: Sequence[str] | None = None) -> Iterator[str]:
    """The item file's rows (without its header) for ``alignments``, in utterance and time order. ``speakers``:
    each utterance's speaker (``interval_speakers``), else ``speaker_pattern`` finds it in the name;
    ``silence_labels``: default ``unit_quality.SILENCE_LABELS``."""
    from spidr.eval.unit_quality import SILENCE_LABELS

    silence_labels = SILENCE_LABELS if silence_labels is None else silence_labels
    if kind not in KINDS:
        raise ValueError(f"item kind {kind!r} is invalid: expected one of {', '.join(KINDS)}")
    pattern = re.compile(speaker_pattern)
    if pattern.groups < 1:
        raise ValueError(f"--speaker-pattern {speaker_pattern!r} has no group: its first group (…) is the speaker")
    silence = {index for index, phone in enumerate(alignments.phones) if phone in silence_labels}
    spaced = [phone for phone in alignments.phones if not phone or any(character.isspace() for character in phone)]
    if spaced:
        raise ValueError(f"phone label {spaced[0]!r}: an item file's columns are separated by spaces, so phone labels "
                         "must be non-empty and hold none")
    for name in sorted(alignments):
        if speakers is not None:
            speaker = speakers[name]
        else:
            found = pattern.search(name)
            if found is None or not found.group(1):
                raise ValueError(f"utterance {name!r}: --speaker-pattern {speaker_pattern!r} finds no speaker in its "
                                 "name; give a pattern whose first group (…) is the speaker")
            speaker = found.group(1)
        if any(character.isspace() for character in name + speaker):
            raise ValueError(f"utterance {name!r} (speaker {speaker!r}): an item file's columns are separated by "
                             "spaces, so names and speakers must hold none")
        runs = segments(alignments.codes[name])
        for (begin, _, before), (onset, offset, phone), (_, end, after) in zip(runs, runs[1:], runs[2:], strict=False):
            if silence & {before, phone, after}:
                continue
            start, stop = (begin, end) if kind == "triphone" else (onset, offset)
            labels = (alignments.phones[phone], alignments.phones[before], alignments.phones[after])
            yield (f"{name} {_seconds(start, alignment_rate_hz)} {_seconds(stop, alignment_rate_hz)} "
                   f"{' '.join(labels)} {speaker}")


def _seconds(frame: int, rate: float) -> str:
    """A frame boundary in seconds, as short as exact (``0.15``, not ``0.15000000000000002``)."""
    return f"{frame / rate:.6f}".rstrip("0").rstrip(".") if frame else "0"


def items_from_alignments(alignments: Alignments, **options) -> Items:
    """The items that ``write_item_file`` would write (``item_rows(alignments, **options)``), in memory: for ABX
    on alignments held in Python (``Alignments.from_labels``) without an item file. No item is an error."""
    from spidr.eval.items import Items

    rows = [row.split(" ") for row in item_rows(alignments, **options)]
    if not rows:
        raise ValueError(_no_item(alignments))
    return Items.from_columns(dict(zip(ITEM_HEADER.split(" "), zip(*rows, strict=True), strict=True)),
                              source="<items of the alignments>")


def _no_item(alignments: Alignments) -> str:
    return (f"no item: none of the {len(alignments)} utterances has a speech phone between two speech phones (a "
            "silence label on either side, or fewer than three phones)")


def write_item_file(path: str | Path, alignments: Alignments, **options) -> int:
    """Write ``item_rows(alignments, **options)`` under ``ITEM_HEADER`` to ``path`` (whole or not at all); returns
    the number of items. No item (every phone next to a silence, or one phone per utterance) is an error."""
    from spidr.atomic_files import replaced_when_done

    count = 0
    with replaced_when_done(path) as partial, partial.open("w", encoding="utf-8") as handle:
        handle.write(ITEM_HEADER + "\n")
        for row in item_rows(alignments, **options):  # streamed: a list of every row took ≈ 150 B an item
            handle.write(row + "\n")
            count += 1
        if not count:  # (raised inside: the temporary file is removed, an earlier file kept)
            raise ValueError(_no_item(alignments))
    return count

