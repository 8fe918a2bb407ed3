"""Launch environments, and data parallelism on CPU with gloo:

* environment detection for torchrun, SLURM and single processes;
* 2 DDP ranks with one utterance each match 1 process with both utterances in one batch (losses and parameters
  within 1e-5), with bitwise identical codebooks on both ranks;
* gradient accumulation over micro-batches matches one big batch;
* ``torchrun --nproc-per-node 2 -m spidr train`` runs, checkpoints both ranks' state, and resumes;
* the SLURM launcher's checkpointable job (submitit's in-process "debug" executor).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spidr.config import DinoSRConfig, MaskingConfig, OptimizerConfig, SpidRConfig, config_from_dict
from spidr.data.audio import standardize
from spidr.data.collate import Batch
from spidr.data.dataset import AudioDataset, Skipped
from spidr.data.loader import build_dataloader
from spidr.data.masking import span_mask
from spidr.models.build import build_model
from spidr.train import loop
from spidr.train.checkpoint import read_int
from spidr.train.environment import (
    DistributedEnvironment,
    destroy_distributed,
    detect_environment,
    first_slurm_host,
    slurm_port,
)
from spidr.train.optim import build_optimizer, build_scheduler
from spidr.train.precision import Precision
from spidr.train.runtime import STOP_POLL_STEPS
from spidr.train.validate import validate
from train_fixtures import TINY_MODEL, speech_like, tiny_config, tiny_config_dict, write_corpus, write_toml

FP32 = Precision("cpu", None)


STEPS = 3
NO_DROPOUT = {"encoder_dropout": 0.0, "encoder_attention_dropout": 0.0, "encoder_layer_drop": 0.0}


# --------------------------------------------------------------------------------------------------------------
# Environment detection
# --------------------------------------------------------------------------------------------------------------


def test_single_process_environment():
    denv = detect_environment({})
    assert denv == DistributedEnvironment()
    assert denv.is_main
    assert not denv.is_distributed


def test_torchrun_environment():
    env = {"LOCAL_RANK": "1", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node7",
           "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}  # torchrun wins inside SLURM
    denv = detect_environment(env)
    assert denv == DistributedEnvironment(rank=5, local_rank=1, world_size=8, local_world_size=4,
                                          master_addr="node7", master_port=29400, launcher="torchrun")
    assert not denv.is_main
    with pytest.raises(ValueError, match="RANK is required"):
        detect_environment({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE = 'two' is not an integer"):
        detect_environment({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "two"})


def test_slurm_environment():
    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8(x2)",
           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456", "SLURM_STEP_NUM_TASKS": "16"}
    denv = detect_environment(env)
    assert (denv.rank, denv.local_rank, denv.world_size, denv.local_world_size) == (9, 1, 16, 8)
    assert denv.master_addr == "gpu007"
    assert denv.launcher == "slurm"
    assert denv.master_port == slurm_port("123456")  # every task derives the same port
    assert 20000 <= denv.master_port <= 60000
    assert slurm_port("123456") != slurm_port("123457")


def test_each_srun_step_meets_on_its_own_first_node_and_port():
    """Two srun steps of one job (two trainings side by side, or a step on part of the nodes: srun -N1 -w gpu008)
    took the job's first node and one port from the job id: the second step's rank 0 found the port in use, its
    other ranks joined the first step's group, and a step without the job's first node waited 30 minutes there."""
    job = {"SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456",
           "SLURM_NTASKS_PER_NODE": "8(x2)"}
    step = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "4"}
    first = detect_environment(job | step | {"SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu007"})
    second = detect_environment(job | step | {"SLURM_STEP_ID": "1", "SLURM_STEP_NODELIST": "gpu008"})
    assert (first.master_addr, second.master_addr) == ("gpu007", "gpu008")
    assert first.master_port != second.master_port
    assert (first.world_size, first.local_world_size) == (4, 4)  # the step's tasks, not the job's 8 per node
    # every task of a step agrees, whichever node it runs on
    assert detect_environment(job | step | {"SLURM_PROCID": "3", "SLURM_STEP_ID": "1",
                                            "SLURM_STEP_NODELIST": "gpu008"}).master_port == second.master_port
    # an srun that sets no step list (older SLURM) still meets on the job's first node
    assert detect_environment(job | step | {"SLURM_STEP_ID": "0"}).master_addr == "gpu007"


def test_steps_of_two_jobs_whose_ids_read_alike_when_joined_get_their_own_ports():
    """Truth: (job 12, step 34) and (job 123, step 4) are two different srun steps, which may share a node; a port
    drawn from the ids run together ("1234" for both) would be the same for both, by construction."""
    assert slurm_port("12", "34") != slurm_port("123", "4")
    assert slurm_port("1", "23") != slurm_port("12", "3")
    assert len({slurm_port("7", str(step)) for step in range(20)}) > 15  # each step of a job its own port


def test_the_batch_script_of_a_job_of_several_tasks_is_refused_not_left_waiting():
    """`spidr train` run in an sbatch script with --ntasks 2 (no srun) saw SLURM_NTASKS = 2 and waited 30 minutes for
    a rank that never starts, with an empty log; one task's batch script trains as one process."""
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu1"}
    with pytest.raises(ValueError, match=r"SLURM_NTASKS = 2 tasks but is no task of an srun step .* launch it with "
                                         "srun"):
        detect_environment(batch)
    assert detect_environment(batch | {"SLURM_NTASKS": "1"}).world_size == 1
    assert detect_environment(batch | {"SLURM_STEP_NUM_TASKS": "2"}).world_size == 2


