"""``spidr plot-training`` with several runs: one figure compares them, lines labelled by run, values as logged."""

from __future__ import annotations

import json

import pytest

from spidr.cli import main
from spidr.train.plot import figure_lines, series_by_group


def _records(offset: float) -> list[dict]:
    return [{"step": s, "group": "train", "loss": 5.0 - s + offset, "target_ppl": 10.0 + offset,
             "pred_ppl": 9.0, "active_codewords": [3 + s, 4]} for s in (1, 2, 3)]


def _write_run(path, records):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_two_runs_share_each_figure_with_their_own_values() -> None:
    figures = figure_lines({"spidr": series_by_group(_records(0.0)), "dinosr": series_by_group(_records(1.0))})
    _, loss = figures["loss"]
    assert [(label, steps, values) for label, steps, values in loss] == [
        ("spidr train", [1, 2, 3], [4.0, 3.0, 2.0]), ("dinosr train", [1, 2, 3], [5.0, 4.0, 3.0])]
    _, perplexity = figures["perplexity"]
    assert [label for label, _, _ in perplexity] == ["spidr train target", "spidr train prediction",
                                                     "dinosr train target", "dinosr train prediction"]
    title, active = figures["active_codewords_train"]
    assert title == "active codewords per codebook (train)"
    assert [(label, values) for label, _, values in active] == [
        ("spidr codebook 0", [4, 5, 6]), ("spidr codebook 1", [4, 4, 4]),
        ("dinosr codebook 0", [4, 5, 6]), ("dinosr codebook 1", [4, 4, 4])]


def test_one_run_keeps_unprefixed_labels() -> None:
    _, loss = figure_lines({"only": series_by_group(_records(0.0))})["loss"]
    assert [label for label, _, _ in loss] == ["train"]


def test_cli_compares_runs_into_one_folder(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    a = _write_run(tmp_path / "a" / "spidr", _records(0.0))
    b = _write_run(tmp_path / "b" / "dinosr", _records(1.0))
    assert main(["plot-training", str(a), str(b)]) == 2
    assert "needs an output folder (--out)" in capsys.readouterr().err
    assert main(["plot-training", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    written = capsys.readouterr().out.split()
    assert {p.rsplit("/", 1)[-1] for p in written} >= {"loss.png", "perplexity.png", "active_codewords_train.png"}
    assert all((tmp_path / "cmp" / p.rsplit("/", 1)[-1]).stat().st_size > 1000 for p in written)


# (tests below: wiring that a mutation round, 54 mutants over evaluate, probe, reports and plots, found untested)

def test_a_step_logged_again_keeps_its_last_record_and_lines_run_in_step_order():
    """mut T01 (the first record of a step re-logged after a resume kept), T03 (steps in logging order: a line drawn
    back and forth). Truth: series_by_group's docstring ("its last record wins") and a curve over increasing steps."""
    from spidr.train.plot import figure_lines, series_by_group

    records = [{"step": 2, "group": "train", "loss": 3.0}, {"step": 1, "group": "train", "loss": 4.0},
               {"step": 2, "group": "train", "loss": 2.5}, {"step": 3, "group": "train", "loss": 2.0}]
    groups = series_by_group(records)
    assert groups["train"][2]["loss"] == 2.5
    [(label, steps, values)] = figure_lines({"run": groups})["loss"][1]
    assert (label, steps, values) == ("train", [1, 2, 3], [4.0, 2.5, 2.0])


def test_per_codebook_figures_skip_records_without_the_list_and_scalar_figures_skip_non_numbers():
    """mut T05 (a per-codebook metric logged as a scalar in one record taken as a list: TypeError). Truth:
    figure_lines draws per-codebook metrics from the records that hold lists and scalars from those that hold
    numbers (a null loss is left out)."""
    from spidr.train.plot import figure_lines, series_by_group

    records = [{"step": 1, "group": "train", "loss": 3.0, "active_codewords": [3, 4]},
               {"step": 2, "group": "train", "loss": None, "active_codewords": 5},
               {"step": 3, "group": "train", "loss": 2.0, "active_codewords": [5, 6]}]
    figures = figure_lines({"run": series_by_group(records)})
    assert figures["loss"][1] == [("train", [1, 3], [3.0, 2.0])]
    assert figures["active_codewords_train"][1] == [("codebook 0", [1, 3], [3, 5]), ("codebook 1", [1, 3], [4, 6])]


def test_two_runs_of_the_same_folder_name_are_both_drawn(tmp_path, monkeypatch):
    """mut T02 (runs labelled by folder name even when two share it: runs/a/seed0 and runs/b/seed0 became one
    entry, and the first run was silently left out of every figure). Truth: plot_training's docstring ("several run
    directories are drawn together in each figure")."""
    pytest.importorskip("matplotlib")
    from spidr.train import plot

    drawn = []
    real = plot.figure_lines
    monkeypatch.setattr(plot, "figure_lines", lambda runs: drawn.append(runs) or real(runs))
    paths = []
    for parent, loss in (("a", 5.0), ("b", 7.0)):
        run = tmp_path / parent / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "group": "train", "loss": loss}) + "\n")
        paths.append(run)
    plot.plot_training(paths, tmp_path / "cmp")
    _, lines = real(drawn[0])["loss"]
    assert sorted(values[0] for _, _, values in lines) == [5.0, 7.0]
    assert len({label for label, _, _ in lines}) == 2
