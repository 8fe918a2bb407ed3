"""Turn an engine's phone labels into a checked ARPAbet-39 + SIL alignment of the final 16 kHz wav.

An alignment is a list of segments ``(onset, offset, phone)`` in samples of the final wav. It holds, for every
utterance: segments are contiguous (no gap, no overlap), cover exactly ``[0, num_samples]``, have positive length,
use only ``phone_inventory()`` labels, and never have two silences in a row.

Views of an alignment used by the evaluation tools (frame labels for PNMI, ABX item rows) live here too.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from spidr.corpus.phones import (
    PAUSE,
    SILENCE,
    UnmappedPhoneError,
    espeak_to_arpabet,
    is_espeak_modifier,
    is_espeak_vowel,
    phone_inventory,
    radio_to_arpabet,
)

Segment = tuple[int, int, str]  # (onset sample, offset sample, phone)

MAX_OVERHANG_S = 0.020  # the last phone may end at most this long after the audio
MIN_SEGMENT_S = 0.001  # shorter silences (espeak's zero-length pauses, clipping leftovers) join a neighbour
# espeak-ng speaks an l after a vowel and before a consonant or a pause (its dark l) as the vowel's ending: this last
# share of the vowel's time is the l. Measured where the second formant leaves the vowel's own track (the same vowel
# without the l): median 0.46, quartiles 0.41-0.49, over 14 vowels x 4 contexts x 3 voices.
DARK_L_SHARE = 0.45


class AlignmentError(ValueError):
    """An utterance's phone labels cannot be made into a valid alignment of its audio."""


def to_arpabet(labels: list[tuple[float, float, str]], phone_set: str) -> list[tuple[float, float, str]]:
    """Map engine labels ``(onset s, offset s, label)`` to ARPAbet-39/SIL, splitting espeak's two-phone labels.

    Raises ``UnmappedPhoneError`` on a label the tables do not cover.
    """
    if phone_set == "espeak":
        labels = _time_dark_l(labels)
    mapped: list[tuple[float, float, str]] = []
    for onset, offset, label in labels:
        if phone_set == "radio":
            mapped.append((onset, offset, radio_to_arpabet(label)))
        elif is_espeak_modifier(label):
            # Stress/length marks have no sound of their own: the previous phone lasts until the next one starts.
            if mapped:
                mapped[-1] = (mapped[-1][0], offset, mapped[-1][2])
            else:
                mapped.append((onset, offset, SILENCE))
        else:
            start = onset
            parts = espeak_to_arpabet(label)
            for i, (phone, share) in enumerate(parts):
                end = offset if i == len(parts) - 1 else start + share * (offset - onset)
                mapped.append((start, end, phone))
                start = end
    return mapped


