"""``spidr.child_processes``: workers of a pool (the corpus synthesis's) end with their parent, even on kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")


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
