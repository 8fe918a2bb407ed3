"""Item files: the three encodings, exact Decimal times, and frame slicing (with and without the Libri-light bug)."""

from __future__ import annotations

import itertools
import json
import re
import tempfile
import tracemalloc
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spidr.cli import main
from spidr.eval.item_writer import items_from_alignments, segments, write_item_file
from spidr.eval.items import Items, check_nonempty, check_within, frame_bounds, read_items
from spidr.eval.unit_quality import Alignments

HEADER = ["#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker"]
ROWS = [
    ["84-121123-0000", "0.07", "0.3", "AH", "B", "T", "84"],
    ["84-121123-0000", "0.315", "0.5", "T", "AH", "SIL", "84"],
]


def write_all_formats(directory: Path) -> list[Path]:
    item = directory / "a.item"
    item.write_text("\n".join(" ".join(row) for row in [HEADER, *ROWS]) + "\n")
    csv = directory / "a.csv"
    csv.write_text("\n".join(",".join(row) for row in [HEADER, *ROWS]) + "\n")
    jsonl = directory / "a.jsonl"
    # Times as JSON numbers: they must still be parsed exactly.
    jsonl.write_text("\n".join(
        json.dumps(dict(zip(HEADER, row, strict=True))).replace(f'"{row[1]}"', row[1]).replace(f'"{row[2]}"', row[2])
        for row in ROWS
    ) + "\n")
    return [item, csv, jsonl]


def test_three_formats_read_the_same(tmp_path: Path) -> None:
    for path in write_all_formats(tmp_path):
        items = read_items(path)
        assert items.files == ("84-121123-0000", "84-121123-0000")
        assert items.onsets == (Decimal("0.07"), Decimal("0.315"))
        assert items.offsets == (Decimal("0.3"), Decimal("0.5"))
        assert items.column("#phone") == ("AH", "T")
        assert items.column("speaker") == ("84", "84")


def test_frame_bounds_are_exact() -> None:
    items = Items.from_columns({"#file": ["f", "f", "f"], "onset": ["0.07", "0.03", "0.315"],
                                "offset": ["0.09", "0.07", "0.5"]})
    starts, ends = frame_bounds(items, 50)
    # 0.07 s · 50 = 3.5 exactly, so frame 3 (centre 0.07 s) starts the item; in binary floating point 0.07·50 − 0.5
    # is 3.0000000000000004 and the ceiling would wrongly be 4.
    assert starts.tolist() == [3, 1, 16]
    # Inclusive last frames floor(0.09·50 − ½) = 4, floor(0.07·50 − ½) = 3 and floor(0.5·50 − ½) = 24, plus one.
    assert ends.tolist() == [5, 4, 25]
    bug_starts, bug_ends = frame_bounds(items, 50, librilight_bug=True)
    assert bug_starts.tolist() == starts.tolist()
    assert bug_ends.tolist() == (ends - 1).tolist()


def test_frame_centres_inside_the_interval() -> None:
    # Property: frame i (centre (i + ½)/f) is kept iff onset ≤ centre ≤ offset.
    rng = np.random.default_rng(0)
    onsets = rng.integers(0, 2000, 200) / 1000
    offsets = onsets + rng.integers(20, 300, 200) / 1000
    items = Items.from_columns({"#file": ["f"] * 200, "onset": [f"{x:.3f}" for x in onsets],
                                "offset": [f"{x:.3f}" for x in offsets]})
    starts, ends = frame_bounds(items, 100)
    for onset, offset, start, end in zip(items.onsets, items.offsets, starts, ends, strict=True):
        kept = [i for i in range(400) if onset <= (Decimal(i) + Decimal("0.5")) / 100 <= offset]
        assert list(range(start, end)) == kept


def test_frequency_must_be_exact() -> None:
    items = Items.from_columns({"#file": ["f"], "onset": ["0"], "offset": ["1"]})
    with pytest.raises(ValueError, match="string"):
        frame_bounds(items, 12.5)
    assert frame_bounds(items, "12.5")[1].tolist() == [13]  # floor(1 · 12.5 − ½) + 1
    assert frame_bounds(items, 50.0)[1].tolist() == [50]


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_items(tmp_path / "missing.item")
    bad = tmp_path / "bad.item"
    bad.write_text(" ".join(HEADER) + "\nf 0.1 0.2 AH B\n")
    with pytest.raises(ValueError, match="line 2 has 5 fields"):
        read_items(bad)
    bad.write_text(" ".join(HEADER) + "\nf zero 0.2 AH B T s\n")
    with pytest.raises(ValueError, match="onset = 'zero'"):
        read_items(bad)
    with pytest.raises(ValueError, match="not supported"):
        read_items(tmp_path / "x.txt") if (tmp_path / "x.txt").write_text("a") else None
    with pytest.raises(ValueError, match="missing column"):
        Items.from_columns({"#file": ["f"], "onset": ["0"]})


