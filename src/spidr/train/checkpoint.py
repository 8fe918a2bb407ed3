"""Training checkpoints: atomic files in the run directory, keep-latest purge, and RNG state capture.

Files are ``step_<N>.pt`` every ``save_interval`` steps and ``final.pt`` at the end (spec §8.1). Each is written
to a hidden temporary file, flushed to disk and renamed, so a crash or a kill mid-write never leaves a
truncated ``step_<N>.pt``: the previous checkpoint stays the latest loadable one. Everything stored is a tensor
or a primitive, so every file loads with ``torch.load(..., weights_only=True)``; the ``"model"`` entry is the
unwrapped state dict (no ``module.`` / ``_orig_mod.`` prefix) that the official loaders read.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spidr.atomic_files import failed_write

logger = logging.getLogger(__name__)

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
FINAL_FILE = "final.pt"
TEMP_PREFIX = ".tmp-"
REQUIRED_KEYS = ("model", "optimizer", "step")


class Checkpointer:
    """Saves and finds the training checkpoints of one run directory (only the writing rank calls ``save``)."""

    def __init__(self, run_dir: str | Path, *, save_interval: int, keep_latest: int = -1) -> None:
        self.run_dir = Path(run_dir)
        self.save_interval = save_interval
        self.keep_latest = keep_latest
        self._resumed_final_step: int | None = None  # the step of a final.pt this run resumed from

    def should_save(self, step: int) -> bool:
        return step % self.save_interval == 0

    def path_for(self, step: int | None) -> Path:
        """``step_<step>.pt``, or ``final.pt`` for ``None``."""
        return self.run_dir / (FINAL_FILE if step is None else f"step_{step}.pt")

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint files, oldest first: numeric steps in order, then ``final.pt``."""
        if not self.run_dir.is_dir():
            return []
        steps = sorted(
            (int(match.group(1)), path)
            for path in self.run_dir.iterdir()
            if (match := STEP_FILE.match(path.name)) and path.is_file()
        )
        files = [path for _, path in steps]
        final = self.run_dir / FINAL_FILE
        if final.is_file():
            files.append(final)
        return files

    def save(self, state: dict[str, Any], *, step: int | None) -> Path:
        """Write ``state`` atomically to ``step_<step>.pt`` (``final.pt`` for ``None``), then purge old files."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._resumed_final_step is not None:
            # Done here, not when resuming: by now every rank has read final.pt (the state saved is collective).
            # Before a new final.pt too: a continuation that ends before its first step save overwrote the model.
            self._reopen_final(self._resumed_final_step)
            self._resumed_final_step = None
        path = self.path_for(step)
        _remove_stale_temporaries(self.run_dir)
        atomic_torch_save(state, path)
        logger.info("saved checkpoint %s", path)
        self._purge(keep=path)
        return path

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads and holds a full training state, or None when there is none.

        A file that fails to load (for instance one copied in by hand and truncated) is reported and skipped in
        favour of the previous one; temporary files of interrupted writes are never considered.
        """
        for path in reversed(self.checkpoints()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # any unreadable file: fall back to the previous one
                logger.warning("skipping unreadable checkpoint %s: %s", path, error)
                continue
            missing = [key for key in REQUIRED_KEYS if key not in state] if isinstance(state, dict) else REQUIRED_KEYS
            if missing:
                logger.warning("skipping %s: not a training checkpoint (missing %s)", path, ", ".join(missing))
                continue
            if path.name == FINAL_FILE:
                self._resumed_final_step = read_int(state["step"])
                logger.info("resuming from %s: the run had finished at step %d (it goes on if optimizer.max_steps is "
                            "above that)", path, self._resumed_final_step)
            return path, state
        return None

    def _reopen_final(self, step: int) -> None:
        """A finished run goes on (``optimizer.max_steps`` raised): its ``final.pt`` becomes ``step_<step>.pt``,
        so that the continuation's checkpoints rank after it (``final.pt`` always ranks last: left in place, it
        would be resumed from again after a kill, and ``keep_latest`` would purge every newer checkpoint)."""
        final, renamed = self.run_dir / FINAL_FILE, self.path_for(step)
        if not final.is_file():
            return
        if renamed.is_file():
            final.unlink()
        else:
            os.replace(final, renamed)
        logger.info("the run goes on past step %d: %s is now %s", step, final.name, renamed.name)

    def purge_after_final(self) -> None:
        """Remove what ``keep_latest`` leaves out beside a ``final.pt`` that is in place: a kill between its rename
        and the purge that follows left one checkpoint more than allowed, and the rerun has nothing to save."""
        if (self.run_dir / FINAL_FILE).is_file():
            self._purge(keep=self.run_dir / FINAL_FILE)

    def _purge(self, *, keep: Path) -> None:
        if self.keep_latest < 1:
            return
        for path in self.checkpoints()[: -self.keep_latest]:
            if path == keep:  # ranked below a newer file that does not load: never the one just written
                continue
            path.unlink(missing_ok=True)
            logger.info("removed old checkpoint %s (run.keep_latest = %d)", path, self.keep_latest)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync it, rename it over ``path``, fsync the
    directory: readers see either the old file or the complete new one."""
    temporary = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        failed = failed_write(error, path)  # (a full disk: told as the OSError, naming the checkpoint)
        if failed is not None:
            raise failed from error
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporaries left by a writer that was killed (ours are removed on any exception)."""
    for path in run_dir.glob(f"{TEMP_PREFIX}*"):
        logger.warning("removing %s, left by an interrupted checkpoint write", path)
        path.unlink(missing_ok=True)


def read_int(value: Any) -> int:
    """An int from a checkpoint entry stored as a (1,) int64 tensor (official format) or a plain int."""
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def int_tensor(value: int) -> torch.Tensor:
    """The official encoding of ``step`` and ``epoch``: an int64 tensor of shape (1,)."""
    return torch.tensor([value], dtype=torch.int64)


# --------------------------------------------------------------------------------------------------------------
# RNG state of one process, in weights_only-loadable types
# --------------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states of this process."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)  # noqa: NPY002 -- the legacy global RNG is what we save
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
