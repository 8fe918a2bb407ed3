"""One-shot GPU benchmark of the SpidR trainer: per-GPU training speed, MFU and memory, and the data loader's speed.

    bash benchmarks/gpu.sh [JSON_PATH]              # on a GPU machine: every job, ≈ 5 minutes at most
    python benchmarks/gpu.py --smoke                # on a CPU: a tiny model, to check the script itself

Jobs (each in a fresh process with its own time limit, so that a crash, an out-of-memory error or a compilation that
runs too long costs only its own row):

* ``spidr``, ``dinosr``: the base model (``SpidRConfig()`` / ``DinoSRConfig()``) trained with bf16 autocast;
* ``spidr-compile``, ``dinosr-compile``: the same with ``run.compile`` (``torch.compile(dynamic=True)``, in place);
* ``spidr-host-reads``: ``spidr`` with the host reading each step (``run.host_sync = "step"``, and the masked-frame
  count found on the GPU rather than taken from the loader): what the GPU loses to the two reads per step;
* ``spidr-channels-last`` (only when named in ``--jobs``): ``spidr`` with the conv front end's activations kept as
  (B, L, C) memory, as they are on a CPU in bf16 (``spidr.models.components.conv_layout``), to measure whether
  cuDNN gains from that layout too before CUDA training uses it;
* ``loader``: the training DataLoader (``spidr.data.loader.build_dataloader`` with the training data settings)
  alone, over a synthetic corpus of audio files, as the training loop consumes it;
* ``extract``: feature extraction with base SpidR (``spidr extract``'s batches: all 12 layers copied to the host) in
  bf16 as ``--dtype bfloat16`` runs it (``spidr.models.inference_precision``: front end, projection and positional
  convs in float32), against float32 and against plain bf16 autocast: speed of each and the features' distance;
  and the middle layer's k-means units alone (``--layers none --kmeans``), assigned on the GPU
  (``spidr.eval.nearest_centroid``) against the features copied to the host and assigned there in float64.

A model job times exactly what ``spidr train`` runs per step: ``spidr.train.loop.train_step`` (forward with the
codebook update, backward, clipping, AdamW step, scheduler step, teacher EMA) with the model, optimizer, scheduler,
precision and compilation that ``train()`` sets up from the same config. Its batches are the first ``--batches``
batches the training DataLoader makes from the synthetic corpus (bucketed, cropped to ``data.max_sample_size``,
at most ``data.max_batch_length`` = 3.8 M samples each, span-masked), moved to the GPU beforehand; timed steps
cycle through them.

The synthetic corpus: utterance lengths drawn LibriSpeech-960-shaped (``workload.librispeech_lengths``: 0.8-35 s,
mean 12.3 s, most 12-17 s), white noise written as 16-bit files; each file is listed ``--copies`` times in the
manifest, so that length buckets hold many utterances of nearly the same length, as in the real corpus, and
batches waste little audio to cropping.

Per job: audio seconds trained per second on this GPU (all timed steps' audio ÷ their wall time), the median step
time (CUDA events between steps), MFU = achieved FLOP/s ÷ ``--peak-tflops`` with the issue's 56.7 GFLOP per
audio second for a base training step, and with the FLOPs counted by ``torch.utils.flop_counter`` over one eager
pass of the batches (a cross-check of that figure), the peak GPU memory (``torch.cuda.max_memory_allocated``) and,
for compiled jobs, the compilation time (the warm-up's wall time beyond that of as many steady steps). Warm-up
steps (one pass over the batches, so that every batch shape is compiled before timing) are not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

# train_step and workload are sibling benchmark modules (this folder is sys.path[0] when the script runs): the first
# registers the FLOP formulas of PyTorch's CPU attention kernels on import (the CUDA ones are known to the counter)
# and corrects the grouped-conv backward's (FLOP_FORMULAS), the second draws LibriSpeech-shaped lengths.
import numpy as np
import soundfile as sf
import torch
from torch.utils.flop_counter import FlopCounterMode
from train_step import FLOP_FORMULAS
from workload import librispeech_lengths

from spidr.config import Config, DataConfig, DinoSRConfig, MaskingConfig, ModelConfig, RunConfig, SpidRConfig
from spidr.data import SAMPLE_RATE
from spidr.data.collate import Batch
from spidr.data.loader import build_dataloader, usable_workers
from spidr.data.manifest import ManifestEntry, read_manifest, write_manifest
from spidr.eval.features import ExtractionSettings, extract_batch, length_batches
from spidr.eval.nearest_centroid import NearestCentroid, assign_float64
from spidr.models import components
from spidr.models.build import build_model
from spidr.train import loop
from spidr.train.environment import DistributedEnvironment
from spidr.train.optim import build_optimizer, build_scheduler
from spidr.train.precision import Precision, resolve_precision
from spidr.train.runtime import configure_numerics, seed_everything

ISSUE_GFLOP_PER_AUDIO_SECOND = 56.7  # issue 10: one base training step (forward + backward) per second of audio
DEFAULT_PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 tensor cores
# Dense bf16 peaks by what torch.cuda.get_device_name() contains (first match): an H100 lent as "about 78 GiB" may
# be the SXM card or the 80 GB PCIe one, whose peak is 24 % lower.
PEAK_TFLOPS_BY_NAME = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),  # (GH200 too)
                       ("A100", 312.0), ("L40S", 362.0))


@dataclass(frozen=True)
class Job:
    name: str  # as in the table
    model: str  # "spidr" / "dinosr", or "" for the loader
    compile: bool = False
    host_sync: str = "auto"  # run.host_sync ("auto" is "log" on CUDA: no host read between log steps)
    mask_count: bool = True  # pass the loader's masked-frame count to the model (else one nonzero per step)
    conv_layout: str | None = None  # force the front end's layout (components.conv_layout); None: the library's


JOBS = {
    "spidr": Job("SpidR base, bf16", "spidr"),
    "spidr-compile": Job("SpidR base, bf16 + compile", "spidr", compile=True),
    "dinosr": Job("DinoSR base, bf16", "dinosr"),
    "dinosr-compile": Job("DinoSR base, bf16 + compile", "dinosr", compile=True),
    "spidr-host-reads": Job("SpidR base, bf16, 2 host reads per step", "spidr", host_sync="step", mask_count=False),
    "spidr-channels-last": Job("SpidR base, bf16, front end channels last", "spidr", conv_layout="channels_last"),
    "loader": Job("data loader alone", ""),
    "extract": Job("SpidR base, extraction, bf16", "spidr"),
}
DEFAULT_JOBS = [job for job in JOBS if job != "spidr-channels-last"]
# The order jobs run in: cheap and sure first, so that slow compilations take only what time is left.
RUN_ORDER = ("spidr", "dinosr", "loader", "extract", "spidr-host-reads", "spidr-channels-last", "spidr-compile",
             "dinosr-compile")
# Shares of the remaining time limit: a compiled job has its compilation to fit in too.
# SpidR's compiled row (the issue's headline) gets the larger share: with equal shares both compiled jobs could run
# out of time compiling (what one leaves unused goes to the next).
TIME_WEIGHTS = {"spidr": 1.5, "dinosr": 1.5, "loader": 0.5, "extract": 0.75, "spidr-host-reads": 1.0,
                "spidr-channels-last": 1.0, "spidr-compile": 3.5, "dinosr-compile": 1.5}
EXTRACT_FILES = 24  # distinct corpus files the extraction job reads (≈ 5 minutes of audio)
SMOKE_EXTRACT_FILES = 4
EXTRACT_ROUNDS = 5  # timed rounds at most (each: one pass per precision); fewer with --steps below it

# --smoke: a tiny model (2 layers × 64 dims, 32-channel extractor with the base strides, so the same frame rate) on
# 2-row batches of 2 s crops; everything else is the base recipe.
SMOKE_MODEL = {
    "extractor_conv_layer_config": ((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2,
    "encoder_embed_dim": 64,
    "encoder_num_layers": 2,
    "encoder_num_heads": 2,
    "encoder_ff_interm_features": 128,
    "num_codebooks": 2,
    "codebook_size": 32,
}
SMOKE_DATA = {"max_sample_size": 2 * SAMPLE_RATE, "max_batch_length": 4 * SAMPLE_RATE, "num_workers": 1}


# --------------------------------------------------------------------------------------------------------------
# Configs: the training recipe, with the synthetic corpus as data
# --------------------------------------------------------------------------------------------------------------


def model_config(model: str, *, smoke: bool) -> ModelConfig:
    """The base config of ``model`` ("spidr" or "dinosr"), or its tiny ``--smoke`` version."""
    cfg = SpidRConfig() if model == "spidr" else DinoSRConfig()
    return dataclasses.replace(cfg, **SMOKE_MODEL) if smoke else cfg


def data_config(manifest: str, *, smoke: bool, **changes: Any) -> DataConfig:
    """The training data settings (``DataConfig()`` defaults: ≤ 3.8 M samples per batch, 20 s crops, 10 workers) over
    ``manifest``."""
    return DataConfig(manifest=manifest, **(SMOKE_DATA if smoke else {}), **changes)


def run_config(job: str, manifest: str, workdir: str, *, smoke: bool, device: torch.device) -> Config:
    """A whole training config for ``job``: what ``train()`` would be given (optimizer defaults: bf16 autocast)."""
    model = model_config(JOBS[job].model, smoke=smoke)
    # A smoke run on the CPU takes the step the GPU takes by default (the NaN/Inf verdict kept on the device, no host
    # read between log steps), which "auto" keeps for CUDA.
    host_sync = "log" if smoke and JOBS[job].host_sync == "auto" else JOBS[job].host_sync
    return Config(
        run=RunConfig(workdir=workdir, wandb_project="gpu-benchmark", wandb_name=job, model_type=model.model_type,
                      compile=JOBS[job].compile, device=device.type, host_sync=host_sync),
        data=data_config(manifest, smoke=smoke),
        model=model,
    )


# --------------------------------------------------------------------------------------------------------------
# The synthetic corpus (written once by the parent process, read by every job)
# --------------------------------------------------------------------------------------------------------------


def write_corpus(directory: Path, *, files: int, copies: int, audio_format: str, seed: int = 0) -> Path:
    """``files`` noise files of LibriSpeech-shaped lengths in ``directory``, and a CSV manifest listing each file
    ``copies`` times (distinct file ids). Returns the manifest's path."""
    rng = np.random.default_rng(seed)
    entries = []
    for i, num_samples in enumerate(librispeech_lengths(files, seed=seed).tolist()):
        path = directory / f"u{i:05d}.{audio_format}"
        noise = rng.normal(0.0, 0.1, num_samples).astype(np.float32)
        sf.write(path, noise, SAMPLE_RATE, subtype="PCM_16")
        entries += [ManifestEntry(f"u{i:05d}-{c}", str(path), num_samples) for c in range(copies)]
    return write_manifest(entries, directory / "manifest.csv")


