"""Subcommands of this area (see ``spidr.cli``): ``lm-eval`` (ZeroSpeech 2021 pair accuracies of a submission)."""

from __future__ import annotations

import argparse
import json

FORMATTER = argparse.ArgumentDefaultsHelpFormatter

# The breakdowns shown by the readable lm-eval report, per task (the JSON output and --out have all of them).
SHOWN_BREAKDOWNS = {"lexical": ("by_frequency",), "syntactic": ("by_type",), "tsc": ("by_type",),
                    "ssc": ("by_type",)}


def _format(value: object, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _print_report(summary: dict) -> None:
    details = summary["details"]
    print(f"{'metric':<16}{'score %':>9}{'n':>8}  {'95% CI':<16}{'p (vs 50%)':>11}")
    for entry in details.values():
        for name, value in entry["accuracy"].items():
            low, high = value["ci95"]
            print(f"{name:<16}{value['score']:>9.2f}{value['n']:>8}  [{low:5.2f}, {high:5.2f}]  "
                  f"{value['p_value']:>10.2g}")
    for task, entry in details.items():
        for name in SHOWN_BREAKDOWNS[task]:
            records = entry[name]
            if not records:
                continue
            print(f"\n{task} {name.replace('_', ' ')} ({entry['kind']})")
            labels = [column for column in records[0] if column not in {"n", "score", "std"}]
            width = max(len(" / ".join(labels)), *(len(" / ".join(str(r[c]) for c in labels)) for r in records))
            print(f"  {' / '.join(labels):<{width}}{'n':>8}{'score %':>9}{'std':>8}")
            for record in records:
                label = " / ".join(str(record[column]) for column in labels)
                print(f"  {label:<{width}}{record['n']:>8}{_format(record['score']):>9}{_format(record['std']):>8}")


def _lm_eval(args: argparse.Namespace) -> int:
    from spidr.lm.evaluate import evaluate_benchmark

    summary = evaluate_benchmark(args.bench_dir, args.submission_dir, kind=args.kind, out_dir=args.out,
                                 seed=args.seed)
    if args.json:
        print(json.dumps(summary, allow_nan=False))
    else:
        _print_report(summary)
        if args.out:
            print(f"\nwrote the tables and results.json to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lm-eval`` to the ``spidr`` parser."""
    parser = subparsers.add_parser(
        "lm-eval",
        help="sWUGGY / sBLIMP / tSC / sSC accuracies of a ZeroSpeech-2021-style submission",
        description="Score SUBMISSION_DIR/{lexical,syntactic,tsc,ssc}/KIND.txt ('<stem> <score>' lines) against "
        "BENCH_DIR/{lexical,syntactic}/KIND/gold.csv and BENCH_DIR/{tsc,ssc}/KIND/ (gold.csv or "
        "{n}_{id}_{correct|incorrect}.wav names), exactly as the ZeroSpeech 2021 toolkit: tie = 1/2, mean over "
        "voices per pair id, then over ids; in-vocab = the frequency bands other than oov. Scores are in percent, "
        "with 95% bootstrap CIs over pair ids and binomial p-values against chance.",
        formatter_class=FORMATTER,
    )
    parser.add_argument("bench_dir", metavar="BENCH_DIR", help="benchmark root (lexical/, syntactic/, tsc/, ssc/)")
    parser.add_argument("submission_dir", metavar="SUBMISSION_DIR", help="submission root with TASK/KIND.txt files")
    parser.add_argument("--kind", choices=("dev", "test"), default="dev", help="split to score")
    parser.add_argument("--json", action="store_true", help="print one JSON object (headline numbers + details)")
    parser.add_argument("--out", default=None, help="also write score_*_by_*.csv tables and results.json here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.set_defaults(handler=_lm_eval)
