"""Building blocks shared by SpidR and DinoSR, in the order data flows through them (spec §3).

waveform (B, S) → ``ConvFeatureExtractor`` (B, T, C) → ``FeatureProjection`` (B, T, D) → ``Transformer``:
``ConvPositionalEmbedding`` added once, encoder LayerNorm, then ``TransformerLayer`` × L, each made of
``SelfAttention`` and ``FeedForward``.

Module and attribute names give the official state-dict keys (spec §9.1); the order in which modules are created
reproduces the official random-number consumption, so a seeded build draws the official initial weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from spidr.config import ConvLayer, ModelConfig
from spidr.models.channels_last_conv import trained_conv_channels_last
from spidr.models.conv_under_compile import convolve
from spidr.models.log_mel import LogMelFilterbank

# --------------------------------------------------------------------------------------------------------------
# Padding: one normalised form of the two mask conventions
# --------------------------------------------------------------------------------------------------------------


class FrameMasks(NamedTuple):
    """Padding information in the two forms the encoder needs; both None when no frame is padded.

    ``attention``: boolean mask for ``scaled_dot_product_attention``, True where a key may be attended,
    (B, 1, 1, T) or the caller's own (B, 1, T, T). ``valid``: (B, T) bool, True on real frames (zeroes padding
    around every positional conv).
    """

    attention: torch.Tensor | None
    valid: torch.Tensor | None


NO_PADDING = FrameMasks(None, None)


def frame_masks(
    x: torch.Tensor, *, attention_mask: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None
) -> FrameMasks:
    """Normalise the official ``attention_mask`` (B, 1, T, T) bool, True = key may be attended, or the simpler
    ``padding_mask`` (B, T) bool, True = padded frame, for frames ``x`` (B, T, D).

    A batch without padding gives ``NO_PADDING``, so attention runs without a mask and can use the fastest kernel
    (the official code always passes a dense mask, spec §14.19). Checking costs one device sync per call.
    """
    batch, frames = x.shape[:2]
    if attention_mask is not None and padding_mask is not None:
        raise ValueError("pass either attention_mask (B, 1, T, T) or padding_mask (B, T), not both")
    if padding_mask is not None:
        if padding_mask.shape != (batch, frames) or padding_mask.dtype != torch.bool:
            raise ValueError(
                f"padding_mask must be a bool tensor of shape (B, T) = ({batch}, {frames}) with True on padded "
                f"frames; got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        if not bool(padding_mask.any()):
            return NO_PADDING
        valid = ~padding_mask
        return FrameMasks(valid[:, None, None, :], valid)
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.shape != (batch, 1, frames, frames):
            raise ValueError(
                f"attention_mask must be a bool tensor of shape (B, 1, T, T) = ({batch}, 1, {frames}, {frames}) with "
                f"True where a key frame may be attended; got {attention_mask.dtype} {tuple(attention_mask.shape)}"
            )
        if bool(attention_mask.all()):
            return NO_PADDING
        # The official positional conv reads the padding from the first query row.
        return FrameMasks(attention_mask, attention_mask[:, 0, 0, :])
    return NO_PADDING


# --------------------------------------------------------------------------------------------------------------
# Conv feature extractor and projection
# --------------------------------------------------------------------------------------------------------------


def dense_in_training(x: torch.Tensor, training: bool) -> torch.Tensor:  # noqa: FBT001
    """``x`` (a transposed view after a channel LayerNorm) made contiguous in training mode.

    GELU's backward and the next conv's backward take strided paths on the transposed layout: on the base front end
    (CPU, 2 × 4 s) forward + backward take ~1.2-1.4x as long as on a dense copy, fp32 and bf16 alike. In eval mode
    the view is kept, so that the next conv rounds exactly as in the official and Hugging Face models: extracted
    features stay bit-identical to theirs.
    """
    return x.contiguous() if training else x


def float32_region(device_type: str, *, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast switched off inside when ``enabled`` (a module's ``keep_float32``, which
    ``spidr.models.inference_precision.bfloat16_inference`` sets) and autocast is on; otherwise no change."""
    if enabled and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


ConvLayout = Literal["official", "dense", "channels_last"]


