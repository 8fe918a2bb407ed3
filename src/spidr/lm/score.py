"""``spidr lm-score``: log-likelihood of every test item under a trained unit LM, as ZeroSpeech submission files.

The score of an item with units u_1 … u_n (deduplicated when the LM was trained so) is
log p(u_1 … u_n, EOS | BOS) = Σ_t log p(token_t | tokens_<t) over the n + 1 predicted tokens: ``sum`` is that total
and ``mean`` divides it by n + 1 (the SpidR paper's and slamkit's length normalisation, the default). Items are
scored in padded batches sorted by length, both normalisations in one pass.

Input layout: ``UNITS_DIR/<task>/<split>.jsonl`` (task ``lexical``, ``syntactic``, ``tsc``, ``ssc`` or
``lexical_seen``; split ``dev`` or ``test``), each a units or frame-label file of that test set. Output:
``SUBMISSION_DIR/<task>/<split>.txt`` with one ``<stem> <score>`` line per item (what ``spidr lm-eval`` and the
ZeroSpeech toolkit read) and ``SUBMISSION_DIR/scores.jsonl`` with both normalisations and the token count of every
item.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import nn

from spidr.atomic_files import write_atomically
from spidr.eval.units import unit_ids
from spidr.in_progress import marked_in_progress
from spidr.lm.evaluate import TASKS, warn_about_other_folders  # each task lm-eval scores: units, submission
from spidr.lm.models import token_log_likelihoods
from spidr.lm.tokens import LabelVocabulary, Vocabulary
from spidr.lm.train import load_lm, read_lm_units
from spidr.model_modes import eval_mode

logger = logging.getLogger(__name__)

SPLITS = ("dev", "test")
# Present in a submission folder while lm-score writes it: lm-eval refuses such a folder, and a rerun of lm-score
# replaces it without --overwrite (a killed run's folder was refused as an earlier result).
IN_PROGRESS = ".lm-score-in-progress"


@dataclass(frozen=True)
class ItemScore:
    logprob: float  # natural-log probability of the units and EOS given BOS
    num_tokens: int  # predicted tokens: units + EOS

    @property
    def mean(self) -> float:
        return self.logprob / self.num_tokens


DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class UnitLM:
    """A trained unit LM ready to score (``load_unit_lm``): the model in eval mode and what it was trained on."""

    model: nn.Module
    info: dict[str, Any]  # the checkpoint's ``lm`` record (num_units, dedup, kind, ...) with arch, context and step
    labels: LabelVocabulary | None  # an LM of frame labels (phones): its labels in id order

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary(self.info["num_units"])

    @property
    def context(self) -> int | None:
        """The window a GPT reads (longer items are scored in strided windows); None for LSTM and n-gram LMs."""
        return self.info["context"] if self.info["arch"] == "gpt" else None


def load_unit_lm(path: str | Path, *, device: str | torch.device = "cpu") -> UnitLM:
    """The unit LM that ``spidr lm-train`` saved at ``path`` (a run's ``final.pt``)."""
    return UnitLM(*load_lm(path, device=device))


@overload
def score_units(lm: UnitLM | str | Path, sequences: Mapping[str, object], *, batch_tokens: int = ...,
                dtype: str = ...) -> dict[str, ItemScore]: ...
@overload
def score_units(lm: UnitLM | str | Path, sequences: Sequence[object], *, batch_tokens: int = ...,
                dtype: str = ...) -> list[ItemScore]: ...


def score_units(lm: UnitLM | str | Path, sequences: Mapping[str, object] | Sequence[object], *,
                batch_tokens: int = 32768, dtype: str = "float32") -> dict[str, ItemScore] | list[ItemScore]:
    """Score in-memory items as ``spidr lm-score`` scores a units file: ``sequences`` holds each item's units at the
    frame rate (or its phone labels, for an LM trained on frame labels), deduplicated here when the LM was trained
    on deduplicated units, and a GPT reads an item longer than its context in strided windows. ``sequences``: name →
    (n,) units (then a dict by name comes back), or a list of them (then a list in the same order). ``lm``: a
    ``load_unit_lm`` result or a checkpoint path. Take ``.mean`` (the default ``--norm``) or ``.logprob`` of each
    score; ``spidr.lm.evaluate.pair_accuracy`` turns them into a pair accuracy."""
    from spidr.eval.units import deduplicate

    if not isinstance(lm, UnitLM):
        lm = load_unit_lm(lm)
    listed = not isinstance(sequences, Mapping)
    if listed and (isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence)):
        raise TypeError(f"sequences: expected a mapping of item names to units, or a list of unit sequences, got "
                        f"{type(sequences).__name__}")
    named = {str(i): values for i, values in enumerate(sequences)} if listed else dict(sequences)
    ids = {}
    for name, values in named.items():
        where = f"item {int(name) if listed else name!r}"
        if lm.labels is not None:
            if isinstance(values, (str, bytes)):
                raise ValueError(f"{where}: expected a sequence of frame labels (the LM reads phones), got a string")
            array = lm.labels.ids(list(values), where)
        else:
            array = unit_ids(values, where)
        if array.ndim != 1:
            raise ValueError(f"{where}: expected a 1-D sequence of units, got shape {array.shape}")
        ids[name] = deduplicate(array) if lm.info["dedup"] else array
    scores = score_sequences(lm.model, lm.vocab, ids, context=lm.context, batch_tokens=batch_tokens, dtype=dtype)
    return [scores[str(i)] for i in range(len(named))] if listed else scores


