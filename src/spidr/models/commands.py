"""Subcommands of this area (see ``spidr.cli``): ``spidr export`` and ``spidr info``; and the options by which every
command that reads a SpidR / DinoSR checkpoint reads it (``add_loading_arguments``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from spidr import cli_types
from spidr.cli_types import check_new_output
from spidr.help_format import HelpFormatter
from spidr.in_progress import HF_EXPORT_IN_PROGRESS, marked_in_progress

if TYPE_CHECKING:  # the CLI parses arguments without importing torch
    from spidr.models.dinosr import DinoSR
    from spidr.models.student import Student


# What every command that reads a SpidR / DinoSR model accepts (``load_model``'s inputs).
CHECKPOINT_HELP = ("official .pt, original fairseq DinoSR .ckpt, spidr training checkpoint, .safetensors export, "
                   "s3prl export, or Hugging Face data2vec-audio directory (the last two hold a student: features, "
                   "no codebook units)")


def add_loading_arguments(parser: argparse.ArgumentParser, *, every: str = "") -> None:
    """``--model-type``, ``--config`` and ``--trust``: how a command reads its checkpoint(s) (``load_model``'s
    arguments; ``model_from_args`` passes them). ``every``: words appended to the help where a command takes
    several checkpoints."""
    parser.add_argument(
        "--model-type",
        choices=["spidr", "dinosr"],
        default=None,
        help="model type, needed only for a checkpoint that does not record it: an official one (spidr_base.pt, "
        "dinosr_base_reproduced.pt) or a safetensors file not written by spidr, without a config.json beside it"
        f"{every}",
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"run or model config file (TOML/JSON) overriding the checkpoint's own config{every}",
    )
    parser.add_argument(
        "--trust",
        action="store_true",
        help="allow full unpickling (needed by fairseq checkpoints); can run code: only for files you trust",
    )


def default_model_name(path: str | Path) -> str:
    """A model's name in reports when none is given: the checkpoint's stem, or its run folder's name for a
    training checkpoint (every run ends in final.pt: two runs were both "final", and refused as one)."""
    path = Path(path)
    if path.suffix == ".pt" and re.fullmatch(r"final|step_\d+", path.stem):
        return path.resolve().parent.name + ("" if path.stem == "final" else f"-{path.stem}")
    return path.stem


def model_from_args(path: str, args: argparse.Namespace) -> DinoSR | Student:
    """``load_model(path)`` with the command's ``add_loading_arguments`` options."""
    from spidr.models.loading import load_model

    return load_model(path, trust=args.trust, config=args.config, model_type=args.model_type)


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help=CHECKPOINT_HELP,
    )
    add_loading_arguments(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``spidr`` parser."""
    export = subparsers.add_parser(
        "export",
        help="convert any loadable checkpoint to safetensors, Hugging Face transformers or s3prl",
        description="Load a checkpoint of any recognised format and write it as: a safetensors file of the full "
        "state dict with the model config in the metadata (--format safetensors); a Hugging Face transformers "
        "Data2VecAudioModel directory of the student, loadable with AutoModel.from_pretrained and spidr.load_model "
        "(--format hf); or an s3prl data2vec_custom checkpoint of the student (--format s3prl). The hf and s3prl "
        "exports compute the same features as spidr on unpadded or equal-length batches; they hold no teacher, "
        "heads or codebooks. No format needs unpickling of Python objects (the s3prl file holds only tensors, "
        "strings and numbers).",
        formatter_class=HelpFormatter,
    )
    _add_checkpoint_arguments(export)
    export.add_argument(
        "output",
        help="output path: a .safetensors file (safetensors), a directory (hf; created if missing), or a .pt file "
        "(s3prl)",
    )
    export.add_argument(
        "--format",
        choices=["safetensors", "hf", "s3prl"],
        default="safetensors",
        help="output format",
    )
    cli_types.add_overwrite_option(export)
    export.set_defaults(handler=_export)

    info = subparsers.add_parser(
        "info",
        help="describe a checkpoint: model type, config, parameter counts, step",
        description="Print what a checkpoint holds, in any format spidr loads (training checkpoint, official "
        "spidr_base.pt / dinosr_base_reproduced.pt, fairseq DinoSR, safetensors export, Hugging Face directory, s3prl "
        "export): its format, model type, "
        "training step, architecture, the config fields that differ from the base config, and parameter counts "
        "(student side, inference, teacher) and buffer sizes.",
        formatter_class=HelpFormatter,
    )
    _add_checkpoint_arguments(info)
    info.set_defaults(handler=_info)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spidr.models.hf_export import export_hf
    from spidr.models.loading import export_safetensors
    from spidr.models.s3prl_export import export_s3prl

    output = Path(args.output)
    suffix = {"safetensors": ".safetensors", "s3prl": ".pt"}.get(args.format)
    if suffix is not None and output.suffix != suffix:
        raise ValueError(f"output {output} must end in {suffix} for --format {args.format}")
    if suffix is not None and output.is_dir():  # a folder named like the file: its writer would fail after the load
        raise ValueError(f"output {output} is a directory; --format {args.format} writes a file: give a file path")
    if args.format == "hf" and output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a directory (--format hf writes a directory)")
    # (its folder is made, as every command's, and removed if the export fails; an hf folder that a killed export
    # left holds its marker, and the rerun writes it again)
    check_new_output(output, overwrite=args.overwrite,
                     unfinished_marker=HF_EXPORT_IN_PROGRESS if args.format == "hf" else None)
    model = model_from_args(args.checkpoint, args)
    match args.format:
        case "safetensors":
            export_safetensors(model, output)
        case "hf":
            from spidr.models.hf_export import check_exportable

            check_exportable(model.cfg)  # (before the marker: a refused export leaves an earlier one readable)
            with marked_in_progress(output, HF_EXPORT_IN_PROGRESS):
                export_hf(model, output)
        case "s3prl":
            export_s3prl(model, output)
    print(f"wrote {output} ({args.format}; {model.cfg.model_type}, step {int(model.current_step)})")
    return 0


def _info(args: argparse.Namespace) -> int:
    import dataclasses

    from spidr.models.loading import model_from_checkpoint, read_checkpoint

    checkpoint = read_checkpoint(args.checkpoint, trust=args.trust, config=args.config, model_type=args.model_type)
    model = model_from_checkpoint(checkpoint, where=args.checkpoint)
    cfg = checkpoint.config
    defaults = type(cfg)()
    changed = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != getattr(defaults, f.name)
    }

    def count(prefixes: tuple[str, ...]) -> int:
        return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefixes))

    student_side = count(("mask_embedding", "feature_extractor", "feature_projection", "student", "heads"))
    # A student has no heads or codebooks, whatever num_codebooks its config keeps.
    codebooks = ("no codebooks (inference-only student)" if checkpoint.student_only
                 else f"{cfg.num_codebooks} codebooks × {cfg.codebook_size}")
    print(f"checkpoint:      {args.checkpoint} ({checkpoint.format} format)")
    print(f"model type:      {cfg.model_type} ({type(model).__name__})")
    print(f"step:            {checkpoint.step}")
    print(
        f"architecture:    {cfg.encoder_num_layers} layers, dim {cfg.encoder_embed_dim}, "
        f"{cfg.encoder_num_heads} heads, FFN {cfg.encoder_ff_interm_features}, "
        f"{_front_end(cfg)}, "
        f"{codebooks}, qkv bias {cfg.encoder_qkv_bias}"
    )
    print(f"non-default:     {changed if changed else 'none (base config)'}")
    print(f"parameters:      {student_side:,} student side (extractor, projection, encoder, heads, mask embedding)")
    print(f"                 {count(('student',)) + count(('feature_extractor', 'feature_projection')):,} "
          "for inference (no heads)")
    print(f"                 {count(('teacher',)):,} teacher")
    print(f"                 {sum(b.numel() for b in model.buffers()):,} buffer values (codebooks, step)")
    return 0


def _front_end(cfg) -> str:
    """'7 conv layers (layer_norm)', or '80-band log-mel filterbank + 1 conv layer (layer_norm)'."""
    layers = len(cfg.extractor_conv_layer_config)
    if cfg.extractor_type == "log_mel":
        convs = layers - 1
        mels = f"{cfg.extractor_conv_layer_config[0][0]}-band log-mel filterbank"
        return mels if convs == 0 else f"{mels} + {convs} conv layer{'s' * (convs > 1)} ({cfg.extractor_mode})"
    return f"{layers} conv layers ({cfg.extractor_mode})"