# --------------------------------------------------------------------------------------------------------------
# A model job: set up as train() does, count FLOPs, warm up, time train_step
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """What ``train()`` builds before its step loop (single process)."""

    model: torch.nn.Module  # unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    precision: Precision
    skip_on_device: bool  # run.host_sync resolved: the NaN/Inf verdict stays on the device (CUDA default)
    step: int = 0  # optimizer steps taken


def build_trainer(cfg: Config, device: torch.device) -> Trainer:
    """The model, optimizer (fused AdamW on CUDA), scheduler and precision of a fresh run, in ``train()``'s order."""
    configure_numerics(device, deterministic=cfg.run.use_deterministic)
    torch.manual_seed(cfg.run.random_seed)
    model = build_model(cfg.model).to(device)
    seed_everything(cfg.run.random_seed)
    precision = resolve_precision(cfg.optimizer.dtype, device)
    optimizer = build_optimizer(model, cfg.optimizer, device=device)
    scaler = precision.make_scaler()
    return Trainer(model, optimizer, build_scheduler(optimizer, cfg.optimizer), scaler, precision,
                   skip_on_device=loop.skips_on_device(cfg.run.host_sync, device, scaler=scaler))


def first_batches(cfg: Config, count: int, device: torch.device) -> list[Batch]:
    """The first ``count`` batches of the training DataLoader (read in this process), on ``device``.

    Each batch: waveforms (B, S) float32 with B × S ≤ data.max_batch_length, mask (B, T) bool.
    """
    loader, _ = build_dataloader(dataclasses.replace(cfg.data, num_workers=0), cfg.masking,
                                 conv_layers=cfg.model.extractor_conv_layer_config)
    batches = loop._batches(loader)
    return [next(batches).to(device) for _ in range(count)]


