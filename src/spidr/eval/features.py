"""Per-layer features and codebook units from a model, for every utterance of a manifest or a folder.

Audio is standardised per utterance exactly as in pretraining (spec §3.1). Utterances are batched by length with
padding and a frame padding mask, so a padded batch gives the same features as one file at a time. Files longer
than ``max_seconds`` are processed in overlapping windows whose memory is bounded by the window size: the audio is
read from disk window by window (16 kHz files; others are decoded whole first) and the features are written into the
``.npy`` files as they come.

Output layout (ZeroSpeech style): ``OUT/layer_LL/<tree>/<stem>.npy`` with (T, D) float32 per utterance, the tree
mirroring the audio tree, plus ``OUT/metadata.json``; with codebook units, ``OUT/codebook_units/layer_LL.jsonl``
rows ``{"name": utterance id, "audio": path, "units": [...]}``, the id being the stem of the utterance's feature files
(its manifest file id), by which readers key both.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from spidr.atomic_files import hold_partial, new_partial_path, replaced_when_done, write_atomically
from spidr.config import ConvLayer, num_samples_for_frames
from spidr.data import SAMPLE_RATE
from spidr.data.audio import AudioError, decoding, load_audio
from spidr.data.manifest import ITER_CHUNK, Manifest, ManifestEntry, PackedStrings, repeated_strings
from spidr.eval.shards import WHOLE, Shard
from spidr.folder_lock import folder_lock
from spidr.models.frames import hop_length, num_frames, padding_mask_from_lengths
from spidr.models.inference_precision import bfloat16_inference, precision_identity

logger = logging.getLogger(__name__)

STANDARDIZE_EPS = 1e-5


@dataclass(frozen=True)
class ExtractionSettings:
    """What to extract and how. ``layers`` are 1-based; ``batch_seconds`` caps padded audio per batch."""

    layers: tuple[int, ...]
    before_residual: bool = True
    codebooks: bool = False
    batch_seconds: float = 60.0
    max_seconds: float = 60.0  # longer files are processed in windows
    window_seconds: float = 30.0  # frames kept from each window
    context_seconds: float = 5.0  # extra audio on each side of a window, dropped from the output
    dtype: str = "float32"  # "bfloat16": the Transformer layers in bf16 (``bfloat16_inference``)


def window_settings(max_seconds: float) -> dict[str, float]:
    """``max_seconds`` and windows that fit in it (``ExtractionSettings`` fields): a file longer than ``max_seconds``
    runs in overlapping windows of 30 s kept + 5 s of context on each side (40 s) when they fit, else shrunk to
    ``max_seconds`` (10 s: 5 s kept + 2.5 s on each side; windows are whole frames, so up to one frame's receptive
    field more), so that no forward reads more than ``max_seconds`` of audio."""
    context = min(5.0, max_seconds / 4)
    return {"max_seconds": max_seconds, "window_seconds": min(30.0, max_seconds - 2 * context),
            "context_seconds": context}


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """Parse ``"1-12"``, ``"6"`` or ``"1,5-7"`` into sorted 1-based layer numbers, checked against the model."""
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            first, last = (int(p) for p in part.split("-", 1)) if "-" in part else (int(part), int(part))
        except ValueError:
            raise ValueError(f"--layers {text!r} is invalid: expected e.g. 1-12, 6 or 1,5-7") from None
        if first > last:
            raise ValueError(f"--layers {text!r} is invalid: the range {part} runs backwards")
        layers.update(range(first, last + 1))
    bad = sorted(layer for layer in layers if not 1 <= layer <= num_layers)
    if bad or not layers:
        raise ValueError(f"--layers {text!r} is invalid: the model has layers 1..{num_layers} (1-based)")
    return tuple(sorted(layers))


def _precision(model: torch.nn.Module, device: torch.device, dtype: str):
    """float32, or bf16 with the model's input path (front end, projection, positional convs) in float32."""
    if dtype == "float32":
        return nullcontext()
    return bfloat16_inference(model, device.type)


# --------------------------------------------------------------------------------------------------------------
# Batched extraction of short utterances
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def extract_batch(
    model: torch.nn.Module, waveforms: Sequence[torch.Tensor], settings: ExtractionSettings, *,
    front_end: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Features of standardised waveforms [(S_i,)], run as a padded batch.

    Returns one dict per utterance: ``"layer_LL"`` → (T_i, D) float32 and, with codebooks, ``"units_LL"`` → (T_i,)
    int64 arg-max of layer LL's head. T_i = frames of S_i alone, and padding never changes a result: a model whose
    front end normalises over the padded time axis (``ModelConfig.padding_changes_features``) runs each group of
    equal-length waveforms as its own unpadded batch. With ``front_end``, also ``"front_end"`` → (T_i, C), the front
    end's output (conv stack or log-mel), and ``"projection"`` → (T_i, D), the Transformer's input (before its
    positional convolution), from the same forward pass.
    """
    bad = [layer for layer in settings.layers if not 1 <= layer <= model.num_layers]
    if not (settings.layers or (settings.codebooks and model.num_codebooks)) or bad:
        raise ValueError(f"layers {list(settings.layers)}: expected at least one of the model's layers 1 to "
                         f"{model.num_layers}{f' ({bad} are not)' if bad else ''}, or codebook units alone")
    if not waveforms:
        return []
    if model.cfg.padding_changes_features:
        rows_by_length: dict[int, list[int]] = {}
        for row, wave in enumerate(waveforms):
            rows_by_length.setdefault(wave.shape[0], []).append(row)
        if len(rows_by_length) > 1:
            results: list[dict[str, np.ndarray]] = [{} for _ in waveforms]
            for rows in rows_by_length.values():
                group = _extract_padded(model, [waveforms[row] for row in rows], settings, front_end=front_end)
                for row, result in zip(rows, group, strict=True):
                    results[row] = result
            return results
    return _extract_padded(model, waveforms, settings, front_end=front_end)


def _extract_padded(
    model: torch.nn.Module, waveforms: Sequence[torch.Tensor], settings: ExtractionSettings, *, front_end: bool
) -> list[dict[str, np.ndarray]]:
    """``extract_batch``'s work on one padded batch, whatever the front end (see
    ``ModelConfig.padding_changes_features``)."""
    device = next(model.parameters()).device
    conv_layers = model.cfg.extractor_conv_layer_config
    lengths = torch.tensor([w.shape[0] for w in waveforms])
    batch = torch.zeros(len(waveforms), int(lengths.max()))
    for row, wave in enumerate(waveforms):
        batch[row, : wave.shape[0]] = wave
    batch = batch.to(device)
    padding_mask = padding_mask_from_lengths(lengths, conv_layers).to(device)
    if not bool(padding_mask.any()):
        padding_mask = None
    frames = num_frames(lengths, conv_layers).tolist()
    results: list[dict[str, np.ndarray]] = [{} for _ in waveforms]
    captured: dict[str, torch.Tensor] = {}
    hooks = [] if not front_end else [
        module.register_forward_hook(lambda _m, _i, output, key=key: captured.__setitem__(key, output))
        for key, module in (("front_end", model.feature_extractor), ("projection", model.feature_projection))
    ]
    with _precision(model, device, settings.dtype):
        try:
            outputs, codebooks = _forward(model, batch, padding_mask, settings)
        finally:
            for hook in hooks:
                hook.remove()
        for key, values in captured.items():
            values = values.float().cpu().numpy()
            for row, count in enumerate(frames):
                results[row][key] = values[row, :count]
        for layer in settings.layers:
            values = outputs[layer - 1].float().cpu().numpy()
            for row, count in enumerate(frames):
                results[row][f"layer_{layer:02d}"] = values[row, :count]
        if settings.codebooks:
            for layer, probs in enumerate(codebooks, start=1):
                if probs is None:
                    continue
                units = probs.argmax(-1).cpu().numpy()
                for row, count in enumerate(frames):
                    results[row][f"units_{layer:02d}"] = units[row, :count]
    return results


def _forward(model: torch.nn.Module, batch: torch.Tensor, padding_mask: torch.Tensor | None,
             settings: ExtractionSettings) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The layer outputs (up to the highest of ``settings.layers``) and, with codebooks, the heads' probabilities
    per layer, from one pass where the model has heads (twice as fast as a pass for each)."""
    if settings.codebooks and model.num_codebooks:
        return model.get_layers_and_codebooks(batch, padding_mask=padding_mask,
                                              before_residual=settings.before_residual,
                                              num_layers=max(settings.layers, default=None))
    outputs = model.get_intermediate_outputs(batch, padding_mask=padding_mask,
                                             before_residual=settings.before_residual, num_layers=max(settings.layers))
    return outputs, model.get_codebooks(batch, padding_mask=padding_mask) if settings.codebooks else []


