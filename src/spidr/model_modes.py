"""A module run in eval mode for a while, each of its submodules' own mode given back after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout): a model fresh from its builder is in training mode, and a caller who
    forgot ``.eval()`` got dropout-noised features or scores that changed per call. Each module's own mode is
    restored after (a training loop's model goes on training)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
