"""The README's "Use from Python" example runs as printed, on a tiny model saved as an official checkpoint, and its
results agree with each other (the batched extraction with the single-utterance calls)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from spidr.config import Config, DataConfig, RunConfig
from test_models_dinosr import tiny_model
from train_fixtures import speech_like

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    section = README.read_text().split("## Use from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_python_example_runs_and_agrees_with_itself(tmp_path, monkeypatch) -> None:
    model = tiny_model("spidr", encoder_num_layers=6).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "spidr_base.pt")
    config = Config(run=RunConfig(workdir="w", wandb_project="p", wandb_name="n", model_type="spidr"),
                    data=DataConfig(manifest="train.csv"), model=model.cfg)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    rng = np.random.default_rng(0)
    left, right = speech_like(4 * 22050, rng), speech_like(4 * 22050, rng)
    sf.write(tmp_path / "speech.flac", np.stack([left, right], axis=1) / 4, 22050)  # stereo, 22.05 kHz
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_example(), str(README), "exec"), namespace)  # our own README

    wave, layers, feats = namespace["wave"], namespace["layers"], namespace["feats"]
    torch.testing.assert_close(wave, namespace["spidr"].load_audio("speech.flac"), atol=1e-5, rtol=0)
    assert wave.shape == (4 * 16000,)
    assert len(layers) == 6
    frames = layers[0].shape[1]
    # The batched extraction gives the first utterance what the single-utterance calls gave it.
    np.testing.assert_allclose(feats[0]["layer_06"], layers[5][0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(feats[0]["units_06"], namespace["codebook_units"].numpy())
    assert feats[1]["layer_06"].shape[0] < frames  # the 3 s prefix
    # ... standardised on its own, as `spidr extract` does for a 3 s file (a cut of the standardised wave was not)
    prefix = namespace["first_3s"]
    torch.testing.assert_close(prefix, namespace["spidr"].waveform_from_samples(
        sf.read("speech.flac")[0][: 3 * 22050], 22050), atol=0, rtol=0)
    assert abs(float(prefix.mean())) < 1e-5  # (a cut of the standardised wave had a mean of its own)
    with torch.inference_mode():
        single = namespace["model"].get_intermediate_outputs(prefix[None])[5][0].numpy()
    np.testing.assert_allclose(feats[1]["layer_06"], single, atol=1e-5)
    assert namespace["centroids"].shape == (20, layers[5].shape[-1])
    units = namespace["kmeans_units"]
    assert units.shape == (frames,)
    distances = ((feats[0]["layer_06"][:, None] - namespace["centroids"][None]) ** 2).sum(-1)
    np.testing.assert_array_equal(units, distances.argmin(1))  # each frame's nearest centroid
    # The unit LM part: trained on the two utterances' units, its scores are log p(BOS u EOS) by one forward pass of
    # the LSTM over the deduplicated units (20 k-means units: BOS = 20, EOS = 21), and the pair accuracy counts them.
    lm, scores = namespace["lm"], namespace["scores"]
    assert (tmp_path / "lms" / "k20" / "final.pt").is_file()
    assert (lm.info["num_units"], lm.info["dedup"], lm.context) == (20, True, None)
    for name, frame_units in (("real", units), ("reversed", units[::-1])):
        kept = frame_units[np.r_[True, frame_units[1:] != frame_units[:-1]]]
        tokens = torch.tensor([[20, *kept.tolist(), 21]])
        with torch.no_grad():
            log_probs = lm.model(tokens[:, :-1]).double().log_softmax(-1)[0]
        by_hand = float(log_probs[torch.arange(len(kept) + 1), tokens[0, 1:]].sum())
        assert scores[name].num_tokens == len(kept) + 1
        assert scores[name].logprob == pytest.approx(by_hand, abs=1e-3)
        assert scores[name].mean == scores[name].logprob / (len(kept) + 1)
    real, reversed_ = scores["real"].mean, scores["reversed"].mean
    assert namespace["pair_accuracy"](scores, [("real", "reversed")]).score == (
        1.0 if real > reversed_ else 0.5 if real == reversed_ else 0.0)
