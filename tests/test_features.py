"""Feature extraction: padding invariance, windowed long files, layer and residual choices, files written."""

from __future__ import annotations

import functools
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spidr.config import DinoSRConfig, SpidRConfig
from spidr.data.audio import AudioError, load_audio
from spidr.data.manifest import ManifestEntry, read_manifest, write_manifest
from spidr.data.scanning import scan
from spidr.eval.feature_dir import FeatureDirectory, StemKeyed, one_layer_directory
from spidr.eval.features import (
    ExtractionSettings,
    LongAudio,
    extract_batch,
    extract_long,
    extract_padded_batch,
    iter_units,
    length_batches,
    num_samples_for_frames,
    parse_layers,
    windows,
)
from spidr.eval.folder_extraction import extract_to_directory, output_stems
from spidr.eval.units import read_units
from spidr.model_modes import eval_mode
from spidr.models.build import build_model
from spidr.models.frames import num_frames, padding_mask_from_lengths
from train_fixtures import EXTRACTION_MODEL as TINY


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(SpidRConfig(**TINY)).eval()


def speech_like(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = rng.uniform(100, 250)
    wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * (1 + np.sin(2 * np.pi * 4 * t))
    return (0.1 * wave + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def test_parse_layers():
    assert parse_layers("1-3", 3) == (1, 2, 3)
    assert parse_layers("3,1", 3) == (1, 3)
    with pytest.raises(ValueError, match=r"layers 1\.\.3"):
        parse_layers("0-2", 3)
    with pytest.raises(ValueError, match="expected"):
        parse_layers("a", 3)
    with pytest.raises(ValueError, match="the range 2-1 runs backwards"):
        parse_layers("2-1", 3)


def test_padded_batch_equals_one_file_at_a_time(model):
    waves = [torch.from_numpy(speech_like(s, i)) for i, s in enumerate((1.0, 0.37, 0.71))]
    settings = ExtractionSettings(layers=(1, 3), codebooks=True)
    batched = extract_batch(model, waves, settings)
    for wave, result in zip(waves, batched, strict=True):
        (alone,) = extract_batch(model, [wave], settings)
        assert result.keys() == alone.keys() == {"layer_01", "layer_03", "units_02", "units_03"}
        assert result["layer_01"].shape == (num_frames(wave.shape[0], TINY["extractor_conv_layer_config"]), 32)
        for key in result:
            np.testing.assert_allclose(result[key], alone[key], atol=1e-5)


def test_group_norm_front_end_padded_batch_equals_one_file_at_a_time():
    """A group_norm front end (fairseq DinoSR "default" mode) normalises its first conv over the padded time axis:
    utterances of other lengths run apart, so a file's features do not depend on what it is batched with."""
    torch.manual_seed(0)
    model = build_model(DinoSRConfig(**TINY, extractor_mode="group_norm")).eval()
    waves = [torch.from_numpy(speech_like(s, i)) for i, s in enumerate((1.0, 0.37, 0.71, 0.37))]
    settings = ExtractionSettings(layers=(1, 3), codebooks=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it never hands the model a padded batch
        batched = extract_batch(model, waves, settings, front_end=True)
    for wave, result in zip(waves, batched, strict=True):
        (alone,) = extract_batch(model, [wave], settings, front_end=True)
        assert result.keys() == alone.keys()
        for key in result:
            np.testing.assert_allclose(result[key], alone[key], atol=1e-5, err_msg=key)
    # Called directly on a padded batch, the model warns: the mask cannot keep the GroupNorm off the padding.
    short, long = waves[1], waves[0]
    padded = torch.zeros(2, long.shape[0])
    padded[0, : short.shape[0]], padded[1] = short, long
    mask = padding_mask_from_lengths(torch.tensor([short.shape[0], long.shape[0]]),
                                     TINY["extractor_conv_layer_config"])
    warning = "extractor_mode = 'group_norm' normalises its first conv over the padded"
    with pytest.warns(UserWarning, match=warning):
        model.get_codebooks(padded, padding_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mask with nothing padded changes nothing: no warning
        model.get_codebooks(padded[1:], padding_mask=mask[1:])
        model.get_intermediate_outputs(padded[1:], attention_mask=torch.ones(1, 1, mask.shape[1], mask.shape[1],
                                                                             dtype=torch.bool))
    frames = batched[1]["layer_01"].shape[0]
    with torch.no_grad(), pytest.warns(UserWarning, match=warning):
        direct = model.get_intermediate_outputs(padded, padding_mask=mask, num_layers=1)[0][0, :frames].numpy()
    assert np.abs(direct - batched[1]["layer_01"]).max() > 1e-3  # what the warning is about


def test_an_extraction_of_padded_group_norm_features_is_not_topped_up(tmp_path):
    """Features extracted before group_norm models ran unpadded differ from today's: a folder begun then (its
    journal without "front_end_batching") is refused, not resumed into a mix of both."""
    torch.manual_seed(0)
    model = build_model(DinoSRConfig(**TINY, extractor_mode="group_norm")).eval()
    (tmp_path / "audio").mkdir()
    for i, seconds in enumerate((0.5, 0.6)):
        sf.write(tmp_path / "audio" / f"u{i}.wav", speech_like(seconds, i), 16000)
    entries = scan(tmp_path / "audio", progress=False).entries
    settings = ExtractionSettings(layers=(2,))
    extract_to_directory(model, entries, tmp_path / "out", settings, progress=False)
    state_path = tmp_path / "out" / ".extract" / "state.json"
    state = json.loads(state_path.read_text())
    assert state.pop("front_end_batching") == "unpadded"
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="other front_end_batching"):
        extract_to_directory(model, entries, tmp_path / "out", settings, progress=False)


def test_layers_and_residual_choice_are_honoured(model):
    wave = torch.from_numpy(speech_like(0.5, 3))
    before = extract_batch(model, [wave], ExtractionSettings(layers=(2,)))[0]["layer_02"]
    after = extract_batch(model, [wave], ExtractionSettings(layers=(2,), before_residual=False))[0]["layer_02"]
    with torch.inference_mode():
        reference = model.get_intermediate_outputs(wave[None])
        reference_after = model.get_intermediate_outputs(wave[None], before_residual=False)
    np.testing.assert_allclose(before, reference[1][0].numpy(), atol=1e-6)
    np.testing.assert_allclose(after, reference_after[1][0].numpy(), atol=1e-6)
    assert not np.allclose(before, after)
    assert extract_batch(model, [], ExtractionSettings(layers=(2,))) == []
    for layers, says in (((2, 9), r"\[2, 9\]: expected at least one of the model's layers 1 to 3 \(\[9\] are not\)"),
                         ((), r"\[\]: expected at least one of the model's layers 1 to 3, or codebook or k-means "
                              r"units alone$")):
        with pytest.raises(ValueError, match=says):
            extract_batch(model, [wave], ExtractionSettings(layers=layers))
    alone = extract_batch(model, [wave], ExtractionSettings(layers=(), codebooks=True))[0]
    with_layers = extract_batch(model, [wave], ExtractionSettings(layers=(1,), codebooks=True))[0]
    assert sorted(alone) == ["units_02", "units_03"]
    for key, units in alone.items():
        np.testing.assert_array_equal(units, with_layers[key])


def test_windows_cover_every_frame_once():
    kept = [(a, b) for a, b, _, _ in windows(103, 10, 4)]
    assert kept[0] == (0, 10)
    assert kept[-1] == (100, 103)
    assert sum(b - a for a, b in kept) == 103
    for a, b, start, end in windows(103, 10, 4):
        assert start == max(a - 4, 0)
        assert end == min(b + 4, 103)


def test_num_samples_for_frames_inverts_the_frame_count():
    layers = TINY["extractor_conv_layer_config"]
    for frames in (1, 2, 49, 500):
        samples = num_samples_for_frames(frames, layers)
        assert num_frames(samples, layers) == frames
        assert num_frames(samples - 1, layers) == frames - 1


def test_windowed_long_file_matches_whole_file_away_from_edges(model, tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, speech_like(12.0, 7), 16000, subtype="FLOAT")
    settings = ExtractionSettings(layers=(1, 3), window_seconds=3.0, context_seconds=1.0)
    whole = extract_batch(model, [load_audio(str(path))], settings)[0]
    audio = LongAudio(str(path))
    sinks = {key: np.zeros_like(value) for key, value in whole.items()}
    extract_long(model, audio, settings, sinks)
    # Streamed standardisation equals whole-file standardisation.
    np.testing.assert_allclose(audio.read(0, audio.num_samples).numpy(), load_audio(str(path)).numpy(), atol=1e-5)
    for key in whole:
        # Global attention sees less context inside a window: compare relative error, which stays small.
        error = np.abs(sinks[key] - whole[key]).mean() / np.abs(whole[key]).mean()
        assert error < 0.05, (key, error)
        assert np.abs(sinks[key]).sum(axis=1).min() > 0  # every frame was written


def test_long_audio_standardises_a_file_with_a_dc_offset_like_load_audio(tmp_path):
    """The streamed standard deviation is sqrt(E[x²] − mean²): with a DC offset (sine + 0.3) E[x²] alone is far
    larger, so the windowed path of long files would feed the model other samples than the short path."""
    path = tmp_path / "offset.wav"
    t = np.arange(16_000) / 16_000
    sf.write(path, (0.5 * np.sin(2 * np.pi * 220 * t) + 0.3).astype(np.float32), 16_000, subtype="FLOAT")
    audio = LongAudio(str(path))
    np.testing.assert_allclose(audio.read(0, audio.num_samples).numpy(),
                               load_audio(str(path), normalize=True).numpy(), atol=1e-5)
    assert audio.mean == pytest.approx(0.3, abs=1e-6)
    assert audio.std == pytest.approx(0.5 / np.sqrt(2), rel=1e-4)  # a whole number of periods: σ = amplitude / √2


@pytest.mark.parametrize(("rate", "channels"), [(44100, 2), (22050, 1), (8000, 3)])
def test_a_long_file_at_another_rate_reads_as_load_audio_resamples_it_whole(tmp_path, rate, channels):
    """Resampled as a stream, block by block, in both passes: the samples of every window, read forward with overlaps
    as extract_long reads them or back to an earlier one, are load_audio's (resampled whole, then standardised)."""
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(rate)
    sf.write(path, (0.2 * rng.standard_normal((rate * 130, channels)) + 0.05).astype(np.float32), rate,
             subtype="FLOAT")
    audio, whole = LongAudio(str(path)), load_audio(str(path))
    assert audio.num_samples == whole.shape[0]
    for start, stop in ((0, 100_000), (80_000, 1_000_000), (990_000, 2_050_000), (2_000_000, whole.shape[0]),
                        (5_000, 6_000), (0, whole.shape[0])):
        torch.testing.assert_close(audio.read(start, stop), whole[start:stop], rtol=0, atol=2e-6)


def test_a_long_file_at_another_rate_is_not_held_whole(tmp_path):
    """A 12-minute 22.05 kHz file was decoded and resampled whole (≥ 2 × its 64 MB of float32 samples at its rate
    held at once) where a 16 kHz file is read a minute at a time; now both passes stream it."""
    import tracemalloc

    rate = 22050
    path = tmp_path / "lecture.wav"
    samples = rate * 60 * 12
    sf.write(path, (0.2 * np.random.default_rng(0).standard_normal(samples)).astype(np.float32), rate,
             subtype="PCM_16")
    tracemalloc.start()
    try:
        audio = LongAudio(str(path))
        for start in range(0, audio.num_samples, 16000 * 20):  # 20 s windows with 2 s of context, as extract_long
            audio.read(max(start - 32000, 0), min(start + 16000 * 22, audio.num_samples))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * samples * 4, f"{peak / 1e6:.1f} MB at the peak"


def test_extract_to_directory_writes_mirrored_tree_and_metadata(model, tmp_path):
    entries = []
    for speaker in ("a", "b"):
        for i in range(2):
            path = tmp_path / "audio" / speaker / f"{speaker}{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            wave = speech_like(0.5 + 0.2 * i, i)
            sf.write(path, wave, 16000)
            entries.append(ManifestEntry(fileid=path.stem, path=str(path), num_samples=len(wave)))
    entries.append(ManifestEntry(fileid="broken", path=str(tmp_path / "audio" / "missing.wav"), num_samples=9000))
    settings = ExtractionSettings(layers=(2,), codebooks=True)
    metadata = extract_to_directory(model, entries, tmp_path / "out", settings, progress=False)
    assert metadata["num_files"] == 4
    assert list(metadata["skipped"]) == [str(tmp_path / "audio" / "missing.wav")]
    features = np.load(tmp_path / "out" / "layer_02" / "a" / "a1.npy")
    assert features.shape == (num_frames(entries[1].num_samples, TINY["extractor_conv_layer_config"]), 32)
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "codebook_units" / "layer_03.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert all(0 <= u < 16 for row in rows for u in row["units"])
    saved = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert saved["before_residual"] is True
    assert saved["layers"] == [2]
    assert saved["frame_rate_hz"] == 50
    # kmeans / units / abx read a finished layer folder; without metadata.json the run has not finished: refused
    assert len(one_layer_directory(tmp_path / "out" / "layer_02")) == 4
    (tmp_path / "out" / "metadata.json").unlink()
    with pytest.raises(ValueError, match=r"layer_02 is from an unfinished spidr extract run .*rerun the same spidr "
                                         r"extract command to complete it"):
        one_layer_directory(tmp_path / "out" / "layer_02")


def test_codebook_units_are_keyed_like_the_features(model, tmp_path):
    """A CSV manifest may give file ids that are not the audio files' stems: the feature files are named by the id,
    and so are the codebook-unit rows (short batches and windowed long files alike), so readers match them."""
    audio = tmp_path / "audio"
    audio.mkdir()
    lines = ["fileid,path,num_samples"]
    for fileid, name, seconds in (("spk1-utt-a", "take1.wav", 0.5), ("spk2-utt-b", "take2.wav", 3.0)):
        sf.write(audio / name, speech_like(seconds, len(lines)), 16000, subtype="FLOAT")
        lines.append(f"{fileid},{audio / name},{int(seconds * 16000)}")
    (tmp_path / "dev.csv").write_text("\n".join(lines) + "\n")
    settings = ExtractionSettings(layers=(3,), codebooks=True, max_seconds=2.0, window_seconds=1.0)
    extract_to_directory(model, read_manifest(tmp_path / "dev.csv"), tmp_path / "out", settings, progress=False)
    features = StemKeyed(one_layer_directory(tmp_path / "out" / "layer_03"))
    units = read_units(tmp_path / "out" / "codebook_units" / "layer_03.jsonl")
    assert sorted(features) == sorted(units) == ["spk1-utt-a", "spk2-utt-b"]
    for name, values in units.items():
        assert values.shape == (features[name].shape[0],)
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "codebook_units" / "layer_03.jsonl").read_text().splitlines()]
    assert {row["name"]: row["audio"] for row in rows} == {"spk1-utt-a": str(audio / "take1.wav"),
                                                           "spk2-utt-b": str(audio / "take2.wav")}
    # a folder begun when rows were keyed by the audio stem is not topped up with rows keyed by id
    state_path = tmp_path / "out" / ".extract" / "state.json"
    state = json.loads(state_path.read_text())
    del state["unit_rows"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="other unit_rows \\(that folder was begun by an older spidr"):
        extract_to_directory(model, read_manifest(tmp_path / "dev.csv"), tmp_path / "out", settings, progress=False)


def test_unit_rows_of_a_file_id_held_twice_are_named_by_their_path(model, tmp_path):
    """TIMIT-style spk1/sa1.wav and spk2/sa1.wav: the feature files are spk1/sa1.npy and spk2/sa1.npy, and the unit
    rows must name one utterance each (two rows named "sa1" made every units reader refuse the file)."""
    for speaker, seconds in (("spk1", 0.5), ("spk2", 0.7), ("spk3", 0.6)):
        (tmp_path / "audio" / speaker).mkdir(parents=True)
        name = "other" if speaker == "spk3" else "sa1"
        sf.write(tmp_path / "audio" / speaker / f"{name}.wav", speech_like(seconds, len(speaker)), 16000)
    entries = scan(tmp_path / "audio", progress=False).entries
    extract_to_directory(model, entries, tmp_path / "out", ExtractionSettings(layers=(3,), codebooks=True),
                         progress=False)
    units = read_units(tmp_path / "out" / "codebook_units" / "layer_03.jsonl")
    assert sorted(units) == ["other", "spk1/sa1", "spk2/sa1"]  # by path where the id repeats, as features are found
    features = StemKeyed(one_layer_directory(tmp_path / "out" / "layer_03"))
    assert sorted(features) == sorted(units)
    for name, values in units.items():
        assert values.shape == (features[name].shape[0],)


def test_an_utterance_id_held_by_several_files_is_named_by_path_and_refused_as_a_bare_id():
    """One repeated id (spk1/0001, spk2/0001) named every row by its path and turned off lookup by id for the whole
    corpus: items and alignments naming the other, unique ids found nothing. Truth, by hand: the repeated id's files
    are named by path (./0002 for a file at the top, whose path is the bare id), the rest by id; a path, or a path
    ending in a file's path, or a unique id finds its file; the repeated id alone is refused, naming its files."""
    keys = ["spk1/0001", "spk2/0001", "données/é", "0002", "x/0002", "speaker 01/utt-001"]
    features = StemKeyed({key: np.full(2, index) for index, key in enumerate(keys)})
    assert list(features) == ["spk1/0001", "spk2/0001", "é", "./0002", "x/0002", "utt-001"]
    assert len(features) == len(keys)
    for name in features:  # the names it gives find their files
        assert features[name][0] == list(features).index(name)
    assert features["corpus/données/é"][0] == 2  # (an item file's path ending in the id)
    assert features["data/spk2/0001"][0] == 1  # (a path from a folder above: it ends with spk2/0001)
    assert features["corpus/0002"][0] == 3
    assert "nothing" not in features
    with pytest.raises(ValueError, match=r"'0001': 2 utterances of .* have the id '0001' \('spk1/0001', "
                                         r"'spk2/0001'\); name each by one of those paths"):
        _ = "0001" in features
    with pytest.raises(ValueError, match=r"'0002': .* \('./0002', 'x/0002'\)"):
        features["0002"]
    with pytest.raises(ValueError, match="'other/0001'"):
        features["other/0001"]


def test_a_path_finds_the_file_sharing_most_of_its_last_folders_and_a_skipped_one_absorbs_its_names():
    """Truth, by hand. A path finds the file it names, else the file sharing most of its last components where
    one path ends with the other. A skipped file (its features absent) takes every name it matches best, even from
    another root, and then nothing is found: the top file ./0001 of a folder that mirrors spk1/ must not answer for
    the unreadable /c/audio/spk2/0001. A present file whose path differs further up is never found that way."""
    features = StemKeyed({"0001": np.zeros(1), "other": np.ones(1)}, skipped=["/c/audio/spk2/0001"],
                         root="/c/audio/spk1")
    assert list(features) == ["./0001", "other"]
    for name in ("spk1/0001", "./0001", "data/spk1/0001"):
        assert features.resolve(name) == "0001", name
    for name in ("spk2/0001", "corpus/spk2/0001", "/c/audio/spk2/0001"):
        assert name not in features, name
        assert features.names_skipped(name)
    with pytest.raises(ValueError, match=r"'/c/audio/spk2/0001' \(skipped: unreadable\)\); name each by one of "
                                         r"those paths \(a skipped file's path finds nothing\)"):
        features.resolve("0001")
    # Every file read in /x/audio/aug/, the unreadable twin /x/audio/0001: a name as close to both (another root's
    # copy/0001) names either; aug/0001 and audio/0001 tell them apart.
    features = StemKeyed({"0001": np.zeros(1)}, skipped=["/x/audio/0001"], root="/x/audio/aug")
    assert features.resolve("aug/0001") == "0001"
    assert "audio/0001" not in features
    with pytest.raises(ValueError, match="name each by one of those paths"):
        features.resolve("mnt/copy/0001")
    present = StemKeyed({"a/spk1/0001": 0, "a/spk2/0001": 1, "b/fcjf0/sa1": 2, "c/mabc0/sa1": 3})
    assert present.resolve("data/a/spk2/0001") == "a/spk2/0001"  # (it ends with that path)
    assert present.resolve("fcjf0/sa1") == "b/fcjf0/sa1"  # (that path ends with it)
    for name in ("corpus/spk2/0001", "x/a/spk3/0001"):  # (a present file agreeing on 2 components, not 3)
        with pytest.raises(ValueError, match="name each by one of those paths"):
            present.resolve(name)


def test_a_name_typed_in_the_other_unicode_form_finds_its_file():
    """A file name copied from macOS holds "e" and a combining accent (NFD), an item file typed elsewhere "é" as
    one code point (NFC): the same name, which found nothing. Truth: unicodedata's two forms of one string name the
    same file, by path and by id, and a name in neither form still finds nothing."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "données/élan")
    features = StemKeyed({nfd: np.zeros(1), "other": np.ones(1)})
    for name in ("données/élan", "élan", "corpus/données/élan", nfd):
        assert name in features, ascii(name)
        assert features.resolve(name) == nfd
    assert "elan" not in features
    nfc = StemKeyed({"données/élan": np.zeros(1)})
    assert nfc.resolve(unicodedata.normalize("NFD", "élan")) == "données/élan"


def test_unit_rows_are_named_as_units_and_readers_find_them_when_file_ids_hold_folders(model, tmp_path):
    """Unique manifest ids spk1/0001 and spk2/0001 gave two rows named "0001" (every units reader then refused the
    file), and spidr units named them otherwise. Truth: extract --codebooks and spidr units name the rows alike, no
    name twice, and each row has its own file's frame count."""
    lines = ["fileid,path,num_samples"]
    for fileid, seconds in (("spk1/0001", 0.5), ("spk2/0001", 0.8), ("it's", 0.6)):
        path = tmp_path / "audio" / f"{fileid}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, speech_like(seconds, len(lines)), 16000)
        lines.append(f"{fileid},{path},{int(seconds * 16000)}")
    (tmp_path / "ids.csv").write_text("\n".join(lines) + "\n")
    extract_to_directory(model, read_manifest(tmp_path / "ids.csv"), tmp_path / "out",
                         ExtractionSettings(layers=(3,), codebooks=True), progress=False)
    units = read_units(tmp_path / "out" / "codebook_units" / "layer_03.jsonl")
    features = StemKeyed(one_layer_directory(tmp_path / "out" / "layer_03"))
    assert sorted(units) == sorted(features) == ["it's", "spk1/spk1/0001", "spk2/spk2/0001"]
    assert {name: len(values) for name, values in units.items()} == {
        name: features[name].shape[0] for name in features}
    assert len(units["spk1/spk1/0001"]) != len(units["spk2/spk2/0001"])


def test_a_file_whose_id_a_skipped_file_shared_is_named_and_found_as_extract_names_it(model, tmp_path, capsys):
    """spk1/0001.wav and spk2/0001.wav, the second unreadable (a NaN sample): extract --kmeans named spk1's row by
    its path, while spidr units, seeing only the files written, named it "0001", and every reader then took the
    skipped spk2/0001's items and alignments for spk1's. Truth: the extraction records the skipped file's path;
    units rows are named alike by both; the bare id is refused, naming the skipped file; spk2/0001 finds nothing,
    so the units' quality is that of the other alignments alone."""
    from spidr.cli import main
    from spidr.eval.feature_dir import skipped_stems
    from spidr.eval.folder_extraction import KMeansUnits
    from spidr.eval.kmeans import save_centroids

    for name, seconds in (("spk1/0001", 0.7), ("spk2/0001", 0.6), ("spk3/other", 0.5)):
        wave = speech_like(seconds, len(name) + int(10 * seconds))
        if name == "spk2/0001":
            wave[100] = np.nan
        (tmp_path / "audio" / name).parent.mkdir(parents=True)
        sf.write(tmp_path / "audio" / f"{name}.wav", wave, 16000, subtype="FLOAT")
    centroids = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    save_centroids(tmp_path / "c.safetensors", centroids.numpy())
    metadata = extract_to_directory(model, scan(tmp_path / "audio", progress=False).entries, tmp_path / "out",
                                    ExtractionSettings(layers=(3,)), progress=False,
                                    kmeans=[KMeansUnits(3, centroids, "c.safetensors")])
    assert metadata["skipped_stems"] == ["spk2/0001"]
    layer = tmp_path / "out" / "layer_03"
    assert main(["units", str(layer), "--centroids", str(tmp_path / "c.safetensors"),
                 "--out", str(tmp_path / "units.jsonl")]) == 0
    ours, extracted = read_units(tmp_path / "units.jsonl"), read_units(tmp_path / "out/kmeans_units/layer_03.jsonl")
    assert sorted(ours) == sorted(extracted) == ["other", "spk1/0001"]
    assert all(np.array_equal(ours[name], extracted[name]) for name in ours)
    assert skipped_stems(tmp_path / "units.jsonl") == skipped_stems(layer) == {"spk2/0001"}

    features = StemKeyed(one_layer_directory(layer), skipped=skipped_stems(layer))
    assert all(name in features for name in ("spk1/0001", "corpus/spk1/0001", "other"))
    assert not any(name in features for name in ("spk2/0001", "corpus/spk2/0001"))
    with pytest.raises(ValueError, match=r"'0001': 2 utterances .* \('spk1/0001', 'spk2/0001' \(skipped: unreadable"):
        _ = "0001" in features
    assert sorted(features) == ["other", "spk1/0001"]

    def quality(names: list[str]) -> dict:
        with (tmp_path / "phones.jsonl").open("w") as handle:
            for name in names:
                frames = len(ours[name.removeprefix("corpus/").replace("spk2", "spk1")])
                handle.write(json.dumps({"name": name, "phones": ["a", "b"] * frames}) + "\n")
        capsys.readouterr()
        assert main(["units-quality", str(tmp_path / "units.jsonl"), str(tmp_path / "phones.jsonl"), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    assert quality(["corpus/spk1/0001", "corpus/spk2/0001", "other"]) == quality(["corpus/spk1/0001", "other"])


def test_an_extraction_in_parts_finished_before_skipped_stems_were_recorded_records_them_when_a_part_reruns(
        model, tmp_path, caplog):
    """A folder finished by parts before the skipped files' paths were recorded kept no record: a rerun part
    returned at once, and spidr units named spk1/0001 "0001" for good, with no warning. Truth: the readers warn
    about such a folder, and a part run again records the paths in metadata.json and the k-means record."""
    from spidr.eval.feature_dir import skipped_stems, units_metadata_path
    from spidr.eval.folder_extraction import KMeansUnits, extract_part
    from spidr.eval.shards import parse_shard

    for name, seconds in (("spk1/0001", 0.7), ("spk2/0001", 0.6), ("spk3/other", 0.5)):
        wave = speech_like(seconds, len(name))
        if name == "spk2/0001":
            wave[100] = np.nan
        (tmp_path / "audio" / name).parent.mkdir(parents=True)
        sf.write(tmp_path / "audio" / f"{name}.wav", wave, 16000, subtype="FLOAT")
    entries = scan(tmp_path / "audio", progress=False).entries
    kmeans = [KMeansUnits(3, torch.randn(5, 32, generator=torch.Generator().manual_seed(1)), "c")]
    out = tmp_path / "out"
    for part in ("1/2", "2/2"):
        outcome = extract_part(model, entries, out, ExtractionSettings(layers=(3,)), parse_shard(part),
                               progress=False, kmeans=kmeans)
    assert outcome.metadata["skipped_stems"] == ["spk2/0001"]
    record = units_metadata_path(out / "kmeans_units" / "layer_03.jsonl")
    for path in (out / "metadata.json", record):  # as an older spidr wrote them
        written = json.loads(path.read_text())
        del written["skipped_stems"]
        path.write_text(json.dumps(written))
    assert skipped_stems(out / "layer_03") == frozenset()
    assert "lists files that the extraction skipped but not their paths" in caplog.text
    outcome = extract_part(model, entries, out, ExtractionSettings(layers=(3,)), parse_shard("1/2"), progress=False,
                           kmeans=kmeans)
    assert outcome.finished_before
    assert skipped_stems(out / "layer_03") == skipped_stems(out / "kmeans_units" / "layer_03.jsonl") == {"spk2/0001"}
    assert sorted(read_units(out / "kmeans_units" / "layer_03.jsonl")) == ["other", "spk1/0001"]


def test_long_files_go_through_windows_and_match_the_short_path(model, tmp_path):
    path = tmp_path / "audio" / "long.wav"
    path.parent.mkdir()
    sf.write(path, speech_like(8.0, 11), 16000, subtype="FLOAT")
    entry = ManifestEntry(fileid="long", path=str(path), num_samples=8 * 16000)
    whole = extract_to_directory(model, [entry], tmp_path / "whole", ExtractionSettings(layers=(2,), codebooks=True),
                                 progress=False)
    windowed = extract_to_directory(
        model, [entry], tmp_path / "windowed",
        ExtractionSettings(layers=(2,), codebooks=True, max_seconds=2.0, window_seconds=2.0, context_seconds=1.0),
        progress=False,
    )
    assert whole["num_files"] == windowed["num_files"] == 1
    a = np.load(tmp_path / "whole" / "layer_02" / "long.npy")
    b = np.load(tmp_path / "windowed" / "layer_02" / "long.npy")
    assert a.shape == b.shape == (num_frames(8 * 16000, TINY["extractor_conv_layer_config"]), 32)
    assert np.abs(a - b).mean() / np.abs(a).mean() < 0.05
    units = [json.loads(line) for line in
             (tmp_path / "windowed" / "codebook_units" / "layer_03.jsonl").read_text().splitlines()]
    assert len(units[0]["units"]) == a.shape[0]


@pytest.mark.parametrize("alone", [True, False])
def test_files_too_short_or_not_finite_are_skipped_by_name_on_either_path(model, tmp_path, alone):
    """A file shorter than the front end's receptive field has no frame: skipped, whether alone in its batch (it
    stopped the whole extraction) or beside a longer file (it left an empty feature file). A NaN sample is refused
    on the windowed path of long files as on the short path (its features were all NaN)."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "tiny.wav", speech_like(1.0, 3)[:300], 16000, subtype="FLOAT")
    sf.write(audio / "ok.wav", speech_like(1.0, 4), 16000, subtype="FLOAT")
    broken = speech_like(3.0, 5)
    broken[20000] = np.nan
    sf.write(audio / "nan.wav", broken, 16000, subtype="FLOAT")
    entries = [ManifestEntry("tiny", str(audio / "tiny.wav"), 300),
               ManifestEntry("nan", str(audio / "nan.wav"), 48000)]
    settings = ExtractionSettings(layers=(1,), codebooks=True, max_seconds=2.0, window_seconds=1.0,
                                  context_seconds=0.5, batch_seconds=1.0 if alone else 4.0)
    # none readable: an error, and no metadata.json (which would mark an extraction of nothing finished)
    with pytest.raises(ValueError, match="none of the 2 files could be read, so nothing was extracted"):
        extract_to_directory(model, entries, tmp_path / "none", settings, progress=False)
    assert not (tmp_path / "none" / "metadata.json").exists()
    entries.append(ManifestEntry("ok", str(audio / "ok.wav"), 16000))  # alone: in a batch of its own
    metadata = extract_to_directory(model, entries, tmp_path / "out", settings, progress=False)
    assert "shorter than one frame (300 samples; the front end's receptive field is 400)" in (
        metadata["skipped"][str(audio / "tiny.wav")])
    assert "NaN or Inf" in metadata["skipped"][str(audio / "nan.wav")]
    assert metadata["skipped"][str(audio / "nan.wav")] == "contains NaN or Inf samples"
    assert sorted(p.name for p in (tmp_path / "out").glob("layer_01/*")) == ["ok.npy"]
    rows = [json.loads(line)["audio"] for path in (tmp_path / "out").glob("codebook_units/layer_03.jsonl")
            for line in path.read_text().splitlines()]
    assert rows == [str(audio / "ok.wav")]
    # iter_units (lm-units) skips them the same way: alone, the short file stopped it with no name; beside a longer
    # file it gave the short one units of length 0
    skipped: dict[str, str] = {}
    units = list(iter_units(model, entries, layers=[3], batch_seconds=settings.batch_seconds, skipped=skipped))
    assert [entry.fileid for entry, _ in units] == ["ok"]
    assert all(layers[3].shape == (num_frames(16000, model.cfg.extractor_conv_layer_config),) for _, layers in units)
    assert "shorter than one frame" in skipped[str(audio / "tiny.wav")]


def test_a_long_file_cut_short_is_skipped_but_a_model_error_stops_the_run(model, tmp_path, monkeypatch):
    """A long FLAC cut short fails to decode in the window-by-window path: skipped by name in extract and in
    iter_units. An error of the model on a long file (an out-of-memory error is a RuntimeError) left the file out
    with a warning and the extraction "succeeded"; it now stops the run."""
    from spidr.eval import features

    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "whole.flac", speech_like(3.0, 6), 16000)
    sf.write(audio / "cut.flac", speech_like(3.0, 7), 16000)
    data = (audio / "cut.flac").read_bytes()
    (audio / "cut.flac").write_bytes(data[: len(data) // 2])
    entries = [ManifestEntry(name, str(audio / f"{name}.flac"), 48000) for name in ("whole", "cut")]
    settings = ExtractionSettings(layers=(1,), codebooks=True, max_seconds=2.0, window_seconds=1.0,
                                  context_seconds=0.5)
    metadata = extract_to_directory(model, entries, tmp_path / "out", settings, progress=False)
    assert list(metadata["skipped"]) == [str(audio / "cut.flac")]
    assert sorted(p.name for p in (tmp_path / "out" / "layer_01").iterdir()) == ["whole.npy"]
    skipped: dict[str, str] = {}
    units = list(iter_units(model, entries, layers=[3], max_seconds=2.0, skipped=skipped))
    assert [entry.fileid for entry, _ in units] == ["whole"]
    assert list(skipped) == [str(audio / "cut.flac")]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(features, "extract_padded_batch", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        extract_to_directory(model, entries[:1], tmp_path / "out2", settings, progress=False)
    with pytest.raises(torch.OutOfMemoryError):
        list(iter_units(model, entries[:1], layers=[3], max_seconds=2.0))


def test_a_long_file_that_fails_to_decode_or_to_standardise_is_an_audio_error(tmp_path, monkeypatch):
    """LongAudio names the file in an AudioError (skipped by extract and iter_extracted) where soundfile fails with
    another error midway (a corrupt MP3 frame gave numpy's "negative dimensions" ValueError) or the samples overflow
    the statistics (a corrupt file decoded to 1e200: OverflowError); both escaped as crashes."""
    from spidr.data.audio import AudioError
    from spidr.eval import features

    huge = tmp_path / "huge.wav"
    sf.write(huge, np.full(48000, 1e200), 16000, subtype="DOUBLE")
    with pytest.raises(AudioError, match="cannot be standardised") as caught:
        LongAudio(str(huge))
    assert caught.value.path == str(huge)
    fine = tmp_path / "fine.wav"
    sf.write(fine, speech_like(3.0, 8), 16000)
    audio = LongAudio(str(fine))

    def corrupt_frame(*args, **kwargs):
        raise ValueError("negative dimensions are not allowed")

    monkeypatch.setattr(features.sf, "read", corrupt_frame)
    with pytest.raises(AudioError, match=r"cannot be decoded \(negative dimensions"):
        audio.read(0, 16000)
    monkeypatch.setattr(features.sf.SoundFile, "read", corrupt_frame)
    with pytest.raises(AudioError, match="cannot be decoded"):
        LongAudio(str(fine))


def test_a_second_extraction_into_a_folder_in_use_is_refused(model, tmp_path):
    """Two extractions into one folder both "succeeded" and left every unit row twice; the folder's lock (held as a
    running extraction holds it) now refuses the second, which writes nothing, and frees the folder when done."""

    from spidr.folder_lock import folder_lock

    sf.write(tmp_path / "a.wav", speech_like(1.0, 0), 16000, subtype="FLOAT")
    entries = [ManifestEntry("a", str(tmp_path / "a.wav"), 16000)]
    settings = ExtractionSettings(layers=(1,), codebooks=True)
    out = tmp_path / "out"
    refusal = rf"an extraction into {out} is being run by process {os.getpid()} \(.*\.lock is locked\)"
    with folder_lock(out / ".extract", "a running extraction"), pytest.raises(ValueError, match=refusal):
        extract_to_directory(model, entries, out, settings, progress=False)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [".extract", ".extract/.lock"]
    extract_to_directory(model, entries, out, settings, progress=False)
    rows = (out / "codebook_units" / "layer_03.jsonl").read_text().splitlines()
    assert len(rows) == 1
    with folder_lock(out / ".extract", "a running extraction"), pytest.raises(ValueError, match=refusal):
        extract_to_directory(model, entries, out, settings, progress=False)  # one that resumes is refused alike
    assert (out / "codebook_units" / "layer_03.jsonl").read_text().splitlines() == rows
    extract_to_directory(model, entries, out, settings, progress=False)  # a rerun after it: nothing to add
    assert (out / "codebook_units" / "layer_03.jsonl").read_text().splitlines() == rows


def test_a_long_file_that_decodes_shorter_than_its_header_is_extracted_at_its_decoded_length(model, tmp_path):
    """A compressed file cut short (a partial download) promises more samples in its header than it decodes. The
    windowed path sized its .npy from the header: the file was written with fewer rows than its header (unreadable,
    yet journalled as done), or, cut shorter, a window of 0 samples stopped the whole extraction. It now gives the
    whole-file path's result: the decoded length."""
    path = tmp_path / "audio" / "cut.mp3"
    path.parent.mkdir()
    try:
        sf.write(path, speech_like(12.0, 11), 16000, format="MP3")
    except (sf.LibsndfileError, ValueError, TypeError):
        pytest.skip("this libsndfile cannot write MP3")
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.66)])
    decoded = len(sf.read(path)[0])
    assert decoded < sf.info(str(path)).frames  # the header promises more
    assert LongAudio(str(path)).num_samples == decoded
    entries = [ManifestEntry("cut", str(path), sf.info(str(path)).frames)]
    whole, windowed = tmp_path / "whole", tmp_path / "windowed"
    extract_to_directory(model, entries, whole, ExtractionSettings(layers=(1,)), progress=False)
    extract_to_directory(model, entries, windowed, ExtractionSettings(layers=(1,), max_seconds=2.0, window_seconds=1.0,
                                                                      context_seconds=0.5), progress=False)
    expected = np.load(whole / "layer_01" / "cut.npy")
    got = np.load(windowed / "layer_01" / "cut.npy")
    assert got.shape == expected.shape
    assert expected.shape[0] == num_frames(decoded, model.cfg.extractor_conv_layer_config)


