"""What ``spidr lm-study`` (and the demo's spoken-LM stage) reuses from an earlier run of the same study folder:
units and LMs of the benchmark the folder holds now, whatever its path is spelt or moved to; a kill while the
oracle's units are copied; layers checked before any synthesis; the command's help and the documented commands.

The study runs here on a benchmark without audio (frame labels only, what the phone oracle copies), with the two
phone LMs only, a 2-step LSTM and the bigram: a few seconds."""

from __future__ import annotations

import csv
import json
import random
import re
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spidr.cli import build_parser, main
from spidr.corpus.lm_bench import INFO_JSON, LmBenchInfo, LmBenchSettings, bench_parameters
from spidr.lm import study
from spidr.lm.score import find_unit_files

CONV_100HZ = ((16, 10, 5), (16, 3, 2), (16, 3, 2), (16, 3, 2), (16, 2, 2), (16, 2, 2))  # hop 160: 100 Hz

TINY_LM = ("optimizer.max_steps=2", "optimizer.batch_size=2", "model.dim=8", "model.num_layers=1",
           "model.context=16", 'optimizer.dtype="float32"', 'run.device="cpu"')
PHONES = ("AA", "B", "D", "IY", "K", "S")


def _bench(bench_dir: Path, utterances: int) -> LmBenchInfo:
    """A benchmark of ``utterances`` training utterances made in ``bench_dir`` (its frame labels and info.json)."""
    rng = random.Random(utterances)
    for folder, count in (("train", utterances), ("lexical/dev", 4)):
        (bench_dir / folder).mkdir(parents=True, exist_ok=True)
        rows = [{"name": f"{folder.replace('/', '-')}-{i:03d}", "phones": [rng.choice(PHONES) for _ in range(30)]}
                for i in range(count)]
        (bench_dir / folder / "frame_labels_20ms.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"parameters": bench_parameters(LmBenchSettings(train_utterances=utterances)),
            "counts": {"train": {"utterances": utterances}}}
    (bench_dir / INFO_JSON).write_text(json.dumps(info))
    return LmBenchInfo.load(bench_dir)


def _study(monkeypatch: pytest.MonkeyPatch, out: Path, utterances: int, *, rebuild_stale: bool = False) -> dict:
    """Run the study in ``out`` on a benchmark of ``utterances`` training utterances; returns {LM name: the
    (task, split) unit files it scored}."""
    scored = {}

    def score(name, checkpoint, units_dir, out_dir, *, bench, settings):
        scored[name] = sorted(find_unit_files(units_dir))
        return {}

    monkeypatch.setattr(study, "_benchmark", lambda out_dir, settings: _bench(out_dir / "bench", utterances))
    monkeypatch.setattr(study, "_score", score)
    monkeypatch.setattr(study, "_untrained_row", lambda *args, **kwargs: {"name": "untrained"})
    monkeypatch.setattr(study, "write_study_report", lambda rows, out_dir, bench, **kwargs: out_dir / "spoken_lm.md")
    study.run_study([], out, study.StudySettings(lm_overrides=TINY_LM, rebuild_stale=rebuild_stale))
    return scored


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import spidr.lm.train

    monkeypatch.setattr(spidr.lm.train, "train_lm", lambda cfg: pytest.fail(f"trained {cfg.run.name} again"))


def test_a_study_folder_spelt_otherwise_or_moved_keeps_its_lms(tmp_path, monkeypatch):
    """``make demo`` gives a relative --out: the same folder given as an absolute path, or moved, still holds this
    study's LMs (their recorded paths differ, not their config or training data)."""
    monkeypatch.chdir(tmp_path)
    _study(monkeypatch, Path("runs/out"), 14)
    assert sorted(p.parent.name for p in (tmp_path / "runs/out/lms").glob("*/final.pt")) == ["phone-bigram",
                                                                                            "phone-oracle"]
    saved = torch.load(tmp_path / "runs/out/lms/phone-oracle/final.pt", weights_only=True)["config"]
    assert saved["run"]["workdir"] == str(tmp_path / "runs/out/lms")  # the folder resolved: one spelling
    _no_training(monkeypatch)
    _study(monkeypatch, tmp_path / "runs/out", 14)
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    _study(monkeypatch, tmp_path / "moved/out", 14)


def test_lms_differing_in_config_or_data_are_named_and_location_fields_are_not(tmp_path):
    from spidr.lm.train import lm_checkpoint_summary, train_lm

    bench = _bench(tmp_path / "bench", 14)
    units = study._oracle_units(bench, tmp_path / "units")
    settings = study.StudySettings(lm_overrides=TINY_LM)
    cfg = study._lm_config("phone oracle", units, tmp_path / "a", settings)
    assert train_lm(cfg) == "completed"
    summary = lm_checkpoint_summary(cfg.run.run_dir / "final.pt")
    copy = tmp_path / "copy"
    shutil.copytree(units, copy)
    assert study.lm_differences(summary, study._lm_config("renamed", copy, tmp_path / "b", settings)) == ([], [])
    # an LM trained before model.activation existed was trained with its default: reused unless the study moves it
    older = {**summary, "config": {**summary["config"], "model": {
        key: value for key, value in summary["config"]["model"].items() if key != "activation"}}}
    assert study.lm_differences(older, study._lm_config("phone oracle", units, tmp_path / "a", settings)) == ([], [])
    relu = study.StudySettings(lm_overrides=(*TINY_LM, 'model.activation="relu"'))
    assert study.lm_differences(older, study._lm_config("phone oracle", units, tmp_path / "a", relu)) == \
        (["model.activation: (not recorded) → 'relu'"], [])
    # how often it logs, saves, validates, and how much it validates: not what it trains
    bookkeeping = study.StudySettings(lm_overrides=(*TINY_LM, "run.log_interval=7", "run.save_interval=3",
                                                    "run.keep_latest=5", "run.validate_interval=9",
                                                    "data.max_valid_tokens=100"))
    assert study.lm_differences(summary, study._lm_config("phone oracle", units, tmp_path / "a", bookkeeping)) == \
        ([], [])
    other = study.StudySettings(lm_overrides=(*TINY_LM, "model.dim=12"))
    assert study.lm_differences(summary, study._lm_config("phone oracle", units, tmp_path / "a", other)) == \
        (["model.dim: 8 → 12"], [])
    # the phone bigram is fitted by counting: the LSTMs' settings (a smaller context, another budget) are not its
    bigram_overrides = ('model.arch="ngram"', "model.ngram_order=2")
    bigram = study._lm_config("phone bigram", units, tmp_path / "a", settings, bigram_overrides)
    assert train_lm(bigram) == "completed"
    fitted = lm_checkpoint_summary(bigram.run.run_dir / "final.pt")
    smaller = study.StudySettings(lm_overrides=(*TINY_LM, "model.context=4", "optimizer.max_steps=7"))
    assert study.lm_differences(fitted, study._lm_config("phone bigram", units, tmp_path / "a", smaller,
                                                         bigram_overrides)) == ([], [])
    add_k = study.StudySettings(lm_overrides=(*TINY_LM, "model.ngram_add_k=0.5"))
    assert study.lm_differences(fitted, study._lm_config("phone bigram", units, tmp_path / "a", add_k,
                                                         bigram_overrides)) == (["model.ngram_add_k: 0.1 → 0.5"], [])
    (copy / "train.jsonl").write_text("".join((units / "train.jsonl").read_text().splitlines(True)[:-1]))
    config, data = study.lm_differences(summary, study._lm_config("phone oracle", copy, tmp_path / "a", settings))
    assert config == []
    assert [line.split(":")[0] for line in data] == ["train_fingerprint", "train_utterances"]


