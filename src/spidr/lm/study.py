"""The spoken-LM study on the synthetic benchmark: units → unit LMs → ZeroSpeech scores → correlation with quality.

``run_study(models, out_dir, ...)`` is the downstream half of ``make demo`` and of ``spidr lm-study``:

1. make (or reuse) the benchmark (``spidr.corpus.lm_bench``) in ``out_dir/bench``;
2. write the units of every set: the phone oracle (gold 20 ms phone labels) and each model's layers (codebook units,
   or k-means units fitted on the benchmark's training set);
3. train one LM per units source with the same config and budget — the oracle (the topline), every (model, layer),
   and a phone-bigram model on the oracle units (the baseline that balanced nonwords pin near 50 %); the oracle's LSTM
   before training (at 5 random initialisations) is the chance reference;
4. score every test item (``lm-score``, mean log-likelihood per token) and compute the accuracies (``lm-eval``);
5. correlate LM accuracy with unit quality per (model, layer) — unit ABX and PNMI — over the points scored
   (``lm-correlate``), and write ``spoken_lm.md`` / ``spoken_lm.json``, the per-point table ``points.csv`` and
   scatter plots. Unit quality is taken as given (the demo passes its report's figures, measured on its test
   corpus) or measured on the benchmark itself: PNMI of the training set's units against its phone labels, unit ABX
   (within / across speaker, triphone items) on the syntactic split, whose sentences two held-out voices speak.

Every stage caches its output (a rerun resumes where it stopped). A model's units are reused only when they were
made from the same weights, layers and extraction settings (``units_identity``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spidr.corpus.lm_bench import INFO_JSON, LmBenchInfo, LmBenchSettings, bench_parameters, generate_lm_bench
from spidr.lm.bench_units import fit_centroids, write_model_units, write_oracle_units
from spidr.lm.train import write_untrained

logger = logging.getLogger(__name__)

# swuggy_seen_invocab: sWUGGY on voices the LM was trained on (a benchmark made with seen_voices), the lexical
# number that does not also need units that carry over to a new voice.
LM_METRICS = ("swuggy_all", "swuggy_invocab", "sblimp", "tsc", "swuggy_seen_invocab")
QUALITY_METRICS = ("unit_abx_within", "unit_abx_across", "pnmi")


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
    """Load the study's LM config with its overrides now, so that a bad ``--set`` fails before any synthesis."""
    from spidr.lm.config import load_lm_config

    load_lm_config(settings.lm_config, [*settings.lm_overrides, 'data.train="units/train.jsonl"'])


def _train(name: str, units_dir: Path, out_dir: Path, settings: StudySettings, extra: Sequence[str] = ()) -> Path:
    """Train (or reuse) the LM of ``name`` on ``units_dir/train.jsonl``; returns its run directory."""
    from spidr.lm.config import load_lm_config
    from spidr.lm.train import train_lm

    cfg = load_lm_config(settings.lm_config, [*settings.lm_overrides, *extra,
                                              f'data.train="{units_dir / "train.jsonl"}"',
                                              f'run.workdir="{out_dir / "lms"}"', f'run.name="{_slug(name)}"'])
    final = cfg.run.run_dir / "final.pt"
    if final.is_file():
        _check_reusable(final, cfg.to_dict())
    else:
        started = time.perf_counter()
        outcome = train_lm(cfg)
        if outcome != "completed":
            raise RuntimeError(f"training of the {name} LM stopped ({outcome}); run again to resume it")
        logger.info("trained the %s LM in %.0f s", name, time.perf_counter() - started)
    return cfg.run.run_dir


def _check_reusable(final: Path, config: Mapping[str, Any]) -> None:
    """Refuse to reuse a trained LM whose config differs from the one this study would train (e.g. a study folder
    from an earlier spidr, or other ``--set`` overrides), naming the fields that differ."""
    from spidr.lm.train import lm_checkpoint_summary
    from spidr.train.runtime import config_diff

    changed = [f"{name}: {old!r} → {new!r}"
               for name, old, new in sorted(config_diff(lm_checkpoint_summary(final)["config"], config))]
    if changed:
        raise ValueError(f"{final} was trained with another config ({'; '.join(changed)}); delete "
                         f"{final.parent} to train it again, or give the study another --out")


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
    """PNMI of the training set's units (``units_dir/train.jsonl``, at ``unit_rate_hz``) against its 20 ms phone
    labels, and unit ABX within / across speaker on the syntactic split (its triphone items), in %."""
    from spidr.eval.abx import abx_error_rate
    from spidr.eval.items import read_items
    from spidr.eval.unit_quality import read_alignments, unit_quality
    from spidr.eval.units import read_units

    train = bench.train_dir
    quality = unit_quality(read_units(units_dir / "train.jsonl"), read_alignments(train / "frame_labels_20ms.jsonl"),
                           unit_rate_hz=unit_rate_hz, alignment_rate_hz=50, num_units=num_units)
    out = {"pnmi": quality["pnmi"]}
    syntactic = bench.task_dir("syntactic", kind)
    if (syntactic / "triphone.item").is_file() and (units_dir / "syntactic" / f"{kind}.jsonl").is_file():
        units = read_units(units_dir / "syntactic" / f"{kind}.jsonl")
        items = read_items(syntactic / "triphone.item")
        for speaker in ("within", "across"):
            out[f"unit_abx_{speaker}"] = 100.0 * abx_error_rate(units, items, speaker=speaker, context="within",
                                                                distance="identical", frequency=unit_rate_hz)
    return out


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


