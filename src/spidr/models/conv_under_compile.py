"""1-d convolutions that ``torch.compile`` keeps as they are, so that a compiled training step serves every length.

torch ≥ 2.12's inductor lowers a convolution's backward with a guard on the input gradient's strides, which hold
the frame count: a step compiled with ``dynamic=True`` compiled again for every new batch length, until Dynamo's
recompile limit (8), and ran eagerly after it (docs/performance.md). Under compilation the front end's and the
positional embedding's convolutions therefore go through two custom ops (forward, backward) that inductor calls
as they are, as it calls the ATen convolution anyway (inductor generates no kernel of its own for a 1-d conv);
the rest of the step stays one graph with a symbolic length. Outside compilation nothing changes: ``convolve`` is
``conv(x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def convolve(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for x (B, C_in, L) → (B, C_out, L'); under ``torch.compile``, as one opaque op (contiguous
    output, autocast applied as to ``F.conv1d``)."""
    if not torch.compiler.is_compiling():
        return conv(x)
    return opaque_conv1d(conv, x)


def opaque_conv1d(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``convolve``'s compiled branch, callable eagerly too (tests): ``conv(x)`` through ``spidr::conv1d``."""
    if conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
        raise ValueError(f"convolve takes convs with explicit zero padding; got padding {conv.padding!r} "
                         f"({conv.padding_mode})")
    weight, bias = conv.weight, conv.bias
    device_type = x.device.type
    # A custom op is outside autocast's op lists: cast as autocast casts a conv (to its lower precision).
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _conv1d(x.contiguous(), weight, bias, [conv.stride[0], conv.padding[0], conv.dilation[0], conv.groups])


# ``settings``: [stride, padding, dilation, groups] of the conv. The schemas are written out: torch 2.5 (the floor
# when this was written) did not read this file's string annotations (``from __future__ import annotations``).


@torch.library.custom_op("spidr::conv1d", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, int[] settings) -> Tensor")
def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, settings: list[int]) -> torch.Tensor:
    return F.conv1d(x, weight, bias, *settings).contiguous()


@_conv1d.register_fake
def _(x, weight, bias, settings):
    stride, padding, dilation, _ = settings
    length = (x.shape[2] + 2 * padding - dilation * (weight.shape[2] - 1) - 1) // stride + 1
    return x.new_empty((x.shape[0], weight.shape[0], length))


@torch.library.custom_op("spidr::conv1d_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, Tensor weight, int[] settings, bool[] needs) "
                                "-> (Tensor, Tensor, Tensor)")
def _conv1d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, settings: list[int], needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for x, weight and bias; an empty tensor for one not in ``needs`` (three bools)."""
    stride, padding, dilation, groups = settings
    grads = torch.ops.aten.convolution_backward(
        grad.contiguous(), x, weight, [weight.shape[0]], [stride], [padding], [dilation], False, [0], groups, needs,
    )
    return tuple(g.contiguous() if need else grad.new_empty(0) for g, need in zip(grads, needs, strict=True))


@_conv1d_backward.register_fake
def _(grad, x, weight, settings, needs):
    shapes = (x.shape, weight.shape, weight.shape[:1])
    return tuple(grad.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs, strict=True))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, settings = inputs
    ctx.save_for_backward(x, weight)
    ctx.settings = settings
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grad_x, grad_weight, grad_bias = _conv1d_backward(grad, x, weight, ctx.settings, needs)
    return grad_x if needs[0] else None, grad_weight if needs[1] else None, grad_bias if needs[2] else None, None


_conv1d.register_autograd(_backward, setup_context=_setup_context)