def conv_layout(x: torch.Tensor, training: bool) -> ConvLayout:  # noqa: FBT001
    """How the conv front end lays out its activations for an input ``x`` (``ConvLayerBlock``).

    "official": (B, C, L), each LayerNorm on a transposed view (eval mode in fp32 and off the CPU: features
    bit-identical to the official and Hugging Face models'). "dense": (B, C, L), made contiguous after each
    LayerNorm (training in fp32, and training off the CPU). "channels_last": (B, L, C) in memory, wherever a CPU
    computes in bfloat16 (under CPU bf16 autocast, also a front end that ``keep_float32`` runs in fp32). The CPU's
    bf16 convolutions want channels last: given (B, C, L) tensors they copy their input and gradients at every
    layer, and the base front end's forward + backward (2 × 4 s, one thread, a Xeon with AMX) took 2.3x as long as
    channels last. Its fp32 backward is slower channels last, so fp32 training keeps (B, C, L); its fp32 forward is
    faster (base, 10 s, 2 threads: 0.25 s against 0.51 s official), but rounds differently from the official
    layout (≈ 2e-6 relative), so only bf16 inference, which does not match the official rounding anyway, takes it
    there.
    """
    if x.device.type == "cpu" and (
        x.dtype == torch.bfloat16
        or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    ):
        return "channels_last"
    return "dense" if training else "official"


