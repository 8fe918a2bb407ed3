"""Correlation study: statistics against numpy's own formulas, the table reader, the plot, the CLI, and the paper's
32-point correlations recomputed from ``../shared/spec/paper-results``."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from scipy.stats import t as student_t

from conftest import SHARED
from spidr import cli
from spidr.lm.correlate import correlate, plot_scatter, read_table

PAPER_RESULTS = SHARED / "spec" / "paper-results"
requires_paper_results = pytest.mark.skipif(not (PAPER_RESULTS / "spoken-lm.csv").is_file(),
                                             reason=f"{PAPER_RESULTS} is absent (no ../shared)")


def test_pearson_spearman_and_line_match_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=25)
    y = 0.7 * x + rng.normal(scale=0.5, size=25)
    result = correlate(x, y)
    r = np.corrcoef(x, y)[0, 1]
    assert result["n"] == 25
    assert result["pearson_r"] == pytest.approx(r, rel=1e-12)
    # p of r under H0: t = r √((n − 2) / (1 − r²)) with n − 2 degrees of freedom, two-sided.
    t = r * math.sqrt(23 / (1 - r * r))
    assert result["pearson_p"] == pytest.approx(2 * student_t.sf(abs(t), 23), rel=1e-6)
    ranks_x, ranks_y = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))  # no ties in continuous data
    assert result["spearman_rho"] == pytest.approx(np.corrcoef(ranks_x, ranks_y)[0, 1], rel=1e-12)
    slope, intercept = np.polyfit(x, y, 1)
    assert result["slope"] == pytest.approx(slope, rel=1e-9)
    assert result["intercept"] == pytest.approx(intercept, rel=1e-9, abs=1e-12)
    low, high = result["pearson_r_ci95"]
    assert -1 <= low < r < high <= 1
    assert correlate(x, y)["pearson_r_ci95"] == [low, high]  # seeded
    assert correlate(x, y, seed=1)["pearson_r_ci95"] != [low, high]


def test_hand_made_perfect_and_monotone_cases() -> None:
    result = correlate([1, 2, 3, 4], [10, 8, 6, 4])
    assert result["pearson_r"] == pytest.approx(-1.0)
    assert result["spearman_rho"] == pytest.approx(-1.0)
    assert (result["slope"], result["intercept"]) == (pytest.approx(-2.0), pytest.approx(12.0))
    # Monotone but not linear: ρ = 1 while r < 1.
    cubic = correlate([1, 2, 3, 4, 5], [1, 8, 27, 64, 125])
    assert cubic["spearman_rho"] == pytest.approx(1.0)
    assert cubic["pearson_r"] == pytest.approx(np.corrcoef([1, 2, 3, 4, 5], [1, 8, 27, 64, 125])[0, 1])
    assert cubic["pearson_r"] < 0.99


def test_spearman_p_is_exact_for_few_points() -> None:
    """Counted by hand: of the n! pairings, 2 reach |ρ| = 1, so a perfect ρ has p = 2 / n! (two-sided)."""
    assert correlate([1, 2, 3], [5, 6, 9])["spearman_p"] == pytest.approx(2 / 6)
    assert correlate([1, 2, 3, 4], [10, 8, 6, 4])["spearman_p"] == pytest.approx(2 / 24)
    # ρ = 0.8 on 4 points: |ρ| >= 0.8 for 2 × (1 + 3) = 8 of the 24 pairings (ρ = ±1 and the three ρ = ±0.8).
    assert correlate([1, 2, 3, 4], [1, 3, 2, 4])["spearman_rho"] == pytest.approx(0.8)
    assert correlate([1, 2, 3, 4], [1, 3, 2, 4])["spearman_p"] == pytest.approx(8 / 24)


def test_correlate_refuses_degenerate_input() -> None:
    with pytest.raises(ValueError, match="at least 3 points, got 2"):
        correlate([1, 2], [3, 4])
    with pytest.raises(ValueError, match="same length"):
        correlate([1, 2, 3], [3, 4])
    with pytest.raises(ValueError, match="x is constant"):
        correlate([1, 1, 1], [3, 4, 5])
    with pytest.raises(ValueError, match="finite"):
        correlate([1, 2, math.nan], [3, 4, 5])


def write_table(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_table_keeps_labels_and_drops_bad_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_table(tmp_path / "t.csv", ["model", "layer", "abx", "pnmi", "note"], [
        ["spidr", 1, 5.0, 0.5, "x"], ["spidr", 2, "", 0.6, ""], ["hubert", 3, 4.0, "n/a", ""],
        ["hubert", 4, 3.0, 0.7, ""], ["hubert", 5, 2.0, 0.8, ""], ["wavlm", 6, 1.0, "", ""]])
    with caplog.at_level(logging.WARNING):
        rows = read_table(path, ["abx", "pnmi"])
    assert rows[0] == {"model": "spidr", "layer": 1.0, "abx": 5.0, "pnmi": 0.5, "note": "x"}
    assert [row["layer"] for row in rows] == [1.0, 4.0, 5.0]
    assert "dropped 3 row(s)" in caplog.text
    assert "line 3 (abx); line 4 (pnmi); line 7 (pnmi)" in caplog.text
    assert len(read_table(path, ["abx"])) == 5  # only the chosen columns matter
    with pytest.raises(ValueError, match=r"no column 'swuggy'; the columns are model, layer, abx, pnmi, note"):
        read_table(path, ["abx", "swuggy"])
    typo = write_table(tmp_path / "typo.csv", ["model", "layer", "abx", "pnmi"],
                       [["a", 1, 1.0, 0.1], ["a", 2, "6O.5", 0.2], ["a", 3, 3.0, 0.3], ["a", 4, 4.0, 0.4]])
    with pytest.raises(ValueError, match=r"typo\.csv, line 3: abx = '6O\.5' is not a finite number"):
        read_table(typo, ["abx", "pnmi"])
    twice = write_table(tmp_path / "twice.csv", ["model", "layer", "abx", "pnmi"],
                        [["a", 1, 1.0, 0.1], ["a", 2, 2.0, 0.2], ["b", 2, 3.0, 0.3], ["a", 1, 1.0, 0.1]])
    with pytest.raises(ValueError, match=r"lines 2 and 5: two rows for model 'a', layer '1'"):
        read_table(twice, ["abx", "pnmi"])
    # the paper's points: codebook and k-means units of one layer, and a k-means vocabulary sweep, are distinct
    sweep = write_table(tmp_path / "sweep.csv", ["model", "units", "layer", "num_units", "abx", "swuggy"],
                        [["spidr", "codebook", 6, 256, 6.1, 70.0], ["spidr", "kmeans", 6, 256, 6.5, 69.0],
                         ["spidr", "kmeans", 6, 500, 6.0, 71.0], ["spidr", "kmeans", 6, 1000, 5.8, 71.5],
                         ["dinosr", "codebook", 6, 256, 7.0, 67.0]])
    assert len(read_table(sweep, ["abx", "swuggy"])) == 5
    with pytest.raises(ValueError, match=r"lines 3 and 4: two rows for model 'spidr', units 'kmeans', layer '6', "
                                         r"num_units '256'"):
        read_table(write_table(tmp_path / "sweep2.csv", ["model", "units", "layer", "num_units", "abx", "swuggy"],
                               [["spidr", "codebook", 6, 256, 6.1, 70.0], ["spidr", "kmeans", 6, 256, 6.5, 69.0],
                                ["spidr", "kmeans", 6, 256, 6.0, 71.0]]), ["abx", "swuggy"])
    # the spec's (model, units, layer, K) rows: "K" in capitals is a label column too (it was not, and a K sweep
    # was refused as repeated points)
    capital = write_table(tmp_path / "capital.csv", ["model", "units", "Layer", "K", "abx", "swuggy"],
                          [["spidr", "kmeans", 6, k, 6.0 + k / 1000, 70.0 - k / 1000] for k in (50, 100, 256, 500)])
    assert len(read_table(capital, ["abx", "swuggy"])) == 4
    lr = write_table(tmp_path / "lr.csv", ["model", "lr", "abx", "swuggy", "pnmi"],
                     [["spidr", lr, 6.0 + lr, 70.0 - lr, 0.5] for lr in (1, 2, 3)])
    with pytest.raises(ValueError, match=r"lines 2 and 3: two rows for model 'spidr'; each point must appear once "
                                         r"\(add a column that tells them apart, or name a numeric one that does "
                                         r"with --label-columns: lr, pnmi\)"):
        read_table(lr, ["abx", "swuggy"])
    assert len(read_table(lr, ["abx", "swuggy"], label_columns=["lr"])) == 3
    with pytest.raises(ValueError, match="no column 'dropout'"):
        read_table(lr, ["abx", "swuggy"], label_columns=["dropout"])
    small = write_table(tmp_path / "small.csv", ["abx", "pnmi"], [[1, 2], [2, ""], [3, 4]])
    with pytest.raises(ValueError, match="2 usable row"):
        read_table(small, ["abx", "pnmi"])


def test_plot_leaves_the_backend_alone(tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    rows = [{"model": model, "layer": float(layer), "abx": float(layer), "lm": 60.0 - layer + (layer % 2)}
            for model in ("a", "b") for layer in range(1, 6)]
    path = plot_scatter(rows, "abx", "lm", tmp_path / "plots" / "lm_vs_abx.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend
    plot_scatter([{"abx": 1.0, "lm": 2.0}, {"abx": 2.0, "lm": 1.0}, {"abx": 3.0, "lm": 3.5}], "abx", "lm",
                 tmp_path / "plain.png")  # no model or layer column
    assert (tmp_path / "plain.png").is_file()


def test_cli_single_and_several_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      caplog: pytest.LogCaptureFixture) -> None:
    path = write_table(tmp_path / "runs.csv", ["model", "layer", "abx", "pnmi", "lm", "slm"],
                       [["m", layer, 10 - layer, 0.1 * layer, 50 + 2 * layer + (layer % 3), 50 + (layer % 4)]
                        for layer in range(1, 9)])
    assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert isinstance(single, dict)
    assert {"n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p", "slope", "intercept"} <= single.keys()
    assert single["n"] == 8
    assert single["pearson_r"] < -0.9
    assert not list(tmp_path.glob("*.png"))  # --json alone writes no plot
    assert cli.main(["lm-correlate", str(path), "--x", "abx,pnmi", "--y", "lm,slm", "--json",
                     "--out", str(tmp_path / "out" / "corr.csv")]) == 0
    several = json.loads(capsys.readouterr().out)
    with (tmp_path / "out" / "corr.csv").open(newline="") as handle:  # --out: the same results, one row per pair
        written = list(csv.DictReader(handle))
    assert len(written) == len(several) == 4
    for row, result in zip(written, several, strict=True):
        assert (row["x"], row["y"], int(row["n"])) == (result["x"], result["y"], result["n"])
        for name in ("pearson_r", "pearson_p", "spearman_rho", "spearman_p", "slope", "intercept"):
            assert float(row[name]) == result[name]  # full precision
        assert [float(row["spearman_rho_ci95_low"]), float(row["spearman_rho_ci95_high"])] == result[
            "spearman_rho_ci95"]
        assert [float(row["pearson_r_ci95_low"]), float(row["pearson_r_ci95_high"])] == result["pearson_r_ci95"]
    assert [(entry["x"], entry["y"]) for entry in several] == [("abx", "lm"), ("pnmi", "lm"), ("abx", "slm"),
                                                               ("pnmi", "slm")]
    assert several[0]["pearson_r"] == single["pearson_r"]
    # Without --json: a table, and a plot next to the table.
    assert cli.main(["lm-correlate", str(path), "--x", "pnmi", "--y", "lm"]) == 0
    out = capsys.readouterr().out
    assert "pearson r" in out
    assert "ρ 95% CI" in out
    low, high = correlate(list(range(9, 1, -1)), [0.1 * layer for layer in range(1, 9)])["spearman_rho_ci95"]
    assert low == high == -1.0  # abx and pnmi of this table are exactly opposed: every resample ranks them so
    assert (tmp_path / "runs_lm_vs_pnmi.png").is_file()
    assert cli.main(["lm-correlate", str(path), "--x", "abx,pnmi", "--y", "lm", "--plot",
                     str(tmp_path / "p" / "corr.png")]) == 0
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"corr_lm_vs_abx.png", "corr_lm_vs_pnmi.png"}
    capsys.readouterr()
    assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "missing"]) == 2
    assert "spidr lm-correlate: error:" in capsys.readouterr().err
    # Without --x / --y: lm-study's points.csv columns, every (quality, accuracy) pair
    study_columns = ["abx_across", "unit_abx_across", "pnmi", "swuggy_all", "swuggy_invocab", "sblimp", "tsc"]
    path = write_table(tmp_path / "points.csv", ["name", "layer", *study_columns],
                       [[f"m L{layer}", layer, *(v + (layer * (i + 1)) % 11 for i, v in enumerate([20, 30, 0.2, 60,
                                                                                                  62, 55, 51]))]
                        for layer in range(1, 7)])
    assert cli.main(["lm-correlate", str(path), "--json"]) == 0
    defaults = json.loads(capsys.readouterr().out)
    assert [(entry["x"], entry["y"]) for entry in defaults] == [
        (x, y) for y in study_columns[3:] for x in study_columns[:3]]
    # an older points.csv (no continuous ABX) and a column left empty: the defaults it cannot give are left out, with
    # a warning naming them; named with --x, such a column is an error
    older = write_table(tmp_path / "older.csv", ["name", "layer", *study_columns[1:]],
                        [[f"m L{layer}", layer, 30 - layer, 0.1 * layer, 60 + layer * layer, 61 + layer, 55 - layer,
                          ""] for layer in range(1, 6)])
    with caplog.at_level(logging.WARNING, logger="spidr"):
        assert cli.main(["lm-correlate", str(older), "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert [(entry["x"], entry["y"]) for entry in kept] == [
        (x, y) for y in ("swuggy_all", "swuggy_invocab", "sblimp") for x in ("unit_abx_across", "pnmi")]
    assert "left out 6 of 12 default pair(s)" in caplog.text
    assert "swuggy_all vs abx_across" in caplog.text
    assert "tsc vs pnmi" in caplog.text
    assert cli.main(["lm-correlate", str(older), "--x", "abx_across", "--json"]) == 2
    assert "no column 'abx_across'" in capsys.readouterr().err


def test_the_cli_table_gives_rho_its_own_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A monotone curve: ρ is 1 in every resample, r is not; the table's two intervals must show it."""
    path = write_table(tmp_path / "curve.csv", ["layer", "abx", "lm"],
                       [[layer, float(layer), math.exp(layer)] for layer in range(1, 9)])
    assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm", "--plot", str(tmp_path / "c.png")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lm "))
    r_interval, rho_interval = line.split("[")[1:]
    assert rho_interval.strip() == "+1.000, +1.000]"
    assert float(r_interval.split(",")[1].strip(" ]")) < 1.0


