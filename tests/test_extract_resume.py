"""``spidr extract`` at corpus scale: resumable after a kill, atomic feature files, units streamed to their JSONL,
bookkeeping linear in the number of files."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import run_python_on_a_full_disk
from spidr.config import SpidRConfig
from spidr.data.manifest import Manifest, ManifestEntry, read_manifest
from spidr.data.scanning import scan
from spidr.eval import features
from spidr.eval.features import ExtractionSettings, length_batches
from spidr.eval.folder_extraction import extract_to_directory, output_stems
from spidr.models.build import build_model
from train_fixtures import EXTRACTION_MODEL as TINY
from train_fixtures import write_corpus

SRC = Path(__file__).resolve().parents[1] / "src"
# batch_seconds below every file's length: one file per batch, so a resumed run batches exactly as a fresh one
SETTINGS = {"layers": (1, 3), "codebooks": True, "batch_seconds": 0.3}


def _model():
    torch.manual_seed(0)
    return build_model(SpidRConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), num_files=8, seconds=(0.5, 1.0))


def _dying_extraction(manifest: Path, out: Path, *, die_in: str, after: int) -> subprocess.CompletedProcess:
    """Run the extraction in a child that SIGKILLs itself: at the start of batch ``after + 1`` (die_in="batch"),
    or halfway through writing the ``after + 1``-th feature file (die_in="save")."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numpy as np
        import test_extract_resume as t
        from spidr.data.manifest import read_manifest
        from spidr.eval import features, folder_extraction

        calls = {{"n": 0}}
        if {die_in!r} == "batch":
            real = folder_extraction.extract_padded_batch
            def dying(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] > {after}:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)
            folder_extraction.extract_padded_batch = dying
        else:
            real_save = np.save
            def dying_save(handle, values):
                calls["n"] += 1
                if calls["n"] > {after}:
                    handle.write(b"\\x93NUMPY half a header")
                    handle.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                real_save(handle, values)
            np.save = dying_save
        folder_extraction.extract_to_directory(t._model(), read_manifest({str(manifest)!r}), {str(out)!r},
                                               features.ExtractionSettings(**t.SETTINGS), progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          check=False)


def _outputs(out: Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, list[int]]]]:
    arrays = {str(p.relative_to(out)): np.load(p) for p in sorted(out.glob("layer_*/**/*.npy"))}
    units = {p.stem: {json.loads(line)["audio"]: json.loads(line)["units"] for line in p.read_text().splitlines()}
             for p in sorted((out / "codebook_units").glob("*.jsonl"))}
    return arrays, units


def test_a_killed_extraction_resumes_without_rewriting_finished_files(manifest, tmp_path):
    reference = tmp_path / "reference"
    extract_to_directory(_model(), read_manifest(manifest), reference, ExtractionSettings(**SETTINGS), progress=False)
    out = tmp_path / "killed"
    result = _dying_extraction(manifest, out, die_in="batch", after=3)
    assert result.returncode == -signal.SIGKILL, result.stderr
    # Units were streamed: the three finished batches are in the JSONL already.
    for path in (out / "codebook_units").glob("*.jsonl"):
        assert len(path.read_text().splitlines()) == 3
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("layer_*/**/*.npy")}
    assert len(finished) == 3 * len(SETTINGS["layers"])
    metadata = extract_to_directory(_model(), read_manifest(manifest), out, ExtractionSettings(**SETTINGS),
                                    progress=False)
    assert metadata["num_files"] == 8
    for path, stamp in finished.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, f"{path} was rewritten"
    arrays, units = _outputs(out)
    expected_arrays, expected_units = _outputs(reference)
    assert arrays.keys() == expected_arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, expected_arrays[key])
    assert units == expected_units
    for path in (out / "codebook_units").glob("*.jsonl"):
        assert len(path.read_text().splitlines()) == 8  # no row twice


def test_a_kill_while_writing_leaves_no_truncated_npy(manifest, tmp_path):
    out = tmp_path / "torn"
    result = _dying_extraction(manifest, out, die_in="save", after=5)
    assert result.returncode == -signal.SIGKILL, result.stderr
    for path in out.glob("layer_*/**/*.npy"):
        assert np.load(path).shape[1] == 32  # every .npy present is complete
    assert list(out.glob("layer_*/**/*.partial"))  # the torn one is a temporary file
    extract_to_directory(_model(), read_manifest(manifest), out, ExtractionSettings(**SETTINGS), progress=False)
    assert not list(out.glob("layer_*/**/*.partial"))
    assert len(list(out.glob("layer_*/**/*.npy"))) == 8 * 2