def test_units_and_lms_of_an_earlier_benchmark_are_not_reused(tmp_path, monkeypatch):
    """OUT/bench deleted and made again with other settings: the units (a cache) are made again from it; an LM
    trained (or, killed, being trained) on the old units is refused by lm-study, naming each (a trained LM is not
    deleted behind the user's back), and trained again by the demo (whose study folder is a cache)."""
    out = tmp_path / "st3"
    _study(monkeypatch, out, 14)
    oracle_final = out / "lms" / "phone-oracle" / "final.pt"
    oracle_final.unlink()  # as if killed while training: its step_0.pt tells what it trains on
    before = (oracle_final.parent / "step_0.pt").read_bytes()
    with pytest.raises(ValueError, match=r"lms/phone-oracle was trained on other units than .*units/oracle/train\."
                                         r"jsonl holds now \(.*train_fingerprint.*; .*lms/phone-bigram was trained "
                                         r"on other units.*: delete them to train again, or give the study another "
                                         r"--out"):
        _study(monkeypatch, out, 20)
    assert len((out / "units" / "oracle" / "train.jsonl").read_text().splitlines()) == 20
    assert (oracle_final.parent / "step_0.pt").read_bytes() == before
    _study(monkeypatch, out, 20, rebuild_stale=True)
    info = torch.load(oracle_final, weights_only=True)["lm"]
    assert info["train_utterances"] + info["valid_utterances"] == 20


def test_a_model_s_units_of_another_benchmark_are_made_again(tmp_path, monkeypatch):
    """Units are a cache the same weights give again: made again for a remade benchmark, even by lm-study, with no
    set of the old benchmark left behind; the LMs are left to ``_check_trained_lms``."""
    from spidr.config import SpidRConfig
    from spidr.models.build import build_model
    from train_fixtures import EXTRACTION_MODEL

    writes = []

    def fake_write(model, bench_dir, out_dir, *, layers, centroids=None, dtype="float32"):
        writes.append(Path(bench_dir))
        (Path(out_dir) / "layer_02").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(study, "write_model_units", fake_write)
    torch.manual_seed(0)
    model = study.StudyModel("tiny", build_model(SpidRConfig(**EXTRACTION_MODEL)).eval(), (2,))
    model_dir, lm_dir = tmp_path / "units" / "tiny", tmp_path / "lms" / "tiny-l2"
    settings = study.StudySettings()
    study._model_units(model, _bench(tmp_path / "bench", 14), model_dir, tmp_path, settings)
    study._model_units(model, _bench(tmp_path / "bench", 14), model_dir, tmp_path, settings)
    assert len(writes) == 1
    (model_dir / "layer_02" / "lexical_seen").mkdir()  # a set the new benchmark does not have
    lm_dir.mkdir(parents=True)
    study._model_units(model, _bench(tmp_path / "bench", 20), model_dir, tmp_path, settings)
    assert len(writes) == 2
    assert not (model_dir / "layer_02" / "lexical_seen").exists()
    assert lm_dir.is_dir()
    assert json.loads((model_dir / ".complete").read_text())["bench"]["counts"] == {"train": {"utterances": 20}}


def test_a_kill_while_the_oracle_units_are_copied_is_repaired(tmp_path, monkeypatch):
    """A folder left by a kill (here: the training set's file only, copied by a spidr without a marker) is copied
    again, every set scored; a kill during the copy leaves no oracle folder to be taken as complete."""
    out = tmp_path / "out"
    bench = _bench(out / "bench", 14)
    (out / "units" / "oracle").mkdir(parents=True)
    shutil.copyfile(bench.train_dir / "frame_labels_20ms.jsonl", out / "units" / "oracle" / "train.jsonl")
    scored = _study(monkeypatch, out, 14)
    assert scored["phone oracle"] == [("lexical", "dev")]

    def killed(bench_dir, target):
        (Path(target)).mkdir(parents=True)
        shutil.copyfile(Path(bench_dir) / "train" / "frame_labels_20ms.jsonl", Path(target) / "train.jsonl")
        raise KeyboardInterrupt

    oracle = tmp_path / "again" / "oracle"
    monkeypatch.setattr(study, "write_oracle_units", killed)
    with pytest.raises(KeyboardInterrupt):
        study._oracle_units(bench, oracle)
    assert not oracle.exists()
    monkeypatch.undo()
    study._oracle_units(bench, oracle)
    assert sorted(p.relative_to(oracle).as_posix() for p in oracle.rglob("*.jsonl")) == ["lexical/dev.jsonl",
                                                                                         "train.jsonl"]


def test_layers_without_a_codebook_head_are_refused_before_the_study(tmp_path, monkeypatch, capsys):
    """Codebook units come from the heads only: a layer without one is refused by the command, before the benchmark
    is synthesised; with --kmeans any layer goes."""
    from spidr.config import SpidRConfig
    from spidr.models.build import build_model
    from spidr.models.loading import export_safetensors
    from train_fixtures import EXTRACTION_MODEL

    export_safetensors(build_model(SpidRConfig(**EXTRACTION_MODEL)), tmp_path / "tiny.safetensors")
    runs = []
    monkeypatch.setattr(study, "run_study", lambda models, out, settings: runs.append(
        [m.layers for m in models]) or Path(tmp_path / "report.md"))
    (tmp_path / "report.md").write_text("report\n")
    args = ["lm-study", "--checkpoint", f"tiny={tmp_path / 'tiny.safetensors'}", "--out", str(tmp_path / "st")]
    assert main([*args, "--layers", "1-2"]) == 2
    assert (f"--layers 1-2: layer(s) [1] of checkpoint {tmp_path / 'tiny.safetensors'} have no codebook head "
            "(heads: [2, 3]); choose head layers, or pass --kmeans K for k-means units") in capsys.readouterr().err
    assert runs == []
    assert main([*args, "--layers", "1-2", "--kmeans", "4"]) == 0
    assert main(args) == 0
    assert runs == [[(1, 2)], [(2, 3)]]


