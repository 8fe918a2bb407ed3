"""``spidr lm-units``: the unit files of every set of a benchmark, from a model (codebook, k-means) or the oracle."""

from __future__ import annotations

import contextlib
import json
import math
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spidr.cli import build_parser, main
from spidr.config import SpidRConfig
from spidr.eval.features import ExtractionSettings, extract_batch
from spidr.eval.kmeans import load_centroids
from spidr.lm.bench_units import write_model_units
from spidr.models.build import build_model
from spidr.models.loading import export_safetensors
from test_lm_study import CONV_100HZ

CFG = SpidRConfig(extractor_conv_layer_config=((16, 10, 5), (16, 3, 2), (16, 3, 2), (16, 3, 2), (16, 3, 2),
                                               (16, 2, 2), (16, 2, 2)),
                  encoder_embed_dim=32, encoder_num_layers=3, encoder_num_heads=2, encoder_ff_interm_features=64,
                  encoder_pos_conv_groups=4, num_codebooks=2, codebook_size=16)


def _wav(path: Path, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    signal = np.sin(2 * np.pi * (150 + 100 * rng.random()) * t) + 0.1 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((signal / np.abs(signal).max() * 20000).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    for name, count in (("train", 4), ("lexical/dev", 3), ("tsc/dev", 2)):
        folder = root / name
        rows = ["fileid,path,num_samples"]
        labels = []
        for i in range(count):
            stem = f"{name.replace('/', '-')}-{i}"
            seconds = 0.6 + 0.3 * i
            _wav(folder / f"{stem}.wav", seconds, seed=hash(stem) % 1000)
            rows.append(f"{stem},{folder / f'{stem}.wav'},{int(16000 * seconds)}")
            labels.append(json.dumps({"name": stem, "phones": ["SIL"] * int(50 * seconds)}))
        if name != "tsc/dev":  # a set without manifest.csv is scanned
            (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
        (folder / "frame_labels_20ms.jsonl").write_text("\n".join(labels) + "\n")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    export_safetensors(build_model(CFG), path)
    return path


def _read(path: Path) -> dict[str, list[int]]:
    return {row["name"]: row["units"] for row in map(json.loads, path.read_text().splitlines())}


def test_codebook_and_oracle_units_of_every_set(bench, checkpoint, tmp_path):
    assert main(["lm-units", str(bench), str(tmp_path / "cb"), "--checkpoint", str(checkpoint)]) == 0
    from spidr.models.loading import load_model

    model = load_model(checkpoint).eval()
    for layer in (2, 3):  # the two heads' layers
        for name in ("train", "lexical/dev", "tsc/dev"):
            units = _read(tmp_path / "cb" / f"layer_{layer:02d}" / f"{name}.jsonl")
            assert len(units) == {"train": 4, "lexical/dev": 3, "tsc/dev": 2}[name]
        # the same as extracting one file alone and taking the head's arg-max
        from spidr.data.audio import load_audio

        stem = "train-2"
        wave_ = load_audio(str(bench / "train" / f"{stem}.wav"), normalize=True)
        (alone,) = extract_batch(model, [wave_], ExtractionSettings(layers=(layer,), codebooks=True))
        written = _read(tmp_path / "cb" / f"layer_{layer:02d}" / "train.jsonl")[stem]
        assert written == alone[f"units_{layer:02d}"].tolist()
        # recorded as spidr units records its output: abx and units-quality read the rate (they assumed 50 Hz)
        from spidr.eval.feature_dir import extraction_frame_rate, recorded_num_units

        units_file = tmp_path / "cb" / f"layer_{layer:02d}" / "lexical" / "dev.jsonl"
        hop = math.prod(stride for *_, stride in CFG.extractor_conv_layer_config)
        assert extraction_frame_rate(units_file)[0] == 16000 / hop
        assert recorded_num_units(units_file)[0] == CFG.codebook_size
    assert main(["lm-units", str(bench), str(tmp_path / "oracle"), "--oracle"]) == 0
    assert (tmp_path / "oracle" / "lexical" / "dev.jsonl").read_text() == (
        bench / "lexical" / "dev" / "frame_labels_20ms.jsonl").read_text()
    with pytest.raises(ValueError, match="no codebook head"):
        write_model_units(model, bench, tmp_path / "x", layers=(1,))


def test_kmeans_units_are_the_nearest_centroid(bench, checkpoint, tmp_path, capsys):
    assert main(["lm-units", str(bench), str(tmp_path / "km"), "--checkpoint", str(checkpoint), "--layers", "1",
                 "--kmeans", "4"]) == 0
    units = _read(tmp_path / "km" / "layer_01" / "lexical" / "dev.jsonl")
    assert {u for seq in units.values() for u in seq} <= set(range(4))
    # the centroids are fitted again from the same seeded sample: assign one file by hand
    from spidr.data.audio import load_audio
    from spidr.data.manifest import read_manifest
    from spidr.lm.bench_units import fit_centroids
    from spidr.models.loading import load_model

    model = load_model(checkpoint).eval()
    centroids = fit_centroids(model, read_manifest(bench / "train" / "manifest.csv"), [1], num_units=4, seed=0)[1]
    wave_ = load_audio(str(bench / "lexical" / "dev" / "lexical-dev-1.wav"), normalize=True)
    (features,) = extract_batch(model, [wave_], ExtractionSettings(layers=(1,)))
    distances = torch.cdist(torch.from_numpy(features["layer_01"]), centroids)
    assert units["lexical-dev-1"] == distances.argmin(1).tolist()
    path = tmp_path / "c.safetensors"
    from spidr.eval.kmeans import save_centroids

    save_centroids(path, centroids, metadata={})
    assert main(["lm-units", str(bench), str(tmp_path / "given"), "--checkpoint", str(checkpoint), "--layers", "1",
                 "--centroids", f"1={path}"]) == 0
    assert _read(tmp_path / "given" / "layer_01" / "lexical" / "dev.jsonl") == units
    assert torch.equal(load_centroids(path), centroids)
    # --kmeans with every layer given by --centroids: nothing left to fit
    assert main(["lm-units", str(bench), str(tmp_path / "both"), "--checkpoint", str(checkpoint), "--layers", "1",
                 "--kmeans", "4", "--centroids", f"1={path}"]) == 0
    assert _read(tmp_path / "both" / "layer_01" / "lexical" / "dev.jsonl") == units
    assert not (tmp_path / "both" / "layer_01" / "centroids.safetensors").exists()
    # without --layers, the centroids' layers (it wrote the heads' codebook units, the centroids ignored, yet
    # recorded as the folder's input); centroids of a layer --layers leaves out are refused
    assert main(["lm-units", str(bench), str(tmp_path / "implicit"), "--checkpoint", str(checkpoint),
                 "--centroids", f"1={path}"]) == 0
    assert sorted(p.name for p in (tmp_path / "implicit").glob("layer_*")) == ["layer_01"]
    assert _read(tmp_path / "implicit" / "layer_01" / "lexical" / "dev.jsonl") == units
    assert main(["lm-units", str(bench), str(tmp_path / "left-out"), "--checkpoint", str(checkpoint),
                 "--layers", "2-3", "--centroids", f"1={path}"]) == 2
    assert "--centroids for layer(s) [1], which --layers 2-3 leaves out" in capsys.readouterr().err
    assert not (tmp_path / "left-out").exists()


def test_centroids_lm_units_fitted_are_refused_for_another_model_and_taken_for_its_own(bench, checkpoint, tmp_path,
                                                                                         capsys):
    """The centroids lm-units fits record the model's feature fingerprint and the residual side it takes (before the
    residual add): given back with --centroids they are taken for the same checkpoint and refused, naming both
    checkpoints, for another model's features (here the randomly initialised model of --random-init; the fixture's
    checkpoint is seed 0's, so seed 7) and for spidr kmeans's centroids of features taken after the residual add."""
    from spidr.eval.kmeans import centroids_record, features_origin, save_centroids

    out = tmp_path / "km"
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "1",
                 "--kmeans", "4"]) == 0
    fitted = out / "layer_01" / "centroids.safetensors"
    assert centroids_record(fitted)["before_residual"] == "true"
    assert main(["lm-units", str(bench), str(tmp_path / "same"), "--checkpoint", str(checkpoint),
                 "--centroids", f"1={fitted}"]) == 0
    assert _read(tmp_path / "same" / "layer_01" / "lexical" / "dev.jsonl") == _read(
        out / "layer_01" / "lexical" / "dev.jsonl")
    capsys.readouterr()
    assert main(["lm-units", str(bench), str(tmp_path / "random"), "--checkpoint", str(checkpoint),
                 "--random-init", "--seed", "7", "--centroids", f"1={fitted}"]) == 2
    assert (f"fitted on the features of another model ({checkpoint}) than this one ({checkpoint}, randomly "
            "initialised)") in capsys.readouterr().err
    after = tmp_path / "after.safetensors"
    save_centroids(after, load_centroids(fitted), metadata={
        "layer": "1", **features_origin(fingerprint=None, before_residual=False)})
    assert main(["lm-units", str(bench), str(tmp_path / "after"), "--checkpoint", str(checkpoint),
                 "--centroids", f"1={after}"]) == 2
    assert "taken after the residual add (--after-residual)" in capsys.readouterr().err
    assert not (tmp_path / "random").exists()
    assert not (tmp_path / "after").exists()


def test_study_table_brackets_hold_their_value():
    from spidr.lm.study import _with_ci

    assert _with_ci({"tsc": 99.9, "tsc_ci95": [99.6, 100.0]}, "tsc") == "99.9 [99–100]"
    assert _with_ci({"tsc": 50.0, "tsc_ci95": [44.5, 55.5]}, "tsc") == "50.0 [44–56]"
    assert _with_ci({"tsc": 50.0}, "tsc") == "50.0"
    assert _with_ci({}, "tsc") == "–"


def test_a_student_without_heads_needs_layers_and_kmeans(bench, tmp_path, capsys):
    from spidr.models.student import Student

    torch.manual_seed(0)
    path = tmp_path / "student.safetensors"
    export_safetensors(Student(CFG), path)
    assert list(build_model(CFG).head_layers) == [2, 3]
    assert not Student(CFG).head_layers
    assert main(["lm-units", str(bench), str(tmp_path / "u"), "--checkpoint", str(path)]) == 2
    assert "student.safetensors has no codebook head: pass --layers" in capsys.readouterr().err
    assert main(["lm-units", str(bench), str(tmp_path / "u"), "--checkpoint", str(path), "--layers", "3",
                 "--kmeans", "3"]) == 0
    assert len(_read(tmp_path / "u" / "layer_03" / "train.jsonl")) == 4


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


def _counted_iter_units(monkeypatch, *, fail_on_call: int = 0) -> list[list[str]]:
    """Count ``iter_units``' calls (the file ids of each); with ``fail_on_call`` n, the n-th call fails as a kill
    would."""
    from spidr.eval import features

    real, calls = features.iter_units, []

    def counted(model, entries, **kwargs):
        calls.append([entry.fileid for entry in entries])
        if len(calls) == fail_on_call:
            raise RuntimeError("killed")
        yield from real(model, entries, **kwargs)

    monkeypatch.setattr(features, "iter_units", counted)
    return calls


@pytest.mark.parametrize("kmeans", [0, 4])
def test_an_interrupted_run_resumes_set_by_set(bench, checkpoint, tmp_path, monkeypatch, kmeans):
    """A run stopped in its second set keeps the first; the rerun skips it (and, for k-means, reads the fitted
    centroids back rather than fitting again) and ends with the files of an uninterrupted run, byte for byte."""
    from spidr.lm import bench_units

    extra = ["--layers", "1", "--kmeans", str(kmeans)] if kmeans else []
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["lm-units", str(bench), str(whole), "--checkpoint", str(checkpoint), *extra]) == 0
    with monkeypatch.context() as patch:
        calls = _counted_iter_units(patch, fail_on_call=2)
        with pytest.raises(RuntimeError, match="killed"):
            main(["lm-units", str(bench), str(resumed), "--checkpoint", str(checkpoint), *extra])
    assert calls[0] == [f"train-{i}" for i in range(4)]  # the sets in order: train first
    assert json.loads((resumed / ".lm-units.json").read_text())["done"] == ["train"]
    with monkeypatch.context() as patch:
        calls = _counted_iter_units(patch)
        patch.setattr(bench_units, "fit_centroids", lambda *a, **k: pytest.fail("fitted again"))
        assert main(["lm-units", str(bench), str(resumed), "--checkpoint", str(checkpoint), *extra]) == 0
    assert len(calls) == 2  # lexical/dev and tsc/dev: the finished set is not extracted again
    assert not any(stem.startswith("train") for call in calls for stem in call)
    assert _files(resumed) == _files(whole)
    assert sorted(json.loads((resumed / ".lm-units.json").read_text())["done"]) == ["lexical/dev", "train",
                                                                                  "tsc/dev"]
    if kmeans:
        from spidr.data.manifest import read_manifest
        from spidr.lm.bench_units import fit_centroids
        from spidr.models.loading import load_model

        expected = fit_centroids(load_model(checkpoint).eval(), read_manifest(bench / "train" / "manifest.csv"),
                                 [1], num_units=4, seed=0)[1]
        assert torch.equal(load_centroids(resumed / "layer_01" / "centroids.safetensors"), expected)


