"""Phone probes: where a model keeps (or loses) phonetic information, layer by layer.

A frame classifier — linear, or one hidden layer — is trained on frozen features of each representation against
frame phone labels, and scored on held-out utterances by its frame accuracy; beside it a linear CTC head (SUPERB's
phone-recognition task: linear head, CTC over the phone sequence, greedy decoding) gives the phone error rate. The
representations of a model are its front end's output (``front_end``: the conv stack or log-mel filterbank), the
projection that feeds the Transformer (``projection``) and every Transformer layer (``layer_LL``, before the
residual like ``spidr extract``); the same probes run on MFCC and on the model at random initialisation, so a table
shows where information appears and where it goes.

audio → representations of every utterance (``ModelFeaturizer`` / ``MfccFeaturizer``, one forward pass gives all of
a model's; ``StoredFeaturizer`` reads features made elsewhere) → training frames with labels
(``collect_training_frames``, bounded by ``max_train_frames``) → standardise + fit a frame classifier (``fit_probe``)
and a CTC head (``fit_ctc_probe``) per representation → score the held-out utterances, streamed (``score_probes``):
frame accuracy, and PER = edit distance between the CTC head's greedy phone sequence and the reference
(run-collapsed frame labels, silence removed) over the reference length.

Labels: feature frame t (at ``frame_rate`` Hz) takes the alignment frame that holds its centre, index
⌊(t + ½) · alignment_rate / frame_rate⌋; the two sequences may differ by at most 2 alignment frames beyond that
rounding, and the longer one is truncated (as in ``unit_quality``). Every utterance the probes read is checked so
before the first feature is computed (by its manifest length, and where that disagrees by its decoded audio; stored
features by their files' frame counts).
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spidr.atomic_files import save_figure, write_atomically
from spidr.config import DEFAULT_CONV_LAYERS
from spidr.data import SAMPLE_RATE
from spidr.data.audio import AudioError, load_audio
from spidr.data.manifest import ManifestEntry
from spidr.eval.features import ExtractionSettings, iter_extracted, length_batches, window_settings
from spidr.eval.mfcc import mfcc
from spidr.eval.unit_quality import MAX_LENGTH_MISMATCH, SILENCE_LABELS, Alignments
from spidr.extras import figure, import_extra
from spidr.models.frames import hop_length

logger = logging.getLogger(__name__)

FLOAT16_MAX = float(np.finfo(np.float16).max)
PLOT_PURPOSE = "the phone probe's plot"


@dataclass(frozen=True)
class ProbeSettings:
    """How the probes are trained and scored."""

    hidden: int = 0  # 0: a linear probe; N > 0: one hidden layer of N ReLU units
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 5e-3  # Adam, decayed linearly to 0
    weight_decay: float = 0.0
    dropout: float = 0.0  # on the hidden layer
    max_train_frames: int = 200_000  # whole training utterances are drawn (seeded) until this many frames
    seed: int = 0
    silence_labels: tuple[str, ...] = SILENCE_LABELS  # not in the phone sequences of the PER
    ctc_epochs: int = 40  # passes of the CTC head over the training utterances
    ctc_lr: float = 5e-2  # a linear CTC head needs a higher rate than the frame classifier to converge in 40 passes
    ctc_batch_utterances: int = 8
    batch_seconds: float = 60.0  # padded audio per forward pass
    dtype: str = "float32"  # "bfloat16": the Transformer layers in bf16 (``bfloat16_inference``)


@dataclass
class ProbeRow:
    """One representation's probe result (accuracy and PER in %)."""

    model: str
    representation: str
    frame_accuracy: float
    phone_error_rate: float
    num_train_frames: int
    num_test_frames: int
    num_test_utterances: int


# --------------------------------------------------------------------------------------------------------------
# Representations
# --------------------------------------------------------------------------------------------------------------


def _audio_batches(entries: Sequence[ManifestEntry], batch_seconds: float
                   ) -> Iterator[list[tuple[ManifestEntry, torch.Tensor]]]:
    """Standardised waveforms in length-sorted padded batches; unreadable files are skipped with a warning."""
    for batch in length_batches(entries, int(batch_seconds * SAMPLE_RATE)):
        loaded = []
        for index in batch:
            entry = entries[index]
            try:
                loaded.append((entry, load_audio(entry, normalize=True)))
            except AudioError as error:
                logger.warning("probe: skipping %s: %s", entry.location, error.reason)
        if loaded:
            yield loaded


class ModelFeaturizer:
    """All representations of a SpidR / DinoSR model (or an exported student) from one forward pass per batch."""

    def __init__(self, model: torch.nn.Module, *, layers: Sequence[int] | None = None, dtype: str = "float32",
                 batch_seconds: float = 60.0, max_seconds: float = 60.0) -> None:
        self.model = model.eval()
        layers = tuple(layers) if layers is not None else tuple(range(1, model.num_layers + 1))
        self.settings = ExtractionSettings(layers=layers, dtype=dtype, batch_seconds=batch_seconds,
                                           **window_settings(max_seconds))
        self.representations = ("front_end", "projection", *(f"layer_{layer:02d}" for layer in layers))
        self.conv_layers = model.cfg.extractor_conv_layer_config  # (how many frames a file gives)
        self.frame_rate = SAMPLE_RATE / hop_length(self.conv_layers)

    def __call__(self, entries: Sequence[ManifestEntry]) -> Iterator[tuple[ManifestEntry, dict[str, np.ndarray]]]:
        """``(entry, {representation: (T, D) float32})`` for every readable entry (in length order; files longer
        than the ``max_seconds`` bound window by window, after the others: ``iter_extracted``)."""
        for entry, result in iter_extracted(self.model, entries, self.settings, front_end=True):
            yield entry, {key: result[key] for key in self.representations}


