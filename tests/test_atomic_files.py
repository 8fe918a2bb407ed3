"""Files written whole or not at all (spidr.atomic_files)."""

from __future__ import annotations

import errno
import os

import pytest

from conftest import run_python_on_a_full_disk
from spidr import atomic_files
from spidr.atomic_files import failed_write, naming_errors, new_partial_path, replaced_when_done, write_atomically


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
        assert partial != new_partial_path(path)  # each writer its own
        assert partial.name.endswith(".partial")
        assert partial.parent == tmp_path
        assert partial.name.startswith(".")
        partial.write_text("new")
        assert path.read_text() == "old", "the target must not change before the block ends"
    assert path.read_text() == "new"
    assert not partial.exists()
    write_atomically(tmp_path / "other.txt", "text ✓")
    assert (tmp_path / "other.txt").read_text(encoding="utf-8") == "text ✓"


def test_files_get_the_permissions_of_the_umask_whatever_wrote_them(tmp_path):
    """safetensors creates its files 0600: exported models and k-means centroids were unreadable to the rest of a
    group on a shared cluster, where every other output is 0666 less the umask."""
    import os
    import stat

    import torch

    from spidr.eval.kmeans import save_centroids
    from spidr.models import export_safetensors
    from test_models_dinosr import tiny_model

    previous = os.umask(0o027)
    try:
        save_centroids(tmp_path / "c.safetensors", torch.zeros(4, 3))
        export_safetensors(tiny_model("spidr"), tmp_path / "m.safetensors")
        with replaced_when_done(tmp_path / "private") as partial:
            partial.write_text("x")
            os.chmod(partial, 0o600)  # as safetensors leaves it
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(previous)
    assert modes == {"c.safetensors": 0o640, "m.safetensors": 0o640, "private": 0o640}


def test_a_folder_s_default_acl_decides_the_permissions_not_the_umask(tmp_path):
    """In a shared folder with a default ACL a new file gets the ACL's permissions whatever the umask: setting them
    from the umask took the group's access away (0600 where any other new file there is 0664)."""
    import os
    import stat
    import struct

    def entry(tag: int, permissions: int) -> bytes:
        return struct.pack("<HHI", tag, permissions, 0xFFFFFFFF)

    folder = tmp_path / "shared"
    folder.mkdir()
    acl = struct.pack("<I", 2) + entry(0x01, 6) + entry(0x04, 6) + entry(0x20, 4)  # user rw, group rw, other r
    try:
        os.setxattr(folder, "system.posix_acl_default", acl)
    except OSError as error:
        pytest.skip(f"no POSIX ACLs on this file system: {error}")
    previous = os.umask(0o077)
    try:
        (folder / "plain").write_text("x")
        write_atomically(folder / "atomic", "x")
        with replaced_when_done(folder / "made-private") as partial:
            partial.unlink()
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600))  # as safetensors makes its file
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"plain": 0o664, "atomic": 0o664, "made-private": 0o664}


def test_a_figure_saved_over_an_earlier_one_is_whole_or_not_written(tmp_path):
    """Plots (training curves, ABX per layer, the learning curve, LM correlations) go through save_figure: a save
    that fails midway keeps the earlier PNG."""
    from spidr.atomic_files import save_figure
    from spidr.extras import figure

    fig, ax = figure(figsize=(2, 2), purpose="a test plot")
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "plot.png"
    save_figure(fig, path, dpi=50)
    earlier = path.read_bytes()
    assert earlier.startswith(b"\x89PNG")

    class Broken:
        def savefig(self, target, **kwargs):
            fig.savefig(target, **kwargs)
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_figure(Broken(), path, dpi=80)
    assert path.read_bytes() == earlier
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_a_folder_where_the_file_goes_is_named_and_the_temporary_removed(tmp_path):
    """The error named the hidden .<name>.partial, which stayed in the user's folder with the whole content."""
    target = tmp_path / "units.jsonl"
    target.mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        write_atomically(target, "content\n")
    assert caught.value.filename == str(target)
    assert [p.name for p in tmp_path.iterdir()] == ["units.jsonl"]


def test_a_write_error_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """A full disk or a read-only file system gave a traceback from every command that writes."""
    import errno

    from spidr import cli
    from spidr.data import manifest

    (tmp_path / "audio").mkdir()
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "audio" / "a.wav", np.zeros(1600, dtype=np.float32), 16000)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m.csv"))

    monkeypatch.setattr(manifest, "write_manifest", disk_full)
    assert cli.main(["manifest", str(tmp_path / "audio"), str(tmp_path / "m.csv")]) == 2
    assert capsys.readouterr().err.strip().endswith("m.csv: No space left on device")