class ConvLayerBlock(nn.Module):
    """Conv1d (no padding) → optional norm → GELU.

    (B, C_in, L) → (B, C_out, L'), or (B, L, C_in) → (B, L', C_out) with ``layout="channels_last"``.
    """

    def __init__(self, conv: nn.Conv1d, norm: nn.LayerNorm | nn.GroupNorm | None) -> None:
        super().__init__()
        # Registration order (norm before conv) gives the official key order.
        self.layer_norm = norm
        self.conv = conv

    def forward(self, x: torch.Tensor, layout: ConvLayout = "official") -> torch.Tensor:
        if layout == "channels_last":
            return self._forward_channels_last(x)
        x = convolve(self.conv, x)
        if isinstance(self.layer_norm, nn.LayerNorm):
            # LayerNorm over channels: move channels last and back.
            x = self.layer_norm(x.transpose(-2, -1)).transpose(-2, -1)
            x = x.contiguous() if layout == "dense" else x
        elif self.layer_norm is not None:
            x = self.layer_norm(x)
        return F.gelu(x)

    def forward_waveform(self, waveforms: torch.Tensor) -> torch.Tensor:
        """The first layer as a matmul over windows: (B, S) → (B, L, C_out), the same numbers as the conv up to
        rounding. A conv with one input channel is memory-bound and oneDNN runs it slowly (base front end, 2 × 4 s,
        one thread of a Xeon with AMX, forward + backward: fp32 83 → 34 ms, bf16 149 → 14 ms)."""
        kernel, stride = self.conv.kernel_size[0], self.conv.stride[0]
        x = F.linear(waveforms.unfold(1, kernel, stride), self.conv.weight[:, 0, :], self.conv.bias)
        return F.gelu(self._norm_channels_last(x))

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        # (on the CPU, torch's bf16 conv computes its weight gradient from memory it never wrote: channels_last_conv)
        if x.device.type == "cpu" and torch.is_grad_enabled() and self.conv.weight.requires_grad:
            return F.gelu(self._norm_channels_last(trained_conv_channels_last(self.conv, x)))
        # A (B, C, 1, L) view of (B, L, C) memory is channels last for conv2d; its output is too.
        x = x.transpose(1, 2).unsqueeze(2)
        x = F.conv2d(x, self.conv.weight.unsqueeze(2), self.conv.bias, stride=(1, self.conv.stride[0]))
        return F.gelu(self._norm_channels_last(x.squeeze(2).transpose(1, 2).contiguous()))

    def _norm_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The block's norm on (B, L, C)."""
        if isinstance(self.layer_norm, nn.LayerNorm):
            return self.layer_norm(x)
        if self.layer_norm is not None:  # GroupNorm normalises over time: channels second, then back to (B, L, C)
            return self.layer_norm(x.transpose(1, 2)).transpose(1, 2).contiguous()
        return x


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0 conv front end: (B, S) waveform → (B, T, C) frames (spec §3.2).

    ``mode="layer_norm"``: an affine LayerNorm over channels after every conv (all released models).
    ``mode="group_norm"``: a GroupNorm with one group per channel after the first conv only (wav2vec 2.0 base).
    ``log_mel=True``: the first layer [num_mels, window, hop] is a fixed log-mel filterbank
    (``spidr.models.log_mel``) instead of a conv; the layers after it are convs as usual.
    ``keep_float32`` (``bfloat16_inference``): computes in float32 under autocast.
    """

    def __init__(
        self,
        conv_layers: Sequence[ConvLayer],
        *,
        mode: Literal["layer_norm", "group_norm"] = "layer_norm",
        conv_bias: bool = False,
        log_mel: bool = False,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_channels = 1
        for i, (channels, kernel, stride) in enumerate(conv_layers):
            if log_mel and i == 0:
                blocks.append(LogMelFilterbank(channels, kernel, stride))
                in_channels = channels
                continue
            conv = nn.Conv1d(in_channels, channels, kernel, stride=stride, bias=conv_bias)
            nn.init.kaiming_normal_(conv.weight)
            if mode == "layer_norm":
                norm = nn.LayerNorm(channels)
            elif i == 0:
                norm = nn.GroupNorm(channels, channels)
            else:
                norm = None
            blocks.append(ConvLayerBlock(conv, norm))
            in_channels = channels
        self.conv_layers = nn.ModuleList(blocks)
        self.keep_float32 = False

    def forward(self, waveforms: torch.Tensor, warp: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) float waveforms → (B, T, C); T = ``num_frames(S)``. Padding is not treated specially.

        ``warp``: per-utterance frequency-warp factors (B,) for a log-mel first layer (``LogMelFilterbank``)."""
        if waveforms.ndim != 2:
            raise ValueError(f"waveforms must have shape (B, S); got {tuple(waveforms.shape)}")
        # Decided before autocast is switched off, so a float32 front end under CPU bf16 autocast runs channels last.
        layout = conv_layout(waveforms, self.training)
        with float32_region(waveforms.device.type, enabled=self.keep_float32):
            return self._frames(waveforms, warp, layout)

    def _frames(self, waveforms: torch.Tensor, warp: torch.Tensor | None, layout: ConvLayout) -> torch.Tensor:
        """``forward``'s work in the given layout: (B, S) → (B, T, C)."""
        first, *rest = self.conv_layers
        if isinstance(first, LogMelFilterbank):
            x = first(waveforms[:, None, :], warp)  # (B, C, L)
            if layout == "channels_last":
                x = x.transpose(1, 2).contiguous()
        elif warp is not None:
            raise ValueError("a frequency warp needs a log-mel first layer (model.extractor_type = 'log_mel')")
        elif layout == "channels_last" or (layout == "dense" and waveforms.device.type == "cpu"):
            x = self._first_layer_on_windows(first, waveforms)  # (B, L, C)
            if layout == "dense":
                x = x.transpose(1, 2).contiguous()
        else:
            x = first(waveforms[:, None, :], layout)
        for block in rest:
            x = block(x, layout)
        return x if layout == "channels_last" else x.transpose(1, 2)

    def _first_layer_on_windows(self, first: ConvLayerBlock, waveforms: torch.Tensor) -> torch.Tensor:
        """``first.forward_waveform``: (B, S) → (B, L, C). In CPU training its linear output and normed output
        (B × L × C each, the front end's largest tensors: 50 MiB apiece in fp32 for 2 × 4 s) are recomputed in
        backward instead of kept until then. The layer has ``kernel`` (10) inputs per output, so recomputing it
        costs next to nothing; a base fp32 step's peak live memory drops 2.48 → 2.41 GiB (2 threads, no
        measurable change in step time). It draws no random numbers, so no RNG state need be kept."""
        if self.training and torch.is_grad_enabled() and waveforms.device.type == "cpu":
            return checkpoint(first.forward_waveform, waveforms, use_reentrant=False, preserve_rng_state=False)
        return first.forward_waveform(waveforms)


def build_feature_extractor(cfg: ModelConfig) -> ConvFeatureExtractor:
    """The front end of ``cfg``: conv layers, or a log-mel filterbank and convs (``extractor_type``)."""
    return ConvFeatureExtractor(
        cfg.extractor_conv_layer_config,
        mode=cfg.extractor_mode,
        conv_bias=cfg.extractor_conv_bias,
        log_mel=cfg.extractor_type == "log_mel",
    )


