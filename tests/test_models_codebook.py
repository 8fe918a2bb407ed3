"""EMA codebooks: initialisation, nearest-centroid lookup, EMA update (spec §3.10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spidr.models.codebook import Codebook


def test_initial_centroids_are_standardised_per_feature() -> None:
    torch.manual_seed(0)
    codebook = Codebook(dim=64, codebook_size=256)
    assert codebook.codebook.shape == (256, 64)
    assert codebook.codebook.dtype == torch.float32
    assert torch.equal(codebook.counts, torch.ones(256))
    # each feature: zero mean and unit (biased) variance across the codewords
    torch.testing.assert_close(codebook.codebook.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(codebook.codebook.var(0, unbiased=False), torch.ones(64), atol=1e-3, rtol=0)
    assert torch.equal(codebook.centroids, codebook.codebook)
    # buffers, not parameters: no gradient, but saved in the state dict
    assert list(codebook.parameters()) == []
    assert set(codebook.state_dict()) == {"codebook", "counts"}


def test_assign_is_the_nearest_centroid() -> None:
    torch.manual_seed(0)
    codebook = Codebook(dim=8, codebook_size=32)
    codebook.counts.uniform_(0.5, 3.0)  # centroids = sums / counts must be used
    z = torch.randn(500, 8) * 3
    expected = torch.cdist(z.double(), codebook.centroids.double()).argmin(-1)
    assert torch.equal(codebook.assign(z), expected)


def test_assign_stays_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    codebook = Codebook(dim=16, codebook_size=64)
    z = torch.randn(300, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = codebook.assign(z.bfloat16().float())
        stats = codebook.statistics(z, F.one_hot(under_autocast, 64))
    assert torch.equal(under_autocast, codebook.assign(z.bfloat16().float()))
    assert stats.dtype == torch.float32


def test_update_by_hand() -> None:
    codebook = Codebook(dim=2, codebook_size=3, decay=0.9)
    codebook.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]]))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 11.0]])
    labels = codebook.assign(z)
    assert labels.tolist() == [0, 0, 1]
    unused = codebook.update(codebook.statistics(z, F.one_hot(labels, 3)))
    assert unused.tolist() == [False, False, True]
    # counts: 0.9·1 + 0.1·c; sums: 0.9·sum + 0.1·(sum of assigned vectors); codeword 2 untouched
    torch.testing.assert_close(codebook.counts, torch.tensor([0.9 + 0.2, 0.9 + 0.1, 1.0]))
    torch.testing.assert_close(
        codebook.codebook, torch.tensor([[0.1, 0.1], [0.9 * 10 + 0.9, 0.9 * 10 + 1.1], [-10.0, 5.0]])
    )


def test_statistics_count_and_sum() -> None:
    codebook = Codebook(dim=3, codebook_size=4)
    z = torch.arange(15, dtype=torch.float32).view(5, 3)
    labels = torch.tensor([3, 0, 3, 3, 1])
    stats = codebook.statistics(z, F.one_hot(labels, 4))
    assert stats[:, 0].tolist() == [1, 1, 0, 3]
    assert stats[3, 1:].tolist() == (z[0] + z[2] + z[3]).tolist()
    assert stats[2, 1:].tolist() == [0, 0, 0]


def test_reseed_replaces_only_unused_codewords() -> None:
    codebook = Codebook(dim=2, codebook_size=3)
    before = codebook.codebook.clone()
    candidates = torch.full((3, 2), 7.0)
    codebook.reseed(torch.tensor([False, True, False]), candidates)
    assert torch.equal(codebook.codebook[[0, 2]], before[[0, 2]])
    assert codebook.codebook[1].tolist() == [7.0, 7.0]
    assert codebook.counts.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_repeated_updates_converge_to_the_cluster_mean(decay: float) -> None:
    torch.manual_seed(0)
    codebook = Codebook(dim=2, codebook_size=2, decay=decay)
    codebook.codebook.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    left, right = torch.tensor([[-3.0, 1.0]]), torch.tensor([[4.0, -2.0]])
    z = torch.cat([left.expand(10, 2), right.expand(30, 2)]) + 0.0
    for _ in range(100):  # 0.9^100 ≈ 3e-5
        codebook.update(codebook.statistics(z, F.one_hot(codebook.assign(z), 2)))
    torch.testing.assert_close(codebook.centroids, torch.cat([left, right]), atol=1e-3, rtol=0)
