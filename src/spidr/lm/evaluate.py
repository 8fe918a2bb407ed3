"""Zero-shot pair accuracies of a spoken LM (sWUGGY, sBLIMP, tSC, sSC), computed as the ZeroSpeech 2021 toolkit does.

The rule (zerospeech2021 ``lexical.py`` / ``syntactic.py``, zerospeech/benchmarks ``_score_invocab``):

1. **Pair score** per (id, voice): 1 if score(correct) > score(incorrect), ½ on a tie, else 0. A lexical (id, voice)
   with several nonwords (BabySLM) scores the mean over its nonwords; where the voices of an id have unequal numbers
   of nonwords, the toolkit's flat mean over all (voice, nonword) comparisons differs, and a warning names the ids
   (sLM21 has one nonword per word). Rows are paired by key, never by file order (the toolkit's sBLIMP pairs the
   k-th correct row with the k-th incorrect one: the same on the released gold files, whose rows are in order).
2. **Per pair id:** the mean over voices, keyed by ``id`` (lexical, StoryCloze) or ``(type, subtype, id)`` (sBLIMP).
3. **Headline:** the mean over pair ids: ``swuggy_all``, ``sblimp``, ``tsc``, ``ssc``. ``swuggy_invocab`` is the
   count-weighted mean of the frequency bands other than ``oov``, i.e. the mean over ids with frequency ≥ 1 (the
   leaderboard's formula gives NaN where a band is empty; a log line names the empty bands).
4. **Breakdowns** (``n``, mean ``score`` and ``std`` with ddof = 1 over pair ids, as pandas' ``agg``): lexical by
   frequency band and by length, sBLIMP by type and by (type, subtype), StoryCloze by type. Every task also has a
   ``by_voice`` table (the mean of the (id, voice) pair scores per voice), which the toolkit does not have. Beyond
   the toolkit too, a row of 5 values or more gets its mean's CI and p-value as a headline number does (below).

The frequency bands are the toolkit's ``pandas.cut(frequency, [0, 1, 5, 20, 100, inf], right=False)``: [0, 1)
``oov``, [1, 5) ``1-5``, [5, 20) ``6-20``, [20, 100) ``21-100``, [100, ∞) ``>100``; so a word seen 5 times is in
``6-20`` despite the label. Ids of unknown frequency count in ``swuggy_all`` and in no band.

Each headline number also gets its number of pair ids, a 95 % percentile-bootstrap confidence interval over pair ids
(1,000 resamples, seeded ``numpy.random.default_rng``) and a two-sided exact binomial test against chance:
``scipy.stats.binomtest(k, m)`` with k = ids scoring > ½ and m = ids scoring ≠ ½ (ids at exactly ½, e.g. a tie
or one voice right and one wrong, are left out of the test; they still count in the accuracy). sBLIMP pairs that
share a sentence (transcription), directly or through other pairs, form a cluster, and the clusters are the units
of the interval and the test instead (each drawn whole; the test counts clusters by their mean score): the
synthetic benchmark builds an agreement type from blocks of 4 pairs over 4 sentences, whose pairs are not
independent. Real sBLIMP shares no sentence, and its clusters are its pairs.

Units: the library functions return fractions in [0, 1]. :func:`evaluate_benchmark` returns (and writes to
``results.json``) **percentages** for every score, CI and std; the CSV tables it writes keep the toolkit's fractions.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from spidr.atomic_files import replaced_when_done, write_atomically
from spidr.lm.zerospeech import (
    FREQUENCY_BANDS,
    GoldItem,
    LexicalItem,
    StoryClozeItem,
    SyntacticItem,
    check_complete,
    frequency_band,
    read_lexical_gold,
    read_storycloze_gold,
    read_submission,
    read_syntactic_gold,
    score_number,
    storycloze_gold_from_filenames,
)

logger = logging.getLogger(__name__)

# lexical_seen: the synthetic benchmark's lexical pairs spoken by voices the LM was trained on (a diagnostic with no
# ZeroSpeech counterpart), scored as lexical with its headlines renamed swuggy_seen_*.
TASKS = ("lexical", "syntactic", "tsc", "ssc", "lexical_seen")
HEADLINES = ("swuggy_all", "swuggy_invocab", "sblimp", "tsc", "ssc", "swuggy_seen_all", "swuggy_seen_invocab")
NUM_RESAMPLES = 1000
# A breakdown row gets a CI and a p-value from this many values on: below it a percentile interval of a handful of
# 0 / ½ / 1 scores says little more than the values themselves (two values: [lowest, highest]).
MIN_GROUP_FOR_INTERVAL = 5
# The tables write_task_tables writes (score_<task>_<kind>_by_<breakdown>.csv): what --out replaces, nothing else
TABLE_NAME = re.compile(r"score_[a-z_]+_(dev|test)_by_[a-z_]+\.csv")
BEYOND_TOOLKIT_COLUMNS = ("ci_low", "ci_high", "p_value")  # after the toolkit's n, score, std in a breakdown CSV


# --------------------------------------------------------------------------------------------------------------------
# Result types


@dataclass(frozen=True)
class LexicalPair:
    """One sWUGGY pair id: its word, nonword(s), the word's frequency and length, and the score over voices."""

    id: str
    word: str
    nonwords: tuple[str, ...]
    frequency: int | None
    length: int
    score: float


