"""bf16 inference with a float32 input path: ``bfloat16_inference(model, device_type)``.

Under bf16 autocast every conv and matmul rounds its inputs, weights and output to bf16's 8 significant bits, each
rounding moving a result ≈ 0.17 % (relative norm). The conv front end (7 convs, each with its LayerNorm and GELU),
the feature projection and the positional convolution (5 convs) are ≈ 40 such roundings in a row before the first
Transformer layer, and their errors add up: on the base model (random weights, 10 s, a Xeon with AMX) the front
end's output is 1.07 % off its float32 value, the layer features 1.2-1.6 %. Those parts hold about a third of a base
forward's flops, and on a CPU the float32 front end runs channels last (twice as fast as the official layout), so
``bfloat16_inference`` keeps them in float32 and runs the Transformer layers in bf16: the layer features are then
0.45-0.67 % off float32, at 2.0-2.1x float32's speed instead of 3.2x (same machine, 2 threads; docs/performance.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch
from torch import nn

from spidr.models.components import ConvFeatureExtractor, ConvPositionalEmbedding, FeatureProjection

logger = logging.getLogger(__name__)

FLOAT32_INPUT_PATH = (ConvFeatureExtractor, FeatureProjection, ConvPositionalEmbedding)


@contextlib.contextmanager
def bfloat16_inference(model: nn.Module, device_type: str) -> Iterator[None]:
    """bf16 autocast on ``device_type`` with ``model``'s front end, feature projection and positional convolutions
    in float32 (their ``keep_float32``), restored on exit. For inference: training keeps plain autocast."""
    if device_type == "cpu":
        _warn_if_emulated_on_this_cpu()
    modules = [module for module in model.modules() if isinstance(module, FLOAT32_INPUT_PATH)]
    before = [module.keep_float32 for module in modules]
    for module in modules:
        module.keep_float32 = True
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    finally:
        for module, keep in zip(modules, before, strict=True):
            module.keep_float32 = keep


@functools.cache
def _warn_if_emulated_on_this_cpu() -> None:
    """Once per process: bf16 on a CPU without native bf16 (training falls back to float32 there, with a warning)
    is emulated, about 25 % slower than float32 on such a CPU, and no more exact."""
    from spidr.train.precision import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        logger.warning("this CPU has no native bfloat16 (avx512_bf16/amx_bf16): bfloat16 inference is emulated, "
                       "slower than float32 here; --dtype float32 is faster on this machine")


def precision_identity(dtype: str) -> dict[str, str]:
    """What extraction in ``dtype`` computes, for the identity of cached features and units (an extraction folder's
    journal, a study's unit folders): bf16 extraction ran the whole model in bf16 until 2026-12-05, so bf16 says its
    input path is float32 and a folder made before is not taken for one made now. float32: nothing to add."""
    return {"bf16_input_path": "float32"} if dtype == "bfloat16" else {}
