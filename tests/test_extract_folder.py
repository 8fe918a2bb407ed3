"""Folder extraction's contracts: windows from --max-seconds on, what a folder's identity holds, its records, the
skipped rows, the command-line options; behaviours that a mutation round (60 mutants over folder_extraction,
journal, shards, feature_dir, features, units and the extract command) found untested. Each test names the
mutant(s) that survived before it."""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch

from spidr.config import DinoSRConfig, SpidRConfig
from spidr.data.manifest import Manifest, ManifestEntry, read_manifest
from spidr.data.scanning import scan
from spidr.eval import features as features_module
from spidr.eval import folder_extraction
from spidr.eval.features import ExtractionSettings, extract_batch, iter_extracted
from spidr.eval.folder_extraction import KMeansUnits, extract_part, extract_to_directory, unread_stems
from spidr.eval.shards import Shard
from spidr.models.build import build_model
from spidr.models.frames import num_frames
from test_extract_resume import _model
from train_fixtures import EXTRACTION_MODEL, speech_like, write_corpus

CONV = EXTRACTION_MODEL["extractor_conv_layer_config"]


@pytest.fixture(scope="module")
def model():
    return _model()


def _wav(path, num_samples: int, seed: int = 0) -> ManifestEntry:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, speech_like(num_samples, np.random.default_rng(seed)), 16000, subtype="FLOAT")
    return ManifestEntry(path.stem, str(path), num_samples)


# FE2, F6 ---------------------------------------------------------------------------------------------------------
def test_a_file_of_exactly_max_seconds_runs_in_one_forward_and_one_sample_more_in_windows(model, tmp_path,
                                                                                         monkeypatch):
    """--max-seconds: "files longer than this" go through windows; a file of exactly max_seconds runs whole, in
    spidr extract and in iter_extracted (units, probe, k-means samples) alike. (FE2 / F6: `>=` for `>`.)"""
    exact = _wav(tmp_path / "a" / "exact.wav", 8000)
    longer = _wav(tmp_path / "b" / "longer.wav", 8001, seed=1)
    settings = ExtractionSettings(layers=(1,), max_seconds=0.5, window_seconds=0.25, context_seconds=0.125)
    windowed: list[str] = []

    def spy(real):
        def long(model, audio, *args, **kwargs):
            windowed.append(audio.path)
            return real(model, audio, *args, **kwargs)
        return long

    monkeypatch.setattr(folder_extraction, "extract_long", spy(folder_extraction.extract_long))
    monkeypatch.setattr(features_module, "extract_long", spy(features_module.extract_long))
    extract_to_directory(model, [exact], tmp_path / "out", settings, progress=False)
    assert windowed == []
    assert next(iter(iter_extracted(model, [exact], settings)))[1]["layer_01"].shape[0] == num_frames(8000, CONV)
    assert windowed == []
    extract_to_directory(model, [longer], tmp_path / "out2", settings, progress=False)
    list(iter_extracted(model, [longer], settings))
    assert windowed == [longer.path, longer.path]


# FE8 --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [(), (1,)])
def test_a_long_file_without_codebooks_writes_no_codebook_units(model, tmp_path, layers):
    """k-means units (or features) without --codebooks: a windowed long file wrote rows of zeros into
    codebook_units/layer_LL.jsonl, an extraction that was never asked for codebook units. (FE8.)"""
    entry = _wav(tmp_path / "audio" / "long.wav", 48000)
    centroids = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    settings = ExtractionSettings(layers=layers, max_seconds=2.0, window_seconds=1.0, context_seconds=0.5)
    metadata = extract_to_directory(model, [entry], tmp_path / "out", settings, progress=False,
                                    kmeans=[KMeansUnits(2, centroids)])
    assert not (tmp_path / "out" / "codebook_units").exists()
    assert metadata["codebook_layers"] == []
    (row,) = (tmp_path / "out" / "kmeans_units" / "layer_02.jsonl").read_text().splitlines()
    assert len(json.loads(row)["units"]) == num_frames(48000, CONV)


