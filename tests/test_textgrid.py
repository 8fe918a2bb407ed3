"""Praat TextGrid phone alignments (the Montreal Forced Aligner's output) read as the equivalent interval TSV.

The TextGrids are written here by hand, in Praat's two text formats (not by praatio, whose parser they check), and
compared with the interval TSV of the same intervals and with frame labels counted by hand: the same ``Alignments``,
the same ``spidr items`` file, the same ``units-quality`` metrics. The refusals name the file.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from spidr.cli import main
from spidr.eval.textgrid import is_textgrid_name, textgrid_files
from spidr.eval.unit_quality import read_alignments, unit_quality

requires_praatio = pytest.mark.skipif(importlib.util.find_spec("praatio") is None,
                                      reason="praatio (spidr[eval]) is not installed")

# MFA-style output: OUT/<speaker>/<utterance>.TextGrid. Silences as MFA writes them: "" (MFA 2 and later), "sil" and
# "sp" (MFA 1); "spn" (spoken noise) is a label of its own. Times as an aligner writes them, one boundary (0.025) on
# a 100 Hz frame's centre: frame 2 belongs to the interval starting there (float arithmetic puts it before).
PHONES = {
    "84/84-121-0000": [("0", "0.05", ""), ("0.05", "0.15", "AH1"), ("0.15", "0.2", "T"), ("0.2", "0.28", "IY0"),
                       ("0.28", "0.31", "")],
    "84/84-121-0001": [("0", "0.025", "sp"), ("0.025", "0.06", "K"), ("0.06", "0.12", "AE1"), ("0.12", "0.15", "T"),
                       ("0.15", "0.2", "S")],
    "spk9/91_7": [("0", "0.04", "sil"), ("0.04", "0.07", "M"), ("0.07", "0.1", "AA2")],
    "spk9/91_8": [("0", "0.02", ""), ("0.02", "0.05", "ɑː"), ("0.05", "0.09", "t"), ("0.09", "0.12", "ʃ"),
                  ("0.12", "0.15", "spn")],
}
# Hand count at 100 Hz (frame i holds the phone whose interval holds (i + ½) / 100 s), stress digits removed
FRAMES = {
    "84-121-0000": ["SIL"] * 5 + ["AH"] * 10 + ["T"] * 5 + ["IY"] * 8 + ["SIL"] * 3,
    "84-121-0001": ["SIL"] * 2 + ["K"] * 4 + ["AE"] * 6 + ["T"] * 3 + ["S"] * 5,
    "91_7": ["SIL"] * 4 + ["M"] * 3 + ["AA"] * 3,
    "91_8": ["SIL"] * 2 + ["ɑː"] * 3 + ["t"] * 4 + ["ʃ"] * 3 + ["spn"] * 3,
}
# Items (hand count): a phone with speech on both sides (spn is no speech); the speaker is the TextGrid's folder
TRIPHONE_ROWS = ["#file onset offset #phone prev-phone next-phone speaker", "84-121-0000 0.05 0.28 T AH IY 84",
                 "84-121-0001 0.02 0.15 AE K T 84", "84-121-0001 0.06 0.2 T AE S 84", "91_8 0.02 0.12 t ɑː ʃ spk9"]

# One file exactly as MFA 2 writes it (long format, a words tier first, "0.0" times, silences left empty)
MFA_LONG = """File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0.0
xmax = 0.31
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0.0
        xmax = 0.31
        intervals: size = 3
            intervals [1]:
                xmin = 0.0
                xmax = 0.05
                text = ""
            intervals [2]:
                xmin = 0.05
                xmax = 0.28
                text = "a tee"
            intervals [3]:
                xmin = 0.28
                xmax = 0.31
                text = ""
    item [2]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0.0
        xmax = 0.31
        intervals: size = 5
            intervals [1]:
                xmin = 0.0
                xmax = 0.05
                text = ""
            intervals [2]:
                xmin = 0.05
                xmax = 0.15
                text = "AH1"
            intervals [3]:
                xmin = 0.15
                xmax = 0.2
                text = "T"
            intervals [4]:
                xmin = 0.2
                xmax = 0.28
                text = "IY0"
            intervals [5]:
                xmin = 0.28
                xmax = 0.31
                text = ""
