"""``spidr lm-train``: train a unit LM with the pretraining loop's guarantees.

``train_lm(cfg)`` reads the unit file(s), holds out a validation split, builds the model from the run seed, and
drives ``lm_train_step``, where the order of a step lives:

forward under autocast (per micro-batch) → cross-entropy (mean over the global batch's targets: units and EOS, not
the BOS after each EOS) → backward → clip → NaN/Inf guard (one all-reduce) → AdamW step → zero grads → scheduler
step.

Exact resume: a checkpoint holds the model, optimizer, scheduler, step and every rank's RNG state, and a step's
windows depend only on (seed, step) (``spidr.lm.data``), so a run killed at any point (even SIGKILL) and resumed from
its latest complete checkpoint ends bitwise identical, on CPU, to one never interrupted. Under torchrun each rank
trains on its slice of the same global batch (DDP, gloo on CPU / NCCL on GPU). An ``ngram`` model is fitted by
counting and saved at once.

The run directory ``<workdir>/<name>`` holds ``step_<N>.pt``, ``final.pt`` (what ``spidr lm-score`` loads),
``config.json`` and ``metrics.jsonl`` (``spidr plot-training`` draws it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spidr.distributed import all_reduce_sum, world_size
from spidr.input_files import existing_file
from spidr.lm.config import LmConfig, LmDataSection, LmModelSection, check_trainable
from spidr.lm.data import WindowSampler, scored_targets, validation_windows
from spidr.lm.models import NgramLM, build_lm, token_log_likelihoods
from spidr.lm.prepared_data import LmData, shared_data
from spidr.lm.tokens import LabelVocabulary, UnitSequences, Vocabulary, read_unit_sequences
from spidr.seeding import rank_seed
from spidr.train.checkpoint import Checkpointer, capture_rng_state, int_tensor, read_int, restore_rng_state
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
from spidr.train.metrics import MetricsLogger, RunningMeans
from spidr.train.optim import adamw_implementation
from spidr.train.precision import Precision, resolve_precision
from spidr.train.runtime import (
    StopFlag,
    configured_numerics,
    hold_run_folder,
    load_resumed_weights,
    seed_everything,
    write_config,
)

logger = logging.getLogger(__name__)

Outcome = Literal["completed", "interrupted"]
CHECKPOINT_KIND = "spidr-unit-lm"  # what every version of the unit-LM checkpoint format starts with
CHECKPOINT_FORMAT = f"{CHECKPOINT_KIND}-1"
IGNORED_TARGET = -100  # a target position that adds nothing to the loss (cross_entropy's ignore_index)
# What a neural LM's loss scores, recorded in its checkpoints: before 2026-12-06 it also scored the BOS after each EOS
# (such checkpoints record nothing), so an LM trained then is not resumed nor reused as one trained now.
LOSS_TARGETS = "units and EOS"


class LmTrainingDivergedError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient (a checkpoint was saved first)."""


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def build_model_for(model_cfg: LmModelSection, vocab_size: int) -> nn.Module:
    m = model_cfg
    return build_lm(m.arch, vocab_size, dim=m.dim, num_layers=m.num_layers, num_heads=m.num_heads,
                    ffn_dim=m.ffn_dim, context=m.context, dropout=m.dropout, activation=m.activation,
                    tie_embeddings=m.tie_embeddings, ngram_order=m.ngram_order, ngram_add_k=m.ngram_add_k)


# --------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------------------------


