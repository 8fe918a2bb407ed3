"""K-means units: fit centroids on a seeded sample of frames, save/load them, assign frames to units.

Fitting uses scikit-learn's ``MiniBatchKMeans`` (k-means++ init, seeded, so a given sample and seed always give the
same centroids). The sample is a uniform random subset of at most ``max_frames`` frames over all files (every
frame gets a seeded random key and the smallest keys are kept), drawn in two streaming passes so that memory is
the sample itself whatever the corpus size. Centroids are saved as a safetensors file (tensor ``centroids``,
(K, D) float32, plus string metadata), never as a pickle. Assignment is the nearest centroid in Euclidean
distance, as float64 computes ``argmin_k ‖c_k‖² − 2·x·c_k`` (``spidr.eval.nearest_centroid``), one file in memory
at a time.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from spidr.atomic_files import replaced_when_done
from spidr.eval.nearest_centroid import NearestCentroid
from spidr.extras import import_extra
from spidr.input_files import existing_file

logger = logging.getLogger(__name__)

CENTROIDS_KEY = "centroids"


def sample_frames(features: Mapping[str, object], *, max_frames: int | None, seed: int = 0) -> np.ndarray:
    """Uniform seeded sample of at most ``max_frames`` frames (all of them if None) → (N, D) float32.

    Files are visited in sorted key order, so the sample depends only on the data, ``max_frames`` and ``seed``.
    Two passes: the first draws a key per frame and keeps the ``max_frames`` smallest (16 bytes per kept frame;
    a mapping with a ``frame_count(key)`` method, such as ``FeatureDirectory``, is not even read), the second reads
    the chosen frames of each file into the output (through ``read_rows(key, rows)`` where the mapping has it: only
    those frames are read). Memory is the sample plus one file, whatever the corpus size.
    """
    rng = np.random.default_rng(seed)
    names = sorted(features)
    count = getattr(features, "frame_count", None)
    keys, where = np.zeros(0), np.zeros((0, 2), dtype=np.int64)  # kept keys, and their (file, frame)
    parts_keys, parts_where, buffered, total = [], [], 0, 0
    for index, name in enumerate(names):
        frames = count(name) if count is not None else _as_array(features[name], name).shape[0]
        parts_keys.append(rng.random(frames))
        parts_where.append(np.stack([np.full(frames, index), np.arange(frames)], axis=1))
        buffered += frames
        total += frames
        if max_frames is not None and buffered > 2 * max_frames:  # prune now and then: linear time, bounded memory
            keys, where = _smallest_keys([keys, *parts_keys], [where, *parts_where], max_frames)
            parts_keys, parts_where, buffered = [], [], keys.size
    keys, where = _smallest_keys([keys, *parts_keys], [where, *parts_where], max_frames)
    if total == 0:
        raise ValueError("no frame to fit k-means on")
    where = where[np.lexsort((where[:, 1], where[:, 0]))]  # file order, then frame order
    out: np.ndarray | None = None
    files, starts = np.unique(where[:, 0], return_index=True)
    read_rows = getattr(features, "read_rows", None)
    for file, begin, end in zip(files.tolist(), starts.tolist(), [*starts[1:].tolist(), where.shape[0]],
                                strict=True):
        name, rows = names[file], where[begin:end, 1]
        chosen = (_as_array(read_rows(name, rows), name, numbers=rows) if read_rows is not None else
                  _as_array(features[name], name, rows=rows))
        if out is None:
            out = np.empty((where.shape[0], chosen.shape[1]), dtype=np.float32)
        elif chosen.shape[1] != out.shape[1]:
            raise ValueError(f"features of {name!r} have dimension {chosen.shape[1]}, others {out.shape[1]}")
        out[begin:end] = chosen
    assert out is not None
    return out


def _smallest_keys(
    keys: list[np.ndarray], where: list[np.ndarray], count: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` smallest keys (all when None) and their (file, frame) rows."""
    all_keys, all_where = np.concatenate(keys), np.concatenate(where)
    if count is not None and all_keys.size > count:
        keep = np.argpartition(all_keys, count - 1)[:count]
        all_keys, all_where = all_keys[keep], all_where[keep]
    return all_keys, all_where


