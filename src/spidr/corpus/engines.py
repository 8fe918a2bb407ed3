"""Run one engine on a batch of sentences: raw audio plus the engine's own phone labels with their times.

* flite: ``flite -voice V -psdur -t TEXT -o out.wav`` prints ``phone:end_time`` for every segment.
* festival: one batch-mode Scheme script per batch (a festival start costs ~0.3 s) that synthesises each
  sentence with ``(eval (list 'Utterance 'Text ...))`` and saves the wave and the segment end times. festival keeps
  no state between utterances, so batching does not change any output.
* espeak-ng: phoneme start samples from the library's phoneme events (``spidr.corpus.espeak``), each moved back over
  the silence espeak writes before it (a stop's closure).

A request may instead give a pronunciation (ARPAbet with stress digits, word by word, ``PAUSE`` for a pause): flite
then speaks it with ``-p`` and espeak-ng through its phoneme input, so that a word and a nonword go through the same
synthesis path (festival voices take text only).

Phone labels stay in the engine's phone set here (``"radio"`` for flite/festival, ``"espeak"``); mapping to
ARPAbet is the alignment step's job.
"""

from __future__ import annotations

import errno
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf

from spidr.child_processes import run_child
from spidr.corpus import espeak
from spidr.corpus.phones import ESPEAK_SEPARATOR, PAUSE, arpabet_to_espeak
from spidr.corpus.voices import Voice

PHONE_INPUT_ENGINES = ("flite", "espeak")


@dataclass(frozen=True)
class Request:
    utt_id: str
    text: str
    rate: float  # speaking speed relative to the voice's default (1.1 = 10 % faster)
    # Speak this pronunciation instead of the text: one tuple of ARPAbet phones (stress digits kept) per word, or
    # (PAUSE,) for a pause. The text is then only a label.
    pronunciation: tuple[tuple[str, ...], ...] | None = None
    # The word each pronunciation entry says (its label in the word alignment); None: the entry's phones, spelt.
    words: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.words is not None and (self.pronunciation is None or len(self.words) != len(self.pronunciation)):
            raise ValueError(f"request {self.utt_id}: words {self.words} must label the pronunciation's entries one "
                             f"for one (pronunciation: {self.pronunciation})")

    def word_labels(self) -> tuple[str, ...]:
        """A label per pronunciation entry: ``words``, else the entry's stress-free phones spelt (K AE1 T → "kaet")."""
        assert self.pronunciation is not None
        return self.words or tuple("".join(phone.rstrip("012").lower() for phone in phones)
                                   for phones in self.pronunciation)


def flite_phones(pronunciation: tuple[tuple[str, ...], ...]) -> str:
    """flite ``-p`` input: lower-case phones between pauses (``pau k ae1 t pau``). flite's phone set knows stress
    0 and 1 only (an unknown "ow2" would come back as an unmappable segment): secondary stress is spoken as 1."""
    phones = ["pau" if word == (PAUSE,) else phone.lower().replace("2", "1")
              for word in pronunciation for phone in word]
    return " ".join(["pau", *phones, "pau"])


def espeak_phonemes(pronunciation: tuple[tuple[str, ...], ...]) -> str:
    """espeak-ng phoneme input: one ``[[ ]]`` block, words separated by spaces, pauses as ``_:_:``
    (``"[[h|'O:|r-|s _:_: k|'A:|r-]]"``).

    Each phone is written knowing the phone spoken after it, across word boundaries (espeak links words); a pause is
    no phone.
    """
    spoken = [phone for word in pronunciation for phone in word]
    after = [None if phone == PAUSE else phone for phone in [*spoken[1:], None]]
    words, start = [], 0
    for word in pronunciation:
        words.append("_:_:" if word == (PAUSE,) else
                     ESPEAK_SEPARATOR.join(arpabet_to_espeak(phone, after[start + k]) for k, phone in enumerate(word)))
        start += len(word)
    return "[[" + " ".join(words) + "]]"


@dataclass(frozen=True)
class RawUtterance:
    audio: np.ndarray  # (num_samples,) float32 in [-1, 1]
    sample_rate: int
    labels: list[tuple[float, float, str]]  # (onset s, offset s, engine phone label), contiguous from 0
    phone_set: Literal["radio", "espeak"]


class SynthesisError(RuntimeError):
    """The engine produced no usable output for one utterance."""


