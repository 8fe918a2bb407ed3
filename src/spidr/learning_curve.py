"""The learning curve of a recipe on the built-in corpus: quality against audio-hours seen, per corpus size.

Each point of the grid (training hours × steps × seed) is one pretraining run of the recipe (``configs/demo.toml`` by
default) on a synthetic corpus of the demo's ten training voices, its learning-rate schedule stretched to the step
count, scored like the demo on the demo's test corpus (new sentences and a held-out voice):

1. corpora: one training corpus per size and the test corpus, synthesised once and cached (sizes are hours, the
   corpus of 1 h is the demo's own);
2. points: each run is trained (or resumed, or reused when finished with the same recipe, the built-in corpus's
   format included; a run of another recipe is refused, as in the demo) and scored: ABX within / across speaker of
   every layer, codebook-unit ABX and PNMI of the head layers, and a linear phone probe per layer (``point.json`` and
   a ``report.md`` per point); several points can run side by side (``--parallel``), each point in one process at a
   time;
3. baselines: MFCC and the same network at random initialisation, scored once;
4. ``curve.md``, ``curve.json`` and ``curve.png`` summarise every point found in the output folder, so runs made by
   separate invocations (two shells, two machines sharing a disk) end up in one curve; a point whose recipe differs
   from this one's beyond seed and schedule is flagged and left out of the plot (``spidr.learning_curve_summary``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from spidr import cli_types
from spidr.child_processes import ChildProcessesFailedError, start_child
from spidr.config import shipped_config
from spidr.data import SAMPLE_RATE
from spidr.folder_lock import folder_lock
from spidr.help_format import HelpFormatter
from spidr.learning_curve_summary import (
    point_name,
    without_grid,
    write_curve,
    write_json,
)
from spidr.training_stopped import EXIT_INTERRUPTED, EXIT_STOPPED, TrainingStoppedError

logger = logging.getLogger(__name__)

# The demo's probe size: ≈ 20 min of the training corpus per representation.
PROBE_FRAMES = 60_000


@dataclass(frozen=True)
class CurvePoint:
    """One pretraining run of the grid."""

    hours: float  # training corpus size
    steps: int
    seed: int

    @property
    def name(self) -> str:
        return point_name(self.hours, self.steps, self.seed)


@dataclass(frozen=True)
class CurveSettings:
    """The grid and where it lives; the defaults are the issue's 1 / 4 / 16 h × 1 / 4 / 16 × the demo's steps."""

    out_dir: Path
    config: Path = Path("configs/demo.toml")
    hours: tuple[float, ...] = (1.0, 4.0, 16.0)
    steps: tuple[int, ...] = (2200, 8800, 35200)
    seeds: tuple[int, ...] = (0,)
    test_hours: float = 0.2
    overrides: tuple[str, ...] = ()
    probe_frames: int = PROBE_FRAMES  # 0: no probe
    parallel: int = 1  # points trained side by side, each in its own process
    jobs: int | None = None  # synthesis processes

    def __post_init__(self) -> None:
        for name in ("hours", "steps", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"the learning curve needs at least one value of {name}")
            # Values that name one point folder (1 and 1.0 hours are both "1h") would run it twice at once.
            shown = [f"{value:g}" if name == "hours" else str(value) for value in values]
            twice = sorted({text for text in shown if shown.count(text) > 1})
            if twice:
                raise ValueError(f"--{name} {','.join(shown)} lists {', '.join(twice)} more than once; give each "
                                 "value once")
        if not all(math.isfinite(hours) and hours > 0 for hours in self.hours):  # (nan <= 0 is False)
            raise ValueError(f"training hours must be finite and > 0, got {self.hours}")
        if not (math.isfinite(self.test_hours) and self.test_hours > 0):
            raise ValueError(f"test hours must be finite and > 0, got {self.test_hours}")
        if any(steps < 1 for steps in self.steps):
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.parallel < 1:
            raise ValueError(f"parallel = {self.parallel} must be >= 1")

    @property
    def points(self) -> list[CurvePoint]:
        return [CurvePoint(h, s, seed) for h in self.hours for s in self.steps for seed in self.seeds]


# 1. Schedule ------------------------------------------------------------------------------------------------------


def stretched_schedule(max_steps: int, warmup: int, hold: int, decay: int, steps: int) -> dict[str, int]:
    """The tri-stage schedule ``warmup + hold + decay = max_steps`` stretched to ``steps``, each phase keeping its
    share (rounded to 100 steps when ``steps`` ≥ 1,000, so 2,200 → 10,000 gives 3,200 / 3,600 / 3,200); the hold
    takes the rounding so the phases still add up to ``steps``."""
    if warmup + hold + decay != max_steps:
        raise ValueError(f"the config's schedule (warmup {warmup} + hold {hold} + decay {decay}) does not add up to "
                         f"max_steps = {max_steps}; the learning curve stretches a schedule that does")
    grain = 100 if steps >= 1000 else 1
    new_warmup = round(warmup * steps / max_steps / grain) * grain
    new_decay = round(decay * steps / max_steps / grain) * grain
    new_hold = steps - new_warmup - new_decay
    if new_hold < 0:
        new_decay += new_hold
        new_hold = 0
    return {"max_steps": steps, "warmup_steps": new_warmup, "hold_steps": new_hold, "decay_steps": new_decay}


def point_overrides(settings: CurveSettings, point: CurvePoint) -> tuple[str, ...]:
    """The config overrides of one point: its seed and stretched schedule, then the user's own."""
    from spidr.config import load_config

    optimizer = load_config(settings.config, settings.overrides).optimizer
    schedule = stretched_schedule(optimizer.max_steps, optimizer.warmup_steps, optimizer.hold_steps,
                                  optimizer.decay_steps, point.steps)
    return (f"run.random_seed={point.seed}", *(f"optimizer.{key}={value}" for key, value in schedule.items()),
            *settings.overrides)


