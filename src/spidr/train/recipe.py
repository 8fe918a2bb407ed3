"""A training run's recipe: the settings that change what it produces, and the corpus it was trained on.

The demo and the learning curve reuse a finished run, or resume an interrupted one, only when both are those of the
run asked for (``check_run_recipe``); otherwise a result would be recorded under a recipe it was not made with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spidr.atomic_files import write_atomically
from spidr.train.runtime import config_diff

if TYPE_CHECKING:
    from spidr.config import Config

logger = logging.getLogger(__name__)


# Data settings that change how batches are loaded, not what they hold. The manifest is among them because its path
# names the corpus, not its content: the training corpus is compared by its fingerprint instead.
LOADER_SETTINGS = ("manifest", "num_workers", "pin_memory", "prefetch_factor", "persistent_workers")
# The training corpus a run was started on, beside its checkpoints (the trainer records only the manifest's path).
TRAINING_CORPUS_FILE = "training-corpus.json"


def results_settings(config: dict) -> dict:
    """The settings of a run config (``Config.to_dict()`` or a run's ``config.json``) that change what training
    produces: seed, model type, initial weights (``run.init_ckpt``, by path), model, optimizer (the schedule included)
    and masking, and the data settings apart from the loader's. Not where the run executes, logs or saves."""
    run = config.get("run", {})
    return {
        "run": {key: run[key] for key in ("random_seed", "model_type", "init_ckpt") if key in run},
        "data": {key: value for key, value in config.get("data", {}).items() if key not in LOADER_SETTINGS},
        "model": config.get("model", {}),
        "optimizer": config.get("optimizer", {}),
        "masking": config.get("masking", {}),
    }


def default_results_settings(model_type: str) -> dict:
    """``results_settings`` of the defaults, for settings that a run made by an older spidr does not record."""
    from dataclasses import asdict

    from spidr.config import DataConfig, MaskingConfig, OptimizerConfig, RunConfig, model_config_class

    defaults = {"run": asdict(RunConfig()), "data": asdict(DataConfig()), "model": asdict(model_config_class(
        model_type)()), "optimizer": asdict(OptimizerConfig()), "masking": asdict(MaskingConfig())}
    return results_settings(json.loads(json.dumps(defaults)))


def describe_differences(changed: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """Differences (``runtime.config_diff``'s) as one line: the first ``limit`` settings, then how many more."""
    first = sorted(changed, key=lambda difference: difference[0])[:limit]
    shown = ", ".join(f"{name}: {old!r} there, {new!r} now" for name, old, new in first)
    return shown + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


def check_run_recipe(cfg: Config, *, corpus: bool = True) -> None:
    """Refuse to resume or reuse the run in ``cfg.run.run_dir`` when its checkpoints were trained with another recipe
    than ``cfg`` on its ``data.manifest`` (the corpus training reads, whatever the user's overrides): another
    ``results_settings`` (its ``config.json``, else its latest checkpoint's config) or another training corpus.
    Shared by the demo and the learning curve, so that a result is never recorded under a recipe it was not made
    with. A changed schedule counts: raising ``optimizer.max_steps`` on a finished run continues it under ``spidr
    train``, but here the model would not be the config's (the learning curve stretches the whole schedule per
    point). A run with no checkpoint yet is started afresh, and its corpus recorded now.

    ``corpus=False`` checks the settings alone and writes nothing: what can be refused before the training corpus
    exists (the demo and the learning curve call it before minutes of synthesis)."""
    from spidr.train.checkpoint import Checkpointer

    run_dir = cfg.run.run_dir
    checkpoints = Checkpointer(run_dir, save_interval=1).checkpoints()
    if not checkpoints and not corpus:
        return
    recorded = run_dir / TRAINING_CORPUS_FILE
    if not checkpoints:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(recorded, json.dumps(corpus_fingerprint(Path(cfg.data.manifest)), indent=1))
        return
    changed = config_diff(results_settings(_saved_config(run_dir, checkpoints[-1])), results_settings(cfg.to_dict()),
                          defaults=default_results_settings(cfg.run.model_type))
    if corpus:
        changed += _corpus_change(recorded, Path(cfg.data.manifest))
    if changed:
        raise ValueError(f"{run_dir} holds a model trained with another recipe ({describe_differences(changed)}); "
                         f"delete {run_dir} to train it again with this one, or use another --out folder")


def _corpus_change(recorded: Path, train_manifest: Path) -> list[tuple[str, Any, Any]]:
    """The training corpus as a ``config_diff`` difference, when ``train_manifest`` holds another corpus than the
    one ``recorded`` (a run's ``training-corpus.json``)."""
    if not recorded.is_file():
        logger.warning("%s does not record its training corpus (started before spidr recorded it): not checked",
                       recorded.parent)
        return []
    try:
        trained_on = json.loads(recorded.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{recorded} is not valid JSON ({error}); delete {recorded.parent} to train the run "
                         "again") from None
    corpus = corpus_fingerprint(train_manifest)
    if trained_on.get("sha256") == corpus["sha256"]:
        return []
    there = f"{trained_on.get('utterances')} utterances of {trained_on.get('manifest')}"
    now = f"{corpus['utterances']} utterances of {train_manifest}"
    if there == now:  # the same count at the same path: other files, lengths or ids (e.g. a corpus made again)
        there += f" (fingerprint {str(trained_on.get('sha256'))[:12]})"
        now += f" of other files or lengths (fingerprint {corpus['sha256'][:12]})"
    return [("training corpus", there, now)]


def _saved_config(run_dir: Path, latest: Path) -> dict:
    """The config a run was trained with: its ``config.json``, else the one inside its latest checkpoint."""
    path = run_dir / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); delete {run_dir} to train the run again") from None
    from spidr.models.loading import load_torch_file

    try:
        state = load_torch_file(latest)
    except ValueError as error:
        raise ValueError(f"{run_dir} has no config.json and its latest checkpoint {latest.name} cannot be read "
                         f"({error}); delete {run_dir} to train the run again") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(f"{run_dir} has no config.json and {latest} records no config: cannot tell which recipe "
                         f"trained it; delete {run_dir} to train the run again")
    return state["config"]


def corpus_fingerprint(manifest: Path) -> dict:
    """The utterances of a training manifest (ids and lengths, in order) as a SHA-256, with their number. Paths are
    left out: the same corpus seen from another machine sharing the folder, or moved with it, is the same."""
    from spidr.data.manifest import read_manifest, utterances_digest

    entries = read_manifest(manifest)
    return {"manifest": str(manifest), "utterances": len(entries), "sha256": utterances_digest(entries)}
