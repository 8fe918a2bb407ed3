"""A directory of per-utterance feature files seen as a lazy ``{relative path without extension: (T, D)}`` mapping.

This is the layout fastabx's ``Dataset.from_item`` and the ZeroSpeech submission format use: one ``.npy`` or ``.pt``
file per audio file, mirroring the corpus tree, whose path relative to the root minus the extension is the item
file's ``#file``. Files are read only when accessed, so evaluation code can stream them.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import re
import unicodedata
from collections.abc import Container, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spidr.data.manifest import PackedStrings
from spidr.eval.journal import STATE_DIR
from spidr.folder_walk import walk_following_links

EXTENSIONS = (".npy", ".pt")
logger = logging.getLogger(__name__)


class FeatureDirectory(Mapping[str, np.ndarray | torch.Tensor]):
    """Lazy mapping over the ``.npy`` / ``.pt`` files below ``root`` (searched recursively).

    The keys are kept sorted as packed strings (``spidr.data.manifest.PackedStrings``) and looked up by bisection:
    a directory of 281k feature files costs their names' bytes, not a Path object per file.
    """

    def __init__(self, root: str | Path, *, extensions: tuple[str, ...] = EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"feature directory {self.root} does not exist or is not a directory")
        self.extensions = extensions
        found: list[tuple[str, int]] = []
        for folder, files in walk_following_links(str(self.root)):  # (features gathered with links: followed)
            relative = os.path.relpath(folder, self.root)
            prefix = "" if relative == "." else relative + "/"
            for name in files:
                for code, extension in enumerate(extensions):
                    if name.endswith(extension) and len(name) > len(extension):
                        found.append((prefix + name[: -len(extension)], code))
                        break
        if not found:
            raise ValueError(f"feature directory {self.root} has no {' or '.join(extensions)} files")
        found.sort()
        for (key, a), (other, b) in itertools.pairwise(found):
            if key == other:
                raise ValueError(f"feature directory {self.root}: both {key}{extensions[a]} and {key}{extensions[b]} "
                                 "exist")
        self.keys_ = PackedStrings.from_strings(key for key, _ in found)
        self.codes = np.asarray([code for _, code in found], dtype=np.int8)

    def _index(self, key: object) -> int:
        if not isinstance(key, str):
            return -1
        low, high = 0, len(self.keys_)
        while low < high:
            middle = (low + high) // 2
            if self.keys_[middle] < key:
                low = middle + 1
            else:
                high = middle
        return low if low < len(self.keys_) and self.keys_[low] == key else -1

    def path(self, key: str) -> Path:
        """The file holding ``key``'s features."""
        index = self._index(key)
        if index < 0:
            raise KeyError(key)
        return self.root / f"{key}{self.extensions[self.codes[index]]}"

    def __getitem__(self, key: str) -> np.ndarray | torch.Tensor:
        return load_feature_file(self.path(key))

    def frame_count(self, key: str) -> int:
        """T of one file without reading its data (``.npy`` header; a ``.pt`` is loaded)."""
        shape = self.shape(key)
        return int(shape[0]) if shape else 0

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of one file's features without reading its data (``.npy`` header; a ``.pt`` is loaded)."""
        path = self.path(key)
        if path.suffix != ".npy":
            return tuple(self[key].shape)
        return tuple(_load_npy(path, mapped=True).shape)  # maps the file: reads the header only

    def read_rows(self, key: str, rows: np.ndarray) -> np.ndarray | torch.Tensor:
        """Frames ``rows`` (R,) of one file, (R, D): from a ``.npy`` only the pages holding them are read (k-means
        samples about 1 frame in 170 of LibriSpeech; reading whole files read 515 GB of one base layer for 4 GB)."""
        path = self.path(key)
        whole = _load_npy(path, mapped=True) if path.suffix == ".npy" else self[key]
        if whole.ndim != 2:
            raise ValueError(f"features of {key!r} have shape {tuple(whole.shape)}: expected (T, D)")
        return np.array(whole[rows]) if isinstance(whole, np.ndarray) else whole[torch.as_tensor(rows)]

    def __contains__(self, key: object) -> bool:
        return self._index(key) >= 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def utterance_stem(key: str) -> str:
    """A feature file's path below its layer folder (without suffix) → its utterance id: the last component."""
    return key.rsplit("/", 1)[-1]