def _as_array(value: object, name: str, *, rows: np.ndarray | None = None,
              numbers: np.ndarray | None = None) -> np.ndarray:
    """(T, D) float32 features of one file (only ``rows`` of them when given), checked finite. ``numbers``: the
    file's frame numbers of the rows of ``value`` when it holds some of its frames only (named on an error)."""
    # (numpy has no bfloat16: a bf16 tensor, as `spidr extract --dtype bfloat16` keeps, is widened first)
    array = value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"features of {name!r} have shape {array.shape}: expected (T, D)")
    if rows is not None:
        array = array[rows]
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        row, dim = (int(i) for i in np.argwhere(~np.isfinite(array))[0])
        numbers = rows if rows is not None else numbers
        frame = int(numbers[row]) if numbers is not None else row
        raise ValueError(f"features of {name!r} contain non-finite values (the first: {array[row, dim]} at frame "
                         f"{frame}, dimension {dim})")
    return array


def fit_kmeans(
    frames: np.ndarray | torch.Tensor,
    num_units: int,
    *,
    seed: int = 0,
    batch_size: int = 10_000,
    max_iter: int = 100,
    n_init: int = 3,
) -> np.ndarray:
    """K-means centroids (num_units, D) float32 of (N, D) frames with ``MiniBatchKMeans`` (reproducible under seed)."""
    cluster = import_extra("sklearn.cluster", extra="eval", purpose="k-means")

    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().float().numpy()
    if not isinstance(frames, np.ndarray) or frames.ndim != 2:
        raise ValueError(f"frames must be an (N, D) numpy array, got "
                         f"{f'shape {frames.shape}' if isinstance(frames, np.ndarray) else type(frames).__name__}"
                         " (sample_frames gives one from a feature directory)")
    if not 1 <= num_units <= frames.shape[0]:
        raise ValueError(f"num_units = {num_units} is invalid: expected 1 ≤ num_units ≤ number of frames "
                         f"({frames.shape[0]}); sample more frames or ask for fewer units")
    if frames.dtype != np.float64 and frames.size:
        # sklearn sums squared distances in the frames' dtype: in float32, features near 1e18 overflow k-means++'s
        # potentials and the inertia (logged as nan) and the fit goes wrong without an error; float64 holds them
        largest = max(float(frames.max()), -float(frames.min()))  # (no copy: the sample may take gigabytes)
        if 4.0 * frames.shape[0] * frames.shape[1] * largest**2 >= float(np.finfo(np.float32).max):
            frames = frames.astype(np.float64)
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
    """Write centroids (K, D) to a safetensors file (tensor ``centroids``; ``metadata`` values must be strings),
    under a temporary name renamed to ``path`` once complete (no truncated file; an earlier one stays on failure)."""
    from spidr.safetensors_files import save_safetensors

    # (float64 holds every float32, float16 and bfloat16 value exactly; numpy has no bfloat16)
    values = (centroids.detach().cpu().double().numpy() if isinstance(centroids, torch.Tensor)
              else np.asarray(centroids))
    if values.ndim != 2:
        raise ValueError(f"centroids must be (K, D), got shape {tuple(values.shape)}")
    with np.errstate(over="ignore"):  # (a float64 value past float32's range becomes inf: refused below, by name)
        tensor = torch.as_tensor(np.asarray(values, dtype=np.float32)).contiguous()
    _check_centroids(tensor, f"centroids to write to {path}", original=values)
    with replaced_when_done(path) as partial:
        save_safetensors({CENTROIDS_KEY: tensor}, partial, {k: str(v) for k, v in (metadata or {}).items()})


def load_centroids(path: str | Path) -> torch.Tensor:
    """Read centroids (K, D) float32 from a safetensors file written by ``save_centroids`` (or a plain ``.npy``)."""
    path = Path(path)
    existing_file(path, "centroids file")
    if path.suffix == ".npy":
        try:
            tensor = torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, OSError, EOFError) as error:  # object arrays, a cut header, an empty file
            raise ValueError(f"{path}: not a plain numeric .npy array of centroids ({error})") from None
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
    if tensor.ndim != 2:
        raise ValueError(f"{path}: centroids must be a finite (K, D) matrix, got shape {tuple(tensor.shape)}")
    _check_centroids(tensor, str(path))
    return tensor.to(torch.float32)