class MfccFeaturizer:
    """MFCC 13 + Δ + ΔΔ on the 50 Hz grid of the conv front end (``spidr.eval.mfcc``)."""

    representations = ("mfcc",)
    frame_rate = 50.0
    conv_layers = DEFAULT_CONV_LAYERS  # (its frames: those of the default conv stack)

    def __call__(self, entries: Sequence[ManifestEntry]) -> Iterator[tuple[ManifestEntry, dict[str, np.ndarray]]]:
        for batch in _audio_batches(entries, 60.0):
            for entry, wave in batch:
                yield entry, {"mfcc": mfcc(wave.numpy()).astype(np.float32)}


class StoredFeaturizer:
    """Representations read instead of computed: features another model or tool made, or ``spidr extract`` wrote.
    ``representations``: ``{name: {utterance: (T, D) features}}`` at ``frame_rate`` Hz, e.g. a one-layer folder of
    .npy/.pt files (``spidr.eval.feature_dir.one_layer_directory``, read lazily) or a dict of arrays. An entry is
    found by its path (without extension) or its file id, as ``StemKeyed`` finds an item's features (LibriSpeech's
    nested folders, or one flat folder of ids); one found in no representation is an error naming it, one the
    extraction skipped (unreadable audio) is skipped with a warning. Before any work, ``run_probe`` checks every
    file's frame count (``frame_counts``: a ``.npy`` header) against its alignment, as ``frame_labels`` would."""

    conv_layers = None

    def __init__(self, representations: Mapping[str, Mapping[str, object]], *, frame_rate: float) -> None:
        from spidr.eval.feature_dir import StemKeyed

        if not representations:
            raise ValueError("no representation to probe: give at least one {name: features}")
        if not (math.isfinite(frame_rate) and frame_rate > 0):
            raise ValueError(f"frame_rate = {frame_rate!r}: expected the features' rate in Hz, > 0")
        self.features = {name: features if isinstance(features, StemKeyed) else StemKeyed(features)
                         for name, features in representations.items()}
        self.representations = tuple(self.features)
        self.frame_rate = float(frame_rate)
        # (representation, features key) → the file they were found for, by frame_counts: one key found for two
        # files (features named by an id that two files of the manifest share) would give both the same frames
        self._served: dict[tuple[str, str], str] = {}

    def __call__(self, entries: Sequence[ManifestEntry]) -> Iterator[tuple[ManifestEntry, dict[str, np.ndarray]]]:
        """``(entry, {representation: (T, D) float32})`` for every entry, in order, but those that the extraction
        skipped (unreadable: skipped with a warning, as ``ModelFeaturizer`` skips them)."""
        for entry in entries:
            if self._skipped(entry):
                logger.warning("probe: skipping %s: the extraction of its features skipped it", entry.location)
                continue
            yield entry, {name: self._read(features, name, entry) for name, features in self.features.items()}

    def frame_counts(self, entry: ManifestEntry) -> dict[str, int] | None:
        """``{representation: T}`` of ``entry`` without reading its features where the folder can tell (a ``.npy``
        header), or None for a file the extraction skipped; a missing file or features that are not (T, D) are the
        errors ``__call__`` raises, raised before any work, and so are features that another file of the probe's
        found (by an id the two share, where the features are named by id alone)."""
        if self._skipped(entry):
            return None
        counts = {}
        for name, features in self.features.items():
            key = self._key(features, name, entry)
            served = self._served.setdefault((name, key), entry.location)
            if served != entry.location:
                raise ValueError(f"{name}: the features {key!r} of {features.source} are found for both {served} and "
                                 f"{entry.location}, which share the id {entry.fileid!r}: name the feature files by "
                                 "their path below the audio folder, as spidr extract does")
            directory = features.directory
            if hasattr(directory, "shape"):
                shape = directory.shape(key)
            else:
                values = features[key]
                shape = tuple(values.shape) if hasattr(values, "shape") else np.shape(values)
            _require_frames(shape, name, entry)
            counts[name] = int(shape[0])
        return counts

    def _skipped(self, entry: ManifestEntry) -> bool:
        path = os.path.splitext(entry.path)[0]
        return any(features.names_skipped(path) or features.names_skipped(entry.fileid)
                   for features in self.features.values())

    @staticmethod
    def _key(features, representation: str, entry: ManifestEntry) -> str:
        key = features.resolve(os.path.splitext(entry.path)[0]) or features.resolve(entry.fileid)
        if key is None:
            raise ValueError(f"{representation}: {features.source} holds no features of {entry.location} (looked up "
                             f"by its path and by its id {entry.fileid!r})")
        return key

    @classmethod
    def _read(cls, features, representation: str, entry: ManifestEntry) -> np.ndarray:
        values = features[cls._key(features, representation, entry)]
        values = np.asarray(values.float() if isinstance(values, torch.Tensor) else values, dtype=np.float32)
        _require_frames(values.shape, representation, entry)
        if not np.isfinite(values).all():  # (a NaN trains a NaN probe: every prediction class 0, no error)
            frame, dim = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
            raise ValueError(f"{representation}: the features of {entry.location} contain non-finite values (the "
                             f"first: {values[frame, dim]} at frame {frame}, dimension {dim})")
        return values


