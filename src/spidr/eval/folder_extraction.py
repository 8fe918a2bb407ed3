"""A collection's features and units written to a folder, resumably, by one process or by several in parts.

Output layout (ZeroSpeech style): ``OUT/layer_LL/<tree>/<stem>.npy`` with (T, D) float32 per utterance, the tree
mirroring the audio tree, plus ``OUT/metadata.json``; with codebook units, ``OUT/codebook_units/layer_LL.jsonl``
rows ``{"name": utterance id, "audio": path, "units": [...]}``, the id being the stem of the utterance's feature files
(its manifest file id), by which readers key both; with k-means units, ``OUT/kmeans_units/layer_LL.jsonl`` alike.
Long files' features are written into their ``.npy`` files window by window. The journal that makes it resumable,
and the parts' own folders, are ``spidr.eval.journal``'s; which files a part takes, ``spidr.eval.shards``'.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from spidr.atomic_files import replaced_when_done, save_npy, write_atomically
from spidr.data import SAMPLE_RATE
from spidr.data.audio import AudioError
from spidr.data.manifest import ITER_CHUNK, Manifest, ManifestEntry, PackedStrings, repeated_strings
from spidr.eval.feature_dir import utterance_name, utterance_stem
from spidr.eval.features import (
    ExtractionSettings,
    LongAudio,
    NonFiniteFeaturesError,
    NpyAppender,
    extract_long,
    extract_padded_batch,
    length_batches,
    loaded_batches,
)
from spidr.eval.nearest_centroid import NearestCentroid
from spidr.eval.shards import WHOLE, Shard, every_part, part_numbers
from spidr.folder_lock import folder_lock, missing_folders
from spidr.models.frames import hop_length, num_frames
from spidr.models.inference_precision import precision_identity

logger = logging.getLogger(__name__)


def output_stems(entries: Sequence[ManifestEntry]) -> PackedStrings:
    """Output path (without suffix) of each entry, as packed strings: its audio path relative to the deepest common
    folder, with the file name replaced by the file id. Two passes over the paths, no Path object per entry."""
    return _output_paths(_as_manifest(entries))[0]


def output_root(entries: Sequence[ManifestEntry]) -> str:
    """The folder that the output paths (``output_stems``) of ``entries`` start from: recorded as ``audio_root``,
    so that a name is weighed against the files' full paths (``StemKeyed``'s ``root``)."""
    return _output_root(_as_manifest(entries))[0] if len(entries) else ""


def unread_stems(entries: Sequence[ManifestEntry], unread: Sequence[ManifestEntry]) -> list[str]:
    """The output paths that ``unread`` (files that a scan could not read: ``ScanResult.unread``) would have had
    beside ``entries`` (``output_stems``), computed from the same root, so the folder's outputs do not move; one
    outside that root keeps its full folder (a name still ending with its path). A file that shares its id with
    one of ``entries`` makes that one's units rows named by path, as if it had been read (``shared_utterance_ids``),
    and its own path then finds nothing."""
    if not unread or not len(entries):
        return []
    root, with_files = _output_root(_as_manifest(entries))
    return _placed(unread, root, with_files=with_files)


def _output_paths(manifest: Manifest) -> tuple[PackedStrings, str, bool]:
    """``output_stems`` of ``manifest``, with the root they start from and ``_folders``' ``with_files`` (for
    ``_placed``)."""
    root, with_files = _output_root(manifest)
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
    return stems, root, with_files


def _output_root(manifest: Manifest) -> tuple[str, bool]:
    """The folder that holds all of ``manifest``'s audio (``_folders``), which the output tree mirrors from, and
    whether its archive members sit beside plain files (``_folders``' ``with_files``)."""
    # Files beside archive members (a folder's scan and a tar's in one manifest): Python's commonpath refused the
    # mix of absolute and relative folders.
    with_files = manifest.archive_index is not None and bool((manifest.archive_index < 0).any())
    parents: set[str] = set()
    for start in range(0, len(manifest), ITER_CHUNK):
        parents.update(_folders(manifest, start, min(start + ITER_CHUNK, len(manifest)), with_files=with_files))
    return (os.path.commonpath(sorted(parents)) if len(parents) > 1 else next(iter(parents), "")), with_files


def _placed(unread: Sequence[ManifestEntry], root: str, *, with_files: bool) -> list[str]:
    """``unread_stems``, given the entries' root and ``with_files`` (``_output_root``)."""
    if not unread:
        return []
    cut = len(root.rstrip("/")) + 1 if root else 0
    manifest = Manifest.from_entries(list(unread))
    stems = []
    for folder, fileid in zip(_folders(manifest, 0, len(manifest), with_files=with_files),
                              manifest.fileids.strings(0, len(manifest)), strict=True):
        if folder == root:
            stems.append(fileid)
        elif not root or folder.startswith(root.rstrip("/") + "/"):
            stems.append(f"{folder[cut:]}/{fileid}")
        else:  # (a full path, starting with "/": an archive's folders are relative to its top)
            stems.append(f"/{folder.lstrip('/')}/{fileid}")
    return stems


def not_read_stems(entries: Sequence[ManifestEntry], skipped: Mapping[str, str],
                   unread: Sequence[ManifestEntry]) -> list[str]:
    """The output paths of the files that gave no features: the entries at a location in ``skipped`` and the
    ``unread`` files of their scan (``unread_stems``), sorted: what ``metadata.json`` records as ``skipped_stems``."""
    manifest = _as_manifest(entries)
    stems, root, with_files = _output_paths(manifest)
    return _not_read(manifest, stems, skipped, _placed(unread, root, with_files=with_files))


def _not_read(manifest: Manifest, stems: PackedStrings, skipped: Mapping[str, str], unread: Sequence[str]
              ) -> list[str]:
    """``not_read_stems`` given the manifest's output paths ``stems`` and the unread files' (``unread_stems``)."""
    return sorted([*(stems[index] for index in np.flatnonzero(_skipped_rows(manifest, skipped))), *unread])


def _skipped_rows(manifest: Manifest, skipped: Mapping[str, str]) -> np.ndarray:
    """(N,) bool: the rows whose file the extraction skipped (``skipped`` is keyed by the file's location: a file that
    the manifest lists twice, under two ids, is two files not extracted)."""
    rows = np.zeros(len(manifest), dtype=bool)
    if skipped:
        rows[:] = [manifest[index].location in skipped for index in range(len(manifest))]
    return rows


def relative_stems(entries: Sequence[ManifestEntry]) -> list[Path]:
    """``output_stems`` as a list of paths (convenient for a few files)."""
    return [Path(stem) for stem in output_stems(entries)]


def shared_utterance_ids(stems: PackedStrings, unread: Sequence[str] = ()) -> set[str]:
    """The utterance ids (``utterance_stem``: last components) that several of ``stems`` and ``unread``
    (``unread_stems``) hold."""
    return repeated_strings(PackedStrings.from_strings(
        utterance_stem(stem) for stem in itertools.chain(stems, unread)))


def utterance_names(entries: Sequence[ManifestEntry], unread: Sequence[ManifestEntry] = ()) -> list[str]:
    """The name of each entry's unit rows as ``spidr extract`` writes them (``_Outputs.utterance``): its utterance
    id, or its path below the folder that holds all the audio where other entries, or files of the scan that could
    not be read (``unread``), share the id (such a name holds a '/', no other does)."""
    return named_outputs(entries, unread).names


class NamedOutputs(NamedTuple):
    """``utterance_names`` of the entries, the names that the ``unread`` files would have had beside them (a units
    row never has one, but an alignment naming one must find nothing rather than the file that shares its id), and
    the folder the names' paths start from (``output_root``)."""

    names: list[str]
    unread_names: list[str]
    root: str


def named_outputs(entries: Sequence[ManifestEntry], unread: Sequence[ManifestEntry] = ()) -> NamedOutputs:
    """``NamedOutputs`` of ``entries`` and ``unread``, their output paths computed once."""
    stems, root, with_files = _output_paths(_as_manifest(entries))
    others = _placed(unread, root, with_files=with_files) if len(entries) else []
    shared = shared_utterance_ids(stems, others)
    return NamedOutputs([utterance_name(stem, shared) for stem in stems],
                        [utterance_name(stem, shared) for stem in others], root if len(entries) else "")


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
        if fileid.startswith("/") or (".." in fileid and ".." in fileid.replace("\\", "/").split("/")):
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
    absolute: dict[str, str] = {}  # a file's path up to its last '/' → its absolute folder (files share folders)
    for path, archive in zip(_paths(manifest, start, stop), index.tolist(), strict=True):
        if archive < 0:
            cut = path.rfind("/") + 1
            shared = path[cut:] not in ("", ".", "..")  # (a name that normalising removes is not in that folder)
            folder = absolute.get(path[:cut]) if shared else None
            if folder is None:
                folder = os.path.dirname(os.path.abspath(path))
                if shared:
                    absolute[path[:cut]] = folder
            folders.append(folder)
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
    """Raise, naming both files, if two stems name one file: equal, or equal but for case or Unicode normalisation,
    which is one file on macOS (APFS, HFS+) and Windows (NTFS) and on a share of theirs (``A.npy`` would be
    silently replaced by ``a.npy``). 64-bit hashes sorted in numpy, candidates then compared as strings."""
    folded = [_file_system_key(stem) for stem in stems]
    hashes = np.fromiter((hash(key) for key in folded), dtype=np.int64, count=len(folded))
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    for k in same.tolist():
        a, b = int(order[k]), int(order[k + 1])
        if folded[a] == folded[b]:
            first, second = _paths(manifest, a, a + 1)[0], _paths(manifest, b, b + 1)[0]
            if stems[a] == stems[b]:
                raise ValueError(f"utterances {a + 1} ({first}) and {b + 1} ({second}) both map to the output file "
                                 f"{stems[a]!r} (one folder, one file id: e.g. the same name with two extensions); "
                                 "give them distinct file ids in a manifest, or leave one out (--ext)")
            raise ValueError(f"utterances {a + 1} ({first}) and {b + 1} ({second}) map to the output files "
                             f"{stems[a]!r} and {stems[b]!r}, one file on a case-insensitive file system (macOS, "
                             "Windows) where the second would replace the first; give them file ids that differ in "
                             "more than case in a manifest, or leave one out (--ext)")


def _file_system_key(stem: str) -> str:
    """What a case- and normalisation-insensitive file system compares names by: NFC, each character mapped to one
    character (Unicode's simple case mappings: NTFS's upcase table and APFS map one character to one, so 'ß' is
    not 'ss' there, nor 'ﬁ' 'fi', as str.casefold's full folding would have them)."""
    if stem.isascii():
        return stem.lower()
    normalised = unicodedata.normalize("NFC", stem)
    folded = normalised.casefold()
    if len(folded) == len(normalised):  # (no full folding that makes one character several: simple folding)
        return folded
    folded = []
    for char in normalised:
        simple = char.casefold()
        if len(simple) != 1:  # (full folding only, as ß → ss: the simple one, if any, is ẞ → ß, ᾈ → ᾀ)
            upper = char.upper()
            char = upper if len(upper) == 1 else char
            lower = char.lower()
            simple = lower if len(lower) == 1 else char
        folded.append(simple)
    return "".join(folded)


class _Outputs:
    """Where features and unit rows go: atomic ``.npy`` writes into ``OUT/layer_LL/<stem>.npy``."""

    def __init__(self, out_dir: Path, stems: PackedStrings, unread: Sequence[str] = (), root: str = "") -> None:
        self.out_dir = out_dir
        self.stems = stems
        self.root = root  # (output_root)
        self.unread = sorted(unread)  # (unread_stems)
        # The utterance ids (last components) that several entries hold: spk1/sa1.wav, spk2/sa1.wav; file ids
        # spk1/0001 and spk2/0001 of a manifest; or an entry and a file the scan could not read.
        self.shared_ids = shared_utterance_ids(stems, self.unread)
        self.unread_sharing_ids = [stem for stem in self.unread if utterance_stem(stem) in self.shared_ids]
        self.folders: set[Path] = set()

    def utterance(self, index: int) -> str:
        """The name of entry ``index``'s unit rows (``utterance_name``): the utterance id of its feature files, or
        their path below the layer folder where other entries share that id; as the readers find the features
        (``StemKeyed``) and as ``spidr units`` names its rows."""
        return utterance_name(self.stems[index], self.shared_ids)

    def path(self, key: str, index: int) -> Path:
        path = self.out_dir / key / f"{self.stems[index]}.npy"
        if path.parent not in self.folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.folders.add(path.parent)
        return path

    def save(self, key: str, index: int, values: np.ndarray) -> None:
        path = self.path(key, index)
        with replaced_when_done(path) as partial, partial.open("wb") as handle:
            save_npy(handle, values.astype(np.float32, copy=False))


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

    @functools.cached_property
    def nearest(self) -> NearestCentroid:
        """The centroids prepared for assignment, once for the whole extraction (and once on the model's device)."""
        return NearestCentroid(self.centroids)


@dataclass(frozen=True)
class _Plan:
    """What a directory extraction computes and what it writes of it."""

    saved: ExtractionSettings  # the features written (``saved.layers``) and codebook units
    kmeans: Mapping[int, KMeansUnits]  # layer → its k-means units

    @property
    def nearest(self) -> dict[int, NearestCentroid]:
        """``extract_batch``'s ``kmeans``: layer → its centroids, prepared."""
        return {layer: units.nearest for layer, units in self.kmeans.items()}

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
    unread: Sequence[ManifestEntry] = (),
) -> dict[str, object]:
    """Extract every entry and write features (and units) under ``out_dir``; returns the metadata written.
    ``kmeans``: also the k-means units of these layers (``KMeansUnits``), whether or not their features are
    written (``settings.layers``). ``unread``: the files of the scan that gave ``entries`` that it could not read
    (``ScanResult.unread``): named and recorded as files the extraction skipped (``unread_stems``).

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
                           restart=restart, replace_other=replace_other, kmeans=kmeans, unread=unread)
    assert outcome.metadata is not None  # (the whole extraction has no other part to wait for)
    return outcome.metadata


@dataclass(frozen=True)
class PartOutcome:
    """What ``extract_part`` did: this part's files, and the extraction's metadata once every part is finished."""

    num_files: int  # of this part, extracted by this run and earlier ones
    skipped: dict[str, str]  # of this part: location → reason
    metadata: dict[str, object] | None  # the extraction's (metadata.json), None while other parts are unfinished
    unfinished: tuple[Shard, ...]  # the other parts still to run (or running)
    wrote_metadata: bool = True  # False where another run joined the parts: before this one, or as it ended
    finished_before: bool = False  # True where the extraction was finished before this run (it did nothing)


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
    unread: Sequence[ManifestEntry] = (),
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
        audio_stamps,
        entries_fingerprint,
        model_fingerprint,
        remove_part_units,
    )

    out_dir = Path(out_dir)
    made = missing_folders(out_dir)  # (removed again if not one file can be read)
    model.eval()
    plan = _Plan(settings, _check_kmeans(model, kmeans))
    manifest = _as_manifest(entries)
    stems, root, with_files = _output_paths(manifest)
    outputs = _Outputs(out_dir, stems, _placed(unread, root, with_files=with_files), root)
    is_long = manifest.num_samples > int(settings.max_seconds * SAMPLE_RATE)  # archive members too (decoded whole)
    mine = shard.members(manifest.num_samples)
    # Unit rows were keyed by the audio file's stem alone before they carried "name": a folder begun then is not
    # topped up with rows keyed otherwise.
    identity = {"settings": {k: v for k, v in asdict(settings).items() if k != "batch_seconds"},
                "model": model_fingerprint(model), "utterances": entries_fingerprint(manifest),
                **precision_identity(settings.dtype), **({"unit_rows": "name"} if settings.codebooks else {}),
                # Where utterance ids repeat, every row was named by its path (and ids holding a folder gave two rows
                # one name): now only the rows whose id repeats are.
                **({"unit row names where utterance ids repeat": "the repeated ones' paths"}
                   if outputs.shared_ids and (settings.codebooks or plan.kmeans) else {}),
                # Unreadable files that share an id with a file read name its rows by path: rows named otherwise
                # are not topped up.
                **({"unread files sharing ids": outputs.unread_sharing_ids}
                   if outputs.unread_sharing_ids and (settings.codebooks or plan.kmeans) else {}),
                # Features of such a model changed when it stopped running padded (see extract_padded_batch).
                **({"front_end_batching": "unpadded"} if model.cfg.padding_changes_features else {}),
                # Long archive members ran in one forward before they ran in windows like other long files.
                **({"long_archive_members": "windowed"} if _in_archive(manifest)[is_long].any() else {}),
                **({} if shard.is_whole else {"parts": shard.count}),
                **({"kmeans": {f"{layer:02d}": units.fingerprint() for layer, units in sorted(plan.kmeans.items())}}
                   if plan.kmeans else {})}
    bookkeeping = f"the bookkeeping of the extraction into {out_dir}"
    with folder_lock(out_dir, bookkeeping, wait=True, made=made):  # brief: the parts set up and finish one at a time
        if not (shard.is_whole or restart):
            finished = _finished_metadata(out_dir, identity)
            if finished is not None:  # (its parts' unit rows are in codebook_units/ now)
                _check_finished_part(out_dir, shard, manifest, mine)
                if "skipped_stems" not in finished:  # (finished by an older spidr: recorded now, see _write_metadata)
                    not_read = _not_read(manifest, outputs.stems, finished.get("skipped", {}), outputs.unread)
                    finished = _record_skipped_stems(out_dir, plan, finished, not_read, outputs.root)
                # (the parts' units files that a kill after metadata.json left behind)
                remove_part_units(out_dir, every_part(shard.count))
                return PartOutcome(int(mine.sum()), {}, finished, (), wrote_metadata=False, finished_before=True)
        journal = ExtractionJournal(out_dir, identity, num_entries=len(manifest), restart=restart,
                                    replace_other=replace_other, outputs=EXTRACTION_OUTPUTS, shard=shard,
                                    stamps=audio_stamps(manifest, rows=mine),
                                    locate=lambda index: manifest[index].location)
    units = None
    try:
        if plan.writes_units:
            units = UnitsFiles(out_dir if shard.is_whole else journal.part_dir, journal.units_bytes)
        bar = tqdm(total=int(mine.sum()), initial=int((journal.done & mine).sum()), unit="file",
                   desc="extract" if shard.is_whole else f"extract {shard}", disable=not progress)
        _extract_entries(model, manifest, np.flatnonzero(mine & ~journal.done), is_long=is_long, outputs=outputs,
                         plan=plan, journal=journal, units=units, bar=bar)
        skipped_rows = _skipped_rows(manifest, journal.skipped)
        num_files = int((mine & ~skipped_rows).sum())
        if shard.is_whole:  # (still holding the folder: nothing can start it over before metadata.json is written)
            if _nothing_read(skipped_rows):
                _forget_nothing_read(out_dir, journal, units, skipped_rows, bookkeeping=bookkeeping, made=made)
            metadata = _write_metadata(out_dir, model, plan, checkpoint=checkpoint, num_files=num_files,
                                       skipped=journal.skipped, outputs=outputs, manifest=manifest)
            return PartOutcome(num_files, dict(journal.skipped), metadata, ())
        # (made again: where no part could read a file, the part that joined first removed the folder it made)
        with folder_lock(out_dir, bookkeeping, wait=True, made=made or missing_folders(out_dir)):
            try:
                finished = _finished_metadata(out_dir, identity)
                if finished is not None:  # another part, which ended at the same time, joined them all already
                    return PartOutcome(num_files, dict(journal.skipped), finished, (), wrote_metadata=False)
                if not _holds_extraction(out_dir, identity):  # (nothing else removes it while this part runs)
                    raise ValueError(f"the extraction into {out_dir} was removed by another of its parts, which found "
                                     f"that none of the {len(manifest)} files could be read (see its error): nothing "
                                     "was extracted; fix the audio or the manifest, then run every part again")
                return _finish_parts(model, manifest, out_dir, plan, shard, checkpoint=checkpoint,
                                     num_files=num_files, own_skipped=journal.skipped, outputs=outputs)
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


def _check_finished_part(out_dir: Path, shard: Shard, manifest: Manifest, mine: np.ndarray) -> None:
    """Part ``shard`` of a finished extraction has nothing left to do, unless its audio (``mine``) changed since it
    extracted it (the stamps its journal recorded: ``spidr.eval.journal``): then raise."""
    from spidr.eval.journal import STATE_DIR, audio_stamps, changed_audio, changed_audio_error

    changed = changed_audio(out_dir / STATE_DIR / shard.folder_name, audio_stamps(manifest, rows=mine),
                            lambda index: manifest[index].location)
    if changed:
        raise changed_audio_error(out_dir, changed)
    logger.info("%s holds the finished extraction: part %s has nothing left to do", out_dir, shard)


def _finished_metadata(out_dir: Path, identity: Mapping[str, Any]) -> dict[str, object] | None:
    """The ``metadata.json`` of the finished extraction of ``identity`` that ``out_dir`` holds, or None."""
    try:
        metadata = json.loads((out_dir / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metadata if _holds_extraction(out_dir, identity) else None


def _holds_extraction(out_dir: Path, identity: Mapping[str, Any]) -> bool:
    """Whether ``out_dir`` holds the extraction (finished or not) of ``identity``: its recorded state."""
    from spidr.eval.journal import STATE_DIR, recorded_identity

    try:
        state = json.loads((out_dir / STATE_DIR / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return state == recorded_identity(identity)


def _finish_parts(model: torch.nn.Module, manifest: Manifest, out_dir: Path, plan: _Plan, shard: Shard, *,
                  checkpoint: str, num_files: int, own_skipped: dict[str, str], outputs: _Outputs) -> PartOutcome:
    """After part ``shard``, under the folder's bookkeeping lock: once every part is finished (this one was the
    last), join their unit rows and write ``metadata.json``."""
    from spidr.eval.journal import join_part_units, part_states, remove_part_units

    states = part_states(out_dir, shard.count, len(manifest),
                         part_of=part_numbers(manifest.num_samples, shard.count))
    unfinished = tuple(part for part, state in states.items() if not state.done.all())
    if unfinished:
        return PartOutcome(num_files, dict(own_skipped), None, unfinished, wrote_metadata=False)
    skipped = {location: reason for state in states.values() for location, reason in state.skipped.items()}
    skipped_rows = _skipped_rows(manifest, skipped)
    if _nothing_read(skipped_rows):  # (as a whole extraction: forgotten, for the corrected rerun)
        _remove_extraction_state(out_dir)
        _refuse_nothing_read(skipped, skipped_rows)
    if plan.writes_units:
        join_part_units(out_dir, states)
    metadata = _write_metadata(out_dir, model, plan, checkpoint=checkpoint, num_files=int((~skipped_rows).sum()),
                               skipped=skipped, outputs=outputs, manifest=manifest)
    remove_part_units(out_dir, list(states))
    return PartOutcome(num_files, dict(own_skipped), metadata, ())


def _write_metadata(out_dir: Path, model: torch.nn.Module, plan: _Plan, *, checkpoint: str, num_files: int,
                    skipped: Mapping[str, str], outputs: _Outputs, manifest: Manifest) -> dict[str, object]:
    """Write the record beside each units file, codebook or k-means (what ``spidr units`` writes beside its own: a
    units file copied elsewhere keeps its frame rate and vocabulary), then ``OUT/metadata.json``, which marks the
    extraction finished; returns the metadata as a reader gets it back (lists, not tuples), whichever run wrote it."""
    from spidr.eval.feature_dir import units_metadata_path

    metadata = _metadata(model, plan.saved, checkpoint=checkpoint, num_files=num_files, skipped=dict(skipped))
    # Readers of a layer folder see only the files written: a file whose id a skipped or unread one shared was named
    # by its id alone by spidr units (extract names it by its path), and found by that id for the other file's items.
    metadata["skipped_stems"] = _not_read(manifest, outputs.stems, skipped, outputs.unread)
    metadata["audio_root"] = outputs.root
    for path, own in _units_records(out_dir, model, plan, checkpoint=checkpoint):
        record = {"frame_rate_hz": metadata["frame_rate_hz"], **own, "dedup": False, "num_utterances": num_files,
                  "skipped_stems": metadata["skipped_stems"], "audio_root": outputs.root,
                  "units_file_bytes": path.stat().st_size if path.is_file() else 0}
        write_atomically(units_metadata_path(path), json.dumps(record, indent=2) + "\n")
    if plan.kmeans:
        metadata["kmeans"] = {str(layer): {"centroids": units.source, "num_units": int(units.centroids.shape[0])}
                              for layer, units in sorted(plan.kmeans.items())}
    text = json.dumps(metadata, indent=1)
    write_atomically(out_dir / "metadata.json", text)
    return json.loads(text)


def _units_records(out_dir: Path, model: torch.nn.Module, plan: _Plan, *, checkpoint: str
                   ) -> list[tuple[Path, dict[str, Any]]]:
    """Each units file an extraction of ``plan`` writes, with what its record says of its own units: the layer, the
    vocabulary size and where the units come from (the head's codebook, or centroids and how they are assigned)."""
    from spidr.eval.journal import codebook_units_source, units_file
    from spidr.eval.kmeans import ASSIGNMENT, centroids_digest

    features = f"of {checkpoint or 'the model'} (spidr extract)"
    codebook = codebook_units_source(model) if plan.saved.codebooks else ""
    records = [(units_file(out_dir, f"layer_{layer:02d}"),
                {"layer": layer, "units_source": codebook, "num_units": int(model.cfg.codebook_size),
                 "features": f"layer {layer} {features}", "units": "the argmax of its head over its codebook"})
               for layer in (model.head_layers if plan.saved.codebooks else ())]
    records += [(units_file(out_dir, units.key),
                 {"layer": layer, "units_source": centroids_digest(units.centroids),
                  "num_units": int(units.centroids.shape[0]), "features": f"layer {layer} {features}",
                  "centroids": units.source, "assignment": ASSIGNMENT})
                for layer, units in sorted(plan.kmeans.items())]
    return records


def _record_skipped_stems(out_dir: Path, plan: _Plan, metadata: dict[str, Any], stems: list[str],
                          root: str) -> dict[str, Any]:
    """Add ``skipped_stems`` and ``audio_root`` to the ``metadata.json`` of an extraction finished by a spidr that
    did not record them, and to the records beside its k-means units files; returns the metadata as written."""
    from spidr.eval.feature_dir import units_metadata_path
    from spidr.eval.journal import units_file

    metadata = {**metadata, "skipped_stems": stems, "audio_root": root}
    for units in plan.kmeans.values():
        record_path = units_metadata_path(units_file(out_dir, units.key))
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            write_atomically(record_path, json.dumps({**record, "skipped_stems": metadata["skipped_stems"],
                                                      "audio_root": root}, indent=2) + "\n")
    write_atomically(out_dir / "metadata.json", json.dumps(metadata, indent=1))
    return metadata


def _nothing_read(skipped_rows: np.ndarray) -> bool:
    """Whether the extraction skipped every row (``_skipped_rows``) of a manifest that has some."""
    return bool(len(skipped_rows)) and bool(skipped_rows.all())


def _forget_nothing_read(out_dir: Path, journal: Any, units: Any, skipped_rows: np.ndarray, *, bookkeeping: str,
                         made: Sequence[Path]) -> None:
    """Refuse a whole extraction that could not read one file, leaving nothing of it: its journal took every file
    as done (skipped), so a rerun after the audio or the manifest was fixed resumed into the same refusal, or was
    refused as another extraction. Nothing was extracted, so nothing is lost: the journal and the empty units files
    go, and the folder too where this call made it."""
    # The folder's lock before this extraction's own is let go: in between, an extraction started meanwhile (a
    # --restart, evaluate) would set the folder up as its own, and lose it here.
    with folder_lock(out_dir, bookkeeping, wait=True, made=made):
        journal.close()
        if units is not None:
            units.close()
        _remove_extraction_state(out_dir)
        _refuse_nothing_read(journal.skipped, skipped_rows)


def _remove_extraction_state(out_dir: Path) -> None:
    """Remove the journals (every part's) and what an extraction writes (``EXTRACTION_OUTPUTS``) from ``out_dir``:
    an extraction that read no file, whose outputs are empty files and folders at most."""
    from spidr.eval.journal import STATE_DIR, remove_paths

    remove_paths([out_dir / STATE_DIR, *(path for pattern in EXTRACTION_OUTPUTS for path in out_dir.glob(pattern))])


def _refuse_nothing_read(skipped: Mapping[str, str], skipped_rows: np.ndarray) -> None:
    """No metadata.json (not a finished extraction) when not one file could be read."""
    if _nothing_read(skipped_rows):
        examples = "; ".join(f"{location}: {reason}" for location, reason in list(skipped.items())[:3])
        raise ValueError(f"none of the {len(skipped_rows)} files could be read, so nothing was extracted (e.g. "
                         f"{examples})")


def _in_archive(manifest: Manifest) -> np.ndarray:
    """(N,) bool: which rows are archive members."""
    if manifest.archive_index is None:
        return np.zeros(len(manifest), dtype=bool)
    return manifest.archive_index >= 0


def _extract_short_batch(
    model: torch.nn.Module, manifest: Manifest, waves: list[torch.Tensor], kept: list[int], *, outputs: _Outputs,
    plan: _Plan
) -> dict[str, list[str]]:
    """Run the inputs ``waves`` of entries ``kept`` as one padded batch and save their features; returns their unit
    rows by units file (``spidr.eval.journal.units_file``)."""
    rows: dict[str, list[str]] = {}
    try:
        results = extract_padded_batch(model, waves, plan.saved, kmeans=plan.nearest) if waves else []
    except NonFiniteFeaturesError as error:
        raise error.naming(manifest[kept[error.row]].location) from None
    for index, result in zip(kept, results, strict=True):
        name, path = outputs.utterance(index), manifest[index].path
        for key, values in result.items():
            if key.startswith("layer_"):
                outputs.save(key, index, values)
            else:
                rows.setdefault(_units_file(key), []).append(_unit_row(name, path, values))
    return rows


def _units_file(key: str) -> str:
    """The units file (``spidr.eval.journal.units_file``) of an ``extract_batch`` result: "units_LL" (codebook)
    → "layer_LL", "kmeans_LL" → "kmeans_layer_LL"."""
    kind, layer = key.split("_")
    return f"layer_{layer}" if kind == "units" else f"kmeans_layer_{layer}"


def _metadata(model: torch.nn.Module, settings: ExtractionSettings, *, checkpoint: str, num_files: int,
              skipped: dict[str, str]) -> dict[str, object]:
    from spidr.eval.journal import features_fingerprint

    return {
        "checkpoint": checkpoint,
        # (spidr kmeans records it in its centroids, which are then refused for another model's features)
        "features_fingerprint": features_fingerprint(model),
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


def _extract_long_file(
    model: torch.nn.Module, entry: ManifestEntry, *, outputs: _Outputs, index: int, plan: _Plan
) -> dict[str, list[str]]:
    """Window a long file into its ``layer_LL/<stem>.npy`` files, written as they come; returns its unit rows."""
    audio = LongAudio(entry)
    total = num_frames(audio.num_samples, model.cfg.extractor_conv_layer_config)
    appenders = {f"layer_{layer:02d}": NpyAppender(outputs.path(f"layer_{layer:02d}", index), total,
                                                   model.cfg.encoder_embed_dim) for layer in plan.saved.layers}
    units = {f"units_{layer:02d}": np.zeros(total, dtype=np.int64)
             for layer in (model.head_layers if plan.saved.codebooks else ())}
    units |= {f"kmeans_{layer:02d}": np.zeros(total, dtype=np.int64) for layer in plan.kmeans}
    try:
        extract_long(model, audio, plan.saved, {**appenders, **units}, kmeans=plan.nearest)
    except BaseException as error:
        for sink in appenders.values():
            sink.discard()
        if isinstance(error, NonFiniteFeaturesError):
            raise error.naming(entry.location) from None
        raise
    name = outputs.utterance(index)
    rows = {_units_file(key): [_unit_row(name, entry.path, values)] for key, values in units.items()}
    for appender in appenders.values():
        appender.close()
    return rows
