"""Collation: crop offsets, padding, frame masks, attention-mask semantics, skipped items."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REFERENCE, requires_shared
from spidr.config import DEFAULT_CONV_LAYERS, MaskingConfig
from spidr.data.collate import Collator
from spidr.data.dataset import Skipped, Utterance
from spidr.models.frames import num_frames


def ramp(index: int, length: int) -> Utterance:
    """Sample s holds the value s, so a crop's first value is its offset."""
    return Utterance(index, f"u{index}", torch.arange(length, dtype=torch.float32))


def collator(**kwargs: object) -> Collator:
    defaults: dict[str, object] = {"max_sample_size": 320_000}
    return Collator(MaskingConfig(), DEFAULT_CONV_LAYERS, **(defaults | kwargs))  # type: ignore[arg-type]


def test_random_crop_covers_every_offset_including_the_last() -> None:
    collate = collator()
    items = [ramp(0, 4003), ramp(1, 4000)]  # target 4000: row 0 may start at 0, 1, 2 or 3
    offsets: Counter[int] = Counter()
    for seed in range(200):
        batch = collate(items, generator=torch.Generator().manual_seed(seed))
        offsets[int(batch.waveforms[0, 0])] += 1
        assert torch.equal(batch.waveforms[1], items[1].waveform)  # the shortest row is never cropped
        assert torch.equal(batch.waveforms[0], torch.arange(4000.0) + batch.waveforms[0, 0])
    assert set(offsets) == {0, 1, 2, 3}  # the reference never picked 3 (spec §14.12)
    assert min(offsets.values()) > 20


def test_crop_from_start_without_rand_crop() -> None:
    batch = collator(rand_crop=False)([ramp(0, 9000), ramp(1, 6000)], generator=torch.Generator().manual_seed(0))
    assert batch.waveforms.shape == (2, 6000)
    assert torch.equal(batch.waveforms[0], torch.arange(6000.0))


def test_crop_mode_batch_fields() -> None:
    batch = collator(max_sample_size=8000)([ramp(0, 12_000), ramp(1, 9000), ramp(2, 16_000)],
                                           generator=torch.Generator().manual_seed(0), epoch=3, position=7)
    frames = (8000 - 400) // 320 + 1
    assert batch.waveforms.shape == (3, 8000)
    assert batch.waveforms.dtype == torch.float32
    assert batch.lengths.tolist() == [8000] * 3
    assert batch.lengths.dtype == torch.int64
    assert batch.padding_mask is None
    assert batch.attention_mask is None
    assert batch.mask.shape == (3, frames)
    assert batch.num_frames == frames
    assert batch.frame_lengths.tolist() == [frames] * 3
    assert batch.ids == ["u0", "u1", "u2"]
    assert (batch.epoch, batch.position) == (3, 7)
    counts = batch.mask.sum(dim=1)
    assert torch.all(counts == counts[0])
    assert counts[0] > 0
    assert batch.mask_count == int(counts.sum())
    assert batch.to("cpu").mask_count == batch.mask_count


