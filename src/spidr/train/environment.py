"""Where this process sits in a job: torchrun, SLURM or a single process, as one frozen description.

Detection order (spec §8.3): torchrun variables (``LOCAL_RANK`` present), then a SLURM task launched by ``srun``
(``SLURM_PROCID`` and ``SLURM_NTASKS``), else a single process. A process group is created only when there is
more than one rank: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from spidr.distributed import RaisedOnEveryRankError

logger = logging.getLogger(__name__)

SLURM_PORT_RANGE = (20000, 60000)
RELEASE_GRACE_S = 0.2  # after the last collective, time for gloo's threads to release its work (destroy_distributed)


@dataclass(frozen=True)
class DistributedEnvironment:
    """Rank, world and rendezvous address of this process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: Literal["torchrun", "slurm", "single"] = "single"

    @property
    def is_main(self) -> bool:
        """True on the rank that writes checkpoints and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def detect_environment(environ: Mapping[str, str] | None = None) -> DistributedEnvironment:
    """Read the launcher's variables (``os.environ`` by default) into a :class:`DistributedEnvironment`."""
    env = os.environ if environ is None else environ
    if "LOCAL_RANK" in env:
        return DistributedEnvironment(
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", default=_int(env, "WORLD_SIZE")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=29500),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = env.get("SLURM_JOB_ID", "0")
        if "SLURM_STEP_NUM_TASKS" not in env:  # srun sets it for its tasks; a batch script or salloc shell has none
            if _int(env, "SLURM_NTASKS") > 1:
                raise ValueError(
                    f"this process runs in SLURM job {job_id} of SLURM_NTASKS = {env['SLURM_NTASKS']} tasks but is "
                    "no task of an srun step (SLURM_STEP_NUM_TASKS is unset: the job's batch script, or an salloc "
                    "shell), so the other ranks would never start and it would wait 30 minutes for them: launch it "
                    "with srun (one task per GPU), under torchrun, or with spidr submit")
            return DistributedEnvironment()
        return DistributedEnvironment(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            world_size=_int(env, "SLURM_STEP_NUM_TASKS"),
            local_world_size=_leading_int(env.get("SLURM_STEP_TASKS_PER_NODE")
                                          or env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"])),
            # The step's own nodes and port: a step on part of the job's nodes (srun -w node2) waited 30 minutes
            # for its job's first node, and a second step beside the first (two trainings in one job) found the
            # port taken, or joined the first one's process group.
            master_addr=first_slurm_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                                         or env.get("SLURM_NODELIST", "127.0.0.1")),
            master_port=slurm_port(job_id, env.get("SLURM_STEP_ID", "0")),
            launcher="slurm",
        )
    return DistributedEnvironment()


def first_slurm_host(nodelist: str) -> str:
    """The first host of a compressed SLURM node list: ``"gpu[003-005,9],cpu1"`` → ``"gpu003"``."""
    first = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if first is None:
        raise ValueError(f"SLURM_JOB_NODELIST = {nodelist!r} is not a SLURM node list")
    prefix, ranges = first.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_port(job_id: str, step_id: str = "0") -> int:
    """A rendezvous port that every task of one srun step derives identically from the job and step ids (the steps
    of a job get different ones; a string seed is hashed alike in every process)."""
    return random.Random(f"{job_id}.{step_id}").randint(*SLURM_PORT_RANGE)


def resolve_device(requested: str, denv: DistributedEnvironment) -> torch.device:
    """``run.device``: "auto" picks this rank's GPU when CUDA is available, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device = 'cuda' but CUDA is not available; set run.device = 'cpu' or 'auto'")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", denv.local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(denv: DistributedEnvironment, device: torch.device) -> None:
    """Create the process group when the job has several ranks (gloo on CPU, NCCL on CUDA); no-op otherwise."""
    if not denv.is_distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
        rank=denv.rank,
        world_size=denv.world_size,
        timeout=datetime.timedelta(minutes=30),
        device_id=device if device.type == "cuda" else None,
    )
    logger.info("rank %d/%d joined a %s process group (%s)", denv.rank, denv.world_size, backend, denv.launcher)


def destroy_distributed(*, wait: bool = True) -> None:
    """Tear the process group down; with ``wait``, after a barrier.

    The barrier matters with gloo: a finished collective whose tensors Python has already dropped is released by
    a gloo worker thread, which needs the GIL for it; a group destroyed from a Python object's deallocator (e.g.
    a DDP reducer) joins those threads while holding the GIL, and deadlocks if one of them is still waiting for it
    (pytorch/pytorch#56297). Waiting in a barrier releases the GIL and lets them finish; but the barrier's own work
    is released by such a thread just after the barrier returns, and it holds the collectives before it (gdb showed
    a run whose reducer, freed with an error's traceback, joined that thread while it waited for the GIL). A short
    sleep, which releases the GIL, lets the thread finish before anything can destroy the group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    time.sleep(RELEASE_GRACE_S)
    dist.destroy_process_group()


def destroy_distributed_after(error_type: type[BaseException] | None) -> None:
    """``destroy_distributed`` at the end of a run that ended normally or with ``error_type``: through a barrier
    unless the error may have struck one rank alone (the others would never reach the barrier)."""
    destroy_distributed(wait=error_type is None or issubclass(error_type, RaisedOnEveryRankError))


def check_same_config(config: dict[str, Any], *, command: str = "train") -> None:
    """Raise ``AgreedValueError`` on every rank when the ranks were started with different configs (``config``: this
    rank's, as a nested dict): another ``--set`` on one node, a TOML edited while the tasks started. Replicas of
    another learning rate drift apart without a word, and another step count leaves the ranks in mismatched
    collectives until the process group's 30-minute time-out. One small collective at start-up."""
    import json

    from spidr.distributed import AgreedValueError
    from spidr.train.runtime import config_diff

    texts = gather_to_all(json.dumps(config, sort_keys=True, default=str))
    for rank, text in enumerate(texts):
        if text == texts[0]:
            continue
        changes = config_diff(json.loads(texts[0]), json.loads(text))
        shown = "; ".join(f"{name}: {first!r} on rank 0, {other!r} on rank {rank}"
                          for name, first, other in sorted(changes)[:6])
        raise AgreedValueError(f"rank {rank} was started with another config than rank 0 ({shown}"
                               f"{' and more' if len(changes) > 6 else ''}): start every rank of spidr {command} "
                               "with the same config and --set options")


def gather_to_all(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(obj: Any, *, timeout: datetime.timedelta | None = None) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group). With ``timeout``, through a gloo
    group of its own that waits that long (the process group's 30 min can be too short for what rank 0 does
    first); every rank must then pass the same."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    if timeout is None:
        dist.broadcast_object_list(box, src=0)
        return box[0]
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    return box[0]


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in env:
        if default is None:
            raise ValueError(f"environment variable {name} is required by the launcher but is not set")
        return default
    try:
        return int(env[name])
    except ValueError as error:
        raise ValueError(f"environment variable {name} = {env[name]!r} is not an integer") from error


def _leading_int(text: str) -> int:
    """``SLURM_NTASKS_PER_NODE`` may read ``"4(x2)"`` or ``"4,2"``: the first number."""
    match = re.match(r"\d+", text)
    return int(match.group()) if match else 1
