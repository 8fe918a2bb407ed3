"""Unit quality against frame-level phone alignments: purity, PNMI, perplexity, active codewords, bitrate.

Definitions (HuBERT §IV, SpidR ``units_quality``; spec/spidr.md §10.4). Units are repeated to the alignment rate
(``alignment_rate / unit_rate`` times: 2 for 20 ms units on 10 ms labels), each utterance's two sequences must then
differ in length by at most 2 frames, and are zipped (the longer one truncated). Over all frames, the count matrix
C (phones × units) gives the joint distribution P = C / ΣC, and

* phone purity = Σ_units max_phone P (frame accuracy of labelling each unit with its majority phone);
* cluster purity = Σ_phones max_unit P;
* PNMI = I(phone; unit) / H(phone), natural logs, with SpidR's ε = 1e-10 inside the logs:
  I = Σ P·log(P / (p_phone·p_unit + ε) + ε), H = −Σ p_phone·log(p_phone + ε);
* codebook perplexity = 2^H(unit marginal) with H in bits (same ε);
* active codewords = number of units that occur at least once;
* bitrate = log₂(num_units) × (units left after collapsing repeats) / (duration at 1/unit_rate per unit), in bits/s,
  over the original (unrepeated, untruncated) unit sequences.

Computed in float64 (SpidR uses float32; the two agree to ~1e-7). The phone inventory is every phone of the
alignment file, SIL included, whether or not it occurs in the evaluated utterances.

Alignments are read from SpidR's JSONL (``{"name": ..., "phones": [one label per frame]}``), from a TSV of
intervals, one line per phone: ``utterance<TAB>onset<TAB>offset<TAB>phone`` in seconds (an optional header line is
skipped; columns after the fourth, such as the speaker of ``spidr synth-corpus``'s ``alignments.tsv``, are ignored),
from a text file of one line of frame labels per utterance (``utterance 6 6 6 5 5 ...``, Libri-light's
``converted_aligned_phones.txt``: phone indices at 100 Hz, told apart by numbers only after the name), or from
Praat TextGrids, one per utterance (a ``.TextGrid`` file or a folder of them, the Montreal Forced Aligner's output:
``spidr.eval.textgrid``), each read as the interval TSV of its ``phones`` tier, MFA's silences written ``SIL``.
Intervals become frame labels at the alignment rate: frame i takes the phone whose interval holds its centre
``(i + ½) / rate``; frames that no interval covers raise an error. ``.gz`` files are read transparently. ARPAbet
stress digits are removed (``AH1`` → ``AH``) as fairseq does, unless asked to keep them.
"""

from __future__ import annotations

import array
import itertools
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

from spidr.eval.units import numbered_lines, open_text, read_jsonl_rows, unit_ids
from spidr.input_files import existing_file

logger = logging.getLogger(__name__)

EPS = 1e-10
SILENCE_LABELS = ("SIL", "sil", "sp", "spn", "<sil>", "")  # the labels of silence in forced aligners' alignments
MAX_LENGTH_MISMATCH = 2
METRICS = ("phone_purity", "cluster_purity", "pnmi", "codebook_perplexity", "active_codewords", "bitrate")


class Alignments(Mapping[str, list[str]]):
    """Frame-level phone labels of many utterances, stored as codes: ``phones`` (sorted names) and, per utterance,
    an int16 array of indices into it (2 bytes a frame instead of a Python string reference and list slot).
    ``alignments[name]`` gives the labels back as strings."""

    def __init__(self, phones: Sequence[str], codes: dict[str, np.ndarray], *,
                 stress_removed: Sequence[str] = ()) -> None:
        self.phones = tuple(phones)
        self.codes = codes
        self.stress_removed = tuple(stress_removed)  # the labels read_alignments took stress digits off (AH1, ...)

    @classmethod
    def from_labels(cls, labels: Iterable[tuple[str, Sequence[str]]]) -> Alignments:
        """Build from ``(utterance, per-frame labels)`` pairs (codes are numbered in sorted phone order)."""
        index: dict[str, int] = {}
        codes: dict[str, np.ndarray] = {}
        for name, frames in labels:
            for phone in set(frames):
                index.setdefault(phone, len(index))
            codes[name] = np.fromiter(map(index.__getitem__, frames), dtype=np.int32, count=len(frames))
        phones = sorted(index)
        if len(phones) > np.iinfo(np.int16).max:
            raise ValueError(f"{len(phones)} distinct phone labels: more than {np.iinfo(np.int16).max}")
        renumber = np.empty(len(phones), dtype=np.int16)
        renumber[[index[p] for p in phones]] = np.arange(len(phones), dtype=np.int16)
        return cls(phones, {name: renumber[array] for name, array in codes.items()})

    def __getitem__(self, name: str) -> list[str]:
        return [self.phones[c] for c in self.codes[name].tolist()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.codes)

    def __len__(self) -> int:
        return len(self.codes)

    def __contains__(self, name: object) -> bool:
        return name in self.codes


