"""ZeroSpeech 2021 / StoryCloze formats: gold and submission round trips, StoryCloze names, and every refusal."""

from __future__ import annotations

import logging
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spidr.lm.zerospeech import (
    LexicalItem,
    StoryClozeItem,
    SyntacticItem,
    check_complete,
    is_stem,
    read_lexical_gold,
    read_storycloze_gold,
    read_submission,
    read_syntactic_gold,
    storycloze_gold_from_filenames,
    write_lexical_gold,
    write_storycloze_gold,
    write_submission,
    write_syntactic_gold,
)

LEXICAL = [
    LexicalItem("1", "aAAfmkmQpVz", "Alex", 12, "brick", "b ɹ ɪ k", 4, correct=True),
    LexicalItem("1", "bXtqzzLmjkk", "Alex", 12, "brilk", "b ɹ ɪ l k", 5, correct=False),
    LexicalItem("2", "cQqoWmEExPk", "Alex", None, "zap", "z æ p", 3, correct=True),
    LexicalItem("2", "dHsaPPqmMml", "Alex", None, "zep", "z ɛ p", 3, correct=False),
]
SYNTACTIC = [
    SyntacticItem("7", "s1", "Bob", "island_effects", "adjunct_island", "who did you leave after seeing", True),
    SyntacticItem("7", "s2", "Bob", "island_effects", "adjunct_island", "who did you leave after seeing it", False),
]
STORIES = [
    StoryClozeItem("a1b2", "0_a1b2_correct", "", "tsc", "Tom ran. He was tired.", True),
    StoryClozeItem("a1b2", "0_a1b2_incorrect", "", "tsc", "Tom ran. The cake baked.", False),
]


def test_gold_round_trips(tmp_path: Path) -> None:
    write_lexical_gold(tmp_path / "lexical" / "gold.csv", LEXICAL)
    write_syntactic_gold(tmp_path / "syntactic" / "gold.csv", SYNTACTIC)
    write_storycloze_gold(tmp_path / "tsc" / "gold.csv", STORIES)
    assert read_lexical_gold(tmp_path / "lexical" / "gold.csv") == LEXICAL
    assert read_syntactic_gold(tmp_path / "syntactic" / "gold.csv") == SYNTACTIC
    assert read_storycloze_gold(tmp_path / "tsc" / "gold.csv") == STORIES
    # Unknown frequency is an empty field, booleans are 1/0, as in the released files.
    lines = (tmp_path / "lexical" / "gold.csv").read_text().splitlines()
    assert lines[0] == "id,filename,voice,frequency,word,phones,length,correct"
    assert lines[3] == "2,cQqoWmEExPk,Alex,,zap,z æ p,3,1"


