"""Model-level behaviour shared by DinoSR and SpidR: invariances, loss and metrics, codebook and teacher updates.

Self-contained (no ../shared): a tiny config, random weights, random audio.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spidr.config import DinoSRConfig, SpidRConfig
from spidr.models import DinoSR, SpidR, build_model, num_frames, padding_mask_from_lengths
from spidr.models.codebook import Codebook
from spidr.models.components import SelfAttention
from spidr.models.student import Student

CONV = ((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2
TYPES = ["spidr", "dinosr"]


def tiny_model(model_type: str, seed: int = 0, **overrides) -> DinoSR:
    cls = SpidRConfig if model_type == "spidr" else DinoSRConfig
    cfg = cls(**{
        "extractor_conv_layer_config": CONV,
        "encoder_embed_dim": 32,
        "encoder_num_layers": 3,
        "encoder_num_heads": 2,
        "encoder_ff_interm_features": 64,
        "num_codebooks": 2,
        "codebook_size": 16,
        **overrides,
    })
    torch.manual_seed(seed)
    return build_model(cfg)


def waveforms(*lengths: int, seed: int = 0) -> torch.Tensor:
    """Standardised noise, zero-padded to the longest length: (B, S)."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lengths), max(lengths))
    for i, length in enumerate(lengths):
        out[i, :length] = F.layer_norm(torch.randn(length, generator=generator), (length,))
    return out


def random_mask(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, frames, generator=generator) < 0.5
    mask[:, 0] = True
    return mask


