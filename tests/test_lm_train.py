"""Unit-LM training: the loss falls, exact resume after SIGKILL, 2 gloo ranks = 1 process, NaN steps skipped, the
n-gram baseline, config errors; and ``lm-score`` → ``lm-eval`` through the CLI on a toy benchmark."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spidr.cli import main
from spidr.lm.config import LmDataSection, lm_config_from_dict, load_lm_config
from spidr.lm.data import WindowSampler, scored_targets, token_stream, validation_windows
from spidr.lm.models import GptLM, LstmLM
from spidr.lm.score import find_unit_files, score_benchmark, score_sequences
from spidr.lm.tokens import LabelVocabulary, Vocabulary, fingerprint, read_unit_sequences
from spidr.lm.train import lm_train_step, load_lm, train_lm, validate_lm
from spidr.lm.zerospeech import (
    LexicalItem,
    SyntacticItem,
    check_complete,
    read_lexical_gold,
    read_submission,
    write_lexical_gold,
    write_syntactic_gold,
)
from spidr.train.plot import plot_training
from spidr.train.precision import Precision

FP32 = Precision("cpu", None)


def _toy_units(path: Path, count: int = 60, seed: int = 0) -> Path:
    """Utterances that count up from a random start modulo 10: a pattern an LM learns quickly."""
    rng = np.random.default_rng(seed)
    with path.open("w") as handle:
        for i in range(count):
            start, length = rng.integers(0, 10), rng.integers(8, 20)
            handle.write(json.dumps({"name": f"u{i:03d}", "units": [int((start + k) % 10) for k in range(length)]})
                         + "\n")
    return path


def _config(tmp_path: Path, name: str, **sections) -> Path:
    base = {
        "run": {"workdir": str(tmp_path / "runs"), "name": name, "device": "cpu", "log_interval": 5,
                "save_interval": 10, "validate_interval": 10, "keep_latest": -1},
        "data": {"train": str(_toy_units(tmp_path / "units.jsonl")), "dedup": False, "val_fraction": 0.1},
        "model": {"arch": "lstm", "dim": 32, "num_layers": 1, "context": 16, "dropout": 0.1},
        "optimizer": {"lr": 1e-2, "warmup_steps": 5, "max_steps": 40, "batch_size": 8, "dtype": "float32"},
    }
    for section, values in sections.items():
        base[section] = {**base[section], **values}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(base))
    return path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_validation_perplexity_is_logged(tmp_path, caplog):
    torch.set_num_threads(1)
    cfg = load_lm_config(_config(tmp_path, "falls"))
    with caplog.at_level("INFO", logger="spidr"):
        assert train_lm(cfg) == "completed"
    records = _metrics(cfg.run.run_dir)
    train = [r["loss"] for r in records if r["group"] == "train"]
    valid = [r for r in records if r["group"] == "valid"]
    # the count announced is the count each validation scores (it announced the BOS tokens too)
    assert f"validation tokens ({valid[0]['tokens']} scored)" in caplog.text
    assert train[-1] < 0.5 * train[0]
    assert valid
    assert valid[-1]["ppl"] < valid[0]["ppl"]
    assert valid[-1]["ppl"] == pytest.approx(
        np.exp(valid[-1]["loss"]))
    # the curves: loss and token perplexity, train and valid; no (empty) codebook figure for an LM run
    plots = {p.name: p for p in plot_training(cfg.run.run_dir, tmp_path / "plots")}
    assert set(plots) == {"loss.png", "lm_perplexity.png"}
    assert all(p.stat().st_size > 1000 for p in plots.values())
    model, info, labels = load_lm(cfg.run.run_dir / "final.pt")
    assert labels is None
    assert info["num_units"] == 10
    assert info["step"] == 40
    assert info["dedup"] is False
    scores = score_sequences(model, Vocabulary(10), {"up": np.arange(3, 9), "random": np.array([3, 7, 1, 8, 0, 5])})
    assert scores["up"].mean > scores["random"].mean  # it learned to count


class _Uniform(torch.nn.Module):
    """Every token equally likely: the validation loss is log V whatever it scores, so the count is what's tested."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, self.size)


def test_validation_scores_units_and_eos_but_not_the_bos_after_each_eos():
    """BOS follows every EOS in the validation stream: counted as a target it lowered the loss by ~1/length; an
    item's score never predicts it. Windows of every size score each unit and EOS once."""
    from spidr.lm.data import token_stream
    from spidr.lm.train import validate_lm

    vocab = Vocabulary(10)
    stream = token_stream({"a": np.array([1, 2, 3]), "b": np.array([4, 5]), "c": np.array([6])}, vocab)
    for context in (1, 2, 4, 16):
        result = validate_lm(_Uniform(vocab.size), stream, context=context, precision=FP32, batch_size=2,
                             device=torch.device("cpu"), bos=vocab.bos)
        assert result["tokens"] == (3 + 1) + (2 + 1) + (1 + 1)  # units and EOS; neither the first BOS nor the others
        assert result["loss"] == pytest.approx(np.log(vocab.size))
        assert scored_targets(stream, context, bos=vocab.bos) == result["tokens"]  # (what lm-train announces)


def test_the_units_file_is_parsed_once_per_run_and_again_when_it_changes(tmp_path, monkeypatch, caplog):
    """A resumed run maps the token streams its first start kept (parsing the units file took ≈ 23 min and ≈ 26 GB
    per rank at Libri-light scale); a rewritten units file, or other data settings, make them stale."""
    from spidr.lm import prepared_data
    from spidr.lm.prepared_data import CACHE_FOLDER, prepare_data, shared_data

    path = _config(tmp_path, "cached", optimizer={"max_steps": 4})
    cfg = load_lm_config(path)
    assert train_lm(cfg) == "completed"
    mapped, parsed = shared_data(cfg), prepare_data(cfg)
    assert mapped.train.dtype == parsed.train.dtype == torch.int16
    assert torch.equal(mapped.train, parsed.train)
    assert torch.equal(mapped.valid, parsed.valid)
    assert mapped.info == parsed.info
    assert mapped.vocab == parsed.vocab

    calls = []
    reader = prepared_data.read_unit_sequences
    monkeypatch.setattr(prepared_data, "read_unit_sequences", lambda *a, **k: calls.append(a) or reader(*a, **k))
    longer = load_lm_config(path, ["optimizer.max_steps=6"])
    assert train_lm(longer) == "completed"  # resumed on the kept streams
    assert calls == []
    other_split = load_lm_config(path, ["data.val_fraction=0.2"])
    assert shared_data(other_split).valid.numel() > mapped.valid.numel()
    assert len(calls) == 1
    assert torch.equal(shared_data(longer).train, mapped.train)  # longer's streams kept again
    assert len(calls) == 2
    # one unit changed in place, the file's size, inode and modification time kept (cp -p over it)
    units_file = Path(cfg.data.train)
    before = units_file.stat()
    text = units_file.read_bytes()
    at = text.index(b'"units": [') + len(b'"units": [')
    with units_file.open("r+b") as handle:
        handle.seek(at)
        handle.write(b"9" if text[at:at + 1] != b"9" else b"8")
    os.utime(units_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (units_file.stat().st_size, units_file.stat().st_ino, units_file.stat().st_mtime_ns) == (
        before.st_size, before.st_ino, before.st_mtime_ns)
    changed = shared_data(longer)
    assert not (torch.equal(changed.train, mapped.train) and torch.equal(changed.valid, mapped.valid))
    assert len(calls) == 3
    _toy_units(Path(cfg.data.train), seed=1)  # other utterances in the same file
    with pytest.raises(ValueError, match="was trained on other data"):
        train_lm(longer)
    assert len(calls) == 4

    # another rank maps the main rank's streams, or reads the units file itself when it does not see them
    import spidr.train.environment

    stale = load_lm_config(path)  # the key of the units file as it is now
    parsed = prepare_data(stale)
    shared_data(stale)
    for sizes, parses in (([parsed.train.numel(), parsed.valid.numel()], 0), ([1, 2], 1)):
        answer = {"key": prepared_data.cache_key(stale), "sizes": sizes}
        monkeypatch.setattr(spidr.train.environment, "broadcast_from_main", lambda obj, answer=answer, **_: answer)
        before_call = len(calls)
        other_rank = shared_data(stale, is_main=False)
        assert torch.equal(other_rank.train, parsed.train)
        assert len(calls) == before_call + parses
    assert "token streams are not (yet) visible" in caplog.text
    monkeypatch.undo()

    # kept streams that cannot be read (a file deleted by hand) are written again, not a crash
    (cfg.run.run_dir / CACHE_FOLDER / "valid.npy").unlink()
    assert torch.equal(shared_data(stale).valid, parsed.valid)
    assert "cannot be read" in caplog.text
    (cfg.run.run_dir / CACHE_FOLDER / "info.json").write_text("{")
    assert prepared_data.data_info(stale) == parsed.info
    assert shared_data(stale).info == parsed.info
    again = ["run.name=\"again\"", "optimizer.max_steps=2"]
    assert train_lm(load_lm_config(path, again)) == "completed"
    (cfg.run.run_dir.parent / "again" / CACHE_FOLDER / "train.npy").unlink()
    assert train_lm(load_lm_config(path, [*again, "optimizer.max_steps=4"])) == "completed"  # resumed
    # any failure of the main rank is told to every rank (a rank failing alone would leave the others waiting)
    monkeypatch.setattr(prepared_data, "_updated_cache",
                        lambda cfg, key: (_ for _ in ()).throw(PermissionError("denied")))
    with pytest.raises(prepared_data.DataPreparationError, match=r"the main rank could not prepare the LM's "
                                                                r"training data \(PermissionError: denied\)"):
        shared_data(stale)
    monkeypatch.undo()

    # a run folder the streams cannot be kept in: read in memory, with a warning
    blocked = load_lm_config(_config(tmp_path, "blocked", optimizer={"max_steps": 2}))
    blocked.run.run_dir.mkdir(parents=True)
    (blocked.run.run_dir / CACHE_FOLDER).write_text("in the way")
    assert train_lm(blocked) == "completed"
    assert "cannot keep the LM's token streams" in caplog.text


def test_validation_windows_are_capped_spread_and_shared_out_between_ranks():
    """A held-out stream grows with the corpus: max_tokens keeps windows spread evenly over it (its first and its
    last), and W ranks score disjoint shares that together are those windows."""
    from spidr.lm.data import validation_windows

    stream = torch.arange(1001)  # windows of 10 + 1 tokens start every 10: 100 of them
    every = torch.cat(list(validation_windows(stream, 10, 7)))
    assert every[:, 0].tolist() == list(range(0, 1000, 10))
    assert every[-1].tolist() == list(range(990, 1001))
    capped = torch.cat(list(validation_windows(stream, 10, 7, max_tokens=250)))
    assert capped[:, 0].tolist() == [round(k * 99 / 24) * 10 for k in range(25)]  # 250 tokens: 25 windows
    assert capped[0, 0] == 0
    assert capped[-1, 0] == 990
    assert torch.cat(list(validation_windows(stream, 10, 7, max_tokens=5000)))[:, 0].tolist() == every[:, 0].tolist()
    for world_size in (2, 3):
        shares = [torch.cat(list(validation_windows(stream, 10, 4, max_tokens=250, rank=rank, world_size=world_size)))
                  for rank in range(world_size)]
        assert sorted(torch.cat(shares)[:, 0].tolist()) == capped[:, 0].tolist()
    # and the validation loss is counted over exactly those windows
    from spidr.lm.train import validate_lm

    result = validate_lm(_Uniform(1001), stream, context=10, precision=FP32, batch_size=4, device=torch.device("cpu"),
                         max_tokens=250)
    assert result["tokens"] == 25 * 10
    assert scored_targets(stream, 10, max_tokens=250) == 25 * 10  # (lm-train announced the whole stream's count)
    assert result["loss"] == pytest.approx(np.log(1001))


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared (exit {process.poll()})")
        time.sleep(0.01)


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 200 steps: the kill, sent once step 10 is saved, must land before the end even on a fast machine (with 30
    # steps a CI machine once finished the run between the poll and the signal).
    killed = _config(tmp_path, "killed", optimizer={"max_steps": 200})
    process = subprocess.Popen([sys.executable, "-m", "spidr", "lm-train", str(killed)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(tmp_path / "runs" / "killed" / "step_10.pt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "runs" / "killed" / "final.pt").exists()
    subprocess.run([sys.executable, "-m", "spidr", "lm-train", str(killed)], env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "spidr", "lm-train", str(_config(tmp_path, "straight",
                    optimizer={"max_steps": 200}))], env=env, check=True, capture_output=True)
    resumed = torch.load(tmp_path / "runs" / "killed" / "final.pt", weights_only=True)
    straight = torch.load(tmp_path / "runs" / "straight" / "final.pt", weights_only=True)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["optimizer"]["state"][0]["exp_avg"].equal(straight["optimizer"]["state"][0]["exp_avg"])


def test_a_checkpoint_inside_a_logging_interval_keeps_its_means(tmp_path):
    """Resumed from step_2.pt with records every 5 steps: the record at step 5 is the mean of steps 1-5, as the
    uninterrupted run logs it (it was the mean of steps 3-5)."""
    cfg = load_lm_config(_config(tmp_path, "lm", run={"log_interval": 5, "save_interval": 2},
                                 optimizer={"max_steps": 10}))
    assert train_lm(cfg) == "completed"
    run_dir = cfg.run.run_dir
    expected = [r for r in _metrics(run_dir) if r["group"] == "train"]
    assert [r["step"] for r in expected] == [5, 10]
    for path in run_dir.glob("*.pt"):
        if path.name not in ("step_0.pt", "step_2.pt"):
            path.unlink()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["step"] <= 2))
    assert train_lm(cfg) == "completed"
    got = [r for r in _metrics(run_dir) if r["group"] == "train"]
    for a, b in zip(got, expected, strict=True):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_train_the_model_one_process_trains(tmp_path):
    no_dropout = {"dropout": 0.0}
    two = _config(tmp_path, "two", model=no_dropout, optimizer={"max_steps": 12})
    one = _config(tmp_path, "one", model=no_dropout, optimizer={"max_steps": 12})
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks_run = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m",
                                "spidr", "lm-train", str(two)], env=env, check=True, capture_output=True, text=True,
                               timeout=300)
    assert ranks_run.stdout.count("trained LM: ") == 1  # once, not once per rank
    assert ranks_run.stderr.count("unit LM: ") == 1
    subprocess.run([sys.executable, "-m", "spidr", "lm-train", str(one)], env=env, check=True, capture_output=True)
    ranks = torch.load(tmp_path / "runs" / "two" / "final.pt", weights_only=True)
    single = torch.load(tmp_path / "runs" / "one" / "final.pt", weights_only=True)
    assert len(ranks["ranks"]) == 2
    start = torch.load(tmp_path / "runs" / "one" / "step_0.pt", weights_only=True)["model"]
    for key, value in single["model"].items():
        torch.testing.assert_close(ranks["model"][key], value, atol=2e-5, rtol=2e-5, msg=key)
        assert not torch.equal(value, start[key]) or "bias" in key  # the model did move
    two_losses = [r["loss"] for r in _metrics(tmp_path / "runs" / "two") if r["group"] == "train"]
    one_losses = [r["loss"] for r in _metrics(tmp_path / "runs" / "one") if r["group"] == "train"]
    assert two_losses == pytest.approx(one_losses, abs=1e-5)
    # validation too: each rank scores its share of the held-out windows, and the sums are added
    two_valid = [(r["loss"], r["tokens"]) for r in _metrics(tmp_path / "runs" / "two") if r["group"] == "valid"]
    one_valid = [(r["loss"], r["tokens"]) for r in _metrics(tmp_path / "runs" / "one") if r["group"] == "valid"]
    assert one_valid
    assert [tokens for _, tokens in two_valid] == [tokens for _, tokens in one_valid]
    assert [loss for loss, _ in two_valid] == pytest.approx([loss for loss, _ in one_valid], abs=1e-5)


