"""The training loop: ``train(cfg)`` sets a run up and drives ``train_step``, the one place where the order of
operations of a step lives (spec §4.8):

forward under autocast (per micro-batch) → global masked-frame count → loss = sum × world / count → backward →
clip → NaN/Inf guard → optimizer step → zero grads → scheduler step → step += 1 → teacher EMA (``update_ema``).

The codebooks are updated inside the training-mode forward (online clustering, spec §3.10), which is why a
skipped step restores them from a snapshot taken before the forward.

``run.host_sync`` says when the host reads a step's NaN/Inf verdict and metrics: after every step ("step", the
CPU default), or only at log and checkpoint steps ("log", the CUDA default), the verdict then gating the update on
the device so that the GPU never waits for the host in between.

Resume is exact: a checkpoint holds the model (teacher and codebooks included), optimizer, scheduler, scaler, step,
every rank's sampler position and RNG states; the data pipeline derives crops and masks from (seed, epoch, the
batch's place in the epoch's plan). A run killed at any point and resumed from its latest checkpoint replays the
same steps and ends, on CPU, bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spidr.config import Config, ModelConfig, OptimizerConfig, unused_settings
from spidr.data import SAMPLE_RATE
from spidr.data.loader import build_dataloader
from spidr.distributed import RaisedOnEveryRankError, all_reduce_sum, world_size
from spidr.models.build import build_model
from spidr.models.dinosr import DinoSR
from spidr.seeding import rank_seed
from spidr.train.checkpoint import (
    Checkpointer,
    capture_rng_state,
    int_tensor,
    read_int,
    restore_rng_state,
)
from spidr.train.environment import (
    DistributedEnvironment,
    broadcast_from_main,
    check_same_config,
    destroy_distributed_after,
    detect_environment,
    gather_to_all,
    init_distributed,
    resolve_device,
)
from spidr.train.memory import install_heap_trim
from spidr.train.metrics import METRICS_FILE, MetricsLogger, RunningMeans, read_metrics
from spidr.train.optim import build_optimizer, build_scheduler, remove_frozen_group
from spidr.train.precision import Precision, resolve_precision
from spidr.train.runtime import (
    STOP_POLL_STEPS,
    StopFlag,
    configured_numerics,
    hold_run_folder,
    load_resumed_weights,
    seed_everything,
    write_config,
)
from spidr.train.validate import validate

logger = logging.getLogger(__name__)

Outcome = Literal["completed", "interrupted"]


class TrainingDivergedError(RaisedOnEveryRankError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient (a checkpoint was saved first)."""


@dataclass
class StepOutput:
    """What one optimizer step reports (all values global over ranks).

    ``values`` stays on the device until read: the first access to ``skipped``, ``stop_requested`` or ``metrics``
    (or :func:`read_step_outputs` for several steps at once) copies it to the host, which waits for the device.
    """

    values: torch.Tensor  # (7 + M,) fp64: loss sum, ranks non-finite, ranks stopping, grad norm, frames, samples,
    # utterances, then the forward's packed metrics (_pack_metrics)
    lr: float  # the learning rate of this step (group 0)
    ema_decay: float | None  # the teacher's decay after it; None when the step was skipped on the host
    _host: list[float] | None = None

    def _read(self) -> list[float]:
        if self._host is None:
            self._host = self.values.tolist()
        return self._host

    @property
    def skipped(self) -> bool:
        """A non-finite loss or gradient on some rank: nothing was updated."""
        return self._read()[1] > 0

    @property
    def stop_requested(self) -> bool:
        """Some rank received a stop signal before this step."""
        return self._read()[2] > 0

    @property
    def metrics(self) -> dict[str, float | list[float]]:
        """loss (global per-frame mean), grad_norm, lr, num_frames, audio_seconds, batch_size, the model's
        metrics, and ema_decay when the teacher was updated."""
        loss_sum, _, _, norm, frames, samples, utterances = self._read()[:7]
        out: dict[str, float | list[float]] = {
            "loss": loss_sum / frames if frames else math.nan, "grad_norm": norm, "lr": self.lr, "num_frames": frames,
            "audio_seconds": samples / SAMPLE_RATE, "batch_size": utterances, **_unpack_metrics(self._read()[7:]),
        }
        if self.ema_decay is not None:
            out["ema_decay"] = self.ema_decay
        return out


def read_step_outputs(outputs: Sequence[StepOutput]) -> None:
    """Copy the values of several steps to the host at once: one wait for the device instead of one per step."""
    pending = [out for out in outputs if out._host is None]
    if pending:
        for out, host in zip(pending, torch.stack([out.values for out in pending]).tolist(), strict=True):
            out._host = host


# --------------------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------------------


