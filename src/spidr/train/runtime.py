"""Process-level set-up shared by the trainers (pretraining and the unit LM): numerics, seeding, ``config.json``
and the stop signals that make a run save a checkpoint and exit cleanly."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spidr.atomic_files import write_atomically
from spidr.distributed import AgreedValueError
from spidr.folder_lock import folder_lock
from spidr.train.environment import broadcast_from_main

logger = logging.getLogger(__name__)

# Kill/time-out/pre-emption notices and Ctrl-C: save, then exit (a second Ctrl-C stops at once, without saving).
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


def stop_signals() -> set[signal.Signals]:
    """``STOP_SIGNALS`` of this platform."""
    return {getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)}  # SIGUSR1/2: POSIX only


def configure_numerics(device: torch.device, *, deterministic: bool) -> None:
    """Full-precision fp32 matmuls (no TF32), as the reference; optional deterministic algorithms."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False  # variable shapes: autotuning would never pay off
    torch.set_float32_matmul_precision("highest")
    if deterministic:
        torch.use_deterministic_algorithms(True)


# torch's per-backend matmul/conv precisions (torch >= 2.9: ``torch.backends.<name>.fp32_precision``)
_FP32_PRECISIONS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
                    "mkldnn.rnn")


def _backend(name: str) -> Any:
    backend: Any = torch.backends
    for part in filter(None, name.split(".")):
        backend = getattr(backend, part, None)
    return backend


