"""Subcommands of this area (see ``spidr.cli``): ``lm-units``, ``lm-train``, ``lm-score``, ``lm-study``.

(``lm-eval`` and ``lm-correlate`` live in ``spidr.lm.eval_commands``.)
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from spidr import cli_types
from spidr.help_format import SET_HELP, HelpFormatter
from spidr.models.commands import CHECKPOINT_HELP, add_loading_arguments, default_model_name, model_from_args
from spidr.training_stopped import EXIT_STOPPED

if TYPE_CHECKING:
    import torch

    from spidr.models.dinosr import DinoSR
    from spidr.models.student import Student

logger = logging.getLogger(__name__)

FORMATTER = HelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``spidr`` parser."""
    from spidr.corpus.lm_bench import SEEN_VOICES

    units = subparsers.add_parser(
        "lm-units",
        help="unit files of every set of a spoken-LM benchmark (train and test), from a model or the phone oracle",
        description="For BENCH_DIR/train and every BENCH_DIR/<task>/<split> folder (manifest.csv, else its wavs), "
        "write OUT/layer_LL/<set>.jsonl units of a model's layers (codebook arg-max, or k-means with --kmeans / "
        "--centroids; fitted centroids are kept as OUT/layer_LL/centroids.safetensors), or with --oracle "
        "OUT/<set>.jsonl holding the sets' 20 ms phone labels. A model's units resume set by set: OUT/.lm-units.json "
        "records what they are made from and the finished sets; a rerun with the same inputs skips those, one "
        "with other inputs (weights, layers, dtype, units, the sets' files) is refused once a set is finished (a "
        "folder where none was finished yet is begun again). A training file that gives "
        "no units (unreadable, or shorter than one frame) is left out with a warning; a test file is an error, since "
        "a submission needs a score for each.",
        formatter_class=FORMATTER,
    )
    units.add_argument("bench_dir", metavar="BENCH_DIR", help="benchmark folder (spidr synth-lm-bench)")
    units.add_argument("out", metavar="OUT", help="output folder")
    source = units.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help=f"SpidR / DinoSR model: {CHECKPOINT_HELP}")
    source.add_argument("--oracle", action="store_true", help="gold phone labels instead of a model's units")
    units.add_argument("--layers", default=None, help="1-based layers, e.g. 6 or 3-6 (default: every head's layer)")
    units.add_argument("--kmeans", type=cli_types.non_negative_int, default=0, metavar="K",
                       help="k-means units with K centroids fitted on the training set (0: codebook units)")
    units.add_argument("--centroids", action="append", default=[], metavar="LAYER=FILE",
                       help="k-means centroids of a layer from 'spidr kmeans' (repeatable); without --layers, "
                       "the layers given here are the layers written")
    units.add_argument("--random-init", action="store_true",
                       help="use the checkpoint's architecture at random initialisation (seeded by --seed)")
    units.add_argument("--seed", type=cli_types.non_negative_int, default=0,
                       help="seed of k-means and of --random-init")
    add_loading_arguments(units)
    units.add_argument("--device", type=cli_types.device, default="auto", help=cli_types.DEVICE_HELP)
    units.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                       help="bfloat16 runs the Transformer layers under bf16 autocast, the front end and "
                       "positional convs in float32")
    units.set_defaults(handler=_units)

    train = subparsers.add_parser(
        "lm-train",
        help="train a unit language model (LSTM, GPT/OPT-shaped Transformer or n-gram) from a TOML config",
        description="Train on units (spidr extract --codebooks / spidr units / spidr lm-units JSONL) or frame labels "
        "(the phone oracle). Resumes exactly from the latest checkpoint in <workdir>/<name>. Several processes: "
        "torchrun --nproc-per-node N -m spidr lm-train CONFIG. Exit status: 0 done, 1 diverged, 2 when the config or "
        "data are refused (or the run folder holds another run), 3 stopped by a signal (SIGTERM/SIGUSR1/SIGUSR2, or "
        "Ctrl-C: a second one stops at once, unsaved) after saving a checkpoint.",
        formatter_class=FORMATTER,
    )
    train.add_argument("config", help="LM config (.toml or .json), e.g. configs/lm-lstm.toml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help=SET_HELP)
    train.set_defaults(handler=_train, several_processes=True)  # (torchrun, srun: spidr.cli)

    score = subparsers.add_parser(
        "lm-score",
        help="score every test item with a trained unit LM; writes ZeroSpeech 2021 submission files",
        description="Read UNITS_DIR/<task>/<split>.jsonl (task lexical, syntactic, tsc, ssc or lexical_seen) and "
        "write SUBMISSION_DIR/<task>/<split>.txt ('<stem> <score>' per item) plus scores.jsonl with both "
        "normalisations.",
        formatter_class=FORMATTER,
    )
    score.add_argument("checkpoint", metavar="CKPT", help="LM checkpoint (<run dir>/final.pt)")
    score.add_argument("units_dir", metavar="UNITS_DIR", help="folder of <task>/<split>.jsonl units files")
    score.add_argument("submission", metavar="SUBMISSION_DIR", help="output folder")
    score.add_argument("--norm", choices=["mean", "sum"], default="mean",
                       help="log-likelihood per predicted token (the paper's choice) or summed")
    score.add_argument("--batch-tokens", type=cli_types.positive_int, default=32768,
                       help="padded tokens per scoring batch")
    score.add_argument("--device", type=cli_types.device, default="auto", help=cli_types.DEVICE_HELP)
    score.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                       help="bfloat16 runs the LM under autocast")
    cli_types.add_overwrite_option(score)
    score.set_defaults(handler=_score)

    study = subparsers.add_parser(
        "lm-study",
        help="the spoken-LM study on the synthetic benchmark: unit LMs per (model, layer), accuracies, correlation",
        description="Synthesise (or reuse) the spoken-LM benchmark in OUT/bench, write the units of each "
        "checkpoint's layers (--layers, default every layer with a codebook head; codebook units, or k-means units "
        "with --kmeans), train one unit LM per (model, layer) plus the phone-oracle topline and a "
        "phone-bigram baseline, score sWUGGY / sBLIMP / tSC, measure unit quality (PNMI, ABX of units and of "
        "features) on the benchmark and correlate it with LM accuracy: OUT/spoken_lm.md, spoken_lm.json, "
        "points.csv, plots.",
        formatter_class=FORMATTER,
    )
    study.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]CKPT",
                       help="a SpidR / DinoSR model, optionally named: NAME ends at the first '=' unless the whole "
                       f"text is an existing path (repeatable): {CHECKPOINT_HELP}")
    study.add_argument("--layers", default=None,
                       help="1-based layers (default: every head's layer; layers without a head need --kmeans)")
    study.add_argument("--kmeans", type=cli_types.non_negative_int, default=0, metavar="K",
                       help="k-means units with K centroids per layer fitted on the benchmark's training set, for "
                       "any layer (0: codebook units, head layers only)")
    study.add_argument("--random-init", action="store_true",
                       help="add the first checkpoint's architecture at random initialisation (seed 0)")
    study.add_argument("--out", required=True, help="output folder (the benchmark goes in OUT/bench)")
    study.add_argument("--train-utterances", type=cli_types.positive_int, default=None,
                       help="LM training utterances of the benchmark")
    study.add_argument("--syntactic-pairs", type=cli_types.non_negative_int, default=None,
                       help="minimal pairs per syntactic type")
    study.add_argument("--tsc-pairs", type=cli_types.non_negative_int, default=None, help="tSC story pairs")
    study.add_argument("--lexical-words", type=cli_types.non_negative_int, default=None,
                       help="only this many vocabulary words (and a quarter as many OOV words) in the lexical task")
    study.add_argument("--seen-voices", default=",".join(SEEN_VOICES),
                       help="training voices that also speak the lexical pairs (sWUGGY on voices the LM heard: did "
                       "it learn words at all, whatever its units do on a new voice); '' for none")
    study.add_argument("--kind", choices=["dev", "test"], default="dev", help="split to score")
    study.add_argument("--lm-config", default=None, help="LM config (default: the built-in LSTM of "
                       "configs/lm-lstm.toml)")
    study.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help=SET_HELP + "; applied to every LM")
    add_loading_arguments(study, every=" (for every --checkpoint)")
    study.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                       help="bfloat16 extracts units with the speech models' Transformer layers in bf16 "
                       "(front end and positional convs in float32)")
    study.add_argument("--jobs", type=cli_types.positive_int, default=None,
                       help="synthesis processes (default: all CPUs)")
    study.set_defaults(handler=_study)


