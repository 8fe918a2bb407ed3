"""Unit quality: the golden SpidR numbers, hand-computed small cases, length and rate rules, alignment formats."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import GOLDEN, requires_shared
from spidr import cli
from spidr.eval.unit_quality import METRICS, quality_from_counts, read_alignments, unit_quality
from spidr.eval.units import read_units


@requires_shared
def test_golden_spidr_kmeans_layer6() -> None:
    spec = json.loads((GOLDEN / "expected.json").read_text())
    metrics = unit_quality(
        read_units(GOLDEN / spec["units_file"]),
        read_alignments(GOLDEN / spec["alignments_file"]),
        unit_rate_hz=spec["unit_rate_hz"],
        alignment_rate_hz=spec["alignment_rate_hz"],
        num_units=spec["num_units"],
    )
    assert list(metrics) == list(METRICS)
    for name, expected in spec["expected"].items():
        # The reference values were computed in float32; ours in float64 agree to ~1e-7 relative.
        assert metrics[name] == pytest.approx(expected, rel=1e-6, abs=1e-6), name


def test_perfect_and_independent_units() -> None:
    perfect = quality_from_counts(np.array([[3, 0], [0, 1]]))
    assert perfect["phone_purity"] == pytest.approx(1.0)
    assert perfect["cluster_purity"] == pytest.approx(1.0)
    assert perfect["pnmi"] == pytest.approx(1.0, abs=1e-8)
    independent = quality_from_counts(np.array([[1, 1], [1, 1]]))
    assert independent["pnmi"] == pytest.approx(0.0, abs=1e-8)
    assert independent["phone_purity"] == independent["cluster_purity"] == pytest.approx(0.5)
    assert independent["codebook_perplexity"] == pytest.approx(2.0)
    assert independent["active_codewords"] == 2


def test_hand_computed_mixed_case() -> None:
    # Counts [[2, 1], [0, 1]] → P = [[½, ¼], [0, ¼]], p(phone) = (¾, ¼), p(unit) = (½, ½).
    metrics = quality_from_counts(np.array([[2, 1], [0, 1], [0, 0]]))  # a third phone that never occurs
    assert metrics["phone_purity"] == pytest.approx(0.5 + 0.25)
    assert metrics["cluster_purity"] == pytest.approx(0.5 + 0.25)
    mutual = 0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.125)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metrics["pnmi"] == pytest.approx(mutual / entropy, rel=1e-8)
    assert metrics["codebook_perplexity"] == pytest.approx(2.0)
    assert metrics["active_codewords"] == 2


def test_units_are_repeated_and_zipped() -> None:
    # 50 Hz units [0, 1] → 10 ms frames 0 0 1 1, against 5 labels (one extra frame is allowed and dropped).
    metrics = unit_quality({"u": [0, 1]}, {"u": ["A", "A", "B", "B", "B"]}, num_units=2)
    assert metrics["phone_purity"] == pytest.approx(1.0)
    assert metrics["pnmi"] == pytest.approx(1.0, abs=1e-8)
    # More unit frames than labels: the extra frames are dropped at the end (units [0, 1, 1] → 0 0 1 1 1 1 against
    # 5 labels); dropping them at the start would pair every frame with its neighbour's label.
    more_units = unit_quality({"u": [0, 1, 1]}, {"u": ["A", "A", "B", "B", "B"]}, num_units=2)
    assert more_units["phone_purity"] == pytest.approx(1.0)
    assert more_units["pnmi"] == pytest.approx(1.0, abs=1e-8)
    # Labels at 20 ms: no repetition.
    same_rate = unit_quality({"u": [0, 1, 1]}, {"u": ["A", "B", "A"]}, alignment_rate_hz=50, num_units=2)
    assert same_rate["phone_purity"] == pytest.approx(2 / 3)


def test_utterances_on_one_side_only_are_left_out_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    labels = {"u": ["A", "A", "B", "B"], "v": ["B", "B", "A", "A"], "w": ["A", "A", "A", "A"]}
    with caplog.at_level(logging.WARNING):
        metrics = unit_quality({"u": [0, 1], "x": [1, 1]}, labels, num_units=2)
    assert metrics == unit_quality({"u": [0, 1]}, {"u": labels["u"]}, num_units=2)
    assert "1 of 2 utterances have no alignment and are left out (e.g. 'x')" in caplog.text
    assert "2 of the 3 aligned utterances have no units and are left out (e.g. 'v', 'w')" in caplog.text


def test_length_mismatch_names_the_utterance() -> None:
    with pytest.raises(ValueError, match=r"'utt-7'.*may differ by at most 2"):
        unit_quality({"utt-7": [0, 1]}, {"utt-7": ["A"] * 7}, num_units=2)
    with pytest.raises(ValueError, match="multiple of the unit rate"):
        unit_quality({"u": [0]}, {"u": ["A"]}, alignment_rate_hz=75, num_units=2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        unit_quality({"u": [0, 2]}, {"u": ["A"] * 4}, num_units=2)
    with pytest.raises(ValueError, match="no utterance"):
        unit_quality({"u": [0]}, {"v": ["A", "A"]}, num_units=2)
    with pytest.raises(ValueError, match=r"utterance 'u': expected a 1-D sequence of unit ids, got shape \(2, 3\)"):
        unit_quality({"u": np.eye(3, dtype=np.int64)[[0, 1]]}, {"u": ["A"] * 4}, num_units=3)
    with pytest.raises(TypeError, match="num_units"):
        unit_quality({"u": [0, 1]}, {"u": ["A"] * 4})  # no default: 256 gave K = 8 units a bitrate 2.7x too high
    with pytest.raises(ValueError, match="utterance 'u': phone 'XX' is not in the phone inventory"):
        unit_quality({"u": [0, 1]}, {"u": ["A", "A", "XX", "XX"]}, num_units=2, inventory=["A", "B"])


def test_bitrate_on_a_tiny_sequence() -> None:
    # 6 units at 50 Hz = 0.12 s, 3 left after collapsing repeats, log2(4) = 2 bits each: 2 · 3 / 0.12 = 50 bit/s.
    units = {"u": [1, 1, 2, 2, 2, 3]}
    metrics = unit_quality(units, {"u": ["A", "B"] * 6}, num_units=4)
    assert metrics["bitrate"] == pytest.approx(50.0)


def test_interval_alignments(tmp_path: Path) -> None:
    path = tmp_path / "ali.tsv"
    path.write_text("utterance\tonset\toffset\tphone\nu\t0.0\t0.025\tSIL\nu\t0.025\t0.05\tAH\n")
    # Frame centres 5, 15, 25, 35, 45 ms: SIL, SIL, then AH (25 ms is the onset of AH).
    assert read_alignments(path) == {"u": ["SIL", "SIL", "AH", "AH", "AH"]}
    # spidr synth-corpus's alignments.tsv has a fifth column, the speaker: ignored
    speakers = tmp_path / "alignments.tsv"
    speakers.write_text("utt_id\tonset\toffset\tphone\tspeaker\nu\t0.0000\t0.0250\tSIL\tawb\n"
                        "u\t0.0250\t0.0500\tAH\tawb\n")
    assert read_alignments(speakers) == {"u": ["SIL", "SIL", "AH", "AH", "AH"]}
    (tmp_path / "three.tsv").write_text("u\t0.0\t0.025\n")
    with pytest.raises(ValueError, match="line 1 has 3 fields; expected utterance, onset, offset, phone"):
        read_alignments(tmp_path / "three.tsv")
    gapped = tmp_path / "gap.tsv"
    gapped.write_text("u\t0.0\t0.01\tSIL\nu\t0.02\t0.04\tAH\n")
    with pytest.raises(ValueError, match=r"no phone at 0\.015"):
        read_alignments(gapped)
    for times, message in ((("NaN", "0.02"), r"line 1: 'NaN', '0\.02' are not times in seconds"),
                           (("0.0", "Infinity"), r"line 1: '0\.0', 'Infinity' are not times"),
                           (("-0.5", "0.02"), r"line 1: '-0\.5', '0\.02' are not times in seconds \(finite")):
        bad = tmp_path / "bad.tsv"
        bad.write_text(f"u\t{times[0]}\t{times[1]}\tA\nu\t0.02\t0.04\tB\n")
        with pytest.raises(ValueError, match=message):
            read_alignments(bad)
    (tmp_path / "header.tsv").write_text("utterance\tonset\toffset\tphone\n")
    with pytest.raises(ValueError, match="has no utterance"):
        read_alignments(tmp_path / "header.tsv")
    overlapping = tmp_path / "overlap.tsv"
    overlapping.write_text("u\t0.0\t0.02\tA\nu\t0.01\t0.04\tB\n")
    with pytest.raises(ValueError, match=r"'B' starts at 0\.01 s, before 'A' ends at 0\.02 s"):
        read_alignments(overlapping)


def test_command_line_prints_the_six_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "units.jsonl").write_text(json.dumps({"audio": "x/u.wav", "units": [0, 1, 1]}) + "\n")
    (tmp_path / "ali.jsonl").write_text(json.dumps({"name": "u", "phones": ["A", "A", "B", "B", "B", "B"]}) + "\n")
    assert cli.main(["units-quality", str(tmp_path / "units.jsonl"), str(tmp_path / "ali.jsonl"), "--num-units", "2",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == list(METRICS)
    assert report["pnmi"] == pytest.approx(1.0, abs=1e-8)


def test_alignments_are_codes_and_intervals_are_placed_per_interval(tmp_path: Path) -> None:
    """Interval TSVs: frame i takes the first interval reaching past its centre (i + ½)/rate, with exact times;
    alignments keep int16 codes in sorted phone order and give the labels back."""
    path = tmp_path / "a.tsv"
    path.write_text("u\t0\t0.015\tSIL\nu\t0.015\t0.04\tK\nu\t0.04\t0.0601\tAE\nv\t0\t0.02\tAE\n")
    alignments = read_alignments(path, alignment_rate_hz=100)
    # centres 0.005 0.015 0.025 0.035 0.045 0.055 | 0.0601 ends before the centre 0.065
    assert alignments["u"] == ["SIL", "K", "K", "K", "AE", "AE"]
    assert alignments.phones == ("AE", "K", "SIL")
    assert alignments.codes["u"].dtype == np.int16
    assert alignments == {"u": ["SIL", "K", "K", "K", "AE", "AE"], "v": ["AE", "AE"]}
    # lines in any order, utterances interleaved: the same labels, utterances in order of first appearance
    lines = path.read_text().splitlines()
    shuffled = tmp_path / "shuffled.tsv"
    shuffled.write_text("\n".join([lines[2], lines[3], lines[0], lines[1]]) + "\n")
    assert list(read_alignments(shuffled, alignment_rate_hz=100).items()) == [("u", alignments["u"]),
                                                                              ("v", alignments["v"])]
    at_50 = read_alignments(path, alignment_rate_hz=50)  # centres 0.01 0.03 0.05
    assert at_50["u"] == ["SIL", "K", "AE"]
    metrics = unit_quality({"u": [0, 1, 1]}, at_50, unit_rate_hz=50, alignment_rate_hz=50, num_units=2)
    assert metrics["phone_purity"] == pytest.approx(2 / 3)


def test_active_codewords_count_units_not_phones():
    assert quality_from_counts(np.array([[2, 1, 1], [0, 1, 0]]))["active_codewords"] == 3


def test_two_frames_of_length_difference_are_accepted():
    # 3 units at 50 Hz = 6 frames of 10 ms against 4 labels: differ by 2, allowed (MAX_LENGTH_MISMATCH).
    unit_quality({"u": [0, 1, 1]}, {"u": ["A", "A", "B", "B"]}, num_units=2)


def test_a_missing_units_file_or_a_folder_is_named_first(tmp_path, capsys):
    """A mistyped name was first told that no vocabulary size was recorded for it (--num-units), and only with that
    option that it does not exist."""
    (tmp_path / "ali.jsonl").write_text(json.dumps({"name": "a", "phones": ["x", "y"]}) + "\n")
    assert cli.main(["units-quality", str(tmp_path / "unit.jsonl"), str(tmp_path / "ali.jsonl")]) == 2
    assert f"units file {tmp_path / 'unit.jsonl'} does not exist" in capsys.readouterr().err
    (tmp_path / "layer_02").mkdir()
    assert cli.main(["units-quality", str(tmp_path / "layer_02"), str(tmp_path / "ali.jsonl")]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_alignments_find_units_by_path_or_unique_id_and_a_shared_bare_id_is_refused() -> None:
    """Alignments matched units by exact name only: named by path (as item files may be), every utterance named by
    its id in the units was left out, and PNMI covered a subset. Truth: the metrics equal those of the same
    alignments named exactly as the units; a bare id that two units hold is refused."""
    units = {"é": [0, 1], "spk1/0001": [1, 1], "spk2/0001": [0, 0]}
    exact = {"é": ["A", "A", "B", "B"], "spk1/0001": ["B", "B", "B", "B"], "spk2/0001": ["A", "A", "A", "A"]}
    by_path = {"données/é": exact["é"], "corpus/spk1/0001": exact["spk1/0001"], "spk2/0001": exact["spk2/0001"]}
    assert unit_quality(units, by_path, num_units=2) == unit_quality(units, exact, num_units=2)
    assert unit_quality(units, exact, num_units=2)["pnmi"] == pytest.approx(1.0, abs=1e-8)
    with pytest.raises(ValueError, match=r"'0001': 2 utterances of the units have the id '0001'"):
        unit_quality(units, {"0001": ["A"] * 4, **exact}, num_units=2)


def test_arpabet_stress_digits_are_removed_as_fairseq_does_unless_kept(tmp_path: Path, capsys) -> None:
    """Forced aligners write AH0 / AH1; fairseq's PNMI strips the digits (rm_stress) and the paper's labels have
    none, but each variant counted as a phone of its own (the reviewer's PNMI fell from 0.145 to 0.120 with no word).
    Hand count: units [0, 0, 1, 1] on labels AH1 AH0 S S (1 unit per label): with stress removed the phones are
    {AH, S} and each unit holds one of them, PNMI = 1; kept, unit 0 holds two phones, PNMI = ln 2 / (1.5 ln 2) = 2/3.
    A tone digit outside ARPAbet's vowels (a1) and a consonant with a digit (S1) are left alone."""
    from spidr.eval.unit_quality import without_stress

    path = tmp_path / "ali.jsonl"
    path.write_text(json.dumps({"name": "u", "phones": ["AH1", "AH0", "S", "S"]}) + "\n")
    assert read_alignments(path).phones == ("AH", "S")
    assert read_alignments(path)["u"] == ["AH", "AH", "S", "S"]
    assert read_alignments(path, keep_stress=True).phones == ("AH0", "AH1", "S")
    units = tmp_path / "units.jsonl"
    units.write_text(json.dumps({"name": "u", "units": [0, 0, 1, 1]}) + "\n")
    common = [str(units), str(path), "--alignment-rate", "50", "--unit-rate", "50", "--num-units", "2", "--json"]
    assert cli.main(["units-quality", *common]) == 0
    assert json.loads(capsys.readouterr().out)["pnmi"] == pytest.approx(1.0, abs=1e-6)
    assert cli.main(["units-quality", *common, "--keep-stress"]) == 0
    assert json.loads(capsys.readouterr().out)["pnmi"] == pytest.approx(2 / 3, abs=1e-6)
    from spidr.eval.unit_quality import Alignments

    other = Alignments.from_labels([("v", ["a1", "S1", "ER2", "h#"])])
    assert without_stress(other).phones == ("ER", "S1", "a1", "h#")


def test_libri_light_frame_label_lines_are_read_as_frame_labels(tmp_path: Path) -> None:
    """Libri-light's converted_aligned_phones.txt (one line per utterance: its name, then one phone index per 10 ms
    frame) was read as intervals and refused with "onset 6 is not before offset 6". Now each field is a frame's
    label; an interval file is still read as intervals."""
    frames = tmp_path / "converted_aligned_phones.txt"
    frames.write_text("u1 6 6 6 5 5 0\nu2 3 3 3 3 3 3 1\n")
    alignments = read_alignments(frames)
    assert alignments["u1"] == ["6", "6", "6", "5", "5", "0"]
    assert len(alignments["u2"]) == 7
    intervals = tmp_path / "ali.txt"
    intervals.write_text("u1 0.00 0.03 a\nu1 0.03 0.06 b\n")
    assert read_alignments(intervals)["u1"] == ["a", "a", "a", "b", "b", "b"]


def test_a_frame_label_line_with_a_name_only_is_refused_naming_its_line(tmp_path: Path) -> None:
    """mut UQ6 (the check dropped: the utterance was read with no frame, silently)."""
    frames = tmp_path / "converted_aligned_phones.txt"
    frames.write_text("u1 6 6 6 5 5 0\nu2\n")
    with pytest.raises(ValueError, match=r"line 2 names utterance 'u2' but gives no frame label"):
        read_alignments(frames)


def test_a_five_field_interval_line_of_whole_seconds_is_read_as_an_interval(tmp_path: Path) -> None:
    """mut UQ4 (>= 6 fields → >= 5): holds_frame_labels asks for at least 6 fields (its docstring); an interval
    text file with a speaker column, whole-second times and phone indices (utterance onset offset phone speaker,
    5 fields, all numbers after the name) is intervals: 1 s of phone 7 then 1 s of phone 3 at 100 Hz."""
    intervals = tmp_path / "ali.txt"
    intervals.write_text("u1 0 1 7 84\nu1 1 2 3 84\n")
    assert read_alignments(intervals)["u1"] == ["7"] * 100 + ["3"] * 100


def _lengths_case():
    from spidr.config import SpidRConfig
    from spidr.models.frames import num_frames

    conv = SpidRConfig().extractor_conv_layer_config  # wav2vec 2.0's front end: 320 samples a frame
    assert num_frames(16000, conv) == 49  # → 98 frames at 100 Hz
    return conv


def test_check_alignment_lengths_applies_the_tolerance_it_is_given() -> None:
    """mut UQ7 / UQ8 (the comparisons kept MAX_LENGTH_MISMATCH whatever ``tolerance`` said; the probe passes a
    wider one). 1 s of audio = 49 frames at 50 Hz = 98 at 100 Hz: 102 labels are 4 off, refused by the default
    (2) and accepted with tolerance 5; 105 (7 off) is refused naming 5. The same holds when the manifest's length
    is wrong and the decoded length decides."""
    from spidr.eval.unit_quality import check_alignment_lengths

    conv = _lengths_case()
    common = {"conv_layers": conv, "alignment_rate_hz": 100, "where": "test"}
    with pytest.raises(ValueError, match="may differ by at most 2 frames"):
        check_alignment_lengths({"u": ["A"] * 102}, {"u": 16000}, **common)
    check_alignment_lengths({"u": ["A"] * 102}, {"u": 16000}, **common, tolerance=5)
    with pytest.raises(ValueError, match="may differ by at most 5 frames"):
        check_alignment_lengths({"u": ["A"] * 105}, {"u": 16000}, **common, tolerance=5)
    # manifest says 2 s, the decoded audio 1 s
    check_alignment_lengths({"u": ["A"] * 102}, {"u": 32000}, **common, tolerance=5,
                            decoded_samples=lambda name: 16000)
    with pytest.raises(ValueError, match=r"but its audio gives 98 .*at most 5 frames"):
        check_alignment_lengths({"u": ["A"] * 105}, {"u": 32000}, **common, tolerance=5,
                                decoded_samples=lambda name: 16000)


def test_unit_ids_that_are_not_whole_numbers_are_refused_naming_the_utterance():
    """Units [0, 0, 1.7, 1, ...] were cut to [0, 0, 1, 1, ...] for the counts, while the bitrate counted 1.7 → 1 as
    a change: 49.5 bits/s against 39.6 for the integer units, two metrics of two different sequences. Whole floats
    (as a float array of ids holds them) stay accepted, and give the integers' metrics (api30 defect 8)."""
    phones = {"u": ["a", "a", "b", "b", "c", "c", "a", "a"]}
    with pytest.raises(ValueError, match=r"utterance 'u': unit ids must be whole numbers, found 1\.7"):
        unit_quality({"u": np.array([0, 0, 1.7, 1, 2, 2, 0, 0])}, phones, num_units=3, unit_rate_hz=50,
                     alignment_rate_hz=50)
    with pytest.raises(ValueError, match=r"utterance 'u': unit ids must be whole numbers, found nan"):
        unit_quality({"u": np.array([0, 0, np.nan, 1, 2, 2, 0, 0])}, phones, num_units=3, unit_rate_hz=50,
                     alignment_rate_hz=50)
    integers = np.array([0, 0, 1, 1, 2, 2, 0, 0])
    expected = unit_quality({"u": integers}, phones, num_units=3, unit_rate_hz=50, alignment_rate_hz=50)
    assert unit_quality({"u": integers.astype(np.float32)}, phones, num_units=3, unit_rate_hz=50,
                        alignment_rate_hz=50) == expected
    assert expected["bitrate"] == pytest.approx(math.log2(3) * 4 / (8 / 50))  # 4 runs in 0.16 s


def test_an_interval_of_no_length_is_refused_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "a.tsv"
    path.write_text("u\t0\t0.1\tA\nu\t0.1\t0.1\tB\nu\t0.1\t0.2\tC\n")
    with pytest.raises(ValueError, match=rf"{path}: line 2: onset 0.1 is not before offset 0.1"):
        read_alignments(path)


def test_an_overlap_of_a_nanosecond_is_still_an_overlap(tmp_path: Path) -> None:
    """Times are compared as written: 0.0999999999 < 0.1 is an overlap, however small."""
    path = tmp_path / "a.tsv"
    path.write_text("u\t0\t0.1\tA\nu\t0.0999999999\t0.2\tB\n")
    with pytest.raises(ValueError, match=r"'B' starts at 0\.0999999999 s, before 'A' ends at 0\.1 s"):
        read_alignments(path)


def test_num_units_must_be_a_whole_number():
    """num_units=8.0 (e.g. read from a JSON config) gave numpy's "expected a sequence of integers ... got '32.0'",
    naming neither num_units nor the value; a whole float is that integer."""
    units = {"a": np.array([0, 1, 2, 3] * 5)}
    phones = {"a": [p for p in ("AA", "IY") for _ in range(20)]}
    assert unit_quality(units, phones, num_units=8.0) == unit_quality(units, phones, num_units=8)
    for bad in (8.5, "8", True):
        with pytest.raises(ValueError, match=rf"^num_units = {bad!r} is invalid: expected an integer ≥ 1$"):
            unit_quality(units, phones, num_units=bad)


# the six metrics equal a brute-force count written here, and are invariant to renaming units and phones.




@st.composite
def _units_and_phones(draw):
    num_units, num_phones = draw(st.integers(1, 6)), draw(st.integers(2, 5))
    phones = [f"p{i}" for i in range(num_phones)]
    units, labels = {}, {}
    for u in range(draw(st.integers(1, 4))):
        length = draw(st.integers(1, 12))
        units[f"utt{u}"] = draw(st.lists(st.integers(0, num_units - 1), min_size=length, max_size=length))
        frames = max(0, 2 * length + draw(st.integers(-2, 2)))  # 20 ms units on 10 ms labels, ≤ 2 frames apart
        labels[f"utt{u}"] = draw(st.lists(st.sampled_from(phones), min_size=frames, max_size=frames))
    return num_units, units, labels


def _brute_force(num_units, units, labels):
    counts = {}
    for name, sequence in units.items():
        doubled = [u for u in sequence for _ in range(2)]  # 20 ms units on 10 ms labels; the longer is cut
        for unit, phone in zip(doubled, labels[name], strict=False):
            counts[phone, unit] = counts.get((phone, unit), 0) + 1
    total = sum(counts.values())
    if total == 0:  # no frame both labelled and coded: nothing to measure
        return None, 0.0, 0
    phones = sorted({p for frames in labels.values() for p in frames})
    p_phone = {p: sum(c for (q, _), c in counts.items() if q == p) / total for p in phones}
    p_unit = {u: sum(c for (_, v), c in counts.items() if v == u) / total for u in range(num_units)}
    information = sum(c / total * math.log(c / total / (p_phone[p] * p_unit[u])) for (p, u), c in counts.items())
    entropy = -sum(x * math.log(x) for x in p_phone.values() if x > 0)
    runs = sum(1 + sum(a != b for a, b in itertools.pairwise(s)) for s in units.values() if s)
    return {
        "pnmi": information / entropy if entropy > 0 else math.nan,
        "phone_purity": sum(max(counts.get((p, u), 0) for p in phones) for u in range(num_units)) / total,
        "cluster_purity": sum(max(counts.get((p, u), 0) for u in range(num_units)) for p in phones) / total,
        "codebook_perplexity": 2 ** -sum(x * math.log2(x) for x in p_unit.values() if x > 0),
        "active_codewords": len({u for _, u in counts}),
        "bitrate": math.log2(num_units) * runs / (sum(len(s) for s in units.values()) / 50),
    }, entropy, len(phones)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(case=_units_and_phones(), seed=st.integers(0, 2**32 - 1))
def test_unit_quality_is_the_brute_force_count_and_ignores_names(case, seed) -> None:
    num_units, units, labels = case
    expected, entropy, num_phones = _brute_force(num_units, units, labels)
    assume(expected is not None)
    assume(entropy > 1e-6)  # a single phone class: PNMI undefined (refused)
    found = unit_quality(units, labels, num_units=num_units)
    for metric, value in expected.items():
        assert math.isclose(found[metric], value, rel_tol=1e-6, abs_tol=1e-6), (metric, found[metric], value)
    assert -1e-9 <= found["pnmi"] <= 1 + 1e-9
    assert found["phone_purity"] >= 1 / num_phones - 1e-12
    rng = random.Random(seed)
    permutation = rng.sample(range(num_units), num_units)
    names = sorted({p for frames in labels.values() for p in frames})
    renamed = dict(zip(names, rng.sample([f"z{i}" for i in range(len(names))], len(names)), strict=True))
    again = unit_quality({n: [permutation[u] for u in s] for n, s in units.items()},
                         {n: [renamed[p] for p in frames] for n, frames in labels.items()}, num_units=num_units)
    for metric, value in found.items():
        assert math.isclose(again[metric], value, rel_tol=1e-9, abs_tol=1e-12), metric