def _time_dark_l(labels: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Give each espeak dark l (an ``l`` after a vowel, not before one) the last ``DARK_L_SHARE`` of the vowel.

    espeak reports a dark l where the vowel ends, but the l has no sound of its own: its formants are the vowel's
    ending, and the time up to the next phone is that phone's start (a stop's closure, a voiced stop's voice bar) or
    nothing. So the l moves into the vowel and the next phone starts where the vowel ended.
    """
    timed = list(labels)
    for i in range(1, len(timed)):
        if timed[i][2] != "l" or not is_espeak_vowel(timed[i - 1][2]):
            continue
        if i + 1 < len(timed) and is_espeak_vowel(timed[i + 1][2]):
            continue  # a clear l, timed by espeak
        vowel_onset, vowel_offset, vowel = timed[i - 1]
        l_onset = vowel_offset - DARK_L_SHARE * (vowel_offset - vowel_onset)
        timed[i - 1] = (vowel_onset, l_onset, vowel)
        if i + 1 < len(timed):
            timed[i] = (l_onset, vowel_offset, "l")
            timed[i + 1] = (vowel_offset, timed[i + 1][1], timed[i + 1][2])
        else:  # nothing follows to take the l's own time
            timed[i] = (l_onset, timed[i][1], "l")
    return timed


def finalise(
    labels: list[tuple[float, float, str]], num_samples: int, *, sample_rate: int = 16000
) -> list[Segment]:
    """Quantise ARPAbet labels in seconds to samples and make them cover exactly ``[0, num_samples]``.

    The last silence is clipped or extended to the end of the audio. An utterance whose last non-silence phone
    ends more than ``MAX_OVERHANG_S`` after the audio is refused (its labels do not describe its audio).
    """
    if not labels:
        raise AlignmentError("the engine reported no phones")
    # Offsets only: each segment starts where the previous one ended, so rounding cannot open a gap.
    segments: list[Segment] = []
    onset, previous_offset = 0, 0.0
    for label_onset, label_offset, phone in labels:
        if abs(label_onset - previous_offset) > 1e-6 or label_offset < label_onset:
            raise AlignmentError(
                f"engine labels are not contiguous at {label_onset:.4f} s ({phone}): previous ended at "
                f"{previous_offset:.4f} s, this one ends at {label_offset:.4f} s"
            )
        offset = round(label_offset * sample_rate)
        segments.append((onset, offset, phone))
        onset, previous_offset = offset, label_offset

    speech_end = max((offset for _, offset, phone in segments if phone != SILENCE), default=0)
    if speech_end > num_samples + MAX_OVERHANG_S * sample_rate:
        raise AlignmentError(
            f"the last phone ends at {speech_end / sample_rate:.4f} s, more than {MAX_OVERHANG_S * 1000:.0f} ms "
            f"after the audio ({num_samples / sample_rate:.4f} s)"
        )
    segments = [(on, min(off, num_samples), phone) for on, off, phone in segments if on < num_samples]
    if segments[-1][2] == SILENCE:
        segments[-1] = (segments[-1][0], num_samples, SILENCE)
    elif segments[-1][1] < num_samples:
        segments.append((segments[-1][1], num_samples, SILENCE))

    min_samples = round(MIN_SEGMENT_S * sample_rate)
    for onset, offset, phone in segments:
        if phone != SILENCE and offset - onset < min_samples:
            # Absorbing it would silently drop a phone the utterance says (and that its gold transcription lists).
            raise AlignmentError(
                f"phone {phone} at {onset / sample_rate:.4f} s lasts {(offset - onset) / sample_rate * 1000:.2f} ms, "
                f"expected at least {MIN_SEGMENT_S * 1000:g} ms: the engine gave it no time of its own"
            )
    segments = _merge_silences(_absorb_short(segments, min_samples))
    check(segments, num_samples)
    return segments


def _absorb_short(segments: list[Segment], min_samples: int) -> list[Segment]:
    """Give every segment shorter than ``min_samples`` (only silences, by then) to the previous one (the first one to
    the next)."""
    kept: list[Segment] = []
    for onset, offset, phone in segments:
        if offset - onset >= min_samples or not kept:
            kept.append((onset, offset, phone))
        else:
            kept[-1] = (kept[-1][0], offset, kept[-1][2])
    if len(kept) > 1 and kept[0][1] - kept[0][0] < min_samples:
        kept[1] = (0, kept[1][1], kept[1][2])
        del kept[0]
    return kept


def _merge_silences(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for onset, offset, phone in segments:
        if merged and phone == SILENCE and merged[-1][2] == SILENCE:
            merged[-1] = (merged[-1][0], offset, SILENCE)
        else:
            merged.append((onset, offset, phone))
    return merged


def check(segments: list[Segment], num_samples: int) -> None:
    """Raise ``AlignmentError`` unless ``segments`` is a valid alignment of ``num_samples`` samples."""
    inventory = set(phone_inventory())
    if not segments or segments[0][0] != 0 or segments[-1][1] != num_samples:
        span = f"[{segments[0][0]}, {segments[-1][1]}]" if segments else "nothing"
        raise AlignmentError(f"alignment covers {span}, expected [0, {num_samples}] samples")
    for i, (onset, offset, phone) in enumerate(segments):
        if onset >= offset:
            raise AlignmentError(f"segment {i} ({phone}) has onset {onset} >= offset {offset}")
        if i > 0 and onset != segments[i - 1][1]:
            raise AlignmentError(f"segment {i} ({phone}) starts at {onset}, previous ended at {segments[i - 1][1]}")
        if phone not in inventory:
            raise UnmappedPhoneError(f"segment {i} has label {phone!r}, not in ARPAbet-39 + SIL")
        if i > 0 and phone == SILENCE and segments[i - 1][2] == SILENCE:
            raise AlignmentError(f"segments {i - 1} and {i} are consecutive silences")


def word_segments(segments: list[Segment], pronunciation: tuple[tuple[str, ...], ...],
                  words: tuple[str, ...]) -> list[Segment]:
    """The words of an utterance spoken from ``pronunciation`` (an engine request's: ARPAbet phones per word, stress
    digits allowed, ``(PAUSE,)`` for a pause), as ``(onset, offset, word)`` segments in samples: from its first
    phone's onset to its last phone's offset. ``words`` labels the pronunciation's entries (a pause's label is
    ignored). Silences between words belong to no word.

    Raises ``AlignmentError`` unless the alignment's phones (silences aside) are exactly the pronunciation's: the
    engine then said something else than was asked, and neither its words nor its gold phones could be trusted.
    """
    spoken = [(onset, offset, phone) for onset, offset, phone in segments if phone != SILENCE]
    asked = [(word, [phone.rstrip("012") for phone in phones]) for word, phones in said_words(words, pronunciation)]
    asked_phones = [phone for _, phones in asked for phone in phones]
    said = [phone for _, _, phone in spoken]
    if said != asked_phones:
        first = next((i for i, (a, b) in enumerate(zip(said, asked_phones, strict=False)) if a != b),
                     min(len(said), len(asked_phones)))
        raise AlignmentError(f"the engine spoke other phones than the pronunciation's ({len(said)} for "
                             f"{len(asked_phones)}), first differing at phone {first}: "
                             f"{' '.join(said[first:first + 4]) or 'nothing'} instead of "
                             f"{' '.join(asked_phones[first:first + 4]) or 'nothing'}")
    result, start = [], 0
    for word, phones in asked:
        result.append((spoken[start][0], spoken[start + len(phones) - 1][1], word))
        start += len(phones)
    return result


def said_words(words: tuple[str, ...],
               pronunciation: tuple[tuple[str, ...], ...]) -> list[tuple[str, tuple[str, ...]]]:
    """The (label, phones) of the entries of ``pronunciation`` that are words, not pauses: the rows of its word
    alignment, in order. Raises ``ValueError`` unless ``words`` labels the entries one for one and every word has
    phones."""
    if len(words) != len(pronunciation):
        raise ValueError(f"{len(words)} word labels for a pronunciation of {len(pronunciation)} entries")
    if any(not phones for phones in pronunciation):
        raise ValueError(f"a pronunciation entry has no phones: {pronunciation}")
    return [(word, phones) for word, phones in zip(words, pronunciation, strict=True) if phones != (PAUSE,)]


# Views used by evaluation ---------------------------------------------------------------------------------------


def frame_labels(segments: list[Segment], num_samples: int, frame_samples: int) -> list[str]:
    """One phone per frame: frame ``k`` gets the phone at sample ``(k + 0.5) × frame_samples``.

    There are ``num_samples // frame_samples`` frames (every frame lies inside the audio), within one frame of the
    ``(num_samples - 400) // 320 + 1`` frames the models produce at 20 ms.
    """
    onsets = [onset for onset, _, _ in segments]
    labels = []
    for k in range(num_samples // frame_samples):
        centre = k * frame_samples + frame_samples / 2
        labels.append(segments[bisect.bisect_right(onsets, centre) - 1][2])
    return labels


@dataclass(frozen=True)
class Item:
    """One ABX item: a non-silence phone whose neighbours are not silence either."""

    onset: int  # the centre phone's span, in samples
    offset: int
    context_onset: int  # the whole triphone's span, in samples
    context_offset: int
    phone: str
    previous: str
    next: str


def items(segments: list[Segment]) -> list[Item]:
    """The utterance's ABX items, in time order."""
    return [
        Item(segments[i][0], segments[i][1], segments[i - 1][0], segments[i + 1][1], segments[i][2],
             segments[i - 1][2], segments[i + 1][2])
        for i in range(1, len(segments) - 1)
        if SILENCE not in (segments[i - 1][2], segments[i][2], segments[i + 1][2])
    ]
