"""Value types and checks of command-line options shared by spidr's commands: a bad value is refused with the
option's name and what was expected, before any work starts."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from spidr.folder_lock import output_lock

DEVICE_HELP = "auto (cuda when this machine has a GPU, else cpu), cpu, cuda or cuda:N"


def device(text: str) -> str:
    """A torch device that this machine has: "cpu", "cuda", "cuda:1", ...; "auto": "cuda" where CUDA is
    available, else "cpu" (the default of every command that runs a model, as of ``spidr train``)."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: expected cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: spidr runs on cpu or cuda (cuda:N)")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return text


def positive_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return value


def positive_int(text: str) -> int:
    value = _parse(text, int, "an integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return value


def _parse(text: str, kind: type, name: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None


def extensions(text: str) -> tuple[str, ...]:
    """``--ext``: comma-separated audio file extensions, each with its dot (``wav`` is read as ``.wav``)."""
    found = tuple(e if e.startswith(".") else f".{e}" for e in (part.strip() for part in text.split(",")) if e)
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} names no extension; expected e.g. .wav,.flac")
    for extension in found:
        # ('*.wav', as find or ls take it, would otherwise become the extension '.*.wav' and match nothing)
        if extension == "." or re.search(r"[\s*?\[\]/\\]", extension):
            raise argparse.ArgumentTypeError(f"{text!r}: {extension!r} is not a file extension; expected extensions "
                                             "separated by commas, without patterns or spaces, e.g. .wav,.flac")
    return found


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


class _HeldOutputs(contextlib.ExitStack):
    """The locks of one command's outputs, and the outputs they hold (absolute paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: set[str] = set()


_held_outputs: contextvars.ContextVar[_HeldOutputs | None] = contextvars.ContextVar("held_outputs", default=None)


@contextlib.contextmanager
def outputs_held_until_done() -> Iterator[None]:
    """The block of one command's run (``spidr.cli.main``): the outputs that ``check_new_output`` accepts in it
    stay locked until it ends."""
    with _HeldOutputs() as held:
        token = _held_outputs.set(held)
        try:
            yield
        finally:
            _held_outputs.reset(token)


def check_new_output(path: str | Path, *, overwrite: bool, unfinished_marker: str | None = None) -> Path:
    """``path`` as a Path, refused when it exists (a file, or a folder holding anything) unless ``overwrite``:
    a rerun must not silently replace an earlier result. Inside ``outputs_held_until_done`` (every command's run),
    the output is first locked until the command ends, so that a second start of the command is refused at once
    instead of computing alongside and replacing the first one's result with its own. A folder holding
    ``unfinished_marker`` (what a killed or failed run of the command left) is written again; the marker is looked
    for under the lock, where a running command's own marker can no longer be taken for a dead one's."""
    path = Path(path)
    held = _held_outputs.get()
    if held is not None:
        place = os.path.abspath(path)
        if place in held.paths:  # (its own lock would refuse it as another process's)
            raise ValueError(f"{path} is named twice as an output of this command; give each output its own path")
        held.enter_context(output_lock(path, f"the command that writes {path}"))
        held.paths.add(place)
    if unfinished_marker is not None and (path / unfinished_marker).exists():
        overwrite = True
    if not overwrite and (path.is_file() or (path.is_dir() and any(path.iterdir()))):
        raise ValueError(f"output {path} already exists; pass --overwrite to replace it")
    return path


def processes_started_together(env: Mapping[str, str] = os.environ) -> int:
    """How many copies of this process torchrun or an srun step started (1 outside them)."""
    text = env.get("WORLD_SIZE") if "LOCAL_RANK" in env else (
        env.get("SLURM_STEP_NUM_TASKS") if "SLURM_PROCID" in env else None)
    return int(text) if text is not None and text.isdigit() else 1
