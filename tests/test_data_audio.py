"""Decoding, down-mixing, resampling, standardisation and the errors of ``spidr.data.audio``."""

from __future__ import annotations

import io
import math
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from spidr.data.audio import AudioError, decode, load_audio, standardize, waveform_from_samples
from spidr.data.dataset import AudioDataset, Skipped
from spidr.data.manifest import ManifestEntry
from spidr.data.scanning import UNKNOWN_LENGTH_REASON
from test_data_manifest import make_tar


def sine(num_samples: int, rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(num_samples) / rate)).astype(np.float32)


def test_standardize_is_layer_norm_over_the_whole_utterance() -> None:
    x = torch.randn(1234, generator=torch.Generator().manual_seed(0)) * 3 + 2
    assert torch.equal(standardize(x), F.layer_norm(x, x.shape))
    # Hand-computed: mean 2.5, biased variance 1.25.
    small = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (small - 2.5) / math.sqrt(1.25 + 1e-5)
    torch.testing.assert_close(standardize(small), expected)
    # Batched rows are standardised independently.
    rows = torch.stack([x, 2 * x + 7])
    torch.testing.assert_close(standardize(rows)[1], standardize(rows[1]))


def test_path_and_bytes_decode_identically(tmp_path: Path) -> None:
    path = tmp_path / "a.flac"
    sf.write(path, sine(5000, 16_000), 16_000)
    from_path = load_audio(path, normalize=False)
    from_bytes = load_audio(path.read_bytes(), normalize=False)
    assert from_path.dtype == torch.float32
    assert from_path.shape == (5000,)
    assert torch.equal(from_path, from_bytes)
    with path.open("rb") as handle:  # a file object, and any os.PathLike
        assert torch.equal(load_audio(handle, normalize=False), from_path)

    class Located:
        def __fspath__(self) -> str:
            return str(path)

    assert torch.equal(load_audio(Located(), normalize=False), from_path)
    np.testing.assert_allclose(from_path.numpy(), sine(5000, 16_000), atol=1e-4)  # 16-bit FLAC quantisation
    normalised = load_audio(path)
    assert abs(float(normalised.mean())) < 1e-5
    assert abs(float(normalised.var(unbiased=False)) - 1) < 1e-3


def test_stereo_is_averaged_to_mono(tmp_path: Path) -> None:
    left, right = sine(3000, 16_000, 300), sine(3000, 16_000, 500, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16_000, subtype="FLOAT")
    np.testing.assert_allclose(decode(path).numpy(), (left + right) / 2, atol=1e-7)


