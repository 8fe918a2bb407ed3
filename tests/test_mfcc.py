"""MFCC baseline: frame grid, known-signal properties and deltas computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spidr.eval.mfcc import deltas, mel_edges_hz, mel_filterbank, mfcc


@pytest.mark.parametrize(("samples", "frames"), [(400, 1), (719, 1), (720, 2), (16000, 49), (32000, 99)])
def test_frame_count_matches_the_conv_front_end(samples, frames):
    rng = np.random.default_rng(0)
    assert mfcc(rng.standard_normal(samples)).shape == (frames, 39)


def test_shorter_than_one_window_gives_no_frames():
    assert mfcc(np.zeros(399)).shape == (0, 39)


def test_rejects_multichannel_input():
    with pytest.raises(ValueError, match=r"shape \(S,\)"):
        mfcc(np.zeros((2, 16000)))


def test_deltas_of_a_linear_ramp_are_its_slope_away_from_edges():
    ramp = np.arange(20, dtype=np.float64)[:, None] * np.array([[1.0, -3.0]])
    d = deltas(ramp)
    np.testing.assert_allclose(d[2:-2], np.tile([[1.0, -3.0]], (16, 1)))
    # Edge padding repeats the first frame: (1·(1−0) + 2·(2−0)) / 10 = 0.5 of the slope.
    np.testing.assert_allclose(d[0], [0.5, -1.5])


def test_filterbank_is_a_partition_between_first_and_last_centre():
    bank = mel_filterbank()
    assert bank.shape == (40, 257)
    assert (bank >= 0).all()
    assert bank.max() <= 1.0 + 1e-12
    # Adjacent triangles overlap so that the response sums to 1 between the first and last centre frequency.
    inner = bank.sum(axis=0)[20:220]
    np.testing.assert_allclose(inner, 1.0, atol=1e-9)


def test_tones_of_different_pitch_are_separated_and_level_mostly_moves_c0():
    t = np.arange(16000) / 16000
    low, high = np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 3000 * t)
    f_low, f_high, f_loud = mfcc(low), mfcc(high), mfcc(10 * low)
    assert np.linalg.norm(f_low[:, 1:13] - f_high[:, 1:13]) > 10 * np.linalg.norm(f_low[:, 1:13] - f_loud[:, 1:13])
    # A 10× louder signal adds log(100) to every log-mel energy: only c0 (× sqrt(40) in the ortho DCT) moves.
    np.testing.assert_allclose((f_loud[:, 0] - f_low[:, 0]).mean(), np.log(100) * np.sqrt(40), rtol=1e-3)


def _hand_mfcc(signal: np.ndarray) -> np.ndarray:
    """The module docstring's recipe written out term by term: pre-emphasis 0.97, 400-sample Hamming frames every
    320 samples, |DFT|² on 512 points, 40 triangular filters equally spaced on the HTK mel scale from 20 Hz to
    8 kHz, natural log (+1e-10), the first 13 orthonormal DCT-II coefficients, regression deltas over ±2 frames with
    the edge frames repeated, and ΔΔ = the deltas of Δ."""
    x = np.asarray(signal, np.float64)
    y = np.array([x[0]] + [x[n] - 0.97 * x[n - 1] for n in range(1, len(x))])
    hamming = np.array([0.54 - 0.46 * math.cos(2 * math.pi * n / 399) for n in range(400)])
    num_frames = (len(x) - 400) // 320 + 1
    dft = np.exp(-2j * np.pi * np.outer(np.arange(257), np.arange(400)) / 512)  # zero-padding to 512 points
    mel = lambda hz: 2595 * math.log10(1 + hz / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    edges = [hz(mel(20) + i * (mel(8000) - mel(20)) / 41) for i in range(42)]
    bank = np.zeros((40, 257))
    for m in range(40):
        for k in range(257):
            f = k * 16000 / 512
            if edges[m] <= f <= edges[m + 1]:
                bank[m, k] = (f - edges[m]) / (edges[m + 1] - edges[m])
            elif edges[m + 1] < f <= edges[m + 2]:
                bank[m, k] = (edges[m + 2] - f) / (edges[m + 2] - edges[m + 1])
    cepstra = np.zeros((num_frames, 13))
    for t in range(num_frames):
        power = np.abs(dft @ (y[320 * t : 320 * t + 400] * hamming)) ** 2
        log_mel = np.log(bank @ power + 1e-10)
        for j in range(13):
            scale = math.sqrt((1 if j == 0 else 2) / 40)
            cepstra[t, j] = scale * sum(log_mel[m] * math.cos(math.pi * j * (2 * m + 1) / 80) for m in range(40))

    def delta(c: np.ndarray) -> np.ndarray:
        at = lambda t: c[min(max(t, 0), len(c) - 1)]  # noqa: E731
        return np.array([sum(n * (at(t + n) - at(t - n)) for n in (1, 2)) / 10 for t in range(len(c))])

    d = delta(cepstra)
    return np.concatenate([cepstra, d, delta(d)], axis=1)


def test_mel_corners_run_from_20_hz_to_nyquist_equally_spaced_in_htk_mel() -> None:
    """The corners the VTLP-warped log-mel front end takes (mel_edges_hz's defaults) are the MFCC filterbank's."""
    mel = lambda hz: 2595 * np.log10(1 + hz / 700)  # noqa: E731
    edges = mel_edges_hz()
    assert edges.shape == (42,)
    np.testing.assert_allclose([edges[0], edges[-1]], [20.0, 8000.0])
    np.testing.assert_allclose(np.diff(mel(edges)), (mel(8000.0) - mel(20.0)) / 41)


def test_mfcc_equals_a_hand_computation() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(2400) / 16000
    signal = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(2400) + 0.3  # a DC offset too
    features = mfcc(signal)
    assert features.dtype == np.float32
    assert features.shape == (7, 39)
    np.testing.assert_allclose(features, _hand_mfcc(signal), rtol=1e-5, atol=1e-5)  # (measured: 5e-7)
