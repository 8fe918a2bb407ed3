"""Per-layer features and codebook units from a model, in memory: one padded batch (``extract_batch``), a long
file window by window (``extract_long``), or every utterance of a collection (``iter_extracted``, ``iter_units``).
``spidr.eval.folder_extraction`` writes them to a folder.

Audio is standardised per utterance exactly as in pretraining (spec §3.1). Utterances are batched by length with
padding and a frame padding mask, so a padded batch gives the same features as one file at a time. Files longer
than ``max_seconds`` are processed in overlapping windows whose memory is bounded by the window size: the audio is
read from disk window by window (files at other rates resampled as a stream; archive members decoded whole). The
next batches' audio is decoded by background threads while the model runs (``loaded_batches``).
"""

from __future__ import annotations

import collections
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch

from spidr.atomic_files import naming_errors, new_held_partial
from spidr.config import ConvLayer, num_samples_for_frames
from spidr.data import SAMPLE_RATE
from spidr.data.audio import AudioError, decoding, load_audio
from spidr.data.manifest import Manifest, ManifestEntry
from spidr.eval.nearest_centroid import NearestCentroid
from spidr.model_modes import eval_mode
from spidr.models.frames import hop_length, num_frames, padding_mask_from_lengths
from spidr.models.inference_precision import bfloat16_inference

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

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple | list) or not all(
                isinstance(layer, numbers.Integral) and not isinstance(layer, bool | np.bool_)
                for layer in self.layers):
            raise ValueError(f"ExtractionSettings.layers = {self.layers!r}: expected a tuple of 1-based layer "
                             "numbers, e.g. (6,) or (1, 2, 3)")
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))  # (numpy's as Python's)
        if self.dtype not in ("float32", "bfloat16"):  # (any other name ran in bfloat16)
            raise ValueError(f"ExtractionSettings.dtype = {self.dtype!r} is invalid: expected 'float32' or 'bfloat16'")
        for name in ("batch_seconds", "max_seconds", "window_seconds"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"ExtractionSettings.{name} = {getattr(self, name)!r} must be a finite number > 0")
        if not 0 <= self.context_seconds < math.inf:
            raise ValueError(f"ExtractionSettings.context_seconds = {self.context_seconds!r} must be a finite "
                             "number >= 0")


class NonFiniteFeaturesError(ValueError):
    """A layer's features of waveform ``row`` of a batch hold a NaN or an infinity, so it has no k-means unit (a
    diverged checkpoint). ``naming(what)`` is the error a caller raises, naming the file or waveform ``what``."""

    DETAIL = "hold non-finite values (a NaN or infinite weight in the checkpoint?): no k-means unit is nearest"

    def __init__(self, row: int, layer: int) -> None:
        super().__init__(f"waveform {row} of the batch: layer {layer}'s features {self.DETAIL}")
        self.row, self.layer = row, layer

    def naming(self, what: str) -> ValueError:
        return ValueError(f"{what}: layer {self.layer}'s features {self.DETAIL}")


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


