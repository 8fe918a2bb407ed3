"""``build_dataloader``: manifest → dataset → bucketed batches → collated ``Batch`` objects, reproducibly.

Crops and masks are drawn from a generator seeded per batch with a hash of (data seed, epoch, the batch's place in
the epoch's plan), not from worker RNG state: the same batch always gets the same crops and masks, whatever the
number of workers or of ranks, and after a mid-epoch resume. The loader runs in the main process the parts that
must see every batch once: it marks consumed batches on the sampler (the DataLoader reads the sampler ahead),
reports unusable files once and skips batches left empty by them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spidr.config import ConvLayer, DataConfig, MaskingConfig
from spidr.data import SAMPLE_RATE
from spidr.data.collate import Batch, Collator
from spidr.data.dataset import AudioDataset, BadFileTracker, Skipped, Utterance
from spidr.data.manifest import read_manifest
from spidr.data.sampler import BucketBatchSampler
from spidr.seeding import derived_seed, rank_seed
from spidr.train.runtime import stop_signals

logger = logging.getLogger(__name__)


# A validation set whose batches leave out more than this share of its audio is named in a warning (the share
# scored is logged in any case): the demo's crops score 64 % of its test set, by design; a small set, 8 %.
UNSCORED_WARNING = 0.5


def _crop_limit(data_cfg: DataConfig) -> str:
    """The setting that sets the crop, the smaller of the two limits: raising the other would change nothing."""
    return "max_sample_size" if data_cfg.max_sample_size <= data_cfg.max_batch_length else "max_batch_length"


def _warn_of_audio_beyond_the_crops(lengths: np.ndarray, longest: int, data_cfg: DataConfig, section: str) -> None:
    """Each utterance gives a training batch one crop of at most ``longest`` samples per epoch (official), its whole
    file decoded and standardised for it: in a corpus of long recordings (unsegmented Libri-light: 16 min on
    average), most of the audio is then seen in no epoch, and decoding costs many times what is kept. Say so where
    over half the audio lies beyond the crops."""
    total = int(lengths.sum())
    beyond = int(np.maximum(lengths.astype(np.int64) - longest, 0).sum())
    if total and beyond > UNSCORED_WARNING * total:
        limit = _crop_limit(data_cfg)
        logger.warning("%s: %.0f %% of the audio in %s lies beyond the crops of %s.%s = %d samples (%.1f s): each "
                       "utterance gives an epoch one crop, its whole file decoded for it (%d of %d files are longer "
                       "than %.1f s); cut long recordings into utterances (e.g. at pauses) to train on all of them",
                       section, 100 * beyond / total, data_cfg.manifest, section, limit, longest,
                       longest / SAMPLE_RATE, int((lengths > 4 * longest).sum()), lengths.size,
                       4 * longest / SAMPLE_RATE)


def _warn_of_unscored_audio(sampler: BucketBatchSampler, total: int, data_cfg: DataConfig, section: str) -> None:
    """Validation batches are made as training's (official): cropped to their shortest utterance and to
    ``max_sample_size``, and utterances under ``min_sample_size`` left out. On a small set, or one of mixed lengths,
    that scores a fraction of it: say how much, and (under half) how to score it all."""
    if not total:
        return
    scored = sampler.scored_samples()
    logger.info("%s: its batches score %.0f %% of the audio in %s", section, 100 * scored / total, data_cfg.manifest)
    if scored < (1 - UNSCORED_WARNING) * total:
        limit = _crop_limit(data_cfg)
        longest = getattr(data_cfg, limit)
        cropped = "" if data_cfg.enable_padding else "batches are cropped to their shortest utterance and "
        remedy = f"a larger {limit}" if data_cfg.enable_padding else (
            f"{section}.enable_padding = true (with model.target_norm_frames = \"valid\") and a larger {limit}")
        logger.warning("%s: its batches score %.0f %% of the audio in %s (%.1f of %.1f min): %sutterances are cut "
                       "to %s.%s = %d samples and those under %s.min_sample_size left out; %s score it "
                       "whole", section, 100 * scored / total, data_cfg.manifest, scored / SAMPLE_RATE / 60,
                       total / SAMPLE_RATE / 60, cropped, section, limit, longest, section, remedy)


def batch_seed(seed: int, epoch: int, global_position: int) -> int:
    """A 63-bit generator seed (crops, masks) for the batch at ``global_position`` of the epoch's plan, which every
    world size shares (rank r takes positions r, r + world, ...): a batch gets the same crops and masks on 1 GPU as
    on 16, so validation of one checkpoint does not change with the GPU count. (The rank stays a seed part, always
    0, so that single-process runs keep their seeds.)"""
    return derived_seed(seed, 0, epoch, global_position)


@dataclass(frozen=True)
class _Key:
    """What the batch sampler hands to the dataset for one item: its index and its batch's identity."""

    index: int
    epoch: int
    position: int
    seed: int
    repeat: bool  # the batch is a padding repeat (``BucketBatchSampler.is_repeat``)


