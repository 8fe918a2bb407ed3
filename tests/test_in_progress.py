"""``spidr.in_progress``: a folder is marked while it is written, and only a writer that ends well unmarks it."""

from __future__ import annotations

import pytest

from spidr.in_progress import marked_in_progress, refuse_unfinished


def test_the_marker_stays_when_the_writer_fails_and_goes_when_it_ends_well(tmp_path):
    out = tmp_path / "new" / "out"
    with marked_in_progress(out, ".job-in-progress"):
        assert (out / ".job-in-progress").is_file()  # (the folder is made)
        with pytest.raises(ValueError, match=r"out is an unfinished spidr job run \(it holds \.job-in-progress"):
            refuse_unfinished(out, ".job-in-progress", "job")
    assert list(out.iterdir()) == []
    refuse_unfinished(out, ".job-in-progress", "job")
    with pytest.raises(OSError, match="disk full"), marked_in_progress(out, ".job-in-progress"):
        raise OSError("disk full")
    assert (out / ".job-in-progress").is_file()
    with pytest.raises(ValueError, match="rerun the same job command to complete it"):
        refuse_unfinished(out, ".job-in-progress", "job")
