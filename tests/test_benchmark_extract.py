"""benchmarks/extract.py --mix: LibriSpeech-length FLAC files extracted in float32 and bf16 in separate processes;
the bf16 features stay within a few percent of the fp32 ones, and the table reports both precisions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "extract.py"


def test_mix_compares_float32_and_bf16() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--config", "bench-small", "--mix", "2", "--rounds", "1", "--threads", "1"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    files = re.search(r"2 files, (\d+) s of audio", out)
    assert files, out
    assert 4 <= int(files.group(1)) <= 70, out
    for dtype in ("float32", "bfloat16"):
        row = re.search(rf"{dtype} \|\s+([\d.]+) \|\s+([\d.]+)", out)
        assert row, out
        assert float(row.group(1)) > 0, out
        assert float(row.group(2)) > 0, out
    ratio = re.search(r"bf16 speed / fp32 speed: ([\d.]+)", out)
    assert ratio, out
    assert float(ratio.group(1)) > 0, out
    error = re.search(r"relative error max ([\d.e+-]+), median ([\d.e+-]+) over 12 ", out)  # 2 files x 6 layers
    assert error, out
    assert 0 < float(error.group(2)) <= float(error.group(1)) < 0.1, out


def test_mix_extracts_with_a_checkpoint(tmp_path: Path) -> None:
    """--checkpoint: the features come from the given weights (here a small model written as safetensors)."""
    import torch

    sys.path.insert(0, str(BENCHMARK.parent))
    from train_step import CONFIGS

    from spidr.models import build_model
    from spidr.models.loading import export_safetensors

    torch.manual_seed(0)
    checkpoint = tmp_path / "small.safetensors"
    export_safetensors(build_model(CONFIGS["bench-small"]), checkpoint)
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--checkpoint", str(checkpoint), "--mix", "1", "--rounds", "1",
         "--threads", "1"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"checkpoint {checkpoint}, 1 threads, 1 files"), done.stdout
    assert re.search(r"over 6 \(file, layer\) pairs", done.stdout), done.stdout  # bench-small has 6 layers


def test_codebook_passes_compares_one_forward_pass_with_two() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--config", "bench-small", "--codebook-passes", "--rounds", "2",
         "--short-seconds", "0.5", "--threads", "1"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for path in ("two calls", "one pass"):
        row = re.search(rf"{path} \|\s+([\d.]+)", done.stdout)
        assert row, done.stdout
        assert float(row.group(1)) > 0, done.stdout
    ratio = re.search(r"median of per-round ratios: ([\d.]+)x", done.stdout)
    assert ratio, done.stdout
    assert float(ratio.group(1)) > 0, done.stdout