def check_alignment_rate(alignments: Mapping[str, Sequence[str]], num_samples: Mapping[str, int], *,
                         alignment_rate_hz: float, where: str, option: str = "--alignment-rate") -> None:
    """Refuse alignments whose frame counts do not fit ``alignment_rate_hz`` over the audio (``num_samples``: the
    utterances' lengths at 16 kHz): read at the wrong rate, they fail only after extraction and the scoring of every
    layer before the first head. Judged on the median over the utterances both name, which a few odd files do not
    move."""
    ratios = [len(alignments[name]) / (samples * alignment_rate_hz / 16000)
              for name, samples in num_samples.items() if name in alignments and samples > 0]
    if not ratios:
        return
    ratio = float(np.median(ratios))
    if 0.8 <= ratio <= 1.25:
        return
    implied = alignment_rate_hz * ratio
    raise ValueError(f"{where} holds {ratio:.2f}× the frames that {option} {alignment_rate_hz:g} Hz gives the audio "
                     f"(median over {len(ratios)} utterances): its labels look like {implied:.0f} Hz ones; give "
                     f"{option} {round(implied)}")


# At most this many utterances whose manifest length disagrees with their alignment are decoded to measure their
# audio (``check_alignment_lengths``); past it, a manifest whose lengths are all somewhat off is left to the check
# after the extraction, which counts the decoded frames.
MAX_DECODED_SUSPECTS = 100


def check_alignment_lengths(alignments: Mapping[str, Sequence[Any]], num_samples: Mapping[str, int], *,
                            conv_layers: Sequence[Any], alignment_rate_hz: float, where: str,
                            decoded_samples: Callable[[str], int | None] | None = None,
                            tolerance: float = MAX_LENGTH_MISMATCH) -> None:
    """Refuse an utterance whose alignment does not span the frames of its audio by more than ``tolerance``
    alignment frames (default: what ``count_matrix`` allows, ``MAX_LENGTH_MISMATCH``): an alignment of another
    recording (trimmed audio, another copy), which the median of ``check_alignment_rate`` lets through, would
    otherwise fail after the extraction. ``num_samples``: the manifest's lengths at 16 kHz; ``conv_layers``: the
    model's front end. The extraction counts the decoded audio, which may be a little off the manifest's length: an
    utterance that disagrees is measured again with ``decoded_samples(name)`` (its decoded length; None for a file
    that cannot be read, which is skipped), and only a disagreement that stands is refused."""
    from spidr.data.audio import SAMPLE_RATE
    from spidr.models.frames import hop_length, num_frames

    ratio = alignment_rate_hz * hop_length(conv_layers) / SAMPLE_RATE

    def expected(samples: int) -> float:
        return num_frames(samples, conv_layers) * ratio

    bad, decoded = [], 0
    for name, samples in num_samples.items():
        if name not in alignments or abs(len(alignments[name]) - expected(samples)) <= tolerance:
            continue
        source = "the manifest's length of its audio"
        if decoded_samples is not None and decoded < MAX_DECODED_SUSPECTS:
            decoded += 1
            samples = decoded_samples(name)
            if samples is None or abs(len(alignments[name]) - expected(samples)) <= tolerance:
                continue
            source = "its audio"
        elif decoded_samples is not None:
            continue  # (left to the check after the extraction)
        bad.append((name, len(alignments[name]), expected(samples), source))
    if bad:
        name, count, frames, source = bad[0]
        others = f" (and {len(bad) - 1} other utterance(s))" if len(bad) > 1 else ""
        raise ValueError(f"{where}: utterance {name!r} has {count} frames at {alignment_rate_hz:g} Hz, but {source} "
                         f"gives {frames:g} ({frames / alignment_rate_hz:.2f} s){others}: an alignment of another "
                         f"recording? They may differ by at most {tolerance:g} frames")


