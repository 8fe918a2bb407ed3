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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spidr.atomic_files import write_atomically
from spidr.eval.units import unit_ids
from spidr.in_progress import marked_in_progress
from spidr.lm.evaluate import TASKS, warn_about_other_folders  # each task lm-eval scores: units, submission
from spidr.lm.models import token_log_likelihoods
from spidr.lm.tokens import Vocabulary
from spidr.lm.train import load_lm, read_lm_units

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


@torch.inference_mode()
def score_sequences(model: nn.Module, vocab: Vocabulary, sequences: Mapping[str, np.ndarray], *,
                    context: int | None = None, batch_tokens: int = 32768,
                    dtype: str = "float32") -> dict[str, ItemScore]:
    """Score every (n,) unit sequence, given as the LM was trained on them: units in [0, ``vocab.num_units``) and
    deduplicated when the LM's ``info["dedup"]`` says so (``read_lm_units`` reads a units file that way; a
    sequence out of range is refused, naming its stem). A padded batch gives the scores of one sequence at a time
    up to float rounding, which depends on the batch; so equal sequences (a word and a nonword whose units are the
    same) are scored once and share their score, a tie as ZeroSpeech counts it, wherever the batches are cut."""
    device = next(iter(model.state_dict().values())).device
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
    for stem in sorted(sequences):
        first_stem.setdefault(key_of[stem], stem)
    stems = sorted(first_stem.values(), key=lambda s: (len(sequences[s]), s))
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
    model, info, labels = load_lm(checkpoint, device=device)
    check_units_origin(checkpoint, info, inputs)
    vocab = Vocabulary(info["num_units"])
    context = info["context"] if info["arch"] == "gpt" else None
    # Every units file is read (and checked against the LM) before anything is written: a bad one stops the command
    # with no half-written output.
    units_of = {key: read_lm_units(path, info, labels) for key, path in sorted(inputs.items())}
    scored = {}
    for (task, split), path in sorted(inputs.items()):
        scored[task, split] = score_sequences(model, vocab, units_of[task, split].sequences, context=context,
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
        write_atomically(out_dir / "meta.json", json.dumps({"checkpoint": str(checkpoint), "norm": norm, "lm": info,
                                                            "items": counts}, indent=1))
    return counts
