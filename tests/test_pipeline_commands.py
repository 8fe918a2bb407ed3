"""``spidr extract`` and ``spidr evaluate`` end to end on a tiny random model and a few synthetic files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from spidr.cli import main
from spidr.config import SpidRConfig
from spidr.models.build import build_model
from spidr.models.loading import export_safetensors
from train_fixtures import EXTRACTION_MODEL
from train_fixtures import EXTRACTION_MODEL as TINY

PHONES = ("a", "b", "a", "b")  # four 0.25 s phones per 1 s file


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny model checkpoint, 4 one-second files from 2 speakers, an item file and 50 Hz TSV alignments."""
    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    checkpoint = root / "tiny.safetensors"
    export_safetensors(build_model(SpidRConfig(**TINY)).eval(), checkpoint)
    rng = np.random.default_rng(0)
    items = ["#file onset offset #phone prev-phone next-phone speaker"]
    alignments = ["utterance\tonset\toffset\tphone"]
    manifest = ["fileid,path,num_samples"]
    for speaker in ("s1", "s2"):
        for k in range(2):
            name = f"{speaker}_{k}"
            t = np.arange(16000) / 16000
            wave = np.concatenate([np.sin(2 * np.pi * (200 if p == "a" else 450) * t[:4000]) for p in PHONES])
            wave = (0.1 * wave + 0.02 * rng.standard_normal(16000)).astype(np.float32)
            sf.write(root / f"{name}.wav", wave, 16000)
            manifest.append(f"{name},{name}.wav,16000")
            for i, phone in enumerate(PHONES):
                items.append(f"{name} {0.25 * i + 0.02:.2f} {0.25 * i + 0.23:.2f} {phone} x y {speaker}")
                alignments.append(f"{name}\t{0.25 * i:.2f}\t{0.25 * (i + 1):.2f}\t{phone}")
    (root / "manifest.csv").write_text("\n".join(manifest) + "\n")
    (root / "test.item").write_text("\n".join(items) + "\n")
    (root / "align50.tsv").write_text("\n".join(alignments) + "\n")
    return root


def test_evaluate_reads_interval_alignments_at_the_given_rate(corpus, tmp_path):
    """--alignment-rate 50 must reach read_alignments: read at 100 Hz, the 50 Hz units would not line up."""
    out = tmp_path / "report"
    code = main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--item", str(corpus / "test.item"), "--alignments",
                 str(corpus / "align50.tsv"), "--alignment-rate", "50", "--layers", "2-3", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "report.json").read_text())
    quality = {row["layer"]: row["quality"] for row in rows}
    assert set(quality[3]) >= {"pnmi", "phone_purity"}
    assert 0.0 <= quality[3]["pnmi"] <= 1.0


def test_evaluate_refuses_frame_labels_of_another_rate_before_extracting(corpus, tmp_path, capsys):
    """synth-corpus's frame_labels_20ms.jsonl with the default --alignment-rate 100 failed only after the extraction
    and the ABX of every layer before the first head, with "(check the rates)"; it is refused first, naming the
    option and the rate the labels have."""
    for prefix in ("", "corpus/"):  # (named by id, or by a path ending in it: the PNMI finds both)
        labels = [json.dumps({"name": f"{prefix}{speaker}_{k}",
                              "phones": [p for p in PHONES for _ in range(12)] + ["b", "b"]})
                  for speaker in ("s1", "s2") for k in range(2)]  # 50 frames per second of audio
        (tmp_path / "frames20ms.jsonl").write_text("\n".join(labels) + "\n")
        out = tmp_path / "report"
        code = main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                     str(corpus / "manifest.csv"), "--item", str(corpus / "test.item"), "--alignments",
                     str(tmp_path / "frames20ms.jsonl"), "--layers", "2-3", "--out", str(out)])
        assert code == 2
        assert "holds 0.50× the frames that --alignment-rate 100 Hz gives the audio" in capsys.readouterr().err
        assert not (out / "features").exists()
    (tmp_path / "other.jsonl").write_text(json.dumps({"name": "x9", "phones": ["SIL"] * 100}) + "\n")
    assert main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--item", str(corpus / "test.item"), "--alignments",
                 str(tmp_path / "other.jsonl"), "--layers", "2-3", "--out", str(out)]) == 2
    assert "none of the 1 utterances of --alignments names a file of --manifest" in capsys.readouterr().err
    assert not (out / "features").exists()  # (refused before the extraction, not after every layer's ABX)


def test_evaluate_records_what_its_scores_were_measured_with_and_compare_reports_checks_it(corpus, tmp_path,
                                                                                          caplog):
    """settings.json beside report.json: the ABX condition, the item file and alignments by content, the test
    utterances and the dtype. compare-reports of two reports measured otherwise (another context and distance)
    warns and says so in its report, naming each report's value (it merged them silently)."""
    common = ["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
              str(corpus / "manifest.csv"), "--item", str(corpus / "test.item"), "--layers", "3"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--context", "any", "--distance", "euclidean", "--out", str(tmp_path / "b")]) == 0
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["abx"] == {"context": "within", "distance": "angular", "max_size_group": 10, "max_x_across": 5,
                               "seed": 0}
    assert settings["item_file"] == {"name": "test.item",
                                     "sha256": hashlib.sha256((corpus / "test.item").read_bytes()).hexdigest()}
    assert settings["test_utterances"]["count"] == len((corpus / "manifest.csv").read_text().splitlines()) - 1
    assert settings["alignments"] is None
    assert settings["dtype"] == "float32"
    metadata = json.loads((tmp_path / "a" / "features" / "model" / "metadata.json").read_text())
    assert metadata["checkpoint"] == str(corpus / "tiny.safetensors")  # where the reusable features came from
    with caplog.at_level("WARNING"):
        assert main(["compare-reports", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    assert "not measured alike: abx.context: a within, b any" in caplog.text
    report = (tmp_path / "ab" / "report.md").read_text()
    assert "- abx.distance: a angular, b euclidean" in report
    assert not (tmp_path / "ab" / "settings.json").exists()  # no common settings to record
    caplog.clear()
    assert main([*common, "--out", str(tmp_path / "c")]) == 0
    with caplog.at_level("WARNING"):
        assert main(["compare-reports", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "ac")]) == 0
    assert "not measured alike" not in caplog.text
    assert "measured alike" in (tmp_path / "ac" / "report.md").read_text()
    assert json.loads((tmp_path / "ac" / "settings.json").read_text()) == settings


def test_the_demo_s_settings_match_evaluate_s_on_the_same_test_set(corpus, tmp_path):
    """The demo and learning-curve points record their settings without naming the alignment rate (evaluate_model's
    default, 100): they must equal `spidr evaluate`'s at that rate, or compare-reports calls a demo report and an
    evaluate report of the same test set 'not measured alike' (the README's SpidR vs DinoSR workflow)."""
    from spidr.data.manifest import read_manifest
    from spidr.eval.report import AbxSettings, evaluation_settings

    assert main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--item", str(corpus / "test.item"), "--alignments",
                 str(corpus / "align50.tsv"), "--layers", "3", "--out", str(tmp_path / "e")]) == 0
    as_the_demo = evaluation_settings(abx=AbxSettings(), item_file=corpus / "test.item",
                                      entries=read_manifest(corpus / "manifest.csv"),
                                      alignments_file=corpus / "align50.tsv")
    assert json.loads((tmp_path / "e" / "settings.json").read_text()) == json.loads(json.dumps(as_the_demo))


def test_evaluate_extracts_in_the_dtype_asked_for(corpus, tmp_path):
    """--dtype bfloat16 reaches the extraction (it was once parsed and then dropped): the features written differ
    from float32's by bf16 rounding, within 1e-2."""
    features = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        code = main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                     str(corpus / "manifest.csv"), "--item", str(corpus / "test.item"), "--layers", "3",
                     "--dtype", dtype, "--out", str(out)])
        assert code == 0
        features[dtype] = np.load(out / "features" / "model" / "layer_03" / "s1_0.npy")
        assert json.loads((out / "report.json").read_text())[0]["layer"] == 3
    error = np.linalg.norm(features["bfloat16"] - features["float32"]) / np.linalg.norm(features["float32"])
    assert 1e-4 < error < 1e-2


def test_evaluate_on_one_speaker_reports_within_speaker_and_leaves_across_out(corpus, tmp_path, caplog):
    """Items of one speaker have no across-speaker cell: the command once stopped there and wrote no report."""
    one = tmp_path / "one.item"
    lines = (corpus / "test.item").read_text().splitlines()
    one.write_text("\n".join(line for line in lines if not line.endswith(" s2")) + "\n")
    out = tmp_path / "report"
    code = main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--item", str(one), "--alignments", str(corpus / "align50.tsv"),
                 "--alignment-rate", "50", "--layers", "3", "--baseline", "mfcc", "--out", str(out)])
    assert code == 0
    rows = {row["model"]: row for row in json.loads((out / "report.json").read_text())}
    assert set(rows) == {"tiny", "MFCC"}
    for row in rows.values():
        assert 0.0 <= row["abx_within"] <= 100.0
        assert row["abx_across"] is None
    assert 0.0 <= rows["tiny"]["unit_abx_within"] <= 100.0
    assert rows["tiny"]["unit_abx_across"] is None
    assert 0.0 <= rows["tiny"]["quality"]["pnmi"] <= 1.0
    assert "holds one speaker: across-speaker ABX is left out" in caplog.text
    assert (out / "report.md").is_file()
    assert (out / "abx_per_layer.png").is_file()


def test_max_seconds_bounds_the_audio_of_every_forward(corpus, tmp_path, monkeypatch):
    """--max-seconds once chose which files go through windows, but the windows stayed 30 s + 2 × 5 s of context: a
    lower bound could not lower the memory. Now no forward reads more audio than it (up to a frame's receptive
    field: windows are whole frames)."""
    from spidr.config import num_samples_for_frames
    from spidr.eval import features as features_module
    from spidr.eval.features import window_settings

    for bound in (60.0, 10.0, 1.0, 0.3):
        fields = window_settings(bound)
        assert fields["window_seconds"] > 0
        assert fields["window_seconds"] + 2 * fields["context_seconds"] <= bound
    assert window_settings(60.0) == {"max_seconds": 60.0, "window_seconds": 30.0, "context_seconds": 5.0}
    lengths = []
    real = features_module.extract_padded_batch
    monkeypatch.setattr(features_module, "extract_padded_batch",
                        lambda model, waves, settings, **options: lengths.extend(w.shape[0] for w in waves) or real(
                            model, waves, settings, **options))
    out = tmp_path / "windowed"
    assert main(["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--layers", "1", "--max-seconds", "0.4", "--out", str(out)]) == 0
    assert lengths
    receptive_field = num_samples_for_frames(1, SpidRConfig(**TINY).extractor_conv_layer_config)
    assert max(lengths) <= 0.4 * 16000 + receptive_field  # windows are whole frames: one field past the bound
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["settings"]["window_seconds"] == pytest.approx(0.2)
    frames = np.load(out / "layer_01" / "s1_0.npy").shape[0]
    whole = tmp_path / "whole"
    assert main(["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--layers", "1", "--out", str(whole)]) == 0
    assert np.load(whole / "layer_01" / "s1_0.npy").shape[0] == frames