def read_alignments(path: str | Path, *, alignment_rate_hz: int = 100, keep_stress: bool = False) -> Alignments:
    """``{utterance: per-frame phone labels}`` from a JSONL, interval-TSV or frame-label text alignment file, or
    from a TextGrid file or folder of them (see module docstring; ``spidr.eval.textgrid``). ARPAbet stress digits
    are removed (``AH0``, ``AH1`` → ``AH``), as fairseq's PNMI does (``rm_stress``), unless ``keep_stress``."""
    from spidr.eval.textgrid import holds_textgrids, read_textgrid_alignments

    path = Path(path)
    textgrids = holds_textgrids(path)
    if not textgrids:  # (a TextGrid file is checked where the folder's files are listed)
        existing_file(path, "alignment file")
    name = path.name.removesuffix(".gz")
    if textgrids:
        rows = read_textgrid_alignments(path, alignment_rate_hz)
    elif name.endswith((".jsonl", ".ndjson", ".json")):
        rows = ((key, [str(p) for p in phones]) for key, _, _, phones in read_jsonl_rows(path, field="phones"))
    elif name.endswith((".tsv", ".txt")):
        rows = (_read_frame_label_lines(path) if holds_frame_labels(path)
                else _read_interval_alignments(path, alignment_rate_hz))
    else:
        raise ValueError(f"alignment file {path}: expected a .jsonl (SpidR format), a .tsv of intervals, a .txt "
                         "of frame labels, or a Praat .TextGrid (or a folder of them: the Montreal Forced Aligner's "
                         "output)")
    alignments = Alignments.from_labels(rows)
    if not alignments:
        raise ValueError(f"alignment file {path} has no utterance")
    if keep_stress:
        return alignments
    unstressed = without_stress(alignments)
    if unstressed.stress_removed:
        stressed = unstressed.stress_removed
        logger.info("%s: ARPAbet stress digits removed from %d phone labels (%s → %d phones), as fairseq's PNMI "
                    "does (--keep-stress keeps them)", path, len(stressed), ", ".join(stressed[:4])
                    + (", ..." if len(stressed) > 4 else ""), len(unstressed.phones))
    return unstressed


# ARPAbet's vowels, which alone carry a stress digit (0 none, 1 primary, 2 secondary) in CMUdict and forced aligners
ARPABET_VOWELS = frozenset(["AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"])


def without_stress(alignments: Alignments) -> Alignments:
    """``alignments`` with every ARPAbet vowel's stress digit removed (``AH0`` → ``AH``); other labels (a tone
    digit of another inventory, ``h#``) are kept as they are."""
    def base(phone: str) -> str:
        return phone[:-1] if phone[-1:] in ("0", "1", "2") and phone[:-1] in ARPABET_VOWELS else phone

    if all(base(phone) == phone for phone in alignments.phones):
        return alignments
    phones = sorted({base(phone) for phone in alignments.phones})
    table = np.asarray([phones.index(base(phone)) for phone in alignments.phones], dtype=np.int16)
    return Alignments(phones, {name: table[codes] for name, codes in alignments.codes.items()},
                      stress_removed=[phone for phone in alignments.phones if base(phone) != phone])


