"""The voices the corpus can speak with, who each voice is (the speaker label), and whether it is installed.

A speaker is the recorded *person*: slt through flite and slt through festival HTS is one speaker, so an
across-speaker ABX pair never compares a person with themself. espeak-ng variants are formant-synthesis voices
with no recorded person; each variant is its own speaker. A voice name with a ``_w<factor>`` suffix (``awb_w0.9``)
is that voice resampled by sox-style ``speed <factor>`` (pitch and tempo both scale): a new speaker
(``awb_w0.9``) with every phone time divided by the factor.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Literal

Engine = Literal["flite", "festival", "espeak"]

# Debian packages that provide each engine and its voices (Debian 12 names).
APT_PACKAGES: dict[Engine, tuple[str, ...]] = {
    "flite": ("flite",),
    "festival": ("festival", "festlex-cmu", "festlex-poslex", "festvox-kallpc16k", "festvox-kdlpc16k",
                 "festvox-us-slt-hts"),
    "espeak": ("espeak-ng", "espeak-ng-data", "libespeak-ng1"),
}
FESTIVAL_VOICE_DIRS = (Path("/usr/share/festival/voices"), Path("/usr/lib/festival/voices"))
WARP_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class Voice:
    name: str  # used in --voices and in utterance ids; no "-" (the id separator)
    engine: Engine
    engine_voice: str  # the name the engine knows
    person: str  # recorded person (speaker label before warping)
    gender: Literal["female", "male"]
    description: str
    warp: float = 1.0  # sox-style speed factor applied after synthesis

    @property
    def speaker(self) -> str:
        return self.person if self.warp == 1.0 else f"{self.person}_w{self.warp:g}"

    @property
    def packages(self) -> tuple[str, ...]:
        return APT_PACKAGES[self.engine]


def _espeak_voice(variant: str, gender: Literal["female", "male"], description: str) -> Voice:
    name = f"espeak_{variant}"
    return Voice(name, "espeak", f"en-us+{variant}", name, gender, f"espeak-ng en-us, {description}")


CATALOGUE: tuple[Voice, ...] = (
    Voice("awb", "flite", "awb", "awb", "male", "flite clustergen, Scottish male (most distinct)"),
    Voice("rms", "flite", "rms", "rms", "male", "flite clustergen, US male"),
    Voice("slt", "flite", "slt", "slt", "female", "flite clustergen, US female"),
    Voice("kal16", "flite", "kal16", "kal", "male", "flite diphone, US male"),
    Voice("kal_diphone", "festival", "kal_diphone", "kal", "male", "festival diphone, kal again (other prosody)"),
    Voice("ked_diphone", "festival", "ked_diphone", "ked", "male", "festival diphone, US male"),
    Voice("slt_hts", "festival", "cmu_us_slt_arctic_hts", "slt", "female", "festival HTS, slt again (smoothest)"),
    *(_espeak_voice(f"m{i}", "male", f"male variant {i}") for i in range(1, 8)),
    *(_espeak_voice(f"f{i}", "female", f"female variant {i}") for i in range(1, 6)),
    *(_espeak_voice(variant, "male", f"Klatt synthesiser, variant {variant}")
      for variant in ("klatt", "klatt2", "klatt3", "klatt4")),
)
# The 7 natural voices (5 persons) plus 4 espeak variants: 11 voices, 9 speakers.
DEFAULT_VOICES = ("awb", "rms", "slt", "kal16", "kal_diphone", "ked_diphone", "slt_hts",
                  "espeak_m1", "espeak_m3", "espeak_f1", "espeak_f3")

_BY_NAME = {voice.name: voice for voice in CATALOGUE}
_WARPED = re.compile(r"^(?P<base>[a-z0-9_]+?)_w(?P<warp>\d+(?:\.\d+)?)$")


def parse_voice(name: str) -> Voice:
    """The catalogue voice called ``name``, or a warped copy for ``<voice>_w<factor>`` (e.g. ``awb_w0.9``)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    match = _WARPED.match(name)
    if match and match["base"] in _BY_NAME:
        warp = float(match["warp"])
        if not WARP_RANGE[0] <= warp <= WARP_RANGE[1] or warp == 1.0:
            raise ValueError(
                f"voice {name!r}: warp factor {warp:g} must be in [{WARP_RANGE[0]}, {WARP_RANGE[1]}] and not 1 "
                "(0.85-1.2 sounds natural)"
            )
        # Normalise the spelling so "awb_w0.90" and "awb_w0.9" are one voice with one file name.
        return replace(_BY_NAME[match["base"]], name=f"{match['base']}_w{warp:g}", warp=warp)
    raise ValueError(
        f"unknown voice {name!r}; expected one of {', '.join(_BY_NAME)}, optionally with a warp suffix such as "
        "'awb_w0.9'"
    )


# Availability -------------------------------------------------------------------------------------------------


@cache
def _flite_voices() -> frozenset[str]:
    if shutil.which("flite") is None:
        return frozenset()
    listing = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=False).stdout
    return frozenset(listing.partition(":")[2].split())


def _festival_has(engine_voice: str) -> bool:
    return shutil.which("festival") is not None and any(
        (root / group / engine_voice).is_dir() for root in FESTIVAL_VOICE_DIRS if root.is_dir()
        for group in (p.name for p in root.iterdir())
    )


def is_available(voice: Voice) -> bool:
    """Whether the engine and voice data that ``voice`` needs are installed."""
    match voice.engine:
        case "flite":
            return voice.engine_voice in _flite_voices()
        case "festival":
            return _festival_has(voice.engine_voice)
        case "espeak":
            if not hasattr(os, "fork"):  # every utterance is made in a forked child (spidr.corpus.espeak)
                return False
            from spidr.corpus import espeak  # loads numpy: only when an espeak voice is checked

            return voice.engine_voice.partition("+")[2] in espeak.variants()
    return False


def available_voices() -> list[str]:
    """Names of the catalogue voices installed on this machine, in catalogue order (warped copies not listed)."""
    return [voice.name for voice in CATALOGUE if is_available(voice)]


def require_available(voices: list[Voice]) -> None:
    """Raise ``ValueError`` naming the Debian packages to install if any of ``voices`` is missing."""
    missing = [voice for voice in voices if not is_available(voice)]
    if not missing:
        return
    packages = sorted({package for voice in missing for package in voice.packages} | {"libsndfile1"})
    names = ", ".join(f"{voice.name} ({voice.engine} {voice.engine_voice})" for voice in missing)
    raise ValueError(
        f"voice(s) {names} are not installed; install the Debian packages with: "
        f"sudo apt-get install {' '.join(packages)}"
    )
