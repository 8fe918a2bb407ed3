"""Subcommands that run a model over audio: ``spidr extract``, ``spidr evaluate`` and ``spidr probe``."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spidr import cli_types
from spidr.data import AUDIO_EXTENSIONS
from spidr.eval.commands import ALIGNMENTS_HELP, add_abx_options
from spidr.eval.shards import WHOLE, Shard, parse_shard
from spidr.help_format import HelpFormatter
from spidr.models.commands import CHECKPOINT_HELP, add_loading_arguments, default_model_name, model_from_args

if TYPE_CHECKING:
    import torch

    from spidr.data.manifest import ManifestEntry
    from spidr.eval.items import Items

logger = logging.getLogger(__name__)

FORMATTER = HelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``extract``, ``evaluate`` and ``probe`` to the ``spidr`` parser."""
    extract = subparsers.add_parser(
        "extract",
        help="per-layer features (and codebook units) of every utterance",
        description="Write one (T, D) float32 .npy per utterance and layer under OUT/layer_LL/, mirroring the audio "
        "tree, plus OUT/metadata.json; with --codebooks also OUT/codebook_units/layer_LL.jsonl, with --kmeans "
        "OUT/kmeans_units/layer_LL.jsonl (rows named by utterance id, the feature file's name; by its path below "
        "the layer folder where several files hold the id), appended as "
        "batches finish. Resumable: rerunning the same command after a kill continues where it stopped and never "
        "rewrites a finished file (progress in OUT/.extract/); feature files are written atomically.",
        formatter_class=FORMATTER,
    )
    _add_model_arguments(extract)
    extract.add_argument("--manifest", required=True, help="manifest (.csv/.tsv/.jsonl) or a folder of audio")
    _add_extensions_argument(extract)
    extract.add_argument("--layers", default=None,
                         help="1-based layers, e.g. 1-12, 6 or 1,5-7 (default: all); none: no feature files, the "
                         "units alone (with --codebooks or --kmeans: a corpus's units for a unit LM, without the "
                         "terabytes of its features)")
    extract.add_argument("--out", required=True, help="output folder")
    extract.add_argument("--after-residual", action="store_true",
                         help="each layer's full output instead of the FFN output before the residual (official)")
    extract.add_argument("--codebooks", action="store_true", help="also write codebook units (arg-max of each head)")
    extract.add_argument("--kmeans", action="append", type=kmeans_option, default=None, metavar="LAYER:CENTROIDS",
                         help="also write layer LAYER's k-means units, each frame's nearest centroid of CENTROIDS "
                         "(spidr kmeans), as OUT/kmeans_units/layer_LL.jsonl with its record beside it, as spidr "
                         "units gives them from that layer's features; with --layers none, without the features "
                         "(repeatable, one layer each)")
    extract.add_argument("--batch-seconds", type=cli_types.positive_float, default=60.0, help="padded audio per batch")
    extract.add_argument("--max-seconds", type=cli_types.positive_float, default=60.0,
                         help="files longer than this are processed in overlapping windows of 30 s kept + 5 s of "
                         "context on each side, shrunk to fit a bound under 40 s: no forward pass reads more audio "
                         "than this (its memory is bounded); a group_norm front end (DinoSR's fairseq original) "
                         "then normalises each window on its own statistics")
    extract.add_argument("--restart", action="store_true",
                         help="start over instead of resuming a killed extraction into OUT (and replace one of "
                         "another model, manifest or settings, or of audio files rewritten since: their sizes and "
                         "modification times are recorded); with --shard (and under torchrun or srun), only "
                         "this part of an unfinished extraction starts over")
    extract.add_argument("--shard", type=parse_shard, default=None, metavar="K/N",
                         help="extract part K of N (parts of nearly equal audio) into OUT, which every part shares: "
                         "run all N with the same arguments, at once (other GPUs, other machines on a shared file "
                         "system, a SLURM array: --shard $SLURM_ARRAY_TASK_ID/N with --array=1-N) or one after "
                         "another; the last to finish joins the codebook units and writes OUT/metadata.json. Under "
                         "torchrun or srun each process takes its own part (its rank) and GPU without this option")
    extract.set_defaults(handler=run_extract, several_processes=True)  # (parts: see launcher_part)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="per-layer ABX, codebook-unit ABX and PNMI report, with baselines",
        description="Extract every layer, score it (continuous ABX within/across speaker, codebook-unit ABX, "
        "PNMI/purity/perplexity/bitrate of codebook units) and write report.md, report.json and PNG plots. The "
        "features are kept in OUT/features/: a rerun into OUT reuses them (or resumes them after a kill) while "
        "the model, the settings, the manifest's ids, paths and lengths and the audio files' sizes and modification "
        "times are the same (a file rewritten or touched since starts them over). OUT holding another model's "
        "evaluation is refused (--overwrite replaces it).",
        formatter_class=FORMATTER,
    )
    _add_model_arguments(evaluate)
    evaluate.add_argument("--manifest", required=True, help="manifest (.csv/.tsv/.jsonl) or a folder of audio")
    _add_extensions_argument(evaluate)
    evaluate.add_argument("--item", required=True, help="ABX item file (#file = utterance id)")
    evaluate.add_argument("--alignments", help=f"phone alignments for PNMI: {ALIGNMENTS_HELP}")
    evaluate.add_argument("--alignment-rate", type=cli_types.positive_int, default=100,
                          help="frames per second of the alignments")
    evaluate.add_argument("--keep-stress", action="store_true",
                          help="keep ARPAbet stress digits as phones of their own (AH0, AH1; by default they "
                          "are removed, as fairseq's PNMI does)")
    evaluate.add_argument("--layers", default=None, help="1-based layers to evaluate (default: all)")
    evaluate.add_argument("--out", required=True, help="report folder")
    evaluate.add_argument("--baseline", action="append", choices=["mfcc", "random-init"], default=None,
                          help="add a baseline (repeatable)")
    evaluate.add_argument("--name", default=None, help="model name in the report (default: the checkpoint stem; for "
                          "final.pt / step_N.pt, its run folder)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace the evaluation of another model that OUT holds (refused without it)")
    add_abx_options(evaluate, distance_default="angular",
                    seed_help="seed of the ABX subsampling and of the random-init baseline")
    evaluate.set_defaults(handler=run_evaluate)

    _register_probe(subparsers)


