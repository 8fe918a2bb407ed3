"""The spoken-LM study on the synthetic benchmark: units → unit LMs → ZeroSpeech scores → correlation with quality.

``run_study(models, out_dir, ...)`` is the downstream half of ``make demo`` and of ``spidr lm-study``:

1. make (or reuse) the benchmark (``spidr.corpus.lm_bench``) in ``out_dir/bench``;
2. write the units of every set: the phone oracle (gold 20 ms phone labels) and each model's layers (codebook units,
   or k-means units fitted on the benchmark's training set);
3. train one LM per units source with the same config and budget — the oracle (the topline), every (model, layer),
   and a phone-bigram model on the oracle units (the baseline that balanced nonwords pin near 50 %); the oracle's LSTM
   before training (at 5 random initialisations) is the chance reference;
4. score every test item (``lm-score``, mean log-likelihood per token) and compute the accuracies (``lm-eval``);
5. correlate LM accuracy with unit quality per (model, layer) — ABX of the layer's features, unit ABX and PNMI, as
   the paper's figures 13–14 do — over the points scored (``lm-correlate``), and write ``spoken_lm.md`` /
   ``spoken_lm.json``, the per-point table ``points.csv`` and scatter plots. Unit quality is taken as given (the
   demo passes its report's figures, measured on its test corpus) or measured on the benchmark itself: PNMI of the
   training set's units against its phone labels, and ABX (within / across speaker, triphone items) of the units and
   of the layer's continuous features (angular DTW) on the syntactic split, whose sentences two held-out voices
   speak.

Every stage caches its output (a rerun resumes where it stopped). Units are reused only when they were made from
this benchmark (``bench_identity``: a benchmark deleted and made again with other settings is another one) and, for a
model's, from the same weights, layers and extraction settings (``units_identity``). A trained LM is reused only when
its config is this study's (where its files are aside, so a study folder may be moved or named otherwise) and it was
trained on the units its units folder holds now (the training data's fingerprint recorded in its checkpoint).
One study runs in a folder at a time (``out_dir/.lock``): a second one started there is refused, naming the first.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spidr.atomic_files import is_partial_name, replaced_when_done, write_atomically
from spidr.corpus.lm_bench import INFO_JSON, LmBenchInfo, LmBenchSettings, bench_parameters, generate_lm_bench
from spidr.eval.report import format_number
from spidr.folder_lock import folder_lock
from spidr.lm.bench_units import IN_PROGRESS as UNITS_IN_PROGRESS
from spidr.lm.bench_units import STATE_FILE as UNITS_STATE_FILE
from spidr.lm.bench_units import fit_centroids, write_model_units, write_oracle_units
from spidr.lm.score import TASKS
from spidr.lm.train import LOSS_TARGETS, write_untrained

if TYPE_CHECKING:
    from spidr.eval.items import Items
    from spidr.lm.config import LmConfig

logger = logging.getLogger(__name__)

# swuggy_seen_invocab: sWUGGY on voices the LM was trained on (a benchmark made with seen_voices), the lexical
# number that does not also need units that carry over to a new voice.
LM_METRICS = ("swuggy_all", "swuggy_invocab", "sblimp", "tsc", "swuggy_seen_invocab")
# abx_*: ABX of the layer's continuous features; unit_abx_*: of its discrete units (the paper's "continuous" and
# "discrete" ABX).
QUALITY_METRICS = ("abx_within", "abx_across", "unit_abx_within", "unit_abx_across", "pnmi")


@dataclass(frozen=True)
class StudyModel:
    """A model whose units are studied: its layers and, per layer, unit-quality figures (e.g. from the report; when
    absent, measured on the benchmark)."""

    name: str
    model: torch.nn.Module
    layers: tuple[int, ...]
    quality: Mapping[int, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class StudySettings:
    bench: LmBenchSettings = field(default_factory=LmBenchSettings)
    lm_config: Path | None = None  # None: the default LM (configs/lm-lstm.toml)
    lm_overrides: tuple[str, ...] = ()
    kind: str = "dev"
    dtype: str = "float32"  # of unit extraction
    jobs: int | None = None
    quality_source: str = ""  # where given unit-quality figures come from (for the report)
    kmeans: int = 0  # > 0: k-means units, this many centroids per layer fitted on the training set (not codebooks)
    # True (the demo, whose study folder is a cache): a benchmark made with other settings is made again, and every
    # unit file, LM and score derived from it is deleted first; a model's units made from other weights, layers or
    # extraction settings are made again and the LMs trained on them deleted. False: such folders are refused.
    rebuild_stale: bool = False


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def check_lm_settings(settings: StudySettings) -> None:
    """Load the study's LM config with its overrides now, so that a bad ``--set`` fails before any synthesis; a
    ``--set`` of where an LM trains and on what (``LOCATION_FIELDS``, which the study sets per LM) is refused."""
    from spidr.config import override_key
    from spidr.lm.config import load_lm_config

    for override in settings.lm_overrides:
        key = override_key(override)  # (as the config reads it: "run . name" is run.name)
        if key in LOCATION_FIELDS:
            raise ValueError(f"--set {override}: the study sets {key} for each LM (each trains on its own units' "
                             "train.jsonl, in OUT/lms/<name>); leave it out")
    load_lm_config(settings.lm_config, [*settings.lm_overrides, 'data.train="units/train.jsonl"'])


def _layer_lm_name(model_name: str, layer: int) -> str:
    return f"{model_name} L{layer}"


def _lm_run_dir(out_dir: Path, name: str) -> Path:
    """Where the LM called ``name`` trains: ``out_dir/lms/<slug>``."""
    return out_dir / "lms" / _slug(name)


def _lm_config(name: str, units_dir: Path, out_dir: Path, settings: StudySettings,
               extra: Sequence[str] = ()) -> LmConfig:
    """The config of ``name``'s LM: the study's LM config and overrides, trained on ``units_dir/train.jsonl`` in
    ``_lm_run_dir(out_dir, name)``."""
    from spidr.lm.config import load_lm_config

    run_dir = _lm_run_dir(out_dir, name)
    return load_lm_config(settings.lm_config, [*settings.lm_overrides, *extra,
                                               f'data.train="{units_dir / "train.jsonl"}"',
                                               f'run.workdir="{run_dir.parent}"', f'run.name="{run_dir.name}"'])


# Where an LM's files are, not how it is trained: a study folder moved or named otherwise (a relative --out, then
# an absolute one) keeps its LMs. What they were trained on is checked by the data's fingerprint instead.
LOCATION_FIELDS = frozenset({"run.workdir", "run.name", "data.train"})
# How often a run logs, saves and validates, and how much it validates: not what it trains (validation runs in eval
# mode and draws no random number), so a finished LM is reused whatever they are now.
BOOKKEEPING_FIELDS = frozenset({"run.log_interval", "run.save_interval", "run.keep_latest", "run.validate_interval",
                                "data.max_valid_tokens"})


# The settings an n-gram LM is made of (it is fitted by counting): a --set model.context=32 for the study's LSTMs
# made the phone bigram "another config" to delete.
NGRAM_MODEL_FIELDS = ("model.arch", "model.ngram_order", "model.ngram_add_k")


def _unused_by_ngrams(name: str) -> bool:
    return (name.startswith("model.") and name not in NGRAM_MODEL_FIELDS) or name.startswith("optimizer.")


ADDED_DATA_INFO = ("units_origin",)  # what an LM's data record holds since it was first written


def lm_differences(state: Mapping[str, Any], cfg: LmConfig, *,
                   data: bool = True) -> tuple[list[str], list[str]]:
    """How the LM of a checkpoint (``state``: its ``lm_checkpoint_summary``) differs from the one ``cfg`` would
    train: (config fields, locations aside; training data, as ``spidr.lm.prepared_data.data_info`` describes it,
    unless ``data`` is False: the units need not exist yet), each "name: old → new"; both empty when it may be
    reused."""
    from spidr.lm.config import default_lm_settings
    from spidr.lm.prepared_data import data_info
    from spidr.train.runtime import config_diff

    # An LM trained before a setting was added was trained at its default: it differs only if cfg moves it.
    changes = config_diff(state["config"], cfg.to_dict(), defaults=default_lm_settings())
    config = [f"{name}: {old!r} → {new!r}" for name, old, new in sorted(changes, key=lambda change: change[0])
              if name not in LOCATION_FIELDS | BOOKKEEPING_FIELDS
              and not (cfg.model.arch == "ngram" and _unused_by_ngrams(name))]
    if cfg.model.arch != "ngram" and state.get("loss_targets") != LOSS_TARGETS:  # (counts have no loss)
        config.append(f"loss targets: {state.get('loss_targets', 'units, EOS and the BOS after each EOS')!r} → "
                      f"{LOSS_TARGETS!r}")
    if not data:
        return config, []
    old, new = state["lm"], data_info(cfg)
    # (an LM trained before a record of its data was kept, or whose units recorded none (units_origin since
    # 2026-12-07), is not told by it)
    data = [f"{key}: {old.get(key)!r} → {new[key]!r}" for key in sorted(new)
            if key != "train_file" and old.get(key) != new[key]
            and (old.get(key) is not None or key not in ADDED_DATA_INFO)]  # (None there: not known then)
    return config, data


def _trained_lms(configs: Sequence[LmConfig]) -> list[tuple[LmConfig, Path, dict[str, Any]]]:
    """``(config, newest checkpoint, its lm_checkpoint_summary)`` of each LM of ``configs`` trained or being
    trained, read once for both of ``_check_trained_lms``' passes."""
    from spidr.lm.train import lm_checkpoint_summary
    from spidr.train.checkpoint import Checkpointer

    trained = []
    for cfg in configs:
        checkpoints = Checkpointer(cfg.run.run_dir, save_interval=1).checkpoints()  # final.pt last
        if checkpoints:
            trained.append((cfg, checkpoints[-1], lm_checkpoint_summary(checkpoints[-1])))
    return trained


