"""The training loop end to end on a tiny SpidR and a synthetic speech-like corpus (CPU):

* exact resume: a run stopped by SIGTERM, then killed by SIGKILL, then resumed ends bitwise identical to an
  uninterrupted run, with identical logged losses and validation metrics;
* the NaN/Inf guard skips a step without touching weights or codebooks, and stops with a checkpoint;
* a short run learns (loss falls from ≈ ln V, codebooks stay in use);
* checkpoint contents, precision choice, plots and the command line.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from spidr.cli import main as cli_main
from spidr.config import config_from_dict, load_config
from spidr.data.loader import build_dataloader
from spidr.models.build import build_model
from spidr.train import loop
from spidr.train.checkpoint import Checkpointer, read_int
from spidr.train.environment import DistributedEnvironment
from spidr.train.loop import StepOutput, TrainingDivergedError, _account, _Interval, train, train_step
from spidr.train.metrics import MetricsLogger, collapsed_codebooks, read_metrics, supersede_records
from spidr.train.optim import build_optimizer, build_scheduler, lr_multiplier
from spidr.train.plot import plot_training
from spidr.train.precision import Precision, cpu_has_native_bf16, resolve_precision
from spidr.train.validate import validate
from spidr.training_stopped import EXIT_STOPPED
from train_fixtures import tiny_config, tiny_config_dict, write_corpus, write_toml

FP32 = Precision("cpu", None)




@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), num_files=12, seconds=(0.5, 1.0))


def _first_batch(cfg):
    loader, _ = build_dataloader(cfg.data, cfg.masking, conv_layers=cfg.model.extractor_conv_layer_config)
    return next(iter(loader))


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["group"] == "train"]


# --------------------------------------------------------------------------------------------------------------
# Exact resume through real processes
# --------------------------------------------------------------------------------------------------------------


def _launch(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "spidr", "train", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _signal_when(process: subprocess.Popen, run_dir: Path, *, min_step: int, sig: int, log: Path,
                 group: bool = False) -> None:
    """Send ``sig`` as soon as metrics.jsonl shows a training step >= ``min_step``; to the run's whole process group
    (its data-loader workers too) with ``group``, as ``timeout``, ``scancel`` and ``kill -TERM -PGID`` do."""
    deadline = time.monotonic() + 240
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before step {min_step}:\n{log.read_text()[-3000:]}"
        if metrics.is_file() and any(r["group"] == "train" and r["step"] >= min_step for r in read_metrics(metrics)):
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)
            return
        time.sleep(0.005)
    process.kill()
    pytest.fail(f"no step {min_step} within the deadline:\n{log.read_text()[-3000:]}")


def test_a_second_run_in_a_run_folder_in_use_is_refused_before_any_work(tmp_path, corpus):
    """A config started twice (or resumed while its first run lives) wrote the same checkpoints and metrics from two
    processes; the run folder's lock, held as a running trainer holds it, now refuses the second."""
    from spidr.folder_lock import folder_lock

    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 2})
    refusal = rf"the training run in {cfg.run.run_dir} is being run by process {os.getpid()} \("
    with folder_lock(cfg.run.run_dir, "a running trainer"), pytest.raises(ValueError, match=refusal):
        train(cfg)
    assert sorted(p.name for p in cfg.run.run_dir.iterdir()) == [".lock"]
    assert train(cfg) == "completed"  # the folder is free again once its holder is done


@pytest.mark.slow
@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_interrupted_and_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path, corpus, host_sync):
    # "log": the host reads the steps at log and checkpoint steps (every 3rd) and on SIGTERM only.
    log_interval = 1 if host_sync == "step" else 3
    sections = {
        "run": {"host_sync": host_sync, "log_interval": log_interval},
        # (room after a late SIGTERM: the kill below must come at a logged step ≥ 4 steps later, before the end)
        "optimizer": {"max_steps": 26},
        "data": {"num_workers": 1},  # a worker process reads ahead of the consumed position
        "validation": {"dev": {"manifest": str(corpus), "max_batch_length": 32000, "max_sample_size": 16000,
                               "min_sample_size": 4000, "num_buckets": 4, "num_workers": 0}},
    }
    # Dropout stays on (the model defaults): the resumed run must restore the global RNG stream too.
    reference = tiny_config_dict(tmp_path / "a", corpus, **sections)
    interrupted = tiny_config_dict(tmp_path / "b", corpus, **sections)
    run_a = config_from_dict(reference).run.run_dir
    run_b = config_from_dict(interrupted).run.run_dir
    config_a = write_toml(reference, tmp_path / "a.toml")
    config_b = write_toml(interrupted, tmp_path / "b.toml")
    log = tmp_path / "b.log"

    assert subprocess.run([sys.executable, "-m", "spidr", "train", str(config_a)], check=False, capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300).returncode == 0

    # 1. SIGTERM to the process group, data-loader worker included: a checkpoint at the current step boundary, exit
    # status 3 (the worker died of it and the run stopped without a checkpoint).
    process = _launch(config_b, log)
    _signal_when(process, run_b, min_step=4, sig=signal.SIGTERM, log=log, group=True)
    assert process.wait(timeout=120) == 3, log.read_text()[-3000:]
    stopped_at = read_int(Checkpointer(run_b, save_interval=3).load_latest()[1]["step"])
    assert stopped_at >= 4
    # 2. Resume, then SIGKILL somewhere after the next periodic checkpoint: no chance to save anything.
    process = _launch(config_b, log)
    _signal_when(process, run_b, min_step=stopped_at + 4, sig=signal.SIGKILL, log=log)
    assert process.wait(timeout=120) == -signal.SIGKILL
    assert not (run_b / "final.pt").exists()
    # 3. Resume to the end.
    process = _launch(config_b, log)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]

    final_a = torch.load(run_a / "final.pt", weights_only=True)
    final_b = torch.load(run_b / "final.pt", weights_only=True)
    assert final_a["model"].keys() == final_b["model"].keys()
    for key, value in final_a["model"].items():
        assert torch.equal(value, final_b["model"][key]), key
    for pid, state in final_a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, final_b["optimizer"]["state"][pid][name]), (pid, name)
    assert read_int(final_b["step"]) == 26

    # Every step logged by the interrupted run (replayed steps included) matches the uninterrupted one.
    expected = {r["step"]: r for r in _train_records(run_a)}
    got = _train_records(run_b)
    assert sorted(r["step"] for r in got) == sorted(expected)  # one record per step: replays supersede
    if host_sync == "step":  # steps after the last checkpoint were replayed; their first records were moved aside
        replayed = read_metrics(run_b / "metrics.superseded.jsonl")
        assert replayed
        assert all(r["step"] in expected for r in replayed)
    # The SIGTERM checkpoint may fall inside a logging interval: it keeps the interval's means, so that the record
    # at the interval's end is the uninterrupted run's too (it once averaged the steps after the resume alone).
    for record in got:
        for key in ("loss", "grad_norm", "target_ppl", "pred_ppl", "lr", "num_frames", "skipped_steps"):
            assert record[key] == expected[record["step"]][key], (record["step"], key)
    validation_a = {r["step"]: r["loss"] for r in read_metrics(run_a / "metrics.jsonl") if r["group"] == "dev"}
    validation_b = [r for r in read_metrics(run_b / "metrics.jsonl") if r["group"] == "dev"]
    assert validation_a
    assert sorted(validation_a) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 26]
    for record in validation_b:
        assert record["loss"] == validation_a[record["step"]]


def test_checkpoint_contents_are_official_and_weights_only(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 4})
    assert train(cfg) == "completed"
    run_dir = cfg.run.run_dir
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["final.pt", "step_0.pt", "step_3.pt"]
    state = torch.load(run_dir / "final.pt", weights_only=True)
    model = build_model(cfg.model)
    assert list(state["model"]) == list(model.state_dict())  # unwrapped: no module./_orig_mod. prefix
    model.load_state_dict(state["model"])  # strict
    assert int(state["model"]["current_step"]) == 4
    assert state["step"].dtype == torch.int64
    assert state["step"].shape == (1,)
    assert read_int(state["epoch"]) == 0
    assert config_from_dict(state["config"]) == cfg
    assert json.loads((run_dir / "config.json").read_text()) == cfg.to_dict()
    assert len(state["ranks"]) == 1
    assert state["ranks"][0]["sampler"]["position"] == 4
    assert set(state["ranks"][0]["rng"]) == {"python", "numpy", "torch"}
    assert len(state["optimizer"]["param_groups"]) == 2
    # Starting again with the same config finds the run finished.
    assert train(cfg) == "completed"
    assert read_int(Checkpointer(run_dir, save_interval=1).load_latest()[1]["step"]) == 4


def test_resuming_with_an_edited_model_is_refused_naming_the_change_and_keeps_the_run_s_config(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 2})
    assert train(cfg) == "completed"
    saved = (cfg.run.run_dir / "config.json").read_text()
    wider = tiny_config(tmp_path, corpus, optimizer={"max_steps": 4}, model={"encoder_ff_interm_features": 128})
    assert wider.run.run_dir == cfg.run.run_dir
    with pytest.raises(ValueError, match=r"final\.pt holds weights of another shape than this config builds; "
                                         r"changed since it was saved: model\.encoder_ff_interm_features = 128 "
                                         r"\(the checkpoint's: 64\)\. Restore those settings to resume it, or "
                                         r"choose another run\.wandb_name"):
        train(wider)
    assert (cfg.run.run_dir / "config.json").read_text() == saved  # the run still says what its weights are


