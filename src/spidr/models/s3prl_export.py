"""Export a SpidR / DinoSR student as a checkpoint for s3prl's ``data2vec_custom`` upstream.

s3prl's data2vec upstream is fairseq's data2vec-audio model, the architecture of our student, so the export is the
fairseq conversion rules of ``spidr.models.convert`` run the other way. The file is a plain ``torch.save`` dict
(tensors, strings, numbers: it loads with ``weights_only=True``) of what s3prl's loader reads:

- ``task_cfg``: fairseq ``audio_pretraining`` options (16 kHz; ``normalize`` = standardise each utterance, with
  ``F.layer_norm`` as spidr does);
- ``model_cfg``: fairseq ``Data2VecAudioConfig`` options (``conv_feature_layers`` as a list-expression string,
  ``conv_pos`` = our ``encoder_pos_conv_kernel``, split over ``pos_conv_depth`` convs the same way);
- ``model_weight``: the student's weights under fairseq names, plus the ``_ema`` entry that s3prl deletes before its
  strict load (fairseq keeps the EMA teacher there); the teacher, heads and codebooks are not exported;
- ``spidr``: what s3prl does not read and spidr reads back (``read_s3prl_export``): the model type, config and
  training step.

s3prl zeroes padded frames once before the positional convs, as Hugging Face does (see ``spidr.models.hf_export``),
so outputs match exactly only for unpadded or equal-length batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spidr.atomic_files import failed_write, replaced_when_done
from spidr.config import ModelConfig, SpidRConfig, model_config_from_dict
from spidr.models.keymap import KeyMap, fuse_qkv, split_qkv

_TRAINING_ONLY = ("teacher.", "teacher_feature_extractor.", "teacher_feature_projection.", "heads.", "codebooks.")


def keymap(cfg: ModelConfig) -> KeyMap:
    """(fairseq data2vec key, our key) pairs for ``cfg``'s extractor mode (spec §9.3, reversed)."""
    # layer_norm mode: Sequential(conv, dropout, Sequential(transpose, LayerNorm, transpose), GELU);
    # group_norm ("default") mode: Sequential(conv, dropout, GroupNorm, GELU) on the first layer only.
    norm = "2.1" if cfg.extractor_mode == "layer_norm" else "2"
    return KeyMap(
        [
            ("mask_emb", "mask_embedding"),
            ("feature_extractor.conv_layers.{i}.0.{p}", "feature_extractor.conv_layers.{i}.conv.{p}"),
            (f"feature_extractor.conv_layers.{{i}}.{norm}.{{p}}", "feature_extractor.conv_layers.{i}.layer_norm.{p}"),
            ("layer_norm.{p}", "feature_projection.layer_norm.{p}"),
            ("post_extract_proj.{p}", "feature_projection.projection.{p}"),
            ("encoder.pos_conv.{i}.0.{p}", "student.pos_conv_embed.convs.{i}.{p}"),
            ("encoder.layer_norm.{p}", "student.layer_norm.{p}"),
            ("encoder.layers.{i}.self_attn.{x}_proj.{p}", "student.layers.{i}.attention.{x}.{p}"),
            ("encoder.layers.{i}.self_attn.out_proj.{p}", "student.layers.{i}.attention.proj.{p}"),
            ("encoder.layers.{i}.self_attn_layer_norm.{p}", "student.layers.{i}.layer_norm.{p}"),
            ("encoder.layers.{i}.fc1.{p}", "student.layers.{i}.feed_forward.intermediate_dense.{p}"),
            ("encoder.layers.{i}.fc2.{p}", "student.layers.{i}.feed_forward.output_dense.{p}"),
            ("encoder.layers.{i}.final_layer_norm.{p}", "student.layers.{i}.final_layer_norm.{p}"),
        ],
        theirs="s3prl data2vec",
    )


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` naming the field if s3prl's data2vec model cannot compute ``cfg``'s student exactly."""
    if cfg.extractor_type != "conv":
        raise ValueError(
            f"model.extractor_type = {cfg.extractor_type!r} cannot be exported to s3prl: its data2vec front end is "
            "a stack of learned convs on the waveform, with no log-mel filterbank"
        )
    if cfg.encoder_pos_conv_depth == 1:
        raise ValueError(
            "model.encoder_pos_conv_depth = 1 cannot be exported to s3prl exactly: with pos_conv_depth 1 fairseq's "
            "encoder builds one weight-normalised positional conv without a LayerNorm instead of the stack"
        )


def model_cfg(cfg: ModelConfig) -> dict[str, Any]:
    """fairseq ``Data2VecAudioConfig`` options of ``cfg``'s student (s3prl ignores unknown ones)."""
    check_exportable(cfg)
    layers = ", ".join(f"({c}, {k}, {s})" for c, k, s in cfg.extractor_conv_layer_config)
    return {
        "_name": "data2vec_audio",
        "extractor_mode": "layer_norm" if cfg.extractor_mode == "layer_norm" else "default",
        "conv_feature_layers": f"[{layers}]",
        "conv_bias": cfg.extractor_conv_bias,
        "encoder_layers": cfg.encoder_num_layers,
        "encoder_embed_dim": cfg.encoder_embed_dim,
        "encoder_ffn_embed_dim": cfg.encoder_ff_interm_features,
        "encoder_attention_heads": cfg.encoder_num_heads,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "layer_norm_first": cfg.encoder_layer_norm_first,
        "conv_pos": cfg.encoder_pos_conv_kernel,
        "conv_pos_groups": cfg.encoder_pos_conv_groups,
        "pos_conv_depth": cfg.encoder_pos_conv_depth,
        "dropout": cfg.encoder_dropout,
        "attention_dropout": cfg.encoder_attention_dropout,
        "activation_dropout": cfg.encoder_ff_interm_dropout,
        "dropout_input": cfg.encoder_projection_dropout,
        "dropout_features": 0.0,
        "encoder_layerdrop": cfg.encoder_layer_drop,
        "feature_grad_mult": cfg.feature_grad_mult,
        # fairseq pads the encoder input to a multiple of 2 frames by default, which changes the attention kernel
        "required_seq_len_multiple": 1,
        "average_top_k_layers": cfg.num_codebooks,
        "ema_decay": cfg.ema_start_decay,
        "ema_end_decay": cfg.ema_final_decay,
        "ema_anneal_end_step": cfg.ema_final_step,
        "instance_norm_target_layer": True,
    }


def s3prl_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, Any]:
    """fairseq-named student weights from our state dict (full model or student), q/k/v split, zero biases when
    the model has none, and an empty ``_ema``."""
    check_exportable(cfg)
    names = keymap(cfg)
    student = {k: v for k, v in state.items() if not k.startswith(_TRAINING_ONLY) and k != "current_step"}
    split = split_qkv(student)
    if not cfg.encoder_qkv_bias:
        for layer in range(cfg.encoder_num_layers):
            for part in "qkv":
                split[f"student.layers.{layer}.attention.{part}.bias"] = torch.zeros(cfg.encoder_embed_dim)
    weights: dict[str, Any] = {names.to_theirs(k): v.detach().float().cpu().contiguous() for k, v in split.items()}
    weights["_ema"] = {}  # s3prl deletes it before loading; the teacher is not needed for features
    return weights


def export_s3prl(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s student (a ``DinoSR``, ``SpidR`` or ``Student``) to ``path`` as an s3prl
    ``data2vec_custom`` checkpoint (``s3prl.hub.data2vec_custom(ckpt=path)``)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"output directory {path.parent} does not exist")
    state = model.state_dict()
    checkpoint = {
        "task_cfg": {"_name": "audio_pretraining", "sample_rate": 16000, "normalize": True},
        "model_cfg": model_cfg(model.cfg),
        "model_weight": s3prl_state_dict(state, model.cfg),
        "spidr": {"model_type": "spidr" if isinstance(model.cfg, SpidRConfig) else "dinosr",
                  "step": int(state["current_step"].reshape(-1)[0]) if "current_step" in state else 0,
                  "config": dataclasses.asdict(model.cfg)},
    }
    # An interrupted --overwrite leaves the earlier export whole. Saved through an open file: torch names the records
    # inside after the file it is given a path to, and the temporary name is random (two exports would differ).
    try:
        with replaced_when_done(path) as partial, partial.open("wb") as handle:
            torch.save(checkpoint, handle)
    except RuntimeError as error:  # (a full disk: told as the OSError, naming the export)
        failed = failed_write(error, path)
        if failed is not None:
            raise failed from error
        raise
    return path


def is_s3prl_export(data: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint dict has the layout of s3prl's ``data2vec_custom`` checkpoints."""
    return all(key in data for key in ("task_cfg", "model_cfg", "model_weight"))


def read_s3prl_export(data: Mapping[str, Any], *, where: str) -> tuple[ModelConfig, dict[str, torch.Tensor], int]:
    """(model config, our student state dict, step) of an s3prl ``data2vec_custom`` checkpoint: ``export_s3prl``'s
    (its ``spidr`` entry gives the model config, type and step), else a DinoSR config read from the fairseq options
    (the heads' settings at their defaults) and step 0. Zero q/k/v biases, which the export adds for a model
    without them, are dropped with the config's bias."""
    from spidr.models.convert import fairseq_model_config

    settings, weights = data["model_cfg"], data["model_weight"]
    if not isinstance(settings, Mapping) or not isinstance(weights, Mapping):
        raise ValueError(f"{where}: an s3prl checkpoint's model_cfg and model_weight must be dicts")
    saved = data.get("spidr") if isinstance(data.get("spidr"), Mapping) else {}
    try:
        if isinstance(saved.get("config"), Mapping):  # the exported model's own config, heads' settings included
            cfg: ModelConfig = model_config_from_dict(dict(saved["config"]), saved.get("model_type", "dinosr"))
        else:
            cfg = fairseq_model_config(settings)
        names = keymap(cfg)
        state = fuse_qkv({names.to_ours(key): value for key, value in weights.items()
                          if key != "_ema" and isinstance(value, torch.Tensor)})
        biases = [value for key, value in state.items() if key.endswith(".attention.qkv.bias")]
        if "config" not in saved and not any(bool(value.any()) for value in biases):
            cfg = model_config_from_dict({**dataclasses.asdict(cfg), "encoder_qkv_bias": False}, "dinosr")
        if not cfg.encoder_qkv_bias:
            state = {key: value for key, value in state.items() if not key.endswith(".attention.qkv.bias")}
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    step = int(saved.get("step", 0))
    state = {key: value.float() for key, value in state.items()}
    state["current_step"] = torch.tensor([step], dtype=torch.long)
    return cfg, state, step