def _check_trained_lms(trained: Sequence[tuple[LmConfig, Path, dict[str, Any]]], settings: StudySettings, *,
                       data: bool = True) -> None:
    """Refuse the study if an LM trained (or being trained; ``_trained_lms``) differs from the one it would train,
    naming each and what differs, before any is trained. An LM trained on other units (made again, e.g. for a
    remade benchmark) is trained again in a study folder that is a cache (``settings.rebuild_stale``, the demo):
    elsewhere it is an LM someone trained, and the study leaves it for them to delete. Without ``data``, only the
    configs are compared (before the units are made, so that a refusal does not wait for every model's
    extraction)."""
    refused, retrain = [], []
    for cfg, checkpoint, state in trained:
        config, changed_data = lm_differences(state, cfg, data=data)
        if checkpoint.name != "final.pt":
            config = []  # an unfinished run: lm-train's resume checks its config (it may go on with another budget)
        if config or (changed_data and not settings.rebuild_stale):
            what = (f"trained with another config ({'; '.join(config)})" if config
                    else f"trained on other units than {cfg.data.train} holds now ({'; '.join(changed_data)})")
            refused.append(f"{cfg.run.run_dir} was {what}")
        elif changed_data:
            retrain.append(cfg.run.run_dir)
    if refused:
        raise ValueError(f"{'; '.join(refused)}: delete {'it' if len(refused) == 1 else 'them'} to train again, or "
                         "give the study another --out")
    for run_dir in retrain:
        logger.warning("%s was trained on other units (made again since): training it again", run_dir)
        shutil.rmtree(run_dir)