def recipe(settings: CurveSettings, point: CurvePoint | None = None) -> tuple[dict, dict]:
    """What ``point`` is made with, or for ``None`` what the baselines are made with (the network they initialise
    at random, and the scoring), with the defaults of the same settings: recorded with each result, so that a
    result of another recipe is never taken for this one's. The results settings of the point's resolved config
    (its seed and stretched schedule included), the built-in corpus's format and the scoring's (test corpus size,
    probe frames)."""
    from spidr.config import load_config
    from spidr.corpus.synth import FORMAT_VERSION
    from spidr.train.recipe import default_results_settings, results_settings

    cfg = load_config(settings.config, settings.overrides if point is None else point_overrides(settings, point))
    scoring = {"test_hours": settings.test_hours, "probe_frames": settings.probe_frames}
    # The built-in corpus's format: a new one is synthesised afresh, and a model of the old one is another recipe's.
    # (A result recorded before the format was is taken as of this one, as a setting added since is.)
    corpus = {"format": FORMAT_VERSION}
    made_with = {**results_settings(cfg.to_dict()), "corpus": corpus, "scoring": scoring}
    defaults = {**default_results_settings(cfg.run.model_type), "corpus": corpus, "scoring": scoring}
    if point is None:
        return ({"model": made_with["model"], "corpus": corpus, "scoring": scoring},
                {"model": defaults["model"], "corpus": corpus, "scoring": scoring})
    return made_with, defaults


