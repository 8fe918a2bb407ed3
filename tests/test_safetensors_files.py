"""Safetensors files are byte-for-byte reproducible, and read back as the library writes them."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from spidr.safetensors_files import save_safetensors


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """The library wrote the metadata's keys in a random order: exports and centroids differed from run to run."""
    tensors = {f"t{i}": torch.arange(i + 3, dtype=torch.float32) for i in range(5)} | {"b": torch.ones(2, 2).bool()}
    metadata = {f"key{i}": f"value {i}" for i in range(12)}
    files = []
    for i in range(6):
        path = tmp_path / f"{i}.safetensors"
        save_safetensors(tensors, path, dict(reversed(metadata.items())) if i % 2 else metadata)
        files.append(path.read_bytes())
    assert all(data == files[0] for data in files)
    assert int.from_bytes(files[0][:8], "little") % 8 == 0
    loaded = load_file(tmp_path / "0.safetensors")
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as handle:
        assert handle.metadata() == metadata


def test_an_export_and_centroids_are_reproducible_files(tmp_path):
    from spidr.eval.kmeans import save_centroids
    from spidr.models import export_safetensors
    from test_models_dinosr import tiny_model

    model = tiny_model("spidr")
    for name in ("a", "b"):
        export_safetensors(model, tmp_path / f"{name}.safetensors")
        save_centroids(tmp_path / f"{name}.centroids.safetensors", torch.eye(4, 8),
                       metadata={"layer": 6, "kmeans": 4, "seed": 0, "bench": "x", "features": "y"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert (tmp_path / "a.centroids.safetensors").read_bytes() == (tmp_path / "b.centroids.safetensors").read_bytes()
