"""In-process validation on the named ``[validation]`` manifests, every ``save_interval`` steps.

The model runs in eval mode (no dropout, no codebook update) on fixed crops and masks
(``deterministic_crops=True``), so numbers compare across steps. Every rank scores its shard of batches; the
results are averaged over all batches of all ranks: loss, target/prediction perplexities, and per codebook loss,
perplexities and active codewords. In eval mode the model computes each batch's metrics on that batch alone (in
training they are global over ranks), so one checkpoint validates to the same numbers on any number of ranks. A
batch repeated only to give every rank as many batches runs but does not count. The global RNG states are saved and
restored around validation so that a run with validation replays exactly like one without.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from spidr.distributed import AgreedValueError, all_reduce_sum
from spidr.train.checkpoint import capture_rng_state, restore_rng_state
from spidr.train.precision import Precision

logger = logging.getLogger(__name__)

SCALARS = ("loss", "target_ppl", "pred_ppl")
PER_CODEBOOK = ("loss_per_codebook", "target_ppl_per_codebook", "pred_ppl_per_codebook", "active_codewords")


@torch.no_grad()
def validate(
    model: nn.Module, batches: Iterable[Any], *, device: torch.device, precision: Precision
) -> dict[str, float | list[float]]:
    """Mean over batches (of all ranks) of each batch's metrics; ``model`` is the unwrapped model.

    ``batches`` yields ``spidr.data.collate.Batch`` objects, or None for a batch emptied by unreadable files, which
    is skipped: the eval forward holds no collective, so a rank may run fewer forwards than another, and the mean is
    the one process would give over the same batches (one all-reduce at the end).
    """
    was_training = model.training
    rng = capture_rng_state()
    model.eval()
    totals: torch.Tensor | None = None
    try:
        for batch in batches:
            if batch is None:
                continue
            batch = batch.to(device)
            with precision.autocast():
                losses, metrics = model(batch.waveforms, mask=batch.mask, padding_mask=batch.padding_mask,
                                        mask_count=batch.mask_count)
            row = torch.cat([
                torch.stack([losses.float().mean(), metrics["target_ppl"].float().reshape(()),
                             metrics["pred_ppl"].float().reshape(()), torch.ones((), device=losses.device)]),
                *(metrics[name].float().reshape(-1) for name in PER_CODEBOOK),
            ]).double()
            # Not counted: a batch repeated here (its rows are another rank's batch, counted there), and one with no
            # masked frame (no loss to average: with masking.min_masks = 0 a short batch can draw none). Chosen on
            # the device, as NaN × 0 would still be NaN.
            counted = (metrics["num_frames"].to(row.device) > 0) & (not batch.repeat)
            row = torch.where(counted, row, torch.zeros_like(row))
            totals = row if totals is None else totals + row
    finally:
        model.train(was_training)
        restore_rng_state(rng)
    if totals is None:  # this rank had no batch; still join the collective with zeros
        totals = torch.zeros(4 + len(PER_CODEBOOK) * model.num_codebooks, dtype=torch.float64, device=device)
    all_reduce_sum(totals)
    count = totals[3].item()
    if count == 0:
        raise AgreedValueError("the validation set yielded no batch (are all its files unreadable or too short?)")
    means = (totals / count).tolist()
    out: dict[str, float | list[float]] = dict(zip(SCALARS, means[:3], strict=True))
    out["num_batches"] = count
    num_codebooks = (len(means) - 4) // len(PER_CODEBOOK)
    for i, name in enumerate(PER_CODEBOOK):
        out[name] = means[4 + i * num_codebooks : 4 + (i + 1) * num_codebooks]
    return out