class _KeyedBatches:
    """Batch sampler for the DataLoader: the bucket sampler's batches, each item tagged with its batch's seed."""

    def __init__(self, sampler: BucketBatchSampler, seed: int, rank: int, *, fixed: bool) -> None:
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.fixed = fixed  # same seeds every epoch (validation)

    def __iter__(self) -> Iterator[list[_Key]]:
        world_size = self.sampler.world_size
        for epoch, position, indices in self.sampler.iter_planned():
            seed = batch_seed(self.seed, 0 if self.fixed else epoch, position * world_size + self.rank)
            repeat = self.sampler.is_repeat(epoch, position)
            yield [_Key(index, epoch, position, seed, repeat) for index in indices]

    def __len__(self) -> int:
        return len(self.sampler)


class _KeyedDataset(Dataset):
    def __init__(self, dataset: AudioDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: _Key) -> tuple[_Key, Utterance | Skipped]:
        return key, self.dataset[key.index]


class _KeyedCollate:
    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def __call__(self, pairs: Sequence[tuple[_Key, Utterance | Skipped]]) -> Batch:
        key = pairs[0][0]
        generator = torch.Generator().manual_seed(key.seed)
        batch = self.collator([item for _, item in pairs], generator=generator, epoch=key.epoch,
                              position=key.position)
        return replace(batch, repeat=key.repeat) if key.repeat else batch


def ignore_stop_signals(_worker_id: int) -> None:
    """A worker ignores the trainer's stop signals (``stop_signals``). ``timeout``, ``scancel``, ``kill -TERM
    -PGID`` and Ctrl-C signal the whole process group; torch's workers die of a SIGTERM that is not their parent's,
    and the main process then stopped on "DataLoader worker is killed by signal" before it could save its
    checkpoint. The main process saves, then shuts its workers down itself (and they exit when it dies). Under the
    spawn and forkserver start methods a worker runs this a second or so after it starts: one killed before is
    taken for part of the stop (``spidr.train.loop``)."""
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # a forked worker inherits the block of _stop_signals_blocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals())
    _exit_with_the_trainer()


def _exit_with_the_trainer() -> None:
    """End this worker when the process that started it dies. torch's workers watch their parent process, which under
    forkserver (Python 3.14's Linux default) is the fork server: a trainer killed with SIGKILL left the server and its
    workers running for ever (each worker holds the server's liveness pipe open, and ignores SIGTERM). multiprocessing
    gives every child a sentinel of the process that asked for it, whatever the start method."""
    trainer = multiprocessing.parent_process()
    if trainer is not None:
        threading.Thread(target=_exit_after, args=(trainer,), name="spidr-trainer-watch", daemon=True).start()


def _exit_after(trainer: multiprocessing.process.BaseProcess) -> None:
    trainer.join()
    os._exit(1)


@contextlib.contextmanager
def _stop_signals_blocked(workers: int, start_method: str = "spawn") -> Iterator[None]:
    """Start worker processes with the stop signals blocked in this thread: a worker inherits the mask (through
    fork, and through spawn's and forkserver's exec), so one signalled before it reaches ``ignore_stop_signals``
    (which ignores, then unblocks: a pending signal is dropped) is not killed. This process's handlers stay: a
    signal pending here is delivered when the mask is put back, or at once to another thread that does not block
    it (ignoring it here instead lost it there)."""
    if not workers or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    if start_method != "fork":
        # multiprocessing starts its resource tracker on first use and then *unblocks* SIGINT and SIGTERM in the
        # calling thread (bpo-33613): start it before blocking.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def _kill_started_since(running: set[multiprocessing.process.BaseProcess]) -> None:
    """Kill and reap the child processes started since ``running`` was listed (``multiprocessing.active_children``:
    the loader's workers, or a process another thread started in that moment; a started process no longer tells
    what it runs)."""
    for child in set(multiprocessing.active_children()) - running:
        child.kill()
        child.join()