def _register_probe(subparsers: argparse._SubParsersAction) -> None:
    probe = subparsers.add_parser(
        "probe",
        help="phone probes per layer: frame accuracy and phone error rate of a classifier on frozen features",
        description="Train a linear (or one-hidden-layer) frame phone classifier on each representation of the model "
        "— the front end's output (conv stack or log-mel), the projection that feeds the Transformer, every layer — "
        "and score it on held-out utterances by frame accuracy, and a linear CTC head on each by phone error rate "
        "(greedy decoding, silence removed; SUPERB's phone-recognition convention). Features made elsewhere "
        "(another model's, or a spidr extract folder) are probed alike with --features, beside or instead of a "
        "--checkpoint. Writes probe.md, probe.json and probe.png.",
        formatter_class=FORMATTER,
    )
    _add_model_arguments(probe, required=False)
    probe.add_argument("--features", action="append", default=None, metavar="NAME=DIR",
                       help="probe stored features as the representations of model NAME (repeatable): DIR is one "
                       "layer's folder of per-utterance (T, D) .npy/.pt files, named as spidr extract names them "
                       "(by path below the audio folder, or by file id), or a spidr extract folder (each layer_LL "
                       "folder a representation)")
    probe.add_argument("--frequency", type=cli_types.positive_float, default=None,
                       help="frame rate in Hz of --features that record none (spidr extract records it; default "
                       "50, with a warning)")
    probe.add_argument("--manifest", required=True, help="training utterances (.csv/.tsv/.jsonl or a folder)")
    probe.add_argument("--alignments", required=True,
                       help="phone alignments of the training (and, by default, held-out) utterances: "
                       f"{ALIGNMENTS_HELP}")
    probe.add_argument("--test-manifest", help="held-out utterances (default: --test-fraction of --manifest)")
    probe.add_argument("--test-alignments", help="alignments of the held-out utterances (default: --alignments)")
    _add_extensions_argument(probe)
    probe.add_argument("--test-fraction", type=float, default=0.2,
                       help="share of --manifest held out when there is no --test-manifest")
    probe.add_argument("--alignment-rate", type=cli_types.positive_int, default=100,
                       help="frames per second of the alignments")
    probe.add_argument("--keep-stress", action="store_true",
                       help="keep ARPAbet stress digits as phones of their own (AH0, AH1; by default they "
                       "are removed, as fairseq's PNMI does)")
    probe.add_argument("--layers", default=None, help="1-based layers to probe (default: all)")
    probe.add_argument("--out", required=True, help="report folder")
    probe.add_argument("--baseline", action="append", choices=["mfcc", "random-init"], default=None,
                       help="add a baseline (repeatable)")
    probe.add_argument("--name", default=None, help="model name in the report (default: the checkpoint stem; for "
                          "final.pt / step_N.pt, its run folder)")
    probe.add_argument("--hidden", type=int, default=0, help="hidden ReLU units (0: a linear probe)")
    probe.add_argument("--epochs", type=int, default=10, help="passes over the training frames")
    probe.add_argument("--max-train-frames", type=int, default=200_000,
                       help="training utterances are drawn at random until this many frames")
    probe.add_argument("--seed", type=cli_types.non_negative_int, default=0,
                       help="seed of the utterance draw, the probe and random init")
    cli_types.add_overwrite_option(probe)
    probe.set_defaults(handler=run_probe)