def test_padding_mode_masks() -> None:
    lengths = [16_000, 7000, 12_345]
    batch = collator(enable_padding=True)([ramp(i, n) for i, n in enumerate(lengths)],
                                          generator=torch.Generator().manual_seed(0))
    frames = [(n - 400) // 320 + 1 for n in lengths]  # 49, 21, 38
    assert batch.waveforms.shape == (3, 16_000)
    assert batch.lengths.tolist() == lengths
    for row, n in enumerate(lengths):
        assert torch.equal(batch.waveforms[row, :n], torch.arange(float(n)))
        assert not batch.waveforms[row, n:].any()
    assert batch.padding_mask is not None
    assert batch.num_frames == 49
    assert batch.frame_lengths.tolist() == frames
    expected_padding = torch.arange(49)[None, :] >= torch.tensor(frames)[:, None]
    assert torch.equal(batch.padding_mask, expected_padding)
    attention = batch.attention_mask
    assert attention is not None
    assert attention.shape == (3, 1, 49, 49)
    assert attention.dtype == torch.bool
    for row in range(3):
        for query in (0, 20, 48):  # every query row is the key-validity vector
            assert torch.equal(attention[row, 0, query], ~expected_padding[row])
    assert not (batch.mask & batch.padding_mask).any()
    assert batch.mask_count == int(batch.mask.sum())
    counts = batch.mask.sum(dim=1)
    assert torch.all(counts == counts[0])


def test_padding_mode_caps_at_max_sample_size() -> None:
    batch = collator(enable_padding=True, max_sample_size=5000, rand_crop=False)(
        [ramp(0, 9000), ramp(1, 3000)], generator=torch.Generator().manual_seed(0))
    assert batch.waveforms.shape == (2, 5000)
    assert batch.lengths.tolist() == [5000, 3000]


def test_skipped_items_are_dropped_and_reported() -> None:
    items = [ramp(0, 5000), Skipped(1, "/x/bad.wav", "cannot be decoded"), ramp(2, 6000)]
    batch = collator()(items, generator=torch.Generator().manual_seed(0))
    assert batch.ids == ["u0", "u2"]
    assert len(batch) == 2
    assert batch.skipped == [("/x/bad.wav", "cannot be decoded")]
    empty = collator()([Skipped(1, "/x/bad.wav", "why")], generator=torch.Generator())
    assert len(empty) == 0
    assert empty.skipped == [("/x/bad.wav", "why")]


def test_same_generator_same_batch_and_to() -> None:
    items = [ramp(0, 9000), ramp(1, 7000)]
    a = collator()(items, generator=torch.Generator().manual_seed(4))
    b = collator()(items, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.waveforms, b.waveforms)
    assert torch.equal(a.mask, b.mask)
    moved = a.to("cpu")
    assert torch.equal(moved.mask, a.mask)
    assert moved.ids == a.ids


@requires_shared
def test_padded_masks_match_the_reference_collator() -> None:
    """The fixture's padded batch: 32 000 and 24 000 samples → the same padding and attention masks, and (same
    generator seed, same draws) the same span mask."""
    padded = torch.load(REFERENCE / "spidr_small_io.pt", weights_only=True)["padded"]
    items = [Utterance(0, "a", torch.zeros(32_000)), Utterance(1, "b", torch.zeros(24_000))]
    batch = collator(enable_padding=True)(items, generator=torch.Generator().manual_seed(1))
    assert batch.lengths.tolist() == padded["lengths_samples"].tolist()
    assert batch.frame_lengths.tolist() == padded["lengths_frames"].tolist()
    assert torch.equal(batch.padding_mask, padded["padding_mask"])
    assert torch.equal(batch.attention_mask, padded["attention_mask"])
    assert torch.equal(batch.mask, padded["mask"])


@pytest.mark.parametrize("padding", [False, True])
def test_batch_to_moves_every_tensor_and_frame_lengths_follow(padding: bool) -> None:
    """L04, L05, L08. ``Batch.to(device)`` must move lengths and padding mask too (the trainer stacks
    ``b.lengths.sum()`` with ``b.mask.sum()``), and ``frame_lengths`` must live where the mask lives. The "meta"
    device shows a tensor left behind without a GPU."""
    collate = Collator(MaskingConfig(), DEFAULT_CONV_LAYERS, max_sample_size=320_000, enable_padding=padding)
    items = [Utterance(0, "a", torch.randn(8000)), Utterance(1, "b", torch.randn(6000))]
    batch = collate(items, generator=torch.Generator().manual_seed(0)).to("meta")
    assert (batch.padding_mask is not None) == padding
    tensors = [batch.waveforms, batch.lengths, batch.mask, batch.frame_lengths]
    tensors += [batch.padding_mask, batch.attention_mask] if padding else []
    assert [t.device.type for t in tensors] == ["meta"] * len(tensors)


# crop or pad, any sizes and cap: each row is one contiguous slice of its waveform at a valid offset, the
# rest zeros, frame lengths and masks consistent, padding never masked.



@settings(max_examples=80, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(400, 6000), min_size=1, max_size=4), padding=st.booleans(),
       rand_crop=st.booleans(), cap=st.integers(400, 8000), seed=st.integers(0, 2**32 - 1))
def test_every_row_is_a_slice_of_its_waveform(sizes, padding, rand_crop, cap, seed) -> None:
    items = [Utterance(i, f"u{i}", torch.arange(n, dtype=torch.float32) + 1) for i, n in enumerate(sizes)]
    collate = Collator(MaskingConfig(), DEFAULT_CONV_LAYERS, max_sample_size=cap, enable_padding=padding,
                       rand_crop=rand_crop)
    batch = collate(items, generator=torch.Generator().manual_seed(seed))
    target = min(max(sizes) if padding else min(sizes), cap)
    assert batch.waveforms.shape == (len(sizes), target)
    for row, size in enumerate(sizes):
        kept = int(batch.lengths[row])
        assert kept == min(size, target)
        wave = batch.waveforms[row]
        start = int(wave[0]) - 1  # sample s holds s + 1: the first value tells the offset
        assert 0 <= start <= size - kept
        assert rand_crop or start == 0
        assert torch.equal(wave[:kept], torch.arange(start, start + kept, dtype=torch.float32) + 1)
        assert (wave[kept:] == 0).all()
    frames = num_frames(batch.lengths, DEFAULT_CONV_LAYERS)
    assert batch.mask.shape == (len(sizes), num_frames(target, DEFAULT_CONV_LAYERS))
    assert torch.equal(batch.frame_lengths, frames)
    assert (batch.padding_mask is None) == bool((frames == batch.num_frames).all())
    if batch.padding_mask is not None:
        assert not (batch.mask & batch.padding_mask).any()
    assert batch.mask_count == int(batch.mask.sum())