def test_npy_appender_refuses_out_of_order_or_short_writes(tmp_path):
    from spidr.eval.features import NpyAppender

    appender = NpyAppender(tmp_path / "x.npy", 4, 2)
    appender[0:2] = np.ones((2, 2))
    with pytest.raises(RuntimeError, match="in order"):
        appender[3:4] = np.ones((1, 2))
    with pytest.raises(RuntimeError, match=r"1 rows given for rows 2-4 of 4"):  # its header would promise more
        appender[2:4] = np.ones((1, 2))
    with pytest.raises(RuntimeError, match="wrote 2 of 4"):
        appender.close()


def _forward_lengths(model, monkeypatch) -> list[int]:
    """The audio lengths of every forward pass of ``model`` from now on (samples): each runs the front end."""
    lengths: list[int] = []
    front_end = model.features

    def recording(waveforms, *args, **kwargs):
        lengths.append(waveforms.shape[-1])
        return front_end(waveforms, *args, **kwargs)

    monkeypatch.setattr(model, "features", recording)
    return lengths


def test_units_probe_features_and_k_means_samples_of_long_files_run_window_by_window(model, tmp_path, monkeypatch):
    """lm-units, the probes and lm-units' k-means ran a whole file in one forward (memory grows with the square of
    its length: tens of GB for a 1-hour file). Files over max_seconds now run in windows as `spidr extract` runs
    them, with the same results: units as `spidr extract` writes them, k-means units as assign_units gives on its
    windowed features, the front end (local) as the whole file gives it."""
    from spidr.eval.kmeans import assign_units
    from spidr.eval.probe import ModelFeaturizer
    from spidr.lm.bench_units import fit_centroids

    audio = tmp_path / "audio"
    audio.mkdir()
    for name, seconds in (("long", 7.3), ("short", 1.2)):
        sf.write(audio / f"{name}.wav", speech_like(seconds, 21), 16000, subtype="FLOAT")
    (audio / "broken.wav").write_bytes(b"RIFF not audio")
    entries = [ManifestEntry("long", str(audio / "long.wav"), int(7.3 * 16000)),
               ManifestEntry("short", str(audio / "short.wav"), int(1.2 * 16000)),
               ManifestEntry("broken", str(audio / "broken.wav"), 5 * 16000)]
    settings = ExtractionSettings(layers=(1, 3), codebooks=True, max_seconds=2.0, window_seconds=1.0,
                                  context_seconds=0.5)
    extract_to_directory(model, entries[:2], tmp_path / "out", settings, progress=False)
    extracted = read_units(tmp_path / "out" / "codebook_units" / "layer_03.jsonl")
    layer_1 = np.load(tmp_path / "out" / "layer_01" / "long.npy")
    centroids = {1: torch.from_numpy(layer_1[::7].copy())}
    bound = 2 * 16000 + num_samples_for_frames(1, TINY["extractor_conv_layer_config"])

    lengths = _forward_lengths(model, monkeypatch)
    skipped: dict[str, str] = {}
    units = dict(iter_units(model, entries, layers=[1, 3], centroids=centroids, max_seconds=2.0, skipped=skipped))
    assert 0 < max(lengths) <= bound
    assert sorted(entry.fileid for entry in units) == ["long", "short"]
    assert list(skipped) == [str(audio / "broken.wav")]
    for entry, layers in units.items():
        np.testing.assert_array_equal(layers[3], extracted[entry.fileid])
    long_units = next(layers for entry, layers in units.items() if entry.fileid == "long")
    np.testing.assert_array_equal(long_units[1], assign_units(layer_1, centroids[1]))

    lengths.clear()
    featurizer = ModelFeaturizer(model, layers=(1,), max_seconds=2.0)
    features = {entry.fileid: result for entry, result in featurizer(entries)}
    assert 0 < max(lengths) <= bound
    assert sorted(features) == ["long", "short"]
    wave = torch.from_numpy(sf.read(audio / "long.wav", dtype="float32")[0])
    (whole,) = extract_batch(model, [(wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-5)],
                             ExtractionSettings(layers=(1,)), front_end=True)
    assert features["long"]["front_end"].shape == whole["front_end"].shape
    np.testing.assert_allclose(features["long"]["front_end"], whole["front_end"], rtol=1e-4, atol=1e-4)
    assert np.abs(features["long"]["layer_01"] - layer_1).max() < 1e-4  # the windows of `spidr extract`

    lengths.clear()
    fitted = fit_centroids(model, entries, [1], num_units=3, max_seconds=2.0)[1]
    assert 0 < max(lengths) <= bound
    assert fitted.shape == (3, 32)
    with pytest.raises(ValueError, match="no frame to fit k-means centroids on: none of the 1 training files"):
        fit_centroids(model, entries[2:], [1], num_units=3)


