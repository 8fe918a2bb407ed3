"""spidr's ABX against fastabx, side by side on the same files: wall time, CPU time, peak RSS and the score.

The task is ``benchmarks/abx.py``'s synthetic triphone set (≈ 35k items per hour of 50 Hz, 768-dimensional
features), written once as ``.npy`` files and an item file under ``--work`` (``benchmarks/scale.py abx`` uses the same
cache). Each (tool, speaker mode, round) runs in a fresh process that reads the item file and the features and
scores them (triphone, context within, angular distance, max_size_group 10, max_x_across 5), and the tools alternate
within every round, so that a noisy machine slows both alike; the table gives the median over rounds and the ratio.

fastabx needs Python ≥ 3.12 on PyPI; point ``--fastabx-python`` at any interpreter that imports it (a venv of its
own). Without it, only spidr is timed. (The README's figures used fastabx and torchdtw built from source on Python
3.11 with torch 2.13: their PEP 695 type aliases rewritten as plain assignments, and the DTW lengths passed as int64,
which that torchdtw build reads.)

    .venv/bin/python benchmarks/abx_vs_fastabx.py --hours 1 --rounds 3 --fastabx-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# Each child prints one JSON line: seconds and CPU seconds of read + score, its peak RSS, and the error rate.
_SPIDR = """
import json, resource, sys, time, torch
from spidr.eval.abx import abx
from spidr.eval.feature_dir import FeatureDirectory
from spidr.eval.items import read_items
folder, speaker, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
start, cpu = time.perf_counter(), time.process_time()
result = abx(FeatureDirectory(folder + "/features"), read_items(folder + "/triphone.item"), speaker=speaker,
             context="within", distance="angular", max_size_group=10, max_x_across=5)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                  "error_percent": 100 * result.error_rate}))
"""

_FASTABX = """
import json, resource, sys, time, numpy as np, torch
from fastabx import zerospeech_abx
folder, speaker, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
start, cpu = time.perf_counter(), time.process_time()
score = zerospeech_abx(folder + "/triphone.item", folder + "/features", speaker=speaker, context="within",
                       distance="angular", max_size_group=10, max_x_across=5, frequency=50,
                       feature_maker=lambda path: torch.from_numpy(np.load(path)), extension=".npy")
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                  "error_percent": 100 * score}))
"""


def run_child(python: str, code: str, folder: Path, speaker: str, threads: int) -> dict[str, float]:
    done = subprocess.run([python, "-c", code, str(folder), speaker, str(threads)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=1.0, help="hours of synthetic 50 Hz features")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per (tool, mode)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of every child")
    parser.add_argument("--modes", default="within,across", help="speaker modes, comma separated")
    parser.add_argument("--work", default="/tmp/spidr-scale", help="cache folder of the synthetic task")
    parser.add_argument("--fastabx-python", help="an interpreter that can import fastabx")
    args = parser.parse_args(argv)

    work = Path(args.work)
    folder = work / f"abx-{args.hours:g}h"
    if not (folder / "done").is_file():
        subprocess.run([sys.executable, str(Path(__file__).with_name("scale.py")), "--prepare-abx", str(args.hours),
                        "--work", str(work)], check=True)
    tools = {"spidr": (sys.executable, _SPIDR)}
    if args.fastabx_python:
        tools["fastabx"] = (args.fastabx_python, _FASTABX)

    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_index in range(args.rounds):
        for speaker in args.modes.split(","):
            # Alternate which tool goes first, so neither always runs on a warmer page cache.
            order = list(tools) if round_index % 2 == 0 else list(reversed(tools))
            for tool in order:
                python, code = tools[tool]
                result = run_child(python, code, folder, speaker, args.threads)
                runs.setdefault((tool, speaker), []).append(result)
                print(f"round {round_index + 1} {speaker:>6} {tool:>8}: {json.dumps(result)}", flush=True)

    print(f"\n{args.hours:g} h synthetic triphone task, {args.threads} threads, median of {args.rounds} rounds")
    print("| speaker | tool | seconds | CPU s | peak RSS GB | ABX error % | time / spidr's |")
    print("|---|---|---|---|---|---|---|")
    for speaker in args.modes.split(","):
        ours = statistics.median(r["seconds"] for r in runs[("spidr", speaker)])
        for tool in tools:
            rows = runs[(tool, speaker)]
            seconds = statistics.median(r["seconds"] for r in rows)
            # Paired per-round ratios are steadier than the ratio of medians on a shared machine.
            ratios = [r["seconds"] / s["seconds"] for r, s in zip(rows, runs[("spidr", speaker)], strict=True)]
            print(f"| {speaker} | {tool} | {seconds:.1f} | {statistics.median(r['cpu_seconds'] for r in rows):.1f} "
                  f"| {max(r['peak_rss_gb'] for r in rows):.2f} | {rows[0]['error_percent']:.4f} "
                  f"| {statistics.median(ratios):.2f} (ours {ours:.1f} s) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