def test_two_processes_writing_one_file_do_not_publish_each_other_s_halves(tmp_path):
    """Every writer used the name .<name>.partial: the first to finish renamed the other's half-written file into
    place (a units run said it wrote 3000 utterances; the file held about 1000), and the other then failed."""
    import subprocess
    import sys
    import time

    path, go = tmp_path / "out.txt", tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, pathlib\n"
        "from spidr.atomic_files import replaced_when_done\n"
        f"path, go = pathlib.Path({str(path)!r}), pathlib.Path({str(go)!r})\n"
        "with replaced_when_done(path) as partial:\n"
        "    partial.write_text('child: first half ')\n"
        "    (path.parent / 'started').touch()\n"
        "    while not go.exists():\n"
        "        time.sleep(0.01)\n"
        "    with partial.open('a') as handle:\n"
        "        handle.write('second half')\n")],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert child.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.01)
    write_atomically(path, "parent: whole")  # while the child's file is half written
    assert path.read_text() == "parent: whole"
    go.touch()
    assert child.wait(timeout=60) == 0
    assert path.read_text() == "child: first half second half"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out.txt", "started"]


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    """A writer holds a lock on its temporary file while it writes; the first write into a folder in a process
    removes the temporaries nobody holds (their writers were killed), whatever host or PID namespace made them."""
    import subprocess
    import sys

    from spidr import atomic_files

    live, dead = tmp_path / ".out.txt.0a0a0a0a.partial", tmp_path / ".out.txt.0b0b0b0b.partial"
    old = tmp_path / ".out.txt.partial"  # earlier versions' name
    for temporary in (live, dead, old):
        temporary.write_text("half")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"handle = open({str(live)!r}, 'rb')\n"
        "fcntl.flock(handle, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        atomic_files._SWEPT.discard(os.path.abspath(tmp_path))
        write_atomically(tmp_path / "out.txt", "whole")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out.txt"])
        dead.write_text("half")  # swept once per folder and process: not again
        write_atomically(tmp_path / "out.txt", "whole again")
        assert dead.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_file_name_near_the_limit_gets_a_temporary_name_within_it(tmp_path):
    name = "u" * 250 + ".npy"  # 254 bytes: the temporary's prefix and suffix would pass 255
    write_atomically(tmp_path / name, "x")
    assert (tmp_path / name).read_text() == "x"


def test_every_file_name_length_up_to_the_file_system_s_limit_can_be_written(tmp_path):
    """Truth: the file system takes names of up to 255 bytes, so any target name of 1..255 bytes must be
    writable; the temporary adds 18 bytes (".", ".", 8 hex digits, ".partial") and must switch to a hash exactly
    where that would pass 255 (names of 238..255 bytes)."""
    for length in range(230, 256):
        name = "n" * (length - 4) + ".npy"
        write_atomically(tmp_path / name, str(length))
        assert (tmp_path / name).read_text() == str(length)
    assert len(list(tmp_path.iterdir())) == 26


def test_a_user_s_own_file_ending_in_partial_is_not_swept(tmp_path):
    """The sweep removes only this module's hidden temporaries (".<name>.<token>.partial"); a user's file
    that merely ends in ".partial" (a download in progress, say) is not ours to delete."""
    import os as _os

    from spidr import atomic_files

    mine = tmp_path / "corpus.tar.partial"
    mine.write_text("the user's")
    dead = tmp_path / ".out.txt.0c0c0c0c.partial"
    dead.write_text("half")
    atomic_files._SWEPT.discard(_os.path.abspath(tmp_path))
    write_atomically(tmp_path / "out.txt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.tar.partial", "out.txt"]
    assert mine.read_text() == "the user's"


def test_relative_paths_sweep_the_folder_they_name_after_a_change_of_working_folder(tmp_path, monkeypatch):
    """Truth: a relative "out.txt" names a different folder after os.chdir; the first write into each
    folder removes that folder's dead temporaries, however the folder was named."""
    import os as _os

    from spidr import atomic_files

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    dead = second / ".out.txt.0d0d0d0d.partial"
    dead.write_text("half")
    for folder in (first, second):
        atomic_files._SWEPT.discard(_os.path.abspath(folder))
    monkeypatch.chdir(first)
    write_atomically("out.txt", "first")
    monkeypatch.chdir(second)
    write_atomically("out.txt", "second")
    assert not dead.exists()
    assert (first / "out.txt").read_text() == "first"
    assert (second / "out.txt").read_text() == "second"


def test_a_non_ascii_file_name_near_the_limit_gets_a_temporary_within_it(tmp_path):
    """The file system's limit is 255 bytes, not characters: "é" is 2 bytes in UTF-8, so a name of 121
    characters is 246 bytes here, and its temporary (18 more) must be hashed."""
    for count in range(115, 126):  # names of 234..254 bytes
        name = "é" * count + ".npy"
        write_atomically(tmp_path / name, "x")
        assert (tmp_path / name).read_text() == "x"


