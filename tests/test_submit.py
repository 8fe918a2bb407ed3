"""``spidr submit`` refuses to run where SLURM is absent and checks each config before submitting anything."""

from __future__ import annotations

import pytest

from spidr.cli import main
from spidr.config import config_from_dict
from train_fixtures import tiny_config_dict, write_corpus, write_toml

pytest.importorskip("submitit")


@pytest.fixture
def config(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", num_files=3)
    return tiny_config_dict(tmp_path / "runs", corpus, optimizer={"max_steps": 1})


def test_submit_without_slurm_refuses_and_names_what_it_looked_for(tmp_path, config, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no sbatch, no srun: submitit would run it locally
    path = write_toml(config, tmp_path / "run.toml")
    code = main(["submit", str(path), "--partition", "x", "--dump", str(tmp_path / "jobs")])
    captured = capsys.readouterr()
    assert code == 2
    assert "SLURM is not available on this machine: sbatch and srun not found on PATH" in captured.err
    assert "submitted" not in captured.out + captured.err
    assert not (tmp_path / "jobs").exists()


def test_submit_checks_the_manifests_before_submitting(tmp_path, config):
    from spidr.train.slurm import SlurmOptions, submit

    options = SlurmOptions(gpus_per_node=1, dump_dir=str(tmp_path / "jobs"))
    good = config_from_dict(config)
    config["validation"] = {"dev": {"manifest": str(tmp_path / "missing.csv")}}
    bad = config_from_dict(config)
    with pytest.raises(ValueError, match=r"validation\.dev\.manifest = '.*missing\.csv': manifest .* does not exist"):
        submit([good, bad], options, cluster="debug")
    assert not (tmp_path / "jobs").exists()  # nothing submitted, not even the good config
    config["validation"] = {}
    config["run"]["init_ckpt"] = str(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match=r"run\.init_ckpt = '.*nope\.pt' does not exist"):
        submit([config_from_dict(config)], options, cluster="debug")
