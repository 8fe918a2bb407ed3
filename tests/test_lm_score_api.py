"""Scoring in memory: ``score_units`` scores items as ``spidr lm-score`` scores a units file (dedup, frame labels,
a GPT's strided windows), ``score_sequences`` refuses what it would misread, and ``pair_accuracy`` counts pairs."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from spidr.cli import main
from spidr.lm.evaluate import accuracy, pair_accuracy
from spidr.lm.models import build_lm
from spidr.lm.score import (
    ItemScore,
    UnitLM,
    load_unit_lm,
    score_benchmark,
    score_sequences,
    score_units,
)
from spidr.lm.tokens import LabelVocabulary, Vocabulary


def _lm(arch: str, num_units: int, context: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_lm(arch, Vocabulary(num_units).size, dim=16, num_layers=1, num_heads=2, ffn_dim=32, context=context,
                    dropout=0.0, activation="gelu", tie_embeddings=True, ngram_order=2, ngram_add_k=0.1).eval()


def _by_hand(model: torch.nn.Module, vocab: Vocabulary, units: list[int]) -> float:
    """log p(units, EOS | BOS) from one forward pass over the whole sequence (an LSTM has no context bound)."""
    tokens = torch.tensor([[vocab.bos, *units, vocab.eos]])
    with torch.no_grad():
        log_probs = model(tokens[:, :-1]).double().log_softmax(-1)[0]
    return float(log_probs[torch.arange(tokens.shape[1] - 1), tokens[0, 1:]].sum())


def _trained(tmp_path: Path, arch: str, *, dedup: bool, context: int = 16) -> Path:
    rng = np.random.default_rng(0)
    rows = [{"name": f"u{i}", "units": [int((s + k) % 10) for k in range(int(rng.integers(8, 30)))]}
            for i, s in enumerate(rng.integers(0, 10, 40))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = {"arch": arch, "dim": 16, "num_layers": 1, "context": context, "dropout": 0.0}
    if arch == "gpt":
        model |= {"num_heads": 2, "ffn_dim": 32}
    config = {"run": {"workdir": str(tmp_path / "runs"), "name": arch, "device": "cpu"},
              "data": {"train": str(tmp_path / "train.jsonl"), "dedup": dedup, "val_fraction": 0.1},
              "model": model, "optimizer": {"max_steps": 5, "batch_size": 4, "warmup_steps": 1, "dtype": "float32"}}
    (tmp_path / "lm.json").write_text(json.dumps(config))
    assert main(["lm-train", str(tmp_path / "lm.json")]) == 0
    return tmp_path / "runs" / arch / "final.pt"


@pytest.mark.parametrize(("arch", "dedup"), [("lstm", True), ("gpt", False)])
def test_score_units_scores_in_memory_items_as_lm_score_scores_their_file(tmp_path, arch, dedup):
    """Truth: ``spidr lm-score`` on a units file of the same items. Frame-rate units with repeats (deduplicated by
    the LSTM trained so, kept by the GPT), and an item of 45 units for a GPT of context 16 (strided windows)."""
    final = _trained(tmp_path, arch, dedup=dedup)
    items = {"a": [3, 3, 3, 1, 4, 4], "b": [2, 7, 7, 1, 8, 2, 8, 8, 5], "long": [k % 10 for k in range(45)]}
    (tmp_path / "items" / "lexical").mkdir(parents=True)
    (tmp_path / "items" / "lexical" / "dev.jsonl").write_text(
        "".join(json.dumps({"name": name, "units": units}) + "\n" for name, units in items.items()))
    assert main(["lm-score", str(final), str(tmp_path / "items"), str(tmp_path / "sub"), "--norm", "sum"]) == 0
    written = {row["name"]: row for row in map(json.loads, (tmp_path / "sub" / "scores.jsonl").open())}

    in_memory = score_units(final, {name: np.asarray(units) for name, units in items.items()})
    listed = score_units(load_unit_lm(final), list(items.values()))
    for index, name in enumerate(items):
        assert in_memory[name].logprob == pytest.approx(written[name]["sum"], abs=1e-9)
        assert in_memory[name].num_tokens == written[name]["num_tokens"]
        assert listed[index] == in_memory[name]
    assert written["a"]["num_tokens"] == (4 if dedup else 7)  # 3 1 4 + EOS, or the 6 units + EOS


def test_score_units_of_a_frame_label_lm_numbers_and_deduplicates_the_labels() -> None:
    """Truth: the ids of the LM's sorted labels, runs collapsed, scored by one forward pass here. Integers given to
    a label LM and labels given to a unit LM are refused by name."""
    labels = LabelVocabulary(("AE", "K", "SIL", "T"))
    model = _lm("lstm", 4)
    lm = UnitLM(model, {"num_units": 4, "dedup": True, "arch": "lstm", "context": 8, "kind": "labels"}, labels)
    scores = score_units(lm, {"cat": ["SIL", "K", "K", "AE", "AE", "AE", "T", "SIL"]})
    assert scores["cat"] == ItemScore(pytest.approx(_by_hand(model, lm.vocab, [2, 1, 0, 3, 2])), 6)
    with pytest.raises(ValueError, match=r"item 'x': label '3' is not in the LM's label set"):
        score_units(lm, {"x": [3, 1]})
    with pytest.raises(ValueError, match="item 'x': expected a sequence of frame labels"):
        score_units(lm, {"x": "K AE T"})
    units_lm = UnitLM(model, {"num_units": 4, "dedup": False, "arch": "lstm", "context": 8}, None)
    with pytest.raises(ValueError, match="item 0: expected unit ids"):
        score_units(units_lm, [["K", "AE"]])
    with pytest.raises(ValueError, match=r"item 'x': expected a 1-D sequence of units, got shape \(2, 2\)"):
        score_units(units_lm, {"x": [[1, 2], [3, 0]]})
    with pytest.raises(TypeError, match="expected a mapping of item names to units, or a list"):
        score_units(units_lm, "1 2 3")


def test_score_sequences_reads_a_gpt_s_context_from_the_model():
    """lmapi31 D1: called as its signature invites (context left out), a GPT LM scores an item longer than its
    context in strided windows, as lm-score does; it failed with "21 tokens exceed the model's context of 8"."""
    vocab, model = Vocabulary(5), _lm("gpt", 5, context=8)
    units = np.arange(20) % 5
    assert score_sequences(model, vocab, {"a": units})["a"] == score_sequences(model, vocab, {"a": units},
                                                                               context=8)["a"]


def test_score_sequences_refuses_a_vocabulary_that_is_not_the_model_s():
    """lmapi31 D2: Vocabulary(16) for an LM of 20 units puts BOS at unit 16: every score was silently wrong."""
    vocab, model = Vocabulary(20), _lm("lstm", 20)
    units = [3, 1, 4, 1, 5]
    assert score_sequences(model, vocab, {"a": np.asarray(units)})["a"].logprob == pytest.approx(
        _by_hand(model, vocab, units))
    with pytest.raises(ValueError, match=r"vocabulary has 19 tokens \(16 units, BOS, EOS\), but the LM predicts 23"):
        score_sequences(model, Vocabulary(16), {"a": np.asarray(units)})


@pytest.mark.parametrize("dtype", ["bf16", "float16", "fp32"])
def test_score_sequences_and_score_benchmark_refuse_an_unknown_dtype(tmp_path, dtype):
    """lmapi31 D3: only float32 and bfloat16 are scored; any other string was taken silently for float32."""
    vocab, model = Vocabulary(5), _lm("lstm", 5)
    with pytest.raises(ValueError, match=f"dtype '{dtype}' is invalid: expected one of float32, bfloat16"):
        score_sequences(model, vocab, {"a": np.array([1, 2])}, dtype=dtype)
    with pytest.raises(ValueError, match=f"--dtype '{dtype}' is invalid"):
        score_benchmark(tmp_path / "absent.pt", {("lexical", "dev"): tmp_path / "x.jsonl"}, tmp_path / "o",
                        dtype=dtype)
    assert not (tmp_path / "o").exists()


def test_score_sequences_names_the_mapping_it_expects_for_a_list():
    """lmapi31 D4: a list failed with AttributeError: 'list' object has no attribute 'items'."""
    with pytest.raises(TypeError, match=r"expected a mapping of item names to unit arrays, got list.*score_units"):
        score_sequences(_lm("lstm", 5), Vocabulary(5), [np.array([1, 2])])


def test_pair_accuracy_counts_each_pair_from_floats_or_item_scores():
    """Truth by hand: 1 when the correct item scores higher, ½ on a tie, 0 otherwise; ItemScores by their mean per
    token or their sum (here the two orders differ: 'w' has the higher sum, the lower mean)."""
    floats = {"w1": -1.0, "n1": -2.0, "w2": -3.0, "n2": -3.0, "w3": -5.0, "n3": -4.0}
    assert pair_accuracy(floats, [("w1", "n1"), ("w2", "n2"), ("w3", "n3")]).score == pytest.approx(0.5)
    items = {"w": ItemScore(-6.0, 2), "n": ItemScore(-8.0, 4)}  # mean -3 vs -2, sum -6 vs -8
    assert pair_accuracy(items, [("w", "n")]).score == 0.0
    assert pair_accuracy(items, [("w", "n")], norm="sum").score == 1.0
    with pytest.raises(ValueError, match=r"pair 0 \('w', 'x'\): no score for 'x'"):
        pair_accuracy(items, [("w", "x")])
    with pytest.raises(ValueError, match="norm 'max' is invalid"):
        pair_accuracy(items, [("w", "n")], norm="max")


def test_the_tasks_refuse_item_scores_instead_of_numbers():
    """lmapi31 D5: score_units' ItemScores given to evaluate_lexical failed with "'>' not supported between
    instances of 'ItemScore'"; the message now says which number to give."""
    from spidr.lm.zerospeech import check_complete

    with pytest.raises(TypeError, match=r"sub: the score of 'a' is ItemScore, not a number: give each item one float"):
        check_complete({"a": ItemScore(-1.0, 2)}, [], "sub")


