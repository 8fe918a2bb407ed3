"""Decoding: any soundfile-readable file or byte string → 16 kHz mono float32, standardised per utterance.

The released models expect each utterance standardised over its whole length (zero mean, unit biased variance,
eps 1e-5: ``F.layer_norm`` without affine, spec §3.1); ``standardize`` is that operation, shared with evaluation.
Unlike the official loader, other sample rates are resampled (soxr) and multi-channel audio is averaged to mono.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F

from spidr.data import SAMPLE_RATE
from spidr.data.manifest import ManifestEntry, read_member
from spidr.data.scanning import UNKNOWN_LENGTH, UNKNOWN_LENGTH_REASON
from spidr.input_files import why_not_a_file

STANDARDIZE_EPS = 1e-5
# Above this peak the float32 sum of squares of a long utterance can overflow (samples are normally within ±1, or
# ±32768 for unscaled integer PCM); such audio (e.g. byte-swapped floats) is scaled down before standardising.
_LARGEST_SAFE_PEAK = 2.0**40


class AudioError(ValueError):
    """An utterance that cannot be used: missing, corrupt, empty, too short or not finite."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def standardize(wave: torch.Tensor) -> torch.Tensor:
    """Standardise over the last dimension exactly as ``F.layer_norm(x, x.shape)`` does for a 1-D ``x``.

    wave: (..., S) float → (..., S), each row with mean 0 and biased variance 1 (eps 1e-5).
    """
    return F.layer_norm(wave, wave.shape[-1:], eps=STANDARDIZE_EPS)


# What soundfile raises on a file it cannot decode (a corrupt MP3 frame can surface as a ValueError from numpy).
_DECODER_ERRORS = (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError)


@contextmanager
def decoding(name: str) -> Iterator[None]:
    """Within the block, soundfile's failures on the file ``name`` become ``AudioError``s ("cannot be decoded");
    an ``AudioError`` passes as it is. For decoding only: a model run inside would have its errors renamed."""
    try:
        yield
    except AudioError:  # a ValueError, but already says what is wrong
        raise
    except _DECODER_ERRORS as error:
        raise AudioError(name, f"cannot be decoded ({error})") from error


def _read(source: str | bytes | bytearray | BinaryIO, name: str) -> tuple[np.ndarray, int]:
    """(S, C) float32 samples and the sample rate; every decoder failure becomes an ``AudioError``."""
    if isinstance(source, str) and (why := why_not_a_file(source)) is not None:
        raise AudioError(name, f"file {why}" if why == "does not exist" else why)
    try:
        encoded = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
        with decoding(name), sf.SoundFile(encoded) as audio:
            if audio.frames >= UNKNOWN_LENGTH:  # read() would allocate for 2**63 frames and fail
                raise AudioError(name, UNKNOWN_LENGTH_REASON)
            # frames given: without them soundfile refuses the codecs it calls non-seekable (GSM 6.10, G.721, ...)
            samples, rate = audio.read(frames=audio.frames, dtype="float32", always_2d=True), audio.samplerate
    except MemoryError:  # a corrupt header claiming billions of samples
        raise AudioError(name, "cannot be decoded (its header claims more samples than memory holds)") from None
    return samples, int(rate)


def _source_name(source: str | os.PathLike | bytes | BinaryIO) -> str:
    """What errors call an encoded source: its path, "<bytes>", or a file object's name."""
    if isinstance(source, bytes | bytearray):
        return "<bytes>"
    if isinstance(source, str | os.PathLike):
        return os.fsdecode(source)
    return str(getattr(source, "name", source))


def decode(source: str | os.PathLike | bytes | BinaryIO, *, name: str | None = None) -> torch.Tensor:
    """Decode to a mono 16 kHz float32 waveform (S,): channels are averaged, other rates resampled with soxr.

    ``name`` labels errors for byte input. Raises ``AudioError`` for missing, undecodable, empty or non-finite audio.
    """
    if isinstance(source, os.PathLike):  # a PathLike[bytes] (os.scandir(b".")) names a file, not encoded audio
        source = os.fsdecode(source)
    name = name or _source_name(source)
    samples, rate = _read(source, name)
    return _mono_16k(samples, rate, name)