def test_codebook_units_alone_equal_those_extracted_with_features(corpus, tmp_path, capsys):
    """--layers none --codebooks writes the units of one full extraction and no feature file, whole files and
    windowed ones alike; without --codebooks it would write nothing, and is refused before the model loads."""
    base = ["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(corpus / "manifest.csv"),
            "--codebooks"]

    def units(out):
        return {path.name: path.read_text() for path in sorted((out / "codebook_units").glob("*.jsonl"))}

    for window in ([], ["--max-seconds", "0.4"]):
        full, alone = tmp_path / f"full{len(window)}", tmp_path / f"alone{len(window)}"
        assert main([*base, *window, "--layers", "2", "--out", str(full)]) == 0
        assert main([*base, *window, "--layers", "none", "--out", str(alone)]) == 0
        assert units(alone) == units(full)
        assert sorted(units(full)) == ["layer_02.jsonl", "layer_03.jsonl"]  # the tiny model's two heads
        assert not list(alone.glob("layer_*"))
        assert json.loads((alone / "metadata.json").read_text())["layers"] == []
    capsys.readouterr()
    assert main([*base[:-1], "--layers", "none", "--checkpoint", "missing.pt", "--out", str(tmp_path / "x")]) == 2
    assert "--layers none writes no features: add --codebooks" in capsys.readouterr().err


def test_kmeans_units_from_the_audio_equal_spidr_units_on_the_features(corpus, tmp_path, capsys):
    """--kmeans LAYER:CENTROIDS writes the units that `spidr units` gives on that layer's extracted features (whole
    files and windowed ones), with the record `spidr units` writes (vocabulary, frame rate); with --layers none
    they come without any feature file."""
    from spidr.eval.feature_dir import extraction_frame_rate, recorded_num_units
    from spidr.eval.units import read_units

    base = ["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(corpus / "manifest.csv")]
    centroids = tmp_path / "c.safetensors"
    for window in ([], ["--max-seconds", "0.4"]):
        feats, alone, both = (tmp_path / f"{name}{len(window)}" for name in ("feats", "alone", "both"))
        assert main([*base, *window, "--layers", "3", "--out", str(feats)]) == 0
        if not centroids.exists():
            assert main(["kmeans", str(feats / "layer_03"), "--num-units", "5", "--out", str(centroids)]) == 0
        reference = tmp_path / f"units{len(window)}.jsonl"
        assert main(["units", str(feats / "layer_03"), "--centroids", str(centroids), "--out", str(reference)]) == 0
        expected = read_units(reference)
        assert main([*base, *window, "--layers", "none", "--kmeans", f"3:{centroids}", "--out", str(alone)]) == 0
        assert main([*base, *window, "--layers", "3", "--kmeans", f"3:{centroids}", "--out", str(both)]) == 0
        for out in (alone, both):
            units_path = out / "kmeans_units" / "layer_03.jsonl"
            got = read_units(units_path)
            assert got.keys() == expected.keys()
            for name, units in got.items():
                np.testing.assert_array_equal(units, expected[name])
            assert recorded_num_units(units_path)[0] == 5
            assert extraction_frame_rate(units_path)[0] == extraction_frame_rate(reference)[0]
            assert json.loads((out / "metadata.json").read_text())["kmeans"] == {
                "3": {"centroids": str(centroids), "num_units": 5}}
        assert not list(alone.glob("layer_*"))
        for path in (feats / "layer_03").glob("*.npy"):
            np.testing.assert_array_equal(np.load(both / "layer_03" / path.name), np.load(path))
    capsys.readouterr()
    for option, says in (("3", "expected LAYER:CENTROIDS"), ("0:x", "expected LAYER:CENTROIDS")):
        with pytest.raises(SystemExit):
            main([*base, "--kmeans", option, "--out", str(tmp_path / "x")])
        assert says in capsys.readouterr().err
    assert main([*base, "--kmeans", f"9:{centroids}", "--out", str(tmp_path / "x")]) == 2
    assert "holds centroids fitted on layer 3's features" in capsys.readouterr().err  # (spidr kmeans recorded it)
    from spidr.eval.kmeans import load_centroids, save_centroids

    save_centroids(tmp_path / "unrecorded.safetensors", load_centroids(centroids))  # (no layer recorded)
    assert main([*base, "--kmeans", f"9:{tmp_path / 'unrecorded.safetensors'}", "--out", str(tmp_path / "x")]) == 2
    assert "k-means units of layer 9 (" in capsys.readouterr().err

    save_centroids(tmp_path / "other.safetensors", np.zeros((4, 7), dtype=np.float32))
    assert main([*base, "--kmeans", f"2:{tmp_path / 'other.safetensors'}", "--out", str(tmp_path / "x")]) == 2
    assert "centroids of shape (4, 7), but the layer's features have dimension 32" in capsys.readouterr().err


def test_abx_options_are_declared_once_with_every_distance(corpus, tmp_path, capsys):
    import argparse

    from spidr.cli import build_parser
    from spidr.eval.abx_frames import DISTANCES

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    options = {}
    for name in ("abx", "evaluate"):
        options[name] = {a.dest: a.choices for a in commands[name]._actions
                         if a.dest in ("context", "distance", "max_size_group", "max_x_across", "seed")}
    assert options["abx"] == options["evaluate"]
    assert tuple(options["abx"]["distance"]) == DISTANCES
    code = main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--item", str(corpus / "test.item"), "--distance", "identical",
                 "--out", str(tmp_path / "r")])
    assert code == 2
    assert "--distance identical compares discrete units" in capsys.readouterr().err


def test_probe_separates_the_two_tones_from_mfcc_and_reports_every_representation(corpus, tmp_path):
    """The files alternate a 200 Hz and a 450 Hz tone: MFCC frames tell them apart almost everywhere (an independent
    truth for the probe), and the model rows cover the front end, the projection and each layer."""
    out = tmp_path / "probe"
    code = main(["probe", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(corpus / "manifest.csv"),
                 "--alignments", str(corpus / "align50.tsv"), "--alignment-rate", "50", "--test-fraction", "0.25",
                 "--baseline", "mfcc", "--baseline", "random-init", "--epochs", "20", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "probe.json").read_text())
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["representation"]] = row
    assert set(by_model) == {"tiny", "MFCC", "tiny (random init)"}
    assert list(by_model["tiny"]) == ["front_end", "projection", "layer_01", "layer_02", "layer_03"]
    mfcc = by_model["MFCC"]["mfcc"]
    assert mfcc["num_test_utterances"] == 1
    assert mfcc["num_train_frames"] == 3 * 49
    assert mfcc["frame_accuracy"] >= 90.0
    assert (out / "probe.png").stat().st_size > 0
    assert "| MFCC | mfcc |" in (out / "probe.md").read_text()


def test_probe_reads_stored_features_as_the_model_that_made_them(corpus, tmp_path, capsys):
    """--features NAME=DIR: a spidr extract folder's layers probed without the model give the rows the model's own
    probe gives for those layers (the same frames, up to the batching of the forward passes; the same counts), at
    the frame rate the extraction recorded; the options of a --checkpoint model without one are refused."""
    feats = tmp_path / "feats"
    assert main(["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--layers", "1-3", "--out", str(feats)]) == 0
    common = ["--manifest", str(corpus / "manifest.csv"), "--alignments", str(corpus / "align50.tsv"),
              "--alignment-rate", "50", "--test-fraction", "0.25", "--epochs", "20"]
    assert main(["probe", "--checkpoint", str(corpus / "tiny.safetensors"), *common, "--out",
                 str(tmp_path / "model")]) == 0
    assert main(["probe", "--features", f"stored={feats}", *common, "--out", str(tmp_path / "stored")]) == 0
    model = {row["representation"]: row for row in json.loads((tmp_path / "model" / "probe.json").read_text())}
    stored = json.loads((tmp_path / "stored" / "probe.json").read_text())
    assert [(row["model"], row["representation"]) for row in stored] == [
        ("stored", "layer_01"), ("stored", "layer_02"), ("stored", "layer_03")]
    for row in stored:
        expected = model[row["representation"]]
        assert (row["num_train_frames"], row["num_test_frames"], row["num_test_utterances"]) == (
            expected["num_train_frames"], expected["num_test_frames"], expected["num_test_utterances"])
        assert row["frame_accuracy"] == pytest.approx(expected["frame_accuracy"], abs=3.0)
    capsys.readouterr()
    out = ["--out", str(tmp_path / "refused")]
    for extra, message in (([], "give the model to probe (--checkpoint) or stored features"),
                           (["--features", f"s={feats}", "--layers", "2"], "--layers: options of the --checkpoint"),
                           (["--features", f"s={feats}", "--frequency", "100"], "--frequency 100 Hz, but"),
                           (["--features", str(feats)], "expected NAME=DIR"),
                           (["--features", f"s={tmp_path / 'none'}"], "is not a folder")):
        assert main(["probe", *common, *out, *extra]) == 2
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "refused").exists()