@torch.inference_mode()
def score_sequences(model: nn.Module, vocab: Vocabulary, sequences: Mapping[str, np.ndarray], *,
                    context: int | None = None, batch_tokens: int = 32768,
                    dtype: str = "float32") -> dict[str, ItemScore]:
    """Score every (n,) unit sequence, given as the LM was trained on them: units in [0, ``vocab.num_units``) and
    deduplicated when the LM's ``info["dedup"]`` says so (``read_lm_units`` reads a units file that way, and
    ``score_units`` in-memory units; a sequence out of range is refused, naming its stem). ``context``: a GPT's
    (read from the model when not given). A padded batch gives the scores of one sequence at a time up to float
    rounding, which depends on the batch; so equal sequences (a word and a nonword whose units are the same) are
    scored once and share their score, a tie as ZeroSpeech counts it, wherever the batches are cut."""
    if not isinstance(sequences, Mapping):
        raise TypeError(f"sequences: expected a mapping of item names to unit arrays, got {type(sequences).__name__} "
                        "(spidr.lm.score.score_units also takes a list)")
    _refuse_unknown_dtype(dtype, "dtype")
    if context is None:
        context = getattr(model, "context", None)
    device = next(iter(model.state_dict().values())).device
    with eval_mode(model):  # (a model left in training mode scored with dropout: other scores at every call)
        return _scored(model, vocab, sequences, context=context, batch_tokens=batch_tokens, dtype=dtype,
                       device=device)


def _scored(model: nn.Module, vocab: Vocabulary, sequences: Mapping[str, np.ndarray], *, context: int | None,
            batch_tokens: int, dtype: str, device: torch.device) -> dict[str, ItemScore]:
    _refuse_another_vocabulary(model, vocab, device)
    arrays = {stem: unit_ids(values, f"item {stem!r}") for stem, values in sequences.items()}
    for stem, values in arrays.items():
        if values.ndim != 1:
            raise ValueError(f"item {stem!r}: expected a 1-D sequence of unit ids, got shape {values.shape}")
        outside = values[(values < 0) | (values >= vocab.num_units)]
        if outside.size:
            raise ValueError(f"item {stem!r} holds unit {int(outside[0])}: this LM knows units 0 to "
                             f"{vocab.num_units - 1} (its data.num_units = {vocab.num_units})")
    sequences = arrays
    key_of = {stem: values.tobytes() for stem, values in sequences.items()}
    first_stem: dict[bytes, str] = {}  # each distinct sequence → the first stem holding it
    for stem in sorted(sequences, key=str):  # (names of any type: a dict of ints and strings too)
        first_stem.setdefault(key_of[stem], stem)
    stems = sorted(first_stem.values(), key=lambda s: (len(sequences[s]), str(s)))
    scores: dict[str, ItemScore] = {}
    i = 0
    while i < len(stems):
        longest = len(sequences[stems[i]]) + 2
        batch = [stems[i]]
        while i + len(batch) < len(stems):
            longest = len(sequences[stems[i + len(batch)]]) + 2
            if longest * (len(batch) + 1) > batch_tokens:
                break
            batch.append(stems[i + len(batch)])
        encoded = [vocab.encode(sequences[stem]) for stem in batch]
        width = max(len(e) for e in encoded)
        tokens = torch.full((len(batch), width), vocab.pad, dtype=torch.int64)
        for row, values in enumerate(encoded):
            tokens[row, :len(values)] = torch.from_numpy(values)
        lengths = torch.tensor([len(e) for e in encoded])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            values = token_log_likelihoods(model, tokens.to(device), lengths.to(device), context=context)
        totals = values.double().sum(1).cpu().tolist()
        for stem, total, length in zip(batch, totals, lengths.tolist(), strict=True):
            scores[stem] = ItemScore(total, length - 1)
        i += len(batch)
    return {stem: scores[first_stem[key_of[stem]]] for stem in sequences}