def holds_frame_labels(path: Path) -> bool:
    """Whether a text alignment file holds one label per frame on each line (``utterance l1 l2 l3 ...``, as
    Libri-light's and CPC's ``converted_aligned_phones.txt``: phone indices at 100 Hz), not intervals: its first
    line has at least 6 fields, all numbers after the utterance, none of them a time in seconds."""
    with open_text(path) as handle:
        for line in handle:
            fields = line.split()
            if fields:
                return len(fields) >= 6 and all(field.isdigit() for field in fields[1:])
    return False


def _read_frame_label_lines(path: Path) -> Iterator[tuple[str, list[str]]]:
    """``(utterance, its frame labels)`` of each line of a frame-label text file (``holds_frame_labels``)."""
    with open_text(path) as handle:
        for number, line in numbered_lines(handle, path, expected="one line of frame labels per utterance"):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise ValueError(f"{path}: line {number} names utterance {fields[0]!r} but gives no frame label")
            yield fields[0], fields[1:]


def _tsv_interval_rows(path: Path) -> Iterator[tuple[int, str, str, str, str]]:
    """``(line number, utterance, onset, offset, phone)`` of each line of an interval TSV, its fields as written
    (tab-separated, else whitespace-separated; columns after the fourth ignored); blank lines are skipped."""
    with open_text(path) as handle:
        for number, line in numbered_lines(handle, path, expected="a TSV of phone intervals"):
            fields = line.split("\t") if "\t" in line else line.split()
            fields = [f.strip() for f in fields]
            if not any(fields):
                continue
            if len(fields) < 4:
                raise ValueError(f"{path}: line {number} has {len(fields)} fields; expected utterance, onset, "
                                 "offset, phone (and optionally more columns)")
            yield number, fields[0], fields[1], fields[2], fields[3]


def _interval_columns(rows: Iterable[tuple[int, str, str, str, str]], rate: int, place: Callable[[int], str], *,
                      header: bool) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """``rows`` (``(number, utterance, onset, offset, phone)``, the times as written, in seconds) as typed columns
    ``utterance``, ``phone`` (indices into the returned utterance and phone names, in order of first appearance),
    ``onset``, ``offset`` (s, float64), ``first`` and ``reach`` (their frame numbers, computed exactly: see
    ``interval_frames``). ``place(number)`` names a row in an error ("FILE: line 3"); with ``header``, a first row
    whose times are not numbers is a header line, skipped."""
    columns = {name: array.array(code) for name, code in (("utterance", "i"), ("phone", "i"), ("onset", "d"),
                                                            ("offset", "d"), ("first", "q"), ("reach", "q"))}
    utterances: dict[str, int] = {}
    phones: dict[str, int] = {}
    half, scale = Decimal("0.5"), Decimal(rate)

    def frame(time: Decimal) -> int:  # the first frame whose centre is at or after ``time``
        return int((time * scale - half).to_integral_value(rounding=ROUND_CEILING))

    for number, utterance, onset, offset, phone in rows:
        try:
            times = Decimal(onset), Decimal(offset)
        except InvalidOperation:
            if header and number == 1:
                continue  # a header line
            raise ValueError(f"{place(number)}: {onset!r}, {offset!r} are not times in seconds") from None
        if not (times[0].is_finite() and times[1].is_finite()) or times[0] < 0:
            raise ValueError(f"{place(number)}: {onset!r}, {offset!r} are not times in seconds (finite, onset ≥ 0)")
        if not times[0] < times[1]:
            raise ValueError(f"{place(number)}: onset {onset} is not before offset {offset}")
        columns["utterance"].append(utterances.setdefault(utterance, len(utterances)))
        columns["phone"].append(phones.setdefault(phone, len(phones)))
        columns["onset"].append(float(onset))  # as float(times[0]): correctly rounded
        columns["offset"].append(float(offset))
        columns["first"].append(frame(times[0]))
        columns["reach"].append(frame(times[1]))
    return {name: np.asarray(column) for name, column in columns.items()}, list(utterances), list(phones)


def _read_interval_alignments(path: Path, rate: int) -> Iterator[tuple[str, list[str]]]:
    """Frame labels of each utterance of an interval TSV (``interval_frames``)."""
    return interval_frames(path, _tsv_interval_rows(path), rate, place=lambda number: f"{path}: line {number}",
                           header=True)