# FE17 -------------------------------------------------------------------------------------------------------------
def test_an_unread_file_in_a_sibling_folder_whose_name_extends_the_root_s_keeps_its_full_path():
    """Every file read is in /c/spk1 (the root); an unreadable one in /c/spk10 is outside it: recorded by its full
    path, not as "/x" (a prefix test without the "/" took spk10 for a folder below spk1). (FE17.)"""
    entries = [ManifestEntry("a", "/c/spk1/a.wav", 16000), ManifestEntry("b", "/c/spk1/b.wav", 16000)]
    unread = [ManifestEntry("x", "/c/spk10/x.wav", 0), ManifestEntry("y", "/c/spk1/sub/y.wav", 0)]
    assert unread_stems(entries, unread) == ["/c/spk10/x", "sub/y"]


# FE18, FE19 -------------------------------------------------------------------------------------------------------
def _refused_without(out, key: str, extraction) -> None:
    state_path = out / ".extract" / "state.json"
    state = json.loads(state_path.read_text())
    assert key in state, sorted(state)
    del state[key]
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"other {key}"):
        extraction()


def test_a_folder_whose_long_archive_members_ran_whole_is_not_topped_up(model, tmp_path):
    """Long archive members once ran in one forward: a folder begun then (its state without
    "long_archive_members") is refused, not resumed into a mix. (FE18.)"""
    entry = _wav(tmp_path / "audio" / "long.wav", 12000)
    with tarfile.open(tmp_path / "audio.tar", "w") as tar:
        tar.add(entry.path, arcname="long.wav")
    entries = scan(tmp_path / "audio.tar", progress=False).entries
    settings = ExtractionSettings(layers=(1,), max_seconds=0.5, window_seconds=0.25, context_seconds=0.125)

    def extraction():
        return extract_to_directory(model, entries, tmp_path / "out", settings, progress=False)

    extraction()
    _refused_without(tmp_path / "out", "long_archive_members", extraction)


def test_k_means_units_alone_where_ids_repeat_record_how_their_rows_are_named(model, tmp_path):
    """spk1/sa1 and spk2/sa1 with k-means units alone: the rows named by path are part of what the folder holds
    (as with codebook units), so a folder without that record is refused. (FE19.)"""
    for k, speaker in enumerate(("spk1", "spk2")):
        _wav(tmp_path / "audio" / speaker / "sa1.wav", 6000 + 1000 * k, seed=k)
    entries = scan(tmp_path / "audio", progress=False).entries
    centroids = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))

    def extraction():
        return extract_to_directory(model, entries, tmp_path / "out", ExtractionSettings(layers=()), progress=False,
                                    kmeans=[KMeansUnits(2, centroids)])

    extraction()
    _refused_without(tmp_path / "out", "unit row names where utterance ids repeat", extraction)


# FE21 -------------------------------------------------------------------------------------------------------------
def test_the_k_means_record_counts_the_rows_written_not_the_files_asked_for(model, tmp_path):
    """One file of three cannot be read: kmeans_units/layer_02.jsonl holds 2 rows, and its record says 2 (as spidr
    units says of its own), not 3. (FE21.)"""
    from spidr.eval.feature_dir import units_metadata_path
    from spidr.eval.units import read_units

    entries = [_wav(tmp_path / f"u{k}.wav", 6000 + 500 * k, seed=k) for k in range(2)]
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    entries.append(ManifestEntry("bad", str(tmp_path / "bad.wav"), 7000))
    centroids = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    extract_to_directory(model, entries, tmp_path / "out", ExtractionSettings(layers=()), progress=False,
                         kmeans=[KMeansUnits(2, centroids)])
    units = tmp_path / "out" / "kmeans_units" / "layer_02.jsonl"
    assert len(read_units(units)) == 2
    assert json.loads(units_metadata_path(units).read_text())["num_utterances"] == 2


