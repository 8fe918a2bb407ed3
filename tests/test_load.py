"""``spidr.load_model``: every checkpoint format, configs beside or inside the file, safe loading, export, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import typing

import numpy as np
import pytest
import torch

import spidr
from spidr import cli
from spidr.config import Config, DataConfig, DinoSRConfig, RunConfig, SpidRConfig
from spidr.models import (
    DinoSR,
    SpidR,
    Student,
    export_hf,
    export_safetensors,
    load_model,
    num_frames,
    read_checkpoint,
    spidr_base,
)
from spidr.models.build import build_model
from spidr.models.loading import dinosr_base_original, dinosr_base_reproduced
from spidr.models.s3prl_export import export_s3prl
from test_models_dinosr import (
    random_mask,
    tiny_model,
    waveforms,
)
from train_fixtures import EXTRACTION_MODEL, speech_like


@pytest.fixture(scope="module")
def source() -> DinoSR:
    model = tiny_model("spidr")
    with torch.no_grad():
        model.current_step.fill_(777)
    return model.eval()


def _run_config(model: DinoSR) -> dict:
    return Config(
        run=RunConfig(workdir="w", wandb_project="p", wandb_name="n", model_type=model.cfg.model_type),
        data=DataConfig(manifest="train.csv"),
        model=model.cfg,
    ).to_dict()


def _assert_same(loaded: DinoSR, model: DinoSR) -> None:
    assert type(loaded) is type(model)
    assert loaded.cfg == model.cfg
    assert not loaded.training
    expected = model.state_dict()
    state = loaded.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    wave, mask = waveforms(4000, 4000), random_mask(2, num_frames(4000))
    with torch.no_grad():
        assert torch.equal(loaded(wave, mask=mask)[0], model.eval()(wave, mask=mask)[0])


def test_official_checkpoint_with_a_run_config_beside_it(tmp_path, source) -> None:
    torch.save({"model": source.state_dict()}, tmp_path / "step_2500.pt")
    (tmp_path / "config.json").write_text(json.dumps(_run_config(source)))
    loaded = load_model(tmp_path / "step_2500.pt")
    _assert_same(loaded, source)
    assert int(loaded.current_step) == 777


def test_official_checkpoint_with_a_bare_model_config_beside_it(tmp_path) -> None:
    model = tiny_model("dinosr").eval()
    torch.save({"model": model.state_dict()}, tmp_path / "final.pt")
    bare = dataclasses.asdict(model.cfg) | {"__class__": "DinoSRConfig"}
    (tmp_path / "config.json").write_text(json.dumps(bare))
    _assert_same(load_model(tmp_path / "final.pt"), model)


def test_official_checkpoint_without_any_config(tmp_path, source) -> None:
    path = tmp_path / "spidr_base.pt"
    torch.save({"model": source.state_dict()}, path)
    with pytest.raises(ValueError, match="model_type"):
        load_model(path)
    # with a type, the base defaults are used: these tiny weights do not fit them
    # the shapes that tell which setting is wrong come first, a few keys of each kind with their counts
    with pytest.raises(ValueError, match=r"does not fit a spidr model with this config \(12 layers of dim 768, "
                                         r"8 codebooks of 256; .*\): \d+ shape\(s\) differ: mask_embedding: "
                                         r"\(32,\) in the file, \(768,\) here"):
        load_model(path, model_type="spidr")
    with pytest.raises(ValueError, match="does not fit"):
        spidr_base(path)
    _assert_same(load_model(path, config=source.cfg), source)


@pytest.mark.parametrize(("step", "shown"), [
    (torch.tensor([]), r"a tensor of shape \(0,\)"), ("ten", "'ten'"), (torch.tensor([3.7]), "3.7"),
    (torch.tensor([1, 2]), r"a tensor of shape \(2,\)")])
def test_a_malformed_step_is_named(tmp_path, source, step, shown) -> None:
    """A step that is no count gave a traceback (an empty tensor, a string) or was cut silently (3.7 → 3)."""
    path = tmp_path / "ckpt.pt"
    torch.save({"model": source.state_dict(), "config": _run_config(source), "step": step}, path)
    with pytest.raises(ValueError, match=rf"ckpt\.pt: step is {shown}.*expected a step count"):
        load_model(path)
    state = source.state_dict() | {"current_step": torch.tensor(5)}  # a 0-d counter: read, then named by shape
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"1 shape\(s\) differ: current_step: \(\) in the file, \(1,\) here"):
        load_model(path, config=source.cfg)


def test_conflicting_model_type_is_an_error(tmp_path, source) -> None:
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pt")
    (tmp_path / "config.json").write_text(json.dumps(_run_config(source)))
    with pytest.raises(ValueError, match="'dinosr' was requested"):
        load_model(tmp_path / "ckpt.pt", model_type="dinosr")


def test_config_file_argument_and_wrapper_prefixes(tmp_path, source) -> None:
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # saved from a DDP wrapper
    torch.save(state, tmp_path / "bare_state.pt")  # no "model" entry: the dict itself is the state
    config = tmp_path / "run.json"
    config.write_text(json.dumps(_run_config(source)))
    _assert_same(load_model(tmp_path / "bare_state.pt", config=config), source)


def test_run_config_without_a_model_section_gives_the_default_model(tmp_path, source) -> None:
    """A run config may leave [model] out (``spidr train`` then uses the defaults): it is still a run config, not
    a bare model config whose keys are "run" and "data"."""
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pt")
    run = tmp_path / "run.toml"
    run.write_text('[run]\nworkdir = "w"\nwandb_project = "p"\nwandb_name = "n"\nmodel_type = "spidr"\n\n'
                   '[data]\nmanifest = "train.csv"\n')
    assert read_checkpoint(tmp_path / "ckpt.pt", config=run).config == SpidRConfig()
    run.write_text('[data]\nmanifest = "train.csv"\n')  # no [run] either: the official default type, DinoSR
    assert read_checkpoint(tmp_path / "ckpt.pt", config=run).config == DinoSRConfig()
    run.write_text('model = 3\n[data]\nmanifest = "train.csv"\n')
    with pytest.raises(ValueError, match=r"run\.toml: \[model\] must be a table of model settings, got 3"):
        read_checkpoint(tmp_path / "ckpt.pt", config=run)


def test_training_checkpoint(tmp_path, source) -> None:
    path = tmp_path / "step_10.pt"
    torch.save({"model": source.state_dict(), "config": _run_config(source), "step": torch.tensor([10]),
                "optimizer": {"state": {}, "param_groups": []}}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "training"
    assert checkpoint.step == 10
    _assert_same(load_model(path), source)


@pytest.mark.parametrize("model_type", ["spidr", "dinosr"])
def test_safetensors_round_trip(tmp_path, model_type: str) -> None:
    model = tiny_model(model_type).eval()
    path = tmp_path / "model.safetensors"
    export_safetensors(model, path)
    assert read_checkpoint(path).format == "safetensors"
    _assert_same(load_model(path), model)
    assert b"pickle" not in path.read_bytes()[:64]


def test_the_format_is_told_by_the_content_not_the_suffix(tmp_path, source, caplog) -> None:
    """A safetensors export named .pt gave "Unsupported operand 64", a training checkpoint named .safetensors "header
    too large": both are read as what they are, with a warning. Files spidr writes that are not models are named:
    k-means centroids (asked for --model-type, then listed 347 missing keys) and .npy features."""
    import shutil

    from spidr.eval.kmeans import save_centroids

    export_safetensors(source, tmp_path / "model.safetensors")
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "misnamed.pt")
    with caplog.at_level("WARNING", logger="spidr.models.loading"):
        assert read_checkpoint(tmp_path / "misnamed.pt").format == "safetensors"
    assert "misnamed.pt holds a safetensors file despite its suffix" in caplog.text
    _assert_same(load_model(tmp_path / "misnamed.pt"), source)
    torch.save({"model": source.state_dict(), "config": _run_config(source), "step": 3}, tmp_path / "run.safetensors")
    assert read_checkpoint(tmp_path / "run.safetensors").format == "training"
    save_centroids(tmp_path / "centroids.safetensors", np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"centroids\.safetensors holds k-means centroids \(spidr kmeans\), not a "
                                         r"model"):
        read_checkpoint(tmp_path / "centroids.safetensors")
    np.save(tmp_path / "features.npy", np.zeros((5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"features\.npy is a NumPy array"):
        read_checkpoint(tmp_path / "features.npy")


def test_pickle_payload_is_refused_without_trust(tmp_path, source) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ValueError, match=r"argparse\.Namespace.*trust=True"):
        load_model(path, config=source.cfg)
    _assert_same(load_model(path, config=source.cfg, trust=True), source)


class _RunsACommand:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_a_pickle_that_would_run_a_command_is_refused_naming_the_function(tmp_path, source, monkeypatch) -> None:
    """torch words a blocked module ("unsupported GLOBAL posix.system whose module posix is blocked") unlike a class
    outside its allowlist; the message once quoted torch's advice to retry with weights_only=False."""
    path = tmp_path / "evil.pt"
    torch.save({"model": source.state_dict(), "x": _RunsACommand()}, path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"pickled Python objects besides tensors \(first one: {os.name}\.system;.*"
                                         r"trust=True") as error:
        load_model(path, config=source.cfg)
    assert "weights_only" not in str(error.value)
    assert not (tmp_path / "pwned").exists()


