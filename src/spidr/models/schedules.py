"""Teacher EMA decay as pure functions of the 1-based step (spec §4.6). A decay of exactly 1 freezes the teacher."""

from __future__ import annotations

import math


def dinosr_ema_decay(
    step: int, *, start_decay: float, final_decay: float, final_step: int, freeze_step: int
) -> float:
    """DinoSR: linear from ``start_decay`` to ``final_decay`` over ``final_step`` steps, then constant, then 1 from
    ``freeze_step`` on. Defaults 0.999 → 0.9999 over 30 000 steps, frozen at 200 000."""
    if step >= freeze_step:
        return 1.0
    if step >= final_step:
        return final_decay
    return final_decay - (final_decay - start_decay) * (1 - step / final_step)


def spidr_ema_decay(step: int, *, start_decay: float, timescale: float, threshold: float) -> float:
    """SpidR: 1 − (1 − ``start_decay``)·exp(−step / ``timescale``), and exactly 1 once 1 − decay ≤ ``threshold``
    (defaults 0.999, 20 000, 1e-7: frozen from step 184 207)."""
    decay = 1 - (1 - start_decay) * math.exp(-step / timescale)
    return 1.0 if 1 - decay <= threshold else decay
