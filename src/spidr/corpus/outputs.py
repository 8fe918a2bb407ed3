"""The corpus files that downstream tools read, written from the synthesised utterances.

Every file lists utterances in the same order (voices as given, then utterance index) and prints times in
seconds with 4 decimals, so equal inputs give byte-identical files. Each file is written to a temporary name and
renamed, so a reader never sees half a file.

| file | content |
|---|---|
| ``manifest.csv`` | ``fileid,path,num_samples`` (absolute wav paths; the training manifest format) |
| ``alignments.tsv`` | header, then ``utt_id onset offset phone speaker`` per phone (tab-separated) |
| ``word_alignments.tsv`` | header, then ``utt_id onset offset word speaker`` per word (the spoken-LM benchmark's) |
| ``alignments.jsonl`` | ``{"name": utt_id, "phones": [...]}``, one phone per 10 ms frame (SpidR's format) |
| ``frame_labels_20ms.jsonl`` | the same at 20 ms, the models' frame rate (for PNMI) |
| ``phoneme.item`` / ``triphone.item`` | Libri-light ABX item files: the centre phone's span / the whole triphone |
| ``utterances.tsv`` | ``fileid voice speaker num_samples text`` |
| ``speakers.tsv`` | one row per speaker: person, gender, warp, voices, utterance count, seconds |
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from spidr.atomic_files import replaced_when_done
from spidr.corpus import alignment
from spidr.corpus.utterance import SAMPLE_RATE, Utterance
from spidr.corpus.voices import Voice

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
ALIGNMENTS_TSV = "alignments.tsv"
WORD_ALIGNMENTS_TSV = "word_alignments.tsv"
ALIGNMENTS_JSONL = "alignments.jsonl"
FRAME_LABELS_20MS = "frame_labels_20ms.jsonl"
PHONEME_ITEM = "phoneme.item"
TRIPHONE_ITEM = "triphone.item"
UTTERANCES_TSV = "utterances.tsv"
SPEAKERS_TSV = "speakers.tsv"
INFO_JSON = "info.json"
ITEM_HEADER = "#file onset offset #phone prev-phone next-phone speaker"
# What ``write_all`` writes (and ``WORD_ALIGNMENTS_TSV`` with ``word_alignments``): a cache lacking one is made again.
WRITTEN = (MANIFEST, ALIGNMENTS_TSV, ALIGNMENTS_JSONL, FRAME_LABELS_20MS, PHONEME_ITEM, TRIPHONE_ITEM, UTTERANCES_TSV,
           SPEAKERS_TSV)


def wavs_not_in(folder: Path, manifest: Path) -> list[str]:
    """The wavs ``manifest`` lists that are not files inside ``folder`` (relative paths where they are under it). A
    wav outside the folder counts as missing: a copied or moved folder's manifest names the original's audio, which
    may since have been made again otherwise, and the copy must not depend on another folder."""
    import csv

    with manifest.open(newline="", encoding="utf-8") as rows:
        wavs = [Path(row["path"]) for row in csv.DictReader(rows)]
    return [str(wav.relative_to(folder) if wav.is_relative_to(folder) else wav)
            for wav in wavs if not (wav.is_relative_to(folder) and wav.is_file())]


def missing_files(folder: Path, names: Iterable[str] = WRITTEN) -> list[str]:
    """The files ``names`` that are not in ``folder``, then the wavs its manifest lists that are not
    (``wavs_not_in``): a cache's lost files, relative to ``folder`` (a wav outside it as it is named)."""
    missing = [name for name in names if not (folder / name).is_file()]
    if MANIFEST not in missing:
        missing += wavs_not_in(folder, folder / MANIFEST)
    return missing


def reusable(out_dir: Path, what: str, missing: list[str]) -> bool:
    """Whether a cached ``what`` made with the same settings can be reused: yes when ``missing`` (its lost files) is
    empty; else the same settings give the same files, so it is made again, with a warning naming what was lost."""
    if not missing:
        logger.info("reusing the %s in %s (same settings)", what, out_dir)
        return True
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    logger.warning("the %s in %s lacks %d file(s) (%s): making it again", what, out_dir, len(missing), shown)
    return False


