"""Test items of the spoken-LM benchmark built from the grammar: syntactic minimal pairs and topic StoryCloze pairs.

Syntactic phenomena (BabySLM's six; the ``type`` column of the syntactic ``gold.csv``):

* agreement types come in counterbalanced blocks of four pairs over four strings A, B, C, D, e.g. for
  ``noun_verb_agreement``: A = "the dog chases the cat" ✓, B = "the dog chase the cat" ✗, C = "the dogs chase the cat"
  ✓, D = "the dogs chases the cat" ✗, paired (A, B), (C, D), (A, D), (C, B). Across a block the good and the bad
  sides hold the same words the same number of times, so a model of word (or phone) frequencies cannot prefer
  either side; only the relation between the words decides. ``subtype`` names what differs inside the pair;
* order types (``adjective_noun_order``, ``noun_verb_order``) pair a sentence with its scrambled version, which holds
  exactly the same words.

Every test sentence uses a (subject, verb, object) triple that never occurs in the training corpus, so a model cannot
win by having memorised the sentence.

Topic StoryCloze (tSC): a prefix of three sentences of topic t, then either a fresh sentence of topic t (correct) or
the same sentence moved to another topic (incorrect): every topic word is replaced by the word of the same frequency
rank and part of speech in topic t′ (determiners, number, adjective slot and the topic-neutral human nouns stay), with
a phone count within ±15 % of the correct ending's. Both endings are then about equally probable on their own, so
the pair asks whether the model links the ending to the story's topic — not which of two random sentences has the
more frequent words. (With random endings from another topic, a phone LSTM that prefers the true ending given the
prefix in 98 % of pairs scored only 78 % on the whole stories: the endings' own probabilities drowned the topic.)
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from spidr.corpus.language import REFLEXIVES, Grammar, Lexicon, NounPhrase, Sentence, lexicon

logger = logging.getLogger(__name__)

AGREEMENT_TYPES = ("noun_verb_agreement", "determiner_noun_agreement", "anaphor_gender_agreement",
                   "anaphor_number_agreement")
ORDER_TYPES = ("adjective_noun_order", "noun_verb_order")
SYNTACTIC_TYPES = AGREEMENT_TYPES + ORDER_TYPES
PAIRS_PER_BLOCK = 4
MAX_ATTEMPTS = 200
ENDING_LENGTH_TOLERANCE = 0.15


@dataclass(frozen=True)
class MinimalPair:
    type: str
    subtype: str
    good: tuple[str, ...]  # words
    bad: tuple[str, ...]


@dataclass(frozen=True)
class StoryPair:
    topic: str
    prefix: tuple[tuple[str, ...], ...]  # sentences, as words
    correct_ending: tuple[str, ...]
    incorrect_ending: tuple[str, ...]
    incorrect_topic: str


def _the(noun_phrase: NounPhrase) -> NounPhrase:
    """The same noun phrase with the number-neutral determiner "the" and no adjective."""
    return replace(noun_phrase, determiner="the", adjective=None)


class _Builder:
    def __init__(self, rng: random.Random, lex: Lexicon, seen_triples: Collection[tuple[str, str, str]]) -> None:
        self.rng = rng
        self.lex = lex
        self.grammar = Grammar(rng, lex)
        self.seen = seen_triples
        self.said: set[tuple[str, ...]] = set()  # the sentences of the draws ``novel(distinct=True)`` returned
        self.failed_by = {"triple": 0, "repeat": 0}  # refusals within the draws of blocks that were left out

    def novel(self, make: Callable[[], list[Sentence]], *, distinct: bool = False) -> list[Sentence] | None:
        """Draw ``make()`` until none of its sentences reuses a training triple (with ``distinct``, nor a sentence
        of an earlier distinct draw: only a block's own pairs share theirs); None after ``MAX_ATTEMPTS`` draws that
        all did. A large training set can cover a small template's triples (8 humans × the verbs, for the
        reflexives) almost entirely, and a test sentence said in training favours its side by memory. A sentence in
        two blocks made one pair three times over, and tied blocks together, whose pairs an interval must then
        draw as one."""
        refused = {"triple": 0, "repeat": 0}
        for _ in range(MAX_ATTEMPTS):
            sentences = make()
            if any(s.triple in self.seen for s in sentences):
                refused["triple"] += 1
                continue
            if distinct:
                words = [s.words() for s in sentences]
                if self.said.intersection(words):
                    refused["repeat"] += 1
                    continue
                self.said.update(words)
            return sentences
        for rule, count in refused.items():
            self.failed_by[rule] += count
        return None

    def topic(self) -> str:
        return self.grammar.pick(self.lex.topics)

    def human(self, gender: str | None = None) -> NounPhrase:
        humans = [h for h in self.lex.humans if gender is None or h.gender == gender]
        return NounPhrase(self.grammar.pick(humans), plural=False, determiner="the")

    # Agreement blocks: the four strings A (✓), B (✗), C (✓), D (✗) --------------------------------------------
    def noun_verb_agreement(self) -> list[Sentence]:
        topic = self.topic()
        subject = _the(self.grammar.noun_phrase(topic, plural=False))
        a = Sentence(subject, self.grammar.zipf(self.lex.verbs[topic]), obj=_the(self.grammar.noun_phrase(topic)))
        c = replace(a, subject=replace(subject, plural=True))
        return [a, replace(a, verb_plural=True), c, replace(c, verb_plural=False)]

    def determiner_noun_agreement(self) -> list[Sentence]:
        topic = self.topic()
        base = self.grammar.sentence(topic)
        while base.obj is None:
            base = self.grammar.sentence(topic)
        obj = replace(base.obj, adjective=None)
        a = replace(base, obj=replace(obj, plural=False, determiner="this"))
        c = replace(base, obj=replace(obj, plural=True, determiner="these"))
        return [a, replace(a, obj=replace(a.obj, determiner="these")),
                c, replace(c, obj=replace(c.obj, determiner="this"))]

    def anaphor_gender_agreement(self) -> list[Sentence]:
        verb = self.grammar.zipf(self.lex.verbs[self.topic()])
        a = Sentence(self.human("male"), verb, reflexive="himself")
        c = Sentence(self.human("female"), verb, reflexive="herself")
        return [a, replace(a, reflexive="herself"), c, replace(c, reflexive="himself")]

    def anaphor_number_agreement(self) -> list[Sentence]:
        verb = self.grammar.zipf(self.lex.verbs[self.topic()])
        subject = self.human()
        singular = REFLEXIVES[(subject.noun.gender, False)]
        a = Sentence(subject, verb, reflexive=singular)
        c = Sentence(replace(subject, plural=True), verb, reflexive="themselves")
        return [a, replace(a, reflexive="themselves"), c, replace(c, reflexive=singular)]

    # Order pairs -----------------------------------------------------------------------------------------------
    def adjective_noun_order(self) -> list[Sentence]:
        # "the": "a" would turn into "an" before a vowel in one order only, a cue besides the order itself.
        topic = self.topic()
        adjectives = self.lex.adjectives[topic]
        subject = replace(_the(self.grammar.noun_phrase(topic)), adjective=self.grammar.zipf(adjectives))
        obj = replace(_the(self.grammar.noun_phrase(topic)), adjective=self.grammar.zipf(adjectives))
        good = Sentence(subject, self.grammar.zipf(self.lex.verbs[topic]), obj=obj)
        return [good, replace(good, obj=replace(obj, adjective_after=True)),
                good, replace(good, subject=replace(subject, adjective_after=True))]

    def noun_verb_order(self) -> list[Sentence]:
        topic = self.topic()
        transitive = Sentence(self.grammar.noun_phrase(topic), self.grammar.zipf(self.lex.verbs[topic]),
                              obj=self.grammar.noun_phrase(topic))
        subject = self.human()
        reflexive = Sentence(subject, self.grammar.zipf(self.lex.verbs[self.topic()]),
                             reflexive=REFLEXIVES[(subject.noun.gender, False)])
        return [transitive, replace(transitive, verb_last=True), reflexive, replace(reflexive, verb_last=True)]


_SUBTYPES = {
    "noun_verb_agreement": ("singular_subject", "plural_subject", "singular_verb", "plural_verb"),
    "determiner_noun_agreement": ("singular_noun", "plural_noun", "this", "these"),
    "anaphor_gender_agreement": ("male_subject", "female_subject", "himself", "herself"),
    "anaphor_number_agreement": ("singular_subject", "plural_subject", "singular_reflexive", "plural_reflexive"),
    "adjective_noun_order": ("object", "subject"),
    "noun_verb_order": ("transitive", "reflexive"),
}


def syntactic_pairs(seed: str, pairs_per_type: int, *, seen_triples: Collection[tuple[str, str, str]] = (),
                    lex: Lexicon | None = None) -> list[MinimalPair]:
    """``pairs_per_type`` pairs (a multiple of 4) of each of the six types, in blocks of four."""
    if pairs_per_type < PAIRS_PER_BLOCK or pairs_per_type % PAIRS_PER_BLOCK:
        raise ValueError(f"syntactic pairs per type = {pairs_per_type} must be a positive multiple of 4 (blocks)")
    lex = lex or lexicon()
    pairs = []
    for kind in SYNTACTIC_TYPES:
        builder = _Builder(random.Random(f"{seed}:{kind}"), lex, seen_triples)
        blocks = pairs_per_type // PAIRS_PER_BLOCK
        made = 0
        for _ in range(blocks):
            drawn = builder.novel(getattr(builder, kind), distinct=True)
            if drawn is not None and kind not in AGREEMENT_TYPES:
                extra = builder.novel(getattr(builder, kind), distinct=True)
                drawn = None if extra is None else drawn + extra
            if drawn is None:  # left out whole: the blocks that remain stay counterbalanced
                continue
            made += 1
            words = [sentence.words() for sentence in drawn]
            if kind in AGREEMENT_TYPES:
                a, b, c, d = words
                block, subtypes = [(a, b), (c, d), (a, d), (c, b)], _SUBTYPES[kind]
            else:
                block, subtypes = list(zip(words[::2], words[1::2], strict=True)), _SUBTYPES[kind] * 2
            pairs += [MinimalPair(kind, subtype, good, bad)
                      for subtype, (good, bad) in zip(subtypes, block, strict=True)]
        if made == 0:
            raise ValueError(f"syntactic {kind}: every sentence the grammar makes for it reuses a (subject, verb, "
                             "object) triple of the training set; train the LM on fewer utterances or leave out the "
                             "syntactic task")
        if made < blocks:
            triples, repeats = builder.failed_by["triple"], builder.failed_by["repeat"]
            why = ("the training set covers this template almost entirely, and no test sentence may reuse a "
                   "training triple" if not repeats else
                   "the template has no more sentences (none is in two blocks)" if not triples else
                   f"its draws reused a training triple ({triples}) or a sentence of an earlier block ({repeats}): "
                   "few of the template's sentences are left that no training utterance says")
            logger.warning("syntactic %s: %d of %d blocks left out (%d pairs instead of %d): %s", kind, blocks - made,
                           blocks, made * PAIRS_PER_BLOCK, pairs_per_type, why)
    return pairs


def move_to_topic(sentence: Sentence, topic: str, lex: Lexicon) -> Sentence:
    """``sentence`` with each topic word replaced by the same-rank word of the same part of speech in ``topic``."""
    source = sentence.topic

    def noun_phrase(phrase: NounPhrase) -> NounPhrase:
        noun = phrase.noun
        if noun.topic is not None:
            noun = lex.nouns[topic][lex.nouns[source].index(noun)]
        adjective = phrase.adjective
        if adjective is not None:
            adjective = lex.adjectives[topic][lex.adjectives[source].index(adjective)]
        return replace(phrase, noun=noun, adjective=adjective)

    return replace(sentence, subject=noun_phrase(sentence.subject),
                   verb=lex.verbs[topic][lex.verbs[source].index(sentence.verb)],
                   obj=None if sentence.obj is None else noun_phrase(sentence.obj))


def story_pairs(seed: str, count: int, *, seen_triples: Collection[tuple[str, str, str]] = (),
                lex: Lexicon | None = None, phone_count: Callable[[tuple[str, ...]], int]) -> list[StoryPair]:
    """``count`` tSC pairs; ``phone_count(words)`` measures endings for the ±15 % length match."""
    lex = lex or lexicon()
    builder = _Builder(random.Random(f"{seed}:tsc"), lex, seen_triples)
    pairs = []
    failed = 0
    while len(pairs) < count:
        topic = builder.topic()
        prefix = builder.grammar.story(topic, 3)
        drawn = builder.novel(lambda topic=topic: [builder.grammar.sentence(topic)])
        if drawn is None:  # every ending of this topic drawn reused a training triple: try another story
            failed += 1  # (in a row: a training set may cover some topics whole and leave others open)
            if failed > MAX_ATTEMPTS:
                raise ValueError("tSC: every ending the grammar makes reuses a (subject, verb, object) triple of the "
                                 "training set; train the LM on fewer utterances or leave out the tSC task")
            continue
        failed = 0
        (correct,) = drawn
        target = phone_count(correct.words())
        others = [t for t in lex.topics if t != topic]
        builder.rng.shuffle(others)
        for other in others:
            incorrect = move_to_topic(correct, other, lex)
            if (abs(phone_count(incorrect.words()) - target) <= ENDING_LENGTH_TOLERANCE * target
                    and incorrect.triple not in builder.seen):
                pairs.append(StoryPair(topic, tuple(s.words() for s in prefix), correct.words(), incorrect.words(),
                                       other))
                break
    return pairs
