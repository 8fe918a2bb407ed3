"""Convolutions kept opaque under torch.compile (spidr.models.conv_under_compile): the same numbers as nn.Conv1d,
and a compiled training step that serves every batch length with one graph."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from spidr.models import conv_under_compile, num_frames
from spidr.models.components import SelfAttention
from spidr.models.conv_under_compile import _conv1d, convolve, opaque_conv1d
from test_models_dinosr import tiny_model

# (in, out, kernel, stride, padding, groups, bias): the front end's convs (no bias, no padding, strides 5 and 2,
# one input channel first) and the positional embedding's (grouped, padded, biased, odd and even kernels).
CONVS = [
    (1, 8, 10, 5, 0, 1, False),
    (8, 8, 3, 2, 0, 1, False),
    (8, 8, 2, 2, 0, 1, False),
    (8, 8, 5, 1, 2, 4, True),
    (8, 8, 4, 1, 2, 2, True),
]


def _conv(spec: tuple) -> torch.nn.Conv1d:
    in_channels, out_channels, kernel, stride, padding, groups, bias = spec
    torch.manual_seed(0)
    return torch.nn.Conv1d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups,
                           bias=bias)


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("transposed_input", [False, True])
def test_the_opaque_conv_gives_the_conv_output_and_gradients(spec, transposed_input):
    conv = _conv(spec)
    generator = torch.Generator().manual_seed(1)
    if transposed_input:  # the positional embedding convolves a (B, D, T) view of (B, T, D) memory
        x = torch.randn(3, 37, spec[0], generator=generator).transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(3, spec[0], 37, generator=generator, requires_grad=True)
    upstream = torch.randn_like(conv(x), memory_format=torch.contiguous_format)

    expected = conv(x)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [x, *conv.parameters()])
    got = opaque_conv1d(conv, x)
    grads = torch.autograd.grad((got * upstream).sum(), [x, *conv.parameters()])
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert torch.equal(convolve(conv, x), expected)  # eagerly: conv(x) itself


def test_only_the_needed_gradients_are_computed():
    """The waveform needs no gradient (first layer) and a frozen front end none for its weights: the backward op
    returns nothing for them (an empty tensor), and autograd gets None."""
    grad, x, weight = torch.randn(2, 8, 9), torch.randn(2, 1, 50), torch.randn(8, 1, 10)
    grads = torch.ops.spidr.conv1d_backward(grad, x, weight, [5, 0, 1, 1], [False, True, False])
    assert [tuple(g.shape) for g in grads] == [(0,), (8, 1, 10), (0,)]
    expected = torch.ops.aten.convolution_backward(grad, x, weight, [8], [5], [0], [1], False, [0], 1,
                                                   [True, True, True])
    torch.testing.assert_close(grads[1], expected[1])
    conv = _conv((1, 8, 10, 5, 0, 1, False)).requires_grad_(False)
    x = torch.randn(2, 1, 50, requires_grad=True)
    opaque_conv1d(conv, x).sum().backward()
    assert x.grad is not None
    assert conv.weight.grad is None
    torch.testing.assert_close(x.grad, torch.autograd.grad(conv(x).sum(), x)[0])

    conv.requires_grad_(True)
    waveform = torch.randn(2, 1, 50)
    opaque_conv1d(conv, waveform).sum().backward()
    torch.testing.assert_close(conv.weight.grad, torch.autograd.grad(conv(waveform).sum(), conv.weight)[0])


def test_the_opaque_conv_computes_in_the_autocast_precision_as_a_conv_does():
    """Custom ops are outside autocast's op lists: the wrapper casts as autocast casts a conv."""
    conv = _conv((8, 8, 5, 1, 2, 4, True))
    x = torch.randn(2, 8, 40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = conv(x), opaque_conv1d(conv, x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    (grad_x,) = torch.autograd.grad(got.float().sum(), x)
    assert grad_x.dtype == torch.float32
    torch.testing.assert_close(grad_x, torch.autograd.grad(expected.float().sum(), x)[0], rtol=2e-2, atol=2e-2)


def test_the_custom_op_is_registered_consistently():
    """torch.library's own checks: schema, fake (meta) implementation against the real one, autograd, and tracing
    with dynamic shapes."""
    x = torch.randn(2, 8, 37, requires_grad=True)
    weight = torch.randn(8, 2, 5, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    torch.library.opcheck(_conv1d, (x, weight, bias, [1, 2, 1, 4]))
    torch.library.opcheck(_conv1d, (x, torch.randn(8, 8, 3, requires_grad=True), None, [2, 0, 1, 1]))


def _without_dropout(model):
    for module in model.modules():  # compiled code draws its own random numbers: compare without any
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, SelfAttention):
            module.dropout = 0.0
    return model


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's own
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code needs a C++ compiler")
def test_a_step_compiled_by_inductor_serves_every_batch_length_with_the_eager_numbers():
    """torch ≥ 2.12's inductor lowers a conv backward with a guard on the frame count: the compiled step compiled
    again at every new batch length (8 times, then ran eagerly). With the convs opaque, one graph serves three
    lengths, and losses and gradients are the eager model's."""
    conv = ((16, 10, 5), (16, 3, 2), (16, 2, 2))
    eager, compiled_model = (
        _without_dropout(tiny_model("spidr", extractor_conv_layer_config=conv, encoder_num_layers=2).train())
        for _ in range(2)
    )
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="inductor", dynamic=True)
    try:
        for step, samples in enumerate([4000, 4400, 4880]):
            generator = torch.Generator().manual_seed(samples)
            mask = torch.rand(2, num_frames(samples, conv), generator=generator) < 0.5
            waves = F.layer_norm(torch.randn(2, samples, generator=generator), (samples,))
            expected, _ = eager(waves, mask=mask, mask_count=int(mask.sum()))
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                got, _ = compiled(waves, mask=mask, mask_count=int(mask.sum()))
            expected.sum().backward()
            got.sum().backward()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            for (name, e), g in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
                assert (e.grad is None) == (g.grad is None), name
                if e.grad is not None:
                    torch.testing.assert_close(g.grad, e.grad, rtol=1e-3, atol=1e-5, msg=name)
            eager.zero_grad()
            compiled_model.zero_grad()
    finally:
        torch._dynamo.reset()  # no compiled code left behind for the other tests


def test_opaque_conv_backward_skips_the_waveform_gradient(monkeypatch) -> None:
    """The first conv's input (the waveform) needs no gradient: its backward asks for the weight's only, and a
    conv whose input does need one asks for both."""
    asked = []
    backward = conv_under_compile._conv1d_backward

    def recording(grad, x, weight, settings, needs):
        asked.append(list(needs))
        return backward(grad, x, weight, settings, needs)

    monkeypatch.setattr(conv_under_compile, "_conv1d_backward", recording)
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(1, 8, 10, stride=5, bias=False)
    opaque_conv1d(conv, torch.randn(2, 1, 400)).sum().backward()
    opaque_conv1d(conv, torch.randn(2, 1, 400, requires_grad=True)).sum().backward()
    assert asked == [[False, True, False], [True, True, False]]