def _check_enough_data(lms: Sequence[tuple[str, LmConfig]]) -> None:
    """Refuse the study, naming every LM still to train whose training data holds less than one window of
    ``model.context + 1`` tokens, before the first trains (the phone oracle's refusal came after it had fitted
    the bigram, and a rerun with a smaller context then had that LM to delete)."""
    from spidr.lm.prepared_data import update_cache

    short = []
    for name, cfg in lms:
        if cfg.model.arch == "ngram" or (cfg.run.run_dir / "final.pt").is_file():
            continue
        # Read once: the stream kept in the LM's run folder is what its training maps, not parses again.
        data = update_cache(cfg, need_window=False)  # (checked here, for every LM at once)
        tokens = data.train.numel()
        if tokens < cfg.model.context + 1:
            short.append(f"{name}: {tokens}")
    if short:
        raise ValueError(f"the training data of these LMs holds fewer tokens than one window of model.context + 1 = "
                         f"{lms[0][1].model.context + 1} ({'; '.join(short)}): lower model.context (--set "
                         "model.context=N) or give the benchmark more training utterances")


def _train(name: str, cfg: LmConfig) -> Path:
    """Train the LM of ``cfg`` unless it is finished (``_check_trained_lms`` vetted it); returns its run
    directory."""
    from spidr.lm.train import train_lm
    from spidr.training_stopped import TrainingStoppedError

    if not (cfg.run.run_dir / "final.pt").is_file():
        started = time.perf_counter()
        outcome = train_lm(cfg)
        if outcome != "completed":
            raise TrainingStoppedError(f"the training of the {name} LM ({cfg.run.run_dir}) stopped on a signal "
                                       "after saving a checkpoint; run the same command again to resume it")
        logger.info("trained the %s LM in %.0f s", name, time.perf_counter() - started)
    return cfg.run.run_dir


def _score(name: str, checkpoint: Path, units_dir: Path, out_dir: Path, *, bench: LmBenchInfo,
           settings: StudySettings) -> dict[str, Any]:
    """Score the test sets with ``checkpoint`` and evaluate them; returns lm-eval's dict."""
    from spidr.lm.evaluate import evaluate_benchmark
    from spidr.lm.score import find_unit_files, score_benchmark

    submission = out_dir / "submissions" / _slug(name)
    score_benchmark(checkpoint, find_unit_files(units_dir), submission)
    results = evaluate_benchmark(bench.out_dir, submission, kind=settings.kind,
                                 out_dir=out_dir / "scores" / _slug(name))
    logger.info("%s: %s", name, {k: round(v, 1) for k, v in results.items() if k in LM_METRICS})
    return results


def _frame_rate(study_model: StudyModel) -> int:
    from spidr.models.frames import frame_rate_hz

    return frame_rate_hz(study_model.model.cfg.extractor_conv_layer_config)