def lr_scale(step: int, *, warmup_steps: int, max_steps: int, min_lr_scale: float) -> float:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then a cosine from 1 to ``min_lr_scale`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    return min_lr_scale + (1 - min_lr_scale) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: LmConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on every matrix (the token and position embeddings included), none on 1-D tensors
    (biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    o = cfg.optimizer
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=o.betas, eps=o.eps, **adamw_implementation(device),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: LmConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optimizer
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_scale(
        step, warmup_steps=o.warmup_steps, max_steps=o.max_steps, min_lr_scale=o.min_lr_scale))


# --------------------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LmStepOutput:
    skipped: bool
    stop_requested: bool
    loss: float  # global mean cross-entropy per scored target (nats)
    grad_norm: float
    tokens: int  # target positions in the global batch (the throughput's count)
    scored: int  # of which scored: all but the BOS ones


def lm_train_step(model: nn.Module, windows: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, *, precision: Precision, max_norm: float,
                  bos: int | None = None, stop_requested: bool = False) -> LmStepOutput:
    """One optimizer step over this rank's micro-batches ``windows`` [(b, context + 1) int64]: the gradient of the
    mean cross-entropy over every scored target of the global batch (all micro-batches of all ranks). ``bos`` (the
    vocabulary's begin-of-sequence id) is no target, as in validation and scoring: after an EOS it is all but
    certain. Its count differs between micro-batches and ranks, so each part's sum is divided by the global count
    (one all-reduce, no host sync)."""
    world = world_size()
    targets = [batch[:, 1:] if bos is None else batch[:, 1:].masked_fill(batch[:, 1:] == bos, IGNORED_TARGET)
               for batch in windows]
    count = all_reduce_sum(torch.stack([(t != IGNORED_TARGET).sum() for t in targets]).sum().double().reshape(1))
    scale = world / count.clamp(min=1)  # DDP averages the ranks' gradients: × world makes it the global sum
    loss_sum = torch.zeros((), dtype=torch.float64, device=windows[0].device)
    for i, (batch, target) in enumerate(zip(windows, targets, strict=True)):
        sync = (contextlib.nullcontext() if i == len(windows) - 1 or not isinstance(model, DistributedDataParallel)
                else model.no_sync())
        with sync:
            with precision.autocast():
                logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   ignore_index=IGNORED_TARGET, reduction="sum")
            (loss * scale.to(loss.dtype)).backward()
        loss_sum += loss.detach().double()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    nonfinite = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
    flags = all_reduce_sum(torch.stack([loss_sum, nonfinite.double(), loss_sum.new_tensor(float(stop_requested))]))
    total_loss, num_nonfinite, num_stop, scored = torch.cat([flags, count]).tolist()
    tokens = sum(t.numel() for t in targets) * world
    out = LmStepOutput(num_nonfinite > 0, num_stop > 0, total_loss / max(scored, 1), float(grad_norm), tokens,
                       int(scored))
    if out.skipped:
        optimizer.zero_grad(set_to_none=True)
        return out
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return out


@torch.inference_mode()
def validate_lm(model: nn.Module, stream: torch.Tensor, *, context: int, precision: Precision,
                batch_size: int, device: torch.device, bos: int | None = None, max_tokens: int = 0,
                rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Mean per-token cross-entropy and perplexity of ``stream`` in consecutive windows (at most about
    ``max_tokens`` of them when > 0, spread over the stream: ``validation_windows``). ``bos`` (the vocabulary's
    begin-of-sequence id) is no target: after an EOS it is all but certain, and each utterance's counted in lowered
    the loss by about 1/length; units and EOS are what an item's score sums. Collective with ``world_size`` > 1:
    each rank scores its share of the windows and the sums are added over the ranks (every rank gets the result).
    ``stream`` stays where it is (the host's mapped stream): each batch of windows goes to ``device``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for rows in validation_windows(stream, context, batch_size, max_tokens=max_tokens, rank=rank,
                                   world_size=world_size):
        rows = rows.to(device)
        lengths = (rows >= 0).sum(1)
        with precision.autocast():
            values = token_log_likelihoods(model, rows.clamp(min=0), lengths)
        scored = torch.arange(1, rows.shape[1], device=device)[None, :] < lengths[:, None]
        if bos is not None:
            scored &= rows[:, 1:] != bos
        total -= float(values.double()[scored].sum())
        count += int(scored.sum())
    model.train(was_training)
    if world_size > 1:
        total, count = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device)).tolist()
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(count)}


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def train_lm(cfg: LmConfig) -> Outcome:  # noqa: PLR0912, PLR0915 -- the whole run on one screen, in order
    """Train (or resume) the LM of ``cfg`` in ``cfg.run.run_dir``; returns "completed" or "interrupted"."""
    check_trainable(cfg)
    denv = detect_environment()
    device = resolve_device(cfg.run.device, denv)
    init_distributed(denv, device)
    o = cfg.optimizer
    with contextlib.ExitStack() as cleanup:
        cleanup.push(lambda error_type, *_: destroy_distributed_after(error_type))
        check_same_config(cfg.to_dict(), command="lm-train")  # (first: what follows is the same on every rank)
        if o.batch_size % (denv.world_size * o.grad_accum_steps):
            raise ValueError(f"optimizer.batch_size = {o.batch_size} must be a multiple of ranks × grad_accum_steps "
                             f"= {denv.world_size} × {o.grad_accum_steps}")
        run_dir = cfg.run.run_dir
        hold_run_folder(run_dir, cleanup, is_main=denv.is_main)
        cleanup.enter_context(configured_numerics(device, deterministic=cfg.run.use_deterministic))
        data = shared_data(cfg, is_main=denv.is_main)
        if denv.is_main:
            # (what each validation logs as its tokens: the targets of its windows, but the BOS of each utterance)
            scored = scored_targets(data.valid, cfg.model.context, bos=data.vocab.bos,
                                    max_tokens=cfg.data.max_valid_tokens)
            logger.info("unit LM: %d training tokens (%d utterances), %d validation tokens (%d scored), "
                        "vocabulary %d", data.train.numel(), data.info["train_utterances"], data.valid.numel(),
                        scored, data.vocab.size)
        torch.manual_seed(cfg.run.seed)
        raw = build_model_for(cfg.model, data.vocab.size).to(device)
        seed_everything(rank_seed(cfg.run.seed, denv.rank))
        precision = resolve_precision(o.dtype, device, float16=False)
        checkpointer = Checkpointer(run_dir, save_interval=cfg.run.save_interval, keep_latest=cfg.run.keep_latest)
        interval = RunningMeans()  # the logging interval's means, kept by a checkpoint saved inside it
        streak = 0  # non-finite steps in a row, kept by a checkpoint saved inside a streak

        def save(step: int, *, final: bool = False) -> None:
            # Collective: every rank's RNG state goes in; only the main rank writes.
            snapshot = {"format": CHECKPOINT_FORMAT, "model": raw.state_dict(), "config": cfg.to_dict(),
                        "lm": data.info, "loss_targets": LOSS_TARGETS, "step": int_tensor(step),
                        "log_interval": interval.state_dict(),
                        "nonfinite_streak": streak,
                        "ranks": gather_to_all({"rng": capture_rng_state()}),
                        **({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                           if optimizer is not None else {})}
            if denv.is_main:
                checkpointer.save(snapshot, step=None if final else step)

        validation = {"context": cfg.model.context, "precision": precision, "batch_size": o.batch_size,
                      "device": device, "bos": data.vocab.bos, "max_tokens": cfg.data.max_valid_tokens,
                      "rank": denv.rank, "world_size": denv.world_size}

        if isinstance(raw, NgramLM):
            if _ngram_done(checkpointer, data, cfg):
                return "completed"
            if denv.is_main:
                write_config(cfg.to_dict(), run_dir)
            metrics = MetricsLogger(run_dir, enabled=denv.is_main, start_step=0, max_steps=o.max_steps, fresh=True)
            cleanup.callback(metrics.close)
            raw.fit(data.train.to(device))
            optimizer = None
            if data.valid.numel():  # no held-out data (val_fraction = 0): nothing to report, not a perfect score
                metrics.log(o.max_steps, "valid", validate_lm(raw, data.valid, **validation))
            save(o.max_steps, final=True)
            return "completed"

        optimizer = build_optimizer(raw, cfg, device)
        scheduler = build_scheduler(optimizer, cfg)
        step, streak = _resume(checkpointer, denv, data, cfg, model=raw, optimizer=optimizer, scheduler=scheduler,
                       interval=interval)
        if denv.is_main:  # once the run is known to be this config's (a refused resume leaves the old one)
            write_config(cfg.to_dict(), run_dir)
        metrics = MetricsLogger(run_dir, enabled=denv.is_main, start_step=step or 0, max_steps=o.max_steps,
                                fresh=step is None)
        cleanup.callback(metrics.close)
        if step is None:
            step = 0
            save(0)
        elif step >= o.max_steps:  # a finished run: nothing to train, validate or log again
            logger.info("step %d >= optimizer.max_steps = %d: nothing to do", step, o.max_steps)
            if not checkpointer.path_for(None).is_file():  # a run that went on past its final.pt, then back
                save(step, final=True)
            elif denv.is_main:
                checkpointer.purge_after_final()
            return "completed"

        sampler = WindowSampler(data.train, cfg.model.context, o.batch_size, cfg.run.seed)
        model = raw
        if cfg.run.compile and device.type == "cuda":
            model.compile()
        if denv.is_distributed:
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        stop = StopFlag()
        cleanup.enter_context(stop.installed())
        interval_start, interval_tokens = time.perf_counter(), 0  # throughput: since this process started

        def run_validation() -> None:
            if data.valid.numel():
                metrics.log(step, "valid", validate_lm(raw, data.valid, **validation))

        while step < o.max_steps:
            windows = [sampler.windows(step, rank=denv.rank, world_size=denv.world_size, micro=m,
                                       num_micro=o.grad_accum_steps, attempt=streak).to(device, non_blocking=True)
                       for m in range(o.grad_accum_steps)]
            out = lm_train_step(model, windows, optimizer, scheduler, precision=precision, max_norm=o.max_norm,
                                bos=data.vocab.bos, stop_requested=stop.requested)
            if out.skipped:
                streak += 1
                logger.warning("step %d: non-finite loss (%s) or gradient norm (%s); step skipped (%d in a row)",
                               step + 1, out.loss, out.grad_norm, streak)
                if streak >= cfg.run.max_consecutive_nonfinite:
                    save(step)
                    raise LmTrainingDivergedError(f"{streak} consecutive non-finite steps; stopped at step {step}")
            else:
                streak = 0
                step += 1
                interval.add({"loss": out.loss, "grad_norm": out.grad_norm})
                interval_tokens += out.tokens
                if step % cfg.run.log_interval == 0 or step == o.max_steps:
                    elapsed = time.perf_counter() - interval_start
                    values = {**interval.means(), "lr": optimizer.param_groups[0]["lr"],
                              "tokens_per_s": interval_tokens / max(elapsed, 1e-9)}
                    values["ppl"] = math.exp(min(values["loss"], 700.0))
                    metrics.log(step, "train", values)
                    metrics.progress(step, {"loss": values["loss"], "tok/s": values["tokens_per_s"]})
                    interval.reset()
                    interval_start, interval_tokens = time.perf_counter(), 0
                if step % cfg.run.validate_interval == 0 and step < o.max_steps:
                    run_validation()
                if checkpointer.should_save(step) and step < o.max_steps:
                    save(step)
            if out.stop_requested and step < o.max_steps:  # (at the last, the run completes first: below)
                save(step)
                logger.info("stopped by a signal at step %d; checkpoint saved", step)
                return "interrupted"
        run_validation()
        save(step, final=True)
        if out.stop_requested or stop.requested:  # complete, but whoever called it must stop too
            logger.info("training complete at step %d, and stopping as the signal asked", step)
            return "interrupted"
    return "completed"


def _resume(checkpointer: Checkpointer, denv: DistributedEnvironment, data: LmData, cfg: LmConfig, *,
            model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
            interval: RunningMeans) -> tuple[int | None, int]:
    """Load the latest checkpoint rank 0 sees into every rank (with the logging ``interval`` it was saved in);
    returns its step (None for a fresh run) and the non-finite steps in a row it was saved after, so that a
    stop inside a streak does not restart the count toward ``run.max_consecutive_nonfinite``."""
    latest = checkpointer.load_latest() if denv.is_main else None
    path = broadcast_from_main(None if latest is None else str(latest[0]))
    if path is None:
        return None, 0
    saved = latest[1] if latest is not None else torch.load(path, map_location="cpu", weights_only=True)
    _check_resumable(saved, data, path, max_steps=cfg.optimizer.max_steps)
    load_resumed_weights(model, saved["model"], saved_config=saved.get("config") or {}, config=cfg.to_dict(),
                         path=path, sections=("model", "data"), run_name_key="run.name")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if "log_interval" in saved:
        interval.load_state_dict(saved["log_interval"])
    if len(saved["ranks"]) == denv.world_size:
        restore_rng_state(saved["ranks"][denv.rank]["rng"])
    else:
        logger.warning("the checkpoint was saved by %d ranks, this run has %d: fresh dropout RNG states",
                       len(saved["ranks"]), denv.world_size)
    step = read_int(saved["step"])
    logger.info("resuming from %s at step %d", path, step)
    return step, int(saved.get("nonfinite_streak", 0))


# What an n-gram LM's counts and validation depend on (the other model fields are the neural LMs'); the training
# data is compared by its fingerprint, which names the same data by content wherever it lies, the validation data by
# data.valid and (recorded since 2026-12-06) its fingerprint.
_NGRAM_SETTINGS = {"model": ("arch", "ngram_order", "ngram_add_k"),
                   "data": ("valid", "val_fraction", "dedup", "num_units", "max_valid_tokens")}


def _ngram_done(checkpointer: Checkpointer, data: LmData, cfg: LmConfig) -> bool:
    """Whether the run folder holds this n-gram LM already (fitting it again would give the same counts); raises
    when it holds another LM (an LSTM, other n-gram settings, other data), whose config, checkpoint and metrics the
    fit would replace (the token cache of the folder is the data's and was written already)."""
    saved_files = checkpointer.checkpoints()  # (load_latest wants an optimizer state, which an n-gram has not)
    if not saved_files:
        return False
    path = saved_files[-1]
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: named, not replaced
        raise ValueError(f"{path} cannot be read ({error}); delete {path.parent} to fit the n-gram LM there") from None
    old = saved.get("config") if isinstance(saved, dict) else None
    old = old if isinstance(old, dict) else {}
    new = cfg.to_dict()
    defaults = {section: {f.name: f.default for f in dataclasses.fields(kind)}
                for section, kind in (("model", LmModelSection), ("data", LmDataSection))}
    changed = []
    for section, keys in _NGRAM_SETTINGS.items():
        for key in keys:
            before = old.get(section, {}).get(key, defaults[section][key])  # a field added since: its default
            if before != new[section][key]:
                changed.append(f"{section}.{key} ({before!r} → {new[section][key]!r})")
    lm = saved.get("lm") if isinstance(saved, dict) else None
    if not isinstance(lm, dict) or lm.get("train_fingerprint") != data.info["train_fingerprint"]:
        changed.append("the training data")
    elif None not in (lm.get("valid_fingerprint"), data.info.get("valid_fingerprint")) and \
            lm["valid_fingerprint"] != data.info["valid_fingerprint"]:  # (recorded since 2026-12-06)
        changed.append("the validation data")
    if changed:
        raise ValueError(f"{path.parent} holds an LM trained otherwise ({'; '.join(changed)}); fitting this n-gram "
                         "LM there would replace it: choose another run.name, or delete the folder")
    if path.name != "final.pt":
        return False
    logger.info("%s holds this n-gram LM already: nothing to do", path)
    return True


def _check_resumable(saved: dict[str, Any], data: LmData, path: str, *, max_steps: int) -> None:
    if saved.get("format") != CHECKPOINT_FORMAT or "optimizer" not in saved:
        raise ValueError(f"{path} is not a unit-LM training checkpoint; choose another run.name or run.workdir")
    old = saved["lm"]
    if old["train_fingerprint"] != data.info["train_fingerprint"] or old["dedup"] != data.info["dedup"]:
        raise ValueError(f"{path} was trained on other data ({old['train_file']}, dedup {old['dedup']}); resuming "
                         "it on this data would not be an exact resume: choose another run.name")
    step = read_int(saved["step"])
    if saved.get("loss_targets") != LOSS_TARGETS and step < max_steps:  # (a finished run trains no more)
        raise ValueError(f"{path} was trained by a spidr whose LM loss also scored the BOS after each EOS; resuming "
                         f"it would change its objective at step {step}: delete its run folder to train it again, "
                         "or choose another run.name")


def lm_checkpoint_summary(path: str | Path) -> dict[str, Any]:
    """What ``spidr lm-score`` needs from a checkpoint, after checking it is one (raises ``ValueError``)."""
    from spidr.models.loading import load_torch_file

    existing_file(path, "LM checkpoint", hint=f"pass a checkpoint in it, e.g. {Path(path) / 'final.pt'}")
    try:
        state = load_torch_file(Path(path))
    except ValueError as error:
        if "pickled Python objects" not in str(error):
            raise
        # lm-train writes tensors and plain values only: a file needing unpickling is not one of its checkpoints
        raise ValueError(f"{path} is not a unit-LM checkpoint written by spidr lm-train (it holds pickled Python "
                         "objects)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a unit-LM checkpoint written by spidr lm-train")
    return state


def write_untrained(checkpoint: str | Path, out: str | Path, *, seed: int | None = None) -> Path:
    """A copy of an LM checkpoint with the weights the run started from (its seed rebuilds them exactly, as in its
    ``step_0.pt``), or those another ``seed`` draws: the same model before training, a chance-level reference."""
    from spidr.lm.config import lm_config_from_dict
    from spidr.train.checkpoint import atomic_torch_save

    state = lm_checkpoint_summary(checkpoint)
    cfg = lm_config_from_dict(state["config"])
    torch.manual_seed(cfg.run.seed if seed is None else seed)
    model = build_model_for(cfg.model, Vocabulary(state["lm"]["num_units"]).size)
    out = Path(out)
    atomic_torch_save({**{k: v for k, v in state.items() if k not in ("optimizer", "scheduler")},
                       "model": model.state_dict(), "step": int_tensor(0)}, out)
    return out


def load_lm(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any],
                                                                                LabelVocabulary | None]:
    """The trained LM (eval mode), its ``lm`` info and, for frame-label LMs, the label vocabulary."""
    from spidr.lm.config import lm_config_from_dict

    state = lm_checkpoint_summary(path)
    cfg = lm_config_from_dict(state["config"])
    info = state["lm"]
    model = build_model_for(cfg.model, Vocabulary(info["num_units"]).size)
    model.load_state_dict(state["model"])
    labels = LabelVocabulary(tuple(info["labels"])) if info["labels"] else None
    info = {**info, "arch": cfg.model.arch, "context": cfg.model.context, "step": read_int(state["step"])}
    return model.to(device).eval(), info, labels


def read_lm_units(path: str | Path, info: dict[str, Any], labels: LabelVocabulary | None) -> UnitSequences:
    """A units file of test items read the way the LM was trained (same dedup, same labels, units in range), with
    names a ZeroSpeech submission can hold."""
    return read_unit_sequences(path, dedup=info["dedup"], labels=labels, num_units=info["num_units"],
                               expect_kind=info.get("kind"), submission_names=True)
