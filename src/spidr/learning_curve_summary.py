"""The summary of a learning curve (``spidr.learning_curve``): each finished point's numbers (``point.json``), the
baselines', and ``curve.md``, ``curve.json`` and ``curve.png`` made from every point found in the output folder,
whichever invocation ran it; a point made with another recipe (beyond seed and schedule) is flagged and not plotted.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from spidr.atomic_files import save_figure, write_atomically

logger = logging.getLogger(__name__)

PLOT_PURPOSE = "the learning curve's plot"


def point_name(hours: float, steps: int, seed: int) -> str:
    """The name of a point of the grid (its folder under ``points/``)."""
    return f"{hours:g}h-{steps}steps-seed{seed}"


def write_json(path: Path, record: dict) -> None:
    """Written whole or not at all: a killed run leaves no half file that a rerun would take as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(record, indent=1))


@dataclass(frozen=True)
class PointSummary:
    """The numbers one point contributes to the curve (ABX and probe accuracy in %)."""

    name: str
    hours: float
    steps: int
    seed: int
    audio_hours_seen: float
    best_within: float
    best_within_layer: int
    best_across: float
    best_across_layer: int
    middle_across: float | None  # the best of the middle layers (layers 3-5 of 6)
    middle_across_layer: int | None
    unit_pnmi: tuple[float, float] | None  # lowest and highest over the head layers
    unit_abx_across: tuple[float, float] | None
    probe_accuracy: float | None  # the best layer's frame accuracy
    probe_layer: int | None
    other_recipe: str | None = None  # how its recipe differs from the curve's, seed and schedule apart