def utterance_name(key: str, shared_stems: Container[str]) -> str:
    """The name under which ``key``'s units are written and looked up: its utterance id (``utterance_stem``), or
    its path where other files of the folder share that id (``spk1/sa1``, ``spk2/sa1``: TIMIT); a file at the top
    of the folder is then ``./sa1``, so that the bare id names no file. ``shared_stems``: the ids that several keys
    hold."""
    stem = utterance_stem(key)
    if stem not in shared_stems:
        return stem
    return key if "/" in key else f"./{key}"


class StemKeyed(Mapping[str, np.ndarray | torch.Tensor]):
    """Features (a ``FeatureDirectory``, or units by utterance) found by utterance id as well as by path: item files
    and alignments name LibriSpeech's ``84-121123-0000``, whose features sit at ``84/121123/84-121123-0000.npy``,
    while other item files give a path. A name is looked up as given, then by its last path component where one
    file holds that id. Where several files hold an id (``sa1`` of ``spk1/sa1`` and ``spk2/sa1``), a path finds the
    one whose path it ends with (``corpus/spk1/sa1`` finds ``spk1/sa1``), and the bare id is refused, naming them:
    which one is meant cannot be told. Iterated, it gives ``utterance_name`` of each key: the names units files are
    written with. ``source`` names the features or units for messages.

    ``skipped``: the paths of the files that the extraction skipped (unreadable; ``skipped_stems``). They hold their
    ids as present files do, so that ``spk1/0001`` whose twin ``spk2/0001`` was skipped is named and found by its
    path as ``spidr extract`` names it, and a bare ``0001`` is refused rather than taken for ``spk1/0001``; a name
    that finds a skipped file finds nothing. ``root``: the folder that the keys' paths start from (``audio_root``;
    a skipped file outside it has a path starting with "/"), against whose full paths a name is weighed: where
    every file read is in ``spk1/wav/``, ``spk1/wav/0001`` is the top file ``./0001``, not the unreadable
    ``/corpus/spk2/wav/0001``."""

    def __init__(self, directory: Mapping[str, Any], *, source: str | Path | None = None,
                 skipped: Iterable[str] = (), root: str = "") -> None:
        self.directory = directory
        self.root = root.rstrip("/")
        self.source = source if source is not None else getattr(directory, "root", "the features")
        self.skipped = frozenset(key for key in skipped if key not in directory)
        self.keys_by_stem: dict[str, str] = {}
        self.shared: dict[str, list[str]] = {}  # id → the keys that hold it, where several do
        for key in itertools.chain(directory, sorted(self.skipped)):
            stem = utterance_stem(key)
            if stem in self.shared:
                self.shared[stem].append(key)
            elif stem in self.keys_by_stem:
                self.shared[stem] = [self.keys_by_stem.pop(stem), key]
            else:
                self.keys_by_stem[stem] = key

    def resolve(self, name: str) -> str | None:
        """The key ``name`` finds (None: none, or a skipped file), or ``ValueError`` where it names several files. A
        path finds a key that is a path only where one ends with the other (``spk2/sa1`` never finds ``spk1/sa1``,
        whose twin may have been skipped); a bare id, or a key named by its id alone (a units file's row), goes by
        the id. A name found in neither Unicode form is looked up in the other one (NFC, NFD): "é" typed in an item
        file is one code point, a file name copied from macOS may hold e and a combining accent."""
        key = self._resolve(name)
        if key is None and not name.isascii():
            for form in ("NFC", "NFD"):
                other = unicodedata.normalize(form, name)
                if other != name and (key := self._resolve(other)) is not None:
                    break
        return None if key in self.skipped else key

    def names_skipped(self, name: str) -> bool:
        """Whether ``name`` names a file that the extraction skipped (``skipped``)."""
        try:
            return self._resolve(name) in self.skipped
        except ValueError:
            return False

    def _resolve(self, name: str) -> str | None:
        stem = utterance_stem(name)
        if name in self.directory and not (stem in self.shared and "/" not in name):  # (a bare id: see below)
            return name
        path = name.removeprefix("./")
        if stem not in self.shared:
            key = self.keys_by_stem.get(stem)
            return key if key is None or _paths_agree(path, key) else None
        candidates = self.shared[stem]
        if "/" in name:  # a path: the file it names, else the one that shares the most trailing folders with it
            # (_trailing_match): the one file whose path ends with it (dr1/fcjf0/sa1 for fcjf0/sa1), the one whose
            # path it ends with (spk2/sa1 for data/spk2/sa1; a units file names a top file ./sa1). A file whose path
            # differs from it further up is found only where it was skipped (then nothing is): a skipped
            # /corpus/spk2/sa1 outside the folder, not its top file ./sa1, is what data/spk2/sa1 names.
            exact = [key for key in candidates if key.removeprefix("./") == path]
            if exact:
                return exact[-1]
            matches = {key: _trailing_match(path, key.removeprefix("./"), self.root) for key in candidates}
            best = max(matches.values())
            found = [key for key, match in matches.items() if match == best]
            # (as close to a skipped file as to the one it would find: which it names cannot be told)
            tied = [key for key, match in matches.items() if match[0] == best[0]]
            if len(found) == 1 and (best[1] or found[0] in self.skipped) and not (
                    len(tied) > 1 and any(key in self.skipped for key in tied)):
                return found[0]
        held_by = ", ".join(repr(utterance_name(key, self.shared)) + (" (skipped: unreadable)" if key in self.skipped
                                                                        else "") for key in candidates[:3])
        skipped = " (a skipped file's path finds nothing)" if any(key in self.skipped for key in candidates) else ""
        raise ValueError(f"{name!r}: {len(candidates)} utterances of {self.source} have the id {stem!r} "
                         f"({held_by}{' ...' if len(candidates) > 3 else ''}); name each by one of those paths"
                         + skipped)

    def _key(self, key: object) -> object:
        if not isinstance(key, str):
            return key
        found = self.resolve(key)
        return key if found is None else found

    def __getitem__(self, key: str) -> np.ndarray | torch.Tensor:
        return self.directory[self._key(key)]

    def __contains__(self, key: object) -> bool:
        return self._key(key) in self.directory

    def __iter__(self) -> Iterator[str]:
        return (utterance_name(key, self.shared) for key in self.directory)

    def __len__(self) -> int:
        return len(self.directory)


