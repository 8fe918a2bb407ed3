"""Exact export of a SpidR / DinoSR student to Hugging Face ``transformers`` (``Data2VecAudioModel``), and back.

SpidR's student is data2vec-audio's architecture: a conv extractor with a LayerNorm after every conv, LayerNorm →
Linear projection, a stack of grouped positional convs each followed by a parameter-free LayerNorm and GELU,
post-norm layers and no final LayerNorm. A directory written here (``config.json``, ``model.safetensors``,
``preprocessor_config.json``) loads with ``AutoModel.from_pretrained`` and gives the same numbers as spidr on
unpadded or equal-length batches. Writing and reading it is a key and shape mapping: neither needs
``transformers``, and nothing is unpickled.

Config (spidr ``ModelConfig`` → ``Data2VecAudioConfig``): ``extractor_conv_layer_config`` → ``conv_dim`` /
``conv_kernel`` / ``conv_stride``; ``extractor_conv_bias`` → ``conv_bias``; ``encoder_pos_conv_depth`` →
``num_conv_pos_embeddings`` (the number of positional convs); the per-layer kernel
max(3, ``encoder_pos_conv_kernel`` // depth) → ``conv_pos_kernel_size``; ``encoder_pos_conv_groups`` →
``num_conv_pos_embedding_groups``; dims, heads and dropouts by name (``encoder_dropout`` → ``hidden_dropout``). The
full spidr config and step ride along under the ``"spidr"`` key, which ``transformers`` keeps and ignores, so
spidr → HF → spidr restores the same config.

Padding is the one real difference: ``Data2VecAudio`` zeroes padded frames once before the positional convs, spidr
before every positional conv (and after the last), so an utterance shorter than its padded batch gets different
outputs (base architecture, 1 s padded to 2 s: up to 3.4 abs in layer 1 and 1.0 in layer 12); the longest
utterance of a batch is unaffected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spidr.atomic_files import naming_errors, replaced_when_done
from spidr.config import ModelConfig, ModelType, SpidRConfig, model_config_from_dict
from spidr.data import SAMPLE_RATE
from spidr.models.keymap import KeyMap, fuse_qkv, split_qkv

logger = logging.getLogger(__name__)

MODEL_TYPE = "data2vec-audio"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
SPIDR_KEY = "spidr"  # our model config and step inside config.json

# (Data2VecAudioModel key, our key); placeholders as in spidr.models.keymap.
KEYS = KeyMap(
    [
        ("masked_spec_embed", "mask_embedding"),
        ("feature_extractor.conv_layers.{i}.conv.{p}", "feature_extractor.conv_layers.{i}.conv.{p}"),
        ("feature_extractor.conv_layers.{i}.layer_norm.{p}", "feature_extractor.conv_layers.{i}.layer_norm.{p}"),
        ("feature_projection.layer_norm.{p}", "feature_projection.layer_norm.{p}"),
        ("feature_projection.projection.{p}", "feature_projection.projection.{p}"),
        ("encoder.pos_conv_embed.layers.{i}.conv.{p}", "student.pos_conv_embed.convs.{i}.{p}"),
        ("encoder.layer_norm.{p}", "student.layer_norm.{p}"),
        ("encoder.layers.{i}.attention.{x}_proj.{p}", "student.layers.{i}.attention.{x}.{p}"),
        ("encoder.layers.{i}.attention.out_proj.{p}", "student.layers.{i}.attention.proj.{p}"),
        ("encoder.layers.{i}.layer_norm.{p}", "student.layers.{i}.layer_norm.{p}"),
        ("encoder.layers.{i}.feed_forward.intermediate_dense.{p}",
         "student.layers.{i}.feed_forward.intermediate_dense.{p}"),
        ("encoder.layers.{i}.feed_forward.output_dense.{p}", "student.layers.{i}.feed_forward.output_dense.{p}"),
        ("encoder.layers.{i}.final_layer_norm.{p}", "student.layers.{i}.final_layer_norm.{p}"),
    ],
    theirs="Hugging Face Data2VecAudioModel",
)
# Parts of a full spidr model that a student export leaves out.
_TRAINING_ONLY = ("teacher.", "teacher_feature_extractor.", "teacher_feature_projection.", "heads.", "codebooks.")
# Data2VecAudioModel prefixes its keys with this when saved from a task model (Data2VecAudioForCTC and the like).
_BASE_PREFIX = "data2vec_audio."

# Data2VecAudioConfig defaults of the fields read here (a config.json written by hand may omit them).
_HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "feat_extract_activation": "gelu",
    "hidden_dropout": 0.1,
    "activation_dropout": 0.1,
    "attention_dropout": 0.1,
    "feat_proj_dropout": 0.0,
    "layerdrop": 0.1,
    "layer_norm_eps": 1e-5,
    "conv_dim": [512] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False,
    "num_conv_pos_embeddings": 5,
    "conv_pos_kernel_size": 19,
    "num_conv_pos_embedding_groups": 16,
    "add_adapter": False,
}


# ----------------------------------------------------------------------------------------------------------------
# spidr → Hugging Face
# ----------------------------------------------------------------------------------------------------------------


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` naming the field if ``Data2VecAudioModel`` cannot compute ``cfg``'s student exactly."""
    if cfg.extractor_type != "conv":
        raise ValueError(
            f"model.extractor_type = {cfg.extractor_type!r} cannot be exported to Hugging Face: Data2VecAudio's "
            "front end is a stack of learned convs on the waveform, with no log-mel filterbank"
        )
    if cfg.extractor_mode != "layer_norm":
        raise ValueError(
            f"model.extractor_mode = {cfg.extractor_mode!r} cannot be exported to Hugging Face exactly: "
            "Data2VecAudio's conv extractor has a LayerNorm after every conv (extractor_mode = 'layer_norm'), not one "
            "GroupNorm after the first"
        )
    if cfg.encoder_layer_norm_first:
        raise ValueError(
            "model.encoder_layer_norm_first = true (pre-norm layers) cannot be exported to Hugging Face exactly: "
            "Data2VecAudio's layers are post-norm, with the encoder LayerNorm before the first layer"
        )


