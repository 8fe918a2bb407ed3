"""``spidr.folder_lock``: one process at a time per folder, refused by name, free again however the holder ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from spidr.folder_lock import folder_lock

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
