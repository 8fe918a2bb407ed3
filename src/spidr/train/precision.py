"""Mixed precision: which autocast dtype to use, and whether gradients need a scaler.

``optimizer.dtype`` asks for bfloat16 (the default), float16 or float32. bfloat16 autocast runs on CUDA and on
CPUs with native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere it falls back to float32 with a warning, since
emulated bf16 is slower than float32. float16 needs CUDA and a GradScaler; bf16 has float32's range and needs
none. Only the forward runs under autocast (spec §7.3); the model keeps codebooks and losses in float32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None = plain float32) on one device type."""

    device_type: str
    dtype: torch.dtype | None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for float16 only."""
        return torch.amp.GradScaler(self.device_type) if self.dtype == torch.float16 else None

    @property
    def name(self) -> str:
        return "float32" if self.dtype is None else str(self.dtype).removeprefix("torch.")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (Linux ``/proc/cpuinfo`` flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_precision(requested: str, device: torch.device, *, float16: bool = True) -> Precision:
    """The precision to train with for ``optimizer.dtype = requested`` on ``device``. ``float16``: whether the
    caller trains in float16 (the unit LM does not), for the alternative an error suggests."""
    match requested, device.type:
        case "float32", _:
            return Precision(device.type, None)
        case "bfloat16", "cuda":
            if not torch.cuda.is_bf16_supported():
                instead = "'float16' or 'float32'" if float16 else "'float32'"
                raise ValueError(
                    f"optimizer.dtype = 'bfloat16' is not supported by {torch.cuda.get_device_name(device)} "
                    f"(compute capability < 8.0); set optimizer.dtype = {instead}"
                )
            return Precision("cuda", torch.bfloat16)
        case "bfloat16", "cpu":
            if cpu_has_native_bf16():
                return Precision("cpu", torch.bfloat16)
            logger.warning("this CPU has no native bfloat16 (avx512_bf16/amx_bf16): training in float32")
            return Precision("cpu", None)
        case "float16", "cuda":
            return Precision("cuda", torch.float16)
        case "float16", _:
            raise ValueError(
                f"optimizer.dtype = 'float16' needs CUDA (this run is on {device.type}); use 'bfloat16' or "
                "'float32'"
            )
    raise ValueError(f"optimizer.dtype = {requested!r} is invalid: expected float32, bfloat16 or float16")