def _check_centroids(tensor: torch.Tensor, where: str, *, original: object = None) -> None:
    """Refuse (K, D) centroids that no frame can be assigned to: none (K = 0), of no dimension, or holding a NaN or
    an infinity as float32 (``original``: the values given, named when float32 could not hold one of them)."""
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{where}: centroids must be a finite (K, D) matrix with K ≥ 1 and D ≥ 1, got shape "
                         f"{tuple(tensor.shape)}")
    bad = ~torch.isfinite(tensor.float())
    if bool(bad.any()):
        row, dim = (int(i) for i in torch.nonzero(bad)[0])
        value = np.asarray(original)[row, dim] if original is not None else tensor[row, dim]
        past_range = " (past float32's range)" if math.isfinite(float(value)) else ""
        raise ValueError(f"{where}: centroids must be a finite (K, D) matrix, but centroid {row} holds "
                         f"{float(value)!r} in dimension {dim}{past_range}")


def centroids_digest(centroids: torch.Tensor | np.ndarray) -> str:
    """``"sha1:<hex>"`` of centroids (K, D) as float32: the ``units_source`` that a units file's record gives for
    units assigned to them (``spidr.eval.feature_dir.units_origin``), alike whichever command assigned them."""
    import hashlib

    values = np.ascontiguousarray(torch.as_tensor(centroids).detach().to(torch.float32).cpu().numpy())
    return "sha1:" + hashlib.sha1(f"{values.shape}".encode() + values.tobytes()).hexdigest()


def features_layer(features_dir: str | Path) -> int | None:
    """The layer whose features ``features_dir`` holds, from its name or the nearest folder above it so named
    (``spidr extract``'s ``OUT/layer_LL``, or a subfolder of its tree: ``OUT/layer_06/train-clean-100``), or None."""
    folder = Path(os.path.abspath(features_dir))
    for name in (folder.name, *(parent.name for parent in folder.parents)):
        match = re.fullmatch(r"layer_(\d+)", name)
        if match:
            return int(match.group(1))
    return None


def centroids_record(path: str | Path) -> dict[str, str]:
    """What ``spidr kmeans`` recorded in a centroids file (``layer`` and ``features`` among others); {} for a
    ``.npy`` file or one without a record."""
    if Path(path).suffix == ".npy":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # (load_centroids names what is wrong with the file)
        return {}


def features_origin(*, fingerprint: str | None, before_residual: bool | None, checkpoint: str | None = None,
                    ) -> dict[str, str]:
    """What centroids record of the features they were fitted on, beside their layer, as the strings of a
    safetensors record (what is unknown is left out): ``fingerprint`` (``spidr.eval.journal.features_fingerprint``
    of the model), ``before_residual`` (the layer outputs taken before the residual add), and ``checkpoint`` (the
    model's path, named on a refusal). Compared where centroids are applied: another model's features, or the same
    layer's taken on the other side of the residual add, have the same width and would pass unnoticed."""
    origin = {"features_fingerprint": fingerprint, "before_residual": None if before_residual is None else
              str(before_residual).lower(), "checkpoint": checkpoint}
    return {key: value for key, value in origin.items() if value is not None}


