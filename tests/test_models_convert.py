"""Original fairseq DinoSR checkpoints → our model (spec §9.3).

The test writes fairseq-format checkpoints itself, from a tiny model's state dict, by the inverse of the §9.3
renaming rules (written out independently below), and checks that loading them gives back the same model.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest
import torch

from spidr.config import DEFAULT_CONV_LAYERS, DinoSRConfig
from spidr.models import DinoSR, hf_export, load_model, num_frames
from spidr.models.convert import _parse_conv_layers, convert_fairseq_state_dict, fairseq_model_config, fairseq_step
from spidr.models.keymap import split_qkv
from test_models_dinosr import (
    random_mask,
    waveforms,
)

CONV_STRING = "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2"


def _fairseq_settings(extractor_mode: str) -> dict:
    """fairseq option names (spec §8.4), plus options that do not change the network."""
    return {
        "_name": "dinosr",
        "extractor_mode": extractor_mode,
        "conv_feature_layers": CONV_STRING,
        "conv_bias": False,
        "encoder_embed_dim": 32,
        "encoder_layers": 3,
        "encoder_attention_heads": 2,
        "encoder_ffn_embed_dim": 64,
        "layer_norm_first": False,
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "dropout_input": 0.0,
        "encoder_layerdrop": 0.05,
        "conv_pos": 95,
        "conv_pos_groups": 16,
        "pos_conv_depth": 5,
        "average_top_k_layers": 2,
        "codebook_size": 16,
        "codebook_init_decay": 0.9,
        "ema_decay": 0.999,
        "ema_end_decay": 0.9999,
        "ema_anneal_end_step": 30000,
        "freeze_teacher_step": 200001,
        "mask_prob": 0.8,  # masking options live in the model section in fairseq; they are ignored here
        "mask_length": 10,
        "ema_layers_only": True,
    }


def _layer_key(ours: str) -> list[str]:
    """Our per-layer suffix → fairseq suffix(es); qkv splits into three."""
    if ours.startswith("attention.qkv."):
        kind = ours.rsplit(".", 1)[1]
        return [f"self_attn.{p}_proj.{kind}" for p in "qkv"]
    for a, b in [("attention.proj.", "self_attn.out_proj."), ("layer_norm.", "self_attn_layer_norm."),
                 ("feed_forward.intermediate_dense.", "fc1."), ("feed_forward.output_dense.", "fc2."),
                 ("final_layer_norm.", "final_layer_norm.")]:
        if ours.startswith(a):
            return [b + ours[len(a):]]
    raise AssertionError(ours)


# Our key (after a "student."/"teacher." prefix is removed) → fairseq key, for everything but the layers.
_INVERSE_RULES = [
    (r"mask_embedding", "mask_emb"),
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(\w+)", r"feature_extractor.conv_layers.\1.0.\2"),
    (r"feature_projection\.layer_norm\.(\w+)", r"layer_norm.\1"),
    (r"feature_projection\.projection\.(\w+)", r"post_extract_proj.\1"),
    (r"heads\.(\d+)\.0\.(\w+)", r"heads.\1.\2"),
    (r"codebooks\.(\d+)\.codebook", r"_codebook\1"),
    (r"codebooks\.(\d+)\.counts", r"_codebook_cnts\1"),
    (r"layer_norm\.(\w+)", r"{prefix}layer_norm.\1"),
    (r"pos_conv_embed\.convs\.(\d+)\.(\w+)", r"{prefix}pos_conv.\1.0.\2"),
]


def _fairseq_names(rest: str, prefix: str, *, group_norm: bool) -> list[str]:
    if m := re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(\w+)", rest):
        # layer_norm mode: Sequential(conv, dropout, Sequential(T, LayerNorm, T), GELU); group norm: (…, GroupNorm, …)
        return [f"feature_extractor.conv_layers.{m[1]}.2.{m[2]}" if group_norm
                else f"feature_extractor.conv_layers.{m[1]}.2.1.{m[2]}"]
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", rest):
        return [f"{prefix}layers.{m[1]}.{suffix}" for suffix in _layer_key(m[2])]
    for pattern, template in _INVERSE_RULES:
        if re.fullmatch(pattern, rest):
            return [re.sub(pattern, template.replace("{prefix}", prefix), rest)]
    raise AssertionError(rest)


def to_fairseq(state: dict[str, torch.Tensor], *, group_norm: bool) -> dict:
    """Inverse of spec §9.3: our state dict → fairseq ``model`` dict with an ``_ema`` teacher dict."""
    model: dict = {}
    ema: dict = {}
    for key, value in state.items():
        if key == "current_step":  # fairseq keeps the step in the optimizer state
            continue
        if key.startswith("teacher."):
            target, rest, prefix = ema, key.removeprefix("teacher."), ""
        elif key.startswith("student."):
            target, rest, prefix = model, key.removeprefix("student."), "encoder."
        else:
            target, rest, prefix = model, key, ""
        names = _fairseq_names(rest, prefix, group_norm=group_norm)
        for name, part in zip(names, value.chunk(len(names), dim=0), strict=True):  # qkv → q, k, v
            target[name] = part.clone()
    model["_ema"] = ema
    return model


def tiny_original(extractor_mode: str = "layer_norm") -> DinoSR:
    cfg = DinoSRConfig(
        extractor_mode="group_norm" if extractor_mode == "default" else "layer_norm",
        extractor_conv_layer_config=((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2,
        encoder_embed_dim=32, encoder_num_layers=3, encoder_num_heads=2, encoder_ff_interm_features=64,
        num_codebooks=2, codebook_size=16, encoder_qkv_bias=True, freeze_step=200001, teacher_init="copy",
    )
    torch.manual_seed(0)
    model = DinoSR(cfg)
    with torch.no_grad():  # non-trivial values everywhere, so a swapped or zeroed entry cannot go unnoticed
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for codebook in model.codebooks:
            codebook.counts.uniform_(0.5, 2.0)
    return model.eval()


def write_fairseq(path, model: DinoSR, *, extractor_mode: str = "layer_norm", namespace: bool = False) -> None:
    settings = _fairseq_settings(extractor_mode)
    checkpoint = {
        "model": to_fairseq(model.state_dict(), group_norm=extractor_mode == "default"),
        "last_optimizer_state": {"state": {0: {"step": torch.tensor(1234.0)}}, "param_groups": []},
        "extra_state": {"epoch": 3},
    }
    if namespace:  # argparse-era fairseq: pickled Namespace (needs trust)
        checkpoint["args"] = argparse.Namespace(**settings)
    else:
        checkpoint["cfg"] = {"model": settings, "task": {"_name": "audio_pretraining"}}
    torch.save(checkpoint, path)


@pytest.mark.parametrize("extractor_mode", ["layer_norm", "default"])
def test_fairseq_checkpoint_loads_to_identical_outputs(tmp_path, extractor_mode: str) -> None:
    original = tiny_original(extractor_mode)
    path = tmp_path / "dinosr.ckpt"
    write_fairseq(path, original, extractor_mode=extractor_mode)
    loaded = load_model(path)  # plain dicts only: no trust needed
    assert type(loaded) is DinoSR
    assert loaded.cfg == original.cfg
    assert int(loaded.current_step) == 1234
    expected = original.state_dict()
    for key, value in loaded.state_dict().items():
        if key != "current_step":
            assert torch.equal(value, expected[key]), key
    wave = waveforms(5000, 5000)
    mask = random_mask(2, num_frames(5000))
    with torch.no_grad():
        for a, b in zip(loaded.get_intermediate_outputs(wave), original.get_intermediate_outputs(wave), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(loaded(wave, mask=mask)[0], original(wave, mask=mask)[0])


def test_fairseq_namespace_checkpoint_needs_trust(tmp_path) -> None:
    original = tiny_original()
    path = tmp_path / "old.ckpt"
    write_fairseq(path, original, namespace=True)
    with pytest.raises(ValueError, match="trust=True"):
        load_model(path)
    loaded = load_model(path, trust=True)
    assert loaded.cfg == original.cfg
    assert torch.equal(loaded.state_dict()["student.layers.1.attention.qkv.bias"],
                       original.state_dict()["student.layers.1.attention.qkv.bias"])


def test_unknown_key_is_an_error(tmp_path) -> None:
    original = tiny_original()
    path = tmp_path / "dinosr.ckpt"
    write_fairseq(path, original)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["encoder.layers.0.self_attn.rel_pos_bias.weight"] = torch.zeros(3)
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="rel_pos_bias"):
        load_model(path)
    del checkpoint["model"]["encoder.layers.0.self_attn.rel_pos_bias.weight"]
    del checkpoint["model"]["_ema"]["layers.2.self_attn.v_proj.weight"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="lacks the v projection"):
        load_model(path)


def test_wrong_model_type_is_an_error(tmp_path) -> None:
    path = tmp_path / "dinosr.ckpt"
    write_fairseq(path, tiny_original())
    with pytest.raises(ValueError, match="fairseq DinoSR"):
        load_model(path, model_type="spidr")


def test_conv_feature_layers_are_parsed_without_eval() -> None:
    default = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
    assert tuple(tuple(layer) for layer in _parse_conv_layers(default)) == DEFAULT_CONV_LAYERS
    assert _parse_conv_layers([(1, 2, 3)]) == [[1, 2, 3]]
    hostile = ["__import__('os').system('true')", "[(1, 2, 3)] * (10 ** 10 ** 10)", "[(1, 2, 3)] * 1000000000",
               "open('x')", "[x]", "[(1, 2, 3)].__class__",
               "[(1, 2, 3)] * 1000 * 1000 * 1000",  # each factor allowed alone, a billion-entry list together (hung)
               "([(1, 2, 3)] * 600) + ([(1, 2, 3)] * 600)", "[(1, 2, 3)] * True"]
    for text in hostile:
        with pytest.raises(ValueError, match="conv_feature_layers"):
            _parse_conv_layers(text)


def test_fairseq_settings_map_to_our_config() -> None:
    cfg = fairseq_model_config(_fairseq_settings("default"))
    assert cfg.extractor_mode == "group_norm"
    assert cfg.encoder_qkv_bias
    assert cfg.freeze_step == 200001
    assert cfg.num_codebooks == 2
    assert cfg.encoder_layer_drop == 0.05
    assert fairseq_model_config({}) == DinoSRConfig(encoder_qkv_bias=True, teacher_init="copy")


def test_fairseq_training_options_are_converted_or_named(caplog: pytest.LogCaptureFixture) -> None:
    """feature_grad_mult and ema_layers_only have counterparts; an annealed codebook decay has none and is named
    (it changes only further training: the converted model's features are the original's)."""
    cfg = fairseq_model_config({"feature_grad_mult": 0.1, "ema_layers_only": False})
    assert (cfg.feature_grad_mult, cfg.ema_exclude_layers) == (0.1, ())
    assert fairseq_model_config({"ema_layers_only": True}).ema_exclude_layers == ("pos_conv_embed",)
    with caplog.at_level(logging.WARNING):
        fairseq_model_config({"codebook_init_decay": 0.9, "codebook_end_decay": 0.9})
        assert not caplog.records
        cfg = fairseq_model_config({"codebook_init_decay": 0.9, "codebook_end_decay": 0.99,
                                    "codebook_end_decay_step": 100000})
    assert cfg.codebook_decay == 0.9
    assert "anneals its codebook decay from 0.9 to 0.99 (codebook_end_decay_step = 100000)" in caplog.text
    with pytest.raises(ValueError, match="encoder_num_heads"):
        fairseq_model_config({"encoder_embed_dim": 32, "encoder_attention_heads": 5})
    # fairseq's -1 (never freeze the teacher) and 0 (no decay annealing) were refused by our >= checks
    never = fairseq_model_config({"freeze_teacher_step": -1, "ema_anneal_end_step": 0})
    assert never.freeze_step >= 2**62
    assert never.ema_final_step == 1


def test_a_fairseq_checkpoint_s_refused_settings_name_the_file(tmp_path) -> None:
    path = tmp_path / "dinosr.ckpt"
    write_fairseq(path, tiny_original())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["cfg"]["model"] |= {"encoder_embed_dim": 32, "encoder_attention_heads": 5}
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"dinosr\.ckpt \(an original fairseq DinoSR checkpoint\): "
                                         r".*encoder_num_heads"):
        load_model(path)


def test_fairseq_settings_we_cannot_compute_are_refused(tmp_path) -> None:
    """The FFN activation and the layer type have no counterpart in our config: anything but fairseq's defaults
    (gelu, transformer) is refused by name instead of loading as GELU Transformer layers."""
    assert fairseq_model_config(_fairseq_settings("layer_norm") | {"activation_fn": "gelu",
                                                                   "layer_type": "transformer"}).encoder_qkv_bias
    for name, value in [("activation_fn", "relu"), ("layer_type", "conformer"), ("layer_type", "trf_adp")]:
        with pytest.raises(ValueError, match=rf"sets {name} = '{value}': spidr converts only {name} = "):
            fairseq_model_config(_fairseq_settings("layer_norm") | {name: value})
    path = tmp_path / "dinosr.ckpt"
    write_fairseq(path, tiny_original())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["cfg"]["model"]["activation_fn"] = "relu"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="activation_fn = 'relu'"):
        load_model(path)
    with pytest.raises(ValueError, match="activation_fn = 'relu'"):
        load_model(path, config=tiny_original().cfg)


def test_fairseq_options_with_non_default_values_reach_their_fields():
    # (fairseq option, value, our field, expected) written out by hand from spec §8.4, not from _CONFIG_NAMES.
    table = [
        ("extractor_mode", "default", "extractor_mode", "group_norm"),
        ("conv_bias", True, "extractor_conv_bias", True),
        ("conv_feature_layers", "[(16, 10, 5)] + [(16, 3, 2)] * 2", "extractor_conv_layer_config",
         [[16, 10, 5], [16, 3, 2], [16, 3, 2]]),
        ("encoder_embed_dim", 48, "encoder_embed_dim", 48),
        ("dropout_input", 0.11, "encoder_projection_dropout", 0.11),
        ("conv_pos", 40, "encoder_pos_conv_kernel", 40),
        ("conv_pos_groups", 4, "encoder_pos_conv_groups", 4),
        ("pos_conv_depth", 4, "encoder_pos_conv_depth", 4),
        ("encoder_layers", 5, "encoder_num_layers", 5),
        ("encoder_attention_heads", 3, "encoder_num_heads", 3),
        ("attention_dropout", 0.13, "encoder_attention_dropout", 0.13),
        ("encoder_ffn_embed_dim", 96, "encoder_ff_interm_features", 96),
        ("activation_dropout", 0.17, "encoder_ff_interm_dropout", 0.17),
        ("dropout", 0.19, "encoder_dropout", 0.19),
        ("layer_norm_first", True, "encoder_layer_norm_first", True),
        ("encoder_layerdrop", 0.07, "encoder_layer_drop", 0.07),
        ("codebook_size", 64, "codebook_size", 64),
        ("codebook_init_decay", 0.8, "codebook_decay", 0.8),
        ("average_top_k_layers", 3, "num_codebooks", 3),
        ("ema_decay", 0.99, "ema_start_decay", 0.99),
        ("ema_end_decay", 0.995, "ema_final_decay", 0.995),
        ("ema_anneal_end_step", 1234, "ema_final_step", 1234),
        ("freeze_teacher_step", 4321, "freeze_step", 4321),
        ("feature_grad_mult", 0.3, "feature_grad_mult", 0.3),
    ]
    defaults = DinoSRConfig()
    for _, _, field, expected in table:  # the test means something only if every value differs from the default
        default = getattr(defaults, field)
        assert (list(map(list, default)) if field == "extractor_conv_layer_config" else default) != expected, field
    cfg = fairseq_model_config({name: value for name, value, _, _ in table})
    for name, _, field, expected in table:
        got = getattr(cfg, field)
        got = [list(layer) for layer in got] if field == "extractor_conv_layer_config" else got
        assert got == expected, (name, field, got)
    # The older spelling of layer drop
    assert fairseq_model_config({"encoderlayerdrop": 0.07}).encoder_layer_drop == 0.07


@pytest.mark.parametrize("key", ["encoder.layers.0.attention.q_proj.weight_orig",
                                 "encoder.layers.0.attention.q_proj.weight_mask",
                                 "encoder.layer_norm.bias_extra"])
def test_a_key_that_only_starts_like_a_known_one_has_no_counterpart(key: str) -> None:
    """K01. A key is renamed only when it matches a template as a whole: a pruned tensor's weight_orig must not be
    read as the weight (both would land on the same key of ours, one overwriting the other)."""
    with pytest.raises(ValueError, match="has no counterpart"):
        hf_export.KEYS.to_ours(key)


def test_split_qkv_returns_copies() -> None:
    """K02. The docstring: contiguous copies. Editing the fused tensor afterwards leaves the split ones alone."""
    fused = torch.arange(12.0).reshape(6, 2)
    split = split_qkv({"student.layers.0.attention.qkv.weight": fused})
    before = {k: v.clone() for k, v in split.items()}
    fused.zero_()
    assert all(torch.equal(split[k], before[k]) for k in before)
    assert torch.equal(before["student.layers.0.attention.k.weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))


def test_a_fairseq_key_that_only_starts_like_a_rule_is_refused_by_its_name() -> None:
    """V01. Spec §9.3: any unmapped key raises, naming the fairseq key (weight-norm parameters of the positional
    convolution, a layout ours does not have)."""
    model = to_fairseq(tiny_original().state_dict(), group_norm=False)
    model["encoder.pos_conv.0.0.weight_g"] = torch.ones(1, 1, 1)
    with pytest.raises(ValueError, match=r"'encoder\.pos_conv\.0\.0\.weight_g' has no conversion rule"):
        convert_fairseq_state_dict(model)


@pytest.mark.parametrize("optimizer_state", [None, {}, {"state": {}}, {"state": None}])
def test_a_fairseq_checkpoint_without_optimizer_steps_is_at_step_0(optimizer_state) -> None:
    """V02. Spec §9.3: current_step is the optimizer's step if present, else 0."""
    assert fairseq_step({"last_optimizer_state": optimizer_state}) == 0
    assert fairseq_step({"last_optimizer_state": {"state": {0: {"step": torch.tensor(7.0)}}}}) == 7


def test_fairseq_options_set_to_none_keep_our_defaults() -> None:
    """V03. A hydra config may hold None for an option: it is treated as absent."""
    assert fairseq_model_config({"dropout": None, "conv_pos_groups": None, "encoder_layers": None}) == \
        DinoSRConfig(encoder_qkv_bias=True, teacher_init="copy")


def test_a_fairseq_checkpoint_without_its_teacher_says_so(tmp_path: Path) -> None:
    """V04. A fairseq checkpoint whose ``_ema`` dict was stripped is still recognised as fairseq by its
    ``encoder.layers.`` keys, and refused for the missing teacher."""
    path = tmp_path / "dinosr.ckpt"
    write_fairseq(path, tiny_original())
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model"]["_ema"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"no '_ema' \(teacher\) entry"):
        load_model(path)


def test_a_negative_fairseq_ema_anneal_end_step_means_no_annealing() -> None:
    """V06. fairseq uses the final EMA decay once num_updates >= ema_anneal_end_step: any value below 1 means the
    final decay from the first step, ours ema_final_step = 1."""
    assert fairseq_model_config({"ema_anneal_end_step": -1}).ema_final_step == 1
    assert fairseq_model_config({"ema_anneal_end_step": 0}).ema_final_step == 1