def test_a_start_refused_for_its_validation_set_leaves_the_run_folder_as_it_was(tmp_path, corpus):
    """A [validation] manifest that cannot be read is refused before the run folder is touched: config.json,
    the TensorBoard event files and the metrics records of the finished run stay byte for byte (config.json was
    rewritten, an event file added and the metrics moved to metrics.superseded.jsonl before the refusal)."""
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 2})
    assert train(cfg) == "completed"

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(cfg.run.run_dir)): p.read_bytes() for p in sorted(cfg.run.run_dir.rglob("*"))
                if p.is_file() and p.name != ".lock"}

    before = files()
    more = tiny_config(tmp_path, corpus, optimizer={"max_steps": 4},
                       validation={"dev": {"manifest": str(tmp_path / "missing.csv")}})
    with pytest.raises(ValueError, match=r"missing\.csv"):
        train(more)
    assert files() == before


def test_a_stop_signal_during_the_first_validation_stops_after_one_step_with_a_checkpoint(tmp_path, corpus,
                                                                                           monkeypatch):
    """The stop handler was installed only when the step loop began: a SIGTERM during step-0 validation (long on
    a large validation set) killed the run with status 143 and no word. It is now a request like any other."""
    def killed(signum, frame):
        raise AssertionError("the default SIGTERM action would have killed the trainer")

    real = loop.validate
    signalled = []

    def validate_then_signal(*args, **kwargs):
        if not signalled:
            signalled.append(True)
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", validate_then_signal)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 8}, validation={"dev": {"manifest": str(corpus)}})
        assert train(cfg) == "interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(path.name for path in cfg.run.run_dir.glob("step_*.pt")) == ["step_0.pt", "step_1.pt"]


def test_ctrl_c_asks_for_a_stop_and_a_second_one_stops_at_once() -> None:
    """Ctrl-C printed a KeyboardInterrupt traceback and lost every step since the last checkpoint (up to
    run.save_interval); the first is now a stop request like SIGTERM's, and a second interrupts as Python does."""
    from spidr.train.runtime import StopFlag

    # As in a terminal: a process started in the background by a script (nohup make test &) starts with SIGINT
    # ignored, and the flag puts back the handler it found.
    launched_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopFlag()
        with stop.installed():
            signal.raise_signal(signal.SIGINT)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, launched_with)


def test_after_a_stop_request_a_data_worker_death_is_left_to_the_loader() -> None:
    """torch's SIGCHLD handler raises a worker's death wherever the main thread is (mid-step, mid-save); after a
    stop request that death is the signal's doing and waits for the loader's next read (the trainer's stop)."""
    from spidr.train.runtime import StopFlag

    def torch_like(signum, frame):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated.")

    previous = signal.signal(signal.SIGCHLD, torch_like)
    try:
        stop = StopFlag()
        with stop.installed():
            with pytest.raises(RuntimeError, match="is killed by signal"):
                signal.raise_signal(signal.SIGCHLD)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGUSR1)  # (a second stop signal wrapped the wrapper, left in place after)
            signal.raise_signal(signal.SIGCHLD)  # no error
        assert signal.getsignal(signal.SIGCHLD) is torch_like  # however many stop signals came
        with pytest.raises(RuntimeError, match="is killed by signal"):
            signal.raise_signal(signal.SIGCHLD)  # later worker deaths are raised again
    finally:
        signal.signal(signal.SIGCHLD, previous)


WORKER_DEATH = "DataLoader worker (pid(s) 4242) exited unexpectedly"  # torch's message


@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_a_data_worker_killed_by_the_stop_signal_stops_the_run_before_its_step(tmp_path, corpus, monkeypatch,
                                                                               host_sync):
    """A worker ignores stop signals once it runs, but one started by spawn or forkserver (the macOS default,
    Python 3.14's Linux default) takes a second or so to get there: a SIGTERM to the process group then killed it,
    and the run ended in "DataLoader worker exited unexpectedly" with nothing saved. It now saves the steps taken,
    with the data put back before the step whose micro-batches it was reading, and the resume is exact."""
    sections = {"optimizer": {"max_steps": 8, "grad_accum_steps": 2},
                "run": {"host_sync": host_sync, "log_interval": 3, "save_interval": 6}}
    reference = tiny_config(tmp_path / "a", corpus, **sections)
    assert train(reference) == "completed"

    real = loop._batches

    def worker_dies(loader):
        for number, batch in enumerate(real(loader)):
            if number == 9:  # step 5's second micro-batch (steps 1-4 read batches 0-7)
                os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError(WORKER_DEATH)
            yield batch

    monkeypatch.setattr(loop, "_batches", worker_dies)
    cfg = tiny_config(tmp_path / "b", corpus, **sections)
    assert train(cfg) == "interrupted"
    saved = torch.load(cfg.run.run_dir / "step_4.pt", weights_only=True)
    four_steps = tiny_config(tmp_path / "c", corpus, **{**sections, "optimizer": {**sections["optimizer"],
                                                                                   "max_steps": 4}})
    monkeypatch.undo()
    assert train(four_steps) == "completed"
    after_four = torch.load(four_steps.run.run_dir / "final.pt", weights_only=True)
    assert [{key: rank[key] for key in ("sampler", "loader")} for rank in saved["ranks"]] == [
        {key: rank[key] for key in ("sampler", "loader")} for rank in after_four["ranks"]]
    assert train(cfg) == "completed"
    final_a = torch.load(reference.run.run_dir / "final.pt", weights_only=True)
    final_b = torch.load(cfg.run.run_dir / "final.pt", weights_only=True)
    for key, value in final_a["model"].items():
        assert torch.equal(value, final_b["model"][key]), key
    assert {r["step"]: r["loss"] for r in _train_records(reference.run.run_dir)} == {
        r["step"]: r["loss"] for r in _train_records(cfg.run.run_dir)}


def test_a_data_worker_killed_by_the_stop_signal_during_validation_stops_the_run(tmp_path, corpus, monkeypatch):
    """The same during a validation (whose loader starts its workers each time): the run stops at the checkpoint
    just saved, and the resume validates it first."""
    real = loop.validate
    calls = []

    def worker_dies(*args, **kwargs):
        calls.append(True)
        if len(calls) == 2:  # step 3's validation
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError(WORKER_DEATH)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", worker_dies)
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 8}, validation={"dev": {"manifest": str(corpus)}})
    assert train(cfg) == "interrupted"
    assert sorted(path.name for path in cfg.run.run_dir.glob("step_*.pt")) == ["step_0.pt", "step_3.pt"]
    monkeypatch.undo()
    assert train(cfg) == "completed"
    validated = [r["step"] for r in read_metrics(cfg.run.run_dir / "metrics.jsonl") if r["group"] == "dev"]
    assert sorted(set(validated)) == [0, 3, 6, 8]


def test_a_data_worker_error_without_a_stop_signal_still_stops_the_run(tmp_path, corpus, monkeypatch):
    def worker_dies(loader):
        raise RuntimeError(WORKER_DEATH)
        yield

    monkeypatch.setattr(loop, "_batches", worker_dies)
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        train(tiny_config(tmp_path, corpus))


def test_a_stop_signal_during_the_final_validation_stops_the_caller_after_final_pt(tmp_path, corpus, monkeypatch):
    """A SIGTERM during the last save or validation was logged ("will save a checkpoint and stop") and ignored:
    train() said "completed", and the demo went on through minutes of evaluation. The run is complete (final.pt),
    and train() now says "interrupted", so that its caller stops too."""
    real = loop.validate
    calls = []

    def validate_then_signal(*args, **kwargs):
        calls.append(True)
        if len(calls) == 2:  # step 0's validation, then the final one
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", validate_then_signal)
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 2}, validation={"dev": {"manifest": str(corpus)}})
    assert train(cfg) == "interrupted"
    assert (cfg.run.run_dir / "final.pt").is_file()
    assert len(calls) == 2
    assert train(cfg) == "completed"  # the rerun finds the complete run: nothing to do


def test_a_run_that_ends_on_an_error_exits_with_data_workers(tmp_path, corpus):
    """The data workers ignore SIGTERM (so that a stop signal to the process group lets the trainer save first), and
    the SIGTERM multiprocessing sends them at exit left them running: an error the CLI does not catch (a CUDA
    out-of-memory error) printed its traceback and the process never exited. The trainer stops its workers itself."""
    data = tiny_config_dict(tmp_path, corpus, data={"num_workers": 1, "persistent_workers": True},
                            validation={"dev": {"manifest": str(corpus), "num_workers": 1}})
    config = tmp_path / "run.json"
    config.write_text(json.dumps(data))
    script = ("import sys, torch\n"
              "from spidr.train import loop\n"
              "from spidr.cli import main\n"
              "def out_of_memory(*args, **kwargs):\n"
              "    raise torch.OutOfMemoryError('out of memory (simulated)')\n"
              "loop.train_step = out_of_memory\n"
              f"sys.exit(main(['train', {str(config)!r}]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=90,
                            check=False)
    assert result.returncode != 0
    assert "out of memory (simulated)" in result.stderr


def test_a_validation_table_s_errors_name_it_not_data(tmp_path, corpus):
    """[validation.dev] is checked as a data section, and its errors name it ([data] is fine)."""
    with pytest.raises(ValueError, match=r"validation\.dev\.num_buckets = 0 must be >= 1"):
        tiny_config(tmp_path, corpus, validation={"dev": {"manifest": str(corpus), "num_buckets": 0}})
    with pytest.raises(ValueError, match=r"validation\.dev\.bucket_method = 'data\.x' is invalid"):
        tiny_config(tmp_path, corpus, validation={"dev": {"manifest": str(corpus), "bucket_method": "data.x"}})
    with pytest.raises(ValueError, match=r"validation\.dev\.min_sample_size = 9 must be <= "
                                         r"validation\.dev\.max_sample_size = 2"):
        tiny_config(tmp_path, corpus, validation={"dev": {"manifest": str(corpus), "min_sample_size": 9,
                                                          "max_sample_size": 2}})