def reusable(path: Path, expected: tuple[dict, dict], *, model_dir: Path | None = None) -> bool:
    """Whether ``path`` (a ``point.json`` or ``baselines.json``) holds a finished result of the ``expected`` recipe
    (``recipe()``'s pair); a result of another recipe is an error that names the settings that differ. ``model_dir``:
    the folder of the trained model the result scores (a point's), to delete when more than the scoring differs."""
    from spidr.train.recipe import describe_differences
    from spidr.train.runtime import config_diff

    if not path.is_file():
        return False
    try:
        made_with = json.loads(path.read_text(encoding="utf-8")).get("recipe")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{path} is not a learning-curve result ({error}); delete it to redo it") from None
    if made_with is None:
        logger.warning("%s records no recipe (written before spidr recorded one): reused as it is", path)
        return True
    changed = config_diff(made_with, expected[0], defaults=expected[1])
    if not changed:
        return True
    if model_dir is None or all(name.startswith("scoring.") for name, _, _ in changed):
        redo = "delete the file to redo it" + (" (the trained model is kept and scored again)" if model_dir else "")
    else:  # deleting point.json alone would score the old model again under the new recipe's name
        redo = f"delete {model_dir} to train and score it again"
    raise ValueError(f"{path} was made with another recipe ({describe_differences(changed)}): use another --out "
                     f"folder for this recipe, or {redo}")


def refuse_another_test_corpus(settings: CurveSettings) -> None:
    """Refuse, naming every file to delete at once, a curve whose results were scored on a test corpus of another
    size (``--test-hours``): each point.json, baselines.json and the test corpus would be refused one by one."""
    scored = [settings.out_dir / "baselines.json", *sorted((settings.out_dir / "points").glob("*/point.json"))]
    other: dict[Path, object] = {}
    for path in scored:
        try:
            hours = json.loads(path.read_text(encoding="utf-8"))["recipe"]["scoring"]["test_hours"]
        except (OSError, ValueError, KeyError, TypeError):  # (absent, or not a result: reusable() names it)
            continue
        if hours != settings.test_hours:
            other[path] = hours
    if other:
        files = ", ".join(str(path) for path in other)
        before = ", ".join(sorted({f"{hours:g}" if isinstance(hours, float) else str(hours)
                                   for hours in other.values()}))
        raise ValueError(f"{settings.out_dir} was scored on a test corpus of {before} h, not "
                         f"{settings.test_hours:g} h (--test-hours): use another --out folder, or delete {files} and "
                         f"{corpus_dir(settings, None)} to score every point again on the new test corpus (the "
                         "trained models are kept)")


# 2. Corpora -------------------------------------------------------------------------------------------------------


def corpus_dir(settings: CurveSettings, hours: float | None) -> Path:
    """Where the training corpus of ``hours`` (or, for ``None``, the test corpus) is kept."""
    return settings.out_dir / "corpora" / ("test" if hours is None else f"train-{hours:g}h")


def synthesise(settings: CurveSettings, hours: float | None):
    """The training corpus of ``hours`` hours (the demo's voices and seed), or the demo's test corpus for ``None``."""
    from spidr.corpus.synth import synthesize_corpus
    from spidr.demo import HELD_OUT_VOICES, TRAIN_VOICES

    if hours is None:
        return synthesize_corpus(corpus_dir(settings, None), voices=TRAIN_VOICES + HELD_OUT_VOICES,
                                 hours=settings.test_hours, seed=1, jobs=settings.jobs)
    return synthesize_corpus(corpus_dir(settings, hours), voices=TRAIN_VOICES, hours=hours, seed=0,
                             jobs=settings.jobs)


# 3. Points --------------------------------------------------------------------------------------------------------


def point_dir(settings: CurveSettings, point: CurvePoint) -> Path:
    return settings.out_dir / "points" / point.name


def run_point(settings: CurveSettings, point: CurvePoint) -> Path:
    """Train (or resume, or reuse) one point and score it; returns its ``point.json`` (kept: a rerun is free). One
    process at a time: two on one run folder would write the same checkpoints and logs."""
    with point_lock(point_dir(settings, point), point.name):
        return _train_and_score(settings, point)


def point_lock(folder: Path, name: str) -> contextlib.AbstractContextManager[None]:
    """Hold ``folder/.lock`` exclusively (released by the kernel when the process ends, however it ends)."""
    return folder_lock(folder, f"learning-curve point {name}")


