"""EMA codebooks: initialisation, nearest-centroid lookup, EMA update (spec §3.10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spidr.models import num_frames
from spidr.models.codebook import Codebook
from test_models_dinosr import TYPES, tiny_model, waveforms


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


@pytest.mark.parametrize("model_type", TYPES)
def test_codebook_update_under_bf16_autocast_is_the_fp32_ema_of_its_targets(model_type: str, monkeypatch) -> None:
    """Spec §7.3: the codebooks stay fp32 under autocast. A training forward under CPU bf16 autocast moves each
    codebook to τ·old + (1 − τ)·Σ(assigned targets), the sum taken in float64 from the very targets and labels the
    codebook received, to fp32 rounding (a bf16 matmul is off by ~1e-3 relative)."""
    model = tiny_model(model_type).train()
    seen = []
    statistics = Codebook.statistics

    def recording(self, z, onehot):
        seen.append((z.detach().double(), onehot.double()))
        return statistics(self, z, onehot)

    monkeypatch.setattr(Codebook, "statistics", recording)
    before = [(c.codebook.double().clone(), c.counts.double().clone()) for c in model.codebooks]
    batch = waveforms(6000, 6000)
    mask = torch.rand(2, num_frames(6000), generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch, mask=mask)
    tau = float(torch.tensor(model.cfg.codebook_decay, dtype=torch.float32))
    assert len(seen) == model.num_codebooks
    for codebook, (sums0, counts0), (z, onehot) in zip(model.codebooks, before, seen, strict=True):
        counts, sums = onehot.sum(0), onehot.T @ z
        used = counts > 0
        expected_counts = torch.where(used, tau * counts0 + (1 - tau) * counts, counts0)
        expected_sums = torch.where(used[:, None], tau * sums0 + (1 - tau) * sums, sums0)
        torch.testing.assert_close(codebook.counts.double(), expected_counts, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(codebook.codebook.double(), expected_sums, rtol=1e-5, atol=1e-5)


def test_cosine_assignment_is_the_most_similar_centroid_direction() -> None:
    """``codebook_distance = "cosine"``: label = argmax_v cos(z, c_v), c_v = codebook_v / counts_v (float64 truth)."""
    generator = torch.Generator().manual_seed(0)
    codebook = Codebook(8, 12, distance="cosine")
    with torch.no_grad():
        codebook.codebook.copy_(torch.randn(12, 8, generator=generator) * torch.linspace(0.2, 5, 12)[:, None])
        codebook.counts.copy_(torch.linspace(0.5, 30, 12))
    z = torch.randn(200, 8, generator=generator)
    centroids = codebook.codebook.double() / codebook.counts.double()[:, None]
    cos = (z.double() @ centroids.T) / (z.double().norm(dim=1)[:, None] * centroids.norm(dim=1)[None, :])
    assert torch.equal(codebook.assign(z), cos.argmax(1))


@pytest.mark.parametrize("model_type", TYPES)
def test_codebook_init_from_data_takes_distinct_frames(model_type: str) -> None:
    """``codebook_init = "data"`` sets the centroids to *distinct* random target frames when the batch has at least
    V of them: with exactly V = 16 scored frames every frame becomes exactly one centroid (codebook_decay = 1 keeps the
    EMA step from moving them). Targets written out: teacher top-K outputs, instance-normalised over time."""
    model = tiny_model(model_type, codebook_init="data", codebook_decay=1.0).train()
    batch = waveforms(3000, 3000)
    frames = num_frames(3000)
    mask = torch.zeros(2, frames, dtype=torch.bool)
    mask[0, :8] = True
    mask[1, -8:] = True
    with torch.no_grad():
        outputs = model.teacher.get_intermediate_outputs(model.features(batch))[-2:]
        targets = [F.instance_norm(y.transpose(1, 2)).transpose(1, 2)[mask] for y in outputs]
    model(batch, mask=mask)
    for codebook, z in zip(model.codebooks, targets, strict=True):
        assert len(z) == 16
        distances = torch.cdist(codebook.centroids, z)  # (V, N)
        assert distances.min(1).values.max() < 1e-4  # every centroid is a target frame
        assert sorted(distances.argmin(1).tolist()) == list(range(16))  # each frame exactly once

