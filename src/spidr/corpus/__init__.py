"""A built-in, phone-aligned, multi-speaker synthetic speech corpus (flite / festival / espeak-ng).

``synthesize_corpus(out_dir, voices=..., num_utterances_per_voice=..., seed=...) -> CorpusInfo`` makes it;
``available_voices()`` lists the voices installed here. The modules follow the data: ``text`` (sentences) →
``engines``/``espeak`` (audio + engine phone labels) → ``alignment`` (ARPAbet, checks) → ``utterance`` (one wav)
→ ``outputs`` (corpus files), driven by ``synth``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spidr.corpus.synth import CorpusInfo, synthesize_corpus
    from spidr.corpus.voices import available_voices

# Imported on first use so that `spidr --help` does not load numpy/soxr through this package.
_EXPORTS = {"CorpusInfo": "spidr.corpus.synth", "synthesize_corpus": "spidr.corpus.synth",
            "available_voices": "spidr.corpus.voices"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spidr.corpus' has no attribute {name!r}")


__all__ = ["CorpusInfo", "available_voices", "synthesize_corpus"]
