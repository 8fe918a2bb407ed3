"""A unit LM's training data, read once per run: the token streams of its units file, kept beside its checkpoints.

``prepare_data`` reads ``data.train`` (and ``data.valid``), holds out the validation utterances and encodes both
streams (``spidr.lm.data``). Parsing a units file is the slow part at scale (≈ 23 min of JSON and ≈ 26 GB for
Libri-light's 60k hours), so ``shared_data`` does it on the main rank only and saves the streams as ``.npy`` files in
``<run dir>/tokens``; every rank then maps them read-only, the ranks of a node sharing one copy in the page cache,
and a resumed run reads them back instead of parsing again. The cache is keyed by the unit files' identity (path,
size, modification time, inode, a hash of their first and last MiB) and the settings that shape the streams;
anything else makes it stale.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spidr.atomic_files import replaced_when_done, save_npy, write_atomically
from spidr.distributed import AgreedValueError, RaisedOnEveryRankError
from spidr.lm.config import LmConfig
from spidr.lm.data import is_held_out, token_stream
from spidr.lm.tokens import Vocabulary, fingerprint, read_unit_sequences

logger = logging.getLogger(__name__)

CACHE_FOLDER = "tokens"
CACHE_FORMAT = 1
# What reading kept streams raises when a file is missing, cut short or not what it should be (they are then read
# from the units file again).
UNREADABLE = (OSError, ValueError, KeyError)


@dataclass(frozen=True)
class LmData:
    vocab: Vocabulary
    train: torch.Tensor  # (N,) token stream (``token_stream``: int16 for up to 32,765 units)
    valid: torch.Tensor  # (M,) token stream, may be empty
    info: dict[str, Any]  # what the LM was trained on: stored in its checkpoints


def prepare_data(cfg: LmConfig, *, need_window: bool = True) -> LmData:
    """Read ``data.train`` (and ``data.valid``), split off the validation utterances, encode both streams.
    ``need_window``: refuse a training stream shorter than one window of ``model.context + 1`` tokens (not an
    n-gram's), before any file is written; a caller that names every such LM at once checks it itself."""
    from spidr.eval.feature_dir import units_origin

    data = cfg.data
    units = read_unit_sequences(data.train, dedup=data.dedup)
    num_units = data.num_units or (len(units.labels.labels) if units.labels else units.max_unit + 1)
    if units.max_unit >= num_units:
        raise ValueError(f"data.num_units = {num_units} but {data.train} holds unit {units.max_unit}")
    if data.valid:
        valid = read_unit_sequences(data.valid, dedup=data.dedup, labels=units.labels, num_units=num_units,
                                    expect_kind=units.kind)
        train_seqs, valid_seqs = units.sequences, valid.sequences
    else:
        held_out = {stem for stem in units.sequences if is_held_out(stem, data.val_fraction, cfg.run.seed)}
        train_seqs = {s: v for s, v in units.sequences.items() if s not in held_out}
        valid_seqs = {s: v for s, v in units.sequences.items() if s in held_out}
    if not train_seqs:
        raise ValueError(f"{data.train}: no training utterance left after holding out data.val_fraction")
    vocab = Vocabulary(num_units)
    info = {
        "kind": units.kind,
        "labels": list(units.labels.labels) if units.labels else None,
        "num_units": num_units,
        "dedup": data.dedup,
        "train_file": str(data.train),
        "train_utterances": len(train_seqs),
        "valid_utterances": len(valid_seqs),
        "train_fingerprint": fingerprint(train_seqs),
        "valid_fingerprint": fingerprint(valid_seqs),
        # the layer and codebook or centroids of the units (their record's; None: not recorded), which lm-score
        # checks the test sets' units against
        "units_origin": units_origin(data.train),
    }
    train = token_stream(train_seqs, vocab)
    if need_window:
        refuse_less_than_a_window(cfg, train)
    return LmData(vocab, train, token_stream(valid_seqs, vocab), info)


def refuse_less_than_a_window(cfg: LmConfig, train: torch.Tensor) -> None:
    """Refuse a training stream shorter than one window of ``model.context + 1`` tokens (not an n-gram's), naming
    ``data.train``, before any file of the run is written."""
    if cfg.model.arch != "ngram" and train.numel() < cfg.model.context + 1:
        raise ValueError(f"{cfg.data.train}: the training data has {train.numel()} tokens, fewer than one window of "
                         f"model.context + 1 = {cfg.model.context + 1}; lower model.context or add data")


# The main rank may parse for a long time while the others wait for its answer (≈ 23 min projected for 60k hours
# on our CPUs): longer than the process group's 30 min would be on a slower machine.
PARSE_TIMEOUT = datetime.timedelta(hours=6)


class DataPreparationError(RaisedOnEveryRankError, RuntimeError):
    """The main rank could not prepare the LM's training data (raised on every rank, naming its error)."""


def shared_data(cfg: LmConfig, *, is_main: bool = True) -> LmData:
    """``prepare_data(cfg)`` through the run's cache: the main rank brings ``<run dir>/tokens`` up to date, then
    every rank maps it. Collective under torchrun (call it on every rank): a refusal of the data (a bad units file),
    or any failure of the main rank, is raised on every rank together. Where the cache cannot be written (a
    read-only run folder), the streams are kept in memory, with a warning; a rank that does not find the main
    rank's streams (a network file system's stale view of the folder on another node) reads the units file
    itself."""
    from spidr.train.environment import broadcast_from_main

    answer: dict[str, Any] = {}
    data, failure = None, None
    if is_main:
        try:
            key = cache_key(cfg)
            data = _updated_cache(cfg, key)
            answer = {"key": key, "sizes": [data.train.numel(), data.valid.numel()]}
        except ValueError as error:
            answer = {"refusal": str(error)}
        except Exception as error:  # told to every rank, then raised here too
            answer = {"failure": f"{type(error).__name__}: {error}"}
            failure = error
    answer = broadcast_from_main(answer, timeout=PARSE_TIMEOUT)
    if "refusal" in answer:
        raise AgreedValueError(answer["refusal"])
    if "failure" in answer:
        message = f"the main rank could not prepare the LM's training data ({answer['failure']})"
        raise DataPreparationError(message) from failure
    if data is not None:
        return data
    folder = cfg.run.run_dir / CACHE_FOLDER
    try:
        if _stored_key(folder) == answer["key"]:
            data = read_cache(folder)
            if [data.train.numel(), data.valid.numel()] == answer["sizes"]:
                return data
    except UNREADABLE:
        pass
    logger.warning("the main rank's token streams are not (yet) visible in %s from this rank: reading the units "
                   "file here", folder)
    return prepare_data(cfg)


def update_cache(cfg: LmConfig, *, need_window: bool = True) -> LmData:
    """The data of ``cfg``, mapped from ``<run dir>/tokens``, which is written first unless it holds these streams
    already (a damaged one is written again); held in memory when the folder cannot be written."""
    return _updated_cache(cfg, cache_key(cfg), need_window=need_window)


def _updated_cache(cfg: LmConfig, key: dict[str, Any], *, need_window: bool = True) -> LmData:
    """``update_cache`` with the ``cache_key`` of ``cfg`` already taken (it reads 2 MiB of each units file)."""
    folder = cfg.run.run_dir / CACHE_FOLDER
    if _stored_key(folder) == key:
        try:
            cached = read_cache(folder)
        except UNREADABLE as error:
            logger.warning("the LM's token streams in %s cannot be read (%s): reading the units file again", folder,
                           error)
        else:  # (the key leaves model.context out: lm-study's check keeps the streams of an LM it refuses)
            if need_window:
                refuse_less_than_a_window(cfg, cached.train)
            return cached
    data = prepare_data(cfg, need_window=need_window)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "key.json").unlink(missing_ok=True)  # stale from here until the streams are all written
        for name, stream in (("train", data.train), ("valid", data.valid)):
            with replaced_when_done(folder / f"{name}.npy") as partial, partial.open("wb") as handle:
                save_npy(handle, stream.numpy())
        write_atomically(folder / "info.json", json.dumps({"num_units": data.vocab.num_units, "info": data.info}))
        write_atomically(folder / "key.json", json.dumps(key))
    except OSError as error:
        logger.warning("cannot keep the LM's token streams in %s (%s): every rank reads the units file itself",
                       folder, error)
        return data
    return read_cache(folder)


