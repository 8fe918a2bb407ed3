"""Optimizer parameter groups, the freeze-step group removal, and the LR schedules (spec §4.7, §7.1–7.2)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from conftest import REFERENCE, requires_shared
from spidr.config import OptimizerConfig
from spidr.train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups, remove_frozen_group

DEFAULT = OptimizerConfig()


class Toy(nn.Module):
    """The top-level names the optimizer cares about, with tiny shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_extractor = nn.Linear(3, 4)
        self.feature_projection = nn.Linear(4, 5)
        self.student = nn.Linear(5, 5)
        self.heads = nn.ModuleList([nn.Linear(5, 2)])
        self.mask_embedding = nn.Parameter(torch.rand(5))
        self.teacher = nn.Linear(5, 5).requires_grad_(False)
        self.register_buffer("current_step", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.feature_projection(self.feature_extractor(x)) + self.mask_embedding
        return self.heads[0](self.student(h)).sum()


# --------------------------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------------------------


def test_param_groups_follow_the_name_prefixes():
    groups = param_groups(Toy(), DEFAULT)
    names = [[name for name, _ in group] for group in groups]
    assert names[0] == ["mask_embedding", "student.weight", "student.bias", "heads.0.weight", "heads.0.bias"]
    assert names[1] == ["feature_extractor.weight", "feature_extractor.bias", "feature_projection.weight",
                        "feature_projection.bias"]
    assert not any(name.startswith("teacher") for group in names for name in group)
    assert len(param_groups(Toy(), DEFAULT, include_frozen=False)) == 1


def test_excluding_every_parameter_is_a_clear_error():
    cfg = OptimizerConfig(exclude_from_optimizer=("teacher", "student", "heads", "mask_embedding"))
    with pytest.raises(ValueError, match="leave no parameter to train"):
        param_groups(Toy(), cfg)


def test_optimizer_hyper_parameters_are_identical_in_both_groups():
    optimizer = build_optimizer(Toy(), DEFAULT, device=torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        assert group["lr"] == 5e-4
        assert group["betas"] == (0.9, 0.95)
        assert group["eps"] == 1e-6
        assert group["weight_decay"] == 0.01
        assert group["fused"]  # the official trainer's choice, and far faster than the loop on CPU too


def test_fused_adamw_takes_the_steps_of_the_reference_loop():
    """The fused kernel that the trainer picks on CPU updates like torch's per-parameter loop (to rounding)."""
    torch.manual_seed(0)
    fused_model, loop_model = Toy(), Toy()
    loop_model.load_state_dict(fused_model.state_dict())
    initial = {name: p.detach().clone() for name, p in fused_model.named_parameters()}
    fused = build_optimizer(fused_model, DEFAULT, device=torch.device("cpu"))
    loop = build_optimizer(loop_model, DEFAULT, device=torch.device("cpu"))
    for group in loop.param_groups:
        group["fused"] = False
        group["foreach"] = False
    for _ in range(5):
        grads = [torch.randn_like(p) for p in fused_model.parameters()]
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters(), strict=True):
        if a.requires_grad:
            assert not torch.equal(a, initial[name]), name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_removing_the_frozen_group_drops_its_adam_state_and_stops_its_updates():
    torch.manual_seed(0)
    model = Toy()
    optimizer = build_optimizer(model, OptimizerConfig(warmup_steps=0), device=torch.device("cpu"))
    scheduler = build_scheduler(optimizer, OptimizerConfig(warmup_steps=0))
    x = torch.randn(4, 3)
    model(x).backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    frozen = [*model.feature_extractor.parameters(), *model.feature_projection.parameters()]
    assert all(p in optimizer.state for p in frozen)

    for p in frozen:
        p.requires_grad_(False)
    remove_frozen_group(optimizer, scheduler)
    assert len(optimizer.param_groups) == 1
    assert not any(p in optimizer.state for p in frozen)
    assert len(scheduler.base_lrs) == 1
    before = [p.detach().clone() for p in frozen]
    student_before = model.student.weight.detach().clone()
    model(x).backward()
    optimizer.step()
    scheduler.step()
    # No update and no weight decay for the frozen weights; the rest keeps training.
    assert all(torch.equal(a, b) for a, b in zip(before, frozen, strict=True))
    assert not torch.equal(student_before, model.student.weight)
    # The optimizer and scheduler state dicts stay loadable into a freshly built one-group optimizer.
    fresh = build_optimizer(model, DEFAULT, device=torch.device("cpu"), include_frozen=False)
    fresh.load_state_dict(optimizer.state_dict())
    fresh_scheduler = build_scheduler(fresh, DEFAULT)
    fresh_scheduler.load_state_dict(scheduler.state_dict())
    assert fresh_scheduler.last_epoch == 2
    remove_frozen_group(optimizer, scheduler)  # idempotent
    assert len(optimizer.param_groups) == 1


# --------------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------------------------


@requires_shared
def test_tristage_matches_the_reference_scheduler():
    facts = json.loads((REFERENCE / "reference_facts.json").read_text())["tristage_lr"]
    cfg = OptimizerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in facts["optimizer_config"].items()})
    steps = facts["steps"] + facts["boundary_steps"]
    expected = facts["multiplier"] + facts["boundary_multiplier"]
    for step, value in zip(steps, expected, strict=True):
        assert lr_multiplier(step, cfg) == pytest.approx(value, rel=1e-9, abs=1e-12), step
    for step, value in zip(facts["steps"], facts["lr"], strict=True):
        assert cfg.lr * lr_multiplier(step, cfg) == pytest.approx(value, rel=1e-9)


