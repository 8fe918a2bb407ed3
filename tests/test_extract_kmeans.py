"""K-means units from an extraction (``spidr extract --kmeans``), codebook units from the features' forward pass,
and decoding threads: resume, refusals, records and contracts that a mutation round over them (55 mutants) found
untested. Each docstring names the mutant that survived before."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from spidr.config import SpidRConfig
from spidr.data.manifest import ManifestEntry
from spidr.eval.features import ExtractionSettings, extract_batch, loaded_batches
from spidr.eval.folder_extraction import KMeansUnits, extract_to_directory
from spidr.eval.kmeans import assign_units
from spidr.eval.units import read_units
from spidr.models.build import build_model
from train_fixtures import EXTRACTION_MODEL, speech_like


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(SpidRConfig(**EXTRACTION_MODEL)).eval()


@pytest.fixture(scope="module")
def entries(tmp_path_factory) -> list[ManifestEntry]:
    folder = tmp_path_factory.mktemp("audio")
    out = []
    for k, seconds in enumerate((0.4, 0.5, 0.6, 0.7)):
        n = int(seconds * 16000)
        sf.write(folder / f"u{k}.wav", speech_like(n, np.random.default_rng(k)), 16000, subtype="FLOAT")
        out.append(ManifestEntry(f"u{k}", str(folder / f"u{k}.wav"), n))
    return out


def _centroids(seed: int = 0, k: int = 6) -> torch.Tensor:
    return torch.randn(k, 32, generator=torch.Generator().manual_seed(seed))


# F02 ---------------------------------------------------------------------------------------------------------------
def test_centroids_that_differ_past_their_first_row_are_other_k_means_units(model, entries, tmp_path):
    """A finished folder of k-means units is another extraction for any other centroids: the units would differ.
    (Mutant F02 fingerprinted the first centroid only: the rerun found the folder 'finished' and kept the units of
    the old centroids, which are not the nearest centroids of the new ones.)"""
    settings = ExtractionSettings(layers=(), batch_seconds=1.0)
    first = _centroids()
    other = first.clone()
    other[1:] = first[1:].flip(0)  # the first row kept, the others permuted
    features = extract_batch(model, [torch.from_numpy(np.asarray(
        sf.read(entries[0].path, dtype="float32")[0]))], ExtractionSettings(layers=(2,)))[0]["layer_02"]
    assert not np.array_equal(assign_units(features, first), assign_units(features, other))  # (independent truth)
    out = tmp_path / "out"
    extract_to_directory(model, entries, out, settings, progress=False, kmeans=[KMeansUnits(2, first)])
    with pytest.raises(ValueError, match=r"layer 2: centroids → other centroids"):
        extract_to_directory(model, entries, out, settings, progress=False, kmeans=[KMeansUnits(2, other)])


# F05 ---------------------------------------------------------------------------------------------------------------
def test_one_layer_s_k_means_units_asked_for_twice_are_refused(model, entries, tmp_path):
    """One units file per layer (kmeans_units/layer_LL.jsonl) cannot hold two sets of units: asking for two (e.g.
    --kmeans 2:a --kmeans 2:b) is refused before anything is written. (Mutant F05: the last one silently won.)"""
    with pytest.raises(ValueError, match=r"k-means units of layer 2 \(b\): that layer's k-means units are asked"):
        extract_to_directory(model, entries, tmp_path / "out", ExtractionSettings(layers=()), progress=False,
                             kmeans=[KMeansUnits(2, _centroids(0), "a"), KMeansUnits(2, _centroids(1), "b")])
    assert not (tmp_path / "out" / "kmeans_units").exists()


# F12 ---------------------------------------------------------------------------------------------------------------
def test_a_long_file_stopped_by_a_model_error_leaves_no_partial_feature_file_of_a_k_means_layer(model, tmp_path,
                                                                                              monkeypatch):
    """A model error in a long file's windows (an out-of-memory error) stops the run; the temporary feature file
    begun for that file is removed and let go, also for a layer whose k-means units are computed too (its appender
    sits inside the k-means sink). (Mutant F12 cleaned up the bare appenders only: layer_01/.x.npy.<hex>.partial
    stayed, open and locked.) (A decoding failure is raised by LongAudio before any appender exists.)"""
    from spidr.eval import features

    sf.write(tmp_path / "x.wav", speech_like(48000, np.random.default_rng(6)), 16000, subtype="FLOAT")
    entries = [ManifestEntry("x", str(tmp_path / "x.wav"), 48000)]
    settings = ExtractionSettings(layers=(1,), max_seconds=2.0, window_seconds=1.0, context_seconds=0.5)
    run, calls = features.extract_padded_batch, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # (the first window written)
            raise torch.OutOfMemoryError("CUDA out of memory")
        return run(*args, **kwargs)

    monkeypatch.setattr(features, "extract_padded_batch", failing)
    out = tmp_path / "out"
    with pytest.raises(torch.OutOfMemoryError):
        extract_to_directory(model, entries, out, settings, progress=False, kmeans=[KMeansUnits(1, _centroids())])
    assert len(calls) == 2
    assert sorted(p.name for p in (out / "layer_01").iterdir()) == []


# F17, F19, F22 ------------------------------------------------------------------------------------------------------
def test_the_k_means_units_record_says_what_spidr_units_says(model, entries, tmp_path):
    """The record beside kmeans_units/layer_LL.jsonl describes the file as `spidr units` describes its own units of
    the same features: as many utterances as the file has rows, not deduplicated, the vocabulary and frame rate.
    (Mutants F17: num_utterances wrong; F19: "dedup": true; F22: another assignment named.)"""
    from spidr.cli import main
    from spidr.eval.feature_dir import units_metadata_path
    from spidr.eval.kmeans import ASSIGNMENT, save_centroids

    centroids = tmp_path / "c.safetensors"
    save_centroids(centroids, _centroids().numpy())
    from spidr.eval.kmeans import load_centroids

    out = tmp_path / "out"
    extract_to_directory(model, entries, out, ExtractionSettings(layers=(2,), batch_seconds=1.0), progress=False,
                         kmeans=[KMeansUnits(2, load_centroids(centroids), str(centroids))])
    reference = tmp_path / "ref.jsonl"
    assert main(["units", str(out / "layer_02"), "--centroids", str(centroids), "--out", str(reference)]) == 0
    ours = out / "kmeans_units" / "layer_02.jsonl"
    record = json.loads(units_metadata_path(ours).read_text())
    expected = json.loads(units_metadata_path(reference).read_text())
    assert read_units(ours).keys() == read_units(reference).keys()
    for key in ("num_units", "dedup", "frame_rate_hz", "num_utterances", "centroids"):
        assert record[key] == expected[key], key
    assert record["num_utterances"] == len(read_units(ours)) == len(entries)
    assert record["assignment"] == ASSIGNMENT  # the assignment assign_units performs


# F21 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codebooks", [False, True])
def test_metadata_names_the_layers_of_the_codebook_units_files_it_wrote(model, entries, tmp_path, codebooks):
    """metadata.json's codebook_layers are the layers of the files in codebook_units/: none without codebooks.
    (Mutant F21 named the head layers whether or not their units were written.)"""
    out = tmp_path / "out"
    metadata = extract_to_directory(model, entries, out, ExtractionSettings(layers=(1,), codebooks=codebooks),
                                    progress=False)
    written = sorted(int(p.stem.removeprefix("layer_")) for p in (out / "codebook_units").glob("layer_*.jsonl"))
    assert metadata["codebook_layers"] == written
    assert bool(written) == codebooks


# F25 ---------------------------------------------------------------------------------------------------------------
def test_codebook_units_alone_of_a_model_without_heads_are_refused_by_name(entries):
    """An exported student has no heads: layers=() with codebooks asks it for nothing it can give, refused with the
    documented message (mutant F25 accepted it and failed inside max() on an empty sequence)."""
    from spidr.models.student import Student

    torch.manual_seed(0)
    student = Student(SpidRConfig(**EXTRACTION_MODEL)).eval()
    wave = torch.from_numpy(np.asarray(sf.read(entries[0].path, dtype="float32")[0]))
    with pytest.raises(ValueError, match=r"layers \[\]: expected at least one .* or codebook or k-means units alone"):
        extract_batch(student, [wave], ExtractionSettings(layers=(), codebooks=True))


# F24 ---------------------------------------------------------------------------------------------------------------
def test_features_of_a_low_layer_without_codebooks_run_only_the_layers_below_it(model, entries):
    """Extracting layer 1 of a 3-layer model without codebook units runs layer 1 alone (and no head): the one-pass
    path (every layer, every head) is for codebook units. (Mutant F24 took the one-pass path always: same features,
    3x the encoder work for --layers 1 of a 12-layer model, plus the heads.)"""
    calls = []
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, layer in
             enumerate(model.student.layers, start=1)]
    try:
        wave = torch.from_numpy(np.asarray(sf.read(entries[0].path, dtype="float32")[0]))
        extract_batch(model, [wave], ExtractionSettings(layers=(1,)))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [1]


# F27 ---------------------------------------------------------------------------------------------------------------
def test_loaded_batches_come_back_in_the_order_given(model, entries):
    """loaded_batches yields each batch in the order given (the documented contract; extraction batches shortest
    first, so an unfinished folder holds the shortest utterances). (Mutant F27 took the newest pending batch first.)"""
    batches = [np.array([k]) for k in (0, 1, 2, 3, 0, 2, 1, 3)]
    got = [indices.tolist() for indices, *_ in loaded_batches(model, entries, batches)]
    assert got == [b.tolist() for b in batches]


# F26 ---------------------------------------------------------------------------------------------------------------
def test_decoding_runs_up_to_decode_threads_plus_one_batches_ahead(model, entries, monkeypatch):
    """While the caller holds the first batch, DECODE_THREADS + 1 batches are being read (the docstring's bound):
    with 2 threads, batches 2 and 3 are both read before the caller returns to the loop. (Mutant F26 submitted one
    batch ahead only: a single decoding thread, so decoding no longer keeps up with a GPU.)"""
    from spidr.eval import features

    monkeypatch.setattr(features, "DECODE_THREADS", 2)
    started: set[int] = set()
    both = threading.Event()
    load = features._load_batch

    def loading(model_, entries_, indices):
        started.add(int(indices[0]))
        if {1, 2} <= started:
            both.set()
        return load(model_, entries_, indices)

    monkeypatch.setattr(features, "_load_batch", loading)
    iterator = loaded_batches(model, entries, [np.array([k]) for k in range(4)])
    next(iterator)
    assert both.wait(timeout=10)
    iterator.close()


# J02 ---------------------------------------------------------------------------------------------------------------
def test_a_foreign_jsonl_in_kmeans_units_is_neither_emptied_nor_journaled(tmp_path):
    """The extraction owns kmeans_units/layer_LL.jsonl only; another JSONL a user put there (e.g. `spidr units --dedup
    --out OUT/kmeans_units/dedup.jsonl`) is left alone on a resume. (Mutant J02 globbed *.jsonl: it emptied it.)"""
    from spidr.eval.journal import UnitsFiles

    (tmp_path / "kmeans_units").mkdir()
    mine = tmp_path / "kmeans_units" / "dedup.jsonl"
    mine.write_text('{"name": "a", "units": [1, 2]}\n')
    units = UnitsFiles(tmp_path, {})
    try:
        assert mine.read_text() == '{"name": "a", "units": [1, 2]}\n'
        assert units.sizes() == {}
    finally:
        units.close()


# J08 ---------------------------------------------------------------------------------------------------------------
def test_journaled_k_means_units_whose_file_is_gone_stop_the_resume(tmp_path):
    """The journal says 12 bytes of layer 6's k-means rows exist: their file gone, resuming would write a file
    without those utterances' rows (and journal it as complete). (Mutant J08 looked for every journaled file under
    codebook_units/ only: the missing kmeans_units file went unnoticed.)"""
    from spidr.eval.journal import UnitsFiles

    with pytest.raises(ValueError, match=r"kmeans_layer_06 are journaled but missing"):
        UnitsFiles(tmp_path, {"kmeans_layer_06": 12})


def _killed_after_first_batch(monkeypatch, extraction) -> None:
    """Run ``extraction()``, stopped by a KeyboardInterrupt as its second batch starts (the first one journaled)."""
    from spidr.eval import folder_extraction

    real, calls = folder_extraction.extract_padded_batch, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(folder_extraction, "extract_padded_batch", dying)
        with pytest.raises(KeyboardInterrupt):
            extraction()


def test_a_resumed_k_means_extraction_whose_units_file_was_removed_is_refused(model, entries, tmp_path, monkeypatch):
    """End to end: killed after its first batch, the k-means units file removed, the rerun is refused instead of
    finishing with the first batch's rows missing (mutant J08)."""
    settings = ExtractionSettings(layers=(), batch_seconds=0.45)  # one file per batch
    kmeans = [KMeansUnits(2, _centroids())]
    _killed_after_first_batch(monkeypatch, lambda: extract_to_directory(model, entries, tmp_path / "out", settings,
                                                                        progress=False, kmeans=kmeans))
    (tmp_path / "out" / "kmeans_units" / "layer_02.jsonl").unlink()
    with pytest.raises(ValueError, match="journaled but missing"):
        extract_to_directory(model, entries, tmp_path / "out", settings, progress=False, kmeans=kmeans)