def middle_layers(num_layers: int) -> range:
    """The middle of the stack: above the lowest third, below the top layer (3-5 of 6, 5-11 of 12)."""
    return range(num_layers // 3 + 1, num_layers)


def summarise(record: dict) -> PointSummary:
    """One ``point.json`` record as the curve's numbers."""
    layers = [row for row in record["rows"] if row["layer"] is not None]
    within = min(layers, key=lambda row: row["abx_within"])
    across = min(layers, key=lambda row: row["abx_across"])
    middle = [row for row in layers if row["layer"] in middle_layers(len(layers))]
    middle_best = min(middle, key=lambda row: row["abx_across"]) if middle else None
    heads = [row for row in layers if row["unit_abx_across"] is not None]
    pnmi = [row["quality"]["pnmi"] for row in heads if "pnmi" in row["quality"]]
    unit_across = [row["unit_abx_across"] for row in heads]
    probe_layers = [row for row in record.get("probe", []) if row["representation"].startswith("layer_")]
    probe_best = max(probe_layers, key=lambda row: row["frame_accuracy"]) if probe_layers else None
    return PointSummary(
        name=point_name(record["hours"], record["steps"], record["seed"]),
        hours=record["hours"], steps=record["steps"], seed=record["seed"],
        audio_hours_seen=record["audio_hours_seen"],
        best_within=within["abx_within"], best_within_layer=within["layer"],
        best_across=across["abx_across"], best_across_layer=across["layer"],
        middle_across=middle_best["abx_across"] if middle_best else None,
        middle_across_layer=middle_best["layer"] if middle_best else None,
        unit_pnmi=(min(pnmi), max(pnmi)) if pnmi else None,
        unit_abx_across=(min(unit_across), max(unit_across)) if unit_across else None,
        probe_accuracy=probe_best["frame_accuracy"] if probe_best else None,
        probe_layer=int(probe_best["representation"].removeprefix("layer_")) if probe_best else None,
    )


@dataclass(frozen=True)
class Baselines:
    """Reference levels drawn across the curve (best layer of the random network; MFCC)."""

    random_within: float
    random_across: float
    mfcc_within: float
    mfcc_across: float
    random_probe: float | None
    mfcc_probe: float | None


def baseline_levels(record: dict) -> Baselines:
    layers = [row for row in record["rows"] if row["layer"] is not None]
    mfcc = next(row for row in record["rows"] if row["layer"] is None)
    mfcc_probe = [row["frame_accuracy"] for row in record.get("probe", []) if row["representation"] == "mfcc"]
    random_probe = [row["frame_accuracy"] for row in record.get("probe", [])
                    if row["model"] == "random init" and row["representation"].startswith("layer_")]
    return Baselines(
        random_within=min(row["abx_within"] for row in layers), random_across=min(row["abx_across"] for row in layers),
        mfcc_within=mfcc["abx_within"], mfcc_across=mfcc["abx_across"],
        random_probe=max(random_probe) if random_probe else None,
        mfcc_probe=mfcc_probe[0] if mfcc_probe else None,
    )


# What the points of one curve may differ in: the seed and the schedule stretched to their steps.
GRID_SETTINGS = {"run": ("random_seed",), "optimizer": ("max_steps", "warmup_steps", "hold_steps", "decay_steps")}


def without_grid(made_with: dict) -> dict:
    return {section: {key: value for key, value in values.items() if key not in GRID_SETTINGS[section]}
            if section in GRID_SETTINGS and isinstance(values, dict) else values
            for section, values in made_with.items()}


def read_points(out_dir: Path, shared: tuple[dict, dict] | None = None) -> list[PointSummary]:
    """Every finished point under ``out_dir/points``, in (hours, steps, seed) order. With ``shared``
    (``curve_recipe()``), a point made with another recipe says how in ``other_recipe`` (points made by another
    invocation, or before the recipe changed, are never checked when they are outside its grid)."""
    from spidr.train.recipe import describe_differences
    from spidr.train.runtime import config_diff

    summaries = []
    for path in sorted((Path(out_dir) / "points").glob("*/point.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            summary = summarise(record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a learning-curve point ({error!r}); delete it to score the point "
                             "again") from error
        if shared is not None and isinstance(record.get("recipe"), dict):
            changed = config_diff(without_grid(record["recipe"]), shared[0], defaults=shared[1])
            if changed:
                summary = replace(summary, other_recipe=describe_differences(changed))
        summaries.append(summary)
    return sorted(summaries, key=lambda s: (s.hours, s.steps, s.seed))


def _span(values: tuple[float, float] | None, digits: int) -> str:
    """``low–high`` (one number when they round alike); a PNMI of -0.000 (a one-unit code, up to rounding) shows 0."""
    from spidr.eval.report import format_number as fmt  # the reports' tables round the same way

    if values is None:
        return "–"
    low, high = fmt(values[0], digits), fmt(values[1], digits)
    return low if low == high else f"{low}–{high}"


OTHER_RECIPE_MARK = " †"


def markdown_table(points: Sequence[PointSummary], baselines: Baselines | None) -> str:
    lines = ["| training audio (h) | steps | audio seen (h) | seed | best ABX within % | best ABX across % | middle "
             "across % | codebook-unit PNMI | codebook-unit ABX across % | probe frame accuracy % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        middle = f"{p.middle_across:.2f} (L{p.middle_across_layer})" if p.middle_across is not None else "–"
        probe = f"{p.probe_accuracy:.1f} (L{p.probe_layer})" if p.probe_accuracy is not None else "–"
        hours = f"{p.hours:g}" + (OTHER_RECIPE_MARK if p.other_recipe else "")
        seen = f"{p.audio_hours_seen:.1f}" if p.audio_hours_seen >= 0.1 else f"{p.audio_hours_seen:.2g}"  # not 0.0
        lines.append(f"| {hours} | {p.steps:,} | {seen} | {p.seed} | {p.best_within:.2f} "
                     f"(L{p.best_within_layer}) | {p.best_across:.2f} (L{p.best_across_layer}) | {middle} | "
                     f"{_span(p.unit_pnmi, 3)} | {_span(p.unit_abx_across, 1)} | {probe} |")
    if baselines is not None:
        def probe_text(value: float | None) -> str:
            return "–" if value is None else f"{value:.1f}"
        lines.append(f"| random init | – | – | – | {baselines.random_within:.2f} | {baselines.random_across:.2f} | – "
                     f"| – | – | {probe_text(baselines.random_probe)} |")
        lines.append(f"| MFCC | – | – | – | {baselines.mfcc_within:.2f} | {baselines.mfcc_across:.2f} | – | – | – | "
                     f"{probe_text(baselines.mfcc_probe)} |")
    return "\n".join(lines)


CURVE_PANELS = (  # (title, PointSummary field or a function of it, baseline fields)
    ("best ABX within speaker (%)", "best_within", ("random_within", "mfcc_within")),
    ("best ABX across speaker (%)", "best_across", ("random_across", "mfcc_across")),
    ("middle layers, ABX across (%)", "middle_across", ("random_across", "mfcc_across")),
    ("codebook-unit ABX across, best head (%)", "unit_abx_across", ()),
    ("codebook-unit PNMI, best head", "unit_pnmi", ()),
    ("probe frame accuracy, best layer (%)", "probe_accuracy", ("random_probe", "mfcc_probe")),
)


def _panel_value(point: PointSummary, field: str) -> float | None:
    value = getattr(point, field)
    if isinstance(value, tuple):  # ranges over the heads: the best head
        return value[1] if field == "unit_pnmi" else value[0]
    return value


def label_log_axis(ax: object, values: Sequence[float]) -> None:
    """A log x axis with plain-number labels: at each decade over more than 1.5 decades, else at 1, 2 and 5 of
    each decade, or at the points' own values when fewer than two of those fall within the points' range.
    matplotlib alone labels every minor tick of a range under a decade, and those labels run into each other."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    values = [v for v in values if v > 0]  # a log axis shows no 0
    if not values:
        return
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1000 else f"{value:.3g}")
    low, high = min(values), max(values)
    nice = [m * 10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for m in (1, 2, 5)]
    if math.log10(high / low) > 1.5:  # decades only (matplotlib thins them further when they are many)
        ax.xaxis.set_major_locator(LogLocator(base=10))
    elif sum(low <= v <= high for v in nice) >= 2:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        ax.xaxis.set_major_locator(FixedLocator(_spread_out(sorted(set(values)))))
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(NullFormatter())


def _spread_out(values: list[float], min_ratio: float = 1.15) -> list[float]:
    """``values`` (sorted, positive) without those closer than ``min_ratio`` to the last one kept: labels at most
    a few per factor of two, so that they do not touch on a log axis."""
    kept = values[:1]
    for value in values[1:]:
        if value >= kept[-1] * min_ratio:
            kept.append(value)
    return kept


def plot_curve(points: Sequence[PointSummary], baselines: Baselines | None, path: Path) -> Path:
    """Six panels against audio-hours seen (log scale): one line per training-corpus size through the seeds' mean,
    each seed a dot; the random network and MFCC as horizontal lines."""
    from spidr.extras import figure

    fig, axes = figure(figsize=(13, 7), purpose=PLOT_PURPOSE, nrows=2, ncols=3)
    for ax, (title, field, levels) in zip(axes.flat, CURVE_PANELS, strict=True):
        for hours in sorted({p.hours for p in points}):
            at_size = [p for p in points if p.hours == hours and _panel_value(p, field) is not None]
            if not at_size:
                continue
            seen = sorted({p.audio_hours_seen for p in at_size})
            means = [sum(_panel_value(p, field) for p in at_size if p.audio_hours_seen == x)
                     / sum(1 for p in at_size if p.audio_hours_seen == x) for x in seen]
            (line,) = ax.plot(seen, means, "o-", label=f"{hours:g} h of training audio")
            ax.plot([p.audio_hours_seen for p in at_size], [_panel_value(p, field) for p in at_size], ".",
                    color=line.get_color(), alpha=0.6)
        if baselines is not None:
            for level, style in zip(levels, (":", "--"), strict=False):
                value = getattr(baselines, level)
                if value is not None:
                    ax.axhline(value, linestyle=style, color="grey",
                               label="random init" if level.startswith("random") else "MFCC")
        label_log_axis(ax, [p.audio_hours_seen for p in points])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("audio seen in training (h)")
        ax.grid(alpha=0.3)
    axes.flat[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)
    return path


def write_curve(out_dir: Path, *, title: str = "Learning curve", shared: tuple[dict, dict] | None = None) -> Path:
    """``curve.md``, ``curve.json`` and ``curve.png`` from every finished point (and the baselines, if scored). With
    ``shared`` (``curve_recipe()``), points of another recipe are flagged in the table and left out of the plot."""
    out_dir = Path(out_dir)
    points = read_points(out_dir, shared)
    if not points:
        raise ValueError(f"{out_dir / 'points'} holds no finished point (point.json)")
    others = [p for p in points if p.other_recipe]
    for p in others:
        logger.warning("learning-curve point %s was made with another recipe than this curve's (%s): flagged in "
                       "curve.md and left out of its plot", p.name, p.other_recipe)
    baseline_file = out_dir / "baselines.json"
    baseline_record = json.loads(baseline_file.read_text(encoding="utf-8")) if baseline_file.is_file() else None
    baselines = baseline_levels(baseline_record) if baseline_record else None
    # The probes' training audio, said only where baseline probes were trained (--probe-frames 0 trains none).
    probed = baseline_record is not None and bool(baseline_record.get("probe"))
    probe_hours = baseline_record.get("probe_train_hours") if probed else None
    write_json(out_dir / "curve.json", {"points": [asdict(p) for p in points],
                                         "baselines": asdict(baselines) if baselines else None})
    plot = plot_curve([p for p in points if not p.other_recipe], baselines, out_dir / "curve.png")
    text = [f"# {title}", "",
            "Each point: a pretraining run on a synthetic corpus of the demo's ten training voices, scored on the "
            "demo's test corpus (new sentences, a held-out voice). Audio seen: steps × the audio of a step's batches "
            "(optimizer.grad_accum_steps × data.max_batch_length). Middle: "
            "the best of the middle layers across speaker. Probe: linear frame phone classifier, best layer"
            + (f"; the baselines' probes were trained on {probe_hours:.2g} h of training audio." if probe_hours
               else "."), "",
            markdown_table(points, baselines), "",
            *(f"{OTHER_RECIPE_MARK.strip()} {p.name}: made with another recipe than this curve's, not plotted "
              f"({p.other_recipe})." for p in others), *([""] if others else []),
            f"![learning curve]({plot.name})", ""]
    path = out_dir / "curve.md"
    write_atomically(path, "\n".join(text))
    return path
