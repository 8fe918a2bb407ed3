"""The log-mel front end (``model.extractor_type = "log_mel"``): the MFCC baseline's filterbank, the conv front end's
frame grid, fp32 under autocast, and the model invariances with it (padding, batch, no state-dict entries)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.fft import dct

from spidr.config import SpidRConfig
from spidr.eval.mfcc import NUM_CEPS, PRE_EMPHASIS, mel_filterbank, mfcc
from spidr.models import build_model, num_frames, padding_mask_from_lengths
from spidr.models.commands import _front_end
from spidr.models.log_mel import LogMelFilterbank, warp_frequencies
from train_fixtures import speech_like

LOG_MEL = ((40, 400, 320),)


def log_mel_model(seed: int = 0, conv=LOG_MEL, **overrides):
    cfg = SpidRConfig(extractor_type="log_mel", extractor_conv_layer_config=conv, encoder_embed_dim=32,
                      encoder_num_layers=2, encoder_num_heads=2, encoder_ff_interm_features=64,
                      encoder_pos_conv_groups=4, num_codebooks=2, codebook_size=16, **overrides)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def test_its_cepstra_are_the_mfcc_baseline() -> None:
    """[40, 400, 320] is the MFCC baseline before its DCT: the same pre-emphasis, window, frames and filters."""
    wave = np.random.default_rng(0).standard_normal(16000) * 0.1
    log_mel = LogMelFilterbank(40, 400, 320)(torch.from_numpy(wave).float()[None, None])[0].T.numpy()  # (T, 40)
    cepstra = dct(log_mel.astype(np.float64), type=2, axis=1, norm="ortho")[:, :NUM_CEPS]
    reference = mfcc(wave)[:, :NUM_CEPS]
    assert cepstra.shape == reference.shape == (49, NUM_CEPS)
    np.testing.assert_allclose(cepstra, reference, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("samples", [1040, 1359, 1360, 16000, 32123])
def test_frame_count_is_the_conv_layer_formula(samples: int) -> None:
    model = log_mel_model(conv=((40, 400, 320), (24, 3, 1)))
    feats = model.features(torch.randn(1, samples))
    assert feats.shape == (1, num_frames(samples, model.cfg.extractor_conv_layer_config), 32)


def test_a_pure_tone_peaks_in_the_filter_of_its_frequency() -> None:
    bank = LogMelFilterbank(40, 400, 320)
    t = torch.arange(8000) / 16000
    out = bank(torch.sin(2 * torch.pi * 1000.0 * t)[None, None])  # (1, 40, T)
    peak = int(out[0].mean(dim=1).argmax())
    centre = (bank.filters[peak] * torch.linspace(0, 8000, bank.filters.shape[1])).sum() / bank.filters[peak].sum()
    assert abs(float(centre) - 1000.0) < 120.0


def test_stays_fp32_under_bf16_autocast_and_has_no_state() -> None:
    bank = LogMelFilterbank(40, 400, 320)
    x = torch.randn(2, 1, 4000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = bank(x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, bank(x))
    model = log_mel_model()
    assert not any(key.startswith("feature_extractor.") for key in model.state_dict())
    assert model.feature_extractor.conv_layers[0].filters.shape == (40, 257)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_a_model_cast_to_low_precision_keeps_an_fp32_filterbank(dtype: torch.dtype) -> None:
    """``model.to(bf16)`` once cast the filters too, and the fp32 spectrum then met bf16 filters in a matmul."""
    reference = log_mel_model(conv=((40, 400, 320), (24, 3, 1)))
    model = log_mel_model(conv=((40, 400, 320), (24, 3, 1))).to(dtype)
    bank = model.feature_extractor.conv_layers[0]
    assert {buffer.dtype for buffer in bank.buffers()} == {torch.float32}
    torch.testing.assert_close(bank.filters, reference.feature_extractor.conv_layers[0].filters, rtol=0, atol=0)
    waves = torch.randn(2, 8000) * 0.1
    feats = model.features(waves)
    assert feats.dtype == dtype
    expected = reference.features(waves)
    cosine = torch.nn.functional.cosine_similarity(feats.float(), expected, dim=-1)
    assert float(cosine.min()) > 0.98


@torch.no_grad()
def test_padded_batch_equals_per_utterance_runs() -> None:
    model = log_mel_model()
    lengths = [8000, 5000, 3100]
    batch = torch.zeros(3, 8000)
    for i, length in enumerate(lengths):
        batch[i, :length] = torch.randn(length, generator=torch.Generator().manual_seed(i))
    padding = padding_mask_from_lengths(torch.tensor(lengths), model.cfg.extractor_conv_layer_config)
    batched = model.get_intermediate_outputs(batch, padding_mask=padding)
    for i, length in enumerate(lengths):
        alone = model.get_intermediate_outputs(batch[i : i + 1, :length])
        frames = num_frames(length, model.cfg.extractor_conv_layer_config)
        for b, a in zip(batched, alone, strict=True):
            torch.testing.assert_close(b[i : i + 1, :frames], a, atol=1e-5, rtol=0)


def test_trains_a_step_and_the_gradient_reaches_the_projection_only() -> None:
    model = log_mel_model().train()
    losses, _ = model(torch.randn(2, 8000), mask=torch.rand(2, 24) < 0.5)
    losses.mean().backward()
    assert model.feature_projection.projection.weight.grad.abs().sum() > 0
    assert not list(model.feature_extractor.parameters())


@pytest.mark.parametrize(("conv", "message"), [
    (((300, 400, 320),), r"num_mels <= 257"),
    (((40, 1, 320),), r"window >= 2"),
])
def test_impossible_filterbanks_are_refused(conv, message: str) -> None:
    with pytest.raises(ValueError, match=r"model\.extractor_conv_layer_config\[0\].*" + message):
        SpidRConfig(extractor_type="log_mel", extractor_conv_layer_config=conv)


def test_unknown_extractor_type_is_refused() -> None:
    with pytest.raises(ValueError, match=r"extractor_type"):
        SpidRConfig(extractor_type="sinc")


# ----------------------------------------------------------------------------------------------------------------
# The student's frequency warp (VTLP)
# ----------------------------------------------------------------------------------------------------------------


def test_warp_of_one_is_the_plain_filterbank() -> None:
    bank = LogMelFilterbank(80, 400, 320)
    x = torch.randn(3, 1, 6000)
    torch.testing.assert_close(bank(x, torch.ones(3)), bank(x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.9, 1.1])
def test_warp_moves_a_tone_to_alpha_times_its_frequency(alpha: float) -> None:
    bank = LogMelFilterbank(80, 400, 320)
    t = torch.arange(8000) / 16000
    out = bank(torch.sin(2 * torch.pi * 1000.0 * t)[None, None], torch.tensor([alpha]))
    centres = bank.edges_hz[1:-1]
    peak = float(centres[int(out[0].mean(dim=1).argmax())])
    assert abs(peak - 1000.0 * alpha) < 40.0  # 80 filters are ≈ 30–40 Hz apart near 1 kHz


def test_warp_map_fixes_zero_and_nyquist_and_is_monotonic() -> None:
    from spidr.models.log_mel import warp_frequencies

    freqs = torch.linspace(0, 8000, 257)
    warped = warp_frequencies(freqs, torch.tensor([0.8, 1.0, 1.2]), 8000.0)
    torch.testing.assert_close(warped[:, 0], torch.zeros(3))
    torch.testing.assert_close(warped[:, -1], torch.full((3,), 8000.0))
    assert (warped.diff(dim=1) > 0).all()
    torch.testing.assert_close(warped[1], freqs)
    torch.testing.assert_close(warped[2, :100], 1.2 * freqs[:100])  # below the knee: α·f


def test_in_training_the_student_reads_warped_input_and_the_teacher_the_clean_one() -> None:
    model = log_mel_model(student_frequency_warp=0.2, encoder_dropout=0.0, encoder_attention_dropout=0.0).train()
    seen = {}

    def spy(name: str, method):
        def wrapper(x, masks):
            seen[name] = x.detach()
            return method(x, masks)
        return wrapper

    model._student_outputs = spy("student", model._student_outputs)
    model._teacher_targets = spy("teacher", model._teacher_targets)
    waves = torch.randn(3, 8000)
    model(waves)  # no mask: the student's input is its features as they are
    with torch.no_grad():
        clean = model.features(waves)
    torch.testing.assert_close(seen["teacher"], clean)
    assert (seen["student"] - clean).abs().amax(dim=(1, 2)).min() > 1e-3  # every utterance is warped
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.get_intermediate_outputs(waves)[0],
                                   model.student.get_intermediate_outputs(clean)[0])


@pytest.mark.parametrize(("fields", "message"), [
    ({"student_frequency_warp": 0.1}, r"student_frequency_warp = 0.1 needs model\.extractor_type = 'log_mel'"),
    ({"student_frequency_warp": 0.3, "extractor_type": "log_mel", "extractor_conv_layer_config": LOG_MEL},
     r"student_frequency_warp = 0.3 must be in \[0, 0.25\)"),
])
def test_impossible_warps_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpidRConfig(**fields)


def test_saved_and_loaded_model_gives_the_same_features(tmp_path, capsys) -> None:
    """``load_model`` builds on the meta device: the filterbank (not in the state dict) must still be real."""
    from spidr import cli
    from spidr.models.loading import export_safetensors, load_model

    model = log_mel_model(conv=((80, 400, 320),))
    export_safetensors(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors").eval()
    waves = torch.randn(2, 7000)
    with torch.no_grad():
        for a, b in zip(loaded.get_intermediate_outputs(waves), model.get_intermediate_outputs(waves), strict=True):
            torch.testing.assert_close(a, b)
    assert cli.main(["info", str(tmp_path / "m.safetensors")]) == 0
    assert "80-band log-mel filterbank, " in capsys.readouterr().out


def test_log_mel_with_a_power_of_two_window_matches_numpy():
    window, hop, mels = 256, 128, 24
    bank = LogMelFilterbank(mels, window, hop)
    assert bank.n_fft == 256  # the next power of two >= window is the window itself
    x = speech_like(int(0.25 * 16000), np.random.default_rng(1)).astype(np.float64)
    # Independent numpy reference: pre-emphasis, frames, Hamming, |rfft(n = window)|², mel filters, log.
    emph = np.concatenate([x[:1], x[1:] - PRE_EMPHASIS * x[:-1]])
    count = (len(x) - window) // hop + 1
    frames = np.stack([emph[i * hop : i * hop + window] for i in range(count)]) * np.hamming(window)
    power = np.abs(np.fft.rfft(frames, n=window)) ** 2
    expected = np.log(power @ mel_filterbank(mels, window).T + 1e-10).T
    got = bank(torch.from_numpy(x[None, None].astype(np.float32)))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_warp_knee_is_at_0_8_nyquist_in_the_warped_domain_for_alpha_above_one_and_the_input_domain_below() -> None:
    """α > 1: α·f up to f = 0.8·Nyquist/α (reaching 0.8·Nyquist), then the line to (Nyquist, Nyquist); α < 1:
    α·f up to f = 0.8·Nyquist. Values hand-computed for Nyquist = 8000."""
    freqs = torch.tensor([1000.0, 8000.0 * 0.8 / 1.2, 6000.0, 6400.0, 7200.0, 8000.0])
    warped = warp_frequencies(freqs, torch.tensor([1.2, 0.8]), 8000.0)
    # α = 1.2: knee 5333.33 → 6400; 6000 → 6400 + 1600 · 666.67 / 2666.67 = 6800; 6400 → 6400 + 1600 · 0.4 = 7040;
    # 7200 → 6400 + 1600 · 0.7 = 7520
    torch.testing.assert_close(warped[0], torch.tensor([1200.0, 6400.0, 6800.0, 7040.0, 7520.0, 8000.0]))
    # α = 0.8: knee 6400 → 5120; 7200 → 5120 + 2880 · 800 / 1600 = 6560
    torch.testing.assert_close(warped[1], torch.tensor([800.0, 8000 * 0.8 / 1.2 * 0.8, 4800.0, 5120.0, 6560.0,
                                                        8000.0]))


def test_student_warp_factors_are_drawn_from_both_sides_of_one_in_training_only() -> None:
    """``student_frequency_warp = w`` draws α uniformly from [1 − w, 1 + w] (both lower and higher voices), in
    training only: an eval-mode forward (validation loss) is not warped, so it is deterministic."""
    model = log_mel_model(student_frequency_warp=0.2, encoder_dropout=0.0, encoder_attention_dropout=0.0).train()
    torch.manual_seed(0)
    alphas = model._student_warp(torch.zeros(4000, 8))
    assert alphas.shape == (4000,)
    assert float(alphas.min()) >= 0.8
    assert float(alphas.max()) <= 1.2
    assert float(alphas.min()) < 0.82
    assert float(alphas.max()) > 1.18
    assert abs(float(alphas.mean()) - 1.0) < 0.01
    model.eval()
    assert model._student_warp(torch.zeros(3, 8)) is None
    waves = torch.randn(2, 8000)
    with torch.no_grad():
        first, _ = model(waves)
        second, _ = model(waves)
    assert torch.equal(first, second)


def test_info_names_a_log_mel_front_end_s_single_conv_layer() -> None:
    """mut C6 (``convs == 0`` → ``convs <= 1``): a filterbank followed by one conv layer is described with that
    layer (the docstring's example), and without one as the filterbank alone."""
    common = {"extractor_type": "log_mel", "encoder_embed_dim": 32, "encoder_num_layers": 2, "encoder_num_heads": 2,
              "encoder_ff_interm_features": 64, "encoder_pos_conv_groups": 4, "num_codebooks": 2,
              "codebook_size": 16}
    one = SpidRConfig(extractor_conv_layer_config=((80, 400, 320), (24, 3, 1)), **common)
    two = SpidRConfig(extractor_conv_layer_config=((80, 400, 320), (24, 3, 1), (24, 3, 1)), **common)
    none = SpidRConfig(extractor_conv_layer_config=((80, 400, 320),), **common)
    assert _front_end(one) == f"80-band log-mel filterbank + 1 conv layer ({one.extractor_mode})"
    assert _front_end(two) == f"80-band log-mel filterbank + 2 conv layers ({two.extractor_mode})"
    assert _front_end(none) == "80-band log-mel filterbank"
