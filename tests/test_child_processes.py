"""``spidr.child_processes``: workers of a pool (the corpus synthesis's) end with their parent, even on kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

POOL = """
import multiprocessing, os, sys, time
from spidr.child_processes import end_with_parent

if __name__ == "__main__":
    with multiprocessing.get_context("spawn").Pool(2, initializer=end_with_parent, initargs=(os.getpid(),)) as pool:
        pool.map_async(time.sleep, [30, 30])  # busy workers: idle ones would leave on their closed pipe anyway
        time.sleep(1)
        print(*(worker.pid for worker in pool._pool), flush=True)
        time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's parent-death signal is Linux's")
def test_pool_workers_end_with_a_killed_parent(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert workers
    assert all(_alive(pid) for pid in workers)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers):  # (zombies reaped by init count as gone once they are)
        assert time.monotonic() < deadline, "the pool's workers outlived their killed parent"
        time.sleep(0.05)


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="fork, PR_SET_PDEATHSIG and /proc are Linux's")


@linux_only
def test_a_child_whose_parent_died_before_the_death_signal_was_set_exits_at_once():
    """Truth (_die_with_parent): a parent that died before prctl sends no signal, so the child must exit itself
    (status 1) rather than run on; a child whose parent lives goes on."""
    code = ("import sys\nfrom spidr.child_processes import _die_with_parent\n"
            "_die_with_parent(lambda *args: 0, int(sys.argv[1]))\nprint('went on')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with_parent = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True, text=True,
                                 env=env, check=False)
    assert (with_parent.returncode, with_parent.stdout) == (0, "went on\n")
    orphan = subprocess.run([sys.executable, "-c", code, str(os.getpid() + 1_000_000)], capture_output=True,
                            text=True, env=env, check=False)
    assert (orphan.returncode, orphan.stdout) == (1, "")


@linux_only
def test_a_worker_asks_for_sigterm_when_its_parent_dies(monkeypatch):
    """Truth (module docstring): the signal is SIGTERM, which a trainer takes as a stop request (checkpoint, then
    exit); SIGKILL would lose every step since the last checkpoint."""
    from spidr import child_processes

    calls = []
    monkeypatch.setattr(child_processes, "_prctl", lambda: lambda *args: calls.append(args) or 0)
    child_processes.end_with_parent(os.getppid())
    assert calls == [(child_processes.PR_SET_PDEATHSIG, int(signal.SIGTERM))]


@linux_only
def test_only_torchrun_s_workers_are_tied_to_their_parent_and_to_that_parent(monkeypatch):
    """Truth (end_with_torchrun): torchrun's agent sets TORCHELASTIC_RUN_ID; LOCAL_RANK alone (set by other
    launchers, or by hand) is no torchrun. The process tied to is the parent (torchrun), not this process."""
    from spidr import child_processes

    tied = []
    monkeypatch.setattr(child_processes, "_die_with_parent", lambda prctl, parent: tied.append(parent))
    monkeypatch.setattr(child_processes, "_prctl", lambda: None)
    assert child_processes.end_with_torchrun({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}) is False
    assert tied == []
    assert child_processes.end_with_torchrun({"TORCHELASTIC_RUN_ID": "none", "LOCAL_RANK": "0"}) is True
    assert tied == [os.getppid()]


def _env(*extra: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, extra), *sys.path]), "OMP_NUM_THREADS": "1"}


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie waits for init to reap it: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _in_group(pgid: int) -> list[int]:
    """The running processes of process group ``pgid`` (Linux: /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


# A stand-in for the initialised espeak-ng library: 1 s per utterance, so that the caller can be interrupted (or a
# pool terminated) while the forked child synthesises.
SLOW_LIBRARY = """
import time
from spidr.corpus import espeak

class SlowLibrary:
    sample_rate = 22050
    def synthesize(self, text, voice, rate, *, phonemes):
        time.sleep(1.0)
        return b"\\0\\0" * 100, [(0, "a")]

def slow_espeak():
    espeak._library = lambda: SlowLibrary()
"""


@linux_only
def test_the_espeak_child_never_runs_the_callers_code(tmp_path):
    """espeak.synthesize forks a child per utterance, which must end with os._exit whatever happens. Its result
    write was outside its try: when the caller stopped reading (Ctrl-C in the caller, or the caller killed), the
    BrokenPipeError unwound the caller's stack in the child, which ran the caller's handlers a second time (`spidr
    synth-corpus --jobs 1` with an espeak voice printed "interrupted" and then "error: Broken pipe" for one Ctrl-C,
    and after a kill -9 its orphaned child printed the error and removed the folder lock)."""
    (tmp_path / "slowlib.py").write_text(SLOW_LIBRARY)
    script = textwrap.dedent("""
        import os, signal, time
        from spidr.corpus import espeak
        import slowlib
        slowlib.slow_espeak()

        def interrupt(*_):
            raise KeyboardInterrupt  # what Ctrl-C raises in the caller
        signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.3)  # (timers are not inherited by a forked child)
        me = os.getpid()
        try:
            espeak.synthesize("hello", "en-us")
        except BaseException as error:
            print("handled in", "the caller" if os.getpid() == me else "the espeak child", type(error).__name__,
                  flush=True)
        time.sleep(1.5)  # the caller lives on a little (its cleanup, the rest of the command)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(tmp_path),
                            timeout=60, check=False)
    assert result.stdout.splitlines() == ["handled in the caller KeyboardInterrupt"], result.stdout + result.stderr


@linux_only
def test_a_synthesis_pool_ended_by_an_error_leaves_no_espeak_child_behind(tmp_path):
    """run_tasks (synth-corpus, synth-lm-bench, lm-study, the demo) with --jobs > 1: a batch that fails (or Ctrl-C
    to the command alone) terminates the pool while another worker's espeak child synthesises. The worker dies; its
    child got BrokenPipeError on the result pipe, went on as a pool worker in the worker's loop, and then waited for
    ever on the pool's task lock, which the terminating parent holds and never releases; it also kept the
    multiprocessing resource tracker alive. Both ran until killed."""
    (tmp_path / "slowlib.py").write_text(SLOW_LIBRARY + textwrap.dedent("""
        def task(kind):
            if kind == "fail":  # another batch fails (a full disk, say): the pool is terminated
                time.sleep(0.3)
                raise ValueError("this batch failed")
            slow_espeak()
            return espeak.synthesize("hello", "en-us")
    """))
    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent("""
        import time
        from spidr.corpus.synth import run_tasks
        import slowlib

        if __name__ == "__main__":
            try:
                run_tasks(["fail", "espeak"], 2, slowlib.task)  # (results come in order: the failure first)
            except ValueError as error:
                print("run_tasks raised:", error, flush=True)
                time.sleep(2)  # the command handles the error (its handlers run, then it exits)
    """))
    log = tmp_path / "output.txt"
    with log.open("w") as output:  # (a file: a pipe stays open as long as the child that holds it runs)
        command = subprocess.Popen([sys.executable, str(script)], stdout=output, stderr=subprocess.STDOUT,
                                   env=_env(tmp_path), start_new_session=True)
    try:
        command.wait(timeout=60)
        assert "run_tasks raised: this batch failed" in log.read_text(), log.read_text()
        deadline = time.monotonic() + 5
        while _in_group(command.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _in_group(command.pid)
        assert not left, f"processes left running after the command ended: {left}"
    finally:
        for pid in _in_group(command.pid):  # (only the processes of the group this test started)
            os.kill(pid, signal.SIGKILL)