def _require_frames(shape: tuple[int, ...], representation: str, entry: ManifestEntry) -> None:
    """Refuse stored features that are not (T, D), naming the file and the representation."""
    if len(shape) != 2:
        raise ValueError(f"{representation}: the features of {entry.location} have shape {tuple(shape)}; expected "
                         "(T, D)")


# --------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------


def label_tolerance(ratio: float) -> float:
    """How many alignment frames an alignment may differ from its features' span by (``ratio``: alignment frames per
    feature frame): ``MAX_LENGTH_MISMATCH`` beyond the rounding of one feature frame."""
    return MAX_LENGTH_MISMATCH + max(ratio, 1.0)


def spans_alignment(num_codes: int, num_frames: int, ratio: float) -> bool:
    """Whether ``num_frames`` feature frames may be labelled by an alignment of ``num_codes`` frames (``ratio``:
    alignment frames per feature frame): their spans differ by at most ``label_tolerance``."""
    return abs(num_codes - num_frames * ratio) <= label_tolerance(ratio)


def frame_labels(codes: np.ndarray, num_frames: int, *, frame_rate: float, alignment_rate: float, name: str = ""
                 ) -> np.ndarray:
    """Label codes (T',) of the first T' ≤ ``num_frames`` feature frames: frame t takes alignment frame
    ⌊(t + ½) · alignment_rate / frame_rate⌋ of ``codes`` (A,). Raises if the lengths disagree by more than the
    rounding plus 2 alignment frames."""
    ratio = alignment_rate / frame_rate
    expected = num_frames * ratio
    if not spans_alignment(len(codes), num_frames, ratio):
        raise ValueError(
            f"utterance {name!r}: {num_frames} feature frames at {frame_rate:g} Hz span {expected:g} alignment "
            f"frames, but the alignment has {len(codes)} at {alignment_rate:g} Hz (check --alignment-rate)"
        )
    index = np.floor((np.arange(num_frames) + 0.5) * ratio).astype(np.int64)
    return codes[index[index < len(codes)]]


# --------------------------------------------------------------------------------------------------------------
# Training frames
# --------------------------------------------------------------------------------------------------------------


class UtteranceNames(dict[str, str]):
    """``{entry.location: its utterance name}`` (``alignment_keys``), with the folder that the names' paths start
    from (``root``: ``spidr.eval.folder_extraction.output_root``; None where names of two lists are merged, each
    from its own folder), against which alignments' names are weighed (``StemKeyed``)."""

    def __init__(self, names: Mapping[str, str], root: str | None) -> None:
        super().__init__(names)
        self.root = root


def alignment_keys(*manifests: Sequence[ManifestEntry], unread: Sequence[ManifestEntry] = ()) -> UtteranceNames:
    """``{entry.location: its utterance name}`` over the entries of ``manifests`` (the training and the held-out
    ones) and ``unread`` (the files of their scans that could not be read, ``ScanResult.unread``): the name ``spidr
    extract`` gives its unit rows (``utterance_name`` of its output path), an id that several of all these files
    hold (``spk1/sa1.wav``, ``spk2/sa1.wav``) giving way to the path. By file id alone, one alignment labelled every
    file that holds the id; an unread file's name keeps its alignment from finding the other file."""
    from spidr.eval.folder_extraction import named_outputs

    # One folder above them all (one name per file); a file in both lists is one file. The unread files are named
    # with them (they hold no features: only their names are used).
    entries = list({entry.location: entry for each in manifests for entry in each}.values())
    unread = list({entry.location: entry for entry in unread}.values())
    named = named_outputs(entries, unread)
    return UtteranceNames({entry.location: name for entry, name in itertools.chain(
        zip(entries, named.names, strict=True), zip(unread, named.unread_names, strict=True))}, named.root)


def probe_names(train_entries: Sequence[ManifestEntry], test_entries: Sequence[ManifestEntry], *,
                one_alignment_file: bool,
                unread: tuple[Sequence[ManifestEntry], Sequence[ManifestEntry]] = ((), ())) -> UtteranceNames:
    """``alignment_keys`` of the training and held-out utterances: named together where one alignment file labels
    both (an id held by a file of each is named by path), apart where each has its own (two corpora may reuse
    utterance ids: the demo's train and test sets both hold ``awb-00000``). ``unread``: the files that the scans of
    the training and of the held-out utterances could not read."""
    if one_alignment_file:
        return alignment_keys(train_entries, test_entries, unread=[*unread[0], *unread[1]])
    return UtteranceNames({**alignment_keys(test_entries, unread=unread[1]),
                           **alignment_keys(train_entries, unread=unread[0])}, None)


