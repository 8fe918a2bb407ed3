"""Folders that a spidr command marks while it writes them (``.<command>-in-progress``): a reader refuses a folder
still marked, whose sets may be missing, empty or partly written (the writer was killed, failed or still runs), and
rerunning the writing command completes it."""

from __future__ import annotations

from pathlib import Path


def refuse_unfinished(folder: str | Path, marker: str, command: str) -> None:
    """Raise ``ValueError`` if ``folder`` holds ``marker``, the in-progress marker of ``spidr <command>``."""
    if (Path(folder) / marker).exists():
        raise ValueError(f"{folder} is an unfinished spidr {command} run (it holds {marker}: killed, failed or still "
                         f"running): rerun the same {command} command to complete it")
