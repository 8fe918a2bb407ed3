"""Unit-LM speed on this machine: training tokens/s (fp32 vs bf16 autocast) and scoring throughput (prints a table).

Training: the full step of ``spidr lm-train`` (``lm_train_step``: forward, cross-entropy, backward, clip, AdamW,
scheduler) on ``--batch`` windows of ``--context`` tokens, for the LSTM of ``configs/lm-lstm.toml`` and a small GPT.
Rounds interleave the variants (fp32, bf16, fp32, bf16, ...) so that the machine's load falls on both alike; the
table gives the median over rounds and the median of the per-round bf16 / fp32 ratios.

Scoring: ``score_sequences`` (batched, both normalisations in one pass) on sWUGGY-like items (12 units), sBLIMP-like
items (60 units) and tSC-like stories (300 units), in utterances per second.

    python benchmarks/lm.py                 # 2 threads, 5 rounds
    python benchmarks/lm.py --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from spidr.lm.models import GptLM, LstmLM
from spidr.lm.score import score_sequences
from spidr.lm.tokens import Vocabulary
from spidr.lm.train import lm_train_step, lr_scale
from spidr.train.precision import Precision, cpu_has_native_bf16

NUM_UNITS = 256


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    vocab = Vocabulary(NUM_UNITS).size
    if arch == "lstm":
        return LstmLM(vocab, dim=256, num_layers=2, dropout=0.1, tie_embeddings=True)
    return GptLM(vocab, dim=256, num_layers=4, num_heads=4, ffn_dim=1024, context=256, dropout=0.1,
                 activation="gelu", tie_embeddings=True)


def time_training(arch: str, precision: Precision, *, batch: int, context: int, steps: int) -> float:
    """Tokens per second over ``steps`` timed steps (after one warm-up step)."""
    model = build(arch).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_scale(s, warmup_steps=10, max_steps=100,
                                                                                 min_lr_scale=0.1))
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, NUM_UNITS + 2, (batch, context + 1), generator=generator) for _ in range(steps + 1)]
    lm_train_step(model, [windows[0]], optimizer, scheduler, precision=precision, max_norm=1.0)
    start = time.perf_counter()
    for window in windows[1:]:
        lm_train_step(model, [window], optimizer, scheduler, precision=precision, max_norm=1.0)
    return steps * batch * context / (time.perf_counter() - start)


def time_scoring(arch: str, length: int, count: int) -> float:
    model = build(arch).eval()
    rng = np.random.default_rng(0)
    sequences = {f"u{i}": rng.integers(0, NUM_UNITS, size=length) for i in range(count)}
    start = time.perf_counter()
    score_sequences(model, Vocabulary(NUM_UNITS), sequences, context=256 if arch == "gpt" else None)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [("float32", Precision("cpu", None))]
    if cpu_has_native_bf16():
        variants.append(("bfloat16", Precision("cpu", torch.bfloat16)))
    print(f"{args.threads} threads, {args.rounds} interleaved rounds × {args.steps} steps of {args.batch} × "
          f"{args.context} tokens; native bf16: {cpu_has_native_bf16()}")
    print("| job | fp32 | bf16 | bf16 / fp32 (median of per-round ratios) |")
    print("|---|---|---|---|")
    for arch in ("lstm", "gpt"):
        rates: dict[str, list[float]] = {name: [] for name, _ in variants}
        for _ in range(args.rounds):
            for name, precision in variants:
                rates[name].append(time_training(arch, precision, batch=args.batch, context=args.context,
                                                 steps=args.steps))
        fp32 = statistics.median(rates["float32"])
        if "bfloat16" in rates:
            ratio = statistics.median(b / f for b, f in zip(rates["bfloat16"], rates["float32"], strict=True))
            print(f"| {arch} training, tokens/s | {fp32:,.0f} | {statistics.median(rates['bfloat16']):,.0f} | "
                  f"{ratio:.2f}× |")
        else:
            print(f"| {arch} training, tokens/s | {fp32:,.0f} | – | – |")
    print()
    print("| job (fp32) | utterances/s |")
    print("|---|---|")
    for arch in ("lstm", "gpt"):
        for label, length, count in (("sWUGGY-like, 12 units", 12, 2000), ("sBLIMP-like, 60 units", 60, 500),
                                     ("tSC-like, 300 units", 300, 100)):
            rate = statistics.median(time_scoring(arch, length, count) for _ in range(args.rounds))
            print(f"| {arch} scoring, {label} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
