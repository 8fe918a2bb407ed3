"""Frame math of the conv front end: samples → frames, sample lengths → padding and attention masks.

Every conv layer maps a length L to floor((L − kernel) / stride) + 1, clamped at 0 (spec §3.2). With the default
seven layers that is T = floor((S − 400) / 320) + 1 for S ≥ 400 samples, else 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import overload

import torch

from spidr.config import DEFAULT_CONV_LAYERS, ConvLayer, ModelConfig, num_samples_for_frames
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


def front_end_input(
    waveforms: torch.Tensor, cfg: ModelConfig, *, dtype: torch.dtype, check_finite: bool = False
) -> torch.Tensor:
    """Waveforms (B, S) checked for ``cfg``'s front end and cast to the model's ``dtype`` (soundfile and numpy read
    float64 by default; a conv of float32 weights refuses it with a message about scalar types).

    ``check_finite``: NaN or Inf samples are an error (they would make every feature of the utterance NaN). It reads
    the device, so inference asks for it and the training step does not (a NaN loss is skipped there); skipped in
    a compiled graph, which it would split."""
    if not isinstance(waveforms, torch.Tensor):
        raise TypeError(f"waveforms must be a torch.Tensor of shape (B, S), got a {type(waveforms).__name__} "
                        "(torch.from_numpy converts an array; spidr.data.audio.load_audio reads a file)")
    if waveforms.ndim != 2 or not waveforms.is_floating_point():
        raise ValueError(f"waveforms must be a float tensor of shape (B, S); got {waveforms.dtype} "
                         f"{tuple(waveforms.shape)}")
    if num_frames(waveforms.shape[1], cfg.extractor_conv_layer_config) == 0:
        raise ValueError(f"waveforms of {waveforms.shape[1]} samples are shorter than one frame of the model's "
                         f"front end ({num_samples_for_frames(1, cfg.extractor_conv_layer_config)} samples)")
    if check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(waveforms).all()):
        bad = (~torch.isfinite(waveforms)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"waveforms hold NaN or Inf samples (batch rows {bad}): their features would be NaN")
    return waveforms.to(dtype)


def warn_if_padding_changes_features(
    cfg: ModelConfig, attention_mask: torch.Tensor | None, padding_mask: torch.Tensor | None
) -> None:
    """A warning when an inference call is given a batch with padding (its ``padding_mask`` (B, T) or official
    ``attention_mask`` (B, 1, T, T) says so) for a front end that pools over the padding
    (``ModelConfig.padding_changes_features``): the mask keeps the Transformer off the padding, not the GroupNorm."""
    if not cfg.padding_changes_features:
        return
    padded = (padding_mask is not None and bool(padding_mask.any())) or (
        attention_mask is not None and not bool(attention_mask.all()))
    if padded:
        warnings.warn(
            "model.extractor_mode = 'group_norm' normalises its first conv over the padded time axis: in a padded "
            "batch an utterance's features differ from its features alone (run equal-length batches unpadded, as "
            "spidr.eval.features.extract_batch does)", stacklevel=3,
        )
