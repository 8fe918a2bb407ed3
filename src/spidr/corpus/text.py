"""Seeded English sentences from a small template grammar over the word lists in ``words.json``.

The grammar only has to give the voices varied, pronounceable text: statements, questions, commands, compound and
reported clauses, 4 to ~18 words each. Every word is an ordinary English word that the flite, festival and
espeak-ng lexicons all know, and the lists include words for the rare phones (ZH in "measure", OY in "voice").

Each list of sentences comes from its own ``random.Random`` seeded with a string (string seeds are hashed with
SHA-512, so they are stable across runs and Python versions), which keeps one voice's text independent of which
other voices are synthesised.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Words:
    names: tuple[str, ...]
    nouns: tuple[tuple[str, str], ...]  # (singular, plural)
    adjectives: tuple[str, ...]
    transitive_verbs: tuple[tuple[str, str, str], ...]  # (base, third person singular, past)
    intransitive_verbs: tuple[tuple[str, str, str], ...]
    adverbs: tuple[str, ...]
    prepositions: tuple[str, ...]
    times: tuple[str, ...]
    numbers: tuple[str, ...]


def words_json() -> bytes:
    """The shipped word lists, ``words.json``, as its bytes."""
    return resources.files("spidr.corpus").joinpath("words.json").read_bytes()


def words_digest() -> str:
    """SHA-256 of ``words_json()``: every sentence is drawn from these lists, so a corpus made from other lists (an
    edited or upgraded file) is not reused."""
    return hashlib.sha256(words_json()).hexdigest()


@cache
def _words() -> _Words:
    data = json.loads(words_json().decode("utf-8"))
    return _Words(**{key: tuple(tuple(v) if isinstance(v, list) else v for v in values)
                     for key, values in data.items()})


_POSSESSIVES = ("my", "your", "his", "her", "our", "their")
# "a" or "an" goes by the next word's first sound, not its letter: "an honest", "a usual"
_VOWEL_SOUND_AFTER_CONSONANT_LETTER = ("honest", "honor", "honour", "hour", "heir")
_CONSONANT_SOUND_AFTER_VOWEL_LETTER = ("us", "uni", "use", "uti", "eu", "one", "once")


def indefinite_article(word: str) -> str:
    """"an" before a vowel sound, "a" before a consonant sound (the speech engines read the text as written)."""
    if word.startswith(_VOWEL_SOUND_AFTER_CONSONANT_LETTER):
        return "an"
    if word.startswith(_CONSONANT_SOUND_AFTER_VOWEL_LETTER):
        return "a"
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"
_SUBJECT_PRONOUNS = ("I", "you", "we", "they", "he", "she")


class _Grammar:
    """One sentence per call to ``sentence()``, drawing every choice from ``rng``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.w = _words()

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def maybe(self, probability: float) -> bool:
        return self.rng.random() < probability

    # Noun phrases ------------------------------------------------------------------------------------------
    def noun_phrase(self, *, plural: bool = False) -> str:
        singular, plural_form = self.pick(self.w.nouns)
        noun = plural_form if plural else singular
        words = [self.pick(self.w.adjectives)] if self.maybe(0.45) else []
        words.append(noun)
        if plural:
            determiner = self.pick(("the", "some", "these", "those", "many", "all the", *_POSSESSIVES))
        else:
            determiner = self.pick(("the", "a", "this", "that", "every", *_POSSESSIVES))
            if determiner == "a":
                determiner = indefinite_article(words[0])
        return " ".join([determiner, *words])

    def subject(self) -> tuple[str, bool]:
        """A subject and whether it takes a third-person-singular verb."""
        roll = self.rng.random()
        if roll < 0.3:
            return self.pick(self.w.names), True
        if roll < 0.45:
            pronoun = self.pick(_SUBJECT_PRONOUNS)
            return pronoun, pronoun in ("he", "she")
        plural = self.maybe(0.3)
        return self.noun_phrase(plural=plural), not plural

    def obj(self) -> str:
        return self.pick(self.w.names) if self.maybe(0.15) else self.noun_phrase(plural=self.maybe(0.25))

    def place(self) -> str:
        return f"{self.pick(self.w.prepositions)} {self.noun_phrase()}"

    def tail(self) -> list[str]:
        """Optional adverbials closing a clause."""
        words = []
        if self.maybe(0.25):
            words.append(self.pick(self.w.adverbs))
        if self.maybe(0.4):
            words.append(self.place())
        if self.maybe(0.3):
            words.append(self.pick(self.w.times))
        return words

    # Clauses -----------------------------------------------------------------------------------------------
    def past_clause(self) -> str:
        subject, _ = self.subject()
        if self.maybe(0.6):
            return " ".join([subject, self.pick(self.w.transitive_verbs)[2], self.obj(), *self.tail()])
        return " ".join([subject, self.pick(self.w.intransitive_verbs)[2], *self.tail()])

    def present_clause(self) -> str:
        subject, singular = self.subject()
        verb = self.pick(self.w.transitive_verbs)
        adverb = [self.pick(("often", "always", "never", "sometimes", "usually", "rarely"))] if self.maybe(0.4) else []
        return " ".join([subject, *adverb, verb[1] if singular else verb[0], self.obj(), *self.tail()])

    def future_clause(self) -> str:
        subject, _ = self.subject()
        if self.maybe(0.5):
            return " ".join([subject, "will", self.pick(self.w.transitive_verbs)[0], self.obj(), *self.tail()])
        return " ".join([subject, "will", self.pick(self.w.intransitive_verbs)[0], *self.tail()])

    def clause(self) -> str:
        return self.pick((self.past_clause, self.past_clause, self.present_clause, self.future_clause))()

    # Sentences ---------------------------------------------------------------------------------------------
    def sentence(self) -> str:
        kind = self.rng.choices(
            ("statement", "compound", "reported", "question", "wh_question", "command", "there", "relative",
             "exclamation"),
            weights=(30, 12, 8, 10, 6, 8, 8, 10, 3),
        )[0]
        match kind:
            case "statement":
                text, end = self.clause(), "."
            case "compound":
                text, end = f"{self.clause()}, {self.pick(('and', 'but', 'so', 'because'))} {self.clause()}", "."
            case "reported":
                speaker = self.pick(self.w.names)
                verb = self.pick(("said", "thought", "knew", "heard", "believed", "told us"))
                text, end = f"{speaker} {verb} that {self.clause()}", "."
            case "question":
                subject, singular = self.subject()
                auxiliary = self.pick(("did", "does" if singular else "do", "will", "can"))
                verb = self.pick(self.w.transitive_verbs)[0]
                text, end = " ".join([auxiliary, subject, verb, self.obj(), *self.tail()]), "?"
            case "wh_question":
                subject, singular = self.subject()
                auxiliary = self.pick(("did", "does" if singular else "do", "will", "should"))
                word = self.pick(("where", "why", "when", "how"))
                text, end = " ".join([word, auxiliary, subject, self.pick(self.w.intransitive_verbs)[0]]), "?"
            case "command":
                opener = self.pick(("please", "now", "never", "always", "quickly"))
                text = " ".join([opener, self.pick(self.w.transitive_verbs)[0], self.obj(), *self.tail()])
                end = self.pick((".", "!"))
            case "there":
                adjective = [self.pick(self.w.adjectives)] if self.maybe(0.5) else []
                noun = self.pick(self.w.nouns)[1]
                text = " ".join(["there were", self.pick(self.w.numbers), *adjective, noun, self.place()])
                end = "."
            case "relative":
                noun = self.noun_phrase()
                relative = f"{self.pick(self.w.transitive_verbs)[2]} {self.obj()}"
                text = f"{noun} that {relative} {self.pick(self.w.intransitive_verbs)[2]} {' '.join(self.tail())}"
                end = "."
            case _:
                adjective = self.pick(self.w.adjectives)
                article = indefinite_article(adjective)
                text, end = f"what {article} {adjective} {self.pick(self.w.nouns)[0]}", "!"
        text = " ".join(text.split())  # an empty optional part leaves a double space
        return text[0].upper() + text[1:] + end


def sentences(seed: str, count: int) -> list[str]:
    """``count`` sentences drawn from a generator seeded by the string ``seed`` (same seed → same list)."""
    grammar = _Grammar(random.Random(seed))
    return [grammar.sentence() for _ in range(count)]