def paper_points() -> list[dict[str, object]]:
    """The paper's 32 (model, layer) points at 6,000 h and V = 256, with discrete ABX averaged over its four rows
    (dev-clean/dev-other × within/across) and PNMI."""
    wanted = [("spidr_codebooks", layer) for layer in range(5, 13)]
    wanted += [(model, layer) for model in ("spidr_kmeans", "hubert_kmeans") for layer in range(1, 13)]
    with (PAPER_RESULTS / "spoken-lm.csv").open() as handle:
        lm = {(row["model"], int(row["layer"]), row["metric"]): float(row["score"]) for row in csv.DictReader(handle)
              if row["hours"] == "6000" and row["num_units"] == "256"}
    abx = defaultdict(list)
    with (PAPER_RESULTS / "abx-discrete.csv").open() as handle:
        for row in csv.DictReader(handle):
            abx[row["model"], int(row["layer"])].append((row["dataset"], row["speaker"], float(row["score"])))
    with (PAPER_RESULTS / "units-quality.csv").open() as handle:
        pnmi = {(row["model"], int(row["layer"])): float(row["score"]) for row in csv.DictReader(handle)
                if row["metric"] == "pnmi"}
    points = []
    for model, layer in wanted:
        conditions = abx[model, layer]
        assert sorted((dataset, speaker) for dataset, speaker, _ in conditions) == [
            ("dev-clean", "across"), ("dev-clean", "within"), ("dev-other", "across"), ("dev-other", "within")]
        points.append({"model": model, "layer": layer,
                       "abx_discrete": float(np.mean([score for _, _, score in conditions])),
                       "pnmi": pnmi[model, layer], "swuggy_all": lm[model, layer, "swuggy_all"]})
    return points