def test_a_long_archive_member_runs_in_windows_like_a_long_file(model, tmp_path, monkeypatch):
    """A long file inside a tar ran whole, in one forward (only files on disk were windowed)."""

    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "long.wav", speech_like(5.0, 8), 16000, subtype="FLOAT")
    with tarfile.open(tmp_path / "audio.tar", "w") as tar:
        tar.add(audio / "long.wav", arcname="long.wav")
    settings = ExtractionSettings(layers=(2,), codebooks=True, max_seconds=2.0, window_seconds=1.0,
                                  context_seconds=0.5)
    extract_to_directory(model, scan(audio, progress=False).entries, tmp_path / "disk", settings, progress=False)
    lengths = _forward_lengths(model, monkeypatch)
    extract_to_directory(model, scan(tmp_path / "audio.tar", progress=False).entries, tmp_path / "tar", settings,
                         progress=False)
    assert 0 < max(lengths) <= 2 * 16000 + num_samples_for_frames(1, TINY["extractor_conv_layer_config"])
    # the same windows; the member is standardised in one pass over its samples, the file in two (float64 sums)
    np.testing.assert_allclose(np.load(tmp_path / "tar" / "layer_02" / "long.npy"),
                               np.load(tmp_path / "disk" / "layer_02" / "long.npy"), rtol=0, atol=1e-6)
    assert read_units(tmp_path / "tar" / "codebook_units" / "layer_03.jsonl")["long"].tolist() == \
        read_units(tmp_path / "disk" / "codebook_units" / "layer_03.jsonl")["long"].tolist()


