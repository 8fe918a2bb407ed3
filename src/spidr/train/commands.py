"""Subcommands of this area (see ``spidr.cli``): ``train``, ``submit``, ``plot-training``."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from spidr.help_format import SET_HELP, HelpFormatter
from spidr.training_stopped import EXIT_STOPPED

logger = logging.getLogger(__name__)



def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``spidr`` parser."""
    formatter = HelpFormatter

    train = subparsers.add_parser(
        "train",
        help="pretrain SpidR or DinoSR from a TOML/JSON config (single process, or under torchrun / SLURM)",
        description="Pretrain from CONFIG. Resumes automatically from the latest complete checkpoint in the run "
        "directory <workdir>/<wandb_project>/<wandb_name>. Multi-GPU: torchrun --nproc-per-node N -m spidr train "
        "CONFIG. Exit status: 0 when max_steps is reached, 1 when training diverged (too many non-finite steps), "
        "2 when the config or data are refused or another process trains in the run directory, 3 when stopped by "
        "SIGTERM/SIGUSR1/SIGUSR2 or Ctrl-C (to the trainer or its process group) after saving a checkpoint (a "
        "second Ctrl-C stops at once, unsaved).",
        formatter_class=formatter,
    )
    train.add_argument("config", help="run config (.toml or .json)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help=SET_HELP)
    train.set_defaults(handler=_train, several_processes=True)  # (torchrun, srun: spidr.cli)

    submit = subparsers.add_parser(
        "submit",
        help="submit pretraining jobs to SLURM through submitit (one task per GPU, requeued on pre-emption)",
        description="Check every CONFIG (fields, manifests and that 64 of their audio files exist, first batch "
        "plans, run.init_ckpt), then submit one SLURM job each. Refuses when SLURM (sbatch, srun) is not installed "
        "here, unless --local is given.",
        formatter_class=formatter,
    )
    submit.add_argument("configs", nargs="+", metavar="CONFIG", help="run config(s); one job each")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=SET_HELP + "; applied to every config")
    submit.add_argument("-N", "--nodes", type=int, default=1, help="number of nodes")
    submit.add_argument("-G", "--gpus-per-node", type=int, default=8, help="GPUs (= tasks) per node")
    submit.add_argument("-A", "--account", default=None, help="SLURM account")
    submit.add_argument("-p", "--partition", default=None, help="SLURM partition")
    submit.add_argument("-q", "--qos", default=None, help="SLURM quality of service")
    submit.add_argument("-t", "--time", type=int, default=1200, help="time limit per job, in minutes")
    submit.add_argument("-C", "--constraint", default=None, help="SLURM node constraint, e.g. a GPU type")
    submit.add_argument("-c", "--cpus-per-task", type=int, default=10, help="CPUs per task (data-loading workers)")
    submit.add_argument("--mem-per-gpu", default=None, help="memory per GPU, e.g. 80G")
    submit.add_argument("--dump", default=os.environ.get("SPIDR_SUBMITIT_FOLDER", "submitit"),
                        help="folder for submitit logs and job information (env SPIDR_SUBMITIT_FOLDER)")
    submit.add_argument("--local", action="store_true",
                        help="run the job on this machine with submitit's local executor instead of SLURM (testing)")
    submit.set_defaults(handler=_submit)

    plot = subparsers.add_parser(
        "plot-training",
        help="plot loss, perplexity and active-codeword curves of pretraining or unit-LM runs (PNG files)",
        description="Plot the curves of one run, or of several runs in the same figures (e.g. SpidR vs DinoSR: "
        "codebook perplexity and active codewords per codebook over training), labelled by run directory name.",
        formatter_class=formatter,
    )
    plot.add_argument("run_dir", nargs="+", help="run directory holding metrics.jsonl (several to compare them)")
    plot.add_argument("--out", default=None, help="output folder; RUN_DIR/plots for one run, required for several")
    plot.set_defaults(handler=_plot)


def _train(args: argparse.Namespace) -> int:
    from spidr.config import load_config
    from spidr.train.checkpoint import FINAL_FILE
    from spidr.train.environment import detect_environment
    from spidr.train.loop import TrainingDivergedError, train

    cfg = load_config(args.config, args.overrides)
    try:
        outcome = train(cfg)
    except TrainingDivergedError as error:
        logger.error("%s", error)
        return 1
    if outcome == "completed" and detect_environment().is_main:  # (the result on stdout, as lm-train)
        print(f"trained model: {Path(cfg.run.run_dir) / FINAL_FILE}")
    return 0 if outcome == "completed" else EXIT_STOPPED


def _submit(args: argparse.Namespace) -> int:
    from spidr.config import load_config
    from spidr.train.slurm import SlurmOptions, submit

    options = SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        account=args.account,
        partition=args.partition,
        qos=args.qos,
        time_min=args.time,
        constraint=args.constraint,
        cpus_per_task=args.cpus_per_task,
        mem_per_gpu=args.mem_per_gpu,
        dump_dir=args.dump,
    )
    jobs = submit([load_config(path, args.overrides) for path in args.configs], options,
                  cluster="local" if args.local else "slurm")
    for job in jobs:
        print(job.job_id)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from spidr.train.plot import plot_training

    for path in plot_training(args.run_dir, args.out):
        print(path)
    return 0