def test_the_help_and_the_documented_lm_study_commands(capsys):
    """The help says what the units are; every ``spidr lm-study`` command in docs/spoken-lm.md parses."""
    with pytest.raises(SystemExit):
        main(["lm-study", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "codebook units of every layer" not in help_text
    assert "default every layer with a codebook head" in help_text
    assert "k-means units with --kmeans" in help_text
    docs = (Path(__file__).parents[1] / "docs" / "spoken-lm.md").read_text()
    commands = [" ".join(c.split()) for c in re.findall(r"`(spidr lm-study [^`]*)`", docs)]
    assert len(commands) >= 2
    for command in commands:
        if "--checkpoint" in command:  # a full command, not a mention of some of its options
            argv = shlex.split(command.replace("<", "'<").replace(">", ">'"))[1:]
            assert build_parser().parse_args(argv).out, command


def test_an_lm_of_another_config_is_refused_before_any_model_units_are_made(tmp_path, monkeypatch):
    """A refusal that only needs the configs comes before every model's unit extraction (minutes on a real study),
    not after it."""
    from spidr.config import SpidRConfig
    from spidr.models.build import build_model
    from train_fixtures import EXTRACTION_MODEL

    out = tmp_path / "out"
    _study(monkeypatch, out, 14)  # the oracle and bigram LMs, trained
    torch.manual_seed(0)
    model = study.StudyModel("tiny", build_model(SpidRConfig(**EXTRACTION_MODEL)).eval(), (2,))
    monkeypatch.setattr(study, "_model_units", lambda *args: pytest.fail("model units made before the refusal"))
    with pytest.raises(ValueError, match=r"phone-oracle was trained with another config \(model\.dim: 8 → 12"):
        study.run_study([model], out, study.StudySettings(lm_overrides=(*TINY_LM, "model.dim=12")))


def test_unit_quality_of_a_model_at_another_frame_rate_uses_labels_at_a_matching_rate(tmp_path):
    """A 100 Hz model (configs/tiny.toml's front end) failed after training its LMs: 50 Hz labels cannot be
    matched to 100 Hz units. Units equal to the phone ids score PNMI 1 at 100 Hz as at 50 Hz; 25 Hz units (every
    other 20 ms label, the labels random per frame) are scored too."""
    bench = _bench(tmp_path / "bench", 3)
    index = {phone: i for i, phone in enumerate(PHONES)}
    rows20 = [json.loads(line) for line in (bench.train_dir / "frame_labels_20ms.jsonl").read_text().splitlines()]
    tsv = ["utterance\tonset\toffset\tphone"]
    rows10 = []
    for row in rows20:
        rows10.append({"name": row["name"], "phones": [p for p in row["phones"] for _ in range(2)]})
        tsv += [f"{row['name']}\t{0.02 * i:.2f}\t{0.02 * (i + 1):.2f}\t{p}" for i, p in enumerate(row["phones"])]
    (bench.train_dir / "alignments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows10))
    (bench.train_dir / "alignments.tsv").write_text("\n".join(tsv) + "\n")
    for rate, units_of in ((100, lambda phones: [index[p] for p in phones for _ in range(2)]),
                           (25, lambda phones: [index[p] for p in phones[::2]]),
                           (50, lambda phones: [index[p] for p in phones])):
        units = tmp_path / f"units{rate}"
        units.mkdir()
        (units / "train.jsonl").write_text("".join(json.dumps({"name": r["name"], "units": units_of(r["phones"])})
                                                   + "\n" for r in rows20))
        quality = study.measure_quality(units, bench, num_units=len(PHONES), unit_rate_hz=rate)
        assert quality["pnmi"] > 0.99 if rate != 25 else 0.0 < quality["pnmi"] < 1.0, rate


def test_too_little_training_data_is_refused_before_any_lm_trains(tmp_path, monkeypatch):
    """One training utterance of 30 phones is less than one window of context 256 + 1: the oracle's refusal came
    after the bigram was fitted, and the rerun with a smaller context was then told to delete it."""
    monkeypatch.setattr(study, "_benchmark", lambda out_dir, settings: _bench(out_dir / "bench", 1))
    settings = study.StudySettings(lm_overrides=tuple(o for o in TINY_LM if not o.startswith("model.context")))
    with pytest.raises(ValueError, match=r"fewer tokens than one window of model\.context \+ 1 = 257 \(phone oracle: "
                                         r"\d+\): lower model\.context"):
        study.run_study([], tmp_path / "out", settings)
    assert not list((tmp_path / "out").glob("lms/*/*.pt"))  # nothing trained


def test_an_lm_stopped_by_a_signal_stops_the_study_as_a_stop(tmp_path, monkeypatch):
    """An LM training stopped by a signal is not a failure of the study: the command line turns this exception into
    one line and `spidr lm-train`'s exit status 3 (tested with the demo and the learning curve)."""
    import spidr.lm.train
    from spidr.training_stopped import TrainingStoppedError

    monkeypatch.setattr(spidr.lm.train, "train_lm", lambda cfg: "interrupted")
    with pytest.raises(TrainingStoppedError, match=r"the training of the phone oracle LM \(\S+\) stopped on a signal "
                                                   "after saving a checkpoint; run the same command again"):
        _study(monkeypatch, tmp_path / "out", 40)


def _six_utterance_bench(out_dir, settings):
    """A stand-in for the study's benchmark synthesis: six training utterances' phone labels and an info.json."""
    from spidr.corpus.lm_bench import INFO_JSON, LmBenchInfo, LmBenchSettings, bench_parameters

    folder = out_dir / "bench" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"name": f"t{i}", "phones": ["AA", "B", "D", "IY"] * 8} for i in range(6)]
    (folder / "frame_labels_20ms.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"parameters": bench_parameters(LmBenchSettings(train_utterances=6)), "counts": {"train": {}}}
    (out_dir / "bench" / INFO_JSON).write_text(json.dumps(info))
    return LmBenchInfo.load(out_dir / "bench")


def test_study_correlations_pair_each_rows_own_values():
    """mut study-corr-unpaired. Truth: the study's rows include the oracle, untrained and bigram rows, which have LM
    accuracies but no unit quality; the correlation is over the (model, layer) rows only: x = 1, 2, 3, 4 and
    y = 10 x give r = ρ = 1 exactly."""
    from spidr.lm.study import correlations

    rows = [{"name": "phone oracle", "pnmi": None, "swuggy_invocab": 99.0},
            {"name": "bigram", "pnmi": None, "swuggy_invocab": 50.0}]
    rows += [{"name": f"m L{i}", "pnmi": float(i), "swuggy_invocab": 10.0 * i} for i in (1, 2, 3, 4)]
    (result,) = [c for c in correlations(rows) if (c["x"], c["y"]) == ("pnmi", "swuggy_invocab")]
    assert result["n"] == 4
    assert result["pearson_r"] == pytest.approx(1.0)
    assert result["spearman_rho"] == pytest.approx(1.0)


def _run_fake_study(tmp_path, monkeypatch, *, layers=(1, 3), kmeans=0):
    """run_study with two layers of one model, units written by hand (layer L's units all equal L), training and
    scoring recorded instead of run."""

    from spidr.lm import study

    def model_units(study_model, bench_info, model_dir, out_dir, settings):
        for layer in study_model.layers:
            folder = model_dir / f"layer_{layer:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "train.jsonl").write_text("".join(
                json.dumps({"name": f"t{i}", "units": [layer, layer + 1] * 20}) + "\n" for i in range(6)))
        return model_dir

    trained, scored = {}, {}

    def train(name, cfg):
        trained[name] = cfg
        return cfg.run.run_dir

    def score(name, checkpoint, units_dir, out_dir, *, bench, settings):
        scored[name] = units_dir
        return {}

    monkeypatch.setattr(study, "_benchmark", _six_utterance_bench)
    monkeypatch.setattr(study, "_model_units", model_units)
    monkeypatch.setattr(study, "_cached_feature_abx", lambda *a, **k: {})
    monkeypatch.setattr(study, "_train", train)
    monkeypatch.setattr(study, "_score", score)
    monkeypatch.setattr(study, "_untrained_row", lambda *a, **k: {"name": "untrained"})
    monkeypatch.setattr(study, "write_study_report", lambda rows, out_dir, bench, **k: out_dir / "spoken_lm.md")
    model = SimpleNamespace(cfg=SimpleNamespace(codebook_size=16))
    quality = {layer: {"pnmi": 0.1 * layer} for layer in layers}
    study.run_study([study.StudyModel("m", model, tuple(layers), quality)], tmp_path / "out",
                    study.StudySettings(lm_overrides=("model.context=4",), kmeans=kmeans))
    return trained, scored