@dataclass(frozen=True)
class SyntacticPair:
    """One sBLIMP pair id within its (type, subtype): its sentence and non-sentence (the first voice's
    transcriptions, as the toolkit's by-pair table gives them), and its score over voices."""

    type: str
    subtype: str
    id: str
    sentence: str
    non_sentence: str
    score: float


@dataclass(frozen=True)
class StoryClozePair:
    """One StoryCloze pair id, and its score over voices."""

    id: str
    type: str
    score: float


Pair = LexicalPair | SyntacticPair | StoryClozePair


@dataclass(frozen=True)
class GroupScore:
    """One line of a breakdown: the group's key (one value per column of its :class:`Breakdown`), the number of
    values, their mean and their standard deviation (ddof = 1; None under 2 values, as pandas' NaN); and, beyond the
    toolkit, the mean's 95 % bootstrap CI and binomial p-value against 50 % (as a headline number's), None under
    ``MIN_GROUP_FOR_INTERVAL`` values: is one syntactic type above chance, is one band better than another?"""

    group: tuple[str | int, ...]
    n: int
    score: float | None
    std: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None


@dataclass(frozen=True)
class Breakdown:
    """A table ``columns + (n, score, std)``: the toolkit's ``groupby(columns).agg(n='count', score='mean',
    std='std')``, each row with its interval (:class:`GroupScore`)."""

    columns: tuple[str, ...]
    rows: tuple[GroupScore, ...]


@dataclass(frozen=True)
class Accuracy:
    """A headline number (a fraction), the number of pair ids it averages, a 95 % bootstrap CI and the binomial
    p-value against 50 %."""

    score: float
    n: int
    ci_low: float
    ci_high: float
    p_value: float


@dataclass(frozen=True)
class TaskResult:
    """Everything one task yields: ``accuracies`` by headline name, the per-id table and the breakdowns by name
    (``by_frequency``, ``by_length``, ``by_type``, ``by_subtype``, ``by_voice``)."""

    task: str
    accuracies: dict[str, Accuracy]
    by_pair: tuple[Pair, ...]
    breakdowns: dict[str, Breakdown]


# --------------------------------------------------------------------------------------------------------------------
# Statistics


def pair_score(correct: float, incorrect: float) -> float:
    """1 if the correct item scores higher, ½ on a tie, else 0 (the toolkit's ``0.5*(w == nw) + (w > nw)``)."""
    return 0.5 * (correct == incorrect) + (correct > incorrect)