def hf_config(cfg: ModelConfig, *, step: int = 0) -> dict[str, Any]:
    """The ``config.json`` of a ``Data2VecAudioModel`` that computes ``cfg``'s student."""
    check_exportable(cfg)
    conv = cfg.extractor_conv_layer_config
    depth = cfg.encoder_pos_conv_depth
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["Data2VecAudioModel"],
        "hidden_size": cfg.encoder_embed_dim,
        "num_hidden_layers": cfg.encoder_num_layers,
        "num_attention_heads": cfg.encoder_num_heads,
        "intermediate_size": cfg.encoder_ff_interm_features,
        "hidden_act": "gelu",
        "feat_extract_activation": "gelu",
        "layer_norm_eps": 1e-5,
        "conv_dim": [channels for channels, _, _ in conv],
        "conv_kernel": [kernel for _, kernel, _ in conv],
        "conv_stride": [stride for _, _, stride in conv],
        "conv_bias": cfg.extractor_conv_bias,
        "num_conv_pos_embeddings": depth,
        "conv_pos_kernel_size": max(3, cfg.encoder_pos_conv_kernel // depth),  # ConvPositionalEmbedding.kernel
        "num_conv_pos_embedding_groups": cfg.encoder_pos_conv_groups,
        "hidden_dropout": cfg.encoder_dropout,
        "attention_dropout": cfg.encoder_attention_dropout,
        "activation_dropout": cfg.encoder_ff_interm_dropout,
        "feat_proj_dropout": cfg.encoder_projection_dropout,
        "layerdrop": cfg.encoder_layer_drop,
        # transformers creates masked_spec_embed only when a mask probability is > 0; these are its defaults
        # (SpecAugment during fine-tuning, never at inference).
        "mask_time_prob": 0.05,
        "mask_time_length": 10,
        "mask_time_min_masks": 2,
        "mask_feature_prob": 0.0,
        "add_adapter": False,
        SPIDR_KEY: {"model_type": cfg.model_type, "step": step, "model": dataclasses.asdict(cfg)},
    }


def preprocessor_config() -> dict[str, Any]:
    """``preprocessor_config.json``: a ``Wav2Vec2FeatureExtractor`` that standardises each utterance, at 16 kHz.

    Its standardisation divides by sqrt(var + 1e-7) where spidr's uses eps 1e-5 (``spidr.data.audio.standardize``).
    """
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": SAMPLE_RATE,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": True,
        "return_attention_mask": True,
    }


