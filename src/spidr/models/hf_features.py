"""SpidR's own per-layer features from a Hugging Face or s3prl data2vec-audio model, through forward hooks.

``hidden_states[l]`` of ``Data2VecAudioModel`` (and s3prl's hidden states) is layer l's full output, after its
residual add and final LayerNorm. The features the SpidR paper evaluates, and that ``spidr extract`` writes, are
each layer's feed-forward output *before* the residual (``before_residual=True`` in spidr). This module records
them during an ordinary forward and needs nothing but torch::

    with torch.no_grad(), before_residual_features(model) as features:
        model(input_values)
    layer_6 = features[5]  # (B, T, D)

Use it in eval mode: with layer drop (training mode) a skipped layer keeps its previous entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _feed_forward_outputs(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """Each encoder layer's last feed-forward Linear, and whether its output is time-major (T, B, D)."""
    base = model
    if isinstance(getattr(model, "data2vec_audio", None), nn.Module):  # Data2VecAudioForCTC and other task models
        base = model.data2vec_audio
    elif not hasattr(model, "encoder") and isinstance(getattr(model, "model", None), nn.Module):  # s3prl upstream
        base = model.model
    layers = getattr(getattr(base, "encoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no encoder.layers: expected a Hugging Face Data2VecAudio model "
                         "or an s3prl data2vec upstream")
    first = layers[0]
    if hasattr(first, "feed_forward") and hasattr(first.feed_forward, "output_dense"):  # transformers, (B, T, D)
        return [layer.feed_forward.output_dense for layer in layers], False
    if hasattr(first, "fc2"):  # fairseq / s3prl, (T, B, D)
        return [layer.fc2 for layer in layers], True
    raise ValueError(f"the encoder layers of {type(model).__name__} have neither feed_forward.output_dense "
                     "(transformers) nor fc2 (fairseq / s3prl)")


@contextmanager
def before_residual_features(model: nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, every forward of ``model`` stores each layer's feed-forward output before dropout and
    residual, (B, T, D), in the yielded list: layer l (1-based) at index l − 1, from the latest forward (None until
    that layer has run).

    ``model``: a ``Data2VecAudioModel``, a task model holding one (``Data2VecAudioForCTC``, ...), or an s3prl
    data2vec upstream (or its ``.model``). The hooks are removed when the block ends.
    """
    modules, time_major = _feed_forward_outputs(model)
    features: list[torch.Tensor | None] = [None] * len(modules)

    def recorder(index: int):
        def hook(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            features[index] = output.transpose(0, 1) if time_major else output

        return hook

    handles = [module.register_forward_hook(recorder(i)) for i, module in enumerate(modules)]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()
