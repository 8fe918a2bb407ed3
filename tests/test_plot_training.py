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