@requires_paper_results
def test_paper_correlations_from_the_result_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    points = paper_points()
    path = write_table(tmp_path / "paper.csv", list(points[0]), [list(point.values()) for point in points])
    assert cli.main(["lm-correlate", str(path), "--x", "abx_discrete", "--y", "swuggy_all", "--json"]) == 0
    abx = json.loads(capsys.readouterr().out)
    assert abx["n"] == 32
    assert abx["pearson_r"] == pytest.approx(-0.85, abs=0.005)  # measured −0.8487
    assert abx["pearson_p"] < 1e-6
    assert abx["spearman_rho"] == pytest.approx(-0.90, abs=0.005)
    assert cli.main(["lm-correlate", str(path), "--x", "pnmi", "--y", "swuggy_all", "--json"]) == 0
    pnmi = json.loads(capsys.readouterr().out)
    assert pnmi["n"] == 32
    assert pnmi["pearson_r"] == pytest.approx(0.845, abs=0.005)  # measured +0.8454
    assert pnmi["spearman_rho"] == pytest.approx(0.91, abs=0.005)
    low, high = pnmi["pearson_r_ci95"]
    assert 0 < low < pnmi["pearson_r"] < high < 1


def test_too_few_points_get_no_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With 3 points a resample holds 2 distinct points (r = ±1) or all 3 (r itself): r = −0.68 got the "interval"
    [−1.00, −0.68], which read as a confident negative correlation. Below 5 points no interval is given: NaN in
    Python, null in JSON, an empty CSV cell, "–" in the table; from 5 points on, an interval as before."""
    x3, y3 = [1.0, 2.0, 3.0], [3.0, 1.0, 2.5]
    assert all(math.isnan(bound) for bound in [*correlate(x3, y3)["pearson_r_ci95"],
                                               *correlate(x3, y3)["spearman_rho_ci95"]])
    assert all(math.isnan(bound) for bound in correlate([1, 2, 3, 4], [3, 1, 2.5, 5])["pearson_r_ci95"])
    low, high = correlate([1, 2, 3, 4, 5], [3, 1, 2.5, 5, 4])["pearson_r_ci95"]
    assert -1.0 <= low < high <= 1.0
    path = write_table(tmp_path / "few.csv", ["layer", "abx", "lm"],
                       [[i, x, y] for i, (x, y) in enumerate(zip(x3, y3, strict=True))])
    assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm", "--json", "--out",
                     str(tmp_path / "few_corr.csv")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pearson_r_ci95"] == result["spearman_rho_ci95"] == [None, None]
    with (tmp_path / "few_corr.csv").open(newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert row["pearson_r_ci95_low"] == row["spearman_rho_ci95_high"] == ""
    assert float(row["pearson_r"]) == pytest.approx(np.corrcoef(x3, y3)[0, 1])
    assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm", "--plot", str(tmp_path / "f.png")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lm "))
    assert "[" not in line
    assert line.split()[-2:] == ["–", "–"]


def test_the_bootstrap_interval_of_rho_ranks_each_resample_as_spearmanr_does():
    """ρ's interval (spoken-lm.md §5 item 6: each coefficient with a bootstrap CI) from the very resamples of r's,
    each scored by scipy's spearmanr (ties at their average rank: a resample repeats points, and this y has ties of
    its own); a monotone but curved relation keeps ρ = 1 in every resample while r's interval stays below 1."""
    from scipy.stats import spearmanr

    x = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0])
    y = np.array([50, 52, 51, 55, 55, 58, 57, 60, 61, 61, 64, 63], dtype=float)
    result = correlate(x, y, num_resamples=300, seed=3)
    index = np.random.default_rng(3).integers(0, x.size, size=(300, x.size))
    rhos = np.array([spearmanr(x[i], y[i]).statistic for i in index])
    rhos = rhos[np.isfinite(rhos)]
    assert result["spearman_rho_ci95"] == pytest.approx(list(np.percentile(rhos, [2.5, 97.5])), abs=1e-12)
    assert result["spearman_rho_ci95"][0] < result["spearman_rho"] < result["spearman_rho_ci95"][1]

    curved = correlate(x, np.exp(x))
    assert curved["spearman_rho_ci95"] == [1.0, 1.0]
    assert curved["pearson_r_ci95"][1] < 1.0