def test_another_model_or_settings_is_refused_unless_restarted(manifest, tmp_path):
    out = tmp_path / "out"
    entries = read_manifest(manifest)
    extract_to_directory(_model(), entries, out, ExtractionSettings(**SETTINGS), progress=False)
    with pytest.raises(ValueError, match=r"holds an extraction with other settings \(codebooks: true → false; layers: "
                                         r"\[1, 3\] → \[2\]\); use another"):
        extract_to_directory(_model(), entries, out, ExtractionSettings(layers=(2,)), progress=False)
    other = _model()
    with torch.no_grad():
        other.mask_embedding.add_(1.0)
    with pytest.raises(ValueError, match=r"holds an extraction with other model \(a model with other weights or "
                                         r"config\); use another"):
        extract_to_directory(other, entries, out, ExtractionSettings(**SETTINGS), progress=False)
    # Starting over removes everything the replaced extraction wrote: no layer, unit or feature file of it stays
    # beside the new one (a folder scanned later would mix the two).
    extract_to_directory(_model(), entries, out, ExtractionSettings(layers=(2,)), progress=False, restart=True)
    assert sorted(p.name for p in out.glob("layer_*")) == ["layer_02"]
    assert not (out / "codebook_units").exists()
    extract_to_directory(other, entries[:3], out, ExtractionSettings(**SETTINGS), progress=False,
                         replace_other=True)
    arrays, units = _outputs(out)
    assert len(arrays) == 2 * 3
    assert sorted(p.name for p in out.glob("layer_*")) == ["layer_01", "layer_03"]
    assert all(len(rows) == 3 for rows in units.values())
    # Features without the journal that wrote them: of unknown origin, refused unless restarted.
    import shutil

    shutil.rmtree(out / ".extract")
    with pytest.raises(ValueError, match=r"holds codebook_units, layer_01, layer_03, metadata\.json but no record"):
        extract_to_directory(other, entries[:3], out, ExtractionSettings(**SETTINGS), progress=False)
    extract_to_directory(other, entries[:3], out, ExtractionSettings(**SETTINGS), progress=False, restart=True)
    assert len(_outputs(out)[0]) == 2 * 3
    # evaluate's working folder (replace_other) starts over instead, as it does for another extraction
    shutil.rmtree(out / ".extract")
    extract_to_directory(_model(), entries[:2], out, ExtractionSettings(layers=(3,)), progress=False,
                         replace_other=True)
    assert sorted(str(p.relative_to(out)) for p in out.glob("layer_*/**/*.npy")) == [
        f"layer_03/{name}.npy" for name in sorted(output_stems(entries[:2]))]


def test_a_bf16_folder_from_the_all_bf16_days_is_not_resumed(manifest, tmp_path):
    """Before its input path moved to float32, a bf16 extraction wrote no ``bf16_input_path``: such a folder holds
    other features and must be refused, not topped up."""
    out = tmp_path / "out"
    entries = read_manifest(manifest)
    bf16 = ExtractionSettings(**{**SETTINGS, "dtype": "bfloat16"})
    extract_to_directory(_model(), entries, out, bf16, progress=False)
    state_path = next(out.rglob("state.json"))
    state = json.loads(state_path.read_text())
    assert state["bf16_input_path"] == "float32"
    extract_to_directory(_model(), entries, out, bf16, progress=False)  # the same extraction: resumed, nothing to do
    del state["bf16_input_path"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="other bf16_input_path \\(that folder was begun by an older spidr"):
        extract_to_directory(_model(), entries, out, bf16, progress=False)


@pytest.mark.timeout(60)
def test_bookkeeping_before_the_first_audio_read_is_linear(monkeypatch, tmp_path):
    """50k entries: the old code built set(short) once per entry (quadratic: minutes here); now well under a second
    (the generous timeout is a guard against quadratic behaviour, not a speed target)."""
    count = 50_000
    lengths = np.random.default_rng(0).integers(16_000, 560_000, size=count)
    entries = Manifest.from_entries(ManifestEntry(f"u{i}", f"/corpus/s{i % 40}/c{i % 400}/u{i}.flac", int(n))
                                    for i, n in enumerate(lengths))

    class FirstReadError(Exception):
        pass

    def first_read(*_args, **_kwargs):
        raise FirstReadError

    monkeypatch.setattr(features, "load_audio", first_read)
    with pytest.raises(FirstReadError):
        extract_to_directory(_model(), entries, tmp_path / "out", ExtractionSettings(layers=(1,)), progress=False)
    stems = output_stems(entries)
    assert stems[7] == "s7/c7/u7"
    assert len(stems) == count


def test_length_batches_is_the_greedy_rule():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 5000, size=500)
    batches = list(length_batches(lengths, 12_000))
    assert sorted(i for b in batches for i in b) == list(range(500))
    order = np.argsort(lengths, kind="stable").tolist()
    assert [i for b in batches for i in b] == order
    for batch in batches:
        assert len(batch) * lengths[batch].max() <= 12_000 or len(batch) == 1
    # a batch is only cut when the next utterance does not fit
    for batch, following in itertools.pairwise(batches):
        assert (len(batch) + 1) * lengths[following[0]] > 12_000


def test_output_stems_mirror_the_tree_and_refuse_duplicates():
    entries = [ManifestEntry("a", "/c/s1/x/a.wav", 10), ManifestEntry("b", "/c/s2/b.flac", 10),
               ManifestEntry("renamed", "/c/s1/x/c.wav", 10)]
    assert list(output_stems(entries)) == ["s1/x/a", "s2/b", "s1/x/renamed"]
    members = [ManifestEntry("t", "top.wav", 5, "/x.tar", 0, 5), ManifestEntry("u", "d/u.wav", 5, "/x.tar", 5, 5)]
    assert list(output_stems(members)) == ["t", "d/u"]
    with pytest.raises(ValueError, match=r"utterances 1 \(/c/s1/x/a\.wav\) and 3 \(/c/s1/x/a\.flac\) both map to "
                                         r"the output file 's1/x/a'"):
        output_stems([*entries[:2], ManifestEntry("a", "/c/s1/x/a.flac", 10)])


