"""``spidr plot-training RUN_DIR [RUN_DIR ...]``: PNG curves of loss, perplexities and active codewords from
metrics.jsonl; several runs share each figure, for comparisons.

The same command reads pretraining runs (codebook perplexities, per-codebook curves) and unit-LM runs of
``spidr lm-train`` (token perplexity); a figure whose metrics the run never logged is not drawn."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spidr.atomic_files import save_figure
from spidr.extras import figure
from spidr.train.metrics import METRICS_FILE, read_metrics

logger = logging.getLogger(__name__)

# (file stem, title, [(metric, label)]) — one figure per entry, one line per group (train, each validation set).
FIGURES = (
    ("loss", "loss (cross-entropy, nats)", [("loss", "")]),
    ("perplexity", "codebook perplexity", [("target_ppl", "target"), ("pred_ppl", "prediction")]),
    ("lm_perplexity", "unit-LM perplexity (exp of the loss per token)", [("ppl", "")]),
)
PER_CODEBOOK = (
    ("target_ppl_per_codebook", "target perplexity per codebook"),
    ("active_codewords", "active codewords per codebook"),
    ("loss_per_codebook", "loss per codebook"),
)


def series_by_group(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """group → step → record; when a resumed run logged a step again, its last record wins."""
    out: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for record in records:
        if "step" in record and "group" in record:
            out[record["group"]][int(record["step"])] = record
    return out


Line = tuple[str, list[int], list[float]]  # (label, steps, values)


def figure_lines(runs: dict[str, dict[str, dict[int, dict[str, Any]]]]) -> dict[str, tuple[str, list[Line]]]:
    """file stem → (title, lines) of every figure to draw, from run label → ``series_by_group``. Labels start with
    the run's label when there are several runs (one figure compares them); per-codebook metrics draw one line per
    codebook, in one figure per group."""
    prefix = (lambda run: f"{run} ") if len(runs) > 1 else (lambda run: "")
    out: dict[str, tuple[str, list[Line]]] = {}
    for stem, title, metrics in FIGURES:
        lines = [(f"{prefix(run)}{group} {label}".strip(), steps, [by_step[s][metric] for s in steps])
                 for run, groups in runs.items()
                 for group, by_step in sorted(groups.items()) for metric, label in metrics
                 if (steps := [s for s in sorted(by_step) if isinstance(by_step[s].get(metric), (int, float))])]
        if lines:
            out[stem] = (title, lines)
    all_groups = sorted({group for groups in runs.values() for group in groups})
    for metric, title in PER_CODEBOOK:
        for group in all_groups:
            lines = []
            for run, groups in runs.items():
                by_step = groups.get(group, {})
                steps = [s for s in sorted(by_step) if isinstance(by_step[s].get(metric), list)]
                if steps:
                    lines += [(f"{prefix(run)}codebook {k}", steps, [by_step[s][metric][k] for s in steps])
                              for k in range(len(by_step[steps[0]][metric]))]
            if lines:
                safe_group = re.sub(r"[^A-Za-z0-9_.-]", "_", group)
                out[f"{metric}_{safe_group}"] = (f"{title} ({group})", lines)
    return out


def plot_training(
    run_dirs: str | Path | Sequence[str | Path], out_dir: str | Path | None = None
) -> list[Path]:
    """Write ``loss.png`` and, for what the runs logged, ``perplexity.png`` (codebooks), ``lm_perplexity.png``
    (unit LM) and per-codebook PNGs; returns the files written. Several run directories are drawn together in each
    figure (e.g. SpidR vs DinoSR at the same budget), labelled by directory name; they need ``out_dir``."""
    paths = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(r) for r in run_dirs]
    if not paths:
        raise ValueError("no run directory given")
    if len(paths) > 1 and out_dir is None:
        raise ValueError(f"comparing {len(paths)} runs needs an output folder (--out)")
    names = [p.name for p in paths]
    labels = names if len(set(names)) == len(names) else [str(p) for p in paths]
    runs = {}
    for label, run_dir in zip(labels, paths, strict=True):
        metrics_path = run_dir / METRICS_FILE
        if not metrics_path.is_file():
            raise ValueError(f"{metrics_path} does not exist: is {run_dir} a training run directory?")
        groups = series_by_group(read_metrics(metrics_path))
        if not groups:
            raise ValueError(f"{metrics_path} holds no metric records")
        runs[label] = groups
    out_dir = Path(out_dir) if out_dir is not None else paths[0] / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (title, lines) in figure_lines(runs).items():
        fig, ax = figure(figsize=(7, 4), purpose="spidr plot-training")
        for name, steps, values in lines:
            ax.plot(steps, values, label=name, marker="." if len(steps) < 50 else None)
        written.append(_finish(fig, ax, title, out_dir / f"{stem}.png"))
    logger.info("wrote %d plots to %s", len(written), out_dir)
    return written


def _finish(fig: Any, ax: Any, title: str, path: Path) -> Path:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return path
