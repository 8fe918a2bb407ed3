"""``spidr submit``: launch pretraining on SLURM through submitit (an optional extra, imported lazily).

One SLURM task per GPU; each task finds its rank from the SLURM variables (``spidr.train.environment``). Under
submitit's local executor (``--local``) the tasks are processes on this machine that only get ``SUBMITIT_LOCAL_*``
variables; each task turns them into torchrun's variables before training, so the tasks form one distributed job
instead of as many separate single-process runs writing into one run folder.

The submitted callable is checkpointable: on a time-out or pre-emption signal the training loop saves a checkpoint
at the next step boundary and returns "interrupted", and the job requeues itself; the requeued job resumes from
that checkpoint. Should submitit's own handler fire first, ``checkpoint`` resubmits the same callable, which
resumes from the latest periodic checkpoint.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from spidr.config import Config, config_from_dict, unused_settings

if TYPE_CHECKING:
    from spidr.data.manifest import Manifest

logger = logging.getLogger(__name__)

SIGNAL_DELAY_S = 120  # SLURM warns this long before the time limit, time enough to save a checkpoint

# The ``spidr submit`` option that sets each count field: errors name what the user typed, not the field.
_COUNT_OPTIONS = {"nodes": "--nodes", "gpus_per_node": "--gpus-per-node", "time_min": "--time",
                  "cpus_per_task": "--cpus-per-task"}


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of one training job."""

    nodes: int = 1
    gpus_per_node: int = 8
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    time_min: int = 1200
    constraint: str | None = None
    cpus_per_task: int = 10
    mem_per_gpu: str | None = None
    dump_dir: str = "submitit"

    def __post_init__(self) -> None:
        for name, option in _COUNT_OPTIONS.items():
            if getattr(self, name) < 1:
                raise ValueError(f"{option} = {getattr(self, name)} must be >= 1")
        if self.time_min * 60 <= SIGNAL_DELAY_S:  # the warning would come at once: saved, requeued, for ever
            raise ValueError(f"--time = {self.time_min} min must be more than the {SIGNAL_DELAY_S // 60} min before "
                             "the limit at which SLURM signals the job to save and requeue")


class TrainJob:
    """The submitted callable: ``train(config)`` on every task, requeued when interrupted by a signal."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config  # a plain dict (Config.to_dict()): later edits of the TOML do not change the job

    def __call__(self) -> str:
        from spidr.cli import configure_logging
        from spidr.train.environment import detect_environment
        from spidr.train.loop import train

        configure_logging()  # the job's log file gets the trainer's lines, as a spidr train terminal does
        local = os.environ.get("SUBMITIT_EXECUTOR") == "local"
        if local:
            os.environ.update(local_task_environment())
        outcome = train(config_from_dict(self.config))
        # A local job run inside a SLURM allocation (an interactive session) sees that allocation's SLURM_JOB_ID:
        # requeuing it would put the user's session back in the queue.
        if outcome == "interrupted" and not local and detect_environment().is_main and "SLURM_JOB_ID" in os.environ:
            requeue(os.environ["SLURM_JOB_ID"])
        return outcome

    def checkpoint(self) -> Any:
        """Called by submitit on pre-emption: resubmit the same job (it resumes from the latest checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config))


def local_task_environment() -> dict[str, str]:
    """torchrun's variables for this task of a submitit local job, which sets only ``SUBMITIT_LOCAL_*`` ones.

    Every task derives the same rendezvous port from the job id (the controller's process id), as SLURM tasks do
    from theirs; the local executor runs one node, so rank 0 listens on the loopback address.
    """
    import submitit

    from spidr.train.environment import slurm_port

    job = submitit.JobEnvironment()
    return {"RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank), "WORLD_SIZE": str(job.num_tasks),
            "LOCAL_WORLD_SIZE": str(job.num_tasks), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(slurm_port(job.job_id))}


def requeue(job_id: str) -> None:
    """Put this SLURM job back in the queue (it restarts from its latest checkpoint)."""
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        logger.info("requeued SLURM job %s", job_id)
    else:
        logger.warning("could not requeue SLURM job %s: %s", job_id, result.stderr.strip())


SLURM_COMMANDS = ("sbatch", "srun")  # what submitting (sbatch) and submitit's SLURM detection (srun) need
Cluster = Literal["slurm", "local", "debug"]


def check_slurm_available() -> None:
    """Raise ``ValueError`` unless the SLURM client commands are on PATH.

    Without them submitit's ``AutoExecutor`` silently falls back to its local executor: "submitted ... as job N",
    then a background process on this machine whose failure only its log shows.
    """
    missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if missing:
        raise ValueError(
            f"SLURM is not available on this machine: {' and '.join(missing)} not found on PATH "
            f"({os.environ.get('PATH', '')}). Submit from a SLURM login node, or train here with 'spidr train CONFIG' "
            "(torchrun for several GPUs); --local runs the job with submitit's local executor (for testing)"
        )


AUDIO_SAMPLE = 64  # manifest rows whose audio is looked for before submitting: a stat each, even on millions


def check_before_submitting(cfg: Config) -> None:
    """What a job would otherwise discover only in its log: every manifest must exist and parse, its audio must
    be where it says (``_check_audio_present``), and ``run.init_ckpt`` must exist (the config's fields are already
    validated by loading it)."""
    from spidr.data.manifest import read_manifest

    for section, data in cfg.data_sections():
        field_name, path = f"{section}.manifest", data.manifest
        if not path:
            raise ValueError(f"{field_name} is empty")
        try:
            _check_audio_present(read_manifest(path), data.max_bad_fraction, section)
        except ValueError as error:
            raise ValueError(f"{field_name} = {path!r}: {error}") from None
    if cfg.run.init_ckpt is not None and not Path(cfg.run.init_ckpt).exists():
        raise ValueError(f"run.init_ckpt = {cfg.run.init_ckpt!r} does not exist")