def _trailing_match(path: str, key: str, root: str = "") -> tuple[int, bool]:
    """How far ``path`` agrees with the file at ``key`` (below ``root``, or a full path starting with "/") from
    their ends: the number of last components it shares with the file's full path, and whether ``path`` and
    ``key`` differ nowhere (one ends with the other)."""
    full = key if key.startswith("/") or not root else f"{root}/{key}"
    ours = path.split("/")
    shared = 0
    for a, b in zip(reversed(ours), reversed(full.split("/")), strict=False):
        if a != b:
            break
        shared += 1
    theirs = key.split("/")
    agree = ours[-len(theirs):] == theirs if len(theirs) <= len(ours) else theirs[-len(ours):] == ours
    return shared, agree


def _paths_agree(path: str, key: str) -> bool:
    """Whether ``path`` may name the file at ``key`` (same id): one of them is bare, or one ends with the other."""
    return ("/" not in path or "/" not in key or path == key or path.endswith(f"/{key}")
            or key.endswith(f"/{path}"))


def names_matched(names: Mapping[str, Any], given: Iterable[str], *, source: str | Path,
                  skipped: Iterable[str] = (), root: str = "") -> dict[str, str]:
    """``{key of names: the given name that finds it}``, each given name (an alignment's utterance, say) found as
    ``StemKeyed`` finds item files' names: by path or by unique utterance id; a bare id that several keys hold is
    refused, and so are two given names for one key (a name equal to a key takes it first). Given names that find
    nothing are left out. ``skipped``, ``root``: as ``StemKeyed``'s."""
    finder = StemKeyed(names, source=source, skipped=skipped, root=root)
    found = [(name, finder.resolve(name)) for name in given]
    matched: dict[str, str] = {key: name for name, key in found if key is not None and key == name}
    for name, key in found:
        if key is None or matched.get(key) == key:  # (the key's own name is given too: that one is meant)
            continue
        if key in matched:
            raise ValueError(f"{matched[key]!r} and {name!r} both name the utterance {key!r} of {source}")
        matched[key] = name
    return matched


def one_layer_directory(root: str | Path) -> FeatureDirectory:
    """``FeatureDirectory(root)``, refusing the output folder of ``spidr extract`` itself (its ``layer_LL``
    subfolders hold one layer each, and reading them together would pool the frames of several layers) and a layer
    folder of an extraction that has not finished (``refuse_unfinished_extraction``)."""
    root = Path(root)
    layers = sorted(path.name for path in root.glob("layer_[0-9]*") if path.is_dir())
    if layers:
        raise ValueError(f"{root} holds the features of {', '.join(layers)} (a spidr extract folder): give one "
                         f"layer's folder, e.g. {root / layers[0]}")
    refuse_unfinished_extraction(root)
    return FeatureDirectory(root)


