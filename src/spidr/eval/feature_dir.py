"""A directory of per-utterance feature files seen as a lazy ``{relative path without extension: (T, D)}`` mapping.

This is the layout fastabx's ``Dataset.from_item`` and the ZeroSpeech submission format use: one ``.npy`` or ``.pt``
file per audio file, mirroring the corpus tree, whose path relative to the root minus the extension is the item
file's ``#file``. Files are read only when accessed, so evaluation code can stream them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

EXTENSIONS = (".npy", ".pt")


class FeatureDirectory(Mapping[str, np.ndarray | torch.Tensor]):
    """Lazy mapping over the ``.npy`` / ``.pt`` files below ``root`` (searched recursively)."""

    def __init__(self, root: str | Path, *, extensions: tuple[str, ...] = EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"feature directory {self.root} does not exist or is not a directory")
        paths: dict[str, Path] = {}
        for extension in extensions:
            for path in sorted(self.root.rglob(f"*{extension}")):
                key = str(path.relative_to(self.root))[: -len(extension)]
                if key in paths:
                    raise ValueError(f"feature directory {self.root}: both {paths[key].name} and {path.name} exist")
                paths[key] = path
        if not paths:
            raise ValueError(f"feature directory {self.root} has no {' or '.join(extensions)} files")
        self.paths = dict(sorted(paths.items()))

    def __getitem__(self, key: str) -> np.ndarray | torch.Tensor:
        return load_feature_file(self.paths[key])

    def frame_count(self, key: str) -> int:
        """T of one file without reading its data (``.npy`` header; a ``.pt`` is loaded)."""
        path = self.paths[key]
        if path.suffix != ".npy":
            return int(self[key].shape[0])
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape  # maps the file: reads the header only
        except ValueError as error:
            raise ValueError(f"{path}: not a plain numeric .npy array ({error})") from None
        return int(shape[0]) if shape else 0

    def __contains__(self, key: object) -> bool:
        return key in self.paths

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def load_feature_file(path: str | Path) -> np.ndarray | torch.Tensor:
    """Read one feature array from ``.npy`` (no pickles) or ``.pt`` (weights only: a single tensor)."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"{path}: not a plain numeric .npy array ({error})") from None
    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path}: expected a single tensor, found {type(value).__name__}")
    return value