def test_first_host_of_a_slurm_node_list():
    assert first_slurm_host("node1") == "node1"
    assert first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_slurm_host("a-b[10,12]") == "a-b10"
    assert first_slurm_host("cpu1,gpu[1-2]") == "cpu1"


# --------------------------------------------------------------------------------------------------------------
# DDP equivalence, with train_step itself
# --------------------------------------------------------------------------------------------------------------


def _model_config(**overrides) -> SpidRConfig:
    return SpidRConfig(**{**TINY_MODEL, **NO_DROPOUT, **overrides})


def _global_batches() -> list[Batch]:
    """STEPS two-utterance batches of 0.5 s speech-like audio with span masks."""
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        waveforms = torch.stack([standardize(torch.from_numpy(speech_like(8000, rng))) for _ in range(2)])
        frames = 49  # 8000 samples through the (10, 5), (8, 4), (8, 8) front end
        mask = span_mask(MaskingConfig(mask_prob=0.65, mask_length=5), torch.zeros(2, frames, dtype=torch.bool),
                         generator=generator)
        batches.append(Batch(waveforms, torch.full((2,), 8000), None, mask, ["a", "b"]))
    return batches


def _rows(batch: Batch, rows: slice) -> Batch:
    return Batch(batch.waveforms[rows], batch.lengths[rows], None, batch.mask[rows], batch.ids[rows])


def _run_steps(model, batches_per_step: list[list[Batch]], *, outputs: bool = False) -> list:
    """The loss of each step (``outputs``: each step's StepOutput)."""
    optim_cfg = OptimizerConfig(lr=2e-3, dtype="float32", warmup_steps=0)
    optimizer = build_optimizer(loop.unwrap(model), optim_cfg, device=torch.device("cpu"))
    scheduler = build_scheduler(optimizer, optim_cfg)
    results = []
    for step, batches in enumerate(batches_per_step):
        out = loop.train_step(model, batches, optimizer, scheduler, step=step, precision=FP32, scaler=None,
                              max_norm=10.0)
        assert not out.skipped
        results.append(out if outputs else out.metrics["loss"])
    return results


