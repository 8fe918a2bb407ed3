"""The command line as a whole: values refused when parsed (naming the option), Ctrl-C while parsing, and errors
that name the input they are about."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import soundfile as sf

from spidr.cli import build_parser, main


def _refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """argparse's error line for ``argv`` (exit status 2)."""
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(argv)
    assert raised.value.code == 2
    return capsys.readouterr().err


def test_ctrl_c_while_the_arguments_are_parsed_is_one_line_and_130(monkeypatch, capsys):
    """--device's type imports torch and asks for CUDA while argparse runs, before main's try: Ctrl-C in those
    seconds printed a 40-line KeyboardInterrupt traceback (and python -m spidr died by the signal)."""
    import torch

    def interrupted() -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.cuda, "is_available", interrupted)
    try:
        code = main(["extract", "--checkpoint", "c.pt", "--manifest", "m.csv", "--out", "o"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped spidr.cli.main (a traceback for the user)")
    assert code == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["kmeans", "d", "--out", "o.safetensors"],
    ["probe", "--checkpoint", "c", "--manifest", "m", "--alignments", "a", "--out", "o"],
    ["lm-eval", "b", "s"],
    ["evaluate", "--checkpoint", "c", "--manifest", "m", "--item", "i", "--out", "o"],
    ["abx", "f", "i"],
    ["lm-correlate", "t.csv"],
    ["lm-units", "b", "o", "--oracle"],
    ["synth-corpus", "o"],
    ["synth-lm-bench", "o"],
])
def test_a_negative_seed_is_refused_naming_seed(argv, capsys):
    """kmeans/probe said 'expected non-negative integer' (no option named); lm-eval blamed the benchmark:
    'bench/lexical/dev/gold.csv: expected non-negative integer'; evaluate/abx accepted it."""
    assert "--seed" in _refusal([*argv, "--seed", "-1"], capsys)


@pytest.mark.parametrize("argv", [
    ["items", "a.tsv", "--out", "o.item"],
    ["units-quality", "u.jsonl", "a.tsv"],
    ["evaluate", "--checkpoint", "c", "--manifest", "m", "--item", "i", "--out", "o"],
    ["probe", "--checkpoint", "c", "--manifest", "m", "--alignments", "a", "--out", "o"],
])
@pytest.mark.parametrize("rate", ["0", "-1"])
def test_a_non_positive_alignment_rate_is_refused_naming_the_option(argv, rate, capsys):
    """items --alignment-rate -1 wrote an item file of negative, inverted times (exit 0); 0 raised ZeroDivisionError
    in items, evaluate (after extracting every layer) and probe."""
    assert "--alignment-rate" in _refusal([*argv, "--alignment-rate", rate], capsys)


@pytest.mark.parametrize("value", ["abc", "0", "-50", "nan"])
def test_abx_frequency_is_a_positive_number_named_when_refused(value, capsys):
    """'--frequency abc' failed later with "could not convert string to float: 'abc'", naming no option."""
    assert "--frequency" in _refusal(["abx", "f", "i", "--frequency", value], capsys)
    assert build_parser().parse_args(["abx", "f", "i", "--frequency", " 50 "]).frequency == "50"


def test_k_of_lm_units_and_lm_study_is_checked_when_parsed(capsys):
    """lm-study --kmeans -2 synthesised the whole benchmark (minutes with the defaults) before failing with
    'data.num_units = -2 must be >= 0', a key the user never set."""
    for argv in (["lm-units", "b", "o", "--checkpoint", "c.pt", "--kmeans", "-2"],
                 ["lm-study", "--checkpoint", "c.pt", "--out", "o", "--kmeans", "-2"]):
        assert "--kmeans" in _refusal(argv, capsys)


def test_a_missing_input_is_named_once(tmp_path, capsys):
    """lm-correlate repeated "(table ... does not exist)" once per default (x, y) pair, twelve times; lm-score named
    the layout it expected but not the missing units folder."""
    assert main(["lm-correlate", str(tmp_path / "nope.csv")]) == 2
    assert capsys.readouterr().err == f"spidr lm-correlate: error: table {tmp_path / 'nope.csv'} does not exist\n"
    (tmp_path / "lm.pt").write_bytes(b"")
    assert main(["lm-score", str(tmp_path / "lm.pt"), str(tmp_path / "units"), str(tmp_path / "sub")]) == 2
    assert capsys.readouterr().err == (f"spidr lm-score: error: units folder {tmp_path / 'units'} does not exist: "
                                       "expected UNITS_DIR/<task>/<split>.jsonl, as lm-units writes them\n")


@pytest.mark.parametrize(("flag", "value"), [("--nonwords-per-word", "0"), ("--tsc-pairs", "-1"),
                                             ("--lexical-words", "-1"), ("--syntactic-pairs", "-4"),
                                             ("--train-utterances", "0"), ("--train-hours", "nan")])
def test_benchmark_sizes_are_refused_naming_the_option(flag, value, capsys):
    """synth-lm-bench and lm-study gave one message for any bad count ("nonwords_per_word must be >= 1,
    min_word_phones >= 2, tsc_pairs >= 0 and max_lexical_words >= 0"), naming neither the flag nor the value."""
    from spidr.corpus.lm_bench import LmBenchSettings

    assert flag in _refusal(["synth-lm-bench", "o", flag, value], capsys)
    if flag not in ("--nonwords-per-word", "--train-hours"):  # (lm-study has no such option)
        assert flag in _refusal(["lm-study", "--checkpoint", "c", "--out", "o", flag, value], capsys)
    with pytest.raises(ValueError, match=r"^tsc_pairs \(--tsc-pairs\) = -1 must be >= 0$"):
        LmBenchSettings(tsc_pairs=-1)


def test_lm_score_given_a_file_as_its_units_folder_says_it_is_a_file(tmp_path, capsys):
    """UNITS_DIR given as one units file (layer_06/dev.jsonl instead of its folder): named as a file, with the
    layout expected, before the LM is loaded."""
    from spidr.cli import main

    (tmp_path / "lm.pt").write_bytes(b"")
    (tmp_path / "dev.jsonl").write_text('{"id": "a", "units": [1, 2]}\n')
    assert main(["lm-score", str(tmp_path / "lm.pt"), str(tmp_path / "dev.jsonl"), str(tmp_path / "sub")]) == 2
    assert capsys.readouterr().err == (f"spidr lm-score: error: units folder {tmp_path / 'dev.jsonl'} is a file: "
                                       "expected UNITS_DIR/<task>/<split>.jsonl, as lm-units writes them\n")


def test_an_os_error_wrapped_in_a_runtime_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys) -> None:
    """Was a defect (res34): DataLoader workers past the open-files limit (`ulimit -n`), as torch raises it (a
    RuntimeError from the EMFILE, raised `from None`): `spidr train` printed a traceback and exited 1, the status of a
    diverged run. Other RuntimeErrors still raise."""
    from spidr.data import manifest

    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "a.wav", np.zeros(1600, dtype=np.float32), 16000)

    def workers_out_of_files(*args, **kwargs):
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError:
            raise RuntimeError("Too many open files. Communication with the workers is no longer possible. Please "
                               "increase the limit using `ulimit -n` in the shell") from None

    monkeypatch.setattr(manifest, "write_manifest", workers_out_of_files)
    assert main(["manifest", str(tmp_path / "audio"), str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("spidr manifest: error: Too many open files"), err

    def a_bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(manifest, "write_manifest", a_bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["manifest", str(tmp_path / "audio"), str(tmp_path / "m.csv")])