# J1 ---------------------------------------------------------------------------------------------------------------
def test_a_renamed_file_id_is_another_list_of_utterances(model, tmp_path):
    """The journal records manifest rows: with one file id renamed (same audio, same length), resuming would count
    that row done and never write its features under the new name. Refused as another list. (J1.)"""
    from spidr.eval.journal import entries_fingerprint

    rows = [ManifestEntry("u0", "/c/u0.wav", 16000), ManifestEntry("u1", "/c/u1.wav", 12000)]
    renamed = [rows[0], ManifestEntry("renamed", "/c/u1.wav", 12000)]
    assert entries_fingerprint(Manifest.from_entries(renamed)) != entries_fingerprint(Manifest.from_entries(rows))
    manifest = write_corpus(tmp_path / "corpus", num_files=2, seconds=(0.3, 0.4))
    entries = read_manifest(manifest)
    extract_to_directory(model, entries, tmp_path / "out", ExtractionSettings(layers=(1,)), progress=False)
    other = [entries[0], ManifestEntry("renamed", entries[1].path, entries[1].num_samples)]
    with pytest.raises(ValueError, match=r"other utterances \(another list of utterances\)"):
        extract_to_directory(model, other, tmp_path / "out", ExtractionSettings(layers=(1,)), progress=False)


# J5 ---------------------------------------------------------------------------------------------------------------
def test_a_units_file_shorter_than_its_journal_stops_the_resume(tmp_path):
    """Truncating a file to a larger size pads it with NUL bytes: the resumed rows would follow a gap of NULs in the
    JSONL. It is refused instead, naming the file. (J5.)"""
    from spidr.eval.journal import UnitsFiles

    (tmp_path / "codebook_units").mkdir()
    path = tmp_path / "codebook_units" / "layer_03.jsonl"
    path.write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match=r"layer_03\.jsonl is shorter \(9 bytes\) than its journal says \(20\)"):
        UnitsFiles(tmp_path, {"layer_03": 20})
    assert path.read_bytes() == b'{"a": 1}\n'


# J7 ---------------------------------------------------------------------------------------------------------------
def test_the_model_fingerprint_changes_with_the_config_alone(model):
    """Same tensors, other attention heads: other features, so another model for the journal. (J7.)"""
    from spidr.eval.journal import model_fingerprint

    other = build_model(SpidRConfig(**{**EXTRACTION_MODEL, "encoder_num_heads": 4})).eval()
    other.load_state_dict(model.state_dict())
    assert model_fingerprint(other) != model_fingerprint(model)
    assert model_fingerprint(_model()) == model_fingerprint(model)


# F1 ---------------------------------------------------------------------------------------------------------------
def test_after_residual_features_with_codebooks_are_the_layers_full_outputs(model):
    """--after-residual --codebooks: the features come from the one pass that also gives the heads; they must be
    the full outputs, as without codebooks. (F1: the choice was dropped on that pass.)"""
    wave = torch.from_numpy(speech_like(9000, np.random.default_rng(3)))
    after = ExtractionSettings(layers=(1, 2), before_residual=False, codebooks=True)
    (result,) = extract_batch(model, [wave], after)
    with torch.inference_mode():
        reference = model.get_intermediate_outputs(wave[None], before_residual=False)
    for layer in (1, 2):
        np.testing.assert_allclose(result[f"layer_{layer:02d}"], reference[layer - 1][0].numpy(), atol=1e-5)


def test_codebook_units_are_the_argmax_of_their_own_layer_s_head(model):
    """units_LL is the arg-max of layer LL's head, frame by frame, in a padded batch as alone."""
    waves = [torch.from_numpy(speech_like(n, np.random.default_rng(n))) for n in (9000, 5000)]
    results = extract_batch(model, waves, ExtractionSettings(layers=(), codebooks=True))
    for wave, result in zip(waves, results, strict=True):
        with torch.inference_mode():
            heads = model.get_codebooks(wave[None])
        for layer in model.head_layers:
            np.testing.assert_array_equal(result[f"units_{layer:02d}"], heads[layer - 1][0].argmax(-1).numpy())


