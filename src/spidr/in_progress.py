"""Folders that a spidr command marks while it writes them (``.<command>-in-progress``): a reader refuses a folder
still marked, whose sets may be missing, empty or partly written (the writer was killed, failed or still runs), and
rerunning the writing command completes it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

# In a Hugging Face directory while ``spidr export --format hf`` writes it (a reader refuses it; the rerun writes it).
HF_EXPORT_IN_PROGRESS = ".export-in-progress"


@contextlib.contextmanager
def marked_in_progress(folder: str | Path, marker: str) -> Iterator[None]:
    """Hold ``marker`` in ``folder`` (made) while the block writes there; it is removed only when the block ends
    without an error, so that a failed or killed writer leaves the folder refused to its readers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / marker).touch()
    yield
    (folder / marker).unlink()


def refuse_unfinished(folder: str | Path, marker: str, command: str) -> None:
    """Raise ``ValueError`` if ``folder`` holds ``marker``, the in-progress marker of ``spidr <command>``."""
    if (Path(folder) / marker).exists():
        raise ValueError(f"{folder} is an unfinished spidr {command} run (it holds {marker}: killed, failed or still "
                         f"running): rerun the same {command} command to complete it")