def _units(args: argparse.Namespace) -> int:
    from spidr.lm.bench_units import write_oracle_units

    if args.oracle:
        written = write_oracle_units(args.bench_dir, args.out)
        print(f"wrote oracle phone labels of {len(written)} sets to {args.out}")
        return 0

    from spidr.eval.kmeans import load_centroids, save_centroids
    from spidr.folder_lock import folder_lock
    from spidr.lm.bench_units import (
        CENTROIDS_FILE,
        begin_units_folder,
        fit_centroids,
        read_benchmark,
        set_row_names,
        units_folder_identity,
        write_model_units,
    )
    from spidr.models.build import random_init_model

    model = model_from_args(args.checkpoint, args)
    if args.random_init:
        model = random_init_model(model.cfg, seed=args.seed)
    model = model.to(args.device).eval()
    origin = _features_origin(args, model)
    layers, centroids = _unit_layers(args, model, origin)
    sets = read_benchmark(Path(args.bench_dir).resolve())  # once: a scan warns about each unreadable file
    train = sets.get("train")
    if args.kmeans and train is None:
        raise ValueError(f"--kmeans fits on {args.bench_dir}/train, which does not exist; pass --centroids")
    set_row_names(sets)  # (a test set of repeated ids is refused before OUT records anything)
    identity = units_folder_identity(model, args.bench_dir, layers=layers, dtype=args.dtype, kmeans=args.kmeans,
                                     seed=args.seed, given_centroids=centroids, sets=sets)
    # One run per OUT from here: two would both resume from its record and write the same sets side by side.
    with folder_lock(args.out, f"lm-units into {args.out}"):
        finished = begin_units_folder(args.out, identity)  # None: begun now
        fitted = {layer: Path(args.out) / f"layer_{layer:02d}" / CENTROIDS_FILE
                  for layer in layers if layer not in centroids} if args.kmeans else {}
        if fitted:  # the layers --centroids left to --kmeans
            missing = [str(path) for path in fitted.values() if not path.is_file()]
            if finished and missing:  # units of finished sets came from centroids that are gone: a refit may differ
                raise ValueError(f"{args.out} has finished sets whose k-means centroids are missing "
                                 f"({', '.join(missing)}); delete {args.out} to start again")
            if finished is not None and not missing:
                centroids |= {layer: load_centroids(path) for layer, path in fitted.items()}  # this run's, resumed
            else:
                centroids |= fit_centroids(model, train.entries, list(fitted),
                                           num_units=args.kmeans, seed=args.seed, dtype=args.dtype)
                for layer, path in fitted.items():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_centroids(path, centroids[layer], metadata={"layer": layer, "kmeans": args.kmeans,
                                                                     "seed": args.seed, "bench": str(args.bench_dir),
                                                                     **origin})
        written = write_model_units(model, args.bench_dir, args.out, layers=layers, centroids=centroids or None,
                                    dtype=args.dtype, identity=identity, sets=sets)
    print(f"{len(written)} units files (layers {', '.join(map(str, layers))}) in {args.out}"
          + (f" ({len(finished)} set(s) kept from an earlier run)" if finished else ""))
    return 0