# F11 --------------------------------------------------------------------------------------------------------------
def test_group_norm_waves_of_one_frame_count_but_other_lengths_run_apart():
    """Two waves with the same number of frames but not of samples: batched together, the shorter would be padded
    and its GroupNorm statistics taken over the padding. (F11: grouped by frame count.)"""
    torch.manual_seed(0)
    gn = build_model(DinoSRConfig(**EXTRACTION_MODEL, extractor_mode="group_norm")).eval()
    lengths = (7800, 8050)
    assert num_frames(lengths[0], CONV) == num_frames(lengths[1], CONV)
    waves = [torch.from_numpy(speech_like(n, np.random.default_rng(n))) for n in lengths]
    settings = ExtractionSettings(layers=(1,))
    batched = extract_batch(gn, waves, settings)
    for wave, result in zip(waves, batched, strict=True):
        (alone,) = extract_batch(gn, [wave], settings)
        np.testing.assert_allclose(result["layer_01"], alone["layer_01"], atol=1e-5)


# D2 ---------------------------------------------------------------------------------------------------------------
def test_codebook_units_of_a_layer_whose_features_were_not_written_have_the_codebook_size(model, tmp_path):
    """--layers 1 --codebooks: codebook_units/layer_03.jsonl (head layer 3) takes its vocabulary from the
    metadata's codebook_layers, not from the features' layers. (D2.)"""
    from spidr.eval.feature_dir import recorded_num_units

    entries = [_wav(tmp_path / "u.wav", 6000)]
    extract_to_directory(model, entries, tmp_path / "out", ExtractionSettings(layers=(1,), codebooks=True),
                         progress=False)
    assert recorded_num_units(tmp_path / "out" / "codebook_units" / "layer_03.jsonl")[0] == 16