def _refuse_unknown_dtype(dtype: str, option: str) -> None:
    """Any other string was scored as float32, silently."""
    if dtype not in DTYPES:
        raise ValueError(f"{option} {dtype!r} is invalid: expected one of {', '.join(DTYPES)}")


def _refuse_another_vocabulary(model: nn.Module, vocab: Vocabulary, device: torch.device) -> None:
    """A vocabulary of another size puts BOS and EOS on other ids: every score would be wrong, without an error."""
    size = model(torch.zeros((1, 1), dtype=torch.int64, device=device)).shape[-1]
    if size != vocab.size:
        raise ValueError(f"the vocabulary has {vocab.size} tokens ({vocab.num_units} units, BOS, EOS), but the LM "
                         f"predicts {size}: give Vocabulary(num_units) with the num_units the LM was trained on "
                         "(its info['num_units']; spidr.lm.score.load_unit_lm reads both)")


def layer_folders_hint(folder: str | Path, inside: str = "") -> str:
    """Where ``folder`` holds ``spidr lm-units``' folders of a model's layers (``OUT/layer_LL/``, each with its
    ``train.jsonl`` or task folders) rather than one set of units: the sentence that says which to give (with
    ``inside``: the file of it to give); else ""."""
    folder = Path(folder)
    layers = sorted(path.name for path in folder.glob("layer_[0-9]*") if path.is_dir() and (
        (path / "train.jsonl").is_file() or any((path / task).is_dir() for task in TASKS))) if folder.is_dir() else []
    if not layers:
        return ""
    example = folder / layers[0] / inside if inside else folder / layers[0]
    return (f"{folder} holds the units of {', '.join(layers)}, as spidr lm-units writes a model's: give one layer's "
            f"{'file' if inside else 'folder'}, e.g. {example}")


def find_unit_files(units_dir: str | Path) -> dict[tuple[str, str], Path]:
    """``(task, split) → UNITS_DIR/<task>/<split>.jsonl`` for the files that exist (``.jsonl.gz`` too; both for one
    split is an error, as either could be the one meant)."""
    from spidr.lm.bench_units import refuse_unfinished_units

    units_dir = Path(units_dir)
    if not units_dir.is_dir():
        raise ValueError(f"units folder {units_dir} " + ("is a file" if units_dir.exists() else "does not exist")
                         + ": expected UNITS_DIR/<task>/<split>.jsonl, as lm-units writes them")
    refuse_unfinished_units(units_dir)
    warn_about_other_folders(units_dir, "units folder")
    found = {}
    for task in TASKS:
        for split in SPLITS:
            paths = [units_dir / task / f"{split}{suffix}" for suffix in (".jsonl", ".jsonl.gz")]
            present = [path for path in paths if path.is_file()]
            if len(present) > 1:
                raise ValueError(f"both {present[0]} and {present[1]} exist: keep the one to score")
            if present:
                found[(task, split)] = present[0]
    return found


