"""A directory of per-utterance feature files seen as a lazy ``{relative path without extension: (T, D)}`` mapping.

This is the layout fastabx's ``Dataset.from_item`` and the ZeroSpeech submission format use: one ``.npy`` or ``.pt``
file per audio file, mirroring the corpus tree, whose path relative to the root minus the extension is the item
file's ``#file``. Files are read only when accessed, so evaluation code can stream them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from spidr.data.manifest import PackedStrings

EXTENSIONS = (".npy", ".pt")


class FeatureDirectory(Mapping[str, np.ndarray | torch.Tensor]):
    """Lazy mapping over the ``.npy`` / ``.pt`` files below ``root`` (searched recursively).

    The keys are kept sorted as packed strings (``spidr.data.manifest.PackedStrings``) and looked up by bisection:
    a directory of 281k feature files costs their names' bytes, not a Path object per file.
    """

    def __init__(self, root: str | Path, *, extensions: tuple[str, ...] = EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"feature directory {self.root} does not exist or is not a directory")
        self.extensions = extensions
        found: list[tuple[str, int]] = []
        for folder, _, files in os.walk(self.root):
            relative = os.path.relpath(folder, self.root)
            prefix = "" if relative == "." else relative + "/"
            for name in files:
                for code, extension in enumerate(extensions):
                    if name.endswith(extension) and len(name) > len(extension):
                        found.append((prefix + name[: -len(extension)], code))
                        break
        if not found:
            raise ValueError(f"feature directory {self.root} has no {' or '.join(extensions)} files")
        found.sort()
        for (key, a), (other, b) in itertools.pairwise(found):
            if key == other:
                raise ValueError(f"feature directory {self.root}: both {key}{extensions[a]} and {key}{extensions[b]} "
                                 "exist")
        self.keys_ = PackedStrings.from_strings(key for key, _ in found)
        self.codes = np.asarray([code for _, code in found], dtype=np.int8)

    def _index(self, key: object) -> int:
        if not isinstance(key, str):
            return -1
        low, high = 0, len(self.keys_)
        while low < high:
            middle = (low + high) // 2
            if self.keys_[middle] < key:
                low = middle + 1
            else:
                high = middle
        return low if low < len(self.keys_) and self.keys_[low] == key else -1

    def path(self, key: str) -> Path:
        """The file holding ``key``'s features."""
        index = self._index(key)
        if index < 0:
            raise KeyError(key)
        return self.root / f"{key}{self.extensions[self.codes[index]]}"

    def __getitem__(self, key: str) -> np.ndarray | torch.Tensor:
        return load_feature_file(self.path(key))

    def frame_count(self, key: str) -> int:
        """T of one file without reading its data (``.npy`` header; a ``.pt`` is loaded)."""
        path = self.path(key)
        if path.suffix != ".npy":
            return int(self[key].shape[0])
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape  # maps the file: reads the header only
        except ValueError as error:
            raise ValueError(f"{path}: not a plain numeric .npy array ({error})") from None
        return int(shape[0]) if shape else 0

    def __contains__(self, key: object) -> bool:
        return self._index(key) >= 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


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
