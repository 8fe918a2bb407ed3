"""The assembled loader: reproducible whatever the worker count, exactly resumable, fixed for validation."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from spidr.config import DEFAULT_CONV_LAYERS, DataConfig, MaskingConfig
from spidr.data.collate import Batch
from spidr.data.loader import batch_seed, build_dataloader, usable_workers
from spidr.data.manifest import read_manifest, write_manifest
from spidr.data.sampler import BucketBatchSampler
from spidr.data.scanning import scan
from test_child_processes import _running


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    for i in range(24):
        sf.write(root / f"u{i:02d}.wav", 0.1 * rng.standard_normal(int(rng.integers(3000, 12_000))), 16_000)
    return write_manifest(scan(root, progress=False).entries, root / "train.csv")


def config(manifest: Path, **kwargs: object) -> DataConfig:
    defaults: dict[str, object] = {"manifest": str(manifest), "num_workers": 0, "min_sample_size": 2000,
                                   "max_sample_size": 10_000, "max_batch_length": 30_000, "num_buckets": 5}
    return DataConfig(**(defaults | kwargs))  # type: ignore[arg-type]


def build(cfg: DataConfig, **kwargs: object):
    return build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS, **kwargs)  # type: ignore[arg-type]


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.epoch, x.position, x.ids) == (y.epoch, y.position, y.ids)
        assert torch.equal(x.waveforms, y.waveforms)
        assert torch.equal(x.mask, y.mask)


def two_epochs(loader) -> list[Batch]:
    return [batch for _ in range(2) for batch in loader]


def test_batches_do_not_depend_on_the_worker_count(manifest: Path) -> None:
    serial, _ = build(config(manifest, num_workers=0))
    parallel, _ = build(config(manifest, num_workers=2))
    assert parallel.num_workers == min(2, usable_workers(2))
    a, b = two_epochs(serial), two_epochs(parallel)
    assert_same(a, b)
    assert {x.epoch for x in a} == {0, 1}
    for batch in a:
        assert batch.waveforms.numel() <= 30_000


def test_resume_mid_epoch_matches_the_uninterrupted_run(manifest: Path) -> None:
    cfg = config(manifest, num_workers=2, prefetch_factor=2)  # workers read the sampler ahead of consumption
    uninterrupted, _ = build(cfg, seed=3)
    expected = two_epochs(uninterrupted)

    interrupted, sampler = build(cfg, seed=3)
    consumed = []
    for batch in interrupted:
        consumed.append(batch)
        if len(consumed) == 3:
            break
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, 3)

    resumed, resumed_sampler = build(cfg, seed=3)
    resumed_sampler.load_state_dict(state)
    assert_same(consumed + two_epochs(resumed)[: len(expected) - 3], expected)


def test_validation_batches_are_identical_every_epoch(manifest: Path) -> None:
    loader, _ = build(config(manifest, num_workers=0), deterministic_crops=True)
    first, second = list(loader), list(loader)
    assert [b.epoch for b in second] == [1] * len(second)
    for x, y in zip(first, second, strict=True):
        assert x.ids == y.ids
        assert torch.equal(x.waveforms, y.waveforms)
        assert torch.equal(x.mask, y.mask)

    training, _ = build(config(manifest, num_workers=0))
    a, b = list(training), list(training)
    assert [x.ids for x in a] != [y.ids for y in b]  # training reshuffles


def test_a_batch_emptied_by_unusable_files_is_none_in_validation_and_dropped_in_training(tmp_path: Path) -> None:
    """Validation ranks stay in step batch by batch (spidr.train.validate), so an emptied batch keeps its place."""
    root = tmp_path / "audio"
    root.mkdir()
    for i in range(6):
        sf.write(root / f"u{i}.wav", 0.1 * np.random.default_rng(i).standard_normal(4000 + 1000 * i), 16_000)
    manifest = write_manifest(scan(root, progress=False).entries, tmp_path / "m.csv")
    for i in (4, 5):  # the two longest files: one bucket's batch, gone
        (root / f"u{i}.wav").write_bytes(b"not audio")
    cfg = config(manifest, max_batch_length=12_000, max_sample_size=10_000, num_buckets=3, max_bad_fraction=1.0)
    validation = list(build(cfg, deterministic_crops=True)[0])
    training = list(build(cfg)[0])
    assert None in validation
    assert None not in training
    assert len(training) == len(validation) - validation.count(None)


def test_ranks_split_the_data(manifest: Path) -> None:
    ids = []
    lengths = set()
    for rank in range(2):
        loader, sampler = build(config(manifest), rank=rank, world_size=2)
        lengths.add(len(sampler))
        ids.append([i for batch in loader for i in batch.ids])
    assert len(lengths) == 1
    everything = {f"u{i:02d}" for i in range(24)}
    assert set(ids[0]) | set(ids[1]) == everything
    assert len(ids[0]) + len(ids[1]) >= 24


def test_long_utterances_are_clipped_to_the_batch_budget(manifest: Path) -> None:
    cfg = config(manifest, max_sample_size=320_000, max_batch_length=5000)
    loader, _ = build(cfg)
    for batch in loader:
        assert batch.waveforms.numel() <= 5000


def test_batch_seed() -> None:
    seeds = {batch_seed(s, e, p) for s in range(2) for e in range(3) for p in range(10)}
    assert len(seeds) == 60
    assert all(0 <= s < 2**63 for s in seeds)
    assert batch_seed(1, 3, 4) == batch_seed(1, 3, 4)


@pytest.mark.parametrize("validation", [True, False])
def test_a_batch_gets_the_same_crops_and_masks_at_every_world_size(manifest: Path, validation: bool) -> None:
    """Rank r takes the epoch's batches r, r + world, ...; each batch was seeded by (rank, its position on the
    rank): at 1 and 2 ranks one batch got other crops and masks (1 validation batch in 17 alike), so validation of
    one checkpoint changed with the GPU count. Now by its place in the epoch's plan, which all world sizes share."""
    cfg = config(manifest, max_sample_size=6000)
    kwargs = {"deterministic_crops": True} if validation else {}
    single = list(build(cfg, **kwargs)[0])
    ranks = [list(build(cfg, rank=rank, world_size=2, **kwargs)[0]) for rank in (0, 1)]
    interleaved = [batch for pair in zip(*ranks, strict=True) for batch in pair]
    real = [batch for batch in interleaved if not batch.repeat]
    assert len(single) % 2 == 1  # an odd count: rank 1 ends with a padding repeat
    assert [b.ids for b in real] == [b.ids for b in single]
    for one, two in zip(single, real, strict=True):
        assert torch.equal(one.waveforms, two.waveforms)
        assert torch.equal(one.mask, two.mask)
    assert any(not torch.equal(a.mask, b.mask) for a, b in itertools.pairwise(single))  # (masks differ by batch)


