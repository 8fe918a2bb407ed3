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


def test_an_output_name_at_the_file_system_limit_is_locked_by_a_short_lock_name(tmp_path):
    """Truth (a name may be 255 bytes; ".<name>.lock" adds 6): a 249-byte name gets ".<name>.lock" (255 bytes),
    and a longer one, up to 255 bytes, still gets a lock (a shorter name, not ENAMETOOLONG), removed at the end."""
    at_limit = "a" * 243 + ".jsonl"  # 249 bytes
    with output_lock(tmp_path / at_limit, "a command"):
        assert [path.name for path in tmp_path.iterdir()] == [f".{at_limit}.lock"]
    for name in ("b" * 244 + ".jsonl", "é" * 124 + ".jsonl", "c" * 249 + ".jsonl"):  # 250, 254, 255 bytes
        with output_lock(tmp_path / name, "a command"):
            (lock,) = tmp_path.iterdir()
            assert lock.read_text() == f"process {os.getpid()}\n"
            assert len(lock.name.encode()) <= 255
            with pytest.raises(ValueError, match="is being run by"), output_lock(tmp_path / name, "again"):
                pass
        assert list(tmp_path.iterdir()) == []


def test_an_output_lock_file_is_removed_while_the_lock_is_still_held(tmp_path, monkeypatch):
    """Truth (the docstring of _locked): the file is unlinked *while still held*. Unlinked after the release, it
    could be another process's freshly locked file, and a third process would then lock a new file of that name
    while the second still holds its own: two writers."""
    import fcntl
    import pathlib

    lock_file, real_unlink, seen = tmp_path / ".out.lock", pathlib.Path.unlink, []

    def unlink(self, *args, **kwargs):
        if self == lock_file:
            with open(self, "a+") as other:  # another open: refused while this process still holds the lock
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append("free")
                except BlockingIOError:
                    seen.append("held")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    with output_lock(tmp_path / "out", "the job"):
        pass
    assert seen == ["held"]
    assert not lock_file.exists()


def test_a_command_s_outputs_stay_locked_until_it_ends_and_are_checked_under_the_lock(tmp_path, monkeypatch):
    """Truth (check_new_output's docstring): inside a command's run the output is locked *first* and stays locked
    until the command ends. A lock released at once would let a second start pass while the first still computes;
    an existence check made before the lock would let a start that waited out the first one's end replace its
    result."""
    from spidr import cli_types

    out = tmp_path / "c.safetensors"
    with cli_types.outputs_held_until_done():
        assert cli_types.check_new_output(out, overwrite=False) == out
        with pytest.raises(ValueError, match=rf"a second start is being run by process {os.getpid()}"), \
                output_lock(out, "a second start"):
            pass
        out.write_bytes(b"result")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.safetensors"]  # the lock file went at the end
    out.unlink()

    @contextlib.contextmanager
    def first_run_finishes_meanwhile(path, what):  # the first holder writes its result and ends just then
        path.write_bytes(b"the first run's result")
        with output_lock(path, what):
            yield

    monkeypatch.setattr(cli_types, "output_lock", first_run_finishes_meanwhile)
    with pytest.raises(ValueError, match="already exists"), cli_types.outputs_held_until_done():
        cli_types.check_new_output(out, overwrite=False)
    assert out.read_bytes() == b"the first run's result"


