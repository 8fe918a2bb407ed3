"""``spidr.folder_lock``: one process at a time per folder, refused by name, free again however the holder ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from spidr.folder_lock import folder_lock, output_lock

HOLD = """
import os, sys, time
from spidr.folder_lock import folder_lock
with folder_lock(sys.argv[1], "the test holder"):
    if sys.argv[2] == "fork" and os.fork() == 0:  # a child that outlives its parent, as a data-loader worker may
        time.sleep(30)
        os._exit(0)
    print("holding", flush=True)
    time.sleep(30)
"""


def _holder(folder, mode: str = "plain") -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), mode], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    assert process.stdout.readline() == "holding\n"
    return process


def test_another_process_is_refused_by_name_until_the_holder_ends(tmp_path):
    holder = _holder(tmp_path)
    try:
        refusal = rf"the job is being run by process {holder.pid} \(.*\.lock is locked\)"
        with pytest.raises(ValueError, match=refusal), folder_lock(tmp_path, "the job"):
            pass
    finally:
        holder.terminate()
        holder.wait()
        holder.stdout.close()
    with folder_lock(tmp_path, "the job"):
        assert (tmp_path / ".lock").read_text() == f"process {os.getpid()}\n"


def test_a_killed_holder_frees_the_folder_though_its_forked_child_lives(tmp_path):
    holder = _holder(tmp_path, "fork")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    try:
        deadline = time.monotonic() + 10
        while True:  # the kernel releases the lock when the killed process is gone, not later
            try:
                with folder_lock(tmp_path, "the rerun"):
                    break
            except ValueError:
                assert time.monotonic() < deadline, "the lock outlived its holder"
                time.sleep(0.05)
        assert time.monotonic() < deadline - 8  # at once: not when the child (30 s) ends
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)


def test_a_file_system_without_locks_is_worked_on_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = False
    with caplog.at_level("WARNING", logger="spidr"), folder_lock(tmp_path, "the job"):
        ran = True
    assert ran
    assert "cannot lock" in caplog.text
    assert "No locks available" in caplog.text


def test_an_output_is_locked_beside_it_alone_and_its_lock_file_goes_at_the_end(tmp_path):
    out = tmp_path / "units.jsonl"
    with output_lock(out, "the units command"):
        assert (tmp_path / ".units.jsonl.lock").read_text() == f"process {os.getpid()}\n"
        # a second holder (another open of the file: flock locks are per open, so this process counts as another)
        refusal = rf"the units command is being run by process {os.getpid()} \(.*\.units\.jsonl\.lock is locked\)"
        with pytest.raises(ValueError, match=refusal), output_lock(out, "the units command"):
            pass
        with output_lock(tmp_path / "other.jsonl", "another output of that folder"):  # not blocked by the first
            pass
    assert list(tmp_path.iterdir()) == []
    with output_lock(tmp_path / "new" / "deeper" / "c.safetensors", "a command"):  # its folder is made
        assert (tmp_path / "new" / "deeper" / ".c.safetensors.lock").is_file()


def test_the_lock_file_a_killed_holder_left_is_taken_and_removed(tmp_path):
    (tmp_path / ".out.lock").write_text("process 999999999\n")
    with output_lock(tmp_path / "out", "the rerun"):
        assert (tmp_path / ".out.lock").read_text() == f"process {os.getpid()}\n"
    assert not (tmp_path / ".out.lock").exists()


def test_a_lock_file_removed_by_its_holder_between_open_and_lock_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    """The holder unlinks the file when it ends; a process that had opened it just before then locks a file that no
    longer has the name. It must start again on the new file, or it and a third process would both hold "the"
    lock."""
    import fcntl

    lock_file, real_flock, calls = tmp_path / ".out.lock", fcntl.flock, []

    def holder_ends_meanwhile(handle, operation):
        calls.append(operation)
        if len(calls) == 1:
            lock_file.unlink()  # as the holder's end does, after this process opened the file
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", holder_ends_meanwhile)
    with output_lock(tmp_path / "out", "the job"):
        assert len(calls) == 2
        assert lock_file.read_text() == f"process {os.getpid()}\n"  # the lock held is the file of that name
        with pytest.raises(ValueError, match="is being run by"), output_lock(tmp_path / "out", "a third"):
            pass