def test_the_bootstrap_interval_of_rho_is_a_95_percent_one():
    """On many normal points ρ's interval agrees with Fieller's: tanh(atanh ρ ± 1.96 √(1.06 / (n − 3)))."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(400)
    y = 0.6 * x + 0.8 * rng.standard_normal(400)
    result = correlate(x, y)
    low, high = result["spearman_rho_ci95"]
    z, half = np.arctanh(result["spearman_rho"]), 1.96 * np.sqrt(1.06 / (400 - 3))
    assert (high - low) / (np.tanh(z + half) - np.tanh(z - half)) == pytest.approx(1.0, abs=0.1)


def test_the_bootstrap_interval_of_r_is_a_95_percent_one():
    """On many normal points the percentile bootstrap of r agrees with the Fisher-z 95 % interval,
    tanh(atanh r ± 1.96 / √(n − 3)): a 90 % interval would be 16 % narrower."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(400)
    y = 0.6 * x + 0.8 * rng.standard_normal(400)
    result = correlate(x, y)
    low, high = result["pearson_r_ci95"]
    z, half = np.arctanh(result["pearson_r"]), 1.96 / np.sqrt(400 - 3)
    assert (high - low) / (np.tanh(z + half) - np.tanh(z - half)) == pytest.approx(1.0, abs=0.08)
    assert low == pytest.approx(np.tanh(z - half), abs=0.01)
    assert high == pytest.approx(np.tanh(z + half), abs=0.01)


