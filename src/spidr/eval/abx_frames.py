"""ABX features: every referenced span of every file stored once, prepared for the frame distance, and the
frame distances themselves (definitions in ``spidr.eval.abx``)."""

from __future__ import annotations

import errno
import math
import mmap
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from spidr.eval.items import Items, check_nonempty, check_within

DistanceName = Literal["angular", "cosine", "euclidean", "kl_symmetric", "identical"]
DISTANCES = ("angular", "cosine", "euclidean", "kl_symmetric", "identical")
KL_EPS = 1e-6


# A frame store larger than this lives in an unlinked scratch file (in TMPDIR) mapped into memory, whose pages are
# handed back to the page cache after every block of work (every 256 MB written, every gather of a scoring chunk):
# the process then maps little of it at a time instead of holding the whole store (350k triphone items of
# 768-dimensional features at 50 Hz take ≈ 5 GB). Gathers map whole page-cache folios, hence the frequent release.
MAX_RESIDENT_BYTES = 1 << 30


class _ScratchFrames:
    """An (N, D) float32 array in a memory-mapped temporary file (deleted as soon as it is created)."""

    def __init__(self, rows: int, dim: int) -> None:
        size = max(rows * dim * 4, 1)
        with tempfile.TemporaryFile(prefix="spidr-abx-") as handle:
            try:  # blocks reserved now: a full TMPDIR is an error here, not a SIGBUS when a page is first written
                os.posix_fallocate(handle.fileno(), 0, size)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise OSError(error.errno, f"{error.strerror}: ABX needs a {size / 2**20:.1f} MiB scratch file "
                                  f"for the frames of its items (TMPDIR sets another folder)",
                                  tempfile.gettempdir()) from None
                handle.truncate(size)  # (a file system without fallocate: blocks found on first write)
            self.map = mmap.mmap(handle.fileno(), size)
        self.tensor = torch.frombuffer(self.map, dtype=torch.float32, count=rows * dim).view(rows, dim)

    def release(self) -> None:
        """Drop this process's mapping of the pages (they stay in the page cache and fault back in on use)."""
        self.map.madvise(mmap.MADV_DONTNEED)


@dataclass(frozen=True)
class FrameStore:
    """Frames of all items, prepared for the distance.

    ``frames`` (N, D) float32 holds, file after file, the span of each file that its items cover; item ``i`` is
    ``frames[offsets[i] : offsets[i] + lengths[i]]``. Above ``MAX_RESIDENT_BYTES`` the frames are a scratch-file
    map and ``release()`` (called between blocks of work) keeps the resident part small.
    """

    frames: torch.Tensor
    offsets: np.ndarray
    lengths: np.ndarray
    scratch: _ScratchFrames | None = None

    def release(self) -> None:
        if self.scratch is not None:
            self.scratch.release()

    @classmethod
    def build(
        cls,
        features: Mapping[str, object],
        items: Items,
        starts: np.ndarray,
        ends: np.ndarray,
        *,
        distance: DistanceName,
    ) -> FrameStore:
        check_nonempty(items, starts, ends)
        by_file: dict[str, list[int]] = defaultdict(list)
        for index, name in enumerate(items.files):
            by_file[name].append(index)
        missing = [name for name in by_file if name not in features]
        skipped = [name for name in missing if getattr(features, "names_skipped", lambda _: False)(name)]
        if skipped:  # (the item file is right: the features are not all there)
            raise ValueError(
                f"{len(skipped)} of the {len(by_file)} files of {items.source} were skipped by the extraction "
                f"(first: {skipped[:3]}; unreadable: its metadata.json lists them under 'skipped'): fix their audio "
                "and rerun the extraction, or leave their items out"
            )
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(by_file)} files of {items.source} have no features "
                f"(first: {missing[:3]}); #file must be a feature file's path relative to the directory without "
                "extension, or its stem (the utterance id); to score only the items of the files that have features, "
                "give abx() items.of_files(features) (spidr evaluate leaves the others out itself)"
            )
        spans = {name: (int(starts[rows].min()), int(ends[rows].max())) for name, rows in by_file.items()}
        total = sum(max(end - start, 0) for start, end in spans.values())
        offsets = np.zeros(len(items), dtype=np.int64)
        frames: torch.Tensor | None = None
        scratch: _ScratchFrames | None = None
        position = unreleased = 0
        for name, rows in by_file.items():
            array = _as_frames(features[name], name)
            rows = np.asarray(rows)
            check_within(items, rows, starts, ends, array.shape[0])
            if frames is None:
                if total * array.shape[1] * 4 > MAX_RESIDENT_BYTES:
                    scratch = _ScratchFrames(total, array.shape[1])
                    frames = scratch.tensor
                else:
                    frames = torch.empty((total, array.shape[1]), dtype=torch.float32)
            elif array.shape[1] != frames.shape[1]:
                raise ValueError(f"features of {name!r} have dimension {array.shape[1]}, others {frames.shape[1]} "
                                 "(given as (D, T)? each array must be (T, D), frames first)")
            start, end = spans[name]
            block = frames[position : position + end - start]
            block.copy_(array[start:end])
            prepare_frames(block, distance, name=name)  # row by row, so per file is the same as all at once
            offsets[rows] = position + starts[rows] - start
            position += end - start
            unreleased += block.numel() * 4
            if scratch is not None and unreleased > MAX_RESIDENT_BYTES // 4:
                scratch.release()
                unreleased = 0
        assert frames is not None  # items are never empty
        store = cls(frames=frames, offsets=offsets, lengths=ends - starts, scratch=scratch)
        store.release()
        return store


