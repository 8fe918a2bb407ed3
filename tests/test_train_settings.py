"""Settings that are accepted but have no effect are named in warnings, never silently ignored."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from spidr.config import MaskingConfig, config_from_dict, load_config, unused_settings
from spidr.train.loop import train
from spidr.train.optim import lr_multiplier
from train_fixtures import tiny_config, tiny_config_dict, write_corpus

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), num_files=6, seconds=(0.5, 1.0))


def test_official_fields_without_effect_are_named(tmp_path, corpus):
    data = tiny_config_dict(tmp_path, corpus, run={"slurm_validation": {"account": "a", "nodes": 1,
                                                                        "gpus_per_node": 1}},
                            data={"alignments_path": "/data/align.jsonl"},
                            model={"ema_final_decay": 0.99999, "ema_final_step": 50000})
    notes = unused_settings(config_from_dict(data))
    assert len(notes) == 4
    assert "run.slurm_validation" in notes[0]
    assert "no [validation] set" in notes[0]
    assert "data.alignments_path = '/data/align.jsonl' is not used" in notes[1]
    assert "model.ema_final_decay = 0.99999 has no effect on SpidR" in notes[2]
    assert "model.ema_final_step = 50000 has no effect on SpidR" in notes[3]
    # a SpidR teacher decay whose distance to 1 is under the freeze threshold from step 1: the teacher never moves
    spidr_data = tiny_config_dict(tmp_path, corpus, model={"ema_start_decay": 0.99999999, "ema_threshold": 1e-7})
    assert unused_settings(config_from_dict(spidr_data)) == [
        "model.ema_start_decay = 0.99999999 has no effect: 1 − decay is at or under model.ema_threshold = 1e-07 from "
        "step 1, so the teacher never moves"]
    spidr_data["model"]["ema_start_decay"] = 1.0  # frozen on purpose (the demo's frozen random teacher)
    assert unused_settings(config_from_dict(spidr_data)) == []
    # DinoSR uses its linear schedule: nothing to say; the shipped configs set nothing useless
    data["run"]["model_type"] = "dinosr"
    del data["run"]["slurm_validation"], data["data"]["alignments_path"]
    assert unused_settings(config_from_dict(data)) == []
    for path in sorted(CONFIGS.glob("*.toml")):
        if not path.name.startswith("lm-"):
            assert unused_settings(load_config(path)) == [], path
    data["optimizer"].update(warmup_steps=1000, max_steps=300)
    assert unused_settings(config_from_dict(data)) == [
        "optimizer.lr = 0.002 is never reached: optimizer.warmup_steps = 1000 is not below optimizer.max_steps = 300 "
        "(the run ends during the warm-up)"]
    data["optimizer"].update(warmup_steps=10)
    data["model"]["target_norm_frames"] = "valid"
    assert unused_settings(config_from_dict(data)) == [
        "model.target_norm_frames = 'valid' has no effect: no data section sets enable_padding, so batches are "
        "cropped to their shortest utterance and hold no padding"]
    data["data"]["enable_padding"] = True
    assert unused_settings(config_from_dict(data)) == []
    data["model"]["extractor_mode"] = "group_norm"
    notes = unused_settings(config_from_dict(data))
    assert len(notes) == 1
    assert notes[0].startswith("data.enable_padding with model.extractor_mode = 'group_norm'")
    # a log-mel first layer has no GroupNorm, whatever extractor_mode says: nothing pools over the padding
    data["model"].update(extractor_type="log_mel", extractor_conv_layer_config=[[40, 400, 320]])
    assert unused_settings(config_from_dict(data)) == []


def test_resume_warns_when_the_learning_rates_changed(tmp_path, corpus, caplog):
    train(tiny_config(tmp_path, corpus, optimizer={"max_steps": 2},
                      run={"slurm_validation": {"account": "a", "nodes": 1, "gpus_per_node": 1}}))
    assert "run.slurm_validation" in caplog.text  # logged by the run
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spidr.train.loop"):
        train(tiny_config(tmp_path, corpus, optimizer={"max_steps": 3, "lr": 1e-3, "feature_encoder_lr_scale": 0.1}))
    assert ("optimizer.lr = 0.001 in the config, but the run resumes from a checkpoint trained with 0.002"
            in caplog.text)
    assert ("optimizer.feature_encoder_lr_scale = 0.1 in the config, but the run resumes from a checkpoint trained "
            "with 1" in caplog.text)
    caplog.clear()
    # AdamW's other settings live in the optimizer state too: kept (config.json recorded the new ones, unsaid)
    with caplog.at_level(logging.WARNING, logger="spidr.train.loop"):
        train(tiny_config(tmp_path, corpus, optimizer={"max_steps": 4, "lr": 1e-3, "feature_encoder_lr_scale": 0.1,
                                                       "weight_decay": 0.125, "betas": [0.8, 0.95]}))
    assert "optimizer.weight_decay = 0.125 in the config, but the run resumes from a checkpoint trained with" \
        in caplog.text
    assert "optimizer.betas[0] = 0.8 in the config" in caplog.text
    assert "optimizer.betas[1]" not in caplog.text  # unchanged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spidr.train.loop"):
        train(tiny_config(tmp_path, corpus, optimizer={"max_steps": 5}))  # the original rates: nothing to say
    assert "resumes from a checkpoint trained with" not in caplog.text


def test_utterances_shorter_than_two_frames_are_refused_by_the_config(tmp_path, corpus):
    """Below the front end's receptive field (TINY: 185 samples) a batch has no frame: every such step was a 0/0;
    at one frame (185-344 samples) about a third of the batches had no masked frame, and their steps were skipped."""
    from spidr.data.masking import span_mask

    for frames, empty in ((1, True), (2, False)):
        generator = torch.Generator().manual_seed(0)
        masks = [span_mask(MaskingConfig(), torch.zeros(1, frames, dtype=torch.bool), generator=generator)
                 for _ in range(100)]
        assert any(not mask.any() for mask in masks) == empty, frames
    data = tiny_config_dict(tmp_path, corpus, data={"min_sample_size": 344})
    with pytest.raises(ValueError, match=r"data\.min_sample_size = 344 is shorter than two frames of the model's "
                                         r"front end \(345 samples\)"):
        config_from_dict(data)
    data["data"]["min_sample_size"] = 345
    config_from_dict(data)
    data["validation"] = {"dev": {"manifest": str(corpus), "min_sample_size": 100}}
    with pytest.raises(ValueError, match=r"validation\.dev\.min_sample_size = 100"):
        config_from_dict(data)


def test_settings_that_would_fail_at_the_first_batch_are_refused_by_name(tmp_path, corpus):
    """Each failed only once training started (a raw torch error after config.json and step_0.pt were written), or
    silently masked whole utterances."""
    def refused(match: str, **sections) -> None:
        with pytest.raises(ValueError, match=match):
            config_from_dict(tiny_config_dict(tmp_path, corpus, **sections))

    refused(r"masking\.mask_other = 25\.0 must be in \[0, 2 × masking\.mask_length = 10\]",
            masking={"mask_selection": "uniform", "mask_other": 25.0, "mask_length": 5})
    refused(r"masking\.mask_other = -1\.0 must be >= 0 with mask_selection = 'normal'",
            masking={"mask_selection": "normal", "mask_other": -1.0})
    refused(r"optimizer\.lr = inf is invalid: expected a finite number", optimizer={"lr": float("inf")})
    refused(r"validation\.dev\.manifest is required", validation={"dev": {"min_sample_size": 4000}})
    config_from_dict(tiny_config_dict(tmp_path, corpus, masking={"mask_selection": "uniform", "mask_other": 2.0}))


def test_set_overrides_are_read_by_the_type_of_their_field(tmp_path):
    """--set read every value as TOML: a run name of digits or a date was refused as a number / date, and a path
    that may be none could not be cleared."""
    from spidr.lm.config import load_lm_config

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    init = tmp_path / "init.pt"
    init.write_bytes(b"")
    cases = {
        "run.wandb_name=123": ("wandb_name", "123"),
        "run.wandb_name=2024-01-01": ("wandb_name", "2024-01-01"),
        'run.wandb_name="007"': ("wandb_name", "007"),
        f"run.init_ckpt={init}": ("init_ckpt", str(init)),
        "run.init_ckpt=none": ("init_ckpt", None),
        "run.init_ckpt=": ("init_ckpt", None),
    }
    for override, (field, expected) in cases.items():
        assert getattr(load_config(config, [f"run.init_ckpt={init}", override]).run, field) == expected, override
    cfg = load_config(config, ["optimizer.lr=3e-4", "validation.dev.manifest=2024.csv", "optimizer.max_steps=7"])
    assert (cfg.optimizer.lr, cfg.optimizer.max_steps) == (3e-4, 7)
    assert cfg.validation["dev"].manifest == "2024.csv"
    with pytest.raises(ValueError, match=r"optimizer\.max_steps = 'many' is invalid: expected an integer"):
        load_config(config, ["optimizer.max_steps=many"])  # a number field still wants a number
    assert load_lm_config(None, ["run.name=42", "data.train=1.jsonl"]).run.name == "42"


def test_set_override_key_paths_and_values_are_read_as_written():
    """The first "=" ends the key path (a run name may hold "="); a validation table's field is typed too (its
    path has three parts: the manifest "123" stays text, not the number 123); spaces around the dots and the "="
    are the shell's quoting, not part of a name; TOML's 1e4 is a whole number of steps; and a key under a setting
    that is not a table is refused by name instead of crashing or replacing the setting."""
    config = CONFIGS / "tiny.toml"
    assert load_config(config, ["run.wandb_name=a=b"]).run.wandb_name == "a=b"
    assert load_config(config, ["validation.dev.manifest=123"]).validation["dev"].manifest == "123"
    assert load_config(config, [" optimizer. lr = 3e-4 "]).optimizer.lr == 3e-4
    steps = load_config(config, ["optimizer.max_steps=1e4"]).optimizer.max_steps
    assert (steps, type(steps)) == (10_000, int)
    with pytest.raises(ValueError, match=r"override 'run\.random_seed\.x=1': 'random_seed' is not a section"):
        load_config(config, ["run.random_seed.x=1"])


@pytest.mark.parametrize("section", ["run", "data"])
def test_a_seed_beyond_64_bits_is_refused_by_name(tmp_path, corpus, section):
    """A seed torch cannot take failed at the first generator ('Overflow when unpacking long long', no field)."""
    with pytest.raises(ValueError, match=rf"{section}\.random_seed = {2**64} must fit in 64 bits"):
        tiny_config(tmp_path, corpus, **{section: {"random_seed": 2**64}})
    assert getattr(tiny_config(tmp_path, corpus, **{section: {"random_seed": 2**63 - 1}}),
                   section).random_seed == 2**63 - 1


def test_a_finished_run_continued_to_before_its_next_step_save_keeps_its_model(tmp_path, corpus):
    """Raising max_steps to an end before the next save_interval save overwrote final.pt: no file kept the
    finished model. Its final.pt now becomes step_<N>.pt first, as it does at a step save."""
    from spidr.train.checkpoint import read_int

    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 4}, run={"save_interval": 100})
    train(cfg)
    first = torch.load(cfg.run.run_dir / "final.pt", weights_only=True)
    train(tiny_config(tmp_path, corpus, optimizer={"max_steps": 5}, run={"save_interval": 100}))
    kept = torch.load(cfg.run.run_dir / "step_4.pt", weights_only=True)
    assert read_int(kept["step"]) == 4
    assert all(torch.equal(kept["model"][k], first["model"][k]) for k in first["model"])
    assert read_int(torch.load(cfg.run.run_dir / "final.pt", weights_only=True)["step"]) == 5


def test_initial_weights_keep_their_codebooks_under_codebook_init_data(tmp_path, corpus):
    """run.init_ckpt with model.codebook_init = "data" (every demo config): the first step replaced the loaded
    codebooks with data frames, under heads trained on the loaded ones."""
    source = tiny_config(tmp_path / "a", corpus, optimizer={"max_steps": 2})
    train(source)
    loaded = torch.load(source.run.run_dir / "final.pt", weights_only=True)["model"]
    cfg = tiny_config(tmp_path / "b", corpus, optimizer={"max_steps": 1, "lr": 1e-9},
                      model={"codebook_init": "data"}, run={"init_ckpt": str(source.run.run_dir / "final.pt")})
    train(cfg)
    after = torch.load(cfg.run.run_dir / "final.pt", weights_only=True)["model"]
    for key in (k for k in loaded if k.startswith("codebooks.") and k.endswith(".codebook")):
        # one EMA update moves them a little (decay 0.9 here); a data initialisation replaces them
        assert (after[key] - loaded[key]).norm() < 0.5 * loaded[key].norm(), key
    # the same after a resume from step_0.pt (killed before its next checkpoint): the flag was in memory only
    (cfg.run.run_dir / "final.pt").unlink()
    train(cfg)
    again = torch.load(cfg.run.run_dir / "final.pt", weights_only=True)["model"]
    for key in (k for k in loaded if k.startswith("codebooks.") and k.endswith(".codebook")):
        assert torch.equal(again[key], after[key]), key  # an exact resume of the same step
    # and after a skipped first step, which asks for the data initialisation again
    from spidr.models.build import build_model

    model = build_model(cfg.model)
    model.keep_loaded_codebooks()
    model.redo_codebook_init()
    assert not model.codebook_init_due


def test_an_initial_checkpoint_that_needs_trust_names_the_export_that_reads_it(tmp_path, corpus):
    """run.init_ckpt = an original fairseq DinoSR file said "pass trust=True (CLI: --trust)", which spidr train does
    not have: the way is to export it once."""
    import argparse

    from spidr.models.build import build_model

    start = tmp_path / "fairseq-like.pt"
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 1})
    torch.save({"model": build_model(cfg.model).state_dict(), "args": argparse.Namespace(lr=1.0)}, start)
    with pytest.raises(ValueError, match=r"convert it once with 'spidr export FILE OUT\.safetensors --trust'"):
        train(tiny_config(tmp_path, corpus, optimizer={"max_steps": 1}, run={"init_ckpt": str(start)}))


def test_channel_masking_is_refused_by_name():
    """The official config accepts mask_channel_prob but never applies it (spec §14): refused, not ignored."""
    with pytest.raises(ValueError, match=r"masking\.mask_channel_prob = 0\.1 is not supported: channel masking is "
                                         r"never applied"):
        MaskingConfig(mask_channel_prob=0.1)
    assert MaskingConfig(mask_channel_prob=0.0).mask_channel_prob == 0.0


def test_a_config_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    """A Latin-1 comment (or a wav given as the config) gave only "'utf-8' codec can't decode byte 0xe9"."""
    path = tmp_path / "run.toml"
    path.write_bytes("[run]\n# réglage\nworkdir = \"w\"\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"run\.toml:2: not UTF-8 text .*save config file as UTF-8"):
        load_config(path)


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


@pytest.mark.parametrize(("override", "message"), [
    ("optimizer.max_steps=2.5", r"optimizer\.max_steps = 2\.5 is invalid: expected an integer"),
    ("optimizer.betas=[1.0, 0.95]", r"optimizer\.betas\[0\] = 1\.0 must be in \[0, 1\)"),
    ("optimizer.max_norm=0", r"optimizer\.max_norm = 0\.0 must be > 0"),
    ("data.prefetch_factor=0", r"data\.prefetch_factor = 0 must be >= 1"),
])
def test_out_of_range_settings_are_refused_by_name(override: str, message: str) -> None:
    """K1, K2, K6, K7: a fractional step count is not truncated; beta1 = 1 (Adam's bias correction 1 − β1^t = 0),
    a clipping norm of 0 (every gradient zeroed: nothing learns) and no prefetch are refused naming the field."""
    with pytest.raises(ValueError, match=message):
        load_config(CONFIG, [override])


@pytest.mark.parametrize("value", ["1e3", "true", "0x10", "1_000"])
def test_a_text_field_keeps_an_override_exactly_as_typed(value: str) -> None:
    """K5: run.wandb_name=1e3 names the run "1e3" (what the user typed), not "1000.0" (TOML's reading)."""
    assert load_config(CONFIG, [f"run.wandb_name={value}"]).run.wandb_name == value


def test_a_warm_up_as_long_as_the_run_is_named_as_never_reaching_the_peak_lr() -> None:
    """K8: with warmup_steps == max_steps every step 0..max_steps−1 is inside the warm-up (truth: lr_multiplier
    itself never reaches 1), so the note that optimizer.lr is never reached must be given."""
    data = load_config(CONFIG).to_dict()
    data["optimizer"].update(warmup_steps=300, max_steps=300)
    cfg = config_from_dict(data)
    assert max(lr_multiplier(s, cfg.optimizer) for s in range(cfg.optimizer.max_steps)) < 1.0
    assert any("is never reached" in note for note in unused_settings(cfg))


def test_every_rank_raises_the_main_rank_s_refusal_of_the_run_folder(tmp_path, monkeypatch):
    """Truth (hold_run_folder): rank 0's answer is broadcast and every rank raises it together; a rank that does
    not hold the lock itself must still raise it (else it waits in the next collective for a rank 0 that left)."""
    from spidr.distributed import AgreedValueError
    from spidr.train import runtime

    refusal = "the training run in run/ is being run by process 42 (run/.lock is locked)"
    monkeypatch.setattr(runtime, "broadcast_from_main", lambda value: refusal)
    with contextlib.ExitStack() as cleanup, pytest.raises(AgreedValueError, match=r"being run by process 42"):
        runtime.hold_run_folder(tmp_path / "run", cleanup, is_main=False)
    assert not (tmp_path / "run").exists()  # (only the main rank takes the lock)


def test_a_setting_that_no_longer_exists_is_a_difference():
    """Truth (config_diff's docstring): a key the old config has and the new one lacks is listed, with
    NO_SUCH_SETTING as its new value."""
    from spidr.train.runtime import NO_SUCH_SETTING, NOT_RECORDED, config_diff

    old = {"model": {"dim": 8, "removed": True}, "run": {"seed": 0}}
    new = {"model": {"dim": 8, "added": 1}, "run": {"seed": 0}}
    assert config_diff(old, new) == [("model.added", NOT_RECORDED, 1), ("model.removed", True, NO_SUCH_SETTING)]
    assert repr(NO_SUCH_SETTING) == "(no such setting now)"


def test_a_resume_with_edited_settings_is_reported_by_name(tmp_path, caplog):
    """Truth (write_config): a different existing config.json is reported, naming each changed setting; the file
    then holds the new config."""
    from spidr.train.runtime import write_config

    write_config({"optimizer": {"lr": 0.1, "max_steps": 4}, "run": {"seed": 0}}, tmp_path)
    with caplog.at_level(logging.WARNING, logger="spidr"):
        write_config({"optimizer": {"lr": 0.1, "max_steps": 4}, "run": {"seed": 0}}, tmp_path)
    assert "config differs" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="spidr"):
        write_config({"optimizer": {"lr": 0.2, "max_steps": 8}, "run": {"seed": 0}}, tmp_path)
    assert "config differs from the run's previous config.json in: optimizer.lr, optimizer.max_steps" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["lr"] == 0.2


def test_seed_everything_seeds_python_numpy_and_torch_for_every_rank_s_seed():
    """Truth: rank_seed gives ranks >= 1 a 63-bit seed, which NumPy's legacy seed (< 2**32) refuses; each generator
    then draws what a fresh one of that seed draws."""
    from spidr.seeding import rank_seed
    from spidr.train.runtime import seed_everything

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())  # noqa: NPY002
    try:
        for seed in (0, rank_seed(0, 1), rank_seed(7, 3)):
            seed_everything(seed)
            assert random.random() == random.Random(seed).random()
            assert np.random.random() == np.random.RandomState(seed % 2**32).random()  # noqa: NPY002
            assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(seed)))
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])  # noqa: NPY002
        torch.set_rng_state(state[2])