def measure_quality(units_dir: Path, bench: LmBenchInfo, *, num_units: int, kind: str = "dev",
                    unit_rate_hz: int = 50) -> dict[str, float]:
    """PNMI of the training set's units (``units_dir/train.jsonl``, at ``unit_rate_hz``) against its phone labels
    (the 20 ms ones for a rate dividing 50 Hz, else the 10 ms ones, else the intervals read at the unit rate), and
    unit ABX within / across speaker on the syntactic split (its triphone items), in %."""
    from spidr.eval.feature_dir import audio_root, skipped_stems
    from spidr.eval.items import read_items
    from spidr.eval.unit_quality import read_alignments, unit_quality
    from spidr.eval.units import read_units

    train = bench.train_dir
    labels, rate = (("frame_labels_20ms.jsonl", 50) if 50 % unit_rate_hz == 0 else
                    ("alignments.jsonl", 100) if 100 % unit_rate_hz == 0 else ("alignments.tsv", unit_rate_hz))
    quality = unit_quality(read_units(units_dir / "train.jsonl"), read_alignments(train / labels,
                                                                                  alignment_rate_hz=rate),
                           unit_rate_hz=unit_rate_hz, alignment_rate_hz=rate, num_units=num_units,
                           skipped=skipped_stems(units_dir / "train.jsonl"),
                           root=audio_root(units_dir / "train.jsonl"))
    out = {"pnmi": quality["pnmi"]}
    syntactic = bench.task_dir("syntactic", kind)
    if (syntactic / "triphone.item").is_file() and (units_dir / "syntactic" / f"{kind}.jsonl").is_file():
        units = read_units(units_dir / "syntactic" / f"{kind}.jsonl")
        items = read_items(syntactic / "triphone.item")
        out |= _abx_within_across(units, items, prefix="unit_abx", distance="identical", frequency=unit_rate_hz)
    return out


def _abx_within_across(features: Mapping[str, Any], items: Items, *, prefix: str, distance: str,
                       frequency: int) -> dict[str, float]:
    """``{prefix}_within`` and ``{prefix}_across``: ABX error (%) of ``features`` on triphone ``items``, context
    within, as the study measures both its unit and its feature ABX."""
    from spidr.eval.abx import abx_error_rate

    return {f"{prefix}_{speaker}": 100.0 * abx_error_rate(features, items, speaker=speaker, context="within",
                                                          distance=distance, frequency=frequency)
            for speaker in ("within", "across")}


def measure_feature_abx(model: torch.nn.Module, layers: Sequence[int], bench: LmBenchInfo, *,
                        kind: str = "dev", dtype: str = "float32") -> dict[int, dict[str, float]]:
    """ABX within / across speaker (triphone items, context within, angular DTW), in %, of each layer's features
    on the benchmark's syntactic ``kind`` split: ``{layer: {"abx_within", "abx_across"}}``; empty when the split has
    no item file. One pass of the model over the split for all layers, whose features it holds meanwhile (float32:
    ≈ 0.3 GB a layer for a base model on the default split)."""
    from spidr.eval.features import ExtractionSettings, iter_extracted
    from spidr.eval.items import read_items
    from spidr.lm.bench_units import split_entries
    from spidr.models.frames import frame_rate_hz

    syntactic = bench.task_dir("syntactic", kind)
    if not (syntactic / "triphone.item").is_file():
        return {}
    items = read_items(syntactic / "triphone.item")
    settings = ExtractionSettings(layers=tuple(sorted(layers)), dtype=dtype)
    features: dict[int, dict[str, np.ndarray]] = {layer: {} for layer in layers}
    for entry, result in iter_extracted(model, split_entries(syntactic), settings):
        for layer in layers:
            features[layer][entry.fileid] = result[f"layer_{layer:02d}"]
    rate = frame_rate_hz(model.cfg.extractor_conv_layer_config)
    return {layer: _abx_within_across(features[layer], items, prefix="abx", distance="angular", frequency=rate)
            for layer in layers}


def _cached_feature_abx(study_model: StudyModel, model_dir: Path, bench: LmBenchInfo,
                        settings: StudySettings) -> dict[int, dict[str, float]]:
    """``measure_feature_abx`` of the model's layers whose quality is not given, kept in its units folder (which
    is made again, and this file with it, when the model, its layers or the benchmark change): a rerun of the study
    does not run the model over the split again."""
    wanted = [layer for layer in study_model.layers if not study_model.quality.get(layer)]
    cache = model_dir / f"feature_abx_{settings.kind}.json"
    known = {int(layer): value for layer, value in json.loads(cache.read_text()).items()} if cache.is_file() else {}
    missing = [layer for layer in wanted if layer not in known]
    if missing:
        known |= measure_feature_abx(study_model.model, missing, bench, kind=settings.kind, dtype=settings.dtype)
        write_atomically(cache, json.dumps({str(layer): value for layer, value in sorted(known.items())}) + "\n")
    return {layer: known[layer] for layer in wanted if layer in known}


UNTRAINED_SEEDS = 5