def test_unreadable_files(tmp_path, source) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    for trust in (False, True):  # a broken file is never blamed on pickled objects
        with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
            load_model(tmp_path / "garbage.pt", trust=trust)
    import soundfile as sf

    sf.write(tmp_path / "audio.pt", np.zeros(1600, dtype=np.float32), 16000, format="WAV")  # a wav as a checkpoint
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("audio.pt", "empty.pt"):
        for trust in (False, True):
            with pytest.raises(ValueError, match=rf"{name} is not a readable PyTorch checkpoint"):
                load_model(tmp_path / name, trust=trust)
    with pytest.raises(ValueError, match="empty or cut short"):
        load_model(tmp_path / "empty.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        load_model(tmp_path / "tensor.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="safetensors"):
        load_model(tmp_path / "garbage.safetensors")
    state = dict(source.state_dict())
    del state["heads.0.0.weight"]
    torch.save({"model": state}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"heads\.0\.0\.weight"):
        load_model(tmp_path / "partial.pt", config=source.cfg)


def test_top_level_exports() -> None:
    assert spidr.SpidR is SpidR
    assert spidr.load_model is load_model
    assert spidr.num_frames(16000) == 49
    assert callable(spidr.dinosr_base_original)
    assert callable(spidr.dinosr_base_reproduced)
    assert callable(spidr.build_model)


