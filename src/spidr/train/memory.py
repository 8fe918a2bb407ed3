"""Handing the heap's free pages back to the OS before the conv front end's backward (CPU training on glibc).

In a CPU training step glibc's malloc serves the transformer's activations (blocks of 1-5 MiB) from its heap and
keeps them there, resident, once backward has freed them. A buffer above malloc's mmap threshold, which never
rises past 32 MiB, is mapped afresh instead and cannot reuse that free heap: when the front end's activations are
that large, its backward maps its buffers beside the free heap, and the step's peak RSS falls there.
``malloc_trim(0)`` when the front end's backward starts returns the free heap pages first; the next forward faults
them back in, which costs time. Measured on base, 2 threads, a Xeon with AMX, against no trim (same tree):

- fp32, 2 × 4 s (first-layer output 50 MiB): peak RSS 3.04 → 2.70 GiB, step 3-6 % slower;
- fp32, 4 × 8 s (200 MiB): 6.2-6.4 → 5.2 GiB, and the step faster, 16.6-22.8 → 14.0-15.8 s;
- bf16, 4 × 8 s (100 MiB): 4.71 → 4.39 GiB, step 3 % slower;
- bf16, 2 × 4 s (25 MiB, served from the heap): 3 % less RSS for a step 13-20 % slower; bench-small, fp32, 2 × 4 s
  (26 MiB): no less RSS, step 12 % slower.

So ``run.trim_heap = "auto"`` trims on a CPU in each backward (each micro-batch) whose first-layer output exceeds
32 MiB; "always" in every backward on a CPU; "never" in none. A GPU run never trims: its activations are not in
the host heap, and the ctypes call would split a compiled graph.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from spidr.models.components import ConvLayerBlock
from spidr.models.frames import num_frames
from spidr.train.precision import Precision

logger = logging.getLogger(__name__)

TrimHeap = Literal["auto", "always", "never"]

# glibc's dynamic mmap threshold on 64-bit systems never exceeds this (DEFAULT_MMAP_THRESHOLD_MAX): larger blocks
# are always mapped afresh, never carved from the heap.
MMAP_THRESHOLD_MAX = 32 * 2**20


def heap_trimmer() -> Callable[[], None] | None:
    """A function returning the C heap's free pages to the OS (glibc's ``malloc_trim(0)``), or None where the
    process does not run on glibc (macOS, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is None:
        return None
    malloc_trim.argtypes = [ctypes.c_size_t]

    def trim() -> None:
        malloc_trim(0)

    return trim


def trims_heap(setting: TrimHeap, precision: Precision) -> bool:
    """Whether ``run.trim_heap`` installs the trim when training in ``precision``: on a CPU unless "never"."""
    return precision.device_type == "cpu" and setting != "never"


def install_heap_trim(model: nn.Module, setting: TrimHeap, precision: Precision) -> RemovableHandle | None:
    """The trim that ``train()`` installs on ``model`` for ``run.trim_heap = setting`` in ``precision``
    (``trims_heap``): in every backward for "always", else by size; the hook's handle, or None when none is."""
    if not trims_heap(setting, precision):
        return None
    return trim_heap_before_front_end_backward(model, every_backward=setting == "always")


def first_layer_output_bytes(extractor: nn.Module, waveforms: torch.Tensor) -> int:
    """Bytes of the conv front end's first-layer output for ``waveforms`` (B, S), its largest activation: 0 when
    the first layer is not a conv (a log-mel filterbank's output is a fraction of its input)."""
    first = extractor.conv_layers[0]
    if not isinstance(first, ConvLayerBlock):
        return 0
    batch, samples = waveforms.shape
    frames = num_frames(samples, [(first.conv.out_channels, first.conv.kernel_size[0], first.conv.stride[0])])
    lower = torch.is_autocast_enabled(waveforms.device.type)
    itemsize = torch.get_autocast_dtype(waveforms.device.type).itemsize if lower else waveforms.element_size()
    return batch * frames * first.conv.out_channels * itemsize


def trim_heap_before_front_end_backward(model: nn.Module, *, every_backward: bool = False) -> RemovableHandle | None:
    """Call ``heap_trimmer()`` when the backward reaches the output of ``model.feature_extractor`` (the student's
    conv front end), i.e. once the transformer's backward has freed its activations and before the front end's own
    starts: in every backward (each micro-batch) with ``every_backward``, else in those whose first-layer output
    exceeds ``MMAP_THRESHOLD_MAX`` (module docstring). Returns the handle of the forward hook that arranges it, or
    None without glibc. A forward without gradients (a frozen front end, validation) has no backward: no trim then."""
    trim = heap_trimmer()
    if trim is None:
        logger.info("run.trim_heap: this process does not use glibc's malloc; nothing to trim")
        return None

    def after_forward(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        if every_backward or first_layer_output_bytes(module, inputs[0]) > MMAP_THRESHOLD_MAX:
            output.register_hook(lambda grad: trim())

    return model.feature_extractor.register_forward_hook(after_forward)
