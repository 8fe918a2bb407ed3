"""Unit files → token sequences for a unit language model.

Two kinds of input, one JSON object per utterance (``.gz`` read transparently):

* discrete units, as ``spidr extract --codebooks`` and ``spidr units`` write them: ``{"name" | "audio": ...,
  "units": [int, ...]}``;
* frame labels (the phone "oracle" topline): ``{"name": ..., "phones": [label, ...]}``, e.g. the corpus's
  ``frame_labels_20ms.jsonl`` or SpidR's LibriSpeech alignments. Labels become integers through a
  ``LabelVocabulary`` fixed at training time and stored with the LM.

Test items (what ``lm-score`` scores) are keyed by file stem (``"spk/utt"`` and ``"/data/spk/utt.wav"`` are both
``"utt"``), the key of the ZeroSpeech submission files; training and validation utterances by their name as written
(``spk1/sa1`` and ``spk2/sa1``, how ``spidr extract`` names two files of one id, are two utterances). With
``dedup`` (the default, as in GSLM, textlesslib and slamkit), runs of a repeated unit
collapse to one token, at training and at scoring time alike. The LM sees ``BOS u_1 … u_n EOS`` per utterance; the
token ids are the units ``0 … V − 1`` followed by BOS = V, EOS = V + 1 and PAD = V + 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from spidr.eval.units import deduplicate, holds_only_integers, read_jsonl_rows_with_lines
from spidr.input_files import existing_file
from spidr.lm.zerospeech import is_stem

UnitsKind = Literal["units", "labels"]
_KIND_WORDS = {"units": "discrete units ('units' rows)", "labels": "frame labels ('phones' rows)"}


@dataclass(frozen=True)
class Vocabulary:
    """Token ids of an LM: ``num_units`` units, then BOS, EOS and PAD."""

    num_units: int

    @property
    def bos(self) -> int:
        return self.num_units

    @property
    def eos(self) -> int:
        return self.num_units + 1

    @property
    def pad(self) -> int:
        return self.num_units + 2

    @property
    def size(self) -> int:
        return self.num_units + 3

    def encode(self, units: np.ndarray) -> np.ndarray:
        """``[BOS, *units, EOS]`` as int64."""
        return np.concatenate([[self.bos], np.asarray(units, dtype=np.int64), [self.eos]]).astype(np.int64)


def file_stem(name: str) -> str:
    """``"spk/utt"``, ``"/data/spk/utt.wav"`` → ``"utt"``: the key of a ZeroSpeech submission line."""
    return Path(name).name.removesuffix(".wav").removesuffix(".flac")


def read_rows(path: str | Path, *, key: Callable[[str], str] = file_stem,
              refuse_deduplicated: str | None = None) -> Iterator[tuple[str, str, str, list, str]]:
    """``(key(name), kind, where, values, line)`` per row, kind "units" or "labels", ``line`` its text; refuses bad
    JSON and a key twice, and with ``refuse_deduplicated`` (why), rows written deduplicated."""
    from spidr.eval.feature_dir import refuse_unfinished_extraction
    from spidr.lm.score import layer_folders_hint

    path = Path(path)
    hint = "" if path.exists() else layer_folders_hint(path.parent, path.name)  # (units/train.jsonl of lm-units')
    if hint:
        raise ValueError(f"units file {path} does not exist: {hint}")
    inside = path / "train.jsonl"  # (a folder of lm-units: one layer's, or --oracle's)
    existing_file(path, "units file", hint=layer_folders_hint(path, inside.name)
                  or (f"give its units file, e.g. {inside}" if inside.is_file() else ""))
    refuse_unfinished_extraction(path)
    for stem, where, found, values, line in read_jsonl_rows_with_lines(
            path, field=("units", "phones"), key=key, refuse_deduplicated=refuse_deduplicated):
        yield stem, "units" if found == "units" else "labels", where, values, line


@dataclass(frozen=True)
class LabelVocabulary:
    """Frame labels (phones) ↔ unit ids, sorted, fixed when the LM is trained."""

    labels: tuple[str, ...]

    def ids(self, values: Sequence[str], where: str) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        try:
            return np.asarray([index[str(v)] for v in values], dtype=np.int64)
        except KeyError as error:
            raise ValueError(f"{where}: label {error.args[0]!r} is not in the LM's label set "
                             f"({', '.join(self.labels)})") from None


def smallest_int_dtype(largest: int) -> type[np.signedinteger]:
    """The smallest signed numpy integer type that holds 0 … ``largest`` (int16, int32 or int64)."""
    for dtype in (np.int16, np.int32):
        if largest <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def compact(ids: np.ndarray) -> np.ndarray:
    """Non-negative ids (n,) in ``smallest_int_dtype`` of their largest: 2 bytes a unit for codebooks and k-means
    (a unit file of 10⁹ frames is then 2 GB in memory, not 8)."""
    return ids.astype(smallest_int_dtype(int(ids.max()) if ids.size else 0), copy=False)


@dataclass(frozen=True)
class UnitSequences:
    """Every utterance of one file as a unit-id array, with what they are."""

    sequences: dict[str, np.ndarray]  # stem → (n,) non-negative ids (``compact``: int16 below 32,768), deduplicated
    # when ``dedup``
    kind: UnitsKind
    dedup: bool
    labels: LabelVocabulary | None  # for kind "labels"
    source: str

    @property
    def max_unit(self) -> int:
        return max((int(s.max()) for s in self.sequences.values() if s.size), default=-1)

    @property
    def num_tokens(self) -> int:
        return sum(s.size for s in self.sequences.values())


def read_unit_sequences(path: str | Path, *, dedup: bool, labels: LabelVocabulary | None = None,
                        num_units: int | None = None, expect_kind: UnitsKind | None = None,
                        submission_names: bool = False) -> UnitSequences:
    """Read a units or frame-label file. For labels without a given ``labels`` vocabulary, the vocabulary is the
    sorted union of the labels in the file and the corpus's phone inventory (ARPAbet-39 + SIL), so that a test item
    may hold a phone the training file lacks. Units ≥ ``num_units`` (when given) are refused, naming the utterance.
    ``expect_kind`` (the kind an LM was trained on): a file of the other kind is refused. Without ``dedup``, units
    written deduplicated (``spidr units --dedup``) are refused: the LM would see them unlike its other inputs.
    ``submission_names`` (test items to score): rows are keyed by file stem, the key of a submission line, and a
    stem such a line cannot hold (empty, or with whitespace) is refused here, naming the line, before any output is
    written; otherwise (training data) by their name as written.

    Rows are turned into arrays (deduplicated with ``dedup``) as they are read: memory is that of the arrays, 2 bytes
    per kept unit below 32,768 units (``compact``; Python lists of every row took 26 bytes per frame before
    deduplication).
    """
    rows = read_rows(path, key=file_stem if submission_names else str, refuse_deduplicated=None if dedup else (
        "the LM reads frame-rate units (data.dedup = false): set data.dedup = true, which deduplicates every file "
        "alike, or write the units without --dedup"))
    kind: UnitsKind | None = None
    found: dict[str, int] = {}  # labels without a vocabulary: label → provisional id, in order of appearance
    sequences: dict[str, np.ndarray] = {}
    for stem, row_kind, where, values, line in rows:
        if submission_names and not is_stem(stem):
            raise ValueError(f"{where}: the item name {stem!r} (the file stem of its 'name') cannot be a line of a "
                             "ZeroSpeech submission: it must be non-empty, without whitespace")
        if kind is None:
            kind = row_kind
            if expect_kind is not None and kind != expect_kind:
                raise ValueError(f"{path} holds {_KIND_WORDS[kind]}, but the LM was trained on "
                                 f"{_KIND_WORDS[expect_kind]}")
            if kind == "units" and labels is not None:
                raise ValueError(f"{path} holds discrete units, but the LM was trained on frame labels "
                                 f"({', '.join(labels.labels[:5])}, ...)")
        elif row_kind != kind:
            raise ValueError(f"{path} mixes 'units' and 'phones' rows ({where}); give one kind per file")
        if kind == "labels":
            array = labels.ids(values, where) if labels is not None else np.asarray(
                [found.setdefault(str(v), len(found)) for v in values], dtype=np.int64)
        else:
            array = _unit_array(values, line, stem, where, num_units)
        if submission_names and not array.size:  # its score would be log p(EOS | BOS), the same for every such item
            raise ValueError(f"{where}: the test item {stem!r} has no units: nothing to score (a file shorter than "
                             "one frame gives none; spidr lm-units refuses such test files)")
        sequences[stem] = compact(deduplicate(array) if dedup else array)
    if kind is None:
        raise ValueError(f"units file {path} has no utterance")
    if kind == "labels" and labels is None:
        from spidr.corpus.phones import phone_inventory

        labels = LabelVocabulary(tuple(sorted(set(found) | set(phone_inventory()))))
        final_id = {label: i for i, label in enumerate(labels.labels)}
        renumber = np.asarray([final_id[label] for label in found], dtype=np.int64)  # provisional → final
        sequences = {stem: compact(renumber[ids]) for stem, ids in sequences.items()}  # a bijection: dedup holds
    return UnitSequences(sequences, kind, dedup, labels if kind == "labels" else None, str(path))


def _unit_array(values: list, line: str, stem: str, where: str, num_units: int | None) -> np.ndarray:
    """One row's ``units`` (its text ``line``) as (n,) int64, checked: non-negative integers, below ``num_units``
    when given."""
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    # numbers past 2**63 are read as uint64 (wrapping in int64): refused as floats, text, nesting and bools are
    if (array.ndim != 1 or array.dtype.kind != "i" or int(array.min()) < 0
            or not holds_only_integers(values, array, line)):
        raise ValueError(f"{where}: 'units' of {stem!r} must be non-negative integers")
    array = array.astype(np.int64, copy=False)
    if num_units is not None and int(array.max()) >= num_units:
        raise ValueError(f"{where}: unit {int(array.max())} of {stem!r} is out of range: the LM has "
                         f"{num_units} units (when data.num_units is 0, lm-train takes 1 + the largest "
                         "unit of its training file; set it to the inventory size, e.g. the codebook size "
                         "or k of k-means)")
    return array


def fingerprint(sequences: Mapping[str, np.ndarray]) -> str:
    """A short hash of the sequences (stems and values), recorded with the LM to identify its training data."""
    import hashlib

    digest = hashlib.sha256()
    for stem in sorted(sequences):
        digest.update(stem.encode())
        digest.update(np.ascontiguousarray(sequences[stem], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]