def test_usable_workers() -> None:
    assert usable_workers(0) == 0
    assert usable_workers(10_000) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_leaves_the_global_rng_alone(manifest: Path, workers: int) -> None:
    """Dropout draws from the global RNG; the data pipeline must not shift that stream."""
    loader, _ = build(config(manifest, num_workers=workers))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    batches = list(loader)
    assert batches
    assert torch.equal(torch.rand(3), expected)


def _corpus_with_u0_unreadable(tmp_path: Path, count: int, *, step: int) -> Path:
    """``count`` noise files u0..u{count-1} of 4000 + step·i samples, listed in a manifest; then u0 made unreadable."""
    root = tmp_path / "audio"
    root.mkdir()
    for i in range(count):
        sf.write(root / f"u{i}.wav", 0.1 * np.random.default_rng(i).standard_normal(4000 + step * i), 16_000)
    manifest = write_manifest(scan(root, progress=False).entries, tmp_path / "m.csv")
    (root / "u0.wav").write_bytes(b"not audio")
    return manifest


def test_the_unusable_files_summary_is_logged_once_unless_new_ones_appear(tmp_path: Path, caplog) -> None:
    import logging

    manifest = _corpus_with_u0_unreadable(tmp_path, 6, step=1000)
    loader, _ = build(config(manifest, max_bad_fraction=1.0))
    with caplog.at_level(logging.INFO, logger="spidr.data"):
        for _ in range(3):
            list(loader)
    assert caplog.text.count("skipping unusable audio") == 1
    assert caplog.text.count("distinct unusable file(s)") == 1