def units_identity(study_model: StudyModel, settings: StudySettings) -> dict[str, Any]:
    """What a model's unit folder is made from: the weights (their fingerprint), the layers and how units were
    extracted. Stored in the folder's ``.complete``; a folder made from anything else is not reused."""
    from spidr.eval.journal import model_fingerprint
    from spidr.models.inference_precision import precision_identity

    return {"model": model_fingerprint(study_model.model), "layers": sorted(study_model.layers),
            "dtype": settings.dtype, "kmeans": settings.kmeans, **precision_identity(settings.dtype)}


def _model_units(study_model: StudyModel, bench: LmBenchInfo, model_dir: Path, out_dir: Path,
                 settings: StudySettings) -> Path:
    """``study_model``'s units of every set in ``model_dir`` (written, or reused when its ``.complete`` holds this
    ``units_identity``); returns ``model_dir``.

    A folder made from other weights, layers or extraction settings (or by a spidr that did not record them: an
    empty ``.complete``) holds units this study must not score: with ``settings.rebuild_stale`` (the demo) it is
    made again and the LMs trained on it are deleted; otherwise it is refused.
    """
    done = model_dir / ".complete"
    identity = units_identity(study_model, settings)
    if done.is_file():
        try:
            previous = json.loads(done.read_text(encoding="utf-8"))
        except (ValueError, OSError):  # empty or unreadable: written by a spidr that recorded nothing
            previous = None
        if previous == identity:
            return model_dir
        why = ("other " + ", ".join(sorted(k for k in identity if previous.get(k) != identity.get(k)))
               if isinstance(previous, dict) else "a spidr that recorded nothing of what made them")
        lm_dirs = [out_dir / "lms" / _slug(f"{study_model.name} L{int(layer.name.removeprefix('layer_'))}")
                   for layer in model_dir.glob("layer_[0-9][0-9]")]
        if not settings.rebuild_stale:
            raise ValueError(
                f"{model_dir} holds units of {study_model.name} made with {why}; delete it and the LMs trained on "
                f"them ({', '.join(str(d) for d in lm_dirs) or 'none'}), or give the study another --out")
        logger.warning("%s holds units made with %s: making them again, and the LMs trained on them", model_dir, why)
        # The LMs first: units without their .complete are remade, but an LM left behind would be reused.
        for stale in (*lm_dirs, model_dir):
            shutil.rmtree(stale, ignore_errors=True)
    centroids = None
    if settings.kmeans:
        from spidr.data.manifest import read_manifest

        centroids = fit_centroids(study_model.model, read_manifest(bench.train_dir / "manifest.csv"),
                                  study_model.layers, num_units=settings.kmeans, dtype=settings.dtype)
    write_model_units(study_model.model, bench.out_dir, model_dir, layers=study_model.layers, centroids=centroids,
                      dtype=settings.dtype)
    done.write_text(json.dumps(identity) + "\n", encoding="utf-8")
    return model_dir


def run_study(models: Sequence[StudyModel], out_dir: str | Path, settings: StudySettings = StudySettings()) -> Path:
    """The whole study (see the module docstring); returns the path of ``spoken_lm.md``."""
    out_dir = Path(out_dir)
    slugs = [_slug(model.name) for model in models]
    clashes = sorted({slug for slug in slugs if slugs.count(slug) > 1 or slug == "oracle"})
    if clashes:  # one units folder (units/<slug>) for two sources: each would overwrite or refuse the other's
        raise ValueError(f"model names {[m.name for m in models]} give the same units folder {clashes} twice (or "
                         "the phone oracle's): name each model (--checkpoint NAME=CKPT)")
    check_lm_settings(settings)
    bench = _benchmark(out_dir, settings)
    units_root = out_dir / "units"
    rows = []
    oracle_dir = units_root / "oracle"
    if not (oracle_dir / "train.jsonl").is_file():
        write_oracle_units(bench.out_dir, oracle_dir)
    common = {"bench": bench, "settings": settings}
    oracle_run = _train("phone oracle", oracle_dir, out_dir, settings)
    rows.append(_row("phone oracle (LSTM)", "oracle", None,
                     _score("phone oracle", oracle_run / "final.pt", oracle_dir, out_dir, **common), {}))
    rows.append(_untrained_row(oracle_run, oracle_dir, out_dir, **common))
    bigram_run = _train("phone bigram", oracle_dir, out_dir, settings, ('model.arch="ngram"', "model.ngram_order=2"))
    rows.append(_row("phone bigram", "bigram", None,
                     _score("phone bigram", bigram_run / "final.pt", oracle_dir, out_dir, **common), {}))
    for study_model in models:
        model_dir = _model_units(study_model, bench, units_root / _slug(study_model.name), out_dir, settings)
        # The LM's vocabulary is the unit inventory, not the units its training set happens to use: a test item
        # may hold a codeword that no training utterance does.
        num_units = settings.kmeans or study_model.model.cfg.codebook_size
        for layer in study_model.layers:
            name = f"{study_model.name} L{layer}"
            layer_dir = model_dir / f"layer_{layer:02d}"
            run = _train(name, layer_dir, out_dir, settings, (f"data.num_units={num_units}",))
            results = _score(name, run / "final.pt", layer_dir, out_dir, **common)
            quality = study_model.quality.get(layer) or measure_quality(
                layer_dir, bench, num_units=num_units, kind=settings.kind,
                unit_rate_hz=_frame_rate(study_model))
            rows.append(_row(name, study_model.name, layer, results, quality))
    source = settings.quality_source or ("PNMI of the benchmark's training units; unit ABX (triphones, context "
                                         f"within) on its syntactic {settings.kind} split")
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