def test_identity_differences_name_what_changed_in_words():
    from spidr.eval.journal import identity_differences

    assert identity_differences({"format": 1, "settings": {"dtype": "float32"}},
                                {"format": 2, "settings": {"dtype": "float32"}}) == "format (1 → 2)"
    assert identity_differences({"utterances": "ab12", "unit_rows": "name"}, {"utterances": "cd34"}) == (
        "utterances (another list of utterances)")
    # an entry only the earlier identity holds is named when it is the one difference
    assert identity_differences({"unit_rows": "name"}, {}) == 'unit_rows ("name" → null)'
    # codebook units asked for where none were: the settings say it, not "an older spidr" (unit_rows comes with them)
    assert identity_differences({"settings": {"codebooks": False}}, {"settings": {"codebooks": True},
                                                                    "unit_rows": "name"}) == (
        "settings (codebooks: false → true)")
    assert "older spidr" in identity_differences({"settings": {"codebooks": True}},
                                                 {"settings": {"codebooks": True}, "unit_rows": "name"})
    assert identity_differences({"kmeans": {"06": "a"}}, {"kmeans": {"03": "c", "06": "b"}}) == (
        "k-means units (layer 3: none → centroids; layer 6: centroids → other centroids)")
    assert identity_differences({"kmeans": {"06": "a"}}, {}) == "k-means units (layer 6: centroids → none)"


def _journal(out: Path, num_entries: int = 4):
    from spidr.eval.journal import ExtractionJournal

    return ExtractionJournal(out, {"settings": {"layers": [1]}}, num_entries=num_entries, restart=False)


def test_a_torn_last_journal_line_is_cut_off_so_later_batches_are_journaled(tmp_path):
    """A kill while the journal line of batch 2 was being written leaves half a line: a resumed run must cut it off,
    or its own next line would be glued onto the fragment and lost (with every line after it) at the next resume."""
    journal = _journal(tmp_path)
    journal.record(np.asarray([0]), {}, {"layer_03": 7})
    journal.close()
    path = tmp_path / ".extract" / "journal.jsonl"
    complete = path.read_bytes()
    with path.open("ab") as handle:
        handle.write(b'{"done": [1], "ski')
    journal = _journal(tmp_path)
    assert journal.done.tolist() == [True, False, False, False]  # the torn batch is redone
    assert journal.units_bytes == {"layer_03": 7}
    assert path.read_bytes() == complete
    journal.record(np.asarray([1]), {}, {"layer_03": 9})
    journal.record(np.asarray([2]), {}, {"layer_03": 11})
    journal.close()
    journal = _journal(tmp_path)
    assert journal.done.tolist() == [True, True, True, False]
    assert journal.units_bytes == {"layer_03": 11}
    journal.close()


def test_a_last_journal_line_killed_before_its_newline_is_kept_and_ended(tmp_path):
    """A kill between a journal line's text and its newline: the line is complete (its batch is done), and a resumed
    run must end it with a newline, or its own next line would be appended to it and both be unreadable."""
    journal = _journal(tmp_path)
    journal.record(np.asarray([0]), {"/a.wav": "corrupt"}, {"layer_03": 7})
    journal.close()
    path = tmp_path / ".extract" / "journal.jsonl"
    complete = path.read_bytes()
    path.write_bytes(complete.removesuffix(b"\n"))
    journal = _journal(tmp_path)
    assert journal.done.tolist() == [True, False, False, False]
    assert path.read_bytes() == complete
    journal.record(np.asarray([3]), {}, {"layer_03": 9})
    journal.close()
    journal = _journal(tmp_path)
    assert journal.done.tolist() == [True, False, False, True]
    assert journal.skipped == {"/a.wav": "corrupt"}
    assert journal.units_bytes == {"layer_03": 9}
    journal.close()


def test_a_units_file_the_journal_does_not_name_is_emptied(tmp_path):
    """Rows of a layer the journal records no size for (a kill in the first batch, after its rows reached the file
    but before its journal line) belong to no finished batch: the file is cut to 0 bytes, a journaled one to its
    journaled size, so no row is written twice when that batch is redone."""
    from spidr.eval.journal import UnitsFiles

    folder = tmp_path / "codebook_units"
    folder.mkdir()
    (folder / "layer_02.jsonl").write_text('{"a": 1}\n{"b": 2}\n')
    (folder / "layer_03.jsonl").write_text('{"c": 3}\n')
    units = UnitsFiles(tmp_path, {"layer_02": 9})
    assert (folder / "layer_02.jsonl").read_text() == '{"a": 1}\n'
    assert (folder / "layer_03.jsonl").read_bytes() == b""
    units.append("layer_03", ['{"d": 4}\n'])
    assert units.sizes() == {"layer_02": 9, "layer_03": 9}
    units.close()


def test_the_utterances_fingerprint_changes_with_one_path_or_length(tmp_path):
    """The fingerprint stands for the utterance list in state.json: another file at one row, or another length,
    is another list (resuming would keep features of the old audio), while an equal list fingerprints equally."""
    from spidr.eval.journal import entries_fingerprint

    rows = [("u0", "/c/u0.wav", 16_000), ("u1", "/c/u1.wav", 12_000), ("u2", "/c/u2.wav", 9_000)]

    def fingerprint(changes: dict[int, tuple[str, str, int]]) -> str:
        return entries_fingerprint(Manifest.from_entries(ManifestEntry(*changes.get(i, row))
                                                         for i, row in enumerate(rows)))

    same = fingerprint({})
    assert fingerprint({}) == same
    assert fingerprint({1: ("u1", "/c/other.wav", 12_000)}) != same
    assert fingerprint({1: ("u1", "/c/u1.wav", 12_001)}) != same
    assert fingerprint({1: ("u1", "/c/u1.wav", 12_000)}) == same