def interval_frames(path: str | Path, rows: Iterable[tuple[int, str, str, str, str]], rate: int, *,
                    place: Callable[[int], str], header: bool = False) -> Iterator[tuple[str, list[str]]]:
    """Frame labels of each utterance of phone intervals ``rows`` (``(number, utterance, onset, offset, phone)``,
    times as written, in seconds: an interval TSV's lines, a TextGrid's phone tier) read from ``path``, which errors
    name (``place(number)`` names a row). Frame i takes the first interval (sorted) whose offset is past its centre
    (i + ½)/rate, which must have started by then. With exact (Decimal) times the frames are found per interval,
    not per frame: interval r reaches the frames i < ceil(offset_r·rate − ½) and starts at frame
    ceil(onset_r·rate − ½).

    Each row is kept as 40 bytes in typed columns (its utterance and phone as indices, its times as floats for the
    order and the overlap check, its two frame numbers computed exactly when read): held as Decimal tuples, 1.5M
    lines took 576 MB (now 139 MB), LibriSpeech train-960's about 17 GB."""
    values, utterances, phone_names = _interval_columns(rows, rate, place, header=header)
    if not utterances:
        return
    half, scale = Decimal("0.5"), Decimal(rate)
    rank = np.empty(len(phone_names), dtype=np.int64)  # sorted rank of each phone index: rows sort by phone last
    rank[sorted(range(len(phone_names)), key=phone_names.__getitem__)] = np.arange(len(phone_names))
    order = np.lexsort((rank[values["phone"]], values["offset"], values["onset"], values["utterance"]))
    values = {name: column[order] for name, column in values.items()}
    bounds = np.flatnonzero(np.diff(values["utterance"])) + 1
    for utterance, begin, end in zip(utterances, [0, *bounds.tolist()], [*bounds.tolist(), order.size],
                                     strict=True):
        onsets, offsets, phone = values["onset"][begin:end], values["offset"][begin:end], values["phone"][begin:end]
        overlaps = np.flatnonzero(onsets[1:] < offsets[:-1])
        if overlaps.size:
            row = int(overlaps[0])
            raise ValueError(f"{path}: utterance {utterance!r}: {phone_names[phone[row + 1]]!r} starts at "
                             f"{float(onsets[row + 1])!r} s, before {phone_names[phone[row]]!r} ends at "
                             f"{float(offsets[row])!r} s (intervals must not overlap)")
        first = values["first"][begin:end]
        reach = np.maximum.accumulate(values["reach"][begin:end])
        frames = np.arange(max(int(reach[-1]), 0))
        chosen = np.searchsorted(reach, frames, side="right")  # first interval reaching past each frame
        gaps = np.flatnonzero(first[chosen] > frames)
        if gaps.size:
            i = int(gaps[0])
            raise ValueError(f"{path}: utterance {utterance!r} has no phone at {(i + half) / scale} s (frame {i})")
        yield utterance, [phone_names[p] for p in phone[chosen].tolist()]


def _codes(phones: Mapping[str, Sequence[str]], name: str, index: Mapping[str, int], length: int) -> np.ndarray:
    """The first ``length`` labels of utterance ``name`` as row indices of the count matrix."""
    if isinstance(phones, Alignments):
        table = np.asarray([index.get(p, -1) for p in phones.phones], dtype=np.int64)
        codes = table[phones.codes[name][:length]]
        if codes.size and codes.min() < 0:
            missing = phones.phones[int(phones.codes[name][:length][int(np.argmin(codes))])]
            raise ValueError(f"utterance {name!r}: phone {missing!r} is not in the phone inventory")
        return codes
    labels = phones[name][:length]
    missing = next((p for p in labels if p not in index), None)
    if missing is not None:
        raise ValueError(f"utterance {name!r}: phone {missing!r} is not in the phone inventory")
    return np.fromiter((index[p] for p in labels), dtype=np.int64, count=length)