class FeatureProjection(nn.Module):
    """LayerNorm(C) → Linear(C → D): (B, T, C) → (B, T, D). Default PyTorch Linear init (spec §3.3).

    ``keep_float32`` (``bfloat16_inference``): computes in float32 under autocast.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features)
        self.projection = nn.Linear(in_features, out_features)
        self.keep_float32 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with float32_region(x.device.type, enabled=self.keep_float32):
            return self.projection(self.layer_norm(x))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` (wav2vec 2.0's GradMultiply)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``scale`` on the way back (identity when 1)."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


# --------------------------------------------------------------------------------------------------------------
# Transformer encoder
# --------------------------------------------------------------------------------------------------------------


class ConvPositionalEmbedding(nn.Module):
    """Stack of grouped convs, each → (trim if even kernel) → non-affine LayerNorm → GELU (spec §3.5).

    (B, T, D) → (B, T, D), to be added to the input. Padded frames are zeroed before every conv and at the end.
    ``keep_float32`` (``bfloat16_inference``): computes in float32 under autocast.
    """

    def __init__(self, dim: int, kernel: int, groups: int, depth: int) -> None:
        super().__init__()
        self.kernel = max(3, kernel // depth)
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, self.kernel, padding=self.kernel // 2, groups=groups) for _ in range(depth)
        )
        self.keep_float32 = False

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D); valid: (B, T) bool, True on real frames, or None when nothing is padded."""
        with float32_region(x.device.type, enabled=self.keep_float32):
            return self._embedding(x, valid)

    def _embedding(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """``forward``'s work: x (B, T, D), valid (B, T) or None → (B, T, D)."""
        time_mask = None if valid is None else valid[:, None, :].to(x.dtype)  # (B, 1, T)
        x = x.transpose(1, 2)  # (B, D, T)
        for conv in self.convs:
            if time_mask is not None:
                x = x * time_mask
            x = convolve(conv, x)
            if self.kernel % 2 == 0:
                x = x[..., :-1]  # padding k // 2 on both sides makes one frame too many
            x = dense_in_training(F.layer_norm(x.transpose(1, 2), (x.shape[1],)).transpose(1, 2), self.training)
            x = F.gelu(x)
        if time_mask is not None:
            x = x * time_mask
        return x.transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows q, k, v) and an output projection ``proj``.

    ``dropout`` is the attention-probability dropout, applied in training mode only.
    """

    def __init__(self, dim: int, num_heads: int, *, dropout: float = 0.0, qkv_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D); attention_mask: bool, True = may attend, broadcastable to (B, H, T, T), or None."""
        batch, frames, dim = x.shape
        # (B, T, 3D) → 3 × (B, H, T, D/H)
        q, k, v = self.qkv(x).view(batch, frames, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # The CPU attention kernels have no bf16 fast path: in fp32 they run 1.2-2x faster (forward and
            # backward) and round less. GPUs keep bf16, where the flash kernels are fastest.
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=attention_mask, dropout_p=dropout
                ).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(batch, frames, dim))


class FeedForward(nn.Module):
    """Linear(D → F) → GELU → Dropout → Linear(F → D)."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, hidden)
        self.intermediate_dropout = nn.Dropout(dropout)
        self.output_dense = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(self.intermediate_dropout(F.gelu(self.intermediate_dense(x))))


class TransformerLayer(nn.Module):
    """One encoder layer (spec §3.7), post-norm by default.

    post-norm: x₁ = LN(x + Drop(Attn(x))); f = FFN(x₁); out = LN_final(x₁ + Drop(f)).
    pre-norm:  x₁ = x + Drop(Attn(LN(x))); f = FFN(LN_final(x₁)); out = x₁ + Drop(f).
    """

    def __init__(
        self, attention: SelfAttention, feed_forward: FeedForward, *, dropout: float, layer_norm_first: bool
    ) -> None:
        super().__init__()
        dim = attention.proj.out_features
        self.attention = attention
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)
        self.feed_forward = feed_forward
        self.final_layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = layer_norm_first

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D) → (layer output (B, T, D), FFN output before dropout/residual/LN (B, T, D))."""
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.layer_norm(x), attention_mask))
            ffn = self.feed_forward(self.final_layer_norm(x))
            return x + self.dropout(ffn), ffn
        x = self.layer_norm(x + self.dropout(self.attention(x, attention_mask)))
        ffn = self.feed_forward(x)
        return self.final_layer_norm(x + self.dropout(ffn)), ffn


