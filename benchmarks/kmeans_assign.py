"""K-means unit assignment: ``NearestCentroid`` (float32, float64 only where float32 could choose otherwise) against
the float64 expansion spidr used before (``assign_float64``), on layer-like frames. Prints a table.

The frames are base-sized (768 dimensions) and shaped like a Transformer layer's: a low-rank signal, noise, and one
dimension offset far from the origin (``--offset``), where the float32 expansion without the shift chooses wrongly
for some frames; the centroids are the means of the frames' clusters after one Lloyd step from a random sample, so
a frame's nearest two centroids are often close. Both assignments run on the same frames, alternated over
``--rounds`` rounds; the table gives the frames per second of each (best round), the median of the per-round
speed ratios, the share of frames that went to float64 and whether the units are equal (they must be).

    python benchmarks/kmeans_assign.py                       # 100,000 frames (33 min of audio), 500 centroids
    python benchmarks/kmeans_assign.py --device cuda --frames 1000000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from spidr.eval.nearest_centroid import NearestCentroid, assign_float64


def layer_like(num_frames: int, dim: int, num_centroids: int, offset: float, seed: int = 0):
    """(frames (T, D) float32, centroids (K, D) float32), as the module docstring describes."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(dim, 32, generator=gen)
    frames = torch.randn(num_frames, 32, generator=gen) @ basis.T * 0.3 + torch.randn(num_frames, dim, generator=gen)
    frames[:, 7] += offset
    centroids = frames[torch.randperm(num_frames, generator=gen)[:num_centroids]].clone()
    labels = assign_float64(frames[:50_000], centroids)
    for k in range(num_centroids):
        members = frames[:50_000][labels == k]
        if len(members):
            centroids[k] = members.mean(0)
    return frames, centroids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--centroids", type=int, default=500)
    parser.add_argument("--offset", type=float, default=200.0, help="the one large dimension's offset")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where NearestCentroid runs (float64 runs on the host)")
    args = parser.parse_args(argv)

    frames, centroids = layer_like(args.frames, args.dim, args.centroids, args.offset)
    on_device = frames.to(args.device)
    truth = assign_float64(frames, centroids).numpy()
    naive = ((centroids * centroids).sum(1) - 2 * frames @ centroids.T).argmin(1).numpy()
    naive_wrong = float((naive != truth).mean())
    seconds: dict[str, list[float]] = {"float64": [], "NearestCentroid": []}
    equal, share = True, 0.0
    for _ in range(args.rounds):
        began = time.perf_counter()
        assign_float64(on_device, centroids)  # (features on the device are copied to the host first)
        seconds["float64"].append(time.perf_counter() - began)
        began = time.perf_counter()
        nearest = NearestCentroid(centroids)  # prepared each round: its cost is counted
        units = nearest(on_device)
        seconds["NearestCentroid"].append(time.perf_counter() - began)
        equal &= bool(np.array_equal(units, truth))
        share = nearest.num_float64 / args.frames
    ratios = [a / b for a, b in zip(seconds["float64"], seconds["NearestCentroid"], strict=True)]
    print(f"{args.frames} frames × {args.dim} dims, {args.centroids} centroids, offset {args.offset:g}, "
          f"device {args.device}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| assignment | frames/s (best round) | speed vs float64 (median ratio) | frames in float64 | units |")
    print("|---|---|---|---|---|")
    print(f"| float64 expansion (before) | {args.frames / min(seconds['float64']):,.0f} | 1 | 100 % | truth |")
    print(f"| NearestCentroid | {args.frames / min(seconds['NearestCentroid']):,.0f} | "
          f"{statistics.median(ratios):.2f}x | {100 * share:.2f} % | {'equal' if equal else 'DIFFERENT'} |")
    print(f"(the float32 expansion without the shift or the check: {100 * naive_wrong:.3f} % of frames wrong)")


if __name__ == "__main__":
    main()