def extract_batch(
    model: torch.nn.Module, waveforms: Sequence[torch.Tensor], settings: ExtractionSettings, *,
    front_end: bool = False, kmeans: Mapping[int, NearestCentroid] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Features of standardised waveforms [(S_i,)] held in memory, any number and any lengths, as ``spidr extract``
    runs them: padded batches of similar lengths holding at most ``settings.batch_seconds`` of padded audio each,
    and a waveform longer than ``settings.max_seconds`` window by window (``extract_long``), so that memory stays
    bounded. The model runs in eval mode (a model in training mode is put back in it after).

    Returns one dict per utterance, in order: ``"layer_LL"`` → (T_i, D) float32 and, with codebooks, ``"units_LL"``
    → (T_i,) int64 arg-max of layer LL's head, for each layer with a head (none for a model without heads, such as
    an exported student: ``spidr evaluate`` then reports features alone). ``kmeans`` (layer → its centroids) adds
    ``"kmeans_LL"`` → (T_i,) int64, the nearest centroid of each of that layer's frames, found where the model runs
    (a layer that is not in ``settings.layers`` never leaves it). T_i = frames of S_i alone, and padding never
    changes a result (see ``extract_padded_batch``). With ``front_end``, also ``"front_end"`` → (T_i, C), the front
    end's output (conv stack or log-mel), and ``"projection"`` → (T_i, D), the Transformer's input (before its
    positional convolution), from the same forward pass.
    """
    _check_request(model, settings, kmeans or {})
    conv_layers = model.cfg.extractor_conv_layer_config
    for row, wave in enumerate(waveforms):
        if not isinstance(wave, torch.Tensor) or wave.ndim != 1:
            shape = tuple(wave.shape) if hasattr(wave, "shape") else None
            raise ValueError(f"waveforms[{row}] is a {type(wave).__name__} of shape {shape}: expected a (S,) torch "
                             "tensor, one utterance per item (torch.from_numpy converts an array)")
        if num_frames(wave.shape[0], conv_layers) < 1:
            raise ValueError(f"waveforms[{row}] is shorter than one frame ({wave.shape[0]} samples; the front end's "
                             f"receptive field is {num_samples_for_frames(1, conv_layers)})")
    lengths = np.fromiter((wave.shape[0] for wave in waveforms), dtype=np.int64, count=len(waveforms))
    batches, long = planned_batches(lengths, settings)
    results: list[dict[str, np.ndarray]] = [{} for _ in waveforms]
    with eval_mode(model):
        for batch in batches:
            rows = batch.tolist()
            try:
                padded = extract_padded_batch(model, [waveforms[row] for row in rows], settings,
                                              front_end=front_end, kmeans=kmeans)
            except NonFiniteFeaturesError as error:
                raise error.naming(f"waveforms[{rows[error.row]}]") from None
            for row, result in zip(rows, padded, strict=True):
                results[row] = result
        for row in long.tolist():
            sinks = _KeptWindows(lambda _key, values: values)
            try:
                extract_long(model, LongAudio.from_waveform(waveforms[row]), settings, sinks, front_end=front_end,
                             kmeans=kmeans)
            except NonFiniteFeaturesError as error:
                raise error.naming(f"waveforms[{row}]") from None
            results[row] = sinks.arrays()
    return results


def _check_request(model: torch.nn.Module, settings: ExtractionSettings,
                   kmeans: Mapping[int, NearestCentroid]) -> None:
    """Refuse layers the model lacks, and a request of nothing."""
    bad = [layer for layer in (*settings.layers, *kmeans) if not 1 <= layer <= model.num_layers]
    if not (settings.layers or kmeans or (settings.codebooks and model.num_codebooks)) or bad:
        asked = f"layers {list(settings.layers)}" + (f" and k-means units of {sorted(kmeans)}" if kmeans else "")
        raise ValueError(f"{asked}: expected at least one of the model's layers 1 to {model.num_layers}"
                         f"{f' ({bad} are not)' if bad else ''}, or codebook or k-means units alone")


@torch.inference_mode()
def extract_padded_batch(
    model: torch.nn.Module, waveforms: Sequence[torch.Tensor], settings: ExtractionSettings, *,
    front_end: bool = False, kmeans: Mapping[int, NearestCentroid] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``extract_batch``'s results for standardised waveforms [(S_i,)], each at least one frame long, run as one
    padded batch whatever its size (the caller plans batches and windows; the model is in eval mode).

    Padding never changes a result: a model whose front end normalises over the padded time axis
    (``ModelConfig.padding_changes_features``) runs each group of equal-length waveforms as its own unpadded batch.
    """
    kmeans = kmeans or {}
    _check_request(model, settings, kmeans)
    if not waveforms:
        return []
    if model.cfg.padding_changes_features:
        rows_by_length: dict[int, list[int]] = {}
        for row, wave in enumerate(waveforms):
            rows_by_length.setdefault(wave.shape[0], []).append(row)
        if len(rows_by_length) > 1:
            results: list[dict[str, np.ndarray]] = [{} for _ in waveforms]
            for rows in rows_by_length.values():
                try:
                    group = _extract_padded(model, [waveforms[row] for row in rows], settings, front_end=front_end,
                                            kmeans=kmeans)
                except NonFiniteFeaturesError as error:  # (its row in the group, as the batch's)
                    raise NonFiniteFeaturesError(rows[error.row], error.layer) from None
                for row, result in zip(rows, group, strict=True):
                    results[row] = result
            return results
    return _extract_padded(model, waveforms, settings, front_end=front_end, kmeans=kmeans)


