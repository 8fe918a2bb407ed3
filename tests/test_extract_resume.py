"""``spidr extract`` at corpus scale: resumable after a kill, atomic feature files, units streamed to their JSONL,
bookkeeping linear in the number of files."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from spidr.config import SpidRConfig
from spidr.data.manifest import Manifest, ManifestEntry, read_manifest
from spidr.eval import features
from spidr.eval.features import ExtractionSettings, extract_to_directory, length_batches, output_stems
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
        from spidr.eval import features

        calls = {{"n": 0}}
        if {die_in!r} == "batch":
            real = features.extract_batch
            def dying(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] > {after}:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)
            features.extract_batch = dying
        else:
            real_save = np.save
            def dying_save(handle, values):
                calls["n"] += 1
                if calls["n"] > {after}:
                    handle.write(b"\\x93NUMPY half a header")
                    handle.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                real_save(handle, values)
            features.np.save = dying_save
        features.extract_to_directory(t._model(), read_manifest({str(manifest)!r}), {str(out)!r},
                                      features.ExtractionSettings(**t.SETTINGS), progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          check=False)


def _outputs(out: Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, list[int]]]]:
    arrays = {str(p.relative_to(out)): np.load(p) for p in sorted(out.glob("layer_*/**/*.npy"))}
    units = {p.stem: {json.loads(line)["audio"]: json.loads(line)["units"] for line in p.open()}
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
    with pytest.raises(ValueError, match="utterances 1 and 3 both map to the output file 's1/x/a'"):
        output_stems([*entries[:2], ManifestEntry("a", "/c/s1/x/other.wav", 10)])


def test_identity_differences_name_what_changed_in_words():
    from spidr.eval.journal import identity_differences

    assert identity_differences({"format": 1, "settings": {"dtype": "float32"}},
                                {"format": 2, "settings": {"dtype": "float32"}}) == "format (1 → 2)"
    assert identity_differences({"utterances": "ab12", "unit_rows": "name"}, {"utterances": "cd34"}) == (
        "utterances (another list of utterances)")
    # an entry only the earlier identity holds is named when it is the one difference
    assert identity_differences({"unit_rows": "name"}, {}) == 'unit_rows ("name" → null)'