def wrap_like_trainer(trainer: Trainer, cfg: Config, device: torch.device, backend: str) -> torch.nn.Module:
    """The model as ``train()`` steps it (``loop._wrap``: compiled in place with dynamic shapes when run.compile is
    set, on CUDA). The trainer compiles on CUDA only; on a CPU, or with another backend than inductor (``--smoke``
    uses "eager" to test this path quickly), the same call is made here."""
    if cfg.run.compile and (device.type != "cuda" or backend != "inductor"):
        trainer.model.compile(dynamic=True, backend=backend)
        return trainer.model
    return loop._wrap(trainer.model, cfg, DistributedEnvironment(), device)


def run_steps(model: torch.nn.Module, trainer: Trainer, batches: list[Batch], count: int, *, max_norm: float,
              start: int = 0) -> Iterator[loop.StepOutput]:
    """``count`` training steps exactly as the training loop takes them, cycling through ``batches`` from index
    ``start``. As in the loop, a step skipped for a non-finite loss counts as taken only when the verdict stays
    on the device (``trainer.skip_on_device``); otherwise reading it is the step's host synchronisation."""
    for i in range(start, start + count):
        out = loop.train_step(model, [batches[i % len(batches)]], trainer.optimizer, trainer.scheduler,
                              step=trainer.step, precision=trainer.precision, scaler=trainer.scaler,
                              max_norm=max_norm, skip_on_device=trainer.skip_on_device)
        if trainer.skip_on_device or not out.skipped:
            trainer.step += 1
        yield out


def count_flops(model: torch.nn.Module, trainer: Trainer, batches: list[Batch], *, max_norm: float) -> float:
    """FLOPs per second of audio of a training step, counted over one eager step per batch (matmuls, convolutions
    and attention, forward and backward; the optimizer's element-wise work is not counted)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        audio = sum(float(out.metrics["audio_seconds"]) for out in run_steps(model, trainer, batches, len(batches),
                                                                            max_norm=max_norm))
    return counter.get_total_flops() / audio


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_graphs() -> int | None:
    """Graphs compiled so far by torch.compile in this process (a private counter: None if it moved)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, TypeError):
        return None


# Steps after the first that each compiled a new graph, on batches of new shapes, before the job gives up.
RECOMPILES_PER_SHAPE = 3


def check_not_recompiling_per_shape(graphs: list[int | None], batches: list[Batch]) -> None:
    """Raise once each of the last ``RECOMPILES_PER_SHAPE`` warm-up steps (the first excepted) compiled a new graph:
    ``dynamic=True`` compiles one graph for all lengths, and a guard that specialises on the frame count (torch
    ≥ 2.12's lowering of the convolution backward sets one; ``spidr.models.conv_under_compile`` keeps the convs out of
    its reach) would spend the job's whole time limit compiling.
    ``graphs`` holds ``compiled_graphs()`` before the first step and after each one."""
    if len(graphs) < RECOMPILES_PER_SHAPE + 2 or any(count is None for count in graphs):
        return
    recent = graphs[-RECOMPILES_PER_SHAPE - 1:]
    if all(after > before for before, after in itertools.pairwise(recent)):
        lengths = sorted({batch.waveforms.shape[-1] for batch in batches})
        raise RuntimeError(
            f"torch.compile compiled a new graph at each of the last {RECOMPILES_PER_SHAPE} steps ({graphs[-1]} in "
            f"all over batches of {len(lengths)} lengths): it specialises on the batch shape (torch "
            f"{torch.__version__}); rerun with TORCH_LOGS=recompiles to see the guard")


def time_steps(model: torch.nn.Module, trainer: Trainer, batches: list[Batch], *, steps: int, warmup: int,
               max_norm: float, device: torch.device, deadline: float, report: dict[str, Any]) -> None:
    """Warm up, then time up to ``steps`` steps (at least 2; fewer once ``deadline``, a ``time.time()`` value,
    has passed); fills ``report``.

    Step times come from CUDA events recorded on the stream before the first step and after each one (the GPU time
    each step's work spans, without any extra host synchronisation; with ``run.host_sync = "log"``, the CUDA
    default, the step itself makes none, and the steps' metrics are read after the block); the throughput from the
    wall time of the whole block, between two ``torch.cuda.synchronize``.
    """
    report["stage"] = "warm-up (compilation)" if report["compile"] else "warm-up"
    synchronize(device)
    began = time.perf_counter()
    graphs = [compiled_graphs()]
    for i, _ in enumerate(run_steps(model, trainer, batches, warmup, max_norm=max_norm)):
        if i == 0:
            synchronize(device)
            report["first_step_s"] = time.perf_counter() - began
            print(f"  {report['job']}: first step {report['first_step_s']:.1f} s", file=sys.stderr)
        graphs.append(compiled_graphs())
        if report["compile"]:
            check_not_recompiling_per_shape(graphs, batches)
    synchronize(device)
    report["warmup_s"] = time.perf_counter() - began

    report["stage"] = "timed steps"
    graphs_before = compiled_graphs()
    cuda = device.type == "cuda"
    audio, rows, skipped = 0.0, 0.0, 0
    synchronize(device)
    began = time.perf_counter()
    marks = [_mark(cuda=cuda)]  # then one at the end of each step: CUDA events, or perf_counter values on a CPU
    outputs = []
    for out in run_steps(model, trainer, batches, steps, max_norm=max_norm, start=warmup):
        marks.append(_mark(cuda=cuda))
        outputs.append(out)
        if len(marks) > 2 and time.time() > deadline:
            break
    synchronize(device)
    wall = time.perf_counter() - began
    loop.read_step_outputs(outputs)
    for out in outputs:
        audio += float(out.metrics["audio_seconds"])
        rows += float(out.metrics["batch_size"])
        skipped += out.skipped
    timed = len(marks) - 1
    step_times = [a.elapsed_time(b) / 1000 if cuda else b - a for a, b in itertools.pairwise(marks)]
    graphs_after = compiled_graphs()
    report.update({
        "timed_steps": timed,
        "skipped_steps": skipped,
        "audio_s_per_s": audio / wall,
        "median_step_s": statistics.median(step_times),
        "step_times_s": step_times,
        "audio_s_per_step": audio / timed,
        "rows_per_step": rows / timed,
        "graphs_compiled_while_timed": (None if graphs_before is None or graphs_after is None
                                        else graphs_after - graphs_before),
    })
    # Compilation (and other one-off work) = warm-up time beyond that of as many steady steps.
    report["compile_s"] = max(0.0, report["warmup_s"] - warmup * report["median_step_s"])


