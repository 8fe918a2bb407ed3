"""What SpidR changes relative to DinoSR: which student output each head reads (spec §4.2–§4.3)."""

from __future__ import annotations

import pytest
import torch

from spidr.config import SpidRConfig
from spidr.models import num_frames
from test_models_dinosr import (
    random_mask,
    tiny_model,
    waveforms,
)


@torch.no_grad()
def test_spidr_head_i_reads_student_layer_l_minus_k_plus_i_before_residual() -> None:
    model = tiny_model("spidr").eval()  # 3 layers, 2 codebooks: heads on layers 2 and 3
    wave = waveforms(4000, 3000)
    layers = model.get_intermediate_outputs(wave)
    codebooks = model.get_codebooks(wave)
    assert codebooks[0] is None
    for i, layer in enumerate((1, 2)):
        torch.testing.assert_close(codebooks[layer], model.heads[i](layers[layer]).exp(), atol=0, rtol=0)


@torch.no_grad()
def test_dinosr_heads_all_read_the_final_output() -> None:
    model = tiny_model("dinosr").eval()
    wave = waveforms(4000, 3000)
    final = model.student(model.features(wave))
    codebooks = model.get_codebooks(wave)
    for i, layer in enumerate((1, 2)):
        torch.testing.assert_close(codebooks[layer], model.heads[i](final).exp(), atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["spidr", "dinosr"])
def test_unused_parameters(model_type: str) -> None:
    """SpidR's loss never reaches the last layer's final LayerNorm (it reads before-residual outputs)."""
    model = tiny_model(model_type, encoder_layer_drop=0.0).train()  # no layer randomly skipped
    losses, _ = model(waveforms(4000, 4000), mask=random_mask(2, num_frames(4000)))
    losses.mean().backward()
    without = {k for k, p in model.named_parameters() if p.grad is None and not k.startswith("teacher")}
    assert without == ({"student.layers.2.final_layer_norm.weight", "student.layers.2.final_layer_norm.bias"}
                       if model_type == "spidr" else set())


def test_spidr_defaults() -> None:
    cfg = SpidRConfig()
    assert cfg.encoder_layer_drop == 0.0
    with torch.device("meta"):
        model = tiny_model("spidr")
    assert model.student.layer_drop == 0.0
    assert model.ema_decay(184_207) == 1.0