def test_lm_step_clips_to_max_norm_and_micro_batches_give_the_whole_batch_s_step():
    """The LM step's update is the clipped gradient of the mean loss over all its windows: k micro-batches give the
    same gradient norm and weights as one batch of their rows (not k times the gradient), and with plain SGD at lr 1
    the weights move by exactly max_norm."""
    windows = torch.randint(0, 13, (6, 9), generator=torch.Generator().manual_seed(0))

    def step(micro_batches: list[torch.Tensor], max_norm: float) -> tuple[float, list[torch.Tensor], float]:
        torch.manual_seed(0)
        model = LstmLM(13, dim=8, num_layers=1, dropout=0.0, tie_embeddings=True)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
        out = lm_train_step(model, micro_batches, optimizer, scheduler, precision=FP32, max_norm=max_norm)
        after = [p.detach().clone() for p in model.parameters()]
        moved = torch.sqrt(sum(((a - b).double() ** 2).sum() for a, b in zip(after, before, strict=True)))
        return out.grad_norm, after, float(moved)

    norm, weights, moved = step([windows], max_norm=100.0)
    assert moved == pytest.approx(norm, rel=1e-4)  # unclipped: SGD moves by the gradient itself
    for parts in ([windows[:3], windows[3:]], [windows[:2], windows[2:4], windows[4:]]):
        parts_norm, parts_weights, _ = step(parts, max_norm=100.0)
        assert parts_norm == pytest.approx(norm, rel=1e-5)
        for got, expected in zip(parts_weights, weights, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    clipped_norm, _, clipped_moved = step([windows[:3], windows[3:]], max_norm=norm / 10)
    assert clipped_norm == pytest.approx(norm, rel=1e-5)  # reported before clipping
    assert clipped_moved == pytest.approx(norm / 10, rel=1e-4)


def test_lm_step_does_not_score_the_bos_after_each_eos_and_takes_the_global_per_target_mean():
    """Windows cut from the stream hold a BOS after each EOS; the step leaves those targets out (as validation and
    scoring do) and averages over the scored targets of the whole batch: micro-batches holding different numbers of
    BOS targets give the step of one batch, and that step is SGD on the mean computed here by hand."""
    bos = 13
    windows = torch.randint(0, 13, (6, 9), generator=torch.Generator().manual_seed(1))
    windows[0, [2, 5, 7]] = bos  # uneven: 3 BOS targets in the first row, 1 in the fourth, none elsewhere
    windows[3, 4] = bos
    windows[1, 0] = bos  # an input, not a target: still read

    def fresh_model() -> LstmLM:
        torch.manual_seed(0)
        return LstmLM(16, dim=8, num_layers=1, dropout=0.0, tie_embeddings=True)

    reference = fresh_model()
    log_probs = reference(windows[:, :-1]).log_softmax(-1)
    targets = windows[:, 1:]
    scored = targets != bos
    expected_loss = -log_probs.gather(-1, targets[..., None])[..., 0][scored].mean()
    expected_loss.backward()
    expected_weights = [(p - p.grad).detach() for p in reference.parameters()]

    def step(parts: list[torch.Tensor], bos: int | None) -> tuple[LstmLM, object]:
        model = fresh_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
        return model, lm_train_step(model, parts, optimizer, scheduler, precision=FP32, max_norm=1e6, bos=bos)

    for parts in ([windows], [windows[:1], windows[1:]], [windows[:3], windows[3:5], windows[5:]]):
        model, out = step(parts, bos)
        assert out.scored == int(scored.sum()) == 6 * 8 - 4
        assert out.tokens == 6 * 8  # (every target position was computed: the throughput's count)
        assert out.loss == pytest.approx(float(expected_loss.detach()), rel=1e-5)
        for got, expected in zip(model.parameters(), expected_weights, strict=True):
            torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    assert step([windows], None)[1].scored == 6 * 8  # without ``bos`` every target counts


class _Poisoned(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = LstmLM(13, dim=8, num_layers=1, dropout=0.0, tie_embeddings=True)
        self.poison = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.inner(tokens)
        return logits * float("nan") if self.poison else logits


def test_a_non_finite_step_is_skipped():
    torch.manual_seed(0)
    model = _Poisoned()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    windows = [torch.randint(0, 13, (4, 9))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.poison = True
    out = lm_train_step(model, windows, optimizer, scheduler, precision=FP32, max_norm=1.0)
    assert out.skipped
    assert scheduler.last_epoch == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    model.poison = False
    out = lm_train_step(model, windows, optimizer, scheduler, precision=FP32, max_norm=1.0)
    assert not out.skipped
    assert scheduler.last_epoch == 1
    assert np.isfinite(out.loss)


def test_a_step_skipped_as_non_finite_is_retried_on_other_windows(tmp_path, monkeypatch):
    """The step counter stays on a skipped step, and its windows were drawn from the step alone: the retry saw the
    same windows (which likely fail again) until the run gave up as diverged. A retry draws others; the first try
    of every step keeps its windows, and a resumed streak draws the same retries (its count is checkpointed)."""
    import spidr.lm.train as lm_train

    cfg = load_lm_config(_config(tmp_path, "retry", optimizer={"max_steps": 6}))
    real_step, seen = lm_train.lm_train_step, []

    def poisoned_once_at_step_3(model, windows, optimizer, scheduler, **kwargs):
        seen.append((scheduler.last_epoch, windows[0].clone()))
        if scheduler.last_epoch == 3 and len(seen) == 4:
            return lm_train.LmStepOutput(True, False, float("nan"), float("nan"), 0, 0)
        return real_step(model, windows, optimizer, scheduler, **kwargs)

    monkeypatch.setattr(lm_train, "lm_train_step", poisoned_once_at_step_3)
    assert train_lm(cfg) == "completed"
    steps = [step for step, _ in seen]
    assert steps == [0, 1, 2, 3, 3, 4, 5]
    assert not torch.equal(seen[3][1], seen[4][1])  # the retry of step 3 has other windows
    # the first try of a step draws what it always drew (starts seeded by seed × 1,000,003 + step), so runs that
    # never skip a step are unchanged; a retry draws others, the same on every call (a resume replays it)
    stream = torch.arange(500) % 13
    sampler = lm_train.WindowSampler(stream, 16, 8, cfg.run.seed)
    starts = torch.randint(0, 500 - 16, (8,), generator=torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + 3))
    assert torch.equal(sampler.windows(3), stream[starts[:, None] + torch.arange(17)[None, :]])
    assert not torch.equal(sampler.windows(3, attempt=1), sampler.windows(3))
    assert torch.equal(sampler.windows(3, attempt=1), lm_train.WindowSampler(stream, 16, 8, cfg.run.seed).windows(
        3, attempt=1))


def test_a_stop_inside_a_non_finite_streak_keeps_its_count(tmp_path, monkeypatch):
    """Stopped after 2 non-finite steps in a row (limit 3), the resumed run gives up at its first: the
    checkpoint carries the streak (it restarted at 0, so a run stopped every few steps never diverged)."""
    import spidr.lm.train as lm_train

    cfg = load_lm_config(_config(tmp_path, "lm", run={"max_consecutive_nonfinite": 3},
                                 optimizer={"max_steps": 20}))
    real_step, calls = lm_train.lm_train_step, []

    def poisoned_after_step_4(model, windows, optimizer, scheduler, **kwargs):
        calls.append(scheduler.last_epoch)
        if scheduler.last_epoch < 4:
            return real_step(model, windows, optimizer, scheduler, **kwargs)
        stop = len(calls) == 6  # the second poisoned step meets a stop signal
        return lm_train.LmStepOutput(True, stop, float("nan"), float("nan"), 0, 0)

    monkeypatch.setattr(lm_train, "lm_train_step", poisoned_after_step_4)
    assert train_lm(cfg) == "interrupted"
    assert calls == [0, 1, 2, 3, 4, 4]
    assert torch.load(cfg.run.run_dir / "step_4.pt", weights_only=True)["nonfinite_streak"] == 2
    calls.clear()
    with pytest.raises(lm_train.LmTrainingDivergedError, match="3 consecutive non-finite steps"):
        train_lm(cfg)
    assert calls == [4]


def test_a_stop_at_the_last_step_still_validates_and_writes_final_pt(tmp_path, monkeypatch):
    """A stop signal met at the last step saved step_<max>.pt and left; the rerun found the run finished and wrote
    final.pt without its closing validation, lost for good. The run now completes (validation, final.pt) and says
    "interrupted", so that its caller stops too."""
    import spidr.lm.train as lm_train

    cfg = load_lm_config(_config(tmp_path, "lm", optimizer={"max_steps": 12}))
    real_step = lm_train.lm_train_step

    def stop_at_the_last(model, windows, optimizer, scheduler, **kwargs):
        out = real_step(model, windows, optimizer, scheduler, **kwargs)
        return dataclasses.replace(out, stop_requested=True) if scheduler.last_epoch == 12 else out

    monkeypatch.setattr(lm_train, "lm_train_step", stop_at_the_last)
    assert train_lm(cfg) == "interrupted"
    assert (cfg.run.run_dir / "final.pt").is_file()
    assert [r["step"] for r in _metrics(cfg.run.run_dir) if r["group"] == "valid"] == [10, 12]


def test_an_ngram_run_of_other_validation_data_is_refused(tmp_path):
    """Rerun with another data.valid, the n-gram run said "nothing to do" and kept the old file's validation loss."""
    first = _toy_units(tmp_path / "valid-a.jsonl", count=10, seed=1)
    cfg = load_lm_config(_config(tmp_path, "bigram", model={"arch": "ngram", "ngram_order": 2},
                                 data={"valid": str(first)}))
    assert train_lm(cfg) == "completed"
    assert train_lm(cfg) == "completed"  # the same: nothing to do
    other = _toy_units(tmp_path / "valid-b.jsonl", count=10, seed=2)
    with pytest.raises(ValueError, match=r"holds an LM trained otherwise \(data\.valid "):
        train_lm(load_lm_config(_config(tmp_path, "bigram", model={"arch": "ngram", "ngram_order": 2},
                                        data={"valid": str(other)})))
    _toy_units(first, count=10, seed=3)  # another content at the same path
    with pytest.raises(ValueError, match=r"holds an LM trained otherwise \(the validation data\)"):
        train_lm(cfg)


def test_the_cache_key_tells_an_edit_in_the_middle_of_a_large_units_file(tmp_path):
    """Past 2 MiB the content digest covers the file's ends only: an edit in place in the middle, size and mtime put
    back (touch -r), kept the key, and training ran on the stale streams. The file's ctime, which no tool sets back,
    is in the key."""
    import time

    from spidr.lm.prepared_data import cache_key

    units = tmp_path / "big.jsonl"
    line = json.dumps({"name": "u", "units": [1] * 40})
    units.write_text("\n".join(line.replace('"u"', f'"u{i:06d}"') for i in range(30_000)) + "\n")
    assert units.stat().st_size > 4 << 20
    cfg = load_lm_config(_config(tmp_path, "big", data={"train": str(units)}))
    before, stat = cache_key(cfg), units.stat()
    time.sleep(0.01)
    with units.open("r+b") as handle:
        handle.seek(stat.st_size // 2)
        handle.write(b"2" if handle.read(1) == b"1" else b"1")
    os.utime(units, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (units.stat().st_size, units.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert cache_key(cfg) != before


def test_the_ngram_baseline_is_fitted_by_counting(tmp_path):
    cfg = load_lm_config(_config(tmp_path, "bigram", model={"arch": "ngram", "ngram_order": 2}))
    assert train_lm(cfg) == "completed"
    model, info, _ = load_lm(cfg.run.run_dir / "final.pt")
    counts = model.counts
    assert counts.shape == (13, 13)
    assert counts.sum() > 0
    vocab = Vocabulary(10)
    # after unit 4 the toy data always goes on with 5 (or ends the utterance)
    assert counts[4, 5] > 0
    assert counts[4, 6] == 0
    assert counts[vocab.bos].sum() == info["train_utterances"]
    assert [r["group"] for r in _metrics(cfg.run.run_dir)].count("valid") == 1
    # without held-out data there is no validation to log (it once logged loss 0, perplexity 1 over 0 tokens)
    cfg = load_lm_config(_config(tmp_path, "bigram-all", model={"arch": "ngram"}, data={"val_fraction": 0.0}))
    assert train_lm(cfg) == "completed"
    logged = cfg.run.run_dir / "metrics.jsonl"
    assert not logged.exists() or [r for r in _metrics(cfg.run.run_dir) if r["group"] == "valid"] == []


def test_ngram_settings_are_checked_with_the_config(tmp_path):
    """Named with the config file when it is loaded (they were checked after the units file was read, unnamed)."""
    for model, message in (({"ngram_order": 3}, r"model\.ngram_order = 3: only 1 \(unigram\) and 2"),
                           ({"ngram_add_k": 0.0}, r"model\.ngram_add_k = 0\.0 must be > 0")):
        path = _config(tmp_path, "n", model={"arch": "ngram", **model})
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {message}"):
            load_lm_config(path)
    assert load_lm_config(_config(tmp_path, "lstm", model={"ngram_order": 3})).model.arch == "lstm"  # unused


def test_an_ngram_fit_does_not_replace_another_lm_of_its_run_folder(tmp_path):
    """An n-gram config with a trained LSTM's run name replaced its final.pt, config.json and metrics (moved to
    metrics.superseded.jsonl) with a warning only: refused, the folder as it was. The same n-gram LM again has
    nothing to do; another order is refused too."""
    torch.set_num_threads(1)
    lstm = load_lm_config(_config(tmp_path, "shared", optimizer={"max_steps": 10}))
    assert train_lm(lstm) == "completed"

    def files(run_dir: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file() and p.name != ".lock"}

    before = files(lstm.run.run_dir)
    ngram = load_lm_config(_config(tmp_path, "shared", model={"arch": "ngram", "ngram_order": 2}))
    with pytest.raises(ValueError, match=r"holds an LM trained otherwise \(model\.arch \('lstm' → 'ngram'\)"):
        train_lm(ngram)
    assert files(lstm.run.run_dir) == before
    bigram = load_lm_config(_config(tmp_path, "bigram", model={"arch": "ngram", "ngram_order": 2}))
    assert train_lm(bigram) == "completed"
    fitted = files(bigram.run.run_dir)
    assert train_lm(bigram) == "completed"
    assert files(bigram.run.run_dir) == fitted  # nothing done again
    unigram = load_lm_config(_config(tmp_path, "bigram", model={"arch": "ngram", "ngram_order": 1}))
    with pytest.raises(ValueError, match=r"model\.ngram_order \(2 → 1\)"):
        train_lm(unigram)
    # settings an n-gram does not read (the neural LMs' dim, context, ...) change nothing: still nothing to do
    wider = load_lm_config(_config(tmp_path, "bigram", model={"arch": "ngram", "ngram_order": 2, "dim": 64}))
    assert train_lm(wider) == "completed"
    assert files(bigram.run.run_dir) == fitted


def test_resuming_on_other_data_or_an_edited_model_is_refused(tmp_path):
    path = _config(tmp_path, "data", optimizer={"max_steps": 10})
    train_lm(load_lm_config(path))
    records = _metrics(tmp_path / "runs" / "data")
    assert train_lm(load_lm_config(path)) == "completed"  # finished: nothing trained, validated or logged again
    assert _metrics(tmp_path / "runs" / "data") == records
    saved = (tmp_path / "runs" / "data" / "config.json").read_text()
    other = _toy_units(tmp_path / "other.jsonl", seed=5)
    with pytest.raises(ValueError, match="other data"):
        train_lm(load_lm_config(path, [f'data.train="{other}"', "optimizer.max_steps=20"]))
    with pytest.raises(ValueError, match=r"holds weights of another shape than this config builds; changed since "
                                         r"it was saved: model\.dim = 48 \(the checkpoint's: 32\).* choose another "
                                         r"run\.name "):
        train_lm(load_lm_config(path, ["model.dim=48", "optimizer.max_steps=20"]))
    assert (tmp_path / "runs" / "data" / "config.json").read_text() == saved  # refused resumes leave it as it was


def test_units_of_the_other_kind_are_refused_for_validation_and_scoring(tmp_path, capsys):
    """An LM trained on discrete units reads only units: a frame-label ('phones') file would otherwise be mapped
    onto unit ids 0..39 of its own making and scored as if it were units."""
    phones = tmp_path / "phones.jsonl"
    phones.write_text(json.dumps({"name": "a", "phones": ["AA", "B"]}) + "\n")
    path = _config(tmp_path, "kinds", model={"arch": "ngram", "ngram_order": 2})
    with pytest.raises(ValueError, match=r"phones\.jsonl holds frame labels .* trained on discrete units"):
        train_lm(load_lm_config(path, [f'data.valid="{phones}"']))
    assert train_lm(load_lm_config(path)) == "completed"
    units = tmp_path / "test-units"
    (units / "lexical").mkdir(parents=True)
    (units / "syntactic").mkdir(parents=True)
    _toy_units(units / "lexical" / "dev.jsonl", count=4)  # scored first: fine on its own
    (units / "syntactic" / "dev.jsonl").write_text(phones.read_text())
    capsys.readouterr()
    assert main(["lm-score", str(tmp_path / "runs" / "kinds" / "final.pt"), str(units), str(tmp_path / "out")]) == 2
    assert "dev.jsonl holds frame labels ('phones' rows), but the LM was trained on discrete units" in (
        capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # nothing half-written: the good task was not scored before the error


def test_config_errors_name_the_field(tmp_path):
    path = _config(tmp_path, "bad")
    with pytest.raises(ValueError, match=r"\[model\] has unknown key\(s\) depth"):
        load_lm_config(path, ["model.depth=3"])
    with pytest.raises(ValueError, match=r"model\.arch"):
        load_lm_config(path, ['model.arch="rnn"'])
    with pytest.raises(ValueError, match=r"optimizer\.batch_size = 6 must be a multiple"):
        load_lm_config(path, ["optimizer.batch_size=6", "optimizer.grad_accum_steps=4"])
    with pytest.raises(ValueError, match=r"model\.dim = 30 must be a multiple of model\.num_heads = 4"):
        load_lm_config(path, ['model.arch="gpt"', "model.dim=30"])
    with pytest.raises(ValueError, match=r"data\.train is required"):
        load_lm_config(path, ['data.train=""'])
    assert main(["lm-train", str(path), "--set", "optimizer.lr=-1"]) == 2
    with pytest.raises(ValueError, match=r"optimizer\.dtype = 'float16' is not supported for training"):
        load_lm_config(path, ['optimizer.dtype="float16"'])  # it would need loss scaling


def test_a_second_lm_run_in_a_run_folder_in_use_is_refused(tmp_path):
    from spidr.folder_lock import folder_lock

    cfg = load_lm_config(_config(tmp_path, "busy", optimizer={"max_steps": 5}))
    with folder_lock(cfg.run.run_dir, "a running trainer"), pytest.raises(
            ValueError, match=rf"the training run in {cfg.run.run_dir} is being run by process {os.getpid()} "):
        train_lm(cfg)
    assert not (cfg.run.run_dir / "config.json").exists()
    assert train_lm(cfg) == "completed"


def test_training_data_of_exactly_one_window_is_enough():
    from spidr.lm.data import WindowSampler

    sampler = WindowSampler(torch.arange(9), context=8, batch_size=2, seed=0)
    assert sampler.windows(0).tolist() == [list(range(9))] * 2
    with pytest.raises(ValueError, match=r"has 8 tokens, fewer than one window of model\.context \+ 1 = 9"):
        WindowSampler(torch.arange(8), context=8, batch_size=2, seed=0)


def test_lm_score_writes_a_valid_submission_that_lm_eval_reads(tmp_path, capsys):
    cfg_path = _config(tmp_path, "scorer", optimizer={"max_steps": 30}, model={"dropout": 0.0})
    assert main(["lm-train", str(cfg_path)]) == 0
    bench, units = tmp_path / "bench", tmp_path / "units"
    # a lexical set: counting words (the LM's "language") against scrambled ones of the same length
    lexical, syntactic, lexical_units, syntactic_units = [], [], [], []
    rng = np.random.default_rng(3)
    for i in range(12):
        start = int(rng.integers(0, 10))
        word = [(start + k) % 10 for k in range(6)]
        nonword = [int(u) for u in rng.permutation(word)]
        for voice in ("a", "b"):
            lexical += [LexicalItem(str(i), f"w{i}{voice}", voice, 3 if i % 2 else 0, "w", "x", 6, True),
                        LexicalItem(str(i), f"n{i}{voice}", voice, 3 if i % 2 else 0, "n", "x", 6, False)]
            lexical_units += [{"name": f"w{i}{voice}", "units": word}, {"name": f"n{i}{voice}", "units": nonword}]
            syntactic += [SyntacticItem(str(i), f"g{i}{voice}", voice, "count", "up", "g", True),
                          SyntacticItem(str(i), f"b{i}{voice}", voice, "count", "up", "b", False)]
            syntactic_units += [{"name": f"g{i}{voice}", "units": word + word[:3]},
                                {"name": f"b{i}{voice}", "units": word + nonword[:3]}]
    write_lexical_gold(bench / "lexical" / "dev" / "gold.csv", lexical)
    write_syntactic_gold(bench / "syntactic" / "dev" / "gold.csv", syntactic)
    for task, rows in (("lexical", lexical_units), ("syntactic", syntactic_units)):
        (units / task).mkdir(parents=True)
        (units / task / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = tmp_path / "runs" / "scorer" / "final.pt"
    for norm in ("mean", "sum"):
        assert main(["lm-score", str(final), str(units), str(tmp_path / norm), "--norm", norm]) == 0
        scores = read_submission(tmp_path / norm / "lexical" / "dev.txt")
        check_complete(scores, read_lexical_gold(bench / "lexical" / "dev" / "gold.csv"), "submission")
    assert main(["lm-score", str(final), str(units), str(tmp_path / "mean")]) == 2  # no silent replacement
    assert "mean already exists; pass --overwrite" in capsys.readouterr().err
    # --overwrite with fewer sets: the earlier submission's syntactic file goes (lm-eval scored it as this model's)
    only_lexical = tmp_path / "only-lexical"
    (only_lexical / "lexical").mkdir(parents=True)
    (only_lexical / "lexical" / "dev.jsonl").write_text((units / "lexical" / "dev.jsonl").read_text())
    assert main(["lm-score", str(final), str(only_lexical), str(tmp_path / "sum"), "--overwrite"]) == 0
    assert not (tmp_path / "sum" / "syntactic" / "dev.txt").exists()
    assert read_submission(tmp_path / "sum" / "lexical" / "dev.txt") == read_submission(
        tmp_path / "mean" / "lexical" / "dev.txt")  # (mean scores now: the default norm)
    assert json.loads((tmp_path / "sum" / "meta.json").read_text())["items"] == {"lexical/dev": 48}
    mean = read_submission(tmp_path / "mean" / "lexical" / "dev.txt")
    assert main(["lm-score", str(final), str(units), str(tmp_path / "sum"), "--norm", "sum", "--overwrite"]) == 0
    total = read_submission(tmp_path / "sum" / "lexical" / "dev.txt")
    for i in range(12):  # equal lengths: the two normalisations take the same decisions
        assert (mean[f"w{i}a"] > mean[f"n{i}a"]) == (total[f"w{i}a"] > total[f"n{i}a"])
    rows = [json.loads(line) for line in (tmp_path / "mean" / "scores.jsonl").read_text().splitlines()]
    assert {r["num_tokens"] for r in rows if r["task"] == "lexical"} == {7}  # 6 units (no repeats) + EOS
    capsys.readouterr()
    assert main(["lm-eval", str(bench), str(tmp_path / "mean"), "--kind", "dev", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["swuggy_all"] > 80
    assert results["sblimp"] > 80
    assert set(results) >= {"swuggy_all", "swuggy_invocab", "sblimp"}
    # an item name a submission line cannot hold, in the last file scored: refused by its units line, before any
    # output is written (the first task's submission and scores were left behind, and a rerun was refused)
    (units / "tsc").mkdir()
    (units / "tsc" / "dev.jsonl").write_text('{"name": "ok1", "units": [1, 2]}\n'
                                             '{"name": "spk/my utt.wav", "units": [3]}\n')
    assert main(["lm-score", str(final), str(units), str(tmp_path / "spaced")]) == 2
    assert "tsc/dev.jsonl: line 2: the item name 'my utt' (the file stem of its 'name') cannot be a line of a " \
        "ZeroSpeech submission" in capsys.readouterr().err
    assert not (tmp_path / "spaced").exists()
    (units / "tsc" / "dev.jsonl").write_text('{"name": "ok1", "units": [1, 2], "phones": ["AA"]}\n')
    assert main(["lm-score", str(final), str(units), str(tmp_path / "both")]) == 2
    assert "tsc/dev.jsonl: line 1: the row holds both 'units' and 'phones'; give one per row" in (
        capsys.readouterr().err)


@pytest.mark.slow
def test_lm_study_on_a_tiny_benchmark(tmp_path, capsys, monkeypatch):
    """The fuller study command end to end (synthesis included): it measures unit quality itself."""
    import shutil

    from spidr.config import SpidRConfig
    from spidr.models.build import build_model
    from spidr.models.loading import export_safetensors

    if shutil.which("flite") is None or shutil.which("espeak-ng") is None:
        pytest.skip("flite / espeak-ng are not installed (make apt)")
    torch.manual_seed(0)
    cfg = SpidRConfig(extractor_conv_layer_config=((16, 10, 5), (16, 3, 2), (16, 3, 2), (16, 3, 2), (16, 3, 2),
                                                   (16, 2, 2), (16, 2, 2)),
                      encoder_embed_dim=32, encoder_num_layers=2, encoder_num_heads=2, encoder_ff_interm_features=64,
                      encoder_pos_conv_groups=4, num_codebooks=2, codebook_size=16)
    export_safetensors(build_model(cfg), tmp_path / "tiny.safetensors")
    lm = ["--set", "optimizer.max_steps=2", "--set", "optimizer.batch_size=2", "--set", "model.dim=8",
          "--set", "model.num_layers=1", "--set", "model.context=16", "--set", 'optimizer.dtype="float32"']
    assert main(["lm-study", "--checkpoint", f"tiny={tmp_path / 'tiny.safetensors'}", "--random-init", "--layers", "2",
                 "--out", str(tmp_path / "study"), "--train-utterances", "10", "--syntactic-pairs", "4",
                 "--tsc-pairs", "2", "--lexical-words", "4", "--jobs", "2", *lm]) == 0
    study = json.loads((tmp_path / "study" / "spoken_lm.json").read_text())
    assert [row["name"] for row in study["rows"]] == ["phone oracle (LSTM)", "untrained LSTM (phones, 5 seeds)",
                                                       "phone bigram", "tiny L2", "tiny (random init) L2"]
    for name in ("tiny-l2", "tiny--random-init--l2"):
        # the vocabulary is the codebook, also where the training units leave codewords unused
        info = torch.load(tmp_path / "study" / "lms" / name / "final.pt", weights_only=True)["lm"]
        assert info["num_units"] == cfg.codebook_size
    for row in study["rows"][3:]:
        assert -1e-6 <= row["pnmi"] <= 1.0  # a one-unit code has MI 0 up to the eps
        assert 0.0 <= row["unit_abx_across"] <= 100.0
    # ABX of the layer's features (the paper's "continuous ABX"), as `spidr extract` + `spidr abx` give it
    from spidr.eval.abx import abx_error_rate
    from spidr.eval.feature_dir import one_layer_directory
    from spidr.eval.features import ExtractionSettings
    from spidr.eval.folder_extraction import extract_to_directory
    from spidr.lm.bench_units import split_entries
    from spidr.models.loading import load_model

    syntactic = tmp_path / "study" / "bench" / "syntactic" / "dev"
    extract_to_directory(load_model(tmp_path / "tiny.safetensors"), split_entries(syntactic), tmp_path / "feats",
                         ExtractionSettings(layers=(2,)), progress=False)
    for speaker in ("within", "across"):
        expected = 100 * abx_error_rate(one_layer_directory(tmp_path / "feats" / "layer_02"),
                                        syntactic / "triphone.item", speaker=speaker, context="within")
        assert study["rows"][3][f"abx_{speaker}"] == pytest.approx(expected, abs=1e-6)
    assert all(row["abx_across"] is not None for row in study["rows"][3:])
    assert "abx_across,unit_abx_within" in (tmp_path / "study" / "points.csv").read_text()
    # a rerun takes the continuous ABX kept beside the units: the model does not run over the split again

    def not_again(*args, **kwargs):
        raise AssertionError("continuous ABX measured again")

    from spidr.lm import study as study_module

    monkeypatch.setattr(study_module, "measure_feature_abx", not_again)
    assert main(["lm-study", "--checkpoint", f"tiny={tmp_path / 'tiny.safetensors'}", "--random-init", "--layers", "2",
                 "--out", str(tmp_path / "study"), "--train-utterances", "10", "--syntactic-pairs", "4",
                 "--tsc-pairs", "2", "--lexical-words", "4", "--jobs", "2", *lm]) == 0
    again = json.loads((tmp_path / "study" / "spoken_lm.json").read_text())
    assert [row["abx_across"] for row in again["rows"]] == [row["abx_across"] for row in study["rows"]]
    # the seen-voice diagnostic (on by default): the lexical pairs spoken by training voices, scored for every LM
    assert all(0.0 <= row["swuggy_seen_invocab"] <= 100.0 for row in study["rows"])
    out = capsys.readouterr().out
    assert "| tiny L2 |" in out
    assert "sWUGGY in-vocab, training voices % |" in out


def test_the_untrained_copy_holds_the_initial_weights(tmp_path):
    from spidr.lm.train import write_untrained

    cfg = load_lm_config(_config(tmp_path, "init", optimizer={"max_steps": 10}))
    train_lm(cfg)
    untrained = torch.load(write_untrained(cfg.run.run_dir / "final.pt", tmp_path / "untrained.pt"), weights_only=True)
    step_0 = torch.load(cfg.run.run_dir / "step_0.pt", weights_only=True)
    final = torch.load(cfg.run.run_dir / "final.pt", weights_only=True)
    for key, value in step_0["model"].items():
        assert torch.equal(untrained["model"][key], value), key
        assert not torch.equal(final["model"][key], value) or "bias" in key
    assert load_lm(tmp_path / "untrained.pt")[1]["step"] == 0
    # an LM trained with float16 before it was refused still loads for scoring; training it again is refused
    import dataclasses

    old = {**final, "config": {**final["config"], "optimizer": {**final["config"]["optimizer"], "dtype": "float16"}}}
    torch.save(old, tmp_path / "float16.pt")
    model, _, _ = load_lm(tmp_path / "float16.pt")
    assert all(torch.equal(p, final["model"][k]) for k, p in model.state_dict().items())
    with pytest.raises(ValueError, match=r"optimizer\.dtype = 'float16' is not supported for training"):
        train_lm(dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, dtype="float16")))


def test_a_demo_study_remakes_a_stale_benchmark_and_drops_what_came_from_it(tmp_path, monkeypatch):
    """A study folder whose benchmark was made with other settings: the demo (rebuild_stale) makes it again and
    deletes the units, LMs and scores derived from the old one; lm-study (the default) leaves it to the generator,
    which refuses it."""
    from spidr.corpus.lm_bench import INFO_JSON, LmBenchSettings, bench_parameters
    from spidr.lm import study

    calls = []
    monkeypatch.setattr(study, "generate_lm_bench", lambda path, settings, jobs=None, overwrite=False:
                        calls.append((path, settings, overwrite)))
    wanted = LmBenchSettings(train_utterances=10, seen_voices=("awb",))
    old = {"format": 1, **{k: v for k, v in bench_parameters(wanted).items() if k != "seen_voices"}}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / INFO_JSON).write_text(json.dumps({"parameters": old, "counts": {}}))
    for name in (*study.DERIVED, "keep"):
        (tmp_path / name).mkdir()
    study._benchmark(tmp_path, study.StudySettings(bench=wanted))
    assert calls.pop() == (tmp_path / "bench", wanted, False)  # not stale-tolerant: the generator decides (refuses)
    assert all((tmp_path / name).is_dir() for name in study.DERIVED)
    study._benchmark(tmp_path, study.StudySettings(bench=wanted, rebuild_stale=True))
    assert calls.pop() == (tmp_path / "bench", wanted, True)
    assert not any((tmp_path / name).exists() for name in study.DERIVED)
    assert (tmp_path / "keep").is_dir()
    # the same settings: reused as they are, derived files kept
    (tmp_path / "units").mkdir()
    (tmp_path / "bench" / INFO_JSON).write_text(json.dumps({"parameters": bench_parameters(wanted), "counts": {}}))
    study._benchmark(tmp_path, study.StudySettings(bench=wanted, rebuild_stale=True))
    assert calls.pop() == (tmp_path / "bench", wanted, False)
    assert (tmp_path / "units").is_dir()


def test_a_model_s_units_are_reused_only_when_made_from_the_same_weights_and_settings(tmp_path, monkeypatch):
    """The units folder's ``.complete`` records what made it. Same identity: reused. A folder from other weights,
    or from a spidr that recorded nothing (an empty ``.complete``, e.g. the all-bf16 extraction): the demo
    (rebuild_stale) makes it again and deletes the LMs trained on it; lm-study refuses it and names what to delete."""
    from spidr.config import SpidRConfig
    from spidr.corpus.lm_bench import LmBenchInfo
    from spidr.lm import study
    from spidr.models.build import build_model
    from train_fixtures import EXTRACTION_MODEL

    writes = []

    def fake_write(model, bench_dir, out_dir, *, layers, centroids=None, dtype="float32"):
        writes.append((tuple(layers), dtype))
        for layer in layers:
            (Path(out_dir) / f"layer_{layer:02d}").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(study, "write_model_units", fake_write)
    torch.manual_seed(0)
    model = study.StudyModel("tiny", build_model(SpidRConfig(**EXTRACTION_MODEL)).eval(), (2,))
    bench = LmBenchInfo(tmp_path / "bench", {"format": 2}, {"train": {"utterances": 10}})
    model_dir = tmp_path / "units" / "tiny"
    settings = study.StudySettings(dtype="bfloat16")
    demo = study.StudySettings(dtype="bfloat16", rebuild_stale=True)

    study._model_units(model, bench, model_dir, tmp_path, settings)
    assert writes == [((2,), "bfloat16")]
    assert json.loads((model_dir / ".complete").read_text()) == study.units_identity(model, settings, bench)
    study._model_units(model, bench, model_dir, tmp_path, settings)
    assert len(writes) == 1  # the same weights and settings: reused

    (model_dir / ".complete").write_text("")  # made by a spidr that recorded nothing
    lm_dir, other_lm = tmp_path / "lms" / "tiny-l2", tmp_path / "lms" / "other-l2"
    lm_dir.mkdir(parents=True)
    other_lm.mkdir()
    with pytest.raises(ValueError, match=r"made with a spidr that recorded nothing.*lms/tiny-l2"):
        study._model_units(model, bench, model_dir, tmp_path, settings)
    assert len(writes) == 1
    assert lm_dir.is_dir()
    study._model_units(model, bench, model_dir, tmp_path, demo)
    assert len(writes) == 2
    assert not lm_dir.exists()
    assert other_lm.is_dir()

    with torch.no_grad():
        model.model.mask_embedding.add_(1.0)  # other weights under the same name
    with pytest.raises(ValueError, match="made with other model;"):
        study._model_units(model, bench, model_dir, tmp_path, settings)
    lm_dir.mkdir()
    study._model_units(model, bench, model_dir, tmp_path, demo)
    assert len(writes) == 3
    assert not lm_dir.exists()


def test_the_units_identity_of_a_reloaded_or_rebuilt_model_is_the_same(tmp_path):
    """A re-run loads the checkpoint again and rebuilds the random-init baseline: both must give the identity their
    folders hold, or every re-run would remake its units."""
    from spidr.config import SpidRConfig
    from spidr.corpus.lm_bench import LmBenchInfo
    from spidr.lm import study
    from spidr.models.build import build_model, random_init_model
    from spidr.models.loading import export_safetensors, load_model
    from train_fixtures import EXTRACTION_MODEL

    cfg = SpidRConfig(**EXTRACTION_MODEL)
    settings = study.StudySettings()
    bench = LmBenchInfo(tmp_path, {"format": 2}, {})
    first, second = random_init_model(cfg), random_init_model(cfg)
    assert study.units_identity(study.StudyModel("r", first, (1, 2)), settings, bench) == \
        study.units_identity(study.StudyModel("r", second, (2, 1)), settings, bench)
    torch.manual_seed(1)
    export_safetensors(build_model(cfg).eval(), tmp_path / "m.safetensors")
    a, b = load_model(tmp_path / "m.safetensors"), load_model(tmp_path / "m.safetensors")
    assert study.units_identity(study.StudyModel("m", a, (2,)), settings, bench) == \
        study.units_identity(study.StudyModel("m", b, (2,)), settings, bench)
    assert study.units_identity(study.StudyModel("m", a, (2,)), settings, bench) != \
        study.units_identity(study.StudyModel("r", first, (2,)), settings, bench)


def test_two_models_with_one_units_folder_are_refused(tmp_path):
    """Two checkpoints named alike (the file stem: runs/a/final.pt, runs/b/final.pt) would share units/final."""
    from spidr.lm import study

    models = [study.StudyModel("final", None, (1,)), study.StudyModel("final", None, (1,))]
    with pytest.raises(ValueError, match=r"same units folder \['final'\].*NAME=CKPT"):
        study.run_study(models, tmp_path)
    with pytest.raises(ValueError, match=r"\['oracle'\]"):
        study.run_study([study.StudyModel("Oracle", None, (1,))], tmp_path)
    assert not (tmp_path / "bench").exists()


def test_each_study_plot_shows_the_points_and_r_of_its_own_correlation(tmp_path, monkeypatch):
    """A point lacking one metric drops out of that metric's correlation only; its plot must agree with the table
    (it used to take the points having PNMI and sWUGGY, and crashed on a missing ABX)."""
    from spidr.corpus.lm_bench import LmBenchInfo
    from spidr.lm import correlate as correlate_module
    from spidr.lm.study import write_study_report

    drawn = []
    real_plot = correlate_module.plot_scatter

    def spy(rows, x, y, path, *, result=None):
        drawn.append((x, y, [row["layer"] for row in rows], result))
        return real_plot(rows, x, y, path, result=result)

    monkeypatch.setattr(correlate_module, "plot_scatter", spy)
    rows = [{"name": f"m L{layer}", "model": "m", "layer": layer, "unit_abx_within": None, "unit_abx_across": abx,
             "pnmi": pnmi, "swuggy_all": sw, "swuggy_invocab": sw, "sblimp": 50.0, "tsc": 50.0}
            for layer, abx, pnmi, sw in [(1, 10.0, 0.5, 70.0), (2, 20.0, 0.4, 61.0), (3, 30.0, 0.3, 55.0),
                                         (4, None, 0.2, 52.0), (5, 12.0, None, 66.0)]]
    bench = LmBenchInfo(tmp_path, {"test_voices": ["v"]}, {"train": {"hours": 1.0}})
    report = write_study_report(rows, tmp_path, bench).read_text()
    plotted = {(x, y): (layers, result) for x, y, layers, result in drawn}
    assert plotted.keys() == {("unit_abx_across", "swuggy_invocab"), ("pnmi", "swuggy_invocab")}
    assert plotted["unit_abx_across", "swuggy_invocab"][0] == [1, 2, 3, 5]
    assert plotted["pnmi", "swuggy_invocab"][0] == [1, 2, 3, 4]
    for (x, y), (layers, result) in plotted.items():
        assert result["n"] == len(layers)
        # 4 points: too few for a bootstrap interval, none is shown
        assert all(math.isnan(bound) for bound in [*result["pearson_r_ci95"], *result["spearman_rho_ci95"]])
        row = (f"| {x} | {y} | {len(layers)} | {result['pearson_r']:+.2f} | {result['pearson_p']:.2g} | "
               f"{result['spearman_rho']:+.2f} | {result['spearman_p']:.2g} |")
        assert row in report
        assert (tmp_path / f"{y}_vs_{x}.png").stat().st_size > 0
    # spoken_lm.json holds the intervals not given as null, not as NaN (which strict JSON readers refuse)
    def refuse(constant):
        raise ValueError(f"{constant} in spoken_lm.json")

    written = json.loads((tmp_path / "spoken_lm.json").read_text(), parse_constant=refuse)
    assert written["correlations"]
    assert all(c["pearson_r_ci95"] == c["spearman_rho_ci95"] == [None, None] for c in written["correlations"])


def test_unit_files_are_found_per_task_and_split_and_a_doubled_one_is_refused(tmp_path, caplog):
    from spidr.lm.evaluate import evaluate_benchmark
    from spidr.lm.score import find_unit_files

    (tmp_path / "lexical").mkdir()
    (tmp_path / "tsc").mkdir()
    (tmp_path / "storycloze").mkdir()  # the spec's and the release's name: nothing reads it, but a warning says so
    (tmp_path / "storycloze" / "dev.jsonl").write_text("")
    (tmp_path / "lexical" / "dev.jsonl").write_text("")
    (tmp_path / "tsc" / "test.jsonl.gz").write_bytes(b"")
    (tmp_path / "lexical" / "notes.jsonl").write_text("")
    with caplog.at_level("WARNING", logger="spidr"):
        assert find_unit_files(tmp_path) == {("lexical", "dev"): tmp_path / "lexical" / "dev.jsonl",
                                             ("tsc", "test"): tmp_path / "tsc" / "test.jsonl.gz"}
    said = (f"units folder {tmp_path / 'storycloze'} is not read: the task folders are lexical, syntactic, tsc, ssc, "
            "lexical_seen (topic StoryCloze goes in tsc/, spoken StoryCloze in ssc/)")
    assert said in caplog.text
    caplog.clear()
    (tmp_path / "train_audio").mkdir()  # a benchmark may hold other folders: only a StoryCloze-like one is named
    (tmp_path / "none").mkdir()
    with caplog.at_level("WARNING", logger="spidr"), pytest.raises(ValueError, match="no task to score"):
        evaluate_benchmark(tmp_path, tmp_path / "none")
    assert f"benchmark folder {tmp_path / 'storycloze'} is not read" in caplog.text
    assert "train_audio" not in caplog.text
    (tmp_path / "lexical" / "dev.jsonl.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"both .*lexical/dev\.jsonl and .*lexical/dev\.jsonl\.gz exist"):
        find_unit_files(tmp_path)


def test_speech_model_commands_name_a_unit_lm_checkpoint_for_what_it_is(tmp_path, capsys):
    """`spidr info` (and every command that loads a SpidR/DinoSR model) read an LM's final.pt as a speech model and
    listed ~40 unknown [model] keys."""
    cfg = load_lm_config(_config(tmp_path, "lm", optimizer={"max_steps": 2}))
    assert train_lm(cfg) == "completed"
    final = cfg.run.run_dir / "final.pt"
    for command in (["info", str(final)], ["export", str(final), str(tmp_path / "x.safetensors")]):
        assert main(command) == 2
        assert f"{final} is a unit-LM checkpoint (spidr lm-train), not a SpidR/DinoSR model" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["lstm", "gpt"])
def test_lm_score_writes_the_log_probability_of_the_deduplicated_units_and_eos(tmp_path, arch):
    """Each submission line against a forward pass computed here: a dedup-trained LM scores BOS + the units with
    repeats collapsed + EOS; --norm sum writes Σ log p of the predicted tokens, --norm mean (the default) that sum
    over their count (units after dedup + EOS). Items of unequal lengths with repeats tell every choice apart."""
    from spidr.lm.score import find_unit_files, score_benchmark
    from spidr.lm.tokens import Vocabulary
    from spidr.lm.train import load_lm

    cfg_path = _config(tmp_path, "dedup", data={"dedup": True}, optimizer={"max_steps": 10},
                       model={"arch": arch, "dropout": 0.0, "num_heads": 2, "ffn_dim": 64} if arch == "gpt" else
                       {"dropout": 0.0})
    assert main(["lm-train", str(cfg_path)]) == 0
    final = tmp_path / "runs" / "dedup" / "final.pt"
    items = {"a": [3, 3, 3, 1, 4, 4], "b": [2, 7, 7, 1, 8, 2, 8, 8, 5], "c": [9], "d": [6, 6]}
    units = tmp_path / "items"
    (units / "lexical").mkdir(parents=True)
    (units / "lexical" / "dev.jsonl").write_text("".join(json.dumps({"name": k, "units": v}) + "\n"
                                                         for k, v in items.items()))
    model, info, _ = load_lm(final)
    vocab = Vocabulary(info["num_units"])
    expected = {}
    for name, values in items.items():
        deduplicated = [u for i, u in enumerate(values) if i == 0 or u != values[i - 1]]
        tokens = torch.tensor([vocab.bos, *deduplicated, vocab.eos])
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens[None, :-1]).double(), dim=-1)[0]
        expected[name] = (float(logp.gather(1, tokens[1:, None]).sum()), len(deduplicated) + 1)
    for norm in ("sum", "mean"):
        score_benchmark(final, find_unit_files(units), tmp_path / norm, norm=norm)
        written = read_submission(tmp_path / norm / "lexical" / "dev.txt")
        for name, (total, count) in expected.items():
            assert written[name] == pytest.approx(total if norm == "sum" else total / count, abs=1e-4), (norm, name)
    rows = {json.loads(line)["name"]: json.loads(line) for line in (tmp_path / "sum" / "scores.jsonl").open()}
    assert {name: row["num_tokens"] for name, row in rows.items()} == {"a": 4, "b": 8, "c": 2, "d": 2}


def _split_config(tmp_path: Path, seed: int = 0, val_fraction: float = 0.3):
    from spidr.lm.config import load_lm_config

    units = tmp_path / "units.jsonl"
    rng = np.random.default_rng(0)
    with units.open("w") as handle:
        for i in range(40):
            handle.write(json.dumps({"name": f"u{i:03d}", "units": rng.integers(0, 10, rng.integers(3, 9)).tolist()})
                         + "\n")
    config = {"run": {"workdir": str(tmp_path / "runs"), "name": f"s{seed}", "device": "cpu", "seed": seed},
              "data": {"train": str(units), "dedup": False, "val_fraction": val_fraction},
              "model": {"arch": "lstm", "dim": 8, "num_layers": 1, "context": 4}}
    path = tmp_path / f"s{seed}.json"
    path.write_text(json.dumps(config))
    return load_lm_config(path), units


def test_held_out_utterances_are_not_trained_on(tmp_path):
    """mut data-heldout-leak. Truth: the split is a partition of the file's utterances, each encoded as
    BOS u... EOS (len + 2 tokens): the two streams together hold exactly the file's tokens, and no unit sequence of
    the valid stream is in the train stream's utterance set."""
    from spidr.lm.prepared_data import prepare_data

    cfg, units = _split_config(tmp_path)
    rows = [json.loads(line) for line in units.read_text().splitlines()]
    data = prepare_data(cfg)
    assert 0 < data.info["valid_utterances"] < len(rows)
    assert data.info["train_utterances"] + data.info["valid_utterances"] == len(rows)
    assert data.train.numel() + data.valid.numel() == sum(len(r["units"]) + 2 for r in rows)


def test_the_held_out_choice_depends_on_run_seed(tmp_path):
    """mut data-heldout-seedless. Truth: configs/lm-lstm.toml documents val_fraction as 'held-out utterances, chosen
    by a hash of their name and run.seed' (and the token cache is keyed by the seed for that reason)."""
    from spidr.lm.data import is_held_out

    stems = [f"utt{i}" for i in range(200)]
    chosen = [{s for s in stems if is_held_out(s, 0.3, seed)} for seed in range(3)]
    assert all(40 <= len(c) <= 80 for c in chosen)  # ~60 of 200
    assert len({frozenset(c) for c in chosen}) == 3


def test_file_stem_strips_flac_too():
    """mut tokens-flac-stem. Truth: a ZeroSpeech submission line is keyed by the file stem; audio in .flac (which
    spidr reads) must give the same key as .wav."""
    from spidr.lm.tokens import file_stem

    assert file_stem("/data/spk/utt.flac") == file_stem("/data/spk/utt.wav") == file_stem("spk/utt") == "utt"



def test_unfinished_lm_units_and_lm_score_folders_are_named(tmp_path, capsys):
    """A killed lm-units left sets out, and lm-score scored the rest and exited 0; a killed lm-score's folder was
    refused by its rerun as an earlier result ("pass --overwrite"), and lm-eval scored it. lm-score now refuses an
    unfinished units folder, redoes its own unfinished submission, and lm-eval refuses it."""
    from spidr.lm.bench_units import IN_PROGRESS as UNITS_IN_PROGRESS
    from spidr.lm.evaluate import evaluate_benchmark
    from spidr.lm.score import IN_PROGRESS as SCORE_IN_PROGRESS

    cfg_path = _config(tmp_path, "lm", optimizer={"max_steps": 5})
    assert main(["lm-train", str(cfg_path)]) == 0
    final = tmp_path / "runs" / "lm" / "final.pt"
    units = tmp_path / "units" / "layer_05"
    (units / "lexical").mkdir(parents=True)
    (units / "lexical" / "dev.jsonl").write_text('{"name": "a", "units": [1, 2]}\n')
    (units.parent / UNITS_IN_PROGRESS).touch()
    assert main(["lm-score", str(final), str(units), str(tmp_path / "sub")]) == 2
    assert "is an unfinished spidr lm-units run" in capsys.readouterr().err
    (units.parent / UNITS_IN_PROGRESS).unlink()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "lexical").mkdir()
    (tmp_path / "sub" / "lexical" / "dev.txt").write_text("a -1.0\n")  # what a killed run left
    (tmp_path / "sub" / SCORE_IN_PROGRESS).touch()
    (tmp_path / "bench").mkdir()
    with pytest.raises(ValueError, match="is an unfinished spidr lm-score run"):
        evaluate_benchmark(tmp_path / "bench", tmp_path / "sub")
    assert main(["lm-score", str(final), str(units), str(tmp_path / "sub")]) == 0  # no --overwrite needed
    assert not (tmp_path / "sub" / SCORE_IN_PROGRESS).exists()
    assert (tmp_path / "sub" / "meta.json").is_file()
    assert main(["lm-score", str(final), str(units), str(tmp_path / "sub")]) == 2  # a finished one is kept


def test_a_running_lm_score_s_marker_is_not_taken_for_a_killed_one_s(tmp_path, monkeypatch, capsys):
    """A second lm-score started while the first wrote its files read the first one's live marker as a killed run's,
    waited for the lock (the first then finished) and replaced its finished submission without --overwrite, both
    saying "submission written". The marker must be looked for under the lock: here the first run finishes (its
    marker goes) just as the second takes the lock, and the second must be refused, the submission kept."""
    from spidr import cli_types
    from spidr.lm.score import IN_PROGRESS

    cfg_path = _config(tmp_path, "lm", optimizer={"max_steps": 2})
    assert main(["lm-train", str(cfg_path)]) == 0
    units = tmp_path / "units" / "layer_05"
    (units / "lexical").mkdir(parents=True)
    (units / "lexical" / "dev.jsonl").write_text('{"name": "a", "units": [1, 2]}\n')
    submission = tmp_path / "sub"
    (submission / "lexical").mkdir(parents=True)
    (submission / "lexical" / "dev.txt").write_text("a -1.0\n")  # the first run's, being written
    (submission / IN_PROGRESS).touch()
    real_lock = cli_types.output_lock

    def first_run_finishes_then_lock(path, what):
        (submission / IN_PROGRESS).unlink()
        return real_lock(path, what)

    monkeypatch.setattr(cli_types, "output_lock", first_run_finishes_then_lock)
    assert main(["lm-score", str(tmp_path / "runs" / "lm" / "final.pt"), str(units), str(submission)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (submission / "lexical" / "dev.txt").read_text() == "a -1.0\n"


def test_lm_score_marks_its_submission_before_its_first_file(tmp_path, monkeypatch):
    """Truth (README: a submission is marked while lm-score writes it): a kill after the first set's file
    is written leaves the folder marked, so lm-eval refuses the partial submission and the rerun redoes it. The LM
    and its scores are stubbed: only the order of the writes is under test."""
    from types import SimpleNamespace

    from spidr.lm import score
    from spidr.lm.evaluate import evaluate_benchmark

    monkeypatch.setattr(score, "load_lm", lambda checkpoint, device: (None, {"num_units": 4, "arch": "lstm"}, None))
    monkeypatch.setattr(score, "read_lm_units",
                        lambda path, info, labels: SimpleNamespace(sequences={"a": np.array([1, 2])}))
    monkeypatch.setattr(score, "score_sequences", lambda *args, **kwargs: {"a": score.ItemScore(-3.0, 3)})
    written = []

    def write_then_killed(path, text):
        if written:
            raise KeyboardInterrupt  # (a kill: nothing after this runs)
        written.append(path)
        path.write_text(text)

    monkeypatch.setattr(score, "write_atomically", write_then_killed)
    inputs = {("lexical", "dev"): tmp_path / "lexical.jsonl", ("syntactic", "dev"): tmp_path / "syntactic.jsonl"}
    with pytest.raises(KeyboardInterrupt):
        score.score_benchmark(tmp_path / "lm.pt", inputs, tmp_path / "sub")
    assert written == [tmp_path / "sub" / "lexical" / "dev.txt"]
    assert (tmp_path / "sub" / score.IN_PROGRESS).exists()
    (tmp_path / "bench").mkdir()
    with pytest.raises(ValueError, match="is an unfinished spidr lm-score run"):
        evaluate_benchmark(tmp_path / "bench", tmp_path / "sub")


def test_lm_train_leaves_the_bos_targets_of_its_windows_out_of_every_step(tmp_path, monkeypatch):
    """Truth (the module docstring: the step's mean is over units and EOS, not the BOS after each EOS): the windows
    of a run over utterances of 8-19 units hold a BOS after each EOS, and every step lm-train takes is told that
    id, so its scored targets are fewer than its window targets by exactly the BOS targets."""
    from spidr.lm import train as lm_train

    real_step, steps = lm_train.lm_train_step, []

    def recorded(model, windows, *args, **kwargs):
        out = real_step(model, windows, *args, **kwargs)
        steps.append((kwargs.get("bos"), [w.clone() for w in windows], out.scored))
        return out

    monkeypatch.setattr(lm_train, "lm_train_step", recorded)
    cfg = load_lm_config(_config(tmp_path, "bos", optimizer={"max_steps": 2, "warmup_steps": 1},
                                 run={"log_interval": 1, "validate_interval": 100, "save_interval": 100}))
    assert train_lm(cfg) == "completed"
    bos = Vocabulary(10).bos
    assert len(steps) == 2
    for step_bos, windows, scored in steps:
        assert step_bos == bos
        targets = torch.cat([w[:, 1:].reshape(-1) for w in windows])
        assert int((targets == bos).sum()) > 0  # (the windows do hold BOS targets)
        assert scored == int((targets != bos).sum())


def test_an_lm_trained_when_bos_was_a_target_is_neither_resumed_nor_reused_as_one_trained_now(tmp_path):
    """LMs trained before 2026-12-06 also scored the BOS after each EOS and record nothing of it: resuming one
    would switch its objective mid-run without a word, and lm-study would keep it beside LMs trained now."""
    from spidr.lm.study import lm_differences

    cfg = load_lm_config(_config(tmp_path, "old", optimizer={"max_steps": 2, "warmup_steps": 1},
                                 run={"save_interval": 1, "validate_interval": 100}))
    assert train_lm(cfg) == "completed"
    run_dir = cfg.run.run_dir
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert final["loss_targets"] == "units and EOS"
    assert lm_differences(final, cfg) == ([], [])
    older = {key: value for key, value in final.items() if key != "loss_targets"}
    config, _ = lm_differences(older, cfg)
    assert config == ["loss targets: 'units, EOS and the BOS after each EOS' → 'units and EOS'"]
    torch.save(older, run_dir / "final.pt")
    assert train_lm(cfg) == "completed"  # finished: nothing to resume, nothing refused
    step_1 = torch.load(run_dir / "step_1.pt", weights_only=True)
    torch.save({key: value for key, value in step_1.items() if key != "loss_targets"}, run_dir / "step_1.pt")
    (run_dir / "final.pt").unlink()
    with pytest.raises(ValueError, match=r"step_1\.pt was trained by a spidr whose LM loss also scored the BOS after "
                                         r"each EOS; resuming it would change its objective at step 1"):
        train_lm(cfg)


def test_a_run_refused_for_its_units_files_leaves_no_run_folder(tmp_path, capsys):
    """A units file that is missing, or holds a unit beyond data.num_units, was found after the run folder was made
    and locked: the refusal left runs/<name>/.lock behind."""
    config = _config(tmp_path, "bad", data={"valid": str(tmp_path / "absent.jsonl")})
    assert main(["lm-train", str(config)]) == 2
    assert "absent.jsonl does not exist" in capsys.readouterr().err
    config = _config(tmp_path, "small", data={"num_units": 5})
    assert main(["lm-train", str(config)]) == 2
    assert "num_units" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # training data shorter than one window was refused after config.json, tokens/ and step_0.pt were written
    tokens = sum(len(json.loads(line)["units"]) + 2 for line in (tmp_path / "units.jsonl").read_text().splitlines())
    config = _config(tmp_path, "short", model={"context": 100_000}, data={"val_fraction": 0.0})
    assert main(["lm-train", str(config)]) == 2
    assert (f"units.jsonl: the training data has {tokens} tokens, fewer than one window of model.context + 1 = "
            "100001") in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_lm_score_reads_items_longer_than_a_gpt_s_context_in_strided_windows(tmp_path):
    """mut score-gpt-no-context. Truth: an item of 20 units (22 tokens) is longer than the GPT's context of 8, so
    lm-score must score it in strided windows (what token_log_likelihoods(..., context=8) computes, pinned by
    test_strided_scoring_*), not refuse it nor feed the model more tokens than it has positions for; a short item's
    score is the plain forward pass, computed here."""
    from spidr.cli import main
    from spidr.lm.models import token_log_likelihoods
    from spidr.lm.score import find_unit_files, score_benchmark
    from spidr.lm.tokens import Vocabulary
    from spidr.lm.train import load_lm
    from spidr.lm.zerospeech import read_submission

    rng = np.random.default_rng(0)
    train = tmp_path / "units.jsonl"
    train.write_text("".join(json.dumps({"name": f"u{i}", "units": rng.integers(0, 10, 12).tolist()}) + "\n"
                             for i in range(30)))
    cfg = {"run": {"workdir": str(tmp_path / "runs"), "name": "gpt", "device": "cpu", "log_interval": 1,
                   "save_interval": 100, "validate_interval": 100, "keep_latest": -1},
           "data": {"train": str(train), "dedup": False, "val_fraction": 0.0},
           "model": {"arch": "gpt", "dim": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32, "context": 8,
                     "dropout": 0.0},
           "optimizer": {"lr": 1e-2, "warmup_steps": 1, "max_steps": 2, "batch_size": 4, "dtype": "float32"}}
    (tmp_path / "gpt.json").write_text(json.dumps(cfg))
    assert main(["lm-train", str(tmp_path / "gpt.json")]) == 0
    final = tmp_path / "runs" / "gpt" / "final.pt"
    items = {"long": rng.integers(0, 10, 20).tolist(), "short": [1, 2, 3]}
    (tmp_path / "items" / "lexical").mkdir(parents=True)
    (tmp_path / "items" / "lexical" / "dev.jsonl").write_text(
        "".join(json.dumps({"name": k, "units": v}) + "\n" for k, v in items.items()))
    score_benchmark(final, find_unit_files(tmp_path / "items"), tmp_path / "sub", norm="sum")
    written = read_submission(tmp_path / "sub" / "lexical" / "dev.txt")
    model, info, _ = load_lm(final)
    vocab = Vocabulary(info["num_units"])
    with torch.no_grad():
        tokens = torch.from_numpy(vocab.encode(np.array(items["long"])))[None]
        strided = float(token_log_likelihoods(model, tokens, torch.tensor([tokens.shape[1]]), context=8).sum())
        short = torch.from_numpy(vocab.encode(np.array(items["short"])))[None]
        plain = float(model(short[:, :-1]).log_softmax(-1).gather(-1, short[:, 1:, None]).sum())
    assert written["long"] == pytest.approx(strided, abs=1e-4)
    assert written["short"] == pytest.approx(plain, abs=1e-4)


def test_lm_learning_rate_warms_up_linearly_then_follows_a_cosine_from_the_end_of_warmup():
    """muts train-warmup-step0, train-cosine-progress. Truth, by hand from the docstring ("linear warm-up from 0 to 1
    over warmup_steps, then a cosine from 1 to min_lr_scale at max_steps") with the scheduler's 0-based step: with
    warmup 4, max 14, min 0.1 the steps 0..3 get 1/4..4/4 (no step at lr 0), step 4 gets 1, step 9 (half-way
    through the decay) gets (1 + 0.1) / 2, step 14 and later 0.1."""
    from spidr.lm.train import lr_scale

    scale = lambda step: lr_scale(step, warmup_steps=4, max_steps=14, min_lr_scale=0.1)  # noqa: E731
    assert [scale(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert scale(4) == pytest.approx(1.0)
    assert scale(9) == pytest.approx(0.55)
    assert scale(14) == pytest.approx(0.1)
    assert scale(20) == pytest.approx(0.1)


@pytest.mark.parametrize(("name", "stem"), [("spk/utt.v2.wav", "utt.v2"), ("/d/spk/a.b", "a.b"),
                                            ("x/y.flac", "y"), ("utt", "utt")])
def test_file_stem_strips_only_the_audio_extension(name, stem):
    """mut tokens-stem-path-stem. Truth: the docstring ("/data/spk/utt.wav" -> "utt"): only .wav / .flac go, a dot
    inside a stem stays (a gold filename 'a.b' must match the units row named 'a.b')."""
    from spidr.lm.tokens import file_stem

    assert file_stem(name) == stem


def test_lm_score_meta_records_the_norm_it_wrote(tmp_path):
    """mut score-meta-norm. Truth: meta.json is the only record of which normalisation a submission holds; with
    --norm sum it must say 'sum'. (A bigram n-gram LM fitted by lm-train keeps this fast.)"""
    from spidr.cli import main
    from spidr.lm.score import find_unit_files, score_benchmark

    train = tmp_path / "units.jsonl"
    train.write_text("".join(json.dumps({"name": f"u{i}", "units": [i % 5, (i + 1) % 5]}) + "\n" for i in range(10)))
    cfg = {"run": {"workdir": str(tmp_path / "runs"), "name": "ng", "device": "cpu"},
           "data": {"train": str(train), "dedup": False, "val_fraction": 0.0},
           "model": {"arch": "ngram", "ngram_order": 2, "context": 4}}
    (tmp_path / "ng.json").write_text(json.dumps(cfg))
    assert main(["lm-train", str(tmp_path / "ng.json")]) == 0
    (tmp_path / "items" / "lexical").mkdir(parents=True)
    (tmp_path / "items" / "lexical" / "dev.jsonl").write_text(json.dumps({"name": "a", "units": [1, 2]}) + "\n")
    score_benchmark(tmp_path / "runs" / "ng" / "final.pt", find_unit_files(tmp_path / "items"), tmp_path / "sub",
                    norm="sum")
    assert json.loads((tmp_path / "sub" / "meta.json").read_text())["norm"] == "sum"


# (tests below: behaviours that a second mutation round over spidr.lm, 55 mutants, found untested)

def _jsonl(path: Path, rows: dict[str, list], field: str = "units") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"name": name, field: values}) + "\n" for name, values in rows.items()))
    return path


def test_token_ids_are_the_units_then_bos_eos_pad():
    """mut tok-eos-pad-swap. Truth (spec spoken-lm.md §1.3, tokens.py docstring): units 0 … V − 1, then BOS = V,
    EOS = V + 1, PAD = V + 2; an utterance is BOS u … EOS."""
    vocab = Vocabulary(5)
    assert (vocab.bos, vocab.eos, vocab.pad, vocab.size) == (5, 6, 7, 8)
    assert vocab.encode(np.array([4, 0])).tolist() == [5, 4, 0, 6]


def test_a_units_file_without_utterance_is_refused_by_name(tmp_path):
    """mut tok-empty-file-ok. Truth: a units file with no row (an extraction that wrote nothing) is an error naming
    the file, not an empty set of sequences (lm-score would write an empty submission, lm-train fail later)."""
    path = tmp_path / "units.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=rf"units file {re.escape(str(path))} has no utterance"):
        read_unit_sequences(path, dedup=True)


def _stub_lm(monkeypatch, model, info):
    """lm-score's checkpoint loading replaced by ``model`` and ``info`` (a real checkpoint needs lm-train)."""
    from spidr.lm import score

    model.eval()
    monkeypatch.setattr(score, "load_lm", lambda checkpoint, device="cpu": (model, info, None))


def _gpt_and_info():
    torch.manual_seed(0)
    vocab = Vocabulary(20)
    model = GptLM(vocab.size, dim=32, num_layers=2, num_heads=2, ffn_dim=64, context=64, dropout=0.0,
                  activation="gelu", tie_embeddings=True)
    info = {"num_units": 20, "arch": "gpt", "context": 64, "dedup": False, "kind": "units"}
    return model, info, vocab


def test_lm_score_in_bfloat16_scores_in_bfloat16(tmp_path, monkeypatch):
    """muts sc-autocast-off, sc-bench-dtype-dropped. Truth: --dtype bfloat16 (lm-score --help: autocast) runs the
    LM in bfloat16: its scores are those of score_sequences(dtype='bfloat16'), close to float32's but not equal
    (bfloat16 keeps 8 bits of mantissa), where both mutants wrote the float32 scores."""
    model, info, vocab = _gpt_and_info()
    rng = np.random.default_rng(0)
    items = {f"i{k}": rng.integers(0, 20, size=rng.integers(5, 30)).tolist() for k in range(6)}
    _jsonl(tmp_path / "units" / "lexical" / "dev.jsonl", items)
    _stub_lm(monkeypatch, model, info)
    arrays = {k: np.asarray(v) for k, v in items.items()}
    f32 = {k: s.logprob for k, s in score_sequences(model, vocab, arrays, context=64).items()}
    b16 = {k: s.logprob for k, s in score_sequences(model, vocab, arrays, context=64, dtype="bfloat16").items()}
    assert f32 != b16
    assert all(abs(f32[k] - b16[k]) < 0.05 * len(items[k]) for k in items)
    score_benchmark("lm.pt", find_unit_files(tmp_path / "units"), tmp_path / "sub", norm="sum", dtype="bfloat16")
    assert read_submission(tmp_path / "sub" / "lexical" / "dev.txt") == pytest.approx(b16, abs=1e-6)


def test_scores_jsonl_holds_the_sum_and_the_mean_of_each_item(tmp_path, monkeypatch):
    """mut sc-jsonl-sum-mean-swap. Truth (score.py docstring, spec §1.4): scores.jsonl gives both normalisations:
    'sum' is what --norm sum writes, 'mean' what --norm mean writes, and sum = mean × num_tokens."""
    model, info, _ = _gpt_and_info()
    _jsonl(tmp_path / "units" / "lexical" / "dev.jsonl", {"a": [1, 2, 3, 4, 5, 6], "b": [7], "c": [3, 9, 9, 2]})
    _stub_lm(monkeypatch, model, info)
    written = {}
    for norm in ("sum", "mean"):
        score_benchmark("lm.pt", find_unit_files(tmp_path / "units"), tmp_path / norm, norm=norm)
        written[norm] = read_submission(tmp_path / norm / "lexical" / "dev.txt")
    rows = [json.loads(line) for line in (tmp_path / "sum" / "scores.jsonl").read_text().splitlines()]
    assert {row["name"] for row in rows} == {"a", "b", "c"}
    for row in rows:
        assert row["sum"] == written["sum"][row["name"]]
        assert row["mean"] == written["mean"][row["name"]]
        assert row["sum"] == pytest.approx(row["mean"] * row["num_tokens"])
        assert row["sum"] < row["mean"] < 0  # (more than one token: the sum is the more negative)


def test_a_failed_lm_score_leaves_no_meta_json_of_the_earlier_checkpoint(tmp_path, monkeypatch):
    """mut sc-meta-not-removed-first. Truth (score_benchmark's comment): an earlier submission's meta.json goes
    before the first file is written, so that a folder stopped in between names no checkpoint (its files are no
    longer that checkpoint's)."""
    from spidr.lm import score

    model, info, _ = _gpt_and_info()
    _jsonl(tmp_path / "units" / "lexical" / "dev.jsonl", {"a": [1, 2], "b": [3]})
    _jsonl(tmp_path / "units" / "syntactic" / "dev.jsonl", {"c": [1, 2], "d": [3]})
    _stub_lm(monkeypatch, model, info)
    out = tmp_path / "sub"
    score_benchmark("old.pt", find_unit_files(tmp_path / "units"), out)
    assert json.loads((out / "meta.json").read_text())["checkpoint"] == "old.pt"
    real = score.write_atomically

    def failing(path, text):
        if Path(path).name == "dev.txt" and Path(path).parent.name == "syntactic":
            raise OSError("disk full")
        return real(path, text)

    monkeypatch.setattr(score, "write_atomically", failing)
    with pytest.raises(OSError, match="disk full"):
        score_benchmark("new.pt", find_unit_files(tmp_path / "units"), out)
    assert not (out / "meta.json").exists()


def test_lm_score_batches_stay_within_batch_tokens_and_score_as_one_by_one():
    """mut sc-batch-by-name. Truth: --batch-tokens bounds a forward's padded size (rows × width) unless one item
    alone is wider; items are batched by length for that. And a padded batch scores each item as alone."""
    torch.manual_seed(0)
    vocab = Vocabulary(10)
    lstm = LstmLM(vocab.size, dim=16, num_layers=1, dropout=0.0, tie_embeddings=True).eval()
    shapes = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm

        def forward(self, tokens):
            shapes.append(tuple(tokens.shape))
            return self.lstm(tokens)

    rng = np.random.default_rng(0)
    # names in the opposite order of lengths: a00 is the longest
    sequences = {f"a{k:02d}": rng.integers(0, 10, size=30 - 2 * k) for k in range(15)}
    batched = score_sequences(Recording(), vocab, sequences, batch_tokens=64)
    assert all(rows * (width + 1) <= 64 for rows, width in shapes if rows > 1)  # inputs are tokens[:, :-1]
    for stem, values in sequences.items():
        (alone,) = score_sequences(lstm, vocab, {stem: values}).values()
        assert batched[stem].logprob == pytest.approx(alone.logprob, abs=1e-4)
        assert batched[stem].num_tokens == len(values) + 1


def test_runs_of_other_seeds_draw_other_windows_at_every_step():
    """mut da-seed-additive. Truth: the windows of step s are drawn from a generator seeded with (seed, s): run
    seed 1 must not replay run seed 0's data one step later (seed + step did: seed 1 step s = seed 0 step s + 1)."""
    from spidr.lm.data import WindowSampler

    stream = torch.from_numpy(np.random.default_rng(0).integers(0, 50, size=2000))
    zero, one = WindowSampler(stream, 8, 4, seed=0), WindowSampler(stream, 8, 4, seed=1)
    for step in range(3):
        assert not torch.equal(one.windows(step), zero.windows(step + 1))
        assert not torch.equal(one.windows(step), zero.windows(step))


def test_ranks_and_micro_batches_share_out_the_global_batch():
    """mut da-rank-micro-first. Truth (data.py docstring): rank r of W takes rows r·B/W … (r+1)·B/W − 1 of the
    global batch, and micro-batch m of M the m-th slice of those: the (rank, micro) slices in order make up the
    global batch, with 2 ranks × 2 micro-batches as with 1 × 1."""
    from spidr.lm.data import WindowSampler

    stream = torch.from_numpy(np.random.default_rng(0).integers(0, 50, size=2000))
    sampler = WindowSampler(stream, 8, 8, seed=3)
    whole = sampler.windows(5)
    parts = [sampler.windows(5, rank=r, world_size=2, micro=m, num_micro=2) for r in range(2) for m in range(2)]
    assert all(part.shape == (2, 9) for part in parts)
    assert torch.equal(torch.cat(parts), whole)


def _cfg(tmp_path: Path, train: Path, **data):
    from spidr.lm.config import load_lm_config

    config = {"run": {"workdir": str(tmp_path / "runs"), "name": "p", "device": "cpu", "seed": 0},
              "data": {"train": str(train), "dedup": False, "val_fraction": 0.0, **data},
              "model": {"arch": "lstm", "dim": 8, "num_layers": 1, "context": 4}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(config))
    return load_lm_config(path)


def test_num_units_equal_to_the_largest_unit_is_refused(tmp_path):
    """mut pd-maxunit-gt. Truth: with data.num_units = V the units are 0 … V − 1 and V is BOS: a training file
    holding unit V must be refused, not encoded as BOS."""
    from spidr.lm.prepared_data import prepare_data

    train = _jsonl(tmp_path / "train.jsonl", {"a": [1, 2, 10], "b": [3]})
    with pytest.raises(ValueError, match=r"data.num_units = 10 but .*train\.jsonl holds unit 10"):
        prepare_data(_cfg(tmp_path, train, num_units=10))
    assert prepare_data(_cfg(tmp_path, train, num_units=11)).vocab.bos == 11


def test_a_validation_file_is_read_with_the_training_file_s_inventory_and_dedup(tmp_path):
    """muts pd-valid-no-numunits, pd-valid-dedup-true. Truth: data.valid is read as the training data: a unit
    past the LM's inventory (here 1 + the training file's largest, 6) is refused naming it (it would be BOS/EOS/PAD
    or past the embedding), and with data.dedup = false its repeats are kept, as the training file's are."""
    from spidr.lm.prepared_data import prepare_data

    train = _jsonl(tmp_path / "train.jsonl", {"a": [1, 1, 5], "b": [3, 4]})
    valid = _jsonl(tmp_path / "valid.jsonl", {"v": [2, 2, 2, 3]})
    data = prepare_data(_cfg(tmp_path, train, valid=str(valid)))
    assert data.train.tolist() == [6, 1, 1, 5, 7, 6, 3, 4, 7]
    assert data.valid.tolist() == [6, 2, 2, 2, 3, 7]
    _jsonl(valid, {"v": [2, 6]})
    with pytest.raises(ValueError, match=r"valid\.jsonl: line 1: unit 6 of 'v' is out of range: the LM has 6 units"):
        prepare_data(_cfg(tmp_path, train, valid=str(valid)))


def test_validation_labels_are_numbered_by_the_training_label_set(tmp_path):
    """mut pd-valid-own-labels. Truth: frame labels become ids through the LabelVocabulary of the training file
    (stored with the LM): a validation utterance equal to a training one encodes to the same tokens, even when the
    training file holds a label ('+noise+', which sorts first) that the validation file lacks; and a validation
    label the LM does not know is refused."""
    from spidr.lm.prepared_data import prepare_data

    train = _jsonl(tmp_path / "train.jsonl", {"a": ["+noise+", "K"], "b": ["K", "AE", "T"]}, field="phones")
    valid = _jsonl(tmp_path / "valid.jsonl", {"b": ["K", "AE", "T"]}, field="phones")
    data = prepare_data(_cfg(tmp_path, train, valid=str(valid)))
    assert data.valid.tolist() == data.train[-5:].tolist()
    _jsonl(valid, {"b": ["K", "xyz"]}, field="phones")
    with pytest.raises(ValueError, match="label 'xyz' is not in the LM's label set"):
        prepare_data(_cfg(tmp_path, train, valid=str(valid)))


def test_the_train_fingerprint_covers_the_training_utterances_only(tmp_path):
    """mut pd-fp-all-units. Truth: info['train_fingerprint'] identifies what the LM was trained on (checked on
    resume and reuse): the utterances left after holding out val_fraction, not the whole file."""
    from spidr.lm.data import is_held_out
    from spidr.lm.prepared_data import prepare_data
    from spidr.lm.tokens import fingerprint

    rows = {f"u{i:02d}": [i % 7, (i + 3) % 7] for i in range(30)}
    train = _jsonl(tmp_path / "train.jsonl", rows)
    data = prepare_data(_cfg(tmp_path, train, val_fraction=0.3))
    kept = {k: np.asarray(v) for k, v in rows.items() if not is_held_out(k, 0.3, 0)}
    assert 0 < len(kept) < len(rows)
    assert data.info["train_fingerprint"] == fingerprint(kept)
    assert data.info["valid_fingerprint"] == fingerprint({k: np.asarray(v) for k, v in rows.items()
                                                          if k not in kept})


@pytest.mark.parametrize("change", [{"run": {"seed": 1}}, {"data": {"dedup": True}}, {"data": {"num_units": 12}}])
def test_kept_token_streams_are_not_reused_under_other_data_settings(tmp_path, change):
    """muts pd-key-no-seed, pd-key-no-dedup, pd-key-no-numunits. Truth (prepared_data docstring): the kept streams
    are keyed by the settings that shape them; another run.seed (which utterances are held out), data.dedup or
    data.num_units must give the streams prepare_data gives for the new settings, not the kept ones."""
    from spidr.lm.prepared_data import prepare_data, update_cache

    rng = np.random.default_rng(0)
    rows = {f"u{i:02d}": np.repeat(rng.integers(0, 8, 4), 2).tolist() for i in range(40)}
    cfg = _cfg(tmp_path, _jsonl(tmp_path / "train.jsonl", rows), val_fraction=0.3)
    update_cache(cfg)
    other = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)
                                        for section, values in change.items()})
    fresh, kept = prepare_data(other), update_cache(other)
    assert kept.vocab == fresh.vocab
    assert torch.equal(kept.train, fresh.train)
    assert torch.equal(kept.valid, fresh.valid)
    assert kept.info == fresh.info


