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