def test_user_errors_are_one_line_before_any_work(corpus, tmp_path, capsys):
    """A device this machine lacks, a non-positive size, a file where the output folder goes, an audio file given
    as the checkpoint: each is one line naming what is wrong, exit code 2, no traceback."""
    base = ["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(corpus / "manifest.csv"),
            "--layers", "1"]
    for extra, message in ((["--device", "tpu"], "argument --device: 'tpu' is not a device"),
                           (["--batch-seconds", "0"], "argument --batch-seconds: '0': expected a positive number")):
        with pytest.raises(SystemExit) as exit_:
            main([*base, "--out", str(tmp_path / "f"), *extra])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main([*base, "--out", str(tmp_path / "f"), "--device", "cuda"])
        assert "CUDA is not available on this machine" in capsys.readouterr().err
    # the default, as spidr train's: the GPU where there is one (it was cpu, silently, on a GPU machine)
    from spidr import cli_types
    from spidr.cli import build_parser

    args = build_parser().parse_args([*base, "--out", str(tmp_path / "f")])
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu") == cli_types.device("auto")
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    assert main([*base, "--out", str(in_the_way)]) == 2
    err = capsys.readouterr().err
    assert f"spidr extract: error: {in_the_way}" in err
    assert "a file is in the way of a folder" in err
    assert "Traceback" not in err
    base[2] = str(corpus / "s1_0.wav")
    assert main([*base, "--out", str(tmp_path / "g")]) == 2
    assert "s1_0.wav is not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_every_command_that_reads_a_model_takes_its_loading_options(corpus, tmp_path, capsys):
    """An official file alone holds no config: extract needs --model-type (and takes --config, which the loading
    errors point to); every command with a SpidR / DinoSR checkpoint argument offers the same three options."""
    import argparse

    from spidr.cli import build_parser

    official = tmp_path / "released" / "spidr_base.pt"
    official.parent.mkdir()
    torch.save({"model": build_model(SpidRConfig(**TINY)).state_dict()}, official)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    base = ["extract", "--checkpoint", str(official), "--manifest", str(corpus / "manifest.csv"), "--layers", "1"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "pass model_type='spidr' or 'dinosr' (CLI: --model-type)" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--model-type", "spidr", "--config", str(config)]) == 0
    assert len(list((tmp_path / "b" / "layer_01").glob("*.npy"))) == 4

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    readers = {name for name, sub in commands.items()
               if any(a.dest == "checkpoint" and "LM checkpoint" not in (a.help or "") for a in sub._actions)}
    assert readers >= {"extract", "evaluate", "probe", "export", "info", "lm-units", "lm-study"}
    for name in readers:
        assert {"model_type", "config", "trust"} <= {a.dest for a in commands[name]._actions}, name


def test_abx_and_units_quality_take_the_rate_the_extraction_recorded(corpus, tmp_path, capsys):
    """The tiny model runs at 100 Hz: abx and units-quality on its extraction use that rate (they assumed 50 Hz,
    and scored misaligned items); a contradicting rate is refused; features in a nested tree are found by stem."""
    import shutil

    from train_fixtures import TINY_MODEL

    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny100.safetensors"
    export_safetensors(build_model(SpidRConfig(**TINY_MODEL)).eval(), checkpoint)
    out = tmp_path / "f"
    assert main(["extract", "--checkpoint", str(checkpoint), "--manifest", str(corpus / "manifest.csv"),
                 "--layers", "1", "--codebooks", "--out", str(out)]) == 0
    rate = json.loads((out / "metadata.json").read_text())["frame_rate_hz"]
    assert rate == 100.0
    capsys.readouterr()

    def abx(features, *options) -> dict:
        assert main(["abx", str(features), str(corpus / "test.item"), "--json", *options]) == 0
        return json.loads(capsys.readouterr().out)

    recorded = abx(out / "layer_01")
    assert recorded["frequency_hz"] == 100.0
    assert abx(out / "layer_01", "--frequency", "100") == recorded
    assert main(["abx", str(out / "layer_01"), str(corpus / "test.item"), "--frequency", "50"]) == 2
    assert "--frequency 50 Hz, but" in capsys.readouterr().err
    nested = tmp_path / "nested"
    for path in (out / "layer_01").glob("*.npy"):  # the #file of the items is the stem, as in LibriSpeech's
        (nested / path.stem[:2] / "chapter").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, nested / path.stem[:2] / "chapter" / path.name)
    assert abx(nested, "--frequency", "100")["abx_error_rate"] == recorded["abx_error_rate"]
    units = next((out / "codebook_units").glob("*.jsonl"))
    assert abx(units)["frequency_hz"] == 100.0
    quality = ["units-quality", str(units), str(corpus / "align50.tsv"), "--alignment-rate", "100"]
    assert main([*quality, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pnmi"] >= 0
    assert main([*quality, "--unit-rate", "50"]) == 2
    assert "--unit-rate 50 Hz, but" in capsys.readouterr().err
    codebook_size = json.loads((out / "metadata.json").read_text())["codebook_size"]
    assert codebook_size == TINY_MODEL["codebook_size"]
    assert main([*quality, "--num-units", str(codebook_size + 1)]) == 2
    assert f"records {codebook_size} units" in capsys.readouterr().err

    # k-means units written anywhere keep their rate and vocabulary: abx and units-quality read them from the
    # record spidr units writes beside them (they assumed 50 Hz and 256 units)
    centroids = tmp_path / "k5.safetensors"
    assert main(["kmeans", str(out / "layer_01"), "--num-units", "5", "--out", str(centroids)]) == 0
    kmeans_units = tmp_path / "elsewhere" / "units.jsonl"
    assert main(["units", str(out / "layer_01"), "--centroids", str(centroids), "--out", str(kmeans_units)]) == 0
    assert "5 units, 100 Hz" in capsys.readouterr().out
    assert abx(kmeans_units)["frequency_hz"] == 100.0
    kmeans_quality = ["units-quality", str(kmeans_units), str(corpus / "align50.tsv"), "--alignment-rate", "100",
                      "--json"]
    assert main(kmeans_quality) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert main([*kmeans_quality, "--num-units", "5", "--unit-rate", "100"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    assert main([*kmeans_quality, "--num-units", "256"]) == 2
    assert "--num-units 256, but" in capsys.readouterr().err
    # kept beside the codebook units, they are not given the codebook's vocabulary (16: a wrong bitrate that
    # --num-units 5 could not correct)
    beside = out / "codebook_units" / "my_kmeans5.jsonl"
    beside.write_bytes(kmeans_units.read_bytes())
    assert main(["units-quality", str(beside), str(corpus / "align50.tsv"), "--alignment-rate", "100",
                 "--unit-rate", "100", "--num-units", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    beside.unlink()
    moved = tmp_path / "moved.jsonl"  # without its record: no guess of the vocabulary (256 was assumed)
    moved.write_bytes(kmeans_units.read_bytes())
    assert main(["units-quality", str(moved), str(corpus / "align50.tsv"), "--alignment-rate", "100",
                 "--unit-rate", "100"]) == 2
    assert f"no unit vocabulary size is recorded for {moved}" in capsys.readouterr().err
    assert main(["units-quality", str(moved), str(corpus / "align50.tsv"), "--alignment-rate", "100",
                 "--unit-rate", "100", "--num-units", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    # a units file written over since by another tool is not described by the record: 50 Hz units, as without one
    kmeans_units.write_text(kmeans_units.read_text() + "\n")
    assert abx(kmeans_units)["frequency_hz"] == 50.0


def test_extract_takes_every_layer_of_the_model_by_default(corpus, tmp_path):
    """Not "1-12", which a model of another depth refused."""
    assert main(["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--out", str(tmp_path / "f")]) == 0
    metadata = json.loads((tmp_path / "f" / "metadata.json").read_text())
    assert metadata["layers"] == list(range(1, TINY["encoder_num_layers"] + 1))
    assert sorted(p.name for p in (tmp_path / "f").glob("layer_*")) == [
        f"layer_{layer:02d}" for layer in metadata["layers"]]


def test_extract_from_a_folder_reads_the_extensions_asked_for_and_nothing_read_is_an_error(corpus, tmp_path,
                                                                                          capsys):
    """A folder of .ogg files: by default nothing is read, which is an error naming --ext (it 'wrote features of 0
    files' with exit status 0); --ext .ogg reads them, as the same audio in wav. A manifest whose every file is
    unusable is an error too, with no metadata.json that would mark the extraction finished."""
    folder = tmp_path / "ogg"
    folder.mkdir()
    wave, _ = sf.read(corpus / "s1_0.wav", dtype="float32")
    sf.write(folder / "s1_0.ogg", wave, 16000, format="OGG", subtype="VORBIS")
    command = ["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--layers", "1"]
    assert main([*command, "--manifest", str(folder), "--out", str(tmp_path / "none")]) == 2
    assert "no readable audio with extension(s) .wav, .flac in" in capsys.readouterr().err
    assert main([*command, "--manifest", str(folder), "--ext", "ogg", "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "layer_01" / "s1_0.npy").is_file()
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt not really")
    (tmp_path / "bad.csv").write_text(f"fileid,path,num_samples\nbroken,{broken},16000\n")
    assert main([*command, "--manifest", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "bad")]) == 2
    assert "none of the 1 files could be read, so nothing was extracted" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metadata.json").exists()
    (tmp_path / "mixed.csv").write_text(f"fileid,path,num_samples\nbroken,{broken},16000\n"
                                        f"s1_0,{corpus / 's1_0.wav'},16000\n")
    assert main([*command, "--manifest", str(tmp_path / "mixed.csv"), "--out", str(tmp_path / "mixed")]) == 0
    assert "wrote features of 1 files to" in (said := capsys.readouterr().out)
    assert "; 1 unusable file(s) skipped, listed with their reasons in" in said


def test_evaluate_finds_units_and_mfcc_by_item_paths_and_refuses_items_of_another_corpus(corpus, tmp_path, capsys):
    """Item #file may be a path ending in the utterance id (``spidr abx`` takes both): the codebook-unit ABX and the
    MFCC baseline must find their utterances as the feature ABX does, and give the same scores as with ids."""
    lines = (corpus / "test.item").read_text().splitlines()
    (tmp_path / "paths.item").write_text("\n".join([lines[0], *(f"corpus/{line}" for line in lines[1:])]) + "\n")
    reports = {}
    for name in ("test.item", "paths.item"):
        item = corpus / name if name == "test.item" else tmp_path / name
        out = tmp_path / f"report-{name}"
        assert main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                     str(corpus / "manifest.csv"), "--item", str(item), "--layers", "3", "--baseline", "mfcc",
                     "--out", str(out)]) == 0
        reports[name] = json.loads((out / "report.json").read_text())
    assert reports["paths.item"] == reports["test.item"]
    assert {row["model"] for row in reports["test.item"]} == {"tiny", "MFCC"}
    assert reports["test.item"][0]["unit_abx_within"] is not None
    (tmp_path / "other.item").write_text("\n".join([lines[0], *(f"x{line}" for line in lines[1:])]) + "\n")
    assert main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--item", str(tmp_path / "other.item"), "--layers", "3",
                 "--out", str(tmp_path / "other")]) == 2
    assert "none of the 16 ABX items of" in capsys.readouterr().err


def test_the_mfcc_baseline_gives_each_file_its_own_mfccs_where_file_ids_repeat(tmp_path, monkeypatch):
    """Keyed by file id, spk2/0001's MFCCs replaced spk1/0001's, and spk1's items were scored on them (or failed on
    a frame count). Truth: each file's item key finds the MFCCs of that file's own audio."""
    from decimal import Decimal

    from spidr.data.audio import load_audio
    from spidr.data.manifest import ManifestEntry
    from spidr.eval import report
    from spidr.eval.items import Items
    from spidr.eval.mfcc import mfcc
    from train_fixtures import speech_like

    entries = []
    for speaker, seconds in (("spk1", 1.0), ("spk2", 0.5)):
        path = tmp_path / speaker / "0001.wav"
        path.parent.mkdir()
        sf.write(path, speech_like(int(seconds * 16000), np.random.default_rng(len(entries))), 16000)
        entries.append(ManifestEntry("0001", str(path), int(seconds * 16000)))
    seen = {}

    def scored(features, items, speaker, settings, *, distance, frequency=50):
        seen.update({name: np.asarray(features[name]) for name in items.files})
        return 0.0

    monkeypatch.setattr(report, "_abx_percent", scored)
    items = Items(files=("spk1/0001", "spk2/0001"), onsets=(Decimal("0.1"),) * 2, offsets=(Decimal("0.2"),) * 2,
                  labels={"#phone": ("a", "b"), "speaker": ("s1", "s2")})
    report.evaluate_mfcc(entries, items)
    for entry, key in zip(entries, ("spk1/0001", "spk2/0001"), strict=True):
        np.testing.assert_array_equal(seen[key], mfcc(load_audio(entry, normalize=True).numpy()))


def test_a_run_s_checkpoint_is_named_after_its_run_folder(tmp_path):
    """Every training run ends in final.pt: reports said "Evaluation of final", and lm-study refused two runs as
    one name ("final", "final"). Other files keep their stem."""
    from spidr.models.commands import default_model_name

    assert default_model_name(tmp_path / "spidr-s0" / "final.pt") == "spidr-s0"
    assert default_model_name(tmp_path / "dinosr-s1" / "step_5000.pt") == "dinosr-s1-step_5000"
    assert default_model_name("spidr_base.pt") == "spidr_base"
    assert default_model_name(tmp_path / "exports" / "final.safetensors") == "final"
    assert default_model_name(tmp_path / "spidr_base_hf") == "spidr_base_hf"


def test_ctrl_c_outside_a_training_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt printed a traceback from every command; training itself takes the first Ctrl-C for a
    stop request (tests/test_train.py)."""
    from spidr import cli
    from spidr.data import scanning

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scanning, "scan", interrupted)
    assert cli.main(["manifest", str(tmp_path), str(tmp_path / "m.csv")]) == 130
    assert capsys.readouterr().err == "spidr manifest: interrupted\n"


# Refused runs leave nothing that blocks the corrected one ----------------------------------------------------------
def test_an_extraction_that_could_read_no_file_leaves_nothing_and_its_rerun_reads_them(corpus, tmp_path, capsys):
    """Its journal took every unreadable file as done (skipped): rerun once the audio was there, it resumed into the
    same refusal and never read them; with a corrected manifest it was refused as another extraction."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"fileid,path,num_samples\na,{tmp_path / 'a.wav'},16000\n")
    out = tmp_path / "new" / "feats"
    command = ["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(manifest),
               "--layers", "2", "--out", str(out)]
    assert main(command) == 2
    assert "none of the 1 files could be read" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "a.wav").write_bytes((corpus / "s1_0.wav").read_bytes())  # the audio is back
    out.mkdir(parents=True)  # (a folder the user made: kept as it was, empty, when refused again)
    manifest.write_text(f"fileid,path,num_samples\nb,{tmp_path / 'b.wav'},16000\n")
    assert main([*command[:4], str(manifest), *command[5:]]) == 2
    assert list(out.iterdir()) == []
    manifest.write_text(f"fileid,path,num_samples\na,{tmp_path / 'a.wav'},16000\n")  # and the manifest fixed
    assert main(command) == 0
    assert np.load(out / "layer_02" / "a.npy").shape[0] == 49  # (1 s at 50 Hz, less the receptive field)
    assert json.loads((out / "metadata.json").read_text())["skipped"] == {}


def test_evaluate_refuses_an_item_file_of_another_corpus_and_coarse_alignments_before_extracting(corpus, tmp_path,
                                                                                                capsys):
    """Both were refused after every layer was extracted (and, for the rate, its ABX scored): hours on a corpus."""
    (tmp_path / "other.item").write_text("#file onset offset #phone prev-phone next-phone speaker\n"
                                         "zzz 0.1 0.2 a x y s1\n")
    out = tmp_path / "report"
    base = ["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(corpus / "manifest.csv"),
            "--out", str(out)]
    assert main([*base, "--item", str(tmp_path / "other.item")]) == 2
    assert "none of the 1 ABX items of" in capsys.readouterr().err
    assert not out.exists()
    # 25 Hz labels (40 ms) for the 50 Hz units of the heads' layers: PNMI cannot count them per unit
    labels = [json.dumps({"name": f"{speaker}_{k}", "phones": [p for p in PHONES for _ in range(6)] + ["b"]})
              for speaker in ("s1", "s2") for k in range(2)]
    (tmp_path / "frames40ms.jsonl").write_text("\n".join(labels) + "\n")
    assert main([*base, "--item", str(corpus / "test.item"), "--alignments", str(tmp_path / "frames40ms.jsonl"),
                 "--alignment-rate", "25"]) == 2
    assert "--alignment-rate 25: the PNMI of the codebook units (layers [2, 3])" in capsys.readouterr().err
    assert not out.exists()
    # without a head among the layers, no PNMI: the same labels are fine (ABX alone)
    assert main([*base, "--item", str(corpus / "test.item"), "--alignments", str(tmp_path / "frames40ms.jsonl"),
                 "--alignment-rate", "25", "--layers", "1"]) == 0


def test_export_makes_the_folder_of_its_output_and_leaves_none_when_refused(corpus, tmp_path, capsys):
    """Every other command made its output's folder; export refused it as missing."""
    target = tmp_path / "new" / "sub" / "model.safetensors"
    assert main(["export", str(tmp_path / "absent.pt"), str(target)]) == 2
    assert "absent.pt" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["export", str(corpus / "tiny.safetensors"), str(target)]) == 0
    assert target.is_file()


def test_an_extraction_started_while_one_that_read_nothing_forgets_itself_is_not_lost(corpus, tmp_path,
                                                                                        monkeypatch):
    """The extraction that read no file let go of its own lock before it took the folder's: a --restart started in
    between set the folder up as its own, and was deleted with the first one's journal (its finished features
    too). Now the second one is refused by name while the first one forgets itself, and runs afterwards."""
    import subprocess
    import sys
    from pathlib import Path

    from spidr.eval import folder_extraction

    (tmp_path / "bad.csv").write_text(f"fileid,path,num_samples\na,{tmp_path / 'missing.wav'},16000\n")
    (tmp_path / "good.csv").write_text(f"fileid,path,num_samples\na,{corpus / 's1_0.wav'},16000\n")
    out = tmp_path / "feats"

    def command(manifest: str) -> list[str]:
        return ["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(tmp_path / manifest),
                "--layers", "2", "--out", str(out)]

    real, calls, second = folder_extraction.folder_lock, [], {}
    env = {**os.environ, "PYTHONPATH": str(Path(folder_extraction.__file__).parents[2]), "OMP_NUM_THREADS": "1"}

    def folder_lock(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the first extraction forgets itself: the corrected run starts meanwhile
            second["run"] = subprocess.run([sys.executable, "-m", "spidr", *command("good.csv"), "--restart"],
                                           check=False, capture_output=True, text=True, env=env, timeout=300)
        return real(*args, **kwargs)

    monkeypatch.setattr(folder_extraction, "folder_lock", folder_lock)
    assert main(command("bad.csv")) == 2
    assert second["run"].returncode == 2
    assert "is being run by process" in second["run"].stderr
    assert not out.exists()
    monkeypatch.setattr(folder_extraction, "folder_lock", real)
    assert main([*command("good.csv"), "--restart"]) == 0
    assert (out / "layer_02" / "a.npy").is_file()


def test_parts_that_could_read_no_file_leave_nothing_in_the_way_of_the_rerun(corpus, tmp_path):
    """As a whole extraction: every part's journal took the missing files as done, so after the audio was back the
    parts refused again with the old reason (and --restart part by part lost a part's features)."""
    rows = "".join(f"{name},{tmp_path / f'{name}.wav'},16000\n" for name in ("a", "b"))
    (tmp_path / "m.csv").write_text("fileid,path,num_samples\n" + rows)
    out = tmp_path / "feats"
    command = ["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(tmp_path / "m.csv"),
               "--layers", "2", "--out", str(out)]
    assert main([*command, "--shard", "1/2"]) == 0  # (waits for part 2)
    assert main([*command, "--shard", "2/2"]) == 2
    assert not (out / ".extract").exists()
    for name, source in (("a", "s1_0"), ("b", "s2_0")):
        (tmp_path / f"{name}.wav").write_bytes((corpus / f"{source}.wav").read_bytes())
    assert main([*command, "--shard", "1/2"]) == 0
    assert main([*command, "--shard", "2/2"]) == 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["skipped"] == {}
    assert sorted(p.name for p in (out / "layer_02").iterdir()) == ["a.npy", "b.npy"]


def test_evaluate_finds_items_as_its_features_are_found(corpus, tmp_path, capsys):
    """The early check of the item file must look files up as evaluate does (by id, or by the last part of a path):
    ids with a dot named `spk/<id>` were refused (the stem of 's1/s1.utt0' is 's1'), names with '.wav' passed it
    and failed after extracting; a subset of the item file's files is evaluated (the others warned about); files
    whose names repeat in two folders are found by path."""
    base = ["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--layers", "1", "--out"]
    items = (corpus / "test.item").read_text().splitlines()
    # ids with a dot, named by speaker folder and id
    (tmp_path / "dots.csv").write_text("fileid,path,num_samples\n" + "".join(
        f"{speaker}.utt{k},{corpus / f'{speaker}_{k}.wav'},16000\n" for speaker in ("s1", "s2") for k in (0, 1)))
    (tmp_path / "dots.item").write_text("\n".join([items[0], *(
        line.replace(f"{line.split()[0]} ", f"{line[:2]}/{line[:2]}.utt{line[3]} ", 1) for line in items[1:])]) + "\n")
    assert main([*base, str(tmp_path / "r1"), "--manifest", str(tmp_path / "dots.csv"), "--item",
                 str(tmp_path / "dots.item")]) == 0
    # names with the extension: never found
    (tmp_path / "ext.item").write_text("\n".join([items[0], *(
        line.replace(" ", ".wav ", 1) for line in items[1:])]) + "\n")
    assert main([*base, str(tmp_path / "r2"), "--manifest", str(corpus / "manifest.csv"), "--item",
                 str(tmp_path / "ext.item")]) == 2
    assert "none of the 16 ABX items of" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    # a manifest of two of the item file's four files
    (tmp_path / "two.csv").write_text("\n".join((corpus / "manifest.csv").read_text().splitlines()[:2]) + "\n"
                                      + f"s2_0,{corpus / 's2_0.wav'},16000\n")
    assert main([*base, str(tmp_path / "r3"), "--manifest", str(tmp_path / "two.csv"), "--item",
                 str(corpus / "test.item")]) == 0
    # one name in two speakers' folders (spk1/utt0, spk2/utt0), items by path
    for speaker in ("s1", "s2"):
        (tmp_path / "rep" / speaker).mkdir(parents=True)
        for k in (0, 1):
            (tmp_path / "rep" / speaker / f"utt{k}.wav").write_bytes((corpus / f"{speaker}_{k}.wav").read_bytes())
    (tmp_path / "rep.csv").write_text("fileid,path,num_samples\n" + "".join(
        f"utt{k},{tmp_path / 'rep' / speaker / f'utt{k}.wav'},16000\n" for speaker in ("s1", "s2") for k in (0, 1)))
    (tmp_path / "rep.item").write_text("\n".join([items[0], *(
        line.replace(f"{line.split()[0]} ", f"{line[:2]}/utt{line[3]} ", 1) for line in items[1:])]) + "\n")
    assert main([*base, str(tmp_path / "r4"), "--manifest", str(tmp_path / "rep.csv"), "--item",
                 str(tmp_path / "rep.item")]) == 0


def test_a_reader_that_stops_reading_is_no_refusal(corpus, monkeypatch, capsys):
    """`spidr info CKPT | head -1` ended with "error: Broken pipe" and status 2, which says the input was refused;
    now quietly, with the status of a command that SIGPIPE ended. A broken pipe of another kind is still an error."""
    import subprocess
    import sys
    from pathlib import Path

    import spidr

    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # (buffered, as usual:
    env["PYTHONPATH"] = str(Path(spidr.__file__).parents[1])  # the output then meets the closed pipe at exit)
    process = subprocess.Popen([sys.executable, "-m", "spidr", "info", str(corpus / "tiny.safetensors")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # the reader is gone before the first line
    stderr = process.stderr.read().decode()
    assert process.wait() == 141
    assert "error" not in stderr
    assert "Traceback" not in stderr

    def child_gone(_args):
        raise BrokenPipeError(32, "Broken pipe")  # (writing to a child process that died)

    monkeypatch.setattr("spidr.models.commands._info", child_gone)
    parser_default = main(["info", str(corpus / "tiny.safetensors")])
    assert parser_default == 2
    assert "spidr info: error: Broken pipe" in capsys.readouterr().err



def test_only_a_pipe_whose_reader_is_gone_counts_as_such(monkeypatch):
    from spidr import cli

    reading, writing = os.pipe()
    with os.fdopen(writing, "w") as stdout:
        monkeypatch.setattr("sys.stdout", stdout)
        assert not cli._stdout_reader_gone()  # (the reader is there)
        os.close(reading)
        assert cli._stdout_reader_gone()
        monkeypatch.undo()


def test_items_of_files_without_features_are_left_out_naming_those_files(caplog):
    from decimal import Decimal

    from spidr.eval.items import Items
    from spidr.eval.report import _items_for

    items = Items(files=("a", "b", "b", "c"), onsets=(Decimal("0.1"),) * 4, offsets=(Decimal("0.2"),) * 4,
                  labels={"#phone": ("x", "y", "x", "y")})
    with caplog.at_level("WARNING"):
        kept = _items_for(items, {"a": None})
    assert kept.files == ("a",)
    assert "3 of 4 ABX items refer to 2 files without features (e.g. 'b', 'c'); they are left out" in caplog.text


@pytest.mark.parametrize(("folder", "other"), [("", "spk3/other"), ("", "spk1/other"), ("/wav", "spk1/wav/other")])
def test_a_file_that_the_scan_could_not_read_names_its_twin_by_path_and_finds_nothing(corpus, tmp_path, capsys,
                                                                                      folder, other):
    """spk2/0001.wav has no readable header, so the scan leaves it out. extract named spk1/0001's units "0001" and
    recorded no skipped file, and every reader took items and alignments of spk2/0001 for spk1/0001's (units-quality
    scored them, abx on the units file gave a score). Truth: the unreadable file is named and recorded as a file the
    extraction skipped: rows spk1/0001 and other, by extract --kmeans and by spidr units alike; an alignment of
    spk2/0001 finds nothing (the quality is that of the others alone); items naming it are refused as skipped.
    Where every readable file is in spk1/ (or spk1/wav/, as CMU ARCTIC's speakers), the features' folder mirrors it
    (spk1/0001 is ./0001 there) and the unreadable file lies outside it, recorded by its full path: its path still
    finds nothing, and spk1's own path its file (weighed against the recorded audio_root, spk1/wav/0001 shares more
    with spk2/wav/0001 than with ./0001)."""
    from spidr.eval.feature_dir import skipped_stems
    from spidr.eval.kmeans import save_centroids
    from spidr.eval.units import read_units

    first, unreadable = f"spk1{folder}/0001", f"spk2{folder}/0001"
    audio = tmp_path / "audio"
    for name in (first, unreadable, other):
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        if name == unreadable:
            (audio / f"{name}.wav").write_bytes(b"not audio at all")
        else:
            sf.write(audio / f"{name}.wav", 0.1 * np.sin(np.arange(12000) / 7.0).astype(np.float32), 16000)
    save_centroids(tmp_path / "c.safetensors", np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["extract", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(audio), "--layers",
                 "3", "--kmeans", f"3:{tmp_path / 'c.safetensors'}", "--out", str(out)]) == 0
    outside = other.startswith("spk1")  # (the features' folder mirrors spk1/, the unreadable file is outside it)
    recorded = [f"{audio}/{unreadable}" if outside else unreadable]
    present = "./0001" if outside else first
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["skipped_stems"] == recorded
    assert metadata["audio_root"] == str(audio / ("spk1" + folder if outside else ""))
    assert main(["units", str(out / "layer_03"), "--centroids", str(tmp_path / "c.safetensors"), "--out",
                 str(tmp_path / "units.jsonl")]) == 0
    ours = read_units(tmp_path / "units.jsonl")
    assert sorted(ours) == sorted(read_units(out / "kmeans_units" / "layer_03.jsonl")) == sorted(["other", present])
    assert skipped_stems(tmp_path / "units.jsonl") == set(recorded)

    def quality(names: list[str]) -> dict:
        with (tmp_path / "phones.jsonl").open("w") as handle:
            for name in names:
                frames = len(ours["other" if name.endswith("other") else present])
                phones = ["abc"[(i // 7 + len(name)) % 3] for i in range(2 * frames)]  # (100 Hz labels)
                handle.write(json.dumps({"name": name, "phones": phones}) + "\n")
        capsys.readouterr()
        assert main(["units-quality", str(tmp_path / "units.jsonl"), str(tmp_path / "phones.jsonl"), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    scored = quality([first, other])
    assert scored == quality([first, f"corpus/{unreadable}", other]) == quality([first, unreadable, other])
    assert scored != quality([other])  # (the first file's alignment is found, by its path)
    items = ["#file onset offset #phone prev-phone next-phone speaker"] + [
        f"{name} {0.1 * k + 0.02:.2f} {0.1 * k + 0.08:.2f} {'ab'[k % 2]} x y {name.split('/')[0]}"
        for name in (first, unreadable, other) for k in range(4)]
    (tmp_path / "t.item").write_text("\n".join(items) + "\n")
    for features in (tmp_path / "units.jsonl", out / "layer_03"):
        assert main(["abx", str(features), str(tmp_path / "t.item")]) == 2
        assert "1 of the 3 files of" in (err := capsys.readouterr().err)
        assert f"were skipped by the extraction (first: ['{unreadable}']" in err
    (tmp_path / "t.item").write_text("\n".join(line for line in items if unreadable not in line) + "\n")
    for features in (tmp_path / "units.jsonl", out / "layer_03"):  # (every file named by its own path found)
        assert main(["abx", str(features), str(tmp_path / "t.item")]) == 0


# (tests below: wiring that a mutation round, 54 mutants over evaluate, probe, reports and plots, found untested)

def _evaluate(corpus, out, *extra, item=None):
    return main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(corpus / "manifest.csv"), "--item", str(item or corpus / "test.item"), "--layers", "3", "--out",
                 str(out), *extra])


def _scrambled_items(corpus, path):
    """The corpus's items with phones a a b b per file instead of its tones' a b a b: each phone then covers both
    tones, and ABX errors are far from 0 (on the true labels every distance scores 0 %, and could not be told
    apart)."""
    lines = (corpus / "test.item").read_text().splitlines()
    rows = [lines[0]]
    for index, line in enumerate(lines[1:]):
        fields = line.split()
        fields[3] = "ab"[(index % 4) // 2]
        rows.append(" ".join(fields))
    path.write_text("\n".join(rows) + "\n")
    return path




def test_evaluate_baselines_are_the_seeded_random_init_in_its_own_folder_and_mfcc_under_the_same_abx(corpus,
                                                                                                     tmp_path):
    """mut R19 (evaluate's features taken after the residual add), E03 (ABX seed not passed), E05 (MFCC scored
    under the default ABX condition), E06 (random init not seeded),
    E07 (the trained model scored again as "random init"), E08 (random init extracted into the model's folder),
    E09 (random-init rows named as the model's). Truth: the --help ("seed of the ABX subsampling and of the
    random-init baseline"), random_init_model's "a given seed always gives the same weights", and the MFCC baseline
    "on the same items" under the report's one ABX condition (AbxSettings: "shared by every row of a report")."""
    from spidr.data.manifest import read_manifest
    from spidr.eval.items import read_items
    from spidr.eval.journal import features_fingerprint
    from spidr.eval.report import AbxSettings, evaluate_mfcc
    from spidr.models.build import random_init_model
    from spidr.models.loading import load_model

    out = tmp_path / "r"
    item = _scrambled_items(corpus, tmp_path / "scrambled.item")
    assert _evaluate(corpus, out, "--baseline", "random-init", "--baseline", "mfcc", "--seed", "3", "--distance",
                     "euclidean", item=item) == 0
    rows = json.loads((out / "report.json").read_text())
    assert [(row["model"], row["layer"]) for row in rows] == [("tiny", 3), ("tiny (random init)", 3), ("MFCC", None)]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["abx"] == {"context": "within", "distance": "euclidean", "max_size_group": 10, "max_x_across": 5,
                               "seed": 3}
    # each model's features in its own folder, made by that model
    trained = load_model(corpus / "tiny.safetensors")
    model_meta = json.loads((out / "features" / "model" / "metadata.json").read_text())
    random_meta = json.loads((out / "features" / "random_init" / "metadata.json").read_text())
    assert model_meta["checkpoint"] == str(corpus / "tiny.safetensors")
    assert model_meta["before_residual"] is True  # the paper's feature (FFN output before the residual), as extract's
    assert model_meta["features_fingerprint"] == features_fingerprint(trained)
    assert random_meta["features_fingerprint"] == features_fingerprint(random_init_model(trained.cfg, seed=3))
    assert random_meta["features_fingerprint"] != features_fingerprint(random_init_model(trained.cfg, seed=0))
    # the MFCC row: the MFCC baseline under the command's ABX condition (not the default angular one)
    entries, items = read_manifest(corpus / "manifest.csv"), read_items(item)
    asked = evaluate_mfcc(entries, items, abx=AbxSettings(distance="euclidean", seed=3))
    default = evaluate_mfcc(entries, items)
    assert (asked.abx_within, asked.abx_across) != (default.abx_within, default.abx_across)  # (the check can tell)
    assert (rows[2]["abx_within"], rows[2]["abx_across"]) == pytest.approx((asked.abx_within, asked.abx_across))


def test_settings_json_records_the_alignment_rate_and_dtype_the_scores_were_measured_with(corpus, tmp_path, caplog):
    """mut E10 (settings.json says 100 Hz for 50 Hz alignments), E11 (settings.json says float32 for a bfloat16
    extraction): compare-reports then called two reports "measured alike" that were not. Truth: evaluation_settings'
    docstring (the alignments' rate "unless given", "the extraction dtype")."""
    out = tmp_path / "bf16"
    assert _evaluate(corpus, out, "--alignments", str(corpus / "align50.tsv"), "--alignment-rate", "50", "--dtype",
                     "bfloat16") == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["alignment_rate_hz"] == 50
    assert settings["dtype"] == "bfloat16"
    assert settings["alignments"]["name"] == "align50.tsv"


def _probe_inputs(corpus, tmp_path, monkeypatch, *extra):
    """The arguments that `spidr probe` hands to run_probes (captured; no probe is trained)."""
    from spidr.eval import probe

    seen = {}

    def run_probes(featurizers, train_entries, test_entries, alignments, **options):
        seen.update(featurizers=featurizers, train=train_entries, test=test_entries, options=options)
        return []

    def write_probe_report(rows, out, *, title, notes):
        path = Path(out) / "probe.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(title + "\n")
        return path

    monkeypatch.setattr(probe, "run_probes", run_probes)
    monkeypatch.setattr(probe, "write_probe_report", write_probe_report)
    assert main(["probe", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(corpus / "manifest.csv"),
                 "--alignments", str(corpus / "align50.tsv"), "--alignment-rate", "50", "--out",
                 str(tmp_path / "probe"), *extra]) == 0
    return seen


def test_probe_hands_its_seed_layers_and_dtype_to_the_split_the_random_init_and_every_featurizer(corpus, tmp_path,
                                                                                                monkeypatch):
    """mut Q01 (the held-out utterances drawn with seed 0 whatever --seed), Q03 (random init at seed 0), Q04 (the
    random init probed on every layer while the model is probed on --layers), Q05 (--layers ignored), Q06 / Q09
    (--dtype dropped from the probe settings / the model's featurizer). Truth: the --help ("seed of the utterance
    draw, the probe and random init", "1-based layers to probe") and split_entries / random_init_model called with
    that seed."""
    from spidr.data.manifest import read_manifest
    from spidr.eval.journal import features_fingerprint
    from spidr.eval.probe import split_entries
    from spidr.models.build import random_init_model

    seen = _probe_inputs(corpus, tmp_path, monkeypatch, "--seed", "4", "--layers", "2", "--dtype", "bfloat16",
                         "--test-fraction", "0.25", "--baseline", "random-init")
    entries = read_manifest(corpus / "manifest.csv")
    train, test = split_entries(entries, 0.25, seed=4)
    assert [e.fileid for e in test] != [e.fileid for e in split_entries(entries, 0.25, seed=0)[1]]  # (seed matters)
    assert [e.fileid for e in seen["test"]] == [e.fileid for e in test]
    assert [e.fileid for e in seen["train"]] == [e.fileid for e in train]
    model, random_init = seen["featurizers"]["tiny"], seen["featurizers"]["tiny (random init)"]
    for featurizer in (model, random_init):
        assert featurizer.representations == ("front_end", "projection", "layer_02")
        assert featurizer.settings.dtype == "bfloat16"
    assert seen["options"]["settings"].dtype == "bfloat16"
    assert seen["options"]["settings"].seed == 4
    assert features_fingerprint(random_init.model) == features_fingerprint(random_init_model(model.model.cfg, seed=4))


def test_evaluate_refuses_one_alignment_longer_than_its_audio_before_extracting(corpus, tmp_path, capsys):
    """The median rate check lets a few odd files through: one alignment of another recording (here s1_0's last
    phone runs to 5 s of a 1 s file) failed only after the extraction and the ABX of the layers before the first
    head, naming no file and an option evaluate does not have. Now it is refused first, naming both."""
    lines = (corpus / "align50.tsv").read_text().splitlines()
    last = next(i for i, line in enumerate(lines) if line.startswith("s1_0\t0.75"))
    lines[last] = "s1_0\t0.75\t5.00\tb"
    (tmp_path / "long.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    base = ["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(corpus / "manifest.csv"),
            "--item", str(corpus / "test.item"), "--alignments", str(tmp_path / "long.tsv"), "--alignment-rate", "50",
            "--out", str(out)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert (f"--alignments {tmp_path / 'long.tsv'}: utterance 's1_0' has 250 frames at 50 Hz, but its audio gives "
            "49") in err
    assert not out.exists()
    # without a head among the layers there is no PNMI to count them: ABX alone runs
    assert main([*base, "--layers", "1"]) == 0


def test_alignment_lengths_may_differ_from_the_units_by_two_frames_of_the_decoded_audio():
    """Hand count: 1 s at 16 kHz through the base front end (hop 320, receptive field 400) is 49 units at 50 Hz,
    98 frames at 100 Hz; count_matrix allows 2 frames: 96-100 pass, 95 and 101 do not. The extraction counts the
    decoded audio: where the manifest's length disagrees, the decoded length decides (a manifest 25 ms short of
    audio that fits is not refused; audio that does not fit is, said as its audio's), and a file that cannot be read
    (skipped by the extraction) is not refused."""
    from spidr.config import DEFAULT_CONV_LAYERS
    from spidr.eval.unit_quality import check_alignment_lengths

    def check(count: int, *, samples: int = 16_000, others: int = 0, decoded=None) -> None:
        alignments = {"u": ["a"] * count, **{f"v{i}": ["a"] * 10 for i in range(others)}}
        check_alignment_lengths(alignments, {"u": samples, "absent": 3, **{f"v{i}": 16_000 for i in range(others)}},
                                conv_layers=DEFAULT_CONV_LAYERS, alignment_rate_hz=100, where="--alignments a.tsv",
                                decoded_samples=decoded)

    for count in (96, 98, 100):
        check(count)
    for count in (95, 101):
        with pytest.raises(ValueError, match=rf"^--alignments a\.tsv: utterance 'u' has {count} frames at 100 Hz, "
                                             r"but the manifest's length of its audio gives 98 \(0\.98 s\): an "
                                             r"alignment of another recording\? They may differ by at most 2"):
            check(count)
    with pytest.raises(ValueError, match=r"gives 98 \(0\.98 s\) \(and 2 other utterance\(s\)\)"):
        check(101, others=2)
    # the manifest 25 ms short (15,600 samples: 96 frames) of audio whose 98 frames the alignment fits
    check(98, samples=15_600, decoded={"u": 16_000}.get)
    with pytest.raises(ValueError, match=r"utterance 'u' has 92 frames at 100 Hz, but its audio gives 98"):
        check(92, samples=15_600, decoded={"u": 16_000}.get)
    check(92, samples=15_600, decoded=lambda name: None)  # unreadable: skipped by the extraction


@pytest.mark.parametrize("command", ["extract", "evaluate", "probe"])
def test_a_manifest_of_no_rows_is_refused_by_name(corpus, tmp_path, capsys, command):
    """A header-only manifest (a filter that matched nothing): extract wrote "features of 0 files" and succeeded,
    evaluate crashed with a bare StopIteration, probe named no file."""
    empty = tmp_path / "empty.csv"
    empty.write_text("fileid,path,num_samples\n")
    args = {"extract": [], "evaluate": ["--item", str(corpus / "test.item")],
            "probe": ["--alignments", str(corpus / "align50.tsv"), "--alignment-rate", "50"]}[command]
    assert main([command, "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(empty),
                 "--out", str(tmp_path / "out"), *args]) == 2
    assert f"{empty} lists no utterance (no rows)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_to_replace_another_model_s_evaluation(corpus, tmp_path, capsys):
    """Reusing a command line with another --checkpoint silently replaced the first model's features and report (an
    INFO line said so), where extract refuses another model. Now refused, naming the model there, unless
    --overwrite; a rerun of the same model still reuses its features."""
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    export_safetensors(build_model(SpidRConfig(**TINY)).eval(), other)
    out = tmp_path / "report"

    def evaluate(checkpoint: Path, *extra: str) -> int:
        return main(["evaluate", "--checkpoint", str(checkpoint), "--manifest", str(corpus / "manifest.csv"),
                     "--item", str(corpus / "test.item"), "--layers", "1", "--out", str(out), *extra])

    assert evaluate(corpus / "tiny.safetensors") == 0
    first = (out / "report.json").read_bytes()
    assert evaluate(corpus / "tiny.safetensors") == 0  # the same model: rerun, features reused
    capsys.readouterr()
    assert evaluate(other) == 2
    assert (f"{out} holds the evaluation of another model ({corpus / 'tiny.safetensors'}): give another --out, or "
            "--overwrite to replace it") in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == first
    assert evaluate(other, "--overwrite") == 0
    assert (out / "report.json").read_bytes() != first


def test_evaluate_takes_the_decoded_length_where_the_manifest_s_is_a_little_off(corpus, tmp_path):
    """4 s files whose manifest says 600 samples fewer (within the extraction's 1 %): by the manifest's length the
    100 Hz alignments overrun the units by 6 frames, by the decoded audio by 2. Evaluate takes the decoded length and
    runs, as the extraction and PNMI do."""
    rows, intervals = ["fileid,path,num_samples"], ["utterance\tonset\toffset\tphone"]
    for name in ("s1_0", "s1_1", "s2_0", "s2_1"):
        wave, rate = sf.read(corpus / f"{name}.wav", dtype="float32")
        sf.write(tmp_path / f"{name}.wav", np.tile(wave, 4), rate)
        rows.append(f"{name},{name}.wav,{4 * 16000 - 600}")
        intervals += [f"{name}\t{0.25 * i:.2f}\t{0.25 * (i + 1):.2f}\t{PHONES[i % 4]}" for i in range(16)]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "align.tsv").write_text("\n".join(intervals) + "\n")
    assert main(["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
                 str(tmp_path / "manifest.csv"), "--item", str(corpus / "test.item"), "--alignments",
                 str(tmp_path / "align.tsv"), "--alignment-rate", "100", "--out", str(tmp_path / "report")]) == 0


def test_probe_refuses_alignments_of_other_recordings_before_any_work(corpus, tmp_path, capsys):
    """Alignments a quarter second short of every 1 s file (37 frames at 50 Hz where the audio gives 49; the
    labelling allows 3): refused by name before a feature is computed, not as the first utterance is labelled."""
    short = tmp_path / "short.tsv"
    short.write_text("\n".join(line for line in (corpus / "align50.tsv").read_text().splitlines()
                                if not line.endswith(("0.75\t1.00\ta", "0.75\t1.00\tb"))) + "\n")
    assert main(["probe", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(corpus / "manifest.csv"),
                 "--alignments", str(short), "--alignment-rate", "50", "--test-fraction", "0.25",
                 "--out", str(tmp_path / "probe")]) == 2
    err = capsys.readouterr().err
    assert f"--alignments {short} (training utterances): utterance 's" in err
    assert "has 37 frames at 50 Hz, but its audio gives 49 (0.98 s) (and 2 other utterance(s))" in err
    assert not (tmp_path / "probe").exists()


def test_a_manifest_length_off_by_more_than_two_frames_is_measured_again_by_decoding():
    """Hand count: 15,600 samples give 48 frames at 50 Hz (96 at 100 Hz), 16,000 give 49 (98). An alignment of 99
    frames misses the manifest's 96 by 3 (more than the 2 allowed) but fits the decoded 98: taken, and only
    because the decoder was asked (without it, refused by the manifest's length)."""
    from spidr.config import DEFAULT_CONV_LAYERS
    from spidr.eval.unit_quality import check_alignment_lengths

    asked = []

    def decoded(name):
        asked.append(name)
        return 16_000

    def check(decoded_samples):
        check_alignment_lengths({"u": ["a"] * 99}, {"u": 15_600}, conv_layers=DEFAULT_CONV_LAYERS,
                                alignment_rate_hz=100, where="a.tsv", decoded_samples=decoded_samples)

    check(decoded)
    assert asked == ["u"]
    with pytest.raises(ValueError, match=r"utterance 'u' has 99 frames at 100 Hz, but the manifest's length of its "
                                         r"audio gives 96"):
        check(None)


def test_past_the_decoded_suspects_the_rest_is_left_to_the_check_after_the_extraction(monkeypatch):
    """At most MAX_DECODED_SUSPECTS disagreeing utterances are decoded; the ones after them (a manifest whose
    lengths are all somewhat off) are neither decoded nor refused by the manifest's length: the check after the
    extraction counts their decoded frames."""
    from spidr.config import DEFAULT_CONV_LAYERS
    from spidr.eval import unit_quality
    from spidr.eval.unit_quality import check_alignment_lengths

    monkeypatch.setattr(unit_quality, "MAX_DECODED_SUSPECTS", 2)
    asked = []

    def decoded(name):
        asked.append(name)
        return 16_000  # 98 frames at 100 Hz: every alignment below fits its audio

    names = [f"u{i}" for i in range(5)]
    check_alignment_lengths({name: ["a"] * 98 for name in names}, dict.fromkeys(names, 15_000),  # (the manifest: 92)
                            conv_layers=DEFAULT_CONV_LAYERS, alignment_rate_hz=100, where="a.tsv",
                            decoded_samples=decoded)
    assert asked == ["u0", "u1"]


def test_a_killed_evaluation_of_another_model_is_replaced_without_overwrite(tmp_path, capsys):
    """Only a finished evaluation (report.json) of another model is refused without --overwrite: the features that
    a killed evaluation left (no report yet) are replaced by the next model's evaluation, as evaluate always did."""
    from spidr.eval.journal import STATE_DIR

    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    manifest, items = ["fileid,path,num_samples"], ["#file onset offset #phone prev-phone next-phone speaker"]
    for speaker in ("s1", "s2"):
        for k in range(2):
            name = f"{speaker}_{k}"
            sf.write(root / f"{name}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
            manifest.append(f"{name},{name}.wav,16000")
            for i, phone in enumerate("abab"):
                items.append(f"{name} {0.25 * i + 0.02:.2f} {0.25 * i + 0.23:.2f} {phone} x y {speaker}")
    (root / "manifest.csv").write_text("\n".join(manifest) + "\n")
    (root / "test.item").write_text("\n".join(items) + "\n")
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        checkpoints.append(root / f"m{seed}.safetensors")
        export_safetensors(build_model(SpidRConfig(**TINY)).eval(), checkpoints[-1])
    out = tmp_path / "report"

    def evaluate(checkpoint):
        return main(["evaluate", "--checkpoint", str(checkpoint), "--manifest", str(root / "manifest.csv"),
                     "--item", str(root / "test.item"), "--layers", "1", "--out", str(out)])

    assert evaluate(checkpoints[0]) == 0
    (out / "report.json").unlink()  # what a kill after the extraction, before the report, leaves
    assert (out / "features" / "model" / STATE_DIR / "state.json").is_file()
    capsys.readouterr()
    assert evaluate(checkpoints[1]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report
    metadata = json.loads((out / "features" / "model" / "metadata.json").read_text())
    assert metadata["checkpoint"] == str(checkpoints[1])


def test_probe_names_the_test_alignments_for_a_held_out_utterance_they_do_not_fit(tmp_path, capsys):
    """With --test-alignments, a held-out utterance whose alignment does not span its audio is refused naming that
    file (not --alignments, which is right), before any work."""
    rng = np.random.default_rng(0)
    rows = {"train": ["fileid,path,num_samples"], "test": ["fileid,path,num_samples"]}
    full = ["utterance\tonset\toffset\tphone"]
    for split, names in (("train", ["t0", "t1", "t2", "t3"]), ("test", ["h0", "h1"])):
        for name in names:
            sf.write(tmp_path / f"{name}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
            rows[split].append(f"{name},{name}.wav,16000")
            full += [f"{name}\t{0.25 * i:.2f}\t{0.25 * (i + 1):.2f}\t{'ab'[i % 2]}" for i in range(4)]
    for split, lines in rows.items():
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "train.tsv").write_text("\n".join(full) + "\n")
    short = [line for line in full if not (line.startswith("h") and line.split("\t")[1] == "0.75")]
    (tmp_path / "test.tsv").write_text("\n".join(short) + "\n")  # held-out ones end at 0.75 s of 1 s
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.safetensors"
    export_safetensors(build_model(SpidRConfig(**TINY)).eval(), checkpoint)
    assert main(["probe", "--checkpoint", str(checkpoint), "--manifest", str(tmp_path / "train.csv"),
                 "--test-manifest", str(tmp_path / "test.csv"), "--alignments", str(tmp_path / "train.tsv"),
                 "--test-alignments", str(tmp_path / "test.tsv"), "--alignment-rate", "50",
                 "--out", str(tmp_path / "probe")]) == 2
    err = capsys.readouterr().err
    assert f"--test-alignments {tmp_path / 'test.tsv'} (held-out utterances): utterance 'h" in err
    assert "has 37 frames at 50 Hz, but its audio gives 49 (0.98 s) (and 1 other utterance(s))" in err
    assert not (tmp_path / "probe").exists()


def _stressed_corpus(root):
    """A tiny model whose heads always pick codeword 5 (zero weights, one bias up: a collapsed codebook), two
    one-second files, an item file and 50 Hz TSV alignments whose vowels carry ARPAbet stress digits."""
    from spidr.config import SpidRConfig
    from spidr.models.build import build_model
    from spidr.models.loading import export_safetensors

    torch.manual_seed(0)
    model = build_model(SpidRConfig(**EXTRACTION_MODEL)).eval()
    with torch.no_grad():
        for head in model.heads:
            head[0].weight.zero_()
            head[0].bias.zero_()
            head[0].bias[5] = 1.0
    export_safetensors(model, root / "collapsed.safetensors")
    rng = np.random.default_rng(0)
    items, alignments, manifest = ([HEADER_ITEMS], ["utterance\tonset\toffset\tphone"], ["fileid,path,num_samples"])
    for name, speaker in (("s1_0", "s1"), ("s2_0", "s2")):
        sf.write(root / f"{name}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
        manifest.append(f"{name},{name}.wav,16000")
        for i, phone in enumerate(("AH1", "T", "AH0", "T")):
            items.append(f"{name} {0.25 * i + 0.02:.2f} {0.25 * i + 0.23:.2f} {phone[:2]} x y {speaker}")
            alignments.append(f"{name}\t{0.25 * i:.2f}\t{0.25 * (i + 1):.2f}\t{phone}")
    (root / "manifest.csv").write_text("\n".join(manifest) + "\n")
    (root / "test.item").write_text("\n".join(items) + "\n")
    (root / "align50.tsv").write_text("\n".join(alignments) + "\n")


HEADER_ITEMS = "#file onset offset #phone prev-phone next-phone speaker"


def test_evaluate_records_stress_removal_and_warns_of_collapsed_codebook_units(tmp_path, caplog):
    """mut RP5 (evaluate passed stress_removed=False: a report whose PNMI had the digits taken off recorded settings
    equal to an old report's that kept them) and RP3 (evaluate_model's _warn_if_collapsed call dropped: codebook
    units of one codeword scored near chance without a word)."""
    from spidr.cli import main

    _stressed_corpus(tmp_path)
    common = ["evaluate", "--checkpoint", str(tmp_path / "collapsed.safetensors"), "--manifest",
              str(tmp_path / "manifest.csv"), "--item", str(tmp_path / "test.item"), "--alignments",
              str(tmp_path / "align50.tsv"), "--alignment-rate", "50", "--layers", "2"]
    with caplog.at_level(logging.WARNING):
        assert main([*common, "--out", str(tmp_path / "removed")]) == 0
    assert "layer 2: its codebook units use 1 of 16 codewords (perplexity 1.00): the head has collapsed" in (
        caplog.text)
    settings = json.loads((tmp_path / "removed" / "settings.json").read_text())
    assert settings["alignment_stress"] == "removed"
    assert main([*common, "--keep-stress", "--out", str(tmp_path / "kept")]) == 0
    assert "alignment_stress" not in json.loads((tmp_path / "kept" / "settings.json").read_text())


def test_evaluate_does_not_warn_of_the_random_init_baseline_s_collapsed_units(tmp_path, monkeypatch):
    """A random-init model's codebook units are degenerate by nature: the demo's report warned that the baseline's
    head 'has collapsed (a model trained too little ...)'. The check runs on the evaluated model only."""
    from spidr.cli import main
    from spidr.eval import report

    _stressed_corpus(tmp_path)
    checked = []
    monkeypatch.setattr(report, "_warn_if_collapsed", lambda units, size, where: checked.append(where))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "collapsed.safetensors"), "--manifest",
                 str(tmp_path / "manifest.csv"), "--item", str(tmp_path / "test.item"), "--layers", "2",
                 "--baseline", "random-init", "--out", str(tmp_path / "report")]) == 0
    assert checked == ["collapsed layer 2"]


def test_a_tar_of_audio_with_an_upper_case_suffix_is_scanned_as_a_tar(tmp_path):
    # mutant: _entries telling a .tar by its exact suffix. Truth: --manifest takes "a folder or .tar scanned for
    # exts", and scan reads a .TAR as a .tar: such an archive is scanned, not read as a manifest table.
    from spidr.eval.pipeline_commands import _entries

    for name in ("a", "b"):
        sf.write(tmp_path / f"{name}.wav", np.zeros(1600, dtype=np.float32), 16000)
    archive = tmp_path / "CORPUS.TAR"
    with tarfile.open(archive, "w") as tar:
        for name in ("a", "b"):
            tar.add(tmp_path / f"{name}.wav", arcname=f"spk/{name}.wav")
    entries, unread = _entries(str(archive))
    assert sorted(entry.fileid for entry in entries) == ["a", "b"]
    assert [entry.num_samples for entry in entries] == [1600, 1600]
    assert list(unread) == []


@pytest.mark.skipif(importlib.util.find_spec("praatio") is None, reason="praatio (spidr[eval]) is not installed")
def test_evaluate_reads_a_textgrid_folder_as_the_equivalent_tsv(corpus, tmp_path):
    """The Montreal Forced Aligner's output (OUT/<speaker>/<utterance>.TextGrid) as --alignments gives the PNMI of
    the interval TSV of the same intervals, and settings.json records the folder by its TextGrids (a folder's bytes
    cannot be read: the report would fail after every layer was scored)."""
    from spidr.eval.textgrid import textgrids_digest
    from test_textgrid import _long

    folder = tmp_path / "mfa"
    for speaker in ("s1", "s2"):
        (folder / speaker).mkdir(parents=True)
        for k in range(2):
            phones = [(f"{0.25 * i:.2f}", f"{0.25 * (i + 1):.2f}", phone) for i, phone in enumerate(PHONES)]
            (folder / speaker / f"{speaker}_{k}.TextGrid").write_text(_long({"words": [("0", "1", "")],
                                                                               "phones": phones}))
    common = ["evaluate", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest",
              str(corpus / "manifest.csv"), "--item", str(corpus / "test.item"), "--alignment-rate", "50",
              "--layers", "3"]
    assert main([*common, "--alignments", str(corpus / "align50.tsv"), "--out", str(tmp_path / "tsv")]) == 0
    assert main([*common, "--alignments", str(folder), "--out", str(tmp_path / "tg")]) == 0
    quality = [[row["quality"] for row in json.loads((tmp_path / out / "report.json").read_text())]
               for out in ("tsv", "tg")]
    assert quality[0] == quality[1]
    assert any(row and "pnmi" in row for row in quality[1])
    settings = json.loads((tmp_path / "tg" / "settings.json").read_text())
    assert settings["alignments"] == {"name": "mfa", "sha256": textgrids_digest(folder)}


def _code(argv: list[str]) -> int:
    """spidr's exit status for argv: main's return, or argparse's SystemExit (a refusal at either level)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_probe_refuses_to_replace_an_existing_report_without_overwrite(corpus, tmp_path, capsys):
    """probe is the only report-writing command with neither --overwrite nor a refusal: a second probe (another model,
    other settings) into the same --out silently replaced the first one's probe.md/json/png."""
    out = tmp_path / "probe"
    common = ["probe", "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(corpus / "manifest.csv"),
              "--alignments", str(corpus / "align50.tsv"), "--alignment-rate", "50", "--test-fraction", "0.25",
              "--out", str(out)]
    assert main([*common, "--epochs", "1"]) == 0
    before = (out / "probe.json").read_bytes()
    capsys.readouterr()
    assert main([*common, "--epochs", "2"]) == 2
    assert capsys.readouterr().err == (f"spidr probe: error: output {out} already exists; pass --overwrite to "
                                       "replace it\n")
    assert (out / "probe.json").read_bytes() == before
    assert main([*common, "--epochs", "2", "--overwrite"]) == 0
    assert (out / "probe.json").read_bytes() != before


@pytest.mark.parametrize("command", ["evaluate", "probe"])
def test_a_zero_alignment_rate_is_a_usage_error_not_a_traceback(corpus, tmp_path, capsys, command):
    """--alignment-rate 0 raised ZeroDivisionError (exit 1, traceback), evaluate's after extracting every layer."""
    args = [command, "--checkpoint", str(corpus / "tiny.safetensors"), "--manifest", str(corpus / "manifest.csv"),
            "--alignments", str(corpus / "align50.tsv"), "--alignment-rate", "0", "--out", str(tmp_path / "o")]
    if command == "evaluate":
        args += ["--item", str(corpus / "test.item")]
    assert _code(args) == 2
    assert "alignment-rate" in capsys.readouterr().err


@pytest.mark.parametrize("present", [["notes.txt"], ["probe.json", "probe.png"]],
                         ids=["other-files", "killed-before-probe.md"])
def test_probe_refuses_only_a_folder_that_holds_a_report(tmp_path: Path, capsys, present: list[str]) -> None:
    """README: 'A folder that holds a report already is refused unless --overwrite is given'. check_new_output
    refuses a folder holding anything: a folder of other files (an evaluate report folder) with no probe report,
    and the folder a killed probe left (write_probe_report writes probe.json and probe.png before probe.md, and
    unlinks probe.md first), whose rerun must redo it cleanly. Here the run goes on and fails on the missing
    checkpoint instead."""
    out = tmp_path / "out"
    out.mkdir()
    for name in present:
        (out / name).write_text("x")
    argv = ["probe", "--checkpoint", str(tmp_path / "missing.pt"), "--manifest", str(tmp_path / "m.csv"),
            "--alignments", str(tmp_path / "a.tsv"), "--out", str(out)]
    assert main(argv) == 2
    assert "missing.pt" in capsys.readouterr().err  # (not "already exists")
    (out / "probe.md").write_text("# Phone probe of another model\n")
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"spidr probe: error: output {out} already exists; pass --overwrite to "
                                       "replace it\n")


# Was a defect: --features MFCC=DIR --baseline mfcc (or NAME (random init) with --baseline random-init) silently
# replaced the stored features by the baseline: the report had no row of them and the command exited 0.
def test_probe_refuses_stored_features_named_as_a_baseline(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "feats").mkdir()
    manifest, alignments = ["fileid,path,num_samples"], ["utterance\tonset\toffset\tphone"]
    for index in range(4):
        name = f"s{index % 2}_{index}"
        sf.write(tmp_path / f"{name}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
        np.save(tmp_path / "feats" / f"{name}.npy", rng.normal(size=(49, 3)).astype(np.float32))
        manifest.append(f"{name},{name}.wav,16000")
        alignments += [f"{name}\t0.00\t0.50\ta", f"{name}\t0.50\t1.00\tb"]
    (tmp_path / "manifest.csv").write_text("\n".join(manifest) + "\n")
    (tmp_path / "align.tsv").write_text("\n".join(alignments) + "\n")
    command = ["probe", "--features", f"MFCC={tmp_path / 'feats'}", "--baseline", "mfcc", "--frequency", "50",
               "--manifest", str(tmp_path / "manifest.csv"), "--alignments", str(tmp_path / "align.tsv"),
               "--alignment-rate", "100", "--test-fraction", "0.5", "--epochs", "1", "--out", str(tmp_path / "out")]
    code = main(command)
    if code == 0:  # (the reviewed code: one MFCC row, the stored features' gone)
        rows = json.loads((tmp_path / "out" / "probe.json").read_text())
        pytest.fail(f"exit 0 with the rows {[(row['model'], row['representation']) for row in rows]}")
    assert code == 2
    assert "--baseline mfcc" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _stored_probe_inputs(tmp_path, *, frames: int = 49, seconds: float = 1.0, rate_hz: float = 50.0):
    """4 files of ``seconds`` (noise), a flat folder of (``frames``, 3) features named by id (another tool's: no
    record of their rate), 100 Hz interval alignments (phone a then b) and the manifest; the probe's common
    arguments."""
    rng = np.random.default_rng(0)
    (tmp_path / "feats").mkdir()
    manifest, alignments = ["fileid,path,num_samples"], ["utterance\tonset\toffset\tphone"]
    samples = int(16000 * seconds)
    for index in range(4):
        name = f"s{index % 2}_{index}"
        sf.write(tmp_path / f"{name}.wav", (0.1 * rng.standard_normal(samples)).astype(np.float32), 16000)
        values = rng.normal(size=(frames, 3)).astype(np.float32)
        values[: frames // 2, 0] += 3.0
        np.save(tmp_path / "feats" / f"{name}.npy", values)
        manifest.append(f"{name},{name}.wav,{samples}")
        alignments += [f"{name}\t0.00\t{seconds / 2:.2f}\ta", f"{name}\t{seconds / 2:.2f}\t{seconds:.2f}\tb"]
    (tmp_path / "manifest.csv").write_text("\n".join(manifest) + "\n")
    (tmp_path / "align.tsv").write_text("\n".join(alignments) + "\n")
    return ["--manifest", str(tmp_path / "manifest.csv"), "--alignments", str(tmp_path / "align.tsv"),
            "--alignment-rate", "100", "--test-fraction", "0.5", "--epochs", "1"]


def test_probe_features_names_are_checked(tmp_path, capsys):
    """mut34 C01 ('=DIR': a representation named ''), C15 (' =DIR': named ' ') and C02 (a NAME given twice: the
    second folder silently replaced the first). Each refused naming the option, exit 2, nothing written."""
    common = _stored_probe_inputs(tmp_path)
    feats = tmp_path / "feats"
    out = tmp_path / "out"
    for features, message in (([f"={feats}"], "expected NAME=DIR"), ([f" ={feats}"], "expected NAME=DIR"),
                              ([f"a={feats}", f"a={tmp_path}"], "the name 'a' is given twice")):
        argv = ["probe", *common, "--out", str(out)]
        for spec in features:
            argv += ["--features", spec]
        assert main(argv) == 2, features
        assert message in capsys.readouterr().err, features
    assert not out.exists()


def test_probe_of_several_stored_features_at_the_default_rate_names_them_all(tmp_path, capsys, caplog):
    """mut34 C12 (the report titled by the first --features NAME only). Features that record no rate are read at
    50 Hz with a warning naming --frequency (1 s → 49 frames at 50 Hz: they span the 100 Hz alignments); the
    report is titled by every NAME, and each NAME has its rows, in the order given."""
    common = _stored_probe_inputs(tmp_path)
    feats = tmp_path / "feats"
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["probe", "--features", f"b={feats}", "--features", f"a={feats}", *common,
                     "--out", str(out)]) == 0
    assert "assuming 50 Hz" in caplog.text
    assert "--frequency" in caplog.text
    assert (out / "probe.md").read_text().startswith("# Phone probe of b, a\n")
    rows = json.loads((out / "probe.json").read_text())
    assert [(row["model"], row["representation"]) for row in rows] == [("b", "feats"), ("a", "feats")]


def test_probe_features_without_a_record_take_frequency_as_given(tmp_path, capsys):
    """mut34 C05 (--frequency rounded to a whole number of Hz: 62.5 read as 62). Features at 62.5 Hz (a hop of 256
    samples) that record no rate: 8 s → 500 frames, which span the 800 alignment frames at 100 Hz only at 62.5 Hz
    (at 62 Hz they span 806.5, past the 2 + 1.6 frames frame_labels allows; at the default 50 Hz, 1000)."""
    common = _stored_probe_inputs(tmp_path, frames=500, seconds=8.0)
    feats = tmp_path / "feats"
    assert main(["probe", "--features", f"m={feats}", "--frequency", "62.5", *common,
                 "--out", str(tmp_path / "ok")]) == 0
    rows = json.loads((tmp_path / "ok" / "probe.json").read_text())
    assert rows[0]["num_train_frames"] == 2 * 500
    capsys.readouterr()
    assert main(["probe", "--features", f"m={feats}", *common, "--out", str(tmp_path / "refused")]) == 2
    assert "(--frequency)" in capsys.readouterr().err


def test_probe_refuses_layers_of_one_folder_that_record_different_rates(tmp_path, capsys):
    """mut34 C06 (one rate taken at random from a set of two). A layer folder's own record is read first; two
    layers recording 50 and 100 Hz cannot both be probed at one rate: refused naming both rates."""
    common = _stored_probe_inputs(tmp_path)
    for layer, rate in (("layer_01", 50), ("layer_02", 100)):
        (tmp_path / "ext" / layer).mkdir(parents=True)
        for path in (tmp_path / "feats").glob("*.npy"):
            (tmp_path / "ext" / layer / path.name).write_bytes(path.read_bytes())
        (tmp_path / "ext" / layer / "metadata.json").write_text(json.dumps({"frame_rate_hz": rate}))
    assert main(["probe", "--features", f"m={tmp_path / 'ext'}", *common, "--out", str(tmp_path / "out")]) == 2
    assert "its layers record different frame rates ([50.0, 100.0])" in capsys.readouterr().err


def test_probe_refuses_options_of_a_checkpoint_that_is_not_given(tmp_path, capsys):
    """mut34 C13 (--name) and C14 (--baseline random-init: a traceback, 'NoneType' object has no attribute 'cfg',
    after the inputs were read). Refused by name, exit 2, before any work."""
    common = _stored_probe_inputs(tmp_path)
    for extra, message in ((["--name", "x"], "--name: options of the --checkpoint model"),
                           (["--baseline", "random-init"], "--baseline random-init: options of the --checkpoint")):
        assert main(["probe", "--features", f"m={tmp_path / 'feats'}", *common, *extra,
                     "--out", str(tmp_path / "out")]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "out").exists()


def _tiny_checkpoint(path):
    from spidr.config import SpidRConfig
    from spidr.models.build import build_model
    from spidr.models.loading import export_safetensors
    from train_fixtures import EXTRACTION_MODEL

    torch.manual_seed(0)
    export_safetensors(build_model(SpidRConfig(**EXTRACTION_MODEL)).eval(), path)
    return path


def test_probe_refuses_stored_features_named_as_the_model_or_its_random_init(tmp_path, capsys):
    """mut34 C11 (--features NAME=... with the --checkpoint model's name) and C10 (with the name of its
    --baseline random-init row, 'NAME (random init)'): each silently replaced the stored features' rows by the
    model's. Refused by name, exit 2, nothing written."""
    common = _stored_probe_inputs(tmp_path)
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.safetensors")
    feats = tmp_path / "feats"
    for extra, message in ((["--features", f"tiny={feats}"], "the name of the --checkpoint model"),
                           (["--features", f"tiny (random init)={feats}", "--baseline", "random-init"],
                            "the name of the --baseline random-init")):
        assert main(["probe", "--checkpoint", str(checkpoint), *extra, *common, "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "out").exists()


def test_probe_features_skip_the_files_their_extraction_skipped(tmp_path, capsys, caplog):
    """mut34 C07 (--features read without the extraction's record of the files it skipped). Truth (the review fix
    that made StoredFeaturizer skip them): spidr extract skips an unreadable file of the manifest and records it;
    spidr probe --features on that extraction leaves the file out with a warning (it failed: 'holds no features
    of ...'), as the model's own probe leaves it out."""
    common = _stored_probe_inputs(tmp_path)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not a wave file")
    with (tmp_path / "manifest.csv").open("a") as handle:
        handle.write("broken,broken.wav,16000\n")
    with (tmp_path / "align.tsv").open("a") as handle:
        handle.write("broken\t0.00\t0.50\ta\nbroken\t0.50\t1.00\tb\n")
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.safetensors")
    assert main(["extract", "--checkpoint", str(checkpoint), "--manifest", str(tmp_path / "manifest.csv"),
                 "--layers", "1", "--out", str(tmp_path / "ext")]) == 0
    assert "1 unusable file(s) skipped" in capsys.readouterr().out
    with caplog.at_level(logging.WARNING):
        code = main(["probe", "--features", f"m={tmp_path / 'ext'}", *common, "--test-fraction", "0.4",
                     "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert "broken.wav: the extraction of its features skipped it" in caplog.text
    rows = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert [row["representation"] for row in rows] == ["layer_01"]
    assert sum(row["num_test_utterances"] for row in rows) + rows[0]["num_train_frames"] // 49 == 4



def test_probe_refuses_frequency_without_stored_features(tmp_path, capsys):
    """Was a defect (mut34): --frequency is the rate of --features that record none; with a --checkpoint alone it
    was accepted and silently ignored (exit 0: the model's features are at the rate its conv stack gives), where
    --layers or --name without a --checkpoint are refused: refused by name, exit 2, before any work."""
    common = _stored_probe_inputs(tmp_path)
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.safetensors")
    assert main(["probe", "--checkpoint", str(checkpoint), "--frequency", "100", *common,
                 "--out", str(tmp_path / "out")]) == 2
    assert "--frequency" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
