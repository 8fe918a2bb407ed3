"""Correlation of unit quality with spoken-LM accuracy, as in the SpidR paper's §4.4 (figures 13 and 14).

Input: a CSV table with one row per representation (typically ``model,layer,...``) and metric columns, e.g.
``unit_abx_across``, ``pnmi``, ``swuggy_all``. Columns whose values are not numbers (``model``) are kept as labels.
The paper's notebook pivots its result CSVs to exactly this shape (32 (model, layer) points at 6,000 h, V = 256)
and applies ``scipy.stats.pearsonr`` and ``linregress``; :func:`correlate` adds Spearman's ρ and bootstrap CIs of r
and ρ.

ABX is an error rate, so it is expected to correlate negatively with LM accuracy, and PNMI positively.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from spidr.atomic_files import save_figure
from spidr.input_files import existing_file
from spidr.text_files import utf8_errors_named

logger = logging.getLogger(__name__)

NUM_RESAMPLES = 1000

Row = dict[str, str | float]


EXACT_SPEARMAN_MAX_POINTS = 8  # up to 8! = 40,320 pairings: Spearman's p by exact permutation
# Below this many points a bootstrap interval of r or ρ says nothing: a resample of 3 points holds 2 distinct ones
# (r = ±1) or all 3 (r itself), so r = −0.68 got the "interval" [−1.00, −0.68]. No interval is given (NaN).
MIN_BOOTSTRAP_POINTS = 5


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of every row of ``x`` (R, N) with the same row of ``y``; NaN for a constant row."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip((x * y).sum(axis=1) / np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1)), -1.0, 1.0)


def correlate(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *,
              num_resamples: int = NUM_RESAMPLES, seed: int = 0, names: tuple[str, str] = ("x", "y")
              ) -> dict[str, object]:
    """Pearson and Spearman correlation, least-squares line and 95 % bootstrap CIs of Pearson's r and Spearman's ρ.

    Returns ``{"n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p", "slope", "intercept",
    "pearson_r_ci95": [low, high], "spearman_rho_ci95": [low, high]}``; the CIs are percentile bootstraps over
    points (the same resamples for both, drawn with replacement by ``numpy.random.default_rng(seed)``; ρ of a
    resample ranks it anew, ties at their average rank as ``spearmanr`` does), leaving out the resamples in which
    x or y is constant. With fewer than ``MIN_BOOTSTRAP_POINTS`` points both intervals are [NaN, NaN].
    """
    from scipy.stats import linregress, pearsonr, rankdata, spearmanr

    x_array = np.asarray(x, dtype=np.float64)
    y_array = np.asarray(y, dtype=np.float64)
    if x_array.ndim != 1 or x_array.shape != y_array.shape:
        raise ValueError(f"x and y must be two sequences of the same length, got shapes {x_array.shape} and "
                         f"{y_array.shape}")
    if x_array.size < 3:
        raise ValueError(f"a correlation needs at least 3 points, got {x_array.size}")
    if not (np.isfinite(x_array).all() and np.isfinite(y_array).all()):
        raise ValueError("x and y must be finite numbers")
    for name, array in zip(names, (x_array, y_array), strict=True):
        if np.ptp(array) == 0:
            raise ValueError(f"{name} is constant ({float(array[0]):g}): its correlation is undefined")

    pearson = pearsonr(x_array, y_array)
    spearman = spearmanr(x_array, y_array)
    spearman_p = float(spearman.pvalue)
    if x_array.size <= EXACT_SPEARMAN_MAX_POINTS:
        # scipy's p for ρ uses a t approximation that says p = 0 for a perfect ρ on 3 points; with few points the
        # exact permutation p (all n! pairings) is cheap and honest: 1/3 for a perfect ρ on 3 points.
        ranks_x, ranks_y = rankdata(x_array), rankdata(y_array)
        pairings = np.array(list(itertools.permutations(range(x_array.size))))  # (n!, n)
        rhos = _pearson_rows(np.broadcast_to(ranks_x, pairings.shape), ranks_y[pairings])
        spearman_p = float(np.mean(np.abs(rhos) >= abs(float(spearman.statistic)) - 1e-12))
    line = linregress(x_array, y_array)
    pearson_ci = spearman_ci = [math.nan, math.nan]
    if x_array.size >= MIN_BOOTSTRAP_POINTS:
        rng = np.random.default_rng(seed)
        index = rng.integers(0, x_array.size, size=(num_resamples, x_array.size))
        resampled_x, resampled_y = x_array[index], y_array[index]  # (R, n) each
        pearson_ci = _interval95(_pearson_rows(resampled_x, resampled_y))
        spearman_ci = _interval95(_pearson_rows(rankdata(resampled_x, axis=1), rankdata(resampled_y, axis=1)))
    return {
        "n": int(x_array.size),
        "pearson_r": float(pearson.statistic),
        "pearson_p": float(pearson.pvalue),
        "spearman_rho": float(spearman.statistic),
        "spearman_p": spearman_p,
        "slope": float(line.slope),
        "intercept": float(line.intercept),
        "pearson_r_ci95": pearson_ci,
        "spearman_rho_ci95": spearman_ci,
    }


def json_ready(result: Mapping[str, object]) -> dict[str, object]:
    """``result`` (``correlate``'s dict, maybe with keys added) with an interval not given (NaN) as None, for JSON:
    strict JSON has no NaN."""
    return {key: [None if math.isnan(bound) else bound for bound in value] if key.endswith("_ci95") else value
            for key, value in result.items()}


def _interval95(resampled: np.ndarray) -> list[float]:
    """The central 95 % of the finite values among ``resampled`` (R,): [low, high], NaNs if there are none."""
    resampled = resampled[np.isfinite(resampled)]
    low, high = np.percentile(resampled, [2.5, 97.5]) if resampled.size else (math.nan, math.nan)
    return [float(low), float(high)]


# Columns that say which representation a row is even when they hold numbers (a layer, a codebook size, the
# pretraining hours of a checkpoint); any column holding text (model, units kind) does too.
# Matched whatever the case ("K", "Layer"); read_table's label_columns adds others.
LABEL_COLUMNS = frozenset({"layer", "num_units", "k", "v", "units", "vocab_size", "codebook_size", "num_clusters",
                           "clusters", "hours", "steps", "step", "seed", "checkpoint"})

# Cell texts that mean "no value" (pandas, R and spreadsheets write these); anything else must be a number.
MISSING = frozenset({"", "nan", "n/a", "na", "none", "null", "-", "–"})


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_table(csv_path: str | Path, columns: Sequence[str], *, label_columns: Sequence[str] = (),
               dropped: dict[int, set[str]] | None = None) -> list[Row]:
    """Rows of a CSV table, as ``{column: float or str}`` (text that parses as a finite number becomes a float).

    ``columns`` are the metrics to correlate: they must be in the header. A row whose value in one of them is
    missing (empty, "nan", "n/a", "na", "none", "null", "-") is dropped with a warning; any other value that is not a
    finite number (a typo such as "6O.5", "inf") is an error naming its line (with ``dropped``, the rows left out are
    added there, line → columns, for the caller to tell once over several reads). Two rows with the same labels (text
    columns such as model or units, ``LABEL_COLUMNS`` such as layer, K or num_units in any case, and the numeric
    ``label_columns`` named, also where one of them is correlated) are an error: the point would count twice.
    Fewer than 3 rows left is an error.
    """
    csv_path = Path(csv_path)
    existing_file(csv_path, "table")
    with utf8_errors_named(csv_path, "the table"), csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        missing = [column for column in [*columns, *label_columns] if column not in header]
        if missing:
            raise ValueError(f"{csv_path}: no column {', '.join(map(repr, missing))}; the columns are "
                             f"{', '.join(header)}")
        rows: list[Row] = []
        left_out: dict[int, set[str]] = {}
        seen: dict[tuple[tuple[str, str], ...], int] = {}
        for record in reader:
            values = {column: (record[column] or "").strip() for column in header}
            for column in columns:
                if _number(values[column]) is None and values[column].lower() not in MISSING:
                    raise ValueError(f"{csv_path}, line {reader.line_num}: {column} = {values[column]!r} is not a "
                                     f"finite number (leave the cell empty where a point has no {column})")
            bad = [column for column in columns if _number(values[column]) is None]
            if bad:
                left_out.setdefault(reader.line_num, set()).update(bad)
                continue
            # (a label column can be correlated itself, e.g. --x hours over a learning curve: it still tells the
            # rows apart; a correlated column is a number, so never a text label)
            point = tuple((column, text) for column, text in values.items() if (
                column.lower() in LABEL_COLUMNS or column in label_columns
                or (column not in columns and _number(text) is None and text.lower() not in MISSING)))
            if point and point in seen:
                labels = ", ".join(f"{column} {text!r}" for column, text in point)
                numeric = [column for column in header if column not in columns and column not in dict(point)]
                raise ValueError(
                    f"{csv_path}, lines {seen[point]} and {reader.line_num}: two rows for {labels}; each point must "
                    "appear once (add a column that tells them apart"
                    + (f", or name a numeric one that does with --label-columns: {', '.join(numeric)})" if numeric
                       else ")"))
            seen[point] = reader.line_num
            row: Row = {}
            for column, text in values.items():
                number = _number(text)
                row[column] = text if number is None else number
            rows.append(row)
    if dropped is not None:
        for line, bad in left_out.items():
            dropped.setdefault(line, set()).update(bad)
    elif left_out:
        warn_dropped(csv_path, left_out)
    if len(rows) < 3:
        raise ValueError(f"{csv_path}: {len(rows)} usable row(s) for {', '.join(columns)}; a correlation needs "
                         f"at least 3")
    return rows


def warn_dropped(csv_path: str | Path, dropped: Mapping[int, set[str]]) -> None:
    """One warning for the rows left out of the correlations, by line, with the columns they have no value in."""
    lines = [f"line {line} ({', '.join(sorted(columns))})" for line, columns in sorted(dropped.items())]
    logger.warning("%s: dropped %d row(s) with an empty or non-numeric value: %s", csv_path, len(dropped),
                   "; ".join(lines))


def plot_scatter(rows: Sequence[Mapping[str, str | float]], x: str, y: str, path: str | Path, *,
                 result: Mapping[str, object] | None = None) -> Path:
    """Scatter plot of ``y`` against ``x`` with the least-squares line and r and p in the title; points are coloured
    by their ``model`` column and annotated with their ``layer`` when the table has them. Writes a PNG to ``path``
    without touching matplotlib's global backend (a ``Figure`` with its own Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x_values = np.array([float(row[x]) for row in rows])
    y_values = np.array([float(row[y]) for row in rows])
    result = result if result is not None else correlate(x_values, y_values)
    figure = Figure(figsize=(6.0, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    models = [str(row.get("model", "")) for row in rows]
    for model in dict.fromkeys(models):  # first-seen order, so colours follow the table
        chosen = [index for index, name in enumerate(models) if name == model]
        axes.scatter(x_values[chosen], y_values[chosen], label=model or None, s=28)
    if all("layer" in row for row in rows):
        for row, x_value, y_value in zip(rows, x_values, y_values, strict=True):
            layer = row["layer"]
            text = f"{int(layer)}" if isinstance(layer, float) and layer.is_integer() else str(layer)
            axes.annotate(text, (x_value, y_value), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ends = np.array([x_values.min(), x_values.max()])
    axes.plot(ends, float(result["intercept"]) + float(result["slope"]) * ends, color="black", linewidth=1)
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.set_title(f"{y} vs {x}: r = {float(result['pearson_r']):.3f}, p = {float(result['pearson_p']):.2g} "
                   f"(n = {result['n']})")
    if any(models):
        axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path, dpi=120)
    return path


# One row per (x, y) pair in ``lm-correlate --out``: the intervals' bounds as columns of their own.
CSV_COLUMNS = ("x", "y", "n", "pearson_r", "pearson_p", "pearson_r_ci95_low", "pearson_r_ci95_high", "spearman_rho",
               "spearman_p", "spearman_rho_ci95_low", "spearman_rho_ci95_high", "slope", "intercept")


def correlations_csv(results: Sequence[Mapping[str, object]]) -> str:
    """``results`` (``correlate``'s dicts with "x" and "y" added) as CSV text with ``CSV_COLUMNS``; numbers at full
    precision, an interval not given (too few points) left empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in results:
        flat = dict(result)
        for name in ("pearson_r_ci95", "spearman_rho_ci95"):
            flat[f"{name}_low"], flat[f"{name}_high"] = result[name]
        writer.writerow(["" if isinstance(value, float) and math.isnan(value) else value
                         for value in (flat[column] for column in CSV_COLUMNS)])
    return buffer.getvalue()
