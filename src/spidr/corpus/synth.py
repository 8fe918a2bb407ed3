"""Make the whole corpus: plan the sentences, synthesise them in parallel, check them, write the files.

Output layout of ``synthesize_corpus(out_dir, ...)``:

    out_dir/wavs/<speaker>/<voice>-<index>.wav   16 kHz mono 16-bit; utterance id = file stem
    out_dir/manifest.csv, alignments.tsv, alignments.jsonl, frame_labels_20ms.jsonl,
    out_dir/phoneme.item, triphone.item, utterances.tsv, speakers.tsv   (see ``spidr.corpus.outputs``)
    out_dir/info.json                             parameters, counts, dropped utterances; written last

The output depends only on the parameters (voices, utterances per voice, seed, same-text fraction, rate jitter,
and the SHA-256 of the shipped word lists and phone tables, which ``info.json`` records with them):
every utterance's text and speed come from string-seeded generators, every engine call is independent of the
others, and the files list utterances in plan order, so the worker count never changes a byte. A second call
with the same parameters finds ``info.json`` and reuses the corpus (or makes it again if one of its files is gone).
The audio is bit-exact for one set of engine versions, which ``info.json`` records (``engines``) but a reuse does not
compare: an upgraded flite, festival or espeak-ng may speak a few samples differently.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spidr import __version__
from spidr.child_processes import end_with_parent
from spidr.corpus import outputs, text
from spidr.corpus.engines import Request, engine_versions
from spidr.corpus.phones import phone_inventory, phone_maps_digest
from spidr.corpus.utterance import SAMPLE_RATE, Dropped, Utterance, synthesize_batch
from spidr.corpus.voices import DEFAULT_VOICES, WARP_RANGE, Voice, parse_voice, require_available
from spidr.folder_lock import LOCK_NAME, folder_lock

logger = logging.getLogger(__name__)

FORMAT_VERSION = 4  # bump when the files or the plan change, so old caches are not reused (2: espeak l, r, closures;
# 3: breathy espeak variants' voiceless stops get their closure, ked_diphone's inserted r is merged into its er;
# 4: "an honest", "a usual": the article goes by the next word's first sound)
MEAN_UTTERANCE_S = 3.0  # measured mean over the default voices; turns --hours into utterances per voice
BATCH_SIZE = 16  # utterances per task: amortises festival's start-up, small enough to balance the workers
WAV_DIR = "wavs"
IN_PROGRESS = ".synth-corpus-in-progress"
# What the installed spidr ships rather than what the caller chose: a cache differing only in these was made by
# another version (or from edited tables) with the same parameters, and is made again rather than refused.
_SHIPPED = frozenset({"format", "words", "phone_maps"})


@dataclass(frozen=True)
class CorpusInfo:
    """A synthesised corpus: where its files are and what is in it (the content of ``info.json``)."""

    out_dir: Path
    parameters: dict[str, Any]
    num_utterances: int
    num_dropped: int
    hours: float
    speakers: dict[str, str]  # voice name → speaker label

    @property
    def manifest(self) -> Path:
        return self.out_dir / outputs.MANIFEST

    @property
    def alignments_tsv(self) -> Path:
        return self.out_dir / outputs.ALIGNMENTS_TSV

    @property
    def alignments_jsonl(self) -> Path:
        """10 ms frame labels (SpidR's alignment format)."""
        return self.out_dir / outputs.ALIGNMENTS_JSONL

    @property
    def frame_labels_20ms(self) -> Path:
        return self.out_dir / outputs.FRAME_LABELS_20MS

    @property
    def phoneme_item(self) -> Path:
        return self.out_dir / outputs.PHONEME_ITEM

    @property
    def triphone_item(self) -> Path:
        return self.out_dir / outputs.TRIPHONE_ITEM

    @classmethod
    def load(cls, out_dir: str | Path) -> CorpusInfo:
        """Read ``out_dir/info.json`` written by ``synthesize_corpus``."""
        out_dir = Path(out_dir).resolve()
        path = out_dir / outputs.INFO_JSON
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            return cls(out_dir, info["parameters"], info["num_utterances"], info["num_dropped"], info["hours"],
                       {name: voice["speaker"] for name, voice in info["voices"].items()})
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a corpus info file written by spidr synth-corpus: {error}") from None


# Planning -----------------------------------------------------------------------------------------------------


def resolve_voices(names: Sequence[str] | None, warps: Sequence[float] = ()) -> list[Voice]:
    """Voices from names (default: ``DEFAULT_VOICES``) plus, for each warp factor, a warped copy of each unwarped
    one."""
    base = [parse_voice(name) for name in (names if names is not None else DEFAULT_VOICES)]
    for warp in warps:
        if not WARP_RANGE[0] <= warp <= WARP_RANGE[1] or warp == 1:  # also refuses nan
            raise ValueError(f"--warp factor {warp:g} must be in [{WARP_RANGE[0]}, {WARP_RANGE[1]}] and not 1 "
                             "(0.85-1.2 sounds natural)")
    if warps and all(voice.warp != 1 for voice in base):  # a warp of a warped voice is not a voice
        raise ValueError(f"--warp {','.join(f'{warp:g}' for warp in warps)} warps unwarped voices, and every selected "
                         f"voice is warped already ({', '.join(voice.name for voice in base)}); select the voices "
                         "to warp by their plain names")
    warped = [parse_voice(f"{voice.name}_w{warp:g}") for warp in warps for voice in base if voice.warp == 1]
    selected = list({voice.name: voice for voice in [*base, *warped]}.values())  # first occurrence wins
    if not selected:
        raise ValueError("no voices selected; pass at least one voice name")
    return selected


def utterances_per_voice(hours: float, num_voices: int) -> int:
    """How many utterances each voice reads so the corpus lasts about ``hours`` hours."""
    if not math.isfinite(hours) or hours <= 0:
        raise ValueError(f"hours (--hours) = {hours} must be a finite number of hours > 0")
    return max(1, math.ceil(hours * 3600 / (num_voices * MEAN_UTTERANCE_S)))


def plan(selected: list[Voice], count: int, *, seed: int, same_text_fraction: float,
         rate_jitter: float) -> dict[str, list[Request]]:
    """Each voice's requests: ``round(fraction × count)`` sentences shared by every voice, then its own ones.

    A voice's own sentences and speeds depend only on (seed, voice name), not on the other voices selected.
    """
    num_shared = round(same_text_fraction * count)
    shared = text.sentences(f"{seed}:shared", num_shared)
    requests = {}
    for voice in selected:
        sentences = shared + text.sentences(f"{seed}:{voice.name}", count - num_shared)
        speeds = random.Random(f"{seed}:{voice.name}:rate")
        requests[voice.name] = [
            Request(f"{voice.name}-{i:05d}", sentence, round(1 + speeds.uniform(-rate_jitter, rate_jitter), 3))
            for i, sentence in enumerate(sentences)
        ]
    return requests


# Running ------------------------------------------------------------------------------------------------------


def _run_batch(task: tuple[Voice, list[Request], Path]) -> list[Utterance | Dropped]:
    return synthesize_batch(*task)


def run_tasks(tasks: list[Any], jobs: int, worker: Any = _run_batch) -> list[list[Utterance | Dropped]]:
    """Run ``worker`` (a module-level function) on every task, in worker processes when ``jobs > 1``; results come
    back in task order."""
    from tqdm import tqdm

    progress = tqdm(total=len(tasks), desc="synthesising", unit="batch", disable=None)
    try:
        if jobs == 1:
            results = []
            for task in tasks:
                results.append(worker(task))
                progress.update()
            return results
        # spawn: workers start clean (no inherited torch threads), and espeak-ng state is per process anyway.
        # The workers die with this process: a kill -9 left them writing into the folder a rerun works in.
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks)), initializer=end_with_parent,
                                                       initargs=(os.getpid(),)) as pool:
            results = []
            for result in pool.imap(worker, tasks):
                results.append(result)
                progress.update()
            return results
    finally:
        progress.close()