def test_run_use_deterministic_turns_on_deterministic_algorithms():
    from spidr.train.runtime import configure_numerics

    before = (torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision())
    try:
        torch.use_deterministic_algorithms(False)
        configure_numerics(torch.device("cpu"), deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
        configure_numerics(torch.device("cpu"), deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_float32_matmul_precision(before[1])


def test_a_config_json_that_cannot_be_written_whole_keeps_the_earlier_one(tmp_path):
    """A resume on a full disk: the rewrite of config.json fails (here a 1000-byte file size limit, as a disk with
    1000 bytes left); the run's earlier config.json must stay whole (atomic_files' promise), not be cut at 1000
    bytes (spidr's recipe check then asks to delete the whole run)."""
    import resource

    from spidr.train.runtime import write_config

    config = {"run": {"note": "x" * 3000}}
    write_config(config, tmp_path)
    earlier = (tmp_path / "config.json").read_text()
    code = ("import json, resource, sys\nfrom pathlib import Path\nfrom spidr.train.runtime import write_config\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "try:\n    write_config(json.loads(sys.argv[2]), Path(sys.argv[1]))\nexcept OSError as error:\n"
            "    print(error)\n")
    new = {"run": {"note": "y" * 3000}}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps(new)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, check=False)
    assert "File too large" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "config.json").read_text() == earlier
    assert resource  # (the limit is set in the child: this process keeps its own)