def teacher_labels(model: DinoSR, wave: torch.Tensor, scored: torch.Tensor) -> list[torch.Tensor]:
    """Codebook labels written out from public pieces: teacher top-K before-residual outputs, instance-normalised
    over time, nearest centroid."""
    with torch.no_grad():
        outputs = model.teacher.get_intermediate_outputs(model.features(wave))[-model.num_codebooks :]
        normed = [(y - y.mean(1, keepdim=True)) / (y.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
                  for y in outputs]
    return [codebook.assign(z[scored]) for codebook, z in zip(model.codebooks, normed, strict=True)]


def perplexity_of(probs: torch.Tensor) -> torch.Tensor:
    mean = probs.double().mean(0)
    return torch.exp2(-(mean * torch.log2(mean + 1e-8)).sum())


# ----------------------------------------------------------------------------------------------------------------
# Invariances
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
@torch.no_grad()
def test_padded_batch_equals_per_utterance_runs(model_type: str) -> None:
    model = tiny_model(model_type).eval()
    lengths = [8000, 5000, 3100]
    batch = waveforms(*lengths)
    padding = padding_mask_from_lengths(torch.tensor(lengths))
    batched_after = model.get_intermediate_outputs(batch, padding_mask=padding, before_residual=False)
    batched_before = model.get_intermediate_outputs(batch, padding_mask=padding)
    batched_codes = model.get_codebooks(batch, padding_mask=padding)
    for i, length in enumerate(lengths):
        single = batch[i : i + 1, :length]
        frames = num_frames(length)
        for batched, alone in [
            (batched_after, model.get_intermediate_outputs(single, before_residual=False)),
            (batched_before, model.get_intermediate_outputs(single)),
            (batched_codes[-2:], model.get_codebooks(single)[-2:]),
        ]:
            for b, a in zip(batched, alone, strict=True):
                torch.testing.assert_close(b[i : i + 1, :frames], a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
@torch.no_grad()
def test_batch_of_one_equals_batch_of_many(model_type: str) -> None:
    model = tiny_model(model_type).eval()
    batch = waveforms(6000, 6000, 6000)
    mask = random_mask(3, num_frames(6000))
    losses, _ = model(batch, mask=mask)
    outputs = model.get_intermediate_outputs(batch)
    start = 0
    for i in range(3):
        single_losses, _ = model(batch[i : i + 1], mask=mask[i : i + 1])
        n = int(mask[i].sum())
        # losses come in row-major (batch, frame) order
        torch.testing.assert_close(losses[start : start + n], single_losses, atol=1e-5, rtol=0)
        start += n
        for b, a in zip(outputs, model.get_intermediate_outputs(batch[i : i + 1]), strict=True):
            torch.testing.assert_close(b[i : i + 1], a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
@torch.no_grad()
def test_no_mask_equals_an_all_valid_padding_mask(model_type: str) -> None:
    model = tiny_model(model_type).eval()
    batch = waveforms(5000, 5000)
    frames = num_frames(5000)
    mask = random_mask(2, frames)
    all_valid = torch.zeros(2, frames, dtype=torch.bool)
    dense = torch.ones(2, 1, frames, frames, dtype=torch.bool)
    plain_losses, plain_metrics = model(batch, mask=mask)
    for padding in ({"padding_mask": all_valid}, {"attention_mask": dense}):
        losses, metrics = model(batch, mask=mask, **padding)
        assert torch.equal(losses, plain_losses)
        assert torch.equal(metrics["target_ppl"], plain_metrics["target_ppl"])
        for a, b in zip(model.get_intermediate_outputs(batch, **padding), model.get_intermediate_outputs(batch),
                        strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("model_type", TYPES)
def test_attention_runs_without_a_mask_when_nothing_is_padded(model_type: str, monkeypatch) -> None:
    calls: list[torch.Tensor | None] = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        calls.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = tiny_model(model_type).eval()
    batch = waveforms(5000, 5000)
    frames = num_frames(5000)
    with torch.no_grad():
        model(batch, attention_mask=torch.ones(2, 1, frames, frames, dtype=torch.bool))
        assert calls
        assert all(mask is None for mask in calls)
        calls.clear()
        model(waveforms(5000, 3000), padding_mask=padding_mask_from_lengths(torch.tensor([5000, 3000])))
        assert calls
        assert all(mask is not None for mask in calls)


@pytest.mark.parametrize("model_type", TYPES)
def test_deterministic_under_a_seed(model_type: str) -> None:
    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        model = tiny_model(model_type, seed=0).train()  # dropout and layer drop active
        torch.manual_seed(seed)
        losses, _ = model(waveforms(4000, 4000), mask=random_mask(2, num_frames(4000)))
        return losses.detach(), model.codebooks[0].codebook.clone()

    first, second, other = run(1), run(1), run(2)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])  # dropout draws changed
    a, b = tiny_model(model_type, seed=0).state_dict(), tiny_model(model_type, seed=1).state_dict()
    assert not torch.equal(a["student.layers.0.attention.qkv.weight"], b["student.layers.0.attention.qkv.weight"])


# ----------------------------------------------------------------------------------------------------------------
# Loss and metrics, from public pieces
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
@torch.no_grad()
def test_unmasked_loss_and_metrics_by_hand(model_type: str) -> None:
    """Without a mask every frame is scored and the student sees the plain features, so the heads' outputs are
    exactly ``get_codebooks``: loss = mean over codebooks of −log p(teacher label)."""
    model = tiny_model(model_type).eval()
    batch = waveforms(6000, 6000)
    losses, metrics = model(batch)
    scored = torch.ones(2, num_frames(6000), dtype=torch.bool)
    labels = teacher_labels(model, batch, scored)
    probs = [p[scored] for p in model.get_codebooks(batch)[-2:]]
    cross_entropy = [-p.log().gather(1, lab[:, None])[:, 0] for p, lab in zip(probs, labels, strict=True)]
    torch.testing.assert_close(losses, torch.stack(cross_entropy).mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        metrics["loss_per_codebook"], torch.stack([ce.mean() for ce in cross_entropy]), atol=1e-5, rtol=0
    )
    target_ppl = torch.stack([perplexity_of(F.one_hot(lab, 16).float()) for lab in labels]).float()
    pred_ppl = torch.stack([perplexity_of(p) for p in probs]).float()
    torch.testing.assert_close(metrics["target_ppl_per_codebook"], target_ppl, atol=1e-4, rtol=0)
    torch.testing.assert_close(metrics["pred_ppl_per_codebook"], pred_ppl, atol=1e-4, rtol=0)
    torch.testing.assert_close(metrics["target_ppl"], target_ppl.mean(), atol=1e-4, rtol=0)
    torch.testing.assert_close(metrics["pred_ppl"], pred_ppl.mean(), atol=1e-4, rtol=0)
    assert metrics["active_codewords"].tolist() == [len(lab.unique()) for lab in labels]
    assert int(metrics["num_frames"]) == losses.numel() == scored.sum()
    assert not any(value.requires_grad for value in metrics.values())


@pytest.mark.parametrize("model_type", TYPES)
@torch.no_grad()
def test_masked_frames_are_scored_in_row_major_order(model_type: str) -> None:
    model = tiny_model(model_type).eval()
    batch = waveforms(6000, 6000)
    mask = random_mask(2, num_frames(6000))
    losses, metrics = model(batch, mask=mask)
    assert losses.shape == (int(mask.sum()),)
    assert int(metrics["num_frames"]) == int(mask.sum())
    # the student sees the mask embedding at masked frames: the loss differs from the unmasked one there
    unmasked, _ = model(batch)
    assert not torch.allclose(losses, unmasked[mask.flatten()])


@pytest.mark.parametrize("model_type", TYPES)
@torch.no_grad()
def test_unmasked_forward_skips_padded_frames(model_type: str) -> None:
    model = tiny_model(model_type).eval()
    lengths = torch.tensor([6000, 3000])
    losses, metrics = model(waveforms(6000, 3000), padding_mask=padding_mask_from_lengths(lengths))
    assert losses.numel() == int(metrics["num_frames"]) == int(num_frames(lengths).sum())


@pytest.mark.parametrize("model_type", TYPES)
@torch.no_grad()
def test_valid_frame_target_norm_makes_a_padded_batch_score_like_per_utterance_runs(model_type: str) -> None:
    lengths = [8000, 3100]
    batch = waveforms(*lengths)
    padding = padding_mask_from_lengths(torch.tensor(lengths))
    mask = random_mask(2, padding.shape[1]) & ~padding

    def per_utterance_gap(model: DinoSR) -> float:
        batched, _ = model(batch, mask=mask, padding_mask=padding)
        alone = torch.cat([model(batch[i : i + 1, :length], mask=mask[i : i + 1, : num_frames(length)])[0]
                           for i, length in enumerate(lengths)])
        return float((batched - alone).abs().max())

    assert per_utterance_gap(tiny_model(model_type, target_norm_frames="valid").eval()) < 1e-4
    # the official norm counts the padding: the short utterance's targets (so its losses) change in a batch
    assert per_utterance_gap(tiny_model(model_type).eval()) > 1e-2


def test_valid_frame_instance_norm_is_the_instance_norm_of_the_valid_frames() -> None:
    from spidr.models.dinosr import _instance_norm

    y = torch.randn(3, 10, 4, dtype=torch.float64) * 5 + 2
    valid = torch.arange(10)[None, :] < torch.tensor([10, 6, 1])[:, None]
    out = _instance_norm(y, valid)
    for i, length in enumerate([10, 6, 1]):
        part = y[i, :length]
        expected = (part - part.mean(0)) / (part.var(0, unbiased=False) + 1e-5).sqrt()
        torch.testing.assert_close(out[i, :length], expected)
        assert torch.equal(out[i, length:], torch.zeros_like(out[i, length:]))
    torch.testing.assert_close(_instance_norm(y, torch.ones(3, 10, dtype=torch.bool)), _instance_norm(y, None))


# ----------------------------------------------------------------------------------------------------------------
# Codebook updates
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
def test_codebooks_update_in_training_only(model_type: str) -> None:
    model = tiny_model(model_type)
    batch, mask = waveforms(6000, 6000), random_mask(2, num_frames(6000))
    before = [c.codebook.clone() for c in model.codebooks]
    with torch.no_grad():
        model.eval()(batch, mask=mask)
    assert all(torch.equal(b, c.codebook) for b, c in zip(before, model.codebooks, strict=True))
    labels = teacher_labels(model, batch, mask)
    model.train()(batch, mask=mask)
    for codebook, old, lab in zip(model.codebooks, before, labels, strict=True):
        used = torch.zeros(16, dtype=torch.bool)
        used[lab] = True
        assert not torch.equal(codebook.codebook[used], old[used])
        assert torch.equal(codebook.codebook[~used], old[~used])
        assert codebook.codebook.dtype == torch.float32


@pytest.mark.parametrize("model_type", TYPES)
def test_codebooks_can_learn_from_every_frame_while_the_loss_scores_the_masked_ones(model_type: str) -> None:
    # Two utterances, the second padded. With every count decayed (re-seeding on, threshold 0: nothing re-seeded)
    # an EMA step sums to 0.9 · 16 + 0.1 · frames read, which tells whether the update read the masked frames
    # (official) or every non-padded one.
    lengths = (4000, 3000)
    batch = waveforms(*lengths)
    frames = num_frames(torch.tensor(lengths))
    padding = padding_mask_from_lengths(torch.tensor(lengths))
    mask = random_mask(2, int(frames.max())) & ~padding
    counted = {}
    for mode in ("masked", "all"):
        model = tiny_model(model_type, codebook_update_frames=mode, codebook_reseed_dead=True,
                           codebook_dead_threshold=0.0).train()
        losses, _ = model(batch, mask=mask, padding_mask=padding)
        assert losses.shape == (int(mask.sum()),)
        counted[mode] = [round((float(c.counts.sum()) - 0.9 * 16) / 0.1) for c in model.codebooks]
        if mode == "masked":
            reference = losses
        else:
            torch.testing.assert_close(losses, reference, rtol=0, atol=0)  # same loss, same scored frames
    assert counted == {"masked": [int(mask.sum())] * 2, "all": [int(frames.sum())] * 2}


@pytest.mark.parametrize("model_type", TYPES)
def test_dead_codewords_are_reseeded_from_the_batch_when_asked(model_type: str) -> None:
    # Counts start at 1; after one step unused ones hold 0.9 and used ones ≥ 1, with a known mean over the 16
    # codewords: a threshold putting the cut at 0.95 marks exactly this step's unused codewords.
    batch, mask = waveforms(3000, 3000), random_mask(2, num_frames(3000))
    mean_count = 0.9 + 0.1 * int(mask.sum()) / 16
    model = tiny_model(model_type, codebook_reseed_dead=True, codebook_dead_threshold=0.95 / mean_count).train()
    labels = teacher_labels(model, batch, mask)
    with torch.no_grad():
        outputs = model.teacher.get_intermediate_outputs(model.features(batch))[-2:]
        targets = [F.instance_norm(y.transpose(1, 2)).transpose(1, 2)[mask] for y in outputs]
    model(batch, mask=mask)
    for codebook, lab, z in zip(model.codebooks, labels, targets, strict=True):
        unused = torch.ones(16, dtype=torch.bool)
        unused[lab] = False
        assert unused.any()
        # restarted at twice the dead floor (threshold × mean count = 0.95), at least 1
        torch.testing.assert_close(codebook.counts[unused], torch.full((int(unused.sum()),), 1.9))
        # every re-seeded codeword is one of this batch's target vectors
        distances = torch.cdist(codebook.centroids[unused], z)
        assert distances.min(1).values.max().item() < 1e-5


@pytest.mark.parametrize("model_type", TYPES)
def test_pooled_codebook_updates_move_once_from_every_batch_and_restart_at_the_first_batch(model_type: str) -> None:
    """Inside codebook_updates_pooled, training forwards leave the codebooks as they are (each batch labelled by
    them) and the exit makes one EMA step from the two batches' counts: 0.9 · 1 + 0.1 · (its frames in both).
    Dead codewords (none taken by either batch) restart at a frame of the first batch, as at rank 0's."""
    first, second = waveforms(3000, 3000, seed=1), waveforms(3000, 3000, seed=2)
    mask_first, mask_second = random_mask(2, num_frames(3000), seed=1), random_mask(2, num_frames(3000), seed=2)
    total = int(mask_first.sum() + mask_second.sum())
    model = tiny_model(model_type, codebook_reseed_dead=True,
                       codebook_dead_threshold=0.95 / (0.9 + 0.1 * total / 16)).train()
    labels = [torch.cat(pair) for pair in zip(teacher_labels(model, first, mask_first),
                                                teacher_labels(model, second, mask_second), strict=True)]
    with torch.no_grad():
        outputs = model.teacher.get_intermediate_outputs(model.features(first))[-2:]
        first_targets = [F.instance_norm(y.transpose(1, 2)).transpose(1, 2)[mask_first] for y in outputs]
    before = [c.codebook.clone() for c in model.codebooks]
    with model.codebook_updates_pooled():
        model(first, mask=mask_first)
        model(second, mask=mask_second)
        assert all(torch.equal(b, c.codebook) for b, c in zip(before, model.codebooks, strict=True))
    for codebook, lab, z in zip(model.codebooks, labels, first_targets, strict=True):
        counts = torch.bincount(lab, minlength=16).float()
        used = counts > 0
        assert not used.all()
        torch.testing.assert_close(codebook.counts[used], 0.9 + 0.1 * counts[used])
        torch.testing.assert_close(codebook.counts[~used], torch.full((int((~used).sum()),), 1.9))
        assert torch.cdist(codebook.centroids[~used], z).min(1).values.max().item() < 1e-5

    # An error inside: no update at all, and the model updates its codebooks in each forward again.
    before = [c.codebook.clone() for c in model.codebooks]

    def failing_step() -> None:
        with model.codebook_updates_pooled():
            model(first, mask=mask_first)
            raise KeyError("a failing micro-batch")

    with pytest.raises(KeyError):
        failing_step()
    assert all(torch.equal(b, c.codebook) for b, c in zip(before, model.codebooks, strict=True))
    model(first, mask=mask_first)
    assert not all(torch.equal(b, c.codebook) for b, c in zip(before, model.codebooks, strict=True))
    with model.codebook_updates_pooled(), pytest.raises(RuntimeError, match="already active"), \
            model.codebook_updates_pooled():
        pass


@pytest.mark.parametrize("model_type", TYPES)
def test_dead_codewords_are_those_under_the_threshold_times_the_mean_count(model_type: str) -> None:
    """Hand-set counts with a mean far from 1: after the EMA step (unused codewords decaying too), the codewords
    whose count is under threshold × mean count restart at a batch vector with twice that floor as count (at least
    1); every other codeword keeps its EMA sum and count (a threshold taken absolutely marks another set here)."""
    model = tiny_model(model_type, codebook_reseed_dead=True, codebook_dead_threshold=0.2).train()
    tau = torch.tensor(model.cfg.codebook_decay, dtype=torch.float32)
    counts = torch.tensor([40.0, 30, 20, 10, 8, 6, 4, 3, 2, 1.5, 1.2, 1.0, 0.9, 0.5, 0.2, 0.1])
    dim = model.codebooks[0].codebook.shape[1]
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randn(6, dim, generator=generator) for _ in model.codebooks]
    labels = [torch.tensor([0, 0, 1, 11, 11, 15]), torch.tensor([2, 13, 13, 13, 14, 14])]
    starts = []
    for codebook in model.codebooks:
        codebook.counts.copy_(counts)
        codebook.codebook.copy_(torch.randn(16, dim, generator=generator))
        starts.append(codebook.codebook.clone())
    model._update_codebooks(targets, labels)
    for codebook, start, z, lab in zip(model.codebooks, starts, targets, labels, strict=True):
        onehot = F.one_hot(lab, 16).float()
        expected_counts = tau * counts + (1 - tau) * onehot.sum(0)
        expected_sums = tau * start + (1 - tau) * (onehot.T @ z)
        dead = expected_counts < 0.2 * expected_counts.mean()
        assert dead.any()
        assert not torch.equal(dead, expected_counts < 0.2)
        torch.testing.assert_close(codebook.counts[~dead], expected_counts[~dead])
        torch.testing.assert_close(codebook.codebook[~dead], expected_sums[~dead])
        restart = max(1.0, 2 * 0.2 * float(expected_counts.mean()))  # twice the floor, at least 1
        torch.testing.assert_close(codebook.counts[dead], torch.full((int(dead.sum()),), restart))
        assert torch.cdist(codebook.centroids[dead], z).min(1).values.max().item() < 1e-5


def test_a_restarted_codeword_on_a_live_cluster_is_not_restarted_again() -> None:
    """At 1,000 frames per codeword per step the dead floor (threshold 0.05 × mean count) is 50: a codeword restarted
    at count 1 had to win about half an average cluster at once, so one restarted on a cluster of 100 frames per step
    (twice the floor) was declared dead and restarted again every step. It now starts at twice the floor."""
    model = tiny_model("spidr", num_codebooks=1, codebook_size=4, codebook_reseed_dead=True,
                       codebook_dead_threshold=0.05).train()
    codebook = model.codebooks[0]
    dim = codebook.codebook.shape[1]
    centres = torch.zeros(4, dim)
    centres[range(4), range(4)] = 10.0
    sizes = (1300, 1300, 1300, 100)
    with torch.no_grad():
        codebook.counts.copy_(torch.tensor([1300.0, 1300, 1300, 0.01]))  # codeword 3 dead, far from any frame
        codebook.codebook.copy_(torch.cat([centres[:3], torch.full((1, dim), -1e3)]) * codebook.counts[:, None])
    restarts = []
    real_reseed = type(codebook).reseed

    def counting_reseed(self, unused, candidates, **kwargs):
        restarts.append(bool(unused[3]))
        # the restart lands on the small cluster (a random frame of the batch, here chosen)
        return real_reseed(self, unused, centres[3].expand_as(candidates).clone(), **kwargs)

    type(codebook).reseed = counting_reseed
    try:
        for step in range(8):
            generator = torch.Generator().manual_seed(step)
            z = torch.cat([centres[v] + 0.1 * torch.randn(n, dim, generator=generator) for v, n in enumerate(sizes)])
            model._update_codebooks([z], [codebook.assign(z)])
    finally:
        type(codebook).reseed = real_reseed
    assert restarts[0]  # the dead codeword is restarted once...
    assert not any(restarts[1:])  # ...and then lives on its 100 frames per step (it was restarted at every step)
    assert torch.cdist(codebook.centroids[3:], centres).argmin().item() == 3


# ----------------------------------------------------------------------------------------------------------------
# Teacher, EMA, freezing
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
def test_teacher_is_a_frozen_reinitialised_copy(model_type: str) -> None:
    model = tiny_model(model_type)
    assert not model.teacher.training
    model.train()
    assert model.student.training
    assert not model.teacher.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert list(student) == list(teacher)
    for key in student:
        same = torch.equal(student[key], teacher[key])
        # pos-conv and LayerNorms are copied; Linear weights are re-drawn (their biases are zero in both: §4.1)
        assert same == ("pos_conv_embed" in key or "layer_norm" in key or key.endswith(".bias")), key
    losses, _ = model(waveforms(4000, 4000), mask=random_mask(2, num_frames(4000)))
    losses.mean().backward()
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("model_type", TYPES)
def test_teacher_init_copy_starts_the_teacher_as_the_student(model_type: str) -> None:
    """model.teacher_init = "copy" (fairseq DinoSR): every teacher weight equals the student's at step 0 (the
    default draws fresh linear weights: above; the official seeded weights: test_models_parity)."""
    model = tiny_model(model_type, teacher_init="copy")
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert list(student) == list(teacher)
    assert all(torch.equal(student[key], teacher[key]) for key in student)
    assert teacher["layers.0.attention.qkv.weight"].dtype == torch.float32
    assert not any(p.requires_grad for p in model.teacher.parameters())


@pytest.mark.parametrize("model_type", TYPES)
@torch.no_grad()
def test_update_ema(model_type: str) -> None:
    model = tiny_model(model_type)
    for p in model.student.parameters():  # make the student differ from the teacher everywhere
        p.add_(torch.randn_like(p) * 0.1)
    student = {k: v.clone() for k, v in model.student.state_dict().items()}
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    decay = model.update_ema(1000)
    assert decay == model.ema_decay(1000)
    assert 0 < decay < 1
    assert int(model.current_step) == 1000
    for key, value in model.teacher.state_dict().items():
        if key.startswith("pos_conv_embed"):
            assert torch.equal(value, student[key]), key
        else:
            expected = decay * teacher[key].double() + (1 - decay) * student[key].double()
            torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=0)
    assert not model.feature_encoder_frozen


