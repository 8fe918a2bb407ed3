"""MFCC baseline: frame grid, known-signal properties and deltas computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from spidr.eval.mfcc import deltas, mel_filterbank, mfcc


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