def test_padding_repeats_reach_the_batches_marked_as_such(manifest: Path) -> None:
    """Validation leaves padding repeats out of its means: the loader must carry the sampler's flag to the batch."""
    loaders = [build(config(manifest), rank=rank, world_size=4, deterministic_crops=True) for rank in range(4)]
    flagged = {(rank, batch.position) for rank, (loader, _) in enumerate(loaders) for batch in loader
               if batch.repeat}
    expected = {(rank, position) for rank, (_, sampler) in enumerate(loaders)
                for position in range(len(sampler)) if sampler.is_repeat(0, position)}
    assert flagged == expected
    distinct = len(build(config(manifest), deterministic_crops=True)[1])
    assert len(expected) == -distinct % 4 > 0


def test_a_missing_manifest_is_named_by_its_config_field(tmp_path):
    from spidr.config import DEFAULT_CONV_LAYERS, DataConfig, MaskingConfig
    from spidr.data.loader import build_dataloader

    cfg = DataConfig(manifest=str(tmp_path / "dev-clean.csv"), num_workers=0)
    with pytest.raises(ValueError, match=r"^validation\.dev-clean\.manifest: manifest .*dev-clean\.csv does not "):
        build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS, section="validation.dev-clean")


def test_a_manifest_too_short_for_its_settings_is_named_with_the_section_s_field(manifest: Path) -> None:
    """The sampler's error said data.min_sample_size for a validation section and named no file."""
    with pytest.raises(ValueError, match=rf"^validation\.dev\.manifest {manifest}: none of the 24 utterances is at "
                                         r"least validation\.dev\.min_sample_size = 100000 samples long"):
        build(config(manifest, min_sample_size=100_000, max_sample_size=200_000, max_batch_length=300_000),
              section="validation.dev")
    header_only = manifest.with_name("empty.csv")
    header_only.write_text(manifest.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=rf"^data\.manifest {header_only}: none of the 0 utterances"):
        build(config(header_only))