def _as_frames(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        array = np.asarray(value)
        if array.dtype.kind not in "iubf":  # (strings: torch's own error named no utterance)
            raise ValueError(f"features of {name!r} are of dtype {array.dtype}: expected numbers (unit ids or "
                             "(T, D) features)")
    tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(array)
    if tensor.ndim == 1:
        tensor = tensor[:, None]  # a sequence of discrete units
        # Compared as float32, which holds integers exactly only below 2^24: larger ids would merge.
        if tensor.numel() and not tensor.is_floating_point() and int(tensor.abs().max()) >= 2**24:
            raise ValueError(f"units of {name!r} reach {int(tensor.abs().max())}: discrete ABX takes unit ids "
                             f"below 2^24 = {2**24}")
    if tensor.ndim != 2:
        raise ValueError(f"features of {name!r} have shape {tuple(tensor.shape)}: expected (T, D) or (T,)")
    tensor = tensor.to(torch.float32)
    # One cheap reduction first; the element-wise check only runs when the sum is not finite (possibly by overflow).
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        frame, dim = (int(i) for i in torch.nonzero(~torch.isfinite(tensor))[0])
        raise ValueError(f"features of {name!r} contain non-finite values (the first: {float(tensor[frame, dim])} at "
                         f"frame {frame}, dimension {dim})")
    return tensor


def prepare_frames(frames: torch.Tensor, distance: DistanceName, *, name: str = "the items") -> torch.Tensor:
    """Per-frame preprocessing of (N, D) frames of file ``name``, in place where possible (angular: L2
    normalisation); features the distance has no meaning on are refused."""
    if distance in ("angular", "cosine") and frames.shape[1] == 1:
        # Normalised, every non-zero value becomes ±1: discrete units would all be one unit (ABX at chance).
        raise ValueError(f"features of {name!r} have one dimension: the {distance!r} distance compares directions, "
                         "which one-dimensional values do not have; for discrete units use the 'identical' distance")
    if distance == "kl_symmetric" and frames.numel() and float(frames.min()) < 0:
        raise ValueError(f"features of {name!r} have negative values ({float(frames.min()):.4g}): the "
                         "'kl_symmetric' distance compares probability vectors (e.g. softmax outputs)")
    if distance in ("angular", "cosine"):
        norms = frames.norm(dim=1, keepdim=True)
        huge = ~torch.isfinite(norms[:, 0])  # finite frames whose squares overflow: divide by the largest first
        if bool(huge.any()):
            frames[huge] /= frames[huge].abs().amax(dim=1, keepdim=True)
            norms[huge] = frames[huge].norm(dim=1, keepdim=True)
        zero = norms[:, 0] == 0
        frames.div_(norms.masked_fill_(zero[:, None], 1.0))
        frames[zero] = 1.0 / math.sqrt(frames.shape[1])  # fastabx's singularity rule, see the module docstring
    elif distance == "identical" and frames.shape[1] != 1:
        raise ValueError(
            f"the 'identical' distance compares discrete units: features of {name!r} must be (T,) or (T, 1), got "
            f"dimension {frames.shape[1]}"
        )
    return frames


def frame_distances(
    x: torch.Tensor, y: torch.Tensor, distance: DistanceName, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """All frame-to-frame distances between prepared frames x (n, D) and y (m, D) → (n, m) float32 (into ``out``)."""
    if out is None:
        out = torch.empty((x.shape[0], y.shape[0]), dtype=torch.float32)
    match distance:
        case "angular" | "cosine":
            return torch.mm(x, y.T, out=out).clamp_(-1.0, 1.0).acos_().div_(math.pi)
        case "euclidean":
            out.copy_(torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist"))
            if out.numel() and not math.isfinite(float(out.max())):  # frames whose squared differences overflow
                scale = 2.0 ** math.ceil(math.log2(max(float(x.abs().max()), float(y.abs().max()))))  # (exact)
                out.copy_(torch.cdist(x / scale, y / scale, compute_mode="donot_use_mm_for_euclid_dist")).mul_(scale)
            return out
        case "kl_symmetric":
            # ½ Σ (x - y)(log x - log y), expanded into matrix products. Each log row is centred on its mean m to
            # keep float32 precision near 0; that shifts the sum by (m_x - m_y)(s_x - s_y), where s is a row's sum:
            # nothing for probability vectors, but rows that do not sum to 1 (pooled posteriors) need it added back.
            log_x, log_y = (x + KL_EPS).log(), (y + KL_EPS).log()
            mean_x, mean_y = log_x.mean(1, keepdim=True), log_y.mean(1, keepdim=True)
            log_x -= mean_x
            log_y -= mean_y
            self_x = (x * log_x).sum(1, keepdim=True)
            self_y = (y * log_y).sum(1, keepdim=True).T
            shift = (mean_x - mean_y.T) * (x.sum(1, keepdim=True) - y.sum(1, keepdim=True).T)
            return out.copy_(0.5 * (self_x + self_y - x @ log_y.T - log_x @ y.T + shift))
        case "identical":
            return out.copy_(x[:, 0, None] != y[None, :, 0])
    raise ValueError(f"distance = {distance!r} is invalid: expected one of {', '.join(DISTANCES)}")


