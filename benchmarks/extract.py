"""Feature-extraction speed and memory: real-time factor and peak RSS for a short file and a long file.

Each case runs in a fresh subprocess (so peak RSS is its own) extracting every layer of a randomly initialised
model with `extract_to_directory`. The long file goes through the windowed path; its peak RSS should not grow with
the file's length. Prints a table.

    python benchmarks/extract.py                      # base config, 10 s and 1 h files
    python benchmarks/extract.py --long-seconds 600 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from spidr.data import SAMPLE_RATE


def write_audio(path: Path, seconds: float) -> None:
    """Noise-like audio written in one-minute blocks (the 1-hour file never sits in memory here either)."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as out:
        remaining = int(seconds * SAMPLE_RATE)
        while remaining > 0:
            block = min(remaining, 60 * SAMPLE_RATE)
            out.write((0.1 * rng.standard_normal(block)).astype(np.float32))
            remaining -= block


def worker(path: str, config: str, dtype: str, threads: int) -> None:
    import torch

    from spidr.config import SpidRConfig
    from spidr.data.manifest import ManifestEntry
    from spidr.eval.features import ExtractionSettings, extract_to_directory
    from spidr.models.build import build_model

    torch.set_num_threads(threads)
    cfg = SpidRConfig() if config == "base" else SpidRConfig(
        extractor_conv_layer_config=[[256, 10, 5]] + [[256, 3, 2]] * 4 + [[256, 2, 2]] * 2,
        encoder_embed_dim=256, encoder_num_layers=6, encoder_num_heads=4, encoder_ff_interm_features=1024,
        num_codebooks=4,
    )
    model = build_model(cfg).eval()
    info = sf.info(path)
    entry = ManifestEntry(fileid=Path(path).stem, path=path, num_samples=info.frames)
    settings = ExtractionSettings(layers=tuple(range(1, model.num_layers + 1)), dtype=dtype)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        extract_to_directory(model, [entry], out, settings, progress=False)
        elapsed = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": elapsed, "audio_seconds": info.frames / SAMPLE_RATE, "peak_rss_gib": peak_gib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["base", "bench-small"], default="base")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--short-seconds", type=float, default=10.0)
    parser.add_argument("--long-seconds", type=float, default=3600.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.worker[2], int(args.worker[3]))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in (args.short_seconds, args.long_seconds):
            path = Path(tmp) / f"audio_{int(seconds)}s.wav"
            write_audio(path, seconds)
            result = subprocess.run(
                [sys.executable, __file__, "--worker", str(path), args.config, args.dtype, str(args.threads)],
                check=True, capture_output=True, text=True,
            )
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"config {args.config}, {args.dtype}, {args.threads} threads, all layers extracted")
    print(f"{'audio':>10} | {'wall s':>8} | {'RTF':>7} | {'s per 10 s':>10} | {'peak RSS GiB':>12}")
    for row in rows:
        rtf = row["seconds"] / row["audio_seconds"]
        print(f"{row['audio_seconds']:>9.0f}s | {row['seconds']:>8.1f} | {rtf:>7.4f} | {10 * rtf:>10.3f} | "
              f"{row['peak_rss_gib']:>12.2f}")


if __name__ == "__main__":
    main()