def test_tristage_hand_computed_values():
    # Spec §7.2: lr·(0.01 + 0.99·s/12000) below 12000, lr up to 200000 inclusive, then lr·0.01^((s−200000)/200000).
    f = lambda s: lr_multiplier(s, DEFAULT)  # noqa: E731
    assert f(0) == pytest.approx(0.01)
    assert f(1) == pytest.approx(0.01 + 0.99 / 12000)
    assert f(6000) == pytest.approx(0.505)
    assert f(11999) == pytest.approx(0.01 + 0.99 * 11999 / 12000)
    assert f(12000) == 1.0
    assert f(200000) == 1.0
    assert f(200001) == pytest.approx(0.01 ** (1 / 200000))
    assert f(300000) == pytest.approx(0.1)
    assert f(400000) == pytest.approx(0.01)
    assert f(500000) == pytest.approx(0.01)  # stays at the final scale after the decay


def test_warmup_is_monotone_and_continuous_for_every_schedule():
    for scheduler in ("tristage", "cosine", "rsqrt", "constant"):
        cfg = OptimizerConfig(scheduler=scheduler, max_steps=1000, warmup_steps=100, hold_steps=300,
                              decay_steps=600, rsqrt_timescale=100)
        values = [lr_multiplier(s, cfg) for s in range(1001)]
        assert values[0] == pytest.approx(0.01)
        assert all(b >= a for a, b in itertools.pairwise(values[:101])), scheduler
        assert values[100] == pytest.approx(1.0), scheduler
        assert all(0 < v <= 1.0 + 1e-12 for v in values), scheduler


def test_cosine_rsqrt_and_constant_hand_computed_values():
    cosine = OptimizerConfig(scheduler="cosine", max_steps=1100, warmup_steps=100, final_lr_scale=0.1)
    assert lr_multiplier(600, cosine) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(1100, cosine) == pytest.approx(0.1)
    assert lr_multiplier(5000, cosine) == pytest.approx(0.1)
    rsqrt = OptimizerConfig(scheduler="rsqrt", warmup_steps=10, hold_steps=20, rsqrt_timescale=100)
    assert lr_multiplier(29, rsqrt) == 1.0
    assert lr_multiplier(30, rsqrt) == pytest.approx(1.0)
    assert lr_multiplier(130, rsqrt) == pytest.approx(1 / math.sqrt(2))
    assert lr_multiplier(330, rsqrt) == pytest.approx(0.5)
    shifted = OptimizerConfig(scheduler="rsqrt", warmup_steps=10, hold_steps=0, rsqrt_timescale=100,
                              rsqrt_shift=300)
    assert lr_multiplier(10, shifted) == pytest.approx(0.5)  # warm-up ends at 1/√(1 + 300/100)
    constant = OptimizerConfig(scheduler="constant", warmup_steps=10)
    assert lr_multiplier(5, constant) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_multiplier(10**6, constant) == 1.0


