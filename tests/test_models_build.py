"""Model construction: base parameter counts (spec §3.11) and the official state-dict layout (spec §9.1)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REFERENCE, requires_shared
from spidr.config import DinoSRConfig, SpidRConfig
from spidr.models import DinoSR, SpidR, build_model


def _counts(model: torch.nn.Module) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {
        "trainable_non_teacher": sum(p.numel() for k, p in params.items() if not k.startswith("teacher")),
        "teacher": sum(p.numel() for k, p in params.items() if k.startswith("teacher")),
        "all": sum(p.numel() for p in params.values()),
        "buffers": sum(b.numel() for b in model.buffers()),
        "extractor": sum(p.numel() for p in model.feature_extractor.parameters()),
        "projection": sum(p.numel() for p in model.feature_projection.parameters()),
        "pos_conv": sum(p.numel() for p in model.student.pos_conv_embed.parameters()),
        "heads": sum(p.numel() for p in model.heads.parameters()),
    }


@pytest.mark.parametrize("cfg", [SpidRConfig(), DinoSRConfig()])
def test_base_parameter_counts(cfg) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(cfg)
    assert type(model) is (SpidR if cfg.model_type == "spidr" else DinoSR)
    assert _counts(model) == {
        "trainable_non_teacher": 94_711_552,
        "teacher": 88_534_272,
        "all": 183_245_824,
        "buffers": 1_574_913,  # 8 × (256 × 768 + 256) codebook values + the step counter
        "extractor": 4_206_592,
        "projection": 395_008,
        "pos_conv": 3_505_920,
        "heads": 1_574_912,
    }
    assert len(model.state_dict()) == 347


def test_qkv_bias_adds_12_x_2304_per_transformer() -> None:
    with torch.device("meta"):
        model = build_model(DinoSRConfig(encoder_qkv_bias=True))
    counts = _counts(model)
    assert counts["teacher"] == 88_534_272 + 12 * 2304
    assert counts["trainable_non_teacher"] == 94_711_552 + 12 * 2304
    assert len(model.state_dict()) == 371


@requires_shared
@pytest.mark.parametrize(
    ("entry", "cfg"),
    [
        ("spidr", SpidRConfig()),
        ("dinosr", DinoSRConfig()),
        ("dinosr_original_qkv_bias", DinoSRConfig(encoder_qkv_bias=True)),
    ],
)
def test_base_state_dict_layout(entry: str, cfg) -> None:
    expected = json.loads((REFERENCE / "state_dict_keys_base.json").read_text())[entry]
    with torch.device("meta"):
        model = build_model(cfg)
    state = model.state_dict()
    parameters = dict(model.named_parameters())
    assert list(state) == list(expected)
    for key, info in expected.items():
        assert list(state[key].shape) == info["shape"], key
        assert str(state[key].dtype) == f"torch.{info['dtype']}", key
        assert (key in parameters) == (info["kind"] == "parameter"), key


@requires_shared
def test_reference_parameter_counts() -> None:
    facts = json.loads((REFERENCE / "reference_facts.json").read_text())["param_counts"]
    bench_small = SpidRConfig(
        extractor_conv_layer_config=((256, 10, 5),) + ((256, 3, 2),) * 4 + ((256, 2, 2),) * 2,
        encoder_embed_dim=256, encoder_num_layers=6, encoder_num_heads=4, encoder_ff_interm_features=1024,
        num_codebooks=4,
    )
    for name, cfg in [("spidr_base", SpidRConfig()), ("dinosr_base", DinoSRConfig()),
                      ("spidr_bench_small", bench_small)]:
        with torch.device("meta"):
            counts = _counts(build_model(cfg))
        expected = facts[name]
        assert counts["all"] == expected["all_parameters"], name
        assert counts["trainable_non_teacher"] == expected["trainable_non_teacher"], name
        assert counts["teacher"] == expected["teacher"], name
        assert counts["buffers"] == expected["buffers"], name


def test_random_init_model_is_the_seeded_build_in_eval_mode():
    from spidr.models.build import random_init_model
    from train_fixtures import EXTRACTION_MODEL

    cfg = SpidRConfig(**EXTRACTION_MODEL)
    torch.manual_seed(3)
    expected = build_model(cfg).state_dict()
    model = random_init_model(cfg, seed=3)
    assert not model.training
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
    other = random_init_model(cfg, seed=4).state_dict()
    assert not all(torch.equal(value, other[key]) for key, value in model.state_dict().items())