def test_the_ends_digest_covers_the_last_mebibyte(tmp_path):
    """mut pd-ends-first-only. Truth (_ends_digest docstring): the digest covers the first and the last MiB of a
    units file: two files of 3 MiB that differ only in their last byte differ there."""
    from spidr.lm.prepared_data import _ends_digest

    body = b"x" * (3 << 20)
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(body + b"1")
    second.write_bytes(body + b"2")
    size = first.stat().st_size
    assert _ends_digest(str(first), size) != _ends_digest(str(second), size)


def _sgd(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)


# --- tr-nonfinite-loss-only ----------------------------------------------------------------------------------------
class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _FiniteLossInfiniteGradient(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = LstmLM(13, dim=8, num_layers=1, dropout=0.0, tie_embeddings=True)

    def forward(self, tokens):
        return _InfiniteGradient.apply(self.inner(tokens))


def test_a_step_whose_loss_is_finite_but_gradient_is_not_is_skipped():
    """mut tr-nonfinite-loss-only. Truth (train.py docstring: "NaN/Inf guard" on the loss *or* the gradient norm, the
    warning names both): a bf16 overflow in the backward gives an infinite gradient under a finite loss; the step
    must be skipped (weights and schedule untouched), not applied as NaN weights."""
    torch.manual_seed(0)
    model = _FiniteLossInfiniteGradient()
    optimizer, scheduler = _sgd(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = lm_train_step(model, [torch.randint(0, 13, (4, 9))], optimizer, scheduler, precision=FP32, max_norm=1.0)
    assert math.isfinite(out.loss)
    assert not math.isfinite(out.grad_norm)
    assert out.skipped
    assert scheduler.last_epoch == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- tr-tokens-no-world (and the per-rank scale) ------------------------------------------------------------------
def test_two_identical_ranks_count_both_ranks_targets_and_take_the_one_process_step(monkeypatch):
    """mut tr-tokens-no-world. Truth (LmStepOutput: tokens and scored are the *global* batch's; the loss is the global
    mean): two ranks holding the same windows (the all-reduce doubles every sum) count twice the targets of one,
    report the same mean loss, and each rank's update (DDP averages equal gradients) is the one-process step."""
    from spidr.lm import train as lm_train

    bos = 13
    windows = torch.randint(0, 13, (4, 9), generator=torch.Generator().manual_seed(2))
    windows[0, 3] = windows[2, 6] = bos

    def run():
        torch.manual_seed(0)
        model = LstmLM(16, dim=8, num_layers=1, dropout=0.0, tie_embeddings=True)
        optimizer, scheduler = _sgd(model)
        out = lm_train_step(model, [windows], optimizer, scheduler, precision=FP32, max_norm=1e6, bos=bos)
        return out, [p.detach().clone() for p in model.parameters()]

    alone, alone_weights = run()
    monkeypatch.setattr(lm_train, "world_size", lambda: 2)
    monkeypatch.setattr(lm_train, "all_reduce_sum", lambda tensor: tensor * 2)
    two, two_weights = run()
    assert alone.tokens == 4 * 8
    assert alone.scored == 4 * 8 - 2
    assert (two.tokens, two.scored) == (2 * alone.tokens, 2 * alone.scored)
    assert two.loss == pytest.approx(alone.loss, rel=1e-6)
    for got, expected in zip(two_weights, alone_weights, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --- tr-val-no-eval, mo-lstm-dropout-at-eval, mo-gpt-dropout-at-eval, tr-load-no-eval ----------------------------
def _dropout_models():
    torch.manual_seed(0)
    return [LstmLM(12, dim=16, num_layers=2, dropout=0.5, tie_embeddings=True),
            GptLM(12, dim=16, num_layers=2, num_heads=2, ffn_dim=32, context=16, dropout=0.5, activation="gelu",
                  tie_embeddings=True)]


@pytest.mark.parametrize("model", _dropout_models(), ids=["lstm", "gpt"])
def test_an_lm_in_eval_mode_applies_no_dropout(model):
    """muts mo-lstm-dropout-at-eval, mo-gpt-dropout-at-eval. Truth: scores and validation are computed in eval mode,
    where dropout is off: the same tokens give the same logits, call after call (train mode: they differ)."""
    tokens = torch.randint(0, 12, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens), rtol=0, atol=0)


def test_validation_is_computed_without_dropout_and_leaves_the_model_training():
    """mut tr-val-no-eval. Truth (validate_lm: a perplexity, the number a run reports): the held-out loss of a model
    with dropout 0.5 is that of the model in eval mode, the same on every call; the model goes back to training."""
    vocab = Vocabulary(9)
    rng = np.random.default_rng(0)
    stream = token_stream({f"u{i}": rng.integers(0, 9, 12) for i in range(6)}, vocab)
    torch.manual_seed(0)
    model = LstmLM(vocab.size, dim=16, num_layers=2, dropout=0.5, tie_embeddings=True)
    kwargs = {"context": 8, "precision": FP32, "batch_size": 3, "device": torch.device("cpu"), "bos": vocab.bos}
    model.eval()
    expected = validate_lm(model, stream, **kwargs)
    model.train()
    for _ in range(2):
        assert validate_lm(model, stream, **kwargs)["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert model.training


def test_a_loaded_lm_scores_in_eval_mode(tmp_path):
    """mut tr-load-no-eval. Truth (load_lm docstring: "The trained LM (eval mode)"): an LM trained with dropout 0.1
    (the default) is loaded with dropout off, so lm-score writes the same scores on every run."""
    from spidr.lm.score import score_sequences

    cfg = load_lm_config(_config(tmp_path, "drop", model={"dropout": 0.5},
                                 optimizer={"max_steps": 2, "warmup_steps": 1}))
    assert train_lm(cfg) == "completed"
    model, info, _ = load_lm(cfg.run.run_dir / "final.pt")
    assert not model.training
    items = {"a": np.arange(8) % 10, "b": np.array([3, 1, 4, 1, 5, 9, 2, 6])}
    first = score_sequences(model, Vocabulary(info["num_units"]), items)
    second = score_sequences(model, Vocabulary(info["num_units"]), items)
    assert first == second


# --- tr-val-maxtokens-0, tr-train-ppl-base2 -----------------------------------------------------------------------
def test_lm_train_validates_at_most_data_max_valid_tokens_and_logs_perplexity_in_nats(tmp_path, caplog):
    """muts tr-val-maxtokens-0, tr-train-ppl-base2. Truth (config: data.max_valid_tokens caps what a validation
    scores, spread over the held-out stream; the losses are natural-log cross-entropies): a run with
    max_valid_tokens = 48 logs, and announces, the count scored_targets gives for that cap (fewer than the whole
    held-out stream's), and its train perplexity is exp(loss)."""
    from spidr.lm.prepared_data import prepare_data

    cfg = load_lm_config(_config(tmp_path, "capped", data={"val_fraction": 0.3, "max_valid_tokens": 48},
                                 optimizer={"max_steps": 10}))
    with caplog.at_level("INFO", logger="spidr"):
        assert train_lm(cfg) == "completed"
    data = prepare_data(cfg)
    capped = scored_targets(data.valid, 16, bos=data.vocab.bos, max_tokens=48)
    assert capped < scored_targets(data.valid, 16, bos=data.vocab.bos)
    records = _metrics(cfg.run.run_dir)
    assert [r["tokens"] for r in records if r["group"] == "valid"] == [capped]
    assert f"({capped} scored)" in caplog.text
    train = [r for r in records if r["group"] == "train"]
    assert train
    for record in train:
        assert record["ppl"] == pytest.approx(math.exp(record["loss"]))


# --- tr-clip-fixed, tr-betas-dropped, tr-wd-none, tr-sched-decay-steps ---------------------------------------------
def test_lm_train_builds_its_optimizer_clip_and_schedule_from_the_config(tmp_path, monkeypatch):
    """Truth (config.py fields; build_optimizer's docstring: no weight decay on 1-D tensors; lr_scale's schedule over
    optimizer.warmup_steps / max_steps): the step lm-train takes gets optimizer.max_norm, AdamW gets the betas, eps
    and weight decay of the config (decay on every matrix, none on biases), the schedule is lr_scale of the config's
    steps."""
    from spidr.lm import train as lm_train

    seen = {}
    real_step = lm_train.lm_train_step

    def recorded(model, windows, optimizer, scheduler, **kwargs):
        seen.setdefault("call", (model, optimizer, scheduler, kwargs))
        return real_step(model, windows, optimizer, scheduler, **kwargs)

    monkeypatch.setattr(lm_train, "lm_train_step", recorded)
    optimizer_cfg = {"betas": [0.8, 0.95], "eps": 1e-7, "weight_decay": 0.05, "max_norm": 0.25, "warmup_steps": 2,
                     "max_steps": 6, "min_lr_scale": 0.2}
    cfg = load_lm_config(_config(tmp_path, "opt", optimizer=optimizer_cfg))
    assert train_lm(cfg) == "completed"
    model, optimizer, scheduler, kwargs = seen["call"]
    assert kwargs["max_norm"] == 0.25
    decay, no_decay = optimizer.param_groups
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters() if p.dim() < 2}
    assert len(decay["params"]) >= 3  # the embedding (tied head) and the LSTM's two matrices
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    for group in (decay, no_decay):
        assert tuple(group["betas"]) == (0.8, 0.95)
        assert group["eps"] == 1e-7
    expected = [lm_train.lr_scale(s, warmup_steps=2, max_steps=6, min_lr_scale=0.2) for s in range(8)]
    assert [scheduler.lr_lambdas[0](s) for s in range(8)] == pytest.approx(expected)
    assert [expected[s] for s in (0, 1, 2, 4, 6, 7)] == pytest.approx([0.5, 1.0, 1.0, 0.6, 0.2, 0.2])  # half-way: 0.6


# --- cf-dedup-default-false, cf-betas-default, cf-maxnorm-default -------------------------------------------------
def test_lm_defaults_are_the_spec_s_and_those_configs_lm_lstm_toml_spells_out():
    """Truth: spoken-lm spec §1.3 (dedup by default; AdamW (0.9, 0.98), weight decay 0.01, grad-clip 1.0) and
    load_lm_config's docstring ("None: the defaults, which configs/lm-lstm.toml spells out")."""
    import spidr

    cfg = load_lm_config(None, ['data.train="units.jsonl"'])
    assert cfg.data.dedup is True
    assert cfg.optimizer.betas == (0.9, 0.98)
    assert cfg.optimizer.weight_decay == 0.01
    assert cfg.optimizer.max_norm == 1.0
    shipped = tomllib.loads((Path(spidr.__file__).parents[2] / "configs" / "lm-lstm.toml").read_text())
    defaults = cfg.to_dict()
    for section, values in shipped.items():
        for key, value in values.items():
            if (section, key) not in {("run", "name"), ("data", "train")}:
                assert defaults[section][key] == value, f"{section}.{key}"


# --- tr-micro-zero ------------------------------------------------------------------------------------------------
def test_grad_accum_steps_trains_the_model_one_batch_trains(tmp_path):
    """mut tr-micro-zero. Truth (data.py docstring: micro-batch m takes the m-th slice of a rank's rows; the step's
    gradient is the whole batch's): without dropout, 2 micro-batches of 4 windows train the weights 1 batch of 8
    trains, step for step."""
    runs = {}
    for accum in (1, 2):
        cfg = load_lm_config(_config(tmp_path, f"accum{accum}", model={"dropout": 0.0},
                                     optimizer={"max_steps": 3, "warmup_steps": 1, "grad_accum_steps": accum},
                                     run={"log_interval": 1}))
        assert train_lm(cfg) == "completed"
        runs[accum] = (torch.load(cfg.run.run_dir / "final.pt", weights_only=True)["model"],
                       [r["loss"] for r in _metrics(cfg.run.run_dir) if r["group"] == "train"])
    assert runs[2][1] == pytest.approx(runs[1][1], rel=1e-5)
    for key, value in runs[1][0].items():
        torch.testing.assert_close(runs[2][0][key], value, rtol=1e-4, atol=1e-5, msg=key)


# --- tr-sampler-seed0 ---------------------------------------------------------------------------------------------
def test_the_run_seed_chooses_the_training_windows(tmp_path, monkeypatch):
    """mut tr-sampler-seed0. Truth (data.py docstring: the windows of step s are drawn from (seed, s)): lm-train's
    first step trains on WindowSampler(train stream, context, batch, run.seed).windows(0); seeds 0 and 1 differ."""
    from spidr.lm import train as lm_train
    from spidr.lm.prepared_data import prepare_data

    first = {}
    real_step = lm_train.lm_train_step

    def recorded(model, windows, optimizer, scheduler, **kwargs):
        first.setdefault(seed, windows[0].clone())
        return real_step(model, windows, optimizer, scheduler, **kwargs)

    monkeypatch.setattr(lm_train, "lm_train_step", recorded)
    for seed in (0, 1):
        cfg = load_lm_config(_config(tmp_path, f"seed{seed}", run={"seed": seed},
                                     optimizer={"max_steps": 1, "warmup_steps": 1}))
        assert train_lm(cfg) == "completed"
        expected = WindowSampler(prepare_data(cfg).train, 16, 8, seed).windows(0)
        assert torch.equal(first[seed], expected)
    assert not torch.equal(first[0], first[1])


# --- pd-heldout-seed0 ---------------------------------------------------------------------------------------------
def test_the_held_out_utterances_of_a_run_are_chosen_by_its_seed(tmp_path):
    """mut pd-heldout-seed0. Truth (configs/lm-lstm.toml: "held-out utterances, chosen by a hash of their name and
    run.seed"): prepare_data with run.seed = 1 holds out exactly the stems is_held_out(stem, fraction, 1) picks."""
    from spidr.lm.data import is_held_out
    from spidr.lm.prepared_data import prepare_data

    cfg, units = _split_config(tmp_path, seed=1)
    rows = {r["name"]: np.asarray(r["units"]) for r in map(json.loads, units.read_text().splitlines())}
    held = {stem: values for stem, values in rows.items() if is_held_out(stem, 0.3, 1)}
    assert held != {stem: values for stem, values in rows.items() if is_held_out(stem, 0.3, 0)}
    assert prepare_data(cfg).info["valid_fingerprint"] == fingerprint(held)


# --- tr-batch-check-no-world --------------------------------------------------------------------------------------
def test_a_batch_that_the_ranks_cannot_share_equally_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    """mut tr-batch-check-no-world. Truth (the message, data.py: rank r takes B/W rows): with 3 ranks a global batch
    of 8 cannot be split; it was silently cut to 3 × 2 = 6 windows per step."""
    from spidr.lm import train as lm_train
    from spidr.train.environment import DistributedEnvironment

    monkeypatch.setattr(lm_train, "detect_environment",
                        lambda: DistributedEnvironment(rank=0, world_size=3, launcher="torchrun"))
    monkeypatch.setattr(lm_train, "init_distributed", lambda denv, device: None)
    cfg = load_lm_config(_config(tmp_path, "three", optimizer={"max_steps": 2}))
    with pytest.raises(ValueError, match=r"optimizer\.batch_size = 8 must be a multiple of ranks × grad_accum_steps "
                                         r"= 3 × 1"):
        train_lm(cfg)
    assert not cfg.run.run_dir.exists()


# --- tr-streak-not-reset ------------------------------------------------------------------------------------------
def test_isolated_non_finite_steps_do_not_add_up_to_a_divergence(tmp_path, monkeypatch):
    """mut tr-streak-not-reset. Truth (run.max_consecutive_nonfinite counts steps *in a row*; a retry draws other
    windows, a step's first try its own): with a limit of 2, two non-finite steps apart (steps 2 and 4, each
    retried successfully) complete the run, and the step after them trains on its first-try windows."""
    from spidr.lm import train as lm_train
    from spidr.lm.prepared_data import prepare_data

    cfg = load_lm_config(_config(tmp_path, "isolated", run={"max_consecutive_nonfinite": 2},
                                 optimizer={"max_steps": 6}))
    real_step, seen = lm_train.lm_train_step, []

    def poisoned_once(model, windows, optimizer, scheduler, **kwargs):
        step = scheduler.last_epoch
        seen.append((step, windows[0].clone()))
        if step in (1, 3) and [s for s, _ in seen].count(step) == 1:
            return lm_train.LmStepOutput(True, False, float("nan"), float("nan"), 0, 0)
        return real_step(model, windows, optimizer, scheduler, **kwargs)

    monkeypatch.setattr(lm_train, "lm_train_step", poisoned_once)
    assert train_lm(cfg) == "completed"
    assert [s for s, _ in seen] == [0, 1, 1, 2, 3, 3, 4, 5]
    sampler = WindowSampler(prepare_data(cfg).train, 16, 8, cfg.run.seed)
    assert torch.equal(seen[6][1], sampler.windows(4))


# --- tr-stop-ignored ----------------------------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_and_stops_before_the_last_step(tmp_path, monkeypatch):
    """mut tr-stop-ignored. Truth (StopFlag: SIGTERM saves a checkpoint and returns at the next step boundary; a
    cluster's preemption signal): a SIGTERM during step 3 of 30 stops the run with a step_N.pt (N < 30) and no
    final.pt; the rerun resumes it to the end."""
    from spidr.lm import train as lm_train

    cfg = load_lm_config(_config(tmp_path, "term", optimizer={"max_steps": 30}, run={"save_interval": 100}))
    real_step = lm_train.lm_train_step

    def signalled(model, windows, optimizer, scheduler, **kwargs):
        if scheduler.last_epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(model, windows, optimizer, scheduler, **kwargs)

    monkeypatch.setattr(lm_train, "lm_train_step", signalled)
    assert train_lm(cfg) == "interrupted"
    saved = sorted(int(p.stem.removeprefix("step_")) for p in cfg.run.run_dir.glob("step_*.pt"))
    assert not (cfg.run.run_dir / "final.pt").exists()
    assert 0 < saved[-1] < 30
    monkeypatch.setattr(lm_train, "lm_train_step", real_step)
    assert train_lm(cfg) == "completed"
    assert (cfg.run.run_dir / "final.pt").is_file()


# --- tr-ngram-addk-unchecked, tr-ngram-maxvalid-unchecked ---------------------------------------------------------
def test_an_ngram_rerun_with_other_smoothing_or_validation_cap_is_refused(tmp_path):
    """muts tr-ngram-addk-unchecked, tr-ngram-maxvalid-unchecked. Truth (_NGRAM_SETTINGS: what an n-gram's counts and
    validation depend on): add-k is no weight of the checkpoint but its config, which lm-score rebuilds the model
    from; a rerun with another add-k (or validation cap) said "nothing to do" and kept the old LM and its loss."""
    path = _config(tmp_path, "bigram", model={"arch": "ngram", "ngram_order": 2})
    assert train_lm(load_lm_config(path)) == "completed"
    with pytest.raises(ValueError, match=r"model\.ngram_add_k \(0\.1 → 0\.5\)"):
        train_lm(load_lm_config(path, ["model.ngram_add_k=0.5"]))
    with pytest.raises(ValueError, match=r"data\.max_valid_tokens \(2000000 → 100\)"):
        train_lm(load_lm_config(path, ["data.max_valid_tokens=100"]))


# --- tr-untrained-seed-or -----------------------------------------------------------------------------------------
def test_an_untrained_copy_of_seed_0_is_seed_0_s_initialisation(tmp_path):
    """mut tr-untrained-seed-or. Truth (write_untrained: "or those another seed draws"; lm-study draws seeds 0 … 4):
    seed 0 of a run of seed 3 is torch.manual_seed(0)'s model, not the run's own (which seed 3 gives)."""
    from spidr.lm.train import build_model_for, write_untrained

    cfg = load_lm_config(_config(tmp_path, "s3", run={"seed": 3}, optimizer={"max_steps": 2, "warmup_steps": 1}))
    assert train_lm(cfg) == "completed"
    final = cfg.run.run_dir / "final.pt"
    copies = {seed: torch.load(write_untrained(final, tmp_path / f"u{seed}.pt", seed=seed), weights_only=True)["model"]
              for seed in (0, 3)}
    torch.manual_seed(0)
    expected = build_model_for(cfg.model, Vocabulary(10).size).state_dict()
    for key, value in expected.items():
        assert torch.equal(copies[0][key], value), key
    assert not torch.equal(copies[0]["embedding.weight"], copies[3]["embedding.weight"])


# --- tr-score-own-labels ------------------------------------------------------------------------------------------
def test_test_items_of_a_frame_label_lm_are_numbered_by_its_training_labels(tmp_path):
    """mut tr-score-own-labels. Truth (read_lm_units: "read the way the LM was trained (same labels)"): an LM whose
    training labels hold '+noise+' (sorting first) numbers a test item without it by those labels, not by the test
    file's own label set (every id one lower)."""
    from spidr.corpus.phones import phone_inventory
    from spidr.lm.train import read_lm_units

    labels = LabelVocabulary(tuple(sorted({"+noise+", *phone_inventory()})))
    info = {"dedup": True, "num_units": len(labels.labels), "kind": "labels"}
    items = _jsonl(tmp_path / "dev.jsonl", {"x": ["K", "K", "AE", "T"]}, field="phones")
    read = read_lm_units(items, info, labels)
    assert read.sequences["x"].tolist() == labels.ids(["K", "AE", "T"], "here").tolist()


# --- mo-gpt-ffn-attention-norm, mo-gpt-no-final-norm, mo-gpt-gelu-always, mo-gpt-untied ----------------------------
def test_the_gpt_forward_is_the_pre_ln_transformer_its_docstring_describes():
    """Truth (models.py docstring): embedding + learned positions, pre-LN blocks (LayerNorm → causal self-attention
    → residual; LayerNorm → FFN → residual), a final LayerNorm, output tied to the input embedding; activation
    'relu' is ReLU (OPT's). Computed here from the module's parameters with plain tensor operations."""
    torch.manual_seed(0)
    dim, heads, vocab, T = 8, 2, 11, 6
    model = GptLM(vocab, dim=dim, num_layers=2, num_heads=heads, ffn_dim=16, context=8, dropout=0.0,
                  activation="relu", tie_embeddings=True).eval()
    with torch.no_grad():  # LayerNorms away from their identity init, so that a wrong one shows
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    tokens = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(1))

    def norm(x, ln):
        return F.layer_norm(x, (dim,), ln.weight, ln.bias, ln.eps)

    x = model.embedding.weight[tokens[0]] + model.positions.weight[:T]
    causal = torch.ones(T, T).tril().bool()
    for block in model.blocks:
        q, k, v = (norm(x, block.attention_norm) @ block.qkv.weight.T + block.qkv.bias).view(T, 3, heads, -1).unbind(1)
        attended = []
        for h in range(heads):
            weights = (q[:, h] @ k[:, h].T / math.sqrt(dim // heads)).masked_fill(~causal, float("-inf"))
            attended.append(weights.softmax(-1) @ v[:, h])
        x = x + torch.cat(attended, -1) @ block.out.weight.T + block.out.bias
        hidden = torch.relu(norm(x, block.ffn_norm) @ block.ffn_in.weight.T + block.ffn_in.bias)
        x = x + hidden @ block.ffn_out.weight.T + block.ffn_out.bias
    expected = norm(x, model.norm) @ model.embedding.weight.T
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], expected.detach(), rtol=1e-4, atol=1e-5)
    assert model.head.weight is model.embedding.weight


# --- pd-key-not-unlinked-first ------------------------------------------------------------------------------------
def test_token_streams_left_half_rewritten_are_not_taken_for_the_old_ones(tmp_path, monkeypatch):
    """mut pd-key-not-unlinked-first. Truth (_updated_cache: key.json goes first, "stale from here until the
    streams are all written"): a rewrite for seed 1 that fails after train.npy leaves no key naming seed 0's
    settings, so seed 0's next run reads its own streams, not seed 1's train stream under seed 0's key."""
    from spidr.lm.prepared_data import prepare_data, update_cache

    rows = {f"u{i:02d}": [i % 7, (i + 3) % 7] for i in range(40)}
    cfg = _cfg(tmp_path, _jsonl(tmp_path / "train.jsonl", rows), val_fraction=0.3)
    update_cache(cfg)
    seed_1 = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=1))
    real_save, calls = np.save, []

    def failing_second(handle, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(handle, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing_second)
    update_cache(seed_1)  # kept in memory, with a warning
    monkeypatch.setattr(np, "save", real_save)
    again, fresh = update_cache(cfg), prepare_data(cfg)
    assert torch.equal(again.train, fresh.train)
    assert torch.equal(again.valid, fresh.valid)


# --- pd-numunits-labels-max ---------------------------------------------------------------------------------------
def test_a_frame_label_lm_knows_every_label_of_its_inventory(tmp_path):
    """mut pd-numunits-labels-max. Truth (tokens.py: the label vocabulary is the file's labels and the phone
    inventory, "so that a test item may hold a phone the training file lacks"): the LM's units are all of them, not
    1 + the largest id the training file happens to use."""
    from spidr.lm.prepared_data import prepare_data

    train = _jsonl(tmp_path / "train.jsonl", {"a": ["K", "AE"], "b": ["AE", "K", "AE"]}, field="phones")
    data = prepare_data(_cfg(tmp_path, train))
    assert len(data.info["labels"]) >= 40
    assert data.vocab.num_units == data.info["num_units"] == len(data.info["labels"])


# --- cf-unknown-section-ignored, cf-valfrac-half-ok ---------------------------------------------------------------
def test_a_misspelt_section_of_an_lm_config_is_refused_by_name(tmp_path):
    """mut cf-unknown-section-ignored. Truth (lm_config_from_dict: unknown sections are refused by name): a file
    with [optimiser] must not train with the default optimizer while its lr is silently ignored."""
    with pytest.raises(ValueError, match=r"unknown section\(s\) optimiser; allowed sections: run, data, model"):
        lm_config_from_dict({"data": {"train": "u.jsonl"}, "optimiser": {"lr": 1.0}})
    path = tmp_path / "lm.toml"
    path.write_text('[data]\ntrain = "u.jsonl"\n\n[optimiser]\nlr = 1.0\n')
    with pytest.raises(ValueError, match=r"optimiser"):
        load_lm_config(path)


def test_a_validation_fraction_of_one_half_is_refused():
    """mut cf-valfrac-half-ok. Truth (the field's check and its message: [0, 0.5))."""
    with pytest.raises(ValueError, match=r"data\.val_fraction = 0\.5 must be in \[0, 0\.5\)"):
        LmDataSection(train="u.jsonl", val_fraction=0.5)
    assert LmDataSection(train="u.jsonl", val_fraction=0.49).val_fraction == 0.49



# --- tr-rng-captured-at-load (every rank's RNG state in the checkpoint) --------------------------------------------
def test_two_gloo_ranks_resume_with_their_own_dropout_rng(tmp_path):
    """mut tr-rng-captured-at-load. Truth (train.py docstring: a checkpoint holds every rank's RNG state, and a
    resumed run ends bitwise identical to one never interrupted): 2 ranks with dropout 0.1 resumed from step_3.pt
    end with the weights of the uninterrupted 2-rank run; given rank 0's state, rank 1 drew rank 0's dropout masks."""
    import subprocess
    import sys

    from test_lm_train import _free_port

    cfg = _config(tmp_path, "ddp", optimizer={"max_steps": 6, "warmup_steps": 1}, run={"save_interval": 3})
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "runs" / "ddp"

    def run() -> dict:
        subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "spidr",
                        "lm-train", str(cfg)], env=env, check=True, capture_output=True, timeout=300)
        return torch.load(run_dir / "final.pt", weights_only=True)

    straight = run()
    assert len(straight["ranks"]) == 2
    (run_dir / "final.pt").unlink()
    resumed = run()
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_train_lm_leaves_the_process_numerics_as_it_found_them(tmp_path) -> None:
    """A notebook calling train_lm (or spidr.train.loop.train) kept the float32 matmul precision and deterministic
    mode that training set for the rest of the session (api30 defect 7)."""
    units = tmp_path / "units.jsonl"
    rng = np.random.default_rng(0)
    units.write_text("".join(json.dumps({"name": f"u{i}", "units": rng.integers(0, 6, 12).tolist()}) + "\n"
                             for i in range(20)))
    cfg = lm_config_from_dict({
        "run": {"workdir": str(tmp_path / "runs"), "name": "lm", "device": "cpu", "use_deterministic": True},
        "data": {"train": str(units), "dedup": False, "val_fraction": 0.1},
        "model": {"arch": "lstm", "dim": 8, "num_layers": 1, "context": 8, "dropout": 0.0},
        "optimizer": {"warmup_steps": 1, "max_steps": 2, "batch_size": 2, "dtype": "float32"},
    })
    before = torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()
    torch.set_float32_matmul_precision("high")
    try:
        train_lm(cfg)
        assert (torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()) == ("high", False)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.use_deterministic_algorithms(before[1])