"""


def _long(tiers: dict[str, list[tuple[str, str, str]]], xmax: str | None = None) -> str:
    """Praat's long text format, as Praat and MFA write it (values followed by a space); ``xmax``: the file's and
    each tier's end (default: the last interval's)."""
    xmax = xmax or max((end for intervals in tiers.values() for _, end, _ in intervals), key=float)
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0 ", f"xmax = {xmax} ",
             "tiers? <exists> ", f"size = {len(tiers)} ", "item []: "]
    for number, (name, intervals) in enumerate(tiers.items(), start=1):
        lines += [f"    item [{number}]:", '        class = "IntervalTier" ', f'        name = "{name}" ',
                  "        xmin = 0 ", f"        xmax = {xmax} ", f"        intervals: size = {len(intervals)} "]
        for index, (start, end, text) in enumerate(intervals, start=1):
            lines += [f"        intervals [{index}]:", f"            xmin = {start} ", f"            xmax = {end} ",
                      f'            text = "{text}" ']
    return "\n".join(lines) + "\n"


def _short(tiers: dict[str, list[tuple[str, str, str]]]) -> str:
    """Praat's short text format: the same values, one a line, without their names."""
    xmax = max(end for intervals in tiers.values() for _, end, _ in intervals)
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "0", xmax, "<exists>", str(len(tiers))]
    for name, intervals in tiers.items():
        lines += ['"IntervalTier"', f'"{name}"', "0", xmax, str(len(intervals))]
        for start, end, text in intervals:
            lines += [start, end, f'"{text}"']
    return "\n".join(lines) + "\n"


def _textgrids(folder: Path, layout: str) -> Path:
    """The utterances of ``PHONES`` as TextGrids below ``folder``: all long, all short, or mixed as MFA and Praat
    write them (the MFA file above, a short one, a long one in Praat's UTF-16 with its byte order mark)."""
    for key, intervals in PHONES.items():
        path = folder / f"{key}.TextGrid"
        path.parent.mkdir(parents=True, exist_ok=True)
        tiers = {"words": [(intervals[0][0], intervals[-1][1], "")], "phones": intervals}
        if layout == "short" or (layout == "mixed" and key == "84/84-121-0001"):
            path.write_text(_short(tiers), encoding="utf-8")
        elif layout == "mixed" and key == "84/84-121-0000":
            path.write_text(MFA_LONG, encoding="utf-8")
        elif layout == "mixed" and key == "spk9/91_8":
            path.write_bytes(_long(tiers).encode("utf-16"))  # (Praat's choice for labels beyond ASCII)
        else:
            path.write_text(_long(tiers), encoding="utf-8")
    return folder


def _tsv(path: Path) -> Path:
    """The interval TSV of the same intervals, MFA's silences written SIL, the speaker column the folder."""
    lines = ["utt_id\tonset\toffset\tphone\tspeaker"]
    for key, intervals in reversed(PHONES.items()):  # (order does not matter)
        speaker, name = key.split("/")
        lines += [f"{name}\t{start}\t{end}\t{'SIL' if label in ('', 'sil', 'sp') else label}\t{speaker}"
                  for start, end, label in intervals]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _same_alignments(a, b) -> None:
    assert a.phones == b.phones
    assert a.stress_removed == b.stress_removed
    assert sorted(a) == sorted(b)  # (in the order of the files, or of the lines)
    for name in a:
        np.testing.assert_array_equal(a.codes[name], b.codes[name])


@requires_praatio
@pytest.mark.parametrize("layout", ["long", "short", "mixed"])
def test_a_textgrid_folder_reads_as_the_equivalent_interval_tsv_and_the_hand_count(tmp_path: Path,
                                                                                    layout: str) -> None:
    folder = _textgrids(tmp_path / "mfa", layout)
    alignments = read_alignments(folder)
    assert {name: alignments[name] for name in alignments} == FRAMES
    assert alignments.stress_removed == ("AA2", "AE1", "AH1", "IY0")
    _same_alignments(alignments, read_alignments(_tsv(tmp_path / "ali.tsv")))
    # one file reads as its utterance does in the TSV, at another rate and with stress kept too
    one = folder / "84" / "84-121-0001.TextGrid"
    lines = [line for line in (tmp_path / "ali.tsv").read_text().splitlines() if line.startswith("84-121-0001\t")]
    (tmp_path / "one.tsv").write_text("\n".join(lines) + "\n")
    _same_alignments(read_alignments(one, alignment_rate_hz=50, keep_stress=True),
                     read_alignments(tmp_path / "one.tsv", alignment_rate_hz=50, keep_stress=True))
    assert read_alignments(one, alignment_rate_hz=50, keep_stress=True)["84-121-0001"] == (
        ["SIL"] + ["K"] * 2 + ["AE1"] * 3 + ["T"] + ["S"] * 3)  # (centres 0.01, 0.03, ...; 0.15 starts S)