def test_a_manifest_with_one_path_changed_is_refused(tmp_path):
    """Same file ids, same lengths, same output files, but one row now names another audio file: the folder's
    features of that row came from other audio, so resuming into it is refused, naming the utterance list."""
    entries = read_manifest(write_corpus(tmp_path / "corpus", num_files=2))
    out = tmp_path / "out"
    extract_to_directory(_model(), entries, out, ExtractionSettings(**SETTINGS), progress=False)
    first = entries[0]
    other = Path(first.path).with_name("moved.wav")
    other.write_bytes(Path(first.path).read_bytes())
    changed = [ManifestEntry(first.fileid, str(other), first.num_samples), entries[1]]
    assert list(output_stems(changed)) == list(output_stems(entries))
    with pytest.raises(ValueError, match=r"holds an extraction with other utterances \(another list of utterances\)"):
        extract_to_directory(_model(), changed, out, ExtractionSettings(**SETTINGS), progress=False)


def test_files_skipped_before_a_kill_are_still_listed_after_the_resume(tmp_path):
    """A file skipped in a batch finished before the kill is not read again on resume: the journal's record of it
    is what metadata.json's skipped list and num_files come from, which must equal an uninterrupted run's."""
    corpus = write_corpus(tmp_path / "corpus", num_files=4, seconds=(0.5, 1.0))
    tiny = corpus.parent / "tiny.wav"
    sf.write(tiny, np.zeros(300, dtype=np.float32), 16_000, subtype="FLOAT")  # shorter than one frame: skipped
    corpus.write_text(corpus.read_text() + "tiny,tiny.wav,300\n")
    reference = extract_to_directory(_model(), read_manifest(corpus), tmp_path / "reference",
                                     ExtractionSettings(**SETTINGS), progress=False)
    assert reference["num_files"] == 4
    assert list(reference["skipped"]) == [str(tiny)]
    out = tmp_path / "killed"
    # the tiny file, the shortest, is the first batch; killed at the third forward (two files finished)
    result = _dying_extraction(corpus, out, die_in="batch", after=2)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert len(list(out.glob("layer_01/*.npy"))) == 2
    metadata = extract_to_directory(_model(), read_manifest(corpus), out, ExtractionSettings(**SETTINGS),
                                    progress=False)
    assert metadata["skipped"] == reference["skipped"]
    assert metadata["num_files"] == reference["num_files"] == 4
    assert json.loads((out / "metadata.json").read_text())["skipped"] == reference["skipped"]


def _first_of_part_1(entries):
    """The first utterance that part 1 of 2 extracts."""
    from spidr.eval.shards import Shard

    mine = Shard(1, 2).members(np.array([e.num_samples for e in entries]))
    return entries[int(np.flatnonzero(mine)[0])]


def _rewrite_in_place(path: Path) -> None:
    """Other audio of the same length, under the same name, with a later modification time."""
    wave, rate = sf.read(path, dtype="float32")
    before = path.stat().st_mtime_ns
    sf.write(path, np.ascontiguousarray(wave[::-1]), rate, subtype="PCM_16")
    os.utime(path, ns=(before + 5_000_000_000, before + 5_000_000_000))  # (whatever the clock's granularity)


def test_audio_rewritten_in_place_is_refused_and_evaluate_s_folder_starts_over(tmp_path):
    """Same ids, paths and lengths, other audio: features of the old audio must not be reused. ``extract`` refuses,
    naming the file; evaluate's working folder (``replace_other``) extracts again, as a fresh folder would."""
    entries = read_manifest(write_corpus(tmp_path / "corpus", num_files=2))
    out = tmp_path / "out"
    settings = ExtractionSettings(**SETTINGS)
    extract_to_directory(_model(), entries, out, settings, progress=False)
    before, _ = _outputs(out)
    extract_to_directory(_model(), entries, out, settings, progress=False)  # untouched audio: resumed, nothing redone
    _rewrite_in_place(Path(entries[0].path))
    assert read_manifest(tmp_path / "corpus" / "manifest.csv") == entries  # (the manifest cannot tell)
    with pytest.raises(ValueError, match=rf"holds an extraction of audio files changed since: "
                                         rf"{re.escape(entries[0].location)} \(size or modification time\), as their "
                                         r"sizes and modification times tell \(a copy keeps the times with cp -p, "
                                         r"rsync -a or tar\); use another output folder, or restart"):
        extract_to_directory(_model(), entries, out, settings, progress=False)
    extract_to_directory(_model(), entries, out, settings, progress=False, replace_other=True)
    extract_to_directory(_model(), entries, tmp_path / "fresh", settings, progress=False)
    after, expected = _outputs(out)[0], _outputs(tmp_path / "fresh")[0]
    assert after.keys() == expected.keys() == before.keys()
    for key, value in after.items():
        np.testing.assert_array_equal(value, expected[key])
    first = output_stems(entries)[0]
    assert not np.array_equal(after[f"layer_01/{first}.npy"], before[f"layer_01/{first}.npy"])
    extract_to_directory(_model(), entries, out, settings, progress=False)  # stamps recorded again: resumed