def test_each_layers_lm_trains_and_scores_on_that_layers_units(tmp_path, monkeypatch):
    """mut study-first-layer-units. Truth: 'one LM per units source ... every (model, layer)' (study docstring):
    the LM named 'm L3' reads units/m/layer_03, whose units (written here) are 3s and 4s."""
    trained, scored = _run_fake_study(tmp_path, monkeypatch)
    for layer in (1, 3):
        name = f"m L{layer}"
        units_dir = tmp_path / "out" / "units" / "m" / f"layer_{layer:02d}"
        assert Path(trained[name].data.train) == units_dir / "train.jsonl"
        assert scored[name] == units_dir
        units = {u for line in Path(trained[name].data.train).read_text().splitlines()
                 for u in json.loads(line)["units"]}
        assert units == {layer, layer + 1}


def test_kmeans_study_lms_have_k_units(tmp_path, monkeypatch):
    """mut study-kmeans-vocab. Truth: with --kmeans K the units are k-means indices 0..K-1, so each layer LM's
    vocabulary is K (the study's comment: 'The LM's vocabulary is the unit inventory'), not the codebook size."""
    trained, _ = _run_fake_study(tmp_path, monkeypatch, kmeans=8)
    assert {trained[f"m L{layer}"].data.num_units for layer in (1, 3)} == {8}



def test_a_checkpoint_path_holding_an_equals_sign_is_read_whole_or_after_its_name(tmp_path, monkeypatch):
    """lm-study split --checkpoint [NAME=]CKPT at the last '=', so a sweep folder such as runs/lr=1e-4/final.pt
    could not be given at all, with or without a name."""
    from spidr.lm.commands import _named_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "lr=1e-4").mkdir(parents=True)
    (tmp_path / "runs" / "lr=1e-4" / "final.pt").write_bytes(b"")
    assert _named_checkpoint("runs/lr=1e-4/final.pt") == ("", "runs/lr=1e-4/final.pt")
    assert _named_checkpoint("base=runs/lr=1e-4/final.pt") == ("base", "runs/lr=1e-4/final.pt")
    assert _named_checkpoint("base=runs/x.pt") == ("base", "runs/x.pt")
    assert _named_checkpoint("runs/x.pt") == ("", "runs/x.pt")


def test_stale_units_of_layers_past_99_take_their_lms_with_them(tmp_path, monkeypatch):
    """Truth (an LM trained on units/<model>/layer_<L> is lms/<model>-l<L>, as above for layer 2): units made with
    other weights name, and with rebuild_stale delete, the LMs of every layer folder there, layer 100 included, and
    an LM of no such layer stays. A folder the study never writes there (a user's layer_02.bak) stops it before
    anything is deleted: the units folder is made again whole."""
    monkeypatch.setattr(study, "units_identity", lambda *args: {"model": "new weights"})
    monkeypatch.setattr(study, "write_model_units", lambda model, bench_dir, out_dir, **kwargs: out_dir.mkdir())
    model = SimpleNamespace(name="tiny", model=None, layers=(2, 100))
    bench = SimpleNamespace(out_dir=tmp_path / "bench")  # (only handed to the stubbed writer)
    model_dir = tmp_path / "units" / "tiny"
    for folder in ("layer_02", "layer_100"):
        (model_dir / folder).mkdir(parents=True)
    (model_dir / ".complete").write_text(json.dumps({"model": "old weights"}))
    lms = {name: tmp_path / "lms" / name for name in ("tiny-l2", "tiny-l100", "tiny-l3")}
    for lm_dir in lms.values():
        lm_dir.mkdir(parents=True)
    with pytest.raises(ValueError, match="made with other model") as refusal:
        study._model_units(model, bench, model_dir, tmp_path, study.StudySettings())
    assert str(lms["tiny-l2"]) in str(refusal.value)
    assert str(lms["tiny-l100"]) in str(refusal.value)
    assert str(lms["tiny-l3"]) not in str(refusal.value)
    (model_dir / "layer_02.bak").mkdir()
    with pytest.raises(ValueError, match=r"tiny holds layer_02\.bak, which the study did not write"):
        study._model_units(model, bench, model_dir, tmp_path, study.StudySettings(rebuild_stale=True))
    assert sorted(path.name for path in (tmp_path / "lms").iterdir()) == sorted(lms)  # nothing deleted
    assert sorted(path.name for path in model_dir.iterdir()) == [".complete", "layer_02", "layer_02.bak", "layer_100"]
    (model_dir / "layer_02.bak").rmdir()
    study._model_units(model, bench, model_dir, tmp_path, study.StudySettings(rebuild_stale=True))
    assert sorted(path.name for path in (tmp_path / "lms").iterdir()) == ["tiny-l3"]


def test_a_units_folder_holding_the_user_s_files_is_refused_not_deleted(tmp_path):
    """lm-study --out on a folder of one's own deleted the files in its units/oracle (and units/<model>) to make
    them again; such a folder is now refused, naming what the study did not write, and left as it was."""
    bench = _bench(tmp_path / "bench", 14)
    oracle = tmp_path / "units" / "oracle"
    oracle.mkdir(parents=True)
    (oracle / "notes.txt").write_text("mine")
    (oracle / "lexical").mkdir()  # a folder the study writes there: not in the way
    with pytest.raises(ValueError, match=r"oracle holds notes\.txt, which the study did not write"):
        study._oracle_units(bench, oracle)
    assert (oracle / "notes.txt").read_text() == "mine"
    (oracle / "notes.txt").unlink()
    assert study._oracle_units(bench, oracle) == oracle  # its own folders are made again
    assert (oracle / "lexical" / "dev.jsonl").is_file()
    # what the study leaves there itself is no stranger: an earlier benchmark's task (the benchmark made again
    # without it, as the refusal of a changed benchmark advises), and a temporary that a kill left behind
    (oracle / ".copied").write_text("{}")
    (oracle / "lexical_seen").mkdir()
    (oracle / "..copied.0123abcd.partial").write_text("")
    assert study._oracle_units(bench, oracle) == oracle
    assert not (oracle / "lexical_seen").exists()