def _features_origin(args: argparse.Namespace, model: DinoSR | Student) -> dict[str, str]:
    """What centroids record of the features ``lm-units`` assigns (``spidr.eval.kmeans.features_origin``): every
    layer's output before its residual add, as ``spidr extract`` takes it by default."""
    from spidr.eval.journal import features_fingerprint
    from spidr.eval.kmeans import features_origin

    return features_origin(fingerprint=features_fingerprint(model), before_residual=True, checkpoint=(
        f"{args.checkpoint}, randomly initialised" if args.random_init else str(args.checkpoint)))


def _unit_layers(args: argparse.Namespace, model: DinoSR | Student, origin: dict[str, str],
                 ) -> tuple[tuple[int, ...], dict[int, torch.Tensor]]:
    """``lm-units``' layers and the ``--centroids`` given for some of them (layer → centroids), checked."""
    from spidr.eval.features import parse_layers
    from spidr.eval.kmeans import check_centroids_fit, load_centroids

    heads = model.head_layers
    centroids = {}
    for text in args.centroids:
        layer, _, path = text.partition("=")
        if not layer.strip().isdigit() or not path:
            raise ValueError(f"--centroids {text!r} must look like LAYER=FILE, e.g. 6=centroids.safetensors")
        centroids[int(layer)] = load_centroids(path)
        check_centroids_fit(path, int(layer), where=f"--centroids {text}", origin=origin)
        if centroids[int(layer)].shape[1] != model.cfg.encoder_embed_dim:  # before the folder records them
            raise ValueError(f"--centroids {text}: centroids of dimension {centroids[int(layer)].shape[1]}, but "
                             f"layer {int(layer)}'s features have dimension {model.cfg.encoder_embed_dim}: centroids "
                             "of another model?")
    if args.layers is None and centroids:  # the centroids' layers, not every head's (their units would be mixed in)
        layers = parse_layers(",".join(map(str, sorted(centroids))), model.num_layers)
    elif args.layers is None and not heads:
        raise ValueError(f"checkpoint {args.checkpoint} has no codebook head: pass --layers, with --kmeans K or "
                         "--centroids for k-means units")
    else:
        layers = parse_layers(args.layers or f"{heads[0]}-{heads[-1]}", model.num_layers)
    unused = sorted(set(centroids) - set(layers))
    if unused:  # they were ignored, yet recorded as the folder's input
        raise ValueError(f"--centroids for layer(s) {unused}, which --layers {args.layers} leaves out")
    headless = [layer for layer in layers if layer not in heads and layer not in centroids]
    if headless and not args.kmeans:  # refused before the folder records these inputs as its own
        raise ValueError(f"layer(s) {headless} have no codebook head (heads: {list(heads)}): give --kmeans K or "
                         "--centroids for them")
    return layers, centroids


