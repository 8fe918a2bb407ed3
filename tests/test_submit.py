"""``spidr submit`` refuses to run where SLURM is absent and checks each config before submitting anything."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from types import SimpleNamespace

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
    config["run"] = config["run"] | {"wandb_name": "other"}
    bad = config_from_dict(config)
    with pytest.raises(ValueError, match=r"validation\.dev\.manifest = '.*missing\.csv': manifest .* does not exist"):
        submit([good, bad], options, cluster="debug")
    assert not (tmp_path / "jobs").exists()  # nothing submitted, not even the good config
    config["validation"] = {}
    config["run"]["init_ckpt"] = str(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match=r"run\.init_ckpt = '.*nope\.pt' does not exist"):
        submit([config_from_dict(config)], options, cluster="debug")


def test_submit_refuses_a_manifest_whose_audio_was_moved(tmp_path, config):
    """A manifest whose audio was moved (or is not mounted where it says) was queued, and the job stopped on its
    unreadable files after the wait. Up to 64 rows spread over it are looked for; more missing than
    data.max_bad_fraction is refused, fewer is the job's to skip."""
    import shutil

    from spidr.train.slurm import SlurmOptions, submit

    options = SlurmOptions(gpus_per_node=1, dump_dir=str(tmp_path / "jobs"))
    corpus = tmp_path / "corpus"
    files = sorted(corpus.rglob("*.wav"))
    files[1].unlink()  # one of 3 missing: 33 % > 5 %
    with pytest.raises(ValueError, match=r"data\.manifest = .*: 1 of 3 audio files looked for \(spread over its 3 "
                       r"rows\) do not exist, e\.g\. .*\.wav \(more than data\.max_bad_fraction = 5\.0%\): was the "
                       r"audio moved\?"):
        submit([config_from_dict(config)], options, cluster="debug")
    assert not (tmp_path / "jobs").exists()
    config["data"] = config["data"] | {"max_bad_fraction": 0.5}  # within what the job may skip
    shutil.copy(files[0], files[1])
    files[2].unlink()
    from spidr.train import slurm

    slurm.check_before_submitting(config_from_dict(config))


def test_option_errors_name_the_command_line_option():
    from spidr.train.slurm import SlurmOptions

    with pytest.raises(ValueError, match=r"^--time = 0 must be >= 1$"):
        SlurmOptions(time_min=0)
    with pytest.raises(ValueError, match=r"^--gpus-per-node = 0 must be >= 1$"):
        SlurmOptions(gpus_per_node=0)
    # SLURM signals the job 2 min before its limit to save and requeue: a limit within that requeued for ever
    with pytest.raises(ValueError, match=r"^--time = 2 min must be more than the 2 min before the limit"):
        SlurmOptions(time_min=2)
    assert SlurmOptions(time_min=3).time_min == 3


def test_batch_plans_that_fail_at_start_are_refused_before_submitting(tmp_path, config):
    """Found here, not after a trip through the queue: every utterance shorter than min_sample_size, and drop_last
    with fewer batches than the job's ranks (nodes × GPUs)."""
    from spidr.train.slurm import SlurmOptions, submit

    options = SlurmOptions(gpus_per_node=4, nodes=2, dump_dir=str(tmp_path / "jobs"))
    config["data"] = config["data"] | {"min_sample_size": 30000, "max_sample_size": 30000}
    with pytest.raises(ValueError, match=r"with 8 rank\(s\): data\.manifest .*: none of the 3 utterances is at "
                                         r"least data\.min_sample_size = 30000"):
        submit([config_from_dict(config)], options, cluster="debug")
    config["data"] = config["data"] | {"min_sample_size": 4000, "max_sample_size": 16000, "drop_last": True}
    with pytest.raises(ValueError, match=r"with 8 rank\(s\): epoch 0 has fewer batches than the 8 ranks and "
                                         r"data\.drop_last is true"):
        submit([config_from_dict(config)], options, cluster="debug")
    assert not (tmp_path / "jobs").exists()


def test_two_configs_of_one_run_folder_are_refused_before_submitting(tmp_path, config):
    """Their second job would be refused at start (the run folder is held) or train over the first."""
    from spidr.train.slurm import SlurmOptions, submit

    options = SlurmOptions(gpus_per_node=1, dump_dir=str(tmp_path / "jobs"))
    cfg = config_from_dict(config)
    with pytest.raises(ValueError, match=r"several configs train in the run folder .*runs/test/tiny"):
        submit([cfg, config_from_dict(config | {"optimizer": {"max_steps": 2}})], options, cluster="debug")
    assert not (tmp_path / "jobs").exists()


