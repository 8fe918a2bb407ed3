"""Unit-LM training configuration: one frozen dataclass per TOML section, loaded with ``--set`` overrides.

Sections ``[run]`` (where and how), ``[data]`` (unit files, dedup, validation split), ``[model]`` (architecture) and
``[optimizer]`` (AdamW, warm-up + cosine schedule, batch, precision). Every field is checked when the file is loaded,
with the same rules and messages as the pretraining config (``spidr.config``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spidr.config import apply_overrides, check_fields, from_mapping, read_config_file, require
from spidr.lm.models import Arch


@dataclass(frozen=True)
class LmRunSection:
    workdir: str = "runs/lm"
    name: str = "unit-lm"  # the run directory is <workdir>/<name>
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_interval: int = 50
    save_interval: int = 250
    keep_latest: int = 2
    validate_interval: int = 250  # validation perplexity every this many steps (and at the end)
    compile: bool = False  # torch.compile on CUDA only
    use_deterministic: bool = False
    max_consecutive_nonfinite: int = 10

    def __post_init__(self) -> None:
        check_fields(self, "run")
        require(bool(self.workdir) and bool(self.name), "run.workdir and run.name are required")
        for name in ("log_interval", "save_interval", "validate_interval", "max_consecutive_nonfinite"):
            require(getattr(self, name) >= 1, f"run.{name} = {getattr(self, name)} must be >= 1")
        require(self.keep_latest == -1 or self.keep_latest >= 1,
                f"run.keep_latest = {self.keep_latest} must be -1 (keep all) or >= 1")

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) / self.name


@dataclass(frozen=True)
class LmDataSection:
    train: str = ""  # units JSONL (spidr extract --codebooks / spidr units) or frame labels JSONL
    valid: str = ""  # optional; without it, val_fraction of the training utterances are held out
    val_fraction: float = 0.05
    dedup: bool = True  # collapse repeated units (GSLM); applied again at scoring time
    num_units: int = 0  # 0: 1 + the largest unit of the training file (or the number of labels)
    # Validation scores about this many held-out tokens at most, in windows spread over them (0: all): the held-out
    # share grows with the corpus, and scoring all of it cost more than training in between at Libri-light scale.
    max_valid_tokens: int = 2_000_000

    def __post_init__(self) -> None:
        check_fields(self, "data")
        require(bool(self.train), "data.train is required (a units or frame-label .jsonl file)")
        require(0.0 <= self.val_fraction < 0.5, f"data.val_fraction = {self.val_fraction} must be in [0, 0.5)")
        require(self.num_units >= 0, f"data.num_units = {self.num_units} must be >= 0")
        require(self.max_valid_tokens >= 0, f"data.max_valid_tokens = {self.max_valid_tokens} must be >= 0 (0: all)")


@dataclass(frozen=True)
class LmModelSection:
    arch: Arch = "lstm"
    dim: int = 256
    num_layers: int = 2
    num_heads: int = 4  # gpt
    ffn_dim: int = 1024  # gpt
    context: int = 256  # tokens per training window (and the gpt's position table)
    dropout: float = 0.1
    activation: Literal["gelu", "relu"] = "gelu"  # gpt FFN (OPT uses relu)
    tie_embeddings: bool = True
    ngram_order: int = 2  # ngram
    ngram_add_k: float = 0.1  # ngram

    def __post_init__(self) -> None:
        check_fields(self, "model")
        for name in ("dim", "num_layers", "num_heads", "ffn_dim", "context", "ngram_order"):
            require(getattr(self, name) >= 1, f"model.{name} = {getattr(self, name)} must be >= 1")
        require(0.0 <= self.dropout < 1.0, f"model.dropout = {self.dropout} must be in [0, 1)")
        require(self.context >= 2, f"model.context = {self.context} must be >= 2")
        if self.arch == "gpt":
            require(self.dim % self.num_heads == 0,
                    f"model.dim = {self.dim} must be a multiple of model.num_heads = {self.num_heads}")
        if self.arch == "ngram":  # checked with the config, not after the units file is read
            require(self.ngram_order in (1, 2),
                    f"model.ngram_order = {self.ngram_order}: only 1 (unigram) and 2 (bigram) are built")
            require(self.ngram_add_k > 0, f"model.ngram_add_k = {self.ngram_add_k} must be > 0")


@dataclass(frozen=True)
class LmOptimizerSection:
    lr: float = 3e-3
    min_lr_scale: float = 0.1  # the cosine decays to lr × this
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_norm: float = 1.0
    warmup_steps: int = 50
    max_steps: int = 1000
    batch_size: int = 16  # windows per optimizer step, over all ranks and micro-batches
    grad_accum_steps: int = 1
    # float16 is not trained with (see check_trainable) but still read: LMs trained with it before load for scoring.
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"

    def __post_init__(self) -> None:
        check_fields(self, "optimizer")
        require(self.lr > 0, f"optimizer.lr = {self.lr} must be > 0")
        require(0.0 < self.min_lr_scale <= 1.0, f"optimizer.min_lr_scale = {self.min_lr_scale} must be in (0, 1]")
        for i, beta in enumerate(self.betas):
            require(0.0 <= beta < 1.0, f"optimizer.betas[{i}] = {beta} must be in [0, 1)")
        require(self.eps > 0 and self.weight_decay >= 0 and self.max_norm > 0,
                "optimizer.eps and optimizer.max_norm must be > 0, optimizer.weight_decay >= 0")
        for name in ("max_steps", "batch_size", "grad_accum_steps"):
            require(getattr(self, name) >= 1, f"optimizer.{name} = {getattr(self, name)} must be >= 1")
        require(self.warmup_steps >= 0, f"optimizer.warmup_steps = {self.warmup_steps} must be >= 0")
        require(self.batch_size % self.grad_accum_steps == 0,
                f"optimizer.batch_size = {self.batch_size} must be a multiple of optimizer.grad_accum_steps = "
                f"{self.grad_accum_steps}")


@dataclass(frozen=True)
class LmConfig:
    """A whole unit-LM training run."""

    run: LmRunSection = field(default_factory=LmRunSection)
    data: LmDataSection = field(default_factory=LmDataSection)
    model: LmModelSection = field(default_factory=LmModelSection)
    optimizer: LmOptimizerSection = field(default_factory=LmOptimizerSection)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


SECTIONS = {"run": LmRunSection, "data": LmDataSection, "model": LmModelSection, "optimizer": LmOptimizerSection}


def default_lm_settings() -> dict[str, Any]:
    """Every setting's default, nested as ``LmConfig.to_dict`` (read from the fields: a default config is not valid,
    data.train being required)."""
    def default(f: dataclasses.Field) -> Any:
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    return json.loads(json.dumps({name: {f.name: default(f) for f in dataclasses.fields(cls)}
                                  for name, cls in SECTIONS.items()}))


def lm_config_from_dict(data: dict[str, Any]) -> LmConfig:
    """Build an ``LmConfig`` from nested sections; unknown sections and keys are refused by name."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; allowed sections: {', '.join(SECTIONS)}")
    return LmConfig(**{name: from_mapping(cls, data.get(name, {}), name) for name, cls in SECTIONS.items()})


def load_lm_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> LmConfig:
    """Load an LM config from TOML/JSON (``None``: the defaults, which ``configs/lm-lstm.toml`` spells out) and apply
    ``--set section.key=value`` overrides."""
    data = apply_overrides({} if path is None else read_config_file(path), list(overrides), sections=SECTIONS)
    try:
        cfg = lm_config_from_dict(data)
        check_trainable(cfg)
        return cfg
    except ValueError as error:
        source = "the default LM config" if path is None else str(path)
        raise ValueError(f"{source}{' with its --set overrides' if overrides else ''}: {error}") from error


def check_trainable(cfg: LmConfig) -> None:
    """Refuse what a checkpoint may record but training cannot do: ``optimizer.dtype = "float16"``, whose gradients
    would need loss scaling (the LM logits' gradients underflow it), which lm-train does not do (bf16 needs none)."""
    require(cfg.optimizer.dtype != "float16",
            "optimizer.dtype = 'float16' is not supported for training (no loss scaling); use 'bfloat16' or 'float32'")
