"""K-means units: fit centroids on a seeded sample of frames, save/load them, assign frames to units.

Fitting uses scikit-learn's ``MiniBatchKMeans`` (k-means++ init, seeded, so a given sample and seed always give the
same centroids). The sample is a uniform random subset of at most ``max_frames`` frames over all files, drawn in one
streaming pass (every frame gets a seeded random key and the smallest keys are kept), so memory stays bounded by
``max_frames`` whatever the corpus size. Centroids are saved as a safetensors file (tensor ``centroids``, (K, D)
float32, plus string metadata), never as a pickle. Assignment is the nearest centroid in Euclidean distance,
computed in batches as ``argmin_k ‖c_k‖² − 2·x·c_k``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from spidr.extras import import_extra

logger = logging.getLogger(__name__)

CENTROIDS_KEY = "centroids"


def sample_frames(features: Mapping[str, object], *, max_frames: int | None, seed: int = 0) -> np.ndarray:
    """Uniform seeded sample of at most ``max_frames`` frames (all of them if None) → (N, D) float32.

    Files are visited in sorted key order, so the sample depends only on the data, ``max_frames`` and ``seed``.
    """
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    part_keys: list[np.ndarray] = []
    buffered = 0
    for name in sorted(features):
        frames = _as_array(features[name], name)
        if parts and frames.shape[1] != parts[0].shape[1]:
            raise ValueError(f"features of {name!r} have dimension {frames.shape[1]}, others {parts[0].shape[1]}")
        parts.append(frames)
        part_keys.append(rng.random(frames.shape[0]))
        buffered += frames.shape[0]
        if max_frames is not None and buffered > 2 * max_frames:  # prune now and then: linear time, bounded memory
            parts, part_keys = _smallest_keys(parts, part_keys, max_frames)
            buffered = parts[0].shape[0]
    if not parts or buffered == 0:
        raise ValueError("no frame to fit k-means on")
    if max_frames is not None:
        parts, part_keys = _smallest_keys(parts, part_keys, max_frames)
    return np.concatenate(parts)


def _smallest_keys(
    parts: list[np.ndarray], part_keys: list[np.ndarray], count: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Keep the ``count`` frames with the smallest keys, in their original order."""
    frames, keys = np.concatenate(parts), np.concatenate(part_keys)
    if keys.size > count:
        keep = np.sort(np.argpartition(keys, count - 1)[:count])
        frames, keys = frames[keep], keys[keep]
    return [frames], [keys]


def _as_array(value: object, name: str) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"features of {name!r} have shape {array.shape}: expected (T, D)")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"features of {name!r} contain non-finite values")
    return array


def fit_kmeans(
    frames: np.ndarray,
    num_units: int,
    *,
    seed: int = 0,
    batch_size: int = 10_000,
    max_iter: int = 100,
    n_init: int = 3,
) -> np.ndarray:
    """K-means centroids (num_units, D) float32 of (N, D) frames with ``MiniBatchKMeans`` (reproducible under seed)."""
    cluster = import_extra("sklearn.cluster", extra="eval", purpose="k-means")

    if frames.ndim != 2:
        raise ValueError(f"frames must be (N, D), got shape {frames.shape}")
    if not 1 <= num_units <= frames.shape[0]:
        raise ValueError(f"num_units = {num_units} is invalid: expected 1 ≤ num_units ≤ number of frames "
                         f"({frames.shape[0]}); sample more frames or ask for fewer units")
    model = cluster.MiniBatchKMeans(
        n_clusters=num_units,
        init="k-means++",
        batch_size=batch_size,
        max_iter=max_iter,
        n_init=n_init,
        random_state=seed,
        compute_labels=False,
    )
    model.fit(frames)
    logger.info("k-means: %d units fitted on %d frames (inertia %.4g)", num_units, frames.shape[0], model.inertia_)
    return model.cluster_centers_.astype(np.float32)


def save_centroids(
    path: str | Path, centroids: np.ndarray | torch.Tensor, *, metadata: dict[str, str] | None = None
) -> None:
    """Write centroids (K, D) to a safetensors file (tensor ``centroids``; ``metadata`` values must be strings)."""
    from safetensors.torch import save_file

    tensor = torch.as_tensor(np.asarray(centroids, dtype=np.float32)).contiguous()
    if tensor.ndim != 2:
        raise ValueError(f"centroids must be (K, D), got shape {tuple(tensor.shape)}")
    save_file({CENTROIDS_KEY: tensor}, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_centroids(path: str | Path) -> torch.Tensor:
    """Read centroids (K, D) float32 from a safetensors file written by ``save_centroids`` (or a plain ``.npy``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"centroids file {path} does not exist")
    if path.suffix == ".npy":
        tensor = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a safetensors file ({error})") from None
        if CENTROIDS_KEY not in tensors:
            raise ValueError(f"{path}: no {CENTROIDS_KEY!r} tensor (found {sorted(tensors)})")
        tensor = tensors[CENTROIDS_KEY]
    if tensor.ndim != 2 or not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{path}: centroids must be a finite (K, D) matrix, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float32)


def assign_units(
    features: np.ndarray | torch.Tensor, centroids: torch.Tensor, *, batch_size: int = 8192
) -> np.ndarray:
    """Nearest-centroid unit of every frame: (T, D) → (T,) int64."""
    frames = torch.as_tensor(features, dtype=torch.float32)
    if frames.ndim != 2 or frames.shape[1] != centroids.shape[1]:
        raise ValueError(f"features of shape {tuple(frames.shape)} do not match centroids of dimension "
                         f"{centroids.shape[1]}")
    squared_norms = (centroids * centroids).sum(1)
    units = torch.empty(frames.shape[0], dtype=torch.int64)
    for start in range(0, frames.shape[0], batch_size):
        batch = frames[start : start + batch_size]
        units[start : start + batch.shape[0]] = (squared_norms[None, :] - 2.0 * batch @ centroids.T).argmin(1)
    return units.numpy()


def assign_directory(
    features: Mapping[str, object], centroids: torch.Tensor
) -> Iterable[tuple[str, np.ndarray]]:
    """``(name, units)`` for every file of ``features``, in sorted order, one file in memory at a time."""
    for name in sorted(features):
        yield name, assign_units(_as_array(features[name], name), centroids)