def _add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--checkpoint", required=required, help=CHECKPOINT_HELP)
    add_loading_arguments(parser)
    parser.add_argument("--device", type=cli_types.device, default="auto", help=cli_types.DEVICE_HELP)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 runs the Transformer layers under bf16 autocast, the front end and "
                        "positional convs in float32")


def _add_extensions_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ext", type=cli_types.extensions, default=AUDIO_EXTENSIONS, metavar="EXTS",
                        help=f"audio file extensions read from a folder or .tar given as a manifest, comma-separated "
                        f"(default: {','.join(AUDIO_EXTENSIONS)}; e.g. .wav,.flac,.ogg)")


def _entries(source: str, exts: Sequence[str] = AUDIO_EXTENSIONS) -> tuple[Any, list[ManifestEntry]]:
    """The utterances of a manifest, or of a folder or .tar scanned for ``exts`` (none found is an error: a run
    on nothing, reported as a success, hid a folder of .ogg files), and the files of such a scan that could not be
    read (``ScanResult.unread``: the files that share their ids are named by path, as if they had been read)."""
    from spidr.data.manifest import read_manifest
    from spidr.data.scanning import scan

    path = Path(source)
    if path.is_dir() or path.suffix.lower() == ".tar":
        found = scan(path, exts)
        if not found.entries:
            raise ValueError(f"no readable audio with extension(s) {', '.join(exts)} in {path} (--ext reads others, "
                             "e.g. --ext .wav,.flac,.ogg)")
        return found.entries, found.unread
    entries = read_manifest(path)
    if not len(entries):  # (a filter that matched nothing: extract then "wrote features of 0 files")
        raise ValueError(f"{path} lists no utterance (no rows): nothing to extract")
    return entries, []


def _model(args: argparse.Namespace):
    # --device was checked when parsed (cli_types.device refuses cuda where CUDA is not available)
    return model_from_args(args.checkpoint, args).to(args.device)