def refuse_unfinished_extraction(path: str | Path) -> None:
    """Raise if ``path`` is a layer folder (``OUT/layer_LL``) or a units file (``OUT/codebook_units/layer_LL.jsonl``,
    ``OUT/kmeans_units/layer_LL.jsonl``) of a ``spidr extract`` run that has not finished: its journal, but no
    ``metadata.json`` yet (killed, failed or still running). It holds the utterances done so far, the shortest ones
    (extraction batches by length): k-means, units, ABX or an LM on them would silently describe a biased subset,
    and rerunning the extraction completes it cheaply (it resumes)."""
    path = Path(path).resolve()  # resolved: the parent of "." is "."
    extraction = path.parent.parent if path.parent.name in ("codebook_units", "kmeans_units") else path.parent
    if (extraction / STATE_DIR).is_dir() and not (extraction / "metadata.json").is_file():
        raise ValueError(f"{path} is from an unfinished spidr extract run ({extraction} has its {STATE_DIR}/ journal "
                         "but no metadata.json): it covers only the utterances done so far; rerun the same spidr "
                         "extract command to complete it (of an extraction in parts, each part not finished yet)")


def units_metadata_path(units_path: str | Path) -> Path:
    """The file beside a units file in which ``spidr units`` records what its units are: ``<name>.metadata.json``."""
    units_path = Path(units_path)
    return units_path.with_name(units_path.name + ".metadata.json")