def test_an_ngram_lm_fitted_before_loss_targets_were_recorded_is_reused_and_a_neural_one_is_not(tmp_path):
    """Counts have no loss: an n-gram LM whose checkpoint records no loss targets (every one fitted before they
    were recorded) is the same model fitted now, where a neural LM then also scored the BOS after each EOS.
    Truth: a state holding exactly the config the study would train, nothing else recorded."""
    settings = study.StudySettings(lm_overrides=TINY_LM)
    units = tmp_path / "units"
    bigram = study._lm_config("phone bigram", units, tmp_path / "a", settings, ('model.arch="ngram"',
                                                                                "model.ngram_order=2"))
    assert study.lm_differences({"config": bigram.to_dict()}, bigram, data=False) == ([], [])
    lstm = study._lm_config("phone oracle", units, tmp_path / "a", settings)
    config, _ = study.lm_differences({"config": lstm.to_dict()}, lstm, data=False)
    assert config == ["loss targets: 'units, EOS and the BOS after each EOS' → 'units and EOS'"]


def test_oracle_units_a_killed_units_writer_left_unfinished_are_written_again_not_refused(tmp_path):
    """`spidr lm-units --oracle` (or an earlier study) killed while writing units/oracle leaves its in-progress
    marker there: a file the study's own writer makes, so the folder is written again rather than refused as
    holding the user's files. Truth: the benchmark's training utterances (14) in the rewritten train.jsonl."""
    from spidr.lm.bench_units import IN_PROGRESS

    bench = _bench(tmp_path / "bench", 14)
    oracle = tmp_path / "units" / "oracle"
    oracle.mkdir(parents=True)
    (oracle / "train.jsonl").write_text('{"name": "half", "units": [1]}\n')
    (oracle / IN_PROGRESS).write_text("")
    assert study._oracle_units(bench, oracle) == oracle
    assert len((oracle / "train.jsonl").read_text().splitlines()) == 14
    assert not (oracle / IN_PROGRESS).exists()


def test_a_second_study_in_the_same_folder_is_refused_while_the_first_runs(tmp_path, monkeypatch):
    """Two studies in one folder each made an unfinished model's units folder again, deleting what the other was
    writing (it died on its vanished temporary file) and leaving a folder every rerun refused. The second start, made
    here while the first is at its first stage, must be refused at once, naming the first; the first goes on."""
    import os

    second_start = []

    def first_stage(out_dir, settings):
        if not second_start:
            with pytest.raises(ValueError, match="is being run by") as refused:
                second_start.append(study.run_study([study.StudyModel("m", torch.nn.Identity(), (1,))], out_dir,
                                                    settings))
            second_start.append(str(refused.value))
        raise KeyboardInterrupt  # (the first study ends here: the lock is what is under test)

    monkeypatch.setattr(study, "_benchmark", first_stage)
    with pytest.raises(KeyboardInterrupt):
        study.run_study([study.StudyModel("m", torch.nn.Identity(), (1,))], tmp_path / "out", study.StudySettings())
    assert second_start == [f"the spoken-LM study in {tmp_path / 'out'} is being run by process {os.getpid()} "
                            f"({tmp_path / 'out' / '.lock'} is locked); let it finish or stop it, then run this again"]
    assert not (tmp_path / "out").exists()  # made for the study, left with nothing in it: gone


def test_study_correlation_line_regresses_the_lm_metric_on_the_quality_metric():
    """mut st-corr-xy-swap. Truth: points on y = 10 x + 5 (x = PNMI, y = sWUGGY) give the line the report and its
    plots draw: slope 10, intercept 5 (the regression of y on x; x on y would be 0.1 and -0.5)."""
    from spidr.lm.study import correlations

    rows = [{"name": f"m L{i}", "pnmi": float(i), "swuggy_invocab": 10.0 * i + 5.0} for i in (1, 2, 3, 5)]
    (result,) = [c for c in correlations(rows) if (c["x"], c["y"]) == ("pnmi", "swuggy_invocab")]
    assert result["slope"] == pytest.approx(10.0)
    assert result["intercept"] == pytest.approx(5.0)


def test_a_study_of_the_test_split_evaluates_the_test_split(tmp_path, monkeypatch):
    """mut st-score-kind-dev. Truth: lm-study --kind test (StudySettings.kind) must score the test gold files:
    evaluate_benchmark gets kind='test'."""
    from spidr.lm import evaluate, score, study

    seen = {}
    monkeypatch.setattr(score, "score_benchmark", lambda *a, **k: {})
    monkeypatch.setattr(score, "find_unit_files", lambda units_dir: {})
    monkeypatch.setattr(evaluate, "evaluate_benchmark",
                        lambda bench, sub, *, kind, out_dir: seen.setdefault("kind", kind) and {})
    study._score("m L1", tmp_path / "final.pt", tmp_path / "units", tmp_path / "out",
                 bench=SimpleNamespace(out_dir=tmp_path / "bench"), settings=study.StudySettings(kind="test"))
    assert seen["kind"] == "test"


def test_unit_abx_of_the_test_split_reads_the_test_units(tmp_path, monkeypatch):
    """mut st-unitabx-devfile. Truth: with kind 'test' the unit ABX reads the items of syntactic/test and the units
    of UNITS_DIR/syntactic/test.jsonl (the dev units would be scored against the test items)."""
    import spidr.eval.items as items_mod
    import spidr.eval.unit_quality as uq
    import spidr.eval.units as units_mod
    from spidr.lm import study

    read = []
    monkeypatch.setattr(units_mod, "read_units", lambda path: read.append(Path(path).relative_to(tmp_path)) or {})
    monkeypatch.setattr(uq, "read_alignments", lambda *a, **k: {})
    monkeypatch.setattr(uq, "unit_quality", lambda *a, **k: {"pnmi": 0.5})
    monkeypatch.setattr(items_mod, "read_items", lambda path: Path(path).relative_to(tmp_path))
    monkeypatch.setattr(study, "_abx_within_across", lambda units, items, **k: {"unit_abx_across": str(items)})
    for kind in ("dev", "test"):
        (tmp_path / "bench" / "syntactic" / kind).mkdir(parents=True)
        (tmp_path / "bench" / "syntactic" / kind / "triphone.item").write_text("")
        (tmp_path / "units" / "syntactic").mkdir(parents=True, exist_ok=True)
        (tmp_path / "units" / "syntactic" / f"{kind}.jsonl").write_text("")
    bench = SimpleNamespace(train_dir=tmp_path / "bench" / "train",
                            task_dir=lambda task, kind: tmp_path / "bench" / task / kind)
    out = study.measure_quality(tmp_path / "units", bench, num_units=4, kind="test")
    assert out["unit_abx_across"] == str(Path("bench/syntactic/test/triphone.item"))
    assert read == [Path("units/train.jsonl"), Path("units/syntactic/test.jsonl")]