def _train_and_score(settings: CurveSettings, point: CurvePoint) -> Path:
    from spidr.data.manifest import read_manifest
    from spidr.demo import DemoSettings, pretrain
    from spidr.eval.items import read_items
    from spidr.eval.probe import ModelFeaturizer
    from spidr.eval.report import AbxSettings, evaluate_model, evaluation_settings, write_report
    from spidr.eval.unit_quality import read_alignments
    from spidr.models.loading import load_model

    out = point_dir(settings, point)
    result = out / "point.json"
    expected = recipe(settings, point)
    if reusable(result, expected, model_dir=out):
        return result
    train, test = synthesise(settings, point.hours), synthesise(settings, None)
    started = time.monotonic()
    checkpoint = pretrain(DemoSettings(out_dir=out, config=settings.config,
                                       overrides=point_overrides(settings, point)),
                          train.manifest, test.manifest)
    training_s = time.monotonic() - started
    model = load_model(checkpoint)
    entries, test_alignments = read_manifest(test.manifest), read_alignments(test.alignments_jsonl)
    rows = evaluate_model(model, point.name, entries, checkpoint=str(checkpoint), items=read_items(test.triphone_item),
                          alignments=test_alignments, layers=range(1, model.num_layers + 1),
                          work_dir=out / "features", progress=False)
    write_report(rows, out / "report", title=f"learning curve point {point.name}",
                 notes=[f"Model: {checkpoint}; test corpus {test.out_dir}."],
                 settings=evaluation_settings(abx=AbxSettings(), item_file=test.triphone_item, entries=entries,
                                              alignments_file=test.alignments_jsonl))
    probe = _probe(settings, {point.name: ModelFeaturizer(model)}, train, entries, test_alignments)
    record = {
        **asdict(point),
        "recipe": expected[0],
        "train_hours": train.hours,
        "audio_hours_seen": audio_hours_seen(checkpoint.parent / "config.json", point.steps),
        "training_seconds": training_s,
        "checkpoint": str(checkpoint),
        "rows": [asdict(row) for row in rows],
        "probe": [asdict(row) for row in probe],
    }
    write_json(result, record)
    return result


def audio_hours_seen(run_config: Path, steps: int) -> float:
    """Hours of audio the run's batches hold at most (``steps × optimizer.grad_accum_steps ×
    data.max_batch_length`` samples: a step reads that many batches); ``run_config`` is the ``config.json`` that
    training writes beside its checkpoints."""
    config = json.loads(run_config.read_text(encoding="utf-8"))
    batches_per_step = config.get("optimizer", {}).get("grad_accum_steps", 1)
    return steps * batches_per_step * config["data"]["max_batch_length"] / SAMPLE_RATE / 3600


def _probe(settings: CurveSettings, featurizers: dict, train, test_entries, test_alignments) -> list:
    """Phone probes of each ``{name: featurizer}``, trained on the ``train`` corpus (read once for all of them)."""
    if settings.probe_frames <= 0:
        return []
    from spidr.data.manifest import read_manifest
    from spidr.eval.probe import ProbeSettings, run_probes
    from spidr.eval.unit_quality import read_alignments

    return run_probes(featurizers, read_manifest(train.manifest), test_entries,
                      read_alignments(train.alignments_jsonl), test_alignments=test_alignments,
                      settings=ProbeSettings(max_train_frames=settings.probe_frames))


def run_baselines(settings: CurveSettings) -> Path:
    """MFCC and the recipe's network at random initialisation, scored on the test corpus once (``baselines.json``)."""
    from spidr.config import load_config
    from spidr.data.manifest import read_manifest
    from spidr.eval.items import read_items
    from spidr.eval.probe import MfccFeaturizer, ModelFeaturizer
    from spidr.eval.report import evaluate_mfcc, evaluate_model
    from spidr.eval.unit_quality import read_alignments
    from spidr.models.build import random_init_model

    result = settings.out_dir / "baselines.json"
    expected = recipe(settings)
    if reusable(result, expected):
        return result
    test, train = synthesise(settings, None), synthesise(settings, min(settings.hours))
    model = random_init_model(load_config(settings.config, settings.overrides).model)
    entries, items = read_manifest(test.manifest), read_items(test.triphone_item)
    test_alignments = read_alignments(test.alignments_jsonl)
    rows = evaluate_model(model, "random init", entries, items=items, alignments=test_alignments,
                          layers=range(1, model.num_layers + 1), work_dir=settings.out_dir / "baseline-features",
                          progress=False, untrained=True)
    rows.append(evaluate_mfcc(entries, items))
    probe = _probe(settings, {"random init": ModelFeaturizer(model), "MFCC": MfccFeaturizer()}, train, entries,
                   test_alignments)
    write_json(result, {"recipe": expected[0], "rows": [asdict(row) for row in rows],
                         "probe": [asdict(row) for row in probe], "probe_train_hours": train.hours})
    return result