def test_other_rates_are_resampled_to_16k(tmp_path: Path) -> None:
    path = tmp_path / "cd.wav"
    sf.write(path, sine(44_100, 44_100, 440), 44_100, subtype="FLOAT")
    wave = decode(path)
    assert wave.shape == (16_000,)
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    assert int(np.argmax(spectrum)) == 440  # one-second signal: bin k is k Hz, so the tone kept its pitch


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_32", "FLOAT", "DOUBLE"])
@pytest.mark.parametrize("rate", [8_000, 16_000, 44_100])
def test_samples_in_memory_give_what_their_file_gives(tmp_path: Path, subtype: str, rate: int) -> None:
    """waveform_from_samples(samples, rate) == load_audio(file) for stereo audio read back by soundfile in its own
    dtype (int16 / int32 PCM, float32, float64 as sf.read gives by default), or as a torch tensor."""
    path = tmp_path / "a.wav"
    stereo = np.stack([sine(3 * rate // 10, rate, 300), sine(3 * rate // 10, rate, 500, 0.2)], axis=1)
    sf.write(path, stereo, rate, subtype=subtype)
    dtype = {"PCM_16": "int16", "PCM_32": "int32", "FLOAT": "float32", "DOUBLE": "float64"}[subtype]
    samples, read_rate = sf.read(path, dtype=dtype)
    for normalize in (False, True):
        expected = load_audio(path, normalize=normalize)
        for given in (samples, torch.from_numpy(samples)):
            got = waveform_from_samples(given, read_rate, normalize=normalize)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    if subtype == "FLOAT":
        as_bf16 = torch.from_numpy(samples).bfloat16()  # numpy has no bfloat16
        torch.testing.assert_close(waveform_from_samples(as_bf16, read_rate, normalize=False),
                                   waveform_from_samples(as_bf16.float(), read_rate, normalize=False))
    one_channel = waveform_from_samples(samples[:, :1], read_rate, normalize=False)
    assert torch.equal(waveform_from_samples(samples[:, 0], read_rate, normalize=False), one_channel)


def test_unsigned_8_bit_pcm_is_centred_on_128() -> None:
    pcm = np.array([128, 255, 0, 192], dtype=np.uint8)  # silence, almost +1, -1, +0.5
    torch.testing.assert_close(waveform_from_samples(pcm, 16_000, normalize=False),
                               torch.tensor([0.0, 127 / 128, -1.0, 0.5]))


def test_samples_in_memory_that_cannot_be_audio_are_refused_by_name() -> None:
    with pytest.raises(AudioError, match=r"^clip: samples of shape \(2, 8000\): expected \(S,\) mono or \(S, C\) "
                                         r"channels \(more channels than samples is \(C, S\): transpose it\)"):
        waveform_from_samples(np.zeros((2, 8000), dtype=np.float32), 16_000, name="clip")
    with pytest.raises(AudioError, match=r"sample_rate = 16000.0: expected a positive whole number of Hz"):
        waveform_from_samples(np.zeros(800, dtype=np.float32), 16_000.0)
    with pytest.raises(AudioError, match="contains NaN or Inf samples"):
        waveform_from_samples(np.full(800, np.nan), 16_000)
    with pytest.raises(AudioError, match="contains no audio samples"):
        waveform_from_samples(np.zeros(0), 16_000)
    with pytest.raises(TypeError, match=r"load_audio reads a file \(a path, encoded bytes, a file object or a "
                                        r"manifest entry\), not a ndarray of samples: use waveform_from_samples"):
        load_audio(np.zeros(800, dtype=np.int16))


def test_ogg_vorbis(tmp_path: Path) -> None:
    path = tmp_path / "a.ogg"
    sf.write(path, sine(16_000, 16_000), 16_000, format="OGG", subtype="VORBIS")
    wave = decode(path)
    assert abs(wave.shape[0] - 16_000) < 100


@pytest.mark.parametrize("subtype", ["GSM610", "G721_32"])
def test_telephony_codecs_that_soundfile_reads_without_seeking(tmp_path: Path, subtype: str) -> None:
    """soundfile calls these codecs non-seekable and refuses a read without a frame count ('frames must be specified
    for non-seekable files'), so a GSM corpus was listed by spidr manifest and then skipped as undecodable."""
    path = tmp_path / "phone.wav"
    sf.write(path, 0.3 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000), 16000, subtype=subtype)
    reference, rate = sf.read(path, dtype="float32")  # soundfile's own whole-file read
    assert rate == 16000
    torch.testing.assert_close(decode(path), torch.from_numpy(reference))


def test_manifest_entry_source(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, sine(4000, 16_000), 16_000)
    assert torch.equal(load_audio(ManifestEntry("a", str(path), 4000)), load_audio(path))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "does not exist"),
        ("corrupt", "cannot be decoded"),
        ("empty", "no audio samples"),
        ("short", "too short: 300 samples"),
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
    ],
)
def test_bad_audio_raises_audio_error(tmp_path: Path, kind: str, reason: str) -> None:
    path = tmp_path / f"{kind}.wav"
    match kind:
        case "corrupt":
            path.write_bytes(b"RIFF" + bytes(range(256)) * 4)
        case "empty":
            sf.write(path, np.zeros(0, dtype=np.float32), 16_000)
        case "short":
            sf.write(path, sine(300, 16_000), 16_000)
        case "nan" | "inf":
            wave = sine(4000, 16_000)
            wave[1234] = np.nan if kind == "nan" else np.inf
            sf.write(path, wave, 16_000, subtype="FLOAT")
    with pytest.raises(AudioError, match=reason) as info:
        load_audio(path, min_samples=400)
    assert info.value.path == str(path)
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)  # the CLI prints it as a user error


def test_audio_with_no_sample_left_at_16_khz_is_an_audio_error(tmp_path: Path) -> None:
    """One sample at 44.1 kHz resamples to none: decode returned an empty waveform instead of saying so."""
    sf.write(tmp_path / "one.wav", np.full(1, 0.5, dtype=np.float32), 44_100)
    with pytest.raises(AudioError, match=r"one\.wav: contains no audio samples at 16 kHz \(1 at 44100 Hz\)"):
        decode(tmp_path / "one.wav")
    from spidr.data.scanning import scan

    assert scan(tmp_path, progress=False).failures == [(str(tmp_path / "one.wav"),
                                                        "no audio samples at 16 kHz (1 at 44100 Hz)")]


