"""Teacher EMA decay schedules (spec §4.6)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REFERENCE, requires_shared
from spidr.config import DinoSRConfig, SpidRConfig
from spidr.models import DinoSR, SpidR
from spidr.models.schedules import dinosr_ema_decay, spidr_ema_decay

SPIDR = {"start_decay": 0.999, "timescale": 20000, "threshold": 1e-7}
DINOSR = {"start_decay": 0.999, "final_decay": 0.9999, "final_step": 30000, "freeze_step": 200000}


@pytest.mark.parametrize(
    ("step", "spidr", "dinosr"),
    [
        (0, 0.999, 0.999),
        (10_000, 0.9993935, 0.9993),
        (20_000, 0.9996321, 0.9996),
        (50_000, 0.9999179, 0.9999),
        (100_000, 0.9999933, 0.9999),
        (184_206, 0.9999999, 0.9999),
        (184_207, 1.0, 0.9999),
        (199_999, 1.0, 0.9999),
        (200_000, 1.0, 1.0),
    ],
)
def test_spec_values(step: int, spidr: float, dinosr: float) -> None:
    assert spidr_ema_decay(step, **SPIDR) == pytest.approx(spidr, abs=5e-8)
    assert dinosr_ema_decay(step, **DINOSR) == pytest.approx(dinosr, abs=1e-12)


def test_spidr_freezes_exactly_at_the_threshold_step() -> None:
    # 1 − decay ≤ 1e-7 first at t = ceil(20 000 · ln 1e4) = 184 207
    assert spidr_ema_decay(184_206, **SPIDR) < 1.0
    assert spidr_ema_decay(184_207, **SPIDR) == 1.0


def test_dinosr_is_linear_during_warmup() -> None:
    # halfway through the 30k steps: halfway between 0.999 and 0.9999
    assert dinosr_ema_decay(15_000, **DINOSR) == pytest.approx(0.99945, abs=1e-12)


def test_models_use_their_schedule_and_config() -> None:
    with torch.device("meta"):  # no memory, no init cost
        spidr = SpidR(SpidRConfig(ema_timescale=1000, ema_start_decay=0.99))
        dinosr = DinoSR(DinoSRConfig(ema_final_step=100, freeze_step=500))
    assert spidr.ema_decay(1000) == pytest.approx(1 - 0.01 * math.exp(-1), abs=1e-15)
    assert dinosr.ema_decay(50) == pytest.approx((0.999 + 0.9999) / 2, abs=1e-12)
    assert dinosr.ema_decay(499) == 0.9999
    assert dinosr.ema_decay(500) == 1.0


@requires_shared
def test_reference_values() -> None:
    facts = json.loads((REFERENCE / "reference_facts.json").read_text())["ema_decay"]
    for step, spidr, dinosr in zip(facts["steps"], facts["spidr_exponential"], facts["dinosr_linear"], strict=True):
        assert spidr_ema_decay(step, **SPIDR) == pytest.approx(spidr, abs=1e-15)
        assert dinosr_ema_decay(step, **DINOSR) == pytest.approx(dinosr, abs=1e-15)
    first = facts["spidr_first_step_returning_1"]
    assert spidr_ema_decay(first, **SPIDR) == 1.0
    assert spidr_ema_decay(first - 1, **SPIDR) < 1.0