def test_batches_are_pinned_by_default_where_cuda_is(manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned batches let the host copy the next batch to the GPU without waiting for the queued step; without
    CUDA, pinning is left off (torch would warn and ignore it)."""
    assert DataConfig(manifest=str(manifest)).pin_memory
    loader, _ = build_dataloader(config(manifest, num_workers=0), MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
    assert loader.pin_memory is torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loader, _ = build_dataloader(config(manifest, num_workers=0), MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
    assert loader.pin_memory
    loader, _ = build_dataloader(config(manifest, num_workers=0, pin_memory=False), MaskingConfig(),
                                 conv_layers=DEFAULT_CONV_LAYERS)
    assert not loader.pin_memory


def test_a_validation_set_whose_batches_leave_much_audio_out_is_named(manifest: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Validation batches are cropped like training's: to their shortest utterance and to max_sample_size. On this
    set of 0.2-0.75 s files, cut to 3000 samples, that scores under half of it, which the warning says, with the
    share the batches really hand to the model (counted here from the batches themselves); padded and unclipped,
    the share is only logged."""
    import logging

    total = int(sum(sf.info(path).frames for path in sorted(manifest.parent.glob("*.wav"))))
    with caplog.at_level(logging.WARNING, logger="spidr.data.loader"):
        loader, _ = build(config(manifest, max_sample_size=3000), deterministic_crops=True, section="validation.dev")
        scored = sum(batch.waveforms.numel() for batch in loader)
        assert scored < 0.5 * total
        (record,) = caplog.records
        assert record.getMessage().startswith(f"validation.dev: its batches score {100 * scored / total:.0f} % of "
                                              f"the audio in {manifest}")
        assert "validation.dev.enable_padding = true" in record.getMessage()
        caplog.clear()
        build(config(manifest))  # training: batches are drawn anew each epoch, nothing to say
        with caplog.at_level(logging.INFO, logger="spidr.data.loader"):
            padded, _ = build(config(manifest, enable_padding=True, max_sample_size=12_000), deterministic_crops=True)
        assert sum(int(batch.lengths.sum()) for batch in padded) == total
        assert [r.getMessage() for r in caplog.records] == [
            f"data: its batches score 100 % of the audio in {manifest}"]
        caplog.clear()
        build(config(manifest), deterministic_crops=True)  # cropped, but 90 % scored: said at info level only
        assert not caplog.records
        build(config(manifest, enable_padding=True, max_sample_size=3000), deterministic_crops=True)
        (record,) = caplog.records  # padded already: only the cut to max_sample_size is left to lift
        assert "enable_padding" not in record.getMessage()
        assert "data.max_sample_size = 3000 samples" in record.getMessage()
        assert record.getMessage().endswith("a larger max_sample_size score it whole")
        caplog.clear()
        # The batch budget under max_sample_size sets the crop: raising max_sample_size would change nothing.
        build(config(manifest, enable_padding=True, max_sample_size=12_000, max_batch_length=3000),
              deterministic_crops=True, section="validation.dev")
        (record,) = caplog.records
        assert "validation.dev.max_batch_length = 3000 samples" in record.getMessage()
        assert record.getMessage().endswith("a larger max_batch_length score it whole")


def test_a_training_set_of_recordings_much_longer_than_the_crops_is_named(manifest: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Each utterance gives an epoch one crop of at most max_sample_size samples (its whole file decoded for it): in
    unsegmented recordings most of the audio is never trained on. Over half of it beyond the crops is named, with the
    share counted here from the files' lengths; the same files under longer crops are not."""
    import logging

    lengths = np.array([sf.info(path).frames for path in sorted(manifest.parent.glob("*.wav"))])
    beyond = int(np.maximum(lengths - 1000, 0).sum()) / int(lengths.sum())
    assert beyond > 0.5
    with caplog.at_level(logging.WARNING, logger="spidr.data.loader"):
        build(config(manifest, max_sample_size=1000, min_sample_size=500))
        (record,) = caplog.records
        assert record.getMessage() == (
            f"data: {100 * beyond:.0f} % of the audio in {manifest} lies beyond the crops of data.max_sample_size = "
            f"1000 samples (0.1 s): each utterance gives an epoch one crop, its whole file decoded for it "
            f"({int((lengths > 4000).sum())} of {lengths.size} files are longer than 0.2 s); cut long recordings into "
            "utterances (e.g. at pauses) to train on all of them")
        caplog.clear()
        build(config(manifest, max_sample_size=12_000))
        # rank 0 says it for all
        build(config(manifest, max_sample_size=1000, min_sample_size=500), rank=1, world_size=2)
        assert not caplog.records


def test_the_same_batch_position_gets_new_masks_every_epoch(tmp_path):
    from spidr.data.loader import build_dataloader
    from train_fixtures import tiny_config, write_corpus
    manifest = write_corpus(tmp_path / "c", num_files=3, seconds=(0.6, 0.9))
    cfg = tiny_config(tmp_path, manifest, data={"max_batch_length": 10**7, "num_buckets": 1})
    loader, sampler = build_dataloader(cfg.data, cfg.masking, conv_layers=cfg.model.extractor_conv_layer_config)
    assert len(sampler) == 1
    (first,) = list(loader)
    (second,) = list(loader)
    assert not torch.equal(first.mask, second.mask)


def test_a_data_worker_ignores_every_stop_signal() -> None:
    """Truth (spidr.data.loader.ignore_stop_signals, README's stop signals): a worker ignores SIGTERM,
    SIGUSR1, SIGUSR2 and SIGINT, which a scheduler or Ctrl-C send to the whole process group, so that only the
    trainer acts on them. Run here in the test's own process, its handlers put back after."""
    import signal

    from spidr.data.loader import ignore_stop_signals

    names = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
    previous = {name: signal.getsignal(getattr(signal, name)) for name in names}
    try:
        ignore_stop_signals(0)
        handlers = {name: signal.getsignal(getattr(signal, name)) for name in names}
        assert handlers == dict.fromkeys(names, signal.SIG_IGN)
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)



def test_the_data_seed_is_random_seed_plus_the_run_seed(manifest: Path) -> None:
    """build_dataloader's documented data seed: data.random_seed + seed. Other seeds give other batches."""
    def first_epoch(cfg, seed):
        return [(b.ids, b.mask) for b in build(cfg, seed=seed)[0]]

    base = first_epoch(config(manifest), 0)
    by_run_seed = first_epoch(config(manifest), 1)
    by_data_seed = first_epoch(config(manifest, random_seed=1), 0)
    assert [ids for ids, _ in base] != [ids for ids, _ in by_run_seed]
    assert len(by_run_seed) == len(by_data_seed)
    for (ids_a, mask_a), (ids_b, mask_b) in zip(by_run_seed, by_data_seed, strict=True):
        assert ids_a == ids_b
        assert torch.equal(mask_a, mask_b)


def test_drop_last_reaches_the_sampler(manifest: Path) -> None:
    distinct = len(build(config(manifest))[1])
    assert distinct % 4  # otherwise there is nothing to drop
    for rank in range(4):
        loader, sampler = build(config(manifest, drop_last=True), rank=rank, world_size=4)
        assert len(sampler) == distinct // 4
        assert not any(batch.repeat for batch in loader)


def test_rand_crop_and_normalize_off_hand_the_file_s_first_samples(manifest: Path) -> None:
    """data.rand_crop = false crops every row from its start; data.normalize = false leaves the samples as decoded."""
    entries = {e.fileid: e.path for e in read_manifest(manifest)}
    loader, _ = build(config(manifest, rand_crop=False, normalize=False))
    rows = 0
    for batch in loader:
        for row, fileid in enumerate(batch.ids):
            samples, _ = sf.read(entries[fileid], dtype="float32")
            target = batch.waveforms.shape[1]
            assert torch.equal(batch.waveforms[row], torch.from_numpy(samples[:target])), fileid
            rows += 1
    assert rows == 24
    # and the defaults do crop at random offsets and standardise (so the check above means something)
    defaults = list(build(config(manifest))[0])
    assert any(abs(float(b.waveforms[r].std()) - 1) < 0.05 for b in defaults for r in range(len(b)))


def test_the_loader_starts_at_the_epoch_it_is_given(manifest: Path) -> None:
    loader, sampler = build(config(manifest), epoch=2)
    assert sampler.epoch == 2
    batches = list(loader)
    assert {b.epoch for b in batches} == {2}
    fileids = [entry.fileid for entry in read_manifest(manifest)]
    assert [b.ids for b in batches] == [[fileids[i] for i in indices] for indices in sampler.batches(2)]


def test_the_bucket_settings_reach_the_sampler(manifest: Path) -> None:
    lengths = read_manifest(manifest).num_samples
    for settings in ({"bucket_method": "percentile", "num_buckets": 4}, {"num_buckets": 3}):
        _, sampler = build(config(manifest, **settings))
        expected = BucketBatchSampler(lengths, max_batch_length=30_000, min_sample_size=2000,
                                      max_sample_size=10_000, **settings)  # type: ignore[arg-type]
        assert np.array_equal(sampler.buckets, expected.buckets), settings
        assert np.array_equal(sampler.indices, expected.indices), settings


def test_with_several_ranks_the_loader_leaves_the_bad_file_verdict_to_the_trainer(tmp_path: Path) -> None:
    """B05: a rank of several must not raise alone on its own bad-file share (the other ranks would hang in their
    next collective); its loader's tracker is shared, and only the trainer's ``check_across_ranks`` judges. A
    single process judges at the end of its epoch. Truth: the documented behaviour of ``BadFileTracker``."""
    manifest = _corpus_with_u0_unreadable(tmp_path, 8, step=500)
    cfg = config(manifest, max_bad_fraction=0.0, max_batch_length=12_000, num_buckets=2)
    with pytest.raises(ValueError, match="unusable"):
        list(build(cfg)[0])
    for rank in range(2):
        loader, _ = build(cfg, rank=rank, world_size=2)
        assert loader.tracker.shared
        assert any(batch is not None for batch in loader)  # the pass ends without a verdict of its own


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_data_worker_survives_a_stop_signal_sent_while_it_starts(tmp_path: Path, method: str) -> None:
    """Truth: a scheduler's SIGTERM or a Ctrl-C goes to the whole process group, and a data worker must leave it to
    the trainer (README's stop signals; ``ignore_stop_signals``). Under spawn (the macOS and Windows default) and
    forkserver (Python 3.14's Linux default) a worker imports torch for a second or more before its
    ``worker_init_fn`` runs; a stop signal then killed it. The signal is sent here right after the workers start, as
    the process group's signal reaches them; the pass must still yield every batch (6 files of 0.5 s, 1 s batches)."""
    rng = np.random.default_rng(0)
    for i in range(6):
        sf.write(tmp_path / f"u{i}.wav", 0.1 * rng.standard_normal(8000), 16_000)
    manifest = write_manifest(scan(tmp_path, progress=False).entries, tmp_path / "m.csv")
    cfg = DataConfig(manifest=str(manifest), num_workers=1, min_sample_size=2000, max_sample_size=8000,
                     max_batch_length=16_000, num_buckets=1)
    loader, _ = build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
    loader.multiprocessing_context = method  # the start method of another platform / Python version
    try:
        batches = iter(loader)
        for worker in loader._live._workers:  # still starting: its worker_init_fn has not run yet
            os.kill(worker.pid, signal.SIGTERM)
        assert len(list(batches)) == 3
    finally:
        loader.close()


def test_a_stop_signal_reaching_the_trainer_while_its_workers_start_is_not_lost(tmp_path):
    """The trainer's stop handler must run for a SIGTERM (SLURM's notice, Ctrl-C) that arrives while the loader
    starts its workers. HEAD ignores the signals (SIG_IGN) meanwhile and blocks them in the main thread only: the
    kernel hands a process-directed signal to another thread that does not block it (NCCL's watchdog, a logger's
    thread), where SIG_IGN discards it. Run in a child: signal dispositions are process-wide."""
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent('''
        import multiprocessing.process as mpp, os, signal, sys, threading, time
        from pathlib import Path
        import numpy as np, soundfile as sf
        from spidr.config import DEFAULT_CONV_LAYERS, DataConfig, MaskingConfig
        from spidr.data.loader import build_dataloader
        from spidr.data.manifest import write_manifest
        from spidr.data.scanning import scan
        root = Path(sys.argv[1])
        rng = np.random.default_rng(0)
        for i in range(6):
            sf.write(root / f"u{i}.wav", 0.1 * rng.standard_normal(8000), 16_000)
        manifest = write_manifest(scan(root, progress=False).entries, root / "m.csv")
        cfg = DataConfig(manifest=str(manifest), num_workers=1, min_sample_size=2000, max_sample_size=8000,
                         max_batch_length=16_000, num_buckets=1)
        loader, _ = build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
        loader.multiprocessing_context = "fork"
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        start = mpp.BaseProcess.start
        def start_and_signal(self):
            start(self)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        mpp.BaseProcess.start = start_and_signal
        try:
            count = len(list(loader))
        finally:
            loader.close()
        time.sleep(0.1)
        print(count, bool(got))
    '''))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
                            check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert result.stdout.split() == ["3", "True"], result.stdout + result.stderr[-600:]