# --------------------------------------------------------------------------------------------------------------
# Windowed extraction of long files
# --------------------------------------------------------------------------------------------------------------


class LongAudio:
    """A 16 kHz file read window by window, standardised with statistics of the whole file (two passes). An archive
    member, or a file at another rate, is decoded whole instead (its samples held, its forwards still windowed).
    A file that cannot be decoded, at either pass, raises ``AudioError`` as ``load_audio`` does."""

    def __init__(self, source: str | ManifestEntry) -> None:
        self.path = source.path if isinstance(source, ManifestEntry) else source
        with decoding(self.path):
            info = None if isinstance(source, ManifestEntry) and source.in_archive else sf.info(self.path)
        if info is None or info.samplerate != SAMPLE_RATE:
            # Resampling window by window would need a streaming resampler; decode whole instead.
            self._wave: torch.Tensor | None = load_audio(source, normalize=True)
            self.num_samples = self._wave.shape[0]
            return
        self._wave = None
        # Counted while decoding, not taken from the header: a file cut short (a partial download of a compressed
        # file) promises more samples than it decodes, and whole-file extraction gives it its decoded length.
        self.num_samples = 0
        total, total_sq = 0.0, 0.0
        # Read block by block with ``SoundFile.read``, which returns what was decoded: ``sf.blocks`` sizes its
        # blocks from the header and pads a short read with whatever its buffer held.
        with decoding(self.path), sf.SoundFile(self.path) as file, np.errstate(over="ignore"):
            while len(block := file.read(SAMPLE_RATE * 60, dtype="float64", always_2d=True)):
                mono = block.mean(axis=1)  # an overflow is refused below, by name
                if not np.isfinite(mono).all():  # as load_audio refuses them: the features would all be NaN
                    raise AudioError(self.path, "contains NaN or Inf samples")
                self.num_samples += mono.shape[0]
                total += float(mono.sum())
                total_sq += float(np.square(mono).sum())
        if self.num_samples == 0:
            raise AudioError(self.path, "contains no audio samples")
        self.mean = total / self.num_samples
        variance = total_sq / self.num_samples - self.mean * self.mean
        if not math.isfinite(variance):  # a corrupt file decoded to huge values
            raise AudioError(self.path, "cannot be standardised (its samples' sum of squares overflows)")
        self.std = float(np.sqrt(max(variance, 0.0) + STANDARDIZE_EPS))

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Standardised samples [start, stop) as (stop − start,) float32."""
        if self._wave is not None:
            return self._wave[start:stop]
        with decoding(self.path):
            block, _ = sf.read(self.path, start=start, stop=stop, dtype="float64", always_2d=True)
        if block.shape[0] != stop - start:  # a decoder that seeks differently from how it decodes front to back
            raise AudioError(self.path, f"samples {start}-{stop} decode to {block.shape[0]} samples, though the "
                             f"whole file decodes to {self.num_samples}")
        return torch.from_numpy(((block.mean(axis=1) - self.mean) / self.std).astype(np.float32))


def windows(total_frames: int, window_frames: int, context_frames: int) -> Iterator[tuple[int, int, int, int]]:
    """Split frames [0, total) into kept ranges [keep_start, keep_end) run with context [run_start, run_end)."""
    for keep_start in range(0, total_frames, window_frames):
        keep_end = min(keep_start + window_frames, total_frames)
        yield keep_start, keep_end, max(keep_start - context_frames, 0), min(keep_end + context_frames, total_frames)


def extract_long(
    model: torch.nn.Module, audio: LongAudio, settings: ExtractionSettings, sinks: Mapping[str, Any], *,
    front_end: bool = False,
) -> None:
    """Fill ``sinks`` ("layer_LL" → (T, D), "units_LL" → (T,), with ``front_end`` also "front_end" and
    "projection", as ``extract_batch`` gives them: arrays, ``NpyAppender`` or anything taking slice assignments)
    window by window, in order.

    A window running frames [a, b) reads samples [a·hop, (b − 1)·hop + receptive field); since every window starts
    on the frame grid, its frames are frames a..b − 1 of the whole file. Only frames away from the window's edges
    are kept, so the stitched output matches whole-file extraction up to the attention context lost at the cut.
    Not so for a front end that normalises over time (``group_norm`` mode, ``ModelConfig.padding_changes_features``):
    its statistics are the window's, and every frame differs a little from whole-file extraction (measured on a
    tiny random model: front-end outputs off by up to 0.09 on values around 0.4).
    """
    conv_layers = model.cfg.extractor_conv_layer_config
    hop = hop_length(conv_layers)
    receptive_field = num_samples_for_frames(1, conv_layers)
    total = num_frames(audio.num_samples, conv_layers)
    window_frames = max(int(settings.window_seconds * SAMPLE_RATE / hop), 1)
    context_frames = int(settings.context_seconds * SAMPLE_RATE / hop)
    for keep_start, keep_end, run_start, run_end in windows(total, window_frames, context_frames):
        wave = audio.read(run_start * hop, (run_end - 1) * hop + receptive_field)
        (result,) = extract_batch(model, [wave], settings, front_end=front_end)
        for key, values in result.items():
            sinks[key][keep_start:keep_end] = values[keep_start - run_start : keep_end - run_start]


# --------------------------------------------------------------------------------------------------------------
# Whole collections → files
# --------------------------------------------------------------------------------------------------------------


def output_stems(entries: Sequence[ManifestEntry]) -> PackedStrings:
    """Output path (without suffix) of each entry, as packed strings: its audio path relative to the deepest common
    folder, with the file name replaced by the file id. Two passes over the paths, no Path object per entry."""
    manifest = _as_manifest(entries)
    # Files beside archive members (a folder's scan and a tar's in one manifest): Python's commonpath refused the
    # mix of absolute and relative folders.
    with_files = manifest.archive_index is not None and bool((manifest.archive_index < 0).any())
    parents: set[str] = set()
    for start in range(0, len(manifest), ITER_CHUNK):
        parents.update(_folders(manifest, start, min(start + ITER_CHUNK, len(manifest)), with_files=with_files))
    root = os.path.commonpath(sorted(parents)) if len(parents) > 1 else next(iter(parents), "")
    cut = len(root.rstrip("/")) + 1 if root else 0  # "" when archive members sit at the top level
    parts = []
    for start in range(0, len(manifest), ITER_CHUNK):
        stop = min(start + ITER_CHUNK, len(manifest))
        ids = manifest.fileids.strings(start, stop)
        _refuse_escaping_ids(ids, manifest, start)
        stems = [f"{parent[cut:]}/{fileid}" if parent != root else fileid
                 for parent, fileid in zip(_folders(manifest, start, stop, with_files=with_files), ids, strict=True)]
        _refuse_escaping_folders(stems, manifest, start)
        parts.append(PackedStrings.from_strings(stems))
    stems = PackedStrings.concatenate(parts)
    _refuse_duplicates(stems, manifest)
    return stems


def relative_stems(entries: Sequence[ManifestEntry]) -> list[Path]:
    """``output_stems`` as a list of paths (convenient for a few files)."""
    return [Path(stem) for stem in output_stems(entries)]


def _as_manifest(entries: Sequence[ManifestEntry]) -> Manifest:
    return entries if isinstance(entries, Manifest) else Manifest.from_entries(entries)


def _paths(manifest: Manifest, start: int, stop: int) -> list[str]:
    """Paths of rows start..stop as their entries hold them (resolved; member names for archive rows)."""
    return [manifest.resolve(p) if manifest.archive_index is None or manifest.archive_index[start + k] < 0 else p
            for k, p in enumerate(manifest.paths.strings(start, stop))]


def _refuse_escaping_ids(ids: Sequence[str], manifest: Manifest, start: int) -> None:
    """Raise, naming the row, if a file id (``ids``: rows ``start``, ``start + 1``, ...) would put its output
    outside the output folder: an absolute path, or a ``..`` part. Such ids wrote features beside the audio (over
    any file of that name) or above OUT, and the extraction said they were done."""
    for offset, fileid in enumerate(ids):
        if os.path.isabs(fileid) or ".." in fileid.replace("\\", "/").split("/"):
            row = start + offset
            raise ValueError(f"{manifest.source}: utterance {row + 1} ({_paths(manifest, row, row + 1)[0]}) has the "
                             f"file id {fileid!r}, which would write its output outside the output folder; a file "
                             "id is a name (or relative path) without '..' parts")


def _folders(manifest: Manifest, start: int, stop: int, *, with_files: bool) -> list[str]:
    """The folder of each row's audio, normalised, for the output tree to mirror where the audio is rather than how
    its path was spelt: a file's absolute folder (``a/../b`` is ``b``, ``../x`` is the folder above), an archive
    member's folder from the archive's root (a leading ``/`` dropped; "" at the top). ``with_files``: the manifest
    also holds plain files, beside which a member's folder is read below its archive's path (``/d/a.tar/spk``)."""
    index = manifest.archive_index[start:stop] if manifest.archive_index is not None else np.full(stop - start, -1)
    folders = []
    for path, archive in zip(_paths(manifest, start, stop), index.tolist(), strict=True):
        if archive < 0:
            folders.append(os.path.dirname(os.path.abspath(path)))
            continue
        folder = os.path.normpath(os.path.dirname(path.lstrip("/")) or ".")
        folder = "" if folder == "." else folder  # ("./a.wav", of `tar -C dir .`, is at the top)
        folders.append(os.path.join(manifest.archives[archive], folder).rstrip("/") if with_files else folder)
    return folders


def _refuse_escaping_folders(stems: Sequence[str], manifest: Manifest, start: int) -> None:
    """Raise, naming the row, if an output path (``stems``: rows ``start``, ...) climbs out of the output folder: an
    archive member with more ``..`` than folders (``spk/../../../victim/x.wav``) wrote its features there, over any
    file of that name, and the extraction said it was done."""
    for offset, stem in enumerate(stems):
        if ".." in stem.split("/"):
            row = start + offset
            raise ValueError(f"{manifest.source}: utterance {row + 1} ({_paths(manifest, row, row + 1)[0]}) is an "
                             "archive member named above the archive's root ('..'), so its features would be "
                             "written outside the output folder")


def _refuse_duplicates(stems: PackedStrings, manifest: Manifest) -> None:
    """Raise, naming both files, if two stems are equal: 64-bit hashes sorted in numpy, candidates then compared as
    strings."""
    hashes = np.fromiter((hash(stem) for stem in stems), dtype=np.int64, count=len(stems))
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    for k in same.tolist():
        a, b = int(order[k]), int(order[k + 1])
        if stems[a] == stems[b]:
            first, second = _paths(manifest, a, a + 1)[0], _paths(manifest, b, b + 1)[0]
            raise ValueError(f"utterances {a + 1} ({first}) and {b + 1} ({second}) both map to the output file "
                             f"{stems[a]!r} (one folder, one file id: e.g. the same name with two extensions); give "
                             "them distinct file ids in a manifest, or leave one out (--ext)")


def length_batches(entries: Sequence[ManifestEntry] | np.ndarray, batch_samples: int) -> Iterator[list[int]]:
    """Indices of ``entries`` (or of an array of lengths) in batches of similar length holding at most
    ``batch_samples`` padded samples: sorted by length, each batch takes entries while (count × longest) fits,
    found with one ``searchsorted`` per batch."""
    if isinstance(entries, np.ndarray):
        lengths = entries.astype(np.int64, copy=False)
    elif isinstance(entries, Manifest):
        lengths = entries.num_samples
    else:
        lengths = np.fromiter((e.num_samples for e in entries), dtype=np.int64, count=len(entries))
    order = np.argsort(lengths, kind="stable")
    ordered = lengths[order]
    begin = 0
    while begin < order.size:
        # costs (k + 1) · ordered[begin + k] grow with k; at most batch_samples // ordered[begin] entries fit
        window = ordered[begin : begin + batch_samples // max(int(ordered[begin]), 1) + 1]
        costs = window * np.arange(1, window.size + 1)
        end = begin + max(int(np.searchsorted(costs, batch_samples, side="right")), 1)
        yield order[begin:end].tolist()
        begin = end


class _Outputs:
    """Where features and unit rows go: atomic ``.npy`` writes into ``OUT/layer_LL/<stem>.npy``."""

    def __init__(self, out_dir: Path, stems: PackedStrings, *, ids_unique: bool = True) -> None:
        self.out_dir = out_dir
        self.stems = stems
        self.ids_unique = ids_unique  # False when several entries hold one file id (spk1/sa1.wav, spk2/sa1.wav)
        self.folders: set[Path] = set()

    def utterance(self, index: int) -> str:
        """The name of entry ``index``'s unit rows: the stem of its feature files (its file id), or, when file ids
        are not unique, their path below the layer folder, as the readers then key the features
        (``StemKeyed.if_unique``) and as ``spidr units`` names its rows."""
        stem = self.stems[index]
        return stem.rsplit("/", 1)[-1] if self.ids_unique else stem

    def path(self, key: str, index: int) -> Path:
        path = self.out_dir / key / f"{self.stems[index]}.npy"
        if path.parent not in self.folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.folders.add(path.parent)
        return path

    def save(self, key: str, index: int, values: np.ndarray) -> None:
        path = self.path(key, index)
        with replaced_when_done(path) as partial, partial.open("wb") as handle:
            np.save(handle, values.astype(np.float32, copy=False))


def _unit_row(name: str, path: str, units: np.ndarray) -> str:
    """A units row keyed by ``name`` as the features are (the manifest's file id, which need not be the audio file's
    stem), with the audio path for reference."""
    return json.dumps({"name": name, "audio": path, "units": units.tolist()}) + "\n"


# What an extraction writes in its output folder (beside its journal, spidr.eval.journal.STATE_DIR).
EXTRACTION_OUTPUTS = ("layer_[0-9]*", "codebook_units", "kmeans_units", "metadata.json")


@dataclass(frozen=True)
class KMeansUnits:
    """K-means units of one layer, written by an extraction as ``OUT/kmeans_units/layer_LL.jsonl``: each frame's
    nearest centroid (``spidr.eval.kmeans.assign_units``), as ``spidr units`` gives on that layer's features."""

    layer: int  # 1-based
    centroids: torch.Tensor  # (K, D)
    source: str = ""  # where they come from (their file), recorded beside the units

    @property
    def key(self) -> str:
        """The journal's name of its units file (``spidr.eval.journal.units_file``)."""
        return f"kmeans_layer_{self.layer:02d}"

    def fingerprint(self) -> str:
        return hashlib.sha1(self.centroids.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class _Plan:
    """What a directory extraction computes and what it writes of it."""

    saved: ExtractionSettings  # the features written (``saved.layers``) and codebook units
    kmeans: Mapping[int, KMeansUnits]  # layer → its k-means units

    @property
    def computed(self) -> ExtractionSettings:
        """The forward's settings: the saved layers and those of the k-means units."""
        return replace(self.saved, layers=tuple(sorted({*self.saved.layers, *self.kmeans})))

    @property
    def writes_units(self) -> bool:
        return self.saved.codebooks or bool(self.kmeans)


def _check_kmeans(model: torch.nn.Module, kmeans: Sequence[KMeansUnits]) -> dict[int, KMeansUnits]:
    """``kmeans`` by layer, each checked against the model (its layer, its centroids' dimension)."""
    by_layer: dict[int, KMeansUnits] = {}
    for units in kmeans:
        where = f"k-means units of layer {units.layer}" + (f" ({units.source})" if units.source else "")
        if not 1 <= units.layer <= model.num_layers:
            raise ValueError(f"{where}: the model has layers 1..{model.num_layers} (1-based)")
        if units.layer in by_layer:
            raise ValueError(f"{where}: that layer's k-means units are asked for twice")
        if units.centroids.ndim != 2 or units.centroids.shape[1] != model.cfg.encoder_embed_dim:
            raise ValueError(f"{where}: centroids of shape {tuple(units.centroids.shape)}, but the layer's features "
                             f"have dimension {model.cfg.encoder_embed_dim}: centroids of another model?")
        by_layer[units.layer] = units
    return by_layer


def extract_to_directory(
    model: torch.nn.Module,
    entries: Sequence[ManifestEntry],
    out_dir: str | Path,
    settings: ExtractionSettings,
    *,
    checkpoint: str = "",
    progress: bool = True,
    restart: bool = False,
    replace_other: bool = False,
    kmeans: Sequence[KMeansUnits] = (),
) -> dict[str, object]:
    """Extract every entry and write features (and units) under ``out_dir``; returns the metadata written.
    ``kmeans``: also the k-means units of these layers (``KMeansUnits``), whether or not their features are
    written (``settings.layers``).

    Resumable: an extraction that was killed continues where it stopped, skipping every finished utterance (see
    ``spidr.eval.journal``); ``restart=True`` starts over. A folder holding another extraction (other model,
    utterances or settings) is refused, or started over with ``replace_other=True``. Each ``.npy`` is written
    under a temporary name and renamed, so no truncated feature file is ever left; unit rows are appended to their
    JSONL batch by batch.
    Unreadable files are skipped, listed in the metadata and logged once each. One extraction at a time writes into
    ``out_dir`` (``spidr.folder_lock``): a second one is refused while the first runs (their unit rows interleaved).
    ``extract_part`` splits the work between processes.
    """
    outcome = extract_part(model, entries, out_dir, settings, WHOLE, checkpoint=checkpoint, progress=progress,
                           restart=restart, replace_other=replace_other, kmeans=kmeans)
    assert outcome.metadata is not None  # (the whole extraction has no other part to wait for)
    return outcome.metadata


@dataclass(frozen=True)
class PartOutcome:
    """What ``extract_part`` did: this part's files, and the extraction's metadata once every part is finished."""

    num_files: int  # of this part, extracted by this run and earlier ones
    skipped: dict[str, str]  # of this part: location → reason
    metadata: dict[str, object] | None  # the extraction's (metadata.json), None while other parts are unfinished
    unfinished: tuple[Shard, ...]  # the other parts still to run (or running)
    wrote_metadata: bool = True  # False where the extraction was finished before this run


def extract_part(
    model: torch.nn.Module,
    entries: Sequence[ManifestEntry],
    out_dir: str | Path,
    settings: ExtractionSettings,
    shard: Shard,
    *,
    checkpoint: str = "",
    progress: bool = True,
    restart: bool = False,
    replace_other: bool = False,
    kmeans: Sequence[KMeansUnits] = (),
) -> PartOutcome:
    """``extract_to_directory`` for part ``shard`` of the entries (``spidr.eval.shards``), into the folder that every
    part writes: run each part once, in any order or at once, from processes that share ``out_dir``. The part that
    finishes last joins the parts' unit rows into ``OUT/codebook_units/`` and writes ``metadata.json``, so the
    folder then holds what one whole extraction writes (unit rows in another order). ``restart`` starts this part
    over (all of them, in a folder that holds a finished extraction or another one)."""
    from tqdm import tqdm

    from spidr.eval.journal import (
        ExtractionJournal,
        UnitsFiles,
        entries_fingerprint,
        model_fingerprint,
        remove_part_units,
    )

    out_dir = Path(out_dir)
    model.eval()
    plan = _Plan(settings, _check_kmeans(model, kmeans))
    manifest = _as_manifest(entries)
    outputs = _Outputs(out_dir, output_stems(manifest), ids_unique=not repeated_strings(manifest.fileids))
    is_long = manifest.num_samples > int(settings.max_seconds * SAMPLE_RATE)  # archive members too (decoded whole)
    mine = shard.members(manifest.num_samples)
    # Unit rows were keyed by the audio file's stem alone before they carried "name": a folder begun then is not
    # topped up with rows keyed otherwise.
    identity = {"settings": {k: v for k, v in asdict(settings).items() if k != "batch_seconds"},
                "model": model_fingerprint(model), "utterances": entries_fingerprint(manifest),
                **precision_identity(settings.dtype), **({"unit_rows": "name"} if settings.codebooks else {}),
                # Features of such a model changed when it stopped running padded (see extract_batch).
                **({"front_end_batching": "unpadded"} if model.cfg.padding_changes_features else {}),
                # Long archive members ran in one forward before they ran in windows like other long files.
                **({"long_archive_members": "windowed"} if _in_archive(manifest)[is_long].any() else {}),
                **({} if shard.is_whole else {"parts": shard.count}),
                **({"kmeans": {f"{layer:02d}": units.fingerprint() for layer, units in sorted(plan.kmeans.items())}}
                   if plan.kmeans else {})}
    bookkeeping = f"the bookkeeping of the extraction into {out_dir}"
    with folder_lock(out_dir, bookkeeping, wait=True):  # brief: the parts set up and finish one at a time
        if not (shard.is_whole or restart):
            finished = _finished_metadata(out_dir, identity)
            if finished is not None:  # (its parts' unit rows are in codebook_units/ now)
                logger.info("%s holds the finished extraction: part %s has nothing left to do", out_dir, shard)
                # (the parts' units files that a kill after metadata.json left behind)
                remove_part_units(out_dir, [Shard(k, shard.count) for k in range(1, shard.count + 1)])
                return PartOutcome(int(mine.sum()), {}, finished, (), wrote_metadata=False)
        journal = ExtractionJournal(out_dir, identity, num_entries=len(manifest), restart=restart,
                                    replace_other=replace_other, outputs=EXTRACTION_OUTPUTS, shard=shard)
    units = None
    try:
        if plan.writes_units:
            units = UnitsFiles(out_dir if shard.is_whole else journal.part_dir, journal.units_bytes)
        bar = tqdm(total=int(mine.sum()), initial=int((journal.done & mine).sum()), unit="file",
                   desc="extract" if shard.is_whole else f"extract {shard}", disable=not progress)
        _extract_entries(model, manifest, np.flatnonzero(mine & ~journal.done), is_long=is_long, outputs=outputs,
                         plan=plan, journal=journal, units=units, bar=bar)
        num_files = int(mine.sum()) - len(journal.skipped)
        if shard.is_whole:  # (still holding the folder: nothing can start it over before metadata.json is written)
            _refuse_nothing_read(len(manifest), journal.skipped)
            metadata = _write_metadata(out_dir, model, plan, checkpoint=checkpoint, num_files=num_files,
                                       skipped=journal.skipped)
            return PartOutcome(num_files, dict(journal.skipped), metadata, ())
        with folder_lock(out_dir, bookkeeping, wait=True):
            try:
                finished = _finished_metadata(out_dir, identity)
                if finished is not None:  # another part, which ended at the same time, joined them all already
                    return PartOutcome(num_files, dict(journal.skipped), finished, (), wrote_metadata=False)
                return _finish_parts(model, manifest, out_dir, plan, shard, checkpoint=checkpoint,
                                     num_files=num_files, own_skipped=journal.skipped)
            finally:  # (this part's lock goes first: a restart waiting for the folder then finds no part running)
                journal.close()
    finally:
        journal.close()
        if units is not None:
            units.close()


def _extract_entries(model: torch.nn.Module, manifest: Manifest, todo: np.ndarray, *, is_long: np.ndarray,
                     outputs: _Outputs, plan: _Plan, journal: Any, units: Any, bar: Any) -> None:
    """Extract ``manifest[todo]``: short files in padded batches of similar length, then long ones window by
    window; each batch is journaled once its files are in place."""

    def finish(indices: np.ndarray, rows: dict[str, list[str]], skipped: dict[str, str]) -> None:
        if units is not None:
            for key, lines in rows.items():
                units.append(key, lines)
        journal.record(indices, skipped, units.sizes() if units is not None else {})

    short, long = todo[~is_long[todo]], todo[is_long[todo]]
    batches = (short[batch] for batch in length_batches(manifest.num_samples[short],
                                                        int(plan.saved.batch_seconds * SAMPLE_RATE)))
    try:
        for indices, waves, kept, skipped in loaded_batches(model, manifest, batches):
            finish(indices, _extract_short_batch(model, manifest, waves, kept, outputs=outputs, plan=plan), skipped)
            bar.update(len(indices))
        for index in long.tolist():
            entry, rows, skipped = manifest[index], {}, {}
            try:
                rows = _extract_long_file(model, entry, outputs=outputs, index=index, plan=plan)
            except AudioError as error:  # see iter_extracted: only a decoding failure skips a long file
                skipped[entry.location] = error.reason
                logger.warning("skipping %s: %s", entry.location, error.reason)
            finish(np.asarray([index]), rows, skipped)
            bar.update(1)
    finally:
        bar.close()


def _finished_metadata(out_dir: Path, identity: Mapping[str, Any]) -> dict[str, object] | None:
    """The ``metadata.json`` of the finished extraction of ``identity`` that ``out_dir`` holds, or None."""
    from spidr.eval.journal import STATE_DIR, recorded_identity

    try:
        state = json.loads((out_dir / STATE_DIR / "state.json").read_text(encoding="utf-8"))
        metadata = json.loads((out_dir / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metadata if state == recorded_identity(identity) else None


def _finish_parts(model: torch.nn.Module, manifest: Manifest, out_dir: Path, plan: _Plan, shard: Shard, *,
                  checkpoint: str, num_files: int, own_skipped: dict[str, str]) -> PartOutcome:
    """After part ``shard``, under the folder's bookkeeping lock: once every part is finished (this one was the
    last), join their unit rows and write ``metadata.json``."""
    from spidr.eval.journal import join_part_units, part_states, remove_part_units

    states = part_states(out_dir, shard.count, len(manifest))
    unfinished = tuple(part for part, state in states.items()
                       if not state.done[part.members(manifest.num_samples)].all())
    if unfinished:
        return PartOutcome(num_files, dict(own_skipped), None, unfinished, wrote_metadata=False)
    skipped = {location: reason for state in states.values() for location, reason in state.skipped.items()}
    _refuse_nothing_read(len(manifest), skipped)
    if plan.writes_units:
        join_part_units(out_dir, states)
    metadata = _write_metadata(out_dir, model, plan, checkpoint=checkpoint, num_files=len(manifest) - len(skipped),
                               skipped=skipped)
    remove_part_units(out_dir, list(states))
    return PartOutcome(num_files, dict(own_skipped), metadata, ())


def _write_metadata(out_dir: Path, model: torch.nn.Module, plan: _Plan, *, checkpoint: str, num_files: int,
                    skipped: Mapping[str, str]) -> dict[str, object]:
    """Write the record beside each k-means units file (what ``spidr units`` writes beside its own), then
    ``OUT/metadata.json``, which marks the extraction finished; returns the metadata as a reader gets it back
    (lists, not tuples), whichever run wrote it."""
    from spidr.eval.feature_dir import units_metadata_path
    from spidr.eval.journal import units_file
    from spidr.eval.kmeans import ASSIGNMENT

    metadata = _metadata(model, plan.saved, checkpoint=checkpoint, num_files=num_files, skipped=dict(skipped))
    for layer, units in sorted(plan.kmeans.items()):
        path = units_file(out_dir, units.key)
        record = {"frame_rate_hz": metadata["frame_rate_hz"], "num_units": int(units.centroids.shape[0]),
                  "dedup": False, "features": f"layer {layer} of {checkpoint or 'the model'} (spidr extract)",
                  "centroids": units.source, "assignment": ASSIGNMENT, "num_utterances": num_files,
                  "units_file_bytes": path.stat().st_size if path.is_file() else 0}
        write_atomically(units_metadata_path(path), json.dumps(record, indent=2) + "\n")
    if plan.kmeans:
        metadata["kmeans"] = {str(layer): {"centroids": units.source, "num_units": int(units.centroids.shape[0])}
                              for layer, units in sorted(plan.kmeans.items())}
    text = json.dumps(metadata, indent=1)
    write_atomically(out_dir / "metadata.json", text)
    return json.loads(text)


def _refuse_nothing_read(num_entries: int, skipped: Mapping[str, str]) -> None:
    """No metadata.json (not a finished extraction) when not one file could be read."""
    if num_entries and len(skipped) >= num_entries:
        examples = "; ".join(f"{location}: {reason}" for location, reason in list(skipped.items())[:3])
        raise ValueError(f"none of the {num_entries} files could be read, so nothing was extracted (e.g. "
                         f"{examples})")


def _in_archive(manifest: Manifest) -> np.ndarray:
    """(N,) bool: which rows are archive members."""
    if manifest.archive_index is None:
        return np.zeros(len(manifest), dtype=bool)
    return manifest.archive_index >= 0


def load_model_input(entry: ManifestEntry, conv_layers: Sequence[ConvLayer]) -> torch.Tensor:
    """The standardised 16 kHz waveform (S,) of ``entry`` for a model with ``conv_layers``; ``AudioError`` for an
    unreadable file and for one shorter than a frame (the model would refuse the whole batch)."""
    wave = load_audio(entry, normalize=True)
    if num_frames(wave.shape[0], conv_layers) < 1:
        raise AudioError(entry.location, f"is shorter than one frame ({wave.shape[0]} samples; the front end's "
                                         f"receptive field is {num_samples_for_frames(1, conv_layers)})")
    return wave


def _extract_short_batch(
    model: torch.nn.Module, manifest: Manifest, waves: list[torch.Tensor], kept: list[int], *, outputs: _Outputs,
    plan: _Plan
) -> dict[str, list[str]]:
    """Run the inputs ``waves`` of entries ``kept`` as one padded batch and save their features; returns their unit
    rows by units file (``spidr.eval.journal.units_file``)."""
    from spidr.eval.kmeans import assign_units

    rows: dict[str, list[str]] = {}
    for index, result in zip(kept, extract_batch(model, waves, plan.computed) if waves else [], strict=True):
        name, path = outputs.utterance(index), manifest[index].path
        for key, values in result.items():
            if not key.startswith("layer_"):
                rows.setdefault(f"layer_{key.removeprefix('units_')}", []).append(_unit_row(name, path, values))
                continue
            layer = int(key.removeprefix("layer_"))
            if layer in plan.saved.layers:
                outputs.save(key, index, values)
            if layer in plan.kmeans:
                units = plan.kmeans[layer]
                rows.setdefault(units.key, []).append(_unit_row(name, path, assign_units(values, units.centroids)))
    return rows


# Threads that decode the next batches while the model runs: one thread decodes FLAC at ~3,000× real time (Xeon), which
# would hold a GPU's extraction well below its speed; a few batches ahead keep memory bounded.
DECODE_THREADS = min(4, os.cpu_count() or 1)


def loaded_batches(model: torch.nn.Module, entries: Sequence[ManifestEntry],
                   batches: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, list[torch.Tensor], list[int],
                                                                    dict[str, str]]]:
    """For each batch of entry indices, in order: the indices, the readable inputs (``load_model_input``), their
    indices, and the unreadable ones (location → reason, logged once each). Decoded by ``DECODE_THREADS`` threads up
    to ``DECODE_THREADS + 1`` batches ahead of the caller, so decoding overlaps the forward passes."""
    batches = iter(batches)
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="spidr-decode") as pool:

        def submit_next() -> None:
            indices = next(batches, None)
            if indices is not None:
                pending.append((indices, pool.submit(_load_batch, model, entries, indices)))

        for _ in range(DECODE_THREADS + 1):
            submit_next()
        try:
            while pending:
                indices, future = pending.popleft()
                submit_next()
                yield (indices, *future.result())
        finally:  # (stopped early: what has not started is dropped, the pool waits for what runs)
            for _, future in pending:
                future.cancel()


def _load_batch(model: torch.nn.Module, entries: Sequence[ManifestEntry],
                indices: np.ndarray) -> tuple[list[torch.Tensor], list[int], dict[str, str]]:
    skipped: dict[str, str] = {}
    waves, kept = _load_inputs(model, entries, indices.tolist(), skipped)
    return waves, kept, skipped


def _load_inputs(model: torch.nn.Module, entries: Sequence[ManifestEntry], indices: Sequence[int],
                 skipped: dict[str, str]) -> tuple[list[torch.Tensor], list[int]]:
    """The model inputs of ``entries[indices]`` that can be read (``load_model_input``) and their indices; the
    others go to ``skipped`` (location → reason), with a warning."""
    waves, kept = [], []
    for index in indices:
        try:
            waves.append(load_model_input(entries[index], model.cfg.extractor_conv_layer_config))
            kept.append(index)
        except AudioError as error:
            logger.warning("skipping %s: %s", entries[index].location, error.reason)
            skipped[entries[index].location] = error.reason
    return waves, kept


def _metadata(model: torch.nn.Module, settings: ExtractionSettings, *, checkpoint: str, num_files: int,
              skipped: dict[str, str]) -> dict[str, object]:
    return {
        "checkpoint": checkpoint,
        "model_type": model.cfg.model_type,
        "layers": list(settings.layers),
        "layer_indexing": "1-based (layer l is list index l - 1 of get_intermediate_outputs)",
        "before_residual": settings.before_residual,
        "frame_rate_hz": SAMPLE_RATE / hop_length(model.cfg.extractor_conv_layer_config),
        "codebook_size": model.cfg.codebook_size,  # the vocabulary of codebook_units/
        "codebook_layers": list(model.head_layers) if settings.codebooks else [],  # its files' layers
        "normalisation": "per-utterance standardisation (zero mean, unit biased variance, eps 1e-5)",
        "settings": asdict(settings),
        "num_files": num_files,
        "skipped": skipped,
    }


def iter_extracted(
    model: torch.nn.Module,
    entries: Sequence[ManifestEntry],
    settings: ExtractionSettings,
    *,
    front_end: bool = False,
    keep: Callable[[str, np.ndarray], np.ndarray] | None = None,
    skipped: dict[str, str] | None = None,
) -> Iterator[tuple[ManifestEntry, dict[str, np.ndarray]]]:
    """``extract_batch``'s results for every readable entry, with bounded memory whatever the file lengths.

    Files up to ``settings.max_seconds`` run in padded length batches; longer ones window by window
    (``extract_long``, as ``spidr extract`` does), so that no forward reads more than ``max_seconds`` of audio
    (attention memory grows with the square of a forward's length: a 1-hour file in one forward needs tens of GB).
    ``keep(key, values)`` maps each result (T, …) to what is kept of it, applied to a file's frames or to each
    window's consecutive frames, then concatenated: the units of a long file, or a sample of its frames, without
    holding its features whole. Yields ``(entry, {key: kept values})``: short files in batch order, then long
    ones. Unreadable files and files shorter than one frame go to ``skipped`` (location → reason), logged once.
    """
    keep = keep or (lambda _key, values: values)
    skipped = skipped if skipped is not None else {}
    lengths = np.fromiter((entry.num_samples for entry in entries), dtype=np.int64, count=len(entries))
    is_long = lengths > int(settings.max_seconds * SAMPLE_RATE)
    short, long = np.flatnonzero(~is_long), np.flatnonzero(is_long)
    model.eval()
    batches = (short[batch] for batch in length_batches(lengths[short], int(settings.batch_seconds * SAMPLE_RATE)))
    for _, waves, kept, batch_skipped in loaded_batches(model, entries, batches):
        skipped.update(batch_skipped)
        for index, result in zip(kept, extract_batch(model, waves, settings, front_end=front_end) if waves else [],
                                 strict=True):
            yield entries[index], {key: keep(key, values) for key, values in result.items()}
    for index in long.tolist():
        entry, sinks = entries[index], _KeptWindows(keep)
        try:
            extract_long(model, LongAudio(entry), settings, sinks, front_end=front_end)
        except AudioError as error:
            # LongAudio turns every decoding failure into an AudioError (a FLAC cut short, a corrupt MP3 frame). Any
            # other error, the model's included (an out-of-memory error is a RuntimeError), stops the run rather
            # than leaving the file out unnoticed.
            skipped[entry.location] = error.reason
            logger.warning("skipping %s: %s", entry.location, error.reason)
            continue
        yield entry, sinks.arrays()


class _KeptWindows(dict):
    """``extract_long``'s sinks for ``iter_extracted``: what ``keep`` keeps of each window, by key, in order."""

    def __init__(self, keep: Callable[[str, np.ndarray], np.ndarray]) -> None:
        super().__init__()
        self.keep = keep

    def __missing__(self, key: str) -> _KeptParts:
        self[key] = _KeptParts(key, self.keep)
        return self[key]

    def arrays(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate(parts.parts) for key, parts in self.items()}


class _KeptParts:
    """One key's kept windows (``sink[a:b] = values`` appends ``keep(key, values)``; windows come in order)."""

    def __init__(self, key: str, keep: Callable[[str, np.ndarray], np.ndarray]) -> None:
        self.key, self.keep, self.parts = key, keep, []

    def __setitem__(self, _frames: slice, values: np.ndarray) -> None:
        self.parts.append(self.keep(self.key, values))


def iter_units(
    model: torch.nn.Module,
    entries: Sequence[ManifestEntry],
    *,
    layers: Sequence[int],
    centroids: Mapping[int, torch.Tensor] | None = None,
    batch_seconds: float = 60.0,
    max_seconds: float = 60.0,
    dtype: str = "float32",
    skipped: dict[str, str] | None = None,
) -> Iterator[tuple[ManifestEntry, dict[int, np.ndarray]]]:
    """Discrete units of ``layers`` for every readable entry, batch by batch (nothing else is kept in memory).

    A layer's units are the nearest of ``centroids[layer]`` (k-means) when given, else the arg-max of that layer's
    prediction head (codebook units). Yields ``(entry, {layer: (T,) int64})``; files longer than ``max_seconds``
    run window by window (``iter_extracted``); unreadable files and files shorter than one frame go to
    ``skipped``.
    """
    from spidr.eval.kmeans import assign_units

    centroids = dict(centroids or {})
    head_layers = set(model.head_layers)
    missing = sorted(layer for layer in layers if layer not in centroids and layer not in head_layers)
    if missing:
        raise ValueError(f"layer(s) {missing} have no codebook head (heads: {sorted(head_layers)}); give k-means "
                         "centroids for them")
    wanted = {f"layer_{layer:02d}" if layer in centroids else f"units_{layer:02d}": layer for layer in layers}
    settings = ExtractionSettings(layers=tuple(sorted({*layers})),
                                  codebooks=any(layer not in centroids for layer in layers),
                                  batch_seconds=batch_seconds, dtype=dtype, **window_settings(max_seconds))

    def units(key: str, values: np.ndarray) -> np.ndarray:
        if key not in wanted:  # features of a head layer, or units of a k-means layer
            return values[:0, ...]
        layer = wanted[key]
        return assign_units(values, centroids[layer]) if layer in centroids else values.astype(np.int64)

    for entry, result in iter_extracted(model, entries, settings, keep=units, skipped=skipped):
        yield entry, {layer: result[key] for key, layer in wanted.items()}


class NpyAppender:
    """A (rows, cols) float32 ``.npy`` file written front to back, slice by slice (``appender[a:b] = values``).

    Unlike a memory map, written rows leave memory at once, so writing a 1-hour file costs no more than a window.
    Rows go to a hidden temporary file (``spidr.atomic_files.new_partial_path``), renamed to ``path`` by ``close`` once
    every row is written: a killed process never leaves a truncated ``.npy``.
    """

    def __init__(self, path: Path, rows: int, cols: int) -> None:
        self.path, self.rows, self.written = path, rows, 0
        self.partial = new_partial_path(path)
        self.file = self.partial.open("wb")
        self.held = hold_partial(self.partial)  # (this writer lives: other processes' sweeps keep the file)
        np.lib.format.write_array_header_1_0(
            self.file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                        "shape": (rows, cols)}
        )

    def __setitem__(self, rows: slice, values: np.ndarray) -> None:
        if rows.start != self.written:
            raise RuntimeError(f"{self.path}: rows must be written in order (next {self.written}, got {rows.start})")
        if len(values) != rows.stop - rows.start or rows.stop > self.rows:  # the header's shape would be a lie
            raise RuntimeError(f"{self.path}: {len(values)} rows given for rows {rows.start}-{rows.stop} of "
                               f"{self.rows}")
        self.file.write(np.ascontiguousarray(values, dtype=np.float32).tobytes())
        self.written = rows.stop

    def close(self) -> None:
        self.file.close()
        try:
            if self.written != self.rows:
                self.partial.unlink(missing_ok=True)
                raise RuntimeError(f"{self.path}: wrote {self.written} of {self.rows} rows")
            os.replace(self.partial, self.path)
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the temporary file's lock (once it is renamed or removed)."""
        if self.held is not None:
            self.held.close()
            self.held = None


