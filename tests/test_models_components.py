"""Encoder building blocks: masks, conv extractor, positional conv, attention, layers, init (spec §3)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spidr.models import components
from spidr.models.channels_last_conv import _ChannelsLastConv, trained_conv_channels_last
from spidr.models.components import (
    NO_PADDING,
    ConvFeatureExtractor,
    ConvPositionalEmbedding,
    SelfAttention,
    build_transformer,
    conv_layout,
    frame_masks,
    scale_grad,
)
from spidr.models.conv_under_compile import opaque_conv1d


def _transformer(*, layer_norm_first: bool = False, layer_drop: float = 0.0, num_layers: int = 3):
    return build_transformer(
        32,
        num_layers=num_layers,
        num_heads=4,
        ff_dim=64,
        pos_conv_kernel=95,
        pos_conv_groups=16,
        pos_conv_depth=5,
        dropout=0.0,
        attention_dropout=0.0,
        ff_dropout=0.0,
        layer_drop=layer_drop,
        layer_norm_first=layer_norm_first,
        qkv_bias=False,
    )


# ----------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------


def test_frame_masks_normalise_both_conventions() -> None:
    x = torch.zeros(2, 5, 8)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    attention = (~padding)[:, None, None, :].expand(2, 1, 5, 5)
    from_padding = frame_masks(x, padding_mask=padding)
    from_attention = frame_masks(x, attention_mask=attention)
    assert torch.equal(from_padding.valid, ~padding)
    assert torch.equal(from_attention.valid, ~padding)
    assert torch.equal(from_padding.attention.expand(2, 1, 5, 5), from_attention.attention)
    # nothing padded → no mask at all, whatever the form
    assert frame_masks(x) == NO_PADDING
    assert frame_masks(x, padding_mask=torch.zeros(2, 5, dtype=torch.bool)) == NO_PADDING
    assert frame_masks(x, attention_mask=torch.ones(2, 1, 5, 5, dtype=torch.bool)) == NO_PADDING


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding_mask": torch.zeros(2, 4, dtype=torch.bool)},  # wrong T
        {"padding_mask": torch.zeros(2, 5)},  # not bool
        {"attention_mask": torch.ones(2, 5, 5, dtype=torch.bool)},  # missing head dim
        {"attention_mask": torch.ones(2, 1, 5, 5, dtype=torch.bool), "padding_mask": torch.zeros(2, 5).bool()},
    ],
)
def test_frame_masks_reject_bad_input(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="mask"):
        frame_masks(torch.zeros(2, 5, 8), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Conv extractor
# ----------------------------------------------------------------------------------------------------------------


def test_extractor_modes_and_keys() -> None:
    layers = [(8, 10, 5), (8, 3, 2), (8, 2, 2)]
    layer_norm = ConvFeatureExtractor(layers, mode="layer_norm")
    group_norm = ConvFeatureExtractor(layers, mode="group_norm", conv_bias=True)
    assert list(layer_norm.state_dict()) == [
        f"conv_layers.{i}.{name}" for i in range(3) for name in ("layer_norm.weight", "layer_norm.bias", "conv.weight")
    ]
    # group norm (one group per channel) after the first conv only; conv biases on request
    assert isinstance(group_norm.conv_layers[0].layer_norm, torch.nn.GroupNorm)
    assert group_norm.conv_layers[0].layer_norm.num_groups == 8
    assert group_norm.conv_layers[1].layer_norm is None
    assert "conv_layers.2.conv.bias" in group_norm.state_dict()
    waveforms = torch.randn(3, 1000)
    assert layer_norm(waveforms).shape == group_norm(waveforms).shape == (3, 49, 8)  # 1000 → 199 → 99 → 49
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        layer_norm(torch.randn(1000))


def test_extractor_uses_no_future_samples_beyond_its_receptive_field() -> None:
    # frame t of the default extractor sees samples [320 t, 320 t + 400): changing sample 4000 changes frames 12
    # (covers 3840..4239) only.
    torch.manual_seed(0)
    extractor = ConvFeatureExtractor([(4, k, s) for _, k, s in ((0, 10, 5), *((0, 3, 2),) * 4, *((0, 2, 2),) * 2)])
    waveforms = torch.randn(1, 8000)
    changed = waveforms.clone()
    changed[0, 4000] += 1.0
    diff = (extractor(changed) - extractor(waveforms)).abs().amax(-1)[0]
    assert diff.nonzero().flatten().tolist() == [12]


def test_scale_grad() -> None:
    x = torch.ones(3, requires_grad=True)
    (scale_grad(x, 0.25) * 2).sum().backward()
    assert x.grad.tolist() == [0.5, 0.5, 0.5]
    assert scale_grad(x, 1.0) is x


# ----------------------------------------------------------------------------------------------------------------
# Positional conv
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kernel", "reach"), [(5, (-2, 2)), (4, (-2, 1))])
def test_positional_conv_reach_and_even_kernel_trim(kernel: int, reach: tuple[int, int]) -> None:
    """One conv of kernel k with padding k // 2: odd k sees frames t − k//2 … t + k//2; an even k makes one frame too
    many and the last is dropped, so output t sees inputs t − k/2 … t + k/2 − 1."""
    torch.manual_seed(0)
    pos_conv = ConvPositionalEmbedding(16, kernel, groups=4, depth=1)
    assert pos_conv.kernel == kernel
    x = torch.randn(1, 20, 16)
    out = pos_conv(x)
    assert out.shape == x.shape
    changed = x.clone()
    changed[0, 10] += 1.0
    moved = (pos_conv(changed) - out).abs().amax(-1)[0].nonzero().flatten().tolist()
    # input frame 10 reaches outputs 10 − reach[1] … 10 − reach[0]
    assert moved == list(range(10 - reach[1], 10 - reach[0] + 1))


def test_positional_conv_kernel_per_layer() -> None:
    assert ConvPositionalEmbedding(32, 95, groups=16, depth=5).kernel == 19
    assert ConvPositionalEmbedding(32, 10, groups=16, depth=5).kernel == 3  # max(3, 95 // depth)
    assert ConvPositionalEmbedding(32, 95, groups=16, depth=5).convs[0].weight.shape == (32, 2, 19)


def test_positional_conv_padding_behaves_like_a_shorter_input() -> None:
    """Padded frames are zeroed around every conv, so valid frames equal those of the unpadded sequence."""
    torch.manual_seed(0)
    pos_conv = ConvPositionalEmbedding(16, 15, groups=4, depth=3)
    short = torch.randn(1, 12, 16)
    padded = torch.cat([short, torch.randn(1, 8, 16) * 100], dim=1)
    valid = torch.arange(20)[None] < 12
    out = pos_conv(padded, valid)
    torch.testing.assert_close(out[:, :12], pos_conv(short), atol=1e-6, rtol=0)
    assert torch.equal(out[:, 12:], torch.zeros(1, 8, 16))


# ----------------------------------------------------------------------------------------------------------------
# Attention and layers
# ----------------------------------------------------------------------------------------------------------------


def _reference_attention(attention: SelfAttention, x: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Plain softmax(Q Kᵀ / √d) V per head, written out."""
    batch, frames, dim = x.shape
    heads = attention.num_heads
    q, k, v = attention.qkv(x).split(dim, dim=-1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, frames, heads, dim // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ split(v)
    return attention.proj(out.transpose(1, 2).reshape(batch, frames, dim))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_matches_the_written_out_formula(qkv_bias: bool) -> None:
    torch.manual_seed(0)
    attention = SelfAttention(24, 3, qkv_bias=qkv_bias)
    assert attention.qkv.weight.shape == (72, 24)
    assert (attention.qkv.bias is not None) == qkv_bias
    x = torch.randn(2, 7, 24)
    key_valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    torch.testing.assert_close(attention(x), _reference_attention(attention, x, None), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        attention(x, key_valid[:, None, None, :]), _reference_attention(attention, x, key_valid), atol=1e-5, rtol=0
    )


def test_cpu_bf16_autocast_attention_takes_fp32_between_bf16_projections() -> None:
    """Under CPU bf16 autocast the projections run in bf16 and the attention itself in fp32: the output equals the
    written-out formula on the bf16 q, k, v (in float64), rounded to bf16 (bf16 attention misses it on ~45 % of
    the outputs)."""
    torch.manual_seed(0)
    attention = SelfAttention(64, 4).eval()
    x = torch.randn(2, 30, 64)
    key_valid = torch.tensor([[True] * 30, [True] * 20 + [False] * 10])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(x, key_valid[:, None, None, :])
        qkv = attention.qkv(x)  # bf16, as the module computes it
    assert out.dtype == torch.bfloat16
    q, k, v = (t.double().view(2, 30, 4, 16).transpose(1, 2) for t in qkv.split(64, dim=-1))
    scores = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~key_valid[:, None, None, :], float("-inf"))
    heads = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 30, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attention.proj(heads)
    differing = (out != expected).float().mean().item()
    assert differing <= 0.01, differing
    # The fp32 path is untouched (and stays within bf16 error of it).
    torch.testing.assert_close(out.float(), attention(x, key_valid[:, None, None, :]), atol=0.05, rtol=0.05)