@pytest.mark.parametrize("where", ["main", "thread"])
@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_a_stop_signal_while_workers_start_reaches_the_trainer_and_spares_the_worker(tmp_path, method, where):
    """A SIGTERM to the process group while the loader starts its workers must run the trainer's handler (HEAD:
    under spawn/forkserver the parent ignores it meanwhile, and the thread the kernel hands it to, one that does not
    block it (here a ThreadPoolExecutor's idle thread, as scan leaves), drops it: the run goes on to max_steps), and
    must not kill the starting worker (HEAD, loader iterated from another thread: it was killed)."""
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f'''
        import multiprocessing.process as mpp, os, signal, sys, threading, time
        from pathlib import Path
        import numpy as np, soundfile as sf
        from spidr.config import DEFAULT_CONV_LAYERS, DataConfig, MaskingConfig
        from spidr.data.loader import build_dataloader
        from spidr.data.manifest import write_manifest
        from spidr.data.scanning import scan

        def main():
            root = Path(sys.argv[1])
            rng = np.random.default_rng(0)
            for i in range(6):
                sf.write(root / f"u{{i}}.wav", 0.1 * rng.standard_normal(8000), 16_000)
            manifest = write_manifest(scan(root, progress=False).entries, root / "m.csv")
            cfg = DataConfig(manifest=str(manifest), num_workers=1, min_sample_size=2000, max_sample_size=8000,
                             max_batch_length=16_000, num_buckets=1, persistent_workers=False)
            loader, _ = build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
            loader.multiprocessing_context = {method!r}
            got = []
            signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
            threading.Thread(target=threading.Event().wait, daemon=True).start()
            start = mpp.BaseProcess.start
            def start_and_signal(self):
                start(self)
                os.kill(self.pid, signal.SIGTERM)       # the process group's signal reaches the starting worker
                os.kill(os.getpid(), signal.SIGTERM)    # and the trainer
                time.sleep(0.1)
            mpp.BaseProcess.start = start_and_signal
            counts = []
            def epochs():
                for _ in range(2):
                    try:
                        counts.append(len(list(loader)))
                    except RuntimeError as error:
                        counts.append(str(error)[:80])
            try:
                if {where!r} == "main":
                    epochs()
                else:
                    thread = threading.Thread(target=epochs)
                    thread.start()
                    thread.join()
            finally:
                loader.close()
            time.sleep(0.3)
            print(counts, len(got))

        if __name__ == "__main__":
            main()
    '''))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                            check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
                                                           "OMP_NUM_THREADS": "1"})
    assert result.stdout.strip() == "[3, 3] 2", result.stdout + result.stderr[-800:]