def test_no_warmup_starts_at_the_peak():
    cfg = OptimizerConfig(warmup_steps=0, hold_steps=10, decay_steps=10)
    assert lr_multiplier(0, cfg) == 1.0
    assert lr_multiplier(10, cfg) == 1.0
    assert lr_multiplier(20, cfg) == pytest.approx(0.01)


def test_the_scheduler_applies_the_multiplier_step_by_step_to_every_group():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=4, hold_steps=2, decay_steps=4)
    optimizer = build_optimizer(Toy(), cfg, device=torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg)
    for step in range(12):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(1e-3 * lr_multiplier(step, cfg)), step
        optimizer.step()
        scheduler.step()


def test_feature_encoder_lr_scale_scales_group_1_at_every_step():
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=4, hold_steps=2, decay_steps=4, feature_encoder_lr_scale=0.1)
    optimizer = build_optimizer(Toy(), cfg, device=torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg)
    for step in range(12):
        rest, feature_encoder = optimizer.param_groups
        assert rest["lr"] == pytest.approx(1e-3 * lr_multiplier(step, cfg)), step
        assert feature_encoder["lr"] == pytest.approx(1e-4 * lr_multiplier(step, cfg)), step
        optimizer.step()
        scheduler.step()


def test_feature_encoder_lr_scale_zero_leaves_the_front_end_untouched():
    torch.manual_seed(0)
    model = Toy()
    cfg = OptimizerConfig(feature_encoder_lr_scale=0.0, warmup_steps=0)
    optimizer = build_optimizer(model, cfg, device=torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(3):
        model(torch.randn(2, 3)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        frozen = name.startswith(("feature_extractor", "feature_projection", "teacher"))
        assert torch.equal(p, before[name]) == frozen, name


def test_negative_feature_encoder_lr_scale_is_refused():
    with pytest.raises(ValueError, match="feature_encoder_lr_scale"):
        OptimizerConfig(feature_encoder_lr_scale=-0.1)


def test_excluded_parameters_stay_out_even_when_to_freeze_names_them_too() -> None:
    """O7: "Parameters whose names start with exclude_from_optimizer are never optimised" whatever to_freeze says."""
    model = nn.ModuleDict({"teacher_feature_extractor": nn.Linear(2, 2), "feature_extractor": nn.Linear(2, 2),
                           "student": nn.Linear(2, 2)})
    cfg = OptimizerConfig(to_freeze=("feature_extractor", "teacher_feature"))
    names = [name for group in param_groups(model, cfg) for name, _ in group]
    assert not [n for n in names if n.startswith("teacher")]
    assert sorted(names) == ["feature_extractor.bias", "feature_extractor.weight", "student.bias", "student.weight"]



def test_tristage_without_a_decay_drops_to_the_final_scale_after_the_hold():
    """Truth (spec §7.2 with decay_steps = 0): peak up to warmup + hold inclusive, then final_lr_scale at once."""
    cfg = OptimizerConfig(warmup_steps=0, hold_steps=10, decay_steps=0, final_lr_scale=0.05)
    assert lr_multiplier(10, cfg) == 1.0
    assert lr_multiplier(11, cfg) == 0.05
    assert lr_multiplier(1000, cfg) == 0.05


def test_the_optimizer_takes_the_configured_weight_decay_in_both_groups():
    """optimizer.weight_decay other than AdamW's own default (0.01, the config default too)."""
    optimizer = build_optimizer(Toy(), OptimizerConfig(weight_decay=0.05), device=torch.device("cpu"))
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.05]
