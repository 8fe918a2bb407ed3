"""Manifest entries → waveforms, where a bad file becomes a ``Skipped`` record instead of an exception.

A corrupt file deep inside a 960 h corpus must not kill a multi-day run, nor be silently ignored: the dataset turns
each ``AudioError`` into a ``Skipped`` item, the collator moves it to ``Batch.skipped``, and the loader (in the main
process, so each file is reported once whatever the worker count) feeds ``BadFileTracker``, which logs every bad
file once, keeps the tally and stops the run when too large a share of the data is unusable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from spidr.data.audio import AudioError, load_audio
from spidr.data.manifest import Manifest, ManifestEntry
from spidr.distributed import AgreedValueError, all_gather_objects, all_reduce_sum, rank

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Utterance:
    index: int  # position in the manifest
    fileid: str
    waveform: torch.Tensor  # (S,) float32 at 16 kHz


@dataclass(frozen=True)
class Skipped:
    index: int
    location: str
    reason: str


class AudioDataset(Dataset):
    """Item ``i`` is manifest entry ``i`` decoded (and standardised if ``normalize``), or ``Skipped`` if unusable."""

    def __init__(self, entries: Sequence[ManifestEntry], *, normalize: bool = True, min_samples: int = 0) -> None:
        # A columnar Manifest: forked DataLoader workers share it without copying (no per-row Python objects).
        self.entries = entries if isinstance(entries, Manifest) else Manifest.from_entries(entries)
        self.normalize = normalize
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Utterance | Skipped:
        entry = self.entries[index]
        try:
            waveform = load_audio(entry, normalize=self.normalize, min_samples=self.min_samples)
        except AudioError as error:
            return Skipped(index, error.path, error.reason)
        if abs(waveform.shape[0] - entry.num_samples) > length_tolerance(entry.num_samples):
            # Batches are planned from the manifest's lengths: a file longer than it says would overflow
            # data.max_batch_length (memory), a shorter one would waste it.
            # (spidr manifest records a header's length: a damaged or cut-short compressed file decodes shorter,
            # and a new manifest would say the same)
            damaged = ("the file is damaged or cut short (it decodes shorter than its header says: repair or remove "
                       "it), or " if waveform.shape[0] < entry.num_samples else "")
            return Skipped(index, entry.location, f"decoded {waveform.shape[0]} samples where the manifest says "
                                                  f"{entry.num_samples}: {damaged}the file changed since the manifest "
                                                  "was written, or the manifest counts samples at the file's own "
                                                  "rate, not 16 kHz (fairseq's do; write it again with spidr "
                                                  "manifest)")
        return Utterance(index, entry.fileid, waveform)


def length_tolerance(num_samples: int) -> int:
    """How far a decoded length may be from the manifest's: resampling rounds by a few samples; 10 ms or 1 %."""
    return max(160, num_samples // 100)


class BadFileTracker:
    """Counts utterances read and unusable ones; logs each bad file once; raises when too many are bad.

    The share is checked once ``min_seen`` utterances were read (so one early bad file cannot stop a run) and by
    ``end_of_pass()`` at the end of every epoch. With several ranks (``shared``) a rank must not raise alone: the
    others would wait for it in their next collective until it times out. The share is then checked by the trainer
    at steps that every rank reaches, over all ranks' counts (``check(totals=...)``), so that all ranks stop
    together; a rank raises alone only when a whole epoch gave it no usable batch (it could never reach such a step).
    At those steps the ranks also share the bad files each found since: the first rank logs each file once (every
    rank met it, or one), and every rank's error then names examples from all of them.
    """

    def __init__(self, max_bad_fraction: float, *, source: str = "the manifest", min_seen: int = 200,
                 shared: bool = False, section: str = "data") -> None:
        """``section``: the config section whose ``max_bad_fraction`` this is ("data", "validation.NAME")."""
        self.max_bad_fraction = max_bad_fraction
        self.source = source
        self.section = section
        self.min_seen = min_seen
        self.shared = shared
        self.seen = 0
        self.bad = 0
        self.passes = 0  # epochs (or validation passes) that ended
        self.reasons: dict[str, str] = {}  # location → reason, first occurrence only
        self._unshared: dict[str, str] = {}  # (shared) found here since the ranks last shared theirs

    def record(self, *, num_good: int, skipped: Sequence[tuple[str, str]]) -> None:
        """Account for one batch: ``num_good`` usable utterances and the ``(location, reason)`` of skipped ones."""
        self.seen += num_good + len(skipped)
        self.bad += len(skipped)
        for location, reason in skipped:
            if self.shared:  # logged once for all ranks when they share their files (check_across_ranks)
                if location not in self.reasons:
                    self._unshared.setdefault(location, reason)
            elif location not in self.reasons:
                self.reasons[location] = reason
                logger.warning("skipping unusable audio %s: %s", location, reason)
        if self.seen >= self.min_seen and not self.shared:
            self.check()

    def end_of_pass(self, *, yielded_any: bool) -> None:
        """The end of an epoch (or of a validation pass) that yielded a usable batch or not."""
        self.passes += 1
        if not self.shared or not yielded_any:
            self.check()

    def check_across_ranks(self, device: torch.device) -> None:
        """``check`` over every rank's counts, once ``min_seen`` were read in all or an epoch ended somewhere. A
        collective: every rank must call it at the same point (the trainer does at log steps and validations). A
        tracker of one process (not ``shared``) has judged its own counts already: nothing to do."""
        if not self.shared:
            return
        counts = all_reduce_sum(torch.tensor([self.seen, self.bad, self.passes, len(self._unshared)],
                                             dtype=torch.float64, device=device))
        seen, bad, passes, new = (round(value) for value in counts.tolist())
        if new:  # a count every rank agrees on: they all gather, or none
            self._share_new_files()
        if seen >= self.min_seen or passes:
            try:
                self.check(totals=(seen, bad))
            except ValueError as error:
                raise AgreedValueError(str(error)) from None

    def _share_new_files(self) -> None:
        """Gather the bad files every rank found since the last call: each is logged once, by the first rank, and
        every rank's ``reasons`` (the examples its errors name) holds them all."""
        for found in all_gather_objects(self._unshared):
            for location, reason in found.items():  # type: ignore[union-attr]
                if location not in self.reasons:
                    self.reasons[location] = reason
                    if rank() == 0:
                        logger.warning("skipping unusable audio %s: %s", location, reason)
        self._unshared = {}

    def state_dict(self) -> dict[str, Any]:
        """The tally so far (a resumed run goes on counting from it)."""
        return {"seen": self.seen, "bad": self.bad, "passes": self.passes, "reasons": dict(self.reasons)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.bad, self.passes = int(state["seen"]), int(state["bad"]), int(state["passes"])
        self.reasons = dict(state["reasons"])  # files reported before the resume are not reported again

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def check(self, *, totals: tuple[int, int] | None = None) -> None:
        """Raise ``ValueError`` if more than ``max_bad_fraction`` of the utterances read so far were unusable:
        those read here, or ``totals`` = (read, unusable) summed over every rank."""
        seen, bad = totals if totals is not None else (self.seen, self.bad)
        fraction = bad / seen if seen else 0.0
        if fraction <= self.max_bad_fraction:
            return
        known = {**self.reasons, **self._unshared}
        examples = "; ".join(f"{loc}: {why}" for loc, why in list(known.items())[:5]) or "none on this rank"
        where = " by all ranks" if totals is not None else ""
        raise ValueError(
            f"{bad} of {seen} utterances read{where} from {self.source} were unusable ({fraction:.1%}, more "
            f"than {self.section}.max_bad_fraction = {self.max_bad_fraction:.1%}); e.g. {examples}. Fix or remove "
            f"these files from the manifest, or raise {self.section}.max_bad_fraction"
        )

    def summary(self) -> str:
        here = " on this rank" if self.shared else ""  # (its counts are its own; the ranks' sum is checked)
        known = {**self.reasons, **self._unshared}
        if not known:
            return f"all {self.seen} utterance reads{here} from {self.source} (every epoch's) were usable"
        return (f"{len(known)} distinct unusable file(s) in {self.source}; {self.bad} of {self.seen} reads{here} "
                f"skipped ({self.fraction:.2%})")