def test_the_untrained_row_is_the_mean_over_its_seeds_and_its_range(tmp_path, monkeypatch):
    """mut st-untrained-first. Truth: the untrained row's accuracy is the mean of its UNTRAINED_SEEDS
    initialisations, its interval their [min, max]: seeds scoring 40, 50, 60, 70, 80 on tsc give 60 in [40, 80]."""
    from spidr.lm import study

    monkeypatch.setattr(study, "write_untrained", lambda src, out, *, seed: out)
    values = iter([40.0, 50.0, 60.0, 70.0, 80.0])
    monkeypatch.setattr(study, "_score", lambda *a, **k: {"tsc": next(values)})
    assert study.UNTRAINED_SEEDS == 5
    row = study._untrained_row(tmp_path, tmp_path, tmp_path, bench=None, settings=study.StudySettings())
    assert row["tsc"] == pytest.approx(60.0)
    assert row["tsc_ci95"] == [40.0, 80.0]


def test_a_layer_row_carries_lm_eval_s_intervals_into_the_study_table(tmp_path):
    """mut st-row-ci-of-details. Truth: spoken_lm.md's text 'Accuracies in %, with 95 % bootstrap intervals over
    pairs': the interval is lm-eval's own (details → accuracy → ci95, in %), rounded outwards in the table."""
    from spidr.lm.study import _row, markdown

    details = {"lexical": {"accuracy": {
        "swuggy_all": {"score": 60.0, "n": 40, "ci95": [55.2, 64.8], "p_value": 0.2},
        "swuggy_invocab": {"score": 70.0, "n": 30, "ci95": [62.5, 77.1], "p_value": 0.01}}}}
    row = _row("m L1", "m", 1, {"swuggy_all": 60.0, "swuggy_invocab": 70.0, "details": details}, {"pnmi": 0.5})
    assert row["swuggy_all_ci95"] == [55.2, 64.8]
    assert (row["swuggy_invocab_n"], row["swuggy_invocab_p"]) == (30, 0.01)
    text = markdown([row], [], _bench_info(tmp_path), "dev", "given")
    assert "| m L1 | – | – | 0.500 | 60.0 [55–65] | 70.0 [62–78] | – | – |" in text.splitlines()




def _bench_info(tmp_path):
    from spidr.corpus.lm_bench import LmBenchInfo

    return LmBenchInfo(tmp_path, {"test_voices": ["v"]}, {"train": {"hours": 1.0}})


def test_study_correlates_three_points():
    """mut st-corr-min4. Truth: correlations' docstring: 'over the rows that have both (≥ 3 points)'."""
    from spidr.lm.study import correlations

    rows = [{"name": f"m L{i}", "pnmi": float(i), "swuggy_invocab": 10.0 * i} for i in (1, 2, 4)]
    (result,) = [c for c in correlations(rows) if (c["x"], c["y"]) == ("pnmi", "swuggy_invocab")]
    assert result["n"] == 3
    assert result["pearson_r"] == pytest.approx(1.0)


def test_a_quality_of_zero_is_a_point_of_the_correlation_and_of_points_csv(tmp_path):
    """muts st-corr-truthy, st-points-falsy. Truth: a PNMI of 0 (a one-unit code) or an ABX of 0 % is a measured
    value, not a missing one (only None is: the baseline rows). x = 0, 1, 2, 3 and y = 10 x + 5: n = 4, r = 1, and
    points.csv holds the 0.0."""
    from spidr.lm.study import correlations, write_study_report

    rows = [{"name": "phone oracle", "model": "oracle", "layer": None, "pnmi": None, "swuggy_invocab": 99.0}]
    rows += [{"name": f"m L{i}", "model": "m", "layer": i, "pnmi": float(i), "swuggy_invocab": 10.0 * i + 5.0}
             for i in (0, 1, 2, 3)]
    (result,) = [c for c in correlations(rows) if (c["x"], c["y"]) == ("pnmi", "swuggy_invocab")]
    assert result["n"] == 4
    assert result["pearson_r"] == pytest.approx(1.0)
    write_study_report(rows, tmp_path, _bench_info(tmp_path))
    with (tmp_path / "points.csv").open(newline="") as handle:
        written = {row["name"]: row for row in csv.DictReader(handle)}
    assert float(written["m L0"]["pnmi"]) == 0.0
    assert written["phone oracle"]["pnmi"] == ""


def test_the_untrained_rows_initialisations_are_all_different(tmp_path, monkeypatch):
    """mut st-untrained-one-seed. Truth: the untrained row 'averages UNTRAINED_SEEDS random initialisations' and
    its brackets give their range: each copy must be written with a seed of its own."""
    from spidr.lm import study

    seeds = []
    monkeypatch.setattr(study, "write_untrained", lambda src, out, *, seed: seeds.append(seed) or out)
    monkeypatch.setattr(study, "_score", lambda *a, **k: {"tsc": 50.0})
    study._untrained_row(tmp_path, tmp_path, tmp_path, bench=None, settings=study.StudySettings())
    assert len(seeds) == study.UNTRAINED_SEEDS
    assert len(set(seeds)) == study.UNTRAINED_SEEDS


def _measured_study(tmp_path, monkeypatch, *, kmeans=0):
    """run_study with one model of layers 1 and 3 whose quality is not given (so measured), everything costly
    recorded instead of run; returns (the rows the report gets, measure_quality's calls)."""
    from spidr.lm import study
    from spidr.models.frames import DEFAULT_CONV_LAYERS

    def model_units(study_model, bench_info, model_dir, out_dir, settings):
        for layer in study_model.layers:
            (model_dir / f"layer_{layer:02d}").mkdir(parents=True, exist_ok=True)
            (model_dir / f"layer_{layer:02d}" / "train.jsonl").write_text("".join(
                json.dumps({"name": f"t{i}", "units": [layer, layer + 1] * 20}) + "\n" for i in range(6)))
        return model_dir

    measured, reported = [], []

    def measure_quality(units_dir, bench_info, *, num_units, kind, unit_rate_hz):
        layer = int(units_dir.name.removeprefix("layer_"))
        measured.append((layer, num_units, unit_rate_hz))
        return {"pnmi": 0.1 * layer, "unit_abx_across": 20.0 + layer}

    monkeypatch.setattr(study, "_benchmark", _six_utterance_bench)
    monkeypatch.setattr(study, "_model_units", model_units)
    monkeypatch.setattr(study, "_cached_feature_abx", lambda *a, **k: {
        layer: {"abx_within": float(layer), "abx_across": 10.0 + layer} for layer in (1, 3)})
    monkeypatch.setattr(study, "measure_quality", measure_quality)
    monkeypatch.setattr(study, "_train", lambda name, cfg: cfg.run.run_dir)
    monkeypatch.setattr(study, "_score", lambda *a, **k: {})
    monkeypatch.setattr(study, "_untrained_row", lambda *a, **k: {"name": "untrained"})
    monkeypatch.setattr(study, "write_study_report",
                        lambda rows, out_dir, bench, **k: reported.extend(rows) or out_dir / "spoken_lm.md")
    model = SimpleNamespace(cfg=SimpleNamespace(codebook_size=16, extractor_conv_layer_config=DEFAULT_CONV_LAYERS))
    study.run_study([study.StudyModel("m", model, (1, 3))], tmp_path / "out",
                    study.StudySettings(lm_overrides=("model.context=4",), kmeans=kmeans))
    return {row["name"]: row for row in reported}, measured