def stored_featurizers(specs: Sequence[str], frequency: float | None) -> dict[str, Any]:
    """``--features NAME=DIR`` as ``{NAME: StoredFeaturizer}``: DIR one layer's folder of feature files (one
    representation, named by the folder) or a ``spidr extract`` folder (each ``layer_LL`` folder one), at the rate
    its extraction records (which ``frequency`` must agree with), else ``frequency``, else 50 Hz with a warning."""
    from spidr.eval.commands import frame_rate_option
    from spidr.eval.feature_dir import StemKeyed, audio_root, one_layer_directory, skipped_stems
    from spidr.eval.probe import StoredFeaturizer

    featurizers: dict[str, Any] = {}
    for spec in specs:
        name, _, folder_text = spec.partition("=")
        name = name.strip()
        if not name or not folder_text:
            raise ValueError(f"--features {spec!r}: expected NAME=DIR, e.g. hubert=feats/layer_09")
        if name in featurizers:
            raise ValueError(f"--features {spec!r}: the name {name!r} is given twice")
        folder = Path(folder_text)
        if not folder.is_dir():
            raise ValueError(f"--features {spec!r}: {folder} is not a folder")
        folders = sorted(path for path in folder.glob("layer_[0-9]*") if path.is_dir()) or [folder]
        rates = {float(frame_rate_option(None if frequency is None else f"{frequency:g}", path, "--frequency"))
                 for path in folders}
        if len(rates) > 1:
            raise ValueError(f"--features {spec!r}: its layers record different frame rates ({sorted(rates)})")
        featurizers[name] = StoredFeaturizer(
            {path.name: StemKeyed(one_layer_directory(path), source=path, skipped=skipped_stems(path),
                                  root=audio_root(path)) for path in folders}, frame_rate=rates.pop())
    return featurizers