def engine_versions() -> dict[str, str]:
    """Each speech engine's version line ("missing" where it is not installed): a corpus is bit-exact for one set."""
    versions = {}
    for name in ("flite", "espeak-ng", "festival"):
        try:
            result = subprocess.run([name, "--version"], capture_output=True, text=True, check=False)
        except OSError:
            versions[name] = "missing"
            continue
        lines = [line.strip() for line in (result.stdout or result.stderr).splitlines() if line.strip()]
        # flite prints a copyright line before its version line
        versions[name] = next((line for line in lines if "version" in line.lower()), " ".join(lines))
    return versions


def synthesize(voice: Voice, requests: list[Request]) -> list[RawUtterance | SynthesisError]:
    """Speak every request with ``voice``; a failed utterance gives its ``SynthesisError`` in its place."""
    if voice.engine not in PHONE_INPUT_ENGINES and any(r.pronunciation is not None for r in requests):
        raise ValueError(f"voice {voice.name} ({voice.engine}) cannot speak a pronunciation; use a flite or "
                         "espeak-ng voice")
    match voice.engine:
        case "flite":
            return [_flite(voice.engine_voice, request) for request in requests]
        case "festival":
            return _festival(voice.engine_voice, requests)
        case "espeak":
            return [_espeak(voice.engine_voice, request) for request in requests]
    raise ValueError(f"unknown engine {voice.engine!r}")


def _labels_from_end_times(end_times: list[tuple[float, str]]) -> list[tuple[float, float, str]]:
    labels, onset = [], 0.0
    for offset, label in end_times:
        labels.append((onset, offset, label))
        onset = offset
    return labels


WAV_HEADER_BYTES = 44


def _failed_engine_write(what: str, path: Path) -> OSError:
    """The error of an engine's output cut short: no fault of the utterance (it stops the run instead of dropping
    the utterance), most likely a full temporary folder, where the engines write."""
    return OSError(errno.EIO, f"{what}: is the temporary folder ({tempfile.gettempdir()}) full? (TMPDIR sets "
                   "another)", str(path))


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    """An engine's WAV file, refused (``OSError``: the run stops, nothing is recorded as dropped) where it holds
    fewer samples than its header declares: the engine's write failed (a full temporary folder), though flite
    exits 0 then."""
    import wave

    try:
        audio, sample_rate = sf.read(path, dtype="float32", always_2d=True)
    except sf.LibsndfileError as error:
        if path.stat().st_size >= WAV_HEADER_BYTES:
            raise
        raise _failed_engine_write(f"the speech engine wrote {path.stat().st_size} bytes, not even a WAV header",
                                   path) from error
    with wave.open(str(path), "rb") as header:
        declared = header.getnframes()
    if audio.shape[0] < declared:
        raise _failed_engine_write(f"the speech engine wrote {audio.shape[0]} of the {declared} samples its header "
                                   "declares", path)
    return audio[:, 0], sample_rate


# flite --------------------------------------------------------------------------------------------------------