# P1, P2 -----------------------------------------------------------------------------------------------------------
def test_extract_takes_after_residual_and_dtype_from_the_command_line(model, tmp_path):
    """spidr extract --after-residual --dtype bfloat16 reaches the extraction: recorded, and features as
    extract_batch gives them with those settings. (P1, P2: either option dropped.)"""
    from spidr.cli import main
    from spidr.models.loading import export_safetensors

    manifest = write_corpus(tmp_path / "corpus", num_files=1, seconds=(0.4, 0.5))
    export_safetensors(model, tmp_path / "tiny.safetensors")
    assert main(["extract", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--manifest", str(manifest),
                 "--layers", "2", "--after-residual", "--dtype", "bfloat16", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 0
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["before_residual"] is False
    assert metadata["settings"]["dtype"] == "bfloat16"
    from spidr.data.audio import load_audio

    entry = read_manifest(manifest)[0]
    (expected,) = extract_batch(model, [load_audio(entry, normalize=True)],
                                ExtractionSettings(layers=(2,), before_residual=False, dtype="bfloat16"))
    written = np.load(tmp_path / "out" / "layer_02" / f"{entry.fileid}.npy")
    np.testing.assert_allclose(written, expected["layer_02"], atol=1e-5)


# Skipped files are counted by manifest row (they were counted by location) ---------------------------------------
def test_an_unreadable_file_listed_twice_counts_as_two_files_not_extracted(model, tmp_path):
    """One readable file, and one unreadable file listed under two file ids: 1 file extracted (num_files said 2),
    whole or in parts; with only the unreadable rows nothing was read, and the extraction is refused (it finished,
    num_files 1)."""
    good = _wav(tmp_path / "good.wav", 6000)
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    bad = [ManifestEntry(name, str(tmp_path / "bad.wav"), 7000) for name in ("bad_a", "bad_b")]
    metadata = extract_to_directory(model, [good, *bad], tmp_path / "out", ExtractionSettings(layers=(1,)),
                                    progress=False)
    assert sorted(metadata["skipped_stems"]) == ["bad_a", "bad_b"]
    assert metadata["num_files"] == 1
    with pytest.raises(ValueError, match="none of the 2 files could be read"):
        extract_to_directory(model, bad, tmp_path / "out2", ExtractionSettings(layers=(1,)), progress=False)
    for shard in (Shard(1, 2), Shard(2, 2)):
        outcome = extract_part(model, [good, *bad], tmp_path / "parts", ExtractionSettings(layers=(1,)), shard,
                               progress=False)
    assert outcome.metadata["num_files"] == 1
    for shard in (Shard(1, 2), Shard(2, 2)):
        try:
            extract_part(model, bad, tmp_path / "parts2", ExtractionSettings(layers=(1,)), shard, progress=False)
        except ValueError as error:
            assert "none of the 2 files could be read" in str(error)  # noqa: PT017  (the part that finishes last)
            break
    else:
        pytest.fail("an extraction in parts that read no file finished")


def test_a_stopped_extraction_resumes_with_other_batch_seconds(model, tmp_path, monkeypatch):
    """--batch-seconds is not part of a folder's identity (what one runs again with after running out of memory): an
    extraction stopped after two batches resumes with ten times the batch, and ends with the features and units of
    an uninterrupted run (to float tolerance: batches of other sizes pad otherwise)."""
    from spidr.eval.units import read_units

    entries = read_manifest(write_corpus(tmp_path / "corpus", num_files=6, seconds=(0.5, 1.0)))
    settings = ExtractionSettings(layers=(1, 3), codebooks=True, batch_seconds=0.3)
    extract_to_directory(model, entries, tmp_path / "reference", settings, progress=False)
    real, calls = folder_extraction.extract_padded_batch, []

    def stopping(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(folder_extraction, "extract_padded_batch", stopping)
    with pytest.raises(KeyboardInterrupt):
        extract_to_directory(model, entries, tmp_path / "out", settings, progress=False)
    assert len(list((tmp_path / "out" / "layer_01").glob("*.npy"))) == 2  # (a file per batch of 0.3 s)
    monkeypatch.setattr(folder_extraction, "extract_padded_batch", real)
    metadata = extract_to_directory(model, entries, tmp_path / "out", replace(settings, batch_seconds=3.0),
                                    progress=False)
    assert metadata["num_files"] == 6
    assert metadata["settings"]["batch_seconds"] == 3.0
    for path in sorted((tmp_path / "reference").glob("layer_*/*.npy")):
        np.testing.assert_allclose(np.load(tmp_path / "out" / path.relative_to(tmp_path / "reference")),
                                   np.load(path), atol=1e-5)
    assert len(list((tmp_path / "out").glob("layer_*/*.npy"))) == 12
    for layer in (2, 3):
        resumed = read_units(tmp_path / "out" / "codebook_units" / f"layer_{layer:02d}.jsonl")
        reference = read_units(tmp_path / "reference" / "codebook_units" / f"layer_{layer:02d}.jsonl")
        assert resumed.keys() == reference.keys()
        assert all(np.array_equal(resumed[name], reference[name]) for name in reference)


def test_each_files_folder_is_its_absolute_normalised_folder_however_spelt(tmp_path, monkeypatch):
    """_folders remembers the folder of each path prefix it met (files share folders: 48 a chapter in LibriSpeech);
    every row must still get what os.path gives it alone, where spellings of one folder differ (``a/../b``, ``./``,
    ``//``, relative and absolute) or the same prefix ends in a name that normalising removes."""
    import os

    monkeypatch.chdir(tmp_path)
    paths = ["b/x.wav", "a/../b/y.wav", "b/./z.wav", "b//w.wav", "x.wav", "./x2.wav", "/abs/b/v.wav",
             "/abs/b/../c.wav", "//two/u.wav", "b/..", "b/t.wav", "b/.", "b/s.wav", "../up/r.wav", "b/x.wav"]
    manifest = Manifest.from_entries([ManifestEntry(f"u{k}", path, 16000) for k, path in enumerate(paths)])
    folders = folder_extraction._folders(manifest, 0, len(paths), with_files=False)
    assert folders == [os.path.dirname(os.path.abspath(path)) for path in paths]
    assert folders[1] == folders[0] == str(tmp_path / "b")
    assert folders[9] == str(tmp_path.parent)  # ("b/.." is the folder itself, in the one above)