def test_gold_tolerates_extra_and_reordered_columns(tmp_path: Path) -> None:
    path = tmp_path / "gold.csv"
    path.write_text("correct,length,phones,word,frequency,voice,filename,id,comment\n"
                    "1,4,b r i k,brick,0,Alex,w1,1,seen once\n0,4,b r i l,bril,0,Alex,n1,1,\n")
    items = read_lexical_gold(path)
    assert items[0] == LexicalItem("1", "w1", "Alex", 0, "brick", "b r i k", 4, correct=True)
    assert not items[1].correct
    path.write_text("id,filename,voice,type,transcription,correct\n1,a,,t,x,1\n", encoding="utf-8-sig")
    assert read_storycloze_gold(path)[0].id == "1"  # a byte-order mark does not hide the 'id' column


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1,w2,Alex,-3,brick,b r,2,1", r"line 3, column 'frequency': expected a non-negative integer, found '-3'"),
        ("1,w2,Alex,3,brick,b r,two,1", r"line 3, column 'length': expected a non-negative integer"),
        ("1,w2,Alex,3,brick,b r,2,yes", r"line 3, column 'correct': expected 1 \(correct\) or 0"),
        ("1,w 2,Alex,3,brick,b r,2,1", r"line 3, column 'filename': expected a wav stem"),
        (",w2,Alex,3,brick,b r,2,1", r"line 3, column 'id': expected a non-empty value"),
        ("1,w1,Alex,3,brick,b r,2,1", r"line 3: filename 'w1' already on line 2"),
        ("1,w2,Alex", r"line 3: has fewer fields than the header"),
        ("1,w2,Alex,3,brick,b r,2,1,extra", r"line 3: has 9 fields, the header 8 \(quote a field that holds a "
                                            r"comma\)"),
    ],
)
def test_gold_field_errors_name_file_line_and_column(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "gold.csv"
    path.write_text(f"id,filename,voice,frequency,word,phones,length,correct\n1,w1,Alex,3,brick,b r,2,1\n{line}\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {message}"):
        read_lexical_gold(path)


def test_integer_valued_floats_are_counts(tmp_path: Path) -> None:
    """pandas writes an integer column with empty cells (the nonword rows' frequency) as floats, and the toolkit
    reads such a gold file: "3.0" is 3; "3.5" is no count."""
    path = tmp_path / "gold.csv"
    path.write_text("id,filename,voice,frequency,word,phones,length,correct\n1,w1,Alex,3.0,brick,b r,2.0,1\n"
                    "1,w2,Alex,,,b l,2,0\n")
    assert [(row.frequency, row.length) for row in read_lexical_gold(path)] == [(3, 2), (None, 2)]
    path.write_text("id,filename,voice,frequency,word,phones,length,correct\n1,w1,Alex,3.5,brick,b r,2,1\n")
    with pytest.raises(ValueError, match=r"line 2, column 'frequency': expected a non-negative integer, found '3.5'"):
        read_lexical_gold(path)


def test_text_that_is_not_utf8_is_named_by_file_and_line(tmp_path: Path) -> None:
    """A Latin-1 gold file or submission: the error names the file and the line (it named neither: "'utf-8' codec
    can't decode byte 0xe9 in position 74")."""
    gold = tmp_path / "gold.csv"
    gold.write_bytes("id,filename,voice,type,transcription,correct\n1,a,v,t,x,1\n1,b,v,t,caf\xe9,0\n"
                     .encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(gold))}:3: not UTF-8 text .*save the gold file as UTF-8"):
        read_syntactic_gold(gold)
    submission = tmp_path / "dev.txt"
    submission.write_bytes("a 1.0\nb\xe9 2.0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(submission))}:2: not UTF-8 text"):
        read_submission(submission)