def writable_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` made absolute, refused where the manifest (CSV, UTF-8) could not name the files under it: a
    comma, tab or line break (a carriage return too: a CSV reader ends a line there) would split its rows, and bytes
    that are not UTF-8 could not be written at all (the synthesis would fail only at its end, after all the audio was
    made)."""
    out_dir = Path(out_dir).resolve()
    if any(char in str(out_dir) for char in ",\t\n\r"):
        raise ValueError(f"output directory {str(out_dir)!r} contains a comma, tab or newline (or a carriage "
                         "return), which the CSV/TSV files cannot hold; choose another path")
    try:
        str(out_dir).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(out_dir).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ValueError(f"output directory '{shown}' is not valid UTF-8, which the manifest (UTF-8 text) cannot "
                         "hold; choose another path") from None
    return out_dir


def seconds(samples: int) -> str:
    return f"{samples / SAMPLE_RATE:.4f}"


def write_text(path: Path, lines: Iterable[str]) -> None:
    """Write ``lines`` (newline-terminated) through a temporary file and an atomic rename."""
    with replaced_when_done(path) as temporary, temporary.open("w", encoding="utf-8", newline="\n") as out:
        out.writelines(line + "\n" for line in lines)


def write_all(out_dir: Path, utterances: list[Utterance], voices: list[Voice], *,
              word_alignments: bool = False) -> None:
    """Write every file of the table above into ``out_dir`` (``info.json`` is the driver's); ``word_alignments.tsv``
    with ``word_alignments`` (utterances spoken from pronunciations, whose words are known phone by phone)."""
    write_text(out_dir / MANIFEST, ["fileid,path,num_samples",
                                    *(f"{u.utt_id},{u.path},{u.num_samples}" for u in utterances)])
    write_text(out_dir / ALIGNMENTS_TSV, ["utt_id\tonset\toffset\tphone\tspeaker", *(
        f"{u.utt_id}\t{seconds(onset)}\t{seconds(offset)}\t{phone}\t{u.speaker}"
        for u in utterances for onset, offset, phone in u.segments
    )])
    if word_alignments:
        write_text(out_dir / WORD_ALIGNMENTS_TSV, ["utt_id\tonset\toffset\tword\tspeaker", *(
            f"{u.utt_id}\t{seconds(onset)}\t{seconds(offset)}\t{word}\t{u.speaker}"
            for u in utterances for onset, offset, word in u.words
        )])
    for name, frame_ms in ((ALIGNMENTS_JSONL, 10), (FRAME_LABELS_20MS, 20)):
        frame_samples = SAMPLE_RATE * frame_ms // 1000
        write_text(out_dir / name, (
            json.dumps({"name": u.utt_id, "phones": alignment.frame_labels(u.segments, u.num_samples, frame_samples)})
            for u in utterances
        ))
    rows = [(u, item) for u in utterances for item in alignment.items(u.segments)]
    write_text(out_dir / PHONEME_ITEM, [ITEM_HEADER, *(
        f"{u.utt_id} {seconds(i.onset)} {seconds(i.offset)} {i.phone} {i.previous} {i.next} {u.speaker}"
        for u, i in rows
    )])
    write_text(out_dir / TRIPHONE_ITEM, [ITEM_HEADER, *(
        f"{u.utt_id} {seconds(i.context_onset)} {seconds(i.context_offset)} {i.phone} {i.previous} {i.next} "
        f"{u.speaker}"
        for u, i in rows
    )])
    write_text(out_dir / UTTERANCES_TSV, ["fileid\tvoice\tspeaker\tnum_samples\ttext", *(
        f"{u.utt_id}\t{u.voice}\t{u.speaker}\t{u.num_samples}\t{u.text}" for u in utterances
    )])
    write_text(out_dir / SPEAKERS_TSV, ["speaker\tperson\tgender\twarp\tvoices\tnum_utterances\tseconds",
                                        *_speaker_rows(utterances, voices)])


def _speaker_rows(utterances: list[Utterance], voices: list[Voice]) -> list[str]:
    rows = []
    for speaker in dict.fromkeys(voice.speaker for voice in voices):
        own = [voice for voice in voices if voice.speaker == speaker]
        spoken = [u for u in utterances if u.speaker == speaker]
        rows.append(f"{speaker}\t{own[0].person}\t{own[0].gender}\t{own[0].warp:g}\t"
                    f"{','.join(v.name for v in own)}\t{len(spoken)}\t{seconds(sum(u.num_samples for u in spoken))}")
    return rows
