"""Unusable files: skipped, reported once, counted; too many of them stop the run with a clear error."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from spidr.config import DEFAULT_CONV_LAYERS, DataConfig, MaskingConfig
from spidr.data.dataset import AudioDataset, BadFileTracker, Skipped, Utterance
from spidr.data.loader import build_dataloader
from spidr.data.manifest import ManifestEntry, write_manifest
from spidr.distributed import AgreedValueError

GOOD = {"good1": 6000, "good2": 7000, "stereo": 6500, "cd": 8000}  # samples at 16 kHz
BAD = {"corrupt": "cannot be decoded", "empty": "no audio samples", "short": "too short", "nan": "NaN or Inf",
       "missing": "does not exist"}


def tone(num_samples: int, rate: int) -> np.ndarray:
    return (0.4 * np.sin(2 * np.pi * 200 * np.arange(num_samples) / rate)).astype(np.float32)


@pytest.fixture
def messy_manifest(tmp_path: Path) -> Path:
    """Four usable files (one stereo, one at 44.1 kHz) and five unusable ones, in one CSV manifest."""
    root = tmp_path / "audio"
    root.mkdir()
    sf.write(root / "good1.wav", tone(6000, 16_000), 16_000)
    sf.write(root / "good2.flac", tone(7000, 16_000), 16_000)
    sf.write(root / "stereo.wav", np.stack([tone(6500, 16_000), -tone(6500, 16_000) * 0.5], axis=1), 16_000)
    sf.write(root / "cd.wav", tone(22_050, 44_100), 44_100)  # 0.5 s → 8000 samples at 16 kHz
    (root / "corrupt.wav").write_bytes(b"RIFF" + b"\x07" * 3000)
    sf.write(root / "empty.wav", np.zeros(0, dtype=np.float32), 16_000)
    sf.write(root / "short.wav", tone(900, 16_000), 16_000)
    nan = tone(6000, 16_000)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 16_000, subtype="FLOAT")
    suffix = {"good2": ".flac"}
    # Manifest lengths are what a (stale) manifest claims: all long enough to pass the sampler's length filter.
    entries = [ManifestEntry(name, str(root / f"{name}{suffix.get(name, '.wav')}"), n) for name, n in GOOD.items()]
    entries += [ManifestEntry(name, str(root / f"{name}.wav"), 6000) for name in BAD]
    return write_manifest(entries, tmp_path / "messy.csv")


def data_config(manifest: Path, **kwargs: object) -> DataConfig:
    defaults: dict[str, object] = {"manifest": str(manifest), "num_workers": 0, "min_sample_size": 1000,
                                   "max_sample_size": 16_000, "max_batch_length": 200_000, "max_bad_fraction": 0.9}
    return DataConfig(**(defaults | kwargs))  # type: ignore[arg-type]


def test_dataset_items(messy_manifest: Path) -> None:
    from spidr.data.manifest import read_manifest

    dataset = AudioDataset(read_manifest(messy_manifest), min_samples=1000)
    items = {dataset.entries[i].fileid: dataset[i] for i in range(len(dataset))}
    for name, n in GOOD.items():
        item = items[name]
        assert isinstance(item, Utterance), name
        assert item.waveform.shape == (n,), name
    for name, reason in BAD.items():
        item = items[name]
        assert isinstance(item, Skipped), name
        assert reason in item.reason, name
        assert item.location.endswith(f"{name}.wav")


@pytest.mark.parametrize("padding", [False, True])
def test_loader_runs_through_bad_files_and_reports_each_once(
    messy_manifest: Path, caplog: pytest.LogCaptureFixture, padding: bool
) -> None:
    cfg = data_config(messy_manifest, enable_padding=padding, max_batch_length=16_000 if not padding else 200_000)
    loader, sampler = build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
    yielded = []
    with caplog.at_level(logging.INFO, logger="spidr.data"):
        for _ in range(2):  # two epochs: still one report per file
            seen = {}
            yielded.append(0)
            for batch in loader:
                yielded[-1] += 1
                assert len(batch) > 0  # batches emptied by bad files never reach the caller
                for row, fileid in enumerate(batch.ids):
                    seen[fileid] = int(batch.lengths[row])
            assert set(seen) == set(GOOD)
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unusable audio")]
    assert len(reports) == len(BAD)
    for name, reason in BAD.items():
        assert sum(f"{name}.wav" in message and reason in message for message in reports) == 1, name
    if padding:  # padded rows keep their true length: stereo down-mixed, 44.1 kHz resampled
        assert seen == GOOD
    else:  # two-utterance batches: with seed 0 some hold only bad files, and are skipped without a crash
        # one warning for the run (not one per batch and epoch), then a count at the end of each epoch
        assert sum("is empty" in r.getMessage() for r in caplog.records) == 1
        counts = [r.getMessage() for r in caplog.records if "of this epoch were empty" in r.getMessage()]
        assert len(counts) == 2
        planned = [len(sampler.batches(epoch)) for epoch in (0, 1)]
        assert [int(message.split()[0]) for message in counts] == [n - k for n, k in zip(planned, yielded,
                                                                                          strict=True)]
    assert loader.tracker.bad == 2 * len(BAD)
    assert loader.tracker.seen == 2 * (len(BAD) + len(GOOD))


def test_too_many_bad_files_stop_the_run(messy_manifest: Path) -> None:
    loader, _ = build_dataloader(data_config(messy_manifest, max_bad_fraction=0.05), MaskingConfig(),
                                 conv_layers=DEFAULT_CONV_LAYERS)
    with pytest.raises(ValueError, match=r"5 of 9 utterances .* data.max_bad_fraction = 5.0%") as info:
        list(loader)
    assert "corrupt.wav" in str(info.value)
    # A validation set's own limit, named as the setting to raise (data.max_bad_fraction does not apply to it).
    loader, _ = build_dataloader(data_config(messy_manifest, max_bad_fraction=0.05), MaskingConfig(),
                                 conv_layers=DEFAULT_CONV_LAYERS, deterministic_crops=True, section="validation.dev")
    with pytest.raises(ValueError, match=r"validation\.dev\.max_bad_fraction = 5\.0%.* raise "
                                         r"validation\.dev\.max_bad_fraction$"):
        list(loader)


def test_tracker_waits_for_enough_reads_before_judging() -> None:
    tracker = BadFileTracker(0.04, min_seen=20)
    tracker.record(num_good=1, skipped=[("a.wav", "broken")])  # 50 % bad after 2 reads: too early to judge
    tracker.record(num_good=17, skipped=[])  # 19 reads, still below min_seen
    with pytest.raises(ValueError, match="1 of 19"):
        tracker.check()  # the end-of-epoch check judges whatever was read
    tracker.record(num_good=6, skipped=[])  # 25 reads, 4 %: not more than the limit
    assert tracker.fraction == pytest.approx(0.04)
    with pytest.raises(ValueError, match="3 of 27"):
        tracker.record(num_good=0, skipped=[("b.wav", "x"), ("c.wav", "y")])
    assert "3 distinct unusable file(s)" in tracker.summary()


def test_a_tracker_shared_by_ranks_leaves_the_verdict_to_the_trainer() -> None:
    """With several ranks, one rank raising alone would leave the others waiting in a collective."""
    tracker = BadFileTracker(0.04, min_seen=2, shared=True)
    tracker.record(num_good=1, skipped=[("a.wav", "broken"), ("b.wav", "broken")])  # 67 % bad: no raise here
    tracker.end_of_pass(yielded_any=True)  # nor at the end of an epoch that gave this rank batches
    tracker.check(totals=(100, 4))  # 4 % over all ranks: within the limit
    with pytest.raises(ValueError, match=r"5 of 100 utterances read by all ranks .* e\.g\. a\.wav: broken"):
        tracker.check(totals=(100, 5))
    with pytest.raises(ValueError, match="2 of 3 utterances read from"):
        tracker.end_of_pass(yielded_any=False)  # no batch in a whole epoch: this rank could never go on
    with pytest.raises(AgreedValueError, match="2 of 3 utterances read by all ranks"):  # one rank: its own counts
        tracker.check_across_ranks(torch.device("cpu"))


def test_a_file_whose_length_is_not_the_manifest_s_is_skipped_and_named(tmp_path: Path) -> None:
    """Batches are packed by the manifest's lengths: a file four times longer than its row says (a stale manifest)
    made batches of 2.5 × data.max_batch_length. Resampling's rounding (a few samples) is not a change."""
    sf.write(tmp_path / "grown.wav", tone(16_000, 16_000), 16_000)
    sf.write(tmp_path / "cd.wav", tone(22_050, 44_100), 44_100)
    dataset = AudioDataset([ManifestEntry("grown", str(tmp_path / "grown.wav"), 4000),
                            ManifestEntry("cd", str(tmp_path / "cd.wav"), 8003)])
    grown, resampled = dataset[0], dataset[1]
    assert isinstance(grown, Skipped)
    assert grown.reason.startswith("decoded 16000 samples where the manifest says 4000")
    assert "spidr manifest" in grown.reason
    assert isinstance(resampled, Utterance)
    assert resampled.waveform.shape == (8000,)