def test_a_folder_begun_before_the_audio_was_stamped_is_resumed_then_checked(tmp_path):
    """A folder without audio stamps (an older spidr's) resumes as before, without rewriting a file; the stamps are
    recorded then, so audio rewritten after that is noticed."""
    entries = read_manifest(write_corpus(tmp_path / "corpus", num_files=2))
    out = tmp_path / "out"
    settings = ExtractionSettings(**SETTINGS)
    extract_to_directory(_model(), entries, out, settings, progress=False)
    stamps_path = out / ".extract" / "audio_stamps.npy"
    recorded = np.load(stamps_path)
    stamps_path.unlink()
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("layer_*/**/*.npy")}
    metadata = extract_to_directory(_model(), entries, out, settings, progress=False)
    assert metadata["num_files"] == 2
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("layer_*/**/*.npy")} == finished
    np.testing.assert_array_equal(np.load(stamps_path), recorded)
    _rewrite_in_place(Path(entries[1].path))
    with pytest.raises(ValueError, match=rf"audio files changed since: {re.escape(entries[1].location)} "):
        extract_to_directory(_model(), entries, out, settings, progress=False)


def test_audio_stamps_are_each_file_s_size_and_modification_second(tmp_path):
    from spidr.eval.journal import NOT_THIS_PART, audio_stamps

    files = [tmp_path / f"u{i}.wav" for i in range(3)]
    for path in files:
        path.write_bytes(b"RIFF0000")
        os.utime(path, ns=(0, 1_700_000_000_250_000_000))  # 1,700,000,000.25 s
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"0" * 1024)
    os.utime(archive, ns=(0, 1_600_000_000_000_000_000))
    plain = Manifest.from_entries(ManifestEntry(f"u{i}", str(p), 16_000) for i, p in enumerate(files))
    members = Manifest.from_entries([ManifestEntry("m0", "m0.wav", 16_000, str(archive), 0, 10),
                                     ManifestEntry("m1", "m1.wav", 16_000, str(archive), 512, 10),
                                     ManifestEntry("u0", str(files[0]), 16_000)])
    assert audio_stamps(plain).tolist() == [[8, 1_700_000_000]] * 3
    assert audio_stamps(members).tolist() == [[1024, 1_600_000_000], [1024, 1_600_000_000], [8, 1_700_000_000]]
    # only a part's rows
    assert audio_stamps(plain, rows=np.array([False, True, False])).tolist() == [
        [NOT_THIS_PART] * 2, [8, 1_700_000_000], [NOT_THIS_PART] * 2]
    assert audio_stamps(members, rows=np.array([False, True, False]))[1].tolist() == [1024, 1_600_000_000]
    # a copy whose times lost their fraction of a second (tar's) has the same stamps; a second later is another
    os.utime(files[1], ns=(0, 1_700_000_000_000_000_000))
    assert audio_stamps(plain)[1].tolist() == [8, 1_700_000_000]
    os.utime(files[1], ns=(0, 1_700_000_001_000_000_000))
    assert audio_stamps(plain)[1].tolist() == [8, 1_700_000_001]
    files[2].unlink()  # a missing file counts as missing, not as an error
    assert audio_stamps(plain)[2].tolist() == [-1, -1]


def test_each_part_compares_the_stamps_of_its_own_files(tmp_path):
    """Parts on machines that each hold their own copy of the audio (copied without their times) see other stamps
    for the other parts' files: part 2 must not be refused for part 1's files, while part 1, rerun on its copy
    rewritten since, is refused naming its file."""
    from spidr.eval.features import ExtractionSettings as Settings
    from spidr.eval.folder_extraction import extract_part
    from spidr.eval.shards import Shard

    entries = read_manifest(write_corpus(tmp_path / "corpus", num_files=4))
    out = tmp_path / "out"
    settings = Settings(**SETTINGS)
    first_part_file = _first_of_part_1(entries)
    extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False)
    _rewrite_in_place(Path(first_part_file.path))  # part 2's machine: another copy of part 1's file
    extract_part(_model(), entries, out, settings, Shard(2, 2), progress=False)
    assert (out / "metadata.json").is_file()  # part 2 was the last: joined
    shutil.rmtree(out)
    _rewrite_in_place(Path(first_part_file.path))
    extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False)
    _rewrite_in_place(Path(first_part_file.path))
    with pytest.raises(ValueError, match=rf"audio files changed since: {re.escape(first_part_file.location)} "):
        extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False)
    # --restart starts that part alone over; part 2 then finishes the folder
    extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False, restart=True)
    extract_part(_model(), entries, out, settings, Shard(2, 2), progress=False)
    assert (out / "metadata.json").is_file()


