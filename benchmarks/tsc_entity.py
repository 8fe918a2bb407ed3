"""tSC's optional ``entity`` variant, measured before building it (docs/spoken-lm.md: why it is not made).

An entity pair keeps the story's topic and asks whether the ending re-mentions a noun of the prefix. The prefix's first
sentence has noun n1 of topic t as its subject (n2, another noun of t, is nowhere in the prefix); the correct ending
is a fresh sentence of t whose subject is "the n1", the incorrect one the same sentence with "the n2". A second pair
swaps n1 and n2 throughout, so the four whole stories hold the same words on the good and the bad side: an LM that
ignores the prefix scores exactly 50 % over the two.

The benchmark's stories never re-mention a noun on purpose, so the training text here gets *entity continuity*: each
sentence after the first has, with probability c, an earlier topic noun of its story as subject ("the n", its
number kept). Sentences are the grammar's transitive ones (reflexives left out, so that a subject can be swapped).
Everything is phones of the generated text (the phone oracle, no audio), one unit per phone, deduplicated as
``spidr lm-train`` does; each row trains one LM with ``configs/lm-lstm.toml`` and the row's overrides.

    python benchmarks/tsc_entity.py --out runs/tsc-entity      # the doc's four rows, about 25 min on 2 CPU cores
    python benchmarks/tsc_entity.py --out DIR --rows lstm:0.5:1000 gpt:0.5:1500
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from spidr.corpus.language import (
    Grammar,
    Lexicon,
    Noun,
    NounPhrase,
    Sentence,
    join_with_pauses,
    lexicon,
    utterance_phones,
)
from spidr.corpus.phones import phone_inventory
from spidr.eval.units import deduplicate
from spidr.lm.evaluate import accuracy, pair_score

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm-lstm.toml"
DEFAULT_ROWS = ("lstm:0:1000", "lstm:0.5:1000", "lstm:0.9:3000", "gpt:0.5:1500")
GPT_OVERRIDES = ("model.arch=gpt", "model.num_layers=4", "optimizer.lr=1e-3")  # 4 × 256-d, 4 heads


def transitive(grammar: Grammar, topic: str) -> Sentence:
    sentence = grammar.sentence(topic)
    while sentence.obj is None:
        sentence = grammar.sentence(topic)
    return sentence


def story(grammar: Grammar, topic: str, length: int, continuity: float, *,
          first_subject: NounPhrase | None = None) -> list[Sentence]:
    """``length`` transitive sentences of ``topic``; a later one re-mentions an earlier topic noun with probability
    ``continuity``; ``first_subject`` replaces the first sentence's subject."""
    sentences: list[Sentence] = []
    for k in range(length):
        sentence = transitive(grammar, topic)
        if k == 0 and first_subject is not None:
            sentence = replace(sentence, subject=first_subject)
        elif k > 0 and continuity and grammar.rng.random() < continuity:
            mentioned = [phrase for s in sentences for phrase in (s.subject, s.obj)
                         if phrase is not None and phrase.noun.topic is not None]
            if mentioned:
                antecedent = grammar.pick(mentioned)
                sentence = replace(sentence, subject=NounPhrase(antecedent.noun, antecedent.plural, "the"))
        sentences.append(sentence)
    return sentences


def phone_ids(sentences: list[tuple[str, ...]], lex: Lexicon) -> list[int]:
    index = {phone: i for i, phone in enumerate(phone_inventory())}
    return [index[phone] for phone in utterance_phones(join_with_pauses(sentences), lex)]


def training_text(seed: int, count: int, continuity: float, lex: Lexicon) -> list[list[int]]:
    """``count`` stories of 3–5 sentences, as phone ids."""
    grammar, rng = Grammar(random.Random(f"{seed}:entity-train"), lex), random.Random(f"{seed}:entity-topics")
    return [phone_ids([s.words() for s in story(grammar, rng.choice(lex.topics), rng.randint(3, 5), continuity)], lex)
            for _ in range(count)]