def _untrained_row(run_dir: Path, units_dir: Path, out_dir: Path, *, bench: LmBenchInfo,
                   settings: StudySettings) -> dict[str, Any]:
    """The oracle LM before training, at ``UNTRAINED_SEEDS`` initialisations: the mean accuracies, and their range
    over the initialisations in place of a confidence interval (one random LM can sit well off 50 % on a small
    set: 32 % on 60 tSC pairs for one seed, 47–53 % for four others)."""
    per_seed = []
    for seed in range(UNTRAINED_SEEDS):
        checkpoint = write_untrained(run_dir / "final.pt", run_dir / f"untrained_seed{seed}.pt", seed=seed)
        per_seed.append(_score(f"untrained seed {seed}", checkpoint, units_dir, out_dir, bench=bench,
                               settings=settings))
    row: dict[str, Any] = {"name": f"untrained LSTM (phones, {UNTRAINED_SEEDS} seeds)", "model": "untrained",
                           "layer": None, **dict.fromkeys(QUALITY_METRICS)}
    for metric in LM_METRICS:
        values = [results[metric] for results in per_seed if metric in results]
        if values:
            row[metric] = sum(values) / len(values)
            row[f"{metric}_ci95"] = [min(values), max(values)]
    return row


def _row(name: str, model: str, layer: int | None, results: dict[str, Any],
         quality: Mapping[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "model": model, "layer": layer}
    row |= {metric: quality.get(metric) for metric in QUALITY_METRICS}
    row |= {metric: results.get(metric) for metric in LM_METRICS}
    for task, details in results.get("details", {}).items():
        for metric, value in details["accuracy"].items():
            row[f"{metric}_ci95"] = value["ci95"]
            row[f"{metric}_n"] = value["n"]
            row[f"{metric}_p"] = value["p_value"]
        row[f"{task}_by_type"] = details.get("by_type")
    return row


DERIVED = ("units", "lms", "submissions", "scores")  # what the study makes from its benchmark


def _benchmark(out_dir: Path, settings: StudySettings) -> LmBenchInfo:
    """The study's benchmark in ``out_dir/bench``, made or reused; see ``StudySettings.rebuild_stale``."""
    bench_dir = out_dir / "bench"
    stale = ((bench_dir / INFO_JSON).is_file()
             and LmBenchInfo.load(bench_dir).parameters != bench_parameters(settings.bench))
    if stale and settings.rebuild_stale:
        logger.warning("%s was made with other settings: making it again, with every unit file and LM of %s",
                       bench_dir, out_dir)
        for name in DERIVED:
            shutil.rmtree(out_dir / name, ignore_errors=True)
        return generate_lm_bench(bench_dir, settings.bench, jobs=settings.jobs, overwrite=True)
    return generate_lm_bench(bench_dir, settings.bench, jobs=settings.jobs)


def bench_identity(bench: LmBenchInfo) -> dict[str, Any]:
    """What tells a benchmark from another made in the same folder: the settings it was made with (its format
    included) and what the synthesis gave (its counts). Units record it, so that units of a benchmark since deleted
    and made again otherwise are not scored against this one."""
    return json.loads(json.dumps({"parameters": bench.parameters, "counts": bench.counts}))


def _read_marker(path: Path) -> Any:
    """A marker's JSON; None when it is missing, empty or unreadable (nothing recorded)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None


# units/oracle's marker: the benchmark its files were copied from (not .complete, which marks a model's units)
ORACLE_MARKER = ".copied"


def _oracle_units(bench: LmBenchInfo, oracle_dir: Path) -> Path:
    """The phone oracle's units (the benchmark's 20 ms phone labels) in ``oracle_dir``, reused when its
    ``ORACLE_MARKER`` names this benchmark; returns ``oracle_dir``.

    A copy is cheap and always the same, so any other folder (an earlier benchmark's, one a kill left half-copied, one
    from a spidr that wrote no marker) is written again: into a temporary folder renamed at the end, so that a kill
    leaves no half-copied folder that a rerun would score.
    """
    identity = {"bench": bench_identity(bench)}
    if _read_marker(oracle_dir / ORACLE_MARKER) == identity:
        return oracle_dir
    ours = {"train.jsonl", *TASKS, ORACLE_MARKER, UNITS_IN_PROGRESS, ".lock"}  # (an earlier benchmark's tasks too)
    _refuse_foreign_files(oracle_dir, ours.__contains__)
    if oracle_dir.exists():
        logger.warning("%s is unfinished or made from another benchmark: writing it again", oracle_dir)
    partial = oracle_dir.with_name(oracle_dir.name + ".partial")  # a model's slug has no '.': no clash
    shutil.rmtree(partial, ignore_errors=True)
    write_oracle_units(bench.out_dir, partial)
    (partial / ORACLE_MARKER).write_text(json.dumps(identity) + "\n", encoding="utf-8")
    shutil.rmtree(oracle_dir, ignore_errors=True)
    partial.rename(oracle_dir)
    return oracle_dir


LAYER_FOLDER = re.compile(r"layer_(\d+)")  # a model's units folder: units/<model>/layer_LL


def _refuse_foreign_files(folder: Path, ours: Callable[[str], bool]) -> None:
    """Raise before a units folder is made again if it holds a file or folder that the study never writes there
    (``ours`` tells by name): the folder is deleted whole, and ``--out`` on a folder of one's own deleted the files
    in its ``units/<name>/`` without a word."""
    foreign = sorted(path.name for path in folder.iterdir()
                     if not ours(path.name) and not is_partial_name(path.name)) if folder.is_dir() else []
    if foreign:
        raise ValueError(f"{folder} holds {', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''}, which the "
                         "study did not write; the study makes this folder again: move them, or give the study "
                         "another --out")


def units_identity(study_model: StudyModel, settings: StudySettings, bench: LmBenchInfo) -> dict[str, Any]:
    """What a model's unit folder is made from: the weights (their fingerprint), the layers, how units were
    extracted and the benchmark (``bench_identity``). Stored in the folder's ``.complete``; a folder made from
    anything else is not reused."""
    from spidr.eval.journal import model_fingerprint
    from spidr.eval.kmeans import ASSIGNMENT
    from spidr.models.inference_precision import precision_identity

    return {"model": model_fingerprint(study_model.model), "layers": sorted(study_model.layers),
            "dtype": settings.dtype, "kmeans": settings.kmeans, **precision_identity(settings.dtype),
            **({"assignment": ASSIGNMENT} if settings.kmeans else {}), "bench": bench_identity(bench)}


def _model_units(study_model: StudyModel, bench: LmBenchInfo, model_dir: Path, out_dir: Path,
                 settings: StudySettings) -> Path:
    """``study_model``'s units of every set in ``model_dir`` (written, or reused when its ``.complete`` holds this
    ``units_identity``); returns ``model_dir``.

    Units of another benchmark (or of a spidr that did not record it) are made again: they are a cache that the
    same weights and settings give again, and an LM trained on them is vetted by its data's fingerprint
    (``_check_trained_lms``). A folder made from other weights, layers or extraction settings (or by a spidr that
    did not record them: an empty ``.complete``) holds units of another model: with ``settings.rebuild_stale`` (the
    demo) it is made again and the LMs trained on it are deleted; otherwise it is refused.
    """
    done = model_dir / ".complete"
    identity = units_identity(study_model, settings, bench)
    previous = _read_marker(done)
    changed = sorted(k for k in identity if previous.get(k) != identity[k]) if isinstance(previous, dict) else None
    if changed == []:
        return model_dir
    _refuse_foreign_files(model_dir, lambda name: bool(LAYER_FOLDER.fullmatch(name))
                          or name in (".complete", UNITS_IN_PROGRESS, UNITS_STATE_FILE, ".lock"))
    if changed == ["bench"]:
        logger.warning("%s holds units of another benchmark: making them again", model_dir)
    elif done.is_file():
        why = "other " + ", ".join(changed) if changed else "a spidr that recorded nothing of what made them"
        lm_dirs = [_lm_run_dir(out_dir, _layer_lm_name(study_model.name, int(found.group(1))))
                   for found in map(LAYER_FOLDER.fullmatch, sorted(path.name for path in model_dir.iterdir()))
                   if found]
        if not settings.rebuild_stale:
            raise ValueError(
                f"{model_dir} holds units of {study_model.name} made with {why}; delete it and the LMs trained on "
                f"them ({', '.join(str(d) for d in lm_dirs) or 'none'}), or give the study another --out")
        logger.warning("%s holds units made with %s: making them again, and the LMs trained on them", model_dir, why)
        for stale in lm_dirs:
            shutil.rmtree(stale, ignore_errors=True)
    # Unfinished or stale: nothing in it is reused, and a set the benchmark no longer has must not stay to be scored.
    shutil.rmtree(model_dir, ignore_errors=True)
    centroids = None
    if settings.kmeans:
        from spidr.data.manifest import read_manifest

        centroids = fit_centroids(study_model.model, read_manifest(bench.train_dir / "manifest.csv"),
                                  study_model.layers, num_units=settings.kmeans, dtype=settings.dtype)
    write_model_units(study_model.model, bench.out_dir, model_dir, layers=study_model.layers, centroids=centroids,
                      dtype=settings.dtype)
    write_atomically(done, json.dumps(identity) + "\n")
    return model_dir


def run_study(models: Sequence[StudyModel], out_dir: str | Path, settings: StudySettings = StudySettings()) -> Path:
    """The whole study (see the module docstring); returns the path of ``spoken_lm.md``."""
    # Resolved: the LMs' configs record paths under it, one spelling whether --out was given relative or absolute.
    out_dir = Path(out_dir).resolve()
    slugs = [_slug(model.name) for model in models]
    clashes = sorted({slug for slug in slugs if slugs.count(slug) > 1 or slug == "oracle"})
    if clashes:  # one units folder (units/<slug>) for two sources: each would overwrite or refuse the other's
        raise ValueError(f"model names {[m.name for m in models]} give the same units folder {clashes} twice (or "
                         "the phone oracle's): name each model (--checkpoint NAME=CKPT)")
    check_lm_settings(settings)
    # One study at a time in a folder: a second one started there deleted the units the first was writing (each
    # makes an unfinished model's units folder again) and could leave a folder that every rerun refused.
    with folder_lock(out_dir, f"the spoken-LM study in {out_dir}"):
        return _run_study(models, out_dir, settings)


def _run_study(models: Sequence[StudyModel], out_dir: Path, settings: StudySettings) -> Path:
    bench = _benchmark(out_dir, settings)
    units_root = out_dir / "units"
    oracle_dir = _oracle_units(bench, units_root / "oracle")
    model_dirs = [units_root / _slug(m.name) for m in models]
    oracle = _lm_config("phone oracle", oracle_dir, out_dir, settings)
    bigram = _lm_config("phone bigram", oracle_dir, out_dir, settings, ('model.arch="ngram"', "model.ngram_order=2"))
    layer_lms = []  # (study model, layer, its units, LM config)
    for study_model, model_dir in zip(models, model_dirs, strict=True):
        # The LM's vocabulary is the unit inventory, not the units its training set happens to use: a test item
        # may hold a codeword that no training utterance does.
        num_units = settings.kmeans or study_model.model.cfg.codebook_size
        for layer in study_model.layers:
            layer_dir = model_dir / f"layer_{layer:02d}"
            layer_lms.append((study_model, layer, layer_dir, _lm_config(
                _layer_lm_name(study_model.name, layer), layer_dir, out_dir, settings,
                (f"data.num_units={num_units}",))))
    # Every LM is vetted before the first one trains: a study that must be refused is refused at once, naming them all
    # (their configs before any model's units are made, their training data once the units are there).
    trained = _trained_lms([oracle, bigram, *(cfg for *_, cfg in layer_lms)])
    _check_trained_lms(trained, settings, data=False)
    for study_model, model_dir in zip(models, model_dirs, strict=True):
        _model_units(study_model, bench, model_dir, out_dir, settings)
    # LMs trained on units the model's folder no longer holds were deleted with them (_model_units).
    _check_trained_lms([lm for lm in trained if lm[1].is_file()], settings)
    _check_enough_data([("phone oracle", oracle), *((_layer_lm_name(m.name, layer), cfg)
                                                    for m, layer, _, cfg in layer_lms)])

    common = {"bench": bench, "settings": settings}
    rows = []
    oracle_run = _train("phone oracle", oracle)
    rows.append(_row("phone oracle (LSTM)", "oracle", None,
                     _score("phone oracle", oracle_run / "final.pt", oracle_dir, out_dir, **common), {}))
    rows.append(_untrained_row(oracle_run, oracle_dir, out_dir, **common))
    bigram_run = _train("phone bigram", bigram)
    rows.append(_row("phone bigram", "bigram", None,
                     _score("phone bigram", bigram_run / "final.pt", oracle_dir, out_dir, **common), {}))
    feature_abx = {study_model.name: _cached_feature_abx(study_model, model_dir, bench, settings)
                   for study_model, model_dir in zip(models, model_dirs, strict=True)}
    for study_model, layer, layer_dir, cfg in layer_lms:
        name = _layer_lm_name(study_model.name, layer)
        run = _train(name, cfg)
        results = _score(name, run / "final.pt", layer_dir, out_dir, **common)
        quality = study_model.quality.get(layer) or (
            measure_quality(layer_dir, bench, num_units=cfg.data.num_units, kind=settings.kind,
                            unit_rate_hz=_frame_rate(study_model))
            | feature_abx.get(study_model.name, {}).get(layer, {}))
        rows.append(_row(name, study_model.name, layer, results, quality))
    source = settings.quality_source or ("PNMI of the benchmark's training units; ABX of the units and of the "
                                         "layer's features (triphones, context within, angular DTW for features) "
                                         f"on its syntactic {settings.kind} split")
    return write_study_report(rows, out_dir, bench, kind=settings.kind, quality_source=source)


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def correlations(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pearson / Spearman of every (quality metric, LM metric) over the rows that have both (≥ 3 points)."""
    from spidr.lm.correlate import correlate

    out = []
    for x in QUALITY_METRICS:
        for y in LM_METRICS:
            points = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
            if len(points) < 3 or len({p[0] for p in points}) < 2 or len({p[1] for p in points}) < 2:
                continue
            out.append({"x": x, "y": y, **correlate([p[0] for p in points], [p[1] for p in points])})
    return out