@contextlib.contextmanager
def _gloo_rank(rank: int, world_size: int, port: int) -> Iterator[DistributedEnvironment]:
    """This spawned process as one CPU rank of a gloo process group, torn down on the way out."""
    torch.set_num_threads(1)
    denv = DistributedEnvironment(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                                  master_port=port, launcher="torchrun")
    loop.init_distributed(denv, torch.device("cpu"))
    try:
        yield denv
    finally:
        destroy_distributed()


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with _gloo_rank(rank, world_size, port) as denv:
        torch.manual_seed(0)
        raw = build_model(_model_config())
        cfg = tiny_config(Path(out_dir), Path(out_dir) / "unused.csv")
        model = loop._wrap(raw, cfg, denv, torch.device("cpu"))
        losses = _run_steps(model, [[_rows(b, slice(rank, rank + 1))] for b in _global_batches()])
        torch.save({"losses": losses, "state": raw.state_dict()}, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(0)
    single = build_model(_model_config())
    single_losses = _run_steps(single, [[b] for b in _global_batches()])

    for r in ranks:
        assert r["losses"] == pytest.approx(single_losses, abs=1e-5)
    assert single_losses[-1] != pytest.approx(single_losses[0], abs=1e-4)  # the model did move
    expected = single.state_dict()
    for key, value in ranks[0]["state"].items():
        # Every rank holds the same model, teacher and codebooks (all-reduced statistics, bitwise equal)...
        assert torch.equal(value, ranks[1]["state"][key]), key
        # ...which is the model one process trains on the whole global batch.
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-5, msg=key)
        else:
            assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("config_class", [SpidRConfig, DinoSRConfig])
def test_gradient_accumulation_matches_one_batch(config_class):
    """Micro-batches are ranks in one process: the codebooks move once per step, from the statistics of all of them,
    each labelled by the step's codebooks (the second one does not see the first one's update), and the logged
    codebook metrics are those of the step's frames pooled (perplexities of the mean distribution, active codewords
    of the whole step), not means over micro-batches."""
    cfg = config_class(**{**TINY_MODEL, **NO_DROPOUT})
    torch.manual_seed(0)
    whole = build_model(cfg)
    torch.manual_seed(0)
    accumulated = build_model(cfg)
    batches = _global_batches()
    start = {key: value.clone() for key, value in whole.state_dict().items() if key.startswith("codebooks.")}
    outputs_whole = _run_steps(whole, [[b] for b in batches], outputs=True)
    outputs_accumulated = _run_steps(accumulated, [[_rows(b, slice(0, 1)), _rows(b, slice(1, 2))] for b in batches],
                                     outputs=True)
    for one, two in zip(outputs_whole, outputs_accumulated, strict=True):
        assert two.metrics.keys() == one.metrics.keys()
        for name, value in one.metrics.items():
            assert two.metrics[name] == pytest.approx(value, abs=1e-6, rel=1e-5), name
    assert outputs_whole[-1].metrics["target_ppl"] != pytest.approx(outputs_whole[0].metrics["target_ppl"])
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[key], value, atol=1e-5, rtol=1e-5, msg=key)
    for key, value in start.items():  # the codebooks did move
        assert not torch.equal(whole.state_dict()[key], value), key


