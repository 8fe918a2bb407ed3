"""Nearest-centroid assignment that is exact and fast: float32 on the frames' device, float64 only where float32
cannot be trusted.

K-means units are ``argmin_k ‖x − c_k‖²``, computed through the expansion ``‖c_k‖² − 2 x·c_k`` (one matmul). In
float32 the expansion cancels when frames lie far from the origin (Transformer layers have a common offset, or one
dimension near 200 or 1,000), and it chose a centroid that was not the nearest for 0.2 % to 4 % of such frames; in
float64 (``assign_float64``, what spidr computed before) it does not, at half the speed on a CPU and a host round
trip for a GPU's features.

``NearestCentroid`` gets float64's choices at float32's cost:
1. frames and centroids are shifted by the centroids' mean, which removes the common offset (distances do not
   change under a shift);
2. the distances are computed in float32 (IEEE matmul: no TF32 or bf16 inputs, whatever the process set);
3. a frame keeps its float32 choice when its two nearest distances differ by more than a rigorous bound on the error
   of both computations (the float32 one here, float64's in ``assign_float64``). A larger gap means both choose the
   exact nearest centroid. The other frames (near ties, exact ties, non-finite values) are assigned by
   ``assign_float64`` on the host, so every choice is float64's.

The bound follows the standard error analysis of dot products (|fl(x·c) − x·c| ≤ γ_D ‖x‖ ‖c‖ with
γ_D = D·u / (1 − D·u), for any summation order, fused or not), plus the rounding of the shift, of the squared
norms and of the subtraction, and is doubled for safety. It is loose (the largest error measured on layer-like
frames was 1/400 of it at D = 768), so more frames than needed go to float64: about 1 % of layer-like frames with
500 centroids (``benchmarks/kmeans_assign.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch

FLOAT32_ROUNDOFF = 2.0**-24  # unit roundoff u of float32 (round to nearest)
FLOAT64_ROUNDOFF = 2.0**-53
SAFETY = 2.0  # the bound is doubled: summation orders and fused operations are covered, but let nothing be tight
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # exactly representable in float32
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def assign_float64(frames: torch.Tensor, centroids: torch.Tensor, *, batch_size: int = 8192) -> torch.Tensor:
    """(T, D) frames, (K, D) centroids → (T,) int64: ``argmin_k ‖c_k‖² − 2 x·c_k`` in float64 on the host, in
    batches of ``batch_size`` frames (the first of equal distances)."""
    frames = frames.detach().cpu().to(torch.float64)
    centroids = centroids.detach().cpu().to(torch.float64)
    squared_norms = (centroids * centroids).sum(1)
    units = torch.empty(frames.shape[0], dtype=torch.int64)
    for start in range(0, frames.shape[0], batch_size):
        batch = frames[start : start + batch_size]
        units[start : start + batch.shape[0]] = (squared_norms[None, :] - 2.0 * batch @ centroids.T).argmin(1)
    return units


def _refuse_non_finite(frames: torch.Tensor, rows: torch.Tensor) -> None:
    """Raise, naming the first, if ``frames`` (rows ``rows`` (N,) of the caller's) hold a NaN or an infinity: no
    centroid is nearest to it (argmin would give centroid 0)."""
    bad = ~torch.isfinite(frames.detach())
    if bool(bad.any()):
        row, dim = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"features contain non-finite values (the first: {float(frames[row, dim])} at frame "
                         f"{int(rows[row])}, dimension {dim}): no centroid is nearest to them")


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Float32 matmuls in IEEE float32 inside the block (no TF32 on CUDA, no bf16 / TF32 in oneDNN on CPU), whatever
    the process chose (``torch.set_float32_matmul_precision``, or these backends' settings); restored after."""
    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    before = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, precision in zip(backends, before, strict=True):
            backend.fp32_precision = precision


class NearestCentroid:
    """Each frame's nearest centroid, as ``assign_float64`` chooses it (see the module's docstring for how).

    ``centroids`` (K, D), any float dtype; prepared once, then ``self(frames)`` for any number of (T, D) batches on
    any device. Frames in float64, or centroids that float32 cannot hold exactly, are assigned in float64 alone.
    """

    def __init__(self, centroids: torch.Tensor | np.ndarray) -> None:
        centroids = torch.as_tensor(centroids).detach().cpu()
        if centroids.ndim != 2 or centroids.shape[0] < 1 or centroids.dtype in (torch.bool, *COMPLEX_DTYPES):
            raise ValueError(f"centroids must be a (K, D) real matrix with K ≥ 1, got {centroids.dtype} of shape "
                             f"{tuple(centroids.shape)}")
        if not centroids.is_floating_point():  # (integer centroids, as float64 took them before)
            centroids = centroids.to(torch.float64)
        if not bool(torch.isfinite(centroids).all()):  # (every frame's nearest would be centroid 0)
            row, dim = (int(i) for i in torch.nonzero(~torch.isfinite(centroids))[0])
            raise ValueError(f"centroids hold non-finite values (the first: {float(centroids[row, dim])} in "
                             f"centroid {row}, dimension {dim})")
        self.centroids = centroids
        exact = centroids.to(torch.float64)
        self.float32_exact = bool(torch.equal(exact.to(torch.float32).to(torch.float64), exact))
        shift = exact.mean(0).to(torch.float32)
        shifted = exact - shift.to(torch.float64)
        self.shift = shift  # (D,) float32
        self.shifted = shifted.to(torch.float32)  # (K, D) float32: c − shift, rounded once
        self.squared_norms = (self.shifted.to(torch.float64) ** 2).sum(1).to(torch.float32)  # (K,)
        self.max_norm = float(self.shifted.to(torch.float64).norm(dim=1).max())  # C: of the shifted centroids
        self.max_raw_norm = float(exact.norm(dim=1).max())  # of the centroids as float64 sees them
        self.shift_norm = float(shift.to(torch.float64).norm())
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.num_float64 = 0  # frames assigned by assign_float64 so far (the fallback's share, for benchmarks)

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def _prepared(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.shift.to(device), self.shifted.to(device),
                                       self.squared_norms.to(device))
        return self._on_device[device]

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor | np.ndarray, *, batch_size: int = 16384) -> np.ndarray:
        """(T, D) frames on any device → (T,) int64 numpy: each frame's nearest centroid."""
        frames = torch.as_tensor(frames)
        if frames.ndim != 2 or frames.shape[1] != self.dim:
            raise ValueError(f"features of shape {tuple(frames.shape)} do not match centroids of dimension "
                             f"{self.dim}")
        if frames.dtype not in _FAST_DTYPES or not self.float32_exact or self.centroids.shape[0] == 1:
            self.num_float64 += frames.shape[0]
            _refuse_non_finite(frames, torch.arange(frames.shape[0]))
            return assign_float64(frames, self.centroids).numpy()
        units, trusted = [], []
        # (a caller's autocast, as bf16 extraction runs under, would take the matmul to bf16)
        with ieee_float32_matmul(), torch.autocast(frames.device.type, enabled=False):
            for start in range(0, frames.shape[0], batch_size):
                batch_units, batch_trusted = self._float32_choices(frames[start : start + batch_size])
                units.append(batch_units)
                trusted.append(batch_trusted)
        if not units:
            return np.zeros(0, dtype=np.int64)
        chosen = torch.cat(units).cpu()
        distrusted = torch.nonzero(~torch.cat(trusted).cpu()).squeeze(1)
        if distrusted.numel():  # (non-finite frames are among them: their distances are)
            self.num_float64 += distrusted.numel()
            checked = frames[distrusted.to(frames.device)]
            _refuse_non_finite(checked, distrusted)
            chosen[distrusted] = assign_float64(checked, self.centroids)
        return chosen.numpy()

    def _float32_choices(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) → the float32 choice (T,) int64 and whether it is certainly float64's (T,) bool, on the frames'
        device."""
        shift, shifted, squared_norms = self._prepared(frames.device)
        x = frames.to(torch.float32) - shift  # rounded once: x − shift + δ, ‖δ‖ ≤ u ‖x − shift‖
        distances = squared_norms - 2.0 * (x @ shifted.T)  # ‖x − c_k‖² − ‖x‖², up to the bound below
        nearest, chosen = distances.topk(2, dim=1, largest=False)
        gap = nearest[:, 1].to(torch.float64) - nearest[:, 0].to(torch.float64)
        finite = torch.isfinite(distances).all(1)  # an overflow (±inf, inf − inf) is no distance to trust
        return chosen[:, 0], finite & (gap > self._error_bound(x))

    def _error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """(T,) float64: twice the most by which the float32 distances of a frame, and float64's, can be off the
        exact ones, each distance counted once, doubled for safety: a gap larger than this is one float64 sees."""
        u, u64, dim = FLOAT32_ROUNDOFF, FLOAT64_ROUNDOFF, self.dim
        gamma, gamma64 = dim * u / (1 - dim * u), (dim + 2) * u64 / (1 - (dim + 2) * u64)
        c = self.max_norm
        # ‖x‖ as float32 computes it is within γ of the true norm (relative); take the larger
        norm = torch.linalg.vector_norm(x, dim=1).to(torch.float64) * (1 + gamma)
        eta = u * (norm + c) / (1 - u)  # how far the shifted frame and centroid lie from their exact values
        float32_error = (
            3 * u * c * c  # ‖c_k‖²: float64 sum rounded to float32
            + 2 * gamma * norm * c  # 2 x·c_k: the dot product
            + u * (c * c + 2 * norm * c) * (1 + gamma)  # the subtraction's rounding
            + 2 * (norm + c + eta) * eta + eta * eta  # the shift's rounding, as a change of ‖x − c_k‖²
            + 2.0**-126 * (2 * dim + 3 + 4 * math.sqrt(dim) * (norm + c + eta))  # underflow (or flushed subnormals)
        )
        raw_frame_norm, raw_c = norm + self.shift_norm + eta, self.max_raw_norm
        float64_error = 3 * gamma64 * (raw_frame_norm + raw_c) ** 2
        # gap_exact ≥ gap − 2·float32_error, and float64's gap ≥ gap_exact − 2·float64_error
        return SAFETY * 2 * (float32_error + float64_error) * (1 + 4 * gamma) + math.ulp(0.0)
