"""Shared test helpers: where ``../shared`` lives, and a marker for tests that need it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPIDR_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "fixtures" / "reference"
GOLDEN = SHARED / "golden"

# A user's clone has no ../shared: tests that read it skip cleanly there.
requires_shared = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"{REFERENCE} is absent (no ../shared)")

# Test models are tiny: one intra-op thread is fastest and keeps results independent of the machine's load.
torch.set_num_threads(1)


def run_python_on_a_full_disk(size_limit: int, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` (Python; spidr and tests/ importable) in a child whose files cannot grow past ``size_limit``
    bytes: a write past it fails with EFBIG, as a write to a full disk fails with ENOSPC (no mount, no root)."""
    script = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, ({size_limit}, resource.RLIM_INFINITY))
    """) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          check=False)