def test_bound_checks() -> None:
    items = Items.from_columns({"#file": ["f", "f"], "onset": ["0.00", "0.90"], "offset": ["0.015", "1.0"]})
    starts, ends = frame_bounds(items, 50)
    check_nonempty(items, starts, ends)
    with pytest.raises(ValueError, match=r"features of 'f' have 49 frames but item 2 .*usually the model drops the "
                                         "last frame"):
        check_within(items, np.array([0, 1]), starts, ends, 49)
    # far too few frames (features at 25 Hz scored at 50, or transposed): not a missing last frame
    with pytest.raises(ValueError, match=r"have 25 frames .*: check the features' frame rate \(frequency; "
                                         r"--frequency on the command line\), that they are \(T, D\) and not "
                                         r"\(D, T\)"):
        check_within(items, np.array([0, 1]), starts, ends, 25)
    check_within(items, np.array([0, 1]), starts, ends, 50)
    # With the Libri-light slicing the first item (one frame) becomes empty.
    bug_starts, bug_ends = frame_bounds(items, 50, librilight_bug=True)
    with pytest.raises(ValueError, match="1 item"):
        check_nonempty(items, bug_starts, bug_ends)


@pytest.mark.parametrize("suffix", [".item", ".csv", ".jsonl"])
def test_errors_name_the_line_of_the_file(tmp_path: Path, suffix: str) -> None:
    """A bad time and an item past its file's frames are named by their line in the file, header and blank lines
    counted, as a bad field count is (they were numbered from the first data row: one line too early)."""
    rows = [("f", "0.0", "0.3"), ("f", "0.3", "0.6"), ("f", "0.6", "0.9")]
    path = tmp_path / f"items{suffix}"

    def write(rows: list[tuple[str, str, str]]) -> None:
        if suffix == ".jsonl":
            lines = [json.dumps({"#file": f, "onset": on, "offset": off}) for f, on, off in rows]
        else:
            separator = " " if suffix == ".item" else ","
            lines = [separator.join(("#file", "onset", "offset"))] + [separator.join(row) for row in rows]
        lines.insert(2, "")  # a blank line before the second data row (jsonl: before the third)
        path.write_text("\n".join(lines) + "\n")

    write([*rows[:2], ("f", "0.6O", "0.9")])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: line {4 if suffix == '.jsonl' else 5}: onset = "
                                         r"'0.6O' is not a number of seconds"):
        read_items(path)
    write(rows)
    items = read_items(path)
    assert items.lines == ((1, 2, 4) if suffix == ".jsonl" else (2, 4, 5))
    starts, ends = frame_bounds(items, 50)
    with pytest.raises(ValueError, match=rf"have 40 frames but the item on line {items.lines[2]} of "):
        check_within(items, np.array([0, 1, 2]), starts, ends, 40)


