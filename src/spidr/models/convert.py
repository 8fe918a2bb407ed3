"""Original fairseq DinoSR checkpoint → our state dict and ``DinoSRConfig`` (spec §9.3).

The student, heads and codebooks live in ``ckpt["model"]``, the teacher in ``ckpt["model"]["_ema"]``. Keys are
renamed by a table of patterns; fairseq's separate q/k/v projections are fused into one ``qkv`` (rows q, k, v);
any key that no rule covers is an error, so a different architecture cannot load silently. Model options that our
network cannot follow (an FFN activation other than GELU, layers other than Transformer layers) are refused too.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from spidr.config import DinoSRConfig, model_config_from_dict
from spidr.models.keymap import fuse_qkv

logger = logging.getLogger(__name__)

# Renaming rules, tried in order: (fairseq pattern, our key template). Per-layer rules are shared by the student
# (fairseq prefix "encoder.layers.") and the teacher ("_ema" dict, prefix "layers.").
_LAYER_RULES = [
    (r"fc1\.(weight|bias)", r"feed_forward.intermediate_dense.\1"),
    (r"fc2\.(weight|bias)", r"feed_forward.output_dense.\1"),
    (r"final_layer_norm\.(weight|bias)", r"final_layer_norm.\1"),
    (r"self_attn_layer_norm\.(weight|bias)", r"layer_norm.\1"),
    (r"self_attn\.out_proj\.(weight|bias)", r"attention.proj.\1"),
    (r"self_attn\.([qkv])_proj\.(weight|bias)", r"attention.\1.\2"),  # fused below
]
_STUDENT_RULES = [
    (r"mask_emb", "mask_embedding"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    # layer_norm mode: Sequential(conv, dropout, Sequential(transpose, LayerNorm, transpose), GELU)
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    # group_norm ("default") mode: Sequential(conv, dropout, GroupNorm, GELU) on the first layer
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"encoder\.layer_norm\.(weight|bias)", r"student.layer_norm.\1"),
    (r"encoder\.pos_conv\.(\d+)\.0\.(weight|bias)", r"student.pos_conv_embed.convs.\1.\2"),
    (r"_codebook(\d+)", r"codebooks.\1.codebook"),
    (r"_codebook_cnts(\d+)", r"codebooks.\1.counts"),
    (r"heads\.(\d+)\.(weight|bias)", r"heads.\1.0.\2"),
]
_TEACHER_RULES = [
    (r"layer_norm\.(weight|bias)", r"teacher.layer_norm.\1"),
    (r"pos_conv\.(\d+)\.0\.(weight|bias)", r"teacher.pos_conv_embed.convs.\1.\2"),
]

# fairseq model option → our ModelConfig field (spec §8.4). Options not listed here do not change the network.
_CONFIG_NAMES = {
    "extractor_mode": "extractor_mode",
    "conv_bias": "extractor_conv_bias",
    "conv_feature_layers": "extractor_conv_layer_config",
    "encoder_embed_dim": "encoder_embed_dim",
    "dropout_input": "encoder_projection_dropout",
    "conv_pos": "encoder_pos_conv_kernel",
    "conv_pos_groups": "encoder_pos_conv_groups",
    "pos_conv_depth": "encoder_pos_conv_depth",
    "encoder_layers": "encoder_num_layers",
    "encoder_attention_heads": "encoder_num_heads",
    "attention_dropout": "encoder_attention_dropout",
    "encoder_ffn_embed_dim": "encoder_ff_interm_features",
    "activation_dropout": "encoder_ff_interm_dropout",
    "dropout": "encoder_dropout",
    "layer_norm_first": "encoder_layer_norm_first",
    "encoderlayerdrop": "encoder_layer_drop",
    "encoder_layerdrop": "encoder_layer_drop",
    "codebook_size": "codebook_size",
    "codebook_init_decay": "codebook_decay",
    "average_top_k_layers": "num_codebooks",
    "ema_decay": "ema_start_decay",
    "ema_end_decay": "ema_final_decay",
    "ema_anneal_end_step": "ema_final_step",
    "freeze_teacher_step": "freeze_step",
    "feature_grad_mult": "feature_grad_mult",
}

# fairseq model options with no counterpart in our network: only the value it always computes converts exactly
# (our FFN's activation is GELU; every layer is a post- or pre-norm Transformer layer, no conformer or adapter).
_FIXED_SETTINGS = {"activation_fn": "gelu", "layer_type": "transformer"}


def _rename(key: str, rules: list[tuple[str, str]], prefix: str, layer_prefix: str, where: str) -> str:
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    match = re.fullmatch(re.escape(layer_prefix) + r"(\d+)\.(.+)", key)
    if match:
        layer, rest = match.groups()
        for pattern, target in _LAYER_RULES:
            if re.fullmatch(pattern, rest):
                return f"{prefix}layers.{layer}." + re.sub(pattern, target, rest)
    raise ValueError(f"{where} key {key!r} has no conversion rule: not an original fairseq DinoSR checkpoint?")


def convert_fairseq_state_dict(model_state: Mapping[str, Any], *, step: int = 0) -> dict[str, torch.Tensor]:
    """Our state dict from a fairseq DinoSR ``ckpt["model"]`` (with its ``"_ema"`` teacher dict). ``step`` becomes
    ``current_step``."""
    if "_ema" not in model_state:
        raise ValueError("fairseq checkpoint has no '_ema' (teacher) entry in ckpt['model']")
    state: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        if key == "_ema":
            continue
        state[_rename(key, _STUDENT_RULES, "student.", "encoder.layers.", "fairseq model")] = value
    for key, value in model_state["_ema"].items():
        state[_rename(key, _TEACHER_RULES, "teacher.", "layers.", "fairseq _ema")] = value
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in fuse_qkv(state).items()}
    state["current_step"] = torch.tensor([step], dtype=torch.long)
    return state


def fairseq_step(checkpoint: Mapping[str, Any]) -> int:
    """The training step of a fairseq checkpoint: its optimizer's step count, else 0."""
    try:
        step = checkpoint["last_optimizer_state"]["state"][0]["step"]
    except (KeyError, IndexError, TypeError):
        return 0
    return int(step.item() if isinstance(step, torch.Tensor) else step)