def test_attention_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    attention = SelfAttention(16, 2, dropout=0.5)
    x = torch.randn(1, 6, 16)
    attention.eval()
    assert torch.equal(attention(x), attention(x))
    attention.train()
    assert not torch.equal(attention(x), attention(x))


def test_post_norm_transformer_has_no_final_layer_norm() -> None:
    torch.manual_seed(0)
    transformer = _transformer().eval()
    x = torch.randn(2, 9, 32)
    after = transformer.get_intermediate_outputs(x, before_residual=False)
    torch.testing.assert_close(transformer(x), after[-1], atol=0, rtol=0)
    # each layer's full output is LN_final(x₁ + FFN output): the FFN output is its before-residual output
    before = transformer.get_intermediate_outputs(x, before_residual=True)
    assert len(before) == 3
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_pre_norm_transformer_normalises_at_the_end() -> None:
    torch.manual_seed(0)
    transformer = _transformer(layer_norm_first=True).eval()
    assert not transformer.norm_at_input
    x = torch.randn(2, 9, 32)
    after = transformer.get_intermediate_outputs(x, before_residual=False)
    torch.testing.assert_close(transformer(x), transformer.layer_norm(after[-1]), atol=0, rtol=0)
    layer = transformer.layers[0]
    h = x + transformer.pos_conv_embed(x)  # pre-norm: no LN at the input
    x1 = h + layer.attention(layer.layer_norm(h))
    ffn = layer.feed_forward(layer.final_layer_norm(x1))
    torch.testing.assert_close(after[0], x1 + ffn, atol=1e-6, rtol=0)
    torch.testing.assert_close(transformer.get_intermediate_outputs(x)[0], ffn, atol=1e-6, rtol=0)