class PretrainingLoader(DataLoader):
    """A DataLoader yielding ``Batch`` objects; see the module docstring for what it adds."""

    def __init__(self, *args: Any, bucket_sampler: BucketBatchSampler, tracker: BadFileTracker,
                 keep_empty: bool = False, **kwargs: Any) -> None:
        """``keep_empty`` (validation): a batch emptied by unusable files is yielded as None, not dropped, so that
        every rank yields as many items as its sampler has batches and the ranks can stay in step."""
        super().__init__(*args, **kwargs)
        self.bucket_sampler = bucket_sampler
        self.tracker = tracker
        self.keep_empty = keep_empty
        self._summarised: int | None = None  # unusable files counted when the last summary was logged
        self._empty_batches = 0  # in this pass (the first one of the run is a warning; the rest, a count per pass)
        self._warned_empty = False
        # A batch of the current epoch was yielded, before a resume too: an epoch whose rest after a resume is all
        # unusable is not an epoch with no usable batch.
        self.yielded_in_epoch = False

    def state_dict(self) -> dict[str, Any]:
        """What a resume restores besides the sampler's position: the bad-file tally (``data.max_bad_fraction`` is
        judged on the whole run's reads) and whether the current epoch yielded a batch."""
        return {"yielded_in_epoch": self.yielded_in_epoch, "bad_files": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s, after the sampler's own state (its position says whether the epoch ended)."""
        self.yielded_in_epoch = bool(state["yielded_in_epoch"])
        self.tracker.load_state_dict(state["bad_files"])
        if self.bucket_sampler.position >= len(self.bucket_sampler):
            # Saved after the epoch's last batch, before the pass ended (the next fetch ends it): end it now, as
            # the uninterrupted run does before its next batch (the sampler goes on with the next epoch).
            self._end_pass()

    def __iter__(self) -> Iterator[Batch | None]:  # type: ignore[override]
        # Start the DataLoader iterator now, not at the first ``next``: callers may fence this call (e.g. with
        # ``torch.random.fork_rng``) and expect any setup to happen inside it.
        starts = self.num_workers if not (self.persistent_workers and self._iterator is not None) else 0
        context = self.multiprocessing_context or multiprocessing.get_context()
        running = set(multiprocessing.active_children())
        with _stop_signals_blocked(starts, context.get_start_method()):
            try:
                self._live = super().__iter__()
            except BaseException:
                # A worker that failed to start (EAGAIN under a process limit) leaves the ones started before it
                # with no iterator to shut them down; they ignore the SIGTERM multiprocessing sends at exit, and
                # its join then waited for ever. They hold nothing to save: kill them.
                _kill_started_since(running)
                raise
        return self._deliver(self._live)

    def close(self) -> None:
        """Stop the worker processes now. They ignore stop signals (``ignore_stop_signals``), so the SIGTERM that
        multiprocessing sends them when the interpreter exits leaves them running, and its join then waited for
        ever: a run that ended on an error printed its traceback and never exited. Call it when done with the
        loader (the trainer does, on success and on error)."""
        for iterator in (getattr(self, "_live", None), getattr(self, "_iterator", None)):
            shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator only
            if shutdown is not None:
                shutdown()
        self._live = self._iterator = None

    def _deliver(self, batches: Iterator[Batch]) -> Iterator[Batch | None]:
        for batch in batches:
            self.bucket_sampler.mark_consumed(batch.epoch, batch.position)
            self.tracker.record(num_good=len(batch), skipped=batch.skipped)
            if len(batch) == 0:
                self._empty_batches += 1
                # (the same unusable files empty batches again every epoch: one warning, then a count per pass)
                logger.log(logging.DEBUG if self._warned_empty else logging.WARNING,
                           "batch %d of epoch %d is empty (all its utterances were unusable); skipped%s",
                           batch.position, batch.epoch, "" if self._warned_empty else
                           " (the next ones are counted at the end of each epoch)")
                self._warned_empty = True
                if self.keep_empty:
                    self.yielded_in_epoch = True  # the pass goes on in step with the other ranks
                    yield None
                continue
            self.yielded_in_epoch = True
            yield batch
        self._end_pass()

    def _end_pass(self) -> None:
        """An epoch (or validation pass) ended: judge its bad files, summarise new ones, start the next."""
        self.tracker.end_of_pass(yielded_any=self.yielded_in_epoch)
        self.yielded_in_epoch = False
        if self._empty_batches:
            logger.info("%d batch(es) of this %s were empty (all their utterances unusable) and skipped",
                        self._empty_batches, "validation pass" if self.keep_empty else "epoch")
            self._empty_batches = 0
        if self._summarised != len(self.tracker.reasons):  # the first epoch, and any that found new bad files
            logger.info("%s", self.tracker.summary())
            self._summarised = len(self.tracker.reasons)


def usable_workers(requested: int) -> int:
    """``requested`` clamped to the CPUs this process may run on."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(0, min(requested, available))


def build_dataloader(
    data_cfg: DataConfig,
    masking_cfg: MaskingConfig,
    *,
    conv_layers: Sequence[ConvLayer],
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    deterministic_crops: bool = False,
    section: str = "data",
) -> tuple[PretrainingLoader, BucketBatchSampler]:
    """The pretraining (or validation) loader of one rank, and its sampler (for ``set_epoch`` and resume state).

    The data seed is ``data_cfg.random_seed + seed``. ``deterministic_crops`` (validation) turns off shuffling and
    makes crops and masks identical every epoch, so scores compare across checkpoints. Utterances are clipped to
    ``min(max_sample_size, max_batch_length)`` samples so no batch exceeds ``max_batch_length``. ``section``: the
    config section of ``data_cfg`` (``validation.NAME``), named by errors.
    """
    try:
        entries = read_manifest(data_cfg.manifest)
    except ValueError as error:
        raise ValueError(f"{section}.manifest: {error}") from None
    data_seed = data_cfg.random_seed + seed
    longest = min(data_cfg.max_sample_size, data_cfg.max_batch_length)
    try:
        sampler = BucketBatchSampler(
            entries.num_samples,
            max_batch_length=data_cfg.max_batch_length,
            min_sample_size=data_cfg.min_sample_size,
            max_sample_size=longest,
            num_buckets=data_cfg.num_buckets,
            bucket_method=data_cfg.bucket_method,
            seed=data_seed,
            rank=rank,
            world_size=world_size,
            shuffle=not deterministic_crops,
            drop_last=data_cfg.drop_last,
            padded=data_cfg.enable_padding,
            section=section,
        )
    except ValueError as error:
        raise ValueError(f"{section}.manifest {data_cfg.manifest}: {error}") from None
    if deterministic_crops and rank == 0:
        _warn_of_unscored_audio(sampler, int(entries.num_samples.sum()), data_cfg, section)
    elif rank == 0:
        _warn_of_audio_beyond_the_crops(entries.num_samples, longest, data_cfg, section)
    sampler.set_epoch(epoch)
    dataset = AudioDataset(entries, normalize=data_cfg.normalize, min_samples=data_cfg.min_sample_size)
    collator = Collator(masking_cfg, conv_layers, max_sample_size=longest, enable_padding=data_cfg.enable_padding,
                        rand_crop=data_cfg.rand_crop)
    workers = usable_workers(data_cfg.num_workers)
    loader = PretrainingLoader(
        _KeyedDataset(dataset),
        batch_sampler=_KeyedBatches(sampler, data_seed, rank, fixed=deterministic_crops),
        collate_fn=_KeyedCollate(collator),
        num_workers=workers,
        pin_memory=data_cfg.pin_memory and torch.cuda.is_available(),  # (without CUDA torch warns and ignores it)
        prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=data_cfg.persistent_workers and workers > 0,
        # Only worker seeds come from it (crops and masks have their own); it keeps the global RNG untouched.
        generator=torch.Generator().manual_seed(rank_seed(data_seed, rank)),
        worker_init_fn=ignore_stop_signals,
        bucket_sampler=sampler,
        tracker=BadFileTracker(data_cfg.max_bad_fraction, source=data_cfg.manifest, shared=world_size > 1,
                               section=section),
        keep_empty=deterministic_crops,
    )
    return loader, sampler