def _gold():
    from spidr.lm.zerospeech import LexicalItem

    return [LexicalItem("1", "w1", "v", 5, "cat", "K AE T", 3, True),
            LexicalItem("1", "n1", "v", 5, "", "K IH T", 3, False)]


@pytest.mark.parametrize("make", [torch.tensor, np.array], ids=["torch-0d", "numpy-0d"])
def test_the_tasks_still_take_scalar_tensors_and_0d_arrays(make) -> None:
    """Defect 1: check_complete's new numbers.Real test refuses a 0-d torch tensor or numpy array ("the score of
    'w1' is Tensor, not a number"), which evaluate_lexical scored before 2cd685e (e.g. {name: log_probs.sum()})."""
    from spidr.lm.evaluate import evaluate_lexical

    result = evaluate_lexical(_gold(), {"w1": make(-1.0), "n1": make(-2.0)})
    assert result.accuracies["swuggy_all"].score == 1.0
    with pytest.raises(TypeError, match="the score of 'w1' is str, not a number"):  # ("-1.0" > "-2.0" as text)
        evaluate_lexical(_gold(), {"w1": "-1.0", "n1": "-2.0"})
    with pytest.raises(ValueError, match="the score of 'w1' is NaN"):
        evaluate_lexical(_gold(), {"w1": make(float("nan")), "n1": make(-2.0)})