def test_a_byte_order_mark_does_not_hide_the_file_column(tmp_path: Path) -> None:
    """An item file saved by a spreadsheet starts with a UTF-8 byte-order mark: '#file' is still found."""
    path = tmp_path / "bom.csv"
    path.write_text("#file,onset,offset\nf,0.07,0.3\n", encoding="utf-8-sig")
    assert read_items(path).files == ("f",)
    path.write_bytes("#file,onset,offset\nf\xe9,0.07,0.3\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"bom\.csv:2: not UTF-8 text"):
        read_items(path)


def test_a_csv_header_written_with_spaces_after_the_commas_is_read(tmp_path: Path) -> None:
    """``#file, onset, offset`` (a spreadsheet's or a hand's spacing) names the same columns as without spaces:
    otherwise the time columns are reported missing."""
    path = tmp_path / "spaced.csv"
    path.write_text("#file, onset, offset, #phone\nf, 0.07, 0.3, AH\n")
    items = read_items(path)
    assert (items.files, items.onsets, items.offsets) == (("f",), (Decimal("0.07"),), (Decimal("0.3"),))
    assert items.column("#phone") == ("AH",)


def test_an_item_starting_before_the_file_is_refused() -> None:
    """A negative onset gives a negative first frame, which numpy slicing would read from the end of the
    features: it is out of bounds like an item past the last frame."""
    items = Items.from_columns({"#file": ["f"], "onset": ["-0.1"], "offset": ["0.3"]})
    starts, ends = frame_bounds(items, 50)
    assert (starts.tolist(), ends.tolist()) == ([-5], [15])
    with pytest.raises(ValueError, match=r"features of 'f' have 50 frames but item 1 .* needs frames \[-5, 15\)"):
        check_within(items, np.array([0]), starts, ends, 50)


@pytest.mark.parametrize(("num_frames", "drops_last"), [(49, True), (48, True), (47, False)])
def test_the_dropped_last_frame_hint_is_for_items_one_or_two_frames_past_the_end(num_frames: int,
                                                                                  drops_last: bool) -> None:
    """An item ending with its file needs frame 50 of 0.0-1.0 s at 50 Hz: features of 49 or 48 frames are the
    model dropping a last frame or two (convolutions without padding); 47 is some other mismatch."""
    items = Items.from_columns({"#file": ["f"], "onset": ["0.9"], "offset": ["1.0"]})
    starts, ends = frame_bounds(items, 50)
    assert ends.tolist() == [50]
    with pytest.raises(ValueError, match=rf"have {num_frames} frames but item 1 .* needs frames \[45, 50\)") as info:
        check_within(items, np.array([0]), starts, ends, num_frames)
    assert ("usually the model drops the last frame" in str(info.value)) is drops_last
    assert ("check the features' frame rate (frequency; --frequency on the command line)" in str(info.value)) \
        is not drops_last


def test_a_duplicate_column_name_is_refused(tmp_path: Path) -> None:
    """Two 'onset' columns: the second silently replaced the first (or doubled one column's values)."""
    for suffix, sep in ((".item", " "), (".csv", ",")):
        path = tmp_path / f"dup{suffix}"
        path.write_text(sep.join(["#file", "onset", "offset", "onset"]) + "\n" + sep.join(["f", "0.1", "0.2", "0.3"])
                        + "\n")
        with pytest.raises(ValueError, match=rf"item file {path}: duplicate column names"):
            read_items(path)


def test_a_jsonl_row_with_other_keys_or_not_an_object_is_named_by_its_line(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    first = json.dumps({"#file": "f", "onset": 0.1, "offset": 0.2})
    for bad, message in ((json.dumps({"#file": "f", "onset": 0.1}), "line 3 has keys"),
                         (json.dumps({"#file": "f", "onset": 0.1, "offset": 0.2, "speaker": "s"}), "line 3 has keys"),
                         (json.dumps(["f", 0.1, 0.2]), "line 3 is not a JSON object")):
        path.write_text(f"{first}\n{first}\n{bad}\n")
        with pytest.raises(ValueError, match=rf"item file {path}: {message}"):
            read_items(path)


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_non_finite_times_are_refused_naming_their_line(tmp_path: Path, value: str) -> None:
    path = tmp_path / "items.item"
    path.write_text(f"#file onset offset\nf 0.1 0.2\nf 0.3 {value}\n")
    with pytest.raises(ValueError, match=rf"line 3: offset = '{value}' is not a finite number of seconds"):
        read_items(path)


@pytest.mark.parametrize("suffix", [".item", ".csv"])
def test_a_header_without_rows_has_no_items(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_text(("#file onset offset" if suffix == ".item" else "#file,onset,offset") + "\n\n")
    with pytest.raises(ValueError, match=rf"item file {path} has no items"):
        read_items(path)


def test_a_zero_frequency_is_refused() -> None:
    from spidr.eval.items import Items

    items = Items.from_columns({"#file": ["f"], "onset": ["0"], "offset": ["1"]})
    for frequency in (0, "0", 0.0, "-50"):
        with pytest.raises(ValueError, match="positive number of Hz"):
            frame_bounds(items, frequency)


def test_a_jsonl_item_file_with_a_byte_order_mark_and_the_ndjson_suffix_are_read(tmp_path: Path) -> None:
    row = json.dumps({"#file": "f", "onset": 0.07, "offset": 0.3})
    for name, encoding in (("bom.jsonl", "utf-8-sig"), ("plain.ndjson", "utf-8")):
        (tmp_path / name).write_text(row + "\n", encoding=encoding)
        items = read_items(tmp_path / name)
        assert (items.files, items.onsets, items.offsets) == (("f",), (Decimal("0.07"),), (Decimal("0.3"),))


def test_item_fields_may_be_separated_by_tabs_and_runs_of_spaces(tmp_path: Path) -> None:
    """The .item format splits on whitespace: hand-aligned columns and tab-separated exports are the same file."""
    path = tmp_path / "aligned.item"
    path.write_text("#file\tonset\toffset  #phone\nf\t0.07\t0.3     AH\ng   0.315  0.5  T\n")
    items = read_items(path)
    assert items.files == ("f", "g")
    assert items.onsets == (Decimal("0.07"), Decimal("0.315"))
    assert items.column("#phone") == ("AH", "T")


def test_json_times_are_read_as_the_decimals_written(tmp_path: Path) -> None:
    """A time with more digits than a float holds: 0.07000000000000000001 s at 50 Hz is 3.0000000000000000005
    frames past the half, so its first frame is 4; read through a float (0.07) it would be 3."""
    path = tmp_path / "items.jsonl"
    path.write_text('{"#file": "f", "onset": 0.07000000000000000001, "offset": 0.3}\n')
    items = read_items(path)
    assert items.onsets == (Decimal("0.07000000000000000001"),)
    assert frame_bounds(items, 50)[0].tolist() == [4]


def test_float_times_are_read_as_the_decimals_they_print():
    """mut I03 (float times turned into Decimal directly: 0.07 became 0.07000000000000000666…). The from_columns
    docstring: floats go through str. Truth: onset 0.07 s at 50 Hz is frame 3's centre, so the item starts at frame
    3 (ceil(3.5 − ½)); the binary value would start it at frame 4."""
    items = Items.from_columns({"#file": ["f", "f"], "onset": [0.07, 0.315], "offset": [0.09, 0.5]})
    assert items.onsets == (Decimal("0.07"), Decimal("0.315"))
    assert items.offsets == (Decimal("0.09"), Decimal("0.5"))
    starts, ends = frame_bounds(items, 50)
    assert starts.tolist() == [3, 16]
    assert ends.tolist() == [5, 25]


# spidr items: item files from a user's own alignments ----------------------------------------------------------------
ALIGNED = {  # 100 Hz frame labels (hand-made): stress digits as a forced aligner writes them
    "84-121-0000": ["SIL"] * 5 + ["AH1"] * 10 + ["T"] * 5 + ["IY0"] * 8 + ["SIL"] * 3,
    "84-121-0001": ["SIL"] * 2 + ["K"] * 4 + ["AE1"] * 6 + ["T"] * 3 + ["S"] * 5,
    "91_7": ["sp"] * 4 + ["M"] * 3 + ["AA2"] * 3,
}
# Hand count: an item is a phone with speech on both sides. 0000: T (AH before, IY after) only; 0001: AE (K, T)
# and T (AE, S), K has silence before it and S nothing after it; 91_7: none (AA ends the utterance).
TRIPHONE_ROWS = ["84-121-0000 0.05 0.28 T AH IY 84", "84-121-0001 0.02 0.15 AE K T 84",
                 "84-121-0001 0.06 0.2 T AE S 84"]
PHONEME_ROWS = ["84-121-0000 0.15 0.2 T AH IY 84", "84-121-0001 0.06 0.12 AE K T 84",
                "84-121-0001 0.12 0.15 T AE S 84"]


def _aligned(tmp_path: Path) -> Path:
    path = tmp_path / "ali.jsonl"
    path.write_text("".join(json.dumps({"name": name, "phones": phones}) + "\n" for name, phones in ALIGNED.items()))
    return path


@pytest.mark.parametrize(("kind", "rows"), [("triphone", TRIPHONE_ROWS), ("phoneme", PHONEME_ROWS)])
def test_items_from_alignments_are_the_hand_counted_rows(tmp_path: Path, capsys, kind: str, rows: list[str]) -> None:
    from spidr.cli import main

    out = tmp_path / f"{kind}.item"
    assert main(["items", str(_aligned(tmp_path)), "--out", str(out), "--kind", kind]) == 0
    assert out.read_text().splitlines() == ["#file onset offset #phone prev-phone next-phone speaker", *rows]
    assert f"wrote 3 {kind} items of 3 utterances to {out}" in capsys.readouterr().out
    items = read_items(out)  # what abx and evaluate read
    assert items.files == ("84-121-0000", "84-121-0001", "84-121-0001")
    assert items.labels["speaker"] == ("84", "84", "84")
    assert main(["items", str(_aligned(tmp_path)), "--out", str(out)]) == 2  # (an existing file: --overwrite)


def test_items_from_intervals_equal_those_from_frame_labels(tmp_path: Path) -> None:
    """Invariance: the same alignment as a TSV of intervals in seconds gives the same item file."""
    from spidr.cli import main

    lines = []
    for name, phones in ALIGNED.items():
        frame = 0
        for phone, run in itertools.groupby(phones):
            length = len(list(run))
            lines.append(f"{name}\t{frame / 100:.2f}\t{(frame + length) / 100:.2f}\t{phone}")
            frame += length
    (tmp_path / "ali.tsv").write_text("\n".join(lines) + "\n")
    assert main(["items", str(tmp_path / "ali.tsv"), "--out", str(tmp_path / "a.item")]) == 0
    assert main(["items", str(_aligned(tmp_path)), "--out", str(tmp_path / "b.item")]) == 0
    assert (tmp_path / "a.item").read_text() == (tmp_path / "b.item").read_text()


def test_items_name_what_they_cannot_make(tmp_path: Path, capsys) -> None:
    from spidr.cli import main

    aligned = _aligned(tmp_path)
    assert main(["items", str(aligned), "--out", str(tmp_path / "x.item"), "--speaker-pattern", "^spk"]) == 2
    assert "--speaker-pattern '^spk' has no group" in capsys.readouterr().err
    assert main(["items", str(aligned), "--out", str(tmp_path / "x.item"), "--speaker-pattern", "^(\\d+)-"]) == 2
    assert "utterance '91_7': --speaker-pattern '^(\\\\d+)-' finds no speaker in its name" in capsys.readouterr().err
    silent = tmp_path / "silent.jsonl"
    silent.write_text(json.dumps({"name": "a-1", "phones": ["SIL", "AH", "SIL"]}) + "\n")
    assert main(["items", str(silent), "--out", str(tmp_path / "x.item")]) == 2
    assert "no item: none of the 1 utterances has a speech phone between two speech phones" in (
        capsys.readouterr().err)
    assert not (tmp_path / "x.item").exists()


def test_items_of_the_built_in_corpus_alignments_keep_its_speakers(tmp_path):
    """spidr synth-corpus's alignments.tsv (utt_id onset offset phone speaker) carries each utterance's speaker;
    spidr items ignored that column and took the default pattern's, which merged the four espeak speakers into
    'espeak'. The column is the speaker now, unless --speaker-pattern is given."""
    from spidr.cli import main

    lines = ["utt_id\tonset\toffset\tphone\tspeaker"]
    for utt, speaker in (("espeak_m1-00000", "espeak_m1"), ("espeak_f3-00000", "espeak_f3")):
        for k, phone in enumerate(("SIL", "K", "AE", "T", "SIL")):
            lines.append(f"{utt}\t{k * 0.1:.1f}\t{(k + 1) * 0.1:.1f}\t{phone}\t{speaker}")
    (tmp_path / "alignments.tsv").write_text("\n".join(lines) + "\n")
    assert main(["items", str(tmp_path / "alignments.tsv"), "--out", str(tmp_path / "x.item")]) == 0
    speakers = {row.split()[0]: row.split()[-1] for row in (tmp_path / "x.item").read_text().splitlines()[1:]}
    assert speakers == {"espeak_m1-00000": "espeak_m1", "espeak_f3-00000": "espeak_f3"}
    assert main(["items", str(tmp_path / "alignments.tsv"), "--out", str(tmp_path / "y.item"),
                 "--speaker-pattern", "^([a-z]+)"]) == 0
    assert {row.split()[-1] for row in (tmp_path / "y.item").read_text().splitlines()[1:]} == {"espeak"}


HEADER_LINE = "#file onset offset #phone prev-phone next-phone speaker"


def _jsonl(path: Path, rows: dict[str, list[str]]) -> Path:
    path.write_text("".join(json.dumps({"name": name, "phones": phones}) + "\n" for name, phones in rows.items()))
    return path


def test_items_times_follow_the_alignment_rate_given(tmp_path: Path) -> None:
    """mut IW12 (times printed to 2 decimals) / CMD3 (write_item_file given 100 Hz whatever --alignment-rate says).
    Hand count at 40 Hz (25 ms frames): SIL [0,1) K [1,3) AE [3,4) T [4,7) SIL [7,8); the only item is AE (K, T):
    triphone frames 1..7 = 0.025..0.175 s, phoneme frames 3..4 = 0.075..0.1 s."""
    from spidr.cli import main

    aligned = _jsonl(tmp_path / "ali.jsonl", {"s-1": ["SIL", "K", "K", "AE", "T", "T", "T", "SIL"]})
    for kind, row in (("triphone", "s-1 0.025 0.175 AE K T s"), ("phoneme", "s-1 0.075 0.1 AE K T s")):
        out = tmp_path / f"{kind}.item"
        assert main(["items", str(aligned), "--out", str(out), "--kind", kind, "--alignment-rate", "40"]) == 0
        assert out.read_text().splitlines() == [HEADER_LINE, row]


def test_items_do_not_depend_on_the_order_of_the_utterances_in_the_alignment_file(tmp_path: Path) -> None:
    """mut IW7 (sorted() dropped): invariance, the same alignments listed in another order give the same item file
    (rows in utterance then time order, as the module says)."""
    from spidr.cli import main

    rows = {"84-121-0000": ["SIL", "AH", "T", "IY", "SIL"], "84-121-0001": ["SIL", "K", "AE", "T", "S"]}
    _jsonl(tmp_path / "a.jsonl", rows)
    _jsonl(tmp_path / "b.jsonl", dict(reversed(list(rows.items()))))
    assert main(["items", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "a.item")]) == 0
    assert main(["items", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "b.item")]) == 0
    assert (tmp_path / "a.item").read_text() == (tmp_path / "b.item").read_text()
    assert [row.split()[0] for row in (tmp_path / "a.item").read_text().splitlines()[1:]] == [
        "84-121-0000", "84-121-0001", "84-121-0001"]


def test_an_utterance_without_frames_gives_no_item_and_no_crash(tmp_path: Path) -> None:
    """mut IW2 (segments() without its empty guard: IndexError on codes[0] of an empty utterance)."""
    from spidr.cli import main

    aligned = _jsonl(tmp_path / "ali.jsonl", {"a-0": [], "a-1": ["SIL", "K", "AE", "T", "S"]})
    out = tmp_path / "x.item"
    assert main(["items", str(aligned), "--out", str(out)]) == 0
    assert out.read_text().splitlines() == [HEADER_LINE, "a-1 0.01 0.04 AE K T a", "a-1 0.02 0.05 T AE S a"]


def test_items_refuse_an_empty_speaker_and_names_with_spaces(tmp_path: Path, capsys) -> None:
    """mut IW9 (an empty first group taken as the speaker: rows end in a blank column) and IW10 (the whitespace check
    dropped: a name or speaker with a space shifts every column after it)."""
    from spidr.cli import main

    aligned = _jsonl(tmp_path / "ali.jsonl", {"84-1": ["SIL", "K", "AE", "T", "S"]})
    out = tmp_path / "x.item"
    assert main(["items", str(aligned), "--out", str(out), "--speaker-pattern", "^(x*)"]) == 2
    assert "utterance '84-1': --speaker-pattern '^(x*)' finds no speaker in its name" in capsys.readouterr().err
    assert not out.exists()
    spaced = _jsonl(tmp_path / "spaced.jsonl", {"84 a-1": ["SIL", "K", "AE", "T", "S"]})
    assert main(["items", str(spaced), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "utterance '84 a-1' (speaker '84 a')" in err
    assert "names and speakers must hold none" in err
    assert not out.exists()


def _intervals(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_interval_tsv_giving_one_utterance_two_speakers_is_refused_naming_the_line(tmp_path: Path, capsys) -> None:
    """mut IW5 (the consistency check of the speaker column dropped: the first speaker silently kept)."""
    from spidr.cli import main

    lines = ["utt\tonset\toffset\tphone\tspeaker"]
    for k, phone in enumerate(("SIL", "K", "AE", "T", "SIL")):
        lines.append(f"u-1\t{k * 0.1:.1f}\t{(k + 1) * 0.1:.1f}\t{phone}\t{'s1' if k < 2 else 's2'}")
    out = tmp_path / "x.item"
    assert main(["items", str(_intervals(tmp_path / "ali.tsv", lines)), "--out", str(out)]) == 2
    assert "line 4: utterance 'u-1' is said by 's2', but by 's1' on an earlier line" in capsys.readouterr().err
    assert not out.exists()


def test_an_interval_tsv_with_the_speaker_column_on_some_lines_only_is_refused(tmp_path: Path, capsys) -> None:
    """mut IW4 (a line without a fifth column skipped: the utterances it held had no speaker, and item_rows raised a
    bare KeyError). Such a file was then read as having no speaker column, which silently replaced the speakers it
    gives ('spkA') by the names' ('84'); it is refused naming the line, and --speaker-pattern still reads it."""
    from spidr.cli import main

    lines = ["utt\tonset\toffset\tphone\tspeaker"]
    for utt, speaker in (("84-1", "\tspkA"), ("91-2", "")):
        for k, phone in enumerate(("SIL", "K", "AE", "T", "SIL")):
            lines.append(f"{utt}\t{k * 0.1:.1f}\t{(k + 1) * 0.1:.1f}\t{phone}{speaker}")
    aligned, out = _intervals(tmp_path / "ali.tsv", lines), tmp_path / "x.item"
    assert main(["items", str(aligned), "--out", str(out)]) == 2
    assert "ali.tsv: line 7 gives no speaker, but the header names a fifth column 'speaker'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["items", str(aligned), "--out", str(out), "--speaker-pattern", "^([^-]+)"]) == 0
    speakers = {row.split()[0]: row.split()[-1] for row in out.read_text().splitlines()[1:]}
    assert speakers == {"84-1": "84", "91-2": "91"}


def test_items_of_libri_light_frame_label_lines_take_the_speaker_from_the_name(tmp_path: Path) -> None:
    """mut IW6 (interval_speakers without its holds_frame_labels check: the fifth field of a frame-label line, a
    phone index, became every item's speaker). Hand count: 6 6 7 7 8 8 9 → items 7 (6, 8) and 8 (7, 9)."""
    from spidr.cli import main

    frames = _intervals(tmp_path / "converted_aligned_phones.txt", ["84-121-0000 6 6 7 7 8 8 9"])
    out = tmp_path / "x.item"
    assert main(["items", str(frames), "--out", str(out)]) == 0
    assert out.read_text().splitlines() == [HEADER_LINE, "84-121-0000 0 0.06 7 6 8 84",
                                            "84-121-0000 0.02 0.07 8 7 9 84"]


def _items_of(tmp_path: Path, fifth: str, header: str | None) -> str:
    from spidr.cli import main

    lines = [header] if header else []
    for k, phone in enumerate(("SIL", "K", "AE", "T", "SIL")):
        lines.append(f"84-1-0\t{k * 0.1:.1f}\t{(k + 1) * 0.1:.1f}\t{phone}\t{fifth if fifth != 'word' else phone}")
    (tmp_path / "ali.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "x.item"
    assert main(["items", str(tmp_path / "ali.tsv"), "--out", str(out), "--overwrite"]) == 0
    return out.read_text().splitlines()[1].split()[-1]


def test_a_fifth_column_that_is_not_the_speaker_does_not_replace_the_pattern(tmp_path):
    """Interval TSVs may hold more columns than utterance onset offset phone; spidr items took any fifth column for
    the speaker: a word column was refused, a constant one (a confidence) silently became every item's speaker. Only
    a column its header names speaker is (synth-corpus's alignments.tsv)."""
    assert _items_of(tmp_path, "word", "utt\tonset\toffset\tphone\tword") == "84"
    assert _items_of(tmp_path, "1.0", None) == "84"
    assert _items_of(tmp_path, "spk7", "utt_id\tonset\toffset\tphone\tspeaker") == "spk7"


def _tsv_items(tmp_path: Path, lines: list[str], *options: str):
    from spidr.cli import main

    (tmp_path / "ali.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "x.item"
    code = main(["items", str(tmp_path / "ali.tsv"), "--out", str(out), "--overwrite", *options])
    return code, out


def test_a_speaker_header_in_capitals_is_the_speaker_column(tmp_path: Path) -> None:
    """mut W02 (the header compared case-sensitively: a 'Speaker' column, as spreadsheets capitalise headers, was
    taken for no speaker column and every item got the name's prefix '84' instead of the file's 'spk7')."""
    lines = ["Utt\tOnset\tOffset\tPhone\tSpeaker"]
    for k, phone in enumerate(("SIL", "K", "AE", "T", "SIL")):
        lines.append(f"84-1-0\t{k * 0.1:.1f}\t{(k + 1) * 0.1:.1f}\t{phone}\tspk7")
    code, out = _tsv_items(tmp_path, lines)
    assert code == 0
    assert [row.split()[-1] for row in out.read_text().splitlines()[1:]] == ["spk7"]


def test_an_empty_speaker_cell_is_refused_naming_its_line(tmp_path: Path, capsys) -> None:
    """mut W03 (an empty fifth cell under a 'speaker' header taken as a speaker: the item rows of an utterance whose
    cells are all empty ended in a blank column, which abx then reads as a row of six fields). Line 2, the first of
    the utterance, has the tab but no speaker."""
    lines = ["utt\tonset\toffset\tphone\tspeaker"]
    for k, phone in enumerate(("SIL", "K", "AE", "T", "SIL")):
        lines.append(f"84-1-0\t{k * 0.1:.1f}\t{(k + 1) * 0.1:.1f}\t{phone}\t")
    code, out = _tsv_items(tmp_path, lines)
    assert code == 2
    assert "ali.tsv: line 2 gives no speaker, but the header names a fifth column 'speaker'" in capsys.readouterr().err
    assert not out.exists()


def test_whole_second_times_are_written_without_a_trailing_point(tmp_path: Path) -> None:
    """mut W07 (the trailing '.' of a whole number of seconds kept: '1.' and '2.' instead of '1' and '2'). Hand
    count at 100 Hz: SIL [0,50) K [50,100) AE [100,200) T [200,250) SIL [250,260): the only item is AE (K, T),
    its phone spanning frames 100..200 = 1 s .. 2 s, its triphone 50..250 = 0.5 s .. 2.5 s."""
    from spidr.cli import main

    phones = ["SIL"] * 50 + ["K"] * 50 + ["AE"] * 100 + ["T"] * 50 + ["SIL"] * 10
    aligned = tmp_path / "ali.jsonl"
    aligned.write_text(json.dumps({"name": "s-1", "phones": phones}) + "\n")
    for kind, row in (("phoneme", "s-1 1 2 AE K T s"), ("triphone", "s-1 0.5 2.5 AE K T s")):
        out = tmp_path / f"{kind}.item"
        assert main(["items", str(aligned), "--out", str(out), "--kind", kind]) == 0
        assert out.read_text().splitlines() == ["#file onset offset #phone prev-phone next-phone speaker", row]


def test_items_refuse_a_phone_label_with_a_space(tmp_path: Path, capsys) -> None:
    """(tg31) A phone label holding a space was written as two columns, an item file that read_items (abx,
    evaluate) then refused ("line 2 has 8 fields"); TextGrid labels make such labels likelier. Refused up front,
    naming the label, with no item file written."""
    from spidr.cli import main

    (tmp_path / "a.tsv").write_text("u-1\t0\t0.1\tA\nu-1\t0.1\t0.2\tB C\nu-1\t0.2\t0.3\tD\n")
    assert main(["items", str(tmp_path / "a.tsv"), "--out", str(tmp_path / "a.item")]) == 2
    assert "phone label 'B C'" in capsys.readouterr().err
    assert not (tmp_path / "a.item").exists()


@pytest.mark.parametrize("label", ["B\tC", "B\u00a0C", ""], ids=["tab", "nbsp", "empty"])
def test_items_refuse_a_phone_label_with_any_whitespace_or_none(tmp_path: Path, capsys, label: str) -> None:
    """read_items splits a line at any whitespace (str.split), so a label holding a tab or a no-break space, or an
    empty label, would shift the columns: refused up front, naming the label, with no item file written."""
    from spidr.cli import main

    phones = ["A"] * 3 + [label] * 3 + ["D"] * 3
    (tmp_path / "a.jsonl").write_text(json.dumps({"name": "u-1", "phones": phones}) + "\n")
    assert main(["items", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "a.item")]) == 2
    assert f"phone label {label!r}" in capsys.readouterr().err
    assert not (tmp_path / "a.item").exists()


def _alignments(tmp_path: Path, utterances: int) -> Path:
    rng = np.random.default_rng(0)
    phones = ["AA", "AE", "AH", "B", "D", "EH", "IY", "K", "L", "M", "N", "P", "S", "T"]
    path = tmp_path / "alignments.tsv"
    with path.open("w") as handle:
        handle.write("utterance\tonset\toffset\tphone\n")
        for i in range(utterances):
            t = 0
            for _ in range(200):
                d = int(rng.integers(3, 15))
                handle.write(f"{i % 50}-1-{i:05d}\t{t / 100:.2f}\t{(t + d) / 100:.2f}\t{phones[rng.integers(14)]}\n")
                t += d
    return path


def test_an_item_file_is_written_without_holding_all_its_rows(tmp_path: Path) -> None:
    """write_item_file makes a list of every row and then one string of the whole file (≈ 150 B per item): ≈ 4.5 GB
    for LibriSpeech 960 h's ≈ 30M triphone items. Rows can be streamed to the temporary file."""
    from spidr.eval.item_writer import write_item_file
    from spidr.eval.unit_quality import read_alignments

    alignments = read_alignments(_alignments(tmp_path, 200))
    tracemalloc.start()
    try:
        count = write_item_file(tmp_path / "t.item", alignments, alignment_rate_hz=100, speaker_pattern="^([0-9]+)-")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count > 30_000
    assert peak < 20 * count, f"peak {peak / 1e6:.1f} MB of traced memory for {count} items"


def _code(argv: list[str]) -> int:
    """spidr's exit status for argv: main's return, or argparse's SystemExit (a refusal at either level)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("rate", ["0", "-1", "-100"])
def test_items_refuses_a_non_positive_alignment_rate_and_writes_nothing(tmp_path, capsys, rate):
    """--alignment-rate -1 wrote an item file of negative, inverted onsets/offsets with exit 0; 0 raised
    ZeroDivisionError."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"name": f"u{i}", "phones": ["SIL"] * 5 + ["AA"] * 8 + ["B"] * 6 + ["IY"] * 7
                                          + ["SIL"] * 5}) + "\n" for i in range(3)))
    out = tmp_path / "x.item"
    assert _code(["items", str(labels), "--out", str(out), "--alignment-rate", rate]) == 2
    assert "alignment-rate" in capsys.readouterr().err
    assert not out.exists()


# spidr items' writer → read_items → frame_bounds gives back each item's frames exactly, at any alignment
# rate (times are written to 6 decimals), with names holding '#', ',', '.' and non-ASCII letters.



_PHONES = ["AA", "B", "SIL", "T", "K"]


@settings(max_examples=80, deadline=None, derandomize=True)
@given(labels=st.dictionaries(st.from_regex(r"[A-Za-z0-9]{1,4}-[A-Za-z0-9#,.é]{1,5}", fullmatch=True),
                              st.lists(st.sampled_from(_PHONES), max_size=40), min_size=1, max_size=4),
       kind=st.sampled_from(["triphone", "phoneme"]), rate=st.sampled_from([100, 50, 16000, 30, 7]))
def test_written_items_read_back_to_their_frames(labels, kind, rate) -> None:
    alignments = Alignments.from_labels(labels.items())
    expected = []
    for name in sorted(labels):
        runs = segments(alignments.codes[name])
        for (begin, _, before), (onset, offset, phone), (_, end, after) in zip(runs, runs[1:], runs[2:],
                                                                               strict=False):
            names = [alignments.phones[code] for code in (phone, before, after)]
            if "SIL" not in names:
                start, stop = (begin, end) if kind == "triphone" else (onset, offset)
                expected.append((name, start, stop, *names, name.split("-")[0]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.item"
        if not expected:
            with pytest.raises(ValueError, match="no item"):
                write_item_file(path, alignments, alignment_rate_hz=rate, kind=kind)
            return
        assert write_item_file(path, alignments, alignment_rate_hz=rate, kind=kind) == len(expected)
        items = read_items(path)
        starts, ends = frame_bounds(items, rate)
        found = list(zip(items.files, starts.tolist(), ends.tolist(), items.column("#phone"),
                         items.column("prev-phone"), items.column("next-phone"), items.column("speaker"),
                         strict=True))
        assert found == expected


@pytest.mark.parametrize("suffix", [".item", ".csv", ".jsonl", ".txt", ".item.gz"])
def test_items_output_reads_back_under_its_suffix_or_is_refused(tmp_path: Path, suffix: str) -> None:
    """`spidr items ALIGN --out x.csv` wrote the whitespace .item layout under a .csv name (exit 0), which abx,
    evaluate and probe then refuse ('missing column(s)'; '.jsonl': 'line 1 is not valid JSON'; '.txt', '.gz':
    'extension ... is not supported'). Either the file reads back as the item file its name says, or the command
    refuses the suffix (exit 2) and writes nothing."""
    phones = ["SIL"] * 3 + ["AA"] * 5 + ["B"] * 5 + ["IY"] * 5 + ["K"] * 5 + ["SIL"] * 3
    alignments = tmp_path / "a.jsonl"
    alignments.write_text(json.dumps({"name": "spk-1", "phones": phones}) + "\n")
    out = tmp_path / f"x{suffix}"
    code = main(["items", str(alignments), "--out", str(out)])
    if suffix == ".item":
        assert code == 0
        assert len(read_items(out)) == 2  # AA and B in context: the triphones AA-B and B-IY
    else:
        assert code == 2
        assert not out.exists()


@pytest.mark.parametrize("name", ["u.txt", "u.json", "u.gz"])
def test_units_output_with_an_extension_its_readers_do_not_know_is_refused_first(tmp_path, capsys, name):
    """`spidr units --out u.txt` wrote JSON lines under a name that abx, units-quality and lm-train refuse (they
    know a units file by .jsonl / .jsonl.gz): refused before any feature is read, naming the file."""
    code = main(["units", str(tmp_path / "features"), "--centroids", str(tmp_path / "c.safetensors"),
                 "--out", str(tmp_path / name)])
    assert code == 2
    assert f"--out {tmp_path / name} must end in .jsonl" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("kind", ["triphone", "phoneme"])
def test_items_made_in_memory_are_the_hand_counted_rows_the_file_holds(tmp_path: Path, kind: str) -> None:
    """items_from_alignments: the items of the hand-counted rows above (those spidr items writes), without a file;
    an abx on them scores as on the file; alignments without an item are refused as the writer refuses them."""
    from spidr.eval.abx import abx
    from spidr.eval.unit_quality import without_stress

    alignments = without_stress(Alignments.from_labels(ALIGNED.items()))  # (as spidr items reads them)
    made = items_from_alignments(alignments, alignment_rate_hz=100, kind=kind)
    rows = TRIPHONE_ROWS if kind == "triphone" else PHONEME_ROWS
    header = ["#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker"]
    expected = Items.from_columns(dict(zip(header, zip(*(row.split() for row in rows), strict=True), strict=True)))
    assert (made.files, made.onsets, made.offsets, made.labels) == (
        expected.files, expected.onsets, expected.offsets, expected.labels)
    write_item_file(tmp_path / "x.item", alignments, alignment_rate_hz=100, kind=kind)
    rng = np.random.default_rng(0)
    features = {name: rng.normal(size=(len(phones) // 2 + 1, 3)).astype(np.float32)
                for name, phones in ALIGNED.items()}
    options = {"speaker": "within", "context": "any", "frequency": 50, "max_size_group": None}
    assert abx(features, made, **options).error_rate == abx(features, tmp_path / "x.item", **options).error_rate
    with pytest.raises(ValueError, match="no item: none of the 1 utterances"):
        items_from_alignments(Alignments.from_labels([("spk-1", ["SIL", "A", "B", "SIL"])]), alignment_rate_hz=100)
