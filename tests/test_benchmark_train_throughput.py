"""benchmarks/train_throughput.py, the data-loader benchmark: train() with the DataLoader against train() on the same
batches held in memory. Its stand-in loader must offer what the trainer uses (it lacked the bad-file tracker that the
trainer checks at log steps, so every run crashed, then hung on its workers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def test_both_runs_give_a_throughput_and_their_ratio() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--steps", "1", "--repeats", "1", "--files", "4", "--batch-seconds", "0.5",
         "--crop-seconds", "0.5", "--workers", "0", "--threads", "1"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| measurement")}
    assert float(rows["train() with the DataLoader"]) > 0
    assert float(rows["train() on in-memory batches"]) > 0
    assert rows["ratio"].endswith("%")
