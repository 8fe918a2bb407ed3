"""SpidR (spec §4.3): only what differs from DinoSR.

Student layer k predicts the codeword of teacher layer k, for the top K layers, from its before-residual output
(DinoSR: every head reads the final output); the teacher EMA decay follows an exponential schedule with a freeze
threshold; and layer drop is 0 by default (``SpidRConfig``).
"""

from __future__ import annotations

import torch

from spidr.config import SpidRConfig
from spidr.models.components import FrameMasks
from spidr.models.dinosr import DinoSR
from spidr.models.schedules import spidr_ema_decay


class SpidR(DinoSR):
    """SpidR; ``cfg`` defaults to ``SpidRConfig()``. Same modules, state dict and API as ``DinoSR``."""

    cfg: SpidRConfig

    def __init__(self, cfg: SpidRConfig | None = None) -> None:
        cfg = SpidRConfig() if cfg is None else cfg
        if not isinstance(cfg, SpidRConfig):
            raise ValueError(f"SpidR needs a SpidRConfig (it has the EMA timescale); got {type(cfg).__name__}")
        super().__init__(cfg)

    def _student_outputs(self, x: torch.Tensor, masks: FrameMasks) -> list[torch.Tensor]:
        """Head i reads student layer L − K + i's FFN output (before residual): K × (B, T, D)."""
        outputs = self.student.get_intermediate_outputs(x, masks=masks, before_residual=True)
        return outputs[-self.num_codebooks :]

    def _head_inputs(self, layer_outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """``_student_outputs`` out of one pass's ``layer_outputs``: the top K layers' FFN outputs."""
        return [ffn for _, ffn in layer_outputs[-self.num_codebooks :]]

    def ema_decay(self, step: int) -> float:
        cfg = self.cfg
        return spidr_ema_decay(
            step, start_decay=cfg.ema_start_decay, timescale=cfg.ema_timescale, threshold=cfg.ema_threshold
        )
