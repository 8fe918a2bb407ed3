"""Optional dependencies: a missing one names its extra; plotting leaves matplotlib's global backend alone."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from spidr.cli import main
from spidr.eval.kmeans import fit_kmeans
from spidr.eval.report import LayerRow, write_report
from spidr.extras import MissingExtraError
from spidr.train.plot import plot_training


def _run_dir(tmp_path):
    records = [{"step": s, "group": "train", "loss": 5.0 - s, "target_ppl": 10.0, "pred_ppl": 9.0,
                "active_codewords": [3, 4]} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_missing_scikit_learn_names_the_eval_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(MissingExtraError, match=r"k-means needs sklearn .*pip install 'spidr\[eval\]'"):
        fit_kmeans(np.zeros((10, 2), dtype=np.float32), 2)
    features = tmp_path / "features"
    features.mkdir()
    np.save(features / "a.npy", np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32))
    assert main(["kmeans", str(features), "--num-units", "2", "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "pip install 'spidr[eval]'" in capsys.readouterr().err


def test_missing_matplotlib_names_the_eval_extra(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtraError, match=r"plot-training needs matplotlib .*spidr\[eval\]"):
        plot_training(_run_dir(tmp_path))


def test_plots_leave_the_global_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    previous = matplotlib.get_backend()
    matplotlib.use("pdf")  # stands for a notebook's inline backend
    try:
        assert plot_training(_run_dir(tmp_path))
        rows = [LayerRow("m", 1, abx_within=10.0, abx_across=20.0, quality={"pnmi": 0.1}),
                LayerRow("MFCC", None, abx_within=12.0, abx_across=25.0)]
        write_report(rows, tmp_path / "report", title="t")
        assert (tmp_path / "report" / "abx_per_layer.png").stat().st_size > 0
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(previous)
