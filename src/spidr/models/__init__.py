"""Model building blocks, SpidR and DinoSR, checkpoint loading and conversion."""

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
