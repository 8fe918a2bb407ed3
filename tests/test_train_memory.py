"""``run.trim_heap``: glibc's free heap pages are returned to the OS when the conv front end's backward starts.

Self-contained (no ../shared).
"""

from __future__ import annotations

import platform
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from spidr.config import OptimizerConfig, SpidRConfig
from spidr.data.collate import Batch
from spidr.models import build_model, num_frames
from spidr.models.components import ConvFeatureExtractor
from spidr.train import loop, memory
from spidr.train.optim import build_optimizer, build_scheduler
from spidr.train.precision import Precision
from train_fixtures import tiny_config, write_corpus

CONV = [(32, 10, 5), (32, 3, 2), (32, 2, 2)]


def _model_optimizer_batch():
    cfg = SpidRConfig(extractor_conv_layer_config=CONV, encoder_embed_dim=32, encoder_num_layers=2,
                      encoder_num_heads=2, encoder_ff_interm_features=64, num_codebooks=2, codebook_size=16)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optim_cfg = OptimizerConfig(max_steps=10, warmup_steps=2, hold_steps=4, decay_steps=4)
    optimizer = build_optimizer(model, optim_cfg, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    samples = 4000
    waves = F.layer_norm(torch.randn(2, samples, generator=generator), (samples,))
    mask = torch.rand(2, num_frames(samples, CONV), generator=generator) < 0.5
    batch = Batch(waveforms=waves, lengths=torch.full((2,), samples), padding_mask=None, mask=mask, ids=["a", "b"])
    return model, optimizer, build_scheduler(optimizer, optim_cfg), batch


def _train_steps(model, optimizer, scheduler, batch, steps: int, *, micro_batches: int = 1) -> None:
    for step in range(steps):
        loop.train_step(model, [batch] * micro_batches, optimizer, scheduler, step=step,
                        precision=Precision("cpu", None), scaler=None, max_norm=10.0)


@pytest.mark.parametrize(
    ("setting", "precision", "expected"),
    [
        ("auto", Precision("cpu", None), True),
        ("auto", Precision("cpu", torch.bfloat16), True),
        ("auto", Precision("cuda", torch.bfloat16), False),
        ("always", Precision("cpu", torch.bfloat16), True),
        ("always", Precision("cuda", torch.bfloat16), False),
        ("never", Precision("cpu", None), False),
    ],
)
def test_trim_policy(setting, precision, expected) -> None:
    assert memory.trims_heap(setting, precision) is expected


def test_first_layer_output_bytes() -> None:
    model, *_ = _model_optimizer_batch()
    waveforms = torch.zeros(2, 4000)
    fp32 = 2 * 799 * 32 * 4  # (4000 - 10) // 5 + 1 = 799 frames of 32 channels
    assert memory.first_layer_output_bytes(model.feature_extractor, waveforms) == fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert memory.first_layer_output_bytes(model.feature_extractor, waveforms) == fp32 // 2
    log_mel = ConvFeatureExtractor([(40, 400, 160), (32, 3, 2)], log_mel=True)
    assert memory.first_layer_output_bytes(log_mel, waveforms) == 0


@pytest.mark.parametrize(("every_backward", "threshold", "trims"),
                         [(True, memory.MMAP_THRESHOLD_MAX, True), (False, memory.MMAP_THRESHOLD_MAX, False),
                          (False, 2 * 799 * 32 * 4 - 1, True), (False, 2 * 799 * 32 * 4, False)])
def test_the_trim_runs_between_the_transformer_and_front_end_backward(every_backward, threshold, trims) -> None:
    """When the trim runs, the transformer's weights have their gradients and the front end's have none yet; it
    runs once per backward, and without ``every_backward`` only when the first layer's output exceeds the
    threshold."""
    model, optimizer, scheduler, batch = _model_optimizer_batch()
    seen = []

    def record() -> None:
        seen.append((model.student.layers[0].attention.qkv.weight.grad is not None,
                     model.feature_extractor.conv_layers[0].conv.weight.grad is not None))

    with mock.patch.object(memory, "heap_trimmer", return_value=record):
        handle = memory.trim_heap_before_front_end_backward(model, every_backward=every_backward)
    with mock.patch.object(memory, "MMAP_THRESHOLD_MAX", threshold):
        _train_steps(model, optimizer, scheduler, batch, steps=2)
        with torch.no_grad():
            model(batch.waveforms, mask=batch.mask)  # no backward: nothing to trim
        assert seen == ([(True, False)] * 2 if trims else [])
        handle.remove()
        _train_steps(model, optimizer, scheduler, batch, steps=1)
        assert len(seen) == (2 if trims else 0)


def test_the_trim_runs_in_each_micro_batch_backward() -> None:
    """Gradient accumulation: each micro-batch's backward reaches the front end, and each is trimmed."""
    model, optimizer, scheduler, batch = _model_optimizer_batch()
    calls = []
    with mock.patch.object(memory, "heap_trimmer", return_value=lambda: calls.append(1)):
        memory.trim_heap_before_front_end_backward(model, every_backward=True)
    _train_steps(model, optimizer, scheduler, batch, steps=2, micro_batches=3)
    assert len(calls) == 6


def test_a_step_with_the_trim_computes_what_one_without_does() -> None:
    """The hook (and the real ``malloc_trim`` on glibc) changes no number: weights after two steps are equal."""
    weights = []
    for trimmed in (True, False):
        model, optimizer, scheduler, batch = _model_optimizer_batch()
        if trimmed:
            memory.trim_heap_before_front_end_backward(model, every_backward=True)
        _train_steps(model, optimizer, scheduler, batch, steps=2)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")
def test_heap_trimmer_is_glibc_malloc_trim() -> None:
    trim = memory.heap_trimmer()
    assert trim is not None
    trim()  # returns nothing, raises nothing


def test_no_trimmer_without_glibc() -> None:
    with mock.patch.object(platform, "libc_ver", return_value=("", "")):
        assert memory.heap_trimmer() is None
        model, *_ = _model_optimizer_batch()
        assert memory.trim_heap_before_front_end_backward(model) is None


@pytest.mark.parametrize(("dtype", "setting", "installed"),
                         [("float32", "auto", True), ("bfloat16", "always", True), ("float32", "never", False)])
def test_train_installs_the_trim_as_configured(tmp_path: Path, dtype: str, setting: str, installed: bool) -> None:
    manifest = write_corpus(tmp_path / "corpus", num_files=4)
    cfg = tiny_config(tmp_path / "runs", manifest, optimizer={"dtype": dtype, "max_steps": 1},
                      run={"trim_heap": setting})
    with mock.patch.object(memory, "trim_heap_before_front_end_backward") as install:
        assert loop.train(cfg) == "completed"
    assert install.called is installed
    if installed:
        assert install.call_args.kwargs == {"every_backward": setting == "always"}