def swap_noun(sentence: Sentence, noun: Noun, by: Noun) -> Sentence:
    """``sentence`` with ``noun`` replaced by ``by`` wherever it is the subject's or the object's noun."""
    def swap(phrase: NounPhrase | None) -> NounPhrase | None:
        return replace(phrase, noun=by) if phrase is not None and phrase.noun == noun else phrase

    return replace(sentence, subject=swap(sentence.subject), obj=swap(sentence.obj))


def entity_pairs(seed: int, blocks: int, continuity: float,
                 lex: Lexicon) -> list[tuple[list[tuple[str, ...]], tuple[str, ...], tuple[str, ...]]]:
    """``2 × blocks`` pairs (prefix sentences, correct ending, incorrect ending), as words; pairs 2i and 2i + 1 are a
    counterbalanced block (n1 and n2 swapped throughout)."""
    grammar = Grammar(random.Random(f"{seed}:entity-pairs"), lex)
    pairs = []
    while len(pairs) < 2 * blocks:
        topic = grammar.pick(lex.topics)
        first, second = grammar.rng.sample(list(lex.nouns[topic]), 2)
        subject = grammar.noun_phrase(topic, noun=first)
        prefix = story(grammar, topic, 3, continuity, first_subject=subject)
        if second in {phrase.noun for s in prefix for phrase in (s.subject, s.obj) if phrase is not None}:
            continue
        ending = transitive(grammar, topic)
        while ending.obj.noun in (first, second):
            ending = transitive(grammar, topic)
        one = replace(ending, subject=NounPhrase(first, subject.plural, "the")).words()
        other = replace(ending, subject=NounPhrase(second, subject.plural, "the")).words()
        pairs.append(([s.words() for s in prefix], one, other))
        pairs.append(([swap_noun(s, first, second).words() for s in prefix], other, one))
    return pairs


def train(out: Path, units: list[list[int]], arch: str, steps: int) -> Path:
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"name": f"u{i}", "units": u}) + "\n" for i, u in enumerate(units))
    overrides = [f"data.train={folder / 'train.jsonl'}", f"run.workdir={out}", "run.name=lm",
                 f"optimizer.max_steps={steps}", f"data.num_units={len(phone_inventory())}",
                 *(GPT_OVERRIDES if arch == "gpt" else ())]
    command = [sys.executable, "-m", "spidr", "lm-train", str(CONFIG)]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"spidr lm-train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out / "lm" / "final.pt"


def score(checkpoint: Path, pairs, lex: Lexicon):
    from spidr.lm.score import score_sequences
    from spidr.lm.tokens import Vocabulary
    from spidr.lm.train import load_lm

    model, info, _ = load_lm(checkpoint)
    sequences = {}
    for i, (prefix, good, bad) in enumerate(pairs):
        for tag, ending in (("good", good), ("bad", bad)):
            sequences[f"{i}-{tag}"] = deduplicate(phone_ids([*prefix, ending], lex))  # as the LM was trained
    scores = score_sequences(model, Vocabulary(info["num_units"]), sequences, context=info["context"])
    return accuracy([pair_score(scores[f"{i}-good"].mean, scores[f"{i}-bad"].mean) for i in range(len(pairs))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (data and LMs, one per row)")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help="ARCH:CONTINUITY:STEPS per row, ARCH lstm or gpt (default: %(default)s)")
    parser.add_argument("--utterances", type=int, default=1300, help="training stories (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=100, help="counterbalanced blocks of 2 pairs (default: 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lex = lexicon()
    print(f"| training text (continuity c) | LM | steps | entity accuracy % [95% CI] ({2 * args.blocks} pairs) |")
    print("|---|---|---|---|")
    for row in args.rows:
        arch, continuity, steps = row.split(":")
        if arch not in ("lstm", "gpt"):
            parser.error(f"row {row!r}: ARCH must be lstm or gpt")
        out = args.out / row.replace(":", "_")
        checkpoint = train(out, training_text(args.seed, args.utterances, float(continuity), lex), arch, int(steps))
        result = score(checkpoint, entity_pairs(args.seed, args.blocks, float(continuity), lex), lex)
        print(f"| c = {continuity} | {arch} | {steps} | {100 * result.score:.1f} [{100 * result.ci_low:.0f}–"
              f"{100 * result.ci_high:.0f}] |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