def check_centroids_fit(path: str | Path, layer: int | None, *, where: str,
                        origin: Mapping[str, str] | None = None) -> None:
    """Refuse centroids that ``spidr kmeans`` fitted on other features than those of ``layer`` (1-based; None:
    unknown) of the model and side of the residual add that ``origin`` (``features_origin``) gives, where ``where``
    (the option) would apply them: the features of every layer, of every model of that width, have it, so they
    would silently give units of the wrong clusters (a typo in ``--kmeans 6:…``; the centroids of another
    checkpoint; --after-residual on one side only). What either side did not record is not compared."""
    record = centroids_record(path)
    fitted = record.get("layer")
    if layer is not None and fitted is not None and fitted.isdigit() and int(fitted) != layer:
        raise ValueError(f"{where}: {path} holds centroids fitted on layer {int(fitted)}'s features "
                         f"({record.get('features', 'spidr kmeans')}), not layer {layer}'s: fit "
                         f"centroids on layer {layer} (spidr kmeans .../layer_{layer:02d}), or give that layer")
    origin = origin or {}
    fitted, applied = record.get("before_residual"), origin.get("before_residual")
    if fitted is not None and applied is not None and fitted != applied:
        def side(recorded: str) -> str:
            return ("before the residual add (the default)" if recorded == "true" else
                    "after the residual add (--after-residual)")

        raise ValueError(f"{where}: {path} holds centroids fitted on features taken {side(fitted)}, but these are "
                         f"taken {side(applied)}: fit centroids on features taken as these are")
    fitted, applied = record.get("features_fingerprint"), origin.get("features_fingerprint")
    if fitted is not None and applied is not None and fitted != applied:
        fitted_on, this = (record.get("checkpoint", "not recorded"), origin.get("checkpoint", "not recorded"))
        model = (f"other weights than these, though both were read from {this} (was it replaced since, e.g. by a "
                 "run that went on training, or converted to another precision?)" if fitted_on == this else
                 f"another model ({fitted_on}) than this one ({this})")
        raise ValueError(f"{where}: {path} holds centroids fitted on the features of {model}: their units would be "
                         "clusters of another feature space; fit centroids on this model's features")


# How assign_units chooses a unit, recorded by the unit caches (lm-units, lm-study) built on it: units assigned
# otherwise (the float32 expansion, before 2026-12-06) differ for a few frames and are made again, not mixed in.
# (Since 2026-12-07 most frames are assigned in float32, but only where float64 chooses the same centroid:
# ``spidr.eval.nearest_centroid``. The units are float64's, so this record stands.)
ASSIGNMENT = "nearest centroid, float64"


def assign_units(
    features: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor | NearestCentroid, *,
    batch_size: int = 16384, name: str | None = None, centroids_name: str = "the centroids",
) -> np.ndarray:
    """Nearest-centroid unit of every frame: features (T, D) and centroids (K, D) (as ``fit_kmeans`` gives them,
    any float dtype, or prepared as a ``NearestCentroid`` for many calls) → (T,) int64. ``name`` (the features'
    file) and ``centroids_name`` (their file) are named when the dimensions differ; ``batch_size`` frames at a time.

    The choices are those of the expansion ‖c‖² − 2 x·c in float64: in float32 it cancels when frames lie far from
    the origin (a common offset, or one large dimension, as Transformer layers have), and chose a centroid that was
    not the nearest for 0.2 % of frames with one dimension near 200 and 4 % near 1,000. ``NearestCentroid`` gets
    float64's choices at float32's speed, on the features' device."""
    nearest = centroids if isinstance(centroids, NearestCentroid) else NearestCentroid(centroids)
    frames = torch.as_tensor(features)
    if frames.ndim == 2 and name is not None and frames.shape[1] != nearest.dim:
        raise ValueError(f"features of {name!r} have dimension {frames.shape[1]}, {centroids_name} "
                         f"{nearest.dim}: centroids of another layer or model?")
    try:
        return nearest(frames, batch_size=batch_size)
    except ValueError as error:
        if name is None:
            raise
        raise ValueError(f"{name!r}: {error}") from None


def assign_directory(
    features: Mapping[str, object], centroids: np.ndarray | torch.Tensor, *, centroids_name: str = "the centroids"
) -> Iterable[tuple[str, np.ndarray]]:
    """``(name, units)`` for every file of ``features``, in sorted order, one file in memory at a time.
    ``centroids_name`` (their file) is named when a file's feature dimension is not theirs."""
    nearest = NearestCentroid(centroids)
    for name in sorted(features):
        yield name, assign_units(_as_array(features[name], name), nearest, name=name, centroids_name=centroids_name)
