"""Load any SpidR / DinoSR checkpoint into a ready model, and export weights to safetensors.

Recognised files:
- official checkpoints ``{"model": state_dict}`` (``spidr_base.pt``, ``dinosr_base_reproduced.pt``, the official
  trainer's ``step_N.pt``); the config comes from the ``config`` argument, else a ``config.json`` beside the file,
  else the base defaults of ``model_type``;
- original fairseq DinoSR checkpoints (``dinosr.ckpt``), converted by ``spidr.models.convert``;
- our training checkpoints ``{"model": state_dict, "config": Config.to_dict(), ...}``;
- safetensors exports written by ``export_safetensors`` (config in the metadata);
- Hugging Face ``transformers`` data2vec-audio directories (``config.json`` + ``model.safetensors``), written by
  ``spidr.models.hf_export.export_hf`` or by ``save_pretrained``: an inference-only ``Student``;
- s3prl ``data2vec_custom`` checkpoints written by ``spidr.models.s3prl_export.export_s3prl``: a ``Student`` too.

The format is told by the file's content, not its suffix: a safetensors file named ``.pt`` (or a torch file named
``.safetensors``) is read as what it is, with a warning; a NumPy array is named as one.

Files are opened with ``torch.load(weights_only=True)``, which cannot run code. A file that holds other pickled
Python objects (fairseq stores argparse/omegaconf configs) is refused unless the caller passes ``trust=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from spidr.atomic_files import replaced_when_done
from spidr.config import (
    DinoSRConfig,
    ModelConfig,
    ModelType,
    SpidRConfig,
    model_config_class,
    model_config_from_dict,
    read_config_file,
)
from spidr.input_files import existing_file
from spidr.models.build import build_model
from spidr.models.convert import (
    convert_fairseq_state_dict,
    fairseq_model_config,
    fairseq_model_settings,
    fairseq_step,
    is_fairseq_checkpoint,
    refuse_unconvertible,
)
from spidr.models.dinosr import DinoSR
from spidr.models.hf_export import CONFIG_FILE, MODEL_TYPE, WEIGHTS_FILE, is_hf_directory, read_hf_directory
from spidr.models.s3prl_export import is_s3prl_export, read_s3prl_export
from spidr.models.student import Student

logger = logging.getLogger(__name__)

# What a caller may give as a checkpoint's config: an object, a dict of model or run settings, or a config file
GivenConfig = ModelConfig | Mapping[str, Any] | str | Path

CheckpointFormat = Literal["official", "fairseq", "training", "safetensors", "hf", "s3prl"]
_METADATA_KEY = "spidr_config"
_STUDENT_ONLY_KEY = "spidr_student_only"  # safetensors metadata of a Student's export


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file holds, resolved: the model config, our state dict, where it came from, its step, and
    whether it holds only the inference student (no teacher, heads or codebooks)."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    format: CheckpointFormat
    step: int
    student_only: bool = False


# ----------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------


class NeedsTrustError(ValueError):
    """A file that only a full unpickling (``trust=True``) reads: it holds Python objects besides tensors."""


def refused_global(error: pickle.UnpicklingError) -> str | None:
    """The global (class or function) a weights-only ``torch.load`` refused, as torch names it: "Unsupported global:
    GLOBAL x" for a class off its allowlist, "unsupported GLOBAL posix.system whose module posix is blocked"."""
    found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
    return found[1] if found else None


def unpickling_failure(error: pickle.UnpicklingError) -> str:
    """Why a weights-only ``torch.load`` failed, in one line without torch's advice to retry unsafely."""
    refused = refused_global(error)
    if refused is not None:
        return f"it holds pickled Python objects besides tensors (first one: {refused})"
    lines = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()
    return lines[0] if len(lines) and "WeightsUnpickler error:" in str(error) else "not a pickle of tensors"


