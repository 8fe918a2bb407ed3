"""Audio decoding, manifests, bucketed sampling, span masking and collation for pretraining."""

SAMPLE_RATE = 16_000  # Hz: every waveform spidr reads, trains on or writes; manifest lengths count samples at it
AUDIO_EXTENSIONS = (".wav", ".flac")  # what a folder scan reads by default (spidr manifest --ext, extract --ext)
