"""AdamW with the official two parameter groups, LR schedules as pure functions of the step (spec §7.1–7.2).

Group 0 holds every optimised parameter except the ones named by ``optimizer.to_freeze`` (the conv extractor and
feature projection), which form group 1 so that the freeze at ``model.freeze_step`` can drop them, and their Adam
state, from the optimizer (spec §4.7). Parameters whose names start with ``optimizer.exclude_from_optimizer``
(the EMA teacher) are never optimised.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from spidr.config import OptimizerConfig

logger = logging.getLogger(__name__)

# Devices whose AdamW has a fused kernel (one pass per parameter tensor). On CPU torch otherwise picks its
# per-parameter Python loop, ~7x slower on the base model's 95M parameters (benchmarks/train_step.py --adamw).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def adamw_implementation(device: torch.device) -> dict[str, bool | None]:
    """``torch.optim.AdamW`` keyword arguments picking its fastest implementation on ``device``: fused where
    available (as the official trainer does), torch's default elsewhere."""
    return {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {"fused": None}


FROZEN_GROUP = 1  # index of the extractor/projection group, removed at the freeze step


def param_groups(
    model: nn.Module, cfg: OptimizerConfig, *, include_frozen: bool = True
) -> list[list[tuple[str, nn.Parameter]]]:
    """Named parameters split into [group 0, group 1] (group 1 only when ``include_frozen``).

    Teacher parameters (``cfg.exclude_from_optimizer`` prefixes) are left out whatever their ``requires_grad``.
    """
    rest: list[tuple[str, nn.Parameter]] = []
    to_freeze: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if name.startswith(cfg.exclude_from_optimizer):
            continue
        if name.startswith(cfg.to_freeze):
            to_freeze.append((name, param))
        else:
            rest.append((name, param))
    if not rest:
        raise ValueError(
            f"optimizer.exclude_from_optimizer = {list(cfg.exclude_from_optimizer)} and optimizer.to_freeze = "
            f"{list(cfg.to_freeze)} leave no parameter to train"
        )
    return [rest, to_freeze] if include_frozen else [rest]


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, *, device: torch.device, include_frozen: bool = True
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, identical hyper-parameters in both groups except group 1's peak lr,
    ``lr × feature_encoder_lr_scale``; fused on CPU and CUDA (:func:`adamw_implementation`).

    Weight decay applies to every optimised parameter, biases and norms included, as in the official code.
    ``include_frozen=False`` builds the optimizer of a run already past the freeze step.
    """
    lr_scales = [1.0, cfg.feature_encoder_lr_scale]
    groups = [
        {"params": [p for _, p in group], "lr": cfg.lr * scale}
        for group, scale in zip(param_groups(model, cfg, include_frozen=include_frozen), lr_scales, strict=False)
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **adamw_implementation(device),
    )


# --------------------------------------------------------------------------------------------------------------
# Learning-rate schedules: multiplier of the peak lr used at 0-based optimizer step ``step``
# --------------------------------------------------------------------------------------------------------------


def _warmup(step: int, cfg: OptimizerConfig, peak: float) -> float:
    """Linear warm-up from ``init_lr_scale`` (forced to ``peak`` without warm-up) to ``peak``."""
    return cfg.init_lr_scale * peak + (peak - cfg.init_lr_scale * peak) * step / cfg.warmup_steps


def lr_multiplier(step: int, cfg: OptimizerConfig) -> float:
    """The factor applied to ``cfg.lr`` at 0-based optimizer step ``step`` (all groups share it).

    * tristage: warm-up, hold at 1 up to step ``warmup + hold`` inclusive, then exponential decay reaching
      ``final_lr_scale`` after ``decay_steps`` steps, where it stays;
    * cosine: warm-up, then cosine annealing over ``max_steps − warmup`` to ``final_lr_scale``;
    * rsqrt: warm-up to 1/√(1 + shift/timescale), hold at 1, then 1/√(1 + (u + shift)/timescale) where u counts
      steps since the decay started;
    * constant: warm-up, then 1.
    """
    if step < cfg.warmup_steps:
        peak = 1.0 / math.sqrt(1.0 + cfg.rsqrt_shift / cfg.rsqrt_timescale) if cfg.scheduler == "rsqrt" else 1.0
        return _warmup(step, cfg, peak)
    since_warmup = step - cfg.warmup_steps
    match cfg.scheduler:
        case "tristage":
            if since_warmup <= cfg.hold_steps:
                return 1.0
            if cfg.decay_steps == 0:
                return cfg.final_lr_scale
            progress = min(1.0, (since_warmup - cfg.hold_steps) / cfg.decay_steps)
            return cfg.final_lr_scale**progress
        case "cosine":
            span = cfg.max_steps - cfg.warmup_steps
            progress = min(1.0, since_warmup / span) if span > 0 else 1.0
            return cfg.final_lr_scale + (1.0 - cfg.final_lr_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))
        case "rsqrt":
            if since_warmup < cfg.hold_steps:
                return 1.0
            decayed = since_warmup - cfg.hold_steps
            return 1.0 / math.sqrt(1.0 + (decayed + cfg.rsqrt_shift) / cfg.rsqrt_timescale)
        case "constant":
            return 1.0
    raise ValueError(f"optimizer.scheduler = {cfg.scheduler!r} is invalid: expected tristage, cosine, rsqrt "
                     "or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> LambdaLR:
    """A LambdaLR whose ``step()`` count is the optimizer step, so the lr in use is each group's peak lr ×
    ``lr_multiplier(step)``; the same schedule for every group."""
    return LambdaLR(optimizer, [lambda step: lr_multiplier(step, cfg)] * len(optimizer.param_groups))


def remove_frozen_group(optimizer: torch.optim.Optimizer, scheduler: LambdaLR) -> None:
    """Drop group 1 (extractor + projection) and its Adam state, and the scheduler's entry for it (spec §4.7).

    From then on the frozen weights receive neither updates nor weight decay.
    """
    if len(optimizer.param_groups) <= FROZEN_GROUP:
        return
    group = optimizer.param_groups.pop(FROZEN_GROUP)
    for param in group["params"]:
        optimizer.state.pop(param, None)
    for name in ("base_lrs", "lr_lambdas", "_last_lr"):
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) > FROZEN_GROUP:
            values.pop(FROZEN_GROUP)
    logger.info("removed the frozen parameter group (%d tensors) and its optimizer state", len(group["params"]))