@requires_praatio
def test_items_of_a_textgrid_folder_are_those_of_the_tsv_with_speaker_column(tmp_path: Path) -> None:
    folder = _textgrids(tmp_path / "mfa", "mixed")
    assert main(["items", str(folder), "--out", str(tmp_path / "tg.item")]) == 0
    assert main(["items", str(_tsv(tmp_path / "ali.tsv")), "--out", str(tmp_path / "tsv.item")]) == 0
    assert (tmp_path / "tg.item").read_text(encoding="utf-8").splitlines() == TRIPHONE_ROWS
    assert (tmp_path / "tg.item").read_bytes() == (tmp_path / "tsv.item").read_bytes()
    # --speaker-pattern: the names' speaker, for both (91_8 → 91)
    for source, out in ((folder, "tg-p.item"), (tmp_path / "ali.tsv", "tsv-p.item")):
        assert main(["items", str(source), "--out", str(tmp_path / out), "--speaker-pattern", "^([^-_]+)",
                     "--kind", "phoneme"]) == 0
    assert (tmp_path / "tg-p.item").read_bytes() == (tmp_path / "tsv-p.item").read_bytes()
    assert (tmp_path / "tg-p.item").read_text(encoding="utf-8").splitlines()[-1] == "91_8 0.05 0.09 t ɑː ʃ 91"


