"""Online clustering: one EMA codebook per teacher layer (spec §3.10).

A codebook holds two fp32 buffers, ``codebook`` (V, D), a running EMA of the *sums* of the vectors assigned to
each codeword, and ``counts`` (V,), a running EMA of how many were assigned; the centroids are their ratio.
A target vector gets the codeword with the nearest centroid (Euclidean). The update is split in two so that the
model can sum the statistics of all its codebooks over ranks in one collective: ``statistics`` then ``update``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class Codebook(nn.Module):
    """``codebook_size`` (V) codewords of dimension ``dim`` (D), updated by EMA with ``decay``."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        decay: float = 0.9,
        distance: Literal["euclidean", "cosine"] = "euclidean",
    ) -> None:
        super().__init__()
        self.decay = decay
        self.distance = distance
        # N(0, 1) draws, standardised per feature across codewords: with counts = 1 these are the centroids.
        init = F.instance_norm(torch.randn(dim, codebook_size)[None])[0]
        self.register_buffer("codebook", init.T.contiguous())
        self.register_buffer("counts", torch.ones(codebook_size))

    @property
    def centroids(self) -> torch.Tensor:
        """(V, D) current cluster centres."""
        return self.codebook / self.counts[:, None]

    @torch.no_grad()
    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codeword of each vector: z (N, D) → labels (N,) int64. Always in fp32, even under autocast."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            centroids = self.centroids
            if self.distance == "cosine":
                # Not official: a centroid averaging a broad cluster shrinks towards the origin and, in Euclidean
                # distance, then wins ever more frames; comparing directions removes that rich-get-richer pull.
                return (z @ F.normalize(centroids, dim=-1).T).argmax(-1)
            # argmin_v ‖z − c_v‖² = argmin_v (‖c_v‖² − 2 z·c_v): the ‖z‖² term is the same for every codeword.
            distances = centroids.square().sum(-1) - 2 * z @ centroids.T  # (N, V)
            return distances.argmin(-1)

    @torch.no_grad()
    def statistics(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Per-codeword (count, sum of assigned vectors) of this batch as one (V, 1 + D) fp32 tensor, from z (N, D)
        and the one-hot assignments (N, V). A matmul rather than a scatter-add, so it is deterministic on GPU."""
        with torch.autocast(z.device.type, enabled=False):
            onehot = onehot.float()
            return torch.cat([onehot.sum(0)[:, None], onehot.T @ z.float()], dim=1)

    @torch.no_grad()
    def update(self, stats: torch.Tensor, *, decay_unused: bool = False) -> torch.Tensor:
        """EMA step from (global) ``statistics``. Officially, codewords assigned nothing stay as they are; with
        ``decay_unused`` their sum and count both decay, which leaves their centroid unchanged but lets the count
        tell how recently a codeword was used. Returns the (V,) bool mask of the codewords unused in this step."""
        counts, sums = stats[:, 0], stats[:, 1:]
        used = counts > 0
        # The decay as an fp32 tensor (not a Python float) rounds exactly as the official update does; filled on
        # the device, since torch.tensor(..., device=cuda) copies from the host and waits for the queued kernels.
        tau = torch.full((), self.decay, dtype=torch.float32, device=counts.device)
        if decay_unused:
            self.counts.mul_(tau).add_((1 - tau) * counts)
            self.codebook.mul_(tau).add_((1 - tau) * sums)
            return ~used
        self.counts.copy_(torch.where(used, tau * self.counts + (1 - tau) * counts, self.counts))
        self.codebook.copy_(torch.where(used[:, None], tau * self.codebook + (1 - tau) * sums, self.codebook))
        return ~used

    @torch.no_grad()
    def reseed(self, unused: torch.Tensor, candidates: torch.Tensor, *, count: torch.Tensor | None = None) -> None:
        """Restart each unused codeword at a candidate vector with ``count`` (a () tensor; 1 when None):
        ``candidates`` (V, D), identical on every rank. Not part of the official method (``codebook_reseed_dead``)."""
        count = torch.ones((), dtype=self.counts.dtype, device=self.counts.device) if count is None \
            else count.to(self.counts)
        self.codebook.copy_(torch.where(unused[:, None], candidates.float() * count, self.codebook))
        self.counts.copy_(torch.where(unused, count.expand_as(self.counts), self.counts))