def test_init_ckpt_starts_a_run_from_any_whole_model_checkpoint_and_names_bad_ones(tmp_path, corpus):
    """run.init_ckpt reads what spidr.load_model reads: a training checkpoint and its .safetensors export give the
    new run's step-0 weights (step counter reset); a file that is no checkpoint, an exported student (HF
    directory) and another architecture are refused naming run.init_ckpt (a bare torch.load gave a traceback)."""
    from spidr.models import export_hf, export_safetensors, load_model

    source = tiny_config(tmp_path / "a", corpus, optimizer={"max_steps": 2})
    assert train(source) == "completed"
    final = source.run.run_dir / "final.pt"
    trained = torch.load(final, weights_only=True)["model"]
    export_safetensors(load_model(final), tmp_path / "a.safetensors")
    for name, init in (("from_pt", final), ("from_safetensors", tmp_path / "a.safetensors")):
        cfg = tiny_config(tmp_path / name, corpus, run={"init_ckpt": str(init)}, optimizer={"max_steps": 1})
        assert train(cfg) == "completed"
        start = torch.load(cfg.run.run_dir / "step_0.pt", weights_only=True)["model"]
        assert set(start) == set(trained)
        for key, value in trained.items():
            assert torch.equal(start[key], torch.zeros_like(value) if key == "current_step" else value), (name, key)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    export_hf(load_model(final), tmp_path / "hf")
    for init, message in ((tmp_path / "junk.pt", ": .*not"), (tmp_path / "hf", " holds only an exported student"),
                          (tmp_path / "nope.pt", " does not exist")):
        cfg = tiny_config(tmp_path / f"bad-{init.stem}", corpus, run={"init_ckpt": str(init)})
        with pytest.raises(ValueError, match=r"run\.init_ckpt = " + re.escape(repr(str(init))) + message):
            train(cfg)
        # refused before the run folder was made, or after: nothing is left (it kept the folders and their lock)
        assert not (tmp_path / f"bad-{init.stem}").exists()
    missing = tiny_config(tmp_path / "bad-manifest", tmp_path / "absent.csv")
    with pytest.raises(ValueError, match=r"absent\.csv does not exist"):
        train(missing)
    assert not (tmp_path / "bad-manifest").exists()
    wider = tiny_config(tmp_path / "wide", corpus, run={"init_ckpt": str(final)},
                        model={"encoder_ff_interm_features": 128})
    with pytest.raises(ValueError, match=r"run\.init_ckpt = .* does not fit the \[model\] config"):
        train(wider)


def test_a_resumed_run_logs_each_step_once_and_keeps_the_superseded_records(tmp_path, corpus, caplog):
    """A run killed after step 5 resumes from step_3.pt and takes steps 4 and 5 again: their first records move to
    metrics.superseded.jsonl, so that metrics.jsonl (the plots, the reports) holds one record per step."""
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 6})
    names = {"spidr": "SpidR", "dinosr": "DinoSR"}
    with caplog.at_level("INFO", logger="spidr"):
        assert train(cfg) == "completed"
    # run.model_type defaults to DinoSR: the run says which model it trains
    assert f"starting {names[cfg.run.model_type]} (run.model_type = '{cfg.run.model_type}';" in caplog.text
    # the trained parameters, as `spidr info` counts the student side (with the teacher's copy, twice as many)
    student = sum(p.numel() for p in build_model(cfg.model).parameters() if p.requires_grad)
    assert f"; {student / 1e6:.3g} M trained parameters," in caplog.text
    run_dir = cfg.run.run_dir
    first = _train_records(run_dir)
    for name in ("final.pt", "step_6.pt"):
        (run_dir / name).unlink(missing_ok=True)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["step"] <= 5) + '{"step": 6, "gro')  # killed mid-write at step 6
    caplog.clear()
    with caplog.at_level("INFO", logger="spidr"):
        assert train(cfg) == "completed"
    assert f"resuming {names[cfg.run.model_type]} (run.model_type = '{cfg.run.model_type}';" in caplog.text
    assert "at step 3 in" in caplog.text
    again = _train_records(run_dir)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(first, again, strict=True):  # an exact resume: the same losses
        assert after["loss"] == before["loss"]
    from spidr.train.metrics import supersede_records

    complete_but_cut = tmp_path / "cut.jsonl"  # killed after a whole record, before its newline
    complete_but_cut.write_text('{"step": 1, "group": "train"}\n{"step": 2, "group": "train"}')
    assert supersede_records(complete_but_cut, after_step=5) == 0  # nothing to move...
    assert complete_but_cut.read_text().endswith('"train"}\n')  # ...but the cut line is ended all the same
    complete_but_cut.write_text('{"step": 1, "group": "train"}\n{"step": 2, "group": "train"}\n{"step": 7}')
    assert supersede_records(complete_but_cut, after_step=2) == 1
    assert complete_but_cut.read_text().endswith('"train"}\n')  # the next record starts a line of its own
    superseded = (run_dir / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in superseded[:-1]] == [4, 5]
    assert superseded[-1] == '{"step": 6, "gro'
    # a fresh start (no checkpoint left) supersedes everything
    for path in run_dir.glob("*.pt"):
        path.unlink()
    assert train(cfg) == "completed"
    assert [r["step"] for r in _train_records(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_shows_one_value_per_step_after_a_resume_and_a_fresh_start(tmp_path):
    """metrics.jsonl moves superseded records aside; TensorBoard once kept them and showed two values per step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from spidr.train.metrics import MetricsLogger

    def shown() -> list[tuple[int, float]]:
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("train/loss")]

    def run(start_step: int, steps: range, loss: float, *, fresh: bool = False) -> None:
        logger = MetricsLogger(tmp_path, enabled=True, start_step=start_step, max_steps=10, fresh=fresh)
        for step in steps:
            logger.log(step, "train", {"loss": loss})
        logger.close()
        time.sleep(1.01)  # event files are named by the second they were opened in

    run(0, range(1, 11), 1.0, fresh=True)
    run(5, range(6, 9), 2.0)  # resumed from step 5, killed after step 8
    assert shown() == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 2.0), (7, 2.0), (8, 2.0)]
    run(0, range(1, 3), 3.0, fresh=True)  # no checkpoint left: everything before is superseded
    assert shown() == [(1, 3.0), (2, 3.0)]


def test_the_final_model_is_validated_when_the_last_step_is_a_checkpoint_step(tmp_path, corpus):
    """max_steps a multiple of save_interval (as the official 400,000 / 2,500): the last validation is at max_steps."""
    validation = {"dev": {"manifest": str(corpus), "max_batch_length": 32000, "max_sample_size": 16000,
                          "min_sample_size": 4000, "num_buckets": 4, "num_workers": 0}}
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 6}, validation=validation)
    assert cfg.run.save_interval == 3
    assert train(cfg) == "completed"
    assert [r["step"] for r in read_metrics(cfg.run.run_dir / "metrics.jsonl") if r["group"] == "dev"] == [0, 3, 6]


def test_a_checkpoint_whose_validation_was_not_logged_is_validated_on_resume(tmp_path, corpus):
    """Killed between writing step_3.pt (or final.pt) and logging its validation: the record was lost for good, the
    resumed run going on from the checkpoint (or finding nothing to do)."""
    validation = {"dev": {"manifest": str(corpus), "max_batch_length": 32000, "max_sample_size": 16000,
                          "min_sample_size": 4000, "num_buckets": 4, "num_workers": 0}}
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 6}, validation=validation)
    assert train(cfg) == "completed"
    run_dir, metrics = cfg.run.run_dir, cfg.run.run_dir / "metrics.jsonl"
    expected = {r["step"]: r["loss"] for r in read_metrics(metrics) if r["group"] == "dev"}
    assert sorted(expected) == [0, 3, 6]

    def dev_records() -> dict[int, list[float]]:
        records: dict[int, list[float]] = {}
        for record in read_metrics(metrics):
            if record["group"] == "dev":
                records.setdefault(record["step"], []).append(record["loss"])
        return records

    lines = metrics.read_text().splitlines()
    # 1. killed right after the final checkpoint: its validation is made by the run that finds nothing to do
    metrics.write_text("".join(line + "\n" for line in lines
                               if not (json.loads(line)["group"] == "dev" and json.loads(line)["step"] == 6)))
    assert train(cfg) == "completed"
    assert dev_records() == {step: [loss] for step, loss in expected.items()}
    # 2. killed right after step_3.pt: the resumed run validates step 3 first
    (run_dir / "final.pt").unlink()
    (run_dir / "step_6.pt").unlink(missing_ok=True)
    metrics.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] < 3
                               or (json.loads(line)["step"] == 3 and json.loads(line)["group"] == "train")))
    assert train(cfg) == "completed"
    assert dev_records() == {step: [loss] for step, loss in expected.items()}


def test_the_first_throughput_leaves_out_set_up_and_step_0_s_validation(tmp_path, corpus, monkeypatch):
    """The interval's clock started before step_0.pt and step 0's validation: a slow validation lowered the first
    record's audio_seconds_per_s."""
    real_validate = loop.validate

    def slow_validate(*args, **kwargs):
        time.sleep(2.0)
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", slow_validate)
    validation = {"dev": {"manifest": str(corpus), "max_batch_length": 32000, "max_sample_size": 16000,
                          "min_sample_size": 4000, "num_buckets": 4, "num_workers": 0}}
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 2}, run={"save_interval": 10},
                      validation=validation)
    assert train(cfg) == "completed"
    first, _ = _train_records(cfg.run.run_dir)
    # The interval's own time (a step of 20-50 ms here, more under load): with the validation inside, over 2 s. (A
    # comparison with the second interval's rate failed under load: two steps' times scatter too much.)
    assert first["audio_seconds"] / first["audio_seconds_per_s"] < 1.0


def test_a_run_directory_that_cannot_be_made_is_refused_by_name(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 1})
    cfg.run.run_dir.parent.parent.mkdir(parents=True, exist_ok=True)
    cfg.run.run_dir.parent.write_text("a file where the run's folder goes")
    with pytest.raises(ValueError, match=rf"cannot use the run directory {cfg.run.run_dir}"):
        train(cfg)