def test_only_a_writer_s_temporary_is_taken_for_one(tmp_path):
    """lm-study deletes a units folder whole, sparing it only when every file is the study's or a killed writer's
    temporary: a user's file that merely looks like one must not count. Truth: the names new_partial_path makes."""
    from spidr.atomic_files import is_partial_name

    for name in ("train.jsonl", "a.b.c", "x" * 200):
        assert is_partial_name(new_partial_path(tmp_path / name).name), name
    made = new_partial_path(tmp_path / "train.jsonl").name
    for name in ("draft.partial", made[1:], f"{made}.bak", made.removesuffix(".partial"), ".train.jsonl.partial",
                 ".train.jsonl.XYZW1234.partial"):
        assert not is_partial_name(name), name


@pytest.mark.parametrize("writer", ["replaced_when_done", "NpyAppender"])
def test_a_sweep_between_a_temporary_s_making_and_its_lock_costs_nothing(tmp_path, monkeypatch, writer):
    """Three extraction parts started at once: one process's first write into a folder swept it while another had
    made its temporary but not yet locked it, so the file looked like a dead writer's and was removed; the writer then
    failed with FileNotFoundError. Here the sweep is run at that moment (just before the writer's lock), from another
    open file description as another process's would be; the write must still land whole."""
    import fcntl

    import numpy as np

    from spidr import atomic_files
    from spidr.eval.features import NpyAppender

    real_flock, swept = fcntl.flock, []

    def sweep_first(handle, operation):
        if operation == fcntl.LOCK_EX and not swept:  # the writer's blocking lock, not the sweep's LOCK_NB
            swept.append(sorted(p.name for p in tmp_path.iterdir()))
            atomic_files._SWEPT.discard(os.path.abspath(tmp_path))
            atomic_files._sweep_once(tmp_path)
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", sweep_first)
    if writer == "replaced_when_done":
        write_atomically(tmp_path / "out.txt", "whole")
        assert (tmp_path / "out.txt").read_text() == "whole"
    else:
        appender = NpyAppender(tmp_path / "out.npy", 2, 3)
        appender[0:2] = np.arange(6, dtype=np.float32).reshape(2, 3)
        appender.close()
        np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.arange(6).reshape(2, 3))
    assert len(swept) == 1
    assert len(swept[0]) == 1  # the sweep did run while the (unlocked) temporary was there
    assert [p.name for p in tmp_path.iterdir()] == [f"out.{'txt' if writer == 'replaced_when_done' else 'npy'}"]


def _replace_noting_whether_locked(refused: list[bool]):
    """``os.replace`` that first notes in ``refused`` whether a non-blocking lock of the source, from another open
    file description, is refused (True: its writer still holds it)."""
    import fcntl

    real_replace = os.replace

    def replace(source, target):
        with open(source, "rb") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                refused.append(False)
            except BlockingIOError:
                refused.append(True)
        return real_replace(source, target)

    return replace


def test_a_finished_npy_is_renamed_while_still_locked(tmp_path, monkeypatch):
    """NpyAppender.close renames the temporary before it lets go of its lock: a sweep in between would remove a
    complete file. Truth: at the rename, a non-blocking lock from another open file description is refused."""
    import numpy as np

    from spidr.eval import features

    refused: list[bool] = []
    monkeypatch.setattr(features.os, "replace", _replace_noting_whether_locked(refused))
    appender = features.NpyAppender(tmp_path / "out.npy", 1, 2)
    appender[0:1] = np.ones((1, 2), dtype=np.float32)
    appender.close()
    assert refused == [True]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.ones((1, 2)))


def test_a_writer_s_temporary_has_exactly_eight_hex_digits(tmp_path):
    """Truth: new_partial_path's names are ".<name>.<8 hex digits>.partial" (secrets.token_hex(4)); a user's hidden
    file with a shorter or longer hex part is not a writer's temporary (lm-study deletes folders on that answer)."""
    from spidr.atomic_files import is_partial_name

    assert is_partial_name(".train.jsonl.0123abcd.partial")
    for name in (".train.jsonl.abc.partial", ".train.jsonl.0123abc.partial", ".train.jsonl.0123abcde.partial",
                 ".notes.1.partial"):
        assert not is_partial_name(name), name


def test_a_write_interrupted_by_ctrl_c_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path):
    """Truth (replaced_when_done: "otherwise it is removed and path is left as it was"): a KeyboardInterrupt is no
    Exception, and must still remove the half-written temporary."""
    from spidr.atomic_files import replaced_when_done

    path = tmp_path / "units.jsonl"
    path.write_text("earlier\n")

    def interrupted_write() -> None:
        with replaced_when_done(path) as partial:
            partial.write_text("half of the new")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_write()
    assert path.read_text() == "earlier\n"
    assert [p.name for p in tmp_path.iterdir()] == ["units.jsonl"]


