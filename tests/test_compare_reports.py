"""``spidr compare-reports``: several evaluation reports in one table and one set of per-layer plots."""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from spidr.cli import main
from spidr.eval.items import Items
from spidr.eval.report import (
    AbxSettings,
    LayerRow,
    _abx_percent,
    merge_reports,
    read_report,
    settings_differences,
    write_report,
)

MFCC = LayerRow("MFCC", None, abx_within=4.0, abx_across=16.0)


def _rows(model: str, offset: float) -> list[LayerRow]:
    return [LayerRow(model, layer, abx_within=10.0 + offset + layer, abx_across=20.0 + offset - layer,
                     unit_abx_across=35.0 + layer, quality={"pnmi": 0.1 * layer, "active_codewords": 32})
            for layer in (1, 2, 3)]


def test_read_report_gives_back_what_write_report_wrote(tmp_path):
    rows = [*_rows("SpidR (trained)", 0.0), *_rows("SpidR (random init)", 5.0), MFCC]
    write_report(rows, tmp_path / "a", title="t")
    assert read_report(tmp_path / "a") == rows
    assert read_report(tmp_path / "a" / "report.json") == rows


def test_merge_names_models_by_report_and_keeps_a_shared_baseline_once():
    merged = merge_reports([("spidr", [*_rows("final", 0.0), MFCC]), ("dinosr", [*_rows("final", 1.0), MFCC])])
    assert [(r.model, r.layer) for r in merged] == [
        ("spidr", 1), ("spidr", 2), ("spidr", 3), ("dinosr", 1), ("dinosr", 2), ("dinosr", 3), ("MFCC", None)]
    # scores travel unchanged with their rows
    assert [r.abx_across for r in merged[3:6]] == [r.abx_across for r in _rows("x", 1.0)]
    assert merged[-1] == MFCC


def test_merge_keeps_differing_baselines_apart_and_prefixes_several_models():
    other_mfcc = LayerRow("MFCC", None, abx_within=4.4, abx_across=17.8)  # another test set
    merged = merge_reports([("demo", [*_rows("trained", 0.0), *_rows("random init", 3.0), MFCC]),
                            ("conf", [*_rows("final", 2.0), other_mfcc])])
    models = list(dict.fromkeys(r.model for r in merged))
    assert models == ["demo: trained", "demo: random init", "conf", "demo: MFCC", "conf: MFCC"]
    assert {r.model: r.abx_across for r in merged if r.layer is None} == {"demo: MFCC": 16.0, "conf: MFCC": 17.8}


def test_merge_refuses_two_reports_of_one_name():
    with pytest.raises(ValueError, match="names must differ"):
        merge_reports([("run", _rows("a", 0.0)), ("run", _rows("b", 0.0))])


def test_command_writes_the_merged_report_and_plots(tmp_path, capsys):
    write_report([*_rows("final", 0.0), MFCC], tmp_path / "spidr-s0", title="a")
    write_report([*_rows("final", 1.0), MFCC], tmp_path / "dinosr-s0", title="b")
    out = tmp_path / "cmp"
    assert main(["compare-reports", str(tmp_path / "spidr-s0"), str(tmp_path / "dinosr-s0" / "report.json"),
                 "--out", str(out)]) == 0
    rows = json.loads((out / "report.json").read_text())
    assert [(r["model"], r["layer"]) for r in rows][:4] == [("spidr-s0", 1), ("spidr-s0", 2), ("spidr-s0", 3),
                                                           ("dinosr-s0", 1)]
    assert (out / "abx_per_layer.png").stat().st_size > 0
    assert "| dinosr-s0 | 2 |" in (out / "report.md").read_text()

    assert main(["compare-reports", str(tmp_path / "spidr-s0"), str(tmp_path / "dinosr-s0"), "--out",
                 str(tmp_path / "named"), "--name", "SpidR", "--name", "DinoSR"]) == 0
    assert {r["model"] for r in json.loads((tmp_path / "named" / "report.json").read_text())} == {
        "SpidR", "DinoSR", "MFCC"}


