"""Per-layer evaluation report: continuous ABX, codebook-unit ABX and unit quality, beside baselines.

checkpoint → features and codebook units per layer (``features.py``) → ABX within/across speaker
(``abx.py``) and PNMI & co. (``unit_quality.py``) → ``report.json``, ``report.md`` and PNG plots in the style of the
paper's per-layer figures. Baselines (MFCC, the same model at random initialisation) go in the same table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spidr.atomic_files import save_figure, write_atomically
from spidr.data.audio import AudioError, load_audio
from spidr.data.manifest import Manifest, ManifestEntry, utterances_digest
from spidr.eval.abx import abx_error_rate
from spidr.eval.feature_dir import FeatureDirectory, StemKeyed
from spidr.eval.features import ExtractionSettings
from spidr.eval.folder_extraction import extract_to_directory, output_root, output_stems, unread_stems
from spidr.eval.items import SPEAKER_COLUMN, Items
from spidr.eval.mfcc import mfcc
from spidr.eval.unit_quality import unit_quality
from spidr.eval.units import read_units
from spidr.extras import figure, import_extra
from spidr.models.frames import frame_rate_hz

logger = logging.getLogger(__name__)

ALIGNMENT_RATE_HZ = 100  # the alignments' frame rate when none is given (the demo's and learning-curve's)
SETTINGS_FILE = "settings.json"  # beside report.json: what its scores were measured with (compare-reports checks it)
SPEAKER_CONDITIONS = ("within", "across")
PLOT_PURPOSE = "the evaluation report's plots"
ABX_PLOT, PNMI_PLOT = "abx_per_layer.png", "pnmi_per_layer.png"


@dataclass(frozen=True)
class AbxSettings:
    """The ABX condition shared by every row of a report (ZeroSpeech defaults)."""

    context: str = "within"
    distance: str = "angular"
    max_size_group: int = 10
    max_x_across: int = 5
    seed: int = 0


@dataclass
class LayerRow:
    """One line of the report: a representation (model + layer, or a baseline) and its scores (ABX in %)."""

    model: str
    layer: int | None
    abx_within: float | None = None
    abx_across: float | None = None
    unit_abx_within: float | None = None
    unit_abx_across: float | None = None
    quality: dict[str, float] = field(default_factory=dict)


def _abx_percent(
    features: Mapping, items: Items, speaker: str, settings: AbxSettings, *, distance: str, frequency: int = 50
) -> float | None:
    """ABX error (%) of ``features`` on ``items``; None across speaker when the items hold one speaker (no cell)."""
    if speaker == "across" and not has_several_speakers(items):
        return None
    rate = abx_error_rate(
        features,
        items,
        speaker=speaker,
        context=settings.context,
        distance=distance,
        frequency=frequency,
        max_size_group=settings.max_size_group,
        max_x_across=settings.max_x_across,
        seed=settings.seed,
    )
    return 100.0 * rate


def has_several_speakers(items: Items) -> bool:
    """Whether across-speaker ABX has cells to score: the items name two speakers or more."""
    return len(set(items.column(SPEAKER_COLUMN))) > 1


def _warn_if_one_speaker(items: Items) -> None:
    if not has_several_speakers(items):
        logger.warning("%s holds one speaker: across-speaker ABX is left out of the report (–)", items.source)


def _items_for(items: Items, available: Mapping) -> Items:
    """Keep the items whose file has features (files the extractor skipped drop out, with a warning)."""
    keep = [i for i, name in enumerate(items.files) if name in available]
    if len(keep) == len(items):
        return items
    if not keep:
        raise ValueError(f"none of the {len(items)} ABX items of {items.source} names a file with "
                         f"features (the first names {items.files[0]!r}; the files are named e.g. "
                         f"{next(iter(available), None)!r}, and found by that name, by their path below the layer "
                         "folder or by a path ending with it): is it the item file of another corpus?")
    kept = set(keep)
    missing = sorted({name for i, name in enumerate(items.files) if i not in kept})
    logger.warning("%d of %d ABX items refer to %d files without features (e.g. %s); they are left out",
                   len(items) - len(keep), len(items), len(missing), ", ".join(map(repr, missing[:3])))
    return items.of_files(available)


def evaluate_model(
    model: torch.nn.Module,
    name: str,
    entries: Sequence[ManifestEntry],
    *,
    items: Items,
    alignments: Mapping[str, Sequence[str]] | None,
    layers: Sequence[int],
    work_dir: Path,
    abx: AbxSettings = AbxSettings(),
    alignment_rate_hz: int = ALIGNMENT_RATE_HZ,
    progress: bool = True,
    dtype: str = "float32",
    checkpoint: str = "",
    unread: Sequence[ManifestEntry] = (),
    untrained: bool = False,
) -> list[LayerRow]:
    """Extract ``layers`` (and codebook units) of ``model`` for ``entries`` into ``work_dir`` and score them.
    ``dtype``: ``ExtractionSettings.dtype`` ("bfloat16": the Transformer layers in bf16). ``checkpoint``: where the
    model came from, recorded in the features' metadata.json for whoever reuses them. ``unread``: the files of the
    scan that gave ``entries`` that it could not read (``extract_to_directory``). ``untrained``: a random-init
    baseline, whose collapsed codebook units are expected (no warning)."""
    settings = ExtractionSettings(layers=tuple(layers), codebooks=True, dtype=dtype)
    metadata = extract_to_directory(model, entries, work_dir, settings, checkpoint=checkpoint, progress=progress,
                                    replace_other=True, unread=unread)
    # (their ids are held as the written files' are, and names weighed against full paths: see StemKeyed)
    skipped, root = metadata.get("skipped_stems", []), str(metadata.get("audio_root", ""))
    rate = frame_rate_hz(model.cfg.extractor_conv_layer_config)
    _warn_if_one_speaker(items)
    rows = []
    for layer in layers:
        # (by utterance id, or by path where several files hold the id: spk1/sa1, spk2/sa1)
        features = StemKeyed(FeatureDirectory(work_dir / f"layer_{layer:02d}"), skipped=skipped, root=root)
        layer_items = _items_for(items, features)
        row = LayerRow(model=name, layer=layer)
        row.abx_within = _abx_percent(features, layer_items, "within", abx, distance=abx.distance, frequency=rate)
        row.abx_across = _abx_percent(features, layer_items, "across", abx, distance=abx.distance, frequency=rate)
        if layer in model.head_layers:
            units_path = work_dir / "codebook_units" / f"layer_{layer:02d}.jsonl"
            units = read_units(units_path)  # named by utterance id, or by path where several files hold it
            if not untrained:
                _warn_if_collapsed(units, model.cfg.codebook_size, f"{name} layer {layer}")
            # Found as the features are: by item #file path or utterance id.
            unit_features = StemKeyed({name: seq.astype(np.int64) for name, seq in units.items()}, source=units_path,
                                      skipped=skipped, root=root)
            row.unit_abx_within = _abx_percent(unit_features, layer_items, "within", abx, distance="identical",
                                               frequency=rate)
            row.unit_abx_across = _abx_percent(unit_features, layer_items, "across", abx, distance="identical",
                                               frequency=rate)
            if alignments is not None:
                row.quality = unit_quality(
                    units, alignments, unit_rate_hz=rate, alignment_rate_hz=alignment_rate_hz,
                    num_units=model.cfg.codebook_size, skipped=skipped, root=root,
                )
        logger.info("%s layer %d: ABX within %s %%, across %s %%", name, layer, format_number(row.abx_within),
                    format_number(row.abx_across))
        rows.append(row)
    return rows


def _warn_if_collapsed(units: Mapping[str, np.ndarray], codebook_size: int, where: str) -> None:
    """Warn when codebook units use their codebook like fewer codewords than a collapsed codebook does in training
    (``spidr.train.metrics.collapse_threshold``): their ABX is then near chance for want of units, not of phonetics."""
    from spidr.train.metrics import collapse_threshold

    counts = np.bincount(np.concatenate([np.asarray(seq, dtype=np.int64) for seq in units.values()] or [[0]]),
                         minlength=codebook_size).astype(np.float64)
    shares = counts[counts > 0] / counts.sum()
    perplexity = float(2 ** -(shares * np.log2(shares)).sum())
    if perplexity < collapse_threshold(codebook_size):
        logger.warning("%s: its codebook units use %d of %d codewords (perplexity %.2f): the head has collapsed "
                       "(a model trained too little, or on too little data; docs/demo-recipe.md)", where,
                       int((counts > 0).sum()), codebook_size, perplexity)


def evaluate_mfcc(entries: Sequence[ManifestEntry], items: Items, *, abx: AbxSettings = AbxSettings(),
                  unread: Sequence[ManifestEntry] = ()) -> LayerRow:
    """The MFCC baseline (13 + Δ + ΔΔ at 50 Hz, per-utterance standardised input) on the same items (``unread``:
    as ``evaluate_model``'s)."""
    features = {}
    skipped = unread_stems(entries, unread)
    # Keyed as the model's features are (their paths below a layer folder): by file id, two files that share one
    # (spk1/sa1, spk2/sa1) were one key, the second file's MFCCs scored for the first one's items.
    for entry, key in zip(entries, output_stems(entries), strict=True):
        try:
            features[key] = mfcc(load_audio(entry, normalize=True).numpy())
        except AudioError as error:
            logger.warning("MFCC baseline: skipping %s: %s", entry.location, error.reason)
            skipped.append(key)
    # (item #file paths or utterance ids find them; a skipped file's id is held as the model's features hold it)
    features = StemKeyed(features, source="the corpus", skipped=skipped, root=output_root(entries))
    layer_items = _items_for(items, features)
    _warn_if_one_speaker(items)
    return LayerRow(
        model="MFCC",
        layer=None,
        abx_within=_abx_percent(features, layer_items, "within", abx, distance=abx.distance),
        abx_across=_abx_percent(features, layer_items, "across", abx, distance=abx.distance),
    )


# --------------------------------------------------------------------------------------------------------------
# Writing the report
# --------------------------------------------------------------------------------------------------------------


def format_number(value: float | None, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals for a table: "–" when missing (None or NaN), and no "-0.000" for a value
    that rounds to zero from below (a PNMI of -1e-9 reads 0.000)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def markdown_table(rows: Sequence[LayerRow]) -> str:
    """The report table: one line per representation."""
    header = ("| model | layer | ABX within % | ABX across % | unit ABX within % | unit ABX across % | PNMI | "
              "phone purity | cluster purity | codebook ppl | active | bitrate bit/s |")
    lines = [header, "|" + "---|" * 12]
    for row in rows:
        q = row.quality
        cells = [row.model, row.layer if row.layer is not None else "–",
                 *(format_number(v) for v in (row.abx_within, row.abx_across, row.unit_abx_within,
                                              row.unit_abx_across)),
                 format_number(q.get("pnmi"), 3), format_number(q.get("phone_purity"), 3),
                 format_number(q.get("cluster_purity"), 3), format_number(q.get("codebook_perplexity"), 1),
                 q.get("active_codewords", "–"), format_number(q.get("bitrate"), 1)]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def plot_report(rows: Sequence[LayerRow], out_dir: Path) -> list[Path]:
    """Per-layer curves: ABX within/across (continuous, and codebook units) and PNMI; baselines as lines."""
    models = list(dict.fromkeys(row.model for row in rows if row.layer is not None))
    baselines = [row for row in rows if row.layer is None]
    written = []
    fig, axes = figure(figsize=(10, 4), purpose=PLOT_PURPOSE, ncols=2, sharey=True)
    ticker = import_extra("matplotlib.ticker", extra="eval", purpose=PLOT_PURPOSE)
    for ax, speaker in zip(axes, SPEAKER_CONDITIONS, strict=True):
        for model in models:
            layer_rows = [r for r in rows if r.model == model and r.layer is not None]
            scored = [r for r in layer_rows if getattr(r, f"abx_{speaker}") is not None]  # across: ≥ 2 speakers
            (line,) = ax.plot([r.layer for r in scored], [getattr(r, f"abx_{speaker}") for r in scored], "o-",
                              label=model)
            unit_rows = [r for r in layer_rows if getattr(r, f"unit_abx_{speaker}") is not None]
            if unit_rows:  # the model's colour, dashed: several models stay told apart
                ax.plot([r.layer for r in unit_rows], [getattr(r, f"unit_abx_{speaker}") for r in unit_rows], "s--",
                        color=line.get_color(), label=f"{model} (codebook units)")
        for baseline in baselines:
            if getattr(baseline, f"abx_{speaker}") is not None:
                ax.axhline(getattr(baseline, f"abx_{speaker}"), linestyle=":", color="grey", label=baseline.model)
        ax.axhline(50, color="black", linewidth=0.5)
        ax.set_title(f"ABX {speaker} speaker")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # (no tick at layer 1.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("error rate (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / ABX_PLOT
    save_figure(fig, path, dpi=120)
    written.append(path)
    quality_rows = [r for r in rows if r.quality]
    if quality_rows:
        fig, ax = figure(figsize=(5, 4), purpose=PLOT_PURPOSE)
        for model in models:
            model_rows = [r for r in quality_rows if r.model == model]
            ax.plot([r.layer for r in model_rows], [r.quality["pnmi"] for r in model_rows], "o-", label=model)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # (no tick at layer 1.5)
        ax.set_ylabel("PNMI (codebook units)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / PNMI_PLOT
        save_figure(fig, path, dpi=120)
        written.append(path)
    return written


def evaluation_settings(*, abx: AbxSettings, item_file: str | Path, entries: Manifest,
                        alignments_file: str | Path | None = None, alignment_rate_hz: float = ALIGNMENT_RATE_HZ,
                        dtype: str = "float32", stress_removed: bool = False) -> dict[str, object]:
    """What a report's scores depend on besides the models (``SETTINGS_FILE``): the ABX condition, the item file and
    the alignments (by content) and their rate (``ALIGNMENT_RATE_HZ``, ``evaluate_model``'s too, unless given),
    the test utterances (ids and lengths) and the extraction dtype; ``stress_removed``: the alignments' ARPAbet
    stress digits were taken off (``Alignments.stress_removed``), as reports made before 2026-12-07 never did, which
    is then recorded. Two reports are comparable when these agree."""
    def content(path: str | Path | None) -> dict[str, str] | None:
        if path is None:
            return None
        if Path(path).is_dir():  # a folder of TextGrid alignments: their names and contents
            from spidr.eval.textgrid import textgrids_digest

            return {"name": Path(path).name, "sha256": textgrids_digest(path)}
        return {"name": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}

    return {"abx": asdict(abx), "item_file": content(item_file),
            "test_utterances": {"count": len(entries), "sha256": utterances_digest(entries)},
            "alignments": content(alignments_file),
            "alignment_rate_hz": None if alignments_file is None else alignment_rate_hz, "dtype": dtype,
            **({"alignment_stress": "removed"} if stress_removed and alignments_file is not None else {})}


def write_report(rows: Sequence[LayerRow], out_dir: str | Path, *, title: str, notes: Sequence[str] = (),
                 settings: Mapping[str, object] | None = None) -> Path:
    """Write ``report.json``, ``settings`` (``evaluation_settings``) as ``SETTINGS_FILE``, the plots and
    ``report.md``, each under a temporary name and renamed (a failure leaves no half-written file), and remove a plot
    (or settings file) of an earlier report that this one has not; returns the markdown path. The scores come first:
    they are kept even when plotting fails (matplotlib missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The earlier settings go first: killed between the two renames, the new scores stood under them (the settings
    # compare-reports reads as the scores' condition); without them they read as of unknown settings.
    (out_dir / SETTINGS_FILE).unlink(missing_ok=True)
    write_atomically(out_dir / "report.json", json.dumps([asdict(r) for r in rows], indent=1))
    if settings is not None:
        write_atomically(out_dir / SETTINGS_FILE, json.dumps(settings, indent=1) + "\n")
    plots = plot_report(rows, out_dir)
    for name in {ABX_PLOT, PNMI_PLOT} - {p.name for p in plots}:
        (out_dir / name).unlink(missing_ok=True)
    text = [f"# {title}", "", *notes, "", markdown_table(rows), ""]
    text += [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    write_atomically(path, "\n".join(text) + "\n")
    return path


# Comparing reports ----------------------------------------------------------------------------------------------


def read_report(path: str | Path) -> list[LayerRow]:
    """The rows of a ``report.json`` written by :func:`write_report` (``path`` is the file or its folder)."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file}: no such report (spidr evaluate and spidr demo write report.json)")
    records = _read_json(file, list, "a report.json", "a list of rows")
    rows = []
    for index, record in enumerate(records):
        try:
            rows.append(LayerRow(**record))
        except TypeError as error:
            raise ValueError(f"{file}: row {index} is not a report row ({error})") from error
        row = rows[-1]
        scores = {name: getattr(row, name) for name in ("abx_within", "abx_across", "unit_abx_within",
                                                        "unit_abx_across")}
        for name, value in [*scores.items(), *(row.quality or {}).items()]:
            percent = name in scores
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                    or (percent and not 0.0 <= value <= 100.0)):
                raise ValueError(f"{file}: row {index} ({row.model}, layer {row.layer}): {name} = {value!r}: expected "
                                 f"{'an error rate in % (0 to 100)' if percent else 'a finite number'}, or null "
                                 "where it was not measured")
    return rows


def read_report_settings(path: str | Path) -> dict[str, object] | None:
    """The ``SETTINGS_FILE`` beside a report (``path``: its report.json or folder); None for a report without one
    (written before spidr recorded its settings)."""
    path = Path(path)
    file = (path.parent if path.suffix == ".json" else path) / SETTINGS_FILE
    if not file.is_file():
        return None
    return _read_json(file, dict, "the settings file spidr writes", "an object")


def _read_json(file: Path, kind: type, what: str, expected: str) -> Any:
    """The JSON value of ``file``, refused as not being ``what`` unless it is a ``kind`` (``expected``)."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not {what}: {error}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{file} is not {what}: expected {expected}, found {type(value).__name__}")
    return value


def settings_differences(reports: Sequence[tuple[str, Mapping[str, object] | None]]) -> list[str]:
    """One line per setting on which ``(name, settings)`` reports differ (dotted keys, each report's value), and one
    naming the reports that record none: what makes their scores incomparable."""
    def flat(settings: Mapping[str, object], prefix: str = "") -> dict[str, object]:
        values: dict[str, object] = {}
        for key, value in settings.items():
            if isinstance(value, Mapping) and value:
                values |= flat(value, f"{prefix}{key}.")
            else:
                values[f"{prefix}{key}"] = value
        return values

    recorded = [(name, flat(settings)) for name, settings in reports if settings is not None]
    lines = []
    for key in sorted({key for _, values in recorded for key in values}):
        found = [(name, values.get(key, "not recorded")) for name, values in recorded]
        if len({json.dumps(value, sort_keys=True) for _, value in found}) > 1:
            lines.append(f"{key}: " + ", ".join(f"{name} {_setting_text(value)}" for name, value in found))
    unknown = [name for name, settings in reports if settings is None]
    if unknown and recorded:
        lines.append(f"no settings recorded by {', '.join(unknown)} (made before spidr recorded them)")
    return lines


def _setting_text(value: object) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)  # a SHA-256: its start


def merge_reports(reports: Sequence[tuple[str, Sequence[LayerRow]]]) -> list[LayerRow]:
    """One table out of several ``(name, rows)`` reports, e.g. two models evaluated on the same test set.

    A report's per-layer rows are renamed ``name`` when it holds one model, ``"name: model"`` when it holds several
    (a trained and a random-init model). A baseline (a row without layer, such as MFCC) is kept once when the reports
    that have it agree on its scores, and per report, prefixed, when they differ (other test sets or ABX settings).
    """
    names = [name for name, _ in reports]
    if len(set(names)) != len(names):
        raise ValueError(f"report names must differ to tell the curves apart, got {names} (two folders of the same "
                         "name? label each report with --name)")
    merged: list[LayerRow] = []
    baselines: dict[str, list[tuple[str, LayerRow]]] = {}
    for name, rows in reports:
        models = list(dict.fromkeys(row.model for row in rows if row.layer is not None))
        for row in rows:
            if row.layer is None:
                baselines.setdefault(row.model, []).append((name, row))
            else:
                model = name if len(models) == 1 else f"{name}: {row.model}"
                merged.append(LayerRow(**{**asdict(row), "model": model}))
    for model, found in baselines.items():
        if all(asdict(row) == asdict(found[0][1]) for _, row in found):
            merged.append(found[0][1])
        else:
            merged += [LayerRow(**{**asdict(row), "model": f"{name}: {model}"}) for name, row in found]
    return merged