def test_a_table_that_is_not_utf8_is_named_by_line(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    path.write_bytes("model,pnmi\nA,0.1\nB\xe9,0.2\nC,0.3\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"runs\.csv:3: not UTF-8 text .*save the table as UTF-8"):
        read_table(path, ["pnmi"])


def test_outputs_never_replace_the_input_table_nor_a_named_file_without_overwrite(tmp_path, capsys):
    """--out points.csv replaced lm-study's table with the correlation CSV, and --plot points.csv made it a PNG;
    an existing file named by --out or --plot was replaced without a word."""
    path = write_table(tmp_path / "points.csv", ["layer", "abx", "lm"],
                       [[i, x, y] for i, (x, y) in enumerate([(1.0, 3.0), (2.0, 1.0), (3.0, 2.5), (4.0, 5.0)])])
    table = path.read_bytes()
    for option in ("--out", "--plot"):
        assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm", option, str(path)]) == 2
        assert "is the input table" in capsys.readouterr().err
        assert path.read_bytes() == table
    earlier = tmp_path / "corr.csv"
    earlier.write_text("mine\n")
    assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm", "--out", str(earlier)]) == 2
    assert "corr.csv already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert earlier.read_text() == "mine\n"
    assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm", "--out", str(earlier), "--overwrite"]) == 0
    assert earlier.read_text().startswith("x,y,n,")
    # the default plots beside the table are this command's own: a rerun makes them again
    assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm"]) == 0
    assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm"]) == 0


def test_rows_dropped_for_several_pairs_are_told_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """lm-study's points.csv holds baseline rows (oracle, untrained, bigram) without unit quality: the same rows
    were warned about once per (x, y) pair, 12 times with the default columns."""
    path = write_table(tmp_path / "points.csv", ["model", "layer", "abx", "pnmi", "lm", "slm"], [
        ["oracle", "", "", "", 90.0, 80.0], ["bigram", "", "", "", 50.0, 51.0],
        *[["spidr", layer, 10.0 + layer, 0.1 * layer, 60.0 - layer, 55.0 + layer] for layer in range(1, 5)]])
    with caplog.at_level(logging.WARNING):
        assert cli.main(["lm-correlate", str(path), "--x", "abx,pnmi", "--y", "lm,slm", "--json",
                         "--out", str(tmp_path / "c.csv")]) == 0
    warnings = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert warnings == [f"{path}: dropped 2 row(s) with an empty or non-numeric value: line 2 (abx, pnmi); "
                        "line 3 (abx, pnmi)"]



def test_a_named_pair_with_too_few_rows_says_which_were_dropped(tmp_path: Path, caplog, capsys) -> None:
    path = write_table(tmp_path / "t.csv", ["model", "layer", "abx", "lm"], [
        ["a", 1, 1.0, 50.0], ["a", 2, 2.0, 52.0], ["a", 3, "", 53.0], ["a", 4, "", 55.0]])
    with caplog.at_level(logging.WARNING):
        assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm", "--json"]) == 2
    assert "2 usable row(s)" in capsys.readouterr().err
    assert "dropped 2 row(s) with an empty or non-numeric value: line 4 (abx); line 5 (abx)" in caplog.text


def test_spearman_p_of_eight_points_is_the_exact_permutation_p():
    """mut co-exact-lt. Truth: brute force over all 8! pairings of the ranks (EXACT_SPEARMAN_MAX_POINTS = 8 is
    documented as exact): p = share of pairings with |rho| >= the observed |rho|."""
    from scipy.stats import rankdata

    from spidr.lm.correlate import EXACT_SPEARMAN_MAX_POINTS, correlate

    assert EXACT_SPEARMAN_MAX_POINTS == 8
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 6.0, 8.0, 5.0, 7.0])
    rx, ry = rankdata(x), rankdata(y)
    rho = np.corrcoef(rx, ry)[0, 1]
    hits = sum(abs(np.corrcoef(rx, ry[list(p)])[0, 1]) >= abs(rho) - 1e-12
               for p in itertools.permutations(range(8)))
    assert correlate(x, y)["spearman_p"] == pytest.approx(hits / math.factorial(8), abs=1e-12)