def _extract_long_file(
    model: torch.nn.Module, entry: ManifestEntry, *, outputs: _Outputs, index: int, plan: _Plan
) -> dict[str, list[str]]:
    """Window a long file into its ``layer_LL/<stem>.npy`` files, written as they come; returns its unit rows."""
    audio = LongAudio(entry)
    total = num_frames(audio.num_samples, model.cfg.extractor_conv_layer_config)
    sinks: dict[str, Any] = {}
    for layer in plan.computed.layers:
        key = f"layer_{layer:02d}"
        saved = (NpyAppender(outputs.path(key, index), total, model.cfg.encoder_embed_dim)
                 if layer in plan.saved.layers else None)
        sinks[key] = _KMeansSink(plan.kmeans[layer], total, saved) if layer in plan.kmeans else saved
    for layer in model.head_layers if plan.saved.codebooks else ():
        sinks[f"units_{layer:02d}"] = np.zeros(total, dtype=np.int64)
    appenders = [sink.saved if isinstance(sink, _KMeansSink) else sink for sink in sinks.values()]
    appenders = [sink for sink in appenders if isinstance(sink, NpyAppender)]
    try:
        extract_long(model, audio, plan.computed, sinks)
    except BaseException:
        for sink in appenders:
            sink.file.close()
            sink.partial.unlink(missing_ok=True)
            sink.release()
        raise
    rows, name = {}, outputs.utterance(index)
    for key, values in sinks.items():
        if key.startswith("units_"):
            rows[f"layer_{key.removeprefix('units_')}"] = [_unit_row(name, entry.path, values)]
        elif isinstance(values, _KMeansSink):
            rows[values.kmeans.key] = [_unit_row(name, entry.path, values.units)]
    for appender in appenders:
        appender.close()
    return rows


class _KMeansSink:
    """A long file's sink for one layer's windows (``extract_long``): the k-means units of each window's frames,
    and the frames themselves on to ``saved`` where that layer's features are written too."""

    def __init__(self, kmeans: KMeansUnits, total: int, saved: NpyAppender | None) -> None:
        self.kmeans, self.saved = kmeans, saved
        self.units = np.zeros(total, dtype=np.int64)

    def __setitem__(self, frames: slice, values: np.ndarray) -> None:
        from spidr.eval.kmeans import assign_units

        self.units[frames] = assign_units(values, self.kmeans.centroids)
        if self.saved is not None:
            self.saved[frames] = values