def aligned_by_name(alignments: Alignments, keys: Mapping[str, str]) -> Alignments:
    """``alignments`` under the utterance names of ``keys`` (``alignment_keys``), found as item files' names are: by
    path or by unique utterance id (a bare id that several files hold is refused, naming them)."""
    from spidr.eval.feature_dir import names_matched

    matched = names_matched(dict.fromkeys(keys.values()), alignments, source="the manifest",
                            root=getattr(keys, "root", None) or "")
    return Alignments(alignments.phones, {name: alignments.codes[given] for name, given in matched.items()})


def _labelled(featurizer, entries: Sequence[ManifestEntry], alignments: Alignments, alignment_rate: float,
              keys: Mapping[str, str]) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """``(representations, label codes (T',) int64)`` of every readable entry that has an alignment (``alignments``
    named as ``keys`` names the entries: ``aligned_by_name``); those without one are named in a warning."""
    unaligned = []
    for entry, representations in featurizer(entries):
        name = keys[entry.location]
        if name not in alignments:
            unaligned.append(name)
            continue
        first = representations[featurizer.representations[0]]
        yield representations, frame_labels(alignments.codes[name], first.shape[0],
                                            frame_rate=featurizer.frame_rate, alignment_rate=alignment_rate,
                                            name=name).astype(np.int64)
    if unaligned:
        logger.warning("%d of %d utterances have no alignment and are left out (e.g. %s)", len(unaligned),
                       len(entries), ", ".join(map(repr, unaligned[:3])))


@dataclass
class TrainingFrames:
    """Frames of the training utterances: per representation (N, D) float16, and their labels (N,) int64."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    lengths: np.ndarray  # (U,) frames of each utterance, in order

    @property
    def num_utterances(self) -> int:
        return len(self.lengths)


def draw_utterances(entries: Sequence[ManifestEntry], alignments: Alignments, *, frame_rate: float,
                    max_frames: int, seed: int, keys: Mapping[str, str] | None = None) -> list[ManifestEntry]:
    """Aligned entries (found by ``keys``, default ``alignment_keys(entries)``) in a seeded random order, as many as
    fit in ``max_frames`` feature frames (at least one)."""
    keys = alignment_keys(entries) if keys is None else keys
    alignments = aligned_by_name(alignments, keys)
    # (in path order: the draw, and the order the frames are trained in, are those of the set of utterances)
    aligned = sorted((entry for entry in entries if keys[entry.location] in alignments), key=_path_order)
    if not aligned:
        raise ValueError("no training utterance has an alignment (the alignment file names utterances by file id, "
                         "or by path where several files hold one id)")
    order = np.random.default_rng(seed).permutation(len(aligned))
    chosen, total = [], 0
    for index in order.tolist():
        frames = int(aligned[index].num_samples / SAMPLE_RATE * frame_rate)
        if chosen and total + frames > max_frames:
            continue
        chosen.append(aligned[index])
        total += frames
    return chosen


def stored(values: np.ndarray) -> np.ndarray:
    """Features (T, D) as the probes see them, in training and in scoring alike: float16, clipped to its range.

    Scoring must round as training did: a dimension that is constant in training (a log-mel band that holds no FFT
    bin is log(eps) in every frame) gets a near-zero std, and a float32 test value one float16 rounding away from
    the stored one would be standardised to hundreds and swamp the classifier (frame accuracy fell to 2-4 %)."""
    return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


def collect_training_frames(featurizer, entries: Sequence[ManifestEntry], alignments: Alignments,
                            *, alignment_rate: float, keys: Mapping[str, str] | None = None) -> TrainingFrames:
    """Run ``featurizer`` over ``entries`` and keep every labelled frame (features ``stored`` as float16: the probe
    standardises them anyway). ``keys``: ``alignment_keys`` of the manifest the entries were drawn from (default: of
    ``entries``)."""
    chunks: dict[str, list[np.ndarray]] = {key: [] for key in featurizer.representations}
    labels = []
    keys = alignment_keys(entries) if keys is None else keys
    for representations, codes in _labelled(featurizer, entries, aligned_by_name(alignments, keys), alignment_rate,
                                            keys):
        for key, values in representations.items():
            chunks[key].append(stored(values[: len(codes)]))
        labels.append(codes)
    if not labels:
        raise ValueError("no training utterance could be read")
    return TrainingFrames({key: np.concatenate(values) for key, values in chunks.items()}, np.concatenate(labels),
                          np.asarray([len(codes) for codes in labels]))


# --------------------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------------------


class PhoneProbe(nn.Module):
    """Standardisation (training-set mean / std per dimension) → linear, or linear → ReLU → linear: (N, D) → (N, V)."""

    def __init__(self, dim: int, num_classes: int, *, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        if hidden:
            self.classifier = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                            nn.Linear(hidden, num_classes))
        else:
            self.classifier = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier((features.float() - self.mean) / self.scale)

    @torch.inference_mode()
    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class indices (N,) of features (N, D)."""
        return self(torch.from_numpy(np.ascontiguousarray(features))).argmax(-1).numpy()