def _fmt(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value + 0.0:.{digits}f}".replace("-0.000", "0.000")


def _with_ci(row: Mapping[str, Any], metric: str) -> str:
    value, ci = row.get(metric), row.get(f"{metric}_ci95")
    if value is None:
        return "–"
    # whole percents rounded outwards, so that the bracket always holds the value (99.9 [99–100], not [100–100])
    return f"{value:.1f} [{math.floor(ci[0])}–{math.ceil(ci[1])}]" if ci else f"{value:.1f}"


def markdown(rows: Sequence[Mapping[str, Any]], corr: Sequence[Mapping[str, Any]], bench: LmBenchInfo,
             kind: str, quality_source: str) -> str:
    counts = {task: bench.counts.get(f"{task}/{kind}", {}).get("pairs") for task in ("lexical", "syntactic", "tsc")}
    seen = bench.parameters.get("seen_voices") or []
    seen_header, seen_rule = (" sWUGGY in-vocab, training voices % |", "---|") if seen else ("", "")
    lines = [
        "| units | unit ABX across % | PNMI | sWUGGY all % | sWUGGY in-vocab % | sBLIMP % | tSC % |" + seen_header,
        "|---|---|---|---|---|---|---|" + seen_rule,
    ]
    lines += [f"| {row['name']} | {_fmt(row.get('unit_abx_across'))} | {_fmt(row.get('pnmi'), 3)} | "
              f"{_with_ci(row, 'swuggy_all')} | {_with_ci(row, 'swuggy_invocab')} | "
              f"{_with_ci(row, 'sblimp')} | {_with_ci(row, 'tsc')} |"
              + (f" {_with_ci(row, 'swuggy_seen_invocab')} |" if seen else "") for row in rows]
    text = [
        f"Synthetic benchmark `{bench.out_dir}`, split {kind}: {counts['lexical']} lexical pairs (words vs balanced "
        f"nonwords), {counts['syntactic']} syntactic minimal pairs, {counts['tsc']} tSC story pairs, spoken by the "
        f"held-out voice(s) {', '.join(bench.parameters['test_voices'])}; the LM training set is "
        f"{bench.counts['train']['hours']:.2f} h. Accuracies in %, with 95 % bootstrap intervals over pairs; "
        f"chance is 50 %. Every LM has the same config and budget; scores are mean log-likelihoods per token. "
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
                 "| unit quality | LM accuracy | n | Pearson r | p | Spearman ρ | p |",
                 "|---|---|---|---|---|---|---|"]
        text += [f"| {c['x']} | {c['y']} | {c['n']} | {c['pearson_r']:+.2f} | {c['pearson_p']:.2g} | "
                 f"{c['spearman_rho']:+.2f} | {c['spearman_p']:.2g} |" for c in corr]
    return "\n".join(text)


def write_study_report(rows: Sequence[Mapping[str, Any]], out_dir: Path, bench: LmBenchInfo, *,
                       kind: str = "dev", quality_source: str = "") -> Path:
    from spidr.lm.correlate import plot_scatter

    corr = correlations(rows)
    (out_dir / "spoken_lm.json").write_text(json.dumps({"rows": list(rows), "correlations": corr}, indent=1,
                                                       allow_nan=True), encoding="utf-8")
    columns = ["name", "model", "layer", *QUALITY_METRICS, *LM_METRICS]
    with open(out_dir / "points.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    # Each plot shows the points of its own correlation (the rows holding both of its metrics), with the table's r.
    plots = [plot_scatter([dict(r) for r in rows if r.get(c["x"]) is not None and r.get(c["y"]) is not None],
                          c["x"], c["y"], out_dir / f"{c['y']}_vs_{c['x']}.png", result=c) for c in corr
             if c["y"] in ("swuggy_invocab", "swuggy_seen_invocab") and c["x"] in ("unit_abx_across", "pnmi")]
    path = out_dir / "spoken_lm.md"
    body = markdown(rows, corr, bench, kind, quality_source)
    path.write_text("# Spoken language modelling on the units\n\n" + body + "\n\n" +
                    "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n", encoding="utf-8")
    return path
