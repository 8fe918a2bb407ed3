"""Training-step and inference speed of SpidR on this machine's CPU: prints a table (not a test).

For each model config, precision, AdamW implementation and ``run.trim_heap`` setting: the median time of the
trainer's own step, ``spidr.train.loop.train_step`` (forward with codebook update, backward, clip at 10, NaN/Inf
guard, AdamW, scheduler, teacher EMA; the optimizer, schedule, precision and heap trim that ``train()`` builds),
timed back to back on a batch of ``--batch`` × ``--seconds`` s of audio; the audio seconds trained per second; the
FLOPs of one step (``torch.utils.flop_counter``: matmuls, convolutions and attention, forward and backward;
element-wise work is not counted); MFU = FLOPs / (step time × this machine's dense-matmul FLOP/s in the same
dtype, measured just before and just after the timed steps); the peak resident memory of the process; and the
inference time for 10 s of audio (all layers, batch 1).

Each job runs in its own subprocesses, so that its peak RSS is its own. The timing process keeps glibc's default
allocator, as a training run does: its peak RSS includes freed memory that the heap keeps for reuse. A second,
shorter process (two steps) runs with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc then returns every freed block over
128 KiB to the OS at once, so its peak RSS is the peak of live memory ("peak live"). That setting is not used for
timing: every large allocation then faults in fresh pages, which slowed the base bf16 step by 1.6x here. On a
noisy machine use ``--rounds``: the jobs run interleaved, round after round, and each job's time relative to the
first job of its config is the median of the per-round ratios.

    python benchmarks/train_step.py                       # base + bench-small, fp32 + bf16, 3 timed steps
    python benchmarks/train_step.py --configs base --adamw for-loop fused --rounds 3 --steps 5
    python benchmarks/train_step.py --configs base --dtypes float32 --trim-heap never auto --batch 4 --seconds 8
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
from collections.abc import Callable
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from spidr.config import DinoSRConfig, ModelConfig, OptimizerConfig, SpidRConfig, load_config
from spidr.data.collate import Batch
from spidr.models import build_model, num_frames
from spidr.train import loop
from spidr.train.optim import build_optimizer, build_scheduler
from spidr.train.precision import resolve_precision

try:
    from spidr.train.memory import install_heap_trim
except ImportError:  # a tree of spidr from before run.trim_heap (2026-12-05): it never trims
    install_heap_trim = None

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
    # The model of configs/demo.toml (log-mel front end), read from it; its own batch is 8 crops of 2 s.
    "demo": load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.toml").model,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# The flop counter knows the CUDA attention kernels but not the CPU one: count it with PyTorch's own formulas.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_sdpa_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """A convolution's backward: as many FLOPs as its forward for the input gradient and again for the weight
    gradient. torch's formula counts a grouped conv's weight gradient as a dense conv's (× groups): the 16-group
    positional conv made a training step's count about 10 % too high (bench-small 13.03 GFLOP for 11.83)."""
    _bias, _stride, _padding, _dilation, transposed, _output_padding, _groups, output_mask = args
    if transposed:  # not in these models; torch's own count
        return flop_counter.conv_backward_flop(grad_out_shape, x_shape, w_shape, *args, out_shape)
    forward = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


# Formulas to count with in place of torch's (FlopCounterMode(custom_mapping=FLOP_FORMULAS)): torch refuses a second
# registration for an op it already has one for.
FLOP_FORMULAS = {torch.ops.aten.convolution_backward: _conv_backward_flops}


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


def trainer_parts(model: torch.nn.Module, dtype: str, adamw: str) -> tuple:
    """The optimizer, scheduler and precision that ``train()`` builds on this CPU (official schedule and
    hyper-parameters), with the fused AdamW kernel (``adamw="fused"``, the trainer's and the official trainer's
    choice) or torch's per-parameter loop (``"for-loop"``)."""
    cfg = OptimizerConfig(dtype=dtype)
    optimizer = build_optimizer(model, cfg, device=torch.device("cpu"))
    for group in optimizer.param_groups:  # set either way, so that older trees of spidr can be timed alike
        group["fused"], group["foreach"] = adamw == "fused", False
    return optimizer, build_scheduler(optimizer, cfg), resolve_precision(dtype, torch.device("cpu")), cfg.max_norm