def test_audio_changes_name_the_first_changed_file_and_count_the_others():
    from spidr.eval.journal import audio_changes

    recorded = np.array([[10, 5], [-1, -1], [12, 7], [13, 8]])
    locate = ["a.wav", "b.wav", "c.wav", "d.wav"].__getitem__
    assert audio_changes(recorded, recorded.copy(), locate) == ""
    assert audio_changes(recorded, np.array([[10, 5], [11, 6], [12, 7], [13, 8]]), locate) == (
        "b.wav (missing then, present now)")
    assert audio_changes(recorded, np.array([[10, 5], [-1, -1], [-1, -1], [13, 9]]), locate) == (
        "c.wav (missing now) and 1 other file(s)")
    assert audio_changes(recorded, np.array([[10, 6], [-1, -1], [12, 7], [14, 8]]), locate) == (
        "a.wav (size or modification time) and 1 other file(s)")


def test_a_part_of_a_finished_extraction_rechecks_its_audio(tmp_path):
    """Rerunning a part on a finished folder said "nothing left to do" after its audio was rewritten in place (a
    whole extraction refused): the part's stamps survive the join and are compared."""
    from spidr.eval.folder_extraction import extract_part
    from spidr.eval.shards import Shard

    entries = read_manifest(write_corpus(tmp_path / "corpus", num_files=4))
    out = tmp_path / "out"
    settings = ExtractionSettings(**SETTINGS)
    for part in (1, 2):
        extract_part(_model(), entries, out, settings, Shard(part, 2), progress=False)
    assert (out / "metadata.json").is_file()
    outcome = extract_part(_model(), entries, out, settings, Shard(2, 2), progress=False)
    assert outcome.finished_before
    second = entries[int(np.flatnonzero(Shard(2, 2).members(np.array([e.num_samples for e in entries])))[0])]
    _rewrite_in_place(Path(second.path))
    assert extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False).finished_before  # not its file
    with pytest.raises(ValueError, match=rf"audio files changed since: {re.escape(second.location)} "):
        extract_part(_model(), entries, out, settings, Shard(2, 2), progress=False)


def test_a_part_s_audio_stamps_are_its_rows_wherever_a_chunk_of_rows_begins(tmp_path, monkeypatch):
    """audio_stamps reads the manifest ITER_CHUNK rows at a time: a part's rows past the first chunk must get their
    own file's stamps, at their own index (hand-made stamps: each file its own size and second)."""
    from spidr.eval import journal
    from spidr.eval.journal import NOT_THIS_PART, audio_stamps

    files = []
    for i in range(5):
        path = tmp_path / f"u{i}.wav"
        path.write_bytes(b"x" * (10 + i))
        os.utime(path, ns=(0, (1_700_000_000 + i) * 1_000_000_000))
        files.append(path)
    plain = Manifest.from_entries(ManifestEntry(f"u{i}", str(p), 16_000) for i, p in enumerate(files))
    rows = np.array([False, True, False, True, True])
    expected = [[10 + i, 1_700_000_000 + i] if rows[i] else [NOT_THIS_PART] * 2 for i in range(5)]
    assert audio_stamps(plain, rows=rows).tolist() == expected
    monkeypatch.setattr(journal, "ITER_CHUNK", 2)  # chunks [0, 2), [2, 4), [4, 5)
    assert audio_stamps(plain, rows=rows).tolist() == expected
    assert audio_stamps(plain).tolist() == [[10 + i, 1_700_000_000 + i] for i in range(5)]


def test_a_part_restarted_for_its_changed_audio_records_the_new_stamps(tmp_path):
    """After --restart of a part whose audio was rewritten, the part's stamps are those of the audio it extracted
    now: the next run of that part resumes, it is not refused again for the change it already redid."""
    from spidr.eval.folder_extraction import extract_part
    from spidr.eval.journal import audio_stamps
    from spidr.eval.shards import Shard

    entries = read_manifest(write_corpus(tmp_path / "corpus", num_files=4))
    out = tmp_path / "out"
    settings = ExtractionSettings(**SETTINGS)
    first = _first_of_part_1(entries)
    extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False)
    _rewrite_in_place(Path(first.path))
    with pytest.raises(ValueError, match=rf"audio files changed since: {re.escape(first.location)} "):
        extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False)
    extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False, restart=True)
    np.testing.assert_array_equal(np.load(out / ".extract" / "shard-1-of-2" / "audio_stamps.npy"),
                                  audio_stamps(entries, rows=Shard(1, 2).members(
                                      np.array([e.num_samples for e in entries]))))
    outcome = extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False)  # resumed: nothing to do
    assert not outcome.finished_before
    extract_part(_model(), entries, out, settings, Shard(2, 2), progress=False)
    assert (out / "metadata.json").is_file()
    assert extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False).finished_before


def test_a_folder_started_over_for_changed_audio_does_not_look_finished_while_it_is_redone(tmp_path, monkeypatch):
    """evaluate's folder (replace_other) starts over when its audio changed: metadata.json (what makes a folder look
    finished) goes first, so an extraction that fails midway leaves no finished-looking folder of mixed features."""
    from spidr.eval import folder_extraction

    entries = read_manifest(write_corpus(tmp_path / "corpus", num_files=2))
    out = tmp_path / "out"
    settings = ExtractionSettings(**SETTINGS)
    extract_to_directory(_model(), entries, out, settings, progress=False)
    assert (out / "metadata.json").is_file()
    _rewrite_in_place(Path(entries[0].path))

    def failing(*args, **kwargs):
        raise RuntimeError("killed midway")

    monkeypatch.setattr(folder_extraction, "_extract_entries", failing)
    with pytest.raises(RuntimeError, match="killed midway"):
        extract_to_directory(_model(), entries, out, settings, progress=False, replace_other=True)
    assert not (out / "metadata.json").exists()
    assert not list(out.glob("layer_*/**/*.npy"))  # (nothing of the old audio's features kept beside the new)


