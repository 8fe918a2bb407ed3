"""benchmarks/train_step.py, the CPU step benchmark: each job runs the trainer's step in its own processes (timing,
live memory) and its row holds finite positive numbers; the FLOP count does not depend on the AdamW implementation;
ratios are per config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_rows_of_two_adamw_implementations(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--configs", "bench-small", "--dtypes", "float32", "--adamw", "for-loop",
         "fused", "--batch", "1", "--seconds", "1", "--warmup", "0", "--steps", "1", "--threads", "1",
         "--json", str(out)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [(r["config"], r["dtype"], r["adamw"], r["trim_heap"]) for r in rows] == [
        ("bench-small", "float32", "for-loop", "auto"), ("bench-small", "float32", "fused", "auto")]
    for row in rows:
        for name in ("step_s", "audio_s_per_s", "gflop_per_step", "matmul_gflops", "mfu", "peak_rss_gib",
                     "peak_live_gib", "infer_s_per_10s", "time_vs_first"):
            assert math.isfinite(row[name]), (row["adamw"], name, row[name])
            assert row[name] > 0, (row["adamw"], name, row[name])
        assert row["audio_s_per_s"] == 1.0 / row["step_s"]
    assert rows[0]["time_vs_first"] == 1.0
    assert rows[0]["gflop_per_step"] == rows[1]["gflop_per_step"]
    assert "| bench-small | float32 | fused | auto |" in done.stdout


def test_a_grouped_conv_backward_counts_twice_its_forward() -> None:
    """Hand count: Conv1d(768, 768, 19, groups=16) on 50 frames is 2 · 50 · 19 · 768 · 48 = 70.04 MFLOP forward;
    its backward (input and weight gradients) twice that. torch's own formula counted the weight gradient × 16
    (1,190.7 MFLOP), which made a SpidR step's count about 10 % too high."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(BENCHMARK.parent))
    try:
        from train_step import FLOP_FORMULAS
    finally:
        sys.path.remove(str(BENCHMARK.parent))
    conv = torch.nn.Conv1d(768, 768, 19, groups=16, padding=9)
    frames = torch.randn(1, 768, 50, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        conv(frames).sum().backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    forward = 2 * 50 * 19 * 768 * (768 // 16)
    assert counts["aten.convolution"] == forward
    assert counts["aten.convolution_backward"] == 2 * forward