def test_score_sequences_refuses_unit_ids_that_are_not_whole_numbers() -> None:
    """[1.5, 2.0] was scored as [1, 2] (api30 defect 8); whole floats score as their integers."""
    vocab = Vocabulary(4)
    torch.manual_seed(0)
    model = LstmLM(vocab.size, dim=8, num_layers=1, dropout=0.0, tie_embeddings=False).eval()
    with pytest.raises(ValueError, match=r"item 'x': unit ids must be whole numbers, found 1\.5"):
        score_sequences(model, vocab, {"x": np.array([1.5, 2.0])})
    as_floats = score_sequences(model, vocab, {"x": np.array([1.0, 2.0])})["x"]
    assert as_floats == score_sequences(model, vocab, {"x": np.array([1, 2])})["x"]


def test_too_little_data_is_refused_before_any_file_even_with_the_token_cache_lm_study_left(tmp_path, capsys):
    """lm-study's check (update_cache(need_window=False)) writes every LM's tokens/ before refusing the study. An
    lm-train of that LM then maps the cache and skips prepare_data's refusal: HEAD writes config.json, step_0.pt
    and tensorboard/, then fails in WindowSampler without naming the units file; a gpt's step_0.pt then refuses the
    rerun with a lower model.context ('weights of another shape')."""
    from spidr.cli import main
    from spidr.lm.config import load_lm_config
    from spidr.lm.prepared_data import update_cache

    model = {"arch": "gpt", "num_heads": 2, "ffn_dim": 64}
    config = _config(tmp_path, "short", model={"context": 5000, **model}, data={"val_fraction": 0.0})
    cfg = load_lm_config(config)
    update_cache(cfg, need_window=False)  # as lm-study's _check_enough_data leaves the LM's run folder
    assert main(["lm-train", str(config)]) == 2
    assert "units.jsonl: the training data has" in capsys.readouterr().err
    assert sorted(path.name for path in cfg.run.run_dir.iterdir()) == ["tokens"]
    smaller = _config(tmp_path, "short", model={"context": 16, **model}, data={"val_fraction": 0.0})
    assert main(["lm-train", str(smaller)]) == 0