def test_post_norm_layer_written_out() -> None:
    torch.manual_seed(0)
    transformer = _transformer().eval()
    x = torch.randn(2, 9, 32)
    layer = transformer.layers[0]
    h = transformer.layer_norm(x + transformer.pos_conv_embed(x))  # encoder LN right after the positional conv
    x1 = layer.layer_norm(h + layer.attention(h))
    ffn = layer.feed_forward(x1)
    torch.testing.assert_close(transformer.get_intermediate_outputs(x)[0], ffn, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        transformer.get_intermediate_outputs(x, before_residual=False)[0],
        layer.final_layer_norm(x1 + ffn),
        atol=1e-6,
        rtol=0,
    )


def test_num_layers_stops_early() -> None:
    transformer = _transformer().eval()
    x = torch.randn(1, 5, 32)
    two = transformer.get_intermediate_outputs(x, num_layers=2)
    assert len(two) == 2
    torch.testing.assert_close(two, transformer.get_intermediate_outputs(x)[:2], atol=0, rtol=0)
    with pytest.raises(ValueError, match="num_layers"):
        transformer.get_intermediate_outputs(x, num_layers=4)


def test_layer_drop_skips_layers_only_in_training() -> None:
    torch.manual_seed(0)
    transformer = _transformer(layer_drop=1.0)  # every layer dropped in training
    x = torch.randn(1, 5, 32)
    preprocessed = transformer.layer_norm(x + transformer.pos_conv_embed(x))
    torch.testing.assert_close(transformer.train()(x), preprocessed, atol=0, rtol=0)
    # intermediate outputs: every layer is still computed, each on the unchanged running state
    outputs = transformer.get_intermediate_outputs(x)
    for layer, output in zip(transformer.layers, outputs, strict=True):
        torch.testing.assert_close(output, layer(preprocessed)[1], atol=0, rtol=0)
    assert not torch.equal(transformer.eval()(x), preprocessed)


