"""An extraction split into parts (``spidr extract --shard K/N``, or one part per process under torchrun / srun):
run in any order or at once, killed and resumed, the parts leave in their shared folder what one whole extraction
leaves there (unit rows in another order)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from spidr.data.manifest import read_manifest
from spidr.eval.feature_dir import refuse_unfinished_extraction
from spidr.eval.features import ExtractionSettings
from spidr.eval.folder_extraction import extract_part, extract_to_directory
from spidr.eval.journal import STATE_DIR, JournalState, join_part_units
from spidr.eval.pipeline_commands import launcher_part
from spidr.eval.shards import WHOLE, Shard, every_part, parse_shard
from spidr.folder_lock import folder_lock
from spidr.models.loading import export_safetensors
from test_extract_resume import SETTINGS, _model
from train_fixtures import write_corpus

SRC = Path(__file__).resolve().parents[1] / "src"
NUM_FILES = 9


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), num_files=NUM_FILES, seconds=(0.3, 1.2))


@pytest.fixture(scope="module")
def whole(manifest, tmp_path_factory) -> Path:
    """What one process extracting everything leaves."""
    out = tmp_path_factory.mktemp("whole") / "out"
    extract_to_directory(_model(), read_manifest(manifest), out, ExtractionSettings(**SETTINGS), progress=False)
    return out


def _part(manifest: Path, out: Path, shard: Shard, **options):
    return extract_part(_model(), read_manifest(manifest), out, ExtractionSettings(**SETTINGS), shard,
                        progress=False, **options)


def _outputs(out: Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, list[int]]], dict]:
    """Features by path, unit rows by layer and name (each name once), and the metadata."""
    arrays = {str(p.relative_to(out)): np.load(p) for p in sorted(out.glob("layer_*/**/*.npy"))}
    units = {}
    for path in sorted((out / "codebook_units").glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        units[path.stem] = {row["name"]: row["units"] for row in rows}
        assert len(units[path.stem]) == len(rows), f"a row twice in {path}"
    return arrays, units, json.loads((out / "metadata.json").read_text())


def _assert_same_outputs(out: Path, whole: Path, *, exact: bool = True) -> None:
    arrays, units, metadata = _outputs(out)
    expected_arrays, expected_units, expected_metadata = _outputs(whole)
    assert arrays.keys() == expected_arrays.keys()
    for key, value in arrays.items():
        if exact:
            np.testing.assert_array_equal(value, expected_arrays[key], err_msg=key)
        else:  # (another process, another thread count: the last bits may differ)
            np.testing.assert_allclose(value, expected_arrays[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert units == expected_units
    assert {k: v for k, v in metadata.items() if k != "checkpoint"} == {
        k: v for k, v in expected_metadata.items() if k != "checkpoint"}
    assert not list(out.glob(".extract/shard-*/*_units/layer_*.jsonl"))  # the parts' rows live in codebook_units/ now


def _stamps(out: Path, names) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("layer_*/*.npy") if p.stem in names}


def _names(manifest: Path, shard: Shard) -> set[str]:
    entries = read_manifest(manifest)
    return {entries.fileids[i] for i in np.flatnonzero(shard.members(entries.num_samples))}


def test_the_parts_take_every_utterance_once_with_nearly_equal_audio():
    lengths = np.random.default_rng(0).lognormal(11, 1, size=1000).astype(np.int64)
    for count in (1, 2, 3, 7, 1001):
        members = np.stack([Shard(k, count).members(lengths) for k in range(1, count + 1)])
        assert (members.sum(axis=0) == 1).all()
        totals = [lengths[m].sum() for m in members]
        assert max(totals) - min(totals) <= lengths.max()  # within one file of each other
    assert parse_shard("3/8") == Shard(3, 8)
    assert str(Shard(3, 12)) == "3/12"
    assert Shard(3, 12).folder_name == "shard-03-of-12"
    for text in ("0/3", "4/3", "3", "a/b", "-1/2", "1/0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shard(text)


def test_parts_run_in_any_order_leave_what_the_whole_extraction_leaves(manifest, whole, tmp_path):
    out = tmp_path / "out"
    last = _part(manifest, out, Shard(3, 3))
    assert last.metadata is None
    assert last.unfinished == (Shard(1, 3), Shard(2, 3))
    assert last.num_files == len(_names(manifest, Shard(3, 3)))
    with pytest.raises(ValueError, match="unfinished spidr extract run"):
        refuse_unfinished_extraction(out / "layer_01")  # kmeans, units and abx refuse it until every part is done
    assert _part(manifest, out, Shard(1, 3)).unfinished == (Shard(2, 3),)
    assert not (out / "metadata.json").exists()
    last = _part(manifest, out, Shard(2, 3))
    assert last.unfinished == ()
    assert last.metadata == json.loads((out / "metadata.json").read_text())
    _assert_same_outputs(out, whole)
    refuse_unfinished_extraction(out / "layer_01")
    stamps = _stamps(out, _names(manifest, Shard(1, 3)))
    again = _part(manifest, out, Shard(1, 3))  # a rerun of a part of the finished extraction: nothing to do
    assert again.metadata == last.metadata
    assert not again.wrote_metadata
    assert again.finished_before
    assert again.unfinished == ()
    assert _stamps(out, _names(manifest, Shard(1, 3))) == stamps
    _assert_same_outputs(out, whole)


def _part_script(manifest: Path, out: Path, shard: Shard, *, die_after_batches: int | None = None,
                 restart: bool = False, go: Path | None = None) -> list[str]:
    """A command running ``shard`` in a child (which SIGKILLs itself when its batch ``die_after_batches + 1``
    starts; whose first batch waits for the file ``go`` to exist); it prints its outcome as JSON."""
    script = textwrap.dedent(f"""
        import json, os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_extract_parts as t
        from spidr.eval import folder_extraction
        from spidr.eval.shards import Shard

        real, calls = folder_extraction.extract_padded_batch, []
        def watched(*args, **kwargs):
            calls.append(1)
            if {die_after_batches!r} is not None and len(calls) > {die_after_batches!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            while {str(go) if go else None!r} is not None and not os.path.exists({str(go)!r}):
                time.sleep(0.05)
            return real(*args, **kwargs)
        folder_extraction.extract_padded_batch = watched
        outcome = t._part(t.Path({str(manifest)!r}), t.Path({str(out)!r}), Shard({shard.index}, {shard.count}),
                          restart={restart!r})
        print(json.dumps({{"finished": outcome.metadata is not None, "unfinished": len(outcome.unfinished),
                           "wrote": outcome.wrote_metadata, "before": outcome.finished_before}}))
    """)
    return [sys.executable, "-c", script]


def _wait_until(condition, what: str, timeout: float = 240.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.05)


CHILD_ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("restart", [False, True])
def test_parts_started_at_once_in_separate_processes(manifest, whole, tmp_path, restart):
    """Started together (a SLURM array, torchrun; with --restart, in a folder that holds a finished extraction):
    they set up one folder without starting it over under each other, and one of them joins the units and writes
    the metadata."""
    out = tmp_path / "out"
    if restart:
        for k in (1, 2, 3):
            _part(manifest, out, Shard(k, 3))
    children = [subprocess.Popen(_part_script(manifest, out, Shard(k, 3), restart=restart), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=CHILD_ENV) for k in (1, 2, 3)]
    results = [(*child.communicate(timeout=300), child.returncode) for child in children]
    for _stdout, stderr, code in results:
        assert code == 0, stderr[-3000:]
    outcomes = [json.loads(stdout.splitlines()[-1]) for stdout, _, _ in results]
    assert sum(o["wrote"] for o in outcomes) == 1
    assert all(o["finished"] or o["unfinished"] for o in outcomes)
    _assert_same_outputs(out, whole)


def test_parts_that_end_together_join_once(manifest, whole, tmp_path):
    """Both parts done before either takes the folder to join: the second one found the first one's join and
    joined again, from the parts' units files that the first had removed (an error sending the user to a restart
    that wiped every part). It now sees the finished extraction."""
    from spidr.eval.journal import part_states

    out, go = tmp_path / "out", tmp_path / "go"
    children = [subprocess.Popen(_part_script(manifest, out, Shard(k, 2), go=go), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=CHILD_ENV) for k in (1, 2)]
    try:
        from spidr.folder_lock import lock_holder

        _wait_until(lambda: all(lock_holder(out / ".extract" / f"shard-{k}-of-2") for k in (1, 2)),
                    "both parts to start")
        lengths = read_manifest(manifest).num_samples
        with folder_lock(out, "the test"):
            go.touch()
            _wait_until(lambda: all(state.done[part.members(lengths)].all()
                                    for part, state in part_states(out, 2, NUM_FILES).items()),
                        "both parts to end their last batch")
    finally:
        results = [(*child.communicate(timeout=300), child.returncode) for child in children]
    for _stdout, stderr, code in results:
        assert code == 0, stderr[-3000:]
    outcomes = [json.loads(stdout.splitlines()[-1]) for stdout, _, _ in results]
    assert sorted(o["wrote"] for o in outcomes) == [False, True]
    assert all(o["finished"] for o in outcomes)
    assert not any(o["before"] for o in outcomes)  # (both extracted their part: neither found it done before)
    _assert_same_outputs(out, whole)


def test_a_part_not_begun_yet_can_be_restarted(manifest, whole, tmp_path):
    out = tmp_path / "out"
    _part(manifest, out, Shard(1, 3))
    assert _part(manifest, out, Shard(2, 3), restart=True).unfinished == (Shard(3, 3),)
    assert _part(manifest, out, Shard(3, 3), restart=True).wrote_metadata
    _assert_same_outputs(out, whole)


def test_a_restart_killed_while_removing_leaves_no_folder_taken_for_finished(manifest, tmp_path, monkeypatch):
    """Starting over removed the outputs before metadata.json and state.json: killed in between (minutes on a real
    corpus), a plain rerun found the finished extraction, its features gone."""
    import shutil

    out = tmp_path / "out"
    _part(manifest, out, Shard(1, 2))
    _part(manifest, out, Shard(2, 2))

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            _part(manifest, out, Shard(1, 2), restart=True)
    with pytest.raises(ValueError, match="but no record of the extraction that wrote them"):
        _part(manifest, out, Shard(1, 2))


def test_units_files_of_the_parts_left_by_a_kill_after_the_join_are_removed(manifest, whole, tmp_path, monkeypatch):
    from spidr.eval import journal

    out = tmp_path / "out"
    _part(manifest, out, Shard(1, 2))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(journal, "remove_part_units", killed)
        with pytest.raises(KeyboardInterrupt):
            _part(manifest, out, Shard(2, 2))
    assert (out / "metadata.json").is_file()
    assert list(out.glob(".extract/shard-*/*_units/layer_*.jsonl"))
    assert not _part(manifest, out, Shard(1, 2)).wrote_metadata
    _assert_same_outputs(out, whole)


def test_a_killed_part_resumes_and_leaves_the_other_parts_alone(manifest, whole, tmp_path):
    out = tmp_path / "out"
    assert _part(manifest, out, Shard(1, 2)).unfinished == (Shard(2, 2),)
    stamps = _stamps(out, _names(manifest, Shard(1, 2)))
    killed = subprocess.run(_part_script(manifest, out, Shard(2, 2), die_after_batches=2), capture_output=True,
                            text=True, env=CHILD_ENV, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = _stamps(out, _names(manifest, Shard(2, 2)))
    assert len(done) == 2 * len(SETTINGS["layers"])  # its two finished batches' files
    assert _part(manifest, out, Shard(2, 2)).unfinished == ()
    assert {p: s for p, s in _stamps(out, _names(manifest, Shard(2, 2))).items() if p in done} == done
    assert _stamps(out, _names(manifest, Shard(1, 2))) == stamps
    _assert_same_outputs(out, whole)


def test_restart_starts_one_part_over_or_everything_in_a_finished_folder(manifest, whole, tmp_path, caplog):
    out = tmp_path / "out"
    _part(manifest, out, Shard(1, 3))
    _part(manifest, out, Shard(2, 3))
    first, second = _stamps(out, _names(manifest, Shard(1, 3))), _stamps(out, _names(manifest, Shard(2, 3)))
    with caplog.at_level(logging.WARNING, logger="spidr"):
        assert _part(manifest, out, Shard(2, 3), restart=True).unfinished == (Shard(3, 3),)
    assert "starts the whole extraction over" not in caplog.text
    assert _stamps(out, _names(manifest, Shard(1, 3))) == first
    redone = _stamps(out, _names(manifest, Shard(2, 3)))
    assert redone.keys() == second.keys()
    assert all(redone[p] != second[p] for p in second)
    _part(manifest, out, Shard(3, 3))
    _assert_same_outputs(out, whole)  # part 2's rows are in once
    # In a finished folder a restart means the extraction: every part starts over.
    with caplog.at_level(logging.WARNING, logger="spidr"):
        assert _part(manifest, out, Shard(1, 3), restart=True).unfinished == (Shard(2, 3), Shard(3, 3))
    assert "holds a finished extraction: --restart with part 1/3 starts the whole extraction over" in caplog.text
    assert not (out / "metadata.json").exists()
    assert {p.stem for p in out.glob("layer_01/*.npy")} == _names(manifest, Shard(1, 3))
    _part(manifest, out, Shard(3, 3))
    _part(manifest, out, Shard(2, 3))
    _assert_same_outputs(out, whole)


def test_a_running_part_is_neither_run_twice_nor_removed(manifest, tmp_path):
    out = tmp_path / "out"
    _part(manifest, out, Shard(1, 2))
    files = sorted(out.rglob("*"))
    running = f"part 1/2 of the extraction into {out} is being run by process {os.getpid()}"
    with folder_lock(out / ".extract" / "shard-1-of-2", "a running part"):
        with pytest.raises(ValueError, match=running):
            _part(manifest, out, Shard(1, 2), restart=True)
        removal = f"shard-1-of-2 of the extraction into {out} is being run by process {os.getpid()}"
        with pytest.raises(ValueError, match=removal):  # another extraction would start the folder over
            extract_to_directory(_model(), read_manifest(manifest), out, ExtractionSettings(**SETTINGS),
                                 progress=False, restart=True)
        with pytest.raises(ValueError, match=removal):
            _part(manifest, out, Shard(1, 3), restart=True)
    assert sorted(out.rglob("*")) == files


def test_another_number_of_parts_is_refused_naming_it(manifest, tmp_path):
    out = tmp_path / "out"
    _part(manifest, out, Shard(2, 2))
    with pytest.raises(ValueError, match=r"holds an extraction with other parts \(2 → 3"):
        _part(manifest, out, Shard(1, 3))
    with pytest.raises(ValueError, match=r"holds an extraction with other parts \(2 → 1"):
        extract_to_directory(_model(), read_manifest(manifest), out, ExtractionSettings(**SETTINGS), progress=False)


def test_every_part_s_skipped_files_reach_the_metadata(manifest, tmp_path):
    """Two unreadable files, the longest two, fall in different parts: the metadata lists both; with every file
    unreadable, the last part fails as one whole extraction does, and leaves no metadata."""
    corpus = tmp_path
    header, *rows = manifest.read_text().splitlines()
    lines = [header, *(f"{name},{manifest.parent / path},{length}" for name, path, length in
                       (row.split(",") for row in rows))]
    for name in ("bad1", "bad2"):
        (corpus / f"{name}.wav").write_bytes(b"not audio at all")
    (tmp_path / "m.csv").write_text("\n".join([*lines, f"bad1,{corpus}/bad1.wav,90000",
                                               f"bad2,{corpus}/bad2.wav,80000"]) + "\n")
    out = tmp_path / "out"
    first = _part(tmp_path / "m.csv", out, Shard(1, 2))
    second = _part(tmp_path / "m.csv", out, Shard(2, 2))
    assert list(first.skipped) == [f"{corpus}/bad1.wav"]
    assert list(second.skipped) == [f"{corpus}/bad2.wav"]
    metadata = json.loads((out / "metadata.json").read_text())
    assert sorted(metadata["skipped"]) == [f"{corpus}/bad1.wav", f"{corpus}/bad2.wav"]
    assert metadata["num_files"] == NUM_FILES
    (tmp_path / "bad.csv").write_text("\n".join([lines[0], f"bad1,{corpus}/bad1.wav,90000",
                                                 f"bad2,{corpus}/bad2.wav,80000"]) + "\n")
    _part(tmp_path / "bad.csv", tmp_path / "bad", Shard(1, 2))
    with pytest.raises(ValueError, match="none of the 2 files could be read"):
        _part(tmp_path / "bad.csv", tmp_path / "bad", Shard(2, 2))
    assert not (tmp_path / "bad" / "metadata.json").exists()


def test_parts_that_read_nothing_and_end_together_both_refuse(tmp_path, monkeypatch):
    """Every file unreadable, both parts done before either joins: the one that joined first refused and removed the
    extraction (journals included); the other then found no journal, reported every part "not finished yet" (its own
    too) and succeeded, with OUT/.lock left behind. Here part 1 runs whole just after part 2 journals its file."""
    from spidr.eval import journal as journals

    for name in ("bad1", "bad2"):
        (tmp_path / f"{name}.wav").write_bytes(b"not audio at all")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"fileid,path,num_samples\nbad1,{tmp_path}/bad1.wav,90000\nbad2,{tmp_path}/bad2.wav,80000\n")
    out, first_part = tmp_path / "out", []
    real_record = journals.ExtractionJournal.record

    def record_then_the_other_part_runs(self, *args, **kwargs):
        real_record(self, *args, **kwargs)
        if not first_part:
            first_part.append("running")
            with pytest.raises(ValueError, match="none of the 2 files could be read") as refused:
                _part(bad, out, Shard(1, 2))
            first_part.append(str(refused.value))

    monkeypatch.setattr(journals.ExtractionJournal, "record", record_then_the_other_part_runs)
    with pytest.raises(ValueError, match="removed by another of its parts, which found that none of the 2 files"):
        _part(bad, out, Shard(2, 2))
    assert len(first_part) == 2
    assert not out.exists()  # (made by the parts, holding nothing: gone, lock included)


def test_under_torchrun_or_srun_each_process_takes_its_rank_s_part_and_gpu(monkeypatch):
    import torch

    def part(env, shard=None, device="cpu"):
        return launcher_part(argparse.Namespace(shard=shard, device=device), env)

    assert part({}) == (WHOLE, "cpu")
    assert part({}, Shard(2, 3)) == (Shard(2, 3), "cpu")
    torchrun = {"LOCAL_RANK": "1", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert part(torchrun) == (Shard(4, 4), "cpu")
    srun = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_STEP_NUM_TASKS": "3", "SLURM_LOCALID": "0"}
    assert part(srun) == (Shard(3, 3), "cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert part({**torchrun, "LOCAL_RANK": "3"}, device="cuda") == (Shard(4, 4), "cuda:1")
    with pytest.raises(ValueError, match="leave --shard out"):
        part(torchrun, Shard(1, 4))


def test_the_command_says_which_parts_are_left(manifest, whole, tmp_path, capsys):
    from spidr.cli import main

    export_safetensors(_model(), tmp_path / "tiny.safetensors")
    base = ["extract", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--manifest", str(manifest),
            "--layers", "1,3", "--codebooks", "--batch-seconds", "0.3", "--device", "cpu", "--out",
            str(tmp_path / "out")]
    assert main([*base, "--shard", "2/2"]) == 0
    printed = capsys.readouterr().out
    assert f"part 2/2: wrote features of {len(_names(manifest, Shard(2, 2)))} files" in printed
    assert "part(s) 1/2 not finished yet: the last part to finish writes" in printed
    assert main([*base, "--shard", "1/2"]) == 0
    own = len(_names(manifest, Shard(1, 2)))  # (it said "wrote ... of 9 files": the joined total)
    assert (f"part 1/2, the last one: wrote features of {own} files, and joined all parts: {tmp_path / 'out'} holds "
            f"the features of {NUM_FILES} files") in capsys.readouterr().out
    assert main([*base, "--shard", "2/2"]) == 0
    assert "part 2/2: nothing left to do: " in capsys.readouterr().out
    _assert_same_outputs(tmp_path / "out", whole, exact=False)


@pytest.mark.slow
def test_torchrun_extracts_one_part_per_process(manifest, whole, tmp_path):
    export_safetensors(_model(), tmp_path / "tiny.safetensors")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "spidr", "extract",
               "--checkpoint", str(tmp_path / "tiny.safetensors"), "--manifest", str(manifest), "--layers", "1,3",
               "--codebooks", "--batch-seconds", "0.3", "--device", "cpu", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the last one: wrote features of" in result.stdout
    assert "holds the features of 9 files" in result.stdout
    _assert_same_outputs(tmp_path / "out", whole, exact=False)
    assert sorted(p.name for p in (tmp_path / "out" / ".extract").iterdir()) == [
        "shard-1-of-2", "shard-2-of-2", "state.json"]


def test_a_part_lets_go_of_its_own_lock_before_the_folder_s(manifest, tmp_path, monkeypatch):
    """A restart that waited for the folder while the last part joined the units then found that part still
    holding its lock, and was refused: the part's lock now goes first."""
    import contextlib

    from spidr.eval import folder_extraction
    from spidr.folder_lock import lock_holder

    real, held_at_release = folder_extraction.folder_lock, []

    @contextlib.contextmanager
    def watched(folder, what, **options):
        with real(folder, what, **options):
            yield
            held_at_release.append(lock_holder(tmp_path / "out" / ".extract" / "shard-2-of-2"))

    monkeypatch.setattr(folder_extraction, "folder_lock", watched)
    _part(manifest, tmp_path / "out", Shard(1, 2))
    _part(manifest, tmp_path / "out", Shard(2, 2))
    # part 1: set-up (its own part, not yet begun there), end; part 2: set-up (its lock held), end (released)
    assert held_at_release == [None, None, f"process {os.getpid()}", None]


