"""Child processes that end with their parent, even when it is killed with ``kill -9``.

A killed parent otherwise leaves its children running: a learning curve's training points, or the synthesis workers
of a corpus, which go on writing into folders that a rerun, started at once, is working in too. On Linux the kernel
sends the child a signal when its parent dies (``PR_SET_PDEATHSIG``); elsewhere nothing is done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def start_child(command: Sequence[str], *, stdout: Any, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``command`` in a child process that gets SIGTERM when this one dies (a trainer then saves a checkpoint and
    stops at the next step)."""
    if sys.platform != "linux":
        return subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, env=env)
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child runs only prctl before its exec
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(1)

    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=die_with_parent)  # noqa: PLW1509 -- runs only prctl and getppid


def end_with_parent(parent: int) -> None:
    """Run first in a worker process (a ``multiprocessing`` pool's initializer, with ``parent = os.getpid()`` of the
    process that makes the pool): the worker gets SIGTERM when its parent dies."""
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)