def check_units_origin(checkpoint: str | Path, info: Mapping[str, Any], inputs: Mapping[tuple[str, str], Path]
                       ) -> None:
    """Refuse test units of another layer, or of other centroids or the codebook rather than centroids, than the
    units the LM was trained on (``units_origin`` of each, where both records tell): with the same vocabulary size,
    an LM scores them without an error, and near chance. Units whose record does not tell are not checked."""
    from spidr.eval.feature_dir import describe_units_origin, units_origin

    trained = info.get("units_origin")
    if not isinstance(trained, dict):
        return
    for path in sorted(inputs.values()):
        given = units_origin(path)
        if given is None:
            continue
        layers = (trained.get("layer"), given["layer"])
        if given["units_source"] != trained["units_source"] or (None not in layers and layers[0] != layers[1]):
            raise ValueError(f"{path} holds units of {describe_units_origin(given)}, but the LM {checkpoint} was "
                             f"trained on units of {describe_units_origin(trained)} ({info.get('train_file')}): "
                             "score the test sets' units of the same layer and centroids (lm-units writes them "
                             "side by side)")


def score_benchmark(checkpoint: str | Path, inputs: Mapping[tuple[str, str], Path], out_dir: str | Path, *,
                    norm: str = "mean", device: str = "cpu", batch_tokens: int = 32768,
                    dtype: str = "float32") -> dict[str, int]:
    """Score each (task, split) units file and write the submission; returns the number of items per file."""
    from spidr.lm.zerospeech import submission_text

    if norm not in ("mean", "sum"):
        raise ValueError(f"--norm {norm!r} is invalid: expected 'mean' or 'sum'")
    if not inputs:
        raise ValueError("no units file to score: expected UNITS_DIR/<task>/<split>.jsonl with task in "
                         f"{', '.join(TASKS)} and split dev or test")
    _refuse_unknown_dtype(dtype, "--dtype")  # (before the LM is loaded)
    lm = load_unit_lm(checkpoint, device=device)
    check_units_origin(checkpoint, lm.info, inputs)
    # Every units file is read (and checked against the LM) before anything is written: a bad one stops the command
    # with no half-written output.
    units_of = {key: read_lm_units(path, lm.info, lm.labels) for key, path in sorted(inputs.items())}
    scored = {}
    for (task, split), path in sorted(inputs.items()):
        scored[task, split] = score_sequences(lm.model, lm.vocab, units_of[task, split].sequences, context=lm.context,
                                              batch_tokens=batch_tokens, dtype=dtype)
        logger.info("scored %d items of %s/%s (%s)", len(scored[task, split]), task, split, path)
    # Every file's text is made (and checked: a NaN score) before anything is written. An earlier submission's
    # meta.json goes first, so that a folder stopped in between names no checkpoint, then each file is written whole
    # or not at all, an earlier submission's files of sets not scored now go (lm-eval would score them as this
    # model's), and meta.json, naming this checkpoint, comes last.
    out_dir = Path(out_dir)
    texts = {out_dir / task / f"{split}.txt": submission_text(
        out_dir / task / f"{split}.txt", {stem: s.mean if norm == "mean" else s.logprob for stem, s in scores.items()})
        for (task, split), scores in scored.items()}
    rows = [json.dumps({"task": task, "split": split, "name": stem, "sum": s.logprob, "mean": s.mean,
                        "num_tokens": s.num_tokens}) + "\n"
            for (task, split), scores in scored.items() for stem, s in sorted(scores.items())]
    counts = {f"{task}/{split}": len(scores) for (task, split), scores in scored.items()}
    with marked_in_progress(out_dir, IN_PROGRESS):
        (out_dir / "meta.json").unlink(missing_ok=True)
        for path, text in texts.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, text)
        write_atomically(out_dir / "scores.jsonl", "".join(rows))
        for task in TASKS:
            for split in SPLITS:
                stale = out_dir / task / f"{split}.txt"
                if (task, split) not in scored and stale.is_file():
                    stale.unlink()
        write_atomically(out_dir / "meta.json", json.dumps({"checkpoint": str(checkpoint), "norm": norm, "lm": lm.info,
                                                            "items": counts}, indent=1))
    return counts