def test_length_batches_keep_a_batch_that_fits_exactly():
    """Two utterances of 100 samples under a budget of 200 padded samples fit exactly (2 × 100 = 200): one batch,
    not two (the budget is a maximum, not a bound to stay strictly under)."""
    assert list(length_batches(np.array([100, 100]), 200)) == [[0, 1]]
    assert list(length_batches(np.array([100, 100]), 199)) == [[0], [1]]


def test_output_stems_under_the_filesystem_root_keep_their_first_folder():
    """Files whose deepest common folder is "/" itself: each stem is the path below "/" (a/x, b/y), not the path
    with one more character cut off."""
    entries = [ManifestEntry("x", "/a/x.wav", 10), ManifestEntry("y", "/b/y.wav", 10)]
    assert list(output_stems(entries)) == ["a/x", "b/y"]


@pytest.mark.parametrize("fileid", ["/data/corpus/a", "../escaped_a", "spk/../../a", "spk\\..\\..\\a"])
def test_a_file_id_that_would_write_outside_the_output_folder_is_refused(fileid):
    """spidr extract wrote an absolute id's features beside the audio (over any file of that name) and a '..' id's
    above OUT, and counted them done."""
    entries = [ManifestEntry("b", "/c/b.wav", 10), ManifestEntry(fileid, "/c/a.wav", 10)]
    with pytest.raises(ValueError, match=r"utterance 2 \(/c/a\.wav\) has the file id .* outside the output folder"):
        output_stems(entries)
    assert list(output_stems([entries[0], ManifestEntry("spk/a..b", "/c/a.wav", 10)])) == ["b", "spk/a..b"]


