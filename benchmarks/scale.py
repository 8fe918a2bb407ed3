"""Scale benchmarks: each pipeline stage at 1×, 4× and 16× a LibriSpeech-shaped workload; time and peak memory.

    python benchmarks/scale.py [STAGE ...] [--scales 1,4,16] [--work /tmp/spidr-scale]

Stages and their 1× size (see ``workload.py`` for the LibriSpeech 960 h shape):

* ``manifest``: write then read a CSV manifest of 281,241 entries (16× = 4.5M rows).
* ``sampler``: bucket sampler start-up (construction + the first epoch's plan) and one epoch of indices for one
  rank of 2 and of 64 ranks, on 281,241 lengths; at 1× also a whole rank start-up (read the manifest, build the
  loader, start 10 DataLoader workers).
* ``extract-plan``: ``spidr extract``'s bookkeeping before the first audio read (output paths, duplicate check,
  fingerprints, journal, length batches) on 281,241 manifest entries, no audio.
* ``extract-files``: a whole extraction, tiny model, 2,500 one-second files (symlinks to one wav), 1 layer plus
  codebook units; then the rerun of the finished extraction (resume: everything skipped).
* ``units-write`` / ``units-read``: write then read a units JSONL of 17,578 utterances at 50 Hz (1/16 of
  LibriSpeech 960 h: its 16× point is the whole corpus, 173M units).
* ``units-quality``: read units and 100 Hz alignments and compute the six metrics on 1.25M unit frames (16× =
  20M frames, 111 h).
* ``kmeans``: sample 1M frames, fit 256 centroids (scikit-learn MiniBatchKMeans), assign every frame, on 625k
  768-dimensional frames (16× = 10M frames: 30 GB in float32, generated file by file, never held).
* ``abx``: triphone ABX within and across speaker (angular, max_size_group 10, max_x_across 5) on 35k items
  (≈ 1 h of 768-dimensional 50 Hz features read from .npy files); ``--scales 1,4,10`` reaches 350k items.

Each (stage, scale) runs in a fresh process. Peak RSS is the process's high-water mark (VmHWM) over the measured
part only: it is reset (``/proc/self/clear_refs``) after the workload is built, so it counts what the stage
itself holds ("held before" is the RSS at that point). VmHWM also counts mapped page cache, such as the pages of
ABX's memory-mapped scratch file that a gather maps (whole folios at a time); the "anon / file" column splits the
peak, sampled every 20 ms, into the process's own (anonymous) memory and file-backed pages. The machine is shared:
the table shows the load average, and the time ratios (16× / 1×) are what the linearity goal reads (≤ 20).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from workload import (
    LIBRISPEECH_UTTERANCES,
    SAMPLE_RATE,
    librispeech_lengths,
    librispeech_manifest,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    rss_parts_mb,
)

STAGES = ("manifest", "sampler", "extract-plan", "extract-files", "units-write", "units-quality", "kmeans", "abx")
UNITS_BASE = LIBRISPEECH_UTTERANCES // 16  # utterances at 1×: 16× is LibriSpeech 960 h
ABX_BASE_HOURS = 1.0  # ≈ 35k triphone items


class Parts:
    """Times and peak RSS of the measured parts of one stage."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def measure(self, name: str, **info: Any) -> Iterator[dict[str, Any]]:
        reset_peak_rss()
        row: dict[str, Any] = {"part": name, **info, "rss_before_mb": rss_mb()}
        peaks = [0.0, 0.0]
        done = threading.Event()

        def poll() -> None:  # the split of the peak into anonymous and file-backed memory, every 20 ms
            while not done.wait(0.02):
                anonymous, mapped = rss_parts_mb()
                peaks[0], peaks[1] = max(peaks[0], anonymous), max(peaks[1], mapped)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        start, cpu = time.perf_counter(), time.process_time()
        yield row
        row["seconds"] = time.perf_counter() - start
        row["cpu_seconds"] = time.process_time() - cpu
        done.set()
        poller.join()
        row["peak_rss_mb"] = peak_rss_mb()
        row["peak_anon_mb"], row["peak_file_mb"] = round(peaks[0]), round(peaks[1])
        self.rows.append(row)


