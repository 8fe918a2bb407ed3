"""Files written whole or not at all (spidr.atomic_files)."""

from __future__ import annotations

import pytest

from spidr.atomic_files import partial_path, replaced_when_done, write_atomically


def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "units.jsonl"
    path.write_text("earlier\n")
    def write_half_and_fail() -> None:
        with replaced_when_done(path) as partial:
            partial.write_text("half of the new")
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_half_and_fail()
    assert path.read_text() == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["units.jsonl"]


def test_a_finished_write_replaces_the_file_through_a_hidden_name_in_the_same_folder(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with replaced_when_done(path) as partial:
        assert partial == partial_path(path)
        assert partial.parent == tmp_path
        assert partial.name.startswith(".")
        partial.write_text("new")
        assert path.read_text() == "old", "the target must not change before the block ends"
    assert path.read_text() == "new"
    assert not partial.exists()
    write_atomically(tmp_path / "other.txt", "text ✓")
    assert (tmp_path / "other.txt").read_text(encoding="utf-8") == "text ✓"
