"""Parity with the official implementation: fixture-small SpidR and DinoSR, every recorded output (spec §3–§4).

The fixtures (../shared/fixtures/reference, see its README) hold the official initial state, inputs and outputs.
The same float32 computation should agree to ~1e-5 (we reach bit-equality on most of them).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import REFERENCE, requires_shared
from spidr.config import model_config_from_dict
from spidr.models import DinoSR, SpidR
from spidr.models.components import SelfAttention, Transformer

pytestmark = requires_shared

ATOL = 1e-5
PPL_ATOL = 1e-4
MODELS = {"spidr": SpidR, "dinosr": DinoSR}


def _config(name: str):
    return model_config_from_dict(json.loads((REFERENCE / f"{name}_small_config.json").read_text()), name)


def _reference_model(name: str) -> DinoSR:
    model = MODELS[name](_config(name))
    model.load_state_dict(torch.load(REFERENCE / f"{name}_small_state.pt", weights_only=True), strict=True)
    return model.eval()


@pytest.fixture(scope="module", params=["spidr", "dinosr"])
def case(request: pytest.FixtureRequest):
    io = torch.load(REFERENCE / f"{request.param}_small_io.pt", weights_only=True)
    return request.param, io


def _close(actual, expected, atol: float = ATOL) -> None:
    if isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            if e is None:
                assert a is None
            else:
                _close(a, e, atol)
        return
    assert actual.shape == expected.reshape(actual.shape).shape
    torch.testing.assert_close(actual.float(), expected.reshape(actual.shape).float(), atol=atol, rtol=0)


def _forward_close(out: tuple[torch.Tensor, dict], expected: dict) -> None:
    losses, metrics = out
    assert losses.shape == expected["losses"].shape
    _close(losses, expected["losses"])
    # The official SpidR returns perplexities of shape (), DinoSR (1,); ours are always ().
    _close(metrics["target_ppl"], expected["target_ppl"], PPL_ATOL)
    _close(metrics["pred_ppl"], expected["pred_ppl"], PPL_ATOL)


@pytest.mark.parametrize("name", ["spidr", "dinosr"])
def test_seeded_construction_draws_the_official_initial_weights(name: str) -> None:
    torch.manual_seed(0)
    state = MODELS[name](_config(name)).state_dict()
    expected = torch.load(REFERENCE / f"{name}_small_state.pt", weights_only=True)
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("name", ["spidr", "dinosr"])
def test_state_dict_layout_matches_the_small_key_file(name: str) -> None:
    expected = json.loads((REFERENCE / "state_dict_keys_small.json").read_text())[name]
    model = MODELS[name](_config(name))
    parameters = dict(model.named_parameters())
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, info in expected.items():
        assert list(state[key].shape) == info["shape"], key
        assert str(state[key].dtype) == f"torch.{info['dtype']}", key
        assert (key in parameters) == (info["kind"] == "parameter"), key


@torch.no_grad()
def test_eval_outputs(case) -> None:
    name, io = case
    model = _reference_model(name)
    waveforms = io["waveforms"]
    _close(model.feature_extractor(waveforms), io["feature_extractor_out"])
    feats = model.features(waveforms)
    _close(feats, io["feature_projection_out"])
    _close(model.get_intermediate_outputs(waveforms), io["intermediate_model_api"])
    feats = io["feature_projection_out"]
    _close(model.student.get_intermediate_outputs(feats, before_residual=True), io["intermediate_before_residual"])
    _close(model.student.get_intermediate_outputs(feats, before_residual=False), io["intermediate_after_residual"])
    _close(model.student(feats), io["student_final"])
    _close(model.teacher.get_intermediate_outputs(feats), io["teacher_intermediate_before_residual"])
    _forward_close(model(waveforms, mask=io["mask"]), io["eval_forward_masked"])
    _forward_close(model(waveforms), io["eval_forward_nomask"])


@torch.no_grad()
def test_get_codebooks(case) -> None:
    name, io = case
    model = _reference_model(name)
    waveforms = io["waveforms"]
    _close(model.get_codebooks(waveforms), io["get_codebooks"])
    onehot = model.get_codebooks(waveforms, onehot=True)
    for actual, expected in zip(onehot, io["get_codebooks_onehot_argmax"], strict=True):
        if expected is None:
            assert actual is None
            continue
        assert str(actual.dtype) == io["get_codebooks_onehot_dtype"]
        assert torch.equal(actual.sum(-1), torch.ones_like(expected))
        assert torch.equal(actual.argmax(-1), expected)
    # Unlike the official output (squeezed to (T, V) for one utterance), ours keeps the batch dim.
    single = model.get_codebooks(waveforms[:1])
    for actual, shape in zip(single, io["get_codebooks_batch1_shapes"], strict=True):
        assert (actual is None) == (shape is None)
        if shape is not None:
            assert list(actual.shape) == [1, *shape]


@torch.no_grad()
@pytest.mark.parametrize("form", ["attention_mask", "padding_mask"])
def test_padded_batch(case, form: str) -> None:
    name, io = case
    model = _reference_model(name)
    padded = io["padded"]
    padding = {form: padded[form]}
    _close(model.get_intermediate_outputs(padded["waveforms"], **padding), padded["intermediate_model_api"])
    _forward_close(model(padded["waveforms"], mask=padded["mask"], **padding), padded["eval_forward_masked"])


def _deterministic_training_model(name: str) -> DinoSR:
    """Training mode with every dropout and layer drop at 0, as the fixture's ``train_step_no_dropout``."""
    model = _reference_model(name).train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, SelfAttention):
            module.dropout = 0.0
        elif isinstance(module, Transformer):
            module.layer_drop = 0.0
    return model


def test_training_step(case) -> None:
    """forward (codebook update) → backward → clip → AdamW → update_ema(1), against the official step."""
    name, io = case
    expected = io["train_step_no_dropout"]
    model = _deterministic_training_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    losses, metrics = model(io["waveforms"], mask=io["mask"])
    _forward_close((losses, metrics), expected)
    _close([c.codebook for c in model.codebooks], expected["codebooks_after_forward"])
    _close([c.counts for c in model.codebooks], expected["counts_after_forward"])

    loss = losses.sum() / losses.numel()
    _close(loss, expected["loss_scalar"])
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected["grad_norms"])
    for key, norm in expected["grad_norms"].items():
        assert grads[key].norm().item() == pytest.approx(norm, abs=ATOL), key
    assert [k for k, p in model.named_parameters() if p.grad is None] == expected["params_without_grad"]
    total = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 10.0)
    assert total.item() == pytest.approx(expected["total_grad_norm_before_clip"], abs=ATOL)

    trainable = [(k, p) for k, p in model.named_parameters() if not k.startswith("teacher")]
    feature_encoder = ("feature_extractor", "feature_projection")
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for k, p in trainable if not k.startswith(feature_encoder)]},
            {"params": [p for k, p in trainable if k.startswith(feature_encoder)]},
        ],
        lr=expected["lr_used"],
        betas=(0.9, 0.95),
        eps=1e-6,
        weight_decay=0.01,
        fused=False,
    )
    optimizer.step()
    assert model.update_ema(1) == pytest.approx(expected["ema_decay_step1"], abs=1e-12)
    assert int(model.current_step) == 1

    after = model.state_dict()
    norms = {k: (after[k].double() - before[k].double()).norm().item() for k in after if after[k].is_floating_point()}
    assert set(norms) == set(expected["update_norms"])
    for key, norm in expected["update_norms"].items():
        assert norms[key] == pytest.approx(norm, abs=ATOL), key
    for key, value in expected["selected_tensors_after_step"].items():
        _close(after[key], value)