def test_pair_accuracy_refuses_a_nan_score_naming_the_item() -> None:
    """Defect 2: a NaN score counted as a lost pair (accuracy 0.0, no word); lm-score and read_submission refuse NaN
    scores by name."""
    from spidr.lm.evaluate import pair_accuracy
    from spidr.lm.score import ItemScore

    with pytest.raises(ValueError, match=r"the score of 'w' is NaN"):
        pair_accuracy({"w": float("nan"), "n": -2.0}, [("w", "n")])
    with pytest.raises(ValueError, match=r"the score of 'w' is NaN"):
        pair_accuracy({"w": ItemScore(float("nan"), 3), "n": ItemScore(-2.0, 3)}, [("w", "n")])


def test_pair_accuracy_takes_pairs_as_a_numpy_array_or_an_iterator() -> None:
    """Defect 5: pairs given as an (n, 2) array failed with numpy's "truth value of an array ... is ambiguous", and
    a generator of pairs with "cannot bootstrap an empty set of values" (consumed by the shape check)."""
    from spidr.lm.evaluate import pair_accuracy

    scores = {"w": -1.0, "n": -2.0}
    assert pair_accuracy(scores, np.array([["w", "n"]])).score == 1.0
    assert pair_accuracy(scores, (pair for pair in [("w", "n")])).score == 1.0