# ----------------------------------------------------------------------------------------------------------------
# Stages (run in a child process)
# ----------------------------------------------------------------------------------------------------------------


def stage_manifest(scale: float, work: Path, parts: Parts) -> None:
    from spidr.data.manifest import read_manifest, write_manifest

    count = int(LIBRISPEECH_UTTERANCES * scale)
    manifest = librispeech_manifest(count)
    path = work / f"manifest-{count}.csv"
    with parts.measure("write CSV", size=count):
        write_manifest(manifest, path)
    del manifest
    with parts.measure("read CSV", size=count, file_mb=round(path.stat().st_size / 1e6)):
        read_manifest(path)
    path.unlink()


def stage_sampler(scale: float, work: Path, parts: Parts) -> None:
    from spidr.data.sampler import BucketBatchSampler

    count = int(LIBRISPEECH_UTTERANCES * scale)
    lengths = librispeech_lengths(count)
    for world in (2, 64):
        with parts.measure(f"start-up, rank 1 of {world}", size=count) as row:
            sampler = BucketBatchSampler(lengths, max_batch_length=3_800_000, min_sample_size=2000,
                                         max_sample_size=320_000, num_buckets=1000, world_size=world, rank=1)
            row["batches"] = len(sampler.batches(0))
        with parts.measure(f"one epoch of indices, rank 1 of {world}", size=count) as row:
            row["indices"] = sum(len(batch) for batch in sampler)
    if scale == 1:
        _rank_start_up(work, count, parts)


def _rank_start_up(work: Path, count: int, parts: Parts) -> None:
    """One rank of 64 with 10 DataLoader workers: manifest read, sampler, dataset, loader, workers forked."""
    from spidr.config import DataConfig, MaskingConfig
    from spidr.data import loader as loader_module
    from spidr.data.manifest import write_manifest

    path = write_manifest(librispeech_manifest(count), work / "rank-start-up.csv")
    loader_module.usable_workers = lambda requested: requested  # this box has 2 CPUs; start all 10 anyway
    data = DataConfig(manifest=str(path), num_workers=10)
    with parts.measure("rank start-up: manifest + loader + 10 workers (rank 63 of 64)", size=count):
        loader, _ = loader_module.build_dataloader(data, MaskingConfig(), conv_layers=((512, 10, 5),) * 1,
                                                   rank=63, world_size=64)
        iterator = iter(loader)
    del iterator, loader
    path.unlink()


def stage_extract_plan(scale: float, work: Path, parts: Parts) -> None:
    import torch

    from spidr.config import SpidRConfig
    from spidr.eval import features, folder_extraction
    from spidr.models.build import build_model

    count = int(LIBRISPEECH_UTTERANCES * scale)
    manifest = librispeech_manifest(count)
    torch.manual_seed(0)
    model = build_model(SpidRConfig(**TINY)).eval()

    class FirstReadError(Exception):
        pass

    def first_read(*_args: Any, **_kwargs: Any) -> None:
        raise FirstReadError

    features.load_audio = first_read
    out = work / "extract-plan"
    with parts.measure("bookkeeping up to the first audio read", size=count), \
            contextlib.suppress(FirstReadError):
        folder_extraction.extract_to_directory(model, manifest, out, features.ExtractionSettings(layers=(3,)),
                                               progress=False, restart=True)


TINY = {
    "extractor_conv_layer_config": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2,
    "encoder_embed_dim": 32,
    "encoder_num_layers": 3,
    "encoder_num_heads": 2,
    "encoder_ff_interm_features": 64,
    "encoder_pos_conv_groups": 4,
    "num_codebooks": 2,
    "codebook_size": 16,
}