def launcher_part(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> tuple[Shard, str]:
    """The part that this process extracts and its device: ``--shard`` (or the whole) and ``--device`` for one
    process; under torchrun or srun starting N processes, part rank + 1 of N, on GPU local rank where the device
    is "cuda" (each process its own GPU; a --device cuda:N would put every part on one)."""
    count = cli_types.processes_started_together(env)
    if count == 1:
        return args.shard or WHOLE, args.device
    if args.shard is not None:
        raise ValueError(f"--shard {args.shard}: under torchrun or srun each of the {count} processes takes its own "
                         "part from its rank; leave --shard out, or start one process per part yourself")
    from spidr.train.environment import detect_environment

    denv = detect_environment(env)
    device = args.device
    if device == "cuda":
        import torch

        device = f"cuda:{denv.local_rank % torch.cuda.device_count()}"
    return Shard(denv.rank + 1, denv.world_size), device


def kmeans_option(text: str) -> tuple[int, Path]:
    """``--kmeans LAYER:CENTROIDS`` (argparse type): a 1-based layer and a centroids file."""
    layer, colon, path = text.partition(":")
    if not (colon and layer.strip().isdigit() and int(layer) >= 1 and path):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LAYER:CENTROIDS, e.g. 6:km256.safetensors")
    return int(layer), Path(path)


def run_extract(args: argparse.Namespace) -> int:
    from spidr.eval.features import ExtractionSettings, parse_layers, window_settings
    from spidr.eval.folder_extraction import KMeansUnits, extract_part
    from spidr.eval.journal import features_fingerprint
    from spidr.eval.kmeans import check_centroids_fit, features_origin, load_centroids

    if args.layers == "none" and not (args.codebooks or args.kmeans):
        raise ValueError("--layers none writes no features: add --codebooks or --kmeans to extract units alone")
    origin = features_origin(fingerprint=None, before_residual=not args.after_residual, checkpoint=args.checkpoint)
    for layer, path in args.kmeans or ():  # (before the model loads: all but the model's own fingerprint)
        check_centroids_fit(path, layer, where=f"--kmeans {layer}:{path}", origin=origin)
    kmeans = [KMeansUnits(layer, load_centroids(path), str(path)) for layer, path in args.kmeans or ()]
    shard, args.device = launcher_part(args)
    model = _model(args)
    if args.kmeans:
        origin |= features_origin(fingerprint=features_fingerprint(model), before_residual=None)
        for layer, path in args.kmeans:
            check_centroids_fit(path, layer, where=f"--kmeans {layer}:{path}", origin=origin)
    if args.codebooks and model.num_codebooks == 0:
        raise ValueError(f"--codebooks: {args.checkpoint} is an exported student without prediction heads or "
                         "codebooks; codebook units need the full spidr checkpoint")
    settings = ExtractionSettings(
        layers=() if args.layers == "none" else parse_layers(args.layers or f"1-{model.num_layers}", model.num_layers),
        before_residual=not args.after_residual,
        codebooks=args.codebooks,
        batch_seconds=args.batch_seconds,
        dtype=args.dtype,
        **window_settings(args.max_seconds),
    )
    entries, unread = _entries(args.manifest, args.ext)
    outcome = extract_part(model, entries, args.out, settings, shard, checkpoint=args.checkpoint,
                           restart=args.restart, kmeans=kmeans, unread=unread)
    metadata = Path(args.out) / "metadata.json"
    what = "units" if not settings.layers else "features"
    if outcome.metadata is None:  # another part is still to run
        waiting = ", ".join(str(part) for part in outcome.unfinished)
        print(f"part {shard}: wrote {what} of {outcome.num_files} files to {args.out}"
              + (f", skipped {len(outcome.skipped)} unusable file(s)" if outcome.skipped else "")
              + f"; part(s) {waiting} not finished yet: the last part to finish writes {metadata}")
        return 0
    if outcome.finished_before:
        print(f"part {shard}: nothing left to do: {args.out} holds the finished extraction of "
              f"{outcome.metadata['num_files']} files (--restart starts it over)")
        return 0
    if not outcome.wrote_metadata:
        print(f"part {shard}: wrote {what} of {outcome.num_files} files to {args.out}; another part, ending at the "
              f"same time, joined them all ({metadata})")
        return 0
    skipped = outcome.metadata["skipped"]
    total = outcome.metadata["num_files"]
    print((f"wrote {what} of {total} files to {args.out}" if shard.is_whole else
           f"part {shard}, the last one: wrote {what} of {outcome.num_files} files, and joined all parts: "
           f"{args.out} holds the {what} of {total} files") + (
              f"; {len(skipped)} unusable file(s) skipped, listed with their reasons in {metadata}"
              if skipped else ""))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from spidr.data.audio import decoded_length
    from spidr.eval.features import parse_layers
    from spidr.eval.items import read_items
    from spidr.eval.report import AbxSettings, evaluate_mfcc, evaluate_model, evaluation_settings, write_report
    from spidr.eval.unit_quality import check_alignment_lengths, check_alignment_rate, read_alignments
    from spidr.models.build import build_model

    if args.distance == "identical":
        raise ValueError("--distance identical compares discrete units; evaluate scores continuous features with "
                         "angular, cosine, euclidean or kl_symmetric (its codebook units always use identical)")
    model = _model(args)
    entries, unread = _entries(args.manifest, args.ext)
    items = read_items(args.item)
    alignments = (None if args.alignments is None
                  else read_alignments(args.alignments, alignment_rate_hz=args.alignment_rate,
                                       keep_stress=args.keep_stress))
    aligned_entries, aligned_samples = {}, {}
    if alignments is not None:  # before the extraction and the ABX of every layer, not at the first head's PNMI
        aligned_entries = _aligned_entries(entries, unread, alignments, args.manifest)
        aligned_samples = {name: entry.num_samples for name, entry in aligned_entries.items()}
        check_alignment_rate(alignments, aligned_samples, alignment_rate_hz=args.alignment_rate,
                             where=f"--alignments {args.alignments}")
    layers = parse_layers(args.layers or f"1-{model.num_layers}", model.num_layers)
    _check_before_extracting(model, entries, items, layers, args, unread=unread)
    if alignments is not None and any(layer in model.head_layers for layer in layers):  # (the PNMI's units)
        check_alignment_lengths(alignments, aligned_samples, conv_layers=model.cfg.extractor_conv_layer_config,
                                alignment_rate_hz=args.alignment_rate, where=f"--alignments {args.alignments}",
                                decoded_samples=lambda name: decoded_length(aligned_entries[name]))
    abx = AbxSettings(context=args.context, distance=args.distance, max_size_group=args.max_size_group,
                      max_x_across=args.max_x_across, seed=args.seed)
    out = Path(args.out)
    if not args.overwrite:
        _refuse_another_models_evaluation(out, model)
    name = args.name or default_model_name(args.checkpoint)
    common = {"items": items, "alignments": alignments, "layers": layers, "abx": abx,
              "alignment_rate_hz": args.alignment_rate, "dtype": args.dtype, "unread": unread}
    rows = evaluate_model(model, name, entries, work_dir=out / "features" / "model", checkpoint=str(args.checkpoint),
                          **common)
    for baseline in args.baseline or ():
        if baseline == "mfcc":
            rows.append(evaluate_mfcc(entries, items, abx=abx, unread=unread))
        else:
            torch.manual_seed(args.seed)
            random_model = build_model(copy.deepcopy(model.cfg)).to(args.device).eval()
            rows += evaluate_model(random_model, f"{name} (random init)", entries,
                                   work_dir=out / "features" / "random_init",
                                   checkpoint=f"random init (seed {args.seed}) of {args.checkpoint}'s config",
                                   untrained=True, **common)
    settings = evaluation_settings(abx=abx, item_file=args.item, entries=entries, alignments_file=args.alignments,
                                   alignment_rate_hz=args.alignment_rate, dtype=args.dtype,
                                   stress_removed=alignments is not None and bool(alignments.stress_removed))
    path = write_report(rows, out, title=f"Evaluation of {name}", settings=settings,
                        notes=[f"ABX: context {abx.context}, distance {abx.distance}, max_size_group "
                               f"{abx.max_size_group}, max_x_across {abx.max_x_across}, seed {abx.seed}; "
                               "error rates in %."])
    print(path.read_text(encoding="utf-8"))
    print(f"report written to {path}")
    return 0


def _refuse_another_models_evaluation(out: Path, model: torch.nn.Module) -> None:
    """Raise if ``out`` holds the finished evaluation (``report.json``) of another model: its features (which a
    rerun of the same model reuses) would be replaced, and its report with them, without a word."""
    from spidr.eval.journal import STATE_DIR, model_fingerprint

    features = out / "features" / "model"
    try:
        state = json.loads((features / STATE_DIR / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not (out / "report.json").is_file() or state.get("model") == model_fingerprint(model):
        return
    try:
        checkpoint = json.loads((features / "metadata.json").read_text(encoding="utf-8")).get("checkpoint")
    except (OSError, ValueError):
        checkpoint = None
    raise ValueError(f"{out} holds the evaluation of another model{f' ({checkpoint})' if checkpoint else ''}: "
                     "give another --out, or --overwrite to replace it")


def _aligned_entries(entries: Sequence[ManifestEntry], unread: Sequence[ManifestEntry],
                     alignments: Mapping[str, Any], manifest: str) -> dict[str, ManifestEntry]:
    """``{alignment name: its file's entry}``, the alignments' names found as the PNMI will find them (by
    path or unique id, ``names_matched``; ``unread``: the scan's unreadable files, as ``unread_stems``): a bare id
    that several files hold is refused now, not after the extraction and the first layers' ABX."""
    from spidr.eval.feature_dir import names_matched
    from spidr.eval.folder_extraction import output_root, unread_stems, utterance_names

    named = {name: entry for entry, name in zip(entries, utterance_names(entries, unread), strict=True)}
    matched = names_matched(named, alignments, source=f"--manifest {manifest}",
                            skipped=unread_stems(entries, unread), root=output_root(entries))
    if not matched:
        raise ValueError(f"none of the {len(alignments)} utterances of --alignments names a file of --manifest "
                         f"{manifest} (the first is {next(iter(alignments))!r}; the files are named e.g. "
                         f"{next(iter(named))!r}: by utterance id, by path where ids repeat, or by a path that "
                         "ends with that)")
    return {name: named[key] for key, name in matched.items()}


def _check_before_extracting(model: torch.nn.Module, entries: Sequence[ManifestEntry], items: Items,
                             layers: Sequence[int], args: argparse.Namespace, *,
                             unread: Sequence[ManifestEntry]) -> None:
    """What ``evaluate`` would refuse only after extracting every layer (hours on a real corpus): an item file
    that names none of the manifest's files, and alignments that the codebook units' PNMI cannot use."""
    from spidr.eval.feature_dir import StemKeyed
    from spidr.eval.folder_extraction import output_root, output_stems, unread_stems
    from spidr.models.frames import frame_rate_hz

    # The features' names (their files below each layer folder), looked up as evaluate will look them up
    stems = output_stems(entries)
    features = StemKeyed(dict.fromkeys(stems[index] for index in range(len(stems))),
                         source=f"--manifest {args.manifest}", skipped=unread_stems(entries, unread),
                         root=output_root(entries))
    # (every name looked up: one that several files hold is refused now, naming them, rather than after extracting)
    if items.files and not sum(name in features for name in sorted(set(items.files))):
        raise ValueError(f"none of the {len(items)} ABX items of {items.source} names a file of --manifest "
                         f"{args.manifest} (the first names {items.files[0]!r}; the files will be named e.g. "
                         f"{next(iter(features))!r}, and found by that name, by their path below the layer folder or "
                         "by a path ending with it): is it the item file of another corpus?")
    rate = frame_rate_hz(model.cfg.extractor_conv_layer_config)
    scored = [layer for layer in layers if layer in model.head_layers]
    if args.alignments is not None and scored and args.alignment_rate % rate:
        raise ValueError(f"--alignment-rate {args.alignment_rate}: the PNMI of the codebook units (layers {scored}) "
                         f"counts phone labels per unit, so the alignments must be at a multiple of the units' "
                         f"{rate} Hz (e.g. {rate} or {2 * rate} Hz labels); give --alignments of finer frames")


def _check_what_is_probed(args: argparse.Namespace) -> None:
    """Refuse options of the --checkpoint model without one, and --frequency without --features."""
    if args.checkpoint is None:
        if not args.features:
            raise ValueError("give the model to probe (--checkpoint) or stored features (--features NAME=DIR)")
        given = [option for option, value in (("--layers", args.layers), ("--name", args.name),
                                              ("--baseline random-init", "random-init" in (args.baseline or ())))
                 if value]
        if given:
            raise ValueError(f"{', '.join(given)}: options of the --checkpoint model, which is not given")
    if args.frequency is not None and not args.features:
        raise ValueError(f"--frequency {args.frequency}: the frame rate of --features that record none, which are not "
                         "given (a --checkpoint model's rate is its own)")


def run_probe(args: argparse.Namespace) -> int:
    from spidr.eval.features import parse_layers
    from spidr.eval.probe import (
        SILENCE_LABELS,
        MfccFeaturizer,
        ModelFeaturizer,
        ProbeSettings,
        alignment_keys,
        probe_names,
        run_probes,
        split_entries,
        write_probe_report,
    )
    from spidr.eval.unit_quality import read_alignments
    from spidr.models.build import random_init_model

    # (a report of hours, maybe of another model): probe.md is written last, so a folder without it holds no
    # report (other files, or what a killed probe left) and is written into
    cli_types.check_new_output(args.out, overwrite=args.overwrite or not (Path(args.out) / "probe.md").exists())
    if args.hidden < 0 or args.epochs < 1 or args.max_train_frames < 1:
        raise ValueError(f"--hidden {args.hidden}, --epochs {args.epochs}, --max-train-frames "
                         f"{args.max_train_frames}: expected hidden ≥ 0, epochs ≥ 1 and a positive frame budget")
    _check_what_is_probed(args)
    stored = stored_featurizers(args.features or (), args.frequency)
    model = _model(args) if args.checkpoint is not None else None
    train_entries, train_unread = _entries(args.manifest, args.ext)
    if args.test_manifest:
        test_entries, test_unread = _entries(args.test_manifest, args.ext)
        keys = probe_names(train_entries, test_entries, one_alignment_file=not args.test_alignments,
                           unread=(train_unread, test_unread))
    else:
        # (before the split: each part would name other paths below its folder)
        keys = alignment_keys(train_entries, unread=train_unread)
        train_entries, test_entries = split_entries(train_entries, args.test_fraction, seed=args.seed)
        test_unread = train_unread
    alignments = read_alignments(args.alignments, alignment_rate_hz=args.alignment_rate, keep_stress=args.keep_stress)
    test_alignments = (read_alignments(args.test_alignments, alignment_rate_hz=args.alignment_rate,
                                       keep_stress=args.keep_stress)
                       if args.test_alignments else None)
    layers = parse_layers(args.layers, model.num_layers) if args.layers else None
    settings = ProbeSettings(hidden=args.hidden, epochs=args.epochs, max_train_frames=args.max_train_frames,
                             seed=args.seed, dtype=args.dtype)
    name = args.name or (default_model_name(args.checkpoint) if model is not None else ", ".join(stored))
    common = {"test_alignments": test_alignments, "alignment_rate": args.alignment_rate, "settings": settings,
              "keys": keys, "unread": (train_unread, test_unread),
              "sources": (f"--alignments {args.alignments}",
                          f"--test-alignments {args.test_alignments}" if args.test_alignments else None)}
    featurizers = {name: ModelFeaturizer(model, layers=layers, dtype=args.dtype)} if model is not None else {}
    baselines = {"mfcc": "MFCC", "random-init": f"{name} (random init)"}
    taken = {baselines[baseline]: f"the --baseline {baseline}" for baseline in args.baseline or ()}
    for stored_name, featurizer in stored.items():
        if stored_name in featurizers:
            raise ValueError(f"--features {stored_name}=...: the name of the --checkpoint model; give another name")
        if stored_name in taken:
            raise ValueError(f"--features {stored_name}=...: the name of {taken[stored_name]}, which would replace "
                             "these features in the report; give another name")
        featurizers[stored_name] = featurizer
    for baseline in args.baseline or ():
        if baseline == "mfcc":
            featurizers["MFCC"] = MfccFeaturizer()
        else:
            random_model = random_init_model(model.cfg, seed=args.seed).to(args.device)
            featurizers[f"{name} (random init)"] = ModelFeaturizer(random_model, layers=layers, dtype=args.dtype)
    rows = run_probes(featurizers, train_entries, test_entries, alignments, **common)
    kind = (f"Frame classifiers with one hidden layer of {args.hidden} units" if args.hidden
            else "Linear frame classifiers")
    path = write_probe_report(rows, args.out, title=f"Phone probe of {name}", notes=[
        f"{kind}, {args.epochs} epochs, trained on ≤ {args.max_train_frames} frames "
        f"of {args.manifest}; scored on {args.test_manifest or f'{args.test_fraction:.0%} of it held out'}. "
        "PER: a linear CTC head's greedy phone sequence against the reference phones, silence "
        f"({', '.join(repr(label) for label in SILENCE_LABELS)}) removed."])
    print(path.read_text(encoding="utf-8"))
    print(f"probe report written to {path}")
    return 0