def test_a_folder_of_other_inputs_is_refused(bench, checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "u"
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    before = _files(out)
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "3"]) == 2
    assert "holds units made from other inputs: layers ([2] → [3])" in capsys.readouterr().err
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "2",
                 "--dtype", "bfloat16"]) == 2
    assert 'dtype ("float32" → "bfloat16")' in capsys.readouterr().err
    assert _files(out) == before  # nothing was overwritten
    # the same inputs again: every set is finished, nothing is extracted
    calls = _counted_iter_units(monkeypatch)
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    assert calls == []
    assert _files(out) == before


def test_the_benchmark_spelled_another_way_resumes(bench, checkpoint, tmp_path, monkeypatch):
    """A relative BENCH_DIR and the absolute one are the same inputs: the second run keeps every set (manifests
    with paths relative to their folder, as synth-lm-bench writes them)."""
    import shutil

    copy = tmp_path / "bench"
    shutil.copytree(bench, copy)
    for manifest in copy.rglob("manifest.csv"):
        header, *rows = manifest.read_text().splitlines()
        rows = [",".join((stem, Path(path).name, samples)) for stem, path, samples in (r.split(",") for r in rows)]
        manifest.write_text("\n".join([header, *rows]) + "\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "u"
    assert main(["lm-units", "bench", str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    calls = _counted_iter_units(monkeypatch)
    assert main(["lm-units", str(copy), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    assert calls == []


def test_finished_sets_without_their_centroids_are_refused(bench, checkpoint, tmp_path, capsys):
    """Sets finished with k-means centroids that were since deleted: a refit could differ, mixing two unit
    inventories in one folder, so the rerun is refused."""
    out = tmp_path / "km"
    arguments = ["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "1", "--kmeans", "3"]
    assert main(arguments) == 0
    (out / "layer_01" / "centroids.safetensors").unlink()
    assert main(arguments) == 2
    assert "has finished sets whose k-means centroids are missing" in capsys.readouterr().err


def test_a_benchmark_made_again_in_place_is_other_inputs(bench, checkpoint, tmp_path, capsys):
    """Same file names and lengths, another info.json (a synthetic benchmark remade with other settings whose files
    happen to keep their lengths): the units of the old one are not resumed."""
    import shutil

    copy = tmp_path / "bench"
    shutil.copytree(bench, copy)
    (copy / "info.json").write_text('{"parameters": {"seed": 0}}\n')
    out = tmp_path / "u"
    arguments = ["lm-units", str(copy), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]
    assert main(arguments) == 0
    (copy / "info.json").write_text('{"parameters": {"seed": 1}}\n')
    assert main(arguments) == 2
    assert "benchmark (a benchmark made again: its info.json differs)" in capsys.readouterr().err


def test_audio_rewritten_in_place_is_refused_and_a_folder_recorded_without_stamps_resumes(bench, checkpoint,
                                                                                         tmp_path, capsys,
                                                                                         monkeypatch):
    """Same names and lengths, other audio (a test set regenerated in place): its old units were kept, and an LM
    scored them as the new items'. The record now holds each set's audio sizes and modification times; a folder
    begun by a spidr that recorded none resumes, and records them."""
    import os
    import shutil

    copy = tmp_path / "bench"
    shutil.copytree(bench, copy)
    out = tmp_path / "u"
    arguments = ["lm-units", str(copy), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]
    assert main(arguments) == 0
    before = _files(out)
    state_path = out / ".lm-units.json"
    state = json.loads(state_path.read_text())
    assert sorted(state["identity"]["audio"]) == ["lexical/dev", "train", "tsc/dev"]
    # recorded by an older spidr: no stamps; the rerun keeps every set and records them
    state_path.write_text(json.dumps({"identity": {k: v for k, v in state["identity"].items() if k != "audio"},
                                      "done": state["done"]}))
    calls = _counted_iter_units(monkeypatch)
    assert main(arguments) == 0
    assert calls == []
    assert json.loads(state_path.read_text()) == state
    # one test file rewritten with other audio of the same length
    wav = copy / "tsc" / "dev" / "tsc-dev-1.wav"  # (scanned: the manifests name the fixture's files)
    old = os.stat(wav)
    _wav(wav, 0.6 + 0.3 * 1, seed=12345)  # (the fixture's length)
    os.utime(wav, ns=(old.st_atime_ns, old.st_mtime_ns + 2_000_000_000))
    assert os.stat(wav).st_size == old.st_size
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert "holds units of audio files changed since, in set(s) tsc/dev of the benchmark" in err
    assert calls == []
    assert _files(out) == before
    # with another layer too, the audio is named among the other differences
    assert main([*arguments[:-1], "3"]) == 2
    assert "audio (audio files of other sizes or modification times)" in capsys.readouterr().err
    # its old modification time back (a copy that kept the times of the same bytes): resumed
    os.utime(wav, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert main(arguments) == 0


def test_kmeans_fits_on_a_training_folder_without_manifest(bench, checkpoint, tmp_path):
    """A train/ folder of wavs alone is scanned for the k-means fit, as for every set's units (it was refused:
    'manifest .../train/manifest.csv does not exist'); the centroids equal those of the same files in a manifest."""
    import shutil

    scanned = tmp_path / "bench"
    shutil.copytree(bench, scanned)
    (scanned / "train" / "manifest.csv").unlink()
    (scanned / "lexical" / "dev" / "manifest.csv").unlink()
    assert main(["lm-units", str(scanned), str(tmp_path / "scan"), "--checkpoint", str(checkpoint), "--layers", "1",
                 "--kmeans", "4"]) == 0
    assert main(["lm-units", str(bench), str(tmp_path / "listed"), "--checkpoint", str(checkpoint), "--layers", "1",
                 "--kmeans", "4"]) == 0
    fitted = load_centroids(tmp_path / "scan" / "layer_01" / "centroids.safetensors")
    torch.testing.assert_close(fitted, load_centroids(tmp_path / "listed" / "layer_01" / "centroids.safetensors"))
    assert _read(tmp_path / "scan" / "layer_01" / "train.jsonl") == _read(tmp_path / "listed" / "layer_01" /
                                                                          "train.jsonl")


def test_a_test_file_without_units_is_refused_and_a_training_one_skipped(bench, checkpoint, tmp_path, capsys,
                                                                         caplog):
    """A test file that gives no units (unreadable, or shorter than one frame) would leave its stem out of the
    submission, found only by lm-eval after training and scoring: refused by name, the set's units not written (one
    that the scan cannot read before any unit is computed). A training file is left out with a warning that counts
    it once."""
    import shutil

    broken = tmp_path / "bench"
    shutil.copytree(bench, broken)
    (broken / "tsc" / "dev" / "tsc-dev-1.wav").write_bytes(b"not audio")  # tsc/dev has no manifest: scanned
    _wav(broken / "lexical" / "dev" / "lexical-dev-0.wav", 0.01, seed=0)  # 160 samples: no frame
    manifest = broken / "lexical" / "dev" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(str(bench), str(broken)).replace(",9600\n", ",160\n"))
    out = tmp_path / "units"
    # a file that the scan cannot read: refused before any unit is computed, nothing recorded
    assert main(["lm-units", str(broken), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 2
    error = capsys.readouterr().err
    assert "1 of 2 test files gave no units" in error
    assert "tsc-dev-1.wav" in error
    assert not out.exists()
    # one that gives no frame: refused once its units are computed, the sets finished before it kept
    (broken / "tsc" / "dev" / "tsc-dev-1.wav").unlink()
    assert main(["lm-units", str(broken), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 2
    error = capsys.readouterr().err
    assert "1 of 3 test files gave no units" in error
    assert "lexical-dev-0.wav" in error
    assert not (out / "layer_02" / "lexical" / "dev.jsonl").exists()
    assert len(_read(out / "layer_02" / "train.jsonl")) == 4  # finished before, and kept
    (broken / "lexical" / "dev" / "lexical-dev-0.wav").unlink()
    manifest.write_text("\n".join(line for line in manifest.read_text().splitlines() if "dev-0" not in line) + "\n")
    # the same unreadable file in the training set is left out, with one warning
    (broken / "train" / "manifest.csv").unlink()
    (broken / "train" / "train-3.wav").write_bytes(b"not audio")
    shutil.rmtree(out)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["lm-units", str(broken), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    assert sorted(_read(out / "layer_02" / "train.jsonl")) == ["train-0", "train-1", "train-2"]
    assert caplog.text.count("unreadable audio") == 1
    assert "1 of 4 training files gave no units" in caplog.text


def test_kmeans_units_assigned_the_older_way_are_other_inputs(bench, checkpoint, tmp_path, capsys):
    """A folder of k-means units whose record lacks this assignment (float32's, before float64) is refused by
    name, not resumed with sets of both assignments mixed."""
    from spidr.eval.kmeans import ASSIGNMENT

    out = tmp_path / "km"
    command = ["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "1", "--kmeans", "4"]
    assert main(command) == 0
    state = json.loads((out / ".lm-units.json").read_text())
    assert state["identity"]["units"]["assignment"] == ASSIGNMENT
    del state["identity"]["units"]["assignment"]
    state["done"] = state["done"][:1]
    (out / ".lm-units.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(command) == 2
    assert "holds units made from other inputs" in capsys.readouterr().err


def test_a_layer_without_head_is_refused_before_the_folder_records_it(bench, checkpoint, tmp_path, capsys):
    """Codebook units of a layer with no head were refused after OUT/.lm-units.json recorded that layer, so the
    corrected command was then refused as 'units made from other inputs'."""
    out = tmp_path / "units"
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "1"]) == 2
    assert "layer(s) [1] have no codebook head (heads: [2, 3])" in capsys.readouterr().err
    assert not (out / ".lm-units.json").exists()
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0


def test_a_training_set_of_no_readable_file_is_an_error(bench, checkpoint, tmp_path, capsys):
    """Written empty and recorded finished, it was kept by a rerun once the audio was back."""
    import shutil

    broken = tmp_path / "bench"
    shutil.copytree(bench, broken)
    (broken / "train" / "manifest.csv").unlink()
    for wav in (broken / "train").glob("*.wav"):
        wav.write_bytes(b"not audio")
    out = tmp_path / "units"
    assert main(["lm-units", str(broken), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 2
    assert "none of the 4 training files gave units" in capsys.readouterr().err
    assert not (out / "layer_02" / "train.jsonl").exists()


def test_an_unfinished_benchmark_is_refused_by_its_readers(tmp_path):
    """lm-units read a killed synth-lm-bench: it wrote empty units for an empty set, marked it done and exited 0,
    and lm-eval scored against its partial gold files. Both now name the marker and how to finish the benchmark."""
    from spidr.corpus.lm_bench import IN_PROGRESS
    from spidr.lm.bench_units import benchmark_sets
    from spidr.lm.evaluate import evaluate_benchmark

    bench = tmp_path / "bench"
    (bench / "lexical" / "dev").mkdir(parents=True)
    (bench / IN_PROGRESS).touch()
    (tmp_path / "submission").mkdir()
    for read in (lambda: benchmark_sets(bench), lambda: evaluate_benchmark(bench, tmp_path / "submission")):
        with pytest.raises(ValueError, match=rf"{bench} is an unfinished spidr synth-lm-bench .*rerun the same"):
            read()
    (bench / IN_PROGRESS).unlink()
    assert benchmark_sets(bench) == {"lexical/dev": bench / "lexical" / "dev"}


def test_a_refused_oracle_run_leaves_no_in_progress_marker(tmp_path):
    """lm-units --oracle made OUT and its marker before checking the benchmark: a mistyped benchmark left a marker
    that made lm-score refuse a complete oracle folder of an earlier run."""
    from spidr.lm.bench_units import IN_PROGRESS, write_oracle_units

    (tmp_path / "bench" / "lexical" / "dev").mkdir(parents=True)  # no frame labels
    out = tmp_path / "oracle"
    out.mkdir()
    with pytest.raises(ValueError, match="the oracle needs each set's frame labels"):
        write_oracle_units(tmp_path / "bench", out)
    assert not (out / IN_PROGRESS).exists()


def test_a_second_run_into_a_folder_being_written_is_refused(bench, checkpoint, tmp_path, capsys):
    """Two runs into one OUT would both resume from its record and write the same sets side by side: the second is
    refused, naming the first, and writes nothing."""
    import os

    from spidr.folder_lock import folder_lock

    for arguments, what in ((["--checkpoint", str(checkpoint)], "lm-units"), (["--oracle"], "lm-units --oracle")):
        out = tmp_path / what.replace(" ", "")
        with folder_lock(out, "a running lm-units"):
            assert main(["lm-units", str(bench), str(out), *arguments]) == 2
            assert f"{what} into {out} is being run by process {os.getpid()}" in capsys.readouterr().err
        assert sorted(path.name for path in out.iterdir()) == [".lock"]  # nothing written


def test_a_finished_lm_units_run_is_readable_by_lm_score(bench, checkpoint, tmp_path):
    """Truth (the README: lm-score refuses a folder only while lm-units writes it): after lm-units exits
    0, codebook or --oracle, its folder and each layer folder hold no in-progress marker and lm-score's reader
    finds every set's units file."""
    from spidr.lm.bench_units import IN_PROGRESS
    from spidr.lm.score import find_unit_files

    assert main(["lm-units", str(bench), str(tmp_path / "cb"), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    assert main(["lm-units", str(bench), str(tmp_path / "oracle"), "--oracle"]) == 0
    for units_dir in (tmp_path / "cb" / "layer_02", tmp_path / "oracle"):
        assert sorted(find_unit_files(units_dir)) == [("lexical", "dev"), ("tsc", "dev")]
    assert not list(tmp_path.rglob(IN_PROGRESS))


def test_a_layer_folder_given_as_dot_is_refused_while_lm_units_writes_its_out(tmp_path, monkeypatch):
    """Truth: "." inside OUT/layer_05 is that layer folder, whose OUT holds lm-units' marker; its parent
    is OUT (Path(".").parent is "." itself, which holds no marker)."""
    from spidr.lm.bench_units import IN_PROGRESS
    from spidr.lm.score import find_unit_files

    layer = tmp_path / "units" / "layer_05"
    (layer / "lexical").mkdir(parents=True)
    (layer / "lexical" / "dev.jsonl").write_text('{"name": "a", "units": [1, 2]}\n')
    (tmp_path / "units" / IN_PROGRESS).touch()
    monkeypatch.chdir(layer)
    with pytest.raises(ValueError, match="is an unfinished spidr lm-units run"):
        find_unit_files(".")
    (tmp_path / "units" / IN_PROGRESS).unlink()
    assert find_unit_files(".") == {("lexical", "dev"): Path("lexical") / "dev.jsonl"}


def _two_set_bench(tmp_path: Path) -> Path:
    bench = tmp_path / "bench"
    for name in ("train", "lexical/dev"):
        (bench / name).mkdir(parents=True)
        (bench / name / "frame_labels_20ms.jsonl").write_text(f'{{"name": "{name}", "units": [1, 2]}}\n')
    return bench


def test_an_oracle_copy_that_fails_midway_leaves_its_folder_marked(tmp_path, monkeypatch):
    """Truth (README: lm-score refuses a units folder while lm-units writes it, or after it failed): a failure
    after the first set is copied leaves OUT marked, so lm-score's reader refuses the partial folder."""
    from spidr.lm import bench_units

    real_copy, copied = bench_units.shutil.copyfile, []

    def fails_on_the_second(source, target):
        if copied:
            raise OSError("disk full")
        copied.append(target)
        return real_copy(source, target)

    monkeypatch.setattr(bench_units.shutil, "copyfile", fails_on_the_second)
    out = tmp_path / "oracle"
    with pytest.raises(OSError, match="disk full"):
        bench_units.write_oracle_units(_two_set_bench(tmp_path), out)
    assert len(copied) == 1
    assert (out / "train.jsonl").is_file()  # (the first set, renamed whole from its temporary)
    assert not list(out.rglob("*.partial"))
    assert (out / bench_units.IN_PROGRESS).exists()
    with pytest.raises(ValueError, match="is an unfinished spidr lm-units run"):
        bench_units.refuse_unfinished_units(out)


def test_model_units_are_marked_from_the_first_set_and_stay_marked_after_a_failure(tmp_path, monkeypatch):
    """Truth (README, as above): every set is written while OUT holds the marker, and a set that fails leaves it
    there. The per-set writer is stubbed: only the marker's life is under test."""
    from types import SimpleNamespace

    from spidr.lm import bench_units

    out, marked = tmp_path / "units", []

    def write_set(model, name, found, paths, row_names, **kwargs):
        marked.append((name, (out / bench_units.IN_PROGRESS).exists()))
        if name == "lexical/dev":
            raise OSError("disk full")
        for path in paths.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    monkeypatch.setattr(bench_units, "_write_set_units", write_set)
    model = SimpleNamespace(cfg=SimpleNamespace(extractor_conv_layer_config=((1, 1, 320),)))
    sets = {name: bench_units.BenchmarkSet(tmp_path / name, []) for name in ("train", "lexical/dev")}
    with pytest.raises(OSError, match="disk full"):
        bench_units.write_model_units(model, tmp_path / "bench", out, layers=[2], sets=sets)
    assert marked == [("train", True), ("lexical/dev", True)]
    with pytest.raises(ValueError, match="is an unfinished spidr lm-units run"):
        bench_units.refuse_unfinished_units(out / "layer_02")


def test_each_layer_s_units_record_names_its_own_vocabulary_size(tmp_path, monkeypatch):
    """Truth: a k-means layer's units range over its centroids (here 7), a codebook layer's over the codebook (16);
    abx and units-quality read that size from the record beside each units file. The extraction is stubbed."""
    from spidr.eval import journal

    monkeypatch.setattr(journal, "codebook_units_source", lambda model: "codebook:stub")  # (a stub model)
    from types import SimpleNamespace

    from spidr.data.manifest import ManifestEntry
    from spidr.eval import features
    from spidr.eval.feature_dir import units_metadata_path
    from spidr.lm import bench_units

    def units(model, entries, *, layers, **kwargs):
        for entry in entries:
            yield entry, {layer: np.array([layer, 0]) for layer in layers}

    monkeypatch.setattr(features, "iter_units", units)
    model = SimpleNamespace(cfg=SimpleNamespace(codebook_size=16))
    paths = {2: tmp_path / "layer_02" / "train.jsonl", 3: tmp_path / "layer_03" / "train.jsonl"}
    entry = ManifestEntry("a", str(tmp_path / "a.wav"), 16000)
    found = bench_units.BenchmarkSet(tmp_path, [entry])
    bench_units._write_set_units(model, "train", found, paths, {entry.location: "a"}, centroids={2: torch.zeros(7, 4)},
                                 dtype="float32", batch_seconds=1.0, frame_rate=50.0)
    records = {layer: json.loads(units_metadata_path(path).read_text()) for layer, path in paths.items()}
    assert {layer: record["num_units"] for layer, record in records.items()} == {2: 7, 3: 16}
    assert {layer: record["layer"] for layer, record in records.items()} == {2: 2, 3: 3}
    assert all(record["frame_rate_hz"] == 50.0 for record in records.values())
    assert paths[3].read_text() == '{"name": "a", "units": [3, 0]}\n'
    assert records[3]["units_file_bytes"] == paths[3].stat().st_size


def test_centroids_of_another_width_are_refused_before_the_folder_records_them(bench, checkpoint, tmp_path, capsys):
    """They were found only while the first set's units were made, after OUT recorded them as its input: the run
    with the right centroids was then refused as 'other inputs'. Now nothing is written, and the file is named."""
    from spidr.eval.kmeans import save_centroids

    path = tmp_path / "c8.safetensors"
    save_centroids(path, torch.zeros(4, 8), metadata={})
    out = tmp_path / "units"
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--centroids", f"1={path}"]) == 2
    assert (f"--centroids 1={path}: centroids of dimension 8, but layer 1's features have dimension 32"
            in capsys.readouterr().err)
    assert not out.exists()
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "1",
                 "--kmeans", "4"]) == 0


def test_centroids_of_another_layer_are_refused(bench, checkpoint, tmp_path, capsys):
    from spidr.eval.kmeans import save_centroids

    path = tmp_path / "c.safetensors"
    save_centroids(path, torch.zeros(4, 32), metadata={"layer": "2", "features": "feats/layer_02"})
    assert main(["lm-units", str(bench), str(tmp_path / "u"), "--checkpoint", str(checkpoint), "--centroids",
                 f"1={path}"]) == 2
    assert f"--centroids 1={path}: {path} holds centroids fitted on layer 2's features" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_the_next_commands_name_the_layer_folders_of_lm_units(bench, checkpoint, tmp_path, capsys):
    """lm-units writes a model's units in OUT/layer_LL/; lm-train, lm-score and lm-eval --units given OUT itself
    said only that a file was missing or that nothing was found."""
    out = tmp_path / "units"
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "2-3"]) == 0
    capsys.readouterr()
    hint = f"{out} holds the units of layer_02, layer_03, as spidr lm-units writes a model's: give one layer's folder"
    config = tmp_path / "lm.json"
    config.write_text(json.dumps({"run": {"workdir": str(tmp_path / "runs"), "device": "cpu"},
                                  "data": {"train": str(out / "train.jsonl")}, "model": {"arch": "lstm"}}))
    assert main(["lm-train", str(config)]) == 2  # data.train is a file: the hint names the file to give
    assert f"give one layer's file, e.g. {out / 'layer_02' / 'train.jsonl'}" in capsys.readouterr().err
    config.write_text(json.dumps({"run": {"workdir": str(tmp_path / "runs"), "device": "cpu"},
                                  "data": {"train": str(out / "layer_02")}, "model": {"arch": "lstm"}}))
    assert main(["lm-train", str(config)]) == 2  # (the layer folder itself: a folder, where a file goes)
    assert f"is a folder, not a file: give its units file, e.g. {out / 'layer_02' / 'train.jsonl'}" in (
        capsys.readouterr().err)
    assert main(["lm-score", str(checkpoint), str(out), str(tmp_path / "submission")]) == 2
    assert hint in capsys.readouterr().err
    assert main(["lm-eval", str(bench), "--baseline", "ngram", "--units", str(out)]) == 2
    assert hint in capsys.readouterr().err



def test_the_layer_folder_hint_is_for_lm_units_folders_only(bench, checkpoint, tmp_path, capsys):
    """Not for an extraction's folders of features, nor for an extraction's codebook_units files, nor where the
    units asked for are there beside layer folders."""
    from spidr.lm.score import layer_folders_hint
    from spidr.lm.tokens import read_rows

    (tmp_path / "extract" / "layer_02").mkdir(parents=True)
    np.save(tmp_path / "extract" / "layer_02" / "a.npy", np.zeros((3, 4), dtype=np.float32))
    (tmp_path / "extract" / "codebook_units").mkdir()
    (tmp_path / "extract" / "codebook_units" / "layer_02.jsonl").write_text('{"name": "a", "units": [1]}\n')
    assert layer_folders_hint(tmp_path / "extract") == ""
    assert layer_folders_hint(tmp_path / "extract" / "codebook_units") == ""
    units = tmp_path / "units"
    assert main(["lm-units", str(bench), str(units), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    (units / "train.jsonl").write_text('{"name": "a", "units": [1, 2]}\n')  # the units asked for, beside them
    assert [row[0] for row in read_rows(units / "train.jsonl")] == ["a"]
    (units / "lexical").mkdir()
    (units / "lexical" / "dev.jsonl").write_text('{"name": "a", "units": [1, 2]}\n')
    assert main(["lm-score", str(checkpoint), str(units), str(tmp_path / "sub")]) == 2  # (a speech model's
    assert "holds the units of" not in capsys.readouterr().err  # checkpoint: refused, but not for the layer folders)


def test_a_training_file_whose_twin_could_not_be_read_is_named_by_path_and_its_units_record_the_twin(
        bench, checkpoint, tmp_path, capsys, caplog):
    """train/spk1/0001.wav beside an unreadable train/spk2/0001.wav: the scan leaves the second out, and lm-units
    named the first "0001", so an alignment of spk2/0001 (or the bare id) was scored against spk1's units. Truth:
    the row is spk1/0001, as spidr extract names it; the units' record lists spk2/0001 as skipped, so units-quality
    refuses the bare id and an alignment of spk2/0001 finds nothing."""
    import shutil

    from spidr.eval.feature_dir import skipped_stems
    from spidr.lm.tokens import read_unit_sequences

    copy = tmp_path / "bench"
    shutil.copytree(bench, copy)
    (copy / "train" / "manifest.csv").unlink()  # (scanned)
    for speaker in ("spk1", "spk2"):
        (copy / "train" / speaker).mkdir()
    shutil.copy(copy / "train" / "train-1.wav", copy / "train" / "spk1" / "0001.wav")
    (copy / "train" / "spk2" / "0001.wav").write_bytes(b"no header")
    out = tmp_path / "units"
    assert main(["lm-units", str(copy), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    units = out / "layer_02" / "train.jsonl"
    names = sorted(read_unit_sequences(units, dedup=False).sequences)
    assert names == ["spk1/0001", "train-0", "train-1", "train-2", "train-3"]
    assert skipped_stems(units) == {"spk2/0001"}
    length = len(read_unit_sequences(units, dedup=False).sequences["spk1/0001"])
    for given, code in (("0001", 2), ("spk2/0001", 2), ("spk1/0001", 0)):
        (tmp_path / "phones.jsonl").write_text(json.dumps({"name": given, "phones": ["a", "b"] * length}) + "\n")
        assert main(["units-quality", str(units), str(tmp_path / "phones.jsonl"), "--alignment-rate", "100"]) == code
        err = capsys.readouterr().err
        if given == "0001":
            assert "'spk2/0001' (skipped: unreadable)" in err
        elif given == "spk2/0001":  # (nothing found: no utterance to score)
            assert "spk2/0001" in err
    # A units folder of an older spidr named the row "0001", and recorded no skipped file: a rerun writes it again.
    from spidr.eval.feature_dir import units_metadata_path

    record_path = units_metadata_path(units)
    record = json.loads(record_path.read_text())
    del record["skipped_stems"]
    units.write_text(units.read_text().replace('"spk1/0001"', '"0001"'))
    record["units_file_bytes"] = units.stat().st_size
    record_path.write_text(json.dumps(record))
    assert main(["lm-units", str(copy), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    assert "written by an older spidr" in caplog.text
    assert sorted(read_unit_sequences(units, dedup=False).sequences) == names
    assert skipped_stems(units) == {"spk2/0001"}
    # A test set with such a file is refused for the unreadable file, not for the id it shares
    tests = tmp_path / "bench2"
    shutil.copytree(bench, tests)
    for speaker in ("spk1", "spk2"):
        (tests / "tsc" / "dev" / speaker).mkdir()
    shutil.copy(tests / "tsc" / "dev" / "tsc-dev-0.wav", tests / "tsc" / "dev" / "spk1" / "0001.wav")
    (tests / "tsc" / "dev" / "spk2" / "0001.wav").write_bytes(b"no header")
    assert main(["lm-units", str(tests), str(tmp_path / "units2"), "--checkpoint", str(checkpoint),
                 "--layers", "2"]) == 2
    err = capsys.readouterr().err
    assert "test files gave no units" in err
    assert "share utterance ids" not in err
    assert not (tmp_path / "units2").exists()


def test_training_files_of_one_id_get_rows_of_their_own_and_test_files_of_one_id_are_refused(bench, checkpoint,
                                                                                              tmp_path, capsys):
    """TIMIT-style spk1/0001.wav and spk2/0001.wav: rows named by the file id were two rows "0001", which lm-train
    refused. In the training set they are named by path, as spidr extract names them, and lm-train reads them; in a
    test set (a submission names each file by its id) they are refused before any unit is written."""
    import shutil

    from spidr.lm.tokens import read_unit_sequences

    copy = tmp_path / "bench"
    shutil.copytree(bench, copy)
    (copy / "train" / "manifest.csv").unlink()  # (scanned)
    for speaker in ("spk1", "spk2"):
        (copy / "train" / speaker).mkdir()
        shutil.copy(copy / "train" / f"train-{speaker[-1]}.wav", copy / "train" / speaker / "0001.wav")
    out = tmp_path / "units"
    assert main(["lm-units", str(copy), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    names = sorted(read_unit_sequences(out / "layer_02" / "train.jsonl", dedup=True).sequences)
    assert names == ["spk1/0001", "spk2/0001", "train-0", "train-1", "train-2", "train-3"]
    tests = tmp_path / "bench2"
    shutil.copytree(bench, tests)
    for speaker in ("spk1", "spk2"):
        (tests / "tsc" / "dev" / speaker).mkdir()
        shutil.copy(tests / "tsc" / "dev" / "tsc-dev-0.wav", tests / "tsc" / "dev" / speaker / "0001.wav")
    assert main(["lm-units", str(tests), str(tmp_path / "units2"), "--checkpoint", str(checkpoint),
                 "--layers", "2"]) == 2
    assert "2 files share utterance ids" in capsys.readouterr().err
    assert not (tmp_path / "units2").exists()  # (nothing recorded: renamed, the files' rerun is not "other inputs")
    # the library alike: its folder recorded these inputs first, and the renamed files' rerun was refused
    from spidr.lm.bench_units import units_folder_identity
    from spidr.models.loading import load_model

    model = load_model(checkpoint).eval()
    identity = units_folder_identity(model, tests, layers=[2], dtype="float32")
    with pytest.raises(ValueError, match="2 files share utterance ids"):
        write_model_units(model, tests, tmp_path / "units3", layers=[2], identity=identity)
    assert not (tmp_path / "units3").exists()


def test_benchmark_sets_of_the_test_split_are_its_own_folders(tmp_path):
    """mut bu-sets-split-dev. Truth: benchmark_sets' docstring: '"<task>/<split>" → folder'; lm-units must read
    lexical/test's audio for lexical/test.jsonl."""
    from spidr.lm.bench_units import benchmark_sets

    for folder in ("train", "lexical/dev", "lexical/test", "tsc/test"):
        (tmp_path / folder).mkdir(parents=True)
    assert benchmark_sets(tmp_path) == {"train": tmp_path / "train", "lexical/dev": tmp_path / "lexical" / "dev",
                                        "lexical/test": tmp_path / "lexical" / "test",
                                        "tsc/test": tmp_path / "tsc" / "test"}


def test_the_units_record_holds_the_model_s_frame_rate(tmp_path, monkeypatch):
    """mut bu-record-rate-50. Truth: the record beside each units file gives the frame rate abx and units-quality
    read (_write_set_units' docstring): 16000 / hop 160 = 100 Hz for this front end. The extraction is stubbed."""
    from spidr.eval import journal

    monkeypatch.setattr(journal, "codebook_units_source", lambda model: "codebook:stub")  # (a stub model)
    from spidr.data.manifest import ManifestEntry
    from spidr.eval import features
    from spidr.eval.feature_dir import units_metadata_path
    from spidr.lm import bench_units

    def units(model, entries, *, layers, **kwargs):
        for entry in entries:
            yield entry, {layer: np.array([1, 0]) for layer in layers}

    monkeypatch.setattr(features, "iter_units", units)
    model = SimpleNamespace(cfg=SimpleNamespace(codebook_size=16, extractor_conv_layer_config=CONV_100HZ))
    entry = ManifestEntry("a", str(tmp_path / "a.wav"), 16000)
    sets = {"train": bench_units.BenchmarkSet(tmp_path, [entry])}
    written = bench_units.write_model_units(model, tmp_path, tmp_path / "out", layers=[2], sets=sets)
    record = json.loads(units_metadata_path(written["layer_02/train"]).read_text())
    assert record["frame_rate_hz"] == 100.0


def _stub_extraction(monkeypatch, seen):
    """iter_extracted replaced by one that gives each file frames 0..T-1 (T from its length, as the model would)
    through ``keep``; fit_kmeans by one that records what it is given."""
    from spidr.eval import features, kmeans
    from spidr.models.frames import num_frames

    def extracted(model, entries, settings, *, keep):
        for entry in entries:
            count = num_frames(int(entry.num_samples), model.cfg.extractor_conv_layer_config)
            frames = np.arange(count, dtype=np.float32)[:, None].repeat(2, axis=1)
            yield entry, {f"layer_{layer:02d}": keep(entry.fileid, frames) for layer in settings.layers}

    def fit(frames, num_units, *, seed):
        seen.append((frames.copy(), seed))
        return np.zeros((num_units, 2), dtype=np.float32)

    monkeypatch.setattr(features, "iter_extracted", extracted)
    monkeypatch.setattr(kmeans, "fit_kmeans", fit)


def test_kmeans_fits_on_a_seeded_sample_of_about_max_frames(monkeypatch):
    """muts bu-kmeans-keep-all, bu-kmeans-seed-fixed. Truth: fit_centroids' docstring: 'a seeded sample of at most
    max_frames frames (each frame kept with the same chance)': 20 files of 2 s at 50 Hz are 1,980 frames; with
    max_frames 400 each is kept with chance 400 / 1,980, so the sample holds 400 ± 4 sd (sd ≈ 18); the seed given
    is the k-means seed, and the same seed draws the same sample."""
    from spidr.data.manifest import ManifestEntry
    from spidr.lm.bench_units import fit_centroids
    from spidr.models.frames import DEFAULT_CONV_LAYERS

    seen = []
    _stub_extraction(monkeypatch, seen)
    model = SimpleNamespace(cfg=SimpleNamespace(extractor_conv_layer_config=DEFAULT_CONV_LAYERS))
    entries = [ManifestEntry(f"u{i}", f"u{i}.wav", 32000) for i in range(20)]
    for seed in (3, 3, 4):
        fit_centroids(model, entries, [1], num_units=4, seed=seed, max_frames=400)
    (first, seed_a), (again, seed_b), (other, seed_c) = seen
    assert (seed_a, seed_b, seed_c) == (3, 3, 4)
    assert 400 - 72 < len(first) < 400 + 72
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_finished_set_missing_one_layer_s_file_is_written_again(tmp_path, monkeypatch):
    """mut bu-resume-any. Truth: write_model_units' docstring: 'a set recorded before, with all its files present,
    is skipped': a set finished for layers 2 and 3 whose layer-3 file is gone is extracted again, and the file is
    back. The extraction is stubbed (it counts its calls)."""
    from spidr.eval import journal

    monkeypatch.setattr(journal, "codebook_units_source", lambda model: "codebook:stub")  # (a stub model)
    from spidr.data.manifest import ManifestEntry
    from spidr.eval import features
    from spidr.lm import bench_units
    from spidr.models.frames import DEFAULT_CONV_LAYERS

    calls = []

    def units(model, entries, *, layers, **kwargs):
        calls.append(list(layers))
        for entry in entries:
            yield entry, {layer: np.array([layer, 0]) for layer in layers}

    monkeypatch.setattr(features, "iter_units", units)
    model = SimpleNamespace(cfg=SimpleNamespace(codebook_size=16, extractor_conv_layer_config=DEFAULT_CONV_LAYERS))
    sets = {"train": bench_units.BenchmarkSet(tmp_path, [ManifestEntry("a", str(tmp_path / "a.wav"), 16000)])}
    out = tmp_path / "out"
    written = bench_units.write_model_units(model, tmp_path, out, layers=[2, 3], sets=sets, identity={"model": "m"})
    bench_units.write_model_units(model, tmp_path, out, layers=[2, 3], sets=sets, identity={"model": "m"})
    assert len(calls) == 1  # finished and whole: kept
    written["layer_03/train"].unlink()
    bench_units.write_model_units(model, tmp_path, out, layers=[2, 3], sets=sets, identity={"model": "m"})
    assert len(calls) == 2
    assert written["layer_03/train"].read_text() == '{"name": "a", "units": [3, 0]}\n'


def test_kmeans_units_of_another_seed_are_other_inputs(tmp_path, monkeypatch):
    """mut bu-identity-no-seed. Truth: units_folder_identity's docstring: 'where the units come from (codebooks;
    k-means fitted with K and a seed ...)': lm-units --kmeans 4 --seed 1 fits other centroids than --seed 0, so a
    folder of seed 0's units must not be resumed as its own."""
    from spidr.data.manifest import ManifestEntry
    from spidr.eval import journal
    from spidr.lm import bench_units

    monkeypatch.setattr(journal, "model_fingerprint", lambda model: "weights")
    monkeypatch.setattr(journal, "entries_fingerprint", lambda entries: "utterances")
    monkeypatch.setattr(journal, "audio_stamps", lambda entries: np.zeros((len(entries), 2), dtype=np.int64))
    sets = {"train": bench_units.BenchmarkSet(tmp_path, [ManifestEntry("a", str(tmp_path / "a.wav"), 16000)])}

    def identity(**options):
        return bench_units.units_folder_identity(SimpleNamespace(), tmp_path, layers=[1], dtype="float32",
                                                 sets=sets, **options)

    assert identity(kmeans=4, seed=0) != identity(kmeans=4, seed=1)
    assert identity(kmeans=4, seed=0) != identity(kmeans=5, seed=0)
    assert identity(seed=0) == identity(seed=1)  # codebook units do not depend on a k-means seed


def test_a_layer_s_kmeans_sample_does_not_depend_on_the_other_layers_fitted(monkeypatch):
    """Truth: fit_centroids' 'seeded sample': with the same seed, layer 1's k-means is fitted on the same frames
    whether lm-units is asked for --layers 1 or --layers 1,3 (or --centroids gives layer 3)."""
    from spidr.data.manifest import ManifestEntry
    from spidr.lm.bench_units import fit_centroids
    from spidr.models.frames import DEFAULT_CONV_LAYERS

    seen = []
    _stub_extraction(monkeypatch, seen)
    model = SimpleNamespace(cfg=SimpleNamespace(extractor_conv_layer_config=DEFAULT_CONV_LAYERS))
    entries = [ManifestEntry(f"u{i}", f"u{i}.wav", 32000) for i in range(5)]
    fit_centroids(model, entries, [1], num_units=4, seed=0, max_frames=200)
    fit_centroids(model, entries, [1, 3], num_units=4, seed=0, max_frames=200)
    alone, with_layer_3 = seen[0][0], seen[1][0]
    assert np.array_equal(alone, with_layer_3)


def _tiny_lm(tmp_path: Path, train: Path) -> tuple[Path, Path]:
    """An LSTM LM trained for 2 steps on the units file ``train`` (16 units): its final.pt and its config."""
    config = tmp_path / "lm.json"
    config.write_text(json.dumps({
        "run": {"workdir": str(tmp_path / "runs"), "name": "cb2", "device": "cpu"},
        "data": {"train": str(train), "num_units": 16, "val_fraction": 0.25},
        "model": {"arch": "lstm", "dim": 16, "num_layers": 1, "context": 16},
        "optimizer": {"max_steps": 2, "warmup_steps": 1, "batch_size": 2, "dtype": "float32"}}))
    assert main(["lm-train", str(config)]) == 0
    return tmp_path / "runs" / "cb2" / "final.pt", config


def test_lm_score_refuses_units_of_another_layer_or_centroids_than_the_lm_was_trained_on(bench, checkpoint,
                                                                                        tmp_path, capsys):
    """An LM trained on layer 2's codebook units scored layer 3's (same vocabulary of 16) with exit 0, near chance:
    the units' records name their layer and source, but nothing compared them. Now the LM records its training
    units' origin, and lm-score refuses test units of another layer, or of centroids where it learnt codebook
    units; the same layer's are scored, and units without a record (another tool's) are not checked."""
    import shutil

    from spidr.eval.feature_dir import units_metadata_path

    codebook, kmeans = tmp_path / "cb", tmp_path / "km"
    assert main(["lm-units", str(bench), str(codebook), "--checkpoint", str(checkpoint), "--layers", "2-3"]) == 0
    assert main(["lm-units", str(bench), str(kmeans), "--checkpoint", str(checkpoint), "--layers", "2",
                 "--kmeans", "16"]) == 0
    lm, _ = _tiny_lm(tmp_path, codebook / "layer_02" / "train.jsonl")
    capsys.readouterr()
    assert main(["lm-score", str(lm), str(codebook / "layer_03"), str(tmp_path / "s3")]) == 2
    err = capsys.readouterr().err
    assert f"{codebook / 'layer_03' / 'lexical' / 'dev.jsonl'} holds units of the codebook of layer 3 (heads" in err
    assert f"but the LM {lm} was trained on units of the codebook of layer 2 (heads codebook:" in err
    assert not (tmp_path / "s3").exists()
    assert main(["lm-score", str(lm), str(kmeans / "layer_02"), str(tmp_path / "skm")]) == 2
    assert "holds units of k-means centroids sha1:" in capsys.readouterr().err
    assert main(["lm-score", str(lm), str(codebook / "layer_02"), str(tmp_path / "s2")]) == 0
    # a copy without its record: not told, not checked
    bare = tmp_path / "bare"
    for task in ("lexical", "tsc"):
        (bare / task).mkdir(parents=True)
        shutil.copy(codebook / "layer_03" / task / "dev.jsonl", bare / task / "dev.jsonl")
    assert not units_metadata_path(bare / "lexical" / "dev.jsonl").exists()
    assert main(["lm-score", str(lm), str(bare), str(tmp_path / "sbare")]) == 0


def test_lm_score_refuses_codebook_units_of_another_model(bench, checkpoint, tmp_path, capsys):
    """An LM trained on the trained model's layer-2 codebook units scored the random-init model's layer-2 codebook
    units (same vocabulary of 16, same layer) with exit 0: both records said units_source "codebook", which named
    no model. The source now names the model's heads and features."""
    trained, random = tmp_path / "trained", tmp_path / "random"
    assert main(["lm-units", str(bench), str(trained), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    assert main(["lm-units", str(bench), str(random), "--checkpoint", str(checkpoint), "--layers", "2",
                 "--random-init", "--seed", "1"]) == 0
    lm, _ = _tiny_lm(tmp_path, trained / "layer_02" / "train.jsonl")
    capsys.readouterr()
    assert main(["lm-score", str(lm), str(random / "layer_02"), str(tmp_path / "s")]) == 2
    assert "holds units of the codebook of layer 2 (heads codebook:" in capsys.readouterr().err
    assert main(["lm-score", str(lm), str(trained / "layer_02"), str(tmp_path / "s2")]) == 0


def test_lm_units_scan_warning_names_no_option_lm_units_lacks(tmp_path, caplog):
    """lm-units scans a set folder without manifest.csv; an .ogg there was named in a warning that said 'list them
    with --ext ...', an option lm-units does not have: it says to list them in the set's manifest.csv."""
    import logging

    import soundfile as sf

    from spidr.lm.bench_units import read_set

    (tmp_path / "train").mkdir()
    x = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype("float32")
    sf.write(tmp_path / "train" / "a.wav", x, 16000)
    sf.write(tmp_path / "train" / "b.ogg", x, 16000, format="OGG", subtype="VORBIS")
    with caplog.at_level(logging.WARNING):
        read_set(tmp_path / "train")
    assert "1 audio file(s) of other extensions left out (1 .ogg): list every file of the set in its manifest.csv" in (
        caplog.text)
    assert "--ext" not in caplog.text


def test_audio_of_a_set_not_yet_written_may_change_before_the_resume(bench, checkpoint, tmp_path):
    """A run killed after the training set (done: ["train"]); the user then replaces a test file whose units were
    never written (same length, new audio). The rerun was refused: 'holds units of audio files changed since, in
    set(s) tsc/dev' -- it held no units of tsc/dev. Now the unfinished set is written from its audio as it is."""
    import os
    import shutil

    copy = tmp_path / "bench"
    shutil.copytree(bench, copy)
    out = tmp_path / "u"
    arguments = ["lm-units", str(copy), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]
    assert main(arguments) == 0
    state_path = out / ".lm-units.json"
    state = json.loads(state_path.read_text())
    state["done"] = ["train"]  # as a run killed after its first set leaves it
    state_path.write_text(json.dumps(state))
    for name in ("lexical/dev", "tsc/dev"):
        for path in (out / "layer_02").glob(f"{name}.jsonl*"):
            path.unlink()
    wav = copy / "tsc" / "dev" / "tsc-dev-1.wav"
    old = os.stat(wav)
    _wav(wav, 0.6 + 0.3 * 1, seed=12345)
    os.utime(wav, ns=(old.st_atime_ns, old.st_mtime_ns + 2_000_000_000))
    assert main(arguments) == 0
    assert sorted(json.loads(state_path.read_text())["done"]) == ["lexical/dev", "train", "tsc/dev"]
    # the finished set's audio still decides: now that tsc/dev is written, its audio changed again is refused
    os.utime(wav, ns=(old.st_atime_ns, old.st_mtime_ns + 4_000_000_000))
    assert main(arguments) == 2


def test_an_lm_trained_before_units_origin_is_not_other_data(bench, checkpoint, tmp_path):
    """An LM trained by the previous spidr records no units_origin. Its units made again (same weights, same audio,
    byte-identical files: a study's units folder deleted and rebuilt) were 'other units': lm_differences gave
    ["units_origin: None → {...}"], so lm-study refused the LM (the demo deleted and retrained it)."""
    import shutil

    from spidr.lm.config import load_lm_config
    from spidr.lm.study import lm_differences
    from spidr.lm.train import lm_checkpoint_summary

    units = tmp_path / "u"
    arguments = ["lm-units", str(bench), str(units), "--checkpoint", str(checkpoint), "--layers", "2"]
    assert main(arguments) == 0
    lm, config = _tiny_lm(tmp_path, units / "layer_02" / "train.jsonl")
    state = lm_checkpoint_summary(lm)
    assert lm_differences(state, load_lm_config(config)) == ([], [])
    state["lm"].pop("units_origin")  # as the previous spidr's checkpoint holds it
    before = (units / "layer_02" / "train.jsonl").read_bytes()
    shutil.rmtree(units)
    assert main(arguments) == 0
    assert (units / "layer_02" / "train.jsonl").read_bytes() == before
    assert lm_differences(state, load_lm_config(config)) == ([], [])
    state["lm"]["units_origin"] = {"layer": 3, "units_source": "codebook:x"}  # recorded, and other: told
    assert lm_differences(state, load_lm_config(config))[1][0].startswith("units_origin: ")


def test_a_folder_recorded_without_stamps_of_other_inputs_is_refused_not_taken_over(bench, checkpoint, tmp_path,
                                                                                    capsys):
    """A record of an older spidr (no audio stamps) is kept and stamped only where everything else it records is
    what this run is made of: one of other layers is refused naming them, and its record is left as it was (taken
    over, its layer-2 sets would count as finished layer-3 sets)."""
    out = tmp_path / "u"
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    state_path = out / ".lm-units.json"
    state = json.loads(state_path.read_text())
    older = {"identity": {k: v for k, v in state["identity"].items() if k != "audio"}, "done": state["done"]}
    state_path.write_text(json.dumps(older))
    before = _files(out)
    capsys.readouterr()
    assert main(["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds units made from other inputs: " in err
    assert "layers ([2] → [3])" in err
    assert json.loads(state_path.read_text()) == older
    assert _files(out) == before


def test_lm_score_origin_check_lets_through_units_whose_layer_one_record_does_not_tell(tmp_path: Path) -> None:
    """mut SC3 (`None not in layers` dropped): an LM trained on units of the same centroids whose record names no
    layer (spidr units on a features folder not named layer_LL) must not refuse test units of a known layer;
    other centroids are still refused (the docstring: the layer is compared where both records tell)."""
    from spidr.eval.feature_dir import units_metadata_path
    from spidr.lm.score import check_units_origin

    units = tmp_path / "dev.jsonl"
    units.write_text('{"name": "a", "units": [1, 2]}\n')
    units_metadata_path(units).write_text(json.dumps({"layer": 6, "units_source": "sha1:abc",
                                                      "units_file_bytes": units.stat().st_size}))
    inputs = {("lexical", "dev"): units}
    check_units_origin("lm.pt", {"units_origin": {"layer": None, "units_source": "sha1:abc"}}, inputs)
    check_units_origin("lm.pt", {"units_origin": {"layer": 6, "units_source": "sha1:abc"}}, inputs)
    with pytest.raises(ValueError, match="trained on units of k-means centroids sha1:def…"):
        check_units_origin("lm.pt", {"units_origin": {"layer": None, "units_source": "sha1:def"}}, inputs)
    with pytest.raises(ValueError, match="of layer 6, but the LM lm.pt was trained on units of k-means centroids "
                                         r"sha1:abc… of layer 5"):
        check_units_origin("lm.pt", {"units_origin": {"layer": 5, "units_source": "sha1:abc"}}, inputs)


def _as_previous_spidr_wrote(units_file: Path) -> None:
    """The record beside a units file as spidr wrote it earlier on 2026-12-07: units_source "codebook"."""
    from spidr.eval.feature_dir import units_metadata_path

    record_path = units_metadata_path(units_file)
    record = json.loads(record_path.read_text())
    assert record["units_source"].startswith("codebook:")
    record["units_source"] = "codebook"
    record_path.write_text(json.dumps(record))


def test_codebook_units_recorded_without_the_model_s_digest_are_not_another_model(bench, checkpoint, tmp_path,
                                                                                  capsys):
    """Records of a bare units_source "codebook" (before it named the model's heads) are of unknown origin, not of
    another model: an LM trained on such units scores the same model's units made now, an LM trained now scores such
    units, and lm-study does not call the LM 'trained on other units' once its units are rebuilt byte for byte."""
    import shutil

    from spidr.lm.config import load_lm_config
    from spidr.lm.study import lm_differences
    from spidr.lm.train import lm_checkpoint_summary

    units = tmp_path / "u"
    assert main(["lm-units", str(bench), str(units), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    _as_previous_spidr_wrote(units / "layer_02" / "train.jsonl")
    lm, config = _tiny_lm(tmp_path, units / "layer_02" / "train.jsonl")
    assert lm_checkpoint_summary(lm)["lm"]["units_origin"] is None
    capsys.readouterr()
    assert main(["lm-score", str(lm), str(units / "layer_02"), str(tmp_path / "s1")]) == 0, capsys.readouterr().err
    rebuilt = tmp_path / "rebuilt"
    assert main(["lm-units", str(bench), str(rebuilt), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    assert (rebuilt / "layer_02" / "train.jsonl").read_bytes() == (units / "layer_02" / "train.jsonl").read_bytes()
    cfg = load_lm_config(config)
    shutil.rmtree(units)
    shutil.copytree(rebuilt, units)
    assert lm_differences(lm_checkpoint_summary(lm), cfg) == ([], [])
    # the other way: an LM of this spidr, test units recorded the older way
    fresh = tmp_path / "fresh"
    assert main(["lm-units", str(bench), str(fresh), "--checkpoint", str(checkpoint), "--layers", "2"]) == 0
    (tmp_path / "second").mkdir()
    lm2, _ = _tiny_lm(tmp_path / "second", fresh / "layer_02" / "train.jsonl")
    for name in ("lexical/dev", "tsc/dev"):
        _as_previous_spidr_wrote(fresh / "layer_02" / f"{name}.jsonl")
    capsys.readouterr()
    assert main(["lm-score", str(lm2), str(fresh / "layer_02"), str(tmp_path / "s2")]) == 0, capsys.readouterr().err


def test_the_codebook_units_source_tells_a_spidr_from_a_dinosr_of_the_same_weights():
    """SpidR's heads read layers L-K+1..L, DinoSR's all read the last layer: the same weights loaded as either type
    give other codebook units, but had the same units_source, so lm-score scored one type's units with an LM of the
    other's."""
    import dataclasses

    from spidr.config import DinoSRConfig
    from spidr.eval.journal import codebook_units_source

    torch.manual_seed(0)
    spidr = build_model(CFG).eval()
    names = {f.name for f in dataclasses.fields(DinoSRConfig)} - {"model_type"}
    dinosr = build_model(DinoSRConfig(**{name: getattr(CFG, name) for name in names})).eval()
    dinosr.load_state_dict(spidr.state_dict())
    waveform = torch.randn(1, 16000)
    with torch.no_grad():
        units = [[None if c is None else c.argmax(-1) for c in m.get_codebooks(waveform)] for m in (spidr, dinosr)]
    assert not torch.equal(units[0][1], units[1][1])  # layer 2's head: other units
    assert codebook_units_source(spidr) != codebook_units_source(dinosr)


def test_an_oracle_copy_killed_midway_leaves_no_units_file_that_lm_train_reads(tmp_path, monkeypatch):
    """lm-units --oracle copies each set's frame labels straight to its final name (shutil.copyfile): a kill -9
    during the copy of a 400 MB train set left OUT/train.jsonl cut at a page boundary (reproduced: 146,669,568 of
    400,001,329 bytes). lm-score refuses the folder by its marker, but lm-train does not look for the marker: it
    fails with 'line N is not valid JSON' (no word of the killed lm-units), or, cut at a line's end, trains on a
    subset without a word."""
    from spidr.lm import bench_units
    from spidr.lm.tokens import read_unit_sequences

    bench = tmp_path / "bench"
    for name in ("train", "lexical/dev"):
        (bench / name).mkdir(parents=True)
        rows = "".join(f'{{"name": "{name}{i}", "phones": ["AA", "B"]}}\n' for i in range(10))
        (bench / name / "frame_labels_20ms.jsonl").write_text(rows)

    def killed_midway(source, target, *args, **kwargs):  # (kill -9 after the kernel copied the first lines)
        lines = Path(source).read_text().splitlines(keepends=True)
        Path(target).write_text("".join(lines[:4]))
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_units.shutil, "copyfile", killed_midway)
    out = tmp_path / "oracle"
    with contextlib.suppress(KeyboardInterrupt):
        bench_units.write_oracle_units(bench, out)
    monkeypatch.undo()
    train = out / "train.jsonl"
    assert not train.exists()  # (a units file under its final name is whole: nothing of a cut copy is left)
    assert not list(out.glob("*.partial"))
    bench_units.write_oracle_units(bench, out)  # the rerun
    assert len(read_unit_sequences(train, dedup=True).sequences) == 10


@pytest.mark.parametrize("text", ["[1]", '"units"', '{"identity": [1], "done": []}',
                                  '{"identity": {"format": 1, "audio": {}}, "done": 3}'])
def test_a_units_record_of_another_json_shape_is_refused_naming_it(tmp_path, text) -> None:
    """Defect 2: OUT/.lm-units.json holding valid JSON that is not the object lm-units writes (a list, a text, an
    identity that is no object, done that is no list) crashed lm-units with an AttributeError/TypeError traceback
    instead of the one-line refusal that invalid JSON gets."""
    from spidr.lm.bench_units import STATE_FILE, begin_units_folder

    (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(ValueError, match=r"\.lm-units\.json is not the JSON lm-units writes"):
        begin_units_folder(tmp_path, {"format": 1, "audio": {}})


@pytest.mark.parametrize("done", ['[["dev"]]', '[{"a": 1}]'])
def test_a_units_record_whose_done_holds_no_names_is_refused(tmp_path, done) -> None:
    """Defect 4: a 'done' list of lists or objects still crashed lm-units with TypeError: unhashable type."""
    from spidr.lm.bench_units import STATE_FILE, begin_units_folder

    (tmp_path / STATE_FILE).write_text(f'{{"identity": {{"format": 1, "audio": {{}}}}, "done": {done}}}')
    with pytest.raises(ValueError, match=r"\.lm-units\.json is not the JSON lm-units writes"):
        begin_units_folder(tmp_path, {"format": 1, "audio": {}})


def _code(argv: list[str]) -> int:
    """spidr's exit status for argv: main's return, or argparse's SystemExit (a refusal at either level)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("bad", ["-3", "1000000"])
def test_a_refused_kmeans_leaves_the_folder_free_for_the_corrected_rerun(bench, checkpoint, tmp_path,
                                                                        capsys, bad):
    """lm-units recorded its inputs (.lm-units.json, "done": []) before k-means refused K; the corrected rerun was then
    refused: 'holds units made from other inputs: units (kmeans: -3 → 2); delete it (and the LMs trained on its
    units)', though nothing had been written."""
    out = tmp_path / "u"
    base = ["lm-units", str(bench), str(out), "--checkpoint", str(checkpoint), "--layers", "2"]
    assert _code([*base, "--kmeans", bad]) == 2
    capsys.readouterr()
    assert main([*base, "--kmeans", "2"]) == 0, capsys.readouterr().err


def test_kmeans_count_is_checked_when_parsed():
    """lm-study --kmeans -2 synthesised the whole benchmark (minutes with the defaults) before failing with
    'data.num_units = -2 must be >= 0', a key the user never set."""
    for argv in (["lm-units", "b", "o", "--checkpoint", "c.pt", "--kmeans", "-2"],
                 ["lm-study", "--checkpoint", "c.pt", "--out", "o", "--kmeans", "-2"]):
        with pytest.raises(SystemExit) as raised:
            build_parser().parse_args(argv)
        assert raised.value.code == 2


def test_a_folder_recorded_with_the_same_inputs_and_nothing_finished_is_resumed_not_begun_again(tmp_path):
    """begin_units_folder: None when the folder is begun now; called again with the same identity before any set is
    finished (lm-units killed after fitting its k-means centroids) it returns the empty set, "recorded, none
    finished", so that the run loads the centroids it fitted instead of fitting them again. Only a record of
    *other* inputs with nothing finished is begun again (None)."""
    from spidr.lm.bench_units import begin_units_folder

    identity = {"format": 1, "kmeans": 50, "audio": {}}
    assert begin_units_folder(tmp_path, identity) is None
    assert begin_units_folder(tmp_path, identity) == set()
    assert begin_units_folder(tmp_path, {**identity, "kmeans": 20}) is None  # other inputs, nothing finished
    assert begin_units_folder(tmp_path, {**identity, "kmeans": 20}) == set()