def train_step(
    model: nn.Module,
    batches: Sequence[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    step: int,
    precision: Precision,
    scaler: torch.amp.GradScaler | None,
    max_norm: float,
    stop_requested: bool = False,
    skip_on_device: bool = False,
) -> StepOutput:
    """One optimizer step over the micro-batches ``batches`` of this rank (``optimizer.grad_accum_steps`` of them).

    ``model`` may be wrapped in DistributedDataParallel; ``step`` is the number of optimizer steps done so far,
    and the teacher is moved with ``update_ema(step + 1)``. ``stop_requested`` is this rank's stop flag, agreed
    with the other ranks in the step's last collective.

    A step whose loss or gradient is non-finite on some rank updates nothing (weights, AdamW state, codebooks,
    teacher). By default the host reads that verdict (one synchronisation) and returns early: the step is not
    counted. With ``skip_on_device`` (fused AdamW, no GradScaler) nothing is read: the verdict gates every update
    on the device, and the scheduler and ``update_ema(step + 1)`` advance as for any step (``run.host_sync``).
    """
    if skip_on_device and scaler is not None:
        raise ValueError("skip_on_device needs a step without a GradScaler (float16 training uses one)")
    raw = unwrap(model)
    world = world_size()
    # Codebooks move inside the forward; keep a copy so that a skipped step leaves them untouched.
    codebooks = [(buffer, buffer.clone()) for name, buffer in raw.named_buffers() if name.startswith("codebooks.")]

    # Global masked-frame count over micro-batches and ranks, needed before the first backward. Counts stay on
    # the device. Constants are made with new_full (a fill on the device): new_tensor copies from pageable host
    # memory, and on CUDA that copy waits for every queued kernel, a host-device sync at each step.
    totals = all_reduce_sum(torch.stack([
        torch.stack([b.mask.sum(), b.lengths.sum(), b.lengths.new_full((), len(b))]) for b in batches
    ]).sum(0).double())  # (masked frames, audio samples, utterances)
    num_frames = totals[0]

    loss_sum = totals.new_zeros(())
    metric_sums = None
    # Micro-batches move the codebooks once, at the end, as that many ranks would: each is labelled by the step's
    # codebooks (one micro-batch keeps the forward's own update, the path torch.compile's graph was traced on).
    pooled = raw.codebook_updates_pooled() if len(batches) > 1 else contextlib.nullcontext()
    with pooled:
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # DDP averages gradients only on the final micro-batch; earlier ones accumulate locally.
            sync = (contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel)
                    else model.no_sync())
            with sync:
                with precision.autocast():
                    losses, metrics = model(batch.waveforms, mask=batch.mask, padding_mask=batch.padding_mask,
                                            mask_count=batch.mask_count)
                # DDP averages over ranks, so × world makes the gradient that of the global per-frame mean.
                loss = losses.float().sum() * world / num_frames
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += losses.detach().double().sum()
            # The step's metrics come from the sums of all its frames: a perplexity of means, not a mean of them.
            sums = metrics["metric_sums"]
            metric_sums = sums if metric_sums is None else metric_sums + sums

    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)

    # NaN/Inf guard: every rank takes the same decision, from one all-reduce. A step with no masked frame on any
    # rank (possible with masking.min_masks = 0) has no loss to learn from: skipped too.
    nonfinite = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)) | (num_frames == 0)
    flags = all_reduce_sum(torch.stack([loss_sum, nonfinite.double(), loss_sum.new_full((), float(stop_requested))]))
    step_metrics = _pack_metrics(raw.metrics_from_sums(metric_sums))
    output = StepOutput(torch.cat([flags, grad_norm.double().reshape(1), totals, step_metrics]),
                        lr=optimizer.param_groups[0]["lr"], ema_decay=None)
    # The verdict stays on the device, or the host reads it (with the metrics: the step's one read of the device).
    skipped = flags[1] > 0 if skip_on_device else output.skipped
    output.ema_decay = _update(raw, optimizer, scheduler, scaler, codebooks=codebooks, step=step, skipped=skipped)
    return output


def _update(
    raw: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    *,
    codebooks: list[tuple[torch.Tensor, torch.Tensor]],
    step: int,
    skipped: bool | torch.Tensor,
) -> float | None:
    """The update half of a step, once the gradients are clipped: optimizer, codebooks, scheduler, teacher EMA.

    ``codebooks``: (buffer, its value before the forward) pairs. ``skipped`` is the NaN/Inf verdict: a bool read by
    the host, or a () bool tensor that gates every update on the device with no host read (fused AdamW's
    ``found_inf``). Returns the teacher's EMA decay, None when the host skipped the step.
    """
    if isinstance(skipped, torch.Tensor):
        for buffer, before in codebooks:
            buffer.copy_(torch.where(skipped, before, buffer))
        if step == 0 and bool(skipped):  # one read, at the first step only
            raw.redo_codebook_init()
        optimizer.found_inf = skipped.float()  # fused AdamW then leaves weights, moments and step count alone
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return float(raw.update_ema(step + 1, skipped=skipped))
    if skipped:
        optimizer.zero_grad(set_to_none=True)
        for buffer, before in codebooks:
            buffer.copy_(before)
        if step == 0:
            raw.redo_codebook_init()
        if scaler is not None:
            scaler.update()  # lowers the float16 loss scale after an overflow
        return None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(raw.update_ema(step + 1))