@pytest.mark.timeout(300)
def test_local_executor_tasks_train_as_one_distributed_job(tmp_path, config, monkeypatch):
    """``spidr submit --local -G 2``: submitit starts 2 processes here; they must form one 2-rank job (each step
    logged once, both ranks' states in final.pt), not two runs racing in one folder."""
    import json

    import torch

    from spidr.train.checkpoint import read_int
    from spidr.train.slurm import SlurmOptions, submit

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the tasks: 2 gloo ranks on a small machine
    config["optimizer"]["max_steps"] = 2
    cfg = config_from_dict(config)
    (job,) = submit([cfg], SlurmOptions(gpus_per_node=2, cpus_per_task=1, time_min=5,
                                        dump_dir=str(tmp_path / "jobs")), cluster="local")
    assert job.results() == ["completed", "completed"], job.stderr()
    assert "INFO spidr.train.checkpoint: saved checkpoint" in job.stderr()  # the trainer's log reaches the job's
    records = [json.loads(line) for line in (cfg.run.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if record.get("group") == "train"]
    assert steps == [1, 2]
    final = torch.load(cfg.run.run_dir / "final.pt", weights_only=True)
    assert read_int(final["step"]) == 2
    assert len(final["ranks"]) == 2
    with pytest.raises(ValueError, match=r"--nodes = 2: --local runs the job on this machine only"):
        submit([cfg], SlurmOptions(nodes=2, gpus_per_node=1, dump_dir=str(tmp_path / "jobs")), cluster="local")


@pytest.mark.parametrize(("executor", "requeued"), [("slurm", ["123"]), ("local", [])])
def test_only_a_slurm_job_requeues_itself_when_interrupted(monkeypatch, executor, requeued):
    """A --local job run inside a SLURM allocation sees the allocation's SLURM_JOB_ID; requeuing that would put the
    user's interactive session back in the queue."""
    pytest.importorskip("submitit")
    import spidr.train.loop
    from spidr.train import slurm

    calls = []
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
    monkeypatch.setattr(slurm, "local_task_environment", dict)
    monkeypatch.setattr(slurm, "config_from_dict", lambda config: config)
    monkeypatch.setattr(spidr.train.loop, "train", lambda cfg: "interrupted")
    monkeypatch.setattr(slurm, "requeue", calls.append)
    assert slurm.TrainJob({})() == "interrupted"
    assert calls == requeued


def test_the_batch_script_asks_slurm_for_the_job_the_options_describe(tmp_path, config, monkeypatch):
    """What sbatch receives (a stand-in sbatch records it): one task per GPU, the signal to save before the time
    limit, and srun ending every task when one fails instead of the others waiting in a collective until NCCL's
    time-out."""
    import stat

    from spidr.train.slurm import SlurmOptions, submit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for path in bin_dir.iterdir():
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    options = SlurmOptions(nodes=2, gpus_per_node=4, partition="gpu", time_min=60, dump_dir=str(tmp_path / "jobs"))
    (job,) = submit([config_from_dict(config)], options, cluster="slurm")
    assert job.job_id == "4242"
    batch_script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=60", "#SBATCH --signal=USR2@120"):
        assert line in batch_script.splitlines()
    srun_line = next(line for line in batch_script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun_line.split()


def test_only_the_main_task_requeues_an_interrupted_slurm_job(monkeypatch):
    """Truth: every task of the job returns "interrupted"; one `scontrol requeue` is the job's, and 8 tasks each
    requeuing it (a job already pending again) only fill the log with failures."""
    pytest.importorskip("submitit")
    import spidr.train.loop
    from spidr.train import slurm

    calls = []
    for name, value in {"SLURM_JOB_ID": "123", "SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "1",
                        "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                        "SLURM_JOB_NODELIST": "gpu1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(slurm, "config_from_dict", lambda config: config)
    monkeypatch.setattr(spidr.train.loop, "train", lambda cfg: "interrupted")
    monkeypatch.setattr(slurm, "requeue", calls.append)
    assert slurm.TrainJob({})() == "interrupted"
    assert calls == []
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert slurm.TrainJob({})() == "interrupted"
    assert calls == ["123"]


def test_two_jobs_of_one_name_submitted_in_one_second_get_their_own_folders(tmp_path, monkeypatch):
    """Truth (spec §8.3: each job's submission folder receives its job-info.json): two configs of one project and
    name in two workdirs, submitted in the same second, must not share a folder (the second's job-info.json and logs
    would replace the first's)."""
    submitit = pytest.importorskip("submitit")
    from spidr.config import config_from_dict
    from spidr.train import slurm
    from train_fixtures import tiny_config_dict, write_corpus

    corpus = write_corpus(tmp_path / "corpus", num_files=3)
    configs = [config_from_dict(tiny_config_dict(tmp_path / workdir, corpus, optimizer={"max_steps": 1}))
               for workdir in ("a", "b")]
    folders = []

    class Executor:
        def __init__(self, folder, cluster):
            folders.append(Path(folder))

        def update_parameters(self, **_):
            pass

        def submit(self, function):
            return SimpleNamespace(job_id=str(len(folders)))

    fixed = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    monkeypatch.setattr(slurm, "datetime", SimpleNamespace(datetime=SimpleNamespace(now=lambda tz: fixed),
                                                           UTC=datetime.UTC))
    slurm.submit(configs, slurm.SlurmOptions(gpus_per_node=1, dump_dir=str(tmp_path / "jobs")), cluster="debug")
    assert len(set(folders)) == 2
    infos = [json.loads((folder / "job-info.json").read_text()) for folder in folders]
    assert [info["run_dir"] for info in infos] == [str(cfg.run.run_dir) for cfg in configs]