def test_gold_header_errors(tmp_path: Path) -> None:
    path = tmp_path / "gold.csv"
    path.write_text("id,filename,voice,type,transcription,correct\n1,a,v,t,x,1\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: header .* lacks the column\(s\) subtype"):
        read_syntactic_gold(path)
    path.write_text("id,filename,voice,type,transcription,correct\n")
    with pytest.raises(ValueError, match="has no row"):
        read_storycloze_gold(path)
    path.write_text("")
    with pytest.raises(ValueError, match=r"gold\.csv is empty: expected a header line id,filename,voice,type,"):
        read_storycloze_gold(path)
    # an unquoted comma in a transcription: the row's fields no longer line up with the header's (it used to be
    # reported as column 'correct' holding ' barks')
    path.write_text("id,filename,voice,type,transcription,correct\n1,a,v,t,the dog, barks,1\n")
    with pytest.raises(ValueError, match=r"line 2: has 7 fields, the header 6"):
        read_storycloze_gold(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_lexical_gold(tmp_path / "absent.csv")


def test_storycloze_pairs_from_filenames(tmp_path: Path) -> None:
    for name in ["10_b_2_correct", "10_b_2_incorrect", "2_a-c_incorrect", "2_a-c_correct"]:
        (tmp_path / f"{name}.wav").touch()
    (tmp_path / "notes.txt").touch()  # not a wav: ignored
    items = storycloze_gold_from_filenames(tmp_path)
    # Sorted by n numerically (2 before 10), correct first; the prefix id may hold underscores.
    assert items == [
        StoryClozeItem("a-c", "2_a-c_correct", "", "", "", correct=True),
        StoryClozeItem("a-c", "2_a-c_incorrect", "", "", "", correct=False),
        StoryClozeItem("b_2", "10_b_2_correct", "", "", "", correct=True),
        StoryClozeItem("b_2", "10_b_2_incorrect", "", "", "", correct=False),
    ]


def test_storycloze_names_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no \.wav file"):
        storycloze_gold_from_filenames(tmp_path)
    (tmp_path / "3_x_correct.wav").touch()
    with pytest.raises(ValueError, match=r"prefix id 'x' has 1 correct and 0 incorrect wavs \(3_x_correct\)"):
        storycloze_gold_from_filenames(tmp_path)
    (tmp_path / "3_x_incorrect.wav").touch()
    (tmp_path / "4_x_incorrect.wav").touch()
    with pytest.raises(ValueError, match="prefix id 'x' has 1 correct and 2 incorrect"):
        storycloze_gold_from_filenames(tmp_path)
    (tmp_path / "4_x_incorrect.wav").unlink()
    (tmp_path / "story_7.wav").touch()
    with pytest.raises(ValueError, match=r"story_7.wav: expected a name of the form"):
        storycloze_gold_from_filenames(tmp_path)


def test_submission_round_trip_is_bit_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = {f"stem{i}": float(value) for i, value in enumerate(rng.normal(-300, 50, size=50))}
    scores |= {"tiny": 5e-324, "third": 1 / 3, "minus_inf": -math.inf, "int_like": np.float64(-2.0)}
    path = tmp_path / "lexical" / "dev.txt"
    write_submission(path, scores)
    back = read_submission(path)
    assert back == scores
    assert all(math.copysign(1, back[stem]) == math.copysign(1, scores[stem]) for stem in scores)
    lines = path.read_text().splitlines()
    assert lines == sorted(lines)  # sorted by stem
    assert "int_like -2.0" in lines  # a numpy scalar is written as a plain float


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a 1.0\nb 2.0 3.0\n", r"line 2: expected '<stem> <score>', found 'b 2.0 3.0'"),
        ("a 1.0\nb\n", r"line 2: expected '<stem> <score>'"),
        ("a 1.0\nb one\n", r"line 2: score 'one' of 'b' is not a float"),
        ("a nan\n", r"line 1: score of 'a' is NaN"),
        ("a 1.0\n\nb 2\na 3\n", r"line 4: stem 'a' already on line 1"),
    ],
)
def test_submission_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "dev.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {message}"):
        read_submission(path)


def test_a_submission_with_a_byte_order_mark_reads_its_first_stem(tmp_path: Path) -> None:
    path = tmp_path / "dev.txt"
    path.write_text("w1a -1.5\nw1b -2.0\n", encoding="utf-8-sig")
    assert read_submission(path) == {"w1a": -1.5, "w1b": -2.0}