def to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``Data2VecAudioModel`` weights from our state dict (full model or student; teacher, heads and codebooks are
    left out). The fused qkv is split into q/k/v projections, with zero biases when the model has none."""
    check_exportable(cfg)
    student = {k: v for k, v in state.items() if not k.startswith(_TRAINING_ONLY) and k != "current_step"}
    split = split_qkv(student)
    if not cfg.encoder_qkv_bias:
        for layer in range(cfg.encoder_num_layers):
            for part in "qkv":
                split[f"student.layers.{layer}.attention.{part}.bias"] = torch.zeros(cfg.encoder_embed_dim)
    return {KEYS.to_theirs(key): value.detach().float().cpu().contiguous() for key, value in split.items()}


# Weight files of another layout that transformers (or another tool) may read in place of model.safetensors
STALE_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "model-*-of-*.safetensors",
                 "model.safetensors.index.json", "tf_model.h5", "flax_model.msgpack")


def export_hf(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model``'s student (a ``DinoSR``, ``SpidR`` or ``Student``) to ``directory`` as a Hugging Face
    ``Data2VecAudioModel``: ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``.

    The directory is created if needed (its parent must exist); those three files are overwritten, and the other
    weight files transformers would read (``STALE_WEIGHTS``: an earlier export's ``pytorch_model.bin``, shards and
    their index) are removed once they are in place.
    """
    from spidr.safetensors_files import save_safetensors

    cfg: ModelConfig = model.cfg
    config = hf_config(cfg, step=int(model.current_step))  # refuses what cannot be exported before writing anything
    weights = to_hf_state_dict(model.state_dict(), cfg)
    directory = Path(directory)
    if not directory.parent.is_dir():
        raise ValueError(f"output directory {directory.parent} does not exist")
    directory.mkdir(exist_ok=True)
    # Each file is written under a temporary name and all three renamed into place once all are complete, config
    # last: an error or a kill while writing (the weights take the time) leaves an earlier export as it was.
    with contextlib.ExitStack() as renamed_in_reverse:
        config_partial = renamed_in_reverse.enter_context(replaced_when_done(directory / CONFIG_FILE))
        preprocessor_partial = renamed_in_reverse.enter_context(replaced_when_done(directory / PREPROCESSOR_FILE))
        weights_partial = renamed_in_reverse.enter_context(replaced_when_done(directory / WEIGHTS_FILE))
        with naming_errors(directory / WEIGHTS_FILE):
            save_safetensors(weights, weights_partial, {"format": "pt"})
        with naming_errors(directory / PREPROCESSOR_FILE):
            preprocessor_partial.write_text(json.dumps(preprocessor_config(), indent=2) + "\n", encoding="utf-8")
        with naming_errors(directory / CONFIG_FILE):
            config_partial.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for pattern in STALE_WEIGHTS:
        for stale in directory.glob(pattern):
            stale.unlink()
    return directory


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face → spidr
# ----------------------------------------------------------------------------------------------------------------


def is_hf_directory(path: str | Path) -> bool:
    """True for a directory whose ``config.json`` declares ``model_type = "data2vec-audio"``."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


def _hf_value(hf: Mapping[str, Any], name: str) -> Any:
    return hf.get(name, _HF_DEFAULTS[name])


def _kind_of(default: Any) -> tuple[str, Any]:
    """(what a config field must hold, a check of a value) after the type of its default."""
    if isinstance(default, bool):
        return "true or false", lambda value: isinstance(value, bool)
    if isinstance(default, int):
        return "an integer", lambda value: isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return "a number", lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, list):
        return "a list of positive integers", lambda value: isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    return "a string", lambda value: isinstance(value, str)


def _spidr_entry(hf: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The ``"spidr"`` entry of an export's config (empty for a model from elsewhere), checked to be readable."""
    meta = hf.get(SPIDR_KEY, {})
    if not isinstance(meta, Mapping):
        raise ValueError(f"{where}: {SPIDR_KEY} = {meta!r} is not the object that spidr's export writes")
    if not isinstance(meta.get("model", {}), Mapping):
        raise ValueError(f"{where}: {SPIDR_KEY}.model = {meta['model']!r} is not an object of model settings")
    step = meta.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{where}: {SPIDR_KEY}.step = {step!r} is not a training step (an integer >= 0)")
    return meta