def data_info(cfg: LmConfig) -> dict[str, Any]:
    """``prepare_data(cfg).info`` (what an LM's checkpoint records of its data), from the run's cache when it is up
    to date (nothing is written)."""
    folder = cfg.run.run_dir / CACHE_FOLDER
    if _stored_key(folder) == cache_key(cfg):
        try:
            return json.loads((folder / "info.json").read_text(encoding="utf-8"))["info"]
        except UNREADABLE:
            pass
    return prepare_data(cfg).info


def read_cache(folder: Path) -> LmData:
    """The streams of ``folder`` (``update_cache``), mapped read-only."""
    stored = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    with warnings.catch_warnings():  # read-only maps: nothing writes into a token stream
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        train, valid = (torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="r"))
                        for name in ("train", "valid"))
    return LmData(Vocabulary(stored["num_units"]), train, valid, stored["info"])


def cache_key(cfg: LmConfig) -> dict[str, Any]:
    """What the cached streams depend on: each unit file's identity and the data settings that shape them."""
    data = cfg.data
    files = {}
    for role, name in (("train", data.train), ("valid", data.valid)):
        if name:
            try:
                stat = os.stat(name)
            except OSError:  # never cached: prepare_data names the missing file
                files[role] = None
                continue
            # ctime: an edit in place that restores size and mtime (touch -r) still moves it, and no tool sets it
            # back; the ends' digest tells apart another content copied over with cp -p
            files[role] = {"path": str(Path(name).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                           "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino,
                           "ends_sha256": _ends_digest(name, stat.st_size)}
    return {"format": CACHE_FORMAT, "files": files, "dedup": data.dedup, "num_units": data.num_units,
            **({} if data.valid else {"val_fraction": data.val_fraction, "seed": cfg.run.seed})}


def _ends_digest(path: str, size: int, span: int = 1 << 20) -> str | None:
    """SHA-256 of a file's first and last MiB, for the price of 2 MiB read: another content written over the file at
    the same size and time (``cp -p``) is told apart when it differs there; a change in the middle only by the
    file's ctime."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            digest.update(handle.read(span))
            handle.seek(max(size - span, 0))
            digest.update(handle.read(span))
    except OSError:
        return None
    return digest.hexdigest()


def _stored_key(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "key.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