def test_a_point_repeated_with_an_empty_cell_elsewhere_is_still_refused(tmp_path):
    """mut co-dup-text-missing. Truth: read_table's docstring: 'Two rows with the same labels ... are an error: the
    point would count twice'. An empty cell in a column that is no label (PNMI, not measured yet when the row was
    first written) does not make (model a, layer 1) another point."""
    path = write_table(tmp_path / "t.csv", ["model", "layer", "abx", "lm", "pnmi"], [
        ["a", 1, 1.0, 50.0, 0.5], ["a", 2, 2.0, 52.0, 0.6], ["a", 3, 3.0, 53.0, 0.7], ["a", 1, 1.0, 50.0, ""]])
    with pytest.raises(ValueError, match=r"lines 2 and 5: two rows for model 'a', layer '1'"):
        read_table(path, ["abx", "lm"])




def test_exact_spearman_p_with_ties_is_the_share_of_value_permutations_reaching_rho():
    """muts co-exact-perm-x, co-exact-ordinal. Truth: brute force with scipy's own spearmanr over all 6! orders of
    y's values (ties at their average rank, as the docstring says ρ is computed): p = share with |ρ| >= |ρ_obs|.
    Here p = 0.1; ordinal ranks, or permuting x's tie-free ranks instead of y's, give 0.058."""
    from scipy.stats import spearmanr

    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y = np.array([1.0, 1.0, 2.0, 4.0, 3.0, 3.0])  # two ties in y
    rho = spearmanr(x, y).statistic
    orders = list(itertools.permutations(range(6)))
    hits = sum(abs(spearmanr(x, y[list(order)]).statistic) >= abs(rho) - 1e-12 for order in orders)
    result = correlate(x, y)
    assert result["spearman_rho"] == pytest.approx(rho)
    assert result["spearman_p"] == pytest.approx(hits / len(orders), abs=1e-12)