def test_lines_the_official_validator_refuses_are_read_and_named_once(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The zerospeech2021 validator splits line.strip() on one space and wants 2 fields: a tab, two spaces or a
    blank line fail its check; spidr reads them and says which lines would (trailing spaces pass both)."""
    path = tmp_path / "dev.txt"
    path.write_text("a -1.0  \nb\t-2.0\n\nc  -3.0\nd -4.0\r\n")
    with caplog.at_level(logging.WARNING, logger="spidr.lm.zerospeech"):
        assert read_submission(path) == {"a": -1.0, "b": -2.0, "c": -3.0, "d": -4.0}
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 3 line(s) (2, 3, 4) are not '<stem> <score>' with one space, which the official ZeroSpeech 2021 "
        "validator refuses (blank lines, tabs, several spaces, a byte-order mark); read here all the same"]
    caplog.clear()
    write_submission(path, {"a": -1.0, "b": -2.0})  # spidr's own files pass the official check
    with caplog.at_level(logging.WARNING, logger="spidr.lm.zerospeech"):
        read_submission(path)
    assert not caplog.records


def test_a_byte_order_mark_is_read_and_named_as_the_official_validator_refuses_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """zerospeech2021's validator opens the file as plain UTF-8: its first stem is '\\ufeffa1w', no wav's, and it
    refuses the file. spidr reads the stem without the mark and names line 1 once, also when line 1 is refused for
    another reason too."""
    path = tmp_path / "dev.txt"
    for text, lines in ((b"a1w -1\na1n -2\n", "1 line(s) (1)"), (b"a1w\t-1\na1n -2\n\n", "2 line(s) (1, 3)")):
        path.write_bytes(b"\xef\xbb\xbf" + text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spidr.lm.zerospeech"):
            assert read_submission(path) == {"a1w": -1.0, "a1n": -2.0}
        assert [r.getMessage() for r in caplog.records] == [
            f"{path}: {lines} are not '<stem> <score>' with one space, which the official ZeroSpeech 2021 validator "
            "refuses (blank lines, tabs, several spaces, a byte-order mark); read here all the same"]


def test_empty_or_absent_submission(tmp_path: Path) -> None:
    path = tmp_path / "dev.txt"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=rf"submission file {re.escape(str(path))} has no line"):
        read_submission(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_submission(tmp_path / "test.txt")


def test_write_submission_refuses_nan_and_bad_stems(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NaN score of 'a'"):
        write_submission(tmp_path / "dev.txt", {"a": math.nan})
    with pytest.raises(ValueError, match="stems must be non-empty"):
        write_submission(tmp_path / "dev.txt", {"a b": 1.0})


def test_check_complete_names_missing_and_extra(tmp_path: Path) -> None:
    gold = LEXICAL
    complete = {item.filename: 0.0 for item in gold}
    check_complete(complete, gold, tmp_path / "dev.txt")
    missing = dict.fromkeys(list(complete)[1:], 0.0)
    where = re.escape(str(tmp_path / "dev.txt"))
    with pytest.raises(ValueError, match=rf"{where}: 1 stem\(s\) of the gold file missing "
                       r"\('aAAfmkmQpVz'\); expected exactly one line per wav \(4 in all\)"):
        check_complete(missing, gold, tmp_path / "dev.txt")
    extra = complete | {f"x{i}": 0.0 for i in range(5)}
    with pytest.raises(ValueError, match=r"5 stem\(s\) not in the gold file \('x0', 'x1', 'x2', \.\.\.\)"):
        check_complete(extra, gold, "sub.txt")
    with pytest.raises(ValueError, match=r"1 stem\(s\) of the gold file missing .* and 5 stem\(s\) not in"):
        check_complete({stem: 0.0 for stem in extra if stem != "aAAfmkmQpVz"}, gold, "sub.txt")


# (tests below: behaviours that a second mutation round over spidr.lm, 55 mutants, found untested)

def test_gold_fields_are_read_without_the_spaces_around_them(tmp_path):
    """mut zs-no-strip. Truth: a gold.csv written with ', ' between fields (by hand, or a spreadsheet export)
    reads as the same rows, its header too: 'filename' ' w1' is the stem 'w1' (a stem holds no whitespace), ' 1'
    is correct = 1 (a header of ' filename' was refused as lacking the column)."""
    path = tmp_path / "gold.csv"
    for header in ("id,filename,voice,frequency,word,phones,length,correct",
                   "id, filename, voice, frequency, word, phones, length, correct"):
        path.write_text(f"{header}\n1, w1, Alex, 3, brick, b r, 2, 1\n1, n1, Alex, , bril, b l, 2, 0\n")
        items = read_lexical_gold(path)
        assert [(i.id, i.filename, i.voice, i.frequency, i.length, i.correct) for i in items] == [
            ("1", "w1", "Alex", 3, 2, True), ("1", "n1", "Alex", None, 2, False)]


def test_an_empty_length_is_refused_naming_its_column(tmp_path):
    """mut zs-length-optional. Truth: 'length' is the number of phones (an int: the by-length tables group by it);
    only 'frequency' may be empty (unknown). An empty length is a field error naming line and column."""
    path = tmp_path / "gold.csv"
    path.write_text("id,filename,voice,frequency,word,phones,length,correct\n1,w1,Alex,3,brick,b r,,1\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: line 2, column 'length': expected a "
                                         r"non-negative integer, found ''"):
        read_lexical_gold(path)


# Was a defect: test_a_submission_round_trips_every_stem_and_score_bit_for_bit (a stem starting with U+FEFF lost it),
# test_a_gold_file_round_trips_its_rows (a bare "\r" in a text field; a field with surrounding white space).



_STEM = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(scores=st.dictionaries(_STEM | st.just("\ufeffa"), st.floats(allow_nan=False), min_size=1, max_size=6))
def test_a_submission_round_trips_every_stem_and_score_bit_for_bit(scores) -> None:
    """-0.0, ±inf, subnormals, 1.8e308 come back as they were; a stem a line cannot hold is refused when written.
    Minimal failure on ce82b57: {'\\ufeffa': 0.0} was read back as {'a': 0.0} (the BOM taken for the file's)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dev.txt"
        if not all(is_stem(stem) for stem in scores):
            with pytest.raises(ValueError, match="cannot write stem"):
                write_submission(path, scores)
            return
        write_submission(path, scores)
        back = read_submission(path)
        assert list(back) == sorted(scores)
        for stem, score in scores.items():
            assert back[stem] == score
            assert math.copysign(1.0, back[stem]) == math.copysign(1.0, score)


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
_GOLD_STEM = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1,
                     max_size=5).filter(is_stem)


def _round_trip_or_refusal(write, read, items) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gold.csv"
        if any(isinstance(v, str) and v != v.strip() for item in items for v in vars(item).values()):
            # only what the reader would strip is refused, naming the value, and nothing is left written
            with pytest.raises(ValueError, match="white space"):
                write(path, items)
            assert not path.exists()
            return
        write(path, items)
        assert read(path) == items


@settings(max_examples=60, deadline=None, derandomize=True)
@given(items=st.lists(st.builds(SyntacticItem, _TEXT.filter(str.strip), _GOLD_STEM, _TEXT, _TEXT, _TEXT, _TEXT,
                                st.booleans()), min_size=1, max_size=3, unique_by=lambda item: item.filename))
def test_a_syntactic_gold_file_round_trips_its_rows(items) -> None:
    """Minimal failures on ce82b57: transcription '\\r' (unreadable: 'has fewer fields than the header') and id '0 '
    (read back as '0': two ids one pair)."""
    _round_trip_or_refusal(write_syntactic_gold, read_syntactic_gold, items)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(items=st.lists(st.builds(LexicalItem, _TEXT.filter(str.strip), _GOLD_STEM, _TEXT,
                                st.none() | st.integers(0, 10**6), _TEXT, _TEXT, st.integers(0, 50), st.booleans()),
                      min_size=1, max_size=3,
                      unique_by=lambda item: item.filename))
def test_a_lexical_gold_file_round_trips_its_rows(items) -> None:
    _round_trip_or_refusal(write_lexical_gold, read_lexical_gold, items)


def test_a_gold_field_with_a_carriage_return_reads_back(tmp_path: Path) -> None:
    items = [SyntacticItem("1", "a", "v", "t", "s", "one\rtwo", True)]
    write_syntactic_gold(tmp_path / "gold.csv", items)
    assert read_syntactic_gold(tmp_path / "gold.csv") == items
