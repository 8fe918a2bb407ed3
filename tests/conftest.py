"""Shared test helpers: where ``../shared`` lives, and a marker for tests that need it."""

from __future__ import annotations

import os
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