def test_a_non_finite_y_is_refused_like_a_non_finite_x():
    """mut co-finite-x-only. Truth: correlate's check 'x and y must be finite numbers'."""
    with pytest.raises(ValueError, match="finite"):
        correlate([1.0, 2.0, 3.0, 4.0], [3.0, math.nan, 5.0, 6.0])
    with pytest.raises(ValueError, match="finite"):
        correlate([1.0, 2.0, 3.0, 4.0], [3.0, math.inf, 5.0, 6.0])


def test_missing_cells_written_by_r_and_pandas_are_dropped_whatever_their_case(tmp_path, caplog):
    """mut co-missing-case. Truth: read_table's docstring and MISSING's comment: "nan", "n/a", "na", "none", ...
    ("pandas, R and spreadsheets write these"); R's write.csv writes NA, numpy/pandas NaN, spreadsheets N/A."""
    path = write_table(tmp_path / "t.csv", ["model", "layer", "abx", "lm"], [
        ["m", 1, 1.0, 50.0], ["m", 2, "NA", 52.0], ["m", 3, 3.0, "NaN"], ["m", 4, "N/A", 55.0],
        ["m", 5, 5.0, "None"], ["m", 6, 6.0, 58.0], ["m", 7, 7.0, 59.0]])
    rows = read_table(path, ["abx", "lm"])
    assert [row["layer"] for row in rows] == [1.0, 6.0, 7.0]
    assert "dropped 4 row(s)" in caplog.text


def test_an_infinite_cell_is_an_error_naming_its_line(tmp_path):
    """mut co-number-inf. Truth: read_table's docstring: any other value that is not a finite number (a typo such
    as "6O.5", "inf") is an error naming its line."""
    path = write_table(tmp_path / "inf.csv", ["model", "layer", "abx", "lm"],
                       [["m", 1, 1.0, 50.0], ["m", 2, "inf", 52.0], ["m", 3, 3.0, 53.0], ["m", 4, 4.0, 55.0]])
    with pytest.raises(ValueError, match=r"inf\.csv, line 3: abx = 'inf' is not a finite number"):
        read_table(path, ["abx", "lm"])