def test_score_sequences_does_not_score_with_dropout() -> None:
    """Defect 3: a model left in train mode was scored with dropout on (random scores, and the new vocabulary probe
    draws from torch's RNG first, so the numbers also moved): score as eval mode does, or refuse naming .eval()."""
    from spidr.lm.models import build_lm
    from spidr.lm.score import score_sequences
    from spidr.lm.tokens import Vocabulary

    torch.manual_seed(0)
    model = build_lm("lstm", Vocabulary(5).size, dim=16, num_layers=2, num_heads=2, ffn_dim=32, context=8,
                     dropout=0.3, activation="gelu", tie_embeddings=True, ngram_order=2, ngram_add_k=0.1)
    items = {"a": np.array([1, 2, 3, 4])}
    in_train_mode = score_sequences(model, Vocabulary(5), items)["a"]
    assert model.training  # the caller's mode is left as it was
    assert in_train_mode == score_sequences(model.eval(), Vocabulary(5), items)["a"]


def test_pair_accuracy_refuses_no_pairs_and_pairs_not_of_two() -> None:
    scores = {"w": -1.0, "n": -2.0, "x": -3.0}
    with pytest.raises(ValueError, match="no pair to score"):
        pair_accuracy(scores, [])
    with pytest.raises(ValueError, match=r"pair 1: expected \(correct, incorrect\) item names, got \('w', 'n', 'x'\)"):
        pair_accuracy(scores, [("w", "n"), ("w", "n", "x")])
    with pytest.raises(ValueError, match=r"pair 0: expected \(correct, incorrect\) item names, got \('w',\)"):
        pair_accuracy(scores, [("w",)])


def test_pair_accuracy_bootstraps_whole_clusters() -> None:
    """Invariance: each pair repeated 4 times within its own cluster gives the interval and p-value of the pairs
    counted once (the clusters are the independent units), where 4 unclustered copies narrow the interval."""
    scores = {"w1": -1.0, "n1": -2.0, "w2": -3.0, "n2": -2.5, "w3": -1.0, "n3": -1.0, "w4": -0.5, "n4": -4.0,
              "w5": -2.0, "n5": -1.5, "w6": -1.0, "n6": -3.0}
    pairs = [(f"w{i}", f"n{i}") for i in range(1, 7)]
    once = pair_accuracy(scores, pairs, seed=3)
    repeated = pairs * 4
    clustered = pair_accuracy(scores, repeated, seed=3, clusters=[i % 6 for i in range(len(repeated))])
    assert (clustered.score, clustered.n) == (once.score, 24)
    assert (clustered.ci_low, clustered.ci_high, clustered.p_value) == pytest.approx(
        (once.ci_low, once.ci_high, once.p_value))
    unclustered = pair_accuracy(scores, repeated, seed=3)
    assert unclustered.ci_high - unclustered.ci_low < once.ci_high - once.ci_low


@pytest.mark.parametrize("seed", [3, 11])
def test_pair_accuracy_is_accuracy_of_the_hand_counted_pair_scores(seed: int) -> None:
    """Truth by hand: per pair 1 (correct higher), 0, ½ (tie); the interval drawn with the seed given."""
    scores = {"w1": -1.0, "n1": -2.0, "w2": -3.0, "n2": -2.5, "w3": -1.0, "n3": -1.0, "w4": -0.5, "n4": -4.0,
              "w5": -2.0, "n5": -1.5}
    result = pair_accuracy(scores, [(f"w{i}", f"n{i}") for i in range(1, 6)], seed=seed)
    assert result == accuracy([1.0, 0.0, 0.5, 1.0, 0.0], seed=seed)


def test_a_score_of_several_numbers_is_refused_naming_the_item() -> None:
    """A tensor of per-token log-probabilities not summed (float() raises ValueError for a torch tensor of two
    elements, TypeError for a numpy array) is refused as no number, naming the item, by the tasks and pair_accuracy."""
    import numpy as np
    import torch

    from spidr.lm.zerospeech import check_complete

    for value in (torch.tensor([-1.0, -2.0]), np.array([-1.0, -2.0])):
        name = type(value).__name__
        with pytest.raises(TypeError, match=rf"sub: the score of 'a' is {name}, not a number"):
            check_complete({"a": value}, [], "sub")
        with pytest.raises(TypeError, match=rf"the score of 'w' is {name}, not a number"):
            pair_accuracy({"w": value, "n": -1.0}, [("w", "n")])