def points_to_run(settings: CurveSettings) -> list[CurvePoint]:
    """The points of the grid without a finished result; a result or a run folder of another recipe is refused here,
    before the corpora are synthesised (minutes): a run's corpus is checked when it trains."""
    from spidr.demo import DemoSettings, training_config
    from spidr.train.recipe import check_run_recipe

    todo = []
    for point in settings.points:
        out = point_dir(settings, point)
        if reusable(out / "point.json", recipe(settings, point), model_dir=out):
            continue
        corpus = corpus_dir(settings, point.hours)  # where the manifests will be: the settings do not depend on them
        cfg = training_config(DemoSettings(out_dir=out, config=settings.config,
                                           overrides=point_overrides(settings, point)), corpus, corpus)
        check_run_recipe(cfg, corpus=False)
        todo.append(point)
    return todo


def run_points(settings: CurveSettings, argv: Sequence[str], todo: Sequence[CurvePoint] | None = None) -> None:
    """Every point of the grid (or ``todo``, ``points_to_run``'s list): in this process, or ``settings.parallel`` at a
    time in child processes (``argv`` is this command's arguments, rerun with ``--only``), the CPU threads shared
    out between them."""
    from spidr.corpus.synth import default_jobs
    from spidr.train.runtime import StopFlag

    todo = points_to_run(settings) if todo is None else todo
    if settings.parallel == 1 or len(todo) <= 1:
        for point in todo:
            logger.info("learning curve: point %s", point.name)
            run_point(settings, point)
        return
    threads = max(1, default_jobs() // settings.parallel)  # the CPUs this process may use (a SLURM or cgroup share)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    waiting, running, failed, stopped = list(todo), [], [], []
    # A stop signal to this process (alone, or with its children: timeout, scancel) starts no further point,
    # passes the signal on to the running ones, which save and stop, and ends with their exit status 3.
    stop, passed_on = StopFlag(), False
    with stop.installed():
        while waiting or running:
            while waiting and len(running) < settings.parallel and not stop.requested:
                point = waiting.pop(0)
                log = point_dir(settings, point) / "run.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                command = [sys.executable, "-m", "spidr", "learning-curve", *argv, "--only", _point_arg(point)]
                logger.info("learning curve: point %s in a child process (%d threads), log %s", point.name, threads,
                            log)
                with log.open("a", encoding="utf-8") as handle:
                    running.append((point, log, start_child(command, stdout=handle, env=env)))
            if stop.requested and not passed_on:
                for _, _, process in running:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGTERM)
                passed_on = True
            if stop.requested and not running:
                break
            time.sleep(1.0)
            for entry in [entry for entry in running if entry[2].poll() is not None]:
                running.remove(entry)
                point, log, process = entry
                # A child that the relayed signal (or Ctrl-C, which reaches it too) caught outside its training
                # (starting, scoring, or after its trainer put the default handler back) died of it, or ended as
                # interrupted (130): stopped too, not failed (its log shows no error).
                if process.returncode == EXIT_STOPPED or (stop.requested and process.returncode in (
                        -signal.SIGTERM, -signal.SIGINT, EXIT_INTERRUPTED)):
                    stopped.append(point.name)
                elif process.returncode:
                    failed.append(f"{point.name} (exit {process.returncode}, see {log})")
    if failed:
        raise ChildProcessesFailedError(f"learning-curve points failed: {', '.join(failed)}; the others are kept: "
                                        "run the same command again to redo the failed ones")
    if stopped or stop.requested:
        not_started = f" ({', '.join(p.name for p in waiting)} not started)" if waiting else ""
        raise TrainingStoppedError(f"learning-curve points {', '.join(stopped) or 'none'} stopped on a signal after "
                                   f"saving a checkpoint{not_started}; run the same command again to resume them")