@pytest.mark.parametrize("model_type", TYPES)
def test_freeze_step_freezes_the_feature_encoder_and_the_teacher(model_type: str) -> None:
    model = tiny_model(model_type, freeze_step=50)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    decay = model.update_ema(50)
    assert model.feature_encoder_frozen
    if model_type == "dinosr":  # DinoSR's teacher freezes at freeze_step too; SpidR's follows its own threshold
        assert decay == 1.0
        assert all(torch.equal(v, teacher[k]) for k, v in model.teacher.state_dict().items())
    else:
        assert 0 < decay < 1
    losses, _ = model.train()(waveforms(4000, 4000), mask=random_mask(2, num_frames(4000)))
    losses.mean().backward()
    assert all(p.grad is None for p in model.feature_extractor.parameters())
    assert all(p.grad is None for p in model.feature_projection.parameters())
    assert model.mask_embedding.grad is not None


@pytest.mark.parametrize("mult", [0.5, 0.0])
def test_feature_grad_mult(mult: float) -> None:
    def extractor_grads(model: DinoSR) -> list[torch.Tensor | None]:
        losses, _ = model.eval()(waveforms(4000, 4000), mask=random_mask(2, num_frames(4000)))
        losses.mean().backward()
        return [p.grad for p in model.feature_extractor.parameters()]

    reference = extractor_grads(tiny_model("spidr"))
    scaled = extractor_grads(tiny_model("spidr", feature_grad_mult=mult))
    for ref, got in zip(reference, scaled, strict=True):
        if mult == 0.0:
            assert got is None
        else:
            torch.testing.assert_close(got, ref * mult, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Mixed precision, API shapes, errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
def test_bf16_autocast_keeps_targets_and_loss_in_fp32(model_type: str, monkeypatch) -> None:
    model = tiny_model(model_type).train()
    for module in model.modules():  # no dropout: compare with the fp32 run
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, SelfAttention):
            module.dropout = 0.0
    assign_dtypes = []
    assign = Codebook.assign

    def recording(self, z):
        assign_dtypes.append(z.dtype)
        return assign(self, z)

    monkeypatch.setattr(Codebook, "assign", recording)
    batch, mask = waveforms(6000, 6000), random_mask(2, num_frames(6000))
    reference, _ = model.eval()(batch, mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, metrics = model.train()(batch, mask=mask)
    assert losses.dtype == torch.float32
    assert set(assign_dtypes) == {torch.float32}
    assert all(c.codebook.dtype == torch.float32 for c in model.codebooks)
    assert torch.isfinite(losses).all()
    assert metrics["target_ppl"].dtype == torch.float32
    torch.testing.assert_close(losses.mean(), reference.mean(), atol=0.05, rtol=0)
    losses.mean().backward()
    assert model.mask_embedding.grad is not None


@pytest.mark.parametrize("model_type", TYPES)
@torch.no_grad()
def test_get_codebooks_shapes(model_type: str) -> None:
    model = tiny_model(model_type).eval()
    frames = num_frames(4000)
    probs = model.get_codebooks(waveforms(4000))
    assert probs[0] is None
    assert [p.shape for p in probs[1:]] == [(1, frames, 16)] * 2  # batch dim kept for B = 1
    torch.testing.assert_close(probs[-1].sum(-1), torch.ones(1, frames))
    onehot = model.get_codebooks(waveforms(4000), onehot=True)
    assert onehot[-1].dtype == torch.int64
    assert torch.equal(onehot[-1].argmax(-1), probs[-1].argmax(-1))
    assert torch.equal(onehot[-1].sum(-1), torch.ones(1, frames, dtype=torch.int64))


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("layer_norm_first", [False, True])
@torch.no_grad()
def test_layers_and_codebooks_from_one_pass_equal_the_two_calls(model_type: str, layer_norm_first: bool) -> None:
    """Extraction with codebook units ran the model twice (layer outputs, then codebooks); one pass must give what
    each call gives, bit for bit, in both feature modes, with padding, pre-norm (final LayerNorm) or post-norm."""
    model = tiny_model(model_type, encoder_layer_norm_first=layer_norm_first).eval()
    batch = waveforms(6000, 4000)
    padding = padding_mask_from_lengths(torch.tensor([6000, 4000]), model.cfg.extractor_conv_layer_config)
    codebooks = model.get_codebooks(batch, padding_mask=padding)
    for before_residual in (True, False):
        for num_layers in (None, 1, 3):
            layers, probabilities = model.get_layers_and_codebooks(
                batch, padding_mask=padding, before_residual=before_residual, num_layers=num_layers)
            expected = model.get_intermediate_outputs(batch, padding_mask=padding, before_residual=before_residual,
                                                      num_layers=num_layers)
            assert len(layers) == len(expected) == (num_layers or 3)
            for got, want in zip(layers, expected, strict=True):
                assert torch.equal(got, want)
            assert probabilities[0] is None
            for got, want in zip(probabilities[1:], codebooks[1:], strict=True):
                assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="eval"):
        model.train().get_layers_and_codebooks(batch)