class OtherCorpusError(ValueError):
    """``out_dir`` holds a corpus made with other parameters (``changed``): a caller may word its own advice."""

    def __init__(self, message: str, *, out_dir: Path, changed: list[str]) -> None:
        super().__init__(message)
        self.out_dir, self.changed = out_dir, changed


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _reuse(out_dir: Path, parameters: dict[str, Any], *, overwrite: bool) -> CorpusInfo | None:
    """The corpus in ``out_dir`` if it was made with ``parameters``; ``None`` if a new one may be made there
    (``overwrite`` replaces a corpus of other parameters, never a folder that holds no corpus)."""
    if (out_dir / outputs.INFO_JSON).is_file():
        existing = CorpusInfo.load(out_dir)
        if existing.parameters == parameters:
            return existing if outputs.reusable(out_dir, "corpus", outputs.missing_files(out_dir)) else None
        changed = sorted(k for k in {*parameters, *existing.parameters}
                         if parameters.get(k) != existing.parameters.get(k))
        if set(changed) <= _SHIPPED:
            # Made by another spidr version (or from other word lists or phone tables) from the same parameters: a
            # cache that this installation makes otherwise.
            logger.warning("the corpus in %s was made by another spidr version or from other shipped tables "
                           "(differing: %s; format %s, now %s): making it again", out_dir, ", ".join(changed),
                           existing.parameters.get("format"), parameters["format"])
            return None
        if not overwrite:
            raise OtherCorpusError(
                f"{out_dir} already holds a corpus made with other parameters (differing: {', '.join(changed)}); "
                f"choose another directory, or delete {out_dir} to make it again (spidr synth-corpus can also "
                "replace it: --overwrite)", out_dir=out_dir, changed=changed)
    else:
        _refuse_foreign(out_dir)
    return None