def trainer_step(
    cfg: ModelConfig, dtype: str, adamw: str, *, batch: int, seconds: float, trim_heap: str = "auto"
) -> tuple[nn.Module, Callable[[int], None]]:
    """A freshly built model and its trainer's step ``step(number)`` on one fixed batch of ``batch`` × ``seconds``
    s of audio: ``spidr.train.loop.train_step`` (forward with codebook update, backward, clip, NaN guard, AdamW,
    scheduler, teacher EMA), with the heap trim that ``train()`` installs for ``run.trim_heap = trim_heap``."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(cfg).train()
    optimizer, scheduler, precision, max_norm = trainer_parts(model, dtype, adamw)
    if install_heap_trim is not None:
        install_heap_trim(model, trim_heap, precision)
    samples = int(seconds * 16000)
    waveforms = F.layer_norm(torch.randn(batch, samples, generator=generator), (samples,))
    mask = span_mask(batch, num_frames(samples, cfg.extractor_conv_layer_config), generator)
    # mask_count, as the collator gives it: the model gathers the masked frames with nonzero_static, no host sync
    one_batch = Batch(waveforms=waveforms, lengths=torch.full((batch,), samples), padding_mask=None, mask=mask,
                      ids=[str(i) for i in range(batch)], mask_count=int(mask.sum()))

    def step(number: int) -> None:
        loop.train_step(model, [one_batch], optimizer, scheduler, step=number, precision=precision, scaler=None,
                        max_norm=max_norm)

    return model, step


def measure(cfg: ModelConfig, dtype: str, adamw: str, trim_heap: str, *, batch: int, seconds: float, warmup: int,
            steps: int) -> dict:
    """Times the trainer's own step (``trainer_step``) back to back with nothing between the timed steps, then
    inference on 10 s of audio."""
    model, step = trainer_step(cfg, dtype, adamw, batch=batch, seconds=seconds, trim_heap=trim_heap)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        step(0)
    flops = counter.get_total_flops()
    for i in range(warmup):
        step(i + 1)
    rate_before = matmul_flops_per_second(DTYPES[dtype], repeats=3)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(warmup + i + 1)
        times.append(time.perf_counter() - start)
    rate = statistics.median([rate_before, matmul_flops_per_second(DTYPES[dtype], repeats=3)])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    model.eval()
    ten_seconds = F.layer_norm(torch.randn(1, 160000, generator=torch.Generator().manual_seed(1)), (160000,))
    inference = []
    with torch.inference_mode(), resolve_precision(dtype, torch.device("cpu")).autocast():
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
        "matmul_gflops": rate / 1e9,
        "mfu": flops / (step_time * rate),
        "peak_rss_gib": peak_rss / 2**30,
        "infer_s_per_10s": statistics.median(inference),
    }


def measure_live_memory(cfg: ModelConfig, dtype: str, adamw: str, trim_heap: str, *, batch: int,
                        seconds: float) -> dict:
    """Peak RSS over two steps, for a process started with glibc's mmap threshold at 128 KiB (peak live memory)."""
    _, step = trainer_step(cfg, dtype, adamw, batch=batch, seconds=seconds, trim_heap=trim_heap)
    for number in range(2):
        step(number)
    return {"peak_live_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["base", "bench-small"], choices=list(CONFIGS),
                        help="model configs to measure")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES),
                        help="float32, or bfloat16 autocast")
    parser.add_argument("--adamw", nargs="+", default=["fused"], choices=["fused", "for-loop"],
                        help="AdamW implementation: the trainer's fused kernel, or torch's per-parameter loop (the "
                             "trainer's CPU choice until 2026-12-04)")
    parser.add_argument("--trim-heap", nargs="+", default=["auto"], choices=["auto", "always", "never"],
                        help="run.trim_heap: return the free heap to the OS before the front end's backward "
                             "(auto: when its first-layer output exceeds 32 MiB; spidr/train/memory.py)")
    parser.add_argument("--batch", type=int, default=2, help="utterances per batch")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of audio per utterance")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds over all jobs, interleaved; the best round's median is reported, and each "
                             "job's time relative to the first job of its config is the median of per-round ratios")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all CPUs)")
    parser.add_argument("--no-live-memory", action="store_true",
                        help="skip the second process per job that measures peak live memory")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", nargs=4, metavar=("CONFIG", "DTYPE", "ADAMW", "TRIM"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    if args.worker:  # one measurement, printed as JSON for the parent
        config, dtype, adamw, trim_heap = args.worker
        if args.memory_worker:
            print(json.dumps(measure_live_memory(CONFIGS[config], dtype, adamw, trim_heap, batch=args.batch,
                                                 seconds=args.seconds)))
            return 0
        result = measure(CONFIGS[config], dtype, adamw, trim_heap, batch=args.batch, seconds=args.seconds,
                         warmup=args.warmup, steps=args.steps)
        print(json.dumps(result))
        return 0

    jobs = list(product(args.configs, args.dtypes, args.adamw, args.trim_heap))
    runs: dict[tuple[str, str, str, str], list[dict]] = {job: [] for job in jobs}
    def run_worker(job: tuple[str, str, str, str], *, memory: bool) -> dict | None:
        command = [sys.executable, __file__, "--worker", *job, "--batch", str(args.batch),
                   "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--threads", str(args.threads), *(["--memory-worker"] if memory else [])]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if memory else None
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            print(f"{' '.join(job)} failed:\n{done.stderr}", file=sys.stderr)
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])

    for _ in range(args.rounds):
        for job in jobs:
            result = run_worker(job, memory=False)
            if result is None:
                return 1
            runs[job].append(result)
    live = {job: None if args.no_live_memory else run_worker(job, memory=True) for job in jobs}

    rows = []
    for job in jobs:
        first = next(j for j in jobs if j[0] == job[0])
        ratios = [mine["step_s"] / theirs["step_s"] for mine, theirs in zip(runs[job], runs[first], strict=True)]
        best = min(runs[job], key=lambda r: r["step_s"])
        rows.append({"config": job[0], "dtype": job[1], "adamw": job[2], "trim_heap": job[3], **best,
                     "peak_live_gib": live[job] and live[job]["peak_live_gib"],
                     "time_vs_first": statistics.median(ratios), "rounds": runs[job]})

    print(f"CPU: {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch} × {args.seconds} s, "
          f"best of {args.rounds} round(s) of the median of {args.steps} steps after {args.warmup} warm-up, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("peak RSS: the timing process (glibc's default malloc); peak live: two steps with "
          "MALLOC_MMAP_THRESHOLD_=131072")
    def live_gib(row: dict) -> str:
        return "-" if row["peak_live_gib"] is None else f"{row['peak_live_gib']:.2f}"

    header = ("config", "dtype", "AdamW", "trim heap", "step s", "× time of first", "audio s/s", "GFLOP/step",
              "matmul GFLOP/s", "MFU", "peak RSS GiB", "peak live GiB", "infer s/10 s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['config']} | {r['dtype']} | {r['adamw']} | {r['trim_heap']} | {r['step_s']:.2f} | "
              f"{r['time_vs_first']:.2f} | {r['audio_s_per_s']:.2f} | {r['gflop_per_step']:.0f} | "
              f"{r['matmul_gflops']:.0f} | "
              f"{100 * r['mfu']:.0f}% | {r['peak_rss_gib']:.2f} | {live_gib(r)} | {r['infer_s_per_10s']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(rows, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