def test_a_finished_write_is_renamed_while_its_temporary_is_still_locked(tmp_path, monkeypatch):
    """Truth (new_held_partial: the lock is "the sign, for other processes' sweeps, that its writer lives"): at the
    rename, another open file description's non-blocking lock is refused; released first, a sweep in between removes
    the complete file and the rename fails."""
    from spidr import atomic_files

    refused: list[bool] = []
    monkeypatch.setattr(atomic_files.os, "replace", _replace_noting_whether_locked(refused))
    atomic_files.write_atomically(tmp_path / "out.txt", "whole")
    assert refused == [True]
    assert (tmp_path / "out.txt").read_text() == "whole"


def test_a_failed_write_names_the_user_s_file_not_none_nor_the_temporary(tmp_path, monkeypatch) -> None:
    """Was a defect (res34): on a full disk 'spidr kmeans: error: File too large' (units, manifest, plot-training
    alike) named no file; in a read-only folder 'error: /ro/.c.safetensors.4a22dcb3.partial: Read-only file system'
    named a hidden temporary the user never asked for."""
    target = tmp_path / "c.safetensors"
    with pytest.raises(OSError, match="No space left") as caught, replaced_when_done(target):
        raise OSError(errno.ENOSPC, "No space left on device")  # (as a write's error: no file named)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []

    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(atomic_files.os, "open", read_only)
    with pytest.raises(OSError, match="Read-only") as caught, replaced_when_done(target):
        pass
    assert caught.value.errno == errno.EROFS
    assert caught.value.filename == str(target)


def test_a_copy_cut_by_a_full_disk_names_the_user_s_file_not_the_hidden_temporary(tmp_path) -> None:
    """Was a defect (diff34): shutil.copyfile's sendfile error carries filename=source and filename2=destination (the
    hidden partial): the cli prints filename2, so `spidr lm-units --oracle` on a full disk said 'error:
    OUT/lexical/.test.jsonl.6593cb58.partial: No space left on device' (reproduced on a tmpfs)."""
    source, target = tmp_path / "source.jsonl", tmp_path / "out" / "test.jsonl"
    source.write_bytes(b"x" * 100_000)
    target.parent.mkdir()
    result = run_python_on_a_full_disk(50_000, f"""
        import shutil
        from spidr.atomic_files import replaced_when_done
        try:
            with replaced_when_done({str(target)!r}) as partial:
                shutil.copyfile({str(source)!r}, partial)
        except OSError as error:
            print(error.filename2 or error.filename)
    """)
    assert result.stdout.strip() == str(target), result.stdout + result.stderr
    assert list(target.parent.iterdir()) == []


def test_an_error_naming_the_hidden_partial_names_the_user_s_file_and_leaves_nothing(tmp_path) -> None:
    """A writer that opens the partial by name (open(partial, "wb") on a full disk, in a folder made read-only)
    raises an OSError naming the hidden temporary: the user's file is named instead, the partial is gone."""
    target = tmp_path / "units.jsonl"
    with pytest.raises(OSError, match="No space left") as caught, replaced_when_done(target) as partial:
        raise OSError(errno.ENOSPC, "No space left on device", str(partial))
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(target)
    assert ".partial" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_naming_errors_names_only_errors_that_name_no_file(tmp_path) -> None:
    """naming_errors names its path on an OSError that names no file, and leaves one that names another file as it
    is (a missing source file is that file's fault, not the output's)."""
    output, source = tmp_path / "config.json", tmp_path / "missing.bin"
    with pytest.raises(OSError, match="No space left") as caught, naming_errors(output):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == str(output)
    with pytest.raises(FileNotFoundError) as caught, naming_errors(output):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(source))
    assert caught.value.filename == str(source)


def test_failed_write_is_none_for_an_error_that_is_neither_an_os_nor_a_runtime_error(tmp_path) -> None:
    """Only an OSError, or torch's RuntimeError around one, is a failed write; any other error raised while an
    OSError was being handled (a bug in the handler) is not turned into a disk error."""
    path = tmp_path / "final.pt"
    disk_error = OSError(errno.ENOSPC, "No space left on device")
    bug, wrapped = ValueError("a bug while handling it"), RuntimeError("unexpected pos 64 vs 0")
    bug.__context__ = wrapped.__context__ = disk_error  # (as `raise ... from None` in an except block leaves them)
    bug.__suppress_context__ = wrapped.__suppress_context__ = True
    assert failed_write(bug, path) is None
    failed = failed_write(wrapped, path)
    assert isinstance(failed, OSError)
    assert (failed.errno, failed.filename) == (errno.ENOSPC, str(path))
