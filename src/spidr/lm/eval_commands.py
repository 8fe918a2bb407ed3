"""Subcommands of this area (see ``spidr.cli``): ``lm-eval`` (ZeroSpeech 2021 pair accuracies of a submission) and
``lm-correlate`` (unit quality vs LM accuracy)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from pathlib import Path

from spidr import cli_types
from spidr.help_format import HelpFormatter
from spidr.in_progress import marked_in_progress

logger = logging.getLogger(__name__)

FORMATTER = HelpFormatter

# The breakdowns shown by the readable lm-eval report, per task (the JSON output and --out have all of them).
SHOWN_BREAKDOWNS = {"lexical": ("by_frequency",), "syntactic": ("by_type",), "tsc": ("by_type",),
                    "ssc": ("by_type",), "lexical_seen": ("by_frequency",)}


def _format(value: object, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _print_report(summary: dict) -> None:
    details = summary["details"]
    width = max([16, *(len(name) + 1 for entry in details.values() for name in entry["accuracy"])])
    print(f"{'metric':<{width}}{'score %':>9}{'n':>8}  {'95% CI':<16}{'p (vs 50%)':>11}")
    for entry in details.values():
        for name, value in entry["accuracy"].items():
            low, high = value["ci95"]
            print(f"{name:<{width}}{value['score']:>9.2f}{value['n']:>8}  [{low:5.2f}, {high:5.2f}]  "
                  f"{value['p_value']:>10.2g}")
    for task, entry in details.items():
        for name in SHOWN_BREAKDOWNS[task]:
            records = entry[name]
            if not records:
                continue
            print(f"\n{task} {name.replace('_', ' ')} ({entry['kind']})")
            labels = [column for column in records[0] if column not in {"n", "score", "std", "ci95", "p_value"}]
            width = max(len(" / ".join(labels)), *(len(" / ".join(str(r[c]) for c in labels)) for r in records))
            print(f"  {' / '.join(labels):<{width}}{'n':>8}{'score %':>9}{'std':>8}  {'95% CI':<16}{'p (vs 50%)':>11}")
            for record in records:
                label = " / ".join(str(record[column]) for column in labels)
                interval = ("–" if record["ci95"] is None else
                            f"[{record['ci95'][0]:5.2f}, {record['ci95'][1]:5.2f}]")
                p_value = "–" if record["p_value"] is None else f"{record['p_value']:.2g}"
                print(f"  {label:<{width}}{record['n']:>8}{_format(record['score']):>9}{_format(record['std']):>8}  "
                      f"{interval:<16}{p_value:>11}")


def _lm_eval(args: argparse.Namespace) -> int:
    from spidr.lm.evaluate import evaluate_benchmark

    if args.baseline:
        return _lm_eval_baselines(args)
    if args.units:
        raise ValueError("--units gives the n-gram baselines their units: use it with --baseline ngram")
    if args.submission_dir is None:
        raise ValueError("give SUBMISSION_DIR (a submission to score) or --baseline ngram")
    summary = evaluate_benchmark(args.bench_dir, args.submission_dir, kind=args.kind, out_dir=args.out,
                                 seed=args.seed)
    if args.json:
        print(json.dumps(summary, allow_nan=False))
    else:
        _print_report(summary)
        if args.out:
            print(f"\nwrote the tables and results.json to {args.out}")
    return 0


def _lm_eval_baselines(args: argparse.Namespace) -> int:
    """``--baseline ngram``: each n-gram model's submission is written (to ``--out/<model>/``, else to a temporary
    folder) and scored like any submission."""
    import contextlib
    import tempfile

    from spidr.lm.baseline import ADD_K, baseline_inputs, write_ngram_submissions
    from spidr.lm.evaluate import evaluate_benchmark

    if args.submission_dir is not None:
        raise ValueError(f"--baseline scores n-gram models, not a submission: leave out {args.submission_dir}")
    train, tests = baseline_inputs(args.bench_dir, args.units, args.kind)
    destination = contextlib.nullcontext(args.out) if args.out else tempfile.TemporaryDirectory(prefix="spidr-ngram-")
    with destination as out_dir:
        folders = write_ngram_submissions(train, tests, out_dir, kind=args.kind)
        summaries = {name: evaluate_benchmark(args.bench_dir, folder, kind=args.kind,
                                              out_dir=folder if args.out else None, seed=args.seed)
                     for name, folder in folders.items()}
    if not args.out:  # the submissions were in a temporary folder, gone now: none to name
        for summary in summaries.values():
            for details in summary["details"].values():
                details["submission"] = None
    if args.json:
        print(json.dumps(summaries, allow_nan=False))
        return 0
    for number, (name, summary) in enumerate(summaries.items()):
        if number:
            print()
        print(f"== {name} (add-{ADD_K}, deduplicated units of {train}) ==")
        _print_report(summary)
    if args.out:
        print(f"\nwrote each model's submission, tables and results.json to {args.out}/<model>")
    return 0


def _columns(text: str, flag: str) -> list[str]:
    columns = [column.strip() for column in text.split(",") if column.strip()]
    if not columns:
        raise ValueError(f"{flag} needs at least one column name")
    return columns


def _plot_path(args: argparse.Namespace, x: str, y: str, *, several: bool) -> Path | None:
    table = Path(args.table)
    if args.plot is None:
        return None if args.json else table.with_name(f"{table.stem}_{y}_vs_{x}.png")
    plot = Path(args.plot)
    # With several pairs, --plot is a name pattern: corr.png → corr_<y>_vs_<x>.png.
    return plot.with_name(f"{plot.stem}_{y}_vs_{x}{plot.suffix or '.png'}") if several else plot


# lm-correlate without --x / --y: the unit-quality and LM-accuracy columns of lm-study's points.csv.
DEFAULT_QUALITY_COLUMNS = "abx_across,unit_abx_across,pnmi"
DEFAULT_ACCURACY_COLUMNS = "swuggy_all,swuggy_invocab,sblimp,tsc"


def _correlated_pairs(args: argparse.Namespace) -> list[tuple[dict, list]]:
    """(result, rows) of every (x, y) pair of ``--x`` × ``--y``, read and correlated before anything is written, so
    that a wrong column name fails before any plot. A default column list may name columns a table lacks (an older
    points.csv, a benchmark without items for ABX): its unusable pairs are left out with a warning. Columns named by
    the user must all be usable."""
    from spidr.input_files import existing_file
    from spidr.lm.correlate import correlate, read_table, warn_dropped

    existing_file(args.table, "table")  # (once, not in each pair's reason)
    lenient = args.x is None or args.y is None
    pairs = [(x, y) for y in _columns(args.y or DEFAULT_ACCURACY_COLUMNS, "--y")
             for x in _columns(args.x or DEFAULT_QUALITY_COLUMNS, "--x")]
    label_columns = _columns(args.label_columns, "--label-columns") if args.label_columns else []
    computed, left_out, dropped = [], [], {}
    for x, y in pairs:
        try:
            rows = read_table(args.table, [x, y], label_columns=label_columns, dropped=dropped)
            try:
                result = correlate([row[x] for row in rows], [row[y] for row in rows], seed=args.seed,
                                   names=(x, y))
            except ValueError as error:  # (which table)
                raise ValueError(f"{args.table}: {error}") from None
        except ValueError as error:
            if not lenient:
                if dropped:  # (why too few rows were left)
                    warn_dropped(args.table, dropped)
                raise
            left_out.append(f"{y} vs {x} ({error})")
            continue
        computed.append(({"x": x, "y": y} | result, rows))
    if dropped:  # (once: lm-study's baseline rows have no unit quality, for every pair)
        warn_dropped(args.table, dropped)
    if left_out:
        if not computed:
            raise ValueError(f"no (x, y) pair of {args.table} can be correlated: {'; '.join(left_out)}")
        logger.warning("left out %d of %d default pair(s): %s", len(left_out), len(pairs), "; ".join(left_out))
    return computed


def _bounds(interval: list[float]) -> str:
    """"[-0.912, -0.402]", or "–" for an interval not given (too few points)."""
    low, high = interval
    return "–" if math.isnan(low) else f"[{low:+.3f}, {high:+.3f}]"


def _check_outputs(args: argparse.Namespace, plots: list[Path | None]) -> Path | None:
    """Before anything is written: no output may be the input table (--out points.csv replaced lm-study's table),
    and a file named by --out or --plot is replaced only with --overwrite (the default plots beside the table are
    this command's own, made again by a rerun), or where a killed run of the command left its marker (returned:
    beside --out, else beside --plot; None without either)."""
    table = Path(args.table).resolve()
    named = [Path(args.out)] if args.out else []
    named += [plot for plot in plots if plot is not None and args.plot is not None]
    for path in [*named, *(plot for plot in plots if plot is not None)]:
        if path.resolve() == table:
            raise ValueError(f"{path} is the input table {args.table}: writing there would replace it; choose "
                             "another file")
    main = Path(args.out or args.plot) if (args.out or args.plot) else None
    marker = None if main is None else main.parent / f".{main.name}{CORRELATE_IN_PROGRESS}"
    for path in named:
        cli_types.check_new_output(path, overwrite=args.overwrite or (marker is not None and marker.exists()))
    return marker


CORRELATE_IN_PROGRESS = ".lm-correlate-in-progress"  # beside --out (else --plot) while they are written


def _lm_correlate(args: argparse.Namespace) -> int:
    from spidr.atomic_files import write_atomically
    from spidr.lm.correlate import correlations_csv, json_ready, plot_scatter

    computed = _correlated_pairs(args)
    marker = _check_outputs(args, [_plot_path(args, result["x"], result["y"], several=len(computed) > 1)
                                   for result, _ in computed])
    results = []
    # (several files: a rerun after a kill among them writes them again)
    with contextlib.nullcontext() if marker is None else marked_in_progress(marker.parent, marker.name):
        for result, rows in computed:
            plot = _plot_path(args, result["x"], result["y"], several=len(computed) > 1)
            if plot is not None:
                result["plot"] = str(plot_scatter(rows, result["x"], result["y"], plot, result=result))
            results.append(result)
        if args.out:
            write_atomically(args.out, correlations_csv(results))  # (its folder made with the marker)
    if args.json:
        ready = [json_ready(result) for result in results]  # an interval not given (too few points) is null
        print(json.dumps(ready[0] if len(ready) == 1 else ready, allow_nan=False))
        return 0
    print(f"{'y':<16}{'x':<16}{'n':>4}{'pearson r':>11}{'p':>10}{'spearman ρ':>12}{'p':>10}{'r 95% CI':>18}"
          f"{'ρ 95% CI':>18}")
    for result in results:
        print(f"{result['y']:<16}{result['x']:<16}{result['n']:>4}{result['pearson_r']:>+11.3f}"
              f"{result['pearson_p']:>10.2g}{result['spearman_rho']:>+12.3f}{result['spearman_p']:>10.2g}"
              f"{_bounds(result['pearson_r_ci95']):>18}{_bounds(result['spearman_rho_ci95']):>18}")
    for result in results:
        if "plot" in result:
            print(f"wrote {result['plot']}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lm-eval`` and ``lm-correlate`` to the ``spidr`` parser."""
    parser = subparsers.add_parser(
        "lm-eval",
        help="sWUGGY / sBLIMP / tSC / sSC accuracies of a ZeroSpeech-2021-style submission",
        description="Score SUBMISSION_DIR/{lexical,syntactic,tsc,ssc}/KIND.txt ('<stem> <score>' lines) against "
        "BENCH_DIR/{lexical,syntactic}/KIND/gold.csv and BENCH_DIR/{tsc,ssc}/KIND/ (gold.csv or "
        "{n}_{id}_{correct|incorrect}.wav names) as the ZeroSpeech 2021 toolkit (exactly, on its released sets): "
        "tie = 1/2, mean over voices per pair id, then over ids (several nonwords per word: their mean first, as "
        "BabySLM); in-vocab = the frequency bands other than oov. Scores are in percent "
        "(printed and in results.json; the --out score_*_by_*.csv tables keep the toolkit's fractions), with 95% "
        "bootstrap CIs over pair ids and binomial p-values against chance (also per breakdown row of 5 "
        "pairs or more: frequency band, syntactic type, ...); sBLIMP pairs that share a sentence count as one "
        "unit in both. A benchmark made with "
        "spidr synth-lm-bench --seen-voices also has lexical_seen/ (the lexical pairs spoken by training voices), "
        "reported as swuggy_seen_all / swuggy_seen_invocab. With --baseline ngram instead of SUBMISSION_DIR, the "
        "submissions are those of unigram and bigram models fitted on the benchmark's training set.",
        formatter_class=FORMATTER,
    )
    parser.add_argument("bench_dir", metavar="BENCH_DIR", help="benchmark root (lexical/, syntactic/, tsc/, ssc/)")
    parser.add_argument("submission_dir", metavar="SUBMISSION_DIR", nargs="?", default=None,
                        help="submission root with TASK/KIND.txt files (none with --baseline)")
    parser.add_argument("--baseline", choices=("ngram",), default=None,
                        help="instead of a submission, score unigram and bigram models (add-0.1, deduplicated "
                        "units, every training utterance) fitted on the benchmark's training set: the floor a unit "
                        "LM has to beat, and a check of the design (balanced nonwords put both near 50 %%)")
    parser.add_argument("--units", default=None, metavar="UNITS_DIR",
                        help="with --baseline: units in lm-units' layout (UNITS_DIR/train.jsonl, "
                        "UNITS_DIR/<task>/<split>.jsonl: a model's OUT/layer_LL of lm-units, or OUT with --oracle) "
                        "instead of the benchmark's own phone labels "
                        "(BENCH_DIR/train/frame_labels_20ms.jsonl, ...)")
    parser.add_argument("--kind", choices=("dev", "test"), default="dev", help="split to score")
    parser.add_argument("--json", action="store_true", help="print one JSON object (headline numbers + details; "
                        "with --baseline, one per model)")
    parser.add_argument("--out", default=None, help="also write score_*_by_*.csv tables and results.json here (with "
                        "--baseline: OUT/<model>/, with the model's submission)")
    parser.add_argument("--seed", type=cli_types.non_negative_int, default=0, help="seed of the bootstrap")
    parser.set_defaults(handler=_lm_eval)

    parser = subparsers.add_parser(
        "lm-correlate",
        help="Pearson / Spearman correlation of unit-quality and LM metrics across representations",
        description="Correlate metric columns of TABLE (a CSV with one row per model/layer; non-numeric columns "
        "are labels, and so are the numeric columns layer, K, V, units, num_units, vocab_size, codebook_size, "
        "num_clusters, clusters, hours, steps, step, seed, checkpoint (any case) and those of --label-columns; a "
        "row with an empty cell, or nan / n/a / na / none / null / -, in the chosen columns is dropped with a "
        "warning, other non-numbers and two rows with the same labels are errors). --x and --y take "
        "comma-separated lists: every (x, y) pair is computed. Spearman's p is exact (all n! pairings) up to 8 "
        "points and scipy's t approximation from 9 on (which says p = 0 for a perfect ρ on 3 points). Without "
        "--json, writes a scatter plot per pair.",
        formatter_class=FORMATTER,
    )
    parser.add_argument("table", metavar="TABLE", help="CSV table, e.g. model,layer,unit_abx_across,pnmi,swuggy_all "
                        "(lm-study writes one: points.csv)")
    parser.add_argument("--x", default=None,
                        help=f"x column(s): unit quality (default: {DEFAULT_QUALITY_COLUMNS}, lm-study's continuous "
                        "ABX, discrete ABX and PNMI; with a default list, pairs the table cannot give are left out "
                        "with a warning)")
    parser.add_argument("--y", default=None,
                        help=f"y column(s): LM accuracy (default: {DEFAULT_ACCURACY_COLUMNS})")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (a list of objects for several pairs); no plot unless --plot")
    parser.add_argument("--plot", default=None,
                        help="scatter plot path (default: TABLE's folder, <stem>_<y>_vs_<x>.png); with several "
                        "pairs, _<y>_vs_<x> is inserted before the suffix")
    parser.add_argument("--label-columns", default=None,
                        help="comma-separated numeric columns that also tell points apart (e.g. lr,dropout)")
    parser.add_argument("--out", default=None,
                        help="also write the results to this CSV, one row per (x, y) pair (x, y, n, pearson_r, "
                        "pearson_p, pearson_r_ci95_low/high, spearman_rho, spearman_p, spearman_rho_ci95_low/high, "
                        "slope, intercept)")
    parser.add_argument("--seed", type=cli_types.non_negative_int, default=0,
                        help="seed of the bootstrap CIs of r and ρ")
    cli_types.add_overwrite_option(parser)
    parser.set_defaults(handler=_lm_correlate)
