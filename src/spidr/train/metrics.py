"""Where training metrics go: running means, a tqdm bar, ``<run_dir>/metrics.jsonl``, TensorBoard, W&B.

Only the main rank writes. Every record is one JSON line ``{"step", "group", ...}`` with group ``"train"`` for
training intervals and the validation set's name for validation results (the official ``metrics.jsonl``
layout). TensorBoard is used when installed; wandb only when ``run.wandb_mode`` is not "disabled", imported
lazily. A per-codebook target perplexity below 5 % of the codebook size (and below 2) is reported as a collapse
warning.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from spidr.atomic_files import write_atomically
from spidr.config import Config

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"
COLLAPSE_FRACTION = 0.05  # a codebook used like fewer than 5 % of its codewords has collapsed
MIN_PERPLEXITY = 2.0  # ... or like fewer than 2: nearly every frame one codeword

Value = float | list[float]


class RunningMeans:
    """Means of scalars and per-codebook lists over one logging interval."""

    def __init__(self) -> None:
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, Value]) -> None:
        for key, value in values.items():
            if isinstance(value, list):
                previous = self._sums.get(key, [0.0] * len(value))
                self._sums[key] = [a + b for a, b in zip(previous, value, strict=True)]
            else:
                self._sums[key] = self._sums.get(key, 0.0) + value
            self._counts[key] += 1

    def means(self) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for key, total in self._sums.items():
            count = self._counts[key]
            out[key] = [v / count for v in total] if isinstance(total, list) else total / count
        return out

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self._sums), "counts": dict(self._counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = dict(state["sums"])
        self._counts = defaultdict(int, state["counts"])


def collapse_threshold(codebook_size: int) -> float:
    """The usage perplexity under which a codebook of ``codebook_size`` codewords counts as collapsed: 5 % of its
    size, and at least ``MIN_PERPLEXITY`` (a perplexity is never under 1: with 5 % alone, a codebook of fewer than
    20 codewords, such as a toy config's 16, could never be said to collapse, even to a single codeword)."""
    return max(COLLAPSE_FRACTION * codebook_size, MIN_PERPLEXITY)


def collapsed_codebooks(target_ppl_per_codebook: list[float], codebook_size: int) -> list[int]:
    """Indices of codebooks whose target (usage) perplexity is below ``collapse_threshold(codebook_size)``."""
    return [i for i, ppl in enumerate(target_ppl_per_codebook) if ppl < collapse_threshold(codebook_size)]


class MetricsLogger:
    """The main rank's sinks; on other ranks (``enabled=False``) every method is a no-op.

    ``start_step``: the step the run starts from (its checkpoint's; 0 for a fresh run). Records of a previous
    attempt past it (steps it will take again after a resume; everything, for a fresh run that finds an old
    ``metrics.jsonl``) move to ``metrics.superseded.jsonl``, so that each step has one record per group.
    ``codebook_size`` turns on the collapse warning; ``wandb_cfg`` (a pretraining config) the W&B sink.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int, max_steps: int,
                 codebook_size: int | None = None, wandb_cfg: Config | None = None, fresh: bool = False) -> None:
        self.enabled = enabled
        self.codebook_size = codebook_size
        self.path = Path(run_dir) / METRICS_FILE
        self._tensorboard = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.path.parent.mkdir(parents=True, exist_ok=True)
        moved = supersede_records(self.path, after_step=-1 if fresh else start_step)
        if moved:
            logger.info("%s: %d record(s) of steps this run takes again moved to %s", self.path, moved,
                        self.path.with_name(SUPERSEDED_FILE))
        # disable=None: a bar on terminals only; batch logs get the periodic log lines instead.
        self._bar = tqdm(total=max_steps, initial=start_step, unit="step", disable=None)
        # TensorBoard hides what the superseded records said (events from purge_step on, in the older files).
        self._tensorboard = _open_tensorboard(Path(run_dir) / "tensorboard", purge_step=0 if fresh else start_step + 1)
        if wandb_cfg is not None and wandb_cfg.run.wandb_mode != "disabled":
            self._wandb = _open_wandb(wandb_cfg)

    @classmethod
    def for_pretraining(cls, cfg: Config, *, enabled: bool, start_step: int, fresh: bool) -> MetricsLogger:
        return cls(cfg.run.run_dir, enabled=enabled, start_step=start_step, max_steps=cfg.optimizer.max_steps,
                   codebook_size=cfg.model.codebook_size, wandb_cfg=cfg, fresh=fresh)

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        """Advance the bar to ``step`` with a short postfix (loss, lr, throughput)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def log(self, step: int, group: str, values: dict[str, Value]) -> None:
        """Write one record to every sink, and warn about collapsed codebooks."""
        if not self.enabled:
            return
        record = {"step": step, "group": group, "time": time.time(), **values}
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, allow_nan=True) + "\n")
        scalars = _flatten(values)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(f"{group}/{key}", value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({f"{group}/{key}": value for key, value in scalars.items()}, step=step)
        summary = " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if "_per_codebook" not in k
                           and not k.startswith("active_codewords_"))
        logger.info("step %d [%s] %s", step, group, summary)
        per_codebook = values.get("target_ppl_per_codebook")
        if isinstance(per_codebook, list) and self.codebook_size is not None:
            collapsed = collapsed_codebooks(per_codebook, self.codebook_size)
            if collapsed:
                logger.warning(
                    "step %d [%s]: codebook(s) %s collapsed: target perplexity %s < %.3g (of %d codewords)",
                    step, group, collapsed, [round(per_codebook[i], 2) for i in collapsed],
                    collapse_threshold(self.codebook_size), self.codebook_size,
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def supersede_records(path: Path, *, after_step: int) -> int:
    """Move the records of ``path`` with a step past ``after_step`` (and a torn last line) to
    ``metrics.superseded.jsonl`` beside it, appended; ``path`` is rewritten atomically. Returns how many moved."""
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            step = None
        (kept if isinstance(step, int) and step <= after_step else moved).append(line)
    if not moved and (not kept or kept[-1].endswith("\n")):
        return 0
    if moved:
        with open(path.with_name(SUPERSEDED_FILE), "a", encoding="utf-8") as file:
            file.writelines(line if line.endswith("\n") else line + "\n" for line in moved)

    # A complete last record killed before its newline gets one, or the next record would share its line.
    write_atomically(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
    return len(moved)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a run killed mid-write) is ignored."""
    from spidr.text_files import utf8_errors_named

    records = []
    with utf8_errors_named(path, "the metrics file"), open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d is not a JSON record; ignored", path, number)
    return records


def _flatten(values: dict[str, Value]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, list):
            out.update({f"{key}_{i}": float(v) for i, v in enumerate(value)})
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def _open_tensorboard(log_dir: Path, *, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard is not installed: metrics go to %s only", METRICS_FILE)
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _open_wandb(cfg: Config) -> Any:
    try:
        import wandb
    except ImportError as error:
        raise ValueError(
            f"run.wandb_mode = {cfg.run.wandb_mode!r} needs wandb: pip install 'spidr[wandb]', or set "
            "run.wandb_mode = 'disabled'"
        ) from error
    # One W&B run per run directory, resumed across restarts.
    id_file = cfg.run.run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg.run.wandb_project,
        name=cfg.run.wandb_name,
        id=run_id,
        resume="allow",
        mode=cfg.run.wandb_mode,
        dir=str(cfg.run.run_dir),
        config=cfg.to_dict(),
    )