def _check_importable(hf: Mapping[str, Any], where: str) -> None:
    """Refuse Data2VecAudio settings of the wrong type or that spidr's modules cannot reproduce, naming the field."""
    for name, default in _HF_DEFAULTS.items():
        kind, holds = _kind_of(default)
        if not holds(_hf_value(hf, name)):
            raise ValueError(f"{where}: {name} = {_hf_value(hf, name)!r} is not {kind}")
    for name, expected in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu"), ("layer_norm_eps", 1e-5),
                           ("add_adapter", False)):
        if _hf_value(hf, name) != expected:
            raise ValueError(f"{where}: {name} = {_hf_value(hf, name)!r} has no spidr equivalent (spidr models have "
                             f"{name} = {expected!r})")
    if _hf_value(hf, "num_conv_pos_embeddings") < 1:
        raise ValueError(f"{where}: num_conv_pos_embeddings = {_hf_value(hf, 'num_conv_pos_embeddings')} has no spidr "
                         "equivalent (spidr has at least one positional conv)")
    if _hf_value(hf, "conv_pos_kernel_size") < 3:
        raise ValueError(f"{where}: conv_pos_kernel_size = {_hf_value(hf, 'conv_pos_kernel_size')} has no spidr "
                         "equivalent (spidr's positional convs have a kernel of at least 3)")
    lengths = {name: len(_hf_value(hf, name)) for name in ("conv_dim", "conv_kernel", "conv_stride")}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: conv_dim, conv_kernel and conv_stride differ in length {lengths}")


