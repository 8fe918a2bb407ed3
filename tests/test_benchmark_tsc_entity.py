"""benchmarks/tsc_entity.py: its pairs are what docs/spoken-lm.md says they are, and the script runs end to end."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from spidr.corpus.language import lexicon

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tsc_entity.py"


@pytest.fixture(scope="module")
def entity():
    spec = importlib.util.spec_from_file_location("tsc_entity_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_are_counterbalanced_and_test_the_re_mention(entity):
    """Each block of two pairs holds the same whole stories on the good and the bad side (an LM that ignores the
    prefix scores 50 %); the correct ending's subject noun is in its prefix, the incorrect one's is not; both endings
    keep the story's topic and differ in that noun only."""
    lex = lexicon()
    nouns = {noun.singular: noun for topic in lex.topics for noun in lex.nouns[topic]}
    nouns |= {noun.plural: noun for noun in nouns.values()}
    pairs = entity.entity_pairs(0, 30, 0.5, lex)
    assert len(pairs) == 60
    for i in range(0, len(pairs), 2):
        stories = [(tuple(prefix), ending) for prefix, good, bad in pairs[i:i + 2] for ending in (good, bad)]
        good_side = Counter(stories[0::2])
        bad_side = Counter(stories[1::2])
        assert Counter(w for s in good_side.elements() for part in (*s[0], s[1]) for w in part) == Counter(
            w for s in bad_side.elements() for part in (*s[0], s[1]) for w in part)
    for prefix, good, bad in pairs:
        differing = [(a, b) for a, b in zip(good, bad, strict=True) if a != b]
        assert len(differing) == 1
        good_noun, bad_noun = (nouns[word] for word in differing[0])
        assert good_noun.topic == bad_noun.topic
        mentioned = {nouns[w] for sentence in prefix for w in sentence if w in nouns}
        assert good_noun in mentioned
        assert bad_noun not in mentioned


def test_continuity_makes_the_training_text_re_mention_nouns(entity):
    """At c = 0 a later sentence's subject is a noun of an earlier sentence by chance only; at c = 0.9 mostly."""
    lex = lexicon()

    def re_mentions(continuity: float) -> float:
        grammar = entity.Grammar(entity.random.Random("test"), lex)
        hits = total = 0
        for _ in range(200):
            story = entity.story(grammar, "farm", 4, continuity)
            for k in range(1, len(story)):
                earlier = {p.noun for s in story[:k] for p in (s.subject, s.obj) if p is not None}
                hits += story[k].subject.noun in earlier
                total += 1
        return hits / total

    assert re_mentions(0.9) > re_mentions(0.0) + 0.4


def test_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--rows", "lstm:0.5:3",
                           "--utterances", "30", "--blocks", "4"], capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    row = re.search(r"^\| c = 0.5 \| lstm \| 3 \| ([\d.]+) \[(\d+)–(\d+)\] \|$", done.stdout, flags=re.MULTILINE)
    assert row, done.stdout
    assert 0 <= float(row.group(2)) <= float(row.group(1)) <= float(row.group(3)) <= 100
