"""Export to s3prl's ``data2vec_custom`` upstream: the checkpoint's layout against what that upstream loads.

s3prl does not install cleanly next to torch 2.13 (it imports torchaudio, whose newest build does not load with
it), so the always-run tests check the file against the upstream's expectations, written out here from s3prl's
data2vec loader: a ``torch.save`` dict with ``task_cfg``, ``model_cfg`` and ``model_weight``; ``model_weight`` has an
``_ema`` entry (deleted by the loader) and otherwise exactly the fairseq ``Data2VecAudioModel`` keys after
``remove_pretraining_modules()`` (strict load). Where s3prl imports, the last test runs its upstream on the file.
"""

from __future__ import annotations

import errno

import pytest
import torch
import torch.nn.functional as F

from conftest import run_python_on_a_full_disk
from spidr.models import export_s3prl, read_checkpoint
from spidr.models.convert import _parse_conv_layers, fairseq_model_config
from spidr.models.hf_features import before_residual_features
from test_models_dinosr import tiny_model, waveforms
from test_models_hf_export import perturbed


def expected_s3prl_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """fairseq data2vec-audio weights (s3prl's copy) and shapes for a spidr config; q/k/v always have a bias."""
    dim, ff = cfg.encoder_embed_dim, cfg.encoder_ff_interm_features
    shapes: dict[str, tuple[int, ...]] = {"mask_emb": (dim,)}
    channels_in = 1
    for i, (channels, kernel, _) in enumerate(cfg.extractor_conv_layer_config):
        # Sequential(conv, dropout, norm, GELU): layer_norm mode norm = Sequential(T, LayerNorm, T) on every layer,
        # "default" mode norm = GroupNorm on the first layer only
        shapes[f"feature_extractor.conv_layers.{i}.0.weight"] = (channels, channels_in, kernel)
        if cfg.extractor_conv_bias:
            shapes[f"feature_extractor.conv_layers.{i}.0.bias"] = (channels,)
        if cfg.extractor_mode == "layer_norm":
            shapes[f"feature_extractor.conv_layers.{i}.2.1.weight"] = (channels,)
            shapes[f"feature_extractor.conv_layers.{i}.2.1.bias"] = (channels,)
        elif i == 0:
            shapes[f"feature_extractor.conv_layers.{i}.2.weight"] = (channels,)
            shapes[f"feature_extractor.conv_layers.{i}.2.bias"] = (channels,)
        channels_in = channels
    shapes |= {"layer_norm.weight": (channels_in,), "layer_norm.bias": (channels_in,),
               "post_extract_proj.weight": (dim, channels_in), "post_extract_proj.bias": (dim,),
               "encoder.layer_norm.weight": (dim,), "encoder.layer_norm.bias": (dim,)}
    kernel = max(3, cfg.encoder_pos_conv_kernel // cfg.encoder_pos_conv_depth)
    for i in range(cfg.encoder_pos_conv_depth):
        shapes[f"encoder.pos_conv.{i}.0.weight"] = (dim, dim // cfg.encoder_pos_conv_groups, kernel)
        shapes[f"encoder.pos_conv.{i}.0.bias"] = (dim,)
    for i in range(cfg.encoder_num_layers):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (dim, dim)
            shapes[f"{layer}self_attn.{proj}.bias"] = (dim,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{layer}{norm}.weight"] = (dim,)
            shapes[f"{layer}{norm}.bias"] = (dim,)
        shapes |= {f"{layer}fc1.weight": (ff, dim), f"{layer}fc1.bias": (ff,),
                   f"{layer}fc2.weight": (dim, ff), f"{layer}fc2.bias": (dim,)}
    return shapes


CASES = {
    "base-like": {},
    "group-norm-conv-bias": {"extractor_mode": "group_norm", "extractor_conv_bias": True},
    "pre-norm-qkv-bias": {"encoder_layer_norm_first": True, "encoder_qkv_bias": True},
    "pos-depth-2-even-kernel": {"encoder_pos_conv_depth": 2, "encoder_pos_conv_kernel": 16},
}


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_has_what_the_upstream_loads(tmp_path, name: str) -> None:
    model = perturbed(tiny_model("spidr", **CASES[name]))
    path = export_s3prl(model, tmp_path / "spidr.pt")
    checkpoint = torch.load(path, weights_only=True)  # plain tensors, strings and numbers
    # what s3prl reads, and spidr's own entry (s3prl reads its three keys by name and ignores the rest)
    assert set(checkpoint) == {"task_cfg", "model_cfg", "model_weight", "spidr"}
    assert {k: v for k, v in checkpoint["spidr"].items() if k != "config"} == {"model_type": "spidr",
                                                                              "step": int(model.current_step)}
    assert checkpoint["task_cfg"]["normalize"] is True
    assert checkpoint["task_cfg"]["sample_rate"] == 16000

    weights = dict(checkpoint["model_weight"])
    assert weights.pop("_ema") == {}
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected_s3prl_shapes(model.cfg)
    state = model.state_dict()
    for layer in range(model.cfg.encoder_num_layers):
        ours, theirs = f"student.layers.{layer}.attention.", f"encoder.layers.{layer}.self_attn."
        assert torch.equal(torch.cat([weights[f"{theirs}{p}_proj.weight"] for p in "qkv"]), state[f"{ours}qkv.weight"])
        biases = torch.cat([weights[f"{theirs}{p}_proj.bias"] for p in "qkv"])
        if model.cfg.encoder_qkv_bias:
            assert torch.equal(biases, state[f"{ours}qkv.bias"])
        else:
            assert not biases.any()
    assert torch.equal(weights["mask_emb"], state["mask_embedding"])
    assert torch.equal(weights["layer_norm.weight"], state["feature_projection.layer_norm.weight"])

    options = checkpoint["model_cfg"]
    assert options["required_seq_len_multiple"] == 1  # fairseq would pad to even lengths, changing the kernels
    assert options["extractor_mode"] == ("layer_norm" if model.cfg.extractor_mode == "layer_norm" else "default")
    conv_layers = tuple(map(tuple, _parse_conv_layers(options["conv_feature_layers"])))
    assert conv_layers == model.cfg.extractor_conv_layer_config
    # our reader of fairseq options gives back the student's architecture
    back = fairseq_model_config(options)
    for field in ("extractor_mode", "extractor_conv_bias", "extractor_conv_layer_config", "encoder_embed_dim",
                  "encoder_num_layers", "encoder_num_heads", "encoder_ff_interm_features", "encoder_pos_conv_kernel",
                  "encoder_pos_conv_groups", "encoder_pos_conv_depth", "encoder_layer_norm_first", "encoder_dropout",
                  "encoder_attention_dropout", "encoder_ff_interm_dropout", "encoder_layer_drop"):
        assert getattr(back, field) == getattr(model.cfg, field), field


def test_single_positional_conv_is_refused(tmp_path) -> None:
    model = tiny_model("spidr", encoder_pos_conv_depth=1, encoder_pos_conv_kernel=7)
    with pytest.raises(ValueError, match=r"model\.encoder_pos_conv_depth = 1"):
        export_s3prl(model, tmp_path / "spidr.pt")
    assert not (tmp_path / "spidr.pt").exists()


def test_log_mel_front_end_is_refused(tmp_path) -> None:
    model = tiny_model("spidr", extractor_type="log_mel", extractor_conv_layer_config=((40, 400, 320),))
    with pytest.raises(ValueError, match=r"model\.extractor_type = 'log_mel'"):
        export_s3prl(model, tmp_path / "spidr.pt")
    assert not (tmp_path / "spidr.pt").exists()


def _upstream_expert():
    try:
        from s3prl.upstream.data2vec.expert import UpstreamExpert
    except (ImportError, OSError) as error:  # s3prl imports torchaudio, which has no build for every torch
        pytest.skip(f"s3prl's data2vec upstream does not import here: {error}")
    return UpstreamExpert


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_s3prl_upstream_gives_the_same_features(tmp_path, name: str) -> None:
    upstream_expert = _upstream_expert()
    model = perturbed(tiny_model("spidr", **CASES[name]))
    upstream = upstream_expert(str(export_s3prl(model, tmp_path / "spidr.pt"))).eval()
    wave = waveforms(6000, 6000, seed=3)
    with before_residual_features(upstream) as before:
        hidden = upstream(list(wave))["hidden_states"]  # each layer's input, then the encoder output
    wave = torch.stack([F.layer_norm(w, w.shape) for w in wave])  # the upstream standardises (again) first
    feats = model.features(wave)
    x = feats + model.student.pos_conv_embed(feats)
    after = model.get_intermediate_outputs(wave, before_residual=False)
    if model.cfg.encoder_layer_norm_first:
        expected = [x, *after[:-1], model.student(feats)]
    else:
        expected = [model.student.layer_norm(x), *after]
    assert len(hidden) == len(expected)
    for a, b in zip(hidden, expected, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(before, model.get_intermediate_outputs(wave), strict=True):
        assert torch.equal(a, b)


def test_an_interrupted_export_leaves_the_earlier_file_whole(tmp_path, monkeypatch) -> None:
    """An --overwrite cut short (disk full, a file-size limit) left a truncated checkpoint in place of the old one."""
    path = tmp_path / "s3prl.pt"
    export_s3prl(tiny_model("spidr"), path)
    before = path.read_bytes()
    real_save = torch.save

    def cut_short(obj, target):  # (target: the open temporary file)
        real_save(obj, target)
        target.truncate(1000)
        raise RuntimeError("[enforce fail at inline_container.cc] file write failed")

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(RuntimeError, match="file write failed"):
        export_s3prl(tiny_model("spidr", encoder_num_layers=2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s3prl.pt"]
    assert torch.load(path, weights_only=True)["model_cfg"]["encoder_layers"] == 3


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_spidr_reads_its_s3prl_export_back(tmp_path, name: str) -> None:
    """spidr info / load_model / extract said its own s3prl export was "not a SpidR/DinoSR checkpoint". It is read
    back as a Student computing the exported student's features, with its model type and step."""
    from spidr.models.loading import load_model, read_checkpoint

    model = perturbed(tiny_model("dinosr" if name == "base-like" else "spidr", **CASES[name])).eval()
    model.current_step.fill_(42)
    path = export_s3prl(model, tmp_path / "model.pt")
    checkpoint = read_checkpoint(path)
    assert (checkpoint.format, checkpoint.step, checkpoint.student_only) == ("s3prl", 42, True)
    # the exported model's config, heads' settings included (read from the fairseq options, the codebook size
    # became 256 and teacher_init "copy": a random-init baseline of the export had other heads)
    assert checkpoint.config == model.cfg
    assert "attention.qkv.bias" not in " ".join(checkpoint.state_dict) or model.cfg.encoder_qkv_bias
    student = load_model(path).eval()
    wave = waveforms(6000, 6000, seed=4)
    for ours, theirs in zip(student.get_intermediate_outputs(wave), model.get_intermediate_outputs(wave),
                            strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # an s3prl file of another origin (no spidr entry): the architecture from its fairseq options, step 0
    foreign = torch.load(path, weights_only=True)
    del foreign["spidr"]
    torch.save(foreign, tmp_path / "foreign.pt")
    checkpoint = read_checkpoint(tmp_path / "foreign.pt")
    assert (checkpoint.step, checkpoint.config.encoder_qkv_bias) == (0, model.cfg.encoder_qkv_bias)
    for ours, theirs in zip(load_model(tmp_path / "foreign.pt").eval().get_intermediate_outputs(wave),
                            model.get_intermediate_outputs(wave), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_s3prl_options_carry_groups_layer_drop_and_input_dropout(tmp_path) -> None:
    """What s3prl (and spidr reading a foreign s3prl file) takes from model_cfg: the positional conv groups,
    encoder_layerdrop and dropout_input of the exported model, not fairseq's defaults."""
    model = perturbed(tiny_model("dinosr", encoder_pos_conv_groups=4, encoder_layer_drop=0.07,
                                 encoder_projection_dropout=0.03, encoder_qkv_bias=True))
    path = export_s3prl(model, tmp_path / "model.pt")
    data = torch.load(path, weights_only=True)
    options = data["model_cfg"]
    assert (options["conv_pos_groups"], options["encoder_layerdrop"], options["dropout_input"]) == (4, 0.07, 0.03)
    del data["spidr"]
    torch.save(data, tmp_path / "foreign.pt")
    cfg = read_checkpoint(tmp_path / "foreign.pt").config
    assert (cfg.encoder_pos_conv_groups, cfg.encoder_layer_drop, cfg.encoder_projection_dropout) == (4, 0.07, 0.03)


def test_two_exports_of_one_model_are_the_same_bytes(tmp_path) -> None:
    """torch.save given a path names the records inside the file after it: the random temporary name made two
    exports of one checkpoint differ from byte 39 (the same tensors, but no checksum could tell)."""
    model = perturbed(tiny_model("spidr"))
    export_s3prl(model, tmp_path / "a.pt")
    export_s3prl(model, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_an_s3prl_export_cut_by_a_full_disk_is_an_os_error_naming_it(tmp_path) -> None:
    """Was a defect (diff34): `spidr export --format s3prl` on a full disk printed 'error: [enforce fail at
    inline_container.cc:672] . unexpected pos 14976 vs 14928' (torch's zip writer wraps the OSError in a RuntimeError;
    the new cli branch prints the RuntimeError's text): no file, no 'No space left'. atomic_torch_save unwraps it for
    checkpoints; this writer (replaced_when_done + torch.save) does not."""
    path = tmp_path / "model.pt"
    result = run_python_on_a_full_disk(20_000, f"""
        from spidr.models import export_s3prl
        from test_models_dinosr import tiny_model
        try:
            export_s3prl(tiny_model("spidr").eval(), {str(path)!r})
        except OSError as error:
            print("OSError", error.errno, error.filename)
        except BaseException as error:
            print("other", type(error).__name__, error)
    """)
    assert result.stdout.strip() == f"OSError {errno.EFBIG} {path}", result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []
