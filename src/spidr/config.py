"""Run configuration: one frozen dataclass per TOML section, loading, ``--set`` overrides and validation.

Field names and defaults follow the official SpidR code (spec §8.4) so an official TOML runs as is; the fairseq
name of a model field is given in its comment. Fields that the official code lacks are marked "(spidr addition)"
and default to the official behaviour.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from spidr.input_files import existing_file

ConvLayer = tuple[int, int, int]  # (channels, kernel, stride)

DEFAULT_CONV_LAYERS: tuple[ConvLayer, ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


def num_samples_for_frames(frames: int, conv_layers: Sequence[ConvLayer]) -> int:
    """Fewest samples giving ``frames`` frames: inverts floor((L − k)/s) + 1 layer by layer from the top (1 frame:
    the front end's receptive field). Here, not in spidr.models.frames, so that configs check it without torch."""
    length = frames
    for _, kernel, stride in reversed(conv_layers):
        length = (length - 1) * stride + kernel
    return length

ModelType = Literal["dinosr", "spidr"]


# --------------------------------------------------------------------------------------------------------------
# Validation machinery shared by every section
# --------------------------------------------------------------------------------------------------------------


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe(args[0])})"
        return "a list [" + ", ".join(_describe(a) for a in args) + "]"
    if origin is dict:
        return "a table"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, where: str) -> Any:  # noqa: PLR0912
    """Return ``value`` converted to ``annotation`` (lists to tuples, ints to floats) or raise ``ValueError``."""
    origin = typing.get_origin(annotation)
    expected = _describe(annotation)
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, where)
            except ValueError as error:
                if isinstance(value, (datetime.date, datetime.time)) and option is str:
                    raise ValueError(f"{error}, or none" if type(None) in typing.get_args(annotation)
                                     else str(error)) from None
                continue
        raise ValueError(f"{where} = {value!r} is invalid: expected {expected}")
    if annotation is type(None):
        if value is None:
            return None
        raise ValueError(f"{where} = {value!r} is invalid: expected none")
    if origin is Literal:
        if value in typing.get_args(annotation) and type(value) is not bool:
            return value
        raise ValueError(f"{where} = {value!r} is invalid: expected {expected}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} = {value!r} is invalid: expected {expected}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where} = {value!r} is invalid: expected {expected}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} = {value!r} is invalid: expected true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where} = {value!r} is invalid: expected an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML and JSON spell inf and nan; no setting means them
                raise ValueError(f"{where} = {value!r} is invalid: expected a finite number")
            return float(value)
        raise ValueError(f"{where} = {value!r} is invalid: expected a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (datetime.date, datetime.time)):  # (TOML reads an unquoted 2024-01-01 as a date)
            raise ValueError(f"{where} = {value.isoformat()} is invalid: expected a string (TOML reads an unquoted "
                             f"date or time as one: write \"{value.isoformat()}\")")
        raise ValueError(f"{where} = {value!r} is invalid: expected a string")
    raise TypeError(f"no coercion rule for {annotation!r} ({where})")


def check_fields(obj: Any, section: str) -> None:
    """Coerce every field of a frozen dataclass in place to its annotated type (names the field on error)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _coerce(getattr(obj, f.name), hints[f.name], f"{section}.{f.name}")
        object.__setattr__(obj, f.name, value)


def _check_json_values(value: Any, where: str) -> None:
    """Refuse what a run's config.json cannot hold as it is, naming it: a TOML date or time (JSON has none), a NaN or
    an infinity (a NaN differs from itself, so a resumed run would report the setting as changed)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json_values(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_values(item, f"{where}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} = {value!r} is invalid: expected a finite number")
    elif isinstance(value, (datetime.date, datetime.time)):
        raise ValueError(f"{where} = {value.isoformat()} is invalid: a TOML date or time cannot be saved in the "
                         f"run's config.json; write it as a string (\"{value.isoformat()}\")")
    elif value is not None and not isinstance(value, (str, int, float)):  # (bool is an int)
        raise ValueError(f"{where} = {value!r} is invalid: expected a string, number, boolean, list or table")


def require(condition: bool, message: str) -> None:  # noqa: FBT001
    if not condition:
        raise ValueError(message)


def require_seed(seed: int, name: str) -> None:
    """A seed must fit the 64-bit integers that torch and numpy seed with (a larger one failed at the first
    generator, with 'Overflow when unpacking long long' and no field named)."""
    require(-(2**63) <= seed < 2**63, f"{name} = {seed} must fit in 64 bits (between -2**63 and 2**63 - 1)")


def from_mapping(cls: type, data: dict[str, Any], section: str) -> Any:
    """Build ``cls`` from a mapping, refusing unknown keys with the list of allowed ones."""
    if not isinstance(data, dict):
        raise ValueError(f"[{section}] must be a table, got {data!r}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(
            f"[{section}] has unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(sorted(allowed))}"
        )
    try:
        return cls(**data)
    except ValueError as error:
        # A section class checks its fields under its own section's name ("data.num_buckets"); a [validation.NAME]
        # table is a DataConfig too, and its errors must name that table, not [data], which may be fine.
        home = getattr(cls, "SECTION", section)
        if home == section:
            raise
        # Only "data.<one of its fields>", not the same text inside a value the user wrote
        names = "|".join(re.escape(f.name) for f in dataclasses.fields(cls))
        raise ValueError(re.sub(rf"(?<![\w.]){re.escape(home)}\.(?=({names})\b)", lambda _: f"{section}.",
                                str(error))) from None


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskingConfig:
    """Span masking of student input frames (fairseq ``compute_mask_indices`` semantics, spec §5)."""

    mask_prob: float = 0.8
    mask_selection: Literal["static", "uniform", "normal", "poisson"] = "static"
    mask_other: float = 0.0
    mask_length: int = 10
    no_mask_overlap: bool = False
    mask_min_space: int = 1
    # Channel masking is accepted for config compatibility; the official collator drops it and so do we
    # (a non-zero probability is refused rather than silently ignored).
    mask_channel_prob: float = 0.0
    mask_channel_selection: Literal["static", "uniform", "normal", "poisson"] = "static"
    mask_channel_other: float = 0.0
    mask_channel_length: int = 10
    no_mask_channel_overlap: bool = False
    mask_channel_min_space: int = 1
    min_masks: int = 2  # (spidr addition) hard-coded to 2 in the official code, 1 in fairseq DinoSR

    def __post_init__(self) -> None:
        check_fields(self, "masking")
        require(0.0 <= self.mask_prob <= 1.0, f"masking.mask_prob = {self.mask_prob} must be in [0, 1]")
        require(self.mask_length >= 1, f"masking.mask_length = {self.mask_length} must be >= 1")
        require(self.mask_min_space >= 0, f"masking.mask_min_space = {self.mask_min_space} must be >= 0")
        require(self.min_masks >= 0, f"masking.min_masks = {self.min_masks} must be >= 0")
        # Span lengths are drawn in [mask_other, 2·mask_length] (uniform) or around mask_length with standard
        # deviation mask_other (normal): outside these ranges the draw fails at the first batch.
        if self.mask_selection == "uniform":
            require(0 <= self.mask_other <= 2 * self.mask_length,
                    f"masking.mask_other = {self.mask_other} must be in [0, 2 × masking.mask_length = "
                    f"{2 * self.mask_length}] with mask_selection = 'uniform' (the shortest span length)")
        if self.mask_selection == "normal":
            require(self.mask_other >= 0, f"masking.mask_other = {self.mask_other} must be >= 0 with "
                                          "mask_selection = 'normal' (the standard deviation of span lengths)")
        require(
            self.mask_channel_prob == 0.0,
            f"masking.mask_channel_prob = {self.mask_channel_prob} is not supported: channel masking is never "
            "applied by SpidR/DinoSR; set it to 0",
        )


@dataclass(frozen=True)
class ModelConfig:
    """Fields shared by DinoSR and SpidR (spec §8.4). Use ``DinoSRConfig`` or ``SpidRConfig``."""

    extractor_mode: Literal["layer_norm", "group_norm"] = "layer_norm"  # fairseq extractor_mode ("default"=group)
    extractor_conv_bias: bool = False  # conv_bias
    extractor_conv_layer_config: tuple[ConvLayer, ...] = DEFAULT_CONV_LAYERS  # conv_feature_layers
    # (spidr addition) "log_mel": the first extractor_conv_layer_config entry [num_mels, window, hop] is a fixed
    # log-mel filterbank (the MFCC baseline's, before its DCT) instead of a learned conv; later entries stay convs.
    extractor_type: Literal["conv", "log_mel"] = "conv"
    encoder_embed_dim: int = 768
    encoder_projection_dropout: float = 0.0  # dropout_input
    encoder_pos_conv_kernel: int = 95  # conv_pos
    encoder_pos_conv_groups: int = 16  # conv_pos_groups
    encoder_pos_conv_depth: int = 5  # pos_conv_depth
    encoder_num_layers: int = 12  # encoder_layers
    encoder_num_heads: int = 12  # encoder_attention_heads
    encoder_attention_dropout: float = 0.1  # attention_dropout
    encoder_ff_interm_features: int = 3072  # encoder_ffn_embed_dim
    encoder_ff_interm_dropout: float = 0.0  # activation_dropout
    encoder_dropout: float = 0.1  # dropout
    encoder_layer_norm_first: bool = False  # layer_norm_first
    encoder_layer_drop: float = 0.05  # encoder_layerdrop
    encoder_qkv_bias: bool = False  # True for the original fairseq DinoSR
    codebook_size: int = 256
    codebook_decay: float = 0.9  # codebook_init_decay
    num_codebooks: int = 8  # average_top_k_layers
    ema_start_decay: float = 0.999  # ema_decay
    ema_final_decay: float = 0.9999  # ema_end_decay (DinoSR schedule)
    ema_final_step: int = 30000  # ema_anneal_end_step (DinoSR schedule)
    ema_exclude_layers: tuple[str, ...] = ("pos_conv_embed",)
    freeze_step: int = 200000  # freeze_teacher_step (official fairseq: 200 001)
    # (spidr additions, off by default so the official numerics are untouched)
    feature_grad_mult: float = 1.0  # scales gradients reaching the conv extractor (wav2vec 2.0 uses 0.1)
    # Re-seed dead codewords at random frames of the current batch. A codeword is dead when its EMA count, which
    # then decays for unused codewords too (their centroids are unchanged), falls below codebook_dead_threshold
    # times the mean count of its codebook; it restarts with twice that count (at least 1).
    codebook_reseed_dead: bool = False
    codebook_dead_threshold: float = 0.05
    # "data": the first training step sets every centroid to a random target frame of its batch (k-means style)
    codebook_init: Literal["random", "data"] = "random"
    # "cosine": assign each target to the codeword of most similar direction instead of the nearest (official)
    codebook_distance: Literal["euclidean", "cosine"] = "euclidean"
    # "ema": the teacher computes its input from its own EMA copy of the conv extractor and projection (as in
    # BYOL/DINO) instead of sharing the student's (official): the student's front end can no longer reshape the
    # targets at once, so collapsing it to a constant stops making the targets trivially predictable.
    teacher_feature_encoder: Literal["shared", "ema"] = "shared"
    # "copy": the teacher starts as an exact copy of the student encoder, as in fairseq DinoSR. "reinit" (official,
    # spec §4.1) draws fresh weights for its linear and attention layers, so it starts unrelated to the student.
    teacher_init: Literal["reinit", "copy"] = "reinit"
    # "all": the codebooks' EMA update (and dead-codeword re-seeding) reads the teacher targets of every non-padded
    # frame instead of only the masked, scored ones (official). At small batch sizes a codeword sees ~2.5x more
    # frames per step, so its centroid is less noisy; the loss still scores the masked frames only.
    codebook_update_frames: Literal["masked", "all"] = "masked"
    # "valid": the teacher targets' instance norm takes its mean and variance over each utterance's real frames only.
    # "all" (official, spec §14.24) counts a padded batch's padding too, so an utterance's targets change with the
    # length of the longest utterance it is batched with. Without padding (data.enable_padding = false, the
    # default: batches are cropped to their shortest utterance) the two are the same. (A group_norm front end pools
    # its first GroupNorm over the padding as well: only unpadded batches make its targets independent of the batch.)
    target_norm_frames: Literal["all", "valid"] = "all"
    # > 0 (needs extractor_type = "log_mel"): in training the student's input spectrum is warped per utterance by a
    # factor drawn from [1 − w, 1 + w] (VTLP: formants and pitch move as for another speaker) while the teacher reads
    # the clean input, so the targets the student must predict do not change with the speaker.
    student_frequency_warp: float = 0.0

    def __post_init__(self) -> None:
        section = "model"
        check_fields(self, section)
        for i, (channels, kernel, stride) in enumerate(self.extractor_conv_layer_config):
            require(
                channels >= 1 and kernel >= 1 and stride >= 1,
                f"{section}.extractor_conv_layer_config[{i}] = {[channels, kernel, stride]} must hold positive "
                "[channels, kernel, stride]",
            )
        require(
            len(self.extractor_conv_layer_config) >= 1,
            f"{section}.extractor_conv_layer_config is empty; expected at least one [channels, kernel, stride]",
        )
        if self.extractor_type == "log_mel":
            num_mels, window, _ = self.extractor_conv_layer_config[0]
            num_bins = (1 << (window - 1).bit_length()) // 2 + 1
            require(
                window >= 2 and num_mels <= num_bins,
                f"{section}.extractor_conv_layer_config[0] = {list(self.extractor_conv_layer_config[0])} must be "
                f"[num_mels, window, hop] of a log-mel filterbank (extractor_type = 'log_mel'): window >= 2 samples "
                f"and num_mels <= {num_bins} frequency bins",
            )
        for name in ("encoder_embed_dim", "encoder_num_layers", "encoder_num_heads", "encoder_ff_interm_features",
                     "codebook_size", "num_codebooks", "encoder_pos_conv_depth", "encoder_pos_conv_groups",
                     "encoder_pos_conv_kernel"):
            value = getattr(self, name)
            require(value >= 1, f"{section}.{name} = {value} must be >= 1")
        require(
            self.encoder_embed_dim % self.encoder_num_heads == 0,
            f"{section}.encoder_embed_dim = {self.encoder_embed_dim} must be divisible by "
            f"{section}.encoder_num_heads = {self.encoder_num_heads}",
        )
        require(
            self.encoder_embed_dim % self.encoder_pos_conv_groups == 0,
            f"{section}.encoder_embed_dim = {self.encoder_embed_dim} must be divisible by "
            f"{section}.encoder_pos_conv_groups = {self.encoder_pos_conv_groups}",
        )
        require(
            self.num_codebooks <= self.encoder_num_layers,
            f"{section}.num_codebooks = {self.num_codebooks} must be <= {section}.encoder_num_layers = "
            f"{self.encoder_num_layers} (one codebook per top layer)",
        )
        require(self.codebook_size >= 2, f"{section}.codebook_size = {self.codebook_size} must be >= 2")
        for name in ("encoder_projection_dropout", "encoder_attention_dropout", "encoder_ff_interm_dropout",
                     "encoder_dropout", "encoder_layer_drop", "codebook_decay", "ema_start_decay",
                     "ema_final_decay"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"{section}.{name} = {value} must be in [0, 1]")
        require(self.ema_final_step >= 1, f"{section}.ema_final_step = {self.ema_final_step} must be >= 1")
        require(self.freeze_step >= 0, f"{section}.freeze_step = {self.freeze_step} must be >= 0")
        require(
            self.feature_grad_mult >= 0.0, f"{section}.feature_grad_mult = {self.feature_grad_mult} must be >= 0"
        )
        require(
            0.0 <= self.student_frequency_warp < 0.25,
            f"{section}.student_frequency_warp = {self.student_frequency_warp} must be in [0, 0.25) (a relative "
            "frequency change; 0 turns the warp off)",
        )
        require(
            self.student_frequency_warp == 0.0 or self.extractor_type == "log_mel",
            f"{section}.student_frequency_warp = {self.student_frequency_warp} needs {section}.extractor_type = "
            f"'log_mel' (the warp acts on the filterbank); got {section}.extractor_type = {self.extractor_type!r}",
        )
        require(
            self.codebook_dead_threshold >= 0.0,
            f"{section}.codebook_dead_threshold = {self.codebook_dead_threshold} must be >= 0",
        )

    @property
    def model_type(self) -> ModelType:
        raise NotImplementedError

    @property
    def padding_changes_features(self) -> bool:
        """Whether an utterance's features depend on the padding around it in a batch.

        A ``group_norm`` front end normalises each channel of its first conv over the whole time axis, padding
        included, as wav2vec 2.0 and fairseq DinoSR do: its statistics are those of the utterance's own samples only
        when it runs unpadded. A log-mel first layer has no GroupNorm (nor has any layer after it).
        """
        return self.extractor_mode == "group_norm" and self.extractor_type != "log_mel"


@dataclass(frozen=True)
class DinoSRConfig(ModelConfig):
    """DinoSR as reproduced in the official SpidR code: all heads read the student's final layer."""

    @property
    def model_type(self) -> ModelType:
        return "dinosr"


SPIDR_ONLY_MODEL_FIELDS = ("ema_timescale", "ema_threshold")  # SpidR's teacher-EMA schedule (SpidRConfig)


@dataclass(frozen=True)
class SpidRConfig(ModelConfig):
    """SpidR: student layer k predicts teacher layer k; exponential teacher-EMA schedule; no layer drop."""

    encoder_layer_drop: float = 0.0
    ema_timescale: int = 20000
    ema_threshold: float = 1e-7

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.ema_timescale >= 1, f"model.ema_timescale = {self.ema_timescale} must be >= 1")
        require(self.ema_threshold >= 0.0, f"model.ema_threshold = {self.ema_threshold} must be >= 0")

    @property
    def model_type(self) -> ModelType:
        return "spidr"


def model_config_class(model_type: ModelType) -> type[ModelConfig]:
    match model_type:
        case "dinosr":
            return DinoSRConfig
        case "spidr":
            return SpidRConfig
    raise ValueError(f"run.model_type = {model_type!r} is invalid: expected 'dinosr' or 'spidr'")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW, LR schedule, precision and clipping (spec §7)."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    eps: float = 1e-6
    max_norm: float = 10.0
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01
    max_steps: int = 400000
    warmup_steps: int = 12000
    hold_steps: int = 188000
    decay_steps: int = 200000
    rsqrt_timescale: int = 10000
    rsqrt_shift: int = 0
    scheduler: Literal["tristage", "cosine", "rsqrt", "constant"] = "tristage"
    exclude_from_optimizer: tuple[str, ...] = ("teacher",)
    to_freeze: tuple[str, ...] = ("feature_extractor", "feature_projection")
    # (spidr addition) micro-batches per optimizer step, which act as that many ranks: one gradient, and one codebook
    # update from all their frames (each labelled by the step's codebooks), as with the paper's 16 GPUs
    grad_accum_steps: int = 1
    # (spidr addition) the conv extractor and projection (the to_freeze group) learn at lr × this factor. Adam
    # normalises gradients, so this, not feature_grad_mult, is what slows the front end down.
    feature_encoder_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self, "optimizer")
        require(self.lr > 0, f"optimizer.lr = {self.lr} must be > 0")
        for i, beta in enumerate(self.betas):
            require(0.0 <= beta < 1.0, f"optimizer.betas[{i}] = {beta} must be in [0, 1)")
        require(self.eps > 0, f"optimizer.eps = {self.eps} must be > 0")
        require(self.weight_decay >= 0, f"optimizer.weight_decay = {self.weight_decay} must be >= 0")
        require(self.max_norm > 0, f"optimizer.max_norm = {self.max_norm} must be > 0")
        for name in ("max_steps", "grad_accum_steps", "rsqrt_timescale"):
            require(getattr(self, name) >= 1, f"optimizer.{name} = {getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "hold_steps", "decay_steps", "rsqrt_shift"):
            require(getattr(self, name) >= 0, f"optimizer.{name} = {getattr(self, name)} must be >= 0")
        for name in ("init_lr_scale", "final_lr_scale"):
            value = getattr(self, name)
            require(0.0 < value <= 1.0, f"optimizer.{name} = {value} must be in (0, 1]")
        require(self.feature_encoder_lr_scale >= 0.0,
                 f"optimizer.feature_encoder_lr_scale = {self.feature_encoder_lr_scale} must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    """Manifest, decoding, bucketing and loading (spec §6)."""

    SECTION: ClassVar[str] = "data"  # the name its checks give; a [validation.NAME] table's errors are renamed

    manifest: str = ""
    enable_padding: bool = False  # pad to the longest utterance (see model.target_norm_frames) instead of cropping
    rand_crop: bool = True
    normalize: bool = True
    num_buckets: int = 1000
    min_sample_size: int = 2000
    max_sample_size: int = 320000
    max_batch_length: int = 3800000
    drop_last: bool = False
    num_workers: int = 10  # clamped to the CPUs this process may use
    # (spidr default; official false) Batches in page-locked memory when CUDA is available: copying a pageable batch
    # to the GPU makes the host wait for the step queued before it, so it cannot launch the next one meanwhile.
    pin_memory: bool = True
    prefetch_factor: int = 2
    persistent_workers: bool = True
    random_seed: int = 0
    bucket_method: Literal["uniform", "percentile"] = "uniform"
    alignments_path: str | None = None  # official field, unused by pretraining there too: warned about when set
    max_bad_fraction: float = 0.05  # (spidr addition) stop when more of the manifest than this is unreadable

    def __post_init__(self) -> None:
        section = self.SECTION
        check_fields(self, section)
        for name in ("num_buckets", "min_sample_size", "max_sample_size", "max_batch_length"):
            require(getattr(self, name) >= 1, f"{section}.{name} = {getattr(self, name)} must be >= 1")
        require(self.num_workers >= 0, f"{section}.num_workers = {self.num_workers} must be >= 0")
        require_seed(self.random_seed, f"{section}.random_seed")
        require(self.prefetch_factor >= 1, f"{section}.prefetch_factor = {self.prefetch_factor} must be >= 1")
        require(
            self.min_sample_size <= self.max_sample_size,
            f"{section}.min_sample_size = {self.min_sample_size} must be <= {section}.max_sample_size = "
            f"{self.max_sample_size}",
        )
        require(
            self.max_batch_length >= self.min_sample_size,
            f"{section}.max_batch_length = {self.max_batch_length} must be >= {section}.min_sample_size = "
            f"{self.min_sample_size} (no utterance would fit in a batch)",
        )
        require(
            0.0 <= self.max_bad_fraction <= 1.0,
            f"{section}.max_bad_fraction = {self.max_bad_fraction} must be in [0, 1]",
        )


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives and how it is driven (spec §8.4)."""

    workdir: str = ""
    wandb_project: str = ""
    wandb_name: str = ""
    # The official default is "offline" (W&B always on); wandb is an optional extra here, used only when asked.
    wandb_mode: Literal["online", "offline", "disabled"] = "disabled"
    random_seed: int = 0
    use_deterministic: bool = False
    log_interval: int = 200
    save_interval: int = 2500
    init_ckpt: str | None = None
    compile: bool = True  # torch.compile on CUDA only; ignored on CPU
    keep_latest: int = -1
    model_type: ModelType = "dinosr"
    # Official field: a SLURM table for the separate validation jobs the official trainer launches. spidr scores
    # the [validation] sets in-process at every checkpoint instead, so a table given here is warned about.
    slurm_validation: dict[str, Any] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"  # (spidr addition)
    max_consecutive_nonfinite: int = 10  # (spidr addition) stop (with a checkpoint) after this many NaN/Inf steps
    # (spidr addition) When the host reads a step's NaN/Inf guard and metrics. "step": after every step, and a
    # non-finite step is not counted. "log": only at log and checkpoint steps, so that a GPU never waits for the
    # host in between; a non-finite step is then skipped on the device (weights, AdamW state, codebooks and teacher
    # stay as they were) but counts toward the step number and the schedules, as a GradScaler skip does in the
    # official trainer. Needs fused AdamW without a GradScaler (not float16). "auto": "log" on CUDA in bf16 or
    # fp32, else "step".
    host_sync: Literal["auto", "step", "log"] = "auto"
    # (spidr addition) Return glibc's free heap pages to the OS when the conv front end's backward starts: a CPU
    # step's peak RSS drops (base fp32, 2 × 4 s: -11 %, step +3-6 %; 4 × 8 s: -17 %, step faster). "auto": in each
    # backward (micro-batch) whose first conv layer outputs over 32 MiB (below that the trim only costs time);
    # "always": in every backward; "never". CPU training only. See spidr/train/memory.py.
    trim_heap: Literal["auto", "always", "never"] = "auto"

    def __post_init__(self) -> None:
        section = "run"
        for f in dataclasses.fields(self):
            if f.name == "slurm_validation":
                continue
            hints = typing.get_type_hints(type(self))
            object.__setattr__(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f"{section}.{f.name}"))
        if self.slurm_validation is not None and not isinstance(self.slurm_validation, dict):
            raise ValueError(f"{section}.slurm_validation = {self.slurm_validation!r} must be a table")
        if self.slurm_validation is not None:
            _check_json_values(self.slurm_validation, f"{section}.slurm_validation")
        for name in ("log_interval", "save_interval", "max_consecutive_nonfinite"):
            require(getattr(self, name) >= 1, f"{section}.{name} = {getattr(self, name)} must be >= 1")
        require_seed(self.random_seed, f"{section}.random_seed")
        require(
            self.keep_latest == -1 or self.keep_latest >= 1,
            f"{section}.keep_latest = {self.keep_latest} must be -1 (keep all) or >= 1",
        )

    @property
    def run_dir(self) -> Path:
        """``<workdir>/<wandb_project>/<wandb_name>``: checkpoints, logs and ``config.json`` live here."""
        return Path(self.workdir) / self.wandb_project / self.wandb_name


@dataclass(frozen=True)
class Config:
    """A whole pretraining run."""

    run: RunConfig
    data: DataConfig
    model: ModelConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    validation: dict[str, DataConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("workdir", "wandb_project", "wandb_name"):
            require(bool(getattr(self.run, name)), f"run.{name} is required (the run directory is "
                     "<workdir>/<wandb_project>/<wandb_name>)")
        for section, data in self.data_sections():
            require(bool(data.manifest), f"{section}.manifest is required (a .csv, .tsv or .jsonl manifest)")
        require(
            self.model.model_type == self.run.model_type,
            f"run.model_type = {self.run.model_type!r} does not match the model section's class "
            f"{type(self.model).__name__}",
        )
        # Two frames: a batch cropped to one frame gets no masked frame about a third of the time with the default
        # masking (fairseq's span placement puts the starts past the end), and its training step is skipped.
        two_frames = num_samples_for_frames(2, self.model.extractor_conv_layer_config)
        for section, data in self.data_sections():
            require(data.min_sample_size >= two_frames,
                    f"{section}.min_sample_size = {data.min_sample_size} is shorter than two frames of the model's "
                    f"front end ({two_frames} samples): a batch cropped to one frame often has no masked frame")

    def data_sections(self) -> list[tuple[str, DataConfig]]:
        """``(section name, its data config)`` of the training data and of every validation set."""
        return [("data", self.data), *((f"validation.{name}", data) for name, data in self.validation.items())]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that ``config_from_dict`` turns back into an equal ``Config``."""
        out = dataclasses.asdict(self)
        out["model"] = dataclasses.asdict(self.model)
        return json.loads(json.dumps(out))


def unused_settings(cfg: Config) -> list[str]:
    """One sentence per field that ``cfg`` sets but that has no effect (official fields kept so that official TOMLs
    load, a peak learning rate the warm-up never reaches) or not the effect it seems to (padding with a group_norm
    front end): the training entry points log them as warnings."""
    notes = []
    if cfg.run.slurm_validation is not None:
        where = (f"the [validation] sets ({', '.join(cfg.validation)}) are scored in-process at every checkpoint"
                 if cfg.validation else "and no [validation] set is configured, so nothing is validated")
        notes.append(f"run.slurm_validation = {cfg.run.slurm_validation!r} is not used: spidr launches no SLURM "
                     f"validation jobs; {where}")
    for section, data in cfg.data_sections():
        if data.alignments_path is not None:
            notes.append(f"{section}.alignments_path = {data.alignments_path!r} is not used by pretraining (as in "
                         "the official code); phone alignments go to spidr evaluate / units-quality")
    if cfg.model.model_type == "spidr":
        defaults = ModelConfig()
        for name in ("ema_final_decay", "ema_final_step"):
            value = getattr(cfg.model, name)
            if value != getattr(defaults, name):
                notes.append(f"model.{name} = {value!r} has no effect on SpidR (a DinoSR field): SpidR's teacher "
                             "EMA follows the exponential schedule of model.ema_timescale and model.ema_threshold")
        model = cfg.model
        if model.ema_start_decay < 1 and 1 - model.ema_start_decay <= model.ema_threshold:  # (1.0: frozen on purpose)
            notes.append(f"model.ema_start_decay = {model.ema_start_decay!r} has no effect: 1 − decay is at or under "
                         f"model.ema_threshold = {model.ema_threshold!r} from step 1, so the teacher never moves")
    padded = [section for section, data in cfg.data_sections() if data.enable_padding]
    if cfg.model.target_norm_frames == "valid" and not padded:
        notes.append("model.target_norm_frames = 'valid' has no effect: no data section sets enable_padding, so "
                     "batches are cropped to their shortest utterance and hold no padding")
    if padded and cfg.model.padding_changes_features:
        notes.append(f"{', '.join(padded)}.enable_padding with model.extractor_mode = 'group_norm': that front end's "
                     "first GroupNorm takes its statistics over the padding, so an utterance's features (and targets) "
                     "change with the longest one in its batch, whatever model.target_norm_frames says")
    o = cfg.optimizer
    if o.warmup_steps >= o.max_steps:
        notes.append(f"optimizer.lr = {o.lr:g} is never reached: optimizer.warmup_steps = {o.warmup_steps} is not "
                     f"below optimizer.max_steps = {o.max_steps} (the run ends during the warm-up)")
    return notes


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

_SECTIONS = ("run", "data", "model", "optimizer", "masking", "validation")


def model_config_from_dict(data: dict[str, Any], model_type: ModelType) -> ModelConfig:
    """Build a model config from a dict (e.g. a fixture JSON; a ``__class__`` entry is ignored). SpidR's teacher-EMA
    settings in a DinoSR config are left out with a warning, as DinoSR's are kept without effect in a SpidR one:
    one config trains either model by ``--set run.model_type``."""
    data = {k: v for k, v in data.items() if k != "__class__"}
    if model_type == "dinosr":
        ignored = [name for name in SPIDR_ONLY_MODEL_FIELDS if name in data]
        for name in ignored:
            logging.getLogger(__name__).warning(
                "model.%s = %r has no effect on DinoSR (a SpidR field): DinoSR's teacher EMA goes from "
                "model.ema_start_decay to model.ema_final_decay over model.ema_final_step steps", name, data[name])
        data = {k: v for k, v in data.items() if k not in ignored}
    return from_mapping(model_config_class(model_type), data, "model")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a full run config from a nested dict with the sections ``run, data, model, optimizer, masking,
    validation``; every key is checked."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; allowed sections: {', '.join(_SECTIONS)}")
    run = from_mapping(RunConfig, data.get("run", {}), "run")
    validation_tables = data.get("validation", {})
    if not isinstance(validation_tables, dict):
        raise ValueError(f"[validation] must be a table of named data sets, got {validation_tables!r}")
    validation = {
        name: from_mapping(DataConfig, table, f"validation.{name}") for name, table in validation_tables.items()
    }
    return Config(
        run=run,
        data=from_mapping(DataConfig, data.get("data", {}), "data"),
        model=model_config_from_dict(data.get("model", {}), run.model_type),
        optimizer=from_mapping(OptimizerConfig, data.get("optimizer", {}), "optimizer"),
        masking=from_mapping(MaskingConfig, data.get("masking", {}), "masking"),
        validation=validation,
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as a TOML value, else kept as a plain string."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    path = _dotted_key(dotted)
    if len(path) < 2 or not all(path):
        raise ValueError(f"override {text!r} must name a section and a key, e.g. optimizer.lr=1e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def override_key(text: str) -> str:
    """The setting an override ``section.key=value`` sets, as ``apply_overrides`` reads it, written ``section.key``
    (``"optimizer . max_steps=5"`` and ``'optimizer."max_steps"=5'`` set ``optimizer.max_steps``): for the commands
    that refuse a --set of a setting they own."""
    path, _ = parse_override(text)
    return ".".join(path)


def _dotted_key(dotted: str) -> list[str]:
    """The parts of an override's ``section.key`` as TOML reads a dotted key, so that a quoted part holding a space or
    a dot (``validation."dev clean".manifest``, the table ``[validation."dev clean"]``) names that table; text that is
    no TOML key is split at its dots."""
    try:
        node: Any = tomllib.loads(f"{dotted.strip()} = 0")
        path = []
        while isinstance(node, dict):
            ((key, node),) = node.items()
            path.append(key)
    except (tomllib.TOMLDecodeError, ValueError):
        return [p.strip() for p in dotted.strip().split(".")]
    return path


def _string_field(annotation: Any) -> bool:
    """Whether a field holds text only: ``str`` or ``str | None``."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (types.UnionType, typing.Union) else (
        annotation,)
    return str in options and all(option in (str, type(None)) for option in options)


def _optional_field(annotation: Any) -> bool:
    """Whether a field may be none: ``X | None``."""
    union = typing.get_origin(annotation) in (types.UnionType, typing.Union)
    return union and type(None) in typing.get_args(annotation)


def typed_override(annotation: Any, raw: str, parsed: Any) -> Any:
    """An override's value for a field of type ``annotation`` (None: unknown) from its text ``raw``, read as TOML
    into ``parsed``: a text field keeps the text as written (``run.wandb_name=123`` or ``=2024-01-01``, which TOML
    reads as a number and a date), and a field that may be none is cleared by ``none``, ``null`` or nothing."""
    if annotation is None:
        return parsed
    if _optional_field(annotation) and raw.strip().lower() in ("", "none", "null"):
        return None
    if _string_field(annotation) and not isinstance(parsed, str):
        return raw.strip()
    return parsed


def _field_annotation(sections: Mapping[str, type], path: Sequence[str]) -> Any:
    """The annotation of the field an override ``path`` names (``validation.NAME.key`` is a ``validation`` table's
    field), or None when ``sections`` does not know it (the config's own check then names it)."""
    cls = sections.get(path[0])
    if cls is None or len(path) != (3 if path[0] == "validation" else 2):
        return None
    return typing.get_type_hints(cls).get(path[-1])


def apply_overrides(data: dict[str, Any], overrides: list[str], *,
                    sections: Mapping[str, type] | None = None) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``section.key=value`` override applied. ``sections`` (section name →
    its dataclass; ``validation`` → that of each named table) types the values (``typed_override``)."""
    data = copy.deepcopy(data)  # (not through JSON: a TOML date or time is checked by its field, named)
    for text in overrides:
        path, value = parse_override(text)
        value = typed_override(_field_annotation(sections or {}, path), text.split("=", 1)[1], value)
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {key!r} is not a section")
        node[path[-1]] = value
    return data


# The dataclass of each section, for typing --set values (the model's: SpidR's fields hold DinoSR's).
OVERRIDE_SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "model": SpidRConfig,
                                      "optimizer": OptimizerConfig, "masking": MaskingConfig, "validation": DataConfig}


def shipped_config(name: str) -> Path:
    """``configs/<name>`` of the working directory, else that of the spidr checkout this code runs from (an
    editable install), so that ``spidr demo`` works from any folder; the first when neither exists (its error then
    names the path looked for)."""
    local = Path("configs") / name
    checkout = Path(__file__).resolve().parents[2] / "configs" / name
    return checkout if not local.is_file() and checkout.is_file() else local


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON file into a dict (errors name the file)."""
    path = Path(path)
    existing_file(path, "config file")
    from spidr.text_files import utf8_errors_named

    with utf8_errors_named(path, "config file"):
        text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark, as some Windows editors write, is dropped)
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: "
                         f"{error}") from error


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a run config from TOML/JSON and apply ``--set section.key=value`` overrides; validates everything."""
    data = apply_overrides(read_config_file(path), list(overrides), sections=OVERRIDE_SECTIONS)
    try:
        return config_from_dict(data)
    except ValueError as error:
        raise ValueError(f"{path}{' with its --set overrides' if overrides else ''}: {error}") from error