def _as_dict(obj: Any) -> dict[str, Any]:
    """A plain dict from a dict, an omegaconf DictConfig or an argparse Namespace."""
    if isinstance(obj, Mapping):
        return dict(obj.items())
    if hasattr(obj, "items"):
        return dict(obj.items())
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    raise ValueError(f"fairseq checkpoint config is a {type(obj).__name__}, expected a mapping or a Namespace")


def fairseq_model_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model options of a fairseq checkpoint: ``cfg["model"]`` (hydra era) or ``args`` (argparse era)."""
    if checkpoint.get("cfg") is not None:
        cfg = _as_dict(checkpoint["cfg"])
        if cfg.get("model") is None:
            raise ValueError("fairseq checkpoint cfg has no 'model' section")
        return _as_dict(cfg["model"])
    if checkpoint.get("args") is not None:
        return _as_dict(checkpoint["args"])
    raise ValueError("fairseq checkpoint has neither 'cfg' nor 'args': cannot tell its model settings")


def _parse_conv_layers(text: Any) -> list[list[int]]:
    """fairseq's ``conv_feature_layers`` string, e.g. "[(512,10,5)] + [(512,3,2)] * 4", read without ``eval``."""
    if not isinstance(text, str):
        return [list(layer) for layer in text]
    try:
        tree = ast.parse(text, mode="eval")
        return [list(layer) for layer in _literal(tree.body)]
    except (ValueError, TypeError, SyntaxError) as error:
        raise ValueError(f"fairseq conv_feature_layers = {text!r} is not a list expression of "
                         "(channels, kernel, stride) tuples") from error


