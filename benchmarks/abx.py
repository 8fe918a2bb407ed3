"""ABX speed and memory on a synthetic LibriSpeech-like triphone task.

Builds ~35k triphone items over ~1 h of 50 Hz, 768-dimensional features from several speakers. Phones follow a
Zipf-like distribution and last 2–8 frames; every frame is its phone's mean vector plus a speaker offset plus noise,
so the task is neither trivial nor chance. Then times ABX within and across speaker (context within, angular
distance, max_size_group 10, max_x_across 5) and reports wall and CPU seconds (on a shared machine the CPU time is
the steadier number) and the peak resident memory of the process (features included).

    .venv/bin/python benchmarks/abx.py [--hours 1] [--dim 768] [--speakers 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch

from spidr.eval.abx import abx
from spidr.eval.items import Items

NUM_PHONES = 40
NUM_VOWELS = 15
ZIPF = 1.2
CLUSTERS = 0.15  # probability that a vowel slot holds a consonant instead
RATE = 50


def synthetic_task(*, hours: float, dim: int, speakers: int, seed: int) -> tuple[dict[str, np.ndarray], Items]:
    """Per-file (T, dim) float32 features and their triphone items."""
    rng = np.random.default_rng(seed)
    phone_means = rng.normal(size=(NUM_PHONES, dim)).astype(np.float32)
    speaker_offsets = 0.7 * rng.normal(size=(speakers, dim)).astype(np.float32)
    # Phonotactics: mostly consonant-vowel alternation with Zipf-distributed consonants and vowels, so that
    # (prev, next) contexts concentrate as in real speech (uniform phones would leave almost every context with a
    # single item, and almost no within-context cell).
    vowel_weights = 1.0 / np.arange(1, NUM_VOWELS + 1) ** ZIPF
    consonant_weights = 1.0 / np.arange(1, NUM_PHONES - NUM_VOWELS + 1) ** ZIPF
    vowel_weights /= vowel_weights.sum()
    consonant_weights /= consonant_weights.sum()
    total_frames = int(hours * 3600 * RATE)
    features: dict[str, np.ndarray] = {}
    columns: dict[str, list[str]] = {
        name: [] for name in ("#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker")
    }
    frames_done, file_index = 0, 0
    while frames_done < total_frames:
        speaker = file_index % speakers
        name = f"{speaker}/utt{file_index:05d}"
        durations = rng.integers(2, 9, size=rng.integers(60, 140))
        vowels = rng.choice(NUM_VOWELS, size=durations.size, p=vowel_weights)
        consonants = NUM_VOWELS + rng.choice(NUM_PHONES - NUM_VOWELS, size=durations.size, p=consonant_weights)
        is_vowel = (np.arange(durations.size) % 2 == 1) & (rng.random(durations.size) > CLUSTERS)
        phones = np.where(is_vowel, vowels, consonants)
        labels = np.repeat(phones, durations)
        noise = rng.standard_normal(size=(labels.size, dim), dtype=np.float32)
        noise *= 1.6
        noise += phone_means[labels]
        noise += speaker_offsets[speaker]
        features[name] = noise
        bounds = np.concatenate([[0], np.cumsum(durations)])
        for k in range(1, durations.size - 1):
            columns["#file"].append(name)
            columns["onset"].append(f"{bounds[k - 1] / RATE:.2f}")
            columns["offset"].append(f"{bounds[k + 2] / RATE:.2f}")
            columns["#phone"].append(f"p{phones[k]}")
            columns["prev-phone"].append(f"p{phones[k - 1]}")
            columns["next-phone"].append(f"p{phones[k + 1]}")
            columns["speaker"].append(f"s{speaker}")
        frames_done += labels.size
        file_index += 1
    return features, Items.from_columns(columns, source="synthetic")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=1.0, help="hours of 50 Hz features")
    parser.add_argument("--dim", type=int, default=768, help="feature dimension")
    parser.add_argument("--speakers", type=int, default=10, help="number of speakers")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared box)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--modes", default="within,across", help="speaker modes to time, comma separated")
    parser.add_argument("--context", choices=("within", "any"), default="within", help="context condition")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    features, items = synthetic_task(hours=args.hours, dim=args.dim, speakers=args.speakers, seed=args.seed)
    num_frames = sum(f.shape[0] for f in features.values())
    print(
        f"synthetic task: {len(items)} triphone items, {len(features)} files, {num_frames} frames "
        f"({num_frames / RATE / 3600:.2f} h), dim {args.dim}, {args.speakers} speakers; built in "
        f"{time.perf_counter() - start:.1f} s, peak RSS so far {peak_rss_gb():.2f} GB"
    )
    report = {}
    for speaker in args.modes.split(","):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = abx(features, items, speaker=speaker, context=args.context, max_size_group=10, max_x_across=5)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        report[speaker] = {
            "seconds": round(elapsed, 2),
            "cpu_seconds": round(cpu, 2),
            "abx_error_rate_percent": round(100 * result.error_rate, 4),
            "cells": result.num_cells,
            "triplets": result.num_triplets,
            "peak_rss_gb": round(peak_rss_gb(), 2),
        }
        print(f"{speaker:>6} speaker: {json.dumps(report[speaker])}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