def count_matrix(
    units: Mapping[str, Sequence[int] | np.ndarray],
    phones: Mapping[str, Sequence[str]],
    *,
    repeat: int,
    num_units: int,
    inventory: Sequence[str],
) -> np.ndarray:
    """Frame counts (len(inventory), num_units) over the utterances present in both mappings.

    Each unit is repeated ``repeat`` times to reach the alignment rate; the two sequences of an utterance must then
    differ by at most 2 frames and are zipped.
    """
    index = {phone: i for i, phone in enumerate(inventory)}
    counts = np.zeros(len(inventory) * num_units, dtype=np.int64)
    for name, sequence in units.items():
        if name not in phones:
            continue
        unit_array = unit_ids(sequence, f"utterance {name!r}")
        if unit_array.ndim != 1:
            raise ValueError(f"utterance {name!r}: expected a 1-D sequence of unit ids, got shape "
                             f"{unit_array.shape} (one-hot or per-codebook units: take one layer's arg-max)")
        unit_array = np.repeat(unit_array, repeat)
        labels = phones.codes[name] if isinstance(phones, Alignments) else phones[name]
        if abs(len(labels) - unit_array.size) > MAX_LENGTH_MISMATCH:
            raise ValueError(
                f"utterance {name!r}: {unit_array.size // repeat} units (× {repeat} = {unit_array.size} frames) but "
                f"{len(labels)} aligned frames; they may differ by at most {MAX_LENGTH_MISMATCH} (check the rates: "
                "the units' and the alignments', unit_rate_hz / alignment_rate_hz, on the command line "
                "--unit-rate / --alignment-rate)"
            )
        if unit_array.size and (unit_array.min() < 0 or unit_array.max() >= num_units):
            raise ValueError(f"utterance {name!r}: units must lie in [0, {num_units}), found {unit_array.min()}.."
                             f"{unit_array.max()} (check num_units, on the command line --num-units)")
        length = min(len(labels), unit_array.size)
        phone_array = _codes(phones, name, index, length)
        counts += np.bincount(phone_array * num_units + unit_array[:length], minlength=counts.size)
    return counts.reshape(len(inventory), num_units)


def unit_quality(
    units: Mapping[str, Sequence[int] | np.ndarray],
    phones: Mapping[str, Sequence[str]],
    *,
    num_units: int,
    unit_rate_hz: int = 50,
    alignment_rate_hz: int = 100,
    inventory: Sequence[str] | None = None,
    skipped: Iterable[str] = (),
    root: str = "",
) -> dict[str, float]:
    """The six unit-quality metrics (module docstring) of ``units`` against frame-level ``phones``.

    Args:
        units: ``{utterance: (T,) unit ids}`` at ``unit_rate_hz``.
        phones: ``{utterance: per-frame phone labels}`` at ``alignment_rate_hz``.
        num_units: the size of the unit inventory (K of k-means, V of a codebook): the count matrix's columns and
            the bitrate's log2(num_units) bits per unit. No default: a wrong one gives a wrong bitrate silently.
        inventory: phone classes (rows of the count matrix); by default every phone occurring in ``phones``.
        skipped: the paths of the files whose units the extraction could not make (``skipped_stems``): an
            alignment naming one, or the bare id it shares with a file that has units, then finds none.
        root: the folder the units' paths start from (``audio_root``): see ``StemKeyed``.

    Returns:
        ``{"phone_purity", "cluster_purity", "pnmi", "codebook_perplexity", "active_codewords", "bitrate"}``.
    """
    if unit_rate_hz <= 0 or alignment_rate_hz <= 0 or alignment_rate_hz % unit_rate_hz:
        raise ValueError(
            f"alignment rate {alignment_rate_hz} Hz must be a positive multiple of the unit rate {unit_rate_hz} Hz"
        )
    if isinstance(num_units, float) and num_units.is_integer():  # (e.g. read from a JSON file)
        num_units = int(num_units)
    if isinstance(num_units, bool) or not isinstance(num_units, numbers.Integral) or num_units < 1:
        raise ValueError(f"num_units = {num_units!r} is invalid: expected an integer ≥ 1")
    phones = _named_as(units, phones, skipped=skipped, root=root)
    used = [name for name in units if name in phones]
    missing = len(units) - len(used)
    if not used:
        raise ValueError(f"no utterance of the units file is in the alignment file (the alignments name e.g. "
                         f"{_examples(phones.unmatched)}, the units {_examples(units)}; a file that the extraction "
                         "skipped has no units: check the utterance names)")
    if missing:
        logger.warning("%d of %d utterances have no alignment and are left out (e.g. %s)", missing, len(units),
                       _examples(name for name in units if name not in phones))
    if len(used) < phones.given:  # e.g. files the extractor skipped: the metrics cover fewer utterances
        logger.warning("%d of the %d aligned utterances have no units and are left out (e.g. %s)",
                       phones.given - len(used), phones.given, _examples(phones.unmatched))
    if inventory is None:
        inventory = phones.phones if isinstance(phones, Alignments) else sorted(
            {phone for labels in phones.values() for phone in labels})
    counts = count_matrix(
        {name: units[name] for name in used},
        phones,
        repeat=alignment_rate_hz // unit_rate_hz,
        num_units=num_units,
        inventory=inventory,
    )
    if counts.sum() == 0:
        raise ValueError("the units and alignments share no frame")
    metrics = quality_from_counts(counts)
    # (unit_ids: tensors on a GPU too, as count_matrix takes them)
    num_kept = sum(1 + int(np.count_nonzero(np.diff(unit_ids(units[name], f"utterance {name!r}"))))
                   for name in used if len(units[name]))
    num_frames = sum(len(units[name]) for name in used)
    metrics["bitrate"] = math.log2(num_units) * num_kept / (num_frames / unit_rate_hz)
    return metrics