def test_bad_input_is_rejected() -> None:
    model = tiny_model("spidr").eval()
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        model(torch.randn(4000))
    with pytest.raises(ValueError, match="shorter than one frame"):
        model(torch.randn(2, 399))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model(waveforms(4000), mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="SpidRConfig"):
        SpidR(DinoSRConfig())
    with pytest.raises(TypeError, match=r"waveforms must be a torch.Tensor of shape \(B, S\), got a ndarray"):
        model.get_intermediate_outputs(waveforms(4000).numpy())


def test_non_finite_waveforms_are_refused_in_inference_and_left_to_the_loss_in_training() -> None:
    """A NaN sample made every frame of its utterance NaN with no word; a training forward does not check (that
    would read the device every step) and leaves it to the trainer's skip of non-finite losses."""
    model = tiny_model("spidr").eval()
    wave = waveforms(4000, 4000)
    wave[1, 17] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf samples \(batch rows \[1\]\)"):
        model.get_intermediate_outputs(wave)
    wave[1, 17] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(wave)
    mask = random_mask(2, num_frames(4000, CONV))
    losses, _ = model.train()(wave, mask=mask)  # not refused: the trainer skips a step whose loss is not finite
    assert losses.shape == (int(mask.sum()),)


@torch.no_grad()
def test_waveforms_of_another_float_dtype_are_cast_to_the_model_s():
    """soundfile reads float64: such a batch used to fail deep in the first conv ("expected scalar type Double")."""
    model = tiny_model("spidr").eval()
    wave = waveforms(4000, 3000)
    expected = model.get_intermediate_outputs(wave)
    for given in (wave.double(), wave.half().float().double()):
        got = model.get_intermediate_outputs(given)
        assert got[0].dtype == torch.float32
        tolerance = 0 if given.equal(wave.double()) else 1e-2
        for a, b in zip(got, model.get_intermediate_outputs(given.float()), strict=True):
            assert torch.equal(a, b)  # the same as casting first
        torch.testing.assert_close(got[-1], expected[-1], atol=tolerance, rtol=tolerance)
    # a training forward too, whose EMA teacher front end reads the waveforms apart from the student's
    ema, twin = (tiny_model("spidr", teacher_feature_encoder="ema").train() for _ in range(2))
    mask = random_mask(2, num_frames(4000, CONV))
    torch.manual_seed(0)  # the same dropout
    losses, _ = ema(wave.double(), mask=mask)
    torch.manual_seed(0)
    assert torch.equal(losses, twin(wave, mask=mask)[0])