def stage_extract_files(scale: float, work: Path, parts: Parts) -> None:
    import shutil

    import soundfile as sf
    import torch

    from spidr.config import SpidRConfig
    from spidr.data.manifest import ManifestBuilder
    from spidr.eval.features import ExtractionSettings
    from spidr.eval.folder_extraction import extract_to_directory
    from spidr.models.build import build_model

    count = int(2500 * scale)
    audio = work / f"audio-{count}"
    shutil.rmtree(audio, ignore_errors=True)
    audio.mkdir(parents=True)
    wave = (0.1 * np.sin(np.arange(SAMPLE_RATE) * 0.05)).astype(np.float32)
    sf.write(audio / "one.wav", wave, SAMPLE_RATE)
    builder = ManifestBuilder(base="", source="symlinks")
    for i in range(count):
        link = audio / f"s{i % 40}" / f"u{i}.wav"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(audio / "one.wav")
        builder.append(f"u{i}", str(link), SAMPLE_RATE)
    manifest = builder.build()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model(SpidRConfig(**TINY)).eval()
    settings = ExtractionSettings(layers=(3,), codebooks=True)
    out = work / f"extract-{count}"
    shutil.rmtree(out, ignore_errors=True)
    with parts.measure("extract (tiny model, 1 layer + units)", size=count) as row:
        extract_to_directory(model, manifest, out, settings, progress=False)
    row["us_per_file"] = round(1e6 * row["seconds"] / count) if "seconds" in row else None
    with parts.measure("rerun: resume a finished extraction", size=count):
        extract_to_directory(model, manifest, out, settings, progress=False)
    shutil.rmtree(out)
    shutil.rmtree(audio)


