"""Span masking of student input frames: fairseq ``compute_mask_indices`` semantics (spec §5), seeded explicitly.

Every random draw goes through the ``torch.Generator`` passed in, in every path (the official no-overlap path used
numpy's global RNG instead, spec §14.13), so a mask is a pure function of its inputs and the generator state. The
overlap path draws in the same order as the reference code, so with the same seed it returns the same mask, except
for ``mask_selection = "poisson"``: its spans are fairseq's Poisson(mask_length), not the reference's
Poisson(U[0, 1) · mask_length) (spec §14.14; spidr before 2026-12-06 drew the reference's).

Valid frames are assumed to form a prefix of each row (padding at the end), as the collator produces them.
"""

from __future__ import annotations

import torch

from spidr.config import MaskingConfig


def _num_spans(frames: int, mask_prob: float, mask_length: int, min_masks: int, generator: torch.Generator) -> int:
    """Probabilistic rounding of mask_prob · frames / mask_length, at least ``min_masks``."""
    draw = torch.rand((), generator=generator).item()
    return max(min_masks, int(mask_prob * frames / mask_length + draw))


def _span_lengths(
    num_spans: int, frames: int, *, selection: str, mask_length: int, mask_other: float, generator: torch.Generator
) -> list[int]:
    match selection:
        case "static":
            lengths = [mask_length] * num_spans
        case "uniform":
            lengths = torch.randint(int(mask_other), 2 * mask_length + 1, (num_spans,), generator=generator).tolist()
        case "normal":
            draws = torch.normal(float(mask_length), float(mask_other), (num_spans,), generator=generator)
            lengths = draws.round().clamp(min=1).long().tolist()
        case "poisson":
            # fairseq's Poisson(mask_length). The reference draws Poisson(U[0, 1) · mask_length) (spec §14.14), which
            # halves the mean span and gives one span in ten no frame at all.
            rates = torch.full((num_spans,), float(mask_length))
            lengths = torch.poisson(rates, generator=generator).long().tolist()
        case _:
            raise ValueError(f"masking.mask_selection = {selection!r} is invalid: expected static, uniform, normal "
                             "or poisson")
    if num_spans > 0 and sum(lengths) == 0:
        lengths[0] = min(mask_length, frames - 1)
    return lengths


def _place_with_overlap(frames: int, lengths: list[int], generator: torch.Generator) -> torch.Tensor:
    """Distinct uniform start positions; spans may overlap. Returns sorted unique masked indices < frames."""
    num_spans = len(lengths)
    if num_spans == 0:
        return torch.empty(0, dtype=torch.long)
    shortest = min(lengths)
    if frames - shortest <= num_spans:
        shortest = frames - num_spans - 1
    starts = torch.randperm(frames - shortest, generator=generator)[:num_spans]
    indices = torch.cat([start + torch.arange(length) for start, length in zip(starts.tolist(), lengths, strict=True)])
    return torch.unique(indices[indices < frames])


def _place_without_overlap(
    frames: int, lengths: list[int], min_space: int, generator: torch.Generator
) -> torch.Tensor:
    """Place spans longest first, each inside a free interval chosen with probability ∝ its size, keeping at least
    ``min_space`` free frames between spans. A span that fits nowhere is dropped."""
    if not lengths:
        return torch.empty(0, dtype=torch.long)
    smallest = min(lengths)
    free = [(0, frames)]  # half-open [start, end) intervals where a span may still go
    chosen: list[torch.Tensor] = []
    for length in sorted(lengths, reverse=True):
        sizes = torch.tensor([float(end - start) if end - start >= length else 0.0 for start, end in free])
        if sizes.sum() == 0:
            continue
        start, end = free.pop(int(torch.multinomial(sizes, 1, generator=generator)))
        offset = int(torch.randint(start, end - length + 1, (1,), generator=generator))
        chosen.append(torch.arange(offset, offset + length))
        pieces = ((start, offset - min_space), (offset + length + min_space, end))
        free.extend(piece for piece in pieces if piece[1] - piece[0] >= smallest)
    if not chosen:
        return torch.empty(0, dtype=torch.long)
    return torch.unique(torch.cat(chosen))


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask: torch.Tensor | None,
    *,
    mask_prob: float,
    mask_length: int,
    generator: torch.Generator,
    mask_selection: str = "static",
    mask_other: float = 0.0,
    min_masks: int = 0,
    no_overlap: bool = False,
    min_space: int = 0,
    require_same_masks: bool = True,
) -> torch.Tensor:
    """Sample a span mask (B, T) bool, True = masked.

    For each row with ``sz`` valid frames (T − padding; with ``padding_mask=None`` one span count is shared by all
    rows), draw n = max(min_masks, int(mask_prob · sz / mask_length + U[0, 1))) spans, their lengths by
    ``mask_selection``, and their positions (overlapping or not). With ``require_same_masks`` every row is then
    trimmed, by a uniformly random subset, to the smallest masked count in the batch.
    """
    batch, total = shape
    # The batch-wide count is always drawn first, as the reference does, so both paths consume the same stream.
    shared_spans = _num_spans(total, mask_prob, mask_length, min_masks, generator)
    rows: list[torch.Tensor] = []
    for i in range(batch):
        if padding_mask is None:
            frames, num_spans = total, shared_spans
        else:
            frames = total - int(padding_mask[i].sum())
            num_spans = _num_spans(frames, mask_prob, mask_length, min_masks, generator)
        lengths = _span_lengths(num_spans, frames, selection=mask_selection, mask_length=mask_length,
                                mask_other=mask_other, generator=generator)
        if no_overlap:
            rows.append(_place_without_overlap(frames, lengths, min_space, generator))
        else:
            rows.append(_place_with_overlap(frames, lengths, generator))

    mask = torch.zeros(batch, total, dtype=torch.bool)
    if batch == 0:
        return mask
    fewest = min(len(row) for row in rows)
    for i, row in enumerate(rows):
        if require_same_masks and len(row) > fewest:
            row = row[torch.randperm(len(row), generator=generator)[:fewest]]
        mask[i, row] = True
    return mask


def span_mask(cfg: MaskingConfig, padding_mask: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """The training mask (B, T) bool for a (B, T) padding mask (True = padded frame), with ``cfg``'s settings."""
    return compute_mask_indices(
        tuple(padding_mask.shape),
        padding_mask,
        mask_prob=cfg.mask_prob,
        mask_length=cfg.mask_length,
        generator=generator,
        mask_selection=cfg.mask_selection,
        mask_other=cfg.mask_other,
        min_masks=cfg.min_masks,
        no_overlap=cfg.no_mask_overlap,
        min_space=cfg.mask_min_space,
    )


def span_mask_from_lengths(
    cfg: MaskingConfig, frame_lengths: torch.Tensor, num_frames: int, *, generator: torch.Generator
) -> torch.Tensor:
    """``span_mask`` for rows of ``frame_lengths`` (B,) valid frames out of ``num_frames``."""
    padding_mask = torch.arange(num_frames)[None, :] >= frame_lengths.cpu()[:, None]
    return span_mask(cfg, padding_mask, generator=generator)
