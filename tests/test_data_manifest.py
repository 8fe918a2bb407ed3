"""Manifests: CSV / TSV / JSONL / archive round trips, scanning directories and tars, errors, the CLI."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from spidr.cli import main
from spidr.data.audio import load_audio
from spidr.data.manifest import ManifestEntry, read_manifest, read_member, resampled_length, scan, write_manifest


def write_tone(path: Path, num_samples: int, rate: int = 16_000, *, channels: int = 1) -> Path:
    t = np.arange(num_samples) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t)
    data = np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else wave
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data.astype(np.float32), rate)
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """root/{a.wav 16 kHz, sub/b.flac 44.1 kHz, sub/c.wav stereo, broken.wav, notes.txt}."""
    root = tmp_path / "corpus"
    write_tone(root / "a.wav", 8000)
    write_tone(root / "sub" / "b.flac", 44100, 44_100)
    write_tone(root / "sub" / "c.wav", 4000, channels=2)
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file" * 10)
    (root / "notes.txt").write_text("not audio")
    return root


def test_resampled_length_matches_soxr() -> None:
    for rate in (8000, 22_050, 44_100, 48_000, 32_000):
        for n in (1, 5, 37, 1000, 44_101, 123_457):
            actual = len(soxr.resample(np.zeros(n, dtype=np.float32), rate, 16_000))
            assert resampled_length(n, rate) == actual, (rate, n)
    assert resampled_length(12345, 16_000) == 12345


def test_scan_directory_lists_audio_and_unreadable_files(corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        result = scan(corpus, progress=False)
    by_id = {e.fileid: e for e in result.entries}
    assert sorted(by_id) == ["a", "b", "c"]
    assert by_id["a"].num_samples == 8000
    assert by_id["b"].num_samples == 16_000  # one second at 44.1 kHz, counted at 16 kHz
    assert by_id["c"].num_samples == 4000
    assert all(Path(e.path).is_absolute() and not e.in_archive for e in result.entries)
    assert [Path(loc).name for loc, _ in result.failures] == ["broken.wav"]
    assert "broken.wav" in caplog.text


def test_scan_respects_extensions(corpus: Path) -> None:
    result = scan(corpus, exts=("flac",), progress=False)
    assert [e.fileid for e in result.entries] == ["b"]
    assert result.failures == []


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".tsv"])
def test_round_trip(corpus: Path, tmp_path: Path, suffix: str) -> None:
    entries = scan(corpus, progress=False).entries
    out = write_manifest(entries, tmp_path / f"manifest{suffix}")
    assert read_manifest(out) == entries


def test_fairseq_layout(corpus: Path, tmp_path: Path) -> None:
    entries = scan(corpus, progress=False).entries
    out = write_manifest(entries, tmp_path / "manifest.txt.tsv", fairseq=True, root=corpus)
    lines = out.read_text().splitlines()
    assert lines[0] == str(corpus.resolve())
    assert sorted(lines[1:]) == ["a.wav\t8000", "sub/b.flac\t16000", "sub/c.wav\t4000"]
    assert read_manifest(out) == entries


def test_relative_paths_resolve_against_the_manifest(tmp_path: Path) -> None:
    write_tone(tmp_path / "audio" / "x.wav", 3000)
    (tmp_path / "m.csv").write_text("path,num_samples\naudio/x.wav,3000\n")
    (entry,) = read_manifest(tmp_path / "m.csv")
    assert entry == ManifestEntry("x", str(tmp_path / "audio" / "x.wav"), 3000)
    assert load_audio(entry).shape == (3000,)


def make_tar(tmp_path: Path, members: dict[str, bytes]) -> Path:
    archive = tmp_path / "corpus.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_scan_tar_and_read_members(corpus: Path, tmp_path: Path) -> None:
    originals = {
        "x/a.wav": (corpus / "a.wav").read_bytes(),
        "x/b.flac": (corpus / "sub" / "b.flac").read_bytes(),
        "x/broken.wav": b"junk" * 50,
        "x/readme.md": b"text",
    }
    archive = make_tar(tmp_path, originals)
    result = scan(archive, progress=False)
    assert [e.fileid for e in result.entries] == ["a", "b"]
    assert [loc.endswith("x/broken.wav") for loc, _ in result.failures] == [True]
    for entry in result.entries:
        assert entry.in_archive
        assert entry.archive == str(archive.resolve())
        assert read_member(entry) == originals[entry.path]  # exactly the member's bytes
    a, b = result.entries
    assert torch.equal(load_audio(a), load_audio(corpus / "a.wav"))
    assert load_audio(b).shape == (16_000,)
    for suffix in (".csv", ".jsonl"):  # JSONL keeps the archive fields too (spec §14.9)
        out = write_manifest(result.entries, tmp_path / f"tar{suffix}")
        assert read_manifest(out) == result.entries
    header = (tmp_path / "tar.csv").read_text().splitlines()[0]
    assert header == "fileid,path,num_samples,archive,byte_offset,byte_size"


def test_compressed_tar_is_refused(corpus: Path, tmp_path: Path) -> None:
    archive = tmp_path / "c.tar"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(corpus / "a.wav", arcname="a.wav")
    with pytest.raises(ValueError, match="uncompressed"):
        scan(archive, progress=False)


def test_tsv_cannot_hold_archive_members(tmp_path: Path) -> None:
    entry = ManifestEntry("a", "a.wav", 10, str(tmp_path / "x.tar"), 512, 100)
    with pytest.raises(ValueError, match="tar members"):
        write_manifest([entry], tmp_path / "m.tsv")
    assert not (tmp_path / "m.tsv").exists()


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("m.csv", "fileid,path\na,/x.wav\n", "lacks column"),
        ("m.csv", "path,num_samples\n/x.wav,12.5\n", r"m.csv:2: num_samples = '12.5' is not an integer"),
        ("m.csv", "path,num_samples,archive\n/x.wav,12,/a.tar\n", "needs all of"),
        ("m.jsonl", '{"path": "/x.wav", "num_samples": 3}\n[1, 2]\n', r"m.jsonl:2: expected a JSON object"),
        ("m.jsonl", '{"path": "/x.wav"}\n', "missing 'num_samples'"),
        ("m.tsv", "/definitely/not/here\na.wav\t12\n", "root directory"),
        ("m.txt", "whatever", "suffix"),
    ],
)
def test_bad_manifests_name_file_and_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_manifest(tmp_path / name)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")


def test_cli_writes_each_format(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = scan(corpus, progress=False).entries
    assert main(["manifest", str(corpus), str(tmp_path / "m.jsonl"), "--no-progress"]) == 0
    assert read_manifest(tmp_path / "m.jsonl") == expected
    assert "broken.wav" in capsys.readouterr().out  # unreadable files are listed
    assert main(["manifest", str(corpus), str(tmp_path / "m.tsv"), "--fairseq", "--ext", ".wav", "--no-progress"]) == 0
    assert [e.fileid for e in read_manifest(tmp_path / "m.tsv")] == ["a", "c"]


def test_cli_tar_and_refusals(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = make_tar(tmp_path, {"a.wav": (corpus / "a.wav").read_bytes()})
    out = tmp_path / "tar.csv"
    assert main(["manifest", str(archive), str(out), "--no-progress"]) == 0  # the reference CLI broke here (§14.8)
    assert read_manifest(out)[0].in_archive
    before = out.read_text()
    assert main(["manifest", str(corpus), str(out), "--no-progress"]) == 2  # exists: nothing is overwritten
    assert out.read_text() == before
    assert "--overwrite" in capsys.readouterr().err
    assert main(["manifest", str(corpus), str(tmp_path / "m.parquet"), "--no-progress"]) == 2
    assert main(["manifest", str(tmp_path / "empty"), str(tmp_path / "e.csv"), "--no-progress"]) == 2


@pytest.mark.parametrize(
    "text",
    [
        "fileid,path,num_samples\na,x/a.wav,10\nb,/abs/b.flac,007\n",  # relative and absolute, leading zeros
        "fileid,path,num_samples\r\na,a.wav,1\r\n\r\nb,b.wav,2",  # CRLF, a blank line, no final newline
        'fileid,path,num_samples\n"a,1",a.wav,3\n',  # quoted field
        "fileid,path,num_samples\n,sub/c.wav,4\n",  # empty id: the stem
        "path,num_samples,fileid\nq.wav,5,q\n",  # other column order
    ],
)
def test_fast_csv_reading_agrees_with_the_csv_module(tmp_path: Path, text: str) -> None:
    import csv

    path = tmp_path / "m.csv"
    path.write_bytes(text.encode())
    rows = list(csv.DictReader(io.StringIO(text.replace("\r\n", "\n"))))
    expected = [ManifestEntry(r["fileid"] or Path(r["path"]).stem, str(tmp_path / r["path"]), int(r["num_samples"]))
                for r in rows if r]
    manifest = read_manifest(path)
    assert list(manifest) == expected
    assert [manifest[i] for i in range(len(manifest))] == expected
    assert manifest.num_samples.tolist() == [e.num_samples for e in expected]
    out = write_manifest(manifest, tmp_path / "again.csv")
    assert read_manifest(out) == expected


@pytest.mark.parametrize(("row", "message"), [("a,a.wav,12x", "m.csv:3: num_samples = '12x' is not an integer"),
                                              ("a,a.wav,-4", "m.csv:3: num_samples = -4 must be >= 0"),
                                              ("a,a.wav", "m.csv:3: expected 3 fields")])
def test_csv_errors_name_the_line(tmp_path: Path, row: str, message: str) -> None:
    (tmp_path / "m.csv").write_text(f"fileid,path,num_samples\nok,ok.wav,3\n{row}\n")
    with pytest.raises(ValueError, match=message):
        read_manifest(tmp_path / "m.csv")


def test_manifest_is_columnar(tmp_path: Path) -> None:
    entries = [ManifestEntry(f"u{i}", f"/d/s{i % 3}/u{i}.flac", 1000 + i) for i in range(1000)]
    manifest = read_manifest(write_manifest(entries, tmp_path / "m.csv"))
    assert manifest == entries
    assert manifest.num_samples.dtype == np.int64
    text_bytes = sum(len(e.fileid) + len(e.path) for e in entries)
    assert manifest.nbytes <= text_bytes + 24 * len(entries) + 16  # string bytes, 2 offsets and 1 length per row
    assert list(manifest[10:13]) == entries[10:13]
    assert list(manifest.take(np.array([5, 2]))) == [entries[5], entries[2]]