def test_each_layer_row_holds_its_own_layers_measured_quality(tmp_path, monkeypatch):
    """muts st-featabx-first-layer, st-quality-numunits-codebook. Truth: 'correlate LM accuracy with unit quality per
    (model, layer) — ABX of the layer's features, unit ABX and PNMI' (study docstring); with --kmeans K the units
    range over K values, so PNMI is measured with K units (the LM's vocabulary)."""
    rows, measured = _measured_study(tmp_path, monkeypatch, kmeans=8)
    for layer in (1, 3):
        row = rows[f"m L{layer}"]
        assert (row["abx_within"], row["abx_across"]) == (float(layer), 10.0 + layer)
        assert (row["pnmi"], row["unit_abx_across"]) == (pytest.approx(0.1 * layer), 20.0 + layer)
    assert sorted(measured) == [(1, 8, 50), (3, 8, 50)]


def test_feature_abx_kept_for_one_split_is_not_reported_for_the_other(tmp_path, monkeypatch):
    """mut st-featabx-cache-nokind. Truth: the feature ABX is measured 'on the benchmark's syntactic kind split'
    (measure_feature_abx): a study of the test split after one of the dev split must report the test split's ABX;
    a rerun of the same split reads it back without measuring again."""
    from spidr.lm import study

    model_dir = tmp_path / "units" / "m"
    model_dir.mkdir(parents=True)
    study_model = study.StudyModel("m", SimpleNamespace(), (1,))
    monkeypatch.setattr(study, "measure_feature_abx", lambda model, layers, bench, *, kind, dtype: {
        layer: {"abx_across": 10.0 if kind == "dev" else 20.0} for layer in layers})
    assert study._cached_feature_abx(study_model, model_dir, None, study.StudySettings(kind="dev")) == {
        1: {"abx_across": 10.0}}
    assert study._cached_feature_abx(study_model, model_dir, None, study.StudySettings(kind="test")) == {
        1: {"abx_across": 20.0}}
    monkeypatch.setattr(study, "measure_feature_abx", lambda *a, **k: pytest.fail("measured again"))
    assert study._cached_feature_abx(study_model, model_dir, None, study.StudySettings(kind="dev")) == {
        1: {"abx_across": 10.0}}


def _recording_abx(monkeypatch, calls):
    """abx_error_rate replaced by one that records its options and returns (the layer held by every frame) / 100,
    plus 0.5 across speakers."""
    from spidr.eval import abx

    def rate(features, items, *, speaker, context, distance, frequency):
        (value,) = {float(np.asarray(v).flat[0]) for v in features.values()}
        calls.append((value, speaker, context, distance, frequency))
        return value / 100 + (0.5 if speaker == "across" else 0.0)

    monkeypatch.setattr(abx, "abx_error_rate", rate)


def test_feature_abx_of_each_layer_is_its_features_angular_within_context_in_percent(tmp_path, monkeypatch):
    """muts st-featabx-layer0-features, st-featabx-euclidean, st-abx-context-any, st-abx-speaker-fixed,
    st-abx-not-percent. Truth: measure_feature_abx's docstring: 'ABX within / across speaker (triphone items,
    context within, angular DTW), in %, of each layer's features', at the model's frame rate (100 Hz here)."""
    from spidr.eval import features, items
    from spidr.lm import bench_units, study

    syntactic = tmp_path / "bench" / "syntactic" / "dev"
    syntactic.mkdir(parents=True)
    (syntactic / "triphone.item").write_text("")
    entries = [SimpleNamespace(fileid="a"), SimpleNamespace(fileid="b")]
    monkeypatch.setattr(bench_units, "split_entries", lambda folder: entries)
    monkeypatch.setattr(items, "read_items", lambda path: "items")

    def extracted(model, found, settings):
        for entry in found:
            yield entry, {f"layer_{layer:02d}": np.full((4, 2), float(layer)) for layer in settings.layers}

    monkeypatch.setattr(features, "iter_extracted", extracted)
    calls = []
    _recording_abx(monkeypatch, calls)
    model = SimpleNamespace(cfg=SimpleNamespace(extractor_conv_layer_config=CONV_100HZ))
    bench = SimpleNamespace(task_dir=lambda task, kind: tmp_path / "bench" / task / kind)
    out = study.measure_feature_abx(model, [1, 3], bench)
    assert out == {1: {"abx_within": pytest.approx(1.0), "abx_across": pytest.approx(51.0)},
                   3: {"abx_within": pytest.approx(3.0), "abx_across": pytest.approx(53.0)}}
    assert sorted(calls) == [(1.0, "across", "within", "angular", 100), (1.0, "within", "within", "angular", 100),
                             (3.0, "across", "within", "angular", 100), (3.0, "within", "within", "angular", 100)]


def test_unit_abx_is_measured_at_the_units_rate(tmp_path, monkeypatch):
    """mut st-unitabx-freq50. Truth: measure_quality's unit_rate_hz is the units' frame rate (a 100 Hz model's units
    are 10 ms apart); the triphone items' times are turned into frames at that rate."""
    import spidr.eval.items as items_mod
    import spidr.eval.units as units_mod
    from spidr.eval import unit_quality
    from spidr.lm import study

    monkeypatch.setattr(units_mod, "read_units", lambda path: {"a": [7, 7]})
    monkeypatch.setattr(unit_quality, "read_alignments", lambda *a, **k: {})
    monkeypatch.setattr(unit_quality, "unit_quality", lambda *a, **k: {"pnmi": 0.5})
    monkeypatch.setattr(items_mod, "read_items", lambda path: "items")
    calls = []
    _recording_abx(monkeypatch, calls)
    (tmp_path / "bench" / "syntactic" / "dev").mkdir(parents=True)
    (tmp_path / "bench" / "syntactic" / "dev" / "triphone.item").write_text("")
    (tmp_path / "units" / "syntactic").mkdir(parents=True)
    (tmp_path / "units" / "syntactic" / "dev.jsonl").write_text("")
    bench = SimpleNamespace(train_dir=tmp_path / "bench" / "train",
                            task_dir=lambda task, kind: tmp_path / "bench" / task / kind)
    out = study.measure_quality(tmp_path / "units", bench, num_units=8, unit_rate_hz=100)
    assert out == {"pnmi": 0.5, "unit_abx_within": pytest.approx(7.0), "unit_abx_across": pytest.approx(57.0)}
    assert sorted(calls) == [(7.0, "across", "within", "identical", 100), (7.0, "within", "within", "identical", 100)]


def test_the_study_table_shows_each_metric_in_its_own_column(tmp_path):
    """muts st-md-abx-within, st-md-invocab-all. Truth: the header '| units | ABX across % | unit ABX across % |
    PNMI | sWUGGY all % | sWUGGY in-vocab % | sBLIMP % | tSC % |'; each value differs from the others here."""
    from spidr.lm.study import markdown

    rows = [{"name": "m L1", "abx_within": 5.0, "abx_across": 9.0, "unit_abx_within": 18.0, "unit_abx_across": 20.0,
             "pnmi": 0.5, "swuggy_all": 60.0, "swuggy_invocab": 70.0, "sblimp": 55.0, "tsc": 52.0}]
    text = markdown(rows, [], _bench_info(tmp_path), "dev", "given")
    assert "| m L1 | 9.0 | 20.0 | 0.500 | 60.0 | 70.0 | 55.0 | 52.0 |" in text.splitlines()


