"""``spidr lm-eval --baseline ngram``: unigram and bigram models of a benchmark's units, scored like a submission.

A hand-made benchmark whose answers follow from counting: the training set says K AE T nine times and T AE K once,
so a bigram prefers "K AE T" to "T AE K" and a unigram (same phones, same length) ties them."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from spidr import cli
from spidr.corpus.phones import phone_inventory
from spidr.lm.zerospeech import LexicalItem, read_submission, write_lexical_gold

FRAME_LABELS = "frame_labels_20ms.jsonl"


def _write_labels(path: Path, rows: dict[str, list[str]], key: str = "phones") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"name": name, key: values}) + "\n" for name, values in rows.items()),
                    encoding="utf-8")


def _frames(*phones: str) -> list[str]:
    """20 ms labels as a corpus writes them: each phone over a few frames, silence at both ends."""
    return [label for phone in ("SIL", *phones, "SIL") for label in [phone] * 3]


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    training = {f"u{i}": _frames("K", "AE", "T") for i in range(9)} | {"u9": _frames("T", "AE", "K")}
    _write_labels(root / "train" / FRAME_LABELS, training)
    # pair 1 (an in-vocabulary word): K AE T vs T AE K; pair 2 (OOV, frequency 0): the other way round.
    items = [LexicalItem("1", "w1", "v", 9, "kat", "K AE T", 3, True),
             LexicalItem("1", "n1", "v", 9, "tak", "T AE K", 3, False),
             LexicalItem("2", "w2", "v", 0, "tak", "T AE K", 3, True),
             LexicalItem("2", "n2", "v", 0, "kat", "K AE T", 3, False)]
    write_lexical_gold(root / "lexical" / "dev" / "gold.csv", items)
    _write_labels(root / "lexical" / "dev" / FRAME_LABELS, {item.filename: _frames(*item.phones.split())
                                                           for item in items})
    return root


def _bigram_mean(phones: tuple[str, ...]) -> float:
    """The add-0.1 bigram's mean log-probability of ``BOS SIL phones SIL EOS``, counted by hand from the training
    set above: 10 utterances (every one BOS SIL x AE y SIL EOS, then the next one's BOS), over the corpus's 40 labels
    + BOS, EOS, PAD."""
    size = len(phone_inventory()) + 3
    pairs = {("BOS", "SIL"): 10, ("SIL", "K"): 9, ("SIL", "T"): 1, ("K", "AE"): 9, ("T", "AE"): 1, ("AE", "T"): 9,
             ("AE", "K"): 1, ("T", "SIL"): 9, ("K", "SIL"): 1, ("SIL", "EOS"): 10, ("EOS", "BOS"): 9}
    contexts = {"BOS": 10, "SIL": 20, "K": 10, "T": 10, "AE": 10, "EOS": 9}
    tokens = ("BOS", "SIL", *phones, "SIL", "EOS")
    logs = [math.log((pairs.get((a, b), 0) + 0.1) / (contexts[a] + 0.1 * size)) for a, b in itertools.pairwise(tokens)]
    return sum(logs) / len(logs)


def _submission(path: Path) -> dict[str, float]:
    return {stem: float(score) for stem, score in (line.split() for line in path.read_text().splitlines())}


def test_ngram_baselines_score_what_counting_says(bench: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(["lm-eval", str(bench), "--baseline", "ngram", "--json", "--out", str(out)]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert set(summaries) == {"unigram", "bigram"}
    # unigram: both sides have the same phones and length, so the same mean: two ties
    assert summaries["unigram"]["swuggy_all"] == pytest.approx(50.0)
    assert summaries["unigram"]["swuggy_invocab"] == pytest.approx(50.0)
    # bigram: K AE T wins both pairs; it is the word of pair 1 (in vocabulary) and the nonword of pair 2 (OOV)
    assert summaries["bigram"]["swuggy_invocab"] == pytest.approx(100.0)
    assert summaries["bigram"]["swuggy_all"] == pytest.approx(50.0)
    scores = _submission(out / "bigram" / "lexical" / "dev.txt")
    assert scores["w1"] == pytest.approx(_bigram_mean(("K", "AE", "T")), abs=1e-5)
    assert scores["n1"] == pytest.approx(_bigram_mean(("T", "AE", "K")), abs=1e-5)
    assert scores["w1"] == scores["n2"]
    unigram = _submission(out / "unigram" / "lexical" / "dev.txt")
    assert unigram["w1"] == unigram["n1"]
    for model in ("unigram", "bigram"):  # each model's tables beside its submission, as lm-eval --out writes them
        assert json.loads((out / model / "results.json").read_text())
        assert (out / model / "score_lexical_dev_by_frequency.csv").is_file()


def test_ngram_baselines_read_units_in_lm_units_layout(bench: Path, tmp_path: Path, capsys) -> None:
    """--units: the same answers from integer units (K = 0, AE = 1, T = 2, silence 3) in lm-units' layout."""
    ids = {"SIL": 3, "K": 0, "AE": 1, "T": 2}
    units = tmp_path / "units"
    for source, target in ((bench / "train" / FRAME_LABELS, units / "train.jsonl"),
                           (bench / "lexical" / "dev" / FRAME_LABELS, units / "lexical" / "dev.jsonl")):
        rows = [json.loads(line) for line in source.read_text().splitlines()]
        _write_labels(target, {row["name"]: [ids[p] for p in row["phones"]] for row in rows}, key="units")
    assert cli.main(["lm-eval", str(bench), "--baseline", "ngram", "--units", str(units), "--json"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert summaries["bigram"]["swuggy_invocab"] == pytest.approx(100.0)
    assert summaries["unigram"]["swuggy_all"] == pytest.approx(50.0)
    # without --out the submissions lived in a temporary folder, gone now: the JSON names none
    assert summaries["bigram"]["details"]["lexical"]["submission"] is None


def test_ngram_baselines_written_with_out_name_their_submission(bench: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(["lm-eval", str(bench), "--baseline", "ngram", "--json", "--out", str(out)]) == 0
    submission = json.loads(capsys.readouterr().out)["bigram"]["details"]["lexical"]["submission"]
    assert Path(submission) == out / "bigram" / "lexical" / "dev.txt"
    assert Path(submission).is_file()


def test_ngram_baseline_report_names_each_model(bench: Path, capsys) -> None:
    assert cli.main(["lm-eval", str(bench), "--baseline", "ngram"]) == 0
    out = capsys.readouterr().out
    assert "== unigram (add-0.1" in out
    assert "== bigram (add-0.1" in out
    assert out.count("swuggy_invocab") == 2


@pytest.mark.parametrize(("arguments", "message"), [
    (["SUB", "--baseline", "ngram"], "--baseline scores n-gram models, not a submission: leave out SUB"),
    ([], "give SUBMISSION_DIR (a submission to score) or --baseline ngram"),
    (["SUB", "--units", "U"], "--units gives the n-gram baselines their units"),
    (["--baseline", "ngram", "--units", "U"], "U/train.jsonl does not exist: the n-gram baselines are fitted on "
                                              "units in lm-units' layout"),
])
def test_lm_eval_refuses_a_confused_command_line(bench: Path, arguments, message, capsys, monkeypatch) -> None:
    monkeypatch.chdir(bench.parent)
    assert cli.main(["lm-eval", str(bench), *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_ngram_baselines_need_the_training_labels(bench: Path, capsys) -> None:
    (bench / "train" / FRAME_LABELS).unlink()
    assert cli.main(["lm-eval", str(bench), "--baseline", "ngram"]) == 2
    assert f"{bench / 'train' / FRAME_LABELS} does not exist" in capsys.readouterr().err


def test_a_test_unit_unseen_in_training_is_scored(bench: Path, tmp_path: Path, capsys) -> None:
    """Units: the inventory spans every file, so a test item may hold a unit no training utterance has (a codebook's
    unused code); add-0.1 gives it a small probability, and a submission left in --out by an earlier run is not
    scored again."""
    units = tmp_path / "units"
    _write_labels(units / "train.jsonl", {f"u{i}": [3, 0, 1, 2, 3] for i in range(10)}, key="units")
    _write_labels(units / "lexical" / "dev.jsonl", {"w1": [3, 0, 1, 2, 3], "n1": [3, 0, 7, 2, 3],
                                                    "w2": [3, 0, 1, 2, 3], "n2": [3, 0, 7, 2, 3]}, key="units")
    out = tmp_path / "out"
    stale = out / "bigram" / "tsc" / "dev.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("x 1.0\n")
    assert cli.main(["lm-eval", str(bench), "--baseline", "ngram", "--units", str(units), "--out", str(out),
                     "--json"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    # each nonword holds unit 7, never said in training, where its word holds unit 1: every model prefers the word
    assert summaries["unigram"]["swuggy_all"] == pytest.approx(100.0)
    assert summaries["bigram"]["swuggy_all"] == pytest.approx(100.0)
    assert not stale.exists()


# (tests below: behaviours that a second mutation round over spidr.lm, 55 mutants, found untested)

def _jsonl(path: Path, rows: dict[str, list], field: str = "units") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"name": name, field: values}) + "\n" for name, values in rows.items()))
    return path


def test_ngram_baseline_scores_a_test_item_alike_whatever_else_its_file_holds(tmp_path):
    """mut bl-test-own-labels. Truth: test items are numbered with the training file's label set (the models'
    inventory): an item's score does not depend on the other items of its test file, here on whether one of them
    holds '+noise+', a training label that sorts before every phone."""
    from spidr.lm.baseline import write_ngram_submissions

    train = _jsonl(tmp_path / "train.jsonl", {f"u{i}": ["SIL", "+noise+", "K", "AE", "T", "SIL"] if i % 3 else
                                              ["SIL", "T", "AE", "K", "SIL"] for i in range(9)}, field="phones")
    alone = _jsonl(tmp_path / "alone" / "lexical.jsonl", {"w1": ["K", "AE", "T"]}, field="phones")
    with_noise = _jsonl(tmp_path / "noise" / "lexical.jsonl", {"w1": ["K", "AE", "T"], "w2": ["+noise+", "K"]},
                        field="phones")
    scores = {}
    for name, path in (("alone", alone), ("noise", with_noise)):
        folders = write_ngram_submissions(train, {"lexical": path}, tmp_path / f"out_{name}", kind="dev")
        scores[name] = read_submission(folders["bigram"] / "lexical" / "dev.txt")["w1"]
    assert scores["alone"] == scores["noise"]


def test_ngram_baseline_submissions_are_keyed_by_file_stem(tmp_path):
    """mut bl-test-names-not-stems. Truth: a submission line is keyed by the wav stem (the gold 'filename'): test
    rows named by path ('spk/w1', '/data/spk/n1.wav') give the lines 'w1' and 'n1'."""
    from spidr.lm.baseline import write_ngram_submissions

    train = _jsonl(tmp_path / "train.jsonl", {"u0": [1, 2, 3], "u1": [3, 2, 1]})
    test = _jsonl(tmp_path / "lexical.jsonl", {"spk/w1": [1, 2], "/data/spk/n1.wav": [2, 1]})
    folders = write_ngram_submissions(train, {"lexical": test}, tmp_path / "out", kind="dev")
    assert set(read_submission(folders["unigram"] / "lexical" / "dev.txt")) == {"w1", "n1"}


def test_ngram_baseline_of_the_test_split_reads_the_test_files(tmp_path):
    """muts bl-bench-dev-fixed, bl-units-dev-fixed. Truth: lm-eval --baseline ngram --kind test scores the test
    split: BENCH_DIR/<task>/test/frame_labels_20ms.jsonl, or UNITS_DIR/<task>/test.jsonl."""
    from spidr.lm.baseline import baseline_inputs
    from spidr.lm.bench_units import FRAME_LABELS

    bench, units = tmp_path / "bench", tmp_path / "units"
    _jsonl(bench / "train" / FRAME_LABELS, {"u": ["K"]}, field="phones")
    _jsonl(units / "train.jsonl", {"u": [1]})
    for kind in ("dev", "test"):
        _jsonl(bench / "lexical" / kind / FRAME_LABELS, {"w": ["K"]}, field="phones")
        _jsonl(units / "lexical" / f"{kind}.jsonl", {"w": [1]})
    assert baseline_inputs(bench, None, "test") == (bench / "train" / FRAME_LABELS,
                                                    {"lexical": bench / "lexical" / "test" / FRAME_LABELS})
    assert baseline_inputs(bench, units, "test") == (units / "train.jsonl",
                                                     {"lexical": units / "lexical" / "test.jsonl"})


def test_ngram_baselines_refuse_units_that_lm_units_left_unfinished(tmp_path):
    """A units folder that lm-units was killed in holds the sets finished so far: scoring it would leave the others'
    tasks unscored with no more than a warning. Like lm-score, the baselines refuse it (in OUT or in OUT/layer_LL)."""
    from spidr.lm.baseline import baseline_inputs
    from spidr.lm.bench_units import IN_PROGRESS

    units = tmp_path / "units"
    layer = units / "layer_02"
    _jsonl(layer / "train.jsonl", {"u": [1]})
    _jsonl(layer / "lexical" / "dev.jsonl", {"w": [1]})
    assert baseline_inputs(tmp_path / "bench", layer, "dev")[0] == layer / "train.jsonl"
    for folder in (units, layer):
        (folder / IN_PROGRESS).touch()
        with pytest.raises(ValueError, match=rf"{folder} is an unfinished spidr lm-units run"):
            baseline_inputs(tmp_path / "bench", layer, "dev")
        (folder / IN_PROGRESS).unlink()


def test_ngram_baseline_of_the_test_split_writes_test_submissions(tmp_path):
    """mut bl-write-dev-fixed. Truth: write_ngram_submissions writes 'out_dir/<model>/<task>/<kind>.txt', which
    lm-eval --kind test then reads."""
    from spidr.lm.baseline import write_ngram_submissions
    from test_lm_baseline import _jsonl

    train = _jsonl(tmp_path / "train.jsonl", {"u0": [1, 2, 3], "u1": [3, 2, 1]})
    test = _jsonl(tmp_path / "lexical" / "test.jsonl", {"w1": [1, 2], "n1": [2, 1]})
    folders = write_ngram_submissions(train, {"lexical": test}, tmp_path / "out", kind="test")
    for folder in folders.values():
        assert sorted(p.name for p in (folder / "lexical").iterdir()) == ["test.txt"]
