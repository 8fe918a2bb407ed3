"""spidr: SpidR and DinoSR self-supervised speech representation learning."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from spidr.config import DinoSRConfig, MaskingConfig, SpidRConfig

if TYPE_CHECKING:
    from spidr.data.audio import load_audio, waveform_from_samples
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

# Imported on first use, so `import spidr` (and `spidr --help`) does not pay for importing torch: name → module.
_LAZY_EXPORTS = {
    **dict.fromkeys(("DinoSR", "SpidR", "build_model", "dinosr_base_original", "dinosr_base_reproduced", "load_model",
                     "num_frames", "spidr_base"), "spidr.models"),
    **dict.fromkeys(("load_audio", "waveform_from_samples"), "spidr.data.audio"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'spidr' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (lazy ones included) and the subpackages imported so far: not this file's own imports."""
    subpackages = {name for name, value in globals().items()
                   if isinstance(value, ModuleType) and value.__name__ == f"spidr.{name}"}
    return sorted(set(__all__) | subpackages)


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
    "load_audio",
    "load_model",
    "num_frames",
    "spidr_base",
    "waveform_from_samples",
]
