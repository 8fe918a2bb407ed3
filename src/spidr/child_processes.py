"""Child processes that end with their parent, even when it is killed with ``kill -9``.

A killed parent otherwise leaves its children running: a learning curve's training points, the synthesis workers
of a corpus, or torchrun's workers, which go on writing into folders that a rerun, started at once, is working in
too. On Linux the kernel
sends the child a signal when its parent dies (``PR_SET_PDEATHSIG``); elsewhere nothing is done.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ChildProcessesFailedError(RuntimeError):
    """Child processes of a command failed (each named with its log): the command says so in one line, exit 1."""


def start_child(command: Sequence[str], *, stdout: Any, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``command`` in a child process that gets SIGTERM when this one dies (a trainer then saves a checkpoint and
    stops at the next step)."""
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, env=env, **_ending_with_this_process())


def run_child(command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(command, **kwargs)`` in a child that gets SIGTERM when this process dies: a speech engine
    (festival speaks a batch of 16 utterances in one run, seconds) no longer runs on after the synthesis worker or
    command that started it was killed or stopped by a signal to it alone (``kill PID``, a pool's terminate)."""
    return subprocess.run(command, **kwargs, **_ending_with_this_process())  # noqa: PLW1510 (the caller's check=)


def _ending_with_this_process() -> dict[str, Any]:
    """The ``subprocess`` arguments that give a child SIGTERM when this process dies (Linux; none elsewhere)."""
    if sys.platform != "linux":
        return {}
    prctl = _prctl()  # looked up here: the child runs only prctl and getppid before its exec
    return {"preexec_fn": functools.partial(_die_with_parent, prctl, os.getpid())}


def end_with_parent(parent: int) -> None:
    """Run first in a worker process (a ``multiprocessing`` pool's initializer, with ``parent = os.getpid()`` of the
    process that makes the pool): the worker gets SIGTERM when its parent dies."""
    if sys.platform == "linux":
        _die_with_parent(_prctl(), parent)


def end_with_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """In a process that torchrun started (its agent sets ``TORCHELASTIC_RUN_ID`` in every worker's environment):
    SIGTERM when torchrun dies, as when its own children die with it; returns whether it applied. torchrun forwards a
    SIGTERM or Ctrl-C to its workers, but a ``kill -9`` of it (or the OOM killer) left them running: training on,
    holding their GPUs, writing checkpoints into the run folder that a rerun then takes. Now they get the signal a
    trainer takes as a stop request (a checkpoint, then exit); an extraction resumes where it stopped."""
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in environ:
        return False
    end_with_parent(os.getppid())
    return True


def _prctl() -> Callable[..., int]:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(prctl: Callable[..., int], parent: int) -> None:
    """In the child: SIGTERM when the parent dies; exit now if it died already (no signal would come)."""
    prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:
        os._exit(1)