def fit_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, settings: ProbeSettings = ProbeSettings()
              ) -> PhoneProbe:
    """Train a probe on features (N, D) and labels (N,) in [0, num_classes): minibatch Adam with the learning rate
    decayed linearly to 0 over ``epochs``; deterministic for a given ``settings.seed``."""
    if features.ndim != 2 or len(features) != len(labels) or not len(labels):
        raise ValueError(f"probe training needs features (N, D) and N labels; got {features.shape} and "
                         f"{labels.shape}")
    generator = torch.Generator().manual_seed(settings.seed)
    probe = _new_probe(features, num_classes, settings)
    data = torch.from_numpy(np.ascontiguousarray(features))
    targets = torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.Adam(probe.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * math.ceil(len(data) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    probe.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            loss = nn.functional.cross_entropy(probe(data[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return probe.eval()


def _new_probe(features: np.ndarray, num_classes: int, settings: ProbeSettings, *, hidden: int | None = None
               ) -> PhoneProbe:
    """A seeded probe standardising with the mean and std of ``features`` (N, D), summed in float64 by chunks (no
    float32 copy of the whole set)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        probe = PhoneProbe(features.shape[1], num_classes, hidden=settings.hidden if hidden is None else hidden,
                           dropout=settings.dropout)
    mean = np.zeros(features.shape[1])
    square = np.zeros(features.shape[1])
    for start in range(0, len(features), 65536):
        chunk = features[start : start + 65536].astype(np.float64)
        mean += chunk.sum(0)
        square += np.square(chunk).sum(0)
    mean /= len(features)
    std = np.sqrt(np.clip(square / len(features) - np.square(mean), 0, None))
    probe.mean.copy_(torch.from_numpy(mean).float())
    probe.scale.copy_(torch.from_numpy(np.maximum(std, 1e-5)).float())
    return probe


def ctc_targets(labels: np.ndarray, lengths: np.ndarray, silence: np.ndarray) -> list[list[int]]:
    """Each utterance's phone sequence (``phone_sequence``) as CTC targets: phone code + 1, 0 being the blank."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [[c + 1 for c in phone_sequence(labels[a:b], silence)] for a, b in itertools.pairwise(offsets.tolist())]


def fit_ctc_probe(features: np.ndarray, lengths: np.ndarray, targets: Sequence[Sequence[int]], num_classes: int,
                  settings: ProbeSettings = ProbeSettings(), *, start: PhoneProbe | None = None,
                  silence: np.ndarray | None = None) -> PhoneProbe:
    """A linear CTC head on the utterances of features (N, D), split by ``lengths`` (U,), with ``targets`` in
    [1, num_classes] (0 = blank): minibatches of ``ctc_batch_utterances`` utterances, Adam with the learning rate
    decayed linearly to 0; utterances shorter than their target are left out (CTC cannot align them).

    ``start``, a linear frame classifier of the same features, initialises the head: phone c's row from its row c,
    the blank's from the mean of its ``silence`` rows. From a random start the head often settles where a phone's
    frames give the blank (a phone run is as likely emitted once as not), and greedy decoding then drops it."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    usable = [u for u in range(len(lengths)) if targets[u] and lengths[u] >= len(targets[u])]
    if not usable:
        raise ValueError("no training utterance has a phone sequence the CTC head can align")
    generator = torch.Generator().manual_seed(settings.seed)
    probe = _new_probe(features, num_classes + 1, settings, hidden=0)
    if start is not None:
        if not isinstance(start.classifier, nn.Linear):
            raise ValueError("the CTC head starts from a linear frame classifier (hidden = 0)")
        with torch.no_grad():
            probe.mean.copy_(start.mean)
            probe.scale.copy_(start.scale)
            for name in ("weight", "bias"):
                source, target = getattr(start.classifier, name), getattr(probe.classifier, name)
                target[1:] = source
                target[0] = source[torch.as_tensor(silence)].mean(0) if silence is not None and len(silence) else 0
    optimizer = torch.optim.Adam(probe.parameters(), lr=settings.ctc_lr)
    steps = settings.ctc_epochs * math.ceil(len(usable) / settings.ctc_batch_utterances)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    ctc = nn.CTCLoss(blank=0, reduction="sum", zero_infinity=True)
    probe.train()
    for _ in range(settings.ctc_epochs):
        order = torch.randperm(len(usable), generator=generator).tolist()
        for first in range(0, len(order), settings.ctc_batch_utterances):
            batch = [usable[i] for i in order[first : first + settings.ctc_batch_utterances]]
            frames = torch.from_numpy(np.concatenate([features[offsets[u] : offsets[u + 1]] for u in batch]))
            log_probs = probe(frames).log_softmax(-1)
            pieces = torch.split(log_probs, [int(lengths[u]) for u in batch])
            padded = nn.utils.rnn.pad_sequence(list(pieces))  # (T, B, V)
            flat = torch.tensor([c for u in batch for c in targets[u]])
            loss = ctc(padded, flat, torch.tensor([int(lengths[u]) for u in batch]),
                       torch.tensor([len(targets[u]) for u in batch])) / sum(len(targets[u]) for u in batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return probe.eval()


def ctc_greedy(probe: PhoneProbe, features: np.ndarray) -> list[int]:
    """Greedy CTC decoding of one utterance's features (T, D): arg-max per frame, repeats collapsed, blanks
    dropped; returns phone codes (the head's class − 1)."""
    best = probe.predict(features)
    keep = np.concatenate([[True], best[1:] != best[:-1]]) if len(best) else np.zeros(0, bool)
    return [int(c) - 1 for c in best[keep] if c != 0]


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------


def phone_sequence(codes: np.ndarray, silence: np.ndarray) -> list[int]:
    """Frame label codes → the phone sequence: runs collapsed, then silence codes removed."""
    if not len(codes):
        return []
    keep = np.concatenate([[True], codes[1:] != codes[:-1]])
    runs = codes[keep]
    return runs[~np.isin(runs, silence)].tolist()


def score_probes(featurizer, probes: dict[str, tuple[PhoneProbe, PhoneProbe]], entries: Sequence[ManifestEntry],
                 alignments: Alignments, *, alignment_rate: float, silence: np.ndarray,
                 keys: Mapping[str, str] | None = None) -> dict[str, tuple[float, float, int, int]]:
    """Per representation, from its (frame classifier, CTC head): (frame accuracy %, PER %, frames, utterances) on
    ``entries``, streamed. ``keys``: ``alignment_keys`` of their manifest (default: of ``entries``)."""
    editdistance = import_extra("editdistance", extra="eval", purpose="the phone probe's error rate")
    correct = dict.fromkeys(probes, 0)
    errors = dict.fromkeys(probes, 0)
    frames = reference_length = utterances = 0
    keys = alignment_keys(entries) if keys is None else keys
    for representations, codes in _labelled(featurizer, entries, aligned_by_name(alignments, keys), alignment_rate,
                                            keys):
        reference = phone_sequence(codes, silence)
        for key, (classifier, ctc_head) in probes.items():
            values = stored(representations[key][: len(codes)])
            correct[key] += int((classifier.predict(values) == codes).sum())
            errors[key] += editdistance.eval(ctc_greedy(ctc_head, values), reference)
        frames += len(codes)
        reference_length += len(reference)
        utterances += 1
    if not frames:
        raise ValueError("no held-out utterance has an alignment (the alignment file names utterances by file id, "
                         "or by path where several files hold one id)")
    return {key: (100.0 * correct[key] / frames, 100.0 * errors[key] / max(reference_length, 1), frames, utterances)
            for key in probes}


def run_probe(
    featurizer,
    name: str,
    train_entries: Sequence[ManifestEntry],
    test_entries: Sequence[ManifestEntry],
    alignments: Alignments,
    *,
    test_alignments: Alignments | None = None,
    alignment_rate: float = 100.0,
    settings: ProbeSettings = ProbeSettings(),
    keys: Mapping[str, str] | None = None,
    unread: tuple[Sequence[ManifestEntry], Sequence[ManifestEntry]] = ((), ()),
    sources: tuple[str, str | None] = ("the alignments", None),
) -> list[ProbeRow]:
    """Train the probes of each representation of ``featurizer`` on ``train_entries`` labelled by ``alignments``
    and score them on ``test_entries`` labelled by ``test_alignments`` (default: the same file). ``keys``: the
    name each entry's alignment is found by (``alignment_keys`` of the manifest, computed before a split: a file
    whose id another holds is named by its path, as spidr extract names it); default: ``probe_names``.
    ``unread``: the files that the scans of the training and of the held-out utterances could not read
    (``alignment_keys``). ``sources``: how errors name the alignments of the training and of the held-out
    utterances (None: the same as the training's)."""
    plan = _plan(featurizer, train_entries, test_entries, alignments, test_alignments=test_alignments,
                 alignment_rate=alignment_rate, settings=settings, keys=keys, unread=unread, sources=sources)
    return _probe(featurizer, name, plan, alignment_rate=alignment_rate, settings=settings)


@dataclass
class _Plan:
    """What ``run_probe`` works on, checked: the training utterances drawn, the alignments and the names."""

    chosen: list[ManifestEntry]
    alignments: Alignments
    test_entries: Sequence[ManifestEntry]
    test_alignments: Alignments
    train_keys: Mapping[str, str]
    test_keys: Mapping[str, str]


def _plan(featurizer, train_entries: Sequence[ManifestEntry], test_entries: Sequence[ManifestEntry],
          alignments: Alignments, *, test_alignments: Alignments | None, alignment_rate: float,
          settings: ProbeSettings, keys: Mapping[str, str] | None,
          unread: tuple[Sequence[ManifestEntry], Sequence[ManifestEntry]], sources: tuple[str, str | None]) -> _Plan:
    """``run_probe``'s inputs checked, before any feature is computed (``run_probes``: before any representation's)."""
    one_file = test_alignments is None
    if not one_file:
        alignments, test_alignments = common_inventory(alignments, test_alignments)
    else:
        test_alignments = alignments
    if keys is None:
        keys = probe_names(train_entries, test_entries, one_alignment_file=one_file, unread=unread)
    # An alignment file is read against the utterances it labels: both lists where one file labels both, else its
    # own list (an id the other corpus repeats is no concern of this file's).
    train_keys = keys if one_file else _keys_of(keys, train_entries, unread[0])
    test_keys = keys if one_file else _keys_of(keys, test_entries, unread[1])
    test_named = aligned_by_name(test_alignments, test_keys)  # (a name that finds several files: refused now)
    chosen = draw_utterances(train_entries, alignments, frame_rate=featurizer.frame_rate,
                             max_frames=settings.max_train_frames, seed=settings.seed, keys=train_keys)
    # Before any feature is computed: an alignment of another recording failed only as its utterance was labelled,
    # after the training utterances' features (and, for a held-out one, after every probe was trained).
    train_source, test_source = sources
    _check_lengths(featurizer, chosen, aligned_by_name(alignments, train_keys), train_keys, alignment_rate,
                   where=f"{train_source} (training utterances)")
    _check_lengths(featurizer, test_entries, test_named, test_keys, alignment_rate,
                   where=f"{test_source or train_source} (held-out utterances)")
    return _Plan(chosen, alignments, test_entries, test_alignments, train_keys, test_keys)


def _probe(featurizer, name: str, plan: _Plan, *, alignment_rate: float, settings: ProbeSettings) -> list[ProbeRow]:
    """``run_probe``'s work on its checked ``plan``."""
    chosen, alignments, train_keys = plan.chosen, plan.alignments, plan.train_keys
    test_entries, test_alignments, test_keys = plan.test_entries, plan.test_alignments, plan.test_keys
    frames = collect_training_frames(featurizer, chosen, alignments, alignment_rate=alignment_rate, keys=train_keys)
    logger.info("%s: probes trained on %d frames of %d utterances", name, len(frames.labels), frames.num_utterances)
    silence = np.asarray([i for i, phone in enumerate(alignments.phones) if phone in settings.silence_labels],
                         dtype=np.int64)
    targets = ctc_targets(frames.labels, frames.lengths, silence)
    num_classes = len(alignments.phones)
    probes = {}
    for key, values in frames.features.items():
        classifier = fit_probe(values, frames.labels, num_classes, settings)
        linear = classifier if not settings.hidden else fit_probe(values, frames.labels, num_classes,
                                                                  replace(settings, hidden=0))
        probes[key] = classifier, fit_ctc_probe(values, frames.lengths, targets, num_classes, settings,
                                                start=linear, silence=silence)
    scores = score_probes(featurizer, probes, test_entries, test_alignments, alignment_rate=alignment_rate,
                          silence=silence, keys=test_keys)
    rows = [ProbeRow(name, key, accuracy, per, len(frames.labels), count, utterances)
            for key, (accuracy, per, count, utterances) in scores.items()]
    for row in rows:
        logger.info("%s %s: frame accuracy %.1f %%, PER %.1f %%", name, row.representation, row.frame_accuracy,
                    row.phone_error_rate)
    return rows


def _check_lengths(featurizer, entries: Sequence[ManifestEntry], alignments: Alignments, keys: Mapping[str, str],
                   alignment_rate: float, *, where: str) -> None:
    """Refuse an utterance of ``entries`` whose alignment (``alignments`` under the names of ``keys``) disagrees with
    its audio's length by more than ``frame_labels`` allows (``unit_quality.check_alignment_lengths``, an utterance
    whose manifest length disagrees decoded to be sure). A featurizer that gives no ``conv_layers`` is not checked
    (its utterances are, as they are labelled)."""
    from spidr.data.audio import decoded_length
    from spidr.eval.unit_quality import check_alignment_lengths

    conv_layers = getattr(featurizer, "conv_layers", None)
    if conv_layers is None:
        if hasattr(featurizer, "frame_counts"):  # stored features: each file there, of a length its alignment spans
            _check_stored_lengths(featurizer, entries, alignments, keys, alignment_rate, where=where)
        return
    named = {keys[entry.location]: entry for entry in entries if keys[entry.location] in alignments.codes}
    check_alignment_lengths(alignments.codes, {name: entry.num_samples for name, entry in named.items()},
                            conv_layers=conv_layers, alignment_rate_hz=alignment_rate, where=where,
                            decoded_samples=lambda name: decoded_length(named[name]),
                            tolerance=label_tolerance(alignment_rate / featurizer.frame_rate))


def _check_stored_lengths(featurizer, entries: Sequence[ManifestEntry], alignments: Alignments,
                          keys: Mapping[str, str], alignment_rate: float, *, where: str) -> None:
    """``_check_lengths`` for features read rather than computed (``frame_counts``): every file's features are found
    and are (T, D), and each aligned utterance's T spans its alignment as ``frame_labels`` requires."""
    ratio = alignment_rate / featurizer.frame_rate
    for entry in entries:
        counts = featurizer.frame_counts(entry)
        name = keys[entry.location]
        if counts is None or name not in alignments.codes:
            continue
        for representation, count in counts.items():
            if not spans_alignment(len(alignments.codes[name]), count, ratio):
                raise ValueError(
                    f"{where}: utterance {name!r} has {len(alignments.codes[name])} frames at {alignment_rate:g} "
                    f"Hz, but its {representation} features' {count} frames at {featurizer.frame_rate:g} Hz span "
                    f"{count * ratio:g}: features of another rate (--frequency) or another recording, or an "
                    "alignment of another rate (--alignment-rate)?")


def _keys_of(keys: Mapping[str, str], entries: Sequence[ManifestEntry], unread: Sequence[ManifestEntry]
             ) -> UtteranceNames:
    """The ``keys`` of ``entries`` and of the ``unread`` files named with them, from the folder the names were
    given from (that of ``entries`` where ``keys`` merges two lists)."""
    from spidr.eval.folder_extraction import output_root

    root = getattr(keys, "root", None)
    return UtteranceNames({entry.location: keys[entry.location] for entry in entries}
                          | {entry.location: keys[entry.location] for entry in unread if entry.location in keys},
                          output_root(entries) if root is None else root)


def run_probes(featurizers: Mapping[str, object], train_entries: Sequence[ManifestEntry],
               test_entries: Sequence[ManifestEntry], alignments: Alignments, **options) -> list[ProbeRow]:
    """``run_probe`` for each ``{name: featurizer}`` on the same data and ``options``; the rows in that order. Every
    featurizer's inputs are checked before the first one computes a feature."""
    # run_probe's keyword defaults, read from its signature (the one place they are written)
    options = {name: parameter.default for name, parameter in inspect.signature(run_probe).parameters.items()
               if parameter.kind is inspect.Parameter.KEYWORD_ONLY} | options
    settings, alignment_rate = options["settings"], options["alignment_rate"]
    plans = {name: _plan(featurizer, train_entries, test_entries, alignments, **options)
             for name, featurizer in featurizers.items()}
    return [row for name, featurizer in featurizers.items()
            for row in _probe(featurizer, name, plans[name], alignment_rate=alignment_rate, settings=settings)]


def _path_order(entry: ManifestEntry) -> tuple[str, str]:
    """The order in which the probe draws utterances, whatever the order they were listed in."""
    return entry.location, entry.fileid


def split_entries(entries: Sequence[ManifestEntry], test_fraction: float, *, seed: int
                  ) -> tuple[list[ManifestEntry], list[ManifestEntry]]:
    """(training, held-out) utterances: a seeded random ``test_fraction`` of ``entries`` held out, at least one
    and at most all but one (0.9 of 3 utterances rounds to 3 and left none to train on)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction {test_fraction} is invalid: expected a fraction strictly between 0 and 1")
    if len(entries) < 2:
        raise ValueError(f"{len(entries)} utterance(s): holding some out for the probe needs at least 2")
    # (path order first: one set of utterances listed in another order is held out alike)
    canonical = sorted(range(len(entries)), key=lambda i: _path_order(entries[i]))
    order = [canonical[i] for i in np.random.default_rng(seed + 1).permutation(len(entries))]
    held_out = min(max(1, round(test_fraction * len(entries))), len(entries) - 1)
    return [entries[i] for i in sorted(order[held_out:])], [entries[i] for i in sorted(order[:held_out])]


def common_inventory(*alignments: Alignments) -> tuple[Alignments, ...]:
    """The alignment files re-coded on one phone inventory (the union of theirs, sorted), so that the training and
    held-out utterances — which may reuse utterance names — get the same class indices."""
    phones = sorted(set().union(*(a.phones for a in alignments)))
    index = {phone: i for i, phone in enumerate(phones)}
    recoded = []
    for each in alignments:
        table = np.asarray([index[p] for p in each.phones], dtype=np.int16)
        recoded.append(Alignments(phones, {name: table[codes] for name, codes in each.codes.items()}))
    return tuple(recoded)


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def markdown_table(rows: Sequence[ProbeRow]) -> str:
    lines = ["| model | representation | frame accuracy % | PER % |", "|---|---|---|---|"]
    lines += [f"| {r.model} | {r.representation} | {r.frame_accuracy:.1f} | {r.phone_error_rate:.1f} |" for r in rows]
    return "\n".join(lines)


def plot_probe(rows: Sequence[ProbeRow], path: Path) -> Path:
    """Frame accuracy and PER along each model's representations; single-representation baselines as lines."""
    models = list(dict.fromkeys(row.model for row in rows))
    fig, axes = figure(figsize=(10, 4), purpose=PLOT_PURPOSE, ncols=2)
    for ax, field, label in zip(axes, ("frame_accuracy", "phone_error_rate"), ("frame accuracy (%)", "PER (%)"),
                                strict=True):
        ticks: list[str] = []
        for model in models:
            model_rows = [r for r in rows if r.model == model]
            values = [getattr(r, field) for r in model_rows]
            if len(model_rows) == 1:
                ax.axhline(values[0], linestyle=":", color="grey", label=model)
                continue
            names = [r.representation.replace("layer_", "L").replace("projection", "proj") for r in model_rows]
            ticks = names if len(names) > len(ticks) else ticks
            ax.plot(range(len(values)), values, "o-", label=model)
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return path


def write_probe_report(rows: Sequence[ProbeRow], out_dir: str | Path, *, title: str, notes: Sequence[str] = ()
                       ) -> Path:
    """``probe.json``, ``probe.md`` and ``probe.png`` in ``out_dir``; returns the markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "probe.md"
    path.unlink(missing_ok=True)  # (a kill below must not leave an earlier probe's report beside this one's scores)
    write_atomically(out_dir / "probe.json", json.dumps([asdict(r) for r in rows], indent=1))
    plot = plot_probe(rows, out_dir / "probe.png")
    write_atomically(path, "\n".join([f"# {title}", "", *notes, "", markdown_table(rows), "",
                                      f"![probe]({plot.name})"]) + "\n")
    return path