def _cluster_totals(array: np.ndarray, clusters: Sequence[object] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(sum, count) of ``array``'s values per cluster label, or None when every value is its own cluster."""
    if clusters is None:
        return None
    if len(clusters) != array.size:
        raise ValueError(f"{len(clusters)} cluster labels for {array.size} values")
    _, inverse = np.unique(np.asarray([str(label) for label in clusters]), return_inverse=True)
    sizes = np.bincount(inverse)
    if sizes.size == array.size:
        return None
    return np.bincount(inverse, weights=array), sizes


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, num_resamples: int = NUM_RESAMPLES, seed: int = 0,
                 level: float = 0.95, clusters: Sequence[object] | None = None) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampled with replacement, seeded).

    ``clusters`` (a label per value): values of one label are drawn together, a resample's mean being the mean of
    the values it holds. Pairs built from shared sentences are not independent, and drawn one by one they give an
    interval too narrow for its level."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("cannot bootstrap an empty set of values")
    totals = _cluster_totals(array, clusters)
    sums, sizes = totals if totals is not None else (array, np.ones(array.size))
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples)
    # Resample in chunks so that 40,000 pair ids × 1,000 resamples never sit in memory at once.
    chunk = max(1, 4_000_000 // sums.size)
    for start in range(0, num_resamples, chunk):
        stop = min(start + chunk, num_resamples)
        drawn = rng.integers(0, sums.size, size=(stop - start, sums.size))
        means[start:stop] = sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def accuracy(per_id_scores: Sequence[float] | np.ndarray, *, seed: int = 0,
             clusters: Sequence[object] | None = None) -> Accuracy:
    """Mean, bootstrap CI and two-sided exact binomial p-value of per-pair-id scores in [0, 1]. With ``clusters``
    (a label per id: ids that share a sentence) the bootstrap draws whole clusters and the binomial test counts
    clusters by their mean score, the independent units."""
    from scipy.stats import binomtest

    array = np.asarray(per_id_scores, dtype=np.float64)
    low, high = bootstrap_ci(array, seed=seed, clusters=clusters)
    totals = _cluster_totals(array, clusters)
    units = array if totals is None else totals[0] / totals[1]
    decided = int(np.count_nonzero(units != 0.5))
    wins = int(np.count_nonzero(units > 0.5))
    p_value = float(binomtest(wins, decided, 0.5).pvalue) if decided else 1.0
    return Accuracy(score=float(array.mean()), n=int(array.size), ci_low=low, ci_high=high, p_value=p_value)


def pair_accuracy(scores: Mapping[str, Any], pairs: Iterable[Sequence[str]], *, norm: str = "mean", seed: int = 0,
                  clusters: Sequence[object] | None = None) -> Accuracy:
    """The accuracy of (correct, incorrect) item pairs from in-memory scores, without gold files: 1 for a pair whose
    correct item scores higher, ½ for a tie (``pair_score``), with ``accuracy``'s interval and p-value (``clusters``:
    a label per pair). ``scores``: item → float, or ``score_units``' ``ItemScore`` taken by ``norm`` ("mean", the
    log-probability per predicted token as lm-score's default; or "sum"). Each pair counts once: the tasks' mean over
    the voices of one pair id is the caller's to take (``evaluate_lexical`` and the others do it from gold files)."""
    if norm not in ("mean", "sum"):
        raise ValueError(f"norm {norm!r} is invalid: expected 'mean' or 'sum'")

    listed = [tuple(pair) for pair in pairs]  # (an (n, 2) array or a generator too)
    if not listed:
        raise ValueError("no pair to score")

    def value(name: str, index: int) -> float:
        if name not in scores:
            raise ValueError(f"pair {index} ({listed[index][0]!r}, {listed[index][1]!r}): no score for {name!r}")
        score = scores[name]
        if hasattr(score, "logprob"):  # an ItemScore
            score = score.mean if norm == "mean" else score.logprob
        number = score_number(score, name)
        if math.isnan(number):
            raise ValueError(f"the score of {name!r} is NaN: a pair of it can be neither won nor lost")
        return number

    for index, pair in enumerate(listed):
        if len(pair) != 2:
            raise ValueError(f"pair {index}: expected (correct, incorrect) item names, got {pair!r}")
    per_pair = [pair_score(value(correct, i), value(incorrect, i)) for i, (correct, incorrect) in enumerate(listed)]
    return accuracy(per_pair, seed=seed, clusters=clusters)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def breakdown(columns: Sequence[str], keyed_values: Iterable[tuple[tuple[str | int, ...], float]],
              *, groups: Sequence[tuple[str | int, ...]] | None = None, seed: int = 0,
              clusters: Sequence[object] | None = None) -> Breakdown:
    """Group ``(key, value)`` pairs by key; rows sorted by key, or in the order of ``groups`` (which may name groups
    without any value: they get ``n = 0``). A row of ``MIN_GROUP_FOR_INTERVAL`` values or more gets the CI and
    p-value of :func:`accuracy` (bootstrap seeded by ``seed``; ``clusters``: a label per value, in order)."""
    values: dict[tuple[str | int, ...], list[float]] = {}
    labels: dict[tuple[str | int, ...], list[object]] = {}
    keyed_values = list(keyed_values)
    for (key, value), label in zip(keyed_values, clusters if clusters is not None else [None] * len(keyed_values),
                                   strict=True):
        values.setdefault(key, []).append(value)
        labels.setdefault(key, []).append(label)
    order = list(groups) if groups is not None else sorted(values, key=lambda key: tuple(map(_sort_key, key)))
    rows = []
    for key in order:
        group_values = values.get(key, [])
        mean, std = _mean_std(group_values)
        row = GroupScore(group=key, n=len(group_values), score=mean, std=std)
        if len(group_values) >= MIN_GROUP_FOR_INTERVAL:
            interval = accuracy(group_values, seed=seed, clusters=labels[key] if clusters is not None else None)
            row = replace(row, ci_low=interval.ci_low, ci_high=interval.ci_high, p_value=interval.p_value)
        rows.append(row)
    return Breakdown(columns=tuple(columns), rows=tuple(rows))


def _sort_key(value: str | int) -> tuple[int, int, str]:
    # Numeric ids sort as numbers (2 before 10), the others as text after them.
    if isinstance(value, int):
        return 0, value, ""
    if value.isascii() and value.isdigit():  # not str.isdigit alone: int() refuses '²', which isdigit accepts
        return 0, int(value), value
    return 1, 0, value


# --------------------------------------------------------------------------------------------------------------------
# Pairing


def _score_voices(
    gold: Sequence[GoldItem],
    scores: Mapping[str, float],
    pair_key: Callable[[GoldItem], tuple[str, ...]],
    *,
    several_incorrect: bool,
) -> dict[tuple[str, ...], tuple[GoldItem, list[GoldItem], Fraction]]:
    """``{(*pair_key, voice): (correct row, incorrect rows, pair score)}``; the score is the mean over the incorrect
    rows. Each (key, voice) needs exactly one correct row and one incorrect row (or more with
    ``several_incorrect``)."""
    groups: dict[tuple[str, ...], tuple[list[GoldItem], list[GoldItem]]] = {}
    for row in gold:
        correct, incorrect = groups.setdefault((*pair_key(row), row.voice), ([], []))
        (correct if row.correct else incorrect).append(row)
    scored = {}
    for key, (correct, incorrect) in groups.items():
        if len(correct) != 1 or not incorrect or (len(incorrect) > 1 and not several_incorrect):
            expected = "one correct and " + ("at least one incorrect" if several_incorrect else "one incorrect")
            names = ", ".join(row.filename for row in correct + incorrect)
            raise ValueError(f"pair {_describe(key)} has {len(correct)} correct and {len(incorrect)} incorrect "
                             f"row(s) ({names}); expected {expected}")
        # (exact: a fraction of halves; its float, averaged over voices below, would round by the voices' order)
        word = scores[correct[0].filename]
        mean = Fraction(sum(int(2 * pair_score(word, scores[row.filename])) for row in incorrect), 2 * len(incorrect))
        scored[key] = (correct[0], incorrect, mean)
    return scored


def _voice_mean(voices: Sequence[tuple[GoldItem, list[GoldItem], Fraction]]) -> float:
    """The mean pair score over the voices of one pair id, exact, then rounded once: the same in any gold row order,
    and voices scoring 1/3, 2/3 and 1/2 tie (0.5, not 0.49999999999999994)."""
    return float(sum((value for _, _, value in voices), Fraction(0)) / len(voices))


def _describe(key: tuple[str, ...]) -> str:
    *pair, voice = key
    return f"{'/'.join(pair)!r} (voice {voice!r})"


def _group_over_voices(scored: Mapping[tuple[str, ...], tuple[GoldItem, list[GoldItem], Fraction]],
                       ) -> dict[tuple[str, ...], list[tuple[GoldItem, list[GoldItem], Fraction]]]:
    per_id: dict[tuple[str, ...], list[tuple[GoldItem, list[GoldItem], Fraction]]] = {}
    for (*pair, _voice), value in scored.items():
        per_id.setdefault(tuple(pair), []).append(value)
    return per_id


def _sorted_keys(keys: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return sorted(keys, key=lambda key: tuple(map(_sort_key, key)))


def _by_voice(scored: Mapping[tuple[str, ...], tuple[GoldItem, list[GoldItem], Fraction]], seed: int, *,
              cluster_of: Mapping[tuple[str, ...], object] | None = None) -> Breakdown:
    """``cluster_of``: pair key (without the voice) → cluster label, as ``accuracy`` takes them."""
    keys = _sorted_keys(scored)  # (the bootstrap draws values by position: not in gold row order)
    clusters = None if cluster_of is None else [cluster_of[tuple(key[:-1])] for key in keys]
    return breakdown(("voice",), (((key[-1],), float(scored[key][2])) for key in keys), seed=seed, clusters=clusters)


def sentence_clusters(pairs: Iterable[tuple[object, Iterable[str]]]) -> dict[object, int]:
    """Pair key → the number of its cluster: pairs that share a sentence, directly or through other pairs, are one
    cluster (connected components; empty transcriptions link nothing). The synthetic sBLIMP builds each agreement
    type from blocks of 4 pairs over 4 sentences, each sentence in 2 pairs."""
    parent: dict[object, object] = {}

    def root(node: object) -> object:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    keys = []
    for key, sentences in pairs:
        keys.append(key)
        for sentence in sentences:
            if sentence.strip():
                parent[root(("sentence", sentence))] = root(("pair", key))
    numbers: dict[object, int] = {}
    return {key: numbers.setdefault(root(("pair", key)), len(numbers)) for key in keys}


# --------------------------------------------------------------------------------------------------------------------
# Tasks


def evaluate_lexical(gold: Sequence[LexicalItem], scores: Mapping[str, float], *, where: str | Path = "submission",
                     seed: int = 0) -> TaskResult:
    """sWUGGY: ``swuggy_all`` and ``swuggy_invocab`` (absent when no id has a frequency ≥ 1), by frequency band,
    by length and by voice. ``scores`` must score every wav of ``gold`` and nothing else (``where`` names it in
    errors)."""
    check_complete(scores, gold, where)
    scored = _score_voices(gold, scores, lambda row: (row.id,), several_incorrect=True)
    pairs = []
    uneven = []  # ids whose voices have unequal numbers of nonwords: the toolkit's flat mean differs there
    for (pair_id,), voices in _group_over_voices(scored).items():
        if len({len(incorrect) for _, incorrect, _ in voices}) > 1:
            uneven.append(pair_id)
        words = {(word.word, word.frequency, word.length) for word, _, _ in voices}
        if len(words) != 1:
            raise ValueError(f"pair id {pair_id!r}: the word rows of its voices disagree on (word, frequency, "
                             f"length): {sorted(words, key=str)}")
        word, frequency, length = words.pop()
        # sLM21's nonword rows have an empty word: their phones name them
        nonwords = tuple(sorted({row.word or row.phones for _, incorrect, _ in voices for row in incorrect}))
        score = _voice_mean(voices)
        pairs.append(LexicalPair(pair_id, word, nonwords, frequency, length, score))
    pairs.sort(key=lambda pair: _sort_key(pair.id))
    if uneven:
        uneven.sort(key=_sort_key)
        logger.warning("%s: the voices of %d pair id(s) (%s) have unequal numbers of nonwords: each voice scores the "
                       "mean over its nonwords, then each id the mean over its voices (BabySLM), where the ZeroSpeech "
                       "2021 toolkit takes the flat mean over all (voice, nonword) comparisons", where, len(uneven),
                       ", ".join(map(repr, uneven[:5])) + (" ..." if len(uneven) > 5 else ""))

    by_frequency = breakdown(("frequency",), (((band,), pair.score) for pair in pairs
                                              if (band := frequency_band(pair.frequency)) is not None),
                             groups=[(label,) for label, _, _ in FREQUENCY_BANDS], seed=seed)
    accuracies = {"swuggy_all": accuracy([pair.score for pair in pairs], seed=seed)}
    in_vocab = [pair.score for pair in pairs if frequency_band(pair.frequency) not in {None, "oov"}]
    if in_vocab:
        # The toolkit's count-weighted mean of the non-oov band means is the mean over these ids (tested); the ids
        # themselves are needed for the CI and the test.
        accuracies["swuggy_invocab"] = accuracy(in_vocab, seed=seed)
        empty = [row.group[0] for row in by_frequency.rows if row.n == 0 and row.group[0] != "oov"]
        if empty:
            logger.info("%s: no word in the frequency band(s) %s: swuggy_invocab is the mean over the words of the "
                        "other bands, where the ZeroSpeech leaderboard's formula (band means weighted by their "
                        "counts) gives NaN", where, ", ".join(empty))
    else:
        logger.warning("%s: no word has a known frequency ≥ 1: swuggy_invocab is undefined", where)
    return TaskResult(
        task="lexical",
        accuracies=accuracies,
        by_pair=tuple(pairs),
        breakdowns={
            "by_frequency": by_frequency,
            "by_length": breakdown(("length",), (((pair.length,), pair.score) for pair in pairs), seed=seed),
            "by_voice": _by_voice(scored, seed),
        },
    )


def evaluate_syntactic(gold: Sequence[SyntacticItem], scores: Mapping[str, float], *,
                       where: str | Path = "submission", seed: int = 0) -> TaskResult:
    """sBLIMP: ``sblimp`` (the mean over (type, subtype, id)), by type, by (type, subtype) and by voice."""
    check_complete(scores, gold, where)
    scored = _score_voices(gold, scores, lambda row: (row.type, row.subtype, row.id), several_incorrect=False)
    per_id = _group_over_voices(scored)
    pairs = []
    for key in _sorted_keys(per_id):
        syntactic_type, subtype, pair_id = key
        voices = per_id[key]
        correct, incorrect, _ = voices[0]
        pairs.append(SyntacticPair(syntactic_type, subtype, pair_id, correct.transcription, incorrect[0].transcription,
                                   _voice_mean(voices)))
    # Intervals and tests resample clusters of pairs that share sentences: the pairs of one are not independent.
    cluster_of = sentence_clusters(((pair.type, pair.subtype, pair.id), (pair.sentence, pair.non_sentence))
                                   for pair in pairs)
    clusters = [cluster_of[pair.type, pair.subtype, pair.id] for pair in pairs]
    return TaskResult(
        task="syntactic",
        accuracies={"sblimp": accuracy([pair.score for pair in pairs], seed=seed, clusters=clusters)},
        by_pair=tuple(pairs),
        breakdowns={
            "by_type": breakdown(("type",), (((pair.type,), pair.score) for pair in pairs), seed=seed,
                                 clusters=clusters),
            "by_subtype": breakdown(("type", "subtype"), (((pair.type, pair.subtype), pair.score) for pair in pairs),
                                    seed=seed, clusters=clusters),
            "by_voice": _by_voice(scored, seed, cluster_of=cluster_of),
        },
    )


def evaluate_storycloze(gold: Sequence[StoryClozeItem], scores: Mapping[str, float], *, task: str = "tsc",
                        where: str | Path = "submission", seed: int = 0) -> TaskResult:
    """tSC or sSC (``task``): the mean over story ids, by type and by voice."""
    if task not in {"tsc", "ssc"}:
        raise ValueError(f"StoryCloze task must be 'tsc' or 'ssc', not {task!r}")
    check_complete(scores, gold, where)
    scored = _score_voices(gold, scores, lambda row: (row.id,), several_incorrect=False)
    pairs = []
    for (pair_id,), voices in _group_over_voices(scored).items():
        types = {correct.type for correct, _, _ in voices}
        if len(types) != 1:
            raise ValueError(f"story id {pair_id!r}: its voices disagree on the type: {sorted(types)}")
        pairs.append(StoryClozePair(pair_id, types.pop(), _voice_mean(voices)))
    pairs.sort(key=lambda pair: _sort_key(pair.id))
    return TaskResult(
        task=task,
        accuracies={task: accuracy([pair.score for pair in pairs], seed=seed)},
        by_pair=tuple(pairs),
        breakdowns={
            "by_type": breakdown(("type",), (((pair.type,), pair.score) for pair in pairs), seed=seed),
            "by_voice": _by_voice(scored, seed),
        },
    )


# --------------------------------------------------------------------------------------------------------------------
# Benchmark folders


def _find_gold(task: str, gold_dir: Path) -> tuple[list[GoldItem], Path] | None:
    """The task's gold rows and the file (or folder) they come from; None when the benchmark lacks the task."""
    gold_file = gold_dir / "gold.csv"
    if task in ("lexical", "lexical_seen"):
        return (read_lexical_gold(gold_file), gold_file) if gold_file.is_file() else None
    if task == "syntactic":
        return (read_syntactic_gold(gold_file), gold_file) if gold_file.is_file() else None
    if gold_file.is_file():
        return read_storycloze_gold(gold_file), gold_file
    if gold_dir.is_dir() and (any(gold_dir.glob("*_correct.wav")) or any(gold_dir.glob("*_incorrect.wav"))):
        return storycloze_gold_from_filenames(gold_dir), gold_dir
    return None


def warn_about_other_folders(root: Path, what: str, *, only_cloze: bool = False) -> None:
    """A warning for each folder of ``root`` that is not one of ``TASKS``, which nothing reads: e.g. the spoken
    StoryCloze release's ``storycloze/`` (tSC is ``tsc/`` here, sSC ``ssc/``). ``only_cloze``: only such folders
    (a benchmark root may hold others, such as the synthetic benchmark's training audio)."""
    if not root.is_dir():
        return
    for folder in sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")):
        cloze = "cloze" in folder.name.lower()
        if folder.name not in TASKS and (cloze or not only_cloze):
            logger.warning("%s %s is not read: the task folders are %s%s", what, folder, ", ".join(TASKS),
                           " (topic StoryCloze goes in tsc/, spoken StoryCloze in ssc/)" if cloze else "")


def _gold_to_score(task: str, gold_dir: Path, submission: Path) -> tuple[list[GoldItem], Path] | None:
    """``_find_gold`` when there is a submission to score against it; None, with a warning where only one of the
    two is there."""
    if submission.exists() and not submission.is_file():
        raise ValueError(f"{task}: the submission {submission} is not a file: expected '<stem> <score>' lines")
    found = _find_gold(task, gold_dir)
    if found is None:
        if submission.is_file():
            logger.warning("%s: there is a submission %s but no gold for it in the benchmark (%s: no gold.csv%s); "
                           "not scored", task, submission, gold_dir,
                           " and no *_correct.wav / *_incorrect.wav" if task in ("tsc", "ssc") else "")
        return None
    if not submission.is_file():
        logger.warning("%s: the benchmark has %s but there is no submission %s; skipping the task",
                       task, found[1], submission)
        return None
    return found


def evaluate_task(task: str, gold: Sequence[GoldItem], scores: Mapping[str, float], *,
                  where: str | Path = "submission", seed: int = 0) -> TaskResult:
    """Dispatch to :func:`evaluate_lexical`, :func:`evaluate_syntactic` or :func:`evaluate_storycloze`."""
    match task:
        case "lexical":
            return evaluate_lexical(gold, scores, where=where, seed=seed)
        case "lexical_seen":
            result = evaluate_lexical(gold, scores, where=where, seed=seed)
            accuracies = {name.replace("swuggy_", "swuggy_seen_"): value for name, value in result.accuracies.items()}
            return replace(result, task=task, accuracies=accuracies)
        case "syntactic":
            return evaluate_syntactic(gold, scores, where=where, seed=seed)
        case "tsc" | "ssc":
            return evaluate_storycloze(gold, scores, task=task, where=where, seed=seed)
        case _:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def _refuse_unfinished(bench_dir: Path, submission_dir: Path) -> None:
    """Raise if the benchmark or the submission is one that spidr left unfinished (killed, failed or running)."""
    from spidr.corpus import lm_bench
    from spidr.in_progress import refuse_unfinished
    from spidr.lm import score  # (which imports this module)

    refuse_unfinished(bench_dir, lm_bench.IN_PROGRESS, "synth-lm-bench")
    refuse_unfinished(submission_dir, score.IN_PROGRESS, "lm-score")


def evaluate_benchmark(bench_dir: str | Path, submission_dir: str | Path, *, kind: str = "dev",
                       out_dir: str | Path | None = None, seed: int = 0) -> dict:
    """Score every task of a ZeroSpeech-2021-style benchmark that has both a gold and a submission file.

    Looks for ``bench_dir/{lexical,syntactic,lexical_seen}/{kind}/gold.csv`` and ``bench_dir/{tsc,ssc}/{kind}/``
    (a ``gold.csv`` or ``*_correct.wav`` / ``*_incorrect.wav`` files), scored by ``submission_dir/{task}/{kind}.txt``.
    A task whose submission is absent, or whose submission has no gold, is skipped with a warning; an incomplete
    submission is an error.

    Returns a JSON-serialisable dict: the headline numbers in percent at the top level (``swuggy_all``,
    ``swuggy_invocab``, ``sblimp``, ``tsc``, ``ssc``, each only when computed) and ``details``, one entry per scored
    task (see :func:`task_details`). With ``out_dir``, also writes the toolkit's ``score_{task}_{kind}_by_*.csv``
    tables and ``results.json`` there.
    """
    if kind not in {"dev", "test"}:
        raise ValueError(f"kind must be 'dev' or 'test', not {kind!r}")
    bench_dir, submission_dir = Path(bench_dir), Path(submission_dir)
    for folder, what in ((bench_dir, "benchmark folder"), (submission_dir, "submission folder")):
        if not folder.is_dir():
            raise ValueError(f"{what} {folder} does not exist" if not folder.exists() else
                             f"{what} {folder} is not a folder")
    _refuse_unfinished(bench_dir, submission_dir)
    warn_about_other_folders(bench_dir, "benchmark folder", only_cloze=True)
    warn_about_other_folders(submission_dir, "submission folder")
    results: list[TaskResult] = []
    details: dict[str, dict] = {}
    looked_for = []
    for task in TASKS:
        gold_dir = bench_dir / task / kind
        submission = submission_dir / task / f"{kind}.txt"
        looked_for.append(f"{gold_dir / 'gold.csv'} + {submission}")
        found = _gold_to_score(task, gold_dir, submission)
        if found is None:
            continue
        gold, gold_source = found
        scores = read_submission(submission)
        check_complete(scores, gold, submission)
        try:
            result = evaluate_task(task, gold, scores, where=submission, seed=seed)
        except ValueError as error:
            raise ValueError(f"{gold_source}: {error}") from None
        for name, value in result.accuracies.items():
            logger.info("%s %s: %.2f%% over %d pairs (95%% CI %.2f–%.2f)", kind, name, 100 * value.score, value.n,
                        100 * value.ci_low, 100 * value.ci_high)
        results.append(result)
        details[task] = task_details(result, gold=gold_source, submission=submission, kind=kind)
    if not results:
        raise ValueError(f"no task to score: looked for {'; '.join(looked_for)}")

    summary: dict[str, object] = {}
    for name in HEADLINES:
        for result in results:
            if name in result.accuracies:
                summary[name] = 100.0 * result.accuracies[name].score
    summary["details"] = details
    if out_dir is not None:
        _write_outputs(Path(out_dir), results, summary, kind=kind)
    return summary


def _write_outputs(out_dir: Path, results: Sequence[TaskResult], summary: Mapping[str, object], *, kind: str) -> None:
    """``results.json`` and every task's tables in ``out_dir``, in place of an earlier run's: its tables of a task
    that this run lacks would pass for this run's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # results.json first: a kill among the tables must not leave an earlier run's results beside this run's tables
    (out_dir / "results.json").unlink(missing_ok=True)
    for stale in out_dir.iterdir():
        if TABLE_NAME.fullmatch(stale.name):
            stale.unlink()
    for result in results:
        write_task_tables(result, out_dir, kind=kind)
    write_atomically(out_dir / "results.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")


def breakdown_records(table: Breakdown, *, scale: float = 100.0) -> list[dict[str, object]]:
    """``[{column: value, ..., "n": n, "score": score × scale, "std": std × scale, "ci95": [low × scale, high ×
    scale], "p_value": p}]`` (None where undefined)."""
    def scaled(value: float | None) -> float | None:
        return None if value is None else scale * value

    records = []
    for row in table.rows:
        record: dict[str, object] = dict(zip(table.columns, row.group, strict=True))
        record |= {"n": row.n, "score": scaled(row.score), "std": scaled(row.std),
                   "ci95": None if row.ci_low is None else [scaled(row.ci_low), scaled(row.ci_high)],
                   "p_value": row.p_value}
        records.append(record)
    return records


def task_details(result: TaskResult, *, gold: str | Path, submission: str | Path, kind: str) -> dict[str, object]:
    """The JSON ``details`` entry of a task, in percent: files, number of pair ids, one ``{score, n, ci95,
    p_value}`` per headline number, and every breakdown as a list of records."""
    details: dict[str, object] = {
        "kind": kind,
        "gold": str(gold),
        "submission": str(submission),
        "n_pairs": len(result.by_pair),
        "accuracy": {
            name: {"score": 100.0 * value.score, "n": value.n, "ci95": [100.0 * value.ci_low, 100.0 * value.ci_high],
                   "p_value": value.p_value}
            for name, value in result.accuracies.items()
        },
    }
    for name, table in result.breakdowns.items():
        details[name] = breakdown_records(table)
    return details


def write_task_tables(result: TaskResult, out_dir: str | Path, *, kind: str) -> list[Path]:
    """Write ``score_{task}_{kind}_by_pair.csv`` and one ``score_{task}_{kind}_{breakdown}.csv`` per breakdown, in
    the toolkit's fractions (empty cells where pandas would write NaN); a breakdown's columns are the toolkit's, then
    ``ci_low``, ``ci_high`` and ``p_value`` (empty under 5 values); returns the paths.

    The by-pair table holds more than the toolkit's (``word,non word,score`` / ``sentence,non sentence,score``): the
    pair's id, frequency and length (lexical) or type, subtype and id (sBLIMP), every nonword of a word (joined by
    ``;``; the toolkit keeps the first), the word's text where the toolkit writes its phones, and scores at full
    precision where the toolkit rounds every table to 4 decimals."""
    out_dir = Path(out_dir)
    paths = []
    path = out_dir / f"score_{result.task}_{kind}_by_pair.csv"
    # each table under a temporary name, renamed when whole: a kill cut it short under the toolkit's name
    with replaced_when_done(path) as partial, partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        columns = [field.name for field in fields(type(result.by_pair[0]))]
        headers = {"nonwords": "non word", "non_sentence": "non sentence"}  # the toolkit's names
        writer.writerow([headers.get(column, column) for column in columns])
        for pair in result.by_pair:
            writer.writerow([_cell(getattr(pair, column)) for column in columns])
    paths.append(path)
    for name, table in result.breakdowns.items():
        path = out_dir / f"score_{result.task}_{kind}_{name}.csv"
        with replaced_when_done(path) as partial, partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow([*table.columns, "n", "score", "std", *BEYOND_TOOLKIT_COLUMNS])
            for row in table.rows:
                writer.writerow([*row.group, row.n, _cell(row.score), _cell(row.std), _cell(row.ci_low),
                                 _cell(row.ci_high), _cell(row.p_value)])
        paths.append(path)
    return paths


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, tuple):  # several nonwords of one word (BabySLM)
        return ";".join(value)
    return value