def test_an_archive_member_named_above_the_archive_s_root_is_refused_before_anything_is_written(model, tmp_path):
    """A tar member "spk/../../../victim/results.wav" put its features four folders above its layer folder (over
    any file of that name) and the extraction counted it done: only the file id was checked, not its folder."""

    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", speech_like(0.5, 1), 16000)
    out = tmp_path / "deep" / "out"
    with tarfile.open(tmp_path / "audio.tar", "w") as tar:
        tar.add(audio / "a.wav", arcname="spk/a.wav")
        tar.add(audio / "a.wav", arcname="spk/../../../../victim/results.wav")
    entries = scan(tmp_path / "audio.tar", progress=False).entries
    with pytest.raises(ValueError, match=r"utterance \d \(spk/\.\./\.\./\.\./\.\./victim/results\.wav\) is an archive "
                                         "member named above the archive's root"):
        extract_to_directory(model, entries, out, ExtractionSettings(layers=(1,)), progress=False)
    assert not list(tmp_path.rglob("results.npy"))
    assert not (tmp_path / "victim").exists()


def test_the_output_tree_mirrors_where_the_audio_is_however_its_path_is_spelt(tmp_path):
    """Paths with '..' (a manifest's rows, relative to the current folder) and absolute archive members beside
    relative ones: each output path is the audio's place below the deepest common folder, never above OUT; mixed
    absolute and relative member names failed with Python's "Can't mix absolute and relative paths"."""
    entries = [ManifestEntry("x", "/c/a/../b/x.wav", 10), ManifestEntry("y", "/c/d/y.wav", 10)]
    assert list(output_stems(entries)) == ["b/x", "d/y"]
    (tmp_path / "work").mkdir()
    (tmp_path / "up").mkdir()

    cwd = os.getcwd()
    os.chdir(tmp_path / "work")
    try:  # rows relative to the current folder, one of them above it
        stems = list(output_stems([ManifestEntry("x", "../up/x.wav", 10), ManifestEntry("y", "y.wav", 10)]))
    finally:
        os.chdir(cwd)
    assert stems == ["up/x", "work/y"]
    import tarfile

    sf.write(tmp_path / "a.wav", speech_like(0.5, 1), 16000)
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        tar.add(tmp_path / "a.wav", arcname="spk1/a.wav")
        info = tar.gettarinfo(tmp_path / "a.wav", arcname="b.wav")
        info.name = "/spk2/b.wav"  # (tarfile strips a leading "/" from arcname: set the stored name itself)
        with (tmp_path / "a.wav").open("rb") as handle:
            tar.addfile(info, handle)
    members = scan(tmp_path / "mixed.tar", progress=False).entries
    assert sorted(output_stems(members)) == ["spk1/a", "spk2/b"]
    with tarfile.open(tmp_path / "dot.tar", "w") as tar:  # as `tar -C dir .` names them
        tar.add(tmp_path / "a.wav", arcname="./a.wav")
        tar.add(tmp_path / "a.wav", arcname="./spk/b.wav")
    assert sorted(output_stems(scan(tmp_path / "dot.tar", progress=False).entries)) == ["a", "spk/b"]


