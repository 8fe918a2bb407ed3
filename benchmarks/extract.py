"""Feature-extraction speed and memory: real-time factor and peak RSS for a short file and a long file, or for a
LibriSpeech-length mix in float32 and bf16 side by side.

Each case runs in a fresh subprocess (so peak RSS is its own) extracting every layer of a randomly initialised
model with `extract_to_directory`, audio decoding included. The long file goes through the windowed path; its peak
RSS should not grow with the file's length. Prints a table.

``--mix N`` instead writes N FLAC files whose lengths follow LibriSpeech 960 h's shape (`workload.py`) clipped to
2-35 s, and extracts them in float32 and in bf16 (``bfloat16_inference``), alternating over ``--rounds`` rounds.
It prints each precision's audio seconds per second (best round), the median over rounds of the bf16 / fp32 speed
ratio, and how far the bf16 features are from the fp32 ones: the largest relative error ||bf16 - fp32|| / ||fp32||
over files and layers.

    python benchmarks/extract.py                      # base config, 10 s and 1 h files
    python benchmarks/extract.py --long-seconds 600 --dtype bfloat16
    python benchmarks/extract.py --mix 12 --rounds 3  # base config, ~2.5 min of LibriSpeech-like files
    python benchmarks/extract.py --mix 12 --checkpoint spidr_base.pt  # the bf16 error of released weights
    python benchmarks/extract.py --codebook-passes --rounds 5  # features + units: one forward pass vs two
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


def worker(path: str, model_source: str, dtype: str, threads: int, out_dir: str | None = None) -> None:
    """Extract every layer of the file ``path``, or of every file listed in the manifest ``path`` (a .csv), into a
    temporary folder or ``out_dir``; prints wall time, audio seconds and peak RSS as JSON. ``model_source``: a
    config name of ``train_step.CONFIGS`` (random weights) or a checkpoint file."""
    import torch
    from train_step import CONFIGS  # a sibling script: the benchmarks' model configs are named there

    from spidr.data.manifest import ManifestEntry, read_manifest
    from spidr.eval.features import ExtractionSettings
    from spidr.eval.folder_extraction import extract_to_directory
    from spidr.models.build import build_model
    from spidr.models.loading import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(CONFIGS[model_source]) if model_source in CONFIGS else load_model(model_source)
    model.eval()
    if path.endswith(".csv"):
        entries = list(read_manifest(path))
    else:
        entries = [ManifestEntry(fileid=Path(path).stem, path=path, num_samples=sf.info(path).frames)]
    settings = ExtractionSettings(layers=tuple(range(1, model.num_layers + 1)), dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract_to_directory(model, entries, out_dir or tmp, settings, progress=False)
        elapsed = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    audio = sum(e.num_samples for e in entries) / SAMPLE_RATE
    print(json.dumps({"seconds": elapsed, "audio_seconds": audio, "peak_rss_gib": peak_gib}))


def write_mix(directory: Path, files: int) -> Path:
    """``files`` FLAC files of LibriSpeech-shaped lengths clipped to 2-35 s, speech-like noise; returns a manifest."""
    from workload import librispeech_lengths

    lengths = np.clip(librispeech_lengths(files, seed=0), 2 * SAMPLE_RATE, 35 * SAMPLE_RATE)
    rng = np.random.default_rng(0)
    lines = ["fileid,path,num_samples"]
    for i, length in enumerate(lengths):
        path = directory / f"utt{i:04d}.flac"
        envelope = np.repeat(rng.random(length // 1600 + 1), 1600)[:length]  # 0.1 s loudness changes
        sf.write(path, (0.1 * envelope * rng.standard_normal(length)).astype(np.float32), SAMPLE_RATE,
                 subtype="PCM_16")
        lines.append(f"utt{i:04d},{path},{length}")
    manifest = directory / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def relative_errors(reference: Path, other: Path) -> list[float]:
    """||other - reference|| / ||reference|| for every feature file of every layer."""
    import torch

    from spidr.eval.feature_dir import FeatureDirectory

    errors = []
    for layer in sorted(p for p in reference.iterdir() if p.is_dir() and p.name.startswith("layer_")):
        ours, theirs = FeatureDirectory(layer), FeatureDirectory(other / layer.name)
        for key in ours:
            a = torch.as_tensor(np.asarray(ours[key]), dtype=torch.float64)
            b = torch.as_tensor(np.asarray(theirs[key]), dtype=torch.float64)
            errors.append(float(torch.linalg.norm(b - a) / torch.linalg.norm(a)))
    return errors


def run_mix(args: argparse.Namespace) -> None:
    import statistics

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_mix(Path(tmp), args.mix)
        runs: dict[str, list[dict]] = {"float32": [], "bfloat16": []}
        for round_ in range(args.rounds):
            for dtype, rows in runs.items():
                out = Path(tmp) / f"{dtype}-{round_}"
                result = subprocess.run(
                    [sys.executable, __file__, "--worker", str(manifest), args.checkpoint or args.config, dtype,
                     str(args.threads), str(out)], check=True, capture_output=True, text=True,
                )
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        errors = relative_errors(Path(tmp) / "float32-0", Path(tmp) / "bfloat16-0")
    audio = runs["float32"][0]["audio_seconds"]
    ratios = [f["seconds"] / b["seconds"] for f, b in zip(runs["float32"], runs["bfloat16"], strict=True)]
    model = f"checkpoint {args.checkpoint}" if args.checkpoint else f"config {args.config} (random weights)"
    print(f"{model}, {args.threads} threads, {args.mix} files, {audio:.0f} s of audio (2-35 s each, "
          f"FLAC), all layers, decoding included; {args.rounds} interleaved round(s)")
    print(f"{'dtype':>9} | {'audio s/s (best)':>16} | {'peak RSS GiB':>12}")
    for dtype, rows in runs.items():
        best = min(r["seconds"] for r in rows)
        print(f"{dtype:>9} | {audio / best:>16.2f} | {max(r['peak_rss_gib'] for r in rows):>12.2f}")
    print(f"bf16 speed / fp32 speed: {statistics.median(ratios):.2f} (median of per-round ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"bf16 vs fp32 features: relative error max {max(errors):.2e}, median {statistics.median(errors):.2e} "
          f"over {len(errors)} (file, layer) pairs")


def run_codebook_passes(args: argparse.Namespace) -> None:
    """Layer features and codebook units of one batch: the two calls an extraction made (every layer's outputs,
    then the codebooks, each a forward pass) against ``get_layers_and_codebooks`` (one pass), interleaved."""
    import torch
    from train_step import CONFIGS

    from spidr.models.build import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(CONFIGS[args.config]).eval()
    batch = torch.randn(2, int(args.short_seconds * SAMPLE_RATE))

    def two_calls() -> None:
        model.get_intermediate_outputs(batch)
        model.get_codebooks(batch)

    def one_pass() -> None:
        model.get_layers_and_codebooks(batch)

    times: dict[str, list[float]] = {"two calls": [], "one pass": []}
    with torch.inference_mode():
        one_pass()  # warm-up
        for _ in range(args.rounds):
            for name, run in (("two calls", two_calls), ("one pass", one_pass)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["two calls"], times["one pass"], strict=True)]
    print(f"config {args.config}, float32, {args.threads} threads, batch 2 × {args.short_seconds:g} s, all layers "
          f"+ codebook units; {args.rounds} interleaved round(s)")
    print(f"{'path':>10} | {'best s':>7}")
    for name, values in times.items():
        print(f"{name:>10} | {min(values):>7.3f}")
    print(f"speed-up of one pass, median of per-round ratios: {float(np.median(ratios)):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["base", "bench-small"], default="base",
                        help="model config, randomly initialised")
    parser.add_argument("--checkpoint", default=None,
                        help="a checkpoint to extract with instead of --config (bf16 rounds trained weights' "
                             "features differently from random ones)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--short-seconds", type=float, default=10.0)
    parser.add_argument("--long-seconds", type=float, default=3600.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mix", type=int, default=0,
                        help="instead: this many LibriSpeech-length FLAC files, in float32 and bf16 side by side")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the --mix comparison")
    parser.add_argument("--codebook-passes", action="store_true",
                        help="instead: features + codebook units of one batch in one forward pass vs two")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.codebook_passes:
        run_codebook_passes(args)
        return
    if args.worker:
        worker(args.worker[0], args.worker[1], args.worker[2], int(args.worker[3]), *args.worker[4:])
        return
    if args.mix:
        run_mix(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in (args.short_seconds, args.long_seconds):
            path = Path(tmp) / f"audio_{int(seconds)}s.wav"
            write_audio(path, seconds)
            result = subprocess.run(
                [sys.executable, __file__, "--worker", str(path), args.checkpoint or args.config, args.dtype,
                 str(args.threads)],
                check=True, capture_output=True, text=True,
            )
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    model = f"checkpoint {args.checkpoint}" if args.checkpoint else f"config {args.config}"
    print(f"{model}, {args.dtype}, {args.threads} threads, all layers extracted")
    print(f"{'audio':>10} | {'wall s':>8} | {'RTF':>7} | {'s per 10 s':>10} | {'peak RSS GiB':>12}")
    for row in rows:
        rtf = row["seconds"] / row["audio_seconds"]
        print(f"{row['audio_seconds']:>9.0f}s | {row['seconds']:>8.1f} | {rtf:>7.4f} | {10 * rtf:>10.3f} | "
              f"{row['peak_rss_gib']:>12.2f}")


if __name__ == "__main__":
    main()
