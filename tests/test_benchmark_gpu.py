"""benchmarks/gpu.py, the one-shot GPU benchmark, in its ``--smoke`` mode on the CPU: every job's row holds finite
positive numbers, a failing job leaves the others running, and a job past its time limit is killed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

MODEL_FIELDS = ("audio_s_per_s", "median_step_s", "audio_s_per_step", "mfu_issue", "mfu_counted",
                "gflop_per_audio_s_counted", "peak_mem_gib")
LOADER_FIELDS = ("audio_s_per_s", "median_step_s", "audio_s_per_step", "first_batch_s")
EXTRACT_FIELDS = ("audio_s_per_s", "median_step_s", "audio_s_per_step", "fp32_audio_s_per_s", "autocast_audio_s_per_s",
                  "bf16_max_relative_error", "autocast_max_relative_error", "peak_mem_gib")


@pytest.fixture(scope="module")
def gpu():
    """benchmarks/gpu.py as a module (it imports its sibling benchmark modules, hence the path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("gpu_benchmark", BENCHMARKS / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def check_row(row: dict) -> None:
    assert "error" not in row, row.get("error")
    fields = {"loader": LOADER_FIELDS, "extract": EXTRACT_FIELDS}.get(
        row["job"], MODEL_FIELDS + (("compile_s",) if row["compile"] else ()))
    for name in fields:
        assert math.isfinite(row[name]), (row["job"], name, row[name])
        assert row[name] > 0, (row["job"], name, row[name])


def run_smoke(gpu, tmp_path: Path, capsys, jobs: list[str]) -> tuple[list[dict], str]:
    out = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--jobs", *jobs, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    return json.loads(out.read_text())["jobs"], table


def test_smoke_eager_jobs_and_loader(gpu, tmp_path, capsys):
    rows, table = run_smoke(gpu, tmp_path, capsys, ["spidr", "dinosr", "loader", "spidr-host-reads"])
    assert [row["job"] for row in rows] == ["spidr", "dinosr", "spidr-host-reads", "loader"]
    for row in rows:
        check_row(row)
        assert f"| {row['name']} | " in table
    assert "989 TFLOP/s" in table  # the peak used is printed
    spidr = rows[0]
    assert spidr["timed_steps"] == 2
    assert spidr["audio_s_per_step"] == pytest.approx(4.0)  # 2 rows × 2 s crops (the smoke batch limit)


def test_smoke_extraction_job(gpu, tmp_path, capsys):
    """The extraction row: bf16 as ``spidr extract --dtype bfloat16`` runs it, float32 and all-bf16 autocast side by
    side; the float32 input path keeps the features nearer float32's than plain autocast does. K-means units of one
    layer alone, assigned where the model runs and on the host, timed side by side."""
    assert "extract" in gpu.DEFAULT_JOBS
    rows, table = run_smoke(gpu, tmp_path, capsys, ["extract"])
    (row,) = rows
    check_row(row)
    assert row["files"] == 4
    assert row["timed_steps"] == 2
    assert row["bf16_max_relative_error"] < 1e-2
    assert row["autocast_max_relative_error"] > row["bf16_max_relative_error"]
    assert "| SpidR base, extraction, bf16 | bfloat16 | " in table
    assert "all-bf16 autocast" in table
    # k-means units of the middle layer alone: on the device and on the host, the same units
    assert row["kmeans_layer"] == 1
    assert row["kmeans_units_equal"] is True
    assert row["kmeans_audio_s_per_s"] > 0
    assert row["kmeans_host_audio_s_per_s"] > 0
    assert 0 <= row["kmeans_float64_share"] < 0.5
    assert "k-means units of layer 1 (" in table
    assert "; units equal" in table


def test_smoke_channels_last_job_forces_the_layout_for_its_own_run_only(gpu, tmp_path, capsys):
    from spidr.models import components

    original = components.conv_layout
    with gpu.front_end_layout("channels_last"):
        assert components.conv_layout(torch.zeros(1, 400), True) == "channels_last"  # fp32: "dense" otherwise
    assert components.conv_layout is original
    assert "spidr-channels-last" not in gpu.DEFAULT_JOBS  # a CUDA experiment, run when named
    rows, table = run_smoke(gpu, tmp_path, capsys, ["spidr-channels-last", "spidr"])
    assert [row["job"] for row in rows] == ["spidr", "spidr-channels-last"]
    for row in rows:
        check_row(row)
    assert "| SpidR base, bf16, front end channels last | " in table
    assert components.conv_layout is original


@pytest.mark.slow  # ≈ 20 s on 2 busy cores: torch.compile traces both models (with the 'eager' backend)
def test_smoke_compiled_jobs(gpu, tmp_path, capsys):
    """Both compiled rows; the SpidR one takes the FLOP count of its eager twin, measured just before (same model,
    same batches), instead of spending its time limit on eager counting steps; DinoSR's twin did not run."""
    try:
        rows, table = run_smoke(gpu, tmp_path, capsys, ["spidr-compile", "dinosr-compile", "spidr"])
    finally:
        torch._dynamo.reset()  # no compiled code left behind for the other tests
    assert [row["job"] for row in rows] == ["spidr", "spidr-compile", "dinosr-compile"]
    for row in rows:
        check_row(row)
        assert f"| {row['name']} | " in table
    eager, compiled, dinosr = rows
    assert compiled["gflop_per_audio_s_counted"] == eager["gflop_per_audio_s_counted"]
    assert compiled["counted_by"] == eager["name"]
    assert "counted_by" not in dinosr
    assert f"FLOPs as counted by {eager['name']}" in table


def test_a_compiled_job_reuses_only_its_eager_twin_s_count(gpu):
    rows = {"spidr": {"gflop_per_audio_s_counted": 61.5}, "dinosr": {"error": "failed"}}
    assert gpu.twin_flop_count("spidr-compile", rows) == 61.5
    assert gpu.twin_flop_count("dinosr-compile", rows) is None  # its twin failed: it counts for itself
    assert gpu.twin_flop_count("spidr-host-reads", rows) is None  # not compiled: counts its own step
    assert gpu.twin_flop_count("spidr-compile", {}) is None


def test_a_failing_job_leaves_the_others_running(gpu, tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu, "model_job", boom)
    rows, table = run_smoke(gpu, tmp_path, capsys, ["spidr", "loader"])
    assert "RuntimeError" in rows[0]["error"]
    assert "out of memory" in rows[0]["error"]
    check_row(rows[1])
    assert "| SpidR base, bf16 | – |" in table
    assert "failed: RuntimeError" in table


def test_isolated_job(gpu, tmp_path):
    manifest = gpu.write_corpus(tmp_path, files=4, copies=2, audio_format="wav")
    row = gpu.run_job_isolated("loader", ["--smoke"], manifest, timeout=120)
    check_row(row)


def test_isolated_job_is_killed_at_its_time_limit(gpu, tmp_path):
    row = gpu.run_job_isolated("spidr", ["--smoke"], tmp_path / "absent.csv", timeout=1.0)
    assert row["error"].startswith("killed at its 1 s time limit")


def test_a_job_killed_only_while_exiting_keeps_its_measurement(gpu):
    measured = {"job": "spidr", "stage": "done", "audio_s_per_s": 2900.0}
    kept = gpu.judge_exit(dict(measured), None, 60.0)
    assert "error" not in kept
    assert kept["note"] == "measured, then killed at its 60 s time limit while exiting"
    assert gpu.judge_exit({"job": "spidr", "stage": "timed steps"}, None, 60.0)["error"] == (
        "killed at its 60 s time limit during timed steps")
    assert gpu.judge_exit(dict(measured), 0, 60.0) == measured
    assert "exited with code 1" in gpu.judge_exit({"job": "spidr", "stage": "set-up"}, 1, 60.0)["error"]
    # measured, then a crash while tearing down (CUDA, compile or loader workers): the row is kept, with a note
    crashed = gpu.judge_exit(dict(measured), -6, 60.0)
    assert "error" not in crashed
    assert crashed["note"] == "measured, then exited with code -6 (teardown)"


def test_the_mfu_peak_follows_the_device_name(gpu):
    """An H100 lent as "about 78 GiB" may be the PCIe card (756 TFLOP/s): its MFU was divided by the SXM peak."""
    assert gpu.peak_for("NVIDIA H100 PCIe")[0] == 756.0
    assert gpu.peak_for("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert gpu.peak_for("NVIDIA H200")[0] == 989.0
    peak, source = gpu.peak_for("")
    assert (peak, source.startswith("assumed: no GPU")) == (989.0, True)
    assert gpu.parse_args(["--smoke", "--peak-tflops", "500"]).peak_source == "given with --peak-tflops"


def test_an_error_without_a_message_is_reported_not_a_crash_of_the_handler(gpu, tmp_path, monkeypatch):
    """A bare AssertionError (Dynamo's) made the handler itself raise IndexError: no row, and without isolation
    no table at all."""
    def failing(*args, **kwargs):
        raise AssertionError

    monkeypatch.setattr(gpu, "model_job", failing)
    args = gpu.parse_args(["--smoke", "--jobs", "spidr", "--manifest", str(tmp_path / "m.csv"), "--result",
                           str(tmp_path / "r.json")])
    report = gpu.run_job_here("spidr", args)
    assert report["error"] == "AssertionError during start: AssertionError()"


def test_the_json_holds_the_rows_measured_so_far_after_each_job(gpu, tmp_path, capsys, monkeypatch):
    """A run killed at the lent machine's wall-clock limit kept no row: the JSON was written once, at the end."""
    out = tmp_path / "gpu.json"
    seen = []
    real_run_job_here = gpu.run_job_here

    def run_and_look(job, args):
        seen.append(json.loads(out.read_text()) if out.exists() else None)
        return real_run_job_here(job, args)

    monkeypatch.setattr(gpu, "run_job_here", run_and_look)
    assert gpu.main(["--smoke", "--jobs", "spidr", "loader", "--json", str(out)]) == 0
    assert seen[0] is None
    assert (seen[1]["complete"], [row["job"] for row in seen[1]["jobs"]]) == (False, ["spidr"])
    assert "| SpidR base, bf16 |" in seen[1]["table"]
    final = json.loads(out.read_text())
    assert (final["complete"], [row["job"] for row in final["jobs"]]) == (True, ["spidr", "loader"])
    assert capsys.readouterr().out.strip() == final["table"]


def test_a_compiled_job_that_recompiles_for_every_shape_stops_with_the_reason(gpu):
    """torch 2.13's inductor specialised the conv backward on the frame count: each warm-up step compiled again, and
    the job would have spent its whole time limit compiling, its row saying only "killed during warm-up"."""
    from spidr.data.collate import Batch

    batches = [Batch(torch.zeros(2, length), torch.full((2,), length), None, torch.zeros(2, 1, dtype=torch.bool), [])
               for length in (16000, 17000, 18000, 19000)]
    gpu.check_not_recompiling_per_shape([0, 1, 1, 1, 1], batches)  # one graph for every shape: fine
    gpu.check_not_recompiling_per_shape([0, 1, 2, 2, 3], batches)  # a second graph now and then: fine
    gpu.check_not_recompiling_per_shape([0, 1, 2, 3], batches)  # too early to say
    gpu.check_not_recompiling_per_shape([None, None, None, None, None], batches)  # the counter moved: no check
    with pytest.raises(RuntimeError, match=r"compiled a new graph at each of the last 3 steps \(4 in all over "
                                           r"batches of 4 lengths\): it specialises on the batch shape"):
        gpu.check_not_recompiling_per_shape([0, 1, 2, 3, 4], batches)


@pytest.mark.parametrize(("given", "expected"),
                         [((), 280), (("--deadline", "420"), 420), (("--deadline=300.5",), 300)])
def test_gpu_sh_counts_the_deadline_from_its_own_start(tmp_path, given, expected):
    """gpu.sh hands gpu.py the deadline less its own set-up time and 15 s (a given --deadline was passed on whole,
    so wheel installs and imports ran past the lent machine's limit); --smoke keeps gpu.py's."""
    import subprocess

    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\nif [[ $1 == -c ]]; then exit 0; fi\nshift\necho "$@"\n')  # no missing module
    fake.chmod(0o755)
    script = BENCHMARKS / "gpu.sh"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(script), *given, "--jobs", "loader"], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[out.index("--deadline") + 1] in (str(expected - 15), str(expected - 16))  # (a second may pass)
    assert out[-2:] == ["--jobs", "loader"]
    smoke = subprocess.run(["bash", str(script), "--smoke"], env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert "--deadline" not in smoke
    assert "--smoke" in smoke
    for order in (["--deadline", "420", "--smoke"], ["--smoke", "--deadline", "420"]):  # either order keeps it
        out = subprocess.run(["bash", str(script), *order], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[out.index("--deadline") + 1] in ("405", "404"), order
    octal = subprocess.run(["bash", str(script), "--deadline", "0300", "--jobs", "loader"], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert octal[octal.index("--deadline") + 1] in ("285", "284")  # 300 s, not octal 0300 = 192
    for bad in (["--deadline"], ["--deadline", "soon"], ["--deadline="], ["--deadline", ".5"], ["--deadline", "-3"]):
        refused = subprocess.run(["bash", str(script), *bad], env=env, capture_output=True, text=True, check=False)
        assert refused.returncode == 2, bad
        assert "--deadline" in refused.stderr


# What the one GPU attempt must not lose ------------------------------------------------------------------------
def test_without_cuda_the_benchmark_stops_at_once_naming_the_python(gpu, tmp_path, capsys):
    """Without --smoke it ran the base jobs on the CPU until the deadline (5 of a lent machine's 15 minutes) and
    exited 0 with a table of 'killed' rows: a wrong Python on the GPU machine is now told at once."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu.main(["--jobs", "loader", "--json", str(tmp_path / "g.json")]) == 3
    assert f"{sys.executable} has no usable CUDA" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()


def test_a_compiler_s_error_is_named_by_its_cause(gpu):
    """Dynamo's BackendCompilerFailed says only "backend='inductor' raised:" on its first line."""

    class BackendCompilerFailed(Exception):  # noqa: N818 (torch._dynamo.exc names it so)
        def __init__(self, inner: Exception) -> None:
            super().__init__(f"backend='inductor' raised:\n{type(inner).__name__}: {inner}")
            self.inner_exception = inner

    wrapped = BackendCompilerFailed(RuntimeError("Failed to find C compiler. Please specify via CC"))
    assert gpu.describe_error(wrapped) == "RuntimeError: Failed to find C compiler. Please specify via CC"
    assert gpu.describe_error(ValueError("one\ntwo")) == "one"
    assert gpu.describe_error(AssertionError()) == "AssertionError()"


def test_a_failed_job_s_stderr_is_kept_beside_the_json_and_in_its_row(gpu, tmp_path, capsys):
    """Its traceback went only to the terminal, whose tail the lent machine returns: a compile error's cause, the
    likeliest failure of a first GPU run, could be lost."""
    log = tmp_path / "gpu-benchmark.spidr.log"
    row = gpu.run_job_isolated("spidr", ["--smoke"], tmp_path / "absent.csv", timeout=120, log=log)
    assert "absent.csv" in row["error"]
    assert "Traceback" in log.read_text()
    assert "absent.csv" in row["stderr_tail"]
    assert "Traceback" in capsys.readouterr().err  # (and on the terminal, as before)


def test_an_installed_but_broken_module_counts_as_missing(tmp_path):
    """soundfile without its C library raises an OSError, not an ImportError: the check died with a traceback
    before the carried wheels could replace it."""
    import subprocess

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "soundfile.py").write_text("raise OSError('cannot load library libsndfile.so')\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(broken)}
    result = subprocess.run(["bash", "-c", f"source {BENCHMARKS / 'gpu_python.sh'}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "cannot import soundfile and .whl/ holds no wheels" in result.stderr
    assert "Traceback" not in result.stderr


def test_compiled_jobs_are_not_run_where_inductor_could_not_build_its_kernels(gpu, tmp_path, monkeypatch, capsys):
    """Without a C compiler or Python.h, both compiled jobs failed at code generation, after their share of
    tracing; now they are left out at once, saying why, and their time goes to the other jobs."""
    monkeypatch.setenv("PATH", str(tmp_path))  # (no compiler on it)
    monkeypatch.delenv("CC", raising=False)
    assert gpu.compile_toolchain_problem().startswith("inductor needs a C compiler")
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setattr(gpu.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "include")})
    assert "Python.h is missing" in gpu.compile_toolchain_problem()
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "Python.h").touch()
    assert gpu.compile_toolchain_problem() is None
    (tmp_path / "include" / "Python.h").unlink()
    rows = gpu.run_all(gpu.parse_args(["--smoke", "--compile-backend", "inductor", "--jobs", "spidr-compile",
                                       "loader"]), ["--smoke"])
    assert [row["job"] for row in rows] == ["spidr-compile", "loader"]
    assert rows[0]["error"].startswith("not run: inductor needs the interpreter's C headers")
    check_row(rows[1])


# The lent machine's run tool brings back at most this many files from $OUT (its limits: "at most 8 files"); the
# rest are lost.
OUT_FILE_LIMIT = 8


def test_a_default_run_leaves_no_more_files_under_out_than_the_lent_machine_brings_back(gpu, tmp_path, monkeypatch,
                                                                                       capsys):
    """`bash benchmarks/gpu.sh` with $OUT set writes gpu-benchmark.json, gpu-benchmark.md (tee) and one
    gpu-benchmark.<job>.log per job: 7 default jobs make 9 files, one more than the run tool returns, so one of
    them (the JSON, the table or a compile error's log) may not come back from the one GPU attempt."""
    out = tmp_path / "OUT"
    out.mkdir()

    def fake_isolated(job, argv, manifest, timeout, log=None):  # what run_job_isolated leaves: its log, a row
        if log is not None:
            with Path(log).open("a", encoding="utf-8") as stream:
                stream.write(f"{job}: stderr\n")
        return {"job": job, "name": gpu.JOBS[job].name, "error": "not measured (test)"}

    monkeypatch.setattr(gpu, "run_job_isolated", fake_isolated)
    json_path = out / "gpu-benchmark.json"
    assert gpu.main(["--smoke", "--isolate", "--corpus-files", "2", "--deadline", "400",
                     "--json", str(json_path)]) == 0
    capsys.readouterr()
    (out / "gpu-benchmark.md").touch()  # gpu.sh's `tee "${json%.json}.md"`
    files = sorted(path.name for path in out.rglob("*") if path.is_file())
    assert len(files) <= OUT_FILE_LIMIT, files


def test_learning_curve_gpu_sh_brings_back_no_more_files_than_the_lent_machine_returns(tmp_path):
    """learning_curve_gpu.sh copies point.json and report.md of every finished point and curve.md / curve.json /
    curve.png to $OUT: the default grid's 4 points make 11 files, and the run tool returns 8."""
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    for name in ("learning_curve_gpu.sh", "gpu_python.sh"):
        shutil.copy(BENCHMARKS / name, repo / "benchmarks" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for voice in ("flite", "festival", "espeak-ng"):  # the voices are "installed"
        (bin_dir / voice).write_text("#!/bin/sh\n")
    # A Python that imports everything and whose `spidr learning-curve` finishes the default 4-point grid.
    (bin_dir / "fakepython").write_text(
        "#!/bin/bash\n"
        "if [[ $1 == -c ]]; then exit 0; fi\n"
        "work=runs/curve-gpu\n"
        "for p in h4-s8800 h4-s35200 h16-s8800 h16-s35200; do mkdir -p $work/points/$p; "
        "echo {} > $work/points/$p/point.json; echo r > $work/points/$p/report.md; done\n"
        "touch $work/curve.md $work/curve.json $work/curve.png\n")
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    out = tmp_path / "OUT"
    out.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(bin_dir / "fakepython"), "OUT": str(out)}
    subprocess.run(["bash", str(repo / "benchmarks" / "learning_curve_gpu.sh")], cwd=repo, env=env, check=True,
                   capture_output=True, text=True)
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert len(files) <= OUT_FILE_LIMIT, files
    import tarfile

    with tarfile.open(out / "points.tar") as tar:  # every finished point's record is in it
        assert sorted(tar.getnames()) == sorted(f"points/{point}/{name}" for point in
                                                ("h4-s8800", "h4-s35200", "h16-s8800", "h16-s35200")
                                                for name in ("point.json", "report.md"))


def test_isolated_jobs_sharing_one_log_keep_every_job_s_stderr_under_its_header(gpu, tmp_path):
    """run_all gives every isolated job the same gpu-benchmark.log: each job appends its stderr under
    '===== <job> =====', so the first job's traceback is still there after the second, and each row's stderr tail
    is its own job's (not the end of the previous job's)."""
    log = tmp_path / "gpu-benchmark.log"
    first = gpu.run_job_isolated("spidr", ["--smoke"], tmp_path / "absent-one.csv", timeout=120, log=log)
    second = gpu.run_job_isolated("dinosr", ["--smoke"], tmp_path / "absent-two.csv", timeout=120, log=log)
    text = log.read_text()
    assert text.startswith("===== spidr =====\n")
    spidr_part, dinosr_part = text.split("===== dinosr =====\n")
    assert "absent-one.csv" in spidr_part
    assert "Traceback" in spidr_part
    assert "absent-two.csv" in dinosr_part
    assert "absent-one.csv" not in dinosr_part
    assert "absent-one.csv" in first["stderr_tail"]
    assert "absent-two.csv" in second["stderr_tail"]
    assert "absent-one.csv" not in second["stderr_tail"]


def test_a_smoke_run_takes_the_gpu_s_default_step_on_the_cpu(gpu, tmp_path):
    """run.host_sync = "auto" keeps the NaN/Inf verdict on the device only on CUDA: a CPU smoke run took the host-read
    step, and the path a GPU run takes by default was never run before the one GPU attempt. Smoke runs ask for it
    ("log"); the job that measures host reads keeps "step"; a real run keeps "auto"."""
    import torch

    from spidr.train.loop import skips_on_device

    cpu = torch.device("cpu")
    smoke = gpu.run_config("spidr", "m.csv", str(tmp_path), smoke=True, device=cpu)
    assert smoke.run.host_sync == "log"
    assert skips_on_device(smoke.run.host_sync, cpu, scaler=None)
    assert gpu.run_config("spidr-host-reads", "m.csv", str(tmp_path), smoke=True, device=cpu).run.host_sync == "step"
    assert gpu.run_config("spidr", "m.csv", str(tmp_path), smoke=False, device=cpu).run.host_sync == "auto"