def test_training_gives_the_process_its_own_numerics_back():
    """train and train_lm set full-precision matmuls and deterministic algorithms for the run and left them set:
    a notebook went on with 'highest' precision (and, on CUDA, without TF32) after training (api30 defect 7)."""
    from spidr.train.runtime import configured_numerics

    before = (torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    try:
        torch.set_float32_matmul_precision("high")
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
        with configured_numerics(torch.device("cpu"), deterministic=True):
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_float32_matmul_precision() == "high"
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.raises(RuntimeError, match="stop"), configured_numerics(torch.device("cpu"), deterministic=False):
            raise RuntimeError("stop")  # (an error inside the run restores them too)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.benchmark = before[3]


@pytest.mark.parametrize("precision", ["medium", "high", "highest"])
def test_configured_numerics_gives_back_every_matmul_precision_and_can_run_twice(precision):
    """torch.set_float32_matmul_precision takes 'medium' too; after a training the precision must read as before
    and a second training must start (HEAD: 'medium' left the process unreadable, RuntimeError)."""
    result = _run(f"""
        import torch
        from spidr.train.runtime import configured_numerics
        torch.set_float32_matmul_precision({precision!r})
        for _ in range(2):
            with configured_numerics(torch.device("cpu"), deterministic=False):
                assert torch.get_float32_matmul_precision() == "highest"
            assert torch.get_float32_matmul_precision() == {precision!r}, torch.get_float32_matmul_precision()
        print("fine")
    """)
    assert result.stdout.strip().endswith("fine"), result.stderr[-600:]


def test_configured_numerics_starts_after_torchs_per_backend_precision_api_and_restores_it():
    """torch >= 2.9 recommends torch.backends.<backend>.fp32_precision; a process that set it could train at
    e09f221 but HEAD's configured_numerics raised torch's RuntimeError before training started."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch without the per-backend fp32_precision API")
    result = _run("""
        import torch
        from spidr.train.runtime import configured_numerics
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        with configured_numerics(torch.device("cpu"), deterministic=False):
            pass
        assert torch.backends.cuda.matmul.fp32_precision == "tf32", torch.backends.cuda.matmul.fp32_precision
        print("fine")
    """)
    assert result.stdout.strip().endswith("fine"), result.stderr[-600:]


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python: torch's matmul precision state is process-wide."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})


@pytest.mark.parametrize(("setup", "device"), [
    ("pass", "cpu"),  # HEAD: cuda.matmul and mkldnn.matmul 'none' (inherit) -> 'ieee'
    ("torch.backends.cuda.matmul.allow_tf32 = True", "cuda"),  # HEAD: mkldnn.matmul 'none' -> 'tf32'
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "cuda"),  # HEAD: cudnn.allow_tf32 then raises
])
def test_configured_numerics_gives_back_every_per_backend_precision(setup, device):
    """Every torch precision setting must read as before after the block, twice, on success and on error. HEAD
    restores the legacy API only whenever it is readable: set_float32_matmul_precision writes CUDA's and oneDNN's
    matmul precisions together (the common 'allow_tf32 = True' left CPU matmuls in TF32 after training), and
    'none' (inherit the root's) came back as 'ieee'; after the per-backend API it left cudnn.allow_tf32 unreadable."""
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("torch without the per-backend fp32_precision API")
    result = _run(f"""
        import torch
        from spidr.train.runtime import configured_numerics
        NAMES = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
                 "mkldnn.rnn")
        def backend(name):
            b = torch.backends
            for part in filter(None, name.split(".")):
                b = getattr(b, part)
            return b
        def read(getter):
            try:
                return getter()
            except RuntimeError:
                return "unreadable"
        def snapshot():
            return ([read(lambda n=n: backend(n).fp32_precision) for n in NAMES]
                    + [read(torch.get_float32_matmul_precision), read(lambda: torch.backends.cuda.matmul.allow_tf32),
                       read(lambda: torch.backends.cudnn.allow_tf32)])
        {setup}
        before = snapshot()
        for fail in (False, True):
            try:
                with configured_numerics(torch.device({device!r}), deterministic=True):
                    if fail:
                        raise KeyError("stop")
            except KeyError:
                pass
            assert snapshot() == before, (fail, before, snapshot())
        print("fine")
    """)
    assert result.stdout.strip().endswith("fine"), result.stderr[-800:]