# the stream is every utterance in stem order; W ranks × M micro-batches see exactly the global batch, each
# window a slice of the stream; validation windows score every target once over all ranks.


_SEQUENCES = st.dictionaries(st.text("abcé/", min_size=1, max_size=4), st.lists(st.integers(0, 9), max_size=12),
                             min_size=1, max_size=6)


def _stream(sequences):
    return token_stream({k: np.asarray(v, dtype=np.int64) for k, v in sequences.items()}, Vocabulary(10))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(sequences=_SEQUENCES, context=st.integers(1, 12),
       shape=st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (3, 2)]), multiple=st.integers(1, 4),
       seed=st.integers(0, 1000), step=st.integers(0, 10**6), attempt=st.integers(0, 2))
def test_ranks_and_micro_batches_see_the_global_batch(  # noqa: PLR0917 (hypothesis passes them by name)
        sequences, context, shape, multiple, seed, step, attempt) -> None:
    vocab, stream = Vocabulary(10), _stream(sequences)
    assert stream.tolist() == [t for k in sorted(sequences) for t in (vocab.bos, *sequences[k], vocab.eos)]
    if stream.numel() < context + 1:
        return
    world, micro = shape
    sampler = WindowSampler(stream, context, world * micro * multiple, seed)
    whole = sampler.windows(step, attempt=attempt)
    assert whole.shape == (world * micro * multiple, context + 1)
    assert whole.dtype == torch.int64
    flat = stream.long()
    for row in whole:
        assert any(torch.equal(flat[i:i + context + 1], row) for i in range(stream.numel() - context))
    parts = [sampler.windows(step, rank=r, world_size=world, micro=m, num_micro=micro, attempt=attempt)
             for r in range(world) for m in range(micro)]
    assert torch.equal(torch.cat(parts), whole)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(sequences=_SEQUENCES, context=st.integers(1, 12), batch=st.integers(1, 5), world=st.integers(1, 3))