# J03 ---------------------------------------------------------------------------------------------------------------
def test_identity_differences_name_only_the_k_means_layers_that_changed():
    """Layer 3's centroids are the same: only layer 6 is named (mutant J03 listed layer 3 as 'other centroids')."""
    from spidr.eval.journal import identity_differences

    assert identity_differences({"kmeans": {"03": "a", "06": "b"}}, {"kmeans": {"03": "a", "06": "c"}}) == (
        "k-means units (layer 6: centroids → other centroids)")


# R02 ---------------------------------------------------------------------------------------------------------------
def test_k_means_units_of_an_unfinished_extraction_are_refused(model, entries, tmp_path, monkeypatch):
    """kmeans_units/layer_LL.jsonl of a killed extraction holds the shortest utterances only: lm-train, abx, units-
    quality must refuse it as they refuse codebook_units/ (mutant R02 looked for codebook_units/ only)."""
    from spidr.eval.feature_dir import refuse_unfinished_extraction

    _killed_after_first_batch(monkeypatch, lambda: extract_to_directory(
        model, entries, tmp_path / "out", ExtractionSettings(layers=(), batch_seconds=0.45), progress=False,
        kmeans=[KMeansUnits(2, _centroids())]))
    units = tmp_path / "out" / "kmeans_units" / "layer_02.jsonl"
    assert len(units.read_text().splitlines()) == 1  # (the first batch's utterance only)
    with pytest.raises(ValueError, match="unfinished spidr extract run"):
        read_units(units)  # what lm-train, abx and units-quality read units with
    with pytest.raises(ValueError, match="unfinished spidr extract run"):
        refuse_unfinished_extraction(units)


