"""A fixed log-mel filterbank as the first layer of the front end (``model.extractor_type = "log_mel"``).

waveform (B, 1, S) → pre-emphasis → frames of ``window`` samples every ``hop`` (no centring) → Hamming window →
power spectrum → HTK mel filters → log: (B, num_mels, T) with T = floor((S − window) / hop) + 1, exactly the frame
count of a conv layer [num_mels, window, hop]. So the frame math of ``spidr.models.frames`` holds unchanged, and with
[40, 400, 320] frame i is the MFCC baseline's frame i before its DCT (``spidr.eval.mfcc``).

Why: at small scale a waveform conv front end learns almost nothing in a CPU budget (its output probes at the level
of random initialisation, docs/demo-recipe.md), while a spectral input carries the phonetic detail from step 0.

A per-utterance frequency warp (``model.student_frequency_warp``) moves every spectral component at f Hz to
about α·f (vocal-tract-length perturbation, VTLP: formants and harmonics together), the change a new speaker makes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from spidr.data import SAMPLE_RATE
from spidr.eval.mfcc import PRE_EMPHASIS, mel_edges_hz, mel_filterbank

LOG_FLOOR = 1e-10  # added to the mel power before the log, as the MFCC baseline does
WARP_KNEE = 0.8  # VTLP's piecewise-linear warp is α·f up to 0.8 × Nyquist (/ α when α > 1), then meets Nyquist


def warp_frequencies(freqs_hz: torch.Tensor, alpha: torch.Tensor, nyquist: float) -> torch.Tensor:
    """VTLP warp of frequencies (K,) by factors α (B,) → (B, K): α·f below the knee, then linear to Nyquist, so
    0 and Nyquist stay fixed and the map is monotonic for α in (0, 1 / WARP_KNEE)."""
    alpha = alpha[:, None]
    knee = WARP_KNEE * nyquist * torch.clamp(1.0 / alpha, max=1.0)  # (B, 1): α·knee <= WARP_KNEE·Nyquist
    above = alpha * knee + (nyquist - alpha * knee) * (freqs_hz - knee) / (nyquist - knee)
    return torch.where(freqs_hz <= knee, alpha * freqs_hz, above)


def triangles(edges_hz: torch.Tensor, freqs_hz: torch.Tensor) -> torch.Tensor:
    """Responses (B, M, K) of the M triangular filters with corners ``edges_hz`` (M + 2,) at frequencies (B, K)."""
    lower, centre, upper = (edges_hz[i : i + edges_hz.shape[0] - 2, None] for i in range(3))  # (M, 1) each
    f = freqs_hz[:, None, :]  # (B, 1, K)
    return torch.clamp(torch.minimum((f - lower) / (centre - lower), (upper - f) / (upper - centre)), min=0.0)


class LogMelFilterbank(nn.Module):
    """(B, 1, S) waveforms → (B, num_mels, T) log mel power, always computed in fp32 and returned in the input's
    dtype (so a model cast to bf16 or fp16 runs its next conv on it). No trainable parameters."""

    def __init__(self, num_mels: int, window: int, hop: int) -> None:
        super().__init__()
        self.window, self.hop = window, hop
        self.n_fft = 1 << (window - 1).bit_length()  # the next power of two >= window
        self.nyquist = SAMPLE_RATE / 2
        # Not in the state dict: they follow from the config. Made from numpy, so that a model built on the meta
        # device (``load_model``) still gets real values: a state dict cannot fill non-persistent buffers.
        tensors = {
            "taper": np.hamming(window),
            "filters": mel_filterbank(num_mels, self.n_fft),  # (num_mels, n_fft // 2 + 1)
            "edges_hz": mel_edges_hz(num_mels),  # (num_mels + 2,)
            "bins_hz": np.linspace(0.0, self.nyquist, self.n_fft // 2 + 1),  # (n_fft // 2 + 1,)
        }
        for name, value in tensors.items():
            self.register_buffer(name, torch.from_numpy(value).float(), persistent=False)

    def _apply(self, fn: Callable, recurse: bool = True) -> LogMelFilterbank:  # noqa: FBT001, FBT002 (nn.Module's signature)
        """``Module.to``/``half``/``bfloat16`` move the buffers but keep them fp32: filters rounded to bf16 would
        change the features, and an fp32 spectrum cannot be multiplied by bf16 filters."""
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.dtype != torch.float32:
                self._buffers[name] = before[name].to(buffer.device)  # the fp32 values, moved only
        return self

    def forward(self, x: torch.Tensor, warp: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, 1, S); ``warp``: per-utterance VTLP factors α (B,), or None for the plain filterbank."""
        input_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x = x[:, 0].float()
            x = torch.cat([x[:, :1], x[:, 1:] - PRE_EMPHASIS * x[:, :-1]], dim=1)
            frames = x.unfold(1, self.window, self.hop) * self.taper  # (B, T, window)
            power = torch.fft.rfft(frames, n=self.n_fft).abs().square()  # (B, T, n_fft // 2 + 1)
            if warp is None:
                mel = power @ self.filters.T
            else:
                # Power at f Hz is counted in the filters around warp(f): the spectrum is stretched by α.
                weights = triangles(self.edges_hz, warp_frequencies(self.bins_hz, warp.float(), self.nyquist))
                mel = power @ weights.transpose(1, 2)  # (B, T, M)
            return torch.log(mel + LOG_FLOOR).transpose(1, 2).to(input_dtype)