def _train(args: argparse.Namespace) -> int:
    from spidr.lm.config import load_lm_config
    from spidr.lm.train import LmTrainingDivergedError, train_lm

    cfg = load_lm_config(args.config, args.overrides)
    try:
        outcome = train_lm(cfg)
    except LmTrainingDivergedError as error:
        logger.error("%s", error)
        return 1
    if outcome == "completed":
        if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
            print(f"trained LM: {Path(cfg.run.run_dir) / 'final.pt'}")
        return 0
    return EXIT_STOPPED


def _score(args: argparse.Namespace) -> int:
    from spidr.lm.score import IN_PROGRESS, find_unit_files, layer_folders_hint, score_benchmark

    inputs = find_unit_files(args.units_dir)
    hint = "" if inputs else layer_folders_hint(args.units_dir)
    if hint:
        raise ValueError(f"no units file to score in UNITS_DIR: {hint}")
    # (an lm-score run killed or failed: redone)
    cli_types.check_new_output(args.submission, overwrite=args.overwrite, unfinished_marker=IN_PROGRESS)
    counts = score_benchmark(args.checkpoint, inputs, args.submission, norm=args.norm,
                             device=args.device, batch_tokens=args.batch_tokens, dtype=args.dtype)
    for name, count in counts.items():
        print(f"{name}: {count} items")
    print(f"submission written to {args.submission}")
    return 0


def _study_layers(path: str, model: torch.nn.Module, text: str | None, *, kmeans: int) -> tuple[int, ...]:
    """The layers ``--layers`` names (default: the head layers) for the checkpoint at ``path``, checked now: codebook
    units come from the prediction heads only, and the study would otherwise find it out after synthesising the
    benchmark and training its phone LMs."""
    from spidr.eval.features import parse_layers

    heads = list(model.head_layers)
    if text is None and not heads:
        raise ValueError(f"checkpoint {path} has no codebook head: pass --layers, with --kmeans K for k-means units")
    layers = parse_layers(text or f"{heads[0]}-{heads[-1]}", model.num_layers)
    headless = [layer for layer in layers if layer not in heads]
    if headless and not kmeans:
        raise ValueError(f"--layers {text}: layer(s) {headless} of checkpoint {path} have no codebook head (heads: "
                         f"{heads or 'none'}); choose head layers, or pass --kmeans K for k-means units")
    return layers


def _named_checkpoint(text: str) -> tuple[str, str]:
    """``--checkpoint [NAME=]CKPT`` as (NAME or "", CKPT): a path that exists is taken whole, whatever '=' it
    holds (sweep folders are named like ``lr=1e-4``); otherwise NAME ends at the first '='."""
    if "=" not in text or Path(text).exists():
        return "", text
    name, _, path = text.partition("=")
    return name, path


def _study(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from spidr.corpus.lm_bench import LmBenchSettings
    from spidr.lm.study import StudyModel, StudySettings, run_study
    from spidr.models.build import random_init_model

    models = []
    for text in args.checkpoint:
        name, path = _named_checkpoint(text)
        model = model_from_args(path, args).eval()
        layers = _study_layers(path, model, args.layers, kmeans=args.kmeans)
        models.append(StudyModel(name or default_model_name(path), model, layers))
    if args.random_init:
        first = models[0]
        models.append(StudyModel(f"{first.name} (random init)", random_init_model(first.model.cfg), first.layers))
    sizes = {key: value for key, value in (("train_utterances", args.train_utterances),
                                             ("syntactic_pairs_per_type", args.syntactic_pairs),
                                             ("tsc_pairs", args.tsc_pairs),
                                             ("max_lexical_words", args.lexical_words)) if value is not None}
    seen_voices = tuple(name.strip() for name in args.seen_voices.split(",") if name.strip())
    bench = replace(LmBenchSettings(), splits=(args.kind,), seen_voices=seen_voices, **sizes)
    settings = StudySettings(bench=bench, lm_config=Path(args.lm_config) if args.lm_config else None,
                             lm_overrides=tuple(args.overrides), kind=args.kind, jobs=args.jobs, kmeans=args.kmeans,
                             dtype=args.dtype)
    report = run_study(models, args.out, settings)
    print(report.read_text(encoding="utf-8"))
    print(f"report: {report}")
    return 0