def test_parts_join_k_means_units_as_one_whole_extraction_writes_them(manifest, tmp_path):
    """K-means units (layer 2, features not written) from parts: joined into kmeans_units/ with their record, as
    one whole extraction writes them; other centroids are another extraction, refused by name."""
    import torch

    from spidr.eval.feature_dir import recorded_num_units
    from spidr.eval.folder_extraction import KMeansUnits
    from spidr.eval.units import read_units

    settings = ExtractionSettings(layers=(), batch_seconds=0.3)
    centroids = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    kmeans = [KMeansUnits(2, centroids, "c.safetensors")]
    extract_to_directory(_model(), read_manifest(manifest), tmp_path / "whole", settings, progress=False,
                         kmeans=kmeans)
    for k in (2, 1):
        extract_part(_model(), read_manifest(manifest), tmp_path / "parts", settings, Shard(k, 2), progress=False,
                     kmeans=kmeans)
    whole, parts = (tmp_path / name / "kmeans_units" / "layer_02.jsonl" for name in ("whole", "parts"))
    expected, got = read_units(whole), read_units(parts)
    assert len(got) == NUM_FILES
    assert got.keys() == expected.keys()
    for name, units in got.items():
        np.testing.assert_array_equal(units, expected[name])
    assert recorded_num_units(parts)[0] == 6
    assert not list((tmp_path / "parts").glob("layer_*"))
    assert not list((tmp_path / "parts").glob(".extract/shard-*/*_units/*"))
    with pytest.raises(ValueError, match=r"other k-means units \(layer 2: centroids → other centroids\)"):
        extract_part(_model(), read_manifest(manifest), tmp_path / "parts", settings, Shard(1, 2), progress=False,
                     kmeans=[KMeansUnits(2, centroids + 1, "c.safetensors")])