# The start of a child script: tiny_loader(root, workers, method) loads 4 files of 0.5 s in batches of 1 s.
TINY_LOADER = textwrap.dedent('''
    import sys
    from pathlib import Path
    import numpy as np, soundfile as sf
    from spidr.config import DEFAULT_CONV_LAYERS, DataConfig, MaskingConfig
    from spidr.data.loader import build_dataloader
    from spidr.data.manifest import write_manifest
    from spidr.data.scanning import scan

    def tiny_loader(root, *, workers, method):
        for i in range(4):
            sf.write(root / f"u{i}.wav", 0.1 * np.random.default_rng(i).standard_normal(8000), 16_000)
        manifest = write_manifest(scan(root, progress=False).entries, root / "m.csv")
        cfg = DataConfig(manifest=str(manifest), num_workers=workers, min_sample_size=2000, max_sample_size=8000,
                         max_batch_length=16_000, num_buckets=1)
        loader, _ = build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
        loader.multiprocessing_context = method
        return loader
''')


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork")
def test_a_worker_that_fails_to_start_leaves_no_started_worker_behind(tmp_path: Path) -> None:
    """Truth: a process that catches the loader's error must be able to exit. Under a process limit the second
    worker's start fails (EAGAIN); the first one, started and ignoring SIGTERM (``ignore_stop_signals``), had no
    iterator left to shut it down, and the interpreter's exit waited for it for ever (``spidr train`` printed its
    error and hung). Run in a child that must end within the timeout with no child process left."""
    script = tmp_path / "starter.py"
    script.write_text(TINY_LOADER + textwrap.dedent('''
        import errno, multiprocessing, multiprocessing.process as mpp
        loader = tiny_loader(Path(sys.argv[1]), workers=2, method="fork")
        start, starts = mpp.BaseProcess.start, []
        def start_unless_second(self):
            starts.append(self)
            if len(starts) == 2:
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            start(self)
        mpp.BaseProcess.start = start_unless_second
        try:
            iter(loader)
        except OSError as error:
            print(error.errno == errno.EAGAIN, len(multiprocessing.active_children()), starts[0].exitcode is not None)
        finally:
            loader.close()
    '''))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60,
                            check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert result.returncode == 0, result.stderr[-600:]
    assert result.stdout.split() == ["True", "0", "True"], result.stdout + result.stderr[-600:]


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or sys.platform != "linux", reason="reads /proc (Linux)")
def test_data_workers_end_when_the_trainer_is_killed_under_forkserver(tmp_path: Path) -> None:
    """Truth: kill -9 of a trainer must leave nothing running (README: a killed run resumes; a scheduler reclaims the
    node). Under forkserver (Python 3.14's Linux default) a worker's parent is the fork server, so torch's parent
    watch never fired, and the server lived as long as its workers held its liveness pipe: both ran for ever."""
    script = tmp_path / "trainer.py"
    script.write_text(TINY_LOADER + textwrap.dedent('''
        import time
        if __name__ == "__main__":  # (the fork server imports this file)
            loader = tiny_loader(Path(sys.argv[1]), workers=1, method="forkserver")
            batches = iter(loader)
            next(batches)  # the worker is past its worker_init_fn
            print(*(worker.pid for worker in loader._live._workers), flush=True)
            time.sleep(600)
    '''))
    # (stderr to a file: the killed trainer's resource tracker reports its leaked semaphores there)
    trainer = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               stderr=(tmp_path / "stderr.txt").open("w"),
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in trainer.stdout.readline().split()]  # type: ignore[union-attr]
        assert workers, (tmp_path / "stderr.txt").read_text()[-600:]
        trainer.kill()
        trainer.wait()
        for _ in range(300):
            if not any(_running(pid) for pid in workers):
                break
            time.sleep(0.1)
        assert not any(_running(pid) for pid in workers)
    finally:
        trainer.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_short_files_do_not_hide_the_audio_a_long_recording_has_beyond_the_crops(caplog):
    """Hand-computed: one 100 000-sample recording and 30 files of 1 000 samples, crops of 16 000: 84 000 of the
    130 000 samples (65 %) lie beyond the crops. A short file has nothing beyond them (0, not 1 000 − 16 000 < 0):
    summing signed remainders (−450 000 from the short files) would hide the long recording's loss."""
    from spidr.config import DataConfig
    from spidr.data.loader import _warn_of_audio_beyond_the_crops

    lengths = np.array([100_000] + [1_000] * 30, dtype=np.int64)
    cfg = DataConfig(manifest="train.csv", max_sample_size=16_000)
    with caplog.at_level(logging.WARNING, logger="spidr.data.loader"):
        _warn_of_audio_beyond_the_crops(lengths, 16_000, cfg, "data")
    (record,) = caplog.records
    assert record.getMessage() == (
        "data: 65 % of the audio in train.csv lies beyond the crops of data.max_sample_size = 16000 samples (1.0 s): "
        "each utterance gives an epoch one crop, its whole file decoded for it (1 of 31 files are longer than 4.0 s); "
        "cut long recordings into utterances (e.g. at pauses) to train on all of them")