def _mark(*, cuda: bool) -> Any:
    """A point in time: a CUDA event recorded on the current stream, or a perf_counter value."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def front_end_layout(layout: str | None) -> contextlib.AbstractContextManager:
    """Within the block, the conv front end lays out its activations as ``layout`` ("channels_last", ...) whatever
    the device and precision; ``None`` leaves the library's choice."""
    if layout is None:
        return contextlib.nullcontext()
    return mock.patch.object(components, "conv_layout", return_value=layout)


def model_job(job: str, args: argparse.Namespace, device: torch.device, report: dict[str, Any]) -> None:
    """Build as ``train()`` does, read the batches, count FLOPs, then warm up and time; fills ``report``."""
    # A compiled job fails when Dynamo reaches its recompile limit: past it, Dynamo runs the code eagerly, and the
    # row would time an uncompiled model.
    with tempfile.TemporaryDirectory(prefix="spidr-gpu-bench-run-") as workdir, \
            front_end_layout(JOBS[job].conv_layout), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        cfg = run_config(job, args.manifest, workdir, smoke=args.smoke, device=device)
        report["stage"] = "set-up"
        trainer = build_trainer(cfg, device)
        report["dtype"] = trainer.precision.name
        batches = first_batches(cfg, args.batches, device)
        if not JOBS[job].mask_count:
            batches = [dataclasses.replace(batch, mask_count=None) for batch in batches]
        max_norm = cfg.optimizer.max_norm

        if args.counted_gflop:  # the eager twin's count: same model, same batches (saves a compiled job's time)
            report["gflop_per_audio_s_counted"] = args.counted_gflop
            report["counted_by"] = JOBS[job.removesuffix("-compile")].name
        else:
            report["stage"] = "counting FLOPs"
            report["gflop_per_audio_s_counted"] = count_flops(trainer.model, trainer, batches,
                                                              max_norm=max_norm) / 1e9

        if device.type == "cuda":  # the peak of the steps measured, not of the eager FLOP count before compilation
            torch.cuda.reset_peak_memory_stats(device)
        model = wrap_like_trainer(trainer, cfg, device, args.compile_backend)
        warmup = max(args.warmup, len(batches) if cfg.run.compile else 0)  # every batch shape compiled before timing
        time_steps(model, trainer, batches, steps=args.steps, warmup=warmup, max_norm=max_norm, device=device,
                   deadline=args.stop_at, report=report)

    report.update(peak_memory(device))
    peak = args.peak_tflops * 1e12
    report["mfu_issue"] = report["audio_s_per_s"] * ISSUE_GFLOP_PER_AUDIO_SECOND * 1e9 / peak
    report["mfu_counted"] = report["audio_s_per_s"] * report["gflop_per_audio_s_counted"] * 1e9 / peak
    report["stage"] = "done"


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory in GiB: the GPU's allocated peak since the warm-up started, or on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                "peak_mem_kind": "torch.cuda.max_memory_allocated"}
    return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
            "peak_mem_kind": "process peak RSS (CPU)"}


# --------------------------------------------------------------------------------------------------------------
# The loader job
# --------------------------------------------------------------------------------------------------------------


def loader_job(args: argparse.Namespace, device: torch.device, report: dict[str, Any]) -> None:
    """The training DataLoader over the synthetic corpus, consumed as the training loop does (``loop._batches``,
    then ``Batch.to(device, non_blocking=True)``) and timed; fills ``report``.

    The first ``workers × prefetch_factor`` batches are made while the workers start and are then handed out at
    once, so the throughput counts only the batches after them (all of them when the epoch is too short).
    """
    model = model_config("spidr", smoke=args.smoke)
    data = data_config(args.manifest, smoke=args.smoke)
    report["stage"] = "set-up"
    began = time.perf_counter()
    loader, sampler = build_dataloader(data, MaskingConfig(), conv_layers=model.extractor_conv_layer_config)
    count = args.loader_batches or len(sampler)
    workers = usable_workers(data.num_workers)
    report["stage"] = "reading batches"
    batches = loop._batches(loader)
    arrivals, audio = [], []
    for _ in range(count):
        batch = next(batches).to(device, non_blocking=True)
        synchronize(device)
        arrivals.append(time.perf_counter())
        audio.append(float(batch.lengths.sum()) / SAMPLE_RATE)
        if len(arrivals) > 2 and time.time() > args.stop_at:
            break
    del batches, loader  # stops the workers
    skip = workers * data.prefetch_factor if len(arrivals) > 2 * workers * data.prefetch_factor else 1
    intervals = np.diff(arrivals[skip - 1:])
    report.update({
        "stage": "done",
        "dtype": "–",
        "workers": workers,
        "batches_read": len(arrivals),
        "batches_timed": len(intervals),
        "first_batch_s": arrivals[0] - began,
        "audio_s_per_s": sum(audio[skip:]) / float(intervals.sum()),
        "audio_s_per_s_with_start_up": sum(audio) / (arrivals[-1] - began),
        "median_step_s": float(np.median(intervals)),  # seconds between batches
        "audio_s_per_step": sum(audio) / len(audio),
    })


# --------------------------------------------------------------------------------------------------------------
# The extraction job
# --------------------------------------------------------------------------------------------------------------