def test_cli_export_and_info(tmp_path, source, capsys) -> None:
    checkpoint = tmp_path / "step_0.pt"
    torch.save({"model": source.state_dict()}, checkpoint)
    out = tmp_path / "out.safetensors"
    assert cli.main(["export", str(checkpoint), str(out), "--model-type", "spidr"]) == 2  # base config: no fit
    assert "does not fit" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(_run_config(source)))
    assert cli.main(["export", str(checkpoint), str(out)]) == 0
    _assert_same(load_model(out), source)
    assert cli.main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "spidr (SpidR)" in printed
    assert "step:            777" in printed
    assert f"{sum(p.numel() for k, p in source.named_parameters() if k.startswith('teacher')):,} teacher" in printed
    assert cli.main(["export", str(checkpoint), str(tmp_path / "out.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_a_state_saved_from_torch_compile_loads_like_the_plain_one(tmp_path, source) -> None:
    """torch.compile wraps the model in ``_orig_mod.``, and DDP around it adds ``module.`` (or torch.compile around
    DDP: ``_orig_mod.module.``): a state dict saved from any of these loads to the same weights as the plain one."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps(_run_config(source)))
    for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        state = {f"{prefix}{k}": v for k, v in source.state_dict().items()}
        torch.save({"model": state}, tmp_path / "compiled.pt")
        _assert_same(load_model(tmp_path / "compiled.pt", config=config), source)


def test_a_bf16_export_loads_as_float32(tmp_path):
    torch.manual_seed(0)
    model = build_model(SpidRConfig(**EXTRACTION_MODEL)).eval()
    export_safetensors(model.to(torch.bfloat16), tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.current_step.dtype == torch.int64
    wave = torch.from_numpy(speech_like(int(0.5 * 16000), np.random.default_rng(2)))[None]
    with torch.no_grad():
        reference = model.float().get_intermediate_outputs(wave)[-1]
        assert loaded.get_intermediate_outputs(wave)[-1].dtype == torch.float32
        torch.testing.assert_close(loaded.get_intermediate_outputs(wave)[-1], reference)



def test_a_safetensors_file_whose_header_length_starts_like_a_pickle_is_read_as_safetensors(tmp_path):
    """The format is told by the first bytes; a pickle starts with 0x80, and so does a safetensors file whose
    8-byte little-endian header length has 0x80 for low byte (one in 32: the length is a multiple of 8). Such an
    export (1 model in 32) was read as a PyTorch file and refused ("Unsupported operand")."""
    from safetensors.torch import load_file

    model = build_model(SpidRConfig(**EXTRACTION_MODEL)).eval()
    path = tmp_path / "m.safetensors"
    export_safetensors(model, path)
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].rstrip(b" ")  # JSON, padded with spaces to a multiple of 8
    grown = header[:-1] + b" " * ((0x80 - len(header)) % 256) + header[-1:]  # spaces before its closing brace
    grown += b" " * (-len(grown) % 8)
    path.write_bytes(len(grown).to_bytes(8, "little") + grown + data[8 + length :])
    assert path.read_bytes()[0] == 0x80
    assert load_file(path).keys() == model.state_dict().keys()  # still a valid safetensors file
    loaded = load_model(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------------------------------
# Loading: behaviours that a mutation round (55 mutants over config, loading, key maps and conversion) found unpinned
# ------------------------------------------------------------------------------------------------------------------


def test_released_weight_loaders_use_their_own_base_config(tmp_path) -> None:
    """mut L06, L07: spidr_base is SpidR with the default SpidRConfig and dinosr_base_reproduced DinoSR with the
    default DinoSRConfig (spec §9.2; both files hold the same keys, so the wrong class would load silently), even
    with another model's config.json beside the file."""
    model = tiny_model("spidr").eval()
    path = tmp_path / "weights.pt"
    torch.save({"model": model.state_dict()}, path)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(model.cfg) | {"__class__": "SpidRConfig"}))
    assert type(load_model(path)).__name__ == "SpidR"  # (the config beside it fits the weights)
    base = r"with this config \(12 layers of dim 768, 8 codebooks of 256;"
    with pytest.raises(ValueError, match=rf"does not fit a spidr model {base}"):
        spidr_base(path)
    with pytest.raises(ValueError, match=rf"does not fit a dinosr model {base}"):
        dinosr_base_reproduced(path)


def test_dinosr_base_original_passes_trust_on(tmp_path) -> None:
    """mut L08: the original fairseq file pickles its config, so dinosr_base_original(path, trust=True) must
    unpickle it (written here from a tiny model with an argparse Namespace config)."""
    from test_models_convert import tiny_original, write_fairseq

    original = tiny_original()
    path = tmp_path / "dinosr.ckpt"
    write_fairseq(path, original, namespace=True)
    with pytest.raises(ValueError, match="trust=True"):
        dinosr_base_original(path)
    loaded = dinosr_base_original(path, trust=True)
    assert type(loaded) is DinoSR
    assert loaded.cfg == original.cfg
    assert loaded.cfg.encoder_qkv_bias


def test_a_fairseq_checkpoint_without_settings_is_refused_without_a_config(tmp_path) -> None:
    """mut L05: a fairseq file whose cfg is None and that has no args says nothing of its architecture: it is
    refused by that reason unless a config is given, never loaded with guessed defaults."""
    from test_models_convert import tiny_original, write_fairseq

    original = tiny_original()
    path = tmp_path / "dinosr.ckpt"
    write_fairseq(path, original)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["cfg"] = None
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="neither 'cfg' nor 'args'"):
        load_model(path)
    assert load_model(path, config=original.cfg).cfg == original.cfg