def test_a_checkpoint_inside_a_logging_interval_keeps_its_means(tmp_path, corpus):
    """Records every 3 steps, checkpoints every 2: resumed from step_2.pt, the run logs at step 3 the mean of steps
    1-3 as the uninterrupted run does (it once logged the mean of step 3 alone)."""
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 6}, run={"log_interval": 3, "save_interval": 2})
    assert train(cfg) == "completed"
    run_dir, metrics = cfg.run.run_dir, cfg.run.run_dir / "metrics.jsonl"
    expected = _train_records(run_dir)
    assert [r["step"] for r in expected] == [3, 6]
    for name in ("final.pt", "step_6.pt", "step_4.pt"):
        (run_dir / name).unlink(missing_ok=True)
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["step"] <= 2))
    assert train(cfg) == "completed"
    for got, want in zip(_train_records(run_dir), expected, strict=True):
        for key in ("loss", "grad_norm", "target_ppl", "num_frames", "audio_seconds", "skipped_steps"):
            assert got[key] == want[key], (got["step"], key)


def test_a_run_that_went_on_and_is_rerun_as_before_still_has_its_final_checkpoint(tmp_path, corpus):
    """Finished at 4, continued to 7 and killed after step_6.pt (final.pt became step_4.pt), then rerun with the old
    config: nothing to train, but final.pt must be there (the demo and the user load it)."""
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 4})
    assert train(cfg) == "completed"
    longer = tiny_config(tmp_path, corpus, optimizer={"max_steps": 7})
    assert train(longer) == "completed"
    run_dir = cfg.run.run_dir
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["final.pt", "step_0.pt", "step_3.pt", "step_4.pt",
                                                            "step_6.pt"]
    (run_dir / "final.pt").unlink()  # the kill came after step_6.pt
    assert train(cfg) == "completed"
    assert read_int(torch.load(run_dir / "final.pt", weights_only=True)["step"]) == 6


def test_grad_accumulation_and_freeze_step_in_a_run(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 4, "grad_accum_steps": 2},
                      model={"freeze_step": 2})
    assert train(cfg) == "completed"
    state = torch.load(cfg.run.run_dir / "final.pt", weights_only=True)
    per_epoch = len(build_dataloader(cfg.data, cfg.masking, conv_layers=cfg.model.extractor_conv_layer_config)[1])
    assert per_epoch < 8  # so that the 8 micro-batches of 4 steps run into a second epoch
    assert read_int(state["epoch"]) == 1
    assert state["ranks"][0]["sampler"]["position"] == 8 - per_epoch
    assert len(state["optimizer"]["param_groups"]) == 1  # the extractor/projection group went at step 2
    before = torch.load(cfg.run.run_dir / "step_3.pt", weights_only=True)["model"]
    for key, value in state["model"].items():
        if key.startswith(("feature_extractor", "feature_projection")):
            assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------------------------------------------
# NaN / Inf guard
# --------------------------------------------------------------------------------------------------------------


def _poison(model, monkeypatch) -> None:
    forward = model.forward

    def poisoned(*args, **kwargs):
        losses, metrics = forward(*args, **kwargs)  # the codebooks have already moved at this point
        return losses * float("inf"), metrics

    monkeypatch.setattr(model, "forward", poisoned)


def _poison_every_model(monkeypatch) -> None:
    """Every model that train() builds returns an infinite loss."""

    def poisoned_model(model_cfg):
        model = build_model(model_cfg)
        _poison(model, monkeypatch)
        return model

    monkeypatch.setattr(loop, "build_model", poisoned_model)