DEFAULT_CONV = [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2
TINY_TOML_CONV = [[32, 10, 5], [32, 8, 4], [32, 8, 8]]  # configs/tiny.toml: 160-sample hop, receptive field 185


@pytest.mark.parametrize("conv", [DEFAULT_CONV, TINY_TOML_CONV], ids=["hop-320", "hop-160-tiny-toml"])
def test_windowed_front_end_is_whole_file_front_end_exactly(tmp_path, conv):
    """The conv front end and projection are local (layer_norm mode: per-frame LayerNorm), so windows that start
    on the frame grid must reproduce the whole file's front-end frames exactly, whatever the hop."""
    torch.manual_seed(0)
    model = build_model(SpidRConfig(**{**TINY, "extractor_conv_layer_config": conv})).eval()
    path = tmp_path / "long.wav"
    sf.write(path, speech_like(6.0, 3), 16000, subtype="FLOAT")
    settings = ExtractionSettings(layers=(1, 3), window_seconds=1.0, context_seconds=0.5)
    whole = extract_batch(model, [load_audio(str(path))], settings, front_end=True)[0]
    sinks = {key: np.full_like(value, np.nan) for key, value in whole.items()}
    extract_long(model, LongAudio(str(path)), settings, sinks, front_end=True)
    for key in ("front_end", "projection"):
        np.testing.assert_allclose(sinks[key], whole[key], atol=1e-4, err_msg=key)
    for key in ("layer_01", "layer_03"):  # attention sees less context in a window: every frame written, no more
        assert np.isfinite(sinks[key]).all(), key


def test_long_stereo_file_reads_like_load_audio(tmp_path):
    path = tmp_path / "stereo.wav"
    stereo = np.stack([speech_like(2.0, 5 + c) for c in range(2)], axis=1)
    stereo[:, 1] *= 0.2  # channels differ in content and level
    sf.write(path, stereo, 16000, subtype="FLOAT")
    audio = LongAudio(str(path))
    expected = load_audio(str(path), normalize=True).numpy()
    # Independent truth as well: mean of the channels, then standardised (eps 1e-5).
    mono = stereo.astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(expected, (mono - mono.mean()) / np.sqrt(mono.var() + 1e-5), atol=1e-5)
    np.testing.assert_allclose(audio.read(0, audio.num_samples).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(audio.read(8000, 16000).numpy(), expected[8000:16000], atol=1e-5)


def test_group_norm_batch_of_two_lengths_equals_one_file_at_a_time():
    torch.manual_seed(0)
    model = build_model(DinoSRConfig(**TINY, extractor_mode="group_norm")).eval()
    waves = [torch.from_numpy(speech_like(s, i)) for i, s in enumerate((1.0, 0.5))]
    waves = [(w - w.mean()) / w.std() for w in waves]
    settings = ExtractionSettings(layers=(1, 3), codebooks=True)
    batched = extract_batch(model, waves, settings)
    for wave, result in zip(waves, batched, strict=True):
        (alone,) = extract_batch(model, [wave], settings)
        for key in alone:
            np.testing.assert_allclose(result[key], alone[key], atol=1e-5, err_msg=key)



def test_an_escaping_file_id_past_the_first_chunk_of_rows_is_named_by_its_own_row(monkeypatch):
    """Manifests are read in chunks of rows (65,536; 3 here): the row named must be the manifest's, not
    the row within its chunk. Truth (hand-counted): row 5 of 6 holds the bad id."""
    from spidr.eval import folder_extraction

    monkeypatch.setattr(folder_extraction, "ITER_CHUNK", 3)
    entries = [ManifestEntry(name, f"/c/{name}.wav", 10) for name in "abcd"]
    entries += [ManifestEntry("../e", "/c/e.wav", 10), ManifestEntry("f", "/c/f.wav", 10)]
    with pytest.raises(ValueError, match=r"utterance 5 \(/c/e\.wav\) has the file id '\.\./e'"):
        output_stems(entries)


def test_an_archive_member_above_the_root_past_the_first_chunk_of_rows_is_named_by_its_own_row(monkeypatch):
    """Rows are checked chunk by chunk (65,536; 3 here): the utterance named must be the manifest's row, not the
    row within its chunk. Truth (hand-counted): row 5 of 6 is the member named above the archive's root."""
    from spidr.eval import folder_extraction

    monkeypatch.setattr(folder_extraction, "ITER_CHUNK", 3)
    names = ["spk/a.wav", "spk/b.wav", "spk/c.wav", "spk/d.wav", "spk/../../up/e.wav", "spk/f.wav"]
    entries = [ManifestEntry(name.rsplit("/", 1)[1][0], name, 10, archive="/c/audio.tar", byte_offset=512 * i,
                             byte_size=10) for i, name in enumerate(names)]
    with pytest.raises(ValueError, match=r"utterance 5 \(spk/\.\./\.\./up/e\.wav\) is an archive member named above"):
        output_stems(entries)


def test_a_manifest_of_files_and_archive_members_mirrors_both_below_their_common_folder(tmp_path):
    """write_manifest merges a folder's scan and a tar's; extracting from it stopped with Python's "Can't mix absolute
    and relative paths", naming no file. A member's folder is read below its archive's path there; a member named
    above the archive's root is still refused."""


    (tmp_path / "d").mkdir()
    sf.write(tmp_path / "d" / "a.wav", speech_like(0.5, 1), 16000)
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        tar.add(tmp_path / "d" / "a.wav", arcname="spk/b.wav")
        tar.add(tmp_path / "d" / "a.wav", arcname="c.wav")
    files, members = scan(tmp_path / "d", progress=False).entries, scan(tmp_path / "t.tar", progress=False).entries
    assert sorted(output_stems(members)) == ["c", "spk/b"]  # (a tar alone: from its root, as before)
    both = read_manifest(write_manifest([*files, *members], tmp_path / "both.csv"))
    assert sorted(output_stems(both)) == ["d/a", "t.tar/c", "t.tar/spk/b"]
    with tarfile.open(tmp_path / "up.tar", "w") as tar:
        tar.add(tmp_path / "d" / "a.wav", arcname="spk/../../x.wav")
    climbing = scan(tmp_path / "up.tar", progress=False).entries
    with pytest.raises(ValueError, match=r"is an archive member named above the archive's root"):
        output_stems(read_manifest(write_manifest([*files, *climbing], tmp_path / "up.csv")))


def test_the_next_batches_are_decoded_while_the_model_runs(model, tmp_path, monkeypatch):
    """One thread decoding FLAC at ~3,000x real time would hold a GPU's extraction far below its speed: the next
    batches are read by other threads while the model runs. The first forward waits for a later batch's audio to be
    read; read one after another, that audio would only be read after the forward returned (a 10 s timeout here)."""
    import threading

    from spidr.eval import features

    paths = []
    for k in range(3):
        paths.append(tmp_path / f"u{k}.wav")
        sf.write(paths[-1], speech_like(0.5 + 0.1 * k, k), 16000, subtype="FLOAT")
    entries = [ManifestEntry(f"u{k}", str(p), int((0.5 + 0.1 * k) * 16000)) for k, p in enumerate(paths)]
    later_read, first_forward_saw_it = threading.Event(), []
    from spidr.eval import folder_extraction

    load, run = features.load_model_input, folder_extraction.extract_padded_batch

    def loading(entry, conv_layers):
        if entry.fileid != "u0":  # (batches of one file each, the shortest first: u0 is the first batch)
            later_read.set()
        return load(entry, conv_layers)

    def running(*args, **kwargs):
        if not first_forward_saw_it:
            first_forward_saw_it.append(later_read.wait(timeout=10))
        return run(*args, **kwargs)

    monkeypatch.setattr(features, "load_model_input", loading)
    monkeypatch.setattr(folder_extraction, "extract_padded_batch", running)
    settings = ExtractionSettings(layers=(1,), batch_seconds=0.5)
    extract_to_directory(model, entries, tmp_path / "out", settings, progress=False)
    assert first_forward_saw_it == [True]
    assert len(list((tmp_path / "out" / "layer_01").glob("*.npy"))) == 3


def test_units_named_as_written_are_found_by_the_same_names_and_paths():
    """A units file holds the names StemKeyed gives (./0002 for a top-level file whose id another file holds): read
    back, the same names and the features' paths find the same rows."""
    keys = ["0002", "x/0002", "spk/é"]
    names = list(StemKeyed(dict.fromkeys(keys)))
    units = StemKeyed({name: np.full(1, index) for index, name in enumerate(names)})
    assert list(units) == names == ["./0002", "x/0002", "é"]
    for index, (key, name) in enumerate(zip(keys, names, strict=True)):
        assert units[name][0] == units[f"corpus/{key}"][0] == index
    with pytest.raises(ValueError, match=r"2 utterances of .* have the id '0002'"):
        units["0002"]


def test_a_path_finds_only_a_file_whose_path_agrees_with_it():
    """With spk2/0001 skipped, the path spk2/0001 found spk1/0001 through its (now unique) id, and PNMI scored one
    file's labels against the other's units. Truth, by hand: paths find files whose path ends with them or that
    they end with; a bare id, or a row named by its id alone, goes by the id; a shorter path that ends one file's
    path of a shared id finds it (dr1/fcjf0/sa1 for fcjf0/sa1)."""
    from spidr.eval.feature_dir import names_matched

    features = StemKeyed({"spk1/0001": 1, "données/é": 2})
    assert "spk2/0001" not in features
    assert features["corpus/spk1/0001"] == features["0001"] == features["spk1/0001"] == 1
    assert features["é"] == features["x/données/é"] == 2
    assert "autre/é" not in features
    assert StemKeyed({"é": 3})["autre/é"] == 3  # (a units row named by id: its folder is not known)
    assert names_matched({"spk1/0001": 1}, ["spk2/0001", "spk1/0001", "0001"], source="u") == {
        "spk1/0001": "spk1/0001"}
    with pytest.raises(ValueError, match="'0001' and 'corpus/spk1/0001' both name the utterance 'spk1/0001'"):
        names_matched({"spk1/0001": 1}, ["0001", "corpus/spk1/0001"], source="u")
    librispeech = StemKeyed({"174/50561/174-50561-0000": 4})
    assert librispeech["./174/50561/174-50561-0000"] == librispeech["174/50561/174-50561-0000"] == 4
    assert librispeech["dev-clean/174/50561/174-50561-0000"] == librispeech["174-50561-0000"] == 4
    timit = StemKeyed({"dr1/fcjf0/sa1": 1, "dr1/mdab0/sa1": 2})
    assert timit["fcjf0/sa1"] == 1
    assert timit["timit/train/dr1/mdab0/sa1"] == 2


def test_features_of_one_file_in_both_formats_are_refused_naming_both(tmp_path: Path) -> None:
    """C01: spk/a.npy and spk/a.pt are two feature files for one utterance: which one is meant cannot be told, so
    the directory is refused, naming both (one taken silently could be another run's). Truth: the files written."""
    import torch

    from spidr.eval.feature_dir import FeatureDirectory

    (tmp_path / "spk").mkdir()
    np.save(tmp_path / "spk" / "a.npy", np.zeros((2, 3), np.float32))
    torch.save(torch.ones(4, 3), tmp_path / "spk" / "a.pt")
    np.save(tmp_path / "b.npy", np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"both spk/a\.npy and spk/a\.pt exist"):
        FeatureDirectory(tmp_path)


def test_a_file_listed_as_skipped_whose_features_exist_is_found_as_present() -> None:
    """C05: ``skipped`` lists what the record says was unreadable; a file listed there whose features are present
    (read by a later run) is a present file: found by its path and by its id, not refused or taken for missing.
    Truth, by hand."""
    from spidr.eval.feature_dir import StemKeyed

    features = StemKeyed({"spk1/0001": 1, "spk1/0002": 2}, skipped=["spk1/0001", "spk2/0003"])
    assert features["spk1/0001"] == features["0001"] == 1
    assert list(features) == ["0001", "0002"]
    assert "spk2/0003" not in features
    assert features.names_skipped("spk2/0003")


def test_a_name_that_finds_a_skipped_file_resolves_to_nothing_and_matches_nothing() -> None:
    """C08: ``resolve`` returns None for a name that finds a skipped file (its docstring), so ``names_matched``
    never pairs a given name (an alignment's utterance) with a file that has no features. Truth, by hand: only
    spk1/0001 is present."""
    from spidr.eval.feature_dir import StemKeyed, names_matched

    features = StemKeyed({"spk1/0001": 1}, skipped=["spk2/0001"])
    assert features.resolve("spk2/0001") is None
    assert features.resolve("corpus/spk1/0001") == "spk1/0001"
    assert names_matched({"spk1/0001": 1}, ["spk2/0001", "corpus/spk1/0001"], source="u",
                         skipped=["spk2/0001"]) == {"spk1/0001": "corpus/spk1/0001"}


def test_a_root_recorded_with_a_trailing_slash_is_the_same_root() -> None:
    """C07: ``root`` "/c/audio/spk1/" names the folder "/c/audio/spk1" (as the existing test gives it): the names
    that tell the top file ./0001 from the skipped /c/audio/spk2/0001 do so either way. Truth: the existing test's
    hand-worked answers."""
    from spidr.eval.feature_dir import StemKeyed

    for root in ("/c/audio/spk1", "/c/audio/spk1/"):
        features = StemKeyed({"0001": np.zeros(1), "other": np.ones(1)}, skipped=["/c/audio/spk2/0001"], root=root)
        for name in ("spk1/0001", "./0001", "data/spk1/0001"):
            assert features.resolve(name) == "0001", (root, name)
        assert features.names_skipped("corpus/spk2/0001"), root


def test_a_unique_id_s_file_is_found_by_a_shorter_path_ending_its_own_but_not_by_a_longer_folder_name() -> None:
    """C15, C16: where one file holds an id, a path finds it when either path ends with the other on a folder
    boundary: fcjf0/sa1 finds dr1/fcjf0/sa1 (an item file giving the speaker folder only), but 21/0001 is another
    speaker's file than 1/0001, and x1/0001 too. Truth, by hand."""
    from spidr.eval.feature_dir import StemKeyed

    timit = StemKeyed({"dr1/fcjf0/sa1": 1})
    assert timit["fcjf0/sa1"] == timit["corpus/dr1/fcjf0/sa1"] == timit["sa1"] == 1
    assert "mabc0/sa1" not in timit
    numbered = StemKeyed({"1/0001": 5})
    assert numbered["corpus/1/0001"] == numbered["0001"] == 5
    for name in ("21/0001", "x1/0001", "corpus/21/0001"):
        assert name not in numbered, name


def test_a_units_record_that_describes_another_version_of_its_file_is_not_used(tmp_path: Path, caplog) -> None:
    """C21: ``spidr units`` records the size of the file it wrote; a units file rewritten since by something else
    (another tool, another k) must not be read with that record's vocabulary and frame rate, and a record of the
    extraction above it, where there is one, is used instead. Truth: the records written here."""
    import logging

    from spidr.eval.feature_dir import extraction_frame_rate, recorded_num_units

    extraction = tmp_path / "out"
    (extraction / "codebook_units").mkdir(parents=True)
    (extraction / "metadata.json").write_text(json.dumps({"frame_rate_hz": 50.0, "layers": [2],
                                                          "codebook_size": 16}))
    units = extraction / "codebook_units" / "layer_02.jsonl"
    units.write_text('{"name": "a", "units": [1, 2]}\n')
    (extraction / "codebook_units" / "layer_02.jsonl.metadata.json").write_text(json.dumps(
        {"frame_rate_hz": 25.0, "num_units": 4, "units_file_bytes": units.stat().st_size}))
    assert recorded_num_units(units)[0] == 4
    assert extraction_frame_rate(units)[0] == 25.0
    units.write_text('{"name": "a", "units": [1, 2, 3]}\n')  # rewritten: another size
    with caplog.at_level(logging.WARNING):
        assert recorded_num_units(units) == (16, extraction / "metadata.json")
        assert extraction_frame_rate(units)[0] == 50.0
    assert "describes another version" in caplog.text


def test_k_means_units_beside_codebook_units_do_not_take_the_codebook_size(tmp_path: Path) -> None:
    """C23: an extraction's record gives the codebook size of its codebook_units/layer_LL.jsonl only; its
    kmeans_units/layer_LL.jsonl (``spidr extract --kmeans``) have the centroids' count, which that record does not
    hold: nothing is recorded for them there (the codebook size would size a unit LM's vocabulary wrongly).
    Truth: the record written."""
    from spidr.eval.feature_dir import recorded_num_units

    extraction = tmp_path / "out"
    for folder in ("codebook_units", "kmeans_units"):
        (extraction / folder).mkdir(parents=True)
        (extraction / folder / "layer_02.jsonl").write_text('{"name": "a", "units": [1]}\n')
    (extraction / "metadata.json").write_text(json.dumps({"frame_rate_hz": 50.0, "layers": [2],
                                                          "codebook_layers": [2], "codebook_size": 16}))
    assert recorded_num_units(extraction / "codebook_units" / "layer_02.jsonl") == (16, extraction / "metadata.json")
    assert recorded_num_units(extraction / "kmeans_units" / "layer_02.jsonl") is None


def test_extract_batch_of_arrays_in_memory_honours_batch_seconds_and_max_seconds(model):
    """extract_batch (the README's in-memory API) ran every waveform in one padded forward whatever the settings
    said: 500 utterances or a 1-hour array in one forward. Batches now hold at most batch_seconds of padded audio and
    a waveform over max_seconds runs window by window, as spidr extract runs files; the results are those of one
    padded batch (padding changes nothing) and of extract_long on the same waveform (api30 defect 1)."""
    waves = [torch.from_numpy(speech_like(seconds, seed)) for seed, seconds in enumerate((1.0, 0.6, 3.0, 0.9, 0.5))]
    settings = ExtractionSettings(layers=(1, 3), codebooks=True, batch_seconds=2.0, max_seconds=2.5,
                                  window_seconds=1.0, context_seconds=0.5)
    forwards: list[tuple[int, ...]] = []
    hook = model.feature_extractor.register_forward_hook(
        lambda _m, inputs, _o: forwards.append(tuple(inputs[0].shape)))
    try:
        results = extract_batch(model, waves, settings)
    finally:
        hook.remove()
    # (0.5, 0.6) and (0.9, 1.0): padded batches of ≤ 2 s; then the 3 s waveform: 3 windows of 1 s kept + 0.5 s of
    # context on each side (and one frame's receptive field), each ≤ 2.5 s
    assert forwards[:2] == [(2, 9600), (2, 16000)]
    assert [shape[0] for shape in forwards[2:]] == [1, 1, 1]
    assert all(2.0 * 16000 < shape[-1] <= 2.5 * 16000 for shape in forwards[3:4])
    one_batch = extract_padded_batch(model, waves[:2] + waves[3:], settings)
    for got, expected in zip(results[:2] + results[3:], one_batch, strict=True):
        assert got.keys() == expected.keys()
        for key in got:
            np.testing.assert_allclose(got[key], expected[key], atol=1e-5)
    sinks = {key: np.zeros_like(value) for key, value in results[2].items()}
    extract_long(model, LongAudio.from_waveform(waves[2]), settings, sinks)
    for key, values in sinks.items():
        np.testing.assert_array_equal(results[2][key], values)
    assert results[2]["layer_01"].shape[0] == num_frames(waves[2].shape[0], model.cfg.extractor_conv_layer_config)


def test_extract_batch_runs_a_model_in_training_mode_in_eval_mode_and_gives_it_back():
    """build_model gives a model in training mode: extract_batch returned features with dropout, different at each
    call (with codebooks=True it refused). It runs in eval mode now, and the model's modes are restored after."""
    torch.manual_seed(0)
    model = build_model(SpidRConfig(**(TINY | {"encoder_dropout": 0.3})))
    model.feature_extractor.eval()  # one module's own mode, kept
    wave = torch.from_numpy(speech_like(0.5, 1))
    first = extract_batch(model, [wave], ExtractionSettings(layers=(3,), codebooks=True))[0]
    second = extract_batch(model, [wave], ExtractionSettings(layers=(3,)))[0]
    np.testing.assert_array_equal(first["layer_03"], second["layer_03"])
    assert model.training
    assert not model.feature_extractor.training
    expected = extract_batch(model.eval(), [wave], ExtractionSettings(layers=(3,)))[0]
    np.testing.assert_array_equal(first["layer_03"], expected["layer_03"])


@pytest.mark.parametrize(("field", "value", "says"), [
    ("dtype", "float64", "ExtractionSettings.dtype = 'float64' is invalid: expected 'float32' or 'bfloat16'"),
    ("dtype", "fp32", "ExtractionSettings.dtype = 'fp32' is invalid"),
    ("layers", 6, r"ExtractionSettings.layers = 6: expected a tuple of 1-based layer numbers"),
    ("layers", (1.0,), r"ExtractionSettings.layers = \(1.0,\)"),
    ("batch_seconds", 0.0, "ExtractionSettings.batch_seconds = 0.0 must be a finite number > 0"),
    ("context_seconds", -1.0, "ExtractionSettings.context_seconds = -1.0 must be a finite number >= 0"),
])
def test_extraction_settings_refuse_what_they_would_misread(field, value, says):
    """Any dtype but 'float32' ran in bfloat16 (float64 asked, bf16 given); layers=6 failed deep inside with a
    TypeError (api30 defect 3)."""
    with pytest.raises(ValueError, match=says):
        ExtractionSettings(**({"layers": (1,)} | {field: value}))
    assert ExtractionSettings(layers=[2, 1]).layers == (2, 1)  # a list is taken as the tuple it means


def test_extract_batch_names_a_waveform_it_cannot_run(model):
    """A (1, S) tensor, a numpy array or a waveform shorter than one frame got torch's own errors, or (0, D)
    features beside longer ones (api30 defect 9)."""
    wave = torch.from_numpy(speech_like(0.5, 2))
    settings = ExtractionSettings(layers=(1,))
    for value, says in ((wave[None], r"waveforms\[1\] is a Tensor of shape \(1, 8000\): expected a \(S,\) torch"),
                        (wave.numpy(), r"waveforms\[1\] is a ndarray of shape \(8000,\): expected a \(S,\) torch"),
                        (wave[:100], r"waveforms\[1\] is shorter than one frame \(100 samples; the front end's "
                                     r"receptive field is 400\)")):
        with pytest.raises(ValueError, match=says):
            extract_batch(model, [wave, value], settings)


def test_extraction_settings_take_numpy_integer_layers():
    """layers=tuple(np.arange(1, 4)) (numpy integers are the 1-based layer numbers they hold) extracted at e09f221;
    HEAD refuses them as not being 'a tuple of 1-based layer numbers'."""
    from spidr.eval.features import ExtractionSettings

    settings = ExtractionSettings(layers=tuple(np.arange(1, 4)))
    assert settings.layers == (1, 2, 3)
    assert all(type(layer) is int for layer in settings.layers)


def test_non_finite_features_met_by_k_means_units_name_the_file_and_the_layer(tmp_path):
    """A diverged checkpoint (a NaN weight) gave k-means unit 0 everywhere at e09f221; HEAD refuses, but says only
    'features contain non-finite values (the first: nan at frame 0, dimension 0)': no file, no layer, and the frame
    counts over the whole padded batch, not within a file. The refusal must name the file and the layer."""
    import soundfile as sf

    from spidr.config import SpidRConfig
    from spidr.data.scanning import scan
    from spidr.eval.features import iter_units
    from spidr.models.build import build_model

    torch.manual_seed(0)
    model = build_model(SpidRConfig(**TINY)).eval()
    rng = np.random.default_rng(0)
    for name, seconds in (("a", 0.5), ("b", 0.6)):
        sf.write(tmp_path / f"{name}.wav", 0.1 * rng.standard_normal(int(16000 * seconds)), 16000)
    with torch.no_grad():
        model.student.layers[1].attention.proj.weight.view(-1)[0] = float("nan")
    centroids = {2: torch.randn(8, model.cfg.encoder_embed_dim)}
    with pytest.raises(ValueError, match=r"a\.wav: layer 2's features hold non-finite values \(a NaN or infinite "
                                         r"weight in the checkpoint\?\): no k-means unit is nearest"):
        list(iter_units(model, scan(tmp_path, progress=False).entries, layers=[2], centroids=centroids))


@pytest.mark.parametrize("field", ["batch_seconds", "max_seconds", "window_seconds", "context_seconds"])
def test_extraction_settings_name_an_infinite_duration(field):
    """ExtractionSettings(max_seconds=inf) (never window) or batch_seconds=inf (one batch, as extract_batch ran at
    e09f221) passes HEAD's checks, then extract_batch fails with a bare 'OverflowError: cannot convert float
    infinity to integer'. The settings must refuse it naming the field, as the CLI's positive_float does."""
    import math

    from spidr.eval.features import ExtractionSettings

    with pytest.raises(ValueError, match=rf"ExtractionSettings\.{field} = inf"):
        ExtractionSettings(layers=(1,), **{field: math.inf})


def test_a_file_named_only_by_its_extension_is_no_feature_file(tmp_path):
    # mutant: FeatureDirectory taking ".npy" (nothing before the extension) as the features of "" (or of "sub/").
    # Truth: a feature file's key is its path without the extension; a bare ".npy" names no utterance.
    np.save(tmp_path / "a.npy", np.zeros((3, 2), dtype=np.float32))
    np.save(tmp_path / ".npy", np.zeros((3, 2), dtype=np.float32))
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / ".npy", np.zeros((3, 2), dtype=np.float32))
    features = FeatureDirectory(tmp_path)
    assert list(features) == ["a"]
    assert "" not in features
    assert "sub/" not in features
    (tmp_path / "a.npy").unlink()
    with pytest.raises(ValueError, match=r"has no \.npy or \.pt files"):
        FeatureDirectory(tmp_path)


def test_eval_mode_gives_each_module_its_mode_back_after_an_error() -> None:
    """A failure inside (a refused input) must not leave a training loop's model in eval mode (no dropout)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    model[2].eval()  # one module's own mode, kept
    seen = []

    def fail() -> None:
        seen.append([module.training for module in model.modules()])
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        fail()
    assert seen == [[False, False, False, False]]
    assert [module.training for module in model.modules()] == [True, True, True, False]


@pytest.mark.parametrize("rate", [16000, 22050])
def test_a_long_file_that_shrinks_between_its_two_passes_is_an_audio_error_naming_it(tmp_path, rate):
    """The file is replaced by a shorter one after LongAudio counted it (a download or a copy still running): a
    read past the new end decodes fewer samples than asked. Expected: an AudioError naming the file and both counts
    (skipped by name), not a shorter window that the model runs on."""
    path = tmp_path / "growing.wav"
    rng = np.random.default_rng(0)
    sf.write(path, (0.1 * rng.standard_normal(rate * 5)).astype(np.float32), rate)
    audio = LongAudio(str(path))
    assert audio.num_samples == 80000
    sf.write(path, (0.1 * rng.standard_normal(rate * 3)).astype(np.float32), rate)
    with pytest.raises(AudioError, match=r"growing\.wav: samples 40000-80000 decode to 8000 samples, though the "
                                         r"whole file decodes to 80000"):
        audio.read(40000, 80000)


def test_a_file_too_short_to_give_a_sample_at_16_khz_names_its_rate(tmp_path):
    """One sample at 44.1 kHz resamples to none at 16 kHz: the message says so, with the file's own rate (the file
    is not empty, which a bare 'contains no audio samples' would claim); a 16 kHz file without samples has no note."""
    short, empty = tmp_path / "click.wav", tmp_path / "empty.wav"
    sf.write(short, np.full(1, 0.1, np.float32), 44100)
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError) as raised:
        LongAudio(str(short))
    assert str(raised.value) == f"{short}: contains no audio samples at 16 kHz (its rate is 44100 Hz)"
    with pytest.raises(AudioError) as raised:
        LongAudio(str(empty))
    assert str(raised.value) == f"{empty}: contains no audio samples"


CONV = ((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2
FRONT_ENDS = {
    "conv": {},
    "group_norm": {"extractor_mode": "group_norm"},
    "log_mel": {"extractor_type": "log_mel", "extractor_conv_layer_config": ((16, 400, 160), (32, 3, 2))},
    "even_pos_conv": {"encoder_pos_conv_kernel": 4, "encoder_pos_conv_depth": 1},
    "pre_norm": {"encoder_layer_norm_first": True},
}


@functools.cache
def front_end_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(SpidRConfig(**{"extractor_conv_layer_config": CONV, "encoder_embed_dim": 32,
                                      "encoder_num_layers": 3, "encoder_num_heads": 2,
                                      "encoder_ff_interm_features": 64, "num_codebooks": 2, "codebook_size": 16,
                                      **FRONT_ENDS[kind]})).eval()


def noise(length: int, seed: int) -> torch.Tensor:
    return F.layer_norm(torch.randn(length, generator=torch.Generator().manual_seed(seed)), (length,))


# Was a defect: a log-mel front end pre-emphasises each sample against the one before it, which a window starting
# inside the file does not read; with no context frame (context_seconds below one hop) the first frame of every
# window was kept, and differed from the whole file's (by up to 1e-4 on values near 0.4).
@settings(max_examples=30, deadline=None, derandomize=True)
@given(length=st.integers(720, 12_000), window=st.sampled_from([0.02, 0.05, 0.13]), seed=st.integers(0, 50))
def test_a_log_mel_model_s_windows_give_the_whole_file_s_front_end_even_without_context(length, window,
                                                                                        seed) -> None:
    model = front_end_model("log_mel")
    wave = noise(length, seed)
    whole = extract_batch(model, [wave], ExtractionSettings(layers=(1,)), front_end=True)[0]
    windowed = extract_batch(model, [wave], ExtractionSettings(layers=(1,), max_seconds=0.01, window_seconds=window,
                                                               context_seconds=0.0), front_end=True)[0]
    for key in ("front_end", "projection"):
        np.testing.assert_allclose(windowed[key], whole[key], atol=1e-5, rtol=0, err_msg=key)


# whatever the front end, the lengths and the batch size, extract_batch gives each waveform the features,
# codebook units and front-end outputs that it gives that waveform alone.
@settings(max_examples=25, deadline=None, derandomize=True)
@given(kind=st.sampled_from(sorted(FRONT_ENDS)), lengths=st.lists(st.integers(720, 6000), min_size=1, max_size=4),
       batch_seconds=st.sampled_from([0.05, 0.3, 2.0]), seed=st.integers(0, 50))
def test_extract_batch_gives_each_waveform_what_it_gives_alone(kind, lengths, batch_seconds, seed) -> None:
    model = front_end_model(kind)
    waves = [noise(length, seed + i) for i, length in enumerate(lengths)]
    request = ExtractionSettings(layers=(1, 2, 3), codebooks=True, batch_seconds=batch_seconds)
    together = extract_batch(model, waves, request, front_end=True)
    for wave, result in zip(waves, together, strict=True):
        (alone,) = extract_batch(model, [wave], request, front_end=True)
        assert sorted(result) == sorted(alone)
        for key, values in alone.items():
            if values.dtype.kind == "f":
                np.testing.assert_allclose(result[key], values, atol=2e-5, rtol=0, err_msg=key)
            else:
                np.testing.assert_array_equal(result[key], values, err_msg=key)
