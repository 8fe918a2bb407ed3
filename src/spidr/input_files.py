"""One check for every reader of a named input file: it exists and is a file. A folder given where a file is
expected is named as a folder (the old message, "does not exist", sent the user looking for a missing path)."""

from __future__ import annotations

from pathlib import Path


def why_not_a_file(path: str | Path) -> str | None:
    """None when ``path`` is a readable-looking regular file, else what it is instead ("does not exist", ...)."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return "is a folder, not a file"
    if path.exists():
        return "is not a regular file"
    return "does not exist"


def existing_file(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` as a ``Path`` when it is a file; otherwise a ``ValueError`` "<what> <path> <why>[: <hint>]".

    ``hint`` is added only for a folder (e.g. which file inside it to pass)."""
    path = Path(path)
    why = why_not_a_file(path)
    if why is None:
        return path
    raise ValueError(f"{what} {path} {why}" + (f": {hint}" if hint and path.is_dir() else ""))