def test_command_errors_name_the_problem(tmp_path, capsys):
    write_report(_rows("final", 0.0), tmp_path / "a", title="a")
    missing = tmp_path / "missing"
    assert main(["compare-reports", str(tmp_path / "a"), str(missing), "--out", str(tmp_path / "o")]) == 2
    assert "missing: no such report" in capsys.readouterr().err
    assert main(["compare-reports", str(tmp_path / "a"), "--name", "x", "--name", "y", "--out",
                 str(tmp_path / "o")]) == 2
    assert "--name was given 2 times for 1 reports" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([asdict(_rows("m", 0.0)[0]), {"model": "m", "layr": 2}]))
    assert main(["compare-reports", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.json: row 1 is not a report row" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_command_never_writes_over_an_input_report_and_asks_before_replacing_an_output(tmp_path, capsys):
    write_report([*_rows("final", 0.0), MFCC], tmp_path / "a", title="a")
    write_report([*_rows("final", 1.0), MFCC], tmp_path / "b", title="b")
    original = (tmp_path / "a" / "report.json").read_text()
    for out in (tmp_path / "a", tmp_path / "b" / ".." / "a"):  # an input's folder, however spelled, even --overwrite
        for overwrite in ([], ["--overwrite"]):
            assert main(["compare-reports", str(tmp_path / "a" / "report.json"), str(tmp_path / "b"), "--out",
                         str(out), *overwrite]) == 2
            assert "is the folder of the input report" in capsys.readouterr().err
    assert (tmp_path / "a" / "report.json").read_text() == original
    out = tmp_path / "cmp"
    assert main(["compare-reports", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert (out / "pnmi_per_layer.png").is_file()
    assert main(["compare-reports", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 2
    assert f"output {out} already exists; pass --overwrite to replace it" in capsys.readouterr().err
    # replaced with reports without unit quality: the earlier PNMI plot does not stay behind
    for name in ("c", "d"):
        write_report([LayerRow("m", 1, abx_within=1.0, abx_across=2.0)], tmp_path / name, title=name)
    assert main(["compare-reports", str(tmp_path / "c"), str(tmp_path / "d"), "--out", str(out), "--overwrite"]) == 0
    assert {r["model"] for r in json.loads((out / "report.json").read_text())} == {"c", "d"}
    assert not (out / "pnmi_per_layer.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["abx_per_layer.png", "report.json", "report.md"]


def test_table_numbers_show_missing_values_and_no_negative_zero() -> None:
    from spidr.eval.report import format_number

    assert format_number(-1e-9, 3) == "0.000"  # a PNMI a hair below zero
    assert format_number(-0.04, 1) == "0.0"
    assert format_number(-0.05, 1) == "-0.1"  # a real negative stays negative
    assert format_number(None) == format_number(float("nan")) == "–"
    assert format_number(12.345) == "12.35"


def test_the_markdown_table_shows_every_unit_quality_figure_in_its_column():
    """bitrate and cluster purity were in report.json only; each figure sits under its own header."""
    from spidr.eval.report import markdown_table

    quality = {"pnmi": 0.4591, "phone_purity": 0.8333, "cluster_purity": 0.6667, "codebook_perplexity": 1.8899,
               "active_codewords": 2, "bitrate": 33.333}
    header, rule, line = markdown_table([LayerRow("m", 3, abx_within=7.5, unit_abx_across=41.25,
                                                  quality=quality)]).splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), line.strip("| ").split(" | "), strict=True))
    assert rule.count("---") == len(cells)
    assert cells == {"model": "m", "layer": "3", "ABX within %": "7.50", "ABX across %": "–",
                     "unit ABX within %": "–", "unit ABX across %": "41.25", "PNMI": "0.459", "phone purity": "0.833",
                     "cluster purity": "0.667", "codebook ppl": "1.9", "active": "2", "bitrate bit/s": "33.3"}


def test_settings_differences_name_each_reports_value_and_the_reports_without_settings():
    a = {"abx": {"context": "within", "seed": 0}, "item_file": {"name": "x.item", "sha256": "a" * 64}}
    b = {"abx": {"context": "any", "seed": 0}, "item_file": {"name": "x.item", "sha256": "b" * 64}}
    assert settings_differences([("a", a), ("b", a)]) == []
    assert settings_differences([("a", a), ("b", b), ("old", None)]) == [
        "abx.context: a within, b any", f"item_file.sha256: a {'a' * 12}, b {'b' * 12}",
        "no settings recorded by old (made before spidr recorded them)"]
    assert settings_differences([("a", None), ("b", None)]) == []  # nothing to compare


def test_a_report_or_settings_file_of_another_shape_is_named(tmp_path):
    from spidr.eval.report import read_report_settings

    write_report([MFCC], tmp_path / "a", title="t", settings={"dtype": "float32"})
    assert read_report_settings(tmp_path / "a" / "report.json") == {"dtype": "float32"}
    (tmp_path / "a" / "settings.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"settings\.json is not the settings file spidr writes: expected an object, "
                                         "found list"):
        read_report_settings(tmp_path / "a")
    (tmp_path / "a" / "report.json").write_text("{}")
    with pytest.raises(ValueError, match=r"report\.json is not a report\.json: expected a list of rows, found dict"):
        read_report(tmp_path / "a")
    write_report([MFCC], tmp_path / "a", title="t")  # a report without settings removes the earlier file
    assert read_report_settings(tmp_path / "a") is None


def test_a_setting_only_a_later_report_records_is_named():
    """mut cmp-settings-first-only. Truth: settings_differences gives 'one line per setting on which reports
    differ'; a setting recorded by report b only differs ('not recorded' for a)."""
    from spidr.eval.report import settings_differences

    a = {"abx": {"context": "within"}}
    b = {"abx": {"context": "within", "max_size_group": 10}}
    assert settings_differences([("a", a), ("b", b)]) == ["abx.max_size_group: a not recorded, b 10"]
    assert settings_differences([("b", b), ("a", a)]) == ["abx.max_size_group: b 10, a not recorded"]


def test_baselines_differing_in_any_score_are_kept_apart():
    """mut cmp-baseline-by-name. Truth: merge_reports keeps a baseline once only 'when the reports that have it agree
    on its scores': MFCC rows equal in ABX within but not across are two baselines."""
    from spidr.eval.report import LayerRow, merge_reports

    layer = [LayerRow("final", 1, abx_within=10.0, abx_across=20.0)]
    merged = merge_reports([("a", [*layer, LayerRow("MFCC", None, abx_within=4.0, abx_across=16.0)]),
                            ("b", [*layer, LayerRow("MFCC", None, abx_within=4.0, abx_across=19.0)])])
    assert {r.model: r.abx_across for r in merged if r.layer is None} == {"a: MFCC": 16.0, "b: MFCC": 19.0}



# (tests below: wiring that a mutation round, 54 mutants over evaluate, probe, reports and plots, found untested)

def test_evaluation_settings_tell_other_test_utterances_of_the_same_count_and_ignore_an_unused_rate(tmp_path):
    """mut R10 (test utterances recorded by count alone: two test sets of 4 utterances were "measured alike"),
    R09 (an alignment rate recorded without alignments: reports without PNMI differed on a rate nothing used).
    Truth: the docstring ("the test utterances (ids and lengths)"; the rate of the alignments)."""
    from spidr.data.manifest import Manifest, ManifestEntry
    from spidr.eval.report import AbxSettings, evaluation_settings, settings_differences

    item = tmp_path / "t.item"
    item.write_text("#file onset offset #phone prev-phone next-phone speaker\na 0.1 0.2 x y z s\n")
    entries = [ManifestEntry(f"u{i}", f"/c/u{i}.wav", 16000) for i in range(4)]
    four = Manifest.from_entries(entries)
    longer = Manifest.from_entries([*entries[:3], ManifestEntry("u3", "/c/u3.wav", 32000)])  # one length differs
    other = Manifest.from_entries([*entries[:3], ManifestEntry("u9", "/c/u9.wav", 16000)])  # one id differs
    base = evaluation_settings(abx=AbxSettings(), item_file=item, entries=four)
    for entries in (longer, other):
        settings = evaluation_settings(abx=AbxSettings(), item_file=item, entries=entries)
        assert settings["test_utterances"]["count"] == 4
        assert settings["test_utterances"] != base["test_utterances"]
        assert [line.split(":")[0] for line in settings_differences([("a", base), ("b", settings)])] == [
            "test_utterances.sha256"]
    # without alignments, no rate is recorded: --alignment-rate 50 alone does not make reports differ
    at_50 = evaluation_settings(abx=AbxSettings(), item_file=item, entries=four, alignment_rate_hz=50)
    assert at_50["alignment_rate_hz"] is None
    assert settings_differences([("a", base), ("b", at_50)]) == []




class _Axes:
    """Records the drawing calls of one matplotlib Axes."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name == "xaxis":  # (its calls recorded with the axes')
            return self

        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "plot":
                return (type("Line", (), {"get_color": lambda self: "C0"})(),)
            return None
        return call


def test_report_plots_draw_each_panel_s_own_baseline_and_pnmi_at_its_layers(tmp_path, monkeypatch):
    """mut R16 (the MFCC line of the across-speaker panel drawn at its within-speaker score), R17 (PNMI drawn at
    positions 1, 2, … instead of the layers scored, e.g. --layers 3,6). Truth: plot_report's docstring (per-layer
    curves, baselines as lines) and each row's own layer and scores."""
    from spidr.eval import report
    from spidr.eval.report import LayerRow, plot_report

    made = []

    def figure(*, figsize, purpose, ncols=1, **kwargs):
        axes = [_Axes() for _ in range(ncols)]
        made.append(axes)
        return _Axes(), (axes if ncols > 1 else axes[0])

    monkeypatch.setattr(report, "figure", figure)
    monkeypatch.setattr(report, "save_figure", lambda fig, path, dpi: None)
    rows = [LayerRow("m", 3, abx_within=10.0, abx_across=20.0, quality={"pnmi": 0.3}),
            LayerRow("m", 6, abx_within=8.0, abx_across=15.0, quality={"pnmi": 0.5}),
            LayerRow("MFCC", None, abx_within=4.0, abx_across=16.0)]
    plot_report(rows, tmp_path)
    (within, across), (pnmi,) = made
    for ax, expected in ((within, 4.0), (across, 16.0)):
        baselines = [args[0] for name, args, kwargs in ax.calls if name == "axhline" and kwargs.get("label") == "MFCC"]
        assert baselines == [expected]
    curves = [args[:2] for name, args, _ in across.calls if name == "plot"]
    assert curves == [([3, 6], [20.0, 15.0])]
    assert [args[:2] for name, args, _ in pnmi.calls if name == "plot"] == [([3, 6], [0.3, 0.5])]


def test_a_comparison_killed_midway_is_written_again_by_its_rerun(tmp_path, capsys):
    """A kill while compare-reports wrote its folder (report.json there, no report.md) made the rerun ask for
    --overwrite. The folder is marked while written, so the same command completes it."""
    from spidr.eval.commands import COMPARE_IN_PROGRESS

    write_report([*_rows("final", 0.0), MFCC], tmp_path / "a", title="a")
    write_report([*_rows("final", 1.0), MFCC], tmp_path / "b", title="b")
    out = tmp_path / "cmp"
    argv = ["compare-reports", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]
    out.mkdir()
    (out / COMPARE_IN_PROGRESS).touch()
    (out / "report.json").write_text("[]")
    assert main(argv) == 0
    assert not (out / COMPARE_IN_PROGRESS).exists()
    assert (out / "report.md").is_file()
    assert {r["model"] for r in json.loads((out / "report.json").read_text())} == {"a", "b", "MFCC"}
    capsys.readouterr()
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_per_layer_plots_tick_whole_layers_only(tmp_path, monkeypatch):
    """A 2-layer model's plots were ticked 1.0, 1.2, ... 2.0 on the layer axis, as if there were layers between."""
    from spidr.eval import report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kwargs: figures.append(fig))
    rows = [report.LayerRow("m", layer, 30.0 - layer, 35.0 - layer, quality={"pnmi": 0.1 * layer})
            for layer in (1, 2)]
    report.plot_report(rows, tmp_path)
    assert len(figures) == 2  # ABX, PNMI
    for fig in figures:
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = ax.get_xticks()
            assert len(ticks) >= 2
            assert all(float(tick).is_integer() for tick in ticks), ticks


def test_evaluate_warns_about_collapsed_codebook_units(caplog):
    """A toy model's codebook units were one codeword everywhere (unit ABX 50 %) with no word, in training (5 % of
    16 codewords is a perplexity no codebook reaches) or in evaluate. Hand count: all 3s → 1 of 16 codewords,
    perplexity 1; two codewords half and half → perplexity 2, not below the threshold of 2; every codeword once
    → 16."""
    import logging

    from spidr.eval.report import _warn_if_collapsed

    with caplog.at_level(logging.WARNING, logger="spidr.eval.report"):
        _warn_if_collapsed({"a": np.full(10, 3), "b": np.full(5, 3)}, 16, "m layer 2")
    assert "m layer 2: its codebook units use 1 of 16 codewords (perplexity 1.00): the head has collapsed" in (
        caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spidr.eval.report"):
        _warn_if_collapsed({"a": np.array([0, 1] * 5)}, 16, "m layer 2")
        _warn_if_collapsed({"a": np.arange(16)}, 16, "m layer 2")
    assert caplog.text == ""


def test_a_report_of_stressed_alignments_is_not_measured_alike_a_default_one(tmp_path):
    """Before 2026-12-07 evaluate kept ARPAbet stress digits (AH0, AH1 two phones); now it removes them by default.
    A report of the old spidr (no alignment_stress in its settings) must differ from a new one that removed digits
    (other PNMI), and match one that kept them (--keep-stress) or whose alignments had none."""
    from spidr.data.manifest import Manifest, ManifestEntry
    from spidr.eval.report import AbxSettings, evaluation_settings, settings_differences
    from spidr.eval.unit_quality import read_alignments

    alignments = tmp_path / "a.tsv"
    alignments.write_text("u-1\t0\t0.2\tSIL\nu-1\t0.2\t0.4\tAH0\nu-1\t0.4\t0.6\tK\nu-1\t0.6\t0.8\tAH1\n")
    assert read_alignments(alignments).stress_removed == ("AH0", "AH1")
    assert read_alignments(alignments, keep_stress=True).stress_removed == ()
    item = tmp_path / "x.item"
    item.write_text("#file onset offset #phone prev-phone next-phone speaker\nu-1 0.2 0.6 AH K AH s\n")
    entries = Manifest.from_entries([ManifestEntry("u-1", str(tmp_path / "u-1.wav"), 16000)])
    common = {"abx": AbxSettings(), "item_file": item, "entries": entries, "alignments_file": alignments}
    removed = evaluation_settings(**common, stress_removed=True)
    kept = evaluation_settings(**common)
    old = dict(kept)  # what the previous spidr wrote: no stress key (it always kept the digits)
    assert settings_differences([("old", old), ("new", removed)])
    assert not settings_differences([("old", old), ("kept", kept)])


def test_a_report_rewritten_and_killed_before_its_settings_leaves_no_settings_of_another_report(tmp_path, monkeypatch):
    """evaluate into a folder that holds the same model's evaluation under other ABX settings (allowed without
    --overwrite: the features are reused) renames the new report.json, then the settings file: a kill in between
    left the new scores under the old settings, which compare-reports takes as the report's condition."""
    from spidr.eval.report import LayerRow, read_report, read_report_settings, write_report

    out = tmp_path / "eval"
    write_report([LayerRow("m", 1, abx_within=10.0)], out, title="t", settings={"abx": {"distance": "cosine"}})
    real_replace = os.replace

    def killed_at_the_settings_rename(src, dst, *args, **kwargs):
        if Path(dst).parent == out and Path(dst).name != "report.json":
            raise KeyboardInterrupt  # (kill -9 here)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", killed_at_the_settings_rename)
    with contextlib.suppress(KeyboardInterrupt):
        write_report([LayerRow("m", 1, abx_within=20.0)], out, title="t", settings={"abx": {"distance": "angular"}})
    monkeypatch.undo()
    rows = read_report(out) if (out / "report.json").is_file() else None
    settings = read_report_settings(out)
    # either the earlier report whole (scores and settings), or no finished report; never new scores, old settings
    assert rows is None or (rows[0].abx_within, settings) in (
        (10.0, {"abx": {"distance": "cosine"}}), (20.0, {"abx": {"distance": "angular"}}), (20.0, None))
    assert rows is not None


def _one_frame_items(rows):
    """(file, frame, phone, speaker) → Items of one 50 Hz frame each, all in one context."""
    columns = defaultdict(list)
    for file, frame, phone, speaker in rows:
        time = f"{(2 * frame + 1) / 100:.2f}"  # the frame's centre
        for name, value in zip(("#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker"),
                               (file, time, time, phone, "x", "y", speaker), strict=True):
            columns[name].append(value)
    return Items.from_columns(columns)


def test_a_report_s_abx_scores_are_percentages():
    # a at (0, 0) and (10, 0), b at (5, 5) and (5, -5): each token is 10 from its own phone's other token and
    # √50 ≈ 7.1 from both of the other phone's, so every ABX triple is an error: 100 %, not 1.0.
    features = {"f": np.asarray([[0.0, 0.0], [10.0, 0.0], [5.0, 5.0], [5.0, -5.0]], dtype=np.float32)}
    items = _one_frame_items([("f", 0, "a", "s"), ("f", 1, "a", "s"), ("f", 2, "b", "s"), ("f", 3, "b", "s")])
    settings = AbxSettings(distance="euclidean")
    assert _abx_percent(features, items, "within", settings, distance="euclidean") == 100.0
    # one speaker: no across-speaker cell to score
    assert _abx_percent(features, items, "across", settings, distance="euclidean") is None


def test_a_differing_setting_is_shown_whole_and_only_a_sha256_by_its_start():
    # mutant: _setting_text cutting every string to 12 characters. Truth: only a SHA-256 (64 hex digits) is shortened
    # to its start; an item file's name is shown as it is.
    from spidr.eval.report import settings_differences

    a = {"item_file": {"name": "dev-clean-triphone.item", "sha256": "a" * 64}, "dtype": "float32"}
    b = {"item_file": {"name": "test-clean-triphone.item", "sha256": "b" * 64}, "dtype": "bfloat16"}
    assert settings_differences([("a", a), ("b", b)]) == [
        "dtype: a float32, b bfloat16",
        "item_file.name: a dev-clean-triphone.item, b test-clean-triphone.item",
        f"item_file.sha256: a {'a' * 12}, b {'b' * 12}"]


@pytest.mark.parametrize(("text", "value"), [("NaN", "nan"), ("Infinity", "inf"), ("250.0", "250")])
def test_compare_reports_refuses_a_score_that_is_not_a_finite_percentage(tmp_path, capsys, text, value):
    """Was a defect (nonfinite34): a NaN ABX in a report.json was shown as '–' (the mark of 'not measured') and written
    back into the merged report.json as a NaN token (not JSON); inf and 250 % went through as scores."""
    from spidr.eval.report import LayerRow, write_report

    rows = [LayerRow("final", 1, abx_within=11.0, abx_across=19.0), LayerRow("final", 2, abx_within=12.0,
                                                                             abx_across=18.0)]
    write_report(rows, tmp_path / "a", title="a")
    write_report(rows, tmp_path / "b", title="b")
    report = tmp_path / "b" / "report.json"
    report.write_text(report.read_text().replace('"abx_across": 18.0', f'"abx_across": {text}'))
    assert main(["compare-reports", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 2
    error = capsys.readouterr().err
    assert str(report) in error
    assert "abx_across" in error
    assert value in error.lower()


def test_read_report_accepts_a_perfect_score_and_unit_figures_above_100(tmp_path):
    """0 % is an error rate (a perfect representation), and unit-quality figures are not percentages (a codebook of
    500 active codewords): both are read back as written."""
    rows = [LayerRow("final", 1, abx_within=0.0, abx_across=100.0, unit_abx_within=0.0,
                     quality={"pnmi": 0.4, "active_codewords": 500})]
    write_report(rows, tmp_path / "a", title="a")
    assert read_report(tmp_path / "a" / "report.json") == rows


@pytest.mark.parametrize(("field", "text"), [("abx_within", "true"), ("pnmi", "NaN"),
                                            ("active_codewords", "-Infinity")])
def test_read_report_refuses_a_boolean_score_and_a_non_finite_unit_figure_naming_them(tmp_path, field, text):
    """A score that is a JSON boolean (true is no error rate, though Python counts it as 1) and a NaN or infinite
    unit-quality figure are refused naming the file, the row and the field."""
    rows = [LayerRow("final", 1, abx_within=11.0, abx_across=19.0, quality={"pnmi": 0.4, "active_codewords": 50})]
    write_report(rows, tmp_path / "a", title="a")
    report = tmp_path / "a" / "report.json"
    old = {"abx_within": '"abx_within": 11.0', "pnmi": '"pnmi": 0.4', "active_codewords": '"active_codewords": 50'}
    assert old[field] in report.read_text()
    report.write_text(report.read_text().replace(old[field], f'"{field}": {text}'))
    with pytest.raises(ValueError, match=rf"{report}: row 0 .*{field} = "):
        read_report(report)