def _one_step_set_up(cfg):
    """A seeded model with its optimizer and scheduler, and the first training batch of ``cfg``."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optimizer, device=torch.device("cpu"))
    return model, optimizer, build_scheduler(optimizer, cfg.optimizer), _first_batch(cfg)


def test_a_non_finite_step_leaves_weights_codebooks_and_optimizer_untouched(tmp_path, corpus, monkeypatch):
    model, optimizer, scheduler, batch = _one_step_set_up(tiny_config(tmp_path, corpus))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    _poison(model, monkeypatch)
    out = train_step(model, [batch], optimizer, scheduler, step=0, precision=FP32, scaler=None, max_norm=10.0)
    assert out.skipped
    assert not math.isfinite(out.metrics["loss"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not optimizer.state
    assert scheduler.last_epoch == 0
    assert all(p.grad is None for p in model.parameters())

    monkeypatch.undo()
    out = train_step(model, [batch], optimizer, scheduler, step=0, precision=FP32, scaler=None, max_norm=10.0)
    assert not out.skipped
    after = model.state_dict()
    assert int(after["current_step"]) == 1
    assert scheduler.last_epoch == 1
    assert not torch.equal(after["codebooks.0.codebook"], before["codebooks.0.codebook"])
    assert not torch.equal(after["student.layers.0.attention.qkv.weight"],
                           before["student.layers.0.attention.qkv.weight"])


def test_a_step_with_no_masked_frame_is_skipped_not_a_crash(tmp_path, corpus):
    """masking.min_masks = 0 lets a batch have no masked frame: its loss is 0/0. The step once took weight decay
    alone and then raised ZeroDivisionError reading its metrics; it is now skipped, every state untouched."""
    from dataclasses import replace

    model, optimizer, scheduler, batch = _one_step_set_up(tiny_config(tmp_path, corpus))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmasked = replace(batch, mask=torch.zeros_like(batch.mask), mask_count=0)
    out = train_step(model, [unmasked], optimizer, scheduler, step=0, precision=FP32, scaler=None, max_norm=10.0)
    assert out.skipped
    assert out.metrics["num_frames"] == 0
    assert math.isnan(out.metrics["loss"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not optimizer.state


@pytest.mark.parametrize("on_device", [False, True])
def test_a_skipped_first_step_initialises_the_codebooks_from_data_again(tmp_path, corpus, monkeypatch, on_device):
    """codebook_init = "data" happens in the first training forward; when that step is skipped its codebooks are
    restored to the random init, so the next step must initialise them again (it never did: the run trained on
    random codebooks, with 8 of 16 codewords active where a clean run had 15)."""
    model, optimizer, scheduler, batch = _one_step_set_up(tiny_config(tmp_path, corpus,
                                                                     model={"codebook_init": "data"}))
    calls = []
    initialise = model._initialise_codebooks_from_data
    monkeypatch.setattr(model, "_initialise_codebooks_from_data", lambda targets: calls.append(1) or initialise(
        targets))
    random_init = model.codebooks[0].codebook.clone()
    forward = model.forward
    _poison(model, monkeypatch)
    out = train_step(model, [batch], optimizer, scheduler, step=0, precision=FP32, scaler=None, max_norm=10.0,
                     skip_on_device=on_device)
    assert out.skipped
    assert calls == [1]
    assert torch.equal(model.codebooks[0].codebook, random_init)  # restored
    monkeypatch.setattr(model, "forward", forward)
    calls.clear()
    step = int(model.current_step)  # a skip on the device counts the step
    train_step(model, [batch], optimizer, scheduler, step=step, precision=FP32, scaler=None, max_norm=10.0,
               skip_on_device=on_device)
    assert calls == [1]
    train_step(model, [batch], optimizer, scheduler, step=step + 1, precision=FP32, scaler=None, max_norm=10.0,
               skip_on_device=on_device)
    assert calls == [1]  # once only


def test_a_checkpoint_between_a_skipped_first_step_and_the_next_keeps_the_codebook_init_due(
        tmp_path, corpus, monkeypatch):
    """A skip on the device counts the step: a run stopped right after its skipped first step (here: max_steps = 1)
    must still initialise its codebooks from data when it goes on. The resumed model used to see step 1 and keep
    its random codebooks."""
    from spidr.models.dinosr import DinoSR

    calls = []
    initialise = DinoSR._initialise_codebooks_from_data
    monkeypatch.setattr(DinoSR, "_initialise_codebooks_from_data",
                        lambda self, targets: calls.append(1) or initialise(self, targets))
    built = []

    def first_forward_poisoned(model_cfg):
        model = build_model(model_cfg)
        if not built:
            forward = model.forward

            def poisoned(*args, **kwargs):
                monkeypatch.setattr(model, "forward", forward)  # the first forward only
                losses, metrics = forward(*args, **kwargs)
                return losses * float("inf"), metrics

            monkeypatch.setattr(model, "forward", poisoned)
        built.append(model)
        return model

    monkeypatch.setattr(loop, "build_model", first_forward_poisoned)
    overrides = {"model": {"codebook_init": "data"}, "run": {"host_sync": "log"}}
    assert train(tiny_config(tmp_path, corpus, optimizer={"max_steps": 1}, **overrides)) == "completed"
    state = torch.load(tiny_config(tmp_path, corpus).run.run_dir / "final.pt", weights_only=True)
    assert read_int(state["step"]) == 1  # the skip counted
    assert int(state["model"]["current_step"]) == 1
    assert state["codebook_init_due"] is True
    assert calls == [1]  # in the skipped step
    assert train(tiny_config(tmp_path, corpus, optimizer={"max_steps": 2}, **overrides)) == "completed"
    assert calls == [1, 1]  # again, in the resumed run's first step
    state = torch.load(tiny_config(tmp_path, corpus).run.run_dir / "final.pt", weights_only=True)
    assert state["codebook_init_due"] is False
    random_init = build_model(tiny_config(tmp_path, corpus).model)
    random_init.redo_codebook_init()  # what a skipped first step calls, whatever the init
    assert random_init.codebook_init_due is False  # nothing is due with codebook_init = "random"


def test_too_many_non_finite_steps_stop_the_run_with_a_checkpoint(tmp_path, corpus, monkeypatch):
    cfg = tiny_config(tmp_path, corpus, run={"max_consecutive_nonfinite": 3})
    _poison_every_model(monkeypatch)
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps"):
        train(cfg)
    path, state = Checkpointer(cfg.run.run_dir, save_interval=1).load_latest()
    assert path.name == "step_0.pt"
    assert read_int(state["step"]) == 0
    assert state["nonfinite_streak"] == 3
    assert state["ranks"][0]["sampler"]["position"] == 3  # the three bad batches were consumed
    torch.manual_seed(cfg.run.random_seed)
    initial = build_model(cfg.model).state_dict()
    for key, value in state["model"].items():
        assert torch.equal(value, initial[key]), key


def _adam_state(optimizer) -> dict:
    return {(pid, name): value.clone() for pid, state in enumerate(optimizer.state.values())
            for name, value in state.items()}


def test_a_non_finite_step_skipped_on_the_device_changes_nothing_but_the_step_count(tmp_path, corpus, monkeypatch):
    """run.host_sync = "log": the NaN/Inf verdict gates AdamW (found_inf), the codebooks and the teacher on the
    device; the step counts, as a GradScaler skip does in the official trainer."""
    model, optimizer, scheduler, batch = _one_step_set_up(tiny_config(tmp_path, corpus))
    train_step(model, [batch], optimizer, scheduler, step=0, precision=FP32, scaler=None, max_norm=10.0,
               skip_on_device=True)
    before, adam_before = {k: v.clone() for k, v in model.state_dict().items()}, _adam_state(optimizer)
    assert 0 < model.ema_decay(2) < 1  # the teacher would move on a taken step

    _poison(model, monkeypatch)
    out = train_step(model, [batch], optimizer, scheduler, step=1, precision=FP32, scaler=None, max_norm=10.0,
                     skip_on_device=True)
    assert out.skipped
    for key, value in model.state_dict().items():
        if key != "current_step":
            assert torch.equal(value, before[key]), key
    assert int(model.current_step) == 2
    assert scheduler.last_epoch == 2
    adam_after = _adam_state(optimizer)
    for key, value in adam_before.items():
        assert torch.equal(value, adam_after[key]), key  # moments and AdamW's own step count
    assert all(p.grad is None for p in model.parameters())

    monkeypatch.undo()
    train_step(model, [batch], optimizer, scheduler, step=2, precision=FP32, scaler=None, max_norm=10.0,
               skip_on_device=True)
    after = model.state_dict()
    for key in ("codebooks.0.codebook", "student.layers.0.attention.qkv.weight",
                "teacher.layers.0.attention.qkv.weight"):
        assert not torch.equal(after[key], before[key]), key


def test_reading_the_guard_at_log_steps_only_gives_the_same_run(tmp_path, corpus):
    """run.host_sync "log" against "step" on a run without a bad step: the same weights, AdamW state, checkpoints
    and logged metrics, bit for bit (log_interval 3 and save_interval 4 make the host read at both)."""
    finals, records = [], []
    for mode in ("step", "log"):
        cfg = tiny_config(tmp_path / mode, corpus, run={"host_sync": mode, "log_interval": 3, "save_interval": 4},
                          optimizer={"max_steps": 10})
        assert train(cfg) == "completed"
        finals.append(torch.load(cfg.run.run_dir / "final.pt", weights_only=True))
        records.append(_train_records(cfg.run.run_dir))
        assert sorted(p.name for p in cfg.run.run_dir.glob("step_*.pt")) == ["step_0.pt", "step_4.pt", "step_8.pt"]
    for key, value in finals[0]["model"].items():
        assert torch.equal(value, finals[1]["model"][key]), key
    for pid, state in finals[0]["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, finals[1]["optimizer"]["state"][pid][name]), (pid, name)
    assert [r["step"] for r in records[1]] == [3, 6, 9, 10]
    for a, b in zip(*records, strict=True):
        for key in ("step", "loss", "grad_norm", "target_ppl", "pred_ppl_per_codebook", "lr", "ema_decay",
                    "audio_seconds", "skipped_steps"):
            assert a[key] == b[key], (a["step"], key)


def test_non_finite_steps_read_at_log_steps_stop_the_run_there(tmp_path, corpus, monkeypatch):
    cfg = tiny_config(tmp_path, corpus, run={"host_sync": "log", "max_consecutive_nonfinite": 3, "log_interval": 2,
                                             "save_interval": 100})
    _poison_every_model(monkeypatch)
    with pytest.raises(TrainingDivergedError, match="4 consecutive steps"):
        train(cfg)  # read at step 2 (2 in a row), then at step 4
    path, state = Checkpointer(cfg.run.run_dir, save_interval=100).load_latest()
    assert path.name == "step_4.pt"
    assert state["nonfinite_streak"] == 4
    torch.manual_seed(cfg.run.random_seed)
    initial = build_model(cfg.model).state_dict()
    for key, value in state["model"].items():
        if key != "current_step":
            assert torch.equal(value, initial[key]), key


def test_host_sync_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not loop.skips_on_device("auto", cpu, scaler=None)
    assert loop.skips_on_device("auto", cuda, scaler=None)
    assert loop.skips_on_device("log", cpu, scaler=None)
    assert not loop.skips_on_device("step", cuda, scaler=None)
    scaler = object()  # float16: a GradScaler decides its skips on the host
    assert not loop.skips_on_device("auto", cuda, scaler=scaler)
    with pytest.raises(ValueError, match=r"run\.host_sync = 'log' needs bfloat16 or float32"):
        loop.skips_on_device("log", cuda, scaler=scaler)
    with pytest.raises(ValueError, match=r"run\.host_sync"):
        tiny_config(Path("/tmp"), Path("/tmp/m.csv"), run={"host_sync": "sometimes"})


# --------------------------------------------------------------------------------------------------------------
# Learning, precision, plots, command line
# --------------------------------------------------------------------------------------------------------------


def test_a_tiny_spidr_run_learns_and_keeps_its_codebooks_in_use(tmp_path):
    manifest = write_corpus(tmp_path / "corpus", num_files=24, seconds=(1.0, 1.0), seed=1)
    cfg = tiny_config(tmp_path, manifest, run={"save_interval": 1000},
                      optimizer={"max_steps": 100, "lr": 3e-3, "warmup_steps": 10, "hold_steps": 50,
                                 "decay_steps": 40},
                      model={"ema_timescale": 100}, data={"max_batch_length": 64000})
    train(cfg)
    records = _train_records(cfg.run.run_dir)
    losses = [r["loss"] for r in records]
    assert abs(losses[0] - math.log(16)) < 0.1  # uniform predictions over V = 16 codewords at the start
    assert sum(losses[-10:]) / 10 < losses[0] - 0.4
    for ppl in records[-1]["target_ppl_per_codebook"]:
        assert ppl > 4.0  # no collapse onto one or two codewords
    assert min(records[-1]["active_codewords"]) >= 6
    assert all(math.isfinite(r["grad_norm"]) for r in records)

    plots = plot_training(cfg.run.run_dir)
    names = {p.name for p in plots}
    assert {"loss.png", "perplexity.png", "target_ppl_per_codebook_train.png", "active_codewords_train.png"} <= names
    assert all(p.stat().st_size > 1000 for p in plots)


def test_precision_choice():
    assert resolve_precision("float32", torch.device("cpu")).dtype is None
    bf16 = resolve_precision("bfloat16", torch.device("cpu"))
    assert bf16.dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert bf16.make_scaler() is None
    with pytest.raises(ValueError, match="float16' needs CUDA"):
        resolve_precision("float16", torch.device("cpu"))


def test_a_gpu_without_bf16_is_told_the_dtypes_its_trainer_takes(monkeypatch):
    """The unit LM does not train in float16: its error suggested it (pretraining may)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"Tesla T4 \(compute capability < 8\.0\); set optimizer\.dtype = "
                                         r"'float16' or 'float32'$"):
        resolve_precision("bfloat16", torch.device("cuda", 0))
    with pytest.raises(ValueError, match=r"set optimizer\.dtype = 'float32'$"):
        resolve_precision("bfloat16", torch.device("cuda", 0), float16=False)