@pytest.mark.parametrize("layer_drop", [0.0, 1.0])
def test_compiled_layer_drop_skips_the_layers_eager_skips(layer_drop: float) -> None:
    """Under torch.compile the skips are a device-side choice (``torch.where``) instead of a branch on a draw read
    back to the host: with layer drop 0 (no layer skipped) and 1 (every layer skipped) the compiled forward and
    intermediate outputs equal eager mode's, values and gradients."""
    torch.manual_seed(0)
    transformer = _transformer(layer_drop=layer_drop).train()  # no dropout: both runs are deterministic
    x = torch.randn(2, 5, 32)

    def run(forward) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        transformer.zero_grad()
        outputs = [*forward(x)]
        sum(o.pow(2).sum() for o in outputs).backward()
        # a layer that eager mode skips gets no gradient at all, a compiled one a zero gradient
        return [o.detach() for o in outputs], [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                               for p in transformer.parameters()]

    try:
        for forward in (lambda x: [transformer(x)], transformer.get_intermediate_outputs):
            eager = run(forward)
            compiled = run(torch.compile(forward, backend="eager", fullgraph=True))
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


def _dropout_transformer(layer_drop: float):
    return build_transformer(
        32, num_layers=3, num_heads=4, ff_dim=64, pos_conv_kernel=95, pos_conv_groups=16, pos_conv_depth=5,
        dropout=0.1, attention_dropout=0.1, ff_dropout=0.1, layer_drop=layer_drop, layer_norm_first=False,
        qkv_bias=False,
    ).train()


