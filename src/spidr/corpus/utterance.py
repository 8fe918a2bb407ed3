"""One batch of utterances of one voice: engine → 16 kHz audio and ARPAbet alignment → checked wav on disk.

This is the unit of work of the parallel driver (``spidr.corpus.synth``); it runs in a worker process and returns
small picklable records. An utterance that cannot be made right (unmapped phone, labels running past the audio,
engine failure) is dropped with its reason instead of stopping the batch.
"""

from __future__ import annotations

import logging
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from spidr.corpus import alignment, engines
from spidr.corpus.alignment import AlignmentError, Segment
from spidr.corpus.phones import UnmappedPhoneError
from spidr.corpus.voices import Voice
from spidr.data import SAMPLE_RATE

logger = logging.getLogger(__name__)

PEAK_DB = -3.0  # peak normalisation level, as sox "gain -n -3"


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    voice: str
    speaker: str
    text: str
    path: Path  # the wav, absolute
    num_samples: int
    segments: list[Segment]
    # (onset, offset, word) in samples, for speech made from a pronunciation (the spoken-LM benchmark); else empty
    words: tuple[Segment, ...] = ()


@dataclass(frozen=True)
class Dropped:
    utt_id: str
    voice: str
    text: str
    reason: str


def to_16k(audio: np.ndarray, sample_rate: int, *, warp: float = 1.0) -> np.ndarray:
    """Resample float audio to 16 kHz, warped like sox ``speed warp``: read as if recorded at ``rate × warp``.

    Returns float64 audio of length ≈ ``len(audio) × 16000 / (sample_rate × warp)``; pitch and tempo both scale.
    """
    source_rate = sample_rate * warp
    if source_rate == SAMPLE_RATE:
        return audio.astype(np.float64)
    return soxr.resample(audio.astype(np.float64), source_rate, SAMPLE_RATE, quality="VHQ")


def to_int16(audio: np.ndarray) -> np.ndarray:
    """Peak-normalise to ``PEAK_DB`` dBFS and quantise to 16-bit (raises ``AlignmentError`` on silent audio)."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        raise AlignmentError("the engine produced silent audio")
    scaled = audio * (10 ** (PEAK_DB / 20) / peak) * 32767.0
    return np.round(scaled).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray) -> None:
    """16-bit mono 16 kHz WAV with a plain 44-byte header (no metadata, so equal samples give equal bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.astype("<i2").tobytes())


def _finish(raw: engines.RawUtterance, voice: Voice) -> tuple[np.ndarray, list[Segment]]:
    """Engine output → (int16 samples at 16 kHz, checked alignment of exactly those samples)."""
    samples = to_int16(to_16k(raw.audio, raw.sample_rate, warp=voice.warp))
    labels = [(onset / voice.warp, offset / voice.warp, phone)
              for onset, offset, phone in alignment.to_arpabet(raw.labels, raw.phone_set)]
    return samples, alignment.finalise(labels, len(samples), sample_rate=SAMPLE_RATE)


def synthesize_batch(voice: Voice, requests: list[engines.Request], wav_dir: Path, *,
                     speaker_folders: bool = True) -> list[Utterance | Dropped]:
    """Synthesise ``requests`` with ``voice`` into ``wav_dir/<speaker>/<utt_id>.wav`` (``wav_dir/<utt_id>.wav``
    without ``speaker_folders``, the ZeroSpeech test-set layout); one record per request."""
    records: list[Utterance | Dropped] = []
    for request, raw in zip(requests, engines.synthesize(voice, requests), strict=True):
        try:
            if isinstance(raw, engines.SynthesisError):
                raise raw
            samples, segments = _finish(raw, voice)
            words = () if request.pronunciation is None else tuple(
                alignment.word_segments(segments, request.pronunciation, request.word_labels()))
        except (engines.SynthesisError, AlignmentError, UnmappedPhoneError) as error:
            logger.debug("dropping %s (%s): %s", request.utt_id, request.text, error)
            records.append(Dropped(request.utt_id, voice.name, request.text, str(error)))
            continue
        folder = wav_dir / voice.speaker if speaker_folders else wav_dir
        path = (folder / f"{request.utt_id}.wav").resolve()
        write_wav(path, samples)
        records.append(Utterance(request.utt_id, voice.name, voice.speaker, request.text, path, len(samples),
                                 segments, words))
    return records