def _with_ci(row: Mapping[str, Any], metric: str) -> str:
    value, ci = row.get(metric), row.get(f"{metric}_ci95")
    if value is None:
        return "–"
    # whole percents rounded outwards, so that the bracket always holds the value (99.9 [99–100], not [100–100])
    return f"{value:.1f} [{math.floor(ci[0])}–{math.ceil(ci[1])}]" if ci else f"{value:.1f}"


def _interval(ci: Sequence[float]) -> str:
    """A correlation's 95 % CI as " [−0.91, −0.40]", or nothing where none is given (NaN: too few points)."""
    return "" if any(math.isnan(bound) for bound in ci) else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def markdown(rows: Sequence[Mapping[str, Any]], corr: Sequence[Mapping[str, Any]], bench: LmBenchInfo,
             kind: str, quality_source: str) -> str:
    counts = {task: bench.counts.get(f"{task}/{kind}", {}).get("pairs") for task in ("lexical", "syntactic", "tsc")}
    seen = bench.parameters.get("seen_voices") or []
    seen_header, seen_rule = (" sWUGGY in-vocab, training voices % |", "---|") if seen else ("", "")
    lines = [
        "| units | ABX across % | unit ABX across % | PNMI | sWUGGY all % | sWUGGY in-vocab % | sBLIMP % | tSC % |"
        + seen_header,
        "|---|---|---|---|---|---|---|---|" + seen_rule,
    ]
    lines += [f"| {row['name']} | {format_number(row.get('abx_across'), 1)} | "
              f"{format_number(row.get('unit_abx_across'), 1)} | "
              f"{format_number(row.get('pnmi'), 3)} | {_with_ci(row, 'swuggy_all')} | "
              f"{_with_ci(row, 'swuggy_invocab')} | {_with_ci(row, 'sblimp')} | {_with_ci(row, 'tsc')} |"
              + (f" {_with_ci(row, 'swuggy_seen_invocab')} |" if seen else "") for row in rows]
    text = [
        f"Synthetic benchmark `{bench.out_dir}`, split {kind}: {counts['lexical']} lexical pairs (words vs balanced "
        f"nonwords), {counts['syntactic']} syntactic minimal pairs, {counts['tsc']} tSC story pairs, spoken by the "
        f"held-out voice(s) {', '.join(bench.parameters['test_voices'])}; the LM training set is "
        f"{bench.counts['train']['hours']:.2f} h. Accuracies in %, with 95 % bootstrap intervals over pairs "
        "(sBLIMP: over clusters of pairs that share sentences); chance is 50 %. Every LM has the same config and "
        "budget; scores are mean log-likelihoods per token. "
        f"Unit quality: {quality_source}. The untrained row averages {UNTRAINED_SEEDS} random initialisations of "
        "the oracle's LSTM; its brackets give their range."
        + (f" The last column scores the same lexical pairs spoken by {', '.join(seen)}, voices of the LM's "
           "training set: an LM that learnt words wins there even when its units do not carry over to a new voice."
           if seen else ""),
        "",
        *lines,
    ]
    if corr:
        text += ["", "Correlation over the (model, layer) points scored:", "",
                 "| unit quality | LM accuracy | n | Pearson r [95% CI] | p | Spearman ρ [95% CI] | p |",
                 "|---|---|---|---|---|---|---|"]
        text += [f"| {c['x']} | {c['y']} | {c['n']} | {c['pearson_r']:+.2f}{_interval(c['pearson_r_ci95'])} | "
                 f"{c['pearson_p']:.2g} | {c['spearman_rho']:+.2f}{_interval(c['spearman_rho_ci95'])} | "
                 f"{c['spearman_p']:.2g} |" for c in corr]
    return "\n".join(text)