def load_torch_file(path: Path, *, trust: bool = False) -> Any:
    """``torch.load`` of a user's file (weights only unless ``trust``); any failure is a ``ValueError`` naming it."""
    try:
        # A file object, not the path: torch.load dispatches a path ending in .safetensors to safetensors.
        with Path(path).open("rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust:
            refused = refused_global(error)  # None: no refused global, the file is broken
            if refused is None:
                raise ValueError(f"{path} is not a readable PyTorch checkpoint: {unpickling_failure(error)}") from None
            raise NeedsTrustError(
                f"{path} contains pickled Python objects besides tensors (first one: {refused}; fairseq "
                "checkpoints store their argparse or omegaconf configs this way). Unpickling them can run arbitrary "
                "code, so it is refused: if you trust the file's origin, pass trust=True (CLI: --trust)."
            ) from None
    except EOFError:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: it is empty or cut short") from None
    except (RuntimeError, OSError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
    except (IndexError, KeyError, TypeError, AttributeError, ValueError) as error:
        # Bytes that are neither a zip archive nor a pickle (an audio file, a text file) derail the unpickler.
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (its bytes are not a saved torch object: "
                         f"{type(error).__name__} while unpickling)") from None
    logger.warning("loading %s with full unpickling (trust=True)", path)
    try:
        with Path(path).open("rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as error:
        raise ValueError(f"{path} needs the Python package {error.name!r} to unpickle its config objects; install "
                         "it (e.g. pip install omegaconf for fairseq checkpoints)") from error
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, IndexError, KeyError, TypeError,
            AttributeError, ValueError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {type(error).__name__} {error}") from error


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Drop the wrappers' key prefixes (DDP ``module.``, torch.compile ``_orig_mod.``), in whichever order they
    were wrapped (``module._orig_mod.`` when compiled inside DDP, ``_orig_mod.module.`` when compiled around it)."""
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.removeprefix("module.").removeprefix("_orig_mod.")
        out[key] = value
    return out


# The sections of a run config (``spidr.config.config_from_dict``); no model field has one of these names.
_RUN_SECTIONS = ("run", "data", "model", "optimizer", "masking", "validation")


def _is_run_config(data: Mapping[str, Any]) -> bool:
    """True for a run config (sections, e.g. ``spidr train``'s file, maybe without a [model] section), False for a
    bare model config (model fields only)."""
    return any(isinstance(data.get(section), Mapping) for section in _RUN_SECTIONS)


def _model_type_of(data: Mapping[str, Any]) -> ModelType | None:
    """The model type a config dict declares: a run config's ``run.model_type``, a bare model config's
    ``__class__``, or SpidR-only fields; None when it names none (a run config's default is left to the caller)."""
    if _is_run_config(data):
        run = data.get("run")
        return run.get("model_type") if isinstance(run, Mapping) else None
    declared = {"SpidRConfig": "spidr", "DinoSRConfig": "dinosr"}.get(str(data.get("__class__")))
    if declared is not None:
        return declared
    if any(name in data for name in ("ema_timescale", "ema_threshold")):
        return "spidr"
    return None


def _resolve_type(declared: str | None, requested: str | None, where: str) -> ModelType:
    if declared is not None and requested is not None and declared != requested:
        raise ValueError(f"{where} describes a {declared!r} model but model_type={requested!r} was requested")
    model_type = declared or requested
    if model_type is None:
        raise ValueError(f"cannot tell whether {where} is a SpidR or a DinoSR model (both have the same weights): "
                         "pass model_type='spidr' or 'dinosr' (CLI: --model-type)")
    if model_type not in ("spidr", "dinosr"):
        raise ValueError(f"model_type = {model_type!r} is invalid: expected 'spidr' or 'dinosr'")
    return model_type


def _config_from_data(data: Mapping[str, Any], model_type: str | None, where: str) -> ModelConfig:
    """Model config from a run config dict (its "model" section; the defaults without one, as ``spidr train``
    reads it) or a bare model config dict."""
    declared = _model_type_of(data)
    if declared is None and model_type is None and _is_run_config(data):
        declared = "dinosr"  # (a run config's default, as spidr train reads it: the official one)
    resolved = _resolve_type(declared, model_type, where)
    section = data.get("model", {}) if _is_run_config(data) else data
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}: [model] must be a table of model settings, got {section!r}")
    try:
        return model_config_from_dict(dict(section), resolved)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error


def _explicit_config(config: GivenConfig, model_type: str | None, *,
                     recorded: ModelType | None = None, where: str = "") -> ModelConfig:
    """The config given with a checkpoint. ``recorded``: the model type the checkpoint ``where`` records itself; a
    config of the other type is refused (the same weights would give another model's codebook units), and a run
    config that names no type takes this one."""
    if recorded is not None:
        _resolve_type(recorded, model_type, where)
    if isinstance(config, ModelConfig):
        what = f"the given {type(config).__name__}"
        _resolve_type(config.model_type, model_type, what)
        declared: str | None = config.model_type
    elif isinstance(config, Mapping):  # a run or model config as a dict (a notebook's, or a loaded TOML)
        what, data = "the given config dict", dict(config)
        declared = _model_type_of(data)
    elif isinstance(config, str | os.PathLike):
        what, data = str(config), read_config_file(config)
        declared = _model_type_of(data)
    else:
        raise ValueError(f"config = {config!r}: expected a ModelConfig, a dict of model or run settings, or the path "
                         "of a config file")
    if recorded is not None and declared is not None and declared != recorded:
        raise ValueError(f"{what} describes a {declared!r} model but {where} is a {recorded!r} one: give a config "
                         f"of its type (or none: it records its own)")
    if isinstance(config, ModelConfig):
        return config
    return _config_from_data(data, model_type or recorded, what)


def _official_config(path: Path, config: GivenConfig | None, model_type: str | None) -> ModelConfig:
    """Config for an official checkpoint: the argument, else ``config.json`` beside it, else the defaults."""
    if config is not None:
        return _explicit_config(config, model_type)
    if is_hf_directory(path.parent):  # its config.json describes the directory's own model.safetensors, not this file
        raise ValueError(f"{path} sits in the Hugging Face directory {path.parent}, whose {CONFIG_FILE} is not a "
                         f"spidr config: pass the directory {path.parent}/ to load its model, or give this file's "
                         "config (config=..., CLI: --config)")
    beside = path.parent / "config.json"
    if beside.is_file():
        logger.info("reading the model config of %s from %s", path, beside)
        return _config_from_data(read_config_file(beside), model_type, str(beside))
    resolved = _resolve_type(None, model_type, str(path))
    logger.info("no config.json beside %s: using the default %s config", path, resolved)
    return model_config_class(resolved)()


def _content_kind(path: Path) -> Literal["torch", "safetensors", "numpy"] | None:
    """What a file's first bytes say it is: a torch zip archive or pickle, a safetensors file (an 8-byte header
    length, then the JSON header), a NumPy array; None when they say none of these."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    # Before the pickle test: a header length whose low byte is 0x80 (one safetensors file in 32, the length being
    # a multiple of 8) starts like a pickle, and such an export was read as a PyTorch file and refused.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head.startswith(b"\x80"):
        return "torch"
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    return None


def _is_safetensors(path: Path) -> bool:
    """Whether to read ``path`` as safetensors: by its content, else by its suffix; a NumPy array is refused."""
    kind = _content_kind(path)
    if kind == "numpy":
        raise ValueError(f"{path} is a NumPy array (.npy: features or units, e.g. of spidr extract), not a checkpoint")
    if kind is None:
        return path.suffix == ".safetensors"
    if (kind == "safetensors") != (path.suffix == ".safetensors"):
        logger.warning("%s holds a %s file despite its suffix: reading it as one", path,
                       "safetensors" if kind == "safetensors" else "PyTorch")
    return kind == "safetensors"


def _read_safetensors(path: Path, config: GivenConfig | None, model_type: str | None, *,
                      any_type: bool = False) -> Checkpoint:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    from spidr.eval.kmeans import CENTROIDS_KEY

    if set(state) == {CENTROIDS_KEY}:
        raise ValueError(f"{path} holds k-means centroids (spidr kmeans), not a model: spidr units --centroids "
                         "reads it")
    if _METADATA_KEY in metadata:
        where = f"{path} metadata {_METADATA_KEY}"
        try:
            saved = json.loads(metadata[_METADATA_KEY])
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not JSON: {error}") from None
        if not isinstance(saved, Mapping):
            raise ValueError(f"{where} is a JSON {type(saved).__name__}, expected an object (a model or run config)")
        model_config = (_config_from_data(saved, model_type, where) if config is None else
                        _explicit_config(config, model_type, recorded=None if any_type else _model_type_of(saved),
                                         where=str(path)))
    else:
        _refuse_foreign_state(state, path)
        model_config = (_explicit_config(config, model_type) if config is not None
                        else _official_config(path, None, model_type))
    step = read_step(state["current_step"], f"{path}: current_step") if "current_step" in state else 0
    return Checkpoint(model_config, state, "safetensors", step, student_only=metadata.get(_STUDENT_ONLY_KEY) == "true")


def _read_hf(path: Path, config: GivenConfig | None, model_type: str | None, *,
             any_type: bool = False) -> Checkpoint:
    model_config, state, step = read_hf_directory(path, model_type=model_type)
    if config is not None:
        model_config = _explicit_config(config, model_type, recorded=None if any_type else model_config.model_type,
                                        where=str(path))
    return Checkpoint(model_config, state, "hf", step, student_only=True)


def _read_fairseq(
    path: Path, data: Mapping[str, Any], config: GivenConfig | None, model_type: str | None
) -> Checkpoint:
    if model_type not in (None, "dinosr"):
        raise ValueError(f"{path} is an original fairseq DinoSR checkpoint; model_type={model_type!r} is invalid")
    step = fairseq_step(data)
    try:
        settings = fairseq_model_settings(data)
    except ValueError:
        if config is None:
            raise
        settings = {}  # the given config stands in for the settings the file lacks
    if config is None:
        try:
            model_config = fairseq_model_config(settings)  # refuses what it cannot convert
        except ValueError as error:
            raise ValueError(f"{path} (an original fairseq DinoSR checkpoint): {error}") from None
    else:
        refuse_unconvertible(settings)  # a given config cannot change what the weights compute
        model_config = _explicit_config(config, "dinosr")
    return Checkpoint(model_config, convert_fairseq_state_dict(data["model"], step=step), "fairseq", step)


def _refuse_unit_lm(path: Path, data: Mapping[str, Any]) -> None:
    """Refuse a ``spidr lm-train`` checkpoint by name (the LM trainer's modules are imported only for a file that
    has a ``"format"``: they are not loaded to read a speech model)."""
    if "format" not in data:
        return
    from spidr.lm.train import CHECKPOINT_KIND

    if str(data["format"]).startswith(CHECKPOINT_KIND):
        raise ValueError(f"{path} is a unit-LM checkpoint (spidr lm-train), not a SpidR/DinoSR model: spidr lm-score "
                         "reads it")


def _checkpoint_inside(folder: Path) -> str:
    """": pass a checkpoint in it, e.g. <file>" for a folder holding .pt files (a training run), else ""."""
    final = folder / "final.pt"
    found = [final] if final.is_file() else sorted(folder.glob("*.pt"), key=lambda path: path.stat().st_mtime)
    return f": pass a checkpoint in it, e.g. {found[-1]}" if found else ""


def read_checkpoint(
    path: str | Path,
    *,
    trust: bool = False,
    config: GivenConfig | None = None,
    model_type: ModelType | None = None,
    config_of_any_type: bool = False,
) -> Checkpoint:
    """Read a checkpoint of any recognised format (see the module docstring) without building the model.

    ``config`` (a model config, or a run/model config file) overrides what the file or a ``config.json`` beside it
    says, but must be of the model type the file records, unless ``config_of_any_type`` (``run.init_ckpt``: a SpidR
    run may start from DinoSR weights); ``model_type`` is needed only when nothing else tells SpidR from DinoSR.
    """
    path = Path(path)
    if path.is_dir():
        from spidr.in_progress import HF_EXPORT_IN_PROGRESS, refuse_unfinished

        # (an export killed before its config.json: named as one to run again, not as a folder of something else)
        refuse_unfinished(path, HF_EXPORT_IN_PROGRESS, "export")
        if not is_hf_directory(path):
            raise ValueError(f"checkpoint {path} is a folder, not a file, and not an exported Hugging Face model "
                             f"(no {CONFIG_FILE} declaring model_type {MODEL_TYPE!r}){_checkpoint_inside(path)}")
        return _read_hf(path, config, model_type, any_type=config_of_any_type)
    existing_file(path, "checkpoint")
    if path.name == WEIGHTS_FILE and is_hf_directory(path.parent):
        # Only half of an exported model: its architecture is in the config.json beside it.
        logger.info("%s holds the weights of the Hugging Face directory %s: reading the directory", path, path.parent)
        return _read_hf(path.parent, config, model_type, any_type=config_of_any_type)
    if _is_safetensors(path):
        return _read_safetensors(path, config, model_type, any_type=config_of_any_type)
    data = load_torch_file(path, trust=trust)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a dict (a checkpoint or a state dict)")

    _refuse_unit_lm(path, data)
    if is_fairseq_checkpoint(data):
        return _read_fairseq(path, data, config, model_type)
    if is_s3prl_export(data):
        model_config, state, step = read_s3prl_export(data, where=str(path))
        if config is not None:
            model_config = _explicit_config(config, model_type, where=str(path),
                                            recorded=None if config_of_any_type else model_config.model_type)
        return Checkpoint(model_config, state, "s3prl", step, student_only=True)

    state = data.get("model", data)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a SpidR/DinoSR checkpoint: expected a 'model' state dict of tensors")
    state = _strip_prefixes(state)
    step = read_step(state["current_step"], f"{path}: current_step") if "current_step" in state else 0

    if isinstance(data.get("config"), Mapping):  # one of our training checkpoints
        model_config = (
            _explicit_config(config, model_type, where=str(path),
                             recorded=None if config_of_any_type else _model_type_of(data["config"]) or "dinosr")
            if config is not None else _config_from_data(
                data["config"],
                _resolve_type(_model_type_of(data["config"]) or "dinosr", model_type, f"{path} config"),
                f"{path} config")
        )
        if "step" in data:
            step = read_step(data["step"], f"{path}: step")
        return Checkpoint(model_config, state, "training", step)
    _refuse_foreign_state(state, path)
    return Checkpoint(_official_config(path, config, model_type), state, "official", step)


def _refuse_foreign_state(state: Mapping[str, Any], path: Path) -> None:
    """Raise for weights that record no config and hold no SpidR / DinoSR student (another model's, e.g. a HuBERT
    export): asking which of the two it is, or reading a config beside it, would mislead."""
    if is_hf_directory(path.parent):  # (told to pass the folder: _official_config)
        return
    if not any(key.startswith("student.") for key in state):
        examples = ", ".join(sorted(state)[:3]) or "nothing"
        raise ValueError(f"{path} holds none of the SpidR / DinoSR weights (no student.* tensor; it holds e.g. "
                         f"{examples}): not a SpidR or DinoSR checkpoint")


def read_step(value: object, where: str) -> int:
    """A checkpoint's step count: an integer, or a tensor holding one integral value (shape () or (1,))."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        number = value.reshape(()).item()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = value
    else:
        number = None
    if isinstance(number, bool) or not isinstance(number, int | float) or not float(number).is_integer() or number < 0:
        shown = (f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, torch.Tensor)
                 and value.numel() != 1 else repr(number if number is not None else value))
        raise ValueError(f"{where} is {shown}, expected a step count: a non-negative integer (or a tensor holding "
                         "one)")
    return int(number)


# ----------------------------------------------------------------------------------------------------------------
# Building models
# ----------------------------------------------------------------------------------------------------------------


def model_from_checkpoint(checkpoint: Checkpoint, *, where: str = "checkpoint") -> DinoSR | Student:
    """Build the model of ``checkpoint.config`` (a ``Student`` when it holds only that) and load its state
    strictly; eval mode."""
    with torch.device("meta"):
        model = Student(checkpoint.config) if checkpoint.student_only else build_model(checkpoint.config)
    # fp32 weights and an int64 step whatever the file stored (assign=True below keeps the given dtypes).
    state = {k: v.float() if v.is_floating_point() else v.long() for k, v in checkpoint.state_dict.items()}
    try:
        # assign=True swaps the meta tensors for the loaded ones: no wasted random initialisation.
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        kind = "student" if checkpoint.student_only else "model"
        raise ValueError(
            f"{where} does not fit a {checkpoint.config.model_type} {kind} with this config "
            f"({_config_summary(checkpoint.config)}; wrong config.json or --config?): "
            f"{_state_mismatch(model, state) or str(error).strip()[:2000]}"
        ) from None
    return model.eval()


def _config_summary(cfg: ModelConfig) -> str:
    return (f"{cfg.encoder_num_layers} layers of dim {cfg.encoder_embed_dim}, {cfg.num_codebooks} codebooks of "
            f"{cfg.codebook_size}")


def _state_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What differs between the model's state and ``state``, the shapes first (they say which setting is wrong),
    a few keys of each kind with their counts (torch lists every key, and the shapes came after hundreds)."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    shapes = [f"{key}: {tuple(state[key].shape)} in the file, {shape} here" for key, shape in expected.items()
              if key in state and tuple(state[key].shape) != shape]
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    parts = []
    for what, found in (("shape(s) differ", shapes), ("key(s) missing from the file", missing),
                        ("unexpected key(s) in the file", unexpected)):
        if found:
            parts.append(f"{len(found)} {what}: {'; '.join(found[:3])}{'; ...' if len(found) > 3 else ''}")
    return ". ".join(parts)


def load_model(
    path: str | Path,
    *,
    trust: bool = False,
    config: GivenConfig | None = None,
    model_type: ModelType | None = None,
) -> DinoSR | Student:
    """A ready ``SpidR`` or ``DinoSR`` in eval mode, on CPU, from any recognised checkpoint (module docstring); from
    an exported student (a Hugging Face directory) the inference-only ``Student``.

    Args:
        path: ``.pt`` / ``.ckpt`` checkpoint, ``.safetensors`` export, or Hugging Face data2vec-audio directory.
        trust: allow full unpickling for files that need it (original fairseq checkpoints). Only for trusted files.
        config: model config (object, dict of model or run settings, or a run/model config file) overriding what
            the file says.
        model_type: "spidr" or "dinosr"; required only for an official checkpoint without a config.
    """
    return model_from_checkpoint(
        read_checkpoint(path, trust=trust, config=config, model_type=model_type), where=str(path)
    )


def export_safetensors(model: DinoSR | Student, path: str | Path) -> None:
    """Write the full state dict (student, heads, codebooks, teacher; a ``Student``'s own) to ``path`` with the
    model config as JSON in the metadata, so ``load_model(path)`` rebuilds the same model without any pickle."""
    from spidr.safetensors_files import save_safetensors

    data = dataclasses.asdict(model.cfg) | {"__class__": type(model.cfg).__name__}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {_METADATA_KEY: json.dumps(data), "format": "pt"}
    if isinstance(model, Student):
        metadata[_STUDENT_ONLY_KEY] = "true"
    with replaced_when_done(path) as partial:  # an interrupted --overwrite leaves the earlier export whole
        save_safetensors(state, partial, metadata)


def spidr_base(path: str | Path) -> DinoSR | Student:
    """Released SpidR base (spec §9.2) from a local copy of
    https://dl.fbaipublicfiles.com/shared/devai/assets/models/spidr_base.pt (CC BY-NC 4.0). Eval mode."""
    return load_model(path, config=SpidRConfig())


def dinosr_base_reproduced(path: str | Path) -> DinoSR | Student:
    """DinoSR base as reproduced by the SpidR authors, from a local copy of
    https://dl.fbaipublicfiles.com/shared/devai/assets/models/dinosr_base_reproduced.pt (CC BY-NC 4.0). Eval mode."""
    return load_model(path, config=DinoSRConfig())


def dinosr_base_original(path: str | Path, *, trust: bool = False) -> DinoSR | Student:
    """The original fairseq DinoSR base, from a local copy of
    https://data.csail.mit.edu/placesaudio/dinosr/dinosr.ckpt, converted to our layout (qkv bias included).
    The file pickles its fairseq config, so it loads only with ``trust=True`` (and the ``omegaconf`` package
    installed). Eval mode."""
    return load_model(path, trust=trust, model_type="dinosr")
