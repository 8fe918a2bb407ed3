"""Frame math of the conv front end (spec §3.2)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REFERENCE, requires_shared
from spidr.config import DEFAULT_CONV_LAYERS, SpidRConfig
from spidr.models import attention_mask_from_padding, num_frames, padding_mask_from_lengths
from spidr.models.components import ConvFeatureExtractor
from spidr.models.frames import frame_rate_hz, front_end_input


@pytest.mark.parametrize(
    ("samples", "frames"),
    [(0, 0), (1, 0), (399, 0), (400, 1), (719, 1), (720, 2), (16000, 49), (32000, 99), (320000, 999)],
)
def test_spec_examples(samples: int, frames: int) -> None:
    # Closed form T = floor((S − 400) / 320) + 1 for S ≥ 400, else 0.
    assert num_frames(samples) == frames
    assert num_frames(torch.tensor([samples])).tolist() == [frames]


def test_closed_form_and_tensor_agree_with_the_int_version() -> None:
    samples = torch.arange(0, 40000, 7)
    expected = [max((s - 400) // 320 + 1, 0) for s in samples.tolist()]
    assert num_frames(samples).tolist() == expected
    assert [num_frames(s) for s in samples.tolist()] == expected


@requires_shared
def test_reference_frame_counts() -> None:
    facts = json.loads((REFERENCE / "reference_facts.json").read_text())["frame_counts"]
    for samples, frames in zip(facts["input_samples"], facts["frames_conv_length_default_config"], strict=True):
        assert num_frames(samples, DEFAULT_CONV_LAYERS) == frames


@settings(max_examples=25, deadline=None)
@given(
    layers=st.lists(st.tuples(st.just(2), st.integers(1, 6), st.integers(1, 4)), min_size=1, max_size=4),
    samples=st.integers(0, 300),
)
def test_matches_a_real_extractor_for_any_conv_config(layers: list[tuple[int, int, int]], samples: int) -> None:
    extractor = ConvFeatureExtractor(layers)
    expected = num_frames(samples, layers)
    if expected == 0:
        return  # a zero-length conv output is an error in PyTorch; the model rejects it explicitly
    assert extractor(torch.randn(1, samples)).shape[1] == expected


def test_padding_and_attention_masks() -> None:
    lengths = torch.tensor([16000, 8000, 400])
    padding = padding_mask_from_lengths(lengths)
    assert padding.shape == (3, 49)
    assert (~padding).sum(1).tolist() == [49, 24, 1]
    assert not padding[1, :24].any()
    assert padding[1, 24:].all()
    assert padding_mask_from_lengths(lengths, frames=60).shape == (3, 60)
    attention = attention_mask_from_padding(padding)
    assert attention.shape == (3, 1, 49, 49)
    assert attention.dtype == torch.bool
    # every query row says which keys are valid
    assert torch.equal(attention[:, 0, 5, :], ~padding)
    assert torch.equal(attention[:, 0, 0, :], attention[:, 0, 48, :])


def test_hop_length_is_the_product_of_strides():
    from spidr.models.frames import hop_length

    assert hop_length() == 320
    assert hop_length([(32, 10, 5), (32, 8, 4), (32, 8, 8)]) == 160


def test_padding_mask_counts_frames_with_the_given_conv_layers() -> None:
    """A 10 ms hop (one [C, 400, 160] layer): T = floor((S − 400) / 160) + 1, hand-computed, including both sides
    of a stride boundary (559 → 1 frame, 560 → 2). The default layers would give 49 / 24 / 1 / 1 / 1."""
    layers = ((8, 400, 160),)
    lengths = torch.tensor([16000, 8000, 560, 559, 400])
    padding = padding_mask_from_lengths(lengths, layers)
    assert padding.shape == (5, 98)
    assert (~padding).sum(1).tolist() == [98, 48, 2, 1, 1]
    assert not padding[2, :2].any()
    assert padding[2, 2:].all()


def test_a_frame_rate_that_is_not_a_whole_number_of_hz_is_refused() -> None:
    assert frame_rate_hz() == 50
    assert frame_rate_hz(((8, 400, 160),)) == 100
    with pytest.raises(ValueError, match=r"frame rate 16000/15 Hz is not an integer"):
        frame_rate_hz(((8, 10, 5), (8, 3, 3)))  # hop 15 → 1066.67 Hz


def _log_mel_config(window: int, hop: int) -> SpidRConfig:
    return SpidRConfig(extractor_type="log_mel", extractor_conv_layer_config=((40, window, hop),))


def test_front_end_input_checks_the_length_against_the_model_s_own_front_end() -> None:
    """A [40, 256, 128] log-mel front end makes a frame from 256 samples: 300 are accepted (the default front end
    would need 400), 255 are refused."""
    cfg = _log_mel_config(256, 128)
    assert front_end_input(torch.randn(1, 300), cfg, dtype=torch.float32).shape == (1, 300)
    with pytest.raises(ValueError, match="waveforms of 255 samples are shorter than one frame"):
        front_end_input(torch.randn(1, 255), cfg, dtype=torch.float32)


def test_too_short_message_names_this_front_end_s_minimum() -> None:
    cfg = SpidRConfig(extractor_type="log_mel", extractor_conv_layer_config=((40, 256, 128), (32, 3, 2)))
    with pytest.raises(ValueError, match=r"500 samples.*\b512\b"):  # (3 − 1)·128 + 256 = 512
        front_end_input(torch.randn(1, 500), cfg, dtype=torch.float32)