def test_an_output_given_as_dot_or_through_dot_dot_is_locked_under_its_real_name(tmp_path, monkeypatch):
    """``--out .`` (a submission or export folder) has no name to lock beside; it failed with "PosixPath('.') has an
    empty name". It is the folder's own name; and ``sub/..`` spells the same place, so it is the same lock."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    with output_lock(".", "the submission"):
        assert (tmp_path / ".sub.lock").is_file()
        with pytest.raises(ValueError, match="is being run by"), output_lock(tmp_path / "sub" / ".." / "sub", "x"):
            pass
    assert not (tmp_path / ".sub.lock").exists()


def test_without_locks_an_output_leaves_no_lock_file_behind(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="spidr"), output_lock(tmp_path / "out.txt", "the job"):
        pass
    assert "cannot lock" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_an_output_whose_folder_takes_no_lock_file_is_written_unguarded_with_a_warning(tmp_path, monkeypatch,
                                                                                        caplog):
    """``lm-score LM UNITS .`` in one's own folder of a shared tree: the lock goes beside the output, in a folder
    the user may not write to, and the command failed before any work though its output was writable."""
    from pathlib import Path

    real_open = Path.open

    def no_lock_files(self, *args, **kwargs):
        if self.name.endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_lock_files)
    ran = False
    with caplog.at_level("WARNING", logger="spidr"), output_lock(tmp_path / "submission", "lm-score"):
        ran = True
    assert ran
    assert "cannot make the lock" in caplog.text
    assert "Permission denied" in caplog.text
    with pytest.raises(PermissionError), folder_lock(tmp_path, "a folder's own writer"):  # it cannot write there
        pass


def test_an_output_named_twice_by_one_command_is_named_as_such(tmp_path):
    """`lm-correlate --out r.csv --plot r.csv` was refused as "being run by process <its own pid>"."""
    from spidr.cli_types import check_new_output, outputs_held_until_done

    with outputs_held_until_done():
        check_new_output(tmp_path / "r.csv", overwrite=False)
        with pytest.raises(ValueError, match=r"sub/\.\./r\.csv is named twice as an output of this command"):
            check_new_output(tmp_path / "sub" / ".." / "r.csv", overwrite=True)
        check_new_output(tmp_path / "plot.png", overwrite=False)
    assert list(tmp_path.iterdir()) == []  # every lock gone with the command


def test_an_output_named_twice_in_two_relative_spellings_is_named_as_such(tmp_path, monkeypatch):
    """`--out r.csv --plot ./r.csv` from the output's folder: the first name is relative, the second spelt
    otherwise; both are the same file (truth: one path relative to the current folder)."""
    from spidr.cli_types import check_new_output, outputs_held_until_done

    monkeypatch.chdir(tmp_path)
    with outputs_held_until_done():
        check_new_output("r.csv", overwrite=False)
        with pytest.raises(ValueError, match=r"r\.csv is named twice as an output of this command"):
            check_new_output(tmp_path / "r.csv", overwrite=False)


# A refused command leaves no empty folder ----------------------------------------------------------------------
def _fails_inside(lock: contextlib.AbstractContextManager, then=lambda: None) -> None:
    """Enter ``lock``, run ``then`` and raise, as a command refused under its lock."""
    with lock:
        then()
        raise RuntimeError("refused")


def test_a_folder_made_for_a_block_that_fails_goes_with_its_parents_and_lock(tmp_path):
    """A run refused after its folder was locked (a missing manifest) left `runs/project/name/.lock`; the folders
    the lock made go, the one that was there stays."""
    folder = tmp_path / "runs" / "p" / "name"
    with pytest.raises(RuntimeError):
        _fails_inside(folder_lock(folder, "the test"), (folder / ".lock").read_text)  # (it is there meanwhile)
    assert list(tmp_path.iterdir()) == []
    with folder_lock(tmp_path / "runs" / "name", "the test"):  # a block that ends well keeps its folder
        pass
    assert (tmp_path / "runs" / "name" / ".lock").is_file()


def test_a_failed_block_keeps_what_it_wrote_and_what_was_there(tmp_path):
    with pytest.raises(RuntimeError):  # a checkpoint of a run that failed later
        _fails_inside(folder_lock(tmp_path / "made", "the test"), (tmp_path / "made" / "step_1.pt").touch)
    assert sorted(p.name for p in (tmp_path / "made").iterdir()) == ["step_1.pt"]  # (the lock it made: gone)
    (tmp_path / "there").mkdir()
    with pytest.raises(RuntimeError):
        _fails_inside(folder_lock(tmp_path / "there", "the test"))
    assert list((tmp_path / "there").iterdir()) == []  # (the user's folder, empty before: it stays, and so empty)
    made = [tmp_path / "a" / "b", tmp_path / "a"]  # what a caller made before it locked
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        _fails_inside(folder_lock(tmp_path / "a" / "b", "the test", made=made))
    assert not (tmp_path / "a").exists()


def test_a_waiter_whose_holder_removed_the_folder_makes_it_again_and_holds_the_new_lock(tmp_path):
    """The waiting process had opened the lock file that the failing holder then unlinked with its folder: it must
    not hold a lock on a file that no longer has the name, which a third process would take beside it."""
    import threading

    folder = tmp_path / "out"
    started, waiting = threading.Event(), threading.Event()
    seen = {}

    def waiter() -> None:
        started.wait()
        waiting.set()
        with folder_lock(folder, "the waiter", wait=True):
            lock = folder / ".lock"
            seen["same"] = os.path.samestat(os.stat(lock), os.stat(lock))  # (the name leads to a file)
            seen["holder"] = lock.read_text().strip()
            seen["files"] = sorted(p.name for p in folder.iterdir())

    def until_the_waiter_waits() -> None:
        started.set()
        waiting.wait()
        time.sleep(0.3)  # the waiter has opened the lock file and blocks on it

    thread = threading.Thread(target=waiter)
    thread.start()
    with pytest.raises(RuntimeError):
        _fails_inside(folder_lock(folder, "the first"), until_the_waiter_waits)
    thread.join(10)
    assert seen == {"same": True, "holder": f"process {os.getpid()}", "files": [".lock"]}
    assert (folder / ".lock").is_file()


def test_an_output_s_folders_made_for_a_refused_command_go_and_stay_when_it_wrote(tmp_path):
    output = tmp_path / "new" / "sub" / "c.safetensors"

    def made_meanwhile() -> None:
        assert (tmp_path / "new" / "sub").is_dir()

    with pytest.raises(RuntimeError):
        _fails_inside(output_lock(output, "x"), made_meanwhile)
    assert list(tmp_path.iterdir()) == []
    with output_lock(output, "x"):
        output.write_text("centroids")
    assert [p.name for p in (tmp_path / "new" / "sub").iterdir()] == ["c.safetensors"]


def test_a_command_interrupted_in_a_folder_made_for_it_leaves_none(tmp_path):
    """Ctrl-C (a KeyboardInterrupt, no Exception) before anything was written: the made folders go too."""

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fails_inside(folder_lock(tmp_path / "runs" / "name", "the test"), interrupt)
    assert list(tmp_path.iterdir()) == []


def _flock_as_on_nfs(monkeypatch):
    """NFS clients emulate flock with POSIX locks, which grant an exclusive lock only on a file opened for writing
    (flock(2)); elsewhere the attempt fails with EBADF."""
    import errno
    import fcntl

    real_flock = fcntl.flock

    def flock(handle, operation):
        fd = handle if isinstance(handle, int) else handle.fileno()
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


def test_a_running_holder_is_seen_where_exclusive_locks_need_a_writable_file(tmp_path, monkeypatch):
    """lock_holder is asked before a restart removes what a running part writes: where (as on NFS) an exclusive lock
    needs a file opened for writing, a read-only attempt failed and the running holder read as none."""
    from spidr.folder_lock import lock_holder

    holder = _holder(tmp_path)
    try:
        _flock_as_on_nfs(monkeypatch)
        assert lock_holder(tmp_path) == f"process {holder.pid}"
    finally:
        holder.terminate()
        holder.wait()
        holder.stdout.close()
    assert lock_holder(tmp_path) is None


def test_dead_writers_temporaries_are_swept_where_exclusive_locks_need_a_writable_file(tmp_path, monkeypatch):
    from spidr import atomic_files

    dead = tmp_path / ".out.txt.0e0e0e0e.partial"
    dead.write_text("half")
    _flock_as_on_nfs(monkeypatch)
    atomic_files._SWEPT.discard(os.path.abspath(tmp_path))
    atomic_files.write_atomically(tmp_path / "out.txt", "whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_failed_block_removes_the_lock_it_made_from_a_folder_that_holds_files(tmp_path):
    """A user's folder holding files of theirs: a refused command added `.lock` to it; a lock that was there before
    (an earlier run's) stays."""
    (tmp_path / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError):
        _fails_inside(folder_lock(tmp_path, "the test"))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with folder_lock(tmp_path, "the test"):  # a run that ended well: its lock stays, as a finished run's does
        pass
    with pytest.raises(RuntimeError):
        _fails_inside(folder_lock(tmp_path, "the test"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.txt"]


def test_a_failed_block_removes_a_stale_lock_that_was_all_its_folder_held(tmp_path):
    """Truth (folder_lock's docstring): on a failed block the lock is removed "if this call made it or the folder
    holds nothing else". A run killed with -9 just after locking leaves a folder holding only `.lock`; a rerun
    refused there must not leave it behind (the user's folder, existing before, stays)."""
    from spidr.folder_lock import folder_lock

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text("process 999999999\n")
    with pytest.raises(RuntimeError), folder_lock(folder, "the rerun"):
        raise RuntimeError("refused")
    assert folder.is_dir()
    assert list(folder.iterdir()) == []


def test_an_output_lock_whose_command_wrote_nothing_leaves_no_folder_it_made(tmp_path):
    """Truth (output_lock: the folders made for it go while empty, "one that wrote its output leaves it in place"):
    a command that ended without writing its output (nothing to do) leaves no empty folders and no lock file."""
    from spidr.folder_lock import output_lock

    with output_lock(tmp_path / "new" / "sub" / "units.jsonl", "the units command"):
        assert (tmp_path / "new" / "sub" / ".units.jsonl.lock").is_file()
    assert list(tmp_path.iterdir()) == []