def test_bfloat16_training_step_runs_under_cpu_autocast(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optimizer, device=torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.optimizer)
    out = train_step(model, [_first_batch(cfg)], optimizer, scheduler, step=0,
                     precision=Precision("cpu", torch.bfloat16), scaler=None, max_norm=10.0)
    assert not out.skipped
    assert abs(out.metrics["loss"] - math.log(16)) < 0.2
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_command_line_errors_and_help(tmp_path, corpus, capsys):
    assert cli_main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err
    config = write_toml(tiny_config_dict(tmp_path, corpus), tmp_path / "run.toml")
    assert cli_main(["train", str(config), "--set", "optimizer.lr=-1"]) == 2
    assert "optimizer.lr = -1" in capsys.readouterr().err
    assert cli_main(["plot-training", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    assert "Resumes automatically" in capsys.readouterr().out


def test_a_finished_training_prints_its_final_checkpoint_on_stdout(tmp_path, corpus, capsys):
    """`spidr train ... > out.txt` left out.txt empty (lm-train prints its final.pt there); the log stays on stderr."""
    config = write_toml(tiny_config_dict(tmp_path, corpus, optimizer={"max_steps": 2}), tmp_path / "run.toml")
    assert cli_main(["train", str(config)]) == 0
    cfg = load_config(config)
    assert capsys.readouterr().out == f"trained model: {Path(cfg.run.run_dir) / 'final.pt'}\n"
    assert (Path(cfg.run.run_dir) / "final.pt").is_file()


def test_the_data_stream_never_moves_the_global_rng_and_spans_epochs():
    class DrawingLoader:
        """Draws from the global RNG when an epoch starts and per batch, like a DataLoader without a generator."""

        def __iter__(self):
            torch.rand(1)
            for i in range(3):
                torch.rand(1)
                yield i

    torch.manual_seed(0)
    state = torch.get_rng_state()
    stream = loop._batches(DrawingLoader())
    assert [next(stream) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(torch.get_rng_state(), state)

    class EmptyLoader:
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="no batch in a whole epoch"):
        next(loop._batches(EmptyLoader()))


def test_validation_leaves_out_a_batch_with_no_masked_frame():
    """With masking.min_masks = 0 a validation batch can draw no masked frame: its empty loss made the whole
    validation loss NaN. It is left out, as a repeated batch is: the means are those of the other batches."""
    from spidr.data.collate import Batch
    from spidr.models import num_frames
    from spidr.train.validate import validate
    from test_models_dinosr import tiny_model, waveforms

    model = tiny_model("dinosr")
    wave, lengths = waveforms(8000, 8000), torch.tensor([8000, 8000])
    masked = torch.zeros(2, num_frames(8000), dtype=torch.bool)
    masked[:, :10] = True
    scored = Batch(wave, lengths, None, masked, ["a", "b"], mask_count=20)
    unmasked = Batch(wave, lengths, None, torch.zeros_like(masked), ["a", "b"], mask_count=0)
    alone = validate(model, [scored], device=torch.device("cpu"), precision=FP32)
    with_empty = validate(model, [scored, unmasked], device=torch.device("cpu"), precision=FP32)
    assert math.isfinite(alone["loss"])
    assert with_empty == alone


def _output(skipped: bool) -> StepOutput:
    values = torch.tensor([1.0, float(skipped), 0, 1, 10, 160, 1, 5, 5, 1, 5, 5, 3], dtype=torch.float64)
    return StepOutput(values, lr=1e-3, ema_decay=None)


def test_the_non_finite_streak_counts_consecutive_skips_only():
    """Ten isolated skipped steps are no divergence: a taken step resets the streak; three in a row (the limit
    here) save and stop."""
    from types import SimpleNamespace

    def run():
        return SimpleNamespace(cfg=SimpleNamespace(run=SimpleNamespace(max_consecutive_nonfinite=3, run_dir="run")),
                               nonfinite_streak=0, step=0)

    saves = []
    isolated = run()
    pattern = [True, False, True, True, False, True, True, False]  # never 3 in a row
    _account(isolated, [_output(s) for s in pattern], first_step=1, interval=_Interval(),
             save=lambda: saves.append(1))
    assert saves == []
    assert isolated.nonfinite_streak == 0
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps"):
        _account(run(), [_output(s) for s in [False, True, True, True]], first_step=1, interval=_Interval(),
                 save=lambda: saves.append(1))
    assert saves == [1]


def test_resume_restores_the_streak_the_loss_scale_and_the_bad_file_tally(tmp_path):
    from spidr.train.environment import DistributedEnvironment
    manifest = write_corpus(tmp_path / "c", num_files=6, seconds=(0.5, 0.8))
    cfg = tiny_config(tmp_path, manifest, optimizer={"max_steps": 1})
    assert loop.train(cfg) == "completed"
    path = cfg.run.run_dir / "final.pt"
    state = torch.load(path, weights_only=True)
    state["nonfinite_streak"] = 2
    state["scaler"] = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()
    state["ranks"][0]["loader"]["bad_files"] = {"seen": 40, "bad": 3, "passes": 1, "reasons": {"x.wav": "bad"}}
    torch.save(state, path)
    model = build_model(cfg.model)
    loader, sampler = build_dataloader(cfg.data, cfg.masking, conv_layers=cfg.model.extractor_conv_layer_config)
    scaler = torch.amp.GradScaler("cpu")
    run, fresh = loop._start_or_resume(cfg, model, sampler=sampler, loader=loader, scaler=scaler,
                                       checkpointer=Checkpointer(cfg.run.run_dir, save_interval=3),
                                       denv=DistributedEnvironment(), device=torch.device("cpu"))
    assert not fresh
    assert run.nonfinite_streak == 2
    assert scaler.get_scale() == 1024.0
    assert (loader.tracker.seen, loader.tracker.bad) == (40, 3)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"])
def test_each_stop_signal_is_a_request(name) -> None:
    """Truth: the documented stop signals (README, StopFlag: SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT; SLURM's
    --signal=USR2@T among them) each set the flag instead of ending the process, and the handler is put back."""
    from spidr.train.runtime import StopFlag

    def not_a_request(signum, frame):
        raise AssertionError(f"{name} reached the handler in place before the flag's (the process would end)")

    sig = getattr(signal, name)
    previous = signal.signal(sig, not_a_request)
    try:
        stop = StopFlag()
        with stop.installed():
            signal.raise_signal(sig)
            assert stop.requested
        assert signal.getsignal(sig) is not_a_request
    finally:
        signal.signal(sig, previous)


def test_a_repeated_stop_signal_other_than_ctrl_c_does_not_stop_at_once() -> None:
    """Only a second Ctrl-C stops without saving; a scheduler that sends SIGTERM twice (or SIGUSR1 then
    SIGTERM) still gets its checkpoint."""
    from spidr.train.runtime import StopFlag

    stop = StopFlag()
    with stop.installed():
        try:
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1):
                signal.raise_signal(sig)
        except KeyboardInterrupt:
            pytest.fail("a repeated stop signal other than Ctrl-C stopped at once, without a checkpoint")
        assert stop.requested


def test_with_several_processes_a_worker_death_is_not_taken_for_the_stop(monkeypatch) -> None:
    """With several ranks the others wait in a collective: a rank that saved and returned alone would leave
    them hanging, so the error stands (_killed_by_the_stop's docstring)."""
    from spidr.train.runtime import StopFlag

    stop = StopFlag()
    stop.requested = True
    error = RuntimeError(WORKER_DEATH)
    assert loop._killed_by_the_stop(error, stop)
    monkeypatch.setattr(loop, "world_size", lambda: 2)
    assert not loop._killed_by_the_stop(error, stop)


def test_a_step_cut_short_by_the_stop_puts_back_every_part_of_the_data_s_position() -> None:
    """Truth (the state before the read, kept by hand): a worker that dies of the stop signal while
    the step's micro-batches are read leaves the sampler (epoch, position), the loader's yielded_in_epoch and the
    bad-file tally exactly as they were before the step's first micro-batch, here the first of an epoch."""
    from types import SimpleNamespace

    from spidr.train.runtime import StopFlag

    sampler = SimpleNamespace(epoch=3, position=0)
    loader = SimpleNamespace(yielded_in_epoch=False, tracker=SimpleNamespace(seen=40, bad=2, passes=3))
    run = SimpleNamespace(sampler=sampler, cfg=SimpleNamespace(optimizer=SimpleNamespace(grad_accum_steps=3)))
    before = (sampler.epoch, sampler.position, loader.yielded_in_epoch, loader.tracker.seen, loader.tracker.bad,
              loader.tracker.passes)

    class Batch:
        def to(self, device, non_blocking=False):
            return self

    def batches():
        for _ in range(2):
            sampler.position += 4
            loader.yielded_in_epoch = True
            loader.tracker.seen += 4
            loader.tracker.bad += 1
            yield Batch()
        loader.tracker.passes += 1
        raise RuntimeError(WORKER_DEATH)

    stop = StopFlag()
    stop.requested = True
    assert loop._read_micro_batches(batches(), run, loader, stop=stop, device=torch.device("cpu")) is None
    assert (sampler.epoch, sampler.position, loader.yielded_in_epoch, loader.tracker.seen, loader.tracker.bad,
            loader.tracker.passes) == before


def test_a_stop_before_a_step_names_the_unread_skipped_steps_by_their_number(caplog) -> None:
    """Truth (hand-counted): with run.host_sync = "log", at step 7 the host has not read steps 6 and 7;
    step 7 was skipped (non-finite): the warning of the stop's accounting names step 7, not 6."""
    from types import SimpleNamespace

    run = SimpleNamespace(cfg=SimpleNamespace(run=SimpleNamespace(max_consecutive_nonfinite=5, run_dir="run")),
                          nonfinite_streak=0, step=7)
    saves = []
    with caplog.at_level("WARNING", logger="spidr"):
        assert loop._stop_before_step(run, [_output(False), _output(True)], interval=_Interval(),
                                      save=lambda: saves.append(1)) == "interrupted"
    assert saves == [1]
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 1
    assert skipped[0].startswith("step 7:"), skipped


# (tests below: behaviours that a mutation round over spidr.train, 55 mutants, found untested)

CPU = torch.device("cpu")
NO_DROPOUT = {"encoder_dropout": 0.0, "encoder_attention_dropout": 0.0, "encoder_layer_drop": 0.0}


def _batches(cfg, count: int) -> list:
    loader, _ = build_dataloader(cfg.data, cfg.masking, conv_layers=cfg.model.extractor_conv_layer_config)
    stream = iter(loader)
    return [next(stream) for _ in range(count)]


def _forward(model, batch):
    return model(batch.waveforms, mask=batch.mask, padding_mask=batch.padding_mask, mask_count=batch.mask_count)


# --------------------------------------------------------------------------------------------------------------
# train_step: gradient accumulation's logged values, the clip norm
# --------------------------------------------------------------------------------------------------------------


def test_micro_batches_log_the_global_per_frame_loss_and_the_metrics_of_all_their_frames(tmp_path, corpus):
    """Truth (recomputed by hand on a copy in eval mode, whose forwards label both micro-batches with the step's
    codebooks and update nothing, as k ranks would): with two micro-batches the logged loss is (Σ frame losses of
    both) / (N1 + N2), each perplexity is that of the step's pooled distribution (spec §4.5), a codeword is active
    when either micro-batch took it, and a codebook's loss is its frame losses' sum over N1 + N2."""
    cfg = tiny_config(tmp_path, corpus, model=NO_DROPOUT)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    by_hand = copy.deepcopy(model).eval()
    first, second = _batches(cfg, 2)
    optimizer = build_optimizer(model, cfg.optimizer, device=CPU)
    out = train_step(model, [first, second], optimizer, build_scheduler(optimizer, cfg.optimizer), step=0,
                     precision=FP32, scaler=None, max_norm=10.0)
    with torch.no_grad():
        results = [_forward(by_hand, b) for b in (first, second)]
    frames = int(first.mask.sum() + second.mask.sum())
    assert int(first.mask.sum()) != int(second.mask.sum())  # unequal micro-batches: a per-batch mean would differ
    metrics = out.metrics
    assert metrics["num_frames"] == frames
    expected_loss = sum(losses.double().sum().item() for losses, _ in results) / frames
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    k, v = cfg.model.num_codebooks, cfg.model.codebook_size
    # the sums each forward reports: K·V codeword counts, K·V predicted probabilities, K loss sums, the frame count
    sums = [m["metric_sums"].double() for _, m in results]
    assert [float(s[-1]) for s in sums] == [int(first.mask.sum()), int(second.mask.sum())]
    counts = sum(s[: k * v].view(k, v) for s in sums)
    predicted = sum(s[k * v : 2 * k * v].view(k, v) for s in sums)
    for one, (losses, _) in zip(sums, results, strict=True):  # the loss sums add up to the frames' losses
        assert float(one[2 * k * v : 2 * k * v + k].sum()) / k == pytest.approx(losses.double().sum().item())

    def perplexity(total: torch.Tensor) -> list[float]:
        p = total / frames
        return (2 ** -(p * torch.log2(p + 1e-8)).sum(-1)).tolist()

    assert metrics["target_ppl_per_codebook"] == pytest.approx(perplexity(counts), rel=1e-5)
    assert metrics["pred_ppl_per_codebook"] == pytest.approx(perplexity(predicted), rel=1e-5)
    assert metrics["target_ppl"] == pytest.approx(sum(perplexity(counts)) / k, rel=1e-5)
    assert metrics["active_codewords"] == (counts > 0).sum(-1).tolist()
    assert metrics["loss_per_codebook"] == pytest.approx(
        (sum(s[2 * k * v : 2 * k * v + k] for s in sums) / frames).tolist(), rel=1e-5)
    # the means of the micro-batches' own numbers, which were logged before, are not these
    assert metrics["target_ppl"] != pytest.approx(sum(m["target_ppl"].item() for _, m in results) / 2, rel=1e-4)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_the_step_clips_the_gradient_to_its_max_norm(tmp_path, corpus, max_norm):
    """Truth: the gradient AdamW sees has total norm min(max_norm, pre-clip norm), and the logged grad_norm is the
    pre-clip norm (read in a step pre-hook of the optimizer)."""
    model, optimizer, scheduler, batch = _one_step_set_up(tiny_config(tmp_path, corpus))
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for group in opt.param_groups for p in group["params"] if p.grad is not None])).item()))
    out = train_step(model, [batch], optimizer, scheduler, step=0, precision=FP32, scaler=None, max_norm=max_norm)
    pre_clip = out.metrics["grad_norm"]
    assert pre_clip > 0.05  # so that the small max_norm clips
    assert seen == [pytest.approx(min(max_norm, pre_clip), rel=1e-4)]