class _Renamed(Alignments):
    """Alignments under the names of the units they belong to, with how many utterances were given and the names
    that found no units."""

    def __init__(self, phones: Sequence[str], codes: dict[str, np.ndarray], *, given: int, unmatched: list[str]):
        super().__init__(phones, codes)
        self.given, self.unmatched = given, unmatched


def _named_as(units: Mapping[str, Any], phones: Mapping[str, Sequence[str]], *,
              skipped: Iterable[str] = (), root: str = "") -> _Renamed:
    """``phones`` keyed by the units' names: an alignment names an utterance by path or by utterance id, as item
    files do (``StemKeyed``: ``corpus/données/é`` finds the units of ``é``; a bare id that several units hold is
    refused, naming them)."""
    from spidr.eval.feature_dir import names_matched

    aligned = phones if isinstance(phones, Alignments) else Alignments.from_labels(phones.items())
    matched = names_matched(units, aligned, source="the units", skipped=skipped, root=root)
    found = set(matched.values())
    return _Renamed(aligned.phones, {key: aligned.codes[name] for key, name in matched.items()}, given=len(aligned),
                    unmatched=[name for name in aligned if name not in found])


def _examples(names: Iterable[str], count: int = 3) -> str:
    """The first ``count`` of ``names``, quoted, for a warning that names what it leaves out."""
    return ", ".join(repr(name) for name in itertools.islice(names, count))


def quality_from_counts(counts: np.ndarray) -> dict[str, float]:
    """Purities, PNMI, perplexity and active codewords of a (phones, units) count matrix."""
    joint = counts / counts.sum()
    p_phone = joint.sum(axis=1, keepdims=True)
    p_unit = joint.sum(axis=0, keepdims=True)
    mutual_information = float((joint * np.log(joint / (p_phone * p_unit + EPS) + EPS)).sum())
    phone_entropy = float(-(p_phone * np.log(p_phone + EPS)).sum())
    if phone_entropy <= 0:
        raise ValueError("PNMI is undefined when the evaluated frames hold a single phone class")
    unit_entropy_bits = float(-(p_unit * np.log2(p_unit + EPS)).sum())
    return {
        "phone_purity": float(joint.max(axis=0).sum()),
        "cluster_purity": float(joint.max(axis=1).sum()),
        "pnmi": mutual_information / phone_entropy,
        "codebook_perplexity": 2.0**unit_entropy_bits,
        "active_codewords": int(np.count_nonzero(counts.sum(axis=0))),
    }
