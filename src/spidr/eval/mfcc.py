"""MFCC baseline features (13 cepstra + Δ + ΔΔ) on the model's 50 Hz frame grid.

Frames use a 400-sample (25 ms) Hamming window every 320 samples (20 ms) with no centring, so an utterance of
S samples gives exactly as many frames as the conv front end, floor((S − 400) / 320) + 1, and frame i of both
covers the same samples. The mel filterbank follows the common HTK recipe; the cepstra are the first 13
orthonormal DCT-II coefficients of the log-mel energies (c0 included) with no liftering, so every cepstral
dimension keeps its own scale (which an angular ABX distance weighs).
"""

from __future__ import annotations

import numpy as np
from scipy.fft import dct

from spidr.data import SAMPLE_RATE

WINDOW = 400
HOP = 320
N_FFT = 512
NUM_MELS = 40
NUM_CEPS = 13
PRE_EMPHASIS = 0.97
DELTA_WIDTH = 2


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_edges_hz(num_mels: int = NUM_MELS, sample_rate: int = SAMPLE_RATE, fmin: float = 20.0) -> np.ndarray:
    """The num_mels + 2 corner frequencies (Hz) of the triangular filters, equally spaced on the HTK mel scale:
    filter m rises from edge m to edge m + 1 and falls to edge m + 2."""
    return _mel_to_hz(np.linspace(_hz_to_mel(np.array(fmin)), _hz_to_mel(np.array(sample_rate / 2)), num_mels + 2))


def mel_filterbank(
    num_mels: int = NUM_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, fmin: float = 20.0
) -> np.ndarray:
    """Triangular HTK-mel filters, shape (num_mels, n_fft // 2 + 1)."""
    edges_hz = mel_edges_hz(num_mels, sample_rate, fmin)
    bins_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bins_hz[None] - lower) / (centre - lower)
    falling = (upper - bins_hz[None]) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def deltas(features: np.ndarray, width: int = DELTA_WIDTH) -> np.ndarray:
    """Regression deltas over ±width frames with edge padding: (T, C) → (T, C)."""
    padded = np.pad(features, ((width, width), (0, 0)), mode="edge")
    num_frames = features.shape[0]
    numerator = sum(n * (padded[width + n : width + n + num_frames] - padded[width - n : width - n + num_frames])
                    for n in range(1, width + 1))
    return numerator / (2 * sum(n * n for n in range(1, width + 1)))


def mfcc(waveform: np.ndarray) -> np.ndarray:
    """13 MFCCs + Δ + ΔΔ of a 16 kHz mono waveform (S,) → (T, 39) float32 with T = floor((S − 400)/320) + 1."""
    waveform = np.asarray(waveform, dtype=np.float64)
    if waveform.ndim != 1:
        raise ValueError(f"mfcc expects a mono waveform of shape (S,), got shape {waveform.shape}")
    if waveform.shape[0] < WINDOW:
        return np.zeros((0, 3 * NUM_CEPS), dtype=np.float32)
    emphasised = np.append(waveform[0], waveform[1:] - PRE_EMPHASIS * waveform[:-1])
    num_frames = (emphasised.shape[0] - WINDOW) // HOP + 1
    index = np.arange(WINDOW)[None, :] + HOP * np.arange(num_frames)[:, None]
    frames = emphasised[index] * np.hamming(WINDOW)[None, :]
    power = np.abs(np.fft.rfft(frames, n=N_FFT, axis=1)) ** 2
    log_mel = np.log(power @ mel_filterbank().T + 1e-10)
    cepstra = dct(log_mel, type=2, axis=1, norm="ortho")[:, :NUM_CEPS]
    delta = deltas(cepstra)
    return np.concatenate([cepstra, delta, deltas(delta)], axis=1).astype(np.float32)
