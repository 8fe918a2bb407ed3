"""Model building blocks, SpidR and DinoSR, checkpoint loading and conversion.

The public names below are imported on first use (PEP 562), so importing a light submodule such as
``spidr.models.frames`` (the data pipeline does) or ``spidr.models.commands`` (the CLI does) does not pay for the
models, the checkpoint loader, the fairseq converter and the exporters.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spidr.models.build import build_model
    from spidr.models.dinosr import DinoSR
    from spidr.models.frames import attention_mask_from_padding, num_frames, padding_mask_from_lengths
    from spidr.models.hf_export import export_hf
    from spidr.models.loading import (
        dinosr_base_original,
        dinosr_base_reproduced,
        export_safetensors,
        load_model,
        read_checkpoint,
        spidr_base,
    )
    from spidr.models.s3prl_export import export_s3prl
    from spidr.models.spidr import SpidR
    from spidr.models.student import Student

_EXPORTS = {
    "DinoSR": "spidr.models.dinosr",
    "SpidR": "spidr.models.spidr",
    "Student": "spidr.models.student",
    "attention_mask_from_padding": "spidr.models.frames",
    "build_model": "spidr.models.build",
    "dinosr_base_original": "spidr.models.loading",
    "dinosr_base_reproduced": "spidr.models.loading",
    "export_hf": "spidr.models.hf_export",
    "export_s3prl": "spidr.models.s3prl_export",
    "export_safetensors": "spidr.models.loading",
    "load_model": "spidr.models.loading",
    "num_frames": "spidr.models.frames",
    "padding_mask_from_lengths": "spidr.models.frames",
    "read_checkpoint": "spidr.models.loading",
    "spidr_base": "spidr.models.loading",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spidr.models' has no attribute {name!r}")


__all__ = [
    "DinoSR",
    "SpidR",
    "Student",
    "attention_mask_from_padding",
    "build_model",
    "dinosr_base_original",
    "dinosr_base_reproduced",
    "export_hf",
    "export_s3prl",
    "export_safetensors",
    "load_model",
    "num_frames",
    "padding_mask_from_lengths",
    "read_checkpoint",
    "spidr_base",
]
