"""Audio in: the one sample format, the one converter, and the file readers.

Everything sttd transcribes is 16 kHz mono (`SAMPLE_RATE_HZ`). `StreamConverter` turns any
other rate, channel count or sample format into it, chunk by chunk, for every way audio arrives:
`WavReader` and `decode_wav` (RIFF/WAVE in pure numpy), `MediaReader` (FLAC, Opus, MP3, AAC and
more through FFmpeg), live streams in other formats, and the client library (`read_audio`).
`open_audio` picks the reader for a file from its first bytes.
"""

from sttd.audio._convert import (
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    SAMPLE_FORMATS,
    AudioFormat,
    SampleFormat,
    StreamConverter,
)
from sttd.audio._media import ACCEPTED_FORMATS, MediaReader
from sttd.audio._open import AudioReader, open_audio, read_audio
from sttd.audio._pcm import SAMPLE_RATE_HZ, SAMPLES_PER_MS, clean, float32_to_pcm16, pcm16_to_float32
from sttd.audio._wav import WavReader, decode_wav, encode_wav, is_wav

__all__ = [
    "ACCEPTED_FORMATS",
    "MAX_SAMPLE_RATE_HZ",
    "MIN_SAMPLE_RATE_HZ",
    "SAMPLE_FORMATS",
    "SAMPLES_PER_MS",
    "SAMPLE_RATE_HZ",
    "AudioFormat",
    "AudioReader",
    "MediaReader",
    "SampleFormat",
    "StreamConverter",
    "WavReader",
    "clean",
    "decode_wav",
    "encode_wav",
    "float32_to_pcm16",
    "is_wav",
    "open_audio",
    "pcm16_to_float32",
    "read_audio",
]