def test_validation_windows_score_every_target_once_over_the_ranks(sequences, context, batch, world) -> None:
    stream = _stream(sequences)
    targets = []
    for rank in range(world):
        for rows in validation_windows(stream, context, batch, rank=rank, world_size=world):
            assert rows.shape[1] == context + 1
            assert rows.shape[0] <= batch
            targets += [t for t in rows[:, 1:].flatten().tolist() if t >= 0]
    assert sorted(targets) == sorted(stream.tolist()[1:])
    bos = Vocabulary(10).bos
    assert scored_targets(stream, context, bos=bos) == sum(t != bos for t in stream.tolist()[1:])


def test_lm_score_refuses_a_test_item_without_units(tmp_path, capsys):
    """Was a defect (nonfinite34): an empty 'units' row was scored as log p(EOS | BOS) (-3.6 against -1.7 for its pair)
    without a word, where lm-units refuses a test file that gives no units ("a submission needs a score for every test
    file")."""
    assert main(["lm-train", str(_config(tmp_path, "bigram", model={"arch": "ngram", "ngram_order": 2}))]) == 0
    units = tmp_path / "units" / "lexical"
    units.mkdir(parents=True)
    rows = [{"name": "1-A-w", "units": [1, 2, 3]}, {"name": "1-A-n0", "units": []}]
    (units / "dev.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    code = main(["lm-score", str(tmp_path / "runs" / "bigram" / "final.pt"), str(tmp_path / "units"),
                 str(tmp_path / "sub"), "--device", "cpu"])
    assert code == 2
    error = capsys.readouterr().err
    assert "1-A-n0" in error
    assert "dev.jsonl" in error
    assert not (tmp_path / "sub" / "lexical" / "dev.txt").exists()