@pytest.mark.parametrize("step", [-1, torch.tensor([-5])])
def test_a_negative_step_is_refused(tmp_path, step) -> None:
    """mut L04: a step count is never negative (a negative one would restart the EMA and freeze schedules before
    their start)."""
    model = tiny_model("spidr").eval()
    run = Config(run=RunConfig(workdir="w", wandb_project="p", wandb_name="n", model_type="spidr"),
                 data=DataConfig(manifest="m.csv"), model=model.cfg).to_dict()
    torch.save({"model": model.state_dict(), "config": run, "step": step}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"ckpt\.pt: step is -[15], expected a step count"):
        read_checkpoint(tmp_path / "ckpt.pt")


def test_a_bare_config_is_told_spidr_by_either_spidr_only_field(tmp_path) -> None:
    """mut L03: a bare model config without __class__ is SpidR's when it sets ema_timescale or ema_threshold."""
    model = tiny_model("spidr").eval()
    torch.save({"model": model.state_dict()}, tmp_path / "w.pt")
    bare = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k != "ema_timescale"}
    (tmp_path / "config.json").write_text(json.dumps(bare))
    assert type(read_checkpoint(tmp_path / "w.pt").config) is SpidRConfig


def test_an_exported_student_loads_as_a_student(tmp_path) -> None:
    """mut L13: export_safetensors of a Student marks it so; load_model gives back the Student (a whole-model
    build would miss its teacher, heads and codebooks)."""
    student = load_model(export_hf(tiny_model("spidr").eval(), tmp_path / "hf") or tmp_path / "hf")
    assert isinstance(student, Student)
    export_safetensors(student, tmp_path / "student.safetensors")
    checkpoint = read_checkpoint(tmp_path / "student.safetensors")
    assert checkpoint.student_only
    assert isinstance(load_model(tmp_path / "student.safetensors"), Student)


