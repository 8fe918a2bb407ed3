"""``spidr`` command line: thin subcommands, each parsing arguments and calling one library function.

Each area of the library registers its subcommands with a ``register(subparsers)`` function (its ``commands.py``
module, or ``eval.pipeline_commands``, ``lm.eval_commands``, ``demo``, ``learning_curve``); heavy imports
happen inside the handlers so ``spidr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
from collections.abc import Mapping

from spidr import demo, learning_curve
from spidr.child_processes import ChildProcessesFailedError, end_with_torchrun
from spidr.cli_types import outputs_held_until_done, processes_started_together
from spidr.corpus import commands as corpus_commands
from spidr.data import commands as data_commands
from spidr.eval import commands as eval_commands
from spidr.eval import pipeline_commands
from spidr.extras import MissingExtraError
from spidr.help_format import HelpFormatter
from spidr.lm import commands as lm_commands
from spidr.lm import eval_commands as lm_eval_commands
from spidr.models import commands as model_commands
from spidr.train import commands as train_commands
from spidr.training_stopped import EXIT_INTERRUPTED, EXIT_STOPPED, TrainingStoppedError

AREAS = (data_commands, train_commands, model_commands, pipeline_commands, eval_commands, corpus_commands,
         lm_commands, lm_eval_commands, demo, learning_curve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spidr",
        description="SpidR / DinoSR self-supervised speech models: pretrain, load, extract, evaluate, and model "
        "spoken language on their units.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in AREAS:
        area.register(subparsers)
    return parser


def configure_logging(*, verbose: bool = False) -> None:
    """spidr's log lines (INFO, or DEBUG with ``verbose``) on stderr: for the commands, and for a submitted job's
    process, which submitit starts without them."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def refuse_several_processes(command: str, env: Mapping[str, str] = os.environ) -> None:
    """Raise ``ValueError`` in each copy of a one-process command that torchrun or srun started several times: each
    would do the whole job into the same outputs, and one copy is refused by their lock while another does it all."""
    count = processes_started_together(env)
    if count > 1:
        raise ValueError(f"spidr {command} runs as one process, and this is one of {count} that torchrun or srun "
                         "started together: start it once (for several GPUs, one run per part of the input, each on "
                         "its own GPU and into its own output); only train, lm-train and extract run on several")


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))  # (pipe; socket)
    except (OSError, ValueError, AttributeError):  # (no fileno: captured by a test; no poll on this platform)
        return False


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # (--device's check imports torch while the arguments are parsed: seconds)
        print("spidr: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    configure_logging(verbose=args.verbose)
    end_with_torchrun()
    try:
        if not getattr(args, "several_processes", False):
            refuse_several_processes(args.command)
        with outputs_held_until_done():
            status = int(args.handler(args) or 0)
        sys.stdout.flush()  # (here, not at exit: a reader gone meanwhile is told below, as when the handler printed)
        return status
    except KeyboardInterrupt:
        # Ctrl-C outside a training (which takes the first one for a stop request): one line, not a traceback, and
        # the status a shell gives a command that Ctrl-C ended.
        print(f"spidr {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError as error:
        if _stdout_reader_gone():
            # The reader of the output went away (`spidr info CKPT | head -1`): what the command wrote stays, and
            # nothing was refused; no error line, and the status a shell gives a command that SIGPIPE ended.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's own flush at exit)
            return 128 + signal.SIGPIPE
        print(f"spidr {args.command}: error: {error.strerror or error}", file=sys.stderr)  # (another pipe's)
        return 2
    except ChildProcessesFailedError as error:  # (each child's own log holds its traceback)
        print(f"spidr {args.command}: error: {error}", file=sys.stderr)
        return 1
    except TrainingStoppedError as error:
        # Stopped by a signal after a checkpoint, as `spidr train` (exit 3): nothing failed.
        print(f"spidr {args.command}: stopped: {error}", file=sys.stderr)
        return EXIT_STOPPED
    except (ValueError, MissingExtraError) as error:
        # User errors (bad config, bad file, bad argument) get one clear line, not a traceback.
        print(f"spidr {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError) as error:
        # An output path the user named is in the way (a file where a folder goes, or the reverse) or not writable.
        in_the_way = isinstance(error, NotADirectoryError) or (
            isinstance(error, FileExistsError) and error.filename is not None and os.path.isfile(error.filename))
        # (a rename's destination, where there is one: the temporary file it came from is not what is in the way)
        print(f"spidr {args.command}: error: {error.filename2 or error.filename}: "
              f"{(error.strerror or str(error)).lower()}"
              + (" (a file is in the way of a folder)" if in_the_way else ""), file=sys.stderr)
        return 2
    except OSError as error:  # a read-only file system, a full disk, a quota: one line naming the file
        named = error.filename2 or error.filename
        where = f"{named}: " if named else ""
        print(f"spidr {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        # A library's wrapping of an OS error (DataLoader workers past `ulimit -n`, raised `from None`): one line
        # and the status of a refused run, not a traceback and the status of a diverged one (1).
        if not isinstance(error.__cause__ or error.__context__, OSError):
            raise
        print(f"spidr {args.command}: error: {error}", file=sys.stderr)
        return 2