def test_the_split_is_the_documented_rule_with_ties_in_manifest_order():
    """Part K takes every N-th utterance by decreasing length from the K-th longest; equal lengths keep manifest
    order, so every process (whatever its numpy build or CPU) computes the same parts."""
    lengths = np.random.default_rng(1).integers(0, 3, size=50) * 1000
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for count in (2, 3):
        for k in range(1, count + 1):
            expected = np.zeros(len(lengths), dtype=bool)
            expected[order[k - 1::count]] = True
            np.testing.assert_array_equal(Shard(k, count).members(lengths), expected)
    for text in ("a/b", "+1/2", "1_0/20"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected K/N"):
            parse_shard(text)


def test_a_finished_part_is_not_the_last_while_another_is_half_done(manifest, tmp_path, monkeypatch):
    from spidr.eval import folder_extraction

    out = tmp_path / "out"
    assert _part(manifest, out, Shard(1, 2)).unfinished == (Shard(2, 2),)
    real, calls = folder_extraction.extract_padded_batch, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(folder_extraction, "extract_padded_batch", failing)
        with pytest.raises(RuntimeError, match="killed"):
            _part(manifest, out, Shard(2, 2))  # one batch of part 2 journaled
    again = _part(manifest, out, Shard(1, 2))
    assert again.metadata is None
    assert again.unfinished == (Shard(2, 2),)
    assert not (out / "metadata.json").exists()


def test_a_finished_folder_refuses_a_part_with_other_settings(manifest, tmp_path):
    out = tmp_path / "out"
    _part(manifest, out, Shard(1, 2))
    _part(manifest, out, Shard(2, 2))
    with pytest.raises(ValueError, match=r"holds an extraction with other settings \(layers"):
        extract_part(_model(), read_manifest(manifest), out, ExtractionSettings(**{**SETTINGS, "layers": (1,)}),
                     Shard(1, 2), progress=False)


def test_a_part_s_missing_units_file_is_named_when_the_last_part_joins(manifest, tmp_path):
    out = tmp_path / "out"
    _part(manifest, out, Shard(1, 2))
    (out / ".extract" / "shard-1-of-2" / "codebook_units" / "layer_03.jsonl").unlink()
    with pytest.raises(ValueError, match=r"shard-1-of-2/codebook_units/layer_03.jsonl is missing or shorter than"):
        _part(manifest, out, Shard(2, 2))
    assert not (out / "metadata.json").exists()


def test_a_part_whose_files_are_all_unreadable_keeps_the_other_part_s_units(manifest, tmp_path):
    header, *rows = manifest.read_text().splitlines()
    good = rows[0].split(",")
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    (tmp_path / "m.csv").write_text(f"{header}\nbad,{tmp_path}/bad.wav,90000\n"
                                    f"{good[0]},{manifest.parent / good[1]},{good[2]}\n")
    out = tmp_path / "out"
    assert list(_part(tmp_path / "m.csv", out, Shard(1, 2)).skipped) == [f"{tmp_path}/bad.wav"]  # the longest
    _part(tmp_path / "m.csv", out, Shard(2, 2))
    units = sorted((out / "codebook_units").glob("layer_*.jsonl"))
    assert [p.name for p in units] == ["layer_02.jsonl", "layer_03.jsonl"]
    for path in units:
        assert [json.loads(r)["name"] for r in path.read_text().splitlines()] == [good[0]]


def test_each_process_takes_the_gpu_of_its_local_rank_and_an_explicit_gpu_stays(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    srun = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0"}
    assert launcher_part(argparse.Namespace(shard=None, device="cuda"), srun) == (Shard(4, 4), "cuda:0")
    torchrun = {"LOCAL_RANK": "1", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert launcher_part(argparse.Namespace(shard=None, device="cuda:0"), torchrun) == (Shard(4, 4), "cuda:0")


def test_the_last_part_joins_only_under_the_folder_s_lock(manifest, tmp_path):
    """The join reads every part's journal and units: while another process holds the folder (a part setting up,
    another joining), the last part waits."""
    out = tmp_path / "out"
    _part(manifest, out, Shard(1, 2))
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_extract_parts as t
        from pathlib import Path
        from spidr.eval import folder_extraction
        from spidr.eval.shards import Shard
        real = folder_extraction._extract_entries
        def then_wait(*args, **kwargs):
            real(*args, **kwargs)
            Path({str(tmp_path / "extracted")!r}).touch()
            while not Path({str(tmp_path / "go")!r}).exists():
                time.sleep(0.05)
        folder_extraction._extract_entries = then_wait
        t._part(Path({str(manifest)!r}), Path({str(out)!r}), Shard(2, 2))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env=CHILD_ENV, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(lambda: (tmp_path / "extracted").exists() or child.poll() is not None, "part 2's last batch")
        assert child.poll() is None, child.stderr.read()
        with folder_lock(out, "a test holding the bookkeeping"):
            (tmp_path / "go").touch()
            import time

            time.sleep(2)
            assert child.poll() is None  # it waits for the folder
            assert not (out / "metadata.json").exists()
    finally:
        code = child.wait(timeout=240)
    assert code == 0, child.stderr.read()
    assert (out / "metadata.json").is_file()


def test_the_join_holds_each_part_s_own_utterances_only(manifest, tmp_path):
    """The last part read every part's journal as an (N,) array: 1,000 parts of a 300k-file corpus held 300 MB.
    With part_of, each state keeps its part's utterances, in order, and tells the same progress."""
    from spidr.eval.journal import part_states
    from spidr.eval.shards import part_numbers

    out = tmp_path / "out"
    _part(manifest, out, Shard(2, 3))
    lengths = read_manifest(manifest).num_samples
    numbers = part_numbers(lengths, 3)
    whole_states = part_states(out, 3, NUM_FILES)
    own = part_states(out, 3, NUM_FILES, part_of=numbers)
    for part, state in own.items():
        assert state.done.shape == ((numbers == part.index).sum(),)
        np.testing.assert_array_equal(state.done, whole_states[part].done[numbers == part.index])
        assert state.done.all() == (part == Shard(2, 3))
        assert state.units_bytes == whole_states[part].units_bytes


def test_part_k_starts_with_the_k_th_longest_utterance():
    """mut H01 (utterances dealt shortest first). The shards module docstring: part K of N takes every N-th
    utterance in order of decreasing length, starting with the K-th longest. Truth by hand: lengths 10, 30, 20, 40
    in 2 parts: decreasing 40, 30, 20, 10 → parts 1, 2, 1, 2 (shortest first would give the reverse)."""
    from spidr.eval.shards import Shard, part_numbers

    lengths = np.array([10, 30, 20, 40])
    assert part_numbers(lengths, 2).tolist() == [2, 2, 1, 1]
    assert np.flatnonzero(Shard(2, 2).members(lengths)).tolist() == [0, 1]


def test_joined_units_hold_each_part_s_rows_cut_at_its_journaled_size(tmp_path):
    # mutant: _copy_bytes reading whole chunks, past the size. Truth (join_part_units): each part's rows "cut at its
    # journaled size": rows a part appended after its last journal line (a batch cut short) are not joined.
    first, second = every_part(2)
    rows = {first: ['{"a": [1, 2]}\n', '{"cut": [9]}\n'], second: ['{"b": [3]}\n', '{"c": [4, 5]}\n']}
    states = {}
    for part, lines in rows.items():
        path = tmp_path / STATE_DIR / part.folder_name / "codebook_units" / "layer_02.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(lines))
        journaled = len(lines[0]) if part is first else len("".join(lines))
        states[part] = JournalState(np.ones(2, dtype=bool), {}, {"layer_02": journaled})
    join_part_units(tmp_path, states)
    assert (tmp_path / "codebook_units" / "layer_02.jsonl").read_text() == (
        '{"a": [1, 2]}\n{"b": [3]}\n{"c": [4, 5]}\n')
