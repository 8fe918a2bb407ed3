"""``spidr lm-units``: the unit files of a whole spoken-LM benchmark, ready for ``lm-train`` and ``lm-score``.

A benchmark folder (``spidr synth-lm-bench``, or your own in the same layout) holds sets of audio: ``train/`` (the LM
training corpus) and ``<task>/<split>/`` (test items), each with a ``manifest.csv`` (else its wavs are scanned). This
writes, for every set, one units file:

    OUT/train.jsonl, OUT/<task>/<split>.jsonl                   with ``--oracle`` (the sets' 20 ms phone labels)
    OUT/layer_LL/train.jsonl, OUT/layer_LL/<task>/<split>.jsonl  from a model: codebook or k-means units per layer

so that ``lm-train --set data.train=OUT/layer_LL/train.jsonl`` and ``lm-score CKPT OUT/layer_LL SUB`` read them. One
forward pass per file gives every requested layer. k-means centroids are fitted on a seeded sample of the training
set's frames (``--kmeans K``; kept as ``OUT/layer_LL/centroids.safetensors``, to give other audio the same units),
or read from ``--centroids`` files.

A model's units resume set by set: ``OUT/.lm-units.json`` records what they are made from (the weights' fingerprint,
the layers, the dtype, the units' source, each set's utterances and the sizes and modification times of its audio
files) and which sets are finished. A rerun with the same inputs skips the finished sets (and reads the fitted
centroids back instead of fitting them again); one with other inputs is refused, naming what differs, rather than
mixing units of two models (or of old and rewritten audio) in one folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spidr.atomic_files import replaced_when_done, write_atomically
from spidr.folder_lock import folder_lock
from spidr.in_progress import marked_in_progress, refuse_unfinished
from spidr.lm.score import SPLITS, TASKS

logger = logging.getLogger(__name__)

FRAME_LABELS = "frame_labels_20ms.jsonl"
MAX_KMEANS_FRAMES = 200_000
STATE_FILE = ".lm-units.json"  # OUT's record: what its units are made from, and the finished sets
AUDIO_KEY = "audio"  # the record's per-set digests of the audio files' sizes and modification times
CENTROIDS_FILE = "centroids.safetensors"  # OUT/layer_LL/: the k-means centroids fitted by lm-units
# Present while lm-units writes a units folder (from its first file to its last): lm-score refuses such a folder,
# whose sets may be missing (a killed run's submission lacked them, and lm-score exited 0).
IN_PROGRESS = ".lm-units-in-progress"


def refuse_unfinished_units(units_dir: str | Path) -> None:
    """Raise if ``units_dir`` (an lm-units OUT, or its ``layer_LL`` folder) is being written or was left unfinished
    by lm-units (killed or failed)."""
    units_dir = Path(units_dir).resolve()
    for folder in (units_dir, units_dir.parent):
        refuse_unfinished(folder, IN_PROGRESS, "lm-units")


def benchmark_sets(bench_dir: str | Path) -> dict[str, Path]:
    """``"train"`` and ``"<task>/<split>"`` → folder, for the sets present in ``bench_dir``."""
    from spidr.corpus import lm_bench

    bench_dir = Path(bench_dir)
    refuse_unfinished(bench_dir, lm_bench.IN_PROGRESS, "synth-lm-bench")
    sets = {}
    if (bench_dir / "train").is_dir():
        sets["train"] = bench_dir / "train"
    for task in TASKS:
        for split in SPLITS:
            if (bench_dir / task / split).is_dir():
                sets[f"{task}/{split}"] = bench_dir / task / split
    if not sets:
        raise ValueError(f"{bench_dir} holds no benchmark set: expected train/ and/or <task>/<split>/ folders "
                         f"(task in {', '.join(TASKS)}, split dev or test)")
    return sets


@dataclass(frozen=True)
class BenchmarkSet:
    """One set's audio: its manifest's rows, or the files of a folder that has none, and the files that such a scan
    could not read (``(location, reason)``)."""

    folder: Path
    entries: Any  # spidr.data.manifest.Manifest
    unreadable: tuple[tuple[str, str], ...] = ()
    unread: tuple[Any, ...] = ()  # the unreadable files as entries (spidr.data.scanning.ScanResult.unread)


def read_set(folder: Path) -> BenchmarkSet:
    """A benchmark set's audio (``BenchmarkSet``); a scan logs each unreadable file once."""
    from spidr.data.manifest import read_manifest
    from spidr.data.scanning import scan

    manifest = folder / "manifest.csv"
    if manifest.is_file():
        return BenchmarkSet(folder, read_manifest(manifest))
    found = scan(folder, progress=False, include_hint="list every file of the set in its manifest.csv")
    return BenchmarkSet(folder, found.entries, tuple(found.failures), tuple(found.unread))


