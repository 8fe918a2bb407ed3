"""End-to-end training throughput vs the pure model step: does the data pipeline keep up?

Both measurements run ``train(cfg)`` with the same model, optimizer, steps and batches (bench-small: 7×256 conv
extractor, dim 256, 6 layers, 4 heads, FFN 1024, 4 codebooks of 256, SpidR):

1. end to end: the real DataLoader reads a synthetic speech-like corpus of WAV files (decoding, standardisation,
   bucketing, cropping, masking, worker processes);
2. model only: the loader is replaced by the very same batches, made beforehand and held in memory.

Throughput is the ``audio_seconds_per_s`` that ``train`` logs over the second half of the run (the first half is
warm-up). Runs alternate (1, 2, 1, 2, ...) so that a busy shared machine slows both alike; the ratio of the medians
is the share of the model's speed that survives data loading (target ≥ 95 %).

    python benchmarks/train_throughput.py [--steps 10] [--repeats 2] [--workers 1] [--batch-seconds 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from spidr.config import Config, config_from_dict
from spidr.data import SAMPLE_RATE
from spidr.data.dataset import BadFileTracker
from spidr.data.loader import build_dataloader
from spidr.train import loop
from spidr.train.loop import train
from spidr.train.metrics import read_metrics

BENCH_SMALL = {
    "extractor_conv_layer_config": [[256, 10, 5]] + [[256, 3, 2]] * 4 + [[256, 2, 2]] * 2,
    "encoder_embed_dim": 256,
    "encoder_num_layers": 6,
    "encoder_num_heads": 4,
    "encoder_ff_interm_features": 1024,
    "num_codebooks": 4,
    "codebook_size": 256,
}


def write_corpus(directory: Path, num_files: int, seed: int = 0) -> Path:
    """Speech-like WAVs of 2–6 s (harmonic tones with syllabic envelopes and noise) and their CSV manifest."""
    rng = np.random.default_rng(seed)
    lines = ["fileid,path,num_samples"]
    for i in range(num_files):
        num_samples = int(rng.uniform(2, 6) * SAMPLE_RATE)
        t = np.arange(num_samples) / SAMPLE_RATE
        f0 = rng.uniform(100, 220) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        wave = sum(np.sin(h * phase) / h for h in range(1, 12)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
        wave = wave + rng.normal(0, 0.05, num_samples)
        sf.write(directory / f"u{i:04d}.wav", (0.3 * wave / np.abs(wave).max()).astype(np.float32), SAMPLE_RATE)
        lines.append(f"u{i:04d},u{i:04d}.wav,{num_samples}")
    manifest = directory / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


class InMemoryLoader:
    """Stands in for the DataLoader: the same batches, already made, epoch after epoch."""

    def __init__(self, batches: list) -> None:
        self.batches = batches
        self.epoch = self.position = 0  # the trainer reads the sampler's place (it is its own sampler)
        self.yielded_in_epoch = False
        self.tracker = BadFileTracker(max_bad_fraction=1.0)  # the trainer checks it at log steps

    def close(self) -> None:
        """No worker process to stop."""

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": 0}


def measure(cfg: Config, batches: list | None) -> float:
    """audio-s/s over the second half of a fresh ``train(cfg)`` run; ``batches`` replaces the DataLoader."""
    shutil.rmtree(cfg.run.run_dir, ignore_errors=True)
    if batches is None:
        train(cfg)
    else:
        memory = InMemoryLoader(batches)
        original = loop.build_dataloader
        loop.build_dataloader = lambda *args, **kwargs: (memory, memory)
        try:
            train(cfg)
        finally:
            loop.build_dataloader = original
    records = [r for r in read_metrics(cfg.run.run_dir / "metrics.jsonl") if r["group"] == "train"]
    return records[-1]["audio_seconds_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per run (after as many warm-up steps)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternating")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--batch-seconds", type=float, default=4.0, help="audio per batch (max_batch_length)")
    parser.add_argument("--crop-seconds", type=float, default=4.0, help="longest utterance crop (max_sample_size)")
    parser.add_argument("--files", type=int, default=200, help="files in the synthetic corpus")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="optimizer.dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="spidr-bench-"))
    try:
        manifest = write_corpus(workdir, args.files)
        cfg = config_from_dict({
            "run": {"workdir": str(workdir), "wandb_project": "bench", "wandb_name": "throughput",
                    "model_type": "spidr", "device": "cpu", "log_interval": args.steps,
                    "save_interval": 10**9, "compile": False},
            "data": {"manifest": str(manifest), "max_batch_length": int(args.batch_seconds * SAMPLE_RATE),
                     "max_sample_size": int(args.crop_seconds * SAMPLE_RATE), "num_buckets": 50,
                     "num_workers": args.workers},
            "model": BENCH_SMALL,
            "optimizer": {"dtype": args.dtype, "max_steps": 2 * args.steps, "warmup_steps": 10},
        })
        loader, _ = build_dataloader(cfg.data, cfg.masking, conv_layers=cfg.model.extractor_conv_layer_config)
        batches: list = []
        while len(batches) < 2 * args.steps:
            batches.extend(loader)
        batches = batches[: 2 * args.steps]
        end_to_end, model_only = [], []
        for _ in range(args.repeats):
            end_to_end.append(measure(cfg, None))
            model_only.append(measure(cfg, batches))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    e2e, model = statistics.median(end_to_end), statistics.median(model_only)
    print(json.dumps({
        "config": "bench-small (7x256 conv, dim 256, 6 layers, 4 heads, FFN 1024, 4x256 codebooks)",
        "dtype": args.dtype, "threads": torch.get_num_threads(), "workers": args.workers,
        "batch_seconds": args.batch_seconds, "measured_steps": args.steps,
        "end_to_end_runs": [round(v, 3) for v in end_to_end], "model_only_runs": [round(v, 3) for v in model_only],
    }))
    print(f"| measurement (median of {args.repeats}) | audio-s/s |\n|---|---|\n"
          f"| train() with the DataLoader | {e2e:.2f} |\n| train() on in-memory batches | {model:.2f} |\n"
          f"| ratio | {100 * e2e / model:.1f} % |")


if __name__ == "__main__":
    main()