def _extract_padded(
    model: torch.nn.Module, waveforms: Sequence[torch.Tensor], settings: ExtractionSettings, *, front_end: bool,
    kmeans: Mapping[int, NearestCentroid],
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
            outputs, codebooks = _forward(model, batch, padding_mask, settings, max(kmeans, default=0))
        finally:
            for hook in hooks:
                hook.remove()
        on_device = dict(captured) | {f"layer_{layer:02d}": outputs[layer - 1] for layer in settings.layers}
        if settings.codebooks:
            on_device |= {f"units_{layer:02d}": probs.argmax(-1) for layer, probs in enumerate(codebooks, start=1)
                          if probs is not None}
        for key, values in on_device.items():
            values = (values.float() if values.is_floating_point() else values).cpu().numpy()
            for row, count in enumerate(frames):
                results[row][key] = values[row, :count]
        for layer, nearest in kmeans.items():
            # the frames of every row, padding left out: (Σ T_i, D), as float32 on the host would hold them
            valid = torch.cat([outputs[layer - 1][row, :count] for row, count in enumerate(frames)]).float()
            try:
                assigned = nearest(valid)
            except ValueError:
                bad = next((row for row, count in enumerate(frames)
                            if not bool(torch.isfinite(outputs[layer - 1][row, :count]).all())), None)
                if bad is None:
                    raise
                raise NonFiniteFeaturesError(bad, layer) from None
            for row, units in enumerate(np.split(assigned, np.cumsum(frames)[:-1])):
                results[row][f"kmeans_{layer:02d}"] = units
    return results


def _forward(model: torch.nn.Module, batch: torch.Tensor, padding_mask: torch.Tensor | None,
             settings: ExtractionSettings, kmeans_layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The layer outputs (up to the highest of ``settings.layers`` and ``kmeans_layer``) and, with codebooks, the
    heads' probabilities per layer, from one pass where the model has heads (twice as fast as a pass for each)."""
    top_layer = max(*settings.layers, kmeans_layer, 0)
    if settings.codebooks and model.num_codebooks:
        return model.get_layers_and_codebooks(batch, padding_mask=padding_mask,
                                              before_residual=settings.before_residual,
                                              num_layers=top_layer or None)
    outputs = model.get_intermediate_outputs(batch, padding_mask=padding_mask,
                                             before_residual=settings.before_residual, num_layers=top_layer)
    return outputs, model.get_codebooks(batch, padding_mask=padding_mask) if settings.codebooks else []


# --------------------------------------------------------------------------------------------------------------
# Windowed extraction of long files
# --------------------------------------------------------------------------------------------------------------


class LongAudio:
    """A file read window by window, standardised with statistics of the whole file (two passes). A file at another
    rate than 16 kHz is resampled as a stream (soxr), block by block, in both passes: the same samples as resampling
    it whole. An archive member is decoded whole instead (its samples held, its forwards still windowed). A file that
    cannot be decoded, at either pass, raises ``AudioError`` as ``load_audio`` does."""

    def __init__(self, source: str | ManifestEntry) -> None:
        self.path = source.path if isinstance(source, ManifestEntry) else source
        with decoding(self.path):
            info = None if isinstance(source, ManifestEntry) and source.in_archive else sf.info(self.path)
        if info is None:
            self._wave: torch.Tensor | None = load_audio(source, normalize=True)
            self.num_samples = self._wave.shape[0]
            return
        self._wave = None
        self._rate = int(info.samplerate)
        # At another rate: (index of the first sample held, the resampled samples held from the last read on, the
        # rest of the stream), so that a read further on continues the stream instead of resampling from the start.
        self._cursor: tuple[int, np.ndarray, Iterator[np.ndarray]] | None = None
        # Counted while decoding, not taken from the header: a file cut short (a partial download of a compressed
        # file) promises more samples than it decodes, and whole-file extraction gives it its decoded length.
        self.num_samples = 0
        total, total_sq = 0.0, 0.0
        with decoding(self.path), np.errstate(over="ignore"):
            for mono in self._mono_blocks():  # an overflow is refused below, by name
                self.num_samples += mono.shape[0]
                total += float(mono.sum(dtype=np.float64))
                total_sq += float(np.square(mono, dtype=np.float64).sum())
        if self.num_samples == 0:
            raise AudioError(self.path, "contains no audio samples" + ("" if self._rate == SAMPLE_RATE else
                                                                       f" at 16 kHz (its rate is {self._rate} Hz)"))
        self.mean = total / self.num_samples
        variance = total_sq / self.num_samples - self.mean * self.mean
        if not math.isfinite(variance):  # a corrupt file decoded to huge values
            raise AudioError(self.path, "cannot be standardised (its samples' sum of squares overflows)")
        self.std = float(np.sqrt(max(variance, 0.0) + STANDARDIZE_EPS))

    def _mono_blocks(self) -> Iterator[np.ndarray]:
        """The file's mono 16 kHz samples front to back, a minute of the file at a time: float64 at 16 kHz, float32
        resampled otherwise, as ``load_audio`` resamples (channel means in float32, then soxr)."""
        resampling = self._rate != SAMPLE_RATE
        stream = soxr.ResampleStream(self._rate, SAMPLE_RATE, 1, dtype="float32") if resampling else None
        # Read block by block with ``SoundFile.read``, which returns what was decoded: ``sf.blocks`` sizes its
        # blocks from the header and pads a short read with whatever its buffer held.
        with sf.SoundFile(self.path) as file:
            while len(block := file.read(self._rate * 60, dtype="float32" if resampling else "float64",
                                         always_2d=True)):
                mono = block.mean(axis=1, dtype=block.dtype) if block.shape[1] > 1 else block[:, 0]
                if not np.isfinite(mono).all():  # as load_audio refuses them: the features would all be NaN
                    raise AudioError(self.path, "contains NaN or Inf samples")
                yield stream.resample_chunk(mono) if stream is not None else mono
        if stream is not None:
            yield stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)

    @classmethod
    def from_waveform(cls, wave: torch.Tensor, name: str = "<waveform in memory>") -> LongAudio:
        """A standardised waveform (S,) already in memory, read window by window as a file would be."""
        audio = cls.__new__(cls)
        audio.path, audio._wave, audio.num_samples = name, wave, wave.shape[0]
        return audio

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Standardised samples [start, stop) as (stop − start,) float32. At another rate than 16 kHz, reads cost
        the least in increasing order (a window after the last one continues the stream; one before restarts it)."""
        if self._wave is not None:
            return self._wave[start:stop]
        with decoding(self.path):
            if self._rate == SAMPLE_RATE:
                block, _ = sf.read(self.path, start=start, stop=stop, dtype="float64", always_2d=True)
                samples = block.mean(axis=1)
            else:
                samples = self._resampled(start, stop)
        if samples.shape[0] != stop - start:  # a decoder that seeks differently from how it decodes front to back
            raise AudioError(self.path, f"samples {start}-{stop} decode to {samples.shape[0]} samples, though the "
                             f"whole file decodes to {self.num_samples}")
        return torch.from_numpy(((samples - self.mean) / self.std).astype(np.float32))

    def _resampled(self, start: int, stop: int) -> np.ndarray:
        """Resampled samples [start, stop) (fewer where the stream ends first), from the cursor."""
        if self._cursor is None or start < self._cursor[0]:
            self._cursor = (0, np.zeros(0, dtype=np.float32), self._mono_blocks())
        begin, held, rest = self._cursor
        while begin + held.shape[0] < stop and (block := next(rest, None)) is not None:
            dropped = min(max(start - begin, 0), held.shape[0])  # what lies before this read is not read again
            held, begin = np.concatenate([held[dropped:], block]), begin + dropped
        self._cursor = (begin, held, rest)
        return held[start - begin : stop - begin]


def windows(total_frames: int, window_frames: int, context_frames: int) -> Iterator[tuple[int, int, int, int]]:
    """Split frames [0, total) into kept ranges [keep_start, keep_end) run with context [run_start, run_end)."""
    for keep_start in range(0, total_frames, window_frames):
        keep_end = min(keep_start + window_frames, total_frames)
        yield keep_start, keep_end, max(keep_start - context_frames, 0), min(keep_end + context_frames, total_frames)


def extract_long(
    model: torch.nn.Module, audio: LongAudio, settings: ExtractionSettings, sinks: Mapping[str, Any], *,
    front_end: bool = False, kmeans: Mapping[int, NearestCentroid] | None = None,
) -> None:
    """Fill ``sinks`` ("layer_LL" → (T, D), "units_LL" → (T,), with ``front_end`` also "front_end" and
    "projection", with ``kmeans`` also "kmeans_LL" → (T,), as ``extract_batch`` gives them: arrays,
    ``NpyAppender`` or anything taking slice assignments)
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
    if model.cfg.extractor_type == "log_mel":
        # A log-mel front end pre-emphasises each sample against the one before it, which a window starting inside
        # the file does not read: its first frame is not the whole file's, so it is never kept (one frame of context).
        context_frames = max(context_frames, 1)
    for keep_start, keep_end, run_start, run_end in windows(total, window_frames, context_frames):
        wave = audio.read(run_start * hop, (run_end - 1) * hop + receptive_field)
        (result,) = extract_padded_batch(model, [wave], settings, front_end=front_end, kmeans=kmeans)
        for key, values in result.items():
            sinks[key][keep_start:keep_end] = values[keep_start - run_start : keep_end - run_start]


# --------------------------------------------------------------------------------------------------------------
# Whole collections, in memory
# --------------------------------------------------------------------------------------------------------------


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


def planned_batches(lengths: np.ndarray, settings: ExtractionSettings) -> tuple[Iterator[np.ndarray], np.ndarray]:
    """How utterances of ``lengths`` (N,) samples run: the indices of the short ones in padded length batches of at
    most ``settings.batch_seconds`` (``length_batches``), and those longer than ``settings.max_seconds``, which run
    window by window (``extract_long``)."""
    is_long = lengths > int(settings.max_seconds * SAMPLE_RATE)
    short = np.flatnonzero(~is_long)
    batches = (short[batch] for batch in length_batches(lengths[short], int(settings.batch_seconds * SAMPLE_RATE)))
    return batches, np.flatnonzero(is_long)


def load_model_input(entry: ManifestEntry, conv_layers: Sequence[ConvLayer]) -> torch.Tensor:
    """The standardised 16 kHz waveform (S,) of ``entry`` for a model with ``conv_layers``; ``AudioError`` for an
    unreadable file and for one shorter than a frame (the model would refuse the whole batch)."""
    wave = load_audio(entry, normalize=True)
    if num_frames(wave.shape[0], conv_layers) < 1:
        raise AudioError(entry.location, f"is shorter than one frame ({wave.shape[0]} samples; the front end's "
                                         f"receptive field is {num_samples_for_frames(1, conv_layers)})")
    return wave


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
    """The model inputs of ``entries[indices]`` that can be read (``load_model_input``), their indices, and the
    others (location → reason), each with a warning."""
    waves, kept, skipped = [], [], {}
    for index in indices.tolist():
        try:
            waves.append(load_model_input(entries[index], model.cfg.extractor_conv_layer_config))
            kept.append(index)
        except AudioError as error:
            logger.warning("skipping %s: %s", entries[index].location, error.reason)
            skipped[entries[index].location] = error.reason
    return waves, kept, skipped


def iter_extracted(
    model: torch.nn.Module,
    entries: Sequence[ManifestEntry],
    settings: ExtractionSettings,
    *,
    front_end: bool = False,
    kmeans: Mapping[int, NearestCentroid] | None = None,
    keep: Callable[[str, np.ndarray], np.ndarray] | None = None,
    skipped: dict[str, str] | None = None,
) -> Iterator[tuple[ManifestEntry, dict[str, np.ndarray]]]:
    """``extract_batch``'s results (with ``front_end`` and ``kmeans`` as it takes them) for every readable entry,
    with bounded memory whatever the file lengths.

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
    batches, long = planned_batches(lengths, settings)
    model.eval()
    for _, waves, kept, batch_skipped in loaded_batches(model, entries, batches):
        skipped.update(batch_skipped)
        try:
            results = extract_padded_batch(model, waves, settings, front_end=front_end, kmeans=kmeans) if waves else []
        except NonFiniteFeaturesError as error:
            raise error.naming(entries[kept[error.row]].location) from None
        for index, result in zip(kept, results, strict=True):
            yield entries[index], {key: keep(key, values) for key, values in result.items()}
    for index in long.tolist():
        entry, sinks = entries[index], _KeptWindows(keep)
        try:
            extract_long(model, LongAudio(entry), settings, sinks, front_end=front_end, kmeans=kmeans)
        except NonFiniteFeaturesError as error:
            raise error.naming(entry.location) from None
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
    centroids = dict(centroids or {})
    head_layers = set(model.head_layers)
    missing = sorted(layer for layer in layers if layer not in centroids and layer not in head_layers)
    if missing:
        raise ValueError(f"layer(s) {missing} have no codebook head (heads: {sorted(head_layers)}); give k-means "
                         "centroids for them")
    wanted = {f"kmeans_{layer:02d}" if layer in centroids else f"units_{layer:02d}": layer for layer in layers}
    kmeans = {layer: NearestCentroid(centroids[layer]) for layer in sorted(set(layers)) if layer in centroids}
    settings = ExtractionSettings(layers=(), codebooks=any(layer not in centroids for layer in layers),
                                  batch_seconds=batch_seconds, dtype=dtype, **window_settings(max_seconds))

    def units(key: str, values: np.ndarray) -> np.ndarray:
        # (units of a head layer that is only asked for its k-means units are dropped)
        return values.astype(np.int64) if key in wanted else values[:0]

    for entry, result in iter_extracted(model, entries, settings, kmeans=kmeans, keep=units, skipped=skipped):
        yield entry, {layer: result[key] for key, layer in wanted.items()}


class NpyAppender:
    """A (rows, cols) float32 ``.npy`` file written front to back, slice by slice (``appender[a:b] = values``).

    Unlike a memory map, written rows leave memory at once, so writing a 1-hour file costs no more than a window.
    Rows go to a hidden temporary file (``spidr.atomic_files.new_held_partial``), renamed to ``path`` by ``close`` once
    every row is written: a killed process never leaves a truncated ``.npy``.
    """

    def __init__(self, path: Path, rows: int, cols: int) -> None:
        self.path, self.rows, self.written = path, rows, 0
        self.partial, self.file = new_held_partial(path)  # (locked while it lives: other processes' sweeps keep it)
        with naming_errors(path):
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
        with naming_errors(self.path):
            self.file.write(np.ascontiguousarray(values, dtype=np.float32).tobytes())
        self.written = rows.stop

    def close(self) -> None:
        """Rename the temporary to ``path`` once every row is written (else remove it and raise)."""
        if self.written != self.rows:
            self.discard()
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.rows} rows")
        try:
            with naming_errors(self.path):
                self.file.flush()
            os.replace(self.partial, self.path)  # still locked: a sweep cannot take it in between
        finally:
            self.file.close()

    def discard(self) -> None:
        """Remove the temporary (a failed extraction): ``path`` is left as it was."""
        try:
            self.partial.unlink(missing_ok=True)
        finally:
            self.file.close()


