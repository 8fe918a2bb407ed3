"""spidr against Hugging Face ``transformers``' own ``Data2VecAudioModel``: bit-identical outputs, round trips.

Needs the ``hf`` extra (``pip install -e ".[hf]"``); skipped without it. Everything runs offline from local
directories (no hub access).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from spidr.config import DinoSRConfig, SpidRConfig
from spidr.data.audio import standardize
from spidr.models import Student, build_model, export_hf, load_model, padding_mask_from_lengths
from spidr.models.hf_features import before_residual_features
from test_models_dinosr import CONV, waveforms
from test_models_hf_export import perturbed

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only: never reach a hub
transformers = pytest.importorskip("transformers")

TINY = {"extractor_conv_layer_config": CONV, "encoder_embed_dim": 32, "encoder_num_layers": 3, "encoder_num_heads": 2,
        "encoder_ff_interm_features": 64, "num_codebooks": 2, "codebook_size": 16}
CONFIGS = {
    "pos-depth-5-kernel-19": ("spidr", {}),
    "pos-depth-1-kernel-7": ("spidr", {"encoder_pos_conv_depth": 1, "encoder_pos_conv_kernel": 7}),
    "pos-depth-2-even-kernel-8-qkv-and-conv-bias": (
        "spidr", {"encoder_pos_conv_depth": 2, "encoder_pos_conv_kernel": 16, "encoder_qkv_bias": True,
                  "extractor_conv_bias": True}),
    "pos-depth-4-head-dim-12-3-convs": (
        "spidr", {"extractor_conv_layer_config": ((16, 10, 5), (24, 8, 4), (48, 4, 2)), "encoder_embed_dim": 48,
                  "encoder_num_heads": 4, "encoder_ff_interm_features": 96, "encoder_pos_conv_depth": 4,
                  "encoder_pos_conv_kernel": 20, "encoder_pos_conv_groups": 8}),
    "dinosr-pos-depth-3-even-kernel-4": ("dinosr", {"encoder_pos_conv_depth": 3, "encoder_pos_conv_kernel": 12}),
}


def _spidr_model(model_type: str, overrides: dict, seed: int = 0):
    cls = SpidRConfig if model_type == "spidr" else DinoSRConfig
    torch.manual_seed(seed)
    return perturbed(build_model(cls(**(TINY | overrides))))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def _differences(model, hf_model, wave: torch.Tensor, **hf_inputs) -> dict[str, float]:
    """Max abs difference of every output Data2VecAudioModel gives against spidr's computation of the same thing."""
    with before_residual_features(hf_model) as before:
        out = hf_model(wave, output_hidden_states=True, **hf_inputs)
    feats = model.features(wave)
    hidden = [model.student.layer_norm(feats + model.student.pos_conv_embed(feats)),  # input of layer 1
              *model.get_intermediate_outputs(wave, before_residual=False)]
    diffs = {"extract_features": _max_abs(out.extract_features,
                                          model.feature_projection.layer_norm(model.feature_extractor(wave))),
             "last_hidden_state": _max_abs(out.last_hidden_state, hidden[-1])}
    assert len(out.hidden_states) == len(hidden)
    diffs |= {f"hidden_states[{i}]": _max_abs(a, b) for i, (a, b) in enumerate(zip(out.hidden_states, hidden,
                                                                                       strict=True))}
    diffs |= {f"before_residual[{i}]": _max_abs(a, b)
              for i, (a, b) in enumerate(zip(before, model.get_intermediate_outputs(wave), strict=True), start=1)}
    return diffs


def _hf(directory):
    model = transformers.AutoModel.from_pretrained(directory)
    assert type(model).__name__ == "Data2VecAudioModel"
    return model.eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_small_configs_are_bit_identical(tmp_path, name: str) -> None:
    model = _spidr_model(*CONFIGS[name])
    export_hf(model, tmp_path)
    hf_model = _hf(tmp_path)
    wave = waveforms(6000, 6000, seed=3)
    diffs = _differences(model, hf_model, wave)
    assert max(diffs.values()) == 0.0, diffs
    # the feature extractor's attention mask (all ones for an equal-length batch) changes nothing
    ones = _differences(model, hf_model, wave, attention_mask=torch.ones(wave.shape, dtype=torch.long))
    assert max(ones.values()) == 0.0, ones