def read_benchmark(bench_dir: str | Path) -> dict[str, BenchmarkSet]:
    """Every set of ``bench_dir`` (``benchmark_sets``) read once, for the units folder's identity and its units."""
    return {name: read_set(folder) for name, folder in benchmark_sets(bench_dir).items()}


def split_entries(folder: Path):
    """The audio files of a benchmark set: its manifest's rows, or the folder's readable files when it has none."""
    return read_set(folder).entries


def write_oracle_units(bench_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Copy each set's 20 ms phone labels to ``out_dir/<set>.jsonl`` (the phone-oracle topline's units)."""
    out_dir = Path(out_dir)
    sources = {name: folder / FRAME_LABELS for name, folder in benchmark_sets(bench_dir).items()}
    for source in sources.values():  # before the marker: a refusal leaves OUT as it was
        if not source.is_file():
            raise ValueError(f"{source} does not exist: the oracle needs each set's frame labels")
    written = {}
    # One run per OUT (a second would copy alongside), and marked until every set is copied.
    with folder_lock(out_dir, f"lm-units --oracle into {out_dir}"), marked_in_progress(out_dir, IN_PROGRESS):
        for name, source in sources.items():
            target = out_dir / f"{name}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            with replaced_when_done(target) as partial:  # (a kill mid-copy left a cut file under the set's name)
                shutil.copyfile(source, partial)
            written[name] = target
    return written


def fit_centroids(model: torch.nn.Module, entries: Sequence, layers: Sequence[int], *, num_units: int, seed: int = 0,
                  dtype: str = "float32", max_frames: int = MAX_KMEANS_FRAMES,
                  max_seconds: float = 60.0) -> dict[int, torch.Tensor]:
    """k-means centroids per layer, fitted on a seeded sample of at most ``max_frames`` frames of ``entries``
    (each frame kept with the same chance; the same frames for every layer, whichever are fitted together; files
    longer than ``max_seconds`` run window by window, unreadable ones are skipped: ``iter_extracted``)."""
    from spidr.eval.features import ExtractionSettings, iter_extracted, window_settings
    from spidr.eval.kmeans import fit_kmeans
    from spidr.models.frames import num_frames

    conv_layers = model.cfg.extractor_conv_layer_config
    total = sum(num_frames(int(entry.num_samples), conv_layers) for entry in entries)
    keep = min(1.0, max_frames / max(total, 1))
    settings = ExtractionSettings(layers=tuple(sorted(layers)), dtype=dtype, **window_settings(max_seconds))

    # One generator per layer, each seeded alike: every layer draws the same mask for a file's frames, so a layer's
    # sample (and its centroids) is the same whichever other layers are fitted with it, and all share their frames.
    generators: dict[str, np.random.Generator] = {}

    def sample(key: str, frames: np.ndarray) -> np.ndarray:
        rng = generators.setdefault(key, np.random.default_rng(seed))
        return frames[rng.random(frames.shape[0]) < keep]

    samples: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for _, result in iter_extracted(model, entries, settings, keep=sample):
        for layer in layers:
            samples[layer].append(result[f"layer_{layer:02d}"])
    if not any(part.size for part in samples[layers[0]]):
        raise ValueError(f"no frame to fit k-means centroids on: none of the {len(entries)} training files could be "
                         "read (see the warnings above)")
    return {layer: torch.as_tensor(fit_kmeans(np.concatenate(parts), num_units, seed=seed), dtype=torch.float32)
            for layer, parts in samples.items()}


def units_folder_identity(model: torch.nn.Module, bench_dir: str | Path, *, layers: Sequence[int], dtype: str,
                          kmeans: int = 0, seed: int = 0,
                          given_centroids: Mapping[int, torch.Tensor] | None = None,
                          sets: Mapping[str, BenchmarkSet] | None = None) -> dict[str, Any]:
    """What a model's units folder is made from (``STATE_FILE``): the weights and config (fingerprint), the layers,
    the dtype, where the units come from (codebooks; k-means fitted with K and a seed; given centroids' digests),
    the sets' utterances (names, ids, resolved paths, lengths: one digest, whichever way BENCH_DIR is spelled), the
    sizes and modification times of each set's audio files (one digest per set: audio rewritten in place) and, for
    a benchmark of ``synth-lm-bench``, its ``info.json``. ``sets``: ``read_benchmark`` of the resolved
    ``bench_dir``, when the caller has read it already."""
    import hashlib

    from spidr.eval.journal import audio_stamps, entries_fingerprint, model_fingerprint
    from spidr.models.inference_precision import precision_identity

    given = {str(layer): hashlib.sha1(f"{tuple(tensor.shape)}".encode()
                                      + tensor.contiguous().numpy().tobytes()).hexdigest()
             for layer, tensor in sorted((given_centroids or {}).items())}
    source: Any = "codebooks"
    if kmeans or given:
        from spidr.eval.kmeans import ASSIGNMENT

        source = ({"given_centroids": given} | ({"kmeans": kmeans, "seed": seed} if kmeans else {})
                  | {"assignment": ASSIGNMENT})
    sets = sets or read_benchmark(Path(bench_dir).resolve())
    utterances = hashlib.sha1()
    for name, found in sorted(sets.items()):
        utterances.update(f"{name}:{entries_fingerprint(found.entries)}\n".encode())
    identity = {"format": 1, "model": model_fingerprint(model), "layers": sorted(layers), "dtype": dtype,
                **precision_identity(dtype), "units": source, "utterances": utterances.hexdigest(),
                AUDIO_KEY: {name: hashlib.sha1(audio_stamps(found.entries).tobytes()).hexdigest()
                            for name, found in sorted(sets.items())}}
    # A synthetic benchmark remade in place may keep every file name and length with other audio (other nonwords of
    # the same length); its info.json, written once when it is made, tells it apart.
    info = Path(bench_dir) / "info.json"
    if info.is_file():
        identity["benchmark"] = hashlib.sha1(info.read_bytes()).hexdigest()
    return identity


def begin_units_folder(out_dir: str | Path, identity: Mapping[str, Any]) -> set[str] | None:
    """The sets already finished in ``out_dir`` by a run with this ``identity`` (an empty set: recorded, none
    finished yet), or None when the folder is begun now (nothing recorded, or nothing finished under the recorded
    inputs: files from an earlier spidr or a run without a record are written again). A record of other inputs
    with a finished set is refused, naming what differs."""
    from spidr.eval.journal import identity_differences

    state_path = Path(out_dir) / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = None
    except ValueError as error:
        raise ValueError(f"{state_path} is not the JSON lm-units writes ({error}); delete {out_dir} to start "
                         "again") from None
    if state is not None and not (isinstance(state, dict) and isinstance(state.get("identity", {}), dict)
                                  and isinstance(state.get("done", []), list)
                                  and all(isinstance(name, str) for name in state.get("done", []))):
        raise ValueError(f"{state_path} is not the JSON lm-units writes (an object with an identity object and a "
                         f"list of the sets done); delete {out_dir} to start again")
    recorded = (state or {}).get("identity") or {}
    done = (state or {}).get("done", [])
    if state is not None and recorded != identity and not done:
        # Nothing finished under the recorded inputs (a run refused or stopped before its first set, e.g. by a K
        # k-means could not fit): the folder is begun again with these, its centroids fitted again.
        state = None
    if state is not None and recorded != identity:
        same_otherwise = _without_audio(recorded) == _without_audio(identity)
        # The audio of the finished sets decides: a set not written yet is written from its audio as it is now.
        old_audio = recorded.get(AUDIO_KEY)
        changed = [name for name in identity.get(AUDIO_KEY, {}) if name in done and isinstance(old_audio, dict)
                   and old_audio.get(name) != identity[AUDIO_KEY][name]]
        if same_otherwise and changed:
            raise ValueError(f"{out_dir} holds units of audio files changed since, in set(s) {', '.join(changed)} of "
                             "the benchmark, as their sizes and modification times tell (a copy keeps the times with "
                             "cp -p, rsync -a or tar); delete it (and the LMs trained on its units) or write to "
                             "another OUT")
        if not (same_otherwise and AUDIO_KEY in identity):
            raise ValueError(f"{out_dir} holds units made from other inputs: "
                             f"{identity_differences(recorded, identity)}; delete it (and the LMs "
                             "trained on its units) or write to another OUT")
        # (unfinished sets' audio, or a record of a spidr that kept no stamps: this audio recorded from now on)
        _write_state(state_path, identity, done)
    if state is None:
        _write_state(state_path, identity, [])
        return None
    return set(state.get("done", []))


def _without_audio(identity: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in identity.items() if key != AUDIO_KEY}


def _write_state(path: Path, identity: Mapping[str, Any], done: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps({"identity": identity, "done": list(done)}, indent=1) + "\n")


def _check_skipped(name: str, found: BenchmarkSet, skipped: Mapping[str, str]) -> None:
    """Warn about the training files that gave no units; refuse a test set with such files."""
    if not skipped:
        return
    total = len(found.entries) + len(found.unreadable)
    examples = "; ".join(f"{location}: {reason}" for location, reason in list(skipped.items())[:3])
    if name == "train" and len(skipped) < total:
        logger.warning("%s: %d of %d training files gave no units and are left out (e.g. %s)", found.folder,
                       len(skipped), total, examples)
        return
    if name == "train":  # an empty training set, recorded finished, would be kept once the audio is back
        raise ValueError(f"{found.folder}: none of the {total} training files gave units ({examples}); fix or "
                         "replace them")
    more = "; ..." if len(skipped) > 3 else ""
    raise ValueError(f"{found.folder}: {len(skipped)} of {total} test files gave no units ({examples}{more}); a "
                     "submission needs a score for every test file: replace them, or remove them with their gold.csv "
                     "rows")


def write_model_units(model: torch.nn.Module, bench_dir: str | Path, out_dir: str | Path, *, layers: Sequence[int],
                      centroids: Mapping[int, torch.Tensor] | None = None, dtype: str = "float32",
                      batch_seconds: float = 60.0, identity: Mapping[str, Any] | None = None,
                      sets: Mapping[str, BenchmarkSet] | None = None) -> dict[str, Path]:
    """Units of every set and layer → ``out_dir/layer_LL/<set>.jsonl``; returns ``{"layer_LL/<set>": path}``.

    With ``identity`` (``units_folder_identity``, recorded by ``begin_units_folder``), each finished set is recorded in
    ``STATE_FILE`` and a set recorded before, with all its files present, is skipped. ``sets``: ``read_benchmark``
    of ``bench_dir``, when the caller has read it already.

    A training file that gives no units (unreadable, or shorter than one frame) is skipped with a warning; a test
    file is an error naming it, and the set's units files are not written: a submission needs a score for every
    test file, and lm-eval would only find the gap after the LM was trained and every item scored."""
    from spidr.data.audio import SAMPLE_RATE
    from spidr.models.frames import hop_length

    rate = SAMPLE_RATE / hop_length(model.cfg.extractor_conv_layer_config)
    out_dir = Path(out_dir)
    sets = sets or read_benchmark(bench_dir)
    row_names = set_row_names(sets)  # (test sets checked before any work, and before the folder records anything)
    done = sorted(begin_units_folder(out_dir, identity) or ()) if identity is not None else []
    written = {}
    with marked_in_progress(out_dir, IN_PROGRESS):
        for name, found in sets.items():
            paths = {layer: out_dir / f"layer_{layer:02d}" / f"{name}.jsonl" for layer in layers}
            written |= {f"layer_{layer:02d}/{name}": path for layer, path in paths.items()}
            if name in done and all(path.is_file() for path in paths.values()):
                if not _named_otherwise(found, paths):
                    logger.info("units of %s for layers %s were written by an earlier run: kept", name, list(layers))
                    continue
                logger.warning("units of %s were written by an older spidr, which named a file whose id an unreadable "
                               "file shares by that id alone: written again", name)
            _write_set_units(model, name, found, paths, row_names[name], centroids=centroids, dtype=dtype,
                             batch_seconds=batch_seconds, frame_rate=rate)
            logger.info("wrote units of %s for layers %s", name, list(layers))
            if identity is not None:
                done = sorted({*done, name})
                _write_state(out_dir / STATE_FILE, identity, done)
    return written


def _named_otherwise(found: BenchmarkSet, paths: Mapping[int, Path]) -> bool:
    """Whether the finished units files ``paths`` of ``found`` were written by a spidr that named rows without the
    files its scan could not read (their records lack ``skipped_stems``) where those files share ids with others,
    so that the rows are named otherwise now (``_row_names``)."""
    from spidr.eval.feature_dir import units_metadata_path
    from spidr.eval.folder_extraction import utterance_names

    if not found.unread:
        return False
    for path in paths.values():
        try:
            record = json.loads(units_metadata_path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict) or "skipped_stems" not in record:
            return utterance_names(found.entries, found.unread) != utterance_names(found.entries)
    return False


def set_row_names(sets: Mapping[str, BenchmarkSet]) -> dict[str, dict[str, str]]:
    """``{set: _row_names}`` of every set: a test set whose ids repeat is refused here, before any work."""
    return {name: _row_names(name, found) for name, found in sets.items()}


def _row_names(name: str, found: BenchmarkSet) -> dict[str, str]:
    """``{location: the name of its units row}`` of set ``name``: the utterance id, or, in the training set, the
    path where several files hold one id (as ``spidr extract`` names them; by id, lm-train refused the two rows). A
    submission names each test file by its id, so two of one id in a test set are refused, naming them."""
    from spidr.eval.folder_extraction import utterance_names

    if name != "train" and found.unreadable:  # (refused for that, not for the ids it shares: see _check_skipped)
        _check_skipped(name, found, dict(found.unreadable))
    names = {entry.location: row
             for entry, row in zip(found.entries, utterance_names(found.entries, found.unread), strict=True)}
    held = [location for location, row in names.items() if "/" in row]  # (named by path: their id repeats)
    if held and name != "train":
        raise ValueError(f"{found.folder}: {len(held)} files share utterance ids ({', '.join(held[:4])}"
                         f"{' ...' if len(held) > 4 else ''}); a ZeroSpeech submission names each test file by its "
                         "id: rename them")
    return names


def _write_set_units(model: torch.nn.Module, name: str, found: BenchmarkSet, paths: Mapping[int, Path],
                     row_names: Mapping[str, str], *, centroids: Mapping[int, torch.Tensor] | None, dtype: str,
                     batch_seconds: float, frame_rate: float) -> None:
    """The units of set ``name`` in ``paths`` (layer → units file), rows named by ``row_names`` (``_row_names``),
    each file with the record that spidr units writes beside its units (abx and units-quality read the frame rate
    from it)."""
    from spidr.eval.feature_dir import units_metadata_path
    from spidr.eval.features import iter_units
    from spidr.eval.folder_extraction import not_read_stems, output_root
    from spidr.eval.journal import codebook_units_source
    from spidr.eval.kmeans import centroids_digest

    with contextlib.ExitStack() as files:  # complete files only: a failure leaves no truncated units file
        handles = {}
        for layer, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = files.enter_context(replaced_when_done(path))
            handles[layer] = files.enter_context(partial.open("w", encoding="utf-8"))
        skipped = dict(found.unreadable)
        for entry, units in iter_units(model, found.entries, layers=list(paths), centroids=centroids, dtype=dtype,
                                       batch_seconds=batch_seconds, skipped=skipped):
            for layer, values in units.items():
                handles[layer].write(json.dumps({"name": row_names[entry.location], "units": values.tolist()})
                                     + "\n")
        _check_skipped(name, found, skipped)
    # (the files that gave no units, as spidr extract records them: see StemKeyed's skipped and root)
    skipped_paths = not_read_stems(found.entries, skipped, found.unread)
    root = output_root(found.entries)
    codebook = codebook_units_source(model) if any(not centroids or layer not in centroids for layer in paths) else ""
    for layer, path in paths.items():
        assigned = centroids[layer] if centroids and layer in centroids else None
        record = {"frame_rate_hz": frame_rate, "dedup": False, "source": "spidr lm-units", "layer": layer,
                  "units_source": codebook if assigned is None else centroids_digest(assigned),
                  "num_units": int(model.cfg.codebook_size) if assigned is None else int(assigned.shape[0]),
                  "skipped_stems": skipped_paths, "audio_root": root,
                  "units_file_bytes": path.stat().st_size}
        write_atomically(units_metadata_path(path), json.dumps(record, indent=2) + "\n")