def test_the_logged_lr_is_the_main_group_s_not_the_front_end_s(tmp_path, corpus):
    """Truth (spec §7.2): the lr a step reports is optimizer.lr × lr_multiplier(step), the transformer's; the front
    end's group runs at feature_encoder_lr_scale times that."""
    cfg = tiny_config(tmp_path, corpus, optimizer={"feature_encoder_lr_scale": 0.1})
    model, optimizer, scheduler, batch = _one_step_set_up(cfg)
    for step in range(2):
        out = train_step(model, [batch], optimizer, scheduler, step=step, precision=FP32, scaler=None, max_norm=10.0)
        assert out.lr == pytest.approx(cfg.optimizer.lr * lr_multiplier(step, cfg.optimizer), rel=1e-12)
        assert out.metrics["lr"] == out.lr


def test_the_run_clips_with_the_configured_max_norm(tmp_path, corpus, monkeypatch):
    """optimizer.max_norm reaches every step (the default 10 is what the other tests use)."""
    calls = []
    real = loop.train_step

    def spy(*args, **kwargs):
        calls.append(kwargs["max_norm"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    assert train(tiny_config(tmp_path, corpus, optimizer={"max_steps": 2, "max_norm": 0.25})) == "completed"
    assert calls == [0.25, 0.25]


# --------------------------------------------------------------------------------------------------------------
# NaN/Inf skip
# --------------------------------------------------------------------------------------------------------------


def test_a_skipped_float16_step_halves_the_loss_scale(tmp_path, corpus, monkeypatch):
    """Truth (GradScaler's contract, backoff_factor 0.5): an overflowing step lowers the scale, or float16 training
    overflows again at every step until run.max_consecutive_nonfinite stops it."""
    model, optimizer, scheduler, batch = _one_step_set_up(tiny_config(tmp_path, corpus))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _poison(model, monkeypatch)
    out = train_step(model, [batch], optimizer, scheduler, step=0, precision=FP32, scaler=scaler, max_norm=10.0)
    assert out.skipped
    assert scaler.get_scale() == 512.0
    assert not optimizer.state


def test_a_skipped_step_s_warning_names_the_step_it_retries(tmp_path, corpus, monkeypatch, caplog):
    """Truth: with run.host_sync = "step" a skipped step is not counted; the run is at step 0, and the step that was
    skipped (and is tried again) is step 1, as the log-step path numbers it."""
    _poison_every_model(monkeypatch)
    cfg = tiny_config(tmp_path, corpus, run={"max_consecutive_nonfinite": 2, "host_sync": "step"})
    with caplog.at_level(logging.WARNING, logger="spidr"), pytest.raises(loop.TrainingDivergedError):
        train(cfg)
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 2
    assert all(message.startswith("step 1: non-finite loss") for message in skipped), skipped


# --------------------------------------------------------------------------------------------------------------
# The data stream across a resume at an epoch's end
# --------------------------------------------------------------------------------------------------------------


def test_a_resume_at_the_end_of_an_epoch_goes_on_to_the_next_epoch():
    """A checkpoint after an epoch's last batch: the restored loader yields nothing more in that epoch (it had
    yielded before the checkpoint, yielded_in_epoch = True). That is not an empty training set: the stream goes on."""

    class Loader:
        yielded_in_epoch = True  # restored from the checkpoint

        def __init__(self):
            self.epochs = 0

        def __iter__(self):
            self.epochs += 1
            if self.epochs == 1:  # what was left of the checkpoint's epoch: nothing
                return iter(())
            self.yielded_in_epoch = True
            return iter([10 * self.epochs, 10 * self.epochs + 1])

    stream = loop._batches(Loader())
    assert [next(stream) for _ in range(3)] == [20, 21, 30]


# --------------------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------------------


def _step(loss_sum: float, frames: float, *, skipped: bool = False) -> StepOutput:
    """A step's output as train_step packs it (one codebook): loss sum, ranks non-finite, ranks stopping, grad norm,
    frames, samples, utterances, then target/pred ppl and the four per-codebook values."""
    values = [loss_sum, float(skipped), 0, 1, frames, 160, 2, 5, 5, 1, 5, 5, 3]
    return StepOutput(torch.tensor(values, dtype=torch.float64), lr=1e-3, ema_decay=None)


def test_a_logging_interval_s_record_averages_its_own_taken_steps_only():
    """Truth (hand-computed): the first interval's steps have per-frame losses 0.1 and 0.3 (mean 0.2) besides one
    skipped step (infinite loss, not averaged); the second interval's one step has loss 0.5, its own mean."""
    interval = _Interval()
    interval.add(_step(1.0, 10))
    interval.add(_step(math.inf, 10, skipped=True))
    interval.add(_step(6.0, 20))
    first = interval.close(lr=1e-3, ema_decay=0.999, epoch=0)
    assert first["loss"] == pytest.approx(0.2)
    assert first["num_frames"] == pytest.approx(15.0)
    assert first["skipped_steps"] == 1
    interval.add(_step(5.0, 10))
    second = interval.close(lr=1e-3, ema_decay=0.999, epoch=0)
    assert second["loss"] == pytest.approx(0.5)
    assert second["skipped_steps"] == 0


def test_a_logging_interval_s_skipped_count_survives_its_checkpoint():
    """Truth (hand-counted): one skipped and one taken step before the checkpoint, one taken after: the interval's
    record says 1 skipped step, as the uninterrupted run's does."""
    interval = _Interval()
    interval.add(_step(math.inf, 10, skipped=True))
    interval.add(_step(1.0, 10))
    resumed = _Interval()
    resumed.load_state_dict(copy.deepcopy(interval.state_dict()))
    resumed.add(_step(3.0, 10))
    record = resumed.close(lr=1e-3, ema_decay=0.999, epoch=0)
    assert record["skipped_steps"] == 1
    assert record["loss"] == pytest.approx(0.2)


def test_the_front_end_group_is_dropped_at_the_start_of_the_step_after_the_freeze(tmp_path, corpus):
    """Truth (spec §4.7): the extractor freezes in update_ema(freeze_step); at the start of the next iteration
    (step == freeze_step) the trainer deletes the optimizer's second group and its Adam state. A run of
    freeze_step + 1 steps ends with one group."""
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 3}, model={"freeze_step": 2},
                      run={"save_interval": 10})
    assert train(cfg) == "completed"
    state = torch.load(cfg.run.run_dir / "final.pt", weights_only=True)
    assert len(state["optimizer"]["param_groups"]) == 1
    model = build_model(cfg.model)
    trained = [p for name, p in model.named_parameters()
               if not name.startswith(("teacher", "feature_extractor", "feature_projection"))]
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(trained)