def _flite(engine_voice: str, request: Request) -> RawUtterance | SynthesisError:
    with tempfile.TemporaryDirectory(prefix="spidr-flite-") as tmp:
        wav = Path(tmp) / "out.wav"
        source = ["-t", request.text] if request.pronunciation is None else ["-p", flite_phones(request.pronunciation)]
        command = ["flite", "-voice", engine_voice, "-psdur", "--setf", f"duration_stretch={1 / request.rate:.4f}",
                   *source, "-o", str(wav)]
        result = run_child(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not wav.is_file():
            return SynthesisError(f"flite failed (exit {result.returncode}): {result.stderr.strip()[-300:]}")
        audio, sample_rate = _read_wav(wav)
    end_times = []
    for token in result.stdout.split():
        label, _, time = token.rpartition(":")
        end_times.append((float(time), label))
    return RawUtterance(audio, sample_rate, _labels_from_end_times(end_times), "radio")


# festival -----------------------------------------------------------------------------------------------------


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _festival_script(engine_voice: str, requests: list[Request], folder: Path) -> str:
    lines = [f"(voice_{engine_voice})"]
    is_hts = engine_voice.endswith("_hts")
    for i, request in enumerate(requests):
        if is_hts:  # HTS ignores Duration_Stretch: its speed goes to hts_engine's -r option
            lines.append(f"(set! hts_engine_params (append {engine_voice}::hts_engine_params "
                         f'(list (list "-r" {request.rate:.4f}))))')
        else:
            lines.append(f"(Parameter.set 'Duration_Stretch {1 / request.rate:.4f})")
        # (Utterance Text var) would say "var": the text must be evaluated into the form.
        lines.append(f"(set! utt (eval (list 'Utterance 'Text {_scheme_string(request.text)})))")
        lines.append("(utt.synth utt)")
        lines.append(f"(utt.save.wave utt {_scheme_string(str(folder / f'{i}.wav'))} 'riff)")
        lines.append(f"(utt.save.segs utt {_scheme_string(str(folder / f'{i}.segs'))})")
    return "\n".join(lines) + "\n"


def _read_segs(path: Path) -> list[tuple[float, str]]:
    """festival's segment file: a ``#`` line, then ``end_time 100 phone`` per segment."""
    end_times = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 3:
            end_times.append((float(fields[0]), fields[2]))
    return end_times


# Voices whose festival setup inserts an ``r`` segment after every ``er`` to select its diphones (ked_diphone.scm: "a
# hack [that] leaves the utterance somewhat tainted"): the second half of the er would be labelled R.
INSERTS_R_AFTER_ER = frozenset({"ked_diphone"})


def _without_inserted_r(end_times: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """``_read_segs``'s output with the ``r`` that directly follows each ``er`` merged back into it (a real r after
    the er comes next, and stays)."""
    merged: list[tuple[float, str]] = []
    absorbed = False  # the last segment is an er that took its inserted r already
    for end, label in end_times:
        if label == "r" and merged and merged[-1][1] == "er" and not absorbed:
            merged[-1] = (end, "er")
            absorbed = True
        else:
            merged.append((end, label))
            absorbed = False
    return merged


def _festival(engine_voice: str, requests: list[Request]) -> list[RawUtterance | SynthesisError]:
    """Speak the requests in as few festival runs as possible: ``festival -b`` stops the whole script at an utterance
    it cannot synthesise (it even crashes on some), so that one fails and the ones after it go to a fresh run."""
    outputs: list[RawUtterance | SynthesisError] = []
    while len(outputs) < len(requests):
        made, error = _festival_run(engine_voice, requests[len(outputs):])
        outputs += made
        if error is not None:
            outputs.append(error)
    return outputs


def _festival_run(engine_voice: str, requests: list[Request]) -> tuple[list[RawUtterance], SynthesisError | None]:
    """One festival run over ``requests``: the utterances it made before stopping, and why it stopped (``None`` when
    it made them all)."""
    with tempfile.TemporaryDirectory(prefix="spidr-festival-") as tmp:
        folder = Path(tmp)
        script = folder / "batch.scm"
        script.write_text(_festival_script(engine_voice, requests, folder))
        result = run_child(["festival", "-b", str(script)], capture_output=True, text=True, check=False)
        made: list[RawUtterance] = []
        for i in range(len(requests)):
            wav, segs = folder / f"{i}.wav", folder / f"{i}.segs"
            if not (wav.is_file() and segs.is_file()):
                if "failed to write" in result.stderr:  # (its temporary folder is full: no fault of the utterance)
                    raise _failed_engine_write("festival could not write its output", wav)
                return made, SynthesisError(f"festival stopped at this utterance and wrote no output for it (exit "
                                            f"{result.returncode}): {result.stderr.strip()[-300:]}")
            audio, sample_rate = _read_wav(wav)
            if not segs.read_text().startswith("#"):  # (always its first line: an empty file is a failed write)
                raise _failed_engine_write("festival wrote an empty segment file", segs)
            end_times = _read_segs(segs)
            if engine_voice in INSERTS_R_AFTER_ER:
                end_times = _without_inserted_r(end_times)
            made.append(RawUtterance(audio, sample_rate, _labels_from_end_times(end_times), "radio"))
    return made, None


# espeak-ng ----------------------------------------------------------------------------------------------------

MIN_GAP_S = 0.001  # a shorter run of zero samples is a waveform crossing zero, not a gap


def _silence_to_next(audio: np.ndarray, starts: list[tuple[int, str]], min_gap: int) -> list[tuple[int, str]]:
    """Move each phoneme's start back over the digital silence (zero samples) that ends the phone before it.

    espeak-ng writes a phone's leading silence (a voiceless stop's closure, 20-50 ms) before that phone's event, so the
    event timing would give the closure to the previous phone: a vowel, or all of a dark l's interval (measured: the
    phone before a stop ended in more than 10 ms of zeros in 59 % of cases, median 32 ms). A pause keeps its silence,
    and so does a phone that is all silence (a glottal stop; a dark l, which ``alignment`` moves into its vowel).
    """
    moved = list(starts)
    for i in range(1, len(moved)):
        previous_start, previous = moved[i - 1]
        start, label = moved[i]
        if previous.startswith("_"):
            continue
        sounding = np.flatnonzero(audio[previous_start:start])
        if not sounding.size:
            continue  # all silence is that phone itself (a glottal stop's closure)
        gap_start = previous_start + int(sounding[-1]) + 1
        if start - gap_start >= min_gap:
            moved[i] = (gap_start, label)
    return moved


# Voiceless stops and affricates (espeak-ng's en-us mnemonics), whose closure espeak-ng writes before their event.
VOICELESS_CLOSURES = frozenset({"p", "t", "k", "tS", "t#", "t2", "tS#"})
CLOSURE_LEVEL_DB = -32.0  # a 5 ms window this far below the utterance's peak sample is closure, not phone
CLOSURE_WINDOW_S = 0.005
MIN_KEPT_S = 0.010  # what a phone keeps of its span when its quiet end goes to the next phone's closure


def _quiet_to_voiceless_stop(audio: np.ndarray, starts: list[tuple[int, str]], min_gap: int, sample_rate: int, *,
                             given: list[int]) -> list[tuple[int, str]]:
    """Move a voiceless stop's start back over the quiet end of the phone before it, where ``_silence_to_next``
    found no digital silence (``given``: the starts it was given, to tell which it moved).

    The breathy variants (f2, f3, f5: ``breath`` in their voice files) fill a closure with aspiration noise, 40-50 dB
    below the peak, instead of zeros: measured on 12 sentences, their voiceless stops were labelled 46 ms long (the
    rest of the closure went to the vowel before) where the other variants' are 85 ms; counting 5 ms windows below
    ``CLOSURE_LEVEL_DB`` as closure gives them 85-89 ms and moves the other variants' stops by at most 7 ms.
    Voiced stops keep their start: their closure holds the voicing that the threshold would cut into."""
    window = round(CLOSURE_WINDOW_S * sample_rate)
    peak = float(np.abs(audio).max(initial=0))
    whole = len(audio) // window
    levels = np.sqrt(np.mean(np.square(audio[: whole * window].astype(np.float64)).reshape(whole, window), axis=1))
    loud = levels > peak * 10 ** (CLOSURE_LEVEL_DB / 20)
    keep = round(MIN_KEPT_S * sample_rate)
    result = list(starts)
    for i in range(1, len(result)):
        previous_start, previous = result[i - 1]
        start, label = result[i]
        if label not in VOICELESS_CLOSURES or previous.startswith("_") or start != given[i]:
            continue
        first, last = -(-previous_start // window), start // window  # the whole windows inside the previous phone
        sounding = np.flatnonzero(loud[first:last])
        if not sounding.size:
            continue  # all quiet: that phone itself (as in _silence_to_next)
        gap_start = (first + int(sounding[-1]) + 1) * window
        if start - gap_start >= min_gap and gap_start - previous_start >= keep:
            result[i] = (gap_start, label)
    return result


def _espeak(engine_voice: str, request: Request) -> RawUtterance | SynthesisError:
    try:
        if request.pronunciation is None:
            output = espeak.synthesize(request.text, engine_voice, rate=request.rate)
        else:
            output = espeak.synthesize(espeak_phonemes(request.pronunciation), engine_voice, rate=request.rate,
                                       phonemes=True)
    except RuntimeError as error:
        return SynthesisError(str(error))
    num_samples = len(output.audio)
    if num_samples == 0 or not output.phonemes:
        return SynthesisError("espeak-ng produced no audio or no phoneme events")
    starts = [(min(sample, num_samples), label) for sample, label in output.phonemes]
    if starts[0][0] > 0:  # the first event comes after a few ms of lead-in silence
        starts.insert(0, (0, "_"))
    min_gap = round(MIN_GAP_S * output.sample_rate)
    starts = _quiet_to_voiceless_stop(output.audio, _silence_to_next(output.audio, starts, min_gap), min_gap,
                                      output.sample_rate, given=[start for start, _ in starts])
    bounds = [sample for sample, _ in starts[1:]] + [num_samples]
    labels = [(start / output.sample_rate, end / output.sample_rate, label)
              for (start, label), end in zip(starts, bounds, strict=True)]
    return RawUtterance(output.audio.astype(np.float32) / 32768.0, output.sample_rate, labels, "espeak")
