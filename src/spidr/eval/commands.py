"""Subcommands of this area (see ``spidr.cli``): ``abx``, ``units-quality``, ``kmeans``, ``units``, ``items`` and
``compare-reports``."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spidr.cli_types import add_overwrite_option, check_new_output, non_negative_int, positive_float, positive_int
from spidr.help_format import HelpFormatter
from spidr.in_progress import marked_in_progress

logger = logging.getLogger(__name__)

# The frame distances of spidr.eval.abx_frames.DISTANCES (spelled out: the CLI must not import torch).
ABX_DISTANCES = ("angular", "cosine", "euclidean", "kl_symmetric", "identical")
# What every command taking phone alignments reads (spidr.eval.unit_quality.read_alignments)
ALIGNMENTS_HELP = ("alignment .jsonl, .tsv, .txt or .TextGrid file (.gz ok), or a folder of .TextGrid files (the "
                   "Montreal Forced Aligner's output)")


def add_abx_options(parser: argparse.ArgumentParser, *, distance_default: str | None,
                    seed_help: str = "seed of the subsampling") -> None:
    """The ABX options shared by ``spidr abx`` and ``spidr evaluate``: one declaration, the same choices."""
    parser.add_argument("--context", choices=("within", "any"), default="within",
                        help="context condition ('within' for triphone items)")
    parser.add_argument("--distance", choices=ABX_DISTANCES, default=distance_default,
                        help="frame distance" + (" (default: angular for features, identical for units)"
                                                 if distance_default is None else ""))
    parser.add_argument("--max-size-group", type=int, default=10,
                        help="at most this many items per (phone, context, speaker) group; negative disables")
    parser.add_argument("--max-x-across", type=int, default=5,
                        help="at most this many X speakers per A group (across speaker); negative disables")
    parser.add_argument("--seed", type=non_negative_int, default=0, help=seed_help)


def _names_units_file(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith((".jsonl", ".ndjson"))


def _is_units_file(path: Path) -> bool:
    return path.is_file() and _names_units_file(path)


def _rate_text(text: str) -> str:
    """``--frequency``: a positive number, kept as written (the rate text an extraction records is compared)."""
    positive_float(text)
    return text.strip()


def frame_rate_option(given: str | int | None, source: Path, option: str) -> str:
    """The frame rate to use for ``source``, as text: the one its extraction's metadata.json records, which
    ``given`` (the option's value) must agree with; ``given`` or 50 Hz when there is no metadata."""
    from spidr.eval.feature_dir import extraction_frame_rate

    recorded = extraction_frame_rate(source)
    if recorded is None:
        if given is None:  # a 100 Hz model's units read at 50 Hz misplace every item, and no check can tell
            logger.warning("no frame rate is recorded for %s (no record beside it, nor the metadata.json of the "
                           "extraction that holds it, as spidr extract, units and lm-units write): assuming 50 Hz; "
                           "give %s if it is another", source, option)
            return "50"
        return str(given)
    rate, metadata = recorded
    text = f"{rate:g}"
    if given is not None and float(given) != rate:
        raise ValueError(f"{option} {given} Hz, but {metadata} records {text} Hz for {source}; leave {option} out")
    return text


def _abx(args: argparse.Namespace) -> int:
    from spidr.eval.abx import abx
    from spidr.eval.feature_dir import StemKeyed, audio_root, one_layer_directory, skipped_stems
    from spidr.eval.units import read_units

    source = Path(args.features)
    if _is_units_file(source):
        features = StemKeyed(read_units(source), source=source, skipped=skipped_stems(source),
                             root=audio_root(source))
        distance = args.distance or "identical"
        if distance != "identical":
            raise ValueError(f"{source} holds discrete units: use --distance identical, not {distance!r}")
    elif source.is_dir():
        features = StemKeyed(one_layer_directory(source), skipped=skipped_stems(source), root=audio_root(source))
        distance = args.distance or "angular"
    else:
        raise ValueError(f"FEATURES {source} is neither a directory of .npy/.pt files nor a units .jsonl file")
    frequency = frame_rate_option(args.frequency, source, "--frequency")
    result = abx(
        features,
        args.item_file,
        speaker=args.speaker,
        context=args.context,
        distance=distance,
        frequency=frequency,
        max_size_group=args.max_size_group,
        max_x_across=args.max_x_across,
        seed=args.seed,
        librilight_bug=args.librilight_bug,
    )
    percent = 100.0 * result.error_rate
    pairs = _worst_first(result.pair_error_rates) if args.by_pair else []
    speakers = _worst_first(result.speaker_error_rates) if args.by_speaker else []
    if args.json:
        print(json.dumps({
            "abx_error_rate": percent,
            "speaker": args.speaker,
            "context": args.context,
            "distance": distance,
            "frequency_hz": float(frequency),
            "cells": result.num_cells,
            "triplets": result.num_triplets,
            "phone_pairs": result.num_pairs,
            "items": result.num_items,
            **({"by_pair": [{"a": a, "b": b, "abx_error_rate": 100.0 * error} for (a, b), error in pairs]}
               if args.by_pair else {}),
            **({"by_speaker": [{"speaker": speaker, "abx_error_rate": 100.0 * error} for speaker, error in speakers]}
               if args.by_speaker else {}),
        }))
    else:
        print(f"ABX error rate: {percent:.3f}% ({args.speaker} speaker, {args.context} context, {distance}; "
              f"{result.num_cells} cells, {result.num_triplets} triplets)")
        if args.by_pair:
            print(f"\n{result.num_pairs} (A, B) phone pairs (A: the phone of A and X), worst first:\n"
                  "A\tB\tABX error rate %")
            for (a, b), error in pairs:
                print(f"{a}\t{b}\t{100.0 * error:.3f}")
        if args.by_speaker:
            print(f"\n{len(speakers)} speakers (of A and B), worst first:\nspeaker\tABX error rate %")
            for speaker, error in speakers:
                print(f"{speaker}\t{100.0 * error:.3f}")
    return 0


def _worst_first(error_rates: Mapping[Any, float]) -> list[tuple[Any, float]]:
    """``error_rates``' items, highest error rate first; ties in the order of their keys (phones, speakers)."""
    return sorted(error_rates.items(), key=lambda item: (-item[1], item[0]))


def _units_quality(args: argparse.Namespace) -> int:
    from spidr.eval.feature_dir import audio_root, recorded_num_units, skipped_stems
    from spidr.eval.unit_quality import read_alignments, unit_quality
    from spidr.eval.units import read_units
    from spidr.input_files import existing_file

    # (first: a mistyped name or a folder was told it lacked a recorded rate and vocabulary size)
    existing_file(args.units, "units file", hint="give one units .jsonl file (e.g. OUT/codebook_units/layer_06.jsonl)")
    unit_rate = float(frame_rate_option(args.unit_rate, Path(args.units), "--unit-rate"))
    if not unit_rate.is_integer():
        raise ValueError(f"unit rate {unit_rate:g} Hz: units-quality needs an integer rate")
    num_units = args.num_units
    recorded = recorded_num_units(args.units)
    if recorded is not None:
        if num_units is not None and num_units != recorded[0]:
            raise ValueError(f"--num-units {num_units}, but {recorded[1]} records {recorded[0]} units for "
                             f"{args.units}; leave --num-units out")
        num_units = recorded[0]
    if num_units is None:  # the bitrate's log2(num_units) would be a guess
        raise ValueError(f"no unit vocabulary size is recorded for {args.units} (units written by another tool or an "
                         "older spidr): give --num-units (k of k-means, the codebook size)")
    metrics = unit_quality(
        read_units(args.units),
        read_alignments(args.alignments, alignment_rate_hz=args.alignment_rate, keep_stress=args.keep_stress),
        unit_rate_hz=int(unit_rate),
        alignment_rate_hz=args.alignment_rate,
        num_units=num_units,
        skipped=skipped_stems(args.units),
        root=audio_root(args.units),
    )
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            print(f"{name:>20}: {value:.6g}" if isinstance(value, float) else f"{name:>20}: {value}")
    return 0


def _kmeans(args: argparse.Namespace) -> int:
    from spidr.eval.feature_dir import one_layer_directory, recorded_features_origin
    from spidr.eval.kmeans import features_layer, fit_kmeans, sample_frames, save_centroids

    out = check_new_output(args.out, overwrite=args.overwrite)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end in .safetensors")
    max_frames = args.max_frames if args.max_frames > 0 else None
    frames = sample_frames(one_layer_directory(args.features_dir), max_frames=max_frames, seed=args.seed)
    centroids = fit_kmeans(frames, args.num_units, seed=args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"num_units": str(args.num_units), "seed": str(args.seed), "num_frames": str(frames.shape[0]),
                "features": str(args.features_dir)}
    layer = features_layer(args.features_dir)
    if layer is not None:  # (checked where the centroids are applied: another layer's would pass unnoticed)
        metadata["layer"] = str(layer)
    # (checked likewise: centroids of another model's features, or of the other side of the residual add)
    metadata |= recorded_features_origin(args.features_dir)
    save_centroids(out, centroids, metadata=metadata)
    print(f"wrote {args.num_units} centroids of dimension {centroids.shape[1]} (fitted on {frames.shape[0]} frames) "
          f"to {out}")
    return 0


def _units(args: argparse.Namespace) -> int:
    from spidr.atomic_files import write_atomically
    from spidr.eval.feature_dir import (
        StemKeyed,
        audio_root,
        extraction_frame_rate,
        one_layer_directory,
        recorded_features_origin,
        skipped_stems,
        units_metadata_path,
    )
    from spidr.eval.kmeans import (
        assign_directory,
        centroids_digest,
        check_centroids_fit,
        features_layer,
        load_centroids,
    )
    from spidr.eval.units import write_units

    # Named by utterance id (the file stem, as codebook units, alignments and item files name them) when unique:
    # unique among the files written and those the extraction skipped, as spidr extract --kmeans names them.
    if not _names_units_file(Path(args.out)):  # (the units' readers know the file by its extension)
        raise ValueError(f"--out {args.out} must end in .jsonl, or .jsonl.gz to compress: the format spidr units "
                         "writes")
    skipped, root = skipped_stems(args.features_dir), audio_root(args.features_dir)
    features = StemKeyed(one_layer_directory(args.features_dir), skipped=skipped, root=root)
    centroids = load_centroids(args.centroids)
    layer = features_layer(args.features_dir)
    check_centroids_fit(args.centroids, layer, where=f"--centroids for {args.features_dir}",
                        origin=recorded_features_origin(args.features_dir))
    out = check_new_output(args.out, overwrite=args.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    rate = extraction_frame_rate(args.features_dir)  # before anything is written: a failure leaves no units file
    units = assign_directory(features, centroids, centroids_name=f"the centroids of {args.centroids}")
    record = {
        "frame_rate_hz": None if args.dedup or rate is None else rate[0],  # None: unknown, or no rate left (dedup)
        "num_units": int(centroids.shape[0]),
        "dedup": args.dedup,
        "features": str(args.features_dir),
        "centroids": str(args.centroids),
        "layer": layer,  # (what lm-score checks test units against the LM's training units by: units_origin)
        "units_source": centroids_digest(centroids),
        # (so that the units' readers find names as the features' readers do)
        "skipped_stems": sorted(skipped),
        "audio_root": root,
    }
    record_path = units_metadata_path(out)

    def write_record(complete: Path, count: int) -> None:  # before the units file is renamed into place
        record.update(num_utterances=count, units_file_bytes=complete.stat().st_size)  # (a units file written
        # over since is not described). An earlier units file (--overwrite) goes first: killed between the two
        # renames, it stood under this record, which names other centroids (same size: same k, same frames).
        out.unlink(missing_ok=True)
        write_atomically(record_path, json.dumps(record, indent=2) + "\n")

    count = write_units(out, units, dedup=args.dedup, before_rename=write_record)
    rate_text = "rate unknown" if record["frame_rate_hz"] is None else f"{record['frame_rate_hz']:g} Hz"
    print(f"wrote units of {count} utterances to {out}{' (deduplicated)' if args.dedup else ''}; "
          f"{record['num_units']} units, {rate_text} (recorded in {record_path})")
    return 0


def _compare_reports(args: argparse.Namespace) -> int:
    from spidr.eval.report import merge_reports, read_report, read_report_settings, settings_differences, write_report

    out = Path(args.out)
    for report in map(Path, args.reports):
        folder = report.parent if report.suffix == ".json" else report
        if out.resolve() == folder.resolve():  # even with --overwrite: the evaluation itself would be lost
            raise ValueError(f"--out {out} is the folder of the input report {report}; writing there would replace "
                             "it: choose another folder")
    check_new_output(out, overwrite=args.overwrite, unfinished_marker=COMPARE_IN_PROGRESS)
    names = args.name or [_report_name(Path(path)) for path in args.reports]
    if len(names) != len(args.reports):
        raise ValueError(f"--name was given {len(names)} times for {len(args.reports)} reports; give it once per "
                         "report, in the same order, or not at all")
    rows = merge_reports([(name, read_report(path)) for name, path in zip(names, args.reports, strict=True)])
    settings = [(name, read_report_settings(path)) for name, path in zip(names, args.reports, strict=True)]
    differences = settings_differences(settings)
    for line in differences:
        logger.warning("the reports were not measured alike: %s", line)
    sources = [f"{name}: {path}" for name, path in zip(names, args.reports, strict=True)]
    notes = ["Reports: " + "; ".join(sources) + ". ABX error rates in %."]
    if differences:
        notes += ["", "**The reports were not measured alike**, so their scores are not comparable as such:", "",
                  *[f"- {line}" for line in differences]]
    elif settings[0][1] is not None:
        notes.append("Every report was measured alike (ABX condition, item file, alignments, test utterances, dtype).")
    else:
        notes.append("These reports do not record their settings: compare only reports made on the same test set "
                     "with the same settings.")
    common = settings[0][1] if not differences and all(found is not None for _, found in settings) else None
    with marked_in_progress(out, COMPARE_IN_PROGRESS):  # (a killed run's folder is written again by its rerun)
        path = write_report(rows, out, title="Comparison of evaluation reports", notes=notes, settings=common)
    print(path.read_text(encoding="utf-8"))
    print(f"comparison written to {path}")
    return 0


COMPARE_IN_PROGRESS = ".compare-reports-in-progress"


def _report_name(path: Path) -> str:
    """A report's default name: its folder's name (``runs/a/report.json`` and ``runs/a`` are both ``a``)."""
    return (path.parent if path.suffix == ".json" else path).resolve().name


def _items(args: argparse.Namespace) -> int:
    from spidr.eval.item_writer import DEFAULT_SPEAKER_PATTERN, interval_speakers, write_item_file
    from spidr.eval.unit_quality import read_alignments

    if Path(args.out).suffix != ".item":  # (abx, evaluate and probe read an item file's format by its extension)
        raise ValueError(f"--out {args.out} must end in .item, the format spidr items writes")
    out = check_new_output(args.out, overwrite=args.overwrite)
    alignments = read_alignments(args.alignments, alignment_rate_hz=args.alignment_rate, keep_stress=args.keep_stress)
    speakers = interval_speakers(args.alignments) if args.speaker_pattern is None else None
    count = write_item_file(out, alignments, alignment_rate_hz=args.alignment_rate, kind=args.kind,
                            speaker_pattern=args.speaker_pattern or DEFAULT_SPEAKER_PATTERN, speakers=speakers)
    print(f"wrote {count} {args.kind} items of {len(alignments)} utterances to {out}")
    return 0


def _register_items(subparsers: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    from spidr.eval.item_writer import DEFAULT_SPEAKER_PATTERN, KINDS

    parser = subparsers.add_parser(
        "items",
        help="ABX item files (triphone or phoneme) from your own phone alignments",
        description="Write an ABX item file (#file onset offset #phone prev-phone next-phone speaker, the ZeroSpeech "
        "2021 / Libri-light layout) from frame-level phone alignments: one item per phone whose neighbours and "
        "itself are speech. triphone items span the previous, centre and next phones (score them with --context "
        "within); phoneme items span the centre phone. The speaker of an utterance is the speaker column of an "
        "interval TSV whose header names one, or the folder holding its TextGrid where ALIGNMENTS is a folder of "
        "speaker folders (the Montreal Forced Aligner's OUT/<speaker>/<utterance>.TextGrid; in LibriSpeech's "
        "OUT/<speaker>/<chapter>/ layout, the folder above that the name begins with), else the first group of "
        "--speaker-pattern in its name.",
        formatter_class=formatter,
    )
    parser.add_argument("alignments", metavar="ALIGNMENTS", help=ALIGNMENTS_HELP)
    parser.add_argument("--out", required=True, help="item file to write (.item)")
    parser.add_argument("--kind", choices=KINDS, default="triphone", help="what an item spans")
    parser.add_argument("--alignment-rate", type=positive_int, default=100, help="alignment frame rate in Hz")
    parser.add_argument("--speaker-pattern", default=None,
                        help="regular expression whose first group, searched in an utterance's name, is its speaker "
                        "(default: the fifth column of an interval TSV whose header names it speaker, as "
                        "synth-corpus's alignments.tsv, or the folder holding each TextGrid of a folder of speaker "
                        f"folders; else {DEFAULT_SPEAKER_PATTERN!r}, the name up to its first - or _, LibriSpeech's "
                        "speaker)")
    parser.add_argument("--keep-stress", action="store_true",
                        help="keep ARPAbet stress digits as phones of their own (AH0, AH1; by default they are "
                        "removed, as fairseq's PNMI does)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(handler=_items)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``spidr`` parser."""
    formatter = HelpFormatter

    parser = subparsers.add_parser(
        "abx",
        help="ABX phone discriminability error rate (fastabx / ZeroSpeech 2021 semantics)",
        description="Compute the ABX error rate of per-utterance features on an item file. FEATURES is a directory "
        "of .npy/.pt (T, D) files (one layer's folder of a spidr extract run) or a units JSONL file "
        '({"name" or "audio": ..., "units": [...]}, compared with the identical distance). An item\'s #file is '
        "the feature file's path relative to FEATURES without extension, or its utterance id (the file stem) when "
        "no two files share one. A layer folder of an unfinished spidr extract run (no metadata.json yet) is "
        "refused.",
        formatter_class=formatter,
    )
    parser.add_argument("features", metavar="FEATURES", help="feature directory or units .jsonl(.gz) file")
    parser.add_argument("item_file", metavar="ITEM_FILE", help="item file (.item, .csv or .jsonl)")
    parser.add_argument("--speaker", choices=("within", "across"), default="within", help="speaker condition")
    add_abx_options(parser, distance_default=None)
    parser.add_argument("--frequency", type=_rate_text,
                        help="feature rate in Hz (default: the rate recorded by the spidr extract or "
                        "spidr units run that wrote FEATURES, else 50)")
    parser.add_argument("--librilight-bug", action="store_true",
                        help="slice items as Libri-light / ZeroSpeech 2021 did, dropping each item's last frame")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a sentence")
    parser.add_argument("--by-pair", action="store_true",
                        help="also give the error rate of each (A, B) phone pair, the pairs the error rate averages, "
                        "worst first: a table after the sentence, or by_pair in the JSON object")
    parser.add_argument("--by-speaker", action="store_true",
                        help="also give each speaker's error rate on its own cells (across speaker: the speaker of "
                        "A and B), worst first: a table, or by_speaker in the JSON object")
    parser.set_defaults(handler=_abx)

    _register_items(subparsers, formatter)

    parser = subparsers.add_parser(
        "units-quality",
        help="phone purity, cluster purity, PNMI, perplexity, active codewords and bitrate of discrete units",
        description="Compare discrete units with frame-level phone alignments (SpidR JSONL with one label per "
        "frame, a TSV of utterance<TAB>onset<TAB>offset<TAB>phone intervals in seconds, Libri-light's text of "
        "one line of frame labels per utterance, or Praat TextGrids: one .TextGrid file, or a folder of them, the "
        "Montreal Forced Aligner's output, whose phones tier is read as that TSV, its silences (empty, sil, sp) as "
        "SIL; .gz read transparently).",
        formatter_class=formatter,
    )
    parser.add_argument("units", metavar="UNITS", help="units .jsonl(.gz) file")
    parser.add_argument("alignments", metavar="ALIGNMENTS", help=ALIGNMENTS_HELP)
    parser.add_argument("--alignment-rate", type=positive_int, default=100, help="alignment frame rate in Hz")
    parser.add_argument("--keep-stress", action="store_true",
                        help="keep ARPAbet stress digits as phones of their own (AH0, AH1; by default they "
                        "are removed, as fairseq's PNMI does)")
    parser.add_argument("--unit-rate", type=int, help="unit rate in Hz (default: the rate recorded by the "
                        "spidr extract or spidr units run that wrote UNITS, else 50)")
    parser.add_argument("--num-units", type=int, help="size of the unit vocabulary (default: the size recorded by "
                        "the spidr units or spidr extract run that wrote UNITS; required where none is)")
    parser.add_argument("--json", action="store_true", help="print the six metrics as a JSON object")
    parser.set_defaults(handler=_units_quality)

    parser = subparsers.add_parser(
        "kmeans",
        help="fit k-means centroids on a directory of features",
        description="Fit MiniBatchKMeans on a seeded uniform sample of the frames of FEATURES_DIR (.npy/.pt files) "
        "and save the centroids as a safetensors file, with what the extraction's metadata.json says of the "
        "features (layer, model fingerprint, side of the residual add): units, extract --kmeans and lm-units "
        "--centroids refuse them for other features. A layer folder of an unfinished spidr extract run (no "
        "metadata.json yet) is refused.",
        formatter_class=formatter,
    )
    parser.add_argument("features_dir", metavar="FEATURES_DIR", help="directory of .npy/.pt (T, D) feature files")
    parser.add_argument("--num-units", type=int, default=256, help="number of centroids")
    parser.add_argument("--out", required=True, help="centroids file to write (.safetensors)")
    parser.add_argument("--max-frames", type=int, default=1_000_000,
                        help="fit on a uniform sample of at most this many frames; 0 or negative uses all")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sample and of k-means")
    add_overwrite_option(parser)
    parser.set_defaults(handler=_kmeans)

    parser = subparsers.add_parser(
        "units",
        help="assign every frame of a feature directory to its nearest k-means centroid",
        description="Write one JSONL row {\"name\": <utterance>, \"units\": [...]} per feature file of "
        "FEATURES_DIR (one layer's folder of a spidr extract run). The name is the file's stem (the utterance id that "
        "codebook units, alignments and ABX items use), or its relative path without extension when two files "
        "share a stem. A layer folder of an unfinished spidr extract run (no metadata.json yet) is refused, and so "
        "are centroids fitted on another layer's or another model's features, or on features taken on the other "
        "side of the residual add; the file is written whole or not at all.",
        formatter_class=formatter,
    )
    parser.add_argument("features_dir", metavar="FEATURES_DIR", help="directory of .npy/.pt (T, D) feature files")
    parser.add_argument("--centroids", required=True, help="centroids file from 'spidr kmeans'")
    parser.add_argument("--out", required=True, help="units file to write (.jsonl, or .jsonl.gz to compress)")
    parser.add_argument("--dedup", action="store_true",
                        help="collapse consecutive repeated units (loses the time alignment: rows are marked "
                             "\"dedup\": true, and abx / units-quality refuse them)")
    add_overwrite_option(parser)
    parser.set_defaults(handler=_units)

    parser = subparsers.add_parser(
        "compare-reports",
        help="one table and per-layer plots out of several evaluation reports (e.g. SpidR vs DinoSR)",
        description="Merge the report.json files of 'spidr evaluate' or 'spidr demo' runs into one report.md, "
        "report.json and per-layer ABX / PNMI plots, each model's curves labelled by its report's name; a "
        "baseline that every report shares (MFCC) is drawn once. Each report's settings.json (ABX condition, item "
        "file and alignments by content, test utterances, dtype) is compared: settings that differ are named in a "
        "warning and in report.md.",
        formatter_class=formatter,
    )
    parser.add_argument("reports", metavar="REPORT", nargs="+", help="report.json, or the folder that holds it")
    parser.add_argument("--out", required=True, help="folder for the merged report.md, report.json and plots (not "
                        "the folder of a REPORT)")
    parser.add_argument("--name", action="append", default=None,
                        help="label of a report's curves, once per REPORT in order (default: its folder's name)")
    add_overwrite_option(parser)
    parser.set_defaults(handler=_compare_reports)