def test_archive_member_out_of_range(tmp_path: Path) -> None:
    archive = tmp_path / "x.tar"
    archive.write_bytes(b"\0" * 1024)
    with pytest.raises(AudioError, match="beyond the end"):
        load_audio(ManifestEntry("a", "a.wav", 10, str(archive), 512, 4096))


def flac_of_unknown_length(path: Path, num_samples: int = 8000) -> Path:
    """A FLAC whose STREAMINFO total-sample count is 0 ("unknown"), as an encoder writing to a pipe leaves it."""
    sf.write(path, sine(num_samples, 16_000), 16_000, format="FLAC")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC"
    assert data[4] & 0x7F == 0  # STREAMINFO comes first: its fields start at byte 8
    fields = int.from_bytes(data[18:26], "big") & ~(2**36 - 1)  # the low 36 bits of bytes 18..25: total samples
    data[18:26] = fields.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def test_a_header_without_length_or_with_an_impossible_one_is_an_audio_error(tmp_path: Path, monkeypatch) -> None:
    """libsndfile reports 2**63 - 1 frames for a FLAC of unknown length: reading it allocated for that many."""
    path = flac_of_unknown_length(tmp_path / "piped.flac")
    assert sf.info(path).frames == 2**63 - 1
    with pytest.raises(AudioError, match=r"piped\.flac: its header records no length"):
        load_audio(path)
    from spidr.data.scanning import scan

    result = scan(tmp_path, progress=False)  # it was listed with 2**63 - 1 samples (and -1.6e11 hours in all)
    assert len(result.entries) == 0
    assert [reason for _, reason in result.failures] == [
        "its header records no length (written to a pipe?); re-encode it to a file, e.g. sox in.flac out.flac"]

    def claims_too_much(self, *args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(sf.SoundFile, "read", claims_too_much)
    sf.write(tmp_path / "ok.wav", sine(800, 16_000), 16_000)
    with pytest.raises(AudioError, match=r"ok\.wav: cannot be decoded \(its header claims more samples"):
        load_audio(tmp_path / "ok.wav")


def test_huge_float_samples_are_standardised_not_zeroed(tmp_path: Path) -> None:
    """Byte-swapped floats can reach 1e18: their float32 variance overflowed and the utterance became all zeros
    (finite, so nothing was reported). Scaling by a power of 2 first leaves the standardised audio unchanged."""
    wave = sine(160_000, 16_000)
    for peak in (1e17, 1e18, 1e20):
        sf.write(tmp_path / "loud.wav", wave * np.float32(peak), 16_000, subtype="FLOAT")
        loud = load_audio(tmp_path / "loud.wav")
        torch.testing.assert_close(loud, standardize(torch.from_numpy(wave)), atol=1e-4, rtol=0)


def test_a_file_of_exactly_min_samples_is_kept(tmp_path: Path) -> None:
    """``min_samples`` is the shortest length allowed, not the first refused: data.min_sample_size = 4000 must keep
    a 4000-sample utterance (the batcher crops to it), and refuse one sample fewer."""
    sf.write(tmp_path / "edge.wav", sine(400, 16_000), 16_000)
    assert load_audio(tmp_path / "edge.wav", min_samples=400).shape == (400,)
    with pytest.raises(AudioError, match="too short: 400 samples at 16 kHz, fewer than the minimum 401"):
        load_audio(tmp_path / "edge.wav", min_samples=401)


def test_samples_with_no_channel_are_an_audio_error() -> None:
    """A7: (S, 0) samples hold no audio; the documented error is an AudioError naming them, not an IndexError."""
    with pytest.raises(AudioError, match="no audio samples"):
        waveform_from_samples(np.zeros((5, 0), np.float32), 16_000)


@pytest.mark.parametrize("rate", [True, 0, -16_000])
def test_a_sample_rate_that_is_not_a_positive_whole_number_is_refused_by_name(rate) -> None:
    """U02, U03. The docstring: ``sample_rate`` a positive whole number of Hz; True is not 1 Hz."""
    with pytest.raises(AudioError, match=rf"^clip: sample_rate = {rate!r}: expected a positive whole number of Hz"):
        waveform_from_samples(sine(800, 16_000), rate, name="clip")


def test_a_header_without_length_keeps_its_own_reason(tmp_path: Path) -> None:
    """U04. An AudioError raised while decoding passes as it is: its reason is the one that says what to do, not
    "cannot be decoded (…)" wrapped around it."""
    path = flac_of_unknown_length(tmp_path / "piped.flac")
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert info.value.reason == UNKNOWN_LENGTH_REASON
    assert str(info.value) == f"{path}: {UNKNOWN_LENGTH_REASON}"


def _archive(tmp_path: Path, members: dict[str, bytes]) -> list[ManifestEntry]:
    """A tar holding ``members``, and their manifest entries (byte ranges from tarfile itself)."""
    path = make_tar(tmp_path, members)
    with tarfile.open(path) as tar:
        return [ManifestEntry(Path(m.name).stem, m.name, 4000, str(path), m.offset_data, m.size)
                for m in tar.getmembers()]


def _wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16_000, format="WAV")
    return buffer.getvalue()