def test_a_step_of_another_integer_type_loads_as_int64(tmp_path) -> None:
    """mut L09: model_from_checkpoint promises fp32 weights and an int64 step whatever the file stored."""
    model = tiny_model("dinosr").eval()
    state = model.state_dict() | {"current_step": torch.tensor([42], dtype=torch.int32)}
    torch.save({"model": state}, tmp_path / "w.pt")
    loaded = load_model(tmp_path / "w.pt", config=model.cfg)
    assert loaded.current_step.dtype == torch.int64
    assert int(loaded.current_step) == 42


# ------------------------------------------------------------------------------------------------------------------
# Key maps: models with ten or more layers (the base models have 12; the tiny test models 2-3)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hf", "s3prl"])
def test_exports_of_a_twelve_layer_model_round_trip(tmp_path, fmt: str) -> None:
    """mut K01: layer indices 10 and 11 (two digits) map like 0-9 in both directions."""
    model = tiny_model("spidr", encoder_num_layers=12, encoder_embed_dim=16, encoder_ff_interm_features=16).eval()
    out = tmp_path / ("hf" if fmt == "hf" else "model.pt")
    export_hf(model, out) if fmt == "hf" else export_s3prl(model, out)
    loaded = load_model(out)
    assert isinstance(loaded, Student)
    state = loaded.state_dict()
    expected = model.state_dict()
    assert "student.layers.11.attention.qkv.weight" in state
    for key, value in state.items():
        if key != "current_step":
            assert torch.equal(value, expected[key]), key
    wave = waveforms(4000)
    with torch.no_grad():
        assert torch.equal(loaded.get_intermediate_outputs(wave)[11], model.get_intermediate_outputs(wave)[11])