def test_a_refused_score_leaves_a_training_model_in_training_mode() -> None:
    """score_sequences scores in eval mode and gives the caller's mode back, also when it refuses the input."""
    import numpy as np

    from spidr.lm.models import build_lm
    from spidr.lm.score import score_sequences
    from spidr.lm.tokens import Vocabulary

    model = build_lm("lstm", Vocabulary(5).size, dim=16, num_layers=2, num_heads=2, ffn_dim=32, context=8,
                     dropout=0.3, activation="gelu", tie_embeddings=True, ngram_order=2, ngram_add_k=0.1)
    assert model.training
    with pytest.raises(ValueError, match="vocabulary has"):
        score_sequences(model, Vocabulary(4), {"a": np.array([1, 2])})
    assert model.training
    with pytest.raises(ValueError, match="holds unit 7"):
        score_sequences(model, Vocabulary(5), {"a": np.array([1, 7])})  # (unit 7 out of range)
    assert all(module.training for module in model.modules())


def test_score_units_gives_the_scores_back_under_the_caller_s_keys() -> None:
    """A dict by name comes back by the same names, whatever their type (int keys stay ints), in the same order."""
    import numpy as np

    from spidr.lm.models import build_lm
    from spidr.lm.score import UnitLM, score_sequences, score_units
    from spidr.lm.tokens import Vocabulary

    torch.manual_seed(0)
    model = build_lm("lstm", Vocabulary(5).size, dim=16, num_layers=1, num_heads=2, ffn_dim=32, context=8,
                     dropout=0.0, activation="gelu", tie_embeddings=True, ngram_order=2, ngram_add_k=0.1).eval()
    lm = UnitLM(model, {"num_units": 5, "dedup": False, "arch": "lstm", "context": 8}, None)
    scores = score_units(lm, {7: [1, 2, 3], 3: [4, 0]})
    assert list(scores) == [7, 3]
    alone = score_sequences(model, Vocabulary(5), {"x": np.array([1, 2, 3])})["x"]
    assert scores[7].num_tokens == alone.num_tokens == 4
    assert scores[7].logprob == pytest.approx(alone.logprob, abs=1e-4)  # (the batch changes the float rounding)


def test_names_of_any_type_are_scored_and_paired_by_themselves():
    """(mutnew31) A dict mixing int and str names failed in the batching's sort ('<' not supported between str and
    int); pair_accuracy looked int names up as strings ("no score for '1'" with the key 1 there)."""
    vocab, model = Vocabulary(5), _lm("lstm", 5)
    mixed = score_sequences(model, vocab, {7: np.array([1, 2, 3]), "b": np.array([4, 0])})
    alone = score_sequences(model, vocab, {"x": np.array([1, 2, 3])})["x"]  # (a batch of one: other rounding)
    assert mixed[7].logprob == pytest.approx(alone.logprob, abs=1e-5)
    assert mixed[7].num_tokens == alone.num_tokens == 4
    assert pair_accuracy({1: -1.0, 2: -2.0}, [(1, 2)]).score == 1.0


def test_score_units_return_type_follows_its_input() -> None:
    """A dict of sequences gives a dict, a list gives a list: overloads say so, or the README's
    ``score_units(lm, {...})["real"].mean`` and ``pair_accuracy(scores, ...)`` fail a user's type check."""
    overloads = typing.get_overloads(score_units)
    returns = {typing.get_type_hints(o)["sequences"]: typing.get_type_hints(o)["return"] for o in overloads}
    assert dict[str, ItemScore] in returns.values()
    assert list[ItemScore] in returns.values()


def test_pair_accuracy_annotation_admits_the_arrays_and_iterators_it_takes() -> None:
    """pair_accuracy takes an (n, 2) array or a generator (tested in test_pair_accuracy_takes_pairs_as_a_numpy_array
    _or_an_iterator); its annotation ``Sequence[tuple[str, str]]`` refused both in a user's type checker."""
    from collections.abc import Iterable

    hint = typing.get_type_hints(pair_accuracy)["pairs"]
    assert typing.get_origin(hint) is Iterable
    assert pair_accuracy({"a": 1.0, "b": 0.0}, (p for p in [("a", "b")])).score == 1.0