def test_units_of_a_kmeans_study_are_not_those_of_a_codebook_study(monkeypatch):
    """mut st-uid-no-kmeans. Truth: units_identity: 'how units were extracted' (codebook units and K-means units
    of one model are different units): a study with --kmeans must not reuse a codebook study's units folder."""
    from spidr.eval import journal
    from spidr.lm import study

    monkeypatch.setattr(journal, "model_fingerprint", lambda model: "weights")
    model = study.StudyModel("m", SimpleNamespace(), (1,))
    bench = SimpleNamespace(parameters={}, counts={})
    assert (study.units_identity(model, study.StudySettings(kmeans=8), bench)
            != study.units_identity(model, study.StudySettings(), bench))
    assert (study.units_identity(model, study.StudySettings(kmeans=8), bench)
            != study.units_identity(model, study.StudySettings(kmeans=16), bench))


def test_a_kmeans_study_fits_centroids_for_every_layer(tmp_path, monkeypatch):
    """mut st-kmeans-fit-first-layer. Truth: StudySettings.kmeans: 'this many centroids per layer fitted on the
    training set (not codebooks)'."""
    from spidr.data import manifest
    from spidr.eval import journal
    from spidr.lm import study

    monkeypatch.setattr(journal, "model_fingerprint", lambda model: "weights")
    monkeypatch.setattr(manifest, "read_manifest", lambda path: ["entries"])
    fitted, written = [], []
    monkeypatch.setattr(study, "fit_centroids", lambda model, entries, layers, *, num_units, dtype: fitted.append(
        (list(layers), num_units)) or {layer: f"centroids {layer}" for layer in layers})
    monkeypatch.setattr(study, "write_model_units", lambda model, bench_dir, out, *, layers, centroids, dtype:
                        written.append((list(layers), centroids)) or out.mkdir(parents=True))
    bench = SimpleNamespace(parameters={}, counts={}, train_dir=tmp_path / "bench" / "train",
                            out_dir=tmp_path / "bench")
    model_dir = tmp_path / "out" / "units" / "m"
    study._model_units(study.StudyModel("m", SimpleNamespace(), (1, 3)), bench, model_dir, tmp_path / "out",
                       study.StudySettings(kmeans=8))
    assert fitted == [([1, 3], 8)]
    assert written == [([1, 3], {1: "centroids 1", 3: "centroids 3"})]


@pytest.mark.parametrize("override", ['data.train="x.jsonl"', 'run.name="foo"', ' run.workdir = "/tmp/elsewhere"'])
def test_a_set_of_where_the_lms_train_is_refused_by_name(override):
    """The study sets data.train, run.name and run.workdir for each LM after the user's overrides: a --set of one was
    accepted and silently dropped. It is refused, naming it; other overrides still pass."""
    with pytest.raises(ValueError, match=rf"^--set {re.escape(override)}: the study sets "
                                         rf"{override.split('=')[0].strip()} for each LM"):
        study.check_lm_settings(study.StudySettings(lm_overrides=(*TINY_LM, override)))
    study.check_lm_settings(study.StudySettings(lm_overrides=(*TINY_LM, "run.log_interval=7")))


def test_the_untrained_row_s_range_is_the_lowest_and_highest_seed_whatever_their_order(tmp_path, monkeypatch):
    # mutant: the range taken as the first and last seeds' values. Truth (_untrained_row): "their range over the
    # initialisations": seeds scoring 55, 40, 70, 50, 45 on tsc give 52 in [40, 70].
    monkeypatch.setattr(study, "write_untrained", lambda src, out, *, seed: out)
    values = iter([55.0, 40.0, 70.0, 50.0, 45.0])
    monkeypatch.setattr(study, "_score", lambda *a, **k: {"tsc": next(values)})
    assert study.UNTRAINED_SEEDS == 5
    row = study._untrained_row(tmp_path, tmp_path, tmp_path, bench=None, settings=study.StudySettings())
    assert row["tsc"] == pytest.approx(52.0)
    assert row["tsc_ci95"] == [40.0, 70.0]


def test_training_data_of_exactly_one_context_is_refused_and_one_token_more_is_enough(tmp_path):
    # mutant: the check counting context tokens as a window. Truth (_check_enough_data): the data must hold "one
    # window of model.context + 1 tokens".
    from spidr.lm.prepared_data import update_cache

    bench = _bench(tmp_path / "bench", 1)
    units = study._oracle_units(bench, tmp_path / "units")
    settings = study.StudySettings(lm_overrides=TINY_LM)
    tokens = update_cache(study._lm_config("probe", units, tmp_path / "probe", settings)).train.numel()
    assert tokens > 2
    for context, refused in ((tokens, True), (tokens - 1, False)):
        lm = study.StudySettings(lm_overrides=(*TINY_LM, f"model.context={context}"))
        cfg = study._lm_config(f"phone oracle {context}", units, tmp_path / "out", lm)
        if refused:
            with pytest.raises(ValueError, match=rf"model\.context \+ 1 = {tokens + 1} \(phone oracle {context}: "
                                                 rf"{tokens}\)"):
                study._check_enough_data([(f"phone oracle {context}", cfg)])
        else:
            study._check_enough_data([(f"phone oracle {context}", cfg)])


def test_an_lm_whose_data_record_names_no_labels_differs_from_one_of_phone_labels(tmp_path):
    # mutant: every data entry recorded as None passed as "not known then". Truth (lm_differences): only an entry
    # added to the record since (ADDED_DATA_INFO: units_origin) is excused when it is None; an LM trained on units
    # without labels (labels: None) is not one trained on the phone labels the oracle's folder holds now.
    from spidr.lm.train import lm_checkpoint_summary, train_lm

    bench = _bench(tmp_path / "bench", 14)
    units = study._oracle_units(bench, tmp_path / "units")
    cfg = study._lm_config("phone oracle", units, tmp_path / "a", study.StudySettings(lm_overrides=TINY_LM))
    assert train_lm(cfg) == "completed"
    state = lm_checkpoint_summary(cfg.run.run_dir / "final.pt")
    assert study.lm_differences(state, cfg) == ([], [])
    labels = state["lm"]["labels"]
    assert labels  # the oracle's units are phone labels
    state["lm"]["labels"] = None
    assert study.lm_differences(state, cfg) == ([], [f"labels: None → {labels!r}"])


@pytest.mark.parametrize("name", ["oracle", "Oracle", "ORACLE!"])
def test_a_model_named_as_the_phone_oracle_is_refused_before_anything_is_made(tmp_path, monkeypatch, name):
    # mutant: only two models of one units folder refused. Truth (run_study): a model whose units folder would be
    # the phone oracle's (units/oracle) is refused too, naming it, before the study writes anything.
    monkeypatch.setattr(study, "_benchmark", lambda out_dir, settings: pytest.fail("the study began"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"same units folder \['oracle'\] twice \(or the phone oracle's\)"):
        study.run_study([study.StudyModel(name, None, (1,))], out, study.StudySettings(lm_overrides=TINY_LM))
    assert not out.exists()