def test_a_config_of_the_other_type_than_the_checkpoint_records_is_refused(tmp_path, source) -> None:
    """A training checkpoint (and an export with its config) records its model type. A --config of the other type
    silently made SpidR's weights a DinoSR (the same tensors: the same layer features, other codebook units), where
    --model-type was refused; a run config naming no type counted as DinoSR even then. Now: refused, naming both;
    a run config of no type takes the checkpoint's; one of the same type is used."""
    training = tmp_path / "step.pt"
    torch.save({"model": source.state_dict(), "config": _run_config(source), "step": 3}, training)
    export_path = tmp_path / "model.safetensors"
    export_safetensors(source, export_path)
    other = _run_config(source)
    other["run"]["model_type"] = "dinosr"  # (with the fields a DinoSR has: a config that loads)
    dinosr_fields = {f.name for f in dataclasses.fields(DinoSRConfig)}
    other["model"] = {k: v for k, v in other["model"].items() if k in dinosr_fields}
    (tmp_path / "dinosr.json").write_text(json.dumps(other))
    untyped = _run_config(source)
    del untyped["run"]["model_type"]
    (tmp_path / "untyped.json").write_text(json.dumps(untyped))
    for checkpoint in (training, export_path):
        with pytest.raises(ValueError, match=rf"dinosr\.json describes a 'dinosr' model but {checkpoint} is a "
                                             r"'spidr' one"):
            read_checkpoint(checkpoint, config=tmp_path / "dinosr.json")
        assert read_checkpoint(checkpoint, config=tmp_path / "untyped.json").config == source.cfg
    with pytest.raises(ValueError, match=r"the given DinoSRConfig describes a 'dinosr' model"):
        read_checkpoint(training, config=DinoSRConfig())
    with pytest.raises(ValueError, match=r"describes a 'spidr' model but model_type='dinosr' was requested"):
        read_checkpoint(training, config=tmp_path / "untyped.json", model_type="dinosr")
    # the CLI says it too
    assert cli.main(["info", str(training), "--config", str(tmp_path / "dinosr.json")]) == 2


def test_run_init_ckpt_may_start_a_run_of_the_other_type_from_a_checkpoint_that_records_its_own(tmp_path, source):
    """The type check of a given config is not for run.init_ckpt: a DinoSR run may start from a SpidR training
    checkpoint or export (the same tensors), as before the check."""
    from spidr.train.loop import _load_initial_weights

    training = tmp_path / "step.pt"
    torch.save({"model": source.state_dict(), "config": _run_config(source), "step": 3}, training)
    export_path = tmp_path / "model.safetensors"
    export_safetensors(source, export_path)
    dinosr_fields = {f.name for f in dataclasses.fields(DinoSRConfig)}
    dinosr_cfg = DinoSRConfig(**{k: v for k, v in dataclasses.asdict(source.cfg).items() if k in dinosr_fields})
    for path in (training, export_path):
        with pytest.raises(ValueError, match="is a 'spidr' one"):
            read_checkpoint(path, config=dinosr_cfg)
        assert read_checkpoint(path, config=dinosr_cfg, config_of_any_type=True).config == dinosr_cfg
        model = build_model(dinosr_cfg)
        _load_initial_weights(model, str(path), dinosr_cfg)
        started = model.state_dict()
        for key, value in source.state_dict().items():
            if key != "current_step":
                assert torch.equal(started[key], value), key


