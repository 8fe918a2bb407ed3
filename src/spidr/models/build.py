"""Model construction from a config: the one place that maps a model type to its class."""

from __future__ import annotations

from spidr.config import ModelConfig, SpidRConfig
from spidr.models.dinosr import DinoSR
from spidr.models.spidr import SpidR


def build_model(cfg: ModelConfig) -> DinoSR:
    """A freshly initialised ``SpidR`` or ``DinoSR`` (``cfg.model_type``), in training mode.

    Seed with ``torch.manual_seed`` first for reproducible weights: the same seed gives the same initial weights as
    the official implementation.
    """
    match cfg.model_type:
        case "spidr":
            assert isinstance(cfg, SpidRConfig)
            return SpidR(cfg)
        case "dinosr":
            return DinoSR(cfg)
    raise ValueError(f"model type {cfg.model_type!r} is invalid: expected 'dinosr' or 'spidr'")


def random_init_model(cfg: ModelConfig, *, seed: int = 0) -> DinoSR:
    """The architecture of ``cfg`` at random initialisation, in eval mode: the untrained baseline of the demo and of
    ``spidr lm-study`` (seeds the global generator, so a given seed always gives the same weights)."""
    import torch

    torch.manual_seed(seed)
    return build_model(cfg).eval()
