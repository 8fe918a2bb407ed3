"""``spidr lm-eval --baseline ngram``: what unigram and bigram models of the benchmark's units score on its pairs.

The lexical nonwords are balanced so that phone unigram and bigram models sit near 50 % (``spidr.corpus.nonwords``),
and the syntactic blocks are counterbalanced so that they sit at exactly 50 % on agreement; this command checks a
benchmark against that design and gives the floor a unit LM has to beat. The models are ``lm-train``'s ``ngram``
LMs (add-k counts over ``BOS u … EOS`` utterances, units deduplicated as every unit LM reads them), fitted on every
training utterance (no validation split: nothing is tuned) and scored like any LM (``score_sequences``, mean
log-probability per token), so their submissions are ZeroSpeech files that ``lm-eval`` scores as it scores any.

Inputs, in ``lm-units``' layout: ``UNITS_DIR/train.jsonl`` and ``UNITS_DIR/<task>/<split>.jsonl``, or by default
the benchmark's own 20 ms phone labels (``BENCH_DIR/train/frame_labels_20ms.jsonl`` and
``BENCH_DIR/<task>/<split>/frame_labels_20ms.jsonl``): the phone models the nonwords were balanced against.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from spidr.lm.bench_units import FRAME_LABELS
from spidr.lm.config import LmModelSection
from spidr.lm.evaluate import TASKS
from spidr.lm.score import layer_folders_hint

logger = logging.getLogger(__name__)

NGRAM_ORDERS = {"unigram": 1, "bigram": 2}
ADD_K = LmModelSection.ngram_add_k  # lm-train's default, so that lm-study's phone bigram is the same model


def baseline_inputs(bench_dir: str | Path, units_dir: str | Path | None, kind: str) -> tuple[Path, dict[str, Path]]:
    """(training file, {task: file of the ``kind`` split}) from ``units_dir``, or from the benchmark's frame labels."""
    if units_dir is None:
        root, train = Path(bench_dir), Path(bench_dir) / "train" / FRAME_LABELS
        tests = {task: root / task / kind / FRAME_LABELS for task in TASKS}
        what = "the benchmark's phone labels (spidr synth-lm-bench writes them)"
    else:
        from spidr.lm.bench_units import refuse_unfinished_units

        refuse_unfinished_units(units_dir)  # (its sets so far: the others' tasks would go unscored)
        root, train = Path(units_dir), Path(units_dir) / "train.jsonl"
        tests = {task: root / task / f"{kind}.jsonl" for task in TASKS}
        what = ("units in lm-units' layout (UNITS_DIR/train.jsonl, UNITS_DIR/<task>/<split>.jsonl: a model's "
                "OUT/layer_LL, or OUT of --oracle)")
    if not train.is_file():
        hint = layer_folders_hint(root)
        raise ValueError(f"{train} does not exist: the n-gram baselines are fitted on {what}"
                         + (f"; {hint}" if hint else ""))
    found = {task: path for task, path in tests.items() if path.is_file()}
    if not found:
        raise ValueError(f"no {kind} set to score in {root}: expected {what}")
    return train, found


def write_ngram_submissions(train: Path, tests: Mapping[str, Path], out_dir: str | Path, *,
                            kind: str) -> dict[str, Path]:
    """Fit each n-gram model on ``train``, score every test file and write ``out_dir/<model>/<task>/<kind>.txt``;
    returns ``{model: submission folder}``. Every file is read before anything is written."""
    from spidr.lm.data import token_stream
    from spidr.lm.models import NgramLM
    from spidr.lm.score import score_sequences
    from spidr.lm.tokens import Vocabulary, read_unit_sequences
    from spidr.lm.zerospeech import write_submission

    units = read_unit_sequences(train, dedup=True)
    tests_read = {task: read_unit_sequences(path, dedup=True, labels=units.labels, expect_kind=units.kind,
                                            submission_names=True) for task, path in tests.items()}
    # Units: the inventory is what any file holds (a test item may hold a unit no training utterance has, which
    # add-k smoothing gives a probability); labels: the training file's label set, which covers the phone inventory.
    num_units = len(units.labels.labels) if units.labels else 1 + max(
        units.max_unit, *(read.max_unit for read in tests_read.values()))
    vocab = Vocabulary(num_units)
    items = {task: read.sequences for task, read in tests_read.items()}
    stream = token_stream(units.sequences, vocab)
    folders = {}
    for name, order in NGRAM_ORDERS.items():
        model = NgramLM(vocab.size, order=order, add_k=ADD_K)
        model.fit(stream)
        folder = Path(out_dir) / name
        for task in TASKS:  # a submission left by an earlier run (another --units) would be scored with these
            (folder / task / f"{kind}.txt").unlink(missing_ok=True)
        for task, sequences in items.items():
            scores = score_sequences(model, vocab, sequences)
            write_submission(folder / task / f"{kind}.txt", {stem: s.mean for stem, s in scores.items()})
        folders[name] = folder
        logger.info("%s model fitted on %d utterances of %s", name, len(units.sequences), train)
    return folders