def test_a_part_given_replace_other_extracts_its_changed_audio_again(tmp_path):
    """replace_other (as restart) starts a part whose audio changed over: its changed file's features are those of
    the new audio, as a fresh extraction gives them, not the old ones kept."""
    from spidr.eval.folder_extraction import extract_part
    from spidr.eval.shards import Shard

    entries = read_manifest(write_corpus(tmp_path / "corpus", num_files=2))
    out = tmp_path / "out"
    settings = ExtractionSettings(**SETTINGS)
    extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False)
    before = _outputs(out)[0]
    first = _first_of_part_1(entries)
    _rewrite_in_place(Path(first.path))
    extract_part(_model(), entries, out, settings, Shard(1, 2), progress=False, replace_other=True)
    extract_part(_model(), entries, out, settings, Shard(2, 2), progress=False)
    extract_to_directory(_model(), entries, tmp_path / "fresh", settings, progress=False)
    after, expected = _outputs(out)[0], _outputs(tmp_path / "fresh")[0]
    assert after.keys() == expected.keys()
    for key, value in after.items():
        np.testing.assert_array_equal(value, expected[key])
    assert any(not np.array_equal(before[key], after[key]) for key in before)


def test_an_unreadable_stamps_file_counts_as_none_recorded(tmp_path):
    """A stamps file that is not a .npy (damaged) is no record: the folder resumes as one begun before stamps were
    recorded, without rewriting a file, and records them again."""
    entries = read_manifest(write_corpus(tmp_path / "corpus", num_files=2))
    out = tmp_path / "out"
    settings = ExtractionSettings(**SETTINGS)
    extract_to_directory(_model(), entries, out, settings, progress=False)
    stamps_path = out / ".extract" / "audio_stamps.npy"
    recorded = np.load(stamps_path)
    stamps_path.write_bytes(b"not a numpy file")
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("layer_*/**/*.npy")}
    extract_to_directory(_model(), entries, out, settings, progress=False)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("layer_*/**/*.npy")} == finished
    np.testing.assert_array_equal(np.load(stamps_path), recorded)


def test_a_changed_archive_is_named_by_its_member_s_location(tmp_path):
    """Members of a tar are stamped by their archive: a tar touched since is refused naming the first member as
    every message names it (archive:member), not by a bare member path that exists nowhere."""
    (tmp_path / "audio").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / "audio" / name, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
    archive = tmp_path / "audio.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("a.wav", "b.wav"):
            tar.add(tmp_path / "audio" / name, arcname=name)
    entries = scan(archive, progress=False).entries
    assert all(entry.archive is not None for entry in entries)
    out = tmp_path / "out"
    settings = ExtractionSettings(**SETTINGS)
    extract_to_directory(_model(), entries, out, settings, progress=False)
    later = archive.stat().st_mtime_ns + 5_000_000_000
    os.utime(archive, ns=(later, later))
    with pytest.raises(ValueError, match=rf"audio files changed since: {re.escape(entries[0].location)} "
                                         r"\(size or modification time\) and 1 other file\(s\)"):
        extract_to_directory(_model(), entries, out, settings, progress=False)


