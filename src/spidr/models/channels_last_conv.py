"""The front end's trained convolution on channels-last activations, with its weight gradient as a matmul.

On the CPU in bfloat16, torch's convolution backward (2.13; conv1d and conv2d, any memory layout) computes the
weight gradient from memory it never wrote: where that memory last held a NaN or an Inf (an attention mask's -inf,
a skipped step's loss), the gradient comes out NaN and the training step is skipped. Measured after filling and
freeing NaN tensors: one front-end layer's weight gradient was NaN in 5 to 16 tries of 16, a whole tiny training
step's in 8 of 12; never in float32, never the input gradient. Here the forward and the input gradient stay
torch's convolution, and the weight gradient is the same sum as a matmul over the input's windows, which reads
only what it wrote: the base front end's forward + backward in bf16 (2 × 4 s, 2 cores) took as long as before
(0.195 s against 0.19), where running the whole conv as matmuls over windows took 0.27 s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def trained_conv_channels_last(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` (no padding, no dilation, one group) over x (B, L, C_in) → (B, L', C_out), channels last, in the
    autocast dtype where CPU autocast is on (as ``F.conv2d`` would run it)."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return _ChannelsLastConv.apply(x.to(dtype), conv.weight.to(dtype), bias, conv.stride[0])


class _ChannelsLastConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.has_bias = stride, bias is not None
        # A (B, C, 1, L) view of (B, L, C) memory is channels last for conv2d; its output is too.
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2), bias, stride=(1, stride))
        return y.squeeze(2).transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (B, L', C_out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad.transpose(1, 2).unsqueeze(2), x.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2), None,
                [1, ctx.stride], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False],
            )[0].squeeze(2).transpose(1, 2)
        if ctx.needs_input_grad[1]:
            windows = x.unfold(1, weight.shape[2], ctx.stride)  # (B, L', C_in, kernel): the weight's order
            windows = windows.reshape(-1, windows.shape[2] * windows.shape[3])  # (B · L', C_in · kernel)
            grad_weight = (grad.reshape(-1, grad.shape[2]).t() @ windows).reshape(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 1))
        return grad_x, grad_weight, grad_bias, None