MAX_CONV_LAYERS = 1000  # far beyond any front end; a chained repetition "*1000*1000" hung the loader building it


def _literal(node: ast.AST) -> Any:
    """Evaluate a literal, allowing list concatenation (+) and repetition (*) by an integer, nothing else (no
    names, calls or attribute access), and no list longer than ``MAX_CONV_LAYERS``."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _literal(node.left), _literal(node.right)
        if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
            result_length = len(left) + len(right)
        elif (isinstance(node.op, ast.Mult) and isinstance(left, list) and isinstance(right, int)
              and not isinstance(right, bool) and right >= 0):
            result_length = len(left) * right
        else:
            raise ValueError("unsupported operands")
        if result_length > MAX_CONV_LAYERS:
            raise ValueError(f"a list of {result_length} layers (at most {MAX_CONV_LAYERS})")
        return left + right if isinstance(node.op, ast.Add) else left * right
    return ast.literal_eval(node)


def refuse_unconvertible(settings: Mapping[str, Any]) -> None:
    """Raise when fairseq model options describe a network that ours cannot compute, whatever config it is given."""
    for name, supported in _FIXED_SETTINGS.items():
        value = settings.get(name)
        if value is not None and str(value) != supported:
            raise ValueError(f"fairseq checkpoint sets {name} = {str(value)!r}: spidr converts only {name} = "
                             f"{supported!r} (its model would compute other features)")


NEVER_STEP = 2**62  # a step no run reaches: fairseq's freeze_teacher_step = -1 ("never")


def fairseq_model_config(settings: Mapping[str, Any]) -> DinoSRConfig:
    """``DinoSRConfig`` from fairseq model options, with the original's qkv bias and teacher made as an exact copy
    of the student. Options that only training would follow and ours cannot are named in a warning: the converted
    model computes the same features, but training it on would not continue the original's recipe."""
    refuse_unconvertible(settings)
    values: dict[str, Any] = {"encoder_qkv_bias": True, "teacher_init": "copy"}
    if settings.get("ema_layers_only") is False:  # (True: pos_conv copied, not averaged, as ours by default)
        values["ema_exclude_layers"] = ()
    init_decay, end_decay = settings.get("codebook_init_decay"), settings.get("codebook_end_decay")
    if init_decay is not None and end_decay is not None and float(init_decay) != float(end_decay):
        logger.warning("the fairseq checkpoint anneals its codebook decay from %s to %s (codebook_end_decay_step = "
                       "%s); spidr keeps it at model.codebook_decay = %s: training it on would differ",
                       init_decay, end_decay, settings.get("codebook_end_decay_step"), init_decay)
    for name, field in _CONFIG_NAMES.items():
        if name not in settings or settings[name] is None:
            continue
        value = settings[name]
        if name == "conv_feature_layers":
            value = _parse_conv_layers(value)
        elif name == "extractor_mode":
            value = {"default": "group_norm", "layer_norm": "layer_norm"}.get(value, value)
        elif name == "freeze_teacher_step" and int(value) < 0:  # fairseq's -1: the teacher is never frozen
            value = NEVER_STEP
        elif name == "ema_anneal_end_step" and int(value) < 1:  # no annealing: the final decay from the first step
            value = 1
        values[field] = value
    config = model_config_from_dict(values, "dinosr")
    assert isinstance(config, DinoSRConfig)
    return config


def is_fairseq_checkpoint(checkpoint: Any) -> bool:
    """True for an original fairseq DinoSR checkpoint: a ``model`` dict with an ``_ema`` teacher or fairseq
    ``encoder.layers`` keys, next to a ``cfg`` or ``args`` entry."""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        return False
    model = checkpoint["model"]
    fairseq_keys = "_ema" in model or any(str(k).startswith("encoder.layers.") for k in model)
    return fairseq_keys and ("cfg" in checkpoint or "args" in checkpoint)
