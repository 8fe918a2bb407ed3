"""A folder given where a reader expects a file is named as a folder, not as a missing path: every reader of a named
input goes through ``spidr.input_files`` (checked here reader by reader, each with a folder and a missing path)."""

from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path

import pytest

from spidr.config import read_config_file
from spidr.data.audio import AudioError, load_audio
from spidr.data.manifest import read_manifest
from spidr.eval.items import read_items
from spidr.eval.kmeans import load_centroids
from spidr.eval.unit_quality import read_alignments
from spidr.eval.units import read_units
from spidr.input_files import existing_file, why_not_a_file
from spidr.lm.correlate import read_table
from spidr.lm.tokens import read_rows
from spidr.lm.train import lm_checkpoint_summary
from spidr.lm.zerospeech import read_lexical_gold, read_submission
from spidr.models.loading import read_checkpoint

READERS = {  # id: (the reader's word for its input, reader)
    "config file": read_config_file,
    "manifest": read_manifest,
    "item file": read_items,
    "centroids file": load_centroids,
    "alignment file": read_alignments,
    "units file": read_units,
    "units file (LM)": lambda path: list(read_rows(path)),
    "table": lambda path: read_table(path, ["abx"]),
    "LM checkpoint": lm_checkpoint_summary,
    "gold file": read_lexical_gold,
    "submission file": read_submission,
    "checkpoint": read_checkpoint,  # a folder could be a Hugging Face export: named as neither
}


def test_why_not_a_file_tells_file_folder_missing_and_special(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("x")
    assert why_not_a_file(tmp_path / "a.txt") is None
    assert why_not_a_file(tmp_path) == "is a folder, not a file"
    assert why_not_a_file(tmp_path / "nope") == "does not exist"
    with socket.socket(socket.AF_UNIX) as server:  # exists, but neither file nor folder
        monkeypatch.chdir(tmp_path)  # AF_UNIX paths are limited to ~100 bytes: bind a short relative name
        server.bind("sock")
        assert why_not_a_file(tmp_path / "sock") == "is not a regular file"


def test_the_hint_is_given_for_a_folder_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^thing .* is a folder, not a file: try inside$"):
        existing_file(tmp_path, "thing", hint="try inside")
    with pytest.raises(ValueError, match=r"^thing .*nope does not exist$"):
        existing_file(tmp_path / "nope", "thing", hint="try inside")
    assert existing_file(__file__, "thing") == Path(__file__)


@pytest.mark.parametrize("what", sorted(READERS))
def test_every_reader_names_a_folder_as_a_folder(tmp_path: Path, what: str) -> None:
    folder = tmp_path / "given.d"
    folder.mkdir()
    word = what.removesuffix(" (LM)")
    # (alignments may be a folder, of TextGrids: one without any is named as such a folder)
    as_folder = {"alignment file": r"alignment folder .*given\.d holds no \.TextGrid file"}
    with pytest.raises(ValueError, match=as_folder.get(what, rf"{word} .*given\.d is a folder, not a file")):
        READERS[what](folder)
    with pytest.raises(ValueError, match=rf"{word} .*absent does not exist"):
        READERS[what](tmp_path / "absent")


def test_a_folder_as_lm_checkpoint_suggests_its_final_pt(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"pass a checkpoint in it, e.g. {tmp_path / 'final.pt'}"):
        lm_checkpoint_summary(tmp_path)


def test_a_manifest_row_naming_a_folder_is_a_bad_file_named_as_a_folder(tmp_path: Path) -> None:
    (tmp_path / "given.d").mkdir()
    with pytest.raises(AudioError, match=r"given\.d: is a folder, not a file"):
        load_audio(str(tmp_path / "given.d"))
    with pytest.raises(AudioError, match=r"absent\.wav: file does not exist"):
        load_audio(str(tmp_path / "absent.wav"))


def test_a_run_folder_as_checkpoint_suggests_its_newest_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "step_10.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"not an exported Hugging Face .*e\.g\. {tmp_path / 'step_10.pt'}$"):
        read_checkpoint(tmp_path)
    (tmp_path / "final.pt").write_bytes(b"")
    os.utime(tmp_path / "final.pt", (0, 0))  # final.pt is named even when older
    with pytest.raises(ValueError, match=rf"e\.g\. {tmp_path / 'final.pt'}$"):
        read_checkpoint(tmp_path)


PIECE = 1 << 20  # first_non_utf8_line's read size


def test_a_line_longer_than_a_read_piece_counts_as_one_line(tmp_path):
    """Truth (hand-built): line 1 holds 1.5 MiB of ASCII, line 2 a Latin-1 byte: the fault is on line 2."""
    path = tmp_path / "long.csv"
    path.write_bytes(b"a" * (PIECE + PIECE // 2) + b"\ncaf\xe9\n")
    from spidr.text_files import first_non_utf8_line

    assert first_non_utf8_line(path) == (2, b"caf\xe9\n")


def test_a_character_split_between_two_read_pieces_is_utf8(tmp_path):
    """Truth: "é" is two bytes; placed so that the first read piece ends after its first byte, the line is still
    valid UTF-8, and the fault is the Latin-1 byte on line 2."""
    from spidr.text_files import first_non_utf8_line

    path = tmp_path / "split.csv"
    path.write_bytes(b"a" * (PIECE - 1) + "é".encode() + b"\nok\n")
    assert first_non_utf8_line(path) is None
    path.write_bytes(b"a" * (PIECE - 1) + "é".encode() + b"\ncaf\xe9\n")
    assert first_non_utf8_line(path) == (2, b"caf\xe9\n")


def test_a_gzip_compressed_file_is_read_decompressed(tmp_path):
    """Truth (first_non_utf8_line: "gzip-compressed when it ends in .gz"): the line of the fault in the text, not
    a line of the compressed bytes."""
    from spidr.text_files import first_non_utf8_line, not_utf8

    path = tmp_path / "units.jsonl.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b'{"a": 1}\n{"b": 2}\n{"caf\xe9": 3}\n')
    assert first_non_utf8_line(path) == (3, b'{"caf\xe9": 3}\n')
    assert not_utf8(path, "the units file").startswith(f"{path}:3: not UTF-8 text")


def test_a_latin1_last_line_without_a_newline_is_named_by_its_line(tmp_path):
    """A Latin-1 manifest whose last id ends in "é" and has no final newline: read_manifest refuses it (the file is
    not UTF-8) but its message names no line, unlike the same file with a newline."""
    from spidr.data.manifest import read_manifest

    path = tmp_path / "latin.csv"
    path.write_bytes(b"fileid,path,num_samples\nok,a.wav,80\ncaf\xe9")
    with pytest.raises(ValueError, match=r"latin\.csv:3: not UTF-8 text"):
        read_manifest(path)