def write_study_report(rows: Sequence[Mapping[str, Any]], out_dir: Path, bench: LmBenchInfo, *,
                       kind: str = "dev", quality_source: str = "") -> Path:
    from spidr.lm.correlate import json_ready, plot_scatter

    corr = correlations(rows)
    report = {"rows": list(rows), "correlations": [json_ready(c) for c in corr]}  # no interval: null, not NaN
    write_atomically(out_dir / "spoken_lm.json", json.dumps(report, indent=1, allow_nan=True))
    columns = ["name", "model", "layer", *QUALITY_METRICS, *LM_METRICS]
    with (replaced_when_done(out_dir / "points.csv") as partial,
          partial.open("w", newline="", encoding="utf-8") as handle):
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    # Each plot shows the points of its own correlation (the rows holding both of its metrics), with the table's r.
    plots = [plot_scatter([dict(r) for r in rows if r.get(c["x"]) is not None and r.get(c["y"]) is not None],
                          c["x"], c["y"], out_dir / f"{c['y']}_vs_{c['x']}.png", result=c) for c in corr
             if c["y"] in ("swuggy_invocab", "swuggy_seen_invocab")
             and c["x"] in ("abx_across", "unit_abx_across", "pnmi")]
    path = out_dir / "spoken_lm.md"
    body = markdown(rows, corr, bench, kind, quality_source)
    write_atomically(path, "# Spoken language modelling on the units\n\n" + body + "\n\n"
                     + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
    return path