def test_a_bad_archive_member_is_named_by_its_location(tmp_path: Path) -> None:
    """U06. A member that cannot be decoded is named archive:member (ManifestEntry.location), not "<bytes>": the
    dataset reports each bad member by where it is, and two bad members stay two distinct reports."""
    garbage = b"RIFF" + bytes(range(256)) * 4
    entries = _archive(tmp_path, {"good.wav": _wav_bytes(sine(4000, 16_000)), "bad1.wav": garbage,
                                  "bad2.wav": garbage[::-1]})
    assert load_audio(entries[0]).shape == (4000,)
    with pytest.raises(AudioError) as info:
        load_audio(entries[1])
    assert info.value.path == f"{tmp_path / 'corpus.tar'}:bad1.wav"
    skipped = [AudioDataset(entries)[i] for i in (1, 2)]
    assert all(isinstance(item, Skipped) for item in skipped)
    assert [item.location for item in skipped] == [entries[1].location, entries[2].location]


@pytest.mark.parametrize("shape", [(800,), (800, 1)])
def test_waveform_from_samples_never_shares_the_caller_s_memory(shape) -> None:
    """U07. The result is a copy even for float32 16 kHz mono input with normalize=False: a caller reusing its
    buffer (e.g. a recording loop) must not change the waveform it was given."""
    samples = sine(800, 16_000).reshape(shape)
    wave = waveform_from_samples(samples, 16_000, normalize=False)
    expected = wave.clone()
    samples[...] = 7.0
    assert torch.equal(wave, expected)


def _sine(num_samples: int, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * 440.0 * np.arange(num_samples) / rate)).astype(np.float32)


class _BytesPath(os.PathLike):
    """A ``PathLike[bytes]``, as ``os.scandir(b".")`` gives (``os.DirEntry[bytes]``)."""

    def __init__(self, path: bytes) -> None:
        self.path = path

    def __fspath__(self) -> bytes:
        return self.path


def test_a_bytes_path_like_is_read_as_the_file_it_names_not_as_encoded_audio(tmp_path: Path) -> None:
    """load_audio's ``os.PathLike`` admits a PathLike[bytes]: os.fspath gave bytes, which decode took for the
    encoded audio itself ("cannot be decoded (... Format not recognised)"), and errors named the file b'...'."""
    path = tmp_path / "a.wav"
    sf.write(path, _sine(4000, 16_000), 16_000)
    expected = load_audio(path)
    assert torch.equal(load_audio(_BytesPath(os.fsencode(path))), expected)
    entry = next(e for e in os.scandir(os.fsencode(tmp_path)) if e.name == b"a.wav")
    assert torch.equal(load_audio(entry), expected)
    with pytest.raises(AudioError, match=r"^" + str(tmp_path / "missing.wav") + ": file does not exist"):
        load_audio(_BytesPath(os.fsencode(tmp_path / "missing.wav")))


def test_a_bytearray_decodes_as_bytes_and_an_error_does_not_quote_its_content(tmp_path: Path) -> None:
    """``_source_name`` names a bytearray "<bytes>", but ``_read`` passed it to soundfile as a file: it failed with
    the whole content repr'd into the message (megabytes for a real file)."""
    path = tmp_path / "a.wav"
    sf.write(path, _sine(4000, 16_000), 16_000)
    data = path.read_bytes()
    assert torch.equal(load_audio(bytearray(data)), load_audio(data))
    with pytest.raises(AudioError) as caught:
        load_audio(bytearray(b"\x00" * 100_000))
    assert len(str(caught.value)) < 1000
