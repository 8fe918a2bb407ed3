"""espeak-ng through its C library (ctypes), with the sample index at which every phoneme starts.

Only the library reports phoneme timing: with ``espeakINITIALIZE_PHONEME_EVENTS`` every ``espeakEVENT_PHONEME``
passed to the synth callback carries the phoneme mnemonic and the output sample where it starts.

The library keeps state across utterances (e.g. the pitch-flutter phase), so the same sentence comes out
slightly different depending on what was said before it in the process. To make each utterance depend only on its
own text and voice, the library is initialised once per process and every utterance is synthesised in a forked
child, which starts from that freshly initialised state each time. Library state is per process, so parallel
synthesis uses processes, never threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pickle
import signal
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

# Constants of speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PHONEMES = 0x100  # text inside [[ ]] is read as phoneme mnemonics
_ENDPAUSE = 0x1000
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_PARAMETER_RATE = 1
_DEFAULT_RATE_WPM = 175


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class EspeakOutput:
    audio: np.ndarray  # (num_samples,) int16 at ``sample_rate``
    sample_rate: int
    phonemes: list[tuple[int, str]]  # (start sample, espeak mnemonic), in order


def library_path() -> str | None:
    """The espeak-ng shared library's name if the dynamic loader can find it, else ``None``."""
    return ctypes.util.find_library("espeak-ng")


@cache
def _cdll() -> ctypes.CDLL:
    path = library_path()
    if path is None:
        raise OSError("libespeak-ng is not installed")
    return ctypes.CDLL(path)


@cache
def variants() -> frozenset[str]:
    """Names of the installed voice variants (``m1``, ``f3``, ``klatt2``, ...); empty without espeak-ng."""
    if library_path() is None:
        return frozenset()
    lib = _cdll()
    # Only records where the data lives (no synthesis state), so it is safe before the forks in synthesize().
    lib.espeak_ng_InitializePath(None)
    lib.espeak_Info.restype = ctypes.c_char_p
    data = ctypes.c_char_p()
    lib.espeak_Info(ctypes.byref(data))
    folder = Path(os.fsdecode(data.value or b"")) / "voices" / "!v"
    return frozenset(p.name for p in folder.iterdir()) if data.value and folder.is_dir() else frozenset()


class _Library:
    """The process's initialised espeak-ng library and the buffers its callback fills."""

    def __init__(self) -> None:
        self.lib = _cdll()
        self.chunks: list[bytes] = []
        self.phonemes: list[tuple[int, str]] = []
        self.callback = _SynthCallback(self._on_audio)  # kept referenced: the C side holds only a pointer
        self.sample_rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise OSError(f"espeak_Initialize failed (returned {self.sample_rate}); is espeak-ng-data installed?")
        self.lib.espeak_SetSynthCallback(self.callback)

    def _on_audio(self, wav, num_samples, events) -> int:  # ctypes pointers and an int
        if wav and num_samples > 0:
            self.chunks.append(ctypes.string_at(wav, 2 * num_samples))
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == _EVENT_PHONEME:
                name = bytes(event.id.string).split(b"\0", 1)[0].decode("ascii", errors="replace")
                self.phonemes.append((event.sample, name))
            i += 1
        return 0  # 0 = continue synthesis

    def synthesize(self, text: str, voice: str, rate: float, *, phonemes: bool) -> tuple[bytes, list[tuple[int, str]]]:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(_PARAMETER_RATE, round(_DEFAULT_RATE_WPM * rate), 0)
        encoded = text.encode("utf-8")
        flags = _CHARS_UTF8 | _ENDPAUSE | (_PHONEMES if phonemes else 0)
        status = self.lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, flags, None, None)
        if status != 0 or self.lib.espeak_Synchronize() != 0:
            raise RuntimeError(f"espeak-ng failed on {text!r} (status {status})")
        return b"".join(self.chunks), self.phonemes


def _child(library: _Library, pipe_ends: tuple[int, int], text: str, voice: str, *, rate: float,
           phonemes: bool) -> None:
    """The forked child's whole life: it ends here with ``os._exit`` whatever happens. An exception that left this
    function would unwind the caller's stack in the child (a copy of the caller): a pipe whose reader is gone (the
    caller interrupted, or killed: BrokenPipeError), or a Ctrl-C (KeyboardInterrupt), ran the command's error
    handling a second time, and in a synthesis pool's worker the child went on as a worker of the pool, waiting for
    ever on the pool's task lock once the pool was terminated."""
    read_end, write_end = pipe_ends
    status = 1
    try:
        os.close(read_end)
        try:
            result = ("ok", library.synthesize(text, voice, rate, phonemes=phonemes))
        except Exception as error:  # any failure is reported to the parent
            result = ("error", f"{type(error).__name__}: {error}")
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(pickle.dumps(result))
        status = 0
    finally:
        os._exit(status)


@cache
def _library() -> _Library:
    return _Library()


def synthesize(text: str, voice: str, *, rate: float = 1.0, phonemes: bool = False) -> EspeakOutput:
    """Speak ``text`` with espeak-ng voice ``voice`` (e.g. ``"en-us+m3"``) at ``rate`` × the default speed.

    With ``phonemes``, text inside ``[[ ]]`` is read as espeak phoneme mnemonics (``"[[D@ k'at]]"``).

    The result depends only on (text, voice, rate): it is made in a forked child of the initialised library.
    """
    library = _library()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: synthesise, send the result, and leave without running the parent's cleanup
        _child(library, (read_end, write_end), text, voice, rate=rate, phonemes=phonemes)  # (never returns)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            payload = pipe.read()  # read to EOF before waiting, or a large result would block the child
    except BaseException:  # (Ctrl-C): the child goes too, and is reaped
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    _, status = os.waitpid(pid, 0)
    if not payload or status != 0:
        raise RuntimeError(f"espeak-ng child process for {text!r} exited with status {status}")
    kind, value = pickle.loads(payload)  # our own child's data
    if kind == "error":
        raise RuntimeError(f"espeak-ng ({voice}): {value}")
    audio_bytes, phonemes = value
    return EspeakOutput(np.frombuffer(audio_bytes, dtype="<i2").copy(), library.sample_rate, phonemes)
