"""Unit language models in plain torch: an LSTM, a GPT-style pre-LN causal Transformer, and an n-gram baseline.

Every model maps tokens (B, T) int64 to next-token logits (B, T, V) float32: logits[:, t] predicts tokens[:, t + 1].

* ``lstm``: embedding → multi-layer LSTM → linear; trains in minutes on 2 CPU cores (the CPU default).
* ``gpt``: learned positions up to ``context``, ``num_layers`` pre-LN blocks (LayerNorm → causal self-attention →
  residual; LayerNorm → FFN → residual), a final LayerNorm, output tied to the input embedding. With 12 layers, 768
  dims, 12 heads, FFN 3072, ReLU and context 2048 it is the shape of OPT-125M, the paper's unit LM
  (``configs/lm-opt125m.toml``).
* ``ngram``: add-k smoothed unigram or bigram counts (no gradient; fitted by counting), the phone-bigram baseline.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Arch = Literal["lstm", "gpt", "ngram"]


class LstmLM(nn.Module):
    def __init__(self, vocab_size: int, *, dim: int, num_layers: int, dropout: float, tie_embeddings: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(dim, dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Linear(dim, vocab_size)
        if tie_embeddings:
            self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) → logits (B, T, V)."""
        hidden, _ = self.lstm(self.dropout(self.embedding(tokens)))
        return self.head(self.dropout(hidden)).float()


class _Block(nn.Module):
    """Pre-LN Transformer block: x + attn(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.activation = F.relu if activation == "relu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(B, T, 3, self.num_heads, D // self.num_heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, D / H)
        x = x + F.dropout(self.out(attended.transpose(1, 2).reshape(B, T, D)), self.dropout, self.training)
        hidden = self.ffn_out(F.dropout(self.activation(self.ffn_in(self.ffn_norm(x))), self.dropout, self.training))
        return x + F.dropout(hidden, self.dropout, self.training)


class GptLM(nn.Module):
    def __init__(self, vocab_size: int, *, dim: int, num_layers: int, num_heads: int, ffn_dim: int, context: int,
                 dropout: float, activation: str, tie_embeddings: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.dim = {dim} must be a multiple of model.num_heads = {num_heads}")
        self.context = context
        self.embedding = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, ffn_dim, dropout, activation) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.dropout = dropout
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            for projection in (block.out, block.ffn_out):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * num_layers))
        if tie_embeddings:
            self.head.weight = self.embedding.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T ≤ context) → logits (B, T, V)."""
        T = tokens.shape[1]
        if self.context < T:
            raise ValueError(f"{T} tokens exceed the model's context of {self.context}")
        x = self.embedding(tokens) + self.positions(torch.arange(T, device=tokens.device))
        x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).float()


class NgramLM(nn.Module):
    """Add-k unigram (order 1) or bigram (order 2) model over tokens; ``fit`` counts, no gradient."""

    def __init__(self, vocab_size: int, *, order: int, add_k: float) -> None:
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"model.ngram_order = {order}: only 1 (unigram) and 2 (bigram) are built")
        if add_k <= 0:
            raise ValueError(f"model.ngram_add_k = {add_k} must be > 0")
        self.order, self.add_k = order, add_k
        self.register_buffer("counts", torch.zeros(vocab_size if order == 2 else 1, vocab_size, dtype=torch.float64))

    def fit(self, stream: torch.Tensor) -> None:
        """Add the counts of a 1-D token stream (utterances as ``BOS u … EOS``, one after the other)."""
        vocab = self.counts.shape[1]
        stream = stream.long()  # a compact stream (int16) would overflow in the pair index below
        if self.order == 1:
            self.counts[0] += torch.bincount(stream, minlength=vocab).double()
        else:
            pairs = stream[:-1] * vocab + stream[1:]
            self.counts += torch.bincount(pairs, minlength=vocab * vocab).double().view(vocab, vocab)

    def log_probabilities(self) -> torch.Tensor:
        """(contexts, V) natural-log next-token probabilities."""
        smoothed = self.counts + self.add_k
        return (smoothed / smoothed.sum(1, keepdim=True)).log()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.log_probabilities().float()
        if self.order == 1:
            return table[0].expand(*tokens.shape, -1)
        return table[tokens]


def build_lm(arch: Arch, vocab_size: int, *, dim: int, num_layers: int, num_heads: int, ffn_dim: int, context: int,
             dropout: float, activation: str, tie_embeddings: bool, ngram_order: int, ngram_add_k: float) -> nn.Module:
    match arch:
        case "lstm":
            return LstmLM(vocab_size, dim=dim, num_layers=num_layers, dropout=dropout, tie_embeddings=tie_embeddings)
        case "gpt":
            return GptLM(vocab_size, dim=dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim,
                         context=context, dropout=dropout, activation=activation, tie_embeddings=tie_embeddings)
        case "ngram":
            return NgramLM(vocab_size, order=ngram_order, add_k=ngram_add_k)
    raise ValueError(f"model.arch = {arch!r} is invalid: expected 'lstm', 'gpt' or 'ngram'")


def token_log_likelihoods(model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor, *,
                          context: int | None = None) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t = 1 … length − 1 of every row, padding → 0: (B, T − 1) float32.

    Rows are right-padded (causal models never look right, so padding changes nothing before it). A model with a
    bounded ``context`` (GPT) reads sequences of more than ``context`` inputs in windows advancing by half a context,
    each token predicted with at least half a context of history (strided evaluation).
    """
    B, T = tokens.shape
    if context is None or context >= T - 1:
        picked = model(tokens[:, :-1]).log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    else:
        picked = torch.zeros(B, T - 1, device=tokens.device)
        stride = max(context // 2, 1)
        start, done = 0, 0  # targets 1 … done are scored
        while done < T - 1:
            end = min(start + context + 1, T)  # inputs start … end − 2 predict targets start + 1 … end − 1
            window = model(tokens[:, start:end - 1]).log_softmax(-1)
            values = window.gather(-1, tokens[:, start + 1:end, None])[..., 0]
            picked[:, done:end - 1] = values[:, done - start:]
            done = end - 1
            start += stride
    valid = torch.arange(1, T, device=tokens.device)[None, :] < lengths[:, None]
    return picked.masked_fill(~valid, 0.0)
