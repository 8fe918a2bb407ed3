"""Frame math of the conv front end: samples → frames, sample lengths → padding and attention masks.

Every conv layer maps a length L to floor((L − kernel) / stride) + 1, clamped at 0 (spec §3.2). With the default
seven layers that is T = floor((S − 400) / 320) + 1 for S ≥ 400 samples, else 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import torch

from spidr.config import DEFAULT_CONV_LAYERS, ConvLayer
from spidr.data import SAMPLE_RATE


@overload
def num_frames(num_samples: int, conv_layers: Sequence[ConvLayer] = ...) -> int: ...
@overload
def num_frames(num_samples: torch.Tensor, conv_layers: Sequence[ConvLayer] = ...) -> torch.Tensor: ...


def num_frames(
    num_samples: int | torch.Tensor, conv_layers: Sequence[ConvLayer] = DEFAULT_CONV_LAYERS
) -> int | torch.Tensor:
    """Number of frames the conv extractor makes from ``num_samples`` samples (an int, or an integer tensor of any
    shape, e.g. per-utterance lengths (B,)); ``conv_layers`` holds (channels, kernel, stride) per layer."""
    if isinstance(num_samples, torch.Tensor):
        length = num_samples
        for _, kernel, stride in conv_layers:
            length = (torch.div(length - kernel, stride, rounding_mode="floor") + 1).clamp(min=0)
        return length
    length = int(num_samples)
    for _, kernel, stride in conv_layers:
        length = max((length - kernel) // stride + 1, 0)
    return length


def hop_length(conv_layers: Sequence[ConvLayer] = DEFAULT_CONV_LAYERS) -> int:
    """Samples between consecutive frames: the product of the strides (320 = 20 ms with the default config)."""
    return math.prod(stride for _, _, stride in conv_layers)


def frame_rate_hz(conv_layers: Sequence[ConvLayer] = DEFAULT_CONV_LAYERS) -> int:
    """Frames per second at 16 kHz (50 with the default config); a rate that is not a whole number of Hz, which
    frame-level evaluation (ABX items, alignments) cannot place, is an error."""
    hop = hop_length(conv_layers)
    if SAMPLE_RATE % hop:
        raise ValueError(f"the model's frame rate {SAMPLE_RATE}/{hop} Hz is not an integer; frame-level evaluation "
                         "needs one")
    return SAMPLE_RATE // hop


def padding_mask_from_lengths(
    num_samples: torch.Tensor, conv_layers: Sequence[ConvLayer] = DEFAULT_CONV_LAYERS, *, frames: int | None = None
) -> torch.Tensor:
    """Frame padding mask (B, T) bool, True on padded frames, for utterances of ``num_samples`` (B,) valid samples.

    ``frames`` is T, the frame count of the padded batch; by default the frame count of the longest utterance.
    """
    lengths = num_frames(num_samples.long(), conv_layers)
    total = int(lengths.max()) if frames is None else frames
    return torch.arange(total, device=lengths.device)[None, :] >= lengths[:, None]


def attention_mask_from_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """The official dense attention mask (B, 1, T, T) bool, True where the *key* frame is valid (an expanded view,
    every query row equal), from a (B, T) padding mask (True = padded)."""
    batch, frames = padding_mask.shape
    return (~padding_mask)[:, None, None, :].expand(batch, 1, frames, frames)