def test_another_model_s_weights_are_named_as_such_not_asked_about(tmp_path) -> None:
    """Weights of another model (a HuBERT export, unrelated tensors) were met with "cannot tell whether it is a SpidR
    or a DinoSR model (both have the same weights)", and --model-type then failed on a config.json of another
    model. They are refused as not SpidR / DinoSR weights, naming a few of their tensors."""
    from safetensors.torch import save_file

    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({"encoder.weight": torch.ones(2, 2), "masked_spec_embed": torch.ones(2)}, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"model_type": "hubert", "architectures": ["HubertModel"]}))
    torch.save({"encoder.weight": torch.ones(2, 2)}, tmp_path / "other.pt")
    for path, held in ((hub / "model.safetensors", "encoder.weight, masked_spec_embed"),
                       (tmp_path / "other.pt", "encoder.weight")):
        for model_type in (None, "spidr"):
            with pytest.raises(ValueError, match=rf"{re.escape(str(path))} holds none of the SpidR / DinoSR weights "
                                                 rf"\(no student\.\* tensor; it holds e\.g\. {held}\)"):
                read_checkpoint(path, model_type=model_type)


def _of_other_type(cfg, cls):
    """``cfg``'s settings as a config of the other model type (the fields that type has)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields and k != "model_type"})


@pytest.mark.parametrize("fmt", ["hf", "hf weights file", "s3prl"])
def test_an_export_that_records_its_type_refuses_a_config_of_the_other_type(tmp_path, fmt) -> None:
    """A Hugging Face directory (or its model.safetensors) and an s3prl export record whether they hold a SpidR: a
    DinoSR config given with them is refused, naming both (the same tensors would give another model's codebook
    units), as for a training checkpoint or a spidr export; run.init_ckpt (config_of_any_type) still takes it."""
    source = tiny_model("spidr").eval()
    if fmt == "s3prl":
        path = export_s3prl(source, tmp_path / "model.pt")
    else:
        export_hf(source, tmp_path / "hf")
        path = tmp_path / "hf" if fmt == "hf" else tmp_path / "hf" / "model.safetensors"
    dinosr_cfg = _of_other_type(source.cfg, DinoSRConfig)
    with pytest.raises(ValueError, match=r"the given DinoSRConfig describes a 'dinosr' model but .* is a 'spidr' one"):
        read_checkpoint(path, config=dinosr_cfg)
    assert read_checkpoint(path, config=dinosr_cfg, config_of_any_type=True).config == dinosr_cfg
    assert read_checkpoint(path, config=source.cfg).config == source.cfg


def test_a_training_checkpoint_whose_run_config_names_no_type_is_a_dinosr_one(tmp_path) -> None:
    """A run config without run.model_type trains a DinoSR (the official default, as spidr train reads it): its
    checkpoint records a DinoSR, so a SpidR config given with it is refused, and a DinoSR one is taken."""
    source = tiny_model("dinosr").eval()
    config = Config(run=RunConfig(workdir="w", wandb_project="p", wandb_name="n", model_type="dinosr"),
                    data=DataConfig(manifest="train.csv"), model=source.cfg).to_dict()
    del config["run"]["model_type"]
    path = tmp_path / "step.pt"
    torch.save({"model": source.state_dict(), "config": config, "step": 3}, path)
    assert read_checkpoint(path).config == source.cfg  # (read as a DinoSR)
    spidr_cfg = _of_other_type(source.cfg, SpidRConfig)
    with pytest.raises(ValueError, match=r"the given SpidRConfig describes a 'spidr' model but .*step\.pt is a "
                                         r"'dinosr' one"):
        read_checkpoint(path, config=spidr_cfg)
    assert read_checkpoint(path, config=spidr_cfg, config_of_any_type=True).config == spidr_cfg


# DEFECT (regression of f234ad3: a run config no longer defaults to "dinosr" against model_type): fails now.
def test_a_training_checkpoint_of_a_run_config_naming_no_type_refuses_model_type_spidr(tmp_path) -> None:
    """Such a checkpoint is a DinoSR (spidr train's default): model_type='spidr' is refused as for a checkpoint whose
    run config says dinosr, as a SpidR config given with it is; before the change it was, now it loads the DinoSR's
    weights as a SpidR."""
    source = tiny_model("dinosr").eval()
    config = Config(run=RunConfig(workdir="w", wandb_project="p", wandb_name="n", model_type="dinosr"),
                    data=DataConfig(manifest="train.csv"), model=source.cfg).to_dict()
    path = tmp_path / "typed.pt"
    torch.save({"model": source.state_dict(), "config": config, "step": 3}, path)
    with pytest.raises(ValueError, match=r"describes a 'dinosr' model but model_type='spidr' was requested"):
        read_checkpoint(path, model_type="spidr")
    del config["run"]["model_type"]
    path = tmp_path / "untyped.pt"
    torch.save({"model": source.state_dict(), "config": config, "step": 3}, path)
    with pytest.raises(ValueError, match=r"describes a 'dinosr' model but model_type='spidr' was requested"):
        read_checkpoint(path, model_type="spidr")


def test_a_config_given_as_a_dict_is_read_as_its_file_would_be(tmp_path, source) -> None:
    """load_model(path, config={...}) failed with 'expected str, bytes or os.PathLike object, not dict': a notebook
    holding a run config (a loaded TOML) or a model section had to write it to a file first."""
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pt")
    run = _run_config(source)
    _assert_same(load_model(tmp_path / "ckpt.pt", config=run), source)
    bare = dataclasses.asdict(source.cfg) | {"__class__": "SpidRConfig"}
    _assert_same(load_model(tmp_path / "ckpt.pt", config=bare), source)
    with pytest.raises(ValueError, match=r"config = 3: expected a ModelConfig, a dict of model or run settings, or "
                                         r"the path of a config file"):
        load_model(tmp_path / "ckpt.pt", config=3)
    with pytest.raises(ValueError, match=r"the given config dict: .*encoder_num_layerz"):
        load_model(tmp_path / "ckpt.pt", config=bare | {"encoder_num_layerz": 2})


def test_a_dict_with_only_one_of_the_s3prl_keys_is_not_read_as_an_s3prl_export(tmp_path) -> None:
    """mut S4 (``all`` → ``any`` in is_s3prl_export): a file of another tool that holds a "model_weight" entry but
    no task_cfg / model_cfg is no s3prl checkpoint; it is refused as no SpidR/DinoSR checkpoint (a ValueError
    naming the file), not a KeyError traceback from the s3prl reader."""
    path = tmp_path / "other.pt"
    torch.save({"model_weight": {"w": torch.zeros(2)}, "epoch": 3}, path)
    with pytest.raises(ValueError, match=rf"{path} is not a SpidR/DinoSR checkpoint"):
        read_checkpoint(path)


def test_the_released_weight_loaders_return_a_student_from_an_exported_student(tmp_path) -> None:
    """dinosr_base_original (and spidr_base, dinosr_base_reproduced, all load_model underneath) give the
    inference-only Student for a Hugging Face directory; their annotation said DinoSR, so a user's type checker
    passed ``.get_layers_and_codebooks``/``.forward`` on it, an AttributeError at run time."""
    export_hf(tiny_model("dinosr").eval(), tmp_path / "hf")
    assert isinstance(dinosr_base_original(tmp_path / "hf"), Student)
    for loader in (spidr_base, dinosr_base_reproduced, dinosr_base_original):
        returned = typing.get_type_hints(loader)["return"]
        assert Student in typing.get_args(returned), f"{loader.__name__} -> {returned}"
