"""spidr: SpidR and DinoSR self-supervised speech representation learning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spidr.config import DinoSRConfig, MaskingConfig, SpidRConfig

if TYPE_CHECKING:
    from spidr.models import (
        DinoSR,
        SpidR,
        build_model,
        dinosr_base_original,
        dinosr_base_reproduced,
        load_model,
        num_frames,
        spidr_base,
    )

__version__ = "0.1.0"

# Model exports are imported on first use, so `import spidr` (and `spidr --help`) does not pay for importing torch.
_MODEL_EXPORTS = (
    "DinoSR",
    "SpidR",
    "build_model",
    "dinosr_base_original",
    "dinosr_base_reproduced",
    "load_model",
    "num_frames",
    "spidr_base",
)


def __getattr__(name: str) -> Any:
    if name in _MODEL_EXPORTS:
        return getattr(importlib.import_module("spidr.models"), name)
    raise AttributeError(f"module 'spidr' has no attribute {name!r}")


__all__ = [
    "DinoSR",
    "DinoSRConfig",
    "MaskingConfig",
    "SpidR",
    "SpidRConfig",
    "__version__",
    "build_model",
    "dinosr_base_original",
    "dinosr_base_reproduced",
    "load_model",
    "num_frames",
    "spidr_base",
]
