"""Model building blocks, SpidR and DinoSR, checkpoint loading and conversion."""

from spidr.models.build import build_model
from spidr.models.dinosr import DinoSR
from spidr.models.frames import attention_mask_from_padding, num_frames, padding_mask_from_lengths
from spidr.models.loading import (
    dinosr_base_original,
    dinosr_base_reproduced,
    export_safetensors,
    load_model,
    read_checkpoint,
    spidr_base,
)
from spidr.models.spidr import SpidR

__all__ = [
    "DinoSR",
    "SpidR",
    "attention_mask_from_padding",
    "build_model",
    "dinosr_base_original",
    "dinosr_base_reproduced",
    "export_safetensors",
    "load_model",
    "num_frames",
    "padding_mask_from_lengths",
    "read_checkpoint",
    "spidr_base",
]