def _point_arg(point: CurvePoint) -> str:
    return f"{point.hours:g}:{point.steps}:{point.seed}"


def parse_point(text: str) -> CurvePoint:
    """``HOURS:STEPS:SEED`` (``--only``)."""
    parts = text.split(":")
    try:
        hours, steps, seed = float(parts[0]), int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        raise ValueError(f"--only {text!r}: expected HOURS:STEPS:SEED, e.g. 4:8800:0") from None
    if len(parts) != 3:
        raise ValueError(f"--only {text!r}: expected HOURS:STEPS:SEED, e.g. 4:8800:0")
    return CurvePoint(hours, steps, seed)


def _point_argument(text: str) -> CurvePoint:
    """``parse_point`` for argparse, which shows an ArgumentTypeError's text (a ValueError's became "invalid
    parse_point value")."""
    try:
        return parse_point(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--only {text!r}: ")) from None


def curve_recipe(settings: CurveSettings) -> tuple[dict, dict]:
    """``recipe()``'s pair without ``GRID_SETTINGS``: what every point of the curve of ``settings`` shares."""
    made_with, defaults = recipe(settings, settings.points[0])
    return without_grid(made_with), without_grid(defaults)



def check_overrides(settings: CurveSettings) -> None:
    """A bad --set fails now, not after the synthesis; a manifest is refused: each point trains on the synthetic
    corpus of its --hours and is scored on the curve's test corpus."""
    from spidr.config import load_config, override_key

    load_config(settings.config, settings.overrides)
    for override in settings.overrides:
        key = override_key(override)  # (as the config reads it: "optimizer . max_steps" is optimizer.max_steps)
        # (a table that holds one: validation.test={manifest="x.csv"} sets validation.test.manifest)
        owned = [setting for setting in _OWNED_SETTINGS if setting == key or setting.startswith(f"{key}.")]
        if owned:
            raise ValueError(f"--set {override}: {_OWNED_SETTINGS[owned[0]]}")


# Settings each point sets itself, which a --set would override for every point (it comes after the point's own):
# why each is refused, and what sets it instead.
_SCHEDULE = ("each point stretches the config file's schedule (its warmup / hold / decay shares) to its --steps; "
             "change the shape in the config file")
_OWNED_SETTINGS = {
    "data.manifest": "each point trains on the synthetic corpus of its --hours; a manifest given here would stand "
                     "for all of them",
    "validation.test.manifest": "every point is scored on the curve's test corpus",
    "run.random_seed": "each point trains with its own seed: give them with --seeds",
    "optimizer.max_steps": "each point trains for its own number of steps: give them with --steps",
    "optimizer.warmup_steps": _SCHEDULE,
    "optimizer.hold_steps": _SCHEDULE,
    "optimizer.decay_steps": _SCHEDULE,
    "run.workdir": "each point trains in its own run folder under --out (a shared one would hold one point's "
                   "model for all); choose the folder with --out",
}


def run_curve(settings: CurveSettings, argv: Sequence[str] = ()) -> Path:
    """The whole curve: corpora, points, baselines, summary; returns ``curve.md``."""
    check_overrides(settings)
    refuse_another_test_corpus(settings)
    todo = points_to_run(settings)  # a point or baseline of another recipe is refused before the synthesis
    reusable(settings.out_dir / "baselines.json", recipe(settings))
    for hours in (None, *settings.hours):  # synthesis uses every CPU: before the points, not beside them
        synthesise(settings, hours)
    run_points(settings, argv, todo)
    run_baselines(settings)
    return write_curve(settings.out_dir, shared=curve_recipe(settings))


# CLI --------------------------------------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return _values(text, float, "numbers")


def _ints(text: str) -> tuple[int, ...]:
    return _values(text, int, "integers")


def _values(text: str, kind: type, name: str) -> tuple:
    """A comma-separated option value, e.g. "1,4,16"; argparse names the option in the error."""
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {name}, e.g. 1,4,16") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {name}, e.g. 1,4,16")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    """``spidr learning-curve``."""
    parser = subparsers.add_parser(
        "learning-curve",
        help="train a recipe at several corpus sizes and step counts on the built-in corpus; plot quality against "
        "audio seen",
        description="The learning curve of a recipe on the built-in corpus: one pretraining run per (training hours, "
        "steps, seed), its schedule stretched to the steps, each scored on the demo's test corpus (ABX within / "
        "across per layer, codebook-unit ABX and PNMI, phone probe); then curve.md / curve.json / curve.png. "
        "Everything is cached in OUT: a rerun resumes unfinished runs and adds new points to the same curve.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", default="runs/learning-curve", help="folder for corpora, runs and the curve")
    parser.add_argument("--config", default=None, help="the recipe, a training config (default: configs/demo.toml of "
                        "the working directory, else of the spidr checkout)")
    parser.add_argument("--hours", type=_floats, default=(1.0, 4.0, 16.0),
                        help="training-corpus sizes in hours, comma-separated (default: 1,4,16)")
    parser.add_argument("--steps", type=_ints, default=(2200, 8800, 35200),
                        help="training steps, comma-separated (default: 2200,8800,35200: 1, 4 and 16 times the demo)")
    parser.add_argument("--seeds", type=_ints, default=(0,), help="training seeds, comma-separated (default: 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a field of the recipe for every point (repeatable), e.g. run.device=\"cuda\"; "
                        "not what each point sets itself (seed: --seeds; steps: --steps; the schedule's phases, "
                        "stretched from the config file; run.workdir; the manifests)")
    parser.add_argument("--test-hours", type=cli_types.positive_float, default=0.2,
                        help="hours of the held-out test corpus every point is scored on (the demo's --test-hours)")
    parser.add_argument("--probe-frames", type=cli_types.non_negative_int, default=PROBE_FRAMES,
                        help="training frames of each layer's phone probe; 0 skips the probe")
    parser.add_argument("--parallel", type=int, default=1,
                        help="points trained at once, each in its own process with its share of the CPU threads")
    parser.add_argument("--jobs", type=cli_types.positive_int, default=None,
                        help="synthesis processes (default: all CPUs)")
    parser.add_argument("--only", type=_point_argument, default=None, metavar="HOURS:STEPS:SEED",
                        help="train and score this one point only (what --parallel runs in each child process)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    settings = CurveSettings(out_dir=Path(args.out), config=_config_path(args), hours=args.hours, steps=args.steps,
                             seeds=args.seeds, test_hours=args.test_hours, overrides=tuple(args.overrides),
                             probe_frames=args.probe_frames, parallel=args.parallel, jobs=args.jobs)
    if args.only is not None:
        check_overrides(settings)
        print(run_point(settings, args.only))
        return 0
    argv = _child_argv(args)
    report = run_curve(settings, argv)
    print(report.read_text(encoding="utf-8"))
    print(f"curve: {report} (plot beside it; each point's report in {settings.out_dir / 'points'})")
    return 0


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else shipped_config("demo.toml")


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The arguments a child process needs to rebuild the same settings (``--only`` is added per point)."""
    argv = ["--out", str(Path(args.out).resolve()), "--config", str(_config_path(args).resolve()),
            "--hours", ",".join(f"{h:g}" for h in args.hours), "--steps", ",".join(map(str, args.steps)),
            "--seeds", ",".join(map(str, args.seeds)), "--test-hours", repr(args.test_hours),
            "--probe-frames", str(args.probe_frames),
            "--jobs", str(args.jobs or 1)]
    for override in args.overrides:
        argv += ["--set", override]
    return argv
