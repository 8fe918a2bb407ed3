"""Training-step and inference speed of SpidR on this machine's CPU: prints a table (not a test).

For each model config and precision: the median time of a full training step (forward with codebook update,
backward, grad clip, AdamW, teacher EMA) on a batch of ``--batch`` × ``--seconds`` s of audio, the audio seconds
trained per second, the model FLOPs of one step (``torch.utils.flop_counter``, forward + backward; the optimizer's
element-wise work is not counted), MFU = FLOPs / (step time × the measured dense-matmul FLOP/s of this machine in
the same dtype), the peak resident memory of the process after the training steps, and the inference time for 10 s
of audio (all layers, batch 1).

The matmul rate is measured again right after every timed step and MFU is the median of the per-step ratios: on a
machine shared with other work, load changes from minute to minute, and this keeps numerator and denominator under
the same load.

Each (config, dtype) runs in its own subprocess so that its peak RSS is its own. By default the subprocess gets
``MALLOC_MMAP_THRESHOLD_=131072``: glibc then returns every freed block over 128 KiB to the OS at once, so the peak
RSS is the peak of live memory. With glibc's default adaptive threshold (``--default-malloc``) freed activation
buffers stay in the heap and the same base training step peaks about 0.6 GiB higher.

    python benchmarks/train_step.py                       # base + bench-small, fp32 + bf16, 3 timed steps
    python benchmarks/train_step.py --configs base --dtypes float32 --steps 10 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from spidr.config import DinoSRConfig, ModelConfig, SpidRConfig
from spidr.models import build_model, num_frames

CONFIGS = {
    "base": SpidRConfig(),
    "bench-small": SpidRConfig(
        extractor_conv_layer_config=((256, 10, 5),) + ((256, 3, 2),) * 4 + ((256, 2, 2),) * 2,
        encoder_embed_dim=256,
        encoder_num_layers=6,
        encoder_num_heads=4,
        encoder_ff_interm_features=1024,
        num_codebooks=4,
    ),
    "dinosr-base": DinoSRConfig(),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# The flop counter knows the CUDA attention kernels but not the CPU one: count it with PyTorch's own formulas.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()


def matmul_flops_per_second(dtype: torch.dtype, *, size: int = 2048, repeats: int = 5) -> float:
    """Best-of dense square matmul throughput in ``dtype`` (the MFU denominator)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up (oneDNN / MKL kernel selection)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def span_mask(batch: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """About 57 % of frames masked in spans of 10, like the default masking."""
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    spans = max(2, int(0.08 * frames))
    for row in range(batch):
        for start in torch.randperm(max(frames - 10, 1), generator=generator)[:spans].tolist():
            mask[row, start : start + 10] = True
    return mask


def measure(cfg: ModelConfig, dtype: torch.dtype, *, batch: int, seconds: float, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(cfg).train()
    trainable = [(k, p) for k, p in model.named_parameters() if not k.startswith("teacher")]
    encoder = ("feature_extractor", "feature_projection")
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for k, p in trainable if not k.startswith(encoder)]},
            {"params": [p for k, p in trainable if k.startswith(encoder)]},
        ],
        lr=5e-4, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.01, fused=True,  # as the official trainer
    )
    samples = int(seconds * 16000)
    waveforms = F.layer_norm(torch.randn(batch, samples, generator=generator), (samples,))
    mask = span_mask(batch, num_frames(samples, cfg.extractor_conv_layer_config), generator)

    def forward_backward() -> None:
        with autocast(dtype):
            losses, _ = model(waveforms, mask=mask)
        (losses.sum() / losses.numel()).backward()

    def step(number: int) -> float:
        start = time.perf_counter()
        forward_backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_ema(number)
        return time.perf_counter() - start

    with FlopCounterMode(display=False) as counter:
        forward_backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    for i in range(warmup):
        step(i + 1)
    times, rates = [], []
    for i in range(steps):
        times.append(step(warmup + i + 1))
        rates.append(matmul_flops_per_second(dtype, repeats=2))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    model.eval()
    ten_seconds = F.layer_norm(torch.randn(1, 160000, generator=generator), (160000,))
    inference = []
    with torch.inference_mode(), autocast(dtype):
        model.get_intermediate_outputs(ten_seconds)
        for _ in range(max(steps, 1)):
            start = time.perf_counter()
            model.get_intermediate_outputs(ten_seconds)
            inference.append(time.perf_counter() - start)

    step_time = statistics.median(times)
    return {
        "step_s": step_time,
        "step_times": times,
        "audio_s_per_s": batch * seconds / step_time,
        "gflop_per_step": flops / 1e9,
        "matmul_gflops": statistics.median(rates) / 1e9,
        "mfu": statistics.median(flops / (t * r) for t, r in zip(times, rates, strict=True)),
        "peak_rss_gib": peak_rss / 2**30,
        "infer_s_per_10s": statistics.median(inference),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["base", "bench-small"], choices=list(CONFIGS),
                        help="model configs to measure")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES),
                        help="float32, or bfloat16 autocast")
    parser.add_argument("--batch", type=int, default=2, help="utterances per batch")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of audio per utterance")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all CPUs)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's adaptive mmap threshold (peak RSS then includes freed heap memory)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    if args.worker:  # one measurement, printed as JSON for the parent
        config, dtype = args.worker
        result = measure(CONFIGS[config], DTYPES[dtype], batch=args.batch, seconds=args.seconds,
                         warmup=args.warmup, steps=args.steps)
        print(json.dumps(result))
        return 0

    rows = []
    for config in args.configs:
        for dtype in args.dtypes:
            command = [sys.executable, __file__, "--worker", config, dtype, "--batch", str(args.batch),
                       "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--steps", str(args.steps),
                       "--threads", str(args.threads)]
            env = dict(os.environ)
            if not args.default_malloc:
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                print(f"{config} {dtype} failed:\n{done.stderr}", file=sys.stderr)
                continue
            rows.append({"config": config, "dtype": dtype, **json.loads(done.stdout.strip().splitlines()[-1])})

    print(f"CPU: {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch} × {args.seconds} s, "
          f"median of {args.steps} steps after {args.warmup} warm-up, load average {os.getloadavg()[0]:.1f}")
    print("malloc: glibc default (peak RSS includes freed heap)" if args.default_malloc
          else "malloc: MALLOC_MMAP_THRESHOLD_=131072 (peak RSS = peak live memory)")
    header = ("config", "dtype", "step s", "audio s/s", "GFLOP/step", "matmul GFLOP/s", "MFU", "peak RSS GiB",
              "infer s/10 s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['config']} | {r['dtype']} | {r['step_s']:.2f} | {r['audio_s_per_s']:.2f} | "
              f"{r['gflop_per_step']:.0f} | {r['matmul_gflops']:.0f} | {100 * r['mfu']:.0f}% | "
              f"{r['peak_rss_gib']:.2f} | {r['infer_s_per_10s']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(rows, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