def _mono_16k(samples: np.ndarray, rate: int, name: str) -> torch.Tensor:
    """(S, C) float32 samples at ``rate`` → (S',) mono float32 at 16 kHz; empty or non-finite audio is an error."""
    if samples.shape[0] == 0 or samples.shape[1] == 0:
        raise AudioError(name, "contains no audio samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    # Check before resampling: soxr would smear a single NaN over its filter length.
    if not np.isfinite(mono).all():
        raise AudioError(name, "contains NaN or Inf samples")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE).astype(np.float32, copy=False)
        if mono.size == 0:  # e.g. one sample at 44.1 kHz
            raise AudioError(name, f"contains no audio samples at 16 kHz ({samples.shape[0]} at {rate} Hz)")
    return torch.from_numpy(np.ascontiguousarray(mono))


def load_audio(
    source: str | os.PathLike | bytes | BinaryIO | ManifestEntry, *, normalize: bool = True, min_samples: int = 0
) -> torch.Tensor:
    """Load one utterance as a (S,) float32 tensor at 16 kHz, standardised if ``normalize``.

    ``source`` is a path, encoded bytes, a binary file object or a manifest entry (an archive entry is read from
    its tar). Samples already in memory go through ``waveform_from_samples``.
    Raises ``AudioError(path, reason)`` if the audio is missing, corrupt, empty, shorter than ``min_samples`` (after
    resampling) or contains NaN/Inf.
    """
    if isinstance(source, ManifestEntry):
        name = source.location
        if source.in_archive:
            try:
                data: str | bytes = read_member(source)
            except OSError as error:
                raise AudioError(name, f"cannot read archive member ({error})") from error
        else:
            data = source.path
        wave = decode(data, name=name)
    elif isinstance(source, np.ndarray | torch.Tensor):
        raise TypeError(f"load_audio reads a file (a path, encoded bytes, a file object or a manifest entry), not a "
                        f"{type(source).__name__} of samples: use waveform_from_samples(samples, sample_rate)")
    else:
        name = _source_name(source)
        wave = decode(source, name=name)
    return _finish(wave, name, normalize=normalize, min_samples=min_samples)


def decoded_length(entry: ManifestEntry) -> int | None:
    """The number of samples ``entry`` decodes to at 16 kHz (None: it cannot be read, and an extraction skips it)."""
    try:
        return len(load_audio(entry, normalize=False))
    except AudioError:
        return None


def waveform_from_samples(
    samples: np.ndarray | torch.Tensor, sample_rate: int, *, normalize: bool = True, name: str = "<samples>"
) -> torch.Tensor:
    """What ``load_audio`` gives for a file, from samples already in memory: (S,) mono or (S, C) channels (as
    soundfile reads them), float or integer PCM (scaled to ±1), at any ``sample_rate`` → (S',) float32 at 16 kHz,
    standardised if ``normalize``. ``name`` labels errors."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu()
        array = (samples.float() if samples.dtype == torch.bfloat16 else samples).numpy()  # numpy has no bfloat16
    else:
        array = np.asarray(samples)
    if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] > array.shape[0]):
        raise AudioError(name, f"samples of shape {array.shape}: expected (S,) mono or (S, C) channels (more channels "
                               "than samples is (C, S): transpose it)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise AudioError(name, f"sample_rate = {sample_rate!r}: expected a positive whole number of Hz")
    if array.dtype == np.uint8:  # 8-bit PCM is unsigned: 128 is silence
        array = (array.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1)
    elif not np.issubdtype(array.dtype, np.floating):
        raise AudioError(name, f"samples of dtype {array.dtype}: expected float or integer PCM")
    columns = array.astype(np.float32)  # a copy: the result never shares the caller's memory
    columns = columns[:, None] if columns.ndim == 1 else columns
    return _finish(_mono_16k(columns, int(sample_rate), name), name, normalize=normalize, min_samples=0)


def _finish(wave: torch.Tensor, name: str, *, normalize: bool, min_samples: int) -> torch.Tensor:
    """A decoded 16 kHz waveform (S,), checked for length and standardised if ``normalize``."""
    if wave.numel() < min_samples:
        raise AudioError(name, f"too short: {wave.numel()} samples at 16 kHz, fewer than the minimum {min_samples}")
    if not normalize:
        return wave
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    if peak > _LARGEST_SAFE_PEAK:  # its float32 variance would overflow: scale by a power of 2 first (exact)
        wave = wave * 2.0 ** -math.ceil(math.log2(peak))
    wave = standardize(wave)
    if not torch.isfinite(wave).all():  # huge finite samples can overflow the variance
        raise AudioError(name, "is not finite after standardisation (samples too large)")
    return wave
