"""Subcommands of this area (see ``spidr.cli``): ``spidr export`` and ``spidr info``."""

from __future__ import annotations

import argparse


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="official .pt, original fairseq DinoSR .ckpt, spidr training checkpoint, or .safetensors export",
    )
    parser.add_argument(
        "--model-type",
        choices=["spidr", "dinosr"],
        default=None,
        help="model type, needed only for an official checkpoint without a config.json beside it",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="run or model config file (TOML/JSON) overriding the checkpoint's own config",
    )
    parser.add_argument(
        "--trust",
        action="store_true",
        help="allow full unpickling (needed by fairseq checkpoints); can run code: only for files you trust",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``spidr`` parser."""
    export = subparsers.add_parser(
        "export",
        help="convert any loadable checkpoint to a safetensors file",
        description="Load a checkpoint of any recognised format and write its full state dict to safetensors, "
        "with the model config in the metadata (loadable with spidr.load_model, no pickle).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_checkpoint_arguments(export)
    export.add_argument("output", help="output path, ending in .safetensors")
    export.set_defaults(handler=_export)

    info = subparsers.add_parser(
        "info",
        help="describe a checkpoint: model type, config, parameter counts, step",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_checkpoint_arguments(info)
    info.set_defaults(handler=_info)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spidr.models.loading import export_safetensors, load_model

    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise ValueError(f"output {output} must end in .safetensors")
    if not output.parent.is_dir():
        raise ValueError(f"output directory {output.parent} does not exist")
    model = load_model(args.checkpoint, trust=args.trust, config=args.config, model_type=args.model_type)
    export_safetensors(model, output)
    print(f"wrote {output} ({model.cfg.model_type}, step {int(model.current_step)})")
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
    print(f"checkpoint:      {args.checkpoint} ({checkpoint.format} format)")
    print(f"model type:      {cfg.model_type} ({type(model).__name__})")
    print(f"step:            {checkpoint.step}")
    print(
        f"architecture:    {cfg.encoder_num_layers} layers, dim {cfg.encoder_embed_dim}, "
        f"{cfg.encoder_num_heads} heads, FFN {cfg.encoder_ff_interm_features}, "
        f"{len(cfg.extractor_conv_layer_config)} conv layers ({cfg.extractor_mode}), "
        f"{cfg.num_codebooks} codebooks × {cfg.codebook_size}, qkv bias {cfg.encoder_qkv_bias}"
    )
    print(f"non-default:     {changed if changed else 'none (base config)'}")
    print(f"parameters:      {student_side:,} student side (extractor, projection, encoder, heads, mask embedding)")
    print(f"                 {count(('student',)) + count(('feature_extractor', 'feature_projection')):,} "
          "for inference (no heads)")
    print(f"                 {count(('teacher',)):,} teacher")
    print(f"                 {sum(b.numel() for b in model.buffers()):,} buffer values (codebooks, step)")
    return 0