def test_audio_stamps_stat_each_archive_once(tmp_path, monkeypatch):
    """The members of a .tar share their archive's stamp: one stat per archive, not one per member (its comment
    said so while setdefault computed the stamp for every member: 281k stats for LibriSpeech in one tar)."""
    import os
    import tarfile

    from spidr.data.scanning import scan
    from spidr.eval import journal

    for name in ("a", "b", "c"):
        sf.write(tmp_path / f"{name}.wav", np.zeros(1600, dtype=np.float32), 16000)
    with tarfile.open(tmp_path / "set.tar", "w") as archive:
        for name in ("a", "b", "c"):
            archive.add(tmp_path / f"{name}.wav", f"{name}.wav")
    manifest = scan(tmp_path / "set.tar", progress=False).entries
    assert len(manifest) == 3
    calls = []
    real_stat = os.stat

    def counted(path, *args, **kwargs):
        calls.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(journal.os, "stat", counted)
    stamps = journal.audio_stamps(manifest)
    monkeypatch.undo()
    assert calls == [str((tmp_path / "set.tar").resolve())]
    expected = real_stat(tmp_path / "set.tar")
    assert stamps.tolist() == [[expected.st_size, expected.st_mtime_ns // 1_000_000_000]] * 3


@pytest.mark.parametrize("ids", [("A", "a"), ("x", "X"), (unicodedata.normalize("NFC", "é"),
                                                          unicodedata.normalize("NFD", "é"))],
                         ids=["case", "case-other-extension", "nfc-nfd"])
def test_output_names_that_one_macos_or_windows_file_would_hold_are_refused(ids: tuple[str, str]) -> None:
    """Truth: APFS/HFS+ (macOS) and NTFS (Windows) are case-insensitive (and the macOS ones normalisation-
    insensitive): ``layer_01/A.npy`` and ``layer_01/a.npy`` are one file there, so the second utterance's features
    silently replace the first's, while metadata.json counts both. Two files of one folder that can coexist there
    (``x.wav`` and ``X.flac``; members ``spk/A.wav`` and ``spk/a.wav`` of a tar made on Linux) gave such names.
    They must be refused, naming both files, as names equal in every letter are (or be made distinct)."""
    first, second = ids
    entries = [ManifestEntry(first, f"/c/spk/{first}.wav", 10), ManifestEntry(second, f"/c/spk/{second}.flac", 10)]
    with pytest.raises(ValueError, match="one file on a case-insensitive file system") as error:
        output_stems(entries)
    assert f"/c/spk/{first}.wav" in str(error.value)
    assert f"/c/spk/{second}.flac" in str(error.value)


@pytest.mark.parametrize("ids", [("masse", "maße"), ("STRASSE", "straße"), ("fi", "ﬁ")])
def test_output_names_that_are_two_files_on_macos_and_windows_too_are_kept(ids):
    """Truth: NTFS's upcase table and APFS/HFS+ case-insensitivity map one character to one (Unicode's simple case
    mappings): 'maße.npy' and 'masse.npy' (German 'measures' / 'mass') are two files there, as on Linux. HEAD's
    str.casefold (full folding: ß → ss, ﬁ → fi) refuses them as 'one file on a case-insensitive file system'; at
    e09f221 they were extracted."""
    from spidr.data.manifest import ManifestEntry
    from spidr.eval.folder_extraction import output_stems

    first, second = ids
    entries = [ManifestEntry(first, f"/c/spk/{first}.wav", 10), ManifestEntry(second, f"/c/spk/{second}.wav", 10)]
    assert len(set(output_stems(entries))) == 2


@pytest.mark.parametrize("ids", [("İzmir_ılık", "İzmir_ilik"), ("ıß", "iß"), ("Iß", "ıß")])
def test_a_dotless_i_is_not_an_i_whatever_else_the_name_holds(ids):
    """Truth: NTFS's upcase table leaves U+0131 (ı) as it is, and APFS/HFS+ fold it to itself (CaseFolding.txt
    has no C/S entry for it): 'ılık.npy' and 'ilik.npy' are two files on macOS and Windows, and HEAD keeps them.
    But a name that also holds a character that full folding expands (İ, ß, ﬁ) takes HEAD's other branch, where
    'ı'.upper().lower() == 'i', and is refused as 'one file on a case-insensitive file system'."""
    from spidr.data.manifest import ManifestEntry
    from spidr.eval.folder_extraction import output_stems

    first, second = ids
    entries = [ManifestEntry(first, f"/c/spk/{first}.wav", 10), ManifestEntry(second, f"/c/spk/{second}.wav", 10)]
    assert len(set(output_stems(entries))) == 2


def test_a_feature_file_cut_by_a_full_disk_is_not_published_as_done(manifest, tmp_path):
    """Was a defect (res34): np.save writes a real file through a C FILE* whose fclose numpy never checks, so the last
    bytes failing to reach a full disk left OUT/layer_LL/<utt>.npy cut short under its final name, the batch was
    journaled as done and `spidr extract` said it wrote every file (exit 0); a rerun never rewrote it."""
    reference = tmp_path / "reference"
    extract_to_directory(_model(), read_manifest(manifest), reference, ExtractionSettings(**SETTINGS), progress=False)
    largest = max(path.stat().st_size for path in reference.glob("layer_*/**/*.npy"))
    out = tmp_path / "full"
    result = run_python_on_a_full_disk(largest - 16, f"""
        import sys
        from spidr.data.manifest import read_manifest
        from spidr.eval.features import ExtractionSettings
        from spidr.eval.folder_extraction import extract_to_directory
        from test_extract_resume import SETTINGS, _model
        try:
            extract_to_directory(_model(), read_manifest({str(manifest)!r}), {str(out)!r},
                                 ExtractionSettings(**SETTINGS), progress=False)
        except OSError as error:
            print("OSError", error)
            sys.exit(3)
    """)
    assert result.returncode == 3, result.stdout + result.stderr  # the failed write was told
    for path in out.glob("layer_*/**/*.npy"):
        assert np.load(path).shape == np.load(reference / path.relative_to(out)).shape  # published whole


def test_a_long_file_s_features_cut_by_a_full_disk_name_the_feature_file(tmp_path) -> None:
    """Was a defect (diff34): A file longer than max_seconds is written through NpyAppender (not replaced_when_done):
    on a full disk `spidr extract` said 'error: No space left on device' naming no file, where a short file's error
    names OUT/layer_LL/<utt>.npy (reproduced on a tmpfs)."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "long.wav", (0.1 * np.random.default_rng(0).normal(size=16000 * 6)).astype(np.float32), 16000)
    out = tmp_path / "out"
    result = run_python_on_a_full_disk(30_000, textwrap.dedent(f"""
        from spidr.data.scanning import scan
        from spidr.eval.features import ExtractionSettings
        from spidr.eval.folder_extraction import extract_to_directory
        from test_extract_resume import SETTINGS, _model
        try:
            extract_to_directory(_model(), scan({str(audio)!r}, progress=False).entries, {str(out)!r},
                                 ExtractionSettings(**{{**SETTINGS, "max_seconds": 2.0}}), progress=False)
        except OSError as error:
            print("OSError", error.filename)
    """))
    assert result.stdout.strip() == f"OSError {out / 'layer_01' / 'long.npy'}", result.stdout + result.stderr