class Transformer(nn.Module):
    """Positional conv, encoder LayerNorm, dropout and the layer stack (spec §3.6).

    ``norm_at_input`` places the encoder LayerNorm: True (post-norm layers, the default) applies it right after
    adding the positional embedding and none at the end; False (pre-norm layers) applies it after the last layer.
    (The official code reaches this by passing ``not encoder_layer_norm_first`` to a flag named
    ``layer_norm_first``: the "double negation".)
    """

    def __init__(
        self,
        pos_conv_embed: ConvPositionalEmbedding,
        layers: Sequence[TransformerLayer],
        *,
        dropout: float,
        layer_drop: float,
        norm_at_input: bool,
    ) -> None:
        super().__init__()
        dim = layers[0].layer_norm.normalized_shape[0]
        self.pos_conv_embed = pos_conv_embed
        self.layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(layers)
        self.layer_drop = layer_drop
        self.norm_at_input = norm_at_input

    def _preprocess(self, x: torch.Tensor, masks: FrameMasks) -> torch.Tensor:
        x = x + self.pos_conv_embed(x, masks.valid)
        if self.norm_at_input:
            x = self.layer_norm(x)
        return self.dropout(x)

    def _drop_layer(self) -> bool:
        """A fresh draw per layer in eager training: skip it with probability ``layer_drop``.

        The official transformer draws ``torch.rand(1)`` for every layer in training even when ``layer_drop`` is 0
        (before the layer in ``forward``, after it in ``get_intermediate_outputs``); drawing the same way keeps the
        global RNG stream, hence every later dropout mask, identical to the official one. Under ``torch.compile``:
        False, the skips coming from ``_compiled_layer_drops``.
        """
        if torch.compiler.is_compiling():
            return False
        return self.training and bool(torch.rand(1) <= self.layer_drop)

    def _compiled_layer_drops(self, count: int, device: torch.device) -> torch.Tensor | None:
        """Under ``torch.compile`` in training with ``layer_drop`` > 0: (count,) bool on ``device``, True where a
        layer is skipped, which the loops apply with ``torch.where`` (every layer is computed, and the running state
        keeps its input where the layer is skipped). None otherwise: eager draws per layer (``_drop_layer``), and
        compiled code with ``layer_drop`` = 0 draws nothing.

        Compiled code draws its random numbers its own way, so the official stream is not kept there anyway; but
        reading a draw back to branch on it was a graph break inside the layer loop, after which Dynamo ran the rest
        of the loop eagerly (DinoSR's base student, 12 layers, uncompiled), and SpidR's 24 draws per step (student
        and teacher) were 24 breaks. With ``layer_drop`` = 0 a draw skips a layer only when it is exactly 0.0
        (probability 2^-24): no draw at all.
        """
        if not (self.training and torch.compiler.is_compiling()) or self.layer_drop == 0:
            return None
        return torch.rand(count, device=device) <= self.layer_drop

    def forward(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        masks: FrameMasks | None = None,
    ) -> torch.Tensor:
        """(B, T, D) → final output (B, T, D). Padding: ``attention_mask`` (B, 1, T, T), ``padding_mask`` (B, T),
        or already normalised ``masks`` (see ``frame_masks``)."""
        if masks is None:
            masks = frame_masks(x, attention_mask=attention_mask, padding_mask=padding_mask)
        x = self._preprocess(x, masks)
        drops = self._compiled_layer_drops(len(self.layers), x.device)
        for i, layer in enumerate(self.layers):
            if not self._drop_layer():  # drawn before the layer, as the official forward draws
                out, _ = layer(x, masks.attention)
                x = out if drops is None else torch.where(drops[i], x, out)
        return self.final_norm(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output (B, T, D) → the final output: the encoder LayerNorm where it sits at the end."""
        return x if self.norm_at_input else self.layer_norm(x)

    def get_intermediate_outputs(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        masks: FrameMasks | None = None,
        num_layers: int | None = None,
        before_residual: bool = True,
    ) -> list[torch.Tensor]:
        """Per-layer outputs for the first ``num_layers`` layers (all by default): a list of (B, T, D).

        ``before_residual=True``: each layer's FFN output before dropout, residual and final LayerNorm (the
        features SpidR is trained on and that downstream tasks use); False: each layer's full output. No final
        encoder LayerNorm in either mode. A layer skipped by layer drop is still computed and recorded, but the
        running state passes it by.
        """
        self.check_num_layers(num_layers)
        if masks is None:
            masks = frame_masks(x, attention_mask=attention_mask, padding_mask=padding_mask)
        outputs = self.layer_outputs(x, masks=masks, num_layers=num_layers)
        return [ffn if before_residual else out for out, ffn in outputs]

    def check_num_layers(self, num_layers: int | None) -> None:
        """Raise ``ValueError`` unless ``num_layers`` is None (all) or one of the encoder's layer counts."""
        if num_layers is not None and not 1 <= num_layers <= len(self.layers):
            raise ValueError(f"num_layers = {num_layers} must be in [1, {len(self.layers)}] (the encoder's layers)")

    def layer_outputs(self, x: torch.Tensor, *, masks: FrameMasks,
                      num_layers: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``num_layers`` layers' (full output, FFN output before its residual), each (B, T, D), from one
        pass: what ``get_intermediate_outputs`` gives in either mode (and, all layers run, through ``final_norm`` of
        the last full output, what ``forward`` gives, in eval mode, where no layer is dropped)."""
        x = self._preprocess(x, masks)
        outputs = []
        layers = self.layers[:num_layers]
        drops = self._compiled_layer_drops(len(layers), x.device)
        for i, layer in enumerate(layers):
            out, ffn = layer(x, masks.attention)
            if not self._drop_layer():  # drawn after the layer, as the official get_intermediate_outputs draws
                x = out if drops is None else torch.where(drops[i], x, out)
            outputs.append((out, ffn))
        return outputs


def build_transformer(
    dim: int,
    *,
    num_layers: int,
    num_heads: int,
    ff_dim: int,
    pos_conv_kernel: int,
    pos_conv_groups: int,
    pos_conv_depth: int,
    dropout: float,
    attention_dropout: float,
    ff_dropout: float,
    layer_drop: float,
    layer_norm_first: bool,
    qkv_bias: bool,
) -> Transformer:
    """The encoder from its hyper-parameters (``layer_norm_first`` as in the config: False = post-norm), with the
    official initialisation applied (``init_transformer_``)."""
    pos_conv = ConvPositionalEmbedding(dim, pos_conv_kernel, pos_conv_groups, pos_conv_depth)
    layers = [
        TransformerLayer(
            SelfAttention(dim, num_heads, dropout=attention_dropout, qkv_bias=qkv_bias),
            FeedForward(dim, ff_dim, dropout=ff_dropout),
            dropout=dropout,
            layer_norm_first=layer_norm_first,
        )
        for _ in range(num_layers)
    ]
    transformer = Transformer(
        pos_conv, layers, dropout=dropout, layer_drop=layer_drop, norm_at_input=not layer_norm_first
    )
    init_transformer_(transformer)
    return transformer


def build_encoder(cfg: ModelConfig) -> Transformer:
    """The student encoder of ``cfg`` (``build_transformer`` with the config's encoder fields)."""
    return build_transformer(
        cfg.encoder_embed_dim,
        num_layers=cfg.encoder_num_layers,
        num_heads=cfg.encoder_num_heads,
        ff_dim=cfg.encoder_ff_interm_features,
        pos_conv_kernel=cfg.encoder_pos_conv_kernel,
        pos_conv_groups=cfg.encoder_pos_conv_groups,
        pos_conv_depth=cfg.encoder_pos_conv_depth,
        dropout=cfg.encoder_dropout,
        attention_dropout=cfg.encoder_attention_dropout,
        ff_dropout=cfg.encoder_ff_interm_dropout,
        layer_drop=cfg.encoder_layer_drop,
        layer_norm_first=cfg.encoder_layer_norm_first,
        qkv_bias=cfg.encoder_qkv_bias,
    )


def init_transformer_(transformer: Transformer) -> None:
    """The encoder initialisation (spec §3.8): every Linear N(0, 0.02²) with zero bias, then each attention block's
    qkv Xavier-uniform (gain 1/√2) and output projection Xavier-uniform with zero bias. Modules are visited children
    first, so the attention rule wins. Positional convs and LayerNorms are left untouched."""

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if module.bias is not None:
                module.bias.data.zero_()
        if isinstance(module, SelfAttention):
            nn.init.xavier_uniform_(module.qkv.weight, gain=1 / math.sqrt(2))
            nn.init.xavier_uniform_(module.proj.weight)
            module.proj.bias.data.zero_()

    transformer.apply(init)