@pytest.mark.parametrize("model_type", TYPES)
def test_decaying_unused_codewords_keeps_their_centroids(model_type: str) -> None:
    model = tiny_model(model_type, codebook_reseed_dead=True, codebook_dead_threshold=0.0).train()
    batch, mask = waveforms(3000, 3000), random_mask(2, num_frames(3000))
    labels = teacher_labels(model, batch, mask)
    before = [(c.centroids.clone(), c.counts.clone()) for c in model.codebooks]
    model(batch, mask=mask)
    for codebook, (centroids, counts), lab in zip(model.codebooks, before, labels, strict=True):
        unused = torch.ones(16, dtype=torch.bool)
        unused[lab] = False
        torch.testing.assert_close(codebook.centroids[unused], centroids[unused], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(codebook.counts[unused], 0.9 * counts[unused])


@pytest.mark.parametrize("model_type", TYPES)
def test_codebooks_initialised_from_data_at_the_first_training_step_only(model_type: str) -> None:
    model = tiny_model(model_type, codebook_init="data").train()
    batch, mask = waveforms(3000, 3000), random_mask(2, num_frames(3000))
    with torch.no_grad():
        outputs = model.teacher.get_intermediate_outputs(model.features(batch))[-2:]
        targets = [F.instance_norm(y.transpose(1, 2)).transpose(1, 2)[mask] for y in outputs]
    model.eval()(batch, mask=mask)  # evaluation never initialises
    assert not model._codebooks_from_data
    model.train()
    _, metrics = model(batch, mask=mask)
    for codebook, z in zip(model.codebooks, targets, strict=True):
        # after one EMA step every centroid is still within the batch's span: far closer than the random init
        assert torch.cdist(codebook.centroids, z).min(1).values.max() < 0.5 * z.norm(dim=1).mean()
    # the first-step targets used the data codebook: many distinct codewords, not a handful
    assert (metrics["active_codewords"] >= 8).all()
    snapshot = [c.codebook.clone() for c in model.codebooks]
    model.update_ema(1)
    model(batch, mask=mask)
    assert any(not torch.equal(s, c.codebook) for s, c in zip(snapshot, model.codebooks, strict=True))
    assert model._codebooks_from_data


# ----------------------------------------------------------------------------------------------------------------
# teacher_feature_encoder = "ema": the teacher's own EMA front end
# ----------------------------------------------------------------------------------------------------------------


def _front_end(model: DinoSR, *, teacher: bool) -> list[torch.Tensor]:
    if teacher:
        modules = (model.teacher_feature_extractor, model.teacher_feature_projection)
    else:
        modules = (model.feature_extractor, model.feature_projection)
    return [p for module in modules for p in module.parameters()]


@pytest.mark.parametrize("model_type", TYPES)
def test_ema_front_end_starts_as_the_shared_one(model_type):
    """Same seed: identical weights and an identical first loss as the official shared front end; the extra modules
    are teacher-only (no gradients, left out of the optimizer by the "teacher" prefix)."""
    shared = tiny_model(model_type).train()
    own = tiny_model(model_type, teacher_feature_encoder="ema").train()
    shared_state = shared.state_dict()
    own_state = own.state_dict()
    assert set(own_state) - set(shared_state) == {k for k in own_state if k.startswith("teacher_feature_")}
    for key, value in shared_state.items():
        assert torch.equal(value, own_state[key]), key
    assert all(not p.requires_grad for p in _front_end(own, teacher=True))
    wave = waveforms(16000, 12000)
    mask = random_mask(2, num_frames(16000))
    torch.manual_seed(1)
    loss_shared, _ = shared(wave, mask=mask)
    torch.manual_seed(1)
    loss_own, _ = own(wave, mask=mask)
    torch.testing.assert_close(loss_own, loss_shared, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", TYPES)
def test_ema_front_end_shields_the_targets_from_the_student_front_end(model_type):
    """Perturbing the student's conv front end changes the targets with a shared front end, not with an EMA one."""
    wave = waveforms(16000)
    scored = torch.ones(1, num_frames(16000), dtype=torch.bool)
    for mode, should_change in (("shared", True), ("ema", False)):
        model = tiny_model(model_type, teacher_feature_encoder=mode).eval()
        with torch.no_grad():
            before = model._teacher_targets(model._teacher_features(wave, model.features(wave)), _no_padding(wave))
            for p in _front_end(model, teacher=False):
                p.add_(torch.randn_like(p) * 0.5)
            after = model._teacher_targets(model._teacher_features(wave, model.features(wave)), _no_padding(wave))
        changed = any(not torch.equal(a[scored], b[scored]) for a, b in zip(after, before, strict=True))
        assert changed == should_change, mode


def _no_padding(wave: torch.Tensor):
    from spidr.models.components import frame_masks

    return frame_masks(torch.zeros(wave.shape[0], num_frames(wave.shape[1]), 1))


@pytest.mark.parametrize("model_type", TYPES)
def test_ema_front_end_follows_the_student_with_the_teacher_decay(model_type):
    model = tiny_model(model_type, teacher_feature_encoder="ema").train()
    with torch.no_grad():
        for p in _front_end(model, teacher=False):
            p.add_(torch.randn_like(p))
    teacher_before = [p.clone() for p in _front_end(model, teacher=True)]
    student = [p.detach().clone() for p in _front_end(model, teacher=False)]
    decay = model.update_ema(1)
    assert 0 < decay < 1
    weight = float(1 - torch.tensor(decay, dtype=torch.float32))
    for after, before, target in zip(_front_end(model, teacher=True), teacher_before, student, strict=True):
        torch.testing.assert_close(after, before + weight * (target - before))
    assert not torch.equal(_front_end(model, teacher=True)[0], student[0])


def test_ema_front_end_survives_a_safetensors_round_trip(tmp_path):
    from spidr.models.loading import export_safetensors, load_model

    model = tiny_model("spidr", teacher_feature_encoder="ema")
    with torch.no_grad():
        for p in _front_end(model, teacher=True):
            p.add_(1.0)  # make the teacher's copy differ from the student's
    export_safetensors(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.cfg.teacher_feature_encoder == "ema"
    for a, b in zip(_front_end(loaded, teacher=True), _front_end(model, teacher=True), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model_type", TYPES)
def test_a_compiled_training_step_is_not_recompiled_at_the_next_step(model_type):
    """``run.compile`` (CUDA) compiles the model with ``dynamic=True``: the next steps' new tensors of the same
    shapes must reuse the compiled code. (An ``id()`` of a step's tensor in the forward became a guard on that very
    object: every step recompiled the rest of the forward until Dynamo's recompile limit, then ran it eagerly.)"""
    torch._dynamo.reset()
    model = tiny_model(model_type).train()
    compiled = torch.compile(model, backend="eager", dynamic=True)
    generator = torch.Generator().manual_seed(0)
    frames = num_frames(4000, CONV)

    def step() -> None:
        mask = torch.rand(2, frames, generator=generator) < 0.5
        losses, _ = compiled(F.layer_norm(torch.randn(2, 4000, generator=generator), (4000,)), mask=mask)
        losses.float().sum().backward()

    try:
        step()
        with torch._dynamo.config.patch(error_on_recompile=True):
            step()
            step()
    finally:
        torch._dynamo.reset()  # no compiled code left behind for the other tests


@pytest.mark.parametrize("model_type", TYPES)
def test_a_compiled_training_forward_is_one_graph(model_type):
    """The training forward (with the loader's masked-frame count) compiles to one graph: no graph break for the
    layer-drop draws (SpidR: layer drop 0, nothing drawn; DinoSR: 0.05, skips chosen on the device), none to find
    the scored frames. A break inside the layer loop made Dynamo run the rest of the loop eagerly."""
    torch._dynamo.reset()
    model = tiny_model(model_type).train()
    mask = torch.rand(2, num_frames(4000, CONV), generator=torch.Generator().manual_seed(0)) < 0.5
    waves = F.layer_norm(torch.randn(2, 4000, generator=torch.Generator().manual_seed(1)), (4000,))
    try:
        explained = torch._dynamo.explain(model)(waves, mask=mask, mask_count=int(mask.sum()))
    finally:
        torch._dynamo.reset()
    assert model.cfg.encoder_layer_drop == (0.0 if model_type == "spidr" else 0.05)
    assert explained.graph_break_count == 0, [str(r.reason)[:120] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("model_type", TYPES)
def test_evaluation_draws_no_random_numbers(model_type: str) -> None:
    """Eval mode draws nothing from the global generator (the official transformer draws its layer-drop numbers only
    in training): validating between training steps leaves the training's dropout masks unchanged."""
    model = tiny_model(model_type, encoder_layer_drop=0.1).eval()
    batch = waveforms(3000, 3000)
    mask = torch.rand(2, num_frames(3000), generator=torch.Generator().manual_seed(0)) < 0.5
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with torch.no_grad():
        model(batch, mask=mask)
        model.get_intermediate_outputs(batch)
        model.get_codebooks(batch)
    assert torch.equal(torch.get_rng_state(), state)


NO_RANDOMNESS = {  # every dropout and the layer drop off: a training forward is then deterministic
    "encoder_dropout": 0.0,
    "encoder_attention_dropout": 0.0,
    "encoder_ff_interm_dropout": 0.0,
    "encoder_layer_drop": 0.0,
}


@pytest.mark.parametrize("model_type", TYPES)
def test_projection_dropout_drops_the_features_and_spares_the_mask_embedding(model_type: str) -> None:
    """x = Drop₀(feats), then masked frames := mask embedding. With encoder_projection_dropout = 1 (every other
    dropout and the layer drop off) the student's input is exactly where(mask, mask embedding, 0): the training loss
    is then the cross-entropy of heads fed that input, against the teacher's labels of the clean features."""
    model = tiny_model(model_type, encoder_projection_dropout=1.0, **NO_RANDOMNESS).train()
    batch, mask = waveforms(4000, 4000), random_mask(2, num_frames(4000))
    labels = teacher_labels(model, batch, mask)  # taken before the forward's codebook update, as the forward does
    with torch.no_grad():
        feats = model.features(batch)
        x = torch.where(mask[..., None], model.mask_embedding, torch.zeros_like(feats))
        if model_type == "spidr":
            inputs = model.student.get_intermediate_outputs(x)[-model.num_codebooks :]
        else:
            inputs = [model.student(x)] * model.num_codebooks
        cross_entropies = [-head(h[mask]).gather(1, lab[:, None])[:, 0]
                           for head, h, lab in zip(model.heads, inputs, labels, strict=True)]
        expected = torch.stack(cross_entropies).mean(0)
    losses, _ = model(batch, mask=mask)
    torch.testing.assert_close(losses.detach(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
def test_data_init_leaves_the_codebooks_of_a_model_resumed_past_step_0(model_type: str) -> None:
    """codebook_init = "data" happens at step 0 only: a model whose current_step says it was resumed later (its
    codebooks came from the checkpoint) trains exactly like its codebook_init = "random" twin."""
    batch, mask = waveforms(3000, 3000), random_mask(2, num_frames(3000))
    results = []
    for init in ("data", "random"):
        model = tiny_model(model_type, codebook_init=init).train()
        model.current_step.fill_(7)
        torch.manual_seed(0)  # the same dropout draws
        losses, _ = model(batch, mask=mask)
        results.append((losses.detach(), [c.codebook.clone() for c in model.codebooks],
                        [c.counts.clone() for c in model.codebooks]))
    (data_losses, data_books, data_counts), (losses, books, counts) = results
    assert torch.equal(data_losses, losses)
    assert all(torch.equal(a, b) for a, b in zip(data_books, books, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(data_counts, counts, strict=True))


@pytest.mark.parametrize("model_type", TYPES)
def test_codebook_decay_one_freezes_the_codebooks_even_with_reseeding(model_type: str) -> None:
    """Spec §3.10: the codebooks update only while decay < 1. With codebook_decay = 1 nothing moves, and dead-codeword
    re-seeding, part of the update, does not run either (a threshold of 0.95 × the mean count would restart many)."""
    model = tiny_model(model_type, codebook_decay=1.0, codebook_reseed_dead=True,
                       codebook_dead_threshold=0.95).train()
    with torch.no_grad():  # unequal counts, so that a reseed would have dead codewords to restart
        for codebook in model.codebooks:
            codebook.counts.copy_(torch.linspace(0.1, 3.0, codebook.counts.numel()))
    before = [(c.codebook.clone(), c.counts.clone()) for c in model.codebooks]
    model(waveforms(3000, 3000), mask=random_mask(2, num_frames(3000)))
    for codebook, (sums, counts) in zip(model.codebooks, before, strict=True):
        assert torch.equal(codebook.codebook, sums)
        assert torch.equal(codebook.counts, counts)


def test_a_dead_codeword_restarts_with_a_count_of_at_least_one() -> None:
    """A restart count is twice the dead floor (threshold × mean count), but at least 1: with the default threshold
    0.05 and a mean count near 8.5, twice the floor is 0.85, so the restarted codeword gets count 1 exactly (and
    its centroid is a batch vector)."""
    model = tiny_model("spidr", num_codebooks=1, codebook_reseed_dead=True).train()
    codebook = model.codebooks[0]
    dim = codebook.codebook.shape[1]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        codebook.counts.copy_(torch.tensor([10.0] * 15 + [0.01]))
        codebook.codebook.copy_(torch.randn(16, dim, generator=generator) * codebook.counts[:, None])
    z = torch.randn(6, dim, generator=generator)
    labels = torch.tensor([0, 1, 2, 2, 3, 4])  # codeword 15 unused: 0.009 after the step, far under the floor
    model._update_codebooks([z], [labels])
    expected_mean = (0.9 * (150.0 + 0.01) + 0.1 * 6) / 16
    assert 2 * 0.05 * expected_mean < 1  # the clamp is what decides here
    assert codebook.counts[15].item() == 1.0
    assert torch.cdist(codebook.centroids[15:], z).min().item() < 1e-5
    assert (codebook.counts[:15] > 1.0).all()  # no other codeword was dead


@pytest.mark.parametrize("model_type", TYPES)
def test_a_training_forward_with_no_masked_frame_gives_empty_losses_and_finite_metrics(model_type: str) -> None:
    """masking.min_masks = 0 can give a batch with no masked frame (the trainer then skips the step): the forward
    must not fail, even with dead-codeword re-seeding (random rows of an empty batch), and its metrics stay finite
    (perplexities of no frame are 1, losses 0) instead of 0 / 0."""
    model = tiny_model(model_type, codebook_reseed_dead=True).train()
    before = [c.centroids.clone() for c in model.codebooks]
    mask = torch.zeros(2, num_frames(3000), dtype=torch.bool)
    losses, metrics = model(waveforms(3000, 3000), mask=mask)
    assert losses.shape == (0,)
    assert int(metrics["num_frames"]) == 0
    for name, value in metrics.items():
        assert torch.isfinite(value.float()).all(), name
    assert metrics["loss_per_codebook"].tolist() == [0.0, 0.0]
    assert metrics["target_ppl"].item() == pytest.approx(1.0)
    for codebook, centroids in zip(model.codebooks, before, strict=True):  # decayed sums and counts: same centres
        torch.testing.assert_close(codebook.centroids, centroids)


@torch.no_grad()
def test_an_exported_student_honours_the_padding_mask() -> None:
    """The inference half (what load_model gives for a Hugging Face directory) must treat a padded batch like each
    utterance alone, as DinoSR.get_intermediate_outputs does."""
    model = tiny_model("spidr")
    student = Student(model.cfg)
    result = student.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    student.eval()
    lengths = [6000, 3100]
    batch = waveforms(*lengths)
    padding = padding_mask_from_lengths(torch.tensor(lengths), model.cfg.extractor_conv_layer_config)
    for before_residual in (True, False):
        batched = student.get_intermediate_outputs(batch, padding_mask=padding, before_residual=before_residual)
        for i, length in enumerate(lengths):
            alone = student.get_intermediate_outputs(batch[i : i + 1, :length], before_residual=before_residual)
            frames = num_frames(length, model.cfg.extractor_conv_layer_config)
            for b, a in zip(batched, alone, strict=True):
                torch.testing.assert_close(b[i : i + 1, :frames], a, atol=1e-5, rtol=0)


def _scored_targets(model, batch: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The teacher targets of the scored frames, written out: top-K before-residual outputs, instance-normalised."""
    with torch.no_grad():
        outputs = model.teacher.get_intermediate_outputs(model.features(batch))[-model.num_codebooks :]
        return [torch.nn.functional.instance_norm(y.transpose(1, 2)).transpose(1, 2)[mask] for y in outputs]


def test_data_init_draws_random_frames_of_the_batch_not_its_first_ones() -> None:
    """codebook_init = "data": the centroids are *random* distinct target frames. With 98 scored frames and 16
    codewords (codebook_decay = 1: the EMA step leaves them as drawn), the chosen frames are distinct, are not the
    batch's first 16, and change with the global seed."""
    batch = waveforms(16000, 16000)
    mask = torch.ones(2, num_frames(16000), dtype=torch.bool)
    chosen = []
    for seed in (0, 1):
        model = tiny_model("spidr", num_codebooks=1, codebook_init="data", codebook_decay=1.0).train()
        targets = _scored_targets(model, batch, mask)[0]
        assert len(targets) > 4 * 16
        torch.manual_seed(seed)
        model(batch, mask=mask)
        distances = torch.cdist(model.codebooks[0].centroids, targets, compute_mode="donot_use_mm_for_euclid_dist")
        assert distances.min(1).values.max().item() < 1e-4  # every centroid is a target frame
        rows = distances.argmin(1)
        assert len(set(rows.tolist())) == 16  # distinct frames
        chosen.append(set(rows.tolist()))
    assert chosen[0] != set(range(16))
    assert chosen[0] != chosen[1]


def test_on_another_rank_restarts_come_from_rank_0_s_frames_only(monkeypatch) -> None:
    """The restart candidates are broadcast as a sum in which every rank but 0 puts zeros, so every rank restarts
    its codewords at rank 0's frames. Simulated rank 1: the all-reduce adds rank 0's candidates; a data-initialised
    codebook (decay 1: no EMA step after it) must then hold exactly rank 0's candidates."""
    from spidr import distributed

    model = tiny_model("spidr", num_codebooks=1, codebook_init="data", codebook_decay=1.0).train()
    dim, size = model.cfg.encoder_embed_dim, model.cfg.codebook_size
    rank0 = torch.randn(1, size, dim, generator=torch.Generator().manual_seed(3))

    def all_reduce_sum(tensor):
        if tensor.shape == (rank0.numel() + 1,):  # the candidates (K, V, D) and rank 0's frame count, flat
            tensor[:-1].add_(rank0.flatten())
            tensor[-1] += 12  # (the statistics are (K, V, 1 + D))
        return tensor

    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_sum)
    model(waveforms(4000, 4000), mask=random_mask(2, num_frames(4000)))
    torch.testing.assert_close(model.codebooks[0].centroids, rank0[0], atol=0, rtol=0)


def test_data_init_on_a_rank_0_batch_without_masked_frames_does_not_collapse_the_codebook(monkeypatch) -> None:
    """masking.min_masks = 0 can leave rank 0 without a masked frame while another rank has some, so the trainer
    does not skip the step (it skips only when no rank has a frame). The data initialisation broadcasts rank 0's
    candidates: zeros. Expected: the initialisation stays due (or takes frames that exist), not 16 equal centroids.
    Simulated rank 0: the all-reduce adds rank 1's statistics (its 50 frames, all on codeword 0: with every centroid
    at 0, the first codeword wins every tie)."""
    from spidr import distributed

    model = tiny_model("spidr", codebook_init="data").train()
    dim, size = model.cfg.encoder_embed_dim, model.cfg.codebook_size
    frames = torch.randn(50, dim, generator=torch.Generator().manual_seed(0))
    other_rank = torch.zeros(model.num_codebooks, size, 1 + dim)
    other_rank[:, 0, 0], other_rank[:, 0, 1:] = 50.0, frames.sum(0)

    def all_reduce_sum(tensor):
        if tensor.shape == other_rank.shape:  # statistics; the candidates get rank 1's zeros
            tensor.add_(other_rank)
        return tensor

    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_sum)
    model(waveforms(4000, 4000), mask=torch.zeros(2, num_frames(4000), dtype=torch.bool))
    distinct = [len(torch.unique(c.centroids, dim=0)) for c in model.codebooks]
    assert model.codebook_init_due or distinct == [size] * model.num_codebooks, distinct


@pytest.mark.parametrize("model_type", ["spidr", "dinosr"])
@pytest.mark.parametrize("pooled", [False, True])
def test_codebook_statistics_are_summed_over_ranks_before_the_ema_step(monkeypatch, model_type, pooled):
    """Simulated 2 identical ranks: the all-reduce of the (K, V, 1 + D) statistics doubles them, so a used
    codeword's count becomes 0.9 · 1 + 0.1 · (2 × its frames), pooled (once, from both micro-batches) or not.
    Without the collective every rank would move its codebooks from its own frames only and the ranks' codebooks
    would drift apart."""
    from spidr import distributed

    calls = []

    def all_reduce_sum(tensor):
        if tensor.dim() == 3:  # the codebook statistics (K, V, 1 + D); the metrics are a flat vector
            calls.append(tuple(tensor.shape))
            tensor.mul_(2)
        return tensor

    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_sum)
    model = tiny_model(model_type).train()
    batches = [(waveforms(3000, 3000, seed=1), random_mask(2, num_frames(3000), seed=1))]
    if pooled:
        batches.append((waveforms(3000, 3000, seed=2), random_mask(2, num_frames(3000), seed=2)))
    labels = [torch.cat(per_batch) for per_batch in zip(*(teacher_labels(model, w, m) for w, m in batches),
                                                        strict=True)]
    if pooled:
        with model.codebook_updates_pooled():
            for wave, mask in batches:
                model(wave, mask=mask)
    else:
        model(*batches[0][:1], mask=batches[0][1])
    assert calls == [(2, 16, 1 + model.cfg.encoder_embed_dim)]  # one collective per optimizer step
    for codebook, lab in zip(model.codebooks, labels, strict=True):
        counts = torch.bincount(lab, minlength=16).float()
        used = counts > 0
        torch.testing.assert_close(codebook.counts[used], 0.9 + 0.1 * 2 * counts[used])
        torch.testing.assert_close(codebook.counts[~used], torch.ones(int((~used).sum())))
