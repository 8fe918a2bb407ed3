"""A synthetic LibriSpeech-shaped workload for the scale benchmarks (no audio needed unless a stage reads it).

LibriSpeech 960 h has 281,241 training utterances, 960.9 h in all (12.30 s on average), between ≈ 0.8 s and
35.2 s, most of them 12-17 s long (the corpus was cut at pauses into segments of up to ≈ 35 s) with a long tail of
short ones. ``librispeech_lengths`` draws lengths with that shape (a normal bulk at 14.7 ± 2.3 s holding 82 % of
the utterances, a uniform tail over 0.8-12 s for the rest, clipped to [0.8, 35.2] s) and rescales them so that
281,241 utterances last exactly 960.9 h. Only the statistics above are matched; no LibriSpeech file is used.
"""

from __future__ import annotations

import numpy as np

from spidr.data import SAMPLE_RATE
from spidr.data.manifest import Manifest, PackedStrings

LIBRISPEECH_UTTERANCES = 281_241
LIBRISPEECH_HOURS = 960.9
LIBRISPEECH_SPEAKERS = 2_338


def librispeech_lengths(count: int, *, seed: int = 0) -> np.ndarray:
    """``count`` utterance lengths in samples at 16 kHz, LibriSpeech-960-shaped (see the module docstring)."""
    rng = np.random.default_rng(seed)
    bulk = rng.random(count) < 0.82
    seconds = np.where(bulk, rng.normal(14.7, 2.3, count), rng.uniform(0.8, 12.0, count))
    seconds = np.clip(seconds, 0.8, 35.2)
    seconds *= LIBRISPEECH_HOURS * 3600 / LIBRISPEECH_UTTERANCES / seconds.mean()
    return np.round(np.clip(seconds, 0.8, 35.2) * SAMPLE_RATE).astype(np.int64)


def librispeech_manifest(count: int, *, root: str = "/data/LibriSpeech/train-960", seed: int = 0) -> Manifest:
    """A manifest of ``count`` LibriSpeech-style entries (speaker/chapter/speaker-chapter-utterance.flac paths)."""
    lengths = librispeech_lengths(count, seed=seed)
    speakers = np.arange(count) % LIBRISPEECH_SPEAKERS
    # 48 utterances a chapter folder, as in LibriSpeech (train-clean-100: 28,539 in 585 chapters): each speaker
    # reads a new chapter every 48 of its utterances
    chapters = speakers * 100 + np.arange(count) // (LIBRISPEECH_SPEAKERS * 48)
    ids = [f"{s}-{c}-{i % 10_000:04d}" for i, (s, c) in enumerate(zip(speakers.tolist(), chapters.tolist(),
                                                                        strict=True))]
    paths = [f"{root}/{s}/{c}/{fileid}.flac" for s, c, fileid in zip(speakers.tolist(), chapters.tolist(), ids,
                                                                      strict=True)]
    return Manifest(fileids=PackedStrings.from_strings(ids), paths=PackedStrings.from_strings(paths),
                    num_samples=lengths, source="synthetic LibriSpeech")


def peak_rss_mb() -> float:
    """This process's resident high-water mark since the last ``reset_peak_rss`` (VmHWM), in MB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_parts_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory now, in MB: file-backed pages are mapped page cache (a memory-mapped
    scratch file, libraries), which the kernel can reclaim; anonymous memory is the process's own."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values.get("RssAnon", float("nan")), values.get("RssFile", 0.0) + values.get("RssShmem", 0.0)


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