def _unit_sequences(count: int, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    frames = librispeech_lengths(count, seed=seed) // 320
    pool = np.random.default_rng(seed).integers(0, 256, size=int(frames.max()) + 1000, dtype=np.int64)
    for i, length in enumerate(frames.tolist()):
        yield f"{i % 2338}-{i // 2338}-{i:06d}", pool[i % 997 : i % 997 + length]


def stage_units_write(scale: float, work: Path, parts: Parts) -> None:
    from spidr.eval.units import read_units, write_units

    count = int(UNITS_BASE * scale)
    path = work / f"units-{count}.jsonl"
    with parts.measure("write units JSONL", size=count) as row:
        write_units(path, _unit_sequences(count))
    row["file_mb"] = round(path.stat().st_size / 1e6)
    with parts.measure("read units JSONL", size=count):
        read_units(path)
    path.unlink()


def stage_units_quality(scale: float, work: Path, parts: Parts) -> None:
    from spidr.eval.unit_quality import read_alignments, unit_quality
    from spidr.eval.units import read_units, write_units

    target = int(1_250_000 * scale)
    lengths = librispeech_lengths(int(target / 600) + 100)
    frames = lengths // 320
    count = int(np.searchsorted(np.cumsum(frames), target)) + 1
    rng = np.random.default_rng(0)
    phones = np.array([f"P{k}" for k in range(40)])
    units_path, align_path = work / "uq-units.jsonl", work / "uq-align.jsonl"
    with align_path.open("w") as handle:
        sequences = []
        for i, length in enumerate(frames[:count].tolist()):
            labels = np.repeat(rng.integers(0, 40, size=length // 4 + 1), 8)[: 2 * length]
            units = (labels[::2] * 6 + rng.integers(0, 6, size=length)) % 256
            noisy = rng.random(length) < 0.3  # a third of the frames get a unit unrelated to their phone
            units[noisy] = rng.integers(0, 256, size=int(noisy.sum()))
            sequences.append((f"utt{i}", units))
            handle.write(json.dumps({"name": f"utt{i}", "phones": phones[labels].tolist()}) + "\n")
    write_units(units_path, sequences)
    del sequences
    total = int(frames[:count].sum())
    with parts.measure("read units + alignments, six metrics", size=total) as row:
        units = read_units(units_path)
        alignments = read_alignments(align_path)
        metrics = unit_quality(units, alignments, num_units=256)
    row["pnmi"] = round(metrics["pnmi"], 4)
    units_path.unlink()
    align_path.unlink()


class SyntheticFeatures(Mapping[str, np.ndarray]):
    """768-dimensional frames around 256 centres, made file by file on access (LibriSpeech-length files at
    50 Hz); ``frame_count`` answers without making them, as ``FeatureDirectory`` reads .npy headers."""

    def __init__(self, total_frames: int, dim: int = 768, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        frames = librispeech_lengths(int(total_frames / 600) + 100, seed=seed) // 320
        count = int(np.searchsorted(np.cumsum(frames), total_frames)) + 1
        self.frames = frames[:count]
        self.names = [f"f{i:07d}" for i in range(count)]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.centres = 4.0 * rng.standard_normal((256, dim), dtype=np.float32)
        self.noise = rng.standard_normal((int(self.frames.max()) + 4096, dim), dtype=np.float32)

    def frame_count(self, name: str) -> int:
        return int(self.frames[self.index[name]])

    def __getitem__(self, name: str) -> np.ndarray:
        i = self.index[name]
        labels = np.random.default_rng(i).integers(0, 256, size=int(self.frames[i]))
        out = self.centres[labels]
        out += self.noise[i % 4096 : i % 4096 + labels.size]
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def stage_kmeans(scale: float, work: Path, parts: Parts) -> None:
    import torch

    from spidr.eval.kmeans import assign_directory, fit_kmeans, sample_frames

    torch.set_num_threads(2)
    features = SyntheticFeatures(int(625_000 * scale))
    total = int(features.frames.sum())
    with parts.measure("sample ≤ 1M frames (two streaming passes)", size=total) as row:
        sample = sample_frames(features, max_frames=1_000_000, seed=0)
        row["sample"] = sample.shape[0]
    with parts.measure("fit 256 centroids (MiniBatchKMeans)", size=sample.shape[0]):
        centroids = torch.from_numpy(fit_kmeans(sample, 256, seed=0))
    del sample
    with parts.measure("assign every frame (streamed)", size=total) as row:
        row["frames"] = sum(units.size for _, units in assign_directory(features, centroids))


def stage_abx(scale: float, work: Path, parts: Parts) -> None:
    import torch

    from spidr.eval.abx import abx
    from spidr.eval.feature_dir import FeatureDirectory
    from spidr.eval.items import read_items

    hours = ABX_BASE_HOURS * scale
    folder = work / f"abx-{hours:g}h"
    if not (folder / "done").is_file():
        subprocess.run([sys.executable, __file__, "--prepare-abx", str(hours), "--work", str(work)], check=True)
    torch.set_num_threads(2)
    for speaker in ("within", "across"):
        with parts.measure(f"ABX {speaker} speaker (read items + features, score)") as row:
            items = read_items(folder / "triphone.item")
            result = abx(FeatureDirectory(folder / "features"), items, speaker=speaker, context="within",
                         distance="angular", max_size_group=10, max_x_across=5)
            row |= {"size": len(items), "cells": result.num_cells, "error_%": round(100 * result.error_rate, 3)}


def prepare_abx(hours: float, work: Path) -> None:
    """Write the synthetic triphone task of ``benchmarks/abx.py`` as .npy files and an item file (cached)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from abx import synthetic_task

    folder = work / f"abx-{hours:g}h"
    features, items = synthetic_task(hours=hours, dim=768, speakers=max(10, int(10 * hours ** 0.5)), seed=0)
    for name, array in features.items():
        path = folder / "features" / f"{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array)
    columns = ["#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker"]
    with (folder / "triphone.item").open("w") as handle:
        handle.write(" ".join(columns) + "\n")
        values = [items.files, items.onsets, items.offsets, *(items.labels[c] for c in columns[3:])]
        handle.writelines(" ".join(str(v) for v in row) + "\n" for row in zip(*values, strict=True))
    (folder / "done").write_text("")


RUNNERS = {"manifest": stage_manifest, "sampler": stage_sampler, "extract-plan": stage_extract_plan,
           "extract-files": stage_extract_files, "units-write": stage_units_write,
           "units-quality": stage_units_quality, "kmeans": stage_kmeans, "abx": stage_abx}


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def run_child(stage: str, scale: float, work: Path) -> list[dict[str, Any]]:
    command = [sys.executable, __file__, "--child", stage, "--scale", str(scale), "--work", str(work)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return [{"part": f"FAILED (exit {result.returncode})", "size": None}]
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_rows(repeats: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The first run's rows with seconds and CPU seconds replaced by their medians over the repeats."""
    rows = [dict(row) for row in repeats[0]]
    for k, row in enumerate(rows):
        for key in ("seconds", "cpu_seconds"):
            values = [run[k][key] for run in repeats if k < len(run) and key in run[k]]
            if values:
                row[key] = float(np.median(values))
        if len(repeats) > 1 and "seconds" in row:
            row["runs"] = len(repeats)
    return rows


def print_table(stage: str, results: dict[float, list[dict[str, Any]]]) -> None:
    first = results[min(results)]
    print(f"\n### {stage}\n")
    print("| part | scale | size | seconds | CPU s | peak RSS MB (held before) | peak anon / file MB | time / 1× | "
          "load | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scale, rows in results.items():
        for k, row in enumerate(rows):
            base = first[k].get("seconds") if k < len(first) else None
            ratio = f"{row['seconds'] / base:.1f}" if base and "seconds" in row else "–"
            notes = ", ".join(f"{key} {value}" for key, value in row.items()
                              if key not in {"part", "size", "seconds", "cpu_seconds", "peak_rss_mb", "load",
                                             "rss_before_mb", "peak_anon_mb", "peak_file_mb"})
            seconds = f"{row['seconds']:.2f}" if "seconds" in row else "–"
            cpu = f"{row['cpu_seconds']:.2f}" if "cpu_seconds" in row else "–"
            peak = f"{row['peak_rss_mb']:.0f} ({row['rss_before_mb']:.0f})" if "peak_rss_mb" in row else "–"
            size = f"{row['size']:,}" if isinstance(row.get("size"), int) else "–"
            split = f"{row['peak_anon_mb']} / {row['peak_file_mb']}" if "peak_anon_mb" in row else "–"
            print(f"| {row['part']} | {scale:g}× | {size} | {seconds} | {cpu} | {peak} | {split} | {ratio} | "
                  f"{row.get('load', '–')} | {notes} |")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", choices=[*STAGES, []], help="stages to run (default: all)")
    parser.add_argument("--scales", default="1,4,16", help="comma-separated multiples of the 1× size")
    parser.add_argument("--work", default="/tmp/spidr-scale", help="scratch folder (ABX features are cached here)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="fresh-process runs per (stage, scale), interleaved over the scales; the table shows "
                             "each part's median seconds and CPU seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-abx", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.prepare_abx is not None:
        prepare_abx(args.prepare_abx, work)
        return 0
    if args.child:
        parts = Parts()
        RUNNERS[args.child](args.scale, work, parts)
        for row in parts.rows:
            row["load"] = f"{os.getloadavg()[0]:.1f}"
        print(json.dumps(parts.rows))
        return 0
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    for stage in args.stages or STAGES:
        scales = [float(scale) for scale in args.scales.split(",")]
        runs: dict[float, list[list[dict[str, Any]]]] = {scale: [] for scale in scales}
        for _ in range(args.repeat):  # round-robin, so that a noisy spell of the machine hits every scale
            for scale in scales:
                runs[scale].append(run_child(stage, scale, work))
        print_table(stage, {scale: median_rows(repeats) for scale, repeats in runs.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