# R03 ---------------------------------------------------------------------------------------------------------------
def test_k_means_units_without_their_record_do_not_take_the_codebook_size(model, entries, tmp_path):
    """kmeans_units/layer_02.jsonl (6 centroids) of an extraction that also wrote codebook units of head layer 2
    (codebook size 16): its record removed, its vocabulary is unknown, never the codebook's 16 (mutant R03)."""
    from spidr.eval.feature_dir import recorded_num_units, units_metadata_path

    out = tmp_path / "out"
    extract_to_directory(model, entries, out, ExtractionSettings(layers=(), codebooks=True), progress=False,
                         kmeans=[KMeansUnits(2, _centroids(k=6))])
    units = out / "kmeans_units" / "layer_02.jsonl"
    assert recorded_num_units(units)[0] == 6
    units_metadata_path(units).unlink()
    assert recorded_num_units(units) is None


# P01, P03 -----------------------------------------------------------------------------------------------------------
def test_kmeans_option_needs_a_centroids_path_and_units_alone_say_units(tmp_path, capsys):
    """--kmeans 3: names no centroids file (mutant P01 took Path('') = '.'); with --layers none the command reports
    the units it wrote, not features (mutant P03)."""
    import argparse

    from spidr.cli import main
    from spidr.eval.kmeans import save_centroids
    from spidr.eval.pipeline_commands import kmeans_option
    from spidr.models.loading import export_safetensors
    from train_fixtures import write_corpus

    with pytest.raises(argparse.ArgumentTypeError, match="expected LAYER:CENTROIDS"):
        kmeans_option("3:")
    manifest = write_corpus(tmp_path / "corpus", num_files=2, seconds=(0.4, 0.6))
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.safetensors"
    export_safetensors(build_model(SpidRConfig(**EXTRACTION_MODEL)), checkpoint)
    save_centroids(tmp_path / "c.safetensors", _centroids().numpy())
    capsys.readouterr()
    assert main(["extract", "--checkpoint", str(checkpoint), "--manifest", str(manifest), "--layers", "none",
                 "--kmeans", f"2:{tmp_path / 'c.safetensors'}", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote units of 2 files" in out
    assert "features" not in out


# D04, D05 -----------------------------------------------------------------------------------------------------------
def test_one_pass_refuses_what_get_intermediate_outputs_refuses_and_warns_alike():
    """get_layers_and_codebooks takes num_layers as get_intermediate_outputs does: 0 or beyond the encoder is an
    error (mutant D04 returned [] or every layer), and a padded batch of a group-norm front end warns (mutant D05)."""
    from spidr.config import DinoSRConfig  # noqa: F401  (either model type)
    from spidr.models.frames import padding_mask_from_lengths

    torch.manual_seed(0)
    model = build_model(SpidRConfig(**EXTRACTION_MODEL)).eval()
    batch = torch.randn(2, 8000)
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"num_layers = {bad} must be in"):
            model.get_intermediate_outputs(batch, num_layers=bad)
        with pytest.raises(ValueError, match=f"num_layers = {bad} must be in"):
            model.get_layers_and_codebooks(batch, num_layers=bad)
    group_norm = build_model(SpidRConfig(**{**EXTRACTION_MODEL, "extractor_mode": "group_norm"})).eval()
    assert group_norm.cfg.padding_changes_features
    padding = padding_mask_from_lengths(torch.tensor([8000, 6000]), group_norm.cfg.extractor_conv_layer_config)
    with pytest.warns(UserWarning, match="normalises its first conv over the padded time axis"):
        group_norm.get_intermediate_outputs(batch, padding_mask=padding)
    with pytest.warns(UserWarning, match="normalises its first conv over the padded time axis"):
        group_norm.get_layers_and_codebooks(batch, padding_mask=padding)


# M01, M02 -----------------------------------------------------------------------------------------------------------
def test_a_descriptor_opened_by_a_thread_that_lost_the_race_is_closed(tmp_path, monkeypatch):
    """Two decoding threads reading the same tar first open it at once: one descriptor is kept, the other closed
    (mutant M01 leaked it; M02, the old code, replaced the kept one and leaked that). Simulated: another thread
    registers its descriptor while this one opens."""
    import io
    import os
    import tarfile

    from spidr.data import manifest as manifest_module
    from spidr.data.manifest import read_member
    from spidr.data.scanning import scan

    wav = io.BytesIO()
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("x.wav")
        info.size = len(wav.getvalue())
        tar.addfile(info, io.BytesIO(wav.getvalue()))
    (entry,) = scan(archive, progress=False).entries
    manifest_module._ARCHIVE_FILES.pop(entry.archive, None)
    real_open, opened = os.open, []

    def racing_open(path, flags, *args):
        other = real_open(path, flags, *args)  # the other thread, which registers first
        manifest_module._ARCHIVE_FILES.setdefault(entry.archive, other)
        opened.append(real_open(path, flags, *args))  # this thread's own
        return opened[-1]

    monkeypatch.setattr(manifest_module.os, "open", racing_open)
    try:
        assert read_member(entry) == wav.getvalue()
    finally:
        monkeypatch.undo()
    kept = manifest_module._ARCHIVE_FILES.pop(entry.archive)
    still_open = []
    try:
        os.fstat(opened[0])
        still_open.append(opened[0])
    except OSError:
        pass
    for fd in {kept, *still_open}:  # (the test's own descriptors; a closed one is not closed twice)
        os.close(fd)
    assert kept != opened[0], "the losing thread's descriptor was kept instead"
    assert not still_open, "the losing thread's descriptor was leaked"


# J08 (as first written: every journaled k-means file taken for missing) ------------------------------------------
def test_a_killed_k_means_extraction_resumes_to_the_units_of_a_fresh_one(model, entries, tmp_path, monkeypatch):
    """Killed after its first batch, the rerun completes the k-means units (no batch's rows twice, none lost), equal
    to those of a fresh extraction. (No existing test resumes a folder whose journal records k-means rows: mutant J08
    took every journaled kmeans_units file for missing and refused every such resume.)"""
    settings = ExtractionSettings(layers=(1,), batch_seconds=0.45)  # one file per batch
    kmeans = [KMeansUnits(2, _centroids())]
    fresh = tmp_path / "fresh"
    extract_to_directory(model, entries, fresh, settings, progress=False, kmeans=kmeans)
    _killed_after_first_batch(monkeypatch, lambda: extract_to_directory(model, entries, tmp_path / "out", settings,
                                                                        progress=False, kmeans=kmeans))
    extract_to_directory(model, entries, tmp_path / "out", settings, progress=False, kmeans=kmeans)
    got = (tmp_path / "out" / "kmeans_units" / "layer_02.jsonl").read_text()
    assert got == (fresh / "kmeans_units" / "layer_02.jsonl").read_text()
    assert len(got.splitlines()) == len(entries)


# Several k-means layers, long files ----------------------------------------------------------------------------
def test_long_files_get_the_k_means_units_of_every_layer(tmp_path):
    """`extract --layers none --kmeans 2:… --kmeans 3:…` on a file windowed by --max-seconds: each layer's units are
    those of `units` on the features that the same windows give (no silent zeros, no layer left out)."""
    torch.manual_seed(0)
    model = build_model(SpidRConfig(**EXTRACTION_MODEL)).eval()
    sf.write(tmp_path / "x.wav", speech_like(48000, np.random.default_rng(6)), 16000, subtype="FLOAT")
    entries = [ManifestEntry("x", str(tmp_path / "x.wav"), 48000)]
    window = {"max_seconds": 2.0, "window_seconds": 1.0, "context_seconds": 0.5}
    extract_to_directory(model, entries, tmp_path / "f", ExtractionSettings(layers=(2, 3), **window), progress=False)
    features = {layer: np.load(tmp_path / "f" / f"layer_{layer:02d}" / "x.npy") for layer in (2, 3)}
    centroids = {layer: torch.from_numpy(f[::9][:8].copy()) for layer, f in features.items()}
    extract_to_directory(model, entries, tmp_path / "k", ExtractionSettings(layers=(), **window), progress=False,
                         kmeans=[KMeansUnits(layer, c) for layer, c in centroids.items()])
    for layer in (2, 3):
        (row,) = (tmp_path / "k" / "kmeans_units" / f"layer_{layer:02d}.jsonl").read_text().splitlines()
        expected = assign_units(features[layer], centroids[layer])
        assert len(set(expected.tolist())) > 1
        np.testing.assert_array_equal(json.loads(row)["units"], expected)


def test_two_k_means_layers_in_one_short_batch(tmp_path):
    """Each layer's rows hold its own units, for every file of the batch."""
    torch.manual_seed(0)
    model = build_model(SpidRConfig(**EXTRACTION_MODEL)).eval()
    entries = []
    for k, n in enumerate((6000, 9000)):
        sf.write(tmp_path / f"u{k}.wav", speech_like(n, np.random.default_rng(k)), 16000, subtype="FLOAT")
        entries.append(ManifestEntry(f"u{k}", str(tmp_path / f"u{k}.wav"), n))
    extract_to_directory(model, entries, tmp_path / "f", ExtractionSettings(layers=(2, 3)), progress=False)
    centroids = {layer: torch.from_numpy(np.load(tmp_path / "f" / f"layer_{layer:02d}" / "u1.npy")[::3][:6].copy())
                 for layer in (2, 3)}
    extract_to_directory(model, entries, tmp_path / "k", ExtractionSettings(layers=()), progress=False,
                         kmeans=[KMeansUnits(layer, c) for layer, c in centroids.items()])
    for layer in (2, 3):
        units_file = tmp_path / "k" / "kmeans_units" / f"layer_{layer:02d}.jsonl"
        rows = [json.loads(row) for row in units_file.read_text().splitlines()]
        assert sorted(r["name"] for r in rows) == ["u0", "u1"]
        for r in rows:
            features = np.load(tmp_path / "f" / f"layer_{layer:02d}" / f"{r['name']}.npy")
            np.testing.assert_array_equal(r["units"], assign_units(features, centroids[layer]))


def test_centroids_are_refused_for_another_model_s_features_or_the_other_side_of_the_residual(tmp_path, capsys):
    """spidr kmeans records which model's features it fitted on (a fingerprint of the weights that compute them) and
    on which side of the residual add they were taken; `units` and `extract --kmeans` refuse the centroids for
    another model's features of the same layer and width, or for the layer's output after its residual add, naming
    both checkpoints: their units would be clusters of another feature space. The exported student of the same model
    gives the same features: accepted, with the units of the full checkpoint's."""
    from spidr.cli import main
    from spidr.models.loading import export_safetensors
    from spidr.models.student import Student
    from train_fixtures import write_corpus

    manifest = write_corpus(tmp_path / "corpus", num_files=3, seconds=(0.4, 0.6))
    checkpoints, models = {}, {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        models[name] = build_model(SpidRConfig(**EXTRACTION_MODEL))
        checkpoints[name] = tmp_path / f"{name}.safetensors"
        export_safetensors(models[name], checkpoints[name])
    student = Student(models["a"].cfg)
    student.load_state_dict({k: v for k, v in models["a"].state_dict().items() if k in student.state_dict()})
    checkpoints["a_student"] = tmp_path / "a_student.safetensors"
    export_safetensors(student, checkpoints["a_student"])

    def extract(checkpoint: str, out: str, *extra: str) -> int:
        return main(["extract", "--checkpoint", str(checkpoints[checkpoint]), "--manifest", str(manifest),
                     "--out", str(tmp_path / out), *extra])

    for checkpoint, out, extra in (("a", "A", ()), ("b", "B", ()), ("a", "A_after", ("--after-residual",)),
                                   ("a_student", "A_student", ())):
        assert extract(checkpoint, out, "--layers", "2", *extra) == 0
    centroids = tmp_path / "c.safetensors"
    assert main(["kmeans", str(tmp_path / "A" / "layer_02"), "--num-units", "4", "--out", str(centroids)]) == 0
    capsys.readouterr()

    def units(features: str) -> int:
        return main(["units", str(tmp_path / features / "layer_02"), "--centroids", str(centroids),
                     "--out", str(tmp_path / f"{features}.jsonl")])

    assert units("A") == 0
    assert units("A_student") == 0
    reference = read_units(tmp_path / "A.jsonl")
    assert len(reference) == 3

    def same_units(path) -> bool:
        found = read_units(path)
        return found.keys() == reference.keys() and all(np.array_equal(found[k], reference[k]) for k in reference)

    assert same_units(tmp_path / "A_student.jsonl")
    assert units("B") == 2
    error = capsys.readouterr().err
    assert f"fitted on the features of another model ({checkpoints['a']}) than this one ({checkpoints['b']})" in error
    assert units("A_after") == 2
    assert ("fitted on features taken before the residual add (the default), but these are taken after the "
            "residual add (--after-residual)") in capsys.readouterr().err
    assert not (tmp_path / "B.jsonl").exists()
    assert not (tmp_path / "A_after.jsonl").exists()
    # extract --kmeans: the same refusals, before anything is written
    assert extract("b", "B_units", "--layers", "none", "--kmeans", f"2:{centroids}") == 2
    assert "fitted on the features of another model" in capsys.readouterr().err
    assert extract("a", "A_after_units", "--layers", "none", "--after-residual", "--kmeans", f"2:{centroids}") == 2
    assert "taken after the residual add (--after-residual)" in capsys.readouterr().err
    assert not (tmp_path / "B_units").exists()
    assert not (tmp_path / "A_after_units").exists()
    assert extract("a_student", "A_student_units", "--layers", "none", "--kmeans", f"2:{centroids}") == 0
    assert same_units(tmp_path / "A_student_units" / "kmeans_units" / "layer_02.jsonl")


def test_the_features_fingerprint_covers_what_shapes_the_features_and_nothing_that_only_trains(tmp_path):
    """The same weights under another number of attention heads give other features: another fingerprint (it hashed
    the tensors alone, and their shapes do not show the heads); under other training settings (dropout, the
    codebooks' decay) the same features: the same fingerprint. Centroids fitted on a checkpoint whose file was since
    replaced by other weights (a run that went on training) are refused with that said, not as 'another model (X)
    than this one (X)'."""
    from spidr.eval.journal import features_fingerprint
    from spidr.eval.kmeans import check_centroids_fit, features_origin, save_centroids

    torch.manual_seed(0)
    model = build_model(SpidRConfig(**EXTRACTION_MODEL))
    heads = build_model(SpidRConfig(**{**EXTRACTION_MODEL, "encoder_num_heads": 4}))
    training = build_model(SpidRConfig(**{**EXTRACTION_MODEL, "encoder_dropout": 0.3, "codebook_decay": 0.5}))
    for other in (heads, training):
        other.load_state_dict(model.state_dict())
    assert features_fingerprint(heads) != features_fingerprint(model)
    assert features_fingerprint(training) == features_fingerprint(model)
    path = tmp_path / "c.safetensors"
    save_centroids(path, _centroids().numpy(), metadata={"layer": "2", **features_origin(
        fingerprint=features_fingerprint(model), before_residual=True, checkpoint="run/final.pt")})
    check_centroids_fit(path, 2, where="--kmeans", origin=features_origin(
        fingerprint=features_fingerprint(training), before_residual=True, checkpoint="run/final.pt"))
    with pytest.raises(ValueError, match=r"other weights than these, though both were read from run/final\.pt"):
        check_centroids_fit(path, 2, where="--kmeans", origin=features_origin(
            fingerprint=features_fingerprint(heads), before_residual=True, checkpoint="run/final.pt"))


def test_codebook_units_copied_elsewhere_keep_their_frame_rate_and_vocabulary(model, entries, tmp_path):
    """extract --codebooks recorded its units' rate and vocabulary only in OUT/metadata.json: a units file copied
    elsewhere (as the spoken-LM recipe copies test sets' units) was read at an assumed 50 Hz (a 100 Hz model's ABX
    45.8 % instead of 14.5 %) and without a vocabulary. Each codebook units file now has the record beside it that
    spidr units writes, as k-means units files had; the copy (with its record) reads as the original."""
    import shutil

    from spidr.eval.feature_dir import extraction_frame_rate, recorded_num_units, units_metadata_path
    from spidr.models.frames import hop_length

    out = tmp_path / "out"
    extract_to_directory(model, entries, out, ExtractionSettings(layers=(), codebooks=True), progress=False,
                         kmeans=[KMeansUnits(2, _centroids(k=6))])
    rate = 16000 / hop_length(model.cfg.extractor_conv_layer_config)
    copies = tmp_path / "copies"
    copies.mkdir()
    for layer in model.head_layers:
        units = out / "codebook_units" / f"layer_{layer:02d}.jsonl"
        record = json.loads(units_metadata_path(units).read_text())
        assert record["layer"] == layer
        assert record["num_units"] == model.cfg.codebook_size
        assert record["frame_rate_hz"] == rate
        assert record["num_utterances"] == len(read_units(units)) == len(entries)
        assert record["units_file_bytes"] == units.stat().st_size
        copy = copies / f"cb{layer}.jsonl"
        shutil.copy(units, copy)
        shutil.copy(units_metadata_path(units), units_metadata_path(copy))
        assert extraction_frame_rate(copy)[0] == rate
        assert recorded_num_units(copy)[0] == model.cfg.codebook_size
    kmeans = json.loads(units_metadata_path(out / "kmeans_units" / "layer_02.jsonl").read_text())
    assert (kmeans["layer"], kmeans["num_units"]) == (2, 6)


def test_units_of_one_centroids_file_have_one_origin_whichever_command_assigned_them(model, entries, tmp_path):
    """lm-score compares a test file's units_origin with the LM's training units': units of the same centroids
    assigned by extract --kmeans and by spidr units must give the same origin (else a false refusal), and codebook
    units another one."""
    from spidr.cli import main
    from spidr.eval.feature_dir import units_origin
    from spidr.eval.kmeans import centroids_digest, load_centroids, save_centroids

    path = tmp_path / "c.safetensors"
    save_centroids(path, _centroids().numpy())
    out = tmp_path / "out"
    extract_to_directory(model, entries, out, ExtractionSettings(layers=(2,), codebooks=True), progress=False,
                         kmeans=[KMeansUnits(2, load_centroids(path), str(path))])
    assert main(["units", str(out / "layer_02"), "--centroids", str(path), "--out", str(tmp_path / "u.jsonl")]) == 0
    expected = {"layer": 2, "units_source": centroids_digest(load_centroids(path))}
    assert units_origin(out / "kmeans_units" / "layer_02.jsonl") == expected
    assert units_origin(tmp_path / "u.jsonl") == expected
    from spidr.eval.journal import codebook_units_source

    assert units_origin(out / "codebook_units" / "layer_02.jsonl") == {"layer": 2,
                                                                      "units_source": codebook_units_source(model)}
    with (tmp_path / "u.jsonl").open("a") as units:  # rewritten since by something else: its record is not its own
        units.write('{"name": "x", "units": [1]}\n')
    assert units_origin(tmp_path / "u.jsonl") is None


def test_centroids_digest_is_of_float32_values_whatever_dtype_or_type_they_come_in():
    """mut KM1 (the float32 cast dropped): the docstring's 'as float32', so that float64 centroids (numpy's k-means,
    a .npy) and their float32 copy (load_centroids) name one units_source; other values or shape, another."""
    from spidr.eval.kmeans import centroids_digest

    values = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    digest = centroids_digest(torch.from_numpy(values))
    assert centroids_digest(values.astype(np.float64)) == digest
    assert centroids_digest(torch.from_numpy(values).double()) == digest
    assert centroids_digest(values) == digest
    assert centroids_digest(values.reshape(3, 4)) != digest
    other = values.copy()
    other[3, 2] += 1
    assert centroids_digest(other) != digest


def test_codebook_units_source_tells_apart_models_differing_in_heads_or_in_features_only():
    """mut JR1 (heads' tensors left out of the digest) / JR2 (features' fingerprint left out): the codebook units
    are the argmax of the heads over the features, so a change of either is other units."""
    from spidr.config import SpidRConfig
    from spidr.eval.journal import codebook_units_source
    from spidr.models.build import build_model

    torch.manual_seed(0)
    model = build_model(SpidRConfig(**EXTRACTION_MODEL)).eval()
    source = codebook_units_source(model)
    assert source.startswith("codebook:")
    heads = copy_of(model)
    with torch.no_grad():
        heads.heads[0][0].bias[3] += 1.0
    assert codebook_units_source(heads) != source
    features = copy_of(model)
    with torch.no_grad():
        next(features.feature_projection.parameters()).add_(0.5)
    assert codebook_units_source(features) != source
    assert codebook_units_source(copy_of(model)) == source


def copy_of(model):
    import copy

    return copy.deepcopy(model)
