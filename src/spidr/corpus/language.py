"""The synthetic language of the spoken-LM benchmark: a lexicon of eight topics and a small grammar over it.

Every sentence is ``DET [ADJ] N V (DET [ADJ] N | REFLEXIVE)`` in the present tense, with number agreement between the
subject and the verb (``the dog chases`` / ``the dogs chase``), between a determiner and its noun (``this dog`` /
``these dogs``) and between a gendered human subject and its reflexive (``the king sees himself``). Content words
belong to one topic; a story keeps to one topic, so topic coherence (tSC) is learnable. Within a topic the
``language.json`` order is the frequency rank: words are drawn with Zipfian weights, so that the lexical test words
fall into several ZeroSpeech frequency bands of the training corpus (the word lists visit every word, so the 1–5
band fills only in corpora smaller than the default: docs/spoken-lm.md).

The training corpus mixes stories (3–5 sentences of one topic) with word lists (2–4 isolated content words separated
by pauses): the isolated test words of the lexical task then have seen boundary contexts. Each generator draws from
its own ``random.Random`` seeded with a string, so one list never depends on another.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal, TypeVar

from spidr.corpus.phones import PAUSE, SILENCE, VOWELS

T = TypeVar("T")

Gender = Literal["male", "female"]

SINGULAR_DETERMINERS = ("the", "a", "this", "each")
PLURAL_DETERMINERS = ("the", "these", "many", "some")
REFLEXIVES = {("male", False): "himself", ("female", False): "herself", ("male", True): "themselves",
              ("female", True): "themselves"}


def strip_stress(phone: str) -> str:
    """``"AH0"`` → ``"AH"``."""
    return phone.rstrip("012")


def is_vowel(phone: str) -> bool:
    return strip_stress(phone) in VOWELS


@dataclass(frozen=True)
class Noun:
    singular: str
    plural: str
    topic: str | None  # None for the human nouns, which every topic uses
    gender: Gender | None = None

    def form(self, *, plural: bool) -> str:
        return self.plural if plural else self.singular


@dataclass(frozen=True)
class Verb:
    base: str
    third_person: str  # "chases"
    topic: str

    def form(self, *, singular_subject: bool) -> str:
        return self.third_person if singular_subject else self.base


@dataclass(frozen=True)
class Lexicon:
    """The words of the language, with an ARPAbet pronunciation (stress digits kept) for each word form."""

    topics: tuple[str, ...]
    nouns: dict[str, tuple[Noun, ...]]  # topic → nouns, most frequent first
    verbs: dict[str, tuple[Verb, ...]]
    adjectives: dict[str, tuple[str, ...]]
    humans: tuple[Noun, ...]
    oov_words: tuple[str, ...]  # real English words that never occur in the training corpus
    pronunciations: dict[str, tuple[str, ...]]

    def pronounce(self, word: str) -> tuple[str, ...]:
        """ARPAbet with stress digits, e.g. ``("K", "AE1", "T")``."""
        try:
            return self.pronunciations[word]
        except KeyError:
            raise ValueError(f"the language has no pronunciation for {word!r}") from None

    def phones(self, word: str) -> tuple[str, ...]:
        """The pronunciation without stress digits (the corpus's ARPAbet-39 labels)."""
        return tuple(strip_stress(p) for p in self.pronounce(word))

    def content_words(self) -> tuple[str, ...]:
        """Every content word form of the training vocabulary (noun singular/plural, verb base/3sg, adjective)."""
        forms: list[str] = []
        for topic in self.topics:
            for noun in self.nouns[topic]:
                forms += [noun.singular, noun.plural]
            for verb in self.verbs[topic]:
                forms += [verb.base, verb.third_person]
            forms += list(self.adjectives[topic])
        for noun in self.humans:
            forms += [noun.singular, noun.plural]
        return tuple(dict.fromkeys(forms))


@cache
def language_json() -> bytes:
    """The shipped lexicon's file, ``language.json``, as its bytes (a benchmark keeps a copy and their digest)."""
    return resources.files("spidr.corpus").joinpath("language.json").read_bytes()


def language_digest() -> str:
    """SHA-256 of ``language_json()``: a benchmark made from another lexicon (an edited word list) is not reused."""
    return hashlib.sha256(language_json()).hexdigest()


@cache
def lexicon() -> Lexicon:
    """The shipped lexicon (``language.json``)."""
    data = json.loads(language_json())
    topics = tuple(data["topics"])
    humans = tuple(Noun(sg, pl, None, gender) for gender, pairs in data["humans"].items() for sg, pl in pairs)
    return Lexicon(
        topics=topics,
        nouns={t: tuple(Noun(sg, pl, t) for sg, pl in data["topics"][t]["nouns"]) for t in topics},
        verbs={t: tuple(Verb(base, third, t) for base, third in data["topics"][t]["verbs"]) for t in topics},
        adjectives={t: tuple(data["topics"][t]["adjectives"]) for t in topics},
        humans=humans,
        oov_words=tuple(data["oov_words"]),
        pronunciations={w: tuple(p.split()) for w, p in data["pronunciations"].items()},
    )


# Sentences ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NounPhrase:
    noun: Noun
    plural: bool
    determiner: str
    adjective: str | None = None
    adjective_after: bool = False  # word-order violation "the dog big" (syntactic test items only)

    def words(self) -> tuple[str, ...]:
        determiner = self.determiner
        first = self.adjective if self.adjective and not self.adjective_after else self.noun.form(plural=self.plural)
        if determiner == "a" and first[0] in "aeiou":
            determiner = "an"
        middle = (self.adjective,) if self.adjective and not self.adjective_after else ()
        after = (self.adjective,) if self.adjective and self.adjective_after else ()
        return (determiner, *middle, self.noun.form(plural=self.plural), *after)


@dataclass(frozen=True)
class Sentence:
    """``subject verb (object | reflexive)``; the verb form agrees with the subject unless ``verb_plural`` says
    otherwise (an agreement violation of the syntactic test set)."""

    subject: NounPhrase
    verb: Verb
    obj: NounPhrase | None = None
    reflexive: str | None = None
    verb_plural: bool | None = None  # None: agree with the subject
    verb_last: bool = False  # word-order violation "the dog the cat chases"

    def words(self) -> tuple[str, ...]:
        plural = self.subject.plural if self.verb_plural is None else self.verb_plural
        verb = (self.verb.form(singular_subject=not plural),)
        rest = self.obj.words() if self.obj is not None else (self.reflexive,)
        if self.verb_last:
            return (*self.subject.words(), *rest, *verb)
        return (*self.subject.words(), *verb, *rest)

    @property
    def triple(self) -> tuple[str, str, str]:
        """(subject lemma, verb lemma, object lemma or "REFL"): test sentences avoid the training triples."""
        obj = self.obj.noun.singular if self.obj is not None else "REFL"
        return self.subject.noun.singular, self.verb.base, obj

    @property
    def topic(self) -> str:
        return self.verb.topic


class Grammar:
    """Draws sentences, stories and word lists from ``rng`` (see the module docstring for the probabilities)."""

    HUMAN_SUBJECT = 0.3
    PLURAL = 0.4
    ADJECTIVE = 0.3
    REFLEXIVE = 0.2  # of the sentences with a human subject

    def __init__(self, rng: random.Random, lex: Lexicon | None = None) -> None:
        self.rng = rng
        self.lex = lex or lexicon()

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    ZIPF_EXPONENT = 1.5

    def zipf(self, options: Sequence[T]) -> T:
        """Rank r (0-based) drawn with weight 1 / (r + 1)^1.5."""
        return self.rng.choices(options, weights=[(r + 1) ** -self.ZIPF_EXPONENT for r in range(len(options))])[0]

    def noun_phrase(self, topic: str, *, noun: Noun | None = None, plural: bool | None = None) -> NounPhrase:
        noun = noun or self.zipf(self.lex.nouns[topic])
        plural = self.rng.random() < self.PLURAL if plural is None else plural
        determiner = self.pick(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS)
        adjective = self.zipf(self.lex.adjectives[topic]) if self.rng.random() < self.ADJECTIVE else None
        return NounPhrase(noun, plural, determiner, adjective)

    def sentence(self, topic: str) -> Sentence:
        human = self.rng.random() < self.HUMAN_SUBJECT
        subject = self.noun_phrase(topic, noun=self.pick(self.lex.humans) if human else None)
        verb = self.zipf(self.lex.verbs[topic])
        if human and self.rng.random() < self.REFLEXIVE:
            return Sentence(subject, verb, reflexive=REFLEXIVES[(subject.noun.gender, subject.plural)])
        return Sentence(subject, verb, obj=self.noun_phrase(topic))

    def story(self, topic: str, num_sentences: int) -> list[Sentence]:
        return [self.sentence(topic) for _ in range(num_sentences)]


# Training corpus ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingUtterance:
    """One utterance of the LM training corpus: a story (sentences of one topic) or a word list."""

    kind: Literal["story", "words"]
    words: tuple[str, ...]  # surface words, PAUSE between sentences (stories) or isolated words (word lists)
    topic: str | None
    triples: tuple[tuple[str, str, str], ...] = ()

    @property
    def text(self) -> str:
        separator = ". " if self.kind == "story" else ", "
        return separator.join(" ".join(part) for part in split_at_pauses(self.words))


def split_at_pauses(words: Sequence[str]) -> list[tuple[str, ...]]:
    """The runs of words between pauses."""
    parts: list[list[str]] = [[]]
    for word in words:
        if word == PAUSE:
            parts.append([])
        else:
            parts[-1].append(word)
    return [tuple(part) for part in parts if part]


def join_with_pauses(parts: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Sentences (or isolated words) as one utterance with a PAUSE between consecutive parts."""
    return tuple(word for i, part in enumerate(parts) for word in ((PAUSE,) if i else ()) + tuple(part))


STORY_FRACTION = 0.85


def training_utterances(seed: str, count: int, lex: Lexicon | None = None) -> list[TrainingUtterance]:
    """``count`` utterances: ≈ 85 % stories of 3–5 sentences, ≈ 15 % lists of 2–4 isolated content words.

    The word lists walk through shuffled rounds of the whole content vocabulary, so every word form of the lexical
    test set occurs in isolation once the corpus has ≥ |vocabulary| / 3 lists.
    """
    lex = lex or lexicon()
    rng = random.Random(f"{seed}:training")
    grammar = Grammar(random.Random(f"{seed}:sentences"), lex)
    vocabulary = list(lex.content_words())
    queue: list[str] = []
    utterances = []
    for _ in range(count):
        if rng.random() < STORY_FRACTION:
            topic = rng.choice(lex.topics)
            story = grammar.story(topic, rng.randint(3, 5))
            words = join_with_pauses([sentence.words() for sentence in story])
            utterances.append(TrainingUtterance("story", words, topic, tuple(s.triple for s in story)))
        else:
            length = rng.randint(2, 4)
            while len(queue) < length:
                round_ = vocabulary[:]
                rng.shuffle(round_)
                queue += round_
            chosen, queue = queue[:length], queue[length:]
            utterances.append(TrainingUtterance("words", join_with_pauses([(w,) for w in chosen]), None))
    return utterances


def pronounce_utterance(words: Sequence[str], lex: Lexicon | None = None) -> tuple[tuple[str, ...], ...]:
    """Per word, its ARPAbet pronunciation with stress; a PAUSE stays ``(PAUSE,)`` (an engine request's input)."""
    lex = lex or lexicon()
    return tuple((PAUSE,) if word == PAUSE else lex.pronounce(word) for word in words)


def utterance_phones(words: Sequence[str], lex: Lexicon | None = None) -> tuple[str, ...]:
    """The stress-free phones of an utterance, a pause as SILENCE (what the phone n-gram models are fitted on)."""
    lex = lex or lexicon()
    return tuple(SILENCE if word == PAUSE else phone for word in words for phone in (
        (PAUSE,) if word == PAUSE else lex.phones(word)))