def _recorded_metadata(path: str | Path) -> tuple[dict, Path] | None:
    """The record of how ``path`` was made, and its file: a units file's ``<name>.metadata.json`` (``spidr units``),
    else the ``metadata.json`` of the ``spidr extract`` run that wrote it (``OUT/layer_LL`` or
    ``OUT/codebook_units/layer_LL.jsonl``); None when none is found or it is not a JSON object."""
    import json

    path = _absolute(path)
    own = units_metadata_path(path) if path.is_file() else None
    for metadata in (*([own] if own else []), *(folder / "metadata.json" for folder in (path, *path.parents[:2]))):
        if metadata.is_file():
            try:
                record = json.loads(metadata.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
            if not isinstance(record, dict):
                return None
            if metadata == own and record.get("units_file_bytes") != _size(path):
                logger.warning("%s describes another version of %s (written since by something else): not used",
                               metadata, path)
                continue
            return record, metadata
    return None


def units_origin(path: str | Path) -> dict[str, Any] | None:
    """What the units of a units file are, from the record beside it (written by ``spidr units``, ``extract`` and
    ``lm-units`` since 2026-12-07): ``{"layer": the model layer (None: unknown), "units_source": the model's heads
    (``spidr.eval.journal.codebook_units_source``) or the centroids' digest
    (``spidr.eval.kmeans.centroids_digest``)}``; None when no such record describes this file."""
    import json

    path = _absolute(path)
    try:
        record = json.loads(units_metadata_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("units_source"), str) or (
            record.get("units_file_bytes") != _size(path)) or record["units_source"] == "codebook":
        return None  # (a bare "codebook": written before the source named the model, on 2026-12-07: unknown)
    layer = record.get("layer")
    return {"layer": layer if isinstance(layer, int) and not isinstance(layer, bool) else None,
            "units_source": record["units_source"]}


def describe_units_origin(origin: Mapping[str, Any]) -> str:
    """``units_origin`` in words: "the codebook of layer 2 (heads codebook:1234abcd…)", "k-means centroids
    sha1:1234abcd… of layer 6"."""
    layer = f" of layer {origin['layer']}" if origin.get("layer") is not None else ""
    source = origin["units_source"]
    if source.startswith("codebook"):
        return f"the codebook{layer} (heads {source[:17]}…)"
    return f"k-means centroids {source[:13]}…{layer}"


def skipped_stems(path: str | Path) -> frozenset[str]:
    """The paths (below the layer folder, without suffix) of the files that the extraction of the features or units
    at ``path`` skipped, or that the scan it read could not read, as its record lists them (``skipped_stems``; see
    :func:`_recorded_metadata`): for ``StemKeyed``'s ``skipped``. Empty where none is recorded (another tool; an
    older spidr, with a warning where it lists skipped files)."""
    found = _recorded_metadata(path)
    stems = found[0].get("skipped_stems") if found is not None else None
    if found is not None and stems is None and found[0].get("skipped"):
        logger.warning("%s lists files that the extraction skipped but not their paths (an older spidr): a file "
                       "sharing an utterance id with one of them is found by that id alone; rerun the same spidr "
                       "extract command to record them", found[1])
    return frozenset(stem for stem in stems if isinstance(stem, str)) if isinstance(stems, list) else frozenset()


def audio_root(path: str | Path) -> str:
    """The folder that the feature files' paths (and their units rows' paths) start from, as the record of the
    features or units at ``path`` gives it (``audio_root``; see :func:`_recorded_metadata`): for ``StemKeyed``'s
    ``root``. "" where none is recorded."""
    found = _recorded_metadata(path)
    root = found[0].get("audio_root") if found is not None else None
    return root if isinstance(root, str) else ""


def recorded_features_origin(path: str | Path) -> dict[str, str]:
    """What the record of the features at ``path`` (see :func:`_recorded_metadata`) says of the model and layer
    outputs they came from, as ``spidr kmeans`` records it in its centroids (``spidr.eval.kmeans.features_origin``):
    the fingerprint of the model's feature weights (recorded since 2026-12-07), whether they were taken before the
    residual add, and the checkpoint's path. Only what is recorded."""
    from spidr.eval.kmeans import features_origin

    found = _recorded_metadata(path)
    record = found[0] if found is not None else {}
    fingerprint, before_residual, checkpoint = (record.get(key) for key in
                                                ("features_fingerprint", "before_residual", "checkpoint"))
    return features_origin(fingerprint=fingerprint if isinstance(fingerprint, str) else None,
                  before_residual=before_residual if isinstance(before_residual, bool) else None,
                  checkpoint=checkpoint if isinstance(checkpoint, str) else None)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def extraction_frame_rate(path: str | Path) -> tuple[float, Path] | None:
    """The frame rate (Hz) recorded for the features or units at ``path`` (see :func:`_recorded_metadata`), and
    the file that records it; None when none is recorded."""
    found = _recorded_metadata(path)
    if found is None:
        return None
    rate = found[0].get("frame_rate_hz")
    return (float(rate), found[1]) if isinstance(rate, int | float) and not isinstance(rate, bool) else None


def _absolute(path: str | Path) -> Path:
    """``path`` made absolute without following links ("." has no name and no parents, so the metadata.json of
    its extraction was not found; a units file linked from a dataset snapshot keeps its record beside the link)."""
    return Path(os.path.abspath(path))


def recorded_num_units(path: str | Path) -> tuple[int, Path] | None:
    """The unit vocabulary size recorded for a units file (``num_units`` of ``spidr units``, or the codebook size
    of the ``spidr extract`` run that wrote ``OUT/codebook_units/``), and the file that records it; else None."""
    found = _recorded_metadata(path)
    if found is None:
        return None
    record, metadata = found
    path = _absolute(path)  # as _recorded_metadata names it
    if metadata == units_metadata_path(path):
        size = record.get("num_units")
    else:  # only the files that extraction wrote: codebook_units/layer_LL.jsonl of a head layer (recorded since
        # 2026-12-06; before, of a layer whose features it wrote too)
        match = re.fullmatch(r"layer_(\d+)\.jsonl", path.name)
        layers = record.get("codebook_layers", record.get("layers"))
        written = (path.parent.name == "codebook_units" and match is not None and isinstance(layers, list)
                   and int(match.group(1)) in layers)
        size = record.get("codebook_size") if written else None
    return (size, metadata) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _load_npy(path: Path, *, mapped: bool = False) -> np.ndarray:
    """A ``.npy`` file (no pickles), read whole or memory-mapped read-only."""
    try:
        return np.load(path, mmap_mode="r" if mapped else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # object arrays, a cut header, an empty file
        raise ValueError(f"{path}: not a plain numeric .npy array ({error})") from None


def load_feature_file(path: str | Path) -> np.ndarray | torch.Tensor:
    """Read one feature array from ``.npy`` (no pickles) or ``.pt`` (weights only: a single tensor)."""
    path = Path(path)
    if path.suffix == ".npy":
        return _load_npy(path)
    from spidr.models.loading import unpickling_failure

    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: not a .pt file of one tensor ({unpickling_failure(error)})") from None
    except EOFError:
        raise ValueError(f"{path}: not a .pt file of one tensor (it is empty or cut short)") from None
    except (RuntimeError, OSError, IndexError, KeyError, TypeError, AttributeError, ValueError) as error:
        # bytes that are neither a zip archive nor a pickle derail the unpickler in many ways
        raise ValueError(f"{path}: not a .pt file of one tensor ({type(error).__name__}: {error})") from None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path}: expected a single tensor, found {type(value).__name__}")
    return value