def _official_loops(transformer, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The official ``Transformer.forward`` and ``get_intermediate_outputs`` loops (facebookresearch/spidr
    ``models/components.py``), written out: one ``torch.rand(1)`` per layer in training whatever ``layer_drop``,
    before the layer in ``forward`` and after it in ``get_intermediate_outputs``."""
    def preprocess(x):
        return transformer.dropout(transformer.layer_norm(x + transformer.pos_conv_embed(x)))

    final = preprocess(x)
    for layer in transformer.layers:
        if not (transformer.training and torch.rand(1) <= transformer.layer_drop):
            final, _ = layer(final)
    state, outputs = preprocess(x), []
    for layer in transformer.layers:
        out, ffn = layer(state)
        if not (transformer.training and torch.rand(1) <= transformer.layer_drop):
            state = out.clone()
        outputs.append(ffn)
    return final, outputs


@pytest.mark.parametrize("layer_drop", [0.0, 0.5])
def test_layer_drop_draws_like_the_official_loop_so_dropout_masks_match(layer_drop: float) -> None:
    """From one seed, a training forward with dropout on is bit-identical to the official loop, layer drop 0
    included (the official code draws then too; skipping the draw shifted every later dropout mask)."""
    torch.manual_seed(0)
    transformer = _dropout_transformer(layer_drop)
    x = torch.randn(2, 7, 32)
    torch.manual_seed(1)
    expected_final, expected_outputs = _official_loops(transformer, x)
    expected_rng = torch.get_rng_state()
    torch.manual_seed(1)
    final = transformer(x)
    outputs = transformer.get_intermediate_outputs(x)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    torch.testing.assert_close(final, expected_final, atol=0, rtol=0)
    torch.testing.assert_close(outputs, expected_outputs, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Initialisation (spec §3.8)
# ----------------------------------------------------------------------------------------------------------------


def test_encoder_initialisation() -> None:
    torch.manual_seed(0)
    transformer = build_transformer(
        256, num_layers=2, num_heads=4, ff_dim=1024, pos_conv_kernel=95, pos_conv_groups=16, pos_conv_depth=5,
        dropout=0.1, attention_dropout=0.1, ff_dropout=0.0, layer_drop=0.0, layer_norm_first=False, qkv_bias=True,
    )
    layer = transformer.layers[0]
    for linear in (layer.feed_forward.intermediate_dense, layer.feed_forward.output_dense):
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.02)
        assert not linear.bias.any()
    # Xavier-uniform: bound gain·√(6 / (fan_in + fan_out)); qkv gain 1/√2
    qkv_bound = math.sqrt(6 / (256 + 768)) / math.sqrt(2)
    assert layer.attention.qkv.weight.abs().max().item() <= qkv_bound
    assert layer.attention.qkv.weight.abs().max().item() > 0.99 * qkv_bound
    assert layer.attention.proj.weight.abs().max().item() <= math.sqrt(6 / 512)
    assert layer.attention.proj.weight.abs().max().item() > 0.99 * math.sqrt(6 / 512)
    assert not layer.attention.proj.bias.any()
    assert not layer.attention.qkv.bias.any()
    assert torch.equal(layer.layer_norm.weight, torch.ones(256))
    # positional convs keep PyTorch's default (Kaiming-uniform, a = √5): bound 1/√fan_in
    fan_in = 16 * 19
    assert transformer.pos_conv_embed.convs[0].weight.abs().max().item() <= 1 / math.sqrt(fan_in)


def test_gelu_is_the_exact_erf_form() -> None:
    extractor = ConvFeatureExtractor([(1, 1, 1)], mode="group_norm")
    extractor.conv_layers[0].layer_norm = None
    extractor.conv_layers[0].conv.weight.data.fill_(1.0)
    x = torch.linspace(-3, 3, 13)[None]
    torch.testing.assert_close(extractor(x)[0, :, 0], F.gelu(x[0], approximate="none"), atol=0, rtol=0)
    assert not torch.allclose(extractor(x)[0, :, 0], F.gelu(x[0], approximate="tanh"), atol=1e-6, rtol=0)


def test_training_mode_layout_changes_rounding_only() -> None:
    """Training mode keeps the layers after a channel LayerNorm dense (a faster backward); values and gradients
    agree with eval mode's official layout to rounding, in the conv front end and the positional convs."""
    torch.manual_seed(0)
    extractor = ConvFeatureExtractor([(32, 10, 5), (32, 3, 2), (32, 2, 2)], mode="layer_norm")
    positional = ConvPositionalEmbedding(32, 16, 4, 2)
    waveforms = torch.randn(2, 4000)
    results = []
    for training in (True, False):
        extractor.train(training)
        positional.train(training)
        extractor.zero_grad()
        positional.zero_grad()
        features = extractor(waveforms)
        out = positional(features)
        out.pow(2).sum().backward()
        grads = [p.grad.clone() for p in [*extractor.parameters(), *positional.parameters()]]
        results.append((out.detach(), grads))
    (train_out, train_grads), (eval_out, eval_grads) = results
    torch.testing.assert_close(train_out, eval_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(train_grads, eval_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())  # sums in another order


@pytest.mark.parametrize("mode", ["layer_norm", "group_norm"])
def test_channels_last_layout_computes_what_the_official_layout_does(mode: str) -> None:
    """The CPU bf16 path of the front end, run here in fp32 so that only summation order can differ: the first
    layer as a matmul over waveform windows and every later block on (B, L, C) memory give the official layout's
    values and gradients."""
    torch.manual_seed(0)
    extractor = ConvFeatureExtractor([(16, 10, 5), (16, 3, 2), (16, 2, 2)], mode=mode, conv_bias=mode == "group_norm")
    for param in extractor.parameters():  # affine norms away from the identity, so that a swapped axis shows
        torch.nn.init.normal_(param, std=0.5) if param.ndim == 1 else None
    waveforms = torch.randn(2, 3000)
    results = []
    for layout in ("official", "channels_last"):
        extractor.zero_grad()
        first, *rest = extractor.conv_layers
        if layout == "official":
            x = first(waveforms[:, None, :])
            for block in rest:
                x = block(x)
            x = x.transpose(1, 2)
        else:
            x = first.forward_waveform(waveforms)
            for block in rest:
                x = block(x, "channels_last")
        x.pow(2).sum().backward()
        results.append((x.detach(), [p.grad.clone() for p in extractor.parameters()]))
    (official, official_grads), (channels_last, channels_last_grads) = results
    assert channels_last.shape == official.shape == (2, 149, 16)  # 3000 samples → 599 → 299 → 149 frames
    torch.testing.assert_close(channels_last, official, rtol=1e-5, atol=1e-5)
    # A conv bias before a per-channel GroupNorm has a zero gradient up to rounding: compare on the common scale.
    scale = max(g.abs().max().item() for g in official_grads)
    for a, b in zip(channels_last_grads, official_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def _saved_bytes(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``run()``'s output and the bytes of the distinct storages autograd saved for its backward, parameters
    excluded."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_layer_is_recomputed_in_cpu_training(dtype: torch.dtype) -> None:
    """In CPU training the first layer's activations are recomputed in backward: outputs and gradients are the
    ones of keeping them, bit for bit, and autograd keeps two (B, L, C) float tensors fewer."""
    torch.manual_seed(0)
    extractor = ConvFeatureExtractor([(32, 10, 5), (16, 3, 2)]).train()
    waveforms = torch.randn(2, 4000)
    layer_one = 2 * 799 * 32 * 4  # (B, L, C) fp32: 4000 samples → 799 frames
    results = []
    for recompute in (True, False):
        extractor.zero_grad()
        kept = contextlib.nullcontext() if recompute else mock.patch.object(
            components, "checkpoint", lambda function, *args, **_: function(*args))
        with kept, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out, saved = _saved_bytes(lambda: extractor(waveforms))
            out.float().pow(2).sum().backward()
        results.append((out, saved, [p.grad.clone() for p in extractor.parameters()]))
    (out, saved, grads), (kept_out, kept_saved, kept_grads) = results
    assert torch.equal(out, kept_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, kept_grads, strict=True))
    # fp32 keeps the linear and LayerNorm outputs; under autocast they are bf16 (half the bytes each).
    assert kept_saved - saved >= 2 * layer_one * (1 if dtype == torch.float32 else 0.5)


def test_conv_layout_follows_device_precision_and_mode() -> None:
    x = torch.randn(2, 100)
    assert conv_layout(x, training=False) == "official"
    assert conv_layout(x, training=True) == "dense"
    assert conv_layout(x.bfloat16(), training=False) == "channels_last"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_layout(x, training=False) == conv_layout(x, training=True) == "channels_last"
    with torch.autocast("cpu", dtype=torch.float16):
        assert conv_layout(x, training=True) == "dense"


@pytest.mark.parametrize("training", [True, False])
def test_bf16_autocast_front_end_matches_fp32_to_bf16_rounding(training: bool) -> None:
    """Under CPU bf16 autocast the front end runs channels last; its frames and gradients stay within bf16
    rounding of the fp32 official layout's, in training and eval mode."""
    torch.manual_seed(0)
    extractor = ConvFeatureExtractor([(32, 10, 5), (32, 3, 2), (32, 3, 2), (32, 2, 2)]).train(training)
    waveforms = torch.randn(2, 4000)
    results = []
    for bf16 in (False, True):
        extractor.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            frames = extractor(waveforms)
        assert frames.dtype == (torch.bfloat16 if bf16 else torch.float32)
        frames.float().pow(2).sum().backward()
        results.append((frames.float().detach(), [p.grad.clone() for p in extractor.parameters()]))
    (fp32, fp32_grads), (bf16, bf16_grads) = results
    assert bf16.shape == fp32.shape == (2, 99, 32)
    assert (bf16 - fp32).norm() / fp32.norm() < 2e-2
    for a, b in zip(bf16_grads, fp32_grads, strict=True):
        assert (a - b).norm() / b.norm() < 5e-2


def test_a_forced_channels_last_layout_gives_the_official_frames_in_fp32(monkeypatch) -> None:
    """benchmarks/gpu.py's spidr-channels-last job forces the layout whatever the device and precision; the
    extractor then takes the first layer from waveform windows and computes the official frames to rounding."""
    from spidr.models import components

    torch.manual_seed(0)
    extractor = ConvFeatureExtractor([(16, 10, 5), (16, 3, 2), (16, 2, 2)]).eval()
    waveforms = torch.randn(2, 3000)
    official = extractor(waveforms)
    monkeypatch.setattr(components, "conv_layout", lambda x, training: "channels_last")
    forced = extractor(waveforms)
    assert forced.is_contiguous()  # (B, T, C) memory, not a transposed view
    torch.testing.assert_close(forced, official, rtol=1e-5, atol=1e-5)


def _layer(*, layer_norm_first: bool, dropout: float = 0.0, ff_dropout: float = 0.0):
    torch.manual_seed(0)
    transformer = build_transformer(
        32, num_layers=1, num_heads=4, ff_dim=64, pos_conv_kernel=16, pos_conv_groups=4, pos_conv_depth=2,
        dropout=dropout, attention_dropout=0.0, ff_dropout=ff_dropout, layer_drop=0.0,
        layer_norm_first=layer_norm_first, qkv_bias=False,
    )
    layer = transformer.layers[0]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # LayerNorms that are not the identity, and non-zero biases, so roles can be told apart
        for module in layer.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.Linear)):
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                if module.bias is not None:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
    return layer


def _ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)