def test_lm_correlate_seed_sets_the_bootstrap_intervals(tmp_path, capsys):
    """mut ec-seed-dropped (eval_commands._correlated_pairs). Truth: --help: '--seed: seed of the bootstrap CIs of r
    and ρ', i.e. the intervals correlate(..., seed=S) gives."""
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    y = [2.0, 1.0, 4.0, 3.0, 7.0, 5.0, 6.0]
    path = write_table(tmp_path / "t.csv", ["layer", "abx", "lm"],
                       [[i, a, b] for i, (a, b) in enumerate(zip(x, y, strict=True))])
    assert correlate(x, y, seed=5)["pearson_r_ci95"] != correlate(x, y, seed=0)["pearson_r_ci95"]
    assert cli.main(["lm-correlate", str(path), "--x", "abx", "--y", "lm", "--json", "--seed", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pearson_r_ci95"] == correlate(x, y, seed=5)["pearson_r_ci95"]
    assert result["spearman_rho_ci95"] == correlate(x, y, seed=5)["spearman_rho_ci95"]


def test_a_label_column_can_itself_be_correlated(tmp_path):
    """Truth: each row below is a distinct (model, hours) point (LABEL_COLUMNS: 'hours' tells points apart); the
    paper's question 'does LM accuracy grow with pretraining hours' is lm-correlate --x hours --y swuggy_all."""
    path = write_table(tmp_path / "curve.csv", ["model", "hours", "swuggy_all"], [
        ["spidr", 100, 60.1], ["spidr", 1000, 64.0], ["spidr", 6000, 70.2],
        ["hubert", 100, 58.0], ["hubert", 1000, 61.5], ["hubert", 6000, 66.0]])
    rows = read_table(path, ["hours", "swuggy_all"])
    assert [(row["model"], row["hours"]) for row in rows] == [
        ("spidr", 100.0), ("spidr", 1000.0), ("spidr", 6000.0), ("hubert", 100.0), ("hubert", 1000.0),
        ("hubert", 6000.0)]
    twice = write_table(tmp_path / "twice.csv", ["model", "hours", "swuggy_all"],
                        [["spidr", 100, 60.1], ["spidr", 100, 61.0], ["spidr", 6000, 70.2], ["hubert", 100, 58.0]])
    with pytest.raises(ValueError, match=r"lines 2 and 3: two rows for model 'spidr', hours '100'"):
        read_table(twice, ["hours", "swuggy_all"])


def test_a_run_killed_among_its_plots_is_completed_by_its_rerun(tmp_path, capsys, monkeypatch):
    """Several pairs write several plots, then --out: a kill after the first plot made the rerun refuse that plot
    ("already exists; pass --overwrite"). A marker beside --out stands while they are written."""
    from spidr.lm import correlate

    path = write_table(tmp_path / "t.csv", ["model", "abx", "pnmi", "lm"],
                       [["a", 1.0, 0.1, 50.0], ["b", 2.0, 0.3, 52.0], ["c", 3.0, 0.2, 53.0], ["d", 4.0, 0.5, 55.0]])
    argv = ["lm-correlate", str(path), "--x", "abx,pnmi", "--y", "lm", "--plot", str(tmp_path / "p.png"),
            "--out", str(tmp_path / "c.csv")]
    real, plotted = correlate.plot_scatter, []

    def killed_after_the_first(*args, **kwargs):
        if plotted:
            raise KeyboardInterrupt
        plotted.append(real(*args, **kwargs))
        return plotted[-1]

    monkeypatch.setattr(correlate, "plot_scatter", killed_after_the_first)
    assert cli.main(argv) == 130  # (interrupted)
    monkeypatch.undo()
    assert plotted[0].is_file()
    assert not (tmp_path / "c.csv").exists()
    assert cli.main(argv) == 0
    assert (tmp_path / "c.csv").is_file()
    assert not list(tmp_path.glob(".*in-progress"))
    capsys.readouterr()
    assert cli.main(argv) == 2  # finished: not replaced without --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_a_killed_run_s_marker_lets_only_its_own_outputs_be_written_again(tmp_path, capsys, monkeypatch):
    """The marker a killed lm-correlate run leaves stands for its own --out: another run's finished table in the
    same folder is still not replaced without --overwrite."""
    from spidr.lm import correlate

    table = tmp_path / "t.csv"
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows([["model", "abx", "lm"], ["a", 1.0, 50.0], ["b", 2.0, 52.0], ["c", 3.0, 53.0],
                                      ["d", 4.0, 55.0]])
    finished = tmp_path / "finished.csv"
    assert cli.main(["lm-correlate", str(table), "--x", "abx", "--y", "lm", "--out", str(finished)]) == 0
    before = finished.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(correlate, "correlations_csv", killed)
    other = ["lm-correlate", str(table), "--x", "abx", "--y", "lm", "--out", str(tmp_path / "other.csv")]
    assert cli.main(other) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(["lm-correlate", str(table), "--x", "abx", "--y", "lm", "--out", str(finished)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert finished.read_bytes() == before
    assert cli.main(other) == 0  # (the killed run's own output: written again)


def test_a_constant_column_is_named_with_its_table(tmp_path, capsys):
    """Was a defect (nonfinite34): 'spidr lm-correlate: error: y is constant (50): its correlation is undefined' named
    neither the column nor the table (with --y swuggy_all,sblimp the reader cannot tell which)."""
    table = tmp_path / "t.csv"
    table.write_text("model,layer,pnmi,swuggy_all,sblimp\n" +
                     "".join(f"m,{i},{0.1 * i},{60 + i * i},50\n" for i in range(1, 6)))
    assert cli.main(["lm-correlate", str(table), "--x", "pnmi", "--y", "swuggy_all,sblimp", "--json"]) == 2
    error = capsys.readouterr().err
    assert "sblimp" in error
    assert str(table) in error


def test_correlation_intervals_stay_within_minus_one_and_one(tmp_path, capsys):
    """Was a defect (nonfinite34): the bootstrap interval of r was [-0.414, 1.0000000000000002]."""
    table = tmp_path / "t.csv"
    table.write_text("model,layer,pnmi,swuggy_all\nm,1,0.1,60\nm,2,0.2,62\nm,3,0.3,65\nm,4,0.4,61\nm,5,0.5,70\n")
    assert cli.main(["lm-correlate", str(table), "--x", "pnmi", "--y", "swuggy_all", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("pearson_r_ci95", "spearman_rho_ci95"):
        assert all(-1.0 <= bound <= 1.0 for bound in result[key]), result[key]