def extraction_inputs(manifest: str, files: int) -> list[list[torch.Tensor]]:
    """The first ``files`` distinct files of the corpus, standardised as ``spidr extract`` reads them, in the
    batches it would make (``length_batches``: similar lengths, at most ``batch_seconds`` of padded audio each)."""
    from spidr.data.audio import load_audio

    paths = list(dict.fromkeys(entry.path for entry in read_manifest(manifest)))[:files]
    waves = [load_audio(path, normalize=True) for path in paths]
    lengths = np.array([wave.shape[0] for wave in waves])
    batch_samples = int(ExtractionSettings.batch_seconds * SAMPLE_RATE)
    return [[waves[i] for i in batch] for batch in length_batches(lengths, batch_samples)]


def _largest_error(ours: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]]) -> float:
    """Largest ||ours − reference|| / ||reference|| over the utterances and layers of one batch."""
    return max(float(np.linalg.norm(a[key].astype(np.float64) - b[key]) / np.linalg.norm(b[key].astype(np.float64)))
               for a, b in zip(ours, reference, strict=True) for key in b)


def kmeans_centroids(model: torch.nn.Module, batch: list[torch.Tensor], layer: int) -> torch.Tensor:
    """Up to 500 centroids for ``layer``'s k-means units: frames of ``batch`` taken evenly (the frames' own
    distribution, as centroids fitted on them would be; no k-means fit in a 5-minute benchmark)."""
    results = extract_batch(model, batch, ExtractionSettings(layers=(layer,)))
    frames = np.concatenate([result[f"layer_{layer:02d}"] for result in results])
    rows = np.linspace(0, len(frames) - 1, min(500, len(frames) // 2)).astype(int)
    return torch.from_numpy(frames[rows])


def extract_job(args: argparse.Namespace, device: torch.device, report: dict[str, Any]) -> None:
    """``extract_batch`` (all layers, copied to the host) over ``extraction_inputs`` in three precisions: float32,
    ``dtype="bfloat16"`` (the front end, projection and positional convs in float32) and plain bf16 autocast around
    the float32 settings (the whole model in bf16). A first pass compares each bf16 variant's features with
    float32's; timed passes follow, the three precisions interleaved, for ``EXTRACT_ROUNDS`` rounds (or ``--steps``
    if fewer) or until the deadline. Fills ``report`` (the bf16 row; the other two as ``fp32_*`` and ``autocast_*``
    fields); the peak memory is that of the bf16 passes."""
    if device.type == "cuda":  # torch's defaults, which spidr extract keeps (the model jobs switch TF32 off)
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
    report["stage"] = "set-up"
    torch.manual_seed(0)
    model = build_model(model_config("spidr", smoke=args.smoke)).to(device).eval()
    batches = extraction_inputs(args.manifest, SMOKE_EXTRACT_FILES if args.smoke else EXTRACT_FILES)
    audio = sum(wave.shape[0] for batch in batches for wave in batch) / SAMPLE_RATE
    layers = tuple(range(1, model.num_layers + 1))
    # k-means units of the middle layer alone (`spidr extract --layers none --kmeans 6:…`, the LM workflow): on the
    # model's device, or its features copied to the host and assigned there in float64 (spidr before 2026-12-07)
    middle = max(model.num_layers // 2, 1)
    nearest = NearestCentroid(kmeans_centroids(model, batches[0], middle))
    runs = {  # name → (settings, the context around extract_batch, k-means units on the device)
        "bf16": (ExtractionSettings(layers=layers, dtype="bfloat16"), contextlib.nullcontext, {}),
        "fp32": (ExtractionSettings(layers=layers), contextlib.nullcontext, {}),
        "autocast": (ExtractionSettings(layers=layers), lambda: torch.autocast(device.type, dtype=torch.bfloat16),
                     {}),
        "kmeans": (ExtractionSettings(layers=(), dtype="bfloat16"), contextlib.nullcontext, {middle: nearest}),
        "kmeans-host": (ExtractionSettings(layers=(middle,), dtype="bfloat16"), contextlib.nullcontext, {}),
    }

    def extract(name: str, batch: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        settings, context, kmeans = runs[name]
        with context():
            results = extract_batch(model, batch, settings, kmeans=kmeans)
        if name == "kmeans-host":
            return [{"kmeans": assign_float64(torch.from_numpy(r[f"layer_{middle:02d}"]), nearest.centroids).numpy()}
                    for r in results]
        return results

    report["stage"] = "comparing features"
    errors: dict[str, float] = {"bf16": 0.0, "autocast": 0.0}
    units_equal, frames = True, 0
    for batch in batches:
        reference = extract("fp32", batch)
        for name, largest in errors.items():
            errors[name] = max(largest, _largest_error(extract(name, batch), reference))
        on_device, on_host = extract("kmeans", batch), extract("kmeans-host", batch)
        units_equal &= all(np.array_equal(a[f"kmeans_{middle:02d}"], b["kmeans"])
                           for a, b in zip(on_device, on_host, strict=True))
        frames += sum(len(b["kmeans"]) for b in on_host)
    # In the report now: a job killed during the timed passes still tells how far the features are.
    report.update({"files": sum(len(batch) for batch in batches), "batches": len(batches),
                   "bf16_max_relative_error": errors["bf16"], "autocast_max_relative_error": errors["autocast"],
                   "kmeans_layer": middle, "kmeans_units": int(nearest.centroids.shape[0]),
                   "kmeans_units_equal": units_equal, "kmeans_float64_share": nearest.num_float64 / max(frames, 1)})

    report["stage"] = "timed passes"
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    peak_gib = 0.0
    for round_ in range(min(args.steps, EXTRACT_ROUNDS)):
        if round_ > 0 and time.time() > args.stop_at:
            break
        for name in runs:
            synchronize(device)
            if device.type == "cuda" and name == "bf16":
                torch.cuda.reset_peak_memory_stats(device)
            began = time.perf_counter()
            for batch in batches:
                extract(name, batch)  # its features are copied to the host: the pass ends synchronised
            seconds[name].append(time.perf_counter() - began)
            if name == "bf16":
                peak_gib = max(peak_gib, peak_memory(device)["peak_mem_gib"])
    median = {name: statistics.median(times) for name, times in seconds.items()}
    report.update({
        "stage": "done",
        "dtype": "bfloat16",
        "timed_steps": len(seconds["bf16"]),
        "audio_s_per_s": audio / median["bf16"],
        "median_step_s": median["bf16"] / len(batches),  # the median pass's time per extraction batch
        "audio_s_per_step": audio / len(batches),
        "fp32_audio_s_per_s": audio / median["fp32"],
        "autocast_audio_s_per_s": audio / median["autocast"],
        "kmeans_audio_s_per_s": audio / median["kmeans"],
        "kmeans_host_audio_s_per_s": audio / median["kmeans-host"],
    })
    report.update(peak_memory(device), peak_mem_gib=peak_gib)


# --------------------------------------------------------------------------------------------------------------
# Running the jobs: a worker process per job, a time limit each, a table at the end
# --------------------------------------------------------------------------------------------------------------


def run_job_here(job: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one job in this process; an exception becomes the row's ``error``. Progress is written to
    ``args.result`` (if set) at every stage, so that a job killed at its time limit still says where it was."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {"job": job, "name": JOBS[job].name, "compile": JOBS[job].compile, "stage": "start",
                              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                              "torch": torch.__version__}
    writer = _ProgressWriter(report, args.result)
    began = time.perf_counter()
    try:
        with writer.watching():
            if job == "loader":
                loader_job(args, device, report)
            elif job == "extract":
                extract_job(args, device, report)
            else:
                model_job(job, args, device, report)
    except Exception as error:  # any failure becomes the row's note; the other jobs still run
        report["error"] = f"{type(error).__name__} during {report['stage']}: {describe_error(error)}"
        traceback.print_exc()
    report["wall_s"] = time.perf_counter() - began
    writer.write()
    return report


def describe_error(error: BaseException) -> str:
    """The first line of what went wrong, from the innermost cause that Dynamo wrapped (``BackendCompilerFailed``
    says only "backend='inductor' raised:" on its first line; the compiler's own error comes after); a bare
    AssertionError, as Dynamo raises, has no message: its repr."""
    cause = error
    while getattr(cause, "inner_exception", None) is not None:
        cause = cause.inner_exception
    first_line = str(cause).partition("\n")[0][:300] or repr(cause)
    return first_line if cause is error else f"{type(cause).__name__}: {first_line}"


class _ProgressWriter:
    """Writes the report to a JSON file whenever its stage changes (checked twice a second) and at the end."""

    def __init__(self, report: dict[str, Any], path: str | None) -> None:
        self.report, self.path = report, path

    def write(self) -> bool:
        """Whether the report was written (False: none to write, or the job changed it meanwhile)."""
        if not self.path:
            return False
        try:
            text = json.dumps(self.report, default=str)
        except RuntimeError:  # the job changed the report meanwhile: the next tick writes it
            return False
        partial = Path(f"{self.path}.partial")  # then renamed: a job killed while writing leaves no half file
        partial.write_text(text, encoding="utf-8")
        partial.replace(self.path)
        return True

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        if not self.path:
            yield
            return
        stop = threading.Event()

        def watch() -> None:
            seen = None
            while not stop.wait(0.5):
                stage = self.report.get("stage")
                if stage != seen and self.write():  # (not written: tried again at the next tick)
                    seen = stage

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def run_job_isolated(job: str, argv: list[str], manifest: Path, timeout: float,
                     log: Path | None = None) -> dict[str, Any]:
    """Run one job in a fresh process (its own CUDA context and memory peak) and kill it, with every process it
    started (DataLoader workers, compile workers), after ``timeout`` seconds. Its stderr goes to ``log`` as well (a
    compile error's traceback, which the lent machine's output tail may have lost), and its end into the row."""
    with tempfile.TemporaryDirectory(prefix="spidr-gpu-bench-job-") as scratch:
        result = Path(scratch) / "result.json"
        log = log or Path(scratch) / "stderr.log"
        # The worker stops timing in time to report before it is killed.
        stop_at = time.time() + timeout - max(3.0, 0.1 * timeout)
        command = [sys.executable, __file__, *argv, "--worker", job, "--manifest", str(manifest),
                   "--result", str(result), "--stop-at", f"{stop_at:.3f}"]
        with log.open("ab") as stderr:
            start = stderr.tell()
            stderr.write(f"===== {job} =====\n".encode())
            stderr.flush()
            process = subprocess.Popen(command, start_new_session=True, stderr=stderr)
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                code = None
        report = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else {"stage": "start-up"}
        tail = log.read_bytes()[start:][-STDERR_TAIL_BYTES:].decode("utf-8", "replace")
    sys.stderr.write(tail)  # (as the worker's stderr went before, if shorter)
    report.setdefault("job", job)
    report.setdefault("name", JOBS[job].name)
    if code != 0 and tail:
        report["stderr_tail"] = tail
    return judge_exit(report, code, timeout)


STDERR_TAIL_BYTES = 4000  # of a failed job's stderr, kept in its row of the JSON


def judge_exit(report: dict[str, Any], code: int | None, timeout: float) -> dict[str, Any]:
    """A worker's last report, given how it ended (``code`` None: killed at ``timeout``). A job that had finished
    measuring (stage "done") keeps its row when only its exit ran late (CUDA teardown, compile or loader workers)."""
    if code is None and report.get("stage") == "done" and "error" not in report:
        report["note"] = f"measured, then killed at its {timeout:.0f} s time limit while exiting"
    elif code and report.get("stage") == "done" and "error" not in report:  # a job's own failure sets "error"
        report["note"] = f"measured, then exited with code {code} (teardown)"
    elif code is None:
        report["error"] = f"killed at its {timeout:.0f} s time limit during {report.get('stage')}"
    elif code != 0 and "error" not in report:
        report["error"] = f"worker exited with code {code} during {report.get('stage')} (its stderr is above)"
    return report


def twin_flop_count(job: str, rows: dict[str, dict[str, Any]]) -> float | None:
    """For a compiled job whose eager twin (same model and batches) has counted its FLOPs: that count (GFLOP per
    audio second), for the compiled job to reuse, so that it spends its time limit on compiling and timing, not on
    eager steps; None otherwise."""
    twin = job.removesuffix("-compile")
    return rows.get(twin, {}).get("gflop_per_audio_s_counted") if JOBS[job].compile and twin in JOBS else None


def compile_toolchain_problem() -> str | None:
    """Why inductor cannot compile here, found without compiling: Triton builds its launcher with a C compiler and
    the interpreter's headers, which slim GPU images lack (the error comes only at code generation); None if both
    are there."""
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return "inductor needs a C compiler, and there is none on PATH (cc, gcc, clang or $CC)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return f"inductor needs the interpreter's C headers, and {headers} is missing (python3-dev)"
    return None


def write_corpus_for(args: argparse.Namespace, directory: Path) -> Path:
    began = time.perf_counter()
    manifest = write_corpus(directory, files=args.corpus_files, copies=args.copies, audio_format=args.audio_format)
    print(f"[{time.perf_counter() - began:.1f} s] wrote {args.corpus_files} {args.audio_format} files "
          f"(each listed {args.copies} times) to {directory}", file=sys.stderr)
    return manifest


def run_all(args: argparse.Namespace, argv: list[str],
            publish: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> list[dict[str, Any]]:
    """Every job of ``args.jobs``, in ``RUN_ORDER``, within ``args.deadline`` seconds in all (isolated), or one
    after the other in this process (``--no-isolate``). Rows come back in the table's order; ``publish`` gets the
    rows so far after each job (a run cut short by a wall-clock limit keeps the rows it measured)."""
    began = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="spidr-gpu-bench-corpus-") as directory:
        args.manifest = str(write_corpus_for(args, Path(directory)))
        todo = [job for job in RUN_ORDER if job in args.jobs]
        missing_toolchain = None if args.compile_backend != "inductor" else compile_toolchain_problem()
        for job in [job for job in todo if JOBS[job].compile and missing_toolchain]:
            # (they would fail at code generation, after their share of tracing: their time goes to the others)
            rows[job] = {"job": job, "name": JOBS[job].name, "error": f"not run: {missing_toolchain}"}
            todo.remove(job)
        for i, job in enumerate(todo):
            left = args.deadline - (time.perf_counter() - began)
            share = left * TIME_WEIGHTS[job] / sum(TIME_WEIGHTS[j] for j in todo[i:])
            print(f"[{time.perf_counter() - began:.0f} s] {job}: "
                  f"{f'time limit {share:.0f} s' if args.isolate else 'in this process'}", file=sys.stderr)
            if args.isolate and share < 10:
                rows[job] = {"job": job, "name": JOBS[job].name,
                             "error": f"not run: the {args.deadline:.0f} s deadline left {share:.0f} s"}
                continue
            counted = twin_flop_count(job, rows)
            if args.isolate:
                reuse = ["--counted-gflop", repr(counted)] if counted else []
                # one log for every job: the lent machine brings back at most 8 files from $OUT
                log = Path(f"{args.json.removesuffix('.json')}.log") if args.json else None
                rows[job] = run_job_isolated(job, argv + reuse, Path(args.manifest), share, log)
            else:
                args.stop_at = time.time() + share
                args.counted_gflop = counted
                rows[job] = run_job_here(job, args)
            status = rows[job].get("error") or f"{rows[job]['audio_s_per_s']:.1f} audio-s/s"
            print(f"[{time.perf_counter() - began:.0f} s] {job}: {status}", file=sys.stderr)
            publish([rows[job] for job in JOBS if job in rows])
    return [rows[job] for job in JOBS if job in rows]


def _number(value: float | None, *, percent: bool = False) -> str:
    """Three significant digits without exponents for the usual ranges; '–' for a missing value."""
    if value is None or not math.isfinite(value):
        return "–"
    value = 100 * value if percent else value
    suffix = " %" if percent else ""
    if abs(value) >= 100:
        return f"{value:.0f}{suffix}"
    if abs(value) >= 1:
        return f"{value:.3g}{suffix}"
    return f"{value:.2g}{suffix}"


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown table, with the lines that say what it was measured on and with which constants."""
    done = [row for row in rows if "error" not in row]
    device = done[0].get("device", "?") if done else "?"
    source = args.peak_source
    lines = [
        f"device: {device}; torch {done[0].get('torch', '?') if done else '?'}"
        f"{'; --smoke (tiny model, not the base recipe)' if args.smoke else ''}",
        f"MFU peak: {args.peak_tflops:g} TFLOP/s ({source}); MFU (issue) uses {ISSUE_GFLOP_PER_AUDIO_SECOND} GFLOP "
        "per audio second (base training step), MFU (counted) the FLOPs counted by torch.utils.flop_counter",
        f"model jobs: {args.batches} batches of the training DataLoader, {args.warmup}+ warm-up steps, up to "
        f"{args.steps} timed steps; compile backend {args.compile_backend}",
        "",
        "| job | dtype | audio-s/s per GPU | median step s | audio s per step | MFU (issue) | MFU (counted) | "
        "counted GFLOP/audio-s | peak GPU mem GiB | compile s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            error = row["error"].replace("|", "/")  # a '|' would end the table cell
            lines.append(f"| {row['name']} | – | – | – | – | – | – | – | – | – | failed: {error} |")
            continue
        notes = []
        if row["job"] == "loader":
            notes.append(f"DataLoader workers: {row['workers']}; {row['batches_timed']} intervals timed; first "
                         f"batch after {row['first_batch_s']:.1f} s; median step = time between batches")
        elif row["job"] == "extract":
            fp32, autocast = row["fp32_audio_s_per_s"], row["autocast_audio_s_per_s"]
            notes.append(f"{row['files']} files in {row['batches']} batches of ≤ "
                         f"{ExtractionSettings.batch_seconds:.0f} s, {row['timed_steps']} timed passes; step = the "
                         f"median pass's time per batch; float32 {_number(fp32)} audio-s/s "
                         f"(bf16 {row['audio_s_per_s'] / fp32:.2f}x); all-bf16 autocast {_number(autocast)} "
                         f"({autocast / fp32:.2f}x); features vs float32, largest over files and layers: bf16 "
                         f"{_number(row['bf16_max_relative_error'], percent=True)}, all-bf16 "
                         f"{_number(row['autocast_max_relative_error'], percent=True)}")
            if "kmeans_audio_s_per_s" in row:
                device_rate, host_rate = row["kmeans_audio_s_per_s"], row["kmeans_host_audio_s_per_s"]
                notes.append(f"k-means units of layer {row['kmeans_layer']} ({row['kmeans_units']} centroids) alone, "
                             f"bf16: assigned on the device {_number(device_rate)} audio-s/s, features to the host "
                             f"and float64 there {_number(host_rate)} ({device_rate / host_rate:.2f}x); "
                             f"{_number(row['kmeans_float64_share'], percent=True)} of frames checked in float64; "
                             f"units {'equal' if row['kmeans_units_equal'] else 'DIFFERENT'}")
        else:
            notes.append(f"{row['timed_steps']} steps, {row['rows_per_step']:.1f} rows each")
            if row.get("skipped_steps"):
                notes.append(f"{row['skipped_steps']} steps skipped (non-finite)")
            if row.get("compile") and row.get("graphs_compiled_while_timed"):
                notes.append(f"{row['graphs_compiled_while_timed']} graphs compiled while timed")
            if row.get("peak_mem_kind", "").startswith("process"):
                notes.append("memory: process peak RSS")
            if row.get("counted_by"):
                notes.append(f"FLOPs as counted by {row['counted_by']}")
        if row.get("note"):
            notes.append(row["note"])
        lines.append(
            f"| {row['name']} | {row['dtype']} | {_number(row['audio_s_per_s'])} | {_number(row['median_step_s'])} "
            f"| {_number(row['audio_s_per_step'])} | {_number(row.get('mfu_issue'), percent=True)} "
            f"| {_number(row.get('mfu_counted'), percent=True)} | {_number(row.get('gflop_per_audio_s_counted'))} "
            f"| {_number(row.get('peak_mem_gib'))} | {_number(row['compile_s']) if row.get('compile') else '–'} "
            f"| {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=DEFAULT_JOBS, choices=list(JOBS),
                        help=f"jobs to run (default: all but spidr-channels-last); one of {', '.join(JOBS)}")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model and batches, short runs, compile with the 'eager' backend (for a CPU)")
    parser.add_argument("--batches", type=int, help="distinct training batches cycled by model jobs (8; smoke 2)")
    parser.add_argument("--warmup", type=int,
                        help="untimed steps first (8; smoke 1); compiled jobs take at least one per batch")
    parser.add_argument("--steps", type=int, help="timed steps at most (24; smoke 2)")
    parser.add_argument("--loader-batches", type=int, default=0,
                        help="batches the loader job reads (0: one epoch of the corpus)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak, the MFU denominator (default: by the GPU's name, e.g. 989 "
                        "for H100/H200 SXM, 756 for H100 PCIe; 989 for an unknown card)")
    parser.add_argument("--deadline", type=float, help="seconds for all jobs together (270; smoke 120)")
    parser.add_argument("--compile-backend", help="torch.compile backend of the compiled jobs (inductor; smoke "
                        "eager)")
    parser.add_argument("--corpus-files", type=int, help="distinct synthetic audio files (160; smoke 8)")
    parser.add_argument("--copies", type=int, help="manifest rows per file (8; smoke 2)")
    parser.add_argument("--audio-format", default="wav", choices=["wav", "flac"],
                        help="file format of the synthetic corpus (LibriSpeech itself is FLAC)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each job in its own process with a time limit (default; --smoke: no)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (0: torch's default; smoke 1, which a shared CPU slows least)")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    # Set by the parent for a worker process.
    parser.add_argument("--worker", choices=list(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=float, default=math.inf, help=argparse.SUPPRESS)  # time.time() value
    parser.add_argument("--counted-gflop", type=float, help=argparse.SUPPRESS)  # twin_flop_count
    args = parser.parse_args(argv)
    defaults = {"batches": (8, 2), "warmup": (8, 1), "steps": (24, 2), "deadline": (270.0, 120.0),
                "compile_backend": ("inductor", "eager"), "corpus_files": (160, 8), "copies": (8, 2),
                "isolate": (True, False), "threads": (0, 1)}
    for name, (full, smoke) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.peak_tflops is None:
        args.peak_tflops, args.peak_source = peak_for(torch.cuda.get_device_name() if torch.cuda.is_available()
                                                      else "")
    else:
        args.peak_source = "given with --peak-tflops"
    return args


def peak_for(device_name: str) -> tuple[float, str]:
    """The dense bf16 peak (TFLOP/s) of a GPU named ``device_name``, and how it was chosen."""
    for part, peak in PEAK_TFLOPS_BY_NAME:
        if part in device_name:
            return peak, f"dense bf16 of {part}, by the device name"
    return DEFAULT_PEAK_TFLOPS, f"assumed: {device_name or 'no GPU'} is not a known card; H100/H200 SXM dense bf16"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:  # a child process: one job, its report in args.result
        report = run_job_here(args.worker, args)
        return 1 if "error" in report else 0
    if not args.smoke and not torch.cuda.is_available():  # (the base jobs would run out of time on a CPU)
        print(f"gpu.py: {sys.executable} has no usable CUDA (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}): give the GPU image's Python with PYTHON=..., or pass --smoke for a CPU run",
              file=sys.stderr)
        return 3
    def publish(rows: list[dict[str, Any]], *, final: bool = False) -> None:
        """The table so far to the JSON after each job (``"complete": false``; a run killed at a wall-clock limit
        keeps what it measured, and $OUT comes back from a lent machine even then); at the end to stdout too."""
        table = format_table(rows, args)
        if final:
            print(table)
        if args.json:
            settings = {k: v for k, v in vars(args).items() if k not in ("worker", "manifest", "result", "stop_at")}
            partial = Path(f"{args.json}.partial")  # renamed: a run killed while writing keeps the previous file
            partial.write_text(json.dumps({
                "peak_tflops": args.peak_tflops,
                "issue_gflop_per_audio_second": ISSUE_GFLOP_PER_AUDIO_SECOND,
                "settings": settings,
                "complete": final,
                "table": table,
                "jobs": rows,
            }, indent=1, default=str) + "\n", encoding="utf-8")
            partial.replace(args.json)

    publish(run_all(args, argv, publish), final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