@requires_praatio
def test_units_quality_of_a_textgrid_folder_is_that_of_the_tsv_and_of_the_hand_count(tmp_path: Path, capsys) -> None:
    folder = _textgrids(tmp_path / "mfa", "mixed")
    rng = np.random.default_rng(0)
    units = {name: rng.integers(0, 4, size=(len(frames) + 1) // 2).tolist() for name, frames in FRAMES.items()}
    rows = [json.dumps({"name": name, "units": values}) + "\n" for name, values in units.items()]
    (tmp_path / "units.jsonl").write_text("".join(rows))
    printed = []
    for alignments in (folder, _tsv(tmp_path / "ali.tsv")):
        assert main(["units-quality", str(tmp_path / "units.jsonl"), str(alignments), "--num-units", "4",
                     "--unit-rate", "50", "--json"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]
    assert json.loads(printed[0]) == pytest.approx(unit_quality(units, FRAMES, num_units=4))


@requires_praatio
def test_two_textgrids_of_one_stem_are_two_utterances_named_by_path(tmp_path: Path) -> None:
    """TIMIT's sa1 of every speaker: named by their paths below the folder (as spidr extract names their features),
    never one over the other; their folders are their speakers."""
    phones = [("0", "0.02", "sil"), ("0.02", "0.05", "K"), ("0.05", "0.09", "AE1"), ("0.09", "0.12", "T")]
    for speaker in ("fcjf0", "mdab0"):
        (tmp_path / "dr1" / speaker).mkdir(parents=True)
        (tmp_path / "dr1" / speaker / "sa1.TextGrid").write_text(_long({"phones": phones}))
    (tmp_path / "dr1" / "mdab0" / "si2.TextGrid").write_text(_short({"phones": phones}))
    alignments = read_alignments(tmp_path)
    assert list(alignments) == ["dr1/fcjf0/sa1", "dr1/mdab0/sa1", "si2"]
    assert main(["items", str(tmp_path), "--out", str(tmp_path / "x.item")]) == 0
    assert (tmp_path / "x.item").read_text().splitlines()[1:] == [
        "dr1/fcjf0/sa1 0.02 0.12 AE K T fcjf0", "dr1/mdab0/sa1 0.02 0.12 AE K T mdab0", "si2 0.02 0.12 AE K T mdab0"]
    with gzip.open(tmp_path / "dr1" / "mdab0" / "si2.TextGrid.gz", "wt") as handle:  # the same utterance twice
        handle.write(_long({"phones": phones}))
    with pytest.raises(ValueError, match=r"both dr1/mdab0/si2\.TextGrid and dr1/mdab0/si2\.TextGrid\.gz are the "
                                         r"TextGrid of utterance 'dr1/mdab0/si2'"):
        read_alignments(tmp_path)


@requires_praatio
def test_textgrids_at_the_top_of_the_folder_take_their_speakers_from_the_names(tmp_path: Path, caplog) -> None:
    phones = [("0", "0.02", ""), ("0.02", "0.05", "K"), ("0.05", "0.09", "AE1"), ("0.09", "0.12", "T")]
    (tmp_path / "mfa" / "s2").mkdir(parents=True)
    (tmp_path / "mfa" / "s1_a.TextGrid").write_text(_long({"phones": phones}))
    (tmp_path / "mfa" / "s2" / "s2_b.TextGrid").write_text(_long({"phones": phones}))
    with caplog.at_level(logging.WARNING):
        assert main(["items", str(tmp_path / "mfa"), "--out", str(tmp_path / "x.item")]) == 0
    assert "1 of 2 TextGrids lie at the top of the folder" in caplog.text
    assert [row.split()[-1] for row in (tmp_path / "x.item").read_text().splitlines()[1:]] == ["s1", "s2"]
    assert main(["items", str(tmp_path / "mfa" / "s2" / "s2_b.TextGrid"), "--out", str(tmp_path / "y.item")]) == 0
    assert (tmp_path / "y.item").read_text().splitlines()[1:] == ["s2_b 0.02 0.12 AE K T s2"]


@requires_praatio
def test_refusals_name_the_file(tmp_path: Path, capsys) -> None:
    def textgrid(name: str, text: str | bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    no_phones = textgrid("a.TextGrid", _long({"words": [("0", "0.1", "a")], "MAU": [("0", "0.1", "a")]}))
    with pytest.raises(ValueError, match=rf"{no_phones}: no tier named 'phones' \(its tiers: 'words', 'MAU'\)"):
        read_alignments(no_phones)
    assert main(["units-quality", str(no_phones), str(no_phones), "--num-units", "2"]) == 2  # (no units file)
    capsys.readouterr()
    (tmp_path / "units.jsonl").write_text(json.dumps({"name": "a", "units": [0, 1]}) + "\n")
    assert main(["units-quality", str(tmp_path / "units.jsonl"), str(no_phones), "--num-units", "2"]) == 2
    assert f"{no_phones}: no tier named 'phones'" in capsys.readouterr().err

    # overlapping intervals, a gap, a tier not starting at 0: refused as the TSV of the same intervals is
    cases = {"overlap": [("0", "0.1", "A"), ("0.05", "0.2", "B")], "gap": [("0", "0.05", "A"), ("0.1", "0.2", "B")],
             "late": [("0.03", "0.1", "A")]}
    expected = {"overlap": "utterance 'overlap': 'B' starts at 0.05 s, before 'A' ends at 0.1 s (intervals must not "
                "overlap)", "gap": "utterance 'gap' has no phone at 0.055 s (frame 5)",
                "late": "utterance 'late' has no phone at 0.005 s (frame 0)"}
    for name, intervals in cases.items():
        path = textgrid(f"{name}.TextGrid", _short({"phones": intervals}))
        tsv = tmp_path / f"{name}.tsv"
        tsv.write_text("".join(f"{name}\t{start}\t{end}\t{label}\n" for start, end, label in intervals))
        for source in (path, tsv):
            with pytest.raises(ValueError, match=re.escape(expected[name])) as refused:
                read_alignments(source)
            assert str(refused.value) == f"{source}: {expected[name]}"

    point = textgrid("p.TextGrid", 'File type = "ooTextFile"\nObject class = "TextGrid"\n\n0\n1\n<exists>\n1\n'
                     '"TextTier"\n"phones"\n0\n1\n1\n0.5\n"A"\n')
    with pytest.raises(ValueError, match=rf"{point}: tier 'phones' is a point tier"):
        read_alignments(point)
    binary = textgrid("b.TextGrid", b"ooBinaryFile\x08TextGrid\x00\x00")
    with pytest.raises(ValueError, match=rf"{binary} is a binary Praat file"):
        read_alignments(binary)
    other = textgrid("o.TextGrid", "utt\t0\t0.1\tA\n")
    with pytest.raises(ValueError, match=rf"{other} is not a Praat TextGrid text file"):
        read_alignments(other)
    latin1 = textgrid("l.TextGrid", _long({"phones": [("0", "0.1", "é")]}).encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{latin1} is neither UTF-8 nor UTF-16 text"):
        read_alignments(latin1)
    broken = textgrid("t.TextGrid", 'File type = "ooTextFile"\nObject class = "TextGrid"\n\nxmin = 0\nxmax = 1\n'
                      'tiers? <exists>\nsize = 1\nitem []:\n    item [1]:\n        class = "IntervalTier"\n'
                      '        name = "phones"\n        xmin = 0\n        xmax = 1\n        intervals: size = 1\n'
                      '        intervals [1]:\n            xmin = 0\n')
    with pytest.raises(ValueError, match=rf"{broken}: praatio cannot read this TextGrid"):
        read_alignments(broken)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "ali.tsv").write_text("u\t0\t0.1\tA\n")
    with pytest.raises(ValueError, match=rf"alignment folder {empty} holds no \.TextGrid file"):
        read_alignments(empty)
    assert main(["items", str(empty), "--out", str(tmp_path / "x.item")]) == 2
    assert f"alignment folder {empty} holds no .TextGrid file" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"alignment file .*missing\.TextGrid does not exist"):
        read_alignments(tmp_path / "missing.TextGrid")


def test_a_missing_praatio_names_the_eval_extra(tmp_path: Path, monkeypatch, capsys) -> None:
    from spidr.extras import MissingExtraError

    for module in ("praatio", "praatio.utilities", "praatio.utilities.textgrid_io", "praatio.utilities.errors"):
        monkeypatch.setitem(sys.modules, module, None)
    (tmp_path / "mfa" / "s").mkdir(parents=True)
    (tmp_path / "mfa" / "s" / "u.TextGrid").write_text(_long({"phones": [("0", "0.1", "A")]}))
    with pytest.raises(MissingExtraError, match=r"reading TextGrid alignments needs praatio .*pip install "
                                                r"'spidr\[eval\]'"):
        read_alignments(tmp_path / "mfa")
    assert main(["items", str(tmp_path / "mfa"), "--out", str(tmp_path / "x.item")]) == 2
    assert "pip install 'spidr[eval]'" in capsys.readouterr().err
    assert not (tmp_path / "x.item").exists()


@requires_praatio
def test_evaluation_settings_record_a_textgrid_folder_by_content(tmp_path: Path) -> None:
    """evaluate --alignments FOLDER: its settings read the folder's TextGrids (a folder's bytes cannot be read);
    two reports of one folder agree, and an edited TextGrid tells them apart."""
    from spidr.data.manifest import Manifest, ManifestEntry
    from spidr.eval.report import AbxSettings, evaluation_settings

    folder = _textgrids(tmp_path / "mfa", "long")
    item = tmp_path / "t.item"
    item.write_text("#file onset offset #phone prev-phone next-phone speaker\na 0.1 0.2 x y z s\n")
    entries = Manifest.from_entries([ManifestEntry("u", "/c/u.wav", 16000)])

    def recorded() -> dict:
        return evaluation_settings(abx=AbxSettings(), item_file=item, entries=entries,
                                   alignments_file=folder)["alignments"]

    first = recorded()
    assert first["name"] == "mfa"
    assert recorded() == first
    (folder / "spk9" / "91_7.TextGrid").write_text(_long({"phones": [("0", "0.1", "M")]}))
    assert recorded() != first


# --- from the review tgrev31 ---
MFA_PHONES = [("0", "0.1", ""), ("0.1", "0.2", "AH1"), ("0.2", "0.3", "S"), ("0.3", "0.4", "T"),
              ("0.4", "0.5", "IY0"),
          ("0.5", "0.6", "")]


def test_librispeech_speaker_chapter_folders_give_the_speaker_not_the_chapter(tmp_path: Path) -> None:
    """MFA mirrors its corpus: LibriSpeech's OUT/84/121123/84-121123-0000.TextGrid. The folder holding the file is
    the chapter; the item file's speaker must be LibriSpeech's speaker (84), as the same alignments as a TSV give
    it (default --speaker-pattern), not one 'speaker' per chapter (ABX across-speaker would pair the same voice)."""
    tsv = ["utterance\tonset\toffset\tphone"]
    for speaker, chapter in [("84", "121123"), ("84", "121550"), ("174", "50561"), ("174", "84280")]:
        for k in range(2):
            name = f"{speaker}-{chapter}-{k:04d}"
            file = tmp_path / "mfa" / speaker / chapter / f"{name}.TextGrid"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(_long({"words": [("0", "0.6", "")], "phones": MFA_PHONES}))
            tsv += [f"{name}\t{onset}\t{offset}\t{label or 'SIL'}" for onset, offset, label in MFA_PHONES]
    (tmp_path / "a.tsv").write_text("\n".join(tsv) + "\n")
    assert main(["items", str(tmp_path / "mfa"), "--out", str(tmp_path / "tg.item")]) == 0
    assert main(["items", str(tmp_path / "a.tsv"), "--out", str(tmp_path / "tsv.item")]) == 0
    rows = {kind: [line.split() for line in (tmp_path / f"{kind}.item").read_text().splitlines()[1:]]
            for kind in ("tg", "tsv")}
    assert {row[-1] for row in rows["tg"]} == {"84", "174"}
    # (the same rows as the TSV's, whether the TextGrids are named by stem or by path)
    assert sorted([row[0].rsplit("/", 1)[-1], *row[1:]] for row in rows["tg"]) == sorted(rows["tsv"])


@pytest.mark.parametrize("cut_before", ["intervals [4]:", '0.3\n0.4\n"T"'], ids=["long", "short"])
def test_a_truncated_textgrid_is_refused_naming_the_file(tmp_path: Path, cut_before: str) -> None:
    """A TextGrid cut between two intervals (MFA writes in place: a kill or a full disk mid-export) declares 6
    intervals up to 0.6 s; praatio reads the 3 it finds without complaint. Read silently, the utterance lost half
    its phones (spidr items wrote fewer items; units-quality blamed the rates)."""
    if cut_before.startswith("intervals"):
        text = _long({"words": [("0", "0.6", "")], "phones": MFA_PHONES})
    else:
        text = ('File type = "ooTextFile"\nObject class = "TextGrid"\n\n0\n0.6\n<exists>\n1\n"IntervalTier"\n'
                '"phones"\n0\n0.6\n6\n'
                + "".join(f'{onset}\n{offset}\n"{label}"\n' for onset, offset, label in MFA_PHONES))
    (tmp_path / "mfa" / "spk").mkdir(parents=True)
    file = tmp_path / "mfa" / "spk" / "u-1.TextGrid"
    file.write_text(text[: text.index(cut_before)])
    with pytest.raises(ValueError, match=r"u-1\.TextGrid"):
        read_alignments(tmp_path / "mfa")


def test_praat_s_old_short_text_header_is_read(tmp_path: Path) -> None:
    """Praat's short text files as older Praat versions and corpora (CGN) have them: 'File type = "ooTextFile
    short"' then a bare '"TextGrid"' line. praatio and tgt read them; the header check refused them."""
    text = ('File type = "ooTextFile short"\n"TextGrid"\n\n0\n0.6\n<exists>\n1\n"IntervalTier"\n"phones"\n0\n0.6\n6\n'
            + "".join(f'{onset}\n{offset}\n"{label}"\n' for onset, offset, label in MFA_PHONES))
    (tmp_path / "u-1.TextGrid").write_text(text)
    frames = list(read_alignments(tmp_path / "u-1.TextGrid")["u-1"])
    assert frames == ["SIL"] * 10 + ["AH"] * 10 + ["S"] * 10 + ["T"] * 10 + ["IY"] * 10 + ["SIL"] * 10


def test_mfa_multi_speaker_tiers_are_named_as_such_in_the_refusal(tmp_path: Path) -> None:
    """MFA names a multi-speaker file's tiers '<speaker> - phones'. The refusal said the tier is read 'as the
    Montreal Forced Aligner names it' ('phones'), which is not how MFA named these; it should say that the file
    holds the phones of several speakers (one utterance per file is read)."""
    (tmp_path / "conv.TextGrid").write_text(_long({"alice - words": [("0", "0.6", "")],
                                                          "alice - phones": MFA_PHONES,
                                                   "bob - words": [("0", "0.6", "")], "bob - phones": MFA_PHONES}))
    with pytest.raises(ValueError, match=r"conv\.TextGrid") as error:
        read_alignments(tmp_path / "conv.TextGrid")
    assert "speaker" in str(error.value).split("conv.TextGrid", 1)[1]  # (not in the tmp_path name)


def test_macos_appledouble_companions_are_not_read_as_textgrids(tmp_path: Path) -> None:
    """MFA output copied from a Mac onto a FAT/exFAT drive or a share holds '._x.TextGrid' companions (binary
    resource forks). They are no utterance: the folder must read as its real TextGrids."""
    (tmp_path / "mfa" / "spk").mkdir(parents=True)
    (tmp_path / "mfa" / "spk" / "u-1.TextGrid").write_text(_long({"phones": MFA_PHONES}))
    (tmp_path / "mfa" / "spk" / "._u-1.TextGrid").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(40))
    names = list(read_alignments(tmp_path / "mfa"))
    assert [name.rsplit("/", 1)[-1] for name in names] == ["u-1"]


@pytest.mark.parametrize("layout", ["long", "short"])
def test_a_negative_time_is_refused_naming_its_line(tmp_path: Path, layout: str) -> None:
    """praatio reads "-0.05" as 0.05 (a misleading "no phone at 0.005 s" followed); refused, naming the line. A label
    that reads "-1" (quoted) is no time."""
    phones = [("0", "0.1", "-1"), ("0.1", "0.2", "A")]
    text = (_long if layout == "long" else _short)({"phones": phones})
    (tmp_path / "ok.TextGrid").write_text(text)
    assert list(read_alignments(tmp_path / "ok.TextGrid")) == ["ok"]
    bad = text.replace("0.1", "-0.1", 1) if layout == "short" else text.replace("xmin = 0.1 ", "xmin = -0.1 ", 1)
    (tmp_path / "bad.TextGrid").write_text(bad)
    with pytest.raises(ValueError, match=r"bad\.TextGrid: line \d+ holds a negative time \('.*-0\.1"):
        read_alignments(tmp_path / "bad.TextGrid")


_requires_praatio = pytest.mark.skipif(importlib.util.find_spec("praatio") is None,
                                       reason="praatio (spidr[eval]) is not installed")


def _short_textgrid(tier: str, intervals: list[tuple[str, str, str]]) -> str:
    """Praat's short text format, written by hand (one tier)."""
    xmax = intervals[-1][1]
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "0", xmax, "<exists>", "1",
             '"IntervalTier"', f'"{tier}"', "0", xmax, str(len(intervals))]
    for start, end, text in intervals:
        lines += [start, end, f'"{text}"']
    return "\n".join(lines) + "\n"


def test_a_file_named_only_by_the_suffix_is_no_textgrid(tmp_path: Path) -> None:
    """A name with nothing before ``.TextGrid`` (``.TextGrid``, ``.textgrid.gz``) names no utterance."""
    assert is_textgrid_name("a.TextGrid")
    assert is_textgrid_name("a.textgrid.gz")
    assert not is_textgrid_name(".TextGrid")
    assert not is_textgrid_name(".textgrid.gz")
    (tmp_path / ".TextGrid").write_text("x")
    with pytest.raises(ValueError, match=r"holds no \.TextGrid file"):
        textgrid_files(tmp_path)


def test_textgrid_files_are_in_path_order(tmp_path: Path) -> None:
    """"in path order": by the path's folder names then file name, not os.walk's top-folder-files-first order."""
    for relative in ("b.TextGrid", "a/x.TextGrid", "a/sub/y.TextGrid", "a/z.TextGrid"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    assert list(textgrid_files(tmp_path)) == ["y", "x", "z", "b"]


@_requires_praatio
def test_a_utf8_textgrid_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """UTF-8 with a BOM (as Windows editors save it) reads as the same file without one."""
    text = _short_textgrid("phones", [("0", "0.02", "sil"), ("0.02", "0.05", "AH1")])
    (tmp_path / "plain.TextGrid").write_text(text, encoding="utf-8")
    (tmp_path / "bom.TextGrid").write_bytes(text.encode("utf-8-sig"))
    expected = ["SIL", "SIL", "AH", "AH", "AH"]
    assert list(read_alignments(tmp_path / "plain.TextGrid")["plain"]) == expected
    assert list(read_alignments(tmp_path / "bom.TextGrid")["bom"]) == expected


@_requires_praatio
@pytest.mark.parametrize("name", ["Phones", "PHONES", " phones "])
def test_the_phone_tier_is_found_in_any_case(tmp_path: Path, name: str) -> None:
    """The module docstring: the tier named ``phones`` in any case."""
    path = tmp_path / "u.TextGrid"
    path.write_text(_short_textgrid(name, [("0", "0.03", "K"), ("0.03", "0.05", "")]), encoding="utf-8")
    assert list(read_alignments(path)["u"]) == ["K", "K", "K", "SIL", "SIL"]


@_requires_praatio
def test_two_phone_tiers_are_refused_naming_both(tmp_path: Path) -> None:
    """Which of two ``phones`` tiers holds the alignment is not guessed."""
    one = _short_textgrid("phones", [("0", "0.03", "K")]).splitlines()
    tier = one[7:]  # the tier's lines
    text = "\n".join([*one[:6], "2", *tier, *tier]) + "\n"
    path = tmp_path / "two.TextGrid"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"two\.TextGrid: 2 tiers named 'phones'"):
        read_alignments(path)


@_requires_praatio
def test_a_tier_ending_within_a_frame_of_its_xmax_is_not_cut_short(tmp_path: Path) -> None:
    """Only a tier ending more than 0.01 s before its xmax is refused as cut short: 5 ms of rounding is read."""
    text = _short_textgrid("phones", [("0", "0.03", "K"), ("0.03", "0.05", "AE1")]).splitlines()
    text[4] = text[10] = "0.055"  # the file's and the tier's xmax
    path = tmp_path / "u.TextGrid"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    assert read_alignments(path)["u"] == ["K", "K", "K", "AE", "AE"]
    text[4] = text[10] = "0.07"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="before its xmax"):
        read_alignments(path)