def test_train_step_clips_the_gradient_norm_to_max_norm():
    """The step's update is the clipped gradient: with plain SGD at lr 1 the weights move by exactly max_norm, while
    the reported grad_norm is the norm before clipping (test gradients stay under the default 10: nothing else saw a
    step without its clip)."""
    torch.manual_seed(0)
    model = build_model(_model_config(codebook_decay=1.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    before = [p.detach().clone() for p in params]
    out = loop.train_step(model, [_global_batches()[0]], optimizer, scheduler, step=0, precision=FP32, scaler=None,
                          max_norm=1e-3)
    moved = torch.sqrt(sum(((p.detach() - b).double() ** 2).sum() for p, b in zip(params, before, strict=True)))
    assert out.metrics["grad_norm"] > 0.1
    assert float(moved) == pytest.approx(1e-3, rel=1e-4)


def _spawn_two_ranks(worker, *args, hang: str, seconds: float = 120) -> None:
    """Run ``worker(rank, 2, port, *args)`` on two processes; fail with ``hang`` if they have not ended in time."""
    context = mp.spawn(worker, args=(2, _free_port(), *args), nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(hang)


def _resume_worker(rank: int, world_size: int, port: int, config: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update({"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if rank == 1:
        # Rank 1 has a stale view of the run directory (say, a network file system's cached listing)...
        loop.Checkpointer.checkpoints = lambda self: []

        def fresh_start(*args, **kwargs):
            raise AssertionError("rank 1 started afresh while rank 0 resumed")

        # ...yet it must resume from the checkpoint rank 0 chose, not start a run of its own.
        loop._load_initial_weights = fresh_start
    assert loop.train(config_from_dict(config)) == "completed"


@pytest.mark.slow
def test_ranks_resume_from_the_checkpoint_rank_0_chose(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", num_files=12)
    assert loop.train(tiny_config(tmp_path, corpus, optimizer={"max_steps": 2})) == "completed"
    config = tiny_config_dict(tmp_path, corpus, optimizer={"max_steps": 4})
    _spawn_two_ranks(_resume_worker, config, hang="the ranks deadlocked: they disagreed on whether to resume")
    final = torch.load(tmp_path / "test" / "tiny" / "final.pt", weights_only=True)
    assert read_int(final["step"]) == 4
    assert len(final["ranks"]) == 2


def _bad_files_worker(rank: int, world_size: int, port: int, config: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if rank == 1:  # half of what this rank reads is unusable (say, its node cannot read some of the files)
        read = AudioDataset.__getitem__
        AudioDataset.__getitem__ = lambda self, index: Skipped(index, f"file{index}", "unreadable") if index % 2 \
            else read(self, index)
    handler = logging.FileHandler(Path(out_dir) / f"log{rank}.txt")
    handler.setLevel(logging.WARNING)
    logging.getLogger("spidr.data").addHandler(handler)
    try:
        loop.train(config_from_dict(config))
    except ValueError as error:
        (Path(out_dir) / f"error{rank}.txt").write_text(str(error))


@pytest.mark.timeout(180)
def test_too_many_unusable_files_on_one_rank_stop_every_rank(tmp_path):
    """A rank that raised alone left the others waiting in their next collective (30 minutes, then a timeout)."""
    corpus = write_corpus(tmp_path / "corpus", num_files=12)
    config = tiny_config_dict(tmp_path, corpus, optimizer={"max_steps": 30}, run={"save_interval": 100})
    _spawn_two_ranks(_bad_files_worker, config, str(tmp_path),
                     hang="a rank kept waiting for the rank that stopped on unusable files")
    errors = [(tmp_path / f"error{rank}.txt").read_text() for rank in range(2)]
    for error in errors:
        assert "utterances read by all ranks" in error
        assert "data.max_bad_fraction = 5.0%" in error
    # rank 0 met no bad file, yet names rank 1's: the ranks share what they find at the steps they check together
    assert ": unreadable" in errors[1]
    assert ": unreadable" in errors[0]
    # each bad file logged once for the job, by the first rank (each rank logged its own: 2 ranks, 2 warnings)
    warnings = [line for rank in range(2) for line in (tmp_path / f"log{rank}.txt").read_text().splitlines()
                if line.startswith("skipping unusable audio")]
    assert warnings
    assert not [line for line in (tmp_path / "log1.txt").read_text().splitlines()
                if line.startswith("skipping unusable audio")]
    assert len(set(warnings)) == len(warnings)


# --------------------------------------------------------------------------------------------------------------
# Real launches
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_torchrun_two_ranks_train_checkpoint_and_resume(tmp_path, host_sync):
    corpus = write_corpus(tmp_path / "corpus", num_files=12)
    data = tiny_config_dict(tmp_path, corpus, optimizer={"max_steps": 4}, run={"host_sync": host_sync,
                                                                               "log_interval": 3})
    config = write_toml(data, tmp_path / "run.toml")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "spidr",
               "train", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "test" / "tiny"
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert read_int(final["step"]) == 4
    assert len(final["ranks"]) == 2  # both ranks' sampler positions and RNG states
    cfg = tiny_config(tmp_path, corpus)
    per_rank = len(build_dataloader(cfg.data, cfg.masking, conv_layers=cfg.model.extractor_conv_layer_config,
                                    rank=0, world_size=2)[1])

    def consumed(state: dict) -> list[int]:
        return [r["sampler"]["epoch"] * per_rank + r["sampler"]["position"] for r in state["ranks"]]

    assert consumed(final) == [4, 4]
    assert not torch.equal(final["ranks"][0]["rng"]["torch"], final["ranks"][1]["rng"]["torch"])
    # Raise max_steps and run again: both ranks resume from final.pt and go on.
    command[-1:] = [str(config), "--set", "optimizer.max_steps=6"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert read_int(final["step"]) == 6
    assert consumed(final) == [6, 6]


def _long_torchrun_training(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a 2-rank torchrun training of 10,000 steps (stopped by the test), logging and
    saving rarely, into ``tmp_path/test/tiny``."""
    corpus = write_corpus(tmp_path / "corpus", num_files=12)
    data = tiny_config_dict(tmp_path, corpus, run={"host_sync": "log", "log_interval": 5000, "save_interval": 5000},
                            optimizer={"max_steps": 10000, "warmup_steps": 2, "hold_steps": 4998, "decay_steps": 5000})
    config = write_toml(data, tmp_path / "run.toml")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "spidr", "train",
               str(config)]
    return command, {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_a_stop_signal_to_torchrun_saves_within_ten_steps_with_host_sync_log(tmp_path):
    """With several ranks and run.host_sync = "log" the ranks read their stop agreement only at log steps, so a
    SIGTERM with a long log interval was acted on too late: torchrun killed the workers 30 s after forwarding it and
    nothing was saved. Now they stop within STOP_POLL_STEPS steps with a checkpoint."""
    command, env = _long_torchrun_training(tmp_path)
    run_dir = tmp_path / "test" / "tiny"
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as job:
        deadline = time.monotonic() + 120
        while not (run_dir / "step_0.pt").is_file() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3)  # some steps into the run
        signalled = time.monotonic()
        job.send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=120)
    waited = time.monotonic() - signalled
    saved = sorted(int(path.stem.split("_")[1]) for path in run_dir.glob("step_*.pt"))
    assert saved[-1] > 0, output[-3000:]
    assert saved[-1] % STOP_POLL_STEPS == 0
    assert "stopped by a signal at step" in output
    assert waited < 25, output[-3000:]  # well within torchrun's 30 s before it kills its workers


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux: /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return children


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_workers_of_a_torchrun_killed_with_sigkill_save_and_stop(tmp_path):
    """torchrun forwards SIGTERM to its workers, but killed with SIGKILL (kill -9, the OOM killer) it left them
    training on, holding their GPUs and writing into the run folder that a rerun takes. Now they get SIGTERM when it
    dies: a checkpoint, then exit."""
    command, env = _long_torchrun_training(tmp_path)
    run_dir = tmp_path / "test" / "tiny"
    log = tmp_path / "output.txt"
    with log.open("w") as output, subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT) as job:
        deadline = time.monotonic() + 120
        while not (run_dir / "step_0.pt").is_file() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3)  # some steps into the run
        workers = _children(job.pid)
        assert len(workers) == 2, log.read_text()[-3000:]
        job.kill()
        job.wait()
        deadline = time.monotonic() + 60
        while any(_alive(worker) for worker in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        for worker in workers:  # (what the test leaves running, whatever it found)
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)
    assert not any(_alive(worker) for worker in workers), "the workers outlived torchrun by a minute"
    saved = sorted(int(path.stem.split("_")[1]) for path in run_dir.glob("step_*.pt"))
    assert saved[-1] > 0, log.read_text()[-3000:]
    assert "stopped by a signal at step" in log.read_text()


def test_slurm_job_is_checkpointable_and_runs(tmp_path):
    pytest.importorskip("submitit")
    from spidr.train.slurm import SlurmOptions, TrainJob, submit

    corpus = write_corpus(tmp_path / "corpus", num_files=6)
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 2})
    job = TrainJob(cfg.to_dict())
    resubmission = job.checkpoint()
    assert isinstance(resubmission.function, TrainJob)
    assert resubmission.function.config == cfg.to_dict()
    with pytest.raises(ValueError, match="--nodes = 0 must be >= 1"):
        SlurmOptions(nodes=0)
    (submitted,) = submit([cfg], SlurmOptions(gpus_per_node=1, dump_dir=str(tmp_path / "jobs")), cluster="debug")
    assert submitted.result() == "completed"
    assert (cfg.run.run_dir / "final.pt").is_file()
    assert list((tmp_path / "jobs").glob("*/job-info.json"))


def _validation_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with _gloo_rank(rank, world_size, port):
        torch.manual_seed(0)
        model = build_model(_model_config())
        batches = [_rows(b, slice(rank, rank + 1)) for b in _global_batches()[:3]]
        if rank == 1:
            batches[1] = None  # all of this rank's files in its second batch were unreadable
        result = validate(model, batches, device=torch.device("cpu"), precision=FP32)
        torch.save({"num_batches": result["num_batches"], "loss": result["loss"]}, Path(out_dir) / f"val{rank}.pt")


def _repeat_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with _gloo_rank(rank, world_size, port):
        torch.manual_seed(0)
        model = build_model(_model_config())
        first, second, third = _global_batches()[:3]
        # three distinct batches over two ranks: the sampler gives rank 1 a repeat of the first as its second
        batches = [first, second] if rank == 0 else [third, replace(first, repeat=True)]
        result = validate(model, batches, device=torch.device("cpu"), precision=FP32)
        torch.save(result, Path(out_dir) / f"val{rank}.pt")


@pytest.mark.timeout(120)
def test_validation_means_leave_out_the_padding_repeats_of_other_ranks(tmp_path):
    mp.spawn(_repeat_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"val{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    alone = validate(build_model(_model_config()), _global_batches()[:3], device=torch.device("cpu"),
                     precision=FP32)
    for result in ranks:
        assert result["num_batches"] == 3
        # every metric, not only the loss: the perplexities, per-codebook losses and active codewords of a batch
        # were computed over all ranks' batches of its step (target_ppl 8.54 on 2 ranks for 7.97 on one)
        assert set(result) == set(alone)
        for name, value in alone.items():
            assert result[name] == pytest.approx(value, rel=1e-6), name


@pytest.mark.timeout(120)
def test_a_batch_emptied_on_one_rank_is_skipped_there_alone_in_validation(tmp_path):
    """The eval forward holds no collective: a rank that lost a batch to unreadable files skips it alone, and both
    ranks report the mean one process gives over the same batches (the batch was skipped on every rank, so one
    unreadable file moved the numbers of a multi-rank validation away from a single process's)."""
    mp.spawn(_validation_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"val{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["num_batches"] == 5  # rank 0's 3 batches and rank 1's first and third
    torch.manual_seed(0)
    batches = _global_batches()[:3]
    kept = [_rows(b, slice(0, 1)) for b in batches] + [_rows(b, slice(1, 2)) for b in (batches[0], batches[2])]
    alone = validate(build_model(_model_config()), kept, device=torch.device("cpu"), precision=FP32)
    assert alone["num_batches"] == 5
    assert ranks[0]["loss"] == pytest.approx(alone["loss"], rel=1e-6)


def test_a_one_process_command_started_several_times_is_refused_in_each_copy(tmp_path, monkeypatch, capsys):
    """`torchrun --nproc-per-node 2 -m spidr extract ...`: one copy was refused by the folder lock while the other
    extracted everything, and torchrun reported a failure; every copy of a one-process command (everything but
    train and lm-train) now says what to do instead, before any work."""
    from spidr import cli

    monkeypatch.chdir(tmp_path)
    for env in ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4"}):
        for name in ("LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert cli.main(["manifest", str(tmp_path), "out.csv"]) == 2
        count = env.get("WORLD_SIZE") or env["SLURM_STEP_NUM_TASKS"]
        assert f"spidr manifest runs as one process, and this is one of {count}" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == []
    assert cli.processes_started_together({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) == 1
    assert cli.processes_started_together({"WORLD_SIZE": "8"}) == 1  # (no LOCAL_RANK: not torchrun's)
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    several = sorted(name for name, parser in commands.items() if parser.get_default("several_processes"))
    assert several == ["extract", "lm-train", "train"]


def test_slurm_ntasks_without_a_task_id_is_a_single_process():
    """Truth (spec §8.3 and the module docstring): a SLURM task is recognised by SLURM_PROCID *and* SLURM_NTASKS;
    an environment with only the job's task count (an salloc shell) is a single process, not a refused one."""
    from spidr.train.environment import DistributedEnvironment, detect_environment

    assert detect_environment({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}) == DistributedEnvironment()


def _fake_cuda(monkeypatch, count: int) -> list:
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    """Truth: a node shows 4 GPUs and runs 2 tasks of an 8-task job (4 nodes); global rank 6 is local rank 1 there
    and takes GPU 1 of its node: the device index is the local rank, not the global one (6 % 4 = 2)."""
    from spidr.train.environment import DistributedEnvironment, resolve_device

    chosen = _fake_cuda(monkeypatch, 4)
    denv = DistributedEnvironment(rank=6, local_rank=1, world_size=8, local_world_size=2, launcher="slurm")
    assert resolve_device("auto", denv) == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]


def test_run_device_cuda_without_cuda_is_refused_naming_the_setting(monkeypatch):
    from spidr.train.environment import DistributedEnvironment, resolve_device

    _fake_cuda(monkeypatch, 0)
    with pytest.raises(ValueError, match=r"run\.device = 'cuda' but CUDA is not available"):
        resolve_device("cuda", DistributedEnvironment())
    assert resolve_device("auto", DistributedEnvironment()) == torch.device("cpu")


def test_a_single_process_creates_no_process_group():
    """Truth (module docstring: "A process group is created only when there is more than one rank"): two
    single-process trainings on one machine must not both bind a rendezvous port."""
    from spidr.train.environment import DistributedEnvironment, init_distributed

    assert not dist.is_initialized()
    try:
        init_distributed(DistributedEnvironment(master_port=_free_port()), torch.device("cpu"))
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_teardown_meets_in_a_barrier_only_when_every_rank_got_there(monkeypatch):
    """Truth (destroy_distributed_after): a normal end and an error raised by every rank go through the barrier;
    an error that may have struck one rank alone does not (the others would never come)."""
    from spidr.distributed import AgreedValueError
    from spidr.train import environment

    waits = []
    monkeypatch.setattr(environment, "destroy_distributed", lambda *, wait=True: waits.append(wait))
    for error_type in (None, AgreedValueError, environment.RaisedOnEveryRankError, RuntimeError, ValueError,
                       KeyboardInterrupt):
        environment.destroy_distributed_after(error_type)
    assert waits == [True, True, True, False, False, False]


def _config_worker(rank: int, world_size: int, port: int, configs: list[dict], out_dir: str) -> None:
    """Each rank checks its own config (``configs[rank]``) and writes what it was told."""
    import torch.distributed as dist

    from spidr.train.environment import check_same_config

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        check_same_config(configs[rank])
        said = "agreed"
    except ValueError as error:
        said = f"refused: {error}"
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.txt").write_text(said)


def test_ranks_started_with_different_configs_are_refused_on_every_rank(tmp_path):
    """Another --set on one node (or a TOML edited while an srun step started): nothing compared what the ranks
    parsed; another optimizer.lr trained replicas that drifted apart without a word, another max_steps left every rank
    in mismatched collectives for the 30-minute time-out. Every rank now refuses, naming the field and both values;
    the same config passes. (train and lm-train call the check right after the process group starts.)"""
    same = {"optimizer": {"lr": 2e-3, "max_steps": 8}, "run": {"name": "x"}}
    _spawn_two_ranks(_config_worker, [same, same], str(tmp_path), hang="the config check hung")
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)] == ["agreed", "agreed"]
    other = {"optimizer": {"lr": 1e-3, "max_steps": 8}, "run": {"name": "x"}}
    _spawn_two_ranks(_config_worker, [same, other], str(tmp_path), hang="the config check hung")
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == (
            "refused: rank 1 was started with another config than rank 0 (optimizer.lr: 0.002 on rank 0, 0.001 on "
            "rank 1): start every rank of spidr train with the same config and --set options")