PER_CODEBOOK = ("loss_per_codebook", "target_ppl_per_codebook", "pred_ppl_per_codebook", "active_codewords")


def _pack_metrics(metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """The forward's logged metrics as one fp64 vector: target_ppl, pred_ppl, then the (K,) per-codebook ones."""
    return torch.cat([metrics["target_ppl"].reshape(1), metrics["pred_ppl"].reshape(1),
                      *(metrics[name].reshape(-1) for name in PER_CODEBOOK)]).double()


def _unpack_metrics(values: list[float]) -> dict[str, float | list[float]]:
    k = (len(values) - 2) // len(PER_CODEBOOK)
    out: dict[str, float | list[float]] = {"target_ppl": values[0], "pred_ppl": values[1]}
    for i, name in enumerate(PER_CODEBOOK):
        out[name] = values[2 + i * k : 2 + (i + 1) * k]
    return out


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


class _Interval:
    """Running means of the taken steps' metrics over one logging interval, with its audio and skipped steps.

    A checkpoint inside an interval keeps its means and skipped count (``state_dict``), so that the record a
    resumed run logs at the interval's end is the uninterrupted run's; throughput counts the audio since the resume.
    """

    def __init__(self) -> None:
        self.means = RunningMeans()
        self._reset()

    def _reset(self) -> None:
        self.means.reset()
        self.start, self.audio, self.skipped = time.perf_counter(), 0.0, 0

    def add(self, output: StepOutput) -> None:
        if output.skipped:
            self.skipped += 1
            return
        metrics = output.metrics  # built from the host copy on each access
        self.means.add({k: v for k, v in metrics.items() if k not in ("lr", "ema_decay")})
        self.audio += float(metrics["audio_seconds"])

    def restart_clock(self) -> None:
        """Time throughput from now (the first step), not from set-up, step 0's checkpoint or validation."""
        self.start, self.audio = time.perf_counter(), 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means.load_state_dict(state["means"])
        self.skipped = int(state["skipped"])

    def close(self, *, lr: float, ema_decay: float | None, epoch: int) -> dict[str, Any]:
        """The interval's record (means, the last step's lr and EMA decay, throughput), then start a new one."""
        elapsed = time.perf_counter() - self.start
        values = {**self.means.means(), "lr": lr, "ema_decay": ema_decay, "epoch": epoch,
                  "audio_seconds_per_s": self.audio / max(elapsed, 1e-9), "skipped_steps": self.skipped}
        self._reset()
        return values


@dataclass
class _Run:
    """What a run's steps change, and what a checkpoint saves of it."""

    cfg: Config
    model: nn.Module  # unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    sampler: Any
    loader: Any  # the training loader (its bad-file tally and epoch state)
    step: int = 0
    nonfinite_streak: int = 0
    interval: _Interval = field(default_factory=_Interval)  # the logging interval so far

    def state(self) -> dict[str, Any]:
        """Everything an exact resume needs (collective: gathers every rank's sampler, loader and RNG states)."""
        return _training_state(self.cfg, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               scaler=self.scaler, sampler=self.sampler, loader=self.loader, step=self.step,
                               nonfinite_streak=self.nonfinite_streak, interval=self.interval)


def train(cfg: Config) -> Outcome:
    """Pretrain ``cfg.model`` on ``cfg.data`` until ``cfg.optimizer.max_steps``, resuming from the latest complete
    checkpoint in ``cfg.run.run_dir`` if there is one.

    Returns "completed", or "interrupted" when a stop signal arrived (a checkpoint was saved first). Raises
    ``TrainingDivergedError`` after ``run.max_consecutive_nonfinite`` non-finite steps in a row.
    """
    _check_initial_weights_exist(cfg)
    denv = detect_environment()
    if cfg.run.use_deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    device = resolve_device(cfg.run.device, denv)
    init_distributed(denv, device)
    with contextlib.ExitStack() as cleanup:
        # After an error on one rank, the others may never reach a barrier: tear down without one.
        cleanup.push(lambda error_type, *_: destroy_distributed_after(error_type))
        check_same_config(cfg.to_dict())
        hold_run_folder(cfg.run.run_dir, cleanup, is_main=denv.is_main)
        cleanup.enter_context(configured_numerics(device, deterministic=cfg.run.use_deterministic))
        if denv.is_main:
            for note in unused_settings(cfg):
                logger.warning("%s", note)

        # Identical initial weights on every rank (seeded with the run seed), then one RNG stream per rank.
        torch.manual_seed(cfg.run.random_seed)
        raw_model = build_model(cfg.model).to(device)
        seed_everything(rank_seed(cfg.run.random_seed, denv.rank))
        precision = resolve_precision(cfg.optimizer.dtype, device)
        install_heap_trim(raw_model, cfg.run.trim_heap, precision)
        loader, sampler = build_dataloader(
            cfg.data, cfg.masking, conv_layers=cfg.model.extractor_conv_layer_config,
            rank=denv.rank, world_size=denv.world_size,
        )
        # Before the run folder is touched: a validation set that cannot be read refuses the start with the folder
        # as it was (config.json, event files and metrics records were rewritten first)
        validation = _validation_loaders(cfg, denv)
        for data_loader in (loader, *validation.values()):  # workers that ignore SIGTERM must be stopped by us
            cleanup.callback(data_loader.close)
        checkpointer = Checkpointer(cfg.run.run_dir, save_interval=cfg.run.save_interval,
                                    keep_latest=cfg.run.keep_latest)
        run, fresh = _start_or_resume(cfg, raw_model, sampler=sampler, loader=loader, scaler=precision.make_scaler(),
                                      checkpointer=checkpointer, denv=denv, device=device)
        if denv.is_main:  # once the run is known to be this config's (a refused resume leaves the old one)
            write_config(cfg.to_dict(), cfg.run.run_dir)
            # run.model_type defaults to "dinosr" (the official schema's default): say which model this is
            # (the parameters that train: the student's; the EMA teacher is a copy, as `spidr info` counts them)
            logger.info("%s %s (run.model_type = %r; %.3g M trained parameters, %d codebooks of %d) at step %d in "
                        "%s; %s on %s x %d", "starting" if fresh else "resuming",
                        {"spidr": "SpidR", "dinosr": "DinoSR"}[cfg.run.model_type], cfg.run.model_type,
                        sum(p.numel() for p in raw_model.parameters() if p.requires_grad) / 1e6,
                        cfg.model.num_codebooks, cfg.model.codebook_size, run.step, cfg.run.run_dir, precision.name,
                        device, denv.world_size)

        metrics_logger = MetricsLogger.for_pretraining(cfg, enabled=denv.is_main, start_step=run.step, fresh=fresh)
        cleanup.callback(metrics_logger.close)

        def save(*, final: bool = False) -> None:
            state = run.state()  # collective; only the main rank writes
            if denv.is_main:
                checkpointer.save(state, step=None if final else run.step)

        def run_validation(names: Sequence[str] | None = None) -> bool:
            """Validate on ``names`` (None: every set); False when the stop signal cut it short (a data worker died
            of it): then the run stops at this step, whose checkpoint is saved, and validates it on resume."""
            return all(_validate_and_log(raw_model, val_loader, name, step=run.step, stop=stop, device=device,
                                         precision=precision, metrics_logger=metrics_logger)
                       for name, val_loader in validation.items() if names is None or name in names)

        # From here a stop signal is a request (a SIGTERM during the first validation killed the run with status 143
        # and no word); earlier, during the rendezvous and set-up, it still ends the process at once.
        stop = StopFlag()
        cleanup.enter_context(stop.installed())
        if fresh:
            save()  # step_0.pt: the exact initial state, before any wrapper
        unlogged = None if fresh else _unlogged_validations(run.step, cfg, checkpointer, denv)
        if unlogged:  # the last run stopped between writing the checkpoint and logging its validation
            logger.info("validating step %d, whose checkpoint has no %s record", run.step, ", ".join(unlogged))
        if not run_validation(unlogged):  # a fresh run's every set; a resumed one's unlogged sets (or none)
            return "interrupted"
        if run.step >= cfg.optimizer.max_steps:
            logger.info("step %d >= optimizer.max_steps = %d: nothing to do", run.step, cfg.optimizer.max_steps)
            if not checkpointer.path_for(None).is_file():  # a run that went on past its final.pt, then back
                save(final=True)
            elif denv.is_main:
                checkpointer.purge_after_final()
            return "completed"
        return _steps(run, _wrap(raw_model, cfg, denv, device), loader, stop=stop, precision=precision,
                      device=device, checkpointer=checkpointer, metrics_logger=metrics_logger, save=save,
                      run_validation=run_validation,
                      skip_on_device=skips_on_device(cfg.run.host_sync, device, scaler=run.scaler))


def _unlogged_validations(step: int, cfg: Config, checkpointer: Checkpointer,
                          denv: DistributedEnvironment) -> list[str]:
    """The validation sets an uninterrupted run logs at ``step`` (step 0, every checkpoint step, the last step)
    whose record ``metrics.jsonl`` lacks, as rank 0 reads it (every rank validates them: a collective)."""
    validated = step in (0, cfg.optimizer.max_steps) or (
        checkpointer.should_save(step) and step < cfg.optimizer.max_steps)
    return broadcast_from_main(unlogged_validations(cfg, step) if denv.is_main and validated else [])


def unlogged_validations(cfg: Config, step: int) -> list[str]:
    """The validation sets of ``cfg`` that ``metrics.jsonl`` holds no record of at ``step``: at the last step, what
    a kill between writing ``final.pt`` and logging its validation leaves out (``train`` logs it when run again)."""
    path = cfg.run.run_dir / METRICS_FILE
    if not cfg.validation:
        return []
    logged = {r["group"] for r in read_metrics(path) if r.get("step") == step} if path.is_file() else set()
    return [name for name in cfg.validation if name not in logged]


def skips_on_device(host_sync: str, device: torch.device, *, scaler: torch.amp.GradScaler | None) -> bool:
    """Whether ``run.host_sync`` asks the steps to skip non-finite updates on the device ("log"), which needs a
    step without a GradScaler; "auto" picks it on CUDA, where every host read stalls the GPU."""
    if host_sync == "log" and scaler is not None:
        raise ValueError("run.host_sync = 'log' needs bfloat16 or float32 training: optimizer.dtype = 'float16' "
                         "uses a GradScaler, whose skips the host must read; use run.host_sync = 'step' or 'auto'")
    if host_sync == "auto":
        return device.type == "cuda" and scaler is None
    return host_sync == "log"


def _start_or_resume(
    cfg: Config,
    model: nn.Module,
    *,
    sampler: Any,
    loader: Any,
    scaler: torch.amp.GradScaler | None,
    checkpointer: Checkpointer,
    denv: DistributedEnvironment,
    device: torch.device,
) -> tuple[_Run, bool]:
    """A fresh run (initial weights, new optimizer), or the state of the latest checkpoint; and whether fresh."""
    if cfg.run.init_ckpt is not None and isinstance(model, DinoSR):  # started from loaded codebooks, or resumes so
        model.keep_loaded_codebooks()
    latest = _load_agreed_checkpoint(checkpointer, denv)
    if latest is None:
        _load_initial_weights(model, cfg.run.init_ckpt, cfg.model)
        optimizer = build_optimizer(model, cfg.optimizer, device=device)
        return _Run(cfg, model, optimizer, build_scheduler(optimizer, cfg.optimizer), scaler, sampler, loader), True
    path, state = latest
    logger.info("resuming from %s", path)
    load_resumed_weights(model, state["model"], saved_config=state.get("config") or {}, config=cfg.to_dict(),
                         path=path)
    if int(model.current_step) >= cfg.model.freeze_step:
        model.freeze_feature_encoder()
    if state.get("codebook_init_due", False):  # the skipped first step's data init is still to be done
        model.redo_codebook_init()
    # Rebuild the optimizer with the groups it was saved with (group 1 may already be removed).
    with_frozen = len(state["optimizer"]["param_groups"]) > 1
    optimizer = build_optimizer(model, cfg.optimizer, device=device, include_frozen=with_frozen)
    scheduler = build_scheduler(optimizer, cfg.optimizer)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if denv.is_main:
        _warn_about_kept_optimizer_settings(cfg.optimizer, scheduler.base_lrs, optimizer.param_groups[0])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _restore_rank_state(state, sampler, loader, denv)
    run = _Run(cfg, model, optimizer, scheduler, scaler, sampler, loader, step=read_int(state["step"]),
               nonfinite_streak=int(state.get("nonfinite_streak", 0)))
    if "log_interval" in state:  # the means of the logging interval the checkpoint was saved in
        run.interval.load_state_dict(state["log_interval"])
    return run, False


def _steps(  # noqa: PLR0912 -- the step loop on one screen, in order
    run: _Run,
    model: nn.Module,
    loader: Any,
    *,
    stop: StopFlag,
    precision: Precision,
    device: torch.device,
    checkpointer: Checkpointer,
    metrics_logger: MetricsLogger,
    save: Callable[..., None],
    run_validation: Callable[[], bool],
    skip_on_device: bool,
) -> Outcome:
    """The step loop up to ``optimizer.max_steps``: train steps, NaN/Inf streaks, logging, checkpoints, validation
    and stop signals. ``model`` is the (possibly DDP-wrapped) model whose unwrapped module is ``run.model``.

    With ``skip_on_device`` (``run.host_sync = "log"``) every step counts and the host reads the steps' guards and
    metrics only where it must act: at log and checkpoint steps, at the last step, and (with one process) when a
    stop signal arrived; a streak of non-finite steps and other ranks' stop signals are noticed there.
    """
    cfg = run.cfg
    batches = _batches(loader)
    interval = run.interval
    interval.restart_clock()
    unread: list[StepOutput] = []  # skip_on_device: the steps the host has not read yet
    while run.step < cfg.optimizer.max_steps:
        if run.step >= cfg.model.freeze_step and len(run.optimizer.param_groups) > 1:
            remove_frozen_group(run.optimizer, run.scheduler)  # the extractor froze in update_ema (spec §4.7)
        micro_batches = _read_micro_batches(batches, run, loader, stop=stop, device=device)
        if micro_batches is None:  # a data worker died of the stop signal: save before this step, as for it
            return _stop_before_step(run, unread, interval=interval, save=save)
        out = train_step(
            model, micro_batches, run.optimizer, run.scheduler, step=run.step, precision=precision,
            scaler=run.scaler, max_norm=cfg.optimizer.max_norm, stop_requested=stop.requested,
            skip_on_device=skip_on_device,
        )
        # A single process acts on its own stop signal at once; with several, the step's collective agrees on it,
        # and the host reads that agreement at least every STOP_POLL_STEPS steps (only at log steps, a stop came
        # too late: torchrun kills its workers 30 s after forwarding the signal, and nothing was saved).
        stop_here = skip_on_device and stop.requested and world_size() == 1
        if skip_on_device:
            run.step += 1
            unread.append(out)
            if not (run.step % cfg.run.log_interval == 0 or run.step == cfg.optimizer.max_steps
                    or checkpointer.should_save(run.step) or stop_here
                    or (world_size() > 1 and run.step % STOP_POLL_STEPS == 0)):
                continue
            read_step_outputs(unread)
            outputs, unread = unread, []
            _account(run, outputs, first_step=run.step - len(outputs) + 1, interval=interval, save=save)
        else:
            outputs = [out]
            _account(run, outputs, first_step=run.step + 1, interval=interval, save=save)
            if out.skipped:
                if out.stop_requested:
                    save()
                    logger.info("stopped by a signal at step %d; checkpoint saved", run.step)
                    return "interrupted"
                continue
            run.step += 1
        saved = cut_short = False
        if run.step % cfg.run.log_interval == 0 or run.step == cfg.optimizer.max_steps:
            values = interval.close(lr=out.lr, ema_decay=out.ema_decay, epoch=run.sampler.epoch)
            metrics_logger.log(run.step, "train", values)
            metrics_logger.progress(run.step, {"loss": values.get("loss", math.nan), "lr": values["lr"],
                                               "audio_s/s": values["audio_seconds_per_s"]})
            loader.tracker.check_across_ranks(device)  # every rank is here: they stop together on bad files
        if checkpointer.should_save(run.step) and run.step < cfg.optimizer.max_steps:
            save()
            saved = True
            cut_short = not run_validation()
        if stop_here or cut_short or any(output.stop_requested for output in outputs):
            if not saved:
                save()
            logger.info("stopped by a signal at step %d; checkpoint saved", run.step)
            return "interrupted"
    save(final=True)
    run_validation()  # the last step is never validated in the loop (its save is final.pt, here)
    if stop.requested:
        # The signal came during the last step, save or validation: the run is complete, but whoever called it (the
        # demo, a curve point, a SLURM job) must stop, not go on to its next stage with the signal ignored.
        logger.info("training complete at step %d, and stopping as the signal asked", run.step)
        return "interrupted"
    return "completed"


def _account(run: _Run, outputs: Sequence[StepOutput], *, first_step: int, interval: _Interval,
             save: Callable[..., None]) -> None:
    """Read steps ``first_step``, ``first_step + 1``, ... into the interval and the run's non-finite streak. A streak
    that reached ``run.max_consecutive_nonfinite`` among them saves a checkpoint and raises
    ``TrainingDivergedError`` (read at log steps only, the run may have gone on past it: every step is read first)."""
    limit = run.cfg.run.max_consecutive_nonfinite
    longest = 0
    for number, output in enumerate(outputs, start=first_step):
        interval.add(output)
        if not output.skipped:
            run.nonfinite_streak = 0
            continue
        run.nonfinite_streak += 1
        longest = max(longest, run.nonfinite_streak)
        metrics = output.metrics
        why = ("no masked frame in the batch (its rows are cropped to very few frames, or masking.min_masks = 0)"
               if metrics["num_frames"] == 0 else
               f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']})")
        logger.warning("step %d: %s; step skipped (%d in a row)", number, why, run.nonfinite_streak)
    if longest >= limit:
        save()
        raise TrainingDivergedError(
            f"{longest} consecutive steps had a non-finite loss or gradient (limit run.max_consecutive_nonfinite = "
            f"{limit}); stopped at step {run.step} with a checkpoint in {run.cfg.run.run_dir}"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DistributedDataParallel wrapper (``torch.compile`` is applied in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# --------------------------------------------------------------------------------------------------------------
# Set-up helpers, in the order ``train`` uses them
# --------------------------------------------------------------------------------------------------------------


def _check_initial_weights_exist(cfg: Config) -> None:
    """A fresh run's ``run.init_ckpt`` must exist: refused before the run folder is made (it was left holding only
    its lock file). A run with checkpoints resumes from them and never reads it."""
    init = cfg.run.init_ckpt
    if init is not None and not Path(init).exists() and not Checkpointer(cfg.run.run_dir,
                                                                           save_interval=1).checkpoints():
        raise ValueError(f"run.init_ckpt = {init!r} does not exist")


def _load_initial_weights(model: nn.Module, path: str | None, model_cfg: ModelConfig) -> None:
    """``run.init_ckpt``: start a fresh run from the weights of a checkpoint that ``spidr.load_model`` reads (a
    training checkpoint, an official file, a ``.safetensors`` export), read as the run's ``[model]``."""
    from spidr.models.loading import NeedsTrustError, read_checkpoint

    if path is None:
        return  # (that it exists was checked before the run folder was made: _check_initial_weights_exist)
    try:
        checkpoint = read_checkpoint(path, config=model_cfg, config_of_any_type=True)
    except NeedsTrustError:  # a fairseq file: the trainer takes no --trust, and an export reads it once
        raise ValueError(f"run.init_ckpt = {path!r} holds pickled Python objects besides tensors (a fairseq "
                         "checkpoint's config): convert it once with 'spidr export FILE OUT.safetensors --trust' and "
                         "start from OUT.safetensors") from None
    except ValueError as error:
        raise ValueError(f"run.init_ckpt = {path!r}: {error}") from None
    if checkpoint.student_only:
        raise ValueError(f"run.init_ckpt = {path!r} holds only an exported student (no teacher, heads or codebooks): "
                         "training starts from a whole model's checkpoint")
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as error:
        raise ValueError(f"run.init_ckpt = {path!r} does not fit the [model] config: {error}") from error
    model.current_step.zero_()  # a new run: schedules restart from step 0
    logger.info("initialised the model from %s", path)


def _load_agreed_checkpoint(
    checkpointer: Checkpointer, denv: DistributedEnvironment
) -> tuple[Path, dict[str, Any]] | None:
    """The latest checkpoint as rank 0 sees it, loaded on every rank. Ranks must agree: one with a stale view of
    a shared file system (a cached directory listing) would otherwise start afresh while the others resume, and
    their collectives would no longer match."""
    latest = checkpointer.load_latest() if denv.is_main else None
    path = broadcast_from_main(None if latest is None else str(latest[0]))
    if path is None or denv.is_main:
        return latest
    return Path(path), torch.load(path, map_location="cpu", weights_only=True)


def _warn_about_kept_optimizer_settings(cfg: OptimizerConfig, base_lrs: Sequence[float],
                                    group: Mapping[str, Any]) -> None:
    """A resumed run keeps the peak learning rates and the AdamW settings of its checkpoint (optimizer and scheduler
    state; ``group``: its first parameter group): say so when the config asks for others."""
    kept = {"optimizer.lr": base_lrs[0], "optimizer.weight_decay": group["weight_decay"],
            "optimizer.eps": group["eps"]}
    kept |= {f"optimizer.betas[{i}]": beta for i, beta in enumerate(group["betas"])}
    if len(base_lrs) > 1:  # the front-end group is still there (before the freeze step)
        kept["optimizer.feature_encoder_lr_scale"] = base_lrs[1] / base_lrs[0]
    asked = {"optimizer.lr": cfg.lr, "optimizer.feature_encoder_lr_scale": cfg.feature_encoder_lr_scale,
             "optimizer.weight_decay": cfg.weight_decay, "optimizer.eps": cfg.eps,
             **{f"optimizer.betas[{i}]": beta for i, beta in enumerate(cfg.betas)}}
    for name, value in kept.items():
        if not math.isclose(float(value), asked[name], rel_tol=1e-9, abs_tol=1e-15):
            logger.warning(
                "%s = %g in the config, but the run resumes from a checkpoint trained with %g: the checkpoint's "
                "optimizer and scheduler state are restored, so %g stays in use. To change it, start a new run "
                "directory from this checkpoint (run.init_ckpt)", name, asked[name], value, value,
            )


def _restore_rank_state(state: dict[str, Any], sampler: Any, loader: Any, denv: DistributedEnvironment) -> None:
    """This rank's sampler position, loader state and RNG states; with another world size only the epoch carries
    over. (Checkpoints from before the loader state was saved restore no bad-file tally.)"""
    per_rank = state["ranks"]
    if len(per_rank) == denv.world_size:
        sampler.load_state_dict(per_rank[denv.rank]["sampler"])
        if "loader" in per_rank[denv.rank]:
            loader.load_state_dict(per_rank[denv.rank]["loader"])
        restore_rng_state(per_rank[denv.rank]["rng"])
        return
    logger.warning("the checkpoint was saved by %d ranks, this run has %d: fresh RNG states and the saved epoch "
                   "restarts (not an exact resume)", len(per_rank), denv.world_size)
    sampler.load_state_dict(per_rank[0]["sampler"])  # the sampler sees the world size changed and restarts


def _training_state(
    cfg: Config,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    sampler: Any,
    loader: Any,
    step: int,
    nonfinite_streak: int,
    interval: _Interval,
) -> dict[str, Any]:
    """Everything an exact resume needs, in weights_only-loadable types (collective over ranks)."""
    ranks = gather_to_all({"sampler": sampler.state_dict(), "loader": loader.state_dict(), "rng": capture_rng_state()})
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int_tensor(step),
        "epoch": int_tensor(sampler.epoch),
        "nonfinite_streak": nonfinite_streak,
        "log_interval": interval.state_dict(),
        "codebook_init_due": model.codebook_init_due,
        "ranks": ranks,
        "config": cfg.to_dict(),
    }


def _validation_loaders(cfg: Config, denv: DistributedEnvironment) -> dict[str, Any]:
    return {
        name: build_dataloader(
            data_cfg, cfg.masking, conv_layers=cfg.model.extractor_conv_layer_config, rank=denv.rank,
            world_size=denv.world_size, deterministic_crops=True, section=f"validation.{name}",
        )[0]
        for name, data_cfg in cfg.validation.items()
    }


def _wrap(model: nn.Module, cfg: Config, denv: DistributedEnvironment, device: torch.device) -> nn.Module:
    """Compile in place (CUDA only) and wrap in DDP when there are several ranks."""
    if cfg.run.compile and device.type == "cuda":
        model.compile(dynamic=True)
    if not denv.is_distributed:
        return model
    # Unused parameters are the rule here: SpidR never uses its last layer's final LayerNorm, DinoSR drops layers,
    # and the extractor stops training at freeze_step. Buffers (codebooks) are broadcast from rank 0 on every
    # forward (DDP's default), a guard on top of the identical all-reduced codebook updates.
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )


def _killed_by_the_stop(error: RuntimeError, stop: StopFlag) -> bool:
    """Whether ``error`` is a data worker's death that the stop signal explains. A worker ignores stop signals
    once it runs (``spidr.data.loader``), but one started by spawn or forkserver (the macOS default, Python 3.14's
    Linux default) takes a second or so to get there, and a signal to the process group in between kills it. With
    one process the run then saves and stops as for the signal alone; with several, the other ranks are in a
    collective, and the error stands (the last checkpoint still resumes exactly)."""
    return stop.requested and world_size() == 1 and str(error).startswith("DataLoader worker")


def _read_micro_batches(batches: Iterator[Any], run: _Run, loader: Any, *, stop: StopFlag,
                        device: torch.device) -> list[Any] | None:
    """The step's ``optimizer.grad_accum_steps`` micro-batches on ``device``; None when a data worker died of the
    stop signal, with the data's position put back before the first of them (a checkpoint then reads them again)."""
    before = _LoaderPosition.of(run.sampler, loader)
    try:
        return [next(batches).to(device, non_blocking=True) for _ in range(run.cfg.optimizer.grad_accum_steps)]
    except RuntimeError as error:
        if not _killed_by_the_stop(error, stop):
            raise
    before.restore(run.sampler, loader)
    return None


def _stop_before_step(run: _Run, unread: list[StepOutput], *, interval: _Interval,
                      save: Callable[..., None]) -> Outcome:
    """Save a checkpoint after the steps taken (those the host has not read yet counted first), and stop."""
    read_step_outputs(unread)
    _account(run, unread, first_step=run.step - len(unread) + 1, interval=interval, save=save)
    save()
    logger.info("stopped by a signal at step %d; checkpoint saved", run.step)
    return "interrupted"


def _validate_and_log(model: nn.Module, loader: Any, name: str, *, step: int, stop: StopFlag, device: torch.device,
                      precision: Precision, metrics_logger: MetricsLogger) -> bool:
    """Validate on ``loader`` and log its scores as ``name``; False (and nothing logged) when a data worker died of
    the stop signal."""
    try:
        scores = validate(model, loader, device=device, precision=precision)
    except RuntimeError as error:
        if not _killed_by_the_stop(error, stop):
            raise
        logger.warning("validation %s at step %d cut short by the stop signal", name, step)
        return False
    metrics_logger.log(step, name, scores)
    loader.tracker.check_across_ranks(device)
    return True


@dataclass(frozen=True)
class _LoaderPosition:
    """Where the training data stood before a step's micro-batches were read: what a checkpoint saved in their
    stead must record for the resume to read them again."""

    epoch: int
    position: int
    yielded_in_epoch: bool
    tally: tuple[int, int, int]  # the bad-file tracker's seen, bad, passes

    @classmethod
    def of(cls, sampler: Any, loader: Any) -> _LoaderPosition:
        tracker = loader.tracker
        return cls(sampler.epoch, sampler.position, loader.yielded_in_epoch,
                   (tracker.seen, tracker.bad, tracker.passes))

    def restore(self, sampler: Any, loader: Any) -> None:
        sampler.epoch, sampler.position, loader.yielded_in_epoch = self.epoch, self.position, self.yielded_in_epoch
        loader.tracker.seen, loader.tracker.bad, loader.tracker.passes = self.tally


def _batches(loader: Any) -> Iterator[Any]:
    """This rank's batches, epoch after epoch (the loader marks each consumed batch for resume).

    Whatever the data pipeline draws from the global torch RNG in this process (a DataLoader without its own
    generator draws worker seeds when an epoch starts) is forked away, so the dropout stream that checkpoints
    save and restore depends only on the training steps taken.
    """
    iterator = iter(loader)
    fresh = not getattr(loader, "yielded_in_epoch", False)  # resumed in an epoch that yielded a batch already
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(iterator, None)
        if batch is None:
            if fresh:
                raise ValueError("the training data yielded no batch in a whole epoch: are all its audio files "
                                 "unreadable or shorter than data.min_sample_size?")
            iterator, fresh = iter(loader), True
            continue
        fresh = False
        yield batch