def test_a_resumed_loader_goes_on_with_the_epoch_s_tally_and_its_yielded_batches(
    messy_manifest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A resume restarted the bad-file tally (max_bad_fraction was judged on the reads since the resume, and files
    were reported again) and took an epoch whose rest was all unusable for an epoch with no usable batch."""
    from spidr.train import loop

    cfg = data_config(messy_manifest, max_batch_length=16_000)  # two-utterance batches; some hold only bad files
    whole, _ = build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
    consumed = list(whole)
    assert whole.yielded_in_epoch is False  # a finished epoch
    first, first_sampler = build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
    batches = iter(first)
    next(batches)
    assert first.yielded_in_epoch is True
    saved = {"loader": first.state_dict(), "sampler": first_sampler.state_dict()}
    resumed, resumed_sampler = build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
    resumed_sampler.load_state_dict(saved["sampler"])
    resumed.load_state_dict(saved["loader"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spidr.data"):
        rest = list(resumed)
    assert [b.ids for b in rest] == [b.ids for b in consumed[1:]]
    assert (resumed.tracker.seen, resumed.tracker.bad) == (whole.tracker.seen, whole.tracker.bad)
    assert resumed.tracker.reasons == whole.tracker.reasons
    reported_before = set(saved["loader"]["bad_files"]["reasons"])
    assert not any(location in r.getMessage() for r in caplog.records for location in reported_before)

    # saved right after the epoch's last batch: the pass ends at the resume, as the uninterrupted run ends it before
    # its next batch (the flag once carried over to the next epoch, and epoch 0's end-of-pass check was lost)
    last, last_sampler = build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
    batches = iter(last)
    for _ in consumed:
        next(batches)
    saved = {"loader": last.state_dict(), "sampler": last_sampler.state_dict()}
    assert saved["loader"]["yielded_in_epoch"] is True
    assert saved["loader"]["bad_files"]["passes"] == 0
    at_end, at_end_sampler = build_dataloader(cfg, MaskingConfig(), conv_layers=DEFAULT_CONV_LAYERS)
    at_end_sampler.load_state_dict(saved["sampler"])
    at_end.load_state_dict(saved["loader"])
    assert (at_end.yielded_in_epoch, at_end.tracker.passes) == (False, 1)
    next_epoch, second = list(at_end), list(whole)  # epoch 1, resumed and uninterrupted
    assert [b.ids for b in next_epoch] == [b.ids for b in second]
    assert (at_end.tracker.seen, at_end.tracker.bad, at_end.tracker.passes) == (
        whole.tracker.seen, whole.tracker.bad, whole.tracker.passes)
    assert whole.tracker.passes == 2

    class ResumedOnAnEmptyTail:
        """The rest of the resumed epoch holds no usable batch; the next epoch does."""

        yielded_in_epoch = True

        def __init__(self) -> None:
            self.epochs = iter([[], [7, 8]])

        def __iter__(self):
            return iter(next(self.epochs))

    assert next(loop._batches(ResumedOnAnEmptyTail())) == 7


def test_length_tolerance_is_10_ms_or_1_percent() -> None:
    """By hand: 8000 samples → 1 % is 80, below the 10 ms floor of 160; 100 000 → 1 % is 1000, above it."""
    from spidr.data.dataset import length_tolerance

    assert length_tolerance(8000) == 160
    assert length_tolerance(16_000) == 160
    assert length_tolerance(100_000) == 1000


def test_a_decoded_length_is_judged_on_both_sides_up_to_the_tolerance(tmp_path: Path) -> None:
    """A file shorter than its row (a stale manifest) wastes data.max_batch_length as surely as a longer one
    overflows it, so both are skipped; within 10 ms (160 samples at 16 000) the length is resampling's rounding."""
    cases = {"quarter": 4000, "short161": 15_839, "long161": 16_161, "short160": 15_840, "long160": 16_160}
    for name, length in cases.items():
        sf.write(tmp_path / f"{name}.wav", tone(length, 16_000), 16_000)
    sf.write(tmp_path / "half.wav", tone(8160, 16_000), 16_000)
    dataset = AudioDataset([ManifestEntry(name, str(tmp_path / f"{name}.wav"), 16_000) for name in cases]
                           + [ManifestEntry("half", str(tmp_path / "half.wav"), 8000)], normalize=False)
    items = {name: dataset[i] for i, name in enumerate([*cases, "half"])}
    for name in ("quarter", "short161", "long161"):
        assert isinstance(items[name], Skipped), name
        assert items[name].reason.startswith(f"decoded {cases[name]} samples where the manifest says 16000"), name
    # a shorter decode names a damaged or cut-short file first (its header's length is what spidr manifest records)
    assert "damaged or cut short" in items["short161"].reason
    assert "damaged" not in items["long161"].reason
    for name in ("short160", "long160"):
        assert isinstance(items[name], Utterance), name
        assert items[name].waveform.shape == (cases[name],)
    assert isinstance(items["half"], Utterance)  # 160 over 8000: the 10 ms floor, not 1 % (80)


def test_the_tracker_judges_once_exactly_min_seen_utterances_were_read() -> None:
    """``min_seen`` reads are enough to judge: the 20th read of a tracker with min_seen = 20 already raises when
    too many were bad (and the 19th does not)."""
    tracker = BadFileTracker(0.04, min_seen=20)
    tracker.record(num_good=17, skipped=[("a.wav", "broken"), ("b.wav", "broken")])  # 19 reads, 2 bad
    with pytest.raises(ValueError, match="2 of 20 utterances read"):
        tracker.record(num_good=1, skipped=[])


def test_across_ranks_the_share_is_judged_once_exactly_min_seen_were_read() -> None:
    """D02. Shared tracker, min_seen 4: after exactly 4 reads (2 bad, 50 % > 10 %) the ranks' check raises."""
    tracker = BadFileTracker(0.1, min_seen=4, shared=True)
    tracker.record(num_good=2, skipped=[("a.wav", "x"), ("b.wav", "y")])
    with pytest.raises(AgreedValueError, match="2 of 4 utterances read by all ranks"):
        tracker.check_across_ranks(torch.device("cpu"))


def test_across_ranks_an_ended_epoch_is_judged_before_min_seen_also_after_a_resume() -> None:
    """D06, D03. The class docstring: the share is checked once min_seen were read *or by the end of every epoch*.
    A small set (3 reads, 2 bad) whose epoch ended is judged across ranks; the ended epoch survives a resume."""
    tracker = BadFileTracker(0.1, min_seen=200, shared=True)
    tracker.record(num_good=1, skipped=[("a.wav", "x"), ("b.wav", "y")])
    tracker.check_across_ranks(torch.device("cpu"))  # epoch not over, 3 < 200 reads: not judged yet
    tracker.end_of_pass(yielded_any=True)
    state = tracker.state_dict()
    with pytest.raises(AgreedValueError, match="2 of 3 utterances read by all ranks"):
        tracker.check_across_ranks(torch.device("cpu"))
    resumed = BadFileTracker(0.1, min_seen=200, shared=True)
    resumed.load_state_dict(state)
    with pytest.raises(AgreedValueError, match="2 of 3 utterances read by all ranks"):
        resumed.check_across_ranks(torch.device("cpu"))


def test_a_damaged_ogg_listed_by_a_fresh_manifest_is_skipped_as_damaged(tmp_path: Path) -> None:
    """A damaged Ogg Vorbis page: spidr manifest keeps the header's length, the decode is shorter. The reason named a
    stale manifest and asked for a new one, which says the same: it now names the damage first."""
    from spidr.data.scanning import scan

    rng = np.random.default_rng(3)
    path = tmp_path / "damaged.ogg"
    sf.write(path, 0.3 * rng.standard_normal(16000 * 5), 16000, format="OGG", subtype="VORBIS")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 500] = rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    (entry,) = scan(tmp_path, (".ogg",), progress=False).entries
    assert entry.num_samples == 80_000  # the header's
    item = AudioDataset([entry])[0]
    assert isinstance(item, Skipped)
    decoded = len(sf.read(path)[0])
    assert item.reason.startswith(f"decoded {decoded} samples where the manifest says 80000: the file is damaged or "
                                  "cut short (it decodes shorter than its header says: repair or remove it)")