def test_base_config_is_bit_identical(tmp_path) -> None:
    torch.manual_seed(0)
    model = perturbed(Student(SpidRConfig()))  # the released architecture, without the training-only parts
    export_hf(model, tmp_path)
    hf_model = _hf(tmp_path)
    zero_qkv_biases = 12 * 3 * 768
    ours = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in hf_model.parameters()) == ours + zero_qkv_biases
    diffs = _differences(model, hf_model, waveforms(16000, seed=4))
    assert max(diffs.values()) == 0.0, diffs


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path) -> None:
    """spidr → export → AutoModel.from_pretrained → save_pretrained → spidr, and a model born in transformers
    (no spidr entry in its config) → spidr → export → the same weights, bit for bit."""
    model = _spidr_model(*CONFIGS["pos-depth-2-even-kernel-8-qkv-and-conv-bias"])
    export_hf(model, tmp_path / "export")
    _hf(tmp_path / "export").save_pretrained(tmp_path / "saved")
    loaded = load_model(tmp_path / "saved")
    assert loaded.cfg == model.cfg  # transformers kept the "spidr" entry
    assert max(_differences(loaded, _hf(tmp_path / "saved"), waveforms(5000, seed=5)).values()) == 0.0

    config = transformers.Data2VecAudioConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, conv_dim=[16, 48],
        conv_kernel=[10, 8], conv_stride=[5, 4], num_conv_pos_embeddings=3, conv_pos_kernel_size=6,
        num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    born = perturbed(transformers.Data2VecAudioModel(config))
    born.save_pretrained(tmp_path / "born")
    student = load_model(tmp_path / "born")
    assert (student.cfg.encoder_pos_conv_depth, student.cfg.encoder_pos_conv_kernel) == (3, 18)
    assert max(_differences(student, born, waveforms(4000, 4000, seed=6)).values()) == 0.0
    export_hf(student, tmp_path / "back")
    saved, back = load_file(str(tmp_path / "born" / "model.safetensors")), load_file(
        str(tmp_path / "back" / "model.safetensors"))
    assert set(saved) == set(back)
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    original, again = born.config.to_dict(), _hf(tmp_path / "back").config.to_dict()
    fields = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
              "conv_kernel", "conv_stride", "conv_bias", "num_conv_pos_embeddings", "conv_pos_kernel_size",
              "num_conv_pos_embedding_groups", "hidden_dropout", "attention_dropout", "activation_dropout",
              "feat_proj_dropout", "layerdrop", "layer_norm_eps", "hidden_act", "feat_extract_activation"]
    assert {f: original[f] for f in fields} == {f: again[f] for f in fields}


def test_task_models_and_the_feature_extractor(tmp_path) -> None:
    model = _spidr_model(*CONFIGS["pos-depth-5-kernel-19"])
    export_hf(model, tmp_path / "export")
    ctc = transformers.Data2VecAudioForCTC.from_pretrained(tmp_path / "export").eval()  # a new, random lm_head
    wave = waveforms(5000, seed=7)
    with torch.no_grad(), before_residual_features(ctc) as features:
        ctc(wave)
    for a, b in zip(features, model.get_intermediate_outputs(wave), strict=True):
        assert torch.equal(a, b)
    ctc.save_pretrained(tmp_path / "ctc")  # keys data2vec_audio.* plus lm_head.*
    for a, b in zip(load_model(tmp_path / "ctc").get_intermediate_outputs(wave), model.get_intermediate_outputs(wave),
                    strict=True):
        assert torch.equal(a, b)

    extractor = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "export")
    assert type(extractor).__name__ == "Wav2Vec2FeatureExtractor"
    assert (extractor.do_normalize, extractor.sampling_rate) == (True, 16000)
    raw = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * 0.05
    inputs = extractor(raw.numpy(), sampling_rate=16000, return_tensors="pt")
    # standardised with eps 1e-7 where spidr uses 1e-5: close to, not equal to, spidr's input
    torch.testing.assert_close(inputs.input_values[0], standardize(raw), atol=0.02, rtol=0.01)


@torch.no_grad()
def test_padding_is_the_one_difference(tmp_path) -> None:
    """Data2VecAudio zeroes padded frames once before the positional convs, spidr before each of them: the longest
    utterance of a padded batch agrees, a shorter one does not (spidr's equals that utterance run alone)."""
    model = _spidr_model(*CONFIGS["pos-depth-5-kernel-19"])
    export_hf(model, tmp_path)
    hf_model = _hf(tmp_path)
    lengths = [8000, 5000]
    wave = waveforms(*lengths, seed=8)
    attention_mask = (torch.arange(8000)[None, :] < torch.tensor(lengths)[:, None]).long()
    hf_out = hf_model(wave, attention_mask=attention_mask, output_hidden_states=True).hidden_states[1:]
    padding_mask = padding_mask_from_lengths(torch.tensor(lengths))
    ours = model.get_intermediate_outputs(wave, padding_mask=padding_mask, before_residual=False)
    short = int((~padding_mask[1]).sum())
    for a, b in zip(hf_out, ours, strict=True):
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    assert _max_abs(hf_out[-1][1, :short], ours[-1][1, :short]) > 1e-2
    alone = model.get_intermediate_outputs(wave[1:, :5000], before_residual=False)[-1]
    torch.testing.assert_close(ours[-1][1:, :short], alone, atol=1e-5, rtol=0)