def _check_audio_present(manifest: Manifest, max_bad_fraction: float, section: str) -> None:
    """Refuse a manifest whose audio was moved or is not mounted where the job looks: more than
    ``max_bad_fraction`` of ``AUDIO_SAMPLE`` rows spread over it name no file (training would stop there too, after
    a trip through the queue). Only their existence is looked at; unreadable contents are the job's to skip."""
    import numpy as np

    rows = np.unique(np.linspace(0, len(manifest) - 1, min(AUDIO_SAMPLE, len(manifest))).round().astype(np.int64))
    missing = [entry.location for entry in (manifest[int(i)] for i in rows)
               if not Path(entry.archive if entry.in_archive else entry.path).is_file()]
    if len(missing) > max_bad_fraction * len(rows):
        raise ValueError(f"{len(missing)} of {len(rows)} audio files looked for (spread over its {len(manifest)} "
                         f"rows) do not exist, e.g. {missing[0]} (more than {section}.max_bad_fraction = "
                         f"{max_bad_fraction:.1%}): was the audio moved? Write the manifest again (spidr manifest) "
                         "or mount the audio where it says")


def check_batch_plans(cfg: Config, world_size: int) -> None:
    """Build the first epoch's batch plan of every data section for the job's ``world_size`` ranks, as its tasks
    will: utterances all shorter than ``min_sample_size``, or ``drop_last`` with fewer batches than ranks, are found
    here rather than after a trip through the queue."""
    from spidr.data.loader import build_dataloader

    for section, data in cfg.data_sections():
        try:
            _, sampler = build_dataloader(data, cfg.masking, conv_layers=cfg.model.extractor_conv_layer_config,
                                          rank=0, world_size=world_size, deterministic_crops=section != "data",
                                          section=section)
            len(sampler)  # plans epoch 0
        except ValueError as error:
            raise ValueError(f"{cfg.run.run_dir} with {world_size} rank(s): {error}") from None


def submit(configs: list[Config], options: SlurmOptions, *, cluster: Cluster = "slurm") -> list[Any]:
    """Submit one job per config; returns the submitit jobs.

    Every config is checked (manifests, initial checkpoint) before anything is submitted. ``cluster="slurm"``
    refuses to run where SLURM is absent; ``"local"`` (submitit's local executor: one background process per GPU
    here, joined into one distributed job) and ``"debug"`` (this process) are for testing.
    """
    try:
        import submitit
    except ImportError as error:
        raise ValueError("spidr submit needs submitit: pip install 'spidr[slurm]'") from error
    run_dirs = [Path(cfg.run.run_dir).resolve() for cfg in configs]
    doubled = sorted({str(run_dir) for run_dir in run_dirs if run_dirs.count(run_dir) > 1})
    if doubled:  # two jobs in one run folder: the second is refused at start (or waits for the first's lock)
        raise ValueError(f"several configs train in the run folder {', '.join(doubled)}: give each its own "
                         "run.wandb_name (or workdir / wandb_project)")
    for cfg in configs:
        check_before_submitting(cfg)
        check_batch_plans(cfg, options.nodes * options.gpus_per_node)
        for note in unused_settings(cfg):
            logger.warning("%s: %s", cfg.run.run_dir, note)
    if cluster == "slurm":
        check_slurm_available()
    elif cluster == "local" and options.nodes != 1:
        raise ValueError(f"--nodes = {options.nodes}: --local runs the job on this machine only; expected --nodes 1")
    jobs = []
    for cfg in configs:
        name = f"{cfg.run.wandb_project}-{cfg.run.wandb_name}"
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        folder = Path(options.dump_dir) / f"{name}_{stamp}"
        for number in itertools.count(2):  # a job submitted in the same second under the same name
            if not folder.exists():
                break
            folder = Path(options.dump_dir) / f"{name}_{stamp}_{number}"
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        executor.update_parameters(
            name=name,
            nodes=options.nodes,
            tasks_per_node=options.gpus_per_node,
            gpus_per_node=options.gpus_per_node,
            cpus_per_task=options.cpus_per_task,
            timeout_min=options.time_min,
            slurm_signal_delay_s=SIGNAL_DELAY_S,
            # One task dying (out of memory, a crash) ends them all at once: the others would otherwise wait in a
            # collective until NCCL's time-out (tens of minutes of the allocation) before failing.
            slurm_srun_args=["--kill-on-bad-exit=1"],
            **{f"slurm_{key}": value for key, value in (
                ("account", options.account), ("partition", options.partition), ("qos", options.qos),
                ("constraint", options.constraint), ("mem_per_gpu", options.mem_per_gpu),
            ) if value is not None},
        )
        job = executor.submit(TrainJob(cfg.to_dict()))
        _write_job_info(folder, job.job_id, cfg, options)
        logger.info("submitted %s as job %s (logs in %s)", name, job.job_id, folder)
        jobs.append(job)
    return jobs


def _write_job_info(folder: Path, job_id: str, cfg: Config, options: SlurmOptions) -> None:
    """``job-info.json`` plus the code version (``git-info.txt``, ``git-diff.patch``) beside the job's logs."""
    folder.mkdir(parents=True, exist_ok=True)
    info = {"job_id": job_id, "run_dir": str(cfg.run.run_dir), "options": asdict(options), "config": cfg.to_dict()}
    (folder / "job-info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    source = Path(__file__).resolve().parent
    for args, out in ((["log", "-1", "--format=%H %s"], "git-info.txt"), (["diff", "HEAD"], "git-diff.patch")):
        result = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            (folder / out).write_text(result.stdout, encoding="utf-8")
