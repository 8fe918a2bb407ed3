"""Utterances → ``Batch``: crop to the shortest (or pad to the longest), frame padding mask, span mask (spec §6.5).

All randomness (crop offsets, then the span mask) comes from the generator passed in, which the loader seeds per
batch, so a batch is reproducible whatever the worker count and after a resume. A random crop offset is uniform over
*all* valid offsets [0, len − target] (the reference never picks the last one, spec §14.12).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from spidr.config import ConvLayer, MaskingConfig
from spidr.data.dataset import Skipped, Utterance
from spidr.data.masking import span_mask
from spidr.models.frames import attention_mask_from_padding, num_frames


@dataclass
class Batch:
    """One training batch (B utterances, S samples, T frames)."""

    waveforms: torch.Tensor  # (B, S) float32
    lengths: torch.Tensor  # (B,) int64 valid samples per row
    padding_mask: torch.Tensor | None  # (B, T) bool, True = padded frame; None when no row is padded
    mask: torch.Tensor  # (B, T) bool, True = frame replaced by the mask embedding
    ids: list[str]
    epoch: int = 0
    position: int = 0  # index of this batch in its epoch (this rank's order)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (location, reason) of unusable utterances
    # True frames in ``mask``, counted on the host where the mask is made: the model can then gather the masked
    # frames without reading their count back from the GPU. None when unknown.
    mask_count: int | None = None
    # A padding repeat of another rank's batch (the sampler gives every rank as many batches): validation runs it,
    # to keep the ranks' collectives in step, but leaves it out of its means.
    repeat: bool = False

    def __len__(self) -> int:
        return self.waveforms.shape[0]

    @property
    def num_frames(self) -> int:
        """T, the frame count of the batch."""
        return self.mask.shape[1]

    @property
    def frame_lengths(self) -> torch.Tensor:
        """(B,) int64 valid frames per row."""
        if self.padding_mask is None:
            return torch.full((len(self),), self.num_frames, dtype=torch.long, device=self.mask.device)
        return (~self.padding_mask).sum(dim=1)

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """The official (B, 1, T, T) bool view, True where the key frame is valid; None when nothing is padded."""
        return None if self.padding_mask is None else attention_mask_from_padding(self.padding_mask)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return replace(self, waveforms=fn(self.waveforms), lengths=fn(self.lengths), mask=fn(self.mask),
                       padding_mask=None if self.padding_mask is None else fn(self.padding_mask))

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return self._map(torch.Tensor.pin_memory)


def _empty_batch(skipped: list[tuple[str, str]], epoch: int, position: int) -> Batch:
    return Batch(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), None, torch.zeros(0, 0, dtype=torch.bool), [],
                 epoch, position, skipped)


class Collator:
    """Callable turning dataset items (``Utterance`` or ``Skipped``) into a ``Batch``.

    ``enable_padding`` False: every row is cropped to the shortest row (at most ``max_sample_size`` samples), at a
    random offset if ``rand_crop`` else from the start. True: rows are zero-padded to the longest row (rows longer
    than ``max_sample_size`` are cropped to it).
    """

    def __init__(
        self,
        masking: MaskingConfig,
        conv_layers: Sequence[ConvLayer],
        *,
        max_sample_size: int,
        enable_padding: bool = False,
        rand_crop: bool = True,
    ) -> None:
        self.masking = masking
        self.conv_layers = tuple(conv_layers)
        self.max_sample_size = max_sample_size
        self.enable_padding = enable_padding
        self.rand_crop = rand_crop

    def _offset(self, length: int, target: int, generator: torch.Generator) -> int:
        if not self.rand_crop or length <= target:
            return 0
        return int(torch.randint(0, length - target + 1, (1,), generator=generator))

    def __call__(
        self,
        items: Sequence[Utterance | Skipped],
        *,
        generator: torch.Generator,
        epoch: int = 0,
        position: int = 0,
    ) -> Batch:
        skipped = [(item.location, item.reason) for item in items if isinstance(item, Skipped)]
        good = [item for item in items if isinstance(item, Utterance)]
        if not good:
            return _empty_batch(skipped, epoch, position)
        sizes = [item.waveform.shape[0] for item in good]
        target = min(max(sizes) if self.enable_padding else min(sizes), self.max_sample_size)

        waveforms = torch.zeros(len(good), target, dtype=torch.float32)
        lengths = torch.empty(len(good), dtype=torch.long)
        for row, (item, size) in enumerate(zip(good, sizes, strict=True)):
            offset = self._offset(size, target, generator)
            piece = item.waveform[offset : offset + target]
            waveforms[row, : piece.shape[0]] = piece
            lengths[row] = piece.shape[0]

        frames = num_frames(target, self.conv_layers)
        frame_lengths = num_frames(lengths, self.conv_layers)
        padding = torch.arange(frames)[None, :] >= frame_lengths[:, None]
        # The mask is always sampled with a padding mask (all False if nothing is padded), as the reference does.
        mask = span_mask(self.masking, padding, generator=generator)
        return Batch(
            waveforms=waveforms,
            lengths=lengths,
            padding_mask=padding if bool(padding.any()) else None,
            mask=mask,
            ids=[item.fileid for item in good],
            epoch=epoch,
            position=position,
            skipped=skipped,
            mask_count=int(mask.sum()),
        )