@torch.no_grad()
def test_post_norm_residual_dropout_p1_removes_both_branches() -> None:
    """Post-norm x₁ = LN(x + Drop(Attn(x))), out = LN_f(x₁ + Drop(FFN(x₁))): with residual dropout p = 1 in training
    both branches are zero, so x₁ = LN(x), out = LN_f(LN(x)) and the before-residual output is FFN(LN(x))."""
    layer = _layer(layer_norm_first=False, dropout=1.0).train()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    out, ffn = layer(x)
    x1 = _ln(x, layer.layer_norm)
    torch.testing.assert_close(ffn, layer.feed_forward(x1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, _ln(x1, layer.final_layer_norm), atol=1e-6, rtol=0)


@torch.no_grad()
def test_pre_norm_residual_dropout_p1_leaves_the_input() -> None:
    """Pre-norm x₁ = x + Drop(Attn(LN(x))), out = x₁ + Drop(FFN(LN_f(x₁))): with p = 1 the layer passes x through."""
    layer = _layer(layer_norm_first=True, dropout=1.0).train()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    out, ffn = layer(x)
    torch.testing.assert_close(out, x, atol=0, rtol=0)
    torch.testing.assert_close(ffn, layer.feed_forward(_ln(x, layer.final_layer_norm)), atol=1e-6, rtol=0)


@torch.no_grad()
def test_ffn_dropout_sits_between_gelu_and_the_output_projection() -> None:
    """FFN = Linear₂(Drop(GELU(Linear₁(x)))): with the intermediate dropout at p = 1 the hidden units are all zero,
    so every frame's FFN output is Linear₂'s bias."""
    layer = _layer(layer_norm_first=False, ff_dropout=1.0).train()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    _, ffn = layer(x)
    bias = layer.feed_forward.output_dense.bias
    assert bias.abs().min() > 0
    torch.testing.assert_close(ffn, bias.expand_as(ffn), atol=0, rtol=0)


@torch.no_grad()
def test_pre_norm_layer_uses_each_layer_norm_in_its_place() -> None:
    """With distinct LayerNorm parameters (a trained model's, not the identity of a fresh one): pre-norm
    x₁ = x + Attn(LN(x)), ffn = FFN(LN_f(x₁)), out = x₁ + ffn."""
    layer = _layer(layer_norm_first=True).eval()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    out, ffn = layer(x)
    x1 = x + layer.attention(_ln(x, layer.layer_norm))
    expected_ffn = layer.feed_forward(_ln(x1, layer.final_layer_norm))
    torch.testing.assert_close(ffn, expected_ffn, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, x1 + expected_ffn, atol=1e-5, rtol=0)


@torch.no_grad()
def test_post_norm_layer_uses_each_layer_norm_in_its_place() -> None:
    layer = _layer(layer_norm_first=False).eval()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    out, ffn = layer(x)
    x1 = _ln(x + layer.attention(x), layer.layer_norm)
    torch.testing.assert_close(ffn, layer.feed_forward(x1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, _ln(x1 + ffn, layer.final_layer_norm), atol=1e-5, rtol=0)


@pytest.mark.parametrize("conv", [
    nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"),
    nn.Conv1d(2, 2, 3, padding="same"),
], ids=["reflect", "same"])
def test_the_opaque_conv_refuses_padding_it_would_compute_wrongly(conv: nn.Conv1d) -> None:
    with pytest.raises(ValueError, match="explicit zero padding"):
        opaque_conv1d(conv, torch.randn(1, 2, 8))


def test_a_frequency_warp_on_a_conv_front_end_is_refused() -> None:
    extractor = ConvFeatureExtractor([(8, 10, 5), (8, 3, 2)]).eval()
    with pytest.raises(ValueError, match=r"needs a log-mel first layer \(model\.extractor_type = 'log_mel'\)"):
        extractor(torch.randn(2, 400), torch.ones(2))


def _front_end_layers(bias: bool) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(
        components.ConvLayerBlock(nn.Conv1d(16, 16, kernel, stride=stride, bias=bias), nn.LayerNorm(16))
        for kernel, stride in ((3, 2), (2, 2), (8, 4)))


@pytest.mark.parametrize("bias", [False, True])
def test_the_trained_channels_last_conv_has_the_conv_s_gradients(bias: bool) -> None:
    """The conv that CPU training runs channels last (its weight gradient a matmul over windows: torch's bf16 conv
    computes it from memory it never wrote): gradcheck in float64 against finite differences, for x, weight and
    bias; the same output as the plain conv; without gradients (inference, a frozen front end) the plain
    conv runs."""
    torch.manual_seed(0)
    for kernel, stride in ((3, 2), (8, 4)):
        conv = nn.Conv1d(5, 4, kernel, stride=stride, bias=bias).double()
        x = torch.randn(2, 23, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, weight, bias, stride=stride: _ChannelsLastConv.apply(x, weight, bias, stride),
            (x, conv.weight, conv.bias))
        expected = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, stride=stride).transpose(1, 2)
        torch.testing.assert_close(trained_conv_channels_last(conv, x), expected)
    layers = _front_end_layers(bias)
    with torch.no_grad(), mock.patch.object(components, "trained_conv_channels_last",
                                            side_effect=AssertionError("ran the trained conv without gradients")):
        layers[0](torch.randn(2, 50, 16), "channels_last")
    with mock.patch.object(components, "trained_conv_channels_last", wraps=trained_conv_channels_last) as trained:
        layers[0](torch.randn(2, 50, 16), "channels_last")
    assert trained.call_count == 1


def test_bf16_training_gradients_of_the_front_end_are_finite_after_the_heap_held_nans() -> None:
    """torch 2.13's bf16 CPU conv (backward) read memory it never wrote: once freed tensors had left NaNs in the heap
    (an attention mask's -inf does), the conv weights' gradients came out NaN in most tries, and the training step
    was skipped. Ten tries, each after filling and freeing NaN tensors of many sizes: all finite."""
    layers = _front_end_layers(bias=False)
    for _ in range(10):
        freed = [torch.full((n,), math.nan, dtype=dtype) for n in (10_000, 100_000, 1_000_000, 3_000_000)
                 for dtype in (torch.float32, torch.bfloat16) for _ in range(3)]
        del freed
        x = torch.randn(2, 4000, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = x
            for layer in layers:
                y = layer(y, "channels_last")
        y.float().sum().backward()
        for name, parameter in layers.named_parameters():
            assert torch.isfinite(parameter.grad).all(), name
            parameter.grad = None