def _refuse_foreign(out_dir: Path) -> None:
    """Refuse a folder that holds files but no corpus (nor an interrupted one): making a corpus there clears it."""
    if (out_dir.is_dir() and any(path.name != LOCK_NAME for path in out_dir.iterdir())
            and not (out_dir / IN_PROGRESS).exists() and not (out_dir / outputs.INFO_JSON).is_file()):
        raise ValueError(f"{out_dir} is not empty and holds no corpus; choose a new or empty directory "
                         "(--overwrite replaces a corpus only: it would delete the files of this folder)")


def _clear(out_dir: Path) -> None:
    """Remove what a previous (possibly interrupted) run wrote; anything else in ``out_dir`` is left alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / IN_PROGRESS).touch()
    (out_dir / outputs.INFO_JSON).unlink(missing_ok=True)
    shutil.rmtree(out_dir / WAV_DIR, ignore_errors=True)
    for name in outputs.WRITTEN:
        (out_dir / name).unlink(missing_ok=True)


def synthesize_corpus(
    out_dir: str | Path,
    *,
    voices: Sequence[str] | None = None,
    num_utterances_per_voice: int | None = None,
    hours: float | None = None,
    seed: int = 0,
    same_text_fraction: float = 0.25,
    warps: Sequence[float] = (),
    rate_jitter: float = 0.1,
    jobs: int | None = None,
    overwrite: bool = False,
) -> CorpusInfo:
    """Synthesise a phone-aligned multi-speaker corpus into ``out_dir`` (or reuse the one already there).

    Give either ``num_utterances_per_voice`` or ``hours`` (total, approximate; default 20 utterances per voice).
    ``voices`` are names from ``available_voices()`` or warped names like ``"awb_w0.9"``; ``warps`` adds a warped
    copy of every voice per factor. ``same_text_fraction`` of each voice's sentences are read by every voice
    (more cross-speaker triphone overlap); ``rate_jitter`` varies each utterance's speed by up to ±that fraction.
    ``jobs`` worker processes (default: all CPUs) never change the output.
    """
    out_dir = outputs.writable_out_dir(out_dir)
    selected = resolve_voices(voices, warps)
    if num_utterances_per_voice is not None and hours is not None:
        raise ValueError("give either num_utterances_per_voice or hours, not both")
    if hours is not None:
        count = utterances_per_voice(hours, len(selected))
    else:
        count = 20 if num_utterances_per_voice is None else num_utterances_per_voice
    if count < 1:
        raise ValueError(f"num_utterances_per_voice = {count} must be >= 1")
    if not 0.0 <= same_text_fraction <= 1.0:
        raise ValueError(f"same_text_fraction = {same_text_fraction} must be in [0, 1]")
    if not 0.0 <= rate_jitter < 0.5:
        raise ValueError(f"rate_jitter = {rate_jitter} must be in [0, 0.5)")
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs = {jobs} must be >= 1")
    parameters = {"format": FORMAT_VERSION, "voices": [voice.name for voice in selected],
                  "num_utterances_per_voice": count, "seed": seed, "same_text_fraction": same_text_fraction,
                  "rate_jitter": rate_jitter, "words": text.words_digest(), "phone_maps": phone_maps_digest()}
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory; choose a directory for the corpus")
    if not (out_dir / outputs.INFO_JSON).is_file():  # checked before the folder is made
        _refuse_foreign(out_dir)
        require_available(selected)  # (a finished corpus needs no engine)
    # One process at a time makes a corpus folder; another one (a second learning curve on the same --out) waits,
    # then reuses the corpus (two at once deleted each other's files).
    with folder_lock(out_dir, f"the corpus synthesis into {out_dir}", wait=True):
        cached = _reuse(out_dir, parameters, overwrite=overwrite)
        if cached is not None:  # made before: the engines need not even be installed
            # Complete (info.json and every file): a marker left by a kill between writing info.json and removing it
            # would say "in progress" for good.
            (out_dir / IN_PROGRESS).unlink(missing_ok=True)
            return cached
        require_available(selected)  # (a corpus of other parameters was there)
        _clear(out_dir)
        return _synthesize(out_dir, parameters, selected, jobs)


def _synthesize(out_dir: Path, parameters: dict[str, Any], selected: list[Voice], jobs: int) -> CorpusInfo:
    """Make the corpus of ``parameters`` in the cleared ``out_dir``."""
    count, seed = parameters["num_utterances_per_voice"], parameters["seed"]
    started = time.perf_counter()
    requests = plan(selected, count, seed=seed, same_text_fraction=parameters["same_text_fraction"],
                    rate_jitter=parameters["rate_jitter"])
    tasks = [(voice, requests[voice.name][i:i + BATCH_SIZE], out_dir / WAV_DIR)
             for i in range(0, count, BATCH_SIZE) for voice in selected]  # voices interleaved: balances slow ones
    results = run_tasks(tasks, jobs)
    by_id = {record.utt_id: record for batch in results for record in batch}
    records = [by_id[request.utt_id] for voice in selected for request in requests[voice.name]]  # plan order
    kept = [r for r in records if isinstance(r, Utterance)]
    dropped = [r for r in records if isinstance(r, Dropped)]
    if dropped:
        logger.warning("dropped %d of %d utterances (listed in info.json), e.g. %s: %s", len(dropped), len(records),
                       dropped[0].utt_id, dropped[0].reason)
    if not kept:
        raise ValueError(f"{out_dir}: every utterance was dropped, so no corpus was written; "
                         f"first reason: {dropped[0].reason}")

    outputs.write_all(out_dir, kept, selected)
    info = _info(parameters, selected, kept, dropped)
    outputs.write_text(out_dir / outputs.INFO_JSON, [json.dumps(info, indent=1)])
    (out_dir / IN_PROGRESS).unlink()
    elapsed = time.perf_counter() - started
    logger.info("synthesised %d utterances (%.3f h, %d dropped) in %.1f s with %d jobs: %.0f s per hour of audio",
                len(kept), info["hours"], len(dropped), elapsed, jobs, elapsed / max(info["hours"], 1e-9))
    return CorpusInfo.load(out_dir)


def _info(parameters: dict[str, Any], selected: list[Voice], kept: list[Utterance],
          dropped: list[Dropped]) -> dict[str, Any]:
    """The content of info.json: parameters, what was made, what was dropped and why (nothing time-dependent)."""
    phone_counts = Counter(phone for u in kept for _, _, phone in u.segments)
    return {
        "format": FORMAT_VERSION,
        "spidr_version": __version__,
        "parameters": parameters,
        "engines": engine_versions(),
        "sample_rate": SAMPLE_RATE,
        "num_utterances": len(kept),
        "num_dropped": len(dropped),
        "hours": round(sum(u.num_samples for u in kept) / SAMPLE_RATE / 3600, 6),
        "voices": {
            voice.name: {
                "engine": voice.engine, "engine_voice": voice.engine_voice, "speaker": voice.speaker,
                "person": voice.person, "gender": voice.gender, "warp": voice.warp,
                "num_utterances": sum(u.voice == voice.name for u in kept),
                "seconds": round(sum(u.num_samples for u in kept if u.voice == voice.name) / SAMPLE_RATE, 4),
            }
            for voice in selected
        },
        "speakers": list(dict.fromkeys(voice.speaker for voice in selected)),
        "phone_inventory": list(phone_inventory()),
        "phone_counts": {phone: phone_counts[phone] for phone in phone_inventory()},
        "dropped": [{"utt_id": d.utt_id, "voice": d.voice, "text": d.text, "reason": d.reason} for d in dropped],
    }
