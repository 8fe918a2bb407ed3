"""Helpers shared by the training tests: a synthetic speech-like corpus and tiny run configs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from spidr.config import Config, config_from_dict
from spidr.data import SAMPLE_RATE

# Formant pairs (Hz) of a few vowel-like sounds: what makes the corpus have learnable, phone-like structure.
VOWELS = ((730, 1090), (270, 2290), (300, 870), (530, 1840), (640, 1190), (490, 1350), (400, 2000), (600, 900))


# A 3-layer, 32-dim SpidR with 2 codebooks of 16 codewords: the model of the extraction and pipeline tests.
EXTRACTION_MODEL = {
    "extractor_conv_layer_config": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2,
    "encoder_embed_dim": 32,
    "encoder_num_layers": 3,
    "encoder_num_heads": 2,
    "encoder_ff_interm_features": 64,
    "encoder_pos_conv_groups": 4,
    "num_codebooks": 2,
    "codebook_size": 16,
}


def speech_like(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A sequence of 60–150 ms vowel-like segments (harmonics of a gliding f0 shaped by two formants), with
    short noise bursts between some of them, a syllabic amplitude envelope and a little background noise."""
    out = np.zeros(num_samples)
    t0 = 0
    f0 = rng.uniform(100, 220)
    while t0 < num_samples:
        length = min(int(rng.uniform(0.06, 0.15) * SAMPLE_RATE), num_samples - t0)
        t = np.arange(length) / SAMPLE_RATE
        if rng.random() < 0.2:  # a fricative-like noise burst
            segment = rng.normal(0, 0.3, length) * np.hanning(length)
        else:
            f1, f2 = VOWELS[rng.integers(len(VOWELS))]
            glide = f0 * (1 + 0.1 * rng.uniform(-1, 1) * t / max(t[-1], 1e-3))
            phase = 2 * np.pi * np.cumsum(glide) / SAMPLE_RATE
            segment = np.zeros(length)
            for h in range(1, 30):
                freq = h * f0
                if freq > SAMPLE_RATE / 2 - 500:
                    break
                gain = math.exp(-(((freq - f1) / 120) ** 2)) + 0.6 * math.exp(-(((freq - f2) / 160) ** 2)) + 0.02
                segment += gain * np.sin(h * phase)
            segment *= np.sin(np.pi * np.arange(length) / length) ** 0.5
        out[t0 : t0 + length] = segment
        t0 += length
    out += rng.normal(0, 0.02, num_samples)
    return (out / (np.abs(out).max() + 1e-9) * 0.5).astype(np.float32)


def write_corpus(directory: Path, *, num_files: int = 12, seconds: tuple[float, float] = (0.5, 1.0),
                 seed: int = 0) -> Path:
    """WAV files of speech-like audio and a CSV manifest listing them; returns the manifest path."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["fileid,path,num_samples"]
    for i in range(num_files):
        num_samples = int(rng.uniform(*seconds) * SAMPLE_RATE)
        path = directory / f"utt{i:03d}.wav"
        sf.write(path, speech_like(num_samples, rng), SAMPLE_RATE, subtype="PCM_16")
        lines.append(f"utt{i:03d},{path.name},{num_samples}")
    manifest = directory / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


TINY_MODEL: dict[str, Any] = {
    "extractor_conv_layer_config": [[32, 10, 5], [32, 8, 4], [32, 8, 8]],  # hop 160: 100 frames per second
    "encoder_embed_dim": 32,
    "encoder_num_layers": 2,
    "encoder_num_heads": 2,
    "encoder_ff_interm_features": 64,
    "encoder_pos_conv_kernel": 10,
    "encoder_pos_conv_depth": 2,
    "encoder_pos_conv_groups": 4,
    "num_codebooks": 2,
    "codebook_size": 16,
}


def tiny_config_dict(workdir: Path, manifest: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny run (SpidR, CPU, float32, no data workers); ``sections`` update the defaults section by section."""
    data: dict[str, Any] = {
        "run": {"workdir": str(workdir), "wandb_project": "test", "wandb_name": "tiny", "model_type": "spidr",
                "device": "cpu", "log_interval": 1, "save_interval": 3, "compile": False},
        "data": {"manifest": str(manifest), "max_batch_length": 32000, "max_sample_size": 16000,
                 "min_sample_size": 4000, "num_buckets": 4, "num_workers": 0},
        "model": dict(TINY_MODEL),
        "optimizer": {"lr": 2e-3, "dtype": "float32", "max_steps": 8, "warmup_steps": 2, "hold_steps": 4,
                      "decay_steps": 4},
        "masking": {"mask_prob": 0.65, "mask_length": 5},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def tiny_config(workdir: Path, manifest: Path, **sections: dict[str, Any]) -> Config:
    return config_from_dict(tiny_config_dict(workdir, manifest, **sections))


def write_toml(data: dict[str, Any], path: Path) -> Path:
    """A minimal TOML writer for run configs: tables of scalars and lists, nested tables as [a.b]."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items() if not isinstance(value, dict))
        lines.append("")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{name}.{key}", value)

    for section, values in data.items():
        table(section, values)
    path.write_text("\n".join(lines))
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)