def model_config_from_hf(
    hf: Mapping[str, Any], *, qkv_bias: bool, model_type: ModelType | None = None, where: str = "config.json"
) -> ModelConfig:
    """Our model config from a ``Data2VecAudioConfig`` dict.

    Architecture fields come from the Hugging Face fields; everything they do not describe (codebooks, EMA, ...)
    from the ``"spidr"`` entry of an export, else the ``SpidRConfig`` defaults. ``qkv_bias``: whether the q/k/v
    projections have a bias worth keeping (an export of a bias-free model writes zeros). ``model_type`` (else the
    export's, else "spidr") only names the config class: it does not change the student.
    """
    _check_importable(hf, where)
    meta = _spidr_entry(hf, where)
    declared = meta.get("model_type")
    if model_type is not None and declared is not None and model_type != declared:
        raise ValueError(f"{where} describes a {declared!r} model but model_type={model_type!r} was requested")
    resolved = model_type or declared or "spidr"
    values = dict(meta.get("model") or {})

    layers = _hf_value(hf, "num_hidden_layers")
    depth = _hf_value(hf, "num_conv_pos_embeddings")
    kernel = _hf_value(hf, "conv_pos_kernel_size")
    total_kernel = values.get("encoder_pos_conv_kernel")
    if not isinstance(total_kernel, int) or max(3, total_kernel // depth) != kernel:
        total_kernel = kernel * depth  # spidr splits encoder_pos_conv_kernel over the depth
    values.update(
        extractor_mode="layer_norm",
        extractor_conv_bias=_hf_value(hf, "conv_bias"),
        extractor_conv_layer_config=[
            [c, k, s] for c, k, s in zip(*(_hf_value(hf, n) for n in ("conv_dim", "conv_kernel", "conv_stride")),
                                         strict=True)
        ],
        encoder_embed_dim=_hf_value(hf, "hidden_size"),
        encoder_num_layers=layers,
        encoder_num_heads=_hf_value(hf, "num_attention_heads"),
        encoder_ff_interm_features=_hf_value(hf, "intermediate_size"),
        encoder_pos_conv_kernel=total_kernel,
        encoder_pos_conv_groups=_hf_value(hf, "num_conv_pos_embedding_groups"),
        encoder_pos_conv_depth=depth,
        encoder_dropout=_hf_value(hf, "hidden_dropout"),
        encoder_attention_dropout=_hf_value(hf, "attention_dropout"),
        encoder_ff_interm_dropout=_hf_value(hf, "activation_dropout"),
        encoder_projection_dropout=_hf_value(hf, "feat_proj_dropout"),
        encoder_layer_drop=_hf_value(hf, "layerdrop"),
        encoder_layer_norm_first=False,
        encoder_qkv_bias=qkv_bias or bool(values.get("encoder_qkv_bias", False)),
    )
    # A student has no codebooks, so their number only has to stay valid: a model trimmed to fewer layers after
    # the export (save_pretrained) keeps the "spidr" entry of its source, whose codebooks may outnumber its layers.
    codebooks = values.get("num_codebooks", SpidRConfig.num_codebooks)
    values["num_codebooks"] = min(codebooks, layers) if isinstance(codebooks, int) else codebooks
    try:
        return model_config_from_dict(values, resolved)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def from_hf_state_dict(weights: Mapping[str, torch.Tensor], *, where: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """Our student state dict (``Student`` keys, without ``current_step``) from ``Data2VecAudioModel`` weights, or
    from a task model's (``data2vec_audio.*``; its head is left out). q/k/v are fused into qkv, biases included;
    a missing ``masked_spec_embed`` (a config with no mask probability) becomes zeros."""
    if any(key.startswith(_BASE_PREFIX) for key in weights):
        head = sorted(key for key in weights if not key.startswith(_BASE_PREFIX))
        if head:
            logger.info("%s: leaving out the task head (%s)", where, ", ".join(head))
        weights = {k.removeprefix(_BASE_PREFIX): v for k, v in weights.items() if k.startswith(_BASE_PREFIX)}
    try:
        state = fuse_qkv({KEYS.to_ours(key): value for key, value in weights.items()})
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if "mask_embedding" not in state:
        if "feature_projection.projection.weight" not in state:
            raise ValueError(f"{where} has no feature_projection.projection.weight: not the weights of a "
                             "data2vec-audio model")
        dim = state["feature_projection.projection.weight"].shape[0]
        logger.info("%s has no masked_spec_embed (mask_time_prob = 0): using zeros (unused at inference)", where)
        state["mask_embedding"] = torch.zeros(dim)
    return {k: v.float() for k, v in state.items()}


def _has_nonzero_qkv_bias(state: Mapping[str, torch.Tensor]) -> bool:
    return any(bool(v.any()) for k, v in state.items() if k.endswith(".attention.qkv.bias"))


def read_hf_directory(
    path: str | Path, *, model_type: ModelType | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], int]:
    """(model config, our student state dict with ``current_step``, step) of a Hugging Face data2vec-audio
    directory (``config.json`` + ``model.safetensors``), written by ``export_hf`` or by ``save_pretrained``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from spidr.in_progress import HF_EXPORT_IN_PROGRESS, refuse_unfinished

    path = Path(path)
    refuse_unfinished(path, HF_EXPORT_IN_PROGRESS, "export")  # (its weights may be missing or an earlier model's)
    try:
        hf = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path / CONFIG_FILE} is not a readable JSON config: {error}") from None
    if not isinstance(hf, dict) or hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path / CONFIG_FILE} does not describe a {MODEL_TYPE!r} model (model_type = "
                         f"{hf.get('model_type') if isinstance(hf, dict) else None!r})")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".json") and p.name != CONFIG_FILE)
        raise ValueError(f"{path} has no {WEIGHTS_FILE} (found: {', '.join(others) or 'nothing'}); spidr reads "
                         "only unsharded safetensors weights, never pickles: re-save the model with "
                         "save_pretrained(..., safe_serialization=True)")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from None
    state = from_hf_state_dict(weights, where=str(weights_path))
    qkv_bias = _has_nonzero_qkv_bias(state)
    cfg = model_config_from_hf(hf, qkv_bias=qkv_bias, model_type=model_type, where=str(path / CONFIG_FILE))
    if not cfg.encoder_qkv_bias:  # an export of a bias-free model: the zero biases carry nothing
        state = {k: v for k, v in state.items() if not k.endswith(".attention.qkv.bias")}
    step = _spidr_entry(hf, str(path / CONFIG_FILE)).get("step", 0)
    state["current_step"] = torch.tensor([step], dtype=torch.long)
    return cfg, state, step