@_requires_praatio
@pytest.mark.parametrize("label", ["SP", "Sil", "SIL", "sp"])
def test_mfa_silences_are_silence_in_any_case(tmp_path: Path, label: str) -> None:
    path = tmp_path / "u.TextGrid"
    path.write_text(_short_textgrid("phones", [("0", "0.02", label), ("0.02", "0.05", "T")]), encoding="utf-8")
    assert read_alignments(path)["u"] == ["SIL", "SIL", "T", "T", "T"]


def test_the_digest_of_textgrids_changes_with_a_file_s_name(tmp_path: Path) -> None:
    """Two folders of the same bytes under other utterance names are other alignments."""
    from spidr.eval.textgrid import textgrids_digest

    for folder, name in (("one", "a"), ("two", "b"), ("three", "a")):
        (tmp_path / folder / "spk").mkdir(parents=True)
        (tmp_path / folder / "spk" / f"{name}.TextGrid").write_text("same bytes")
    assert textgrids_digest(tmp_path / "one") == textgrids_digest(tmp_path / "three")
    assert textgrids_digest(tmp_path / "one") != textgrids_digest(tmp_path / "two")


@_requires_praatio
def test_a_phone_tier_without_intervals_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "e.TextGrid"
    path.write_text('File type = "ooTextFile"\nObject class = "TextGrid"\n\n0\n1\n<exists>\n1\n'
                    '"IntervalTier"\n"phones"\n0\n1\n0\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"e\.TextGrid: tier 'phones' has no interval"):
        read_alignments(path)


@_requires_praatio
def test_a_gzip_textgrid_is_read_whatever_the_case_of_its_suffix(tmp_path: Path) -> None:
    """The module docstring: ``.gz`` read, the suffix in any case (``x.TextGrid.GZ`` from a case-folding copy)."""
    import gzip

    text = _short_textgrid("phones", [("0", "0.02", "sil"), ("0.02", "0.05", "AH1")])
    for name in ("a.TextGrid.gz", "b.TEXTGRID.GZ"):
        (tmp_path / name).write_bytes(gzip.compress(text.encode()))
        alignments = read_alignments(tmp_path / name)
        assert {key: list(value) for key, value in alignments.items()} == {name[0]: ["SIL", "SIL", "AH", "AH", "AH"]}


def test_the_speaker_of_librispeech_layout_files_sharing_a_stem_is_the_speaker_folder(tmp_path: Path) -> None:
    """Two chapters' files of one stem are named by their path (``121123/84-121123-0000``); the speaker is still
    the speaker folder the file's own name begins with (84), not the chapter."""
    from spidr.eval.textgrid import textgrid_speakers

    for chapter in ("121123", "999"):
        path = tmp_path / "84" / chapter / "84-121123-0000.TextGrid"
        path.parent.mkdir(parents=True)
        path.write_text("x")
    speakers = textgrid_speakers(tmp_path)
    assert sorted(speakers.values()) == ["84", "84"], speakers