def test_a_run_resumed_at_its_freeze_step_keeps_the_front_end_frozen(tmp_path, corpus):
    """Truth (spec §4.7): from model.freeze_step on, the conv extractor and projection do not train. A run stopped
    right at that step (update_ema(freeze_step) froze them) and resumed must rebuild the model frozen."""
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 2}, model={"freeze_step": 2})
    assert train(cfg) == "completed"
    longer = tiny_config(tmp_path, corpus, optimizer={"max_steps": 3}, model={"freeze_step": 2})
    model = build_model(longer.model)
    loader, sampler = build_dataloader(longer.data, longer.masking,
                                       conv_layers=longer.model.extractor_conv_layer_config)
    run, fresh = loop._start_or_resume(longer, model, sampler=sampler, loader=loader, scaler=None,
                                       checkpointer=Checkpointer(longer.run.run_dir, save_interval=3),
                                       denv=DistributedEnvironment(), device=CPU)
    assert not fresh
    assert run.step == 2
    assert model.feature_encoder_frozen
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())


def test_a_run_started_from_initial_weights_starts_its_schedules_at_step_0(tmp_path, corpus):
    """run.init_ckpt of a finished run (current_step 3): the new run's step_0.pt says step 0, or a resume from it
    would take the old step for this run's (and freeze the front end when it is past freeze_step)."""
    first = tiny_config(tmp_path / "a", corpus, optimizer={"max_steps": 3}, model={"freeze_step": 3})
    assert train(first) == "completed"
    final = first.run.run_dir / "final.pt"
    assert int(torch.load(final, weights_only=True)["model"]["current_step"]) == 3
    second = tiny_config(tmp_path / "b", corpus, optimizer={"max_steps": 1}, model={"freeze_step": 3},
                         run={"init_ckpt": str(final)})
    assert train(second) == "completed"
    step_0 = torch.load(second.run.run_dir / "step_0.pt", weights_only=True)
    assert int(step_0["model"]["current_step"]) == 0


# --------------------------------------------------------------------------------------------------------------
# Validation and the collapse warning
# --------------------------------------------------------------------------------------------------------------


def test_validation_is_the_mean_of_each_batch_s_eval_metrics_and_changes_nothing(tmp_path, corpus):
    """Truth (recomputed on a copy in eval mode, batch by batch): the validation loss is the mean over batches of each
    batch's per-frame loss, and each per-codebook list is the mean of the batches' lists. The model's weights,
    codebooks and training mode, and the global RNG (here drawn from by the batches' iterable, as a DataLoader
    without a generator does), are as before."""
    cfg = tiny_config(tmp_path, corpus)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    batches = _batches(cfg, 2)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        results = [_forward(reference, b) for b in batches]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def drawing():
        for batch in batches:
            torch.rand(1)
            yield batch

    torch.manual_seed(1)
    rng = torch.get_rng_state()
    scores = validate(model, drawing(), device=CPU, precision=FP32)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert scores["num_batches"] == 2
    assert scores["loss"] == pytest.approx(sum(losses.mean().item() for losses, _ in results) / 2, rel=1e-6)
    assert abs(scores["loss"] - math.log(16)) < 0.2  # near-uniform predictions over V = 16 at initialisation
    for name in ("loss_per_codebook", "target_ppl_per_codebook", "pred_ppl_per_codebook", "active_codewords"):
        expected = ((results[0][1][name].double() + results[1][1][name].double()) / 2).tolist()
        assert scores[name] == pytest.approx(expected, rel=1e-6), name


def test_the_collapse_warning_is_below_5_percent_of_the_codebook_size_and_below_2():
    """Truth (hand-computed): with 256 codewords the threshold is a target perplexity of 12.8; with 16, 5 % is 0.8,
    which no perplexity reaches (a toy run whose codebook used one codeword was never warned about): 2."""
    assert collapsed_codebooks([12.0, 13.0], 256) == [0]
    assert collapsed_codebooks([1.0, 1.99, 2.01, 10.0], 16) == [0, 1]
    assert collapsed_codebooks([1.9, 2.1], 40) == [0]  # (5 % of 40 = 2)


def test_the_collapse_threshold_itself_is_not_a_collapse_and_the_warning_names_it(tmp_path, caplog):
    """mut ME3 (`<` → `<=`: a perplexity equal to the threshold called collapsed; the docstring says 'below') and
    ME4 (the warning printed 5 % of the size, 0.8 for 16 codewords, where the threshold applied is 2)."""
    from spidr.train.metrics import MetricsLogger, collapsed_codebooks

    assert collapsed_codebooks([2.0, 1.5], 16) == [1]
    assert collapsed_codebooks([12.8, 12.7], 256) == [1]  # (5 % of 256 = 12.8, exactly)
    metrics = MetricsLogger(tmp_path, enabled=True, start_step=0, max_steps=10, codebook_size=16, fresh=True)
    with caplog.at_level(logging.WARNING, logger="spidr.train.metrics"):
        metrics.log(1, "valid", {"loss": 1.0, "target_ppl_per_codebook": [1.5, 3.0]})
    metrics.close()
    assert "codebook(s) [0] collapsed: target perplexity [1.5] < 2 (of 16 codewords)" in caplog.text


def test_a_folder_in_the_way_of_a_checkpoint_is_named_in_the_error(tmp_path, capsys):
    """A folder where final.pt goes: the error named the hidden temporary file (.tmp-final.pt.NNN), which never
    exists, instead of the checkpoint path in the way (a rename's destination, os.replace's filename2)."""
    from spidr import cli

    corpus = write_corpus(tmp_path / "corpus", num_files=6)
    config = write_toml(tiny_config_dict(tmp_path, corpus, optimizer={"max_steps": 2}), tmp_path / "run.toml")
    cfg = tiny_config(tmp_path, corpus, optimizer={"max_steps": 2})
    blocker = cfg.run.run_dir / "final.pt"
    blocker.mkdir(parents=True)
    assert cli.main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{blocker}: is a directory" in err
    assert ".tmp-" not in err


def test_a_fresh_run_supersedes_an_old_run_s_step_0_records(tmp_path):
    """mut M2 (``after_step=-1 if fresh else start_step`` → ``start_step``): a fresh run (start_step 0) logs its
    own step-0 validation; an earlier run's step-0 record left in metrics.jsonl moves aside with the rest, or the
    step would have two records of its group."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "group": "dev", "loss": 9.0}\n'
                                            '{"step": 1, "group": "train", "loss": 8.0}\n')
    logger = MetricsLogger(tmp_path, enabled=True, start_step=0, max_steps=10, fresh=True)
    logger.log(0, "dev", {"loss": 1.0})
    logger.close()
    assert [(r["step"], r["group"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(0, "dev", 1.0)]
    superseded = read_metrics(tmp_path / "metrics.superseded.jsonl")
    assert [(r["step"], r["loss"]) for r in superseded] == [(0, 9.0), (1, 8.0)]


def test_a_torn_record_moved_aside_does_not_join_the_next_one_moved(tmp_path):
    """mut M6 (moved lines appended as read): a torn last line (no newline) moved to metrics.superseded.jsonl ends
    there with a newline, so the records a later resume moves start lines of their own and stay readable."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "group": "train"}\n{"step": 2, "gro')  # killed mid-write at step 2
    assert supersede_records(path, after_step=1) == 1
    path.write_text('{"step": 1, "group": "train"}\n{"step": 2, "group": "train", "loss": 5.0}\n')
    assert supersede_records(path, after_step=1) == 1
    lines = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert lines == ['{"step": 2, "gro', '{"step": 2, "group": "train", "loss": 5.0}']
    assert json.loads(lines[1])["loss"] == 5.0


def test_a_run_killed_between_its_final_save_and_the_purge_purges_on_the_rerun(tmp_path):
    """final.pt is renamed into place, then the checkpoints beyond run.keep_latest are removed: a kill in between
    leaves keep_latest + 1 files, and the rerun (which resumes from final.pt and finds nothing to do) never removes
    them (3 files of a base model's size where the user allowed 2)."""

    from spidr.train import checkpoint as checkpoint_module
    from spidr.train.loop import train
    from train_fixtures import tiny_config, write_corpus

    manifest = write_corpus(tmp_path / "corpus", num_files=6)
    cfg = tiny_config(tmp_path / "runs", manifest, run={"save_interval": 3, "keep_latest": 2},
                      optimizer={"max_steps": 7, "warmup_steps": 1, "hold_steps": 3, "decay_steps": 3})
    real_purge = checkpoint_module.Checkpointer._purge

    def killed_before_the_final_purge(self, *, keep):
        if keep.name == "final.pt":
            raise KeyboardInterrupt  # (kill -9 just after final.pt was renamed into place)
        return real_purge(self, keep=keep)

    checkpoint_module.Checkpointer._purge = killed_before_the_final_purge
    try:
        with contextlib.suppress(KeyboardInterrupt):
            train(cfg)
    finally:
        checkpoint_module.Checkpointer._purge = real_purge
    run_dir = cfg.run.run_dir
    assert (run_dir / "final.pt").is_file()
    train(cfg)  # the rerun
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["final.pt", "step_6.pt"]


@pytest.mark.parametrize("case", [("completed", True, 0, True), ("stopped", True, EXIT_STOPPED, False),
                                  ("completed", False, 0, False)])
def test_only_a_completed_training_prints_its_final_checkpoint_and_only_on_the_main_rank(
        tmp_path, corpus, capsys, monkeypatch, case):
    """A run stopped by a signal or a time limit has no final.pt to name (its stdout stays empty), and under
    torchrun only rank 0 prints it: one line for a script reading stdout, not one per GPU."""
    from spidr.train import environment

    outcome, is_main, code, printed = case
    config = write_toml(tiny_config_dict(tmp_path, corpus), tmp_path / "run.toml")
    monkeypatch.setattr(loop, "train", lambda cfg: outcome)
    monkeypatch.setattr(environment, "detect_environment", lambda: types.SimpleNamespace(is_main=is_main))
    assert cli_main(["train", str(config)]) == code
    out = capsys.readouterr().out
    from spidr.config import load_config

    assert out == (f"trained model: {Path(load_config(config).run.run_dir) / 'final.pt'}\n" if printed else "")