@contextlib.contextmanager
def configured_numerics(device: torch.device, *, deterministic: bool) -> Iterator[None]:
    """``configure_numerics`` inside the block; the process's own settings are back after it: a notebook that
    trains goes on with the precision and determinism it chose."""
    def readable(getter: Any) -> Any:
        try:
            return getter()
        except RuntimeError:  # (torch refuses to read a legacy flag that its per-backend API contradicts)
            return None

    legacy = (readable(torch.get_float32_matmul_precision), readable(lambda: torch.backends.cuda.matmul.allow_tf32),
              readable(lambda: torch.backends.cudnn.allow_tf32))
    # Every per-backend value, inherited ones ('none') included: the legacy setters write several of them at once.
    precisions = {name: _backend(name).fp32_precision for name in _FP32_PRECISIONS
                  if hasattr(_backend(name), "fp32_precision")}
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    try:
        configure_numerics(device, deterministic=deterministic)
        yield
    finally:
        deterministic_before, warn_only, benchmark = saved
        precision, cuda_tf32, cudnn_tf32 = legacy
        if precision is not None:
            torch.set_float32_matmul_precision(precision)
        if cuda_tf32 is not None and readable(lambda: torch.backends.cuda.matmul.allow_tf32) != cuda_tf32:
            torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
        if cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
        for name, value in precisions.items():  # (the root first, then each backend, then its operations)
            _backend(name).fp32_precision = value
        torch.use_deterministic_algorithms(deterministic_before, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


def hold_run_folder(run_dir: Path, cleanup: contextlib.ExitStack, *, is_main: bool) -> None:
    """The main rank holds ``run_dir/.lock`` until ``cleanup`` closes (``spidr.folder_lock``), so that a second run
    of the same config (started twice, or resumed while the first still lives) is refused instead of writing the
    same checkpoints and metrics. Every rank raises the refusal together (rank 0's answer is broadcast): a rank
    failing alone would leave the others waiting in a collective."""
    refusal = None
    if is_main:
        try:
            cleanup.enter_context(folder_lock(run_dir, f"the training run in {run_dir}"))
        except ValueError as error:  # in use
            refusal = str(error)
        except OSError as error:  # not a folder this process can write in
            refusal = f"cannot use the run directory {run_dir}: {error}"
    refusal = broadcast_from_main(refusal)
    if refusal is not None:
        raise AgreedValueError(refusal)


def write_config(config: dict[str, Any], run_dir: Path) -> None:
    """``<run_dir>/config.json``; a different existing one (a resumed run with edited settings) is reported."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        changed = sorted(name for name, _, _ in config_diff(old, config))
        if changed:
            logger.warning("config differs from the run's previous config.json in: %s", ", ".join(changed))
    write_atomically(path, json.dumps(config, indent=2) + "\n")


def load_resumed_weights(model: torch.nn.Module, weights: dict[str, Any], *, saved_config: dict[str, Any],
                         config: dict[str, Any], path: str | Path, sections: tuple[str, ...] = ("model",),
                         run_name_key: str = "run.wandb_name") -> None:
    """``model.load_state_dict(weights)`` for a resume; weights of another shape (the config's model was edited
    since the checkpoint was saved) raise a ``ValueError`` naming the settings of ``sections`` that changed and the
    setting that names another run (``run_name_key``: the pretraining config's, or the LM config's ``run.name``)."""
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        changed = [f"{name} = {new!r} (the checkpoint's: {old!r})" for section in sections
                   for name, old, new in config_diff(saved_config.get(section), config.get(section), f"{section}.")]
        if changed:
            raise ValueError(f"{path} holds weights of another shape than this config builds; changed since it was "
                             f"saved: {'; '.join(sorted(changed))}. Restore those settings to resume it, or choose "
                             f"another {run_name_key} to start a new run") from None
        raise ValueError(f"{path} holds weights of another shape than this config builds, though no setting of "
                         f"{', '.join(sections)} changed (a size taken from the data, such as an LM vocabulary with "
                         f"data.num_units = 0, may have); choose another {run_name_key} to start a new run") from None


class _Absent:
    """Stands for the value of a setting one side of a ``config_diff`` does not hold (its repr is its label)."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __repr__(self) -> str:
        return self.label


NOT_RECORDED = _Absent("(not recorded)")  # a setting the old config lacks (added to spidr after it was saved)
NO_SUCH_SETTING = _Absent("(no such setting now)")  # a setting the old config has and the new one does not


def config_diff(old: Any, new: Any, prefix: str = "", *, defaults: Any = None) -> list[tuple[str, Any, Any]]:
    """(dotted name, old value, new value) of every setting that differs between two nested config dicts; a key one
    side lacks has ``NOT_RECORDED`` or ``NO_SUCH_SETTING`` as its value there. With ``defaults`` (the config's
    defaults, nested as ``new``), a key that ``old`` lacks counts only when ``new`` moves it off its default: it
    is a setting added to spidr after ``old`` was saved, which ``old`` was made with."""
    if isinstance(old, dict) and isinstance(new, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        out = []
        for key in new:
            name = f"{prefix}{key}"
            if key not in old:
                if key not in defaults or new[key] != defaults[key]:
                    out.append((name, NOT_RECORDED, new[key]))
            else:
                out += config_diff(old[key], new[key], f"{name}.", defaults=defaults.get(key))
        return out + [(f"{prefix}{key}", old[key], NO_SUCH_SETTING) for key in old if key not in new]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 -- code may use the legacy global RNG; seed it too
    torch.manual_seed(seed)


# With several ranks, the most steps before they read whether one was signalled to stop (pretraining with
# run.host_sync = "log" reads it at least this often, one host-device sync each; other loops read it every step).
STOP_POLL_STEPS = 10


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT (Ctrl-C); the loop saves a checkpoint and returns at the next
    step boundary. A second Ctrl-C raises ``KeyboardInterrupt`` at once, as Python does by default."""

    def __init__(self) -> None:
        self.requested = False
        self._child_handler: Any = None  # the SIGCHLD handler replaced by _leave_worker_deaths_to_the_loader

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        again = "; Ctrl-C again stops at once, without saving" if signum == signal.SIGINT else ""
        logger.warning("received %s: will save a checkpoint and stop after this step (with several processes, "
                       "at the step they agree on, within %d steps)%s", signal.Signals(signum).name,
                       STOP_POLL_STEPS, again)
        self.requested = True
        self._leave_worker_deaths_to_the_loader()

    def _leave_worker_deaths_to_the_loader(self) -> None:
        """torch's SIGCHLD handler raises a data worker's death wherever the main thread is, in the middle of a
        step or a save. After a stop request, such a death is the signal's doing (it reached a worker that had not
        yet come to ignore it: ``spidr.data.loader``), and is left to the loader's next read, which the trainer
        takes for the stop (``spidr.train.loop``)."""
        child = getattr(signal, "SIGCHLD", None)  # POSIX only
        handler = signal.getsignal(child) if child is not None else None
        if self._child_handler is not None or not callable(handler):
            return
        self._child_handler = handler

        def quiet(signum: int, frame: Any) -> None:
            with contextlib.suppress(RuntimeError):
                handler(signum, frame)

        signal.signal(child, quiet)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in stop_signals()}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._child_handler is not None:
                signal.signal(signal.SIGCHLD, self._child_handler)
                self._child_handler = None
