"""The corpus phone inventory (ARPAbet-39 without stress, plus ``SIL``) and the engines' phone tables.

flite and festival label segments with the CMU "radio" phone set, one ARPAbet phone per segment. espeak-ng uses
its own mnemonics: most map to one phone, r-coloured vowels and syllabic l split into two phones by a fixed share
of the duration, and stress/length modifiers carry no duration of their own (they are merged into the previous
phone). The tables live in ``phone_maps.json`` beside this file: a copy of the project's ``phone-maps.json`` plus
``espeak_to_arpabet_additions``, the few mnemonics espeak-ng emits for our word lists that the copy lacks.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources

SILENCE = "SIL"
PAUSE = "_"  # a pause inside a pronunciation given to an engine (between the words of a word list)
VOWELS = frozenset({"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"})


class UnmappedPhoneError(ValueError):
    """An engine produced a phone label that the tables do not cover."""


def phone_maps_json() -> bytes:
    """The shipped engine-label tables, ``phone_maps.json``, as its bytes."""
    return resources.files("spidr.corpus").joinpath("phone_maps.json").read_bytes()


def phone_maps_digest() -> str:
    """SHA-256 of ``phone_maps_json()``: the tables decide every alignment, so a benchmark made with other tables
    (an edited mapping) is not reused."""
    return hashlib.sha256(phone_maps_json()).hexdigest()


@cache
def _tables() -> dict:
    tables = json.loads(phone_maps_json())
    additions = {k: v for k, v in tables.pop("espeak_to_arpabet_additions").items() if not k.startswith("_")}
    tables["espeak_to_arpabet"] = {**tables["espeak_to_arpabet"], **additions}
    return tables


@cache
def phone_inventory() -> tuple[str, ...]:
    """The 39 ARPAbet phones (upper case, no stress) followed by ``SIL``: every label the corpus may contain."""
    return (*_tables()["arpabet39"], SILENCE)


def radio_to_arpabet(label: str) -> str:
    """Map one flite/festival segment label (e.g. ``"ax"``, ``"pau"``) to ARPAbet-39 or ``SIL``."""
    try:
        return _tables()["radio_to_arpabet"][label]
    except KeyError:
        raise UnmappedPhoneError(f"flite/festival phone {label!r} has no ARPAbet mapping") from None


# ARPAbet → espeak-ng mnemonic, for speaking a pronunciation through espeak's phoneme input. Vowels map by stress:
# (stressed, unstressed); espeak reads the stress from a "'" (primary) or "," (secondary) mark before the vowel.
ARPABET_TO_ESPEAK = {
    "AA": ("A:", "A:"), "AE": ("a", "a"), "AH": ("V", "@"), "AO": ("O:", "O:"), "AW": ("aU", "aU"),
    "AY": ("aI", "aI"), "EH": ("E", "E"), "ER": ("3:", "3"), "EY": ("eI", "eI"), "IH": ("I", "I"),
    "IY": ("i:", "i"), "OW": ("oU", "oU"), "OY": ("OI", "OI"), "UH": ("U", "U"), "UW": ("u:", "u:"),
    "B": "b", "CH": "tS", "D": "d", "DH": "D", "F": "f", "G": "g", "HH": "h", "JH": "dZ", "K": "k", "L": "l",
    "M": "m", "N": "n", "NG": "N", "P": "p", "R": "r", "S": "s", "SH": "S", "T": "t", "TH": "T", "V": "v",
    "W": "w", "Y": "j", "Z": "z", "ZH": "Z",
}


# Where espeak-ng would not say the phone asked for, given the phone after it (measured with the third formant, which
# an r lowers to ~1.5 kHz, and with the phoneme events):
# * its en-us "r" before a consonant or a pause is silent, and only a few vowels carry an r-colour of their own
#   ("h'Erd" and "h'A:rd" sound like "h'Ed" and "h'A:d"). Its linking r "r-" is a timed r after any vowel: the vowel
#   glides into it and it lasts ~45 ms.
# * its schwa "@" turns into the r-coloured "3" (ER) before an r; "@2" (the schwa of "the") stays a schwa.
# * after ER ("3", "3:") and before a vowel it adds a linking r of its own: its zero-length pause "_|" prevents it.
SYLLABLE_FINAL_R = "r-"
SCHWA_BEFORE_R = "@2"
NO_LINK = "_|"
# Phoneme input is read by longest match ("aI" then "@" would be read as "aI@"): "|" separates mnemonics, silently.
ESPEAK_SEPARATOR = "|"


def arpabet_to_espeak(phone: str, next_phone: str | None = None) -> str:
    """One ARPAbet phone with an optional stress digit (``"AE1"``) as espeak-ng phoneme input (``"'a"``).

    ``next_phone`` is the phone spoken after it (``None`` before a pause or at the end): it decides how an ``R``, an
    unstressed ``AH`` before an ``R`` and an ``ER`` before a vowel are written (one or two mnemonics).
    """
    base, stress = phone.rstrip("012"), phone[len(phone.rstrip("012")):]
    try:
        mapped = ARPABET_TO_ESPEAK[base]
    except KeyError:
        raise UnmappedPhoneError(f"ARPAbet phone {phone!r} has no espeak-ng mnemonic") from None
    following = next_phone.rstrip("012") if next_phone is not None else None
    if base == "R" and following not in VOWELS:
        return SYLLABLE_FINAL_R
    if base == "AH" and stress in ("", "0") and following == "R":
        return SCHWA_BEFORE_R
    if isinstance(mapped, str):
        return mapped
    stressed, unstressed = mapped
    written = {"1": "'" + stressed, "2": "," + stressed}.get(stress, unstressed)
    return written + ESPEAK_SEPARATOR + NO_LINK if base == "ER" and following in VOWELS else written


def is_espeak_modifier(label: str) -> bool:
    """Whether an espeak-ng phoneme event is a stress/length modifier, merged into the previous phone."""
    return label in _tables()["espeak_modifiers_merged_into_previous"]


def is_espeak_vowel(label: str) -> bool:
    """Whether an espeak-ng mnemonic is a vowel (possibly r-coloured, like ``"A@"``); unmapped labels are not."""
    parts = _tables()["espeak_to_arpabet"].get(label)
    return parts is not None and parts[0][0] in VOWELS


def espeak_to_arpabet(label: str) -> list[tuple[str, float]]:
    """Map one espeak-ng phoneme mnemonic to ``[(phone, share of the duration), ...]`` (shares sum to 1)."""
    try:
        return [(phone, float(share)) for phone, share in _tables()["espeak_to_arpabet"][label]]
    except KeyError:
        raise UnmappedPhoneError(f"espeak-ng phoneme {label!r} has no ARPAbet mapping") from None
